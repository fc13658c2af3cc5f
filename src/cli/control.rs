//! `flotilla service|node|task|cluster|join-token …`: control API calls through a manager,
//! over mutual TLS with the node identity in the state directory. Writes may go to any
//! manager (a follower forwards them to the leader); reads are linearizable anywhere.
//!
//! Writes are exactly-once ([`Client::write`]): each carries this invocation's client id and
//! a request number, the same on every retry, so a retry after an unknown outcome gets the
//! first attempt's answer. A write whose outcome stays unknown after the retries is
//! reported as such ([`CommandError::OutcomeUnknown`], exit code
//! [`super::EXIT_OUTCOME_UNKNOWN`]), never as failed or as a conflict.
//!
//! Must never change cluster state except through `control.*` calls.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};

use super::CommandError;
use super::json;
use crate::ca::{NodeIdentity, RootCert, load_node_files, tls};
use crate::control as api;
use crate::manager::StateDir;
use crate::net::{CallOptions, Transport, TransportConfig};
use crate::proto::control as pb;
use crate::proto::json::{ProtoEnum, choices_text, label, parse_label};
use crate::proto::objects::{
    ManagerStatus, NodeAvailability, NodeRole, NodeState, Placement, RaftReachability, RequestId,
    ResourceRequirements, Resources, RestartCondition, RestartPolicy, ServiceMode, ServiceSpec,
    TaskSpec, TaskState, UpdateConfig, UpdateFailureAction, UpdateOrder,
};
use crate::wire::{Code, Status, WriteFate};

/// Deadline of one control call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Extra attempts of a call refused with the reason [`crate::wire::RETRY_SOON`] (an
/// election, a transfer, the CA key or cluster object not yet on this manager), each after
/// [`RETRY_SOON_WAIT`]: such a refusal says "retry in a moment", so the CLI does, for about
/// ten seconds plus the calls' own time, before it reports it.
pub const RETRY_SOON_ATTEMPTS_MAX: u32 = 40;
/// Wait before each retry of a [`crate::wire::RETRY_SOON`] refusal.
pub const RETRY_SOON_WAIT: Duration = Duration::from_millis(250);
/// Extra attempts of a write whose outcome is unknown (`Unavailable`, `DeadlineExceeded`,
/// a forward whose leader died) or that could not be sent: few, since each may wait a whole
/// [`CALL_TIMEOUT`]. Safe, because every write carries its request id.
pub const UNKNOWN_OUTCOME_RETRIES_MAX: u32 = 3;

/// Bytes of a client id (random, one per CLI invocation).
pub const CLIENT_ID_BYTES: usize = 16;

/// The request ids of one client: a random client id, and a number per write.
pub(crate) struct RequestIds {
    client_id: [u8; CLIENT_ID_BYTES],
    last_seq: Cell<u64>,
}

impl RequestIds {
    /// A new client: random id, no request yet.
    pub(crate) fn new() -> Self {
        Self {
            client_id: rand::random(),
            last_seq: Cell::new(0),
        }
    }

    /// The id of this client's next write (to be sent on every attempt of it).
    pub(crate) fn next(&self) -> RequestId {
        self.last_seq.set(self.last_seq.get() + 1);
        RequestId {
            client_id: bytes::Bytes::copy_from_slice(&self.client_id),
            seq: self.last_seq.get(),
        }
    }
}

/// How results are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Human tables.
    #[default]
    Table,
    /// JSON for scripts.
    Json,
}

/// How to reach a manager: shared by every control command.
#[derive(Args, Debug, Clone)]
pub struct Connection {
    /// The node state directory whose identity (certificate) the call uses.
    #[arg(long, default_value = super::UP_STATE_DIR_DEFAULT, global = true)]
    pub state_dir: PathBuf,
    /// A directory holding an admin certificate (`flotilla admin-cert issue --out DIR`):
    /// the call uses it instead of a state directory's identity; needs --manager.
    #[arg(long, global = true)]
    pub cert_dir: Option<PathBuf>,
    /// The manager to call (host:port); default: the state directory's own manager.
    #[arg(long, global = true)]
    pub manager: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table, global = true)]
    pub format: Format,
}

/// Service spec flags, shared by `service create` and `service update` (on update, only
/// the flags given change the spec).
#[derive(Args, Debug, Clone, Default)]
pub struct SpecFlags {
    /// Number of tasks (replicated mode).
    #[arg(long)]
    pub replicas: Option<u64>,
    /// `replicated` or `global` (one task per eligible node).
    #[arg(long)]
    pub mode: Option<String>,
    /// Environment variable KEY=VALUE (repeatable; on update, replaces the list).
    #[arg(long = "env")]
    pub env: Vec<String>,
    /// A file of KEY=VALUE lines, added to --env.
    #[arg(long)]
    pub env_file: Option<PathBuf>,
    /// Working directory of the task.
    #[arg(long)]
    pub workdir: Option<String>,
    /// Label KEY=VALUE on the service (repeatable; on update, replaces the labels).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Restart condition: `none`, `on-failure` or `any`.
    #[arg(long)]
    pub restart_condition: Option<String>,
    /// Wait before a restart (e.g. `5s`, `250ms`).
    #[arg(long)]
    pub restart_delay: Option<String>,
    /// Restarts allowed within the window (0: unlimited).
    #[arg(long)]
    pub restart_max_attempts: Option<u64>,
    /// Window over which restarts are counted (e.g. `1m`).
    #[arg(long)]
    pub restart_window: Option<String>,
    /// CPUs set aside per task (e.g. `0.5`).
    #[arg(long)]
    pub reserve_cpu: Option<String>,
    /// Memory set aside per task (e.g. `64M`).
    #[arg(long)]
    pub reserve_memory: Option<String>,
    /// CPU limit per task.
    #[arg(long)]
    pub limit_cpu: Option<String>,
    /// Memory limit per task.
    #[arg(long)]
    pub limit_memory: Option<String>,
    /// Placement constraint, e.g. `node.labels.zone==a` (repeatable; on update, replaces).
    #[arg(long = "constraint")]
    pub constraints: Vec<String>,
    /// Tasks updated at once (0: all).
    #[arg(long)]
    pub update_parallelism: Option<u64>,
    /// Wait between update batches.
    #[arg(long)]
    pub update_delay: Option<String>,
    /// On a failed update: `pause`, `continue` or `rollback`.
    #[arg(long)]
    pub update_failure_action: Option<String>,
    /// `stop-first` or `start-first`.
    #[arg(long)]
    pub update_order: Option<String>,
}

