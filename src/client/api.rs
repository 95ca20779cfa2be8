//! One typed method per client RPC, each with its resend rule stated once, here.

use super::{Client, ClientError, Resend};
use gangway_proto::pb;
use gangway_proto::states::{job_state, task_state, BadState};
use tonic::codec::Streaming;

impl Client {
    /// Submits a spec. Safe to resend: the server creates one job per idempotency key.
    pub async fn submit_job(
        &mut self,
        spec_toml: &str,
        idempotency_key: &str,
    ) -> Result<pb::SubmitJobReply, ClientError> {
        self.call("SubmitJob", Resend::Safe, |mut api| {
            let req = pb::SubmitJobRequest {
                spec_toml: spec_toml.to_owned(),
                idempotency_key: idempotency_key.to_owned(),
            };
            async move { api.submit_job(req).await }
        })
        .await
    }

    /// Submits several jobs in one request (all or none); `array_size` above 0 makes the one
    /// spec a job array. Resent like one job: each job's idempotency key holds across resends.
    pub async fn submit_jobs(
        &mut self,
        jobs: Vec<pb::SubmitJobRequest>,
        array_size: u32,
    ) -> Result<pb::SubmitJobsReply, ClientError> {
        self.call("SubmitJobs", Resend::Safe, |mut api| {
            let req = pb::SubmitJobsRequest {
                jobs: jobs.clone(),
                array_size,
            };
            async move { api.submit_jobs(req).await }
        })
        .await
    }

    /// Cancels a job. Not resent after an unknown outcome: a second cancel of a job the first one
    /// ended fails with `wrong_job_state`, which would hide that the first one worked.
    pub async fn cancel_job(&mut self, job_id: &str, reason: &str) -> Result<(), ClientError> {
        self.call("CancelJob", Resend::UnlessOutcomeUnknown, |mut api| {
            let req = pb::CancelJobRequest {
                job_id: job_id.to_owned(),
                reason: reason.to_owned(),
            };
            async move { api.cancel_job(req).await }
        })
        .await
        .map(|_| ())
    }

    /// Asks a running job to checkpoint. Not resent after an unknown outcome: each call is one
    /// more checkpoint request.
    pub async fn checkpoint_job(&mut self, job_id: &str) -> Result<(), ClientError> {
        self.call("CheckpointJob", Resend::UnlessOutcomeUnknown, |mut api| {
            let req = pb::CheckpointJobRequest {
                job_id: job_id.to_owned(),
            };
            async move { api.checkpoint_job(req).await }
        })
        .await
        .map(|_| ())
    }

    /// Moves a running job. Not resent after an unknown outcome: a second call would be refused
    /// while the first migration waits, hiding that it was accepted.
    pub async fn migrate_job(
        &mut self,
        job_id: &str,
        to: &[String],
        avoid: &[String],
    ) -> Result<(), ClientError> {
        self.call("MigrateJob", Resend::UnlessOutcomeUnknown, |mut api| {
            let req = pb::MigrateJobRequest {
                job_id: job_id.to_owned(),
                to: to.to_vec(),
                avoid: avoid.to_vec(),
            };
            async move { api.migrate_job(req).await }
        })
        .await
        .map(|_| ())
    }

    /// The defragmenter's preview; changes nothing.
    pub async fn defrag_plan(&mut self) -> Result<pb::DefragPlanReply, ClientError> {
        self.call("DefragPlan", Resend::Safe, |mut api| async move {
            api.defrag_plan(pb::Empty {}).await
        })
        .await
    }

    /// The defragmenter's settings and what it has under way.
    pub async fn defrag_status(&mut self) -> Result<pb::DefragStatusReply, ClientError> {
        self.call("DefragStatus", Resend::Safe, |mut api| async move {
            api.defrag_status(pb::Empty {}).await
        })
        .await
    }

    /// A job and its tasks; every state in the reply is one this build knows.
    pub async fn get_job(&mut self, job_id: &str) -> Result<pb::JobDetail, ClientError> {
        let detail = self
            .call("GetJob", Resend::Safe, |mut api| {
                let req = pb::GetJobRequest {
                    job_id: job_id.to_owned(),
                };
                async move { api.get_job(req).await }
            })
            .await?;
        check_detail(&detail).map_err(|problem| ClientError::BadReply {
            method: "GetJob",
            problem,
        })?;
        Ok(detail)
    }

