//! [`LaunchSpec`]: what to run for one task.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::{TaskIdentity, TaskKey};

/// One task to start. The agent decides the environment (`CUDA_VISIBLE_DEVICES`, rendezvous
/// addresses, ...); the driver only runs it.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    pub key: TaskKey,
    /// Program and arguments; the program is looked up in `PATH` like a shell would.
    pub command: Vec<String>,
    /// Added to (and overriding) the agent's own environment.
    pub env: BTreeMap<String, String>,
    /// Default: `<data_dir>/tasks/<job>/task-<n>/work`, shared by the task's epochs so a restarted
    /// task finds what an earlier incarnation left there (a local checkpoint, a cache).
    pub work_dir: Option<PathBuf>,
    /// How long before the lease deadline the shim starts stopping the task, so it is dead by the
    /// deadline. Default: the driver's stop grace. It must stay well under the lease TTL, or the
    /// shim would fence the task as soon as it starts.
    pub fence_grace: Option<std::time::Duration>,
    /// Who the task runs as (the shim switches for the task only); the agent's user when absent.
    /// The default working directory is handed to it.
    pub identity: Option<TaskIdentity>,
}
