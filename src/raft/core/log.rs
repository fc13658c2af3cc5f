//! The in-memory log: entries after the last compaction point, and the cursors that say which
//! of them are committed, durable, handed out for persistence and handed out for application.
//!
//! It never performs IO: the node layer persists what [`RaftLog::take_unstable`] hands out and
//! reports durability back through [`RaftLog::persisted`].

use crate::raft::types::{Entry, LogIndex, SnapshotMeta, Term};

use super::message::entry_bytes;

/// Entries and cursors. Invariant: `applied <= commit <= last_index()`,
/// `offset_index <= applied`, `durable <= last_index()`.
#[derive(Debug)]
pub struct RaftLog {
    /// Index just before the first in-memory entry (the compaction point).
    offset_index: LogIndex,
    /// Term at `offset_index`.
    offset_term: Term,
    /// Entries `offset_index + 1 ..= last_index()`.
    entries: Vec<Entry>,
    /// Highest index known committed.
    commit: LogIndex,
    /// Highest index handed out for application (or covered by an installed snapshot).
    applied: LogIndex,
    /// Highest index known durable locally and matching this log.
    durable: LogIndex,
    /// First index not yet handed out for persistence.
    unstable_from: LogIndex,
    /// The latest snapshot (taken locally or received).
    snapshot: SnapshotMeta,
    /// A received snapshot to hand out for installation.
    pending_install: Option<SnapshotMeta>,
}

/// Outcome of a follower's append.
pub struct AppendOutcome {
    /// Last index of the appended range (the match index to acknowledge).
    pub last_new_index: LogIndex,
    /// Index at which the log was truncated, if a conflict was found.
    pub truncated_at: Option<LogIndex>,
    /// Index of the first newly appended entry, if any was appended.
    pub appended_from: Option<LogIndex>,
}

impl RaftLog {
    /// A log restored from a snapshot and the durable entries following it.
    pub fn restore(snapshot: SnapshotMeta, entries: Vec<Entry>, commit: LogIndex) -> Self {
        for (expected, entry) in (snapshot.index + 1..).zip(entries.iter()) {
            assert_eq!(entry.index, expected, "restored entries must be contiguous");
        }
        let last = snapshot.index + entries.len() as u64;
        Self {
            offset_index: snapshot.index,
            offset_term: snapshot.term,
            entries,
            commit: commit.clamp(snapshot.index, last),
            applied: snapshot.index,
            durable: last,
            unstable_from: last + 1,
            snapshot,
            pending_install: None,
        }
    }

    /// First index held in memory.
    pub fn first_index(&self) -> LogIndex {
        self.offset_index + 1
    }

    /// Last index of the log.
    pub fn last_index(&self) -> LogIndex {
        self.offset_index + self.entries.len() as u64
    }

    /// Term of the last entry.
    pub fn last_term(&self) -> Term {
        self.entries.last().map_or(self.offset_term, |e| e.term)
    }

    /// Term at `index`, if known (the compaction point or an in-memory entry).
    pub fn term(&self, index: LogIndex) -> Option<Term> {
        if index == self.offset_index {
            return Some(self.offset_term);
        }
        self.entry(index).map(|e| e.term)
    }

    /// The entry at `index`, if in memory.
    pub fn entry(&self, index: LogIndex) -> Option<&Entry> {
        if index <= self.offset_index {
            return None;
        }
        self.entries.get((index - self.offset_index - 1) as usize)
    }

    /// Commit index.
    pub fn commit(&self) -> LogIndex {
        self.commit
    }

    /// Applied cursor.
    pub fn applied(&self) -> LogIndex {
        self.applied
    }

    /// Durable cursor.
    pub fn durable(&self) -> LogIndex {
        self.durable
    }

    /// Latest snapshot.
    pub fn snapshot(&self) -> &SnapshotMeta {
        &self.snapshot
    }

    /// Entries `from ..=` at most `bytes_max` of payload (at least one entry if any exists).
    pub fn slice(&self, from: LogIndex, bytes_max: u64) -> Vec<Entry> {
        assert!(
            from > self.offset_index,
            "slice starts inside the compacted prefix"
        );
        let start = (from - self.offset_index - 1) as usize;
        let mut bytes = 0;
        let mut out = Vec::new();
        for entry in self.entries.iter().skip(start) {
            bytes += entry_bytes(entry);
            if !out.is_empty() && bytes > bytes_max {
                break;
            }
            out.push(entry.clone());
        }
        out
    }

