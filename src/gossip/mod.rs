//! networkdb's core, sans-IO: SWIM membership with suspicion and refutation (memberlist's),
//! per-network tables with Lamport clocks disseminated by transmit-limited gossip, and bulk
//! sync in bounded chunks.
//!
//! [`Gossip`] is a state machine. Its driver feeds it the time ([`Gossip::tick`]), received
//! packets ([`Gossip::receive`]) and bulk-sync chunks ([`Gossip::receive_chunk`]), and local
//! updates (`join`, `leave`, `join_network`, `leave_network`, `put`, `delete`); it takes the
//! packets to send and the events with [`Gossip::poll_output`], and pulls the chunks of each
//! bulk-sync session it opened with [`Gossip::next_chunk`]. Randomness comes from the seed in
//! [`GossipConfig`]. The wire format is protobuf (`proto/flotilla/gossip.proto`, see
//! [`codec`]); UDP, the mTLS stream for bulk sync and AES-GCM come with the driver.
//!
//! Owns the member list, the tables of the networks this node is attached to, the broadcast
//! queues and the bulk-sync cursors. Must never read a clock, do IO, spawn a thread, or hold
//! anything unbounded: every queue, table, packet and chunk has a named limit.
//!
//! Rules that make the tables converge (checked by the simulator, `sim`):
//! - versions are totally ordered ([`table::Entry::cmp_version`]);
//! - only members attached to a network send or accept its entries, and only live entries
//!   whose owner is a known member attached to it (in this node's view); tombstones from
//!   any owner;
//! - the owner is the authority on its entries: an entry owned by this node that it does not
//!   hold (a previous life's, or one it deleted and reaped) is answered by a newer version of
//!   its own, a tombstone if it holds none;
//! - a failed member's entries are hidden, not dropped, and come back with it; a member that
//!   left (or leaves a network) has its entries (there) turned into tombstones of the same
//!   version, which beat every copy still travelling; one reaped after 24 h has them removed.

pub mod broadcast;
mod bulk;
pub mod codec;
pub mod keyring;
mod members;
mod probe;
mod random;
pub mod table;

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;

use crate::proto::gossip::{Message, message::Kind};

use broadcast::BroadcastQueue;
pub use members::{Member, MemberStatus};
use random::Random;
use table::{Entry, EntryKey, Tables};

/// SWIM probe round: one member probed per period.
pub const PROBE_INTERVAL_MS: u64 = 1_000;
/// A direct probe's ack is awaited this long before indirect probes are sent.
pub const PROBE_ACK_TIMEOUT_MS: u64 = 500;
/// Members asked to probe indirectly.
pub const INDIRECT_PROBES: usize = 3;
/// Suspicion timeout multiplier: `4 · ceil(log10(n+1))` probe intervals at least.
pub const SUSPICION_MULT: u64 = 4;
/// The longest suspicion is this many times the shortest (no confirmations).
pub const SUSPICION_MAX_TIMEOUT_MULT: u64 = 6;
/// Gossip period: table and membership broadcasts leave this often.
pub const GOSSIP_INTERVAL_MS: u64 = 200;
/// Peers each gossip packet goes to.
pub const GOSSIP_FANOUT: usize = 3;
/// Retransmit multiplier: each broadcast is sent `4 · ceil(log10(n+1))` times.
pub const RETRANSMIT_MULT: u32 = 4;
/// Periodic bulk sync (and membership push-pull) with one random peer.
pub const BULK_SYNC_INTERVAL_MS: u64 = 30_000;
/// A failed member is retried (push-pull to its address) this often; also the join retry.
pub const RECONNECT_INTERVAL_MS: u64 = 1_000;
/// A failed or departed member is forgotten after this long.
pub const NODE_REAP_AFTER_MS: u64 = 24 * 3_600_000;
/// Tombstones are kept this long.
pub const TOMBSTONE_KEEP_MS: u64 = 30 * 60_000;
/// Reaping (tombstones, old members) runs this often.
pub const REAP_PERIOD_MS: u64 = 5_000;
/// Suspicions are checked for expiry this often: a scan of every member, too costly at each
/// tick of a large cluster (1,000 nodes ticking every 10 ms scanned 10^8 members a second
/// in the benchmark), and late by at most this much on a timeout of seconds.
pub const SUSPICION_CHECK_INTERVAL_MS: u64 = 100;
/// Members known at most (alive or not); new ones beyond are ignored.
pub const MEMBERS_MAX: usize = 16_384;
/// Events waiting for [`Gossip::poll_output`] at most; older ones are dropped (counted).
pub const EVENTS_QUEUE_LEN_MAX: usize = 65_536;
/// Packets waiting for [`Gossip::poll_output`] at most; older ones are dropped (counted).
pub const PACKETS_QUEUE_LEN_MAX: usize = 16_384;

