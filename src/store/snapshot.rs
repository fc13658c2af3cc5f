//! Snapshot encoding and decoding: the whole store as a stream of length-delimited protobuf
//! records, so it can be sent in chunks without a second full copy in memory.
//!
//! Stream layout: `SnapshotHeader`, `object_count` × `StoreObject` (kinds in
//! [`Kind::ALL`](super::Kind::ALL) order, ids ascending, so every manager writes the same bytes
//! for the same state), `answer_count` × `RecordedAnswer` (the table of answers, oldest
//! first; format 2 on), `SnapshotTrailer` (SHA-256 of everything before it). Each record is a
//! varint length followed by the message.
//!
//! Owns the format. Must never touch the live store: decoding builds new tables, which the
//! store swaps in only when the whole stream checked out.

use std::io::{self, BufRead, BufReader, Read};

use prost::Message;
use ring::digest;

use crate::proto::objects::{RecordedAnswer, SnapshotHeader, SnapshotTrailer, StoreObject};
use crate::wire::Code;

use super::answers::AnswerTable;
use super::object::{Object, Record};
use super::table::Tables;
use super::txn::TXN_BYTES_MAX;

/// The format this build writes (2: with the table of answers).
pub const SNAPSHOT_FORMAT_VERSION: u32 = 2;

/// The oldest format this build reads (1: without the table of answers, which then starts
/// empty).
pub const SNAPSHOT_FORMAT_VERSION_OLDEST: u32 = 1;

/// The largest record accepted when reading. An object entered the store inside a transaction
/// of at most [`TXN_BYTES_MAX`], so no honest record is larger; a corrupt length cannot make
/// the reader allocate more.
pub const SNAPSHOT_RECORD_BYTES_MAX: usize = TXN_BYTES_MAX;

/// The read buffer of a restore: large reads from the transfer, small copies out.
const READ_BUFFER_BYTES: usize = 256 * 1024;

/// Why a snapshot could not be restored. The store is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Reading the stream failed.
    #[error("reading the snapshot failed: {0}; retry the transfer")]
    Io(#[from] io::Error),
    /// The stream is not a valid snapshot.
    #[error("snapshot is corrupt: {0}; fetch a fresh snapshot from the leader")]
    Corrupt(String),
    /// Written by a newer build.
    #[error(
        "snapshot format {found} is not supported (this build reads \
         {SNAPSHOT_FORMAT_VERSION_OLDEST} to {SNAPSHOT_FORMAT_VERSION}); \
         upgrade this manager"
    )]
    UnsupportedFormat {
        /// The format version in the stream.
        found: u32,
    },
}

impl SnapshotError {
    /// The status code a caller should see.
    pub fn code(&self) -> Code {
        match self {
            Self::Io(_) => Code::Unavailable,
            Self::Corrupt(_) => Code::DataLoss,
            Self::UnsupportedFormat { .. } => Code::FailedPrecondition,
        }
    }
}

/// What a snapshot covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The last log index applied when it was taken.
    pub applied_index: u64,
    /// The version of the last successful transaction it includes.
    pub version: u64,
    /// Objects in it.
    pub object_count: u64,
    /// Entries of the table of answers in it.
    pub answer_count: u64,
}

enum Stage {
    Header,
    Objects,
    Answers,
    Trailer,
    Done,
}

/// The store at one version, encoded lazily as it is read. Holds shared pointers to the
/// objects (not copies); the store keeps applying meanwhile.
pub struct SnapshotStream {
    info: SnapshotInfo,
    objects: std::vec::IntoIter<Object>,
    answers: std::vec::IntoIter<RecordedAnswer>,
    stage: Stage,
    /// The encoded record being read out, and how much of it was read.
    record: Vec<u8>,
    record_offset: usize,
    hasher: digest::Context,
}

impl SnapshotStream {
    pub(crate) fn new(
        tables: &Tables,
        answers: &AnswerTable,
        applied_index: u64,
        version: u64,
    ) -> Self {
        let mut objects = Vec::with_capacity(tables.object_count());
        collect::<crate::proto::objects::Node>(tables, &mut objects);
        collect::<crate::proto::objects::Service>(tables, &mut objects);
        collect::<crate::proto::objects::Task>(tables, &mut objects);
        collect::<crate::proto::objects::Network>(tables, &mut objects);
        collect::<crate::proto::objects::Cluster>(tables, &mut objects);
        collect::<crate::proto::objects::Secret>(tables, &mut objects);
        collect::<crate::proto::objects::Config>(tables, &mut objects);
        let answers = answers.to_records();
        Self {
            info: SnapshotInfo {
                applied_index,
                version,
                object_count: objects.len() as u64,
                answer_count: answers.len() as u64,
            },
            objects: objects.into_iter(),
            answers: answers.into_iter(),
            stage: Stage::Header,
            record: Vec::new(),
            record_offset: 0,
            hasher: digest::Context::new(&digest::SHA256),
        }
    }

