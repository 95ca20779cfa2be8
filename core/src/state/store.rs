//! [`ClusterStore`]: the replicated cluster state and the one place commands are applied.
//!
//! Every replica applies the same commands in the same order and must end in the same state, so
//! everything here is ordered maps, no clocks (time comes from the log entry), no randomness.

use super::command::{CheckpointFailure, Command, Event, Response};
use super::job_record::{JobRecord, JobState};
use super::node_record::NodeRecord;
use crate::engine::{ClusterState, GangRequest, NodeState, QueueConfig, SchedulerConfig};
use gangway_proto::ids::{HostName, JobId, QueueName};
use gangway_proto::spec::CheckpointSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The port rank 0 listens on for its peers is `MASTER_PORT_BASE + epoch % MASTER_PORT_SPAN`: derived
/// from the lease, so every rank computes the same address without another round trip.
pub const MASTER_PORT_BASE: u64 = 29_500;
pub const MASTER_PORT_SPAN: u64 = 10_000;

/// One task a worker should be running: the desired state the worker diffs against what it runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub job: JobId,
    pub task: u32,
    pub task_count: u32,
    pub epoch: u64,
    /// (device index on the host, device uuid, milli-devices)
    pub devices: Vec<(u16, String, u32)>,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// The spec's `[secret_env]`: the one place its values leave the replicas (to the leased
    /// host); `Debug` shows the names only.
    pub secret_env: BTreeMap<String, gangway_proto::secret::Secret>,
    /// Rank 0's host and port.
    pub master_addr: String,
    pub checkpoint: Option<CheckpointSpec>,
    pub restore_from: Option<String>,
    /// Checkpoint requests made so far: the worker checkpoints when it sees this grow.
    pub checkpoint_request: u64,
    /// `checkpoint_request` when the lease was granted.
    pub checkpoint_request_at_grant: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStore {
    pub(super) engine: ClusterState,
    pub(super) nodes: BTreeMap<HostName, NodeRecord>,
    pub(super) jobs: super::job_table::JobTable,
    pub(super) idempotency: BTreeMap<String, JobId>,
    pub(super) queues: BTreeMap<QueueName, QueueConfig>,
    pub(super) next_job_seq: u64,
    /// The next lease epoch to grant. Epochs only grow, across all leases and devices.
    pub(super) next_epoch: u64,
    /// Newest epoch granted per device of each host.
    pub(super) device_epochs: BTreeMap<HostName, Vec<u64>>,
    /// Time of the last applied entry (leader-stamped, non-decreasing).
    pub(super) now_ms: u64,
    /// Hosts the defragmenter freed, held for one waiting gang: job -> (hosts, until log time).
    #[serde(default)]
    pub(super) reservations: BTreeMap<JobId, (std::collections::BTreeSet<HostName>, u64)>,
    /// Device-milliseconds given back by idle reclamation: for each reclaimed lease, its devices
    /// times how long the job then waited (the time they would otherwise have idled in its lease).
    #[serde(default)]
    pub(super) reclaimed_device_ms: u64,
    /// Added to the applied index to give the revision workers see: 0 until a restore, which sets
    /// it past the backup's revision (see `Command::Restore`).
    #[serde(default)]
    pub(super) revision_base: u64,
    /// What the cluster did to give capacity back, newest last (defragmentation plans,
    /// preemptions, idle reclaims), at most `CAPACITY_ACTIONS_KEPT`: `gangway defrag status`.
    #[serde(default)]
    pub(super) capacity_actions: Vec<super::job_record::JobEvent>,
    /// When each idempotency key was submitted (they expire after `limits.idempotency_window_ms`).
    #[serde(default)]
    pub(super) idempotency_at: super::retention::KeyTimes,
    /// Retention of finished jobs and keys, and the pending cap per queue.
    #[serde(default)]
    pub(super) limits: super::retention::Limits,
    /// Who may do what (certificate names and token digests bound to roles).
    #[serde(default)]
    pub(super) access: super::access::AccessRules,
    /// Who did what, newest last, at most `limits.max_audit_entries` (see `state::audit`).
    #[serde(default)]
    pub(super) audit: super::audit::AuditLog,
}

