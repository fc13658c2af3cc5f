//! Task logs on the agent: each task's stdout and stderr kept as timestamped lines on disk,
//! and served to the leader's log subscriptions (swarmkit's agent log publisher).
//!
//! ```text
//!  child ──appends──► <task>/stdout.log, stderr.log   (the executor's files, rotated to .1)
//!                          │ tailed every COLLECT_PERIOD by `agent-logs`
//!                          ▼
//!                     <task>/lines.log (+ lines.log.1): `<unix ms> <o|e> <bytes>\n`
//!                          │ history (since, tail) + new lines (follow)
//!                          ▼
//!  leader ◄──dispatcher.PublishLogs (≤ PUBLISH_BYTES_MAX per call)── `agent-logs`
//! ```
//!
//! - The child writes its output straight to its files (so a task survives an agent
//!   restart); this module tails them, splitting lines, stamping each with the time it read
//!   it (at most [`COLLECT_PERIOD`] late) and its stream, into `lines.log`. The offsets read
//!   so far are kept in `<task>/log-offsets`, so a restarted agent neither repeats nor
//!   skips lines. A line longer than [`LINE_BYTES_MAX`] is cut; an unfinished line is
//!   taken once its file stayed quiet for [`PARTIAL_QUIET_PASSES`] passes.
//! - Bounds: `lines.log` moves to `lines.log.1` past [`LINES_FILE_BYTES_MAX`] (5 MiB), so a
//!   task keeps at most 10 MiB of lines (beside the executor's raw files, 2 × 8 MiB per
//!   stream); at most [`SUBSCRIPTIONS_MAX`] subscriptions, [`SUBSCRIPTION_TASKS_MAX`] tasks
//!   each; reading takes at most [`READ_BYTES_PER_PASS_MAX`] per stream and pass. The lines
//!   go with the task's directory (the runner removes it when the task is forgotten).
//! - A rotation of a raw file by the runner is seen as a change of `<name>.1` (its size or
//!   time): the rest is read from there, then the file from its start. Two rotations
//!   within one pass (over 40 MiB/s of output) lose lines, and so do the bytes the runner's
//!   rotation itself loses (written between its copy and its truncation).
//!
//! Must never block the task runner (it only shares the directory with it), write into a
//! task directory it did not find (a forgotten task's directory stays gone), or keep
//! subscriptions beyond [`SUBSCRIPTIONS_MAX`].

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::executor::{STDERR_LOG_FILE, STDOUT_LOG_FILE};
use crate::net::{CallOptions, Transport};
use crate::proto::dispatcher as pb;
use crate::proto::dispatcher::rpc::PUBLISH_LOGS;
use crate::util::clock::unix_now_ms;
use crate::wire::Code;

/// How often the task output files are read.
pub const COLLECT_PERIOD: Duration = Duration::from_millis(200);
/// The lines file moves to `lines.log.1` past this size: a task keeps at most twice it.
pub const LINES_FILE_BYTES_MAX: u64 = 5 << 20;
/// A longer line is cut into pieces of this size.
pub const LINE_BYTES_MAX: usize = 16 << 10;
/// Bytes read from one output file per pass (the rest waits for the next pass).
pub const READ_BYTES_PER_PASS_MAX: u64 = 1 << 20;
/// Passes an unfinished last line waits for its newline before it is taken as it is.
pub const PARTIAL_QUIET_PASSES: u32 = 5;
/// Subscriptions an agent serves at once; more are answered closed at once.
pub const SUBSCRIPTIONS_MAX: usize = 64;
/// Task ids one subscription may name.
pub const SUBSCRIPTION_TASKS_MAX: usize = 10_000;
/// Subscription messages waiting for the `agent-logs` thread; more are dropped (logged:
/// the leader warns that this node did not answer).
pub const SUBSCRIPTION_QUEUE_LEN_MAX: usize = 64;
/// Bytes of lines per `PublishLogs` call.
pub const PUBLISH_BYTES_MAX: usize = 1 << 20;
/// How long one `PublishLogs` call may take.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// The timestamped lines of a task.
pub const LINES_FILE: &str = "lines.log";
/// What the lines file held before its last rotation.
pub const LINES_FILE_ROTATED: &str = "lines.log.1";
/// How far the output files were read (`<stdout offset> <stderr offset>`).
pub const OFFSETS_FILE: &str = "log-offsets";

