//! `control.IssueAdminCertificate`: a client certificate with OU `admin` for an operator,
//! signed by the cluster CA from the public key of the caller's CSR (the private key never
//! leaves the caller).
//!
//! Runs where the CA key is: on this manager once it holds it (every manager does, once
//! the replicated Cluster object reached it), else forwarded to the leader (with the
//! caller's identity). `control.RevokeAdminCertificate` revokes one by id, cluster-wide
//! (a write: the id joins the Cluster object's revoked certificates, checked by
//! [`super::access`]). Must never issue a node certificate (manager or worker) nor
//! anything longer-lived than [`ADMIN_CERT_VALIDITY_MAX`].

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{Caller, ControlApi};
use crate::net::{Router, ServicePool};
use crate::proto::control as pb;
use crate::proto::control::rpc::forward;
use crate::wire::{Code, Status};

/// The longest lifetime an admin certificate may be given (one year): a lost one is
/// revoked with `flotilla admin-cert revoke ID`, and the revocation is kept that long.
pub const ADMIN_CERT_VALIDITY_MAX: Duration = Duration::from_secs(365 * 24 * 3600);
/// Characters of the `name` an admin certificate is issued for (logged only).
pub const ADMIN_NAME_CHARS_MAX: usize = 64;

fn check_request(request: &pb::IssueAdminCertificateRequest) -> Result<Duration, Status> {
    let validity_ms = u64::try_from(request.validity_ms)
        .ok()
        .filter(|ms| *ms > 0)
        .ok_or_else(|| {
            Status::invalid_argument("validity: must be positive (e.g. `--validity 30d`)")
        })?;
    let validity = Duration::from_millis(validity_ms);
    if validity > ADMIN_CERT_VALIDITY_MAX {
        return Err(Status::invalid_argument(format!(
            "validity: {:.1} days is beyond the limit of {} days; issue a new certificate \
             when this one expires",
            validity.as_secs_f64() / 86_400.0,
            ADMIN_CERT_VALIDITY_MAX.as_secs() / 86_400
        )));
    }
    if request.name.chars().count() > ADMIN_NAME_CHARS_MAX
        || request.name.chars().any(char::is_control)
    {
        return Err(Status::invalid_argument(format!(
            "name: at most {ADMIN_NAME_CHARS_MAX} printable characters"
        )));
    }
    Ok(validity)
}

/// Signs the admin certificate with this manager's CA key. The caller checked the role
/// (an operator); this manager must hold the key.
///
/// # Errors
/// `InvalidArgument` for a bad request or CSR; `FailedPrecondition` when this manager does
/// not hold the CA key.
pub(super) fn issue_here(
    api: &ControlApi,
    caller: &Caller,
    request: pb::IssueAdminCertificateRequest,
) -> Result<pb::IssueAdminCertificateResponse, Status> {
    let validity = check_request(&request)?;
    let ca = api.ca.get().ok_or_else(|| {
        // The key reaches every manager with the replicated cluster object, within moments
        // of its joining or of a new cluster's first election.
        Status::retry_soon(
            Code::FailedPrecondition,
            "the cluster CA key has not reached this manager nor the one leading yet (it \
             comes with the replicated cluster object); retry in a moment",
        )
    })?;
    let issued = ca
        .ca()
        .issue_admin(&request.csr_der, validity, SystemTime::now())
        .map_err(crate::ca_rpc::issue_status)?;
    log::info!(
        "ca: issued admin certificate {} ({:?}, {} days) at the request of {} ({})",
        issued.identity.node_id,
        request.name,
        validity.as_secs() / 86_400,
        caller.node_id,
        caller.role
    );
    Ok(pb::IssueAdminCertificateResponse {
        cert_der: issued.cert_der.to_vec().into(),
        root_cert_der: ca.root().der().to_vec().into(),
    })
}

/// Serves `control.IssueAdminCertificate` and `control.RevokeAdminCertificate` (operators:
/// managers and admins, as their policies say).
pub(super) fn register(router: &mut Router, pool: &ServicePool, api: &Arc<ControlApi>) {
    super::register_write(router, pool, api, forward::REVOKE_ADMIN_CERTIFICATE);
    let a = api.clone();
    router.serve_unary_deferred(
        forward::ISSUE_ADMIN_CERTIFICATE.method,
        pool,
        move |ctx, request, responder| {
            let caller = match Caller::from_peer(ctx.peer()) {
                Ok(caller) => caller,
                Err(refusal) => return responder.respond(Err(refusal)),
            };
            // Checked here too, so a bad request fails before any forward.
            if let Err(refusal) = check_request(&request) {
                return responder.respond(Err(refusal));
            }
            if a.ca.is_present() {
                responder.respond(issue_here(&a, &caller, request));
            } else {
                a.write_with(
                    &caller,
                    forward::ISSUE_ADMIN_CERTIFICATE,
                    request,
                    Box::new(move |reply| responder.respond(reply)),
                );
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(validity_ms: i64, name: &str) -> pb::IssueAdminCertificateRequest {
        pb::IssueAdminCertificateRequest {
            csr_der: bytes::Bytes::new(),
            validity_ms,
            name: name.into(),
        }
    }

    #[test]
    fn validity_and_name_are_bounded() {
        assert_eq!(
            check_request(&request(86_400_000, "ops")).unwrap(),
            Duration::from_secs(86_400)
        );
        assert!(check_request(&request(0, "")).is_err());
        assert!(check_request(&request(-5, "")).is_err());
        let too_long = i64::try_from(ADMIN_CERT_VALIDITY_MAX.as_millis()).unwrap() + 1;
        let refusal = check_request(&request(too_long, "")).unwrap_err();
        assert!(refusal.message.contains("365 days"), "{refusal}");
        assert!(check_request(&request(1000, &"x".repeat(65))).is_err());
        assert!(check_request(&request(1000, "a\nb")).is_err());
    }
}
