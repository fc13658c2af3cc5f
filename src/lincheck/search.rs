//! The linearizability search for the operations of one key (one register).
//!
//! This is the Wing & Gong search as refined by Lowe (and used by Knossos and Porcupine):
//! walk the history's call and return events in time order, kept in a doubly linked list;
//! at a call, try to linearize that operation now (apply it to the register), remove it from
//! the list and restart from the head; at a return whose operation is not linearized yet,
//! undo the last choice and try the next candidate. Every (set of linearized operations,
//! register value) configuration is explored at most once (sets are cached as 128-bit
//! fingerprints, see [`SetFingerprint`]): a configuration already in the
//! cache leads where it led before, so the search skips it. The search stops after a bounded
//! number of configurations and says "unknown" rather than running without end.
//!
//! Operations with an unknown outcome have no return event: they may be linearized at any
//! point after their call or never. Because such an operation is legal in every state (a put
//! always applies; a compare-and-set either swaps or fails), the search succeeds as soon as
//! every operation that did return is linearized; the unknown ones left over are "never".
//!
//! This module owns only the search; it must never allocate per event beyond the cache, and
//! never decide anything about keys other than the one it is given.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

use super::history::{End, Input, OpId, Operation, Output, Value};

/// The register's state: its value, `None` while absent.
type State = Option<Value>;

/// What the search concluded for one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum KeyOutcome {
    /// A legal order exists.
    Linearizable,
    /// No legal order exists.
    NotLinearizable {
        /// The longest legal prefix of a linearization that the search found, in order.
        longest_prefix: Vec<OpId>,
        /// The operation whose return ended that prefix: it had to take effect before it
        /// returned, and could not.
        stuck: OpId,
    },
    /// The search hit its bound before deciding.
    Exhausted,
}

/// The result of searching one key, with the work it took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KeySearch {
    pub(crate) outcome: KeyOutcome,
    /// Distinct configurations visited.
    pub(crate) states_explored: u64,
}

/// Applies `operation` to a register holding `state`: the next state, or `None` when the
/// operation's recorded output is impossible in `state`.
fn step(state: State, operation: &Operation) -> Option<State> {
    let output = match operation.end {
        End::Returned { output, .. } => Some(output),
        End::Unknown => None,
    };
    match (operation.input, output) {
        (Input::Get, Some(Output::Got(seen))) => (seen == state).then_some(state),
        (Input::Get, _) => unreachable!("History drops unobserved reads and checks outputs"),
        (Input::Put { value }, _) => Some(Some(value)),
        (Input::Cas { from, to }, Some(Output::CasSwapped)) => (state == from).then_some(Some(to)),
        (Input::Cas { from, .. }, Some(Output::CasFailed)) => (state != from).then_some(state),
        (Input::Cas { from, to }, None) => Some(if state == from { Some(to) } else { state }),
        (Input::Cas { .. }, Some(_)) => unreachable!("History checks outputs answer inputs"),
    }
}

/// A 128-bit fingerprint of a set of operations (Zobrist hashing: the XOR of a fixed
/// pseudo-random 128-bit code per operation), updated in O(1) when an operation joins or
/// leaves the set.
///
/// WHY a fingerprint and not the set itself: storing the set makes every cached configuration
/// cost O(ops) bytes and O(ops) time to copy, so one key with tens of thousands of operations
/// needs gigabytes. Two distinct sets share a fingerprint with probability 2^-128 per pair;
/// over the at most [`STATES_EXPLORED_MAX_PER_KEY_DEFAULT`](super::STATES_EXPLORED_MAX_PER_KEY_DEFAULT)
/// (about 2^21) configurations of a search that is below 2^-86, and a collision could only
/// prune a configuration (a false "not linearizable"), never accept an illegal history. The
/// codes are a fixed function of the operation's index, so every run is reproducible.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
struct SetFingerprint {
    low: u64,
    high: u64,
}

