//! Tables: one per kind, each an id-ordered map of shared objects plus its indexes.
//!
//! Owns index maintenance: every insert, replace and removal goes through [`Table::put`] and
//! [`Table::remove`], so an index can never disagree with the objects. Must never decide
//! whether a change is allowed (versions, existence): that is the transaction's job.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use crate::proto::objects::{Cluster, Config, Network, Node, Secret, Service, Task};

use super::object::{Record, name_key};

/// A secondary index entry: many objects may share one key.
#[doc(hidden)]
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IndexKey {
    /// Tasks of a service.
    ServiceId(String),
    /// Tasks assigned to a node.
    NodeId(String),
    /// Tasks by desired state (`TaskState` value).
    DesiredState(i32),
    /// Tasks by observed state (`TaskState` value of `status.state`).
    TaskState(i32),
    /// Tasks of one slot of a service.
    Slot(String, u64),
    /// Nodes by current role (`NodeRole` value).
    Role(i32),
    /// Nodes by hostname (not unique).
    Hostname(String),
}

/// Another object of the kind already holds the unique name.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct NameTaken {
    /// The id of the object holding the name.
    pub(crate) holder_id: String,
}

/// The objects of one kind and their indexes. Opaque: read it through a
/// [`ReadView`](super::ReadView).
#[derive(Debug)]
pub struct Table<T> {
    by_id: BTreeMap<String, Arc<T>>,
    /// Lower-cased unique name → id. Empty names are not indexed.
    by_name: HashMap<String, String>,
    /// (key, id) pairs: a range scan over one key lists its objects in id order.
    secondary: BTreeSet<(IndexKey, String)>,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Self {
            by_id: BTreeMap::new(),
            by_name: HashMap::new(),
            secondary: BTreeSet::new(),
        }
    }
}

impl<T: Record> Table<T> {
    /// The object with `id`.
    pub(crate) fn get(&self, id: &str) -> Option<&Arc<T>> {
        self.by_id.get(id)
    }

    /// Every object, in id order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<T>> {
        self.by_id.values()
    }

    /// The number of objects.
    pub(crate) fn len(&self) -> usize {
        self.by_id.len()
    }

    /// The object holding the unique `name` (case-insensitive).
    pub(crate) fn by_name(&self, name: &str) -> Option<&Arc<T>> {
        let id = self.by_name.get(&name_key(name))?;
        let object = self.by_id.get(id);
        debug_assert!(object.is_some(), "name index points at a missing object");
        object
    }

    /// The objects whose id starts with `prefix`, in id order.
    pub(crate) fn by_id_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = &'a Arc<T>> + 'a {
        self.by_id
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |(id, _)| id.starts_with(prefix))
            .map(|(_, object)| object)
    }

    /// The objects indexed under `key`, in id order.
    pub(crate) fn by_index<'a>(&'a self, key: IndexKey) -> impl Iterator<Item = &'a Arc<T>> + 'a {
        let start = (key, String::new());
        self.secondary
            .range(start.clone()..)
            .take_while(move |(entry_key, _)| *entry_key == start.0)
            .map(|(_, id)| {
                self.by_id
                    .get(id)
                    .expect("the secondary index only names stored objects")
            })
    }

    /// Inserts `object` or replaces the stored object with its id, returning the one replaced.
    /// Fails, changing nothing, if another object holds its unique name.
    pub(crate) fn put(&mut self, object: Arc<T>) -> Result<Option<Arc<T>>, NameTaken> {
        let id = object.id().to_owned();
        if let Some(name) = object.unique_name().filter(|name| !name.is_empty())
            && let Some(holder_id) = self.by_name.get(&name_key(name))
            && *holder_id != id
        {
            return Err(NameTaken {
                holder_id: holder_id.clone(),
            });
        }
        let old = self.by_id.insert(id.clone(), Arc::clone(&object));
        match &old {
            // Most updates leave most keys alone (a status change, a replica count): touch
            // only the entries that differ.
            Some(old) => self.reindex(old, &object),
            None => self.index(&object),
        }
        Ok(old)
    }

    /// Removes the object with `id`, returning it.
    pub(crate) fn remove(&mut self, id: &str) -> Option<Arc<T>> {
        let old = self.by_id.remove(id)?;
        self.unindex(&old);
        Some(old)
    }

    fn index(&mut self, object: &T) {
        let id = object.id();
        if let Some(name) = object.unique_name().filter(|name| !name.is_empty()) {
            let previous = self.by_name.insert(name_key(name), id.to_owned());
            assert!(
                previous.is_none_or(|holder| holder == id),
                "put checked that the name is free"
            );
        }
        let mut keys = Vec::new();
        object.secondary_keys(&mut keys);
        for key in keys {
            self.secondary.insert((key, id.to_owned()));
        }
    }

    fn reindex(&mut self, old: &T, new: &T) {
        let id = new.id();
        debug_assert_eq!(old.id(), id);
        let old_name = old.unique_name().filter(|name| !name.is_empty());
        let new_name = new.unique_name().filter(|name| !name.is_empty());
        if old_name != new_name {
            if let Some(name) = old_name {
                let key = name_key(name);
                if self.by_name.get(&key).is_some_and(|holder| holder == id) {
                    self.by_name.remove(&key);
                }
            }
            if let Some(name) = new_name {
                let previous = self.by_name.insert(name_key(name), id.to_owned());
                assert!(
                    previous.is_none_or(|holder| holder == id),
                    "put checked that the name is free"
                );
            }
        }
        let (mut old_keys, mut new_keys) = (Vec::new(), Vec::new());
        old.secondary_keys(&mut old_keys);
        new.secondary_keys(&mut new_keys);
        for key in &old_keys {
            if !new_keys.contains(key) {
                self.secondary.remove(&(key.clone(), id.to_owned()));
            }
        }
        for key in new_keys {
            if !old_keys.contains(&key) {
                self.secondary.insert((key, id.to_owned()));
            }
        }
    }

    fn unindex(&mut self, object: &T) {
        let id = object.id();
        if let Some(name) = object.unique_name().filter(|name| !name.is_empty()) {
            let key = name_key(name);
            if self.by_name.get(&key).is_some_and(|holder| holder == id) {
                self.by_name.remove(&key);
            }
        }
        let mut keys = Vec::new();
        object.secondary_keys(&mut keys);
        for key in keys {
            self.secondary.remove(&(key, id.to_owned()));
        }
    }
}

