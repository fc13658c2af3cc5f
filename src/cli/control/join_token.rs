//! `flotilla join-token worker|manager [--rotate]`: prints (or rotates, then prints) a join
//! token.
//!
//! Must never talk to the transport except through [`Client`], nor print a table itself
//! (tables are in [`super::output`]).

use clap::ValueEnum;

use super::client::Client;
use super::output::Format;
use crate::cli::CommandError;
use crate::control as api;
use crate::proto::control as pb;
use crate::proto::objects::NodeRole;

/// Which join token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TokenRole {
    /// The token that makes a worker.
    Worker,
    /// The token that makes a manager.
    Manager,
}

pub(super) fn run(client: &Client, role: TokenRole, rotate: bool) -> Result<(), CommandError> {
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
        Format::Table => out!("{token}"),
    }
    Ok(())
}
