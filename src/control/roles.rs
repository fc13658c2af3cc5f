//! The role reconciler: acts on `node demote` (swarmkit's role manager). Runs on the
//! leader, from the control duties thread (`flotilla-control`), every
//! [`DUTY_INTERVAL`](super::duties::DUTY_INTERVAL).
//!
//! A Node whose desired role is worker while its role is manager is demoted in steps, one
//! membership change per pass:
//!
//! 1. If it is this leader, leadership goes to the most caught-up reachable manager that is
//!    staying; the new leader's reconciler finishes the job.
//! 2. If removing it would leave the remaining voters without a quorum of reachable members
//!    (the `raft.RemoveMember` check), it stays pending: logged once per reason, retried
//!    every pass.
//! 3. While it is reachable, it waits until it holds the Node update that demoted it
//!    (match index ≥ the Node's version), so that once removed it knows it was demoted
//!    rather than removed.
//! 4. It is removed from the Raft group, then its Node records role worker (no manager
//!    status, state down: it stops, and workers need the agent).
//!
//! A promotion (desired manager, role worker) needs nothing here: the node learns it from
//! its heartbeats ([`certificate_role`]), renews its certificate as a manager's, and joins
//! the Raft group itself (`raft.Join`); the manager it then runs records its role.
//!
//! Must never remove a member the quorum check refuses, remove more than one member per
//! pass, or change a Node object without the version it read.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use super::ControlApi;
use crate::proto::objects::{Node, NodeRole, NodeState, Transaction};
use crate::raft::core::MembershipChange;
use crate::raft::node::service::removal_keeps_quorum;
use crate::raft::node::{NodeError, NodeStatus};
use crate::replication::{PROPOSE_TIMEOUT, propose_transaction};
use crate::store::{Store, update_expecting};

