//! The manager group as real processes: failover under write load (3 and 5 managers), a
//! restarted manager catching up, a joiner receiving a large snapshot with bounded memory,
//! and `flotilla manager ls|rm|transfer` (through the control API: local socket, remote
//! manager, JSON).
#![allow(clippy::unwrap_used, missing_docs)]

mod procs;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use procs::cluster::{Cluster, ClusterOptions, START};
use procs::run_to_end;

/// Writers that put unique keys through any manager and record what was acknowledged.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<BTreeMap<String, Bytes>>>,
    /// When each acknowledgement arrived.
    ack_times: Arc<Mutex<Vec<Instant>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(cluster: &Cluster, writers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(BTreeMap::new()));
        let ack_times = Arc::new(Mutex::new(Vec::new()));
        let addrs = cluster.addrs();
        let node_dir = cluster.managers[0].dir.join("node");
        let threads = (0..writers)
            .map(|w| {
                let (stop, acked, ack_times) = (stop.clone(), acked.clone(), ack_times.clone());
                let addrs = addrs.clone();
                let client = procs::cluster::Client::new(&node_dir);
                std::thread::spawn(move || {
                    let mut seq = 0u64;
                    while !stop.load(Ordering::Acquire) {
                        let key = format!("w{w}-{seq}");
                        let value = Bytes::from(format!("value of {key}"));
                        let addr = &addrs[(seq as usize + w) % addrs.len()];
                        if client.put_at(addr, &key, value.clone()).is_ok() {
                            acked.lock().insert(key, value);
                            ack_times.lock().push(Instant::now());
                        } else {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        seq += 1;
                    }
                    client.transport.shutdown();
                })
            })
            .collect();
        Load {
            stop,
            acked,
            ack_times,
            threads,
        }
    }

    fn stop(self) -> (BTreeMap<String, Bytes>, Vec<Instant>) {
        self.stop.store(true, Ordering::Release);
        for thread in self.threads {
            thread.join().unwrap();
        }
        let acked = std::mem::take(&mut *self.acked.lock());
        let times = std::mem::take(&mut *self.ack_times.lock());
        (acked, times)
    }
}

