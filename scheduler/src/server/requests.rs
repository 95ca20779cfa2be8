//! Client API requests as commands: every check and conversion a handler makes before it
//! writes, as plain functions of the request (no replica needed), so the fuzz targets
//! (`crate::fuzz`) run the very code the handlers run. Each problem names its field.

use super::convert;
use super::error::{required, ApiError};
use crate::engine::{HostFilter, IdlePolicy, NodeState, QueueConfig};
use crate::state::{ClusterStore, DeviceFenceChange, JobState, Limits, NodeStateChange};
use gangway_proto::ids::{HostName, JobId, QueueName};
use gangway_proto::pb;
use gangway_proto::spec::JobSpec;
use std::collections::BTreeSet;

/// Longest idempotency key accepted (it is kept in the replicated state).
pub const MAX_IDEMPOTENCY_KEY: usize = 256;
/// Most hosts a migration may name in `to` or `avoid`.
pub const MAX_MIGRATION_HOSTS: usize = 1_024;
/// Longest queue name.
pub const MAX_QUEUE_NAME: usize = 128;

pub fn parse_job_states(states: &[i32]) -> Result<BTreeSet<JobState>, ApiError> {
    states
        .iter()
        .enumerate()
        .map(|(i, s)| convert::job_state_from_pb(&format!("states[{i}]"), *s))
        .collect()
}

/// The states an operator may set; `down` is the leader's verdict alone.
pub fn parse_operator_node_state(s: &str) -> Result<NodeState, ApiError> {
    match s {
        "ready" => Ok(NodeState::Ready),
        "cordoned" => Ok(NodeState::Cordoned),
        "draining" => Ok(NodeState::Draining),
        other => Err(ApiError::invalid(
            "state",
            format!("expected ready, cordoned or draining, got {other:?}"),
        )),
    }
}

/// The shortest and longest drain grace an operator may ask for.
pub const MIN_DRAIN_GRACE_MS: u64 = 1_000;
pub const MAX_DRAIN_GRACE_MS: u64 = 24 * 60 * 60 * 1000;

/// `drain_grace_ms` of a SetNodeState: 0 is the default ([`None`]); otherwise only for a drain,
/// and within [`MIN_DRAIN_GRACE_MS`]..=[`MAX_DRAIN_GRACE_MS`].
pub fn drain_grace(state: NodeState, grace_ms: u64) -> Result<Option<u64>, ApiError> {
    if grace_ms == 0 {
        return Ok(None);
    }
    if state != NodeState::Draining {
        return Err(ApiError::invalid(
            "drain_grace_ms",
            format!("applies to a drain only, not to state {state}"),
        ));
    }
    if !(MIN_DRAIN_GRACE_MS..=MAX_DRAIN_GRACE_MS).contains(&grace_ms) {
        return Err(ApiError::invalid(
            "drain_grace_ms",
            format!(
                "must be between {MIN_DRAIN_GRACE_MS} ms (1 s) and {MAX_DRAIN_GRACE_MS} ms (24 h), got {grace_ms}"
            ),
        ));
    }
    Ok(Some(grace_ms))
}

/// Longest operator reason accepted (it is kept in the replicated state).
pub const MAX_REASON: usize = 1024;

/// An operator's reason: trimmed, "by an operator" when empty, at most [`MAX_REASON`] bytes.
pub fn operator_reason(field: &str, reason: String) -> Result<String, ApiError> {
    let reason = reason.trim();
    if reason.len() > MAX_REASON {
        return Err(ApiError::invalid(
            field,
            format!("expected at most {MAX_REASON} bytes, got {}", reason.len()),
        ));
    }
    Ok(if reason.is_empty() {
        "by an operator".to_owned()
    } else {
        reason.to_owned()
    })
}

/// Jobs a listing returns when the request does not say, and the most it may ask for.
pub const DEFAULT_PAGE: usize = 1_000;
pub const MAX_PAGE: usize = 5_000;

pub fn page_size(asked: u32) -> Result<usize, ApiError> {
    match asked as usize {
        0 => Ok(DEFAULT_PAGE),
        n if n <= MAX_PAGE => Ok(n),
        n => Err(ApiError::InvalidArgument {
            field: "page_size".into(),
            message: format!("expected at most {MAX_PAGE}, got {n}"),
        }),
    }
}

