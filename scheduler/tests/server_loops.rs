//! The leader's loops in one in-process replica served over real gRPC: node-down detection and
//! re-queueing, fencing of stale reports, and a scheduling loop that writes nothing when nothing
//! changes.

use gangway_proto::pb;
use gangway_proto::pb::client_api_client::ClientApiClient;
use gangway_proto::pb::worker_api_client::WorkerApiClient;
use gangway_scheduler::server::{Replica, ServerConfig};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

struct OneReplica {
    addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl OneReplica {
    /// A single-voter cluster with a 1 s node TTL.
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// [`OneReplica::start`] with `tune` applied to the configuration.
    async fn start_with(tune: impl FnOnce(&mut ServerConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let grpc = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = grpc.local_addr().unwrap().to_string();
        let http_addr = http.local_addr().unwrap().to_string();
        drop((grpc, http));
        let mut config = ServerConfig::new(1, &addr, &http_addr, dir.path());
        config.tls.insecure = true;
        config.initial_cluster = format!("1={addr}");
        config.raft.election_timeout_min = Duration::from_millis(200);
        config.raft.election_timeout_max = Duration::from_millis(400);
        config.raft.heartbeat_interval = Duration::from_millis(50);
        config.scheduler.interval = Duration::from_millis(100);
        config.scheduler.min_runtime = Duration::from_millis(0);
        config.workers.heartbeat_interval = Duration::from_millis(200);
        config.workers.node_ttl = Duration::from_millis(1_000);
        tune(&mut config);
        let replica = Replica::start(config).await.expect("replica starts");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            replica
                .run(async move {
                    let _ = rx.await;
                })
                .await
                .expect("replica runs");
        });
        let r = OneReplica {
            addr,
            stop: Some(tx),
            task,
            _dir: dir,
        };
        // Wait for it to lead.
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(s) = r.client().await.cluster_status(pb::Empty {}).await {
                if s.into_inner().role == "leader" {
                    break;
                }
            }
            assert!(Instant::now() < until, "single replica never led");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        r
    }

