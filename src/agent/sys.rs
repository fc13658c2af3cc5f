//! The few system calls the agent needs that `std` does not offer: signalling a whole process
//! group, seeing that a child exited without reaping it, watching a process that is not
//! its child (one a previous run of the agent started) through a pidfd, and limiting a
//! child between `fork` and `exec` (joining its cgroup, its address-space rlimit).
//!
//! Owns nothing. This is the only place in the agent allowed `unsafe`; each call is a plain
//! libc wrapper whose arguments are checked first. It must never signal a process group id of
//! 0 or 1 (`kill(0, ..)` is the agent's own group, `kill(-1, ..)` every process it may signal).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `SIGTERM`: asks the processes of a task to stop.
pub const SIGTERM: i32 = libc::SIGTERM;
/// `SIGKILL`: stops them without asking.
pub const SIGKILL: i32 = libc::SIGKILL;

/// Sends `signal` to every process of the process group `pgid`; returns whether the group
/// existed (`false`: `ESRCH`, its processes are gone already, which is not an error).
///
/// # Errors
///
/// The OS error of `kill(2)` other than `ESRCH` (`EPERM`: a process of the group belongs to
/// another user).
///
/// # Panics
///
/// If `pgid` is 0 or 1 (see the module doc).
pub fn signal_group(pgid: u32, signal: i32) -> io::Result<bool> {
    assert!(
        pgid > 1,
        "process group {pgid} would reach the agent or every process"
    );
    let pgid = libc::pid_t::try_from(pgid).expect("a pid fits pid_t: it came from the kernel");
    // SAFETY: kill(2) takes two integers and touches no memory of ours.
    let rc = unsafe { libc::kill(-pgid, signal) };
    if rc == 0 {
        return Ok(true);
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::ESRCH) {
        return Ok(false);
    }
    Err(error)
}

/// Makes the child `command` spawns join the cgroup whose `cgroup.procs` is `cgroup_procs`
/// and take `address_space_bytes` as its `RLIMIT_AS`, both before it executes its program:
/// it never runs a moment outside its limits. A failure fails the spawn.
pub fn limit_child(
    command: &mut std::process::Command,
    cgroup_procs: Option<OwnedFd>,
    address_space_bytes: Option<u64>,
) {
    use std::os::unix::process::CommandExt;
    if cgroup_procs.is_none() && address_space_bytes.is_none() {
        return;
    }
    let join_cgroup = move || -> io::Result<()> {
        if let Some(procs) = &cgroup_procs {
            // "0" moves the writing process: the child itself, after fork.
            let pid_zero = b"0";
            // SAFETY: write(2) reads one byte of a static buffer; async-signal-safe.
            let rc = unsafe { libc::write(procs.as_raw_fd(), pid_zero.as_ptr().cast(), 1) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if let Some(bytes) = address_space_bytes {
            let limit = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            // SAFETY: setrlimit(2) reads a valid rlimit; async-signal-safe.
            if unsafe { libc::setrlimit(libc::RLIMIT_AS, &raw const limit) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the closure makes only async-signal-safe system calls and allocates nothing
    // (an OS error is a plain integer), as code between fork and exec must.
    unsafe {
        command.pre_exec(join_cgroup);
    }
}

/// Whether the child `pid` has exited, leaving it unreaped (`waitid` with `WNOWAIT`).
///
/// An unreaped child keeps its pid, so its process group id cannot be reused: the caller can
/// still signal the survivors of its group safely, then reap it with `Child::wait`.
///
/// # Errors
///
/// The OS error of `waitid(2)` (`ECHILD`: `pid` is not an unreaped child of this process).
pub fn exited_unreaped(pid: u32) -> io::Result<bool> {
    let id = libc::id_t::from(pid);
    // SAFETY: siginfo_t is a plain C struct for which all-zero bytes are a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
    // SAFETY: `info` is a valid, writable siginfo_t that outlives the call.
    let rc = unsafe { libc::waitid(libc::P_PID, id, &raw mut info, flags) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // With WNOHANG and no state change the kernel leaves si_pid at 0 (we zeroed it).
    // SAFETY: reading si_pid of a siginfo_t filled by waitid (or zeroed) is always valid.
    Ok(unsafe { info.si_pid() } != 0)
}

/// A pidfd for process `pid` (`pidfd_open(2)`, Linux 5.3+): it names that process and no
/// other, even after its pid is reused, and becomes readable once it has exited, whoever its
/// parent is.
///
/// # Errors
///
/// The OS error: `ESRCH` (no such process), `ENOSYS` (a kernel older than 5.3: the caller
/// falls back to `/proc`).
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).expect("a pid fits pid_t: it came from the kernel");
    // SAFETY: pidfd_open takes a pid and flags and touches no memory of ours.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(rc).expect("a file descriptor fits an int");
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether the process behind `pidfd` has exited (a zombie counts); never blocks (`poll`
/// with a zero timeout).
///
/// # Errors
///
/// The OS error of `poll(2)` other than `EINTR` (retried).
pub fn pidfd_exited(pidfd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut entry = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: `entry` is a valid pollfd that outlives the call; one entry is passed.
        let rc = unsafe { libc::poll(&raw mut entry, 1, 0) };
        if rc >= 0 {
            return Ok(rc > 0 && entry.revents & libc::POLLIN != 0);
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINTR) {
            return Err(error);
        }
    }
}

/// Whether a process `pid` exists (`kill(pid, 0)`): zombies count as existing, and `EPERM`
/// (it exists but belongs to another user) too.
#[cfg(test)]
pub fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill(2) with signal 0 only checks permission and existence.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Whether `pid` is gone for good: no such process, or a zombie (dead, waiting for a parent
/// that may never reap it, such as a container's init).
#[cfg(test)]
pub fn process_dead(pid: u32) -> bool {
    if !process_exists(pid) {
        return true;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    matches!(state, Some("Z" | "X"))
}

/// Waits until `pid` is dead (see [`process_dead`]), at most `limit`; returns whether it is.
/// A signal is delivered asynchronously: `kill` returns before its target has died.
#[cfg(test)]
pub fn wait_dead(pid: u32, limit: std::time::Duration) -> bool {
    let give_up = std::time::Instant::now() + limit;
    while !process_dead(pid) {
        if std::time::Instant::now() >= give_up {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    true
}