/// A bounded free text: trimmed, `default` when empty, at most [`MAX_REASON`] bytes.
fn reason_or(
    field: &str,
    reason: String,
    default: impl FnOnce() -> String,
) -> Result<String, ApiError> {
    let trimmed = reason.trim();
    if trimmed.len() > MAX_REASON {
        return Err(ApiError::invalid(
            field,
            format!("expected at most {MAX_REASON} bytes, got {}", trimmed.len()),
        ));
    }
    Ok(if trimmed.is_empty() {
        default()
    } else {
        trimmed.to_owned()
    })
}

/// A `SubmitJob`: the validated spec and the idempotency key (`None` when empty).
pub fn submission(req: &pb::SubmitJobRequest) -> Result<(JobSpec, Option<String>), ApiError> {
    let spec =
        JobSpec::from_toml_str(&req.spec_toml).map_err(|e| ApiError::InvalidSpec(e.to_string()))?;
    let key = req.idempotency_key.trim();
    if key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(ApiError::invalid(
            "idempotency_key",
            format!(
                "expected at most {MAX_IDEMPOTENCY_KEY} bytes, got {}",
                key.len()
            ),
        ));
    }
    Ok((spec, (!key.is_empty()).then(|| key.to_owned())))
}

/// A `SubmitJobs`: every job as [`submission`] reads it, a job array expanded (see the proto),
/// each problem under `jobs[i]`.
pub fn submissions(
    req: &pb::SubmitJobsRequest,
) -> Result<Vec<(JobSpec, Option<String>)>, ApiError> {
    use crate::state::MAX_BATCH_JOBS;
    let within = |field: &str, n: usize| {
        if (1..=MAX_BATCH_JOBS).contains(&n) {
            Ok(())
        } else {
            Err(ApiError::invalid(
                field,
                format!("expected 1..={MAX_BATCH_JOBS} jobs, got {n}"),
            ))
        }
    };
    if req.array_size == 0 {
        within("jobs", req.jobs.len())?;
        return req
            .jobs
            .iter()
            .enumerate()
            .map(|(i, job)| submission(job).map_err(|e| e.under(&format!("jobs[{i}]"))))
            .collect();
    }
    within("array_size", req.array_size as usize)?;
    let [job] = req.jobs.as_slice() else {
        return Err(ApiError::invalid(
            "jobs",
            format!("a job array takes exactly one spec, got {}", req.jobs.len()),
        ));
    };
    let (spec, key) = submission(job).map_err(|e| e.under("jobs[0]"))?;
    let size = req.array_size;
    if key
        .as_ref()
        .is_some_and(|k| k.len() + 1 + size.to_string().len() > MAX_IDEMPOTENCY_KEY)
    {
        return Err(ApiError::invalid(
            "jobs[0].idempotency_key",
            format!(
                "with the `/<index>` an array adds, expected at most {MAX_IDEMPOTENCY_KEY} bytes"
            ),
        ));
    }
    Ok((0..size)
        .map(|i| {
            let mut spec = spec.clone();
            spec.env.insert(ARRAY_INDEX_ENV.to_owned(), i.to_string());
            spec.env.insert(ARRAY_SIZE_ENV.to_owned(), size.to_string());
            (spec, key.as_ref().map(|k| format!("{k}/{i}")))
        })
        .collect())
}

/// Set by a job array on each of its jobs (names the worker's own variables cannot take).
pub const ARRAY_INDEX_ENV: &str = "GANGWAY_ARRAY_INDEX";
pub const ARRAY_SIZE_ENV: &str = "GANGWAY_ARRAY_SIZE";

/// A `CancelJob`: the job and the reason kept in its history.
pub fn cancel(req: pb::CancelJobRequest) -> Result<(JobId, String), ApiError> {
    let job = JobId::new(required("job_id", &req.job_id)?);
    let reason = reason_or("reason", req.reason, || "cancelled by user".to_owned())?;
    Ok((job, reason))
}

