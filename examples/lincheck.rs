//! Checks Jepsen etcd register histories for linearizability.
//!
//! `cargo run --release --example lincheck -- [--explain] [--states-max N] FILE...` prints one
//! line per file: `FILE linearizable`, `FILE not-linearizable`, or `FILE unknown` when the
//! search hit its bound. Exits 2 if a file cannot be read or parsed (the message names the
//! file and line), 3 if a verdict is unknown, 0 otherwise (a non-linearizable history is a
//! verdict, not an error). `--explain` prints each violation's longest legal prefix and the
//! operation that could not fit, on stderr.

use std::process::ExitCode;

use flotilla::lincheck::{self, CheckLimits, Verdict};

const USAGE: &str = "usage: lincheck [--explain] [--states-max N] FILE...";

struct Options {
    explain: bool,
    limits: CheckLimits,
    files: Vec<String>,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        explain: false,
        limits: CheckLimits::default(),
        files: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--explain" => options.explain = true,
            "--states-max" => {
                let value = args.next().ok_or("--states-max needs a number")?;
                options.limits.states_explored_max_per_key = value
                    .parse()
                    .map_err(|_| format!("--states-max: {value:?} is not a number"))?;
            }
            "-h" | "--help" => return Err(USAGE.to_owned()),
            _ => options.files.push(arg),
        }
    }
    if options.files.is_empty() {
        return Err(USAGE.to_owned());
    }
    Ok(options)
}

fn main() -> ExitCode {
    let options = match parse_options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    let (mut unreadable, mut undecided) = (0, 0);
    for file in &options.files {
        let history = match std::fs::read_to_string(file) {
            Err(error) => Err(format!("cannot read: {error}")),
            Ok(text) => lincheck::jepsen::parse(&text).map_err(|error| error.to_string()),
        };
        let history = match history {
            Ok(history) => history,
            Err(message) => {
                eprintln!("{file}: {message}");
                unreadable += 1;
                continue;
            }
        };
        let report = lincheck::check(&history, options.limits);
        match &report.verdict {
            Verdict::Linearizable => println!("{file} linearizable"),
            Verdict::NotLinearizable(_) => {
                println!("{file} not-linearizable");
                if options.explain {
                    eprint!("{}", report.explain(&history));
                }
            }
            Verdict::Unknown { .. } => {
                println!(
                    "{file} unknown (gave up after {} states; raise --states-max)",
                    report.states_explored
                );
                undecided += 1;
            }
        }
    }
    if unreadable > 0 {
        ExitCode::from(2)
    } else if undecided > 0 {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    }
}