/// One stored line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// When the agent read it (ms since the Unix epoch).
    pub time_unix_ms: i64,
    /// From stderr (else stdout).
    pub stderr: bool,
    /// The bytes, without the newline.
    pub data: Vec<u8>,
}

impl Line {
    fn encode_into(&self, out: &mut Vec<u8>) {
        let stream = if self.stderr { 'e' } else { 'o' };
        out.extend_from_slice(format!("{} {stream} ", self.time_unix_ms).as_bytes());
        out.extend_from_slice(&self.data);
        out.push(b'\n');
    }

    /// One record of a lines file (without its newline); `None` if damaged.
    fn decode(record: &[u8]) -> Option<Line> {
        let mut parts = record.splitn(3, |b| *b == b' ');
        let time = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
        let stderr = match parts.next()? {
            b"o" => false,
            b"e" => true,
            _ => return None,
        };
        Some(Line {
            time_unix_ms: time,
            stderr,
            data: parts.next()?.to_vec(),
        })
    }

    fn to_proto(&self, task_id: &str) -> pb::LogLine {
        pb::LogLine {
            task_id: task_id.to_string(),
            time_unix_ms: self.time_unix_ms,
            stderr: self.stderr,
            data: bytes::Bytes::from(self.data.clone()),
        }
    }
}

/// Size and modification time of a rotated output file (`<name>.1`): a change is a
/// rotation.
type RotatedStamp = Option<(u64, Option<std::time::SystemTime>)>;

/// How far one output file was read.
#[derive(Clone, Copy, Debug, Default)]
struct StreamTail {
    offset: u64,
    /// The rotated copy as last seen (`None` inside: there was none), once looked at.
    rotated: Option<RotatedStamp>,
    /// The file's length at the last pass, and for how many passes it stayed so.
    last_len: u64,
    quiet_passes: u32,
}

/// One task's collection state.
#[derive(Debug, Default)]
struct TaskTail {
    streams: [StreamTail; 2],
}

/// Reads the stored lines of the task in `task_dir`: those at or after `since_unix_ms`,
/// the last `tail` of them if given.
///
/// # Errors
/// The OS error of reading a lines file (a missing one is no lines).
pub fn read_lines(task_dir: &Path, since_unix_ms: i64, tail: Option<u32>) -> io::Result<Vec<Line>> {
    let keep = tail.map(|n| n as usize);
    let mut lines: VecDeque<Line> = VecDeque::new();
    for name in [LINES_FILE_ROTATED, LINES_FILE] {
        let file = match File::open(task_dir.join(name)) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error),
        };
        for record in BufReader::new(file).split(b'\n') {
            let Some(line) = Line::decode(&record?) else {
                continue;
            };
            if line.time_unix_ms < since_unix_ms {
                continue;
            }
            lines.push_back(line);
            if keep.is_some_and(|n| lines.len() > n) {
                lines.pop_front();
            }
        }
    }
    Ok(lines.into())
}

/// Appends `lines` to the task's lines file, rotating it past [`LINES_FILE_BYTES_MAX`].
fn append_lines(task_dir: &Path, lines: &[Line]) -> io::Result<()> {
    let path = task_dir.join(LINES_FILE);
    if fs::metadata(&path).is_ok_and(|m| m.len() > LINES_FILE_BYTES_MAX) {
        fs::rename(&path, task_dir.join(LINES_FILE_ROTATED))?;
    }
    let mut bytes = Vec::new();
    for line in lines {
        line.encode_into(&mut bytes);
    }
    // No `create_dir`: a directory the runner removed stays removed.
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?
        .write_all(&bytes)
}