/// `flotilla service …`
#[derive(Subcommand, Debug)]
pub enum ServiceCommand {
    /// Create a service running COMMAND ARGS. Options come first; the command starts at
    /// the first word that is not an option, or after `--` (then it may itself start with
    /// `-`). An unknown option is an error, never the command.
    Create {
        /// The service's unique name.
        #[arg(long)]
        name: String,
        /// The spec.
        #[command(flatten)]
        spec: SpecFlags,
        /// The program and its arguments (everything from here on is the task's).
        // No `allow_hyphen_values`: a mistyped or unsupported option (`--publish`) must be
        // refused, not become the program. `--` still passes a leading `-` through.
        #[arg(trailing_var_arg = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// List the services.
    Ls,
    /// Show a service (JSON).
    Inspect {
        /// Id, unique id prefix or name.
        service: String,
    },
    /// List a service's tasks.
    Ps {
        /// Id, unique id prefix or name.
        service: String,
    },
    /// Change the number of replicas: `SERVICE=N`.
    Scale {
        /// `SERVICE=N` pairs.
        #[arg(required = true)]
        pairs: Vec<String>,
    },
    /// Change a service's spec: `service update SERVICE [OPTIONS] [COMMAND ARGS...]`.
    /// Only the options given change; a COMMAND (the first word after SERVICE that is not
    /// an option, or everything after `--`) replaces the task's command and arguments.
    Update {
        /// Id, unique id prefix or name.
        service: String,
        /// The spec flags that change.
        #[command(flatten)]
        spec: SpecFlags,
        /// New name.
        #[arg(long)]
        rename: Option<String>,
        /// Refuse the update unless the service is still at this version (from `inspect`).
        #[arg(long)]
        if_version: Option<u64>,
        /// New program and arguments (everything from here on is the task's).
        #[arg(trailing_var_arg = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Remove services.
    Rm {
        /// Ids, unique id prefixes or names.
        #[arg(required = true)]
        services: Vec<String>,
    },
}

/// `flotilla node …`
#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// List the nodes.
    Ls,
    /// Show a node (JSON).
    Inspect {
        /// Id, unique id prefix or hostname.
        node: String,
    },
    /// Change a node's availability or labels.
    Update {
        /// Id, unique id prefix or hostname.
        node: String,
        /// `active`, `pause` or `drain`.
        #[arg(long)]
        availability: Option<String>,
        /// Add or replace a label KEY=VALUE (repeatable).
        #[arg(long)]
        label_add: Vec<String>,
        /// Remove a label (repeatable).
        #[arg(long)]
        label_rm: Vec<String>,
        /// Refuse the update unless the node is still at this version.
        #[arg(long)]
        if_version: Option<u64>,
    },
    /// Remove a node from the cluster.
    Rm {
        /// Id, unique id prefix or hostname.
        node: String,
        /// Remove it even if it looks up.
        #[arg(long)]
        force: bool,
    },
    /// Ask for a node to become a manager: a demoted (stopped) worker then rejoins with
    /// `flotilla join` and the manager token, as the command prints.
    Promote {
        /// Id, unique id prefix or hostname.
        node: String,
    },
    /// Ask for a manager to become a worker: refused if it would cost the quorum; the
    /// leader removes it from the managers (handing leadership over first if it leads),
    /// and it stops.
    Demote {
        /// Id, unique id prefix or hostname.
        node: String,
    },
}

/// `flotilla task …`
#[derive(Subcommand, Debug)]
pub enum TaskCommand {
    /// List tasks.
    Ls {
        /// Only this service's tasks.
        #[arg(long)]
        service: Option<String>,
        /// Only the tasks on this node.
        #[arg(long)]
        node: Option<String>,
    },
    /// Show a task (JSON).
    Inspect {
        /// Id or unique id prefix.
        task: String,
    },
}

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
        /// Refuse the update unless the cluster is still at this version.
        #[arg(long)]
        if_version: Option<u64>,
    },
}

/// Which join token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TokenRole {
    /// The token that makes a worker.
    Worker,
    /// The token that makes a manager.
    Manager,
}

/// A connected control client: the one every CLI command that calls a manager uses.
pub(crate) struct Client {
    pub(crate) transport: Transport,
    pub(crate) tls: Arc<rustls::ClientConfig>,
    /// The manager called: `unix:<state-dir>/control.sock` or `host:port`.
    pub(crate) addr: String,
    /// The identity's root certificate (public): handed on to admin certificates.
    pub(crate) root: RootCert,
    pub(crate) format: Format,
    /// This invocation's request ids (every write carries one).
    pub(crate) requests: RequestIds,
}

fn describe(addr: &str, status: &Status) -> String {
    let hint = match status.code {
        // Such a refusal was retried for a while already (`RETRY_SOON_ATTEMPTS_MAX`).
        _ if status.is_retry_soon() => {
            "\nhint: still so after retrying for about ten seconds; check that the managers \
             have a leader and reach each other (`flotilla manager ls`), and their logs"
                .to_string()
        }
        Code::Unavailable => "\nhint: is the manager running (`flotilla up`, or `flotilla run \
                              --state-dir DIR`)? With --manager, is the address right?"
            .to_string(),
        Code::Aborted => {
            "\nhint: someone changed it meanwhile: inspect it again and retry".to_string()
        }
        Code::InvalidArgument => "\nhint: fix the field named above and retry".to_string(),
        Code::NotFound => String::new(),
        Code::PermissionDenied | Code::Unauthenticated => {
            "\nhint: the control API needs a manager's identity (--state-dir of a manager) or \
             an admin certificate (`flotilla admin-cert issue --out DIR`, then --cert-dir DIR)"
                .to_string()
        }
        _ => String::new(),
    };
    format!("{addr}: {status}{hint}")
}

impl Client {
    /// The identity and the manager `connection` names: an admin certificate directory
    /// (with `--manager`), or a node state directory (its own manager by default).
    fn identity_and_target(
        connection: &Connection,
    ) -> Result<(NodeIdentity, RootCert, String), String> {
        if let Some(cert_dir) = &connection.cert_dir {
            let (identity, root) = load_node_files(cert_dir).map_err(|e| {
                format!(
                    "{e}\nhint: --cert-dir takes what `flotilla admin-cert issue --out DIR` wrote"
                )
            })?;
            let addr = connection.manager.clone().ok_or_else(|| {
                "--cert-dir needs --manager ADDR: an admin certificate has no local manager"
                    .to_string()
            })?;
            return Ok((identity, root, addr));
        }
        let dir = StateDir::new(connection.state_dir.clone());
        let (identity, root) = load_node_files(&dir.node_dir())
            .map_err(|e| format!("{e}\nhint: point --state-dir at a node's state directory"))?;
        let addr = match &connection.manager {
            Some(addr) => addr.clone(),
            None => dir.local_target().map_err(|e| {
                format!("{e}\nhint: point --state-dir at a manager, or pass --manager ADDR")
            })?,
        };
        Ok((identity, root, addr))
    }

