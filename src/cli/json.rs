//! What `--format json` prints: the objects as serde prints the generated types (the
//! derives and their rules come from `build.rs`, the labels from [`crate::proto::json`]),
//! with two-space indentation, after filling in what applies where a stored object leaves
//! a setting unset (a restart delay of 5 s, restart condition `any`, update order
//! `stop-first`, …), so that a script reads the values in force.
//!
//! Must never print anything itself; callers decide where the text goes. Must never show a
//! secret: the types holding one have no serde derive (see `build.rs`).

use serde::Serialize;

use crate::proto::objects::{
    Cluster, Config, Network, Node, RestartCondition, Secret, Service, ServiceSpec, Task, TaskSpec,
    UpdateFailureAction, UpdateOrder,
};

/// `value` as indented JSON (two spaces, `"key": value`).
pub fn pretty(value: &impl Serialize) -> String {
    serde_json::to_string_pretty(value).expect("the printed types have string map keys only")
}

/// `value` as JSON on one line, without spaces: for streams of one document per line.
pub fn line(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("the printed types have string map keys only")
}

/// A service as printed.
pub fn service(service: &Service) -> Service {
    let mut shown = service.clone();
    shown.meta.get_or_insert_default();
    for spec in [shown.spec.as_mut(), shown.previous_spec.as_mut()]
        .into_iter()
        .flatten()
    {
        fill_service_spec(spec);
    }
    shown
}

/// A task as printed.
pub fn task(task: &Task) -> Task {
    let mut shown = task.clone();
    shown.meta.get_or_insert_default();
    shown.status.get_or_insert_default();
    fill_task_spec(shown.spec.get_or_insert_default());
    shown
}

/// A node as printed.
pub fn node(node: &Node) -> Node {
    let mut shown = node.clone();
    shown.meta.get_or_insert_default();
    shown.spec.get_or_insert_default();
    shown.status.get_or_insert_default();
    shown
}

/// The cluster as printed (its join tokens, keys and CA key never are: `flotilla
/// join-token` shows the tokens).
pub fn cluster(cluster: &Cluster) -> Cluster {
    let mut shown = cluster.clone();
    shown.secrets_key = Default::default();
    shown.meta.get_or_insert_default();
    let spec = shown.spec.get_or_insert_default();
    // The value in force where an older cluster object leaves it unset.
    if spec.orphan_after_ms == 0 {
        spec.orphan_after_ms = crate::store::spec::ORPHAN_AFTER_MS_DEFAULT;
    }
    shown
}

/// A secret as printed: never its value (the field has no JSON form, and is cleared here
/// as well).
pub fn secret(secret: &Secret) -> Secret {
    let mut shown = secret.clone();
    shown.meta.get_or_insert_default();
    shown.spec.get_or_insert_default().data = Default::default();
    shown
}

/// A config as printed (its value in hex, as bytes are printed).
pub fn config(config: &Config) -> Config {
    let mut shown = config.clone();
    shown.meta.get_or_insert_default();
    shown.spec.get_or_insert_default();
    shown
}

/// A network as printed.
pub fn network(network: &Network) -> Network {
    let mut shown = network.clone();
    shown.meta.get_or_insert_default();
    shown.spec.get_or_insert_default();
    shown
}

fn fill_service_spec(spec: &mut ServiceSpec) {
    fill_task_spec(spec.task.get_or_insert_default());
    // Absent: the defaults the orchestrator uses; unspecified is treated as PAUSE and
    // STOP_FIRST (objects.proto).
    for config in [&mut spec.update, &mut spec.rollback] {
        let config = config.get_or_insert_with(crate::store::spec::default_update_config);
        if config.failure_action == UpdateFailureAction::Unspecified as i32 {
            config.failure_action = UpdateFailureAction::Pause as i32;
        }
        if config.order == UpdateOrder::Unspecified as i32 {
            config.order = UpdateOrder::StopFirst as i32;
        }
    }
}

