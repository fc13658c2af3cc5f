//! The part of a connection that other threads touch: its bounded send queue.
//!
//! Threads that send (callers, handlers) push [`Outbound`] items onto a connection's queue;
//! the reactor pops them when the socket can take more. The queue is bounded in bytes: a
//! sender that would overflow it blocks until the reactor drains it or the sender's deadline
//! passes. Tiny control items (cancel, credit) bypass the bound so that giving up or granting
//! credit never blocks. Must never perform IO: only the reactor touches sockets.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use crossbeam_channel::Sender;
use parking_lot::{Condvar, Mutex};

use super::stream::{Inbound, StreamCtl};
use crate::ca::PeerIdentity;
use crate::proto::wire::{Envelope, FrameKind};
use crate::wire::{Status, encode_frame};

/// How the reactor delivers a stream's inbound frames and controls its sender.
#[derive(Debug)]
pub(crate) struct Route {
    /// Where inbound messages go; `None` when none are expected (a unary server side).
    pub(crate) inbound: Option<Sender<Inbound>>,
    /// Credit and end state of our sending side.
    pub(crate) ctl: Arc<StreamCtl>,
    /// A call made with [`Channel::unary_nowait`](super::Channel::unary_nowait): the
    /// reactor runs it with the reply (or the failure) instead of delivering to `inbound`.
    pub(crate) on_reply: Option<ReplyHook>,
}

impl Route {
    /// Ends the stream with `reason`; a reply hook learns it.
    pub(crate) fn end(self, reason: Status) {
        self.ctl.end(reason.clone());
        if let Some(hook) = self.on_reply {
            (hook.0)(Err(reason));
        }
    }
}

/// Called once, on the reactor thread, with the outcome of a unary call: it must not block.
pub type ReplyCallback = Box<dyn FnOnce(Result<Bytes, Status>) + Send>;

/// A [`ReplyCallback`] held by a route.
pub(crate) struct ReplyHook(pub(crate) ReplyCallback);

impl std::fmt::Debug for ReplyHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplyHook")
    }
}

/// One item for the reactor to send.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// Opens a stream we call: register `route`, then send `frame` (the REQUEST).
    Open {
        stream_id: u64,
        route: Route,
        frame: Bytes,
    },
    /// A frame that leaves the stream open.
    Frame(Bytes),
    /// A frame that ends our side of the stream for good; the route is forgotten once sent.
    Finish { stream_id: u64, frame: Bytes },
}

impl Outbound {
    fn len_bytes(&self) -> usize {
        match self {
            Self::Open { frame, .. } | Self::Frame(frame) | Self::Finish { frame, .. } => {
                frame.len()
            }
        }
    }
}

/// Wakes the reactor when a connection has something to send.
pub(crate) struct ReactorWaker {
    pub(crate) waker: mio::Waker,
    /// Ids of connections with new items. A connection is listed at most once until the
    /// reactor has looked at it, so this holds at most one entry per connection.
    pub(crate) dirty: Sender<u64>,
}

impl ReactorWaker {
    pub(crate) fn mark_dirty(&self, conn_id: u64) {
        // A closed channel means the reactor has stopped; the item is failed elsewhere.
        if self.dirty.send(conn_id).is_ok()
            && let Err(e) = self.waker.wake()
        {
            log::error!("cannot wake the network reactor: {e}");
        }
    }
}

#[derive(Default)]
struct OutQueue {
    items: VecDeque<Outbound>,
    queued_bytes: usize,
    /// Set when the reactor has been told about this connection and has not yet emptied
    /// the queue; spares a wakeup per item under load.
    reactor_notified: bool,
    closed: Option<Status>,
}

/// A connection as seen by the threads that send on it.
pub(crate) struct ConnShared {
    pub(crate) id: u64,
    pub(crate) peer_addr: SocketAddr,
    /// The peer's verified identity, set once the TLS handshake completes (`None` inside if
    /// the peer presented no certificate).
    pub(crate) identity: OnceLock<Option<PeerIdentity>>,
    frame_bytes_max: usize,
    send_buffer_bytes_max: usize,
    next_stream_id: AtomicU64,
    out: Mutex<OutQueue>,
    space: Condvar,
    waker: Arc<ReactorWaker>,
}

impl ConnShared {
    /// `dialed` decides the stream-id parity: odd for the dialer, even for the acceptor.
    pub(crate) fn new(
        id: u64,
        peer_addr: SocketAddr,
        dialed: bool,
        frame_bytes_max: usize,
        send_buffer_bytes_max: usize,
        waker: Arc<ReactorWaker>,
    ) -> Self {
        Self {
            id,
            peer_addr,
            identity: OnceLock::new(),
            frame_bytes_max,
            send_buffer_bytes_max,
            next_stream_id: AtomicU64::new(if dialed { 1 } else { 2 }),
            out: Mutex::new(OutQueue::default()),
            space: Condvar::new(),
            waker,
        }
    }

