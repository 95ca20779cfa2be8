//! The state's side of a scheduling round: what a round reads ([`ClusterStore::round_input`]) and
//! the commands its outcome becomes ([`defragment_command`]). The round itself is
//! [`crate::engine::run_round`].

use super::command::{Command, DefragMove, DefragOrder};
use super::store::ClusterStore;
use crate::engine::{DefragProposal, GangRequest, LeaseFacts, RoundState};
use std::collections::BTreeSet;

impl ClusterStore {
    /// What a round reads besides the engine's view, in one pass over the live jobs (the indexes,
    /// never the history): the pending gangs in queue order (hosts held for other gangs kept
    /// off), the reason each has now, the migrations under way, the blocks held, and, when the
    /// defragmenter is on, the lease and checkpoint time of every running checkpointable gang.
    pub fn round_input(&self, defrag: bool) -> (Vec<GangRequest>, RoundState) {
        let reservations: Vec<_> = self.reservations().collect();
        let mut state = RoundState {
            reserved: reservations.iter().map(|(j, _)| (*j).clone()).collect(),
            migrating: self.jobs.migrating().map(|j| j.id.clone()).collect(),
            ..RoundState::default()
        };
        let mut pending = Vec::with_capacity(self.jobs.pending_count());
        for job in self.jobs.pending() {
            let mut gang = job.gang_request();
            for (_, hosts) in reservations.iter().filter(|(r, _)| **r != job.id) {
                gang.hosts.avoid.extend(hosts.iter().cloned());
            }
            if let Some(reason) = &job.pending_reason {
                state.reasons.insert(job.id.clone(), reason.clone());
            }
            pending.push(gang);
        }
        if defrag {
            for job in self.jobs.running() {
                if let (Some(lease), Some(c)) = (&job.lease, &job.spec.checkpoint) {
                    let checkpoint_ms = u64::try_from(c.timeout.as_millis()).unwrap_or(u64::MAX);
                    let facts = LeaseFacts {
                        epoch: lease.epoch,
                        checkpoint_ms,
                    };
                    state.leases.insert(job.id.clone(), facts);
                }
            }
        }
        (pending, state)
    }
}

/// The command that carries out a defragmentation proposal: each move names the lease it saw,
/// and the freed hosts are held for the waiting gang until it is placed or the hold ends.
pub fn defragment_command(p: &DefragProposal) -> Command {
    let moves = p
        .plan
        .moves
        .iter()
        .map(|m| DefragMove {
            job: m.job.clone(),
            epoch: p.epochs.get(&m.job).copied().unwrap_or(0),
            to: m.to.tasks.iter().map(|t| t.host.clone()).collect(),
        })
        .collect();
    Command::Defragment(DefragOrder {
        for_job: p.plan.for_gang.clone(),
        hosts: p
            .plan
            .gang
            .tasks
            .iter()
            .map(|t| t.host.clone())
            .collect::<BTreeSet<_>>(),
        moves,
        until_ms: p.hold_until_ms,
    })
}
