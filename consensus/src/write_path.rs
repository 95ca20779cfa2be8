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
    Applied { index: u64, response: Vec<u8> },
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

/// Propose `command` (already encoded) through the local Raft and wait until it is applied here.
/// Returns the log index and the encoded response. `NotLeader` means it was not proposed.
pub(crate) async fn propose_local<S: StateMachine>(
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