    /// The jobs in `states` (empty: all) of `queue` (empty: all), live or (`archived`) from the
    /// archive, page after page until the listing ends or `limit` jobs came; every state in the
    /// reply is one this build knows.
    pub async fn list_jobs(
        &mut self,
        states: &[pb::JobState],
        queue: &str,
        archived: bool,
        limit: Option<usize>,
    ) -> Result<Vec<pb::JobSummary>, ClientError> {
        let mut jobs = Vec::new();
        let mut token = String::new();
        loop {
            let want = limit.map_or(PAGE, |l| l.saturating_sub(jobs.len()).min(PAGE));
            let reply = self
                .call("ListJobs", Resend::Safe, |mut api| {
                    let req = pb::ListJobsRequest {
                        states: states.iter().map(|s| *s as i32).collect(),
                        queue: queue.to_owned(),
                        page_size: want as u32,
                        page_token: token.clone(),
                        archived,
                    };
                    async move { api.list_jobs(req).await }
                })
                .await?;
            jobs.extend(reply.jobs);
            let full = limit.is_some_and(|l| jobs.len() >= l);
            if reply.next_page_token.is_empty() || full {
                break;
            }
            token = reply.next_page_token;
        }
        for (i, j) in jobs.iter().enumerate() {
            job_state(&format!("jobs[{i}].state"), j.state).map_err(|problem| {
                ClientError::BadReply {
                    method: "ListJobs",
                    problem,
                }
            })?;
        }
        Ok(jobs)
    }

    /// Every node, page after page.
    pub async fn list_nodes(&mut self) -> Result<Vec<pb::NodeInfo>, ClientError> {
        self.every_page(
            "ListNodes",
            |mut api, req| async move { api.list_nodes(req).await },
            |r: pb::ListNodesReply| (r.nodes, r.next_page_token),
        )
        .await
    }

    /// Sets a node's state. Safe to resend: it sets an absolute state, so applying it twice is
    /// the same as once.
    ///
    /// A drain with `grace` gives the node's work that long to checkpoint and move off before
    /// what still runs there is stopped and re-queued (None: the cluster's default, 10 minutes).
    pub async fn set_node_state(
        &mut self,
        node: &str,
        state: &str,
        reason: &str,
        grace: Option<std::time::Duration>,
    ) -> Result<(), ClientError> {
        // 0 on the wire means "the default": a grace under 1 ms travels as 1 ms, to be refused.
        let drain_grace_ms = grace.map_or(0, |g| {
            u64::try_from(g.as_millis()).unwrap_or(u64::MAX).max(1)
        });
        self.call("SetNodeState", Resend::Safe, |mut api| {
            let req = pb::SetNodeStateRequest {
                node: node.to_owned(),
                state: state.to_owned(),
                reason: reason.to_owned(),
                drain_grace_ms,
            };
            async move { api.set_node_state(req).await }
        })
        .await
        .map(|_| ())
    }

    /// Fences a device or returns it to service. Safe to resend: it sets an absolute state.
    pub async fn set_device_fence(
        &mut self,
        node: &str,
        device: &str,
        fenced: bool,
        reason: &str,
    ) -> Result<(), ClientError> {
        self.call("SetDeviceFence", Resend::Safe, |mut api| {
            let req = pb::SetDeviceFenceRequest {
                node: node.to_owned(),
                device: device.to_owned(),
                fenced,
                reason: reason.to_owned(),
            };
            async move { api.set_device_fence(req).await }
        })
        .await
        .map(|_| ())
    }

    /// Removes a node. Not resent after an unknown outcome: a second call after the first one
    /// worked fails with `unknown_node`, which would hide that the node is gone.
    pub async fn remove_node(&mut self, node: &str, reason: &str) -> Result<(), ClientError> {
        self.call("RemoveNode", Resend::UnlessOutcomeUnknown, |mut api| {
            let req = pb::RemoveNodeRequest {
                node: node.to_owned(),
                reason: reason.to_owned(),
            };
            async move { api.remove_node(req).await }
        })
        .await
        .map(|_| ())
    }

    /// Every lease, page after page.
    pub async fn list_leases(&mut self) -> Result<Vec<pb::LeaseInfo>, ClientError> {
        self.every_page(
            "ListLeases",
            |mut api, req| async move { api.list_leases(req).await },
            |r: pb::ListLeasesReply| (r.leases, r.next_page_token),
        )
        .await
    }

