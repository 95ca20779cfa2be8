//! `ListAudit` (`gangway audit`): the audit trail of the replicated state, newest first (the
//! policy table lets only holders of `read_audit` call it; this validates and converts).

use super::error::ApiError;
use crate::state::audit::MAX_AUDIT_FIELD;
use crate::state::AuditLog;
use gangway_proto::pb;

/// Entries a listing returns when the request does not say, and the most it may ask for.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 5_000;

/// A validated `ListAuditRequest`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditQuery {
    pub limit: usize,
    /// Only this identity's entries, when set.
    pub actor: Option<String>,
}

impl AuditQuery {
    pub fn from_pb(req: &pb::ListAuditRequest) -> Result<AuditQuery, ApiError> {
        let limit = match req.limit as usize {
            0 => DEFAULT_LIMIT,
            n if n <= MAX_LIMIT => n,
            n => {
                return Err(ApiError::invalid(
                    "limit",
                    format!("expected at most {MAX_LIMIT} entries, got {n}"),
                ))
            }
        };
        let actor = req.actor.trim();
        if actor.len() > MAX_AUDIT_FIELD {
            return Err(ApiError::invalid(
                "actor",
                format!(
                    "expected an identity of at most {MAX_AUDIT_FIELD} bytes, got {}",
                    actor.len()
                ),
            ));
        }
        Ok(AuditQuery {
            limit,
            actor: (!actor.is_empty()).then(|| actor.to_owned()),
        })
    }

    /// The entries of `log` this query asks for, newest first.
    pub fn answer(&self, log: &AuditLog) -> Vec<pb::AuditEntry> {
        log.newest_first()
            .filter(|e| self.actor.as_ref().is_none_or(|a| *a == e.actor))
            .take(self.limit)
            .map(|e| pb::AuditEntry {
                at_ms: e.at_ms,
                actor: e.actor.clone(),
                action: e.action.clone(),
                target: e.target.clone(),
                outcome: e.outcome.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::AuditEntry;

    #[test]
    fn a_query_is_bounded_and_names_its_fields() {
        let q = |limit, actor: &str| {
            AuditQuery::from_pb(&pb::ListAuditRequest {
                limit,
                actor: actor.into(),
            })
        };
        assert_eq!(q(0, "").unwrap().limit, DEFAULT_LIMIT);
        assert_eq!(
            q(5_000, " client/a ").unwrap().actor.as_deref(),
            Some("client/a")
        );
        let err = q(5_001, "").unwrap_err().to_string();
        assert!(err.contains("field `limit`"), "{err}");
        let err = q(1, &"x".repeat(MAX_AUDIT_FIELD + 1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("field `actor`"), "{err}");
    }

    #[test]
    fn answers_are_newest_first_filtered_and_limited() {
        let mut log = AuditLog::default();
        for i in 0..10u64 {
            log.record(
                AuditEntry {
                    at_ms: i,
                    actor: format!("client/u{}", i % 2),
                    action: "submit_job".into(),
                    target: format!("j-{i}"),
                    outcome: "ok".into(),
                },
                100,
            );
        }
        let all = AuditQuery {
            limit: 3,
            actor: None,
        }
        .answer(&log);
        let times: Vec<u64> = all.iter().map(|e| e.at_ms).collect();
        assert_eq!(times, [9, 8, 7]);
        let mine = AuditQuery {
            limit: 100,
            actor: Some("client/u0".into()),
        }
        .answer(&log);
        assert_eq!(mine.len(), 5);
        assert!(mine.iter().all(|e| e.actor == "client/u0"));
        assert_eq!(mine[0].target, "j-8");
    }
}
