//! A key-value client workload for the simulator, checked for linearizability.
//!
//! Several clients call get, put and compare-and-set on a few keys of a replicated map. Writes
//! go through `propose` on whichever node the client believes leads; reads through
//! `read_index`, served from that node's map once it has applied the confirmed index. Every
//! call, return and unknown outcome is recorded in a [`Recorder`], and [`Workload::finish`]
//! checks the history with [`crate::lincheck`]: a history with no linearization is a
//! violation of the seed.
//!
//! Client behaviour, as a real client library would do it:
//! - a refusal (`NotLeader`, transfer in progress, node down) means the request was not
//!   appended: retry, on the hinted leader if any, after [`KvWorkloadConfig::retry_backoff_ticks`];
//! - a write whose index is applied with another term was definitely lost: retry it;
//! - a read not answered within [`KvWorkloadConfig::read_attempt_timeout_ticks`] is retried (reads
//!   change nothing, so a retry cannot double an effect);
//! - an operation not answered within [`KvWorkloadConfig::op_timeout_ticks`], or whose write was
//!   pending on a node that crashed, is abandoned and recorded with an unknown outcome.
//!
//! Every node runs its own map ([`KvMachine`]), fed by the entries it applies and rebuilt
//! from snapshots; answers come from the node the client talked to. Commands are recognised
//! by a magic prefix and a fixed length, so the simulator's background payloads are ignored.
//!
//! This module must never influence the simulated cluster beyond the client calls it makes,
//! and must draw randomness only from [`Client::rng`] so that a seed replays exactly.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::hook::{Client, Workload};
use super::{Sim, SimConfig};
use crate::lincheck::{
    self, CheckLimits, History, Input, Key, Output, Pending, Recorder, Value, Verdict,
};
use crate::raft::core::{RaftError, ReadState};
use crate::raft::types::{Entry, EntryKind, LogIndex, NodeId, Term};

/// Simulated time units per nominal tick: the workload's durations are in ticks.
const TICK: u64 = super::cluster::TICK_PERIOD_NOMINAL;

/// How clients read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// ReadIndex on the leader (or its lease), served once applied: linearizable.
    ReadIndex,
    /// Served at once from whichever node is asked, without confirmation. NOT linearizable
    /// (followers and deposed leaders lag): exists to show the checker catches stale reads.
    LocalUnsafe,
}

/// How the clients behave.
#[derive(Clone, Debug)]
pub struct KvWorkloadConfig {
    /// Concurrent clients, each with at most one operation in flight.
    pub clients: usize,
    /// Keys `0..keys` the clients pick from (few keys: more contention, stronger checks).
    pub keys: u64,
    /// Longest pause between a client's operations, in nominal ticks.
    pub think_time_max_ticks: u64,
    /// An operation not answered this long after its call is abandoned (outcome unknown),
    /// in nominal ticks (the election timeout is 10 to 20).
    pub op_timeout_ticks: u64,
    /// A read attempt not answered this long after it was sent is sent again, in ticks.
    pub read_attempt_timeout_ticks: u64,
    /// Pause before retrying a refused request, in nominal ticks.
    pub retry_backoff_ticks: u64,
    /// Chance (per million) that a client sends to a random node instead of the leader it
    /// believes in, to exercise refusals and stale leaders.
    pub random_node_per_million: u32,
    /// How reads are served.
    pub read_mode: ReadMode,
    /// Bound on the linearizability search.
    pub check_limits: CheckLimits,
}

impl Default for KvWorkloadConfig {
    fn default() -> Self {
        Self {
            clients: 5,
            keys: 3,
            think_time_max_ticks: 2,
            op_timeout_ticks: 30,
            read_attempt_timeout_ticks: 8,
            retry_backoff_ticks: 1,
            random_node_per_million: 100_000,
            read_mode: ReadMode::ReadIndex,
            check_limits: CheckLimits::default(),
        }
    }
}

