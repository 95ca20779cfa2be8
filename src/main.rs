//! `gangway`: the one binary. `gangway server|worker|dev|sim` and the client commands.
//!
//! This file is the clap front end only; each subcommand lives in `src/cmd/`.

mod cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "gangway",
    version,
    about = "Raft-replicated gang scheduler for GPU and TPU fleets",
    long_about = "Raft-replicated gang scheduler for GPU and TPU fleets.\n\n\
                  Exit codes: 0 ok, 1 error, 2 not placeable, 3 invalid spec or arguments, 5 no leader."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Replay production traces through the placement engine and compare policies.
    #[command(subcommand)]
    Sim(cmd::sim::SimCommand),
    /// Run one scheduler replica (Raft member, client and worker API, leader loops).
    Server(cmd::server::ServerArgs),
    /// A local cluster: three replicas, a fleet of fake 8-GPU hosts, a demo workload.
    Dev(cmd::dev::DevArgs),
}

/// Logs to stderr; `RUST_LOG` filters (default: info for Gangway, warnings for libraries).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,gangway=info,gangway_scheduler=info,gangway_consensus=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Sim(c) => cmd::sim::run(c),
        Command::Server(args) => {
            init_logging();
            cmd::server::run(args)
        }
        Command::Dev(args) => cmd::dev::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}
