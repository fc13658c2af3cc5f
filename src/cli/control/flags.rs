//! Flag values and the service spec flags: durations, sizes, CPU counts, `KEY=VALUE` pairs
//! and enum labels parsed from the command line, and [`SpecFlags`], the flags `service
//! create` and `service update` share, applied to a spec by [`apply_flags`].
//!
//! Must never call a manager or print: it turns text into values, or into an error message
//! naming the flag.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;

use crate::proto::json::{ProtoEnum, choices_text, parse_label};
use crate::proto::objects::{
    HealthConfig, Placement, PlacementPreference, PortSpec, ResourceRequirements, Resources,
    RestartCondition, RestartPolicy, SecretReference, ServiceMode, ServiceSpec, TaskSpec,
    UpdateConfig, UpdateFailureAction, UpdateOrder,
};
use crate::store::spec::default_update_config;

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
    /// Placement preference `spread=node.labels.KEY`: tasks spread evenly over the label's
    /// values (repeatable, nested in order; on update, replaces).
    #[arg(long = "placement-pref", value_name = "spread=node.labels.KEY")]
    pub placement_prefs: Vec<String>,
    /// Tasks updated at once (0: all; default 1).
    #[arg(long)]
    pub update_parallelism: Option<u64>,
    /// Wait between update batches (default 0s).
    #[arg(long)]
    pub update_delay: Option<String>,
    /// On a failed update: `pause` (default), `continue` or `rollback`.
    #[arg(long)]
    pub update_failure_action: Option<String>,
    /// `stop-first` (default) or `start-first`.
    #[arg(long)]
    pub update_order: Option<String>,
    /// How long a new task is watched for failure (default 5s).
    #[arg(long)]
    pub update_monitor: Option<String>,
    /// Share of the tasks that may fail before the failure action (0 to 1; default 0).
    #[arg(long)]
    pub update_max_failure_ratio: Option<String>,
    /// Tasks rolled back at once (0: all; default 1).
    #[arg(long)]
    pub rollback_parallelism: Option<u64>,
    /// Wait between rollback batches (default 0s).
    #[arg(long)]
    pub rollback_delay: Option<String>,
    /// On a failed rollback: `pause` (default) or `continue`.
    #[arg(long)]
    pub rollback_failure_action: Option<String>,
    /// `stop-first` (default) or `start-first`.
    #[arg(long)]
    pub rollback_order: Option<String>,
    /// How long a rolled-back task is watched for failure (default 5s).
    #[arg(long)]
    pub rollback_monitor: Option<String>,
    /// Share of the tasks that may fail during a rollback before its failure action
    /// (0 to 1; default 0).
    #[arg(long)]
    pub rollback_max_failure_ratio: Option<String>,
    /// A network the tasks attach to, by name or id (repeatable; on update, replaces the
    /// list). The tasks' endpoints are published there: `<service>.<network>` resolves.
    #[arg(long = "network")]
    pub networks: Vec<String>,
    /// On update: attach the tasks to no network.
    #[arg(long, conflicts_with = "networks")]
    pub no_networks: bool,
    /// A port the tasks listen on, `NAME:PORT/tcp` (repeatable; on update, replaces the
    /// list): `_NAME._tcp.<service>.<network>` resolves to it (SRV).
    #[arg(long = "port", value_name = "NAME:PORT/tcp")]
    pub ports: Vec<String>,
    /// On update: declare no port.
    #[arg(long, conflicts_with = "ports")]
    pub no_ports: bool,
    /// Health check command, run in the task's environment and working directory with
    /// `/bin/sh -c` (exit 0: healthy). An unhealthy task is stopped, reported failed and
    /// restarted per the restart policy.
    #[arg(long, value_name = "CMD")]
    pub health_cmd: Option<String>,
    /// Time between health checks (default 30s).
    #[arg(long, value_name = "DURATION")]
    pub health_interval: Option<String>,
    /// A check running longer is killed and fails (default 30s).
    #[arg(long, value_name = "DURATION")]
    pub health_timeout: Option<String>,
    /// Failures in a row that make a task unhealthy (default 3).
    #[arg(long, value_name = "N")]
    pub health_retries: Option<u32>,
    /// Failures within this time of a task's start do not count (default 0s).
    #[arg(long, value_name = "DURATION")]
    pub health_start_period: Option<String>,
    /// Run no health check (on update: remove the service's).
    #[arg(long, conflicts_with_all = [
        "health_cmd", "health_interval", "health_timeout", "health_retries",
        "health_start_period",
    ])]
    pub no_healthcheck: bool,
    /// A secret the tasks read, `NAME` or `source=NAME,target=FILE,mode=0400` (repeatable;
    /// on update, replaces the list): the file `$FLOTILLA_SECRETS_DIR/FILE` (FILE defaults
    /// to NAME).
    #[arg(long = "secret", value_name = "NAME[,target=FILE]")]
    pub secrets: Vec<String>,
    /// On update: read no secret.
    #[arg(long, conflicts_with = "secrets")]
    pub no_secrets: bool,
    /// A config the tasks read, as `--secret` (repeatable; on update, replaces the list):
    /// the file `$FLOTILLA_CONFIGS_DIR/FILE`, mode 0444 unless given.
    #[arg(long = "config", value_name = "NAME[,target=FILE]")]
    pub configs: Vec<String>,
    /// On update: read no config.
    #[arg(long, conflicts_with = "configs")]
    pub no_configs: bool,
}

