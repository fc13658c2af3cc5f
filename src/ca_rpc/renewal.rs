//! The `ca-renewer` thread: renews this node's certificate at a random point between 50 %
//! and 80 % of its lifetime, authenticated by the current certificate, saves the new
//! identity atomically and hands it to the caller (who rebuilds its TLS configs).
//!
//! On failure it retries with exponential backoff until the certificate expires; after that
//! only a new join can help (an expired certificate cannot open mutual TLS), which it logs
//! as an error saying so. Must never block its caller: all waiting happens on its own
//! thread, and [`Renewer::stop`] interrupts any wait.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use crossbeam_channel::{Receiver, Sender};

use super::renew_certificate;
use crate::ca::{NodeIdentity, RootCert, save_node_files, tls};
use crate::net::Transport;

/// Tunables of the renewer.
#[derive(Clone, Debug)]
pub struct RenewerConfig {
    /// First wait after a failed renewal (default 5 s); doubles per failure.
    pub retry_initial: Duration,
    /// Longest wait between attempts (default 5 min).
    pub retry_max: Duration,
    /// Deadline of one renewal call (default 10 s).
    pub call_timeout: Duration,
}

impl Default for RenewerConfig {
    fn default() -> Self {
        Self {
            retry_initial: Duration::from_secs(5),
            retry_max: Duration::from_secs(300),
            call_timeout: Duration::from_secs(10),
        }
    }
}

/// What the renewer needs to run.
pub struct RenewerSetup {
    /// The transport to call managers on.
    pub transport: Arc<Transport>,
    /// Manager addresses (`host:port`), tried in turn after failures.
    pub managers: Vec<String>,
    /// Where [`save_node_files`] writes the renewed identity.
    pub state_dir: PathBuf,
    /// The identity to renew.
    pub identity: NodeIdentity,
    /// The cluster root.
    pub root: RootCert,
}

/// A running `ca-renewer` thread.
pub struct Renewer {
    stop: Option<Sender<()>>,
    /// Asks for a renewal now ([`Renewer::renew_now`]); one waiting request is enough.
    now: Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl Renewer {
    /// Starts the thread. `on_renewed` runs on it after each renewal has been saved.
    ///
    /// # Errors
    /// The OS error if the thread cannot be spawned.
    ///
    /// # Panics
    /// If `setup.managers` is empty (nobody to renew with).
    pub fn start(
        setup: RenewerSetup,
        config: RenewerConfig,
        on_renewed: impl FnMut(&NodeIdentity) + Send + 'static,
    ) -> std::io::Result<Self> {
        assert!(
            !setup.managers.is_empty(),
            "the renewer needs at least one manager address"
        );
        let (stop, stop_rx) = crossbeam_channel::bounded(0);
        let (now, now_rx) = crossbeam_channel::bounded(1);
        let wake = Wake {
            stop: stop_rx,
            now: now_rx,
        };
        let thread = std::thread::Builder::new()
            .name("ca-renewer".into())
            .spawn(move || run(setup, &config, &wake, on_renewed))?;
        Ok(Self {
            stop: Some(stop),
            now,
            thread: Some(thread),
        })
    }

    /// Renews at once instead of at the scheduled time: the cluster gives this node another
    /// role (a promotion, a completed demotion), and the renewed certificate carries it.
    /// Does nothing if a request is already waiting.
    pub fn renew_now(&self) {
        let _ = self.now.try_send(());
    }

    /// Stops the thread (interrupting any wait or retry) and joins it.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            log::error!("the ca-renewer thread panicked");
        }
    }
}

impl Drop for Renewer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// What wakes the renewer before its time.
struct Wake {
    /// Closed to stop.
    stop: Receiver<()>,
    /// A renewal is wanted now.
    now: Receiver<()>,
}

/// Sleeps until `at` or a request to renew now; false if told to stop first.
fn sleep_until(at: SystemTime, wake: &Wake) -> bool {
    let wait = at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    crossbeam_channel::select! {
        recv(wake.stop) -> _ => false,
        recv(wake.now) -> _ => true,
        default(wait) => true,
    }
}

fn run(
    mut setup: RenewerSetup,
    config: &RenewerConfig,
    wake: &Wake,
    mut on_renewed: impl FnMut(&NodeIdentity),
) {
    let mut rng = rand::rng();
    let mut next_attempt = setup.identity.renewal_at(&mut rng);
    let mut failures: u32 = 0;
    let mut mtls = None;
    loop {
        if !sleep_until(next_attempt, wake) {
            return;
        }
        let manager = &setup.managers[failures as usize % setup.managers.len()];
        match renew_once(&setup, &mut mtls, manager, config.call_timeout) {
            Ok(renewed) => {
                log::info!(
                    "ca: renewed certificate of {} ({}) with {manager}; valid until {:?}",
                    renewed.node_id(),
                    renewed.role(),
                    renewed.not_after()
                );
                on_renewed(&renewed);
                setup.identity = renewed;
                mtls = None;
                next_attempt = setup.identity.renewal_at(&mut rng);
                failures = 0;
            }
            Err(reason) => {
                failures = failures.saturating_add(1);
                let delay = retry_delay(config, failures);
                if setup.identity.is_valid_at(SystemTime::now()) {
                    log::warn!(
                        "ca: renewal with {manager} failed ({reason}); retrying in {} s",
                        delay.as_secs()
                    );
                } else {
                    log::error!(
                        "ca: the certificate of {} has expired and renewal failed ({reason}); \
                         the node must join again with a token",
                        setup.identity.node_id()
                    );
                }
                next_attempt = SystemTime::now() + delay;
            }
        }
    }
}

fn retry_delay(config: &RenewerConfig, failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    config
        .retry_initial
        .saturating_mul(1 << exponent)
        .min(config.retry_max)
}

fn renew_once(
    setup: &RenewerSetup,
    mtls: &mut Option<Arc<rustls::ClientConfig>>,
    manager: &str,
    call_timeout: Duration,
) -> Result<NodeIdentity, String> {
    // One client config per identity: the transport keeps a channel per config, so building
    // it anew on every retry would pile up channels.
    let mtls = match mtls {
        Some(config) => config.clone(),
        None => {
            let config = Arc::new(
                tls::client_config(&setup.identity, &setup.root).map_err(|e| e.to_string())?,
            );
            mtls.insert(config).clone()
        }
    };
    let channel = setup.transport.channel(manager, &mtls);
    let renewed = renew_certificate(&channel, &setup.identity, &setup.root, call_timeout)
        .map_err(|e| e.to_string())?;
    save_node_files(&setup.state_dir, &renewed, &setup.root)
        .map_err(|e| format!("cannot save the renewed certificate: {e}"))?;
    Ok(renewed)
}
