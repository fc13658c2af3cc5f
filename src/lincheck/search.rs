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
//! point after their call or never. Such an operation is legal in every state (a put always
//! applies; a compare-and-set either swaps or fails), so the search succeeds as soon as every
//! operation that did return is linearized: the unknown ones left over are "never". They are
//! kept in a list of their own (walked in time order together with the other one) so that three
//! reductions can prune them, each sound because the configuration it skips is isomorphic to,
//! or reachable from, one the search explores anyway:
//! - an unknown operation that would change nothing (a compare-and-set that would fail, a put
//!   of the current value) is not spent: the configuration it leads to has the same value
//!   and one option fewer than the current one;
//! - an unknown put is never tried right after another unknown operation: the sibling that
//!   spends the put alone reaches the same value with less spent (nothing observed the first);
//! - of the unknown puts (or compare-and-sets from the current value) that write values no
//!   pending operation observes, only one is tried per configuration: they are
//!   interchangeable (see [`Search::blind_class`]). Without this,
//!   every dead end would try each write abandoned anywhere earlier in the history, and k
//!   abandoned writes would multiply the configurations by up to 2^k.
//!
//! The set of linearized operations is cached as a 128-bit fingerprint ([`SetFingerprint`]).
//!
//! This module owns only the search; it must never decide anything about keys other than
//! the one it is given.

use std::collections::{HashMap, HashSet};
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

/// Explored configurations: (operations linearized, value).
type Cache = HashSet<(SetFingerprint, State), BuildHasherDefault<WordHasher>>;

/// Which list an event belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    /// Operations that returned.
    Returned,
    /// Operations with an unknown outcome.
    Unknown,
    /// Puts with an unknown outcome whose values nothing in the whole history observes
    /// (writes abandoned and never seen): all interchangeable, so only the earliest is ever
    /// a candidate, found in O(1) instead of by walking them all at every step.
    Unseen,
}

/// Where the search is looking for the next candidate: a position in each list; the next
/// event is whichever of the two comes first in time.
#[derive(Clone, Copy, Debug)]
struct Cursor {
    returned: usize,
    unknown: usize,
    /// The classes of interchangeable unknown operations already tried from this
    /// configuration (bits of [`BlindClass`], see [`Search::blind_class`]).
    blind_tried: u8,
}

/// A class of unknown operations that all write a value no pending operation observes, and
/// are interchangeable from the current configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum BlindClass {
    /// Puts.
    Put = 1,
    /// Compare-and-sets from the current value.
    Swap = 2,
}

/// The next event the search meets.
enum Candidate {
    /// A call to try to linearize now.
    Call { side: Side, node: usize, op: usize },
    /// The first pending return: no candidate is left, `op` cannot be linearized here.
    Limit { op: usize },
}

/// One linearization choice, kept to undo it.
struct Choice {
    /// The cursor that found the candidate: where to resume after undoing it.
    at: Cursor,
    side: Side,
    node: usize,
    op: usize,
    state_before: State,
}

