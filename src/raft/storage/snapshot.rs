//! Snapshot files: written locally or received chunk by chunk, verified, installed
//! atomically, streamed out in chunks.
//!
//! Owns the snapshot directory. A file is `<index>-<term>.snap`:
//!
//! ```text
//! magic "FLTSNAP1" | header_bytes u32 | index u64 | term u64
//! | voters u32, voter ids u64... | learners u32, learner ids u64...
//! | content_bytes u64 | content SHA-256 (32) | header SHA-256 (32, over all the above)
//! | content (content_bytes)
//! ```
//!
//! All integers big-endian. A file is only ever created under a temp name, fsynced, renamed
//! into place and the directory fsynced, so a crash leaves either no file or a whole one;
//! a file damaged later (flipped bytes, truncation) fails the header digest, the length
//! check or the content digest, and is reported and never applied. Must never hold more
//! than one chunk of content in memory, and never interpret the content.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use ring::digest::{Context, SHA256};

use super::StorageError;
use crate::raft::types::{Membership, NodeId, SnapshotMeta};
use crate::util::fsutil::fsync_dir;

/// The chunk size the node layer streams snapshots in (1 MiB).
pub const SNAPSHOT_CHUNK_BYTES_DEFAULT: usize = 1 << 20;
/// Valid snapshot files kept after an install: the newest and one fallback, in case the
/// newest is damaged on disk later.
pub const SNAPSHOTS_KEPT: usize = 2;
/// Members (voters plus learners) a header may list; a larger count means corruption, and
/// the bound keeps a damaged header from asking for a huge allocation.
pub const SNAPSHOT_MEMBERS_MAX: u32 = 65_536;

const MAGIC: &[u8; 8] = b"FLTSNAP1";
const DIGEST_BYTES: usize = 32;
/// Magic and the header length field: what must be read before the rest of the header.
const HEADER_PREFIX_BYTES: usize = 12;
const HEADER_FIXED_BYTES: usize =
    HEADER_PREFIX_BYTES + 8 + 8 + 4 + 4 + 8 + DIGEST_BYTES + DIGEST_BYTES;
const HEADER_BYTES_MAX: usize = HEADER_FIXED_BYTES + 8 * SNAPSHOT_MEMBERS_MAX as usize;
const SUFFIX_SNAP: &str = ".snap";
const SUFFIX_CORRUPT: &str = ".corrupt";
const TEMP_MARKER: &str = ".tmp.";
/// Read buffer when verifying a whole file.
const VERIFY_BUFFER_BYTES: usize = 1 << 20;

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A snapshot file that passed its header and length checks (and, where it came from
/// recovery (`LogStore::open`) or [`SnapshotBuilder::finish`], its content digest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// What the snapshot covers.
    pub meta: SnapshotMeta,
    /// Length of the content, without the header.
    pub content_bytes: u64,
    /// SHA-256 of the content.
    pub content_sha256: [u8; DIGEST_BYTES],
    /// Where the file is.
    pub path: PathBuf,
    header_bytes: u64,
}

/// One piece of a snapshot's content, as streamed to a follower.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotChunk {
    /// Offset of `data` in the content.
    pub offset: u64,
    /// The bytes.
    pub data: Bytes,
    /// True for the final chunk; it is returned only after the whole content's digest
    /// matched the header.
    pub last: bool,
}

/// The snapshot directory of one node.
#[derive(Clone, Debug)]
pub struct SnapshotStore {
    dir: PathBuf,
}

