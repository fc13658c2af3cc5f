//! networkdb's driver: runs the sans-IO gossip core ([`crate::gossip::Gossip`]) on this node
//! with real sockets and time, and hands the rest of the product [`NetworkDb`], a handle to
//! the node's per-network tables (join and leave a network, put and delete an entry, read a
//! table, subscribe to entry events).
//!
//! - UDP for probes, gossip and push-pull on the node's gossip address (default: the node's
//!   listen port + 1; `--gossip-listen`), every datagram sealed with AES-256-GCM under the
//!   keyring ([`crate::gossip::keyring`]) fed with the cluster's network bootstrap keys,
//!   which the leader makes and rotates and the dispatcher session delivers
//!   ([`NetworkDb::set_network_keys`]). A datagram no key opens is dropped and counted.
//! - One thread of its own, `flotilla-gossip` (not the mio reactor): `recv_from` with a
//!   [`TICK_MS`] timeout is its clock; each turn it feeds the core what arrived and the time,
//!   then seals and sends what the core emits and hands events to subscribers.
//! - Bulk sync over the mTLS transport (`net`): the `gossip.BulkSync` client stream, served
//!   on TCP at the same port as the UDP socket. A second thread, `flotilla-gossip-bulk`,
//!   streams the sessions the core opens, pulling one chunk (≤ 1 MiB) at a time from the
//!   core and sending it under the stream's flow control: memory stays at one chunk per
//!   session whatever the table size. Received chunks are merged one by one on the
//!   `gossip` service pool.
//!
//! Events of local updates reach subscribers through the gossip thread (within [`TICK_MS`]).
//!
//! Owns the UDP socket, the two threads, the keyring and the subscribers. Must never block
//! a caller of the handle on IO (its methods take the core's lock for microseconds), send a
//! datagram unsealed, or print a key.

use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use parking_lot::{Mutex, RwLock};

use crate::gossip::keyring::{self, Keyring};
use crate::gossip::{self, Gossip, GossipConfig, NodeAddr, UpdateError};
use crate::net::{CallOptions, Router, ServicePool, Transport};
use crate::proto::gossip as pb;
use crate::proto::gossip::rpc;
use crate::proto::objects::EncryptionKey;
use crate::wire::Status;

/// The gossip thread wakes at least this often (the core's clock resolution).
pub const TICK_MS: u64 = 20;
/// The largest datagram read (a sealed packet is at most 1,400 + 29 bytes; larger is
/// garbage, read whole only to be refused).
pub const DATAGRAM_BYTES_MAX: usize = 2048;
/// Events waiting in one subscriber's channel at most; past it the subscriber misses
/// events (counted) and should re-read the tables.
pub const SUBSCRIBER_EVENTS_MAX: usize = 4096;
/// Subscribers at most.
pub const SUBSCRIBERS_MAX: usize = 64;
/// Bulk-sync sessions waiting for the bulk thread at most (the core opens at most 8).
pub const BULK_QUEUE_LEN_MAX: usize = 16;
/// A chunk waits this long at most for the receiver's credit before the session is
/// dropped (a per-chunk watchdog, not one over the whole transfer: swarmkit #3113).
pub const BULK_CHUNK_SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// The serving side waits this long at most for the next chunk.
pub const BULK_CHUNK_RECV_TIMEOUT: Duration = Duration::from_secs(30);
/// Threads serving incoming bulk syncs.
pub const BULK_SERVE_THREADS: usize = 2;
/// Incoming bulk syncs queued at most before new ones are refused (the sender retries in
/// 30 s).
pub const BULK_SERVE_QUEUE_LEN_MAX: usize = 16;
/// On shutdown the node leaves the cluster and keeps gossiping this long (three gossip
/// rounds), so that its departure spreads before it stops.
pub const LEAVE_LINGER: Duration = Duration::from_millis(600);

/// How to run networkdb on this node.
pub struct NetworkDbConfig {
    /// This node's id (unique in the cluster).
    pub node_id: String,
    /// Where the UDP socket and the bulk-sync listener bind.
    pub bind: SocketAddr,
    /// The address other nodes reach this one at (`ip:port`); port 0 takes the bound one.
    pub advertise: SocketAddr,
    /// Gossip addresses to join through (the managers'), read again at each join attempt.
    pub seeds: Box<dyn Fn() -> Vec<String> + Send + Sync>,
    /// The process's transport (bulk sync is served and sent through it).
    pub transport: Arc<Transport>,
    /// This node's server TLS configuration (its certificate).
    pub server_tls: Arc<rustls::ServerConfig>,
    /// Client TLS accepting any node of the cluster ([`crate::ca::tls::peer_client_config_live`]).
    pub peer_tls: Arc<rustls::ClientConfig>,
}

