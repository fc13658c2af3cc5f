//! A running manager process: the transport and its listener, the CA service (every
//! manager: the founder loads the key from disk, the others install it from the replicated
//! Cluster object), the revocation check on every call, the certificate renewer, and (with the Raft issues) the Raft node.
//!
//! Owns the start order and the shutdown barrier. Must never acknowledge anything itself:
//! it only wires components together and stops them in the documented order.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use super::state::ManagerState;
use crate::agent::endpoints::{NodeNetworking, endpoint_ip};
use crate::agent::session::AgentConfig;
use crate::agent::{Agent, AgentError, RunnerConfig};
use crate::ca::{
    CaError, CaPolicy, CaService, ClusterCa, FailureLimits, NodeIdentity, RootCert, SharedCa,
    StorageError, load_node_files, tls,
};
use crate::ca_rpc::renewal::{Renewer, RenewerConfig, RenewerSetup};
use crate::control::duties::{Duties, SelfReport};
use crate::control::roles::wants_worker;
use crate::control::{self, ControlApi, ControlDeps};
use crate::dispatcher::Dispatcher;
use crate::net::{Router, ServicePool, Transport, TransportConfig};
use crate::orchestrator::Orchestrator;
use crate::proto::objects::NodeRole;
use crate::raft::node::service::RaftPools;
use crate::raft::node::{Bootstrap, NodeConfig, NodeHandle, NodeStartError, RaftNode};
use crate::raft::storage::StorageError as StorageFailure;
use crate::state_dir::{Settings, StateDir, StateDirError};
use crate::store::StoreConfig;
use crate::timer::Timers;

/// Threads serving the CA's methods (joins and renewals are rare and cheap).
pub const CA_POOL_THREADS: usize = 2;
/// Queued CA calls before new ones are refused with `ResourceExhausted`.
pub const CA_POOL_QUEUE_LEN_MAX: usize = 256;
/// Threads serving `kv.*` (writes only queue a proposal; reads may wait for the leader).
pub const KV_POOL_THREADS: usize = 4;
/// Queued `kv.*` calls before new ones are refused with `ResourceExhausted`.
pub const KV_POOL_QUEUE_LEN_MAX: usize = 4096;
/// Threads serving dispatcher calls (a session opening blocks its thread on recording the
/// node ready; status reports are batched and answered later, without a waiting thread;
/// an opened session is state in the dispatcher's table, served by its one thread).
pub const DISPATCHER_POOL_THREADS: usize = 4;
/// Queued dispatcher calls before new ones are refused with `ResourceExhausted`.
pub const DISPATCHER_POOL_QUEUE_LEN_MAX: usize = 1024;
/// Connections a manager holds at most (accepted and dialed): one per agent session it can
/// serve ([`crate::dispatcher::SESSIONS_MAX`]) plus room for peers, forwarded calls and
/// operators. The transport's own default (4,096) would refuse the 4,097th agent.
pub const CONNECTIONS_MAX: usize = crate::dispatcher::SESSIONS_MAX + 1024;
/// Fewest connections a manager accepts whatever its open-files limit (peers, operators and
/// a few agents); below this the limit is a misconfiguration, reported at start.
pub const CONNECTIONS_MIN: usize = 256;
/// File descriptors kept out of the connection cap for everything else a manager opens:
/// its storage (fjall's journal and tables, snapshots), pipes and its own agent's tasks.
/// A socket must never take the descriptor a storage write needs.
pub const OPEN_FILES_RESERVE: usize = 1024;

