//! One named test per Raft bug that real implementations shipped (the list in
//! `ANCHORS.md`), plus the bugs the simulator found in this core. Each builds its scenario
//! deterministically on the hand-driven harness and asserts the correct behaviour.

use bytes::Bytes;
use flotilla::raft::core::config::ELECTION_TIMEOUT_TICKS_DEFAULT;
use flotilla::raft::core::raw::LEASE_DISK_STALL_TICKS_MAX;
use flotilla::raft::core::{MembershipChange, Message, MessageBody, RaftError, Role};
use flotilla::raft::sim::harness::Harness;
use flotilla::raft::types::{Entry, EntryKind, NodeId, Term};

const TIMEOUT: u32 = ELECTION_TIMEOUT_TICKS_DEFAULT;

/// Delivers one message at a time until `done` holds.
fn deliver_until(h: &mut Harness, done: impl Fn(&Harness) -> bool) {
    while !done(h) {
        assert!(
            h.deliver_one(),
            "ran out of messages before the condition held"
        );
    }
}

fn force_campaign_without_delivery(h: &mut Harness, id: NodeId) {
    let term = h.core(id).term();
    let from = *h.nodes.keys().find(|o| **o != id).expect("another member");
    h.step(Message {
        from,
        to: id,
        term,
        body: MessageBody::TimeoutNow,
    });
}

fn carries_term(message: &Message, term: Term) -> bool {
    matches!(&message.body, MessageBody::Append { entries, .. } if entries.iter().any(|e| e.term == term))
}

fn never_applied(h: &Harness, data: &'static [u8]) -> bool {
    h.nodes
        .keys()
        .all(|id| h.applied_data(*id).iter().all(|(_, d)| d.as_ref() != data))
}

/// Raft paper, figure 8: an entry of an earlier term on a majority is not committed by
/// counting replicas; a later leader may legitimately overwrite it.
#[test]
fn figure_8_earlier_term_entry_is_not_committed_by_counting_replicas() {
    let mut h = Harness::new(&[1, 2, 3, 4, 5], &[], |c| c.append_bytes_max = 1);
    h.campaign(1);
    // (a) S1 leads and gets its entry onto S2 only.
    for other in [3, 4, 5] {
        h.blocked.insert((1, other));
        h.blocked.insert((other, 1));
    }
    let old = h.propose(1, b"old").unwrap();
    h.deliver_all();
    assert_eq!(h.core(2).log_term(old.index), Some(old.term));
    // (b) S1 fails; S5 wins with S3, S4 and appends at the same index, then fails.
    h.isolate(1);
    h.blocked.insert((2, 5));
    h.blocked.insert((5, 2));
    force_campaign_without_delivery(&mut h, 5);
    deliver_until(&mut h, |h| h.core(5).role() == Role::Leader);
    h.queue.clear();
    let s5_term = h.core(5).term();
    assert_eq!(h.core(5).log_term(old.index), Some(s5_term));
    h.isolate(5);
    // (c) S1 returns and wins; its old entry reaches S3, a majority, but S1's own-term entry
    // does not.
    for (a, b) in [(1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)] {
        h.blocked.remove(&(a, b));
        h.blocked.remove(&(b, a));
    }
    h.crash_restart(1);
    while h.core(1).role() != Role::Leader {
        // The first attempt only teaches node 1 the newer term.
        force_campaign_without_delivery(&mut h, 1);
        while h.core(1).role() != Role::Leader && h.deliver_one() {}
    }
    let s1_term = h.core(1).term();
    assert!(s1_term > s5_term);
    // Lose every append that would put an entry of S1's new term into a log; appends that
    // the receiver rejects (and so trigger backtracking) still arrive.
    while let Some(message) = h.queue.pop_front() {
        if h.blocked.contains(&(message.from, message.to)) {
            continue;
        }
        if let MessageBody::Append {
            prev_index,
            prev_term,
            ..
        } = &message.body
            && carries_term(&message, s1_term)
            && h.core(message.to).log_term(*prev_index) == Some(*prev_term)
        {
            continue;
        }
        h.step(message);
    }
    let holders = [1, 2, 3]
        .iter()
        .filter(|id| h.core(**id).log_term(old.index) == Some(old.term));
    assert_eq!(holders.count(), 3, "the old entry is on a majority");
    assert!(
        h.core(1).commit_index() < old.index,
        "figure 8: not committed by counting replicas"
    );
    // (d) S1 fails; S5 wins (votes of S2, S3, S4) and overwrites the uncommitted entry.
    h.isolate(1);
    h.queue.clear();
    for other in [2, 3, 4] {
        h.blocked.remove(&(5, other));
        h.blocked.remove(&(other, 5));
    }
    h.crash_restart(5);
    while h.core(5).role() != Role::Leader {
        force_campaign_without_delivery(&mut h, 5);
        h.deliver_all();
    }
    h.tick(5, 1);
    h.deliver_all();
    for id in [2, 3, 4, 5] {
        assert_eq!(h.core(id).log_term(old.index), Some(s5_term), "node {id}");
    }
    assert!(never_applied(&h, b"old"));
}

