//! `flotilla init`, `join`, `run` and `up` as real processes: the state directory, join
//! tokens, identities, refusals with a hint, and a clean stop on SIGTERM.
#![allow(clippy::unwrap_used, missing_docs)]

mod procs;

use std::time::Duration;

use procs::{Proc, free_addr, mode, run_to_end};

const START: Duration = Duration::from_secs(20);

fn token_from(line: &str) -> String {
    line.split_whitespace()
        .find(|w| w.starts_with("FLT-1-"))
        .unwrap()
        .to_string()
}

#[test]
fn init_prints_tokens_and_a_manager_joins_with_the_manager_token() {
    let tmp = tempfile::tempdir().unwrap();
    let first_dir = tmp.path().join("m1");
    let first_addr = free_addr();
    let mut first = Proc::start(
        "m1",
        &[
            "init",
            "--state-dir",
            first_dir.to_str().unwrap(),
            "--listen",
            &first_addr,
        ],
    );
    let manager_token = token_from(&first.wait_for("flotilla join", START));
    let worker_token = token_from(&first.wait_for("Worker token", START));
    first.wait_for("flotilla manager listening on", START);
    for file in [
        "join-tokens",
        "manager.conf",
        "node/node.pem",
        "ca",
        "control.sock",
    ] {
        assert!(first_dir.join(file).exists(), "{file} missing");
    }
    assert_eq!(mode(&first_dir.join("join-tokens")), 0o600);
    assert_eq!(mode(&first_dir.join("node/node.pem")), 0o600);
    assert_eq!(mode(&first_dir.join("control.sock")), 0o600);

    // A worker token cannot make a manager, and leaves no state behind.
    let refused_dir = tmp.path().join("refused");
    let (status, output) = run_to_end(
        &[
            "join",
            "--state-dir",
            refused_dir.to_str().unwrap(),
            "--listen",
            &free_addr(),
            "--token",
            &worker_token,
            &first_addr,
        ],
        START,
    );
    assert!(!status.success());
    assert!(output.contains("worker token"), "{output}");
    assert!(!refused_dir.join("manager.conf").exists());

    // A token whose secret is wrong is refused by the CA.
    let mut forged = manager_token.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'a' { 'b' } else { 'a' });
    let (status, output) = run_to_end(
        &[
            "join",
            "--state-dir",
            refused_dir.to_str().unwrap(),
            "--listen",
            &free_addr(),
            "--token",
            &forged,
            &first_addr,
        ],
        START,
    );
    assert!(!status.success());
    assert!(output.contains("error:"), "{output}");
    assert!(!refused_dir.join("manager.conf").exists());

    let second_dir = tmp.path().join("m2");
    let mut second = Proc::start(
        "m2",
        &[
            "join",
            "--state-dir",
            second_dir.to_str().unwrap(),
            "--listen",
            &free_addr(),
            "--token",
            &manager_token,
            &first_addr,
        ],
    );
    second.wait_for("joined cluster", START);
    second.wait_for("flotilla manager listening on", START);
    assert_eq!(mode(&second_dir.join("node/node.pem")), 0o600);
    // The CA key reaches a joined manager only through the replicated store: nothing is
    // written to its ca/ directory.
    assert!(
        second_dir.join("ca").read_dir().unwrap().next().is_none(),
        "a joined manager must not write the root key to a file"
    );

    for proc in [&mut first, &mut second] {
        proc.signal(15);
        let status = proc.wait_exit(START);
        let output = proc.output();
        assert!(status.success(), "{}: {status:?}\n{output}", proc.name);
        proc.wait_for("stopped", START);
    }
    assert!(
        !first_dir.join("control.sock").exists(),
        "the control socket outlived its manager"
    );
}

#[test]
fn init_refuses_an_initialized_directory_and_run_resumes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m1");
    let dir_arg = dir.to_str().unwrap();
    let addr = free_addr();
    let mut first = Proc::start("m1", &["init", "--state-dir", dir_arg, "--listen", &addr]);
    first.wait_for("flotilla manager listening on", START);
    let conf = std::fs::read_to_string(dir.join("manager.conf")).unwrap();
    first.signal(15);
    assert!(first.wait_exit(START).success());

    let (status, output) = run_to_end(
        &["init", "--state-dir", dir_arg, "--listen", &free_addr()],
        START,
    );
    assert!(!status.success());
    assert!(output.contains("already holds a flotilla node"), "{output}");
    assert!(output.contains("flotilla run --state-dir"), "{output}");
    assert_eq!(
        std::fs::read_to_string(dir.join("manager.conf")).unwrap(),
        conf
    );

    let mut resumed = Proc::start("m1-again", &["run", "--state-dir", dir_arg]);
    resumed.wait_for(&format!("listening on {addr}"), START);
    resumed.signal(2);
    assert!(resumed.wait_exit(START).success());

    let (status, output) = run_to_end(
        &[
            "run",
            "--state-dir",
            tmp.path().join("empty").to_str().unwrap(),
        ],
        START,
    );
    assert!(!status.success());
    assert!(output.contains("flotilla init"), "{output}");
}

