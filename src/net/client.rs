//! Making calls: a [`Channel`] to one peer address, and the three call shapes on it.
//!
//! A channel owns the dial state of its peer: idle, connecting, ready (one connection,
//! reused by every call), or failed with a retry time chosen by exponential backoff with
//! jitter. A call on a failed channel inside its backoff window fails fast with
//! `Unavailable` and the last failure's reason; the first call after the window dials again.
//! Must never touch a socket: dialing is done by the reactor.

use std::marker::PhantomData;
use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::Sender;
use parking_lot::{Condvar, Mutex};
use prost::Message;

use super::Command;
use super::conn::{ConnShared, Outbound, ReactorWaker, ReplyCallback, ReplyHook, Route, envelope};
use super::method::{ClientStreamMethod, ServerStreamMethod, UnaryMethod};
use super::socket::DialAddr;
use super::stream::{INBOUND_CAPACITY, Inbound, StreamCtl, StreamReader, StreamWriter};
use crate::ca::PeerIdentity;
use crate::proto::wire::FrameKind;
use crate::wire::{Reason, Status};

/// Per-call settings.
#[derive(Clone, Copy, Debug, Default)]
pub struct CallOptions {
    /// How long the caller waits for the whole call (connecting, sending, the reply or the
    /// last streamed message). `None` waits forever: use it only for long-lived streams.
    pub timeout: Option<Duration>,
}

impl CallOptions {
    /// Options with a deadline `timeout` from the start of the call.
    pub fn timeout(timeout: Duration) -> Self {
        Self {
            timeout: Some(timeout),
        }
    }
}

enum Phase {
    Idle,
    Connecting,
    Ready(Arc<ConnShared>),
    Failed { reason: Status, retry_at: Instant },
    Stopped,
}

struct DialState {
    phase: Phase,
    /// Increases with every dial; an outcome for an older attempt is stale and ignored.
    attempt: u64,
    consecutive_failures: u32,
}

/// Backoff between failed dials: `initial · 2^(failures−1)` capped at `max`, then scaled by
/// a random factor in [0.5, 1.0) so that many clients do not retry in lockstep.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Backoff {
    pub(crate) initial_ms: u64,
    pub(crate) max_ms: u64,
}

impl Backoff {
    pub(crate) fn delay(&self, consecutive_failures: u32) -> Duration {
        let exponent = consecutive_failures.saturating_sub(1).min(20);
        let base_ms = self
            .initial_ms
            .saturating_mul(1 << exponent)
            .min(self.max_ms);
        let factor: f64 = rand::random_range(0.5..1.0);
        Duration::from_millis((base_ms as f64 * factor) as u64)
    }
}

pub(crate) struct ChannelInner {
    target: String,
    pub(crate) tls: Arc<rustls::ClientConfig>,
    state: Mutex<DialState>,
    changed: Condvar,
    commands: Sender<Command>,
    waker: Arc<ReactorWaker>,
    backoff: Backoff,
}

impl ChannelInner {
    /// Reactor: the outcome of dial `attempt`.
    pub(crate) fn dial_finished(&self, attempt: u64, outcome: Result<Arc<ConnShared>, Status>) {
        let mut state = self.state.lock();
        if state.attempt != attempt || matches!(state.phase, Phase::Stopped) {
            return;
        }
        match outcome {
            Ok(conn) => {
                state.consecutive_failures = 0;
                state.phase = Phase::Ready(conn);
            }
            Err(reason) => {
                state.consecutive_failures += 1;
                let retry_at = Instant::now() + self.backoff.delay(state.consecutive_failures);
                state.phase = Phase::Failed { reason, retry_at };
            }
        }
        self.changed.notify_all();
    }

    /// Reactor: connection `conn_id` of this channel closed; the next call redials.
    pub(crate) fn connection_closed(&self, conn_id: u64) {
        let mut state = self.state.lock();
        if matches!(&state.phase, Phase::Ready(conn) if conn.id == conn_id) {
            state.phase = Phase::Idle;
        }
        self.changed.notify_all();
    }

