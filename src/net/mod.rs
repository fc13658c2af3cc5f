//! The transport: mutual-TLS connections carrying the multiplexed RPC protocol of [`wire`].
//!
//! ```text
//!  caller threads ──Channel::unary/…──► per-connection send queue ─┐
//!        │ (small frame, idle connection: written inline)          │ (waker)
//!        ▼                                                         ▼
//!     sockets ◄──────────────────────────────────────────── reactor thread ◄──► sockets
//!        ▲                                                         │
//!  handler threads ◄── ServicePool ◄── Router::dispatch ◄──────────┘
//!        └── replies: inline, or into the same per-connection queue
//! ```
//!
//! - One reactor thread (`flotilla-net`) owns every listener and reads every socket.
//!   Other threads hand it work through a bounded command channel (listen, dial, shutdown)
//!   and per-connection send queues, and wake it with a `mio::Waker`. A sender writes a
//!   small frame to the socket itself when the connection is idle (see `conn`): on this
//!   2-core host a reactor wake-up costs more than the write.
//! - Calls are made on a [`Channel`] (one per peer address, one connection reused by every
//!   call). Incoming calls are checked against the method's [`Allow`] list using the peer's
//!   verified certificate, then queued to the method's [`ServicePool`].
//! - Backpressure: senders block (never error) while a connection's send queue holds
//!   [`TransportConfig::send_buffer_bytes_max`] bytes or a stream has no flow-control credit,
//!   until their call's deadline. The reactor itself never blocks.
//! - Timeouts: a TLS handshake must finish within `handshake_timeout_ms`; a frame that has
//!   started arriving must finish within `frame_read_timeout_ms` (no slowloris); an accepted
//!   connection silent for `idle_timeout_ms` is closed; a dialer with open calls pings every
//!   `keepalive_interval_ms` and closes if no answer comes within `keepalive_timeout_ms`.
//! - Shutdown ([`Transport::shutdown`]) is a barrier: stop accepting, fail every in-flight
//!   call with `Unavailable`, close every connection (TLS close_notify), join the reactor.
//!
//! This module must never interpret call payloads, block on a socket (all are
//! nonblocking), or make a sender wait for a connection's socket lock (`try_lock` only).
//!
//! [`wire`]: crate::wire

mod client;
mod conn;
pub mod method;
mod reactor;
mod server;
mod socket;
mod stream;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use mio::{Poll, Waker};
use parking_lot::Mutex;

pub use client::{CallOptions, Channel, RequestStream, ResponseStream};
pub use conn::ReplyCallback;
pub use method::{ClientStreamMethod, Method, Policy, ServerStreamMethod, UnaryMethod};
pub use server::{
    Allow, Authorizer, CallContext, ClientStream, Continuations, Responder, Router, ServerStream,
    ServicePool,
};

use client::{Backoff, ChannelInner};
use conn::ReactorWaker;
use reactor::{Reactor, WAKER_TOKEN};

use crate::wire::FRAME_BYTES_MAX_DEFAULT;

/// Limits and timeouts of the transport. Every field is a bound the transport enforces.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// Largest encoded frame sent or accepted (default 4 MiB). Larger values are streamed.
    pub frame_bytes_max: usize,
    /// Bytes queued for one connection before senders block (default 8 MiB).
    pub send_buffer_bytes_max: usize,
    /// Time for TCP connect plus the TLS handshake (default 10 s).
    pub handshake_timeout_ms: u64,
    /// Time for one frame to arrive once its first byte did (default 30 s).
    pub frame_read_timeout_ms: u64,
    /// An accepted connection that sends nothing for this long is closed (default 60 s).
    pub idle_timeout_ms: u64,
    /// A dialer with open calls pings this often (default 10 s).
    pub keepalive_interval_ms: u64,
    /// A dialer closes the connection if a ping gets no answer within this (default 10 s).
    pub keepalive_timeout_ms: u64,
    /// First wait after a failed dial (default 100 ms); doubles per failure.
    pub backoff_initial_ms: u64,
    /// Longest wait between dials (default 8 s, like swarmkit's agent).
    pub backoff_max_ms: u64,
    /// Connections (accepted and dialed) beyond which new ones are refused (default 4096).
    pub connections_max: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
            send_buffer_bytes_max: 8 * 1024 * 1024,
            handshake_timeout_ms: 10_000,
            frame_read_timeout_ms: 30_000,
            idle_timeout_ms: 60_000,
            keepalive_interval_ms: 10_000,
            keepalive_timeout_ms: 10_000,
            backoff_initial_ms: 100,
            backoff_max_ms: 8_000,
            connections_max: 4096,
        }
    }
}

impl TransportConfig {
    fn validate(&self) -> io::Result<()> {
        let invalid = |what: &str| {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                what.to_string(),
            ))
        };
        if self.frame_bytes_max < 1024 {
            return invalid("frame_bytes_max must be at least 1024 bytes");
        }
        if self.frame_bytes_max > u32::MAX as usize {
            return invalid("frame_bytes_max must fit the u32 length prefix");
        }
        if self.idle_timeout_ms <= self.keepalive_interval_ms * 2 {
            return invalid(
                "idle_timeout_ms must exceed twice keepalive_interval_ms, or callers that only \
                 listen would be cut off",
            );
        }
        if self.backoff_initial_ms == 0 || self.backoff_max_ms < self.backoff_initial_ms {
            return invalid("backoff_initial_ms must be > 0 and <= backoff_max_ms");
        }
        Ok(())
    }
}

