//! `gangway server`: the replica process.
//!
//! - [`replica::Replica`] starts everything one process serves and stops it cleanly.
//! - [`fsm::SchedulerFsm`] plugs the replicated cluster state into the consensus layer; finished
//!   jobs leaving it go to the replica's [`archive::JobArchive`].
//! - [`client_api`] and [`worker_api`] are the gRPC services; [`error::ApiError`] is their error
//!   contract (stable codes, leader hints).
//! - [`leader`] holds the leader's loops: scheduling rounds, node-down detection and idle leases,
//!   with the in-memory heartbeat clocks of [`heartbeats`] and idle clocks of [`idle_tracker`].
//! - [`http`] serves `/metrics`, `/livez`, `/readyz`.
//! - [`config`] is the validated server configuration (TOML file + flags).

pub mod access_api;
pub mod archive;
pub mod audit_api;
pub mod auth;
pub mod client_api;
pub mod config;
pub mod context;
pub mod convert;
pub mod disruption;
pub mod drill;
pub mod error;
pub mod fsm;
pub mod heartbeats;
pub mod http;
pub mod idle_tracker;
pub mod leader;
pub mod notifier;
pub mod policy;
pub mod replica;
pub mod requests;
pub mod tls_link;
pub mod worker_api;

pub use config::ServerConfig;
pub use fsm::SchedulerFsm;
pub use replica::{Replica, ServerError};