fn read_offsets(task_dir: &Path) -> TaskTail {
    let mut tail = TaskTail::default();
    if let Ok(text) = fs::read_to_string(task_dir.join(OFFSETS_FILE)) {
        for (stream, word) in tail.streams.iter_mut().zip(text.split_whitespace()) {
            stream.offset = word.parse().unwrap_or(0);
        }
    }
    tail
}

fn write_offsets(task_dir: &Path, tail: &TaskTail) -> io::Result<()> {
    let text = format!("{} {}\n", tail.streams[0].offset, tail.streams[1].offset);
    fs::write(task_dir.join(OFFSETS_FILE), text)
}

/// Reads `[from, from + max)` of `path` (less at its end).
fn read_range(path: &Path, from: u64, max: u64) -> io::Result<Vec<u8>> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(from))?;
    let mut bytes = Vec::new();
    file.take(max).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Splits `bytes` into lines: every complete one, the unfinished rest too when `flush`.
/// Returns the lines and how many bytes they used.
fn split_lines(bytes: &[u8], flush: bool) -> (Vec<Vec<u8>>, usize) {
    let mut lines = Vec::new();
    let mut used = 0;
    while used < bytes.len() {
        let rest = &bytes[used..];
        let window = &rest[..rest.len().min(LINE_BYTES_MAX)];
        match window.iter().position(|b| *b == b'\n') {
            Some(end) => {
                lines.push(rest[..end].to_vec());
                used += end + 1;
            }
            None if window.len() == LINE_BYTES_MAX || flush => {
                lines.push(window.to_vec());
                used += window.len();
            }
            None => break,
        }
    }
    (lines, used)
}

