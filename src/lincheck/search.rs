//! The linearizability search for the operations of one key (one register).
//!
//! This is the Wing & Gong search as refined by Lowe (and used by Knossos and Porcupine):
//! walk the history's call and return events in time order, kept in a doubly linked list;
//! at a call, try to linearize that operation now (apply it to the register), remove it from
//! the list and restart from the head; at a return whose operation is not linearized yet,
//! undo the last choice and try the next candidate. A configuration (operations linearized,
//! register value) already explored leads where it led before, so the search skips it; it
//! stops after a bounded number of configurations and says "unknown" rather than running
//! without end.
//!
//! Operations with an unknown outcome have no return event: they may be linearized at any
//! point after their call or never. Three consequences shape the search:
//! - such an operation is legal in every state (a put always applies; a compare-and-set
//!   either swaps or fails), so the search succeeds as soon as every operation that did
//!   return is linearized: the unknown ones left over are "never";
//! - they live in a list of their own and are tried only after every candidate that did
//!   return, so the search prefers not to spend them;
//! - configurations are compared by dominance, not equality: with the same returned
//!   operations linearized and the same value, a configuration that spent a subset of the
//!   unknown operations can do everything one that spent more can (an unspent unknown
//!   operation is an option, never an obligation). Without this, k unknown writes nobody
//!   observed multiply the configurations by up to 2^k;
//! - an unknown put is never tried right after another unknown operation: the sibling that
//!   spends the put alone dominates that configuration (nothing observed the first one);
//! - of the unknown puts whose values no pending operation observes, only one is tried per
//!   configuration: they are interchangeable (see [`Search::unobserved_put`]).
//!   Together with the two rules above, this keeps the search from exploring supersets of
//!   spent unknown writes before the subsets that dominate them.
//!
//! The returned operations linearized are cached as a 128-bit fingerprint
//! ([`SetFingerprint`]); the unknown ones spent as an exact bitset (they are few), so that
//! subsets can be tested.
//!
//! This module owns only the search; it must never decide anything about keys other than
//! the one it is given.

use std::collections::HashMap;
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

