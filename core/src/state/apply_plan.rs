//! Applying a scheduling round: the plan applier (Nomad's model). The engine computed the plan
//! from a snapshot; by the time it commits, the state may have moved on, so every part is re-checked
//! here and a stale gang is discarded whole.

use super::command::{Event, Response, TaskState};
use super::job_record::{JobState, Lease, Migration, TaskRecord};
use super::store::ClusterStore;
use crate::engine::{PendingReason, Plan};
use gangway_proto::ids::{HostName, JobId};
use std::collections::BTreeSet;

impl ClusterStore {
    /// Holds `hosts` for `job` until `until_ms` (joining any hold it has), so only it is placed
    /// there; ends once it is placed.
    pub(super) fn hold_for(&mut self, job: &JobId, hosts: BTreeSet<HostName>, until_ms: u64) {
        if self
            .jobs
            .get(job)
            .is_none_or(|j| j.state != JobState::Pending)
        {
            return;
        }
        let entry = self
            .reservations
            .entry(job.clone())
            .or_insert_with(|| (BTreeSet::new(), until_ms));
        entry.0.extend(hosts);
        entry.1 = entry.1.max(until_ms);
    }

    pub(super) fn apply_plan(&mut self, now: u64, plan: Plan, events: &mut Vec<Event>) -> Response {
        let mut preempted = Vec::new();
        for p in plan.preemptions {
            let Some(victim) = self
                .jobs
                .get_mut(&p.victim)
                .filter(|j| j.state == JobState::Running)
            else {
                continue;
            };
            victim.preemptions += 1;
            let hosts: BTreeSet<HostName> = victim
                .lease
                .as_ref()
                .map(|l| l.placement.tasks.iter().map(|t| t.host.clone()).collect())
                .unwrap_or_default();
            let checkpoint = victim.spec.checkpoint.as_ref().map(|c| c.timeout);
            match checkpoint {
                // Checkpoint first, then stop: its work survives. The devices are held for the
                // preemptor meanwhile, so no third job takes them.
                Some(timeout) if victim.migration.is_none() => {
                    victim.note(
                        now,
                        format!(
                            "preempted for job {} ({:?}): checkpointing, then stopping",
                            p.preemptor, p.reason
                        ),
                    );
                    victim.migration = Some(Migration {
                        checkpoint_request: victim.checkpoint_requests + 1,
                        hosts: Default::default(),
                        requested_at_ms: now,
                        preempted_for: Some(p.preemptor.clone()),
                        idle_reclaim: None,
                    });
                    self.request_checkpoint(&p.victim, events);
                    // Long enough for the checkpoint and the stop, then the hold lapses.
                    let hold = u64::try_from(timeout.as_millis())
                        .unwrap_or(u64::MAX)
                        .saturating_mul(2)
                        .saturating_add(60_000);
                    self.hold_for(&p.preemptor, hosts, now.saturating_add(hold));
                }
                Some(_) => {}
                None => {
                    self.revoke_lease(
                        now,
                        &p.victim,
                        JobState::Pending,
                        format!(
                            "preempted for job {} ({:?}); re-queued",
                            p.preemptor, p.reason
                        ),
                        events,
                    );
                    self.hold_for(&p.preemptor, hosts, now.saturating_add(60_000));
                }
            }
            self.note_capacity_action(
                now,
                format!(
                    "preempted {} for {} ({:?})",
                    p.victim, p.preemptor, p.reason
                ),
            );
            preempted.push(p.victim);
        }

        let mut placed = Vec::new();
        let mut stale = Vec::new();
        for placement in plan.placements {
            let job_id = placement.job.clone();
            let Some(record) = self.jobs.get(&job_id) else {
                stale.push((job_id, "job no longer exists".to_owned()));
                continue;
            };
            if record.state != JobState::Pending {
                stale.push((job_id, format!("job is {}", record.state)));
                continue;
            }
            let reserved = self.reserved_against(&job_id);
            if let Some(t) = placement
                .tasks
                .iter()
                .find(|t| !record.next_hosts.allows(&t.host) || reserved.contains(&t.host))
            {
                stale.push((
                    job_id,
                    format!("host {} is excluded for this placement", t.host),
                ));
                continue;
            }
            // The host filter bound this placement only; the running gang does not keep it.
            let mut request = record.gang_request();
            request.hosts = Default::default();
            if let Err(e) = self.engine.apply_placement(request, placement.clone(), now) {
                let reason = PendingReason::PlanStale {
                    detail: e.to_string(),
                };
                let why = reason.to_string();
                if let Some(record) = self.jobs.get_mut(&job_id) {
                    record.pending_reason = Some(reason);
                }
                stale.push((job_id, why));
                continue;
            }
            let epoch = self.next_epoch;
            self.next_epoch += 1;
            for t in &placement.tasks {
                if let Some(epochs) = self.device_epochs.get_mut(&t.host) {
                    for d in &t.devices {
                        if let Some(e) = epochs.get_mut(usize::from(d.index)) {
                            *e = epoch;
                        }
                    }
                }
                events.push(Event::AllocationsChanged(t.host.clone()));
            }
            self.reservations.remove(&job_id);
            self.settle_reclaimed(&job_id, now);
            let record = self
                .jobs
                .get_mut(&job_id)
                .expect("job checked to exist above");
            let hosts: Vec<String> = placement.tasks.iter().map(|t| t.host.to_string()).collect();
            record.tasks = (0..placement.tasks.len())
                .map(|_| TaskRecord {
                    state: TaskState::Assigned,
                    exit_code: None,
                    message: String::new(),
                })
                .collect();
            record.lease = Some(Lease {
                epoch,
                granted_at_ms: now,
                placement,
                checkpoint_requests_at_grant: record.checkpoint_requests,
            });
            record.last_epoch = Some(epoch);
            record.next_hosts = Default::default();
            record.state = JobState::Running;
            record.pending_reason = None;
            record.attempts += 1;
            record.note(
                now,
                format!("leased (epoch {epoch}) on {}", hosts.join(", ")),
            );
            events.push(Event::JobChanged(job_id.clone()));
            placed.push((job_id, epoch));
        }

        for pending in plan.pending {
            if let Some(record) = self.jobs.get_mut(&pending.job) {
                if record.state == JobState::Pending {
                    record.pending_reason = Some(pending.reason);
                }
            }
        }
        Response::PlanApplied {
            placed,
            stale,
            preempted,
        }
    }
}
