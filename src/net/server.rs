//! Serving calls: the method table ([`Router`]) with its role allow-lists, the thread pools
//! that run handlers ([`ServicePool`]), and what a handler sees ([`CallContext`],
//! [`ServerStream`], [`ClientStream`]).
//!
//! Methods declared in `proto/` are registered by their generated descriptor
//! (`Router::serve_*`), which brings the method's shape, request and reply types and its
//! policy ([`Allow`] list included); the router keeps them in a table indexed like
//! [`crate::proto::METHODS`], found by the generated name lookup. Methods not declared there
//! (tests, benchmarks) are registered by name with an explicit [`Allow`]; a declared name
//! cannot be registered that way.
//!
//! The reactor looks a REQUEST's method up in the router, checks the caller's role, and
//! hands the call to the method's pool over a bounded channel; if the pool's queue is full
//! the call fails at once with `ResourceExhausted` (the reactor never blocks). Handlers run
//! on pool threads and must never touch sockets.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use prost::Message;

use super::conn::{ConnShared, Route, envelope};
use super::method::{ClientStreamMethod, Method, Policy, ServerStreamMethod, Shape, UnaryMethod};
use super::stream::{INBOUND_CAPACITY, Inbound, StreamCtl, StreamReader, StreamWriter};
use crate::ca::{PeerIdentity, Role};
use crate::proto::wire::{Envelope, FrameKind};
use crate::wire::{Code, Status};

/// Which callers may use a method. Checked by the transport before the handler runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allow {
    managers: bool,
    workers: bool,
    admins: bool,
    anonymous: bool,
}

impl Allow {
    /// Managers only (Raft, kv, forwarding with another caller's identity, a manager's
    /// report about itself).
    pub const MANAGERS: Self = Self {
        managers: true,
        workers: false,
        admins: false,
        anonymous: false,
    };
    /// Operators: managers and holders of an admin certificate (the control API).
    pub const OPERATORS: Self = Self {
        managers: true,
        workers: false,
        admins: true,
        anonymous: false,
    };
    /// Any node with a cluster certificate (dispatcher sessions, certificate renewal); not
    /// admin certificates, which are not nodes.
    pub const NODES: Self = Self {
        managers: true,
        workers: true,
        admins: false,
        anonymous: false,
    };
    /// Anyone, even without a certificate: only the CA bootstrap methods (fetch the root
    /// certificate, exchange a join token for a node certificate).
    pub const ANYONE: Self = Self {
        managers: true,
        workers: true,
        admins: true,
        anonymous: true,
    };

    /// Whether a caller with certificate role `role` (`None`: no certificate) is on the
    /// list.
    pub const fn admits(&self, role: Option<Role>) -> bool {
        match role {
            None => self.anonymous,
            Some(Role::Manager) => self.managers,
            Some(Role::Worker) => self.workers,
            Some(Role::Admin) => self.admins,
        }
    }

    /// Decides whether a caller with `identity` may call `method`.
    ///
    /// # Errors
    /// `Unauthenticated` without a certificate where one is needed, `PermissionDenied` for a
    /// role not on the list.
    pub fn check(&self, method: &str, identity: Option<&PeerIdentity>) -> Result<(), Status> {
        let allowed = self.admits(identity.map(|id| id.role));
        match (allowed, identity) {
            (true, _) => Ok(()),
            (false, None) => Err(Status::new(
                crate::wire::Code::Unauthenticated,
                format!(
                    "{method} needs a cluster certificate; join the cluster first \
                     (flotilla join --token ...)"
                ),
            )),
            (false, Some(id)) => Err(Status::permission_denied(format!(
                "{method} may not be called by node {} with role {:?}",
                id.node_id, id.role
            ))),
        }
    }
}

/// What a handler knows about the call it serves.
pub struct CallContext {
    peer: Option<PeerIdentity>,
    peer_addr: SocketAddr,
    method: String,
    deadline: Option<Instant>,
    ctl: Arc<StreamCtl>,
}

impl CallContext {
    /// The caller's verified identity; `None` only for anonymous (bootstrap) calls.
    pub fn peer(&self) -> Option<&PeerIdentity> {
        self.peer.as_ref()
    }

    /// The caller's network address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// The method called.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// When the caller stops waiting, if it said.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// True once the caller cancelled, the deadline passed or the connection closed: stop
    /// working, nobody will read the answer.
    pub fn is_cancelled(&self) -> bool {
        self.cancellation().is_some()
    }

    /// Why the call should stop, if it should: the caller's cancellation or the closed
    /// connection, else `DeadlineExceeded` once the deadline passed. Return it as the
    /// handler's error so the caller learns the real reason.
    pub fn cancellation(&self) -> Option<Status> {
        self.ctl.ended().or_else(|| {
            self.deadline
                .is_some_and(|d| Instant::now() >= d)
                .then(|| Status::deadline_exceeded("the call's deadline passed"))
        })
    }
}

