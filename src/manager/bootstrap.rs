//! Creating a manager's state: `init` (a new cluster: root CA, join tokens, this manager's
//! identity) and `join` (an identity from an existing cluster through a join token).
//!
//! Every step writes files atomically and the settings file last, so an interrupted
//! bootstrap leaves a directory that is visibly incomplete (and is refused by `run`), never
//! one that looks valid but is not. Must never overwrite an initialized state directory.

use std::time::{Duration, SystemTime};

use crate::ca::{
    CaError, CaPolicy, ClusterCa, IssueError, JoinTokens, Role, StorageError, save_node_files,
};
use crate::ca_rpc::{JoinClusterError, join_cluster};
use crate::net::Transport;
use crate::raft::storage::Watermark;
use crate::raft::types::NodeId;
use crate::state_dir::{Settings, StateDir, StateDirError};

/// How long one join call may take before the join fails.
pub const JOIN_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why `init` or `join` failed.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// The state directory already holds a node.
    #[error(
        "{0} already holds a flotilla node; resume it with `flotilla run --state-dir {0}`, or \
         choose an empty directory"
    )]
    AlreadyInitialized(String),
    /// Reading or writing the state directory failed.
    #[error(transparent)]
    StateDir(#[from] StateDirError),
    /// The identity files could not be written.
    #[error(transparent)]
    Identity(#[from] StorageError),
    /// The CA could not be created.
    #[error("cannot create the cluster CA: {0}")]
    Ca(#[from] CaError),
    /// The first certificate could not be issued.
    #[error("cannot issue this manager's certificate: {0}")]
    Issue(#[from] IssueError),
    /// Joining failed.
    #[error(transparent)]
    Join(#[from] JoinClusterError),
    /// A damaged manager could not rejoin.
    #[error("cannot rejoin as a manager: {0}")]
    Rejoin(String),
    /// Settings are missing but Raft state is there: the directory is damaged.
    #[error(
        "{dir} holds the Raft state of a manager that ran here, but {settings} is missing; \
         restore it from a backup (it names the manager's raft_id, listen_addr, \
         advertise_addr and bootstrap), or choose an empty directory"
    )]
    Damaged {
        /// The state directory.
        dir: String,
        /// The missing settings file.
        settings: String,
    },
    /// The watermark could not be created.
    #[error("cannot create the Raft watermark: {0}")]
    Watermark(#[from] crate::raft::storage::WatermarkError),
    /// The token grants the worker role; this command sets up managers.
    #[error(
        "this is a worker token; managers join with the manager token \
         (`flotilla join-token manager` on a manager prints it)"
    )]
    WorkerToken,
}

/// A fresh random Raft member id: never zero.
pub fn random_raft_id() -> NodeId {
    loop {
        let id: NodeId = rand::random();
        if id != crate::raft::types::NO_NODE {
            return id;
        }
    }
}

fn refuse_initialized(dir: &StateDir) -> Result<(), BootstrapError> {
    if dir.is_initialized() {
        return Err(BootstrapError::AlreadyInitialized(
            dir.root().display().to_string(),
        ));
    }
    // No settings, but a manager ran here: its settings file was lost, and a new node made
    // over its files would bury the cluster it belonged to.
    if dir.has_raft_state() {
        return Err(BootstrapError::Damaged {
            dir: dir.root().display().to_string(),
            settings: dir.settings_file().display().to_string(),
        });
    }
    Ok(())
}

/// Creates the Raft directory's watermark for the new member `raft_id` (replacing one an
/// interrupted bootstrap left: [`refuse_initialized`] made sure no Raft state exists). Its
/// absence later means the Raft state lost files.
fn create_watermark(dir: &StateDir, raft_id: NodeId) -> Result<(), BootstrapError> {
    let raft = dir.raft_dir();
    let path = Watermark::path_in(&raft);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(StateDirError::Io { path, source }.into()),
    }
    Watermark::create(&raft, raft_id)?;
    Ok(())
}

/// Creates a new cluster in `dir`: root CA, join tokens, this manager's identity and
/// settings. Returns the tokens (the operator needs them to add nodes).
///
/// # Errors
/// [`BootstrapError`]; an existing node in `dir` is never touched.
pub fn init(dir: &StateDir, settings: &Settings) -> Result<JoinTokens, BootstrapError> {
    refuse_initialized(dir)?;
    dir.create()?;
    let now = SystemTime::now();
    let ca = ClusterCa::create(now, CaPolicy::default())?;
    ca.save(&dir.ca_file())?;
    let tokens = JoinTokens::generate(ca.root());
    dir.save_tokens(&tokens)?;
    let identity = ca.issue_local_identity(Role::Manager, now)?;
    save_node_files(&dir.node_dir(), &identity, ca.root())?;
    create_watermark(dir, settings.raft_id)?;
    dir.save_settings(settings)?;
    log::info!(
        "initialized cluster {} in {}; this manager is node {}",
        ca.cluster_id(),
        dir.root().display(),
        identity.node_id()
    );
    Ok(tokens)
}