    /// The transport stopped: every later call fails with `Unavailable`.
    pub(crate) fn stop(&self) {
        self.state.lock().phase = Phase::Stopped;
        self.changed.notify_all();
    }

    /// The connection, if one is up; never dials or waits.
    fn ready_connection(&self) -> Option<Arc<ConnShared>> {
        match &self.state.lock().phase {
            Phase::Ready(conn) if conn.close_reason().is_none() => Some(conn.clone()),
            _ => None,
        }
    }

    /// A ready connection, dialing if needed, waiting until `deadline`.
    fn connection(self: &Arc<Self>, deadline: Option<Instant>) -> Result<Arc<ConnShared>, Status> {
        let mut state = self.state.lock();
        let mut my_attempt = None;
        loop {
            let now = Instant::now();
            match &state.phase {
                Phase::Ready(conn) if conn.close_reason().is_none() => return Ok(conn.clone()),
                Phase::Stopped => return Err(Status::unavailable("the transport has stopped")),
                Phase::Connecting => {
                    let timed_out = match deadline {
                        Some(deadline) => self.changed.wait_until(&mut state, deadline).timed_out(),
                        None => {
                            self.changed.wait(&mut state);
                            false
                        }
                    };
                    if timed_out {
                        return Err(Status::deadline_exceeded(format!(
                            "still connecting to {} when the deadline passed",
                            self.target
                        )));
                    }
                }
                Phase::Failed { reason, retry_at } if now < *retry_at => {
                    if my_attempt == Some(state.attempt) {
                        return Err(reason.clone());
                    }
                    return Err(Status::unavailable(format!(
                        "{}; next connection attempt in {} ms",
                        reason.message,
                        retry_at.duration_since(now).as_millis()
                    )));
                }
                Phase::Idle | Phase::Ready(_) | Phase::Failed { .. } => {
                    state.attempt += 1;
                    state.phase = Phase::Connecting;
                    my_attempt = Some(state.attempt);
                    let attempt = state.attempt;
                    drop(state);
                    self.start_dial(attempt);
                    state = self.state.lock();
                }
            }
        }
    }

    fn start_dial(self: &Arc<Self>, attempt: u64) {
        let outcome = resolve(&self.target).and_then(|addr| {
            self.commands
                .send(Command::Dial {
                    channel: self.clone(),
                    attempt,
                    addr,
                })
                .map_err(|_| Status::unavailable("the transport has stopped"))
        });
        match outcome {
            Ok(()) => {
                if let Err(e) = self.waker.waker.wake() {
                    log::error!("cannot wake the network reactor: {e}");
                }
            }
            Err(status) => self.dial_finished(attempt, Err(status)),
        }
    }
}

fn resolve(target: &str) -> Result<DialAddr, Status> {
    if let Some(path) = target.strip_prefix("unix:") {
        return Ok(DialAddr::Unix(path.into()));
    }
    target
        .to_socket_addrs()
        .map_err(|e| Status::unavailable(format!("cannot resolve {target}: {e}")))?
        .next()
        .map(DialAddr::Tcp)
        .ok_or_else(|| Status::unavailable(format!("{target} resolves to no address")))
}

/// A peer, by address. Cheap to clone; every clone shares one connection.
#[derive(Clone)]
pub struct Channel {
    inner: Arc<ChannelInner>,
}

impl Channel {
    pub(crate) fn new(
        target: &str,
        tls: Arc<rustls::ClientConfig>,
        commands: Sender<Command>,
        waker: Arc<ReactorWaker>,
        backoff: Backoff,
    ) -> Self {
        Self {
            inner: Arc::new(ChannelInner {
                target: target.to_string(),
                tls,
                state: Mutex::new(DialState {
                    phase: Phase::Idle,
                    attempt: 0,
                    consecutive_failures: 0,
                }),
                changed: Condvar::new(),
                commands,
                waker,
                backoff,
            }),
        }
    }

    pub(crate) fn inner(&self) -> &Arc<ChannelInner> {
        &self.inner
    }

