//! The replicated object store: the cluster state every manager holds in memory.
//!
//! Tables of [`Node`](crate::proto::objects::Node), `Service`, `Task`, `Network`,
//! `Cluster`, `Secret` and `Config` objects (defined in `proto/flotilla/objects.proto`), with indexes by id, unique
//! name (services, networks, cluster, secrets, configs), service, node, slot, desired and observed state, role
//! and hostname.
//!
//! - Reads come from memory: [`Store::view`] runs a closure on a [`ReadView`], consistent
//!   across every table.
//! - Writes are [`Transaction`]s that the Raft layer
//!   commits and then hands to [`Store::apply`] with their log index, on every manager, in log
//!   order. The log index becomes the version of every object the transaction writes, so all
//!   managers compute identical versions. An update carries the version its proposer read and
//!   fails with [`TxnError::VersionConflict`] (code `Aborted`) if the object changed since.
//!   A failed transaction changes nothing.
//! - Watches ([`Store::view_and_watch`], [`Store::watch_since`]) stream every later change
//!   exactly once, through bounded queues: a slow watcher is dropped, never waited for.
//! - [`Store::snapshot`] streams the whole store; [`Store::restore`] replaces it atomically.
//!
//! Locks: `state` (a read-write lock) then `hub` (a mutex), always in that order. `apply`
//! takes `state` for writing, changes the tables, takes `hub`, releases `state`, then
//! publishes: readers proceed while events go out, and a watcher registered under the read
//! lock lands exactly between two transactions. As a second guard, a watcher skips every
//! transaction at or below the version it starts from, so it can never get one twice.
//!
//! This module must never propose anything, talk to the network, read a clock or block on a
//! watcher; and `apply` must stay a pure function of (store, index, transaction).

pub mod answers;
mod object;
pub mod settings;
mod snapshot;
pub mod spec;
mod table;
mod txn;
mod view;
mod watch;

use std::io::{self, Read, Write};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::proto::objects::Transaction;

pub use object::{Kind, Object, Record};
pub use snapshot::{
    SNAPSHOT_FORMAT_VERSION, SNAPSHOT_FORMAT_VERSION_OLDEST, SNAPSHOT_RECORD_BYTES_MAX,
    SnapshotError, SnapshotInfo, SnapshotStream,
};
pub use table::{Table, Tables};
pub use txn::{
    Action, ApplyOutcome, Event, OBJECT_ID_BYTES_MAX, TXN_BYTES_MAX, TXN_CHANGES_MAX, TxnError,
    check_limits, create, delete, split_into_transactions, update, update_expecting,
};
pub use view::ReadView;
pub use watch::{
    DropReason, WATCH_HISTORY_BYTES_MAX_DEFAULT, WATCH_HISTORY_EVENTS_MAX_DEFAULT,
    WATCH_HISTORY_IDLE_EVENTS_MAX, WATCH_QUEUE_EVENTS_MAX_DEFAULT, WatchError, WatchEvent,
    WatchFilter, WatchOptions, Watcher,
};

use answers::{Answer, AnswerTable, Lookup, Recorded};
use watch::Hub;

/// Tunables of a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// Events a watcher may have queued before it is dropped as too slow.
    pub watch_queue_events_max: usize,
    /// Recent events kept for [`Store::watch_since`].
    pub watch_history_events_max: usize,
    /// The estimated object bytes the history may keep alive.
    pub watch_history_bytes_max: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            watch_queue_events_max: WATCH_QUEUE_EVENTS_MAX_DEFAULT,
            watch_history_events_max: WATCH_HISTORY_EVENTS_MAX_DEFAULT,
            watch_history_bytes_max: WATCH_HISTORY_BYTES_MAX_DEFAULT,
        }
    }
}

struct State {
    tables: Tables,
    /// The last log index given to `apply` (or restored).
    applied_index: u64,
    /// The index of the last transaction that succeeded (or the restored version).
    version: u64,
    /// The latest answer per client (exactly-once writes).
    answers: AnswerTable,
}

impl State {
    fn view(&self) -> ReadView<'_> {
        ReadView {
            tables: &self.tables,
            version: self.version,
            applied_index: self.applied_index,
            answers: &self.answers,
        }
    }
}

/// What [`Store::restore`] installed.
pub type RestoreOutcome = SnapshotInfo;

/// The in-memory object store. Cloning gives another handle to the same store.
#[derive(Clone)]
pub struct Store {
    state: Arc<RwLock<State>>,
    hub: Arc<Mutex<Hub>>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new(StoreConfig::default())
    }
}