/// A node's gossip address (`host:port`), where its packets go.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeAddr(pub String);

/// This node and its timings (defaults: memberlist's LAN figures and networkdb's).
#[derive(Clone, Debug)]
pub struct GossipConfig {
    /// This node's id (unique in the cluster).
    pub name: String,
    /// Where its packets reach it.
    pub addr: NodeAddr,
    /// The seed of its random choices.
    pub seed: u64,
    /// How long tombstones are kept ([`TOMBSTONE_KEEP_MS`]).
    pub tombstone_keep_ms: u64,
    /// After how long failed members are forgotten ([`NODE_REAP_AFTER_MS`]).
    pub node_reap_after_ms: u64,
}

impl GossipConfig {
    /// The defaults for node `name` at `addr`.
    pub fn new(name: &str, addr: NodeAddr, seed: u64) -> Self {
        Self {
            name: name.to_string(),
            addr,
            seed,
            tombstone_keep_ms: TOMBSTONE_KEEP_MS,
            node_reap_after_ms: NODE_REAP_AFTER_MS,
        }
    }
}

/// Something the application may want to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A member is alive (new, back from failure, or refuted a suspicion).
    MemberUp(String),
    /// A member is suspected.
    MemberSuspect(String),
    /// A member was declared failed (its entries are hidden until it comes back).
    MemberFailed(String),
    /// A member left gracefully (its entries are removed).
    MemberLeft(String),
    /// An entry became visible.
    EntryCreated(EntryEvent),
    /// A visible entry changed value.
    EntryUpdated(EntryEvent),
    /// A visible entry was deleted, removed or hidden.
    EntryDeleted(EntryEvent),
}

/// The entry an [`Event`] is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryEvent {
    /// Its network.
    pub network: String,
    /// Its table.
    pub table: String,
    /// Its key.
    pub key: String,
    /// Its value (the last one, for a deletion).
    pub value: Bytes,
    /// The node that wrote it.
    pub owner: String,
}

/// What the driver must do next.
#[derive(Debug, Default)]
pub struct Output {
    /// Datagrams to send.
    pub packets: Vec<(NodeAddr, Bytes)>,
    /// Events, in order.
    pub events: Vec<Event>,
    /// Bulk-sync sessions opened: stream [`Gossip::next_chunk`] of each to the address.
    pub bulk_sessions: Vec<(u64, NodeAddr)>,
}

/// Counters of what was refused or dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets or chunks refused by the decoder.
    pub malformed: u64,
    /// Table events refused (not attached, unknown owner, table full).
    pub entries_refused: u64,
    /// Events or packets dropped because the driver did not poll.
    pub output_dropped: u64,
}

/// Why a local update was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UpdateError {
    /// Join the network first.
    #[error("this node is not attached to network {0}: join it first")]
    NotAttached(String),
    /// A name, key or value over its limit ([`codec`]'s constants).
    #[error("{0} is over its limit or empty")]
    TooLarge(&'static str),
    /// Leave another network first.
    #[error("attached to {0} networks already, the limit: leave one first")]
    TooManyNetworks(usize),
    /// The table store is full ([`table::TABLE_ENTRIES_MAX`]); delete entries first.
    #[error("the table store is full; delete entries first")]
    Full,
}

/// Deadlines of the periodic duties.
#[derive(Debug, Default)]
struct Schedule {
    next_probe_ms: u64,
    next_gossip_ms: u64,
    next_bulk_ms: u64,
    next_reconnect_ms: u64,
    next_reap_ms: u64,
    next_suspicion_check_ms: u64,
}

