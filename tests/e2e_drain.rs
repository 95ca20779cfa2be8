//! Node drain end to end: real `gangway server` replicas, real `gangway worker` processes with
//! fake devices, and the operator's `gangway node drain NODE --grace D`.
//!
//! * A checkpointable 1x8 trainer on a drained host checkpoints and moves: it resumes on the other
//!   host from that checkpoint with no step lost (every step it printed before the drain is in the
//!   checkpoint, and the new run resumes at exactly the checkpointed step), and the host then holds
//!   no lease: `gangway nodes` reports it `draining,empty`. Prints drain-to-resumed.
//! * A job that cannot checkpoint, on a host drained with a 2 s grace, runs on until the drain's
//!   deadline, then is stopped and re-queued elsewhere; the host ends empty. Prints
//!   drain-to-requeued.

mod common;

use common::trainer::*;
use common::worker::WorkerProcess as Worker;
use common::*;
use std::time::{Duration, Instant};

/// The job running under an epoch above `newer_than`: (epoch, host of rank 0).
async fn wait_running(
    addrs: &[String],
    id: &str,
    newer_than: u64,
    logs: impl Fn() -> String,
) -> (u64, String) {
    let (epoch, d) = running_above(addrs, id, newer_than, logs).await;
    let host = d.tasks.first().expect("rank 0").host.clone();
    (epoch, host)
}

/// Three replicas and two 8-GPU hosts, both registered.
async fn cluster_with_two_hosts() -> (TestCluster, Vec<Worker>) {
    let mut cluster = TestCluster::start(3);
    cluster.wait_for_leader(None, Duration::from_secs(30)).await;
    let addrs = cluster.addrs();
    let workers: Vec<Worker> = ["w1", "w2"]
        .into_iter()
        .map(|n| {
            let mut w = Worker::new(cluster.dir.path(), n, "r1", addrs.clone());
            w.start();
            w
        })
        .collect();
    poll(
        Duration::from_secs(20),
        "both hosts ready",
        || all_logs(&cluster, &workers),
        || {
            let ok = ["w1", "w2"]
                .iter()
                .all(|h| node_json(&addrs, h).is_some_and(|n| n["state"] == "ready"));
            async move { ok.then_some(()) }
        },
    )
    .await;
    (cluster, workers)
}

