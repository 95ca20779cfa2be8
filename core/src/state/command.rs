//! The replicated commands: every change to cluster state is one of these, committed through Raft and
//! applied by [`super::ClusterStore::apply`] on every replica in log order.

use crate::engine::{DeviceKind, HostFilter, HostTopology, NodeState, Plan, QueueConfig};
use gangway_proto::ids::{HostName, JobId};
use gangway_proto::spec::JobSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// One accelerator as a worker reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInventory {
    /// Stable identity (the NVML UUID for GPUs); what `CUDA_VISIBLE_DEVICES` is set to.
    pub uuid: String,
    pub model: String,
    pub kind: DeviceKind,
    pub memory_mib: u64,
    /// Devices with equal values share an NVLink/NUMA domain.
    pub nvlink_domain: u16,
}

impl DeviceInventory {
    /// The device as the engine places on it.
    pub fn spec(&self) -> crate::engine::DeviceSpec {
        crate::engine::DeviceSpec {
            model: self.model.clone(),
            nvlink_domain: self.nvlink_domain,
        }
    }
}

/// What a worker tells the cluster about its host when it registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRegistration {
    pub name: HostName,
    /// Where the worker can be reached (host:port), and the host part tasks use as master address.
    pub address: String,
    pub topology: HostTopology,
    pub cpu_milli: u64,
    pub memory_mib: u64,
    pub devices: Vec<DeviceInventory>,
}

/// What a task reports about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Leased to a worker, not yet confirmed running.
    Assigned,
    Running,
    /// Exited with status 0.
    Succeeded,
    /// Exited non-zero, was killed, or could not start.
    Failed,
    /// Stopped for a reason that is not the task's fault: its host lost the scheduler past the
    /// lease deadline, or its supervisor vanished. The gang is re-queued from its last checkpoint
    /// instead of failing.
    Lost,
}

impl TaskState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::Lost
        )
    }
}

/// A checkpoint a task wrote (its manifest), as committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointManifest {
    /// Directory or file on the shared checkpoint storage.
    pub path: String,
    /// Training step (or any monotone progress counter) the checkpoint holds.
    pub step: u64,
    pub bytes: u64,
}

/// One migration of a defragmentation plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefragMove {
    pub job: JobId,
    /// The lease the plan saw: the move runs only if the job still holds it.
    pub epoch: u64,
    /// Where it is placed again.
    pub to: BTreeSet<HostName>,
}

/// An operator cordons, drains or readmits a host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStateChange {
    pub node: HostName,
    pub state: NodeState,
    pub reason: String,
    /// Draining: how long its work has to move off (checkpoint and migrate) before what still
    /// runs there is stopped and re-queued; `None`: [`DEFAULT_DRAIN_GRACE_MS`].
    #[serde(default)]
    pub grace_ms: Option<u64>,
}

/// How long a drain waits for work to move off before stopping it, unless the operator says.
pub const DEFAULT_DRAIN_GRACE_MS: u64 = 10 * 60 * 1000;

/// A client submits a job. The key makes retries (and duplicate submissions) create one job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Submission {
    pub idempotency_key: Option<String>,
    pub spec: JobSpec,
    /// Who submitted it (`client/alice`, `token/ci`): submitters manage only their own jobs.
    #[serde(default)]
    pub owner: String,
}

/// The most jobs one [`Command::SubmitJobs`] creates: one log entry stays small enough to
/// replicate in one message, and one apply short.
pub const MAX_BATCH_JOBS: usize = 1_000;

/// The most task reports one [`Command::TaskStatuses`] carries.
pub const MAX_BATCH_REPORTS: usize = 256;

/// One job of a batch: its id, and whether its idempotency key had been seen already.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmittedJob {
    pub job: JobId,
    pub existing: bool,
}

/// A worker's report about one task under one lease epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskReport {
    pub job: JobId,
    /// The rank.
    pub task: u32,
    pub epoch: u64,
    pub state: TaskState,
    pub exit_code: Option<i32>,
    pub message: String,
}

