//! Apply functions for job commands: submit, cancel, task reports, checkpoints, migrations.

use super::command::{
    CheckpointFailure, CheckpointReport, DefragOrder, Event, IdleReport, Rejection, Response,
    Submission, SubmittedJob, TaskReport, TaskState, MAX_BATCH_JOBS, MAX_BATCH_REPORTS,
};
use super::job_record::{JobRecord, JobState, MigrationReason, RunCause};
use super::store::ClusterStore;
use crate::engine::{join_hosts, HostFilter, IdleAction};
use gangway_proto::ids::{JobId, QueueName};

use gangway_proto::spec::{JobSpec, MAX_TASKS};
use std::collections::{BTreeMap, BTreeSet};
use Rejection::InvalidJob;

/// What in a spec would break the state if it reached the log: the edge validated it; apply
/// re-checks and refuses it identically on every replica.
fn unappliable(spec: &JobSpec) -> Option<Rejection> {
    (spec.tasks == 0 || spec.tasks > MAX_TASKS || spec.command.is_empty()).then(|| {
        InvalidJob(format!(
            "tasks must be 1..={MAX_TASKS} and command non-empty"
        ))
    })
}

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
            owner,
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
        if let Some(refusal) = unappliable(&spec) {
            return Response::Rejected(refusal);
        }
        if let Some(refusal) = self.refuse_full_queue(&spec.queue, 1) {
            return Response::Rejected(refusal);
        }
        Response::Submitted {
            job: self.create_job(now, idempotency_key, spec, owner, events),
            existing: false,
        }
    }

    /// A batch: every job is checked (its spec, its queue's room for all the batch adds there)
    /// before the first is created, so a refused batch leaves nothing behind.
    pub(super) fn apply_submit_jobs(
        &mut self,
        now: u64,
        batch: Vec<Submission>,
        events: &mut Vec<Event>,
    ) -> Response {
        if batch.is_empty() || batch.len() > MAX_BATCH_JOBS {
            return Response::Rejected(Rejection::InvalidJob(format!(
                "a batch holds 1..={MAX_BATCH_JOBS} jobs, got {}",
                batch.len()
            )));
        }
        let mut adding: BTreeMap<&str, usize> = BTreeMap::new();
        let mut keys = BTreeSet::new();
        for (i, s) in batch.iter().enumerate() {
            if let Some(InvalidJob(why)) = unappliable(&s.spec) {
                return Response::Rejected(InvalidJob(format!("jobs[{i}]: {why}")));
            }
            let seen = s
                .idempotency_key
                .as_ref()
                .is_some_and(|k| self.idempotency.contains_key(k) || !keys.insert(k.as_str()));
            if !seen {
                *adding.entry(s.spec.queue.as_str()).or_default() += 1;
            }
        }
        if let Some(refusal) = adding
            .iter()
            .find_map(|(queue, n)| self.refuse_full_queue(queue, *n))
        {
            return Response::Rejected(refusal);
        }
        let mut jobs = Vec::with_capacity(batch.len());
        for Submission {
            idempotency_key,
            spec,
            owner,
        } in batch
        {
            let known = idempotency_key
                .as_ref()
                .and_then(|k| self.idempotency.get(k));
            jobs.push(match known {
                Some(job) => SubmittedJob {
                    job: job.clone(),
                    existing: true,
                },
                None => SubmittedJob {
                    job: self.create_job(now, idempotency_key, spec, owner, events),
                    existing: false,
                },
            });
        }
        Response::SubmittedJobs(jobs)
    }

    fn create_job(
        &mut self,
        now: u64,
        idempotency_key: Option<String>,
        spec: JobSpec,
        owner: String,
        events: &mut Vec<Event>,
    ) -> JobId {
        let id = JobId::new(format!("{}-{}", spec.name, self.next_job_seq));
        self.next_job_seq += 1;
        if let Some(key) = idempotency_key {
            self.remember_key(key, id.clone(), now);
        }
        let mut job = JobRecord::new(id.clone(), spec, now);
        job.owner = owner;
        self.jobs.insert(job);
        events.push(Event::JobChanged(id.clone()));
        events.push(Event::SchedulingNeeded);
        id
    }

    pub(super) fn apply_cancel_job(
        &mut self,
        now: u64,
        job: JobId,
        reason: String,
        events: &mut Vec<Event>,
    ) -> Response {
        let Some(record) = self.jobs.get(&job) else {
            return Response::Rejected(Rejection::UnknownJob(job));
        };
        match record.state {
            JobState::Cancelled => Response::Done,
            JobState::Succeeded | JobState::Failed => {
                Response::Rejected(record.wrong_state("it has already ended"))
            }
            JobState::Pending => {
                self.reservations.remove(&job);
                self.settle_reclaimed(&job, now);
                if let Some(record) = self.jobs.get_mut(&job) {
                    record.cancel_waiting(now, &reason);
                }
                events.push(Event::JobChanged(job));
                Response::Done
            }
            JobState::Running => {
                let why = format!("cancelled: {reason}");
                self.revoke_lease(now, &job, JobState::Cancelled, why, events);
                Response::Done
            }
        }
    }

    /// Each report as if alone, in order; a batch larger than [`MAX_BATCH_REPORTS`] is refused
    /// whole (the edge never sends one).
    pub(super) fn apply_task_statuses(
        &mut self,
        now: u64,
        reports: Vec<TaskReport>,
        events: &mut Vec<Event>,
    ) -> Response {
        if reports.len() > MAX_BATCH_REPORTS {
            return Response::Rejected(InvalidJob(format!(
                "a batch holds at most {MAX_BATCH_REPORTS} task reports, got {}",
                reports.len()
            )));
        }
        Response::Each(
            reports
                .into_iter()
                .map(|r| {
                    let response = self.apply_task_status(now, r, events);
                    // Indexes are rebuilt between reports, as between entries.
                    self.jobs.reindex();
                    response
                })
                .collect(),
        )
    }

    pub(super) fn apply_task_status(
        &mut self,
        now: u64,
        report: TaskReport,
        events: &mut Vec<Event>,
    ) -> Response {
        let job = &report.job;
        let record = match self.jobs.leased_mut(job, report.epoch) {
            Ok(record) => record,
            Err(refusal) => {
                // A retried report of a completion the cluster already recorded is not an error:
                // the worker keeps retrying until someone acknowledges it.
                let repeated = self
                    .jobs
                    .get(job)
                    .is_some_and(|j| j.repeats_completion(&report));
                return if repeated {
                    Response::Done
                } else {
                    Response::Rejected(refusal)
                };
            }
        };
        match record.record_task(now, &report) {
            Ok(true) => {}
            Ok(false) => return Response::Done,
            Err(refusal) => return Response::Rejected(refusal),
        }
        let outcome = record.gang_outcome(&report);
        events.push(Event::JobChanged(job.clone()));
        if let Some((next, why)) = outcome {
            let (next, cause, why) = self.failure_verdict(now, job, &report, next, why);
            self.revoke_lease_as(now, job, next, Some(cause), why, events);
        }
        Response::Done
    }

    /// What a gang's end becomes under the failure semantics. A lost rank, or a failed rank whose
    /// devices are fenced (its hardware failed under it), is an infrastructure failure: the gang
    /// is repaired, never counted against it. A failed rank on healthy hardware is the
    /// application's: restarted from the last checkpoint after the backoff while the job's
    /// restart policy allows, failed otherwise.
    fn failure_verdict(
        &mut self,
        now: u64,
        job: &JobId,
        report: &TaskReport,
        next: JobState,
        why: String,
    ) -> (JobState, RunCause, String) {
        let infrastructure = report.state == TaskState::Lost
            || (next == JobState::Failed && self.rank_on_fenced_device(job, report.task));
        let Some(record) = self.jobs.get_mut(job) else {
            return (next, RunCause::of(next), why);
        };
        if infrastructure {
            record.mark_repair();
            let why = if report.state == TaskState::Lost {
                why
            } else {
                format!(
                    "{why}; its device is fenced, so the gang is repaired from its last checkpoint"
                )
            };
            return (JobState::Pending, RunCause::Infrastructure, why);
        }
        if next != JobState::Failed {
            return (next, RunCause::of(next), why);
        }
        let Some(at) = record.next_restart_at(now) else {
            return (next, RunCause::Application, why);
        };
        record.restarts += 1;
        record.resume.not_before_ms = at;
        let (n, max) = (record.restarts, record.spec.restart.max_restarts);
        let wait = at - now;
        let why = format!(
            "{why}; restart {n} of {max} from the last checkpoint after {wait} ms of backoff"
        );
        (JobState::Pending, RunCause::Application, why)
    }

    /// Whether rank `task` of `job`'s lease holds a fenced device.
    fn rank_on_fenced_device(&self, job: &JobId, task: u32) -> bool {
        let Some(t) = self
            .jobs
            .get(job)
            .and_then(|j| j.lease.as_ref())
            .and_then(|l| l.placement.tasks.get(task as usize))
        else {
            return false;
        };
        let Some(host) = self.engine.host(&t.host) else {
            return false;
        };
        t.devices.iter().any(|d| host.is_fenced(d.index))
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
        let record = match self.jobs.checked_mut(&job, |j| j.stale_report(epoch)) {
            Ok(record) => record,
            Err(refusal) => return Response::Rejected(refusal),
        };
        let step = manifest.step;
        if record.keep_checkpoint(now, epoch, manifest) {
            events.push(Event::JobChanged(job.clone()));
        }
        // The checkpoint a migration waits for: the job stops here and is placed again elsewhere.
        if record.answered_migration(epoch, request).is_none() {
            return Response::Done;
        }
        let step = record
            .last_checkpoint
            .as_ref()
            .map_or(step, |c| c.manifest.step);
        if let Some(reason) = record.stop_for_migration(now) {
            let why = reason.checkpointed(step);
            self.revoke_lease(now, &job, JobState::Pending, why, events);
        }
        Response::Done
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
        let record = match self.jobs.leased(&job, epoch) {
            Ok(record) => record,
            Err(refusal) => return Response::Rejected(refusal),
        };
        let refuse = |why: &str| Response::Rejected(record.wrong_state(why));
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
        if let Some(refusal) = record.refuse_second_migration() {
            return Response::Rejected(refusal);
        }
        let seen = format!(
            "every device below {}% for {} (queue {queue}: {})",
            policy.threshold_pct,
            humantime::format_duration(std::time::Duration::from_millis(idle_ms / 1000 * 1000)),
            policy.describe()
        );
        match (policy.action, record.spec.checkpoint.is_some()) {
            (IdleAction::Report, _) => self.report_idle(now, &job, epoch, seen, events),
            (IdleAction::Reclaim, checkpointable) => {
                let idle = format!("idle lease reclaimed: {seen}");
                self.reclaim_idle(now, &job, idle, checkpointable, events);
            }
        }
        Response::Done
    }

    /// Says once per lease that it sat idle (a `report` policy).
    fn report_idle(
        &mut self,
        now: u64,
        job: &JobId,
        epoch: u64,
        seen: String,
        events: &mut Vec<Event>,
    ) {
        let Some(record) = self.jobs.get_mut(job) else {
            return;
        };
        if record.idle_reported_epoch == Some(epoch) {
            return;
        }
        record.idle_reported_epoch = Some(epoch);
        record.note(now, format!("idle, reported only: {seen}"));
        self.note_capacity_action(now, format!("idle lease of {job} reported: {seen}"));
        events.push(Event::JobChanged(job.clone()));
    }

    /// Takes an idle lease back (a `reclaim` policy): by checkpoint first if the job can, else at
    /// once (it starts over).
    fn reclaim_idle(
        &mut self,
        now: u64,
        job: &JobId,
        idle: String,
        checkpointable: bool,
        events: &mut Vec<Event>,
    ) {
        let Some(record) = self.jobs.get_mut(job) else {
            return;
        };
        if checkpointable {
            record.note(now, format!("{idle}; checkpointing, then stopping"));
            let action = format!("{job}: {idle}; checkpointing");
            record.start_migration(now, MigrationReason::IdleReclaim { why: idle });
            self.note_capacity_action(now, action);
            self.checkpoint_requested(job, events);
        } else {
            record.mark_reclaimed(now);
            self.note_capacity_action(now, format!("{job}: {idle}; released"));
            let why = format!("{idle}; it cannot checkpoint, so it starts over; re-queued behind the jobs waiting");
            self.revoke_lease(now, job, JobState::Pending, why, events);
        }
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
        let record = match self.jobs.leased_mut(&job, epoch) {
            Ok(record) => record,
            Err(refusal) => return Response::Rejected(refusal),
        };
        // The migration this failure answers, if any (retries of the same report change nothing).
        let answered = record.answered_migration(epoch, request);
        match answered.map(|m| m.reason.stopped_anyway(&error)) {
            // A preemption or an idle reclaim happens anyway: the work since the last checkpoint
            // is lost.
            Some(Some(why)) => {
                record.stop_for_migration(now);
                self.revoke_lease(now, &job, JobState::Pending, why, events);
            }
            // A plain move is aborted.
            Some(None) => {
                record.abort_migration(now, &error);
                events.push(Event::JobChanged(job));
            }
            None => {
                if record.note_failed_request(now, request, &error) {
                    events.push(Event::JobChanged(job));
                }
            }
        }
        Response::Done
    }

    /// Tells `job`'s workers that its checkpoint request number grew: they see it in their
    /// allocations.
    pub(super) fn checkpoint_requested(&self, job: &JobId, events: &mut Vec<Event>) {
        if let Some(lease) = self.jobs.get(job).and_then(|j| j.lease.as_ref()) {
            for host in lease.hosts() {
                events.push(Event::AllocationsChanged(host.clone()));
            }
        }
        events.push(Event::JobChanged(job.clone()));
    }

    pub(super) fn apply_request_checkpoint(
        &mut self,
        now: u64,
        job: JobId,
        reason: String,
        events: &mut Vec<Event>,
    ) -> Response {
        let record = match self.jobs.checked_mut(&job, JobRecord::refuse_checkpoint) {
            Ok(record) => record,
            Err(refusal) => return Response::Rejected(refusal),
        };
        let line = format!("checkpoint requested: {reason}");
        record.note(now, line.trim_end_matches(": ").to_owned());
        record.request_checkpoint();
        self.checkpoint_requested(&job, events);
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
        let record = match self.jobs.checked_mut(&job, JobRecord::refuse_migration) {
            Ok(record) => record,
            Err(refusal) => return Response::Rejected(refusal),
        };
        // A move with no destination leaves the hosts the job runs on.
        if hosts.only.is_empty() && hosts.avoid.is_empty() {
            if let Some(lease) = &record.lease {
                hosts.avoid = lease.hosts().cloned().collect();
            }
        }
        let line = format!(
            "migration requested ({}); checkpointing first",
            hosts.describe()
        );
        record.note(now, line);
        record.start_migration(now, MigrationReason::Move { hosts });
        self.checkpoint_requested(&job, events);
        Response::Done
    }

    /// The defragmenter's plan, checked whole before anything changes (see
    /// [`ClusterStore::refuse_defragment`]). Then each moved job starts a migration (checkpoint,
    /// stop, place again anywhere off the reserved hosts) and `hosts` are held for the waiting job.
    pub(super) fn apply_defragment(
        &mut self,
        now: u64,
        order: DefragOrder,
        events: &mut Vec<Event>,
    ) -> Response {
        self.reservations.retain(|_, (_, until)| *until > now);
        if let Some(refusal) = self.refuse_defragment(now, &order) {
            return Response::Rejected(refusal);
        }
        let DefragOrder {
            for_job,
            hosts,
            moves,
            until_ms,
        } = order;
        for m in &moves {
            if let Some(record) = self.jobs.get_mut(&m.job) {
                record.note(
                    now,
                    format!(
                        "migrating to make room for {for_job} (defragmentation; planned onto {})",
                        join_hosts(&m.to)
                    ),
                );
                // Anywhere but the reserved hosts, which the reservation keeps it off.
                let hosts = HostFilter::default();
                record.start_migration(now, MigrationReason::Move { hosts });
            }
            self.checkpoint_requested(&m.job, events);
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

    /// Why a defragmentation plan cannot run, if it cannot: the waiting job is no longer pending,
    /// the plan is empty or expired, a host is unknown, or a moved job no longer runs under the
    /// epoch the plan saw, cannot checkpoint, or is migrating already.
    fn refuse_defragment(&self, now: u64, order: &DefragOrder) -> Option<Rejection> {
        let Some(waiting) = self.jobs.get(&order.for_job) else {
            return Some(Rejection::UnknownJob(order.for_job.clone()));
        };
        if waiting.state != JobState::Pending {
            return Some(waiting.wrong_state("defragmentation makes room for a waiting job only"));
        }
        if order.moves.is_empty() || order.hosts.is_empty() || order.until_ms <= now {
            return Some(Rejection::InvalidJob(
                "a defragmentation plan needs moves, hosts and a future deadline".to_owned(),
            ));
        }
        let targets = order.moves.iter().flat_map(|m| m.to.iter());
        if let Some(h) = order
            .hosts
            .iter()
            .chain(targets)
            .find(|h| !self.nodes.contains_key(*h))
        {
            return Some(Rejection::UnknownNode(h.clone()));
        }
        order
            .moves
            .iter()
            .find_map(|m| match self.jobs.leased(&m.job, m.epoch) {
                Ok(record) => record.refuse_migration(),
                Err(refusal) => Some(refusal),
            })
    }

    /// Ends the job's lease (see [`JobRecord::end_lease`]) and frees its devices. Does nothing for
    /// a job without a lease.
    pub(super) fn revoke_lease(
        &mut self,
        now: u64,
        job: &JobId,
        next: JobState,
        why: String,
        events: &mut Vec<Event>,
    ) {
        self.revoke_lease_as(now, job, next, None, why, events);
    }

    /// [`ClusterStore::revoke_lease`] with the cause of the end, when the caller knows it.
    pub(super) fn revoke_lease_as(
        &mut self,
        now: u64,
        job: &JobId,
        next: JobState,
        cause: Option<RunCause>,
        why: String,
        events: &mut Vec<Event>,
    ) {
        let Some(record) = self.jobs.get_mut(job) else {
            return;
        };
        // A gang readied for repair lost its lease to the infrastructure, not to its own failure
        // or the scheduler.
        let cause = cause.unwrap_or(if next == JobState::Pending && record.resume.repair {
            RunCause::Infrastructure
        } else {
            RunCause::of(next)
        });
        let Some(lease) = record.end_lease_as(now, next, cause, why) else {
            return;
        };
        self.engine.release(job);
        for host in lease.hosts() {
            events.push(Event::AllocationsChanged(host.clone()));
        }
        events.push(Event::JobChanged(job.clone()));
        events.push(Event::SchedulingNeeded);
    }
}
