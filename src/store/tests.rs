//! Store tests: transactions, indexes, watches, snapshots.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use crate::proto::objects::{
    Change, Delete, Network, NetworkSpec, Node, NodeRole, NodeSpec, ObjectKind, Service,
    ServiceMode, ServiceSpec, StoreObject, Task, TaskSpec, TaskState, TaskStatus, Transaction,
    Update, change,
};
use crate::wire::Code;

use super::*;

const TS: i64 = 1_700_000_000_000;

fn service(id: &str, name: &str) -> Service {
    Service {
        id: id.into(),
        spec: Some(ServiceSpec {
            name: name.into(),
            mode: ServiceMode::Replicated as i32,
            replicas: 1,
            task: Some(TaskSpec {
                command: "/bin/sleep".into(),
                args: vec!["60".into()],
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn task(id: &str, service_id: &str, node_id: &str, slot: u64) -> Task {
    Task {
        id: id.into(),
        service_id: service_id.into(),
        node_id: node_id.into(),
        slot,
        desired_state: TaskState::Running as i32,
        status: Some(TaskStatus {
            state: TaskState::Pending as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(id: &str, hostname: &str, role: NodeRole) -> Node {
    Node {
        id: id.into(),
        spec: Some(NodeSpec {
            hostname: hostname.into(),
            ..Default::default()
        }),
        role: role as i32,
        ..Default::default()
    }
}

fn network(id: &str, name: &str) -> Network {
    Network {
        id: id.into(),
        spec: Some(NetworkSpec {
            name: name.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn txn(changes: Vec<Change>) -> Transaction {
    Transaction {
        changes,
        timestamp_ms: TS,
        request_id: None,
    }
}

fn txn_at(changes: Vec<Change>, timestamp_ms: i64) -> Transaction {
    Transaction {
        changes,
        timestamp_ms,
        request_id: None,
    }
}

fn get_service(store: &Store, id: &str) -> Option<Service> {
    store.view(|view| view.get::<Service>(id).map(|s| s.as_ref().clone()))
}

/// Every object in the store, keyed by (kind, id), as protobuf copies.
fn contents(store: &Store) -> BTreeMap<(Kind, String), StoreObject> {
    store.view(|view| {
        let mut all = BTreeMap::new();
        fn add<T: Record>(view: &ReadView<'_>, all: &mut BTreeMap<(Kind, String), StoreObject>) {
            for object in view.list::<T>() {
                all.insert(
                    (T::KIND, object.id().to_owned()),
                    object.as_ref().clone().into_store_object(),
                );
            }
        }
        add::<Node>(view, &mut all);
        add::<Service>(view, &mut all);
        add::<Task>(view, &mut all);
        add::<Network>(view, &mut all);
        add::<crate::proto::objects::Cluster>(view, &mut all);
        all
    })
}

fn snapshot_bytes(store: &Store) -> Vec<u8> {
    let mut bytes = Vec::new();
    store.snapshot().read_to_end(&mut bytes).unwrap();
    let mut written = Vec::new();
    let info = store.write_snapshot(&mut written).unwrap();
    assert_eq!(written, bytes, "both ways of taking a snapshot agree");
    assert_eq!(info, store.snapshot().info());
    bytes
}

fn change_event(event: WatchEvent) -> Arc<Event> {
    match event {
        WatchEvent::Change(event) => event,
        other => panic!("expected a change, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Transactions

#[test]
fn versions_and_times_come_from_the_log_and_the_transaction() {
    let store = Store::default();
    let outcome = store
        .apply(5, &txn(vec![create(service("s1", "web"))]))
        .unwrap();
    assert_eq!(outcome.version, 5);
    assert_eq!(outcome.events.len(), 1);
    assert_eq!(outcome.events[0].action, Action::Create);
    let stored = get_service(&store, "s1").unwrap();
    let meta = stored.meta.unwrap();
    assert_eq!(
        (meta.version, meta.created_at_ms, meta.updated_at_ms),
        (5, TS, TS)
    );

    let mut changed = stored.clone();
    changed.spec.as_mut().unwrap().replicas = 3;
    store
        .apply(9, &txn_at(vec![update(changed)], TS + 10))
        .unwrap();
    let meta = get_service(&store, "s1").unwrap().meta.unwrap();
    assert_eq!(
        (meta.version, meta.created_at_ms, meta.updated_at_ms),
        (9, TS, TS + 10)
    );
    assert_eq!((store.version(), store.applied_index()), (9, 9));
}

#[test]
fn client_supplied_meta_is_ignored() {
    let store = Store::default();
    let mut s = service("s1", "web");
    s.meta = Some(crate::proto::objects::Meta {
        version: 999,
        created_at_ms: 1,
        updated_at_ms: 2,
    });
    store.apply(3, &txn(vec![create(s)])).unwrap();
    let meta = get_service(&store, "s1").unwrap().meta.unwrap();
    assert_eq!((meta.version, meta.created_at_ms), (3, TS));
}

#[test]
fn stale_update_is_a_conflict_that_says_to_reread() {
    let store = Store::default();
    store
        .apply(1, &txn(vec![create(service("s1", "web"))]))
        .unwrap();
    let read_by_a = get_service(&store, "s1").unwrap();
    let read_by_b = read_by_a.clone();

    let mut a = read_by_a;
    a.spec.as_mut().unwrap().replicas = 2;
    store.apply(2, &txn(vec![update(a)])).unwrap();

    let mut b = read_by_b;
    b.spec.as_mut().unwrap().replicas = 7;
    let error = store.apply(3, &txn(vec![update(b)])).unwrap_err();
    assert_eq!(
        error,
        TxnError::VersionConflict {
            position: 0,
            kind: Kind::Service,
            id: "s1".into(),
            expected: 1,
            current: 2,
        }
    );
    assert_eq!(error.code(), Code::Aborted);
    assert!(error.to_string().contains("re-read"), "{error}");
    assert_eq!(get_service(&store, "s1").unwrap().spec.unwrap().replicas, 2);

    // Re-reading and retrying succeeds.
    let mut retry = get_service(&store, "s1").unwrap();
    retry.spec.as_mut().unwrap().replicas = 7;
    store.apply(4, &txn(vec![update(retry)])).unwrap();
    assert_eq!(get_service(&store, "s1").unwrap().spec.unwrap().replicas, 7);
}

#[test]
fn a_failed_transaction_changes_nothing_and_emits_nothing() {
    let store = Store::default();
    store
        .apply(
            1,
            &txn(vec![
                create(service("s1", "alpha")),
                create(service("s2", "beta")),
                create(task("t1", "s1", "n1", 1)),
                create(network("net1", "overlay")),
            ]),
        )
        .unwrap();
    let before = contents(&store);
    let watcher = store.watch(WatchOptions::default());

    let s1 = get_service(&store, "s1").unwrap();
    let mut renamed = s1.clone();
    renamed.spec.as_mut().unwrap().name = "gamma".into();
    let t1 = store.view(|v| v.get::<Task>("t1").unwrap().as_ref().clone());
    let mut moved = t1.clone();
    moved.node_id = "n2".into();
    let error = store
        .apply(
            2,
            &txn(vec![
                update(renamed),                   // frees "alpha", takes "gamma"
                create(service("s3", "alpha")),    // takes the freed name
                update(moved),                     // moves t1 to n2
                delete(Kind::Service, "s2", 0),    // removes beta
                delete(Kind::Network, "net1", 1),  // ok
                create(task("t2", "s3", "n1", 1)), // ok
                delete(Kind::Task, "missing", 0),  // fails: NotFound
            ]),
        )
        .unwrap_err();
    assert_eq!(
        error,
        TxnError::NotFound {
            position: 6,
            kind: Kind::Task,
            id: "missing".into()
        }
    );
    assert_eq!(error.code(), Code::NotFound);
    assert_eq!(contents(&store), before);
    assert_eq!(store.version(), 1);
    assert_eq!(store.applied_index(), 2, "the entry was consumed");
    // Indexes were restored too.
    store.view(|v| {
        assert_eq!(v.get_by_name::<Service>("alpha").unwrap().id, "s1");
        assert!(v.get_by_name::<Service>("gamma").is_none());
        assert_eq!(v.get_by_name::<Service>("beta").unwrap().id, "s2");
        let on_n1: Vec<_> = v.tasks_by_node("n1").map(|t| t.id.clone()).collect();
        assert_eq!(on_n1, ["t1"]);
        assert_eq!(v.tasks_by_node("n2").count(), 0);
        assert_eq!(v.tasks_by_service("s3").count(), 0);
    });
    assert!(
        watcher.try_recv().unwrap().is_none(),
        "no event for a failed txn"
    );

    // The next transaction applies normally and the watcher sees only it.
    store
        .apply(3, &txn(vec![create(service("s4", "delta"))]))
        .unwrap();
    let event = change_event(watcher.try_recv().unwrap().unwrap());
    assert_eq!((event.version, event.object.id()), (3, "s4"));
}

#[test]
fn duplicate_ids_and_names_are_refused_as_already_exists() {
    let store = Store::default();
    store
        .apply(
            1,
            &txn(vec![
                create(service("s1", "Web")),
                create(network("n1", "net")),
            ]),
        )
        .unwrap();
    let error = store
        .apply(2, &txn(vec![create(service("s1", "other"))]))
        .unwrap_err();
    assert!(matches!(error, TxnError::AlreadyExists { ref id, .. } if id == "s1"));
    assert_eq!(error.code(), Code::AlreadyExists);

    let error = store
        .apply(3, &txn(vec![create(service("s2", "wEB"))]))
        .unwrap_err();
    assert_eq!(
        error,
        TxnError::NameConflict {
            position: 0,
            kind: Kind::Service,
            name: "wEB".into(),
            holder_id: "s1".into()
        }
    );
    assert_eq!(error.code(), Code::AlreadyExists);

    // Renaming into a taken name is refused too.
    store
        .apply(4, &txn(vec![create(service("s2", "api"))]))
        .unwrap();
    let mut s2 = get_service(&store, "s2").unwrap();
    s2.spec.as_mut().unwrap().name = "web".into();
    let error = store.apply(5, &txn(vec![update(s2)])).unwrap_err();
    assert!(matches!(error, TxnError::NameConflict { .. }), "{error:?}");

    // Names are per kind: a network may share a service's name.
    store
        .apply(6, &txn(vec![create(network("n2", "web"))]))
        .unwrap();
    // Tasks and nodes have no unique name.
    store
        .apply(
            7,
            &txn(vec![
                create(node("a", "host", NodeRole::Worker)),
                create(node("b", "host", NodeRole::Worker)),
            ]),
        )
        .unwrap();
}

#[test]
fn updates_and_deletes_of_missing_objects_are_not_found() {
    let store = Store::default();
    let mut ghost = service("ghost", "ghost");
    ghost.meta = Some(crate::proto::objects::Meta {
        version: 1,
        ..Default::default()
    });
    let error = store.apply(1, &txn(vec![update(ghost)])).unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    let error = store
        .apply(2, &txn(vec![delete(Kind::Node, "ghost", 0)]))
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
}

#[test]
fn deletes_check_the_version_when_given_one() {
    let store = Store::default();
    store
        .apply(4, &txn(vec![create(service("s1", "web"))]))
        .unwrap();
    let error = store
        .apply(5, &txn(vec![delete(Kind::Service, "s1", 3)]))
        .unwrap_err();
    assert_eq!(error.code(), Code::Aborted);
    let outcome = store
        .apply(6, &txn(vec![delete(Kind::Service, "s1", 4)]))
        .unwrap();
    assert_eq!(outcome.events[0].action, Action::Delete);
    assert_eq!(outcome.events[0].object.id(), "s1");
    store
        .apply(7, &txn(vec![create(service("s1", "web"))]))
        .unwrap();
    store
        .apply(8, &txn(vec![delete(Kind::Service, "s1", 0)]))
        .unwrap();
    assert!(get_service(&store, "s1").is_none());
}

#[test]
fn malformed_changes_are_invalid_arguments() {
    let store = Store::default();
    let cases: Vec<(Change, &str)> = vec![
        (Change { op: None }, "no operation"),
        (
            Change {
                op: Some(change::Op::Create(StoreObject { object: None })),
            },
            "no kind",
        ),
        (create(service("", "web")), "id is empty"),
        (
            create(service(&"x".repeat(OBJECT_ID_BYTES_MAX + 1), "web")),
            "bytes",
        ),
        (
            update_expecting(service("s1", "web"), 0),
            "expected_version",
        ),
        (
            Change {
                op: Some(change::Op::Update(Update {
                    object: None,
                    expected_version: 1,
                })),
            },
            "no object",
        ),
        (
            // No kind has number 99.
            Change {
                op: Some(change::Op::Delete(Delete {
                    kind: 99,
                    id: "x".into(),
                    expected_version: 0,
                })),
            },
            "unknown kind",
        ),
        (
            Change {
                op: Some(change::Op::Delete(Delete {
                    kind: ObjectKind::Unspecified as i32,
                    id: "x".into(),
                    expected_version: 0,
                })),
            },
            "unknown kind",
        ),
    ];
    for (index, (change, needle)) in cases.into_iter().enumerate() {
        let error = store
            .apply(index as u64 + 1, &txn(vec![change]))
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{error}");
        assert!(
            error.to_string().contains(needle),
            "{error} should mention {needle}"
        );
    }
    let error = store.apply(100, &txn(vec![])).unwrap_err();
    assert_eq!(error, TxnError::Empty);
    assert_eq!(error.code(), Code::InvalidArgument);
    assert_eq!(contents(&store).len(), 0);
}

#[test]
fn log_indexes_must_increase() {
    let store = Store::default();
    store
        .apply(10, &txn(vec![create(service("s1", "a"))]))
        .unwrap();
    for index in [10, 3] {
        let error = store
            .apply(index, &txn(vec![create(service("s2", "b"))]))
            .unwrap_err();
        assert_eq!(error, TxnError::OutOfOrder { index, applied: 10 });
        assert_eq!(error.code(), Code::FailedPrecondition);
    }
    assert!(get_service(&store, "s2").is_none());
    // Gaps are fine: other entries (membership, blank) use indexes too.
    store
        .apply(15, &txn(vec![create(service("s2", "b"))]))
        .unwrap();
}

#[test]
fn transaction_limits_are_enforced_with_a_hint_to_split() {
    let store = Store::default();
    let many: Vec<Change> = (0..=TXN_CHANGES_MAX)
        .map(|i| create(task(&format!("t{i}"), "s", "n", i as u64)))
        .collect();
    let error = store.apply(1, &txn(many.clone())).unwrap_err();
    assert_eq!(
        error,
        TxnError::TooManyChanges {
            changes: TXN_CHANGES_MAX + 1,
            max: TXN_CHANGES_MAX
        }
    );
    assert_eq!(error.code(), Code::ResourceExhausted);
    assert!(error.to_string().contains("split the work"), "{error}");
    crate::util::user_text::assert_user_terms(&error.to_string());
    // Exactly the limit is fine.
    store
        .apply(2, &txn(many[..TXN_CHANGES_MAX].to_vec()))
        .unwrap();

    let big_env = |id: &str, name: &str| {
        let mut s = service(id, name);
        s.spec.as_mut().unwrap().task.as_mut().unwrap().env =
            vec![format!("BLOB={}", "x".repeat(300 * 1024))];
        s
    };
    let large: Vec<Change> = (0..6)
        .map(|i| create(big_env(&format!("big{i}"), &format!("big{i}"))))
        .collect();
    let error = store.apply(3, &txn(large.clone())).unwrap_err();
    assert!(
        matches!(error, TxnError::TooLarge { bytes, max } if bytes > max && max == TXN_BYTES_MAX)
    );
    assert_eq!(error.code(), Code::ResourceExhausted);
    assert_eq!(store.view(|v| v.count::<Service>()), 0);

    // Split, they all apply.
    let batches = split_into_transactions(large, TS).unwrap();
    assert!(batches.len() >= 2);
    for (i, batch) in batches.iter().enumerate() {
        store.apply(10 + i as u64, batch).unwrap();
    }
    assert_eq!(store.view(|v| v.count::<Service>()), 6);
}

#[test]
fn split_keeps_order_and_respects_both_limits() {
    let small: Vec<Change> = (0..1001)
        .map(|i| create(task(&format!("t{i:04}"), "s", "n", i)))
        .collect();
    let batches = split_into_transactions(small.clone(), TS).unwrap();
    assert_eq!(
        batches.iter().map(|b| b.changes.len()).collect::<Vec<_>>(),
        [200, 200, 200, 200, 200, 1]
    );
    let flattened: Vec<Change> = batches.iter().flat_map(|b| b.changes.clone()).collect();
    assert_eq!(flattened, small);
    for batch in &batches {
        check_limits(batch).unwrap();
        assert_eq!(batch.timestamp_ms, TS);
    }

    // Byte-bound: 100 KiB changes, 15 per transaction at most.
    let fat: Vec<Change> = (0..40)
        .map(|i| {
            let mut t = task(&format!("f{i}"), "s", "n", i);
            t.status.as_mut().unwrap().message = "m".repeat(100 * 1024);
            create(t)
        })
        .collect();
    let batches = split_into_transactions(fat, TS).unwrap();
    assert!(batches.len() >= 3);
    for batch in &batches {
        check_limits(batch).unwrap();
    }
    // A transaction is split only when the next change would not fit.
    for pair in batches.windows(2) {
        let mut grown = pair[0].clone();
        grown.changes.push(pair[1].changes[0].clone());
        assert!(check_limits(&grown).is_err());
    }

    assert!(split_into_transactions(Vec::new(), TS).unwrap().is_empty());
    let mut huge = task("h", "s", "n", 1);
    huge.status.as_mut().unwrap().message = "m".repeat(TXN_BYTES_MAX);
    let error = split_into_transactions(vec![create(task("ok", "s", "n", 1)), create(huge)], TS)
        .unwrap_err();
    assert!(matches!(
        error,
        TxnError::ChangeTooLarge { position: 1, .. }
    ));
}

#[test]
fn identical_logs_give_identical_stores() {
    let log: Vec<Transaction> = (1..=50u64)
        .map(|i| {
            let mut s = service(&format!("s{i}"), &format!("svc{i}"));
            for l in 0..5 {
                s.spec
                    .as_mut()
                    .unwrap()
                    .labels
                    .insert(format!("label{}", (i * 7 + l) % 11), format!("{l}"));
            }
            txn_at(
                vec![
                    create(s),
                    create(task(&format!("t{i}"), &format!("s{i}"), "n1", 1)),
                ],
                TS + i as i64,
            )
        })
        .collect();
    let a = Store::default();
    let b = Store::default();
    for (i, t) in log.iter().enumerate() {
        a.apply(i as u64 * 2 + 1, t).unwrap();
        b.apply(i as u64 * 2 + 1, t).unwrap();
    }
    assert_eq!(snapshot_bytes(&a), snapshot_bytes(&b));
}

// ---------------------------------------------------------------------------------------------
// Indexes

#[test]
fn views_answer_every_index() {
    let store = Store::default();
    let mut stopped = task("t4", "s2", "n2", 1);
    stopped.desired_state = TaskState::Shutdown as i32;
    stopped.status.as_mut().unwrap().state = TaskState::Complete as i32;
    store
        .apply(
            1,
            &txn(vec![
                create(node("n1", "alpha", NodeRole::Manager)),
                create(node("n2", "beta", NodeRole::Worker)),
                create(node("n3", "beta", NodeRole::Worker)),
                create(service("s1", "Web")),
                create(service("s2", "api")),
                create(task("t1", "s1", "n1", 1)),
                create(task("t2", "s1", "n2", 2)),
                create(task("t3", "s1", "", 3)),
                create(stopped),
                create(network("net1", "ingress")),
            ]),
        )
        .unwrap();
    let ids = |it: &mut dyn Iterator<Item = String>| it.collect::<Vec<_>>();
    store.view(|v| {
        assert_eq!(v.version(), 1);
        assert_eq!(v.get_by_name::<Service>("WEB").unwrap().id, "s1");
        assert_eq!(v.get_by_name::<Network>("ingress").unwrap().id, "net1");
        assert!(
            v.get_by_name::<Node>("alpha").is_none(),
            "nodes have no unique name"
        );
        assert_eq!(
            ids(&mut v.tasks_by_service("s1").map(|t| t.id.clone())),
            ["t1", "t2", "t3"]
        );
        assert_eq!(
            ids(&mut v.tasks_by_node("n2").map(|t| t.id.clone())),
            ["t2", "t4"]
        );
        assert_eq!(
            ids(&mut v.tasks_by_slot("s1", 2).map(|t| t.id.clone())),
            ["t2"]
        );
        assert_eq!(
            ids(&mut v
                .tasks_by_desired_state(TaskState::Running)
                .map(|t| t.id.clone())),
            ["t1", "t2", "t3"]
        );
        assert_eq!(
            ids(&mut v
                .tasks_by_desired_state(TaskState::Shutdown)
                .map(|t| t.id.clone())),
            ["t4"]
        );
        assert_eq!(
            ids(&mut v.tasks_by_state(TaskState::Complete).map(|t| t.id.clone())),
            ["t4"]
        );
        assert_eq!(
            ids(&mut v.nodes_by_role(NodeRole::Worker).map(|n| n.id.clone())),
            ["n2", "n3"]
        );
        assert_eq!(
            ids(&mut v.nodes_by_hostname("beta").map(|n| n.id.clone())),
            ["n2", "n3"]
        );
        assert_eq!(
            ids(&mut v.find_by_id_prefix::<Task>("t").map(|t| t.id.clone())).len(),
            4
        );
        assert_eq!(v.count::<Node>(), 3);
    });

    // Moving and deleting keeps every index in step.
    let mut t1 = store.view(|v| v.get::<Task>("t1").unwrap().as_ref().clone());
    t1.node_id = "n3".into();
    t1.desired_state = TaskState::Shutdown as i32;
    let mut n2 = store.view(|v| v.get::<Node>("n2").unwrap().as_ref().clone());
    n2.role = NodeRole::Manager as i32;
    store
        .apply(
            2,
            &txn(vec![update(t1), update(n2), delete(Kind::Task, "t2", 0)]),
        )
        .unwrap();
    store.view(|v| {
        assert_eq!(
            ids(&mut v.tasks_by_node("n1").map(|t| t.id.clone())).len(),
            0
        );
        assert_eq!(
            ids(&mut v.tasks_by_node("n3").map(|t| t.id.clone())),
            ["t1"]
        );
        assert_eq!(
            ids(&mut v.tasks_by_node("n2").map(|t| t.id.clone())),
            ["t4"]
        );
        assert_eq!(
            ids(&mut v
                .tasks_by_desired_state(TaskState::Shutdown)
                .map(|t| t.id.clone())),
            ["t1", "t4"]
        );
        assert_eq!(
            ids(&mut v.tasks_by_service("s1").map(|t| t.id.clone())),
            ["t1", "t3"]
        );
        assert_eq!(
            ids(&mut v.nodes_by_role(NodeRole::Manager).map(|n| n.id.clone())),
            ["n1", "n2"]
        );
    });
}

// ---------------------------------------------------------------------------------------------
// Watches

fn drain(watcher: &Watcher) -> Vec<WatchEvent> {
    let mut events = Vec::new();
    while let Some(event) = watcher.try_recv().unwrap() {
        events.push(event);
    }
    events
}

fn change_ids(events: &[WatchEvent]) -> Vec<(u64, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            WatchEvent::Change(c) => Some((c.version, c.object.id().to_owned())),
            _ => None,
        })
        .collect()
}

#[test]
fn filters_select_by_kind_id_node_and_service() {
    let store = Store::default();
    let by_kind = store.watch(WatchOptions::filtered(vec![WatchFilter::kind(
        Kind::Service,
    )]));
    let by_id = store.watch(WatchOptions::filtered(vec![WatchFilter {
        id: Some("t1".into()),
        ..Default::default()
    }]));
    let by_node = store.watch(WatchOptions::filtered(vec![WatchFilter {
        node_id: Some("n1".into()),
        ..Default::default()
    }]));
    let by_service = store.watch(WatchOptions::filtered(vec![WatchFilter {
        service_id: Some("s1".into()),
        ..Default::default()
    }]));
    let tasks_on_n1 = store.watch(WatchOptions::filtered(vec![WatchFilter {
        kind: Some(Kind::Task),
        node_id: Some("n1".into()),
        ..Default::default()
    }]));
    let any_of = store.watch(WatchOptions::filtered(vec![
        WatchFilter::kind(Kind::Network),
        WatchFilter {
            id: Some("s2".into()),
            ..Default::default()
        },
    ]));

    store
        .apply(
            1,
            &txn(vec![
                create(node("n1", "h1", NodeRole::Worker)),
                create(service("s1", "a")),
                create(service("s2", "b")),
                create(task("t1", "s1", "n1", 1)),
                create(task("t2", "s2", "n2", 1)),
                create(network("w", "net")),
            ]),
        )
        .unwrap();
    // Moving t1 off n1: the node watcher must still see it leave.
    let mut t1 = store.view(|v| v.get::<Task>("t1").unwrap().as_ref().clone());
    t1.node_id = "n2".into();
    store.apply(2, &txn(vec![update(t1)])).unwrap();

    let got = |w: &Watcher| change_ids(&drain(w));
    let v = |version: u64, id: &str| (version, id.to_owned());
    assert_eq!(got(&by_kind), [v(1, "s1"), v(1, "s2")]);
    assert_eq!(got(&by_id), [v(1, "t1"), v(2, "t1")]);
    assert_eq!(got(&by_node), [v(1, "n1"), v(1, "t1"), v(2, "t1")]);
    assert_eq!(got(&by_service), [v(1, "s1"), v(1, "t1"), v(2, "t1")]);
    assert_eq!(got(&tasks_on_n1), [v(1, "t1"), v(2, "t1")]);
    assert_eq!(got(&any_of), [v(1, "s2"), v(1, "w")]);
}

#[test]
fn commit_markers_close_each_transaction() {
    let store = Store::default();
    let watcher = store.watch(WatchOptions {
        filters: vec![WatchFilter::kind(Kind::Task)],
        include_commits: true,
        queue_events_max: None,
    });
    store
        .apply(
            1,
            &txn(vec![
                create(service("s1", "a")),
                create(task("t1", "s1", "", 1)),
                create(task("t2", "s1", "", 2)),
            ]),
        )
        .unwrap();
    store
        .apply(2, &txn(vec![create(service("s2", "b"))]))
        .unwrap();
    store
        .apply(3, &txn(vec![create(task("t3", "s2", "", 1))]))
        .unwrap();
    let events = drain(&watcher);
    let shape: Vec<String> = events
        .iter()
        .map(|e| match e {
            WatchEvent::Change(c) => format!("{}:{}", c.version, c.object.id()),
            WatchEvent::Commit { version } => format!("commit {version}"),
            WatchEvent::Dropped(r) => format!("dropped {r}"),
        })
        .collect();
    assert_eq!(shape, ["1:t1", "1:t2", "commit 1", "3:t3", "commit 3"]);

    // Replay from history keeps the same shape.
    let resumed = store
        .watch_since(
            0,
            WatchOptions {
                filters: vec![WatchFilter::kind(Kind::Task)],
                include_commits: true,
                queue_events_max: None,
            },
        )
        .unwrap();
    let replay: Vec<String> = drain(&resumed)
        .iter()
        .map(|e| match e {
            WatchEvent::Change(c) => format!("{}:{}", c.version, c.object.id()),
            WatchEvent::Commit { version } => format!("commit {version}"),
            WatchEvent::Dropped(r) => format!("dropped {r}"),
        })
        .collect();
    assert_eq!(replay, shape);
}

#[test]
fn update_events_carry_the_old_object() {
    let store = Store::default();
    let watcher = store.watch(WatchOptions::default());
    store
        .apply(1, &txn(vec![create(service("s1", "a"))]))
        .unwrap();
    let mut s1 = get_service(&store, "s1").unwrap();
    s1.spec.as_mut().unwrap().replicas = 4;
    store.apply(2, &txn(vec![update(s1)])).unwrap();
    let events = drain(&watcher);
    let update = change_event(events[1].clone());
    assert_eq!(update.action, Action::Update);
    let old = Service::from_object(update.old.as_ref().unwrap()).unwrap();
    let new = Service::from_object(&update.object).unwrap();
    assert_eq!(old.spec.as_ref().unwrap().replicas, 1);
    assert_eq!(new.spec.as_ref().unwrap().replicas, 4);
    assert_eq!((old.version(), new.version()), (1, 2));
}

/// Writers apply numbered transactions while readers subscribe at arbitrary moments; every
/// watcher must see exactly the transactions after its view, in order, once each.
#[test]
fn view_and_watch_sees_every_later_change_exactly_once_under_concurrent_applies() {
    const TXNS: u64 = 3_000;
    let store = Store::new(StoreConfig {
        watch_queue_events_max: 2 * TXNS as usize,
        watch_history_events_max: 100,
        ..StoreConfig::default()
    });
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let store = store.clone();
        let done = Arc::clone(&done);
        thread::spawn(move || {
            for i in 1..=TXNS {
                // Each transaction creates one task and bumps a counter service, so a view
                // at version v holds exactly tasks 1..=v.
                let mut changes = vec![create(task(&format!("t{i:05}"), "s", "n", i))];
                if i == 1 {
                    changes.push(create(service("s", "counter")));
                } else {
                    let mut s = get_service(&store, "s").unwrap();
                    s.spec.as_mut().unwrap().replicas = i;
                    changes.push(update(s));
                }
                store.apply(i, &txn(changes)).unwrap();
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let store = store.clone();
            let done = Arc::clone(&done);
            thread::spawn(move || {
                let mut subscriptions = Vec::new();
                while !done.load(Ordering::SeqCst) && subscriptions.len() < 50 {
                    let (tasks_in_view, watcher) =
                        store.view_and_watch(WatchOptions::default(), |view| {
                            let tasks: Vec<String> =
                                view.list::<Task>().map(|t| t.id.clone()).collect();
                            (view.version(), tasks)
                        });
                    subscriptions.push((tasks_in_view, watcher));
                    thread::yield_now();
                }
                subscriptions
            })
        })
        .collect();
    writer.join().unwrap();
    let mut checked = 0;
    for reader in readers {
        for ((version, tasks), watcher) in reader.join().unwrap() {
            let expected: Vec<String> = (1..=version).map(|i| format!("t{i:05}")).collect();
            assert_eq!(tasks, expected, "the view is consistent with its version");
            let mut next = version + 1;
            while next <= TXNS {
                let task_event =
                    change_event(watcher.recv_timeout(Duration::from_secs(30)).unwrap());
                let service_event =
                    change_event(watcher.recv_timeout(Duration::from_secs(30)).unwrap());
                assert_eq!(task_event.version, next, "no gap, no duplicate");
                assert_eq!(task_event.object.id(), format!("t{next:05}"));
                assert_eq!(
                    (service_event.version, service_event.object.id()),
                    (next, "s")
                );
                next += 1;
            }
            assert!(
                watcher.try_recv().unwrap().is_none(),
                "nothing after the last txn"
            );
            checked += 1;
        }
    }
    assert!(checked > 0);
}

#[test]
fn a_slow_watcher_is_dropped_with_a_reason_and_never_blocks_apply() {
    let store = Store::new(StoreConfig {
        watch_queue_events_max: 4,
        watch_history_events_max: 1000,
        ..StoreConfig::default()
    });
    let slow = store.watch(WatchOptions::default());
    let fast = store.watch(WatchOptions::default());
    assert_eq!(store.watcher_count(), 2);
    for i in 1..=10u64 {
        // Never blocks, although `slow` reads nothing.
        store
            .apply(i, &txn(vec![create(task(&format!("t{i}"), "s", "n", i))]))
            .unwrap();
        assert_eq!(change_event(fast.try_recv().unwrap().unwrap()).version, i);
    }
    assert_eq!(store.watcher_count(), 1, "the slow watcher was removed");
    let mut versions = Vec::new();
    let reason = loop {
        match slow.recv() {
            Ok(event) => versions.push(change_event(event).version),
            Err(WatchError::Dropped(reason)) => break reason,
            Err(other) => panic!("expected Dropped, got {other}"),
        }
    };
    assert_eq!(versions, [1, 2, 3, 4]);
    assert_eq!(
        reason,
        DropReason::SlowConsumer {
            queue_events_max: 4,
            last_delivered_version: 4
        }
    );
    assert_eq!(reason.code(), Code::ResourceExhausted);
    assert!(reason.to_string().contains("after version 4"), "{reason}");
    crate::util::user_text::assert_user_terms(&reason.to_string());
    assert_eq!(slow.recv().unwrap_err(), WatchError::Closed);

    // Resuming where it stopped loses nothing.
    let resumed = store.watch_since(4, WatchOptions::default()).unwrap();
    let versions: Vec<u64> = drain(&resumed)
        .into_iter()
        .map(|e| change_event(e).version)
        .collect();
    assert_eq!(versions, (5..=10).collect::<Vec<_>>());
}

#[test]
fn a_transaction_is_queued_whole_or_not_at_all() {
    let store = Store::new(StoreConfig {
        watch_queue_events_max: 5,
        watch_history_events_max: 1000,
        ..StoreConfig::default()
    });
    let watcher = store.watch(WatchOptions::default());
    store
        .apply(
            1,
            &txn((0..3)
                .map(|i| create(task(&format!("a{i}"), "s", "n", i)))
                .collect()),
        )
        .unwrap();
    // 3 queued, 3 more do not fit in 5: none of them is queued.
    store
        .apply(
            2,
            &txn((0..3)
                .map(|i| create(task(&format!("b{i}"), "s", "n", i)))
                .collect()),
        )
        .unwrap();
    let mut versions = Vec::new();
    let error = loop {
        match watcher.recv() {
            Ok(event) => versions.push(change_event(event).version),
            Err(error) => break error,
        }
    };
    assert_eq!(versions, [1, 1, 1]);
    assert_eq!(
        error,
        WatchError::Dropped(DropReason::SlowConsumer {
            queue_events_max: 5,
            last_delivered_version: 1
        })
    );
}

#[test]
fn watch_since_resumes_from_history_and_refuses_compacted_versions() {
    let store = Store::new(StoreConfig {
        watch_queue_events_max: 100,
        watch_history_events_max: 10,
        ..StoreConfig::default()
    });
    for i in 1..=30u64 {
        store
            .apply(i, &txn(vec![create(task(&format!("t{i}"), "s", "n", i))]))
            .unwrap();
    }
    let resumed = store.watch_since(25, WatchOptions::default()).unwrap();
    let versions = |w: &Watcher| -> Vec<u64> {
        drain(w)
            .into_iter()
            .map(|e| change_event(e).version)
            .collect()
    };
    assert_eq!(versions(&resumed), [26, 27, 28, 29, 30]);
    // The oldest kept event is version 21, so resuming from 20 still works; 19 does not.
    let from_20 = store.watch_since(20, WatchOptions::default()).unwrap();
    assert_eq!(versions(&from_20), (21..=30).collect::<Vec<_>>());
    let error = store.watch_since(19, WatchOptions::default()).unwrap_err();
    assert_eq!(
        error,
        WatchError::Compacted {
            requested: 19,
            oldest_resumable: 20
        }
    );
    assert_eq!(error.code(), Code::OutOfRange);
    assert!(error.to_string().contains("start a new watch"), "{error}");
    crate::util::user_text::assert_user_terms(&error.to_string());

    // From the current version: nothing replayed, live events follow.
    let current = store.watch_since(30, WatchOptions::default()).unwrap();
    // From a future version (a manager that is behind): skip up to it.
    let future = store.watch_since(33, WatchOptions::default()).unwrap();
    for i in 31..=35u64 {
        store
            .apply(i, &txn(vec![create(task(&format!("t{i}"), "s", "n", i))]))
            .unwrap();
    }
    assert_eq!(versions(&resumed), [31, 32, 33, 34, 35]);
    assert_eq!(versions(&current), [31, 32, 33, 34, 35]);
    assert_eq!(versions(&future), [34, 35]);
}

#[test]
fn dropping_a_watcher_unsubscribes_it() {
    let store = Store::default();
    let a = store.watch(WatchOptions::default());
    let b = store.watch(WatchOptions::filtered(vec![WatchFilter::kind(
        Kind::Cluster,
    )]));
    assert_eq!(store.watcher_count(), 2);
    drop(a);
    drop(b);
    assert_eq!(store.watcher_count(), 0);
    // A watcher that outlives its store sees the channel close.
    let store = Store::default();
    let orphan = store.watch(WatchOptions::default());
    drop(store);
    assert_eq!(orphan.recv().unwrap_err(), WatchError::Closed);
}

// ---------------------------------------------------------------------------------------------
// Snapshots

fn populated_store() -> Store {
    let store = Store::default();
    let mut labelled = node("n1", "alpha", NodeRole::Manager);
    labelled
        .spec
        .as_mut()
        .unwrap()
        .labels
        .insert("zone".into(), "eu".into());
    store
        .apply(
            3,
            &txn(vec![
                create(labelled),
                create(node("n2", "beta", NodeRole::Worker)),
                create(service("s1", "web")),
                create(service("s2", "api")),
                create(network("net1", "ingress")),
                create(crate::proto::objects::Cluster {
                    id: "c1".into(),
                    spec: Some(spec::default_cluster_spec("default")),
                    ..Default::default()
                }),
            ]),
        )
        .unwrap();
    let tasks: Vec<Change> = (0..500)
        .map(|i| {
            create(task(
                &format!("t{i:03}"),
                if i % 2 == 0 { "s1" } else { "s2" },
                "n2",
                i,
            ))
        })
        .collect();
    for (i, batch) in split_into_transactions(tasks, TS + 5)
        .unwrap()
        .iter()
        .enumerate()
    {
        store.apply(10 + i as u64, batch).unwrap();
    }
    store
        .apply(20, &txn(vec![delete(Kind::Task, "t007", 0)]))
        .unwrap();
    // A refused entry still advances the applied index.
    store
        .apply(21, &txn(vec![delete(Kind::Task, "t007", 0)]))
        .unwrap_err();
    store
}

/// Reads `stream` a few bytes at a time, as a chunked transfer would.
fn read_in_chunks(mut stream: impl Read, chunk_bytes: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chunk = vec![0u8; chunk_bytes];
    loop {
        let n = stream.read(&mut chunk).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn snapshot_round_trips_contents_indexes_and_versions() {
    let store = populated_store();
    let stream = store.snapshot();
    let info = stream.info();
    assert_eq!(info.applied_index, 21);
    assert_eq!(info.version, 20);
    assert_eq!(info.object_count, 6 + 499);
    let bytes = read_in_chunks(stream, 7);

    let restored = Store::default();
    let outcome = restored.restore(bytes.as_slice()).unwrap();
    assert_eq!(outcome, info);
    assert_eq!(contents(&restored), contents(&store));
    assert_eq!((restored.version(), restored.applied_index()), (20, 21));
    restored.view(|v| {
        assert_eq!(v.get_by_name::<Service>("WEB").unwrap().id, "s1");
        assert_eq!(v.tasks_by_service("s1").count(), 250);
        assert_eq!(v.tasks_by_service("s2").count(), 249);
        assert_eq!(v.tasks_by_node("n2").count(), 499);
        assert_eq!(v.nodes_by_role(NodeRole::Manager).count(), 1);
    });
    // Byte-identical when taken again: snapshots are deterministic.
    assert_eq!(snapshot_bytes(&restored), bytes);
    // The restored store goes on applying from there; stale updates still conflict.
    let stale = service("s1", "web");
    let error = restored
        .apply(22, &txn(vec![update_expecting(stale, 2)]))
        .unwrap_err();
    assert_eq!(error.code(), Code::Aborted);
    let error = restored
        .apply(21, &txn(vec![create(service("x", "x"))]))
        .unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
}

#[test]
fn a_snapshot_stream_is_frozen_at_its_version() {
    let store = populated_store();
    let stream = store.snapshot();
    store
        .apply(30, &txn(vec![create(service("late", "late"))]))
        .unwrap();
    store
        .apply(31, &txn(vec![delete(Kind::Service, "s1", 0)]))
        .unwrap();
    let bytes = read_in_chunks(stream, 4096);
    let restored = Store::default();
    restored.restore(bytes.as_slice()).unwrap();
    assert!(get_service(&restored, "late").is_none());
    assert!(get_service(&restored, "s1").is_some());
    assert_eq!(restored.version(), 20);
}

#[test]
fn an_empty_store_snapshots_and_restores() {
    let bytes = snapshot_bytes(&Store::default());
    let target = populated_store();
    target.restore(bytes.as_slice()).unwrap();
    assert!(contents(&target).is_empty());
    assert_eq!((target.version(), target.applied_index()), (0, 0));
}

#[test]
fn a_corrupt_snapshot_leaves_the_store_intact() {
    let source = populated_store();
    let bytes = snapshot_bytes(&source);
    let target = Store::default();
    target
        .apply(1, &txn(vec![create(service("keep", "keep"))]))
        .unwrap();
    let before = contents(&target);
    let watcher = target.watch(WatchOptions::default());

    let mut rejected = 0;
    let mut check = |corrupt: &[u8], what: &str| {
        let error = target.restore(corrupt).unwrap_err();
        assert!(
            matches!(error.code(), Code::DataLoss | Code::FailedPrecondition),
            "{what}: {error}"
        );
        assert_eq!(contents(&target), before, "{what}");
        assert_eq!(target.version(), 1, "{what}");
        rejected += 1;
    };
    check(&[], "empty");
    // Truncated anywhere, including between records.
    let step = (bytes.len() / 97).max(1);
    for cut in (1..bytes.len()).step_by(step).chain([bytes.len() - 1]) {
        check(&bytes[..cut], &format!("cut at {cut}"));
    }
    // A flipped bit anywhere (in lengths, tags, payloads or the checksum).
    for position in (0..bytes.len()).step_by(step) {
        let mut flipped = bytes.clone();
        flipped[position] ^= 0x10;
        check(&flipped, &format!("bit flip at {position}"));
    }
    let mut trailing = bytes.clone();
    trailing.push(0);
    check(&trailing, "trailing byte");
    // A length prefix claiming far more than any record may hold.
    check(&[0xff, 0xff, 0xff, 0xff, 0x0f], "huge length");

    // A newer format is refused as such.
    let header = crate::proto::objects::SnapshotHeader {
        format_version: SNAPSHOT_FORMAT_VERSION + 1,
        ..Default::default()
    };
    let mut newer = Vec::new();
    prost::Message::encode_length_delimited(&header, &mut newer).unwrap();
    let error = target.restore(newer.as_slice()).unwrap_err();
    assert!(
        matches!(error, SnapshotError::UnsupportedFormat { found } if found == SNAPSHOT_FORMAT_VERSION + 1)
    );
    assert!(rejected > 100);

    // The watcher never noticed anything, and the good stream still restores.
    assert!(watcher.try_recv().unwrap().is_none());
    target.restore(bytes.as_slice()).unwrap();
    assert_eq!(contents(&target), contents(&source));
}

#[test]
fn a_reader_error_is_reported_and_changes_nothing() {
    struct Failing;
    impl Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("link down"))
        }
    }
    let store = populated_store();
    let before = contents(&store);
    let error = store.restore(Failing).unwrap_err();
    assert_eq!(error.code(), Code::Unavailable);
    assert_eq!(contents(&store), before);
}

#[test]
fn an_idle_store_shrinks_its_history_and_refuses_versions_before_it() {
    let store = Store::default();
    let total = WATCH_HISTORY_IDLE_EVENTS_MAX as u64 + 500;
    for i in 1..=total {
        store
            .apply(i, &txn(vec![create(task(&format!("t{i}"), "s", "n", i))]))
            .unwrap();
    }
    // The whole burst is still resumable before the store shrinks its history.
    assert!(store.watch_since(0, WatchOptions::default()).is_ok());
    let live = store.watch_since(total, WatchOptions::default()).unwrap();

    store.shrink_watch_history();

    let oldest_resumable = total - WATCH_HISTORY_IDLE_EVENTS_MAX as u64;
    assert_eq!(
        store
            .watch_since(oldest_resumable - 1, WatchOptions::default())
            .unwrap_err(),
        WatchError::Compacted {
            requested: oldest_resumable - 1,
            oldest_resumable
        }
    );
    let resumed = store
        .watch_since(oldest_resumable, WatchOptions::default())
        .unwrap();
    let replayed: Vec<u64> = drain(&resumed)
        .into_iter()
        .map(|e| change_event(e).version)
        .collect();
    assert_eq!(replayed, (oldest_resumable + 1..=total).collect::<Vec<_>>());
    // A live watcher is not affected, and new events still reach everyone.
    store
        .apply(total + 1, &txn(vec![create(task("late", "s", "n", 1))]))
        .unwrap();
    let versions = |w: &Watcher| -> Vec<u64> {
        drain(w)
            .into_iter()
            .map(|e| change_event(e).version)
            .collect()
    };
    assert_eq!(versions(&live), [total + 1]);
    assert_eq!(versions(&resumed), [total + 1]);
}

#[test]
fn restore_drops_watchers_and_resets_history() {
    let store = Store::default();
    for i in 1..=5u64 {
        store
            .apply(i, &txn(vec![create(task(&format!("t{i}"), "s", "n", i))]))
            .unwrap();
    }
    let watcher = store.watch(WatchOptions::default());
    let bytes = snapshot_bytes(&populated_store());
    store.restore(bytes.as_slice()).unwrap();
    assert_eq!(
        watcher.recv().unwrap_err(),
        WatchError::Dropped(DropReason::Restored { version: 20 })
    );
    assert_eq!(store.watcher_count(), 0);
    assert!(matches!(
        store.watch_since(3, WatchOptions::default()),
        Err(WatchError::Compacted {
            requested: 3,
            oldest_resumable: 20
        })
    ));
    let (count, fresh) = store.view_and_watch(WatchOptions::default(), |v| v.count::<Task>());
    assert_eq!(count, 499);
    store
        .apply(40, &txn(vec![create(service("new", "new"))]))
        .unwrap();
    assert_eq!(change_event(fresh.recv().unwrap()).version, 40);
}

#[test]
fn history_is_also_bounded_by_bytes() {
    let store = Store::new(StoreConfig {
        watch_history_bytes_max: 64 * 1024,
        ..StoreConfig::default()
    });
    // Each transaction carries ~10 KiB, charged twice (new and old object): about three
    // transactions fit.
    for i in 1..=10u64 {
        let mut t = task(&format!("t{i}"), "s", "n", i);
        t.status.as_mut().unwrap().message = "m".repeat(10 * 1024);
        store.apply(i, &txn(vec![create(t)])).unwrap();
    }
    let error = store.watch_since(5, WatchOptions::default()).unwrap_err();
    let WatchError::Compacted {
        oldest_resumable, ..
    } = error
    else {
        panic!("expected Compacted, got {error}");
    };
    assert!((6..10).contains(&oldest_resumable), "{oldest_resumable}");
    let resumed = store
        .watch_since(oldest_resumable, WatchOptions::default())
        .unwrap();
    let versions: Vec<u64> = drain(&resumed)
        .into_iter()
        .map(|e| change_event(e).version)
        .collect();
    assert_eq!(versions, (oldest_resumable + 1..=10).collect::<Vec<_>>());
}

/// Readers never see half of a transaction, even across tables.
#[test]
fn views_are_consistent_across_tables_under_concurrent_applies() {
    const TXNS: u64 = 2_000;
    let store = Store::default();
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let store = store.clone();
            let done = Arc::clone(&done);
            thread::spawn(move || {
                let mut views = 0u64;
                while !done.load(Ordering::SeqCst) {
                    store.view(|v| {
                        // Every transaction creates one service and one of its tasks.
                        assert_eq!(v.count::<Service>() as u64, v.version());
                        assert_eq!(v.count::<Task>() as u64, v.version());
                        if v.version() > 0 {
                            let last = format!("s{}", v.version());
                            assert_eq!(v.tasks_by_service(&last).count(), 1);
                        }
                    });
                    views += 1;
                }
                views
            })
        })
        .collect();
    for i in 1..=TXNS {
        store
            .apply(
                i,
                &txn(vec![
                    create(service(&format!("s{i}"), &format!("svc{i}"))),
                    create(task(&format!("t{i}"), &format!("s{i}"), "n", 1)),
                ]),
            )
            .unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let views: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(views > 0);
}

#[test]
fn get_and_list_hand_out_shared_objects() {
    let store = Store::default();
    store
        .apply(
            1,
            &txn(vec![create(service("s1", "a")), create(service("s2", "b"))]),
        )
        .unwrap();
    let s1 = store.get::<Service>("s1").unwrap();
    assert_eq!(s1.spec.as_ref().unwrap().name, "a");
    assert!(store.get::<Task>("s1").is_none());
    let all = store.list::<Service>();
    assert_eq!(
        all.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        ["s1", "s2"]
    );
    // Later writes do not change what was handed out.
    store
        .apply(2, &txn(vec![delete(Kind::Service, "s1", 0)]))
        .unwrap();
    assert_eq!(s1.id, "s1");
    assert_eq!(store.list::<Service>().len(), 1);
}

#[test]
fn encoded_entries_apply_and_garbage_is_refused_in_order() {
    use prost::Message;
    let store = Store::default();
    let data = txn(vec![create(service("s1", "a"))]).encode_to_vec();
    assert_eq!(store.apply_encoded(1, &data).unwrap().version, 1);
    let error = store.apply_encoded(2, &[0xff, 0xff, 0xff]).unwrap_err();
    assert!(matches!(error, TxnError::Undecodable { .. }), "{error}");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert_eq!((store.version(), store.applied_index()), (1, 2));
    let error = store.apply_encoded(2, &data).unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
}

/// Checks every index against a brute-force scan of the objects.
fn assert_indexes_agree(store: &Store) {
    store.view(|v| {
        let tasks: Vec<&Arc<Task>> = v.list::<Task>().collect();
        let ids =
            |it: &mut dyn Iterator<Item = &Arc<Task>>| it.map(|t| t.id.clone()).collect::<Vec<_>>();
        let scan = |pred: &dyn Fn(&Task) -> bool| {
            tasks
                .iter()
                .filter(|t| pred(t))
                .map(|t| t.id.clone())
                .collect::<Vec<_>>()
        };
        for service_id in ["s0", "s1", "s2", "s3", ""] {
            assert_eq!(
                ids(&mut v.tasks_by_service(service_id)),
                scan(&|t| !service_id.is_empty() && t.service_id == service_id),
                "service index for {service_id:?}"
            );
            for slot in 0..3 {
                assert_eq!(
                    ids(&mut v.tasks_by_slot(service_id, slot)),
                    scan(&|t| !service_id.is_empty()
                        && t.service_id == service_id
                        && t.slot == slot),
                );
            }
        }
        for node_id in ["n0", "n1", "n2", ""] {
            assert_eq!(
                ids(&mut v.tasks_by_node(node_id)),
                scan(&|t| !node_id.is_empty() && t.node_id == node_id),
                "node index for {node_id:?}"
            );
        }
        for state in [TaskState::Running, TaskState::Shutdown, TaskState::Remove] {
            assert_eq!(
                ids(&mut v.tasks_by_desired_state(state)),
                scan(&|t| t.desired_state == state as i32)
            );
        }
        let services: Vec<&Arc<Service>> = v.list::<Service>().collect();
        for s in &services {
            let name = &s.spec.as_ref().unwrap().name;
            assert_eq!(v.get_by_name::<Service>(name).unwrap().id, s.id);
        }
        for name in ["a", "b", "c", "d", "e", "f"] {
            let holder = services
                .iter()
                .find(|s| s.spec.as_ref().unwrap().name.eq_ignore_ascii_case(name));
            assert_eq!(
                v.get_by_name::<Service>(name).map(|s| &s.id),
                holder.map(|s| &s.id)
            );
        }
    });
}

/// Random transactions (creates, updates with fresh or stale versions, deletes, renames into
/// taken names) against the invariants: a refused transaction changes nothing, an accepted
/// one changes exactly its objects, indexes always agree with the objects, and the store
/// survives a snapshot round trip.
#[test]
fn random_transactions_keep_every_invariant() {
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    let mut rng = StdRng::seed_from_u64(0x5eed_f10f);
    let store = Store::default();
    let (mut accepted, mut refused) = (0, 0);
    for index in 1..=1500u64 {
        let changes: Vec<Change> = (0..rng.random_range(1..=4))
            .map(|_| {
                let task_id = format!("t{}", rng.random_range(0..25));
                let service_id = format!("s{}", rng.random_range(0..4));
                let stored_task = store.get::<Task>(&task_id);
                let stored_service = store.get::<Service>(&service_id);
                match rng.random_range(0..7) {
                    0 | 1 => {
                        let mut t = task(
                            &task_id,
                            &service_id,
                            ["n0", "n1", "n2", ""][rng.random_range(0..4)],
                            rng.random_range(0..3),
                        );
                        t.desired_state = [TaskState::Running, TaskState::Shutdown]
                            [rng.random_range(0..2)]
                            as i32;
                        create(t)
                    }
                    2 | 3 => {
                        let mut t = stored_task.map_or_else(
                            || task(&task_id, &service_id, "n0", 0),
                            |t| t.as_ref().clone(),
                        );
                        t.node_id = ["n0", "n1", "n2", ""][rng.random_range(0..4)].into();
                        t.desired_state =
                            [TaskState::Running, TaskState::Remove][rng.random_range(0..2)] as i32;
                        let version = t.version();
                        // Mostly fresh, sometimes stale.
                        let expected = if rng.random_range(0..5) == 0 {
                            version.saturating_sub(1).max(1)
                        } else {
                            version.max(1)
                        };
                        update_expecting(t, expected)
                    }
                    4 => {
                        let expected = match rng.random_range(0..3) {
                            0 => 0,
                            1 => stored_task.map_or(1, |t| t.version()),
                            _ => 1,
                        };
                        delete(Kind::Task, &task_id, expected)
                    }
                    5 => {
                        let name = ["a", "b", "C", "d", "e", "f"][rng.random_range(0..6)];
                        match stored_service {
                            Some(s) => {
                                let mut s = s.as_ref().clone();
                                s.spec.as_mut().unwrap().name = name.into();
                                update(s)
                            }
                            None => create(service(&service_id, name)),
                        }
                    }
                    _ => delete(Kind::Service, &service_id, 0),
                }
            })
            .collect();
        let before = contents(&store);
        match store.apply(index, &txn(changes.clone())) {
            Ok(outcome) => {
                accepted += 1;
                assert_eq!(outcome.events.len(), changes.len());
                let after = contents(&store);
                // Exactly the objects the events name changed.
                let touched: std::collections::BTreeSet<(Kind, String)> = outcome
                    .events
                    .iter()
                    .map(|e| (e.object.kind(), e.object.id().to_owned()))
                    .collect();
                for key in before.keys().chain(after.keys()) {
                    if !touched.contains(key) {
                        assert_eq!(before.get(key), after.get(key), "{key:?} changed untouched");
                    }
                }
                for event in &outcome.events {
                    let key = (event.object.kind(), event.object.id().to_owned());
                    match event.action {
                        Action::Delete => assert!(!after.contains_key(&key) || touched.len() > 1),
                        _ => assert_eq!(event.object.version(), index),
                    }
                }
            }
            Err(error) => {
                refused += 1;
                assert_ne!(error.code(), Code::Ok);
                assert_eq!(
                    contents(&store),
                    before,
                    "refused txn {index} changed the store"
                );
            }
        }
        assert_indexes_agree(&store);
        if index % 300 == 0 {
            let copy = Store::default();
            copy.restore(snapshot_bytes(&store).as_slice()).unwrap();
            assert_eq!(contents(&copy), contents(&store));
            assert_indexes_agree(&copy);
        }
    }
    // The mix exercised both paths.
    assert!(
        accepted > 300 && refused > 300,
        "accepted {accepted}, refused {refused}"
    );
}

/// Watchers that never read fill up and are dropped while others keep up on their own
/// threads; the applier never waits for either.
#[test]
fn stalled_watchers_are_dropped_while_readers_on_threads_get_everything() {
    const TXNS: u64 = 3_000;
    const STALLED_QUEUE: usize = 16;
    let store = Store::default();
    let stalled: Vec<Watcher> = (0..10)
        .map(|_| {
            store.watch(WatchOptions {
                queue_events_max: Some(STALLED_QUEUE),
                ..WatchOptions::default()
            })
        })
        .collect();
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let watcher = store.watch(WatchOptions {
                // Room for everything: these must never be dropped, however slow the thread.
                queue_events_max: Some(TXNS as usize),
                ..WatchOptions::default()
            });
            thread::spawn(move || {
                let mut versions = Vec::new();
                while versions.len() < TXNS as usize {
                    versions.push(change_event(watcher.recv().unwrap()).version);
                }
                (versions, watcher)
            })
        })
        .collect();
    for i in 1..=TXNS {
        store
            .apply(i, &txn(vec![create(task(&format!("t{i}"), "s", "n", i))]))
            .unwrap();
    }
    let mut kept = Vec::new();
    for reader in readers {
        let (versions, watcher) = reader.join().unwrap();
        assert_eq!(versions, (1..=TXNS).collect::<Vec<_>>());
        kept.push(watcher);
    }
    for watcher in &stalled {
        let queued: Vec<u64> = (0..STALLED_QUEUE)
            .map(|_| change_event(watcher.recv().unwrap()).version)
            .collect();
        assert_eq!(queued, (1..=STALLED_QUEUE as u64).collect::<Vec<_>>());
        assert!(matches!(
            watcher.recv(),
            Err(WatchError::Dropped(DropReason::SlowConsumer { .. }))
        ));
        assert_eq!(watcher.recv().unwrap_err(), WatchError::Closed);
    }
    assert_eq!(store.watcher_count(), 4, "only the readers remain");
}

/// Builds a well-formed stream (valid checksum) from parts, to test checks past the checksum.
fn forged_snapshot(
    header: crate::proto::objects::SnapshotHeader,
    objects: &[StoreObject],
) -> Vec<u8> {
    use prost::Message;
    let mut bytes = Vec::new();
    header.encode_length_delimited(&mut bytes).unwrap();
    for object in objects {
        object.encode_length_delimited(&mut bytes).unwrap();
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    let trailer = crate::proto::objects::SnapshotTrailer {
        sha256: bytes::Bytes::copy_from_slice(digest.as_ref()),
    };
    trailer.encode_length_delimited(&mut bytes).unwrap();
    bytes
}

#[test]
fn well_checksummed_but_inconsistent_snapshots_are_refused() {
    use crate::proto::objects::SnapshotHeader;
    let header = |version, applied_index, object_count| SnapshotHeader {
        format_version: SNAPSHOT_FORMAT_VERSION,
        applied_index,
        version,
        object_count,
        ..Default::default()
    };
    let versioned = |id: &str, name: &str, version| {
        let mut s = service(id, name);
        s.meta = Some(crate::proto::objects::Meta {
            version,
            ..Default::default()
        });
        s.into_store_object()
    };
    let store = Store::default();
    store
        .apply(1, &txn(vec![create(service("keep", "keep"))]))
        .unwrap();
    let before = contents(&store);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            forged_snapshot(header(9, 5, 0), &[]),
            "after its applied index",
        ),
        (
            forged_snapshot(
                header(5, 5, 2),
                &[versioned("a", "x", 1), versioned("a", "y", 1)],
            ),
            "appears twice",
        ),
        (
            forged_snapshot(
                header(5, 5, 2),
                &[versioned("a", "x", 1), versioned("b", "X", 1)],
            ),
            "name",
        ),
        (
            forged_snapshot(header(5, 5, 1), &[versioned("a", "x", 6)]),
            "after the snapshot's version",
        ),
        (
            forged_snapshot(header(5, 5, 1), &[StoreObject { object: None }]),
            "no kind",
        ),
        (
            forged_snapshot(header(5, 5, 1), &[versioned("", "x", 1)]),
            "empty id",
        ),
        // The trailer is read where the second object should be.
        (
            forged_snapshot(header(5, 5, 2), &[versioned("a", "x", 1)]),
            "object 1 of 2",
        ),
    ];
    for (bytes, needle) in cases {
        let error = store.restore(bytes.as_slice()).unwrap_err();
        assert!(
            error.to_string().contains(needle),
            "{error} should mention {needle}"
        );
        assert_eq!(error.code(), Code::DataLoss);
        assert_eq!(contents(&store), before);
    }
    // The forging helper itself makes streams that restore.
    let good = forged_snapshot(header(5, 7, 1), &[versioned("a", "x", 5)]);
    let info = store.restore(good.as_slice()).unwrap();
    assert_eq!(
        (info.version, info.applied_index, info.object_count),
        (5, 7, 1)
    );
    store
        .apply(8, &txn(vec![create(service("b", "y"))]))
        .unwrap();
}

#[test]
fn refusals_a_caller_can_meet_speak_in_user_terms() {
    use crate::util::user_text::assert_user_terms;
    let refusals: Vec<String> = vec![
        TxnError::TooManyChanges {
            changes: 201,
            max: 200,
        }
        .to_string(),
        TxnError::TooLarge {
            bytes: 2_000_000,
            max: 1_572_864,
        }
        .to_string(),
        TxnError::ChangeTooLarge {
            position: 0,
            bytes: 2_000_000,
            max: 1_572_864,
        }
        .to_string(),
        WatchError::Compacted {
            requested: 3,
            oldest_resumable: 9,
        }
        .to_string(),
        WatchError::Dropped(DropReason::SlowConsumer {
            queue_events_max: 4096,
            last_delivered_version: 31166,
        })
        .to_string(),
        WatchError::Dropped(DropReason::Restored { version: 20 }).to_string(),
    ];
    for refusal in &refusals {
        assert_user_terms(refusal);
    }
}

// ---------------------------------------------------------------------------------------------
// Exactly-once writes: the table of answers

fn requested(changes: Vec<Change>, client_id: &[u8], seq: u64, timestamp_ms: i64) -> Transaction {
    Transaction {
        changes,
        timestamp_ms,
        request_id: Some(crate::proto::objects::RequestId {
            client_id: bytes::Bytes::copy_from_slice(client_id),
            seq,
        }),
    }
}

#[test]
fn a_repeated_request_gets_its_first_answer_and_changes_nothing() {
    let store = Store::default();
    store
        .apply(
            1,
            &requested(vec![create(service("s", "web"))], b"alice", 1, TS),
        )
        .unwrap();
    let mut changed = get_service(&store, "s").unwrap();
    changed.spec.as_mut().unwrap().replicas = 5;
    let update = requested(vec![update_expecting(changed.clone(), 1)], b"alice", 2, TS);
    let first = store.apply(2, &update).unwrap();
    assert_eq!((first.version, first.repeated), (2, false));
    let watcher = store.watch(WatchOptions::default());

    // The same request again (a retry whose first attempt committed): the first answer, not
    // a conflict with its own write.
    let again = store.apply(3, &update).unwrap();
    assert_eq!((again.version, again.repeated), (2, true));
    assert!(again.events.is_empty());
    assert_eq!(store.version(), 2, "a repeat writes nothing");
    assert_eq!(get_service(&store, "s").unwrap().meta.unwrap().version, 2);
    assert!(
        matches!(watcher.try_recv(), Ok(None)),
        "watchers see no event for a repeat"
    );

    // Someone else with the same stale version: a real conflict, recorded as its answer.
    let bob = requested(vec![update_expecting(changed, 1)], b"bob", 1, TS);
    let refused = store.apply(4, &bob).unwrap_err();
    assert_eq!(refused.code(), Code::Aborted, "{refused}");
    let refused_again = store.apply(5, &bob).unwrap_err();
    assert_eq!(refused_again.code(), Code::Aborted);
    assert_eq!(refused_again.to_string(), refused.to_string());

    // The answer lives in the view, with the objects it wrote.
    store.view(|view| {
        assert!(matches!(
            view.answer(b"alice", 2),
            answers::Lookup::Repeat(recorded) if recorded.answer == answers::Answer::Written { version: 2 }
        ));
        assert_eq!(view.answer(b"alice", 3), answers::Lookup::New);
        assert_eq!(
            view.answer(b"alice", 1),
            answers::Lookup::Superseded { latest_seq: 2 }
        );
    });
    // An earlier request of a client that moved on cannot be told: neither applied nor
    // called a conflict.
    let stale = store
        .apply(
            6,
            &requested(vec![delete(Kind::Service, "s", 0)], b"alice", 1, TS),
        )
        .unwrap_err();
    assert_eq!(stale.code(), Code::Unknown, "{stale}");
    assert!(get_service(&store, "s").is_some());
}

#[test]
fn a_malformed_request_id_is_refused_alike_everywhere() {
    let store = Store::default();
    for (client_id, seq) in [(&b""[..], 1), (&[7u8; 33][..], 1), (&b"c"[..], 0)] {
        let error = store
            .apply(
                store.applied_index() + 1,
                &requested(vec![create(service("s", "web"))], client_id, seq, TS),
            )
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{error}");
    }
    assert!(get_service(&store, "s").is_none());
}

#[test]
fn answers_leave_in_log_time_and_the_table_stays_bounded() {
    let store = Store::default();
    store
        .apply(
            1,
            &requested(vec![create(service("a", "a"))], b"old", 1, TS),
        )
        .unwrap();
    // An hour later by the log's clock (any transaction, with or without a request), the
    // answer has left: a repeat is applied as new (and here refused: the service exists).
    store
        .apply(
            2,
            &txn_at(
                vec![create(service("b", "b"))],
                TS + answers::ANSWER_TTL_MS + 1,
            ),
        )
        .unwrap();
    store.view(|view| assert_eq!(view.answer(b"old", 1), answers::Lookup::New));
    let fresh = store
        .apply(
            3,
            &requested(vec![create(service("a", "a"))], b"old", 1, TS),
        )
        .unwrap_err();
    assert_eq!(fresh.code(), Code::AlreadyExists);

    let store = Store::default();
    let clients = answers::ANSWERS_CLIENTS_MAX as u64 + 5;
    for n in 1..=clients {
        let mut object = node(&format!("n{n}"), "h", NodeRole::Worker);
        object.id = format!("n{n}");
        store
            .apply(n, &requested(vec![create(object)], &n.to_be_bytes(), 1, TS))
            .unwrap();
    }
    let info = store.snapshot().info();
    assert_eq!(info.answer_count, answers::ANSWERS_CLIENTS_MAX as u64);
    store.view(|view| {
        assert_eq!(view.answer(&1u64.to_be_bytes(), 1), answers::Lookup::New);
        assert!(matches!(
            view.answer(&clients.to_be_bytes(), 1),
            answers::Lookup::Repeat(_)
        ));
    });
}

#[test]
fn the_table_of_answers_travels_in_snapshots_and_every_manager_keeps_the_same() {
    let log: Vec<Transaction> = vec![
        requested(vec![create(service("s", "web"))], b"alice", 1, TS),
        requested(vec![create(service("t", "web"))], b"bob", 1, TS + 1),
        txn_at(vec![create(service("u", "other"))], TS + 2),
        requested(vec![delete(Kind::Service, "s", 0)], b"alice", 2, TS + 3),
    ];
    let replay = || {
        let store = Store::default();
        for (i, txn) in log.iter().enumerate() {
            let _ = store.apply(i as u64 + 1, txn);
        }
        store
    };
    let (one, two) = (replay(), replay());
    let image = snapshot_bytes(&one);
    assert_eq!(image, snapshot_bytes(&two), "same log, same bytes");
    assert_eq!(one.snapshot().info().answer_count, 2);

    let restored = Store::default();
    restored
        .apply(1, &txn(vec![create(service("x", "x"))]))
        .unwrap();
    restored.restore(image.as_slice()).unwrap();
    assert_eq!(snapshot_bytes(&restored), image);
    // alice's removal, retried after the restore: its first answer, with the removed id.
    let again = restored.apply(5, &log[3]).unwrap();
    assert!(again.repeated);
    restored.view(|view| match view.answer(b"alice", 2) {
        answers::Lookup::Repeat(recorded) => assert_eq!(recorded.object_id, "s"),
        other => panic!("{other:?}"),
    });
    // bob's refused create (the name was taken) is refused the same way again.
    let bob = restored.apply(6, &log[1]).unwrap_err();
    assert_eq!(bob.code(), Code::AlreadyExists, "{bob}");

    // A damaged table leaves the store as it was.
    let mut damaged = image.clone();
    let at = damaged.len() - 40;
    damaged[at] ^= 0xff;
    assert!(restored.restore(damaged.as_slice()).is_err());
    assert_eq!(restored.applied_index(), 6);
}

#[test]
fn a_format_1_snapshot_restores_with_an_empty_table_of_answers() {
    let header = crate::proto::objects::SnapshotHeader {
        format_version: SNAPSHOT_FORMAT_VERSION_OLDEST,
        applied_index: 3,
        version: 3,
        object_count: 0,
        ..Default::default()
    };
    let store = Store::default();
    store
        .apply(
            1,
            &requested(vec![create(service("s", "web"))], b"c", 1, TS),
        )
        .unwrap();
    let info = store
        .restore(forged_snapshot(header, &[]).as_slice())
        .unwrap();
    assert_eq!((info.applied_index, info.answer_count), (3, 0));
    store.view(|view| assert_eq!(view.answer(b"c", 1), answers::Lookup::New));
    let claims_answers = crate::proto::objects::SnapshotHeader {
        answer_count: 1,
        ..header
    };
    assert!(
        store
            .restore(forged_snapshot(claims_answers, &[]).as_slice())
            .is_err()
    );
}
