//! Spec validation and placement constraints.
//!
//! Owns the rules a spec must satisfy before a proposer turns it into a transaction: each
//! failure names the field and says why. Must never be called from `Store::apply`: apply runs
//! on every manager, and a rule that changes between builds would make managers disagree
//! about a committed entry. Validation belongs where requests enter (the control API).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::health::{
    HEALTH_COMMAND_BYTES_MAX, HEALTH_DURATION_MS_MAX, HEALTH_INTERVAL_MS_MIN, HEALTH_RETRIES_MAX,
    HEALTH_TIMEOUT_MS_MIN,
};
use crate::proto::objects::{
    ClusterSpec, ConfigSpec, HealthConfig, NetworkSpec, Node, NodeAvailability, NodeRole, NodeSpec,
    PlacementPreference, PortSpec, ResourceRequirements, Resources, RestartCondition,
    RestartPolicy, SecretReference, SecretSpec, ServiceMode, ServiceSpec, TaskSpec, UpdateConfig,
    UpdateFailureAction, UpdateOrder,
};
use crate::wire::Code;

/// The longest service, network or cluster name (a DNS label).
pub const NAME_BYTES_MAX: usize = 63;

/// The largest secret or config value (Docker's limit).
pub const SECRET_DATA_BYTES_MAX: usize = 500 * 1024;
/// The longest secret or config name (Docker's limit).
pub const SECRET_NAME_BYTES_MAX: usize = 64;
/// The most secrets (and, separately, configs) one task template reads.
pub const TASK_SECRETS_MAX: usize = 32;
/// The longest file name a secret or config is given as in its task's directory.
pub const SECRET_TARGET_BYTES_MAX: usize = 255;

/// The most networks one service attaches to (a node joins at most 24 gossip networks).
pub const SERVICE_NETWORKS_MAX: usize = 8;
/// The most ports one task template declares: with [`PORT_NAME_BYTES_MAX`], an endpoint
/// entry stays far below the gossip value limit (1 KiB).
pub const PORTS_MAX: usize = 8;
/// The longest port name (an IANA service name is at most 15 characters).
pub const PORT_NAME_BYTES_MAX: usize = 15;
/// The only port protocol today.
pub const PORT_PROTOCOL_TCP: &str = "tcp";
/// The network driver `network create` records unless told otherwise.
pub const NETWORK_DRIVER_DEFAULT: &str = "overlay";

/// The most replicas one replicated service may ask for.
pub const REPLICAS_MAX: u64 = 100_000;

/// The most placement constraints one task template may carry.
pub const CONSTRAINTS_MAX: usize = 64;

/// The longest label key.
pub const LABEL_KEY_BYTES_MAX: usize = 128;
/// The longest label value: labels are for selecting and describing, not for data.
pub const LABEL_VALUE_BYTES_MAX: usize = 4 * 1024;
/// The most labels on one object (service, node or cluster).
pub const LABELS_MAX: usize = 128;
/// The most bytes of all labels of one object together (keys and values).
pub const LABELS_BYTES_MAX: usize = 64 * 1024;

// Sizes of what a task hands to `exec`. Linux refuses (`E2BIG`) a single string longer than
// `MAX_ARG_STRLEN` (128 KiB) and arguments plus environment (strings and their pointers)
// beyond `ARG_MAX` (a quarter of the stack limit: usually 2 MiB). The limits below keep a
// task well inside both (at most about 360 KiB in all), so a spec the API accepts does not
// fail on every node, and they keep every task (which carries a copy of its spec) small in
// the replicated store.

/// The longest single argument (the command included).
pub const ARG_BYTES_MAX: usize = 64 * 1024;
/// The most bytes of the command and all its arguments together (each counted with the NUL
/// that ends it).
pub const ARGS_BYTES_MAX: usize = 256 * 1024;
/// The most arguments of a task (each also costs a pointer in `ARG_MAX`).
pub const ARGS_MAX: usize = 4 * 1024;
/// The most bytes of a task's environment together (each `KEY=VALUE` with its NUL), which
/// also bounds a single variable.
pub const ENV_BYTES_MAX: usize = 64 * 1024;
/// The most environment variables of a task.
pub const ENV_VARS_MAX: usize = 4 * 1024;
/// The longest working directory (Linux's `PATH_MAX`).
pub const WORKING_DIR_BYTES_MAX: usize = 4 * 1024;
/// The longest placement constraint.
pub const CONSTRAINT_BYTES_MAX: usize = 1024;

/// The most placement preferences one task template may carry (levels of nested spreading).
pub const PREFERENCES_MAX: usize = 8;

/// The prefix of a spread descriptor: only node labels are spread over.
pub const SPREAD_LABEL_PREFIX: &str = "node.labels.";

/// The smallest memory limit accepted: below it no process starts (the dynamic loader and
/// libc alone map more address space).
pub const TASK_MEMORY_LIMIT_BYTES_MIN: i64 = 4 << 20;

/// The shortest non-zero node certificate lifetime (one hour).
pub const NODE_CERT_EXPIRY_MS_MIN: i64 = 60 * 60 * 1000;
/// How long a node is DOWN before its tasks are ORPHANED, by default (swarmkit's
/// `maxDownTime`, 24 h); a cluster spec's 0 means this.
pub const ORPHAN_AFTER_MS_DEFAULT: i64 = 24 * 60 * 60 * 1000;
/// The shortest `orphan_after_ms` (shorter would orphan the tasks of a node that is only
/// restarting; tests use a few seconds).
pub const ORPHAN_AFTER_MS_MIN: i64 = 1_000;
/// The longest `orphan_after_ms` (a year: a value past it is a typo).
pub const ORPHAN_AFTER_MS_MAX: i64 = 365 * 24 * 60 * 60 * 1000;

/// The shortest agent heartbeat period (swarmkit refuses anything shorter than a second:
/// heartbeats from thousands of nodes would swamp the dispatcher).
pub const HEARTBEAT_PERIOD_MS_MIN: i64 = 1_000;
/// The longest agent heartbeat period: beyond an hour a dead node would go unnoticed for
/// three hours.
pub const HEARTBEAT_PERIOD_MS_MAX: i64 = 60 * 60 * 1_000;
/// The most applied entries between Raft snapshots: the log (and a restart's replay) must
/// stay bounded.
pub const SNAPSHOT_INTERVAL_ENTRIES_MAX: u64 = 10_000_000;
/// The most finished tasks kept per slot.
pub const TASK_HISTORY_RETENTION_MAX: i64 = 1_000;

/// A spec field that is not acceptable, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid spec: {field}: {reason}")]
pub struct SpecError {
    /// The field's path, e.g. `task.placement.constraints[1]`.
    pub field: String,
    /// What is wrong and what is accepted.
    pub reason: String,
}

impl SpecError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Always [`Code::InvalidArgument`]: the same request will never pass.
    pub fn code(&self) -> Code {
        Code::InvalidArgument
    }
}

type Checked = Result<(), SpecError>;

// ---------------------------------------------------------------------------------------------
// Services

/// Checks a service spec.
///
/// # Errors
/// The first field that is not acceptable.
pub fn validate_service_spec(spec: &ServiceSpec) -> Checked {
    validate_name("name", &spec.name)?;
    validate_labels("labels", &spec.labels)?;
    validate_mode(spec)?;
    let task = spec
        .task
        .as_ref()
        .ok_or_else(|| SpecError::new("task", "required: the task template to run"))?;
    validate_task_spec("task", task)?;
    if let Some(update) = &spec.update {
        validate_update_config("update", update)?;
    }
    if let Some(rollback) = &spec.rollback {
        validate_update_config("rollback", rollback)?;
        if rollback.failure_action == UpdateFailureAction::Rollback as i32 {
            return Err(SpecError::new(
                "rollback.failure_action",
                "a rollback cannot be rolled back; use pause or continue",
            ));
        }
    }
    if spec.networks.len() > SERVICE_NETWORKS_MAX {
        return Err(SpecError::new(
            "networks",
            format!(
                "{} networks, more than {SERVICE_NETWORKS_MAX}",
                spec.networks.len()
            ),
        ));
    }
    for (index, network) in spec.networks.iter().enumerate() {
        if network.is_empty() {
            return Err(SpecError::new(
                format!("networks[{index}]"),
                "network id must not be empty",
            ));
        }
        if spec.networks[..index].contains(network) {
            return Err(SpecError::new(
                format!("networks[{index}]"),
                format!("{network:?} is named twice"),
            ));
        }
    }
    Ok(())
}