/// How long the leader waits for the Raft status or a leadership transfer in one pass.
pub const ROLE_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The demotions waiting for a safe moment, with the reason last logged for each (so a
/// pending demotion is logged when its reason changes, not every pass).
#[derive(Debug, Default)]
pub struct Demotions {
    waiting: BTreeMap<String, String>,
    /// Nodes seen holding their demotion on an earlier pass: by the next one the leader's
    /// heartbeats told them it is committed, so they apply it before they are removed.
    caught_up: BTreeSet<String>,
}

impl Demotions {
    fn wait(&mut self, node_id: &str, reason: String) {
        if self.waiting.get(node_id) != Some(&reason) {
            log::warn!("demotion of node {node_id} is pending: {reason}");
            self.waiting.insert(node_id.to_string(), reason);
        }
    }

    fn done(&mut self, node_id: &str) {
        self.waiting.remove(node_id);
        self.caught_up.remove(node_id);
    }
}

/// What one pass did for one demotion.
enum Step {
    /// A change was made (membership, leadership or the Node object): end the pass.
    Changed,
    /// Nothing can be done now, for this reason (logged once per reason).
    Wait(String),
    /// The next steps are under way (the member is catching up): nothing to report.
    Soon(String),
}

/// One pass of the reconciler (leader only; a follower returns at once).
pub fn reconcile(api: &ControlApi, demotions: &mut Demotions) {
    if !api.is_leader() {
        demotions.waiting.clear();
        demotions.caught_up.clear();
        return;
    }
    let pending: Vec<Arc<Node>> = api
        .store
        .list::<Node>()
        .into_iter()
        .filter(|node| is_demotion(node))
        .collect();
    let is_pending = |id: &String| pending.iter().any(|n| &n.id == id);
    demotions.waiting.retain(|id, _| is_pending(id));
    demotions.caught_up.retain(is_pending);
    if pending.is_empty() {
        return;
    }
    let status = match api.node.status(ROLE_CALL_TIMEOUT) {
        Ok(status) => status,
        Err(error) => {
            log::debug!("role reconciler: no raft status: {error}");
            return;
        }
    };
    for node in pending {
        match demote_step(api, &status, &node, demotions) {
            Step::Changed => {
                demotions.done(&node.id);
                // The membership and leadership changed: the next pass reads them again.
                return;
            }
            Step::Wait(reason) => demotions.wait(&node.id, reason),
            Step::Soon(reason) => log::debug!("demotion of node {}: {reason}", node.id),
        }
    }
}

/// The Raft ids of every manager whose demotion is pending.
pub fn demoting_raft_ids(store: &Store) -> Vec<u64> {
    store
        .list::<Node>()
        .iter()
        .filter(|n| is_demotion(n))
        .filter_map(|n| n.manager_status.as_ref().map(|m| m.raft_id))
        .collect()
}

/// A manager whose desired role is worker.
fn is_demotion(node: &Node) -> bool {
    node.role == NodeRole::Manager as i32
        && node
            .spec
            .as_ref()
            .is_some_and(|s| s.desired_role == NodeRole::Worker as i32)
}

fn demote_step(
    api: &ControlApi,
    status: &NodeStatus,
    node: &Node,
    demotions: &mut Demotions,
) -> Step {
    let Some(raft_id) = node.manager_status.as_ref().map(|m| m.raft_id) else {
        return record_worker(api, node);
    };
    let Some(member) = status.members.iter().find(|m| m.id == raft_id) else {
        // It already left the group (a pass that removed it and then failed to record it,
        // or `manager rm`): only the Node object is left to update.
        return record_worker(api, node);
    };
    if raft_id == status.id {
        return hand_leadership_over(api, status);
    }
    if member.role != "learner"
        && let Err(shortfall) = removal_keeps_quorum(status, &[raft_id])
    {
        return Step::Wait(format!(
            "would lose quorum: {} of the {} remaining managers are reachable and a quorum \
             needs {}; bring managers back (`flotilla manager ls`)",
            shortfall.reachable, shortfall.voters, shortfall.quorum
        ));
    }
    let version = node.meta.as_ref().map_or(0, |m| m.version);
    if member.reachable && member.match_index < version {
        return Step::Soon(format!(
            "waiting for it to receive its demotion (it holds index {}, the demotion is at \
             {version})",
            member.match_index
        ));
    }
    if member.reachable && demotions.caught_up.insert(node.id.clone()) {
        return Step::Soon("waiting one more pass for it to apply its demotion".into());
    }
    match api
        .node
        .change_membership(MembershipChange::Remove(raft_id), PROPOSE_TIMEOUT)
    {
        Ok(()) => {
            log::info!(
                "demotion of node {}: removed raft member {raft_id:x} from the managers",
                node.id
            );
            record_worker(api, node)
        }
        Err(error) => Step::Wait(format!("cannot remove it from the Raft group yet: {error}")),
    }
}

/// This leader is being demoted: hands leadership to the staying manager with the
/// highest match index among the reachable ones.
fn hand_leadership_over(api: &ControlApi, status: &NodeStatus) -> Step {
    let leaving = demoting_raft_ids(&api.store);
    let target = status
        .members
        .iter()
        .filter(|m| m.id != status.id && m.role == "follower" && m.reachable)
        .filter(|m| !leaving.contains(&m.id))
        .max_by_key(|m| m.match_index);
    let Some(target) = target else {
        return Step::Wait(
            "this leader is being demoted and no other reachable manager can take over".into(),
        );
    };
    log::info!(
        "demoting this leader: handing leadership to {:x} first",
        target.id
    );
    match api.node.transfer_leadership(target.id, ROLE_CALL_TIMEOUT) {
        Ok(()) => Step::Changed,
        Err(NodeError::NotLeader { .. }) => Step::Changed,
        Err(error) => Step::Wait(format!(
            "handing leadership to {:x} failed: {error}",
            target.id
        )),
    }
}

/// The role `node`'s certificate should have (swarmkit issues certificates by the node's
/// role in the store): manager as soon as it is promoted (desired role manager: it needs
/// the manager certificate to join the Raft group), worker once a demotion is complete
/// (role worker: it left the group). Read by the CA at renewal and sent to agents with each
/// heartbeat, so that a node renews at once when its role changes.
///
/// # Errors
/// While a demotion is under way the node is still a Raft member and keeps its manager
/// certificate; it may not renew it (the reason says so).
pub fn certificate_role(node: &Node) -> Result<crate::ca::Role, String> {
    let desired = node
        .spec
        .as_ref()
        .map_or(NodeRole::Worker as i32, |s| s.desired_role);
    if desired == NodeRole::Manager as i32 {
        return Ok(crate::ca::Role::Manager);
    }
    if node.role == NodeRole::Worker as i32 {
        return Ok(crate::ca::Role::Worker);
    }
    Err(format!(
        "node {} is being demoted and is still a manager until it leaves the Raft group; it \
         renews its certificate, as a worker's, once that is done",
        node.id
    ))
}

/// True if `node_id`'s Node object in `store` wants the worker role.
pub fn wants_worker(store: &Store, node_id: &str) -> bool {
    store.get::<Node>(node_id).is_some_and(|node| {
        node.spec
            .as_ref()
            .is_some_and(|s| s.desired_role == NodeRole::Worker as i32)
    })
}

/// The `raft.Join` rule: a node demoted to worker (desired role worker in `store`) may not
/// come back as a new Raft member until it is promoted, even though its certificate still
/// names the manager role.
///
/// # Errors
/// The reason, with the command that lifts it.
pub fn join_allowed(store: &Store, node_id: &str) -> Result<(), String> {
    if wants_worker(store, node_id) {
        return Err(format!(
            "node {node_id} was demoted to worker; promote it first (`flotilla node promote \
             {node_id}`), then rejoin with the manager token"
        ));
    }
    Ok(())
}

/// Records role worker on the Node (read again: the version must be current).
fn record_worker(api: &ControlApi, node: &Node) -> Step {
    let Some(current) = api.store.get::<Node>(&node.id) else {
        return Step::Changed;
    };
    let version = current.meta.as_ref().map_or(0, |m| m.version);
    let mut updated = current.as_ref().clone();
    updated.role = NodeRole::Worker as i32;
    updated.manager_status = None;
    let status = updated.status.get_or_insert_with(Default::default);
    status.state = NodeState::Down as i32;
    status.message = "demoted to worker; workers run with the agent".into();
    let txn = Transaction {
        changes: vec![update_expecting(updated, version)],
        timestamp_ms: super::handlers::now_ms(),
        request_id: None,
    };
    match propose_transaction(&api.node, &txn, PROPOSE_TIMEOUT) {
        Ok(_) => {
            log::info!("node {} is now a worker", node.id);
            Step::Changed
        }
        Err(status) => Step::Wait(format!("cannot record the worker role yet: {status}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::objects::{ManagerStatus, NodeSpec};
    use crate::raft::node::MemberStatus;

    fn member(id: u64, role: &'static str, reachable: bool) -> MemberStatus {
        MemberStatus {
            id,
            addr: None,
            role,
            reachable,
            last_contact_ms: 0,
            match_index: 0,
            problem: None,
        }
    }

    fn status(members: Vec<MemberStatus>) -> NodeStatus {
        NodeStatus {
            id: 1,
            leader: Some(1),
            is_leader: true,
            members,
            ..Default::default()
        }
    }

    #[test]
    fn removals_keep_a_reachable_quorum_of_the_remaining_voters() {
        let three = status(vec![
            member(1, "leader", true),
            member(2, "follower", true),
            member(3, "follower", false),
        ]);
        // Removing the unreachable one leaves 2 of 2; removing a reachable one leaves 1 of 2.
        assert!(removal_keeps_quorum(&three, &[3]).is_ok());
        let shortfall = removal_keeps_quorum(&three, &[2]).unwrap_err();
        assert_eq!(
            (shortfall.reachable, shortfall.voters, shortfall.quorum),
            (1, 2, 2)
        );
        // Two leaving at once: the leader alone is a quorum of one.
        assert!(removal_keeps_quorum(&three, &[2, 3]).is_ok());
        // The last voter never goes; learners do not count.
        let alone = status(vec![member(1, "leader", true), member(4, "learner", true)]);
        let shortfall = removal_keeps_quorum(&alone, &[1]).unwrap_err();
        assert_eq!(shortfall.voters, 0);
        assert!(removal_keeps_quorum(&alone, &[4]).is_ok());
    }

    fn node(id: &str, role: NodeRole, desired: NodeRole, raft_id: u64) -> Node {
        Node {
            id: id.into(),
            spec: Some(NodeSpec {
                desired_role: desired as i32,
                ..Default::default()
            }),
            role: role as i32,
            manager_status: Some(ManagerStatus {
                raft_id,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn pending_demotions_and_the_join_rule_follow_the_desired_role() {
        let store = Store::new(crate::store::StoreConfig::default());
        let txn = Transaction {
            changes: vec![
                crate::store::create(node("a", NodeRole::Manager, NodeRole::Worker, 10)),
                crate::store::create(node("b", NodeRole::Manager, NodeRole::Manager, 11)),
                crate::store::create(node("c", NodeRole::Worker, NodeRole::Worker, 12)),
            ],
            timestamp_ms: 1,
            request_id: None,
        };
        store.apply(1, &txn).unwrap();
        assert_eq!(demoting_raft_ids(&store), vec![10]);
        let refused = join_allowed(&store, "a").unwrap_err();
        assert!(refused.contains("flotilla node promote a"), "{refused}");
        assert!(join_allowed(&store, "c").is_err());
        assert!(join_allowed(&store, "b").is_ok());
        assert!(join_allowed(&store, "new-node").is_ok());
    }
}
