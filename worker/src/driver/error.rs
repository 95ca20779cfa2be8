//! The driver's error type.

use std::io;
use std::path::PathBuf;

/// Why a driver call failed. Task failures are not errors: they come back as an
/// [`ExitOutcome`](super::ExitOutcome); these are failures of the driver itself or of its input.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The [`DriverConfig`](super::DriverConfig) cannot work (e.g. an empty shim command).
    #[error("invalid task driver configuration: {0}")]
    Config(String),

    /// A file or directory the driver owns could not be created, written or read.
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A launch request that cannot be run as given: an empty command, a NUL byte in an
    /// argument, an environment variable name with `=`.
    #[error("cannot launch task {key}: {reason}")]
    InvalidSpec { key: String, reason: String },

    /// The shim (our own binary) could not be started: a deployment problem, not a task failure.
    #[error("failed to start the task shim `{program}`: {source}")]
    SpawnShim {
        program: String,
        #[source]
        source: io::Error,
    },

    /// A signal name the driver does not know ("SIGUSR1", "USR1" and "usr1" are known).
    #[error("unknown signal name `{0}`")]
    UnknownSignal(String),

    /// The kernel refused to deliver a signal for a reason other than "no such group".
    #[error("sending {signal} to process group {pgid}: {source}")]
    Signal {
        signal: &'static str,
        pgid: i32,
        #[source]
        source: io::Error,
    },

    /// The flags after `gangway task-shim` are malformed.
    #[error("task-shim arguments: {0}")]
    ShimArgs(String),
}

impl DriverError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        DriverError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}
