//! Trust, over real processes: three `gangway server` replicas with mutual TLS, every RPC of the
//! replica's port called under every kind of identity, and the outcome compared with the policy
//! table (which is printed). Then the attacks the issue names: a host speaking for another, a
//! forged Raft message, a plain-text client.
//!
//! Run alone: `cargo test --test e2e_auth -- --nocapture` prints the matrix.

mod common;

use common::pki::pki;
use common::TestCluster;
use futures::stream;
use gangway_consensus::pb::RaftPayload;
use gangway_proto::pb;
use gangway_scheduler::server::policy::{self, Need, POLICY};
use gangway_scheduler::state::access::Role;
use gangway_tls::{ClientTls, Dialer, Expect, Kind, TlsFiles};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// The identities of the matrix: (column, how it dials, bearer token).
struct Who {
    label: &'static str,
    dialer: Dialer,
    token: Option<String>,
    /// What the policy table grants it: roles, or the kind of certificate.
    roles: Vec<Role>,
    kind: Option<Kind>,
}

fn who(label: &'static str, id: &str, roles: &[Role]) -> Who {
    let kind = id.parse::<gangway_tls::Identity>().unwrap().kind();
    Who {
        label,
        dialer: pki().dialer(id),
        token: None,
        roles: roles.to_vec(),
        kind: Some(kind),
    }
}

/// TLS without a client certificate.
fn anonymous(token: Option<String>, label: &'static str, roles: &[Role]) -> Who {
    let files = TlsFiles {
        ca: pki().ca(),
        cert: None,
        key: None,
    };
    Who {
        label,
        dialer: Dialer::Tls(ClientTls::new(files, Expect::Kind(Kind::Server)).unwrap()),
        token,
        roles: roles.to_vec(),
        kind: None,
    }
}

/// Whether the policy table lets `w` call a method with `need` (its content not yet checked).
fn expected(w: &Who, need: Need) -> bool {
    let authenticated = w.kind.is_some() || w.token.is_some();
    match need {
        Need::Authenticated => authenticated,
        Need::Permission(p) => w.roles.iter().any(|r| r.permissions().contains(&p)),
        Need::Worker => w.kind == Some(Kind::Worker),
        Need::Replica => w.kind == Some(Kind::Server),
    }
}

/// Calls `service/method` with an empty message (or stream) as `w`: true when the call got past
/// authorization (it may still fail for its content: an empty request names no job or node).
async fn call(channel: Channel, w: &Who, service: &str, method: &str) -> Result<bool, String> {
    let path: http::uri::PathAndQuery = format!("/{service}/{method}").parse().unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| e.to_string())?;
    let codec = || tonic_prost::ProstCodec::<pb::Empty, pb::Empty>::default();
    let client_streaming = matches!(method, "RestoreSnapshot" | "InstallSnapshot");
    let server_streaming = matches!(method, "SaveSnapshot" | "WatchAllocations" | "Presence");
    let status = if client_streaming {
        let req = with_token(
            w,
            tonic::Request::new(stream::iter(Vec::<pb::Empty>::new())),
        );
        grpc.client_streaming(req, path, codec()).await.err()
    } else if server_streaming {
        let req = with_token(w, tonic::Request::new(pb::Empty {}));
        match grpc.server_streaming(req, path, codec()).await {
            Err(s) => Some(s),
            Ok(r) => tokio::time::timeout(Duration::from_secs(2), r.into_inner().message())
                .await
                .ok()
                .and_then(|m| m.err()),
        }
    } else {
        let req = with_token(w, tonic::Request::new(pb::Empty {}));
        grpc.unary(req, path, codec()).await.err()
    };
    Ok(!matches!(
        status.map(|s| s.code()),
        Some(Code::PermissionDenied | Code::Unauthenticated)
    ))
}

fn with_token<T>(w: &Who, mut r: tonic::Request<T>) -> tonic::Request<T> {
    if let Some(t) = &w.token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

async fn channel(w: &Who, addr: &str) -> Channel {
    let ep = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(10));
    w.dialer.connect(&ep).await.expect("TLS connection")
}

