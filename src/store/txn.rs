//! Transactions: building them, checking their limits, and applying them to the tables
//! atomically.
//!
//! Owns the rules every manager applies identically (existence, unique names, optimistic
//! versions, limits) and the rollback that makes a failed transaction change nothing. Must
//! never read a clock, a random source or anything outside the transaction and the tables:
//! the same log must give the same store on every manager. The limits below are part of
//! those rules: changing one needs every manager upgraded before a leader relies on it.

use std::sync::Arc;

use prost::Message;

use crate::proto::objects::{
    Change, Delete, Meta, StoreObject, Transaction, Update, change, store_object,
};
use crate::wire::Code;

use super::object::{Kind, Object, Record};
use super::table::Tables;

/// The most changes one transaction may carry (swarmkit's limit). Beyond it, use
/// [`split_into_transactions`].
pub const TXN_CHANGES_MAX: usize = 200;

/// The most bytes one encoded transaction may take (1.5 MiB, swarmkit's limit), so one log
/// entry stays well inside a 4 MiB frame.
pub const TXN_BYTES_MAX: usize = 1536 * 1024;

/// The longest object id the store accepts.
pub const OBJECT_ID_BYTES_MAX: usize = 128;

/// What a transaction did to one object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// The object was created.
    Create,
    /// The object was replaced.
    Update,
    /// The object was deleted.
    Delete,
}

/// One change as the store applied it.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// The version of the transaction (its Raft log index).
    pub version: u64,
    /// What happened.
    pub action: Action,
    /// The object as stored after the change; for a delete, the object that was removed.
    pub object: Object,
    /// For an update, the object it replaced.
    pub old: Option<Object>,
}

/// What a successful [`Store::apply`](super::Store::apply) did.
#[derive(Clone, Debug)]
pub struct ApplyOutcome {
    /// The version the transaction wrote (its log index).
    pub version: u64,
    /// One event per change, in the transaction's order (none for a repeat).
    pub events: Vec<Arc<Event>>,
    /// True if this was a repeat of a request applied before ([`super::answers`]): nothing
    /// was applied now, and `version` is what the first attempt wrote.
    pub repeated: bool,
}

