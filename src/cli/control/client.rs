//! The control client: loading the identity a command calls with (a node state directory or
//! an admin certificate directory), connecting to a manager, and the calls every command
//! makes through it: reads retried while a refusal says "retry soon", listings, and writes
//! that are exactly-once ([`Client::write`]: this invocation's client id and a request
//! number, the same on every retry; an unknown outcome that stays unknown is reported as
//! [`CommandError::OutcomeUnknown`], never as failed or as a conflict).
//!
//! Must never know a command, an object kind or how anything is printed (but for the
//! format it carries for the commands); must never read an error's message to decide what
//! to do (only its code and reason).

use std::cell::Cell;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::output::Format;
use crate::ca::{NodeIdentity, RootCert, load_node_files, tls};
use crate::cli::CommandError;
use crate::manager::StateDir;
use crate::net::{CallOptions, Transport, TransportConfig};
use crate::proto::objects::RequestId;
use crate::wire::{Code, Status, WriteFate};

/// Deadline of one control call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Extra attempts of a call refused with the reason [`crate::wire::RETRY_SOON`] (an
/// election, a transfer, the CA key or cluster object not yet on this manager), each after
/// [`RETRY_SOON_WAIT`]: such a refusal says "retry in a moment", so the CLI does, for about
/// ten seconds plus the calls' own time, before it reports it.
pub const RETRY_SOON_ATTEMPTS_MAX: u32 = 40;
/// Wait before each retry of a [`crate::wire::RETRY_SOON`] refusal.
pub const RETRY_SOON_WAIT: Duration = Duration::from_millis(250);
/// Extra attempts of a write whose outcome is unknown (`Unavailable`, `DeadlineExceeded`,
/// a forward whose leader died) or that could not be sent: few, since each may wait a whole
/// [`CALL_TIMEOUT`]. Safe, because every write carries its request id.
pub const UNKNOWN_OUTCOME_RETRIES_MAX: u32 = 3;

/// Bytes of a client id (random, one per CLI invocation).
pub const CLIENT_ID_BYTES: usize = 16;

/// The request ids of one client: a random client id, and a number per write.
pub(crate) struct RequestIds {
    client_id: [u8; CLIENT_ID_BYTES],
    last_seq: Cell<u64>,
}

impl RequestIds {
    /// A new client: random id, no request yet.
    pub(crate) fn new() -> Self {
        Self {
            client_id: rand::random(),
            last_seq: Cell::new(0),
        }
    }

    /// The id of this client's next write (to be sent on every attempt of it).
    pub(crate) fn next(&self) -> RequestId {
        self.last_seq.set(self.last_seq.get() + 1);
        RequestId {
            client_id: bytes::Bytes::copy_from_slice(&self.client_id),
            seq: self.last_seq.get(),
        }
    }
}

/// How to reach a manager: shared by every control command.
#[derive(Args, Debug, Clone)]
pub struct Connection {
    /// The node state directory whose identity (certificate) the call uses.
    #[arg(long, default_value = crate::cli::UP_STATE_DIR_DEFAULT, global = true)]
    pub state_dir: PathBuf,
    /// A directory holding an admin certificate (`flotilla admin-cert issue --out DIR`):
    /// the call uses it instead of a state directory's identity; needs --manager.
    #[arg(long, global = true)]
    pub cert_dir: Option<PathBuf>,
    /// The manager to call (host:port); default: the state directory's own manager.
    #[arg(long, global = true)]
    pub manager: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table, global = true)]
    pub format: Format,
}

