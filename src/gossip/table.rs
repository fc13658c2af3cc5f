//! The table store: every entry (tombstones included) of the networks this node is attached
//! to, keyed by (network, table, key), and the total order of versions that makes every node
//! converge: Lamport time first, then owner, then tombstone over live, then value bytes. A tie
//! of Lamport times is therefore never dropped nor decided by arrival order (moby #47728,
//! #50342). Owns the entries; must never hold more than [`TABLE_ENTRIES_MAX`] of them nor
//! decide who may write (that is `gossip`'s job).

use std::cmp::Ordering;
use std::collections::BTreeMap;

use bytes::Bytes;

/// Entries held at most (all networks, tombstones included); new keys beyond are refused.
pub const TABLE_ENTRIES_MAX: usize = 1 << 20;

/// (network, table, key).
pub type EntryKey = (String, String, String);

/// One entry's current version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The value (empty for a tombstone).
    pub value: Bytes,
    /// The node that wrote this version.
    pub owner: String,
    /// Its Lamport time.
    pub ltime: u64,
    /// A tombstone: deleted, kept until `reap_at_ms` so that the deletion wins everywhere.
    pub deleting: bool,
    /// When a tombstone is reaped (local time; unused for live entries).
    pub reap_at_ms: u64,
}

impl Entry {
    /// The total order of versions: `Greater` means `self` replaces `other`.
    pub fn cmp_version(&self, other: &Entry) -> Ordering {
        self.ltime
            .cmp(&other.ltime)
            .then_with(|| self.owner.cmp(&other.owner))
            .then_with(|| self.deleting.cmp(&other.deleting))
            .then_with(|| self.value.cmp(&other.value))
    }
}

/// The entries of this node.
#[derive(Debug, Default)]
pub(crate) struct Tables {
    entries: BTreeMap<EntryKey, Entry>,
}

impl Tables {
    pub(crate) fn get(&self, key: &EntryKey) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// Stores `entry`; false (nothing stored) when the store is full and `key` is new.
    pub(crate) fn insert(&mut self, key: EntryKey, entry: Entry) -> bool {
        if self.entries.len() >= TABLE_ENTRIES_MAX && !self.entries.contains_key(&key) {
            return false;
        }
        self.entries.insert(key, entry);
        true
    }

    /// Removes the entries matching `keep == false` and returns them.
    pub(crate) fn remove_where(
        &mut self,
        mut remove: impl FnMut(&EntryKey, &Entry) -> bool,
    ) -> Vec<(EntryKey, Entry)> {
        let keys: Vec<EntryKey> = self
            .entries
            .iter()
            .filter(|(k, e)| remove(k, e))
            .map(|(k, _)| k.clone())
            .collect();
        keys.into_iter()
            .filter_map(|k| self.entries.remove(&k).map(|e| (k, e)))
            .collect()
    }

    /// Entries of `network` in key order, starting after `after` (or from the first).
    pub(crate) fn network_from<'a>(
        &'a self,
        network: &str,
        after: Option<&EntryKey>,
    ) -> impl Iterator<Item = (&'a EntryKey, &'a Entry)> + 'a {
        use std::ops::Bound;
        let start = match after {
            Some(key) => Bound::Excluded(key.clone()),
            None => Bound::Included((network.to_string(), String::new(), String::new())),
        };
        let network = network.to_string();
        self.entries
            .range((start, Bound::Unbounded))
            .take_while(move |(k, _)| k.0 == network)
    }

    /// Every entry owned by `owner`.
    pub(crate) fn owned_by<'a>(
        &'a self,
        owner: &'a str,
    ) -> impl Iterator<Item = (&'a EntryKey, &'a Entry)> + 'a {
        self.entries.iter().filter(move |(_, e)| e.owner == owner)
    }

    /// Turns every live entry matching `bury` into a tombstone of the same version (so the
    /// tombstone beats every copy of it) reaped at `reap_at_ms`; returns them as they were.
    pub(crate) fn bury_where(
        &mut self,
        reap_at_ms: u64,
        mut bury: impl FnMut(&EntryKey, &Entry) -> bool,
    ) -> Vec<(EntryKey, Entry)> {
        let mut buried = Vec::new();
        for (key, entry) in &mut self.entries {
            if !entry.deleting && bury(key, entry) {
                buried.push((key.clone(), entry.clone()));
                entry.deleting = true;
                entry.reap_at_ms = reap_at_ms;
            }
        }
        buried
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}
