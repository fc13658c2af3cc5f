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
