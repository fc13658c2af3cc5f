//! Sending to one peer: the raft thread's direct lane, and the replication thread
//! (`raft-peer-<peer>`, one per peer) for everything that may wait.
//!
//! Direct lane: while the peer's connection is up and nothing waits in the peer thread's
//! queue, the raft thread itself hands the peer's messages to the transport at the end of
//! its turn as one one-way `raft.Step` call ([`Channel::send_oneway`]), never blocking.
//! While more inputs wait, messages are held a few turns (at most [`HOLD_WHILE_BUSY_MAX`])
//! so that calls stay few and large under load. One call per [`REMOVAL_CHECK_INTERVAL`]
//! asks for the reply ([`Channel::unary_nowait`], handled on the reactor), which says
//! whether the peer considers this member removed. This spares two thread wake-ups per
//! message on the commit path, the CPU a peer thread spent waiting for each reply, and
//! the reply frames themselves.
//!
//! Peer thread: everything else goes through its bounded queue: messages while the
//! connection is down (it dials, with backoff) or the direct lane is full, and snapshots,
//! streamed chunk by chunk over `raft.InstallSnapshot`. Messages stay in order: the raft
//! thread uses the direct lane only when the peer thread has sent everything it was given
//! (the `queued` count), and both lanes feed the same connection.
//!
//! Must never block the raft thread: the queue is bounded and the raft thread drops
//! messages when it is full (Raft retransmits), and must never hold more than a few
//! snapshot chunks in memory whatever the snapshot's size.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::codec::message_to_pb;
use super::{Input, Shared};
use crate::net::{CallOptions, Channel, Transport};
use crate::proto::raft as pb;
use crate::proto::raft::rpc::{INSTALL_SNAPSHOT, STEP};
use crate::raft::core::{Message, MessageBody};
use crate::raft::storage::snapshot::SnapshotReader;
use crate::raft::types::{LogIndex, NodeId};

/// Messages queued for one peer before the raft thread drops new ones.
pub const PEER_QUEUE_LEN_MAX: usize = 1024;
/// Messages in one `raft.Step` call.
pub const STEP_BATCH_MSGS_MAX: usize = 512;
/// Entry payload bytes in one `raft.Step` call (well under the 4 MiB frame limit).
pub const STEP_BATCH_BYTES_MAX: u64 = 2 << 20;
/// While the raft thread has more inputs waiting, held messages wait for the next turns
/// up to this long: fewer, larger calls under load (each call costs both reactors a frame
/// and the follower a wake-up); when idle they go at the end of the turn.
pub const HOLD_WHILE_BUSY_MAX: Duration = Duration::from_micros(200);
/// Direct calls are one-way except one per this interval, whose reply tells a removed
/// member that it was removed.
pub const REMOVAL_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// How often an idle peer thread checks whether it should stop.
const IDLE_POLL: Duration = Duration::from_millis(200);
/// Longest wait for the follower to verify and install a received snapshot.
const SNAPSHOT_INSTALL_TIMEOUT: Duration = Duration::from_secs(120);