/// Grants the matrix's identities their roles, as the admin.
async fn grant(addr: &str, principal: &str, roles: &[&str], queues: &[&str], token: &str) {
    let mut admin = common::client(addr).await.expect("admin client");
    admin
        .set_access(pb::SetAccessRequest {
            principal: principal.into(),
            grant: Some(pb::AccessGrant {
                roles: roles.iter().map(|r| (*r).to_owned()).collect(),
                queues: queues.iter().map(|q| (*q).to_owned()).collect(),
            }),
            token_sha256: if token.is_empty() {
                String::new()
            } else {
                gangway_proto::sha256::hex_digest(token.as_bytes())
            },
        })
        .await
        .unwrap_or_else(|e| panic!("grant {principal}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_under_every_identity_matches_the_policy_table() {
    let mut cluster = TestCluster::start(3);
    let leader = cluster.wait_for_leader(None, Duration::from_secs(30)).await;
    let addr = cluster.addr(leader);
    grant(&addr, "client/viewer", &["viewer"], &[], "").await;
    grant(&addr, "client/sub-a", &["submitter"], &["a"], "").await;
    grant(&addr, "client/op", &["operator"], &[], "").await;
    let token = "a-token-for-the-ci-viewer-0123456789";
    grant(&addr, "token/ci", &["viewer"], &[], token).await;
    // Rules apply on every replica once replicated; give the followers a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let identities = vec![
        anonymous(None, "no cert", &[]),
        anonymous(Some(token.to_owned()), "token viewer", &[Role::Viewer]),
        who("viewer", "client/viewer", &[Role::Viewer]),
        who("submitter a", "client/sub-a", &[Role::Submitter]),
        who("operator", "client/op", &[Role::Operator]),
        who("admin", "client/admin", &[Role::Admin]),
        who("worker 1", "worker/host-1", &[]),
        who("worker 2", "worker/host-2", &[]),
        who("replica", "server/2", &[]),
    ];
    let mut table = format!("{:<42}", "method (need)");
    for w in &identities {
        table.push_str(&format!("{:>13}", w.label));
    }
    table.push('\n');
    let mut wrong = Vec::new();
    for (service, method, need) in POLICY {
        let short = service.rsplit('.').next().unwrap();
        table.push_str(&format!("{:<42}", format!("{short}/{method}")));
        for w in &identities {
            let got = call(channel(w, &addr).await, w, service, method)
                .await
                .unwrap_or_else(|e| panic!("{method} as {}: {e}", w.label));
            let want = expected(w, *need);
            table.push_str(&format!("{:>13}", if got { "ok" } else { "DENIED" }));
            if got != want {
                wrong.push(format!(
                    "{short}/{method} as {}: got {}, the table says {} ({})",
                    w.label,
                    if got { "allowed" } else { "denied" },
                    if want { "allowed" } else { "denied" },
                    policy::describe(*need)
                ));
            }
        }
        table.push('\n');
    }
    println!("{table}");
    assert!(
        wrong.is_empty(),
        "{}\n{table}\n{}",
        wrong.join("\n"),
        cluster.logs()
    );

    // The oversized-spec story: a 3-task job whose command line is 1.5 MB is refused at submit,
    // naming the limit, before it can reach any host's allocation set.
    let mut admin = common::client(&addr).await.expect("admin");
    let spec = format!(
        "name = \"huge\"\ntasks = 3\ncommand = [\"run\", \"{}\"]\n[resources]\ndevices = 1\n",
        "x".repeat(1_500_000)
    );
    let err = admin
        .submit_job(pb::SubmitJobRequest {
            spec_toml: spec,
            idempotency_key: String::new(),
        })
        .await
        .expect_err("a 1.5 MB command is refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .contains(&gangway_proto::spec::MAX_SPEC_BYTES.to_string()),
        "the error names the limit: {}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitters_submit_into_their_queues_and_manage_only_their_own_jobs() {
    let mut cluster = TestCluster::start(1);
    let leader = cluster.wait_for_leader(None, Duration::from_secs(30)).await;
    let addr = cluster.addr(leader);
    grant(&addr, "client/sub-a", &["submitter"], &["a"], "").await;
    grant(&addr, "client/sub-a2", &["submitter"], &["a"], "").await;
    let spec = |queue: &str| pb::SubmitJobRequest {
        spec_toml: format!(
            "name = \"j\"\nqueue = \"{queue}\"\ncommand = [\"true\"]\n[resources]\ndevices = 1\n"
        ),
        idempotency_key: String::new(),
    };
    let mut a = common::client_as(&addr, "client/sub-a").await.unwrap();
    let mut a2 = common::client_as(&addr, "client/sub-a2").await.unwrap();
    let err = a
        .submit_job(spec("b"))
        .await
        .expect_err("queue b is not its");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("queue \"b\""), "{}", err.message());
    // A batch with one job in another's queue is refused whole.
    let err = a
        .submit_jobs(pb::SubmitJobsRequest {
            jobs: vec![spec("a"), spec("b")],
            array_size: 0,
        })
        .await
        .expect_err("queue b is not its");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let job = a
        .submit_job(spec("a"))
        .await
        .expect("its queue")
        .into_inner()
        .job_id;
    let cancel = |job: &str| pb::CancelJobRequest {
        job_id: job.to_owned(),
        reason: String::new(),
    };
    // Another submitter of the same queue may not cancel it; its owner may.
    let err = a2.cancel_job(cancel(&job)).await.expect_err("not its job");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("client/sub-a"), "{}", err.message());
    a.cancel_job(cancel(&job)).await.expect("its own job");
    let detail = common::client(&addr)
        .await
        .unwrap()
        .get_job(pb::GetJobRequest { job_id: job })
        .await
        .unwrap()
        .into_inner();
    let state = detail.summary.as_ref().map(|s| s.state);
    assert_eq!(state, Some(pb::JobState::Cancelled as i32), "{detail:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_speak_only_for_themselves_and_replicas_only_as_themselves() {
    let mut cluster = TestCluster::start(3);
    let leader = cluster.wait_for_leader(None, Duration::from_secs(30)).await;
    let addr = cluster.addr(leader);
    let _fleet = common::two_hosts(cluster.addrs()).await;
    let host1 = who("worker 1", "worker/host-1", &[]);
    let mut w1 = pb::worker_api_client::WorkerApiClient::new(channel(&host1, &addr).await);
    let denied = |r: Result<_, tonic::Status>, what: &str| {
        let s = r.err().unwrap_or_else(|| panic!("{what}: allowed"));
        assert_eq!(s.code(), Code::PermissionDenied, "{what}: {s:?}");
        assert!(
            s.message().contains("worker/host-1"),
            "{what}: {}",
            s.message()
        );
    };
    // host-1 re-registering as host-2, heartbeating for it, watching its allocations, reporting
    // on its devices: all refused.
    let mut reg = pb::RegisterRequest {
        node: "host-2".into(),
        ..Default::default()
    };
    denied(
        w1.register(reg.clone()).await.map(|_| ()),
        "register as host-2",
    );
    reg.node = "host-1".into();
    let hb = |node: &str| pb::HeartbeatRequest {
        node: node.into(),
        devices: Vec::new(),
    };
    denied(
        w1.heartbeat(hb("host-2")).await.map(|_| ()),
        "heartbeat for host-2",
    );
    let own = w1.heartbeat(hb("host-1")).await;
    assert!(own.is_ok(), "its own heartbeat: {:?}", own.err());
    let watch = pb::WatchAllocationsRequest {
        node: "host-2".into(),
    };
    denied(
        w1.watch_allocations(watch).await.map(|_| ()),
        "watch host-2",
    );
    let report = pb::DeviceHealthReport {
        node: "host-2".into(),
        device: "0".into(),
        ..Default::default()
    };
    denied(
        w1.report_device_health(report).await.map(|_| ()),
        "device health of host-2",
    );
    let task = pb::TaskStatusReport {
        node: "host-2".into(),
        job_id: "nobody-1".into(),
        ..Default::default()
    };
    denied(
        w1.report_task_status(task.clone()).await.map(|_| ()),
        "task report as host-2",
    );
    denied(
        w1.report_task_statuses(pb::TaskStatusReports {
            node: "host-2".into(),
            reports: vec![task.clone()],
        })
        .await
        .map(|_| ()),
        "task reports as host-2",
    );
    // Its own batch cannot carry another host's report either.
    let err = w1
        .report_task_statuses(pb::TaskStatusReports {
            node: "host-1".into(),
            reports: vec![task],
        })
        .await
        .expect_err("a report of host-2 in host-1's batch");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("reports[0].node"),
        "{}",
        err.message()
    );

    // A replica's certificate (server/2) sending a vote that claims to come from replica 3.
    let replica2 = who("replica", "server/2", &[]);
    let mut grpc = tonic::client::Grpc::new(channel(&replica2, &cluster.addr(1)).await);
    grpc.ready().await.unwrap();
    let forged = gangway_consensus::testing::vote_request(3, 1_000);
    let path = "/gangway.consensus.v1.RaftTransport/Vote".parse().unwrap();
    let codec = tonic_prost::ProstCodec::<RaftPayload, RaftPayload>::default();
    let mut req = tonic::Request::new(RaftPayload { data: forged });
    req.metadata_mut()
        .insert("x-gangway-raft-from", "3".parse().unwrap());
    let s = grpc.unary(req, path, codec).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(
        s.message().contains("replica 2's certificate"),
        "{}",
        s.message()
    );
    // The cluster kept its leader: the forged vote for term 1000 changed nothing.
    let status = common::status(&addr).await.expect("status");
    assert_eq!(status.leader_id, leader, "{}", cluster.logs());

    // A plain-text client cannot even speak to a TLS replica.
    let plain = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(3))
        .connect()
        .await;
    if let Ok(ch) = plain {
        let r = pb::client_api_client::ClientApiClient::new(ch)
            .cluster_status(pb::Empty {})
            .await;
        assert!(r.is_err(), "plain text answered: {r:?}");
    }
}
