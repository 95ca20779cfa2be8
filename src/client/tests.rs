//! The leader-following client against fake `ClientApi` servers started in-process.

use super::error::{EXIT_ERROR, EXIT_NO_LEADER};
use super::*;
use crate::cmd::cluster::save_snapshot;
use crate::cmd::jobs::new_idempotency_key;
use gangway_proto::pb;
use gangway_proto::pb::client_api_server::{ClientApi, ClientApiServer};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tonic::{Code, Request, Response, Status};

/// Decides, from the method and how many times it has been called (1 = first), whether the fake
/// fails the call, and with what.
type Hook = Arc<dyn Fn(&'static str, usize) -> Option<Status> + Send + Sync>;

#[derive(Clone, Debug)]
struct Call {
    method: &'static str,
    /// SubmitJob's idempotency key; empty for other methods.
    key: String,
}

#[derive(Clone)]
struct Fake {
    /// Put in answers (job ids, node names), so a test sees which fake answered.
    name: String,
    hook: Hook,
    calls: Arc<Mutex<Vec<Call>>>,
    snapshot: Vec<Result<Vec<u8>, Status>>,
    /// The first call of this method answers only after this long.
    hang: Option<(&'static str, Duration)>,
    /// GetJob's answer: state (as sent: any number) and pending reason.
    job_state: (i32, &'static str),
}

impl Fake {
    fn new(
        name: &str,
        hook: impl Fn(&'static str, usize) -> Option<Status> + Send + Sync + 'static,
    ) -> Self {
        Self {
            name: name.to_owned(),
            hook: Arc::new(hook),
            calls: Arc::default(),
            snapshot: Vec::new(),
            hang: None,
            job_state: (pb::JobState::Running as i32, ""),
        }
    }

    /// Answers every call.
    fn serving(name: &str) -> Self {
        Self::new(name, |_, _| None)
    }

    async fn enter(&self, method: &'static str, key: &str) -> Result<(), Status> {
        let n = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(Call {
                method,
                key: key.to_owned(),
            });
            calls.iter().filter(|c| c.method == method).count()
        };
        if let Some((m, d)) = self.hang {
            if m == method && n == 1 {
                tokio::time::sleep(d).await;
            }
        }
        match (self.hook)(method, n) {
            Some(status) => Err(status),
            None => Ok(()),
        }
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn count(&self, method: &str) -> usize {
        self.calls().iter().filter(|c| c.method == method).count()
    }
}

type SnapshotStream =
    Pin<Box<dyn futures::Stream<Item = Result<pb::SnapshotChunk, Status>> + Send>>;

#[tonic::async_trait]
impl ClientApi for Fake {
    async fn submit_job(
        &self,
        r: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobReply>, Status> {
        let req = r.into_inner();
        self.enter("SubmitJob", &req.idempotency_key).await?;
        let existing = self
            .calls()
            .iter()
            .filter(|c| c.method == "SubmitJob" && c.key == req.idempotency_key)
            .count()
            > 1;
        Ok(Response::new(pb::SubmitJobReply {
            job_id: format!("job-from-{}", self.name),
            existing,
        }))
    }
    async fn submit_jobs(
        &self,
        r: Request<pb::SubmitJobsRequest>,
    ) -> Result<Response<pb::SubmitJobsReply>, Status> {
        let req = r.into_inner();
        let keys: Vec<_> = req.jobs.iter().map(|j| j.idempotency_key.clone()).collect();
        self.enter("SubmitJobs", &keys.join(",")).await?;
        let n = req.array_size.max(req.jobs.len() as u32);
        Ok(Response::new(pb::SubmitJobsReply {
            jobs: (0..n)
                .map(|i| pb::SubmitJobReply {
                    job_id: format!("job-{i}-from-{}", self.name),
                    existing: false,
                })
                .collect(),
        }))
    }
    async fn cancel_job(
        &self,
        _: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.enter("CancelJob", "").await?;
        Ok(Response::new(pb::Empty {}))
    }
    async fn get_job(
        &self,
        r: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobDetail>, Status> {
        self.enter("GetJob", "").await?;
        Ok(Response::new(pb::JobDetail {
            summary: Some(pb::JobSummary {
                id: r.into_inner().job_id,
                state: self.job_state.0,
                pending_reason: self.job_state.1.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }
    async fn list_jobs(
        &self,
        _: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsReply>, Status> {
        self.enter("ListJobs", "").await?;
        Ok(Response::new(pb::ListJobsReply {
            jobs: vec![pb::JobSummary {
                id: format!("job-from-{}", self.name),
                state: self.job_state.0,
                ..Default::default()
            }],
            next_page_token: String::new(),
        }))
    }
    async fn list_nodes(
        &self,
        _: Request<pb::PageRequest>,
    ) -> Result<Response<pb::ListNodesReply>, Status> {
        self.enter("ListNodes", "").await?;
        Ok(Response::new(pb::ListNodesReply::default()))
    }
    async fn set_node_state(
        &self,
        _: Request<pb::SetNodeStateRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.enter("SetNodeState", "").await?;
        Ok(Response::new(pb::Empty {}))
    }
    async fn set_device_fence(
        &self,
        _: Request<pb::SetDeviceFenceRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        Err(Status::unimplemented("SetDeviceFence"))
    }
    async fn remove_node(
        &self,
        _: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        Err(Status::unimplemented("RemoveNode"))
    }
    async fn list_leases(
        &self,
        _: Request<pb::PageRequest>,
    ) -> Result<Response<pb::ListLeasesReply>, Status> {
        Err(Status::unimplemented("ListLeases"))
    }
    async fn list_queues(
        &self,
        _: Request<pb::Empty>,
    ) -> Result<Response<pb::ListQueuesReply>, Status> {
        Err(Status::unimplemented("ListQueues"))
    }
    async fn set_queue(&self, _: Request<pb::QueueInfo>) -> Result<Response<pb::Empty>, Status> {
        Err(Status::unimplemented("SetQueue"))
    }
    async fn set_limits(&self, _: Request<pb::Limits>) -> Result<Response<pb::Limits>, Status> {
        Err(Status::unimplemented("SetLimits"))
    }
    async fn checkpoint_job(
        &self,
        _: Request<pb::CheckpointJobRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        Err(Status::unimplemented("CheckpointJob"))
    }
    async fn migrate_job(
        &self,
        _: Request<pb::MigrateJobRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        Err(Status::unimplemented("MigrateJob"))
    }
    async fn defrag_plan(
        &self,
        _: Request<pb::Empty>,
    ) -> Result<Response<pb::DefragPlanReply>, Status> {
        Err(Status::unimplemented("DefragPlan"))
    }
    async fn defrag_status(
        &self,
        _: Request<pb::Empty>,
    ) -> Result<Response<pb::DefragStatusReply>, Status> {
        Err(Status::unimplemented("DefragStatus"))
    }
    async fn cluster_status(
        &self,
        _: Request<pb::Empty>,
    ) -> Result<Response<pb::ClusterStatusReply>, Status> {
        self.enter("ClusterStatus", "").await?;
        Ok(Response::new(pb::ClusterStatusReply {
            role: format!("leader-{}", self.name),
            ..Default::default()
        }))
    }
    async fn transfer_leader(
        &self,
        _: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.enter("TransferLeader", "").await?;
        Ok(Response::new(pb::Empty {}))
    }
    async fn add_member(
        &self,
        _: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        Err(Status::unimplemented("AddMember"))
    }
    async fn remove_member(
        &self,
        _: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        Err(Status::unimplemented("RemoveMember"))
    }

    async fn drill(
        &self,
        _: Request<pb::DrillRequest>,
    ) -> Result<Response<pb::DrillReply>, Status> {
        Err(Status::unimplemented("Drill"))
    }

    async fn who_am_i(&self, _: Request<pb::Empty>) -> Result<Response<pb::WhoAmIReply>, Status> {
        Err(Status::unimplemented("WhoAmI"))
    }

    async fn list_access(
        &self,
        _: Request<pb::Empty>,
    ) -> Result<Response<pb::AccessRules>, Status> {
        Err(Status::unimplemented("ListAccess"))
    }

    async fn set_access(
        &self,
        _: Request<pb::SetAccessRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        Err(Status::unimplemented("SetAccess"))
    }

    async fn list_audit(
        &self,
        _: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditReply>, Status> {
        Err(Status::unimplemented("ListAudit"))
    }

    async fn restore_snapshot(
        &self,
        _: Request<tonic::Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::RestoreSnapshotReply>, Status> {
        Err(Status::unimplemented("RestoreSnapshot"))
    }

    type SaveSnapshotStream = SnapshotStream;

    async fn save_snapshot(
        &self,
        _: Request<pb::Empty>,
    ) -> Result<Response<SnapshotStream>, Status> {
        self.enter("SaveSnapshot", "").await?;
        let chunks: Vec<Result<pb::SnapshotChunk, Status>> = self
            .snapshot
            .iter()
            .map(|c| c.clone().map(|data| pb::SnapshotChunk { data }))
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }
}

/// Starts `fake` on 127.0.0.1:0; returns its `host:port`.
async fn start(fake: Fake) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ClientApiServer::new(fake))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr.to_string()
}

/// An address nothing listens on.
fn dead_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr.to_string()
}

fn status(code: Code, gangway_code: &str, message: &str, leader: Option<&str>) -> Status {
    let mut s = Status::new(code, message);
    s.metadata_mut()
        .insert(CODE_KEY, gangway_code.parse().unwrap());
    if let Some(l) = leader {
        s.metadata_mut().insert(LEADER_KEY, l.parse().unwrap());
    }
    s
}

fn client(addrs: &[&str], timeout: Duration) -> Client {
    Client::new(parse_addr_list(&addrs.join(",")).unwrap(), timeout)
}

#[tokio::test]
async fn follows_the_leader_hint_to_an_address_not_in_the_list() {
    let leader = Fake::serving("b");
    let b = start(leader.clone()).await;
    let hint = b.clone();
    let follower = Fake::new("a", move |_, _| {
        Some(status(
            Code::Unavailable,
            "not_leader",
            "not the leader",
            Some(&hint),
        ))
    });
    let a = start(follower.clone()).await;

    let mut c = client(&[&a], Duration::from_secs(5));
    let jobs = c
        .list_jobs(&[], "", false, None)
        .await
        .expect("the leader answers");
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].id, "job-from-b");
    assert_eq!(follower.count("ListJobs"), 1);
    assert_eq!(leader.count("ListJobs"), 1);
    assert_eq!(c.connected_to(), Some(b.as_str()));

    // The connection to the leader is kept for the next call.
    c.list_jobs(&[], "", false, None).await.unwrap();
    assert_eq!(follower.count("ListJobs"), 1);
    assert_eq!(leader.count("ListJobs"), 2);
}

#[tokio::test]
async fn a_non_idempotent_write_follows_a_hint_too() {
    // not_leader means "not proposed": safe to resend whatever the call.
    let leader = Fake::serving("b");
    let b = start(leader.clone()).await;
    let follower = Fake::new("a", move |_, _| {
        Some(status(
            Code::Unavailable,
            "not_leader",
            "not the leader",
            Some(&b),
        ))
    });
    let a = start(follower.clone()).await;
    let mut c = client(&[&a], Duration::from_secs(5));
    c.cancel_job("j1", "test")
        .await
        .expect("cancelled on the leader");
    assert_eq!(
        (follower.count("CancelJob"), leader.count("CancelJob")),
        (1, 1)
    );
}

#[tokio::test]
async fn not_leader_without_a_hint_tries_the_next_address() {
    let a_fake = Fake::new("a", |_, _| {
        Some(status(
            Code::Unavailable,
            "not_leader",
            "not the leader",
            None,
        ))
    });
    let b_fake = Fake::serving("b");
    let a = start(a_fake.clone()).await;
    let b = start(b_fake.clone()).await;
    let mut c = client(&[&a, &b], Duration::from_secs(5));
    let st = c.cluster_status().await.unwrap();
    assert_eq!(st.role, "leader-b");
    assert_eq!(a_fake.count("ClusterStatus"), 1);
}

#[tokio::test]
async fn a_dead_address_first_then_a_live_one() {
    let live = Fake::serving("live");
    let addr = start(live.clone()).await;
    let mut c = client(&[&dead_addr(), &addr], Duration::from_secs(5));
    let st = c.cluster_status().await.expect("the live replica answers");
    assert_eq!(st.role, "leader-live");
    assert_eq!(live.count("ClusterStatus"), 1);
}

#[tokio::test]
async fn all_dead_is_no_leader_within_the_deadline() {
    let (d1, d2) = (dead_addr(), dead_addr());
    let mut c = client(&[&d1, &d2], Duration::from_millis(800));
    let started = std::time::Instant::now();
    let err = c.cluster_status().await.expect_err("nothing listens");
    let took = started.elapsed();
    assert_eq!(err.exit_code(), EXIT_NO_LEADER, "{err}");
    assert!(
        took >= Duration::from_millis(700),
        "gave up early: {took:?}"
    );
    assert!(
        took < Duration::from_secs(3),
        "overran the deadline: {took:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&d1) && msg.contains(&d2),
        "names both replicas: {msg}"
    );
}

#[tokio::test]
async fn no_leader_is_retried_until_one_is_elected() {
    let fake = Fake::new("a", |_, n| {
        (n <= 2).then(|| status(Code::Unavailable, "no_leader", "election in progress", None))
    });
    let a = start(fake.clone()).await;
    let mut c = client(&[&a], Duration::from_secs(5));
    let st = c
        .cluster_status()
        .await
        .expect("answers after the election");
    assert_eq!(st.role, "leader-a");
    assert_eq!(fake.count("ClusterStatus"), 3);
}

#[tokio::test]
async fn no_leader_forever_ends_with_exit_code_5() {
    let fake = Fake::new("a", |_, _| {
        Some(status(Code::Unavailable, "no_leader", "no quorum", None))
    });
    let a = start(fake.clone()).await;
    let mut c = client(&[&a], Duration::from_millis(600));
    let err = c.list_jobs(&[], "", false, None).await.unwrap_err();
    assert_eq!(err.exit_code(), EXIT_NO_LEADER);
    assert!(err.to_string().contains("no quorum"), "{err}");
    assert!(fake.count("ListJobs") >= 2, "retried with backoff");
}

#[tokio::test]
async fn invalid_spec_is_exit_3_and_not_retried() {
    let fake = Fake::new("a", |method, _| {
        (method == "SubmitJob").then(|| {
            status(
                Code::InvalidArgument,
                "invalid_spec",
                "resources.devices: must be at most 64\ntasks: must be at least 1",
                None,
            )
        })
    });
    let a = start(fake.clone()).await;
    let mut c = client(&[&a], Duration::from_secs(5));
    let err = c.submit_job("name = \"x\"", "k1").await.unwrap_err();
    assert_eq!(err.exit_code(), EXIT_INVALID);
    assert_eq!(err.gangway_code(), Some("invalid_spec"));
    assert_eq!(fake.count("SubmitJob"), 1, "a rejected spec is not resent");
    let msg = err.to_string();
    assert!(
        msg.contains("\n  resources.devices: must be at most 64"),
        "{msg}"
    );
    assert!(msg.contains("\n  tasks: must be at least 1"), "{msg}");
}

#[tokio::test]
async fn other_errors_return_at_once_with_exit_1() {
    let fake = Fake::new("a", |_, _| {
        Some(status(Code::NotFound, "unknown_job", "no job j9", None))
    });
    let a = start(fake.clone()).await;
    let mut c = client(&[&a], Duration::from_secs(5));
    let err = c.get_job("j9").await.unwrap_err();
    assert_eq!(err.exit_code(), EXIT_ERROR);
    assert_eq!(err.gangway_code(), Some("unknown_job"));
    assert_eq!(fake.count("GetJob"), 1);
    let msg = err.to_string();
    assert!(
        msg.contains(&a) && msg.contains("no job j9"),
        "names replica and message: {msg}"
    );
}

#[tokio::test]
async fn unknown_outcome_is_not_retried_for_a_non_idempotent_write() {
    let fake = Fake::new("a", |method, n| {
        (method == "CancelJob" && n == 1)
            .then(|| status(Code::Unavailable, "unavailable", "proposal dropped", None))
    });
    let a = start(fake.clone()).await;
    let mut c = client(&[&a], Duration::from_secs(5));
    let err = c.cancel_job("j1", "").await.unwrap_err();
    assert!(matches!(err, ClientError::OutcomeUnknown { .. }), "{err:?}");
    assert_eq!(err.exit_code(), EXIT_ERROR);
    assert_eq!(fake.count("CancelJob"), 1, "not resent");

    // The same for a timeout code and another non-idempotent call.
    let fake = Fake::new("a", |_, _| {
        Some(status(
            Code::DeadlineExceeded,
            "timeout",
            "commit timed out",
            None,
        ))
    });
    let a = start(fake.clone()).await;
    let mut c = client(&[&a], Duration::from_secs(5));
    let err = c.transfer_leader(2).await.unwrap_err();
    assert!(matches!(err, ClientError::OutcomeUnknown { .. }), "{err:?}");
    assert_eq!(fake.count("TransferLeader"), 1);
}

#[tokio::test]
async fn submit_is_retried_after_an_unknown_outcome_with_the_same_key() {
    let fake = Fake::new("a", |method, n| {
        (method == "SubmitJob" && n == 1).then(|| {
            status(
                Code::Unavailable,
                "unavailable",
                "leader stepped down",
                None,
            )
        })
    });
    let a = start(fake.clone()).await;
    let mut c = client(&[&a], Duration::from_secs(5));
    let key = new_idempotency_key();
    let reply = c
        .submit_job("name = \"x\"", &key)
        .await
        .expect("second try works");
    assert_eq!(reply.job_id, "job-from-a");
    let keys: Vec<String> = fake
        .calls()
        .into_iter()
        .filter(|c| c.method == "SubmitJob")
        .map(|c| c.key)
        .collect();
    assert_eq!(keys, [key.clone(), key], "resent once, with the same key");
    assert!(reply.existing, "the fake saw the key before");
}

#[tokio::test]
async fn an_absolute_set_is_retried_after_an_unknown_outcome() {
    let fake = Fake::new("a", |method, n| {
        (method == "SetNodeState" && n == 1).then(|| {
            status(
                Code::Unavailable,
                "unavailable",
                "leader stepped down",
                None,
            )
        })
    });
    let a = start(fake.clone()).await;
    let mut c = client(&[&a], Duration::from_secs(5));
    c.set_node_state("n1", "draining", "", None).await.unwrap();
    assert_eq!(fake.count("SetNodeState"), 2);
}

#[test]
fn idempotency_keys_are_random_hex() {
    let a = new_idempotency_key();
    let b = new_idempotency_key();
    assert_eq!(a.len(), 32);
    assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    assert_ne!(a, b);
}

#[test]
fn addr_lists_parse_and_normalise() {
    let ok: [(&str, &[&str]); 6] = [
        ("127.0.0.1:7101", &["http://127.0.0.1:7101"]),
        ("a:1,b:2", &["http://a:1", "http://b:2"]),
        (" http://a:1 , b:2, ", &["http://a:1", "http://b:2"]),
        ("http://a:1/", &["http://a:1"]),
        ("[::1]:7101", &["http://[::1]:7101"]),
        ("a:1,a:1,http://a:1", &["http://a:1"]),
    ];
    for (input, want) in ok {
        assert_eq!(
            parse_addr_list(input),
            Ok(want.iter().map(|s| s.to_string()).collect()),
            "{input:?}"
        );
    }
    for bad in [
        "",
        " , ",
        "a",
        "a:",
        ":7101",
        "a:0",
        "a:70000",
        "a:x",
        "https://a:1",
        "::1:7101",
        "a b:1",
    ] {
        assert!(parse_addr_list(bad).is_err(), "{bad:?} should be rejected");
    }
}

#[tokio::test]
async fn snapshot_is_written_through_a_temporary_file() {
    let mut fake = Fake::serving("a");
    fake.snapshot = vec![Ok(b"{\"jobs\":".to_vec()), Ok(b"[]}".to_vec())];
    let a = start(fake).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("snap.json");
    let mut c = client(&[&a], Duration::from_secs(5));
    let bytes = save_snapshot(&mut c, &file).await.unwrap();
    assert_eq!(bytes, 11);
    assert_eq!(std::fs::read(&file).unwrap(), b"{\"jobs\":[]}");
    assert!(!dir.path().join("snap.json.tmp").exists());
}

#[tokio::test]
async fn a_broken_snapshot_stream_leaves_no_file() {
    let mut fake = Fake::serving("a");
    fake.snapshot = vec![
        Ok(b"partial".to_vec()),
        Err(Status::internal("disk on fire")),
    ];
    let a = start(fake).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("snap.json");
    std::fs::write(&file, b"old backup").unwrap();
    let mut c = client(&[&a], Duration::from_secs(5));
    let err = save_snapshot(&mut c, &file).await.unwrap_err();
    assert!(err.to_string().contains("after 7 bytes"), "{err}");
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"old backup",
        "old file kept"
    );
    assert!(!dir.path().join("snap.json.tmp").exists());
}

#[tokio::test]
async fn a_hung_replica_is_skipped_for_a_safe_call() {
    let mut hung = Fake::serving("a");
    hung.hang = Some(("ListJobs", Duration::from_secs(30)));
    let a = start(hung.clone()).await;
    let live = Fake::serving("b");
    let b = start(live.clone()).await;
    let mut c = client(&[&a, &b], Duration::from_secs(5));
    c.set_attempt_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let jobs = c
        .list_jobs(&[], "", false, None)
        .await
        .expect("the second replica answers");
    assert_eq!(jobs[0].id, "job-from-b");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!((hung.count("ListJobs"), live.count("ListJobs")), (1, 1));
}

#[tokio::test]
async fn a_hung_non_idempotent_write_is_an_unknown_outcome_at_the_deadline() {
    let mut hung = Fake::serving("a");
    hung.hang = Some(("CancelJob", Duration::from_secs(30)));
    let a = start(hung.clone()).await;
    let mut c = client(&[&a], Duration::from_millis(500));
    c.set_attempt_timeout(Duration::from_millis(100));
    let started = std::time::Instant::now();
    let err = c.cancel_job("j1", "").await.unwrap_err();
    assert!(matches!(err, ClientError::OutcomeUnknown { .. }), "{err:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "waited for the whole deadline"
    );
    assert_eq!(hung.count("CancelJob"), 1);
}

#[test]
fn error_chains_drop_repeats() {
    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }
    let e = E(
        "transport error",
        Some(Box::new(E(
            "tcp connect error",
            Some(Box::new(E(
                "tcp connect error: Connection refused",
                Some(Box::new(E("Connection refused", None))),
            ))),
        ))),
    );
    assert_eq!(
        error_chain(&e),
        "transport error: tcp connect error: Connection refused"
    );
}

const VALID_SPEC: &str = r#"
name = "pretrain"
tasks = 2
command = ["python3", "train.py"]
[resources]
devices = 8
kind = "gpu"
"#;

fn submit_args(
    addr: &str,
    file: &std::path::Path,
    wait: Option<Duration>,
) -> crate::cmd::jobs::SubmitArgs {
    crate::cmd::jobs::SubmitArgs {
        files: vec![file.to_owned()],
        array: None,
        idempotency_key: None,
        wait,
        opts: crate::cmd::common::ClientOpts {
            addr: crate::cmd::common::AddrList(parse_addr_list(addr).unwrap()),
            timeout: Duration::from_secs(5),
            output: crate::cmd::output::Output::Json,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            token: None,
            // The fake replicas of these tests serve plain TCP.
            insecure: true,
        },
    }
}

#[tokio::test]
async fn submit_validates_locally_before_sending() {
    let fake = Fake::serving("a");
    let a = start(fake.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "name = \"x\"\ntasks = 0\n").unwrap();
    let err = crate::cmd::jobs::submit(submit_args(&a, &file, None))
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), EXIT_INVALID);
    assert!(err.to_string().contains("tasks: "), "{err}");
    assert_eq!(
        fake.count("SubmitJob"),
        0,
        "an invalid spec never leaves the machine"
    );

    let missing = dir.path().join("missing.toml");
    let err = crate::cmd::jobs::submit(submit_args(&a, &missing, None))
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), EXIT_INVALID);
}

#[tokio::test]
async fn several_files_go_in_one_request_or_none_leaves() {
    let fake = Fake::serving("a");
    let a = start(fake.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&good, VALID_SPEC).unwrap();
    std::fs::write(&bad, "name = \"x\"\ntasks = 0\n").unwrap();

    // One bad file among good ones: nothing is sent, and the error names the file.
    let mut args = submit_args(&a, &good, None);
    args.files = vec![good.clone(), bad.clone(), good.clone()];
    let err = crate::cmd::jobs::submit(args).await.unwrap_err();
    assert_eq!(err.exit_code(), EXIT_INVALID);
    assert!(err.to_string().contains("bad.toml"), "{err}");
    assert_eq!(fake.count("SubmitJobs") + fake.count("SubmitJob"), 0);

    // Three good files: one request, each job with its own key under the run's key.
    let mut args = submit_args(&a, &good, None);
    args.files = vec![good.clone(); 3];
    args.idempotency_key = Some("k".into());
    crate::cmd::jobs::submit(args)
        .await
        .expect("a batch of three");
    assert_eq!((fake.count("SubmitJobs"), fake.count("SubmitJob")), (1, 0));
    let call = fake
        .calls()
        .into_iter()
        .find(|c| c.method == "SubmitJobs")
        .unwrap();
    assert_eq!(call.key, "k/0,k/1,k/2");

    // An array is one spec; --wait is for one job.
    let mut args = submit_args(&a, &good, Some(Duration::from_secs(1)));
    args.array = Some(10);
    let err = crate::cmd::jobs::submit(args).await.unwrap_err();
    assert!(err.to_string().contains("--wait"), "{err}");
    let mut args = submit_args(&a, &good, None);
    args.files = vec![good.clone(), good.clone()];
    args.array = Some(10);
    let err = crate::cmd::jobs::submit(args).await.unwrap_err();
    assert!(err.to_string().contains("--array takes one spec"), "{err}");
    assert_eq!(fake.count("SubmitJobs"), 1, "refused before sending");
}

#[tokio::test]
async fn submit_wait_ends_when_the_job_runs_or_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.toml");
    std::fs::write(&file, VALID_SPEC).unwrap();

    let running = Fake::serving("a");
    let a = start(running.clone()).await;
    crate::cmd::jobs::submit(submit_args(&a, &file, Some(Duration::from_secs(5))))
        .await
        .expect("running at once");
    assert_eq!(
        (running.count("SubmitJob"), running.count("GetJob")),
        (1, 1)
    );

    let mut pending = Fake::serving("b");
    pending.job_state = (pb::JobState::Pending as i32, "needs 16 gpu in one rack");
    let b = start(pending.clone()).await;
    let started = std::time::Instant::now();
    let err = crate::cmd::jobs::submit(submit_args(&b, &file, Some(Duration::from_millis(1200))))
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), super::error::EXIT_NOT_PLACEABLE, "{err}");
    assert!(
        err.to_string().contains("needs 16 gpu in one rack"),
        "{err}"
    );
    assert!(started.elapsed() >= Duration::from_millis(1200));
    assert!(pending.count("GetJob") >= 2, "polled");

    let mut failed = Fake::serving("c");
    failed.job_state = (pb::JobState::Failed as i32, "");
    let c = start(failed).await;
    let err = crate::cmd::jobs::submit(submit_args(&c, &file, Some(Duration::from_secs(5))))
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), EXIT_ERROR, "{err}");
}

