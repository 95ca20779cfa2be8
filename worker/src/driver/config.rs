//! [`DriverConfig`]: how the driver starts shims and where it keeps its files.

use std::path::PathBuf;
use std::time::Duration;

/// Fixed for the life of a [`TaskDriver`](super::TaskDriver).
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// Program and leading arguments that start a shim, e.g. `[exe, "task-shim"]`. The driver
    /// appends the shim's flags, `--` and the task's command.
    pub shim_command: Vec<String>,
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
