//! The leader's log broker (swarmkit's `logbroker`): the open log subscriptions, the
//! subscription messages sent in the agents' sessions, and `dispatcher.PublishLogs`, where
//! the agents' lines arrive.
//!
//! A subscription is a bounded queue (`control::logs::LOG_QUEUE_BATCHES_MAX` batches) read
//! by one control log thread; a publisher never waits for it: a batch that finds it full is
//! dropped and counted (the reader is warned with the count), while closes and missing
//! tasks go to the subscription's shared state, which is never dropped. Subscriptions live
//! in memory only: a new leader has none, and the agents' publishes are answered
//! `NotFound` (they stop).
//!
//! Must never block a `PublishLogs` call, accept lines from a node the subscription was
//! not sent to, or hold more than [`SUBSCRIPTIONS_MAX`] subscriptions.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crossbeam_channel::{Sender, TrySendError};
use parking_lot::Mutex;

use crate::control::logs::{LOG_QUEUE_BATCHES_MAX, LogBatch, LogFeed, LogFeedState};
use crate::proto::dispatcher as pb;
use crate::wire::Status;

/// Subscriptions the leader holds at once (each has a control log thread; the control
/// API's thread limit comes first in practice).
pub const SUBSCRIPTIONS_MAX: usize = 1024;

/// One open subscription.
struct Open {
    batches: Sender<LogBatch>,
    state: Arc<LogFeedState>,
    /// Nodes it was sent to: the only ones that may publish for it.
    nodes: HashSet<String>,
}

/// The open subscriptions, by id.
#[derive(Default)]
pub struct LogBroker {
    open: Mutex<HashMap<String, Open>>,
}

impl LogBroker {
    /// A new subscription (refused past [`SUBSCRIPTIONS_MAX`]: its queue is closed at once,
    /// so its reader ends).
    pub fn open(&self) -> LogFeed {
        let (tx, rx) = crossbeam_channel::bounded(LOG_QUEUE_BATCHES_MAX);
        let id = crate::util::id::random_id();
        let state = Arc::new(LogFeedState::default());
        let mut open = self.open.lock();
        if open.len() < SUBSCRIPTIONS_MAX {
            open.insert(
                id.clone(),
                Open {
                    batches: tx,
                    state: state.clone(),
                    nodes: HashSet::new(),
                },
            );
        } else {
            log::warn!("dispatcher: {SUBSCRIPTIONS_MAX} log subscriptions open; refusing one");
        }
        LogFeed {
            id,
            batches: rx,
            state,
        }
    }

    /// Records that subscription `id` was sent to `node_id`; false if it is not open.
    pub fn note_sent(&self, id: &str, node_id: &str) -> bool {
        match self.open.lock().get_mut(id) {
            Some(open) => {
                open.nodes.insert(node_id.to_string());
                true
            }
            None => false,
        }
    }

    /// Forgets subscription `id`.
    pub fn close(&self, id: &str) {
        self.open.lock().remove(id);
    }

    /// Forgets every subscription (this manager stops leading): their readers end.
    pub fn clear(&self) {
        self.open.lock().clear();
    }

    /// Takes what `node_id` published.
    ///
    /// # Errors
    /// `NotFound`: the subscription is not open (the agent stops); `PermissionDenied`: it
    /// was not sent to this node.
    pub fn publish(&self, node_id: &str, request: pb::PublishLogsRequest) -> Result<(), Status> {
        let open = self.open.lock();
        let Some(subscription) = open.get(&request.subscription_id) else {
            return Err(Status::not_found(format!(
                "log subscription {} is not open on this manager (its reader left, or the \
                 leader changed); stop sending",
                request.subscription_id
            )));
        };
        if !subscription.nodes.contains(node_id) {
            return Err(Status::permission_denied(format!(
                "log subscription {} was not sent to node {node_id}",
                request.subscription_id
            )));
        }
        let state = &subscription.state;
        if !request.missing_task_ids.is_empty() {
            state.missing.lock().extend(request.missing_task_ids);
        }
        if !request.lines.is_empty() {
            let count = request.lines.len() as u64;
            let batch = LogBatch {
                node_id: node_id.to_string(),
                lines: request.lines,
            };
            if let Err(TrySendError::Full(_)) = subscription.batches.try_send(batch) {
                state.dropped_lines.fetch_add(count, Ordering::AcqRel);
            }
        }
        if request.close {
            state.closed.lock().insert(node_id.to_string());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Code;

    fn lines(n: usize) -> Vec<pb::LogLine> {
        (0..n)
            .map(|i| pb::LogLine {
                task_id: "t".into(),
                data: format!("{i}").into_bytes().into(),
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn a_full_queue_drops_and_counts_while_closes_are_kept() {
        let broker = LogBroker::default();
        let feed = broker.open();
        assert!(broker.note_sent(&feed.id, "n1"));
        let request = |close| pb::PublishLogsRequest {
            subscription_id: feed.id.clone(),
            lines: lines(2),
            close,
            ..Default::default()
        };
        for _ in 0..LOG_QUEUE_BATCHES_MAX + 3 {
            broker.publish("n1", request(false)).expect("publish");
        }
        broker.publish("n1", request(true)).expect("publish");
        assert_eq!(feed.batches.len(), LOG_QUEUE_BATCHES_MAX);
        assert_eq!(feed.state.dropped_lines.load(Ordering::Acquire), 8);
        assert!(feed.state.closed.lock().contains("n1"));
        let stranger = broker
            .publish("n2", request(false))
            .expect_err("not sent to n2");
        assert_eq!(stranger.code, Code::PermissionDenied);
        broker.close(&feed.id);
        let gone = broker.publish("n1", request(false)).expect_err("closed");
        assert_eq!(gone.code, Code::NotFound);
    }
}