/// One node's gossip state machine (see the module documentation).
#[derive(Debug)]
pub struct Gossip {
    config: GossipConfig,
    now_ms: u64,
    rng: Random,
    incarnation: u64,
    networks: BTreeSet<String>,
    leaving: bool,
    seeds: Vec<NodeAddr>,
    members: BTreeMap<String, Member>,
    clock: u64,
    tables: Tables,
    member_queue: BroadcastQueue,
    network_queues: BTreeMap<String, BroadcastQueue>,
    probe: probe::Prober,
    bulk: bulk::Sessions,
    schedule: Schedule,
    packets: VecDeque<(NodeAddr, Bytes)>,
    events: VecDeque<Event>,
    new_sessions: Vec<(u64, NodeAddr)>,
    stats: Stats,
}

impl Gossip {
    /// A node alone, attached to no network, at time `now_ms`.
    pub fn new(config: GossipConfig, now_ms: u64) -> Self {
        let mut rng = Random::new(config.seed);
        // Stagger the periodic duties so that nodes started together do not beat in step.
        let schedule = Schedule {
            next_probe_ms: now_ms + rng.below(PROBE_INTERVAL_MS as usize) as u64,
            next_gossip_ms: now_ms + rng.below(GOSSIP_INTERVAL_MS as usize) as u64,
            next_bulk_ms: now_ms
                + BULK_SYNC_INTERVAL_MS / 2
                + rng.below(BULK_SYNC_INTERVAL_MS as usize) as u64,
            next_reconnect_ms: now_ms + rng.below(RECONNECT_INTERVAL_MS as usize) as u64,
            next_reap_ms: now_ms + REAP_PERIOD_MS,
            next_suspicion_check_ms: now_ms,
        };
        Self {
            config,
            now_ms,
            rng,
            incarnation: 0,
            networks: BTreeSet::new(),
            leaving: false,
            seeds: Vec::new(),
            members: BTreeMap::new(),
            clock: 0,
            tables: Tables::default(),
            member_queue: BroadcastQueue::default(),
            network_queues: BTreeMap::new(),
            probe: probe::Prober::default(),
            bulk: bulk::Sessions::default(),
            schedule,
            packets: VecDeque::new(),
            events: VecDeque::new(),
            new_sessions: Vec::new(),
            stats: Stats::default(),
        }
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Where this node's packets reach it.
    pub fn addr(&self) -> &NodeAddr {
        &self.config.addr
    }

    /// Opens a bulk-sync session to member `peer` now (the periodic one, on demand): the
    /// tables of the networks both are attached to. Nothing if they share none or a
    /// session to it is open.
    pub fn sync_with(&mut self, peer: &str) {
        self.start_bulk_sync(peer, true);
    }

    /// This node's incarnation number.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The networks this node is attached to.
    pub fn networks(&self) -> &BTreeSet<String> {
        &self.networks
    }

    /// What this node knows of `name` (never itself).
    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members.get(name)
    }

    /// Every other member this node knows of.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    /// Counters of refused and dropped input and output.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Broadcasts waiting in the queues (membership and every network).
    pub fn queued_broadcasts(&self) -> usize {
        self.member_queue.len()
            + self
                .network_queues
                .values()
                .map(BroadcastQueue::len)
                .sum::<usize>()
    }

    /// Entries held (tombstones included).
    pub fn entries_held(&self) -> usize {
        self.tables.len()
    }

    /// The visible entries of `network`: live, and not owned by a failed member.
    pub fn entries(&self, network: &str) -> Vec<(EntryKey, Entry)> {
        self.tables
            .network_from(network, None)
            .filter(|(_, e)| self.visible(e))
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect()
    }

    /// One visible entry.
    pub fn get(&self, network: &str, table: &str, key: &str) -> Option<&Entry> {
        let key = (network.to_string(), table.to_string(), key.to_string());
        self.tables.get(&key).filter(|e| self.visible(e))
    }

    fn visible(&self, entry: &Entry) -> bool {
        !entry.deleting && !self.owner_failed(&entry.owner)
    }

    fn owner_failed(&self, owner: &str) -> bool {
        self.members
            .get(owner)
            .is_some_and(|m| m.status == MemberStatus::Dead)
    }

