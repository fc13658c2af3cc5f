//! Hand-written JSON for `--format json`: a small value tree, printed with two-space
//! indentation, and the conversions of the objects the CLI shows.
//!
//! Must never print anything itself; callers decide where the text goes.

use std::fmt::{self, Write};

use crate::proto::objects::{
    Cluster, ManagerStatus, Meta, Node, NodeAvailability, NodeRole, NodeState, RaftReachability,
    ResourceRequirements, Resources, RestartCondition, Service, ServiceMode, Task, TaskSpec,
    TaskState, UpdateConfig, UpdateFailureAction, UpdateOrder,
};

/// A JSON value.
#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// An integer (every number the CLI prints is one).
    Int(i128),
    /// A string.
    Str(String),
    /// An array.
    Arr(Vec<Json>),
    /// An object, keys in the order given.
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn write(&self, out: &mut String, indent: usize) -> fmt::Result {
        let pad = |n: usize| "  ".repeat(n);
        match self {
            Json::Null => out.write_str("null"),
            Json::Bool(b) => write!(out, "{b}"),
            Json::Int(n) => write!(out, "{n}"),
            Json::Str(s) => write_string(out, s),
            Json::Arr(items) if items.is_empty() => out.write_str("[]"),
            Json::Arr(items) => {
                out.write_str("[\n")?;
                for (i, item) in items.iter().enumerate() {
                    out.write_str(&pad(indent + 1))?;
                    item.write(out, indent + 1)?;
                    out.write_str(if i + 1 < items.len() { ",\n" } else { "\n" })?;
                }
                write!(out, "{}]", pad(indent))
            }
            Json::Obj(fields) if fields.is_empty() => out.write_str("{}"),
            Json::Obj(fields) => {
                out.write_str("{\n")?;
                for (i, (key, value)) in fields.iter().enumerate() {
                    out.write_str(&pad(indent + 1))?;
                    write_string(out, key)?;
                    out.write_str(": ")?;
                    value.write(out, indent + 1)?;
                    out.write_str(if i + 1 < fields.len() { ",\n" } else { "\n" })?;
                }
                write!(out, "{}}}", pad(indent))
            }
        }
    }
}

impl Json {
    /// The value on one line, without spaces: for streams of one document per line.
    pub fn to_line(&self) -> String {
        let mut out = String::new();
        self.write_line(&mut out)
            .expect("writing to a String cannot fail");
        out
    }

    fn write_line(&self, out: &mut String) -> fmt::Result {
        match self {
            Json::Arr(items) => {
                out.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.write_str(",")?;
                    }
                    item.write_line(out)?;
                }
                out.write_str("]")
            }
            Json::Obj(fields) => {
                out.write_str("{")?;
                for (i, (key, value)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.write_str(",")?;
                    }
                    write_string(out, key)?;
                    out.write_str(":")?;
                    value.write_line(out)?;
                }
                out.write_str("}")
            }
            scalar => scalar.write(out, 0),
        }
    }
}

impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::new();
        self.write(&mut out, 0)?;
        f.write_str(&out)
    }
}

fn write_string(out: &mut String, s: &str) -> fmt::Result {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => write!(out, "\\u{:04x}", u32::from(c))?,
            c => out.push(c),
        }
    }
    out.push('"');
    Ok(())
}

fn obj(fields: Vec<(&str, Json)>) -> Json {
    Json::Obj(
        fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

fn s(value: &str) -> Json {
    Json::Str(value.to_string())
}

fn n(value: impl Into<i128>) -> Json {
    Json::Int(value.into())
}

fn strs(values: &[String]) -> Json {
    Json::Arr(values.iter().map(|v| s(v)).collect())
}

fn map(values: &std::collections::BTreeMap<String, String>) -> Json {
    Json::Obj(values.iter().map(|(k, v)| (k.clone(), s(v))).collect())
}

fn meta(meta: Option<&Meta>) -> Vec<(&'static str, Json)> {
    let meta = meta.cloned().unwrap_or_default();
    vec![
        ("version", n(meta.version)),
        ("created_at_ms", n(meta.created_at_ms)),
        ("updated_at_ms", n(meta.updated_at_ms)),
    ]
}

/// `replicated`, `global`, ….
pub fn mode_name(mode: i32) -> &'static str {
    match ServiceMode::try_from(mode) {
        Ok(ServiceMode::Global) => "global",
        Ok(ServiceMode::Replicated) => "replicated",
        _ => "unspecified",
    }
}

/// `reachable`, `unreachable` or `unknown`: whether the leader hears from a manager.
pub fn reachability_name(value: i32) -> &'static str {
    match RaftReachability::try_from(value) {
        Ok(RaftReachability::Reachable) => "reachable",
        Ok(RaftReachability::Unreachable) => "unreachable",
        _ => "unknown",
    }
}

/// `node ls`'s MANAGER STATUS (docker's): `leader`, else the manager's reachability as the
/// leader sees it (as `manager ls` shows it).
pub fn manager_status_name(status: &ManagerStatus) -> &'static str {
    if status.leader {
        "leader"
    } else {
        reachability_name(status.reachability)
    }
}

