//! `flotilla agent`: runs this machine as a worker node. The first run joins the cluster
//! with a worker join token (the node's identity then lives in `<state-dir>/node`, the
//! managers to call in `<state-dir>/managers`); every run then keeps a dispatcher session
//! with the leader and runs the tasks assigned here until SIGINT or SIGTERM, which stops
//! them.
//!
//! Must never hold component logic: it sets up `ca`, `net` and `agent` and waits.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::agent::{Agent, RunnerConfig};
use crate::ca::renewal::{Renewer, RenewerConfig, RenewerSetup};
use crate::ca::rpc::join_cluster;
use crate::ca::{Role, load_node_files, save_node_files, tls};
use crate::dispatcher::client::AgentConfig;
use crate::net::{Transport, TransportConfig};

/// How long joining the cluster may take.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The file in the state directory listing the managers to call, one `host:port` a line.
const MANAGERS_FILE: &str = "managers";
/// Managers remembered at most.
const MANAGERS_MAX: usize = 64;

/// What `flotilla agent` was given.
pub struct AgentArgs {
    /// The node's state directory.
    pub state_dir: PathBuf,
    /// The worker join token, for the first run.
    pub token: Option<String>,
    /// Managers to call (replaces the remembered list when given).
    pub managers: Vec<String>,
}

/// Runs the agent until a signal.
///
/// # Errors
/// What to fix, as a message: no manager named, no token on a first run, a manager token,
/// a state directory of a manager, an unreachable manager, …
pub fn run(args: AgentArgs) -> Result<(), String> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let managers = managers(&args)?;
    let transport = Arc::new(
        Transport::start(TransportConfig::default())
            .map_err(|e| format!("cannot start the transport: {e}"))?,
    );
    let outcome = run_with(&args, managers, &transport, &mut signals);
    transport.shutdown();
    outcome
}

fn run_with(
    args: &AgentArgs,
    managers: Vec<String>,
    transport: &Arc<Transport>,
    signals: &mut signal_hook::iterator::Signals,
) -> Result<(), String> {
    let node_dir = args.state_dir.join("node");
    let (identity, root) = identity(args, &node_dir, &managers, transport)?;
    remember_managers(&args.state_dir, &managers)?;
    let live = tls::LiveIdentity::new(&identity, &root).map_err(|e| e.to_string())?;
    let client_tls =
        Arc::new(tls::client_config_live(live.clone(), &root).map_err(|e| e.to_string())?);
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
            Ok(()) => log::info!(
                "certificate renewed; presented from now on, valid until {:?}",
                renewed.not_after()
            ),
            Err(error) => log::error!("cannot present the renewed certificate: {error}"),
        },
    )
    .map_err(|e| format!("cannot start the certificate renewer: {e}"))?;
    let listed = managers.join(", ");
    let session = AgentConfig {
        managers: Box::new(move || managers.clone()),
        tls: client_tls,
        hostname: crate::control::duties::hostname(),
    };
    let agent = Agent::start(
        transport.clone(),
        session,
        RunnerConfig::new(args.state_dir.join("tasks")),
    )
    .map_err(|e| e.to_string())?;
    println!(
        "flotilla agent {} running the tasks assigned to it (managers: {listed})",
        identity.node_id()
    );
    if let Some(signal) = signals.forever().next() {
        log::info!("signal {signal} received; stopping the tasks and the agent");
    }
    agent.stop();
    renewer.stop();
    Ok(())
}

/// The managers to call: those given, else those remembered.
fn managers(args: &AgentArgs) -> Result<Vec<String>, String> {
    let managers = if args.managers.is_empty() {
        std::fs::read_to_string(args.state_dir.join(MANAGERS_FILE))
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
        let (identity, root) = load_node_files(node_dir).map_err(|e| e.to_string())?;
        if identity.role() != Role::Worker {
            return Err(format!(
                "{} belongs to a {} node, not a worker; run a manager with `flotilla run \
                 --state-dir {}`",
                args.state_dir.display(),
                identity.role().as_str(),
                args.state_dir.display()
            ));
        }
        return Ok((identity, root));
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
    let mut contents = managers.join("\n");
    contents.push('\n');
    crate::util::fsutil::write_atomic(&state_dir.join(MANAGERS_FILE), contents.as_bytes(), 0o600)
        .map_err(|e| {
            format!(
                "cannot write {}: {e}",
                state_dir.join(MANAGERS_FILE).display()
            )
        })
}
