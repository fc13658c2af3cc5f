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

/// Entries in one segment (one fjall value). A write group with more is split into
/// several segments of the same batch. Bounds the work of reading one entry (a segment is
/// read whole) and of rewriting a segment's prefix on truncation.
pub(crate) const SEGMENT_ENTRIES_MAX: usize = 1024;
/// Payload bytes in one segment (soft: a single larger entry gets a segment of its own).
pub(crate) const SEGMENT_BYTES_MAX: usize = 4 << 20;

const SEGMENT_HEADER_BYTES: usize = 4;
/// Per entry in the table: term u64, kind u8, end offset of its payload u32.
const SEGMENT_META_BYTES: usize = 13;

/// How many of `entries` go into the next segment (at least one).
pub(crate) fn segment_len(entries: &[Entry]) -> usize {
    let mut bytes = 0usize;
    for (n, entry) in entries.iter().enumerate().take(SEGMENT_ENTRIES_MAX) {
        bytes += entry.data.len();
        if n > 0 && bytes > SEGMENT_BYTES_MAX {
            return n;
        }
    }
    entries.len().min(SEGMENT_ENTRIES_MAX)
}

/// Encodes contiguous entries as one segment value with exactly one allocation and one
/// copy of the payloads: this is the group-commit path, where per-entry work (a key, a
/// memtable insert, a journal record each) would cost more than the disk. Layout:
/// `count u32 | count x (term u64, kind u8, payload end u32) | payloads`, big-endian.
pub(crate) fn encode_segment(entries: &[Entry]) -> Slice {
    assert!(!entries.is_empty() && entries.len() <= SEGMENT_ENTRIES_MAX);
    let mut table = Vec::with_capacity(SEGMENT_HEADER_BYTES + SEGMENT_META_BYTES * entries.len());
    table.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    let mut end = 0u32;
    for entry in entries {
        end = end
            .checked_add(u32::try_from(entry.data.len()).expect("an entry is far below 4 GiB"))
            .expect("segment payloads are bounded far below 4 GiB");
        table.extend_from_slice(&entry.term.to_be_bytes());
        table.push(entry.kind as u8);
        table.extend_from_slice(&end.to_be_bytes());
    }
    let len = table.len() + end as usize;
    let mut reader = PiecesReader {
        pieces: std::iter::once(&table[..]).chain(entries.iter().map(|e| &e.data[..])),
        current: &[],
    };
    Slice::from_reader(&mut reader, len)
        .expect("reading in-memory pieces of exactly the announced length cannot fail")
}

/// Reads a sequence of byte slices as one stream (lets fjall allocate the value once and
/// copy each piece straight into it).
struct PiecesReader<'a, I: Iterator<Item = &'a [u8]>> {
    pieces: I,
    current: &'a [u8],
}

impl<'a, I: Iterator<Item = &'a [u8]>> std::io::Read for PiecesReader<'a, I> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.pieces.next() {
                Some(piece) => self.current = piece,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current = &self.current[n..];
        Ok(n)
    }
}

/// A decoded segment: entries `first..=last` sharing one buffer.
#[derive(Clone, Debug)]
pub(crate) struct Segment {
    /// Index of the first entry (the fjall key).
    pub first: LogIndex,
    bytes: Bytes,
    count: usize,
    payload_start: usize,
}

impl Segment {
    /// Decodes and checks the segment stored under `first`: table inside the value, known
    /// kind tags, non-decreasing terms and offsets, payloads filling the rest exactly.
    ///
    /// # Errors
    /// [`StorageError::CorruptLog`] if any check fails.
    pub(crate) fn decode(first: LogIndex, value: Slice) -> Result<Self, StorageError> {
        let corrupt = |why: &str| StorageError::CorruptLog(format!("segment at {first}: {why}"));
        let bytes = Bytes::from_owner(value);
        if bytes.len() < SEGMENT_HEADER_BYTES {
            return Err(corrupt("shorter than its header"));
        }
        let count = u32::from_be_bytes(bytes[..4].try_into().expect("four bytes")) as usize;
        if count == 0 || count > SEGMENT_ENTRIES_MAX {
            return Err(corrupt("entry count out of range"));
        }
        let payload_start = SEGMENT_HEADER_BYTES + SEGMENT_META_BYTES * count;
        if bytes.len() < payload_start {
            return Err(corrupt("shorter than its table"));
        }
        let segment = Self {
            first,
            bytes,
            count,
            payload_start,
        };
        let (mut prev_term, mut prev_end) = (0, 0);
        for k in 0..count {
            let (term, tag, end) = segment.meta(k);
            if EntryKind::from_tag(tag).is_none() {
                return Err(corrupt("unknown entry kind"));
            }
            if term < prev_term || end < prev_end {
                return Err(corrupt("terms or offsets go backwards"));
            }
            (prev_term, prev_end) = (term, end);
        }
        if payload_start + prev_end != segment.bytes.len() {
            return Err(corrupt("payloads do not fill the value"));
        }
        Ok(segment)
    }

