//! Cost of one orchestrator pass over a large store.
//!
//! `cargo bench --bench orchestrator -- [NODES] [SERVICES] [REPLICAS]` (defaults 100 100
//! 100: 10,000 tasks): builds the store, times the first pass (every task created and
//! scheduled) and then the steady-state pass (nothing to change), which is what the
//! leader pays every 200 ms, and how long of it the store's read lock is held (the
//! capture of pointers). Prints `BENCH orchestrator_first_pass_ms <v> ms`,
//! `BENCH orchestrator_idle_pass_ms <v> ms`, `BENCH orchestrator_lock_held_ms <v> ms` and
//! `BENCH orchestrator_tasks <v> tasks`.

use std::time::Instant;

use flotilla::orchestrator::{Snapshot, reconcile, reconcile_snapshot};
use flotilla::proto::objects::Task;
use flotilla::proto::objects::{
    Node, NodeAvailability, NodeSpec, NodeState, NodeStatus, Service, ServiceMode, ServiceSpec,
    TaskSpec, Transaction,
};
use flotilla::store::{Store, create};

/// Idle passes timed (the figure is their mean).
const IDLE_PASSES: u32 = 20;

fn arg(index: usize, default: u64) -> u64 {
    std::env::args()
        .filter(|a| !a.starts_with("--"))
        .nth(index)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let (nodes, services, replicas) = (arg(1, 100), arg(2, 100), arg(3, 100));
    let store = Store::default();
    let mut index = 0;
    let mut apply = |changes, store: &Store| {
        index += 1;
        store
            .apply(
                index,
                &Transaction {
                    changes,
                    timestamp_ms: 1,
                    request_id: None,
                },
            )
            .expect("the bench's own objects are valid");
    };
    for n in 0..nodes {
        let node = Node {
            id: format!("node{n:05}"),
            spec: Some(NodeSpec {
                availability: NodeAvailability::Active as i32,
                ..Default::default()
            }),
            status: Some(NodeStatus {
                state: NodeState::Ready as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        apply(vec![create(node)], &store);
    }
    for s in 0..services {
        let service = Service {
            id: format!("svc{s:05}"),
            spec: Some(ServiceSpec {
                name: format!("svc{s:05}"),
                mode: ServiceMode::Replicated as i32,
                replicas,
                task: Some(TaskSpec {
                    command: "sleep".into(),
                    args: vec!["100".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        apply(vec![create(service)], &store);
    }
    let started = Instant::now();
    let transactions = store.view(|view| reconcile(view, 1_000));
    let first_ms = started.elapsed().as_secs_f64() * 1e3;
    for txn in transactions {
        apply(txn.changes, &store);
    }
    let (mut capture_s, mut idle_s) = (0.0, 0.0);
    for _ in 0..IDLE_PASSES {
        let started = Instant::now();
        let snapshot = store.view(Snapshot::capture);
        let captured = Instant::now();
        let transactions = reconcile_snapshot(&snapshot, 2_000);
        assert!(transactions.is_empty(), "a settled store needs no change");
        capture_s += (captured - started).as_secs_f64();
        idle_s += started.elapsed().as_secs_f64();
    }
    let capture_ms = capture_s * 1e3 / f64::from(IDLE_PASSES);
    let idle_ms = idle_s * 1e3 / f64::from(IDLE_PASSES);
    println!("BENCH orchestrator_first_pass_ms {first_ms:.1} ms");
    println!("BENCH orchestrator_idle_pass_ms {idle_ms:.1} ms");
    println!("BENCH orchestrator_lock_held_ms {capture_ms:.2} ms");
    println!(
        "BENCH orchestrator_tasks {} tasks",
        store.list::<Task>().len()
    );
}