    /// Loads the identity `connection` names and starts a transport.
    ///
    /// # Errors
    /// A message for stderr, with a hint.
    pub(crate) fn connect(connection: &Connection) -> Result<Self, String> {
        let (identity, root, addr) = Self::identity_and_target(connection)?;
        let tls = Arc::new(tls::client_config(&identity, &root).map_err(|e| e.to_string())?);
        let transport = Transport::start(TransportConfig::default())
            .map_err(|e| format!("cannot start the transport: {e}"))?;
        Ok(Self {
            transport,
            tls,
            addr,
            root,
            format: connection.format,
            requests: RequestIds::new(),
        })
    }

    /// One unary call, retried while the managers elect a leader.
    ///
    /// # Errors
    /// The manager's refusal, described with a hint.
    pub(crate) fn unary<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        method: &str,
        request: &Req,
    ) -> Result<Resp, String> {
        self.unary_retrying(method, request, 0)
    }

    /// Sends the write `request`, which carries a request id from [`Self::next_request`],
    /// and retries it with the same id: after a refusal that did nothing
    /// ([`WriteFate::NotDone`]: an election, a transfer; up to [`RETRY_SOON_ATTEMPTS_MAX`]
    /// times) and after an unknown outcome or a failure to send (up to
    /// [`UNKNOWN_OUTCOME_RETRIES_MAX`] times). A retry of a write that did happen gets its
    /// first answer from the managers' table of answers, so a definitive answer after an
    /// unknown outcome is the true one. `check` is the command that shows the object, for
    /// the message when the outcome stays unknown.
    ///
    /// # Errors
    /// [`CommandError::Failed`] with the manager's refusal (the write did not happen);
    /// [`CommandError::OutcomeUnknown`] when an attempt may have taken effect and the
    /// retries ran out before an answer.
    pub(crate) fn write<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        method: &str,
        request: &Req,
        check: &str,
    ) -> Result<Resp, CommandError> {
        let channel = self.transport.channel(&self.addr, &self.tls);
        let (mut waits, mut unknown_outcomes) = (0, 0);
        let mut uncertain = false;
        loop {
            let status = match channel.unary(method, request, CallOptions::timeout(CALL_TIMEOUT)) {
                Err(status) => status,
                Ok(reply) => return Ok(reply),
            };
            let fate = status.write_fate();
            uncertain |= fate == WriteFate::Unknown;
            let retry = match fate {
                WriteFate::Refused => false,
                WriteFate::NotDone if status.reason == crate::wire::Reason::NotSent => {
                    unknown_outcomes += 1;
                    unknown_outcomes <= UNKNOWN_OUTCOME_RETRIES_MAX
                }
                WriteFate::NotDone => {
                    waits += 1;
                    waits <= RETRY_SOON_ATTEMPTS_MAX
                }
                WriteFate::Unknown => {
                    unknown_outcomes += 1;
                    unknown_outcomes <= UNKNOWN_OUTCOME_RETRIES_MAX
                }
            };
            if !retry {
                return Err(if uncertain && fate != WriteFate::Refused {
                    CommandError::OutcomeUnknown(format!(
                        "outcome unknown: {}\nthe write may or may not have been applied: a \
                         manager received it and its answer was lost, and the retries could not \
                         learn it; check with `{check}`",
                        describe(&self.addr, &status)
                    ))
                } else {
                    CommandError::Failed(describe(&self.addr, &status))
                });
            }
            log::debug!("{method}: {status}; retrying");
            std::thread::sleep(status.retry_after().unwrap_or(RETRY_SOON_WAIT));
        }
    }

    /// The request id of this invocation's next write.
    pub(crate) fn next_request(&self) -> Option<RequestId> {
        Some(self.requests.next())
    }

    fn unary_retrying<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        method: &str,
        request: &Req,
        unknown_outcome_retries_max: u32,
    ) -> Result<Resp, String> {
        let channel = self.transport.channel(&self.addr, &self.tls);
        let (mut waits, mut unknown_outcomes) = (0, 0);
        loop {
            let status = match channel.unary(method, request, CallOptions::timeout(CALL_TIMEOUT)) {
                Err(status) => status,
                Ok(reply) => return Ok(reply),
            };
            let retry = if status.is_retry_soon() && waits < RETRY_SOON_ATTEMPTS_MAX {
                waits += 1;
                true
            } else if matches!(status.code, Code::Unavailable | Code::DeadlineExceeded)
                && unknown_outcomes < unknown_outcome_retries_max
            {
                unknown_outcomes += 1;
                true
            } else {
                false
            };
            if !retry {
                return Err(describe(&self.addr, &status));
            }
            log::debug!("{method}: {status}; retrying");
            std::thread::sleep(RETRY_SOON_WAIT);
        }
    }

    /// Describes a refusal from `addr` with a hint.
    pub(crate) fn describe(addr: &str, status: &Status) -> String {
        describe(addr, status)
    }

    fn list<Req: prost::Message, Chunk: prost::Message + Default, T>(
        &self,
        method: &str,
        request: &Req,
        items: impl Fn(Chunk) -> Vec<T>,
    ) -> Result<Vec<T>, String> {
        let channel = self.transport.channel(&self.addr, &self.tls);
        let mut waits = 0;
        loop {
            let status = match Self::list_once(&channel, method, request, &items) {
                Ok(all) => return Ok(all),
                Err(status) => status,
            };
            if !status.is_retry_soon() || waits >= RETRY_SOON_ATTEMPTS_MAX {
                return Err(describe(&self.addr, &status));
            }
            waits += 1;
            log::debug!("{method}: {status}; retrying");
            std::thread::sleep(RETRY_SOON_WAIT);
        }
    }

    /// One listing: every chunk, or the refusal (when opening or midway; a listing is
    /// read-only, so a retry after a midway failure is safe).
    fn list_once<Req: prost::Message, Chunk: prost::Message + Default, T>(
        channel: &crate::net::Channel,
        method: &str,
        request: &Req,
        items: &impl Fn(Chunk) -> Vec<T>,
    ) -> Result<Vec<T>, Status> {
        let mut stream = channel.server_stream::<_, Chunk>(
            method,
            request,
            CallOptions::timeout(CALL_TIMEOUT),
        )?;
        let mut all = Vec::new();
        while let Some(chunk) = stream.recv()? {
            all.extend(items(chunk));
        }
        Ok(all)
    }

    pub(crate) fn print_json(&self, value: &impl serde::Serialize) {
        println!("{}", json::pretty(value));
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing of flag values

/// Parses a duration into milliseconds: jiff's friendly format with units up to hours
/// (`250ms`, `5s`, `1.5s`, `2m`, `2h30m`, `2160h`, `3 mins`), ISO 8601 (`PT5S`), or a plain
/// number of seconds (`3`, `0.5`). Days and longer are refused (their length is not fixed),
/// and so are negative durations.
///
/// # Errors
/// A message naming the flag.
pub fn parse_duration_ms(flag: &str, text: &str) -> Result<i64, String> {
    let text = text.trim();
    let invalid = |why: String| {
        format!("--{flag} {text:?}: expected a duration such as 500ms, 5s, 2m or 1h ({why})")
    };
    let is_plain_number = !text.is_empty() && text.chars().all(|c| c.is_ascii_digit() || c == '.');
    let duration = if is_plain_number {
        let seconds: f64 = text.parse().map_err(|e| invalid(format!("{e}")))?;
        jiff::SignedDuration::try_from_secs_f64(seconds).map_err(|e| invalid(e.to_string()))?
    } else {
        text.parse::<jiff::SignedDuration>()
            .map_err(|e| invalid(e.to_string()))?
    };
    if duration.is_negative() {
        return Err(invalid("it is negative".into()));
    }
    // Rounded to the nearest millisecond.
    let ms = (duration.as_nanos() + 500_000) / 1_000_000;
    i64::try_from(ms).map_err(|_| invalid("too long".into()))
}

/// Parses `512`, `64k`, `64M`, `1G` (binary multiples) into bytes.
///
/// # Errors
/// A message naming the flag.
pub fn parse_bytes(flag: &str, text: &str) -> Result<i64, String> {
    let text = text.trim();
    let (number, scale) = match text.chars().last().map(|c| c.to_ascii_lowercase()) {
        Some('k') => (&text[..text.len() - 1], 1i64 << 10),
        Some('m') => (&text[..text.len() - 1], 1 << 20),
        Some('g') => (&text[..text.len() - 1], 1 << 30),
        _ => (text, 1),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("--{flag} {text:?}: expected a size such as 64M or 1G"))?;
    Ok((value * scale as f64).round() as i64)
}

/// Parses a CPU count such as `0.5` into nano-CPUs.
///
/// # Errors
/// A message naming the flag.
pub fn parse_nano_cpus(flag: &str, text: &str) -> Result<i64, String> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("--{flag} {text:?}: expected a number of CPUs such as 0.5"))?;
    Ok((value * 1e9).round() as i64)
}

