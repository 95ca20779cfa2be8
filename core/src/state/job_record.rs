//! A job as the cluster remembers it: its spec, where it is in its life, its lease and checkpoints.

use super::command::{CheckpointManifest, Rejection, TaskReport, TaskState};
use crate::engine::{DeviceDemand, GangPlacement, GangRequest, HostFilter, PendingReason, Resume};
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

impl Lease {
    /// The host of each rank.
    pub fn hosts(&self) -> impl Iterator<Item = &HostName> {
        self.placement.tasks.iter().map(|t| &t.host)
    }

    /// Milli-devices it holds.
    pub fn milli(&self) -> u64 {
        let devices = self.placement.tasks.iter().flat_map(|t| &t.devices);
        devices.map(|d| u64::from(d.milli)).sum()
    }
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
/// `checkpoint_request` is committed, the lease ends and the job is placed again as `reason` says.
///
/// Stored as the flat record it always was (`hosts`, `preempted_for`, `idle_reclaim`), so
/// snapshots and backups keep their format.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "MigrationRecord", into = "MigrationRecord")]
pub struct Migration {
    pub checkpoint_request: u64,
    pub requested_at_ms: u64,
    pub reason: MigrationReason,
}

/// Why a running job migrates, and so what becomes of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationReason {
    /// An operator's or the defragmenter's move: placed again under `hosts`. A failed checkpoint
    /// aborts it and the job keeps running where it is.
    Move { hosts: HostFilter },
    /// Preempted for `for_job`: it stops even if the checkpoint fails (losing the work since its
    /// last checkpoint) instead of keeping the devices.
    Preemption { for_job: JobId },
    /// Its queue reclaims its idle lease (`why`, in words). Like a preemption, it stops even if
    /// the checkpoint fails, and it queues again behind the jobs waiting then.
    IdleReclaim { why: String },
    /// An operator fenced a device it holds (`why`): it checkpoints, stops even if the checkpoint
    /// fails, and is repaired (placed again before ordinary pending work, on its healthy hosts
    /// where it can be).
    Repair { why: String },
}

impl MigrationReason {
    /// Whether the job stops even when its checkpoint fails.
    pub fn stops_anyway(&self) -> bool {
        !matches!(self, MigrationReason::Move { .. })
    }

    /// Where the job may be placed once it stopped.
    pub fn next_hosts(&self) -> HostFilter {
        match self {
            MigrationReason::Move { hosts } => hosts.clone(),
            _ => HostFilter::default(),
        }
    }

    /// The history line when the checkpoint at `step` stops the job.
    pub fn checkpointed(&self, step: u64) -> String {
        match self {
            MigrationReason::Preemption { for_job } => {
                format!("preempted for job {for_job}: checkpointed at step {step}; re-queued")
            }
            MigrationReason::IdleReclaim { why } => {
                format!("{why}: checkpointed at step {step}; re-queued behind the jobs waiting")
            }
            MigrationReason::Move { .. } => {
                format!("migrating: checkpointed at step {step}; placing it again")
            }
            MigrationReason::Repair { why } => {
                format!("{why}: checkpointed at step {step}; repairing")
            }
        }
    }

    /// The history line when the checkpoint failed with `error` and the job stops anyway
    /// (`None` for a move, which is aborted instead).
    pub fn stopped_anyway(&self, error: &str) -> Option<String> {
        let why = match self {
            MigrationReason::Move { .. } => return None,
            MigrationReason::Preemption { for_job } => format!("preempted for job {for_job}"),
            MigrationReason::IdleReclaim { why } | MigrationReason::Repair { why } => why.clone(),
        };
        Some(format!(
            "{why}; checkpoint failed ({error}), stopped anyway; re-queued from the last checkpoint"
        ))
    }
}

impl Migration {
    /// Whether checkpoint request `request` answers it (a later request answers it too).
    pub fn answered_by(&self, request: u64) -> bool {
        request >= self.checkpoint_request
    }

    /// What it waits for and where it goes, in words (`gangway job status`).
    pub fn describe(&self) -> String {
        let waiting = format!("waiting for checkpoint request {}", self.checkpoint_request);
        match self.reason.next_hosts().describe() {
            hosts if hosts.is_empty() => waiting,
            hosts => format!("{waiting}, {hosts}"),
        }
    }
}