    /// The address this channel dials.
    pub fn target(&self) -> &str {
        &self.inner.target
    }

    /// The server's verified identity, once connected.
    pub fn peer_identity(&self) -> Option<PeerIdentity> {
        match &self.inner.state.lock().phase {
            Phase::Ready(conn) => conn.peer_identity(),
            _ => None,
        }
    }

    /// Opens a call: sends its REQUEST frame. A failure here means the request never left
    /// this process; its status carries [`Reason::NotSent`] so that a caller knows nothing
    /// was done.
    fn open(&self, method: &str, payload: Bytes, options: CallOptions) -> Result<Call, Status> {
        self.open_or_unsent(method, payload, options)
            .map_err(|status| status.with_reason(Reason::NotSent))
    }

    fn open_or_unsent(
        &self,
        method: &str,
        payload: Bytes,
        options: CallOptions,
    ) -> Result<Call, Status> {
        let deadline = options.timeout.map(|t| Instant::now() + t);
        let conn = self.inner.connection(deadline)?;
        let (stream_id, frame) = request_frame(&conn, method, payload, deadline)?;
        let (tx, rx) = crossbeam_channel::bounded(INBOUND_CAPACITY);
        let ctl = Arc::new(StreamCtl::new());
        let route = Route {
            inbound: Some(tx),
            ctl: ctl.clone(),
            on_reply: None,
        };
        let opened_at = Instant::now();
        conn.push(
            Outbound::Open {
                stream_id,
                route,
                frame,
            },
            deadline,
        )?;
        Ok(Call {
            writer: StreamWriter {
                conn,
                stream_id,
                ctl,
                deadline,
            },
            reader: StreamReader {
                rx,
                consumed_unreturned: 0,
                opened_at: Some(opened_at),
            },
            done: false,
        })
    }

