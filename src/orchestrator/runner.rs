//! The `flotilla-orchestrator` thread, one per manager: runs [`reconcile`](super::reconcile)
//! on the Raft leader and proposes what it returns.
//!
//! A pass runs every [`ORCHESTRATOR_PASS_INTERVAL`] (but at most every
//! [`ORCHESTRATOR_IDLE_RECHECK`] while the store stays as it was when a pass last found
//! nothing to do) and soon after the store reports a change to nodes, services, tasks or
//! the cluster (a watch with a queue of
//! [`ORCHESTRATOR_WATCH_QUEUE_EVENTS_MAX`] events; a dropped watch is simply renewed, as the
//! next pass reads everything anyway). Passes take at most half of the thread's time (the
//! next waits at least as long as the last one computed) and an idle pass result stands at
//! least ten times as long as it took, so a huge store costs a bounded share of a core. On
//! a follower a pass does nothing. A new leader first
//! waits for a read barrier (it has applied everything committed before its term), so it
//! does not act on a view its predecessor had already moved past.
//!
//! A proposal that fails (`Aborted` because a task changed since the pass read it, a lost
//! leadership, a timeout) ends the pass; the next pass reads the store again. Must never
//! hold the store's lock while proposing, nor propose on a follower.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, bounded, select};

use crate::proto::objects::{Task, Transaction, change, store_object};
use crate::raft::node::NodeHandle;
use crate::replication::{PROPOSE_TIMEOUT, propose_transaction};
use crate::store::{Kind, Store, WatchEvent, WatchFilter, WatchOptions, Watcher};
use crate::util::clock::unix_now_ms as now_ms;

/// The longest wait between two passes when the store changes.
pub const ORCHESTRATOR_PASS_INTERVAL: Duration = Duration::from_millis(200);

/// How long a pass that found nothing to do stands while the store does not change (an
/// idle pass over 10,000 tasks costs about 20 ms). Only the clock can make work appear
/// then (a restart delay or window, a node's down grace), so this bounds how late those
/// decisions are.
pub const ORCHESTRATOR_IDLE_RECHECK: Duration = Duration::from_secs(1);

/// The orchestrator's watch queue bound; a burst beyond it drops the watch, which is renewed
/// (a full pass follows either way).
pub const ORCHESTRATOR_WATCH_QUEUE_EVENTS_MAX: usize = 1024;

/// How long after a change the pass waits, so one pass covers a burst of transactions.
const CHANGE_COALESCE: Duration = Duration::from_millis(10);

/// The most of its time the thread spends in passes: after a pass that took `d`, the next
/// one waits at least `d` (half a core at most, however large the store and however often
/// it changes), and a pass that found nothing to do stands for at least 10 `d` (a tenth).
/// A pass over 100,000 tasks takes a few hundred milliseconds; without this, a service
/// that large kept a core busy while status reports streamed in.
const PASS_SHARE_BUSY_INV: u32 = 2;
/// See [`PASS_SHARE_BUSY_INV`]: the share of an idle pass is a tenth.
const PASS_SHARE_IDLE_INV: u32 = 10;

/// How long a new leader waits for its read barrier before the next attempt.
const READ_BARRIER_TIMEOUT: Duration = Duration::from_secs(2);

/// The running orchestrator thread. Stop it with [`Orchestrator::stop`].
pub struct Orchestrator {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Orchestrator {
    /// Starts the thread for the manager whose Raft node is `node` and store `store`.
    ///
    /// # Errors
    /// The OS error if the thread cannot start.
    pub fn start(node: NodeHandle, store: Store) -> std::io::Result<Orchestrator> {
        let (stop, stopped) = bounded::<()>(1);
        let thread = std::thread::Builder::new()
            .name("flotilla-orchestrator".into())
            .spawn(move || run(&node, &store, &stopped))?;
        Ok(Orchestrator { stop, thread })
    }