/// What one seed's workload did and concluded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvReport {
    /// Operations called.
    pub ops_called: u64,
    /// Operations that returned a result.
    pub ops_returned: u64,
    /// Operations abandoned with an unknown outcome.
    pub ops_unknown: u64,
    /// Requests refused and retried (not leader, transfer, node down, lost write).
    pub retries: u64,
    /// Configurations the linearizability search visited.
    pub states_explored: u64,
    /// Whether the history was linearizable (`None` until checked or if undecided).
    pub linearizable: Option<bool>,
    /// A full explanation of a violation (longest legal prefix, the stuck operation).
    pub explanation: Option<String>,
}

/// A shared view of a workload's [`KvReport`], readable after the simulator consumed it.
#[derive(Clone, Debug, Default)]
pub struct KvReportHandle(Rc<RefCell<KvReport>>);

impl KvReportHandle {
    /// A copy of the report as it stands.
    pub fn report(&self) -> KvReport {
        self.0.borrow().clone()
    }
}

// ----- commands and the per-node state machine ----------------------------------------

/// Marks a workload command among other entry payloads.
const COMMAND_MAGIC: u64 = 0x464C_544B_5643_4D44; // "FLTKVCMD"
/// Magic, op id, key, tag, from-present flag, value or from, to.
const COMMAND_BYTES: usize = 8 + 8 + 8 + 1 + 1 + 8 + 8;
const TAG_PUT: u8 = 1;
const TAG_CAS: u8 = 2;

/// A write as replicated through the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Command {
    op_id: u64,
    key: Key,
    input: Input,
}

impl Command {
    fn encode(&self) -> Bytes {
        let mut data = BytesMut::with_capacity(COMMAND_BYTES);
        data.put_u64(COMMAND_MAGIC);
        data.put_u64(self.op_id);
        data.put_u64(self.key);
        let (tag, from, to) = match self.input {
            Input::Put { value } => (TAG_PUT, None, value),
            Input::Cas { from, to } => (TAG_CAS, from, to),
            Input::Get => unreachable!("reads are not replicated"),
        };
        data.put_u8(tag);
        data.put_u8(u8::from(from.is_some()));
        data.put_u64(from.unwrap_or(0));
        data.put_u64(to);
        debug_assert_eq!(data.len(), COMMAND_BYTES);
        data.freeze()
    }

    /// The command in `entry`, or `None` for entries that are not workload commands.
    fn decode(entry: &Entry) -> Option<Self> {
        if entry.kind != EntryKind::Normal || entry.data.len() != COMMAND_BYTES {
            return None;
        }
        let mut data = entry.data.clone();
        if data.get_u64() != COMMAND_MAGIC {
            return None;
        }
        let op_id = data.get_u64();
        let key = data.get_u64();
        let tag = data.get_u8();
        let from_present = data.get_u8() != 0;
        let from_or_value = data.get_u64();
        let to = data.get_u64();
        let input = match tag {
            TAG_PUT => Input::Put { value: to },
            TAG_CAS => Input::Cas {
                from: from_present.then_some(from_or_value),
                to,
            },
            _ => return None,
        };
        Some(Self { op_id, key, input })
    }
}

/// One node's replica of the map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvMachine {
    values: BTreeMap<Key, Value>,
}

impl KvMachine {
    /// The value under `key`, if any.
    pub fn get(&self, key: Key) -> Option<Value> {
        self.values.get(&key).copied()
    }

    fn apply(&mut self, command: &Command) -> Output {
        match command.input {
            Input::Put { value } => {
                self.values.insert(command.key, value);
                Output::PutDone
            }
            Input::Cas { from, to } if self.get(command.key) == from => {
                self.values.insert(command.key, to);
                Output::CasSwapped
            }
            Input::Cas { .. } => Output::CasFailed,
            Input::Get => unreachable!("reads are not replicated"),
        }
    }

    fn encode(&self) -> Bytes {
        let mut data = BytesMut::with_capacity(8 + self.values.len() * 16);
        data.put_u64(self.values.len() as u64);
        for (key, value) in &self.values {
            data.put_u64(*key);
            data.put_u64(*value);
        }
        data.freeze()
    }