/// Added to twice a job's checkpoint timeout before the leader gives up on a migration's
/// checkpoint (see `ClusterStore::overdue_migrations`).
pub const MIGRATION_SLACK_MS: u64 = 30_000;

/// How many capacity actions the state keeps (older ones are dropped).
pub const CAPACITY_ACTIONS_KEPT: usize = 32;

/// How far a restore moves lease epochs and allocation revisions past the backup's: more than a
/// cluster could grant or apply between a backup and its restore (2^32 leases or entries), so a
/// worker that saw the old cluster go on after the backup still trusts the restored one.
pub const RESTORE_JUMP: u64 = 1 << 32;

impl ClusterStore {
    pub fn new() -> Self {
        Self {
            next_job_seq: 1,
            next_epoch: 1,
            ..Self::default()
        }
    }

    /// Applies one committed command at log time `now_ms`. Pushes watcher events into `events`.
    pub fn apply(&mut self, now_ms: u64, command: Command, events: &mut Vec<Event>) -> Response {
        self.now_ms = self.now_ms.max(now_ms);
        let now = self.now_ms;
        let response = self.dispatch(now, command, events);
        self.jobs.reindex();
        response
    }

    /// One apply function per command.
    pub(super) fn dispatch(
        &mut self,
        now: u64,
        command: Command,
        events: &mut Vec<Event>,
    ) -> Response {
        match command {
            Command::RegisterNode(reg) => self.apply_register_node(now, reg, events),
            Command::SetNodeState(change) => self.apply_set_node_state(now, change, events),
            Command::NodeDown { node, reason } => self.apply_node_down(now, node, reason, events),
            Command::SubmitJob(submission) => self.apply_submit_job(now, submission, events),
            Command::SubmitJobs(batch) => self.apply_submit_jobs(now, batch, events),
            Command::CancelJob { job, reason } => self.apply_cancel_job(now, job, reason, events),
            Command::ApplyPlan { plan } => self.apply_plan(now, plan, events),
            Command::TaskStatus(report) => self.apply_task_status(now, report, events),
            Command::TaskStatuses(reports) => self.apply_task_statuses(now, reports, events),
            Command::RecordCheckpoint(report) => self.apply_record_checkpoint(now, report, events),
            Command::CheckpointFailed(failure) => {
                self.apply_checkpoint_failed(now, failure, events)
            }
            Command::RequestCheckpoint { job, reason } => {
                self.apply_request_checkpoint(now, job, reason, events)
            }
            Command::MigrateJob { job, hosts } => self.apply_migrate_job(now, job, hosts, events),
            Command::Defragment(order) => self.apply_defragment(now, order, events),
            Command::SetQueue(queue) => self.apply_set_queue(queue, events),
            Command::IdleLease(report) => self.apply_idle_lease(now, report, events),
            Command::DeviceHealth(report) => self.apply_device_health(now, report, events),
            Command::HealthCheck(report) => self.apply_health_check(now, report, events),
            Command::FenceDevice(change) => self.apply_fence_device(now, change, events),
            Command::PruneHistory(prune) => self.apply_prune(now, prune, events),
            Command::SetLimits(limits) => self.apply_set_limits(limits),
            Command::DrainDeadline { node } => self.apply_drain_deadline(now, node, events),
            Command::RemoveNode { node, reason } => {
                self.apply_remove_node(now, node, reason, events)
            }
            Command::Restore {
                state,
                backup_revision,
            } => self.apply_restore(now, *state, backup_revision, events),
            Command::SetAccess(change) => match self.access.change(change) {
                Ok(()) => Response::Done,
                Err(e) => Response::Rejected(super::Rejection::InvalidAccess(e)),
            },
            Command::Audited { actor, command } => self.apply_audited(now, actor, *command, events),
            Command::AuditNote(note) => {
                self.note_audit(super::audit::AuditEntry {
                    at_ms: now,
                    actor: note.actor,
                    action: note.action,
                    target: note.target,
                    outcome: note.outcome,
                });
                Response::Done
            }
        }
    }