    /// What the stream covers.
    pub fn info(&self) -> SnapshotInfo {
        self.info
    }

    /// Encodes the next record into `self.record`; false at the end of the stream.
    fn next_record(&mut self) -> bool {
        self.record.clear();
        self.record_offset = 0;
        match self.stage {
            Stage::Header => {
                let header = SnapshotHeader {
                    format_version: SNAPSHOT_FORMAT_VERSION,
                    applied_index: self.info.applied_index,
                    version: self.info.version,
                    object_count: self.info.object_count,
                    answer_count: self.info.answer_count,
                };
                header
                    .encode_length_delimited(&mut self.record)
                    .expect("a Vec grows as needed");
                self.hasher.update(&self.record);
                self.stage = Stage::Objects;
            }
            Stage::Objects => match self.objects.next() {
                Some(object) => {
                    prost::encoding::encode_varint(object.encoded_len() as u64, &mut self.record);
                    object.encode_store_object(&mut self.record);
                    self.hasher.update(&self.record);
                }
                None => {
                    self.stage = Stage::Answers;
                    return self.next_record();
                }
            },
            Stage::Answers => match self.answers.next() {
                Some(answer) => {
                    answer
                        .encode_length_delimited(&mut self.record)
                        .expect("a Vec grows as needed");
                    self.hasher.update(&self.record);
                }
                None => {
                    self.stage = Stage::Trailer;
                    return self.next_record();
                }
            },
            Stage::Trailer => {
                let sha256 = self.hasher.clone().finish();
                let trailer = SnapshotTrailer {
                    sha256: bytes::Bytes::copy_from_slice(sha256.as_ref()),
                };
                trailer
                    .encode_length_delimited(&mut self.record)
                    .expect("a Vec grows as needed");
                self.stage = Stage::Done;
            }
            Stage::Done => return false,
        }
        true
    }
}

impl Read for SnapshotStream {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        while self.record_offset == self.record.len() {
            if !self.next_record() {
                return Ok(0);
            }
        }
        let available = &self.record[self.record_offset..];
        let n = available.len().min(out.len());
        out[..n].copy_from_slice(&available[..n]);
        self.record_offset += n;
        Ok(n)
    }
}

fn collect<T: Record>(tables: &Tables, out: &mut Vec<Object>) {
    out.extend(
        T::table(tables)
            .iter()
            .map(|object| T::into_object(object.clone())),
    );
}

/// A decoded snapshot, not yet installed.
pub(crate) struct Loaded {
    pub(crate) tables: Tables,
    pub(crate) answers: AnswerTable,
    pub(crate) info: SnapshotInfo,
}

/// Which record of the stream is being read, for error messages.
#[derive(Clone, Copy)]
enum Part {
    Header,
    Object { index: u64, count: u64 },
    Answer { index: u64, count: u64 },
    Trailer,
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Header => f.write_str("the header"),
            Self::Object { index, count } => write!(f, "object {index} of {count}"),
            Self::Answer { index, count } => write!(f, "answer {index} of {count}"),
            Self::Trailer => f.write_str("the trailer"),
        }
    }
}

fn corrupt(reason: impl Into<String>) -> SnapshotError {
    SnapshotError::Corrupt(reason.into())
}

/// Longest varint a record length may take.
const LENGTH_PREFIX_BYTES_MAX: usize = 10;

/// Reads length-delimited records into one reused buffer, hashing what it reads.
struct RecordReader<R> {
    inner: BufReader<R>,
    hasher: digest::Context,
    record: Vec<u8>,
}

impl<R: Read> RecordReader<R> {
    /// Reads the next record into `self.record` (hashing it if `hash`); false at a clean end
    /// of stream.
    fn next(&mut self, part: Part, hash: bool) -> Result<bool, SnapshotError> {
        let mut prefix = [0u8; LENGTH_PREFIX_BYTES_MAX];
        let mut prefix_len = 0;
        let mut length: u64 = 0;
        loop {
            let byte = match self.inner.fill_buf() {
                Ok([]) if prefix_len == 0 => return Ok(false),
                Ok([]) => return Err(corrupt(format!("stream ends inside the length of {part}"))),
                Ok([byte, ..]) => *byte,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error.into()),
            };
            self.inner.consume(1);
            prefix[prefix_len] = byte;
            length |= u64::from(byte & 0x7f) << (7 * prefix_len);
            prefix_len += 1;
            if byte & 0x80 == 0 {
                break;
            }
            if prefix_len == LENGTH_PREFIX_BYTES_MAX {
                return Err(corrupt(format!(
                    "the length of {part} is not a valid varint"
                )));
            }
        }
        let length = usize::try_from(length)
            .ok()
            .filter(|length| *length <= SNAPSHOT_RECORD_BYTES_MAX)
            .ok_or_else(|| {
                corrupt(format!(
                    "{part} claims {length} bytes, more than {SNAPSHOT_RECORD_BYTES_MAX}"
                ))
            })?;
        self.record.resize(length, 0);
        self.inner.read_exact(&mut self.record).map_err(|error| {
            if error.kind() == io::ErrorKind::UnexpectedEof {
                corrupt(format!("stream ends inside {part}"))
            } else {
                error.into()
            }
        })?;
        if hash {
            self.hasher.update(&prefix[..prefix_len]);
            self.hasher.update(&self.record);
        }
        Ok(true)
    }

    /// Decodes the next record as `M`; a missing record is corruption.
    fn next_message<M: Message + Default>(
        &mut self,
        part: Part,
        hash: bool,
    ) -> Result<M, SnapshotError> {
        if !self.next(part, hash)? {
            return Err(corrupt(format!("the stream ends before {part}")));
        }
        M::decode(self.record.as_slice())
            .map_err(|error| corrupt(format!("{part} does not decode: {error}")))
    }

    /// True if no byte follows.
    fn at_end(&mut self) -> Result<bool, SnapshotError> {
        loop {
            match self.inner.fill_buf() {
                Ok(rest) => return Ok(rest.is_empty()),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error.into()),
            }
        }
    }
}

