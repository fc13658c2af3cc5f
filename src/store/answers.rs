//! The table of answers: exactly-once writes (the Raft thesis's client sessions, §6.3).
//!
//! A transaction that carries a [`RequestId`] has its outcome recorded here by the same
//! apply that makes its effects, under the same lock: any view that shows the effects also
//! shows the answer. A repeat of the request (a client's retry after an unknown outcome, or
//! a second copy of it in the log) is answered from the table instead of being applied
//! again, so a retried `update --if-version N` gets its first attempt's success, never a
//! conflict with its own write. One entry per client, its latest request: a client sends
//! one write at a time, a new `seq` for each, the same `seq` on every retry.
//!
//! Bounded: at most [`ANSWERS_CLIENTS_MAX`] clients, the one answered longest ago (lowest
//! log index) leaving first; and an entry leaves once a transaction stamped
//! [`ANSWER_TTL_MS`] after it is applied. Both rules read only the log (indexes and the
//! transactions' leader timestamps), so every manager keeps the same table; it travels in
//! store snapshots.
//!
//! Must never read a clock, a random source or anything outside the log, and never answer a
//! request it did not record.

use std::collections::{BTreeMap, HashMap};

use crate::proto::objects::{RecordedAnswer, RequestId, Transaction, change, store_object};
use crate::wire::Code;

use super::txn::TxnError;

/// Clients whose latest answer the table keeps; beyond it, the oldest answer leaves. A
/// client whose answer left before its retry arrived gets the retry applied as new.
pub const ANSWERS_CLIENTS_MAX: usize = 10_000;

/// How long an answer is kept, in the log's time: it leaves once a transaction stamped this
/// much later (by its leader's clock) is applied. A CLI retries for about a minute at most.
pub const ANSWER_TTL_MS: i64 = 60 * 60 * 1000;

/// The longest refusal message kept (longer ones are cut at a character boundary): the
/// table's memory is bounded by clients × this.
pub const ANSWER_MESSAGE_BYTES_MAX: usize = 1024;

/// The longest client id accepted (clients use 16 random bytes).
pub const CLIENT_ID_BYTES_MAX: usize = 32;

/// What a request's transaction did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// It was applied and wrote this version (its log index).
    Written {
        /// The version written.
        version: u64,
    },
    /// It was refused, with this code and message; it changed nothing.
    Refused {
        /// The refusal's status code.
        code: Code,
        /// The refusal's message (at most [`ANSWER_MESSAGE_BYTES_MAX`] bytes).
        message: String,
    },
}

/// One client's latest request and its answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    /// The request's number.
    pub seq: u64,
    /// The log index of the transaction that answered it.
    pub index: u64,
    /// That transaction's timestamp.
    pub timestamp_ms: i64,
    /// The outcome.
    pub answer: Answer,
    /// The id of the object the transaction's first change wrote or deleted (for replies
    /// that name it, e.g. a removal's, when the object is gone).
    pub object_id: String,
}

impl Recorded {
    /// The answer again: the version written, or the refusal.
    ///
    /// # Errors
    /// [`TxnError::Repeated`] with the first refusal's code and message.
    pub fn replay(&self) -> Result<u64, TxnError> {
        match &self.answer {
            Answer::Written { version } => Ok(*version),
            Answer::Refused { code, message } => Err(TxnError::Repeated {
                code: *code,
                message: message.clone(),
            }),
        }
    }
}

/// What the table knows of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// Not seen (or its answer has left the table): apply it.
    New,
    /// Answered already: answer the same again.
    Repeat(&'a Recorded),
    /// The client has sent a later request since: this one's answer is no longer kept.
    Superseded {
        /// The client's latest request number.
        latest_seq: u64,
    },
}

/// A checked request id (see [`checked_request`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    /// The client's id.
    pub client_id: &'a [u8],
    /// The request's number.
    pub seq: u64,
}

