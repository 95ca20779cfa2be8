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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Sim(c) => cmd::sim::run(c),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}
