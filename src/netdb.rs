//! The node's per-network tables as the rest of the product sees them: the shape of the
//! gossip driver's handle (networkdb), behind a trait, and the endpoint entries written in
//! them.
//!
//! [`NetworkTables`] is what the agent (publishing its running tasks' endpoints), the DNS
//! responder and `network inspect --endpoints` use: join and leave a network, put and delete
//! an entry, read a table. [`LocalTables`] implements it in memory for this node alone: it
//! is what a node runs while no gossip driver is wired in, so each node then sees (and
//! resolves) only the endpoints of its own tasks. The gossip driver implements the same
//! trait; nothing else changes when it is plugged in.
//!
//! [`encode_endpoint`] / [`decode_endpoint`] are the one encoding of an endpoint entry (a
//! protobuf [`Endpoint`], at most [`ENDPOINT_BYTES_MAX`] bytes: the gossip value limit).
//!
//! Must never do IO, spawn threads or block: every method is called from the task runner's
//! thread and the DNS thread, which must not wait on anything.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use parking_lot::Mutex;
use prost::Message;

use crate::proto::objects::Endpoint;

/// The table of every network that holds its running tasks' endpoints (key: task id).
pub const ENDPOINTS_TABLE: &str = "endpoints";
/// The largest encoded endpoint (the gossip layer's value limit).
pub const ENDPOINT_BYTES_MAX: usize = 1024;
/// Networks one node joins at most (the gossip layer's limit).
pub const NETWORKS_JOINED_MAX: usize = 24;
/// Entries [`LocalTables`] holds at most (one per running task and network: a node runs at
/// most 4,096 tasks, each on at most 8 networks).
pub const LOCAL_ENTRIES_MAX: usize = 32_768;

/// Why a table operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TablesError {
    /// Join the network first.
    #[error("this node is not attached to network {0}: join it first")]
    NotAttached(String),
    /// Too many networks joined.
    #[error("this node is attached to {0} networks already, the limit: leave one first")]
    TooManyNetworks(usize),
    /// A name, key or value over its limit.
    #[error("{0} is empty or over its limit")]
    TooLarge(&'static str),
    /// The tables are full.
    #[error("the tables are full ({0} entries); delete entries first")]
    Full(usize),
}

/// The node's per-network tables (networkdb): the gossip driver's handle, or
/// [`LocalTables`]. Every method returns at once (no IO, no waiting).
pub trait NetworkTables: Send + Sync {
    /// Attaches this node to `network` (it then holds the network's tables).
    ///
    /// # Errors
    /// [`TablesError::TooManyNetworks`], or a bad name.
    fn join_network(&self, network: &str) -> Result<(), TablesError>;

    /// Detaches this node from `network`: its tables are dropped here and this node's
    /// entries there removed everywhere.
    fn leave_network(&self, network: &str);

    /// Writes `value` under `key` in `table` of `network`.
    ///
    /// # Errors
    /// Not attached, a field over its limit, or full.
    fn put(&self, network: &str, table: &str, key: &str, value: Bytes) -> Result<(), TablesError>;

    /// Deletes `key` from `table` of `network`.
    ///
    /// # Errors
    /// Not attached, or a field over its limit.
    fn delete(&self, network: &str, table: &str, key: &str) -> Result<(), TablesError>;

    /// The networks this node is attached to.
    fn networks(&self) -> Vec<String>;

    /// The visible entries of `table` in `network` (key, value), as this node sees them.
    fn entries(&self, network: &str, table: &str) -> Vec<(String, Bytes)>;

    /// A number that changes whenever an entry this node sees changes (caches compare it).
    fn generation(&self) -> u64;
}

/// [`NetworkTables`] for this node alone, in memory (see the module documentation).
#[derive(Debug, Default)]
pub struct LocalTables {
    inner: Mutex<Local>,
}

#[derive(Debug, Default)]
struct Local {
    networks: BTreeSet<String>,
    /// (network, table, key) → value.
    entries: BTreeMap<(String, String, String), Bytes>,
    generation: u64,
}