    fn decode(data: &Bytes) -> Self {
        let mut data = data.clone();
        if data.is_empty() {
            return Self::default();
        }
        let count = data.get_u64();
        assert_eq!(
            data.remaining() as u64,
            count * 16,
            "a snapshot holds what encode wrote"
        );
        let values = (0..count)
            .map(|_| (data.get_u64(), data.get_u64()))
            .collect();
        Self { values }
    }
}

// ----- clients --------------------------------------------------------------------------

/// An operation a client has called and not finished.
#[derive(Debug)]
struct InFlightOp {
    pending: Pending,
    op_id: u64,
    key: Key,
    input: Input,
    deadline: u64,
}

/// What a client is waiting for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ticket {
    /// A write appended on `node` at `index` in `term`.
    Write {
        node: NodeId,
        index: LogIndex,
        term: Term,
    },
    /// A read `ctx` requested on `node`, to be sent again after `resend_at`.
    Read {
        node: NodeId,
        ctx: u64,
        resend_at: u64,
    },
}

#[derive(Debug)]
enum Phase {
    /// Just got an answer; picks a think time at its next step.
    Answered,
    /// Thinking until `next_op_at`.
    Idle { next_op_at: u64 },
    /// Has an operation to send (again) at `send_at`.
    Sending { op: InFlightOp, send_at: u64 },
    /// Sent; waiting for the answer.
    Waiting { op: InFlightOp, ticket: Ticket },
}

#[derive(Debug)]
struct ClientState {
    id: lincheck::ClientId,
    believed_leader: Option<NodeId>,
    phase: Phase,
}

/// The key-value workload: clients, per-node maps, and the history being recorded.
pub struct KvWorkload {
    config: KvWorkloadConfig,
    recorder: Recorder,
    clients: Vec<ClientState>,
    machines: HashMap<NodeId, KvMachine>,
    /// (node, index) of each write awaiting application -> (term, client index) of each.
    /// Several: a deposed leader whose entry was truncated before it applied it may be
    /// elected again and append another client's write at the same index, while the first
    /// entry may still commit through another node (Raft's figure 8).
    writes_waiting: HashMap<(NodeId, LogIndex), Vec<(Term, usize)>>,
    /// Read ctx -> client index.
    reads_waiting: HashMap<u64, usize>,
    /// The latest value each key was seen to take (a good `from` for compare-and-set).
    latest: HashMap<Key, Value>,
    next_value: Value,
    next_op_id: u64,
    next_read_ctx: u64,
    report: KvReportHandle,
}

impl KvWorkload {
    /// A workload with `config`; its report is readable through the returned handle once
    /// the simulator has run it.
    pub fn new(config: KvWorkloadConfig) -> (Self, KvReportHandle) {
        assert!(
            config.clients > 0 && config.keys > 0,
            "a workload needs clients and keys"
        );
        let clients = (0..config.clients)
            .map(|index| ClientState {
                id: index as u64 + 1,
                believed_leader: None,
                phase: Phase::Idle { next_op_at: 0 },
            })
            .collect();
        let report = KvReportHandle::default();
        let workload = Self {
            config,
            recorder: Recorder::new(),
            clients,
            machines: HashMap::new(),
            writes_waiting: HashMap::new(),
            reads_waiting: HashMap::new(),
            latest: HashMap::new(),
            next_value: 1,
            next_op_id: 1,
            next_read_ctx: 1,
            report: report.clone(),
        };
        (workload, report)
    }

    fn fresh_value(&mut self) -> Value {
        let value = self.next_value;
        self.next_value += 1;
        value
    }

    /// Calls a new random operation for client `index`.
    fn begin_op(&mut self, index: usize, client: &mut Client<'_>) -> InFlightOp {
        let now = client.now();
        let key = client.rng().range(0, self.config.keys - 1);
        let input = match client.rng().range(0, 9) {
            0..=3 => Input::Get,
            4..=6 => Input::Put {
                value: self.fresh_value(),
            },
            _ => {
                let from = match client.rng().range(0, 9) {
                    0..=6 => self.latest.get(&key).copied(),
                    7 => None,
                    _ => Some(client.rng().range(1, self.next_value)),
                };
                Input::Cas {
                    from,
                    to: self.fresh_value(),
                }
            }
        };
        let op_id = self.next_op_id;
        self.next_op_id += 1;
        let pending = self.recorder.call(self.clients[index].id, key, input);
        self.report.0.borrow_mut().ops_called += 1;
        InFlightOp {
            pending,
            op_id,
            key,
            input,
            deadline: now + self.config.op_timeout_ticks * TICK,
        }
    }