/// Overlapping single-server changes across leaders: a new leader may not propose a change
/// before committing an entry of its own term, so an uncommitted change of the previous
/// leader can never combine with a new one into disjoint majorities.
#[test]
fn overlapping_membership_changes_across_leaders_are_refused() {
    let mut h = Harness::new(&[1, 2, 3, 4], &[], |_| {});
    h.campaign(1);
    h.isolate(1);
    h.node(1)
        .core
        .propose_membership(MembershipChange::AddVoter(5))
        .unwrap();
    h.process(1);
    h.queue.clear();
    force_campaign_without_delivery(&mut h, 2);
    deliver_until(&mut h, |h| h.core(2).role() == Role::Leader);
    h.queue.clear();
    assert_eq!(
        h.node(2)
            .core
            .propose_membership(MembershipChange::AddVoter(6)),
        Err(RaftError::MembershipChangeInProgress),
        "the new leader has not committed an entry of its term"
    );
    h.tick(2, 1);
    h.deliver_all();
    assert!(h.core(2).term_committed());
    h.node(2)
        .core
        .propose_membership(MembershipChange::AddVoter(6))
        .unwrap();
    h.process(2);
    h.deliver_all();
    h.heal();
    h.tick_all(3);
    let expected = h.core(2).membership().clone();
    assert!(expected.voters.contains(&6) && !expected.voters.contains(&5));
    for id in [1, 2, 3, 4] {
        assert_eq!(h.core(id).membership(), &expected, "node {id}");
    }
}

/// etcd #8334 / #9586: with pre-vote and check-quorum, a member with a smaller term (but an
/// up-to-date log) must still be able to get the group a leader once the leader is gone.
#[test]
fn pre_vote_with_check_quorum_does_not_leave_the_group_leaderless() {
    let mut h = Harness::new(&[1, 2, 3], &[], |_| {});
    h.campaign(1);
    h.isolate(3);
    h.campaign(2);
    assert_eq!(h.leaders(), vec![2]);
    h.tick_all(2 * TIMEOUT);
    assert!(
        h.core(3).term() < h.core(1).term(),
        "node 3 is behind in term"
    );
    // The leader fails; 1 and 3 must elect one of themselves.
    h.heal();
    h.isolate(2);
    for _ in 0..10 * TIMEOUT {
        if h.core(1).role() == Role::Leader || h.core(3).role() == Role::Leader {
            break;
        }
        h.tick_all(1);
    }
    assert!(
        h.core(1).role() == Role::Leader || h.core(3).role() == Role::Leader,
        "a leader must emerge among the reachable majority"
    );
}