    /// Takes what the driver must send and the events since the last call.
    pub fn poll_output(&mut self) -> Output {
        Output {
            packets: self.packets.drain(..).collect(),
            events: self.events.drain(..).collect(),
            bulk_sessions: std::mem::take(&mut self.new_sessions),
        }
    }

    fn send(&mut self, to: NodeAddr, messages: Vec<Message>) {
        for packet in codec::pack(messages) {
            if self.packets.len() >= PACKETS_QUEUE_LEN_MAX {
                self.packets.pop_front();
                self.stats.output_dropped += 1;
            }
            self.packets.push_back((to.clone(), packet));
        }
    }

    fn emit(&mut self, event: Event) {
        if self.events.len() >= EVENTS_QUEUE_LEN_MAX {
            self.events.pop_front();
            self.stats.output_dropped += 1;
        }
        self.events.push_back(event);
    }

    /// Advances time to `now_ms` (never backwards) and runs what is due.
    pub fn tick(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        self.probe_tick();
        if self.now_ms >= self.schedule.next_suspicion_check_ms {
            self.schedule.next_suspicion_check_ms = self.now_ms + SUSPICION_CHECK_INTERVAL_MS;
            self.expire_suspicions();
        }
        if self.now_ms >= self.schedule.next_gossip_ms {
            self.schedule.next_gossip_ms = self.now_ms + GOSSIP_INTERVAL_MS;
            self.gossip_round();
        }
        if self.now_ms >= self.schedule.next_reconnect_ms {
            self.schedule.next_reconnect_ms = self.now_ms + RECONNECT_INTERVAL_MS;
            self.reconnect_round();
        }
        if self.now_ms >= self.schedule.next_bulk_ms {
            self.schedule.next_bulk_ms = self.now_ms + BULK_SYNC_INTERVAL_MS;
            self.periodic_sync();
        }
        if self.now_ms >= self.schedule.next_reap_ms {
            self.schedule.next_reap_ms = self.now_ms + REAP_PERIOD_MS;
            self.reap();
        }
        self.bulk.expire(self.now_ms);
    }

    /// Handles a datagram from `from`. Garbage is dropped and counted.
    pub fn receive(&mut self, from: &NodeAddr, packet: &[u8], now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        let Ok(packet) = codec::decode_packet(packet) else {
            self.stats.malformed += 1;
            return;
        };
        for message in packet.messages {
            self.handle(from, message);
        }
    }

    fn handle(&mut self, from: &NodeAddr, message: Message) {
        let Some(kind) = message.kind else { return };
        match kind {
            Kind::Ping(ping) => self.on_ping(from, &ping),
            Kind::Ack(ack) => self.on_ack(ack.seq),
            Kind::IndirectPing(ping) => self.on_indirect_ping(from, ping),
            Kind::Alive(alive) => self.on_alive(alive),
            Kind::Suspect(suspect) => self.on_suspect(suspect),
            Kind::Dead(dead) => self.on_dead(dead),
            Kind::PushPull(push_pull) => self.on_push_pull(from, push_pull),
            Kind::Table(event) => self.on_table_event(event, true),
        }
    }

    /// Joins the cluster through any of `seeds` (retried every second until a member answers).
    pub fn join(&mut self, seeds: Vec<NodeAddr>) {
        if self.leaving {
            self.leaving = false;
            self.incarnation += 1;
        }
        self.seeds = seeds;
        self.broadcast_self();
        self.push_pull_to_seeds();
    }

    /// Leaves the cluster gracefully: the departure is gossiped; keep ticking for a few
    /// gossip rounds before stopping the node.
    pub fn leave(&mut self) {
        self.leaving = true;
        let dead = crate::proto::gossip::Dead {
            name: self.config.name.clone(),
            incarnation: self.incarnation,
            from: self.config.name.clone(),
        };
        self.member_queue
            .push(self.config.name.clone(), kind_message(Kind::Dead(dead)));
    }

