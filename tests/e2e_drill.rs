//! `gangway drill` against the real binary: three `gangway server` processes on loopback, two hosts
//! through the worker API holding leases, and the drill CLI as an operator runs it. Each test reads
//! the drill's `-o json` report and then checks the cluster itself, so a report that lies fails too.

mod common;

use common::*;

use gangway::fleet::FakeFleet;
use gangway_proto::pb;
use serde_json::Value;
use std::process::Output;
use std::time::{Duration, Instant};

/// Runs `gangway ARGS...` off the async runtime (the CLI blocks).
/// The drill's JSON report; the drill must have passed.
fn passed_report(out: &Output, cluster: &TestCluster) -> Value {
    assert!(out.status.success(), "{}\n{}", explain(out), cluster.logs());
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report on stdout");
    // Shown with --nocapture: what the drill measured.
    eprintln!("{report:#}");
    report
}

/// A cluster with work on it: two 8-GPU hosts and two running jobs whose leases a failover must
/// leave alone. Returns the cluster, the hosts, the leader, and the leases as the leader has them.
async fn cluster_with_work() -> (TestCluster, FakeFleet, u64, Vec<(String, u64, Vec<String>)>) {
    let mut cluster = TestCluster::start(3);
    let leader = cluster.wait_for_leader(None, Duration::from_secs(30)).await;
    let mut fleet = two_hosts(cluster.addrs()).await;
    let mut ids = Vec::new();
    for (name, devices) in [("four", 4), ("two", 2)] {
        let r = submit(&cluster.addr(leader), &single(name, devices), name)
            .await
            .expect("submit");
        ids.push(r.job_id);
    }
    let placed = fleet
        .wait_for(Duration::from_secs(20), |seen| {
            ids.iter().all(|id| seen.contains_key(id))
        })
        .await;
    assert!(placed, "both jobs leased\n{}", cluster.logs());
    let leases = local_leases(&cluster.addr(leader))
        .await
        .expect("leader answers");
    assert_eq!(leases.len(), 2, "{leases:?}");
    (cluster, fleet, leader, leases)
}

/// What every passing failover report must say: a different replica leads in a newer term (or, with
/// `may_resume`, the crashed leader's restarted process leads again), a probe was placed after the
/// fault, the old leader is back, and nothing was lost, doubled or restarted.
fn assert_clean_failover(r: &Value, old_leader: u64, may_resume: bool) {
    assert_eq!(r["old_leader"], old_leader, "{r:#}");
    let new = r["new_leader"].as_u64().expect("a new leader");
    if new == old_leader {
        assert!(may_resume, "the old leader cannot lead again here: {r:#}");
        assert_eq!(r["old_leader_resumed"], true, "{r:#}");
    } else {
        assert!(
            r["term_after"].as_u64() > r["term_before"].as_u64(),
            "{r:#}"
        );
        assert_eq!(r["old_leader_resumed"], false, "{r:#}");
    }
    assert!(r["time_to_new_leader_ms"].is_u64(), "{r:#}");
    assert!(r["time_to_first_placement_ms"].is_u64(), "{r:#}");
    assert!(r["old_leader_back_ms"].is_u64(), "{r:#}");
    assert_eq!(r["leases_before"], 2, "{r:#}");
    assert_eq!(r["leases_kept"], 2, "{r:#}");
    assert_eq!(r["leases_lost"], 0, "{r:#}");
    assert_eq!(r["leases_duplicated"], 0, "{r:#}");
    assert_eq!(r["tasks_restarted"], 0, "{r:#}");
    assert_eq!(r["writes"]["unacknowledged"], 0, "{r:#}");
    assert_eq!(r["writes"]["duplicate_jobs"], 0, "{r:#}");
    assert!(r["writes"]["acknowledged"].as_u64() > Some(0), "{r:#}");
    assert_eq!(r["recovered"], true, "{r:#}");
    assert_eq!(r["passed"], true, "{r:#}");
}

