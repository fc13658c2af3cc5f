//! `control.ServiceLogs`: a service's (or a task's) output lines, gathered from the agents
//! by the leader (swarmkit's log broker) and streamed to the caller.
//!
//! ```text
//!  CLI ──ServiceLogs──► follower ──ServiceLogs (relayed, its own identity)──► leader
//!                                                                               │
//!   the leader: LogSubscription{id, task ids} in each node's dispatcher session ─┤
//!   agents ──dispatcher.PublishLogs──► LogSource (the dispatcher) ──► queue ──► `flotilla-logs`
//!                                                     thread: names, node, stream ──► caller
//! ```
//!
//! - Served by the leader, which alone holds the agents' sessions; a follower relays the
//!   leader's stream (a thread of its own, counted with the watches).
//! - The leader sends one subscription per node holding tasks of the service (the task ids
//!   it has there). Without `follow` the call ends when every node answered, or after
//!   [`LOGS_ANSWER_WAIT`] with a warning naming the nodes that did not (a node without a
//!   session is named at once). With `follow` it looks for new tasks every
//!   [`FOLLOW_RESCAN_PERIOD`] and sends their ids (the same subscription) to their node;
//!   it ends when the caller leaves.
//! - Bounded memory: the queue between the publishers and the stream holds at most
//!   [`LOG_QUEUE_BATCHES_MAX`] batches (each ≤ 1 MiB, the agents' bound); a batch that
//!   finds it full is dropped and counted, and the caller gets a warning with the count
//!   (the stream itself applies flow control to this thread, never to the publishers).
//!
//! Must never block a publisher (the agents' `PublishLogs` calls) on a caller, nor keep a
//! subscription after its stream ended.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use parking_lot::Mutex;

use super::ControlApi;
use super::reads::{resolve_service, resolve_task};
use crate::net::{CallOptions, Router, ServerStream, ServicePool};
use crate::proto::control as pb;
use crate::proto::dispatcher::{LogLine, LogSubscription};
use crate::proto::objects::{Node, Service, ServiceMode, Task};
use crate::wire::{Code, Status};

/// How long a call without `follow` waits for every node's lines.
pub const LOGS_ANSWER_WAIT: Duration = Duration::from_secs(10);
/// How often a followed service's new tasks are looked for.
pub const FOLLOW_RESCAN_PERIOD: Duration = Duration::from_secs(1);
/// Batches of lines waiting for one caller's stream (each at most 1 MiB).
pub const LOG_QUEUE_BATCHES_MAX: usize = 16;
/// How often a log thread with nothing to send checks whether it should stop.
pub const LOG_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Entries per message to the caller.
pub const LOG_ENTRIES_PER_MESSAGE_MAX: usize = 512;
/// Characters of a task id in a task's log name (`<service>.<slot>.<prefix>`).
pub const TASK_ID_PREFIX_CHARS: usize = 10;

/// Lines one node published for a subscription.
pub struct LogBatch {
    /// The publishing node.
    pub node_id: String,
    /// Its lines.
    pub lines: Vec<LogLine>,
}

/// What a subscription's publishers leave beside the lines (never dropped).
#[derive(Default)]
pub struct LogFeedState {
    /// Lines dropped because the queue was full.
    pub dropped_lines: AtomicU64,
    /// Nodes that sent everything they will send.
    pub closed: Mutex<HashSet<String>>,
    /// Task ids a node said it has no log of.
    pub missing: Mutex<Vec<String>>,
}

/// One open subscription, as the leader's log thread reads it.
pub struct LogFeed {
    /// The subscription id the agents publish under.
    pub id: String,
    /// Lines, in the order they were published.
    pub batches: Receiver<LogBatch>,
    /// Counts, closes, missing tasks.
    pub state: Arc<LogFeedState>,
}

/// Where the leader's subscriptions go and lines come from: the dispatcher, which holds the
/// agents' sessions and serves `dispatcher.PublishLogs`.
pub trait LogSource: Send + Sync {
    /// Opens a subscription (its queue holds [`LOG_QUEUE_BATCHES_MAX`] batches).
    fn open_logs(&self) -> LogFeed;
    /// Sends `subscription` in `node_id`'s session now; false if the node has no session
    /// streaming or no room for it.
    fn send_log_subscription(&self, node_id: &str, subscription: &LogSubscription) -> bool;
    /// Forgets subscription `id` (its publishers are answered `NotFound`).
    fn close_logs(&self, id: &str);
}

/// What the call asks for, resolved against the store.
struct Selection {
    /// The service whose tasks are wanted (a followed service's new tasks join).
    service_id: String,
    /// `Some`: this one task only.
    task_id: Option<String>,
}

