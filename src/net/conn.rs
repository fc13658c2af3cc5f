//! The part of a connection that other threads touch: its bounded send queue, and its
//! socket and TLS session behind a lock ([`ConnIo`]).
//!
//! A sender first tries to write its frame itself ("inline"): if the socket side is free
//! (`try_lock`, never a wait), the connection is up, nothing is queued or half-written
//! ahead of it and the frame is small, it encrypts the frame and writes it to the
//! nonblocking socket on its own thread. That spares the reactor a wake-up per frame,
//! which on a small host is most of a frame's cost. Otherwise it pushes an [`Outbound`]
//! item onto the queue and the reactor sends it when the socket can take more. The queue
//! is bounded in bytes: a sender that would overflow it blocks until the reactor drains
//! it or the sender's deadline passes. Tiny control items (cancel, credit) bypass the
//! bound so that giving up or granting credit never blocks.
//!
//! Order: frames from one thread leave in the order sent, since an inline write happens
//! only when the queue is empty and no frame is half-written, checked under the socket
//! lock that the reactor also holds while it moves queued frames into TLS. Lock order:
//! `io` before `out`, everywhere. Must never block on a socket (they are nonblocking) or
//! wait for the `io` lock on a sender's thread.

use std::cell::Cell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use crossbeam_channel::Sender;
use parking_lot::{Condvar, Mutex};

use super::socket::Socket;
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

/// Frames longer than this always go through the queue: a sender holds the socket lock
/// only for a short write, and big frames (snapshot chunks) gain nothing from skipping a
/// wake-up.
pub(crate) const INLINE_FRAME_BYTES_MAX: usize = 64 * 1024;

/// The socket side of a connection. The reactor holds it for each read turn and each
/// flush; a sender only ever `try_lock`s it, to write one frame inline.
pub(crate) struct ConnIo {
    pub(crate) socket: Socket,
    pub(crate) tls: rustls::Connection,
    /// The frame being handed to TLS and how much of it went already.
    pub(crate) writing: Option<(Bytes, usize)>,
    /// Routes of calls a sender opened inline; the reactor adopts them after each read
    /// from the socket and before routing what it read (a reply cannot precede its
    /// request, and the request was written after its route was put here).
    pub(crate) opened: Vec<(u64, Route)>,
    /// Streams a sender finished inline; the reactor forgets their routes.
    pub(crate) finished: Vec<u64>,
    /// Set by the reactor when the TLS handshake completed: inline writes may start.
    pub(crate) established: bool,
}

impl ConnIo {
    pub(crate) fn new(socket: Socket, tls: rustls::Connection) -> Self {
        Self {
            socket,
            tls,
            writing: None,
            opened: Vec::new(),
            finished: Vec::new(),
            established: false,
        }
    }

    /// Moves TLS records onto the socket until TLS is empty or the socket would block.
    /// Returns whether everything went.
    ///
    /// # Errors
    /// A socket error other than `WouldBlock`: the connection is broken.
    pub(crate) fn write_tls_out(&mut self) -> std::io::Result<bool> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.socket) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// The running average of how long calls on one connection waited for their first reply,
/// in µs (each new reply weighs 1/8); it starts at 0, so a new connection's callers poll.
#[derive(Debug, Default)]
pub(crate) struct ReplyWait {
    avg_us: AtomicU64,
}

impl ReplyWait {
    /// True if replies recently came fast enough
    /// ([`REPLY_FAST_AVG_US_MAX`](super::stream::REPLY_FAST_AVG_US_MAX)) that a caller
    /// should poll before sleeping.
    pub(crate) fn is_fast(&self) -> bool {
        self.avg_us.load(Ordering::Relaxed) < super::stream::REPLY_FAST_AVG_US_MAX
    }

    /// Folds one call's wait into the average. Racing updates may lose a sample; the
    /// average only steers polling.
    pub(crate) fn record(&self, waited: Duration) {
        let sample_us = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
        let old_us = self.avg_us.load(Ordering::Relaxed);
        let new_us = old_us - old_us / 8 + sample_us / 8;
        self.avg_us.store(new_us, Ordering::Relaxed);
    }
}

