//! SWIM membership (memberlist's rules): alive / suspect / dead / left per member with
//! incarnation numbers; a node refutes a suspicion or death of itself by raising its
//! incarnation; suspicion timeouts shrink with independent confirmations; push-pull state
//! exchange on join, on each retry of a failed member (every second) and every 30 s.
//! Owns the transitions of [`Member`]s and the membership broadcasts; must never believe a
//! message with an older incarnation than it holds, nor learn a member from a death notice.

use std::collections::BTreeSet;

use crate::proto::gossip::{
    Alive, Dead, MemberState, MemberStatus as WireStatus, PushPull, Suspect, message::Kind,
};

use super::{
    Event, Gossip, MEMBERS_MAX, NodeAddr, PROBE_INTERVAL_MS, SUSPICION_MAX_TIMEOUT_MULT,
    SUSPICION_MULT, ceil_log10, codec, kind_message,
};

/// Independent confirmations of a suspicion remembered at most.
pub const SUSPICION_CONFIRMATIONS_MAX: usize = 16;

/// A member's state in this node's view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberStatus {
    /// Answering probes.
    Alive,
    /// Missed a probe; declared dead unless it refutes in time.
    Suspect,
    /// Declared failed: its entries are hidden, it is retried every second.
    Dead,
    /// Left gracefully: its entries are removed.
    Left,
}

/// Another node, as this one knows it.
#[derive(Clone, Debug)]
pub struct Member {
    /// Its id.
    pub name: String,
    /// Its gossip address.
    pub addr: NodeAddr,
    /// The highest incarnation seen.
    pub incarnation: u64,
    /// Its state.
    pub status: MemberStatus,
    /// The networks it is attached to (as of `incarnation`).
    pub networks: BTreeSet<String>,
    /// When `status` last changed (local time).
    pub status_since_ms: u64,
    suspicion: Option<Suspicion>,
}

#[derive(Clone, Debug)]
struct Suspicion {
    start_ms: u64,
    confirmations: BTreeSet<String>,
}

impl Member {
    /// Alive or suspect: probed, gossiped to.
    pub fn is_live(&self) -> bool {
        matches!(self.status, MemberStatus::Alive | MemberStatus::Suspect)
    }
}

impl Gossip {
    fn self_alive(&self) -> Alive {
        Alive {
            name: self.config.name.clone(),
            addr: self.config.addr.0.clone(),
            incarnation: self.incarnation,
            networks: self.networks.iter().cloned().collect(),
        }
    }

    /// Queues this node's `Alive` (after a join, a network change or a refutation).
    pub(super) fn broadcast_self(&mut self) {
        let alive = self.self_alive();
        self.member_queue
            .push(self.config.name.clone(), kind_message(Kind::Alive(alive)));
    }

    /// Someone says this node is suspect or dead at `incarnation`, or holds a stale `Alive`
    /// of it: raise the incarnation above and announce it.
    fn refute(&mut self, incarnation: u64) {
        if self.leaving {
            return;
        }
        self.incarnation = self.incarnation.max(incarnation) + 1;
        self.broadcast_self();
    }

    fn rebroadcast(&mut self, name: &str, kind: Kind) {
        self.member_queue.push(name.to_string(), kind_message(kind));
    }