/// A `SetNodeState`: cordon, drain (with its grace) or readmit a node.
pub fn node_state_change(req: pb::SetNodeStateRequest) -> Result<NodeStateChange, ApiError> {
    let node = HostName::new(required("node", &req.node)?);
    let state = parse_operator_node_state(req.state.trim())?;
    let grace_ms = drain_grace(state, req.drain_grace_ms)?;
    let reason = reason_or("reason", req.reason, || {
        format!("set to {state} by an operator")
    })?;
    Ok(NodeStateChange {
        node,
        state,
        reason,
        grace_ms,
    })
}

/// A `SetDeviceFence`: fence or unfence one device of a node.
pub fn fence_change(req: pb::SetDeviceFenceRequest) -> Result<DeviceFenceChange, ApiError> {
    let node = HostName::new(required("node", &req.node)?);
    let device = super::worker_api::device_name("device", &req.device)?.to_owned();
    let reason = operator_reason("reason", req.reason)?;
    Ok(DeviceFenceChange {
        node,
        device,
        fenced: req.fenced,
        reason,
    })
}

/// A `RemoveNode`: the node and the reason.
pub fn node_removal(req: pb::RemoveNodeRequest) -> Result<(HostName, String), ApiError> {
    let node = HostName::new(required("node", &req.node)?);
    Ok((node, operator_reason("reason", req.reason)?))
}

/// A `SetLimits`: each limit asked for, `current`'s where the request says 0 (the state machine
/// checks the result whole).
pub fn limits(req: &pb::Limits, current: Limits) -> Limits {
    let or = |asked: u64, now: u64| if asked == 0 { now } else { asked };
    let size =
        |asked: u64, now: usize| usize::try_from(or(asked, now as u64)).unwrap_or(usize::MAX);
    Limits {
        finished_retention_ms: or(req.finished_retention_ms, current.finished_retention_ms),
        max_finished: size(req.max_finished, current.max_finished),
        idempotency_window_ms: or(req.idempotency_window_ms, current.idempotency_window_ms),
        max_pending_per_queue: size(req.max_pending_per_queue, current.max_pending_per_queue),
        max_audit_entries: size(req.max_audit_entries, current.max_audit_entries),
    }
}

/// The limits as the API shows them.
pub fn limits_to_pb(limits: &Limits) -> pb::Limits {
    pb::Limits {
        finished_retention_ms: limits.finished_retention_ms,
        max_finished: limits.max_finished as u64,
        idempotency_window_ms: limits.idempotency_window_ms,
        max_pending_per_queue: limits.max_pending_per_queue as u64,
        max_audit_entries: limits.max_audit_entries as u64,
    }
}

/// A `SetQueue`: the queue's whole configuration.
pub fn queue_config(req: pb::QueueInfo) -> Result<QueueConfig, ApiError> {
    let name = required("name", &req.name)?;
    if name.len() > MAX_QUEUE_NAME
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(ApiError::invalid(
            "name",
            format!(
                "expected up to {MAX_QUEUE_NAME} characters of letters, digits, '-', '_' or '.'"
            ),
        ));
    }
    let idle = match req.idle_action.as_str() {
        "" | "off" => None,
        action => {
            let action = action.parse().map_err(|e: String| {
                ApiError::invalid("idle_action", format!("{e}, or empty for no idle policy"))
            })?;
            if !(1..=100).contains(&req.idle_threshold_pct) {
                return Err(ApiError::invalid(
                    "idle_threshold_pct",
                    "expected a utilization percentage from 1 to 100 (a device below it counts as idle)",
                ));
            }
            if !(1_000..=7 * 24 * 3_600_000).contains(&req.idle_window_ms) {
                return Err(ApiError::invalid(
                    "idle_window_ms",
                    "expected a window from 1 s to 7 days",
                ));
            }
            Some(IdlePolicy {
                window_ms: req.idle_window_ms,
                threshold_pct: req.idle_threshold_pct,
                action,
            })
        }
    };
    Ok(QueueConfig {
        name: QueueName::new(name),
        guaranteed_milli: req.guaranteed_milli,
        may_borrow: req.may_borrow,
        idle,
    })
}

