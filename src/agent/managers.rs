//! The managers an agent may call (swarmkit's remotes): the addresses it was given, then the
//! weighted list each session's manager sends (`SessionStarted.managers`, then
//! `ManagersChanged` whenever the managers reachable from the leader change), so that an
//! agent learns managers that joined after it started and forgets removed ones.
//!
//! Owns the learned list and the choice of the next manager: weighted at random, not the
//! one just tried when there is a choice, and first of all the leader a follower named in a
//! NOT_LEADER refusal, known or not (an agent given only a follower's address must reach a
//! leader it has never heard of; the name comes from a manager of this cluster, verified by
//! mutual TLS, and the leader is dialed with the same verification). A learned list is
//! handed to a callback that keeps it (`flotilla agent` writes `<state-dir>/managers`), so
//! that a restarted agent calls the managers of today, not those it was first given.
//!
//! Must never keep an entry it cannot dial (an empty or oversized address) or more than
//! [`pb::MANAGERS_MAX`] entries, nor drop what it knows for an empty list (a leader that has
//! not looked at its group yet sends none).

use parking_lot::Mutex;
use rand::RngExt;

use crate::proto::dispatcher as pb;

/// Keeps a learned list (the worker's `<state-dir>/managers`); called only when it changed.
pub type RememberManagers = Box<dyn Fn(&[String]) + Send + Sync>;

/// The managers to call, as given and as learned.
pub struct Managers {
    /// The addresses the agent was configured with (re-read at each pick: a manager's own
    /// agent follows its Raft node's view of the leader).
    seeds: Box<dyn Fn() -> Vec<String> + Send + Sync>,
    /// `Some`: learn the lists sessions send, and keep them with this callback. `None`: use
    /// the seeds only (a manager's own agent).
    remember: Option<RememberManagers>,
    /// The latest list a session sent (address, weight), by address; empty until one did.
    learned: Mutex<Vec<(String, u32)>>,
}

impl Managers {
    /// The managers `seeds` names; with `remember`, the lists sessions send replace them.
    pub fn new(
        seeds: Box<dyn Fn() -> Vec<String> + Send + Sync>,
        remember: Option<RememberManagers>,
    ) -> Managers {
        Managers {
            seeds,
            remember,
            learned: Mutex::new(Vec::new()),
        }
    }

    /// Takes the list a session sent. Entries without a usable address are dropped, at most
    /// [`pb::MANAGERS_MAX`] kept; an empty list changes nothing. Returns the addresses when
    /// the list changed (after handing them to the `remember` callback).
    pub fn learn(&self, peers: &[pb::WeightedPeer]) -> Option<Vec<String>> {
        let remember = self.remember.as_ref()?;
        let mut list: Vec<(String, u32)> = peers
            .iter()
            .filter(|peer| !peer.addr.is_empty() && peer.addr.len() <= pb::MANAGER_ADDR_BYTES_MAX)
            .map(|peer| (peer.addr.clone(), u32::try_from(peer.weight).unwrap_or(0)))
            .collect();
        list.sort();
        list.dedup_by(|a, b| a.0 == b.0);
        list.truncate(pb::MANAGERS_MAX);
        if list.is_empty() {
            return None;
        }
        let mut learned = self.learned.lock();
        if *learned == list {
            return None;
        }
        *learned = list;
        let addrs: Vec<String> = learned.iter().map(|(addr, _)| addr.clone()).collect();
        drop(learned);
        remember(&addrs);
        Some(addrs)
    }

    /// The managers to pick from, with their weights: the learned list, else the seeds
    /// (each with the default weight).
    pub fn candidates(&self) -> Vec<(String, u32)> {
        let learned = self.learned.lock();
        if !learned.is_empty() {
            return learned.clone();
        }
        drop(learned);
        let weight = u32::try_from(pb::MANAGER_WEIGHT_DEFAULT).unwrap_or(1);
        (self.seeds)()
            .into_iter()
            .map(|addr| (addr, weight))
            .collect()
    }

    /// The manager to try next (see [`pick_manager`]).
    pub fn pick(&self, last: Option<&str>, leader_hint: Option<&str>) -> Option<String> {
        pick_manager(&self.candidates(), last, leader_hint)
    }
}

