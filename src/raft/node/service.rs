//! The Raft methods other members and operators call, served from the transport's pools:
//! `raft.Step`, `raft.InstallSnapshot`, `raft.Join`, `raft.ReadIndex`, `raft.RemoveMember`,
//! `raft.TransferLeadership` and `raft.Status`. Managers only.
//!
//! Handlers only translate: they hand work to the raft thread through a [`NodeHandle`] and
//! never touch the core. A received snapshot is written to disk chunk by chunk (memory
//! bounded by the transport's window) and verified before the raft thread hears of it.

use std::time::{Duration, Instant};

use super::codec::message_from_pb;
use super::{Input, NodeError, NodeHandle, NodeStatus};
use crate::net::{ClientStream, Router, ServicePool};
use crate::proto::raft as pb;
use crate::proto::raft::rpc;
use crate::raft::core::{MembershipChange, MessageBody};
use crate::raft::storage::LogStore;
use crate::raft::types::NodeId;
use crate::util::memory::rss_kib;
use crate::wire::{Code, Status};

/// How long membership and transfer calls may take on the leader.
pub const ADMIN_CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// The pools the Raft methods run on.
pub struct RaftPools {
    /// `raft.ReadIndex`: short calls that only queue work (`raft.Step` runs inline on the
    /// reactor).
    pub step: ServicePool,
    /// `raft.InstallSnapshot`: one transfer at a time.
    pub snapshot: ServicePool,
    /// Joins, removals, transfers, status: rare and allowed to block.
    pub admin: ServicePool,
}

impl RaftPools {
    /// Starts the pools.
    ///
    /// # Errors
    /// The OS error if a thread cannot be spawned.
    pub fn start() -> std::io::Result<Self> {
        Ok(Self {
            step: ServicePool::new("raft", 2, 1024)?,
            snapshot: ServicePool::new("raft-snapshot", 1, 4)?,
            admin: ServicePool::new("raft-admin", 2, 64)?,
        })
    }

    /// Stops every pool (queued calls run first); joined.
    pub fn shutdown(self) {
        self.step.shutdown();
        self.snapshot.shutdown();
        self.admin.shutdown();
    }
}

/// Serves the Raft methods of `node` on `pools` (who may call: their declared policies,
/// managers only).
pub fn register(router: &mut Router, pools: &RaftPools, node: &NodeHandle, store: &LogStore) {
    let n = node.clone();
    // Inline on the reactor: decoding and a `try_send` to the raft thread, no thread hop
    // on the replication path.
    router.serve_unary_inline(rpc::STEP, move |_, req| step(&n, req));
    let (n, s) = (node.clone(), store.clone());
    router.serve_client_stream(rpc::INSTALL_SNAPSHOT, &pools.snapshot, move |_, stream| {
        install_snapshot(&n, &s, stream)
    });
    let n = node.clone();
    router.serve_unary_deferred(rpc::READ_INDEX, &pools.step, move |_, _, responder| {
        let done = Box::new(move |result: Result<u64, NodeError>| {
            responder.respond(
                result
                    .map(|index| pb::ReadIndexResponse { index })
                    .map_err(|e| e.to_status()),
            );
        });
        // A refused send drops the responder, which answers `Unavailable`.
        if let Err(error) = n.send(Input::ReadIndex { apply: false, done }) {
            log::debug!("raft.ReadIndex refused: {error}");
        }
    });
    let n = node.clone();
    router.serve_unary(rpc::JOIN, &pools.admin, move |ctx, req| {
        join(&n, ctx.peer().map(|p| p.node_id.as_str()), &req)
    });
    let n = node.clone();
    router.serve_unary(rpc::REMOVE_MEMBER, &pools.admin, move |_, req| {
        remove_member(&n, &req)
    });
    let n = node.clone();
    router.serve_unary(rpc::TRANSFER_LEADERSHIP, &pools.admin, move |_, req| {
        transfer_leadership(&n, &req)
    });
    let n = node.clone();
    router.serve_unary(rpc::STATUS, &pools.admin, move |_, _| status(&n));
}

fn step(node: &NodeHandle, request: pb::StepRequest) -> Result<pb::StepResponse, Status> {
    if node.shared().removed_ids.lock().contains(&request.from) {
        return Ok(pb::StepResponse { removed: true });
    }
    if !request.from_addr.is_empty() {
        node.directory().learn(request.from, &request.from_addr);
    }
    let messages = request
        .messages
        .into_iter()
        .map(message_from_pb)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    node.inputs()
        .try_send(Input::Step(messages))
        .map_err(|_| Status::resource_exhausted("the raft thread is busy; messages dropped"))?;
    Ok(pb::StepResponse { removed: false })
}

fn chunk_timeout(node: &NodeHandle) -> Duration {
    Duration::from_millis(node.shared().config.snapshot_chunk_timeout_ms)
}