/// Every table of the store.
#[derive(Debug, Default)]
pub struct Tables {
    pub(crate) nodes: Table<Node>,
    pub(crate) services: Table<Service>,
    pub(crate) tasks: Table<Task>,
    pub(crate) networks: Table<Network>,
    pub(crate) clusters: Table<Cluster>,
    pub(crate) secrets: Table<Secret>,
    pub(crate) configs: Table<Config>,
}

impl Tables {
    /// The number of objects of every kind.
    pub(crate) fn object_count(&self) -> usize {
        self.nodes.len()
            + self.services.len()
            + self.tasks.len()
            + self.networks.len()
            + self.clusters.len()
            + self.secrets.len()
            + self.configs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::objects::{ServiceSpec, TaskStatus};

    fn service(id: &str, name: &str) -> Arc<Service> {
        Arc::new(Service {
            id: id.into(),
            spec: Some(ServiceSpec {
                name: name.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn task(id: &str, service_id: &str, node_id: &str, slot: u64) -> Arc<Task> {
        Arc::new(Task {
            id: id.into(),
            service_id: service_id.into(),
            node_id: node_id.into(),
            slot,
            status: Some(TaskStatus::default()),
            ..Default::default()
        })
    }

    #[test]
    fn unique_names_are_case_insensitive_and_freed_on_rename_and_removal() {
        let mut table = Table::<Service>::default();
        table.put(service("s1", "Web")).unwrap();
        let taken = table.put(service("s2", "web")).unwrap_err();
        assert_eq!(taken.holder_id, "s1");
        assert_eq!(table.len(), 1);

        // Renaming s1 frees "web".
        table.put(service("s1", "api")).unwrap();
        table.put(service("s2", "WEB")).unwrap();
        assert_eq!(table.by_name("web").unwrap().id, "s2");
        assert_eq!(table.by_name("API").unwrap().id, "s1");

        table.remove("s2");
        assert!(table.by_name("web").is_none());
        table.put(service("s3", "web")).unwrap();
    }

    #[test]
    fn secondary_index_follows_replacements() {
        let mut table = Table::<Task>::default();
        table.put(task("t1", "svc", "n1", 1)).unwrap();
        table.put(task("t2", "svc", "n2", 2)).unwrap();
        table.put(task("t3", "other", "n1", 1)).unwrap();
        let ids = |it: Vec<&Arc<Task>>| it.iter().map(|t| t.id.clone()).collect::<Vec<_>>();
        assert_eq!(
            ids(table.by_index(IndexKey::NodeId("n1".into())).collect()),
            ["t1", "t3"]
        );
        // Moving t1 to n2 moves its index entry.
        table.put(task("t1", "svc", "n2", 1)).unwrap();
        assert_eq!(
            ids(table.by_index(IndexKey::NodeId("n1".into())).collect()),
            ["t3"]
        );
        assert_eq!(
            ids(table.by_index(IndexKey::NodeId("n2".into())).collect()),
            ["t1", "t2"]
        );
        assert_eq!(
            ids(table.by_index(IndexKey::Slot("svc".into(), 2)).collect()),
            ["t2"]
        );
        table.remove("t2");
        assert_eq!(
            ids(table.by_index(IndexKey::ServiceId("svc".into())).collect()),
            ["t1"]
        );
        // A key that sorts right after another key's entries does not leak into it.
        assert!(
            table
                .by_index(IndexKey::NodeId("n".into()))
                .next()
                .is_none()
        );
    }

    #[test]
    fn id_prefix_lookup_stops_at_the_prefix() {
        let mut table = Table::<Service>::default();
        for (id, name) in [("ab1", "a"), ("ab2", "b"), ("ac1", "c"), ("b", "d")] {
            table.put(service(id, name)).unwrap();
        }
        let found: Vec<_> = table.by_id_prefix("ab").map(|s| s.id.clone()).collect();
        assert_eq!(found, ["ab1", "ab2"]);
        assert_eq!(table.by_id_prefix("").count(), 4);
        assert_eq!(table.by_id_prefix("z").count(), 0);
    }
}
