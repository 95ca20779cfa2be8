//! The `gangway` binary's library half: pieces the binary, the end-to-end tests and the benchmarks
//! share.
//!
//! - [`fleet`]: simulated hosts driven through the real worker API.

pub mod fleet;
