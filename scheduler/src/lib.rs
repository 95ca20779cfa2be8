//! Gangway's scheduler crate.
//!
//! - [`engine`]: the pure placement engine. A function from a cluster snapshot and the pending gangs to
//!   a [`engine::Plan`]; no tokio, no I/O, no clocks, so the server, the simulator and the tests all run
//!   the very same decisions.
//! - [`sim`]: the trace-driven simulator (`gangway sim`) that drives the engine under a discrete-event
//!   clock and measures it on real production traces.
//! - [`state`]: the replicated cluster state (the FSM the consensus layer applies commands to).
//! - [`server`]: the replica process's configuration (the services follow).

pub mod engine;
pub mod server;
pub mod sim;
pub mod state;
