//! The `flotilla` command line: argument parsing and the commands that start or set up a
//! node. Each command prints what the operator needs next (join tokens, addresses) on
//! stdout, and errors on stderr with a hint of what to do.
//!
//! Must never hold component logic: commands call into `manager`, `ca` and `raft`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod control;
pub mod json;

pub use control::{ManagerCommand, watch};

use crate::agent::endpoints::NodeNetworking;
use crate::agent::runtime as agent;
use crate::ca::{JoinTokens, Role};
use crate::dns::server::DnsServer;
use crate::manager::first_start::Untouched;
use crate::manager::{self, Manager, Settings, StateDir};
use crate::net::{Transport, TransportConfig};
use crate::raft::node::Bootstrap;

/// Address managers listen on unless told otherwise.
pub const LISTEN_ADDR_DEFAULT: &str = "127.0.0.1:4242";
/// State directory of `flotilla up`.
pub const UP_STATE_DIR_DEFAULT: &str = "./flotilla-state";
/// State directory of `flotilla agent`.
pub const AGENT_STATE_DIR_DEFAULT: &str = "./flotilla-agent";

/// Exit code of a command that failed (a write it reports as failed did not happen).
pub const EXIT_FAILED: u8 = 1;
/// Exit code of a command whose write may or may not have happened: an attempt was sent and
/// its answer lost (a manager died, a deadline passed), and the retries that followed could
/// not learn the outcome. (2 is a usage error, from the argument parser.)
pub const EXIT_OUTCOME_UNKNOWN: u8 = 3;

/// Why a command failed; it decides the exit code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// It failed; a write it reports did not happen ([`EXIT_FAILED`]).
    #[error("{0}")]
    Failed(String),
    /// A write may or may not have happened ([`EXIT_OUTCOME_UNKNOWN`]).
    #[error("{0}")]
    OutcomeUnknown(String),
}

impl From<String> for CommandError {
    fn from(message: String) -> Self {
        CommandError::Failed(message)
    }
}

impl CommandError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            CommandError::Failed(_) => EXIT_FAILED,
            CommandError::OutcomeUnknown(_) => EXIT_OUTCOME_UNKNOWN,
        })
    }
}