/// How a [`Migration`] is stored: the reason as optional fields, at most one of `preempted_for`
/// and `idle_reclaim` set.
#[derive(Serialize, Deserialize)]
struct MigrationRecord {
    checkpoint_request: u64,
    hosts: HostFilter,
    requested_at_ms: u64,
    #[serde(default)]
    preempted_for: Option<JobId>,
    #[serde(default)]
    idle_reclaim: Option<String>,
    #[serde(default)]
    repair: Option<String>,
}

impl From<MigrationRecord> for Migration {
    fn from(r: MigrationRecord) -> Self {
        let reason = match (r.preempted_for, r.idle_reclaim, r.repair) {
            (Some(for_job), _, _) => MigrationReason::Preemption { for_job },
            (None, Some(why), _) => MigrationReason::IdleReclaim { why },
            (None, None, Some(why)) => MigrationReason::Repair { why },
            (None, None, None) => MigrationReason::Move { hosts: r.hosts },
        };
        Migration {
            checkpoint_request: r.checkpoint_request,
            requested_at_ms: r.requested_at_ms,
            reason,
        }
    }
}

impl From<Migration> for MigrationRecord {
    fn from(m: Migration) -> Self {
        let mut record = MigrationRecord {
            checkpoint_request: m.checkpoint_request,
            hosts: HostFilter::default(),
            requested_at_ms: m.requested_at_ms,
            preempted_for: None,
            idle_reclaim: None,
            repair: None,
        };
        match m.reason {
            MigrationReason::Move { hosts } => record.hosts = hosts,
            MigrationReason::Preemption { for_job } => record.preempted_for = Some(for_job),
            MigrationReason::IdleReclaim { why } => record.idle_reclaim = Some(why),
            MigrationReason::Repair { why } => record.repair = Some(why),
        }
        record
    }
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
    /// Who submitted it (`client/alice`, `token/ci`; empty before identities existed).
    #[serde(default)]
    pub owner: String,
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
    /// Restarts after application failures so far (against `spec.restart.max_restarts`).
    #[serde(default)]
    pub restarts: u32,
    /// Repairs after infrastructure failures (a device or host lost); never limited.
    #[serde(default)]
    pub repairs: u32,
    /// How it comes back when it is placed again (a repair, a restart's backoff); cleared once
    /// placed.
    #[serde(default)]
    pub resume: Resume,
    /// Its leases, oldest first, at most [`JOB_HISTORY_LIMIT`]: where each ran and why it ended
    /// (`gangway job status`).
    #[serde(default)]
    pub runs: Vec<RunRecord>,
}

/// One lease of a job: an attempt to run it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub epoch: u64,
    pub hosts: Vec<HostName>,
    pub started_at_ms: u64,
    pub ended_at_ms: Option<u64>,
    pub cause: Option<RunCause>,
    /// What ended it, in words.
    pub end: String,
}

/// Why a lease ended, as the restart policy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunCause {
    /// Every task succeeded.
    Completed,
    /// A task failed on healthy hardware: counted against the restart policy.
    Application,
    /// A device or host failed under it: repaired, never counted against the job.
    Infrastructure,
    /// The scheduler took it back (preemption, migration, idle reclaim, restore).
    Scheduler,
    Cancelled,
}

impl fmt::Display for RunCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RunCause::Completed => "completed",
            RunCause::Application => "application",
            RunCause::Infrastructure => "infrastructure",
            RunCause::Scheduler => "scheduler",
            RunCause::Cancelled => "cancelled",
        })
    }
}

impl RunCause {
    /// The cause a lease ending in `next` has unless the caller knows better.
    pub fn of(next: JobState) -> RunCause {
        match next {
            JobState::Succeeded => RunCause::Completed,
            JobState::Failed => RunCause::Application,
            JobState::Cancelled => RunCause::Cancelled,
            JobState::Pending | JobState::Running => RunCause::Scheduler,
        }
    }
}