    /// The node client `index` sends to: usually the leader it believes in.
    fn pick_node(&mut self, index: usize, input: Input, client: &mut Client<'_>) -> Option<NodeId> {
        let live: Vec<NodeId> = client.nodes().iter().map(|node| node.id).collect();
        let unsafe_read = input == Input::Get && self.config.read_mode == ReadMode::LocalUnsafe;
        let random = unsafe_read || client.rng().chance(self.config.random_node_per_million);
        let believed = self.clients[index]
            .believed_leader
            .filter(|node| live.contains(node));
        match believed {
            Some(node) if !random => Some(node),
            _ if random => client.rng().pick(&live),
            _ => client.leader().or_else(|| client.rng().pick(&live)),
        }
    }

    /// Sends `op` for client `index`; the phase it moves to.
    fn send(&mut self, index: usize, op: InFlightOp, client: &mut Client<'_>) -> Phase {
        let now = client.now();
        let Some(node) = self.pick_node(index, op.input, client) else {
            return self.retry_later(op, now);
        };
        let sent = match op.input {
            Input::Get if self.config.read_mode == ReadMode::LocalUnsafe => {
                let seen = self.machine(node).get(op.key);
                self.recorder.complete(op.pending, Output::Got(seen));
                self.report.0.borrow_mut().ops_returned += 1;
                return Phase::Answered;
            }
            Input::Get => {
                let ctx = self.next_read_ctx;
                self.next_read_ctx += 1;
                client.read_index(node, ctx).map(|()| Ticket::Read {
                    node,
                    ctx,
                    resend_at: now + self.config.read_attempt_timeout_ticks * TICK,
                })
            }
            Input::Put { .. } | Input::Cas { .. } => {
                let command = Command {
                    op_id: op.op_id,
                    key: op.key,
                    input: op.input,
                };
                client
                    .propose(node, command.encode())
                    .map(|proposed| Ticket::Write {
                        node,
                        index: proposed.index,
                        term: proposed.term,
                    })
            }
        };
        match sent {
            Ok(ticket) => {
                match ticket {
                    Ticket::Write {
                        node,
                        index: at,
                        term,
                    } => {
                        let waiting = self.writes_waiting.entry((node, at)).or_default();
                        assert!(
                            waiting.iter().all(|(other, _)| *other != term),
                            "one entry per (index, term) in a log"
                        );
                        waiting.push((term, index));
                    }
                    Ticket::Read { ctx, .. } => {
                        self.reads_waiting.insert(ctx, index);
                    }
                }
                self.clients[index].believed_leader = Some(node);
                Phase::Waiting { op, ticket }
            }
            Err(error) => {
                self.clients[index].believed_leader = match error {
                    RaftError::NotLeader { leader } => leader,
                    RaftError::TransferInProgress { target } => Some(target),
                    _ => None,
                };
                self.retry_later(op, now)
            }
        }
    }

    fn retry_later(&mut self, op: InFlightOp, now: u64) -> Phase {
        self.report.0.borrow_mut().retries += 1;
        Phase::Sending {
            op,
            send_at: now + self.config.retry_backoff_ticks * TICK,
        }
    }

    /// Gives up on `op`: its outcome stays unknown. Returns the next (idle) phase.
    fn abandon(&mut self, op: InFlightOp, ticket: Option<Ticket>, now: u64) -> Phase {
        self.forget(ticket);
        self.recorder.abandon(op.pending);
        self.report.0.borrow_mut().ops_unknown += 1;
        Phase::Idle { next_op_at: now }
    }