impl LocalTables {
    /// Empty tables, attached to no network.
    pub fn new() -> Self {
        Self::default()
    }
}

fn check_name(what: &'static str, name: &str, bytes_max: usize) -> Result<(), TablesError> {
    if name.is_empty() || name.len() > bytes_max {
        return Err(TablesError::TooLarge(what));
    }
    Ok(())
}

/// The gossip layer's limits on names and keys, kept by [`LocalTables`] as well, so code
/// that works on it works on the gossip driver.
const NETWORK_NAME_BYTES_MAX: usize = 32;
const TABLE_NAME_BYTES_MAX: usize = 32;
const KEY_BYTES_MAX: usize = 128;

impl NetworkTables for LocalTables {
    fn join_network(&self, network: &str) -> Result<(), TablesError> {
        check_name("network name", network, NETWORK_NAME_BYTES_MAX)?;
        let mut inner = self.inner.lock();
        if inner.networks.contains(network) {
            return Ok(());
        }
        if inner.networks.len() >= NETWORKS_JOINED_MAX {
            return Err(TablesError::TooManyNetworks(inner.networks.len()));
        }
        inner.networks.insert(network.to_string());
        Ok(())
    }

    fn leave_network(&self, network: &str) {
        let mut inner = self.inner.lock();
        if !inner.networks.remove(network) {
            return;
        }
        let before = inner.entries.len();
        inner.entries.retain(|(n, _, _), _| n != network);
        if inner.entries.len() != before {
            inner.generation += 1;
        }
    }

    fn put(&self, network: &str, table: &str, key: &str, value: Bytes) -> Result<(), TablesError> {
        check_name("table name", table, TABLE_NAME_BYTES_MAX)?;
        check_name("key", key, KEY_BYTES_MAX)?;
        if value.len() > ENDPOINT_BYTES_MAX {
            return Err(TablesError::TooLarge("value"));
        }
        let mut inner = self.inner.lock();
        if !inner.networks.contains(network) {
            return Err(TablesError::NotAttached(network.to_string()));
        }
        let full_key = (network.to_string(), table.to_string(), key.to_string());
        if !inner.entries.contains_key(&full_key) && inner.entries.len() >= LOCAL_ENTRIES_MAX {
            return Err(TablesError::Full(LOCAL_ENTRIES_MAX));
        }
        inner.entries.insert(full_key, value);
        inner.generation += 1;
        Ok(())
    }

    fn delete(&self, network: &str, table: &str, key: &str) -> Result<(), TablesError> {
        let mut inner = self.inner.lock();
        if !inner.networks.contains(network) {
            return Err(TablesError::NotAttached(network.to_string()));
        }
        let full_key = (network.to_string(), table.to_string(), key.to_string());
        if inner.entries.remove(&full_key).is_some() {
            inner.generation += 1;
        }
        Ok(())
    }

    fn networks(&self) -> Vec<String> {
        self.inner.lock().networks.iter().cloned().collect()
    }

    fn entries(&self, network: &str, table: &str) -> Vec<(String, Bytes)> {
        let inner = self.inner.lock();
        inner
            .entries
            .iter()
            .filter(|((n, t, _), _)| n == network && t == table)
            .map(|((_, _, key), value)| (key.clone(), value.clone()))
            .collect()
    }

    fn generation(&self) -> u64 {
        self.inner.lock().generation
    }
}

/// Why an endpoint entry could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// Larger than [`ENDPOINT_BYTES_MAX`].
    #[error("endpoint entry of {0} bytes, more than {ENDPOINT_BYTES_MAX}")]
    TooLarge(usize),
    /// Not a protobuf `Endpoint`.
    #[error("endpoint entry does not decode: {0}")]
    Malformed(String),
}

