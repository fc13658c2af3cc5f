//! One slot of one service: a replica number (replicated) or a node (global), with its
//! occupant (the task wanted running) and its history (retired tasks).
//!
//! In order: occupants on lost nodes are retired; a finished occupant goes to the
//! [`restart`](super::restart) rule; several occupants (a start-first update, or a race)
//! are cut down to one; an occupant of an older template is replaced within the service's
//! update budget (stop-first: retired, and the slot refilled once the old task has stopped;
//! start-first: the new one created beside it, the old one retired once the new one runs);
//! an empty slot is filled.
//!
//! The [`update`](super::update) supervisor decides how many slots may start their update
//! (the budget) and in which order; the delay, monitoring, failure actions and rollback are
//! its own.
//!
//! An occupant whose node no longer satisfies the task's placement constraints is retired
//! like one on a lost node (swarmkit's constraint enforcer), so a label change moves it.
//!
//! Must never leave two occupants in a slot except during a start-first replacement.

use std::sync::Arc;

use crate::proto::objects::{
    Service, Task, TaskSpec, TaskState, TaskStatus, UpdateConfig, UpdateOrder,
};

use crate::store::spec::matches_all;

use super::global::constraints_of;
use super::restart::{self, Decision};
use super::working::{TaskIx, Working};
use super::{Context, age_key, derive_task_id, is_occupant, is_terminal, node_lost, observed};

/// Which slot, and whether it may get a new task.
pub(super) struct SlotRef<'a> {
    /// The service.
    pub service: &'a Service,
    /// The replica number; 0 for a global service.
    pub slot: u64,
    /// The node of a global service's slot.
    pub node_id: Option<&'a str>,
    /// False when the slot may keep its tasks but take no new one (a paused node, say).
    pub may_create: bool,
}

impl SlotRef<'_> {
    fn key(&self) -> String {
        match self.node_id {
            Some(node_id) => format!("node:{node_id}"),
            None => format!("slot:{}", self.slot),
        }
    }
}

/// How many more slots of a service may start replacing an old-template task this pass,
/// and in which order (set by the [`update`](super::update) supervisor).
pub(super) struct UpdateBudget {
    /// `None`: no limit.
    remaining: Option<u64>,
    order: UpdateOrder,
}

impl UpdateBudget {
    /// The budget under `config`, given the slots already in flight.
    pub(super) fn new(config: &UpdateConfig, in_flight: u64) -> Self {
        let parallelism = config.parallelism;
        Self {
            remaining: (parallelism > 0).then(|| parallelism.saturating_sub(in_flight)),
            order: UpdateOrder::try_from(config.order).unwrap_or(UpdateOrder::StopFirst),
        }
    }

    /// No slot may start (the update is paused, waits for its delay, or there is none).
    pub(super) fn none() -> Self {
        Self {
            remaining: Some(0),
            order: UpdateOrder::StopFirst,
        }
    }

    fn take(&mut self) -> bool {
        match &mut self.remaining {
            None => true,
            Some(0) => false,
            Some(remaining) => {
                *remaining -= 1;
                true
            }
        }
    }
}

/// The task template of `service`.
pub(super) fn template(service: &Service) -> Option<&TaskSpec> {
    service.spec.as_ref().and_then(|spec| spec.task.as_ref())
}

pub(super) fn is_current(task: &Task, service: &Service) -> bool {
    // A task made at the service's current version carries that version's template (tasks
    // are created from it and their spec never changes): no need to compare the specs.
    let version = service_version(service);
    (version > 0 && task.service_version == version) || task.spec.as_ref() == template(service)
}

fn tasks<'w>(working: &'w Working, ids: &[TaskIx]) -> impl Iterator<Item = &'w Task> {
    ids.iter().filter_map(|ix| working.get(*ix))
}