/// Why a transaction was refused. A refused transaction changed nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TxnError {
    /// The transaction carries no change.
    #[error("transaction has no changes; propose at least one create, update or delete")]
    Empty,
    /// Too many changes.
    #[error(
        "one write would change {changes} objects, more than the limit of {max}; change fewer \
         objects at a time (split the work into several writes)"
    )]
    TooManyChanges {
        /// Changes in the transaction.
        changes: usize,
        /// [`TXN_CHANGES_MAX`].
        max: usize,
    },
    /// The encoded transaction is too large.
    #[error(
        "one write would be {bytes} bytes encoded, more than the limit of {max}; make the \
         objects smaller or change fewer at a time (split the work into several writes)"
    )]
    TooLarge {
        /// Encoded size of the transaction.
        bytes: usize,
        /// [`TXN_BYTES_MAX`].
        max: usize,
    },
    /// A single change is larger than a whole transaction may be; it can never be applied.
    #[error(
        "change {position} alone is {bytes} bytes encoded, more than the limit of {max} for one \
         write; make the object smaller (fewer or shorter env entries, labels, arguments, …)"
    )]
    ChangeTooLarge {
        /// The change's position in the input.
        position: usize,
        /// Its encoded size inside a transaction.
        bytes: usize,
        /// [`TXN_BYTES_MAX`].
        max: usize,
    },
    /// A change is malformed (no operation, no object, empty id, unknown kind, ...).
    #[error("change {position}: {reason}")]
    InvalidChange {
        /// The change's position in the transaction.
        position: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// Create of an id that exists.
    #[error("change {position}: {kind} {id} already exists; pick another id")]
    AlreadyExists {
        /// The change's position in the transaction.
        position: usize,
        /// The object's kind.
        kind: Kind,
        /// Its id.
        id: String,
    },
    /// Create or rename to a name another object of the kind holds.
    #[error(
        "change {position}: {kind} name {name:?} is already used by {kind} {holder_id}; \
         pick another name or remove that {kind} first"
    )]
    NameConflict {
        /// The change's position in the transaction.
        position: usize,
        /// The object's kind.
        kind: Kind,
        /// The contested name.
        name: String,
        /// The object that holds it.
        holder_id: String,
    },
    /// Update or delete of an id that does not exist.
    #[error("change {position}: {kind} {id} not found")]
    NotFound {
        /// The change's position in the transaction.
        position: usize,
        /// The object's kind.
        kind: Kind,
        /// Its id.
        id: String,
    },
    /// Optimistic concurrency: the object changed since the proposer read it.
    #[error(
        "change {position}: {kind} {id} is at version {current}, not {expected}: it changed \
         since you read it; re-read it, re-apply your change and retry"
    )]
    VersionConflict {
        /// The change's position in the transaction.
        position: usize,
        /// The object's kind.
        kind: Kind,
        /// Its id.
        id: String,
        /// The version the proposer read.
        expected: u64,
        /// The version stored now.
        current: u64,
    },
    /// The log entry's payload is not an encoded transaction.
    #[error("log entry is not a transaction: {reason}; the proposer sent a malformed entry")]
    Undecodable {
        /// The decoder's complaint.
        reason: String,
    },
    /// The transaction's request id is malformed.
    #[error("request id: {reason}; send 1 to 32 bytes of client id and a seq from 1")]
    InvalidRequestId {
        /// What is wrong with it.
        reason: String,
    },
    /// A repeat of a request the store refused before: the same refusal again.
    #[error("{message}")]
    Repeated {
        /// The first refusal's code.
        code: Code,
        /// The first refusal's message.
        message: String,
    },
    /// An earlier request of a client that has sent a later one since: its answer is no
    /// longer kept, so its outcome cannot be told.
    #[error(
        "request {seq} of this client was followed by its request {latest_seq}; the answer to \
         request {seq} is no longer kept, so whether it took effect is unknown here: read the \
         object to find out"
    )]
    Superseded {
        /// The request's number.
        seq: u64,
        /// The client's latest request number.
        latest_seq: u64,
    },
    /// The log index does not come after the last one applied: the caller replayed or
    /// reordered the log.
    #[error(
        "log index {index} is not after the last applied index {applied}; apply committed \
         entries once each, in log order"
    )]
    OutOfOrder {
        /// The index given.
        index: u64,
        /// The last index applied.
        applied: u64,
    },
}

impl TxnError {
    /// The status code a caller should see for this error.
    pub fn code(&self) -> Code {
        match self {
            Self::Empty
            | Self::InvalidChange { .. }
            | Self::Undecodable { .. }
            | Self::InvalidRequestId { .. } => Code::InvalidArgument,
            Self::Repeated { code, .. } => *code,
            // The code of an outcome nobody can tell any more.
            Self::Superseded { .. } => Code::Unknown,
            Self::TooManyChanges { .. } | Self::TooLarge { .. } | Self::ChangeTooLarge { .. } => {
                Code::ResourceExhausted
            }
            Self::AlreadyExists { .. } | Self::NameConflict { .. } => Code::AlreadyExists,
            Self::NotFound { .. } => Code::NotFound,
            Self::VersionConflict { .. } => Code::Aborted,
            Self::OutOfOrder { .. } => Code::FailedPrecondition,
        }
    }
}

/// A change that creates `object`.
pub fn create<T: Record>(object: T) -> Change {
    Change {
        op: Some(change::Op::Create(object.into_store_object())),
    }
}

/// A change that replaces `object`, expecting the stored version to still be the one
/// `object` was read at (its `meta.version`).
pub fn update<T: Record>(object: T) -> Change {
    let expected_version = object.version();
    update_expecting(object, expected_version)
}