/// Why networkdb could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The port is taken: pick another with `--gossip-listen`.
    #[error(
        "cannot bind the gossip socket on {addr}: {source} (choose another with --gossip-listen)"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The OS refused a thread or a pool.
    #[error("cannot start the gossip threads: {0}")]
    Thread(std::io::Error),
}

/// Counters of the driver (beside the core's [`gossip::Stats`]).
#[derive(Debug, Default)]
pub struct DriverStats {
    /// Datagrams or chunks no key of the keyring opens (another cluster, a key rotated
    /// away, tampering): dropped.
    pub unknown_key: AtomicU64,
    /// Datagrams or chunks too short or of an unknown format: dropped.
    pub malformed: AtomicU64,
    /// Datagrams not sent: no key yet, an unparsable address, or a send error.
    pub send_failed: AtomicU64,
    /// Events a slow subscriber missed.
    pub events_dropped: AtomicU64,
    /// Bulk-sync sessions that failed (the peer unreachable, too slow, or refusing).
    pub bulk_failed: AtomicU64,
    /// Bulk-sync chunks sent.
    pub chunks_sent: AtomicU64,
    /// Bulk-sync chunks received and merged.
    pub chunks_received: AtomicU64,
}

struct Shared {
    core: Mutex<Gossip>,
    keyring: RwLock<Keyring>,
    rng: ring::rand::SystemRandom,
    subscribers: Mutex<Vec<Sender<gossip::Event>>>,
    generation: AtomicU64,
    stop: AtomicBool,
    stats: DriverStats,
    started: Instant,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn seal(&self, kind: keyring::Kind, plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; 12];
        ring::rand::SecureRandom::fill(&self.rng, &mut nonce).ok()?;
        self.keyring.read().seal(kind, nonce, plain).ok()
    }

    fn open(&self, kind: keyring::Kind, sealed: &[u8]) -> Option<Vec<u8>> {
        match self.keyring.read().open(kind, sealed) {
            Ok(plain) => Some(plain),
            Err(keyring::OpenError::UnknownKey) => {
                self.stats.unknown_key.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(keyring::OpenError::Malformed) => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    fn publish(&self, events: Vec<gossip::Event>) {
        if events.is_empty() {
            return;
        }
        self.generation.fetch_add(1, Ordering::Release);
        let mut subscribers = self.subscribers.lock();
        for event in events {
            subscribers.retain(|s| match s.try_send(event.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    self.stats.events_dropped.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            });
        }
    }
}

/// The handle to this node's networkdb (see the module documentation). Cheap to share
/// (`Arc`); [`NetworkDb::shutdown`] stops it.
pub struct NetworkDb {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    threads: Mutex<Vec<JoinHandle<()>>>,
    pool: Mutex<Option<ServicePool>>,
}

impl std::fmt::Debug for NetworkDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkDb")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl NetworkDb {
    /// Binds the gossip socket and listener, starts the threads and joins the cluster
    /// through the seeds (retried every second until one answers). Nothing is sent until
    /// the keyring holds a key ([`NetworkDb::set_network_keys`]).
    ///
    /// # Errors
    /// [`StartError`]: the address is taken, or a thread could not start.
    pub fn start(config: NetworkDbConfig) -> Result<Arc<NetworkDb>, StartError> {
        let socket = UdpSocket::bind(config.bind).map_err(|source| StartError::Bind {
            addr: config.bind,
            source,
        })?;
        let bound = socket.local_addr().map_err(StartError::Thread)?;
        socket
            .set_read_timeout(Some(Duration::from_millis(TICK_MS)))
            .map_err(StartError::Thread)?;
        let mut advertise = config.advertise;
        if advertise.port() == 0 {
            advertise.set_port(bound.port());
        }
        let seed = {
            let mut bytes = [0u8; 8];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
                .map_err(|_| StartError::Thread(std::io::Error::other("no OS randomness")))?;
            u64::from_le_bytes(bytes)
        };
        let core = Gossip::new(
            GossipConfig::new(&config.node_id, NodeAddr(advertise.to_string()), seed),
            0,
        );
        let shared = Arc::new(Shared {
            core: Mutex::new(core),
            keyring: RwLock::new(Keyring::new()),
            rng: ring::rand::SystemRandom::new(),
            subscribers: Mutex::new(Vec::new()),
            generation: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            stats: DriverStats::default(),
            started: Instant::now(),
        });
        let pool = ServicePool::new("gossip", BULK_SERVE_THREADS, BULK_SERVE_QUEUE_LEN_MAX)
            .map_err(StartError::Thread)?;
        let mut router = Router::new();
        let serving = shared.clone();
        router.serve_client_stream(rpc::BULK_SYNC, &pool, move |_ctx, stream| {
            serve_bulk_sync(&serving, stream)
        });
        let tcp_bind = SocketAddr::new(config.bind.ip(), bound.port());
        if let Err(source) =
            config
                .transport
                .listen(tcp_bind, config.server_tls.clone(), Arc::new(router))
        {
            pool.shutdown();
            return Err(StartError::Bind {
                addr: tcp_bind,
                source,
            });
        }
        let (bulk_tx, bulk_rx) = bounded::<(u64, NodeAddr)>(BULK_QUEUE_LEN_MAX);
        let gossip_thread = {
            let shared = shared.clone();
            let seeds = config.seeds;
            std::thread::Builder::new()
                .name("flotilla-gossip".into())
                .spawn(move || gossip_loop(&shared, &socket, &*seeds, &bulk_tx))
                .map_err(StartError::Thread)?
        };
        let bulk_thread = {
            let shared = shared.clone();
            let (transport, tls) = (config.transport.clone(), config.peer_tls.clone());
            std::thread::Builder::new()
                .name("flotilla-gossip-bulk".into())
                .spawn(move || bulk_loop(&shared, &bulk_rx, &transport, &tls))
                .map_err(StartError::Thread)?
        };
        log::info!("networkdb: gossip on {bound} (udp and tcp), advertised as {advertise}");
        Ok(Arc::new(NetworkDb {
            shared,
            local_addr: bound,
            threads: Mutex::new(vec![gossip_thread, bulk_thread]),
            pool: Mutex::new(Some(pool)),
        }))
    }

    /// Where the gossip socket is bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Installs the cluster's network bootstrap keys: the second newest (by Lamport time)
    /// seals while there are two or more, so every node holds the newest before anyone
    /// seals with it; every key opens. Bad keys are skipped (logged, never printed).
    pub fn set_network_keys(&self, mut keys: Vec<EncryptionKey>) {
        keys.sort_by_key(|k| k.lamport_time);
        keys.retain(|k| k.key.len() == keyring::KEY_BYTES);
        let keep = keys.len().saturating_sub(keyring::KEYS_MAX);
        keys.drain(..keep);
        let primary = match keys.len() {
            0 => return,
            1 => &keys[0],
            n => &keys[n - 2],
        };
        let all: Vec<&[u8]> = keys.iter().map(|k| k.key.as_ref()).collect();
        if let Err(error) = self.shared.keyring.write().replace(&primary.key, &all) {
            log::warn!("networkdb: the cluster's gossip keys were refused: {error}");
        }
    }

    /// Keys in the keyring.
    pub fn keys_held(&self) -> usize {
        self.shared.keyring.read().len()
    }

    /// Attaches this node to `network` (it then receives the network's tables).
    ///
    /// # Errors
    /// [`UpdateError::TooLarge`] for a bad name, [`UpdateError::TooManyNetworks`].
    pub fn join_network(&self, network: &str) -> Result<(), UpdateError> {
        self.shared.core.lock().join_network(network)
    }

    /// Detaches this node from `network`: its tables are dropped here and this node's
    /// entries there are removed everywhere.
    pub fn leave_network(&self, network: &str) {
        self.shared.core.lock().leave_network(network);
    }

    /// Writes `value` under `key` of `table` in `network`.
    ///
    /// # Errors
    /// Not attached, a field over its limit, or a full store ([`UpdateError`]).
    pub fn put(
        &self,
        network: &str,
        table: &str,
        key: &str,
        value: Bytes,
    ) -> Result<(), UpdateError> {
        self.shared.core.lock().put(table, network, key, value)
    }

    /// Deletes `key` of `table` in `network` (a tombstone everywhere).
    ///
    /// # Errors
    /// Not attached, or a field over its limit ([`UpdateError`]).
    pub fn delete(&self, network: &str, table: &str, key: &str) -> Result<(), UpdateError> {
        self.shared.core.lock().delete(table, network, key)
    }

    /// The networks this node is attached to.
    pub fn networks(&self) -> Vec<String> {
        self.shared.core.lock().networks().iter().cloned().collect()
    }

    /// The visible entries of `table` in `network` (key, value), as this node sees them.
    pub fn entries(&self, network: &str, table: &str) -> Vec<(String, Bytes)> {
        self.shared
            .core
            .lock()
            .entries(network)
            .into_iter()
            .filter(|(k, _)| k.1 == table)
            .map(|(k, e)| (k.2, e.value))
            .collect()
    }

    /// The visible entries of `table` in `network` with their owners (key, value, owner).
    pub fn entries_with_owner(&self, network: &str, table: &str) -> Vec<(String, Bytes, String)> {
        self.shared
            .core
            .lock()
            .entries(network)
            .into_iter()
            .filter(|(k, _)| k.1 == table)
            .map(|(k, e)| (k.2, e.value, e.owner))
            .collect()
    }

    /// A number that changes whenever an entry this node sees changes (caches compare it).
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }

    /// Entry and member events from now on, in order, on a channel of at most
    /// [`SUBSCRIBER_EVENTS_MAX`] (a subscriber that falls behind misses events, counted in
    /// [`DriverStats::events_dropped`]: re-read the tables then). `None` past
    /// [`SUBSCRIBERS_MAX`].
    pub fn subscribe(&self) -> Option<Receiver<gossip::Event>> {
        let mut subscribers = self.shared.subscribers.lock();
        if subscribers.len() >= SUBSCRIBERS_MAX {
            return None;
        }
        let (tx, rx) = bounded(SUBSCRIBER_EVENTS_MAX);
        subscribers.push(tx);
        Some(rx)
    }

    /// The live members this node sees (names), itself excluded.
    pub fn live_members(&self) -> Vec<String> {
        self.shared
            .core
            .lock()
            .members()
            .filter(|m| m.status == gossip::MemberStatus::Alive)
            .map(|m| m.name.clone())
            .collect()
    }

    /// The driver's counters.
    pub fn stats(&self) -> &DriverStats {
        &self.shared.stats
    }

    /// The core's counters.
    pub fn core_stats(&self) -> gossip::Stats {
        self.shared.core.lock().stats().clone()
    }

    /// Leaves the cluster (the departure gossiped for [`LEAVE_LINGER`]), then stops and
    /// joins both threads and the bulk-sync pool. Idempotent. The listener goes with the
    /// transport (its owner shuts it down after this).
    pub fn shutdown(&self) {
        let threads = std::mem::take(&mut *self.threads.lock());
        if threads.is_empty() {
            return;
        }
        self.shared.core.lock().leave();
        std::thread::sleep(LEAVE_LINGER);
        self.shared.stop.store(true, Ordering::SeqCst);
        for thread in threads {
            if thread.join().is_err() {
                log::error!("a gossip thread panicked");
            }
        }
        if let Some(pool) = self.pool.lock().take() {
            pool.shutdown();
        }
    }
}

