//! The agent's last acknowledged contact with the managers, kept in a small file so that a
//! restarted agent fences the processes it adopts from when the managers last heard from
//! it, not from its own start.
//!
//! The managers count a node's silence from the last call of it they answered; past
//! `tasks_reassigned_after` they may run its tasks elsewhere (see `agent::session`, "Self-
//! fencing"). An agent that was cut off for a while and then restarted would otherwise give
//! its adopted processes a whole new allowance: they could run beside their replacements
//! for up to that allowance again.
//!
//! The file holds one line, `v1 <sent_at_unix_ms> <reassigned_after_ms>`, replaced by a
//! rename on every acknowledged contact. It is never fsynced, on purpose: only a crash of
//! the host can lose the rename, and that kills the processes the record protects; an older
//! record left behind makes the fence earlier, never later. A missing or unreadable record
//! falls back to counting from the start with the floor (the behaviour without a record).
//!
//! Must never decide anything from a wall clock that went backwards: the allowance left is
//! clamped to what a fresh contact would give.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The name of the record in the agent's state directory.
pub const LAST_CONTACT_FILE_NAME: &str = "last-contact";

/// The record's size limit: one short line; anything longer is not ours.
const RECORD_BYTES_MAX: u64 = 128;

/// The version tag of the record's line.
const RECORD_VERSION: &str = "v1";

/// One acknowledged contact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Contact {
    /// When the agent sent the call the managers answered (Unix milliseconds).
    pub sent_at_unix_ms: i64,
    /// The silence after which the managers may give this node's tasks to other nodes, as
    /// they said then.
    pub reassigned_after: Duration,
}

/// Where the record lives.
#[derive(Clone, Debug)]
pub struct LastContact {
    path: PathBuf,
}

impl LastContact {
    /// The record in `state_dir` ([`LAST_CONTACT_FILE_NAME`]).
    pub fn in_dir(state_dir: &Path) -> Self {
        LastContact {
            path: state_dir.join(LAST_CONTACT_FILE_NAME),
        }
    }

    /// Replaces the record with `contact` (a temporary file renamed over it; no fsync, see
    /// the module doc).
    ///
    /// # Errors
    /// The IO error of writing or renaming the file.
    pub fn save(&self, contact: Contact) -> std::io::Result<()> {
        let tmp = crate::util::fsutil::temp_path_for(&self.path);
        let line = format!(
            "{RECORD_VERSION} {} {}\n",
            contact.sent_at_unix_ms,
            contact.reassigned_after.as_millis()
        );
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(crate::util::fsutil::MODE_PRIVATE)
            .open(&tmp)
            .and_then(|mut file| file.write_all(line.as_bytes()))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }

    /// The record, if there is a readable one. A damaged record is logged and ignored
    /// (the agent then counts from its start, as without one).
    pub fn load(&self) -> Option<Contact> {
        let metadata = std::fs::metadata(&self.path).ok()?;
        if metadata.len() > RECORD_BYTES_MAX {
            log::warn!(
                "agent: ignoring {}: larger than a contact record",
                self.path.display()
            );
            return None;
        }
        let text = std::fs::read_to_string(&self.path).ok()?;
        let parsed = parse_record(&text);
        if parsed.is_none() {
            log::warn!(
                "agent: ignoring {}: not a contact record ({:?})",
                self.path.display(),
                text.trim()
            );
        }
        parsed
    }
}

fn parse_record(text: &str) -> Option<Contact> {
    let mut words = text.split_whitespace();
    if words.next()? != RECORD_VERSION {
        return None;
    }
    let sent_at_unix_ms: i64 = words.next()?.parse().ok()?;
    let reassigned_after_ms: u64 = words.next()?.parse().ok()?;
    if words.next().is_some() || sent_at_unix_ms <= 0 {
        return None;
    }
    Some(Contact {
        sent_at_unix_ms,
        reassigned_after: Duration::from_millis(reassigned_after_ms),
    })
}

/// When the processes adopted at start must stop if no contact comes first: `margin`
/// before the managers may give them to other nodes, counted from `last` (the record of a
/// previous run), or from `now` with `floor` when there is none.
///
/// The allowance left is clamped to `[0, reassigned_after − margin]`: a record from the
/// future (a wall clock set back) gives no more than a fresh contact would.
pub fn deadline_at_start(
    last: Option<Contact>,
    now: Instant,
    now_unix_ms: i64,
    floor: Duration,
    margin: Duration,
) -> Instant {
    let Some(last) = last else {
        return now + floor.saturating_sub(margin);
    };
    let allowance = last.reassigned_after.saturating_sub(margin);
    let since_contact_ms =
        u64::try_from(now_unix_ms.saturating_sub(last.sent_at_unix_ms)).unwrap_or(0);
    now + allowance.saturating_sub(Duration::from_millis(since_contact_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOOR: Duration = Duration::from_secs(13);
    const MARGIN: Duration = Duration::from_secs(2);

    fn contact(sent_at_unix_ms: i64, after_s: u64) -> Option<Contact> {
        Some(Contact {
            sent_at_unix_ms,
            reassigned_after: Duration::from_secs(after_s),
        })
    }

    #[test]
    fn without_a_record_the_deadline_counts_from_the_start_with_the_floor() {
        let now = Instant::now();
        let deadline = deadline_at_start(None, now, 1_000_000, FLOOR, MARGIN);
        assert_eq!(deadline, now + Duration::from_secs(11));
    }

    #[test]
    fn a_recent_contact_leaves_what_remains_of_its_allowance() {
        let now = Instant::now();
        // Contact 4 s ago, reassigned after 25 s: 25 − 2 − 4 = 19 s left.
        let deadline = deadline_at_start(contact(96_000, 25), now, 100_000, FLOOR, MARGIN);
        assert_eq!(deadline, now + Duration::from_secs(19));
    }

    #[test]
    fn a_contact_older_than_its_allowance_fences_at_once() {
        let now = Instant::now();
        let deadline = deadline_at_start(contact(50_000, 13), now, 100_000, FLOOR, MARGIN);
        assert_eq!(deadline, now);
    }

    #[test]
    fn a_contact_from_the_future_gives_no_more_than_a_fresh_one() {
        let now = Instant::now();
        let deadline = deadline_at_start(contact(500_000, 13), now, 100_000, FLOOR, MARGIN);
        assert_eq!(deadline, now + Duration::from_secs(11));
    }

    #[test]
    fn the_record_round_trips_and_a_damaged_one_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let record = LastContact::in_dir(dir.path());
        assert_eq!(record.load(), None, "no record yet");
        let saved = Contact {
            sent_at_unix_ms: 1_765_000_000_123,
            reassigned_after: Duration::from_millis(13_500),
        };
        record.save(saved).unwrap();
        assert_eq!(record.load(), Some(saved));
        for damaged in ["", "v1 12", "v2 1 2", "v1 -5 2", "v1 1 2 3", "v1 x 2"] {
            std::fs::write(dir.path().join(LAST_CONTACT_FILE_NAME), damaged).unwrap();
            assert_eq!(record.load(), None, "{damaged:?}");
        }
        std::fs::write(dir.path().join(LAST_CONTACT_FILE_NAME), vec![b'1'; 4096]).unwrap();
        assert_eq!(record.load(), None, "oversized");
    }
}
