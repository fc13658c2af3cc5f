//! Real `flotilla` processes for multi-process tests: start one with arguments, read its
//! stdout and stderr line by line, wait for a line, signal it, collect its exit status.
#![allow(dead_code)]

pub mod cluster;
pub mod netns;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

/// The binary under test.
pub fn flotilla_bin() -> &'static str {
    env!("CARGO_BIN_EXE_flotilla")
}

/// A loopback address with a port that was free a moment ago, and whose next port (a
/// node's default gossip port, TCP and UDP) was free too. No two calls in one test process
/// hand out the same port or each other's neighbour, so nodes started side by side do not
/// collide on their default gossip ports.
pub fn free_addr() -> String {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..FREE_ADDR_TRIES_MAX {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let Some(next) = port.checked_add(1) else {
            continue;
        };
        let next_free = TcpListener::bind(("127.0.0.1", next)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", next)).is_ok();
        let mut handed_out = HANDED_OUT.lock().unwrap();
        // Neither this port nor its neighbour is a port or a neighbour handed out before.
        let taken = handed_out
            .iter()
            .any(|&h| h == port || h == next || h.checked_add(1) == Some(port));
        if next_free && !taken {
            handed_out.push(port);
            return format!("127.0.0.1:{port}");
        }
    }
    panic!("no free loopback port with a free neighbour in {FREE_ADDR_TRIES_MAX} tries");
}

/// Ports [`free_addr`] tries before it gives up.
const FREE_ADDR_TRIES_MAX: usize = 1000;

/// One running `flotilla` process and everything it printed so far.
pub struct Proc {
    pub name: String,
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

fn pump(name: String, stream: impl Read + Send + 'static, tx: Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if std::env::var_os("FLOTILLA_TEST_ECHO").is_some() {
                eprintln!("[{name}] {line}");
            }
            if tx.send(line).is_err() {
                break;
            }
        }
    });
}

impl Proc {
    /// Starts `flotilla ARGS` with `RUST_LOG` at info unless the caller set it.
    pub fn start(name: &str, args: &[&str]) -> Proc {
        Self::start_program(name, flotilla_bin(), args)
    }

