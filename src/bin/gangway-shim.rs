//! `gangway-shim`: the per-task supervisor the agent starts (`gangway task-shim`'s flags), as a
//! small binary of its own. A host starts one per task, so its start-up is paid on every task:
//! the full `gangway` binary carries RocksDB's static initialisers, mimalloc's arenas and a large
//! relocation table (about 6 ms of CPU to start and supervise `true`, against 2 ms here). The
//! agent uses it when it sits beside the `gangway` binary, else `gangway task-shim`.

use std::process::ExitCode;

/// Malformed flags: the code `gangway task-shim` exits with (the CLI's invalid-arguments code).
const EXIT_INVALID: u8 = 3;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match gangway_worker::driver::shim_main(&args) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("error: gangway-shim: {e}");
            ExitCode::from(EXIT_INVALID)
        }
    }
}
