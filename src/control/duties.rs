//! The control duties thread (`flotilla-control`), one per manager. Every
//! [`DUTY_INTERVAL`] it:
//!
//! - hands the cluster object's snapshot interval to the Raft node when it changed
//!   (unless `manager.conf` pins this manager's: see [`SelfReport::snapshot_interval_override`]);
//! - keeps the cluster CA in step with the Cluster object (`sync_ca`): a manager that
//!   holds the CA key on disk publishes it when the object lacks it; a manager without a
//!   CA installs the replicated one (so every manager serves joins, renewals and admin
//!   certificates); first, since the report below may wait on a slow or changing leader;
//! - on the leader, creates the Cluster object if it is missing (defaults, the founder's
//!   join tokens, the root CA digest, and the founder's pinned snapshot interval if any);
//! - records this manager as a Node object (through [`ControlApi::write`], so a follower's
//!   report is forwarded with its own identity);
//! - copies the replicated join tokens into this manager's CA service and `join-tokens`
//!   file when they changed (a rotation on any manager reaches every manager);
//! - on the leader, runs one pass of the role reconciler ([`super::roles`]: demotions),
//!   which may block the thread for one membership change or leadership transfer.
//!
//! Must never block the store or hold a lock across a call.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::{Sender, bounded};

use super::{Caller, ControlApi};
use crate::ca::{CaPolicy, CaService, ClusterCa, FailureLimits, JoinTokens, Role};
use crate::proto::control as pb;
use crate::proto::control::rpc::forward;
use crate::proto::objects::{Cluster, Node, RootCaKey, Transaction};
use crate::replication::{PROPOSE_TIMEOUT, propose_transaction};
use crate::store::create;
use crate::store::settings::ClusterSettings;
use crate::store::spec::default_cluster_spec;

/// How often the duties run.
pub const DUTY_INTERVAL: Duration = Duration::from_millis(300);
/// The name of the cluster object created at first election.
pub const CLUSTER_NAME: &str = "default";

/// Who this manager is, for its Node object.
#[derive(Clone, Debug)]
pub struct SelfReport {
    /// This manager's node id (its certificate's CN).
    pub node_id: String,
    /// Its Raft id.
    pub raft_id: u64,
    /// The address other managers reach it on.
    pub addr: String,
    /// `snapshot_interval_entries` from `manager.conf`: when set it pins this manager's
    /// snapshot interval and the cluster object's setting is not applied here. Without
    /// it, the cluster object's `snapshot_interval_entries` applies as soon as this
    /// manager has applied it (the node's default, 10,000, until the object exists).
    pub snapshot_interval_override: Option<u64>,
}