/// Granting a pre-vote must not reset the election timer (a pre-candidate that cannot win
/// would otherwise delay everyone's elections); granting a real vote does reset it.
#[test]
fn granting_a_pre_vote_does_not_reset_the_election_timer() {
    let ticks_until_campaign = |inject: Option<bool>| {
        let mut h = Harness::new(&[1, 2, 3], &[], |c| c.check_quorum = false);
        h.campaign(1);
        h.isolate(1);
        h.isolate(2);
        h.tick(2, 3);
        if let Some(pre_vote) = inject {
            let term = h.core(2).term() + 1;
            let last_index = h.core(2).last_index() + 5;
            let vote = MessageBody::Vote {
                pre_vote,
                transfer: false,
                last_index,
                last_term: term,
            };
            h.step(Message {
                from: 3,
                to: 2,
                term,
                body: vote,
            });
            let granted = h.queue.iter().any(|m| {
                matches!(m.body, MessageBody::VoteResponse { granted: true, .. }) && m.from == 2
            });
            assert!(granted, "the request is granted");
        }
        let mut ticks = 0;
        while h.core(2).role() == Role::Follower {
            h.tick(2, 1);
            ticks += 1;
            assert!(ticks < 10 * TIMEOUT, "node 2 never campaigns");
        }
        ticks
    };
    let baseline = ticks_until_campaign(None);
    assert_eq!(
        ticks_until_campaign(Some(true)),
        baseline,
        "a pre-vote grant left the timer"
    );
    assert!(
        ticks_until_campaign(Some(false)) > baseline,
        "a real vote grant resets it"
    );
}

/// Leadership transfer racing writes: writes accepted before the transfer are kept by the new
/// leader, writes during the transfer are refused (never silently lost).
#[test]
fn leadership_transfer_racing_writes_loses_no_acknowledged_write() {
    let mut h = Harness::new(&[1, 2, 3], &[], |_| {});
    h.campaign(1);
    h.deliver_all();
    let first = h.propose(1, b"w1").unwrap();
    let second = h.propose(1, b"w2").unwrap();
    h.node(1).core.transfer_leadership(2).unwrap();
    assert_eq!(
        h.propose(1, b"w3"),
        Err(RaftError::TransferInProgress { target: 2 })
    );
    h.process(1);
    h.deliver_all();
    assert_eq!(h.leaders(), vec![2]);
    h.tick_all(2);
    for proposed in [first, second] {
        for id in [1, 2, 3] {
            assert_eq!(
                h.core(id).log_term(proposed.index),
                Some(proposed.term),
                "node {id}"
            );
            assert!(h.core(id).commit_index() >= proposed.index, "node {id}");
        }
    }
    assert!(never_applied(&h, b"w3"));
    assert!(h.propose(2, b"w4").is_ok());
}

/// A leader whose own disk is stalled must lose its read lease quickly and step down within
/// an election timeout, so a healthy member can lead (not keep the group hostage with
/// heartbeats).
#[test]
fn stalled_disk_leader_loses_its_lease_and_steps_down() {
    let mut h = Harness::new(&[1, 2, 3], &[], |c| c.lease_reads = true);
    h.campaign(1);
    h.tick(1, 1);
    h.deliver_all();
    assert!(h.core(1).lease_valid());
    h.node(1).auto_persist = false;
    h.propose(1, b"stuck").unwrap();
    for _ in 0..LEASE_DISK_STALL_TICKS_MAX {
        h.tick(1, 1);
        h.deliver_all();
    }
    assert!(
        !h.core(1).lease_valid(),
        "heartbeats still flow, but the stalled disk voids the lease"
    );
    h.node(1).core.read_index(9).unwrap();
    h.process(1);
    assert!(
        h.node(1).reads.iter().all(|r| r.ctx != 9),
        "no lease read from a stalled leader"
    );
    for _ in 0..TIMEOUT {
        h.tick(1, 1);
        h.deliver_all();
    }
    assert_ne!(
        h.core(1).role(),
        Role::Leader,
        "the stalled leader stepped down"
    );
    for _ in 0..10 * TIMEOUT {
        if h.leaders().iter().any(|l| *l != 1) {
            break;
        }
        h.tick_all(1);
    }
    let leaders = h.leaders();
    assert!(
        leaders.iter().any(|l| [2, 3].contains(l)),
        "a healthy member leads: {leaders:?}"
    );
}

