//! Read views: a consistent picture of every table at one version.
//!
//! Owns nothing: a view borrows the store's tables under its read lock. Must never be held
//! while waiting for something else (the applier waits for the lock), and must never be used
//! to call back into the store.

use std::sync::Arc;

use crate::proto::objects::{Node, NodeRole, Task, TaskState};

use super::answers::{AnswerTable, Lookup, Request};
use super::object::Record;
use super::table::{IndexKey, Tables};

/// Every table at one version. Obtained from [`Store::view`](super::Store::view) or
/// [`Store::view_and_watch`](super::Store::view_and_watch).
pub struct ReadView<'a> {
    pub(crate) tables: &'a Tables,
    pub(crate) version: u64,
    pub(crate) applied_index: u64,
    pub(crate) answers: &'a AnswerTable,
}

impl<'a> ReadView<'a> {
    /// What the table of answers holds for the request `client_id`/`seq` (see
    /// [`super::answers`]): consistent with the objects of this view.
    pub fn answer(&self, client_id: &[u8], seq: u64) -> Lookup<'a> {
        self.answers.lookup(Request { client_id, seq })
    }

    /// The version of the last transaction this view includes.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The last log index applied (successful or not) before this view.
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// The `T` with `id`.
    pub fn get<T: Record>(&self, id: &str) -> Option<&'a Arc<T>> {
        T::table(self.tables).get(id)
    }

    /// Every `T`, in id order.
    pub fn list<T: Record>(&self) -> impl Iterator<Item = &'a Arc<T>> + 'a {
        T::table(self.tables).iter()
    }

    /// The number of `T` objects.
    pub fn count<T: Record>(&self) -> usize {
        T::table(self.tables).len()
    }

    /// Every `T` whose id starts with `prefix`, in id order (for short ids typed by people).
    pub fn find_by_id_prefix<T: Record>(
        &self,
        prefix: &'a str,
    ) -> impl Iterator<Item = &'a Arc<T>> + 'a {
        T::table(self.tables).by_id_prefix(prefix)
    }

    /// The `T` named `name` (case-insensitive). Services, networks and the cluster have unique
    /// names; other kinds never match.
    pub fn get_by_name<T: Record>(&self, name: &str) -> Option<&'a Arc<T>> {
        T::table(self.tables).by_name(name)
    }

    /// The tasks of a service, in id order.
    pub fn tasks_by_service(&self, service_id: &str) -> impl Iterator<Item = &'a Arc<Task>> + 'a {
        self.tables
            .tasks
            .by_index(IndexKey::ServiceId(service_id.to_owned()))
    }

    /// The tasks assigned to a node, in id order.
    pub fn tasks_by_node(&self, node_id: &str) -> impl Iterator<Item = &'a Arc<Task>> + 'a {
        self.tables
            .tasks
            .by_index(IndexKey::NodeId(node_id.to_owned()))
    }

    /// The tasks of one slot of a service (the current one and its history), in id order.
    pub fn tasks_by_slot(
        &self,
        service_id: &str,
        slot: u64,
    ) -> impl Iterator<Item = &'a Arc<Task>> + 'a {
        self.tables
            .tasks
            .by_index(IndexKey::Slot(service_id.to_owned(), slot))
    }

    /// The tasks whose desired state is `state`, in id order.
    pub fn tasks_by_desired_state(
        &self,
        state: TaskState,
    ) -> impl Iterator<Item = &'a Arc<Task>> + 'a {
        self.tables
            .tasks
            .by_index(IndexKey::DesiredState(state as i32))
    }

    /// The tasks whose observed state (`status.state`) is `state`, in id order.
    pub fn tasks_by_state(&self, state: TaskState) -> impl Iterator<Item = &'a Arc<Task>> + 'a {
        self.tables
            .tasks
            .by_index(IndexKey::TaskState(state as i32))
    }

    /// The nodes whose current role is `role`, in id order.
    pub fn nodes_by_role(&self, role: NodeRole) -> impl Iterator<Item = &'a Arc<Node>> + 'a {
        self.tables.nodes.by_index(IndexKey::Role(role as i32))
    }

    /// The nodes whose spec hostname is `hostname` (hostnames need not be unique).
    pub fn nodes_by_hostname(&self, hostname: &str) -> impl Iterator<Item = &'a Arc<Node>> + 'a {
        self.tables
            .nodes
            .by_index(IndexKey::Hostname(hostname.to_owned()))
    }
}
