//! The reactor thread: owns every listener, and every connection's reading side, routes
//! and timers; it shares each socket and rustls session with senders (`ConnIo`, locked).
//!
//! One loop: poll for readiness (at most [`SWEEP_PERIOD`] at a time), accept, read TLS
//! records, decode frames and route them (to a waiting caller's channel or, for new
//! requests, through the [`Router`](super::Router) to a service pool), then move queued
//! outbound frames into TLS and onto sockets. Other threads reach it only through the
//! command channel, the per-connection send queues and the waker; a sender may also write
//! a small frame to the socket itself (see [`super::conn`]), never while the reactor holds
//! the connection's socket lock.
//!
//! It must never block: deliveries use `try_send` on channels sized by the flow-control
//! window, pools refuse work when full, and a connection whose peer does not read our
//! replies stops being read until it drains.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, TrySendError};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};

use super::client::ChannelInner;
use super::conn::{ConnIo, ConnShared, Outbound, ReactorTurn, ReactorWaker, Route, envelope};
use super::socket::{DialAddr, ListenSocket, Socket};
use super::stream::Inbound;
use super::{Command, Router, TransportConfig};
use crate::proto::wire::{Envelope, FrameKind};
use crate::wire::{Code, FrameDecoder, Status};

/// The waker's token; listeners and connections take tokens from 1 up, never reused.
pub(crate) const WAKER_TOKEN: Token = Token(0);

/// Longest the reactor sleeps before checking timeouts.
const SWEEP_PERIOD: Duration = Duration::from_millis(100);

/// Bytes read from one connection per turn before others get a go; fairness bound.
const READ_TURN_BYTES_MAX: usize = 256 * 1024;

/// Bytes read from a socket at once, into the reactor's one scratch buffer.
const READ_SCRATCH_BYTES: usize = 64 * 1024;

/// Encrypted bytes rustls may buffer for one connection before it refuses more plaintext.
const TLS_SEND_BUFFER_BYTES: usize = 256 * 1024;

/// Reactor-generated replies (errors for refused calls, PONGs) a connection may have
/// queued before we stop reading from it: a peer that floods requests but never reads
/// cannot grow our memory.
const LOCAL_OUT_BYTES_MAX: usize = 1024 * 1024;

/// The reactor's maps (connections, listeners, routes: several lookups per frame) hash with
/// foldhash, randomly seeded per map: SipHash was 5 % of a unary call's instructions.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Poll events handled per wakeup.
const EVENTS_CAPACITY: usize = 1024;

struct Listener {
    socket: ListenSocket,
    tls: Arc<rustls::ServerConfig>,
    router: Arc<Router>,
}

enum Side {
    Dialed {
        channel: Arc<ChannelInner>,
        attempt: u64,
        /// False until the TCP connect completes.
        connected: bool,
    },
    Accepted {
        router: Arc<Router>,
    },
}

/// The reactor's part of a connection; the socket and TLS session are in
/// `shared.io`, locked for each use.
struct Conn {
    shared: Arc<ConnShared>,
    /// Who is at the other end, for messages: `host:port`, `unix:<path>` for a dialed
    /// manager's local socket, or a local client of ours (a unix socket has no address).
    peer_name: String,
    side: Side,
    decoder: FrameDecoder,
    routes: FastMap<u64, Route>,
    /// Frames the reactor itself produced (refusals, PONG), sent before queued ones.
    local_out: VecDeque<Bytes>,
    local_out_bytes: usize,
    /// Set while the TLS handshake runs.
    handshake_deadline: Option<Instant>,
    last_inbound: Instant,
    /// When the current unfinished frame (if any) started arriving.
    frame_started: Option<Instant>,
    ping_sent_at: Option<Instant>,
    read_paused: bool,
}

impl Conn {
    fn peer(&self) -> &str {
        &self.peer_name
    }

    fn queue_local(&mut self, env: &Envelope) {
        match self.shared.encode(env) {
            Ok(frame) => {
                self.local_out_bytes += frame.len();
                self.local_out.push_back(frame);
            }
            Err(e) => log::error!("cannot encode a reply to {}: {e}", self.peer()),
        }
    }

    fn queue_error(&mut self, stream_id: u64, status: &Status) {
        let mut env = envelope(stream_id, FrameKind::Error);
        env.status = Some(status.to_proto());
        self.queue_local(&env);
    }
}

