//! Watches: filtered subscriptions to the store's events, and the bounded history they can
//! resume from.
//!
//! Owns the watcher registry, each watcher's bounded queue and the event history. Must never
//! block the applier: every delivery is a non-blocking send, and a watcher whose queue is full
//! is dropped (it sees [`WatchEvent::Dropped`] last, then a closed channel).

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use parking_lot::Mutex;

use crate::wire::Code;

use super::object::{Kind, Object};
use super::txn::Event;

/// Events a watcher may have queued before it counts as too slow and is dropped.
pub const WATCH_QUEUE_EVENTS_MAX_DEFAULT: usize = 4096;

/// Recent events kept so a watcher can resume from a version (swarmkit keeps a similar
/// window). Older versions need a fresh `view_and_watch`.
pub const WATCH_HISTORY_EVENTS_MAX_DEFAULT: usize = 10_000;

/// Events the history keeps once the store is idle ([`crate::store::Store::shrink_watch_history`]).
pub const WATCH_HISTORY_IDLE_EVENTS_MAX: usize = 1_000;

/// The estimated bytes of objects the history may keep alive (events share objects with the
/// tables, but an update's old object lives on only through the history). Large objects make
/// the history shorter rather than memory unbounded.
pub const WATCH_HISTORY_BYTES_MAX_DEFAULT: usize = 64 * 1024 * 1024;

/// Selects events. Every field that is set must match; an unset field matches anything.
/// An event matches if its new object or (for updates) its old object matches, so a watcher
/// on a node also sees a task move away from that node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchFilter {
    /// Only objects of this kind.
    pub kind: Option<Kind>,
    /// Only the object with this id.
    pub id: Option<String>,
    /// Only the node with this id and tasks assigned to it.
    pub node_id: Option<String>,
    /// Only the service with this id and its tasks.
    pub service_id: Option<String>,
}

impl WatchFilter {
    /// Every event of `kind`.
    pub fn kind(kind: Kind) -> Self {
        Self {
            kind: Some(kind),
            ..Self::default()
        }
    }

    fn matches_object(&self, object: &Object) -> bool {
        if self.kind.is_some_and(|kind| kind != object.kind()) {
            return false;
        }
        if self.id.as_deref().is_some_and(|id| id != object.id()) {
            return false;
        }
        if let Some(node_id) = self.node_id.as_deref() {
            let matches = match object {
                Object::Node(node) => node.id == node_id,
                Object::Task(task) => task.node_id == node_id,
                _ => false,
            };
            if !matches {
                return false;
            }
        }
        if let Some(service_id) = self.service_id.as_deref() {
            let matches = match object {
                Object::Service(service) => service.id == service_id,
                Object::Task(task) => task.service_id == service_id,
                _ => false,
            };
            if !matches {
                return false;
            }
        }
        true
    }

    /// True if `event` is selected by this filter.
    pub fn matches(&self, event: &Event) -> bool {
        self.matches_object(&event.object)
            || event
                .old
                .as_ref()
                .is_some_and(|old| self.matches_object(old))
    }
}

/// How to subscribe.
#[derive(Clone, Debug, Default)]
pub struct WatchOptions {
    /// The watcher gets events matching any of these; none means every event.
    pub filters: Vec<WatchFilter>,
    /// Also deliver [`WatchEvent::Commit`] after the events of each transaction the watcher
    /// got events from, so it can act on whole transactions.
    pub include_commits: bool,
    /// The watcher's queue bound; `None` takes the store's default.
    pub queue_events_max: Option<usize>,
}

impl WatchOptions {
    /// Every event matching any of `filters` (every event if empty), no commit markers.
    pub fn filtered(filters: Vec<WatchFilter>) -> Self {
        Self {
            filters,
            ..Self::default()
        }
    }

    fn selects(&self, event: &Event) -> bool {
        self.filters.is_empty() || self.filters.iter().any(|filter| filter.matches(event))
    }
}

/// Why the store stopped a watcher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The watcher's queue was full: it did not keep up.
    SlowConsumer {
        /// The queue bound it exceeded.
        queue_events_max: usize,
        /// The last version fully delivered to it; resume with `watch_since(this)`.
        last_delivered_version: u64,
    },
    /// The store was replaced from a snapshot; its events do not continue the old ones.
    Restored {
        /// The version of the restored store.
        version: u64,
    },
}

