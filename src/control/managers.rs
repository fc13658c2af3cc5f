//! `control.ListManagers|RemoveManager|TransferLeadership`: the Raft group's operator
//! calls, delegated to the leader's `raft.Status`, `raft.RemoveMember` and
//! `raft.TransferLeadership` (which hold the quorum checks).
//!
//! Must never change membership itself.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::ControlApi;
use crate::net::{CallOptions, Router, ServicePool, UnaryMethod};
use crate::proto::control as pb;
use crate::proto::control::rpc::{self, forward};
use crate::proto::raft as raftpb;
use crate::proto::raft::rpc::{REMOVE_MEMBER, STATUS, TRANSFER_LEADERSHIP};
use crate::raft::node::service::ADMIN_CALL_TIMEOUT;
use crate::replication::PROPOSE_TIMEOUT;
use crate::wire::Status;

impl ControlApi {
    /// Calls the leader's raft `method` (this manager's own address when it leads).
    fn call_leader<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        method: UnaryMethod<Req, Resp>,
        request: &Req,
    ) -> Result<Resp, Status> {
        let addr = self.leader_addr()?;
        self.transport.channel(&addr, &self.client_tls).call(
            method,
            request,
            CallOptions::timeout(ADMIN_CALL_TIMEOUT.max(PROPOSE_TIMEOUT)),
        )
    }
}

/// The group as the leader sees it: every manager method answers with it.
fn leader_status(api: &ControlApi) -> Result<pb::ManagersResponse, Status> {
    let status: raftpb::StatusResponse = api.call_leader(STATUS, &raftpb::StatusRequest {})?;
    Ok(pb::ManagersResponse {
        status: Some(status),
    })
}

/// The Raft group as the leader sees it, for the manager columns of `node ls` and `node
/// inspect`: the leader's id and whether the leader hears from each member (the view
/// `manager ls` shows, so that both commands agree on a dead manager).
pub(super) struct GroupView {
    /// The leader's Raft id.
    pub(super) leader: u64,
    /// Raft id → reachable from the leader.
    pub(super) reachable: BTreeMap<u64, bool>,
}

/// Asks the leader for its view of the group; `None` while no leader answers (the caller
/// then reports reachability as unknown rather than guessing).
pub(super) fn group_view(api: &ControlApi) -> Option<GroupView> {
    let status: raftpb::StatusResponse = match api.call_leader(STATUS, &raftpb::StatusRequest {}) {
        Ok(status) => status,
        Err(status) => {
            log::debug!("no leader view of the managers for a node listing: {status}");
            return None;
        }
    };
    Some(GroupView {
        leader: status.leader,
        reachable: status
            .members
            .iter()
            .map(|m| (m.raft_id, m.reachable))
            .collect(),
    })
}

/// Serves the manager methods.
pub(super) fn register(router: &mut Router, pool: &ServicePool, api: &Arc<ControlApi>) {
    let a = api.clone();
    router.serve_unary(rpc::LIST_MANAGERS, pool, move |_, _| leader_status(&a));
    let a = api.clone();
    router.serve_unary_deferred(
        rpc::REMOVE_MANAGER,
        pool,
        move |ctx, request: pb::RemoveManagerRequest, responder| {
            let removed = super::Caller::from_peer(ctx.peer()).and_then(|caller| {
                let _: raftpb::RemoveMemberResponse = a.call_leader(
                    REMOVE_MEMBER,
                    &raftpb::RemoveMemberRequest {
                        raft_id: request.raft_id,
                        force: request.force,
                    },
                )?;
                Ok(caller)
            });
            let caller = match removed {
                Ok(caller) => caller,
                Err(refusal) => return responder.respond(Err(refusal)),
            };
            // The removed manager's certificate is revoked cluster-wide (it must not come
            // back through raft.Join or reach the control API). Removed from Raft but not
            // yet revoked (this call failed): `manager rm` again, or `node rm`, finishes it.
            let after = a.clone();
            a.write_with(
                &caller,
                forward::REVOKE_REMOVED_MANAGER,
                request,
                Box::new(move |revoked| {
                    responder.respond(
                        revoked
                            .map_err(|status| {
                                Status::new(
                                    status.code,
                                    format!(
                                        "the manager left the Raft group, but revoking its \
                                         certificate failed ({}); run `flotilla manager rm` \
                                         again",
                                        status.message
                                    ),
                                )
                            })
                            .and_then(|_| leader_status(&after)),
                    );
                }),
            );
        },
    );
    let a = api.clone();
    router.serve_unary(
        rpc::TRANSFER_LEADERSHIP,
        pool,
        move |_, request: pb::TransferLeadershipRequest| {
            let _: raftpb::TransferLeadershipResponse = a.call_leader(
                TRANSFER_LEADERSHIP,
                &raftpb::TransferLeadershipRequest {
                    raft_id: request.raft_id,
                },
            )?;
            leader_status(&a)
        },
    );
}