    /// Who may do what.
    pub fn access(&self) -> &super::access::AccessRules {
        &self.access
    }

    /// What was done to give capacity back, oldest first (see `capacity_actions`).
    pub fn capacity_actions(&self) -> &[super::job_record::JobEvent] {
        &self.capacity_actions
    }

    pub(super) fn note_capacity_action(&mut self, at_ms: u64, what: String) {
        if self.capacity_actions.len() >= CAPACITY_ACTIONS_KEPT {
            self.capacity_actions.remove(0);
        }
        self.capacity_actions
            .push(super::job_record::JobEvent { at_ms, what });
    }

    /// The revision workers see for applied index `applied_index` (see `revision_base`).
    pub fn revision(&self, applied_index: u64) -> u64 {
        self.revision_base.saturating_add(applied_index)
    }

    fn apply_restore(
        &mut self,
        now: u64,
        backup: ClusterStore,
        backup_revision: u64,
        events: &mut Vec<Event>,
    ) -> Response {
        if !self.nodes.is_empty() || !self.jobs.is_empty() {
            return Response::Rejected(super::command::Rejection::NotEmpty {
                nodes: self.nodes.len(),
                jobs: self.jobs.len(),
            });
        }
        // Checked here too, not only where the backup came in: this is a log entry, and a state
        // that contradicts itself would panic every replica that applies it, at every restart.
        if let Err(e) = backup.check_consistency() {
            return Response::Rejected(super::command::Rejection::InvalidBackup(e));
        }
        let trail = std::mem::take(&mut self.audit);
        *self = backup;
        // The backup's trail, then what this cluster recorded before the restore.
        let backup_trail = std::mem::take(&mut self.audit);
        self.audit = trail.after(backup_trail, self.limits.max_audit_entries);
        self.now_ms = self.now_ms.max(now);
        self.next_epoch = self.next_epoch.saturating_add(RESTORE_JUMP);
        self.revision_base = backup_revision.saturating_add(RESTORE_JUMP);
        self.reservations.clear();
        self.end_jobs_without_secrets(now, events);
        let leased: Vec<JobId> = self.jobs.running().map(|j| j.id.clone()).collect();
        for job in leased {
            self.revoke_lease(
                now,
                &job,
                JobState::Pending,
                "restored from a backup: leases from before it are not trusted; re-queued from the last checkpoint"
                    .to_owned(),
                events,
            );
        }
        for node in self.nodes.keys() {
            events.push(Event::AllocationsChanged(node.clone()));
        }
        events.push(Event::SchedulingNeeded);
        Response::Done
    }

    /// A backup holds no secret values (see `gangway_proto::secret`): a job it restores that has
    /// not ended and has `[secret_env]` would run without them, so it is cancelled, saying why.
    fn end_jobs_without_secrets(&mut self, now: u64, events: &mut Vec<Event>) {
        let bereft: Vec<JobId> = self
            .jobs
            .map()
            .values()
            .filter(|j| !j.state.is_terminal())
            .filter(|j| j.spec.secret_env.values().any(|s| s.is_withheld()))
            .map(|j| j.id.clone())
            .collect();
        for job in bereft {
            self.apply_cancel_job(
                now,
                job,
                "restored from a backup, which holds no secret values: submit the job again with its [secret_env]".to_owned(),
                events,
            );
        }
        self.jobs.reindex();
    }

