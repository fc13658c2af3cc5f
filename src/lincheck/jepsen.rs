//! A parser for the register histories Jepsen's etcd tests log.
//!
//! One event per line, after `jepsen.util - `: a process number, the event type (`:invoke`,
//! `:ok`, `:fail`, `:info`), the function (`:read`, `:write`, `:cas`) and a value (`nil`, an
//! integer, `[FROM TO]` or `:timed-out`), separated by tabs or spaces. Lines without the
//! `jepsen.util - ` marker, and events of non-numeric processes (the nemesis), are ignored.
//!
//! Meaning: `:ok` is a definite result; `:fail :cas` is a compare that found another value;
//! `:fail :read` is a read whose result is unknown (dropped); `:fail :write` did not happen
//! (dropped); `:info` and a call with no completion have an unknown outcome. The register is
//! key 0, starting absent (`nil`), and the line number is the logical time.
//!
//! This module only turns text into a [`History`]; it must never read files itself.

use std::collections::HashMap;

use super::history::{ClientId, End, History, HistoryError, Input, Operation, Output, Value};

/// The key Jepsen's single register is recorded under.
pub const REGISTER_KEY: u64 = 0;

/// The marker that precedes every history event on a log line.
const EVENT_MARKER: &str = "jepsen.util - ";

/// What is wrong with a line of a Jepsen log.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum JepsenErrorKind {
    /// The line has fewer than four fields after the marker.
    #[error("expected `PROCESS TYPE FUNCTION VALUE`")]
    MissingField,
    /// The process is neither a number nor a `:keyword`.
    #[error("process {0:?} is not a number")]
    BadProcess(String),
    /// The event type is not `:invoke`, `:ok`, `:fail` or `:info`.
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    /// The function is not `:read`, `:write` or `:cas`.
    #[error("unknown function {0:?}")]
    UnknownFunction(String),
    /// The value does not fit the function (`[FROM TO]` for cas, an integer for write).
    #[error("value {value:?} does not fit {function}")]
    BadValue {
        /// The function.
        function: &'static str,
        /// The text found.
        value: String,
    },
    /// A completion for a process with no call in flight.
    #[error("process {0} completes an operation it never invoked")]
    CompletionWithoutInvoke(ClientId),
    /// A call from a process that already has one in flight.
    #[error("process {process} invokes again while its call of line {pending_line} is pending")]
    InvokeWhilePending {
        /// The process.
        process: ClientId,
        /// Where its pending call was logged.
        pending_line: usize,
    },
    /// A completion whose function or arguments differ from the call it completes.
    #[error("completion does not match the call of line {call_line}")]
    CompletionMismatch {
        /// Where the call was logged.
        call_line: usize,
    },
    /// A completion form the format does not define (e.g. `:fail :cas :timed-out`).
    #[error("unsupported completion {0:?}")]
    UnsupportedCompletion(String),
}

/// A Jepsen log that cannot be read as a history.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum JepsenError {
    /// A line is malformed: fix or remove it.
    #[error("line {line}: {kind}")]
    Line {
        /// The 1-based line number.
        line: usize,
        /// What is wrong.
        kind: JepsenErrorKind,
    },
    /// The events parse but do not form a valid history.
    #[error(transparent)]
    History(#[from] HistoryError),
}

/// The function of an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Function {
    Read,
    Write,
    Cas,
}

impl Function {
    fn parse(text: &str) -> Result<Self, JepsenErrorKind> {
        match text {
            ":read" => Ok(Self::Read),
            ":write" => Ok(Self::Write),
            ":cas" => Ok(Self::Cas),
            other => Err(JepsenErrorKind::UnknownFunction(other.to_owned())),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Read => ":read",
            Self::Write => ":write",
            Self::Cas => ":cas",
        }
    }
}

/// One parsed event line.
struct Event<'a> {
    process: ClientId,
    kind: &'a str,
    function: Function,
    value: String,
}

/// Parses the event on `line`, `Ok(None)` for lines that carry none.
fn parse_event(line: &str) -> Result<Option<Event<'_>>, JepsenErrorKind> {
    let Some(start) = line.find(EVENT_MARKER) else {
        return Ok(None);
    };
    let mut fields = line[start + EVENT_MARKER.len()..].split_whitespace();
    let (Some(process), Some(kind), Some(function)) = (fields.next(), fields.next(), fields.next())
    else {
        return Err(JepsenErrorKind::MissingField);
    };
    if process.starts_with(':') {
        return Ok(None); // the nemesis, not a client
    }
    let process = process
        .parse()
        .map_err(|_| JepsenErrorKind::BadProcess(process.to_owned()))?;
    let value = fields.collect::<Vec<_>>().join(" ");
    if value.is_empty() {
        return Err(JepsenErrorKind::MissingField);
    }
    Ok(Some(Event {
        process,
        kind,
        function: Function::parse(function)?,
        value,
    }))
}