/// A connected control client: the one every CLI command that calls a manager uses.
pub(crate) struct Client {
    pub(crate) transport: Transport,
    pub(crate) tls: Arc<rustls::ClientConfig>,
    /// The manager called: `unix:<state-dir>/control.sock` or `host:port`.
    pub(crate) addr: String,
    /// The identity's root certificate (public): handed on to admin certificates.
    pub(crate) root: RootCert,
    pub(crate) format: Format,
    /// This invocation's request ids (every write carries one).
    pub(crate) requests: RequestIds,
    /// The node whose state directory the call uses (`node ls` marks it with `*`, as
    /// `docker node ls` marks the node it talks to); `None` with an admin certificate.
    pub(crate) self_node_id: Option<String>,
}

fn describe(addr: &str, status: &Status) -> String {
    let hint = match status.code {
        // Such a refusal was retried for a while already (`RETRY_SOON_ATTEMPTS_MAX`).
        _ if status.is_retry_soon() => {
            "\nhint: still so after retrying for about ten seconds; check that the managers \
             have a leader and reach each other (`flotilla manager ls`), and their logs"
                .to_string()
        }
        Code::Unavailable => "\nhint: is the manager running (`flotilla up`, or `flotilla run \
                              --state-dir DIR`)? With --manager, is the address right?"
            .to_string(),
        Code::Aborted => {
            "\nhint: someone changed it meanwhile: inspect it again and retry".to_string()
        }
        Code::InvalidArgument => "\nhint: fix the field named above and retry".to_string(),
        Code::NotFound => String::new(),
        Code::PermissionDenied | Code::Unauthenticated => {
            "\nhint: the control API needs a manager's identity (--state-dir of a manager) or \
             an admin certificate (`flotilla admin-cert issue --out DIR`, then --cert-dir DIR)"
                .to_string()
        }
        _ => String::new(),
    };
    format!("{addr}: {status}{hint}")
}

impl Client {
    /// The identity and the manager `connection` names: an admin certificate directory
    /// (with `--manager`), or a node state directory (its own manager by default).
    fn identity_and_target(
        connection: &Connection,
    ) -> Result<(NodeIdentity, RootCert, String), String> {
        if let Some(cert_dir) = &connection.cert_dir {
            let (identity, root) = load_node_files(cert_dir).map_err(|e| {
                format!(
                    "{e}\nhint: --cert-dir takes what `flotilla admin-cert issue --out DIR` wrote"
                )
            })?;
            let addr = connection.manager.clone().ok_or_else(|| {
                "--cert-dir needs --manager ADDR: an admin certificate has no local manager"
                    .to_string()
            })?;
            return Ok((identity, root, addr));
        }
        let dir = StateDir::new(connection.state_dir.clone());
        let (identity, root) = load_node_files(&dir.node_dir())
            .map_err(|e| format!("{e}\nhint: point --state-dir at a node's state directory"))?;
        let addr = match &connection.manager {
            Some(addr) => addr.clone(),
            None => dir.local_target().map_err(|e| {
                format!("{e}\nhint: point --state-dir at a manager, or pass --manager ADDR")
            })?,
        };
        Ok((identity, root, addr))
    }

    /// Loads the identity `connection` names and starts a transport.
    ///
    /// # Errors
    /// A message for stderr, with a hint.
    pub(crate) fn connect(connection: &Connection) -> Result<Self, String> {
        let (identity, root, addr) = Self::identity_and_target(connection)?;
        let self_node_id = connection
            .cert_dir
            .is_none()
            .then(|| identity.node_id().to_string());
        let tls = Arc::new(tls::client_config(&identity, &root).map_err(|e| e.to_string())?);
        let transport = Transport::start(TransportConfig::default())
            .map_err(|e| format!("cannot start the transport: {e}"))?;
        Ok(Self {
            transport,
            tls,
            addr,
            root,
            format: connection.format,
            requests: RequestIds::new(),
            self_node_id,
        })
    }