/// flotilla: a small, fast, secure cluster orchestrator (the control plane of Docker swarm
/// mode, rebuilt for constrained hosts).
#[derive(Parser, Debug)]
#[command(name = "flotilla", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a single-node cluster in ./flotilla-state: created on first use, resumed after.
    /// It listens on --listen (default 127.0.0.1:4242) for other nodes and remote commands,
    /// and on <state-dir>/control.sock for commands on this machine.
    Up {
        /// Where the cluster's state lives.
        #[arg(long, default_value = UP_STATE_DIR_DEFAULT)]
        state_dir: PathBuf,
        /// Address to listen on (host:port) when the cluster is created [default:
        /// 127.0.0.1:4242]. A cluster that exists keeps its address (`listen_addr` in
        /// manager.conf): a different --listen is refused, with how to move it.
        #[arg(long)]
        listen: Option<String>,
        /// The node's DNS responder and gossip address.
        #[command(flatten)]
        dns: NodeNetArgs,
    },
    /// Create a new cluster with this node as its first manager, print the join tokens and
    /// run it.
    Init {
        /// The new manager's state directory and addresses.
        #[command(flatten)]
        node: NewManagerArgs,
        /// The node's DNS responder and gossip address.
        #[command(flatten)]
        dns: NodeNetArgs,
    },
    /// Join an existing cluster as a manager, using a manager join token, and run.
    Join {
        /// The new manager's state directory and addresses.
        #[command(flatten)]
        node: NewManagerArgs,
        /// The join token (`flotilla join-token manager` on a manager prints it).
        #[arg(long)]
        token: String,
        /// Address of any manager of the cluster (host:port).
        manager: String,
        /// The node's DNS responder and gossip address.
        #[command(flatten)]
        dns: NodeNetArgs,
    },
    /// Run this machine as a worker node: join with a worker token on the first run, then
    /// run the tasks the cluster assigns here until interrupted (which stops them).
    Agent {
        /// The node's state directory (identity, remembered managers, tasks).
        #[arg(long, default_value = AGENT_STATE_DIR_DEFAULT)]
        state_dir: PathBuf,
        /// The worker join token, for the first run (`flotilla join-token worker` on a
        /// manager prints it).
        #[arg(long)]
        token: Option<String>,
        /// A manager's address (host:port); repeat for several. Remembered for later runs.
        #[arg(long = "manager")]
        managers: Vec<String>,
        /// The address to listen on once the cluster promotes this node to manager
        /// (host:port; remembered). Without it, a promoted node stays a worker and says so.
        #[arg(long)]
        listen: Option<String>,
        /// The address other managers dial once it is a manager (default: --listen).
        #[arg(long)]
        advertise: Option<String>,
        /// The node's DNS responder and gossip address.
        #[command(flatten)]
        dns: NodeNetArgs,
    },
    /// Resume the node whose state is in the state directory: a manager, or a demoted one
    /// as a worker (which becomes a manager again, in place, once promoted).
    Run {
        /// The node's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// The node's DNS responder and gossip address.
        #[command(flatten)]
        dns: NodeNetArgs,
    },
    /// Bring back a manager whose Raft state is damaged or lost, from the other managers:
    /// it leaves the Raft group and joins it again with an empty log (same node id and
    /// settings, a new Raft id), then runs. The damaged Raft files are kept in
    /// `<state dir>/raft.damaged-<time>`.
    Rejoin {
        /// The damaged manager's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// The cluster's manager join token (`flotilla join-token manager` on a running
        /// manager prints it).
        #[arg(long)]
        token: String,
        /// Address of a running manager of the cluster (host:port).
        manager: String,
        /// The node's DNS responder and gossip address.
        #[command(flatten)]
        dns: NodeNetArgs,
    },
    /// Say what is left of a manager's damaged Raft state; with `--accept-loss`, make the
    /// manager start from it. Only for a cluster's single manager: a manager with peers
    /// uses `flotilla rejoin`.
    Repair {
        /// The manager's state directory.
        #[arg(long, default_value = UP_STATE_DIR_DEFAULT)]
        state_dir: PathBuf,
        /// Accept losing what the Raft log no longer holds, and start over from the rest.
        #[arg(long)]
        accept_loss: bool,
    },
    /// Inspect and change the managers (the Raft group).
    Manager {
        /// How to reach a manager.
        #[command(flatten)]
        connection: control::Connection,
        /// What to do.
        #[command(subcommand)]
        command: ManagerCommand,
    },
    /// Create, list, inspect, scale, update and remove services.
    Service {
        /// How to reach a manager.
        #[command(flatten)]
        connection: control::Connection,
        /// What to do.
        #[command(subcommand)]
        command: Box<control::ServiceCommand>,
    },
    /// List, inspect, update, promote, demote and remove nodes.
    Node {
        /// How to reach a manager.
        #[command(flatten)]
        connection: control::Connection,
        /// What to do.
        #[command(subcommand)]
        command: control::NodeCommand,
    },
    /// Create, list, inspect and remove networks (service discovery: `<service>.<network>`
    /// resolves on the nodes running its tasks).
    Network {
        /// How to reach a manager.
        #[command(flatten)]
        connection: control::Connection,
        /// What to do.
        #[command(subcommand)]
        command: control::NetworkCommand,
    },
    /// Create, list, inspect and remove secrets (files of mode 0400 under
    /// `$FLOTILLA_SECRETS_DIR` for the tasks of services given `--secret NAME`; a value is
    /// never shown).
    Secret {
        /// How to reach a manager.
        #[command(flatten)]
        connection: control::Connection,
        /// What to do.
        #[command(subcommand)]
        command: control::ValueCommand,
    },
    /// Create, list, inspect and remove configs (files of mode 0444 under
    /// `$FLOTILLA_CONFIGS_DIR` for the tasks of services given `--config NAME`).
    Config {
        /// How to reach a manager.
        #[command(flatten)]
        connection: control::Connection,
        /// What to do.
        #[command(subcommand)]
        command: control::ValueCommand,
    },
    /// List and inspect tasks.
    Task {
        /// How to reach a manager.
        #[command(flatten)]
        connection: control::Connection,
        /// What to do.
        #[command(subcommand)]
        command: control::TaskCommand,
    },
    /// Inspect and change cluster-wide settings.
    Cluster {
        /// How to reach a manager.
        #[command(flatten)]
        connection: control::Connection,
        /// What to do.
        #[command(subcommand)]
        command: control::ClusterCommand,
    },
    /// Print (or rotate, then print) the worker or manager join token.
    JoinToken {
        /// How to reach a manager.
        #[command(flatten)]
        connection: control::Connection,
        /// `worker` or `manager`.
        #[arg(value_enum)]
        role: control::TokenRole,
        /// Replace the token first (the old one stops working; the other role's stays).
        #[arg(long)]
        rotate: bool,
    },
    /// Admin certificates: client certificates for operating the cluster remotely.
    AdminCert {
        /// How to reach a manager.
        #[command(flatten)]
        connection: control::Connection,
        /// What to do.
        #[command(subcommand)]
        command: control::AdminCertCommand,
    },
    /// Stream changes to the cluster's objects until interrupted (Ctrl-C), following
    /// leader changes and manager failures without a gap or a duplicate.
    Watch {
        /// How to reach a manager.
        #[command(flatten)]
        connection: control::Connection,
        /// Which changes.
        #[command(flatten)]
        filter: watch::WatchArgs,
    },
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            error.exit_code()
        }
    }
}