/// A `MigrateJob`: the job and where it may (`to`) and may not (`avoid`) go.
pub fn migration(req: pb::MigrateJobRequest) -> Result<(JobId, HostFilter), ApiError> {
    let job = JobId::new(required("job_id", &req.job_id)?);
    let hosts = |field: &str, names: Vec<String>| -> Result<BTreeSet<HostName>, ApiError> {
        if names.len() > MAX_MIGRATION_HOSTS {
            return Err(ApiError::invalid(
                field,
                format!(
                    "expected at most {MAX_MIGRATION_HOSTS} hosts, got {}",
                    names.len()
                ),
            ));
        }
        names
            .iter()
            .enumerate()
            .map(|(i, n)| Ok(HostName::new(required(&format!("{field}[{i}]"), n)?)))
            .collect()
    };
    let hosts = HostFilter {
        only: hosts("to", req.to)?,
        avoid: hosts("avoid", req.avoid)?,
    };
    if let Some(both) = hosts.only.intersection(&hosts.avoid).next() {
        return Err(ApiError::invalid(
            "avoid",
            format!("host {both} is also named in `to`; a host cannot be both"),
        ));
    }
    Ok((job, hosts))
}

/// An `AddMember`: the new replica's id and address.
pub fn new_member(req: &pb::AddMemberRequest) -> Result<(u64, String), ApiError> {
    if req.id == 0 {
        return Err(ApiError::invalid(
            "id",
            "expected a replica id of 1 or more",
        ));
    }
    let addr = required("address", &req.address)?;
    if addr.parse::<std::net::SocketAddr>().is_err() && !addr.contains(':') {
        return Err(ApiError::invalid("address", "expected host:port"));
    }
    Ok((req.id, addr.to_owned()))
}

/// A `RestoreSnapshot`'s bytes: the backup's state and the revision it was taken at.
pub fn backup(bytes: &[u8]) -> Result<(ClusterStore, u64), ApiError> {
    super::fsm::SchedulerFsm::from_backup(bytes).map_err(|e| {
        ApiError::invalid(
            "data",
            format!("expected a snapshot written by `gangway cluster snapshot save`: {e}"),
        )
    })
}