/// Wakes the reactor when a connection has something to send, and counts the frames
/// senders wrote without it.
pub(crate) struct ReactorWaker {
    pub(crate) waker: mio::Waker,
    /// Ids of connections with new items. A connection is listed at most once until the
    /// reactor has looked at it, so this holds at most one entry per connection.
    pub(crate) dirty: Sender<u64>,
    /// Frames written inline by their sender, over the transport's life.
    pub(crate) frames_written_inline: AtomicU64,
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

thread_local! {
    /// On the reactor thread, the connection whose turn is running (0: none; connection ids
    /// start at 1): the turn ends by flushing its queue (see [`ReactorTurn`]).
    static TURN_OF_CONNECTION: Cell<u64> = const { Cell::new(0) };
}

/// Marks the reactor's turn on one connection, from its read to its flush; ends on drop.
pub(crate) struct ReactorTurn;

impl ReactorTurn {
    /// The reactor starts the turn of connection `conn_id`, which it flushes at the end.
    pub(crate) fn start(conn_id: u64) -> ReactorTurn {
        debug_assert_ne!(conn_id, 0, "connection ids start at 1");
        TURN_OF_CONNECTION.with(|turn| turn.set(conn_id));
        ReactorTurn
    }
}

impl Drop for ReactorTurn {
    fn drop(&mut self) {
        TURN_OF_CONNECTION.with(|turn| turn.set(0));
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
    /// How long our calls on this connection waited for their first reply.
    pub(crate) reply_wait: ReplyWait,
    /// `None` once the reactor closed the connection (the socket is then dropped, even
    /// while channels and streams still hold this `ConnShared`).
    pub(crate) io: Mutex<Option<ConnIo>>,
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
        io: ConnIo,
    ) -> Self {
        Self {
            id,
            peer_addr,
            identity: OnceLock::new(),
            frame_bytes_max,
            send_buffer_bytes_max,
            next_stream_id: AtomicU64::new(if dialed { 1 } else { 2 }),
            reply_wait: ReplyWait::default(),
            io: Mutex::new(Some(io)),
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
        let item = match self.try_write_inline(item) {
            Ok(()) => return Ok(()),
            Err(item) => item,
        };
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
        let item = match self.try_write_inline(item) {
            Ok(()) => return Ok(()),
            Err(item) => item,
        };
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
        let item = match self.try_write_inline(item) {
            Ok(()) => return,
            Err(item) => item,
        };
        let len_bytes = item.len_bytes();
        let out = self.out.lock();
        if out.closed.is_none() {
            self.enqueue(out, item, len_bytes);
        }
    }

    /// Writes `item` on the calling thread if that keeps order and needs no waiting (see
    /// the module doc); gives it back otherwise, for the queue. A write the socket could
    /// not take whole, or that failed, is left to the reactor (TLS keeps what is unsent,
    /// and the reactor's own write meets the same error and closes the connection).
    fn try_write_inline(&self, item: Outbound) -> Result<(), Outbound> {
        if item.len_bytes() > INLINE_FRAME_BYTES_MAX {
            return Err(item);
        }
        let Some(mut guard) = self.io.try_lock() else {
            return Err(item);
        };
        let Some(io) = guard.as_mut() else {
            return Err(item);
        };
        if !io.established || io.writing.is_some() || io.tls.wants_write() {
            return Err(item);
        }
        {
            let out = self.out.lock();
            if out.closed.is_some() || !out.items.is_empty() {
                return Err(item);
            }
        }
        let frame = match item {
            Outbound::Open {
                stream_id,
                route,
                frame,
            } => {
                io.opened.push((stream_id, route));
                frame
            }
            Outbound::Frame(frame) => frame,
            Outbound::Finish { stream_id, frame } => {
                io.finished.push(stream_id);
                frame
            }
        };
        // rustls refuses plaintext only once closed: the reactor then closes and fails.
        let written = std::io::Write::write(&mut io.tls.writer(), &frame).unwrap_or_default();
        if written < frame.len() {
            io.writing = Some((frame, written));
        }
        let all_out = matches!(io.write_tls_out(), Ok(true)) && io.writing.is_none();
        drop(guard);
        self.waker
            .frames_written_inline
            .fetch_add(1, Ordering::Relaxed);
        if !all_out {
            self.notify_reactor();
        }
        Ok(())
    }

    /// Asks the reactor to look at this connection, once until it has.
    fn notify_reactor(&self) {
        let mut out = self.out.lock();
        let notify = !out.reactor_notified;
        out.reactor_notified = true;
        drop(out);
        if notify {
            self.waker.mark_dirty(self.id);
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
        // Queued by the reactor itself during this connection's turn (an inline handler's
        // reply): the turn ends with a flush, so waking the reactor would only make it poll
        // once more for nothing.
        if TURN_OF_CONNECTION.with(Cell::get) == self.id {
            return;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_poll_while_replies_come_fast_and_stop_once_they_are_slow() {
        let wait = ReplyWait::default();
        assert!(wait.is_fast(), "a new connection polls");
        // Replicated writes: a few slow replies and polling stops.
        for _ in 0..8 {
            wait.record(Duration::from_micros(400));
        }
        assert!(!wait.is_fast());
        // Fast replies measured asleep (the wake-up included) bring it back.
        for _ in 0..16 {
            wait.record(Duration::from_micros(80));
        }
        assert!(wait.is_fast());
        // A reply that took forever cannot overflow the average.
        wait.record(Duration::MAX);
        assert!(!wait.is_fast());
    }
}