/// Why a manager could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The state directory was never initialized.
    #[error(
        "{0} holds no flotilla node; create one with `flotilla init` or `flotilla join`, or \
         use `flotilla up`"
    )]
    NotInitialized(String),
    /// The state directory lost data (or a file that says how much it holds): starting
    /// would lose what this manager acknowledged.
    #[error(
        "the state in {dir} is damaged: {problem}. The manager did not start, so that \
         nothing it acknowledged is lost. To recover, either:\n  \
         - restore {dir} from a backup taken while the manager was stopped; or\n  \
         - if other managers of this cluster are running: `flotilla rejoin --state-dir {dir} \
         --token <manager token> <manager address>` (`flotilla join-token manager` on a \
         running manager prints the token): this manager leaves the Raft group and joins it \
         again with an empty log, catching up from the others (the damaged Raft files are \
         kept in {dir}/raft.damaged-<time>); or\n  \
         - if this is the cluster's only manager and there is no backup: `flotilla repair \
         --state-dir {dir}` says what is left, and with `--accept-loss` starts over from it \
         (what the log lost stays lost)"
    )]
    Damaged {
        /// The state directory.
        dir: String,
        /// What is damaged, in the operator's terms.
        problem: String,
    },
    /// The node's identity (certificate, key, root) is unreadable in an initialized
    /// directory.
    #[error(
        "the node identity in {dir}/node cannot be used: {problem}. Without it this manager \
         cannot prove who it is. Restore {dir}/node from a backup; or, if other managers are \
         running, remove this one there (`flotilla manager rm {raft_id:x}`) and add a new \
         manager from an empty state directory (`flotilla join`)"
    )]
    IdentityDamaged {
        /// The state directory.
        dir: String,
        /// This manager's Raft id.
        raft_id: u64,
        /// Why it cannot be used.
        problem: String,
    },
    /// The cluster demoted this node to worker; it cannot resume as a manager.
    #[error(
        "{dir} belongs to node {node} that the cluster demoted to worker: it runs as a worker \
         now (`flotilla run --state-dir {dir}` or `flotilla agent --state-dir {dir}`), and \
         becomes a manager again in place after `flotilla node promote {node}` on a manager"
    )]
    Demoted {
        /// The state directory.
        dir: String,
        /// The node's id.
        node: String,
    },
    /// The settings or tokens could not be read.
    #[error(transparent)]
    StateDir(#[from] StateDirError),
    /// The identity files could not be read.
    #[error(transparent)]
    Identity(#[from] StorageError),
    /// The CA key bundle could not be read.
    #[error("cannot load the cluster CA: {0}")]
    Ca(#[from] CaError),
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The Raft node could not start.
    #[error(transparent)]
    Raft(#[from] NodeStartError),
    /// This node's agent (task runner and dispatcher session) could not start.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// networkdb could not start on the address given with `--gossip-listen`.
    #[error(transparent)]
    Gossip(#[from] crate::networkdb::StartError),
    /// A socket or thread could not be set up.
    #[error("{what}: {source}")]
    Io {
        /// What was being set up.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The CA a founder serves from its `ca/` file and `join-tokens`. Both are copies: the key
/// and the tokens are replicated in the Cluster object, and a manager without them installs
/// them from there (control duties). So a missing or unreadable copy does not stop the
/// manager; it is logged, and the replicated one is used.
fn founder_ca(dir: &StateDir) -> SharedCa {
    if !dir.ca_file().exists() {
        return SharedCa::empty();
    }
    let loaded = ClusterCa::load(&dir.ca_file(), CaPolicy::default())
        .map_err(|e| e.to_string())
        .and_then(|ca| {
            let tokens = dir.load_tokens().map_err(|e| e.to_string())?;
            Ok((ca, tokens))
        });
    match loaded {
        Ok((ca, tokens)) => SharedCa::with(Arc::new(CaService::new(
            ca,
            tokens,
            FailureLimits::default(),
        ))),
        Err(reason) => {
            log::error!(
                "the cluster CA files in {} cannot be used ({reason}); this manager serves the \
                 CA key and join tokens replicated in the cluster state instead (if the \
                 cluster never replicated them, restore {} from a backup)",
                dir.root().display(),
                dir.ca_file().display()
            );
            SharedCa::empty()
        }
    }
}

fn damaged(dir: &StateDir, problem: String) -> StartError {
    StartError::Damaged {
        dir: dir.root().display().to_string(),
        problem,
    }
}

/// A Raft start failure in the operator's terms: storage that is damaged or unreadable
/// says so, with the ways to recover.
fn raft_start_error(dir: &StateDir, error: NodeStartError) -> StartError {
    match error {
        NodeStartError::Damaged { problem, .. } => damaged(dir, problem),
        NodeStartError::Storage(StorageFailure::Fjall(e)) => damaged(
            dir,
            format!(
                "the Raft log's database in {} cannot be opened (fjall: {e})",
                crate::raft::storage::current_log_dir(&dir.raft_dir())
                    .unwrap_or_else(|_| dir.raft_dir())
                    .display()
            ),
        ),
        NodeStartError::Storage(StorageFailure::CorruptLog(reason)) => {
            damaged(dir, format!("the Raft log contradicts itself ({reason})"))
        }
        NodeStartError::Storage(e) if e.is_fatal() => damaged(
            dir,
            format!(
                "the Raft state in {} cannot be read ({e})",
                dir.raft_dir().display()
            ),
        ),
        other => StartError::Raft(other),
    }
}

/// The manager's transport settings: the connection cap sized on the open-files limit,
/// which is raised first (soft limit up to the hard one) so that a manager can hold
/// [`CONNECTIONS_MAX`] sockets where the system allows it.
fn transport_config() -> TransportConfig {
    let wanted = (CONNECTIONS_MAX + OPEN_FILES_RESERVE) as u64;
    let soft = match crate::util::fdlimit::raise_open_files_limit(wanted) {
        Ok(limit) => {
            if limit.soft < wanted {
                log::warn!(
                    "the open-files limit is {} (hard limit {}): this manager accepts at most \
                     {} connections, so fewer agents than its {} sessions; raise the hard \
                     limit to {wanted} (`LimitNOFILE={wanted}` in a systemd unit, \
                     `ulimit -Hn {wanted}` as root)",
                    limit.soft,
                    limit.hard,
                    connections_cap(limit.soft),
                    crate::dispatcher::SESSIONS_MAX
                );
            }
            limit.soft
        }
        Err(e) => {
            log::warn!("cannot read or raise the open-files limit: {e}");
            crate::util::fdlimit::open_files_limit().map_or(1024, |limit| limit.soft)
        }
    };
    TransportConfig {
        connections_max: connections_cap(soft),
        ..TransportConfig::default()
    }
}

/// Connections allowed under an open-files limit of `open_files`: what the limit leaves
/// after [`OPEN_FILES_RESERVE`], within [`CONNECTIONS_MIN`]..=[`CONNECTIONS_MAX`].
fn connections_cap(open_files: u64) -> usize {
    usize::try_from(open_files)
        .unwrap_or(usize::MAX)
        .saturating_sub(OPEN_FILES_RESERVE)
        .clamp(CONNECTIONS_MIN, CONNECTIONS_MAX)
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StartError {
    let what = what.into();
    move |source| StartError::Io { what, source }
}

/// How long a removed manager waits for each former peer it asks whether it was demoted.
pub const DEMOTION_QUERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Why a manager stopped by itself ([`Manager::shutdown_after_stop`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// The cluster demoted this manager to worker: it left the Raft group and its state
    /// directory is marked so that `run` refuses it (see [`StateDir::mark_demoted`]).
    Demoted {
        /// This node's id.
        node_id: String,
    },
    /// Removed from the group by `manager rm`, a storage failure, …: the reason.
    Fatal(String),
}

/// A running manager. Stop it with [`Manager::shutdown`].
pub struct Manager {
    dir: StateDir,
    settings: Settings,
    identity: NodeIdentity,
    listen_addr: SocketAddr,
    transport: Arc<Transport>,
    client_tls: Arc<rustls::ClientConfig>,
    renewer: Option<Renewer>,
    register: Option<super::register::Registrar>,
    raft: Option<RaftNode>,
    raft_pools: Option<RaftPools>,
    pools: Vec<ServicePool>,
    state: ManagerState,
    control: Arc<ControlApi>,
    dispatcher: Arc<Dispatcher>,
    duties: Option<Duties>,
    orchestrator: Option<Orchestrator>,
    agent: Option<Agent>,
    /// networkdb (gossip), when its socket could be bound.
    networkdb: Option<Arc<crate::networkdb::NetworkDb>>,
    /// The `flotilla-timers` thread: deadlines of control writes.
    timers: Timers,
    /// The state directory's process lock, held while the manager runs (dropped last).
    _lock: crate::state_dir::StateDirLock,
}

impl Manager {
    /// Starts the manager whose state is in `dir`.
    ///
    /// # Errors
    /// [`StartError`]: an uninitialized or unreadable directory, an address in use, …
    pub fn start(dir: &StateDir) -> Result<Manager, StartError> {
        Self::start_with(dir, NodeNetworking::local_only())
    }

    /// Starts the manager whose state is in `dir`, its node publishing endpoints in
    /// `networking`'s tables (the process's, shared with its DNS responder).
    ///
    /// # Errors
    /// As [`Manager::start`].
    pub fn start_with(dir: &StateDir, networking: NodeNetworking) -> Result<Manager, StartError> {
        if !dir.root().exists() {
            // Not even created: nothing to lock (locking would create it).
            return Err(StartError::NotInitialized(dir.root().display().to_string()));
        }
        let lock = dir.lock()?;
        if !dir.is_initialized() {
            if dir.has_raft_state() {
                return Err(damaged(
                    dir,
                    format!(
                        "{} is missing, but {} holds the Raft state of a manager that ran here",
                        dir.settings_file().display(),
                        dir.raft_dir().display()
                    ),
                ));
            }
            return Err(StartError::NotInitialized(dir.root().display().to_string()));
        }
        let settings = dir.load_settings_upgrading(&lock)?;
        let (identity, root) =
            load_node_files(&dir.node_dir()).map_err(|source| StartError::IdentityDamaged {
                dir: dir.root().display().to_string(),
                raft_id: settings.raft_id,
                problem: match source {
                    StorageError::Missing { path } => format!("{} is missing", path.display()),
                    other => other.to_string(),
                },
            })?;
        if dir.is_demoted() {
            return Err(StartError::Demoted {
                dir: dir.root().display().to_string(),
                node: identity.node_id().to_string(),
            });
        }
        restrict_raft_dir(dir)?;
        let transport = Arc::new(
            Transport::start(transport_config()).map_err(io_error("cannot start the transport"))?,
        );
        let ca_pool = ServicePool::new("ca", CA_POOL_THREADS, CA_POOL_QUEUE_LEN_MAX)
            .map_err(io_error("cannot start the CA service threads"))?;
        // Renewed certificates go in here and are presented from the next handshake on.
        let live = tls::LiveIdentity::new(&identity, &root)?;
        let client_tls = Arc::new(tls::client_config_live(live.clone(), &root)?);
        let machine = ManagerState::new(StoreConfig::default(), settings.kv_enabled);
        let mut node_config = NodeConfig::new(
            settings.raft_id,
            settings.advertise_addr.clone(),
            settings.bootstrap,
        );
        if let Some(entries) = settings.snapshot_interval_entries {
            node_config.snapshot_interval_entries = entries;
        }
        if let Some(mib) = settings.log_memtable_mib {
            node_config.storage.memtable_bytes_max = mib << 20;
        }
        // `init` and `join` created the watermark: without it, nothing tells a whole log
        // from one that lost its files.
        node_config.watermark_required = true;
        let raft = RaftNode::start(
            node_config,
            &dir.raft_dir(),
            Box::new(machine.clone()),
            transport.clone(),
            client_tls.clone(),
        )
        .map_err(|e| raft_start_error(dir, e))?;
        let raft_pools = RaftPools::start().map_err(io_error("cannot start the raft threads"))?;
        let mut router = Router::new();
        crate::raft::node::service::register(
            &mut router,
            &raft_pools,
            raft.handle(),
            &raft.store(),
        );
        // The key-value map is a fixture of tests and benchmarks: served only when
        // manager.conf turns it on.
        let kv_pool = match &machine.kv {
            Some(kv) => {
                let pool = ServicePool::new("kv", KV_POOL_THREADS, KV_POOL_QUEUE_LEN_MAX)
                    .map_err(io_error("cannot start the kv service threads"))?;
                crate::kv::register(
                    &mut router,
                    &pool,
                    raft.handle(),
                    kv,
                    &transport,
                    &client_tls,
                );
                Some(pool)
            }
            None => None,
        };
        // The founder holds the CA key on disk; every other manager receives it with the
        // replicated Cluster object (control duties install it into this slot).
        let ca_service = Arc::new(founder_ca(dir));
        let store = machine.store.clone();
        let roles: crate::ca_rpc::RoleResolver = Arc::new(move |caller| {
            match store.get::<crate::proto::objects::Node>(&caller.node_id) {
                Some(node) => control::roles::certificate_role(&node),
                None => Ok(caller.role),
            }
        });
        crate::ca_rpc::register_shared(&mut router, &ca_pool, &ca_service, root.clone(), roles);
        // Every call with a certificate is checked against the revocations this manager
        // has applied (removed nodes, demoted managers, revoked admin certificates).
        let access = machine.access.clone();
        router.set_authorizer(Arc::new(move |method, caller| access.check(method, caller)));
        let control_pool = ServicePool::new(
            "control",
            control::CONTROL_POOL_THREADS,
            control::CONTROL_POOL_QUEUE_LEN_MAX,
        )
        .map_err(io_error("cannot start the control service threads"))?;
        let timers = Timers::start("timers").map_err(io_error("cannot start the timer thread"))?;
        let control = ControlApi::new(
            raft.handle().clone(),
            machine.store.clone(),
            ControlDeps {
                transport: transport.clone(),
                client_tls: client_tls.clone(),
                ca: ca_service,
                access: machine.access.clone(),
                root: root.clone(),
                tokens_file: Arc::new(dir.clone()),
                continuations: control_pool.continuations(),
                timers: timers.clone(),
                tables: Arc::clone(&networking.tables),
            },
        );
        control::register(&mut router, &control_pool, &control);
        let dispatcher_pool = ServicePool::new(
            "dispatcher",
            DISPATCHER_POOL_THREADS,
            DISPATCHER_POOL_QUEUE_LEN_MAX,
        )
        .map_err(io_error("cannot start the dispatcher service threads"))?;
        let dispatcher = Dispatcher::new(raft.handle().clone(), machine.store.clone());
        dispatcher.register(&mut router, &dispatcher_pool);
        control::logs::register(&mut router, &control_pool, &control, dispatcher.clone());
        dispatcher
            .start()
            .map_err(io_error("cannot start the dispatcher threads"))?;
        let store = machine.store.clone();
        raft.handle().set_join_gate(Arc::new(move |node_id| {
            control::roles::join_allowed(&store, node_id)
        }));
        let listen_addr = resolve(&settings.listen_addr)?;
        let server_tls = Arc::new(tls::server_config_live(live.clone(), &root)?);
        let router = Arc::new(router);
        transport
            .listen_local(&dir.control_socket(), server_tls.clone(), router.clone())
            .map_err(io_error(format!(
                "cannot listen on {}",
                dir.control_socket().display()
            )))?;
        let listen_addr = transport
            .listen(listen_addr, server_tls, router)
            .map_err(io_error(format!(
                "cannot listen on {}",
                settings.listen_addr
            )))?;
        log::info!(
            "manager {} (raft id {:x}) listening on {listen_addr}",
            identity.node_id(),
            settings.raft_id
        );
        let networkdb = start_networkdb(
            (&settings, networking.gossip_listen),
            &identity,
            &root,
            &live,
            &transport,
            &raft,
        )?;
        let renewer = start_renewer(dir, &settings, &transport, &identity, &root, live)?;
        let duties = Duties::start(
            control.clone(),
            SelfReport {
                node_id: identity.node_id().to_string(),
                raft_id: settings.raft_id,
                addr: settings.advertise_addr.clone(),
                snapshot_interval_override: settings.snapshot_interval_entries,
            },
        )
        .map_err(io_error("cannot start the control duties thread"))?;
        let orchestrator =
            Orchestrator::start(raft.handle().clone(), machine.store.as_ref().clone())
                .map_err(io_error("cannot start the orchestrator thread"))?;
        let register = match (&settings.bootstrap, &settings.join_addr) {
            (Bootstrap::Join, Some(join_addr)) => Some(
                super::register::Registrar::start(
                    raft.handle().clone(),
                    transport.clone(),
                    client_tls.clone(),
                    join_addr.clone(),
                )
                .map_err(io_error("cannot start the registration thread"))?,
            ),
            _ => None,
        };
        // Endpoints and the DNS responder read the gossiped tables once networkdb runs.
        if let Some(db) = &networkdb {
            networking.use_tables(db.clone());
        }
        let agent = start_agent(
            dir,
            &settings,
            &transport,
            &client_tls,
            raft.handle(),
            (&networking, identity.node_id()),
            networkdb.as_ref(),
        )?;
        Ok(Manager {
            dir: dir.clone(),
            settings,
            identity,
            listen_addr,
            transport,
            client_tls,
            renewer: Some(renewer),
            register,
            raft: Some(raft),
            raft_pools: Some(raft_pools),
            pools: [
                Some(ca_pool),
                kv_pool,
                Some(control_pool),
                Some(dispatcher_pool),
            ]
            .into_iter()
            .flatten()
            .collect(),
            state: machine,
            control,
            dispatcher,
            duties: Some(duties),
            orchestrator: Some(orchestrator),
            agent: Some(agent),
            networkdb,
            timers,
            _lock: lock,
        })
    }

    /// The address the listener is bound to.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    /// This manager's settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// This manager's node identity (as loaded at start).
    pub fn identity(&self) -> &NodeIdentity {
        &self.identity
    }

    /// The replicated state (object store and key-value map) as applied locally.
    pub fn state(&self) -> &ManagerState {
        &self.state
    }

    /// The control API.
    pub fn control(&self) -> &Arc<ControlApi> {
        &self.control
    }

    /// The Raft node's handle.
    pub fn raft(&self) -> &NodeHandle {
        self.raft
            .as_ref()
            .expect("the raft node lives until shutdown")
            .handle()
    }

    /// Why the manager stopped by itself (removed from the cluster, storage failure).
    pub fn fatal(&self) -> Option<String> {
        self.raft.as_ref().and_then(|r| r.handle().fatal())
    }

    /// Runs [`Manager::shutdown`] and says why the manager had stopped by itself, if it
    /// had: a manager removed from the group whose Node object (as applied here, once the
    /// apply thread has finished) wants the worker role was demoted, and its state
    /// directory is marked so ([`StateDir::mark_demoted`]).
    ///
    /// # Errors
    /// [`StateDirError`] if the demotion marker cannot be written.
    pub fn shutdown_after_stop(self) -> Result<Option<Stopped>, StateDirError> {
        let fatal = self.fatal();
        let removed = self.raft().was_removed();
        let (dir, store) = (self.dir.clone(), self.state.store.clone());
        let node_id = self.identity.node_id().to_string();
        // A manager that was down while it was demoted never applied its demotion: its
        // former peers know (asked while the transport still runs).
        let told_by_peers =
            removed && !wants_worker(&store, &node_id) && self.peers_say_demoted(&node_id);
        // Where a demoted node's agent finds the managers: its former peers.
        let me = self.raft().id();
        let peers: Vec<String> = self
            .raft()
            .directory()
            .all()
            .into_iter()
            .filter(|(raft_id, _)| *raft_id != me)
            .map(|(_, addr)| addr)
            .collect();
        self.shutdown();
        let Some(reason) = fatal else {
            return Ok(None);
        };
        if !(removed && (told_by_peers || wants_worker(&store, &node_id))) {
            return Ok(Some(Stopped::Fatal(reason)));
        }
        if !peers.is_empty() {
            dir.save_managers(&peers)?;
        }
        dir.mark_demoted(&node_id)?;
        log::info!("node {node_id} was demoted to worker; its manager role stopped");
        Ok(Some(Stopped::Demoted { node_id }))
    }

    /// Asks the other managers this one knew (one at a time, until one answers) whether
    /// `node_id` is meant to be a worker.
    fn peers_say_demoted(&self, node_id: &str) -> bool {
        use crate::proto::control as pb;
        let me = self.raft().id();
        for (raft_id, addr) in self.raft().directory().all() {
            if raft_id == me {
                continue;
            }
            let reply: Result<pb::NodeResponse, _> =
                self.transport.channel(&addr, &self.client_tls).call(
                    pb::rpc::GET_NODE,
                    &pb::GetNodeRequest {
                        reference: node_id.to_string(),
                    },
                    crate::net::CallOptions::timeout(DEMOTION_QUERY_TIMEOUT),
                );
            match reply {
                Ok(reply) => {
                    return reply
                        .node
                        .and_then(|n| n.spec)
                        .is_some_and(|s| s.desired_role == NodeRole::Worker as i32);
                }
                Err(status) => log::debug!("{addr} cannot say whether we were demoted: {status}"),
            }
        }
        false
    }

    /// The shutdown barrier, in order: this node's agent (its session, then its task
    /// processes), the orchestrator thread, the control duties thread, the registrar and the
    /// renewer (they call through the transport), the Raft node (its own barrier: peers,
    /// apply, log writer), the transport (in-flight calls fail `Unavailable`, connections
    /// close, the reactor is joined), the control watch threads and the dispatcher's thread
    /// and timers, then the service pools (queued calls drain, threads are joined).
    pub fn shutdown(mut self) {
        if let Some(agent) = self.agent.take() {
            agent.stop();
        }
        if let Some(networkdb) = self.networkdb.take() {
            networkdb.shutdown();
        }
        if let Some(orchestrator) = self.orchestrator.take() {
            orchestrator.stop();
        }
        if let Some(duties) = self.duties.take() {
            duties.stop();
        }
        if let Some(register) = self.register.take() {
            register.stop();
        }
        if let Some(renewer) = self.renewer.take() {
            renewer.stop();
        }
        if let Some(raft) = self.raft.take() {
            raft.shutdown();
        }
        self.transport.shutdown();
        // After the transport: a watch thread blocked sending to a caller that stopped
        // reading is released by the transport's shutdown, never waited for before it.
        self.control.shutdown();
        // Then the dispatcher's thread and timers (it never waits on a stream).
        self.dispatcher.shutdown();
        if let Some(pools) = self.raft_pools.take() {
            pools.shutdown();
        }
        for pool in self.pools.drain(..) {
            pool.shutdown();
        }
        // Last: every write was answered or dropped with its pool; a deadline left is
        // dropped unrun.
        self.timers.stop();
        log::info!("manager {} stopped", self.identity.node_id());
    }
}

/// Makes the Raft directory private to its owner (0700) before the node opens it: its log
/// and snapshots hold the replicated state, the cluster CA key included. (`init` and `join`
/// create it so; this also covers a directory made by an older version or by hand.)
fn restrict_raft_dir(dir: &StateDir) -> Result<(), StartError> {
    use std::os::unix::fs::PermissionsExt;
    let raft_dir = dir.raft_dir();
    let what = format!("cannot restrict {} to its owner", raft_dir.display());
    std::fs::DirBuilder::new()
        .recursive(true)
        .create(&raft_dir)
        .map_err(io_error(what.clone()))?;
    std::fs::set_permissions(&raft_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_error(what))
}

fn resolve(addr: &str) -> Result<SocketAddr, StartError> {
    addr.to_socket_addrs()
        .map_err(io_error(format!("cannot resolve {addr}")))?
        .next()
        .ok_or_else(|| StartError::Io {
            what: format!("{addr} resolves to no address"),
            source: std::io::Error::from(std::io::ErrorKind::AddrNotAvailable),
        })
}

/// Starts this manager's own agent (swarmkit's managers are nodes too): its tasks live
/// under the state directory, and its session goes to the leader this manager knows of,
/// or to this manager while it knows none.
fn start_agent(
    dir: &StateDir,
    settings: &Settings,
    transport: &Arc<Transport>,
    client_tls: &Arc<rustls::ClientConfig>,
    raft: &NodeHandle,
    (networking, node_id): (&NodeNetworking, &str),
    networkdb: Option<&Arc<crate::networkdb::NetworkDb>>,
) -> Result<Agent, StartError> {
    let raft = raft.clone();
    let own_addr = settings.advertise_addr.clone();
    let managers = Box::new(move || {
        let leader = raft.leader().and_then(|id| raft.directory().addr(id));
        let mut addrs: Vec<String> = leader.into_iter().collect();
        if !addrs.contains(&own_addr) {
            addrs.push(own_addr.clone());
        }
        addrs
    });
    let session = AgentConfig {
        managers,
        // Its Raft node knows the leader better than any list.
        remember_managers: None,
        tls: client_tls.clone(),
        hostname: crate::util::hostname(),
        network_keys: networkdb.map(crate::agent::runtime::keys_into),
        last_contact: Some(crate::agent::last_contact::LastContact::in_dir(dir.root())),
    };
    let mut runner = RunnerConfig::new(dir.tasks_dir());
    if let Some(tasks) = settings.tasks_running_max {
        runner.tasks_running_max = usize::try_from(tasks).unwrap_or(usize::MAX);
    }
    networking.configure(&mut runner, node_id, endpoint_ip(&settings.advertise_addr));
    Ok(Agent::start(transport.clone(), session, runner)?)
}

/// networkdb on `--gossip-listen`, else the listen address's IP, port + 1 (advertised on
/// the advertise address's IP); the seeds are the Raft group's members (their gossip
/// addresses, port + 1). A default port taken is logged and the manager runs without gossip;
/// an explicit one stops it.
fn start_networkdb(
    (settings, gossip_listen): (&Settings, Option<std::net::SocketAddr>),
    identity: &NodeIdentity,
    root: &RootCert,
    live: &Arc<tls::LiveIdentity>,
    transport: &Arc<Transport>,
    raft: &RaftNode,
) -> Result<Option<Arc<crate::networkdb::NetworkDb>>, StartError> {
    let Some(bind) =
        gossip_listen.or_else(|| crate::networkdb::default_gossip_addr(&settings.listen_addr))
    else {
        log::warn!(
            "no gossip port next to {}: this manager runs without gossip",
            settings.listen_addr
        );
        return Ok(None);
    };
    let advertise_ip = crate::networkdb::default_gossip_addr(&settings.advertise_addr)
        .map_or(bind.ip(), |a| a.ip());
    let handle = raft.handle().clone();
    Ok(crate::networkdb::start_for_node(
        crate::networkdb::NodeGossip {
            node_id: identity.node_id(),
            bind: Some(bind),
            explicit: gossip_listen.is_some(),
            advertise_ip,
            managers: Box::new(move || handle.directory().all().into_values().collect()),
            transport,
            live: live.clone(),
            root,
        },
    )?)
}

fn start_renewer(
    dir: &StateDir,
    settings: &Settings,
    transport: &Arc<Transport>,
    identity: &NodeIdentity,
    root: &RootCert,
    live: Arc<tls::LiveIdentity>,
) -> Result<Renewer, StartError> {
    let setup = RenewerSetup {
        transport: transport.clone(),
        managers: vec![settings.advertise_addr.clone()],
        state_dir: dir.node_dir(),
        identity: identity.clone(),
        root: root.clone(),
    };
    Renewer::start(setup, RenewerConfig::default(), move |renewed| {
        match live.set(renewed) {
            Ok(()) => log::info!(
                "certificate renewed; presented from now on, valid until {:?}",
                renewed.not_after()
            ),
            Err(error) => log::error!("cannot present the renewed certificate: {error}"),
        }
    })
    .map_err(io_error("cannot start the certificate renewer"))
}

#[cfg(test)]
mod connection_cap_tests {
    use super::*;

    #[test]
    fn the_connection_cap_leaves_the_reserve_to_storage_and_stays_in_bounds() {
        // A common hard limit: what is left after the reserve.
        assert_eq!(connections_cap(20_000), 20_000 - OPEN_FILES_RESERVE);
        // Enough for every session the dispatcher serves: the cap, no more.
        assert_eq!(connections_cap(u64::MAX), CONNECTIONS_MAX);
        // A tiny limit (1,024, the usual soft default) still lets peers and operators in.
        assert_eq!(connections_cap(1024), CONNECTIONS_MIN);
        assert_eq!(connections_cap(0), CONNECTIONS_MIN);
    }
}
