//! [`TaskKey`]: which task (and which incarnation of it) a process is.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Identifies one incarnation of one task of a gang: the scheduler bumps `epoch` every time it
/// (re)places the gang, so a late exit report of an old incarnation is never mistaken for the
/// current one.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskKey {
    pub job: String,
    pub task: u32,
    pub epoch: u64,
}

impl fmt::Display for TaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/task-{}@epoch-{}", self.job, self.task, self.epoch)
    }
}
