//! A running manager process: the transport and its listener, the CA service (on managers
//! holding the root key), the certificate renewer, and (with the Raft issues) the Raft node.
//!
//! Owns the start order and the shutdown barrier. Must never acknowledge anything itself:
//! it only wires components together and stops them in the documented order.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use super::state_dir::{Settings, StateDir, StateDirError};
use crate::ca::renewal::{Renewer, RenewerConfig, RenewerSetup};
use crate::ca::{
    CaError, CaPolicy, CaService, ClusterCa, FailureLimits, NodeIdentity, RootCert, StorageError,
    load_node_files, tls,
};
use crate::net::{Router, ServicePool, Transport, TransportConfig};

/// Threads serving the CA's methods (joins and renewals are rare and cheap).
pub const CA_POOL_THREADS: usize = 2;
/// Queued CA calls before new ones are refused with `ResourceExhausted`.
pub const CA_POOL_QUEUE_LEN_MAX: usize = 256;

/// Why a manager could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The state directory was never initialized.
    #[error(
        "{0} holds no flotilla node; create one with `flotilla init` or `flotilla join`, or \
         use `flotilla up`"
    )]
    NotInitialized(String),
    /// The settings or tokens could not be read.
    #[error(transparent)]
    StateDir(#[from] StateDirError),
    /// The identity files could not be read.
    #[error(transparent)]
    Identity(#[from] StorageError),
    /// The CA key bundle could not be read.
    #[error("cannot load the cluster CA: {0}")]
    Ca(#[from] CaError),
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// A socket or thread could not be set up.
    #[error("{what}: {source}")]
    Io {
        /// What was being set up.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StartError {
    let what = what.into();
    move |source| StartError::Io { what, source }
}

/// A running manager. Stop it with [`Manager::shutdown`].
pub struct Manager {
    settings: Settings,
    identity: NodeIdentity,
    listen_addr: SocketAddr,
    transport: Arc<Transport>,
    renewer: Option<Renewer>,
    pools: Vec<ServicePool>,
}

impl Manager {
    /// Starts the manager whose state is in `dir`.
    ///
    /// # Errors
    /// [`StartError`]: an uninitialized or unreadable directory, an address in use, …
    pub fn start(dir: &StateDir) -> Result<Manager, StartError> {
        if !dir.is_initialized() {
            return Err(StartError::NotInitialized(dir.root().display().to_string()));
        }
        let settings = dir.load_settings()?;
        let (identity, root) = load_node_files(&dir.node_dir())?;
        let transport = Arc::new(
            Transport::start(TransportConfig::default())
                .map_err(io_error("cannot start the transport"))?,
        );
        let ca_pool = ServicePool::new("ca", CA_POOL_THREADS, CA_POOL_QUEUE_LEN_MAX)
            .map_err(io_error("cannot start the CA service threads"))?;
        let mut router = Router::new();
        if dir.ca_file().exists() {
            let ca = ClusterCa::load(&dir.ca_file(), CaPolicy::default())?;
            let tokens = dir.load_tokens()?;
            let service = Arc::new(CaService::new(ca, tokens, FailureLimits::default()));
            crate::ca::rpc::register(&mut router, &ca_pool, &service);
        }
        let listen_addr = resolve(&settings.listen_addr)?;
        let server_tls = Arc::new(tls::server_config(&identity, &root)?);
        let listen_addr = transport
            .listen(listen_addr, server_tls, Arc::new(router))
            .map_err(io_error(format!(
                "cannot listen on {}",
                settings.listen_addr
            )))?;
        log::info!(
            "manager {} (raft id {:x}) listening on {listen_addr}",
            identity.node_id(),
            settings.raft_id
        );
        let renewer = start_renewer(dir, &settings, &transport, &identity, &root)?;
        Ok(Manager {
            settings,
            identity,
            listen_addr,
            transport,
            renewer: Some(renewer),
            pools: vec![ca_pool],
        })
    }

    /// The address the listener is bound to.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    /// This manager's settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// This manager's node identity (as loaded at start).
    pub fn identity(&self) -> &NodeIdentity {
        &self.identity
    }

    /// The shutdown barrier, in order: the renewer (it calls through the transport), the
    /// transport (in-flight calls fail `Unavailable`, connections close, the reactor is
    /// joined), then the service pools (queued calls drain, threads are joined).
    pub fn shutdown(mut self) {
        if let Some(renewer) = self.renewer.take() {
            renewer.stop();
        }
        self.transport.shutdown();
        for pool in self.pools.drain(..) {
            pool.shutdown();
        }
        log::info!("manager {} stopped", self.identity.node_id());
    }
}

fn resolve(addr: &str) -> Result<SocketAddr, StartError> {
    addr.to_socket_addrs()
        .map_err(io_error(format!("cannot resolve {addr}")))?
        .next()
        .ok_or_else(|| StartError::Io {
            what: format!("{addr} resolves to no address"),
            source: std::io::Error::from(std::io::ErrorKind::AddrNotAvailable),
        })
}

fn start_renewer(
    dir: &StateDir,
    settings: &Settings,
    transport: &Arc<Transport>,
    identity: &NodeIdentity,
    root: &RootCert,
) -> Result<Renewer, StartError> {
    let setup = RenewerSetup {
        transport: transport.clone(),
        managers: vec![settings.advertise_addr.clone()],
        state_dir: dir.node_dir(),
        identity: identity.clone(),
        root: root.clone(),
    };
    Renewer::start(setup, RenewerConfig::default(), |renewed| {
        log::info!("certificate renewed; valid until {:?}", renewed.not_after());
    })
    .map_err(io_error("cannot start the certificate renewer"))
}
