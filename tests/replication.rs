//! The replication layer over a real one-member Raft node and the manager state machine:
//! a non-blocking proposal runs its callback with the transaction's outcome, the same one
//! the blocking proposal returns.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::free_addr;
use flotilla::manager::state::ManagerState;
use flotilla::proto::objects::{Node, NodeSpec, Transaction};
use flotilla::raft::node::{Bootstrap, NodeConfig};
use flotilla::replication::{PROPOSE_TIMEOUT, propose_transaction, propose_transaction_with};
use flotilla::store::{StoreConfig, TXN_CHANGES_MAX, create};
use flotilla::wire::{Code, Status};

fn create_node(id: &str) -> Transaction {
    Transaction {
        changes: vec![create(Node {
            id: id.into(),
            spec: Some(NodeSpec {
                hostname: format!("host-{id}"),
                ..Default::default()
            }),
            ..Default::default()
        })],
        timestamp_ms: 1,
        request_id: None,
    }
}

#[test]
fn a_proposal_with_a_callback_gets_the_outcome_the_blocking_one_returns() {
    let config = NodeConfig::new(1, free_addr(), Bootstrap::NewCluster);
    let machine = ManagerState::new(StoreConfig::default(), false);
    let common::SoloLeader {
        node,
        transport,
        dir: _dir,
    } = common::start_solo_leader(config, Box::new(machine.clone()));

    let propose = |txn: &Transaction| -> Result<u64, Status> {
        let (sender, outcome) = crossbeam_channel::bounded(1);
        propose_transaction_with(
            node.handle(),
            txn,
            Box::new(move |result| sender.send(result).unwrap()),
        );
        outcome.recv_timeout(PROPOSE_TIMEOUT).unwrap()
    };
    let version = propose(&create_node("n1")).unwrap();
    assert_eq!(
        machine
            .store
            .get::<Node>("n1")
            .unwrap()
            .meta
            .as_ref()
            .unwrap()
            .version,
        version
    );
    // The same create again: refused by the store, through the callback.
    let refused = propose(&create_node("n1")).unwrap_err();
    assert_eq!(refused.code, Code::AlreadyExists, "{refused}");
    let blocking = propose_transaction(node.handle(), &create_node("n1"), PROPOSE_TIMEOUT);
    assert_eq!(blocking.unwrap_err().code, Code::AlreadyExists);
    // Over the limits: refused at once, before the log.
    let mut huge = create_node("n2");
    huge.changes = vec![huge.changes[0].clone(); TXN_CHANGES_MAX + 1];
    let refused = propose(&huge).unwrap_err();
    assert_eq!(refused.code, Code::ResourceExhausted, "{refused}");
    assert!(machine.store.get::<Node>("n2").is_none());
    node.shutdown();
    transport.shutdown();
}
