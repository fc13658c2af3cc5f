//! The `flotilla` command line: argument parsing and the commands that start or set up a
//! node. Each command prints what the operator needs next (join tokens, addresses) on
//! stdout, and errors on stderr with a hint of what to do.
//!
//! Must never hold component logic: commands call into `manager`, `ca` and `raft`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod admin;
mod agent;
pub mod control;
pub mod json;
mod managers;
pub mod watch;

use crate::ca::{JoinTokens, Role};
use crate::manager::{self, Manager, Settings, StateDir};
use crate::net::{Transport, TransportConfig};
use crate::raft::node::Bootstrap;

/// Address managers listen on unless told otherwise.
pub const LISTEN_ADDR_DEFAULT: &str = "127.0.0.1:4242";
/// State directory of `flotilla up`.
pub const UP_STATE_DIR_DEFAULT: &str = "./flotilla-state";
/// State directory of `flotilla agent`.
pub const AGENT_STATE_DIR_DEFAULT: &str = "./flotilla-agent";

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
    Up {
        /// Where the cluster's state lives.
        #[arg(long, default_value = UP_STATE_DIR_DEFAULT)]
        state_dir: PathBuf,
        /// Address to listen on (host:port).
        #[arg(long, default_value = LISTEN_ADDR_DEFAULT)]
        listen: String,
    },
    /// Create a new cluster with this node as its first manager, print the join tokens and
    /// run it.
    Init {
        /// The new manager's state directory and addresses.
        #[command(flatten)]
        node: NewManagerArgs,
    },
    /// Join an existing cluster as a manager, using a manager join token, and run. On the
    /// state directory of a node demoted to worker (and promoted since), rejoin as a
    /// manager with the same node id.
    Join {
        /// The new manager's state directory and addresses.
        #[command(flatten)]
        node: NewManagerArgs,
        /// The join token (`flotilla join-token manager` on a manager prints it).
        #[arg(long)]
        token: String,
        /// Address of any manager of the cluster (host:port).
        manager: String,
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
    },
    /// Resume the node whose state is in the state directory.
    Run {
        /// The node's state directory.
        #[arg(long)]
        state_dir: PathBuf,
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
        command: admin::AdminCertCommand,
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

/// `flotilla manager …`
#[derive(Subcommand, Debug)]
pub enum ManagerCommand {
    /// List the managers: id, address, role, reachability, replication progress.
    Ls,
    /// Remove a manager from the group (refused if the rest would lack a quorum).
    Rm {
        /// The manager's Raft id (hex, as `manager ls` prints it).
        id: String,
        /// Remove it even if the remaining managers cannot form a quorum.
        #[arg(long)]
        force: bool,
    },
    /// Hand leadership to another manager.
    Transfer {
        /// The manager's Raft id (hex, as `manager ls` prints it).
        id: String,
    },
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Command) -> Result<(), String> {
    match command {
        Command::Up { state_dir, listen } => {
            let node = NewManagerArgs {
                state_dir,
                listen,
                advertise: None,
                snapshot_interval_entries: None,
            };
            let dir = StateDir::new(node.state_dir.clone());
            if !dir.is_initialized() {
                let tokens =
                    manager::init(&dir, &node.settings(None)).map_err(|e| e.to_string())?;
                print_tokens(&tokens);
            }
            serve(&dir)
        }
        Command::Init { node } => {
            let dir = StateDir::new(node.state_dir.clone());
            let settings = node.settings(None);
            let tokens = manager::init(&dir, &settings).map_err(|e| e.to_string())?;
            print_tokens(&tokens);
            serve(&dir)
        }
        Command::Join {
            node,
            token,
            manager,
        } => {
            let dir = StateDir::new(node.state_dir.clone());
            let settings = node.settings(Some(&manager));
            let transport = Transport::start(TransportConfig::default())
                .map_err(|e| format!("cannot start the transport: {e}"))?;
            let joined = manager::join(&dir, &settings, &transport, &token, &manager);
            transport.shutdown();
            joined.map_err(|e| e.to_string())?;
            serve(&dir)
        }
        Command::Run { state_dir } => serve(&StateDir::new(state_dir)),
        Command::Agent {
            state_dir,
            token,
            managers,
        } => agent::run(agent::AgentArgs {
            state_dir,
            token,
            managers,
        }),
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

/// Runs the node in `dir` until SIGINT or SIGTERM, then stops it through its barrier.
fn serve(dir: &StateDir) -> Result<(), String> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    // Registered before anything starts, so an early signal is not lost.
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let manager = Manager::start(dir).map_err(|e| e.to_string())?;
    println!("flotilla manager listening on {}", manager.listen_addr());
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
        return Ok(());
    }
    match manager.shutdown_after_stop().map_err(|e| e.to_string())? {
        Some(manager::Stopped::Demoted { node_id }) => {
            println!(
                "flotilla: node {node_id} was demoted to worker: it left the managers and its \
                 manager role stopped. Worker mode arrives with the agent; until then nothing \
                 runs here. To make it a manager again run `flotilla node promote {node_id}` \
                 on a manager, then `flotilla join --state-dir {} --token <manager token> \
                 <manager address>` here.",
                dir.root().display()
            );
            Ok(())
        }
        Some(manager::Stopped::Fatal(reason)) => Err(reason),
        None => Ok(()),
    }
}