/// The handler's side of a server-streaming call: send messages, then finish or fail.
///
/// It may outlive the handler function: move it to another thread to keep pushing (the
/// dispatcher does this for sessions). The stream ends with END_OF_STREAM when the last
/// handle is dropped without [`ServerStream::fail`].
pub struct ServerStream<T> {
    sink: Arc<StreamSink>,
    _message: PhantomData<fn(T)>,
}

struct StreamSink {
    writer: StreamWriter,
    finished: AtomicBool,
}

impl StreamSink {
    fn fail(&self, status: &Status) {
        if !self.finished.swap(true, Ordering::AcqRel) {
            self.writer.fail(status);
        }
    }
}

impl Drop for StreamSink {
    fn drop(&mut self) {
        if !self.finished.swap(true, Ordering::AcqRel) {
            let env = envelope(self.writer.stream_id, FrameKind::EndOfStream);
            let _ = self.writer.finish(env);
        }
    }
}

impl<T: Message> ServerStream<T> {
    /// Sends one message, blocking while the caller has no flow-control credit or the
    /// connection's send buffer is full.
    ///
    /// # Errors
    /// `Cancelled` if the caller gave up, `DeadlineExceeded`, or the connection's close
    /// reason.
    pub fn send(&self, message: &T) -> Result<(), Status> {
        self.sink
            .writer
            .send_message(Bytes::from(message.encode_to_vec()))
    }

    /// Sends one message if the caller has flow-control credit left and the connection's
    /// send buffer has room, never blocking: `Ok(false)` when not (nothing was sent; try
    /// again later). For senders that serve many streams from one thread.
    ///
    /// # Errors
    /// `Cancelled` if the caller gave up, or the connection's close reason.
    pub fn try_send(&self, message: &T) -> Result<bool, Status> {
        self.sink
            .writer
            .try_send_message(Bytes::from(message.encode_to_vec()))
    }

    /// Ends the stream normally.
    pub fn finish(self) {
        drop(self);
    }

    /// Ends the stream with an error the caller will see.
    pub fn fail(self, status: Status) {
        self.sink.fail(&status);
    }

    /// True once the caller cancelled or the connection closed.
    pub fn is_cancelled(&self) -> bool {
        self.sink.writer.ctl.ended().is_some()
    }
}

/// The handler's side of a client-streaming call: the messages the caller uploads.
pub struct ClientStream<T> {
    reader: StreamReader,
    writer: StreamWriter,
    ended: bool,
    _message: PhantomData<fn() -> T>,
}

impl<T: Message + Default> ClientStream<T> {
    /// The next uploaded message, or `None` once the caller finished its upload.
    ///
    /// # Errors
    /// `Cancelled` if the caller gave up, `DeadlineExceeded`, `InvalidArgument` for a message
    /// that does not decode, or the connection's close reason.
    pub fn recv(&mut self) -> Result<Option<T>, Status> {
        self.recv_until(self.writer.deadline)
    }

    /// [`ClientStream::recv`] waiting at most `timeout` (never past the call's deadline):
    /// a per-message bound for uploads of unknown length, such as snapshots.
    ///
    /// # Errors
    /// As [`ClientStream::recv`]; `DeadlineExceeded` once `timeout` passes.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<T>, Status> {
        let deadline = self.writer.deadline_within(timeout);
        self.recv_until(Some(deadline))
    }

    fn recv_until(&mut self, deadline: Option<Instant>) -> Result<Option<T>, Status> {
        if self.ended {
            return Ok(None);
        }
        match self.reader.recv_until(&self.writer, deadline)? {
            Inbound::Message(payload) => T::decode(payload)
                .map(Some)
                .map_err(|e| Status::invalid_argument(format!("undecodable message: {e}"))),
            Inbound::End => {
                self.ended = true;
                Ok(None)
            }
            Inbound::Failed(status) => Err(status),
            Inbound::Response(_) => Err(Status::internal(
                "caller sent a RESPONSE frame on a client-streaming call",
            )),
        }
    }
}

/// The handler's side of a unary call answered later, from any thread: the Raft layer
/// answers a proposal once it commits, without holding a pool thread meanwhile.
///
/// Dropping it unanswered fails the call with `Unavailable`, so a caller never waits for
/// an answer nobody will send.
pub struct Responder<T> {
    writer: Option<StreamWriter>,
    _message: PhantomData<fn(T)>,
}