    /// Starts `PROGRAM ARGS` (a wrapper such as `ip netns exec` around flotilla).
    pub fn start_program(name: &str, program: &str, args: &[&str]) -> Proc {
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        let mut child = command.spawn().expect("spawn flotilla");
        let (tx, rx) = crossbeam_channel::unbounded();
        pump(name.into(), child.stdout.take().unwrap(), tx.clone());
        pump(name.into(), child.stderr.take().unwrap(), tx);
        Proc {
            name: name.into(),
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Waits until a line containing `needle` appears (returns it), or panics with
    /// everything the process printed.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.lines.recv_deadline(deadline) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "{}: no line containing {needle:?} within {timeout:?}; output:\n{}",
                    self.name,
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits until a line containing `needle` appears (`Ok` with the line) or the process
    /// exits first (`Err` with its status); panics after `timeout`.
    pub fn wait_for_or_exit(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> Result<String, ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
                return Ok(line.clone());
            }
            match self.lines.recv_timeout(Duration::from_millis(20)) {
                Ok(line) => self.seen.push(line),
                Err(_) => {
                    if let Some(status) = self.child.try_wait().unwrap() {
                        // Collect what the pumps still hold.
                        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                            self.seen.push(line);
                        }
                        return match self.seen.iter().find(|l| l.contains(needle)) {
                            Some(line) => Ok(line.clone()),
                            None => Err(status),
                        };
                    }
                    assert!(
                        Instant::now() < deadline,
                        "{}: neither {needle:?} nor an exit within {timeout:?}; output:\n{}",
                        self.name,
                        self.seen.join("\n")
                    );
                }
            }
        }
    }

    /// How many lines the process printed so far: a mark for [`Proc::wait_for_after`],
    /// taken before causing what the caller then waits for.
    pub fn mark(&mut self) -> usize {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        self.seen.len()
    }

    /// As [`Proc::wait_for`], but only lines printed after `mark` count (a line that
    /// appears every time the process does something again). Returns the line's position
    /// (a mark for what follows it) and the line.
    pub fn wait_for_after(
        &mut self,
        mark: usize,
        needle: &str,
        timeout: Duration,
    ) -> (usize, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((at, line)) = self
                .seen
                .iter()
                .enumerate()
                .skip(mark)
                .find(|(_, l)| l.contains(needle))
            {
                return (at, line.clone());
            }
            match self.lines.recv_deadline(deadline) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!(
                    "{}: no line containing {needle:?} after line {mark} within {timeout:?}; \
                     output:\n{}",
                    self.name,
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Everything printed so far.
    pub fn output(&mut self) -> String {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        self.seen.join("\n")
    }

    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY-free: `kill` through the command line keeps the tests free of unsafe code.
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {pid} failed");
    }

    /// Waits for the process to exit, or panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let output = self.output();
                panic!(
                    "{} did not exit within {timeout:?}; output:\n{output}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Waits up to `grace` for the process to exit on its own (after a SIGTERM, say), then
    /// SIGKILLs it. Never panics (it runs in `Drop`).
    pub fn exit_within(&mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `flotilla ARGS` to completion: its exit status and everything it printed (stdout
/// and stderr interleaved).
pub fn run_to_end(args: &[&str], timeout: Duration) -> (ExitStatus, String) {
    let mut proc = Proc::start("cmd", args);
    let status = proc.wait_exit(timeout);
    // The pump threads end at EOF; collect until both have.
    let deadline = Instant::now() + Duration::from_secs(2);
    while let Ok(line) = proc.lines.recv_deadline(deadline) {
        proc.seen.push(line);
    }
    (status, proc.seen.join("\n"))
}

/// How long one CLI command may take in a test.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `flotilla WORD --state-dir DIR REST…` (`args` = `[WORD, REST…]`): whether it
/// succeeded, and everything it printed.
pub fn cli_in(dir: &Path, args: &[&str]) -> (bool, String) {
    let mut all: Vec<&str> = vec![args[0], "--state-dir", dir.to_str().expect("utf-8 path")];
    all.extend(&args[1..]);
    let (status, output) = run_to_end(&all, CLI_TIMEOUT);
    (status.success(), output)
}

/// As [`cli_in`], and the command must succeed: returns what it printed.
pub fn cli_ok(dir: &Path, args: &[&str]) -> String {
    let (success, output) = cli_in(dir, args);
    assert!(success, "flotilla {args:?} failed:\n{output}");
    output
}

/// File mode bits of `path`.
pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Polls `check` every 100 ms until it holds; panics naming `what` after `timeout`.
pub fn eventually(what: &str, timeout: Duration, check: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: never happened");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls `check` every 100 ms until it holds (true) or `timeout` passed (false): for a
/// caller that says what it saw when it gives up.
pub fn poll_until(timeout: Duration, check: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The Raft id (hex) of the manager at `addr` in a `manager ls --format json` listing.
pub fn raft_id_of(listing: &str, addr: &str) -> String {
    let mut id = None;
    for line in listing.lines().map(str::trim) {
        if let Some(value) = line.strip_prefix("\"id\": \"") {
            id = Some(value.trim_end_matches("\",").to_string());
        }
        if line.contains(&format!("\"addr\": \"{addr}\"")) {
            return id.unwrap_or_else(|| panic!("no id before {addr}:\n{listing}"));
        }
    }
    panic!("{addr} not listed:\n{listing}");
}

/// One task as `task ls` and `service ps` print it with `--format json` (the tables are for
/// people: their columns change; tests read the JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRow {
    pub id: String,
    pub slot: u64,
    /// Empty until the task is assigned.
    pub node: String,
    pub desired: String,
    pub current: String,
    /// What the tables' ERROR column shows: why it failed, or why it is still pending.
    pub problem: String,
}

/// Runs `flotilla ARGS --format json` (a task listing) in `dir` and parses its tasks.
pub fn task_rows(dir: &Path, args: &[&str]) -> Vec<TaskRow> {
    let mut args = args.to_vec();
    args.extend(["--format", "json"]);
    let output = cli_ok(dir, &args);
    // Only the JSON array: a log line on stderr may come before it.
    let json = &output[output.find('[').unwrap_or(0)..];
    let tasks: Vec<serde_json::Value> = serde_json::from_str(json)
        .unwrap_or_else(|e| panic!("flotilla {args:?} printed no task list ({e}):\n{output}"));
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    tasks
        .iter()
        .map(|t| {
            let status = &t["status"];
            let current = text(&status["state"]);
            let problem = match text(&status["err"]) {
                err if !err.is_empty() => err,
                _ if current == "pending" => text(&status["message"]),
                _ => String::new(),
            };
            TaskRow {
                id: text(&t["id"]),
                slot: t["slot"].as_u64().unwrap_or_default(),
                node: text(&t["node_id"]),
                desired: text(&t["desired_state"]),
                current,
                problem,
            }
        })
        .collect()
}

/// `(desired, current)` state names of `service`'s tasks, from `service ps`.
pub fn task_states(dir: &Path, service: &str) -> Vec<(String, String)> {
    task_rows(dir, &["service", "ps", service])
        .into_iter()
        .map(|row| (row.desired, row.current))
        .collect()
}

/// How many of `states` are `(desired, current)`.
pub fn count(states: &[(String, String)], desired: &str, current: &str) -> usize {
    states
        .iter()
        .filter(|(d, c)| d == desired && c == current)
        .count()
}

/// The status word of a `dig` reply (`NOERROR`, `NXDOMAIN`, …), `None` when dig printed none
/// (no answer in time).
pub fn dig_status(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.split("status: ").nth(1))
        .and_then(|rest| rest.split(',').next())
        .map(str::to_string)
}

/// The lines of a `dig` reply's ANSWER SECTION, whitespace normalised.
pub fn dig_answers(text: &str) -> Vec<String> {
    let mut answers = Vec::new();
    let mut in_answer = false;
    for line in text.lines() {
        if line.starts_with(";; ANSWER SECTION") {
            in_answer = true;
        } else if line.trim().is_empty() {
            in_answer = false;
        } else if in_answer {
            answers.push(line.split_whitespace().collect::<Vec<_>>().join(" "));
        }
    }
    answers
}
