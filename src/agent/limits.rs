//! Resource limits of task processes (`TaskSpec.resources.limits`): how this node enforces
//! them, and what it says when it cannot.
//!
//! **cgroup v2**, where the host has it: at start the agent finds the unified hierarchy
//! (`/proc/self/mountinfo`) and its own cgroup in it (`/proc/self/cgroup`), checks that the
//! `memory` and `cpu` controllers are available there, enables them for a `flotilla` cgroup
//! it creates under its own (a cgroup that holds processes and is not the root cannot pass
//! controllers down: then there is none), and gives each limited task its own cgroup under it
//! (`flotilla/<task id>`: `memory.max`, `memory.swap.max` 0, `cpu.max` with a 100 ms
//! period). The child joins it between `fork` and `exec` ([`sys::limit_child`]), and the
//! task's cgroup is removed when the task ends (its stragglers killed through
//! `cgroup.kill`). **Otherwise** a memory limit becomes the process's `RLIMIT_AS` (its
//! address space: a cap on virtual memory, so a program that maps much more than it uses
//! may fail sooner than its resident size suggests), and a CPU limit is not enforced: no
//! rlimit caps a CPU share. Either gap is said in the task's `status.limits_note`.
//!
//! Owns the `flotilla` cgroup's task directories. Must never move a process other than a
//! task's child into a cgroup, write outside `flotilla/`, or fail a task whose limits
//! cannot be enforced (it runs, and the note says so).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::proto::objects::TaskSpec;

use super::sys;

/// The cgroup the agent creates under its own for its tasks' cgroups.
pub const TASKS_CGROUP_NAME: &str = "flotilla";

/// The period of `cpu.max`: a task limited to N CPUs runs N × this per period.
const CPU_PERIOD_US: u64 = 100_000;

/// Nano-CPUs per CPU.
const NANO_CPUS_PER_CPU: u64 = 1_000_000_000;

/// The smallest CPU quota the kernel takes in `cpu.max` (1 ms).
const CPU_QUOTA_US_MIN: u64 = 1_000;

/// How many times removing a task's cgroup is tried while its killed processes exit.
const CGROUP_REMOVE_ATTEMPTS_MAX: u32 = 20;
/// The pause between two of those attempts.
const CGROUP_REMOVE_PAUSE: Duration = Duration::from_millis(5);

/// How this node enforces limits, found once when the agent starts.
#[derive(Debug)]
pub struct Limiter {
    /// The `flotilla` cgroup and the controllers enabled in it; `None` without cgroup v2.
    cgroup: Option<TasksCgroup>,
    /// Why there is no cgroup (or no controller), in the user's terms, for the notes.
    why_not: String,
}

#[derive(Debug)]
struct TasksCgroup {
    dir: PathBuf,
    memory: bool,
    cpu: bool,
}

/// What a task's process gets: handed to [`super::executor::spawn_limited`].
#[derive(Debug, Default)]
pub struct Prepared {
    /// The task cgroup's `cgroup.procs`, open for writing (the child joins it).
    pub cgroup_procs: Option<OwnedFd>,
    /// The child's `RLIMIT_AS`, bytes.
    pub address_space_bytes: Option<u64>,
    /// What this node does not enforce, and why (empty: everything asked is enforced).
    pub note: String,
}

impl Limiter {
    /// Finds how this host limits processes: cgroup v2 if it is there, writable and has
    /// the controllers, else rlimits (the reason kept for the notes).
    pub fn detect() -> Self {
        match TasksCgroup::set_up() {
            Ok(cgroup) => {
                let why_not = if cgroup.memory && cgroup.cpu {
                    String::new()
                } else {
                    format!(
                        "cgroup v2 at {} lacks the {} controller",
                        cgroup.dir.display(),
                        if cgroup.cpu { "memory" } else { "cpu" }
                    )
                };
                log::info!(
                    "task limits: cgroup v2 under {} (memory: {}, cpu: {})",
                    cgroup.dir.display(),
                    cgroup.memory,
                    cgroup.cpu
                );
                Self {
                    cgroup: Some(cgroup),
                    why_not,
                }
            }
            Err(why_not) => {
                log::info!(
                    "task limits: no cgroup v2 ({why_not}); memory limits are address-space \
                     rlimits, CPU limits are not enforced"
                );
                Self::rlimits_only(why_not)
            }
        }
    }

    /// A limiter that uses rlimits only (tests; a host without cgroup v2).
    pub fn rlimits_only(why_not: String) -> Self {
        Self {
            cgroup: None,
            why_not,
        }
    }