    /// A fresh id for a stream this side opens. Ids are never reused on a connection, so a
    /// late frame for a finished stream can never be taken for a new one.
    pub(crate) fn allocate_stream_id(&self) -> u64 {
        self.next_stream_id.fetch_add(2, Ordering::Relaxed)
    }

    /// True if `stream_id` was opened by this side.
    pub(crate) fn is_local_stream(&self, stream_id: u64) -> bool {
        stream_id % 2 == self.next_stream_id.load(Ordering::Relaxed) % 2
    }

    /// The peer's verified identity (`None` before the handshake or without a certificate).
    pub(crate) fn peer_identity(&self) -> Option<PeerIdentity> {
        self.identity.get().cloned().flatten()
    }

    /// Encodes `envelope` into a frame within this connection's frame limit.
    pub(crate) fn encode(&self, envelope: &Envelope) -> Result<Bytes, Status> {
        encode_frame(envelope, self.frame_bytes_max)
            .map_err(|e| Status::invalid_argument(e.to_string()))
    }

    /// Queues `item`, blocking while the send buffer is full, until `deadline`.
    ///
    /// # Errors
    /// `DeadlineExceeded` if the buffer stayed full until the deadline; the connection's
    /// close reason if it closed.
    pub(crate) fn push(&self, item: Outbound, deadline: Option<Instant>) -> Result<(), Status> {
        let len_bytes = item.len_bytes();
        let mut out = self.out.lock();
        loop {
            if let Some(reason) = &out.closed {
                return Err(reason.clone());
            }
            // An empty queue admits any frame, so one frame larger than the buffer cannot
            // wait forever.
            if out.queued_bytes == 0 || out.queued_bytes + len_bytes <= self.send_buffer_bytes_max {
                break;
            }
            match deadline {
                Some(deadline) => {
                    if self.space.wait_until(&mut out, deadline).timed_out() {
                        return Err(Status::deadline_exceeded(format!(
                            "deadline passed with the send buffer to {} full: the peer is not \
                             reading fast enough",
                            self.peer_addr
                        )));
                    }
                }
                None => self.space.wait(&mut out),
            }
        }
        self.enqueue(out, item, len_bytes);
        Ok(())
    }

    /// Queues `item` if the send buffer has room (or is empty), never waiting: for replies
    /// sent from threads that must not block (the reactor itself, the Raft apply thread).
    ///
    /// # Errors
    /// The close reason, or `ResourceExhausted` when the peer is not reading its replies.
    pub(crate) fn push_nowait(&self, item: Outbound) -> Result<(), Status> {
        let len_bytes = item.len_bytes();
        let out = self.out.lock();
        if let Some(reason) = &out.closed {
            return Err(reason.clone());
        }
        if out.queued_bytes != 0 && out.queued_bytes + len_bytes > self.send_buffer_bytes_max {
            return Err(Status::resource_exhausted(format!(
                "the send buffer to {} is full: the peer is not reading its replies",
                self.peer_addr
            )));
        }
        self.enqueue(out, item, len_bytes);
        Ok(())
    }

    /// Queues a small control item without waiting for buffer space. Dropped silently if
    /// the connection already closed: there is nobody left to tell.
    pub(crate) fn push_control(&self, item: Outbound) {
        let len_bytes = item.len_bytes();
        let out = self.out.lock();
        if out.closed.is_none() {
            self.enqueue(out, item, len_bytes);
        }
    }

    fn enqueue(
        &self,
        mut out: parking_lot::MutexGuard<'_, OutQueue>,
        item: Outbound,
        len_bytes: usize,
    ) {
        out.queued_bytes += len_bytes;
        out.items.push_back(item);
        let notify = !out.reactor_notified;
        out.reactor_notified = true;
        drop(out);
        if notify {
            self.waker.mark_dirty(self.id);
        }
    }

    /// Reactor only: takes the next item, freeing its bytes for blocked senders. Returns
    /// `None` (and re-arms notification) when the queue is empty.
    pub(crate) fn pop(&self) -> Option<Outbound> {
        let mut out = self.out.lock();
        match out.items.pop_front() {
            Some(item) => {
                out.queued_bytes -= item.len_bytes();
                self.space.notify_all();
                Some(item)
            }
            None => {
                out.reactor_notified = false;
                None
            }
        }
    }

    /// Reactor only: marks the connection closed with `reason`, drops what was queued and
    /// wakes every blocked sender. Returns the dropped items so their routes can be failed.
    pub(crate) fn close(&self, reason: Status) -> Vec<Outbound> {
        let mut out = self.out.lock();
        if out.closed.is_none() {
            out.closed = Some(reason);
        }
        out.queued_bytes = 0;
        self.space.notify_all();
        out.items.drain(..).collect()
    }

    /// Why the connection closed, if it has.
    pub(crate) fn close_reason(&self) -> Option<Status> {
        self.out.lock().closed.clone()
    }
}

/// Builds an envelope of `kind` on `stream_id`.
pub(crate) fn envelope(stream_id: u64, kind: FrameKind) -> Envelope {
    Envelope {
        stream_id,
        kind: kind as i32,
        ..Default::default()
    }
}
