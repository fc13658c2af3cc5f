//! The reconcile core on an in-memory store: every pass's output is applied as the Raft
//! layer would, and agents are simulated by writing task states.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use crate::proto::objects::{
    Change, Cluster, Node, NodeAvailability, NodeRole, NodeSpec, NodeState, NodeStatus, Placement,
    RestartCondition, RestartPolicy, Service, ServiceMode, ServiceSpec, Task, TaskSpec, TaskState,
    Transaction, UpdateConfig, UpdateFailureAction, UpdateOrder, UpdateState, UpdateStatus,
};
use crate::store::spec::default_cluster_spec;
use crate::store::{Kind, Store, create, delete, update};

use super::{Capture, NODE_DOWN_GRACE_MS, Tracker, reconcile, reconcile_pass};

/// Reservations, spreading over labels and the constraint enforcer.
#[path = "placement_tests.rs"]
mod placement;

struct Harness {
    store: Store,
    index: u64,
    /// The event-driven passes, checked against the full ones at every step.
    tracker: Tracker,
}

const RUNNING: i32 = TaskState::Running as i32;

impl Harness {
    fn new() -> Self {
        Self {
            store: Store::default(),
            index: 0,
            tracker: Tracker::new(),
        }
    }

    fn apply(&mut self, changes: Vec<Change>, now_ms: i64) {
        self.index += 1;
        let txn = Transaction {
            changes,
            timestamp_ms: now_ms,
            request_id: None,
        };
        self.store.apply(self.index, &txn).unwrap();
    }

