//! [`DriverConfig`]: how the driver starts shims and where it keeps its files.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Fixed for the life of a [`TaskDriver`](super::TaskDriver).
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// Program and leading arguments that start a shim (see [`shim_command_for`]). The driver
    /// appends the shim's flags, `--` and the task's command.
    pub shim_command: Vec<String>,
    /// Shims forked by one long-lived `shim_command --fork-server` instead of each executed (see
    /// `fork_server.rs`); the driver executes them when the server fails.
    pub fork_server: bool,
    /// The driver owns `<data_dir>/tasks/...` (exit files, default working directories) and
    /// `<data_dir>/logs/...` (one log per task, across epochs).
    pub data_dir: PathBuf,
    /// The one lease file every shim of this worker watches; see
    /// [`TaskDriver::write_lease_deadline`](super::TaskDriver::write_lease_deadline).
    pub lease_file: PathBuf,
    /// How long a task gets between SIGTERM and SIGKILL when its shim fences it on lease expiry.
    /// It is also how early the shim starts fencing, so the task is dead by the deadline.
    pub grace: Duration,
}

/// The name of the small shim binary, installed beside `gangway`.
pub const SHIM_BINARY: &str = "gangway-shim";

/// How an agent running as `exe` starts a task's shim: the small `gangway-shim` beside it when
/// there is one (a host starts a shim per task, and the full binary takes about three times the
/// CPU to start), else `exe task-shim` (same flags, same behaviour).
pub fn shim_command_for(exe: &Path) -> Vec<String> {
    let small = exe.with_file_name(SHIM_BINARY);
    let runnable =
        std::fs::metadata(&small).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if runnable {
        vec![small.display().to_string()]
    } else {
        vec![exe.display().to_string(), "task-shim".to_owned()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_small_shim_is_used_when_it_is_installed_beside_the_binary() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("gangway");
        let small = dir.path().join(SHIM_BINARY);
        let full = vec![exe.display().to_string(), "task-shim".to_owned()];
        // Not installed: the full binary's subcommand.
        assert_eq!(shim_command_for(&exe), full);
        // Present but not executable (a half-finished install): still the full binary.
        std::fs::write(&small, b"").unwrap();
        assert_eq!(shim_command_for(&exe), full);
        // Installed: the small binary, no subcommand.
        std::fs::set_permissions(&small, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(shim_command_for(&exe), vec![small.display().to_string()]);
        // A directory of that name is not a shim.
        std::fs::remove_file(&small).unwrap();
        std::fs::create_dir(&small).unwrap();
        assert_eq!(shim_command_for(&exe), full);
    }
}