/// The running duties thread. Stop it with [`Duties::stop`].
pub struct Duties {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Duties {
    /// Starts the thread.
    ///
    /// # Errors
    /// The OS error if the thread cannot start.
    pub fn start(api: Arc<ControlApi>, me: SelfReport) -> std::io::Result<Duties> {
        let (stop, stopped) = bounded::<()>(1);
        let thread = std::thread::Builder::new()
            .name("flotilla-control".into())
            .spawn(move || {
                let mut synced: Option<crate::proto::objects::JoinTokens> = None;
                let mut ignored_interval: Option<u64> = None;
                let mut demotions = super::roles::Demotions::default();
                loop {
                    apply_snapshot_interval(&api, &me, &mut ignored_interval);
                    // Before `run_once`, whose forwarded report may wait for a slow or
                    // changing leader: installing a replicated CA key is local, and joins,
                    // renewals and admin certificates here wait for it.
                    sync_ca(&api, &me);
                    run_once(&api, &me, &mut synced);
                    super::roles::reconcile(&api, &mut demotions);
                    match stopped.recv_timeout(DUTY_INTERVAL) {
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                }
            })?;
        Ok(Duties { stop, thread })
    }

    /// Stops the thread and joins it (at most one call's deadline).
    pub fn stop(self) {
        drop(self.stop);
        if self.thread.join().is_err() {
            log::error!("the control duties thread panicked");
        }
    }
}

fn run_once(
    api: &Arc<ControlApi>,
    me: &SelfReport,
    synced: &mut Option<crate::proto::objects::JoinTokens>,
) {
    if api.node.leader().is_none() {
        return;
    }
    if api.is_leader() && api.store.list::<Cluster>().is_empty() {
        create_cluster(api, me);
    }
    if api.is_leader() {
        rotate_network_keys(api, u64::try_from(super::handlers::now_ms()).unwrap_or(0));
    }
    let recorded = api.store.get::<Node>(&me.node_id).is_some_and(|node| {
        node.manager_status
            .as_ref()
            .is_some_and(|s| s.raft_id == me.raft_id && s.addr == me.addr)
    });
    if !recorded {
        let caller = Caller {
            node_id: me.node_id.clone(),
            role: Role::Manager,
            forwarded_by: None,
        };
        let report = pb::ReportManagerRequest {
            raft_id: me.raft_id,
            addr: me.addr.clone(),
            hostname: crate::util::hostname(),
        };
        if let Err(status) = api.write(&caller, forward::REPORT_MANAGER, report) {
            log::debug!("cannot record this manager as a node yet: {status}");
        }
    }
    let replicated = api
        .store
        .list::<Cluster>()
        .first()
        .and_then(|c| c.join_tokens.clone());
    if replicated.is_some() && replicated != *synced {
        let cluster = api.store.list::<Cluster>();
        if let Some(Ok(tokens)) = cluster.first().map(|c| super::handlers::cluster_tokens(c)) {
            sync_tokens(api, &tokens);
            *synced = replicated;
        }
    }
}

/// Hands the cluster object's snapshot interval to the Raft node when it changed, unless
/// `manager.conf` pins this manager's (then says once per value that it is ignored).
fn apply_snapshot_interval(api: &ControlApi, me: &SelfReport, ignored: &mut Option<u64>) {
    if api.store.list::<Cluster>().is_empty() {
        return;
    }
    let wanted = ClusterSettings::current(&api.store).snapshot_interval_entries;
    match me.snapshot_interval_override {
        Some(pinned) => {
            if pinned != wanted && *ignored != Some(wanted) {
                log::info!(
                    "cluster snapshot interval of {wanted} entries not applied here: \
                     manager.conf pins {pinned}"
                );
                *ignored = Some(wanted);
            }
        }
        None => {
            if api.node.snapshot_interval_entries() != wanted {
                let previous = api.node.set_snapshot_interval_entries(wanted);
                log::info!(
                    "snapshot interval now {wanted} entries (cluster setting; was {previous})"
                );
            }
        }
    }
}

fn create_cluster(api: &ControlApi, me: &SelfReport) {
    let tokens = match api.tokens_file.load_tokens() {
        Ok(tokens) => Some(tokens),
        Err(error) => {
            log::warn!("creating the cluster object without join tokens: {error}");
            None
        }
    };
    let mut spec = default_cluster_spec(CLUSTER_NAME);
    // The founder's `--snapshot-interval-entries` becomes the cluster's.
    if let Some(entries) = me.snapshot_interval_override {
        spec.snapshot_interval_entries =
            entries.min(crate::store::spec::SNAPSHOT_INTERVAL_ENTRIES_MAX);
    }
    let cluster = Cluster {
        id: crate::util::id::random_id(),
        spec: Some(spec),
        root_ca_digest: tokens
            .as_ref()
            .map(|t| Bytes::copy_from_slice(&t.token(Role::Worker).root_digest()))
            .unwrap_or_default(),
        join_tokens: tokens.as_ref().map(super::handlers::tokens_to_proto),
        root_ca: api.ca.get().map(|ca| root_ca_material(ca.ca())),
        ..Default::default()
    };
    let txn = Transaction {
        changes: vec![create(cluster)],
        timestamp_ms: super::handlers::now_ms(),
        request_id: None,
    };
    match propose_transaction(&api.node, &txn, PROPOSE_TIMEOUT) {
        Ok(version) => log::info!("created the cluster object at version {version}"),
        Err(status) => log::debug!("cannot create the cluster object yet: {status}"),
    }
}

/// A network bootstrap key is rotated this long after it was made (swarmkit's 12 h).
pub const NETWORK_KEY_ROTATION_MS: u64 = 12 * 3_600_000;
/// Network bootstrap keys kept: the newest, the one sealing (second newest) and the one
/// before, so that nodes that missed a rotation still open what others seal.
pub const NETWORK_KEYS_KEPT: usize = 3;
/// The subsystem of the gossip keys (swarmkit's name).
pub const NETWORK_KEY_SUBSYSTEM: &str = "networking:gossip";
/// Bytes of a network bootstrap key (AES-256).
pub const NETWORK_KEY_BYTES: usize = 32;

/// The keys `cluster` should hold at `now_ms`: a first key if none, a new one once the
/// newest is [`NETWORK_KEY_ROTATION_MS`] old (the oldest dropped past
/// [`NETWORK_KEYS_KEPT`]); `None` when nothing is due. `fresh` makes a new key's bytes.
pub fn network_keys_due(
    cluster: &Cluster,
    now_ms: u64,
    fresh: impl FnOnce() -> Option<[u8; NETWORK_KEY_BYTES]>,
) -> Option<Vec<crate::proto::objects::EncryptionKey>> {
    let mut keys = cluster.network_bootstrap_keys.clone();
    keys.sort_by_key(|k| k.lamport_time);
    let due = keys
        .last()
        .is_none_or(|newest| newest.created_at_ms + NETWORK_KEY_ROTATION_MS <= now_ms);
    if !due {
        return None;
    }
    let lamport_time = keys.last().map_or(1, |k| k.lamport_time + 1);
    keys.push(crate::proto::objects::EncryptionKey {
        subsystem: NETWORK_KEY_SUBSYSTEM.to_string(),
        key: Bytes::copy_from_slice(&fresh()?),
        lamport_time,
        created_at_ms: now_ms,
    });
    let excess = keys.len().saturating_sub(NETWORK_KEYS_KEPT);
    keys.drain(..excess);
    Some(keys)
}

/// On the leader: the cluster's network bootstrap keys (gossip encryption), made at first
/// and rotated every 12 h (the dispatcher delivers them to every node).
fn rotate_network_keys(api: &ControlApi, now_ms: u64) {
    let Some(cluster) = api.store.list::<Cluster>().into_iter().next() else {
        return;
    };
    let fresh = || {
        let mut key = [0u8; NETWORK_KEY_BYTES];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key).ok()?;
        Some(key)
    };
    let Some(keys) = network_keys_due(&cluster, now_ms, fresh) else {
        return;
    };
    let mut updated = cluster.as_ref().clone();
    updated.network_bootstrap_keys = keys;
    let txn = Transaction {
        changes: vec![crate::store::update(updated)],
        timestamp_ms: super::handlers::now_ms(),
        request_id: None,
    };
    match propose_transaction(&api.node, &txn, PROPOSE_TIMEOUT) {
        Ok(version) => log::info!("network bootstrap keys rotated at version {version}"),
        Err(status) => log::debug!("cannot rotate the network bootstrap keys yet: {status}"),
    }
}

/// The replicated form of `ca`'s signing material (secret: see [`super::redact_cluster`]).
fn root_ca_material(ca: &ClusterCa) -> RootCaKey {
    let (cert_der, key_der) = ca.to_der_parts();
    RootCaKey {
        cert_der: cert_der.into(),
        key_der: key_der.into(),
    }
}

/// Keeps the CA key and this manager's CA in step: a manager holding the key on disk
/// publishes it when the Cluster object lacks it (clusters created before the key was
/// replicated); a manager without a CA installs it from the Cluster object, checked
/// against its own root certificate, with the replicated join tokens.
fn sync_ca(api: &Arc<ControlApi>, me: &SelfReport) {
    let Some(cluster) = api.store.list::<Cluster>().into_iter().next() else {
        return;
    };
    match (api.ca.get(), &cluster.root_ca) {
        (Some(ca), None) => publish_ca(api, me, ca.ca()),
        (None, Some(material)) => install_ca(api, &cluster, material),
        _ => {}
    }
}

fn publish_ca(api: &Arc<ControlApi>, me: &SelfReport, ca: &ClusterCa) {
    if api.node.leader().is_none() {
        return;
    }
    let caller = Caller {
        node_id: me.node_id.clone(),
        role: Role::Manager,
        forwarded_by: None,
    };
    let request = pb::PublishRootCaRequest {
        root_ca: Some(root_ca_material(ca)),
    };
    match api.write(&caller, forward::PUBLISH_ROOT_CA, request) {
        Ok(_) => log::info!("published the cluster CA key to the other managers"),
        Err(status) => log::debug!("cannot publish the cluster CA key yet: {status}"),
    }
}

fn install_ca(api: &ControlApi, cluster: &Cluster, material: &RootCaKey) {
    let Ok(tokens) = super::handlers::cluster_tokens(cluster) else {
        return;
    };
    let ca =
        match ClusterCa::from_der_parts(&material.cert_der, &material.key_der, CaPolicy::default())
        {
            Ok(ca) => ca,
            Err(error) => {
                log::error!("the replicated cluster CA key is unusable: {error}");
                return;
            }
        };
    if ca.root().digest() != api.root.digest() || !tokens.token(Role::Worker).pins(ca.root()) {
        log::error!(
            "the replicated cluster CA is not this node's root CA ({}); not serving it",
            api.root.digest_hex()
        );
        return;
    }
    if api
        .ca
        .install(CaService::new(ca, tokens, FailureLimits::default()))
    {
        log::info!(
            "this manager now runs the cluster CA (joins, renewals, admin certificates) with \
             the key replicated in the cluster object"
        );
    }
}

/// Makes `tokens` the ones this manager's CA accepts and its `join-tokens` file holds.
pub(super) fn sync_tokens(api: &ControlApi, tokens: &JoinTokens) {
    if let Some(ca) = api.ca.get()
        && ca.tokens() != *tokens
    {
        match ca.set_tokens(tokens.clone()) {
            Ok(()) => log::info!("join tokens updated from the cluster object"),
            Err(error) => log::error!("the replicated join tokens do not fit this CA: {error}"),
        }
    }
    let on_disk = api.tokens_file.load_tokens().ok();
    if on_disk.as_ref() != Some(tokens)
        && let Err(error) = api.tokens_file.save_tokens(tokens)
    {
        log::error!("cannot save the rotated join tokens: {error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh(byte: u8) -> impl FnOnce() -> Option<[u8; NETWORK_KEY_BYTES]> {
        move || Some([byte; NETWORK_KEY_BYTES])
    }

    #[test]
    fn a_first_key_is_made_then_rotated_every_12_hours_keeping_three() {
        let mut cluster = Cluster::default();
        let keys = network_keys_due(&cluster, 1_000, fresh(1)).expect("a first key");
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].lamport_time, 1);
        assert_eq!(keys[0].subsystem, NETWORK_KEY_SUBSYSTEM);
        cluster.network_bootstrap_keys = keys;
        let before_due = 1_000 + NETWORK_KEY_ROTATION_MS - 1;
        assert!(network_keys_due(&cluster, before_due, fresh(2)).is_none());
        for (round, byte) in (1..=4u64).zip(2u8..) {
            let now = 1_000 + round * NETWORK_KEY_ROTATION_MS;
            let keys = network_keys_due(&cluster, now, fresh(byte)).expect("rotation due");
            assert_eq!(keys.last().map(|k| k.key[0]), Some(byte));
            assert_eq!(keys.last().map(|k| k.created_at_ms), Some(now));
            assert!(keys.len() <= NETWORK_KEYS_KEPT);
            assert!(
                keys.windows(2)
                    .all(|w| w[0].lamport_time < w[1].lamport_time)
            );
            cluster.network_bootstrap_keys = keys;
        }
        assert_eq!(cluster.network_bootstrap_keys.len(), NETWORK_KEYS_KEPT);
        assert_eq!(cluster.network_bootstrap_keys[0].lamport_time, 3);
    }

    #[test]
    fn no_randomness_no_key() {
        assert!(network_keys_due(&Cluster::default(), 0, || None).is_none());
    }

    #[test]
    fn keys_never_print() {
        let mut cluster = Cluster::default();
        cluster.network_bootstrap_keys =
            network_keys_due(&cluster, 0, fresh(0xab)).expect("a first key");
        let printed = format!("{cluster:?}");
        assert!(!printed.contains("\\xab"), "{printed}");
        assert!(printed.contains("redacted"));
        super::super::redact_cluster(&mut cluster);
        assert!(cluster.network_bootstrap_keys.is_empty());
    }
}
