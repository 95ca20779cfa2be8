//! Apply functions for job commands: submit, cancel, task reports, checkpoints.

use super::command::{
    CheckpointFailure, CheckpointReport, DefragOrder, Event, IdleReport, Rejection, Response,
    Submission, TaskReport, TaskState,
};
use super::job_record::{CheckpointRecord, JobRecord, JobState, Migration, Reclaimed};
use super::store::ClusterStore;
use crate::engine::{join_hosts, HostFilter, IdleAction, PendingReason};
use gangway_proto::ids::{JobId, QueueName};

use gangway_proto::spec::MAX_TASKS;

impl ClusterStore {
    pub(super) fn apply_submit_job(
        &mut self,
        now: u64,
        submission: Submission,
        events: &mut Vec<Event>,
    ) -> Response {
        let Submission {
            idempotency_key,
            spec,
        } = submission;
        if let Some(existing) = idempotency_key
            .as_ref()
            .and_then(|k| self.idempotency.get(k))
        {
            return Response::Submitted {
                job: existing.clone(),
                existing: true,
            };
        }
        // The edge validated the spec; apply re-checks what would break the state if a bad spec
        // reached the log anyway, and rejects it identically on every replica.
        if spec.tasks == 0 || spec.tasks > MAX_TASKS || spec.command.is_empty() {
            return Response::Rejected(Rejection::InvalidJob(format!(
                "tasks must be 1..={MAX_TASKS} and command non-empty"
            )));
        }
        let id = JobId::new(format!("{}-{}", spec.name, self.next_job_seq));
        self.next_job_seq += 1;
        if let Some(key) = idempotency_key {
            self.idempotency.insert(key, id.clone());
        }
        self.jobs.insert(JobRecord::new(id.clone(), spec, now));
        events.push(Event::JobChanged(id.clone()));
        events.push(Event::SchedulingNeeded);
        Response::Submitted {
            job: id,
            existing: false,
        }
    }

    pub(super) fn apply_cancel_job(
        &mut self,
        now: u64,
        job: JobId,
        reason: String,
        events: &mut Vec<Event>,
    ) -> Response {
        let Some(record) = self.jobs.get_mut(&job) else {
            return Response::Rejected(Rejection::UnknownJob(job));
        };
        match record.state {
            JobState::Cancelled => Response::Done,
            JobState::Succeeded | JobState::Failed => {
                Response::Rejected(Rejection::WrongJobState {
                    job,
                    state: record.state.to_string(),
                    why: "it has already ended".to_owned(),
                })
            }
            JobState::Pending => {
                self.reservations.remove(&job);
                self.settle_reclaimed(&job, now);
                let Some(record) = self.jobs.get_mut(&job) else {
                    return Response::Rejected(Rejection::UnknownJob(job));
                };
                record.state = JobState::Cancelled;
                record.pending_reason = None;
                record.finished_at_ms = Some(now);
                record.note(now, format!("cancelled: {reason}"));
                events.push(Event::JobChanged(job));
                Response::Done
            }
            JobState::Running => {
                self.revoke_lease(
                    now,
                    &job,
                    JobState::Cancelled,
                    format!("cancelled: {reason}"),
                    events,
                );
                Response::Done
            }
        }
    }

    pub(super) fn apply_task_status(
        &mut self,
        now: u64,
        report: TaskReport,
        events: &mut Vec<Event>,
    ) -> Response {
        let TaskReport {
            job,
            task,
            epoch,
            state,
            exit_code,
            message,
        } = report;
        let Some(record) = self.jobs.get_mut(&job) else {
            return Response::Rejected(Rejection::UnknownJob(job));
        };
        if let Some(stale) = record.stale_lease(epoch) {
            // A retried report of a completion the cluster already recorded is not an error: the
            // worker keeps retrying until someone acknowledges it.
            if record.last_epoch == Some(epoch) && state.is_terminal() && record.state.is_terminal()
            {
                return Response::Done;
            }
            return Response::Rejected(stale);
        }
        let Some(t) = record.tasks.get_mut(task as usize) else {
            return Response::Rejected(Rejection::UnknownTask { job, task });
        };
        // A task that ended never changes again, and Running never goes back to Assigned.
        if t.state.is_terminal() || state <= t.state {
            return Response::Done;
        }
        t.state = state;
        t.exit_code = exit_code;
        t.message = message.clone();
        record.note(
            now,
            format!("task {task} {state:?} {message}")
                .trim_end()
                .to_owned(),
        );
        events.push(Event::JobChanged(job.clone()));
        if state == TaskState::Lost {
            self.revoke_lease(
                now,
                &job,
                JobState::Pending,
                format!("task {task} lost ({message}); re-queued from its last checkpoint"),
                events,
            );
        } else if state == TaskState::Failed {
            // One rank failing fails the gang: the other ranks cannot make progress without it.
            let why = match exit_code {
                Some(code) => format!("task {task} failed with exit code {code}: {message}"),
                None => format!("task {task} failed: {message}"),
            };
            self.revoke_lease(now, &job, JobState::Failed, why, events);
        } else if record.tasks.iter().all(|t| t.state == TaskState::Succeeded) {
            self.revoke_lease(
                now,
                &job,
                JobState::Succeeded,
                "all tasks succeeded".to_owned(),
                events,
            );
        }
        Response::Done
    }

