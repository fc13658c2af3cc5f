//! TEMPORARY stub: the identity types the transport needs, until the `ca` branch lands.

/// A node's role in the cluster (the certificate's OU).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// A manager.
    Manager,
    /// A worker.
    Worker,
}

/// The verified identity of a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// CN.
    pub node_id: String,
    /// OU.
    pub role: Role,
    /// O.
    pub cluster_id: String,
}

impl PeerIdentity {
    /// Stub.
    pub fn from_cert_der(_der: &[u8]) -> Result<Self, String> {
        Err("stub".into())
    }
}