/// The request `txn` carries, if any.
///
/// # Errors
/// [`TxnError::InvalidRequestId`] for an empty or too long client id or a zero `seq`.
pub fn checked_request(txn: &Transaction) -> Result<Option<Request<'_>>, TxnError> {
    let Some(id) = txn.request_id.as_ref() else {
        return Ok(None);
    };
    let invalid = |reason: String| Err(TxnError::InvalidRequestId { reason });
    if id.client_id.is_empty() || id.client_id.len() > CLIENT_ID_BYTES_MAX {
        return invalid(format!(
            "client_id is {} bytes; it must be 1 to {CLIENT_ID_BYTES_MAX}",
            id.client_id.len()
        ));
    }
    if id.seq == 0 {
        return invalid("seq is 0; requests are numbered from 1".to_string());
    }
    Ok(Some(Request {
        client_id: &id.client_id,
        seq: id.seq,
    }))
}

/// The id of the object the first change of `txn` names (empty if none).
pub fn first_object_id(txn: &Transaction) -> String {
    let Some(op) = txn.changes.first().and_then(|c| c.op.as_ref()) else {
        return String::new();
    };
    let object = match op {
        change::Op::Create(object) => Some(object),
        change::Op::Update(update) => update.object.as_ref(),
        change::Op::Delete(delete) => return delete.id.clone(),
    };
    match object.and_then(|o| o.object.as_ref()) {
        Some(store_object::Object::Node(o)) => o.id.clone(),
        Some(store_object::Object::Service(o)) => o.id.clone(),
        Some(store_object::Object::Task(o)) => o.id.clone(),
        Some(store_object::Object::Network(o)) => o.id.clone(),
        Some(store_object::Object::Cluster(o)) => o.id.clone(),
        Some(store_object::Object::Secret(o)) => o.id.clone(),
        Some(store_object::Object::Config(o)) => o.id.clone(),
        None => String::new(),
    }
}

/// `message` cut to at most [`ANSWER_MESSAGE_BYTES_MAX`] bytes at a character boundary.
fn bounded_message(message: &str) -> String {
    let mut end = message.len().min(ANSWER_MESSAGE_BYTES_MAX);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message[..end].to_string()
}

impl Answer {
    /// The answer a transaction's outcome records.
    pub fn of<T>(outcome: &Result<T, TxnError>, version: u64) -> Answer {
        match outcome {
            Ok(_) => Answer::Written { version },
            Err(error) => Answer::Refused {
                code: error.code(),
                message: bounded_message(&error.to_string()),
            },
        }
    }
}

/// The latest answer of each client, with the order in which they leave.
#[derive(Clone, Debug, Default)]
pub(crate) struct AnswerTable {
    by_client: HashMap<Vec<u8>, Recorded>,
    /// Client ids by the log index of their answer: the first leaves first.
    by_index: BTreeMap<u64, Vec<u8>>,
}