/// The manager to try next: the leader a follower named (`leader_hint`), whether or not it
/// is among `candidates`; otherwise one picked at random in proportion to its weight, other
/// than `last` when there is a choice. Weights of zero count as one when all are zero.
pub fn pick_manager(
    candidates: &[(String, u32)],
    last: Option<&str>,
    leader_hint: Option<&str>,
) -> Option<String> {
    if let Some(leader) = leader_hint.filter(|leader| !leader.is_empty()) {
        return Some(leader.to_string());
    }
    let choices: Vec<&(String, u32)> = candidates
        .iter()
        .filter(|(addr, _)| candidates.len() == 1 || Some(addr.as_str()) != last)
        .collect();
    if choices.is_empty() {
        return None;
    }
    let total: u64 = choices.iter().map(|(_, weight)| u64::from(*weight)).sum();
    if total == 0 {
        let index = rand::rng().random_range(0..choices.len());
        return Some(choices[index].0.clone());
    }
    let mut point = rand::rng().random_range(0..total);
    for (addr, weight) in &choices {
        let weight = u64::from(*weight);
        if point < weight {
            return Some(addr.clone());
        }
        point -= weight;
    }
    // Not reached (the point lies below the total); the last choice is as good as any.
    choices.last().map(|(addr, _)| addr.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn peer(addr: &str, weight: i32) -> pb::WeightedPeer {
        pb::WeightedPeer {
            node_id: format!("node-{addr}"),
            addr: addr.into(),
            weight,
        }
    }

    #[test]
    fn the_named_leader_comes_first_even_when_it_is_not_known() {
        let managers: Vec<(String, u32)> = vec![("a:1".into(), 10)];
        assert_eq!(
            pick_manager(&managers, Some("a:1"), Some("z:9")).as_deref(),
            Some("z:9"),
            "an agent given only a follower reaches the leader it names"
        );
        assert_eq!(
            pick_manager(&managers, Some("a:1"), Some("")).as_deref(),
            Some("a:1")
        );
        assert_eq!(pick_manager(&[], None, None), None);
    }

    #[test]
    fn managers_are_picked_in_proportion_to_their_weights_not_the_last_one_tried() {
        let managers: Vec<(String, u32)> =
            vec![("a:1".into(), 10), ("b:1".into(), 30), ("c:1".into(), 10)];
        let mut counts = std::collections::BTreeMap::new();
        for _ in 0..4000 {
            let picked = pick_manager(&managers, Some("a:1"), None).unwrap();
            *counts.entry(picked).or_insert(0u32) += 1;
        }
        assert!(
            !counts.contains_key("a:1"),
            "the manager just tried: {counts:?}"
        );
        let (b, c) = (counts["b:1"], counts["c:1"]);
        // 3 to 1 expected; far from 1 to 1 whatever the draw.
        assert!(b > 2 * c, "{counts:?}");
        assert_eq!(
            pick_manager(&managers[..1], Some("a:1"), None).as_deref(),
            Some("a:1")
        );
        let zero: Vec<(String, u32)> = vec![("a:1".into(), 0), ("b:1".into(), 0)];
        assert_eq!(
            pick_manager(&zero, Some("a:1"), None).as_deref(),
            Some("b:1")
        );
    }

    #[test]
    fn a_learned_list_replaces_the_seeds_is_kept_and_an_empty_one_changes_nothing() {
        let kept: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
        let sink = kept.clone();
        let managers = Managers::new(
            Box::new(|| vec!["seed:1".to_string()]),
            Some(Box::new(move |addrs| sink.lock().push(addrs.to_vec()))),
        );
        assert_eq!(managers.candidates(), vec![("seed:1".to_string(), 10)]);
        assert_eq!(managers.learn(&[]), None);
        let learned = managers.learn(&[peer("b:1", 10), peer("", 10), peer("a:1", 10)]);
        assert_eq!(learned, Some(vec!["a:1".to_string(), "b:1".to_string()]));
        assert_eq!(
            managers.candidates(),
            vec![("a:1".to_string(), 10), ("b:1".to_string(), 10)]
        );
        // The same list again is not kept again; a removed manager is forgotten.
        assert_eq!(managers.learn(&[peer("a:1", 10), peer("b:1", 10)]), None);
        assert!(managers.learn(&[peer("a:1", 10)]).is_some());
        assert_eq!(managers.candidates(), vec![("a:1".to_string(), 10)]);
        assert_eq!(
            *kept.lock(),
            vec![
                vec!["a:1".to_string(), "b:1".to_string()],
                vec!["a:1".to_string()]
            ]
        );
        let long = "x".repeat(pb::MANAGER_ADDR_BYTES_MAX + 1);
        let many: Vec<pb::WeightedPeer> = (0..100)
            .map(|i| peer(&format!("m{i:03}:1"), 10))
            .chain([peer(&long, 10)])
            .collect();
        let kept_addrs = managers.learn(&many).unwrap();
        assert_eq!(kept_addrs.len(), pb::MANAGERS_MAX);
        assert!(kept_addrs.iter().all(|a| a.len() < 10));
    }

    #[test]
    fn a_managers_own_agent_does_not_learn() {
        let managers = Managers::new(Box::new(|| vec!["self:1".to_string()]), None);
        assert_eq!(managers.learn(&[peer("a:1", 10)]), None);
        assert_eq!(managers.candidates(), vec![("self:1".to_string(), 10)]);
    }
}