/// Parses `--placement-pref spread=node.labels.KEY` (docker's form; the descriptor itself is
/// checked by the control API).
///
/// # Errors
/// What is wrong, naming `--placement-pref`.
pub fn parse_placement_pref(text: &str) -> Result<PlacementPreference, String> {
    match text.split_once('=') {
        Some((strategy, descriptor)) if strategy.trim() == "spread" => Ok(PlacementPreference {
            spread_descriptor: descriptor.trim().to_string(),
        }),
        _ => Err(format!(
            "--placement-pref {text:?}: expected spread=node.labels.KEY (spread is the only \
             strategy), e.g. spread=node.labels.zone"
        )),
    }
}

/// Parses `--secret` / `--config` (`flag`): `NAME`, or comma-separated `source=NAME`
/// (or `src=`), `target=FILE`, `mode=0400` (octal), in Docker's syntax; a bare first item
/// is the source.
///
/// # Errors
/// What is wrong, naming the flag.
pub fn parse_reference(flag: &str, text: &str) -> Result<SecretReference, String> {
    let bad = |why: String| {
        format!("--{flag} {text:?}: {why}; expected NAME or source=NAME,target=FILE,mode=0400")
    };
    let mut reference = SecretReference::default();
    for (index, item) in text.split(',').enumerate() {
        match item.split_once('=') {
            None if index == 0 => reference.name = item.to_string(),
            None => return Err(bad(format!("{item:?} is not KEY=VALUE"))),
            Some(("source" | "src", name)) => reference.name = name.to_string(),
            Some(("target", target)) => reference.target = target.to_string(),
            Some(("mode", mode)) => {
                reference.mode = u32::from_str_radix(mode, 8)
                    .ok()
                    .filter(|m| *m <= 0o777)
                    .ok_or_else(|| bad(format!("mode {mode:?} is not an octal file mode")))?;
            }
            Some((key, _)) => {
                return Err(bad(format!(
                    "unknown key {key:?} (source, target and mode are known)"
                )));
            }
        }
    }
    if reference.name.is_empty() {
        return Err(bad("no name".to_string()));
    }
    Ok(reference)
}

/// Applies `--secret`/`--no-secrets` and `--config`/`--no-configs` to `task`.
fn apply_references(task: &mut TaskSpec, flags: &SpecFlags) -> Result<(), String> {
    if !flags.secrets.is_empty() || flags.no_secrets {
        task.secrets = flags
            .secrets
            .iter()
            .map(|s| parse_reference("secret", s))
            .collect::<Result<_, _>>()?;
    }
    if !flags.configs.is_empty() || flags.no_configs {
        task.configs = flags
            .configs
            .iter()
            .map(|s| parse_reference("config", s))
            .collect::<Result<_, _>>()?;
    }
    Ok(())
}