/// Checks a network spec: its name is a DNS label (`<service>.<network>` resolves), its
/// driver `overlay` (the only one), no subnet (nothing allocates addresses yet).
///
/// # Errors
/// The first field that is not acceptable.
pub fn validate_network_spec(spec: &NetworkSpec) -> Checked {
    validate_name("name", &spec.name)?;
    validate_labels("labels", &spec.labels)?;
    if spec.driver != NETWORK_DRIVER_DEFAULT {
        return Err(SpecError::new(
            "driver",
            format!(
                "{:?} is not supported; the only driver is {NETWORK_DRIVER_DEFAULT:?}",
                spec.driver
            ),
        ));
    }
    if !spec.subnet.is_empty() {
        return Err(SpecError::new(
            "subnet",
            "is not supported yet: tasks use their node's address",
        ));
    }
    Ok(())
}

/// Checks a secret spec: its name ([`validate_secret_name`]), labels, and a value of 1 to
/// [`SECRET_DATA_BYTES_MAX`] bytes.
///
/// # Errors
/// The first field that is not acceptable.
pub fn validate_secret_spec(spec: &SecretSpec) -> Checked {
    validate_secret_name("name", &spec.name)?;
    validate_labels("labels", &spec.labels)?;
    validate_secret_data("data", spec.data.len())
}

/// Checks a config spec, as [`validate_secret_spec`].
///
/// # Errors
/// The first field that is not acceptable.
pub fn validate_config_spec(spec: &ConfigSpec) -> Checked {
    validate_secret_name("name", &spec.name)?;
    validate_labels("labels", &spec.labels)?;
    validate_secret_data("data", spec.data.len())
}

fn validate_secret_data(field: &str, len: usize) -> Checked {
    if len == 0 {
        return Err(SpecError::new(
            field,
            "is empty; give a value of 1 byte or more",
        ));
    }
    if len > SECRET_DATA_BYTES_MAX {
        return Err(SpecError::new(
            field,
            format!(
                "is {len} bytes, more than {SECRET_DATA_BYTES_MAX} (500 KiB); store large \
                 files elsewhere"
            ),
        ));
    }
    Ok(())
}

/// Checks a secret or config name (Docker's rule): 1 to [`SECRET_NAME_BYTES_MAX`] ASCII
/// letters, digits, `-`, `_` and `.`, starting and ending with a letter or digit.
///
/// # Errors
/// Why the name is not acceptable, under `field`.
pub fn validate_secret_name(field: &str, name: &str) -> Checked {
    check_name(
        field,
        name,
        SECRET_NAME_BYTES_MAX,
        &['-', '_', '.'],
        "'-', '_' and '.'",
    )
}

/// Checks the secret (or config) references of a task template: at most
/// [`TASK_SECRETS_MAX`], each naming a secret, each target one file name (no `/`, not `.`
/// or `..`), no target twice, a mode of at most 0777.
fn validate_references(field: &str, references: &[SecretReference]) -> Checked {
    if references.len() > TASK_SECRETS_MAX {
        return Err(SpecError::new(
            field,
            format!("{} entries, more than {TASK_SECRETS_MAX}", references.len()),
        ));
    }
    for (index, reference) in references.iter().enumerate() {
        let at = format!("{field}[{index}]");
        if reference.name.is_empty() && reference.id.is_empty() {
            return Err(SpecError::new(format!("{at}.name"), "must not be empty"));
        }
        let target = reference_target(reference);
        let bad_target = target.is_empty()
            || target.len() > SECRET_TARGET_BYTES_MAX
            || target.contains(['/', '\0'])
            || target == "."
            || target == "..";
        if bad_target {
            return Err(SpecError::new(
                format!("{at}.target"),
                format!(
                    "{target:?} is not a file name: 1 to {SECRET_TARGET_BYTES_MAX} bytes, no \
                     '/', not '.' or '..'"
                ),
            ));
        }
        if references[..index]
            .iter()
            .any(|other| reference_target(other) == target)
        {
            return Err(SpecError::new(
                format!("{at}.target"),
                format!("{target:?} is the target of two entries; give one of them another"),
            ));
        }
        if reference.mode > 0o777 {
            return Err(SpecError::new(
                format!("{at}.mode"),
                format!("{:o} is not a file mode (0 to 0777)", reference.mode),
            ));
        }
    }
    Ok(())
}

/// The file name a referenced secret or config is given as: its target, or its name.
pub fn reference_target(reference: &SecretReference) -> &str {
    if reference.target.is_empty() {
        &reference.name
    } else {
        &reference.target
    }
}

/// Checks the ports of a task template: at most [`PORTS_MAX`], each named by a DNS label of
/// at most [`PORT_NAME_BYTES_MAX`] bytes, unique, a port from 1 to 65535, protocol `tcp`.
fn validate_ports(field: &str, ports: &[PortSpec]) -> Checked {
    if ports.len() > PORTS_MAX {
        return Err(SpecError::new(
            field,
            format!("{} ports, more than {PORTS_MAX}", ports.len()),
        ));
    }
    for (index, port) in ports.iter().enumerate() {
        let at = format!("{field}[{index}]");
        validate_name(&format!("{at}.name"), &port.name)?;
        if port.name.len() > PORT_NAME_BYTES_MAX {
            return Err(SpecError::new(
                format!("{at}.name"),
                format!(
                    "is {} bytes, more than {PORT_NAME_BYTES_MAX}",
                    port.name.len()
                ),
            ));
        }
        if ports[..index].iter().any(|p| p.name == port.name) {
            return Err(SpecError::new(
                format!("{at}.name"),
                format!("{:?} is named twice", port.name),
            ));
        }
        if !(1..=u32::from(u16::MAX)).contains(&port.port) {
            return Err(SpecError::new(
                format!("{at}.port"),
                format!("{} is outside [1, 65535]", port.port),
            ));
        }
        if port.protocol != PORT_PROTOCOL_TCP {
            return Err(SpecError::new(
                format!("{at}.protocol"),
                format!("{:?} is not supported; use \"tcp\"", port.protocol),
            ));
        }
    }
    Ok(())
}

/// Checks a name for services, networks and the cluster: 1 to 63 ASCII letters, digits, `-`
/// and `_`, starting and ending with a letter or digit.
///
/// # Errors
/// Why the name is not acceptable, under `field`.
pub fn validate_name(field: &str, name: &str) -> Checked {
    check_name(field, name, NAME_BYTES_MAX, &['-', '_'], "'-' and '_'")
}