/// etcd #14370: a single voter acknowledged (committed) entries before they were fsynced.
/// The leader counts itself only for entries its own storage reported durable.
#[test]
fn single_voter_does_not_acknowledge_before_fsync() {
    let mut h = Harness::new(&[1], &[], |_| {});
    h.node(1).auto_persist = false;
    h.campaign(1);
    h.persist(1);
    assert_eq!(h.core(1).role(), Role::Leader);
    let proposed = h.propose(1, b"x").unwrap();
    h.tick(1, 3);
    assert!(h.core(1).commit_index() < proposed.index);
    assert!(h.applied_data(1).is_empty(), "nothing applied before fsync");
    h.persist(1);
    assert_eq!(h.core(1).commit_index(), proposed.index);
    assert_eq!(
        h.applied_data(1),
        vec![(proposed.index, Bytes::from_static(b"x"))]
    );

    // Two voters: the follower's acknowledgement alone is not a quorum either.
    let mut h = Harness::new(&[1, 2], &[], |_| {});
    h.campaign(1);
    h.node(1).auto_persist = false;
    let proposed = h.propose(1, b"y").unwrap();
    h.deliver_all();
    assert_eq!(h.core(1).progress(2).unwrap().match_index, proposed.index);
    assert!(
        h.core(1).commit_index() < proposed.index,
        "the leader's own disk is not done"
    );
    h.persist(1);
    assert_eq!(h.core(1).commit_index(), proposed.index);
}

/// Member 2 of three (manual persistence) has stepped a vote request and an append of
/// term 1 from member 3, and produced one Ready holding both, not yet persisted.
fn vote_and_entry_in_one_ready() -> Harness {
    // Without check-quorum a fresh member answers votes at once (no stickiness to wait out).
    let mut h = Harness::new(&[1, 2, 3], &[], |c| c.check_quorum = false);
    h.node(2).auto_persist = false;
    let vote = MessageBody::Vote {
        pre_vote: false,
        transfer: false,
        last_index: 0,
        last_term: 0,
    };
    h.node(2).core.step(Message {
        from: 3,
        to: 2,
        term: 1,
        body: vote,
    });
    let entry = Entry {
        term: 1,
        index: 1,
        kind: EntryKind::Blank,
        data: Bytes::new(),
    };
    let append = MessageBody::Append {
        prev_index: 0,
        prev_term: 0,
        entries: vec![entry],
        commit: 0,
    };
    h.node(2).core.step(Message {
        from: 3,
        to: 2,
        term: 1,
        body: append,
    });
    h.process(2);
    h
}

/// Vote persistence reordered with log append: a storage that makes entries durable before
/// the hard state of the same Ready must not let the vote (or an acknowledgement in that
/// term) out, and a restart from such a state must not vote again in that term.
#[test]
fn vote_persistence_reordered_with_append_releases_nothing_early() {
    let mut h = vote_and_entry_in_one_ready();
    assert_eq!(
        h.node(2).pending.len(),
        1,
        "one Ready: the vote and the entry together"
    );
    h.persist_entries_only(2);
    assert!(
        h.queue.iter().all(|m| m.from != 2),
        "nothing leaves before the vote is durable"
    );

    // Crash now: the entry of term 1 is durable, the vote is not.
    h.crash_restart(2);
    assert_eq!(h.core(2).term(), 1, "the term is recovered from the log");
    let rival = MessageBody::Vote {
        pre_vote: false,
        transfer: false,
        last_index: 1,
        last_term: 1,
    };
    h.step(Message {
        from: 1,
        to: 2,
        term: 1,
        body: rival,
    });
    h.persist(2);
    let granted = h
        .queue
        .iter()
        .any(|m| m.from == 2 && matches!(m.body, MessageBody::VoteResponse { granted: true, .. }));
    assert!(
        !granted,
        "whom it voted for in term 1 is unknown: it must not vote again"
    );

    // Without the crash the held messages go out once the hard state is durable.
    let mut h = vote_and_entry_in_one_ready();
    h.persist_entries_only(2);
    h.persist(2);
    assert!(
        h.queue
            .iter()
            .any(|m| matches!(m.body, MessageBody::VoteResponse { granted: true, .. }))
    );
    assert!(
        h.queue
            .iter()
            .any(|m| matches!(m.body, MessageBody::AppendResponse { match_index: 1, .. }))
    );
}