/// After the drill, seen from the replicas themselves: the old leader follows the current one, it
/// holds the same leases as before, and no probe job is left pending or running.
async fn assert_cluster_settled(
    cluster: &mut TestCluster,
    old_leader: u64,
    before: &[(String, u64, Vec<String>)],
) {
    let leader = cluster.wait_for_leader(None, Duration::from_secs(20)).await;
    let commit = status(&cluster.addr(leader)).await.unwrap().commit_index;
    assert!(
        wait_applied(&cluster.addr(old_leader), commit, Duration::from_secs(20)).await,
        "replica {old_leader} catches up\n{}",
        cluster.logs()
    );
    let s = status(&cluster.addr(old_leader)).await.unwrap();
    assert_eq!(
        s.leader_id, leader,
        "replica {old_leader} follows the leader"
    );
    for id in [leader, old_leader] {
        let leases = local_leases(&cluster.addr(id)).await.unwrap();
        let kept: Vec<_> = leases
            .iter()
            .filter(|l| before.iter().any(|b| b.0 == l.0))
            .cloned()
            .collect();
        assert_eq!(
            kept, before,
            "replica {id}: the leases from before the drill"
        );
    }
    let probes_alive: Vec<_> = cluster
        .list_jobs()
        .await
        .into_iter()
        .filter(|j| j.name.starts_with("drill-probe-") && j.state().word() != "cancelled")
        .collect();
    assert!(probes_alive.is_empty(), "probe jobs left: {probes_alive:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_is_refused_unless_the_replica_allows_it() {
    let mut cluster = TestCluster::start_with(
        3,
        &ClusterOptions {
            allow_drills: false,
            ..ClusterOptions::default()
        },
    );
    let leader = cluster.wait_for_leader(None, Duration::from_secs(30)).await;

    // The CLI checks before it changes anything: an error naming the setting, no probe submitted.
    let out = gangway(&[
        "drill",
        "kill-leader",
        "--addr",
        &cluster.addrs().join(","),
        "--timeout",
        "10s",
    ])
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("allow_drills"), "{}", explain(&out));
    assert!(cluster.list_jobs().await.is_empty());

    // The RPC itself, every action: FAILED_PRECONDITION naming the setting.
    let mut c = client(&cluster.addr(leader)).await.expect("connect");
    for action in [pb::DrillAction::Abort, pb::DrillAction::Partition] {
        let err = c
            .drill(pb::DrillRequest {
                action: action.into(),
                duration_ms: 1000,
                peers: Vec::new(),
            })
            .await
            .expect_err("refused");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("allow_drills"), "{err:?}");
    }

    // Nothing happened: every replica runs, and the leader still leads.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for id in 1..=3 {
        assert!(cluster.replica(id).is_running(), "replica {id} runs");
    }
    assert_eq!(
        status(&cluster.addr(leader)).await.unwrap().role,
        "leader",
        "the leader still leads\n{}",
        cluster.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_leader_fails_over_and_the_old_leader_rejoins() {
    // Phase 1: two running jobs.
    let (mut cluster, fleet, leader, before) = cluster_with_work().await;

    // Phase 2: the leader drops its Raft traffic for 5 s, longer than the 3 s node TTL. The cut-off
    // leader still believes it leads, but it refuses heartbeats once no quorum has acknowledged it
    // for an election timeout, so the hosts move to the new leader and none is declared down.
    let out = gangway(&[
        "drill",
        "partition-leader",
        "--for",
        "5s",
        "--addr",
        &cluster.addrs().join(","),
        "--timeout",
        "20s",
        "-o",
        "json",
    ])
    .await;
    let r = passed_report(&out, &cluster);
    assert_clean_failover(&r, leader, false);
    assert_eq!(r["partition_ms"], 5000, "{r:#}");

    // Phase 3: the cluster agrees with the report.
    assert_cluster_settled(&mut cluster, leader, &before).await;
    fleet.stop().await;
}

/// kill-leader with the test as the supervisor (systemd's Restart=on-failure): the leader's process
/// must end abnormally, by SIGABRT, and is started again on its data directory, at once or only
/// after another replica took over (a slower supervisor).
async fn kill_leader_with_supervisor(restart_after_failover: bool) {
    // Phase 1: two running jobs.
    let (mut cluster, fleet, leader, before) = cluster_with_work().await;

    // Phase 2: the drill runs while the test supervises the leader's process.
    let drill = tokio::spawn(gangway(&[
        "drill",
        "kill-leader",
        "--addr",
        &cluster.addrs().join(","),
        "--timeout",
        "20s",
        "-o",
        "json",
    ]));
    let until = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(status) = cluster.replica(leader).exit_status() {
            break status;
        }
        assert!(
            Instant::now() < until,
            "the leader did not abort\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!exit.success(), "an abort is not a clean exit: {exit:?}");
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(exit.signal(), Some(6), "SIGABRT: {exit:?}");
    }
    if restart_after_failover {
        cluster
            .wait_for_leader(Some(leader), Duration::from_secs(20))
            .await;
    }
    cluster.start_replica(leader);

    // Phase 3: the report, and the cluster agreeing with it. A supervisor faster than the
    // election timeout may get the old leader back before another replica takes over.
    let out = drill.await.unwrap();
    let r = passed_report(&out, &cluster);
    assert_clean_failover(&r, leader, !restart_after_failover);
    assert_cluster_settled(&mut cluster, leader, &before).await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_leader_fails_over_and_the_restarted_replica_rejoins() {
    kill_leader_with_supervisor(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_leader_restarted_at_once_may_lead_again() {
    kill_leader_with_supervisor(false).await;
}