/// The value `operation` needs the register to hold (or not hold) to succeed or fail as
/// recorded: a get's result, a compare-and-set's `from`. `None` (absent) is left out: no put
/// can produce it.
fn observed_value(operation: &Operation) -> Option<Value> {
    match (operation.input, operation.end) {
        (
            Input::Get,
            End::Returned {
                output: Output::Got(seen),
                ..
            },
        ) => seen,
        (Input::Cas { from, .. }, _) => from,
        _ => None,
    }
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

/// What a node of an event list stands for.
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

/// Events in time order, as a doubly linked list over a vector so that removing an operation
/// and putting it back (in reverse order) are O(1). Each node also keeps its `rank`: its
/// position in the time order of all the key's events, to compare events across lists.
struct EventList {
    events: Vec<Event>,
    rank: Vec<usize>,
    next: Vec<usize>,
    prev: Vec<usize>,
}

impl EventList {
    const HEAD: usize = 0;
    const TAIL: usize = 1;

    /// The list of `(rank, op, is_return)` events, given in rank order.
    fn new(ordered: &[(usize, usize, bool)]) -> Self {
        let mut events = vec![Event::Sentinel, Event::Sentinel];
        let mut rank = vec![0, usize::MAX];
        let mut call_node: HashMap<usize, usize> = HashMap::new();
        for &(event_rank, op, is_return) in ordered {
            let node = events.len();
            rank.push(event_rank);
            if is_return {
                let call = call_node[&op];
                let Event::Call { return_node, .. } = &mut events[call] else {
                    unreachable!("a call sorts before its return");
                };
                *return_node = Some(node);
                events.push(Event::Return { op });
            } else {
                call_node.insert(op, node);
                events.push(Event::Call {
                    op,
                    return_node: None,
                });
            }
        }
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
        Self {
            events,
            rank,
            next,
            prev,
        }
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

    fn return_of(&self, call: usize) -> Option<usize> {
        let Event::Call { return_node, .. } = self.events[call] else {
            unreachable!("only calls are linearized");
        };
        return_node
    }

    /// Removes a call (and its return, if any) from the list.
    fn lift(&mut self, call: usize) {
        self.unlink(call);
        if let Some(return_node) = self.return_of(call) {
            self.unlink(return_node);
        }
    }

    /// Undoes [`Self::lift`]; valid only in reverse lift order.
    fn unlift(&mut self, call: usize) {
        if let Some(return_node) = self.return_of(call) {
            self.relink(return_node);
        }
        self.relink(call);
    }
}

/// The unknown-outcome operations spent so far, as a bitset over their ordinals.
type SpentSet = Box<[u64]>;

fn is_subset(small: &[u64], large: &[u64]) -> bool {
    small.iter().zip(large).all(|(s, l)| s & !l == 0)
}

/// Explored configurations: per (returned operations linearized, value), the sets of unknown
/// operations spent with which it was reached, none a superset of another.
type Cache = HashMap<(SetFingerprint, State), Vec<SpentSet>, BuildHasherDefault<WordHasher>>;

/// The first return still pending: candidates must be called before it.
#[derive(Clone, Copy, Debug)]
struct Limit {
    rank: usize,
    op: usize,
}

/// Where the search is looking for the next candidate.
#[derive(Clone, Copy, Debug)]
enum Cursor {
    /// Walking the returned operations' events from `node`.
    Returned(usize),
    /// Walking the unknown operations' calls from `node`, up to `limit`; `blind_tried` once
    /// an unobserved put was tried from this configuration (see [`Search::unobserved_put`]).
    Unknown {
        node: usize,
        limit: Limit,
        blind_tried: bool,
    },
}

/// One linearization choice, kept to undo it.
struct Choice {
    /// Where the candidate was found (its node) and so where to resume after undoing it.
    at: Cursor,
    op: usize,
    state_before: State,
}

/// The search over one key's operations.
struct Search<'a> {
    operations: &'a [(OpId, Operation)],
    returned: EventList,
    unknown: EventList,
    /// Local op index -> ordinal among unknown operations.
    unknown_ordinal: Vec<usize>,
    /// Local op index -> the value it requires the register to hold or not hold (a get's
    /// result, a compare-and-set's `from`), if any.
    observes: Vec<Option<Value>>,
    /// Value -> operations not linearized yet that observe it.
    observers_pending: HashMap<Value, u32, BuildHasherDefault<WordHasher>>,
    returned_total: usize,
    returned_linearized: usize,
    linearized: SetFingerprint,
    spent: SpentSet,
    state: State,
    stack: Vec<Choice>,
    cache: Cache,
    states_explored: u64,
    states_explored_max: u64,
    longest_prefix: Vec<usize>,
    stuck: Option<usize>,
}

/// What trying one candidate did.
enum Attempt {
    /// Linearized: the search moved to a new configuration.
    Advanced,
    /// Illegal here, or leads only where an explored configuration led.
    Rejected,
    /// The bound on explored configurations was hit.
    Exhausted,
}

impl<'a> Search<'a> {
    fn new(operations: &'a [(OpId, Operation)], states_explored_max: u64) -> Self {
        // (time, calls before returns at equal times, op): ties overlap, which is the
        // permissive reading of a clock that cannot tell two events apart.
        let mut order: Vec<(u64, u8, usize)> = Vec::with_capacity(operations.len() * 2);
        let mut unknown_ordinal = vec![usize::MAX; operations.len()];
        let mut unknown_count = 0;
        for (op, (_, operation)) in operations.iter().enumerate() {
            order.push((operation.call_at, 0, op));
            match operation.end {
                End::Returned { at, .. } => order.push((at, 1, op)),
                End::Unknown => {
                    unknown_ordinal[op] = unknown_count;
                    unknown_count += 1;
                }
            }
        }
        order.sort_unstable();
        let ranked = order
            .iter()
            .enumerate()
            .map(|(rank, &(_, kind, op))| (rank, op, kind == 1));
        let (unknown_events, returned_events): (Vec<_>, Vec<_>) =
            ranked.partition(|&(_, op, _)| unknown_ordinal[op] != usize::MAX);
        let observes: Vec<Option<Value>> = operations
            .iter()
            .map(|(_, operation)| observed_value(operation))
            .collect();
        let mut observers_pending: HashMap<Value, u32, BuildHasherDefault<WordHasher>> =
            HashMap::default();
        for value in observes.iter().flatten() {
            *observers_pending.entry(*value).or_default() += 1;
        }
        Self {
            observes,
            observers_pending,
            operations,
            returned: EventList::new(&returned_events),
            unknown: EventList::new(&unknown_events),
            unknown_ordinal,
            returned_total: operations.len() - unknown_count,
            returned_linearized: 0,
            linearized: SetFingerprint::default(),
            spent: vec![0; unknown_count.div_ceil(64)].into_boxed_slice(),
            state: None,
            stack: Vec::new(),
            cache: Cache::default(),
            states_explored: 0,
            states_explored_max,
            longest_prefix: Vec::new(),
            stuck: None,
        }
    }

    fn list(&mut self, cursor: Cursor) -> &mut EventList {
        match cursor {
            Cursor::Returned(_) => &mut self.returned,
            Cursor::Unknown { .. } => &mut self.unknown,
        }
    }

    /// Flips `op` in the sets of linearized operations.
    fn toggle(&mut self, op: usize) {
        match self.unknown_ordinal[op] {
            usize::MAX => self.linearized.toggle(op),
            ordinal => self.spent[ordinal / 64] ^= 1 << (ordinal % 64),
        }
    }

    /// Records the current configuration; false if an explored one dominates it.
    fn remember(&mut self) -> bool {
        let sets = self.cache.entry((self.linearized, self.state)).or_default();
        if sets.iter().any(|known| is_subset(known, &self.spent)) {
            return false;
        }
        sets.retain(|known| !is_subset(&self.spent, known));
        sets.push(self.spent.clone());
        true
    }

    /// Whether `op` is an unknown put of a value no pending operation observes. Spending
    /// any one of those leads to configurations isomorphic to spending any other (nothing
    /// left tells their values apart, and both stay available forever once called), so from
    /// one configuration only the first is tried: without this, every dead end would try each
    /// abandoned write of the whole history.
    fn unobserved_put(&self, op: usize) -> bool {
        let Input::Put { value } = self.operations[op].1.input else {
            return false;
        };
        self.unknown_ordinal[op] != usize::MAX
            && self
                .observers_pending
                .get(&value)
                .is_none_or(|count| *count == 0)
    }

    /// Counts `op` as linearized (`linearized`) or not any more among observers.
    fn count_observer(&mut self, op: usize, linearized: bool) {
        if let Some(value) = self.observes[op] {
            let count = self
                .observers_pending
                .get_mut(&value)
                .expect("every observed value was counted");
            if linearized {
                *count -= 1;
            } else {
                *count += 1;
            }
        }
    }

    /// Whether the last choice spent an unknown operation.
    fn last_choice_was_unknown(&self) -> bool {
        self.stack
            .last()
            .is_some_and(|choice| matches!(choice.at, Cursor::Unknown { .. }))
    }

    /// Tries to linearize the call at `at` (a node of the list the cursor walks).
    fn attempt(&mut self, at: Cursor, node: usize, op: usize) -> Attempt {
        let blind_write = matches!(self.operations[op].1.input, Input::Put { .. });
        if matches!(at, Cursor::Unknown { .. }) && blind_write && self.last_choice_was_unknown() {
            // Spending unknown u then unknown put p reaches (same returned set, p's value,
            // spent + u + p), which the sibling choice "p alone" dominates: p was a candidate
            // there too (same returned set, so the same limit), and nothing observed u.
            return Attempt::Rejected;
        }
        let Some(next_state) = step(self.state, &self.operations[op].1) else {
            return Attempt::Rejected;
        };
        let state_before = self.state;
        self.toggle(op);
        self.state = next_state;
        if !self.remember() {
            self.toggle(op);
            self.state = state_before;
            return Attempt::Rejected;
        }
        self.states_explored += 1;
        if self.states_explored > self.states_explored_max {
            return Attempt::Exhausted;
        }
        let list = self.list(at);
        let returns = list.return_of(node).is_some();
        list.lift(node);
        self.returned_linearized += usize::from(returns);
        self.count_observer(op, true);
        self.stack.push(Choice {
            at,
            op,
            state_before,
        });
        if self.stack.len() > self.longest_prefix.len() {
            self.longest_prefix = self.stack.iter().map(|choice| choice.op).collect();
            self.stuck = None;
        }
        Attempt::Advanced
    }

    /// Undoes the last choice; the cursor just past it, or `None` if there is none.
    fn backtrack(&mut self) -> Option<Cursor> {
        let choice = self.stack.pop()?;
        let node = match choice.at {
            Cursor::Returned(node) | Cursor::Unknown { node, .. } => node,
        };
        let list = self.list(choice.at);
        list.unlift(node);
        let returns = list.return_of(node).is_some();
        let after = list.next[node];
        self.returned_linearized -= usize::from(returns);
        self.toggle(choice.op);
        self.count_observer(choice.op, false);
        self.state = choice.state_before;
        Some(match choice.at {
            Cursor::Returned(_) => Cursor::Returned(after),
            Cursor::Unknown {
                limit, blind_tried, ..
            } => Cursor::Unknown {
                node: after,
                limit,
                blind_tried: blind_tried || self.unobserved_put(choice.op),
            },
        })
    }

    fn not_linearizable(&self) -> KeyOutcome {
        let stuck = self.stuck.expect("a return ended the longest prefix");
        KeyOutcome::NotLinearizable {
            longest_prefix: self
                .longest_prefix
                .iter()
                .map(|&op| self.operations[op].0)
                .collect(),
            stuck: self.operations[stuck].0,
        }
    }

    fn run(&mut self) -> KeyOutcome {
        let mut cursor = Cursor::Returned(self.returned.first());
        loop {
            if self.returned_linearized == self.returned_total {
                return KeyOutcome::Linearizable;
            }
            let attempt = match cursor {
                Cursor::Returned(node) => match self.returned.events[node] {
                    Event::Sentinel => {
                        unreachable!(
                            "an operation that returned is unlinearized: its return is ahead"
                        )
                    }
                    Event::Return { op } => {
                        let limit = Limit {
                            rank: self.returned.rank[node],
                            op,
                        };
                        cursor = Cursor::Unknown {
                            node: self.unknown.first(),
                            limit,
                            blind_tried: false,
                        };
                        continue;
                    }
                    Event::Call { op, .. } => self.attempt(cursor, node, op),
                },
                Cursor::Unknown {
                    node,
                    limit,
                    blind_tried,
                } => {
                    if self.unknown.rank[node] > limit.rank {
                        // No candidate is left before this return: undo the last choice.
                        if self.stack.len() == self.longest_prefix.len() && self.stuck.is_none() {
                            self.stuck = Some(limit.op);
                        }
                        match self.backtrack() {
                            Some(resume) => cursor = resume,
                            None => return self.not_linearizable(),
                        }
                        continue;
                    }
                    let Event::Call { op, .. } = self.unknown.events[node] else {
                        unreachable!("the unknown list holds calls only");
                    };
                    if self.unobserved_put(op) {
                        let next = Cursor::Unknown {
                            node: self.unknown.next[node],
                            limit,
                            blind_tried: true,
                        };
                        if blind_tried {
                            cursor = next;
                            continue;
                        }
                        match self.attempt(cursor, node, op) {
                            Attempt::Rejected => {
                                cursor = next;
                                continue;
                            }
                            other => other,
                        }
                    } else {
                        self.attempt(cursor, node, op)
                    }
                }
            };
            cursor = match (attempt, cursor) {
                (Attempt::Exhausted, _) => return KeyOutcome::Exhausted,
                (Attempt::Advanced, _) => Cursor::Returned(self.returned.first()),
                (Attempt::Rejected, Cursor::Returned(node)) => {
                    Cursor::Returned(self.returned.next[node])
                }
                (
                    Attempt::Rejected,
                    Cursor::Unknown {
                        node,
                        limit,
                        blind_tried,
                    },
                ) => Cursor::Unknown {
                    node: self.unknown.next[node],
                    limit,
                    blind_tried,
                },
            };
        }
    }
}

/// Searches for a linearization of `operations`, all on one key, from an absent value.
/// Gives up with [`KeyOutcome::Exhausted`] after `states_explored_max` configurations.
pub(crate) fn search_key(operations: &[(OpId, Operation)], states_explored_max: u64) -> KeySearch {
    let mut search = Search::new(operations, states_explored_max);
    let outcome = search.run();
    KeySearch {
        outcome,
        states_explored: search.states_explored,
    }
}