/// Truncation racing a write (ABA): a durability report for entries since truncated and
/// rewritten at the same indexes with another term must not count as durable.
#[test]
fn stale_durability_report_after_truncation_is_ignored() {
    let entries = |term: Term, range: std::ops::RangeInclusive<u64>| -> Vec<Entry> {
        range
            .map(|index| Entry {
                term,
                index,
                kind: EntryKind::Normal,
                data: Bytes::new(),
            })
            .collect()
    };
    let mut h = Harness::new(&[1, 2, 3], &[], |_| {});
    h.node(3).auto_persist = false;
    let old = MessageBody::Append {
        prev_index: 0,
        prev_term: 0,
        entries: entries(1, 1..=3),
        commit: 0,
    };
    h.step(Message {
        from: 1,
        to: 3,
        term: 1,
        body: old,
    });
    // Before that write completes, a term-2 leader rewrites indexes 2 and 3.
    let new = MessageBody::Append {
        prev_index: 1,
        prev_term: 1,
        entries: entries(2, 2..=3),
        commit: 0,
    };
    h.step(Message {
        from: 2,
        to: 3,
        term: 2,
        body: new,
    });
    assert_eq!(h.node(3).pending.len(), 2);
    h.persist_one(3); // reports (3, term 1): index 3 now holds a term-2 entry
    assert!(
        h.core(3).durable_index() < 3,
        "the stale report does not cover the new entry"
    );
    let acknowledged = |h: &Harness, index| {
        h.queue.iter().any(|m| {
            m.from == 3
                && m.term == 2
                && matches!(m.body, MessageBody::AppendResponse { match_index, reject: None } if match_index >= index)
        })
    };
    assert!(
        !acknowledged(&h, 2),
        "no acknowledgement of entries that are not durable"
    );
    h.persist_one(3);
    assert_eq!(h.core(3).durable_index(), 3);
    assert!(acknowledged(&h, 3));
}

/// Learners are counted in no quorum: not for commit, not for reads, not for elections.
#[test]
fn learners_are_not_counted_in_any_quorum() {
    let mut h = Harness::new(&[1, 2], &[3, 4], |_| {});
    h.campaign(1);
    h.deliver_all();
    h.isolate(2);
    let proposed = h.propose(1, b"x").unwrap();
    h.node(1).core.read_index(5).unwrap();
    h.process(1);
    h.tick(1, 1);
    h.deliver_all();
    assert_eq!(h.core(3).last_index(), proposed.index);
    assert_eq!(h.core(4).last_index(), proposed.index);
    assert!(
        h.core(1).commit_index() < proposed.index,
        "two learners are not a quorum"
    );
    assert!(h.node(1).reads.iter().all(|r| r.ctx != 5), "nor for a read");
    // The leader fails; node 2 with only learners reachable cannot win.
    h.isolate(1);
    h.blocked.retain(|(a, b)| *a == 1 || *b == 1);
    force_campaign_without_delivery(&mut h, 2);
    h.deliver_all();
    assert_ne!(
        h.core(2).role(),
        Role::Leader,
        "learners' votes do not count"
    );
    assert!(h.leaders().iter().all(|l| *l == 1));
}

/// Removing the leader of a two-member group must not deadlock: the remaining member takes
/// over, even if the old leader vanishes right after the removal commits.
#[test]
fn removing_the_leader_of_a_two_node_cluster_does_not_deadlock() {
    for vanish in [false, true] {
        let mut h = Harness::new(&[1, 2], &[], |_| {});
        h.campaign(1);
        h.deliver_all();
        let removal = h
            .node(1)
            .core
            .propose_membership(MembershipChange::Remove(1))
            .unwrap();
        h.process(1);
        if vanish {
            deliver_until(&mut h, |h| h.core(1).commit_index() >= removal.index);
            h.isolate(1);
            h.queue.clear();
        } else {
            h.deliver_all();
        }
        for _ in 0..4 * TIMEOUT {
            if h.core(2).role() == Role::Leader {
                break;
            }
            h.tick_all(1);
        }
        assert_eq!(h.core(2).role(), Role::Leader, "vanish={vanish}");
        assert_ne!(h.core(1).role(), Role::Leader, "vanish={vanish}");
        let proposed = h.propose(2, b"after").unwrap();
        h.deliver_all();
        assert_eq!(h.core(2).commit_index(), proposed.index, "vanish={vanish}");
        assert!(h.core(2).membership().removed.contains(&1));
    }
}

