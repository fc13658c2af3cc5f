//! The scheduler's reservations and spreading, and the constraint enforcer, on the
//! orchestrator's test harness (every pass checked against the event-driven one).

use crate::proto::objects::{
    NodeDescription, Placement, PlacementPreference, ResourceRequirements, Resources,
};

use super::*;

/// Memory, in MiB.
const MIB: i64 = 1 << 20;

/// Gives node `id` `cpus` CPUs and `memory_mib` MiB, as its agent reports them.
fn describe(h: &mut Harness, id: &str, cpus: i64, memory_mib: i64) {
    h.change_node(id, 1, |node| {
        node.description = Some(NodeDescription {
            resources: Some(Resources {
                nano_cpus: cpus * 1_000_000_000,
                memory_bytes: memory_mib * MIB,
            }),
            ..Default::default()
        });
    });
}

fn reserving(nano_cpus: i64, memory_mib: i64) -> TaskSpec {
    TaskSpec {
        resources: Some(ResourceRequirements {
            reservations: Some(Resources {
                nano_cpus,
                memory_bytes: memory_mib * MIB,
            }),
            limits: None,
        }),
        ..template(&["100"])
    }
}

fn pending_reason(task: &Task) -> &str {
    assert_eq!(state_of(task), TaskState::Pending as i32, "{task:?}");
    &task.status.as_ref().unwrap().message
}

#[test]
fn reservations_fill_a_node_and_the_rest_waits_with_the_reason() {
    let mut h = Harness::new();
    h.add_node("a", &[]);
    h.add_node("b", &[]);
    describe(&mut h, "a", 2, 1024);
    describe(&mut h, "b", 2, 512);
    // 400 MiB each: a holds two, b one; the fourth fits nowhere.
    h.add_service("big", ServiceMode::Replicated, 4, reserving(0, 400));
    h.settle(1_000);
    let occupants = h.occupants("big");
    let placed = per_node(&occupants);
    assert_eq!(placed.get("a"), Some(&2), "{placed:?}");
    assert_eq!(placed.get("b"), Some(&1), "{placed:?}");
    let waiting: Vec<&Task> = occupants.iter().filter(|t| t.node_id.is_empty()).collect();
    assert_eq!(waiting.len(), 1);
    let reason = pending_reason(waiting[0]);
    assert!(
        reason.starts_with("no suitable node (insufficient resources on 2 nodes)"),
        "{reason}"
    );
    assert!(reason.contains("reserves 400 MiB of memory"), "{reason}");
    assert_eq!(
        h.settle(1_100),
        0,
        "an unschedulable task costs no write per pass"
    );

    // CPU counts too: a task reserving 3 CPUs fits neither 2-CPU node.
    h.add_service(
        "cpu",
        ServiceMode::Replicated,
        1,
        reserving(3_000_000_000, 0),
    );
    h.settle(1_200);
    let reason = pending_reason(&h.occupants("cpu")[0]).to_string();
    assert!(reason.contains("reserves 3 CPUs"), "{reason}");

    // A finished task frees its reservation: the waiting one is placed on its node.
    let on_b = occupants.iter().find(|t| t.node_id == "b").unwrap();
    let waiting_id = waiting[0].id.clone();
    h.report(&on_b.id, TaskState::Running, 1_300);
    h.report(&on_b.id, TaskState::Failed, 1_400);
    h.settle(1_400);
    let placed = h.store.get::<Task>(&waiting_id).unwrap();
    assert_eq!(placed.node_id, "b");
    assert_eq!(state_of(&placed), TaskState::Assigned as i32);

    // A node without reported resources holds no reservation, but takes other tasks.
    h.add_node("c", &[]);
    h.add_service("small", ServiceMode::Replicated, 1, template(&["1"]));
    h.add_service("res", ServiceMode::Replicated, 1, reserving(0, 1));
    h.settle(1_500);
    assert!(h.occupants("res").iter().all(|t| t.node_id != "c"));
}

fn spread(labels: &[&str]) -> TaskSpec {
    TaskSpec {
        placement: Some(Placement {
            constraints: Vec::new(),
            preferences: labels
                .iter()
                .map(|label| PlacementPreference {
                    spread_descriptor: format!("node.labels.{label}"),
                })
                .collect(),
        }),
        ..template(&["100"])
    }
}