#[tokio::test]
async fn a_dead_leader_hint_falls_back_to_the_list() {
    let dead = dead_addr();
    let follower = Fake::new("a", move |_, _| {
        Some(status(
            Code::Unavailable,
            "not_leader",
            "not the leader",
            Some(&dead),
        ))
    });
    let a = start(follower.clone()).await;
    let live = Fake::serving("b");
    let b = start(live.clone()).await;
    let mut c = client(&[&a, &b], Duration::from_secs(5));
    let st = c
        .cluster_status()
        .await
        .expect("the list's next replica answers");
    assert_eq!(st.role, "leader-b");
    assert_eq!(follower.count("ClusterStatus"), 1);
}

#[tokio::test]
async fn a_state_this_build_does_not_know_is_an_error_naming_the_field() {
    let mut newer = Fake::serving("a");
    newer.job_state = (42, "");
    let a = start(newer).await;
    let mut c = client(&[&a], Duration::from_secs(5));
    let err = c.get_job("j-1").await.unwrap_err();
    assert_eq!(err.exit_code(), EXIT_ERROR, "{err}");
    assert!(
        err.to_string()
            .contains("field `summary.state`: unknown job state 42"),
        "{err}"
    );
    let err = c.list_jobs(&[], "", false, None).await.unwrap_err();
    assert!(err.to_string().contains("field `jobs[0].state`"), "{err}");
}

