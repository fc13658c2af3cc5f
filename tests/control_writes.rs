//! A control write holds no thread while it waits for its commit, and is answered by its
//! deadline at the latest. With both followers of a 3-manager cluster stopped (SIGSTOP),
//! nothing can commit; the leader is sent twice as many writes as it has control pool
//! threads, and must still answer another control call while every one of them is pending.
//! Then every write gets the managers' answer, "outcome unknown", at their deadline (never
//! the client's own, which is far later).
#![allow(clippy::unwrap_used, missing_docs)]

mod procs;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use flotilla::ca::{load_node_files, tls};
use flotilla::control as api;
use flotilla::net::{CallOptions, Transport, TransportConfig};
use flotilla::proto::control as pb;
use flotilla::proto::control::rpc;
use flotilla::proto::objects::{ServiceMode, ServiceSpec, TaskSpec};
use flotilla::wire::{Code, Reason, Status};
use procs::Proc;
use procs::cluster::{Cluster, ClusterOptions};

/// Writes sent while nothing can commit: twice the pool's threads, so that a pool whose
/// threads waited for their writes would have none left.
const PENDING_WRITES: usize = 2 * api::CONTROL_POOL_THREADS;
/// The client's deadline for each write: far beyond the managers' own.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Long enough for the writes to reach the leader before the other call is made (a wait,
/// not an assertion: if they arrive later the test checks less, never wrongly).
const WRITES_ARRIVE: Duration = Duration::from_secs(1);

/// Resumes a stopped manager, also when the test fails midway.
struct Resume<'a>(&'a Proc);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        self.0.signal(libc::SIGCONT);
    }
}

fn spec(name: &str) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        mode: ServiceMode::Replicated as i32,
        replicas: 0,
        task: Some(TaskSpec {
            command: "sleep".into(),
            args: vec!["60".into()],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A client-side deadline: the managers never answered.
fn unanswered(status: &Status) -> bool {
    status.code == Code::DeadlineExceeded && status.reason == Reason::Unspecified
}

#[test]
fn pending_writes_leave_the_control_pool_free_and_are_answered_at_their_deadline() {
    let cluster = Cluster::start(3, ClusterOptions::default());
    let leader = cluster.leader_index(&cluster.client()).expect("a leader");
    let (identity, root) =
        load_node_files(&cluster.tmp.path().join("client-identity")).expect("the identity");
    let tls = Arc::new(tls::client_config(&identity, &root).unwrap());
    let transport = Arc::new(Transport::start(TransportConfig::default()).unwrap());
    let leader_addr = cluster.managers[leader].addr.clone();

    let resumes: Vec<Resume<'_>> = cluster
        .managers
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, manager)| {
            let proc = manager.proc.as_ref().expect("running");
            proc.signal(libc::SIGSTOP);
            Resume(proc)
        })
        .collect();

    let finished = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..PENDING_WRITES)
        .map(|i| {
            let (transport, tls, addr) = (transport.clone(), tls.clone(), leader_addr.clone());
            let finished = finished.clone();
            std::thread::spawn(move || {
                let reply: Result<pb::ServiceResponse, Status> =
                    transport.channel(&addr, &tls).call(
                        rpc::CREATE_SERVICE,
                        &pb::CreateServiceRequest {
                            spec: Some(spec(&format!("pending-{i}"))),
                            id: String::new(),
                            request_id: None,
                        },
                        CallOptions::timeout(WRITE_TIMEOUT),
                    );
                finished.fetch_add(1, Ordering::SeqCst);
                reply
            })
        })
        .collect();
    std::thread::sleep(WRITES_ARRIVE);

    // Served on the control pool: answered (the group's status, or "no leader" if the
    // leader already stepped down for want of a quorum) while every write still waits.
    let other: Result<pb::ManagersResponse, Status> = transport.channel(&leader_addr, &tls).call(
        rpc::LIST_MANAGERS,
        &pb::ListManagersRequest {},
        CallOptions::timeout(WRITE_TIMEOUT),
    );
    let pending_then = PENDING_WRITES - finished.load(Ordering::SeqCst);
    if let Err(status) = &other {
        assert!(
            !unanswered(status),
            "the other call was not answered: {status}"
        );
    }
    assert_eq!(
        pending_then, PENDING_WRITES,
        "the other call was answered only after writes finished: writes held the pool's threads"
    );

    for writer in writers {
        let reply = writer.join().expect("the writer thread");
        let status = reply.expect_err("nothing can commit while the followers are stopped");
        assert!(!unanswered(&status), "a write was never answered: {status}");
        assert_eq!(status.reason, Reason::OutcomeUnknown, "{status}");
    }
    drop(resumes);
    transport.shutdown();
}