/// The search over one key's operations.
struct Search<'a> {
    operations: &'a [(OpId, Operation)],
    returned: EventList,
    unknown: EventList,
    unseen: EventList,
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
        let observes: Vec<Option<Value>> = operations
            .iter()
            .map(|(_, operation)| observed_value(operation))
            .collect();
        let mut observers_pending: HashMap<Value, u32, BuildHasherDefault<WordHasher>> =
            HashMap::default();
        for value in observes.iter().flatten() {
            *observers_pending.entry(*value).or_default() += 1;
        }
        let unseen_put = |op: usize| {
            let Input::Put { value } = operations[op].1.input else {
                return false;
            };
            unknown_ordinal[op] != usize::MAX && !observers_pending.contains_key(&value)
        };
        let mut returned_events = Vec::new();
        let mut unknown_events = Vec::new();
        let mut unseen_events = Vec::new();
        for event in ranked {
            let (_, op, _) = event;
            if unseen_put(op) {
                unseen_events.push(event);
            } else if unknown_ordinal[op] != usize::MAX {
                unknown_events.push(event);
            } else {
                returned_events.push(event);
            }
        }
        Self {
            observes,
            observers_pending,
            operations,
            returned: EventList::new(&returned_events),
            unknown: EventList::new(&unknown_events),
            unseen: EventList::new(&unseen_events),
            unknown_ordinal,
            returned_total: operations.len() - unknown_count,
            returned_linearized: 0,
            linearized: SetFingerprint::default(),
            state: None,
            stack: Vec::new(),
            cache: Cache::default(),
            states_explored: 0,
            states_explored_max,
            longest_prefix: Vec::new(),
            stuck: None,
        }
    }

    fn list(&mut self, side: Side) -> &mut EventList {
        match side {
            Side::Returned => &mut self.returned,
            Side::Unknown => &mut self.unknown,
            Side::Unseen => &mut self.unseen,
        }
    }

    fn fresh_cursor(&self) -> Cursor {
        Cursor {
            returned: self.returned.first(),
            unknown: self.unknown.first(),
            blind_tried: 0,
        }
    }

    /// The cursor past `node` (on `side`), where an operation of class `blind` was tried.
    fn advance(
        &self,
        mut cursor: Cursor,
        side: Side,
        node: usize,
        blind: Option<BlindClass>,
    ) -> Cursor {
        match side {
            Side::Returned => cursor.returned = self.returned.next[node],
            Side::Unknown => cursor.unknown = self.unknown.next[node],
            // Only the head of `unseen` is ever tried; its class bit now blocks the others.
            Side::Unseen => {}
        }
        cursor.blind_tried |= blind.map_or(0, |class| class as u8);
        cursor
    }

    fn candidate(&self, cursor: Cursor) -> Candidate {
        // The earliest unseen write is a candidate at its place in time, unless a put of its
        // class was tried from this configuration already.
        let head = self.unseen.first();
        let put_tried = cursor.blind_tried & BlindClass::Put as u8 != 0;
        let unseen_rank = if put_tried {
            usize::MAX
        } else {
            self.unseen.rank[head]
        };
        let earliest_other =
            self.unknown.rank[cursor.unknown].min(self.returned.rank[cursor.returned]);
        if unseen_rank < earliest_other {
            let Event::Call { op, .. } = self.unseen.events[head] else {
                unreachable!("the unseen list holds calls only");
            };
            return Candidate::Call {
                side: Side::Unseen,
                node: head,
                op,
            };
        }
        if self.unknown.rank[cursor.unknown] < self.returned.rank[cursor.returned] {
            let Event::Call { op, .. } = self.unknown.events[cursor.unknown] else {
                unreachable!("the unknown list holds calls only");
            };
            return Candidate::Call {
                side: Side::Unknown,
                node: cursor.unknown,
                op,
            };
        }
        match self.returned.events[cursor.returned] {
            Event::Call { op, .. } => Candidate::Call {
                side: Side::Returned,
                node: cursor.returned,
                op,
            },
            Event::Return { op } => Candidate::Limit { op },
            Event::Sentinel => {
                unreachable!("an operation that returned is unlinearized: its return is ahead")
            }
        }
    }

    /// Flips `op` in the set of linearized operations.
    fn toggle(&mut self, op: usize) {
        self.linearized.toggle(op);
    }

    /// Records the current configuration; false if it was explored before.
    fn remember(&mut self) -> bool {
        self.cache.insert((self.linearized, self.state))
    }

    /// The class of `op` if it is an unknown operation that would write a value no pending
    /// operation observes: a put, or a compare-and-set from the current value. Spending any
    /// one of a class leads to a configuration equivalent to spending any other: nothing left
    /// can tell the written values apart (every comparison a pending operation makes is with
    /// an observed value), and the one left over is as available as the one spent (called
    /// already, never forced). So from one configuration only the first of each class is
    /// tried; without this, every dead end would try each write abandoned anywhere earlier.
    fn blind_class(&self, op: usize) -> Option<BlindClass> {
        if self.unknown_ordinal[op] == usize::MAX {
            return None;
        }
        let (class, written) = match self.operations[op].1.input {
            Input::Put { value } => (BlindClass::Put, value),
            Input::Cas { from, to } if from == self.state => (BlindClass::Swap, to),
            Input::Cas { .. } | Input::Get => return None,
        };
        let unobserved = self
            .observers_pending
            .get(&written)
            .is_none_or(|count| *count == 0);
        unobserved.then_some(class)
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
            .is_some_and(|choice| choice.side != Side::Returned)
    }

    /// Tries to linearize `op`, whose call is `node` on `side`, found by cursor `at`.
    fn attempt(&mut self, at: Cursor, side: Side, node: usize, op: usize) -> Attempt {
        let blind_write = matches!(self.operations[op].1.input, Input::Put { .. });
        if side != Side::Returned && blind_write && self.last_choice_was_unknown() {
            // Spending unknown u then unknown put p reaches p's value with u and p spent; the
            // sibling choice "p alone" reaches it with only p spent and can do all the same
            // (p was a candidate there too: same returned set, same limit), and nothing
            // observed u in between.
            return Attempt::Rejected;
        }
        let Some(next_state) = step(self.state, &self.operations[op].1) else {
            return Attempt::Rejected;
        };
        if side != Side::Returned && next_state == self.state {
            // An unknown operation that changes nothing (a compare-and-set that would fail, a
            // put of the current value) leads to this very configuration with one option
            // fewer: everything it allows, the current configuration allows.
            return Attempt::Rejected;
        }
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
        let list = self.list(side);
        let returns = list.return_of(node).is_some();
        list.lift(node);
        self.returned_linearized += usize::from(returns);
        self.count_observer(op, true);
        self.stack.push(Choice {
            at,
            side,
            node,
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
        let list = self.list(choice.side);
        list.unlift(choice.node);
        let returns = list.return_of(choice.node).is_some();
        self.returned_linearized -= usize::from(returns);
        self.toggle(choice.op);
        self.count_observer(choice.op, false);
        self.state = choice.state_before;
        let blind = self.blind_class(choice.op);
        Some(self.advance(choice.at, choice.side, choice.node, blind))
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
        let mut cursor = self.fresh_cursor();
        loop {
            if self.returned_linearized == self.returned_total {
                return KeyOutcome::Linearizable;
            }
            match self.candidate(cursor) {
                Candidate::Limit { op } => {
                    // No candidate is left before this return: undo the last choice.
                    if self.stack.len() == self.longest_prefix.len() && self.stuck.is_none() {
                        self.stuck = Some(op);
                    }
                    match self.backtrack() {
                        Some(resume) => cursor = resume,
                        None => return self.not_linearizable(),
                    }
                }
                Candidate::Call { side, node, op } => {
                    let blind = self.blind_class(op);
                    if blind.is_some_and(|class| cursor.blind_tried & class as u8 != 0) {
                        cursor = self.advance(cursor, side, node, blind);
                        continue;
                    }
                    cursor = match self.attempt(cursor, side, node, op) {
                        Attempt::Exhausted => return KeyOutcome::Exhausted,
                        Attempt::Advanced => self.fresh_cursor(),
                        Attempt::Rejected => self.advance(cursor, side, node, blind),
                    };
                }
            }
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
