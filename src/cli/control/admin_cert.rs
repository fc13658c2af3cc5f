//! `flotilla admin-cert issue --out DIR`: gets an admin certificate (OU `admin`) for
//! operating the cluster from another host; `flotilla admin-cert revoke ID` revokes one
//! cluster-wide. The key pair is generated here and only the
//! CSR goes to the manager; the private key is written to DIR (0600) and nowhere else.
//!
//! Must never send or print a private key, nor overwrite an identity already in DIR; must
//! never talk to the transport except through [`Client`].

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::Subcommand;

use super::client::Client;
use super::flags::parse_duration_ms;
use super::output::Format;
use crate::ca::{NODE_IDENTITY_FILE, PendingIdentity, RootCert, save_node_files};
use crate::cli::CommandError;
use crate::control::{ISSUE_ADMIN_CERTIFICATE, REVOKE_ADMIN_CERTIFICATE};
use crate::proto::control as pb;

/// Lifetime of an admin certificate unless `--validity` says otherwise.
pub const ADMIN_CERT_VALIDITY_DEFAULT: &str = "30d";

/// `flotilla admin-cert …`
#[derive(Subcommand, Debug)]
pub enum AdminCertCommand {
    /// Issue an admin certificate into DIR: then `flotilla COMMAND --cert-dir DIR --manager
    /// ADDR …` works from any host that can reach a manager.
    Issue {
        /// Directory to write the certificate, its key and the cluster root into (created
        /// 0700; must not hold an identity yet).
        #[arg(long)]
        out: PathBuf,
        /// Who it is for (recorded in the issuing manager's log).
        #[arg(long, default_value = "")]
        name: String,
        /// Lifetime, e.g. `12h`, `30d` (at most 365d).
        #[arg(long, default_value = ADMIN_CERT_VALIDITY_DEFAULT)]
        validity: String,
    },
    /// Revoke an admin certificate by its id (printed by `issue`): every manager refuses
    /// it from then on, until it would have expired anyway.
    Revoke {
        /// The certificate's id.
        id: String,
    },
}

/// Parses `30d` as well as every unit of [`parse_duration_ms`].
fn parse_validity_ms(text: &str) -> Result<i64, String> {
    match text.trim().strip_suffix('d') {
        Some(days) => days
            .parse::<i64>()
            .ok()
            .and_then(|d| d.checked_mul(86_400_000))
            .ok_or_else(|| format!("--validity {text:?}: expected a duration such as 30d or 12h")),
        None => parse_duration_ms("validity", text),
    }
}

/// `admin-cert issue --format json`.
#[derive(serde::Serialize)]
struct IssuedShown<'a> {
    id: &'a str,
    role: String,
    dir: String,
    not_after_unix_s: u64,
}

fn seconds_since_epoch(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs one `admin-cert` subcommand through `client`.
///
/// # Errors
/// A message for stderr, with a hint.
pub(crate) fn run(client: &Client, command: AdminCertCommand) -> Result<(), CommandError> {
    match command {
        AdminCertCommand::Issue {
            out,
            name,
            validity,
        } => Ok(issue(client, out, name, &validity)?),
        AdminCertCommand::Revoke { id } => {
            let _: pb::RevokeAdminCertificateResponse = client.write(
                REVOKE_ADMIN_CERTIFICATE,
                &pb::RevokeAdminCertificateRequest {
                    id: id.clone(),
                    request_id: client.next_request(),
                },
                "flotilla cluster inspect",
            )?;
            out!("admin certificate {id} revoked on every manager");
            Ok(())
        }
    }
}

fn issue(client: &Client, out: PathBuf, name: String, validity: &str) -> Result<(), String> {
    let validity_ms = parse_validity_ms(validity)?;
    if out.join(NODE_IDENTITY_FILE).exists() {
        return Err(format!(
            "{} already holds an identity; choose another --out directory",
            out.display()
        ));
    }
    let pending = PendingIdentity::generate().map_err(|e| format!("cannot make a key: {e}"))?;
    // Repeated after an unknown outcome: a certificate issued and lost on the way is held
    // by no one (the key never left this process), and issuing changes no cluster state.
    let reply: pb::IssueAdminCertificateResponse = client.unary_safe_to_repeat(
        ISSUE_ADMIN_CERTIFICATE,
        &pb::IssueAdminCertificateRequest {
            csr_der: pending.csr_der().to_vec().into(),
            validity_ms,
            name,
        },
    )?;
    let root = RootCert::from_bytes(&reply.root_cert_der)
        .map_err(|e| format!("the manager sent an unusable root certificate: {e}"))?;
    if root.der() != client.root.der() {
        return Err(
            "the manager answered with another cluster's root certificate; refusing it".into(),
        );
    }
    let identity = pending
        .complete(&reply.cert_der, &root, SystemTime::now())
        .map_err(|e| format!("the manager issued an unusable certificate: {e}"))?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&out)
        .map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    save_node_files(&out, &identity, &root).map_err(|e| e.to_string())?;
    let expires = seconds_since_epoch(identity.not_after());
    match client.format {
        Format::Json => client.print_json(&IssuedShown {
            id: identity.node_id(),
            role: identity.role().to_string(),
            dir: out.display().to_string(),
            not_after_unix_s: expires,
        }),
        Format::Table => {
            let days =
                Duration::from_millis(u64::try_from(validity_ms).unwrap_or(0)).as_secs() / 86_400;
            out!(
                "admin certificate {} (valid {days} days) written to {}",
                identity.node_id(),
                out.display()
            );
            out!(
                "use it from any host: flotilla service ls --cert-dir {} --manager MANAGER_ADDR",
                out.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_takes_days_and_other_units() {
        assert_eq!(parse_validity_ms("30d"), Ok(30 * 86_400_000));
        assert_eq!(parse_validity_ms("12h"), Ok(12 * 3_600_000));
        assert!(parse_validity_ms("xd").is_err());
        assert!(parse_validity_ms("3 weeks").is_err());
    }
}
