//! Who may still call, beyond what a certificate says: revocation checked against the
//! replicated store on every call (the transport's [`Authorizer`](crate::net::Authorizer),
//! and again by the leader for a forwarded caller).
//!
//! Two rules, both from the store as applied on this manager:
//! - **revoked**: an id in the Cluster object's `revoked_certificates` (a node removed with
//!   `node rm` or `manager rm`, an admin certificate revoked with `admin-cert revoke`) may
//!   call nothing, `raft.Step` included (so it cannot inject Raft messages under another
//!   member's id). The refusal carries the reason [`CERTIFICATE_REVOKED`]: a removed
//!   manager's Raft peer thread takes it as "removed from the cluster" and the manager stops,
//!   as it does on the Raft service's own `removed: true` answer.
//! - **demoted**: a caller whose certificate says manager while its Node object's desired
//!   role is worker (demoted, and not promoted again) may call only the methods whose
//!   declared policy says `demoted=yes` (in `proto/`), not the other manager methods
//!   (`control.*`, `kv.*`). Those are Raft (a demotion is pending until the leader removed it
//!   from the group, and a rejoin after a promotion goes through `raft.Join`, which has its
//!   own rule), `control.GetNode`, to read its own Node object (how a manager demoted while
//!   it was down learns of it; the handler refuses other nodes), and what a worker does: run
//!   tasks (`dispatcher.*`) and renew its certificate, which the CA then issues for the
//!   worker role (see `control::roles::certificate_role`).
//!
//! A manager that has just joined has no Node object yet, so neither rule touches it: it can
//! report itself (`control.ReportManager`).
//!
//! The apply thread keeps the sets in step: from each transaction's events
//! ([`AccessList::apply_events`]) and from the whole store after a snapshot restore
//! ([`AccessList::refresh`]); callers read an `Arc` snapshot under a
//! lock held for a pointer copy, so a check never waits for the store. Must never read the
//! store on the calling thread, nor allow what the certificate's own role does not.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::ca::{CERTIFICATE_REVOKED, PeerIdentity, Role};
use crate::net::Method;
use crate::proto::objects::{Cluster, Node, NodeRole};
use crate::store::{Action, Event, Object, Store};
use crate::wire::Status;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct AccessSets {
    /// Revoked id → why.
    revoked: HashMap<String, String>,
    /// Nodes whose desired role is worker.
    demoted: HashSet<String>,
}

/// The revocation state of one manager (see the module documentation).
#[derive(Debug, Default)]
pub struct AccessList {
    sets: RwLock<Arc<AccessSets>>,
}

impl AccessList {
    /// An empty list: nothing revoked.
    pub fn new() -> Arc<AccessList> {
        Arc::new(AccessList::default())
    }

    /// Rebuilds the sets from `store` (the apply thread, after a transaction that touched
    /// a Node or the Cluster object, and after a snapshot restore).
    pub fn refresh(&self, store: &Store) {
        let sets = store.view(|view| {
            let revoked = view
                .list::<Cluster>()
                .next()
                .map(|c| revoked_of(c))
                .unwrap_or_default();
            let demoted = view
                .list::<Node>()
                .filter(|n| wants_worker(n))
                .map(|n| n.id.clone())
                .collect();
            AccessSets { revoked, demoted }
        });
        *self.sets.write() = Arc::new(sets);
    }