/// A change that replaces `object` if the stored version is `expected_version`.
pub fn update_expecting<T: Record>(object: T, expected_version: u64) -> Change {
    Change {
        op: Some(change::Op::Update(Update {
            object: Some(object.into_store_object()),
            expected_version,
        })),
    }
}

/// A change that deletes the `kind` object `id`; `expected_version` 0 deletes any version.
pub fn delete(kind: Kind, id: impl Into<String>, expected_version: u64) -> Change {
    Change {
        op: Some(change::Op::Delete(Delete {
            kind: kind.to_proto() as i32,
            id: id.into(),
            expected_version,
        })),
    }
}

/// Checks the limits every transaction must respect.
///
/// # Errors
/// [`TxnError::Empty`], [`TxnError::TooManyChanges`] or [`TxnError::TooLarge`].
pub fn check_limits(txn: &Transaction) -> Result<(), TxnError> {
    checked_size(txn).map(|_| ())
}

/// [`check_limits`], returning the encoded size when it passes.
pub(crate) fn checked_size(txn: &Transaction) -> Result<usize, TxnError> {
    if txn.changes.is_empty() {
        return Err(TxnError::Empty);
    }
    if txn.changes.len() > TXN_CHANGES_MAX {
        return Err(TxnError::TooManyChanges {
            changes: txn.changes.len(),
            max: TXN_CHANGES_MAX,
        });
    }
    let bytes = txn.encoded_len();
    if bytes > TXN_BYTES_MAX {
        return Err(TxnError::TooLarge {
            bytes,
            max: TXN_BYTES_MAX,
        });
    }
    Ok(bytes)
}

/// The bytes a change adds to an encoded transaction (field tag, length, message).
fn change_bytes_in_txn(change: &Change) -> usize {
    let len = change.encoded_len();
    1 + prost::length_delimiter_len(len) + len
}

/// The bytes a transaction takes before its changes (the timestamp field, at most).
const TXN_HEADER_BYTES_MAX: usize = 1 + 10;

/// Splits `changes` into as few transactions as the limits allow, keeping their order, each
/// stamped `timestamp_ms`. The batch is not atomic: each transaction commits or fails alone,
/// so callers must tolerate a prefix having been applied (swarmkit's `Batch` semantics).
///
/// # Errors
/// [`TxnError::ChangeTooLarge`] if one change alone exceeds [`TXN_BYTES_MAX`].
pub fn split_into_transactions(
    changes: impl IntoIterator<Item = Change>,
    timestamp_ms: i64,
) -> Result<Vec<Transaction>, TxnError> {
    let mut transactions = Vec::new();
    let mut current = Transaction {
        changes: Vec::new(),
        timestamp_ms,
        request_id: None,
    };
    let mut current_bytes = TXN_HEADER_BYTES_MAX;
    for (position, change) in changes.into_iter().enumerate() {
        let bytes = change_bytes_in_txn(&change);
        if TXN_HEADER_BYTES_MAX + bytes > TXN_BYTES_MAX {
            return Err(TxnError::ChangeTooLarge {
                position,
                bytes,
                max: TXN_BYTES_MAX,
            });
        }
        let full =
            current.changes.len() == TXN_CHANGES_MAX || current_bytes + bytes > TXN_BYTES_MAX;
        if full {
            transactions.push(std::mem::replace(
                &mut current,
                Transaction {
                    changes: Vec::new(),
                    timestamp_ms,
                    request_id: None,
                },
            ));
            current_bytes = TXN_HEADER_BYTES_MAX;
        }
        current.changes.push(change);
        current_bytes += bytes;
    }
    if !current.changes.is_empty() {
        transactions.push(current);
    }
    debug_assert!(transactions.iter().all(|txn| check_limits(txn).is_ok()));
    Ok(transactions)
}

/// What every change of one transaction shares.
struct TxnContext {
    version: u64,
    timestamp_ms: i64,
}

