//! `flotilla network create|ls|inspect|rm`: the network commands and their arguments.
//!
//! Must never talk to the transport except through [`Client`], nor print a table itself
//! (tables are in [`super::output`]).

use clap::Subcommand;

use super::client::Client;
use super::flags::parse_pairs;
use super::output::{Format, print_networks};
use crate::cli::{CommandError, json};
use crate::control as api;
use crate::proto::control as pb;
use crate::proto::objects::NetworkSpec;

/// `flotilla network …`
#[derive(Subcommand, Debug)]
pub enum NetworkCommand {
    /// Create a network services attach to (`service create --network NAME`).
    Create {
        /// Its unique name (a DNS label: `<service>.<name>` resolves on its nodes).
        name: String,
        /// Label KEY=VALUE (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// The driver; `overlay`, the only one.
        #[arg(long, default_value = crate::store::spec::NETWORK_DRIVER_DEFAULT)]
        driver: String,
    },
    /// List the networks.
    Ls,
    /// Show a network (JSON).
    Inspect {
        /// Id, unique id prefix or name.
        network: String,
        /// Show instead the network's endpoints (its running tasks) as the node of the
        /// manager answering sees them: its own gossiped table, empty if it runs no task
        /// on the network.
        #[arg(long)]
        endpoints: bool,
    },
    /// Remove networks (refused while a service uses one).
    Rm {
        /// Ids, unique id prefixes or names.
        #[arg(required = true)]
        networks: Vec<String>,
    },
}

/// What `network inspect --endpoints` prints.
#[derive(serde::Serialize)]
struct EndpointsShown {
    network: crate::proto::objects::Network,
    /// Whether the answering node is attached to the network (runs a task there).
    attached: bool,
    endpoints: Vec<crate::proto::objects::Endpoint>,
}

pub(super) fn run(client: &Client, command: NetworkCommand) -> Result<(), CommandError> {
    match command {
        NetworkCommand::Create {
            name,
            labels,
            driver,
        } => {
            let spec = NetworkSpec {
                name,
                labels: parse_pairs("label", &labels)?,
                driver,
                ..Default::default()
            };
            // Chosen once: a retry after an unknown outcome answers with what the first
            // attempt made.
            let id = crate::util::id::random_id();
            let reply: pb::NetworkResponse = client.write(
                api::CREATE_NETWORK,
                &pb::CreateNetworkRequest {
                    spec: Some(spec),
                    id: id.clone(),
                    request_id: client.next_request(),
                },
                &format!("flotilla network inspect {id}"),
            )?;
            let network = reply.network.unwrap_or_default();
            match client.format {
                Format::Json => client.print_json(&json::network(&network)),
                Format::Table => println!("{}", network.id),
            }
        }
        NetworkCommand::Ls => {
            let networks = client.list(
                api::LIST_NETWORKS,
                &pb::ListNetworksRequest {},
                |c: pb::NetworkChunk| c.networks,
            )?;
            print_networks(client, &networks);
        }
        NetworkCommand::Inspect { network, endpoints } => {
            if endpoints {
                let reply: pb::ListEndpointsResponse = client.unary(
                    api::LIST_ENDPOINTS,
                    &pb::ListEndpointsRequest { reference: network },
                )?;
                client.print_json(&EndpointsShown {
                    network: json::network(&reply.network.unwrap_or_default()),
                    attached: reply.attached,
                    endpoints: reply.endpoints,
                });
            } else {
                let reply: pb::NetworkResponse = client.unary(
                    api::GET_NETWORK,
                    &pb::GetNetworkRequest { reference: network },
                )?;
                client.print_json(&json::network(&reply.network.unwrap_or_default()));
            }
        }
        NetworkCommand::Rm { networks } => {
            for reference in networks {
                let check = format!("flotilla network inspect {reference}");
                let reply: pb::RemoveResponse = client.write(
                    api::REMOVE_NETWORK,
                    &pb::RemoveNetworkRequest {
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
