//! The process's limit on open files (`RLIMIT_NOFILE`): a manager holds one socket per
//! agent, so at swarm scale (10,000 agents) it needs far more than the common soft default
//! of 1,024. [`raise_open_files_limit`] lifts the soft limit towards a wanted count, never
//! past the hard limit (which only root can raise: the operator's job, `LimitNOFILE=` in a
//! systemd unit or `ulimit -Hn`).
//!
//! Owns nothing. Must never lower a limit, nor touch the hard limit. Its one `unsafe` block
//! each is a plain `getrlimit`/`setrlimit` call on a local struct.

use std::io;

/// The open-files limits of this process after [`raise_open_files_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenFilesLimit {
    /// What the process may open now.
    pub soft: u64,
    /// What the soft limit may be raised to without privileges.
    pub hard: u64,
}

/// The current limits.
///
/// # Errors
/// The OS error of `getrlimit(2)` (none is expected on Linux).
pub fn open_files_limit() -> io::Result<OpenFilesLimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    #[allow(unsafe_code)]
    // SAFETY: getrlimit writes one `rlimit` struct, which we own, and nothing else.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(OpenFilesLimit {
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
    })
}

/// Raises the soft limit on open files to `wanted`, or to the hard limit if that is lower;
/// a soft limit already at or above `wanted` is left alone (never lowered). Returns the
/// limits in force afterwards: the caller compares `soft` with what it needs and sizes its
/// connection cap on it, so that sockets can never take the descriptors its storage needs.
///
/// # Errors
/// The OS error of `getrlimit(2)` or `setrlimit(2)`; the limits are then unchanged.
pub fn raise_open_files_limit(wanted: u64) -> io::Result<OpenFilesLimit> {
    let current = open_files_limit()?;
    let target = wanted.min(current.hard);
    if current.soft >= target {
        return Ok(current);
    }
    let limit = libc::rlimit {
        rlim_cur: target,
        rlim_max: current.hard,
    };
    #[allow(unsafe_code)]
    // SAFETY: setrlimit reads one `rlimit` struct, which we own, and keeps no reference.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(OpenFilesLimit {
        soft: target,
        hard: current.hard,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_never_lowers_and_stays_within_the_hard_limit() {
        let before = open_files_limit().unwrap();
        // Asking for less than the soft limit changes nothing.
        assert_eq!(raise_open_files_limit(1).unwrap(), before);
        // Asking for more ends at the hard limit at most, never below where it was.
        let after = raise_open_files_limit(u64::MAX).unwrap();
        assert_eq!(after.hard, before.hard);
        assert_eq!(after.soft, before.hard);
        assert_eq!(open_files_limit().unwrap(), after);
    }
}