    /// Attaches this node to `network`: it gets the network's tables (bulk sync with a peer).
    ///
    /// # Errors
    /// [`UpdateError::TooLarge`] for a bad name, [`UpdateError::TooManyNetworks`].
    pub fn join_network(&mut self, network: &str) -> Result<(), UpdateError> {
        if network.is_empty() || network.len() > codec::NETWORK_NAME_BYTES_MAX {
            return Err(UpdateError::TooLarge("network name"));
        }
        if self.networks.contains(network) {
            return Ok(());
        }
        if self.networks.len() >= codec::NETWORKS_PER_NODE_MAX {
            return Err(UpdateError::TooManyNetworks(self.networks.len()));
        }
        self.networks.insert(network.to_string());
        self.incarnation += 1;
        self.broadcast_self();
        if let Some(peer) = self.random_peer_on(network) {
            self.start_bulk_sync(&peer, true);
        }
        Ok(())
    }

    /// Detaches this node from `network`: its tables are dropped here, and this node's
    /// entries there are removed everywhere.
    pub fn leave_network(&mut self, network: &str) {
        if !self.networks.remove(network) {
            return;
        }
        self.incarnation += 1;
        self.broadcast_self();
        self.network_queues.remove(network);
        let removed = self.tables.remove_where(|k, _| k.0 == network);
        self.emit_removed(removed);
    }

    /// Writes `value` under `key` of `table` in `network`.
    ///
    /// # Errors
    /// [`UpdateError`]: not attached, a field over its limit, or a full store.
    pub fn put(
        &mut self,
        table: &str,
        network: &str,
        key: &str,
        value: Bytes,
    ) -> Result<(), UpdateError> {
        self.write(table, network, key, value, false)
    }

    /// Deletes `key` of `table` in `network` (a tombstone, kept 30 min).
    ///
    /// # Errors
    /// [`UpdateError`]: not attached, a field over its limit, or a full store.
    pub fn delete(&mut self, table: &str, network: &str, key: &str) -> Result<(), UpdateError> {
        self.write(table, network, key, Bytes::new(), true)
    }

    fn write(
        &mut self,
        table: &str,
        network: &str,
        key: &str,
        value: Bytes,
        deleting: bool,
    ) -> Result<(), UpdateError> {
        if !self.networks.contains(network) {
            return Err(UpdateError::NotAttached(network.to_string()));
        }
        check_update(table, key, &value)?;
        let key = (network.to_string(), table.to_string(), key.to_string());
        if deleting && self.tables.get(&key).is_none_or(|e| e.deleting) {
            return Ok(());
        }
        self.clock += 1;
        let entry = self.own_entry(value, deleting);
        if !self.store(key.clone(), entry.clone()) {
            return Err(UpdateError::Full);
        }
        self.queue_entry(&key, &entry);
        Ok(())
    }

    fn own_entry(&self, value: Bytes, deleting: bool) -> Entry {
        Entry {
            value,
            owner: self.config.name.clone(),
            ltime: self.clock,
            deleting,
            reap_at_ms: self.now_ms + self.config.tombstone_keep_ms,
        }
    }

    /// Stores `entry` under `key` and emits the visible change. False if the store is full.
    fn store(&mut self, key: EntryKey, entry: Entry) -> bool {
        let before = self.tables.get(&key).filter(|e| self.visible(e)).cloned();
        let after_visible = self.visible(&entry);
        let event_entry = entry.clone();
        if !self.tables.insert(key.clone(), entry) {
            return false;
        }
        let event = match (before, after_visible) {
            (None, true) => Some(Event::EntryCreated(entry_event(&key, &event_entry))),
            (Some(old), true) if old.value != event_entry.value => {
                Some(Event::EntryUpdated(entry_event(&key, &event_entry)))
            }
            (Some(old), false) => Some(Event::EntryDeleted(entry_event(&key, &old))),
            _ => None,
        };
        if let Some(event) = event {
            self.emit(event);
        }
        true
    }

    fn emit_removed(&mut self, removed: Vec<(EntryKey, Entry)>) {
        for (key, entry) in removed {
            if self.visible(&entry) {
                self.emit(Event::EntryDeleted(entry_event(&key, &entry)));
            }
        }
    }

    fn queue_entry(&mut self, key: &EntryKey, entry: &Entry) {
        let event = self.table_event(key, entry);
        let subject = format!("{}\u{0}{}\u{0}{}", key.0, key.1, key.2);
        self.network_queues
            .entry(key.0.clone())
            .or_default()
            .push(subject, kind_message(Kind::Table(event)));
    }