    pub(super) fn apply_record_checkpoint(
        &mut self,
        now: u64,
        report: CheckpointReport,
        events: &mut Vec<Event>,
    ) -> Response {
        let CheckpointReport {
            job,
            epoch,
            request,
            manifest,
        } = report;
        let Some(record) = self.jobs.get_mut(&job) else {
            return Response::Rejected(Rejection::UnknownJob(job));
        };
        let newest = record.lease.as_ref().map(|l| l.epoch).or(record.last_epoch);
        if newest != Some(epoch) {
            return Response::Rejected(Rejection::StaleEpoch {
                job,
                got: epoch,
                current: newest.unwrap_or(0),
            });
        }
        // Checkpoints only move forward: a late report of an older step never replaces a newer one.
        let newer = record
            .last_checkpoint
            .as_ref()
            .is_none_or(|c| c.manifest.step < manifest.step);
        let step = manifest.step;
        if newer {
            record.note(
                now,
                format!("checkpoint at step {step} ({})", manifest.path),
            );
            record.last_checkpoint = Some(CheckpointRecord {
                epoch,
                manifest,
                recorded_at_ms: now,
            });
            events.push(Event::JobChanged(job.clone()));
        }
        // The checkpoint a migration waits for: the job stops here and is placed again elsewhere.
        let migrating = record.lease.as_ref().is_some_and(|l| l.epoch == epoch)
            && record
                .migration
                .as_ref()
                .is_some_and(|m| request >= m.checkpoint_request);
        if migrating {
            let (mut preempted_for, mut idle_reclaim) = (None, None);
            if let Some(m) = record.migration.take() {
                record.next_hosts = m.hosts;
                preempted_for = m.preempted_for;
                idle_reclaim = m.idle_reclaim;
            }
            let step = record
                .last_checkpoint
                .as_ref()
                .map_or(step, |c| c.manifest.step);
            let why = match (preempted_for, idle_reclaim) {
                (Some(p), _) => {
                    format!("preempted for job {p}: checkpointed at step {step}; re-queued")
                }
                (None, Some(idle)) => {
                    self.mark_reclaimed(now, &job);
                    format!(
                        "{idle}: checkpointed at step {step}; re-queued behind the jobs waiting"
                    )
                }
                (None, None) => format!("migrating: checkpointed at step {step}; placing it again"),
            };
            self.revoke_lease(now, &job, JobState::Pending, why, events);
        }
        Response::Done
    }

    /// Books an idle reclaim about to end `job`'s lease: counted, queued again from now, and its
    /// devices credited as given back until it runs again.
    fn mark_reclaimed(&mut self, now: u64, job: &JobId) {
        if let Some(record) = self.jobs.get_mut(job) {
            let milli = record.lease.as_ref().map_or(0, |l| {
                l.placement
                    .tasks
                    .iter()
                    .flat_map(|t| &t.devices)
                    .map(|d| u64::from(d.milli))
                    .sum()
            });
            record.reclaims += 1;
            record.reclaimed = Some(Reclaimed { at_ms: now, milli });
        }
    }

