//! The working set of one reconcile pass: every task as read, plus the changes the pass has
//! decided so far, so that later steps (the scheduler, the reaper) see the earlier ones.
//!
//! Owns the bookkeeping from "decided" to store [`Change`]s: a new task is one create (with
//! whatever the scheduler added), a changed task is one update carrying the version it was
//! read at, a deleted task one delete with that version; a service whose update state the
//! supervisor changed is one update carrying the version it was read at. Must never read the store again
//! after [`Working::load`]: a pass decides on one consistent view.
//!
//! Tasks are named by their position in the set ([`TaskIx`]), given once when a task is
//! read or created: the steps of a pass pass these integers around and index a `Vec`,
//! instead of hashing a task id string at every look-up (a pass over 100,000 tasks made
//! millions of those, a quarter of its time).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::proto::objects::{Change, Service, Task, TaskState};
use crate::store::{Kind, create, delete, update_expecting};

/// A task's position in the working set: stable for the whole pass (a deleted task keeps
/// its position, marked deleted).
pub(super) type TaskIx = usize;

/// The hasher of the pass's maps: seeded per process (ids come from the cluster, not from
/// the pass) and several times faster than the standard one on short ids.
pub(super) type FastHash = foldhash::fast::RandomState;

/// One task and what the pass did to it.
#[derive(Debug)]
struct Entry {
    /// Shared with the store until the pass changes it (copy on write).
    task: Arc<Task>,
    /// The version it was read at; 0 for a task this pass creates.
    read_version: u64,
    changed: bool,
    deleted: bool,
}

/// Every task of the view, with this pass's decisions applied.
#[derive(Debug, Default)]
pub(super) struct Working {
    /// In the store's id order, then in creation order (deterministic).
    entries: Vec<Entry>,
    /// Task id → its position: only to know whether a derived id already exists.
    index: HashMap<String, TaskIx, FastHash>,
    /// Service id → its tasks (created ones included), in order of loading.
    by_service: HashMap<String, Vec<TaskIx>, FastHash>,
    /// Service id → the earliest time its reconcile changes by the clock alone.
    wakeups_ms: BTreeMap<String, i64>,
    /// Services whose update state (or, rolled back, spec) the pass changed, with the
    /// version each was read at.
    services: Vec<(Service, u64)>,
}

/// The store's changes for one slot: kept in one transaction so that a slot is never left
/// half-changed (a replacement without its predecessor's retirement) by a split batch.
pub(super) type Unit = Vec<Change>;

