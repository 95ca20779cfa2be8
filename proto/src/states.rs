//! Job and task states on the wire: the protobuf enums, the lowercase words people see for them,
//! and the checked reading of a received value.
//!
//! A received enum field is an `i32`; a value this build does not know (a newer peer) or
//! `UNSPECIFIED` (a field left unset) is refused with a [`BadState`] naming the field, never
//! guessed at.

use crate::pb::{DeviceHealth, JobState, TaskState};

/// A job or task state field that holds no state this build knows.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {message}")]
pub struct BadState {
    /// The field's path in the message, e.g. `jobs[2].state`.
    pub field: String,
    pub message: String,
}

impl BadState {
    fn new(field: &str, what: &str, raw: i32) -> Self {
        let message = if raw == 0 {
            format!("{what} not set (0 is UNSPECIFIED)")
        } else {
            format!("unknown {what} {raw} (sent by a newer version?)")
        };
        Self {
            field: field.to_owned(),
            message,
        }
    }
}

impl JobState {
    /// Every state a job can be in, in lifecycle order.
    pub const ALL: [JobState; 5] = [
        JobState::Pending,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// The word people see: "pending", "running", "succeeded", "failed", "cancelled".
    pub fn word(self) -> &'static str {
        match self {
            JobState::Unspecified => "unspecified",
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// The state a word names (see [`JobState::word`]).
    pub fn from_word(word: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.word() == word)
    }

    /// Whether the job has ended for good.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

impl TaskState {
    /// Every state a task can be in.
    pub const ALL: [TaskState; 5] = [
        TaskState::Assigned,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Lost,
    ];

    /// The word people see: "assigned", "running", "succeeded", "failed", "lost".
    pub fn word(self) -> &'static str {
        match self {
            TaskState::Unspecified => "unspecified",
            TaskState::Assigned => "assigned",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Lost => "lost",
        }
    }

    /// The state a word names (see [`TaskState::word`]).
    pub fn from_word(word: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.word() == word)
    }
}

impl DeviceHealth {
    /// Every health a device can have, best first.
    pub const ALL: [DeviceHealth; 3] = [
        DeviceHealth::Healthy,
        DeviceHealth::Degraded,
        DeviceHealth::Failed,
    ];

    /// The word people see: "healthy", "degraded", "failed".
    pub fn word(self) -> &'static str {
        match self {
            DeviceHealth::Unspecified => "unspecified",
            DeviceHealth::Healthy => "healthy",
            DeviceHealth::Degraded => "degraded",
            DeviceHealth::Failed => "failed",
        }
    }

    /// The health a word names (see [`DeviceHealth::word`]).
    pub fn from_word(word: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.word() == word)
    }
}

/// A received device health: a known value other than UNSPECIFIED, or an error naming `field`.
pub fn device_health(field: &str, raw: i32) -> Result<DeviceHealth, BadState> {
    match DeviceHealth::try_from(raw) {
        Ok(DeviceHealth::Unspecified) | Err(_) => Err(BadState::new(field, "device health", raw)),
        Ok(s) => Ok(s),
    }
}

/// A received job state: a known state other than UNSPECIFIED, or an error naming `field`.
pub fn job_state(field: &str, raw: i32) -> Result<JobState, BadState> {
    match JobState::try_from(raw) {
        Ok(JobState::Unspecified) | Err(_) => Err(BadState::new(field, "job state", raw)),
        Ok(s) => Ok(s),
    }
}

/// A received task state: a known state other than UNSPECIFIED, or an error naming `field`.
pub fn task_state(field: &str, raw: i32) -> Result<TaskState, BadState> {
    match TaskState::try_from(raw) {
        Ok(TaskState::Unspecified) | Err(_) => Err(BadState::new(field, "task state", raw)),
        Ok(s) => Ok(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_reads_back_from_its_word() {
        for s in JobState::ALL {
            assert_eq!(JobState::from_word(s.word()), Some(s));
            assert_eq!(job_state("state", s as i32), Ok(s));
        }
        for s in TaskState::ALL {
            assert_eq!(TaskState::from_word(s.word()), Some(s));
            assert_eq!(task_state("state", s as i32), Ok(s));
        }
        for s in DeviceHealth::ALL {
            assert_eq!(DeviceHealth::from_word(s.word()), Some(s));
            assert_eq!(device_health("health", s as i32), Ok(s));
        }
        assert_eq!(
            device_health("health", 0).unwrap_err().to_string(),
            "field `health`: device health not set (0 is UNSPECIFIED)"
        );
        assert_eq!(JobState::from_word("unspecified"), None);
        assert_eq!(JobState::from_word("Running"), None);
    }

    #[test]
    fn an_unset_or_unknown_state_is_refused_naming_the_field() {
        let unset = job_state("jobs[2].state", 0).unwrap_err();
        assert_eq!(
            unset.to_string(),
            "field `jobs[2].state`: job state not set (0 is UNSPECIFIED)"
        );
        let newer = task_state("tasks[1].state", 42).unwrap_err();
        assert_eq!(newer.field, "tasks[1].state");
        assert_eq!(
            newer.message,
            "unknown task state 42 (sent by a newer version?)"
        );
        assert!(task_state("state", -1).is_err());
    }
}
