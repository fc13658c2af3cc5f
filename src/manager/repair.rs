//! `flotilla repair`: what is left of a manager's damaged Raft state, and, once the
//! operator accepts the loss, a state directory that starts from it.
//!
//! For the cluster's only manager when no backup exists. A manager of a multi-manager
//! cluster never repairs: its log would be shorter than what it acknowledged to the others,
//! and voting with it could erase committed writes cluster-wide; it rejoins instead
//! (`flotilla rejoin`), taking the state from the others.
//!
//! Must never change anything without `--accept-loss`, never delete a file (an unreadable
//! log is set aside as `raft/log.damaged-<time>`), and never run beside a live manager (it
//! takes the state directory's lock).

use std::collections::BTreeSet;
use std::path::Path;

use crate::raft::core::membership;
use crate::raft::storage::watermark::accept_recovered;
use crate::raft::storage::{
    LogStore, Recovered, StorageConfig, StorageError, Watermark, WatermarkError,
};
use crate::raft::types::{EntryKind, LogIndex, NodeId};
use crate::state_dir::{StateDir, StateDirError};

/// Bytes of log read at a time while looking for membership entries.
const SCAN_BATCH_BYTES: u64 = 16 << 20;

/// Why `repair` stopped without repairing.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    /// The settings or the directory could not be read (or another process holds it).
    #[error(transparent)]
    StateDir(#[from] StateDirError),
    /// Storage could not be read or written.
    #[error("{0}")]
    Storage(#[from] StorageError),
    /// Other managers vote with this one.
    #[error(
        "this manager is one of {voters} voting managers ({others}): repairing it alone could \
         erase writes the others committed. Take the cluster's state from them instead: \
         `flotilla rejoin --state-dir {dir} --token <manager token> <manager address>`"
    )]
    NotAlone {
        /// Voters in the membership this storage last knew.
        voters: usize,
        /// The other voters' Raft ids.
        others: String,
        /// The state directory.
        dir: String,
    },
}

/// What `repair` found (and did).
#[derive(Debug)]
pub struct RepairReport {
    /// One line per finding, in the operator's terms.
    pub findings: Vec<String>,
    /// True if nothing was lost (the state is whole).
    pub whole: bool,
    /// True if the directory was changed (only with `accept_loss`).
    pub repaired: bool,
}

/// Examines the Raft state in `dir`; with `accept_loss`, makes it start from what is left.
///
/// # Errors
/// [`RepairError`]: an unreadable state directory, a manager that is not alone, storage
/// errors.
pub fn repair(dir: &StateDir, accept_loss: bool) -> Result<RepairReport, RepairError> {
    let _lock = dir.lock()?;
    let settings = dir.load_settings()?;
    let raft_dir = dir.raft_dir();
    let mut findings = Vec::new();
    let (store, recovered) = match LogStore::open(&raft_dir, &StorageConfig::default()) {
        Ok(opened) => opened,
        Err(error) => {
            findings.push(format!(
                "the Raft log in {} cannot be read: {error}",
                log_dir_name(&raft_dir)
            ));
            if !accept_loss {
                findings.push(
                    "with --accept-loss it is set aside and the manager starts from the newest \
                     valid snapshot (everything after it is lost)"
                        .into(),
                );
                return Ok(RepairReport {
                    findings,
                    whole: false,
                    repaired: false,
                });
            }
            let aside = set_log_aside(&raft_dir)?;
            findings.push(format!("set the unreadable log aside as {aside}"));
            LogStore::open(&raft_dir, &StorageConfig::default())?
        }
    };
    refuse_unless_alone(dir, &store, &recovered, settings.raft_id)?;
    let coverage = describe(&recovered);
    let shortfall = match Watermark::open(&raft_dir) {
        Ok(watermark) => watermark
            .check(settings.raft_id, &recovered, &store)
            .err()
            .map(|s| s.to_string()),
        Err(WatermarkError::Missing(path)) => Some(format!(
            "{} is missing, so nothing says how much of the log must be there",
            path.display()
        )),
        Err(e) => Some(e.to_string()),
    };
    let Some(shortfall) = shortfall else {
        if findings.is_empty() {
            findings.push(format!(
                "the Raft state is whole: {coverage}; nothing to repair"
            ));
            return Ok(RepairReport {
                findings,
                whole: true,
                repaired: false,
            });
        }
        return accept(
            dir,
            settings.raft_id,
            &recovered,
            &store,
            findings,
            coverage,
        );
    };
    findings.push(format!("{shortfall}; storage holds {coverage}"));
    if !accept_loss {
        findings.push(format!(
            "with --accept-loss the manager starts from that ({coverage}); what the log lost \
             stays lost"
        ));
        return Ok(RepairReport {
            findings,
            whole: false,
            repaired: false,
        });
    }
    accept(
        dir,
        settings.raft_id,
        &recovered,
        &store,
        findings,
        coverage,
    )
}

