//! Errors of the consensus layer, typed so that callers can decide what to do without parsing text.
//!
//! Every variant has a stable [`ConsensusError::code`] (for logs, metrics and the scheduler's own API
//! errors) and [`ConsensusError::is_retryable`] (whether trying again, possibly on another replica,
//! can succeed).

use crate::types::NodeId;

/// Result alias for this crate.
pub type Result<T, E = ConsensusError> = std::result::Result<T, E>;

/// Everything that can go wrong when using a replica.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConsensusError {
    /// This replica is not the leader. `leader_id`/`leader_addr` name the leader if known, so a
    /// client can go there directly. The write was NOT proposed.
    #[error("not the leader (leader: {leader_id:?} at {leader_addr:?})")]
    NotLeader {
        /// The current leader, if this replica knows one.
        leader_id: Option<NodeId>,
        /// The current leader's gRPC address, if known.
        leader_addr: Option<String>,
    },

    /// No leader could be reached, or the cluster has no quorum right now. For a write, the command
    /// may or may not have been committed (`outcome unknown`): retry only idempotent commands.
    #[error("unavailable: {0}")]
    Unavailable(String),

    /// The operation did not finish in time. As with `Unavailable`, a write may still commit.
    #[error("timed out: {0}")]
    Timeout(String),

    /// Local storage failed (I/O error, fsync failure, corruption). The replica stops accepting
    /// writes: it must never acknowledge what it did not persist. Operator action is needed.
    #[error("storage failure: {0}")]
    Storage(String),

    /// The Raft core stopped (after a storage failure, a panic, or shutdown).
    #[error("fatal: {0}")]
    Fatal(String),

    /// The request was refused as invalid (bad membership change, unknown node, bad config...).
    /// Retrying the same request will fail the same way.
    #[error("rejected: {0}")]
    Rejected(String),

    /// The replica is shutting down or has shut down.
    #[error("replica is shut down")]
    Shutdown,
}

impl ConsensusError {
    /// Whether retrying (after a short wait, possibly against `NotLeader`'s leader) can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ConsensusError::NotLeader { .. }
            | ConsensusError::Unavailable(_)
            | ConsensusError::Timeout(_) => true,
            ConsensusError::Storage(_)
            | ConsensusError::Fatal(_)
            | ConsensusError::Rejected(_)
            | ConsensusError::Shutdown => false,
        }
    }

    /// A stable, machine-readable code. Never change an existing code: dashboards and clients match
    /// on it.
    pub fn code(&self) -> &'static str {
        match self {
            ConsensusError::NotLeader { .. } => "consensus.not_leader",
            ConsensusError::Unavailable(_) => "consensus.unavailable",
            ConsensusError::Timeout(_) => "consensus.timeout",
            ConsensusError::Storage(_) => "consensus.storage",
            ConsensusError::Fatal(_) => "consensus.fatal",
            ConsensusError::Rejected(_) => "consensus.rejected",
            ConsensusError::Shutdown => "consensus.shutdown",
        }
    }
}

/// The wire form of an error returned by a forwarded write (see `ForwardWrite` in the proto).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct WireError {
    pub(crate) code: String,
    pub(crate) message: String,
    pub(crate) leader_id: Option<NodeId>,
    pub(crate) leader_addr: Option<String>,
}

impl From<&ConsensusError> for WireError {
    fn from(e: &ConsensusError) -> Self {
        let (leader_id, leader_addr) = match e {
            ConsensusError::NotLeader {
                leader_id,
                leader_addr,
            } => (*leader_id, leader_addr.clone()),
            _ => (None, None),
        };
        WireError {
            code: e.code().to_string(),
            message: e.to_string(),
            leader_id,
            leader_addr,
        }
    }
}

impl From<WireError> for ConsensusError {
    fn from(w: WireError) -> Self {
        match w.code.as_str() {
            "consensus.not_leader" => ConsensusError::NotLeader {
                leader_id: w.leader_id,
                leader_addr: w.leader_addr,
            },
            "consensus.timeout" => ConsensusError::Timeout(w.message),
            "consensus.storage" => ConsensusError::Storage(w.message),
            "consensus.fatal" => ConsensusError::Fatal(w.message),
            "consensus.rejected" => ConsensusError::Rejected(w.message),
            "consensus.shutdown" => {
                ConsensusError::Unavailable(format!("leader is shutting down: {}", w.message))
            }
            _ => ConsensusError::Unavailable(w.message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable_and_wire_round_trips() {
        let e = ConsensusError::NotLeader {
            leader_id: Some(3),
            leader_addr: Some("127.0.0.1:1".into()),
        };
        assert_eq!(e.code(), "consensus.not_leader");
        assert!(e.is_retryable());
        let back: ConsensusError = WireError::from(&e).into();
        assert!(matches!(
            back,
            ConsensusError::NotLeader {
                leader_id: Some(3),
                ..
            }
        ));
        assert!(!ConsensusError::Storage("fsync".into()).is_retryable());
        assert_eq!(
            ConsensusError::Storage("x".into()).code(),
            "consensus.storage"
        );
    }
}