pub(crate) struct Reactor {
    poll: Poll,
    commands: Receiver<Command>,
    dirty: Receiver<u64>,
    waker: Arc<ReactorWaker>,
    config: Arc<TransportConfig>,
    listeners: FastMap<Token, Listener>,
    conns: FastMap<Token, Conn>,
    next_token: usize,
    /// Connections that still had input when their read turn ended.
    more_input: Vec<Token>,
    /// Where sockets are read into before TLS takes the bytes (see `Reactor::read_into`).
    scratch: Vec<u8>,
    last_sweep: Instant,
    stopping: bool,
}

impl Reactor {
    pub(crate) fn new(
        poll: Poll,
        commands: Receiver<Command>,
        dirty: Receiver<u64>,
        waker: Arc<ReactorWaker>,
        config: Arc<TransportConfig>,
    ) -> Self {
        Self {
            poll,
            commands,
            dirty,
            waker,
            config,
            listeners: FastMap::default(),
            conns: FastMap::default(),
            next_token: 1,
            more_input: Vec::new(),
            scratch: vec![0; READ_SCRATCH_BYTES],
            last_sweep: Instant::now(),
            stopping: false,
        }
    }

    fn allocate_token(&mut self) -> Token {
        let token = Token(self.next_token);
        self.next_token += 1;
        token
    }

