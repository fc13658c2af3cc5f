//! Unit tests of the core, each driving a hand-built cluster step by step.

use bytes::Bytes;

use super::*;
use crate::raft::sim::harness::Harness;
use crate::raft::types::{EntryKind, NodeId};

fn three() -> Harness {
    let mut h = Harness::new(&[1, 2, 3], &[], |_| {});
    h.campaign(1);
    assert_eq!(h.leaders(), vec![1]);
    h
}

fn appends_from(h: &Harness, from: NodeId, to: NodeId) -> usize {
    h.queue
        .iter()
        .filter(|m| {
            m.from == from
                && m.to == to
                && matches!(&m.body, MessageBody::Append { entries, .. } if !entries.is_empty())
        })
        .count()
}

#[test]
fn leader_replicates_and_every_member_applies() {
    let mut h = three();
    let proposed = h.propose(1, b"x").unwrap();
    h.deliver_all();
    for id in [1, 2, 3] {
        assert_eq!(h.core(id).commit_index(), proposed.index, "node {id}");
        assert!(
            h.applied_data(id)
                .contains(&(proposed.index, Bytes::from_static(b"x")))
        );
    }
}

#[test]
fn single_voter_commits_only_what_its_disk_made_durable() {
    let mut h = Harness::new(&[1], &[], |_| {});
    h.node(1).auto_persist = false;
    h.campaign(1);
    assert_eq!(
        h.core(1).role(),
        Role::Candidate,
        "the own vote counts once durable"
    );
    h.persist(1);
    assert_eq!(h.core(1).role(), Role::Leader);
    let proposed = h.propose(1, b"a").unwrap();
    assert!(h.core(1).commit_index() < proposed.index, "not durable yet");
    h.persist(1);
    assert_eq!(h.core(1).commit_index(), proposed.index);
}

#[test]
fn a_sole_voter_leads_on_its_first_tick_without_an_election_timeout() {
    let mut h = Harness::new(&[1], &[], |_| {});
    assert!(h.core(1).config().election_timeout_ticks > 1);
    h.tick(1, 1);
    assert_eq!(h.core(1).role(), Role::Leader, "one tick, no timeout");
    assert_eq!(h.core(1).term(), 1);
    let proposed = h.propose(1, b"a").unwrap();
    assert_eq!(h.core(1).commit_index(), proposed.index);

    // The same without waiting for a tick, as the raft thread does when it starts; the own
    // vote still counts only once durable.
    let mut h = Harness::new(&[1], &[], |_| {});
    h.node(1).auto_persist = false;
    assert!(h.node(1).core.campaign_if_sole_voter());
    h.process(1);
    assert_eq!(h.core(1).role(), Role::Candidate);
    h.persist(1);
    assert_eq!(h.core(1).role(), Role::Leader);
    assert!(
        !h.node(1).core.campaign_if_sole_voter(),
        "a leader does not campaign again"
    );
}

#[test]
fn a_member_with_other_voters_still_waits_for_its_election_timeout() {
    let mut h = Harness::new(&[1, 2, 3], &[], |_| {});
    assert!(!h.node(1).core.campaign_if_sole_voter());
    h.tick(1, 1);
    assert_eq!(h.core(1).role(), Role::Follower);
    assert_eq!(h.core(1).term(), 0);
    // A learner is not a voter: a voter with learners only is still alone.
    let mut h = Harness::new(&[1], &[2], |_| {});
    h.tick(1, 1);
    assert_eq!(h.core(1).role(), Role::Leader);
    assert_eq!(h.core(2).role(), Role::Follower);
}

#[test]
fn refusals_are_typed() {
    let mut h = Harness::new(&[1, 2, 3], &[], |c| c.proposal_bytes_max = 4);
    h.campaign(1);
    assert_eq!(
        h.propose(2, b"x"),
        Err(RaftError::NotLeader { leader: Some(1) })
    );
    assert!(matches!(
        h.propose(1, b"too large"),
        Err(RaftError::ProposalTooLarge { .. })
    ));
    h.isolate(3);
    h.node(1).core.transfer_leadership(3).unwrap();
    assert_eq!(
        h.propose(1, b"x"),
        Err(RaftError::TransferInProgress { target: 3 })
    );
    assert_eq!(
        h.node(1).core.transfer_leadership(2),
        Err(RaftError::TransferInProgress { target: 3 })
    );
    h.node(1).core.shutdown();
    assert_eq!(h.node(1).core.read_index(1), Err(RaftError::ShuttingDown));
}

