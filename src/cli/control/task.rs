//! `flotilla task ls|inspect`: the task commands and their arguments.
//!
//! Must never talk to the transport except through [`Client`], nor print a table itself
//! (tables are in [`super::output`]).

use clap::Subcommand;

use super::client::Client;
use super::output::{Format, Names, print_tasks};
use crate::cli::json;
use crate::control as api;
use crate::proto::control as pb;

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

pub(super) fn run(client: &Client, command: TaskCommand) -> Result<(), String> {
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
            // The table names tasks and nodes as `service ps` does; JSON prints ids.
            let names = match client.format {
                Format::Table => Names::new(
                    &client.list(
                        api::LIST_NODES,
                        &pb::ListNodesRequest {},
                        |c: pb::NodeChunk| c.nodes,
                    )?,
                    &client.list(
                        api::LIST_SERVICES,
                        &pb::ListServicesRequest {},
                        |c: pb::ServiceChunk| c.services,
                    )?,
                ),
                Format::Json => Names::new(&[], &[]),
            };
            print_tasks(client, &tasks, &names);
        }
        TaskCommand::Inspect { task } => {
            let reply: pb::TaskResponse =
                client.unary(api::GET_TASK, &pb::GetTaskRequest { reference: task })?;
            client.print_json(&json::task(&reply.task.unwrap_or_default()));
        }
    }
    Ok(())
}
