//! Shared fixtures for the transport tests: a cluster CA, node identities, and a test
//! service with one method of each call shape.
#![allow(dead_code, clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crossbeam_channel::{Receiver, Sender};
use flotilla::ca::{CaPolicy, ClusterCa, NodeIdentity, Role, tls};
use flotilla::net::{Allow, Router, ServicePool, Transport, TransportConfig};
use flotilla::wire::Status;

#[derive(Clone, PartialEq, prost::Message)]
pub struct Bytes {
    #[prost(bytes = "vec", tag = "1")]
    pub data: Vec<u8>,
    #[prost(string, tag = "2")]
    pub caller: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Number {
    #[prost(int64, tag = "1")]
    pub value: i64,
}

/// A cluster CA and helpers to mint identities and TLS configs from it.
pub struct Cluster {
    pub ca: ClusterCa,
}

impl Cluster {
    pub fn new() -> Self {
        Self {
            ca: ClusterCa::create(SystemTime::now(), CaPolicy::default()).unwrap(),
        }
    }

    pub fn identity(&self, role: Role) -> NodeIdentity {
        self.ca
            .issue_local_identity(role, SystemTime::now())
            .unwrap()
    }

    pub fn server_tls(&self) -> Arc<rustls::ServerConfig> {
        Arc::new(tls::server_config(&self.identity(Role::Manager), self.ca.root()).unwrap())
    }

    pub fn client_tls(&self, role: Role) -> Arc<rustls::ClientConfig> {
        self.client_tls_for(&self.identity(role))
    }

    pub fn client_tls_for(&self, identity: &NodeIdentity) -> Arc<rustls::ClientConfig> {
        Arc::new(tls::client_config(identity, self.ca.root()).unwrap())
    }
}

/// Short timeouts so that timeout tests finish quickly.
pub fn fast_config() -> TransportConfig {
    TransportConfig {
        handshake_timeout_ms: 500,
        frame_read_timeout_ms: 500,
        idle_timeout_ms: 3_000,
        keepalive_interval_ms: 1_000,
        keepalive_timeout_ms: 1_000,
        backoff_initial_ms: 20,
        backoff_max_ms: 200,
        ..TransportConfig::default()
    }
}

/// What the test service's handlers report to the test.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// `test.Sleep` stopped because its caller went away.
    SleepCancelled,
    /// `test.Sleep` ran to its end.
    SleepFinished,
    /// `test.Count` sent message number n.
    Sent(i64),
    /// `test.Count` stopped with this send error.
    SendFailed(flotilla::wire::Code),
    /// Some handler saw this peer address.
    Peer(SocketAddr),
    /// `test.InlineRecord` received this payload.
    Recorded(Vec<u8>),
}

pub struct TestServer {
    pub transport: Transport,
    pub addr: SocketAddr,
    pub events: Receiver<Event>,
    /// The methods served (for extra listeners).
    pub router: Arc<Router>,
    pool: Option<ServicePool>,
}

impl TestServer {
    pub fn start(cluster: &Cluster, config: TransportConfig) -> Self {
        Self::start_at(cluster, config, "127.0.0.1:0".parse().unwrap())
    }

    pub fn start_at(cluster: &Cluster, config: TransportConfig, addr: SocketAddr) -> Self {
        let (events_tx, events) = crossbeam_channel::unbounded();
        let pool = ServicePool::new("test", 8, 1024).unwrap();
        let router = Arc::new(test_router(&pool, events_tx));
        let transport = Transport::start(config).unwrap();
        let addr = transport
            .listen(addr, cluster.server_tls(), router.clone())
            .unwrap();
        Self {
            transport,
            addr,
            events,
            router,
            pool: Some(pool),
        }
    }

    pub fn target(&self) -> String {
        self.addr.to_string()
    }

    pub fn stop(mut self) {
        let pool = self.pool.take().unwrap();
        let TestServer { transport, .. } = self;
        transport.shutdown();
        pool.shutdown();
    }
}