/// A `ListJobs`' filters: the states (empty: all), the queue (empty: all), the page size.
pub fn job_filter(
    req: &pb::ListJobsRequest,
) -> Result<(BTreeSet<JobState>, String, usize), ApiError> {
    Ok((
        parse_job_states(&req.states)?,
        req.queue.trim().to_owned(),
        page_size(req.page_size)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(spec: &str, key: &str) -> pb::SubmitJobRequest {
        pb::SubmitJobRequest {
            spec_toml: spec.into(),
            idempotency_key: key.into(),
        }
    }

    const SPEC: &str = "name = \"s\"\ncommand = [\"true\"]\n[resources]\ndevices = 1\n";

    #[test]
    fn a_job_array_is_its_spec_n_times_each_with_its_index_and_key() {
        let req = pb::SubmitJobsRequest {
            jobs: vec![job(SPEC, "sweep")],
            array_size: 3,
        };
        let jobs = submissions(&req).unwrap();
        assert_eq!(jobs.len(), 3);
        for (i, (spec, key)) in jobs.iter().enumerate() {
            assert_eq!(spec.env[ARRAY_INDEX_ENV], i.to_string());
            assert_eq!(spec.env[ARRAY_SIZE_ENV], "3");
            assert_eq!(key.as_deref(), Some(format!("sweep/{i}").as_str()));
        }
        let unkeyed = pb::SubmitJobsRequest {
            jobs: vec![job(SPEC, "")],
            array_size: 2,
        };
        assert!(submissions(&unkeyed)
            .unwrap()
            .iter()
            .all(|(_, k)| k.is_none()));
    }

    #[test]
    fn a_bad_batch_names_the_field_and_the_job() {
        let cases = [
            (vec![], 0, "field `jobs`"),
            (
                vec![job(SPEC, ""); 1_001],
                0,
                "field `jobs`: expected 1..=1000 jobs, got 1001",
            ),
            (vec![job(SPEC, "")], 1_001, "field `array_size`"),
            (
                vec![job(SPEC, ""), job(SPEC, "")],
                5,
                "exactly one spec, got 2",
            ),
            (
                vec![job(SPEC, ""), job("tasks = 0", "")],
                0,
                "jobs[1]: invalid job spec",
            ),
            (
                vec![job(SPEC, &"k".repeat(300))],
                0,
                "field `jobs[0].idempotency_key`",
            ),
            (
                vec![job(SPEC, &"k".repeat(254))],
                10,
                "field `jobs[0].idempotency_key`",
            ),
        ];
        for (jobs, array_size, expected) in cases {
            let n = jobs.len();
            let err = submissions(&pb::SubmitJobsRequest { jobs, array_size }).unwrap_err();
            assert!(
                err.to_string().contains(expected),
                "{n} jobs, array {array_size}: {err}"
            );
        }
        // A key that fits with the longest index suffix is taken.
        let fits = pb::SubmitJobsRequest {
            jobs: vec![job(SPEC, &"k".repeat(253))],
            array_size: 10,
        };
        assert_eq!(submissions(&fits).unwrap().len(), 10);
    }

    #[test]
    fn operators_cannot_declare_a_node_down() {
        assert_eq!(
            parse_operator_node_state("draining").unwrap(),
            NodeState::Draining
        );
        let err = parse_operator_node_state("down").unwrap_err();
        assert!(err.to_string().contains("field `state`"), "{err}");
    }

    #[test]
    fn a_drain_grace_is_bounded_and_for_drains_only() {
        let d = NodeState::Draining;
        assert_eq!(drain_grace(d, 0).unwrap(), None, "0: the default");
        assert_eq!(drain_grace(d, 2_000).unwrap(), Some(2_000));
        assert_eq!(drain_grace(d, MIN_DRAIN_GRACE_MS).unwrap(), Some(1_000));
        assert_eq!(
            drain_grace(d, MAX_DRAIN_GRACE_MS).unwrap(),
            Some(MAX_DRAIN_GRACE_MS)
        );
        for bad in [999, MAX_DRAIN_GRACE_MS + 1] {
            let err = drain_grace(d, bad).unwrap_err();
            assert!(err.to_string().contains("field `drain_grace_ms`"), "{err}");
        }
        let err = drain_grace(NodeState::Cordoned, 5_000).unwrap_err();
        assert!(err.to_string().contains("drain only"), "{err}");
        assert_eq!(drain_grace(NodeState::Ready, 0).unwrap(), None);
    }

    #[test]
    fn free_texts_and_host_lists_are_bounded_and_name_their_field() {
        let long = "x".repeat(MAX_REASON + 1);
        let cancel = cancel(pb::CancelJobRequest {
            job_id: "j".into(),
            reason: long.clone(),
        });
        assert!(cancel.unwrap_err().to_string().contains("field `reason`"));
        let (_, reason) = super::cancel(pb::CancelJobRequest {
            job_id: "j".into(),
            reason: "  ".into(),
        })
        .unwrap();
        assert_eq!(reason, "cancelled by user");
        let change = node_state_change(pb::SetNodeStateRequest {
            node: "h1".into(),
            state: "cordoned".into(),
            reason: long,
            drain_grace_ms: 0,
        });
        assert!(change.unwrap_err().to_string().contains("field `reason`"));
        let many = vec!["h".to_owned(); MAX_MIGRATION_HOSTS + 1];
        let err = migration(pb::MigrateJobRequest {
            job_id: "j".into(),
            avoid: many,
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("field `avoid`"), "{err}");
        let err = migration(pb::MigrateJobRequest {
            job_id: "j".into(),
            to: vec!["h1".into()],
            avoid: vec!["h1".into()],
        })
        .unwrap_err();
        assert!(err.to_string().contains("cannot be both"), "{err}");
    }

    #[test]
    fn limits_keep_what_the_request_leaves_at_zero() {
        let current = Limits::default();
        let asked = pb::Limits {
            max_audit_entries: 77,
            ..Default::default()
        };
        let l = limits(&asked, current);
        assert_eq!(l.max_audit_entries, 77);
        assert_eq!(l.max_finished, current.max_finished);
        assert_eq!(limits_to_pb(&l).max_audit_entries, 77);
    }

    #[test]
    fn job_state_filters_name_the_field() {
        let running = i32::from(pb::JobState::Running);
        assert_eq!(parse_job_states(&[running]).unwrap().len(), 1);
        let err = parse_job_states(&[running, 9]).unwrap_err();
        assert!(err.to_string().starts_with("field `states[1]`"), "{err}");
    }
}