    /// The leader saw the lease idle for `idle_ms`. Re-checked here against the lease and the
    /// queue's policy as they are now, then reclaimed or reported as the policy says.
    pub(super) fn apply_idle_lease(
        &mut self,
        now: u64,
        report: IdleReport,
        events: &mut Vec<Event>,
    ) -> Response {
        let IdleReport {
            job,
            epoch,
            idle_ms,
        } = report;
        let Some(record) = self.jobs.get(&job) else {
            return Response::Rejected(Rejection::UnknownJob(job));
        };
        if let Some(stale) = record.stale_lease(epoch) {
            return Response::Rejected(stale);
        }
        let refuse = |why: &str| {
            Response::Rejected(Rejection::WrongJobState {
                job: job.clone(),
                state: record.state.to_string(),
                why: why.to_owned(),
            })
        };
        if record.state != JobState::Running || record.lease.is_none() {
            return refuse("only a running job's lease can be idle");
        }
        let queue = QueueName::new(record.spec.queue.clone());
        let Some(policy) = self.queues.get(&queue).and_then(|q| q.idle) else {
            return refuse("its queue has no idle policy");
        };
        if idle_ms < policy.window_ms {
            return refuse("idle for less than its queue's window");
        }
        if record.migration.is_some() {
            return refuse("a migration is already waiting for its checkpoint");
        }
        let seen = format!(
            "every device below {}% for {} (queue {queue}: {})",
            policy.threshold_pct,
            humantime::format_duration(std::time::Duration::from_millis(idle_ms / 1000 * 1000)),
            policy.describe()
        );
        let idle = format!("idle lease reclaimed: {seen}");
        match (policy.action, record.spec.checkpoint.is_some()) {
            (IdleAction::Report, _) => {
                if record.idle_reported_epoch == Some(epoch) {
                    return Response::Done;
                }
                let Some(record) = self.jobs.get_mut(&job) else {
                    return Response::Rejected(Rejection::UnknownJob(job));
                };
                record.idle_reported_epoch = Some(epoch);
                record.note(now, format!("idle, reported only: {seen}"));
                self.note_capacity_action(now, format!("idle lease of {job} reported: {seen}"));
                events.push(Event::JobChanged(job));
            }
            (IdleAction::Reclaim, true) => {
                let Some(record) = self.jobs.get_mut(&job) else {
                    return Response::Rejected(Rejection::UnknownJob(job));
                };
                record.note(now, format!("{idle}; checkpointing, then stopping"));
                let action = format!("{job}: {idle}; checkpointing");
                record.migration = Some(Migration {
                    checkpoint_request: record.checkpoint_requests + 1,
                    hosts: HostFilter::default(),
                    requested_at_ms: now,
                    preempted_for: None,
                    idle_reclaim: Some(idle),
                });
                self.note_capacity_action(now, action);
                self.request_checkpoint(&job, events);
            }
            (IdleAction::Reclaim, false) => {
                self.note_capacity_action(now, format!("{job}: {idle}; released"));
                self.mark_reclaimed(now, &job);
                self.revoke_lease(
                    now,
                    &job,
                    JobState::Pending,
                    format!("{idle}; it cannot checkpoint, so it starts over; re-queued behind the jobs waiting"),
                    events,
                );
            }
        }
        Response::Done
    }

    pub(super) fn apply_checkpoint_failed(
        &mut self,
        now: u64,
        failure: CheckpointFailure,
        events: &mut Vec<Event>,
    ) -> Response {
        let CheckpointFailure {
            job,
            epoch,
            request,
            error,
        } = failure;
        let Some(record) = self.jobs.get_mut(&job) else {
            return Response::Rejected(Rejection::UnknownJob(job));
        };
        if let Some(stale) = record.stale_lease(epoch) {
            return Response::Rejected(stale);
        }
        // The migration this failure answers, if any (retries of the same report change nothing).
        let failed = record
            .migration
            .as_ref()
            .filter(|m| request >= m.checkpoint_request)
            .map(|m| (m.preempted_for.clone(), m.idle_reclaim.clone()));
        // A preemption or an idle reclaim happens anyway: the work since the last checkpoint is
        // lost. A plain move is aborted.
        let stop_anyway = match &failed {
            Some((_, Some(idle))) => {
                self.mark_reclaimed(now, &job);
                Some(idle.clone())
            }
            Some((Some(p), None)) => Some(format!("preempted for job {p}")),
            _ => None,
        };
        if let Some(why) = stop_anyway {
            self.revoke_lease(
                now,
                &job,
                JobState::Pending,
                format!("{why}; checkpoint failed ({error}), stopped anyway; re-queued from the last checkpoint"),
                events,
            );
        } else if let Some(record) = self.jobs.get_mut(&job) {
            if failed.is_some() {
                record.migration = None;
                record.note(
                    now,
                    format!(
                        "migration aborted, the job keeps running here: checkpoint failed: {error}"
                    ),
                );
                events.push(Event::JobChanged(job));
            } else if !record
                .history
                .last()
                .is_some_and(|h| h.what.ends_with(&error))
            {
                record.note(now, format!("checkpoint request {request} failed: {error}"));
                events.push(Event::JobChanged(job));
            }
        }
        Response::Done
    }