/// The STATE cell of `node` in `gangway nodes`.
fn state_cell(addrs: &[String], node: &str) -> Option<String> {
    let out = cli(addrs, &["nodes"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(node))
        .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_host_moves_its_trainer_from_its_checkpoint_and_ends_empty() {
    let (cluster, workers) = cluster_with_two_hosts().await;
    let addrs = cluster.addrs();
    let logs = || all_logs(&cluster, &workers);
    let id = submit(&addrs[0], &trainer_spec("drain-me", 1, 8), "drain-me")
        .await
        .expect("submit")
        .job_id;
    let (epoch1, host1) = wait_running(&addrs, &id, 0, logs).await;
    let worker = |host: &str| workers.iter().find(|w| w.name == host).unwrap();
    poll(
        Duration::from_secs(20),
        "the trainer stepping",
        logs,
        || {
            let ok = steps(&worker(&host1).task_log(&id, 0)).len() >= 3;
            async move { ok.then_some(()) }
        },
    )
    .await;
    // Every step printed before the drain must survive it.
    let before = *steps(&worker(&host1).task_log(&id, 0))
        .last()
        .expect("a step");

    let drained_at = Instant::now();
    let out = cli(
        &addrs,
        &[
            "node",
            "drain",
            &host1,
            "--grace",
            "30s",
            "--reason",
            "e2e drain",
        ],
    );
    assert!(out.status.success(), "{}", explain(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("draining"),
        "{}",
        explain(&out)
    );
    let n = node_json(&addrs, &host1).expect("nodes");
    assert_eq!(n["state"], "draining", "{n}");
    assert_eq!(n["state_reason"], "e2e drain", "{n}");
    // The deadline is on the wire until the drain is over; the node may already be empty.
    assert!(
        n["empty"] == true || n["drain_deadline_ms"].as_u64().is_some_and(|d| d > 0),
        "{n}"
    );

    // The trainer runs again elsewhere, under a new lease, resumed from the drain's checkpoint.
    let (epoch2, host2) = wait_running(&addrs, &id, epoch1, logs).await;
    assert_ne!(host2, host1, "placed back on the draining host");
    let ck = job(&addrs, &id)
        .await
        .and_then(|d| d.last_checkpoint)
        .expect("a checkpoint")
        .step;
    assert!(
        ck >= before,
        "the drain's checkpoint (step {ck}) is behind a step printed before the drain ({before})"
    );
    let resumed_at = poll(Duration::from_secs(15), "the trainer resumes", logs, || {
        let r = resumed(&worker(&host2).task_log(&id, 0));
        async move { r.last().copied() }
    })
    .await;
    assert_eq!(
        resumed_at, ck,
        "resumed at step {resumed_at}, the checkpoint is step {ck}"
    );
    let drain_to_resumed = drained_at.elapsed();

    // The host holds no lease: the drain is done.
    poll(Duration::from_secs(15), "the host empty", logs, || {
        let n = node_json(&addrs, &host1);
        async move { n.filter(|n| n["empty"] == true).map(|_| ()) }
    })
    .await;
    assert_eq!(
        state_cell(&addrs, &host1).as_deref(),
        Some("draining,empty")
    );
    let n = node_json(&addrs, &host1).expect("nodes");
    assert_eq!(n["state"], "draining", "{n}");
    assert!(node_json(&addrs, &host2).is_some_and(|n| n["empty"] == false));
    let detail = job(&addrs, &id).await.expect("job");
    let s = detail.summary.as_ref().unwrap();
    assert_eq!((s.restarts, s.lease_epoch), (0, epoch2), "{detail:?}");
    println!(
        "drain-to-resumed {} ms (epoch {epoch1} on {host1} -> epoch {epoch2} on {host2}, resumed \
         at step {ck}; last step printed before the drain {before})",
        drain_to_resumed.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_cannot_checkpoint_is_stopped_and_requeued_at_the_drain_deadline() {
    let (cluster, workers) = cluster_with_two_hosts().await;
    let addrs = cluster.addrs();
    let logs = || all_logs(&cluster, &workers);
    let id = submit(&addrs[0], &single("plain", 8), "plain")
        .await
        .expect("submit")
        .job_id;
    let (epoch1, host1) = wait_running(&addrs, &id, 0, logs).await;

    // Out-of-range graces are refused at the edge, naming the field; nothing changes.
    for bad in ["500ms", "25h"] {
        let out = cli(&addrs, &["node", "drain", &host1, "--grace", bad]);
        assert!(!out.status.success(), "--grace {bad} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("drain_grace_ms"), "--grace {bad}: {err}");
    }
    assert_eq!(node_json(&addrs, &host1).expect("nodes")["state"], "ready");

    let drained_at = Instant::now();
    let out = cli(&addrs, &["node", "drain", &host1, "--grace", "2s"]);
    assert!(out.status.success(), "{}", explain(&out));
    let n = node_json(&addrs, &host1).expect("nodes");
    let deadline = n["drain_deadline_ms"].as_u64().unwrap_or(0);
    assert!(deadline > 0, "a draining node shows its deadline: {n}");

    // Nothing can checkpoint it: it is stopped at the deadline and re-queued on the other host.
    let (epoch2, host2) = wait_running(&addrs, &id, epoch1, logs).await;
    let drain_to_requeued = drained_at.elapsed();
    assert_ne!(host2, host1);
    let detail = job(&addrs, &id).await.expect("job");
    let first = detail
        .runs
        .iter()
        .find(|r| r.epoch == epoch1)
        .expect("the first run");
    assert!(
        first.end.contains("drained") && first.end.contains("deadline"),
        "{first:?}"
    );
    assert!(
        first.ended_at_ms >= deadline,
        "stopped at {} before the drain's deadline {deadline}",
        first.ended_at_ms
    );
    poll(Duration::from_secs(15), "the host empty", logs, || {
        let n = node_json(&addrs, &host1);
        async move { n.filter(|n| n["empty"] == true).map(|_| ()) }
    })
    .await;
    assert_eq!(
        state_cell(&addrs, &host1).as_deref(),
        Some("draining,empty")
    );
    // The drained node can now leave the cluster.
    let out = cli(&addrs, &["node", "remove", &host1]);
    assert!(out.status.success(), "{}", explain(&out));
    println!(
        "drain-to-requeued {} ms with a 2 s grace (epoch {epoch1} on {host1} -> epoch {epoch2} on \
         {host2}; first run ended {} ms after the deadline)",
        drain_to_requeued.as_millis(),
        first.ended_at_ms - deadline
    );
}
