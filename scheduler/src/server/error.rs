//! [`ApiError`]: every way a client or worker call can fail, with the stable code and gRPC status it
//! maps to at the edge.
//!
//! Codes travel in the `x-gangway-code` metadata key and never change once published; clients (the
//! CLI, the worker, scripts) branch on them instead of on message text. A call that this replica
//! cannot serve because it is not the leader carries the leader's address in `x-gangway-leader`.

use crate::state::Rejection;
use gangway_consensus::ConsensusError;
pub use gangway_proto::link::{CODE_KEY, LEADER_KEY};
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The job spec does not parse or validate; one `path: message` line per problem.
    #[error("{0}")]
    InvalidSpec(String),
    /// A request field is missing or malformed (not a job spec).
    #[error("field `{field}`: {message}")]
    InvalidArgument { field: String, message: String },
    /// The command reached the state machine, which refused it (same answer on every replica).
    #[error("{0}")]
    Rejected(Rejection),
    /// This replica cannot serve the call; the leader (if known) can.
    #[error("replica {replica} is not the leader; leader: {}", leader.as_deref().unwrap_or("unknown"))]
    NotLeader {
        replica: u64,
        leader: Option<String>,
    },
    /// No quorum or no answer: the outcome of a write is unknown.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Timeout(String),
    /// Operations the cluster configuration refuses (membership changes that would break quorum...).
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Internal(String),
    /// A bound on what one caller may hold is reached (watch streams of a node): retry later.
    #[error("{0}")]
    Exhausted(String),
    /// The caller is known but may not do this: which permission it lacks and what it has.
    #[error("permission_denied: {caller} lacks {permission} (it has {has})")]
    PermissionDenied {
        caller: String,
        permission: String,
        has: String,
    },
    /// The caller presented no identity (no client certificate, no known bearer token).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// A client submits faster than its rate (`[clients]` of the server configuration).
    #[error("client {client} submits faster than its rate limit; retry in {} ms", retry_after.as_millis())]
    RateLimited {
        client: String,
        retry_after: std::time::Duration,
    },
}

impl ApiError {
    /// This error, about the part of a request at `at` (`jobs[3]`, `reports[0]`): its field
    /// path under `at`.
    pub fn under(self, at: &str) -> Self {
        match self {
            ApiError::InvalidSpec(problems) => ApiError::InvalidSpec(format!("{at}: {problems}")),
            ApiError::InvalidArgument { field, message } => {
                ApiError::invalid(&format!("{at}.{field}"), message)
            }
            other => other,
        }
    }

    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        ApiError::InvalidArgument {
            field: field.to_owned(),
            message: message.into(),
        }
    }

    /// The stable code clients branch on.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidSpec(_) => "invalid_spec",
            ApiError::InvalidArgument { .. } => "invalid_argument",
            ApiError::Rejected(r) => r.code(),
            ApiError::NotLeader {
                leader: Some(_), ..
            } => "not_leader",
            ApiError::NotLeader { leader: None, .. } => "no_leader",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Timeout(_) => "timeout",
            ApiError::FailedPrecondition(_) => "failed_precondition",
            ApiError::Internal(_) => "internal",
            ApiError::Exhausted(_) | ApiError::RateLimited { .. } => "resource_exhausted",
            ApiError::PermissionDenied { .. } => "permission_denied",
            ApiError::Unauthenticated(_) => "unauthenticated",
        }
    }

    /// Whether the same call may succeed later or on another replica.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ApiError::NotLeader { .. } | ApiError::Unavailable(_) | ApiError::Timeout(_)
        )
    }

    fn grpc_code(&self) -> Code {
        match self {
            ApiError::InvalidSpec(_) | ApiError::InvalidArgument { .. } => Code::InvalidArgument,
            ApiError::Rejected(r) => match r {
                Rejection::UnknownNode(_)
                | Rejection::UnknownJob(_)
                | Rejection::UnknownTask { .. }
                | Rejection::UnknownDevice { .. } => Code::NotFound,
                Rejection::InvalidJob(_)
                | Rejection::InvalidLimits(_)
                | Rejection::InvalidAccess(_)
                | Rejection::InvalidBackup(_) => Code::InvalidArgument,
                Rejection::QueueFull { .. } => Code::ResourceExhausted,
                Rejection::WrongJobState { .. }
                | Rejection::NotEmpty { .. }
                | Rejection::BadNode { .. }
                | Rejection::StaleEpoch { .. } => Code::FailedPrecondition,
            },
            ApiError::NotLeader { .. } | ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::Timeout(_) => Code::DeadlineExceeded,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::Internal(_) => Code::Internal,
            ApiError::Exhausted(_) | ApiError::RateLimited { .. } => Code::ResourceExhausted,
            ApiError::PermissionDenied { .. } => Code::PermissionDenied,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
        }
    }

    /// A consensus-layer error seen by replica `replica`.
    pub fn from_consensus(replica: u64, e: ConsensusError) -> Self {
        match e {
            ConsensusError::NotLeader { leader_addr, .. } => ApiError::NotLeader {
                replica,
                leader: leader_addr,
            },
            ConsensusError::Unavailable(m) => ApiError::Unavailable(m),
            ConsensusError::Shutdown => ApiError::Unavailable("replica is shutting down".into()),
            ConsensusError::Timeout(m) => ApiError::Timeout(m),
            ConsensusError::Rejected(m) => ApiError::FailedPrecondition(m),
            e @ (ConsensusError::Storage(_) | ConsensusError::Fatal(_)) => {
                ApiError::Internal(e.to_string())
            }
        }
    }
}

