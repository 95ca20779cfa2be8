//! Gangway's API crate.
//!
//! It will hold the `.proto` services, the generated tonic/prost code and the domain types that cross
//! crate and wire boundaries (ids, job specs, inventories, leases) with their validation. The scheduler
//! service issue fills it; until then it holds only the identifiers every layer already shares, so that
//! nothing here pretends to be an API that does not exist yet.

pub mod ids;
