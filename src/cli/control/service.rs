//! `flotilla service create|ls|inspect|ps|scale|update|rollback|logs|rm`: the service
//! commands and their arguments.
//!
//! Must never talk to the transport except through [`Client`], nor print a table itself
//! (tables are in [`super::output`]).

use std::collections::HashSet;

use clap::Subcommand;

use super::client::Client;
use super::flags::{SpecFlags, apply_flags};
use super::output::{Format, Names, print_services, print_tasks};
use super::progress;
use crate::cli::{CommandError, json};
use crate::control as api;
use crate::proto::control as pb;
use crate::proto::objects::{Node, Service, ServiceMode, ServiceSpec, Task, TaskSpec};

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
        /// Return at once instead of waiting, with progress on stderr, until every task
        /// runs (and has kept running for the monitor period).
        #[arg(long, short = 'd')]
        detach: bool,
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
        /// Return at once instead of waiting, with progress on stderr, until every task
        /// runs the new spec (and has kept running for the monitor period).
        #[arg(long, short = 'd')]
        detach: bool,
        /// New program and arguments (everything from here on is the task's).
        #[arg(trailing_var_arg = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Return a service to its previous spec (before its last update); its tasks are
    /// replaced with the rollback settings (`--rollback-*`).
    Rollback {
        /// Id, unique id prefix or name.
        service: String,
        /// Return at once instead of waiting, with progress on stderr, until every task
        /// runs the previous spec.
        #[arg(long, short = 'd')]
        detach: bool,
    },
    /// Print the tasks' stdout and stderr lines (of one task, given a task id), tagged
    /// `<service>.<slot>.<task id prefix>@<node>`; warnings (nodes that did not answer,
    /// lines dropped for a slow reader) go to stderr.
    Logs(super::logs::LogsArgs),
    /// Remove services.
    Rm {
        /// Ids, unique id prefixes or names.
        #[arg(required = true)]
        services: Vec<String>,
    },
}