    /// Device-hours idle reclamation has given back so far (see `reclaimed_device_ms`).
    pub fn reclaimed_device_hours(&self) -> f64 {
        self.reclaimed_device_ms as f64 / 3_600_000.0
    }

    /// Ends the accounting of a reclaimed lease (the job runs again or ended): credits its devices
    /// for the time they were free.
    pub(super) fn settle_reclaimed(&mut self, job: &JobId, now: u64) {
        if let Some(r) = self.jobs.get_mut(job).and_then(|j| j.reclaimed.take()) {
            let device_ms = u128::from(r.milli) * u128::from(now.saturating_sub(r.at_ms)) / 1000;
            self.reclaimed_device_ms = self
                .reclaimed_device_ms
                .saturating_add(u64::try_from(device_ms).unwrap_or(u64::MAX));
        }
    }

    /// Serialises the whole state (ordered maps, so equal states give equal bytes).
    pub fn to_snapshot(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    pub fn from_snapshot(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    pub fn engine(&self) -> &ClusterState {
        &self.engine
    }

    pub fn nodes(&self) -> &BTreeMap<HostName, NodeRecord> {
        &self.nodes
    }

    pub fn jobs(&self) -> &BTreeMap<JobId, JobRecord> {
        self.jobs.map()
    }

    /// The jobs with their indexes (pending in queue order, running, migrating).
    pub fn job_table(&self) -> &super::job_table::JobTable {
        &self.jobs
    }

    pub fn job(&self, id: &JobId) -> Option<&JobRecord> {
        self.jobs.get(id)
    }

    pub fn queues(&self) -> &BTreeMap<QueueName, QueueConfig> {
        &self.queues
    }

    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Newest lease epoch granted on each device of a host (0: never leased).
    pub fn device_epochs(&self, node: &HostName) -> Option<&[u64]> {
        self.device_epochs.get(node).map(Vec::as_slice)
    }

    /// The gangs waiting for placement, oldest first (see [`ClusterStore::round_input`]).
    pub fn pending_gangs(&self) -> Vec<GangRequest> {
        self.round_input(false).pending.into_owned()
    }

    /// Hosts reserved for gangs other than `job` (live reservations only).
    pub fn reserved_against(&self, job: &JobId) -> std::collections::BTreeSet<HostName> {
        self.reservations()
            .filter(|(j, _)| *j != job)
            .flat_map(|(_, hosts)| hosts.iter().cloned())
            .collect()
    }

    /// Live reservations with their deadlines (log time).
    pub fn reservations_until(
        &self,
    ) -> impl Iterator<Item = (&JobId, &std::collections::BTreeSet<HostName>, u64)> {
        let now = self.now_ms;
        self.reservations
            .iter()
            .filter(move |(_, (_, until))| *until > now)
            .map(|(j, (h, u))| (j, h, *u))
    }

    /// Live reservations: job -> hosts held for it.
    pub fn reservations(
        &self,
    ) -> impl Iterator<Item = (&JobId, &std::collections::BTreeSet<HostName>)> {
        self.reservations_until().map(|(j, h, _)| (j, h))
    }

    /// The engine configuration with this cluster's queues filled in.
    pub fn scheduler_config(&self, base: &SchedulerConfig) -> SchedulerConfig {
        let mut config = base.clone();
        config.queues = self.queues.clone();
        config
    }

    /// Migrations (moves, preemptions, idle reclaims) whose checkpoint has not been answered
    /// by `now_ms`, past twice the job's checkpoint timeout plus `MIGRATION_SLACK_MS`: the worker
    /// reports a failed checkpoint at its timeout, so silence this long means the answer was lost
    /// (an agent restarted mid-checkpoint). Each as the `CheckpointFailed` the leader commits: a
    /// move is aborted, a preemption or reclaim stops the job anyway.
    pub fn overdue_migrations(&self, now_ms: u64) -> Vec<Command> {
        self.jobs
            .migrating()
            .filter_map(|j| {
                let m = j.migration.as_ref()?;
                let lease = j.lease.as_ref()?;
                let timeout = j.spec.checkpoint.as_ref().map_or(0, |c| {
                    u64::try_from(c.timeout.as_millis()).unwrap_or(u64::MAX)
                });
                let deadline = m
                    .requested_at_ms
                    .saturating_add(timeout.saturating_mul(2))
                    .saturating_add(MIGRATION_SLACK_MS);
                (now_ms > deadline).then(|| {
                    Command::CheckpointFailed(CheckpointFailure {
                        job: j.id.clone(),
                        epoch: lease.epoch,
                        request: m.checkpoint_request,
                        error: format!(
                            "no answer to checkpoint request {} within {}",
                            m.checkpoint_request,
                            humantime::format_duration(std::time::Duration::from_millis(
                                deadline - m.requested_at_ms
                            ))
                        ),
                    })
                })
            })
            .collect()
    }

    /// The drains past their deadline with work still on their node: the commands that stop it.
    pub fn overdue_drains(&self, now_ms: u64) -> Vec<Command> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.state == NodeState::Draining)
            .filter(|(_, n)| n.drain_deadline_ms.is_some_and(|d| now_ms >= d))
            .filter(|(name, _)| !self.node_is_empty(name))
            .map(|(name, _)| Command::DrainDeadline { node: name.clone() })
            .collect()
    }