/// Work for the reactor from other threads.
pub(crate) enum Command {
    Listen {
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        router: Arc<Router>,
        reply: Sender<io::Result<SocketAddr>>,
    },
    Dial {
        channel: Arc<ChannelInner>,
        attempt: u64,
        addr: socket::DialAddr,
    },
    ListenLocal {
        path: std::path::PathBuf,
        tls: Arc<rustls::ServerConfig>,
        router: Arc<Router>,
        reply: Sender<io::Result<()>>,
    },
    Shutdown,
}

/// Commands waiting for the reactor before senders block.
const COMMAND_QUEUE_LEN_MAX: usize = 1024;

/// A running transport: the reactor thread and the handles to reach it.
pub struct Transport {
    config: Arc<TransportConfig>,
    commands: Sender<Command>,
    waker: Arc<ReactorWaker>,
    channels: Mutex<HashMap<(String, usize), Channel>>,
    /// Taken by the first shutdown, so shutting down twice (or dropping after) is harmless.
    reactor: Mutex<Option<JoinHandle<()>>>,
}

impl Transport {
    /// Starts the reactor thread.
    ///
    /// # Errors
    /// `InvalidInput` for an inconsistent config; the OS error if polling or the thread
    /// cannot be set up.
    pub fn start(config: TransportConfig) -> io::Result<Self> {
        config.validate()?;
        let config = Arc::new(config);
        let poll = Poll::new()?;
        let (dirty_tx, dirty_rx) = crossbeam_channel::unbounded();
        let waker = Arc::new(ReactorWaker {
            waker: Waker::new(poll.registry(), WAKER_TOKEN)?,
            dirty: dirty_tx,
            frames_written_inline: std::sync::atomic::AtomicU64::new(0),
        });
        let (commands, command_rx) = crossbeam_channel::bounded(COMMAND_QUEUE_LEN_MAX);
        let reactor = Reactor::new(poll, command_rx, dirty_rx, waker.clone(), config.clone());
        let handle = std::thread::Builder::new()
            .name("flotilla-net".into())
            .spawn(move || reactor.run())?;
        Ok(Self {
            config,
            commands,
            waker,
            channels: Mutex::new(HashMap::new()),
            reactor: Mutex::new(Some(handle)),
        })
    }

    /// Serves `router` on `addr` with `tls`; returns the bound address (useful with port 0).
    ///
    /// # Errors
    /// The bind error, or `Other` if the transport has stopped.
    pub fn listen(
        &self,
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        router: Arc<Router>,
    ) -> io::Result<SocketAddr> {
        let (reply, reply_rx) = crossbeam_channel::bounded(1);
        self.send_command(Command::Listen {
            addr,
            tls,
            router,
            reply,
        })?;
        reply_rx
            .recv()
            .map_err(|_| io::Error::other("the transport stopped before listening"))?
    }

    /// Serves `router` on a unix socket at `path` (mode 0600, replacing a stale socket
    /// file), with the same mutual TLS as the network listener: the local `flotilla` command
    /// reaches its manager there. Dial it with the target `unix:<path>`.
    ///
    /// # Errors
    /// The bind error (a non-socket file at `path` is refused), or `Other` if the
    /// transport has stopped.
    pub fn listen_local(
        &self,
        path: &std::path::Path,
        tls: Arc<rustls::ServerConfig>,
        router: Arc<Router>,
    ) -> io::Result<()> {
        let (reply, reply_rx) = crossbeam_channel::bounded(1);
        self.send_command(Command::ListenLocal {
            path: path.to_path_buf(),
            tls,
            router,
            reply,
        })?;
        reply_rx
            .recv()
            .map_err(|_| io::Error::other("the transport stopped before listening"))?
    }

    /// The channel to `target` (`host:port`, or `unix:<path>`) using `tls`. The same target and config always
    /// give the same channel, so a peer gets one connection however many callers it has.
    pub fn channel(&self, target: &str, tls: &Arc<rustls::ClientConfig>) -> Channel {
        let key = (target.to_string(), Arc::as_ptr(tls) as usize);
        self.channels
            .lock()
            .entry(key)
            .or_insert_with(|| {
                Channel::new(
                    target,
                    tls.clone(),
                    self.commands.clone(),
                    self.waker.clone(),
                    Backoff {
                        initial_ms: self.config.backoff_initial_ms,
                        max_ms: self.config.backoff_max_ms,
                    },
                )
            })
            .clone()
    }

    /// Frames senders wrote to their socket themselves, sparing the reactor a wake-up
    /// (a small frame, on an idle connection); the rest went through the send queues.
    pub fn frames_written_inline(&self) -> u64 {
        self.waker
            .frames_written_inline
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn send_command(&self, command: Command) -> io::Result<()> {
        self.commands
            .send(command)
            .map_err(|_| io::Error::other("the transport has stopped"))?;
        self.waker.waker.wake()
    }

    /// Stops accepting, fails every in-flight call with `Unavailable`, closes every
    /// connection and joins the reactor thread. Idempotent; callable through an `Arc` shared
    /// with other components (they see `Unavailable` from then on).
    pub fn shutdown(&self) {
        let Some(reactor) = self.reactor.lock().take() else {
            return;
        };
        for channel in self.channels.lock().values() {
            channel.inner().stop();
        }
        if self.send_command(Command::Shutdown).is_err() {
            log::debug!("the reactor had already stopped");
        }
        if reactor.join().is_err() {
            log::error!("the network reactor thread panicked");
        }
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        self.shutdown();
    }
}