fn failover(n: usize) {
    let mut cluster = Cluster::start(n, ClusterOptions::default());
    let client = cluster.client();
    let load = Load::start(&cluster, 4);
    std::thread::sleep(Duration::from_secs(2));
    let leader = cluster.leader_index(&client).expect("a leader");
    let killed_at = Instant::now();
    cluster.managers[leader].kill();
    std::thread::sleep(Duration::from_secs(3));
    let (acked, ack_times) = load.stop();
    let resumed = ack_times
        .iter()
        .find(|t| **t > killed_at)
        .expect("writes resumed after the leader was killed");
    // Figures, not assertions: tests never assert timings.
    println!(
        "FIGURE failover_{n}_managers_ms {} ({} writes acknowledged)",
        resumed.duration_since(killed_at).as_millis(),
        acked.len()
    );
    assert!(
        acked.len() > 50,
        "too few writes acknowledged: {}",
        acked.len()
    );

    // The killed manager restarts from its state and catches up.
    cluster.managers[leader].restart();
    let deadline = Instant::now() + START;
    let commit = client.leader_status(&cluster).expect("a leader").commit;
    loop {
        let status = client.status(&cluster.managers[leader].addr).unwrap();
        if status.applied >= commit {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted manager never caught up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Every acknowledged write is there, read linearizably through every manager.
    for manager in &cluster.managers {
        for (key, value) in acked.iter().step_by(7) {
            let got = client.get_at(&manager.addr, key).unwrap();
            assert!(got.found, "{} lost acknowledged key {key}", manager.name);
            assert_eq!(&got.value, value);
        }
    }
    for (key, value) in &acked {
        let got = client.get_at(&cluster.managers[leader].addr, key).unwrap();
        assert!(got.found && got.value == *value, "acknowledged {key} lost");
    }
}

#[test]
fn three_managers_lose_no_acknowledged_write_when_the_leader_is_killed() {
    failover(3);
}

#[test]
fn five_managers_lose_no_acknowledged_write_when_the_leader_is_killed() {
    failover(5);
}

/// The growth the joiner reported on its "received snapshot" line.
fn rss_growth_mib(line: &str) -> f64 {
    line.split("rss growth ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no rss growth on {line:?}"))
}

/// Size of the state a joiner must receive: 200 MiB by default (the figure);
/// `FLOTILLA_SNAPSHOT_TEST_MIB` changes it.
fn snapshot_test_mib() -> usize {
    std::env::var("FLOTILLA_SNAPSHOT_TEST_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

/// A one-manager cluster holding `mib` values of 1 MiB (`big-00000`…, bytes `i % 251`),
/// followed by enough small writes that the big entries are compacted out of the log: a
/// manager joining it must receive them as a snapshot.
fn compacted_cluster(mib: usize) -> (Cluster, procs::cluster::Client, String) {
    let mut cluster = Cluster::start(
        1,
        ClusterOptions {
            snapshot_interval_entries: Some(200),
            ..Default::default()
        },
    );
    let client = cluster.client();
    let leader = cluster.managers[0].addr.clone();
    for i in 0..mib {
        let value = Bytes::from(vec![(i % 251) as u8; 1 << 20]);
        client
            .put_at(&leader, &format!("big-{i:05}"), value)
            .unwrap();
    }
    // A snapshot is due only once the log since the last one holds a quarter of its size
    // (`SNAPSHOT_BYTES_PER_LOG_BYTE_MAX`): these writes carry a third, in entries far
    // smaller than the big ones. Whether or not one falls due while they are written, the
    // idle log is snapshotted once they stop.
    let small = Bytes::from(vec![b'x'; (mib << 20) / 3 / 800]);
    for i in 0..800 {
        client
            .put_at(&leader, &format!("small-{i}"), small.clone())
            .unwrap();
    }
    // Compacted: a snapshot past the 500 entries kept for slow followers, so a joiner
    // needs the snapshot.
    let deadline = Instant::now() + Duration::from_secs(120);
    while newest_snapshot_logged(cluster.managers[0].proc()) <= 500 {
        assert!(Instant::now() < deadline, "the log was never compacted");
        std::thread::sleep(Duration::from_millis(200));
    }
    (cluster, client, leader)
}

/// The highest index of the "snapshot at index N" lines a manager logged so far.
fn newest_snapshot_logged(proc: &mut procs::Proc) -> u64 {
    proc.output()
        .lines()
        .filter_map(|line| line.split("snapshot at index ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

#[test]
fn joiner_after_compaction_receives_a_large_snapshot_with_bounded_memory() {
    let value_bytes = 1 << 20;
    let mib = snapshot_test_mib();
    let (mut cluster, client, _) = compacted_cluster(mib);
    let joiner = cluster.add_joiner();
    // The joiner samples its own RSS at every chunk while it receives (no sampling lag).
    let received = cluster.managers[joiner]
        .proc()
        .wait_for("received snapshot", Duration::from_secs(300));
    let growth_mib = rss_growth_mib(&received);
    println!("FIGURE snapshot_{mib}MiB_receive_rss_growth_MiB {growth_mib:.1}");
    assert!(
        growth_mib < 64.0,
        "receiving a {mib} MiB snapshot grew RSS by {growth_mib:.1} MiB (limit 64)"
    );
    cluster.wait_voters(2, START);
    let joiner_addr = cluster.managers[joiner].addr.clone();
    for i in [0, mib / 2, mib - 1] {
        let got = client.get_at(&joiner_addr, &format!("big-{i:05}")).unwrap();
        assert!(got.found);
        assert_eq!(got.value.len(), value_bytes);
        assert!(got.value.iter().all(|b| *b == (i % 251) as u8));
    }
}

fn manager_cli(dir: &std::path::Path, args: &[&str]) -> (bool, String) {
    let mut all = vec!["manager", "--state-dir", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    let (status, output) = run_to_end(&all, START);
    (status.success(), output)
}

fn row_id(listing: &str, addr: &str) -> String {
    listing
        .lines()
        .find(|l| l.contains(addr))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("{addr} not listed:\n{listing}"))
        .to_string()
}

#[test]
fn manager_ls_transfer_and_rm_through_the_cli() {
    let mut cluster = Cluster::start(3, ClusterOptions::default());
    let dir = cluster.managers[1].dir.clone();
    let (ok, listing) = manager_cli(&dir, &["ls"]);
    assert!(ok, "{listing}");
    for manager in &cluster.managers {
        assert!(listing.contains(&manager.addr), "{listing}");
    }
    assert_eq!(listing.matches(" leader ").count(), 1, "{listing}");
    assert!(
        listing.contains("ms ago"),
        "no last contact shown:\n{listing}"
    );

    // The same through another manager, remotely, as JSON for scripts.
    let (ok, json) = manager_cli(
        &dir,
        &[
            "ls",
            "--format",
            "json",
            "--manager",
            &cluster.managers[2].addr,
        ],
    );
    assert!(ok && json.trim_start().starts_with('{'), "{json}");
    for manager in &cluster.managers {
        assert!(
            json.contains(&format!("\"addr\": \"{}\"", manager.addr)),
            "{json}"
        );
    }
    assert_eq!(json.matches("\"role\": \"leader\"").count(), 1, "{json}");

    // The local command goes through the state directory's unix socket: it works even
    // when the recorded network address leads nowhere.
    let conf_path = dir.join("manager.conf");
    let conf = std::fs::read_to_string(&conf_path).unwrap();
    let listen_line = conf
        .lines()
        .find(|l| l.starts_with("listen_addr"))
        .unwrap()
        .to_string();
    std::fs::write(
        &conf_path,
        conf.replace(&listen_line, "listen_addr = \"127.0.0.1:1\""),
    )
    .unwrap();
    let (ok, via_socket) = manager_cli(&dir, &["ls"]);
    std::fs::write(&conf_path, &conf).unwrap();
    assert!(ok, "{via_socket}");
    assert!(via_socket.contains(" leader "), "{via_socket}");

    // Hand leadership to the third manager.
    let target = row_id(&listing, &cluster.managers[2].addr);
    let (ok, output) = manager_cli(&dir, &["transfer", &target]);
    assert!(ok, "{output}");
    let client = cluster.client();
    assert_eq!(cluster.leader_index(&client), Some(2));

    // Bad input is refused with a hint.
    let (ok, output) = manager_cli(&dir, &["rm", "not-an-id"]);
    assert!(!ok && output.contains("manager ls"), "{output}");
    let (ok, output) = manager_cli(&dir, &["rm", "abcdef"]);
    assert!(!ok && output.contains("not a manager"), "{output}");

    // With one manager down, removing another would break the quorum: refused.
    cluster.managers[0].kill();
    std::thread::sleep(Duration::from_secs(3));
    let first = row_id(&listing, &cluster.managers[0].addr);
    let second = row_id(&listing, &cluster.managers[1].addr);
    let (ok, output) = manager_cli(&dir, &["rm", &second]);
    assert!(!ok && output.contains("--force"), "{output}");
    // Removing the dead one is fine; then it is gone from the listing.
    let (ok, output) = manager_cli(&dir, &["rm", &first]);
    assert!(ok, "{output}");
    let (_, listing) = manager_cli(&dir, &["ls"]);
    assert!(!listing.contains(&cluster.managers[0].addr), "{listing}");

    // A removed manager that comes back learns it was removed and exits.
    let dir0 = cluster.managers[0].dir.to_str().unwrap().to_string();
    let mut back = procs::Proc::start("m1-removed", &["run", "--state-dir", &dir0]);
    let status = back.wait_exit(START);
    let output = back.output();
    assert!(!status.success(), "{output}");
    assert!(output.contains("removed from the cluster"), "{output}");
}

#[test]
fn snapshot_transfer_broken_by_a_crash_is_reported_then_restarts_cleanly() {
    let mib = snapshot_test_mib().min(100);
    let (mut cluster, client, leader) = compacted_cluster(mib);
    let joiner = cluster.add_joiner();
    cluster.managers[0]
        .proc()
        .wait_for("streaming snapshot", START);
    cluster.managers[joiner].kill();

    // The leader reports the failing transfer instead of retrying silently.
    let deadline = Instant::now() + START;
    loop {
        let status = client.status(&leader).unwrap();
        if status
            .members
            .iter()
            .any(|m| m.problem.contains("snapshot transfer failing"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the broken transfer was never reported"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Restarted, the joiner gets a fresh transfer, installs it and catches up.
    cluster.managers[joiner].restart();
    cluster.wait_voters(2, START);
    let joiner_addr = cluster.managers[joiner].addr.clone();
    let got = client
        .get_at(&joiner_addr, &format!("big-{:05}", mib - 1))
        .unwrap();
    assert!(got.found && got.value.len() == 1 << 20);
    let status = client.status(&leader).unwrap();
    assert!(
        status.members.iter().all(|m| m.problem.is_empty()),
        "the problem was not cleared after a good transfer: {status:?}"
    );
}

#[test]
fn whole_cluster_restart_keeps_every_acknowledged_write() {
    let mut cluster = Cluster::start(3, ClusterOptions::default());
    let client = cluster.client();
    let addrs = cluster.addrs();
    for i in 0..200 {
        client
            .put_at(
                &addrs[i % 3],
                &format!("k{i}"),
                Bytes::from(format!("v{i}")),
            )
            .unwrap();
    }
    for manager in &mut cluster.managers {
        manager.stop();
    }
    for manager in &mut cluster.managers {
        manager.restart();
    }
    cluster.wait_voters(3, START);
    for i in 0..200 {
        let got = client
            .get_at(&addrs[(i + 1) % 3], &format!("k{i}"))
            .unwrap();
        assert!(got.found, "k{i} lost across the restart");
        assert_eq!(got.value, Bytes::from(format!("v{i}")));
    }
}
