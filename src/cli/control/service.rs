//! `flotilla service create|ls|inspect|ps|scale|update|rm`: the service commands and their
//! arguments.
//!
//! Must never talk to the transport except through [`Client`], nor print a table itself
//! (tables are in [`super::output`]).

use clap::Subcommand;

use super::client::Client;
use super::flags::{SpecFlags, apply_flags};
use super::output::{Format, print_services, print_tasks};
use crate::cli::{CommandError, json};
use crate::control as api;
use crate::proto::control as pb;
use crate::proto::objects::{ServiceMode, ServiceSpec, TaskSpec};

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

pub(super) fn run(client: &Client, command: ServiceCommand) -> Result<(), CommandError> {
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
