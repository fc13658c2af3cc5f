//! Secrets and configs with real processes: created from a file and from stdin, read by a
//! task on a worker as files under `$FLOTILLA_SECRETS_DIR` / `$FLOTILLA_CONFIGS_DIR`, never
//! shown by `inspect`, never in plain text in a manager's state directory, sent only to the
//! node that runs the task, removed when the task ends, and not removable while in use.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "procs/mod.rs"]
mod procs;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use procs::cluster::{Cluster, ClusterOptions};
use procs::{cli_in, cli_ok, count, task_states};

const TIMEOUT: Duration = Duration::from_secs(30);

fn eventually(what: &str, check: impl Fn() -> bool) {
    procs::eventually(what, TIMEOUT, check);
}

/// A value no other test or process holds.
fn unique_value(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{what}-{nanos}-{}", std::process::id())
}

/// Starts a worker agent in `worker_dir` that joins through `manager_addr`.
fn join_worker(manager_dir: &Path, worker_dir: &Path, manager_addr: &str) -> procs::Proc {
    let token = cli_ok(manager_dir, &["join-token", "worker"])
        .trim()
        .to_string();
    let mut agent = procs::Proc::start(
        "worker",
        &[
            "agent",
            "--state-dir",
            worker_dir.to_str().unwrap(),
            "--token",
            &token,
            "--manager",
            manager_addr,
        ],
    );
    agent.wait_for("running the tasks assigned", TIMEOUT);
    agent
}