/// A state directory whose control socket path is longer than a unix socket address may be
/// (108 bytes): the manager's start fails after `init` wrote the whole node.
fn dir_with_unbindable_socket(base: &std::path::Path) -> std::path::PathBuf {
    let mut dir = base.to_path_buf();
    while dir.join("control.sock").as_os_str().len() <= 120 {
        dir.push("deeper-and-deeper");
    }
    dir
}

#[test]
fn a_failed_first_start_leaves_nothing_and_up_never_ignores_listen() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let dir_arg = dir.to_str().unwrap();

    // The port is taken: refused before anything is written, for `up` and `init` alike.
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = blocker.local_addr().unwrap().to_string();
    for command in ["up", "init"] {
        let (status, output) = run_to_end(
            &[command, "--state-dir", dir_arg, "--listen", &taken],
            START,
        );
        assert!(!status.success(), "{output}");
        assert!(
            output.contains(&format!("cannot listen on {taken}")) && output.contains("--listen"),
            "{output}"
        );
        assert!(!dir.exists(), "{command} left {}", dir.display());
    }
    drop(blocker);

    // A start that fails after the node was written: the node is removed again.
    let deep = dir_with_unbindable_socket(&tmp.path().join("deep"));
    let (status, output) = run_to_end(
        &[
            "up",
            "--state-dir",
            deep.to_str().unwrap(),
            "--listen",
            &free_addr(),
        ],
        START,
    );
    assert!(!status.success(), "{output}");
    assert!(output.contains("nothing was kept"), "{output}");
    assert!(
        !tmp.path().join("deep").exists(),
        "the half-made node is gone, with the directories made for it"
    );

    // The next `up` takes its own --listen.
    let addr = free_addr();
    let mut up = Proc::start("up", &["up", "--state-dir", dir_arg, "--listen", &addr]);
    let line = up.wait_for("flotilla manager listening on", START);
    assert!(
        line.contains(&addr) && line.contains("control.sock"),
        "{line}"
    );
    up.wait_for("Worker token", START);
    up.signal(15);
    assert!(up.wait_exit(START).success());

    // Later, a different --listen is refused with both addresses, not ignored.
    let other = free_addr();
    let (status, output) = run_to_end(&["up", "--state-dir", dir_arg, "--listen", &other], START);
    assert!(!status.success(), "{output}");
    for expected in [
        addr.as_str(),
        other.as_str(),
        "listen_addr",
        "without --listen",
    ] {
        assert!(output.contains(expected), "{expected} missing:\n{output}");
    }
    let conf = std::fs::read_to_string(dir.join("manager.conf")).unwrap();
    assert!(
        conf.contains(&format!("listen_addr = \"{addr}\"")),
        "{conf}"
    );

    // Without --listen (or with the same one) it resumes where it was.
    for args in [
        vec!["up", "--state-dir", dir_arg],
        vec!["up", "--state-dir", dir_arg, "--listen", &addr],
    ] {
        let mut again = Proc::start("up-again", &args);
        again.wait_for(&format!("listening on {addr}"), START);
        again.signal(15);
        assert!(again.wait_exit(START).success());
    }
}

/// The `key = value` lines earlier versions wrote for `manager.conf`, with the same values
/// as the TOML `text` (the Raft id in decimal there, in hex here).
fn legacy_settings(text: &str) -> String {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| {
            let (key, value) = line.split_once(" = ").unwrap();
            let value = value.trim_matches('"');
            let value = if key == "raft_id" {
                u64::from_str_radix(value, 16).unwrap().to_string()
            } else {
                value.to_string()
            };
            format!("{key} = {value}\n")
        })
        .collect()
}

#[test]
fn a_state_directory_of_an_earlier_version_starts_and_its_settings_become_toml() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m1");
    let dir_arg = dir.to_str().unwrap();
    let addr = free_addr();
    let mut first = Proc::start("m1", &["init", "--state-dir", dir_arg, "--listen", &addr]);
    first.wait_for("flotilla manager listening on", START);
    first.signal(15);
    assert!(first.wait_exit(START).success());
    let conf_path = dir.join("manager.conf");
    let toml = std::fs::read_to_string(&conf_path).unwrap();
    assert!(
        toml.contains(&format!("listen_addr = \"{addr}\"")),
        "{toml}"
    );

    // Written as an earlier version would have: the manager starts from it, and leaves
    // the same settings as TOML.
    let legacy = legacy_settings(&toml);
    assert!(
        legacy.contains(&format!("listen_addr = {addr}\n")),
        "{legacy}"
    );
    std::fs::write(&conf_path, &legacy).unwrap();
    let mut resumed = Proc::start("m1-again", &["run", "--state-dir", dir_arg]);
    resumed.wait_for(&format!("listening on {addr}"), START);
    assert_eq!(std::fs::read_to_string(&conf_path).unwrap(), toml);
    resumed.signal(15);
    assert!(resumed.wait_exit(START).success());

    // An unknown key is refused, naming its line.
    let line = toml.lines().count() + 1;
    std::fs::write(&conf_path, format!("{toml}log_memtable_mb = 16\n")).unwrap();
    let (status, output) = run_to_end(&["run", "--state-dir", dir_arg], START);
    assert!(!status.success());
    assert!(
        output.contains(&format!("line {line}")) && output.contains("log_memtable_mb"),
        "{output}"
    );
}
