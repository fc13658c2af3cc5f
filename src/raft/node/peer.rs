//! Replication threads (`raft-peer-<peer>`): one per peer, sending it the raft thread's
//! messages in batches over `raft.Step`, and snapshots chunk by chunk over
//! `raft.InstallSnapshot`.
//!
//! Owns the peer's outbound queue. Must never block the raft thread: the queue is bounded
//! and the raft thread drops messages when it is full (Raft retransmits), and must never
//! hold more than a few snapshot chunks in memory whatever the snapshot's size.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::codec::message_to_pb;
use super::{Input, Shared};
use crate::net::{CallOptions, Transport};
use crate::proto::raft as pb;
use crate::raft::core::{Message, MessageBody};
use crate::raft::storage::snapshot::SnapshotReader;
use crate::raft::types::{LogIndex, NodeId};

/// Messages queued for one peer before the raft thread drops new ones.
pub const PEER_QUEUE_LEN_MAX: usize = 1024;
/// Messages in one `raft.Step` call.
pub const STEP_BATCH_MSGS_MAX: usize = 512;
/// Entry payload bytes in one `raft.Step` call (well under the 4 MiB frame limit).
pub const STEP_BATCH_BYTES_MAX: u64 = 2 << 20;
/// How often an idle peer thread checks whether it should stop.
const IDLE_POLL: Duration = Duration::from_millis(200);
/// Longest wait for the follower to verify and install a received snapshot.
const SNAPSHOT_INSTALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Method names.
pub const STEP: &str = "raft.Step";
/// Client stream of snapshot chunks.
pub const INSTALL_SNAPSHOT: &str = "raft.InstallSnapshot";

/// The raft thread's handle on one peer thread.
pub(crate) struct PeerHandle {
    pub(crate) queue: Sender<Message>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PeerHandle {
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
    stop: Arc<AtomicBool>,
    pending: Option<Message>,
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
    let worker = Peer {
        id: peer,
        shared,
        transport,
        tls,
        inputs,
        queue: queue_rx,
        stop: stop.clone(),
        pending: None,
        last_error_log: None,
        last_snapshot_sent: None,
    };
    let thread = std::thread::Builder::new()
        .name(format!("raft-peer-{peer:x}"))
        .spawn(move || worker.run())?;
    Ok(PeerHandle {
        queue: queue_tx,
        stop,
        thread: Some(thread),
    })
}

impl Peer {
    fn run(mut self) {
        while !self.stop.load(Ordering::Acquire) {
            let first = match self.pending.take() {
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
                self.send_batch(batch);
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
                self.pending = Some(next);
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
        match channel.unary::<_, pb::StepResponse>(STEP, &request, options) {
            Ok(response) if response.removed => {
                log::error!(
                    "raft peer {:x} says this member was removed from the cluster",
                    self.id
                );
                let _ = self.inputs.try_send(Input::Removed);
            }
            Ok(_) => {}
            // Our certificate is on the cluster's (committed) revocation list: removed.
            Err(status)
                if status.code == crate::wire::Code::PermissionDenied
                    && status.message.contains(crate::ca::CERTIFICATE_REVOKED) =>
            {
                log::error!("raft peer {:x}: {status}", self.id);
                let _ = self.inputs.try_send(Input::Removed);
            }
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
            .client_stream::<pb::SnapshotChunk, pb::InstallSnapshotResponse>(
                INSTALL_SNAPSHOT,
                CallOptions::default(),
            )
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
