//! The `flotilla` command: see [`flotilla::cli`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    flotilla::cli::run(flotilla::cli::Cli::parse())
}
