//! The `flotilla-orchestrator` thread, one per manager: runs [`reconcile`](super::reconcile)
//! on the Raft leader and proposes what it returns.
//!
//! A pass runs every [`ORCHESTRATOR_PASS_INTERVAL`] (but at most every
//! [`ORCHESTRATOR_IDLE_RECHECK`] while the store stays as it was when a pass last found
//! nothing to do) and soon after the store reports a change to nodes, services, tasks or
//! the cluster (a watch with a queue of
//! [`ORCHESTRATOR_WATCH_QUEUE_EVENTS_MAX`] events; a dropped watch is simply renewed, as the
//! next pass reads everything anyway). On a follower a pass does nothing. A new leader first
//! waits for a read barrier (it has applied everything committed before its term), so it
//! does not act on a view its predecessor had already moved past.
//!
//! A proposal that fails (`Aborted` because a task changed since the pass read it, a lost
//! leadership, a timeout) ends the pass; the next pass reads the store again. Must never
//! hold the store's lock while proposing, nor propose on a follower.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, bounded, select};

use crate::control::PROPOSE_TIMEOUT;
use crate::manager::state::propose_transaction;
use crate::raft::node::NodeHandle;
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
    loop {
        if node.leader() == Some(node.id()) {
            if !caught_up {
                caught_up = node.read_barrier_local(READ_BARRIER_TIMEOUT).is_ok();
            }
            let version = store.version();
            let still_idle = idle_since.is_some_and(|(idle_version, at)| {
                idle_version == version && at.elapsed() < ORCHESTRATOR_IDLE_RECHECK
            });
            if caught_up && !still_idle {
                let proposed = run_pass(node, store, stopped);
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

/// Reconciles once and proposes the result, transaction by transaction; stops early when
/// a proposal fails or the thread is asked to stop (the rest is recomputed next pass).
/// Returns the number of transactions the pass wanted to propose.
fn run_pass(node: &NodeHandle, store: &Store, stopped: &Receiver<()>) -> usize {
    let now = now_ms();
    let snapshot = store.view(super::Snapshot::capture);
    let transactions = super::reconcile_snapshot(&snapshot, now);
    for txn in &transactions {
        if !matches!(stopped.try_recv(), Err(TryRecvError::Empty)) {
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
    transactions.len()
}