fn get_service(client: &Client, reference: &str) -> Result<Service, String> {
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

fn list_tasks(client: &Client, service: &str) -> Result<Vec<Task>, String> {
    client.list(
        api::LIST_TASKS,
        &pb::ListTasksRequest {
            service_id: service.to_string(),
            node_id: String::new(),
        },
        |c: pb::TaskChunk| c.tasks,
    )
}

fn list_nodes(client: &Client) -> Result<Vec<Node>, String> {
    client.list(
        api::LIST_NODES,
        &pb::ListNodesRequest {},
        |c: pb::NodeChunk| c.nodes,
    )
}

/// The name a command reports it acted on: the service's name, or its id if it has none.
fn service_name(service: &Service) -> &str {
    service
        .spec
        .as_ref()
        .map(|s| s.name.as_str())
        .filter(|name| !name.is_empty())
        .unwrap_or(&service.id)
}

/// Times `service update` reads the service again after a version conflict with a write it
/// did not see (the orchestrator records its update status on the service): only when the
/// user named no `--if-version`.
const UPDATE_CONFLICT_RETRIES_MAX: u32 = 3;

fn update_service(
    client: &Client,
    reference: &str,
    if_version: Option<u64>,
    change: impl Fn(&mut ServiceSpec) -> Result<(), String>,
) -> Result<Service, CommandError> {
    let mut conflicts = 0;
    loop {
        let current = get_service(client, reference)?;
        let mut spec = current.spec.clone().unwrap_or_default();
        change(&mut spec)?;
        let version = if_version.unwrap_or_else(|| current.meta.as_ref().map_or(0, |m| m.version));
        let request = pb::UpdateServiceRequest {
            reference: current.id.clone(),
            version,
            spec: Some(spec),
            request_id: client.next_request(),
            rollback: false,
        };
        match write_service(client, &current.id, &request) {
            Err(CommandError::Failed(message))
                if if_version.is_none()
                    && message.contains("version conflict")
                    && conflicts < UPDATE_CONFLICT_RETRIES_MAX =>
            {
                conflicts += 1;
            }
            result => return result,
        }
    }
}

fn write_service(
    client: &Client,
    id: &str,
    request: &pb::UpdateServiceRequest,
) -> Result<Service, CommandError> {
    let reply: pb::ServiceResponse = client.write(
        api::UPDATE_SERVICE,
        request,
        &format!("flotilla service inspect {id}"),
    )?;
    Ok(reply
        .service
        .ok_or_else(|| "the manager sent an empty reply".to_string())?)
}

/// `service rollback`: asks for the previous spec back (the manager swaps the specs).
fn roll_back(client: &Client, reference: &str) -> Result<Service, CommandError> {
    let current = get_service(client, reference)?;
    let request = pb::UpdateServiceRequest {
        reference: current.id.clone(),
        version: current.meta.as_ref().map_or(0, |m| m.version),
        spec: None,
        request_id: client.next_request(),
        rollback: true,
    };
    write_service(client, &current.id, &request)
}

pub(super) fn run(client: &Client, command: ServiceCommand) -> Result<(), CommandError> {
    match command {
        ServiceCommand::Create {
            name,
            spec: flags,
            detach,
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
                Format::Table => out!("{}", service.id),
            }
            if !detach {
                progress::wait_converged(client, &service, HashSet::new())?;
            }
        }
        ServiceCommand::Ls => {
            let services = client.list(
                api::LIST_SERVICES,
                &pb::ListServicesRequest {},
                |c: pb::ServiceChunk| c.services,
            )?;
            // REPLICAS counts running tasks; JSON prints the services alone.
            let tasks = match client.format {
                Format::Table => list_tasks(client, "")?,
                Format::Json => Vec::new(),
            };
            print_services(client, &services, &tasks);
        }
        ServiceCommand::Inspect { service } => {
            client.print_json(&json::service(&get_service(client, &service)?));
        }
        ServiceCommand::Ps { service } => {
            let service = get_service(client, &service)?;
            let tasks = list_tasks(client, &service.id)?;
            let names = Names::new(&list_nodes(client)?, std::slice::from_ref(&service));
            print_tasks(client, &tasks, &names);
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
                out!("{} scaled to {replicas}", service_name(&service));
            }
        }
        ServiceCommand::Update {
            service,
            spec: flags,
            rename,
            command,
            if_version,
            detach,
        } => {
            // The tasks before the update: only the failures of those it makes count.
            let before = if detach {
                HashSet::new()
            } else {
                progress::task_ids(client, &service)?
            };
            let updated = update_service(client, &service, if_version, |spec| {
                if let Some(name) = &rename {
                    spec.name.clone_from(name);
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
                Format::Table => out!(
                    "{} updated to version {}",
                    service_name(&updated),
                    updated.meta.as_ref().map_or(0, |m| m.version)
                ),
            }
            if !detach {
                progress::wait_converged(client, &updated, before)?;
            }
        }
        ServiceCommand::Rollback { service, detach } => {
            let before = if detach {
                HashSet::new()
            } else {
                progress::task_ids(client, &service)?
            };
            let rolled_back = roll_back(client, &service)?;
            match client.format {
                Format::Json => client.print_json(&json::service(&rolled_back)),
                Format::Table => out!(
                    "{} rolled back to its previous spec (version {})",
                    service_name(&rolled_back),
                    rolled_back.meta.as_ref().map_or(0, |m| m.version)
                ),
            }
            if !detach {
                progress::wait_rolled_back(client, &rolled_back, before)?;
            }
        }
        ServiceCommand::Logs(args) => super::logs::run(client, &args)?,
        ServiceCommand::Rm { services } => {
            for reference in services {
                // Reported as the user named it, as docker does.
                let named = reference.clone();
                let check = format!("flotilla service inspect {reference}");
                let _: pb::RemoveResponse = client.write(
                    api::REMOVE_SERVICE,
                    &pb::RemoveServiceRequest {
                        reference,
                        request_id: client.next_request(),
                    },
                    &check,
                )?;
                out!("{named}");
            }
        }
    }
    Ok(())
}
