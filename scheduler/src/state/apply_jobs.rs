//! Apply functions for job commands: submit, cancel, task reports, checkpoints.

use super::command::{CheckpointManifest, Event, Rejection, Response, TaskState};
use super::job_record::{CheckpointRecord, JobRecord, JobState};
use super::store::ClusterStore;
use gangway_proto::ids::JobId;
use gangway_proto::spec::{JobSpec, MAX_TASKS};

impl ClusterStore {
    pub(super) fn apply_submit_job(
        &mut self,
        now: u64,
        idempotency_key: Option<String>,
        spec: JobSpec,
        events: &mut Vec<Event>,
    ) -> Response {
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
        self.jobs
            .insert(id.clone(), JobRecord::new(id.clone(), spec, now));
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

    #[allow(clippy::too_many_arguments)]
    pub(super) fn apply_task_status(
        &mut self,
        now: u64,
        job: JobId,
        task: u32,
        epoch: u64,
        state: TaskState,
        exit_code: Option<i32>,
        message: String,
        events: &mut Vec<Event>,
    ) -> Response {
        let Some(record) = self.jobs.get_mut(&job) else {
            return Response::Rejected(Rejection::UnknownJob(job));
        };
        let current = record.lease.as_ref().map(|l| l.epoch);
        if current != Some(epoch) {
            // A retried report of a completion the cluster already recorded is not an error: the
            // worker keeps retrying until someone acknowledges it.
            if record.last_epoch == Some(epoch) && state.is_terminal() && record.state.is_terminal()
            {
                return Response::Done;
            }
            return Response::Rejected(Rejection::StaleEpoch {
                job,
                got: epoch,
                current: current.or(record.last_epoch).unwrap_or(0),
            });
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
        if state == TaskState::Failed {
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
        job: JobId,
        epoch: u64,
        manifest: CheckpointManifest,
        events: &mut Vec<Event>,
    ) -> Response {
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
        if record
            .last_checkpoint
            .as_ref()
            .is_some_and(|c| c.manifest.step >= manifest.step)
        {
            return Response::Done;
        }
        record.note(
            now,
            format!("checkpoint at step {} ({})", manifest.step, manifest.path),
        );
        record.last_checkpoint = Some(CheckpointRecord {
            epoch,
            manifest,
            recorded_at_ms: now,
        });
        events.push(Event::JobChanged(job));
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
        self.engine.release(job);
        for t in &lease.placement.tasks {
            events.push(Event::AllocationsChanged(t.host.clone()));
        }
        record.state = next;
        record.tasks.clear();
        if next == JobState::Pending {
            record.pending_reason = Some(why.clone());
        } else {
            record.pending_reason = None;
            record.finished_at_ms = Some(now);
        }
        record.note(now, why);
        events.push(Event::JobChanged(job.clone()));
        events.push(Event::SchedulingNeeded);
    }
}
