//! The client's typed error and its exit code.

use gangway_proto::spec::SpecError;
use gangway_proto::states::BadState;
use std::time::Duration;

/// Exit code: a generic error.
pub const EXIT_ERROR: u8 = 1;
/// Exit code: the job cannot be placed (yet).
pub const EXIT_NOT_PLACEABLE: u8 = 2;
/// Exit code: an invalid job spec or invalid arguments.
pub const EXIT_INVALID: u8 = 3;
/// Exit code: no leader could be reached before the deadline.
pub const EXIT_NO_LEADER: u8 = 5;

/// Everything a client command can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No replica answered as (or led to) the leader before the deadline.
    #[error(
        "no leader reachable within {} (tried {}); last error: {last}",
        humantime::format_duration(*.waited),
        .tried.join(", ")
    )]
    NoLeader {
        waited: Duration,
        /// Every replica contacted, as `host:port`, in order of first contact.
        tried: Vec<String>,
        last: String,
    },
    /// A replica answered with an error that retrying would not change.
    #[error("{addr}: {method}: {}", server_message(.code, .gangway_code.as_deref(), .message))]
    Server {
        addr: String,
        method: &'static str,
        code: tonic::Code,
        /// The `x-gangway-code` metadata, when the server sent one.
        gangway_code: Option<String>,
        message: String,
    },
    /// A write that is not safe to resend failed in a way that leaves its outcome unknown.
    #[error(
        "{addr}: {method}: outcome unknown ({message}); the change may or may not have been \
         applied, check before retrying"
    )]
    OutcomeUnknown {
        addr: String,
        method: &'static str,
        message: String,
    },
    /// A reply holds a value this build does not know (a newer server, a broken peer).
    #[error("{method}: the reply is not understood: {problem}")]
    BadReply {
        method: &'static str,
        problem: BadState,
    },
    /// The job spec failed local validation.
    #[error("{0}")]
    InvalidSpec(SpecError),
    /// A bad argument found after parsing (a file that cannot be read, a value out of range).
    #[error("{0}")]
    Usage(String),
    /// `submit --wait`: the job was not running when the wait ended.
    #[error(
        "job {job_id} is not running after {}: {reason}",
        humantime::format_duration(*.waited)
    )]
    NotPlaceable {
        job_id: String,
        waited: Duration,
        reason: String,
    },
    /// A local file operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// Anything else (a broken stream, a job that failed while waited on).
    #[error("{0}")]
    Other(String),
}

fn server_message(code: &tonic::Code, gangway_code: Option<&str>, message: &str) -> String {
    let tag = gangway_code.map_or_else(|| format!("{code:?}"), str::to_owned);
    if gangway_code == Some("invalid_spec") {
        let mut s = "invalid job spec (rejected by the server)".to_owned();
        for line in message.lines() {
            s.push_str("\n  ");
            s.push_str(line);
        }
        return s;
    }
    format!("{message} [{tag}]")
}

impl ClientError {
    /// The process exit code for this error (documented in `gangway --help`).
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::NoLeader { .. } => EXIT_NO_LEADER,
            ClientError::InvalidSpec(_) | ClientError::Usage(_) => EXIT_INVALID,
            ClientError::Server {
                code, gangway_code, ..
            } => {
                if gangway_code.as_deref() == Some("invalid_spec")
                    || *code == tonic::Code::InvalidArgument
                {
                    EXIT_INVALID
                } else {
                    EXIT_ERROR
                }
            }
            ClientError::NotPlaceable { .. } => EXIT_NOT_PLACEABLE,
            ClientError::OutcomeUnknown { .. }
            | ClientError::BadReply { .. }
            | ClientError::Io { .. }
            | ClientError::Other(_) => EXIT_ERROR,
        }
    }

    /// The `x-gangway-code` of a server error.
    #[cfg(test)]
    pub fn gangway_code(&self) -> Option<&str> {
        match self {
            ClientError::Server { gangway_code, .. } => gangway_code.as_deref(),
            _ => None,
        }
    }

    /// True when no replica could be reached (a watch keeps going through these).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::NoLeader { .. })
    }
}