/// The entry value of `endpoint`.
///
/// # Errors
/// [`EndpointError::TooLarge`] if it would exceed [`ENDPOINT_BYTES_MAX`] (the spec limits
/// keep every endpoint far below it).
pub fn encode_endpoint(endpoint: &Endpoint) -> Result<Bytes, EndpointError> {
    let len = endpoint.encoded_len();
    if len > ENDPOINT_BYTES_MAX {
        return Err(EndpointError::TooLarge(len));
    }
    Ok(Bytes::from(endpoint.encode_to_vec()))
}

/// The endpoint an entry value holds; its size is checked before it is decoded.
///
/// # Errors
/// [`EndpointError`]: too large or malformed.
pub fn decode_endpoint(value: &[u8]) -> Result<Endpoint, EndpointError> {
    if value.len() > ENDPOINT_BYTES_MAX {
        return Err(EndpointError::TooLarge(value.len()));
    }
    Endpoint::decode(value).map_err(|e| EndpointError::Malformed(e.to_string()))
}

/// The node's tables behind one handle whose implementation can be switched: a node starts
/// with [`LocalTables`] (its DNS responder and endpoint publisher need tables before the
/// gossip driver, which needs the node's identity and transport, can run) and switches to
/// the driver's handle once it runs. The generation moves on at each switch, so caches
/// built on the previous tables are rebuilt.
pub struct TablesSlot {
    /// The tables in use and how many switches came before them, read together so that a
    /// generation is never computed from one with the other's count.
    current: parking_lot::RwLock<InUse>,
}

/// What a [`TablesSlot`] holds.
struct InUse {
    tables: std::sync::Arc<dyn NetworkTables>,
    /// Switches so far (folded into [`NetworkTables::generation`]).
    switches: u64,
}

impl std::fmt::Debug for TablesSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TablesSlot")
            .field("switches", &self.current.read().switches)
            .finish_non_exhaustive()
    }
}

/// How far a switch moves the generation: past anything the tables it replaces reached
/// (2^40 changes).
const TABLES_SWITCH_GENERATION_STEP: u64 = 1 << 40;

impl TablesSlot {
    /// A slot holding `tables`.
    pub fn new(tables: std::sync::Arc<dyn NetworkTables>) -> Self {
        Self {
            current: parking_lot::RwLock::new(InUse {
                tables,
                switches: 0,
            }),
        }
    }

    /// Uses `tables` from now on.
    pub fn replace(&self, tables: std::sync::Arc<dyn NetworkTables>) {
        let mut current = self.current.write();
        current.tables = tables;
        current.switches += 1;
    }

    fn get(&self) -> std::sync::Arc<dyn NetworkTables> {
        self.current.read().tables.clone()
    }
}

impl NetworkTables for TablesSlot {
    fn join_network(&self, network: &str) -> Result<(), TablesError> {
        self.get().join_network(network)
    }

    fn leave_network(&self, network: &str) {
        self.get().leave_network(network);
    }

    fn put(&self, network: &str, table: &str, key: &str, value: Bytes) -> Result<(), TablesError> {
        self.get().put(network, table, key, value)
    }

    fn delete(&self, network: &str, table: &str, key: &str) -> Result<(), TablesError> {
        self.get().delete(network, table, key)
    }

    fn networks(&self) -> Vec<String> {
        self.get().networks()
    }

    fn entries(&self, network: &str, table: &str) -> Vec<(String, Bytes)> {
        self.get().entries(network, table)
    }

