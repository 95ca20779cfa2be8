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
use super::requests::{self, page_size};
use crate::state::access::Permission;
use crate::state::{Command, Rejection, Response, Submission};
use gangway_consensus::Role;
use gangway_proto::ids::{HostName, JobId};
use gangway_proto::pb;
use gangway_proto::pb::client_api_server::ClientApi;
use std::collections::BTreeSet;
use std::ops::Bound;
use std::pin::Pin;
use std::time::Instant;
use tonic::{Request, Response as TonicResponse, Status};

/// Snapshot bytes per streamed chunk.
const SNAPSHOT_CHUNK: usize = 1 << 20;
/// Largest backup a restore accepts: it becomes one Raft entry, held in memory on every replica.
const MAX_RESTORE_BYTES: usize = 1 << 30;

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

#[tonic::async_trait]
impl ClientApi for ClientService {
    async fn submit_job(&self, req: Request<pb::SubmitJobRequest>) -> Reply<pb::SubmitJobReply> {
        self.admit_submit(req.remote_addr())?;
        let caller = Caller::of(&req);
        let (spec, idempotency_key) = requests::submission(req.get_ref())?;
        caller.require_submit(&spec.queue)?;
        let command = Command::SubmitJob(Submission {
            idempotency_key,
            spec,
            owner: caller.owner(),
        });
        match self.ctx.write_as(&caller, command).await? {
            Response::Submitted { job, existing } => ok(pb::SubmitJobReply {
                job_id: job.to_string(),
                existing,
            }),
            other => Err(ApiError::Internal(format!("unexpected response {other:?}")).into()),
        }
    }

    async fn submit_jobs(&self, req: Request<pb::SubmitJobsRequest>) -> Reply<pb::SubmitJobsReply> {
        self.admit_submit(req.remote_addr())?;
        let caller = Caller::of(&req);
        let batch = requests::submissions(req.get_ref())?;
        let queues: BTreeSet<&str> = batch.iter().map(|(spec, _)| spec.queue.as_str()).collect();
        for queue in queues {
            caller.require_submit(queue)?;
        }
        let owner = caller.owner();
        let command = Command::SubmitJobs(
            batch
                .into_iter()
                .map(|(spec, idempotency_key)| Submission {
                    idempotency_key,
                    spec,
                    owner: owner.clone(),
                })
                .collect(),
        );
        match self.ctx.write_as(&caller, command).await? {
            Response::SubmittedJobs(jobs) => ok(pb::SubmitJobsReply {
                jobs: jobs
                    .into_iter()
                    .map(|j| pb::SubmitJobReply {
                        job_id: j.job.to_string(),
                        existing: j.existing,
                    })
                    .collect(),
            }),
            other => Err(ApiError::Internal(format!("unexpected response {other:?}")).into()),
        }
    }

    async fn cancel_job(&self, req: Request<pb::CancelJobRequest>) -> Reply<pb::Empty> {
        let caller = Caller::of(&req);
        let (job, reason) = requests::cancel(req.into_inner())?;
        self.check_job_owner(&caller, &job)?;
        self.ctx
            .write_as(&caller, Command::CancelJob { job, reason })
            .await?;
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
        let (states, queue, size) = requests::job_filter(&req)?;
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
        let caller = Caller::of(&req);
        let change = requests::node_state_change(req.into_inner())?;
        self.ctx
            .write_as(&caller, Command::SetNodeState(change))
            .await?;
        ok(pb::Empty {})
    }

    async fn set_device_fence(&self, req: Request<pb::SetDeviceFenceRequest>) -> Reply<pb::Empty> {
        let caller = Caller::of(&req);
        let change = requests::fence_change(req.into_inner())?;
        self.ctx
            .write_as(&caller, Command::FenceDevice(change))
            .await?;
        ok(pb::Empty {})
    }

    async fn remove_node(&self, req: Request<pb::RemoveNodeRequest>) -> Reply<pb::Empty> {
        let caller = Caller::of(&req);
        let (node, reason) = requests::node_removal(req.into_inner())?;
        self.ctx
            .write_as(&caller, Command::RemoveNode { node, reason })
            .await?;
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
        let caller = Caller::of(&req);
        let current = self.ctx.leader_read(|fsm| *fsm.store().limits()).await?;
        let limits = requests::limits(req.get_ref(), current);
        self.ctx
            .write_as(&caller, Command::SetLimits(limits))
            .await?;
        ok(requests::limits_to_pb(&limits))
    }

    async fn set_queue(&self, req: Request<pb::QueueInfo>) -> Reply<pb::Empty> {
        let caller = Caller::of(&req);
        let queue = requests::queue_config(req.into_inner())?;
        self.ctx.write_as(&caller, Command::SetQueue(queue)).await?;
        ok(pb::Empty {})
    }

