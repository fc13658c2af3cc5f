//! `flotilla agent`: runs this machine as a worker node. The first run joins the cluster
//! with a worker join token (the node's identity then lives in `<state-dir>/node`, the
//! managers to call in `<state-dir>/managers`, rewritten whenever a session names the
//! managers of the day); every run then keeps a dispatcher session
//! with the leader and runs the tasks assigned here until SIGINT or SIGTERM, which stops
//! them.
//!
//! Role changes keep the node (its id, its state directory): each heartbeat answer says
//! which role the cluster gives the node's certificate. When it differs from the
//! certificate's, the agent renews at once (the CA issues the new role). Promoted (the
//! cluster wants a manager and the certificate says manager), the agent stops and returns
//! [`AgentExit::Promoted`]: the caller turns the directory into a manager's and runs the
//! manager, which joins the Raft group. That needs an address to listen on as a manager
//! (`--listen`, remembered in `<state-dir>/agent.conf`; a demoted manager's directory has
//! its old one); without it the node stays a worker and says so. A demoted manager's
//! directory runs as an agent too, with its manager certificate until the CA issues it a
//! worker's.
//!
//! Must never hold component logic: it sets up `ca`, `net` and `agent` and waits.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::last_contact::LastContact;
use super::session::AgentConfig;
use super::{Agent, RunnerConfig};
use crate::ca::{Role, load_node_files, save_node_files, tls};
use crate::ca_rpc::join_cluster;
use crate::ca_rpc::renewal::{Renewer, RenewerConfig, RenewerSetup};
use crate::net::{Transport, TransportConfig};

/// How long joining the cluster may take.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Managers remembered at most.
const MANAGERS_MAX: usize = 64;

/// The file in the state directory with the addresses the node uses once promoted.
const AGENT_CONF_FILE: &str = "agent.conf";
/// How long the agent waits for a role renewal before asking again.
const ROLE_RENEWAL_RETRY: Duration = Duration::from_secs(5);
/// How often the agent checks for signals and role changes.
const AGENT_POLL: Duration = Duration::from_millis(100);

/// What `flotilla agent` was given.
pub struct AgentArgs {
    /// The node's state directory.
    pub state_dir: PathBuf,
    /// The worker join token, for the first run.
    pub token: Option<String>,
    /// Managers to call (replaces the remembered list when given).
    pub managers: Vec<String>,
    /// Where to listen once promoted to manager (remembered when given).
    pub listen: Option<String>,
    /// The address other managers dial once promoted (default: `listen`).
    pub advertise: Option<String>,
    /// The node's network tables and DNS responder (they live as long as the process).
    pub networking: super::endpoints::NodeNetworking,
    /// Where networkdb's gossip (UDP and bulk-sync TCP) binds: default the `listen` port
    /// + 1 when `listen` is known, else a port the OS picks (advertised in the gossip).
    pub gossip_listen: Option<String>,
}

/// How an agent run ended.
#[derive(Debug)]
pub enum AgentExit {
    /// SIGINT or SIGTERM: the tasks were stopped.
    Stopped,
    /// The cluster promoted the node and its certificate is a manager's now: run it as a
    /// manager with these addresses, joining through `join_addr`.
    Promoted(ManagerAddrs),
}

/// Where a promoted node listens and is reached, and whom it joins through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManagerAddrs {
    /// The address the manager listens on.
    pub listen: String,
    /// The address other managers dial.
    pub advertise: String,
    /// A manager to join the Raft group through (the leader the agent's session was with,
    /// else the first remembered manager).
    pub join_addr: String,
}

/// Runs the agent until a signal.
///
/// # Errors
/// What to fix, as a message: no manager named, no token on a first run, a manager token,
/// a state directory of a manager, an unreachable manager, …
pub fn run(args: AgentArgs) -> Result<AgentExit, String> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let managers = managers(&args)?;
    let dir = crate::state_dir::StateDir::new(&args.state_dir);
    if dir.is_initialized() && !dir.is_demoted() {
        return Err(format!(
            "{} is a manager's state directory; run it with `flotilla run --state-dir {}`",
            args.state_dir.display(),
            args.state_dir.display()
        ));
    }
    // One process per state directory: a second agent (or a manager) is refused here.
    let _lock = dir.lock().map_err(|e| e.to_string())?;
    let promotion = promotion_addrs(&args)?;
    let transport = Arc::new(
        Transport::start(TransportConfig::default())
            .map_err(|e| format!("cannot start the transport: {e}"))?,
    );
    let outcome = run_with(&args, managers, promotion, &transport, &mut signals);
    transport.shutdown();
    outcome
}