impl Store {
    /// An empty store at version 0.
    pub fn new(config: StoreConfig) -> Self {
        Self {
            state: Arc::new(RwLock::new(State {
                tables: Tables::default(),
                applied_index: 0,
                version: 0,
                answers: AnswerTable::default(),
            })),
            hub: Arc::new(Mutex::new(Hub::new(
                config.watch_history_events_max,
                config.watch_history_bytes_max,
                config.watch_queue_events_max,
            ))),
        }
    }

    /// Applies the committed transaction at log `index`: every change or none.
    ///
    /// The Raft layer calls this once per committed store entry, in log order, on every
    /// manager. `index` becomes the version of every object written. A refused transaction
    /// still counts as applied (the index advances), so the next entry is accepted.
    ///
    /// A transaction carrying a request id is answered at most once ([`answers`]): its
    /// outcome is recorded with its effects, and a repeat of the request gets that outcome
    /// again (a success with [`ApplyOutcome::repeated`] set, or the first refusal) without
    /// being applied.
    ///
    /// # Errors
    /// A [`TxnError`] that says which change failed and why; the store's objects are
    /// unchanged. [`TxnError::OutOfOrder`] if `index` is not after the last applied index.
    pub fn apply(&self, index: u64, txn: &Transaction) -> Result<ApplyOutcome, TxnError> {
        // Encoding size is the costly check; it needs no lock.
        let txn_bytes = txn::checked_size(txn);
        let mut state = self.state.write();
        if index <= state.applied_index {
            return Err(TxnError::OutOfOrder {
                index,
                applied: state.applied_index,
            });
        }
        state.applied_index = index;
        state.answers.expire(txn.timestamp_ms);
        let request = answers::checked_request(txn)?;
        if let Some(request) = request {
            match state.answers.lookup(request) {
                Lookup::New => {}
                Lookup::Repeat(recorded) => {
                    return recorded.replay().map(|version| ApplyOutcome {
                        version,
                        events: Vec::new(),
                        repeated: true,
                    });
                }
                Lookup::Superseded { latest_seq } => {
                    return Err(TxnError::Superseded {
                        seq: request.seq,
                        latest_seq,
                    });
                }
            }
        }
        let outcome = txn_bytes
            .and_then(|bytes| Ok((bytes, txn::apply_changes(&mut state.tables, index, txn)?)));
        if let Some(request) = request {
            let recorded = Recorded {
                seq: request.seq,
                index,
                timestamp_ms: txn.timestamp_ms,
                answer: Answer::of(&outcome, index),
                object_id: answers::first_object_id(txn),
            };
            state.answers.record(request.client_id, recorded);
        }
        let (txn_bytes, events) = outcome?;
        state.version = index;
        // Take the hub before letting readers in, so that a watcher registered by a reader
        // who saw this transaction cannot also be sent it.
        let mut hub = self.hub.lock();
        drop(state);
        hub.publish(index, &events, txn_bytes);
        drop(hub);
        Ok(ApplyOutcome {
            version: index,
            events,
            repeated: false,
        })
    }

    /// Decodes the committed log entry payload `data` as a [`Transaction`] and applies it at
    /// `index`, as [`Self::apply`] does. A payload that does not decode is refused the same
    /// way on every manager, and its index still counts as applied.
    ///
    /// # Errors
    /// [`TxnError::Undecodable`], or any error of [`Self::apply`].
    pub fn apply_encoded(&self, index: u64, data: &[u8]) -> Result<ApplyOutcome, TxnError> {
        use prost::Message;
        match Transaction::decode(data) {
            Ok(txn) => self.apply(index, &txn),
            Err(error) => {
                let mut state = self.state.write();
                if index <= state.applied_index {
                    return Err(TxnError::OutOfOrder {
                        index,
                        applied: state.applied_index,
                    });
                }
                state.applied_index = index;
                Err(TxnError::Undecodable {
                    reason: error.to_string(),
                })
            }
        }
    }

