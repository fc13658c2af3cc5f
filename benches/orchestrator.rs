//! Cost of the orchestrator on a large store.
//!
//! `cargo bench --bench orchestrator -- [NODES] [SERVICES] [REPLICAS]` (defaults 100 100
//! 100: 10,000 tasks): builds the store, then prints
//! - `BENCH orchestrator_first_pass_ms`: the first (full) pass, every task created and
//!   scheduled, and `orchestrator_first_pass_cpu_ms`, the CPU its thread used meanwhile
//!   (what a loaded machine does not inflate: it counts no time spent waiting for a core);
//! - `BENCH orchestrator_idle_pass_ms`: a full pass with nothing to change (what the leader
//!   pays at its safety-net interval, `ORCHESTRATOR_FULL_PASS_INTERVAL`), and
//!   `BENCH orchestrator_lock_held_ms`, how long of it the store's read lock is held;
//! - `BENCH orchestrator_change_pass_ms`: the event-driven pass after one task's status
//!   change (a task `FAILED`: from the store's event to its replacement decided), the median
//!   of several, and `orchestrator_change_pass_cpu_ms`, the mean CPU of the same passes (a
//!   mean: the kernel adds a running thread's CPU time at its scheduler ticks, so one short
//!   pass reads 0 or one whole tick, and only the sum over many passes is exact);
//! - `BENCH orchestrator_idle_cpu_pct`: the CPU the real orchestrator loop
//!   (`orchestrator::run_with`, proposing straight into the store) uses at rest on the
//!   settled store, in percent of one core, over a few seconds after it settled;
//! - `BENCH orchestrator_tasks`.

use std::time::{Duration, Instant};

use flotilla::orchestrator::{
    Capture, Proposer, Snapshot, Tracker, reconcile_pass, reconcile_snapshot, run_with,
};
use flotilla::proto::objects::{
    Node, NodeAvailability, NodeSpec, NodeState, NodeStatus, Service, ServiceMode, ServiceSpec,
    Task, TaskSpec, TaskState, Transaction,
};
use flotilla::store::{Store, create, update};

/// Status changes timed (the figure is their median).
const CHANGE_PASSES: usize = 21;

/// How long the idle loop's CPU is measured, after it settled.
const IDLE_MEASURE: Duration = Duration::from_secs(4);

/// Idle passes timed (the figure is their mean).
const IDLE_PASSES: u32 = 20;

fn arg(index: usize, default: u64) -> u64 {
    std::env::args()
        .filter(|a| !a.starts_with("--"))
        .nth(index)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

/// Proposes straight into the store: the orchestrator loop without Raft.
struct DirectProposer {
    store: Store,
}

impl Proposer for DirectProposer {
    fn is_leader(&self) -> bool {
        true
    }

    fn catch_up(&self) -> bool {
        true
    }

    fn propose(&self, txn: &Transaction) -> Result<u64, String> {
        let index = self.store.applied_index() + 1;
        self.store
            .apply(index, txn)
            .map(|outcome| outcome.version)
            .map_err(|error| error.to_string())
    }
}

fn apply_all(store: &Store, transactions: Vec<Transaction>) {
    for txn in transactions {
        let index = store.applied_index() + 1;
        store
            .apply(index, &txn)
            .expect("the pass's own changes apply");
    }
}

/// The pass the tracker captures at `now_ms`, applied; the number of transactions.
fn tracked_pass(tracker: &mut Tracker, store: &Store, now_ms: i64) -> usize {
    let outcome = match tracker.capture(store, now_ms) {
        Capture::Full(snapshot) | Capture::Scoped { snapshot, .. } => {
            reconcile_pass(&snapshot, now_ms)
        }
        Capture::Nothing => return 0,
    };
    tracker.record_wakeups(outcome.wakeups_ms);
    let count = outcome.transactions.len();
    apply_all(store, outcome.transactions);
    count
}

/// The CPU time the calling thread has used, in nanoseconds precision (the first field of
/// `/proc/thread-self/schedstat`).
fn own_cpu() -> Duration {
    let schedstat = std::fs::read_to_string("/proc/thread-self/schedstat")
        .expect("Linux /proc has the thread's schedstat");
    let ns: u64 = schedstat
        .split_whitespace()
        .next()
        .and_then(|field| field.parse().ok())
        .expect("schedstat starts with the CPU time in ns");
    Duration::from_nanos(ns)
}

/// The CPU time this thread `tid` has used, from `/proc/self/task/<tid>/stat`.
fn thread_cpu(tid: u64) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
        .expect("Linux /proc has the thread's stat");
    // The fields after the command (which may hold spaces) start after its ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat has a command in parentheses")
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // /proc counts in USER_HZ, 100 a second on every Linux architecture.
    const TICKS_PER_SECOND: u64 = 100;
    Duration::from_micros(ticks * 1_000_000 / TICKS_PER_SECOND)
}