fn install_snapshot(
    node: &NodeHandle,
    store: &LogStore,
    stream: &mut ClientStream<pb::SnapshotChunk>,
) -> Result<pb::InstallSnapshotResponse, Status> {
    let timeout = chunk_timeout(node);
    let first = stream
        .recv_timeout(timeout)?
        .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
    let notice = first
        .notice
        .clone()
        .ok_or_else(|| Status::invalid_argument("the first chunk must carry the notice"))
        .and_then(|n| message_from_pb(n).map_err(|e| Status::invalid_argument(e.to_string())))?;
    let MessageBody::Snapshot { meta } = &notice.body else {
        return Err(Status::invalid_argument(
            "the notice is not a snapshot message",
        ));
    };
    let sha: [u8; 32] = first
        .content_sha256
        .as_ref()
        .try_into()
        .map_err(|_| Status::invalid_argument("content_sha256 must be 32 bytes"))?;
    if !first.from_addr.is_empty() {
        node.directory().learn(notice.from, &first.from_addr);
    }
    let storage_error =
        |e: crate::raft::storage::StorageError| Status::new(Code::Internal, e.to_string());
    let mut builder = store
        .snapshots()
        .receive(meta.clone(), first.total_bytes, sha)
        .map_err(storage_error)?;
    let started = Instant::now();
    // Memory must stay bounded by a few chunks whatever the snapshot's size: sample it at
    // every chunk and report the peak growth.
    let rss_start_kib = rss_kib().unwrap_or(0);
    let mut rss_peak_kib = rss_start_kib;
    builder
        .write_chunk(first.offset, &first.data)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    drop(first);
    while let Some(chunk) = stream.recv_timeout(timeout)? {
        builder
            .write_chunk(chunk.offset, &chunk.data)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        rss_peak_kib = rss_peak_kib.max(rss_kib().unwrap_or(0));
    }
    let received_bytes = builder.written_bytes();
    let info = builder
        .finish()
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    log::info!(
        "raft {:x}: received snapshot {} of {received_bytes} bytes from {:x} in {:?} \
         (rss growth {:.1} MiB)",
        node.id(),
        info.meta.index,
        notice.from,
        started.elapsed(),
        rss_peak_kib.saturating_sub(rss_start_kib) as f64 / 1024.0
    );
    *node.shared().received_snapshot.lock() = Some(info);
    node.inputs()
        .send(Input::Step(vec![notice]))
        .map_err(|_| Status::unavailable("the raft node is stopping"))?;
    Ok(pb::InstallSnapshotResponse { received_bytes })
}

fn join(
    node: &NodeHandle,
    caller: Option<&str>,
    request: &pb::JoinRequest,
) -> Result<pb::JoinResponse, Status> {
    if request.raft_id == 0 || request.addr.is_empty() {
        return Err(Status::invalid_argument("raft_id and addr are required"));
    }
    let status = node.status(ADMIN_CALL_TIMEOUT).map_err(|e| e.to_status())?;
    if !status.is_leader {
        return Err(not_leader(node, status.leader).to_status());
    }
    let known = status.members.iter().any(|m| m.id == request.raft_id);
    let gate = node.shared().join_gate.read().clone();
    if !known && let (Some(gate), Some(caller)) = (gate, caller) {
        gate(caller).map_err(|reason| Status::new(Code::FailedPrecondition, reason))?;
    }
    if node.directory().addr(request.raft_id).as_deref() != Some(request.addr.as_str()) {
        node.propose_member_addr(request.raft_id, &request.addr, ADMIN_CALL_TIMEOUT)
            .map_err(|e| e.to_status())?;
    }
    if !known {
        retry_while_busy(|| {
            node.change_membership(
                MembershipChange::AddLearner(request.raft_id),
                ADMIN_CALL_TIMEOUT,
            )
        })?;
        log::info!(
            "raft {:x}: added {:x} at {} as a learner",
            node.id(),
            request.raft_id,
            request.addr
        );
    }
    Ok(pb::JoinResponse {
        members: node
            .directory()
            .all()
            .into_iter()
            .map(|(raft_id, addr)| pb::Member { raft_id, addr })
            .collect(),
    })
}