    fn forget(&mut self, ticket: Option<Ticket>) {
        match ticket {
            Some(Ticket::Write { node, index, term }) => {
                if let Some(waiting) = self.writes_waiting.get_mut(&(node, index)) {
                    waiting.retain(|(other, _)| *other != term);
                    if waiting.is_empty() {
                        self.writes_waiting.remove(&(node, index));
                    }
                }
            }
            Some(Ticket::Read { ctx, .. }) => {
                self.reads_waiting.remove(&ctx);
            }
            None => {}
        }
    }

    fn finish_op(&mut self, index: usize, output: Output) {
        let phase = std::mem::replace(&mut self.clients[index].phase, Phase::Answered);
        let Phase::Waiting { op, .. } = phase else {
            unreachable!("only a waiting client receives an answer");
        };
        self.recorder.complete(op.pending, output);
        self.report.0.borrow_mut().ops_returned += 1;
    }

    /// Advances client `index` by one step.
    fn step_client(&mut self, index: usize, client: &mut Client<'_>) {
        let now = client.now();
        let phase = std::mem::replace(
            &mut self.clients[index].phase,
            Phase::Idle { next_op_at: now },
        );
        let next = match phase {
            Phase::Answered => Phase::Idle {
                next_op_at: now
                    + client
                        .rng()
                        .range(0, self.config.think_time_max_ticks * TICK),
            },
            Phase::Idle { next_op_at } if now >= next_op_at => {
                let op = self.begin_op(index, client);
                self.send(index, op, client)
            }
            Phase::Sending { op, .. } if now >= op.deadline => self.abandon(op, None, now),
            Phase::Sending { op, send_at } if now >= send_at => self.send(index, op, client),
            Phase::Waiting { op, ticket } if now >= op.deadline => {
                self.abandon(op, Some(ticket), now)
            }
            Phase::Waiting {
                op,
                ticket: ticket @ Ticket::Read { resend_at, .. },
            } if now >= resend_at => {
                self.forget(Some(ticket));
                self.send(index, op, client)
            }
            unchanged => unchanged,
        };
        self.clients[index].phase = next;
    }

    fn machine(&mut self, node: NodeId) -> &mut KvMachine {
        self.machines
            .get_mut(&node)
            .expect("the simulator restores a node's state machine before it applies or reads")
    }

    fn check_history(&self, history: &History) -> Result<(), String> {
        let report = lincheck::check(history, self.config.check_limits);
        let mut shared = self.report.0.borrow_mut();
        shared.states_explored = report.states_explored;
        match &report.verdict {
            Verdict::Linearizable => {
                shared.linearizable = Some(true);
                Ok(())
            }
            Verdict::Unknown { keys } => Err(format!(
                "kv history undecided: search bound of {} states hit on keys {keys:?}",
                self.config.check_limits.states_explored_max_per_key
            )),
            Verdict::NotLinearizable(violation) => {
                shared.linearizable = Some(false);
                shared.explanation = Some(report.explain(history));
                let stuck = history
                    .get(violation.stuck)
                    .map_or_else(String::new, ToString::to_string);
                Err(format!(
                    "kv history not linearizable on key {}: {} ({stuck}) cannot take effect \
                     after a legal prefix of {} ops",
                    violation.key,
                    violation.stuck,
                    violation.longest_prefix.len()
                ))
            }
        }
    }
}

impl Workload for KvWorkload {
    fn on_step(&mut self, client: &mut Client<'_>) {
        for index in 0..self.clients.len() {
            self.step_client(index, client);
        }
    }

    fn on_applied(&mut self, node: NodeId, entry: &Entry, now: u64) {
        let Some(command) = Command::decode(entry) else {
            return;
        };
        let output = self.machine(node).apply(&command);
        if matches!(output, Output::PutDone | Output::CasSwapped) {
            let (Input::Put { value: written } | Input::Cas { to: written, .. }) = command.input
            else {
                unreachable!("writes are puts and compare-and-sets");
            };
            self.latest.insert(command.key, written);
        }
        let waiting = self
            .writes_waiting
            .remove(&(node, entry.index))
            .unwrap_or_default();
        for (term, index) in waiting {
            if term == entry.term {
                self.finish_op(index, output);
                continue;
            }
            // Another entry was committed at our index: ours never will be. Send it again.
            let phase = std::mem::replace(
                &mut self.clients[index].phase,
                Phase::Idle { next_op_at: now },
            );
            let Phase::Waiting {
                op,
                ticket: Ticket::Write { .. },
            } = phase
            else {
                unreachable!("writes_waiting only names clients waiting for a write");
            };
            self.clients[index].phase = self.retry_later(op, now);
        }
    }

