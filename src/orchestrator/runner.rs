//! The `flotilla-orchestrator` thread, one per manager: runs [`reconcile`](super::reconcile)
//! on the Raft leader and proposes what it returns.
//!
//! Event-driven: the thread waits for the store's watch events (nodes, services, tasks, the
//! cluster), and a pass reconciles only the services they touch ([`Tracker`]), so its work
//! grows with the change, not with the cluster. A full pass (every task) runs on becoming
//! leader, after the watch lost events (it fell behind, or a snapshot was restored), and
//! every [`ORCHESTRATOR_FULL_PASS_INTERVAL`] as a safety net. The clock makes work only
//! where a pass said it would (a restart delay or window ends, a node's down grace ends):
//! the thread sleeps until the earliest of those. At rest it wakes every
//! [`LEADERSHIP_POLL`] to look at the leader (an atomic load) and nothing else.
//!
//! A burst of events is gathered for [`CHANGE_COALESCE`] (or as long as the last pass took,
//! so passes take at most half of the thread's time) before the pass. On a follower the
//! thread holds no watch and does nothing. A new leader first waits for a read barrier (it
//! has applied everything committed before its term), so it does not act on a view its
//! predecessor had already moved past.
//!
//! A proposal that fails (`Aborted` because a task changed since the pass read it, a lost
//! leadership, a timeout) ends the pass, and its services are reconciled again at the next
//! one. Must never hold the store's lock while proposing, nor propose on a follower.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, bounded, never, select};

use crate::proto::objects::{Task, Transaction, change, store_object};
use crate::raft::node::NodeHandle;
use crate::replication::{PROPOSE_TIMEOUT, propose_transaction};
use crate::store::{Kind, Store};
use crate::util::clock::unix_now_ms as now_ms;

use super::tracker::{Capture, Tracker};

/// How often the leader reconciles every task even though no event asked for it: a safety
/// net against a missed dependency, not a mechanism anything relies on (a full pass over
/// 100,000 tasks costs about half a second: under 0.5 % of a core at this interval).
pub const ORCHESTRATOR_FULL_PASS_INTERVAL: Duration = Duration::from_secs(120);

/// The orchestrator's watch queue bound; a burst beyond it drops the watch, and a full
/// pass follows. The thread empties the queue after every proposal, so its own passes
/// (at most 200 changes a transaction) never fill it.
pub const ORCHESTRATOR_WATCH_QUEUE_EVENTS_MAX: usize = 8192;

/// How often the thread looks at who leads while nothing else wakes it.
const LEADERSHIP_POLL: Duration = Duration::from_millis(200);

/// How long after a change the pass waits, so one pass covers a burst of transactions.
const CHANGE_COALESCE: Duration = Duration::from_millis(10);

/// How long a new leader waits for its read barrier before the next attempt.
const READ_BARRIER_TIMEOUT: Duration = Duration::from_secs(2);

/// What the thread needs from the Raft node: whether it leads, the read barrier, and the
/// proposal of a transaction (a trait so that a benchmark can run the thread on a store
/// without Raft).
pub trait Proposer {
    /// True if this manager is the Raft leader now.
    fn is_leader(&self) -> bool;
    /// Waits until this leader has applied everything committed before its term; false if
    /// that did not happen within the barrier's timeout.
    fn catch_up(&self) -> bool;
    /// Proposes `txn` and waits for it to be applied.
    ///
    /// # Errors
    /// Why it was not committed (refused, aborted, lost leadership, timed out).
    fn propose(&self, txn: &Transaction) -> Result<u64, String>;
}

impl Proposer for NodeHandle {
    fn is_leader(&self) -> bool {
        self.leader() == Some(self.id())
    }

    fn catch_up(&self) -> bool {
        self.read_barrier_local(READ_BARRIER_TIMEOUT).is_ok()
    }

