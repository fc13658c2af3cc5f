//! The two kinds of socket the reactor serves: TCP, and a unix socket in a manager's state
//! directory for the local `flotilla` command. Both carry the same mutual TLS, so identity
//! and role checks are the same whichever way a caller came in.
//!
//! Must never do anything but delegate: no buffering, no policy.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use mio::event::Source;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Interest, Registry, Token};

/// The address logged and rate-limited for callers on the local unix socket (they have no
/// network address; the socket's file mode already limits them to the owner).
pub(crate) const LOCAL_PEER_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// Where to dial.
#[derive(Clone, Debug)]
pub(crate) enum DialAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl DialAddr {
    /// The address to log and record for the connection.
    pub(crate) fn peer_addr(&self) -> SocketAddr {
        match self {
            DialAddr::Tcp(addr) => *addr,
            DialAddr::Unix(_) => LOCAL_PEER_ADDR,
        }
    }
}

impl std::fmt::Display for DialAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DialAddr::Tcp(addr) => write!(f, "{addr}"),
            DialAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// One connection's socket.
pub(crate) enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    /// Starts a non-blocking connect.
    pub(crate) fn connect(addr: &DialAddr) -> io::Result<Socket> {
        match addr {
            DialAddr::Tcp(addr) => TcpStream::connect(*addr).map(Socket::Tcp),
            DialAddr::Unix(path) => UnixStream::connect(path).map(Socket::Unix),
        }
    }

    /// Disables Nagle's algorithm on TCP (latency over packet count: frames are already
    /// batched by the send queue); nothing to do on a unix socket.
    pub(crate) fn set_nodelay(&self) -> io::Result<()> {
        match self {
            Socket::Tcp(socket) => socket.set_nodelay(true),
            Socket::Unix(_) => Ok(()),
        }
    }

    /// A pending connect error, if any.
    pub(crate) fn take_error(&self) -> io::Result<Option<io::Error>> {
        match self {
            Socket::Tcp(socket) => socket.take_error(),
            Socket::Unix(socket) => socket.take_error(),
        }
    }

    /// `Ok` once a connect completed; `NotConnected` while it is in progress.
    pub(crate) fn check_connected(&self) -> io::Result<()> {
        match self {
            Socket::Tcp(socket) => socket.peer_addr().map(drop),
            Socket::Unix(socket) => socket.peer_addr().map(drop),
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(socket) => socket.read(buf),
            Socket::Unix(socket) => socket.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(socket) => socket.write(buf),
            Socket::Unix(socket) => socket.write(buf),
        }
    }

    /// rustls hands over every queued TLS record at once (up to 64): without this, the
    /// default would send them one record, one syscall at a time.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Socket::Tcp(socket) => socket.write_vectored(bufs),
            Socket::Unix(socket) => socket.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Socket::Tcp(socket) => socket.flush(),
            Socket::Unix(socket) => socket.flush(),
        }
    }
}

impl Source for Socket {
    fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        match self {
            Socket::Tcp(socket) => socket.register(registry, token, interests),
            Socket::Unix(socket) => socket.register(registry, token, interests),
        }
    }

    fn reregister(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        match self {
            Socket::Tcp(socket) => socket.reregister(registry, token, interests),
            Socket::Unix(socket) => socket.reregister(registry, token, interests),
        }
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        match self {
            Socket::Tcp(socket) => socket.deregister(registry),
            Socket::Unix(socket) => socket.deregister(registry),
        }
    }
}

/// A listening socket.
pub(crate) enum ListenSocket {
    Tcp(TcpListener),
    /// The socket and its path (removed when the listener closes).
    Unix(UnixListener, PathBuf),
}

impl ListenSocket {
    /// Binds a unix socket at `path`, owner-only (0600). A stale socket file left by a
    /// crashed process is replaced; any other file there is an error.
    pub(crate) fn bind_unix(path: &Path) -> io::Result<ListenSocket> {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        if let Ok(metadata) = std::fs::symlink_metadata(path) {
            if !metadata.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(ListenSocket::Unix(listener, path.to_path_buf()))
    }

    /// Accepts one connection; `WouldBlock` when none is waiting.
    pub(crate) fn accept(&self) -> io::Result<(Socket, SocketAddr)> {
        match self {
            ListenSocket::Tcp(listener) => listener
                .accept()
                .map(|(socket, peer)| (Socket::Tcp(socket), peer)),
            ListenSocket::Unix(listener, _) => listener
                .accept()
                .map(|(socket, _)| (Socket::Unix(socket), LOCAL_PEER_ADDR)),
        }
    }

    /// Stops listening: deregisters, and removes a unix socket's file.
    pub(crate) fn close(&mut self, registry: &Registry) {
        match self {
            ListenSocket::Tcp(listener) => {
                let _ = registry.deregister(listener);
            }
            ListenSocket::Unix(listener, path) => {
                let _ = registry.deregister(listener);
                let _ = std::fs::remove_file(path);
            }
        }
    }
}