/// Decodes and checks a whole snapshot stream into new tables.
pub(crate) fn load(reader: impl Read) -> Result<Loaded, SnapshotError> {
    let mut reader = RecordReader {
        inner: BufReader::with_capacity(READ_BUFFER_BYTES, reader),
        hasher: digest::Context::new(&digest::SHA256),
        record: Vec::new(),
    };
    if reader.at_end()? {
        return Err(corrupt("the stream is empty"));
    }
    let header: SnapshotHeader = reader.next_message(Part::Header, true)?;
    if !(SNAPSHOT_FORMAT_VERSION_OLDEST..=SNAPSHOT_FORMAT_VERSION).contains(&header.format_version)
    {
        return Err(SnapshotError::UnsupportedFormat {
            found: header.format_version,
        });
    }
    if header.format_version < 2 && header.answer_count != 0 {
        return Err(corrupt("a format 1 snapshot holds no answers"));
    }
    if header.version > header.applied_index {
        // Versions are log indexes of applied entries, so this cannot come from a store; and
        // applying after it would publish versions out of order.
        return Err(corrupt(format!(
            "the header's version {} is after its applied index {}",
            header.version, header.applied_index
        )));
    }
    let mut tables = Tables::default();
    for index in 0..header.object_count {
        let part = Part::Object {
            index,
            count: header.object_count,
        };
        let object = Object::from_store_object(reader.next_message::<StoreObject>(part, true)?)
            .ok_or_else(|| corrupt(format!("{part} has no kind")))?;
        insert(&mut tables, object, header.version)
            .map_err(|reason| corrupt(format!("{part}: {reason}")))?;
    }
    let mut answers = AnswerTable::default();
    for index in 0..header.answer_count {
        let part = Part::Answer {
            index,
            count: header.answer_count,
        };
        let record = reader.next_message::<RecordedAnswer>(part, true)?;
        answers
            .load(record, header.applied_index)
            .map_err(|reason| corrupt(format!("{part}: {reason}")))?;
    }
    let digest = reader.hasher.clone().finish();
    let trailer: SnapshotTrailer = reader.next_message(Part::Trailer, false)?;
    if trailer.sha256.as_ref() != digest.as_ref() {
        return Err(corrupt("the checksum does not match the contents"));
    }
    if !reader.at_end()? {
        return Err(corrupt("bytes follow the trailer"));
    }
    Ok(Loaded {
        tables,
        answers,
        info: SnapshotInfo {
            applied_index: header.applied_index,
            version: header.version,
            object_count: header.object_count,
            answer_count: header.answer_count,
        },
    })
}

fn insert(tables: &mut Tables, object: Object, version_max: u64) -> Result<(), String> {
    if object.id().is_empty() {
        return Err("empty id".into());
    }
    if object.version() > version_max {
        return Err(format!(
            "version {} is after the snapshot's version {version_max}",
            object.version()
        ));
    }
    match object {
        Object::Node(o) => insert_one(tables, o),
        Object::Service(o) => insert_one(tables, o),
        Object::Task(o) => insert_one(tables, o),
        Object::Network(o) => insert_one(tables, o),
        Object::Cluster(o) => insert_one(tables, o),
        Object::Secret(o) => insert_one(tables, o),
        Object::Config(o) => insert_one(tables, o),
    }
}

fn insert_one<T: Record>(tables: &mut Tables, object: std::sync::Arc<T>) -> Result<(), String> {
    let table = T::table_mut(tables);
    if table.get(object.id()).is_some() {
        return Err(format!("{} {} appears twice", T::KIND, object.id()));
    }
    table
        .put(object)
        .map(|_| ())
        .map_err(|taken| format!("its name is already held by {}", taken.holder_id))
}