    fn generation(&self) -> u64 {
        let current = self.current.read();
        current
            .tables
            .generation()
            .wrapping_add(current.switches.wrapping_mul(TABLES_SWITCH_GENERATION_STEP))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::objects::PortSpec;

    #[test]
    fn a_slot_switches_its_tables_and_moves_its_generation() {
        let slot = TablesSlot::new(std::sync::Arc::new(LocalTables::new()));
        slot.join_network("n1").unwrap();
        slot.put("n1", "endpoints", "k", Bytes::from_static(b"v"))
            .unwrap();
        assert_eq!(slot.entries("n1", "endpoints").len(), 1);
        let before = slot.generation();
        slot.replace(std::sync::Arc::new(LocalTables::new()));
        // The new tables answer from now on (what the old ones held is not carried over).
        assert!(slot.entries("n1", "endpoints").is_empty());
        assert!(slot.networks().is_empty());
        assert!(
            slot.generation() > before,
            "a cache built before must rebuild"
        );
    }

    fn endpoint() -> Endpoint {
        Endpoint {
            service_name: "web".into(),
            task_id: "t".repeat(25),
            slot: 3,
            node_id: "n".repeat(25),
            addr: "10.0.0.7".into(),
            ports: vec![PortSpec {
                name: "http".into(),
                port: 8080,
                protocol: "tcp".into(),
            }],
            network_id: "x".repeat(25),
            network_name: "backend".into(),
        }
    }

    #[test]
    fn an_endpoint_round_trips_and_the_largest_the_specs_allow_fits() {
        let one = endpoint();
        let bytes = encode_endpoint(&one).unwrap();
        assert_eq!(decode_endpoint(&bytes).unwrap(), one);
        // The largest an accepted spec makes: 63-byte names, 8 ports of 15-byte names,
        // a 45-byte IPv6 text address.
        let mut largest = endpoint();
        largest.service_name = "s".repeat(63);
        largest.network_name = "n".repeat(63);
        largest.addr = "f".repeat(45);
        largest.slot = u64::MAX;
        largest.ports = (0..8)
            .map(|i| PortSpec {
                name: format!("{i}{}", "p".repeat(14)),
                port: 65535,
                protocol: "tcp".into(),
            })
            .collect();
        let bytes = encode_endpoint(&largest).unwrap();
        assert!(
            bytes.len() < ENDPOINT_BYTES_MAX / 2,
            "{} bytes",
            bytes.len()
        );
    }

    #[test]
    fn oversized_or_garbage_entries_are_refused() {
        assert!(matches!(
            decode_endpoint(&vec![0u8; ENDPOINT_BYTES_MAX + 1]),
            Err(EndpointError::TooLarge(_))
        ));
        assert!(matches!(
            decode_endpoint(&[0xff, 0xff, 0xff]),
            Err(EndpointError::Malformed(_))
        ));
        let mut huge = endpoint();
        huge.service_name = "s".repeat(2000);
        assert!(matches!(
            encode_endpoint(&huge),
            Err(EndpointError::TooLarge(_))
        ));
    }

    #[test]
    fn local_tables_need_a_join_and_a_leave_drops_the_network() {
        let tables = LocalTables::new();
        let value = Bytes::from_static(b"v");
        assert_eq!(
            tables.put("n1", ENDPOINTS_TABLE, "k", value.clone()),
            Err(TablesError::NotAttached("n1".into()))
        );
        tables.join_network("n1").unwrap();
        let before = tables.generation();
        tables
            .put("n1", ENDPOINTS_TABLE, "k", value.clone())
            .unwrap();
        assert!(tables.generation() > before);
        assert_eq!(
            tables.entries("n1", ENDPOINTS_TABLE),
            vec![("k".to_string(), value)]
        );
        assert!(tables.entries("n1", "other").is_empty());
        tables.delete("n1", ENDPOINTS_TABLE, "k").unwrap();
        assert!(tables.entries("n1", ENDPOINTS_TABLE).is_empty());
        tables
            .put("n1", ENDPOINTS_TABLE, "k", Bytes::from_static(b"w"))
            .unwrap();
        tables.leave_network("n1");
        assert!(tables.networks().is_empty());
        assert!(tables.entries("n1", ENDPOINTS_TABLE).is_empty());
        for i in 0..NETWORKS_JOINED_MAX {
            tables.join_network(&format!("n{i}")).unwrap();
        }
        assert_eq!(
            tables.join_network("one-more"),
            Err(TablesError::TooManyNetworks(NETWORKS_JOINED_MAX))
        );
    }
}
