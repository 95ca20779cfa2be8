//! Gangway's API crate.
//!
//! The domain types that cross crate and wire boundaries, with their validation: identifiers, device
//! kinds, topology levels, the job spec people write (`spec`, TOML with field-path errors), and the
//! gRPC API (`pb`, generated from `proto/gangway.proto`): the client API and the worker API, with
//! the job and task state enums' words and checked reading (`states`) and the rules every client of
//! the replicas follows (`link`: metadata keys, retry classification, leader following).

pub mod device;
pub mod fuzz;
pub mod ids;
pub mod secret;
pub mod spec;
pub mod topology;

/// Generated protobuf/tonic code for `proto/gangway.proto` (feature `grpc`, on by default).
#[cfg(feature = "grpc")]
#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("gangway.v1");

    impl std::fmt::Debug for SecretVar {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("SecretVar")
                .field("name", &self.name)
                .field("value", &format_args!("{}", crate::secret::REDACTED))
                .finish()
        }
    }
}

/// Job and task states on the wire: words, checked reading (feature `grpc`).
#[cfg(feature = "grpc")]
pub mod states;

/// Metadata keys, retry classification and leader following for every client (feature `grpc`).
#[cfg(feature = "grpc")]
pub mod link;

/// The allocation set's size bound and digest, shared by replicas and agents (feature `grpc`).
#[cfg(feature = "grpc")]
pub mod allocation;

#[cfg(feature = "grpc")]
pub mod sha256;