fn test_router(pool: &ServicePool, events: Sender<Event>) -> Router {
    let mut router = Router::new();
    router.unary("test.Echo", Allow::NODES, pool, |ctx, req: Bytes| {
        Ok(Bytes {
            data: req.data,
            caller: ctx.peer().map(|p| p.node_id.clone()).unwrap_or_default(),
        })
    });
    router.unary(
        "test.ManagersOnly",
        Allow::MANAGERS,
        pool,
        |_, req: Bytes| Ok(req),
    );
    router.unary("test.Bootstrap", Allow::ANYONE, pool, |ctx, _: Bytes| {
        Ok(Bytes {
            data: vec![],
            caller: ctx
                .peer()
                .map(|p| p.node_id.clone())
                .unwrap_or_else(|| "anonymous".into()),
        })
    });
    let sleep_events = events.clone();
    router.unary("test.Sleep", Allow::NODES, pool, move |ctx, req: Number| {
        let until = std::time::Instant::now() + Duration::from_millis(req.value as u64);
        while std::time::Instant::now() < until {
            if let Some(status) = ctx.cancellation() {
                sleep_events.send(Event::SleepCancelled).unwrap();
                return Err(status);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        sleep_events.send(Event::SleepFinished).unwrap();
        Ok(Number { value: req.value })
    });
    let count_events = events.clone();
    router.server_stream(
        "test.Count",
        Allow::NODES,
        pool,
        move |ctx, req: Number, stream| {
            count_events.send(Event::Peer(ctx.peer_addr())).unwrap();
            for i in 0..req.value {
                if let Err(status) = stream.send(&Number { value: i }) {
                    count_events.send(Event::SendFailed(status.code)).unwrap();
                    return Err(status);
                }
                count_events.send(Event::Sent(i)).unwrap();
            }
            Ok(())
        },
    );
    router.unary("test.Discard", Allow::NODES, pool, |_, req: Bytes| {
        Ok(Number {
            value: req.data.len() as i64,
        })
    });
    router.client_stream("test.Sink", Allow::NODES, pool, |_, stream| {
        let mut total = 0;
        while let Some(Bytes { data, .. }) = stream.recv()? {
            total += data.len() as i64;
        }
        Ok(Number { value: total })
    });
    // Inline, and reports what it received (one-way calls get no reply to check).
    let record_events = events.clone();
    router.unary_inline("test.InlineRecord", Allow::NODES, move |_, req: Bytes| {
        record_events
            .send(Event::Recorded(req.data.clone()))
            .unwrap();
        Ok(req)
    });
    // Runs on the reactor thread itself.
    router.unary_inline("test.InlineEcho", Allow::NODES, |ctx, req: Bytes| {
        Ok(Bytes {
            data: req.data,
            caller: ctx.peer().map(|p| p.node_id.clone()).unwrap_or_default(),
        })
    });
    // Answers after `value` ms from another thread; a negative value drops the responder.
    router.unary_deferred(
        "test.Later",
        Allow::NODES,
        pool,
        |_, req: Number, responder| {
            std::thread::spawn(move || {
                if req.value < 0 {
                    drop(responder);
                    return;
                }
                std::thread::sleep(Duration::from_millis(req.value as u64));
                responder.respond(Ok(Number { value: req.value }));
            });
        },
    );
    // Counts messages, allowing at most 200 ms between two of them.
    router.client_stream("test.Paced", Allow::NODES, pool, |_, stream| {
        let mut count = 0;
        while let Some(Number { .. }) = stream.recv_timeout(Duration::from_millis(200))? {
            count += 1;
        }
        Ok(Number { value: count })
    });
    // Reads nothing for `value` ms, so the uploader runs out of credit.
    router.client_stream("test.Stall", Allow::NODES, pool, |_, stream| {
        let Some(Number { value }) = stream.recv()? else {
            return Ok(Number { value: 0 });
        };
        std::thread::sleep(Duration::from_millis(value as u64));
        while let Some(Number { .. }) = stream.recv()? {}
        Ok(Number { value })
    });
    router.client_stream("test.Sum", Allow::NODES, pool, |_, stream| {
        let mut sum = 0;
        while let Some(Number { value }) = stream.recv()? {
            if value < 0 {
                return Err(Status::invalid_argument(format!("negative value {value}")));
            }
            sum += value;
        }
        Ok(Number { value: sum })
    });
    router
}

/// A loopback address no one listens on yet.
pub fn free_addr() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string()
}

/// A one-member Raft group that has become its own leader, with what must outlive it.
pub struct SoloLeader {
    pub node: flotilla::raft::node::RaftNode,
    pub transport: Arc<Transport>,
    pub dir: tempfile::TempDir,
}

/// Starts `machine` as the only member of a new group (`config` names it) and waits up to
/// 20 s until it leads.
pub fn start_solo_leader(
    config: flotilla::raft::node::NodeConfig,
    machine: Box<dyn flotilla::raft::node::StateMachine>,
) -> SoloLeader {
    let ca = Cluster::new();
    let identity = ca.identity(Role::Manager);
    let transport = Arc::new(Transport::start(TransportConfig::default()).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let node = flotilla::raft::node::RaftNode::start(
        config,
        dir.path(),
        machine,
        transport.clone(),
        ca.client_tls_for(&identity),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !node
        .handle()
        .status(Duration::from_secs(1))
        .is_ok_and(|s| s.is_leader)
    {
        assert!(std::time::Instant::now() < deadline, "no leadership");
        std::thread::sleep(Duration::from_millis(20));
    }
    SoloLeader {
        node,
        transport,
        dir,
    }
}
