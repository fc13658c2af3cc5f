//! A cluster of real `flotilla` manager processes on loopback (or in network namespaces),
//! and a client that speaks to them with a manager's identity.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla::ca::{load_node_files, tls};
use flotilla::net::{CallOptions, Transport, TransportConfig};
use flotilla::proto::kv as kvpb;
use flotilla::proto::raft as rpb;
use flotilla::wire::Status;

use super::{Proc, free_addr};

pub const START: Duration = Duration::from_secs(30);
/// Where [`Cluster::client`]'s identity is kept (in the cluster's temporary directory).
const CLIENT_IDENTITY_DIR: &str = "client-identity";

/// One manager process and where it lives.
pub struct ManagerProc {
    pub name: String,
    pub dir: PathBuf,
    pub addr: String,
    pub proc: Option<Proc>,
    /// Prefix for commands (e.g. `ip netns exec NS`), empty on plain loopback.
    pub wrapper: Vec<String>,
}

impl ManagerProc {
    fn dir_arg(&self) -> String {
        self.dir.to_str().unwrap().to_string()
    }

    /// Starts `flotilla run` on its existing state.
    pub fn restart(&mut self) {
        assert!(self.proc.is_none(), "{} is still running", self.name);
        let dir = self.dir_arg();
        let mut proc = spawn(&self.name, &self.wrapper, &["run", "--state-dir", &dir]);
        proc.wait_for("flotilla manager listening", START);
        self.proc = Some(proc);
    }

    /// SIGKILL: nothing runs on the way out.
    pub fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.signal(15);
            let status = proc.wait_exit(START);
            let output = proc.output();
            assert!(
                status.success(),
                "{} exited with {status:?}:\n{output}",
                self.name
            );
        }
    }

    pub fn proc(&mut self) -> &mut Proc {
        self.proc.as_mut().expect("running")
    }
}

fn spawn(name: &str, wrapper: &[String], args: &[&str]) -> Proc {
    if wrapper.is_empty() {
        return Proc::start(name, args);
    }
    let bin = super::flotilla_bin();
    let mut all: Vec<&str> = wrapper[1..].iter().map(String::as_str).collect();
    all.push(bin);
    all.extend_from_slice(args);
    Proc::start_program(name, &wrapper[0], &all)
}

/// Options of a test cluster.
#[derive(Clone, Default)]
pub struct ClusterOptions {
    pub snapshot_interval_entries: Option<u64>,
    /// Addresses to use (one per manager) instead of free loopback ports.
    pub addrs: Vec<String>,
    /// Command prefixes per manager (network namespaces).
    pub wrappers: Vec<Vec<String>>,
    /// More arguments for `init`/`join`, per manager (`--dns-listen`, `--gossip-listen`).
    pub extra_args: Vec<Vec<String>>,
}

/// Managers started with `init` and `join`.
pub struct Cluster {
    pub tmp: tempfile::TempDir,
    pub managers: Vec<ManagerProc>,
    pub token: String,
    pub options: ClusterOptions,
}

fn token_from(line: &str) -> String {
    line.split_whitespace()
        .find(|w| w.starts_with("FLT-1-"))
        .expect("a token on the line")
        .to_string()
}