impl SetFingerprint {
    /// Adds `op` if absent, removes it if present.
    fn toggle(&mut self, op: usize) {
        let index = op as u64;
        self.low ^= split_mix(index.wrapping_mul(2));
        self.high ^= split_mix(index.wrapping_mul(2).wrapping_add(1));
    }
}

/// The SplitMix64 output function: a bijective mix of `seed`'s bits.
fn split_mix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A fast, non-cryptographic hasher for cache keys (the cache never sees untrusted input
/// that could be crafted to collide, and SipHash would dominate the search's time).
#[derive(Default)]
struct WordHasher {
    hash: u64,
}

impl WordHasher {
    /// A large odd constant with well-mixed bits (from the golden ratio).
    const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

    fn mix(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(Self::MULTIPLIER);
    }
}

impl Hasher for WordHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.mix(u64::from_le_bytes(
                chunk.try_into().expect("chunks_exact yields 8 bytes"),
            ));
        }
        for &byte in chunks.remainder() {
            self.mix(u64::from(byte));
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.mix(word);
    }

    fn finish(&self) -> u64 {
        // Fold the high bits down: hashbrown picks buckets from the low bits.
        self.hash ^ (self.hash >> 32)
    }
}

type Cache = HashSet<(SetFingerprint, State), BuildHasherDefault<WordHasher>>;

/// What a node of the event list stands for.
#[derive(Clone, Copy, Debug)]
enum Event {
    /// A sentinel (list head or tail).
    Sentinel,
    /// Operation `op` (local index) was called; `return_node` is its return, if it has one.
    Call {
        op: usize,
        return_node: Option<usize>,
    },
    /// Operation `op` (local index) returned.
    Return { op: usize },
}

/// The events of one key in time order, as a doubly linked list over a vector so that
/// removing an operation and putting it back (in reverse order) are O(1).
struct EventList {
    events: Vec<Event>,
    next: Vec<usize>,
    prev: Vec<usize>,
}

impl EventList {
    const HEAD: usize = 0;
    const TAIL: usize = 1;

    fn new(operations: &[(OpId, Operation)]) -> Self {
        // (time, calls before returns at equal times, op, is_return): ties overlap, which
        // is the permissive reading of a clock that cannot tell two events apart.
        let mut order: Vec<(u64, u8, usize)> = Vec::with_capacity(operations.len() * 2);
        for (op, (_, operation)) in operations.iter().enumerate() {
            order.push((operation.call_at, 0, op));
            if let End::Returned { at, .. } = operation.end {
                order.push((at, 1, op));
            }
        }
        order.sort_unstable();

        let mut events = vec![Event::Sentinel, Event::Sentinel];
        let mut call_node = vec![usize::MAX; operations.len()];
        for &(_, kind, op) in &order {
            let node = events.len();
            if kind == 0 {
                call_node[op] = node;
                events.push(Event::Call {
                    op,
                    return_node: None,
                });
            } else {
                let Event::Call { return_node, .. } = &mut events[call_node[op]] else {
                    unreachable!("a call sorts before its return");
                };
                *return_node = Some(node);
                events.push(Event::Return { op });
            }
        }

        // Chain HEAD -> events in order -> TAIL.
        let count = events.len();
        let mut next = vec![Self::TAIL; count];
        let mut prev = vec![Self::HEAD; count];
        let chain: Vec<usize> = std::iter::once(Self::HEAD)
            .chain(2..count)
            .chain(std::iter::once(Self::TAIL))
            .collect();
        for pair in chain.windows(2) {
            next[pair[0]] = pair[1];
            prev[pair[1]] = pair[0];
        }
        Self { events, next, prev }
    }

    fn first(&self) -> usize {
        self.next[Self::HEAD]
    }