/// Applies every change of `txn` at `version`, or none: on the first failure the changes
/// already made are undone in reverse order.
pub(crate) fn apply_changes(
    tables: &mut Tables,
    version: u64,
    txn: &Transaction,
) -> Result<Vec<Arc<Event>>, TxnError> {
    let context = TxnContext {
        version,
        timestamp_ms: txn.timestamp_ms,
    };
    let mut events: Vec<Arc<Event>> = Vec::with_capacity(txn.changes.len());
    for (position, change) in txn.changes.iter().enumerate() {
        match apply_change(tables, &context, position, change) {
            Ok(event) => events.push(Arc::new(event)),
            Err(error) => {
                undo(tables, &events);
                return Err(error);
            }
        }
    }
    Ok(events)
}

fn invalid(position: usize, reason: impl Into<String>) -> TxnError {
    TxnError::InvalidChange {
        position,
        reason: reason.into(),
    }
}

fn apply_change(
    tables: &mut Tables,
    context: &TxnContext,
    position: usize,
    change: &Change,
) -> Result<Event, TxnError> {
    match &change.op {
        None => Err(invalid(
            position,
            "change has no operation (create, update or delete)",
        )),
        Some(change::Op::Create(object)) => {
            dispatch_object(tables, context, position, object, None)
        }
        Some(change::Op::Update(update)) => {
            let object = update
                .object
                .as_ref()
                .ok_or_else(|| invalid(position, "update carries no object"))?;
            if update.expected_version == 0 {
                return Err(invalid(
                    position,
                    "update carries no expected_version; send the version you read",
                ));
            }
            dispatch_object(
                tables,
                context,
                position,
                object,
                Some(update.expected_version),
            )
        }
        Some(change::Op::Delete(delete)) => {
            let kind = Kind::from_proto(delete.kind).ok_or_else(|| {
                invalid(
                    position,
                    format!("delete names unknown kind {}", delete.kind),
                )
            })?;
            match kind {
                Kind::Node => {
                    delete_object::<crate::proto::objects::Node>(tables, position, delete)
                }
                Kind::Service => {
                    delete_object::<crate::proto::objects::Service>(tables, position, delete)
                }
                Kind::Task => {
                    delete_object::<crate::proto::objects::Task>(tables, position, delete)
                }
                Kind::Network => {
                    delete_object::<crate::proto::objects::Network>(tables, position, delete)
                }
                Kind::Cluster => {
                    delete_object::<crate::proto::objects::Cluster>(tables, position, delete)
                }
                Kind::Secret => {
                    delete_object::<crate::proto::objects::Secret>(tables, position, delete)
                }
                Kind::Config => {
                    delete_object::<crate::proto::objects::Config>(tables, position, delete)
                }
            }
            .map(|old| Event {
                version: context.version,
                action: Action::Delete,
                object: old,
                old: None,
            })
        }
    }
}

/// Creates (`expected_version` None) or updates the object inside `object`.
fn dispatch_object(
    tables: &mut Tables,
    context: &TxnContext,
    position: usize,
    object: &StoreObject,
    expected_version: Option<u64>,
) -> Result<Event, TxnError> {
    let inner = object
        .object
        .as_ref()
        .ok_or_else(|| invalid(position, "object is empty (no kind set)"))?;
    match inner {
        store_object::Object::Node(o) => write(tables, context, position, o, expected_version),
        store_object::Object::Service(o) => write(tables, context, position, o, expected_version),
        store_object::Object::Task(o) => write(tables, context, position, o, expected_version),
        store_object::Object::Network(o) => write(tables, context, position, o, expected_version),
        store_object::Object::Cluster(o) => write(tables, context, position, o, expected_version),
        store_object::Object::Secret(o) => write(tables, context, position, o, expected_version),
        store_object::Object::Config(o) => write(tables, context, position, o, expected_version),
    }
}

fn check_id(position: usize, id: &str) -> Result<(), TxnError> {
    if id.is_empty() {
        return Err(invalid(position, "object id is empty"));
    }
    if id.len() > OBJECT_ID_BYTES_MAX {
        return Err(invalid(
            position,
            format!(
                "object id is {} bytes, more than {OBJECT_ID_BYTES_MAX}",
                id.len()
            ),
        ));
    }
    Ok(())
}