/// The tasks the selection names now, by node.
fn tasks_by_node(api: &ControlApi, selection: &Selection) -> BTreeMap<String, Vec<Arc<Task>>> {
    let tasks: Vec<Arc<Task>> = api.store.view(|view| {
        view.tasks_by_service(&selection.service_id)
            .filter(|t| selection.task_id.as_ref().is_none_or(|id| &t.id == id))
            .filter(|t| !t.node_id.is_empty())
            .cloned()
            .collect()
    });
    let mut by_node: BTreeMap<String, Vec<Arc<Task>>> = BTreeMap::new();
    for task in tasks {
        by_node.entry(task.node_id.clone()).or_default().push(task);
    }
    by_node
}

/// The name a line is tagged with: `<service>.<slot>.<id prefix>` (`<service>.<node id
/// prefix>.<id prefix>` for a global service's task).
fn task_name(service: &Service, task: &Task) -> String {
    let name = service.spec.as_ref().map_or("", |s| s.name.as_str());
    let global = service
        .spec
        .as_ref()
        .is_some_and(|s| s.mode == ServiceMode::Global as i32);
    let prefix = |id: &str| id.chars().take(TASK_ID_PREFIX_CHARS).collect::<String>();
    let middle = if global {
        prefix(&task.node_id)
    } else {
        task.slot.to_string()
    };
    format!("{name}.{middle}.{}", prefix(&task.id))
}

fn hostname(node: Option<&Node>, node_id: &str) -> String {
    node.and_then(|n| n.spec.as_ref())
        .map(|s| s.hostname.clone())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| node_id.to_string())
}

/// Names and hostnames of the tasks lines come from (read once per task).
#[derive(Default)]
struct Labels {
    tasks: HashMap<String, (String, String)>,
}

impl Labels {
    fn of(&mut self, api: &ControlApi, task_id: &str, node_id: &str) -> (String, String) {
        if let Some(found) = self.tasks.get(task_id) {
            return found.clone();
        }
        let found = api.store.view(|view| {
            let task = view.get::<Task>(task_id).cloned();
            let service = task
                .as_ref()
                .and_then(|t| view.get::<Service>(&t.service_id).cloned());
            let name = match (&task, &service) {
                (Some(task), Some(service)) => task_name(service, task),
                _ => task_id.to_string(),
            };
            (
                name,
                hostname(view.get::<Node>(node_id).map(|n| &**n), node_id),
            )
        });
        self.tasks.insert(task_id.to_string(), found.clone());
        found
    }
}

/// One caller's subscription on the leader.
struct Relay {
    api: Arc<ControlApi>,
    source: Arc<dyn LogSource>,
    feed: LogFeed,
    selection: Selection,
    request: pb::ServiceLogsRequest,
    /// Task ids sent, and the nodes they were sent to.
    sent_tasks: HashSet<String>,
    /// Nodes asked (and not told they have no session).
    asked: BTreeSet<String>,
    /// Nodes the caller was warned about (once each).
    warned: BTreeSet<String>,
    labels: Labels,
}

impl Relay {
    fn subscription(&self, task_ids: Vec<String>) -> LogSubscription {
        LogSubscription {
            id: self.feed.id.clone(),
            task_ids,
            follow: self.request.follow,
            since_unix_ms: self.request.since_unix_ms,
            tail: self.request.tail,
            close: false,
        }
    }

    /// Sends the tasks not yet asked for to their nodes; the warnings for nodes it could not
    /// reach (their tasks are asked for again at the next look).
    fn ask_new_tasks(&mut self) -> Vec<String> {
        let mut warnings = Vec::new();
        for (node_id, tasks) in tasks_by_node(&self.api, &self.selection) {
            let new: Vec<String> = tasks
                .iter()
                .map(|t| t.id.clone())
                .filter(|id| !self.sent_tasks.contains(id))
                .collect();
            if new.is_empty() {
                continue;
            }
            let subscription = self.subscription(new.clone());
            let sent = self.source.send_log_subscription(&node_id, &subscription);
            if sent {
                self.asked.insert(node_id);
            } else if self.warned.insert(node_id.clone()) {
                let host = self
                    .api
                    .store
                    .view(|view| hostname(view.get::<Node>(&node_id).map(|n| &**n), &node_id));
                warnings.push(format!(
                    "node {host} ({node_id}) did not answer: it has no session with the leader \
                     (down?); its tasks' lines are missing"
                ));
            }
            // A call without `follow` asks once: it does not wait for a node without a
            // session. A followed one asks again at the next look.
            if sent || !self.request.follow {
                self.sent_tasks.extend(new);
            }
        }
        warnings
    }

