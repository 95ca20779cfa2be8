//! [`ExitOutcome`] and [`ExitReason`]: how a task ended.
//!
//! The shim writes an `ExitOutcome` as the task's *exit file* (JSON); the driver reads it back,
//! possibly in a later agent process, and refines the reason with what it did itself (a stop on
//! request, a SIGKILL after the grace).

use serde::{Deserialize, Serialize};

/// How a task ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitOutcome {
    /// The task's exit code, when it exited normally.
    pub code: Option<i32>,
    /// The signal that killed the task, when one did.
    pub signal: Option<i32>,
    pub reason: ExitReason,
    /// A sentence for people: what happened, naming the program or the signal.
    pub message: String,
}

impl ExitOutcome {
    /// True when the task ran to completion by itself and exited with code 0.
    pub fn success(&self) -> bool {
        self.reason == ExitReason::Exited && self.code == Some(0)
    }

    pub(crate) fn lost(message: impl Into<String>) -> Self {
        ExitOutcome {
            code: None,
            signal: None,
            reason: ExitReason::Lost,
            message: message.into(),
        }
    }
}

/// Why a task ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// The task exited (or was killed by a signal) on its own.
    Exited,
    /// We stopped it on request and it exited within the grace.
    Stopped,
    /// We stopped it on request and it needed SIGKILL after the grace.
    Killed,
    /// Its shim fenced it: the worker lost contact with the scheduler and the lease deadline
    /// passed.
    LeaseExpired,
    /// Gone without an exit file: host reboot, SIGKILL from outside, a recycled pid.
    Lost,
    /// The command could not be started (not found, not executable, bad working directory).
    FailedToStart,
}