impl JobRecord {
    pub fn new(id: JobId, spec: JobSpec, now_ms: u64) -> Self {
        let mut job = Self {
            id,
            spec,
            owner: String::new(),
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
            restarts: 0,
            repairs: 0,
            resume: Resume::default(),
            runs: Vec::new(),
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
        let current = self.lease_epoch();
        (current != Some(epoch)).then(|| self.stale(epoch))
    }

    /// Like [`JobRecord::stale_lease`], but a report made under the most recent lease still
    /// counts after it ended (a late checkpoint report).
    pub fn stale_report(&self, epoch: u64) -> Option<Rejection> {
        let newest = self.lease_epoch().or(self.last_epoch);
        (newest != Some(epoch)).then(|| self.stale(epoch))
    }

    fn stale(&self, epoch: u64) -> Rejection {
        Rejection::StaleEpoch {
            job: self.id.clone(),
            got: epoch,
            current: self.lease_epoch().or(self.last_epoch).unwrap_or(0),
        }
    }

    /// The epoch of the lease it holds.
    pub fn lease_epoch(&self) -> Option<u64> {
        self.lease.as_ref().map(|l| l.epoch)
    }

    /// Why it cannot be checkpointed now, if it cannot.
    pub fn refuse_checkpoint(&self) -> Option<Rejection> {
        let why = if self.state != JobState::Running || self.lease.is_none() {
            "only a running job can be checkpointed or migrated"
        } else if self.spec.checkpoint.is_none() {
            "its spec has no [checkpoint] section, so it cannot checkpoint"
        } else {
            return None;
        };
        Some(self.wrong_state(why))
    }

    /// Why it cannot start a migration now, if it cannot.
    pub fn refuse_migration(&self) -> Option<Rejection> {
        self.refuse_checkpoint()
            .or_else(|| self.refuse_second_migration())
    }

    /// The refusal when a migration is already under way.
    pub fn refuse_second_migration(&self) -> Option<Rejection> {
        self.migration
            .is_some()
            .then(|| self.wrong_state("a migration is already waiting for its checkpoint"))
    }

    /// The refusal of a command that does not fit the state the job is in.
    pub fn wrong_state(&self, why: &str) -> Rejection {
        Rejection::WrongJobState {
            job: self.id.clone(),
            state: self.state.to_string(),
            why: why.to_owned(),
        }
    }

    /// Leases `placement` to it under `epoch`: every rank assigned, the host filter of its last
    /// migration spent.
    pub fn grant_lease(&mut self, now: u64, epoch: u64, placement: GangPlacement) {
        let hosts: Vec<String> = placement.tasks.iter().map(|t| t.host.to_string()).collect();
        self.tasks = (0..placement.tasks.len())
            .map(|_| TaskRecord {
                state: TaskState::Assigned,
                exit_code: None,
                message: String::new(),
            })
            .collect();
        self.lease = Some(Lease {
            epoch,
            granted_at_ms: now,
            placement,
            checkpoint_requests_at_grant: self.checkpoint_requests,
        });
        self.last_epoch = Some(epoch);
        self.next_hosts = HostFilter::default();
        self.state = JobState::Running;
        self.pending_reason = None;
        self.attempts += 1;
        self.resume = Resume::default();
        if self.runs.len() == JOB_HISTORY_LIMIT {
            self.runs.remove(0);
        }
        let placement = &self.lease.as_ref().expect("just leased").placement;
        self.runs.push(RunRecord {
            epoch,
            hosts: placement.tasks.iter().map(|t| t.host.clone()).collect(),
            started_at_ms: now,
            ended_at_ms: None,
            cause: None,
            end: String::new(),
        });
        self.note(
            now,
            format!("leased (epoch {epoch}) on {}", hosts.join(", ")),
        );
    }

    /// Ends its lease, and any migration that waited on it, moving it to `next` (Pending to
    /// re-queue it, or a terminal state) for `why`. Returns the lease, whose devices the caller
    /// frees; `None` (and no change) when it holds none.
    pub fn end_lease(&mut self, now: u64, next: JobState, why: String) -> Option<Lease> {
        self.end_lease_as(now, next, RunCause::of(next), why)
    }

    /// [`JobRecord::end_lease`] with the cause of the end given (an infrastructure failure).
    pub fn end_lease_as(
        &mut self,
        now: u64,
        next: JobState,
        cause: RunCause,
        why: String,
    ) -> Option<Lease> {
        let lease = self.lease.take()?;
        if let Some(run) = self.runs.last_mut().filter(|r| r.epoch == lease.epoch) {
            run.ended_at_ms = Some(now);
            run.cause = Some(cause);
            run.end = why.clone();
        }
        self.migration = None;
        self.last_hosts = lease.hosts().cloned().collect();
        self.state = next;
        self.tasks.clear();
        if next == JobState::Pending {
            self.pending_reason = Some(PendingReason::Requeued { why: why.clone() });
        } else {
            self.pending_reason = None;
            self.finished_at_ms = Some(now);
        }
        self.note(now, why);
        Some(lease)
    }

    /// Cancels it while it waits (it holds no lease).
    pub fn cancel_waiting(&mut self, now: u64, reason: &str) {
        self.state = JobState::Cancelled;
        self.pending_reason = None;
        self.finished_at_ms = Some(now);
        self.note(now, format!("cancelled: {reason}"));
    }

    /// Records a rank's report. `Ok(false)` when it changes nothing: a rank that ended never
    /// changes again, and Running never goes back to Assigned.
    pub fn record_task(&mut self, now: u64, report: &TaskReport) -> Result<bool, Rejection> {
        let TaskReport { task, state, .. } = *report;
        let Some(t) = self.tasks.get_mut(task as usize) else {
            let job = self.id.clone();
            return Err(Rejection::UnknownTask { job, task });
        };
        if t.state.is_terminal() || state <= t.state {
            return Ok(false);
        }
        t.state = state;
        t.exit_code = report.exit_code;
        t.message = report.message.clone();
        let line = format!("task {task} {state:?} {}", report.message);
        self.note(now, line.trim_end().to_owned());
        Ok(true)
    }

    /// What a rank's new state means for the gang: where the job goes and why, when it ends the
    /// lease. A lost rank re-queues the gang, a failed one fails it (the other ranks cannot make
    /// progress without it), and the last rank to succeed completes it.
    pub fn gang_outcome(&self, report: &TaskReport) -> Option<(JobState, String)> {
        let (task, message) = (report.task, &report.message);
        match report.state {
            TaskState::Lost => Some((
                JobState::Pending,
                format!("task {task} lost ({message}); re-queued from its last checkpoint"),
            )),
            TaskState::Failed => Some((
                JobState::Failed,
                match report.exit_code {
                    Some(code) => format!("task {task} failed with exit code {code}: {message}"),
                    None => format!("task {task} failed: {message}"),
                },
            )),
            _ if self.tasks.iter().all(|t| t.state == TaskState::Succeeded) => {
                Some((JobState::Succeeded, "all tasks succeeded".to_owned()))
            }
            _ => None,
        }
    }

    /// Whether its spec allows another restart after an application failure, and if so the log
    /// time it may be placed again (the backoff of that restart).
    pub fn next_restart_at(&self, now: u64) -> Option<u64> {
        let policy = &self.spec.restart;
        (self.restarts < policy.max_restarts).then(|| {
            let wait = policy.backoff_before(self.restarts + 1);
            now.saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX))
        })
    }

    /// Whether a report under an ended lease repeats a completion already recorded (a worker
    /// retries until someone acknowledges it).
    pub fn repeats_completion(&self, report: &TaskReport) -> bool {
        self.last_epoch == Some(report.epoch)
            && report.state.is_terminal()
            && self.state.is_terminal()
    }

    /// Keeps `manifest` as the newest checkpoint if it is newer than the one kept: checkpoints
    /// only move forward. Returns whether it was kept.
    pub fn keep_checkpoint(&mut self, now: u64, epoch: u64, manifest: CheckpointManifest) -> bool {
        let newer = self
            .last_checkpoint
            .as_ref()
            .is_none_or(|c| c.manifest.step < manifest.step);
        if newer {
            let line = format!("checkpoint at step {} ({})", manifest.step, manifest.path);
            self.note(now, line);
            self.last_checkpoint = Some(CheckpointRecord {
                epoch,
                manifest,
                recorded_at_ms: now,
            });
        }
        newer
    }

    /// Asks its tasks to checkpoint: the request number grows, and its workers see it in their
    /// allocations. Returns the new number.
    pub fn request_checkpoint(&mut self) -> u64 {
        self.checkpoint_requests += 1;
        self.checkpoint_requests
    }

    /// Starts a migration for `reason`: it asks for a checkpoint and waits for the answer.
    pub fn start_migration(&mut self, now: u64, reason: MigrationReason) {
        let checkpoint_request = self.request_checkpoint();
        self.migration = Some(Migration {
            checkpoint_request,
            requested_at_ms: now,
            reason,
        });
    }

    /// The migration that checkpoint request `request` under lease `epoch` answers, if one waits.
    pub fn answered_migration(&self, epoch: u64, request: u64) -> Option<&Migration> {
        let current = self.lease_epoch() == Some(epoch);
        self.migration
            .as_ref()
            .filter(|m| current && m.answered_by(request))
    }

    /// Readies it to stop for its migration, which it takes out: the next placement goes where
    /// the migration says, and an idle reclaim books the devices it gives back. The caller then
    /// ends the lease.
    pub fn stop_for_migration(&mut self, now: u64) -> Option<MigrationReason> {
        let reason = self.migration.take()?.reason;
        self.next_hosts = reason.next_hosts();
        match &reason {
            MigrationReason::IdleReclaim { .. } => self.mark_reclaimed(now),
            MigrationReason::Repair { .. } => self.mark_repair(),
            _ => {}
        }
        Some(reason)
    }

    /// Readies it to be repaired once its lease ends: counted (never against its restarts), it
    /// goes before ordinary pending work, on the hosts of its lease where it can.
    pub fn mark_repair(&mut self) {
        let prefer = self
            .lease
            .as_ref()
            .map(|l| l.hosts().cloned().collect())
            .unwrap_or_default();
        self.repairs += 1;
        self.resume = Resume {
            repair: true,
            prefer,
            not_before_ms: 0,
        };
    }

    /// Gives up its migration after a failed checkpoint: it keeps running where it is.
    pub fn abort_migration(&mut self, now: u64, error: &str) {
        self.migration = None;
        self.note(
            now,
            format!("migration aborted, the job keeps running here: checkpoint failed: {error}"),
        );
    }

    /// Notes a failed checkpoint request no migration waited for, once per error. Returns
    /// whether it noted it.
    pub fn note_failed_request(&mut self, now: u64, request: u64, error: &str) -> bool {
        let repeated = self.history.last().is_some_and(|h| h.what.ends_with(error));
        if !repeated {
            self.note(now, format!("checkpoint request {request} failed: {error}"));
        }
        !repeated
    }

    /// Books an idle reclaim about to end its lease: counted, queued again from now, and its
    /// devices credited as given back until it runs again.
    pub fn mark_reclaimed(&mut self, now: u64) {
        let milli = self.lease.as_ref().map_or(0, Lease::milli);
        self.reclaims += 1;
        self.reclaimed = Some(Reclaimed { at_ms: now, milli });
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
            resume: self.resume.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A migration is stored in the flat shape snapshots and backups have always had.
    #[test]
    fn a_migration_keeps_its_stored_format() {
        let stored = [
            r#"{"checkpoint_request":3,"hosts":{"only":[],"avoid":["h1"]},"requested_at_ms":7,"preempted_for":null,"idle_reclaim":null,"repair":null}"#,
            r#"{"checkpoint_request":3,"hosts":{"only":[],"avoid":[]},"requested_at_ms":7,"preempted_for":"big-1","idle_reclaim":null,"repair":null}"#,
            r#"{"checkpoint_request":3,"hosts":{"only":[],"avoid":[]},"requested_at_ms":7,"preempted_for":null,"idle_reclaim":"idle","repair":null}"#,
            r#"{"checkpoint_request":3,"hosts":{"only":[],"avoid":[]},"requested_at_ms":7,"preempted_for":null,"idle_reclaim":null,"repair":"device 3 of h1 fenced"}"#,
        ];
        let reasons: Vec<MigrationReason> = stored
            .iter()
            .map(|json| {
                let m: Migration = serde_json::from_str(json).unwrap();
                assert_eq!(serde_json::to_string(&m).unwrap(), *json);
                m.reason
            })
            .collect();
        let avoid = [HostName::new("h1")].into();
        let hosts = HostFilter {
            only: Default::default(),
            avoid,
        };
        assert_eq!(
            reasons,
            [
                MigrationReason::Move { hosts },
                MigrationReason::Preemption {
                    for_job: JobId::new("big-1")
                },
                MigrationReason::IdleReclaim {
                    why: "idle".to_owned()
                },
                MigrationReason::Repair {
                    why: "device 3 of h1 fenced".to_owned()
                },
            ]
        );
        // Older snapshots may lack the reason fields altogether.
        let old = r#"{"checkpoint_request":1,"hosts":{"only":[],"avoid":[]},"requested_at_ms":0}"#;
        let m: Migration = serde_json::from_str(old).unwrap();
        assert!(!m.reason.stops_anyway());
    }
}