/// Node 1 wins an election but every append of its new term is lost.
fn leader_with_uncommitted_term() -> Harness {
    let mut h = Harness::new(&[1, 2, 3], &[], |_| {});
    h.step(Message {
        from: 2,
        to: 1,
        term: 0,
        body: MessageBody::TimeoutNow,
    });
    while h.core(1).role() != Role::Leader {
        assert!(h.deliver_one(), "the election completes");
    }
    h.queue.clear();
    assert!(!h.core(1).term_committed());
    h
}

#[test]
fn membership_changes_wait_for_a_committed_entry_of_the_term_and_go_one_at_a_time() {
    let mut h = leader_with_uncommitted_term();
    let change = MembershipChange::AddLearner(4);
    assert_eq!(
        h.node(1).core.propose_membership(change),
        Err(RaftError::MembershipChangeInProgress),
        "no change before the leader committed an entry of its term"
    );
    h.tick(1, 1);
    h.deliver_all();
    assert!(h.core(1).term_committed());
    h.isolate(2);
    h.isolate(3);
    h.node(1).core.propose_membership(change).unwrap();
    assert_eq!(
        h.node(1)
            .core
            .propose_membership(MembershipChange::AddLearner(5)),
        Err(RaftError::MembershipChangeInProgress),
        "one change at a time"
    );
    h.heal();
    h.tick(1, 1);
    h.deliver_all();
    h.node(1)
        .core
        .propose_membership(MembershipChange::AddLearner(5))
        .unwrap();
}

#[test]
fn isolated_member_with_pre_vote_keeps_its_term() {
    let mut h = three();
    let term = h.core(1).term();
    h.isolate(3);
    h.tick_all(100);
    assert_eq!(
        h.core(3).term(),
        term,
        "pre-vote failures never raise the term"
    );
    h.heal();
    h.tick_all(3);
    assert_eq!(
        h.leaders(),
        vec![1],
        "the rejoining member does not disrupt the leader"
    );
    assert_eq!(h.core(1).term(), term);
}

#[test]
fn check_quorum_makes_an_isolated_leader_step_down() {
    let mut h = three();
    h.isolate(1);
    for _ in 0..2 * config::ELECTION_TIMEOUT_TICKS_DEFAULT {
        h.tick(1, 1);
    }
    assert_eq!(h.core(1).role(), Role::Follower);
}

#[test]
fn conflicting_suffix_is_repaired_with_few_rejections() {
    let mut h = three();
    h.isolate(1);
    for _ in 0..50 {
        h.propose(1, b"stale").unwrap();
    }
    h.queue.clear();
    h.campaign(2);
    for _ in 0..50 {
        h.propose(2, b"fresh").unwrap();
    }
    h.deliver_all();
    h.heal();
    h.tick(2, 1);
    let mut rejections = 0;
    while let Some(message) = h.queue.pop_front() {
        if matches!(
            message.body,
            MessageBody::AppendResponse {
                reject: Some(_),
                ..
            }
        ) {
            rejections += 1;
        }
        h.step(message);
    }
    assert!(
        rejections <= 3,
        "fast backtracking needs a few round trips, took {rejections}"
    );
    assert_eq!(h.core(1).last_index(), h.core(2).last_index());
    assert_eq!(
        h.core(1).log_term(h.core(1).last_index()),
        Some(h.core(2).term())
    );
}

#[test]
fn pipeline_respects_the_inflight_limit() {
    let mut h = Harness::new(&[1, 2], &[], |c| {
        c.inflight_msgs_max = 2;
        c.append_bytes_max = 1;
    });
    h.campaign(1);
    h.deliver_all();
    h.blocked.insert((2, 1));
    for _ in 0..10 {
        h.node(1).core.propose(Bytes::from_static(b"e")).unwrap();
    }
    h.process(1);
    assert_eq!(
        appends_from(&h, 1, 2),
        2,
        "two appends of one entry each, then wait"
    );
    h.deliver_all();
    h.blocked.clear();
    h.tick_all(5);
    assert_eq!(
        h.core(2).last_index(),
        h.core(1).last_index(),
        "recovers once acks flow"
    );
}