/// `worker` or `manager`.
pub fn role_name(role: i32) -> &'static str {
    match NodeRole::try_from(role) {
        Ok(NodeRole::Manager) => "manager",
        _ => "worker",
    }
}

/// `active`, `pause` or `drain`.
pub fn availability_name(value: i32) -> &'static str {
    match NodeAvailability::try_from(value) {
        Ok(NodeAvailability::Pause) => "pause",
        Ok(NodeAvailability::Drain) => "drain",
        _ => "active",
    }
}

/// `ready`, `down`, ….
pub fn node_state_name(value: i32) -> &'static str {
    match NodeState::try_from(value) {
        Ok(NodeState::Ready) => "ready",
        Ok(NodeState::Down) => "down",
        Ok(NodeState::Disconnected) => "disconnected",
        _ => "unknown",
    }
}

/// `running`, `pending`, ….
pub fn task_state_name(value: i32) -> String {
    TaskState::try_from(value).map_or_else(
        |_| format!("state-{value}"),
        |state| {
            state
                .as_str_name()
                .trim_start_matches("TASK_STATE_")
                .to_lowercase()
        },
    )
}

fn resources(value: Option<&Resources>) -> Json {
    let value = value.cloned().unwrap_or_default();
    obj(vec![
        ("nano_cpus", n(value.nano_cpus)),
        ("memory_bytes", n(value.memory_bytes)),
    ])
}

fn task_spec(spec: Option<&TaskSpec>) -> Json {
    let spec = spec.cloned().unwrap_or_default();
    let restart = spec.restart.unwrap_or_default();
    let requirements: ResourceRequirements = spec.resources.unwrap_or_default();
    obj(vec![
        ("command", s(&spec.command)),
        ("args", strs(&spec.args)),
        ("env", strs(&spec.env)),
        ("working_dir", s(&spec.working_dir)),
        (
            "restart",
            obj(vec![
                (
                    "condition",
                    s(match RestartCondition::try_from(restart.condition) {
                        Ok(RestartCondition::None) => "none",
                        Ok(RestartCondition::OnFailure) => "on-failure",
                        _ => "any",
                    }),
                ),
                // Unset means the default: show the delay that applies.
                (
                    "delay_ms",
                    n(restart
                        .delay_ms
                        .unwrap_or(crate::orchestrator::DEFAULT_RESTART_DELAY_MS)),
                ),
                ("max_attempts", n(restart.max_attempts)),
                ("window_ms", n(restart.window_ms)),
            ]),
        ),
        (
            "resources",
            obj(vec![
                (
                    "reservations",
                    resources(requirements.reservations.as_ref()),
                ),
                ("limits", resources(requirements.limits.as_ref())),
            ]),
        ),
        (
            "constraints",
            strs(&spec.placement.map(|p| p.constraints).unwrap_or_default()),
        ),
    ])
}

fn update_config(config: Option<&UpdateConfig>) -> Json {
    let config = config.cloned().unwrap_or_default();
    obj(vec![
        ("parallelism", n(config.parallelism)),
        ("delay_ms", n(config.delay_ms)),
        (
            "failure_action",
            s(match UpdateFailureAction::try_from(config.failure_action) {
                Ok(UpdateFailureAction::Continue) => "continue",
                Ok(UpdateFailureAction::Rollback) => "rollback",
                _ => "pause",
            }),
        ),
        (
            "order",
            s(match UpdateOrder::try_from(config.order) {
                Ok(UpdateOrder::StartFirst) => "start-first",
                _ => "stop-first",
            }),
        ),
        ("monitor_ms", n(config.monitor_ms)),
    ])
}

fn service_spec(spec: Option<&crate::proto::objects::ServiceSpec>) -> Json {
    let Some(spec) = spec else {
        return Json::Null;
    };
    obj(vec![
        ("name", s(&spec.name)),
        ("labels", map(&spec.labels)),
        ("mode", s(mode_name(spec.mode))),
        ("replicas", n(spec.replicas)),
        ("task", task_spec(spec.task.as_ref())),
        ("update", update_config(spec.update.as_ref())),
        ("networks", strs(&spec.networks)),
    ])
}

/// A service as JSON.
pub fn service(service: &Service) -> Json {
    let mut fields = vec![("id", s(&service.id))];
    fields.extend(meta(service.meta.as_ref()));
    fields.push(("spec", service_spec(service.spec.as_ref())));
    fields.push((
        "previous_spec",
        service_spec(service.previous_spec.as_ref()),
    ));
    obj(fields)
}

