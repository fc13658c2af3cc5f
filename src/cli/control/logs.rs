//! `flotilla service logs SERVICE|TASK`: the tasks' stdout and stderr lines, as the
//! managers gather them from the agents, one line each, tagged `<task name>@<node>`.
//!
//! Must never print a warning on stdout (warnings go to stderr, so the lines can be piped),
//! nor retry a call that already printed lines (it would print them twice).

use clap::Args;

use super::client::Client;
use super::flags::parse_duration_ms;
use super::output::Format;
use crate::control::SERVICE_LOGS;
use crate::net::CallOptions;
use crate::proto::control as pb;
use crate::util::clock::unix_now_ms;

/// `flotilla service logs` arguments.
#[derive(Args, Debug)]
pub struct LogsArgs {
    /// A service (id, unique id prefix or name) or a task (id or unique id prefix).
    reference: String,
    /// Keep printing new lines, of the service's new tasks too, until interrupted.
    #[arg(long, short = 'f')]
    follow: bool,
    /// Only the last N lines of each task.
    #[arg(long, short = 'n', value_name = "N")]
    tail: Option<u32>,
    /// Only lines since then: a duration back from now (`10m`, `1h`, `90s`) or an RFC 3339
    /// time (`2026-01-02T15:04:05Z`).
    #[arg(long, value_name = "WHEN")]
    since: Option<String>,
    /// Print each line's time (RFC 3339, UTC) first.
    #[arg(long, short = 't')]
    timestamps: bool,
}

/// `--since` as ms since the Unix epoch.
fn parse_since(text: &str, now_unix_ms: i64) -> Result<i64, String> {
    if let Ok(time) = text.trim().parse::<jiff::Timestamp>() {
        return Ok(time.as_millisecond());
    }
    let back = parse_duration_ms("since", text)
        .map_err(|e| format!("{e}, or an RFC 3339 time such as 2026-01-02T15:04:05Z"))?;
    Ok(now_unix_ms.saturating_sub(back))
}

fn rfc3339(unix_ms: i64) -> String {
    jiff::Timestamp::from_millisecond(unix_ms)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| unix_ms.to_string())
}

/// One line as JSON.
#[derive(serde::Serialize)]
struct LineJson<'a> {
    task: &'a str,
    task_id: &'a str,
    node: &'a str,
    time: String,
    time_unix_ms: i64,
    stream: &'a str,
    line: String,
}

fn print_entry(format: Format, timestamps: bool, entry: &pb::LogEntry) {
    let line = String::from_utf8_lossy(&entry.data);
    match format {
        Format::Json => {
            let json = LineJson {
                task: &entry.task_name,
                task_id: &entry.task_id,
                node: &entry.node,
                time: rfc3339(entry.time_unix_ms),
                time_unix_ms: entry.time_unix_ms,
                stream: if entry.stderr { "stderr" } else { "stdout" },
                line: line.into_owned(),
            };
            match serde_json::to_string(&json) {
                Ok(text) => out!("{text}"),
                Err(error) => eprintln!("warning: cannot print a line as JSON: {error}"),
            }
        }
        Format::Table if timestamps => out!(
            "{} {}@{}    | {line}",
            rfc3339(entry.time_unix_ms),
            entry.task_name,
            entry.node
        ),
        Format::Table => out!("{}@{}    | {line}", entry.task_name, entry.node),
    }
}

/// Runs `flotilla service logs`.
///
/// # Errors
/// A message for stderr: bad arguments, an unknown service or task, a refused call.
pub(crate) fn run(client: &Client, args: &LogsArgs) -> Result<(), String> {
    let since_unix_ms = match &args.since {
        Some(text) => parse_since(text, unix_now_ms())?,
        None => 0,
    };
    let request = pb::ServiceLogsRequest {
        reference: args.reference.clone(),
        follow: args.follow,
        tail: args.tail,
        since_unix_ms,
    };
    // No deadline: a followed stream lives until interrupted; one without `follow` ends
    // when the leader has every node's answer (or gave up waiting for some).
    let mut stream = client
        .transport
        .channel(&client.addr, &client.tls)
        .server_stream::<_, pb::ServiceLogsMessage>(SERVICE_LOGS, &request, CallOptions::default())
        .map_err(|status| Client::describe(&client.addr, &status))?;
    loop {
        match stream.recv() {
            Ok(Some(message)) => {
                for warning in &message.warnings {
                    eprintln!("warning: {warning}");
                }
                for entry in &message.entries {
                    print_entry(client.format, args.timestamps, entry);
                }
            }
            Ok(None) => return Ok(()),
            Err(status) => return Err(Client::describe(&client.addr, &status)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_duration_back_from_now_or_an_rfc3339_time() {
        assert_eq!(parse_since("10m", 1_000_000), Ok(400_000));
        assert_eq!(parse_since("1970-01-01T00:00:02Z", 0), Ok(2_000));
        assert_eq!(parse_since("1970-01-01T01:00:02+01:00", 0), Ok(2_000));
        assert!(parse_since("yesterday", 0).is_err());
        assert_eq!(rfc3339(2_500), "1970-01-01T00:00:02.5Z");
    }
}