    /// Runs `read` on a view consistent across every table. Keep it short: `apply` waits
    /// for it. `read` must not call back into the store.
    pub fn view<R>(&self, read: impl FnOnce(&ReadView<'_>) -> R) -> R {
        let state = self.state.read();
        read(&state.view())
    }

    /// The `T` with `id`, shared (the store never changes an object in place).
    pub fn get<T: Record>(&self, id: &str) -> Option<Arc<T>> {
        self.view(|view| view.get::<T>(id).cloned())
    }

    /// Every `T` in id order, shared. Copies one pointer per object under the read lock, so
    /// long listings can be streamed without holding it.
    pub fn list<T: Record>(&self) -> Vec<Arc<T>> {
        self.view(|view| view.list::<T>().cloned().collect())
    }

    /// The version of the last successful transaction.
    pub fn version(&self) -> u64 {
        self.state.read().version
    }

    /// The last log index applied.
    pub fn applied_index(&self) -> u64 {
        self.state.read().applied_index
    }

    /// Runs `read` on a consistent view and subscribes, atomically: the watcher gets every
    /// selected change after the view's version, with no gap and no duplicate. `read` must
    /// not call back into the store.
    pub fn view_and_watch<R>(
        &self,
        options: WatchOptions,
        read: impl FnOnce(&ReadView<'_>) -> R,
    ) -> (R, Watcher) {
        let state = self.state.read();
        let view = state.view();
        let result = read(&view);
        let version = view.version();
        let mut hub = self.hub.lock();
        debug_assert_eq!(
            hub.version(),
            version,
            "the applier takes the hub before it releases the state lock"
        );
        let watcher = hub
            .register(&self.hub, version, options)
            .expect("the current version is always resumable");
        drop(hub);
        drop(state);
        (result, watcher)
    }

    /// Subscribes to every selected change from now on.
    pub fn watch(&self, options: WatchOptions) -> Watcher {
        self.view_and_watch(options, |_| ()).1
    }

    /// Shrinks the watch history to [`WATCH_HISTORY_IDLE_EVENTS_MAX`] events, giving back
    /// what a burst left in it. For an idle store: a watcher that falls behind later can
    /// resume only from the events kept (an older version is refused as too old).
    pub fn shrink_watch_history(&self) {
        self.hub
            .lock()
            .shrink_history(WATCH_HISTORY_IDLE_EVENTS_MAX);
    }

    /// Subscribes to every selected change after `version`: first the kept history after it,
    /// then live changes. A `version` this store has not reached yet is allowed (a manager
    /// that is behind): changes up to it are skipped.
    ///
    /// # Errors
    /// [`WatchError::Compacted`] if changes after `version` are no longer kept; re-read with
    /// [`Self::view_and_watch`].
    pub fn watch_since(&self, version: u64, options: WatchOptions) -> Result<Watcher, WatchError> {
        let mut hub = self.hub.lock();
        hub.register(&self.hub, version, options)
    }

    /// The number of live watchers (dropped ones are removed at the next transaction that
    /// would reach them, or when their [`Watcher`] is dropped).
    pub fn watcher_count(&self) -> usize {
        self.hub.lock().watcher_count()
    }

    /// A stream of the whole store at its current version. Taking it copies pointers, not
    /// objects; the store keeps applying while the stream is read.
    pub fn snapshot(&self) -> SnapshotStream {
        let state = self.state.read();
        SnapshotStream::new(
            &state.tables,
            &state.answers,
            state.applied_index,
            state.version,
        )
    }

    /// Writes a snapshot of the whole store to `writer` (see [`Self::snapshot`]).
    ///
    /// # Errors
    /// The writer's error; what was written is then incomplete and will not restore.
    pub fn write_snapshot(&self, writer: &mut impl Write) -> io::Result<SnapshotInfo> {
        let mut stream = self.snapshot();
        let info = stream.info();
        io::copy(&mut stream, writer)?;
        Ok(info)
    }

    /// Replaces the whole store with the snapshot read from `reader`, atomically: the
    /// snapshot is decoded and checked into new tables first, and the old store stays intact
    /// if anything is wrong. Every watcher is dropped with [`DropReason::Restored`] (the new
    /// state does not follow from the events they saw).
    ///
    /// # Errors
    /// A [`SnapshotError`]; the store is unchanged.
    pub fn restore(&self, reader: impl Read) -> Result<RestoreOutcome, SnapshotError> {
        let loaded = snapshot::load(reader)?;
        let mut state = self.state.write();
        let old_tables = std::mem::replace(&mut state.tables, loaded.tables);
        state.answers = loaded.answers;
        state.applied_index = loaded.info.applied_index;
        state.version = loaded.info.version;
        let mut hub = self.hub.lock();
        drop(state);
        hub.reset(
            loaded.info.version,
            &DropReason::Restored {
                version: loaded.info.version,
            },
        );
        drop(hub);
        // Freed outside every lock: it may be large.
        drop(old_tables);
        Ok(loaded.info)
    }
}

#[cfg(test)]
mod tests;