/// A checkpoint a task wrote under lease `epoch`, answering checkpoint request `request` (0: the
/// task checkpointed on its own).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointReport {
    pub job: JobId,
    pub epoch: u64,
    pub request: u64,
    pub manifest: CheckpointManifest,
}

/// A requested checkpoint that was not written in time (or could not be taken).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointFailure {
    pub job: JobId,
    pub epoch: u64,
    pub request: u64,
    pub error: String,
}

/// The defragmenter's plan: migrate each `moves` job (still running under the given epoch: the
/// sequence check, so a stale plan never runs) onto its hosts, and reserve `hosts` for `for_job`
/// until it is placed or `until_ms` passes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefragOrder {
    pub for_job: JobId,
    pub hosts: BTreeSet<HostName>,
    pub moves: Vec<DefragMove>,
    pub until_ms: u64,
}

/// The leader saw every device of `job`'s lease `epoch` below its queue's idle threshold for
/// `idle_ms` (at least the window).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdleReport {
    pub job: JobId,
    pub epoch: u64,
    pub idle_ms: u64,
}

/// The agent's report that a device's health changed. Retried until acknowledged; a repeat
/// changes nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceHealthReport {
    pub node: HostName,
    /// The device's uuid as registered.
    pub device: String,
    pub health: super::node_record::DeviceHealth,
    /// What the agent saw ("XID 79", "uncorrectable ECC", "thermal throttling").
    pub cause: String,
}

/// The result of the operator's health check command on a host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheckReport {
    pub node: HostName,
    pub passed: bool,
    /// Uuids of the devices the check named as failing; empty with `passed` false: the check
    /// failed without naming devices, and every device of the host counts as failing it.
    pub failed_devices: Vec<String>,
    /// The check's own words (the end of its output), kept as the fence reason.
    pub detail: String,
}

/// An operator fences a device (no new leases; its running gang is repaired elsewhere) or returns
/// it to service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceFenceChange {
    pub node: HostName,
    /// The device's uuid, or its index on the host as a decimal number.
    pub device: String,
    pub fenced: bool,
    pub reason: String,
}

