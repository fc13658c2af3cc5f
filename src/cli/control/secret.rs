//! `flotilla secret create|ls|inspect|rm` and `flotilla config …`: one set of commands for
//! both kinds, which differ only in what the managers keep (a secret's value is sealed and
//! never shown; a config's is shown by `config inspect`).
//!
//! Must never print or log a secret's value (it is read from a file or stdin and sent once,
//! in the create), nor talk to the transport except through [`Client`].

use std::io::Read;

use clap::Subcommand;

use super::client::Client;
use super::flags::parse_pairs;
use super::output::{Format, short};
use crate::cli::{CommandError, json};
use crate::control as api;
use crate::proto::control as pb;
use crate::proto::objects::{Config, ConfigSpec, Meta, Secret, SecretSpec};
use crate::store::spec::SECRET_DATA_BYTES_MAX;

/// Which kind a [`ValueCommand`] acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueKind {
    /// `flotilla secret …`
    Secret,
    /// `flotilla config …`
    Config,
}

impl ValueKind {
    fn as_str(self) -> &'static str {
        match self {
            ValueKind::Secret => "secret",
            ValueKind::Config => "config",
        }
    }
}

/// `flotilla secret …` / `flotilla config …`
#[derive(Subcommand, Debug)]
pub enum ValueCommand {
    /// Create one from FILE, or from standard input with `-` (at most 500 KiB).
    Create {
        /// Its unique name: 1 to 64 letters, digits, '-', '_' and '.'.
        name: String,
        /// The file holding the value, or `-` for standard input.
        file: String,
        /// Label KEY=VALUE (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// List them (never a secret's value).
    Ls,
    /// Show one as JSON (a secret without its value).
    Inspect {
        /// Id, unique id prefix or name.
        reference: String,
    },
    /// Remove them (refused while a service uses one).
    Rm {
        /// Ids, unique id prefixes or names.
        #[arg(required = true)]
        references: Vec<String>,
    },
}

/// Reads the value from `file` (`-`: stdin), at most [`SECRET_DATA_BYTES_MAX`] bytes.
fn read_value(kind: ValueKind, file: &str) -> Result<Vec<u8>, CommandError> {
    let limit = u64::try_from(SECRET_DATA_BYTES_MAX + 1).unwrap_or(u64::MAX);
    let mut value = Vec::new();
    let read = if file == "-" {
        std::io::stdin().take(limit).read_to_end(&mut value)
    } else {
        std::fs::File::open(file).and_then(|f| f.take(limit).read_to_end(&mut value))
    };
    let source = if file == "-" { "standard input" } else { file };
    read.map_err(|e| format!("cannot read the {} value from {source}: {e}", kind.as_str()))?;
    if value.len() > SECRET_DATA_BYTES_MAX {
        return Err(format!(
            "{source} holds more than {SECRET_DATA_BYTES_MAX} bytes (500 KiB), the most a {} \
             may hold",
            kind.as_str()
        )
        .into());
    }
    if value.is_empty() {
        return Err(format!(
            "{source} is empty; a {} needs a value of 1 byte or more",
            kind.as_str()
        )
        .into());
    }
    Ok(value)
}

pub(super) fn run(
    client: &Client,
    kind: ValueKind,
    command: ValueCommand,
) -> Result<(), CommandError> {
    match command {
        ValueCommand::Create { name, file, labels } => {
            let value = read_value(kind, &file)?;
            let labels = parse_pairs("label", &labels)?;
            let id = create(client, kind, name, labels, value)?;
            if client.format == Format::Table {
                out!("{id}");
            }
        }
        ValueCommand::Ls => list(client, kind)?,
        ValueCommand::Inspect { reference } => inspect(client, kind, reference)?,
        ValueCommand::Rm { references } => {
            for reference in references {
                let check = format!("flotilla {} inspect {reference}", kind.as_str());
                let request_id = client.next_request();
                let reply: pb::RemoveResponse = match kind {
                    ValueKind::Secret => client.write(
                        api::REMOVE_SECRET,
                        &pb::RemoveSecretRequest {
                            reference,
                            request_id,
                        },
                        &check,
                    )?,
                    ValueKind::Config => client.write(
                        api::REMOVE_CONFIG,
                        &pb::RemoveConfigRequest {
                            reference,
                            request_id,
                        },
                        &check,
                    )?,
                };
                out!("{}", reply.id);
            }
        }
    }
    Ok(())
}

/// Creates the secret or config; prints it as JSON when asked; returns its id.
fn create(
    client: &Client,
    kind: ValueKind,
    name: String,
    labels: std::collections::BTreeMap<String, String>,
    value: Vec<u8>,
) -> Result<String, CommandError> {
    // Chosen once: a retry after an unknown outcome answers with what the first attempt made.
    let id = crate::util::id::random_id();
    let check = format!("flotilla {} inspect {id}", kind.as_str());
    let request_id = client.next_request();
    match kind {
        ValueKind::Secret => {
            let reply: pb::SecretResponse = client.write(
                api::CREATE_SECRET,
                &pb::CreateSecretRequest {
                    spec: Some(SecretSpec {
                        name,
                        labels,
                        data: value.into(),
                    }),
                    id: id.clone(),
                    request_id,
                },
                &check,
            )?;
            let secret = reply.secret.unwrap_or_default();
            if client.format == Format::Json {
                client.print_json(&json::secret(&secret));
            }
            Ok(secret.id)
        }
        ValueKind::Config => {
            let reply: pb::ConfigResponse = client.write(
                api::CREATE_CONFIG,
                &pb::CreateConfigRequest {
                    spec: Some(ConfigSpec {
                        name,
                        labels,
                        data: value.into(),
                    }),
                    id: id.clone(),
                    request_id,
                },
                &check,
            )?;
            let config = reply.config.unwrap_or_default();
            if client.format == Format::Json {
                client.print_json(&json::config(&config));
            }
            Ok(config.id)
        }
    }
}

fn inspect(client: &Client, kind: ValueKind, reference: String) -> Result<(), CommandError> {
    match kind {
        ValueKind::Secret => {
            let reply: pb::SecretResponse =
                client.unary(api::GET_SECRET, &pb::GetSecretRequest { reference })?;
            client.print_json(&json::secret(&reply.secret.unwrap_or_default()));
        }
        ValueKind::Config => {
            let reply: pb::ConfigResponse =
                client.unary(api::GET_CONFIG, &pb::GetConfigRequest { reference })?;
            client.print_json(&json::config(&reply.config.unwrap_or_default()));
        }
    }
    Ok(())
}

/// One row of `ls`: id, name, created (Unix ms), version.
struct Row<'a> {
    id: &'a str,
    name: &'a str,
    meta: Option<&'a Meta>,
}