impl Working {
    /// The working set of `tasks`, as read from the store.
    pub(super) fn from_tasks<'a>(tasks: impl ExactSizeIterator<Item = &'a Arc<Task>>) -> Self {
        let mut working = Self {
            entries: Vec::with_capacity(tasks.len()),
            index: HashMap::with_capacity_and_hasher(tasks.len(), FastHash::default()),
            ..Self::default()
        };
        for task in tasks {
            let version = task_version(task);
            working.insert(Arc::clone(task), version);
        }
        working
    }

    fn insert(&mut self, task: Arc<Task>, read_version: u64) -> TaskIx {
        let position = self.entries.len();
        match self.by_service.get_mut(task.service_id.as_str()) {
            Some(tasks) => tasks.push(position),
            None => {
                self.by_service
                    .insert(task.service_id.clone(), vec![position]);
            }
        }
        let previous = self.index.insert(task.id.clone(), position);
        assert!(previous.is_none(), "task ids are unique in the working set");
        self.entries.push(Entry {
            changed: read_version == 0,
            task,
            read_version,
            deleted: false,
        });
        position
    }

    /// The task at `ix` unless deleted.
    pub(super) fn get(&self, ix: TaskIx) -> Option<&Task> {
        self.get_shared(ix).map(AsRef::as_ref)
    }

    /// The task at `ix` unless deleted, shared.
    pub(super) fn get_shared(&self, ix: TaskIx) -> Option<&Arc<Task>> {
        let entry = &self.entries[ix];
        (!entry.deleted).then_some(&entry.task)
    }

    /// True if a task `id` exists (deleted ones too: an id is never reused in a pass).
    pub(super) fn contains(&self, id: &str) -> bool {
        self.index.contains_key(id)
    }

    /// Ids of the services that have tasks, in id order.
    pub(super) fn service_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.by_service.keys().cloned().collect();
        ids.sort_unstable();
        ids
    }

    /// The tasks of `service_id`, deleted ones included (see [`Self::get`]).
    pub(super) fn tasks_of_service(&self, service_id: &str) -> &[TaskIx] {
        self.by_service.get(service_id).map_or(&[], Vec::as_slice)
    }

    /// Adds a task this pass creates.
    pub(super) fn create(&mut self, task: Task) -> TaskIx {
        assert!(!self.contains(&task.id), "a new task id is fresh");
        self.insert(Arc::new(task), 0)
    }

    /// Changes task `ix` with `change`; writes only if it actually changed something.
    pub(super) fn modify(&mut self, ix: TaskIx, change: impl FnOnce(&mut Task)) {
        let entry = &mut self.entries[ix];
        assert!(!entry.deleted, "a deleted task is never modified");
        if entry.changed {
            // Written anyway: change it in place (a copy only if a step still holds it).
            change(Arc::make_mut(&mut entry.task));
            return;
        }
        let mut task = entry.task.as_ref().clone();
        change(&mut task);
        if task != *entry.task {
            entry.task = Arc::new(task);
            entry.changed = true;
        }
    }

    /// Raises the desired state of `ix` to `state` (a desired state never goes down).
    pub(super) fn retire(&mut self, ix: TaskIx, state: TaskState) {
        let Some(task) = self.get(ix) else {
            return;
        };
        if task.desired_state >= state as i32 {
            // Nothing to raise: spare the copy `modify` makes.
            return;
        }
        self.modify(ix, |task| task.desired_state = state as i32);
    }

    /// Notes that `service_id` needs another pass at `at_ms` even if nothing changes.
    pub(super) fn wake_at(&mut self, service_id: &str, at_ms: i64) {
        let earliest = self
            .wakeups_ms
            .entry(service_id.to_string())
            .or_insert(at_ms);
        *earliest = (*earliest).min(at_ms);
    }

    /// The wake-up times noted so far, taken out.
    pub(super) fn take_wakeups(&mut self) -> BTreeMap<String, i64> {
        std::mem::take(&mut self.wakeups_ms)
    }

    /// Replaces service `service` (its update state, or its spec on a rollback), read at
    /// `read_version`: the write is refused if the service changed meanwhile.
    pub(super) fn write_service(&mut self, service: Service, read_version: u64) {
        assert!(
            !self.services.iter().any(|(s, _)| s.id == service.id),
            "a pass writes a service once"
        );
        self.services.push((service, read_version));
    }

    /// Deletes task `ix` (the reaper).
    pub(super) fn delete(&mut self, ix: TaskIx) {
        let entry = &mut self.entries[ix];
        assert!(
            entry.read_version != 0,
            "a task created by this pass is never reaped by it"
        );
        entry.deleted = true;
    }

    /// The decided changes: the services' first, each alone (a rolled-back spec is
    /// committed before any task made from it, so a refused service write stops the pass);
    /// a slot's creates and updates together (service, slot, and node for global tasks),
    /// in that key's order; each delete alone (deleting history needs no company, and a
    /// slot may have up to `task_history_retention` of them at once).
    pub(super) fn into_units(self) -> Vec<Unit> {
        let services: Vec<Unit> = self
            .services
            .iter()
            .map(|(service, read_version)| vec![update_expecting(service.clone(), *read_version)])
            .collect();
        let mut written: Vec<TaskIx> = Vec::new();
        let mut deletes: Vec<Unit> = Vec::new();
        for (ix, entry) in self.entries.iter().enumerate() {
            if entry.deleted {
                let id = entry.task.id.clone();
                deletes.push(vec![delete(Kind::Task, id, entry.read_version)]);
            } else if entry.changed {
                written.push(ix);
            }
        }
        let unit_key = |ix: &TaskIx| {
            let task = &self.entries[*ix].task;
            let node_key = if task.slot == 0 {
                task.node_id.as_str()
            } else {
                ""
            };
            (task.service_id.as_str(), task.slot, node_key)
        };
        // Stable: a unit keeps its changes in the order of the working set.
        written.sort_by(|a, b| unit_key(a).cmp(&unit_key(b)));
        let mut units: Vec<Unit> = Vec::new();
        let mut last_key = None;
        for &ix in &written {
            let key = unit_key(&ix);
            if last_key != Some(key) || units.is_empty() {
                units.push(Unit::new());
                last_key = Some(key);
            }
            let entry = &self.entries[ix];
            let task = entry.task.as_ref().clone();
            let change = if entry.read_version == 0 {
                create(task)
            } else {
                update_expecting(task, entry.read_version)
            };
            units
                .last_mut()
                .expect("a unit was pushed above")
                .push(change);
        }
        services.into_iter().chain(units).chain(deletes).collect()
    }
}

fn task_version(task: &Task) -> u64 {
    let version = task.meta.as_ref().map_or(0, |meta| meta.version);
    assert!(version > 0, "a stored task has a version");
    version
}