/// The slot's occupants, with their positions (shared: the caller changes the set).
fn occupants(working: &Working, ids: &[TaskIx]) -> Vec<(TaskIx, Arc<Task>)> {
    ids.iter()
        .filter_map(|ix| working.get_shared(*ix).map(|task| (*ix, task)))
        .filter(|(_, task)| is_occupant(task))
        .map(|(ix, task)| (ix, Arc::clone(task)))
        .collect()
}

/// Reconciles one slot whose tasks (occupants and history) are `ids`.
pub(super) fn reconcile(
    working: &mut Working,
    context: &Context,
    slot: &SlotRef<'_>,
    ids: &[TaskIx],
    budget: &mut UpdateBudget,
) {
    retire_on_lost_nodes(working, context, ids);
    if restart_finished(working, context, slot.service, ids) == Decision::Wait {
        return;
    }
    if !keep_one_occupant(working, slot.service, ids) {
        return;
    }
    update_old_occupant(working, context, slot, ids, budget);
    fill(working, context, slot, ids);
}

/// Retires the occupants on lost nodes, and (swarmkit's constraint enforcer) those whose
/// node no longer satisfies their placement constraints: its labels changed, or its role.
/// A replicated slot is then refilled on a node that does; a global slot is retired by
/// [`super::global`] before it gets here.
fn retire_on_lost_nodes(working: &mut Working, context: &Context, ids: &[TaskIx]) {
    for (ix, task) in occupants(working, ids) {
        if task.node_id.is_empty() {
            continue;
        }
        if node_lost(context, &task.node_id).is_some() || !constraints_hold(context, &task) {
            working.retire(ix, TaskState::Shutdown);
        }
    }
}

/// True if `task`'s node satisfies its placement constraints (or they do not parse: a store
/// written by something else; the task is left alone rather than moved in a loop).
fn constraints_hold(context: &Context, task: &Task) -> bool {
    let has_constraints = task
        .spec
        .as_ref()
        .and_then(|spec| spec.placement.as_ref())
        .is_some_and(|placement| !placement.constraints.is_empty());
    if !has_constraints {
        return true;
    }
    let Some(node) = context.node(&task.node_id) else {
        return true;
    };
    constraints_of(task.spec.as_ref()).is_none_or(|constraints| matches_all(&constraints, node))
}

/// Applies the restart rule to every finished occupant; `Wait` if one waits for its delay.
/// A finished occupant of an older template is retired at once: its replacement runs the
/// current template, so there is no restart to delay (an update, or a rollback from a
/// failed update, replaces it without waiting out the backoff of its failures).
fn restart_finished(
    working: &mut Working,
    context: &Context,
    service: &Service,
    ids: &[TaskIx],
) -> Decision {
    let mut outcome = Decision::Keep;
    for (ix, task) in occupants(working, ids) {
        if !is_terminal(observed(&task)) {
            continue;
        }
        if !is_current(&task, service) {
            working.retire(ix, TaskState::Shutdown);
            continue;
        }
        let history: Vec<&Task> = tasks(working, ids)
            .filter(|other| other.id != task.id)
            .collect();
        let (decision, changes_at_ms) = restart::decide(&task, &history, context.now_ms);
        if let Some(at_ms) = changes_at_ms {
            working.wake_at(&task.service_id, at_ms);
        }
        match decision {
            Decision::Keep => {}
            Decision::Wait => outcome = Decision::Wait,
            Decision::Restart => working.retire(ix, TaskState::Shutdown),
        }
    }
    outcome
}

