//! The `flotilla` command: see [`flotilla::cli`].

use clap::Parser;

/// Log filter when `RUST_LOG` is unset: our own info lines; the storage engine's routine
/// info lines (database created, table ingested) only when asked for.
const LOG_FILTER_DEFAULT: &str = "info,fjall=warn,lsm_tree=warn";

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(LOG_FILTER_DEFAULT))
        .init();
    flotilla::cli::run(flotilla::cli::Cli::parse())
}
