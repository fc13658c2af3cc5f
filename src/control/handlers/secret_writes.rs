//! The leader's secret and config writes (create, remove) and the resolution of a service's
//! `--secret` / `--config` references.
//!
//! A secret's value arrives plain in its create and is sealed here ([`crate::secrets`]) with
//! the cluster's secrets key before it enters a transaction; the leader makes that key with
//! the first secret (in the same transaction, so a secret never exists without its key).
//! Must never put a plain secret value into a transaction, a reply or a log line.

use std::sync::Arc;

use super::{Applied, Prepared, as_written, chosen_or_new_id, recorded_object, spec_error};
use crate::control::ControlApi;
use crate::control::reads::{resolve_config, resolve_secret, the_cluster};
use crate::proto::control as pb;
use crate::proto::objects::{
    Cluster, Config, ConfigSpec, Secret, SecretReference, SecretSpec, Service, ServiceSpec,
};
use crate::store::answers::Recorded;
use crate::store::spec::{validate_config_spec, validate_secret_spec};
use crate::store::{Kind, ReadView, create, delete, update_expecting};
use crate::wire::{Code, Status};

/// The reply to a repeated secret create: the secret as it is now, without its value.
pub(super) fn secret_reply(
    api: &ControlApi,
    recorded: &Recorded,
) -> Result<pb::SecretResponse, Status> {
    let stub = |id| Secret {
        id,
        ..Default::default()
    };
    let mut secret = recorded_object(api, recorded, stub);
    crate::control::redact_secret(&mut secret);
    Ok(pb::SecretResponse {
        secret: Some(secret),
    })
}

/// The reply to a repeated config create: the config as it is now.
pub(super) fn config_reply(
    api: &ControlApi,
    recorded: &Recorded,
) -> Result<pb::ConfigResponse, Status> {
    let stub = |id| Config {
        id,
        ..Default::default()
    };
    Ok(pb::ConfigResponse {
        config: Some(recorded_object(api, recorded, stub)),
    })
}

fn name_taken(kind: &str, name: &str, holder: &str) -> Status {
    Status::new(
        Code::AlreadyExists,
        format!(
            "{kind} name {name:?} is taken by {kind} {holder}; choose another name, or remove \
             it first (`flotilla {kind} rm {name}`)"
        ),
    )
}

/// The cluster's secrets key, and the cluster update that records a new one when it has
/// none yet (the first secret).
fn secrets_key(
    api: &ControlApi,
) -> Result<(Vec<u8>, Option<crate::proto::objects::Change>), Status> {
    let cluster: Arc<Cluster> = api.store.view(the_cluster)?;
    if !cluster.secrets_key.is_empty() {
        return Ok((cluster.secrets_key.to_vec(), None));
    }
    let key = crate::secrets::new_key();
    let mut updated = cluster.as_ref().clone();
    updated.secrets_key = key.clone().into();
    let version = cluster.meta.as_ref().map_or(0, |m| m.version);
    log::info!("secrets: the leader made the cluster's secrets key");
    Ok((key, Some(update_expecting(updated, version))))
}

/// Whether the stored `existing` secret is what `spec` (with its plain value) asks for: the
/// same request again.
fn same_secret(api: &ControlApi, existing: &Secret, spec: &SecretSpec) -> bool {
    let Some(stored) = existing.spec.as_ref() else {
        return false;
    };
    let key = api
        .store
        .view(the_cluster)
        .map(|c| c.secrets_key.to_vec())
        .unwrap_or_default();
    stored.name == spec.name
        && stored.labels == spec.labels
        && crate::secrets::open(&key, &existing.id, &stored.data)
            .is_ok_and(|plain| plain == spec.data.as_ref())
}

/// Creates a secret: its value sealed with the cluster's secrets key. Idempotent per
/// request as `create_service`. The reply carries no value.
pub(super) fn create_secret(
    api: &ControlApi,
    request: pb::CreateSecretRequest,
) -> Result<Prepared<pb::SecretResponse>, Status> {
    let spec = request
        .spec
        .ok_or_else(|| Status::invalid_argument("invalid spec: spec: required"))?;
    validate_secret_spec(&spec).map_err(|e| spec_error(&e))?;
    let id = chosen_or_new_id(request.id)?;
    if let Some(existing) = api.store.get::<Secret>(&id) {
        if same_secret(api, &existing, &spec) {
            let mut secret = existing.as_ref().clone();
            crate::control::redact_secret(&mut secret);
            return Ok(Prepared::Answered(pb::SecretResponse {
                secret: Some(secret),
            }));
        }
        return Err(Status::new(
            Code::AlreadyExists,
            format!("secret {id} already exists with another spec; create with a new id"),
        ));
    }
    if let Some(holder) = api
        .store
        .view(|view| view.get_by_name::<Secret>(&spec.name).cloned())
    {
        return Err(name_taken("secret", &spec.name, &holder.id));
    }
    let (key, new_key) = secrets_key(api)?;
    let sealed = crate::secrets::seal(&key, &id, &spec.data)
        .map_err(|e| Status::new(Code::Internal, e.to_string()))?;
    let secret = Secret {
        id,
        spec: Some(SecretSpec {
            data: sealed.into(),
            ..spec
        }),
        ..Default::default()
    };
    let mut shown = secret.clone();
    crate::control::redact_secret(&mut shown);
    let changes = new_key.into_iter().chain([create(secret)]).collect();
    Ok(Prepared::then(changes, move |applied: Applied| {
        pb::SecretResponse {
            secret: Some(as_written(shown, applied, None)),
        }
    }))
}

