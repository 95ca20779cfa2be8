//! Gangway's pure core: everything that decides, and nothing that waits.
//!
//! - [`engine`]: the placement engine and its policies, and [`engine::round`], the ONE function that
//!   assembles a scheduling round (placements, preemptions, defragmentation, pending reasons). The
//!   leader, the `defrag plan` preview and the simulator all call it.
//! - [`state`]: the replicated cluster state (the FSM): one [`state::Command`] enum, one apply
//!   function per variant, deterministic.
//! - [`sim`]: the trace simulator. Each simulated event is the `Command` the leader or a worker
//!   would commit, applied through [`state::ClusterStore::apply`] at the simulated time.
//!
//! No tokio, tonic or RocksDB (and no clock or randomness outside a seeded simulator), so this
//! crate's tests build and run in seconds on a cold machine. The server (`gangway-scheduler`),
//! the consensus layer and the binary depend on it; nothing here depends on them.

pub mod engine;
pub mod sim;
pub mod state;