/// The name rule both kinds of names share: 1 to `bytes_max` ASCII letters, digits and the
/// `punctuation` allowed (named for the user by `punctuation_text`), starting and ending
/// with a letter or digit.
fn check_name(
    field: &str,
    name: &str,
    bytes_max: usize,
    punctuation: &[char],
    punctuation_text: &str,
) -> Checked {
    if name.is_empty() {
        return Err(SpecError::new(field, "must not be empty"));
    }
    if name.len() > bytes_max {
        return Err(SpecError::new(
            field,
            format!("is {} bytes, more than {bytes_max}", name.len()),
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || punctuation.contains(c)))
    {
        return Err(SpecError::new(
            field,
            format!("{name:?} contains {bad:?}; use letters, digits, {punctuation_text}"),
        ));
    }
    let edges_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !edges_ok(name.chars().next()) || !edges_ok(name.chars().last()) {
        return Err(SpecError::new(
            field,
            format!("{name:?} must start and end with a letter or digit"),
        ));
    }
    Ok(())
}

/// Checks labels: each key non-empty, at most [`LABEL_KEY_BYTES_MAX`], without whitespace,
/// `=` or `!` (constraints could not name it); each value at most [`LABEL_VALUE_BYTES_MAX`];
/// at most [`LABELS_MAX`] labels and [`LABELS_BYTES_MAX`] bytes in all.
fn validate_labels(field: &str, labels: &BTreeMap<String, String>) -> Checked {
    if labels.len() > LABELS_MAX {
        return Err(SpecError::new(
            field,
            format!(
                "{} labels, more than the {LABELS_MAX} an object may have",
                labels.len()
            ),
        ));
    }
    let total: usize = labels.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > LABELS_BYTES_MAX {
        return Err(SpecError::new(
            field,
            format!(
                "the labels are {} bytes, more than the {} an object may have; keep data \
                 out of labels",
                thousands(total),
                bytes_limit(LABELS_BYTES_MAX)
            ),
        ));
    }
    for (key, value) in labels {
        if key.is_empty() {
            return Err(SpecError::new(field, "label keys must not be empty"));
        }
        if key.len() > LABEL_KEY_BYTES_MAX {
            return Err(SpecError::new(
                format!("{field}.{}", shorten(key)),
                format!(
                    "label key is {} bytes, more than {LABEL_KEY_BYTES_MAX}",
                    thousands(key.len())
                ),
            ));
        }
        if key
            .chars()
            .any(|c| c.is_whitespace() || c == '=' || c == '!')
        {
            return Err(SpecError::new(
                format!("{field}.{key}"),
                "label keys must not contain whitespace, '=' or '!'",
            ));
        }
        if value.len() > LABEL_VALUE_BYTES_MAX {
            return Err(SpecError::new(
                format!("{field}.{key}"),
                format!(
                    "label value is {} bytes, more than the {} a label may have",
                    thousands(value.len()),
                    bytes_limit(LABEL_VALUE_BYTES_MAX)
                ),
            ));
        }
    }
    Ok(())
}

/// `text` cut to a length that reads well inside an error message.
fn shorten(text: &str) -> String {
    const SHOWN_CHARS_MAX: usize = 32;
    if text.chars().count() <= SHOWN_CHARS_MAX {
        return text.to_string();
    }
    let head: String = text.chars().take(SHOWN_CHARS_MAX).collect();
    format!("{head}…")
}

/// `n` with thousands separators: `1048600` → `1,048,600`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// A byte limit as people say it: `65536` → `64 KiB (65,536 bytes)`.
fn bytes_limit(bytes: usize) -> String {
    if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{} KiB ({} bytes)", bytes / 1024, thousands(bytes))
    } else {
        format!("{} bytes", thousands(bytes))
    }
}

fn validate_mode(spec: &ServiceSpec) -> Checked {
    match ServiceMode::try_from(spec.mode) {
        Ok(ServiceMode::Replicated) => {
            if spec.replicas > REPLICAS_MAX {
                return Err(SpecError::new(
                    "replicas",
                    format!("{} is more than the limit of {REPLICAS_MAX}", spec.replicas),
                ));
            }
            Ok(())
        }
        Ok(ServiceMode::Global) => {
            if spec.replicas != 0 {
                return Err(SpecError::new(
                    "replicas",
                    format!(
                        "is {} but a global service runs one task per eligible node; leave \
                         replicas at 0 or use replicated mode",
                        spec.replicas
                    ),
                ));
            }
            Ok(())
        }
        Ok(ServiceMode::Unspecified) => {
            Err(SpecError::new("mode", "required: replicated or global"))
        }
        Err(_) => Err(SpecError::new(
            "mode",
            format!("unknown value {}; use replicated or global", spec.mode),
        )),
    }
}

fn validate_task_spec(field: &str, task: &TaskSpec) -> Checked {
    if task.command.is_empty() {
        return Err(SpecError::new(
            format!("{field}.command"),
            "must not be empty: name the program to run",
        ));
    }
    no_nul(&format!("{field}.command"), &task.command)?;
    for (index, arg) in task.args.iter().enumerate() {
        no_nul(&format!("{field}.args[{index}]"), arg)?;
    }
    validate_args(field, task)?;
    for (index, entry) in task.env.iter().enumerate() {
        validate_env(&format!("{field}.env[{index}]"), entry)?;
    }
    validate_env_size(&format!("{field}.env"), &task.env)?;
    if !task.working_dir.is_empty() {
        no_nul(&format!("{field}.working_dir"), &task.working_dir)?;
        if !task.working_dir.starts_with('/') {
            return Err(SpecError::new(
                format!("{field}.working_dir"),
                format!("{:?} must be an absolute path", task.working_dir),
            ));
        }
        if task.working_dir.len() > WORKING_DIR_BYTES_MAX {
            return Err(SpecError::new(
                format!("{field}.working_dir"),
                format!(
                    "is {} bytes, more than the {} of a path",
                    thousands(task.working_dir.len()),
                    bytes_limit(WORKING_DIR_BYTES_MAX)
                ),
            ));
        }
    }
    if let Some(restart) = &task.restart {
        validate_restart(&format!("{field}.restart"), restart)?;
    }
    if let Some(resources) = &task.resources {
        validate_resources(&format!("{field}.resources"), resources)?;
    }
    if let Some(placement) = &task.placement {
        parse_constraints(
            &format!("{field}.placement.constraints"),
            &placement.constraints,
        )?;
        parse_preferences(
            &format!("{field}.placement.preferences"),
            &placement.preferences,
        )?;
    }
    validate_ports(&format!("{field}.ports"), &task.ports)?;
    validate_references(&format!("{field}.secrets"), &task.secrets)?;
    validate_references(&format!("{field}.configs"), &task.configs)?;
    if let Some(health) = &task.health {
        validate_health(&format!("{field}.health"), health)?;
    }
    Ok(())
}

/// Checks a health check: a command of at most [`HEALTH_COMMAND_BYTES_MAX`] bytes; an
/// interval of 0 (the default) or [`HEALTH_INTERVAL_MS_MIN`] to [`HEALTH_DURATION_MS_MAX`];
/// a timeout of 0 or [`HEALTH_TIMEOUT_MS_MIN`] to the same maximum; a start period of 0 to
/// the maximum; at most [`HEALTH_RETRIES_MAX`] retries.
fn validate_health(field: &str, health: &HealthConfig) -> Checked {
    if health.command.is_empty() {
        return Err(SpecError::new(
            format!("{field}.command"),
            "must not be empty: give the check's command (--health-cmd), or remove the \
             check (--no-healthcheck)",
        ));
    }
    no_nul(&format!("{field}.command"), &health.command)?;
    if health.command.len() > HEALTH_COMMAND_BYTES_MAX {
        return Err(SpecError::new(
            format!("{field}.command"),
            format!(
                "is {} bytes, more than {}; run a script instead",
                thousands(health.command.len()),
                bytes_limit(HEALTH_COMMAND_BYTES_MAX)
            ),
        ));
    }
    health_duration(
        &format!("{field}.interval_ms"),
        health.interval_ms,
        HEALTH_INTERVAL_MS_MIN,
    )?;
    health_duration(
        &format!("{field}.timeout_ms"),
        health.timeout_ms,
        HEALTH_TIMEOUT_MS_MIN,
    )?;
    health_duration(
        &format!("{field}.start_period_ms"),
        health.start_period_ms,
        0,
    )?;
    if health.retries > HEALTH_RETRIES_MAX {
        return Err(SpecError::new(
            format!("{field}.retries"),
            format!(
                "{} is more than {HEALTH_RETRIES_MAX}; 0 means the default ({})",
                health.retries,
                crate::health::HEALTH_RETRIES_DEFAULT
            ),
        ));
    }
    Ok(())
}

/// A health duration: 0 (the default) or from `min_ms` to [`HEALTH_DURATION_MS_MAX`].
fn health_duration(field: &str, value_ms: i64, min_ms: i64) -> Checked {
    not_negative(field.to_owned(), value_ms)?;
    if value_ms != 0 && !(min_ms..=HEALTH_DURATION_MS_MAX).contains(&value_ms) {
        return Err(SpecError::new(
            field,
            format!(
                "{value_ms} ms is outside {min_ms} ms to {HEALTH_DURATION_MS_MAX} ms (one day); \
                 0 means the default"
            ),
        ));
    }
    Ok(())
}