fn execute(command: Command) -> Result<(), CommandError> {
    match command {
        Command::Up {
            state_dir,
            listen,
            dns,
        } => {
            let dir = StateDir::new(state_dir.clone());
            if dir.is_initialized() {
                refuse_other_listen(&dir, listen.as_deref())?;
                let net = dns.start()?;
                return Ok(serve(&dir, &net.networking)?);
            }
            let node = NewManagerArgs {
                state_dir,
                listen: listen.unwrap_or_else(|| LISTEN_ADDR_DEFAULT.to_string()),
                advertise: None,
                snapshot_interval_entries: None,
                kv_enabled: false,
            };
            let net = dns.start()?;
            Ok(init_and_serve(&dir, &node.settings(None), &net.networking)?)
        }
        Command::Init { node, dns } => {
            let dir = StateDir::new(node.state_dir.clone());
            let net = dns.start()?;
            Ok(init_and_serve(&dir, &node.settings(None), &net.networking)?)
        }
        Command::Join {
            node,
            token,
            manager,
            dns,
        } => {
            let dir = StateDir::new(node.state_dir.clone());
            let settings = node.settings(Some(&manager));
            // Before a certificate is asked for or anything is written.
            probe_listen(&settings.listen_addr)?;
            let transport = Transport::start(TransportConfig::default())
                .map_err(|e| format!("cannot start the transport: {e}"))?;
            let joined = manager::join(&dir, &settings, &transport, &token, &manager);
            transport.shutdown();
            joined.map_err(|e| e.to_string())?;
            let net = dns.start()?;
            Ok(serve(&dir, &net.networking)?)
        }
        Command::Run { state_dir, dns } => {
            let net = dns.start()?;
            Ok(serve(&StateDir::new(state_dir), &net.networking)?)
        }
        Command::Rejoin {
            state_dir,
            token,
            manager,
            dns,
        } => {
            let dir = StateDir::new(state_dir);
            let transport = Transport::start(TransportConfig::default())
                .map_err(|e| format!("cannot start the transport: {e}"))?;
            let rejoined = manager::rejoin_damaged(&dir, &transport, &token, &manager);
            transport.shutdown();
            let rejoined = rejoined.map_err(|e| e.to_string())?;
            if let Some(id) = rejoined.removed_raft_id {
                println!("removed the old Raft member {id:x} from the cluster");
            }
            if let Some(aside) = &rejoined.set_aside {
                println!("kept the old Raft state in {}", aside.display());
            }
            println!(
                "rejoining as Raft member {:x}; catching up from the other managers",
                rejoined.settings.raft_id
            );
            let net = dns.start()?;
            Ok(serve(&dir, &net.networking)?)
        }
        Command::Repair {
            state_dir,
            accept_loss,
        } => Ok(repair(&StateDir::new(state_dir), accept_loss)?),
        Command::Agent {
            state_dir,
            token,
            managers,
            listen,
            advertise,
            dns,
        } => {
            let net = dns.start()?;
            Ok(run_agent(agent::AgentArgs {
                state_dir,
                token,
                managers,
                listen,
                advertise,
                networking: net.networking.clone(),
                gossip_listen: dns.gossip_listen.clone(),
            })?)
        }
        Command::Manager {
            connection,
            command,
        } => control::run(&connection, control::ControlCommand::Manager(command)),
        Command::Service {
            connection,
            command,
        } => control::run(&connection, control::ControlCommand::Service(command)),
        Command::Node {
            connection,
            command,
        } => control::run(&connection, control::ControlCommand::Node(command)),
        Command::Task {
            connection,
            command,
        } => control::run(&connection, control::ControlCommand::Task(command)),
        Command::Network {
            connection,
            command,
        } => control::run(&connection, control::ControlCommand::Network(command)),
        Command::Secret {
            connection,
            command,
        } => control::run(
            &connection,
            control::ControlCommand::Value(control::ValueKind::Secret, command),
        ),
        Command::Config {
            connection,
            command,
        } => control::run(
            &connection,
            control::ControlCommand::Value(control::ValueKind::Config, command),
        ),
        Command::Cluster {
            connection,
            command,
        } => control::run(&connection, control::ControlCommand::Cluster(command)),
        Command::JoinToken {
            connection,
            role,
            rotate,
        } => control::run(
            &connection,
            control::ControlCommand::JoinToken { role, rotate },
        ),
        Command::AdminCert {
            connection,
            command,
        } => control::run(&connection, control::ControlCommand::AdminCert(command)),
        Command::Watch { connection, filter } => {
            control::run(&connection, control::ControlCommand::Watch(filter))
        }
    }
}