    /// Prepares the limits of task `task_id` run as `spec`: its cgroup (created), or its
    /// rlimit, and the note on what is not enforced. A cgroup that cannot be made falls
    /// back to the rlimit, never fails the task.
    pub fn prepare(&self, task_id: &str, spec: &TaskSpec) -> Prepared {
        let limits = spec
            .resources
            .as_ref()
            .and_then(|resources| resources.limits)
            .unwrap_or_default();
        let memory_bytes = u64::try_from(limits.memory_bytes).unwrap_or(0);
        let nano_cpus = u64::try_from(limits.nano_cpus).unwrap_or(0);
        if memory_bytes == 0 && nano_cpus == 0 {
            return Prepared::default();
        }
        let mut why_not = self.why_not.clone();
        let mut joined = None;
        if let Some(cgroup) = &self.cgroup {
            match cgroup.task_cgroup(task_id, memory_bytes, nano_cpus) {
                Ok(procs) => joined = Some(procs),
                Err(error) => {
                    why_not = format!("cannot create its cgroup: {error}");
                    log::warn!("task {task_id}: {why_not}; falling back to rlimits");
                }
            }
        }
        let by_cgroup = |wanted: bool, controller: bool| wanted && joined.is_some() && controller;
        let memory_in_cgroup = by_cgroup(
            memory_bytes > 0,
            self.cgroup.as_ref().is_some_and(|c| c.memory),
        );
        let cpu_in_cgroup = by_cgroup(nano_cpus > 0, self.cgroup.as_ref().is_some_and(|c| c.cpu));
        let mut notes = Vec::new();
        let address_space_bytes = (memory_bytes > 0 && !memory_in_cgroup).then(|| {
            notes.push(format!(
                "--limit-memory is enforced as an address-space rlimit (RLIMIT_AS: virtual, \
                 not resident, memory) because {why_not}"
            ));
            memory_bytes
        });
        if nano_cpus > 0 && !cpu_in_cgroup {
            notes.push(format!(
                "--limit-cpu is not enforced on this node: {why_not} (no rlimit caps a CPU \
                 share)"
            ));
        }
        Prepared {
            cgroup_procs: joined,
            address_space_bytes,
            note: notes.join("; "),
        }
    }

    /// Removes task `task_id`'s cgroup, if it has one, killing what is left in it first.
    pub fn release(&self, task_id: &str) {
        let Some(cgroup) = &self.cgroup else {
            return;
        };
        if super::executor::validate_task_id(task_id).is_err() {
            return;
        }
        let dir = cgroup.dir.join(task_id);
        if !dir.exists() {
            return;
        }
        // Processes that left the task's process group are still in its cgroup.
        let _ignored = fs::write(dir.join("cgroup.kill"), "1");
        for attempt in 1..=CGROUP_REMOVE_ATTEMPTS_MAX {
            match fs::remove_dir(&dir) {
                Ok(()) => return,
                Err(error) if error.kind() == io::ErrorKind::NotFound => return,
                Err(error) if attempt == CGROUP_REMOVE_ATTEMPTS_MAX => {
                    log::warn!("cannot remove the cgroup {}: {error}", dir.display());
                }
                Err(_) => std::thread::sleep(CGROUP_REMOVE_PAUSE),
            }
        }
    }

    /// True if this node limits tasks with cgroups.
    pub fn uses_cgroups(&self) -> bool {
        self.cgroup.is_some()
    }
}

impl TasksCgroup {
    /// Creates (or reuses) the `flotilla` cgroup under the agent's own with the `memory`
    /// and `cpu` controllers enabled for its children.
    fn set_up() -> Result<Self, String> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let mount = cgroup2_mount(&mountinfo)
            .ok_or_else(|| "the host has no cgroup v2 hierarchy mounted".to_string())?;
        let own = fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let own = unified_path(&own)
            .ok_or_else(|| "the agent is in no cgroup v2 (hybrid host)".to_string())?;
        let base = mount.join(own.trim_start_matches('/'));
        let available = fs::read_to_string(base.join("cgroup.controllers")).map_err(|e| {
            format!(
                "cannot read {}: {e}",
                base.join("cgroup.controllers").display()
            )
        })?;
        let memory = has_word(&available, "memory");
        let cpu = has_word(&available, "cpu");
        if !memory && !cpu {
            return Err(format!(
                "the cgroup v2 hierarchy at {} offers neither the memory nor the cpu \
                 controller (they are bound to cgroup v1 on this host)",
                base.display()
            ));
        }
        let wanted = controllers_text(memory, cpu);
        // The agent's cgroup must pass the controllers down; it may not (a non-root cgroup
        // holding processes cannot): then there is no cgroup for the tasks.
        write_controllers(&base, &wanted)?;
        let dir = base.join(TASKS_CGROUP_NAME);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
            Err(error) => return Err(format!("cannot create {}: {error}", dir.display())),
        }
        write_controllers(&dir, &wanted)?;
        Ok(Self { dir, memory, cpu })
    }

    /// Creates task `task_id`'s cgroup with its limits; returns its `cgroup.procs`, open.
    fn task_cgroup(&self, task_id: &str, memory_bytes: u64, nano_cpus: u64) -> io::Result<OwnedFd> {
        super::executor::validate_task_id(task_id)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let dir = self.dir.join(task_id);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
            Err(error) => return Err(error),
        }
        if self.memory && memory_bytes > 0 {
            fs::write(dir.join("memory.max"), memory_bytes.to_string())?;
            // Without this a task over its limit swaps instead of being stopped.
            let _ignored = fs::write(dir.join("memory.swap.max"), "0");
        }
        if self.cpu && nano_cpus > 0 {
            fs::write(dir.join("cpu.max"), cpu_max_text(nano_cpus))?;
        }
        let procs: File = OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))?;
        Ok(OwnedFd::from(procs))
    }
}