impl AnswerTable {
    /// Clients with an answer.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_client.len()
    }

    /// What the table knows of `request`.
    pub(crate) fn lookup(&self, request: Request<'_>) -> Lookup<'_> {
        match self.by_client.get(request.client_id) {
            None => Lookup::New,
            Some(recorded) if recorded.seq == request.seq => Lookup::Repeat(recorded),
            Some(recorded) if recorded.seq > request.seq => Lookup::Superseded {
                latest_seq: recorded.seq,
            },
            Some(_) => Lookup::New,
        }
    }

    /// Records `recorded` as the latest answer of `client_id` (replacing its earlier one),
    /// then lets the oldest answers go beyond [`ANSWERS_CLIENTS_MAX`].
    pub(crate) fn record(&mut self, client_id: &[u8], recorded: Recorded) {
        let index = recorded.index;
        if let Some(old) = self.by_client.insert(client_id.to_vec(), recorded) {
            self.by_index.remove(&old.index);
        }
        let displaced = self.by_index.insert(index, client_id.to_vec());
        debug_assert!(displaced.is_none(), "one transaction per log index");
        while self.by_client.len() > ANSWERS_CLIENTS_MAX {
            self.remove_oldest();
        }
    }

    /// Lets go of every answer, oldest first, whose transaction was stamped more than
    /// [`ANSWER_TTL_MS`] before `now_ms` (the timestamp of the transaction being applied).
    /// Stops at the first younger one: leader clocks may disagree a little, so an entry
    /// behind a younger one waits for it (the bound stays [`ANSWERS_CLIENTS_MAX`]).
    pub(crate) fn expire(&mut self, now_ms: i64) {
        while let Some((_, client_id)) = self.by_index.first_key_value() {
            let recorded = self
                .by_client
                .get(client_id)
                .expect("both maps hold the same clients");
            if recorded.timestamp_ms.saturating_add(ANSWER_TTL_MS) >= now_ms {
                break;
            }
            self.remove_oldest();
        }
    }

    fn remove_oldest(&mut self) {
        if let Some((_, client_id)) = self.by_index.pop_first() {
            self.by_client.remove(&client_id);
        }
    }

    /// Every answer, oldest first, in its snapshot form.
    pub(crate) fn to_records(&self) -> Vec<RecordedAnswer> {
        self.by_index
            .values()
            .map(|client_id| {
                let recorded = &self.by_client[client_id];
                let (version, code, message) = match &recorded.answer {
                    Answer::Written { version } => (*version, Code::Ok, String::new()),
                    Answer::Refused { code, message } => (0, *code, message.clone()),
                };
                RecordedAnswer {
                    request_id: Some(RequestId {
                        client_id: bytes::Bytes::copy_from_slice(client_id),
                        seq: recorded.seq,
                    }),
                    index: recorded.index,
                    timestamp_ms: recorded.timestamp_ms,
                    version,
                    code: code as u32,
                    message,
                    object_id: recorded.object_id.clone(),
                }
            })
            .collect()
    }

    /// Adds one answer read from a snapshot, which must be newer than every one before it
    /// and no later than `applied_index`.
    ///
    /// # Errors
    /// What is wrong with the record.
    pub(crate) fn load(
        &mut self,
        record: RecordedAnswer,
        applied_index: u64,
    ) -> Result<(), String> {
        let id = record.request_id.unwrap_or_default();
        if id.client_id.is_empty() || id.client_id.len() > CLIENT_ID_BYTES_MAX || id.seq == 0 {
            return Err("its request id is malformed".into());
        }
        if record.index == 0 || record.index > applied_index {
            return Err(format!(
                "its index {} is not within the snapshot (applied index {applied_index})",
                record.index
            ));
        }
        if self
            .by_index
            .last_key_value()
            .is_some_and(|(last, _)| *last >= record.index)
        {
            return Err("answers are not in log order".into());
        }
        if self.by_client.contains_key(id.client_id.as_ref()) {
            return Err("a client appears twice".into());
        }
        if self.by_client.len() >= ANSWERS_CLIENTS_MAX {
            return Err(format!("more than {ANSWERS_CLIENTS_MAX} answers"));
        }
        let answer = match Code::from_u32(record.code) {
            Code::Ok => Answer::Written {
                version: record.version,
            },
            code => Answer::Refused {
                code,
                message: record.message,
            },
        };
        self.record(
            &id.client_id,
            Recorded {
                seq: id.seq,
                index: record.index,
                timestamp_ms: record.timestamp_ms,
                answer,
                object_id: record.object_id,
            },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(seq: u64, index: u64, timestamp_ms: i64) -> Recorded {
        Recorded {
            seq,
            index,
            timestamp_ms,
            answer: Answer::Written { version: index },
            object_id: format!("o{index}"),
        }
    }

    fn request(client_id: &[u8], seq: u64) -> Request<'_> {
        Request { client_id, seq }
    }

    #[test]
    fn a_repeat_finds_its_answer_a_later_request_is_new_an_earlier_one_superseded() {
        let mut table = AnswerTable::default();
        assert_eq!(table.lookup(request(b"c", 1)), Lookup::New);
        table.record(b"c", recorded(1, 10, 0));
        assert_eq!(
            table.lookup(request(b"c", 1)),
            Lookup::Repeat(&recorded(1, 10, 0))
        );
        assert_eq!(table.lookup(request(b"c", 2)), Lookup::New);
        assert_eq!(table.lookup(request(b"other", 1)), Lookup::New);
        table.record(b"c", recorded(2, 11, 0));
        assert_eq!(table.len(), 1, "one entry per client");
        assert_eq!(
            table.lookup(request(b"c", 1)),
            Lookup::Superseded { latest_seq: 2 }
        );
    }

    #[test]
    fn beyond_the_bound_the_answer_given_longest_ago_leaves() {
        let mut table = AnswerTable::default();
        for n in 0..ANSWERS_CLIENTS_MAX as u64 {
            table.record(&n.to_be_bytes(), recorded(1, n + 1, 0));
        }
        // Client 0 answers again: now client 1's answer is the oldest.
        table.record(&0u64.to_be_bytes(), recorded(2, 20_000, 0));
        table.record(b"new", recorded(1, 20_001, 0));
        assert_eq!(table.len(), ANSWERS_CLIENTS_MAX);
        assert_eq!(table.lookup(request(&1u64.to_be_bytes(), 1)), Lookup::New);
        assert!(matches!(
            table.lookup(request(&0u64.to_be_bytes(), 2)),
            Lookup::Repeat(_)
        ));
        assert!(matches!(
            table.lookup(request(&2u64.to_be_bytes(), 1)),
            Lookup::Repeat(_)
        ));
    }

    #[test]
    fn answers_expire_in_log_time_oldest_first() {
        let mut table = AnswerTable::default();
        table.record(b"a", recorded(1, 1, 1_000));
        table.record(b"b", recorded(1, 2, 5_000));
        table.expire(1_000 + ANSWER_TTL_MS);
        assert_eq!(table.len(), 2, "kept for the whole TTL");
        table.expire(1_001 + ANSWER_TTL_MS);
        assert_eq!(table.lookup(request(b"a", 1)), Lookup::New);
        assert!(matches!(table.lookup(request(b"b", 1)), Lookup::Repeat(_)));
        // A leader whose clock is behind expires nothing.
        table.expire(0);
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn the_snapshot_form_round_trips_and_bad_records_are_refused() {
        let mut table = AnswerTable::default();
        table.record(b"a", recorded(3, 5, 100));
        table.record(
            b"b",
            Recorded {
                seq: 1,
                index: 7,
                timestamp_ms: 200,
                answer: Answer::Refused {
                    code: Code::Aborted,
                    message: "version conflict".into(),
                },
                object_id: "svc".into(),
            },
        );
        let records = table.to_records();
        let mut copy = AnswerTable::default();
        for record in records.clone() {
            copy.load(record, 7).unwrap();
        }
        assert_eq!(copy.to_records(), records);
        assert_eq!(
            copy.lookup(request(b"b", 1)),
            table.lookup(request(b"b", 1))
        );

        let mut beyond = AnswerTable::default();
        assert!(
            beyond.load(records[1].clone(), 6).is_err(),
            "after the snapshot"
        );
        let mut unordered = AnswerTable::default();
        unordered.load(records[1].clone(), 7).unwrap();
        assert!(unordered.load(records[0].clone(), 7).is_err());
        let mut malformed = records[0].clone();
        malformed.request_id = None;
        assert!(AnswerTable::default().load(malformed, 7).is_err());
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        let message = "é".repeat(ANSWER_MESSAGE_BYTES_MAX);
        let cut = bounded_message(&message);
        assert!(cut.len() <= ANSWER_MESSAGE_BYTES_MAX);
        assert!(message.starts_with(&cut));
    }
}