/// Cuts several occupants down to one. False while a start-first replacement has not started
/// running yet (both stay).
fn keep_one_occupant(working: &mut Working, service: &Service, ids: &[TaskIx]) -> bool {
    let occupants = occupants(working, ids);
    if occupants.len() <= 1 {
        return true;
    }
    let (positions, occupants): (Vec<TaskIx>, Vec<Arc<Task>>) = occupants.into_iter().unzip();
    let running = |task: &Task| observed(task) == TaskState::Running as i32;
    let new_running = occupants
        .iter()
        .any(|task| is_current(task, service) && running(task));
    let old_and_new = occupants.iter().any(|task| is_current(task, service))
        && occupants.iter().any(|task| !is_current(task, service));
    if old_and_new && !new_running {
        return false;
    }
    let keep = positions
        .iter()
        .zip(&occupants)
        .max_by_key(|(_, task)| {
            (
                is_current(task, service),
                running(task),
                !is_terminal(observed(task)),
                age_key(task),
            )
        })
        .map(|(ix, _)| *ix)
        .expect("there are several occupants");
    for ix in positions.into_iter().filter(|ix| *ix != keep) {
        working.retire(ix, TaskState::Shutdown);
    }
    true
}

fn update_old_occupant(
    working: &mut Working,
    context: &Context,
    slot: &SlotRef<'_>,
    ids: &[TaskIx],
    budget: &mut UpdateBudget,
) {
    let occupants = occupants(working, ids);
    let [(ix, occupant)] = occupants.as_slice() else {
        return;
    };
    if is_current(occupant, slot.service) || !slot.may_create || !budget.take() {
        return;
    }
    if budget.order == UpdateOrder::StartFirst && !is_terminal(observed(occupant)) {
        create_task(working, context, slot, &occupant.id, 0);
    } else {
        working.retire(*ix, TaskState::Shutdown);
    }
}

/// Gives an empty slot a new task, unless an old-template task retired by a stop-first
/// update is still stopping on a live node.
fn fill(working: &mut Working, context: &Context, slot: &SlotRef<'_>, ids: &[TaskIx]) {
    if !slot.may_create || tasks(working, ids).any(is_occupant) {
        return;
    }
    let all: Vec<&Task> = tasks(working, ids).collect();
    let old_stopping = all.iter().any(|task| {
        !is_current(task, slot.service)
            && observed(task) >= TaskState::Assigned as i32
            && !is_terminal(observed(task))
            && node_lost(context, &task.node_id).is_none()
    });
    if old_stopping {
        return;
    }
    let newest = all.iter().max_by_key(|task| age_key(task));
    let streak = newest.map_or(0, |task| restart::quick_end_streak(task));
    let predecessor = newest.map_or_else(
        || format!("v{}", service_version(slot.service)),
        |task| task.id.clone(),
    );
    create_task(working, context, slot, &predecessor, streak);
}

fn service_version(service: &Service) -> u64 {
    service.meta.as_ref().map_or(0, |meta| meta.version)
}

/// Creates the task that follows `predecessor` (a task id, or the service version) in the
/// slot, after `quick_end_streak` quick ends in a row (its restart backoff): global tasks
/// are created on their node, replicated ones wait for the scheduler.
fn create_task(
    working: &mut Working,
    context: &Context,
    slot: &SlotRef<'_>,
    predecessor: &str,
    quick_end_streak: u32,
) {
    let id = derive_task_id(&slot.service.id, &slot.key(), predecessor);
    if working.contains(&id) {
        // Only a store that already holds this successor gets here: nothing to add.
        return;
    }
    let (state, message) = match slot.node_id {
        Some(node_id) => (
            TaskState::Assigned,
            format!("assigned to node {node_id} (global service)"),
        ),
        None => (TaskState::Pending, "waiting for a node".to_string()),
    };
    working.create(Task {
        id,
        meta: None,
        service_id: slot.service.id.clone(),
        slot: slot.slot,
        node_id: slot.node_id.unwrap_or_default().to_string(),
        desired_state: TaskState::Running as i32,
        status: Some(TaskStatus {
            state: state as i32,
            message,
            timestamp_ms: context.now_ms,
            ..Default::default()
        }),
        spec: template(slot.service).cloned(),
        service_version: service_version(slot.service),
        quick_end_streak,
    });
}