    /// Leader append of a new entry right after the last one.
    pub fn append(&mut self, entry: Entry) {
        assert_eq!(
            entry.index,
            self.last_index() + 1,
            "leader appends must be contiguous"
        );
        self.entries.push(entry);
    }

    /// True if a log ending at (`last_index`, `last_term`) is at least as up to date as ours.
    pub fn is_up_to_date(&self, last_index: LogIndex, last_term: Term) -> bool {
        last_term > self.last_term()
            || (last_term == self.last_term() && last_index >= self.last_index())
    }

    /// Follower append: accepts `entries` after (`prev_index`, `prev_term`) if it matches,
    /// truncating a conflicting suffix. Returns `None` if `prev` does not match.
    pub fn maybe_append(
        &mut self,
        prev_index: LogIndex,
        prev_term: Term,
        entries: &[Entry],
    ) -> Option<AppendOutcome> {
        if self.term(prev_index) != Some(prev_term) {
            return None;
        }
        let last_new_index = prev_index + entries.len() as u64;
        let mut truncated_at = None;
        let mut appended_from = None;
        for (position, entry) in entries.iter().enumerate() {
            match self.term(entry.index) {
                Some(term) if term == entry.term => continue,
                Some(_) => {
                    assert!(
                        entry.index > self.commit,
                        "a leader never conflicts with a committed entry"
                    );
                    self.truncate_from(entry.index);
                    truncated_at = Some(entry.index);
                }
                None => {}
            }
            if entry.index <= self.offset_index {
                continue; // compacted, hence committed and matching
            }
            appended_from = Some(entry.index);
            self.entries.extend_from_slice(&entries[position..]);
            break;
        }
        Some(AppendOutcome {
            last_new_index,
            truncated_at,
            appended_from,
        })
    }

    fn truncate_from(&mut self, index: LogIndex) {
        assert!(
            index > self.offset_index,
            "cannot truncate the compacted prefix"
        );
        self.entries
            .truncate((index - self.offset_index - 1) as usize);
        self.unstable_from = self.unstable_from.min(index);
        self.durable = self.durable.min(index - 1);
    }

    /// Follower rejection hint: the largest index at or below `index` (capped at our last)
    /// whose term is at most `term`, with that term.
    pub fn find_conflict_by_term(&self, index: LogIndex, term: Term) -> (LogIndex, Term) {
        let mut candidate = index.min(self.last_index());
        while candidate > self.offset_index {
            let here = self.term(candidate).expect("in-memory index has a term");
            if here <= term {
                return (candidate, here);
            }
            candidate -= 1;
        }
        (self.offset_index, self.offset_term)
    }

    /// Advances the commit index to `index` (never backwards).
    pub fn commit_to(&mut self, index: LogIndex) {
        if index > self.commit {
            assert!(index <= self.last_index(), "commit beyond the log");
            self.commit = index;
        }
    }

    /// Hands out entries not yet given to storage.
    pub fn take_unstable(&mut self) -> Vec<Entry> {
        let last = self.last_index();
        if self.unstable_from > last {
            return Vec::new();
        }
        let from = self.unstable_from.max(self.offset_index + 1);
        let start = (from - self.offset_index - 1) as usize;
        self.unstable_from = last + 1;
        self.entries[start..].to_vec()
    }

    /// True if there are entries not yet handed to storage.
    pub fn has_unstable(&self) -> bool {
        self.unstable_from <= self.last_index()
    }

    /// Storage reports entries durable up to (`index`, `term`). Ignored if the log has since
    /// changed at that index (a truncation), or if it was never handed out.
    pub fn persisted(&mut self, index: LogIndex, term: Term) -> bool {
        if index <= self.durable || index >= self.unstable_from {
            return false;
        }
        if self.term(index) != Some(term) {
            return false;
        }
        self.durable = index;
        true
    }

    /// Storage reports the snapshot at (`index`, `term`) installed.
    pub fn snapshot_installed(&mut self, index: LogIndex, term: Term) -> bool {
        if index == self.offset_index && term == self.offset_term && index > self.durable {
            self.durable = index;
            return true;
        }
        false
    }

    /// Highest index that may be applied: committed and locally durable.
    pub fn appliable(&self) -> LogIndex {
        self.commit.min(self.durable)
    }