/// Joins the cluster of `token` through the manager at `manager_addr` as a manager: fetches
/// and pins the root CA, obtains a certificate, saves identity and settings.
///
/// # Errors
/// [`BootstrapError`]: a token of another cluster, a wrong or rotated secret, an unreachable
/// manager and a worker token all say what to do.
pub fn join(
    dir: &StateDir,
    settings: &Settings,
    transport: &Transport,
    token: &str,
    manager_addr: &str,
) -> Result<(), BootstrapError> {
    refuse_initialized(dir)?;
    let (identity, root) = join_cluster(transport, manager_addr, token, JOIN_CALL_TIMEOUT)?;
    if identity.role() != Role::Manager {
        return Err(BootstrapError::WorkerToken);
    }
    dir.create()?;
    save_node_files(&dir.node_dir(), &identity, &root)?;
    create_watermark(dir, settings.raft_id)?;
    dir.save_settings(settings)?;
    log::info!(
        "joined cluster {} through {manager_addr} as manager node {}",
        root.cluster_id(),
        identity.node_id()
    );
    Ok(())
}

/// Turns the state directory of a node the cluster promoted (a worker's, or a demoted
/// manager's) into a manager's, keeping the node's identity (its certificate already says
/// manager: the CA issued it after the promotion): a fresh Raft id, an empty Raft directory
/// with its watermark (a demoted manager's old log belongs to a removed member and is
/// deleted), and the settings, written last. The manager it then runs joins the Raft group
/// through `join_addr`.
///
/// # Errors
/// [`BootstrapError`] if a file cannot be written.
pub fn become_manager(
    dir: &StateDir,
    listen_addr: &str,
    advertise_addr: &str,
    join_addr: &str,
) -> Result<Settings, BootstrapError> {
    let raft_dir = dir.raft_dir();
    if raft_dir.exists() {
        std::fs::remove_dir_all(&raft_dir).map_err(|source| StateDirError::Io {
            path: raft_dir.clone(),
            source,
        })?;
    }
    dir.create()?;
    let old = dir.load_settings().ok();
    let settings = Settings {
        raft_id: random_raft_id(),
        listen_addr: listen_addr.to_string(),
        advertise_addr: advertise_addr.to_string(),
        bootstrap: crate::raft::node::Bootstrap::Join,
        join_addr: Some(join_addr.to_string()),
        snapshot_interval_entries: old.as_ref().and_then(|s| s.snapshot_interval_entries),
        log_memtable_mib: old.as_ref().and_then(|s| s.log_memtable_mib),
        tasks_running_max: old.as_ref().and_then(|s| s.tasks_running_max),
        kv_enabled: old.as_ref().is_some_and(|s| s.kv_enabled),
    };
    create_watermark(dir, settings.raft_id)?;
    dir.save_settings(&settings)?;
    if dir.is_demoted() {
        dir.clear_demoted()?;
    }
    Ok(settings)
}

/// What `flotilla rejoin` did.
#[derive(Debug)]
pub struct Rejoined {
    /// The settings the manager now runs with (a fresh Raft id).
    pub settings: Settings,
    /// Where the old Raft directory was set aside, if there was one.
    pub set_aside: Option<std::path::PathBuf>,
    /// The old Raft member id, if it was still a member and is now removed.
    pub removed_raft_id: Option<NodeId>,
}

/// `flotilla rejoin`: a manager whose Raft state is damaged (or lost) leaves the Raft group
/// and joins it again with an empty log, catching up from the other managers; the node
/// keeps its identity (node id, certificate) and its settings, under a fresh Raft id.
///
/// Steps, each safe to repeat after an interruption: check the token and that the node is
/// meant to be a manager; ask the leader to remove the old Raft member if it
/// still is one (`raft.RemoveMember`, refused if that would cost the others their quorum);
/// set the Raft directory aside as `raft.damaged-<time>` (kept for the operator); create a
/// new Raft directory and watermark; save the settings with the new Raft id last.
///
/// # Errors
/// [`BootstrapError`]: unreadable settings or identity, a wrong token, an unreachable
/// manager, a node meant to be a worker, or a removal the leader refuses.
pub fn rejoin_damaged(
    dir: &StateDir,
    transport: &Transport,
    token: &str,
    manager_addr: &str,
) -> Result<Rejoined, BootstrapError> {
    let old = dir.load_settings()?;
    let checked = check_rejoin(dir, transport, token, manager_addr)?;
    let removed_raft_id = remove_old_member(&checked, old.raft_id)?;
    let set_aside = dir.set_raft_dir_aside()?;
    dir.create()?;
    let settings = Settings {
        raft_id: random_raft_id(),
        bootstrap: crate::raft::node::Bootstrap::Join,
        join_addr: Some(manager_addr.to_string()),
        ..old
    };
    create_watermark(dir, settings.raft_id)?;
    dir.save_settings(&settings)?;
    if dir.is_demoted() {
        dir.clear_demoted()?;
    }
    log::info!(
        "node {} rejoins cluster {} through {manager_addr} as Raft member {:x}",
        checked.node_id,
        checked.cluster_id,
        settings.raft_id
    );
    Ok(Rejoined {
        settings,
        set_aside,
        removed_raft_id,
    })
}