/// The command and arguments within [`ARG_BYTES_MAX`] each, [`ARGS_BYTES_MAX`] together and
/// [`ARGS_MAX`] in number.
fn validate_args(field: &str, task: &TaskSpec) -> Checked {
    if task.args.len() > ARGS_MAX {
        return Err(SpecError::new(
            format!("{field}.args"),
            format!(
                "{} arguments, more than the {} a task may have",
                thousands(task.args.len()),
                thousands(ARGS_MAX)
            ),
        ));
    }
    let strings = std::iter::once((format!("{field}.command"), &task.command)).chain(
        task.args
            .iter()
            .enumerate()
            .map(|(index, arg)| (format!("{field}.args[{index}]"), arg)),
    );
    let mut total = 0usize;
    for (name, text) in strings {
        if text.len() > ARG_BYTES_MAX {
            return Err(SpecError::new(
                name,
                format!(
                    "is {} bytes, more than the {} one argument may have; pass large data \
                     in a file and its path as the argument",
                    thousands(text.len()),
                    bytes_limit(ARG_BYTES_MAX)
                ),
            ));
        }
        total += text.len() + 1;
    }
    if total > ARGS_BYTES_MAX {
        return Err(SpecError::new(
            format!("{field}.args"),
            format!(
                "the command and its arguments are {} bytes, more than the {} a task may \
                 have; pass large data in a file",
                thousands(total),
                bytes_limit(ARGS_BYTES_MAX)
            ),
        ));
    }
    Ok(())
}

/// The environment within [`ENV_BYTES_MAX`] and [`ENV_VARS_MAX`] variables.
fn validate_env_size(field: &str, env: &[String]) -> Checked {
    if env.len() > ENV_VARS_MAX {
        return Err(SpecError::new(
            field,
            format!(
                "{} variables, more than the {} a task may have",
                thousands(env.len()),
                thousands(ENV_VARS_MAX)
            ),
        ));
    }
    let total: usize = env.iter().map(|entry| entry.len() + 1).sum();
    if total > ENV_BYTES_MAX {
        let largest = env
            .iter()
            .enumerate()
            .max_by_key(|(_, entry)| entry.len())
            .map(|(index, entry)| {
                let key = entry.split_once('=').map_or(entry.as_str(), |(key, _)| key);
                format!(
                    " (the largest is env[{index}], {}, {} bytes)",
                    shorten(key),
                    thousands(entry.len())
                )
            })
            .unwrap_or_default();
        return Err(SpecError::new(
            field,
            format!(
                "the environment is {} bytes{largest}, more than the {} a task may have; \
                 pass large data in a file and its path in the environment",
                thousands(total),
                bytes_limit(ENV_BYTES_MAX)
            ),
        ));
    }
    Ok(())
}

fn no_nul(field: &str, value: &str) -> Checked {
    if value.contains('\0') {
        return Err(SpecError::new(field, "must not contain a NUL byte"));
    }
    Ok(())
}

fn validate_env(field: &str, entry: &str) -> Checked {
    no_nul(field, entry)?;
    match entry.split_once('=') {
        None => Err(SpecError::new(
            field,
            format!("{entry:?} must have the form KEY=VALUE"),
        )),
        Some(("", _)) => Err(SpecError::new(
            field,
            format!("{entry:?} has an empty variable name"),
        )),
        Some(_) => Ok(()),
    }
}

fn not_negative(field: String, value: i64) -> Checked {
    if value < 0 {
        return Err(SpecError::new(
            field,
            format!("{value} is negative; use 0 or more"),
        ));
    }
    Ok(())
}

fn validate_restart(field: &str, restart: &RestartPolicy) -> Checked {
    if RestartCondition::try_from(restart.condition).is_err() {
        return Err(SpecError::new(
            format!("{field}.condition"),
            format!(
                "unknown value {}; use none, on-failure or any",
                restart.condition
            ),
        ));
    }
    not_negative(format!("{field}.delay_ms"), restart.delay_ms.unwrap_or(0))?;
    not_negative(format!("{field}.window_ms"), restart.window_ms)
}

/// Reservations are counted by the scheduler (a task is placed only where they fit) and
/// limits are enforced by the agent on the task's processes (cgroup v2 where the node has
/// it, else an address-space rlimit for memory; a CPU limit the node cannot enforce is said
/// in the task's `status.limits_note`), so any non-negative amount is accepted; a limit
/// below the reservation is refused, as a task could never use what it reserves.
fn validate_resources(field: &str, resources: &ResourceRequirements) -> Checked {
    let zero = Resources::default();
    let reservations = resources.reservations.as_ref().unwrap_or(&zero);
    let limits = resources.limits.as_ref().unwrap_or(&zero);
    for (name, values) in [("reservations", reservations), ("limits", limits)] {
        not_negative(format!("{field}.{name}.nano_cpus"), values.nano_cpus)?;
        not_negative(format!("{field}.{name}.memory_bytes"), values.memory_bytes)?;
    }
    if limits.memory_bytes > 0 && limits.memory_bytes < TASK_MEMORY_LIMIT_BYTES_MIN {
        return Err(SpecError::new(
            format!("{field}.limits.memory_bytes"),
            format!(
                "{} is too small for a process to start; give at least {}",
                limits.memory_bytes,
                bytes_limit(usize::try_from(TASK_MEMORY_LIMIT_BYTES_MIN).unwrap_or(usize::MAX))
            ),
        ));
    }
    for (name, reserved, limit, flag) in [
        ("nano_cpus", reservations.nano_cpus, limits.nano_cpus, "cpu"),
        (
            "memory_bytes",
            reservations.memory_bytes,
            limits.memory_bytes,
            "memory",
        ),
    ] {
        if limit > 0 && reserved > limit {
            return Err(SpecError::new(
                format!("{field}.reservations.{name}"),
                format!(
                    "{reserved} is more than the limit ({limit}): a task could never use what \
                     it reserves; lower --reserve-{flag} or raise --limit-{flag}"
                ),
            ));
        }
    }
    Ok(())
}