/// `--dns-listen` and `--gossip-listen`: where the node's DNS responder answers and where its
/// gossip binds (every command that runs a node).
#[derive(clap::Args, Debug, Clone)]
pub struct NodeNetArgs {
    /// Where the node's DNS responder answers (UDP, IP:PORT), or `none` for no responder.
    /// Given explicitly, an address in use stops the node; the default, taken by another
    /// node on this host, is skipped with a warning.
    #[arg(long, value_name = "IP:PORT")]
    pub dns_listen: Option<String>,
    /// Where networkdb's gossip binds (UDP, and TCP for bulk sync; HOST:PORT), not
    /// remembered: give it at every start. Default: the listen port + 1 (an agent without
    /// --listen: a port the OS picks). Other nodes look for a manager's gossip at its listen
    /// port + 1 first; a manager whose gossip binds elsewhere is found through the others.
    #[arg(long, value_name = "HOST:PORT")]
    pub gossip_listen: Option<String>,
}

/// The node's networking for the process's lifetime: its tables and, if it runs, its DNS
/// responder (stopped when this is dropped).
pub struct NodeNet {
    /// The tables and the resolver's address, handed to the node.
    pub networking: NodeNetworking,
    /// The responder's thread.
    pub dns: Option<DnsServer>,
}

impl NodeNetArgs {
    /// The process's tables and DNS responder.
    ///
    /// # Errors
    /// A bad `--dns-listen` or `--gossip-listen`, or an explicit DNS address that cannot be
    /// bound.
    pub fn start(&self) -> Result<NodeNet, String> {
        let mut networking = NodeNetworking::local_only();
        networking.gossip_listen = self
            .gossip_listen
            .as_deref()
            .map(crate::networkdb::parse_gossip_listen)
            .transpose()?;
        let (text, explicit) = match self.dns_listen.as_deref() {
            Some("none") => {
                return Ok(NodeNet {
                    networking,
                    dns: None,
                });
            }
            Some(text) => (text, true),
            None => (crate::dns::DNS_LISTEN_DEFAULT, false),
        };
        let addr = crate::dns::server::parse_listen(text).map_err(|e| e.to_string())?;
        let dns = match DnsServer::start(addr, std::sync::Arc::clone(&networking.tables)) {
            Ok(server) => Some(server),
            Err(error) if !explicit => {
                log::warn!("{error}; this node runs without a DNS responder");
                eprintln!("flotilla: warning: {error}; this node runs without a DNS responder");
                None
            }
            Err(error) => return Err(error.to_string()),
        };
        networking.dns_addr = dns.as_ref().map(DnsServer::local_addr);
        Ok(NodeNet { networking, dns })
    }
}