/// Parses `NAME:PORT/tcp` (`/tcp` may be left out).
///
/// # Errors
/// What is wrong, naming `--port`.
pub fn parse_port(text: &str) -> Result<PortSpec, String> {
    let bad =
        |why: &str| format!("--port {text:?}: {why}; expected NAME:PORT/tcp, e.g. http:8080/tcp");
    let (name, rest) = text.split_once(':').ok_or_else(|| bad("no ':'"))?;
    let (number, protocol) = rest.split_once('/').unwrap_or((rest, "tcp"));
    if name.is_empty() {
        return Err(bad("the name is empty"));
    }
    let port = number
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| bad("the port is not a number from 1 to 65535"))?;
    if protocol != "tcp" {
        return Err(bad("only tcp is supported"));
    }
    Ok(PortSpec {
        name: name.to_string(),
        port: u32::from(port),
        protocol: protocol.to_string(),
    })
}

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

pub(super) fn parse_pairs(
    flag: &str,
    pairs: &[String],
) -> Result<BTreeMap<String, String>, String> {
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
pub(super) fn parse_choice<E: ProtoEnum>(flag: &str, text: &str) -> Result<E, String> {
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

/// Applies the `--health-*` flags given to `task` (`--no-healthcheck` removes its check).
fn apply_health_flags(task: &mut TaskSpec, flags: &SpecFlags) -> Result<(), String> {
    if flags.no_healthcheck {
        task.health = None;
        return Ok(());
    }
    let given = flags.health_cmd.is_some()
        || flags.health_interval.is_some()
        || flags.health_timeout.is_some()
        || flags.health_retries.is_some()
        || flags.health_start_period.is_some();
    if !given {
        return Ok(());
    }
    let health = task.health.get_or_insert_with(HealthConfig::default);
    if let Some(command) = &flags.health_cmd {
        if command.trim().is_empty() {
            return Err(
                "--health-cmd is empty: give the command to run (exit 0 means \
                        healthy), or --no-healthcheck to run none"
                    .to_string(),
            );
        }
        health.command = command.clone();
    }
    if let Some(interval) = &flags.health_interval {
        health.interval_ms = parse_duration_ms("health-interval", interval)?;
    }
    if let Some(timeout) = &flags.health_timeout {
        health.timeout_ms = parse_duration_ms("health-timeout", timeout)?;
    }
    if let Some(retries) = flags.health_retries {
        health.retries = retries;
    }
    if let Some(period) = &flags.health_start_period {
        health.start_period_ms = parse_duration_ms("health-start-period", period)?;
    }
    if health.command.is_empty() {
        return Err("the service has no health check to change: add --health-cmd CMD".to_string());
    }
    Ok(())
}

/// Applies the flags given to `spec` (a new one or the current one being updated).
pub(super) fn apply_flags(spec: &mut ServiceSpec, flags: &SpecFlags) -> Result<(), String> {
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
    if !flags.ports.is_empty() || flags.no_ports {
        task.ports = flags
            .ports
            .iter()
            .map(|p| parse_port(p))
            .collect::<Result<_, _>>()?;
    }
    if !flags.networks.is_empty() || flags.no_networks {
        spec.networks = flags.networks.clone();
    }
    let task = spec.task.get_or_insert_with(TaskSpec::default);
    apply_health_flags(task, flags)?;
    apply_references(task, flags)?;
    if !flags.constraints.is_empty() {
        let placement = task.placement.get_or_insert_with(Placement::default);
        placement.constraints.clone_from(&flags.constraints);
    }
    if !flags.placement_prefs.is_empty() {
        let preferences = flags
            .placement_prefs
            .iter()
            .map(|text| parse_placement_pref(text))
            .collect::<Result<_, _>>()?;
        task.placement
            .get_or_insert_with(Placement::default)
            .preferences = preferences;
    }
    let update = spec.update.get_or_insert_with(default_update_config);
    apply_update_flags(update, &update_flags(flags))?;
    let rollback = spec.rollback.get_or_insert_with(default_update_config);
    apply_update_flags(rollback, &rollback_flags(flags))?;
    Ok(())
}

/// The `--update-*` or `--rollback-*` flags, by the prefix they share.
struct UpdateFlags<'a> {
    prefix: &'static str,
    parallelism: Option<u64>,
    delay: Option<&'a str>,
    failure_action: Option<&'a str>,
    order: Option<&'a str>,
    monitor: Option<&'a str>,
    max_failure_ratio: Option<&'a str>,
}

fn update_flags(flags: &SpecFlags) -> UpdateFlags<'_> {
    UpdateFlags {
        prefix: "update",
        parallelism: flags.update_parallelism,
        delay: flags.update_delay.as_deref(),
        failure_action: flags.update_failure_action.as_deref(),
        order: flags.update_order.as_deref(),
        monitor: flags.update_monitor.as_deref(),
        max_failure_ratio: flags.update_max_failure_ratio.as_deref(),
    }
}