    /// Why a job cannot be checkpointed now, if it cannot.
    fn refuse_checkpoint(record: &JobRecord) -> Option<Rejection> {
        let why = if record.state != JobState::Running || record.lease.is_none() {
            "only a running job can be checkpointed or migrated"
        } else if record.spec.checkpoint.is_none() {
            "its spec has no [checkpoint] section, so it cannot checkpoint"
        } else {
            return None;
        };
        Some(Rejection::WrongJobState {
            job: record.id.clone(),
            state: record.state.to_string(),
            why: why.to_owned(),
        })
    }

    /// Bumps the job's checkpoint request number; its workers see it in their allocations.
    pub(super) fn request_checkpoint(&mut self, job: &JobId, events: &mut Vec<Event>) -> u64 {
        let Some(record) = self.jobs.get_mut(job) else {
            return 0;
        };
        record.checkpoint_requests += 1;
        if let Some(lease) = &record.lease {
            for t in &lease.placement.tasks {
                events.push(Event::AllocationsChanged(t.host.clone()));
            }
        }
        events.push(Event::JobChanged(job.clone()));
        record.checkpoint_requests
    }

    pub(super) fn apply_request_checkpoint(
        &mut self,
        now: u64,
        job: JobId,
        reason: String,
        events: &mut Vec<Event>,
    ) -> Response {
        let Some(record) = self.jobs.get_mut(&job) else {
            return Response::Rejected(Rejection::UnknownJob(job));
        };
        if let Some(refusal) = Self::refuse_checkpoint(record) {
            return Response::Rejected(refusal);
        }
        record.note(
            now,
            format!("checkpoint requested: {reason}")
                .trim_end_matches(": ")
                .to_owned(),
        );
        self.request_checkpoint(&job, events);
        Response::Done
    }

    pub(super) fn apply_migrate_job(
        &mut self,
        now: u64,
        job: JobId,
        mut hosts: HostFilter,
        events: &mut Vec<Event>,
    ) -> Response {
        if let Some(unknown) = hosts
            .only
            .iter()
            .chain(&hosts.avoid)
            .find(|h| !self.nodes.contains_key(*h))
        {
            return Response::Rejected(Rejection::UnknownNode(unknown.clone()));
        }
        let Some(record) = self.jobs.get_mut(&job) else {
            return Response::Rejected(Rejection::UnknownJob(job));
        };
        if let Some(refusal) = Self::refuse_checkpoint(record) {
            return Response::Rejected(refusal);
        }
        if record.migration.is_some() {
            return Response::Rejected(Rejection::WrongJobState {
                job,
                state: record.state.to_string(),
                why: "a migration is already waiting for its checkpoint".to_owned(),
            });
        }
        // A move with no destination leaves the hosts the job runs on.
        if hosts.only.is_empty() && hosts.avoid.is_empty() {
            if let Some(lease) = &record.lease {
                hosts.avoid = lease
                    .placement
                    .tasks
                    .iter()
                    .map(|t| t.host.clone())
                    .collect();
            }
        }
        record.note(
            now,
            format!(
                "migration requested ({}); checkpointing first",
                hosts.describe()
            ),
        );
        record.migration = Some(Migration {
            checkpoint_request: record.checkpoint_requests + 1,
            hosts,
            requested_at_ms: now,
            preempted_for: None,
            idle_reclaim: None,
        });
        self.request_checkpoint(&job, events);
        Response::Done
    }

