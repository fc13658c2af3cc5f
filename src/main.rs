//! The `flotilla` command.

use clap::Parser;

/// flotilla: a small, fast, secure cluster orchestrator (the control plane of Docker swarm
/// mode, rebuilt for constrained hosts).
#[derive(Parser, Debug)]
#[command(name = "flotilla", version, about, long_about = None)]
struct Cli {}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let _cli = Cli::parse();
}
