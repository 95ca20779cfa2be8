//! # gangway-consensus
//!
//! A generic Raft-replicated state machine for Gangway: openraft (pinned 0.10 alpha) with a log
//! of its own segment files, an on-disk snapshot store and a tonic gRPC transport. It knows nothing about GPUs:
//! the scheduler plugs its FSM in by implementing [`StateMachine`] and drives the replica through a
//! [`ReplicaHandle`]. See the crate README for the API tour, error codes, on-disk layout and wire
//! encoding.

#![deny(missing_docs)]

mod app;
mod codec;
mod config;
mod error;
pub mod fuzz;
mod grpc_service;
mod handle;
mod leader_loss;
mod log_store;
mod metrics;
mod network;
mod private_dir;
mod snapshot_store;
mod state_machine;
mod types;
mod write_path;

/// Generated protobuf/tonic code for `proto/raft.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("gangway.consensus.v1");
}

pub use app::AppError;
pub use app::ApplyContext;
pub use app::StateChange;
pub use app::StateMachine;
pub use config::LogStorage;
pub use config::ReplicaConfig;
pub use config::Replication;
pub use error::ConsensusError;
pub use error::Result;
pub use grpc_service::testing;
pub use grpc_service::AuthenticatedReplica;
pub use grpc_service::RaftGrpcService;
pub use handle::ReplicaHandle;
pub use metrics::ReplicaMetrics;
pub use metrics::Role;
pub use network::CoalescedWrites;
pub use network::Connector;
pub use network::FaultInjector;
pub use network::TcpConnector;
pub use network::Transport;
pub use network::Verdict;
pub use network::MAX_RAFT_MESSAGE_BYTES;
pub use types::NodeId;

/// Storage internals, public for the conformance tests and for tools that inspect a data dir.
pub mod storage {
    pub use crate::log_store::MemLogStore;
    pub use crate::log_store::StorageHealth;
    pub use crate::log_store::WalLogStore;
    pub use crate::state_machine::StateMachineStore;
    pub use crate::types::LogCommand;
    pub use crate::types::LogResponse;
    pub use crate::types::TypeConfig;
}