    pub(super) fn on_alive(&mut self, alive: Alive) {
        if alive.name == self.config.name {
            let differs =
                alive.networks.iter().ne(self.networks.iter()) || alive.addr != self.config.addr.0;
            if alive.incarnation > self.incarnation
                || (alive.incarnation == self.incarnation && differs)
            {
                self.refute(alive.incarnation);
            }
            return;
        }
        let known = self.members.get(&alive.name);
        if known.is_some_and(|m| alive.incarnation <= m.incarnation) {
            return;
        }
        if known.is_none() && self.members.len() >= MEMBERS_MAX {
            return;
        }
        let before = known.map(|m| (m.status, m.networks.clone()));
        let networks: BTreeSet<String> = alive.networks.iter().cloned().collect();
        let member = Member {
            name: alive.name.clone(),
            addr: NodeAddr(alive.addr.clone()),
            incarnation: alive.incarnation,
            status: MemberStatus::Alive,
            networks: networks.clone(),
            status_since_ms: self.now_ms,
            suspicion: None,
        };
        let name = alive.name.clone();
        let (status_before, networks_before) = match before {
            Some((status, nets)) => (Some(status), nets),
            None => (None, BTreeSet::new()),
        };
        if status_before == Some(MemberStatus::Alive) {
            let since = self.members[&name].status_since_ms;
            self.members.insert(
                name.clone(),
                Member {
                    status_since_ms: since,
                    ..member
                },
            );
        } else {
            self.members.insert(name.clone(), member);
        }
        self.drop_detached_entries(&name, &networks_before, &networks);
        if status_before != Some(MemberStatus::Alive) {
            self.emit(Event::MemberUp(name.clone()));
        }
        if status_before == Some(MemberStatus::Dead) {
            self.emit_owner_visibility(&name, true);
        }
        self.rebroadcast(&name, Kind::Alive(alive));
    }

    /// A member no longer attached to some networks: its entries there become tombstones.
    fn drop_detached_entries(
        &mut self,
        name: &str,
        before: &BTreeSet<String>,
        after: &BTreeSet<String>,
    ) {
        let gone: BTreeSet<&String> = before.difference(after).collect();
        if gone.is_empty() {
            return;
        }
        // Tombstones rather than removal, as for a departure (see `on_dead`).
        let reap_at_ms = self.now_ms + self.config.tombstone_keep_ms;
        let buried = self
            .tables
            .bury_where(reap_at_ms, |k, e| e.owner == name && gone.contains(&k.0));
        self.emit_removed(buried);
    }

    /// Events for the entries of `owner` that appear (it came back) or disappear (it failed).
    fn emit_owner_visibility(&mut self, owner: &str, appear: bool) {
        let events: Vec<Event> = self
            .tables
            .owned_by(owner)
            .filter(|(_, e)| !e.deleting)
            .map(|(k, e)| {
                let event = super::entry_event(k, e);
                if appear {
                    Event::EntryCreated(event)
                } else {
                    Event::EntryDeleted(event)
                }
            })
            .collect();
        for event in events {
            self.emit(event);
        }
    }

    pub(super) fn on_suspect(&mut self, suspect: Suspect) {
        if suspect.name == self.config.name {
            if suspect.incarnation >= self.incarnation {
                self.refute(suspect.incarnation);
            }
            return;
        }
        let now = self.now_ms;
        let Some(member) = self.members.get_mut(&suspect.name) else {
            return;
        };
        if suspect.incarnation < member.incarnation || !member.is_live() {
            return;
        }
        if member.status == MemberStatus::Suspect {
            let suspicion = member.suspicion.get_or_insert_with(|| Suspicion {
                start_ms: now,
                confirmations: BTreeSet::new(),
            });
            let fresh = suspicion.confirmations.len() < SUSPICION_CONFIRMATIONS_MAX
                && suspicion.confirmations.insert(suspect.from.clone());
            if fresh {
                let name = suspect.name.clone();
                self.rebroadcast(&name, Kind::Suspect(suspect));
            }
            return;
        }
        member.status = MemberStatus::Suspect;
        member.incarnation = suspect.incarnation;
        member.status_since_ms = now;
        member.suspicion = Some(Suspicion {
            start_ms: now,
            confirmations: BTreeSet::new(),
        });
        let name = suspect.name.clone();
        self.emit(super::Event::MemberSuspect(name.clone()));
        self.rebroadcast(&name, Kind::Suspect(suspect));
    }