fn accept(
    dir: &StateDir,
    raft_id: NodeId,
    recovered: &Recovered,
    store: &LogStore,
    mut findings: Vec<String>,
    coverage: String,
) -> Result<RepairReport, RepairError> {
    let record = accept_recovered(&dir.raft_dir(), raft_id, recovered, store)?;
    findings.push(format!(
        "accepted the Raft state as it is ({coverage}); the watermark now records term {} and \
         commit {}",
        record.term, record.commit
    ));
    Ok(RepairReport {
        findings,
        whole: false,
        repaired: true,
    })
}

fn describe(recovered: &Recovered) -> String {
    let log = if recovered.bounds.last_index < recovered.bounds.first_index {
        "an empty log".to_string()
    } else {
        format!(
            "log entries {}..={}",
            recovered.bounds.first_index, recovered.bounds.last_index
        )
    };
    match &recovered.snapshot {
        Some(info) => format!("{log} after a snapshot at {}", info.meta.index),
        None => format!("{log} and no snapshot"),
    }
}

/// Refuses when the membership this storage last knew has other voters.
fn refuse_unless_alone(
    dir: &StateDir,
    store: &LogStore,
    recovered: &Recovered,
    raft_id: NodeId,
) -> Result<(), RepairError> {
    let voters = last_known_voters(store, recovered)?;
    let others: Vec<String> = voters
        .iter()
        .filter(|&&id| id != raft_id)
        .map(|id| format!("{id:x}"))
        .collect();
    if others.is_empty() {
        return Ok(());
    }
    Err(RepairError::NotAlone {
        voters: voters.len(),
        others: others.join(", "),
        dir: dir.root().display().to_string(),
    })
}

/// The voters of the newest membership in the snapshot or the log.
fn last_known_voters(
    store: &LogStore,
    recovered: &Recovered,
) -> Result<BTreeSet<NodeId>, StorageError> {
    let mut voters = recovered
        .snapshot
        .as_ref()
        .map(|s| s.meta.membership.voters.clone())
        .unwrap_or_default();
    let bounds = recovered.bounds;
    let mut next: LogIndex = bounds.first_index;
    while next <= bounds.last_index {
        let batch = store.entries(next..bounds.last_index + 1, SCAN_BATCH_BYTES)?;
        next += batch.len() as u64;
        for entry in batch.iter().filter(|e| e.kind == EntryKind::Membership) {
            if let Some(members) = membership::decode(&entry.data) {
                voters = members.voters;
            }
        }
    }
    Ok(voters)
}

/// The log database's directory, for messages (`log.current` names it once the log moved
/// to a new generation; if that file is unreadable, the directory holding it).
fn log_dir_name(raft_dir: &Path) -> String {
    crate::raft::storage::current_log_dir(raft_dir)
        .unwrap_or_else(|_| raft_dir.to_path_buf())
        .display()
        .to_string()
}

/// Moves the log database aside as `log.damaged-<unix seconds>` (every generation of it,
/// and the file naming the current one: see `raft::storage::generation`).
fn set_log_aside(raft_dir: &Path) -> Result<String, StateDirError> {
    let seconds = crate::util::clock::unix_now_ms() / 1000;
    let aside = crate::raft::storage::generation::set_aside_all(raft_dir, &seconds.to_string())
        .map_err(|source| StateDirError::Io {
            path: raft_dir.to_path_buf(),
            source,
        })?
        .iter()
        .map(|path| path.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    Ok(aside)
}