fn run_with(
    args: &AgentArgs,
    managers: Vec<String>,
    promotion: Option<(String, String)>,
    transport: &Arc<Transport>,
    signals: &mut signal_hook::iterator::Signals,
) -> Result<AgentExit, String> {
    let node_dir = args.state_dir.join("node");
    let (identity, root) = identity(args, &node_dir, &managers, transport)?;
    remember_managers(&args.state_dir, &managers)?;
    let live = tls::LiveIdentity::new(&identity, &root).map_err(|e| e.to_string())?;
    let networkdb = start_networkdb(args, &identity, &root, &live, &managers, transport)?;
    let client_tls =
        Arc::new(tls::client_config_live(live.clone(), &root).map_err(|e| e.to_string())?);
    // The role of the certificate presented now (the renewer's callback updates it).
    let role = Arc::new(parking_lot::Mutex::new(identity.role()));
    let renewed_role = role.clone();
    let renewer = Renewer::start(
        RenewerSetup {
            transport: transport.clone(),
            managers: managers.clone(),
            state_dir: node_dir,
            identity: identity.clone(),
            root,
        },
        RenewerConfig::default(),
        move |renewed| match live.set(renewed) {
            Ok(()) => {
                *renewed_role.lock() = renewed.role();
                log::info!(
                    "certificate renewed ({}); presented from now on, valid until {:?}",
                    renewed.role(),
                    renewed.not_after()
                );
            }
            Err(error) => log::error!("cannot present the renewed certificate: {error}"),
        },
    )
    .map_err(|e| format!("cannot start the certificate renewer: {e}"))?;
    let listed = managers.join(", ");
    let join_addr = managers[0].clone();
    let dir = crate::state_dir::StateDir::new(&args.state_dir);
    let session = AgentConfig {
        managers: Box::new(move || managers.clone()),
        // The managers each session names replace those given, here and in the file a
        // restarted agent reads.
        remember_managers: Some(Box::new(move |addrs: &[String]| {
            if let Err(error) = dir.save_managers(addrs) {
                log::warn!("agent: cannot remember the managers: {error}");
            }
        })),
        tls: client_tls,
        hostname: crate::util::hostname(),
        network_keys: networkdb.as_ref().map(keys_into),
        last_contact: Some(LastContact::in_dir(&args.state_dir)),
    };
    let mut runner = RunnerConfig::new(args.state_dir.join("tasks"));
    // Its tasks are reached at the address other nodes know it by: the one it advertises,
    // else the one it reaches the managers from.
    let reached_at = args
        .advertise
        .as_ref()
        .or(args.listen.as_ref())
        .unwrap_or(&join_addr);
    // Endpoints and the DNS responder read the gossiped tables once networkdb runs.
    if let Some(db) = &networkdb {
        args.networking.use_tables(db.clone());
    }
    args.networking.configure(
        &mut runner,
        identity.node_id(),
        super::endpoints::endpoint_ip(reached_at),
    );
    let agent = Agent::start(transport.clone(), session, runner).map_err(|e| e.to_string())?;
    println!(
        "flotilla agent {} running the tasks assigned to it (managers: {listed})",
        identity.node_id()
    );
    let mut watch = RoleWatch {
        dir: &args.state_dir,
        promotion,
        join_addr,
        asked_at: None,
        warned: false,
    };
    let exit = loop {
        if let Some(signal) = signals.pending().next() {
            log::info!("signal {signal} received; stopping the tasks and the agent");
            break AgentExit::Stopped;
        }
        if let Some(mut promoted) = watch.step(agent.certificate_role(), *role.lock(), &renewer) {
            // Join through the leader the session is with: a remembered manager may have
            // been demoted since.
            if let Some(leader) = agent.manager_addr() {
                promoted.join_addr = leader;
            }
            log::info!(
                "node {} was promoted to manager: stopping the agent to run as a manager",
                identity.node_id()
            );
            break AgentExit::Promoted(promoted);
        }
        std::thread::sleep(AGENT_POLL);
    };
    agent.stop();
    if let Some(networkdb) = &networkdb {
        networkdb.shutdown();
    }
    renewer.stop();
    Ok(exit)
}