/// A node as JSON.
pub fn node(node: &Node) -> Json {
    let spec = node.spec.clone().unwrap_or_default();
    let status = node.status.clone().unwrap_or_default();
    let mut fields = vec![("id", s(&node.id))];
    fields.extend(meta(node.meta.as_ref()));
    fields.push((
        "spec",
        obj(vec![
            ("hostname", s(&spec.hostname)),
            ("labels", map(&spec.labels)),
            ("availability", s(availability_name(spec.availability))),
            ("desired_role", s(role_name(spec.desired_role))),
        ]),
    ));
    fields.push(("role", s(role_name(node.role))));
    fields.push((
        "status",
        obj(vec![
            ("state", s(node_state_name(status.state))),
            ("message", s(&status.message)),
            ("addr", s(&status.addr)),
        ]),
    ));
    fields.push((
        "manager_status",
        node.manager_status.as_ref().map_or(Json::Null, |m| {
            obj(vec![
                ("raft_id", s(&format!("{:x}", m.raft_id))),
                ("addr", s(&m.addr)),
                ("leader", Json::Bool(m.leader)),
                ("reachability", s(reachability_name(m.reachability))),
            ])
        }),
    ));
    // What the node's agent reported at its last session: how many tasks it runs at once
    // (the scheduler assigns it no more).
    fields.push((
        "description",
        node.description.as_ref().map_or(Json::Null, |d| {
            obj(vec![
                ("tasks_max", n(d.tasks_max)),
                ("agent_version", s(&d.agent_version)),
            ])
        }),
    ));
    obj(fields)
}

/// A task as JSON.
pub fn task(task: &Task) -> Json {
    let status = task.status.clone().unwrap_or_default();
    let mut fields = vec![("id", s(&task.id))];
    fields.extend(meta(task.meta.as_ref()));
    fields.extend([
        ("service_id", s(&task.service_id)),
        ("slot", n(task.slot)),
        ("node_id", s(&task.node_id)),
        ("desired_state", s(&task_state_name(task.desired_state))),
        (
            "status",
            obj(vec![
                ("state", s(&task_state_name(status.state))),
                ("message", s(&status.message)),
                ("timestamp_ms", n(status.timestamp_ms)),
                ("err", s(&status.err)),
                ("exit_code", n(status.exit_code)),
            ]),
        ),
        ("spec", task_spec(task.spec.as_ref())),
        ("service_version", n(task.service_version)),
    ]);
    obj(fields)
}

/// The cluster as JSON (join tokens left out: `flotilla join-token` shows them).
pub fn cluster(cluster: &Cluster) -> Json {
    let spec = cluster.spec.clone().unwrap_or_default();
    let mut fields = vec![("id", s(&cluster.id))];
    fields.extend(meta(cluster.meta.as_ref()));
    fields.push((
        "spec",
        obj(vec![
            ("name", s(&spec.name)),
            ("labels", map(&spec.labels)),
            ("heartbeat_period_ms", n(spec.heartbeat_period_ms)),
            (
                "snapshot_interval_entries",
                n(spec.snapshot_interval_entries),
            ),
            (
                "log_entries_for_slow_followers",
                n(spec.log_entries_for_slow_followers),
            ),
            ("keep_old_snapshots", n(spec.keep_old_snapshots)),
            ("task_history_retention", n(spec.task_history_retention)),
            ("node_cert_expiry_ms", n(spec.node_cert_expiry_ms)),
        ]),
    ));
    let digest: String = cluster
        .root_ca_digest
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    fields.push(("root_ca_digest", s(&digest)));
    let revoked = cluster
        .revoked_certificates
        .iter()
        .map(|r| {
            obj(vec![
                ("id", s(&r.id)),
                ("reason", s(&r.reason)),
                ("revoked_at_ms", n(r.revoked_at_ms)),
                ("expires_at_ms", n(r.expires_at_ms)),
            ])
        })
        .collect();
    fields.push(("revoked_certificates", Json::Arr(revoked)));
    obj(fields)
}

/// A network as JSON.
pub fn network(network: &crate::proto::objects::Network) -> Json {
    let spec = network.spec.clone().unwrap_or_default();
    let mut fields = vec![("id", s(&network.id))];
    fields.extend(meta(network.meta.as_ref()));
    fields.push((
        "spec",
        obj(vec![
            ("name", s(&spec.name)),
            ("labels", map(&spec.labels)),
            ("driver", s(&spec.driver)),
            ("subnet", s(&spec.subnet)),
            ("internal", Json::Bool(spec.internal)),
            ("attachable", Json::Bool(spec.attachable)),
        ]),
    ));
    obj(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_form_has_no_whitespace_between_tokens() {
        let value = obj(vec![
            ("a", s("x y")),
            ("b", Json::Arr(vec![n(1), Json::Null, Json::Bool(true)])),
            ("c", Json::Obj(vec![])),
        ]);
        assert_eq!(value.to_line(), r#"{"a":"x y","b":[1,null,true],"c":{}}"#);
    }

    #[test]
    fn strings_are_escaped_and_nesting_is_indented() {
        let value = obj(vec![
            ("a", s("x\"y\\z\n\u{1}")),
            ("b", Json::Arr(vec![n(1), Json::Null])),
            ("c", Json::Obj(vec![])),
        ]);
        assert_eq!(
            value.to_string(),
            "{\n  \"a\": \"x\\\"y\\\\z\\n\\u0001\",\n  \"b\": [\n    1,\n    null\n  ],\n  \
             \"c\": {}\n}"
        );
    }
}
