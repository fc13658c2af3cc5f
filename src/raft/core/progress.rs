//! The leader's view of one peer's replication: match/next indexes and flow control.
//!
//! It must never decide commitment or send anything itself: the core reads it to do both.

use std::collections::VecDeque;

use crate::raft::types::LogIndex;

/// How the leader is currently feeding a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicationState {
    /// Unknown position: one append at a time until one is accepted.
    Probe,
    /// Known position: appends are pipelined up to the inflight limits.
    Replicate,
    /// A snapshot at `index` is on its way; no appends until it is acknowledged.
    Snapshot {
        /// Index of the snapshot sent.
        index: LogIndex,
    },
}

/// Replication progress of one peer, kept by the leader.
#[derive(Clone, Debug)]
pub struct Progress {
    /// Highest index known to match the leader's log durably on the peer.
    pub match_index: LogIndex,
    /// Next index to send.
    pub next_index: LogIndex,
    /// Current replication mode.
    pub state: ReplicationState,
    /// In probe mode: an append was sent and no answer came yet.
    pub probe_sent: bool,
    /// Appends in flight: (last index carried, payload bytes), oldest first.
    pub inflight: VecDeque<(LogIndex, u64)>,
    /// Sum of the payload bytes in `inflight`.
    pub inflight_bytes: u64,
    /// Heard from since the last check-quorum round.
    pub recent_active: bool,
    /// Highest heartbeat round the peer echoed in this term.
    pub round_acked: u64,
    /// Leader tick of the last progress (acknowledgement or state change).
    pub last_progress_tick: u64,
}

impl Progress {
    /// A fresh progress for a leader whose last index is `last_index`.
    pub fn new(last_index: LogIndex, now_tick: u64) -> Self {
        Self {
            match_index: 0,
            next_index: last_index + 1,
            state: ReplicationState::Probe,
            probe_sent: false,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            recent_active: false,
            round_acked: 0,
            last_progress_tick: now_tick,
        }
    }

    /// Back to probing from just after the match index.
    pub fn become_probe(&mut self, now_tick: u64) {
        if let ReplicationState::Snapshot { index } = self.state {
            self.next_index = self.match_index.max(index) + 1;
        } else {
            self.next_index = self.match_index + 1;
        }
        self.state = ReplicationState::Probe;
        self.reset_inflight();
        self.probe_sent = false;
        self.last_progress_tick = now_tick;
    }

    /// Start pipelining right after the match index.
    pub fn become_replicate(&mut self, now_tick: u64) {
        self.state = ReplicationState::Replicate;
        self.next_index = self.match_index + 1;
        self.reset_inflight();
        self.probe_sent = false;
        self.last_progress_tick = now_tick;
    }

    /// A snapshot at `index` is being sent.
    pub fn become_snapshot(&mut self, index: LogIndex, now_tick: u64) {
        self.state = ReplicationState::Snapshot { index };
        self.reset_inflight();
        self.probe_sent = false;
        self.last_progress_tick = now_tick;
    }

    fn reset_inflight(&mut self) {
        self.inflight.clear();
        self.inflight_bytes = 0;
    }

    /// Records an acknowledgement up to `index`; true if it moved the match index.
    pub fn acknowledge(&mut self, index: LogIndex, now_tick: u64) -> bool {
        let moved = index > self.match_index;
        if moved {
            self.match_index = index;
            self.last_progress_tick = now_tick;
        }
        self.next_index = self.next_index.max(index + 1);
        while let Some(&(last, bytes)) = self.inflight.front() {
            if last > index {
                break;
            }
            self.inflight.pop_front();
            self.inflight_bytes -= bytes;
        }
        moved
    }

    /// True if no append may be sent now.
    pub fn is_paused(&self, msgs_max: usize, bytes_max: u64) -> bool {
        match self.state {
            ReplicationState::Probe => self.probe_sent,
            ReplicationState::Replicate => {
                self.inflight.len() >= msgs_max || self.inflight_bytes >= bytes_max
            }
            ReplicationState::Snapshot { .. } => true,
        }
    }

    /// Records an append carrying entries up to `last` (`bytes` of payload) just sent.
    pub fn sent_append(&mut self, last: LogIndex, bytes: u64, entries_sent: bool) {
        match self.state {
            ReplicationState::Replicate => {
                if entries_sent {
                    self.next_index = last + 1;
                    self.inflight.push_back((last, bytes));
                    self.inflight_bytes += bytes;
                }
            }
            ReplicationState::Probe => self.probe_sent = true,
            ReplicationState::Snapshot { .. } => {
                unreachable!("appends are never sent while a snapshot is in flight")
            }
        }
    }

    /// Frees the oldest inflight slot so a heartbeat answer can unblock a full pipeline.
    pub fn free_first_inflight(&mut self) {
        if let Some((_, bytes)) = self.inflight.pop_front() {
            self.inflight_bytes -= bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipeline_fills_and_drains() {
        let mut p = Progress::new(10, 0);
        p.match_index = 10;
        p.become_replicate(0);
        assert_eq!(p.next_index, 11);
        p.sent_append(12, 100, true);
        p.sent_append(15, 100, true);
        assert!(p.is_paused(2, 1000));
        assert!(p.is_paused(5, 200));
        assert!(!p.is_paused(5, 1000));
        assert!(p.acknowledge(12, 1));
        assert_eq!(p.inflight.len(), 1);
        assert_eq!(p.inflight_bytes, 100);
        assert!(
            !p.acknowledge(11, 2),
            "a stale acknowledgement does not move match"
        );
        assert_eq!(p.next_index, 16);
    }

    #[test]
    fn probe_sends_one_at_a_time() {
        let mut p = Progress::new(5, 0);
        assert!(!p.is_paused(1, 1));
        p.sent_append(6, 10, true);
        assert!(p.is_paused(1, 1));
        assert_eq!(
            p.next_index, 6,
            "probing does not advance next optimistically"
        );
    }
}