    /// Calls `method` with `request` and waits for its single reply.
    ///
    /// # Errors
    /// The callee's status, `DeadlineExceeded`, or `Unavailable` if the peer cannot be
    /// reached or the connection breaks.
    pub fn unary<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        request: &Req,
        options: CallOptions,
    ) -> Result<Resp, Status> {
        let payload = self.unary_raw(method, Bytes::from(request.encode_to_vec()), options)?;
        decode_reply(payload)
    }

    /// Calls the declared unary `method` (a generated descriptor, so the request and reply
    /// types are the method's).
    ///
    /// # Errors
    /// As [`Channel::unary`].
    pub fn call<Req: Message, Resp: Message + Default>(
        &self,
        method: UnaryMethod<Req, Resp>,
        request: &Req,
        options: CallOptions,
    ) -> Result<Resp, Status> {
        self.unary(method.name(), request, options)
    }

    /// Calls the declared server-streaming `method`; read the replies from the returned
    /// stream.
    ///
    /// # Errors
    /// As [`Channel::unary`], for opening the stream.
    pub fn call_server_stream<Req: Message, Resp: Message + Default>(
        &self,
        method: ServerStreamMethod<Req, Resp>,
        request: &Req,
        options: CallOptions,
    ) -> Result<ResponseStream<Resp>, Status> {
        self.server_stream(method.name(), request, options)
    }

    /// Opens the declared client-streaming `method`; send messages, then `finish` for the
    /// reply.
    ///
    /// # Errors
    /// As [`Channel::unary`], for opening the stream.
    pub fn call_client_stream<Req: Message, Resp: Message + Default>(
        &self,
        method: ClientStreamMethod<Req, Resp>,
        options: CallOptions,
    ) -> Result<RequestStream<Req, Resp>, Status> {
        self.client_stream(method.name(), options)
    }

    /// [`Channel::unary`] on encoded bytes.
    ///
    /// # Errors
    /// As [`Channel::unary`].
    pub fn unary_raw(
        &self,
        method: &str,
        payload: Bytes,
        options: CallOptions,
    ) -> Result<Bytes, Status> {
        let mut call = self.open(method, payload, options)?;
        call.await_response()
    }

    /// Sends a unary call and returns at once: for threads that must never block on the
    /// network (the Raft thread). Only over a connection that is already up (it never
    /// dials: use [`Channel::unary`] for that) and only if the connection's send buffer
    /// has room. `on_reply` runs once on the reactor thread with the reply or the failure
    /// (connection lost, transport stopped); it must not block. Calls on one channel go out
    /// in the order they were made.
    ///
    /// # Errors
    /// `Unavailable` if no connection is up, `ResourceExhausted` if its send buffer is
    /// full; `on_reply` is then dropped without being run.
    pub fn unary_nowait(
        &self,
        method: &str,
        payload: Bytes,
        timeout: Duration,
        on_reply: ReplyCallback,
    ) -> Result<(), Status> {
        let conn = self.inner.ready_connection().ok_or_else(|| {
            Status::unavailable(format!("no connection to {} is up", self.inner.target))
        })?;
        let stream_id = conn.allocate_stream_id();
        let mut env = envelope(stream_id, FrameKind::Request);
        env.method = method.to_string();
        env.payload = payload;
        env.timeout_us = u64::try_from(timeout.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let frame = conn.encode(&env)?;
        let route = Route {
            inbound: None,
            ctl: Arc::new(StreamCtl::new()),
            on_reply: Some(ReplyHook(on_reply)),
        };
        conn.push_nowait(Outbound::Open {
            stream_id,
            route,
            frame,
        })
    }

    /// Sends a unary call and returns once it is sent, without waiting for the reply:
    /// `on_reply` runs once, on the reactor thread, with the reply or the failure
    /// (connection lost, transport stopped); it must not block. Unlike
    /// [`Channel::unary_nowait`] it dials when no connection is up, waiting for that (and
    /// for room in the send buffer) until the call's deadline; the reactor does not time the
    /// reply out: a caller that must answer by a deadline keeps its own timer.
    ///
    /// # Errors
    /// The call was not sent (its status carries [`Reason::NotSent`]); `on_reply` is then
    /// dropped without being run.
    pub fn unary_with(
        &self,
        method: &str,
        payload: Bytes,
        options: CallOptions,
        on_reply: ReplyCallback,
    ) -> Result<(), Status> {
        self.unary_with_or_unsent(method, payload, options, on_reply)
            .map_err(|status| status.with_reason(Reason::NotSent))
    }

    fn unary_with_or_unsent(
        &self,
        method: &str,
        payload: Bytes,
        options: CallOptions,
        on_reply: ReplyCallback,
    ) -> Result<(), Status> {
        let deadline = options.timeout.map(|t| Instant::now() + t);
        let conn = self.inner.connection(deadline)?;
        let (stream_id, frame) = request_frame(&conn, method, payload, deadline)?;
        let route = Route {
            inbound: None,
            ctl: Arc::new(StreamCtl::new()),
            on_reply: Some(ReplyHook(on_reply)),
        };
        conn.push(
            Outbound::Open {
                stream_id,
                route,
                frame,
            },
            deadline,
        )
    }

    /// Sends a one-way call: like [`Channel::unary_nowait`] (never dials, never blocks,
    /// calls on a channel go out in order), but the callee sends nothing back, not even an
    /// error; it must serve `method` inline (`Router::unary_inline`). For messages whose
    /// loss the caller tolerates (Raft's, which are retransmitted).
    ///
    /// # Errors
    /// `Unavailable` if no connection is up, `ResourceExhausted` if its send buffer is
    /// full.
    pub fn send_oneway(&self, method: &str, payload: Bytes) -> Result<(), Status> {
        let conn = self.inner.ready_connection().ok_or_else(|| {
            Status::unavailable(format!("no connection to {} is up", self.inner.target))
        })?;
        let mut env = envelope(conn.allocate_stream_id(), FrameKind::Request);
        env.method = method.to_string();
        env.payload = payload;
        env.oneway = true;
        let frame = conn.encode(&env)?;
        conn.push_nowait(Outbound::Frame(frame))
    }

    /// Calls a server-streaming `method`; read the replies from the returned stream.
    ///
    /// # Errors
    /// As [`Channel::unary`], for opening the stream.
    pub fn server_stream<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        request: &Req,
        options: CallOptions,
    ) -> Result<ResponseStream<Resp>, Status> {
        let call = self.open(method, Bytes::from(request.encode_to_vec()), options)?;
        Ok(ResponseStream {
            call,
            _message: PhantomData,
        })
    }

    /// Opens a client-streaming `method`; send messages, then `finish` for the reply.
    ///
    /// # Errors
    /// As [`Channel::unary`], for opening the stream.
    pub fn client_stream<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        options: CallOptions,
    ) -> Result<RequestStream<Req, Resp>, Status> {
        let call = self.open(method, Bytes::new(), options)?;
        Ok(RequestStream {
            call,
            _messages: PhantomData,
        })
    }
}

