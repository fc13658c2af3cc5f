//! A real network partition: three managers in network namespaces; one follower's link is
//! taken down while the others keep writing, then brought back. Pre-vote keeps the isolated
//! follower from disturbing the leader when it returns: same leader, same term, and it
//! catches up. Needs root (network namespaces), like the rest of this test machine.
#![allow(clippy::unwrap_used, missing_docs)]

mod procs;

use std::time::{Duration, Instant};

use bytes::Bytes;
use procs::cluster::{Cluster, ClusterOptions, START};
use procs::netns::Hosts;

#[test]
fn partitioned_follower_catches_up_without_disturbing_the_leader() {
    let hosts = Hosts::create(3);
    let options = ClusterOptions {
        addrs: (0..3).map(|i| format!("{}:4242", hosts.addr(i))).collect(),
        wrappers: (0..3).map(|i| hosts.wrapper(i)).collect(),
        ..Default::default()
    };
    let mut cluster = Cluster::start(3, options);
    let client = cluster.client();
    let before = client.leader_status(&cluster).expect("a leader");
    let leader = cluster.leader_index(&client).unwrap();
    let follower = (leader + 1) % 3;
    let leader_addr = cluster.managers[leader].addr.clone();

    hosts.cut(follower);
    // Several election timeouts (1-2 s each): the isolated follower's election timer fires
    // repeatedly; with pre-vote it never raises its term.
    let cut_until = Instant::now() + Duration::from_secs(6);
    let mut written = 0;
    while Instant::now() < cut_until {
        client
            .put_at(
                &leader_addr,
                &format!("during-cut-{written}"),
                Bytes::from_static(b"v"),
            )
            .unwrap();
        written += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let follower_addr = cluster.managers[follower].addr.clone();
    assert!(
        client.status(&follower_addr).is_err(),
        "the cut follower is still reachable: the partition is not real"
    );
    hosts.heal(follower);

    let deadline = Instant::now() + START;
    let commit = client.status(&leader_addr).unwrap().commit;
    loop {
        if let Ok(status) = client.status(&follower_addr)
            && status.applied >= commit
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the healed follower never caught up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = client.status(&leader_addr).unwrap();
    assert_eq!(after.leader, before.leader, "the leader changed");
    assert_eq!(
        after.term, before.term,
        "the healed follower disturbed the term"
    );
    let got = client
        .get_at(&follower_addr, &format!("during-cut-{}", written - 1))
        .unwrap();
    assert!(got.found, "the follower missed writes made during the cut");
    for manager in &mut cluster.managers {
        manager.stop();
    }
}
