//! [`ReplicaContext`]: what every service and loop of one replica shares: the Raft handle, the
//! configuration and the leader's in-memory heartbeat clocks.

use super::auth::Caller;
use super::config::ServerConfig;
use super::error::ApiError;
use super::fsm::SchedulerFsm;
use super::heartbeats::HeartbeatTracker;
use crate::state::{AuditNote, Command, Response};
use gangway_consensus::ReplicaHandle;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Clone)]
pub struct ReplicaContext {
    pub raft: ReplicaHandle<SchedulerFsm>,
    pub config: Arc<ServerConfig>,
    pub heartbeats: Arc<HeartbeatTracker>,
    /// How long each lease's devices have been idle (leader memory).
    pub idle: Arc<super::idle_tracker::IdleTracker>,
    /// Failover drills on this replica: the fault injector its Raft links go through.
    pub drills: Arc<super::drill::DrillControl>,
    /// What the defragmenter's migrations cost in the last hour (leader memory).
    pub disruption: Arc<super::disruption::DisruptionLedger>,
    /// The term in which this replica, as leader, last confirmed a linearizable read: from then on
    /// its own state includes its term's first entry, and cheap local reads are current.
    pub barrier_term: Arc<std::sync::atomic::AtomicU64>,
    /// Per-node wake-ups for the allocation streams.
    pub allocations: Arc<super::notifier::AllocationNotifier>,
    /// Turns true when the replica begins to stop: long-lived streams end so the servers can drain.
    pub shutdown: Arc<tokio::sync::watch::Sender<bool>>,
}

impl ReplicaContext {
    /// A receiver that turns true when the replica begins to stop.
    pub fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    pub fn id(&self) -> u64 {
        self.raft.id()
    }

    /// Commits a command (a follower forwards it to the leader) and turns the state machine's
    /// refusal into an error.
    pub async fn write(&self, command: Command) -> Result<Response, ApiError> {
        let kind = match &command {
            Command::Audited { command, .. } => command.kind(),
            other => other.kind(),
        };
        let response = self
            .raft
            .write(command)
            .await
            .map_err(|e| ApiError::from_consensus(self.id(), e))?;
        metrics::counter!("gangway_commands_total", "kind" => kind).increment(1);
        match response {
            Response::Rejected(r) => Err(r.into()),
            other => Ok(other),
        }
    }

    /// Commits a change made on behalf of `caller` (a person's request): the state records who
    /// did it, what it was about and its outcome in the audit trail (`state::audit`), a refusal
    /// included.
    pub async fn write_as(&self, caller: &Caller, command: Command) -> Result<Response, ApiError> {
        self.write(Command::Audited {
            actor: caller.name.clone(),
            command: Box::new(command),
        })
        .await
    }

    /// Records in the audit trail an action of `caller` that is not a state change (a membership
    /// change, a leader transfer, a drill): `error` is its refusal, `None` when it was done. Best effort: an action that happened
    /// is not undone because its note could not be committed; that is logged instead.
    pub async fn audit_note(
        &self,
        caller: &Caller,
        action: &str,
        target: String,
        error: Option<&ApiError>,
    ) {
        let note = AuditNote {
            actor: caller.name.clone(),
            action: action.to_owned(),
            target,
            outcome: error.map_or("ok", ApiError::code).to_owned(),
        };
        if let Err(e) = self.write(Command::AuditNote(note.clone())).await {
            tracing::warn!(?note, error = %e, "the audit trail could not record an action");
        }
    }

    /// A linearizable read on the leader; a follower answers `not_leader` with the leader's address.
    pub async fn read<R>(&self, f: impl FnOnce(&SchedulerFsm) -> R) -> Result<R, ApiError> {
        self.raft
            .read(f)
            .await
            .map_err(|e| ApiError::from_consensus(self.id(), e))
    }

    /// A read for decisions the leader sends out (allocation sets): [`Self::term_read`], as the
    /// API's error.
    pub async fn leader_read<R>(&self, f: impl FnOnce(&SchedulerFsm) -> R) -> Result<R, ApiError> {
        self.term_read(f)
            .await
            .map_err(|e| ApiError::from_consensus(self.id(), e))
    }

    /// A read for what the leader decides (scheduling rounds, allocation sets): linearizable once
    /// per term, then from local state while the term lasts. The once is what DESIGN section 4
    /// asks (a new leader acts only on state that includes its own term's first entry); after it,
    /// the local state only moves forward through this leader's own commits, and whatever it
    /// decides on it goes through the log, where a deposed leader's entry is never committed and
    /// the state machine re-checks every placement. A thousand workers reconnecting to a new
    /// leader cost one ReadIndex round, not a thousand, and a round does not wait on a quorum's
    /// heartbeat and the apply queue before it can start.
    pub async fn term_read<R>(
        &self,
        f: impl FnOnce(&SchedulerFsm) -> R,
    ) -> Result<R, gangway_consensus::ConsensusError> {
        use std::sync::atomic::Ordering;
        let m = self.raft.metrics();
        let term = m.term;
        if reads_locally(m.role, term, self.barrier_term.load(Ordering::Acquire)) {
            return Ok(self.raft.read_local(f));
        }
        let r = self.raft.read(f).await?;
        self.barrier_term.store(term, Ordering::Release);
        Ok(r)
    }

    /// Fails with `not_leader` unless this replica leads (for calls only the leader may serve).
    pub fn leader_only(&self) -> Result<(), ApiError> {
        // A quorum must have acknowledged this leader within the shortest election timeout: past
        // it the others may have elected a new one, and a worker that kept heartbeating a leader
        // cut off from them would be declared down by the new one.
        if self
            .raft
            .is_confirmed_leader(self.config.raft.election_timeout_min)
        {
            return Ok(());
        }
        let leader = self.raft.leader().filter(|(id, _)| *id != self.id());
        Err(ApiError::NotLeader {
            replica: self.id(),
            leader: leader.map(|(_, addr)| addr),
        })
    }
}

/// The leader's wall clock in Unix milliseconds. Only ever used on the leader, for decisions it
/// then commits (the consensus layer stamps entries with it); `apply` never reads a clock.
pub fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Whether a [`ReplicaContext::term_read`] may come from local state: this replica leads, in the
/// term in which it confirmed a linearizable read (`barrier_term`).
fn reads_locally(role: gangway_consensus::Role, term: u64, barrier_term: u64) -> bool {
    role == gangway_consensus::Role::Leader && barrier_term == term
}

#[cfg(test)]
mod tests {
    use super::reads_locally;
    use gangway_consensus::Role;

    #[test]
    fn a_leader_reads_locally_only_in_the_term_it_confirmed() {
        let cases = [
            (Role::Leader, 5, 5, true, "confirmed this term"),
            (
                Role::Leader,
                5,
                0,
                false,
                "a new leader that has not confirmed yet",
            ),
            (
                Role::Leader,
                7,
                5,
                false,
                "re-elected: the barrier was an earlier term's",
            ),
            (
                Role::Follower,
                5,
                5,
                false,
                "deposed within what it saw of the term",
            ),
            (Role::Candidate, 6, 5, false, "campaigning"),
        ];
        for (role, term, barrier, local, story) in cases {
            assert_eq!(reads_locally(role, term, barrier), local, "{story}");
        }
    }
}