/// Membership changes are one at a time: retry a refused one until the deadline.
fn retry_while_busy(mut call: impl FnMut() -> Result<(), NodeError>) -> Result<(), Status> {
    let deadline = Instant::now() + ADMIN_CALL_TIMEOUT;
    loop {
        match call() {
            Err(NodeError::RetrySoon(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other.map_err(|e| e.to_status()),
        }
    }
}

fn not_leader(node: &NodeHandle, leader: Option<u64>) -> NodeError {
    NodeError::NotLeader {
        leader,
        leader_addr: leader.and_then(|id| node.directory().addr(id)),
    }
}

fn remove_member(
    node: &NodeHandle,
    request: &pb::RemoveMemberRequest,
) -> Result<pb::RemoveMemberResponse, Status> {
    let status = node.status(ADMIN_CALL_TIMEOUT).map_err(|e| e.to_status())?;
    if !status.is_leader {
        return Err(not_leader(node, status.leader).to_status());
    }
    let Some(target) = status.members.iter().find(|m| m.id == request.raft_id) else {
        return Err(Status::not_found(format!(
            "{:x} is not a manager of this cluster; `flotilla manager ls` lists them",
            request.raft_id
        )));
    };
    if target.role != "learner"
        && !request.force
        && let Err(shortfall) = removal_keeps_quorum(&status, &[target.id])
    {
        return Err(Status::new(
            Code::FailedPrecondition,
            format!(
                "removing {:x} would leave {} reachable of {} managers, fewer than the {} a \
                 quorum needs; bring managers back first, or pass --force",
                target.id, shortfall.reachable, shortfall.voters, shortfall.quorum
            ),
        ));
    }
    retry_while_busy(|| {
        node.change_membership(
            MembershipChange::Remove(request.raft_id),
            ADMIN_CALL_TIMEOUT,
        )
    })?;
    log::info!("raft {:x}: removed {:x}", node.id(), request.raft_id);
    Ok(pb::RemoveMemberResponse {})
}

/// Hands leadership to a voter, after checking the target in the operator's terms (the
/// core only says whether it is a voter): unknown ids and learners get a message that says
/// what to do.
fn transfer_leadership(
    node: &NodeHandle,
    request: &pb::TransferLeadershipRequest,
) -> Result<pb::TransferLeadershipResponse, Status> {
    let status = node.status(ADMIN_CALL_TIMEOUT).map_err(|e| e.to_status())?;
    if !status.is_leader {
        return Err(not_leader(node, status.leader).to_status());
    }
    let Some(target) = status.members.iter().find(|m| m.id == request.raft_id) else {
        return Err(Status::not_found(format!(
            "no manager has id {:x}; `flotilla manager ls` lists the managers and their ids",
            request.raft_id
        )));
    };
    if target.role == "learner" {
        return Err(Status::new(
            Code::FailedPrecondition,
            format!(
                "manager {:x} is still catching up with the log and cannot lead yet; it becomes \
                 a voter by itself once caught up: transfer again when `flotilla manager ls` \
                 shows it as a follower",
                request.raft_id
            ),
        ));
    }
    node.transfer_leadership(request.raft_id, ADMIN_CALL_TIMEOUT)
        .map_err(|e| e.to_status())?;
    Ok(pb::TransferLeadershipResponse {
        leader: request.raft_id,
    })
}

/// Removing a voter would leave too few reachable voters for a quorum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuorumShortfall {
    /// Reachable voters that would remain.
    pub reachable: usize,
    /// Voters that would remain.
    pub voters: usize,
    /// The quorum of the remaining voters.
    pub quorum: usize,
}

/// Leader only (reachability is the leader's view): checks that the voters outside
/// `leaving` keep a quorum of reachable members, so that removing every member of
/// `leaving` cannot stall the group. Removing the last voters never passes (none would
/// remain).
///
/// # Errors
/// [`QuorumShortfall`] when removing `leaving` would leave fewer reachable voters than a
/// quorum of the rest.
pub fn removal_keeps_quorum(
    status: &NodeStatus,
    leaving: &[NodeId],
) -> Result<(), QuorumShortfall> {
    let remaining: Vec<_> = status
        .members
        .iter()
        .filter(|m| m.role != "learner" && !leaving.contains(&m.id))
        .collect();
    let shortfall = QuorumShortfall {
        reachable: remaining
            .iter()
            .filter(|m| m.reachable || m.id == status.id)
            .count(),
        voters: remaining.len(),
        quorum: remaining.len() / 2 + 1,
    };
    if shortfall.reachable < shortfall.quorum {
        return Err(shortfall);
    }
    Ok(())
}

fn status(node: &NodeHandle) -> Result<pb::StatusResponse, Status> {
    let status = node.status(ADMIN_CALL_TIMEOUT).map_err(|e| e.to_status())?;
    Ok(pb::StatusResponse {
        id: status.id,
        leader: status.leader.unwrap_or(0),
        term: status.term,
        commit: status.commit,
        applied: status.applied,
        members: status
            .members
            .into_iter()
            .map(|m| pb::MemberStatus {
                raft_id: m.id,
                addr: m.addr.unwrap_or_default(),
                role: m.role.to_string(),
                reachable: m.reachable,
                last_contact_ms: m.last_contact_ms,
                match_index: m.match_index,
                problem: m.problem.unwrap_or_default(),
            })
            .collect(),
    })
}
