//! The etcd 3.4 peer, measured in the same run: three members on loopback (Debian's
//! `etcd-server`, fsync on, data in the same temporary directory as flotilla's managers),
//! loaded by `etcd-load` (`../shared/tools/etcd-load`: a closed-loop gRPC put client, one put
//! per client at a time, like `raft_cluster`'s own load). Included by the benchmarks with
//! `#[path = "common/etcd.rs"] mod etcd;`.
//!
//! Owns the members' processes and data directory (killed and removed on drop); must never
//! touch flotilla's code paths.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long three new members get to elect a leader.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Three running etcd members.
pub struct Etcd3 {
    _tmp: tempfile::TempDir,
    members: Vec<Child>,
    /// Client address (`host:port`) of each member.
    pub client_addrs: Vec<String>,
}

/// What one `etcd-load` run measured.
#[derive(Clone, Copy, Debug)]
pub struct LoadResult {
    pub ops: u64,
    pub ops_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Whether `name` is an executable on the `PATH`; its path if so.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

impl Etcd3 {
    /// Starts three members under `base` and waits until they have a leader.
    pub fn start(base: &Path) -> Etcd3 {
        let tmp = tempfile::tempdir_in(base).unwrap();
        let peers: Vec<String> = (0..3).map(|_| free_addr()).collect();
        let client_addrs: Vec<String> = (0..3).map(|_| free_addr()).collect();
        let cluster: Vec<String> = peers
            .iter()
            .enumerate()
            .map(|(i, peer)| format!("e{i}=http://{peer}"))
            .collect();
        let members = (0..3)
            .map(|i| {
                let client_url = format!("http://{}", client_addrs[i]);
                let peer_url = format!("http://{}", peers[i]);
                Command::new("etcd")
                    .args([
                        "--name",
                        &format!("e{i}"),
                        "--data-dir",
                        tmp.path().join(format!("e{i}")).to_str().unwrap(),
                        "--listen-client-urls",
                        &client_url,
                        "--advertise-client-urls",
                        &client_url,
                        "--listen-peer-urls",
                        &peer_url,
                        "--initial-advertise-peer-urls",
                        &peer_url,
                        "--initial-cluster",
                        &cluster.join(","),
                        "--initial-cluster-state",
                        "new",
                        "--log-level",
                        "error",
                    ])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn etcd")
            })
            .collect();
        let etcd = Etcd3 {
            _tmp: tmp,
            members,
            client_addrs,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        while etcd.leader_index().is_none() {
            assert!(Instant::now() < deadline, "etcd elected no leader");
            std::thread::sleep(Duration::from_millis(100));
        }
        etcd
    }

    /// The process id of member `index`.
    pub fn pid(&self, index: usize) -> u32 {
        self.members[index].id()
    }

    /// The member that leads now, from each member's status (the JSON gateway's
    /// `/v3/maintenance/status`: its own id and the leader's).
    pub fn leader_index(&self) -> Option<usize> {
        self.client_addrs.iter().position(|addr| {
            status(addr).is_some_and(|status| {
                let member = status["header"]["member_id"].as_str().map(str::to_string);
                let leader = status["leader"].as_str().map(str::to_string);
                member.is_some() && member == leader
            })
        })
    }

    /// Runs `etcd-load` (`program`) against member `index` with `clients` closed-loop
    /// clients for `seconds`, 256-byte values.
    pub fn load(&self, program: &Path, index: usize, clients: usize, seconds: u64) -> LoadResult {
        let output = Command::new(program)
            .args([
                &format!("http://{}", self.client_addrs[index]),
                &clients.to_string(),
                &seconds.to_string(),
                "256",
            ])
            .output()
            .expect("run etcd-load");
        let text = String::from_utf8_lossy(&output.stdout).to_string();
        assert!(output.status.success(), "etcd-load failed: {text}");
        parse_load(&text).unwrap_or_else(|| panic!("unexpected etcd-load output: {text}"))
    }

    /// Starts `etcd-load` in the background (to sample CPU while it runs).
    pub fn spawn_load(&self, program: &Path, index: usize, clients: usize, seconds: u64) -> Child {
        Command::new(program)
            .args([
                &format!("http://{}", self.client_addrs[index]),
                &clients.to_string(),
                &seconds.to_string(),
                "256",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("run etcd-load")
    }
}

/// The result of a finished background load.
pub fn finish_load(child: Child) -> LoadResult {
    let output = child.wait_with_output().expect("etcd-load ends");
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(output.status.success(), "etcd-load failed: {text}");
    parse_load(&text).unwrap_or_else(|| panic!("unexpected etcd-load output: {text}"))
}

impl Drop for Etcd3 {
    fn drop(&mut self) {
        for member in &mut self.members {
            let _ = member.kill();
            let _ = member.wait();
        }
    }
}

/// Parses `etcd clients=C value=V ops=N ops/s=X p50=Aus p99=Bus`.
fn parse_load(text: &str) -> Option<LoadResult> {
    let field = |name: &str| {
        text.split_whitespace()
            .find_map(|word| word.strip_prefix(name))
            .map(|value| value.trim_end_matches("us").to_string())
    };
    Some(LoadResult {
        ops: field("ops=")?.parse().ok()?,
        ops_per_s: field("ops/s=")?.parse().ok()?,
        p50_us: field("p50=")?.parse().ok()?,
        p99_us: field("p99=")?.parse().ok()?,
    })
}

/// The member's status through the JSON gateway, or `None` if it does not answer.
fn status(addr: &str) -> Option<serde_json::Value> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let request = format!(
        "POST /v3/maintenance/status HTTP/1.1\r\nHost: {addr}\r\nContent-Type: \
         application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    // The body may come chunked: the JSON object is from the first '{' to the last '}'.
    let json = &body[body.find('{')?..=body.rfind('}')?];
    serde_json::from_str(json).ok()
}