/// The raft thread's handle on one peer: its direct lane and its thread.
pub(crate) struct PeerHandle {
    id: NodeId,
    queue: Sender<Message>,
    /// Non-snapshot messages handed to the peer thread and not yet sent (or dropped) by it.
    queued: Arc<AtomicUsize>,
    /// Messages waiting for the end of the raft thread's turn (or, while it is busy, for a
    /// few more turns): they go out together as one call.
    held: Vec<Message>,
    held_bytes: u64,
    /// When the oldest held message was first offered for sending.
    held_since: Option<Instant>,
    /// When a direct call last asked for a reply (the others are one-way).
    last_reply_wanted: Option<Instant>,
    /// The channel of the direct lane and the address it dials.
    direct: Option<(String, Channel)>,
    shared: Arc<Shared>,
    transport: Arc<Transport>,
    tls: Arc<rustls::ClientConfig>,
    inputs: Sender<Input>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PeerHandle {
    /// Takes `messages` (all to this peer, in order): snapshot notices go to the peer
    /// thread at once, the rest are held until [`PeerHandle::flush`].
    pub(crate) fn send(&mut self, messages: Vec<Message>) {
        for message in messages {
            if matches!(message.body, MessageBody::Snapshot { .. }) {
                if self.queue.try_send(message).is_err() {
                    log::debug!(
                        "raft peer {:x}: queue full, dropping a snapshot notice",
                        self.id
                    );
                }
            } else {
                self.held_bytes += message.payload_bytes();
                self.held.push(message);
            }
        }
    }

    /// Sends the held messages, as one direct call if the lane is open, else through the
    /// peer thread's queue. The raft thread calls it at the end of every turn; while it
    /// is `busy` (inputs wait, so another turn follows at once) a batch that is not full
    /// waits up to [`HOLD_WHILE_BUSY_MAX`] for more.
    pub(crate) fn flush(&mut self, busy: bool) {
        if self.held.is_empty() {
            return;
        }
        if self.queued.load(Ordering::Acquire) != 0 {
            // The peer thread has messages not yet sent: these must follow them.
            self.hand_to_thread();
            return;
        }
        let since = *self.held_since.get_or_insert_with(Instant::now);
        let full =
            self.held.len() >= STEP_BATCH_MSGS_MAX || self.held_bytes >= STEP_BATCH_BYTES_MAX;
        if busy && !full && since.elapsed() < HOLD_WHILE_BUSY_MAX {
            return;
        }
        self.held_since = None;
        let held = std::mem::take(&mut self.held);
        self.held_bytes = 0;
        if let Err(held) = self.try_send_direct(held) {
            self.held = held;
            self.hand_to_thread();
        }
    }

    /// Moves the held messages to the peer thread's queue (in order).
    fn hand_to_thread(&mut self) {
        self.held_bytes = 0;
        self.held_since = None;
        for message in std::mem::take(&mut self.held) {
            self.queued.fetch_add(1, Ordering::AcqRel);
            if self.queue.try_send(message).is_err() {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                log::debug!("raft peer {:x}: queue full, dropping a message", self.id);
            }
        }
    }

    /// One direct call with `messages`; gives them back if the lane is closed. One-way,
    /// except one call per [`REMOVAL_CHECK_INTERVAL`], whose reply says whether the peer
    /// considers this member removed.
    fn try_send_direct(&mut self, messages: Vec<Message>) -> Result<(), Vec<Message>> {
        let Some(channel) = self.direct_channel() else {
            return Err(messages);
        };
        let request = pb::StepRequest {
            from: self.shared.config.id,
            from_addr: self.shared.config.addr.clone(),
            messages: messages.iter().map(message_to_pb).collect(),
        };
        let payload = bytes::Bytes::from(prost::Message::encode_to_vec(&request));
        let reply_wanted = self
            .last_reply_wanted
            .is_none_or(|at| at.elapsed() >= REMOVAL_CHECK_INTERVAL);
        let sent = if reply_wanted {
            self.last_reply_wanted = Some(Instant::now());
            let (id, inputs) = (self.id, self.inputs.clone());
            let on_reply = Box::new(move |reply: Result<bytes::Bytes, crate::wire::Status>| {
                on_step_reply(id, &inputs, reply);
            });
            let timeout = Duration::from_millis(self.shared.config.step_timeout_ms);
            channel.unary_nowait(STEP.name(), payload, timeout, on_reply)
        } else {
            channel.send_oneway(STEP.name(), payload)
        };
        sent.map_err(|status| {
            log::trace!("raft peer {:x}: direct lane closed: {status}", self.id);
            messages
        })
    }

    /// The channel for the direct lane, refreshed when the peer's address changes.
    fn direct_channel(&mut self) -> Option<Channel> {
        let current = self
            .direct
            .as_ref()
            .is_some_and(|(addr, _)| self.shared.directory.addr_is(self.id, addr));
        if !current {
            let addr = self.shared.directory.addr(self.id)?;
            let channel = self.transport.channel(&addr, &self.tls);
            self.direct = Some((addr, channel));
        }
        self.direct.as_ref().map(|(_, channel)| channel.clone())
    }

    /// Signals the thread and joins it (it finishes the call in progress first).
    pub(crate) fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            log::error!("a raft peer thread panicked");
        }
    }
}

struct Peer {
    id: NodeId,
    shared: Arc<Shared>,
    transport: Arc<Transport>,
    tls: Arc<rustls::ClientConfig>,
    inputs: Sender<Input>,
    queue: Receiver<Message>,
    /// Shared with the handle: decremented once a queued message is sent or dropped.
    queued: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    /// A snapshot notice taken from the queue while collecting a batch, sent next.
    stashed: Option<Message>,
    last_error_log: Option<Instant>,
    /// The last snapshot this peer received from us, and when: requests for it (or an
    /// older one) that the core repeats while the follower installs it are skipped.
    last_snapshot_sent: Option<(LogIndex, Instant)>,
}