fn rollback_flags(flags: &SpecFlags) -> UpdateFlags<'_> {
    UpdateFlags {
        prefix: "rollback",
        parallelism: flags.rollback_parallelism,
        delay: flags.rollback_delay.as_deref(),
        failure_action: flags.rollback_failure_action.as_deref(),
        order: flags.rollback_order.as_deref(),
        monitor: flags.rollback_monitor.as_deref(),
        max_failure_ratio: flags.rollback_max_failure_ratio.as_deref(),
    }
}

/// Applies the `--update-*` or `--rollback-*` flags given to `config`.
fn apply_update_flags(config: &mut UpdateConfig, flags: &UpdateFlags<'_>) -> Result<(), String> {
    let prefix = flags.prefix;
    if let Some(parallelism) = flags.parallelism {
        config.parallelism = parallelism;
    }
    if let Some(delay) = flags.delay {
        config.delay_ms = parse_duration_ms(&format!("{prefix}-delay"), delay)?;
    }
    if let Some(action) = flags.failure_action {
        let flag = format!("{prefix}-failure-action");
        let parsed = parse_choice::<UpdateFailureAction>(&flag, action)?;
        if prefix == "rollback" && parsed == UpdateFailureAction::Rollback {
            return Err(format!(
                "--{flag} {action:?}: a rollback cannot be rolled back; use pause or continue"
            ));
        }
        config.failure_action = parsed as i32;
    }
    if let Some(order) = flags.order {
        config.order = parse_choice::<UpdateOrder>(&format!("{prefix}-order"), order)? as i32;
    }
    if let Some(monitor) = flags.monitor {
        config.monitor_ms = parse_duration_ms(&format!("{prefix}-monitor"), monitor)?;
    }
    if let Some(ratio) = flags.max_failure_ratio {
        config.max_failure_ratio = parse_ratio(&format!("{prefix}-max-failure-ratio"), ratio)?;
    }
    Ok(())
}

