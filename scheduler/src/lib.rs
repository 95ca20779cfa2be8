//! Gangway's scheduler replica: the process `gangway server` runs.
//!
//! - [`server`]: leader loops, gRPC services, HTTP, configuration, around the consensus layer.
//! - [`fuzz`]: the fuzz targets of every decoder a replica runs on untrusted bytes.
//! - [`engine`], [`state`], [`sim`]: re-exported from the pure core, `gangway-core`, which decides
//!   everything (the round, the state machine, the simulator) without tokio, tonic or RocksDB.

pub use gangway_core::{engine, sim, state};

pub mod fuzz;
pub mod server;