    fn table_event(&self, key: &EntryKey, entry: &Entry) -> crate::proto::gossip::TableEvent {
        let residual_ms = entry.reap_at_ms.saturating_sub(self.now_ms);
        crate::proto::gossip::TableEvent {
            network: key.0.clone(),
            table: key.1.clone(),
            key: key.2.clone(),
            value: entry.value.clone(),
            owner: entry.owner.clone(),
            ltime: entry.ltime,
            deleting: entry.deleting,
            residual_reap_s: if entry.deleting {
                u32::try_from(residual_ms.div_ceil(1000)).unwrap_or(u32::MAX)
            } else {
                0
            },
        }
    }

    /// A received entry version (gossip, or bulk sync when `rebroadcast` is false).
    fn on_table_event(&mut self, event: crate::proto::gossip::TableEvent, rebroadcast: bool) {
        if !self.accepts_entry(&event) {
            self.stats.entries_refused += 1;
            return;
        }
        self.clock = self.clock.max(event.ltime);
        let key = (
            event.network.clone(),
            event.table.clone(),
            event.key.clone(),
        );
        let keep_ms = u64::from(event.residual_reap_s) * 1000;
        let owner_left = self.owner_left(&event.owner);
        let incoming = Entry {
            value: event.value,
            owner: event.owner,
            ltime: event.ltime,
            // A departed owner's entries are tombstones (see `members::on_dead`).
            deleting: event.deleting || owner_left,
            reap_at_ms: self.now_ms
                + if owner_left {
                    self.config.tombstone_keep_ms
                } else {
                    keep_ms.min(self.config.tombstone_keep_ms)
                },
        };
        let newer = self
            .tables
            .get(&key)
            .is_none_or(|held| incoming.cmp_version(held).is_gt());
        if !newer {
            return;
        }
        if incoming.owner == self.config.name {
            self.reassert(key);
            return;
        }
        if !self.store(key.clone(), incoming.clone()) {
            self.stats.entries_refused += 1;
            return;
        }
        if rebroadcast {
            self.queue_entry(&key, &incoming);
        }
    }

    /// An entry of this node's that it does not hold: this node is its authority, so it
    /// answers with a newer version of what it holds (a tombstone when nothing).
    fn reassert(&mut self, key: EntryKey) {
        self.clock += 1;
        let entry = match self.tables.get(&key) {
            Some(held) if held.owner == self.config.name => {
                let mut entry = held.clone();
                entry.ltime = self.clock;
                entry
            }
            _ => self.own_entry(Bytes::new(), true),
        };
        if self.store(key.clone(), entry.clone()) {
            self.queue_entry(&key, &entry);
        }
    }

    /// Only for a network this node is attached to; a live version only from an owner
    /// attached to it (in this node's view), a tombstone from any owner, known or not: it
    /// can only delete, it is reaped in 30 min whoever wrote it, and a departed owner's
    /// buried entries must win everywhere, also on a node that joined after the departure
    /// and so never learned of that owner (a death notice teaches no member; seed 100 of
    /// the simulator: a restarted node kept a shared key the others had buried).
    fn accepts_entry(&self, event: &crate::proto::gossip::TableEvent) -> bool {
        if !self.networks.contains(&event.network) {
            return false;
        }
        if event.owner == self.config.name || event.deleting {
            return true;
        }
        self.members
            .get(&event.owner)
            .is_some_and(|m| m.networks.contains(&event.network))
    }

    fn owner_left(&self, owner: &str) -> bool {
        self.members
            .get(owner)
            .is_some_and(|m| m.status == MemberStatus::Left)
    }

    /// Once per gossip period: the membership queue to 3 random members, and each network's
    /// queue to 3 random peers of that network.
    fn gossip_round(&mut self) {
        let limit = self.transmit_limit();
        let budget = codec::PACKET_BYTES_MAX - 8;
        let messages = self.member_queue.take(budget, limit);
        if !messages.is_empty() {
            for peer in self.random_live_peers(None, GOSSIP_FANOUT) {
                self.send(peer, messages.clone());
            }
        }
        let networks: Vec<String> = self.networks.iter().cloned().collect();
        for network in networks {
            let Some(queue) = self.network_queues.get_mut(&network) else {
                continue;
            };
            let messages = queue.take(budget, limit);
            if messages.is_empty() {
                continue;
            }
            for peer in self.random_live_peers(Some(&network), GOSSIP_FANOUT) {
                self.send(peer, messages.clone());
            }
        }
    }