/// A full queue (or a client past its rate) answers RESOURCE_EXHAUSTED with a retry hint: the
/// client waits as told and submits again, within its deadline; without time left for the wait it
/// returns the refusal at once.
#[tokio::test]
async fn a_refusal_with_a_retry_hint_is_waited_out_within_the_deadline() {
    let full_twice = |_: &'static str, n: usize| {
        (n <= 2).then(|| {
            let mut s = status(
                Code::ResourceExhausted,
                "resource_exhausted",
                "queue default has 100000 pending jobs",
                None,
            );
            s.metadata_mut()
                .insert(gangway_proto::link::RETRY_AFTER_KEY, "150".parse().unwrap());
            s
        })
    };
    let fake = Fake::new("a", full_twice);
    let a = start(fake.clone()).await;
    let mut c = client(&[&a], Duration::from_secs(5));
    let started = std::time::Instant::now();
    let reply = c
        .submit_job("name = \"j\"", "key-1")
        .await
        .expect("admitted on the third try");
    assert_eq!(reply.job_id, "job-from-a");
    assert_eq!(fake.count("SubmitJob"), 3);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "waited twice"
    );

    // A wait longer than the time left: the refusal comes back, not a hang.
    let fake = Fake::new("b", full_twice);
    let b = start(fake.clone()).await;
    let mut c = client(&[&b], Duration::from_millis(100));
    let err = c.submit_job("name = \"j\"", "key-2").await.unwrap_err();
    assert!(err.to_string().contains("pending jobs"), "{err}");
    assert_eq!(fake.count("SubmitJob"), 1);
}
