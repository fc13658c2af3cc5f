//! SWIM failure detection: one member probed per period (round-robin over a shuffled list),
//! an ack awaited 500 ms, then 3 indirect probes through other members until the period
//! ends; no ack by then makes the target suspect. Also answers probes and relays indirect
//! ones. Owns the probe in flight and the relays; must never hold more than
//! [`INDIRECT_RELAYS_MAX`] relays nor ack a probe meant for another node name.

use std::collections::BTreeMap;

use crate::proto::gossip::{Ack, IndirectPing, Ping, message::Kind};

use super::{
    Gossip, INDIRECT_PROBES, NodeAddr, PROBE_ACK_TIMEOUT_MS, PROBE_INTERVAL_MS, kind_message,
};

/// Indirect probes relayed for others at once at most.
pub const INDIRECT_RELAYS_MAX: usize = 256;

#[derive(Debug)]
struct Probe {
    seq: u64,
    target: String,
    sent_ms: u64,
    indirect_sent: bool,
    acked: bool,
}

#[derive(Debug)]
struct Relay {
    origin: NodeAddr,
    origin_seq: u64,
    expires_ms: u64,
}

/// The prober's state.
#[derive(Debug, Default)]
pub(super) struct Prober {
    next_seq: u64,
    current: Option<Probe>,
    order: Vec<String>,
    relays: BTreeMap<u64, Relay>,
}

impl Gossip {
    fn next_seq(&mut self) -> u64 {
        self.probe.next_seq += 1;
        self.probe.next_seq
    }

    pub(super) fn probe_tick(&mut self) {
        let now = self.now_ms;
        self.probe.relays.retain(|_, r| r.expires_ms > now);
        if now >= self.schedule.next_probe_ms {
            self.schedule.next_probe_ms = now + PROBE_INTERVAL_MS;
            self.finish_probe();
            if !self.leaving {
                self.start_probe();
            }
        }
        self.maybe_probe_indirectly();
    }

    /// The probe of the period that ended: no ack means suspicion.
    fn finish_probe(&mut self) {
        if let Some(probe) = self.probe.current.take()
            && !probe.acked
        {
            self.suspect(&probe.target);
        }
    }

    fn next_target(&mut self) -> Option<String> {
        for _ in 0..2 {
            while let Some(name) = self.probe.order.pop() {
                if self.members.get(&name).is_some_and(|m| m.is_live()) {
                    return Some(name);
                }
            }
            let names: Vec<String> = self
                .members
                .values()
                .filter(|m| m.is_live())
                .map(|m| m.name.clone())
                .collect();
            let count = names.len();
            self.probe.order = self.rng.choose(&names, count);
        }
        None
    }

    fn start_probe(&mut self) {
        let Some(target) = self.next_target() else {
            return;
        };
        let seq = self.next_seq();
        let addr = self.members[&target].addr.clone();
        self.probe.current = Some(Probe {
            seq,
            target: target.clone(),
            sent_ms: self.now_ms,
            indirect_sent: false,
            acked: false,
        });
        self.send(addr, vec![kind_message(Kind::Ping(Ping { seq, target }))]);
    }

    fn maybe_probe_indirectly(&mut self) {
        let now = self.now_ms;
        let due = match &mut self.probe.current {
            Some(p) if !p.acked && !p.indirect_sent && p.sent_ms + PROBE_ACK_TIMEOUT_MS <= now => {
                p.indirect_sent = true;
                Some((p.seq, p.target.clone()))
            }
            _ => None,
        };
        let Some((seq, target)) = due else { return };
        let Some(target_addr) = self.members.get(&target).map(|m| m.addr.0.clone()) else {
            return;
        };
        let helpers: Vec<NodeAddr> = self
            .members
            .values()
            .filter(|m| m.status == super::MemberStatus::Alive && m.name != target)
            .map(|m| m.addr.clone())
            .collect();
        for helper in self.rng.choose(&helpers, INDIRECT_PROBES) {
            let ping = IndirectPing {
                seq,
                target: target.clone(),
                target_addr: target_addr.clone(),
            };
            self.send(helper, vec![kind_message(Kind::IndirectPing(ping))]);
        }
    }

    pub(super) fn on_ping(&mut self, from: &NodeAddr, ping: &Ping) {
        if ping.target == self.config.name {
            let ack = Ack { seq: ping.seq };
            self.send(from.clone(), vec![kind_message(Kind::Ack(ack))]);
        }
    }

    pub(super) fn on_ack(&mut self, seq: u64) {
        if let Some(probe) = &mut self.probe.current
            && probe.seq == seq
        {
            probe.acked = true;
            return;
        }
        if let Some(relay) = self.probe.relays.remove(&seq) {
            let ack = Ack {
                seq: relay.origin_seq,
            };
            self.send(relay.origin, vec![kind_message(Kind::Ack(ack))]);
        }
    }

    pub(super) fn on_indirect_ping(&mut self, from: &NodeAddr, ping: IndirectPing) {
        if self.probe.relays.len() >= INDIRECT_RELAYS_MAX || ping.target_addr.is_empty() {
            return;
        }
        let seq = self.next_seq();
        self.probe.relays.insert(
            seq,
            Relay {
                origin: from.clone(),
                origin_seq: ping.seq,
                expires_ms: self.now_ms + PROBE_INTERVAL_MS,
            },
        );
        let direct = Ping {
            seq,
            target: ping.target,
        };
        self.send(
            NodeAddr(ping.target_addr),
            vec![kind_message(Kind::Ping(direct))],
        );
    }
}