/// What `init` and `join` both take: where the new manager lives and how it is reached.
#[derive(clap::Args, Debug)]
pub struct NewManagerArgs {
    /// Where this manager's state lives (must not hold a node yet).
    #[arg(long)]
    state_dir: PathBuf,
    /// Address to listen on (host:port).
    #[arg(long, default_value = LISTEN_ADDR_DEFAULT)]
    listen: String,
    /// Address other nodes use to reach this one (default: the listen address).
    #[arg(long)]
    advertise: Option<String>,
    /// Pin this manager's applied Raft entries between snapshots (a founder's pin is also
    /// the new cluster's setting); without it, `cluster update --snapshot-interval` applies.
    #[arg(long)]
    snapshot_interval_entries: Option<u64>,
    /// Serve the replicated key-value map (`kv.*`), the fixture of tests and benchmarks
    /// (`kv_enabled = true` in manager.conf).
    #[arg(long, hide = true)]
    kv_enabled: bool,
}

impl NewManagerArgs {
    /// The `manager.conf` of a manager that founds a cluster (`join_addr` `None`) or joins
    /// one through `join_addr`.
    fn settings(&self, join_addr: Option<&str>) -> Settings {
        Settings {
            raft_id: manager::random_raft_id(),
            listen_addr: self.listen.clone(),
            advertise_addr: self
                .advertise
                .clone()
                .unwrap_or_else(|| self.listen.clone()),
            bootstrap: if join_addr.is_some() {
                Bootstrap::Join
            } else {
                Bootstrap::NewCluster
            },
            join_addr: join_addr.map(str::to_string),
            snapshot_interval_entries: self.snapshot_interval_entries,
            log_memtable_mib: None,
            tasks_running_max: None,
            kv_enabled: self.kv_enabled,
        }
    }
}

fn print_tokens(tokens: &JoinTokens) {
    println!("To add a manager to this cluster, run on the new node:");
    println!(
        "    flotilla join --state-dir DIR --listen ADDR --token {} MANAGER_ADDR",
        tokens.token(Role::Manager)
    );
    println!("Worker token: {}", tokens.token(Role::Worker));
}