fn list(client: &Client, kind: ValueKind) -> Result<(), CommandError> {
    match kind {
        ValueKind::Secret => {
            let secrets: Vec<Secret> = client.list(
                api::LIST_SECRETS,
                &pb::ListSecretsRequest {},
                |c: pb::SecretChunk| c.secrets,
            )?;
            if client.format == Format::Json {
                client.print_json(&secrets.iter().map(json::secret).collect::<Vec<_>>());
                return Ok(());
            }
            print_rows(secrets.iter().map(|s| Row {
                id: &s.id,
                name: s.spec.as_ref().map_or("", |spec| spec.name.as_str()),
                meta: s.meta.as_ref(),
            }));
        }
        ValueKind::Config => {
            let configs: Vec<Config> = client.list(
                api::LIST_CONFIGS,
                &pb::ListConfigsRequest {},
                |c: pb::ConfigChunk| c.configs,
            )?;
            if client.format == Format::Json {
                client.print_json(&configs.iter().map(json::config).collect::<Vec<_>>());
                return Ok(());
            }
            print_rows(configs.iter().map(|c| Row {
                id: &c.id,
                name: c.spec.as_ref().map_or("", |spec| spec.name.as_str()),
                meta: c.meta.as_ref(),
            }));
        }
    }
    Ok(())
}

fn print_rows<'a>(rows: impl Iterator<Item = Row<'a>>) {
    out!("{:<12}  {:<32}  {:>8}", "ID", "NAME", "VERSION");
    for row in rows {
        out!(
            "{:<12}  {:<32}  {:>8}",
            short(row.id),
            row.name,
            row.meta.map_or(0, |m| m.version)
        );
    }
}