impl<T: Message> Responder<T> {
    /// Sends the reply (or the error) to the caller. Never blocks: the Raft apply thread
    /// answers through it, and a caller that stops reading its replies must not stall it
    /// (its reply is replaced by `ResourceExhausted`).
    pub fn respond(mut self, result: Result<T, Status>) {
        if let Some(writer) = self.writer.take() {
            let result = result.map(|resp| Bytes::from(resp.encode_to_vec()));
            reply_with(&writer, result, Wait::Never);
        }
    }

    /// True once the caller cancelled, its deadline passed or the connection closed.
    pub fn is_cancelled(&self) -> bool {
        self.writer.as_ref().is_none_or(|w| {
            w.ctl.ended().is_some() || w.deadline.is_some_and(|d| Instant::now() >= d)
        })
    }
}

impl<T> Drop for Responder<T> {
    fn drop(&mut self) {
        if let Some(writer) = self.writer.take() {
            writer.fail(&Status::unavailable(
                "the server dropped the call without answering (it is shutting down?); retry",
            ));
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

type UnaryFn = dyn Fn(&CallContext, Bytes) -> Result<Bytes, Status> + Send + Sync;
type DeferredFn =
    dyn Fn(&CallContext, Bytes, StreamWriter) -> Result<(), (Status, StreamWriter)> + Send + Sync;
type ServerStreamFn =
    dyn Fn(&CallContext, Bytes, Arc<StreamSink>) -> Result<(), Status> + Send + Sync;
type ClientStreamFn =
    dyn Fn(&CallContext, StreamReader, &StreamWriter) -> Result<Bytes, Status> + Send + Sync;

enum Handler {
    Unary(Arc<UnaryFn>),
    Deferred(Arc<DeferredFn>),
    ServerStream(Arc<ServerStreamFn>),
    ClientStream(Arc<ClientStreamFn>),
}

struct MethodEntry {
    method: Method,
    handler: Handler,
    /// `None`: the handler runs on the reactor thread (see [`Router::unary_inline`]).
    jobs: Option<Sender<Job>>,
}

/// A second check after a method's allow-list, for callers with a certificate: may this
/// identity still call `method` (say, its certificate was revoked)? Runs on the reactor
/// thread for every call, so it must answer from memory, at once, without blocking.
pub type Authorizer = Arc<dyn Fn(&Method, &PeerIdentity) -> Result<(), Status> + Send + Sync>;

/// The methods a listener serves, each with its policy and the pool that runs it.
#[derive(Default)]
pub struct Router {
    /// Declared methods, indexed like [`crate::proto::METHODS`].
    declared: Vec<Option<MethodEntry>>,
    /// Methods not declared in `proto/`, by name.
    undeclared: HashMap<String, MethodEntry>,
    authorizer: Option<Authorizer>,
}

fn decode_request<Req: Message + Default>(payload: Bytes) -> Result<Req, Status> {
    Req::decode(payload).map_err(|e| Status::invalid_argument(format!("undecodable request: {e}")))
}

impl Router {
    /// An empty router: every method is `Unimplemented`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the [`Authorizer`] every call with a certificate must also pass.
    pub fn set_authorizer(&mut self, authorizer: Authorizer) {
        self.authorizer = Some(authorizer);
    }

    fn insert(&mut self, method: Method, pool: &ServicePool, handler: Handler) {
        self.insert_entry(method, Some(pool.jobs.clone()), handler);
    }

    fn insert_entry(&mut self, method: Method, jobs: Option<Sender<Job>>, handler: Handler) {
        assert!(
            !method.policy.internal,
            "{} is internal: it runs only on the leader, never served to a caller",
            method.name
        );
        let name = method.name;
        let entry = MethodEntry {
            method,
            handler,
            jobs,
        };
        let previous = match crate::proto::method_index(name) {
            Some(index) => {
                assert_eq!(
                    crate::proto::METHODS[index],
                    method,
                    "{name} is declared in proto/: serve it by its descriptor (Router::serve_*)"
                );
                if self.declared.len() <= index {
                    self.declared.resize_with(index + 1, || None);
                }
                self.declared[index].replace(entry)
            }
            None => self.undeclared.insert(name.to_string(), entry),
        };
        assert!(previous.is_none(), "method {name} registered twice");
    }

    /// An undeclared method (tests, benchmarks): `allow`, nothing else granted.
    fn undeclared(name: &'static str, allow: Allow, shape: Shape) -> Method {
        Method {
            name,
            shape,
            policy: Policy::undeclared(allow),
        }
    }

    /// Serves the declared unary `method` on `pool`.
    pub fn serve_unary<Req, Resp>(
        &mut self,
        method: UnaryMethod<Req, Resp>,
        pool: &ServicePool,
        handler: impl Fn(&CallContext, Req) -> Result<Resp, Status> + Send + Sync + 'static,
    ) where
        Req: Message + Default,
        Resp: Message,
    {
        self.insert(method.method(), pool, unary_handler(handler));
    }

    /// Serves the declared unary `method` on the reactor thread (see
    /// [`Router::unary_inline`] for what such a handler may do).
    pub fn serve_unary_inline<Req, Resp>(
        &mut self,
        method: UnaryMethod<Req, Resp>,
        handler: impl Fn(&CallContext, Req) -> Result<Resp, Status> + Send + Sync + 'static,
    ) where
        Req: Message + Default,
        Resp: Message,
    {
        self.insert_entry(method.method(), None, unary_handler(handler));
    }

    /// Serves the declared unary `method` on `pool`, answered through a [`Responder`] (see
    /// [`Router::unary_deferred`]).
    pub fn serve_unary_deferred<Req, Resp>(
        &mut self,
        method: UnaryMethod<Req, Resp>,
        pool: &ServicePool,
        handler: impl Fn(&CallContext, Req, Responder<Resp>) + Send + Sync + 'static,
    ) where
        Req: Message + Default,
        Resp: Message,
    {
        let handler = Handler::Deferred(Arc::new(deferred(handler)));
        self.insert(method.method(), pool, handler);
    }

    /// Serves the declared unary `method` on the reactor thread, answered through a
    /// [`Responder`] (see [`Router::unary_deferred_inline`]).
    pub fn serve_unary_deferred_inline<Req, Resp>(
        &mut self,
        method: UnaryMethod<Req, Resp>,
        handler: impl Fn(&CallContext, Req, Responder<Resp>) + Send + Sync + 'static,
    ) where
        Req: Message + Default,
        Resp: Message,
    {
        let handler = Handler::Deferred(Arc::new(deferred(handler)));
        self.insert_entry(method.method(), None, handler);
    }

    /// Serves the declared server-streaming `method` on `pool` (see
    /// [`Router::server_stream`]).
    pub fn serve_server_stream<Req, Resp>(
        &mut self,
        method: ServerStreamMethod<Req, Resp>,
        pool: &ServicePool,
        handler: impl Fn(&CallContext, Req, ServerStream<Resp>) -> Result<(), Status>
        + Send
        + Sync
        + 'static,
    ) where
        Req: Message + Default,
        Resp: Message,
    {
        self.insert(method.method(), pool, server_stream_handler(handler));
    }

    /// Serves the declared client-streaming `method` on `pool`.
    pub fn serve_client_stream<Req, Resp>(
        &mut self,
        method: ClientStreamMethod<Req, Resp>,
        pool: &ServicePool,
        handler: impl Fn(&CallContext, &mut ClientStream<Req>) -> Result<Resp, Status>
        + Send
        + Sync
        + 'static,
    ) where
        Req: Message + Default,
        Resp: Message,
    {
        self.insert(method.method(), pool, client_stream_handler(handler));
    }

    /// Serves the undeclared `method` as a unary call whose handler runs on the reactor
    /// thread itself: no queue, no thread hop. Only for handlers that never block and finish
    /// in microseconds (hand the request to another thread's bounded queue with `try_send`,
    /// answer at once). The reply never waits for buffer space; if it does not fit, the call
    /// fails with `ResourceExhausted`.
    pub fn unary_inline<Req, Resp>(
        &mut self,
        method: &'static str,
        allow: Allow,
        handler: impl Fn(&CallContext, Req) -> Result<Resp, Status> + Send + Sync + 'static,
    ) where
        Req: Message + Default,
        Resp: Message,
    {
        let method = Self::undeclared(method, allow, Shape::Unary);
        self.insert_entry(method, None, unary_handler(handler));
    }

    /// [`Router::unary_deferred`] whose handler runs on the reactor thread (see
    /// [`Router::unary_inline`] for what such a handler may do).
    pub fn unary_deferred_inline<Req, Resp>(
        &mut self,
        method: &'static str,
        allow: Allow,
        handler: impl Fn(&CallContext, Req, Responder<Resp>) + Send + Sync + 'static,
    ) where
        Req: Message + Default,
        Resp: Message,
    {
        let method = Self::undeclared(method, allow, Shape::Unary);
        self.insert_entry(method, None, Handler::Deferred(Arc::new(deferred(handler))));
    }

    /// Serves the undeclared `method` as a unary call on `pool`.
    pub fn unary<Req, Resp>(
        &mut self,
        method: &'static str,
        allow: Allow,
        pool: &ServicePool,
        handler: impl Fn(&CallContext, Req) -> Result<Resp, Status> + Send + Sync + 'static,
    ) where
        Req: Message + Default,
        Resp: Message,
    {
        let method = Self::undeclared(method, allow, Shape::Unary);
        self.insert(method, pool, unary_handler(handler));
    }

    /// Serves the undeclared `method` as a unary call whose handler answers through a
    /// [`Responder`], possibly later and from another thread. The handler runs on `pool`; it
    /// should only hand the request and responder on (to the Raft thread, say) and return.
    pub fn unary_deferred<Req, Resp>(
        &mut self,
        method: &'static str,
        allow: Allow,
        pool: &ServicePool,
        handler: impl Fn(&CallContext, Req, Responder<Resp>) + Send + Sync + 'static,
    ) where
        Req: Message + Default,
        Resp: Message,
    {
        let method = Self::undeclared(method, allow, Shape::Unary);
        self.insert(method, pool, Handler::Deferred(Arc::new(deferred(handler))));
    }

    /// Serves the undeclared `method` as a server-streaming call on `pool`. The handler may
    /// return while keeping the stream (moved elsewhere); returning an error fails the
    /// stream.
    pub fn server_stream<Req, Resp>(
        &mut self,
        method: &'static str,
        allow: Allow,
        pool: &ServicePool,
        handler: impl Fn(&CallContext, Req, ServerStream<Resp>) -> Result<(), Status>
        + Send
        + Sync
        + 'static,
    ) where
        Req: Message + Default,
        Resp: Message,
    {
        let method = Self::undeclared(method, allow, Shape::ServerStream);
        self.insert(method, pool, server_stream_handler(handler));
    }

    /// Serves the undeclared `method` as a client-streaming call on `pool`.
    pub fn client_stream<Req, Resp>(
        &mut self,
        method: &'static str,
        allow: Allow,
        pool: &ServicePool,
        handler: impl Fn(&CallContext, &mut ClientStream<Req>) -> Result<Resp, Status>
        + Send
        + Sync
        + 'static,
    ) where
        Req: Message + Default,
        Resp: Message,
    {
        let method = Self::undeclared(method, allow, Shape::ClientStream);
        self.insert(method, pool, client_stream_handler(handler));
    }

    /// Reactor only: admits a REQUEST. On success returns the route to register for the
    /// new stream; the call is queued on its pool. On failure returns the status to send
    /// back as ERROR.
    /// A one-way request: an inline unary handler runs now and its outcome goes nowhere
    /// (a failure is logged). Nothing is routed: `Ok` carries a route that is already over.
    fn dispatch_oneway(
        &self,
        entry: &MethodEntry,
        conn: &Arc<ConnShared>,
        request: Envelope,
        peer: Option<crate::ca::PeerIdentity>,
        ctl: Arc<StreamCtl>,
    ) -> Result<Route, Status> {
        let (None, Handler::Unary(f)) = (&entry.jobs, &entry.handler) else {
            return Err(Status::invalid_argument(format!(
                "{} cannot be called one-way: only inline unary methods can",
                request.method
            )));
        };
        let ctx = CallContext {
            peer,
            peer_addr: conn.peer_addr,
            method: request.method,
            deadline: None,
            ctl: ctl.clone(),
        };
        if let Err(status) = f(&ctx, request.payload) {
            log::debug!(
                "one-way {} from {} failed: {status}",
                ctx.method,
                conn.peer_addr
            );
        }
        ctl.end(Status::cancelled("a one-way call is over once handled"));
        Ok(Route {
            inbound: None,
            ctl,
            on_reply: None,
        })
    }

    /// The entry serving `name`: declared methods through the generated lookup (a match
    /// on the name), others by hash.
    fn entry(&self, name: &str) -> Option<&MethodEntry> {
        match crate::proto::method_index(name) {
            Some(index) => self.declared.get(index).and_then(Option::as_ref),
            None => self.undeclared.get(name),
        }
    }

    pub(crate) fn dispatch(
        &self,
        conn: &Arc<ConnShared>,
        request: Envelope,
        now: Instant,
    ) -> Result<Route, Status> {
        let Some(entry) = self.entry(&request.method) else {
            return Err(Status::new(
                crate::wire::Code::Unimplemented,
                format!("method {:?} is not served here", request.method),
            ));
        };
        let identity = conn.peer_identity();
        let method = &entry.method;
        method.policy.allow.check(method.name, identity.as_ref())?;
        if let (Some(authorize), Some(caller)) = (&self.authorizer, identity.as_ref()) {
            authorize(method, caller)?;
        }
        let ctl = Arc::new(StreamCtl::new());
        if request.oneway {
            return self.dispatch_oneway(entry, conn, request, identity, ctl);
        }
        let deadline =
            (request.timeout_us > 0).then(|| now + Duration::from_micros(request.timeout_us));
        let ctx = CallContext {
            peer: identity,
            peer_addr: conn.peer_addr,
            method: request.method.clone(),
            deadline,
            ctl: ctl.clone(),
        };
        let writer = StreamWriter {
            conn: conn.clone(),
            stream_id: request.stream_id,
            ctl: ctl.clone(),
            deadline,
        };
        let Some(jobs) = &entry.jobs else {
            // Inline: run it now, on the reactor thread.
            let (inbound, job) =
                build_job(&entry.handler, ctx, writer, request.payload, Wait::Never);
            job();
            return Ok(Route {
                inbound,
                ctl,
                on_reply: None,
            });
        };
        let (inbound, job) =
            build_job(&entry.handler, ctx, writer, request.payload, Wait::ForSpace);
        match jobs.try_send(job) {
            Ok(()) => Ok(Route {
                inbound,
                ctl,
                on_reply: None,
            }),
            // Nothing ran: the same call may pass once the queue drains.
            Err(TrySendError::Full(_)) => Err(Status::retry_soon(
                Code::ResourceExhausted,
                format!(
                    "the server is busy ({} calls are queued up to their limit); retry in a \
                     moment",
                    request.method
                ),
            )),
            Err(TrySendError::Disconnected(_)) => Err(Status::unavailable(format!(
                "{} is shutting down",
                request.method
            ))),
        }
    }
}

/// A typed unary handler as the router stores it: decode the request, encode the reply.
fn unary_handler<Req, Resp>(
    handler: impl Fn(&CallContext, Req) -> Result<Resp, Status> + Send + Sync + 'static,
) -> Handler
where
    Req: Message + Default,
    Resp: Message,
{
    Handler::Unary(Arc::new(move |ctx: &CallContext, payload: Bytes| {
        let request = decode_request::<Req>(payload)?;
        handler(ctx, request).map(|resp| Bytes::from(resp.encode_to_vec()))
    }))
}

/// A typed server-streaming handler as the router stores it.
fn server_stream_handler<Req, Resp>(
    handler: impl Fn(&CallContext, Req, ServerStream<Resp>) -> Result<(), Status>
    + Send
    + Sync
    + 'static,
) -> Handler
where
    Req: Message + Default,
    Resp: Message,
{
    let raw = move |ctx: &CallContext, payload: Bytes, sink: Arc<StreamSink>| {
        let request = decode_request::<Req>(payload)?;
        let stream = ServerStream {
            sink,
            _message: PhantomData,
        };
        handler(ctx, request, stream)
    };
    Handler::ServerStream(Arc::new(raw))
}

/// A typed client-streaming handler as the router stores it.
fn client_stream_handler<Req, Resp>(
    handler: impl Fn(&CallContext, &mut ClientStream<Req>) -> Result<Resp, Status>
    + Send
    + Sync
    + 'static,
) -> Handler
where
    Req: Message + Default,
    Resp: Message,
{
    let raw = move |ctx: &CallContext, reader: StreamReader, writer: &StreamWriter| {
        let mut stream = ClientStream {
            reader,
            writer: StreamWriter {
                conn: writer.conn.clone(),
                stream_id: writer.stream_id,
                ctl: writer.ctl.clone(),
                deadline: writer.deadline,
            },
            ended: false,
            _message: PhantomData,
        };
        handler(ctx, &mut stream).map(|resp| Bytes::from(resp.encode_to_vec()))
    };
    Handler::ClientStream(Arc::new(raw))
}

/// The raw form of a deferred handler: decodes the request, wraps the writer.
fn deferred<Req, Resp>(
    handler: impl Fn(&CallContext, Req, Responder<Resp>) + Send + Sync + 'static,
) -> impl Fn(&CallContext, Bytes, StreamWriter) -> Result<(), (Status, StreamWriter)>
+ Send
+ Sync
+ 'static
where
    Req: Message + Default,
    Resp: Message,
{
    move |ctx: &CallContext, payload: Bytes, writer: StreamWriter| {
        let request = match decode_request::<Req>(payload) {
            Ok(request) => request,
            Err(status) => return Err((status, writer)),
        };
        let responder = Responder {
            writer: Some(writer),
            _message: PhantomData,
        };
        handler(ctx, request, responder);
        Ok(())
    }
}

/// Builds the pool job for one admitted call, and the inbound channel the reactor feeds
/// (client-streaming calls only). `wait` says whether the reply may wait for buffer space
/// (not on the reactor thread).
fn build_job(
    handler: &Handler,
    ctx: CallContext,
    writer: StreamWriter,
    payload: Bytes,
    wait: Wait,
) -> (Option<Sender<Inbound>>, Job) {
    match handler {
        Handler::Unary(f) => {
            let f = f.clone();
            let job = Box::new(move || {
                let result = run_unless_expired(&ctx, || f(&ctx, payload));
                reply_with(&writer, result, wait);
            });
            (None, job)
        }
        Handler::Deferred(f) => {
            let f = f.clone();
            let job = Box::new(move || {
                if let Some(status) = ctx.cancellation() {
                    writer.fail(&status);
                } else if let Err((status, writer)) = f(&ctx, payload, writer) {
                    writer.fail(&status);
                }
            });
            (None, job)
        }
        Handler::ServerStream(f) => {
            let f = f.clone();
            let job = Box::new(move || {
                let sink = Arc::new(StreamSink {
                    writer,
                    finished: AtomicBool::new(false),
                });
                let result = run_unless_expired(&ctx, || f(&ctx, payload, sink.clone()));
                if let Err(status) = result {
                    sink.fail(&status);
                }
                // If the handler kept no handle, dropping ours sends END_OF_STREAM.
            });
            (None, job)
        }
        Handler::ClientStream(f) => {
            let f = f.clone();
            let (tx, rx) = crossbeam_channel::bounded(INBOUND_CAPACITY);
            let job = Box::new(move || {
                let reader = StreamReader {
                    rx,
                    consumed_unreturned: 0,
                    opened_at: None,
                };
                let result = run_unless_expired(&ctx, || f(&ctx, reader, &writer));
                reply(&writer, result);
            });
            (Some(tx), job)
        }
    }
}

/// Runs `work` unless the caller already gave up while the call sat in the queue.
fn run_unless_expired<T>(
    ctx: &CallContext,
    work: impl FnOnce() -> Result<T, Status>,
) -> Result<T, Status> {
    match ctx.cancellation() {
        Some(status) => Err(status),
        None => work(),
    }
}

fn reply(writer: &StreamWriter, result: Result<Bytes, Status>) {
    reply_with(writer, result, Wait::ForSpace);
}

/// Whether a reply may wait for send-buffer space.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Pool threads: wait (until the call's deadline).
    ForSpace,
    /// The reactor and the Raft apply thread: never; a reply that does not fit fails the
    /// call with `ResourceExhausted` instead.
    Never,
}

fn reply_with(writer: &StreamWriter, result: Result<Bytes, Status>, wait: Wait) {
    match result {
        Ok(payload) => {
            let mut env = envelope(writer.stream_id, FrameKind::Response);
            env.payload = payload;
            let sent = match wait {
                Wait::ForSpace => writer.finish(env),
                Wait::Never => writer.finish_nowait(env),
            };
            if let Err(status) = sent {
                // Too large or no longer deliverable: tell the caller if the stream is open.
                writer.fail(&status);
            }
        }
        Err(status) => writer.fail(&status),
    }
}

/// Threads that run one service's handlers, fed by a bounded queue of calls, and the
/// continuations of calls they started ([`Continuations`]).
pub struct ServicePool {
    name: String,
    jobs: Sender<Job>,
    continuations: Sender<Job>,
    stop: Option<Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

/// Hands the rest of a call back to its pool's threads from a thread that must not block
/// or run it (the Raft thread or apply thread completing a proposal, the reactor delivering
/// a reply): the pool's threads run it beside the queued calls.
///
/// The queue is not bounded by itself: each call may have at most one continuation
/// outstanding at a time, so the user's bound on calls in flight bounds it (the control
/// API's is `CONTROL_WRITES_IN_FLIGHT_MAX`). A continuation sent after the pool stopped is
/// dropped, not run: what it owns (a [`Responder`]) then answers the caller `Unavailable`.
#[derive(Clone)]
pub struct Continuations {
    jobs: Sender<Job>,
}

impl Continuations {
    /// Queues `job` for the pool's threads. Never blocks.
    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        if self.jobs.send(Box::new(job)).is_err() {
            log::debug!("a continuation arrived after its service pool stopped; dropped");
        }
    }
}

impl ServicePool {
    /// Starts `threads` threads named `rpc-<name>-<i>` serving a queue of at most
    /// `queue_len_max` waiting calls; calls beyond it are refused with `ResourceExhausted`.
    ///
    /// # Errors
    /// The OS error if a thread cannot be spawned.
    pub fn new(name: &str, threads: usize, queue_len_max: usize) -> std::io::Result<Self> {
        assert!(
            threads > 0,
            "a pool without threads would never serve a call"
        );
        let (jobs, job_rx) = crossbeam_channel::bounded::<Job>(queue_len_max);
        let (continuations, continuation_rx) = crossbeam_channel::unbounded::<Job>();
        let (stop, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let queues = PoolQueues {
                jobs: job_rx.clone(),
                continuations: continuation_rx.clone(),
                stop: stop_rx.clone(),
            };
            handles.push(
                std::thread::Builder::new()
                    .name(format!("rpc-{name}-{i}"))
                    .spawn(move || serve_jobs(&queues))?,
            );
        }
        Ok(Self {
            name: name.to_string(),
            jobs,
            continuations,
            stop: Some(stop),
            threads: handles,
        })
    }

    /// A handle that queues continuations on this pool (see [`Continuations`]).
    pub fn continuations(&self) -> Continuations {
        Continuations {
            jobs: self.continuations.clone(),
        }
    }

    /// Stops the pool: every thread finishes its current call and the queued ones, then
    /// exits; this joins them. Stop the transport first so no new calls arrive.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.take();
        for handle in self.threads.drain(..) {
            if handle.join().is_err() {
                log::error!("a thread of service pool {} panicked", self.name);
            }
        }
    }
}

impl Drop for ServicePool {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// What a pool thread receives.
struct PoolQueues {
    jobs: Receiver<Job>,
    continuations: Receiver<Job>,
    stop: Receiver<()>,
}

fn serve_jobs(queues: &PoolQueues) {
    loop {
        // Work already queued is taken without `select!`, which registers with every
        // queue each time it is used; it runs only when this thread has to wait.
        if let Ok(job) = queues
            .continuations
            .try_recv()
            .or_else(|_| queues.jobs.try_recv())
        {
            job();
            continue;
        }
        crossbeam_channel::select! {
            recv(queues.continuations) -> job => {
                if let Ok(job) = job {
                    job();
                }
            },
            recv(queues.jobs) -> job => match job {
                Ok(job) => job(),
                Err(_) => return,
            },
            recv(queues.stop) -> _ => {
                // The queued calls, and what they continue with meanwhile; continuations
                // that come later are dropped with the queue (their callers are answered
                // `Unavailable`).
                loop {
                    let job = queues.continuations.try_recv().or_else(|_| queues.jobs.try_recv());
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(role: Role) -> PeerIdentity {
        PeerIdentity {
            node_id: "n1".into(),
            role,
            cluster_id: "c1".into(),
        }
    }

    use crate::proto::control::rpc as control_rpc;
    use crate::proto::control::{ClusterResponse, GetClusterRequest};

    fn pool() -> ServicePool {
        ServicePool::new("test", 1, 1).unwrap()
    }

    #[test]
    fn declared_methods_are_served_with_their_declared_policy() {
        let pool = pool();
        let mut router = Router::new();
        router.serve_unary(control_rpc::GET_CLUSTER, &pool, |_, _| {
            Ok(ClusterResponse::default())
        });
        router.unary(
            "test.Cluster",
            Allow::NODES,
            &pool,
            |_, _: GetClusterRequest| Ok(ClusterResponse::default()),
        );
        let served = router.entry("control.GetCluster").unwrap();
        assert_eq!(served.method, control_rpc::GET_CLUSTER.method());
        assert_eq!(served.method.policy.allow, Allow::OPERATORS);
        assert!(router.entry("control.ListNodes").is_none());
        let undeclared = router.entry("test.Cluster").unwrap();
        assert_eq!(undeclared.method.policy, Policy::undeclared(Allow::NODES));
        assert!(!undeclared.method.policy.demoted);
        assert!(router.entry("test.Other").is_none());
    }

    #[test]
    #[should_panic(expected = "is declared in proto/")]
    fn a_declared_method_cannot_be_served_by_name_with_another_policy() {
        let pool = pool();
        Router::new().unary(
            "control.GetCluster",
            Allow::ANYONE,
            &pool,
            |_, _: GetClusterRequest| Ok(ClusterResponse::default()),
        );
    }

    #[test]
    #[should_panic(expected = "is internal")]
    fn an_internal_method_is_never_served() {
        let pool = pool();
        Router::new().serve_unary(control_rpc::PUBLISH_ROOT_CA, &pool, |_, _| {
            Ok(crate::proto::control::PublishRootCaResponse {})
        });
    }

    #[test]
    fn admins_are_operators_and_nothing_else() {
        let admin = identity(Role::Admin);
        assert!(Allow::OPERATORS.check("m", Some(&admin)).is_ok());
        assert!(Allow::ANYONE.check("m", Some(&admin)).is_ok());
        for allow in [Allow::MANAGERS, Allow::NODES] {
            let refusal = allow.check("m", Some(&admin)).unwrap_err();
            assert_eq!(refusal.code, crate::wire::Code::PermissionDenied);
        }
        let worker = identity(Role::Worker);
        assert!(Allow::OPERATORS.check("m", Some(&worker)).is_err());
        assert!(Allow::NODES.check("m", Some(&worker)).is_ok());
        let manager = identity(Role::Manager);
        for allow in [Allow::MANAGERS, Allow::OPERATORS, Allow::NODES] {
            assert!(allow.check("m", Some(&manager)).is_ok());
        }
        assert!(Allow::OPERATORS.check("m", None).is_err());
    }
}