fn validate_update_config(field: &str, update: &UpdateConfig) -> Checked {
    if UpdateFailureAction::try_from(update.failure_action).is_err() {
        return Err(SpecError::new(
            format!("{field}.failure_action"),
            format!(
                "unknown value {}; use pause, continue or rollback",
                update.failure_action
            ),
        ));
    }
    if UpdateOrder::try_from(update.order).is_err() {
        return Err(SpecError::new(
            format!("{field}.order"),
            format!(
                "unknown value {}; use stop-first or start-first",
                update.order
            ),
        ));
    }
    not_negative(format!("{field}.delay_ms"), update.delay_ms)?;
    not_negative(format!("{field}.monitor_ms"), update.monitor_ms)?;
    if !(0.0..=1.0).contains(&update.max_failure_ratio) {
        return Err(SpecError::new(
            format!("{field}.max_failure_ratio"),
            format!(
                "{} is not a share from 0 to 1 (e.g. 0.2: a fifth of the tasks may fail)",
                update.max_failure_ratio
            ),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Nodes and the cluster

/// Checks a node spec.
///
/// # Errors
/// The first field that is not acceptable.
pub fn validate_node_spec(spec: &NodeSpec) -> Checked {
    if NodeAvailability::try_from(spec.availability).is_err() {
        return Err(SpecError::new(
            "availability",
            format!(
                "unknown value {}; use active, pause or drain",
                spec.availability
            ),
        ));
    }
    if NodeRole::try_from(spec.desired_role).is_err() {
        return Err(SpecError::new(
            "desired_role",
            format!("unknown value {}; use worker or manager", spec.desired_role),
        ));
    }
    validate_labels("labels", &spec.labels)
}

/// The update monitor period of a service that sets none (docker's): a new task that ends
/// within it counts as a failed update.
pub const UPDATE_MONITOR_DEFAULT_MS: i64 = 5_000;

/// The update (and rollback) settings of a service that sets none, docker's: one task at a
/// time, no delay, stop-first, a 5 s monitor, pause on the first failure.
pub fn default_update_config() -> UpdateConfig {
    UpdateConfig {
        parallelism: 1,
        delay_ms: 0,
        failure_action: UpdateFailureAction::Pause as i32,
        order: UpdateOrder::StopFirst as i32,
        monitor_ms: UPDATE_MONITOR_DEFAULT_MS,
        max_failure_ratio: 0.0,
    }
}

/// The cluster settings a new cluster starts with (swarmkit's defaults).
pub fn default_cluster_spec(name: &str) -> ClusterSpec {
    ClusterSpec {
        name: name.to_owned(),
        labels: Default::default(),
        heartbeat_period_ms: 5_000,
        snapshot_interval_entries: 10_000,
        log_entries_for_slow_followers: 500,
        keep_old_snapshots: 0,
        task_history_retention: 5,
        node_cert_expiry_ms: 90 * 24 * 60 * 60 * 1000,
        orphan_after_ms: ORPHAN_AFTER_MS_DEFAULT,
    }
}

/// Checks a cluster spec.
///
/// # Errors
/// The first field that is not acceptable.
pub fn validate_cluster_spec(spec: &ClusterSpec) -> Checked {
    validate_name("name", &spec.name)?;
    validate_labels("labels", &spec.labels)?;
    if !(HEARTBEAT_PERIOD_MS_MIN..=HEARTBEAT_PERIOD_MS_MAX).contains(&spec.heartbeat_period_ms) {
        return Err(SpecError::new(
            "heartbeat_period_ms",
            format!(
                "{} ms is outside [{HEARTBEAT_PERIOD_MS_MIN} ms, {HEARTBEAT_PERIOD_MS_MAX} ms] \
                 (1s to 1h)",
                spec.heartbeat_period_ms
            ),
        ));
    }
    if !(1..=SNAPSHOT_INTERVAL_ENTRIES_MAX).contains(&spec.snapshot_interval_entries) {
        return Err(SpecError::new(
            "snapshot_interval_entries",
            format!(
                "{} is outside [1, {SNAPSHOT_INTERVAL_ENTRIES_MAX}]: 0 would let the Raft log \
                 grow forever",
                spec.snapshot_interval_entries
            ),
        ));
    }
    if !(0..=TASK_HISTORY_RETENTION_MAX).contains(&spec.task_history_retention) {
        return Err(SpecError::new(
            "task_history_retention",
            format!(
                "{} is outside [0, {TASK_HISTORY_RETENTION_MAX}] finished tasks per slot",
                spec.task_history_retention
            ),
        ));
    }
    if spec.node_cert_expiry_ms != 0 && spec.node_cert_expiry_ms < NODE_CERT_EXPIRY_MS_MIN {
        return Err(SpecError::new(
            "node_cert_expiry_ms",
            format!(
                "{} is below the minimum of {NODE_CERT_EXPIRY_MS_MIN} (one hour); 0 keeps the \
                 default",
                spec.node_cert_expiry_ms
            ),
        ));
    }
    if spec.orphan_after_ms != 0
        && !(ORPHAN_AFTER_MS_MIN..=ORPHAN_AFTER_MS_MAX).contains(&spec.orphan_after_ms)
    {
        return Err(SpecError::new(
            "orphan_after_ms",
            format!(
                "{} ms is outside [{ORPHAN_AFTER_MS_MIN} ms, {ORPHAN_AFTER_MS_MAX} ms] (1s to a \
                 year); 0 keeps the default of 24h",
                spec.orphan_after_ms
            ),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Placement constraints

/// What a constraint looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConstraintKey {
    /// `node.id`
    NodeId,
    /// `node.hostname` (the node spec's hostname)
    NodeHostname,
    /// `node.role` (`manager` or `worker`, the node's current role)
    NodeRole,
    /// `node.labels.<key>` (the node spec's labels)
    NodeLabel(String),
}

impl fmt::Display for ConstraintKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NodeId => f.write_str("node.id"),
            Self::NodeHostname => f.write_str("node.hostname"),
            Self::NodeRole => f.write_str("node.role"),
            Self::NodeLabel(key) => write!(f, "node.labels.{key}"),
        }
    }
}

/// How a constraint compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConstraintOp {
    /// `==`
    Eq,
    /// `!=`
    Ne,
}

/// A parsed placement constraint: `key == value` or `key != value`. Values compare
/// case-insensitively, as in swarmkit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Constraint {
    /// What is compared.
    pub key: ConstraintKey,
    /// How.
    pub op: ConstraintOp,
    /// With what.
    pub value: String,
}

/// Why a constraint does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("constraint {text:?}: {reason}")]
pub struct ConstraintError {
    /// The constraint as written.
    pub text: String,
    /// What is wrong and what is accepted.
    pub reason: String,
}

impl FromStr for Constraint {
    type Err = ConstraintError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = |reason: &str| ConstraintError {
            text: text.to_owned(),
            reason: reason.to_owned(),
        };
        let (key, op, value) = match (text.find("=="), text.find("!=")) {
            (Some(eq), Some(ne)) if eq < ne => (&text[..eq], ConstraintOp::Eq, &text[eq + 2..]),
            (Some(_), Some(ne)) => (&text[..ne], ConstraintOp::Ne, &text[ne + 2..]),
            (Some(eq), None) => (&text[..eq], ConstraintOp::Eq, &text[eq + 2..]),
            (None, Some(ne)) => (&text[..ne], ConstraintOp::Ne, &text[ne + 2..]),
            (None, None) => return Err(error("expected `key==value` or `key!=value`")),
        };
        let (key, value) = (key.trim(), value.trim());
        if value.is_empty() {
            return Err(error("the value is empty"));
        }
        if value.contains("==") || value.contains("!=") || value.contains('=') {
            return Err(error(
                "only one operator is allowed, and values cannot contain `=`",
            ));
        }
        let key = parse_constraint_key(key).map_err(|reason| error(&reason))?;
        if key == ConstraintKey::NodeRole
            && !value.eq_ignore_ascii_case("manager")
            && !value.eq_ignore_ascii_case("worker")
        {
            return Err(error("node.role is `manager` or `worker`"));
        }
        Ok(Self {
            key,
            op,
            value: value.to_owned(),
        })
    }
}

const LABEL_PREFIX: &str = "node.labels.";

fn parse_constraint_key(key: &str) -> Result<ConstraintKey, String> {
    let lower = key.to_ascii_lowercase();
    match lower.as_str() {
        "node.id" => return Ok(ConstraintKey::NodeId),
        "node.hostname" => return Ok(ConstraintKey::NodeHostname),
        "node.role" => return Ok(ConstraintKey::NodeRole),
        _ => {}
    }
    if lower.starts_with(LABEL_PREFIX) {
        // Label keys keep their case: they are map keys.
        let label = &key[LABEL_PREFIX.len()..];
        if label.is_empty() {
            return Err("the label name after `node.labels.` is empty".into());
        }
        if label.chars().any(char::is_whitespace) {
            return Err("label names cannot contain whitespace".into());
        }
        return Ok(ConstraintKey::NodeLabel(label.to_owned()));
    }
    if key.is_empty() {
        return Err("the key is empty".into());
    }
    Err(format!(
        "unknown key {key:?}; use node.id, node.hostname, node.role or node.labels.<name>"
    ))
}

impl Constraint {
    /// True if `node` satisfies the constraint. A `!=` on a label the node lacks matches;
    /// an `==` does not.
    pub fn matches(&self, node: &Node) -> bool {
        let actual: Option<&str> = match &self.key {
            ConstraintKey::NodeId => Some(&node.id),
            ConstraintKey::NodeHostname => {
                Some(node.spec.as_ref().map_or("", |spec| spec.hostname.as_str()))
            }
            ConstraintKey::NodeRole => Some(match NodeRole::try_from(node.role) {
                Ok(NodeRole::Manager) => "manager",
                _ => "worker",
            }),
            ConstraintKey::NodeLabel(label) => node
                .spec
                .as_ref()
                .and_then(|spec| spec.labels.get(label))
                .map(String::as_str),
        };
        let equal = actual.is_some_and(|actual| actual.eq_ignore_ascii_case(&self.value));
        match self.op {
            ConstraintOp::Eq => equal,
            ConstraintOp::Ne => !equal,
        }
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.op {
            ConstraintOp::Eq => "==",
            ConstraintOp::Ne => "!=",
        };
        write!(f, "{}{op}{}", self.key, self.value)
    }
}

/// Parses every constraint of a task template; errors name `field[index]`.
///
/// # Errors
/// The first constraint that does not parse, or too many constraints.
pub fn parse_constraints(
    field: &str,
    constraints: &[String],
) -> Result<Vec<Constraint>, SpecError> {
    if constraints.len() > CONSTRAINTS_MAX {
        return Err(SpecError::new(
            field,
            format!(
                "{} constraints, more than the limit of {CONSTRAINTS_MAX}",
                constraints.len()
            ),
        ));
    }
    constraints
        .iter()
        .enumerate()
        .map(|(index, text)| {
            if text.len() > CONSTRAINT_BYTES_MAX {
                return Err(SpecError::new(
                    format!("{field}[{index}]"),
                    format!(
                        "is {} bytes, more than the {} of a constraint",
                        thousands(text.len()),
                        bytes_limit(CONSTRAINT_BYTES_MAX)
                    ),
                ));
            }
            text.parse::<Constraint>()
                .map_err(|error| SpecError::new(format!("{field}[{index}]"), error.to_string()))
        })
        .collect()
}

/// Parses every spread preference of a task template into the label keys to spread over,
/// outermost first; errors name `field[index]`.
///
/// # Errors
/// Too many preferences, or one that is not `node.labels.<key>` with a valid key.
pub fn parse_preferences(
    field: &str,
    preferences: &[PlacementPreference],
) -> Result<Vec<String>, SpecError> {
    if preferences.len() > PREFERENCES_MAX {
        return Err(SpecError::new(
            field,
            format!(
                "{} placement preferences, more than the limit of {PREFERENCES_MAX}",
                preferences.len()
            ),
        ));
    }
    preferences
        .iter()
        .enumerate()
        .map(|(index, preference)| {
            spread_label(&preference.spread_descriptor).ok_or_else(|| {
                SpecError::new(
                    format!("{field}[{index}].spread_descriptor"),
                    format!(
                        "{:?} is not a spread descriptor; use node.labels.<key> (e.g. \
                         --placement-pref spread=node.labels.zone), a key of at most \
                         {LABEL_KEY_BYTES_MAX} bytes",
                        preference.spread_descriptor
                    ),
                )
            })
        })
        .collect()
}

/// The label key of a spread descriptor `node.labels.<key>` (spaces around it allowed).
fn spread_label(descriptor: &str) -> Option<String> {
    let key = descriptor.trim().strip_prefix(SPREAD_LABEL_PREFIX)?.trim();
    let valid = !key.is_empty()
        && key.len() <= LABEL_KEY_BYTES_MAX
        && !key.chars().any(|c| c.is_whitespace() || c.is_control());
    valid.then(|| key.to_string())
}

/// True if `node` satisfies every constraint.
pub fn matches_all(constraints: &[Constraint], node: &Node) -> bool {
    constraints
        .iter()
        .all(|constraint| constraint.matches(node))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::objects::{Placement, Resources};

    fn valid() -> ServiceSpec {
        ServiceSpec {
            name: "web-1_a".into(),
            mode: ServiceMode::Replicated as i32,
            replicas: 3,
            task: Some(TaskSpec {
                command: "/usr/bin/env".into(),
                args: vec!["sleep".into(), "1".into()],
                env: vec!["A=1".into(), "EMPTY=".into(), "EQ=a=b".into()],
                working_dir: "/tmp".into(),
                restart: Some(RestartPolicy {
                    condition: RestartCondition::OnFailure as i32,
                    delay_ms: Some(5000),
                    max_attempts: 3,
                    window_ms: 60_000,
                }),
                // Reservations are counted and limits enforced: both are accepted.
                resources: Some(ResourceRequirements {
                    reservations: Some(Resources {
                        nano_cpus: 500_000_000,
                        memory_bytes: 64 << 20,
                    }),
                    limits: Some(Resources {
                        nano_cpus: 1_000_000_000,
                        memory_bytes: 128 << 20,
                    }),
                }),
                placement: Some(Placement {
                    constraints: vec![
                        "node.role==worker".into(),
                        " node.labels.zone != eu-west ".into(),
                    ],
                    preferences: vec![PlacementPreference {
                        spread_descriptor: "node.labels.zone".into(),
                    }],
                }),
                ports: vec![PortSpec {
                    name: "http".into(),
                    port: 8080,
                    protocol: PORT_PROTOCOL_TCP.into(),
                }],
                ..Default::default()
            }),
            update: Some(UpdateConfig {
                parallelism: 2,
                delay_ms: 1000,
                failure_action: UpdateFailureAction::Rollback as i32,
                order: UpdateOrder::StartFirst as i32,
                monitor_ms: 5000,
                max_failure_ratio: 0.0,
            }),
            ..Default::default()
        }
    }

    /// Applies `change` to a valid spec and returns the error's field and reason.
    fn port(name: &str, port: u32) -> crate::proto::objects::PortSpec {
        crate::proto::objects::PortSpec {
            name: name.into(),
            port,
            protocol: PORT_PROTOCOL_TCP.into(),
        }
    }

    #[test]
    fn secret_specs_and_references_are_checked() {
        let good = SecretSpec {
            name: "db.pass_1".into(),
            labels: BTreeMap::new(),
            data: vec![1u8; SECRET_DATA_BYTES_MAX].into(),
        };
        assert!(validate_secret_spec(&good).is_ok());
        let mut large = good.clone();
        large.data = vec![1u8; SECRET_DATA_BYTES_MAX + 1].into();
        assert_eq!(validate_secret_spec(&large).unwrap_err().field, "data");
        let mut empty = good.clone();
        empty.data = Default::default();
        assert_eq!(validate_secret_spec(&empty).unwrap_err().field, "data");
        for name in ["", "a/b", ".hidden", "x".repeat(65).as_str()] {
            let mut bad = good.clone();
            bad.name = name.into();
            assert_eq!(
                validate_secret_spec(&bad).unwrap_err().field,
                "name",
                "{name}"
            );
        }
        let reference = |name: &str, target: &str| SecretReference {
            name: name.into(),
            target: target.into(),
            ..Default::default()
        };
        let task = |secrets| TaskSpec {
            command: "true".into(),
            secrets,
            ..Default::default()
        };
        assert!(
            validate_task_spec("task", &task(vec![reference("a", ""), reference("a", "b")]))
                .is_ok()
        );
        let twice =
            validate_task_spec("task", &task(vec![reference("a", ""), reference("b", "a")]));
        assert_eq!(twice.unwrap_err().field, "task.secrets[1].target");
        for target in ["x/y", "..", "."] {
            let error = validate_task_spec("task", &task(vec![reference("a", target)]));
            assert_eq!(
                error.unwrap_err().field,
                "task.secrets[0].target",
                "{target}"
            );
        }
    }

    #[test]
    fn network_specs_need_a_dns_name_and_the_overlay_driver() {
        let good = NetworkSpec {
            name: "backend".into(),
            driver: NETWORK_DRIVER_DEFAULT.into(),
            ..Default::default()
        };
        assert!(validate_network_spec(&good).is_ok());
        let mut dotted = good.clone();
        dotted.name = "back.end".into();
        assert_eq!(validate_network_spec(&dotted).unwrap_err().field, "name");
        let mut bridge = good.clone();
        bridge.driver = "bridge".into();
        assert!(
            validate_network_spec(&bridge)
                .unwrap_err()
                .reason
                .contains("only driver")
        );
        let mut subnet = good;
        subnet.subnet = "10.0.0.0/24".into();
        assert_eq!(validate_network_spec(&subnet).unwrap_err().field, "subnet");
    }

    fn refused(change: impl FnOnce(&mut ServiceSpec)) -> SpecError {
        let mut spec = valid();
        change(&mut spec);
        validate_service_spec(&spec).expect_err("the spec should be refused")
    }

    fn task(spec: &mut ServiceSpec) -> &mut TaskSpec {
        spec.task.as_mut().unwrap()
    }

    #[test]
    fn a_complete_spec_is_accepted() {
        validate_service_spec(&valid()).unwrap();
        let mut global = valid();
        global.mode = ServiceMode::Global as i32;
        global.replicas = 0;
        validate_service_spec(&global).unwrap();
        let mut minimal = valid();
        minimal.update = None;
        let t = task(&mut minimal);
        t.restart = None;
        t.resources = None;
        t.placement = None;
        t.working_dir.clear();
        validate_service_spec(&minimal).unwrap();
    }

    #[test]
    fn each_invalid_field_is_named_with_a_reason() {
        let cases: Vec<(SpecError, &str, &str)> = vec![
            (refused(|s| s.name.clear()), "name", "empty"),
            (refused(|s| s.name = "web app".into()), "name", "' '"),
            (refused(|s| s.name = "-web".into()), "name", "start and end"),
            (refused(|s| s.name = "a".repeat(64)), "name", "more than 63"),
            (refused(|s| s.mode = 0), "mode", "replicated or global"),
            (refused(|s| s.mode = 9), "mode", "unknown value 9"),
            (
                refused(|s| s.replicas = REPLICAS_MAX + 1),
                "replicas",
                "limit",
            ),
            (
                refused(|s| {
                    s.mode = ServiceMode::Global as i32;
                    s.replicas = 2;
                }),
                "replicas",
                "global",
            ),
            (refused(|s| s.task = None), "task", "required"),
            (
                refused(|s| task(s).command.clear()),
                "task.command",
                "empty",
            ),
            (
                refused(|s| task(s).env.push("NOVALUE".into())),
                "task.env[3]",
                "KEY=VALUE",
            ),
            (
                refused(|s| task(s).env[0] = "=1".into()),
                "task.env[0]",
                "empty variable",
            ),
            (
                refused(|s| task(s).args[1] = "a\0b".into()),
                "task.args[1]",
                "NUL",
            ),
            (
                refused(|s| task(s).working_dir = "rel".into()),
                "task.working_dir",
                "absolute",
            ),
            (
                refused(|s| task(s).restart.as_mut().unwrap().condition = 42),
                "task.restart.condition",
                "unknown value 42",
            ),
            (
                refused(|s| task(s).restart.as_mut().unwrap().delay_ms = Some(-1)),
                "task.restart.delay_ms",
                "negative",
            ),
            (
                refused(|s| task(s).restart.as_mut().unwrap().window_ms = -5),
                "task.restart.window_ms",
                "negative",
            ),
            (
                refused(|s| {
                    let r = task(s).resources.as_mut().unwrap();
                    r.reservations.as_mut().unwrap().nano_cpus = -1;
                }),
                "task.resources.reservations.nano_cpus",
                "negative",
            ),
            (
                refused(|s| {
                    let r = task(s).resources.as_mut().unwrap();
                    r.limits.as_mut().unwrap().memory_bytes = 1 << 20;
                }),
                "task.resources.limits.memory_bytes",
                "too small for a process to start",
            ),
            (
                refused(|s| {
                    let r = task(s).resources.as_mut().unwrap();
                    r.limits.as_mut().unwrap().memory_bytes = 64 << 20;
                    r.reservations.as_mut().unwrap().memory_bytes = 128 << 20;
                }),
                "task.resources.reservations.memory_bytes",
                "raise --limit-memory",
            ),
            (
                refused(|s| {
                    let r = task(s).resources.as_mut().unwrap();
                    r.limits.as_mut().unwrap().nano_cpus = 1;
                    r.reservations.as_mut().unwrap().nano_cpus = 2;
                }),
                "task.resources.reservations.nano_cpus",
                "--reserve-cpu",
            ),
            (
                refused(|s| {
                    let placement = task(s).placement.as_mut().unwrap();
                    placement.preferences = vec![PlacementPreference {
                        spread_descriptor: "node.zone".into(),
                    }];
                }),
                "task.placement.preferences[0].spread_descriptor",
                "node.labels.<key>",
            ),
            (
                refused(|s| {
                    let placement = task(s).placement.as_mut().unwrap();
                    placement.preferences = vec![
                        PlacementPreference {
                            spread_descriptor: "node.labels.zone".into(),
                        };
                        PREFERENCES_MAX + 1
                    ];
                }),
                "task.placement.preferences",
                "more than the limit",
            ),
            (
                refused(|s| {
                    task(s).placement.as_mut().unwrap().constraints[1] = "node.zone==x".into()
                }),
                "task.placement.constraints[1]",
                "unknown key",
            ),
            (
                refused(|s| {
                    task(s).placement.as_mut().unwrap().constraints =
                        vec!["node.id==x".into(); CONSTRAINTS_MAX + 1]
                }),
                "task.placement.constraints",
                "limit",
            ),
            (
                refused(|s| s.update.as_mut().unwrap().failure_action = 7),
                "update.failure_action",
                "pause, continue or rollback",
            ),
            (
                refused(|s| s.update.as_mut().unwrap().order = 7),
                "update.order",
                "stop-first or start-first",
            ),
            (
                refused(|s| s.update.as_mut().unwrap().delay_ms = -1),
                "update.delay_ms",
                "negative",
            ),
            (
                refused(|s| s.networks.push(String::new())),
                "networks[0]",
                "empty",
            ),
            (
                refused(|s| s.networks = vec!["n1".into(), "n1".into()]),
                "networks[1]",
                "twice",
            ),
            (
                refused(|s| task(s).ports = vec![port("http", 0)]),
                "task.ports[0].port",
                "outside",
            ),
            (
                refused(|s| task(s).ports = vec![port("a.b", 80)]),
                "task.ports[0].name",
                "contains",
            ),
            (
                refused(|s| task(s).ports = vec![port("web", 80), port("web", 81)]),
                "task.ports[1].name",
                "twice",
            ),
            (
                refused(|s| {
                    let mut udp = port("dns", 53);
                    udp.protocol = "udp".into();
                    task(s).ports = vec![udp];
                }),
                "task.ports[0].protocol",
                "tcp",
            ),
            (
                refused(|s| task(s).ports = vec![port("averyveryverylongname", 80)]),
                "task.ports[0].name",
                "more than 15",
            ),
            (
                refused(|s| {
                    s.labels.insert(String::new(), "v".into());
                }),
                "labels",
                "empty",
            ),
        ];
        for (error, field, reason) in cases {
            assert_eq!(error.field, field, "{error}");
            assert!(
                error.reason.contains(reason),
                "{error} should say {reason:?}"
            );
            assert_eq!(error.code(), Code::InvalidArgument);
            assert!(error.to_string().contains(field));
        }
    }

    #[test]
    fn sizes_are_limited_and_the_error_says_the_limit() {
        let big_env = format!("BIG={}", "x".repeat(1_048_576));
        let error = refused(|s| task(s).env.push(big_env.clone()));
        assert_eq!(error.field, "task.env");
        assert!(
            error.reason.contains("the environment is 1,048,599 bytes"),
            "{error}"
        );
        assert!(
            error.reason.contains("64 KiB (65,536 bytes)") && error.reason.contains("BIG"),
            "{error}"
        );
        let error = refused(|s| task(s).env = vec!["A=1".into(); ENV_VARS_MAX + 1]);
        assert_eq!(error.field, "task.env");
        assert!(error.reason.contains("4,097 variables"), "{error}");

        let error = refused(|s| task(s).args[0] = "a".repeat(ARG_BYTES_MAX + 1));
        assert_eq!(error.field, "task.args[0]");
        assert!(error.reason.contains("65,537 bytes"), "{error}");
        let error = refused(|s| task(s).command = "/".repeat(ARG_BYTES_MAX + 1));
        assert_eq!(error.field, "task.command");
        let error = refused(|s| task(s).args = vec!["a".repeat(ARG_BYTES_MAX); 4]);
        assert_eq!(error.field, "task.args");
        assert!(error.reason.contains("256 KiB"), "{error}");
        let error = refused(|s| task(s).args = vec![String::new(); ARGS_MAX + 1]);
        assert!(error.reason.contains("4,097 arguments"), "{error}");

        let error = refused(|s| {
            s.labels
                .insert("k".into(), "v".repeat(LABEL_VALUE_BYTES_MAX + 1));
        });
        assert_eq!(error.field, "labels.k");
        assert!(error.reason.contains("4 KiB"), "{error}");
        let error = refused(|s| {
            for i in 0..=LABELS_MAX {
                s.labels.insert(format!("k{i}"), String::new());
            }
        });
        assert!(error.reason.contains("129 labels"), "{error}");
        let error = refused(|s| {
            for i in 0..20 {
                s.labels.insert(format!("k{i}"), "v".repeat(4000));
            }
        });
        assert!(error.reason.contains("80,050 bytes"), "{error}");
        let error = refused(|s| task(s).working_dir = format!("/{}", "d".repeat(5000)));
        assert_eq!(error.field, "task.working_dir");
        let error = refused(|s| {
            task(s).placement.as_mut().unwrap().constraints[0] =
                format!("node.labels.a=={}", "v".repeat(CONSTRAINT_BYTES_MAX));
        });
        assert_eq!(error.field, "task.placement.constraints[0]");

        // At the limits: accepted.
        let mut spec = valid();
        let t = task(&mut spec);
        t.env = vec![format!("K={}", "v".repeat(ENV_BYTES_MAX - 3))];
        t.args = vec!["a".repeat(ARG_BYTES_MAX)];
        validate_service_spec(&spec).unwrap();
        let mut node = NodeSpec::default();
        node.labels
            .insert("big".into(), "v".repeat(LABEL_VALUE_BYTES_MAX + 1));
        assert_eq!(validate_node_spec(&node).unwrap_err().field, "labels.big");
    }

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_048_600), "1,048,600");
        assert_eq!(bytes_limit(65_536), "64 KiB (65,536 bytes)");
        assert_eq!(bytes_limit(1000), "1,000 bytes");
    }

    #[test]
    fn constraints_parse_with_either_operator_and_reject_bad_syntax() {
        let parsed: Constraint = "node.labels.Zone == EU".parse().unwrap();
        assert_eq!(parsed.key, ConstraintKey::NodeLabel("Zone".into()));
        assert_eq!(parsed.op, ConstraintOp::Eq);
        assert_eq!(parsed.value, "EU");
        assert_eq!(parsed.to_string(), "node.labels.Zone==EU");
        let parsed: Constraint = "NODE.Hostname!=db1".parse().unwrap();
        assert_eq!(
            (parsed.key, parsed.op),
            (ConstraintKey::NodeHostname, ConstraintOp::Ne)
        );

        for (text, reason) in [
            ("node.id", "expected"),
            ("node.id = x", "expected"),
            ("node.id==", "empty"),
            ("==x", "key is empty"),
            ("engine.labels.a==b", "unknown key"),
            ("node.labels.==b", "label name"),
            ("node.id==a==b", "only one operator"),
            ("node.id!==b", "only one operator"),
            ("node.role==boss", "manager"),
        ] {
            let error = text.parse::<Constraint>().unwrap_err();
            assert!(error.reason.contains(reason), "{text}: {error}");
        }
    }

    #[test]
    fn constraints_match_nodes() {
        let mut node = Node {
            id: "abc123".into(),
            role: NodeRole::Manager as i32,
            spec: Some(NodeSpec {
                hostname: "db1".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        node.spec
            .as_mut()
            .unwrap()
            .labels
            .insert("zone".into(), "eu".into());
        let matches = |text: &str| text.parse::<Constraint>().unwrap().matches(&node);
        assert!(matches("node.id==abc123"));
        assert!(!matches("node.id!=abc123"));
        assert!(
            matches("node.hostname==DB1"),
            "values compare case-insensitively"
        );
        assert!(matches("node.role==manager"));
        assert!(!matches("node.role==worker"));
        assert!(matches("node.labels.zone==eu"));
        assert!(!matches("node.labels.zone!=eu"));
        assert!(
            !matches("node.labels.rack==r1"),
            "a missing label never equals"
        );
        assert!(
            matches("node.labels.rack!=r1"),
            "a missing label always differs"
        );
        assert!(
            !matches("node.labels.ZONE==eu"),
            "label names are case-sensitive"
        );

        let all = parse_constraints(
            "c",
            &["node.role==manager".into(), "node.labels.zone==eu".into()],
        )
        .unwrap();
        assert!(matches_all(&all, &node));
        node.role = NodeRole::Worker as i32;
        assert!(!matches_all(&all, &node));
        assert!(matches_all(&[], &node));
    }

    #[test]
    fn node_and_cluster_specs_are_checked() {
        validate_node_spec(&NodeSpec::default()).unwrap();
        let error = validate_node_spec(&NodeSpec {
            availability: 5,
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(error.field, "availability");
        let error = validate_node_spec(&NodeSpec {
            desired_role: 3,
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(error.field, "desired_role");

        validate_cluster_spec(&default_cluster_spec("default")).unwrap();
        let with = |change: fn(&mut ClusterSpec)| {
            let mut spec = default_cluster_spec("default");
            change(&mut spec);
            validate_cluster_spec(&spec).unwrap_err().field
        };
        assert_eq!(with(|s| s.heartbeat_period_ms = 0), "heartbeat_period_ms");
        assert_eq!(with(|s| s.heartbeat_period_ms = -5), "heartbeat_period_ms");
        assert_eq!(
            with(|s| s.snapshot_interval_entries = 0),
            "snapshot_interval_entries"
        );
        assert_eq!(
            with(|s| s.task_history_retention = -1),
            "task_history_retention"
        );
        assert_eq!(
            with(|s| s.task_history_retention = TASK_HISTORY_RETENTION_MAX + 1),
            "task_history_retention"
        );
        assert_eq!(with(|s| s.heartbeat_period_ms = 999), "heartbeat_period_ms");
        assert_eq!(
            with(|s| s.heartbeat_period_ms = HEARTBEAT_PERIOD_MS_MAX + 1),
            "heartbeat_period_ms"
        );
        assert_eq!(
            with(|s| s.snapshot_interval_entries = SNAPSHOT_INTERVAL_ENTRIES_MAX + 1),
            "snapshot_interval_entries"
        );
        let mut edges = default_cluster_spec("default");
        edges.heartbeat_period_ms = HEARTBEAT_PERIOD_MS_MIN;
        edges.snapshot_interval_entries = 1;
        edges.task_history_retention = 0;
        validate_cluster_spec(&edges).unwrap();
        edges.heartbeat_period_ms = HEARTBEAT_PERIOD_MS_MAX;
        edges.snapshot_interval_entries = SNAPSHOT_INTERVAL_ENTRIES_MAX;
        edges.task_history_retention = TASK_HISTORY_RETENTION_MAX;
        validate_cluster_spec(&edges).unwrap();
        assert_eq!(
            with(|s| s.node_cert_expiry_ms = 1000),
            "node_cert_expiry_ms"
        );
        assert_eq!(with(|s| s.name.clear()), "name");
    }

    #[test]
    fn health_checks_need_a_command_and_durations_in_range() {
        let check = |change: fn(&mut HealthConfig)| {
            let mut health = HealthConfig {
                command: "curl -f localhost:8080".into(),
                interval_ms: 1_000,
                timeout_ms: 500,
                retries: 2,
                start_period_ms: 0,
            };
            change(&mut health);
            let mut spec = valid();
            task(&mut spec).health = Some(health);
            validate_service_spec(&spec)
        };
        check(|_| {}).expect("valid");
        check(|h| {
            h.interval_ms = 0;
            h.timeout_ms = 0;
            h.retries = 0;
        })
        .expect("zero values are the defaults");
        let error = check(|h| h.command.clear()).unwrap_err();
        assert_eq!(error.field, "task.health.command");
        assert!(error.reason.contains("--health-cmd"), "{error}");
        let error = check(|h| h.interval_ms = 5).unwrap_err();
        assert_eq!(error.field, "task.health.interval_ms");
        assert!(error.reason.contains("0 means the default"), "{error}");
        assert_eq!(
            check(|h| h.timeout_ms = -1).unwrap_err().field,
            "task.health.timeout_ms"
        );
        assert_eq!(
            check(|h| h.start_period_ms = HEALTH_DURATION_MS_MAX + 1)
                .unwrap_err()
                .field,
            "task.health.start_period_ms"
        );
        assert_eq!(
            check(|h| h.retries = HEALTH_RETRIES_MAX + 1)
                .unwrap_err()
                .field,
            "task.health.retries"
        );
        assert_eq!(
            check(|h| h.command = "x".repeat(HEALTH_COMMAND_BYTES_MAX + 1))
                .unwrap_err()
                .field,
            "task.health.command"
        );
    }
}