    pub(super) fn on_dead(&mut self, dead: Dead) {
        if dead.name == self.config.name {
            // Also a departure of a previous life (a restart with a lower incarnation).
            if dead.incarnation >= self.incarnation {
                self.refute(dead.incarnation);
            }
            return;
        }
        let left = dead.from == dead.name;
        let now = self.now_ms;
        let Some(member) = self.members.get_mut(&dead.name) else {
            return;
        };
        let already = match member.status {
            MemberStatus::Left => true,
            MemberStatus::Dead => !left,
            _ => false,
        };
        if dead.incarnation < member.incarnation || already {
            return;
        }
        let was_dead = member.status == MemberStatus::Dead;
        member.status = if left {
            MemberStatus::Left
        } else {
            MemberStatus::Dead
        };
        member.incarnation = dead.incarnation;
        member.status_since_ms = now;
        member.suspicion = None;
        let name = dead.name.clone();
        if left {
            if !was_dead {
                self.emit_owner_visibility(&name, false);
            }
            // Tombstones rather than removal: a copy still travelling (or held by a node
            // that missed the departure) is beaten by them everywhere.
            let reap_at_ms = self.now_ms + self.config.tombstone_keep_ms;
            self.tables.bury_where(reap_at_ms, |_, e| e.owner == name);
            self.emit(Event::MemberLeft(name.clone()));
        } else {
            self.emit_owner_visibility(&name, false);
            self.emit(Event::MemberFailed(name.clone()));
        }
        self.rebroadcast(&name, Kind::Dead(dead));
    }

    /// Members alive, this node included.
    fn live_count(&self) -> u64 {
        self.members.values().filter(|m| m.is_live()).count() as u64 + 1
    }

    /// Suspects whose time ran out are declared dead.
    pub(super) fn expire_suspicions(&mut self) {
        let mut expired = Vec::new();
        // Counted once per scan, not once per suspect (a scan was quadratic).
        let live = self.live_count();
        for member in self.members.values() {
            if let Some(s) = &member.suspicion {
                let timeout = suspicion_timeout_ms(live, s.confirmations.len());
                if s.start_ms + timeout <= self.now_ms {
                    expired.push((member.name.clone(), member.incarnation));
                }
            }
        }
        for (name, incarnation) in expired {
            let from = self.config.name.clone();
            self.on_dead(Dead {
                name,
                incarnation,
                from,
            });
        }
    }

    /// This node's suspicion of `name` after a failed probe.
    pub(super) fn suspect(&mut self, name: &str) {
        let Some(member) = self.members.get(name) else {
            return;
        };
        let suspect = Suspect {
            name: name.to_string(),
            incarnation: member.incarnation,
            from: self.config.name.clone(),
        };
        self.on_suspect(suspect);
    }

    fn member_states(&self) -> Vec<MemberState> {
        let mut states = vec![MemberState {
            alive: Some(self.self_alive()),
            status: WireStatus::Alive as i32,
        }];
        for m in self.members.values() {
            let status = match m.status {
                MemberStatus::Alive => WireStatus::Alive,
                MemberStatus::Suspect => WireStatus::Suspect,
                MemberStatus::Dead => WireStatus::Dead,
                MemberStatus::Left => WireStatus::Left,
            };
            states.push(MemberState {
                alive: Some(Alive {
                    name: m.name.clone(),
                    addr: m.addr.0.clone(),
                    incarnation: m.incarnation,
                    networks: m.networks.iter().cloned().collect(),
                }),
                status: status as i32,
            });
        }
        states
    }

