//! `flotilla cluster inspect|update`: the cluster commands and their arguments.
//!
//! Must never talk to the transport except through [`Client`], nor print a table itself
//! (tables are in [`super::output`]).

use clap::Subcommand;

use super::client::Client;
use super::flags::parse_duration_ms;
use super::output::Format;
use crate::cli::{CommandError, json};
use crate::control as api;
use crate::proto::control as pb;

/// `flotilla cluster …`
#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Show the cluster object (JSON).
    Inspect,
    /// Change cluster settings.
    Update {
        /// Agent heartbeat period, 1s to 1h (e.g. `5s`); for the dispatcher.
        #[arg(long)]
        heartbeat_period: Option<String>,
        /// Raft log entries between snapshots, 1 to 10,000,000; applied live by every
        /// manager whose manager.conf does not pin its own.
        #[arg(long)]
        snapshot_interval: Option<u64>,
        /// Raft entries kept behind a snapshot for slow followers.
        #[arg(long)]
        log_entries_for_slow_followers: Option<u64>,
        /// Old snapshots kept on disk.
        #[arg(long)]
        keep_old_snapshots: Option<u64>,
        /// Finished tasks kept per slot, 0 to 1,000; for the task reaper.
        #[arg(long)]
        task_history_retention: Option<i64>,
        /// Lifetime of node certificates (e.g. `2160h`).
        #[arg(long)]
        cert_expiry: Option<String>,
        /// How long a node stays down before its tasks are marked orphaned, 1s to a year
        /// (default 24h); for the dispatcher.
        #[arg(long)]
        orphan_after: Option<String>,
        /// Refuse the update unless the cluster is still at this version.
        #[arg(long)]
        if_version: Option<u64>,
    },
}

pub(super) fn run(client: &Client, command: ClusterCommand) -> Result<(), CommandError> {
    let reply: pb::ClusterResponse = client.unary(api::GET_CLUSTER, &pb::GetClusterRequest {})?;
    let current = reply.cluster.unwrap_or_default();
    match command {
        ClusterCommand::Inspect => client.print_json(&json::cluster(&current)),
        ClusterCommand::Update {
            heartbeat_period,
            snapshot_interval,
            log_entries_for_slow_followers,
            keep_old_snapshots,
            task_history_retention,
            cert_expiry,
            orphan_after,
            if_version,
        } => {
            let mut spec = current.spec.clone().unwrap_or_default();
            if let Some(period) = heartbeat_period {
                spec.heartbeat_period_ms = parse_duration_ms("heartbeat-period", &period)?;
            }
            if let Some(entries) = snapshot_interval {
                spec.snapshot_interval_entries = entries;
            }
            if let Some(entries) = log_entries_for_slow_followers {
                spec.log_entries_for_slow_followers = entries;
            }
            if let Some(kept) = keep_old_snapshots {
                spec.keep_old_snapshots = kept;
            }
            if let Some(retention) = task_history_retention {
                spec.task_history_retention = retention;
            }
            if let Some(expiry) = cert_expiry {
                spec.node_cert_expiry_ms = parse_duration_ms("cert-expiry", &expiry)?;
            }
            if let Some(after) = orphan_after {
                spec.orphan_after_ms = parse_duration_ms("orphan-after", &after)?;
            }
            let version =
                if_version.unwrap_or_else(|| current.meta.as_ref().map_or(0, |m| m.version));
            let reply: pb::ClusterResponse = client.write(
                api::UPDATE_CLUSTER,
                &pb::UpdateClusterRequest {
                    version,
                    spec: Some(spec),
                    request_id: client.next_request(),
                },
                "flotilla cluster inspect",
            )?;
            let updated = reply.cluster.unwrap_or_default();
            match client.format {
                Format::Json => client.print_json(&json::cluster(&updated)),
                Format::Table => out!(
                    "cluster {} updated to version {}",
                    updated.id,
                    updated.meta.as_ref().map_or(0, |m| m.version)
                ),
            }
        }
    }
    Ok(())
}