fn parse_pairs(flag: &str, pairs: &[String]) -> Result<BTreeMap<String, String>, String> {
    pairs
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| format!("--{flag} {pair:?}: expected KEY=VALUE"))
        })
        .collect()
}

/// The value of enum `E` whose label is `text` (`on-failure`, `start-first`, …).
///
/// # Errors
/// A message naming the flag and listing the labels it takes.
fn parse_choice<E: ProtoEnum>(flag: &str, text: &str) -> Result<E, String> {
    parse_label(text).ok_or_else(|| format!("--{flag} {text:?}: expected {}", choices_text::<E>()))
}

fn env_entries(flags: &SpecFlags) -> Result<Option<Vec<String>>, String> {
    let mut env = flags.env.clone();
    if let Some(path) = &flags.env_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--env-file {}: {e}", path.display()))?;
        env.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string),
        );
    }
    Ok((!env.is_empty() || flags.env_file.is_some()).then_some(env))
}

/// Applies the flags given to `spec` (a new one or the current one being updated).
fn apply_flags(spec: &mut ServiceSpec, flags: &SpecFlags) -> Result<(), String> {
    if let Some(mode) = &flags.mode {
        spec.mode = parse_choice::<ServiceMode>("mode", mode)? as i32;
        if spec.mode == ServiceMode::Global as i32 {
            spec.replicas = 0;
        }
    }
    if let Some(replicas) = flags.replicas {
        spec.replicas = replicas;
    }
    if !flags.labels.is_empty() {
        spec.labels = parse_pairs("label", &flags.labels)?;
    }
    let task = spec.task.get_or_insert_with(TaskSpec::default);
    if let Some(env) = env_entries(flags)? {
        task.env = env;
    }
    if let Some(workdir) = &flags.workdir {
        task.working_dir = workdir.clone();
    }
    let restart = task.restart.get_or_insert_with(RestartPolicy::default);
    if let Some(condition) = &flags.restart_condition {
        restart.condition =
            parse_choice::<RestartCondition>("restart-condition", condition)? as i32;
    }
    if let Some(delay) = &flags.restart_delay {
        restart.delay_ms = Some(parse_duration_ms("restart-delay", delay)?);
    }
    if let Some(attempts) = flags.restart_max_attempts {
        restart.max_attempts = attempts;
    }
    if let Some(window) = &flags.restart_window {
        restart.window_ms = parse_duration_ms("restart-window", window)?;
    }
    let resources = task
        .resources
        .get_or_insert_with(ResourceRequirements::default);
    let reservations = resources
        .reservations
        .get_or_insert_with(Resources::default);
    if let Some(cpu) = &flags.reserve_cpu {
        reservations.nano_cpus = parse_nano_cpus("reserve-cpu", cpu)?;
    }
    if let Some(memory) = &flags.reserve_memory {
        reservations.memory_bytes = parse_bytes("reserve-memory", memory)?;
    }
    let limits = resources.limits.get_or_insert_with(Resources::default);
    if let Some(cpu) = &flags.limit_cpu {
        limits.nano_cpus = parse_nano_cpus("limit-cpu", cpu)?;
    }
    if let Some(memory) = &flags.limit_memory {
        limits.memory_bytes = parse_bytes("limit-memory", memory)?;
    }
    if !flags.constraints.is_empty() {
        task.placement = Some(Placement {
            constraints: flags.constraints.clone(),
        });
    }
    let update = spec.update.get_or_insert_with(UpdateConfig::default);
    if let Some(parallelism) = flags.update_parallelism {
        update.parallelism = parallelism;
    }
    if let Some(delay) = &flags.update_delay {
        update.delay_ms = parse_duration_ms("update-delay", delay)?;
    }
    if let Some(action) = &flags.update_failure_action {
        update.failure_action =
            parse_choice::<UpdateFailureAction>("update-failure-action", action)? as i32;
    }
    if let Some(order) = &flags.update_order {
        update.order = parse_choice::<UpdateOrder>("update-order", order)? as i32;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Commands

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

fn get_service(client: &Client, reference: &str) -> Result<crate::proto::objects::Service, String> {
    let reply: pb::ServiceResponse = client.unary(
        api::GET_SERVICE,
        &pb::GetServiceRequest {
            reference: reference.to_string(),
        },
    )?;
    reply
        .service
        .ok_or_else(|| "the manager sent an empty reply".to_string())
}

fn update_service(
    client: &Client,
    reference: &str,
    if_version: Option<u64>,
    change: impl FnOnce(&mut ServiceSpec) -> Result<(), String>,
) -> Result<crate::proto::objects::Service, CommandError> {
    let current = get_service(client, reference)?;
    let mut spec = current.spec.clone().unwrap_or_default();
    change(&mut spec)?;
    let version = if_version.unwrap_or_else(|| current.meta.as_ref().map_or(0, |m| m.version));
    let reply: pb::ServiceResponse = client.write(
        api::UPDATE_SERVICE,
        &pb::UpdateServiceRequest {
            reference: current.id.clone(),
            version,
            spec: Some(spec),
            request_id: client.next_request(),
        },
        &format!("flotilla service inspect {}", current.id),
    )?;
    Ok(reply
        .service
        .ok_or_else(|| "the manager sent an empty reply".to_string())?)
}

fn replicas_text(spec: &ServiceSpec) -> String {
    if spec.mode == ServiceMode::Global as i32 {
        "global".to_string()
    } else {
        spec.replicas.to_string()
    }
}

fn print_services(client: &Client, services: &[crate::proto::objects::Service]) {
    if client.format == Format::Json {
        client.print_json(&services.iter().map(json::service).collect::<Vec<_>>());
        return;
    }
    println!(
        "{:<12}  {:<24}  {:<10}  {:>8}  {:>8}  COMMAND",
        "ID", "NAME", "MODE", "REPLICAS", "VERSION"
    );
    for service in services {
        let spec = service.spec.clone().unwrap_or_default();
        let task = spec.task.clone().unwrap_or_default();
        println!(
            "{:<12}  {:<24}  {:<10}  {:>8}  {:>8}  {} {}",
            short(&service.id),
            spec.name,
            label::<ServiceMode>(spec.mode),
            replicas_text(&spec),
            service.meta.as_ref().map_or(0, |m| m.version),
            task.command,
            task.args.join(" ")
        );
    }
}

/// What `service ps` and `task ls` show in their ERROR column (docker's): why the task
/// failed, or why it is still pending (no node fits, none ready, …); empty otherwise.
fn task_problem(task: &crate::proto::objects::Task) -> &str {
    let Some(status) = task.status.as_ref() else {
        return "";
    };
    if !status.err.is_empty() {
        &status.err
    } else if status.state == TaskState::Pending as i32 {
        &status.message
    } else {
        ""
    }
}

fn print_tasks(client: &Client, tasks: &[crate::proto::objects::Task]) {
    if client.format == Format::Json {
        client.print_json(&tasks.iter().map(json::task).collect::<Vec<_>>());
        return;
    }
    println!(
        "{:<12}  {:<12}  {:>5}  {:<12}  {:<10}  {:<10}  ERROR",
        "ID", "SERVICE", "SLOT", "NODE", "DESIRED", "CURRENT"
    );
    for task in tasks {
        println!(
            "{:<12}  {:<12}  {:>5}  {:<12}  {:<10}  {:<10}  {}",
            short(&task.id),
            short(&task.service_id),
            task.slot,
            if task.node_id.is_empty() {
                "-"
            } else {
                short(&task.node_id)
            },
            label::<TaskState>(task.desired_state),
            label::<TaskState>(task.status.as_ref().map_or(0, |s| s.state)),
            task_problem(task),
        );
    }
}

fn service_command(client: &Client, command: ServiceCommand) -> Result<(), CommandError> {
    match command {
        ServiceCommand::Create {
            name,
            spec: flags,
            command,
        } => {
            let mut spec = ServiceSpec {
                name,
                mode: ServiceMode::Replicated as i32,
                replicas: 1,
                task: Some(TaskSpec {
                    command: command[0].clone(),
                    args: command[1..].to_vec(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            apply_flags(&mut spec, &flags)?;
            // The id is chosen here, once: every retry sends the same request, so a retry
            // after an unknown outcome answers with the service the first attempt made.
            let id = crate::util::id::random_id();
            let reply: pb::ServiceResponse = client.write(
                api::CREATE_SERVICE,
                &pb::CreateServiceRequest {
                    spec: Some(spec),
                    id: id.clone(),
                    request_id: client.next_request(),
                },
                &format!("flotilla service inspect {id}"),
            )?;
            let service = reply.service.unwrap_or_default();
            match client.format {
                Format::Json => client.print_json(&json::service(&service)),
                Format::Table => println!("{}", service.id),
            }
        }
        ServiceCommand::Ls => {
            let services = client.list(
                api::LIST_SERVICES,
                &pb::ListServicesRequest {},
                |c: pb::ServiceChunk| c.services,
            )?;
            print_services(client, &services);
        }
        ServiceCommand::Inspect { service } => {
            client.print_json(&json::service(&get_service(client, &service)?));
        }
        ServiceCommand::Ps { service } => {
            let tasks = client.list(
                api::LIST_TASKS,
                &pb::ListTasksRequest {
                    service_id: service,
                    node_id: String::new(),
                },
                |c: pb::TaskChunk| c.tasks,
            )?;
            print_tasks(client, &tasks);
        }
        ServiceCommand::Scale { pairs } => {
            for pair in pairs {
                let (reference, replicas) = pair
                    .split_once('=')
                    .and_then(|(s, n)| Some((s, n.parse::<u64>().ok()?)))
                    .ok_or_else(|| format!("{pair:?}: expected SERVICE=REPLICAS"))?;
                let service = update_service(client, reference, None, |spec| {
                    if spec.mode == ServiceMode::Global as i32 {
                        return Err(format!(
                            "{reference} is a global service: it runs one task per node and \
                             cannot be scaled"
                        ));
                    }
                    spec.replicas = replicas;
                    Ok(())
                })?;
                println!("{} scaled to {replicas}", service.id);
            }
        }
        ServiceCommand::Update {
            service,
            spec: flags,
            rename,
            command,
            if_version,
        } => {
            let updated = update_service(client, &service, if_version, |spec| {
                if let Some(name) = rename {
                    spec.name = name;
                }
                if let Some((program, args)) = command.split_first() {
                    let task = spec.task.get_or_insert_with(TaskSpec::default);
                    task.command = program.clone();
                    task.args = args.to_vec();
                }
                apply_flags(spec, &flags)
            })?;
            match client.format {
                Format::Json => client.print_json(&json::service(&updated)),
                Format::Table => println!(
                    "{} updated to version {}",
                    updated.id,
                    updated.meta.as_ref().map_or(0, |m| m.version)
                ),
            }
        }
        ServiceCommand::Rm { services } => {
            for reference in services {
                let check = format!("flotilla service inspect {reference}");
                let reply: pb::RemoveResponse = client.write(
                    api::REMOVE_SERVICE,
                    &pb::RemoveServiceRequest {
                        reference,
                        request_id: client.next_request(),
                    },
                    &check,
                )?;
                println!("{}", reply.id);
            }
        }
    }
    Ok(())
}

fn get_node(client: &Client, reference: &str) -> Result<crate::proto::objects::Node, String> {
    let reply: pb::NodeResponse = client.unary(
        api::GET_NODE,
        &pb::GetNodeRequest {
            reference: reference.to_string(),
        },
    )?;
    reply
        .node
        .ok_or_else(|| "the manager sent an empty reply".to_string())
}

fn update_node(
    client: &Client,
    reference: &str,
    if_version: Option<u64>,
    change: impl FnOnce(&mut crate::proto::objects::NodeSpec) -> Result<(), String>,
) -> Result<crate::proto::objects::Node, CommandError> {
    let current = get_node(client, reference)?;
    let mut spec = current.spec.clone().unwrap_or_default();
    change(&mut spec)?;
    let version = if_version.unwrap_or_else(|| current.meta.as_ref().map_or(0, |m| m.version));
    let reply: pb::NodeResponse = client.write(
        api::UPDATE_NODE,
        &pb::UpdateNodeRequest {
            reference: current.id.clone(),
            version,
            spec: Some(spec),
            request_id: client.next_request(),
        },
        &format!("flotilla node inspect {}", current.id),
    )?;
    Ok(reply
        .node
        .ok_or_else(|| "the manager sent an empty reply".to_string())?)
}

/// `node ls`'s MANAGER STATUS (docker's): `leader`, else the manager's reachability as the
/// leader sees it (as `manager ls` shows it).
fn manager_status_label(status: &ManagerStatus) -> String {
    if status.leader {
        "leader".to_string()
    } else {
        label::<RaftReachability>(status.reachability)
    }
}

fn print_nodes(client: &Client, nodes: &[crate::proto::objects::Node]) {
    if client.format == Format::Json {
        client.print_json(&nodes.iter().map(json::node).collect::<Vec<_>>());
        return;
    }
    println!(
        "{:<25}  {:<20}  {:<8}  {:<12}  {:<8}  MANAGER STATUS",
        "ID", "HOSTNAME", "STATUS", "AVAILABILITY", "ROLE"
    );
    for node in nodes {
        let spec = node.spec.clone().unwrap_or_default();
        let manager = node
            .manager_status
            .as_ref()
            .map_or_else(String::new, manager_status_label);
        println!(
            "{:<25}  {:<20}  {:<8}  {:<12}  {:<8}  {manager}",
            node.id,
            spec.hostname,
            label::<NodeState>(node.status.as_ref().map_or(0, |s| s.state)),
            label::<NodeAvailability>(spec.availability),
            label::<NodeRole>(node.role),
        );
    }
}

fn node_command(client: &Client, command: NodeCommand) -> Result<(), CommandError> {
    let set_role = |node: &str, role: NodeRole| -> Result<(), CommandError> {
        let updated = update_node(client, node, None, |spec| {
            spec.desired_role = role as i32;
            Ok(())
        })?;
        println!(
            "node {} desired role is now {}",
            updated.id,
            label::<NodeRole>(role as i32)
        );
        print_role_hint(&updated, role);
        Ok(())
    };
    match command {
        NodeCommand::Ls => {
            let nodes = client.list(
                api::LIST_NODES,
                &pb::ListNodesRequest {},
                |c: pb::NodeChunk| c.nodes,
            )?;
            print_nodes(client, &nodes);
        }
        NodeCommand::Inspect { node } => client.print_json(&json::node(&get_node(client, &node)?)),
        NodeCommand::Update {
            node,
            availability,
            label_add,
            label_rm,
            if_version,
        } => {
            let updated = update_node(client, &node, if_version, |spec| {
                if let Some(availability) = availability {
                    spec.availability =
                        parse_choice::<NodeAvailability>("availability", &availability)? as i32;
                }
                spec.labels.extend(parse_pairs("label-add", &label_add)?);
                for key in &label_rm {
                    spec.labels.remove(key);
                }
                Ok(())
            })?;
            match client.format {
                Format::Json => client.print_json(&json::node(&updated)),
                Format::Table => println!("{}", updated.id),
            }
        }
        NodeCommand::Rm { node, force } => {
            let check = format!("flotilla node inspect {node}");
            let reply: pb::RemoveResponse = client.write(
                api::REMOVE_NODE,
                &pb::RemoveNodeRequest {
                    reference: node,
                    force,
                    request_id: client.next_request(),
                },
                &check,
            )?;
            println!("{}", reply.id);
        }
        NodeCommand::Promote { node } => set_role(&node, NodeRole::Manager)?,
        NodeCommand::Demote { node } => set_role(&node, NodeRole::Worker)?,
    }
    Ok(())
}

/// Says how a role change takes effect: a demotion is carried out by the leader, a
/// promotion of a (stopped) worker by rejoining it with the manager token.
fn print_role_hint(node: &crate::proto::objects::Node, role: NodeRole) {
    let is_manager = node.role == NodeRole::Manager as i32;
    match role {
        NodeRole::Worker if is_manager => println!(
            "the leader removes it from the managers as soon as that keeps a quorum; it then \
             goes on as a worker (`flotilla manager ls` shows the managers, `flotilla node ls` \
             its role)"
        ),
        NodeRole::Manager if !is_manager => println!(
            "the node becomes a manager in place: within a heartbeat its agent renews its \
             certificate as a manager's and joins the managers (a worker started without \
             `--listen` says it needs one). `flotilla manager ls` shows it once it has joined"
        ),
        _ => {}
    }
}

fn task_command(client: &Client, command: TaskCommand) -> Result<(), String> {
    match command {
        TaskCommand::Ls { service, node } => {
            let tasks = client.list(
                api::LIST_TASKS,
                &pb::ListTasksRequest {
                    service_id: service.unwrap_or_default(),
                    node_id: node.unwrap_or_default(),
                },
                |c: pb::TaskChunk| c.tasks,
            )?;
            print_tasks(client, &tasks);
        }
        TaskCommand::Inspect { task } => {
            let reply: pb::TaskResponse =
                client.unary(api::GET_TASK, &pb::GetTaskRequest { reference: task })?;
            client.print_json(&json::task(&reply.task.unwrap_or_default()));
        }
    }
    Ok(())
}

fn cluster_command(client: &Client, command: ClusterCommand) -> Result<(), CommandError> {
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
                Format::Table => println!(
                    "cluster {} updated to version {}",
                    updated.id,
                    updated.meta.as_ref().map_or(0, |m| m.version)
                ),
            }
        }
    }
    Ok(())
}

fn join_token_command(client: &Client, role: TokenRole, rotate: bool) -> Result<(), CommandError> {
    let reply: pb::JoinTokensResponse = if rotate {
        let role = match role {
            TokenRole::Worker => NodeRole::Worker,
            TokenRole::Manager => NodeRole::Manager,
        };
        client.write(
            api::ROTATE_JOIN_TOKEN,
            &pb::RotateJoinTokenRequest {
                role: role as i32,
                request_id: client.next_request(),
            },
            "flotilla join-token worker; flotilla join-token manager",
        )?
    } else {
        client.unary(api::GET_JOIN_TOKENS, &pb::GetJoinTokensRequest {})?
    };
    let tokens = reply.tokens.unwrap_or_default();
    let token = match role {
        TokenRole::Worker => tokens.worker,
        TokenRole::Manager => tokens.manager,
    };
    match client.format {
        Format::Json => client.print_json(&serde_json::json!({ "token": token })),
        Format::Table => println!("{token}"),
    }
    Ok(())
}

/// What a control command asks.
#[derive(Debug)]
pub enum ControlCommand {
    /// `service …`
    Service(Box<ServiceCommand>),
    /// `node …`
    Node(NodeCommand),
    /// `task …`
    Task(TaskCommand),
    /// `cluster …`
    Cluster(ClusterCommand),
    /// `join-token ROLE [--rotate]`
    JoinToken {
        /// Which token.
        role: TokenRole,
        /// Replace it first.
        rotate: bool,
    },
    /// `manager …`
    Manager(super::ManagerCommand),
    /// `admin-cert …`
    AdminCert(super::admin::AdminCertCommand),
    /// `watch …`
    Watch(super::watch::WatchArgs),
}

/// Runs one control command through the manager `connection` names.
///
/// # Errors
/// A message for stderr, with a hint.
pub fn run(connection: &Connection, command: ControlCommand) -> Result<(), CommandError> {
    let client = Client::connect(connection)?;
    let result = match command {
        ControlCommand::Service(command) => service_command(&client, *command),
        ControlCommand::Node(command) => node_command(&client, command),
        ControlCommand::Task(command) => task_command(&client, command).map_err(Into::into),
        ControlCommand::Cluster(command) => cluster_command(&client, command),
        ControlCommand::JoinToken { role, rotate } => join_token_command(&client, role, rotate),
        ControlCommand::Manager(command) => {
            super::managers::run(&client, command).map_err(Into::into)
        }
        ControlCommand::AdminCert(command) => super::admin::run(&client, command),
        ControlCommand::Watch(args) => super::watch::run(&client, &args).map_err(Into::into),
    };
    client.transport.shutdown();
    result
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::ca::{CaPolicy, ClusterCa, Role};
    use crate::net::{Allow, Router, ServicePool};

    /// A server whose `test.Flaky` and `test.FlakyList` refuse `refusals` calls with
    /// `refusal`, then answer; and a client for it.
    struct Flaky {
        client: Client,
        server: Transport,
        pool: ServicePool,
        calls: Arc<AtomicU32>,
    }

    impl Flaky {
        fn start(refusals: u32, refusal: Status) -> Flaky {
            let ca =
                ClusterCa::create(std::time::SystemTime::now(), CaPolicy::default()).expect("a CA");
            let now = std::time::SystemTime::now();
            let server_identity = ca.issue_local_identity(Role::Manager, now).expect("id");
            let client_identity = ca.issue_local_identity(Role::Manager, now).expect("id");
            let pool = ServicePool::new("flaky", 2, 16).expect("pool");
            let calls = Arc::new(AtomicU32::new(0));
            let mut router = Router::new();
            let (counted, refused) = (calls.clone(), refusal.clone());
            router.unary(
                "test.Flaky",
                Allow::ANYONE,
                &pool,
                move |_, _: pb::GetClusterRequest| {
                    if counted.fetch_add(1, Ordering::SeqCst) < refusals {
                        return Err(refused.clone());
                    }
                    Ok(pb::ClusterResponse::default())
                },
            );
            let counted = calls.clone();
            router.server_stream(
                "test.FlakyList",
                Allow::ANYONE,
                &pool,
                move |_, _: pb::ListNodesRequest, stream| {
                    if counted.fetch_add(1, Ordering::SeqCst) < refusals {
                        return Err(refusal.clone());
                    }
                    stream.send(&pb::NodeChunk {
                        nodes: vec![Default::default()],
                    })
                },
            );
            let server = Transport::start(TransportConfig::default()).expect("transport");
            let server_tls = tls::server_config(&server_identity, ca.root()).expect("tls");
            let addr = server
                .listen(
                    "127.0.0.1:0".parse().expect("addr"),
                    Arc::new(server_tls),
                    Arc::new(router),
                )
                .expect("listen");
            let client = Client {
                transport: Transport::start(TransportConfig::default()).expect("transport"),
                tls: Arc::new(tls::client_config(&client_identity, ca.root()).expect("tls")),
                addr: addr.to_string(),
                root: ca.root().clone(),
                format: Format::Table,
                requests: RequestIds::new(),
            };
            Flaky {
                client,
                server,
                pool,
                calls,
            }
        }

        fn stop(self) -> u32 {
            self.client.transport.shutdown();
            self.server.shutdown();
            self.pool.shutdown();
            self.calls.load(Ordering::SeqCst)
        }
    }

    #[test]
    fn a_refusal_that_promises_a_retry_is_retried_and_others_are_not() {
        let soon = Status::retry_soon(
            Code::FailedPrecondition,
            "no key here yet; retry in a moment",
        );
        let flaky = Flaky::start(3, soon.clone());
        let reply: Result<pb::ClusterResponse, String> =
            flaky.client.unary("test.Flaky", &pb::GetClusterRequest {});
        assert!(reply.is_ok(), "{reply:?}");
        assert_eq!(flaky.stop(), 4, "three refusals, then the answer");

        let flaky = Flaky::start(2, soon);
        let nodes = flaky.client.list(
            "test.FlakyList",
            &pb::ListNodesRequest {},
            |c: pb::NodeChunk| c.nodes,
        );
        assert_eq!(nodes.map(|n| n.len()), Ok(1));
        assert_eq!(flaky.stop(), 3, "listings are retried too");

        // The same words without the reason: reported at once (the CLI never reads the
        // message to decide).
        let flaky = Flaky::start(1, Status::unavailable("retry in a moment"));
        let reply: Result<pb::ClusterResponse, String> =
            flaky.client.unary("test.Flaky", &pb::GetClusterRequest {});
        let error = reply.expect_err("refused");
        assert!(error.contains("retry in a moment"), "{error}");
        assert_eq!(flaky.stop(), 1);
    }

    #[test]
    fn a_promised_retry_is_bounded() {
        let soon = Status::retry_soon(Code::Unavailable, "no leader; retry in a moment");
        let flaky = Flaky::start(u32::MAX, soon);
        let reply: Result<pb::ClusterResponse, String> =
            flaky.client.unary("test.Flaky", &pb::GetClusterRequest {});
        let error = reply.expect_err("never answers");
        assert!(error.contains("hint:"), "{error}");
        assert_eq!(flaky.stop(), RETRY_SOON_ATTEMPTS_MAX + 1);
    }

    #[test]
    fn a_write_whose_outcome_stays_unknown_says_so_and_one_never_sent_failed() {
        let write = |flaky: &Flaky| -> Result<pb::ClusterResponse, CommandError> {
            flaky
                .client
                .write("test.Flaky", &pb::GetClusterRequest {}, "flotilla check")
        };
        // The leader a write was forwarded to died: unknown, retried with the same request
        // id, and answered on the retry.
        let lost = Status::outcome_unknown(Code::Unavailable, "the leader did not answer");
        let flaky = Flaky::start(1, lost.clone());
        assert!(write(&flaky).is_ok());
        assert_eq!(flaky.stop(), 2);

        // Never answered: "outcome unknown", never "failed".
        let flaky = Flaky::start(u32::MAX, lost);
        match write(&flaky) {
            Err(CommandError::OutcomeUnknown(message)) => {
                assert!(message.starts_with("outcome unknown"), "{message}");
                assert!(message.contains("flotilla check"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(flaky.stop(), UNKNOWN_OUTCOME_RETRIES_MAX + 1);

        // A definitive refusal is reported at once, as a failure.
        let flaky = Flaky::start(u32::MAX, Status::new(Code::Aborted, "version conflict"));
        assert!(matches!(write(&flaky), Err(CommandError::Failed(_))));
        assert_eq!(flaky.stop(), 1);

        // Nothing listens: the write was never sent, so it failed.
        let flaky = Flaky::start(0, Status::internal("unused"));
        let client = Client {
            transport: Transport::start(TransportConfig::default()).expect("transport"),
            tls: flaky.client.tls.clone(),
            addr: {
                let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                probe.local_addr().expect("addr").to_string()
            },
            root: flaky.client.root.clone(),
            format: Format::Table,
            requests: RequestIds::new(),
        };
        let never_sent: Result<pb::ClusterResponse, CommandError> =
            client.write("test.Flaky", &pb::GetClusterRequest {}, "flotilla check");
        assert!(
            matches!(never_sent, Err(CommandError::Failed(_))),
            "{never_sent:?}"
        );
        client.transport.shutdown();
        flaky.stop();
    }

    #[test]
    fn each_write_of_an_invocation_has_its_own_number_under_one_client_id() {
        let ids = RequestIds::new();
        let (first, second) = (ids.next(), ids.next());
        assert_eq!(first.client_id, second.client_id);
        assert_eq!(first.client_id.len(), CLIENT_ID_BYTES);
        assert_eq!((first.seq, second.seq), (1, 2));
        assert_ne!(RequestIds::new().next().client_id, first.client_id);
    }

    #[test]
    fn flag_values_parse_with_units_and_refuse_garbage() {
        assert_eq!(parse_duration_ms("d", "250ms"), Ok(250));
        assert_eq!(parse_duration_ms("d", "5s"), Ok(5000));
        assert_eq!(parse_duration_ms("d", "2m"), Ok(120_000));
        assert_eq!(parse_duration_ms("d", "3"), Ok(3000));
        assert!(parse_duration_ms("d", "5 weeks").is_err());
        assert_eq!(parse_duration_ms("d", "1.5s"), Ok(1500));
        assert_eq!(parse_duration_ms("d", "0.5"), Ok(500));
        assert_eq!(parse_duration_ms("d", " 2h30m "), Ok(9_000_000));
        assert_eq!(parse_duration_ms("d", "2160h"), Ok(7_776_000_000));
        assert_eq!(parse_duration_ms("d", "3 mins"), Ok(180_000));
        for bad in ["-5s", "", "1d", "inf", "5x", "1..2s"] {
            let error = parse_duration_ms("d", bad).expect_err(bad);
            assert!(error.starts_with("--d "), "{error}");
        }
        assert_eq!(parse_bytes("m", "64M"), Ok(64 << 20));
        assert_eq!(parse_bytes("m", "512"), Ok(512));
        assert!(parse_bytes("m", "lots").is_err());
        assert_eq!(parse_nano_cpus("c", "0.5"), Ok(500_000_000));
    }

    #[test]
    fn update_flags_change_only_what_is_given() {
        let mut spec = ServiceSpec {
            name: "web".into(),
            replicas: 3,
            task: Some(TaskSpec {
                command: "sleep".into(),
                env: vec!["A=1".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let flags = SpecFlags {
            workdir: Some("/srv".into()),
            ..Default::default()
        };
        apply_flags(&mut spec, &flags).unwrap();
        let task = spec.task.unwrap();
        assert_eq!(spec.replicas, 3);
        assert_eq!(task.env, vec!["A=1".to_string()]);
        assert_eq!(task.working_dir, "/srv");
    }
}