impl DropReason {
    /// The status code a remote watcher should see.
    pub fn code(&self) -> Code {
        match self {
            Self::SlowConsumer { .. } => Code::ResourceExhausted,
            Self::Restored { .. } => Code::Aborted,
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SlowConsumer {
                queue_events_max,
                last_delivered_version,
            } => write!(
                f,
                "the watch fell {queue_events_max} events behind and was stopped; watch again \
                 resuming after version {last_delivered_version} (`flotilla watch` does so by \
                 itself), and read events faster"
            ),
            Self::Restored { version } => write!(
                f,
                "this manager replaced its state with a snapshot at version {version}, so its \
                 events do not continue the earlier ones; list the objects again, then start a \
                 new watch (without resuming)"
            ),
        }
    }
}

/// What a watcher receives.
#[derive(Clone, Debug)]
pub enum WatchEvent {
    /// One change, shared by every watcher that selected it.
    Change(Arc<Event>),
    /// Every selected change of the transaction at `version` has been delivered.
    Commit {
        /// The transaction's version.
        version: u64,
    },
    /// The last message before the channel closes: the store stopped this watcher.
    Dropped(DropReason),
}

/// Why a watch could not start or could not go on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    /// The version to resume from is older than the kept history.
    #[error(
        "cannot resume from version {requested}: events before version {oldest_resumable} are \
         no longer kept; list the objects again, then start a new watch (without resuming)"
    )]
    Compacted {
        /// The version asked for.
        requested: u64,
        /// The oldest version a watch can resume from now.
        oldest_resumable: u64,
    },
    /// The store stopped the watcher.
    #[error("watch dropped: {0}")]
    Dropped(DropReason),
    /// The channel closed without a reason (the store is gone).
    #[error("watch closed: the store was dropped")]
    Closed,
    /// No event arrived within the timeout given to `recv_timeout`.
    #[error("no event within the timeout")]
    Timeout,
}

impl WatchError {
    /// The status code a remote watcher should see.
    pub fn code(&self) -> Code {
        match self {
            Self::Compacted { .. } => Code::OutOfRange,
            Self::Dropped(reason) => reason.code(),
            Self::Closed => Code::Unavailable,
            Self::Timeout => Code::DeadlineExceeded,
        }
    }
}

/// A subscription. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Watcher {
    id: u64,
    events: Receiver<WatchEvent>,
    hub: Weak<Mutex<Hub>>,
}

impl Watcher {
    /// The next event, blocking until one arrives.
    ///
    /// # Errors
    /// [`WatchError::Dropped`] if the store stopped this watcher (too slow, or restored),
    /// [`WatchError::Closed`] if the store is gone.
    pub fn recv(&self) -> Result<WatchEvent, WatchError> {
        match self.events.recv() {
            Ok(event) => into_result(event),
            Err(_) => Err(WatchError::Closed),
        }
    }

    /// The next event, waiting at most `timeout`.
    ///
    /// # Errors
    /// As [`Self::recv`], plus [`WatchError::Timeout`].
    pub fn recv_timeout(&self, timeout: Duration) -> Result<WatchEvent, WatchError> {
        match self.events.recv_timeout(timeout) {
            Ok(event) => into_result(event),
            Err(RecvTimeoutError::Timeout) => Err(WatchError::Timeout),
            Err(RecvTimeoutError::Disconnected) => Err(WatchError::Closed),
        }
    }

    /// The next event if one is queued.
    ///
    /// # Errors
    /// As [`Self::recv`]; `Ok(None)` if nothing is queued.
    pub fn try_recv(&self) -> Result<Option<WatchEvent>, WatchError> {
        match self.events.try_recv() {
            Ok(event) => into_result(event).map(Some),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(WatchError::Closed),
        }
    }

    /// The raw channel, for `crossbeam_channel::select!`. It yields
    /// [`WatchEvent::Dropped`] as its last message when the store stops the watcher.
    pub fn receiver(&self) -> &Receiver<WatchEvent> {
        &self.events
    }
}

fn into_result(event: WatchEvent) -> Result<WatchEvent, WatchError> {
    match event {
        WatchEvent::Dropped(reason) => Err(WatchError::Dropped(reason)),
        other => Ok(other),
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.upgrade() {
            hub.lock().unregister(self.id);
        }
    }
}

