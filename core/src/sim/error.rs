//! Errors of the simulator: every one names the file, and where it can, the line or field.

use std::path::PathBuf;

/// Anything that stops a simulation before it starts (bad input) or while it runs (a broken invariant).
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A trace or machine-list row that cannot be read.
    #[error("{path}:{line}: {message}")]
    Csv {
        path: PathBuf,
        line: u64,
        message: String,
    },
    /// A cluster file that is not valid TOML.
    #[error("{path}: {message}")]
    TomlSyntax { path: PathBuf, message: String },
    /// A cluster file field that is wrong; `field` is the dotted path (`host_groups[1].count`).
    #[error("{path}: {field}: {message}")]
    Field {
        path: PathBuf,
        field: String,
        message: String,
    },
    /// A command-line argument that is wrong (time window, policy list).
    #[error("{0}")]
    Argument(String),
    /// The engine produced something the replay cannot apply; a bug, reported rather than hidden.
    #[error("simulation invariant broken: {0}")]
    Invariant(String),
}

impl SimError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SimError::Io {
            path: path.into(),
            source,
        }
    }
}