impl SnapshotStore {
    /// Opens (creating) `dir`, removes temp files left by a crash, and finds the newest
    /// snapshot that passes every check. Files that fail are renamed to `*.corrupt` and
    /// returned as errors, never applied.
    ///
    /// # Errors
    /// IO errors on the directory itself.
    pub(crate) fn open(
        dir: &Path,
    ) -> Result<(Self, Option<SnapshotInfo>, Vec<StorageError>), StorageError> {
        fs::create_dir_all(dir).map_err(|e| StorageError::io("create", dir, e))?;
        let store = Self {
            dir: dir.to_path_buf(),
        };
        store.remove_temp_files()?;
        let mut corrupt = Vec::new();
        let mut candidates = Vec::new();
        for path in store.snapshot_files()? {
            match SnapshotReader::open(&path) {
                Ok(reader) => candidates.push(reader.info),
                Err(e) => corrupt.push(store.quarantine(&path, e)),
            }
        }
        candidates.sort_by_key(|info| std::cmp::Reverse((info.meta.index, info.meta.term)));
        let mut newest = None;
        for info in candidates {
            match verify_file(&info.path) {
                Ok(verified) => {
                    newest = Some(verified);
                    break;
                }
                Err(e) => corrupt.push(store.quarantine(&info.path, e)),
            }
        }
        Ok((store, newest, corrupt))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts a snapshot produced on this node; the digest is computed while writing.
    ///
    /// # Errors
    /// IO errors creating the temp file.
    pub fn create(&self, meta: SnapshotMeta) -> Result<SnapshotBuilder, StorageError> {
        SnapshotBuilder::start(self, meta, None)
    }

    /// Starts receiving a snapshot from the leader, who announced its length and digest;
    /// [`SnapshotBuilder::finish`] refuses it unless both match.
    ///
    /// # Errors
    /// IO errors creating the temp file.
    pub fn receive(
        &self,
        meta: SnapshotMeta,
        content_bytes: u64,
        content_sha256: [u8; DIGEST_BYTES],
    ) -> Result<SnapshotBuilder, StorageError> {
        SnapshotBuilder::start(self, meta, Some((content_bytes, content_sha256)))
    }

    fn snapshot_files(&self) -> Result<Vec<PathBuf>, StorageError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(|e| StorageError::io("list", &self.dir, e))? {
            let entry = entry.map_err(|e| StorageError::io("list", &self.dir, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(SUFFIX_SNAP) && !name.starts_with('.') {
                out.push(entry.path());
            }
        }
        Ok(out)
    }

    fn remove_temp_files(&self) -> Result<(), StorageError> {
        let mut removed = false;
        for entry in fs::read_dir(&self.dir).map_err(|e| StorageError::io("list", &self.dir, e))? {
            let entry = entry.map_err(|e| StorageError::io("list", &self.dir, e))?;
            if entry.file_name().to_string_lossy().contains(TEMP_MARKER) {
                let path = entry.path();
                fs::remove_file(&path).map_err(|e| StorageError::io("remove", &path, e))?;
                removed = true;
            }
        }
        if removed {
            fsync_dir(&self.dir).map_err(|e| StorageError::io("fsync", &self.dir, e))?;
        }
        Ok(())
    }

    /// Renames a failed file out of the way (kept for inspection) and returns its error.
    fn quarantine(&self, path: &Path, error: StorageError) -> StorageError {
        log::error!("{error}");
        let mut target = path.as_os_str().to_owned();
        target.push(SUFFIX_CORRUPT);
        if let Err(e) = fs::rename(path, &target).and_then(|()| fsync_dir(&self.dir)) {
            log::error!(
                "could not move corrupt snapshot {} aside: {e}",
                path.display()
            );
        }
        error
    }

    /// Deletes every snapshot file but the newest whose end is below `log_first_index - 1`:
    /// the log no longer joins it, so recovery could never use it (an old 25 MB snapshot
    /// otherwise stayed beside a new 1 KB one until the next snapshot). Returns how many.
    ///
    /// # Errors
    /// IO errors listing or deleting the files.
    pub(crate) fn remove_unjoinable(&self, log_first_index: u64) -> Result<usize, StorageError> {
        let mut files: Vec<(u64, u64, PathBuf)> = self
            .snapshot_files()?
            .into_iter()
            .filter_map(|p| parse_file_name(&p).map(|(i, t)| (i, t, p)))
            .collect();
        files.sort_by_key(|(i, t, _)| std::cmp::Reverse((*i, *t)));
        let mut removed = 0;
        for (index, _, path) in files.into_iter().skip(1) {
            if index.saturating_add(1) < log_first_index {
                fs::remove_file(&path).map_err(|e| StorageError::io("remove", &path, e))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Deletes all but the newest [`SNAPSHOTS_KEPT`] snapshot files, never `keep`.
    fn prune(&self, keep: &Path) -> Result<(), StorageError> {
        let mut files: Vec<(u64, u64, PathBuf)> = self
            .snapshot_files()?
            .into_iter()
            .filter_map(|p| parse_file_name(&p).map(|(i, t)| (i, t, p)))
            .collect();
        files.sort_by_key(|(i, t, _)| std::cmp::Reverse((*i, *t)));
        for (_, _, path) in files.into_iter().skip(SNAPSHOTS_KEPT) {
            if path != keep {
                fs::remove_file(&path).map_err(|e| StorageError::io("remove", &path, e))?;
            }
        }
        Ok(())
    }
}

/// The file name of the snapshot `(index, term)`; zero-padded so names sort like snapshots.
fn file_name(meta: &SnapshotMeta) -> String {
    format!("{:020}-{:020}{SUFFIX_SNAP}", meta.index, meta.term)
}

fn parse_file_name(path: &Path) -> Option<(u64, u64)> {
    let name = path.file_name()?.to_str()?.strip_suffix(SUFFIX_SNAP)?;
    let (index, term) = name.split_once('-')?;
    Some((index.parse().ok()?, term.parse().ok()?))
}

/// Writes one snapshot into a temp file; [`SnapshotBuilder::finish`] verifies and installs
/// it. Dropping it unfinished removes the temp file. Holds no content in memory.
pub struct SnapshotBuilder {
    store: SnapshotStore,
    meta: SnapshotMeta,
    expected: Option<(u64, [u8; DIGEST_BYTES])>,
    file: File,
    temp_path: PathBuf,
    header_bytes: u64,
    written_bytes: u64,
    digest: Context,
    finished: bool,
}

impl SnapshotBuilder {
    fn start(
        store: &SnapshotStore,
        meta: SnapshotMeta,
        expected: Option<(u64, [u8; DIGEST_BYTES])>,
    ) -> Result<Self, StorageError> {
        let temp_path = store.dir.join(format!(
            ".{}{TEMP_MARKER}{}.{}",
            file_name(&meta),
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        // 0600: a snapshot holds the whole replicated state, the cluster CA key included.
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(crate::util::fsutil::MODE_PRIVATE)
            .open(&temp_path)
            .map_err(|e| StorageError::io("create", &temp_path, e))?;
        let (content_bytes, sha) = expected.unwrap_or((0, [0; DIGEST_BYTES]));
        let header = encode_header(&meta, content_bytes, &sha)?;
        // The builder owns the temp file from here on: an error below drops it, which
        // removes the file.
        let mut builder = Self {
            store: store.clone(),
            meta,
            expected,
            file,
            temp_path,
            header_bytes: header.len() as u64,
            written_bytes: 0,
            digest: Context::new(&SHA256),
            finished: false,
        };
        builder
            .file
            .write_all(&header)
            .map_err(|e| StorageError::io("write", &builder.temp_path, e))?;
        Ok(builder)
    }

    /// Bytes of content written so far (the offset the next chunk must have).
    pub fn written_bytes(&self) -> u64 {
        self.written_bytes
    }

    /// Appends the chunk at `offset` of the content. Chunks must arrive in order, without
    /// gaps or overlaps, and (when receiving) must not exceed the announced length.
    ///
    /// # Errors
    /// [`StorageError::SnapshotTransfer`] for a chunk out of order or too long; IO errors.
    pub fn write_chunk(&mut self, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        if offset != self.written_bytes {
            return Err(StorageError::SnapshotTransfer(format!(
                "chunk at offset {offset}, expected {}",
                self.written_bytes
            )));
        }
        let end = self.written_bytes + data.len() as u64;
        if let Some((content_bytes, _)) = self.expected
            && end > content_bytes
        {
            return Err(StorageError::SnapshotTransfer(format!(
                "chunk ends at {end}, past the announced length {content_bytes}"
            )));
        }
        self.file
            .write_all(data)
            .map_err(|e| StorageError::io("write", &self.temp_path, e))?;
        self.digest.update(data);
        self.written_bytes = end;
        Ok(())
    }

    /// Verifies the content (length and digest, when receiving), fsyncs the file, renames
    /// it into place, fsyncs the directory and deletes older snapshots beyond
    /// [`SNAPSHOTS_KEPT`]. On any error the temp file is removed and nothing is installed.
    ///
    /// # Errors
    /// [`StorageError::SnapshotTransfer`] if the length or digest differs from the
    /// announced ones; IO errors.
    pub fn finish(mut self) -> Result<SnapshotInfo, StorageError> {
        let digest = std::mem::replace(&mut self.digest, Context::new(&SHA256)).finish();
        let sha: [u8; DIGEST_BYTES] = digest
            .as_ref()
            .try_into()
            .expect("SHA-256 digests are 32 bytes");
        if let Some((content_bytes, expected_sha)) = self.expected {
            if self.written_bytes != content_bytes {
                return Err(StorageError::SnapshotTransfer(format!(
                    "received {} bytes, announced {content_bytes}",
                    self.written_bytes
                )));
            }
            if sha != expected_sha {
                return Err(StorageError::SnapshotTransfer(
                    "content digest differs from the announced one".into(),
                ));
            }
        } else {
            let header = encode_header(&self.meta, self.written_bytes, &sha)?;
            assert_eq!(
                header.len() as u64,
                self.header_bytes,
                "header length depends only on the membership"
            );
            self.file
                .write_all_at(&header, 0)
                .map_err(|e| StorageError::io("write", &self.temp_path, e))?;
        }
        self.file
            .sync_all()
            .map_err(|e| StorageError::io("fsync", &self.temp_path, e))?;
        let path = self.store.dir.join(file_name(&self.meta));
        fs::rename(&self.temp_path, &path)
            .map_err(|e| StorageError::io("rename", &self.temp_path, e))?;
        self.finished = true;
        fsync_dir(&self.store.dir).map_err(|e| StorageError::io("fsync", &self.store.dir, e))?;
        self.store.prune(&path)?;
        Ok(SnapshotInfo {
            meta: self.meta.clone(),
            content_bytes: self.written_bytes,
            content_sha256: sha,
            path,
            header_bytes: self.header_bytes,
        })
    }
}

impl std::fmt::Debug for SnapshotBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotBuilder")
            .field("meta", &self.meta)
            .field("temp_path", &self.temp_path)
            .field("written_bytes", &self.written_bytes)
            .finish()
    }
}

impl std::fmt::Debug for SnapshotReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotReader")
            .field("info", &self.info)
            .field("offset", &self.offset)
            .finish()
    }
}

impl Write for SnapshotBuilder {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_chunk(self.written_bytes, buf)
            .map_err(io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for SnapshotBuilder {
    fn drop(&mut self) {
        if !self.finished {
            let _ = fs::remove_file(&self.temp_path);
        }
    }
}

/// Streams a snapshot's content in chunks, checking the content digest as it goes: the
/// last chunk is returned only if the whole content matched, so a consumer that applies
/// chunks into scratch space and swaps at the end never applies a damaged snapshot.
pub struct SnapshotReader {
    file: File,
    info: SnapshotInfo,
    offset: u64,
    digest: Context,
}

impl SnapshotReader {
    /// Opens `path` and checks its header (magic, digest) and exact length. The content is
    /// checked while it is read.
    ///
    /// # Errors
    /// [`StorageError::CorruptSnapshot`] if a check fails; IO errors.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let mut file = File::open(path).map_err(|e| StorageError::io("open", path, e))?;
        let info = read_header(&mut file, path)?;
        let file_bytes = file
            .metadata()
            .map_err(|e| StorageError::io("stat", path, e))?
            .len();
        let expected = info.header_bytes + info.content_bytes;
        if file_bytes != expected {
            return Err(corrupt(
                path,
                format!(
                    "file is {file_bytes} bytes, header says {expected} (truncated or extended)"
                ),
            ));
        }
        Ok(Self {
            file,
            info,
            offset: 0,
            digest: Context::new(&SHA256),
        })
    }

    /// The header of the file.
    pub fn info(&self) -> &SnapshotInfo {
        &self.info
    }

    /// The next chunk of at most `chunk_bytes_max` bytes, or `None` after the last one.
    /// An empty snapshot yields one empty last chunk.
    ///
    /// # Errors
    /// [`StorageError::CorruptSnapshot`] when the content digest does not match (instead
    /// of the last chunk) or the file shrank; IO errors.
    pub fn next_chunk(
        &mut self,
        chunk_bytes_max: usize,
    ) -> Result<Option<SnapshotChunk>, StorageError> {
        assert!(chunk_bytes_max > 0, "a chunk must carry bytes");
        let content_bytes = self.info.content_bytes;
        if self.offset > content_bytes {
            return Ok(None);
        }
        let remaining = content_bytes - self.offset;
        let len = usize::try_from(remaining)
            .unwrap_or(usize::MAX)
            .min(chunk_bytes_max);
        let mut data = BytesMut::zeroed(len);
        self.file
            .read_exact(&mut data)
            .map_err(|e| corrupt(&self.info.path, format!("reading content: {e}")))?;
        self.digest.update(&data);
        let offset = self.offset;
        let last = len as u64 == remaining;
        // Past the end: the next call returns None.
        self.offset += len as u64 + u64::from(last);
        if last {
            let digest = std::mem::replace(&mut self.digest, Context::new(&SHA256)).finish();
            if digest.as_ref() != self.info.content_sha256 {
                return Err(corrupt(&self.info.path, "content digest mismatch".into()));
            }
        }
        Ok(Some(SnapshotChunk {
            offset,
            data: data.freeze(),
            last,
        }))
    }
}

/// Reads a whole snapshot file and checks every byte: header, length and content digest.
///
/// # Errors
/// [`StorageError::CorruptSnapshot`] if any check fails; IO errors.
pub fn verify_file(path: &Path) -> Result<SnapshotInfo, StorageError> {
    let mut reader = SnapshotReader::open(path)?;
    while let Some(chunk) = reader.next_chunk(VERIFY_BUFFER_BYTES)? {
        if chunk.last {
            break;
        }
    }
    Ok(reader.info)
}

fn corrupt(path: &Path, reason: String) -> StorageError {
    StorageError::CorruptSnapshot {
        path: path.to_path_buf(),
        reason,
    }
}

fn encode_header(
    meta: &SnapshotMeta,
    content_bytes: u64,
    content_sha256: &[u8; DIGEST_BYTES],
) -> Result<Vec<u8>, StorageError> {
    let members = meta.membership.voters.len() + meta.membership.learners.len();
    if members > SNAPSHOT_MEMBERS_MAX as usize {
        return Err(StorageError::InvalidRequest(format!(
            "snapshot membership of {members} exceeds {SNAPSHOT_MEMBERS_MAX}"
        )));
    }
    let header_bytes = HEADER_FIXED_BYTES + 8 * members;
    let mut out = Vec::with_capacity(header_bytes);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(
        &u32::try_from(header_bytes)
            .expect("bounded by HEADER_BYTES_MAX")
            .to_be_bytes(),
    );
    out.extend_from_slice(&meta.index.to_be_bytes());
    out.extend_from_slice(&meta.term.to_be_bytes());
    for set in [&meta.membership.voters, &meta.membership.learners] {
        out.extend_from_slice(
            &u32::try_from(set.len())
                .expect("bounded above")
                .to_be_bytes(),
        );
        for id in set {
            out.extend_from_slice(&id.to_be_bytes());
        }
    }
    out.extend_from_slice(&content_bytes.to_be_bytes());
    out.extend_from_slice(content_sha256);
    let header_sha = ring::digest::digest(&SHA256, &out);
    out.extend_from_slice(header_sha.as_ref());
    assert_eq!(out.len(), header_bytes);
    Ok(out)
}

fn read_header(file: &mut File, path: &Path) -> Result<SnapshotInfo, StorageError> {
    let mut prefix = [0u8; HEADER_PREFIX_BYTES];
    file.read_exact(&mut prefix)
        .map_err(|e| corrupt(path, format!("reading header: {e}")))?;
    if &prefix[..8] != MAGIC {
        return Err(corrupt(path, "bad magic".into()));
    }
    let header_bytes = u32::from_be_bytes(prefix[8..].try_into().expect("four bytes")) as usize;
    if !(HEADER_FIXED_BYTES..=HEADER_BYTES_MAX).contains(&header_bytes) {
        return Err(corrupt(
            path,
            format!("header length {header_bytes} out of range"),
        ));
    }
    let mut header = vec![0u8; header_bytes];
    header[..HEADER_PREFIX_BYTES].copy_from_slice(&prefix);
    file.read_exact(&mut header[HEADER_PREFIX_BYTES..])
        .map_err(|e| corrupt(path, format!("reading header: {e}")))?;
    let (body, stored_sha) = header.split_at(header_bytes - DIGEST_BYTES);
    if ring::digest::digest(&SHA256, body).as_ref() != stored_sha {
        return Err(corrupt(path, "header digest mismatch".into()));
    }
    let mut cursor = Cursor {
        bytes: &body[HEADER_PREFIX_BYTES..],
    };
    let index = cursor.u64();
    let term = cursor.u64();
    let mut membership = Membership::default();
    for set in [&mut membership.voters, &mut membership.learners] {
        let count = cursor
            .try_u32()
            .ok_or_else(|| corrupt(path, "header too short".into()))?;
        for _ in 0..count {
            let id: NodeId = cursor
                .try_u64()
                .ok_or_else(|| corrupt(path, "member list overruns the header".into()))?;
            set.insert(id);
        }
    }
    let content_bytes = cursor
        .try_u64()
        .ok_or_else(|| corrupt(path, "header too short".into()))?;
    let content_sha256: [u8; DIGEST_BYTES] = cursor
        .take(DIGEST_BYTES)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| corrupt(path, "header too short".into()))?;
    if !cursor.bytes.is_empty() {
        return Err(corrupt(path, "header has trailing bytes".into()));
    }
    Ok(SnapshotInfo {
        meta: SnapshotMeta {
            index,
            term,
            membership,
        },
        content_bytes,
        content_sha256,
        path: path.to_path_buf(),
        header_bytes: header_bytes as u64,
    })
}

/// Reads big-endian fields from a header whose length was checked against its fixed part.
struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }

    fn try_u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_be_bytes(b.try_into().expect("eight bytes")))
    }

    fn u64(&mut self) -> u64 {
        self.try_u64()
            .expect("the fixed header part was length-checked")
    }

    fn try_u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("four bytes")))
    }
}