/// A rejoin the cluster agreed to: a channel to a manager with this node's certificate.
struct RejoinCheck<'t> {
    channel: crate::net::Channel,
    node_id: String,
    cluster_id: String,
    tls: std::sync::Arc<rustls::ClientConfig>,
    transport: &'t Transport,
}

/// Checks `token` (the cluster's current manager token, asked over mutual TLS with the
/// node's own certificate: a rejoin proves both who the node is and that the operator holds
/// the manager token) and that the node is meant to be a manager.
fn check_rejoin<'t>(
    dir: &StateDir,
    transport: &'t Transport,
    token: &str,
    manager_addr: &str,
) -> Result<RejoinCheck<'t>, BootstrapError> {
    use crate::net::CallOptions;
    use crate::proto::control as pb;
    use crate::proto::control::rpc::{GET_JOIN_TOKENS, GET_NODE};
    use crate::proto::objects::NodeRole;

    let parsed = crate::ca::JoinToken::parse(token).map_err(JoinClusterError::from)?;
    let (identity, root) = crate::ca::load_node_files(&dir.node_dir())?;
    crate::ca::verify_root_for_token(&parsed, root.der()).map_err(JoinClusterError::from)?;
    let node_id = identity.node_id().to_string();
    if !identity.is_valid_at(SystemTime::now()) {
        return Err(BootstrapError::Rejoin(format!(
            "the certificate of node {node_id} expired; join as a new manager from an empty \
             state directory"
        )));
    }
    let tls = std::sync::Arc::new(
        crate::ca::tls::client_config(&identity, &root).map_err(|e| {
            BootstrapError::Rejoin(format!("cannot use this node's certificate: {e}"))
        })?,
    );
    let channel = transport.channel(manager_addr, &tls);
    let options = CallOptions::timeout(JOIN_CALL_TIMEOUT);
    let unreachable = |status: crate::wire::Status| {
        BootstrapError::Rejoin(format!("{manager_addr} did not answer: {status}"))
    };
    let tokens: pb::JoinTokensResponse = channel
        .call(GET_JOIN_TOKENS, &pb::GetJoinTokensRequest {}, options)
        .map_err(unreachable)?;
    let tokens = tokens.tokens.unwrap_or_default();
    if tokens.worker == token {
        return Err(BootstrapError::WorkerToken);
    }
    if tokens.manager != token {
        return Err(BootstrapError::Rejoin(
            "the token is not the cluster's current manager token (`flotilla join-token \
             manager` on a manager prints it)"
                .into(),
        ));
    }
    let node: pb::NodeResponse = channel
        .call(
            GET_NODE,
            &pb::GetNodeRequest {
                reference: node_id.clone(),
            },
            options,
        )
        .map_err(unreachable)?;
    let desired = node
        .node
        .and_then(|n| n.spec)
        .map_or(NodeRole::Worker as i32, |s| s.desired_role);
    if desired != NodeRole::Manager as i32 {
        return Err(BootstrapError::Rejoin(format!(
            "node {node_id} is meant to be a worker; promote it first with `flotilla node \
             promote {node_id}` on a manager"
        )));
    }
    Ok(RejoinCheck {
        channel,
        node_id,
        cluster_id: root.cluster_id().to_string(),
        tls,
        transport,
    })
}

/// Asks the leader (following redirects) to remove Raft member `raft_id`. `None` if it was
/// no member any more (an earlier, interrupted rejoin removed it).
fn remove_old_member(
    checked: &RejoinCheck<'_>,
    raft_id: NodeId,
) -> Result<Option<NodeId>, BootstrapError> {
    use crate::net::CallOptions;
    use crate::proto::raft as raftpb;
    use crate::proto::raft::rpc::REMOVE_MEMBER;
    use crate::raft::node::service::ADMIN_CALL_TIMEOUT;
    use crate::wire::Code;

    let request = raftpb::RemoveMemberRequest {
        raft_id,
        force: false,
    };
    let options = CallOptions::timeout(ADMIN_CALL_TIMEOUT);
    let mut channel = checked.channel.clone();
    for _ in 0..=super::register::REDIRECTS_MAX {
        let result: Result<raftpb::RemoveMemberResponse, _> =
            channel.call(REMOVE_MEMBER, &request, options);
        match result {
            Ok(_) => return Ok(Some(raft_id)),
            Err(status) if status.code == Code::NotFound => return Ok(None),
            Err(status) => match status.leader_hint() {
                Some(leader) => channel = checked.transport.channel(leader, &checked.tls),
                None => {
                    return Err(BootstrapError::Rejoin(format!(
                        "the cluster did not remove this manager's old Raft member {raft_id:x}: \
                         {status}"
                    )));
                }
            },
        }
    }
    Err(BootstrapError::Rejoin(
        "no manager led the cluster after several redirects; retry in a moment".into(),
    ))
}