/// `flotilla repair`: prints the findings; fails (non-zero) while the state is damaged
/// and not repaired, so scripts do not go on as if it were whole.
fn repair(dir: &StateDir, accept_loss: bool) -> Result<(), String> {
    let report = manager::repair::repair(dir, accept_loss).map_err(|e| e.to_string())?;
    for finding in &report.findings {
        println!("{finding}");
    }
    if report.whole || report.repaired {
        if report.repaired {
            println!(
                "start the manager with `flotilla run --state-dir {}`",
                dir.root().display()
            );
        }
        return Ok(());
    }
    Err(format!(
        "the Raft state in {} is damaged and was not changed; run again with --accept-loss \
         to start from what is left, or restore a backup",
        dir.root().display()
    ))
}

/// Runs the node in `dir` until SIGINT or SIGTERM, in whatever role the cluster gives it:
/// a manager (then stopped through its barrier); demoted, a worker (its agent, in this
/// process); promoted again, a manager in place.
fn serve(dir: &StateDir, networking: &NodeNetworking) -> Result<(), String> {
    loop {
        if dir.is_demoted() {
            let args = agent::AgentArgs {
                state_dir: dir.root().to_path_buf(),
                token: None,
                managers: Vec::new(),
                listen: None,
                advertise: None,
                networking: networking.clone(),
                gossip_listen: None,
            };
            match agent::run(args)? {
                agent::AgentExit::Stopped => return Ok(()),
                agent::AgentExit::Promoted(addrs) => become_manager(dir, &addrs)?,
            }
        }
        match serve_manager(dir, networking)? {
            Served::Stopped => return Ok(()),
            Served::Demoted => {}
        }
    }
}

/// `flotilla agent`: a worker until stopped, or promoted (then a manager in place).
fn run_agent(args: agent::AgentArgs) -> Result<(), String> {
    let dir = StateDir::new(args.state_dir.clone());
    let networking = args.networking.clone();
    match agent::run(args)? {
        agent::AgentExit::Stopped => Ok(()),
        agent::AgentExit::Promoted(addrs) => {
            become_manager(&dir, &addrs)?;
            serve(&dir, &networking)
        }
    }
}

/// Turns a promoted node's directory into a manager's (same node, new Raft member).
fn become_manager(dir: &StateDir, addrs: &agent::ManagerAddrs) -> Result<(), String> {
    let settings = manager::become_manager(dir, &addrs.listen, &addrs.advertise, &addrs.join_addr)
        .map_err(|e| e.to_string())?;
    println!(
        "flotilla: this node is a manager now (Raft member {:x}); joining the managers \
         through {}",
        settings.raft_id, addrs.join_addr
    );
    Ok(())
}

/// How a manager run ended.
enum Served {
    /// Stopped by a signal.
    Stopped,
    /// The cluster demoted it: the directory is marked, and the node goes on as a worker.
    Demoted,
}

/// `init`, and `up` on a new directory: creates the cluster, starts its first manager, and
/// prints the join tokens once it runs. A first start that fails leaves the directory as
/// it found it ([`Untouched`]): nothing half-made shapes the next attempt, which takes the
/// flags it is given (another `--listen`, say).
fn init_and_serve(
    dir: &StateDir,
    settings: &Settings,
    networking: &NodeNetworking,
) -> Result<(), String> {
    if dir.is_initialized() || dir.has_raft_state() {
        // `init` refuses it, untouched, and says how to resume it (or, with Raft state but
        // no settings, that the directory is damaged): nothing to undo.
        return manager::init(dir, settings)
            .map(drop)
            .map_err(|e| e.to_string());
    }
    probe_listen(&settings.listen_addr)?;
    let untouched = Untouched::record(dir).map_err(|e| e.to_string())?;
    let started = manager::init(dir, settings)
        .map_err(|e| e.to_string())
        .and_then(|tokens| Ok((start(dir, networking)?, tokens)));
    match started {
        Ok((running, tokens)) => {
            print_tokens(&tokens);
            match wait(running)? {
                Served::Stopped => Ok(()),
                // Demoted: the node goes on as a worker.
                Served::Demoted => serve(dir, networking),
            }
        }
        Err(error) => Err(undo_first_start(dir, &untouched, error)),
    }
}