    async fn client(&self) -> ClientApiClient<Channel> {
        loop {
            if let Ok(c) = ClientApiClient::connect(format!("http://{}", self.addr)).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn worker(&self) -> WorkerApiClient<Channel> {
        WorkerApiClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect worker api")
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = self.task.await;
    }
}

/// Heartbeats for the hosts in `alive` (which the test may shrink) every 150 ms.
fn heartbeat(addr: String, alive: Arc<Mutex<Vec<String>>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut w = WorkerApiClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        loop {
            let hosts = alive.lock().unwrap().clone();
            for h in hosts {
                let _ = w
                    .heartbeat(pb::HeartbeatRequest {
                        node: h,
                        devices: vec![],
                    })
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    })
}

fn host(name: &str, rack: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        node: name.into(),
        address: "127.0.0.1:9".into(),
        datacenter: "dc1".into(),
        zone: "z1".into(),
        pod: "p1".into(),
        rack: rack.into(),
        cpu_milli: 64_000,
        memory_mib: 256_000,
        devices: (0..8)
            .map(|i| pb::Device {
                uuid: format!("GPU-{name}-{i}"),
                model: "H100".into(),
                kind: "gpu".into(),
                memory_mib: 81_920,
                nvlink_domain: 0,
            })
            .collect(),
    }
}

const GANG: &str = r#"name = "g"
queue = "q"
tasks = 2
command = ["true"]
[resources]
devices = 8
[checkpoint]
signal = "SIGUSR1"
timeout = "10s"
"#;

async fn job(c: &mut ClientApiClient<Channel>, id: &str) -> pb::JobDetail {
    c.get_job(pb::GetJobRequest { job_id: id.into() })
        .await
        .expect("get job")
        .into_inner()
}

async fn wait_job(
    c: &mut ClientApiClient<Channel>,
    id: &str,
    what: &str,
    pred: impl Fn(&pb::JobDetail) -> bool,
) -> pb::JobDetail {
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let j = job(c, id).await;
        if pred(&j) {
            return j;
        }
        assert!(Instant::now() < until, "{what}: job is {j:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_is_declared_down_and_its_gang_requeued_from_its_checkpoint() {
    let r = OneReplica::start().await;
    let mut w = r.worker().await;
    let mut c = r.client().await;
    // Phase 1: three hosts; a 2x8 gang lands on two of them.
    for h in ["a", "b", "c"] {
        w.register(host(h, "r1")).await.expect("register");
    }
    let alive = Arc::new(Mutex::new(vec!["a".to_owned(), "b".into(), "c".into()]));
    let beats = heartbeat(r.addr.clone(), alive.clone());
    let id = c
        .submit_job(pb::SubmitJobRequest {
            spec_toml: GANG.into(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let first = wait_job(&mut c, &id, "leased", |j| j.tasks.len() == 2).await;
    let epoch1 = first.summary.as_ref().unwrap().lease_epoch;
    let hosts1: Vec<String> = first.tasks.iter().map(|t| t.host.clone()).collect();

    // Phase 2: the gang checkpoints at step 40 under its lease.
    w.report_checkpoint(pb::CheckpointReport {
        node: hosts1[0].clone(),
        job_id: id.clone(),
        epoch: epoch1,
        path: "/ckpt/g/40".into(),
        step: 40,
        bytes: 1 << 20,
        ..Default::default()
    })
    .await
    .expect("checkpoint recorded");

    // Phase 3: one of the gang's two hosts goes silent and must be declared down after the 1 s TTL.
    let silent = hosts1[1].clone();
    alive.lock().unwrap().retain(|h| *h != silent);
    let requeued = wait_job(&mut c, &id, "re-queued after node loss", |j| {
        j.summary.as_ref().unwrap().lease_epoch > epoch1
            || j.history.iter().any(|h| h.what.contains("went down"))
    })
    .await;
    assert!(
        requeued
            .history
            .iter()
            .any(|h| h.what.contains(&format!("node {silent} went down"))),
        "{requeued:#?}"
    );
    let nodes = c
        .list_nodes(pb::PageRequest::default())
        .await
        .unwrap()
        .into_inner()
        .nodes;
    let down: Vec<&str> = nodes
        .iter()
        .filter(|n| n.state == "down")
        .map(|n| n.name.as_str())
        .collect();
    assert_eq!(
        down,
        vec![silent.as_str()],
        "only the silent host is down: {nodes:?}"
    );

    // Phase 4: the two live hosts are exactly enough: it is re-leased there, resuming from its
    // checkpoint.
    let again = wait_job(&mut c, &id, "re-leased", |j| {
        j.summary.as_ref().unwrap().lease_epoch > epoch1 && j.tasks.len() == 2
    })
    .await;
    assert!(again.tasks.iter().all(|t| t.host != silent), "{again:#?}");
    assert_eq!(again.last_checkpoint.as_ref().map(|c| c.step), Some(40));
    let mut set = w
        .watch_allocations(pb::WatchAllocationsRequest {
            node: again.tasks[0].host.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let allocations = set.message().await.unwrap().unwrap();
    let mine = allocations
        .allocations
        .iter()
        .find(|a| a.job_id == id)
        .expect("the new lease is in the host's desired state");
    assert_eq!(mine.restore_from, "/ckpt/g/40");
    assert!(mine.epoch > epoch1);

    // Phase 5: a report under the old epoch is fenced off with a stable code.
    let err = w
        .report_task_status(pb::TaskStatusReport {
            node: hosts1[0].clone(),
            job_id: id.clone(),
            task: 0,
            epoch: epoch1,
            state: pb::TaskState::Succeeded.into(),
            has_exit_code: true,
            exit_code: 0,
            message: String::new(),
        })
        .await
        .expect_err("stale epoch accepted");
    assert_eq!(
        err.metadata()
            .get("x-gangway-code")
            .unwrap()
            .to_str()
            .unwrap(),
        "stale_epoch",
        "{err:?}"
    );
    beats.abort();
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_cluster_writes_nothing() {
    let r = OneReplica::start().await;
    let mut w = r.worker().await;
    let mut c = r.client().await;
    w.register(host("a", "r1")).await.unwrap();
    let beats = heartbeat(r.addr.clone(), Arc::new(Mutex::new(vec!["a".to_owned()])));
    // One job that fits and one that never can (16 devices on an 8-device host).
    for (spec, key) in [
        (
            "name = \"fits\"\nqueue = \"q\"\ncommand = [\"true\"]\n[resources]\ndevices = 2\n",
            "k1",
        ),
        (
            "name = \"never\"\nqueue = \"q\"\ncommand = [\"true\"]\n[resources]\ndevices = 16\n",
            "k2",
        ),
    ] {
        c.submit_job(pb::SubmitJobRequest {
            spec_toml: spec.into(),
            idempotency_key: key.into(),
        })
        .await
        .unwrap();
    }
    // Let the rounds settle: the first places "fits" and explains "never".
    let until = Instant::now() + Duration::from_secs(10);
    let never = loop {
        let jobs = c
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .jobs;
        let never = jobs.iter().find(|j| j.name == "never").cloned().unwrap();
        let placed = jobs
            .iter()
            .any(|j| j.name == "fits" && j.state() == pb::JobState::Running);
        if placed && never.pending_reason.contains("16") {
            break never;
        }
        assert!(Instant::now() < until, "{jobs:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(never.state(), pb::JobState::Pending);
    // Ten scheduling intervals with nothing new: the log must not grow.
    let before = c
        .cluster_status(pb::Empty {})
        .await
        .unwrap()
        .into_inner()
        .commit_index;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let after = c
        .cluster_status(pb::Empty {})
        .await
        .unwrap()
        .into_inner()
        .commit_index;
    assert_eq!(before, after, "an idle cluster kept writing to its log");
    beats.abort();
    r.stop().await;
}

/// Listings are paged, and a page walk sees every job once even while jobs are added; a finished
/// job past its retention leaves the state, yet `job status` and the archived listing still find
/// it (this replica archived it as it applied the prune); a full queue refuses submissions with
/// RESOURCE_EXHAUSTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_are_paged_and_pruned_jobs_are_read_from_the_archive() {
    let r = OneReplica::start().await;
    let mut c = r.client().await;
    let spec =
        |n: usize| format!("name = \"p{n:03}\"\ncommand = [\"true\"]\n[resources]\ndevices = 1\n");
    let mut ids = Vec::new();
    for n in 0..25 {
        let reply = c
            .submit_job(pb::SubmitJobRequest {
                spec_toml: spec(n),
                idempotency_key: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        ids.push(reply.job_id);
    }
    // Page by 10, adding a job between pages: every job of the start is seen exactly once.
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_jobs(pb::ListJobsRequest {
                page_size: 10,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.jobs.len() <= 10);
        seen.extend(page.jobs.iter().map(|j| j.id.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        c.submit_job(pb::SubmitJobRequest {
            spec_toml: spec(100 + pages),
            idempotency_key: String::new(),
        })
        .await
        .unwrap();
    }
    assert!(pages >= 3, "{pages} pages");
    for id in &ids {
        assert_eq!(seen.iter().filter(|s| *s == id).count(), 1, "{id} once");
    }
    let too_big = c
        .list_jobs(pb::ListJobsRequest {
            page_size: 50_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(too_big.code(), tonic::Code::InvalidArgument);
    assert!(
        too_big.message().contains("page_size"),
        "{}",
        too_big.message()
    );

    // Finished jobs stay one second; cancel three and wait for the leader's prune.
    let limits = c
        .set_limits(pb::Limits {
            finished_retention_ms: 1_000,
            max_pending_per_queue: 40,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(limits.finished_retention_ms, 1_000);
    assert_eq!(
        limits.max_finished, 100_000,
        "fields left 0 keep their value"
    );
    for id in &ids[..3] {
        c.cancel_job(pb::CancelJobRequest {
            job_id: id.clone(),
            reason: "done".into(),
        })
        .await
        .unwrap();
    }
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let live = c
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .unwrap()
            .into_inner();
        if !live.jobs.iter().any(|j| ids[..3].contains(&j.id)) {
            break;
        }
        assert!(Instant::now() < until, "cancelled jobs never pruned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let archived = c
        .list_jobs(pb::ListJobsRequest {
            archived: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let archived: Vec<&str> = archived.jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(
        archived,
        ids[..3].iter().map(String::as_str).collect::<Vec<_>>()
    );
    let detail = job(&mut c, &ids[0]).await;
    assert_eq!(detail.summary.unwrap().state(), pb::JobState::Cancelled);

    // The cap of 40 pending lets the queue fill up to it, then refuses.
    let pending = c
        .list_jobs(pb::ListJobsRequest {
            states: vec![pb::JobState::Pending as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs
        .len();
    assert!(pending < 40);
    let mut refused = None;
    for n in 200..260 {
        match c
            .submit_job(pb::SubmitJobRequest {
                spec_toml: spec(n),
                idempotency_key: String::new(),
            })
            .await
        {
            Ok(_) => {}
            Err(status) => {
                refused = Some((n, status));
                break;
            }
        }
    }
    let (n, status) = refused.expect("the cap refuses");
    assert_eq!(n - 200, 40 - pending, "refused once 40 were pending");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("40"), "{}", status.message());
    r.stop().await;
}

/// A client that submits faster than `[clients]` allows is refused with RESOURCE_EXHAUSTED and a
/// retry hint, and is admitted again once it waited that long; nothing it was refused created a
/// job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_past_its_submit_rate_is_told_when_to_come_back() {
    let r = OneReplica::start_with(|c| {
        c.clients.submit_per_second = 2;
        c.clients.submit_burst = 3;
    })
    .await;
    let mut c = r.client().await;
    let submit = |n: u32| pb::SubmitJobRequest {
        spec_toml: format!("name = \"r{n}\"\ncommand = [\"true\"]\n[resources]\ndevices = 1\n"),
        idempotency_key: String::new(),
    };
    let mut accepted = 0;
    let mut refusal = None;
    for n in 0..10 {
        match c.submit_job(submit(n)).await {
            Ok(_) => accepted += 1,
            Err(s) => {
                refusal = Some(s);
                break;
            }
        }
    }
    let refusal = refusal.expect("the burst runs out");
    assert!(
        (3..=4).contains(&accepted),
        "the burst of 3 (and maybe one refilled): {accepted}"
    );
    assert_eq!(
        refusal.code(),
        tonic::Code::ResourceExhausted,
        "{refusal:?}"
    );
    let wait = gangway_proto::link::retry_after(&refusal).expect("a retry hint");
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_millis(500),
        "{wait:?}"
    );
    assert!(matches!(
        gangway_proto::link::classify(&refusal),
        gangway_proto::link::Retry::After(_)
    ));
    let jobs = c
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(jobs.len(), accepted);
    tokio::time::sleep(wait).await;
    c.submit_job(submit(99))
        .await
        .expect("admitted after the hint");
    r.stop().await;
}

/// Nodes and leases are listed in pages too: every node once, in name order, and every lease once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_and_leases_are_listed_in_pages() {
    let r = OneReplica::start().await;
    let mut c = r.client().await;
    let mut w = r.worker().await;
    let alive = Arc::new(Mutex::new(Vec::new()));
    let _beats = heartbeat(r.addr.clone(), alive.clone());
    for i in 0..12 {
        let name = format!("n{i:02}");
        w.register(host(&name, "r1")).await.expect("register");
        alive.lock().unwrap().push(name);
    }
    for n in 0..20 {
        c.submit_job(pb::SubmitJobRequest {
            spec_toml: format!(
                "name = \"l{n:02}\"\ncommand = [\"true\"]\n[resources]\ndevices = 1\n"
            ),
            idempotency_key: String::new(),
        })
        .await
        .unwrap();
    }
    let until = Instant::now() + Duration::from_secs(15);
    let mut leases = Vec::new();
    while leases.len() < 20 {
        assert!(Instant::now() < until, "only {} leases", leases.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
        leases.clear();
        let mut token = String::new();
        loop {
            let page = c
                .list_leases(pb::PageRequest {
                    page_size: 7,
                    page_token: token,
                })
                .await
                .unwrap()
                .into_inner();
            assert!(page.leases.len() <= 7);
            leases.extend(page.leases.into_iter().map(|l| l.job_id));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
    }
    let mut sorted = leases.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, leases, "each lease once, in job id order");

    let mut names = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_nodes(pb::PageRequest {
                page_size: 5,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        names.extend(page.nodes.into_iter().map(|n| n.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    let want: Vec<String> = (0..12).map(|i| format!("n{i:02}")).collect();
    assert_eq!(names, want);
    r.stop().await;
}
