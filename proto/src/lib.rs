//! Gangway's API crate.
//!
//! The domain types that cross crate and wire boundaries, with their validation: identifiers, device
//! kinds, topology levels, and the job spec people write (`spec`, TOML with field-path errors). The
//! `.proto` services and generated tonic/prost code join them with the scheduler service.

pub mod device;
pub mod ids;
pub mod spec;
pub mod topology;