/// Every state change, one variant per kind of change, one apply function per variant.
///
/// Commands, responses and everything inside them are externally tagged serde enums: the Raft log
/// encodes them with bincode, which cannot decode internally tagged (`#[serde(tag = ...)]`) enums.
/// A variant carrying a struct encodes exactly as a struct variant with the same fields would, in
/// bincode and in JSON alike.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// A worker (re-)registers its host.
    RegisterNode(NodeRegistration),
    /// An operator cordons, drains or readmits a host.
    SetNodeState(NodeStateChange),
    /// The leader declares a host down (missed heartbeats): its leases are revoked and its gangs
    /// re-queued from their last checkpoint.
    NodeDown {
        node: HostName,
        reason: String,
    },
    /// A client submits a job.
    SubmitJob(Submission),
    CancelJob {
        job: JobId,
        reason: String,
    },
    /// The leader's scheduling round. Every placement is re-checked against the state at apply time;
    /// a gang whose placement went stale stays pending, whole.
    ApplyPlan {
        plan: Plan,
    },
    /// A worker's report about one task. Idempotent: a report for an older epoch, or one that
    /// repeats the current state, changes nothing.
    TaskStatus(TaskReport),
    /// A checkpoint a task wrote. Completes a migration waiting for it.
    RecordCheckpoint(CheckpointReport),
    /// A checkpoint that failed. Aborts a move waiting for it (the job keeps running where it is);
    /// a preemption or idle reclaim stops the job anyway.
    CheckpointFailed(CheckpointFailure),
    /// An operator asks a running job to checkpoint now.
    RequestCheckpoint {
        job: JobId,
        reason: String,
    },
    /// An operator moves a running job: checkpoint, stop, place again under `hosts` (by default
    /// avoiding the hosts it runs on), restore.
    MigrateJob {
        job: JobId,
        hosts: HostFilter,
    },
    /// The defragmenter's plan. Whole or not at all.
    Defragment(DefragOrder),
    /// Creates or changes a queue's guarantee.
    SetQueue(QueueConfig),
    /// The leader saw a lease idle. Applied per the queue's policy at apply time: reclaim
    /// (checkpoint, release, re-queue) or report. Refused if the lease changed since.
    IdleLease(IdleReport),
    /// A worker reports a device's health changed: a failed device is fenced and the gang on it
    /// repaired.
    DeviceHealth(DeviceHealthReport),
    /// A worker reports its health check's result: fenced devices return to service after
    /// enough passes in a row; failing devices are fenced.
    HealthCheck(HealthCheckReport),
    /// An operator fences or unfences a device.
    FenceDevice(DeviceFenceChange),
    /// The leader removes finished jobs and idempotency keys past their retention (each replica
    /// archives the jobs first; see `state::retention`).
    PruneHistory(super::retention::Prune),
    /// An operator sets the retention of history and the pending cap per queue.
    SetLimits(super::retention::Limits),
    /// The leader stops what still runs on a draining node whose grace has passed: each gang is
    /// re-queued from its last checkpoint, away from the node.
    DrainDeadline {
        node: HostName,
    },
    /// An operator decommissions a node that holds no lease (down, or drained).
    RemoveNode {
        node: HostName,
        reason: String,
    },
    /// Loads a backup (`gangway cluster snapshot save`) into an empty cluster. `backup_revision` is
    /// the revision the backup was taken at. Every lease in the backup is revoked and its job
    /// re-queued, and epochs and revisions jump far past anything the old cluster could have
    /// granted after the backup, so the fleet's workers trust the restored cluster and nothing
    /// from before it.
    Restore {
        state: Box<super::ClusterStore>,
        backup_revision: u64,
    },
    /// An admin changes who may do what.
    SetAccess(super::access::AccessChange),
    /// A change made on behalf of `actor` (a person's certificate or token name): `command` is
    /// applied as it would be alone and one entry records who, what, on what, and the outcome
    /// (see `state::audit`). Wraps one command, never another `Audited`.
    Audited {
        actor: String,
        #[serde(deserialize_with = "super::audit::one_level")]
        command: Box<Command>,
    },
    /// An action that is not a state change (membership, leader transfer, drill), recorded by
    /// the replica that acted.
    AuditNote(super::audit::AuditNote),
    /// A client submits several jobs at once (a batch or a job array): all are created, in order,
    /// or none (see [`MAX_BATCH_JOBS`]).
    SubmitJobs(Vec<Submission>),
    /// Several reports of one host, sent together (what its agent had queued): each applied as
    /// [`Command::TaskStatus`] would apply it, in order, each with its own outcome (see
    /// [`MAX_BATCH_REPORTS`]).
    TaskStatuses(Vec<TaskReport>),
    // New variants go here, at the end: the log encodes a variant by its position (bincode),
    // so one inserted above would make every entry already written decode as its neighbour
    // (`a_commands_tag_is_its_place_for_good` pins them).
}

impl Command {
    /// Short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::RegisterNode(_) => "register_node",
            Command::SetNodeState(_) => "set_node_state",
            Command::NodeDown { .. } => "node_down",
            Command::SubmitJob(_) => "submit_job",
            Command::SubmitJobs(_) => "submit_jobs",
            Command::CancelJob { .. } => "cancel_job",
            Command::ApplyPlan { .. } => "apply_plan",
            Command::TaskStatus(_) => "task_status",
            Command::TaskStatuses(_) => "task_statuses",
            Command::RecordCheckpoint(_) => "record_checkpoint",
            Command::CheckpointFailed(_) => "checkpoint_failed",
            Command::RequestCheckpoint { .. } => "request_checkpoint",
            Command::MigrateJob { .. } => "migrate_job",
            Command::Defragment(_) => "defragment",
            Command::SetQueue(_) => "set_queue",
            Command::IdleLease(_) => "idle_lease",
            Command::DeviceHealth(_) => "device_health",
            Command::HealthCheck(_) => "health_check",
            Command::FenceDevice(_) => "fence_device",
            Command::PruneHistory(_) => "prune_history",
            Command::SetLimits(_) => "set_limits",
            Command::DrainDeadline { .. } => "drain_deadline",
            Command::RemoveNode { .. } => "remove_node",
            Command::Restore { .. } => "restore",
            Command::SetAccess(_) => "set_access",
            Command::Audited { .. } => "audited",
            Command::AuditNote(_) => "audit_note",
        }
    }
}