impl Drop for NetworkDb {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

fn resolve(addr: &NodeAddr) -> Option<SocketAddr> {
    if let Ok(parsed) = addr.0.parse() {
        return Some(parsed);
    }
    addr.0.to_socket_addrs().ok()?.next()
}

/// The `flotilla-gossip` thread: receive (the timeout is the tick), tick, send.
fn gossip_loop(
    shared: &Shared,
    socket: &UdpSocket,
    seeds: &(dyn Fn() -> Vec<String> + Send + Sync),
    bulk: &Sender<(u64, NodeAddr)>,
) {
    let mut buffer = vec![0u8; DATAGRAM_BYTES_MAX];
    let mut joined = false;
    while !shared.stop.load(Ordering::SeqCst) {
        if !joined && !shared.keyring.read().is_empty() {
            // Join once packets can be sealed; the core retries the seeds every second
            // while nobody answers.
            let seeds: Vec<NodeAddr> = seeds().into_iter().map(NodeAddr).collect();
            shared.core.lock().join(seeds);
            joined = true;
        }
        match socket.recv_from(&mut buffer) {
            Ok((len, from)) => {
                if let Some(plain) = shared.open(keyring::Kind::Packet, &buffer[..len]) {
                    let now = shared.now_ms();
                    shared
                        .core
                        .lock()
                        .receive(&NodeAddr(from.to_string()), &plain, now);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => log::debug!("networkdb: recv: {e}"),
        }
        let output = {
            let mut core = shared.core.lock();
            core.tick(shared.now_ms());
            core.poll_output()
        };
        for (to, packet) in output.packets {
            send_datagram(shared, socket, &to, &packet);
        }
        shared.publish(output.events);
        for session in output.bulk_sessions {
            if bulk.try_send(session.clone()).is_err() {
                shared.core.lock().abort_session(session.0);
                shared.stats.bulk_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn send_datagram(shared: &Shared, socket: &UdpSocket, to: &NodeAddr, packet: &[u8]) {
    let sealed = shared.seal(keyring::Kind::Packet, packet);
    let sent = match (sealed, resolve(to)) {
        (Some(sealed), Some(addr)) => socket.send_to(&sealed, addr).is_ok(),
        _ => false,
    };
    if !sent {
        shared.stats.send_failed.fetch_add(1, Ordering::Relaxed);
    }
}

/// The `flotilla-gossip-bulk` thread: streams each session the core opened, one chunk at a
/// time.
fn bulk_loop(
    shared: &Shared,
    sessions: &Receiver<(u64, NodeAddr)>,
    transport: &Transport,
    tls: &Arc<rustls::ClientConfig>,
) {
    while !shared.stop.load(Ordering::SeqCst) {
        let Ok((session, to)) = sessions.recv_timeout(Duration::from_millis(100)) else {
            continue;
        };
        if let Err(status) = stream_session(shared, session, &to, transport, tls) {
            log::debug!("networkdb: bulk sync {session} to {}: {status}", to.0);
            shared.core.lock().abort_session(session);
            shared.stats.bulk_failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn stream_session(
    shared: &Shared,
    session: u64,
    to: &NodeAddr,
    transport: &Transport,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<(), Status> {
    let channel = transport.channel(&to.0, tls);
    let mut stream = channel.call_client_stream(rpc::BULK_SYNC, CallOptions { timeout: None })?;
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            stream.cancel();
            return Err(Status::unavailable("networkdb is stopping"));
        }
        // One chunk in memory at a time: pulled, sealed, sent, dropped.
        let Some(chunk) = shared.core.lock().next_chunk(session) else {
            break;
        };
        let sealed = shared
            .seal(keyring::Kind::Chunk, &chunk)
            .ok_or_else(|| Status::unavailable("no gossip key yet"))?;
        drop(chunk);
        stream.send_timeout(
            &pb::BulkSyncPart {
                sealed: Bytes::from(sealed),
            },
            BULK_CHUNK_SEND_TIMEOUT,
        )?;
        shared.stats.chunks_sent.fetch_add(1, Ordering::Relaxed);
    }
    stream.finish_timeout(BULK_CHUNK_SEND_TIMEOUT)?;
    Ok(())
}

/// The serving side of `gossip.BulkSync`: each chunk opened and merged as it arrives.
fn serve_bulk_sync(
    shared: &Shared,
    stream: &mut crate::net::ClientStream<pb::BulkSyncPart>,
) -> Result<pb::BulkSyncDone, Status> {
    while let Some(part) = stream.recv_timeout(BULK_CHUNK_RECV_TIMEOUT)? {
        let Some(chunk) = shared.open(keyring::Kind::Chunk, &part.sealed) else {
            return Err(Status::invalid_argument(
                "a bulk-sync chunk no gossip key opens",
            ));
        };
        let now = shared.now_ms();
        shared
            .core
            .lock()
            .receive_chunk(&NodeAddr(String::new()), &chunk, now);
        shared.stats.chunks_received.fetch_add(1, Ordering::Relaxed);
    }
    Ok(pb::BulkSyncDone {})
}

/// The gossip port of a node listening on `port`: the next one (`listen + 1`).
pub fn gossip_port_for(port: u16) -> Option<u16> {
    port.checked_add(1).filter(|p| *p != 0)
}

/// The default gossip address of a manager listening on `listen` (`host:port`): the same
/// host, the next port. This is how agents find their seeds: the managers' gossip addresses.
pub fn default_gossip_addr(listen: &str) -> Option<SocketAddr> {
    let addr = listen.to_socket_addrs().ok()?.next()?;
    Some(SocketAddr::new(addr.ip(), gossip_port_for(addr.port())?))
}

/// `--gossip-listen HOST:PORT`, resolved.
///
/// # Errors
/// Text that names no address, in the user's terms.
pub fn parse_gossip_listen(text: &str) -> Result<SocketAddr, String> {
    text.to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| format!("--gossip-listen {text}: not an address (expected HOST:PORT)"))
}

/// What a node process needs to run networkdb.
pub struct NodeGossip<'a> {
    /// This node's id.
    pub node_id: &'a str,
    /// Where to bind (`None`: port 0 on every interface).
    pub bind: Option<SocketAddr>,
    /// Whether the operator chose `bind` (`--gossip-listen`): then a failure to start stops
    /// the node instead of leaving it without gossip.
    pub explicit: bool,
    /// The IP other nodes reach this one at.
    pub advertise_ip: std::net::IpAddr,
    /// The managers' listen addresses (their gossip addresses are the seeds).
    pub managers: Box<dyn Fn() -> Vec<String> + Send + Sync>,
    /// The process's transport.
    pub transport: &'a Arc<Transport>,
    /// This node's certificate, as presented now.
    pub live: Arc<crate::ca::tls::LiveIdentity>,
    /// The cluster's root certificate.
    pub root: &'a crate::ca::RootCert,
}

/// Starts networkdb for a node process. A failure (the port taken, say) is logged and the
/// node runs without gossip: tasks still run, service discovery sees only this node.
///
/// # Errors
/// Only when the address was chosen by the operator ([`NodeGossip::explicit`]) and
/// networkdb could not start there.
pub fn start_for_node(node: NodeGossip<'_>) -> Result<Option<Arc<NetworkDb>>, StartError> {
    let bind = node
        .bind
        .unwrap_or_else(|| SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0));
    let tls = crate::ca::tls::server_config_live(node.live.clone(), node.root).and_then(|server| {
        crate::ca::tls::peer_client_config_live(node.live.clone(), node.root)
            .map(|client| (server, client))
    });
    let (server_tls, peer_tls) = match tls {
        Ok(configs) => configs,
        Err(error) => {
            log::warn!("networkdb not started: {error}");
            return Ok(None);
        }
    };
    let managers = node.managers;
    let config = NetworkDbConfig {
        node_id: node.node_id.to_string(),
        bind,
        advertise: SocketAddr::new(node.advertise_ip, bind.port()),
        seeds: Box::new(move || {
            managers()
                .iter()
                .filter_map(|m| default_gossip_addr(m))
                .map(|a| a.to_string())
                .collect()
        }),
        transport: node.transport.clone(),
        server_tls: Arc::new(server_tls),
        peer_tls: Arc::new(peer_tls),
    };
    match NetworkDb::start(config) {
        Ok(db) => Ok(Some(db)),
        Err(error) if node.explicit => Err(error),
        Err(error) => {
            log::warn!("networkdb not started, this node runs without gossip: {error}");
            eprintln!("flotilla: warning: {error}; this node runs without gossip");
            Ok(None)
        }
    }
}

/// The gossip driver as the node's network tables (endpoints, DNS): the same operations,
/// with the core's refusals in the tables' terms.
impl crate::netdb::NetworkTables for NetworkDb {
    fn join_network(&self, network: &str) -> Result<(), crate::netdb::TablesError> {
        NetworkDb::join_network(self, network).map_err(tables_error)
    }

    fn leave_network(&self, network: &str) {
        NetworkDb::leave_network(self, network);
    }

    fn put(
        &self,
        network: &str,
        table: &str,
        key: &str,
        value: Bytes,
    ) -> Result<(), crate::netdb::TablesError> {
        NetworkDb::put(self, network, table, key, value).map_err(tables_error)
    }

    fn delete(
        &self,
        network: &str,
        table: &str,
        key: &str,
    ) -> Result<(), crate::netdb::TablesError> {
        NetworkDb::delete(self, network, table, key).map_err(tables_error)
    }

    fn networks(&self) -> Vec<String> {
        NetworkDb::networks(self)
    }

    fn entries(&self, network: &str, table: &str) -> Vec<(String, Bytes)> {
        NetworkDb::entries(self, network, table)
    }

    fn generation(&self) -> u64 {
        NetworkDb::generation(self)
    }
}

fn tables_error(error: UpdateError) -> crate::netdb::TablesError {
    use crate::netdb::TablesError;
    match error {
        UpdateError::NotAttached(network) => TablesError::NotAttached(network),
        UpdateError::TooLarge(what) => TablesError::TooLarge(what),
        UpdateError::TooManyNetworks(n) => TablesError::TooManyNetworks(n),
        UpdateError::Full => TablesError::Full(crate::gossip::table::TABLE_ENTRIES_MAX),
    }
}