fn write_controllers(dir: &Path, wanted: &str) -> Result<(), String> {
    let file = dir.join("cgroup.subtree_control");
    let enabled = fs::read_to_string(&file).unwrap_or_default();
    let missing = wanted
        .split_whitespace()
        .any(|word| !has_word(&enabled, word.trim_start_matches('+')));
    if !missing {
        return Ok(());
    }
    fs::write(&file, wanted).map_err(|e| {
        format!(
            "cannot enable {wanted} in {} ({e}); run the agent in a cgroup of its own, \
             with write access",
            file.display()
        )
    })
}

fn controllers_text(memory: bool, cpu: bool) -> String {
    let mut words = Vec::new();
    if memory {
        words.push("+memory");
    }
    if cpu {
        words.push("+cpu");
    }
    words.join(" ")
}

fn has_word(text: &str, word: &str) -> bool {
    text.split_whitespace().any(|w| w == word)
}

/// `cpu.max` for `nano_cpus`: the quota per [`CPU_PERIOD_US`] and the period.
fn cpu_max_text(nano_cpus: u64) -> String {
    let quota_us = (u128::from(nano_cpus) * u128::from(CPU_PERIOD_US)
        / u128::from(NANO_CPUS_PER_CPU))
    .max(u128::from(CPU_QUOTA_US_MIN));
    format!("{quota_us} {CPU_PERIOD_US}")
}

/// The mount point of the cgroup v2 hierarchy in `/proc/self/mountinfo` text (fields: id,
/// parent, major:minor, root, mount point, options, optional fields, `-`, type, ...).
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let fstype = after.split_whitespace().next()?;
        let mount_point = before.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

/// The agent's cgroup v2 path in `/proc/self/cgroup` text (the `0::<path>` line).
fn unified_path(cgroup: &str) -> Option<String> {
    cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::to_string)
}

/// Applies `prepared` to the child `command` will spawn.
pub(super) fn apply(command: &mut std::process::Command, prepared: Prepared) {
    sys::limit_child(command, prepared.cgroup_procs, prepared.address_space_bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::objects::{ResourceRequirements, Resources};

    fn limited(memory_bytes: i64, nano_cpus: i64) -> TaskSpec {
        TaskSpec {
            command: "sleep".into(),
            resources: Some(ResourceRequirements {
                reservations: None,
                limits: Some(Resources {
                    nano_cpus,
                    memory_bytes,
                }),
            }),
            ..TaskSpec::default()
        }
    }

    #[test]
    fn the_cgroup_v2_mount_and_path_are_read() {
        let mountinfo = "25 30 0:22 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                         26 30 0:23 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount("1 2 0:1 / / rw - ext4 /dev/sda rw"), None);
        assert_eq!(
            unified_path("4:memory:/x\n0::/user.slice/agent\n").as_deref(),
            Some("/user.slice/agent")
        );
        assert_eq!(unified_path("4:memory:/x\n"), None);
    }

    #[test]
    fn cpu_max_is_a_quota_per_100_ms() {
        assert_eq!(cpu_max_text(500_000_000), "50000 100000");
        assert_eq!(cpu_max_text(2_000_000_000), "200000 100000");
        assert_eq!(cpu_max_text(1), "1000 100000");
    }

    #[test]
    fn without_cgroups_memory_is_an_rlimit_and_cpu_is_noted_unenforced() {
        let limiter = Limiter::rlimits_only("no cgroup v2 here".into());
        let none = limiter.prepare("t1", &limited(0, 0));
        assert!(none.note.is_empty() && none.address_space_bytes.is_none());
        let memory = limiter.prepare("t1", &limited(64 << 20, 0));
        assert_eq!(memory.address_space_bytes, Some(64 << 20));
        assert!(memory.note.contains("RLIMIT_AS"), "{}", memory.note);
        assert!(!memory.note.contains("--limit-cpu"), "{}", memory.note);
        let cpu = limiter.prepare("t1", &limited(0, 500_000_000));
        assert_eq!(cpu.address_space_bytes, None);
        assert!(
            cpu.note.contains("--limit-cpu is not enforced") && cpu.note.contains("no cgroup v2"),
            "{}",
            cpu.note
        );
    }
}