fn decode_reply<Resp: Message + Default>(payload: Bytes) -> Result<Resp, Status> {
    Resp::decode(payload).map_err(|e| Status::internal(format!("undecodable reply: {e}")))
}

/// One open call: our writer and reader on its stream. Dropping an unfinished call cancels
/// it, so the callee stops working for nobody.
struct Call {
    writer: StreamWriter,
    reader: StreamReader,
    done: bool,
}

/// A new stream on `conn` and its encoded REQUEST frame for `method`, carrying what is left
/// of `deadline` (at least 1 µs) so the callee can stop when the caller has given up.
fn request_frame(
    conn: &ConnShared,
    method: &str,
    payload: Bytes,
    deadline: Option<Instant>,
) -> Result<(u64, Bytes), Status> {
    let stream_id = conn.allocate_stream_id();
    let mut env = envelope(stream_id, FrameKind::Request);
    env.method = method.to_string();
    env.payload = payload;
    if let Some(deadline) = deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        env.timeout_us = u64::try_from(left.as_micros()).unwrap_or(u64::MAX).max(1);
    }
    Ok((stream_id, conn.encode(&env)?))
}

impl Call {
    fn await_response(&mut self) -> Result<Bytes, Status> {
        self.await_response_until(self.writer.deadline)
    }

    fn await_response_until(&mut self, deadline: Option<Instant>) -> Result<Bytes, Status> {
        let inbound = self.reader.recv_until(&self.writer, deadline)?;
        self.done = true;
        match inbound {
            Inbound::Response(payload) => Ok(payload),
            Inbound::Failed(status) => Err(status),
            Inbound::Message(_) | Inbound::End => Err(Status::internal(
                "peer answered a single-reply call with a stream",
            )),
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.done {
            self.writer.cancel("the caller abandoned the call");
        }
    }
}

/// The caller's side of a server-streaming call.
pub struct ResponseStream<T> {
    call: Call,
    _message: PhantomData<fn() -> T>,
}

impl<T: Message + Default> ResponseStream<T> {
    /// The next message, or `None` when the server ended the stream.
    ///
    /// # Errors
    /// The server's status, `DeadlineExceeded`, or the connection's close reason.
    pub fn recv(&mut self) -> Result<Option<T>, Status> {
        let deadline = self.call.writer.deadline;
        self.recv_until(deadline)
    }

    /// [`ResponseStream::recv`] waiting at most `wait` (and never past the call's own
    /// deadline): `Err(DeadlineExceeded)` when nothing came in time, and the stream stays
    /// open. For a long-lived stream whose reader must also check for other work.
    ///
    /// # Errors
    /// As [`ResponseStream::recv`].
    pub fn recv_timeout(&mut self, wait: Duration) -> Result<Option<T>, Status> {
        let mut deadline = Instant::now() + wait;
        if let Some(call_deadline) = self.call.writer.deadline {
            deadline = deadline.min(call_deadline);
        }
        self.recv_until(Some(deadline))
    }