/// Found by the simulator (seed 385): a leader acted on a term it had not persisted; after a
/// crash it led the same term again and reused (index, term) pairs for other entries.
#[test]
fn leader_never_acts_on_an_unpersisted_term() {
    let mut h = Harness::new(&[1], &[2], |_| {});
    h.node(1).auto_persist = false;
    h.campaign(1);
    assert_eq!(h.core(1).role(), Role::Candidate);
    assert!(h.node(1).core.propose(Bytes::from_static(b"x")).is_err());
    h.crash_restart(1);
    h.campaign(1);
    h.persist(1);
    assert_eq!(h.core(1).role(), Role::Leader);
    assert_eq!(h.core(1).term(), 1);
}

/// Found by the simulator (seed 2150): a member that may not campaign restarted its election
/// timer forever and so kept refusing votes for a leader long gone.
#[test]
fn member_that_cannot_campaign_forgets_a_silent_leader() {
    let mut h = Harness::new(&[1, 2], &[3], |_| {});
    h.campaign(1);
    h.deliver_all();
    assert_eq!(h.core(3).leader(), Some(1));
    h.isolate(1);
    h.tick(3, 3 * TIMEOUT);
    assert_eq!(
        h.core(3).leader(),
        None,
        "an election timeout of silence voids the leader"
    );
    let term = h.core(3).term() + 1;
    let last_index = h.core(3).last_index();
    let vote = MessageBody::Vote {
        pre_vote: true,
        transfer: false,
        last_index,
        last_term: term - 1,
    };
    h.step(Message {
        from: 2,
        to: 3,
        term,
        body: vote,
    });
    assert!(h.queue.iter().any(|m| {
        m.from == 3 && matches!(m.body, MessageBody::VoteResponse { granted: true, .. })
    }));
}

/// Found by the simulator (seed 238): a leader removed by a change that is not committed yet
/// stepped down (check-quorum); it held the longest log, so the remaining member could not
/// win, and as a non-voter of its latest membership it never campaigned.
#[test]
fn member_removed_by_an_uncommitted_change_can_still_lead_it_to_commit() {
    let mut h = Harness::new(&[1, 2], &[], |_| {});
    h.campaign(1);
    h.deliver_all();
    h.isolate(1);
    let removal = h
        .node(1)
        .core
        .propose_membership(MembershipChange::Remove(1))
        .unwrap();
    h.process(1);
    h.tick(1, 2 * TIMEOUT);
    assert_ne!(
        h.core(1).role(),
        Role::Leader,
        "check-quorum: no answer from node 2"
    );
    h.heal();
    h.queue.clear();
    for _ in 0..20 * TIMEOUT {
        if h.core(2).role() == Role::Leader && h.core(2).commit_index() >= removal.index {
            break;
        }
        h.tick_all(1);
    }
    assert_eq!(h.core(2).role(), Role::Leader);
    assert_eq!(
        h.core(2).log_term(removal.index),
        Some(removal.term),
        "the removal survived"
    );
    assert!(!h.core(2).membership().voters.contains(&1));
}