    /// Index of the last entry.
    pub(crate) fn last(&self) -> LogIndex {
        self.first + self.count as u64 - 1
    }

    /// True if `index` is in this segment.
    pub(crate) fn contains(&self, index: LogIndex) -> bool {
        (self.first..=self.last()).contains(&index)
    }

    /// Term of the entry at `index` (which must be in the segment).
    pub(crate) fn term(&self, index: LogIndex) -> Term {
        self.meta(self.offset_of(index)).0
    }

    /// The entry at `index` (which must be in the segment); its payload shares the buffer.
    pub(crate) fn entry(&self, index: LogIndex) -> Entry {
        let k = self.offset_of(index);
        let (term, tag, end) = self.meta(k);
        let start = if k == 0 { 0 } else { self.meta(k - 1).2 };
        Entry {
            term,
            index,
            kind: EntryKind::from_tag(tag).expect("tags were checked in decode"),
            data: self
                .bytes
                .slice(self.payload_start + start..self.payload_start + end),
        }
    }

    fn offset_of(&self, index: LogIndex) -> usize {
        assert!(
            self.contains(index),
            "index {index} outside segment {}..={}",
            self.first,
            self.last()
        );
        (index - self.first) as usize
    }

    fn meta(&self, k: usize) -> (Term, u8, usize) {
        let at = SEGMENT_HEADER_BYTES + SEGMENT_META_BYTES * k;
        let m = &self.bytes[at..at + SEGMENT_META_BYTES];
        (
            read_u64(&m[..8]),
            m[8],
            u32::from_be_bytes(m[9..13].try_into().expect("four bytes")) as usize,
        )
    }
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

    fn entry(index: LogIndex, term: Term, data: &'static [u8]) -> Entry {
        Entry {
            term,
            index,
            kind: if data.is_empty() {
                EntryKind::Blank
            } else {
                EntryKind::Normal
            },
            data: Bytes::from_static(data),
        }
    }

    #[test]
    fn segment_round_trips_and_keys_sort_by_index() {
        let entries = vec![
            entry(300, 7, b"payload"),
            entry(301, 7, b""),
            entry(302, 8, b"x"),
        ];
        let segment = Segment::decode(300, encode_segment(&entries)).unwrap();
        assert_eq!(segment.last(), 302);
        for e in &entries {
            assert_eq!(segment.entry(e.index), *e);
            assert_eq!(segment.term(e.index), e.term);
        }
        assert!(!segment.contains(303) && !segment.contains(299));
        assert!(log_key(255) < log_key(256), "big-endian keys sort by index");
        assert_eq!(index_of_key(&log_key(u64::MAX - 1)).unwrap(), u64::MAX - 1);
    }

    #[test]
    fn corrupt_segments_are_rejected() {
        let good = encode_segment(&[entry(1, 1, b"abc"), entry(2, 2, b"de")]);
        let mut truncated = good.to_vec();
        truncated.pop();
        assert!(Segment::decode(1, Slice::from(&truncated)).is_err());
        let mut bad_kind = good.to_vec();
        bad_kind[4 + 8] = 99;
        assert!(Segment::decode(1, Slice::from(&bad_kind)).is_err());
        let mut backwards = good.to_vec();
        backwards[4 + 13..4 + 21].copy_from_slice(&0u64.to_be_bytes());
        assert!(Segment::decode(1, Slice::from(&backwards)).is_err());
        assert!(Segment::decode(1, Slice::from(&[0u8, 0, 0, 0][..])).is_err());
        assert!(decode_hard_state(&[0u8; 23]).is_err());
        assert!(decode_log_start(&encode_log_start(0, 0)).is_err());
        assert!(index_of_key(b"short").is_err());
    }

    #[test]
    fn segments_split_on_count_and_bytes() {
        static BIG: [u8; SEGMENT_BYTES_MAX] = [0; SEGMENT_BYTES_MAX];
        let many: Vec<Entry> = (1..=2000).map(|i| entry(i, 1, b"")).collect();
        assert_eq!(segment_len(&many), SEGMENT_ENTRIES_MAX);
        let big = vec![entry(1, 1, &BIG), entry(2, 1, &BIG), entry(3, 1, b"")];
        assert_eq!(
            segment_len(&big),
            1,
            "a large entry gets a segment of its own"
        );
        assert_eq!(segment_len(&big[2..]), 1);
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