#[test]
fn read_index_waits_for_a_quorum_round_and_a_lease_read_does_not() {
    let mut h = Harness::new(&[1, 2, 3], &[], |c| c.lease_reads = true);
    h.campaign(1);
    h.tick(1, 1);
    h.deliver_all();
    h.isolate(2);
    h.isolate(3);
    h.node(1).core.read_index(7).unwrap();
    h.process(1);
    let read_now = h.node(1).reads.iter().any(|r| r.ctx == 7);
    assert!(
        read_now,
        "the lease from the last heartbeat round serves the read at once"
    );
    h.tick(
        1,
        config::ELECTION_TIMEOUT_TICKS_DEFAULT - config::LEASE_MARGIN_TICKS_DEFAULT,
    );
    assert!(
        !h.core(1).lease_valid(),
        "no quorum answered: the lease ran out"
    );
    h.node(1).core.read_index(8).unwrap();
    h.process(1);
    h.deliver_all();
    assert!(
        !h.node(1).reads.iter().any(|r| r.ctx == 8),
        "no quorum, no read"
    );
    h.heal();
    h.tick(1, 1);
    h.deliver_all();
    let read = h
        .node(1)
        .reads
        .iter()
        .find(|r| r.ctx == 8)
        .copied()
        .unwrap();
    assert_eq!(read.index, h.core(1).commit_index());
}

#[test]
fn lagging_follower_gets_a_snapshot_and_catches_up() {
    let mut h = Harness::new(&[1, 2, 3], &[], |c| c.snapshot_keep_entries = 0);
    h.campaign(1);
    h.isolate(3);
    for _ in 0..20 {
        h.propose(1, b"e").unwrap();
    }
    h.deliver_all();
    let applied = h.core(1).applied_index();
    assert_eq!(h.node(1).core.on_snapshot_created(applied), applied);
    h.heal();
    // The appends lost during the isolation are noticed after the replicate stall.
    h.tick(1, config::REPLICATE_STALL_TICKS_DEFAULT);
    let mut sent = false;
    while let Some(message) = h.queue.pop_front() {
        sent |= matches!(message.body, MessageBody::Snapshot { .. }) && message.to == 3;
        h.step(message);
    }
    assert!(sent, "the entries node 3 needs are compacted");
    assert_eq!(h.core(3).snapshot_meta().index, applied);
    h.propose(1, b"after").unwrap();
    h.deliver_all();
    assert_eq!(h.core(3).commit_index(), h.core(1).commit_index());
}

#[test]
fn memory_behind_a_snapshot_is_bounded_by_bytes_as_well_as_entries() {
    let mut h = Harness::new(&[1], &[], |c| {
        c.snapshot_keep_entries = 100;
        c.snapshot_keep_bytes_max = 10 * 1024;
    });
    h.campaign(1);
    static BIG: [u8; 4096] = [7; 4096];
    for _ in 0..20 {
        h.propose(1, &BIG).unwrap();
    }
    h.deliver_all();
    let applied = h.core(1).applied_index();
    // 100 entries would be 80 KiB: only the two newest 4 KiB entries fit in 10 KiB.
    let compact_to = h.node(1).core.on_snapshot_created(applied);
    assert_eq!(compact_to, applied - 2);
    // Small entries are kept by count, as before.
    for _ in 0..150 {
        h.propose(1, b"s").unwrap();
    }
    h.deliver_all();
    let applied = h.core(1).applied_index();
    assert_eq!(h.node(1).core.on_snapshot_created(applied), applied - 100);
}

#[test]
fn conflicting_snapshot_truncates_the_uncommitted_suffix() {
    let mut h = three();
    h.deliver_all();
    h.isolate(1);
    for _ in 0..5 {
        h.propose(1, b"doomed").unwrap();
    }
    h.campaign(2);
    for _ in 0..3 {
        h.propose(2, b"kept").unwrap();
    }
    h.deliver_all();
    let applied = h.core(2).applied_index();
    h.node(2).core.on_snapshot_created(applied);
    let meta = h.core(2).snapshot_meta().clone();
    assert!(
        h.core(1).last_index() > meta.index || h.core(1).log_term(meta.index) != Some(meta.term)
    );
    let term = h.core(2).term();
    h.step(Message {
        from: 2,
        to: 1,
        term,
        body: MessageBody::Snapshot { meta: meta.clone() },
    });
    assert_eq!(h.core(1).last_index(), meta.index, "the old suffix is gone");
    assert_eq!(h.core(1).log_term(meta.index), Some(meta.term));
}

#[test]
fn learners_replicate_but_never_count() {
    let mut h = Harness::new(&[1, 2], &[3], |_| {});
    h.campaign(1);
    h.deliver_all();
    h.isolate(2);
    let proposed = h.propose(1, b"x").unwrap();
    h.deliver_all();
    assert_eq!(h.core(3).last_index(), proposed.index, "the learner has it");
    assert!(
        h.core(1).commit_index() < proposed.index,
        "but it is not a quorum"
    );
    h.tick_all(3 * config::ELECTION_TIMEOUT_TICKS_DEFAULT);
    assert_eq!(
        h.core(3).role(),
        Role::Follower,
        "a learner never campaigns"
    );
}