/// Removes what a failed first start wrote; says so after `error`.
fn undo_first_start(dir: &StateDir, untouched: &Untouched, error: String) -> String {
    let root = dir.root().display();
    match untouched.restore(dir) {
        Ok(()) => format!(
            "{error}
nothing was kept in {root}: the next `flotilla up` or `flotilla init` \
             there creates the cluster afresh, with the flags it is given"
        ),
        Err(restore) => format!(
            "{error}
the half-made node in {root} could not be removed ({restore}); remove \
             {root} before trying again"
        ),
    }
}

/// Binds `addr` for a moment, before anything is written or asked for: an address in use
/// (another manager, another `up`) is reported while the state directory is untouched.
/// The manager binds it again when it starts (a race with another process then fails that
/// start, which is undone too).
fn probe_listen(addr: &str) -> Result<(), String> {
    let resolved = resolve_listen(addr)?;
    std::net::TcpListener::bind(resolved)
        .map(drop)
        .map_err(|e| {
            format!(
                "cannot listen on {addr}: {e}
hint: nothing was written; pass a free address \
             with --listen HOST:PORT"
            )
        })
}

fn resolve_listen(addr: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .map_err(|e| format!("--listen {addr}: {e}; expected HOST:PORT"))?
        .next()
        .ok_or_else(|| format!("--listen {addr}: resolves to no address; expected HOST:PORT"))
}

/// `up` on a cluster that exists: its manager keeps the address it was created with
/// (`listen_addr` in manager.conf, which other nodes may know). A `--listen` naming another
/// address is refused, with both values and how to move the manager, never silently
/// ignored (swarm's `init` likewise refuses a node that is already in a swarm).
fn refuse_other_listen(dir: &StateDir, listen: Option<&str>) -> Result<(), String> {
    let Some(wanted) = listen else {
        return Ok(());
    };
    let stored = dir.load_settings().map_err(|e| e.to_string())?.listen_addr;
    let same = wanted == stored
        || matches!(
            (resolve_listen(wanted), resolve_listen(&stored)),
            (Ok(a), Ok(b)) if a == b
        );
    if same {
        return Ok(());
    }
    let (root, conf) = (dir.root().display(), dir.settings_file());
    let conf = conf.display();
    Err(format!(
        "{root} holds a cluster whose manager listens on {stored} (`listen_addr` in `{conf}`), \
         not on {wanted}\nhint: run `flotilla up --state-dir {root}` without --listen to \
         resume it on {stored}, or give another --state-dir to create a new cluster on \
         {wanted}. To move this manager, stop it and set both `listen_addr` and \
         `advertise_addr` (the address other nodes dial) in `{conf}`: safe while it is the \
         cluster's only manager and no agent was given the old address"
    ))
}

/// A started manager and the signal handlers registered before it started.
struct Running {
    manager: Manager,
    signals: signal_hook::iterator::Signals,
}

/// Starts the manager in `dir`, and says where it listens.
fn start(dir: &StateDir, networking: &NodeNetworking) -> Result<Running, String> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    // Registered before anything starts, so an early signal is not lost.
    let signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let manager = Manager::start_with(dir, networking.clone()).map_err(|e| e.to_string())?;
    println!(
        "flotilla manager listening on {} (commands on this machine use {})",
        manager.listen_addr(),
        dir.control_socket().display()
    );
    Ok(Running { manager, signals })
}

/// Runs the manager in `dir` until SIGINT or SIGTERM (or until it is demoted), then stops it
/// through its barrier.
fn serve_manager(dir: &StateDir, networking: &NodeNetworking) -> Result<Served, String> {
    wait(start(dir, networking)?)
}