/// A leader that sent TimeoutNow may be deposed by a campaign that bypasses stickiness (even
/// after the transfer was abandoned, by a delayed TimeoutNow): its lease is void for the rest
/// of the term, while ReadIndex rounds keep working.
#[test]
fn transfer_forfeits_the_lease_for_the_rest_of_the_term() {
    let mut h = Harness::new(&[1, 2, 3], &[], |c| c.lease_reads = true);
    h.campaign(1);
    h.tick(1, 1);
    h.deliver_all();
    assert!(h.core(1).lease_valid());
    h.node(1).core.transfer_leadership(2).unwrap();
    h.process(1);
    assert!(!h.core(1).lease_valid());
    h.isolate(2);
    h.deliver_all();
    h.tick(1, TIMEOUT);
    h.deliver_all();
    assert_eq!(
        h.core(1).transfer_target(),
        None,
        "the transfer was abandoned"
    );
    assert_eq!(h.core(1).role(), Role::Leader);
    assert!(!h.core(1).lease_valid(), "still no lease in this term");
    h.node(1).core.read_index(3).unwrap();
    h.process(1);
    h.deliver_all();
    assert!(
        h.node(1).reads.iter().any(|r| r.ctx == 3),
        "a ReadIndex round still serves it"
    );
}

/// A follower that crashes and restarts right after acknowledging a heartbeat must keep the
/// promise behind the leader's lease: no vote for another candidate within an election
/// timeout of starting.
#[test]
fn restarted_follower_keeps_its_stickiness_promise() {
    let mut h = Harness::new(&[1, 2, 3], &[], |c| c.lease_reads = true);
    h.campaign(1);
    h.tick(1, 1);
    h.deliver_all();
    assert!(h.core(1).lease_valid());
    h.crash_restart(2);
    let term = h.core(2).term() + 1;
    let (last_index, last_term) = (h.core(3).last_index() + 1, term);
    for pre_vote in [true, false] {
        let vote = MessageBody::Vote {
            pre_vote,
            transfer: false,
            last_index,
            last_term,
        };
        h.step(Message {
            from: 3,
            to: 2,
            term,
            body: vote,
        });
    }
    assert!(
        h.queue.iter().all(|m| m.from != 2),
        "votes are ignored right after a restart"
    );
    assert_eq!(h.core(2).term(), term - 1);
}

/// Found by the simulator (seed 3693 of the first 100,000-seed run): without check-quorum and
/// pre-vote, a member whose term was raised (by a removed member's campaign) ignored the
/// stale leader silently; the leader never learned the newer term and the group stalled.
#[test]
fn stale_leader_learns_the_newer_term_without_check_quorum() {
    let mut h = Harness::new(&[1, 2, 3], &[], |c| {
        c.check_quorum = false;
        c.pre_vote = false;
    });
    h.campaign(1);
    h.deliver_all();
    let term = h.core(1).term() + 5;
    let vote = MessageBody::Vote {
        pre_vote: false,
        transfer: false,
        last_index: 0,
        last_term: 0,
    };
    h.step(Message {
        from: 3,
        to: 2,
        term,
        body: vote,
    });
    h.queue.clear();
    assert_eq!(h.core(2).term(), term);
    h.tick(1, 1);
    h.deliver_all();
    assert_ne!(
        h.core(1).role(),
        Role::Leader,
        "the stale leader heard of the newer term"
    );
    assert_eq!(h.core(1).term(), term);
}

/// Found by the simulator (seed 103097 of a 20,000-step run): without pre-vote, a candidate
/// holding the only longest log campaigned in terms lower than a voter's; the voter ignored
/// it silently, so it chased the voter's rising term instead of learning it at once.
#[test]
fn lower_term_candidate_learns_the_term_from_the_rejection() {
    let mut h = Harness::new(&[1, 2, 3], &[], |c| {
        c.pre_vote = false;
        c.check_quorum = false;
    });
    let vote = MessageBody::Vote {
        pre_vote: false,
        transfer: false,
        last_index: 0,
        last_term: 0,
    };
    h.step(Message {
        from: 3,
        to: 2,
        term: 7,
        body: vote,
    });
    h.queue.clear();
    force_campaign_without_delivery(&mut h, 1);
    assert_eq!(h.core(1).term(), 1);
    h.blocked.insert((1, 3));
    h.deliver_all();
    assert_eq!(h.core(1).term(), 7, "the rejection carried node 2's term");
    assert_eq!(h.core(1).role(), Role::Follower);
}
