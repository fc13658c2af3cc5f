//! A linearizability checker for key-value (register) histories.
//!
//! Clients call get, put and compare-and-set on keys of a map that starts empty; each call is
//! recorded with its client, call time and either a return (time and result) or an unknown
//! outcome. [`check`] decides whether some total order of the operations respects real time
//! (an operation that returned before another was called comes first) and the semantics of a
//! map. A map is linearizable iff each key's sub-history is (linearizability is local), so
//! the history is split per key and each key searched on its own with the Wing & Gong / Lowe
//! algorithm and a cache of visited configurations (the private `search` module).
//!
//! - [`history`]: operations, histories and the [`Recorder`] workloads fill.
//! - [`jepsen`]: a parser for Jepsen's etcd register logs.
//!
//! This module owns the judgement only: it must never touch a clock, IO or threads (the
//! Jepsen parser reads text it is given), and never run without a bound: the search stops
//! after [`CheckLimits::states_explored_max_per_key`] configurations and answers
//! [`Verdict::Unknown`].

pub mod history;
pub mod jepsen;
mod search;

use std::collections::BTreeMap;
use std::fmt;

pub use history::{
    ClientId, End, History, HistoryError, Input, Key, LogicalTime, OpId, Operation, Output,
    Pending, Recorder, Value,
};

use search::{KeyOutcome, search_key};

/// Configurations (set of linearized operations, value) the search may visit per key before
/// it gives up. Each cached configuration costs about `ops / 8 + 48` bytes, so the default
/// bounds the cache to a few hundred MiB for keys of a few thousand operations.
pub const STATES_EXPLORED_MAX_PER_KEY_DEFAULT: u64 = 2_000_000;

/// Bounds on the work [`check`] does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckLimits {
    /// Configurations visited per key before that key's verdict is "unknown".
    pub states_explored_max_per_key: u64,
}

impl Default for CheckLimits {
    fn default() -> Self {
        Self {
            states_explored_max_per_key: STATES_EXPLORED_MAX_PER_KEY_DEFAULT,
        }
    }
}

/// Why a history is not linearizable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The key whose sub-history has no linearization.
    pub key: Key,
    /// The longest legal order of that key's operations the search found.
    pub longest_prefix: Vec<OpId>,
    /// The operation that ended that prefix: it returned before it could take effect.
    pub stuck: OpId,
}

/// The checker's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Some legal total order exists.
    Linearizable,
    /// No legal total order exists.
    NotLinearizable(Violation),
    /// The search hit its bound on these keys (and found no violation on the others).
    Unknown {
        /// The keys left undecided.
        keys: Vec<Key>,
    },
}

/// The verdict and the work it took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The answer.
    pub verdict: Verdict,
    /// Configurations visited over all keys searched.
    pub states_explored: u64,
    /// Keys searched (the search stops at the first non-linearizable key).
    pub keys_searched: usize,
}

impl Report {
    /// Whether the verdict is [`Verdict::Linearizable`].
    pub fn is_linearizable(&self) -> bool {
        self.verdict == Verdict::Linearizable
    }

    /// A multi-line explanation of a violation, quoting `history`'s operations; empty for
    /// other verdicts.
    pub fn explain(&self, history: &History) -> String {
        let Verdict::NotLinearizable(violation) = &self.verdict else {
            return String::new();
        };
        let mut text = format!(
            "key {}: no linearization; longest legal prefix ({} ops):\n",
            violation.key,
            violation.longest_prefix.len()
        );
        for id in &violation.longest_prefix {
            text.push_str(&format!("  {id}: {}\n", Quoted(history, *id)));
        }
        text.push_str(&format!(
            "then {} could not take effect before it returned: {}\n",
            violation.stuck,
            Quoted(history, violation.stuck)
        ));
        text
    }
}

/// Displays the operation `id` of a history, or says it is missing.
struct Quoted<'a>(&'a History, OpId);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.get(self.1) {
            Some(operation) => write!(f, "{operation}"),
            None => write!(f, "(not in this history)"),
        }
    }
}

/// Decides whether `history` is linearizable for a key-value map whose keys all start
/// absent, within `limits`.
pub fn check(history: &History, limits: CheckLimits) -> Report {
    let mut per_key: BTreeMap<Key, Vec<(OpId, Operation)>> = BTreeMap::new();
    for (index, operation) in history.operations().iter().enumerate() {
        per_key
            .entry(operation.key)
            .or_default()
            .push((OpId(index), *operation));
    }

    let mut states_explored = 0;
    let mut keys_searched = 0;
    let mut undecided = Vec::new();
    for (key, operations) in &per_key {
        let search = search_key(operations, limits.states_explored_max_per_key);
        states_explored += search.states_explored;
        keys_searched += 1;
        match search.outcome {
            KeyOutcome::Linearizable => {}
            KeyOutcome::Exhausted => undecided.push(*key),
            KeyOutcome::NotLinearizable {
                longest_prefix,
                stuck,
            } => {
                let violation = Violation {
                    key: *key,
                    longest_prefix,
                    stuck,
                };
                return Report {
                    verdict: Verdict::NotLinearizable(violation),
                    states_explored,
                    keys_searched,
                };
            }
        }
    }
    let verdict = if undecided.is_empty() {
        Verdict::Linearizable
    } else {
        Verdict::Unknown { keys: undecided }
    };
    Report {
        verdict,
        states_explored,
        keys_searched,
    }
}

#[cfg(test)]
mod tests;