/// One registered watcher, as the hub sees it.
struct Slot {
    id: u64,
    options: WatchOptions,
    sender: Sender<WatchEvent>,
    /// Messages the queue may hold before the watcher counts as slow. The hub, the only
    /// sender, checks it before every send (the channel itself is unbounded so that idle
    /// watchers cost no preallocated buffer); the final `Dropped` goes in on top.
    queue_limit: usize,
    /// Transactions at or below this version are skipped (resuming from a version this store
    /// has not reached yet).
    skip_through_version: u64,
    /// The last version whose selected events all reached the queue.
    delivered_version: u64,
}

enum Delivery {
    Kept,
    Remove,
}

impl Slot {
    /// Queues the selected events of the transaction at `version`, without blocking. A
    /// transaction is queued whole or not at all, so a dropped watcher never holds half of
    /// one and can resume from the last version it received.
    fn deliver(&mut self, version: u64, events: &[Arc<Event>]) -> Delivery {
        if version <= self.skip_through_version {
            return Delivery::Kept;
        }
        let selected = events
            .iter()
            .filter(|event| self.options.selects(event))
            .count();
        if selected == 0 {
            return Delivery::Kept;
        }
        let commit = usize::from(self.options.include_commits);
        if self.sender.len() + selected + commit > self.queue_limit {
            self.close(DropReason::SlowConsumer {
                queue_events_max: self.queue_limit,
                last_delivered_version: self.delivered_version,
            });
            return Delivery::Remove;
        }
        let changes = events
            .iter()
            .filter(|event| self.options.selects(event))
            .map(|event| WatchEvent::Change(Arc::clone(event)));
        let commit_message = self
            .options
            .include_commits
            .then_some(WatchEvent::Commit { version });
        for message in changes.chain(commit_message) {
            // The hub is the only sender and checked the room; an error means the receiver
            // is gone.
            if self.sender.try_send(message).is_err() {
                return Delivery::Remove;
            }
        }
        self.delivered_version = version;
        Delivery::Kept
    }

    /// Sends the final message (one past the limit); the sender drops with the slot.
    fn close(&self, reason: DropReason) {
        // Fails only if the receiver is gone, in which case nobody needs the reason.
        let _ = self.sender.try_send(WatchEvent::Dropped(reason));
    }
}

/// The registry of watchers and the recent history. Guarded by a mutex that the applier
/// takes (while still holding the store's write lock) before publishing, and that
/// `view_and_watch` takes while holding the read lock: a new watcher is therefore registered
/// exactly between two transactions.
pub(crate) struct Hub {
    slots: Vec<Slot>,
    next_id: u64,
    /// Recent events with the bytes each is charged.
    history: VecDeque<(Arc<Event>, usize)>,
    history_events_max: usize,
    history_bytes: usize,
    history_bytes_max: usize,
    /// The oldest version a watch can resume from: every event after it is in `history`.
    resumable_from_version: u64,
    /// The version of the last published transaction (or of the restored snapshot).
    version: u64,
    queue_events_max_default: usize,
}

impl Hub {
    pub(crate) fn new(
        history_events_max: usize,
        history_bytes_max: usize,
        queue_events_max_default: usize,
    ) -> Self {
        assert!(
            queue_events_max_default > 0,
            "a watcher queue holds at least one event"
        );
        Self {
            slots: Vec::new(),
            next_id: 1,
            history: VecDeque::new(),
            history_events_max,
            history_bytes: 0,
            history_bytes_max,
            resumable_from_version: 0,
            version: 0,
            queue_events_max_default,
        }
    }

    /// Records the transaction at `version` (`txn_bytes` encoded) in the history and queues
    /// it to every watcher.
    pub(crate) fn publish(&mut self, version: u64, events: &[Arc<Event>], txn_bytes: usize) {
        assert!(
            version > self.version,
            "transactions are published in log order"
        );
        self.version = version;
        // Each event keeps its new object and (for updates) its old one alive: about twice
        // its share of the transaction.
        let bytes_per_event = 2 * txn_bytes / events.len().max(1);
        for event in events {
            self.history.push_back((Arc::clone(event), bytes_per_event));
            self.history_bytes += bytes_per_event;
        }
        while self.history.len() > self.history_events_max
            || self.history_bytes > self.history_bytes_max
        {
            let Some((evicted, bytes)) = self.history.pop_front() else {
                break;
            };
            self.history_bytes -= bytes;
            // Resuming from evicted.version stays possible: whoever saw that version saw all
            // of its events.
            self.resumable_from_version = self.resumable_from_version.max(evicted.version);
        }
        self.slots
            .retain_mut(|slot| matches!(slot.deliver(version, events), Delivery::Kept));
    }