    fn entries(&mut self, batch: LogBatch) -> Vec<pb::LogEntry> {
        batch
            .lines
            .into_iter()
            .map(|line| {
                let (task_name, node) = self.labels.of(&self.api, &line.task_id, &batch.node_id);
                pb::LogEntry {
                    task_name,
                    task_id: line.task_id,
                    node,
                    time_unix_ms: line.time_unix_ms,
                    stderr: line.stderr,
                    data: line.data,
                }
            })
            .collect()
    }

    fn pending_warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let dropped = self.feed.state.dropped_lines.swap(0, Ordering::AcqRel);
        if dropped > 0 {
            warnings.push(format!(
                "{dropped} lines dropped: the reader was too slow for the tasks' output"
            ));
        }
        for task in std::mem::take(&mut *self.feed.state.missing.lock()) {
            warnings.push(format!(
                "task {task}: its node holds no log of it (removed?)"
            ));
        }
        warnings
    }

    /// Every asked node sent all it will send (for a call without `follow`).
    fn all_answered(&self) -> bool {
        let closed = self.feed.state.closed.lock();
        self.asked.iter().all(|node| closed.contains(node))
    }

    fn unanswered(&self) -> Vec<String> {
        let closed = self.feed.state.closed.lock();
        self.asked
            .iter()
            .filter(|node| !closed.contains(*node))
            .map(|node_id| {
                self.api
                    .store
                    .view(|view| hostname(view.get::<Node>(node_id).map(|n| &**n), node_id))
            })
            .collect()
    }

    /// Relays until done; the error the caller must see, if any.
    fn run(
        &mut self,
        stream: &ServerStream<pb::ServiceLogsMessage>,
        stopping: &AtomicBool,
    ) -> Option<Status> {
        let warnings = self.ask_new_tasks();
        if send(stream, Vec::new(), warnings).is_err() {
            return None;
        }
        let started = Instant::now();
        let mut rescanned = Instant::now();
        loop {
            if stopping.load(Ordering::SeqCst) {
                return Some(Status::unavailable("the manager is shutting down"));
            }
            if stream.is_cancelled() {
                return None;
            }
            let mut entries = Vec::new();
            match self.feed.batches.recv_timeout(LOG_POLL_INTERVAL) {
                Ok(batch) => entries.extend(self.entries(batch)),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return None,
            }
            while entries.len() < LOG_ENTRIES_PER_MESSAGE_MAX
                && let Ok(batch) = self.feed.batches.try_recv()
            {
                entries.extend(self.entries(batch));
            }
            let mut warnings = self.pending_warnings();
            if self.request.follow && rescanned.elapsed() >= FOLLOW_RESCAN_PERIOD {
                rescanned = Instant::now();
                warnings.extend(self.ask_new_tasks());
            }
            let drained = self.feed.batches.is_empty();
            let done = !self.request.follow && drained && self.all_answered();
            let timed_out =
                !self.request.follow && drained && started.elapsed() >= LOGS_ANSWER_WAIT;
            if timed_out && !done {
                for host in self.unanswered() {
                    warnings.push(format!(
                        "node {host} did not answer within {LOGS_ANSWER_WAIT:?}; its tasks' \
                         lines are missing"
                    ));
                }
            }
            if send(stream, entries, warnings).is_err() {
                return None;
            }
            if done || timed_out {
                return None;
            }
        }
    }
}

/// Sends `entries` (in messages of at most [`LOG_ENTRIES_PER_MESSAGE_MAX`]) and `warnings`.
fn send(
    stream: &ServerStream<pb::ServiceLogsMessage>,
    mut entries: Vec<pb::LogEntry>,
    warnings: Vec<String>,
) -> Result<(), Status> {
    if !warnings.is_empty() {
        stream.send(&pb::ServiceLogsMessage {
            entries: Vec::new(),
            warnings,
        })?;
    }
    while !entries.is_empty() {
        let rest = entries.split_off(entries.len().min(LOG_ENTRIES_PER_MESSAGE_MAX));
        stream.send(&pb::ServiceLogsMessage {
            entries,
            warnings: Vec::new(),
        })?;
        entries = rest;
    }
    Ok(())
}

/// Resolves the reference: a service first (id, name, unique prefix), then a task.
fn select(api: &ControlApi, reference: &str) -> Result<Selection, Status> {
    api.store
        .view(|view| match resolve_service(view, reference) {
            Ok(service) => Ok(Selection {
                service_id: service.id.clone(),
                task_id: None,
            }),
            Err(status) if status.code == Code::NotFound => match resolve_task(view, reference) {
                Ok(task) => Ok(Selection {
                    service_id: task.service_id.clone(),
                    task_id: Some(task.id.clone()),
                }),
                Err(task_status) if task_status.code == Code::NotFound => {
                    Err(Status::not_found(format!(
                        "no service or task {reference:?}; `flotilla service ls` lists the \
                     services, `flotilla service ps SERVICE` their tasks"
                    )))
                }
                Err(task_status) => Err(task_status),
            },
            Err(status) => Err(status),
        })
}