    fn unlink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = next;
        self.prev[next] = prev;
    }

    /// Puts back a node removed by [`Self::unlink`]; valid only in reverse removal order.
    fn relink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = node;
        self.prev[next] = node;
    }

    /// Removes a call (and its return, if any) from the list.
    fn lift(&mut self, call: usize) {
        let Event::Call { return_node, .. } = self.events[call] else {
            unreachable!("only calls are lifted");
        };
        self.unlink(call);
        if let Some(return_node) = return_node {
            self.unlink(return_node);
        }
    }

    /// Undoes [`Self::lift`]; valid only in reverse lift order.
    fn unlift(&mut self, call: usize) {
        let Event::Call { return_node, .. } = self.events[call] else {
            unreachable!("only calls are lifted");
        };
        if let Some(return_node) = return_node {
            self.relink(return_node);
        }
        self.relink(call);
    }
}

/// One linearization choice, kept to undo it.
struct Choice {
    call_node: usize,
    op: usize,
    state_before: State,
}

/// Searches for a linearization of `operations`, all on one key, from an absent value.
/// Gives up with [`KeyOutcome::Exhausted`] after `states_explored_max` configurations.
pub(crate) fn search_key(operations: &[(OpId, Operation)], states_explored_max: u64) -> KeySearch {
    let returned_total = operations
        .iter()
        .filter(|(_, operation)| matches!(operation.end, End::Returned { .. }))
        .count();
    let mut list = EventList::new(operations);
    let mut cache = Cache::default();
    let mut linearized = SetFingerprint::default();
    let mut returned_linearized = 0_usize;
    let mut state: State = None;
    let mut stack: Vec<Choice> = Vec::new();
    let mut states_explored = 0_u64;
    let mut longest_prefix: Vec<usize> = Vec::new();
    let mut stuck: Option<usize> = None;

    let mut node = list.first();
    loop {
        if returned_linearized == returned_total {
            return KeySearch {
                outcome: KeyOutcome::Linearizable,
                states_explored,
            };
        }
        match list.events[node] {
            Event::Sentinel => {
                unreachable!("an operation that returned is unlinearized, so its return is ahead")
            }
            Event::Call { op, return_node } => {
                let operation = &operations[op].1;
                let next_state = step(state, operation);
                let mut advanced = false;
                if let Some(next_state) = next_state {
                    linearized.toggle(op);
                    if cache.insert((linearized, next_state)) {
                        states_explored += 1;
                        if states_explored > states_explored_max {
                            return KeySearch {
                                outcome: KeyOutcome::Exhausted,
                                states_explored,
                            };
                        }
                        stack.push(Choice {
                            call_node: node,
                            op,
                            state_before: state,
                        });
                        state = next_state;
                        returned_linearized += usize::from(return_node.is_some());
                        list.lift(node);
                        node = list.first();
                        advanced = true;
                        if stack.len() > longest_prefix.len() {
                            longest_prefix = stack.iter().map(|choice| choice.op).collect();
                            stuck = None;
                        }
                    } else {
                        linearized.toggle(op);
                    }
                }
                if !advanced {
                    node = list.next[node];
                }
            }
            Event::Return { op } => {
                if stack.len() == longest_prefix.len() && stuck.is_none() {
                    stuck = Some(op);
                }
                let Some(choice) = stack.pop() else {
                    let stuck = stuck.expect("the empty prefix ended at this very return");
                    return KeySearch {
                        outcome: KeyOutcome::NotLinearizable {
                            longest_prefix: longest_prefix
                                .into_iter()
                                .map(|op| operations[op].0)
                                .collect(),
                            stuck: operations[stuck].0,
                        },
                        states_explored,
                    };
                };
                list.unlift(choice.call_node);
                linearized.toggle(choice.op);
                state = choice.state_before;
                let Event::Call { return_node, .. } = list.events[choice.call_node] else {
                    unreachable!("choices are calls");
                };
                returned_linearized -= usize::from(return_node.is_some());
                node = list.next[choice.call_node];
            }
        }
    }
}