/// The id of this process's thread called `name`, from `/proc/self/task/*/comm`.
fn thread_id_named(name: &str) -> u64 {
    for _ in 0..100 {
        let tasks = std::fs::read_dir("/proc/self/task").expect("Linux /proc lists threads");
        for task in tasks.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim_end() == name {
                return task
                    .file_name()
                    .to_string_lossy()
                    .parse()
                    .expect("a thread id");
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no thread named {name}");
}

/// Runs the real loop on the settled `store` and measures its CPU at rest.
fn idle_cpu_pct(store: &Store) -> f64 {
    let (stop, stopped) = crossbeam_channel::bounded::<()>(1);
    let proposer = DirectProposer {
        store: store.clone(),
    };
    let thread_store = store.clone();
    let thread = std::thread::Builder::new()
        .name("bench-orch".into())
        .spawn(move || {
            run_with(&proposer, &thread_store, &stopped);
        })
        .expect("a thread starts");
    let tid = thread_id_named("bench-orch");
    // Settled: its first (full) pass is over and a second of no change went by.
    let mut version = store.version();
    let mut last_cpu = thread_cpu(tid);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let cpu = thread_cpu(tid);
        let settled = store.version() == version && cpu - last_cpu < Duration::from_millis(50);
        if settled {
            break;
        }
        (version, last_cpu) = (store.version(), cpu);
    }
    let (started, cpu_before) = (Instant::now(), thread_cpu(tid));
    std::thread::sleep(IDLE_MEASURE);
    let used = thread_cpu(tid) - cpu_before;
    let pct = used.as_secs_f64() * 100.0 / started.elapsed().as_secs_f64();
    drop(stop);
    thread.join().expect("the orchestrator thread ends cleanly");
    assert_eq!(store.version(), version, "a settled store stays as it is");
    pct
}

fn main() {
    let (nodes, services, replicas) = (arg(1, 100), arg(2, 100), arg(3, 100));
    let store = Store::default();
    let apply = |changes, store: &Store| {
        let index = store.applied_index() + 1;
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
    let mut tracker = Tracker::new();
    let (started, cpu_started) = (Instant::now(), own_cpu());
    let Capture::Full(snapshot) = tracker.capture(&store, 1_000) else {
        panic!("the first capture is a full one");
    };
    let first = reconcile_pass(&snapshot, 1_000);
    let first_ms = started.elapsed().as_secs_f64() * 1e3;
    let first_cpu_ms = (own_cpu() - cpu_started).as_secs_f64() * 1e3;
    drop(snapshot);
    apply_all(&store, first.transactions);
    // The pass over the services the first one wrote to finds nothing to do.
    assert_eq!(
        tracked_pass(&mut tracker, &store, 2_000),
        0,
        "the store settled"
    );
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
    let (change_ms, change_cpu_ms) = change_pass_ms(&store, &mut tracker);
    println!("BENCH orchestrator_first_pass_ms {first_ms:.1} ms");
    println!("BENCH orchestrator_first_pass_cpu_ms {first_cpu_ms:.1} ms");
    println!("BENCH orchestrator_idle_pass_ms {idle_ms:.1} ms");
    println!("BENCH orchestrator_lock_held_ms {capture_ms:.2} ms");
    println!("BENCH orchestrator_change_pass_ms {change_ms:.3} ms");
    println!("BENCH orchestrator_change_pass_cpu_ms {change_cpu_ms:.3} ms");
    println!(
        "BENCH orchestrator_idle_cpu_pct {:.2} %",
        idle_cpu_pct(&store)
    );
    println!(
        "BENCH orchestrator_tasks {} tasks",
        store.list::<Task>().len()
    );
}

/// The median time from one task's `FAILED` report (applied to the store) to the pass that
/// retires it and creates and schedules its replacement, each in another service; with the
/// mean CPU time of the same passes.
fn change_pass_ms(store: &Store, tracker: &mut Tracker) -> (f64, f64) {
    let services = store.list::<Service>();
    let mut times_ms = Vec::new();
    let mut cpu_ms = Vec::new();
    // `ORCHESTRATOR_BENCH_CHANGE_PASSES` overrides the count (to profile these passes).
    let passes = std::env::var("ORCHESTRATOR_BENCH_CHANGE_PASSES")
        .ok()
        .and_then(|passes| passes.parse().ok())
        .unwrap_or(CHANGE_PASSES);
    for (round, service) in services.iter().cycle().take(passes).enumerate() {
        let victim = store.view(|view| {
            view.tasks_by_service(&service.id)
                .find(|task| task.desired_state == TaskState::Running as i32)
                .map(|task| task.as_ref().clone())
        });
        let Some(mut task) = victim else { continue };
        // It ran long (no backoff) and failed long enough ago for its restart to be due.
        let ended_ms = 1_000_000 + 100_000 * round as i64;
        let status = task.status.get_or_insert_with(Default::default);
        status.state = TaskState::Failed as i32;
        status.timestamp_ms = ended_ms;
        let index = store.applied_index() + 1;
        store
            .apply(
                index,
                &Transaction {
                    changes: vec![update(task)],
                    timestamp_ms: ended_ms,
                    request_id: None,
                },
            )
            .expect("a status report applies");
        let now_ms = ended_ms + 60_000;
        let (started, cpu_started) = (Instant::now(), own_cpu());
        let outcome = match tracker.capture(store, now_ms) {
            Capture::Scoped { snapshot, .. } => reconcile_pass(&snapshot, now_ms),
            _ => panic!("one status change makes a scoped pass"),
        };
        times_ms.push(started.elapsed().as_secs_f64() * 1e3);
        cpu_ms.push((own_cpu() - cpu_started).as_secs_f64() * 1e3);
        assert_eq!(outcome.transactions.len(), 1, "one slot's restart");
        assert_eq!(
            outcome.transactions[0].changes.len(),
            2,
            "retire and replace"
        );
        tracker.record_wakeups(outcome.wakeups_ms);
        apply_all(store, outcome.transactions);
        assert_eq!(
            tracked_pass(tracker, store, now_ms),
            0,
            "the restart settled"
        );
    }
    let median = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let mean_cpu_ms = cpu_ms.iter().sum::<f64>() / cpu_ms.len() as f64;
    (median(times_ms), mean_cpu_ms)
}