/// Starts the replication thread for `peer`.
pub(crate) fn spawn(
    peer: NodeId,
    shared: Arc<Shared>,
    transport: Arc<Transport>,
    tls: Arc<rustls::ClientConfig>,
    inputs: Sender<Input>,
) -> std::io::Result<PeerHandle> {
    let (queue_tx, queue_rx) = crossbeam_channel::bounded(PEER_QUEUE_LEN_MAX);
    let stop = Arc::new(AtomicBool::new(false));
    let queued = Arc::new(AtomicUsize::new(0));
    let worker = Peer {
        id: peer,
        shared: shared.clone(),
        transport: transport.clone(),
        tls: tls.clone(),
        inputs: inputs.clone(),
        queue: queue_rx,
        queued: queued.clone(),
        stop: stop.clone(),
        stashed: None,
        last_error_log: None,
        last_snapshot_sent: None,
    };
    let thread = std::thread::Builder::new()
        .name(format!("raft-peer-{peer:x}"))
        .spawn(move || worker.run())?;
    Ok(PeerHandle {
        id: peer,
        queue: queue_tx,
        queued,
        held: Vec::new(),
        held_bytes: 0,
        last_reply_wanted: None,
        held_since: None,
        direct: None,
        shared,
        transport,
        tls,
        inputs,
        stop,
        thread: Some(thread),
    })
}