/// Parses a share from 0 to 1 (`0.2`).
///
/// # Errors
/// A message naming the flag.
pub fn parse_ratio(flag: &str, text: &str) -> Result<f32, String> {
    text.trim()
        .parse::<f32>()
        .ok()
        .filter(|ratio| (0.0..=1.0).contains(ratio))
        .ok_or_else(|| {
            format!("--{flag} {text:?}: expected a share from 0 to 1, e.g. 0.2 (a fifth may fail)")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_references_parse_in_dockers_syntax() {
        let short = parse_reference("secret", "db").unwrap();
        assert_eq!(
            (short.name.as_str(), short.target.as_str(), short.mode),
            ("db", "", 0)
        );
        let long = parse_reference("secret", "source=db,target=pw.txt,mode=0440").unwrap();
        assert_eq!(
            (long.name.as_str(), long.target.as_str(), long.mode),
            ("db", "pw.txt", 0o440)
        );
        let mixed = parse_reference("config", "app,target=app.conf").unwrap();
        assert_eq!(
            (mixed.name.as_str(), mixed.target.as_str()),
            ("app", "app.conf")
        );
        for bad in ["", "target=x", "db,mode=9", "db,owner=1", "db,x"] {
            let error = parse_reference("secret", bad).expect_err(bad);
            assert!(error.starts_with("--secret "), "{error}");
        }
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
        assert_eq!(
            parse_placement_pref("spread=node.labels.zone").map(|p| p.spread_descriptor),
            Ok("node.labels.zone".to_string())
        );
        assert!(parse_placement_pref("pack=node.labels.zone").is_err());
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

    #[test]
    fn health_flags_set_change_and_remove_the_check() {
        let mut spec = ServiceSpec {
            task: Some(TaskSpec {
                command: "sleep".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let flags = SpecFlags {
            health_cmd: Some("test -f /tmp/ok".into()),
            health_interval: Some("1s".into()),
            health_retries: Some(2),
            ..Default::default()
        };
        apply_flags(&mut spec, &flags).unwrap();
        let health = spec.task.as_ref().unwrap().health.clone().unwrap();
        assert_eq!(health.command, "test -f /tmp/ok");
        assert_eq!(health.interval_ms, 1_000);
        assert_eq!(health.retries, 2);
        assert_eq!(health.timeout_ms, 0, "left to the default");

        let timeout = SpecFlags {
            health_timeout: Some("250ms".into()),
            ..Default::default()
        };
        apply_flags(&mut spec, &timeout).unwrap();
        let health = spec.task.as_ref().unwrap().health.clone().unwrap();
        assert_eq!((health.timeout_ms, health.interval_ms), (250, 1_000));

        let remove = SpecFlags {
            no_healthcheck: true,
            ..Default::default()
        };
        apply_flags(&mut spec, &remove).unwrap();
        assert!(spec.task.as_ref().unwrap().health.is_none());
        let error = apply_flags(&mut spec, &timeout).unwrap_err();
        assert!(error.contains("--health-cmd"), "{error}");
        let empty = SpecFlags {
            health_cmd: Some(" ".into()),
            ..Default::default()
        };
        assert!(
            apply_flags(&mut spec, &empty)
                .unwrap_err()
                .contains("empty")
        );
    }

    #[test]
    fn update_and_rollback_settings_default_as_docker_and_refuse_bad_values() {
        let mut spec = ServiceSpec::default();
        apply_flags(&mut spec, &SpecFlags::default()).unwrap();
        for config in [spec.update.as_ref(), spec.rollback.as_ref()] {
            let config = config.unwrap();
            assert_eq!((config.parallelism, config.monitor_ms), (1, 5_000));
            assert_eq!(config.failure_action, UpdateFailureAction::Pause as i32);
            assert_eq!(config.order, UpdateOrder::StopFirst as i32);
        }
        let flags = SpecFlags {
            update_parallelism: Some(2),
            update_delay: Some("1s".into()),
            update_failure_action: Some("rollback".into()),
            update_order: Some("start-first".into()),
            update_monitor: Some("3s".into()),
            update_max_failure_ratio: Some("0.25".into()),
            rollback_failure_action: Some("continue".into()),
            rollback_monitor: Some("1s".into()),
            ..Default::default()
        };
        apply_flags(&mut spec, &flags).unwrap();
        let update = spec.update.unwrap();
        assert_eq!(
            (update.parallelism, update.delay_ms, update.monitor_ms),
            (2, 1_000, 3_000)
        );
        assert_eq!(update.failure_action, UpdateFailureAction::Rollback as i32);
        assert_eq!(update.order, UpdateOrder::StartFirst as i32);
        assert!((update.max_failure_ratio - 0.25).abs() < f32::EPSILON);
        let rollback = spec.rollback.unwrap();
        assert_eq!(
            rollback.failure_action,
            UpdateFailureAction::Continue as i32
        );
        assert_eq!((rollback.parallelism, rollback.monitor_ms), (1, 1_000));
        let refused = |flags: SpecFlags| apply_flags(&mut spec.clone(), &flags).unwrap_err();
        let error = refused(SpecFlags {
            rollback_failure_action: Some("rollback".into()),
            ..Default::default()
        });
        assert!(error.contains("--rollback-failure-action"), "{error}");
        let error = refused(SpecFlags {
            update_max_failure_ratio: Some("1.5".into()),
            ..Default::default()
        });
        assert!(error.starts_with("--update-max-failure-ratio"), "{error}");
    }
}