/// The session hands the cluster's gossip keys to networkdb.
pub(crate) fn keys_into(
    networkdb: &Arc<crate::networkdb::NetworkDb>,
) -> super::session::NetworkKeysCallback {
    let networkdb = networkdb.clone();
    Arc::new(move |keys| networkdb.set_network_keys(keys))
}

/// Where the gossip binds: `--gossip-listen` (this run's, else the node's), else the
/// `listen` port + 1, else port 0.
fn gossip_bind(args: &AgentArgs) -> Result<Option<std::net::SocketAddr>, String> {
    if let Some(addr) = &args.gossip_listen {
        return crate::networkdb::parse_gossip_listen(addr).map(Some);
    }
    if let Some(addr) = args.networking.gossip_listen {
        return Ok(Some(addr));
    }
    Ok(args
        .listen
        .as_deref()
        .and_then(crate::networkdb::default_gossip_addr))
}

fn start_networkdb(
    args: &AgentArgs,
    identity: &crate::ca::NodeIdentity,
    root: &crate::ca::RootCert,
    live: &Arc<tls::LiveIdentity>,
    managers: &[String],
    transport: &Arc<Transport>,
) -> Result<Option<Arc<crate::networkdb::NetworkDb>>, String> {
    let bind = gossip_bind(args)?;
    let advertise_ip = managers
        .first()
        .and_then(|m| super::host::local_addr_towards(m))
        .and_then(|ip| ip.parse().ok())
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    let seeds = managers.to_vec();
    let explicit = args.gossip_listen.is_some() || args.networking.gossip_listen.is_some();
    crate::networkdb::start_for_node(crate::networkdb::NodeGossip {
        node_id: identity.node_id(),
        bind,
        explicit,
        advertise_ip,
        managers: Box::new(move || seeds.clone()),
        transport,
        live: live.clone(),
        root,
    })
    .map_err(|error| error.to_string())
}

/// Follows the role the cluster gives the node: renews when the certificate's differs, and
/// says when the node is a manager now.
struct RoleWatch<'a> {
    dir: &'a Path,
    /// Listen and advertise addresses for the manager role, if known.
    promotion: Option<(String, String)>,
    join_addr: String,
    /// When a role renewal was last asked for.
    asked_at: Option<std::time::Instant>,
    /// Whether the missing listen address was reported.
    warned: bool,
}

impl RoleWatch<'_> {
    /// One check: `wanted` is the latest heartbeat's role, `current` the certificate's.
    fn step(
        &mut self,
        wanted: Option<Role>,
        current: Role,
        renewer: &Renewer,
    ) -> Option<ManagerAddrs> {
        let wanted = wanted?;
        if wanted == Role::Manager && self.promotion.is_none() {
            if !self.warned {
                self.warned = true;
                log::error!(
                    "this node was promoted to manager, but has no address to listen on as \
                     one: it stays a worker until it is restarted with `flotilla agent \
                     --state-dir {} --listen HOST:PORT [--advertise HOST:PORT]`",
                    self.dir.display()
                );
            }
            return None;
        }
        if wanted != current {
            let due = self
                .asked_at
                .is_none_or(|at| at.elapsed() >= ROLE_RENEWAL_RETRY);
            if due {
                log::info!("the cluster makes this node a {wanted}: renewing its certificate");
                self.asked_at = Some(std::time::Instant::now());
                renewer.renew_now();
            }
            return None;
        }
        if wanted != Role::Manager {
            return None;
        }
        let (listen, advertise) = self.promotion.clone()?;
        Some(ManagerAddrs {
            listen,
            advertise,
            join_addr: self.join_addr.clone(),
        })
    }
}