    /// Forgets all but the newest `events_max` events of the history and gives back the
    /// memory the rest held. Run when the store is idle: the full history serves watchers
    /// that fall behind during a burst, but kept after it, each event pins a deleted or
    /// replaced object allocated somewhere in the burst's memory, and 10,000 of them
    /// scattered over it kept a manager at 140 MB after a 100,000-task service was removed
    /// (70 MB with 1,000). A watcher resuming from before the newest kept event is told its
    /// version is too old, as with any eviction.
    pub(crate) fn shrink_history(&mut self, events_max: usize) {
        let mut evicted_any = false;
        while self.history.len() > events_max {
            let Some((evicted, bytes)) = self.history.pop_front() else {
                break;
            };
            evicted_any = true;
            self.history_bytes -= bytes;
            self.resumable_from_version = self.resumable_from_version.max(evicted.version);
        }
        if evicted_any {
            self.history.shrink_to_fit();
        }
    }

    /// Drops every watcher with `reason` and forgets the history: the store now starts at
    /// `version` with no past.
    pub(crate) fn reset(&mut self, version: u64, reason: &DropReason) {
        for slot in self.slots.drain(..) {
            slot.close(reason.clone());
        }
        self.history.clear();
        self.history_bytes = 0;
        self.version = version;
        self.resumable_from_version = version;
    }

    pub(crate) fn version(&self) -> u64 {
        self.version
    }

    pub(crate) fn watcher_count(&self) -> usize {
        self.slots.len()
    }

    /// Registers a watcher that gets every selected transaction after `from_version`.
    ///
    /// # Errors
    /// [`WatchError::Compacted`] if events after `from_version` are no longer kept.
    pub(crate) fn register(
        &mut self,
        hub: &Arc<Mutex<Hub>>,
        from_version: u64,
        options: WatchOptions,
    ) -> Result<Watcher, WatchError> {
        if from_version < self.resumable_from_version {
            return Err(WatchError::Compacted {
                requested: from_version,
                oldest_resumable: self.resumable_from_version,
            });
        }
        let replay = self.replay_after(from_version, &options);
        let queue_events_max = options
            .queue_events_max
            .unwrap_or(self.queue_events_max_default)
            .max(1);
        // The replay is allowed on top of the usual bound, so resuming never drops at once.
        let queue_limit = replay.len() + queue_events_max;
        let (sender, events) = crossbeam_channel::unbounded();
        for message in replay {
            sender
                .try_send(message)
                .expect("the receiver is still in our hands");
        }
        let id = self.next_id;
        self.next_id += 1;
        self.slots.push(Slot {
            id,
            options,
            sender,
            queue_limit,
            skip_through_version: from_version,
            delivered_version: from_version.max(self.version),
        });
        Ok(Watcher {
            id,
            events,
            hub: Arc::downgrade(hub),
        })
    }

    /// The selected events after `from_version` still in the history, with commit markers if
    /// asked.
    fn replay_after(&self, from_version: u64, options: &WatchOptions) -> Vec<WatchEvent> {
        let mut replay = Vec::new();
        let mut pending_commit: Option<u64> = None;
        let first = self
            .history
            .partition_point(|(event, _)| event.version <= from_version);
        for (event, _) in self.history.range(first..) {
            if let Some(version) = pending_commit
                && version != event.version
            {
                replay.push(WatchEvent::Commit { version });
                pending_commit = None;
            }
            if options.selects(event) {
                replay.push(WatchEvent::Change(Arc::clone(event)));
                if options.include_commits {
                    pending_commit = Some(event.version);
                }
            }
        }
        if let Some(version) = pending_commit {
            replay.push(WatchEvent::Commit { version });
        }
        replay
    }

    fn unregister(&mut self, id: u64) {
        self.slots.retain(|slot| slot.id != id);
    }
}