#[test]
fn leadership_transfer_hands_over_and_refuses_writes_meanwhile() {
    let mut h = three();
    h.deliver_all();
    h.node(1).core.transfer_leadership(2).unwrap();
    assert!(matches!(
        h.propose(1, b"x"),
        Err(RaftError::TransferInProgress { .. })
    ));
    h.process(1);
    h.deliver_all();
    assert_eq!(h.leaders(), vec![2]);
}

#[test]
fn transfer_to_an_unreachable_target_aborts_after_an_election_timeout() {
    let mut h = three();
    h.deliver_all();
    h.isolate(3);
    h.node(1).core.transfer_leadership(3).unwrap();
    h.tick(1, config::ELECTION_TIMEOUT_TICKS_DEFAULT - 1);
    assert_eq!(h.core(1).transfer_target(), Some(3));
    h.heal();
    h.isolate(3);
    h.deliver_all();
    h.tick(1, 1);
    assert_eq!(h.core(1).transfer_target(), None);
    assert!(h.propose(1, b"x").is_ok());
}

#[test]
fn acknowledgement_waits_for_the_followers_disk() {
    let mut h = three();
    h.deliver_all();
    h.node(2).auto_persist = false;
    h.node(3).auto_persist = false;
    let proposed = h.propose(1, b"x").unwrap();
    h.deliver_all();
    assert!(h.core(1).progress(2).unwrap().match_index < proposed.index);
    assert!(h.core(1).commit_index() < proposed.index);
    h.persist(2);
    h.deliver_all();
    assert_eq!(h.core(1).progress(2).unwrap().match_index, proposed.index);
    assert_eq!(h.core(1).commit_index(), proposed.index);
}

#[test]
fn membership_entries_carry_the_whole_group() {
    let mut h = three();
    h.deliver_all();
    h.node(1)
        .core
        .propose_membership(MembershipChange::AddLearner(4))
        .unwrap();
    h.process(1);
    let entry = h.core(1).log_entry(h.core(1).last_index()).unwrap().clone();
    assert_eq!(entry.kind, EntryKind::Membership);
    let decoded = membership::decode(&entry.data).unwrap();
    assert_eq!(decoded.voters.len(), 3);
    assert!(decoded.learners.contains(&4));
    assert_eq!(
        h.core(1).membership(),
        &decoded,
        "in force as soon as appended"
    );
}

/// Follower 2 of {1, 2, 3} with an empty log.
fn fresh_follower() -> RaftCore {
    let membership = crate::raft::types::Membership {
        voters: [1, 2, 3].into(),
        ..Default::default()
    };
    let initial = InitialState {
        snapshot: crate::raft::types::SnapshotMeta {
            index: 0,
            term: 0,
            membership,
        },
        ..Default::default()
    };
    RaftCore::new(Config::new(2, 7), initial)
}

fn append_from_leader(
    prev_index: u64,
    prev_term: u64,
    entries: Vec<crate::raft::types::Entry>,
    commit: u64,
) -> Message {
    Message {
        from: 1,
        to: 2,
        term: 1,
        body: MessageBody::Append {
            prev_index,
            prev_term,
            entries,
            commit,
        },
    }
}

#[test]
fn a_new_commit_index_alone_asks_for_no_write() {
    let entry = |index| crate::raft::types::Entry {
        term: 1,
        index,
        kind: EntryKind::Normal,
        data: Bytes::from_static(b"x"),
    };
    let mut core = fresh_follower();
    core.step(append_from_leader(0, 0, vec![entry(1)], 0));
    let ready = core.ready();
    assert_eq!(ready.entries.len(), 1);
    let hard_state = ready
        .hard_state
        .expect("the new term is written with the entry");
    assert_eq!((hard_state.term, hard_state.commit), (1, 0));
    core.on_entries_persisted(1, 1);
    core.on_hard_state_persisted(hard_state);
    assert_eq!(
        core.ready().messages.len(),
        1,
        "the acknowledgement, once durable"
    );

    // The leader's commit broadcast: apply at once, but nothing to fsync.
    core.step(append_from_leader(1, 1, Vec::new(), 1));
    let ready = core.ready();
    assert_eq!(ready.committed_entries.len(), 1);
    assert!(ready.entries.is_empty());
    assert_eq!(
        ready.hard_state, None,
        "a commit index alone is not persisted"
    );
    assert_eq!(core.hard_state().commit, 1);
    assert!(!core.has_ready(), "and it does not keep asking");

    // It rides along with the next entries.
    core.step(append_from_leader(1, 1, vec![entry(2)], 1));
    let ready = core.ready();
    assert_eq!(ready.entries.len(), 1);
    assert_eq!(ready.hard_state.map(|hs| hs.commit), Some(1));
}