/// Waits for SIGINT, SIGTERM or the manager's fatal stop (a demotion among them), then
/// stops it through its barrier.
fn wait(running: Running) -> Result<Served, String> {
    let Running {
        manager,
        mut signals,
    } = running;
    let handle = signals.handle();
    let fatal = loop {
        if let Some(signal) = signals.pending().next() {
            log::info!("signal {signal} received; shutting down");
            break None;
        }
        if let Some(reason) = manager.fatal() {
            break Some(reason);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    handle.close();
    if fatal.is_none() {
        manager.shutdown();
        return Ok(Served::Stopped);
    }
    match manager.shutdown_after_stop().map_err(|e| e.to_string())? {
        Some(manager::Stopped::Demoted { node_id }) => {
            println!(
                "flotilla: node {node_id} was demoted to worker: it left the managers and goes \
                 on as a worker, running the tasks assigned to it. `flotilla node promote \
                 {node_id}` on a manager makes it a manager again, in place."
            );
            Ok(Served::Demoted)
        }
        Some(manager::Stopped::Fatal(reason)) => Err(reason),
        None => Ok(Served::Stopped),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use control::ServiceCommand;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("flotilla").chain(args.iter().copied()))
    }

    fn service(args: &[&str]) -> ServiceCommand {
        match parse(args).map(|cli| cli.command) {
            Ok(Command::Service { command, .. }) => *command,
            other => panic!("{args:?} did not parse as a service command: {other:?}"),
        }
    }

    #[test]
    fn an_unknown_option_is_refused_never_taken_for_the_command() {
        for bogus in ["--publish", "--bogus", "--detached"] {
            let create = ["service", "create", "--name", "p1", bogus, "80:80", "nginx"];
            let error = parse(&create).expect_err(bogus);
            assert_eq!(
                error.kind(),
                clap::error::ErrorKind::UnknownArgument,
                "{error}"
            );
            let update = ["service", "update", "p1", bogus, "nginx"];
            assert!(parse(&update).is_err(), "{update:?}");
        }
    }

    #[test]
    fn the_command_starts_at_the_first_word_or_after_a_double_dash() {
        let ServiceCommand::Create {
            name,
            command,
            spec,
            ..
        } = service(&[
            "service",
            "create",
            "--name",
            "p1",
            "--replicas",
            "2",
            "sh",
            "-c",
            "echo hi",
            "--replicas",
            "3",
        ])
        else {
            panic!("not a create");
        };
        assert_eq!(name, "p1");
        assert_eq!(
            spec.replicas,
            Some(2),
            "options after the command are its own"
        );
        assert_eq!(command, ["sh", "-c", "echo hi", "--replicas", "3"]);
        let ServiceCommand::Create { command, .. } =
            service(&["service", "create", "--name", "p1", "--", "-dash", "--x"])
        else {
            panic!("not a create");
        };
        assert_eq!(command, ["-dash", "--x"]);
        let missing = parse(&["service", "create", "--name", "p1"]).expect_err("no command");
        assert_eq!(
            missing.kind(),
            clap::error::ErrorKind::MissingRequiredArgument
        );

        let ServiceCommand::Update {
            service: name,
            command,
            spec,
            ..
        } = service(&["service", "update", "web", "--replicas", "4"])
        else {
            panic!("not an update");
        };
        assert_eq!((name.as_str(), spec.replicas), ("web", Some(4)));
        assert!(command.is_empty(), "no command given: the command stays");
        let ServiceCommand::Update { command, .. } =
            service(&["service", "update", "web", "sleep", "-x", "--env", "A=1"])
        else {
            panic!("not an update");
        };
        assert_eq!(command, ["sleep", "-x", "--env", "A=1"]);
        let ServiceCommand::Update { command, .. } =
            service(&["service", "update", "web", "--", "--weird"])
        else {
            panic!("not an update");
        };
        assert_eq!(command, ["--weird"]);
    }
}