    /// Runs until a `Shutdown` command (or every handle dropped), then closes everything.
    pub(crate) fn run(mut self) {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        while !self.stopping {
            let timeout = if self.more_input.is_empty() {
                SWEEP_PERIOD
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout))
                && e.kind() != io::ErrorKind::Interrupted
            {
                log::error!("network reactor cannot poll, stopping: {e}");
                break;
            }
            for event in events.iter() {
                match event.token() {
                    WAKER_TOKEN => {}
                    token if self.listeners.contains_key(&token) => self.accept(token),
                    token => self.service(token),
                }
            }
            self.drain_commands();
            self.drain_dirty();
            for token in std::mem::take(&mut self.more_input) {
                self.service(token);
            }
            if self.last_sweep.elapsed() >= SWEEP_PERIOD {
                self.sweep();
            }
        }
        self.close_everything();
    }

    fn drain_commands(&mut self) {
        loop {
            match self.commands.try_recv() {
                Ok(Command::Listen {
                    addr,
                    tls,
                    router,
                    reply,
                }) => {
                    let _ = reply.send(self.listen(addr, tls, router));
                }
                Ok(Command::Dial {
                    channel,
                    attempt,
                    addr,
                }) => self.dial(channel, attempt, addr),
                Ok(Command::ListenLocal {
                    path,
                    tls,
                    router,
                    reply,
                }) => {
                    let _ = reply.send(self.listen_local(&path, tls, router));
                }
                Ok(Command::Shutdown) => self.stopping = true,
                Err(crossbeam_channel::TryRecvError::Empty) => return,
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    self.stopping = true;
                    return;
                }
            }
        }
    }

    fn drain_dirty(&mut self) {
        while let Ok(conn_id) = self.dirty.try_recv() {
            let token = Token(usize::try_from(conn_id).expect("connection ids are tokens"));
            if self.conns.contains_key(&token) {
                self.service(token);
            }
        }
    }

    fn listen(
        &mut self,
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        router: Arc<Router>,
    ) -> io::Result<SocketAddr> {
        let mut socket = TcpListener::bind(addr)?;
        let token = self.allocate_token();
        self.poll
            .registry()
            .register(&mut socket, token, Interest::READABLE)?;
        let local = socket.local_addr()?;
        log::info!("listening on {local}");
        self.listeners.insert(
            token,
            Listener {
                socket: ListenSocket::Tcp(socket),
                tls,
                router,
            },
        );
        Ok(local)
    }

    fn listen_local(
        &mut self,
        path: &std::path::Path,
        tls: Arc<rustls::ServerConfig>,
        router: Arc<Router>,
    ) -> io::Result<()> {
        let mut socket = ListenSocket::bind_unix(path)?;
        let token = self.allocate_token();
        let registered = match &mut socket {
            ListenSocket::Unix(listener, _) => {
                self.poll
                    .registry()
                    .register(listener, token, Interest::READABLE)
            }
            ListenSocket::Tcp(_) => unreachable!("bind_unix returns a unix socket"),
        };
        if let Err(e) = registered {
            socket.close(self.poll.registry());
            return Err(e);
        }
        log::info!("listening on unix:{}", path.display());
        self.listeners.insert(
            token,
            Listener {
                socket,
                tls,
                router,
            },
        );
        Ok(())
    }

    fn accept(&mut self, listener_token: Token) {
        loop {
            let listener = &self.listeners[&listener_token];
            let (socket, peer) = match listener.socket.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("accept failed: {e}");
                    return;
                }
            };
            if self.conns.len() >= self.config.connections_max {
                log::warn!(
                    "refusing connection from {peer}: already {} connections (the limit)",
                    self.conns.len()
                );
                continue;
            }
            let tls = match rustls::ServerConnection::new(listener.tls.clone()) {
                Ok(tls) => rustls::Connection::Server(tls),
                Err(e) => {
                    log::error!("cannot start TLS for {peer}: {e}");
                    continue;
                }
            };
            let side = Side::Accepted {
                router: listener.router.clone(),
            };
            let peer_name = match &socket {
                Socket::Unix(_) => "a local client (control socket)".to_string(),
                Socket::Tcp(_) => peer.to_string(),
            };
            if let Err(e) = self.register(socket, (peer, peer_name), tls, side) {
                log::warn!("cannot register connection from {peer}: {e}");
            }
        }
    }

    fn dial(&mut self, channel: Arc<ChannelInner>, attempt: u64, addr: DialAddr) {
        let outcome = (|| {
            let server_name = crate::ca::tls::server_name();
            let tls = rustls::ClientConnection::new(channel.tls.clone(), server_name)
                .map_err(|e| io::Error::other(format!("TLS setup: {e}")))?;
            let socket = Socket::connect(&addr)?;
            let side = Side::Dialed {
                channel: channel.clone(),
                attempt,
                connected: false,
            };
            self.register(
                socket,
                (addr.peer_addr(), addr.to_string()),
                rustls::Connection::Client(tls),
                side,
            )
        })();
        if let Err(e) = outcome {
            channel.dial_finished(
                attempt,
                Err(Status::unavailable(format!(
                    "cannot connect to {addr}: {e}"
                ))),
            );
        }
    }

    /// Registers a connected socket; `peer` is its address (for rate limits and logs) and
    /// the name messages give it (see [`Conn::peer`]).
    fn register(
        &mut self,
        mut socket: Socket,
        (peer, peer_name): (SocketAddr, String),
        mut tls: rustls::Connection,
        side: Side,
    ) -> io::Result<()> {
        let token = self.allocate_token();
        self.poll.registry().register(
            &mut socket,
            token,
            Interest::READABLE | Interest::WRITABLE,
        )?;
        // Latency over packet count: frames are already batched by the send queue.
        if let Err(e) = socket.set_nodelay() {
            log::debug!("cannot set TCP_NODELAY for {peer_name}: {e}");
        }
        tls.set_buffer_limit(Some(TLS_SEND_BUFFER_BYTES));
        let dialed = matches!(side, Side::Dialed { .. });
        let id = u64::try_from(token.0).expect("usize fits in u64");
        let shared = Arc::new(ConnShared::new(
            id,
            peer,
            dialed,
            self.config.frame_bytes_max,
            self.config.send_buffer_bytes_max,
            self.waker.clone(),
            ConnIo::new(socket, tls),
        ));
        let now = Instant::now();
        self.conns.insert(
            token,
            Conn {
                shared,
                peer_name,
                side,
                decoder: FrameDecoder::new(self.config.frame_bytes_max),
                routes: FastMap::default(),
                local_out: VecDeque::new(),
                local_out_bytes: 0,
                handshake_deadline: Some(now + ms(self.config.handshake_timeout_ms)),
                last_inbound: now,
                frame_started: None,
                ping_sent_at: None,
                read_paused: false,
            },
        );
        Ok(())
    }

    /// Reads, routes and writes for one connection; closes it on any fatal error.
    fn service(&mut self, token: Token) {
        let Some(mut conn) = self.conns.remove(&token) else {
            return;
        };
        match self.service_conn(&mut conn, token) {
            Ok(()) => {
                self.conns.insert(token, conn);
            }
            Err(reason) => self.close(conn, reason),
        }
    }

    fn service_conn(&mut self, conn: &mut Conn, token: Token) -> Result<(), Status> {
        // Held for the whole turn: no sender writes inline meanwhile, so every call a
        // sender opened inline before this point is adopted below, ahead of its reply.
        let shared = conn.shared.clone();
        let mut guard = shared.io.lock();
        let io = guard
            .as_mut()
            .expect("the socket side goes only when the reactor closes the connection");
        adopt_inline_routes(conn, io);
        if !connect_finished(io, &mut conn.side, &conn.peer_name)? {
            return Ok(());
        }
        // Replies queued during the read are sent by the flush below, without a wake-up.
        let _turn = ReactorTurn::start(conn.shared.id);
        self.read(conn, io, token)?;
        flush(conn, io)?;
        if conn.read_paused && conn.local_out_bytes < LOCAL_OUT_BYTES_MAX / 2 {
            conn.read_paused = false;
            self.more_input.push(token);
        }
        Ok(())
    }

    fn read(&mut self, conn: &mut Conn, io: &mut ConnIo, token: Token) -> Result<(), Status> {
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = self.read_into(conn, io, token, &mut scratch);
        self.scratch = scratch;
        result
    }

    /// Reads the socket in `scratch`-sized gulps and hands each to TLS: rustls reads its
    /// socket 4 KiB at a time once its buffer is empty, a syscall per 4 KiB of a large
    /// message; one reactor-wide buffer costs one copy instead and no memory per connection.
    fn read_into(
        &mut self,
        conn: &mut Conn,
        io: &mut ConnIo,
        token: Token,
        scratch: &mut [u8],
    ) -> Result<(), Status> {
        let mut read_bytes = 0;
        let now = Instant::now();
        loop {
            if conn.read_paused {
                return Ok(());
            }
            if read_bytes >= READ_TURN_BYTES_MAX {
                self.more_input.push(token);
                return Ok(());
            }
            let received = match io.socket.read(scratch) {
                Ok(0) => {
                    return Err(Status::unavailable(format!(
                        "{} closed the connection",
                        conn.peer()
                    )));
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Status::unavailable(format!(
                        "reading from {}: {e}",
                        conn.peer()
                    )));
                }
            };
            read_bytes += received;
            conn.last_inbound = now;
            // Everything read goes to TLS, even if reading pauses meanwhile: it cannot go
            // back to the socket. At most one scratch buffer, so the pause stays bounded.
            let mut unprocessed = &scratch[..received];
            while !unprocessed.is_empty() {
                self.process_tls(conn, io, &mut unprocessed, now)?;
            }
        }
    }

    /// Hands TLS what it takes of `unprocessed` (advancing it), decrypts, and routes the
    /// frames completed.
    fn process_tls(
        &mut self,
        conn: &mut Conn,
        io: &mut ConnIo,
        unprocessed: &mut &[u8],
        now: Instant,
    ) -> Result<(), Status> {
        match io.tls.read_tls(unprocessed) {
            // After the peer's close_notify TLS takes nothing more: the close is reported
            // below.
            Ok(0) => *unprocessed = &[],
            Ok(_) => {}
            Err(e) => {
                return Err(Status::unavailable(format!(
                    "reading from {}: {e}",
                    conn.peer()
                )));
            }
        }
        let io_state = match io.tls.process_new_packets() {
            Ok(io_state) => io_state,
            Err(e) => {
                // Best effort: tell the peer why (the alert), then give up.
                let _ = io.tls.write_tls(&mut io.socket);
                return Err(Status::unavailable(format!(
                    "TLS with {} failed: {e}",
                    conn.peer()
                )));
            }
        };
        // Record the peer's identity before reading any frame: a TLS 1.3 client may send
        // its first request in the same flight as its Finished message.
        if conn.handshake_deadline.is_some() && !io.tls.is_handshaking() {
            handshake_done(conn, io)?;
        }
        if io_state.plaintext_bytes_to_read() > 0 {
            self.take_plaintext(conn, io, now)?;
        }
        if io_state.peer_has_closed() {
            return Err(Status::unavailable(format!(
                "{} closed the connection",
                conn.peer()
            )));
        }
        Ok(())
    }

    fn take_plaintext(
        &mut self,
        conn: &mut Conn,
        io: &mut ConnIo,
        now: Instant,
    ) -> Result<(), Status> {
        // Straight from rustls' plaintext buffer into the decoder's: no zeroed read buffer.
        let mut reader = io.tls.reader();
        loop {
            match io::BufRead::fill_buf(&mut reader) {
                Ok([]) => break,
                Ok(plaintext) => {
                    let taken = plaintext.len();
                    conn.decoder.extend(plaintext);
                    io::BufRead::consume(&mut reader, taken);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    return Err(Status::unavailable(format!(
                        "reading from {}: {e}",
                        conn.peer()
                    )));
                }
            }
        }
        let mut completed = false;
        loop {
            match conn.decoder.next_frame() {
                Ok(Some(env)) => {
                    completed = true;
                    self.handle_frame(conn, env, now)?;
                }
                Ok(None) => break,
                Err(e) => {
                    log::warn!("closing connection with {}: {e}", conn.peer());
                    return Err(Status::unavailable(format!(
                        "protocol error from {}: {e}",
                        conn.peer()
                    )));
                }
            }
        }
        if completed || !conn.decoder.is_mid_frame() {
            conn.frame_started = None;
        }
        conn.decoder.release_idle_buffer();
        if conn.decoder.is_mid_frame() && conn.frame_started.is_none() {
            conn.frame_started = Some(now);
        }
        if conn.local_out_bytes >= LOCAL_OUT_BYTES_MAX {
            conn.read_paused = true;
        }
        Ok(())
    }

    fn handle_frame(&mut self, conn: &mut Conn, env: Envelope, now: Instant) -> Result<(), Status> {
        let kind = FrameKind::try_from(env.kind).expect("the decoder validated the kind");
        match kind {
            FrameKind::Ping => {
                let mut pong = envelope(0, FrameKind::Pong);
                pong.payload = env.payload;
                conn.queue_local(&pong);
                Ok(())
            }
            FrameKind::Pong => Ok(()),
            FrameKind::Request => self.handle_request(conn, env, now),
            _ if conn.shared.is_local_stream(env.stream_id) => {
                deliver_to_caller(conn, env, kind);
                Ok(())
            }
            _ => {
                deliver_to_callee(conn, env, kind);
                Ok(())
            }
        }
    }

    fn handle_request(
        &mut self,
        conn: &mut Conn,
        env: Envelope,
        now: Instant,
    ) -> Result<(), Status> {
        let stream_id = env.stream_id;
        if conn.shared.is_local_stream(stream_id) || conn.routes.contains_key(&stream_id) {
            return Err(Status::unavailable(format!(
                "protocol error from {}: REQUEST reuses stream id {stream_id}",
                conn.peer()
            )));
        }
        let Side::Accepted { router } = &conn.side else {
            conn.queue_error(
                stream_id,
                &Status::new(
                    Code::Unimplemented,
                    "this end of the connection serves no methods",
                ),
            );
            return Ok(());
        };
        let method = env.method.clone();
        let oneway = env.oneway;
        match router.dispatch(&conn.shared, env, now) {
            // A one-way call is over once dispatched: nothing goes back.
            Ok(_) if oneway => {}
            Ok(route) => {
                conn.routes.insert(stream_id, route);
            }
            Err(status) if oneway => {
                log::debug!("refused one-way {method} from {}: {status}", conn.peer());
            }
            Err(status) => {
                log::debug!("refused {method} from {}: {status}", conn.peer());
                conn.queue_error(stream_id, &status);
            }
        }
        Ok(())
    }

    /// Closes connections whose handshake, half-sent frame or silence ran too long, and
    /// pings dialed connections that have open calls.
    fn sweep(&mut self) {
        let now = Instant::now();
        self.last_sweep = now;
        let mut expired = Vec::new();
        for (token, conn) in &mut self.conns {
            // A call opened inline on a connection with nothing to read is adopted here, so
            // that keepalive pings see it (a sender holding the lock just delays this).
            let shared = conn.shared.clone();
            if let Some(mut guard) = shared.io.try_lock()
                && let Some(io) = guard.as_mut()
            {
                adopt_inline_routes(conn, io);
            }
            if let Some(reason) = timeout_reason(conn, &self.config, now) {
                expired.push((*token, reason));
            } else if needs_ping(conn, &self.config, now) {
                conn.ping_sent_at = Some(now);
                conn.queue_local(&envelope(0, FrameKind::Ping));
                self.more_input.push(*token);
            }
        }
        for (token, reason) in expired {
            if let Some(conn) = self.conns.remove(&token) {
                self.close(conn, reason);
            }
        }
    }

    fn close(&mut self, mut conn: Conn, reason: Status) {
        log::debug!("connection with {} closed: {}", conn.peer(), reason.message);
        // Taken first: from here on senders can only queue, and `shared.close` fails that.
        let io = conn.shared.io.lock().take();
        for item in conn.shared.close(reason.clone()) {
            if let Outbound::Open { route, .. } = item {
                route.end(reason.clone());
            }
        }
        if let Some(mut io) = io {
            adopt_inline_routes(&mut conn, &mut io);
            io.tls.send_close_notify();
            let _ = io.tls.write_tls(&mut io.socket);
            let _ = self.poll.registry().deregister(&mut io.socket);
        }
        for (_, route) in conn.routes.drain() {
            route.end(reason.clone());
        }
        if let Side::Dialed {
            channel, attempt, ..
        } = &conn.side
        {
            if conn.handshake_deadline.is_some() {
                channel.dial_finished(*attempt, Err(reason));
            } else {
                channel.connection_closed(conn.shared.id);
            }
        }
    }

    fn close_everything(&mut self) {
        for (_, mut listener) in self.listeners.drain() {
            listener.socket.close(self.poll.registry());
        }
        let tokens: Vec<Token> = self.conns.keys().copied().collect();
        for token in tokens {
            if let Some(conn) = self.conns.remove(&token) {
                self.close(conn, Status::unavailable("the transport is shutting down"));
            }
        }
    }
}