    fn add_node(&mut self, id: &str, labels: &[(&str, &str)]) {
        let node = Node {
            id: id.into(),
            spec: Some(NodeSpec {
                hostname: format!("host-{id}"),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                availability: NodeAvailability::Active as i32,
                desired_role: NodeRole::Worker as i32,
            }),
            status: Some(NodeStatus {
                state: NodeState::Ready as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        self.apply(vec![create(node)], 1);
    }

    fn change_node(&mut self, id: &str, now_ms: i64, change: impl FnOnce(&mut Node)) {
        let mut node = self.store.get::<Node>(id).unwrap().as_ref().clone();
        change(&mut node);
        self.apply(vec![update(node)], now_ms);
    }

    fn add_service(&mut self, id: &str, mode: ServiceMode, replicas: u64, task: TaskSpec) {
        let service = Service {
            id: id.into(),
            spec: Some(ServiceSpec {
                name: id.into(),
                mode: mode as i32,
                replicas,
                task: Some(task),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.apply(vec![create(service)], 1);
    }

    fn change_service(&mut self, id: &str, change: impl FnOnce(&mut ServiceSpec)) {
        let mut service = self.store.get::<Service>(id).unwrap().as_ref().clone();
        change(service.spec.as_mut().unwrap());
        self.apply(vec![update(service)], 1);
    }

    /// A `service update` as the control API writes it: the spec changes, the old one is
    /// kept for a rollback, and the update status starts over.
    fn update_spec(&mut self, id: &str, now_ms: i64, change: impl FnOnce(&mut ServiceSpec)) {
        let mut service = self.store.get::<Service>(id).unwrap().as_ref().clone();
        let mut spec = service.spec.clone().unwrap();
        change(&mut spec);
        service.previous_spec = service.spec.replace(spec);
        service.update_status = None;
        self.apply(vec![update(service)], now_ms);
    }

    fn service(&self, id: &str) -> Service {
        self.store.get::<Service>(id).unwrap().as_ref().clone()
    }

    fn update_state(&self, id: &str) -> UpdateState {
        let status = self.service(id).update_status.unwrap_or_default();
        UpdateState::try_from(status.state).unwrap()
    }

    /// An agent reporting `state` for task `id` at `now_ms`.
    fn report(&mut self, id: &str, state: TaskState, now_ms: i64) {
        let mut task = self.store.get::<Task>(id).unwrap().as_ref().clone();
        let status = task.status.get_or_insert_with(Default::default);
        status.state = state as i32;
        status.timestamp_ms = now_ms;
        self.apply(vec![update(task)], now_ms);
    }

    /// One pass, applied; the number of changes it made.
    fn step(&mut self, now_ms: i64) -> usize {
        let transactions = self.store.view(|view| reconcile(view, now_ms));
        self.check_event_driven_pass(now_ms, &transactions);
        let mut changes = 0;
        for txn in transactions {
            changes += txn.changes.len();
            self.index += 1;
            self.store.apply(self.index, &txn).unwrap();
        }
        changes
    }

    /// The pass of the event-driven orchestrator (only what changed since its last pass)
    /// decides exactly what the full pass decides.
    fn check_event_driven_pass(&mut self, now_ms: i64, full: &[Transaction]) {
        let capture = self.tracker.capture(&self.store, now_ms);
        let outcome = match &capture {
            Capture::Full(snapshot) | Capture::Scoped { snapshot, .. } => {
                reconcile_pass(snapshot, now_ms)
            }
            Capture::Nothing => super::PassOutcome::default(),
        };
        self.tracker.record_wakeups(outcome.wakeups_ms);
        let changes = |transactions: &[Transaction]| {
            let mut encoded: Vec<Vec<u8>> = transactions
                .iter()
                .flat_map(|txn| txn.changes.iter().map(prost::Message::encode_to_vec))
                .collect();
            encoded.sort();
            encoded
        };
        assert!(
            changes(&outcome.transactions) == changes(full),
            "the event-driven pass at {now_ms} decided {} changes, the full pass {}",
            changes(&outcome.transactions).len(),
            changes(full).len()
        );
    }

    /// Passes until nothing changes; the total number of changes.
    fn settle(&mut self, now_ms: i64) -> usize {
        let mut total = 0;
        for _ in 0..10 {
            let changes = self.step(now_ms);
            if changes == 0 {
                return total;
            }
            total += changes;
        }
        panic!("the orchestrator did not settle within 10 passes");
    }

    fn tasks(&self, service_id: &str) -> Vec<Task> {
        self.store.view(|view| {
            view.tasks_by_service(service_id)
                .map(|t| t.as_ref().clone())
                .collect()
        })
    }

    fn occupants(&self, service_id: &str) -> Vec<Task> {
        self.tasks(service_id)
            .into_iter()
            .filter(|t| t.desired_state <= RUNNING)
            .collect()
    }

    /// Every occupant reports RUNNING.
    fn run_all(&mut self, service_id: &str, now_ms: i64) {
        for task in self.occupants(service_id) {
            if task.status.as_ref().unwrap().state < RUNNING {
                self.report(&task.id, TaskState::Running, now_ms);
            }
        }
    }
}

fn template(args: &[&str]) -> TaskSpec {
    TaskSpec {
        command: "sleep".into(),
        args: args.iter().map(ToString::to_string).collect(),
        ..Default::default()
    }
}

fn state_of(task: &Task) -> i32 {
    task.status.as_ref().unwrap().state
}

fn slots(tasks: &[Task]) -> Vec<u64> {
    let mut slots: Vec<u64> = tasks.iter().map(|t| t.slot).collect();
    slots.sort_unstable();
    slots
}

fn per_node(tasks: &[Task]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for task in tasks {
        *counts.entry(task.node_id.clone()).or_default() += 1;
    }
    counts
}

fn three_nodes() -> Harness {
    let mut h = Harness::new();
    for id in ["a", "b", "c"] {
        h.add_node(id, &[]);
    }
    h
}

#[test]
fn replicated_service_is_created_scaled_and_removed() {
    let mut h = three_nodes();
    h.add_service("web", ServiceMode::Replicated, 3, template(&["100"]));
    h.settle(1_000);
    let occupants = h.occupants("web");
    assert_eq!(slots(&occupants), vec![1, 2, 3]);
    for task in &occupants {
        assert_eq!(state_of(task), TaskState::Assigned as i32);
        assert_eq!(task.spec, Some(template(&["100"])));
        assert_eq!(task.desired_state, RUNNING);
    }
    assert_eq!(per_node(&occupants).len(), 3, "one task per node");
    assert_eq!(h.settle(1_100), 0, "a settled store needs no change");

    h.change_service("web", |spec| spec.replicas = 5);
    h.settle(2_000);
    assert_eq!(slots(&h.occupants("web")), vec![1, 2, 3, 4, 5]);

    h.change_service("web", |spec| spec.replicas = 2);
    h.settle(3_000);
    assert_eq!(slots(&h.occupants("web")), vec![1, 2]);
    let retired: Vec<Task> = h
        .tasks("web")
        .into_iter()
        .filter(|t| t.desired_state == TaskState::Shutdown as i32)
        .collect();
    assert_eq!(
        slots(&retired),
        vec![3, 4, 5],
        "the highest slots are retired"
    );

    // Slots 1 and 2 run; 3 to 5 were never started by their agents.
    for task in h.occupants("web") {
        h.report(&task.id, TaskState::Running, 3_500);
    }
    h.apply(vec![delete(Kind::Service, "web", 0)], 4_000);
    h.settle(4_000);
    let tasks = h.tasks("web");
    assert_eq!(
        slots(&tasks),
        vec![1, 2],
        "running tasks wait for their agents; never-started ones are deleted at once"
    );
    assert!(
        tasks
            .iter()
            .all(|t| t.desired_state == TaskState::Remove as i32)
    );
    for task in tasks {
        h.report(&task.id, TaskState::Shutdown, 5_000);
    }
    h.settle(5_000);
    assert!(
        h.tasks("web").is_empty(),
        "finished tasks of a deleted service are deleted"
    );
}

#[test]
fn tasks_nobody_will_report_are_reaped() {
    let mut h = Harness::new();
    h.add_node("a", &[]);
    h.add_node("b", &[]);
    h.add_service("web", ServiceMode::Replicated, 2, template(&["100"]));
    h.settle(1_000);
    h.run_all("web", 1_000);
    let on_b = h
        .occupants("web")
        .into_iter()
        .find(|t| t.node_id == "b")
        .unwrap();
    // Node b goes down: past the grace its task is replaced on a, and the retired one,
    // which nobody will report, is history like a finished task (retention 0 here).
    h.apply(
        vec![create(Cluster {
            id: "cluster".into(),
            spec: Some(crate::proto::objects::ClusterSpec {
                task_history_retention: 0,
                ..default_cluster_spec("default")
            }),
            ..Default::default()
        })],
        1_000,
    );
    h.change_node("b", 2_000, |node| {
        node.status.as_mut().unwrap().state = NodeState::Down as i32;
    });
    h.settle(2_000 + NODE_DOWN_GRACE_MS);
    assert!(
        h.store.get::<Task>(&on_b.id).is_none(),
        "the task on the down node was reaped"
    );
    assert_eq!(
        per_node(&h.occupants("web")),
        BTreeMap::from([("a".into(), 2)])
    );

    // A deleted service whose tasks sit on a node deleted meanwhile: all reaped, even the
    // one that was running there.
    h.run_all("web", 20_000);
    h.apply(vec![delete(Kind::Node, "a", 0)], 20_000);
    h.apply(vec![delete(Kind::Service, "web", 0)], 20_000);
    h.settle(20_000);
    assert!(h.tasks("web").is_empty(), "{:?}", h.tasks("web"));
}

#[test]
fn global_service_follows_eligible_nodes() {
    let mut h = three_nodes();
    h.add_service("mon", ServiceMode::Global, 0, template(&["1"]));
    h.settle(1_000);
    let occupants = h.occupants("mon");
    assert_eq!(
        per_node(&occupants).keys().collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
    assert!(occupants.iter().all(|t| t.slot == 0));
    assert!(
        occupants
            .iter()
            .all(|t| state_of(t) == TaskState::Assigned as i32)
    );

    h.change_node("b", 2_000, |node| {
        node.spec.as_mut().unwrap().availability = NodeAvailability::Drain as i32;
    });
    h.settle(2_000);
    let occupants = h.occupants("mon");
    assert_eq!(per_node(&occupants).keys().collect::<Vec<_>>(), ["a", "c"]);
    let on_b: Vec<Task> = h
        .tasks("mon")
        .into_iter()
        .filter(|t| t.node_id == "b")
        .collect();
    assert_eq!(on_b.len(), 1);
    assert_eq!(on_b[0].desired_state, TaskState::Shutdown as i32);

    // A paused node keeps its task; a new node gets one; a node that stops matching the
    // constraints loses its task.
    h.change_node("a", 3_000, |node| {
        node.spec.as_mut().unwrap().availability = NodeAvailability::Pause as i32;
    });
    h.add_node("d", &[("zone", "x")]);
    h.settle(3_000);
    assert_eq!(
        per_node(&h.occupants("mon")).keys().collect::<Vec<_>>(),
        ["a", "c", "d"]
    );
    h.change_service("mon", |spec| {
        spec.task.as_mut().unwrap().placement = Some(Placement {
            constraints: vec!["node.labels.zone==x".into()],
            ..Default::default()
        });
    });
    // The template changed too: a stop-first update retires d's task and replaces it once
    // its agent reports it stopped; the other nodes' tasks are retired.
    h.settle(4_000);
    assert!(h.occupants("mon").is_empty());
    let old_on_d: Vec<Task> = h
        .tasks("mon")
        .into_iter()
        .filter(|t| t.node_id == "d")
        .collect();
    assert_eq!(old_on_d.len(), 1);
    h.report(&old_on_d[0].id, TaskState::Shutdown, 4_500);
    h.settle(5_000);
    let occupants = h.occupants("mon");
    assert_eq!(per_node(&occupants).keys().collect::<Vec<_>>(), ["d"]);
}

fn restart_template(
    condition: RestartCondition,
    delay_ms: i64,
    max: u64,
    window_ms: i64,
) -> TaskSpec {
    TaskSpec {
        restart: Some(RestartPolicy {
            condition: condition as i32,
            delay_ms: Some(delay_ms),
            max_attempts: max,
            window_ms,
        }),
        ..template(&["1"])
    }
}

fn only_occupant(h: &Harness, service: &str) -> Task {
    let occupants = h.occupants(service);
    assert_eq!(occupants.len(), 1, "one occupant: {occupants:?}");
    occupants.into_iter().next().unwrap()
}

#[test]
fn restart_on_failure_honours_delay_and_attempts_in_a_window() {
    let mut h = Harness::new();
    h.add_node("a", &[]);
    let spec = restart_template(RestartCondition::OnFailure, 1_000, 2, 60_000);
    h.add_service("job", ServiceMode::Replicated, 1, spec);
    h.settle(1_000);
    let first = only_occupant(&h, "job");

    // Each task runs 19 s or more before it fails: no backoff, the policy's delay applies.
    h.report(&first.id, TaskState::Failed, 20_000);
    assert_eq!(h.settle(20_500), 0, "the restart waits for its delay");
    assert_eq!(only_occupant(&h, "job").id, first.id);
    h.settle(21_000);
    let second = only_occupant(&h, "job");
    assert_ne!(second.id, first.id, "restart 1");
    assert_eq!(second.slot, 1);
    assert_eq!(second.quick_end_streak, 0);
    let old = h.store.get::<Task>(&first.id).unwrap();
    assert_eq!(old.desired_state, TaskState::Shutdown as i32);

    h.report(&second.id, TaskState::Failed, 40_000);
    h.settle(41_000);
    let third = only_occupant(&h, "job");
    assert_ne!(third.id, second.id, "restart 2");

    h.report(&third.id, TaskState::Failed, 60_000);
    assert_eq!(
        h.settle(61_000),
        0,
        "max_attempts reached within the window"
    );
    assert_eq!(only_occupant(&h, "job").id, third.id);
    // Once the earlier attempts leave the window, restarts are allowed again.
    h.settle(40_000 + 60_001);
    let fourth = only_occupant(&h, "job");
    assert_ne!(fourth.id, third.id, "the window moved on");

    // ON_FAILURE does not restart a task that completed.
    h.report(&fourth.id, TaskState::Complete, 120_000);
    assert_eq!(h.settle(130_000), 0);
    assert_eq!(only_occupant(&h, "job").id, fourth.id);
}

/// Restarts of `service`'s single slot when every task ends `state` at once, from `start_ms`
/// until `end_ms`, one pass every 50 ms: the times at which a new task appeared.
fn restart_times(h: &mut Harness, service: &str, state: TaskState, end_ms: i64) -> Vec<i64> {
    let mut times = Vec::new();
    let mut current = only_occupant(h, service).id;
    h.report(&current, state, 1_000);
    let mut now = 1_000;
    while now < end_ms {
        now += 50;
        h.settle(now);
        let occupant = only_occupant(h, service);
        if occupant.id != current {
            times.push(now);
            current = occupant.id;
            h.report(&current, state, now);
        }
    }
    times
}

#[test]
fn a_policy_without_a_delay_waits_5_s_and_quick_ends_back_off_to_a_minute() {
    let mut h = Harness::new();
    h.add_node("a", &[]);
    let mut spec = restart_template(RestartCondition::Any, 0, 0, 0);
    spec.restart.as_mut().unwrap().delay_ms = None;
    h.add_service("storm", ServiceMode::Replicated, 1, spec);
    h.settle(1_000);
    // `/bin/true` under `restart any`: every task completes as soon as it starts.
    let times = restart_times(&mut h, "storm", TaskState::Complete, 400_000);
    let gaps: Vec<i64> = std::iter::once(times[0] - 1_000)
        .chain(times.windows(2).map(|pair| pair[1] - pair[0]))
        .collect();
    assert_eq!(
        gaps,
        [
            5_000, 10_000, 20_000, 40_000, 60_000, 60_000, 60_000, 60_000, 60_000
        ],
        "5 s, doubling per quick end, capped at 60 s"
    );
    let streaks: Vec<u32> = h
        .tasks("storm")
        .iter()
        .map(|t| t.quick_end_streak)
        .collect();
    assert!(streaks.iter().any(|streak| *streak >= 5), "{streaks:?}");
}

#[test]
fn a_zero_delay_still_backs_off_and_a_long_run_starts_the_streak_over() {
    let mut h = Harness::new();
    h.add_node("a", &[]);
    h.add_service(
        "crash",
        ServiceMode::Replicated,
        1,
        restart_template(RestartCondition::OnFailure, 0, 0, 0),
    );
    h.settle(1_000);
    let times = restart_times(&mut h, "crash", TaskState::Failed, 4_000);
    // 100 ms after the first quick failure (passes are 50 ms apart), then doubling.
    assert_eq!(times, [1_100, 1_300, 1_700, 2_500], "100 ms, then doubling");

    // A task that ran for a minute ends: the streak starts over, the delay is the policy's.
    let long_runner = only_occupant(&h, "crash");
    let created = long_runner.meta.as_ref().unwrap().created_at_ms;
    h.report(&long_runner.id, TaskState::Failed, created + 60_000);
    h.settle(created + 60_000);
    let next = only_occupant(&h, "crash");
    assert_ne!(next.id, long_runner.id, "a delay of 0 after a normal run");
    assert_eq!(next.quick_end_streak, 0);
}

#[test]
fn backoff_delays_double_within_their_bounds() {
    use super::restart::backoff_delay_ms;
    assert_eq!(backoff_delay_ms(5_000, 0), 5_000);
    assert_eq!(backoff_delay_ms(5_000, 1), 5_000);
    assert_eq!(backoff_delay_ms(5_000, 2), 10_000);
    assert_eq!(backoff_delay_ms(5_000, 5), 60_000);
    assert_eq!(backoff_delay_ms(0, 0), 0);
    assert_eq!(backoff_delay_ms(0, 1), 100);
    assert_eq!(backoff_delay_ms(0, 3), 400);
    assert_eq!(backoff_delay_ms(0, u32::MAX), 60_000);
    assert_eq!(
        backoff_delay_ms(120_000, 9),
        120_000,
        "a longer policy delay stands"
    );
}

#[test]
fn restart_none_keeps_and_any_restarts_a_completed_task() {
    let mut h = Harness::new();
    h.add_node("a", &[]);
    h.add_service(
        "n",
        ServiceMode::Replicated,
        1,
        restart_template(RestartCondition::None, 0, 0, 0),
    );
    h.add_service(
        "y",
        ServiceMode::Replicated,
        1,
        restart_template(RestartCondition::Any, 0, 0, 0),
    );
    h.settle(1_000);
    let (n, y) = (only_occupant(&h, "n"), only_occupant(&h, "y"));
    h.report(&n.id, TaskState::Complete, 2_000);
    h.report(&y.id, TaskState::Complete, 2_000);
    h.settle(3_000);
    assert_eq!(only_occupant(&h, "n").id, n.id);
    assert_ne!(only_occupant(&h, "y").id, y.id);
}

#[test]
fn update_with_parallelism_one_replaces_one_slot_at_a_time() {
    let mut h = three_nodes();
    h.add_service("web", ServiceMode::Replicated, 3, template(&["1"]));
    h.change_service("web", |spec| {
        spec.update = Some(UpdateConfig {
            parallelism: 1,
            ..Default::default()
        });
    });
    h.settle(1_000);
    h.run_all("web", 1_000);
    h.change_service("web", |spec| spec.task = Some(template(&["2"])));
    let new_spec = Some(template(&["2"]));
    for round in 1..=3u64 {
        h.settle(2_000);
        let retired: Vec<Task> = h
            .tasks("web")
            .into_iter()
            .filter(|t| t.desired_state == TaskState::Shutdown as i32 && state_of(t) == RUNNING)
            .collect();
        assert_eq!(slots(&retired), vec![round], "one slot at a time");
        assert!(
            h.occupants("web").iter().all(|t| t.slot != round),
            "stop-first: no new task while the old one still runs"
        );
        h.report(&retired[0].id, TaskState::Shutdown, 2_000);
        h.settle(2_000);
        let updated: Vec<u64> = h
            .occupants("web")
            .into_iter()
            .filter(|t| t.spec == new_spec)
            .map(|t| t.slot)
            .collect();
        assert_eq!(
            updated.len() as u64,
            round,
            "slots updated after round {round}: {updated:?}"
        );
        assert_eq!(h.occupants("web").len(), 3);
        // The next slot waits until the new task runs.
        assert_eq!(h.settle(2_000), 0);
        h.run_all("web", 2_000);
    }
    assert!(h.occupants("web").iter().all(|t| t.spec == new_spec));
    // No monitor period: the update is complete as soon as the last slot runs.
    assert_eq!(h.update_state("web"), UpdateState::Updating);
    assert_eq!(h.settle(3_000), 1);
    assert_eq!(h.update_state("web"), UpdateState::Completed);
    assert_eq!(h.settle(4_000), 0);
}

#[test]
fn start_first_update_keeps_the_old_task_until_the_new_one_runs() {
    let mut h = Harness::new();
    h.add_node("a", &[]);
    h.add_service("web", ServiceMode::Replicated, 1, template(&["1"]));
    h.change_service("web", |spec| {
        spec.update = Some(UpdateConfig {
            parallelism: 1,
            order: UpdateOrder::StartFirst as i32,
            ..Default::default()
        });
    });
    h.settle(1_000);
    h.run_all("web", 1_000);
    let old = only_occupant(&h, "web");
    h.change_service("web", |spec| spec.task = Some(template(&["2"])));
    h.settle(2_000);
    let occupants = h.occupants("web");
    assert_eq!(occupants.len(), 2, "the new task starts beside the old one");
    let new = occupants.iter().find(|t| t.id != old.id).unwrap().clone();
    assert_eq!(new.slot, 1);
    h.report(&new.id, TaskState::Running, 3_000);
    h.settle(3_000);
    assert_eq!(only_occupant(&h, "web").id, new.id);
}

#[test]
fn scheduler_spreads_honours_constraints_and_explains_pending() {
    let mut h = Harness::new();
    h.add_node("a", &[("zone", "a")]);
    h.add_node("b", &[]);
    h.add_node("c", &[]);
    h.add_service("six", ServiceMode::Replicated, 6, template(&["1"]));
    h.settle(1_000);
    let counts = per_node(&h.occupants("six"));
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        vec![2, 2, 2],
        "{counts:?}"
    );

    let mut zoned = template(&["1"]);
    zoned.placement = Some(Placement {
        constraints: vec!["node.labels.zone==a".into()],
        ..Default::default()
    });
    h.add_service("za", ServiceMode::Replicated, 2, zoned.clone());
    zoned.placement = Some(Placement {
        constraints: vec!["node.labels.zone==b".into()],
        ..Default::default()
    });
    h.add_service("zb", ServiceMode::Replicated, 1, zoned);
    h.settle(2_000);
    assert!(h.occupants("za").iter().all(|t| t.node_id == "a"));
    let pending = only_occupant(&h, "zb");
    assert_eq!(state_of(&pending), TaskState::Pending as i32);
    assert!(pending.node_id.is_empty());
    let message = &pending.status.as_ref().unwrap().message;
    assert_eq!(message, "no node satisfies node.labels.zone==b");
    let version = pending.meta.as_ref().unwrap().version;
    assert_eq!(
        h.settle(5_000),
        0,
        "no write while the reason stays the same"
    );
    assert_eq!(only_occupant(&h, "zb").meta.unwrap().version, version);
}

#[test]
fn scheduler_skips_drained_and_down_nodes() {
    let mut h = three_nodes();
    h.change_node("a", 1, |node| {
        node.spec.as_mut().unwrap().availability = NodeAvailability::Drain as i32;
    });
    h.change_node("b", 1, |node| {
        node.status.as_mut().unwrap().state = NodeState::Down as i32
    });
    h.add_service("web", ServiceMode::Replicated, 4, template(&["1"]));
    h.settle(1_000);
    let occupants = h.occupants("web");
    assert_eq!(occupants.len(), 4);
    assert!(occupants.iter().all(|t| t.node_id == "c"));

    h.change_node("c", 2_000, |node| {
        node.status.as_mut().unwrap().state = NodeState::Down as i32
    });
    h.add_service("late", ServiceMode::Replicated, 1, template(&["1"]));
    h.settle(2_000);
    let pending = only_occupant(&h, "late");
    assert_eq!(
        pending.status.unwrap().message,
        "none of the 3 nodes takes tasks (active and ready)"
    );
}

#[test]
fn tasks_on_a_node_down_past_the_grace_are_replaced_elsewhere() {
    let mut h = Harness::new();
    h.add_node("a", &[]);
    h.add_service("web", ServiceMode::Replicated, 1, template(&["1"]));
    h.settle(1_000);
    let first = only_occupant(&h, "web");
    assert_eq!(first.node_id, "a");
    h.add_node("b", &[]);
    h.change_node("a", 10_000, |node| {
        node.status.as_mut().unwrap().state = NodeState::Down as i32
    });
    assert_eq!(
        h.settle(10_000 + NODE_DOWN_GRACE_MS - 1),
        0,
        "within the grace"
    );
    h.settle(10_000 + NODE_DOWN_GRACE_MS);
    let replacement = only_occupant(&h, "web");
    assert_ne!(replacement.id, first.id);
    assert_eq!((replacement.slot, replacement.node_id.as_str()), (1, "b"));
}

#[test]
fn reaper_keeps_the_retention_per_slot() {
    let mut h = Harness::new();
    h.add_node("a", &[]);
    let mut cluster_spec = default_cluster_spec("default");
    cluster_spec.task_history_retention = 2;
    h.apply(
        vec![create(Cluster {
            id: "cluster".into(),
            spec: Some(cluster_spec),
            ..Default::default()
        })],
        1,
    );
    h.add_service(
        "job",
        ServiceMode::Replicated,
        2,
        restart_template(RestartCondition::Any, 0, 0, 0),
    );
    h.settle(1_000);
    let mut ended = BTreeSet::new();
    let mut ended_in_order = Vec::new();
    for round in 0..5 {
        // 20 s apart: every task ran long enough not to back off.
        let now = 20_000 + round * 20_000;
        for task in h.occupants("job") {
            if task.slot == 1 {
                ended.insert(task.id.clone());
                ended_in_order.push(task.id.clone());
                h.report(&task.id, TaskState::Failed, now);
            }
        }
        h.settle(now);
    }
    let slot_one: Vec<Task> = h.tasks("job").into_iter().filter(|t| t.slot == 1).collect();
    assert_eq!(
        slot_one.len(),
        3,
        "the occupant and 2 finished tasks: {slot_one:?}"
    );
    let kept: BTreeSet<String> = slot_one
        .iter()
        .filter(|t| t.desired_state > RUNNING)
        .map(|t| t.id.clone())
        .collect();
    assert_eq!(kept.len(), 2);
    assert!(kept.is_subset(&ended));
    // The newest finished tasks (the last two to fail) are the ones kept.
    let newest: BTreeSet<String> = ended_in_order.iter().rev().take(2).cloned().collect();
    assert_eq!(kept, newest);
    assert_eq!(h.tasks("job").iter().filter(|t| t.slot == 2).count(), 1);
}

fn created_ids(transactions: &[Transaction]) -> Vec<String> {
    use crate::proto::objects::{change, store_object};
    transactions
        .iter()
        .flat_map(|txn| &txn.changes)
        .filter_map(|change| match &change.op {
            Some(change::Op::Create(object)) => match &object.object {
                Some(store_object::Object::Task(task)) => Some(task.id.clone()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

#[test]
fn two_passes_on_the_same_view_never_fill_a_slot_twice() {
    let mut h = three_nodes();
    h.add_service("web", ServiceMode::Replicated, 3, template(&["1"]));
    let first = h.store.view(|view| reconcile(view, 1_000));
    let second = h.store.view(|view| reconcile(view, 1_001));
    assert_eq!(created_ids(&first), created_ids(&second));
    assert_eq!(created_ids(&first).len(), 3);
    for txn in first {
        h.index += 1;
        h.store.apply(h.index, &txn).unwrap();
    }
    for txn in second {
        h.index += 1;
        assert!(
            h.store.apply(h.index, &txn).is_err(),
            "the same ids: refused"
        );
    }
    assert_eq!(h.tasks("web").len(), 3);
    // The same after a restart: a pass that misses the replacement recreates the same id.
    let task = h
        .occupants("web")
        .into_iter()
        .find(|t| t.slot == 2)
        .unwrap();
    h.report(&task.id, TaskState::Failed, 2_000);
    let first = h.store.view(|view| reconcile(view, 10_000));
    let second = h.store.view(|view| reconcile(view, 10_000));
    for txn in first.into_iter().chain(second) {
        h.index += 1;
        let _ = h.store.apply(h.index, &txn);
    }
    h.settle(10_000);
    assert_eq!(h.occupants("web").len(), 3);
    assert_eq!(slots(&h.occupants("web")), vec![1, 2, 3]);
}

#[test]
fn large_changes_are_split_into_transactions_within_the_limits() {
    let mut h = three_nodes();
    h.add_service("big", ServiceMode::Replicated, 450, template(&["1"]));
    let transactions = h.store.view(|view| reconcile(view, 1_000));
    assert_eq!(transactions.len(), 3);
    for txn in &transactions {
        crate::store::check_limits(txn).unwrap();
    }
    h.settle(1_000);
    assert_eq!(h.occupants("big").len(), 450);
    let counts = per_node(&h.occupants("big"));
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        vec![150, 150, 150]
    );
}

#[test]
fn a_slot_with_hundreds_of_tasks_is_handled_in_transactions_within_the_limits() {
    let mut h = Harness::new();
    h.add_node("a", &[]);
    h.add_service("web", ServiceMode::Replicated, 1, template(&["1"]));
    // Written by someone else: 250 finished tasks and 250 occupants in slot 1.
    let task = |n: usize, desired: TaskState, state: TaskState| Task {
        id: format!("t{n:04}"),
        service_id: "web".into(),
        slot: 1,
        node_id: "a".into(),
        desired_state: desired as i32,
        status: Some(crate::proto::objects::TaskStatus {
            state: state as i32,
            ..Default::default()
        }),
        spec: Some(template(&["1"])),
        ..Default::default()
    };
    let tasks: Vec<Task> = (0..250)
        .map(|n| task(n, TaskState::Shutdown, TaskState::Failed))
        .chain((250..500).map(|n| task(n, TaskState::Running, TaskState::Assigned)))
        .collect();
    for chunk in tasks.chunks(200) {
        h.apply(chunk.iter().cloned().map(create).collect(), 1);
    }
    let transactions = h.store.view(|view| reconcile(view, 1_000));
    assert!(transactions.len() >= 3);
    for txn in &transactions {
        crate::store::check_limits(txn).unwrap();
    }
    h.settle(1_000);
    assert_eq!(h.occupants("web").len(), 1, "one occupant kept");
    let finished = h
        .tasks("web")
        .into_iter()
        .filter(|t| t.desired_state > RUNNING && state_of(t) == TaskState::Failed as i32)
        .count();
    assert_eq!(finished, 5, "the default retention of finished tasks");
}

/// Sets the room node `id` reports (its agent's `tasks_running_max`).
fn set_room(h: &mut Harness, id: &str, tasks_max: u32) {
    h.change_node(id, 1, |node| {
        node.description = Some(crate::proto::objects::NodeDescription {
            tasks_max,
            ..Default::default()
        });
    });
}

fn message_of(task: &Task) -> String {
    task.status.as_ref().unwrap().message.clone()
}

#[test]
fn a_service_larger_than_the_nodes_runs_what_fits_and_the_rest_waits_with_the_reason() {
    let mut h = Harness::new();
    h.add_node("a", &[]);
    h.add_node("b", &[]);
    set_room(&mut h, "a", 2);
    set_room(&mut h, "b", 3);
    h.add_service("big", ServiceMode::Replicated, 10, template(&["100"]));
    h.settle(1_000);
    let tasks = h.tasks("big");
    assert_eq!(tasks.len(), 10, "every slot has its task");
    let assigned: Vec<Task> = tasks
        .iter()
        .filter(|t| !t.node_id.is_empty())
        .cloned()
        .collect();
    assert_eq!(
        per_node(&assigned),
        BTreeMap::from([("a".into(), 2), ("b".into(), 3)])
    );
    let pending: Vec<&Task> = tasks.iter().filter(|t| t.node_id.is_empty()).collect();
    assert_eq!(pending.len(), 5);
    for task in &pending {
        assert_eq!(state_of(task), TaskState::Pending as i32);
        assert!(
            message_of(task).contains("no node has room")
                && message_of(task).contains("all 2 eligible nodes")
                && message_of(task).contains("2 to 3 each"),
            "{task:?}"
        );
    }
    // A steady state: another pass writes nothing.
    assert_eq!(h.step(2_000), 0);

    // A task that ends frees its room for a waiting one; one being stopped still holds it.
    for task in &assigned {
        h.report(&task.id, TaskState::Running, 2_000);
    }
    let on_a: Vec<&Task> = assigned.iter().filter(|t| t.node_id == "a").collect();
    h.report(&on_a[0].id, TaskState::Complete, 3_000);
    // `restart any` (the default): the finished task waits 5 s before its replacement.
    h.settle(3_000);
    let on_a_now = |h: &Harness| {
        h.tasks("big")
            .into_iter()
            .filter(|t| t.node_id == "a" && state_of(t) < TaskState::Complete as i32)
            .count()
    };
    assert_eq!(on_a_now(&h), 2, "the freed room went to a waiting task");
    assert_eq!(
        h.tasks("big")
            .iter()
            .filter(|t| t.node_id.is_empty())
            .count(),
        4
    );
}

#[test]
fn the_only_full_node_is_named_and_a_task_still_stopping_holds_its_room() {
    let mut h = Harness::new();
    h.add_node("a", &[]);
    set_room(&mut h, "a", 1);
    h.add_service("one", ServiceMode::Replicated, 1, template(&["1"]));
    h.settle(1_000);
    h.run_all("one", 1_000);
    // An update retires the running task (stop-first); it still runs, so the new one waits.
    h.change_service("one", |spec| spec.task = Some(template(&["2"])));
    h.add_service("two", ServiceMode::Replicated, 1, template(&["3"]));
    h.settle(2_000);
    let two = only_occupant(&h, "two");
    assert!(two.node_id.is_empty(), "{two:?}");
    assert!(
        message_of(&two).contains("the only eligible node already runs its maximum of 1 tasks"),
        "{two:?}"
    );
    // A node without a reported maximum takes the agent default.
    assert_eq!(
        super::scheduler::node_room(&Node::default()),
        crate::agent::TASKS_RUNNING_MAX_DEFAULT as u64
    );
}

fn update_config(parallelism: u64, action: UpdateFailureAction, monitor_ms: i64) -> UpdateConfig {
    UpdateConfig {
        parallelism,
        failure_action: action as i32,
        monitor_ms,
        ..Default::default()
    }
}

/// The occupants of `service` running `args`, by slot.
fn slots_running(h: &Harness, service: &str, args: &[&str]) -> Vec<u64> {
    let spec = Some(template(args));
    let mut found: Vec<u64> = h
        .occupants(service)
        .into_iter()
        .filter(|t| t.spec == spec)
        .map(|t| t.slot)
        .collect();
    found.sort_unstable();
    found
}

/// Stop-first: the retired task of `slot` reports stopped at `now_ms`; then a pass makes
/// its replacement, which is returned.
fn replace_slot(h: &mut Harness, service: &str, slot: u64, now_ms: i64) -> Task {
    let retired = h
        .tasks(service)
        .into_iter()
        .find(|t| t.slot == slot && t.desired_state > RUNNING && state_of(t) == RUNNING)
        .expect("the slot's old task was retired");
    h.report(&retired.id, TaskState::Shutdown, now_ms);
    h.settle(now_ms);
    h.occupants(service)
        .into_iter()
        .find(|t| t.slot == slot)
        .expect("the slot was refilled")
}

#[test]
fn a_failing_update_with_rollback_returns_to_the_previous_spec_by_itself() {
    let mut h = Harness::new();
    h.add_node("a", &[]);
    h.add_service("web", ServiceMode::Replicated, 2, template(&["1"]));
    h.update_spec("web", 1, |spec| {
        spec.update = Some(update_config(1, UpdateFailureAction::Rollback, 5_000));
    });
    h.settle(1_000);
    h.run_all("web", 1_000);
    assert_eq!(
        h.update_state("web"),
        UpdateState::Unknown,
        "a new service has no update"
    );
    h.update_spec("web", 2_000, |spec| spec.task = Some(template(&["bad"])));
    h.settle(2_000);
    assert_eq!(h.update_state("web"), UpdateState::Updating);
    assert_eq!(h.service("web").update_status.unwrap().started_at_ms, 2_000);
    let new = replace_slot(&mut h, "web", 1, 2_100);
    // A new leader reads everything from the store: a fresh tracker decides the same.
    h.tracker = Tracker::new();
    h.report(&new.id, TaskState::Failed, 2_300);
    h.settle(2_400);
    let service = h.service("web");
    let status = service.update_status.clone().unwrap();
    assert_eq!(h.update_state("web"), UpdateState::RollbackStarted);
    assert!(
        status.message.contains("update rolled back due to failure")
            && status.message.contains(&new.id),
        "{status:?}"
    );
    assert_eq!(service.spec.unwrap().task, Some(template(&["1"])));
    assert!(service.previous_spec.is_none());
    // The failed task runs the template rolled back from: replaced at once, without
    // waiting out its restart delay.
    assert_eq!(slots_running(&h, "web", &["1"]), [1, 2]);
    h.run_all("web", 2_500);
    h.settle(7_400);
    assert_eq!(
        h.update_state("web"),
        UpdateState::RollbackStarted,
        "monitored 5 s"
    );
    h.settle(7_500);
    assert_eq!(h.update_state("web"), UpdateState::RollbackCompleted);
    assert_eq!(h.settle(20_000), 0);
}

#[test]
fn a_failing_update_pauses_with_a_message_and_resumes_with_the_next_update() {
    let mut h = Harness::new();
    h.add_node("a", &[]);
    h.add_service("web", ServiceMode::Replicated, 3, template(&["1"]));
    h.settle(1_000);
    h.run_all("web", 1_000);
    // No update config: docker's defaults (one at a time, pause, 5 s monitor).
    h.update_spec("web", 2_000, |spec| spec.task = Some(template(&["bad"])));
    h.settle(2_000);
    let new = replace_slot(&mut h, "web", 1, 2_100);
    h.report(&new.id, TaskState::Failed, 2_200);
    h.settle(2_300);
    assert_eq!(h.update_state("web"), UpdateState::Paused);
    let message = h.service("web").update_status.unwrap().message;
    assert!(
        message.starts_with("update paused due to failure or early termination of task")
            && message.contains(&new.id),
        "{message}"
    );
    // Paused: the failed slot keeps restarting, no other slot is touched.
    for now_ms in [10_000, 30_000, 60_000] {
        h.settle(now_ms);
        assert_eq!(slots_running(&h, "web", &["1"]), [2, 3]);
        assert_eq!(h.update_state("web"), UpdateState::Paused);
    }
    // The next `service update` (here the same spec) resumes it.
    h.update_spec("web", 61_000, |_| {});
    h.run_all("web", 61_000);
    h.settle(61_000);
    assert_eq!(h.update_state("web"), UpdateState::Updating);
    let retired: Vec<u64> = h
        .tasks("web")
        .into_iter()
        .filter(|t| t.desired_state > RUNNING && state_of(t) == RUNNING)
        .map(|t| t.slot)
        .collect();
    assert_eq!(retired, [2], "the next slot, alone");
}

#[test]
fn batches_of_the_parallelism_wait_the_delay_and_the_update_completes_after_watching() {
    let mut h = Harness::new();
    h.add_node("a", &[]);
    h.add_service("web", ServiceMode::Replicated, 4, template(&["1"]));
    h.update_spec("web", 1, |spec| {
        spec.update = Some(UpdateConfig {
            delay_ms: 10_000,
            ..update_config(2, UpdateFailureAction::Pause, 1_000)
        });
    });
    h.settle(1_000);
    h.run_all("web", 1_000);
    h.update_spec("web", 2_000, |spec| spec.task = Some(template(&["2"])));
    h.settle(2_000);
    let first: Vec<Task> = [1, 2]
        .into_iter()
        .map(|slot| replace_slot(&mut h, "web", slot, 2_500))
        .collect();
    for task in &first {
        h.report(&task.id, TaskState::Running, 3_000);
    }
    h.settle(3_000);
    h.settle(12_999);
    assert_eq!(
        slots_running(&h, "web", &["1"]),
        [3, 4],
        "the delay holds slots 3, 4"
    );
    assert!(
        h.tasks("web")
            .iter()
            .all(|t| t.desired_state <= RUNNING || t.slot <= 2)
    );
    h.settle(13_000);
    let second: Vec<Task> = [3, 4]
        .into_iter()
        .map(|slot| replace_slot(&mut h, "web", slot, 13_500))
        .collect();
    for task in &second {
        h.report(&task.id, TaskState::Running, 14_000);
    }
    assert_eq!(slots_running(&h, "web", &["2"]), [1, 2, 3, 4]);
    // The delay is longer than the monitor: watched for the delay and a second.
    h.settle(24_999);
    assert_eq!(h.update_state("web"), UpdateState::Updating);
    h.settle(25_000);
    assert_eq!(h.update_state("web"), UpdateState::Completed);
}

#[test]
fn a_requested_rollback_follows_the_rollback_settings() {
    let mut h = Harness::new();
    h.add_node("a", &[]);
    h.add_service("web", ServiceMode::Replicated, 3, template(&["1"]));
    h.update_spec("web", 1, |spec| {
        spec.update = Some(update_config(1, UpdateFailureAction::Pause, 0));
        spec.rollback = Some(update_config(0, UpdateFailureAction::Pause, 0));
    });
    h.settle(1_000);
    h.run_all("web", 1_000);
    h.update_spec("web", 2_000, |spec| spec.task = Some(template(&["2"])));
    h.settle(2_000);
    let new = replace_slot(&mut h, "web", 1, 2_100);
    h.report(&new.id, TaskState::Running, 2_200);
    h.settle(2_200);
    // `service rollback` as the control API writes it.
    let mut service = h.service("web");
    let current = service.spec.take();
    service.spec = service.previous_spec.take();
    service.previous_spec = current;
    service.update_status = Some(UpdateStatus {
        state: UpdateState::RollbackStarted as i32,
        started_at_ms: 3_000,
        completed_at_ms: 0,
        message: "manually requested rollback".into(),
    });
    h.apply(vec![update(service)], 3_000);
    h.settle(3_000);
    // Slot 2 was being updated (stop-first); slot 1 runs the new spec: the rollback
    // (parallelism 0: all at once) retires it, slot 2's new task was never created.
    let retired: Vec<u64> = h
        .tasks("web")
        .into_iter()
        .filter(|t| t.desired_state > RUNNING && state_of(t) == RUNNING)
        .map(|t| t.slot)
        .collect();
    assert!(retired.contains(&1), "{retired:?}");
    for slot in retired {
        let task = replace_slot(&mut h, "web", slot, 3_500);
        h.report(&task.id, TaskState::Running, 4_000);
    }
    h.settle(4_000);
    assert_eq!(slots_running(&h, "web", &["1"]), [1, 2, 3]);
    assert_eq!(h.update_state("web"), UpdateState::RollbackCompleted);
}