#[test]
fn tasks_spread_evenly_over_label_values_nested_and_unlabelled_nodes_group() {
    let mut h = Harness::new();
    // Zone x has three nodes, zone y one, and one node has no zone: spreading by zone
    // gives each of the three groups a third, not each node a fifth.
    for id in ["x1", "x2", "x3"] {
        h.add_node(id, &[("zone", "x"), ("rack", id)]);
    }
    h.add_node("y1", &[("zone", "y"), ("rack", "r1")]);
    h.add_node("none", &[]);
    h.add_service("web", ServiceMode::Replicated, 6, spread(&["zone"]));
    h.settle(1_000);
    let placed = per_node(&h.occupants("web"));
    let zone_x: usize = ["x1", "x2", "x3"]
        .iter()
        .map(|id| placed.get(*id).copied().unwrap_or(0))
        .sum();
    assert_eq!(zone_x, 2, "{placed:?}");
    assert_eq!(placed.get("y1"), Some(&2), "{placed:?}");
    assert_eq!(placed.get("none"), Some(&2), "{placed:?}");

    // Nested: zone, then rack. 3 more tasks in zone x's share go to distinct racks.
    h.add_service(
        "nested",
        ServiceMode::Replicated,
        9,
        spread(&["zone", "rack"]),
    );
    h.settle(2_000);
    let placed = per_node(&h.occupants("nested"));
    for id in ["x1", "x2", "x3"] {
        assert_eq!(placed.get(id), Some(&1), "{placed:?}");
    }
    assert_eq!(placed.get("y1"), Some(&3), "{placed:?}");
    assert_eq!(placed.get("none"), Some(&3), "{placed:?}");

    // A spread that also reserves: a full group is skipped, the others take the tasks.
    describe(&mut h, "y1", 1, 100);
    for id in ["x1", "x2", "x3", "none"] {
        describe(&mut h, id, 1, 1000);
    }
    let mut spec = spread(&["zone"]);
    spec.resources = reserving(0, 200).resources;
    h.add_service("heavy", ServiceMode::Replicated, 3, spec);
    h.settle(3_000);
    let placed = per_node(&h.occupants("heavy"));
    assert_eq!(placed.get("y1"), None, "{placed:?}");
    assert_eq!(placed.values().sum::<usize>(), 3, "{placed:?}");
}

#[test]
fn a_label_change_moves_the_tasks_whose_constraints_no_longer_hold() {
    let mut h = Harness::new();
    h.add_node("a", &[("zone", "x")]);
    h.add_node("b", &[("zone", "y")]);
    let mut spec = template(&["100"]);
    spec.placement = Some(Placement {
        constraints: vec!["node.labels.zone==x".into()],
        ..Default::default()
    });
    h.add_service("zoned", ServiceMode::Replicated, 1, spec);
    h.add_service("free", ServiceMode::Replicated, 2, template(&["100"]));
    h.settle(1_000);
    h.run_all("zoned", 1_000);
    h.run_all("free", 1_000);
    let before = h.occupants("zoned");
    assert_eq!(before[0].node_id, "a");

    // The labels swap: the zoned task is shut down on a and its replacement goes to b;
    // the unconstrained tasks stay where they are.
    let set_zone = |zone: &str| {
        let zone = zone.to_string();
        move |node: &mut Node| {
            node.spec
                .as_mut()
                .unwrap()
                .labels
                .insert("zone".into(), zone);
        }
    };
    h.change_node("a", 2_000, set_zone("y"));
    h.change_node("b", 2_000, set_zone("x"));
    h.settle(2_000);
    let old = h.store.get::<Task>(&before[0].id).unwrap();
    assert_eq!(old.desired_state, TaskState::Shutdown as i32);
    let now = h.occupants("zoned");
    assert_eq!(now.len(), 1);
    assert_eq!(now[0].node_id, "b");
    assert_eq!(
        h.occupants("free")
            .iter()
            .filter(|t| t.desired_state == RUNNING)
            .count(),
        2
    );
    assert!(h.tasks("free").iter().all(|t| t.desired_state == RUNNING));

    // No node satisfies it any more: the task is shut down and its successor waits.
    h.change_node("b", 3_000, set_zone("z"));
    h.settle(3_000);
    let waiting = h.occupants("zoned");
    assert_eq!(waiting.len(), 1);
    assert!(waiting[0].node_id.is_empty());
    assert!(
        pending_reason(&waiting[0]).contains("node.labels.zone==x"),
        "{waiting:?}"
    );
}