    /// A paged listing read to its end: `send` asks for one page, `split` takes a reply apart
    /// into its items and the token of the next page (empty at the end).
    async fn every_page<R, T, Fut>(
        &mut self,
        method: &'static str,
        send: impl Fn(super::credentials::Api, pb::PageRequest) -> Fut,
        split: impl Fn(R) -> (Vec<T>, String),
    ) -> Result<Vec<T>, ClientError>
    where
        Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let req = pb::PageRequest {
                page_size: PAGE as u32,
                page_token: token.clone(),
            };
            let reply = self
                .call(method, Resend::Safe, |api| send(api, req.clone()))
                .await?;
            let (items, next) = split(reply);
            out.extend(items);
            if next.is_empty() {
                return Ok(out);
            }
            token = next;
        }
    }

    pub async fn list_queues(&mut self) -> Result<Vec<pb::QueueInfo>, ClientError> {
        self.call("ListQueues", Resend::Safe, |mut api| async move {
            api.list_queues(pb::Empty {}).await
        })
        .await
        .map(|r| r.queues)
    }

    /// Sets a queue's quota and idle policy (the whole configuration). Safe to resend: it sets
    /// absolute values.
    pub async fn set_queue(&mut self, queue: &pb::QueueInfo) -> Result<(), ClientError> {
        self.call("SetQueue", Resend::Safe, |mut api| {
            let req = queue.clone();
            async move { api.set_queue(req).await }
        })
        .await
        .map(|_| ())
    }

    pub async fn who_am_i(&mut self) -> Result<pb::WhoAmIReply, ClientError> {
        self.call("WhoAmI", Resend::Safe, |mut api| async move {
            api.who_am_i(pb::Empty {}).await
        })
        .await
    }

    pub async fn list_access(&mut self) -> Result<pb::AccessRules, ClientError> {
        self.call("ListAccess", Resend::Safe, |mut api| async move {
            api.list_access(pb::Empty {}).await
        })
        .await
    }

    /// Sets one rule absolutely: safe to resend.
    pub async fn set_access(&mut self, req: pb::SetAccessRequest) -> Result<(), ClientError> {
        self.call("SetAccess", Resend::Safe, |mut api| {
            let req = req.clone();
            async move { api.set_access(req).await }
        })
        .await
        .map(|_| ())
    }

    pub async fn cluster_status(&mut self) -> Result<pb::ClusterStatusReply, ClientError> {
        self.call("ClusterStatus", Resend::Safe, |mut api| async move {
            api.cluster_status(pb::Empty {}).await
        })
        .await
    }

    /// Moves leadership. Not resent after an unknown outcome: the first may have moved it already.
    /// Changes the limits given (0: keep) and returns those in force. Safe to resend: setting the
    /// same limits twice is setting them once.
    pub async fn set_limits(&mut self, limits: pb::Limits) -> Result<pb::Limits, ClientError> {
        self.call("SetLimits", Resend::Safe, |mut api| {
            let req = limits;
            async move { api.set_limits(req).await }
        })
        .await
    }

    pub async fn transfer_leader(&mut self, to: u64) -> Result<(), ClientError> {
        self.call("TransferLeader", Resend::UnlessOutcomeUnknown, |mut api| {
            let req = pb::TransferLeaderRequest { to };
            async move { api.transfer_leader(req).await }
        })
        .await
        .map(|_| ())
    }

    /// Adds a member. Not resent after an unknown outcome (membership changes are one at a time).
    pub async fn add_member(
        &mut self,
        id: u64,
        address: &str,
        voter: bool,
    ) -> Result<(), ClientError> {
        self.call("AddMember", Resend::UnlessOutcomeUnknown, |mut api| {
            let req = pb::AddMemberRequest {
                id,
                address: address.to_owned(),
                voter,
            };
            async move { api.add_member(req).await }
        })
        .await
        .map(|_| ())
    }

    /// Removes a member. Not resent after an unknown outcome.
    pub async fn remove_member(&mut self, id: u64) -> Result<(), ClientError> {
        self.call("RemoveMember", Resend::UnlessOutcomeUnknown, |mut api| {
            let req = pb::RemoveMemberRequest { id };
            async move { api.remove_member(req).await }
        })
        .await
        .map(|_| ())
    }

    /// Opens the snapshot stream (the opening is retried; a stream that breaks is not resumed).
    pub async fn save_snapshot(&mut self) -> Result<Streaming<pb::SnapshotChunk>, ClientError> {
        self.call("SaveSnapshot", Resend::Safe, |mut api| async move {
            api.save_snapshot(pb::Empty {}).await
        })
        .await
    }

    /// Loads a backup into an empty cluster, in 1 MiB chunks. Not resent once the outcome is
    /// unknown (a second try would only be refused: the cluster is no longer empty).
    pub async fn restore_snapshot(
        &mut self,
        backup: &[u8],
    ) -> Result<pb::RestoreSnapshotReply, ClientError> {
        self.call(
            "RestoreSnapshot",
            Resend::UnlessOutcomeUnknown,
            |mut api| {
                let chunks: Vec<pb::SnapshotChunk> = backup
                    .chunks(1 << 20)
                    .map(|c| pb::SnapshotChunk { data: c.to_vec() })
                    .collect();
                async move { api.restore_snapshot(tokio_stream::iter(chunks)).await }
            },
        )
        .await
    }
}

/// Jobs asked for per page when listing.
const PAGE: usize = 1_000;

/// Every state a job's detail carries is known (a missing summary is left to its readers).
fn check_detail(d: &pb::JobDetail) -> Result<(), BadState> {
    if let Some(s) = &d.summary {
        job_state("summary.state", s.state)?;
    }
    for (i, t) in d.tasks.iter().enumerate() {
        task_state(&format!("tasks[{i}].state"), t.state)?;
    }
    Ok(())
}
