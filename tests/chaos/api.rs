//! The chaos test's view of the client API: writes to a chosen replica (a follower forwards them),
//! linearizable reads from the leader (found again after every failure), every call bounded in
//! time so a paused replica costs one timeout and never a hang, and each write's outcome sorted
//! into acknowledged, refused (the cluster answered no) or unknown.

use crate::common::client;
use gangway_proto::pb;
use gangway_proto::pb::client_api_client::ClientApiClient;
use std::sync::Mutex;
use std::time::Duration;
use tonic::transport::Channel;

/// How long one call may take before its outcome counts as unknown. Longer than an election, so
/// a write that a new leader commits is usually answered.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Reads are retried on the next leader anyway; a short bound keeps the sampler's rhythm.
const READ_TIMEOUT: Duration = Duration::from_millis(1500);

/// What became of one write, as the client saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged: committed and applied.
    Ok,
    /// The cluster answered with a definite error; its stable code.
    Refused(String),
    /// No answer, a timeout, or an error that leaves the write's fate open.
    Unknown(String),
}

impl Outcome {
    fn of(status: &tonic::Status) -> Outcome {
        let code = status
            .metadata()
            .get("x-gangway-code")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        match code.as_str() {
            "unavailable" | "timeout" | "internal" | "" => {
                Outcome::Unknown(format!("{:?}: {}", status.code(), status.message()))
            }
            _ => Outcome::Refused(code),
        }
    }

    pub fn label(&self) -> String {
        match self {
            Outcome::Ok => "ok".into(),
            Outcome::Refused(c) => format!("refused:{c}"),
            Outcome::Unknown(m) => format!("unknown:{m}"),
        }
    }
}

pub struct Api {
    pub addrs: Vec<String>,
    leader: Mutex<Option<String>>,
}

impl Api {
    pub fn new(addrs: Vec<String>) -> Self {
        Self {
            addrs,
            leader: Mutex::new(None),
        }
    }

    async fn write<T, F, Fut>(&self, addr: &str, call: F) -> (Outcome, Option<T>)
    where
        F: FnOnce(ClientApiClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let attempt = async {
            let Some(c) = client(addr).await else {
                return (Outcome::Refused("connect".into()), None);
            };
            match call(c).await {
                Ok(r) => (Outcome::Ok, Some(r.into_inner())),
                Err(s) => (Outcome::of(&s), None),
            }
        };
        tokio::time::timeout(CALL_TIMEOUT, attempt)
            .await
            .unwrap_or((Outcome::Unknown("no answer in time".into()), None))
    }

    pub async fn submit(
        &self,
        addr: &str,
        spec: &str,
        key: &str,
    ) -> (Outcome, Option<pb::SubmitJobReply>) {
        let req = pb::SubmitJobRequest {
            spec_toml: spec.to_owned(),
            idempotency_key: key.to_owned(),
        };
        self.write(addr, |mut c| async move { c.submit_job(req).await })
            .await
    }

    pub async fn cancel(&self, addr: &str, job: &str) -> Outcome {
        let req = pb::CancelJobRequest {
            job_id: job.to_owned(),
            reason: "chaos client".into(),
        };
        self.write(addr, |mut c| async move { c.cancel_job(req).await })
            .await
            .0
    }

    pub async fn migrate(&self, addr: &str, job: &str) -> Outcome {
        let req = pb::MigrateJobRequest {
            job_id: job.to_owned(),
            ..Default::default()
        };
        self.write(addr, |mut c| async move { c.migrate_job(req).await })
            .await
            .0
    }

    /// An operator fences device `device` (its index) of `node`, or returns it to service; true
    /// when the cluster answered (acknowledged or refused), false when the outcome is unknown.
    pub async fn set_fence(&self, addr: &str, node: &str, device: u32, fenced: bool) -> bool {
        let req = pb::SetDeviceFenceRequest {
            node: node.to_owned(),
            device: device.to_string(),
            fenced,
            reason: "chaos: the device was reset".into(),
        };
        let (outcome, _) = self
            .write(addr, |mut c| async move { c.set_device_fence(req).await })
            .await;
        !matches!(outcome, Outcome::Unknown(_))
    }

    /// A client connected to the replica that says it leads, found by asking every replica.
    async fn leader(&self) -> Option<ClientApiClient<Channel>> {
        let cached = self.leader.lock().unwrap().clone();
        if let Some(addr) = cached {
            if let Some(c) = client(&addr).await {
                return Some(c);
            }
        }
        for a in &self.addrs {
            let Some(mut c) = client(a).await else {
                continue;
            };
            let Ok(Ok(s)) =
                tokio::time::timeout(READ_TIMEOUT, c.cluster_status(pb::Empty {})).await
            else {
                continue;
            };
            let s = s.into_inner();
            if s.role == "leader" {
                *self.leader.lock().unwrap() = Some(a.clone());
                return Some(c);
            }
        }
        None
    }

    /// One read from the leader; None (and the leader forgotten) on any failure.
    async fn read<T, F, Fut>(&self, call: F) -> Option<T>
    where
        F: FnOnce(ClientApiClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let attempt = async {
            let c = self.leader().await?;
            call(c).await.ok().map(tonic::Response::into_inner)
        };
        let r = tokio::time::timeout(READ_TIMEOUT, attempt)
            .await
            .ok()
            .flatten();
        if r.is_none() {
            *self.leader.lock().unwrap() = None;
        }
        r
    }

    pub async fn leases(&self) -> Option<Vec<pb::LeaseInfo>> {
        self.read(|mut c| async move { c.list_leases(pb::PageRequest::default()).await })
            .await
            .map(|r| r.leases)
    }

    /// Every live job, page after page.
    pub async fn jobs(&self) -> Option<Vec<pb::JobSummary>> {
        let mut jobs = Vec::new();
        let mut token = String::new();
        loop {
            let req = pb::ListJobsRequest {
                page_size: 5_000,
                page_token: token.clone(),
                ..Default::default()
            };
            let reply = self
                .read(|mut c| {
                    let req = req.clone();
                    async move { c.list_jobs(req).await }
                })
                .await?;
            jobs.extend(reply.jobs);
            if reply.next_page_token.is_empty() {
                return Some(jobs);
            }
            token = reply.next_page_token;
        }
    }

    pub async fn job(&self, id: &str) -> Option<pb::JobDetail> {
        let req = pb::GetJobRequest {
            job_id: id.to_owned(),
        };
        self.read(|mut c| async move { c.get_job(req).await }).await
    }

    pub async fn nodes(&self) -> Option<Vec<pb::NodeInfo>> {
        self.read(|mut c| async move { c.list_nodes(pb::PageRequest::default()).await })
            .await
            .map(|r| r.nodes)
    }

    /// One replica's own status (answered from its own state).
    pub async fn status(&self, addr: &str) -> Option<pb::ClusterStatusReply> {
        let attempt = async {
            let mut c = client(addr).await?;
            c.cluster_status(pb::Empty {})
                .await
                .ok()
                .map(tonic::Response::into_inner)
        };
        tokio::time::timeout(READ_TIMEOUT, attempt)
            .await
            .ok()
            .flatten()
    }
}