    /// Hands out committed, durable entries not yet applied, up to `bytes_max` (at least one).
    pub fn take_committed(&mut self, bytes_max: u64) -> Vec<Entry> {
        let high = self.appliable();
        if high <= self.applied {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut index = self.applied + 1;
        while index <= high {
            let entry = self
                .entry(index)
                .expect("unapplied entries are never compacted");
            bytes += entry_bytes(entry);
            if !out.is_empty() && bytes > bytes_max {
                break;
            }
            out.push(entry.clone());
            index += 1;
        }
        self.applied = index - 1;
        out
    }

    /// Replaces the whole log with a received snapshot (which conflicts with it or is ahead).
    pub fn install_snapshot(&mut self, meta: SnapshotMeta) {
        assert!(
            meta.index > self.commit,
            "only snapshots ahead of commit are installed"
        );
        self.durable = self.durable.min(self.commit);
        self.entries.clear();
        self.offset_index = meta.index;
        self.offset_term = meta.term;
        self.commit = meta.index;
        self.applied = meta.index;
        self.unstable_from = meta.index + 1;
        self.snapshot = meta.clone();
        self.pending_install = Some(meta);
    }

    /// Hands out a received snapshot to install.
    pub fn take_pending_install(&mut self) -> Option<SnapshotMeta> {
        self.pending_install.take()
    }

    /// True if a received snapshot awaits installation.
    pub fn has_pending_install(&self) -> bool {
        self.pending_install.is_some()
    }

    /// Records a locally taken snapshot and drops entries up to `compact_to`.
    pub fn snapshot_taken(&mut self, meta: SnapshotMeta, compact_to: LogIndex) {
        assert!(
            meta.index <= self.applied,
            "snapshots cover applied entries only"
        );
        assert!(compact_to <= meta.index, "never compact past the snapshot");
        if meta.index > self.snapshot.index {
            self.snapshot = meta;
        }
        if compact_to > self.offset_index {
            self.offset_term = self
                .term(compact_to)
                .expect("compaction point is in memory");
            self.entries
                .drain(..(compact_to - self.offset_index) as usize);
            self.offset_index = compact_to;
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::raft::types::EntryKind;

    fn e(index: LogIndex, term: Term) -> Entry {
        Entry {
            term,
            index,
            kind: EntryKind::Normal,
            data: Bytes::new(),
        }
    }

    fn log_with(terms: &[Term]) -> RaftLog {
        let entries = terms
            .iter()
            .enumerate()
            .map(|(i, t)| e(i as u64 + 1, *t))
            .collect();
        RaftLog::restore(SnapshotMeta::default(), entries, 0)
    }

    #[test]
    fn conflicting_suffix_is_truncated_and_reported() {
        let mut log = log_with(&[1, 1, 2, 2]);
        let outcome = log
            .maybe_append(2, 1, &[e(3, 3), e(4, 3), e(5, 3)])
            .unwrap();
        assert_eq!(outcome.truncated_at, Some(3));
        assert_eq!(outcome.last_new_index, 5);
        assert_eq!(log.term(4), Some(3));
        assert_eq!(
            log.durable(),
            2,
            "durability of the truncated suffix is forgotten"
        );
        assert!(log.maybe_append(5, 2, &[]).is_none());
    }

    #[test]
    fn stale_durability_report_is_ignored_after_truncation() {
        let mut log = log_with(&[1]);
        log.append(e(2, 1));
        log.append(e(3, 1));
        assert_eq!(log.take_unstable().len(), 2);
        log.maybe_append(1, 1, &[e(2, 2)]).unwrap();
        assert!(!log.persisted(3, 1), "index 3 no longer exists");
        assert!(!log.persisted(2, 1), "index 2 now has another term");
        assert_eq!(log.take_unstable().len(), 1);
        assert!(log.persisted(2, 2));
    }

    #[test]
    fn conflict_hint_skips_a_whole_term() {
        let log = log_with(&[1, 1, 1, 4, 4, 4, 4]);
        assert_eq!(log.find_conflict_by_term(7, 3), (3, 1));
        assert_eq!(log.find_conflict_by_term(20, 5), (7, 4));
    }

    #[test]
    fn only_durable_committed_entries_are_applied() {
        let mut log = log_with(&[]);
        log.append(e(1, 1));
        log.append(e(2, 1));
        log.take_unstable();
        log.commit_to(2);
        assert!(log.take_committed(u64::MAX).is_empty());
        log.persisted(1, 1);
        assert_eq!(log.take_committed(u64::MAX).len(), 1);
    }
}
