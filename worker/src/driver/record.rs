//! [`ProcessRecord`]: what survives an agent restart.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{TaskIdentity, TaskKey};

/// What the agent persists in its state file to re-adopt a task after a restart.
///
/// `pid` is the shim's pid, which is also its process group id. `start_ticks` (field 22 of
/// `/proc/<pid>/stat`, the start time in clock ticks since boot) tells the shim apart from an
/// unrelated process that got the same pid after the shim ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub key: TaskKey,
    pub pid: i32,
    pub start_ticks: u64,
    pub exit_file: PathBuf,
    pub log_file: PathBuf,
    /// Who the task runs as (absent: the agent's user; also in state files that predate it).
    #[serde(default)]
    pub identity: Option<TaskIdentity>,
}