    fn on_read_ready(&mut self, node: NodeId, read: ReadState, _now: u64) {
        let Some(index) = self.reads_waiting.remove(&read.ctx) else {
            return; // an attempt the client already gave up on
        };
        let Phase::Waiting {
            op: InFlightOp { key, .. },
            ticket: Ticket::Read { node: asked, .. },
        } = self.clients[index].phase
        else {
            unreachable!("reads_waiting only names clients waiting for a read");
        };
        assert_eq!(
            asked, node,
            "a read is confirmed on the node it was asked of"
        );
        let seen = self.machine(node).get(key);
        self.finish_op(index, Output::Got(seen));
    }

    fn on_crash(&mut self, node: NodeId) {
        self.machines.remove(&node);
        for index in 0..self.clients.len() {
            let on_crashed_node = matches!(
                self.clients[index].phase,
                Phase::Waiting { ticket: Ticket::Write { node: n, .. } | Ticket::Read { node: n, .. }, .. }
                    if n == node
            );
            if !on_crashed_node {
                continue;
            }
            let phase = std::mem::replace(
                &mut self.clients[index].phase,
                Phase::Idle { next_op_at: 0 },
            );
            let Phase::Waiting { op, ticket } = phase else {
                unreachable!("matched above");
            };
            // The connection broke: a write may or may not have been appended and
            // replicated, so its outcome is unknown; a read can simply be asked again.
            self.clients[index].phase = match ticket {
                Ticket::Write { .. } => self.abandon(op, Some(ticket), 0),
                Ticket::Read { .. } => {
                    self.forget(Some(ticket));
                    self.retry_later(op, 0)
                }
            };
        }
    }

    fn snapshot(&mut self, node: NodeId) -> Bytes {
        self.machines.entry(node).or_default().encode()
    }

    fn restore(&mut self, node: NodeId, data: &Bytes) {
        self.machines.insert(node, KvMachine::decode(data));
    }

    fn finish(&mut self, now: u64) -> Result<(), String> {
        for index in 0..self.clients.len() {
            let phase = std::mem::replace(
                &mut self.clients[index].phase,
                Phase::Idle { next_op_at: now },
            );
            match phase {
                Phase::Idle { .. } | Phase::Answered => {}
                Phase::Sending { op, .. } => {
                    self.abandon(op, None, now);
                }
                Phase::Waiting { op, ticket } => {
                    self.abandon(op, Some(ticket), now);
                }
            }
        }
        let history = self.recorder.history();
        self.check_history(&history)
    }
}

/// Installs a fresh [`KvWorkload`] with `config` on `sim`; the handle reads its report.
pub fn install(sim: &mut Sim, config: KvWorkloadConfig) -> KvReportHandle {
    let (workload, report) = KvWorkload::new(config);
    sim.set_workload(Box::new(workload));
    report
}