    /// Stops the thread and joins it, after the proposal in progress (at most
    /// [`PROPOSE_TIMEOUT`], 10 s) or the new leader's read barrier (at most 2 s).
    pub fn stop(self) {
        drop(self.stop);
        if self.thread.join().is_err() {
            log::error!("the orchestrator thread panicked");
        }
    }
}

fn subscribe(store: &Store) -> Watcher {
    let filters = [Kind::Node, Kind::Service, Kind::Task, Kind::Cluster]
        .into_iter()
        .map(WatchFilter::kind)
        .collect();
    store.watch(WatchOptions {
        filters,
        include_commits: false,
        queue_events_max: Some(ORCHESTRATOR_WATCH_QUEUE_EVENTS_MAX),
    })
}

fn run(node: &NodeHandle, store: &Store, stopped: &Receiver<()>) {
    let mut watcher = subscribe(store);
    let mut caught_up = false;
    // The store version at which a pass last found nothing to do, and when.
    let mut idle_since: Option<(u64, Instant)> = None;
    // When the last pass ended and how long it took (see `PASS_SHARE_BUSY_INV`).
    let mut last_pass = (Instant::now(), Duration::ZERO);
    loop {
        if node.leader() == Some(node.id()) {
            if !caught_up {
                caught_up = node.read_barrier_local(READ_BARRIER_TIMEOUT).is_ok();
            }
            let version = store.version();
            let (ended, took) = last_pass;
            let idle_recheck = ORCHESTRATOR_IDLE_RECHECK.max(took * PASS_SHARE_IDLE_INV);
            let still_idle = idle_since.is_some_and(|(idle_version, at)| {
                idle_version == version && at.elapsed() < idle_recheck
            });
            let rested = ended.elapsed() >= took * (PASS_SHARE_BUSY_INV - 1);
            if caught_up && !still_idle && rested {
                let (proposed, took) = run_pass(node, store, stopped);
                last_pass = (Instant::now(), took);
                idle_since = (proposed == 0).then(|| (version, Instant::now()));
            }
        } else {
            caught_up = false;
            idle_since = None;
        }
        select! {
            recv(stopped) -> _ => return,
            recv(watcher.receiver()) -> event => {
                if !matches!(event, Ok(WatchEvent::Change(_) | WatchEvent::Commit { .. })) {
                    watcher = subscribe(store);
                }
                // Gather the rest of a burst; a stop (the sender dropped) ends the wait too.
                if !matches!(stopped.recv_timeout(CHANGE_COALESCE), Err(RecvTimeoutError::Timeout)) {
                    return;
                }
                if !drain(&watcher) {
                    watcher = subscribe(store);
                }
            }
            default(ORCHESTRATOR_PASS_INTERVAL) => {}
        }
    }
}

/// Empties the watcher's queue; false if the watch was dropped.
fn drain(watcher: &Watcher) -> bool {
    loop {
        match watcher.try_recv() {
            Ok(Some(_)) => {}
            Ok(None) => return true,
            Err(_) => return false,
        }
    }
}

/// True if every change of `txn` (tasks only) still applies to the store as it is now:
/// a create of an id that does not exist, an update or delete of a task at the version the
/// pass read. A transaction built on a view that moved on (an agent's report landed
/// meanwhile) would be refused at apply anyway, but only after it was written to the Raft
/// log of every manager, up to 1.5 MiB each time; a pass over 100,000 tasks that kept
/// colliding with reports wrote gigabytes of refused transactions. The check narrows that
/// to the moment between it and the proposal.
fn still_applies(store: &Store, txn: &Transaction) -> bool {
    store.view(|view| {
        txn.changes.iter().all(|change| {
            let (id, expected) = match &change.op {
                Some(change::Op::Create(object)) => match &object.object {
                    Some(store_object::Object::Task(task)) => (task.id.as_str(), None),
                    _ => return true,
                },
                Some(change::Op::Update(update)) => {
                    match update.object.as_ref().and_then(|o| o.object.as_ref()) {
                        Some(store_object::Object::Task(task)) => {
                            (task.id.as_str(), Some(update.expected_version))
                        }
                        _ => return true,
                    }
                }
                Some(change::Op::Delete(delete))
                    if Kind::from_proto(delete.kind) == Some(Kind::Task) =>
                {
                    (delete.id.as_str(), Some(delete.expected_version))
                }
                _ => return true,
            };
            let current = view
                .get::<Task>(id)
                .map(|task| task.meta.as_ref().map_or(0, |meta| meta.version));
            match (expected, current) {
                (None, found) => found.is_none(),
                (Some(0), found) => found.is_some(),
                (Some(version), found) => found == Some(version),
            }
        })
    })
}

/// Reconciles once and proposes the result, transaction by transaction; stops early when
/// a proposal fails or the thread is asked to stop (the rest is recomputed next pass).
/// Returns the number of transactions the pass wanted to propose, and how long it took to
/// compute them (the waits for proposals excluded: they cost no CPU here).
fn run_pass(node: &NodeHandle, store: &Store, stopped: &Receiver<()>) -> (usize, Duration) {
    let started = Instant::now();
    let now = now_ms();
    let snapshot = store.view(super::Snapshot::capture);
    let transactions = super::reconcile_snapshot(&snapshot, now);
    let took = started.elapsed();
    for txn in &transactions {
        if !matches!(stopped.try_recv(), Err(TryRecvError::Empty)) {
            break;
        }
        if !still_applies(store, txn) {
            log::debug!("orchestrator: the store moved on since the pass read it; next pass");
            break;
        }
        match propose_transaction(node, txn, PROPOSE_TIMEOUT) {
            Ok(version) => log::debug!(
                "orchestrator: {} task changes committed at version {version}",
                txn.changes.len()
            ),
            Err(status) => {
                log::debug!("orchestrator: proposal refused, retrying next pass: {status}");
                break;
            }
        }
    }
    (transactions.len(), took)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{create, delete, update_expecting};

    fn task(id: &str) -> Task {
        Task {
            id: id.into(),
            service_id: "svc".into(),
            ..Default::default()
        }
    }

    fn txn(changes: Vec<crate::proto::objects::Change>) -> Transaction {
        Transaction {
            changes,
            timestamp_ms: 1,
            request_id: None,
        }
    }

    #[test]
    fn a_transaction_on_a_view_the_store_moved_past_is_not_proposed() {
        let store = Store::default();
        store.apply(1, &txn(vec![create(task("a"))])).unwrap();
        store.apply(2, &txn(vec![create(task("b"))])).unwrap();
        let read = |id: &str| store.get::<Task>(id).unwrap().as_ref().clone();
        assert!(still_applies(&store, &txn(vec![create(task("c"))])));
        assert!(still_applies(
            &store,
            &txn(vec![
                update_expecting(read("a"), 1),
                delete(Kind::Task, "b", 2)
            ])
        ));
        // An agent's report moved "a" on: the pass's update would be refused at apply.
        store
            .apply(3, &txn(vec![update_expecting(read("a"), 1)]))
            .unwrap();
        let stale = txn(vec![create(task("c")), update_expecting(read("b"), 2), {
            let mut old = read("a");
            old.meta = None;
            update_expecting(old, 1)
        }]);
        assert!(!still_applies(&store, &stale));
        assert!(!still_applies(&store, &txn(vec![create(task("a"))])));
        assert!(!still_applies(
            &store,
            &txn(vec![delete(Kind::Task, "b", 1)])
        ));
    }
}