    /// Updates the sets from one applied transaction's events (the apply thread). Only an
    /// event that changes a set costs a copy of the sets; a Node update that leaves its
    /// desired role alone (the common case) costs a hash lookup.
    pub fn apply_events(&self, events: &[Arc<Event>]) {
        let current = self.sets.read().clone();
        let mut next: Option<AccessSets> = None;
        for event in events {
            let sets = next.as_ref().unwrap_or(&current);
            match &event.object {
                Object::Cluster(cluster) => {
                    let revoked = if event.action == Action::Delete {
                        HashMap::new()
                    } else {
                        revoked_of(cluster)
                    };
                    if revoked != sets.revoked {
                        next.get_or_insert_with(|| current.as_ref().clone()).revoked = revoked;
                    }
                }
                Object::Node(node) => {
                    let demoted = event.action != Action::Delete && wants_worker(node);
                    if demoted != sets.demoted.contains(&node.id) {
                        let sets = next.get_or_insert_with(|| current.as_ref().clone());
                        if demoted {
                            sets.demoted.insert(node.id.clone());
                        } else {
                            sets.demoted.remove(&node.id);
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(next) = next {
            *self.sets.write() = Arc::new(next);
        }
    }

    /// Whether `id` was revoked.
    pub fn is_revoked(&self, id: &str) -> bool {
        self.sets.read().revoked.contains_key(id)
    }

    /// Whether `id` is a node whose desired role is worker.
    pub fn is_demoted(&self, id: &str) -> bool {
        self.sets.read().demoted.contains(id)
    }

    /// The transport's check for a caller with a verified certificate.
    ///
    /// # Errors
    /// `PermissionDenied` saying why, for a revoked or demoted caller.
    pub fn check(&self, method: &Method, caller: &PeerIdentity) -> Result<(), Status> {
        self.check_caller(method, &caller.node_id, caller.role)
    }

    /// The check for a caller named `node_id` with certificate role `role` (a forwarded
    /// caller is checked with this too).
    ///
    /// # Errors
    /// As [`Self::check`].
    pub fn check_caller(&self, method: &Method, node_id: &str, role: Role) -> Result<(), Status> {
        let sets = self.sets.read().clone();
        let method_name = method.name;
        if let Some(reason) = sets.revoked.get(node_id) {
            return Err(Status::permission_denied(format!(
                "the certificate of {node_id} was revoked cluster-wide ({reason}); {method_name} \
                 refused. A removed node joins again from an empty state directory with a \
                 join token; an admin gets a new certificate with `flotilla admin-cert issue`"
            ))
            .with_reason(CERTIFICATE_REVOKED));
        }
        if role == Role::Manager && sets.demoted.contains(node_id) && !method.policy.demoted {
            return Err(Status::permission_denied(format!(
                "node {node_id} was demoted to worker: its manager certificate no longer grants \
                 manager rights ({method_name} refused); promote it first with `flotilla node \
                 promote {node_id}` on a manager to make it a manager again"
            )));
        }
        Ok(())
    }
}

fn revoked_of(cluster: &Cluster) -> HashMap<String, String> {
    cluster
        .revoked_certificates
        .iter()
        .map(|r| (r.id.clone(), r.reason.clone()))
        .collect()
}

fn wants_worker(node: &Node) -> bool {
    node.spec
        .as_ref()
        .is_some_and(|s| s.desired_role == NodeRole::Worker as i32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::objects::{NodeSpec, RevokedCertificate, Transaction};
    use crate::store::{StoreConfig, create};

    /// The declared method `name`, with its policy.
    fn declared(name: &str) -> Method {
        let index = crate::proto::method_index(name).expect("a declared method");
        crate::proto::METHODS[index]
    }

    fn node(id: &str, desired: NodeRole) -> Node {
        Node {
            id: id.into(),
            spec: Some(NodeSpec {
                desired_role: desired as i32,
                ..Default::default()
            }),
            role: NodeRole::Manager as i32,
            ..Default::default()
        }
    }

    #[test]
    fn revoked_ids_and_demoted_managers_are_refused_newcomers_are_not() {
        let store = Store::new(StoreConfig::default());
        let cluster = Cluster {
            id: "c".into(),
            revoked_certificates: vec![RevokedCertificate {
                id: "gone".into(),
                reason: "node removed".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let txn = Transaction {
            changes: vec![
                create(cluster),
                create(node("demoted", NodeRole::Worker)),
                create(node("kept", NodeRole::Manager)),
            ],
            timestamp_ms: 1,
            request_id: None,
        };
        store.apply(1, &txn).unwrap();
        let access = AccessList::new();
        // Before the first refresh nothing is known: nobody is refused.
        assert!(
            access
                .check_caller(&declared("control.ListNodes"), "gone", Role::Manager)
                .is_ok()
        );
        access.refresh(&store);

        let refused = access
            .check_caller(&declared("control.ListNodes"), "gone", Role::Admin)
            .unwrap_err();
        assert_eq!(refused.code, crate::wire::Code::PermissionDenied);
        assert!(refused.message.contains("revoked"), "{refused}");
        assert!(
            access
                .check_caller(&declared("raft.Join"), "gone", Role::Manager)
                .is_err()
        );
        assert!(
            access
                .check_caller(&declared("ca.RenewNodeCertificate"), "gone", Role::Worker)
                .is_err()
        );
        // Not even a Raft message; the refusal tells a removed member it was removed.
        let refused = access
            .check_caller(&declared("raft.Step"), "gone", Role::Manager)
            .unwrap_err();
        assert_eq!(refused.reason, CERTIFICATE_REVOKED, "{refused}");

        let refused = access
            .check_caller(&declared("control.Forward"), "demoted", Role::Manager)
            .unwrap_err();
        assert!(refused.message.contains("promote it first"), "{refused}");
        assert!(
            access
                .check_caller(&declared("kv.Apply"), "demoted", Role::Manager)
                .is_err()
        );
        // What a worker does stays open: the CA renews it as a worker's once the demotion
        // is complete, and its agent keeps its session.
        for method in [
            "ca.RenewNodeCertificate",
            "dispatcher.Heartbeat",
            "raft.Step",
        ] {
            assert!(
                access
                    .check_caller(&declared(method), "demoted", Role::Manager)
                    .is_ok(),
                "{method}"
            );
        }
        assert!(
            access
                .check_caller(&declared("control.GetNode"), "demoted", Role::Manager)
                .is_ok()
        );

        // Following the events gives the same sets as reading the whole store.
        let incremental = AccessList::new();
        let outcome = {
            let fresh = Store::new(StoreConfig::default());
            fresh.apply(1, &txn).unwrap()
        };
        incremental.apply_events(&outcome.events);
        assert_eq!(
            *incremental.sets.read().clone(),
            *access.sets.read().clone()
        );
        let promote = Transaction {
            changes: vec![crate::store::update_expecting(
                node("demoted", NodeRole::Manager),
                1,
            )],
            timestamp_ms: 2,
            request_id: None,
        };
        let outcome = store.apply(2, &promote).unwrap();
        incremental.apply_events(&outcome.events);
        assert!(!incremental.is_demoted("demoted"));
        access.refresh(&store);
        assert_eq!(
            *incremental.sets.read().clone(),
            *access.sets.read().clone()
        );
        let remove = Transaction {
            changes: vec![crate::store::delete(crate::store::Kind::Cluster, "c", 0)],
            timestamp_ms: 3,
            request_id: None,
        };
        incremental.apply_events(&store.apply(3, &remove).unwrap().events);
        assert!(!incremental.is_revoked("gone"));

        // A manager that is still wanted, and one not yet recorded (just joined), may call.
        assert!(
            access
                .check_caller(&declared("control.Forward"), "kept", Role::Manager)
                .is_ok()
        );
        assert!(
            access
                .check_caller(
                    &declared("control.ReportManager"),
                    "newcomer",
                    Role::Manager
                )
                .is_ok()
        );
    }
}