    /// One unary call, retried while the managers elect a leader.
    ///
    /// # Errors
    /// The manager's refusal, described with a hint.
    pub(crate) fn unary<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        method: &str,
        request: &Req,
    ) -> Result<Resp, String> {
        self.unary_retrying(method, request, 0)
    }

    /// Sends the write `request`, which carries a request id from [`Self::next_request`],
    /// and retries it with the same id: after a refusal that did nothing
    /// ([`WriteFate::NotDone`]: an election, a transfer; up to [`RETRY_SOON_ATTEMPTS_MAX`]
    /// times) and after an unknown outcome or a failure to send (up to
    /// [`UNKNOWN_OUTCOME_RETRIES_MAX`] times). A retry of a write that did happen gets its
    /// first answer from the managers' table of answers, so a definitive answer after an
    /// unknown outcome is the true one. `check` is the command that shows the object, for
    /// the message when the outcome stays unknown.
    ///
    /// # Errors
    /// [`CommandError::Failed`] with the manager's refusal (the write did not happen);
    /// [`CommandError::OutcomeUnknown`] when an attempt may have taken effect and the
    /// retries ran out before an answer.
    pub(crate) fn write<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        method: &str,
        request: &Req,
        check: &str,
    ) -> Result<Resp, CommandError> {
        self.write_retrying(method, request, check, UNKNOWN_OUTCOME_RETRIES_MAX)
    }

    /// Sends a write that carries no request id (the Raft group's membership and
    /// leadership, whose answers the managers do not record): retried like
    /// [`Self::write`] while nothing was done (an election, a failure to send), but never
    /// after an unknown outcome, since a repeat could not get the first attempt's answer
    /// (a repeated `manager rm` would be refused as "not a member"). `check` is the command
    /// that shows whether it happened.
    ///
    /// # Errors
    /// As [`Self::write`]; [`CommandError::OutcomeUnknown`] after the first unknown outcome.
    pub(crate) fn write_without_request_id<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        method: &str,
        request: &Req,
        check: &str,
    ) -> Result<Resp, CommandError> {
        self.write_retrying(method, request, check, 0)
    }

    fn write_retrying<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        method: &str,
        request: &Req,
        check: &str,
        unknown_outcome_retries_max: u32,
    ) -> Result<Resp, CommandError> {
        let channel = self.transport.channel(&self.addr, &self.tls);
        let (mut waits, mut unsent, mut unknown_outcomes) = (0, 0, 0);
        let mut uncertain = false;
        loop {
            let status = match channel.unary(method, request, CallOptions::timeout(CALL_TIMEOUT)) {
                Err(status) => status,
                Ok(reply) => return Ok(reply),
            };
            let fate = status.write_fate();
            uncertain |= fate == WriteFate::Unknown;
            let retry = match fate {
                WriteFate::Refused => false,
                WriteFate::NotDone if status.reason == crate::wire::Reason::NotSent => {
                    unsent += 1;
                    unsent <= UNKNOWN_OUTCOME_RETRIES_MAX
                }
                WriteFate::NotDone => {
                    waits += 1;
                    waits <= RETRY_SOON_ATTEMPTS_MAX
                }
                WriteFate::Unknown => {
                    unknown_outcomes += 1;
                    unknown_outcomes <= unknown_outcome_retries_max
                }
            };
            if !retry {
                return Err(if uncertain && fate != WriteFate::Refused {
                    CommandError::OutcomeUnknown(format!(
                        "outcome unknown: {}\nthe write may or may not have been applied: a \
                         manager received it and its answer was lost, and the retries could not \
                         learn it; check with `{check}`",
                        describe(&self.addr, &status)
                    ))
                } else {
                    CommandError::Failed(describe(&self.addr, &status))
                });
            }
            log::debug!("{method}: {status}; retrying");
            std::thread::sleep(status.retry_after().unwrap_or(RETRY_SOON_WAIT));
        }
    }

    /// The request id of this invocation's next write.
    pub(crate) fn next_request(&self) -> Option<RequestId> {
        Some(self.requests.next())
    }

    /// A call that changes no replicated state, so repeating it after an unknown outcome is
    /// safe (issuing a certificate: one lost on the way is held by no one): retried like
    /// [`Self::unary`], and after an unknown outcome up to [`UNKNOWN_OUTCOME_RETRIES_MAX`]
    /// times.
    ///
    /// # Errors
    /// The manager's refusal, described with a hint.
    pub(crate) fn unary_safe_to_repeat<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        method: &str,
        request: &Req,
    ) -> Result<Resp, String> {
        self.unary_retrying(method, request, UNKNOWN_OUTCOME_RETRIES_MAX)
    }

    fn unary_retrying<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        method: &str,
        request: &Req,
        unknown_outcome_retries_max: u32,
    ) -> Result<Resp, String> {
        let channel = self.transport.channel(&self.addr, &self.tls);
        let (mut waits, mut unknown_outcomes) = (0, 0);
        loop {
            let status = match channel.unary(method, request, CallOptions::timeout(CALL_TIMEOUT)) {
                Err(status) => status,
                Ok(reply) => return Ok(reply),
            };
            let retry = if status.is_retry_soon() && waits < RETRY_SOON_ATTEMPTS_MAX {
                waits += 1;
                true
            } else if matches!(status.code, Code::Unavailable | Code::DeadlineExceeded)
                && unknown_outcomes < unknown_outcome_retries_max
            {
                unknown_outcomes += 1;
                true
            } else {
                false
            };
            if !retry {
                return Err(describe(&self.addr, &status));
            }
            log::debug!("{method}: {status}; retrying");
            std::thread::sleep(RETRY_SOON_WAIT);
        }
    }

    /// Describes a refusal from `addr` with a hint.
    pub(crate) fn describe(addr: &str, status: &Status) -> String {
        describe(addr, status)
    }

    pub(crate) fn list<Req: prost::Message, Chunk: prost::Message + Default, T>(
        &self,
        method: &str,
        request: &Req,
        items: impl Fn(Chunk) -> Vec<T>,
    ) -> Result<Vec<T>, String> {
        let channel = self.transport.channel(&self.addr, &self.tls);
        let mut waits = 0;
        loop {
            let status = match Self::list_once(&channel, method, request, &items) {
                Ok(all) => return Ok(all),
                Err(status) => status,
            };
            if !status.is_retry_soon() || waits >= RETRY_SOON_ATTEMPTS_MAX {
                return Err(describe(&self.addr, &status));
            }
            waits += 1;
            log::debug!("{method}: {status}; retrying");
            std::thread::sleep(RETRY_SOON_WAIT);
        }
    }

    /// One listing: every chunk, or the refusal (when opening or midway; a listing is
    /// read-only, so a retry after a midway failure is safe).
    fn list_once<Req: prost::Message, Chunk: prost::Message + Default, T>(
        channel: &crate::net::Channel,
        method: &str,
        request: &Req,
        items: &impl Fn(Chunk) -> Vec<T>,
    ) -> Result<Vec<T>, Status> {
        let mut stream = channel.server_stream::<_, Chunk>(
            method,
            request,
            CallOptions::timeout(CALL_TIMEOUT),
        )?;
        let mut all = Vec::new();
        while let Some(chunk) = stream.recv()? {
            all.extend(items(chunk));
        }
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::ca::{CaPolicy, ClusterCa, Role};
    use crate::net::{Allow, Router, ServicePool};
    use crate::proto::control as pb;

    /// A server whose `test.Flaky` and `test.FlakyList` refuse `refusals` calls with
    /// `refusal`, then answer; and a client for it.
    struct Flaky {
        client: Client,
        server: Transport,
        pool: ServicePool,
        calls: Arc<AtomicU32>,
    }

    impl Flaky {
        fn start(refusals: u32, refusal: Status) -> Flaky {
            let ca =
                ClusterCa::create(std::time::SystemTime::now(), CaPolicy::default()).expect("a CA");
            let now = std::time::SystemTime::now();
            let server_identity = ca.issue_local_identity(Role::Manager, now).expect("id");
            let client_identity = ca.issue_local_identity(Role::Manager, now).expect("id");
            let pool = ServicePool::new("flaky", 2, 16).expect("pool");
            let calls = Arc::new(AtomicU32::new(0));
            let mut router = Router::new();
            let (counted, refused) = (calls.clone(), refusal.clone());
            router.unary(
                "test.Flaky",
                Allow::ANYONE,
                &pool,
                move |_, _: pb::GetClusterRequest| {
                    if counted.fetch_add(1, Ordering::SeqCst) < refusals {
                        return Err(refused.clone());
                    }
                    Ok(pb::ClusterResponse::default())
                },
            );
            let counted = calls.clone();
            router.server_stream(
                "test.FlakyList",
                Allow::ANYONE,
                &pool,
                move |_, _: pb::ListNodesRequest, stream| {
                    if counted.fetch_add(1, Ordering::SeqCst) < refusals {
                        return Err(refusal.clone());
                    }
                    stream.send(&pb::NodeChunk {
                        nodes: vec![Default::default()],
                    })
                },
            );
            let server = Transport::start(TransportConfig::default()).expect("transport");
            let server_tls = tls::server_config(&server_identity, ca.root()).expect("tls");
            let addr = server
                .listen(
                    "127.0.0.1:0".parse().expect("addr"),
                    Arc::new(server_tls),
                    Arc::new(router),
                )
                .expect("listen");
            let client = Client {
                transport: Transport::start(TransportConfig::default()).expect("transport"),
                tls: Arc::new(tls::client_config(&client_identity, ca.root()).expect("tls")),
                addr: addr.to_string(),
                root: ca.root().clone(),
                format: Format::Table,
                requests: RequestIds::new(),
                self_node_id: None,
            };
            Flaky {
                client,
                server,
                pool,
                calls,
            }
        }

        fn stop(self) -> u32 {
            self.client.transport.shutdown();
            self.server.shutdown();
            self.pool.shutdown();
            self.calls.load(Ordering::SeqCst)
        }
    }

    #[test]
    fn a_refusal_that_promises_a_retry_is_retried_and_others_are_not() {
        let soon = Status::retry_soon(
            Code::FailedPrecondition,
            "no key here yet; retry in a moment",
        );
        let flaky = Flaky::start(3, soon.clone());
        let reply: Result<pb::ClusterResponse, String> =
            flaky.client.unary("test.Flaky", &pb::GetClusterRequest {});
        assert!(reply.is_ok(), "{reply:?}");
        assert_eq!(flaky.stop(), 4, "three refusals, then the answer");

        let flaky = Flaky::start(2, soon);
        let nodes = flaky.client.list(
            "test.FlakyList",
            &pb::ListNodesRequest {},
            |c: pb::NodeChunk| c.nodes,
        );
        assert_eq!(nodes.map(|n| n.len()), Ok(1));
        assert_eq!(flaky.stop(), 3, "listings are retried too");

        // The same words without the reason: reported at once (the CLI never reads the
        // message to decide).
        let flaky = Flaky::start(1, Status::unavailable("retry in a moment"));
        let reply: Result<pb::ClusterResponse, String> =
            flaky.client.unary("test.Flaky", &pb::GetClusterRequest {});
        let error = reply.expect_err("refused");
        assert!(error.contains("retry in a moment"), "{error}");
        assert_eq!(flaky.stop(), 1);
    }

    #[test]
    fn a_promised_retry_is_bounded() {
        let soon = Status::retry_soon(Code::Unavailable, "no leader; retry in a moment");
        let flaky = Flaky::start(u32::MAX, soon);
        let reply: Result<pb::ClusterResponse, String> =
            flaky.client.unary("test.Flaky", &pb::GetClusterRequest {});
        let error = reply.expect_err("never answers");
        assert!(error.contains("hint:"), "{error}");
        assert_eq!(flaky.stop(), RETRY_SOON_ATTEMPTS_MAX + 1);
    }

    #[test]
    fn a_write_whose_outcome_stays_unknown_says_so_and_one_never_sent_failed() {
        let write = |flaky: &Flaky| -> Result<pb::ClusterResponse, CommandError> {
            flaky
                .client
                .write("test.Flaky", &pb::GetClusterRequest {}, "flotilla check")
        };
        // The leader a write was forwarded to died: unknown, retried with the same request
        // id, and answered on the retry.
        let lost = Status::outcome_unknown(Code::Unavailable, "the leader did not answer");
        let flaky = Flaky::start(1, lost.clone());
        assert!(write(&flaky).is_ok());
        assert_eq!(flaky.stop(), 2);

        // Never answered: "outcome unknown", never "failed".
        let flaky = Flaky::start(u32::MAX, lost);
        match write(&flaky) {
            Err(CommandError::OutcomeUnknown(message)) => {
                assert!(message.starts_with("outcome unknown"), "{message}");
                assert!(message.contains("flotilla check"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(flaky.stop(), UNKNOWN_OUTCOME_RETRIES_MAX + 1);

        // A definitive refusal is reported at once, as a failure.
        let flaky = Flaky::start(u32::MAX, Status::new(Code::Aborted, "version conflict"));
        assert!(matches!(write(&flaky), Err(CommandError::Failed(_))));
        assert_eq!(flaky.stop(), 1);

        // Nothing listens: the write was never sent, so it failed.
        let flaky = Flaky::start(0, Status::internal("unused"));
        let client = Client {
            transport: Transport::start(TransportConfig::default()).expect("transport"),
            tls: flaky.client.tls.clone(),
            addr: {
                let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                probe.local_addr().expect("addr").to_string()
            },
            root: flaky.client.root.clone(),
            format: Format::Table,
            requests: RequestIds::new(),
            self_node_id: None,
        };
        let never_sent: Result<pb::ClusterResponse, CommandError> =
            client.write("test.Flaky", &pb::GetClusterRequest {}, "flotilla check");
        assert!(
            matches!(never_sent, Err(CommandError::Failed(_))),
            "{never_sent:?}"
        );
        client.transport.shutdown();
        flaky.stop();
    }

    /// A write without a request id (`manager rm`) is repeated while nothing was done,
    /// never after an unknown outcome, which it reports as such.
    #[test]
    fn a_write_without_a_request_id_is_never_repeated_after_an_unknown_outcome() {
        let write = |flaky: &Flaky| -> Result<pb::ClusterResponse, CommandError> {
            flaky.client.write_without_request_id(
                "test.Flaky",
                &pb::GetClusterRequest {},
                "flotilla manager ls",
            )
        };
        let lost = Status::outcome_unknown(Code::Unavailable, "the leader did not answer");
        let flaky = Flaky::start(1, lost);
        match write(&flaky) {
            Err(CommandError::OutcomeUnknown(message)) => {
                assert!(message.contains("flotilla manager ls"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(flaky.stop(), 1, "an unknown outcome was repeated");

        let soon = Status::retry_soon(Code::Unavailable, "an election; retry in a moment");
        let flaky = Flaky::start(2, soon);
        assert!(write(&flaky).is_ok());
        assert_eq!(flaky.stop(), 3, "a refusal that did nothing is retried");
    }

    #[test]
    fn each_write_of_an_invocation_has_its_own_number_under_one_client_id() {
        let ids = RequestIds::new();
        let (first, second) = (ids.next(), ids.next());
        assert_eq!(first.client_id, second.client_id);
        assert_eq!(first.client_id.len(), CLIENT_ID_BYTES);
        assert_eq!((first.seq, second.seq), (1, 2));
        assert_ne!(RequestIds::new().next().client_id, first.client_id);
    }
}