/// Starts `thread` for one call, counted and joined with the watch threads.
fn spawn_counted(
    api: &ControlApi,
    body: impl FnOnce(&AtomicBool) + Send + 'static,
) -> Result<(), Status> {
    let mut threads = api.watches.lock();
    threads.prune();
    if threads.threads.len() >= super::watch::WATCHES_MAX {
        return Err(Status::resource_exhausted(format!(
            "this manager already serves {} watches and log streams; close some or ask \
             another manager",
            super::watch::WATCHES_MAX
        )));
    }
    let stopping = threads.stopping.clone();
    let thread = std::thread::Builder::new()
        .name("flotilla-logs".into())
        .spawn(move || body(&stopping))
        .map_err(|e| Status::resource_exhausted(format!("cannot start a log thread: {e}")))?;
    threads.threads.push(thread);
    Ok(())
}

/// The leader's side of one call.
fn serve_here(
    api: &Arc<ControlApi>,
    source: &Arc<dyn LogSource>,
    request: pb::ServiceLogsRequest,
    stream: ServerStream<pb::ServiceLogsMessage>,
) -> Result<(), Status> {
    let selection = select(api, &request.reference)?;
    let mut relay = Relay {
        api: api.clone(),
        source: source.clone(),
        feed: source.open_logs(),
        selection,
        request,
        sent_tasks: HashSet::new(),
        asked: BTreeSet::new(),
        warned: BTreeSet::new(),
        labels: Labels::default(),
    };
    let id = relay.feed.id.clone();
    let source = source.clone();
    let started = spawn_counted(api, move |stopping| {
        let outcome = relay.run(&stream, stopping);
        for node_id in &relay.asked {
            let close = LogSubscription {
                id: relay.feed.id.clone(),
                close: true,
                ..Default::default()
            };
            relay.source.send_log_subscription(node_id, &close);
        }
        relay.source.close_logs(&relay.feed.id);
        match outcome {
            Some(status) => stream.fail(status),
            None => stream.finish(),
        }
    });
    if started.is_err() {
        source.close_logs(&id);
    }
    started
}

/// A follower's side: the leader's stream, relayed.
fn relay_from_leader(
    api: &Arc<ControlApi>,
    request: pb::ServiceLogsRequest,
    stream: ServerStream<pb::ServiceLogsMessage>,
) -> Result<(), Status> {
    let leader_addr = api.leader_addr()?;
    let mut upstream = api
        .transport
        .channel(&leader_addr, &api.client_tls)
        .call_server_stream(pb::rpc::SERVICE_LOGS, &request, CallOptions::default())?;
    spawn_counted(api, move |stopping| {
        loop {
            if stopping.load(Ordering::SeqCst) {
                upstream.cancel();
                return stream.fail(Status::unavailable("the manager is shutting down"));
            }
            if stream.is_cancelled() {
                return upstream.cancel();
            }
            match upstream.recv_timeout(LOG_POLL_INTERVAL) {
                Ok(Some(message)) => {
                    if stream.send(&message).is_err() {
                        return upstream.cancel();
                    }
                }
                Ok(None) => return stream.finish(),
                Err(status) if status.code == Code::DeadlineExceeded => {}
                Err(status) => return stream.fail(status),
            }
        }
    })
}

/// Serves `control.ServiceLogs` with the leader's log source.
pub fn register(
    router: &mut Router,
    pool: &ServicePool,
    api: &Arc<ControlApi>,
    source: Arc<dyn LogSource>,
) {
    let a = api.clone();
    router.serve_server_stream(
        pb::rpc::SERVICE_LOGS,
        pool,
        move |_, request: pb::ServiceLogsRequest, stream| {
            if request.reference.is_empty() {
                return Err(Status::invalid_argument(
                    "reference: required: a service's id or name, or a task's id",
                ));
            }
            if a.is_leader() {
                serve_here(&a, &source, request, stream)
            } else {
                relay_from_leader(&a, request, stream)
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::objects::ServiceSpec;

    #[test]
    fn lines_are_named_by_service_slot_and_task_id_prefix() {
        let mut service = Service {
            id: "s1".into(),
            spec: Some(ServiceSpec {
                name: "web".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let task = Task {
            id: "abcdefghijklmnopqrstuvwxy".into(),
            slot: 2,
            node_id: "nodeid1234567890".into(),
            ..Default::default()
        };
        assert_eq!(task_name(&service, &task), "web.2.abcdefghij");
        service.spec.as_mut().expect("spec").mode = ServiceMode::Global as i32;
        assert_eq!(task_name(&service, &task), "web.nodeid1234.abcdefghij");
    }
}