fn ms(value: u64) -> Duration {
    Duration::from_millis(value)
}

/// Takes over the routes of calls senders opened or finished inline (see `ConnIo`).
fn adopt_inline_routes(conn: &mut Conn, io: &mut ConnIo) {
    for (stream_id, route) in io.opened.drain(..) {
        conn.routes.insert(stream_id, route);
    }
    for stream_id in io.finished.drain(..) {
        conn.routes.remove(&stream_id);
    }
}

/// For a dialed connection, whether TCP connect has completed (errors are fatal).
fn connect_finished(io: &mut ConnIo, side: &mut Side, peer: &str) -> Result<bool, Status> {
    let Side::Dialed { connected, .. } = side else {
        return Ok(true);
    };
    if *connected {
        return Ok(true);
    }
    if let Ok(Some(e)) | Err(e) = io.socket.take_error() {
        return Err(Status::unavailable(format!(
            "cannot connect to {peer}: {e}"
        )));
    }
    match io.socket.check_connected() {
        Ok(()) => {
            *connected = true;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(Status::unavailable(format!(
            "cannot connect to {peer}: {e}"
        ))),
    }
}

/// Records the peer's identity once TLS is up and, for a dial, hands the connection to its
/// channel.
fn handshake_done(conn: &mut Conn, io: &mut ConnIo) -> Result<(), Status> {
    conn.handshake_deadline = None;
    let identity = crate::ca::tls::peer_identity(io.tls.peer_certificates()).map_err(|e| {
        Status::unavailable(format!(
            "{} presented a certificate without a flotilla identity: {e}",
            conn.peer()
        ))
    })?;
    match &conn.side {
        Side::Dialed {
            channel, attempt, ..
        } => {
            if identity.is_none() {
                return Err(Status::unavailable(format!(
                    "{} presented no server certificate",
                    conn.peer()
                )));
            }
            let _ = conn.shared.identity.set(identity);
            io.established = true;
            channel.dial_finished(*attempt, Ok(conn.shared.clone()));
        }
        Side::Accepted { .. } => {
            let _ = conn.shared.identity.set(identity);
            io.established = true;
        }
    }
    log::debug!(
        "TLS up with {} ({:?})",
        conn.peer(),
        conn.shared.peer_identity().map(|id| id.node_id)
    );
    Ok(())
}

/// Moves TLS records onto the socket and queued frames into TLS, until the socket would
/// block (a WRITABLE event resumes us) or the queue is empty (which re-arms its wakeup).
///
/// The order matters: stopping while frames are queued and the socket is writable would
/// strand them, since no event would come and senders do not wake a notified reactor.
fn flush(conn: &mut Conn, io: &mut ConnIo) -> Result<(), Status> {
    loop {
        match io.write_tls_out() {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(e) => {
                return Err(Status::unavailable(format!(
                    "writing to {}: {e}",
                    conn.peer()
                )));
            }
        }
        // TLS is empty here, so filling stops only when TLS is full again or nothing is left.
        let moved = conn.handshake_deadline.is_none() && fill_tls(conn, io)?;
        if !moved {
            return Ok(());
        }
    }
}

/// Hands frames to TLS until it refuses more plaintext. Returns whether anything moved.
fn fill_tls(conn: &mut Conn, io: &mut ConnIo) -> Result<bool, Status> {
    let mut moved = false;
    loop {
        if let Some((frame, written)) = &mut io.writing {
            let n = io.tls.writer().write(&frame[*written..]).map_err(|e| {
                Status::unavailable(format!("TLS write to {}: {e}", conn.peer_name))
            })?;
            if n == 0 {
                return Ok(moved);
            }
            moved = true;
            *written += n;
            if *written == frame.len() {
                io.writing = None;
            }
            continue;
        }
        if let Some(frame) = conn.local_out.pop_front() {
            conn.local_out_bytes -= frame.len();
            io.writing = Some((frame, 0));
            continue;
        }
        match conn.shared.pop() {
            Some(Outbound::Open {
                stream_id,
                route,
                frame,
            }) => {
                conn.routes.insert(stream_id, route);
                io.writing = Some((frame, 0));
            }
            Some(Outbound::Frame(frame)) => {
                log::trace!("sending {} bytes to {}", frame.len(), conn.peer_name);
                io.writing = Some((frame, 0));
            }
            Some(Outbound::Finish { stream_id, frame }) => {
                conn.routes.remove(&stream_id);
                io.writing = Some((frame, 0));
            }
            None => return Ok(moved),
        }
    }
}

/// Routes a frame on a stream we opened (we are the caller).
fn deliver_to_caller(conn: &mut Conn, env: Envelope, kind: FrameKind) {
    let stream_id = env.stream_id;
    let Some(route) = conn.routes.get(&stream_id) else {
        // A late frame for a call we already finished or abandoned.
        return;
    };
    if route.on_reply.is_some() {
        deliver_to_hook(conn, env, kind);
        return;
    }
    let (inbound, terminal) = match kind {
        FrameKind::StreamMessage => (Inbound::Message(env.payload), false),
        FrameKind::WindowUpdate => {
            log::trace!(
                "credit {} for stream {stream_id} from {}",
                env.credit,
                conn.peer()
            );
            route.ctl.add_credit(env.credit);
            return;
        }
        FrameKind::Response => {
            route.ctl.end(Status::new(
                Code::FailedPrecondition,
                "the server already replied; read its reply instead of sending more",
            ));
            (Inbound::Response(env.payload), true)
        }
        FrameKind::EndOfStream => (Inbound::End, true),
        FrameKind::Error => {
            let status = Status::from_proto(env.status.as_ref());
            route.ctl.end(status.clone());
            (Inbound::Failed(status), true)
        }
        FrameKind::Cancel => {
            let status = Status::cancelled(format!("{} cancelled the call", conn.peer()));
            route.ctl.end(status.clone());
            (Inbound::Failed(status), true)
        }
        FrameKind::Request | FrameKind::Ping | FrameKind::Pong | FrameKind::Unspecified => {
            unreachable!("handled before routing")
        }
    };
    let overflowed = deliver(route, inbound);
    if overflowed {
        let status = Status::resource_exhausted(format!(
            "{} sent more stream messages than its flow-control window allows",
            conn.peer()
        ));
        route.ctl.end(status);
        conn.queue_local(&envelope(stream_id, FrameKind::Cancel));
    }
    if terminal || overflowed {
        conn.routes.remove(&stream_id);
    }
}

/// Routes a frame on a call made with `Channel::unary_nowait`: its terminal frame runs the
/// route's reply hook, here on the reactor thread.
fn deliver_to_hook(conn: &mut Conn, env: Envelope, kind: FrameKind) {
    let outcome = match kind {
        FrameKind::WindowUpdate => return,
        FrameKind::Response => Ok(env.payload),
        FrameKind::Error => Err(Status::from_proto(env.status.as_ref())),
        FrameKind::Cancel => Err(Status::cancelled(format!(
            "{} cancelled the call",
            conn.peer()
        ))),
        FrameKind::StreamMessage | FrameKind::EndOfStream => Err(Status::internal(
            "peer answered a single-reply call with a stream",
        )),
        FrameKind::Request | FrameKind::Ping | FrameKind::Pong | FrameKind::Unspecified => {
            unreachable!("handled before routing")
        }
    };
    let Some(route) = conn.routes.remove(&env.stream_id) else {
        return;
    };
    route.ctl.end(Status::cancelled("the call is over"));
    if let Some(hook) = route.on_reply {
        (hook.0)(outcome);
    }
}

/// Routes a frame on a stream the peer opened (we are the callee).
fn deliver_to_callee(conn: &mut Conn, env: Envelope, kind: FrameKind) {
    let stream_id = env.stream_id;
    let Some(route) = conn.routes.get(&stream_id) else {
        return;
    };
    match kind {
        FrameKind::WindowUpdate => route.ctl.add_credit(env.credit),
        FrameKind::Cancel => {
            route.ctl.end(Status::cancelled(format!(
                "{} cancelled the call",
                conn.peer()
            )));
            conn.routes.remove(&stream_id);
        }
        FrameKind::StreamMessage | FrameKind::EndOfStream => {
            let inbound = if kind == FrameKind::EndOfStream {
                Inbound::End
            } else {
                Inbound::Message(env.payload)
            };
            if route.inbound.is_none() || deliver(route, inbound) {
                let status = Status::resource_exhausted(format!(
                    "{} sent stream messages this call does not accept or beyond its window",
                    conn.peer()
                ));
                route.ctl.end(status.clone());
                conn.routes.remove(&stream_id);
                conn.queue_error(stream_id, &status);
            }
        }
        FrameKind::Response | FrameKind::Error => {
            log::debug!(
                "ignoring a reply frame from caller {} on stream {stream_id}",
                conn.peer()
            );
        }
        FrameKind::Request | FrameKind::Ping | FrameKind::Pong | FrameKind::Unspecified => {
            unreachable!("handled before routing")
        }
    }
}

/// Hands `inbound` to the stream's reader. Returns true if the reader's queue was full,
/// which only a peer that ignores flow control can cause.
fn deliver(route: &Route, inbound: Inbound) -> bool {
    let Some(tx) = &route.inbound else {
        return false;
    };
    match tx.try_send(inbound) {
        Ok(()) => false,
        Err(TrySendError::Full(_)) => true,
        // The reader went away (the handler returned early): nothing to deliver to.
        Err(TrySendError::Disconnected(_)) => false,
    }
}

fn timeout_reason(conn: &Conn, config: &TransportConfig, now: Instant) -> Option<Status> {
    if conn.handshake_deadline.is_some_and(|d| now >= d) {
        return Some(Status::unavailable(format!(
            "TLS handshake with {} did not finish within {} ms",
            conn.peer(),
            config.handshake_timeout_ms
        )));
    }
    if conn
        .frame_started
        .is_some_and(|t| now.duration_since(t) >= ms(config.frame_read_timeout_ms))
    {
        return Some(Status::unavailable(format!(
            "{} started a frame and did not finish it within {} ms",
            conn.peer(),
            config.frame_read_timeout_ms
        )));
    }
    let silent = now.duration_since(conn.last_inbound);
    match conn.side {
        Side::Accepted { .. } if silent >= ms(config.idle_timeout_ms) => {
            Some(Status::unavailable(format!(
                "{} sent nothing for {} ms",
                conn.peer(),
                config.idle_timeout_ms
            )))
        }
        Side::Dialed { .. }
            if conn.ping_sent_at.is_some_and(|sent| {
                conn.last_inbound < sent
                    && now.duration_since(sent) >= ms(config.keepalive_timeout_ms)
            }) =>
        {
            Some(Status::unavailable(format!(
                "{} did not answer a keepalive ping within {} ms",
                conn.peer(),
                config.keepalive_timeout_ms
            )))
        }
        _ => None,
    }
}

fn needs_ping(conn: &Conn, config: &TransportConfig, now: Instant) -> bool {
    let Side::Dialed { .. } = conn.side else {
        return false;
    };
    // Periodic rather than on inbound silence: the callee judges idleness by what it
    // receives, and a caller that only listens to a stream would otherwise send nothing.
    let interval = ms(config.keepalive_interval_ms);
    conn.handshake_deadline.is_none()
        && !conn.routes.is_empty()
        && conn
            .ping_sent_at
            .is_none_or(|sent| now.duration_since(sent) >= interval)
}
