//! Proposing a command on this replica, shared by the handle and by the gRPC service that receives
//! forwarded writes. Also the translation of openraft's errors into [`ConsensusError`].

use std::time::SystemTime;
use std::time::UNIX_EPOCH;

use openraft::errors::ClientWriteError;
use openraft::errors::Fatal;
use openraft::errors::ForwardToLeader;
use openraft::errors::RaftError;
use serde::Deserialize;
use serde::Serialize;

use crate::app::StateMachine;
use crate::error::ConsensusError;
use crate::error::WireError;
use crate::log_store::StorageHealth;
use crate::types::LogCommand;
use crate::types::RaftOf;
use crate::types::TypeConfig;

/// Reply to a forwarded write, bincode inside `ForwardWriteReply.data`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ForwardReply {
    Applied {
        index: u64,
        #[serde(with = "serde_bytes")]
        response: Vec<u8>,
    },
    Failed(WireError),
}

pub(crate) fn not_leader(f: &ForwardToLeader<TypeConfig>) -> ConsensusError {
    ConsensusError::NotLeader {
        leader_id: f.leader_id,
        leader_addr: f.leader_node.as_ref().map(|n| n.addr.clone()),
    }
}

pub(crate) fn fatal(health: &StorageHealth, f: &Fatal<TypeConfig>) -> ConsensusError {
    if let Err(e) = health.check() {
        return e;
    }
    match f {
        Fatal::Stopped => ConsensusError::Shutdown,
        Fatal::StorageError(e) => ConsensusError::Storage(e.to_string()),
        Fatal::Panicked => ConsensusError::Fatal("raft core panicked".into()),
    }
}

pub(crate) fn write_error(
    health: &StorageHealth,
    e: &RaftError<TypeConfig, ClientWriteError<TypeConfig>>,
) -> ConsensusError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => not_leader(f),
        RaftError::APIError(ClientWriteError::LogEntryDiscarded(_)) => {
            ConsensusError::Unavailable(format!("leader changed, outcome unknown: {e}"))
        }
        RaftError::APIError(other) => ConsensusError::Rejected(other.to_string()),
        RaftError::Fatal(f) => fatal(health, f),
    }
}

/// Leader wall clock in Unix milliseconds: the only place the crate reads a clock for the log.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How long a write may take, and how long a leader may go without a quorum's acknowledgement
/// before it counts as cut off ([`propose_unless_cut_off`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct WriteLimits {
    pub timeout: std::time::Duration,
    pub cut_off_after: std::time::Duration,
    /// How often a pending write checks whether its leader is cut off (the heartbeat interval).
    pub poll: std::time::Duration,
}

/// What this replica knows of its own leadership: whether a quorum acknowledged it lately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Leadership {
    /// Not the leader.
    Follows,
    /// The leader, and a quorum acknowledged it within the window (a single voter always).
    Confirmed,
    /// The leader, and no quorum has acknowledged it yet (just elected).
    Unacknowledged,
    /// The leader, but the last quorum acknowledged it longer ago than the window: cut off, while
    /// the others may be electing a new leader (it cannot hear of a newer term meanwhile).
    CutOff,
}

/// This replica's [`Leadership`], a quorum's acknowledgement counting within `within`.
pub(crate) fn leadership<S: StateMachine>(
    raft: &RaftOf<S>,
    within: std::time::Duration,
) -> Leadership {
    use openraft::type_config::async_runtime::watch::WatchReceiver;
    let metrics = raft.metrics();
    let m = metrics.borrow_watched();
    if m.state != openraft::ServerState::Leader {
        return Leadership::Follows;
    }
    if m.membership_config.membership().voter_ids().count() <= 1 {
        return Leadership::Confirmed;
    }
    match m.last_quorum_acked.as_ref() {
        None => Leadership::Unacknowledged,
        Some(acked) if openraft::Instant::elapsed(&**acked) <= within => Leadership::Confirmed,
        Some(_) => Leadership::CutOff,
    }
}

/// Whether this replica leads but is cut off from its quorum ([`Leadership::CutOff`]).
pub(crate) fn cut_off<S: StateMachine>(raft: &RaftOf<S>, within: std::time::Duration) -> bool {
    leadership(raft, within) == Leadership::CutOff
}

/// [`propose_local`], except on a leader cut off from its quorum ([`Leadership::CutOff`]), whose
/// write could only wait for the cut to heal and then be discarded. Such a leader refuses a new
/// write (`NotLeader` naming no leader: certainly not proposed, so the client tries another
/// replica at once), and stops waiting for one already proposed once it is cut off
/// (`Unavailable`: the outcome is unknown, as the entry may yet commit if this replica keeps its
/// leadership; a client resends it with its idempotency key). The state is checked every
/// `limits.poll`.
pub(crate) async fn propose_unless_cut_off<S: StateMachine>(
    raft: &RaftOf<S>,
    health: &StorageHealth,
    limits: &WriteLimits,
    command: Vec<u8>,
) -> Result<(u64, Vec<u8>), ConsensusError> {
    let within = limits.cut_off_after;
    if cut_off(raft, within) {
        return Err(ConsensusError::NotLeader {
            leader_id: None,
            leader_addr: None,
        });
    }
    // Checked just above: the watch looks again only after each poll interval.
    let watch = async {
        loop {
            tokio::time::sleep(limits.poll).await;
            if cut_off(raft, within) {
                break;
            }
        }
        tracing::warn!(
            ?within,
            "no quorum acknowledged this leader in time: a pending write is let go, outcome unknown"
        );
    };
    tokio::select! {
        r = propose_local(raft, health, command) => r,
        () = watch => Err(ConsensusError::Unavailable(format!(
            "this leader lost its quorum (no acknowledgement within {within:?}) while the \
             write was pending; outcome unknown"
        ))),
    }
}

/// Propose `command` (already encoded) through the local Raft and wait until it is applied here.
/// Returns the log index and the encoded response. `NotLeader` means it was not proposed.
async fn propose_local<S: StateMachine>(
    raft: &RaftOf<S>,
    health: &StorageHealth,
    command: Vec<u8>,
) -> Result<(u64, Vec<u8>), ConsensusError> {
    health.check()?;
    let entry = LogCommand {
        stamped_ms: now_ms(),
        command,
    };
    match raft.client_write(entry).await {
        Ok(resp) => {
            if let Some(r) = resp.data.rejected {
                return Err(ConsensusError::Rejected(r));
            }
            Ok((resp.log_id.index, resp.data.response))
        }
        Err(e) => Err(write_error(health, &e)),
    }
}
