//! A job as the cluster remembers it: its spec, where it is in its life, its lease and checkpoints.

use super::command::{CheckpointManifest, Rejection, TaskState};
use crate::engine::{DeviceDemand, GangPlacement, GangRequest, HostFilter, PendingReason};
use gangway_proto::ids::{HostName, JobId, QueueName};
use gangway_proto::spec::{DeviceCount, JobSpec};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a placement (first time, or re-queued after a node loss or preemption).
    Pending,
    /// Holds a lease; its tasks are assigned to workers.
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        })
    }
}

/// The right to run a gang on given devices. Its epoch is unique and larger than any epoch granted
/// before it, so a worker can refuse directives from an older lease (fencing).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub epoch: u64,
    pub granted_at_ms: u64,
    pub placement: GangPlacement,
    /// The job's checkpoint requests when the lease was granted: those after it, made before the
    /// task runs, are answered by the restore point.
    #[serde(default)]
    pub checkpoint_requests_at_grant: u64,
}

/// One task (rank) of the current lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub state: TaskState,
    pub exit_code: Option<i32>,
    pub message: String,
}

/// The newest checkpoint of a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub epoch: u64,
    pub manifest: CheckpointManifest,
    pub recorded_at_ms: u64,
}

/// A move of a running job that waits for its checkpoint: once the checkpoint answering
/// `checkpoint_request` is committed, the lease ends and the job is placed again under `hosts`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    pub checkpoint_request: u64,
    pub hosts: HostFilter,
    pub requested_at_ms: u64,
    /// Set when the job is being preempted for this job: it stops even if the checkpoint fails
    /// (losing the work since its last checkpoint) instead of keeping its devices.
    #[serde(default)]
    pub preempted_for: Option<JobId>,
    /// Set when the job's queue reclaims its idle lease: why, in words. Like a preemption, the job
    /// stops even if the checkpoint fails.
    #[serde(default)]
    pub idle_reclaim: Option<String>,
}

/// A lease given back by idle reclamation, until the job runs again: what the pool got back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reclaimed {
    pub at_ms: u64,
    /// Milli-devices the lease held.
    pub milli: u64,
}

/// A line of a job's history, shown by `gangway job status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEvent {
    pub at_ms: u64,
    pub what: String,
}

/// How many history lines a job keeps; older ones are dropped so a job that is preempted a thousand
/// times cannot grow the state without bound.
pub const JOB_HISTORY_LIMIT: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: JobId,
    pub spec: JobSpec,
    pub submitted_at_ms: u64,
    pub state: JobState,
    /// Why it waits, from the last scheduling round (`Display` gives the words for people).
    pub pending_reason: Option<PendingReason>,
    pub lease: Option<Lease>,
    /// Epoch of the most recent lease, kept after it ends so late checkpoint reports still count.
    pub last_epoch: Option<u64>,
    /// One record per task of the current lease.
    pub tasks: Vec<TaskRecord>,
    /// Leases granted so far.
    pub attempts: u32,
    pub preemptions: u32,
    pub last_checkpoint: Option<CheckpointRecord>,
    pub finished_at_ms: Option<u64>,
    pub history: Vec<JobEvent>,
    /// Checkpoint requests made so far; the allocation carries the number, and a worker checkpoints
    /// its task each time it sees it grow.
    pub checkpoint_requests: u64,
    /// A migration waiting for its checkpoint.
    pub migration: Option<Migration>,
    /// Where the next placement may go (set when a migration stops the job; cleared once placed).
    pub next_hosts: HostFilter,
    /// Host of each rank under the most recent lease, kept after it ends (where its logs are).
    pub last_hosts: Vec<HostName>,
    /// Leases taken back because their devices sat idle.
    #[serde(default)]
    pub reclaims: u32,
    /// The lease epoch whose idleness was last reported (a `report` policy says so once per lease).
    #[serde(default)]
    pub idle_reported_epoch: Option<u64>,
    /// The idle lease given back, until the job is placed again or ends. While it is set the job
    /// queues from the reclaim (`at_ms`), behind the jobs already waiting then, instead of
    /// taking the devices straight back by its submission time.
    #[serde(default)]
    pub reclaimed: Option<Reclaimed>,
}

impl JobRecord {
    pub fn new(id: JobId, spec: JobSpec, now_ms: u64) -> Self {
        let mut job = Self {
            id,
            spec,
            submitted_at_ms: now_ms,
            state: JobState::Pending,
            pending_reason: Some(PendingReason::Unscheduled),
            lease: None,
            last_epoch: None,
            tasks: Vec::new(),
            attempts: 0,
            preemptions: 0,
            last_checkpoint: None,
            finished_at_ms: None,
            history: Vec::new(),
            checkpoint_requests: 0,
            migration: None,
            next_hosts: HostFilter::default(),
            last_hosts: Vec::new(),
            reclaims: 0,
            idle_reported_epoch: None,
            reclaimed: None,
        };
        job.note(now_ms, "submitted".to_owned());
        job
    }

    pub fn note(&mut self, at_ms: u64, what: String) {
        if self.history.len() == JOB_HISTORY_LIMIT {
            self.history.remove(0);
        }
        self.history.push(JobEvent { at_ms, what });
    }

    /// The refusal for a report or plan made under lease `epoch` when that is not the job's
    /// current lease; `None` when it is.
    pub fn stale_lease(&self, epoch: u64) -> Option<Rejection> {
        let current = self.lease.as_ref().map(|l| l.epoch);
        (current != Some(epoch)).then(|| Rejection::StaleEpoch {
            job: self.id.clone(),
            got: epoch,
            current: current.or(self.last_epoch).unwrap_or(0),
        })
    }

    /// Why it waits, in words for people (`None` unless pending).
    pub fn pending_text(&self) -> Option<String> {
        self.pending_reason.as_ref().map(ToString::to_string)
    }

    /// Where a relaunch resumes from: the newest committed checkpoint.
    pub fn restore_from(&self) -> Option<&str> {
        self.last_checkpoint
            .as_ref()
            .map(|c| c.manifest.path.as_str())
    }

    /// Its place in the queue while pending: its submission, or for a lease given back idle the
    /// reclaim, behind the jobs already waiting then.
    pub fn queue_order_ms(&self) -> u64 {
        self.reclaimed.map_or(self.submitted_at_ms, |r| r.at_ms)
    }

    /// The gang the engine places for this job.
    pub fn gang_request(&self) -> GangRequest {
        let r = &self.spec.resources;
        GangRequest {
            id: self.id.clone(),
            queue: QueueName::new(self.spec.queue.clone()),
            priority: self.spec.priority,
            tasks: self.spec.tasks,
            per_task: crate::engine::TaskDemand {
                devices: match r.devices {
                    DeviceCount::None => DeviceDemand::None,
                    DeviceCount::Whole(n) => DeviceDemand::Whole(n),
                    DeviceCount::Fraction(m) => DeviceDemand::Fraction(m),
                },
                cpu_milli: r.cpu_milli,
                memory_mib: r.memory_mib,
            },
            kind: r.kind,
            models: r.models.clone(),
            required: self.spec.topology.required,
            preferred: self.spec.topology.preferred,
            estimated_runtime_ms: self
                .spec
                .estimated_runtime
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            checkpointable: self.spec.checkpoint.is_some(),
            submitted_at_ms: self.queue_order_ms(),
            hosts: self.next_hosts.clone(),
        }
    }
}