impl Peer {
    fn run(mut self) {
        while !self.stop.load(Ordering::Acquire) {
            let first = match self.stashed.take() {
                Some(message) => message,
                None => match self.queue.recv_timeout(IDLE_POLL) {
                    Ok(message) => message,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
            };
            if let MessageBody::Snapshot { .. } = first.body {
                self.send_snapshot(&first);
            } else {
                let batch = self.collect_batch(first);
                let sent = batch.len();
                self.send_batch(batch);
                // Only now may the raft thread's direct lane overtake: the batch is on
                // the connection (or dropped).
                self.queued.fetch_sub(sent, Ordering::AcqRel);
            }
        }
    }

    /// `first` plus whatever else is queued, up to the batch limits or the next snapshot
    /// request (kept for the next round).
    fn collect_batch(&mut self, first: Message) -> Vec<Message> {
        let mut bytes = first.payload_bytes();
        let mut batch = vec![first];
        while batch.len() < STEP_BATCH_MSGS_MAX && bytes < STEP_BATCH_BYTES_MAX {
            let Ok(next) = self.queue.try_recv() else {
                break;
            };
            if matches!(next.body, MessageBody::Snapshot { .. }) {
                self.stashed = Some(next);
                break;
            }
            bytes += next.payload_bytes();
            batch.push(next);
        }
        batch
    }

    fn addr(&mut self) -> Option<String> {
        let addr = self.shared.directory.addr(self.id);
        if addr.is_none() {
            self.log_error(format_args!("no address known; dropping messages"));
        }
        addr
    }

    fn log_error(&mut self, what: std::fmt::Arguments<'_>) {
        // One line per election timeout at most: a down peer must not flood the log.
        let quiet = self.shared.config.election_timeout();
        if self.last_error_log.is_none_or(|at| at.elapsed() >= quiet) {
            log::warn!("raft peer {:x}: {what}", self.id);
            self.last_error_log = Some(Instant::now());
        }
    }

    fn send_batch(&mut self, batch: Vec<Message>) {
        let Some(addr) = self.addr() else { return };
        let request = pb::StepRequest {
            from: self.shared.config.id,
            from_addr: self.shared.config.addr.clone(),
            messages: batch.iter().map(message_to_pb).collect(),
        };
        let options =
            CallOptions::timeout(Duration::from_millis(self.shared.config.step_timeout_ms));
        let channel = self.transport.channel(&addr, &self.tls);
        match channel.call(STEP, &request, options) {
            Ok(response) => on_step_response(self.id, &self.inputs, &response),
            Err(status) if is_revocation(&status) => on_revoked(self.id, &self.inputs, &status),
            Err(status) => self.log_error(format_args!("{addr}: {status}")),
        }
    }

    fn send_snapshot(&mut self, notice: &Message) {
        if let (MessageBody::Snapshot { meta }, Some((sent_index, at))) =
            (&notice.body, self.last_snapshot_sent)
            && meta.index <= sent_index
            && at.elapsed() < 2 * self.shared.config.election_timeout()
        {
            log::debug!(
                "raft peer {:x}: snapshot {sent_index} was just sent",
                self.id
            );
            return;
        }
        let Some(addr) = self.addr() else { return };
        let started = Instant::now();
        match self.stream_snapshot(&addr, notice) {
            Ok((index, bytes)) => {
                self.last_snapshot_sent = Some((index, Instant::now()));
                self.shared.peer_problems.lock().remove(&self.id);
                let secs = started.elapsed().as_secs_f64().max(1e-6);
                log::info!(
                    "raft peer {:x}: sent a snapshot of {bytes} bytes in {secs:.1} s ({:.0} MB/s)",
                    self.id,
                    bytes as f64 / secs / 1e6
                );
            }
            Err(reason) => {
                log::warn!(
                    "raft peer {:x}: snapshot transfer failed: {reason}",
                    self.id
                );
                self.shared
                    .peer_problems
                    .lock()
                    .insert(self.id, format!("snapshot transfer failing: {reason}"));
            }
        }
    }

    /// Streams the newest snapshot file; returns its index and the bytes sent.
    fn stream_snapshot(&self, addr: &str, notice: &Message) -> Result<(LogIndex, u64), String> {
        let info = self
            .shared
            .latest_snapshot
            .lock()
            .clone()
            .ok_or("no snapshot file exists yet")?;
        let mut reader = SnapshotReader::open(&info.path).map_err(|e| e.to_string())?;
        // Send the newest snapshot even if the core asked for an older one: any
        // committed snapshot lets the follower catch up, and newer is closer.
        let mut notice = notice.clone();
        notice.body = MessageBody::Snapshot {
            meta: info.meta.clone(),
        };
        log::info!(
            "raft peer {:x}: streaming snapshot {} ({} bytes) to {addr}",
            self.id,
            info.meta.index,
            info.content_bytes
        );
        let chunk_timeout = Duration::from_millis(self.shared.config.snapshot_chunk_timeout_ms);
        let channel = self.transport.channel(addr, &self.tls);
        let mut upload = channel
            .call_client_stream(INSTALL_SNAPSHOT, CallOptions::default())
            .map_err(|e| e.to_string())?;
        let mut first = true;
        let chunk_bytes = self.shared.config.snapshot_chunk_bytes;
        while let Some(chunk) = reader.next_chunk(chunk_bytes).map_err(|e| e.to_string())? {
            if self.stop.load(Ordering::Acquire) {
                upload.cancel();
                return Err("stopping".into());
            }
            let mut message = pb::SnapshotChunk {
                offset: chunk.offset,
                data: chunk.data,
                ..Default::default()
            };
            if first {
                message.notice = Some(message_to_pb(&notice));
                message.from_addr = self.shared.config.addr.clone();
                message.total_bytes = info.content_bytes;
                message.content_sha256 = info.content_sha256.to_vec().into();
                first = false;
            }
            upload
                .send_timeout(&message, chunk_timeout)
                .map_err(|e| e.to_string())?;
            if chunk.last {
                break;
            }
        }
        let response = upload
            .finish_timeout(SNAPSHOT_INSTALL_TIMEOUT)
            .map_err(|e| e.to_string())?;
        Ok((info.meta.index, response.received_bytes))
    }
}

/// A peer that says we were removed stops this member.
fn on_step_response(peer: NodeId, inputs: &Sender<Input>, response: &pb::StepResponse) {
    if response.removed {
        log::error!("raft peer {peer:x} says this member was removed from the cluster");
        let _ = inputs.try_send(Input::Removed);
    }
}

/// The reply to a direct `raft.Step` call, on the reactor thread: never blocks. A failure
/// only loses messages, which Raft retransmits; the peer thread reports lasting trouble
/// when it next dials.
fn on_step_reply(
    peer: NodeId,
    inputs: &Sender<Input>,
    reply: Result<bytes::Bytes, crate::wire::Status>,
) {
    match reply.map(<pb::StepResponse as prost::Message>::decode) {
        Ok(Ok(response)) => on_step_response(peer, inputs, &response),
        Ok(Err(error)) => log::warn!("raft peer {peer:x}: undecodable raft.Step reply: {error}"),
        Err(status) if is_revocation(&status) => on_revoked(peer, inputs, &status),
        Err(status) => log::debug!("raft peer {peer:x}: raft.Step: {status}"),
    }
}

/// Whether a peer refused us because our certificate is on the cluster's (committed)
/// revocation list, which means this member was removed.
fn is_revocation(status: &crate::wire::Status) -> bool {
    status.code == crate::wire::Code::PermissionDenied
        && status.reason == crate::ca::CERTIFICATE_REVOKED
}

fn on_revoked(peer: NodeId, inputs: &Sender<Input>, status: &crate::wire::Status) {
    log::error!("raft peer {peer:x}: {status}");
    let _ = inputs.try_send(Input::Removed);
}
