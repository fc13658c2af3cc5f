//! The agent's check of the assignments chain (`Assignments.applies_to` / `results_in`,
//! `proto/flotilla/dispatcher.proto`): which messages apply to what the agent holds.
//!
//! Owns the last `results_in` of the session and whether a complete set is being received
//! in parts. Pure: no IO, no clock. Must never let an incremental message apply to a state
//! other than the one it was built against: that is a gap, and the session's answer to a
//! gap is a new session (whose first message is a complete set).

use crate::proto::dispatcher as pb;

/// What to do with one assignments message.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// A part of a complete set: `first` starts it, `last` ends it.
    Part {
        /// The set starts with this part (what was held before is replaced once it ends).
        first: bool,
        /// The set ends with this part.
        last: bool,
    },
    /// Changes to what the agent holds.
    Update,
    /// The message applies to a state the agent does not hold: open a new session.
    Gap {
        /// The `results_in` the agent holds.
        held: String,
        /// The message's `applies_to`.
        applies_to: String,
    },
}

/// One session's chain: starts empty (the session's first message applies to `""`).
#[derive(Debug, Default)]
pub struct Chain {
    /// The `results_in` of the last message applied.
    held: String,
    /// The last message was a part of a complete set with more parts to come.
    in_set: bool,
    /// Messages applied on this session.
    applied: u64,
}

impl Chain {
    /// A new session's chain.
    pub fn new() -> Chain {
        Chain::default()
    }

    /// Messages applied on this session so far.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Checks `message` against the chain and, unless it is a gap, moves the chain to its
    /// `results_in`. A message that says `complete` starts a set and applies whatever its
    /// `applies_to` (it replaces everything); any other must apply to what is held.
    pub fn accept(&mut self, message: &pb::Assignments) -> Step {
        if !message.complete && message.applies_to != self.held {
            return Step::Gap {
                held: self.held.clone(),
                applies_to: message.applies_to.clone(),
            };
        }
        let step = if message.complete || self.in_set {
            Step::Part {
                first: message.complete,
                last: !message.more,
            }
        } else {
            Step::Update
        };
        self.in_set = matches!(step, Step::Part { last: false, .. });
        self.held.clone_from(&message.results_in);
        self.applied += 1;
        step
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(complete: bool, more: bool, applies_to: &str, results_in: &str) -> pb::Assignments {
        pb::Assignments {
            complete,
            more,
            applies_to: applies_to.into(),
            results_in: results_in.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_chained_session_applies_a_set_in_parts_then_updates() {
        let mut chain = Chain::new();
        assert_eq!(
            chain.accept(&message(true, true, "", "1")),
            Step::Part {
                first: true,
                last: false
            }
        );
        assert_eq!(
            chain.accept(&message(false, false, "1", "2")),
            Step::Part {
                first: false,
                last: true
            }
        );
        assert_eq!(chain.accept(&message(false, false, "2", "3")), Step::Update);
        assert_eq!(chain.accept(&message(false, false, "3", "4")), Step::Update);
        assert_eq!(chain.applied(), 4);
    }

    #[test]
    fn a_message_built_against_another_state_is_a_gap_and_changes_nothing() {
        let mut chain = Chain::new();
        chain.accept(&message(true, false, "", "1"));
        // "2" was lost: the next one applies to a state the agent never held.
        assert_eq!(
            chain.accept(&message(false, false, "2", "3")),
            Step::Gap {
                held: "1".into(),
                applies_to: "2".into()
            }
        );
        // The chain did not move: the message that does apply still does.
        assert_eq!(chain.accept(&message(false, false, "1", "2")), Step::Update);
        // An incremental message before any set, on a fresh chain, must apply to "".
        let mut fresh = Chain::new();
        assert!(matches!(
            fresh.accept(&message(false, false, "7", "8")),
            Step::Gap { .. }
        ));
        // A later part of a set that skipped a part is a gap too.
        let mut parts = Chain::new();
        parts.accept(&message(true, true, "", "1"));
        assert!(matches!(
            parts.accept(&message(false, false, "2", "3")),
            Step::Gap { .. }
        ));
    }

    #[test]
    fn a_complete_set_applies_whatever_it_follows_and_restarts_the_chain() {
        let mut chain = Chain::new();
        chain.accept(&message(true, false, "", "1"));
        chain.accept(&message(false, false, "1", "2"));
        // A resync (the manager's watch fell behind) sends a new complete set mid-session.
        assert_eq!(
            chain.accept(&message(true, false, "9", "10")),
            Step::Part {
                first: true,
                last: true
            }
        );
        assert_eq!(
            chain.accept(&message(false, false, "10", "11")),
            Step::Update
        );
    }

    #[test]
    fn a_manager_that_does_not_chain_is_still_followed() {
        // Messages without chain fields (an older manager) all apply to "" and result in "".
        let mut chain = Chain::new();
        chain.accept(&message(true, false, "", ""));
        assert_eq!(chain.accept(&message(false, false, "", "")), Step::Update);
    }
}
