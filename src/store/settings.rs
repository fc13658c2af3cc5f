//! [`ClusterSettings`]: the cluster object's settings as typed values, for the components
//! that act on them.
//!
//! Consumers: the snapshot interval is applied live by every manager (the control duties
//! thread hands it to the Raft node); the heartbeat period is for the dispatcher and the
//! task history retention for the task reaper, which read it here once they exist.
//!
//! Owns the conversion only: values are clamped into the validation bounds of
//! [`spec`](super::spec) (a value committed by an older build with looser rules must not
//! break a manager). Must never write the store.

use std::time::Duration;

use super::Store;
use super::spec::{
    HEARTBEAT_PERIOD_MS_MAX, HEARTBEAT_PERIOD_MS_MIN, ORPHAN_AFTER_MS_DEFAULT, ORPHAN_AFTER_MS_MAX,
    ORPHAN_AFTER_MS_MIN, SNAPSHOT_INTERVAL_ENTRIES_MAX, TASK_HISTORY_RETENTION_MAX,
    default_cluster_spec,
};
use crate::proto::objects::{Cluster, ClusterSpec};

/// The cluster-wide settings, typed, within their validation bounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSettings {
    /// How often agents heartbeat (the dispatcher declares a node down after 3 missed
    /// periods). Within [1 s, 1 h].
    pub heartbeat_period: Duration,
    /// Applied Raft entries between snapshots, on every manager. Within [1, 10,000,000].
    pub snapshot_interval_entries: u64,
    /// Finished tasks kept per slot by the task reaper. Within [0, 1,000].
    pub task_history_retention: u64,
    /// How long a node is DOWN before the dispatcher marks its tasks ORPHANED (24 h unless
    /// set). Within [1 s, 1 year].
    pub orphan_after: Duration,
}

impl ClusterSettings {
    /// The settings `spec` holds, clamped into the validation bounds.
    pub fn from_spec(spec: &ClusterSpec) -> Self {
        let heartbeat_ms = spec
            .heartbeat_period_ms
            .clamp(HEARTBEAT_PERIOD_MS_MIN, HEARTBEAT_PERIOD_MS_MAX);
        Self {
            heartbeat_period: Duration::from_millis(
                u64::try_from(heartbeat_ms).expect("clamped to a positive range"),
            ),
            snapshot_interval_entries: spec
                .snapshot_interval_entries
                .clamp(1, SNAPSHOT_INTERVAL_ENTRIES_MAX),
            task_history_retention: u64::try_from(
                spec.task_history_retention
                    .clamp(0, TASK_HISTORY_RETENTION_MAX),
            )
            .expect("clamped to a non-negative range"),
            orphan_after: Duration::from_millis(
                u64::try_from(match spec.orphan_after_ms {
                    0 => ORPHAN_AFTER_MS_DEFAULT,
                    set => set.clamp(ORPHAN_AFTER_MS_MIN, ORPHAN_AFTER_MS_MAX),
                })
                .expect("clamped to a positive range"),
            ),
        }
    }

    /// The settings of the cluster object in `store`, or the defaults of a new cluster
    /// while there is none yet (before the first leader created it).
    pub fn current(store: &Store) -> Self {
        store
            .list::<Cluster>()
            .first()
            .and_then(|cluster| cluster.spec.as_ref().map(Self::from_spec))
            .unwrap_or_default()
    }
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self::from_spec(&default_cluster_spec("default"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_swarmkits_and_out_of_range_values_are_clamped() {
        let defaults = ClusterSettings::default();
        assert_eq!(defaults.heartbeat_period, Duration::from_secs(5));
        assert_eq!(defaults.snapshot_interval_entries, 10_000);
        assert_eq!(defaults.task_history_retention, 5);
        assert_eq!(defaults.orphan_after, Duration::from_secs(24 * 60 * 60));
        let mut spec = default_cluster_spec("default");
        spec.heartbeat_period_ms = -1;
        spec.snapshot_interval_entries = 0;
        spec.task_history_retention = i64::MAX;
        spec.orphan_after_ms = 5;
        let clamped = ClusterSettings::from_spec(&spec);
        assert_eq!(clamped.orphan_after, Duration::from_secs(1));
        spec.orphan_after_ms = 0;
        assert_eq!(
            ClusterSettings::from_spec(&spec).orphan_after,
            Duration::from_secs(24 * 60 * 60),
            "an older cluster object without the setting: the default"
        );
        assert_eq!(clamped.heartbeat_period, Duration::from_secs(1));
        assert_eq!(clamped.snapshot_interval_entries, 1);
        assert_eq!(clamped.task_history_retention, 1_000);
    }

    #[test]
    fn current_reads_the_cluster_object_or_falls_back_to_defaults() {
        let store = Store::new(crate::store::StoreConfig::default());
        assert_eq!(ClusterSettings::current(&store), ClusterSettings::default());
        let mut spec = default_cluster_spec("default");
        spec.snapshot_interval_entries = 77;
        spec.heartbeat_period_ms = 2_500;
        let txn = crate::proto::objects::Transaction {
            changes: vec![crate::store::create(Cluster {
                id: "c".into(),
                spec: Some(spec),
                ..Default::default()
            })],
            timestamp_ms: 1,
            request_id: None,
        };
        store.apply(1, &txn).unwrap();
        let settings = ClusterSettings::current(&store);
        assert_eq!(settings.snapshot_interval_entries, 77);
        assert_eq!(settings.heartbeat_period, Duration::from_millis(2_500));
    }
}