/// Why a command changed nothing. Deterministic, so every replica answers the same.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    #[error("unknown node {0}")]
    UnknownNode(HostName),
    #[error("unknown job {0}")]
    UnknownJob(JobId),
    #[error("job {job} is {state}; {why}")]
    WrongJobState {
        job: JobId,
        state: String,
        why: String,
    },
    #[error("node {node}: {why}")]
    BadNode { node: HostName, why: String },
    #[error(
        "report for job {job} under lease epoch {got} ignored: the current epoch is {current}"
    )]
    StaleEpoch { job: JobId, got: u64, current: u64 },
    #[error("job {job} has no task {task}")]
    UnknownTask { job: JobId, task: u32 },
    #[error("node {node} has no device {device}")]
    UnknownDevice { node: HostName, device: String },
    #[error("queue {queue} has {pending} pending jobs and this submission adds {adding}, its limit is {limit}; retry when some have been placed")]
    QueueFull {
        queue: String,
        pending: usize,
        limit: usize,
        /// How many pending jobs the refused submission would have added (1 for one job).
        adding: usize,
    },
    #[error("invalid limits: {0}")]
    InvalidLimits(String),
    #[error("invalid access rule: {0}")]
    InvalidAccess(String),
    #[error("invalid job: {0}")]
    InvalidJob(String),
    #[error("a backup is restored into an empty cluster only; this one has {nodes} nodes and {jobs} jobs")]
    NotEmpty { nodes: usize, jobs: usize },
    #[error("the backup contradicts itself: {0}")]
    InvalidBackup(String),
}

impl Rejection {
    /// Stable code for the gRPC edge and scripts.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::UnknownNode(_) => "unknown_node",
            Rejection::UnknownJob(_) => "unknown_job",
            Rejection::WrongJobState { .. } => "wrong_job_state",
            Rejection::BadNode { .. } => "bad_node",
            Rejection::StaleEpoch { .. } => "stale_epoch",
            Rejection::UnknownTask { .. } => "unknown_task",
            Rejection::UnknownDevice { .. } => "unknown_device",
            Rejection::QueueFull { .. } => "resource_exhausted",
            Rejection::InvalidLimits(_) => "invalid_limits",
            Rejection::InvalidAccess(_) => "invalid_access",
            Rejection::InvalidJob(_) => "invalid_job",
            Rejection::NotEmpty { .. } => "not_empty",
            Rejection::InvalidBackup(_) => "invalid_backup",
        }
    }
}

/// What applying a command did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// The command changed state (or repeated a change already made, which is the same to a client).
    Done,
    /// A job was created, or `existing` when the idempotency key had been seen.
    Submitted {
        job: JobId,
        existing: bool,
    },
    /// What a scheduling round committed.
    PlanApplied {
        placed: Vec<(JobId, u64)>,
        stale: Vec<(JobId, String)>,
        preempted: Vec<JobId>,
    },
    Rejected(Rejection),
    /// The jobs of a [`Command::SubmitJobs`], in its order.
    SubmittedJobs(Vec<SubmittedJob>),
    /// One outcome per report of a [`Command::TaskStatuses`], in its order.
    Each(Vec<Response>),
    // New variants at the end: replicas of two versions exchange responses (a forwarded write).
}

/// What watchers learn as commands apply: the worker API streams allocations of the nodes that
/// changed; the leader's scheduling loop wakes on `SchedulingNeeded`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The desired allocations of this node changed (lease granted, revoked, job cancelled).
    AllocationsChanged(HostName),
    /// Something changed that may let a pending job be placed, or a new job arrived.
    SchedulingNeeded,
    JobChanged(JobId),
    /// A finished job left the replicated state (retention): each replica keeps it in its archive.
    Archived(Box<super::job_record::JobRecord>),
}
