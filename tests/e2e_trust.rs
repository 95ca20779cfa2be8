//! The audit trail and secret environment values end to end: three replicas with mutual TLS, two
//! fake hosts, a person with a submitter's certificate. What she does is listed by `ListAudit`
//! (and `gangway audit`) under her identity; her job's secret reaches the allocation of the host
//! it was leased to, and no listing, backup, other host or log line.

mod common;

use common::pki::pki;
use common::*;
use gangway_proto::pb;
use gangway_proto::pb::worker_api_client::WorkerApiClient;
use std::time::{Duration, Instant};

const SECRET: &str = "hf_e2e_s3cr3t_0123456789";

fn secret_spec() -> String {
    format!(
        "name = \"secretive\"\nqueue = \"research\"\ncommand = [\"sleep\", \"1000\"]\n\
         [env]\nLR = \"0.1\"\n[secret_env]\nHF_TOKEN = \"{SECRET}\"\n[resources]\ndevices = 1\n"
    )
}

/// The first allocation set the replica at `addr` streams to `node`, read as that node's agent.
async fn first_allocation_set(addr: &str, node: &str) -> pb::AllocationSet {
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(10));
    let channel = pki()
        .dialer(&format!("worker/{node}"))
        .connect(&ep)
        .await
        .expect("worker connection");
    let mut worker = WorkerApiClient::new(channel)
        .max_decoding_message_size(gangway_proto::allocation::MAX_ALLOCATION_SET_BYTES);
    let mut stream = worker
        .watch_allocations(pb::WatchAllocationsRequest { node: node.into() })
        .await
        .expect("watch allocations")
        .into_inner();
    stream
        .message()
        .await
        .expect("an allocation set")
        .expect("the stream is open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persons_writes_are_audited_and_a_secret_reaches_only_its_host() {
    let mut cluster = TestCluster::start(3);
    let leader = cluster.wait_for_leader(None, Duration::from_secs(30)).await;
    let addr = cluster.addr(leader);
    let mut admin = client(&addr).await.expect("admin client");
    admin
        .set_access(pb::SetAccessRequest {
            principal: "client/alice".into(),
            grant: Some(pb::AccessGrant {
                roles: vec!["submitter".into()],
                queues: vec!["research".into()],
            }),
            token_sha256: String::new(),
        })
        .await
        .expect("grant alice");
    let fleet = two_hosts(cluster.addrs()).await;
    // The rule applies on each replica as it applies it.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Alice submits a job with a secret; it runs on one host.
    let mut alice = client_as(&addr, "client/alice").await.expect("alice");
    let job = alice
        .submit_job(pb::SubmitJobRequest {
            spec_toml: secret_spec(),
            idempotency_key: "trust-1".into(),
        })
        .await
        .expect("alice submits")
        .into_inner()
        .job_id;
    let until = Instant::now() + Duration::from_secs(30);
    let detail = loop {
        let d = admin
            .get_job(pb::GetJobRequest {
                job_id: job.clone(),
            })
            .await
            .expect("get job")
            .into_inner();
        if !d.tasks.is_empty() {
            break d;
        }
        assert!(Instant::now() < until, "never placed: {d:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // Listings show the secret's name, never its value, to the owner and to an admin.
    assert_eq!(detail.secret_env, vec!["HF_TOKEN".to_owned()]);
    assert_eq!(detail.env.get("LR").map(String::as_str), Some("0.1"));
    assert!(!format!("{detail:?}").contains(SECRET));
    let own = alice
        .get_job(pb::GetJobRequest {
            job_id: job.clone(),
        })
        .await
        .expect("her job")
        .into_inner();
    assert!(!format!("{own:?}").contains(SECRET));
    let listed = alice
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(listed.jobs.iter().any(|j| j.id == job));
    assert!(!format!("{listed:?}").contains(SECRET));

    // A backup holds the name, not the value.
    let mut chunks = admin
        .save_snapshot(pb::Empty {})
        .await
        .expect("save snapshot")
        .into_inner();
    let mut backup = Vec::new();
    while let Some(chunk) = chunks.message().await.expect("a chunk") {
        backup.extend_from_slice(&chunk.data);
    }
    let backup = String::from_utf8(backup).expect("a backup is JSON");
    assert!(backup.contains("HF_TOKEN") && !backup.contains(SECRET));

    // The leased host's allocation carries the value; the other host's does not.
    let host = detail.tasks[0].host.clone();
    let other = if host == "host-1" { "host-2" } else { "host-1" };
    let set = first_allocation_set(&addr, &host).await;
    let alloc = set
        .allocations
        .iter()
        .find(|a| a.job_id == job)
        .expect("the job's allocation on its host");
    assert_eq!(alloc.secret_env.len(), 1);
    assert_eq!(
        (
            alloc.secret_env[0].name.as_str(),
            alloc.secret_env[0].value.as_str()
        ),
        ("HF_TOKEN", SECRET)
    );
    assert!(!alloc.env.contains_key("HF_TOKEN"));
    assert!(!format!("{alloc:?}").contains(SECRET), "Debug redacts");
    let elsewhere = first_allocation_set(&addr, other).await;
    assert!(!format!(
        "{:?}",
        elsewhere
            .allocations
            .iter()
            .map(|a| &a.secret_env)
            .collect::<Vec<_>>()
    )
    .contains("HF_TOKEN"));

    // Alice cancels it.
    alice
        .cancel_job(pb::CancelJobRequest {
            job_id: job.clone(),
            reason: "done".into(),
        })
        .await
        .expect("alice cancels her job");

    // The trail lists both under her name, newest first; the admin's grant under his.
    let mine = admin
        .list_audit(pb::ListAuditRequest {
            limit: 0,
            actor: "client/alice".into(),
        })
        .await
        .expect("list audit")
        .into_inner()
        .entries;
    let seen: Vec<(&str, &str, &str)> = mine
        .iter()
        .map(|e| (e.action.as_str(), e.target.as_str(), e.outcome.as_str()))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("cancel_job", job.as_str(), "ok"),
            ("submit_job", job.as_str(), "ok")
        ]
    );
    assert!(mine[0].at_ms >= mine[1].at_ms && mine[1].at_ms > 0);
    let all = admin
        .list_audit(pb::ListAuditRequest::default())
        .await
        .expect("list audit")
        .into_inner()
        .entries;
    assert!(all.iter().any(|e| e.actor == "client/admin"
        && e.action == "set_access"
        && e.target == "client/alice"));

    // A submitter may not read the trail.
    let denied = alice
        .list_audit(pb::ListAuditRequest::default())
        .await
        .expect_err("a submitter lacks read_audit");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);

    // The CLI lists the same, as the admin.
    let out = gangway(&[
        "audit",
        "--actor",
        "client/alice",
        "--addr",
        &addr,
        "-o",
        "json",
    ])
    .await;
    assert!(out.status.success(), "{}", explain(&out));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    assert_eq!(listed[0]["action"], "cancel_job");

    // No replica wrote the value to its log.
    drop(fleet);
    assert!(
        !cluster.logs().contains(SECRET),
        "a replica logged the secret"
    );
}
