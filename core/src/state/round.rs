//! The state's side of a scheduling round: what a round reads ([`ClusterStore::round_input`]) and
//! the commands its outcome becomes ([`defragment_command`]). The round itself is
//! [`crate::engine::run_round`].

use super::command::{Command, DefragMove, DefragOrder};
use super::store::ClusterStore;
use crate::engine::{DefragProposal, GangRequest, LeaseFacts, PendingReason, RoundState};
use std::borrow::Cow;
use std::collections::BTreeSet;

impl ClusterStore {
    /// What a round reads besides the engine's view, in one pass over the live jobs (the indexes,
    /// never the history): the pending gangs in queue order (hosts held for other gangs kept
    /// off), the reason each has now, the migrations under way, the blocks held, and, when the
    /// defragmenter is on, the lease and checkpoint time of every running checkpointable gang.
    pub fn round_input(&self, defrag: bool) -> RoundRead<'_> {
        let reservations: Vec<_> = self.reservations().collect();
        let mut state = RoundState {
            reserved: reservations.iter().map(|(j, _)| (*j).clone()).collect(),
            migrating: self.jobs.migrating().map(|j| j.id.clone()).collect(),
            ..RoundState::default()
        };
        let (gangs, reasons) = self.jobs.queue();
        // Borrowed as the table keeps them; copied only while hosts are held for some gang,
        // which every other gang must keep off.
        let pending = if reservations.is_empty() {
            Cow::Borrowed(gangs)
        } else {
            let mut owned = gangs.to_vec();
            for gang in &mut owned {
                for (_, hosts) in reservations.iter().filter(|(r, _)| **r != gang.id) {
                    gang.hosts.avoid.extend(hosts.iter().cloned());
                }
            }
            Cow::Owned(owned)
        };
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
        RoundRead {
            pending,
            reasons,
            state,
        }
    }
}

/// What a round reads from the state ([`ClusterStore::round_input`]): the pending gangs in queue
/// order (borrowed unless hosts are held), their current reasons beside them, and the rest.
#[derive(Clone, Debug)]
pub struct RoundRead<'a> {
    pub pending: Cow<'a, [GangRequest]>,
    pub reasons: &'a [Option<PendingReason>],
    pub state: RoundState,
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