impl Cluster {
    /// Starts `n` managers and waits until all are voters.
    pub fn start(n: usize, options: ClusterOptions) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let mut cluster = Cluster {
            tmp,
            managers: Vec::new(),
            token: String::new(),
            options,
        };
        cluster.add_founder();
        for _ in 1..n {
            cluster.add_joiner();
        }
        cluster.wait_voters(n, START);
        cluster
    }

    fn next_slot(&self) -> (String, PathBuf, String, Vec<String>) {
        let i = self.managers.len();
        let name = format!("m{}", i + 1);
        let dir = self.tmp.path().join(&name);
        let addr = self.options.addrs.get(i).cloned().unwrap_or_else(free_addr);
        let wrapper = self.options.wrappers.get(i).cloned().unwrap_or_default();
        (name, dir, addr, wrapper)
    }

    fn interval_args(&self) -> Vec<String> {
        self.options
            .snapshot_interval_entries
            .map(|n| vec!["--snapshot-interval-entries".to_string(), n.to_string()])
            .unwrap_or_default()
    }

    /// The next manager's own extra arguments.
    fn extra_args(&self) -> Vec<String> {
        self.options
            .extra_args
            .get(self.managers.len())
            .cloned()
            .unwrap_or_default()
    }

    fn add_founder(&mut self) {
        let (name, dir, addr, wrapper) = self.next_slot();
        let mut args = vec![
            "init".to_string(),
            "--state-dir".into(),
            dir.to_str().unwrap().into(),
            "--listen".into(),
            addr.clone(),
        ];
        args.extend(self.interval_args());
        args.extend(self.extra_args());
        // The key-value map is these tests' and benchmarks' fixture (`put_at`, `get_at`).
        args.push("--kv-enabled".into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut proc = spawn(&name, &wrapper, &args);
        self.token = token_from(&proc.wait_for("flotilla join", START));
        proc.wait_for("flotilla manager listening", START);
        proc.wait_for("leader in term", START);
        let copied = std::process::Command::new("cp")
            .arg("-a")
            .arg(dir.join("node"))
            .arg(self.tmp.path().join(CLIENT_IDENTITY_DIR))
            .status()
            .unwrap();
        assert!(copied.success(), "cannot copy the founder's identity");
        self.managers.push(ManagerProc {
            name,
            dir,
            addr,
            proc: Some(proc),
            wrapper,
        });
    }

    /// Starts one more manager with `join` (through the first manager); returns its index.
    pub fn add_joiner(&mut self) -> usize {
        self.add_joiner_via(0)
    }

    /// Starts one more manager with `join` through manager `via`; returns its index.
    pub fn add_joiner_via(&mut self, via: usize) -> usize {
        let (name, dir, addr, wrapper) = self.next_slot();
        let via = self.managers[via].addr.clone();
        let mut args = vec![
            "join".to_string(),
            "--state-dir".into(),
            dir.to_str().unwrap().into(),
            "--listen".into(),
            addr.clone(),
            "--token".into(),
            self.token.clone(),
        ];
        args.extend(self.interval_args());
        args.extend(self.extra_args());
        args.push("--kv-enabled".into());
        args.push(via);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut proc = spawn(&name, &wrapper, &args);
        proc.wait_for("flotilla manager listening", START);
        self.managers.push(ManagerProc {
            name,
            dir,
            addr,
            proc: Some(proc),
            wrapper,
        });
        self.managers.len() - 1
    }

    /// A client with the founder's manager certificate as it was at the start (a copy: the
    /// founder's own may be renewed as a worker's once it is demoted).
    pub fn client(&self) -> Client {
        Client::new(&self.tmp.path().join(CLIENT_IDENTITY_DIR))
    }

    /// Waits until the leader reports `n` voters, all reachable.
    pub fn wait_voters(&self, n: usize, timeout: Duration) {
        let client = self.client();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = client.leader_status(self) {
                let voters = status
                    .members
                    .iter()
                    .filter(|m| m.role != "learner" && m.reachable)
                    .count();
                if voters == n {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the cluster never reached {n} voters"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn addrs(&self) -> Vec<String> {
        self.managers.iter().map(|m| m.addr.clone()).collect()
    }

    /// The index of the manager that currently leads, if any answers.
    pub fn leader_index(&self, client: &Client) -> Option<usize> {
        let status = client.leader_status(self)?;
        let addr = status
            .members
            .iter()
            .find(|m| m.raft_id == status.leader)?
            .addr
            .clone();
        self.managers.iter().position(|m| m.addr == addr)
    }
}

/// How long the managers of a dropped cluster have to exit after SIGTERM before they are
/// killed: their agents stop their task processes first, so no test leaves processes
/// running (a SIGKILL alone orphaned them).
const DROP_GRACE: Duration = Duration::from_secs(2);

impl Drop for Cluster {
    fn drop(&mut self) {
        let procs: Vec<Proc> = self
            .managers
            .iter_mut()
            .filter_map(|manager| manager.proc.take())
            .collect();
        for proc in &procs {
            let pid = proc.pid().to_string();
            let _ = std::process::Command::new("kill")
                .args(["-15", &pid])
                .status();
        }
        let deadline = Instant::now() + DROP_GRACE;
        for mut proc in procs {
            proc.exit_within(deadline.saturating_duration_since(Instant::now()));
        }
    }
}

/// Calls managers with the identity of a manager's state directory.
pub struct Client {
    pub transport: Transport,
    tls: Arc<rustls::ClientConfig>,
}

pub const CALL: Duration = Duration::from_secs(5);

fn leader_hint(status: &Status) -> Option<String> {
    status.leader_hint().map(str::to_string)
}

impl Client {
    pub fn new(node_dir: &Path) -> Client {
        let (identity, root) = load_node_files(node_dir).unwrap();
        Client {
            transport: Transport::start(TransportConfig::default()).unwrap(),
            tls: Arc::new(tls::client_config(&identity, &root).unwrap()),
        }
    }

    pub fn status(&self, addr: &str) -> Result<rpb::StatusResponse, Status> {
        self.transport.channel(addr, &self.tls).unary(
            "raft.Status",
            &rpb::StatusRequest {},
            CallOptions::timeout(CALL),
        )
    }

    /// The status as the current leader reports it (asking every running manager).
    pub fn leader_status(&self, cluster: &Cluster) -> Option<rpb::StatusResponse> {
        for manager in cluster.managers.iter().filter(|m| m.proc.is_some()) {
            let Ok(status) = self.status(&manager.addr) else {
                continue;
            };
            if status.leader == status.id {
                return Some(status);
            }
        }
        None
    }

    /// Applies `command` at `addr`, following one leader redirect.
    pub fn apply_at(
        &self,
        addr: &str,
        command: &kvpb::Command,
    ) -> Result<kvpb::ApplyResult, Status> {
        let call = |target: &str| {
            self.transport
                .channel(target, &self.tls)
                .unary::<_, kvpb::ApplyResult>("kv.Apply", command, CallOptions::timeout(CALL))
        };
        match call(addr) {
            Err(status) => match leader_hint(&status) {
                Some(leader) if leader != addr => call(&leader),
                _ => Err(status),
            },
            ok => ok,
        }
    }

    pub fn put_at(&self, addr: &str, key: &str, value: Bytes) -> Result<kvpb::ApplyResult, Status> {
        let command = kvpb::Command {
            op: Some(kvpb::command::Op::Put(kvpb::Put {
                key: key.into(),
                value,
            })),
        };
        self.apply_at(addr, &command)
    }

    /// A linearizable read served by the manager at `addr`.
    pub fn get_at(&self, addr: &str, key: &str) -> Result<kvpb::GetResponse, Status> {
        self.transport.channel(addr, &self.tls).unary(
            "kv.Get",
            &kvpb::GetRequest { key: key.into() },
            CallOptions::timeout(CALL),
        )
    }
}