fn parse_optional(text: &str) -> Option<Option<Value>> {
    if text == "nil" {
        Some(None)
    } else {
        text.parse().ok().map(Some)
    }
}

fn bad_value(function: Function, value: &str) -> JepsenErrorKind {
    JepsenErrorKind::BadValue {
        function: function.name(),
        value: value.to_owned(),
    }
}

/// `[FROM TO]` as (from, to).
fn parse_cas_pair(text: &str) -> Result<(Option<Value>, Value), JepsenErrorKind> {
    let bad = || bad_value(Function::Cas, text);
    let inner = text
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .ok_or_else(bad)?;
    let mut parts = inner.split_whitespace();
    let (Some(from), Some(to), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    let from = parse_optional(from).ok_or_else(bad)?;
    let to = to.parse().map_err(|_| bad())?;
    Ok((from, to))
}

fn parse_input(function: Function, value: &str) -> Result<Input, JepsenErrorKind> {
    match function {
        Function::Read => Ok(Input::Get),
        Function::Write => value
            .parse()
            .map(|value| Input::Put { value })
            .map_err(|_| bad_value(function, value)),
        Function::Cas => parse_cas_pair(value).map(|(from, to)| Input::Cas { from, to }),
    }
}

/// How a completion line ends its call.
enum Completion {
    /// With a definite result.
    Returned(Output),
    /// With an unknown outcome.
    Unknown,
    /// As if it never happened (a failed write, a failed read).
    Dropped,
}

fn parse_completion(
    kind: &str,
    input: Input,
    value: &str,
    call_line: usize,
) -> Result<Completion, JepsenErrorKind> {
    let mismatch = JepsenErrorKind::CompletionMismatch { call_line };
    match (kind, input) {
        (":info", _) => Ok(Completion::Unknown),
        (":ok", Input::Get) => parse_optional(value)
            .map(|seen| Completion::Returned(Output::Got(seen)))
            .ok_or_else(|| bad_value(Function::Read, value)),
        (":ok", Input::Put { .. }) => (parse_input(Function::Write, value)? == input)
            .then_some(Completion::Returned(Output::PutDone))
            .ok_or(mismatch),
        (":ok" | ":fail", Input::Cas { .. }) if value.starts_with('[') => {
            let output = if kind == ":ok" {
                Output::CasSwapped
            } else {
                Output::CasFailed
            };
            (parse_input(Function::Cas, value)? == input)
                .then_some(Completion::Returned(output))
                .ok_or(mismatch)
        }
        (":fail", Input::Get | Input::Put { .. }) => Ok(Completion::Dropped),
        _ => Err(JepsenErrorKind::UnsupportedCompletion(format!(
            "{kind} {value}"
        ))),
    }
}

/// A call waiting for its completion.
struct InFlight {
    line: usize,
    function: Function,
    input: Input,
}

/// Parses a Jepsen etcd register log into a [`History`] on [`REGISTER_KEY`].
///
/// # Errors
/// [`JepsenError::Line`] names the first malformed line (bad field, completion without call,
/// completion that does not match its call); [`JepsenError::History`] if the events do not
/// form a valid history.
pub fn parse(text: &str) -> Result<History, JepsenError> {
    let mut operations = Vec::new();
    let mut in_flight: HashMap<ClientId, InFlight> = HashMap::new();
    for (index, line_text) in text.lines().enumerate() {
        let line = index + 1;
        let at_line = |kind| JepsenError::Line { line, kind };
        let Some(event) = parse_event(line_text).map_err(at_line)? else {
            continue;
        };
        if event.kind == ":invoke" {
            if let Some(pending) = in_flight.get(&event.process) {
                return Err(at_line(JepsenErrorKind::InvokeWhilePending {
                    process: event.process,
                    pending_line: pending.line,
                }));
            }
            let input = parse_input(event.function, &event.value).map_err(at_line)?;
            in_flight.insert(
                event.process,
                InFlight {
                    line,
                    function: event.function,
                    input,
                },
            );
            continue;
        }
        if !matches!(event.kind, ":ok" | ":fail" | ":info") {
            return Err(at_line(JepsenErrorKind::UnknownType(event.kind.to_owned())));
        }
        let call = in_flight
            .remove(&event.process)
            .ok_or_else(|| at_line(JepsenErrorKind::CompletionWithoutInvoke(event.process)))?;
        if call.function != event.function {
            return Err(at_line(JepsenErrorKind::CompletionMismatch {
                call_line: call.line,
            }));
        }
        let end = match parse_completion(event.kind, call.input, &event.value, call.line)
            .map_err(at_line)?
        {
            Completion::Dropped => continue,
            Completion::Unknown => End::Unknown,
            Completion::Returned(output) => End::Returned {
                at: line as u64,
                output,
            },
        };
        operations.push(operation(event.process, &call, end));
    }
    let mut never_completed: Vec<_> = in_flight.into_iter().collect();
    never_completed.sort_by_key(|(_, call)| call.line);
    for (process, call) in never_completed {
        operations.push(operation(process, &call, End::Unknown));
    }
    Ok(History::new(operations)?)
}

fn operation(process: ClientId, call: &InFlight, end: End) -> Operation {
    Operation {
        client: process,
        key: REGISTER_KEY,
        input: call.input,
        call_at: call.line as u64,
        end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line_error(text: &str) -> (usize, JepsenErrorKind) {
        match parse(text) {
            Err(JepsenError::Line { line, kind }) => (line, kind),
            other => panic!("expected a line error, got {other:?}"),
        }
    }

    #[test]
    fn parses_every_event_form_with_tabs_or_spaces() {
        let text = "\
INFO  jepsen.core - Running test
INFO  jepsen.util - 0\t:invoke\t:read\tnil
INFO  jepsen.util - 1   :invoke :write  3
INFO  jepsen.util - 0\t:ok\t:read\tnil
INFO  jepsen.util - 2\t:invoke\t:cas\t[3 4]
INFO  jepsen.util - 1   :ok     :write  3
INFO  jepsen.util - 2\t:fail\t:cas\t[3 4]
INFO  jepsen.util - 3\t:invoke\t:read\tnil
INFO  jepsen.util - 3\t:fail\t:read\t:timed-out
INFO  jepsen.util - :nemesis\t:info\t:start\tnil
INFO  jepsen.util - 4\t:invoke\t:write\t1
INFO  jepsen.util - 4\t:info\t:write\t:timed-out
INFO  jepsen.util - 5\t:invoke\t:cas\t[1 2]
";
        let history = parse(text).expect("valid log");
        let ops = history.operations();
        assert_eq!(ops.len(), 5, "the timed-out read is dropped: {ops:#?}");
        assert_eq!(ops[0].input, Input::Get);
        assert_eq!(
            ops[0].end,
            End::Returned {
                at: 4,
                output: Output::Got(None)
            }
        );
        assert_eq!((ops[1].client, ops[1].call_at), (1, 3));
        assert_eq!(ops[1].input, Input::Put { value: 3 });
        assert_eq!(
            ops[2].input,
            Input::Cas {
                from: Some(3),
                to: 4
            }
        );
        assert!(matches!(
            ops[2].end,
            End::Returned {
                output: Output::CasFailed,
                ..
            }
        ));
        assert_eq!(
            (ops[3].input, ops[3].end),
            (Input::Put { value: 1 }, End::Unknown)
        );
        assert_eq!(
            ops[4].end,
            End::Unknown,
            "a call never completed is unknown"
        );
        assert!(ops.iter().all(|op| op.key == REGISTER_KEY));
    }

    #[test]
    fn rejects_a_completion_without_a_call() {
        let text = "INFO  jepsen.util - 0\t:ok\t:read\t3\n";
        assert_eq!(
            line_error(text),
            (1, JepsenErrorKind::CompletionWithoutInvoke(0))
        );
    }

    #[test]
    fn rejects_a_completion_that_differs_from_its_call() {
        let text = "\
INFO  jepsen.util - 0\t:invoke\t:write\t3
INFO  jepsen.util - 0\t:ok\t:write\t4
";
        assert_eq!(
            line_error(text),
            (2, JepsenErrorKind::CompletionMismatch { call_line: 1 })
        );
    }

    #[test]
    fn rejects_a_second_call_while_one_is_pending() {
        let text = "\
INFO  jepsen.util - 0\t:invoke\t:write\t3
INFO  jepsen.util - 0\t:invoke\t:read\tnil
";
        let (line, kind) = line_error(text);
        assert_eq!(line, 2);
        assert!(matches!(kind, JepsenErrorKind::InvokeWhilePending { .. }));
    }

    #[test]
    fn rejects_malformed_values_and_fields() {
        let bad_cas = "INFO  jepsen.util - 0\t:invoke\t:cas\t[3]\n";
        assert!(matches!(
            line_error(bad_cas),
            (1, JepsenErrorKind::BadValue { .. })
        ));
        let bad_type =
            "INFO  jepsen.util - 0\t:invoke\t:read\tnil\nINFO  jepsen.util - 0 :done :read 1\n";
        assert!(matches!(
            line_error(bad_type),
            (2, JepsenErrorKind::UnknownType(_))
        ));
        let short = "INFO  jepsen.util - 0\t:invoke\n";
        assert_eq!(line_error(short), (1, JepsenErrorKind::MissingField));
        let bad_process = "INFO  jepsen.util - x :invoke :read nil\n";
        assert!(matches!(
            line_error(bad_process),
            (1, JepsenErrorKind::BadProcess(_))
        ));
    }
}