/// `flotilla secret create NAME -` with `value` on stdin: whether it succeeded, its output.
fn create_from_stdin(dir: &Path, kind: &str, name: &str, value: &[u8]) -> (bool, String) {
    let mut child = Command::new(procs::flotilla_bin())
        .args([
            kind,
            "--state-dir",
            dir.to_str().unwrap(),
            "create",
            name,
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(value).unwrap();
    let output = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Every file under `root` whose bytes contain `needle`.
fn files_holding(root: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            found.extend(files_holding(&path, needle));
        } else if kind.is_file()
            && std::fs::read(&path)
                .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
        {
            found.push(path);
        }
    }
    found
}

fn read_trimmed(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[test]
fn a_secret_reaches_only_its_task_as_a_0400_file_and_never_shows_in_plain_text() {
    let mut cluster = Cluster::start(1, ClusterOptions::default());
    let dir = cluster.managers[0].dir.clone();
    let addr = cluster.managers[0].addr.clone();
    let tmp = cluster.tmp.path().to_path_buf();
    let worker_dir = tmp.join("worker");
    let mut worker = join_worker(&dir, &worker_dir, &addr);

    // From a file, and from stdin.
    let password = unique_value("password");
    let api_key = unique_value("api-key");
    let config_value = unique_value("config");
    let password_file = tmp.join("password.txt");
    std::fs::write(&password_file, &password).unwrap();
    let secret_id = cli_ok(
        &dir,
        &[
            "secret",
            "create",
            "db-pass",
            password_file.to_str().unwrap(),
        ],
    )
    .trim()
    .to_string();
    let (created, output) = create_from_stdin(&dir, "secret", "api-key", api_key.as_bytes());
    assert!(created, "{output}");
    let (created, output) = create_from_stdin(&dir, "config", "app-conf", config_value.as_bytes());
    assert!(created, "{output}");

    // Clear errors: a name taken, a bad name, a value too large, an unknown secret.
    let (ok, output) = cli_in(
        &dir,
        &[
            "secret",
            "create",
            "db-pass",
            password_file.to_str().unwrap(),
        ],
    );
    assert!(!ok && output.contains("is taken by secret"), "{output}");
    let (ok, output) = cli_in(
        &dir,
        &[
            "secret",
            "create",
            "bad/name",
            password_file.to_str().unwrap(),
        ],
    );
    assert!(!ok && output.contains("contains '/'"), "{output}");
    let large = tmp.join("large");
    std::fs::write(&large, vec![b'x'; 500 * 1024 + 1]).unwrap();
    let (ok, output) = cli_in(&dir, &["secret", "create", "big", large.to_str().unwrap()]);
    assert!(!ok && output.contains("500 KiB"), "{output}");
    let (ok, output) = cli_in(
        &dir,
        &[
            "service", "create", "--detach", "--name", "nope", "--secret", "missing", "--", "true",
        ],
    );
    assert!(!ok && output.contains("--secret missing"), "{output}");

    let listed = cli_ok(&dir, &["secret", "ls"]);
    assert!(
        listed.contains("db-pass") && listed.contains("api-key"),
        "{listed}"
    );
    for reference in ["db-pass", "api-key"] {
        let shown = cli_ok(&dir, &["secret", "inspect", reference]);
        assert!(
            !shown.contains(&password) && !shown.contains(&api_key),
            "{shown}"
        );
        assert!(!shown.contains("\"data\""), "{shown}");
    }

    // A task on the worker reads them.
    let out = tmp.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let script = format!(
        "d=\"$FLOTILLA_SECRETS_DIR\"; c=\"$FLOTILLA_CONFIGS_DIR\"; \
         cat \"$d/db-pass\" > {o}/password.tmp; cat \"$d/key.txt\" > {o}/key; \
         cat \"$c/app.conf\" > {o}/config; stat -c %a \"$d/db-pass\" > {o}/mode; \
         stat -c %a \"$c/app.conf\" > {o}/config-mode; echo \"$d\" > {o}/dir; \
         mv {o}/password.tmp {o}/password; exec sleep 300",
        o = out.display()
    );
    cli_ok(
        &dir,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "reader",
            "--constraint",
            "node.role==worker",
            "--secret",
            "db-pass",
            "--secret",
            "source=api-key,target=key.txt",
            "--config",
            "app-conf,target=app.conf",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    eventually("the task running on the worker", || {
        count(&task_states(&dir, "reader"), "running", "running") == 1
    });
    eventually("the task read its secrets", || {
        out.join("password").exists()
    });
    assert_eq!(read_trimmed(&out.join("password")), password);
    assert_eq!(read_trimmed(&out.join("key")), api_key);
    assert_eq!(read_trimmed(&out.join("config")), config_value);
    assert_eq!(read_trimmed(&out.join("mode")), "400");
    assert_eq!(read_trimmed(&out.join("config-mode")), "444");
    let secrets_dir = PathBuf::from(read_trimmed(&out.join("dir")));
    assert!(secrets_dir.join("db-pass").exists());

    // Never shown, never stored in plain text.
    let service = cli_ok(&dir, &["service", "inspect", "reader"]);
    assert!(
        !service.contains(&password) && !service.contains(&api_key),
        "{service}"
    );
    let (ok, output) = cli_in(&dir, &["secret", "rm", "db-pass"]);
    assert!(
        !ok && output.contains("in use by service(s) reader"),
        "{output}"
    );
    let mut managers_dir = files_holding(&dir, password.as_bytes());
    managers_dir.extend(files_holding(&dir, api_key.as_bytes()));
    assert!(managers_dir.is_empty(), "plain secret in {managers_dir:?}");
    assert!(
        !files_holding(&dir, config_value.as_bytes()).is_empty(),
        "a config (not sealed) is found by the same search, so the search would see a value"
    );

    // Only the worker received it: the manager's own agent runs no task reading it.
    let manager_log = cluster.managers[0].proc().output();
    assert!(!manager_log.contains(&secret_id), "{manager_log}");
    let worker_log = worker.output();
    assert!(worker_log.contains(&secret_id), "{worker_log}");
    assert!(
        !worker_log.contains(&password) && !manager_log.contains(&password),
        "a value was logged"
    );
    if secrets_dir.starts_with("/dev/shm") {
        let on_worker_disk = files_holding(&worker_dir, password.as_bytes());
        assert!(on_worker_disk.is_empty(), "{on_worker_disk:?}");
    }

    // The task ends: its files go; then the secret may be removed.
    cli_ok(&dir, &["service", "rm", "reader"]);
    eventually("the task's secret files removed", || !secrets_dir.exists());
    let (ok, output) = cli_in(&dir, &["secret", "rm", "db-pass"]);
    if !ok {
        // The service's removal may still be applying on the manager answering.
        eventually("the secret removable", || {
            cli_in(&dir, &["secret", "rm", "db-pass"]).0
        });
        let _ = output;
    }
    let listed = cli_ok(&dir, &["secret", "ls"]);
    assert!(!listed.contains("db-pass"), "{listed}");
    worker.kill();
}
