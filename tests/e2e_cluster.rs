//! End to end, against the real binary: three `gangway server` processes on loopback, hosts
//! registered through the worker API, jobs through the client API. Every test starts its own cluster
//! in its own temporary directory.

mod common;

use common::*;
use gangway::fleet::{FakeFleet, FakeHost};
use gangway_proto::pb;
use std::time::Duration;

fn fleet_of_four() -> Vec<FakeHost> {
    vec![
        FakeHost::h100("host-1", "r1"),
        FakeHost::h100("host-2", "r1"),
        FakeHost::h100("host-3", "r2"),
        FakeHost::h100("host-4", "r2"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_survive_a_leader_kill_and_the_killed_replica_catches_up() {
    // Phase 1: a cluster, four 8-GPU hosts in two racks, a rack-local 2x8 gang and a 4-GPU job.
    let mut cluster = TestCluster::start(3);
    let leader = cluster.wait_for_leader(None, Duration::from_secs(30)).await;
    let mut fleet =
        FakeFleet::start_with(cluster.addrs(), fleet_of_four(), common::fleet_options())
            .await
            .expect("fleet registers");
    let gang = submit(&cluster.addr(leader), GANG_2X8_RACK, "gang")
        .await
        .expect("submit gang")
        .job_id;
    // Through a follower: it forwards the write to the leader.
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let four = submit(&cluster.addr(follower), &single("four", 4), "four")
        .await
        .expect("submit via follower")
        .job_id;
    let placed = fleet
        .wait_for(Duration::from_secs(20), |seen| {
            seen.get(&gang).is_some_and(|l| l.hosts.len() == 2) && seen.contains_key(&four)
        })
        .await;
    assert!(placed, "both jobs leased\n{}", cluster.logs());
    let seen = fleet.seen();
    let gang_hosts = &seen[&gang].hosts;
    assert_eq!(gang_hosts.len(), 2, "one task per host: {gang_hosts:?}");
    let racks: Vec<&str> = gang_hosts
        .iter()
        .map(|h| {
            if h == "host-1" || h == "host-2" {
                "r1"
            } else {
                "r2"
            }
        })
        .collect();
    assert_eq!(racks[0], racks[1], "required = rack: {gang_hosts:?}");

    // Phase 2: the leases are committed on every replica, identically.
    let leader_status = status(&cluster.addr(leader)).await.expect("leader answers");
    let mut views = Vec::new();
    for id in 1..=3 {
        assert!(
            wait_applied(
                &cluster.addr(id),
                leader_status.commit_index,
                Duration::from_secs(10)
            )
            .await,
            "replica {id} applies the leases"
        );
        views.push(
            local_leases(&cluster.addr(id))
                .await
                .expect("replica answers"),
        );
    }
    assert_eq!(views[0].len(), 2, "{views:?}");
    assert!(
        views.iter().all(|v| *v == views[0]),
        "replicas disagree: {views:?}"
    );
    let before = views[0].clone();

    // Phase 3: kill -9 the leader. A new one takes over; the leases are unchanged, no host is
    // declared down (the new leader grants every host a full TTL), and a new job is placed.
    cluster.kill(leader);
    let new_leader = cluster
        .wait_for_leader(Some(leader), Duration::from_secs(30))
        .await;
    let after = local_leases(&cluster.addr(new_leader))
        .await
        .expect("new leader answers");
    assert_eq!(after, before, "leases changed across failover");
    let two = submit(&cluster.addr(new_leader), &single("two", 2), "two")
        .await
        .expect("submit after failover")
        .job_id;
    assert!(
        fleet
            .wait_for(Duration::from_secs(20), |seen| seen.contains_key(&two))
            .await,
        "a job submitted after failover is leased\n{}",
        cluster.logs()
    );
    // Longer than the node TTL (3 s): healthy hosts that kept heartbeating stay up.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut c = client(&cluster.addr(new_leader)).await.expect("connect");
    let nodes = c
        .list_nodes(pb::PageRequest::default())
        .await
        .expect("nodes")
        .into_inner()
        .nodes;
    assert!(
        nodes.iter().all(|n| n.state == "ready"),
        "a failover evicted a healthy host: {nodes:?}"
    );
    let leases = local_leases(&cluster.addr(new_leader)).await.unwrap();
    for lease in &before {
        assert!(
            leases.contains(lease),
            "lease {lease:?} lost or re-issued: {leases:?}"
        );
    }

    // Phase 4: the killed replica restarts on its data directory and catches up.
    cluster.start_replica(leader);
    let target = status(&cluster.addr(new_leader))
        .await
        .unwrap()
        .commit_index;
    assert!(
        wait_applied(&cluster.addr(leader), target, Duration::from_secs(30)).await,
        "restarted replica catches up\n{}",
        cluster.logs()
    );
    let restarted = local_leases(&cluster.addr(leader))
        .await
        .expect("restarted answers");
    assert_eq!(restarted, leases, "restarted replica's state differs");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_are_rejected_with_the_field_named_and_nothing_created() {
    let mut cluster = TestCluster::start(3);
    cluster.wait_for_leader(None, Duration::from_secs(30)).await;
    let cases = [
        (
            single("x", 0).replace("devices = 0", "devices = -2"),
            "resources.devices",
        ),
        (format!("{}\ncolour = \"red\"\n", single("x", 1)), "colour"),
        (GANG_2X8_RACK.replace("tasks = 2", "tasks = 0"), "tasks"),
        (
            GANG_2X8_RACK.replace("\"rack\"", "\"building\""),
            "topology.required",
        ),
    ];
    for replica in 1..=3 {
        for (spec, field) in &cases {
            let err = submit(&cluster.addr(replica), spec, "")
                .await
                .expect_err("invalid spec accepted");
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
            assert_eq!(
                err.metadata()
                    .get("x-gangway-code")
                    .unwrap()
                    .to_str()
                    .unwrap(),
                "invalid_spec"
            );
            assert!(
                err.message().contains(field),
                "{field} not named in {:?}",
                err.message()
            );
        }
    }
    let jobs = cluster.list_jobs().await;
    assert!(
        jobs.is_empty(),
        "invalid submissions created jobs: {jobs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submissions_with_one_idempotency_key_create_one_job() {
    let mut cluster = TestCluster::start(3);
    let leader = cluster.wait_for_leader(None, Duration::from_secs(30)).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    // The same key through the leader and through a follower at once, several times over.
    for round in 0..5 {
        let key = format!("retry-key-{round}");
        let spec = single(&format!("job-{round}"), 1);
        let (to_leader, to_follower) = (cluster.addr(leader), cluster.addr(follower));
        let (a, b) = tokio::join!(
            submit(&to_leader, &spec, &key),
            submit(&to_follower, &spec, &key)
        );
        let (a, b) = (a.expect("submit a"), b.expect("submit b"));
        assert_eq!(a.job_id, b.job_id, "round {round}: two jobs for one key");
        assert!(
            a.existing != b.existing,
            "round {round}: exactly one created it: {a:?} {b:?}"
        );
    }
    let jobs = cluster.list_jobs().await;
    assert_eq!(jobs.len(), 5, "{jobs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_redirect_reads_to_the_leader_and_report_the_cluster() {
    let mut cluster = TestCluster::start(3);
    let leader = cluster.wait_for_leader(None, Duration::from_secs(30)).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let mut c = client(&cluster.addr(follower)).await.unwrap();
    // A leader is elected on one other vote: the third replica may not have heard from it yet
    // (it then answers Unavailable naming no leader). The story is a follower that knows it.
    until_follows(&cluster, follower, leader).await;
    let err = c
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect_err("a follower serves no linearizable reads");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert_eq!(
        err.metadata()
            .get("x-gangway-leader")
            .unwrap()
            .to_str()
            .unwrap(),
        cluster.addr(leader)
    );
    let s = c.cluster_status(pb::Empty {}).await.unwrap().into_inner();
    assert_eq!(s.leader_id, leader);
    assert_eq!(s.role, "follower");
    assert_eq!(s.members.len(), 3);
    assert!(s.members.iter().all(|m| m.voter));

    // Health endpoints: every replica is live and ready once it knows the leader.
    for r in &cluster.replicas {
        for path in ["livez", "readyz"] {
            let body = http_get(&r.http, path, "HTTP/1.1 200").await;
            assert!(
                body.starts_with("HTTP/1.1 200"),
                "{path} on {}: {body}",
                r.id
            );
        }
    }
    // The gauges refresh every second.
    let metrics = http_get(
        &cluster.addr_http(leader),
        "metrics",
        "gangway_raft_is_leader 1",
    )
    .await;
    assert!(metrics.contains("gangway_raft_is_leader 1"), "{metrics}");

    // A replica removed from the cluster is still live but no longer ready: it still names the
    // leader it knew, but the leader no longer talks to it, and a load balancer must stop sending
    // it clients.
    let removed = (1..=3).find(|id| *id != leader).unwrap();
    let mut c = client(&cluster.addr(leader)).await.expect("leader client");
    c.remove_member(pb::RemoveMemberRequest { id: removed })
        .await
        .expect("remove a follower");
    let http = cluster.addr_http(removed);
    // Which words depends on how much of the change reached it: "no word from leader N" (the
    // usual case), "not a member", or "no leader known" once it starts elections of its own.
    let body = http_get(&http, "readyz", "HTTP/1.1 503").await;
    assert!(body.starts_with("HTTP/1.1 503"), "{body}");
    println!(
        "removed replica's /readyz: {}",
        body.lines().last().unwrap_or("")
    );
    let body = http_get(&http, "livez", "HTTP/1.1 200").await;
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
}

/// A bare HTTP/1.1 GET, retried for up to 6 s until the response contains `want`.
async fn http_get(addr: &str, path: &str, want: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut last = String::new();
    for _ in 0..30 {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect http");
        s.write_all(
            format!("GET /{path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        if out.contains(want) {
            return out;
        }
        last = out;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    last
}

/// Founding replicas come up in any order (three hosts booting at their own pace): one that starts
/// after the others formed the cluster joins it as a follower. It must not bootstrap a cluster of
/// its own on the way: a brand-new replica that campaigns for term 1 with a higher id than the
/// term-1 leader outranks it, and the leader would step down for nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_founder_that_starts_late_joins_without_deposing_the_leader() {
    let (mut cluster, leader) = founders_up([1, 2]).await;
    let term = status(&cluster.addr(leader))
        .await
        .expect("leader status")
        .term;

    // Replica 3, the highest id, starts now and hears from the leader.
    cluster.start_replica(3);
    until_follows(&cluster, 3, leader).await;

    // Longer than any founder waits before it would bootstrap (two election timeouts for the third):
    // every replica still follows the same leader in the same term.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    for id in 1..=3 {
        let s = status(&cluster.addr(id)).await.expect("status");
        assert_eq!(
            (s.leader_id, s.term),
            (leader, term),
            "replica {id}: the leader and term from before replica 3 started\n{}",
            cluster.logs()
        );
    }
}

/// The founders take turns bootstrapping, lowest id first; when the first never comes up, the next
/// one's turn comes and the other two form the cluster without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_forms_without_its_first_founder() {
    let (mut cluster, leader) = founders_up([2, 3]).await;
    assert!(leader == 2 || leader == 3, "leader {leader}");
    let mut c = client(&cluster.addr(leader)).await.expect("leader client");
    let s = c.cluster_status(pb::Empty {}).await.unwrap().into_inner();
    assert_eq!(
        s.members.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "the founding members, replica 1 among them"
    );

    // Replica 1 comes up at last and follows.
    cluster.start_replica(1);
    until_follows(&cluster, 1, leader).await;
}

/// Three founding replicas configured, only `up` of them started; returns once those two agree on
/// a leader (its id).
async fn founders_up(up: [u64; 2]) -> (TestCluster, u64) {
    let mut cluster = TestCluster::configure(3, &ClusterOptions::default());
    for id in up {
        cluster.start_replica(id);
    }
    let leader = cluster.wait_for_leader(None, Duration::from_secs(30)).await;
    (cluster, leader)
}

/// Waits (up to 15 s) until replica `id` answers as a follower of `leader`.
async fn until_follows(cluster: &TestCluster, id: u64, leader: u64) {
    let addr = cluster.addr(id);
    common::trainer::poll(
        Duration::from_secs(15),
        &format!("replica {id} to follow leader {leader}"),
        || cluster.logs(),
        || {
            let addr = addr.clone();
            async move {
                let s = status(&addr).await?;
                (s.leader_id == leader && s.role == "follower").then_some(())
            }
        },
    )
    .await;
}