/// Reads what one output file gained since `tail`; returns its new lines.
fn collect_stream(task_dir: &Path, name: &str, tail: &mut StreamTail) -> io::Result<Vec<Vec<u8>>> {
    let path = task_dir.join(name);
    let len = match fs::metadata(&path) {
        Ok(meta) => meta.len(),
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    let rotated_path = task_dir.join(format!("{name}.1"));
    let stamp: RotatedStamp = fs::metadata(&rotated_path)
        .ok()
        .map(|m| (m.len(), m.modified().ok()));
    let mut lines = Vec::new();
    if tail.rotated.is_some_and(|seen| seen != stamp) && stamp.is_some() {
        // Rotated by the runner since the last pass: the rest of what was being read is in
        // `<name>.1`, and the file starts over.
        let rest = read_range(&rotated_path, tail.offset, u64::MAX).unwrap_or_default();
        lines = split_lines(&rest, true).0;
        tail.offset = 0;
    } else if len < tail.offset {
        // Rotated while no agent watched (a restart): what came between is not known.
        tail.offset = 0;
    }
    tail.rotated = Some(stamp);
    if len == tail.last_len {
        tail.quiet_passes = tail.quiet_passes.saturating_add(1);
    } else {
        tail.last_len = len;
        tail.quiet_passes = 0;
    }
    if len > tail.offset {
        let bytes = read_range(&path, tail.offset, READ_BYTES_PER_PASS_MAX)?;
        let flush = tail.quiet_passes >= PARTIAL_QUIET_PASSES;
        let (more, used) = split_lines(&bytes, flush);
        lines.extend(more);
        tail.offset += used as u64;
    }
    Ok(lines)
}

/// The task directories under `work_dir` (each named by its task id).
fn task_ids(work_dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(work_dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

/// Tails every task's output into its lines file.
struct Collector {
    work_dir: PathBuf,
    tails: HashMap<String, TaskTail>,
}

impl Collector {
    /// One pass: the new lines of each task, also appended to its lines file.
    fn collect(&mut self) -> HashMap<String, Vec<Line>> {
        let ids = task_ids(&self.work_dir);
        let present: HashSet<&String> = ids.iter().collect();
        self.tails.retain(|id, _| present.contains(id));
        let mut new = HashMap::new();
        for id in &ids {
            let dir = self.work_dir.join(id);
            let tail = self
                .tails
                .entry(id.clone())
                .or_insert_with(|| read_offsets(&dir));
            match collect_task(&dir, tail) {
                Ok(lines) if !lines.is_empty() => {
                    new.insert(id.clone(), lines);
                }
                Ok(_) => {}
                // The runner removed the directory meanwhile, or the disk failed: the task's
                // output stays in its files and is read again at the next pass.
                Err(error) => log::debug!("agent logs: task {id}: {error}"),
            }
        }
        new
    }
}

fn collect_task(dir: &Path, tail: &mut TaskTail) -> io::Result<Vec<Line>> {
    let before = tail.streams.map(|s| s.offset);
    let now = unix_now_ms();
    let mut lines = Vec::new();
    for (index, name) in [STDOUT_LOG_FILE, STDERR_LOG_FILE].into_iter().enumerate() {
        for data in collect_stream(dir, name, &mut tail.streams[index])? {
            lines.push(Line {
                time_unix_ms: now,
                stderr: index == 1,
                data,
            });
        }
    }
    if tail.streams.map(|s| s.offset) != before {
        append_lines(dir, &lines)?;
        write_offsets(dir, tail)?;
    }
    Ok(lines)
}

/// A subscription being served.
struct Subscription {
    session_id: String,
    addr: String,
    follow: bool,
    since_unix_ms: i64,
    tail: Option<u32>,
    /// Tasks whose new lines are sent.
    tasks: HashSet<String>,
    /// Tasks whose history is still to send.
    added: BTreeSet<String>,
}

/// One subscription message from the session, with where it came from.
struct Incoming {
    subscription: pb::LogSubscription,
    session_id: String,
    addr: String,
}

/// The `agent-logs` thread's handle. Stop it with [`LogService::stop`].
pub struct LogService {
    incoming: Sender<Incoming>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LogService {
    /// Starts `agent-logs` over the task directories under `work_dir`, publishing through
    /// `transport` with `tls`.
    ///
    /// # Errors
    /// The OS error if the thread cannot start.
    pub fn start(
        work_dir: PathBuf,
        transport: Arc<Transport>,
        tls: Arc<rustls::ClientConfig>,
    ) -> io::Result<LogService> {
        let (incoming, incoming_rx) = crossbeam_channel::bounded(SUBSCRIPTION_QUEUE_LEN_MAX);
        let stopping = Arc::new(AtomicBool::new(false));
        let mut worker = Worker {
            collector: Collector {
                work_dir,
                tails: HashMap::new(),
            },
            subscriptions: HashMap::new(),
            transport,
            tls,
        };
        let stop = stopping.clone();
        let thread = std::thread::Builder::new()
            .name("agent-logs".into())
            .spawn(move || worker.run(&incoming_rx, &stop))?;
        Ok(LogService {
            incoming,
            stopping,
            thread: Some(thread),
        })
    }

    /// Hands a subscription the session received (from `addr`, session `session_id`) to
    /// the thread; dropped (logged) when its queue is full.
    pub fn subscribe(&self, subscription: pb::LogSubscription, session_id: &str, addr: &str) {
        let id = subscription.id.clone();
        let message = Incoming {
            subscription,
            session_id: session_id.to_string(),
            addr: addr.to_string(),
        };
        if let Err(TrySendError::Full(_)) = self.incoming.try_send(message) {
            log::warn!("agent logs: subscription {id} dropped: {SUBSCRIPTION_QUEUE_LEN_MAX} wait");
        }
    }

    /// Stops the thread and joins it.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            log::error!("the agent-logs thread panicked");
        }
    }
}

impl Drop for LogService {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// What `agent-logs` owns.
struct Worker {
    collector: Collector,
    subscriptions: HashMap<String, Subscription>,
    transport: Arc<Transport>,
    tls: Arc<rustls::ClientConfig>,
}

impl Worker {
    fn run(&mut self, incoming: &Receiver<Incoming>, stopping: &AtomicBool) {
        while !stopping.load(Ordering::SeqCst) {
            match incoming.recv_timeout(COLLECT_PERIOD) {
                Ok(message) => self.take(message),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            }
            while let Ok(message) = incoming.try_recv() {
                self.take(message);
            }
            let new = self.collector.collect();
            self.serve(&new);
        }
    }

    fn take(&mut self, message: Incoming) {
        let Incoming {
            subscription,
            session_id,
            addr,
        } = message;
        if subscription.close {
            self.subscriptions.remove(&subscription.id);
            return;
        }
        if !self.subscriptions.contains_key(&subscription.id)
            && self.subscriptions.len() >= SUBSCRIPTIONS_MAX
        {
            log::warn!(
                "agent logs: {SUBSCRIPTIONS_MAX} subscriptions already; closing {}",
                subscription.id
            );
            let request = pb::PublishLogsRequest {
                session_id,
                subscription_id: subscription.id,
                close: true,
                ..Default::default()
            };
            let _ = self.publish(&addr, request);
            return;
        }
        let entry = self
            .subscriptions
            .entry(subscription.id.clone())
            .or_insert_with(|| Subscription {
                session_id,
                addr,
                follow: subscription.follow,
                since_unix_ms: subscription.since_unix_ms,
                tail: subscription.tail,
                tasks: HashSet::new(),
                added: BTreeSet::new(),
            });
        for id in subscription.task_ids {
            if entry.tasks.len() + entry.added.len() >= SUBSCRIPTION_TASKS_MAX {
                break;
            }
            if !entry.tasks.contains(&id) {
                entry.added.insert(id);
            }
        }
    }

    /// Sends each subscription its new lines and the history of its added tasks; ends the
    /// ones that do not follow, and those the leader no longer knows.
    fn serve(&mut self, new: &HashMap<String, Vec<Line>>) {
        let ids: Vec<String> = self.subscriptions.keys().cloned().collect();
        for id in ids {
            let Some(mut subscription) = self.subscriptions.remove(&id) else {
                continue;
            };
            let keep = self.serve_one(&id, &mut subscription, new);
            if keep && subscription.follow {
                self.subscriptions.insert(id, subscription);
            }
        }
    }

    /// False when the subscription ends (its leader said it is gone, or cannot be reached).
    fn serve_one(
        &self,
        id: &str,
        subscription: &mut Subscription,
        new: &HashMap<String, Vec<Line>>,
    ) -> bool {
        let mut lines = Vec::new();
        for task in &subscription.tasks {
            for line in new.get(task).into_iter().flatten() {
                if line.time_unix_ms >= subscription.since_unix_ms {
                    lines.push(line.to_proto(task));
                }
            }
        }
        let mut missing = Vec::new();
        for task in std::mem::take(&mut subscription.added) {
            let dir = self.collector.work_dir.join(&task);
            if crate::agent::executor::validate_task_id(&task).is_err() || !dir.is_dir() {
                missing.push(task);
                continue;
            }
            match read_lines(&dir, subscription.since_unix_ms, subscription.tail) {
                Ok(history) => lines.extend(history.iter().map(|l| l.to_proto(&task))),
                Err(error) => log::warn!("agent logs: cannot read the lines of {task}: {error}"),
            }
            subscription.tasks.insert(task);
        }
        let close = !subscription.follow;
        if lines.is_empty() && missing.is_empty() && !close {
            return true;
        }
        // The lines first; `close` and the missing tasks in a last call of their own.
        for batch in batches(lines) {
            let request = pb::PublishLogsRequest {
                session_id: subscription.session_id.clone(),
                subscription_id: id.to_string(),
                lines: batch,
                close: false,
                missing_task_ids: Vec::new(),
            };
            if !self.publish(&subscription.addr, request) {
                return false;
            }
        }
        if close || !missing.is_empty() {
            let request = pb::PublishLogsRequest {
                session_id: subscription.session_id.clone(),
                subscription_id: id.to_string(),
                lines: Vec::new(),
                close,
                missing_task_ids: missing,
            };
            return self.publish(&subscription.addr, request);
        }
        true
    }

    /// One `PublishLogs` call; false when the subscription should end.
    fn publish(&self, addr: &str, request: pb::PublishLogsRequest) -> bool {
        let channel = self.transport.channel(addr, &self.tls);
        match channel.call(
            PUBLISH_LOGS,
            &request,
            CallOptions::timeout(PUBLISH_TIMEOUT),
        ) {
            Ok(_) => true,
            Err(status) if status.code == Code::NotFound => false,
            Err(status) => {
                log::info!(
                    "agent logs: cannot publish to {addr} for subscription {}: {status}",
                    request.subscription_id
                );
                false
            }
        }
    }
}

/// `lines` cut into calls of at most [`PUBLISH_BYTES_MAX`] (a line alone may be larger).
fn batches(lines: Vec<pb::LogLine>) -> Vec<Vec<pb::LogLine>> {
    let mut out: Vec<Vec<pb::LogLine>> = Vec::new();
    let mut bytes = 0;
    for line in lines {
        let len = line.data.len() + line.task_id.len() + 16;
        if out.is_empty() || bytes + len > PUBLISH_BYTES_MAX {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += len;
        out.last_mut().expect("pushed above").push(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open");
        file.write_all(text.as_bytes()).expect("write");
    }

    fn data(lines: &[Line]) -> Vec<String> {
        lines
            .iter()
            .map(|l| {
                format!(
                    "{}{}",
                    if l.stderr { "e:" } else { "" },
                    String::from_utf8_lossy(&l.data)
                )
            })
            .collect()
    }

    #[test]
    fn output_becomes_timestamped_lines_once_with_unfinished_lines_held_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let task = dir.path().join("t1");
        fs::create_dir(&task).expect("mkdir");
        write(&task.join(STDOUT_LOG_FILE), "one\ntwo\nhal");
        write(&task.join(STDERR_LOG_FILE), "oops\n");
        let mut collector = Collector {
            work_dir: dir.path().to_path_buf(),
            tails: HashMap::new(),
        };
        let new = collector.collect();
        assert_eq!(data(&new["t1"]), ["one", "two", "e:oops"]);
        write(&task.join(STDOUT_LOG_FILE), "f\n");
        assert_eq!(data(&collector.collect()["t1"]), ["half"]);
        // A restarted agent reads on from the stored offsets.
        let mut restarted = Collector {
            work_dir: dir.path().to_path_buf(),
            tails: HashMap::new(),
        };
        assert!(restarted.collect().is_empty());
        let stored = read_lines(&task, 0, None).expect("read");
        assert_eq!(data(&stored), ["one", "two", "e:oops", "half"]);
        assert_eq!(
            data(&read_lines(&task, 0, Some(1)).expect("read")),
            ["half"]
        );
        let later = stored[0].time_unix_ms + 60_000;
        assert!(read_lines(&task, later, None).expect("read").is_empty());
    }

    #[test]
    fn an_unfinished_line_is_taken_once_its_file_is_quiet_and_long_lines_are_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let task = dir.path().join("t1");
        fs::create_dir(&task).expect("mkdir");
        write(&task.join(STDOUT_LOG_FILE), "no newline");
        let mut collector = Collector {
            work_dir: dir.path().to_path_buf(),
            tails: HashMap::new(),
        };
        let mut seen = Vec::new();
        for _ in 0..=PARTIAL_QUIET_PASSES {
            seen.extend(collector.collect().remove("t1").unwrap_or_default());
        }
        assert_eq!(data(&seen), ["no newline"]);
        let (lines, used) = split_lines(&vec![b'x'; LINE_BYTES_MAX + 10], false);
        assert_eq!((lines.len(), used), (1, LINE_BYTES_MAX));
    }

    #[test]
    fn a_raw_file_rotated_by_the_runner_is_read_on_from_its_copy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let task = dir.path().join("t1");
        fs::create_dir(&task).expect("mkdir");
        let out = task.join(STDOUT_LOG_FILE);
        write(&out, "a\n");
        let mut collector = Collector {
            work_dir: dir.path().to_path_buf(),
            tails: HashMap::new(),
        };
        collector.collect();
        write(&out, "b\nc\n");
        fs::copy(&out, task.join(format!("{STDOUT_LOG_FILE}.1"))).expect("copy");
        fs::write(&out, "d\n").expect("truncate");
        assert_eq!(data(&collector.collect()["t1"]), ["b", "c", "d"]);
    }
}