/// The listen and advertise addresses for the manager role: given now (then remembered in
/// `agent.conf`), remembered, or a demoted manager's own (`manager.conf`).
fn promotion_addrs(args: &AgentArgs) -> Result<Option<(String, String)>, String> {
    let path = args.state_dir.join(AGENT_CONF_FILE);
    if let Some(listen) = &args.listen {
        let advertise = args.advertise.clone().unwrap_or_else(|| listen.clone());
        let text = format!("listen_addr = {listen}\nadvertise_addr = {advertise}\n");
        crate::util::fsutil::write_atomic(&path, text.as_bytes(), 0o600)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        return Ok(Some((listen.clone(), advertise)));
    }
    if args.advertise.is_some() {
        return Err("--advertise needs --listen".into());
    }
    if let Ok(text) = std::fs::read_to_string(&path) {
        let value = |key: &str| {
            text.lines()
                .filter_map(|l| l.split_once('='))
                .find(|(k, _)| k.trim() == key)
                .map(|(_, v)| v.trim().to_string())
        };
        return match (value("listen_addr"), value("advertise_addr")) {
            (Some(listen), Some(advertise)) => Ok(Some((listen, advertise))),
            _ => Err(format!(
                "{} is corrupt: it needs `listen_addr = HOST:PORT` and `advertise_addr = \
                 HOST:PORT`; fix it, or delete it and pass --listen",
                path.display()
            )),
        };
    }
    let dir = crate::state_dir::StateDir::new(&args.state_dir);
    if dir.is_initialized() {
        let settings = dir.load_settings().map_err(|e| e.to_string())?;
        return Ok(Some((settings.listen_addr, settings.advertise_addr)));
    }
    Ok(None)
}

/// The managers to call: those given, else those remembered.
fn managers(args: &AgentArgs) -> Result<Vec<String>, String> {
    let managers = if args.managers.is_empty() {
        std::fs::read_to_string(crate::state_dir::StateDir::new(&args.state_dir).managers_file())
            .unwrap_or_default()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    } else {
        args.managers.clone()
    };
    if managers.is_empty() {
        return Err("name a manager to call with --manager HOST:PORT".into());
    }
    if managers.len() > MANAGERS_MAX {
        return Err(format!("name at most {MANAGERS_MAX} managers"));
    }
    Ok(managers)
}

/// The node's identity: loaded, or obtained with the worker token on a first run.
fn identity(
    args: &AgentArgs,
    node_dir: &Path,
    managers: &[String],
    transport: &Transport,
) -> Result<(crate::ca::NodeIdentity, crate::ca::RootCert), String> {
    if node_dir.join(crate::ca::NODE_IDENTITY_FILE).exists() {
        // A manager certificate here belongs to a demoted manager (the CA renews it as a
        // worker's once the demotion is complete) or to a node promoted before it became a
        // manager (it becomes one now).
        return load_node_files(node_dir).map_err(|e| e.to_string());
    }
    let token = args.token.as_deref().ok_or_else(|| {
        format!(
            "{} is not a node yet: pass --token <worker token> (`flotilla join-token worker` \
             on a manager prints it)",
            args.state_dir.display()
        )
    })?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(node_dir)
        .map_err(|e| format!("cannot create {}: {e}", node_dir.display()))?;
    let mut last_error = String::new();
    for manager in managers {
        match join_cluster(transport, manager, token, JOIN_TIMEOUT) {
            Ok((identity, root)) if identity.role() == Role::Worker => {
                save_node_files(node_dir, &identity, &root).map_err(|e| e.to_string())?;
                log::info!("joined the cluster as worker {}", identity.node_id());
                return Ok((identity, root));
            }
            Ok(_) => {
                return Err(
                    "that is a manager join token: a manager joins with `flotilla join`; give \
                     the agent the worker token (`flotilla join-token worker`)"
                        .into(),
                );
            }
            Err(error) => last_error = format!("{manager}: {error}"),
        }
    }
    Err(format!("cannot join the cluster: {last_error}"))
}

fn remember_managers(state_dir: &Path, managers: &[String]) -> Result<(), String> {
    crate::state_dir::StateDir::new(state_dir)
        .save_managers(managers)
        .map_err(|e| e.to_string())
}
