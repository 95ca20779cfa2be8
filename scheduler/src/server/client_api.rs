//! The client API (`gangway submit`, `jobs`, `nodes`, `cluster ...`): validation at the edge, one
//! replicated command per write, linearizable reads on the leader.
//!
//! Writes sent to a follower are forwarded to the leader by the consensus layer. Reads are served
//! by the leader only (a follower's state may be stale); a follower answers `not_leader` with the
//! leader's address, which clients follow.

use super::auth::Caller;
use super::context::ReplicaContext;
use super::convert;
use super::error::{required, ApiError};
use crate::engine::{HostFilter, IdlePolicy, NodeState, QueueConfig};
use crate::state::access::Permission;
use crate::state::{
    Command, DeviceFenceChange, JobState, NodeStateChange, Rejection, Response, Submission,
};
use gangway_consensus::Role;
use gangway_proto::ids::{HostName, JobId, QueueName};
use gangway_proto::pb;
use gangway_proto::pb::client_api_server::ClientApi;
use gangway_proto::spec::JobSpec;
use std::collections::BTreeSet;
use std::ops::Bound;
use std::pin::Pin;
use std::time::Instant;
use tonic::{Request, Response as TonicResponse, Status};

/// Snapshot bytes per streamed chunk.
const SNAPSHOT_CHUNK: usize = 1 << 20;
/// Largest backup a restore accepts: it becomes one Raft entry, held in memory on every replica.
const MAX_RESTORE_BYTES: usize = 1 << 30;
/// Longest idempotency key accepted (it is kept in the replicated state).
const MAX_IDEMPOTENCY_KEY: usize = 256;

pub struct ClientService {
    ctx: ReplicaContext,
    /// Submissions per client address (a client's identity until certificates carry one).
    submits: governor::DefaultKeyedRateLimiter<std::net::IpAddr>,
}

impl ClientService {
    pub fn new(ctx: ReplicaContext) -> Self {
        let c = &ctx.config.clients;
        let one = std::num::NonZeroU32::MIN;
        let quota = governor::Quota::per_second(
            std::num::NonZeroU32::new(c.submit_per_second).unwrap_or(one),
        )
        .allow_burst(std::num::NonZeroU32::new(c.submit_burst).unwrap_or(one));
        Self {
            ctx,
            submits: governor::RateLimiter::keyed(quota),
        }
    }

    /// Refuses a submission past its client's rate, with how long to wait.
    fn admit_submit(&self, from: Option<std::net::SocketAddr>) -> Result<(), ApiError> {
        let Some(addr) = from else {
            return Ok(());
        };
        // Forget clients that have been quiet long enough to be back at a full burst.
        if self.submits.len() > 10_000 {
            self.submits.retain_recent();
        }
        self.submits.check_key(&addr.ip()).map_err(|not_until| {
            use governor::clock::Clock;
            let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
            ApiError::RateLimited {
                client: addr.ip().to_string(),
                retry_after: wait.max(std::time::Duration::from_millis(1)),
            }
        })
    }
}

type Reply<T> = Result<TonicResponse<T>, Status>;

impl ClientService {
    /// Whether `caller` may change `job`: its owner never changes after submission, so this
    /// replica's own state answers. A job this replica does not (yet) know is refused as unknown
    /// to callers who may not manage every job.
    fn check_job_owner(&self, caller: &Caller, job: &JobId) -> Result<(), ApiError> {
        if caller.grant.has(Permission::ManageAnyJob) {
            return Ok(());
        }
        let owner = self
            .ctx
            .raft
            .read_local(|fsm| fsm.store().job(job).map(|j| j.owner.clone()));
        match owner {
            Some(owner) => caller.require_job(&owner),
            None => Err(ApiError::from(Rejection::UnknownJob(job.clone()))),
        }
    }
}

fn ok<T>(v: T) -> Reply<T> {
    Ok(TonicResponse::new(v))
}

/// Request metadata key: `local` lets any replica answer a read from its own, possibly stale, state
/// (for operators inspecting a follower, and for tests comparing replicas). Default: linearizable.
pub use gangway_proto::link::CONSISTENCY_KEY;

fn local_read<T>(req: &Request<T>) -> bool {
    req.metadata()
        .get(CONSISTENCY_KEY)
        .is_some_and(|v| v.as_bytes() == b"local")
}