    /// `4 · ceil(log10(n + 1))` for the n members alive (this node included).
    fn transmit_limit(&self) -> u32 {
        let alive = self.members.values().filter(|m| m.is_live()).count() + 1;
        RETRANSMIT_MULT * ceil_log10(alive as u64 + 1) as u32
    }

    /// Addresses of up to `count` random live members (attached to `network` if given).
    /// Only the chosen addresses are copied: copying every member's at each round was most
    /// of a 1,000-node simulation's time.
    fn random_live_peers(&mut self, network: Option<&str>, count: usize) -> Vec<NodeAddr> {
        let peers: Vec<&NodeAddr> = self
            .members
            .values()
            .filter(|m| m.is_live() && network.is_none_or(|n| m.networks.contains(n)))
            .map(|m| &m.addr)
            .collect();
        self.rng
            .choose(&peers, count)
            .into_iter()
            .cloned()
            .collect()
    }

    fn random_peer_on(&mut self, network: &str) -> Option<String> {
        let names: Vec<String> = self
            .members
            .values()
            .filter(|m| m.is_live() && m.networks.contains(network))
            .map(|m| m.name.clone())
            .collect();
        self.rng.choose(&names, 1).pop()
    }

    /// Every 30 s: membership push-pull with one random live member, and for each network
    /// of this node a bulk sync with one random peer of it (a session covers every network
    /// the two share, so a peer drawn twice gets one session).
    fn periodic_sync(&mut self) {
        if self.leaving {
            return;
        }
        let names: Vec<String> = self
            .members
            .values()
            .filter(|m| m.is_live())
            .map(|m| m.name.clone())
            .collect();
        if let Some(peer) = self.rng.choose(&names, 1).pop() {
            let addr = self.members[&peer].addr.clone();
            self.send_push_pull(addr, true);
        }
        let networks: Vec<String> = self.networks.iter().cloned().collect();
        for network in networks {
            if let Some(peer) = self.random_peer_on(&network) {
                self.start_bulk_sync(&peer, true);
            }
        }
    }

    /// Tombstones past their time, and members failed or departed for 24 h (with their
    /// entries).
    fn reap(&mut self) {
        let now = self.now_ms;
        self.tables
            .remove_where(|_, e| e.deleting && e.reap_at_ms <= now);
        let reap_after = self.config.node_reap_after_ms;
        let gone: Vec<String> = self
            .members
            .values()
            .filter(|m| !m.is_live() && m.status_since_ms + reap_after <= now)
            .map(|m| m.name.clone())
            .collect();
        for name in gone {
            self.members.remove(&name);
            let removed = self.tables.remove_where(|_, e| e.owner == name);
            self.emit_removed(removed);
        }
    }
}

fn check_update(table: &str, key: &str, value: &Bytes) -> Result<(), UpdateError> {
    if table.is_empty() || table.len() > codec::TABLE_NAME_BYTES_MAX {
        return Err(UpdateError::TooLarge("table name"));
    }
    if key.len() > codec::KEY_BYTES_MAX {
        return Err(UpdateError::TooLarge("key"));
    }
    if value.len() > codec::VALUE_BYTES_MAX {
        return Err(UpdateError::TooLarge("value"));
    }
    Ok(())
}

fn kind_message(kind: Kind) -> Message {
    Message { kind: Some(kind) }
}

fn entry_event(key: &EntryKey, entry: &Entry) -> EntryEvent {
    EntryEvent {
        network: key.0.clone(),
        table: key.1.clone(),
        key: key.2.clone(),
        value: entry.value.clone(),
        owner: entry.owner.clone(),
    }
}

/// `ceil(log10(n))` for n ≥ 1, in integers (0 for n = 1).
fn ceil_log10(n: u64) -> u64 {
    let mut digits = 0;
    let mut power = 1u64;
    while power < n {
        power = power.saturating_mul(10);
        digits += 1;
    }
    digits
}
