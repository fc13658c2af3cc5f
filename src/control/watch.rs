//! `control.Watch`: store events streamed to a caller, one thread per watch.
//!
//! The handler subscribes on its pool thread (so a bad request or a compacted version
//! fails the call at once), then moves the subscription and the stream to a dedicated
//! thread that forwards events until the caller leaves, the store drops the watcher
//! (too slow: the caller sees the reason and the version to resume from) or the manager
//! stops. Must never block the store: the store's bounded queue absorbs the difference.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::ControlApi;
use crate::net::{Router, ServerStream, ServicePool};
use crate::proto::control as pb;
use crate::proto::objects::{StoreObject, store_object};
use crate::store::{Action, Kind, WatchError, WatchEvent, WatchFilter, WatchOptions, Watcher};
use crate::wire::Status;

/// Watches one manager serves at once; more are refused with `ResourceExhausted`.
pub const WATCHES_MAX: usize = 1024;
/// How often a watch thread with nothing to send checks whether it should stop.
pub const WATCH_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// The running watch threads (and `control.ServiceLogs` threads) and their stop flag.
#[derive(Default)]
pub struct WatchThreads {
    pub(super) stopping: Arc<AtomicBool>,
    pub(super) threads: Vec<JoinHandle<()>>,
}

impl WatchThreads {
    pub(super) fn prune(&mut self) {
        self.threads.retain(|t| !t.is_finished());
    }

    /// Tells every watch thread to stop and joins them.
    pub fn stop_and_join(self) {
        self.stopping.store(true, Ordering::SeqCst);
        for thread in self.threads {
            if thread.join().is_err() {
                log::error!("a watch thread panicked");
            }
        }
    }
}

fn filter_from_proto(filter: &pb::WatchFilter) -> Result<WatchFilter, Status> {
    let kind = match filter.kind {
        0 => None,
        value => Some(Kind::from_proto(value).ok_or_else(|| {
            Status::invalid_argument(format!("filters.kind: unknown object kind {value}"))
        })?),
    };
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
    Ok(WatchFilter {
        kind,
        id: non_empty(&filter.id),
        node_id: non_empty(&filter.node_id),
        service_id: non_empty(&filter.service_id),
    })
}

fn message_for(event: &crate::store::Event) -> pb::WatchMessage {
    pb::WatchMessage {
        version: event.version,
        action: match event.action {
            Action::Create => pb::WatchAction::Create,
            Action::Update => pb::WatchAction::Update,
            Action::Delete => pb::WatchAction::Delete,
        } as i32,
        object: Some(redacted(event.object.to_store_object())),
        old: event.old.as_ref().map(|o| redacted(o.to_store_object())),
    }
}

/// A watch event never carries the CA key, the secrets key or a secret's (sealed) value.
fn redacted(mut object: StoreObject) -> StoreObject {
    match object.object.as_mut() {
        Some(store_object::Object::Cluster(cluster)) => super::redact_cluster(cluster),
        Some(store_object::Object::Secret(secret)) => super::redact_secret(secret),
        _ => {}
    }
    object
}

/// Forwards events until the stream should end; the error the caller must see, if any.
fn pump(
    watcher: &Watcher,
    stream: &ServerStream<pb::WatchMessage>,
    stopping: &AtomicBool,
) -> Option<Status> {
    loop {
        if stopping.load(Ordering::SeqCst) {
            return Some(Status::unavailable(
                "the manager is shutting down; resume the watch on another manager",
            ));
        }
        if stream.is_cancelled() {
            return None;
        }
        match watcher.recv_timeout(WATCH_POLL_INTERVAL) {
            Ok(WatchEvent::Change(event)) => {
                if stream.send(&message_for(&event)).is_err() {
                    return None;
                }
            }
            // Only a watch that asked for commit markers receives them.
            Ok(WatchEvent::Commit { version }) => {
                let commit = pb::WatchMessage {
                    version,
                    action: pb::WatchAction::Commit as i32,
                    ..Default::default()
                };
                if stream.send(&commit).is_err() {
                    return None;
                }
            }
            Err(WatchError::Timeout) => {}
            Ok(WatchEvent::Dropped(reason)) => {
                let error = WatchError::Dropped(reason);
                return Some(Status::new(error.code(), error.to_string()));
            }
            Err(error) => return Some(Status::new(error.code(), error.to_string())),
        }
    }
}

fn start_watch(
    api: &ControlApi,
    request: &pb::WatchRequest,
    stream: ServerStream<pb::WatchMessage>,
) -> Result<(), Status> {
    let filters = request
        .filters
        .iter()
        .map(filter_from_proto)
        .collect::<Result<Vec<_>, _>>()?;
    let mut options = WatchOptions::filtered(filters);
    options.include_commits = request.include_commits;
    let (start_version, watcher) = if request.resume {
        let watcher = api
            .store
            .watch_since(request.since_version, options)
            .map_err(|e| Status::new(e.code(), e.to_string()))?;
        (request.since_version, watcher)
    } else {
        api.store.view_and_watch(options, |view| view.version())
    };
    let mut threads = api.watches.lock();
    threads.prune();
    if threads.threads.len() >= WATCHES_MAX {
        return Err(Status::resource_exhausted(format!(
            "this manager already serves {WATCHES_MAX} watches; close some or watch another \
             manager"
        )));
    }
    stream.send(&pb::WatchMessage {
        version: start_version,
        action: pb::WatchAction::Start as i32,
        ..Default::default()
    })?;
    let stopping = threads.stopping.clone();
    let thread = std::thread::Builder::new()
        .name("flotilla-watch".into())
        .spawn(move || {
            if let Some(status) = pump(&watcher, &stream, &stopping) {
                log::debug!("watch ends: {status}");
                stream.fail(status);
            }
        })
        .map_err(|e| Status::resource_exhausted(format!("cannot start a watch thread: {e}")))?;
    threads.threads.push(thread);
    Ok(())
}

/// Serves `control.Watch`.
pub(super) fn register(router: &mut Router, pool: &ServicePool, api: &Arc<ControlApi>) {
    let a = api.clone();
    router.serve_server_stream(pb::rpc::WATCH, pool, move |_, request, stream| {
        start_watch(&a, &request, stream)
    });
}