    fn recv_until(&mut self, deadline: Option<Instant>) -> Result<Option<T>, Status> {
        if self.call.done {
            return Ok(None);
        }
        match self.call.reader.recv_until(&self.call.writer, deadline) {
            Ok(Inbound::Message(payload)) => decode_reply(payload).map(Some),
            Ok(Inbound::End) => {
                self.call.done = true;
                Ok(None)
            }
            Ok(Inbound::Failed(status)) => {
                self.call.done = true;
                Err(status)
            }
            Ok(Inbound::Response(_)) => {
                self.call.done = true;
                Err(Status::internal("peer sent a RESPONSE on a server stream"))
            }
            Err(status) => Err(status),
        }
    }

    /// Stops the stream: the server sees the cancellation.
    pub fn cancel(mut self) {
        self.call.done = true;
        self.call.writer.cancel("the caller cancelled the stream");
    }
}

/// The caller's side of a client-streaming call.
pub struct RequestStream<Req, Resp> {
    call: Call,
    _messages: PhantomData<fn(Req) -> Resp>,
}

impl<Req: Message, Resp: Message + Default> RequestStream<Req, Resp> {
    /// Sends one message, blocking while the server has granted no credit.
    ///
    /// # Errors
    /// The server's status if it already failed the call, `DeadlineExceeded`, or the
    /// connection's close reason.
    pub fn send(&mut self, message: &Req) -> Result<(), Status> {
        self.call
            .writer
            .send_message(Bytes::from(message.encode_to_vec()))
    }

    /// Sends one message, waiting at most `timeout` (and never past the call's deadline)
    /// for credit and buffer space. Snapshot streaming uses it: a per-chunk bound instead
    /// of one deadline over a transfer of unknown length.
    ///
    /// # Errors
    /// As [`RequestStream::send`]; `DeadlineExceeded` once `timeout` passes.
    pub fn send_timeout(&mut self, message: &Req, timeout: Duration) -> Result<(), Status> {
        let deadline = self.call.writer.deadline_within(timeout);
        self.call
            .writer
            .send_message_until(Bytes::from(message.encode_to_vec()), Some(deadline))
    }

    /// Ends the upload and waits for the server's reply.
    ///
    /// # Errors
    /// As [`Channel::unary`].
    pub fn finish(mut self) -> Result<Resp, Status> {
        self.send_end()?;
        let payload = self.call.await_response()?;
        decode_reply(payload)
    }

    /// [`RequestStream::finish`] waiting at most `timeout` for the reply.
    ///
    /// # Errors
    /// As [`Channel::unary`]; `DeadlineExceeded` once `timeout` passes.
    pub fn finish_timeout(mut self, timeout: Duration) -> Result<Resp, Status> {
        self.send_end()?;
        let deadline = self.call.writer.deadline_within(timeout);
        let payload = self.call.await_response_until(Some(deadline))?;
        decode_reply(payload)
    }

    fn send_end(&mut self) -> Result<(), Status> {
        let end = envelope(self.call.writer.stream_id, FrameKind::EndOfStream);
        let frame = self.call.writer.conn.encode(&end)?;
        self.call.writer.conn.push_control(Outbound::Frame(frame));
        Ok(())
    }

    /// Abandons the upload: the server sees the cancellation.
    pub fn cancel(mut self) {
        self.call.done = true;
        self.call.writer.cancel("the caller cancelled the upload");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_stops_at_the_cap() {
        let backoff = Backoff {
            initial_ms: 100,
            max_ms: 8_000,
        };
        for (failures, base_ms) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (7, 6_400),
            (8, 8_000),
            (60, 8_000),
        ] {
            let mut seen = Vec::new();
            for _ in 0..200 {
                let delay_ms = backoff.delay(failures).as_millis() as u64;
                assert!(
                    (base_ms / 2..base_ms).contains(&delay_ms),
                    "failure {failures}: {delay_ms} ms outside [{}, {base_ms})",
                    base_ms / 2
                );
                seen.push(delay_ms);
            }
            seen.sort_unstable();
            seen.dedup();
            assert!(
                seen.len() > 10,
                "no jitter after {failures} failures: {seen:?}"
            );
        }
    }
}
