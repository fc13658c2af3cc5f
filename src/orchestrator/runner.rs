//! The `flotilla-orchestrator` thread, one per manager: runs [`reconcile`](super::reconcile)
//! on the Raft leader and proposes what it returns.
//!
//! A pass runs every [`ORCHESTRATOR_PASS_INTERVAL`] and soon after the store reports a
//! change to nodes, services, tasks or the cluster (a watch with a queue of
//! [`ORCHESTRATOR_WATCH_QUEUE_EVENTS_MAX`] events; a dropped watch is simply renewed, as the
//! next pass reads everything anyway). On a follower a pass does nothing. A new leader first
//! waits for a read barrier (it has applied everything committed before its term), so it
//! does not act on a view its predecessor had already moved past.
//!
//! A proposal that fails (`Aborted` because a task changed since the pass read it, a lost
//! leadership, a timeout) ends the pass; the next pass reads the store again. Must never
//! hold the store's lock while proposing, nor propose on a follower.

use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TryRecvError, bounded, select};

use crate::control::PROPOSE_TIMEOUT;
use crate::manager::state::propose_transaction;
use crate::raft::node::NodeHandle;
use crate::store::{Kind, Store, WatchEvent, WatchFilter, WatchOptions, Watcher};

/// The longest wait between two passes (also the lateness bound of a restart delay).
pub const ORCHESTRATOR_PASS_INTERVAL: Duration = Duration::from_millis(200);

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
    loop {
        if node.leader() == Some(node.id()) {
            if !caught_up {
                caught_up = node.read_barrier_local(READ_BARRIER_TIMEOUT).is_ok();
            }
            if caught_up {
                run_pass(node, store, stopped);
            }
        } else {
            caught_up = false;
        }
        select! {
            recv(stopped) -> _ => return,
            recv(watcher.receiver()) -> event => {
                if !matches!(event, Ok(WatchEvent::Change(_) | WatchEvent::Commit { .. })) {
                    watcher = subscribe(store);
                }
                if stopped.recv_timeout(CHANGE_COALESCE).is_ok() {
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
fn run_pass(node: &NodeHandle, store: &Store, stopped: &Receiver<()>) {
    let now = now_ms();
    let transactions = store.view(|view| super::reconcile(view, now));
    for txn in &transactions {
        if !matches!(stopped.try_recv(), Err(TryRecvError::Empty)) {
            return;
        }
        match propose_transaction(node, txn, PROPOSE_TIMEOUT) {
            Ok(version) => log::debug!(
                "orchestrator: {} task changes committed at version {version}",
                txn.changes.len()
            ),
            Err(status) => {
                log::debug!("orchestrator: proposal refused, retrying next pass: {status}");
                return;
            }
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
