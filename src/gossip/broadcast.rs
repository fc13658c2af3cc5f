//! Transmit-limited broadcast queues (memberlist's): each queued message is piggybacked on
//! gossip packets until it was sent `transmit_limit` times, least-sent first, and a newer
//! message about the same subject replaces the queued one. Owns only queued messages; must
//! never grow past [`BROADCAST_QUEUE_LEN_MAX`] (the oldest, most-sent ones go first: bulk sync
//! repairs what a dropped broadcast would have carried).

use crate::proto::gossip::Message;

use super::codec;

/// Messages waiting in one queue at most.
pub const BROADCAST_QUEUE_LEN_MAX: usize = 4096;

#[derive(Debug)]
struct Queued {
    subject: String,
    message: Message,
    cost_bytes: usize,
    transmits: u32,
    seq: u64,
}

/// One queue (membership, or one network's table events).
#[derive(Debug, Default)]
pub(crate) struct BroadcastQueue {
    items: Vec<Queued>,
    next_seq: u64,
}

impl BroadcastQueue {
    /// Queues `message` about `subject`, replacing a queued message about the same subject.
    pub(crate) fn push(&mut self, subject: String, message: Message) {
        self.items.retain(|q| q.subject != subject);
        if self.items.len() >= BROADCAST_QUEUE_LEN_MAX {
            self.drop_most_sent();
        }
        self.next_seq += 1;
        self.items.push(Queued {
            subject,
            cost_bytes: codec::message_cost_bytes(&message),
            message,
            transmits: 0,
            seq: self.next_seq,
        });
    }

    fn drop_most_sent(&mut self) {
        let victim = self
            .items
            .iter()
            .enumerate()
            .max_by_key(|(_, q)| (q.transmits, std::cmp::Reverse(q.seq)))
            .map(|(i, _)| i);
        if let Some(i) = victim {
            self.items.swap_remove(i);
        }
    }

    /// The messages for one gossip packet (at most `budget_bytes` of packet space), least
    /// sent and then newest first; each counts one transmit, and those that reached
    /// `transmit_limit` leave the queue.
    pub(crate) fn take(&mut self, budget_bytes: usize, transmit_limit: u32) -> Vec<Message> {
        self.items
            .sort_by_key(|q| (q.transmits, std::cmp::Reverse(q.seq)));
        let mut left_bytes = budget_bytes;
        let mut out = Vec::new();
        for queued in &mut self.items {
            if queued.cost_bytes > left_bytes {
                continue;
            }
            left_bytes -= queued.cost_bytes;
            queued.transmits += 1;
            out.push(queued.message.clone());
        }
        self.items.retain(|q| q.transmits < transmit_limit);
        out
    }

    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }
}