/// Runs one seed with the key-value workload: the simulator's outcome (a non-linearizable
/// history is its violation) and the workload's report.
pub fn run_seed_with_kv(
    seed: u64,
    config: &SimConfig,
    kv_config: &KvWorkloadConfig,
) -> (super::SeedOutcome, KvReport) {
    let handle = RefCell::new(None);
    let outcome = super::run_seed_with(seed, config, |sim| {
        *handle.borrow_mut() = Some(install(sim, kv_config.clone()));
    });
    let report = handle
        .into_inner()
        .map(|handle| handle.report())
        .unwrap_or_default();
    (outcome, report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeds the workload test runs (the example runs any range).
    const KV_TEST_SEEDS: u64 = 40;

    fn entry(data: Bytes) -> Entry {
        Entry {
            term: 1,
            index: 1,
            kind: EntryKind::Normal,
            data,
        }
    }

    #[test]
    fn commands_round_trip_and_foreign_payloads_are_ignored() {
        let commands = [
            Command {
                op_id: 9,
                key: 2,
                input: Input::Put { value: 77 },
            },
            Command {
                op_id: 10,
                key: 1,
                input: Input::Cas { from: None, to: 3 },
            },
            Command {
                op_id: 11,
                key: 0,
                input: Input::Cas {
                    from: Some(0),
                    to: 4,
                },
            },
        ];
        for command in commands {
            assert_eq!(Command::decode(&entry(command.encode())), Some(command));
        }
        assert_eq!(Command::decode(&entry(Bytes::from_static(&[7; 16]))), None);
        assert_eq!(
            Command::decode(&entry(Bytes::from(vec![0; COMMAND_BYTES]))),
            None
        );
        let mut membership = entry(commands[0].encode());
        membership.kind = EntryKind::Membership;
        assert_eq!(Command::decode(&membership), None);
    }

    #[test]
    fn machine_applies_writes_and_survives_a_snapshot() {
        let mut machine = KvMachine::default();
        let put = |key, value| Command {
            op_id: 0,
            key,
            input: Input::Put { value },
        };
        let cas = |key, from, to| Command {
            op_id: 0,
            key,
            input: Input::Cas { from, to },
        };
        assert_eq!(machine.apply(&cas(1, None, 5)), Output::CasSwapped);
        assert_eq!(machine.apply(&cas(1, None, 6)), Output::CasFailed);
        assert_eq!(machine.apply(&put(2, 8)), Output::PutDone);
        assert_eq!(machine.apply(&cas(2, Some(8), 9)), Output::CasSwapped);
        assert_eq!(
            (machine.get(1), machine.get(2), machine.get(3)),
            (Some(5), Some(9), None)
        );
        assert_eq!(KvMachine::decode(&machine.encode()), machine);
        assert_eq!(KvMachine::decode(&Bytes::new()), KvMachine::default());
    }

    #[test]
    fn kv_histories_of_many_seeds_are_linearizable() {
        let config = SimConfig::default();
        let kv_config = KvWorkloadConfig::default();
        let mut failures = Vec::new();
        let mut total = KvReport::default();
        for seed in 0..KV_TEST_SEEDS {
            let (outcome, report) = run_seed_with_kv(seed, &config, &kv_config);
            if let Some(violation) = outcome.violation {
                failures.push(format!(
                    "seed {seed}: {violation}\n{}  repro: {}",
                    report.explanation.unwrap_or_default(),
                    super::super::repro_command(seed, config.steps)
                ));
                continue;
            }
            assert_eq!(report.linearizable, Some(true), "seed {seed} was checked");
            total.ops_called += report.ops_called;
            total.ops_returned += report.ops_returned;
            total.ops_unknown += report.ops_unknown;
            total.retries += report.retries;
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        // The runs must do real work, including the paths that produce unknown outcomes
        // and retries, or "no violation" proves little.
        assert!(total.ops_returned > KV_TEST_SEEDS * 50, "{total:?}");
        assert!(total.ops_unknown > 0, "{total:?}");
        assert!(total.retries > 0, "{total:?}");
        assert_eq!(total.ops_called, total.ops_returned + total.ops_unknown);
    }

    #[test]
    fn unsafe_local_reads_are_caught_as_not_linearizable() {
        let config = SimConfig::default();
        let kv_config = KvWorkloadConfig {
            read_mode: ReadMode::LocalUnsafe,
            ..KvWorkloadConfig::default()
        };
        let caught = (0..KV_TEST_SEEDS)
            .filter(|&seed| {
                let (outcome, report) = run_seed_with_kv(seed, &config, &kv_config);
                let caught = report.linearizable == Some(false);
                if caught {
                    let violation = outcome.violation.expect("a violation is reported");
                    assert!(violation.contains("not linearizable"), "{violation}");
                }
                caught
            })
            .count();
        assert!(
            caught > 0,
            "stale reads from followers went unnoticed in every seed"
        );
    }
}