    /// This node's membership state to `to`, in as many packets as it takes; the first asks
    /// for the other side's when `reply_wanted`.
    pub(super) fn send_push_pull(&mut self, to: NodeAddr, reply_wanted: bool) {
        let states = self.member_states();
        let mut messages = Vec::new();
        let mut current: Vec<MemberState> = Vec::new();
        let mut used_bytes = 0;
        let budget = codec::PACKET_BYTES_MAX - 96;
        let mut first = reply_wanted;
        let mut flush = |members: Vec<MemberState>, first: &mut bool| {
            let push_pull = PushPull {
                from: self.config.name.clone(),
                reply_wanted: std::mem::take(first),
                members,
            };
            messages.push(kind_message(Kind::PushPull(push_pull)));
        };
        for state in states {
            let cost = prost::Message::encoded_len(&state) + 3;
            if !current.is_empty()
                && (used_bytes + cost > budget || current.len() >= codec::PUSH_PULL_MEMBERS_MAX)
            {
                flush(std::mem::take(&mut current), &mut first);
                used_bytes = 0;
            }
            used_bytes += cost;
            current.push(state);
        }
        if !current.is_empty() {
            flush(current, &mut first);
        }
        for message in messages {
            self.send(to.clone(), vec![message]);
        }
    }

    pub(super) fn push_pull_to_seeds(&mut self) {
        for seed in self.seeds.clone() {
            if seed != self.config.addr {
                self.send_push_pull(seed, true);
            }
        }
    }

    pub(super) fn on_push_pull(&mut self, from: &NodeAddr, push_pull: PushPull) {
        let is_reply = !push_pull.reply_wanted;
        if push_pull.reply_wanted && !self.leaving {
            self.send_push_pull(from.clone(), false);
        }
        let sender = push_pull.from.clone();
        for state in push_pull.members {
            self.merge_state(&sender, state);
        }
        // The side that asked (join, reconnect, periodic) syncs tables with the one that
        // answered: one session per exchange, not one per member that learns of it.
        if is_reply && self.members.get(&sender).is_some_and(Member::is_live) {
            self.start_bulk_sync(&sender, true);
        }
    }

    /// One member's state from a push-pull (memberlist's merge: a remote death is only a
    /// suspicion here; a remote departure is a departure).
    fn merge_state(&mut self, sender: &str, state: MemberState) {
        let Some(alive) = state.alive else { return };
        let name = alive.name.clone();
        let incarnation = alive.incarnation;
        match WireStatus::try_from(state.status).unwrap_or(WireStatus::Alive) {
            WireStatus::Alive => self.on_alive(alive),
            WireStatus::Suspect | WireStatus::Dead => {
                self.on_suspect(Suspect {
                    name,
                    incarnation,
                    from: sender.to_string(),
                });
            }
            WireStatus::Left => self.on_dead(Dead {
                from: name.clone(),
                name,
                incarnation,
            }),
        }
    }

    /// Every second: a push-pull to one random failed member (it refutes if it lives), or to
    /// the seeds while this node knows nobody alive.
    pub(super) fn reconnect_round(&mut self) {
        if self.leaving {
            return;
        }
        if !self.members.values().any(Member::is_live) {
            self.push_pull_to_seeds();
        }
        let dead: Vec<NodeAddr> = self
            .members
            .values()
            .filter(|m| m.status == MemberStatus::Dead)
            .map(|m| m.addr.clone())
            .collect();
        if let Some(addr) = self.rng.choose(&dead, 1).pop() {
            self.send_push_pull(addr, true);
        }
    }
}

/// Suspicion timeout among `n` live members (this node included) after `confirmations`:
/// from `6 · base` down to `base` = `4 · ceil(log10(n+1))` probe intervals as confirmations
/// arrive (linearly: integers keep the simulator exact on every platform; memberlist
/// shrinks logarithmically).
fn suspicion_timeout_ms(n: u64, confirmations: usize) -> u64 {
    let min_ms = SUSPICION_MULT * ceil_log10(n + 1).max(1) * PROBE_INTERVAL_MS;
    let max_ms = SUSPICION_MAX_TIMEOUT_MULT * min_ms;
    let expected = (SUSPICION_MULT - 2).min(n.saturating_sub(2));
    if expected == 0 {
        return min_ms;
    }
    let c = (confirmations as u64).min(expected);
    max_ms - (max_ms - min_ms) * c / expected
}