    /// The defragmenter's plan, checked whole before anything changes: the waiting job is still
    /// pending, every moved job still runs under the epoch the plan saw and may checkpoint, and no
    /// migration of it is under way. Then each moved job starts a migration (checkpoint, stop, place
    /// again anywhere off the reserved hosts) and `hosts` are held for the waiting job.
    pub(super) fn apply_defragment(
        &mut self,
        now: u64,
        order: DefragOrder,
        events: &mut Vec<Event>,
    ) -> Response {
        let DefragOrder {
            for_job,
            hosts,
            moves,
            until_ms,
        } = order;
        self.reservations.retain(|_, (_, until)| *until > now);
        let Some(waiting) = self.jobs.get(&for_job) else {
            return Response::Rejected(Rejection::UnknownJob(for_job));
        };
        if waiting.state != JobState::Pending {
            return Response::Rejected(Rejection::WrongJobState {
                job: for_job,
                state: waiting.state.to_string(),
                why: "defragmentation makes room for a waiting job only".to_owned(),
            });
        }
        if moves.is_empty() || hosts.is_empty() || until_ms <= now {
            return Response::Rejected(Rejection::InvalidJob(
                "a defragmentation plan needs moves, hosts and a future deadline".to_owned(),
            ));
        }
        if let Some(h) = hosts
            .iter()
            .chain(moves.iter().flat_map(|m| m.to.iter()))
            .find(|h| !self.nodes.contains_key(*h))
        {
            return Response::Rejected(Rejection::UnknownNode(h.clone()));
        }
        for m in &moves {
            let Some(record) = self.jobs.get(&m.job) else {
                return Response::Rejected(Rejection::UnknownJob(m.job.clone()));
            };
            if let Some(stale) = record.stale_lease(m.epoch) {
                return Response::Rejected(stale);
            }
            if let Some(refusal) = Self::refuse_checkpoint(record) {
                return Response::Rejected(refusal);
            }
            if record.migration.is_some() {
                return Response::Rejected(Rejection::WrongJobState {
                    job: m.job.clone(),
                    state: record.state.to_string(),
                    why: "a migration is already waiting for its checkpoint".to_owned(),
                });
            }
        }
        for m in &moves {
            if let Some(record) = self.jobs.get_mut(&m.job) {
                record.note(
                    now,
                    format!(
                        "migrating to make room for {for_job} (defragmentation; planned onto {})",
                        join_hosts(&m.to)
                    ),
                );
                record.migration = Some(Migration {
                    checkpoint_request: record.checkpoint_requests + 1,
                    // Anywhere but the reserved hosts, which the reservation keeps it off.
                    hosts: HostFilter::default(),
                    requested_at_ms: now,
                    preempted_for: None,
                    idle_reclaim: None,
                });
            }
            self.request_checkpoint(&m.job, events);
        }
        if let Some(waiting) = self.jobs.get_mut(&for_job) {
            waiting.note(
                now,
                format!(
                    "defragmentation: {} gang(s) migrating to free {}, held for this job",
                    moves.len(),
                    join_hosts(&hosts)
                ),
            );
        }
        let moved: Vec<String> = moves.iter().map(|m| m.job.to_string()).collect();
        self.note_capacity_action(
            now,
            format!(
                "defragmentation: migrating {} to free {} for {for_job}",
                moved.join(", "),
                join_hosts(&hosts)
            ),
        );
        self.reservations.insert(for_job.clone(), (hosts, until_ms));
        events.push(Event::JobChanged(for_job));
        events.push(Event::SchedulingNeeded);
        Response::Done
    }

    /// Ends the job's lease: frees its devices, and moves the job to `next` (Pending to re-queue it,
    /// or a terminal state). Does nothing for a job without a lease.
    pub(super) fn revoke_lease(
        &mut self,
        now: u64,
        job: &JobId,
        next: JobState,
        why: String,
        events: &mut Vec<Event>,
    ) {
        let Some(record) = self.jobs.get_mut(job) else {
            return;
        };
        let Some(lease) = record.lease.take() else {
            return;
        };
        // Whatever ends the lease also ends a migration that waited on it.
        record.migration = None;
        record.last_hosts = lease
            .placement
            .tasks
            .iter()
            .map(|t| t.host.clone())
            .collect();
        self.engine.release(job);
        for t in &lease.placement.tasks {
            events.push(Event::AllocationsChanged(t.host.clone()));
        }
        record.state = next;
        record.tasks.clear();
        if next == JobState::Pending {
            record.pending_reason = Some(PendingReason::Requeued { why: why.clone() });
        } else {
            record.pending_reason = None;
            record.finished_at_ms = Some(now);
        }
        record.note(now, why);
        events.push(Event::JobChanged(job.clone()));
        events.push(Event::SchedulingNeeded);
    }
}