fn write<T: Record>(
    tables: &mut Tables,
    context: &TxnContext,
    position: usize,
    object: &T,
    expected_version: Option<u64>,
) -> Result<Event, TxnError> {
    let id = object.id();
    check_id(position, id)?;
    let table = T::table_mut(tables);
    let stored = table.get(id);
    let created_at_ms = match (expected_version, stored) {
        (None, Some(_)) => {
            return Err(TxnError::AlreadyExists {
                position,
                kind: T::KIND,
                id: id.to_owned(),
            });
        }
        (None, None) => context.timestamp_ms,
        (Some(_), None) => {
            return Err(TxnError::NotFound {
                position,
                kind: T::KIND,
                id: id.to_owned(),
            });
        }
        (Some(expected), Some(stored)) => {
            let current = stored.version();
            if current != expected {
                return Err(TxnError::VersionConflict {
                    position,
                    kind: T::KIND,
                    id: id.to_owned(),
                    expected,
                    current,
                });
            }
            stored
                .meta()
                .map_or(context.timestamp_ms, |meta| meta.created_at_ms)
        }
    };
    let mut new = object.clone();
    new.set_meta(Meta {
        version: context.version,
        created_at_ms,
        updated_at_ms: context.timestamp_ms,
    });
    let new = Arc::new(new);
    let old = table
        .put(Arc::clone(&new))
        .map_err(|taken| TxnError::NameConflict {
            position,
            kind: T::KIND,
            name: new.unique_name().unwrap_or_default().to_owned(),
            holder_id: taken.holder_id,
        })?;
    Ok(Event {
        version: context.version,
        action: if old.is_some() {
            Action::Update
        } else {
            Action::Create
        },
        object: T::into_object(new),
        old: old.map(T::into_object),
    })
}

fn delete_object<T: Record>(
    tables: &mut Tables,
    position: usize,
    delete: &Delete,
) -> Result<Object, TxnError> {
    check_id(position, &delete.id)?;
    let table = T::table_mut(tables);
    let stored = table.get(&delete.id).ok_or_else(|| TxnError::NotFound {
        position,
        kind: T::KIND,
        id: delete.id.clone(),
    })?;
    let current = stored.version();
    if delete.expected_version != 0 && delete.expected_version != current {
        return Err(TxnError::VersionConflict {
            position,
            kind: T::KIND,
            id: delete.id.clone(),
            expected: delete.expected_version,
            current,
        });
    }
    let old = table
        .remove(&delete.id)
        .expect("the object was found under the same lock");
    Ok(T::into_object(old))
}

/// Reverts `events` (already applied, in order) by walking them backwards.
fn undo(tables: &mut Tables, events: &[Arc<Event>]) {
    for event in events.iter().rev() {
        match &event.object {
            Object::Node(o) => undo_one(tables, event, o),
            Object::Service(o) => undo_one(tables, event, o),
            Object::Task(o) => undo_one(tables, event, o),
            Object::Network(o) => undo_one(tables, event, o),
            Object::Cluster(o) => undo_one(tables, event, o),
            Object::Secret(o) => undo_one(tables, event, o),
            Object::Config(o) => undo_one(tables, event, o),
        }
    }
}

fn undo_one<T: Record>(tables: &mut Tables, event: &Event, object: &Arc<T>) {
    let table = T::table_mut(tables);
    match event.action {
        Action::Create => {
            table.remove(object.id());
        }
        Action::Update => {
            let old = event
                .old
                .as_ref()
                .and_then(T::from_object)
                .expect("an update event carries the object it replaced, of the same kind");
            table
                .put(Arc::clone(old))
                .expect("undoing in reverse order restores names that were free");
        }
        Action::Delete => {
            table
                .put(Arc::clone(object))
                .expect("undoing in reverse order restores names that were free");
        }
    }
}