    fn propose(&self, txn: &Transaction) -> Result<u64, String> {
        propose_transaction(self, txn, PROPOSE_TIMEOUT).map_err(|status| status.to_string())
    }
}

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
            .spawn(move || run_with(&node, &store, &stopped))?;
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

/// The thread's loop, until `stopped` fires or its sender is dropped: passes on `store`
/// while `proposer` leads (see the module doc).
pub fn run_with(proposer: &impl Proposer, store: &Store, stopped: &Receiver<()>) {
    let mut tracker = Tracker::new();
    let mut caught_up = false;
    let mut last_full = Instant::now();
    // How long the last pass computed (see `CHANGE_COALESCE`).
    let mut last_took = Duration::ZERO;
    loop {
        if !proposer.is_leader() {
            caught_up = false;
            // A follower holds no watch: a new lead starts with a full pass.
            tracker = Tracker::new();
        } else {
            if !caught_up {
                caught_up = proposer.catch_up();
                tracker = Tracker::new();
            }
        }
        if caught_up {
            if last_full.elapsed() >= ORCHESTRATOR_FULL_PASS_INTERVAL {
                tracker.require_full();
            }
            let started = Instant::now();
            let capture = tracker.capture(store, now_ms());
            if matches!(capture, Capture::Full(_)) {
                last_full = started;
            }
            if !matches!(capture, Capture::Nothing) {
                last_took = run_pass(proposer, store, &mut tracker, &capture, stopped);
            }
        }
        let wait = if caught_up {
            let until_wakeup = tracker.next_wakeup_ms().map_or(LEADERSHIP_POLL, |at_ms| {
                Duration::from_millis(u64::try_from(at_ms.saturating_sub(now_ms())).unwrap_or(0))
            });
            let until_full = ORCHESTRATOR_FULL_PASS_INTERVAL.saturating_sub(last_full.elapsed());
            LEADERSHIP_POLL.min(until_wakeup).min(until_full)
        } else {
            LEADERSHIP_POLL
        };
        let events = tracker.receiver().cloned().unwrap_or_else(never);
        select! {
            recv(stopped) -> _ => return,
            recv(events) -> event => {
                tracker.take(event.ok());
                // Gather the rest of a burst; a stop (the sender dropped) ends the wait too.
                let gather = CHANGE_COALESCE.max(last_took);
                if !matches!(stopped.recv_timeout(gather), Err(RecvTimeoutError::Timeout)) {
                    return;
                }
            }
            default(wait) => {}
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

/// Reconciles `capture` and proposes the result, transaction by transaction; stops early
/// when a proposal fails or the thread is asked to stop (the tracker then has the pass's
/// services looked at again). Returns how long the pass took to compute (the waits for
/// proposals excluded: they cost no CPU here).
fn run_pass(
    proposer: &impl Proposer,
    store: &Store,
    tracker: &mut Tracker,
    capture: &Capture,
    stopped: &Receiver<()>,
) -> Duration {
    let started = Instant::now();
    let snapshot = match capture {
        Capture::Full(snapshot) | Capture::Scoped { snapshot, .. } => snapshot,
        Capture::Nothing => return Duration::ZERO,
    };
    let outcome = super::reconcile_pass(snapshot, now_ms());
    let took = started.elapsed();
    tracker.record_wakeups(outcome.wakeups_ms);
    for txn in &outcome.transactions {
        if !matches!(stopped.try_recv(), Err(TryRecvError::Empty)) {
            tracker.pass_incomplete(capture);
            break;
        }
        if !still_applies(store, txn) {
            log::debug!("orchestrator: the store moved on since the pass read it; next pass");
            tracker.pass_incomplete(capture);
            break;
        }
        match proposer.propose(txn) {
            Ok(version) => log::debug!(
                "orchestrator: {} task changes committed at version {version}",
                txn.changes.len()
            ),
            Err(status) => {
                log::debug!("orchestrator: proposal refused, retrying next pass: {status}");
                tracker.pass_incomplete(capture);
                break;
            }
        }
        tracker.drain();
    }
    took
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