/// Creates a config. Idempotent per request as `create_service`.
pub(super) fn create_config(
    api: &ControlApi,
    request: pb::CreateConfigRequest,
) -> Result<Prepared<pb::ConfigResponse>, Status> {
    let spec: ConfigSpec = request
        .spec
        .ok_or_else(|| Status::invalid_argument("invalid spec: spec: required"))?;
    validate_config_spec(&spec).map_err(|e| spec_error(&e))?;
    let id = chosen_or_new_id(request.id)?;
    if let Some(existing) = api.store.get::<Config>(&id) {
        if existing.spec.as_ref() == Some(&spec) {
            return Ok(Prepared::Answered(pb::ConfigResponse {
                config: Some(existing.as_ref().clone()),
            }));
        }
        return Err(Status::new(
            Code::AlreadyExists,
            format!("config {id} already exists with another spec; create with a new id"),
        ));
    }
    if let Some(holder) = api
        .store
        .view(|view| view.get_by_name::<Config>(&spec.name).cloned())
    {
        return Err(name_taken("config", &spec.name, &holder.id));
    }
    let config = Config {
        id,
        spec: Some(spec),
        ..Default::default()
    };
    Ok(Prepared::then(
        vec![create(config.clone())],
        move |applied| pb::ConfigResponse {
            config: Some(as_written(config, applied, None)),
        },
    ))
}

/// The names of the services whose task template reads `id` (in `pick`'s list).
fn services_using(
    view: &ReadView<'_>,
    id: &str,
    pick: fn(&crate::proto::objects::TaskSpec) -> &[SecretReference],
) -> Vec<String> {
    view.list::<Service>()
        .filter(|s| {
            s.spec
                .as_ref()
                .and_then(|spec| spec.task.as_ref())
                .is_some_and(|task| pick(task).iter().any(|r| r.id == id))
        })
        .map(|s| {
            s.spec
                .as_ref()
                .map_or_else(|| s.id.clone(), |spec| spec.name.clone())
        })
        .collect()
}

fn in_use(kind: &str, name: &str, users: &[String]) -> Status {
    Status::new(
        Code::FailedPrecondition,
        format!(
            "{kind} {name} is in use by service(s) {}; remove them, or update them without it \
             first (`flotilla service update SERVICE --no-{kind}s`, or `--{kind}` naming only \
             the others)",
            users.join(", ")
        ),
    )
}

/// Removes a secret, refused while a service reads it.
pub(super) fn remove_secret(
    api: &ControlApi,
    request: pb::RemoveSecretRequest,
) -> Result<Prepared<pb::RemoveResponse>, Status> {
    let (current, users) = api.store.view(|view| {
        let current = resolve_secret(view, &request.reference)?;
        let users = services_using(view, &current.id, |t| &t.secrets);
        Ok::<_, Status>((current, users))
    })?;
    let name = current.spec.as_ref().map_or("", |s| s.name.as_str());
    if !users.is_empty() {
        return Err(in_use("secret", name, &users));
    }
    let id = current.id.clone();
    Ok(Prepared::then(
        vec![delete(Kind::Secret, id.clone(), 0)],
        move |_| pb::RemoveResponse { id },
    ))
}

/// Removes a config, refused while a service reads it.
pub(super) fn remove_config(
    api: &ControlApi,
    request: pb::RemoveConfigRequest,
) -> Result<Prepared<pb::RemoveResponse>, Status> {
    let (current, users) = api.store.view(|view| {
        let current = resolve_config(view, &request.reference)?;
        let users = services_using(view, &current.id, |t| &t.configs);
        Ok::<_, Status>((current, users))
    })?;
    let name = current.spec.as_ref().map_or("", |s| s.name.as_str());
    if !users.is_empty() {
        return Err(in_use("config", name, &users));
    }
    let id = current.id.clone();
    Ok(Prepared::then(
        vec![delete(Kind::Config, id.clone(), 0)],
        move |_| pb::RemoveResponse { id },
    ))
}

/// `spec` with the secrets and configs its task template reads resolved: each reference
/// (an id, a name or a unique id prefix) gets the object's id and name.
///
/// # Errors
/// `NotFound` naming the unknown secret or config and how to create it.
pub(super) fn with_secrets(api: &ControlApi, mut spec: ServiceSpec) -> Result<ServiceSpec, Status> {
    let Some(task) = spec.task.as_mut() else {
        return Ok(spec);
    };
    api.store.view(|view| {
        for reference in &mut task.secrets {
            let secret = resolve_secret(view, reference_key(reference))
                .map_err(|refusal| unknown("secret", reference, &refusal))?;
            reference.id.clone_from(&secret.id);
            reference.name = secret
                .spec
                .as_ref()
                .map(|s| s.name.clone())
                .unwrap_or_default();
        }
        for reference in &mut task.configs {
            let config = resolve_config(view, reference_key(reference))
                .map_err(|refusal| unknown("config", reference, &refusal))?;
            reference.id.clone_from(&config.id);
            reference.name = config
                .spec
                .as_ref()
                .map(|s| s.name.clone())
                .unwrap_or_default();
        }
        Ok::<_, Status>(())
    })?;
    Ok(spec)
}

/// What a reference names: the name the client gave, else the id a stored spec carries.
fn reference_key(reference: &SecretReference) -> &str {
    if reference.name.is_empty() {
        &reference.id
    } else {
        &reference.name
    }
}

fn unknown(kind: &str, reference: &SecretReference, refusal: &Status) -> Status {
    let name = reference_key(reference);
    Status::new(
        refusal.code,
        format!(
            "--{kind} {name}: {}; create it with `flotilla {kind} create {name} FILE`",
            refusal.message
        ),
    )
}
