//! The openraft type configuration and the entry payload that travels in the log.
//!
//! The configuration is deliberately *not* generic over the application: commands and responses
//! cross the log as bytes (the application's serde types encoded by [`crate::codec`]). That keeps every
//! openraft type concrete, so the storage, network and gRPC layers are written once, and only the
//! state-machine adapter and the handle know the application's types.

use serde::Deserialize;
use serde::Serialize;

/// Identifier of a replica. Stable for the life of a replica's data directory.
pub type NodeId = u64;

/// The node record kept in Raft membership: where to reach the replica's gRPC endpoint.
pub type Node = openraft::BasicNode;

/// One application command as stored in a log entry.
///
/// `stamped_ms` is the leader's wall clock when it proposed the command. It is stored in the entry
/// so that every replica derives the same time when applying it; the crate never lets the
/// application read a local clock inside `apply`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogCommand {
    /// Leader wall-clock milliseconds since the Unix epoch, at proposal time.
    pub stamped_ms: u64,
    /// The application's command, encoded with [`crate::codec`].
    #[serde(with = "serde_bytes")]
    pub command: Vec<u8>,
}

impl std::fmt::Display for LogCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LogCommand(t={}ms, {} bytes)",
            self.stamped_ms,
            self.command.len()
        )
    }
}

/// What applying one entry produced: the application's response, encoded. Blank and membership
/// entries produce an empty response (they never reach the application).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogResponse {
    /// The application's response, encoded with [`crate::codec`]; empty for non-application entries.
    #[serde(with = "serde_bytes")]
    pub response: Vec<u8>,
    /// Set when the command could not be decoded (e.g. written by an incompatible build). The entry
    /// is skipped identically on every replica, so this is deterministic, and the writer gets a
    /// `Rejected` error instead of the replica stopping.
    pub rejected: Option<String>,
}

openraft::declare_raft_types!(
    /// Gangway's openraft type configuration: u64 node ids and terms, `BasicNode` addresses, tokio.
    pub TypeConfig:
        D = LogCommand,
        R = LogResponse,
        NodeId = NodeId,
        Node = Node,
);

/// The concrete openraft handle for a given application state machine.
pub(crate) type RaftOf<S> = openraft::Raft<TypeConfig, crate::state_machine::StateMachineStore<S>>;

pub(crate) type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub(crate) type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub(crate) type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub(crate) type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
pub(crate) type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
/// The snapshot payload handed between openraft, the snapshot store and the network: whole bytes.
/// Snapshots of the scheduler's state are megabytes, not gigabytes, so holding one in memory is fine;
/// the network still streams it in chunks.
pub(crate) type SnapshotData = Vec<u8>;
pub(crate) type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotData>;