impl ClientService {
    /// A read on the leader (linearizable), or on this replica's own state when asked for.
    async fn read<R>(
        &self,
        local: bool,
        f: impl FnOnce(&super::fsm::SchedulerFsm) -> R,
    ) -> Result<R, ApiError> {
        if local {
            Ok(self.ctx.raft.read_local(f))
        } else {
            self.ctx.read(f).await
        }
    }
}

fn parse_job_states(states: &[i32]) -> Result<BTreeSet<JobState>, ApiError> {
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
const MAX_REASON: usize = 1024;

/// An operator's reason: trimmed, "by an operator" when empty, at most [`MAX_REASON`] bytes.
fn operator_reason(field: &str, reason: String) -> Result<String, ApiError> {
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

#[tonic::async_trait]
impl ClientApi for ClientService {
    async fn submit_job(&self, req: Request<pb::SubmitJobRequest>) -> Reply<pb::SubmitJobReply> {
        self.admit_submit(req.remote_addr())?;
        let caller = Caller::of(&req);
        let req = req.into_inner();
        let spec = JobSpec::from_toml_str(&req.spec_toml)
            .map_err(|e| ApiError::InvalidSpec(e.to_string()))?;
        caller.require_submit(&spec.queue)?;
        let key = req.idempotency_key.trim();
        if key.len() > MAX_IDEMPOTENCY_KEY {
            return Err(ApiError::invalid(
                "idempotency_key",
                format!(
                    "expected at most {MAX_IDEMPOTENCY_KEY} bytes, got {}",
                    key.len()
                ),
            )
            .into());
        }
        let command = Command::SubmitJob(Submission {
            idempotency_key: (!key.is_empty()).then(|| key.to_owned()),
            spec,
            owner: caller.owner(),
        });
        match self.ctx.write(command).await? {
            Response::Submitted { job, existing } => ok(pb::SubmitJobReply {
                job_id: job.to_string(),
                existing,
            }),
            other => Err(ApiError::Internal(format!("unexpected response {other:?}")).into()),
        }
    }

    async fn cancel_job(&self, req: Request<pb::CancelJobRequest>) -> Reply<pb::Empty> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        let job = JobId::new(required("job_id", &req.job_id)?);
        self.check_job_owner(&caller, &job)?;
        let reason = if req.reason.trim().is_empty() {
            "cancelled by user".to_owned()
        } else {
            req.reason
        };
        self.ctx.write(Command::CancelJob { job, reason }).await?;
        ok(pb::Empty {})
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Reply<pb::JobDetail> {
        let id = JobId::new(required("job_id", &req.get_ref().job_id)?);
        let detail = self
            .read(local_read(&req), |fsm| {
                // A job past its retention is read from this replica's archive.
                let archived = || {
                    let archive = fsm.archive()?;
                    match archive.get(&id) {
                        Ok(job) => job,
                        Err(e) => {
                            tracing::warn!(job = %id, error = %e, "job archive read failed");
                            None
                        }
                    }
                };
                fsm.store()
                    .job(&id)
                    .map(convert::job_detail)
                    .or_else(|| archived().as_ref().map(convert::job_detail))
            })
            .await?;
        match detail {
            Some(d) => ok(d),
            None => Err(ApiError::from(Rejection::UnknownJob(id)).into()),
        }
    }

    async fn list_jobs(&self, req: Request<pb::ListJobsRequest>) -> Reply<pb::ListJobsReply> {
        let local = local_read(&req);
        let req = req.into_inner();
        let states = parse_job_states(&req.states)?;
        let queue = req.queue.trim().to_owned();
        let size = page_size(req.page_size)?;
        let after = (!req.page_token.is_empty()).then(|| JobId::new(req.page_token.clone()));
        let keep = |j: &crate::state::JobRecord| {
            (states.is_empty() || states.contains(&j.state))
                && (queue.is_empty() || j.spec.queue == queue)
        };
        let (jobs, more) = self
            .read(local, |fsm| {
                if req.archived {
                    return archived_page(fsm, after.as_ref(), size, &keep);
                }
                let from = match &after {
                    Some(a) => Bound::Excluded(a.clone()),
                    None => Bound::Unbounded,
                };
                let mut page: Vec<pb::JobSummary> = fsm
                    .store()
                    .jobs()
                    .range((from, Bound::Unbounded))
                    .map(|(_, j)| j)
                    .filter(|j| keep(j))
                    .take(size + 1)
                    .map(convert::job_summary)
                    .collect();
                let more = page.len() > size;
                page.truncate(size);
                Ok((page, more))
            })
            .await??;
        let next_page_token = match (more, jobs.last()) {
            (true, Some(last)) => last.id.clone(),
            _ => String::new(),
        };
        ok(pb::ListJobsReply {
            jobs,
            next_page_token,
        })
    }

    async fn list_nodes(&self, req: Request<pb::PageRequest>) -> Reply<pb::ListNodesReply> {
        let heartbeats = self.ctx.heartbeats.clone();
        let now = Instant::now();
        let local = local_read(&req);
        let page = req.into_inner();
        let size = page_size(page.page_size)?;
        let after = HostName::new(page.page_token.clone());
        let (nodes, next_page_token) = self
            .read(local, |fsm| {
                let store = fsm.store();
                let from = match page.page_token.is_empty() {
                    true => Bound::Unbounded,
                    false => Bound::Excluded(&after),
                };
                let items = store.nodes().range::<HostName, _>((from, Bound::Unbounded));
                paged(items.map(|(name, n)| (name.to_string(), n)), size, |n| {
                    let age = heartbeats
                        .silence(&n.registration.name, now)
                        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                    convert::node_info(store, n, age)
                })
            })
            .await?;
        ok(pb::ListNodesReply {
            nodes,
            next_page_token,
        })
    }

    async fn set_node_state(&self, req: Request<pb::SetNodeStateRequest>) -> Reply<pb::Empty> {
        let req = req.into_inner();
        let node = HostName::new(required("node", &req.node)?);
        let state = parse_operator_node_state(req.state.trim())?;
        let grace_ms = drain_grace(state, req.drain_grace_ms)?;
        let reason = if req.reason.trim().is_empty() {
            format!("set to {state} by an operator")
        } else {
            req.reason
        };
        self.ctx
            .write(Command::SetNodeState(NodeStateChange {
                node,
                state,
                reason,
                grace_ms,
            }))
            .await?;
        ok(pb::Empty {})
    }

    async fn set_device_fence(&self, req: Request<pb::SetDeviceFenceRequest>) -> Reply<pb::Empty> {
        let req = req.into_inner();
        let node = HostName::new(required("node", &req.node)?);
        let device = super::worker_api::device_name("device", &req.device)?.to_owned();
        let reason = operator_reason("reason", req.reason)?;
        self.ctx
            .write(Command::FenceDevice(DeviceFenceChange {
                node,
                device,
                fenced: req.fenced,
                reason,
            }))
            .await?;
        ok(pb::Empty {})
    }

    async fn remove_node(&self, req: Request<pb::RemoveNodeRequest>) -> Reply<pb::Empty> {
        let req = req.into_inner();
        let node = HostName::new(required("node", &req.node)?);
        let reason = operator_reason("reason", req.reason)?;
        self.ctx.write(Command::RemoveNode { node, reason }).await?;
        ok(pb::Empty {})
    }

    async fn list_leases(&self, req: Request<pb::PageRequest>) -> Reply<pb::ListLeasesReply> {
        let local = local_read(&req);
        let page = req.into_inner();
        let size = page_size(page.page_size)?;
        let (leases, next_page_token) = self
            .read(local, |fsm| {
                // The running index, in job id order: costs what holds a lease, not history.
                let running = fsm.store().job_table().running();
                let items = running
                    .filter(|j| {
                        page.page_token.is_empty() || j.id.as_str() > page.page_token.as_str()
                    })
                    .map(|j| (j.id.to_string(), j));
                paged(items, size, convert::lease_info)
            })
            .await?;
        ok(pb::ListLeasesReply {
            leases,
            next_page_token,
        })
    }

    async fn list_queues(&self, req: Request<pb::Empty>) -> Reply<pb::ListQueuesReply> {
        let queues = self
            .read(local_read(&req), |fsm| convert::queues(fsm.store()))
            .await?;
        ok(pb::ListQueuesReply { queues })
    }

    async fn set_limits(&self, req: Request<pb::Limits>) -> Reply<pb::Limits> {
        let req = req.into_inner();
        let current = self.ctx.leader_read(|fsm| *fsm.store().limits()).await?;
        let or = |asked: u64, now: u64| if asked == 0 { now } else { asked };
        let limits = crate::state::Limits {
            finished_retention_ms: or(req.finished_retention_ms, current.finished_retention_ms),
            max_finished: or(req.max_finished, current.max_finished as u64) as usize,
            idempotency_window_ms: or(req.idempotency_window_ms, current.idempotency_window_ms),
            max_pending_per_queue: or(
                req.max_pending_per_queue,
                current.max_pending_per_queue as u64,
            ) as usize,
        };
        self.ctx.write(Command::SetLimits(limits)).await?;
        ok(pb::Limits {
            finished_retention_ms: limits.finished_retention_ms,
            max_finished: limits.max_finished as u64,
            idempotency_window_ms: limits.idempotency_window_ms,
            max_pending_per_queue: limits.max_pending_per_queue as u64,
        })
    }

    async fn set_queue(&self, req: Request<pb::QueueInfo>) -> Reply<pb::Empty> {
        let req = req.into_inner();
        let name = required("name", &req.name)?;
        if name.len() > 128
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(ApiError::invalid(
                "name",
                "expected up to 128 characters of letters, digits, '-', '_' or '.'",
            )
            .into());
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
                    )
                    .into());
                }
                if !(1_000..=7 * 24 * 3_600_000).contains(&req.idle_window_ms) {
                    return Err(ApiError::invalid(
                        "idle_window_ms",
                        "expected a window from 1 s to 7 days",
                    )
                    .into());
                }
                Some(IdlePolicy {
                    window_ms: req.idle_window_ms,
                    threshold_pct: req.idle_threshold_pct,
                    action,
                })
            }
        };
        let queue = QueueConfig {
            name: QueueName::new(name),
            guaranteed_milli: req.guaranteed_milli,
            may_borrow: req.may_borrow,
            idle,
        };
        self.ctx.write(Command::SetQueue(queue)).await?;
        ok(pb::Empty {})
    }

    async fn checkpoint_job(&self, req: Request<pb::CheckpointJobRequest>) -> Reply<pb::Empty> {
        let job = JobId::new(required("job_id", &req.get_ref().job_id)?);
        self.check_job_owner(&Caller::of(&req), &job)?;
        self.ctx
            .write(Command::RequestCheckpoint {
                job,
                reason: "requested by user".to_owned(),
            })
            .await?;
        ok(pb::Empty {})
    }

    async fn migrate_job(&self, req: Request<pb::MigrateJobRequest>) -> Reply<pb::Empty> {
        let req = req.into_inner();
        let job = JobId::new(required("job_id", &req.job_id)?);
        let hosts = |field: &str, names: Vec<String>| -> Result<BTreeSet<HostName>, ApiError> {
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
            )
            .into());
        }
        self.ctx.write(Command::MigrateJob { job, hosts }).await?;
        ok(pb::Empty {})
    }

    async fn defrag_plan(&self, req: Request<pb::Empty>) -> Reply<pb::DefragPlanReply> {
        let base = super::leader::engine_config(&self.ctx);
        let (view, (pending, state), config) = self
            .read(local_read(&req), |fsm| {
                let store = fsm.store();
                (
                    store.engine().clone(),
                    {
                        let read = store.round_input(true);
                        (read.pending.into_owned(), read.state)
                    },
                    store.scheduler_config(&base),
                )
            })
            .await?;
        let now = super::context::wall_clock_ms();
        let reply = tokio::task::spawn_blocking(move || {
            convert::defrag_preview(&view, &pending, &config, &state, now)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("defragmentation preview failed: {e}")))?;
        ok(reply)
    }

    async fn defrag_status(&self, req: Request<pb::Empty>) -> Reply<pb::DefragStatusReply> {
        let s = &self.ctx.config.scheduler;
        let (enabled, max_moves) = (s.defrag, s.defrag_max_moves);
        let reservation_ms = u64::try_from(s.defrag_reservation.as_millis()).unwrap_or(u64::MAX);
        let mut reply = self.read(local_read(&req), convert::defrag_status).await?;
        reply.enabled = enabled;
        reply.max_moves = u32::try_from(max_moves).unwrap_or(u32::MAX);
        reply.reservation_ms = reservation_ms;
        ok(reply)
    }

    async fn cluster_status(&self, _req: Request<pb::Empty>) -> Reply<pb::ClusterStatusReply> {
        // Served by any replica from its own view: this is how an operator finds the leader.
        let m = self.ctx.raft.metrics();
        let leader = self.ctx.raft.leader();
        let role = match m.role {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::Learner => "learner",
            Role::Shutdown => "shutdown",
        };
        let last = m.last_log_index.unwrap_or(0);
        let members = m
            .members
            .iter()
            .map(|(id, addr)| pb::MemberInfo {
                id: *id,
                address: addr.clone(),
                voter: m.voters.contains(id),
                matched_index: if *id == m.id {
                    last
                } else {
                    m.replication_lag
                        .get(id)
                        .map_or(0, |lag| last.saturating_sub(*lag))
                },
            })
            .collect();
        ok(pb::ClusterStatusReply {
            replica_id: m.id,
            leader_id: leader.as_ref().map_or(0, |(id, _)| *id),
            leader_address: leader.map(|(_, a)| a).unwrap_or_default(),
            term: m.term,
            commit_index: m.committed_index.unwrap_or(0),
            applied_index: m.applied_index.unwrap_or(0),
            members,
            role: role.to_owned(),
            started_at_ms: super::drill::process_started_ms(),
        })
    }

    async fn transfer_leader(&self, req: Request<pb::TransferLeaderRequest>) -> Reply<pb::Empty> {
        let to = req.get_ref().to;
        if to == 0 {
            return Err(ApiError::invalid("to", "expected a replica id of 1 or more").into());
        }
        self.ctx.leader_only()?;
        self.ctx
            .raft
            .transfer_leader(to)
            .await
            .map_err(|e| ApiError::from_consensus(self.ctx.id(), e))?;
        ok(pb::Empty {})
    }

    async fn add_member(&self, req: Request<pb::AddMemberRequest>) -> Reply<pb::Empty> {
        let req = req.into_inner();
        if req.id == 0 {
            return Err(ApiError::invalid("id", "expected a replica id of 1 or more").into());
        }
        let addr = required("address", &req.address)?;
        if addr.parse::<std::net::SocketAddr>().is_err() && !addr.contains(':') {
            return Err(ApiError::invalid("address", "expected host:port").into());
        }
        self.ctx.leader_only()?;
        let id = self.ctx.id();
        self.ctx
            .raft
            .add_learner(req.id, addr)
            .await
            .map_err(|e| ApiError::from_consensus(id, e))?;
        if req.voter {
            self.ctx
                .raft
                .promote(BTreeSet::from([req.id]))
                .await
                .map_err(|e| ApiError::from_consensus(id, e))?;
        }
        ok(pb::Empty {})
    }

    async fn remove_member(&self, req: Request<pb::RemoveMemberRequest>) -> Reply<pb::Empty> {
        let target = req.get_ref().id;
        self.ctx.leader_only()?;
        let m = self.ctx.raft.metrics();
        if !m.members.contains_key(&target) {
            return Err(
                ApiError::invalid("id", format!("replica {target} is not a member")).into(),
            );
        }
        if m.voters.contains(&target) && m.voters.len() == 1 {
            return Err(ApiError::FailedPrecondition(
                "refusing to remove the last voter: the cluster would have no quorum".into(),
            )
            .into());
        }
        self.ctx
            .raft
            .remove(BTreeSet::from([target]))
            .await
            .map_err(|e| ApiError::from_consensus(self.ctx.id(), e))?;
        ok(pb::Empty {})
    }

    type SaveSnapshotStream =
        Pin<Box<dyn futures::Stream<Item = Result<pb::SnapshotChunk, Status>> + Send>>;

    async fn save_snapshot(&self, _req: Request<pb::Empty>) -> Reply<Self::SaveSnapshotStream> {
        let bytes = self
            .ctx
            .read(serde_json::to_vec)
            .await?
            .map_err(|e| ApiError::Internal(format!("encode snapshot: {e}")))?;
        let chunks: Vec<Result<pb::SnapshotChunk, Status>> = bytes
            .chunks(SNAPSHOT_CHUNK)
            .map(|c| Ok(pb::SnapshotChunk { data: c.to_vec() }))
            .collect();
        let stream: Self::SaveSnapshotStream = Box::pin(futures::stream::iter(chunks));
        ok(stream)
    }

    async fn restore_snapshot(
        &self,
        req: Request<tonic::Streaming<pb::SnapshotChunk>>,
    ) -> Reply<pb::RestoreSnapshotReply> {
        let mut stream = req.into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.message().await? {
            if bytes.len() + chunk.data.len() > MAX_RESTORE_BYTES {
                return Err(ApiError::invalid(
                    "data",
                    format!("expected a snapshot of at most {MAX_RESTORE_BYTES} bytes"),
                )
                .into());
            }
            bytes.extend_from_slice(&chunk.data);
        }
        let (state, backup_revision) =
            super::fsm::SchedulerFsm::from_backup(&bytes).map_err(|e| {
                ApiError::invalid(
                    "data",
                    format!("expected a snapshot written by `gangway cluster snapshot save`: {e}"),
                )
            })?;
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let reply = pb::RestoreSnapshotReply {
            nodes: count(state.nodes().len()),
            jobs: count(state.jobs().len()),
            requeued: count(state.jobs().values().filter(|j| j.lease.is_some()).count()),
            backup_revision,
        };
        self.ctx
            .write(Command::Restore {
                state: Box::new(state),
                backup_revision,
            })
            .await?;
        ok(reply)
    }

    async fn drill(&self, req: Request<pb::DrillRequest>) -> Reply<pb::DrillReply> {
        // Served here, never forwarded: a drill is aimed at one replica.
        ok(super::drill::run(&self.ctx, req.get_ref())?)
    }

    async fn who_am_i(&self, req: Request<pb::Empty>) -> Reply<pb::WhoAmIReply> {
        ok(super::access_api::who_am_i(&Caller::of(&req)))
    }

    async fn list_access(&self, _req: Request<pb::Empty>) -> Reply<pb::AccessRules> {
        ok(super::access_api::list(&self.ctx).await?)
    }

    async fn set_access(&self, req: Request<pb::SetAccessRequest>) -> Reply<pb::Empty> {
        super::access_api::set(&self.ctx, req.into_inner()).await?;
        ok(pb::Empty {})
    }

    async fn list_audit(&self, _req: Request<pb::ListAuditRequest>) -> Reply<pb::ListAuditReply> {
        Err(Status::unimplemented("the audit trail is being built"))
    }
}