/// A request's string field, trimmed; empty is an error naming the field.
pub fn required<'a>(field: &str, value: &'a str) -> Result<&'a str, ApiError> {
    let v = value.trim();
    if v.is_empty() {
        Err(ApiError::invalid(field, "required"))
    } else {
        Ok(v)
    }
}

impl From<gangway_proto::states::BadState> for ApiError {
    fn from(e: gangway_proto::states::BadState) -> Self {
        ApiError::InvalidArgument {
            field: e.field,
            message: e.message,
        }
    }
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> Self {
        match r {
            Rejection::InvalidJob(m) => ApiError::InvalidSpec(m),
            r => ApiError::Rejected(r),
        }
    }
}

/// How long a client is told to wait before submitting to a full queue again.
pub const QUEUE_FULL_RETRY_MS: u64 = 5_000;

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let mut status = Status::new(e.grpc_code(), e.to_string());
        let md = status.metadata_mut();
        md.insert(CODE_KEY, MetadataValue::from_static(e.code()));
        if let ApiError::NotLeader {
            leader: Some(addr), ..
        } = &e
        {
            if let Ok(v) = MetadataValue::try_from(addr.as_str()) {
                md.insert(LEADER_KEY, v);
            }
        }
        let retry_ms = match &e {
            // A full queue drains as its jobs are placed: a client may try again in a while.
            ApiError::Rejected(Rejection::QueueFull { .. }) | ApiError::Exhausted(_) => {
                Some(QUEUE_FULL_RETRY_MS)
            }
            ApiError::RateLimited { retry_after, .. } => Some(
                u64::try_from(retry_after.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1),
            ),
            _ => None,
        };
        if let Some(ms) = retry_ms {
            md.insert(
                gangway_proto::link::RETRY_AFTER_KEY,
                MetadataValue::from(ms),
            );
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gangway_proto::ids::JobId;

    #[test]
    fn statuses_carry_code_and_leader_hint() {
        let cases: Vec<(ApiError, Code, &str, Option<&str>)> = vec![
            (
                ApiError::InvalidSpec("tasks: expected 1 or more".into()),
                Code::InvalidArgument,
                "invalid_spec",
                None,
            ),
            (
                ApiError::NotLeader {
                    replica: 2,
                    leader: Some("127.0.0.1:7101".into()),
                },
                Code::Unavailable,
                "not_leader",
                Some("127.0.0.1:7101"),
            ),
            (
                ApiError::NotLeader {
                    replica: 2,
                    leader: None,
                },
                Code::Unavailable,
                "no_leader",
                None,
            ),
            (
                ApiError::from(Rejection::UnknownJob(JobId::new("j-9"))),
                Code::NotFound,
                "unknown_job",
                None,
            ),
            (
                ApiError::from(Rejection::StaleEpoch {
                    job: JobId::new("j-1"),
                    got: 1,
                    current: 2,
                }),
                Code::FailedPrecondition,
                "stale_epoch",
                None,
            ),
            (
                ApiError::from(Rejection::UnknownDevice {
                    node: gangway_proto::ids::HostName::new("h1"),
                    device: "GPU-x".into(),
                }),
                Code::NotFound,
                "unknown_device",
                None,
            ),
            (
                ApiError::from_consensus(1, ConsensusError::Timeout("t".into())),
                Code::DeadlineExceeded,
                "timeout",
                None,
            ),
        ];
        for (err, grpc, code, leader) in cases {
            let status = Status::from(err.clone());
            assert_eq!(status.code(), grpc, "{err}");
            assert_eq!(
                status.metadata().get(CODE_KEY).unwrap().to_str().unwrap(),
                code,
                "{err}"
            );
            assert_eq!(
                status
                    .metadata()
                    .get(LEADER_KEY)
                    .map(|v| v.to_str().unwrap()),
                leader,
                "{err}"
            );
        }
    }
}