    async fn checkpoint_job(&self, req: Request<pb::CheckpointJobRequest>) -> Reply<pb::Empty> {
        let job = JobId::new(required("job_id", &req.get_ref().job_id)?);
        let caller = Caller::of(&req);
        self.check_job_owner(&caller, &job)?;
        let reason = "requested by user".to_owned();
        self.ctx
            .write_as(&caller, Command::RequestCheckpoint { job, reason })
            .await?;
        ok(pb::Empty {})
    }

    async fn migrate_job(&self, req: Request<pb::MigrateJobRequest>) -> Reply<pb::Empty> {
        let caller = Caller::of(&req);
        let (job, hosts) = requests::migration(req.into_inner())?;
        self.ctx
            .write_as(&caller, Command::MigrateJob { job, hosts })
            .await?;
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
            insecure: self.ctx.config.tls.insecure,
        })
    }

    async fn transfer_leader(&self, req: Request<pb::TransferLeaderRequest>) -> Reply<pb::Empty> {
        let caller = Caller::of(&req);
        let to = req.get_ref().to;
        if to == 0 {
            return Err(ApiError::invalid("to", "expected a replica id of 1 or more").into());
        }
        self.ctx.leader_only()?;
        let outcome = self
            .ctx
            .raft
            .transfer_leader(to)
            .await
            .map_err(|e| ApiError::from_consensus(self.ctx.id(), e));
        let target = format!("replica {to}");
        self.ctx
            .audit_note(&caller, "transfer_leader", target, outcome.as_ref().err())
            .await;
        outcome?;
        ok(pb::Empty {})
    }

    async fn add_member(&self, req: Request<pb::AddMemberRequest>) -> Reply<pb::Empty> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        let (member, addr) = requests::new_member(&req)?;
        self.ctx.leader_only()?;
        let id = self.ctx.id();
        let outcome = async {
            self.ctx
                .raft
                .add_learner(member, addr.clone())
                .await
                .map_err(|e| ApiError::from_consensus(id, e))?;
            if req.voter {
                self.ctx
                    .raft
                    .promote(BTreeSet::from([member]))
                    .await
                    .map_err(|e| ApiError::from_consensus(id, e))?;
            }
            Ok(())
        }
        .await;
        let role = if req.voter { "voter" } else { "learner" };
        let target = format!("replica {member} at {addr} as a {role}");
        self.ctx
            .audit_note(&caller, "add_member", target, outcome.as_ref().err())
            .await;
        outcome?;
        ok(pb::Empty {})
    }

    async fn remove_member(&self, req: Request<pb::RemoveMemberRequest>) -> Reply<pb::Empty> {
        let caller = Caller::of(&req);
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
        let outcome = self
            .ctx
            .raft
            .remove(BTreeSet::from([target]))
            .await
            .map_err(|e| ApiError::from_consensus(self.ctx.id(), e));
        self.ctx
            .audit_note(
                &caller,
                "remove_member",
                format!("replica {target}"),
                outcome.as_ref().err(),
            )
            .await;
        outcome?;
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
        let caller = Caller::of(&req);
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
        let (state, backup_revision) = requests::backup(&bytes)?;
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let reply = pb::RestoreSnapshotReply {
            nodes: count(state.nodes().len()),
            jobs: count(state.jobs().len()),
            requeued: count(state.jobs().values().filter(|j| j.lease.is_some()).count()),
            backup_revision,
        };
        let restore = Command::Restore {
            state: Box::new(state),
            backup_revision,
        };
        self.ctx.write_as(&caller, restore).await?;
        ok(reply)
    }

    async fn drill(&self, req: Request<pb::DrillRequest>) -> Reply<pb::DrillReply> {
        // Served here, never forwarded: a drill is aimed at one replica.
        let caller = Caller::of(&req);
        ok(super::drill::run_audited(&self.ctx, &caller, req.get_ref()).await?)
    }

    async fn who_am_i(&self, req: Request<pb::Empty>) -> Reply<pb::WhoAmIReply> {
        ok(super::access_api::who_am_i(&Caller::of(&req)))
    }

    async fn list_access(&self, _req: Request<pb::Empty>) -> Reply<pb::AccessRules> {
        ok(super::access_api::list(&self.ctx).await?)
    }

    async fn set_access(&self, req: Request<pb::SetAccessRequest>) -> Reply<pb::Empty> {
        let caller = Caller::of(&req);
        let change = super::access_api::change_from_pb(req.into_inner())?;
        self.ctx
            .write_as(&caller, Command::SetAccess(change))
            .await?;
        ok(pb::Empty {})
    }

    async fn list_audit(&self, req: Request<pb::ListAuditRequest>) -> Reply<pb::ListAuditReply> {
        let local = local_read(&req);
        let query = super::audit_api::AuditQuery::from_pb(req.get_ref())?;
        let entries = self
            .read(local, |fsm| query.answer(fsm.store().audit()))
            .await?;
        ok(pb::ListAuditReply { entries })
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
