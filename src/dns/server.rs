//! The `flotilla-dns` thread: one UDP socket, one query at a time, each answered from the
//! node's tables ([`super::LiveDirectory`]) and never from a manager.
//!
//! The socket waits at most [`STOP_CHECK_PERIOD`] for a datagram, so [`DnsServer::stop`]
//! is seen within that period. Must never block on anything but its socket, nor panic on
//! any datagram.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::message::QUERY_BYTES_MAX;
use super::{LiveDirectory, respond};
use crate::netdb::NetworkTables;

/// The thread's name.
pub const THREAD_NAME: &str = "flotilla-dns";
/// How often the thread looks at its stop flag while no query comes.
pub const STOP_CHECK_PERIOD: Duration = Duration::from_millis(200);

/// Why the responder could not start.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// `--dns-listen` is not `HOST:PORT` with an IP host.
    #[error("--dns-listen {0:?}: expected IP:PORT, e.g. 127.0.0.1:5354")]
    BadAddress(String),
    /// The socket could not be bound.
    #[error(
        "cannot listen for DNS queries on {addr}: {source}; choose another address with \
         --dns-listen"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The thread could not be spawned.
    #[error("cannot spawn the {THREAD_NAME} thread: {0}")]
    Thread(std::io::Error),
}

/// Counters of the responder.
#[derive(Debug, Default)]
pub struct DnsStats {
    /// Queries answered (FORMERR answers included).
    pub answered: AtomicU64,
    /// Datagrams too short to answer, or answers that could not be sent.
    pub dropped: AtomicU64,
}

/// Handle to the `flotilla-dns` thread; dropping it stops the thread.
pub struct DnsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    stats: Arc<DnsStats>,
    thread: Option<JoinHandle<()>>,
}

/// Parses a `--dns-listen` value.
///
/// # Errors
/// [`DnsError::BadAddress`].
pub fn parse_listen(text: &str) -> Result<SocketAddr, DnsError> {
    text.parse()
        .map_err(|_| DnsError::BadAddress(text.to_string()))
}

impl DnsServer {
    /// Binds `addr` and starts answering from `tables`.
    ///
    /// # Errors
    /// [`DnsError`]: the address is taken, or no thread.
    pub fn start(addr: SocketAddr, tables: Arc<dyn NetworkTables>) -> Result<DnsServer, DnsError> {
        let socket = UdpSocket::bind(addr).map_err(|source| DnsError::Bind { addr, source })?;
        socket
            .set_read_timeout(Some(STOP_CHECK_PERIOD))
            .map_err(|source| DnsError::Bind { addr, source })?;
        let bound = socket
            .local_addr()
            .map_err(|source| DnsError::Bind { addr, source })?;
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(DnsStats::default());
        let (thread_stop, thread_stats) = (Arc::clone(&stop), Arc::clone(&stats));
        let thread = std::thread::Builder::new()
            .name(THREAD_NAME.to_string())
            .spawn(move || {
                serve(
                    &socket,
                    LiveDirectory::new(tables),
                    &thread_stop,
                    &thread_stats,
                )
            })
            .map_err(DnsError::Thread)?;
        log::info!("answering DNS queries on {bound} (udp)");
        Ok(DnsServer {
            addr: bound,
            stop,
            stats,
            thread: Some(thread),
        })
    }

    /// The address it answers on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its counters.
    pub fn stats(&self) -> &DnsStats {
        &self.stats
    }

    /// Stops the thread (seen within [`STOP_CHECK_PERIOD`]) and joins it.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            log::error!("the {THREAD_NAME} thread panicked");
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(socket: &UdpSocket, mut directory: LiveDirectory, stop: &AtomicBool, stats: &DnsStats) {
    let mut buffer = vec![0u8; QUERY_BYTES_MAX];
    while !stop.load(Ordering::Acquire) {
        let (len, from) = match socket.recv_from(&mut buffer) {
            Ok(received) => received,
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(error) => {
                // An ICMP error of an earlier answer (connection refused) and the like:
                // nothing to do for this socket but go on.
                log::debug!("DNS socket: {error}");
                continue;
            }
        };
        let Some(reply) = respond(&buffer[..len], &directory.current()) else {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        match socket.send_to(&reply, from) {
            Ok(_) => stats.answered.fetch_add(1, Ordering::Relaxed),
            Err(error) => {
                log::debug!("DNS answer to {from}: {error}");
                stats.dropped.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}
