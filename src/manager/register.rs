//! The `manager-register` thread: a manager that joined asks the leader to add it to the
//! Raft group (`raft.Join`), following the leader a NotLeader refusal names, until it is a member.
//!
//! Owns nothing but its retry loop. Must never propose anything itself: the leader decides.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{RecvTimeoutError, Sender};

use crate::net::{CallOptions, Transport};
use crate::proto::raft::rpc::JOIN;
use crate::proto::raft::{JoinRequest, JoinResponse};
use crate::raft::node::NodeHandle;
use crate::raft::node::service::ADMIN_CALL_TIMEOUT;

/// Wait between attempts.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(500);
/// Redirects followed within one attempt.
pub const REDIRECTS_MAX: usize = 3;

/// The running registration thread.
pub struct Registrar {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Registrar {
    /// Starts asking `join_addr` (then whoever it names as leader) to add `node`.
    ///
    /// # Errors
    /// The OS error if the thread cannot be spawned.
    pub fn start(
        node: NodeHandle,
        transport: Arc<Transport>,
        tls: Arc<rustls::ClientConfig>,
        join_addr: String,
    ) -> std::io::Result<Self> {
        let (stop, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name("manager-register".into())
            .spawn(move || {
                loop {
                    if is_member(&node) {
                        log::info!(
                            "raft {:x}: this manager is a member of the group",
                            node.id()
                        );
                        return;
                    }
                    match ask(&node, &transport, &tls, &join_addr) {
                        Ok(()) => log::info!("raft {:x}: the leader added this manager", node.id()),
                        Err(reason) => log::warn!("joining the raft group: {reason}; retrying"),
                    }
                    match stop_rx.recv_timeout(RETRY_INTERVAL) {
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                }
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops the thread (interrupting its wait) and joins it.
    pub fn stop(mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            log::error!("the manager-register thread panicked");
        }
    }
}

fn is_member(node: &NodeHandle) -> bool {
    node.status(Duration::from_secs(2))
        .is_ok_and(|status| status.members.iter().any(|m| m.id == node.id()))
}

fn ask(
    node: &NodeHandle,
    transport: &Transport,
    tls: &Arc<rustls::ClientConfig>,
    join_addr: &str,
) -> Result<(), String> {
    let request = JoinRequest {
        raft_id: node.id(),
        addr: node.directory_own_addr(),
    };
    let mut target = join_addr.to_string();
    for _ in 0..=REDIRECTS_MAX {
        let result: Result<JoinResponse, _> = transport.channel(&target, tls).call(
            JOIN,
            &request,
            CallOptions::timeout(ADMIN_CALL_TIMEOUT),
        );
        match result {
            Ok(response) => {
                for member in response.members {
                    node.directory().learn(member.raft_id, &member.addr);
                }
                return Ok(());
            }
            Err(status) => match status.leader_hint() {
                Some(leader) if leader != target => target = leader.to_string(),
                _ => return Err(format!("{target}: {status}")),
            },
        }
    }
    Err("too many redirects".into())
}