/// Jobs a listing returns when the request does not say, and the most it may ask for.
const DEFAULT_PAGE: usize = 1_000;
const MAX_PAGE: usize = 5_000;

fn page_size(asked: u32) -> Result<usize, ApiError> {
    match asked as usize {
        0 => Ok(DEFAULT_PAGE),
        n if n <= MAX_PAGE => Ok(n),
        n => Err(ApiError::InvalidArgument {
            field: "page_size".into(),
            message: format!("expected at most {MAX_PAGE}, got {n}"),
        }),
    }
}

/// The first `size` of `items` (keyed, in key order) as `show` renders them, and the key to go
/// on from when more follow (empty when none do).
fn paged<'a, T: 'a, R>(
    mut items: impl Iterator<Item = (String, &'a T)>,
    size: usize,
    show: impl Fn(&T) -> R,
) -> (Vec<R>, String) {
    let mut out = Vec::with_capacity(size.min(1024));
    let mut last = String::new();
    for (key, item) in items.by_ref().take(size) {
        out.push(show(item));
        last = key;
    }
    let more = items.next().is_some();
    (out, if more { last } else { String::new() })
}

/// A page of archived jobs after `after` that `keep` accepts, and whether more may follow.
fn archived_page(
    fsm: &super::fsm::SchedulerFsm,
    after: Option<&JobId>,
    size: usize,
    keep: &dyn Fn(&crate::state::JobRecord) -> bool,
) -> Result<(Vec<pb::JobSummary>, bool), ApiError> {
    let Some(archive) = fsm.archive() else {
        return Ok((Vec::new(), false));
    };
    let mut out = Vec::new();
    let mut cursor = after.cloned();
    // Read in chunks until the page is full or the archive ends (a filter may skip many).
    loop {
        let chunk = archive
            .page(cursor.as_ref(), size + 1)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let end = chunk.len() <= size;
        for job in &chunk {
            cursor = Some(job.id.clone());
            if keep(job) {
                out.push(convert::job_summary(job));
                if out.len() > size {
                    out.truncate(size);
                    return Ok((out, true));
                }
            }
        }
        if end {
            return Ok((out, false));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn job_state_filters_name_the_field() {
        let running = i32::from(pb::JobState::Running);
        assert_eq!(parse_job_states(&[running]).unwrap().len(), 1);
        let err = parse_job_states(&[running, 9]).unwrap_err();
        assert!(err.to_string().starts_with("field `states[1]`"), "{err}");
    }
}