    /// Whether a node holds no lease (a drain is complete once it does not).
    pub fn node_is_empty(&self, node: &HostName) -> bool {
        self.jobs.on_node(node).next().is_none()
    }

    /// Everything a node's worker should run now.
    pub fn allocations_for(&self, node: &HostName) -> Vec<Allocation> {
        let mut out = Vec::new();
        let inventory = self.nodes.get(node).map(|n| &n.registration.devices);
        // What the node holds, from the leases-by-node index: costs what the node runs.
        for job in self.jobs.on_node(node) {
            let Some(lease) = &job.lease else { continue };
            // Ranks of this job that this node should run (a finished rank never runs again).
            let mine: Vec<(usize, &crate::engine::TaskPlacement)> = lease
                .placement
                .tasks
                .iter()
                .enumerate()
                .filter(|(rank, t)| {
                    &t.host == node && !job.tasks.get(*rank).is_some_and(|r| r.state.is_terminal())
                })
                .collect();
            if mine.is_empty() {
                continue;
            }
            let master_addr = lease
                .placement
                .tasks
                .first()
                .and_then(|t| self.nodes.get(&t.host))
                .map(|n| {
                    let host = n
                        .registration
                        .address
                        .rsplit_once(':')
                        .map_or(n.registration.address.as_str(), |(h, _)| h);
                    format!(
                        "{host}:{}",
                        MASTER_PORT_BASE + lease.epoch % MASTER_PORT_SPAN
                    )
                })
                .unwrap_or_default();
            for (rank, task) in mine {
                let devices = task
                    .devices
                    .iter()
                    .map(|d| {
                        let uuid = inventory
                            .and_then(|inv| inv.get(usize::from(d.index)))
                            .map(|i| i.uuid.clone())
                            .unwrap_or_default();
                        (d.index, uuid, d.milli)
                    })
                    .collect();
                out.push(Allocation {
                    job: job.id.clone(),
                    task: rank as u32,
                    task_count: job.spec.tasks,
                    epoch: lease.epoch,
                    devices,
                    command: job.spec.command.clone(),
                    env: job.spec.env.clone(),
                    secret_env: job.spec.secret_env.clone(),
                    master_addr: master_addr.clone(),
                    checkpoint: job.spec.checkpoint.clone(),
                    restore_from: job.restore_from().map(str::to_owned),
                    checkpoint_request: job.checkpoint_requests,
                    checkpoint_request_at_grant: lease.checkpoint_requests_at_grant,
                });
            }
        }
        out
    }
}
