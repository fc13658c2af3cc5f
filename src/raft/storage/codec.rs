//! Byte layouts of everything the log store keeps in fjall.
//!
//! Owns the encodings of log keys, log values, the hard state and the log boundary. Must
//! never do IO: every function here is a pure transformation, so a layout change is visible
//! in one place.

use bytes::Bytes;
use fjall::Slice;

use super::StorageError;
use crate::raft::types::{Entry, EntryKind, HardState, LogIndex, Term};

/// Bytes of a log key: the index, big-endian, so that fjall's byte order is index order.
pub(crate) const LOG_KEY_BYTES: usize = 8;

/// Bytes in front of an entry's payload in its fjall value: term (u64 BE) and kind tag.
pub(crate) const ENTRY_HEADER_BYTES: usize = 9;

/// Metadata key of the hard state.
pub(crate) const META_KEY_HARD_STATE: &[u8] = b"hard_state";

/// Metadata key of the log boundary: the first live index and the term of the entry just
/// before it (which may have been compacted away).
pub(crate) const META_KEY_LOG_START: &[u8] = b"log_start";

const HARD_STATE_BYTES: usize = 24;
const LOG_START_BYTES: usize = 16;

/// The fjall key of the entry at `index`.
pub(crate) fn log_key(index: LogIndex) -> [u8; LOG_KEY_BYTES] {
    index.to_be_bytes()
}

/// The index stored in a log key.
///
/// # Errors
/// [`StorageError::CorruptLog`] if the key is not eight bytes long.
pub(crate) fn index_of_key(key: &[u8]) -> Result<LogIndex, StorageError> {
    let bytes: [u8; LOG_KEY_BYTES] = key
        .try_into()
        .map_err(|_| StorageError::CorruptLog(format!("log key of {} bytes", key.len())))?;
    Ok(LogIndex::from_be_bytes(bytes))
}

/// Encodes an entry's fjall value with exactly one allocation and one copy of the payload:
/// this sits on the group-commit path, where every extra pass over the bytes costs
/// throughput.
pub(crate) fn encode_entry_value(entry: &Entry) -> Slice {
    let mut header = [0u8; ENTRY_HEADER_BYTES];
    header[..8].copy_from_slice(&entry.term.to_be_bytes());
    header[8] = entry.kind as u8;
    let len = ENTRY_HEADER_BYTES + entry.data.len();
    let mut reader = std::io::Read::chain(&header[..], &entry.data[..]);
    Slice::from_reader(&mut reader, len)
        .expect("reading from two in-memory slices of known total length cannot fail")
}

/// Decodes the entry at `index` from its fjall value without copying the payload (the
/// returned `data` shares the value's buffer).
///
/// # Errors
/// [`StorageError::CorruptLog`] if the value is too short or its kind tag is unknown.
pub(crate) fn decode_entry(index: LogIndex, value: Slice) -> Result<Entry, StorageError> {
    let (term, kind) = decode_entry_header(index, &value)?;
    let data = Bytes::from_owner(value).slice(ENTRY_HEADER_BYTES..);
    Ok(Entry {
        term,
        index,
        kind,
        data,
    })
}

/// Decodes only the term and kind of the entry at `index`.
///
/// # Errors
/// [`StorageError::CorruptLog`] if the value is too short or its kind tag is unknown.
pub(crate) fn decode_entry_header(
    index: LogIndex,
    value: &[u8],
) -> Result<(Term, EntryKind), StorageError> {
    if value.len() < ENTRY_HEADER_BYTES {
        return Err(StorageError::CorruptLog(format!(
            "entry {index} has a {}-byte value, shorter than its header",
            value.len()
        )));
    }
    let term = read_u64(&value[..8]);
    let kind = EntryKind::from_tag(value[8]).ok_or_else(|| {
        StorageError::CorruptLog(format!("entry {index} has unknown kind tag {}", value[8]))
    })?;
    Ok((term, kind))
}

/// Encodes the hard state: term, vote, commit, each u64 BE.
pub(crate) fn encode_hard_state(hard_state: &HardState) -> [u8; HARD_STATE_BYTES] {
    let mut out = [0u8; HARD_STATE_BYTES];
    out[..8].copy_from_slice(&hard_state.term.to_be_bytes());
    out[8..16].copy_from_slice(&hard_state.vote.to_be_bytes());
    out[16..].copy_from_slice(&hard_state.commit.to_be_bytes());
    out
}

/// Decodes the hard state.
///
/// # Errors
/// [`StorageError::CorruptLog`] if the value has the wrong length.
pub(crate) fn decode_hard_state(value: &[u8]) -> Result<HardState, StorageError> {
    if value.len() != HARD_STATE_BYTES {
        return Err(StorageError::CorruptLog(format!(
            "hard state of {} bytes, expected {HARD_STATE_BYTES}",
            value.len()
        )));
    }
    Ok(HardState {
        term: read_u64(&value[..8]),
        vote: read_u64(&value[8..16]),
        commit: read_u64(&value[16..]),
    })
}

/// Encodes the log boundary: the first live index and the term of the entry before it.
pub(crate) fn encode_log_start(first_index: LogIndex, prev_term: Term) -> [u8; LOG_START_BYTES] {
    let mut out = [0u8; LOG_START_BYTES];
    out[..8].copy_from_slice(&first_index.to_be_bytes());
    out[8..].copy_from_slice(&prev_term.to_be_bytes());
    out
}

/// Decodes the log boundary `(first_index, prev_term)`.
///
/// # Errors
/// [`StorageError::CorruptLog`] if the value has the wrong length or a zero first index.
pub(crate) fn decode_log_start(value: &[u8]) -> Result<(LogIndex, Term), StorageError> {
    if value.len() != LOG_START_BYTES {
        return Err(StorageError::CorruptLog(format!(
            "log start of {} bytes, expected {LOG_START_BYTES}",
            value.len()
        )));
    }
    let first_index = read_u64(&value[..8]);
    if first_index == 0 {
        return Err(StorageError::CorruptLog("log start at index 0".into()));
    }
    Ok((first_index, read_u64(&value[8..])))
}

fn read_u64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes.try_into().expect("callers pass exactly eight bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trips_and_keys_sort_by_index() {
        let entry = Entry {
            term: 7,
            index: 300,
            kind: EntryKind::Membership,
            data: Bytes::from_static(b"payload"),
        };
        let value = encode_entry_value(&entry);
        assert_eq!(value.len(), ENTRY_HEADER_BYTES + 7);
        assert_eq!(decode_entry(300, value).unwrap(), entry);
        assert!(log_key(255) < log_key(256), "big-endian keys sort by index");
        assert_eq!(index_of_key(&log_key(u64::MAX - 1)).unwrap(), u64::MAX - 1);
    }

    #[test]
    fn corrupt_values_are_rejected() {
        assert!(decode_entry_header(1, &[0u8; 5]).is_err());
        let mut bad_kind = [0u8; 9];
        bad_kind[8] = 99;
        assert!(decode_entry_header(1, &bad_kind).is_err());
        assert!(decode_hard_state(&[0u8; 23]).is_err());
        assert!(decode_log_start(&encode_log_start(0, 0)).is_err());
        assert!(index_of_key(b"short").is_err());
    }

    #[test]
    fn hard_state_and_log_start_round_trip() {
        let hs = HardState {
            term: 3,
            vote: 9,
            commit: 41,
        };
        assert_eq!(decode_hard_state(&encode_hard_state(&hs)).unwrap(), hs);
        assert_eq!(
            decode_log_start(&encode_log_start(501, 4)).unwrap(),
            (501, 4)
        );
    }
}
