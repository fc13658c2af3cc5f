//! Creating a manager's state: `init` (a new cluster: root CA, join tokens, this manager's
//! identity) and `join` (an identity from an existing cluster through a join token).
//!
//! Every step writes files atomically and the settings file last, so an interrupted
//! bootstrap leaves a directory that is visibly incomplete (and is refused by `run`), never
//! one that looks valid but is not. Must never overwrite an initialized state directory.

use std::time::{Duration, SystemTime};

use super::state_dir::{Settings, StateDir, StateDirError};
use crate::ca::rpc::{JoinClusterError, join_cluster};
use crate::ca::{
    CaError, CaPolicy, ClusterCa, IssueError, JoinTokens, Role, StorageError, save_node_files,
};
use crate::net::Transport;
use crate::raft::types::NodeId;

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
    /// A demoted node's state directory could not rejoin as a manager.
    #[error("cannot rejoin as a manager: {0}")]
    Rejoin(String),
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
    if dir.is_initialized() && dir.is_demoted() {
        return rejoin(dir, settings, transport, token, manager_addr);
    }
    refuse_initialized(dir)?;
    let (identity, root) = join_cluster(transport, manager_addr, token, JOIN_CALL_TIMEOUT)?;
    if identity.role() != Role::Manager {
        return Err(BootstrapError::WorkerToken);
    }
    dir.create()?;
    save_node_files(&dir.node_dir(), &identity, &root)?;
    dir.save_settings(settings)?;
    log::info!(
        "joined cluster {} through {manager_addr} as manager node {}",
        root.cluster_id(),
        identity.node_id()
    );
    Ok(())
}

/// Turns the state directory of a manager the cluster demoted (and then promoted again)
/// back into a manager's: the node keeps its identity (node id, certificate, CA material),
/// so its Node object becomes a manager again; it gets a fresh Raft id and an empty Raft
/// directory (Raft ids are never reused, and the old log belongs to a removed member).
///
/// The token must be the cluster's current manager token, checked against the managers'
/// replicated tokens over mutual TLS with the node's certificate; and the Node must be
/// promoted first (desired role manager), or the leader would demote it again at once.
/// The demotion marker is removed last: an interrupted rejoin can be run again.
fn rejoin(
    dir: &StateDir,
    settings: &Settings,
    transport: &Transport,
    token: &str,
    manager_addr: &str,
) -> Result<(), BootstrapError> {
    use crate::control::{GET_JOIN_TOKENS, GET_NODE};
    use crate::net::CallOptions;
    use crate::proto::control as pb;
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
        .unary(GET_JOIN_TOKENS, &pb::GetJoinTokensRequest {}, options)
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
        .unary(
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
    let raft_dir = dir.raft_dir();
    if raft_dir.exists() {
        std::fs::remove_dir_all(&raft_dir).map_err(|source| StateDirError::Io {
            path: raft_dir.clone(),
            source,
        })?;
    }
    dir.create()?;
    dir.save_settings(settings)?;
    dir.clear_demoted()?;
    log::info!(
        "node {node_id} rejoins cluster {} through {manager_addr} as a manager",
        root.cluster_id()
    );
    Ok(())
}
