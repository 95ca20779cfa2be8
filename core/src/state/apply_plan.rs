//! Applying a scheduling round: the plan applier (Nomad's model). The engine computed the plan
//! from a snapshot; by the time it commits, the state may have moved on, so every part is re-checked
//! here and a stale gang is discarded whole.

use super::command::{Event, Response};
use super::job_record::{JobState, MigrationReason};
use super::store::ClusterStore;
use crate::engine::{GangPlacement, PendingReason, Plan, Preemption};
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
            if self.preempt(now, &p, events) {
                preempted.push(p.victim);
            }
        }
        let mut placed = Vec::new();
        let mut stale = Vec::new();
        for placement in plan.placements {
            let job = placement.job.clone();
            match self.place(now, placement, events) {
                Ok(epoch) => placed.push((job, epoch)),
                Err(why) => stale.push((job, why)),
            }
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

    /// Stops a running victim for its preemptor, whose devices are held for the preemptor
    /// meanwhile. Returns whether the victim was still running.
    fn preempt(&mut self, now: u64, p: &Preemption, events: &mut Vec<Event>) -> bool {
        let Some(victim) = self
            .jobs
            .get_mut(&p.victim)
            .filter(|j| j.state == JobState::Running)
        else {
            return false;
        };
        victim.preemptions += 1;
        let hosts: BTreeSet<HostName> = victim
            .lease
            .as_ref()
            .map(|l| l.hosts().cloned().collect())
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
                let for_job = p.preemptor.clone();
                victim.start_migration(now, MigrationReason::Preemption { for_job });
                self.checkpoint_requested(&p.victim, events);
                // Long enough for the checkpoint and the stop, then the hold lapses.
                let hold = u64::try_from(timeout.as_millis())
                    .unwrap_or(u64::MAX)
                    .saturating_mul(2)
                    .saturating_add(60_000);
                self.hold_for(&p.preemptor, hosts, now.saturating_add(hold));
            }
            Some(_) => {}
            None => {
                let why = format!(
                    "preempted for job {} ({:?}); re-queued",
                    p.preemptor, p.reason
                );
                self.revoke_lease(now, &p.victim, JobState::Pending, why, events);
                self.hold_for(&p.preemptor, hosts, now.saturating_add(60_000));
            }
        }
        let action = format!(
            "preempted {} for {} ({:?})",
            p.victim, p.preemptor, p.reason
        );
        self.note_capacity_action(now, action);
        true
    }

    /// Re-checks one gang's placement against the state as it is now and leases it whole, or
    /// says why it went stale (the gang stays pending). Returns the new lease's epoch.
    fn place(
        &mut self,
        now: u64,
        placement: GangPlacement,
        events: &mut Vec<Event>,
    ) -> Result<u64, String> {
        let job = placement.job.clone();
        let Some(record) = self.jobs.get(&job) else {
            return Err("job no longer exists".to_owned());
        };
        if record.state != JobState::Pending {
            return Err(format!("job is {}", record.state));
        }
        let reserved = self.reserved_against(&job);
        if let Some(t) = placement
            .tasks
            .iter()
            .find(|t| !record.next_hosts.allows(&t.host) || reserved.contains(&t.host))
        {
            return Err(format!("host {} is excluded for this placement", t.host));
        }
        // The host filter bound this placement only; the running gang does not keep it.
        let mut request = record.gang_request();
        request.hosts = Default::default();
        if let Err(e) = self.engine.apply_placement(request, placement.clone(), now) {
            let reason = PendingReason::PlanStale {
                detail: e.to_string(),
            };
            let why = reason.to_string();
            if let Some(record) = self.jobs.get_mut(&job) {
                record.pending_reason = Some(reason);
            }
            return Err(why);
        }
        let epoch = self.stamp_epoch(&placement, events);
        self.reservations.remove(&job);
        self.settle_reclaimed(&job, now);
        if let Some(record) = self.jobs.get_mut(&job) {
            record.grant_lease(now, epoch, placement);
        }
        events.push(Event::JobChanged(job));
        Ok(epoch)
    }

    /// Takes the next lease epoch and marks every device of `placement` with it: from now on its
    /// workers refuse anything older.
    fn stamp_epoch(&mut self, placement: &GangPlacement, events: &mut Vec<Event>) -> u64 {
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
        epoch
    }
}