fn fill_task_spec(spec: &mut TaskSpec) {
    let restart = spec.restart.get_or_insert_default();
    // Unspecified is treated as ANY, and an unset delay is the default one
    // (the orchestrator's restart rules).
    if restart.condition == RestartCondition::Unspecified as i32 {
        restart.condition = RestartCondition::Any as i32;
    }
    restart
        .delay_ms
        .get_or_insert(crate::orchestrator::DEFAULT_RESTART_DELAY_MS);
    let resources = spec.resources.get_or_insert_default();
    resources.reservations.get_or_insert_default();
    resources.limits.get_or_insert_default();
    spec.placement.get_or_insert_default();
    // A health check's zero values are docker's defaults: shown as such.
    if let Some(health) = spec.health.as_mut()
        && let Some(settings) = crate::health::HealthSettings::from_config(health)
    {
        let ms =
            |duration: std::time::Duration| i64::try_from(duration.as_millis()).unwrap_or(i64::MAX);
        health.interval_ms = ms(settings.interval);
        health.timeout_ms = ms(settings.timeout);
        health.retries = settings.retries;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::objects::{
        ManagerStatus, Meta, NodeRole, Placement, RaftReachability, RestartPolicy, RootCaKey,
        TaskState, TaskStatus,
    };

    #[test]
    fn one_line_form_has_no_whitespace_between_tokens() {
        let value = serde_json::json!({"a": "x y", "b": [1, null, true], "c": {}});
        assert_eq!(line(&value), r#"{"a":"x y","b":[1,null,true],"c":{}}"#);
    }

    #[test]
    fn strings_are_escaped_and_nesting_is_indented() {
        let value = serde_json::json!({"a": "x\"y\\z\n\u{1}", "b": [1, null], "c": {}});
        assert_eq!(
            pretty(&value),
            "{\n  \"a\": \"x\\\"y\\\\z\\n\\u0001\",\n  \"b\": [\n    1,\n    null\n  ],\n  \
             \"c\": {}\n}"
        );
    }

    /// The shape scripts read: meta beside the id, labels for enums, effective defaults,
    /// constraints in the task spec, Raft ids and digests in hex, no secrets.
    #[test]
    fn objects_print_in_the_documented_shape() {
        let task = task(&Task {
            id: "t1".into(),
            meta: Some(Meta {
                version: 7,
                created_at_ms: 1,
                updated_at_ms: 2,
            }),
            desired_state: TaskState::Running as i32,
            status: Some(TaskStatus {
                state: TaskState::Failed as i32,
                exit_code: 3,
                ..Default::default()
            }),
            spec: Some(TaskSpec {
                command: "sleep".into(),
                restart: Some(RestartPolicy::default()),
                placement: Some(Placement {
                    constraints: vec!["node.role==manager".into()],
                    preferences: Vec::new(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let text = pretty(&task);
        for expected in [
            "\n  \"id\": \"t1\",\n  \"version\": 7,\n  \"created_at_ms\": 1,",
            "\"desired_state\": \"running\"",
            "\"state\": \"failed\"",
            "\"exit_code\": 3",
            "\"condition\": \"any\"",
            "\"delay_ms\": 5000",
            "\"constraints\": [\n      \"node.role==manager\"\n    ]",
            "\"reservations\": {\n        \"nano_cpus\": 0,",
        ] {
            assert!(text.contains(expected), "{expected} missing:\n{text}");
        }
        assert!(
            !text.contains("placement") && !text.contains("meta"),
            "{text}"
        );

        let node = node(&Node {
            role: NodeRole::Manager as i32,
            manager_status: Some(ManagerStatus {
                raft_id: 0x5eed,
                leader: true,
                reachability: RaftReachability::Reachable as i32,
                ..Default::default()
            }),
            ..Default::default()
        });
        let text = pretty(&node);
        for expected in [
            "\"role\": \"manager\"",
            "\"raft_id\": \"5eed\"",
            "\"reachability\": \"reachable\"",
            "\"availability\": \"active\"",
            "\"description\": null",
        ] {
            assert!(text.contains(expected), "{expected} missing:\n{text}");
        }

        let cluster = cluster(&Cluster {
            root_ca_digest: vec![0xab, 0x01].into(),
            join_tokens: Some(crate::proto::objects::JoinTokens {
                worker: "SECRET-W".into(),
                manager: "SECRET-M".into(),
            }),
            root_ca: Some(RootCaKey {
                cert_der: vec![1].into(),
                key_der: b"SECRET-KEY".to_vec().into(),
            }),
            ..Default::default()
        });
        let text = pretty(&cluster);
        assert!(text.contains("\"root_ca_digest\": \"ab01\""), "{text}");
        assert!(
            !text.contains("SECRET")
                && !text.contains("join_tokens")
                && !text.contains("root_ca\""),
            "{text}"
        );
    }
}
