//! The working set of one reconcile pass: every task as read, plus the changes the pass has
//! decided so far, so that later steps (the scheduler, the reaper) see the earlier ones.
//!
//! Owns the bookkeeping from "decided" to store [`Change`]s: a new task is one create (with
//! whatever the scheduler added), a changed task is one update carrying the version it was
//! read at, a deleted task one delete with that version. Must never read the store again
//! after [`Working::load`]: a pass decides on one consistent view.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::proto::objects::{Change, Task, TaskState};
use crate::store::{Kind, create, delete, update_expecting};

/// One task and what the pass did to it.
#[derive(Debug)]
struct Entry {
    id: String,
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
    /// Task id → position in `entries` (a hash lookup: a pass makes several per task).
    index: HashMap<String, usize>,
    /// Service id → ids of its tasks (created ones included), in id order of loading.
    by_service: BTreeMap<String, Vec<String>>,
    /// Service id → the earliest time its reconcile changes by the clock alone.
    wakeups_ms: BTreeMap<String, i64>,
}

/// The store's changes for one slot: kept in one transaction so that a slot is never left
/// half-changed (a replacement without its predecessor's retirement) by a split batch.
pub(super) type Unit = Vec<Change>;

impl Working {
    /// The working set of `tasks`, as read from the store.
    pub(super) fn from_tasks(tasks: impl IntoIterator<Item = Arc<Task>>) -> Self {
        let mut working = Self::default();
        for task in tasks {
            let version = task_version(&task);
            working.insert(task, version);
        }
        working
    }

    fn insert(&mut self, task: Arc<Task>, read_version: u64) {
        let id = task.id.clone();
        self.by_service
            .entry(task.service_id.clone())
            .or_default()
            .push(id.clone());
        let previous = self.index.insert(id.clone(), self.entries.len());
        assert!(previous.is_none(), "task ids are unique in the working set");
        self.entries.push(Entry {
            id,
            changed: read_version == 0,
            task,
            read_version,
            deleted: false,
        });
    }

    /// The task `id` unless deleted.
    pub(super) fn get(&self, id: &str) -> Option<&Task> {
        self.get_shared(id).map(AsRef::as_ref)
    }

    /// The task `id` unless deleted, shared.
    pub(super) fn get_shared(&self, id: &str) -> Option<&Arc<Task>> {
        self.index
            .get(id)
            .map(|position| &self.entries[*position])
            .filter(|entry| !entry.deleted)
            .map(|entry| &entry.task)
    }

    /// True if a task `id` exists (deleted ones too: an id is never reused in a pass).
    pub(super) fn contains(&self, id: &str) -> bool {
        self.index.contains_key(id)
    }

    /// Ids of every live task.
    pub(super) fn ids(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter(|entry| !entry.deleted)
            .map(|entry| entry.id.clone())
            .collect()
    }

    /// Ids of the service ids that have tasks.
    pub(super) fn service_ids(&self) -> Vec<String> {
        self.by_service.keys().cloned().collect()
    }

    /// The live tasks of `service_id`.
    pub(super) fn tasks_of_service(&self, service_id: &str) -> Vec<&Task> {
        self.by_service
            .get(service_id)
            .into_iter()
            .flatten()
            .filter_map(|id| self.get(id))
            .collect()
    }

    fn entry_mut(&mut self, id: &str) -> &mut Entry {
        let position = *self
            .index
            .get(id)
            .expect("only tasks of the working set are changed");
        &mut self.entries[position]
    }

    /// Adds a task this pass creates.
    pub(super) fn create(&mut self, task: Task) {
        assert!(!self.contains(&task.id), "a new task id is fresh");
        self.insert(Arc::new(task), 0);
    }

    /// Changes task `id` with `change`; writes only if it actually changed something.
    pub(super) fn modify(&mut self, id: &str, change: impl FnOnce(&mut Task)) {
        let entry = self.entry_mut(id);
        assert!(!entry.deleted, "a deleted task is never modified");
        let mut task = entry.task.as_ref().clone();
        change(&mut task);
        if task != *entry.task {
            entry.task = Arc::new(task);
            entry.changed = true;
        }
    }

    /// Raises the desired state of `id` to `state` (a desired state never goes down).
    pub(super) fn retire(&mut self, id: &str, state: TaskState) {
        self.modify(id, |task| {
            if task.desired_state < state as i32 {
                task.desired_state = state as i32;
            }
        });
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

    /// Deletes task `id` (the reaper).
    pub(super) fn delete(&mut self, id: &str) {
        let entry = self.entry_mut(id);
        assert!(
            entry.read_version != 0,
            "a task created by this pass is never reaped by it"
        );
        entry.deleted = true;
    }

    /// The decided changes: a slot's creates and updates together (service, slot, and node
    /// for global tasks); each delete alone (deleting history needs no company, and a slot
    /// may have up to `task_history_retention` of them at once).
    pub(super) fn into_units(self) -> Vec<Unit> {
        let mut units: BTreeMap<(String, u64, String), Unit> = BTreeMap::new();
        let mut deletes: Vec<Unit> = Vec::new();
        for entry in self.entries {
            if entry.deleted {
                deletes.push(vec![delete(Kind::Task, entry.id, entry.read_version)]);
                continue;
            }
            let change = if entry.read_version == 0 {
                create(entry.task.as_ref().clone())
            } else if entry.changed {
                update_expecting(entry.task.as_ref().clone(), entry.read_version)
            } else {
                continue;
            };
            let node_key = if entry.task.slot == 0 {
                entry.task.node_id.clone()
            } else {
                String::new()
            };
            units
                .entry((entry.task.service_id.clone(), entry.task.slot, node_key))
                .or_default()
                .push(change);
        }
        units.into_values().chain(deletes).collect()
    }
}

fn task_version(task: &Task) -> u64 {
    let version = task.meta.as_ref().map_or(0, |meta| meta.version);
    assert!(version > 0, "a stored task has a version");
    version
}
