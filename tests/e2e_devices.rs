//! Failing accelerators end to end: real `gangway server` replicas, real `gangway worker` processes
//! with fake devices whose faults are injected at run time through each worker's fault file
//! (`--fake-fault-file`), and the example trainer as the task.
//!
//! * A fatal XID on one GPU of a running 2x8 gang: the agent reports the device failed, the
//!   scheduler fences it alone and repairs the gang from its checkpoint under a new lease, and the
//!   host's seven other GPUs still take work. Prints `fault-to-fenced` and `fault-to-running`.
//! * A host that registers again with a GPU missing: accepted, the missing GPU fenced as absent;
//!   the operator's fence, unfence and node removal through the CLI.

mod common;

use common::trainer::*;
use common::worker::WorkerProcess as Worker;
use common::*;
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A checkpointing trainer gang that may restart twice after application failures.
fn restartable_trainer(name: &str, tasks: u32, devices: u32) -> String {
    format!(
        "{}[restart]\nmax_restarts = 2\nbackoff = \"1s\"\n",
        trainer_spec(name, tasks, devices)
    )
}

/// The job running under an epoch above `newer_than`: (epoch, (host, devices) per rank).
async fn wait_running(
    addrs: &[String],
    id: &str,
    newer_than: u64,
    logs: impl Fn() -> String,
) -> (u64, Vec<(String, Vec<u32>)>) {
    let (epoch, d) = running_above(addrs, id, newer_than, logs).await;
    let ranks = d
        .tasks
        .iter()
        .map(|t| (t.host.clone(), t.devices.clone()))
        .collect();
    (epoch, ranks)
}

/// The sum over every replica of one Prometheus sample (`name{labels}` exactly as exported).
fn metric_sum(cluster: &TestCluster, sample: &str) -> f64 {
    use std::io::Read;
    let mut sum = 0.0;
    for r in &cluster.replicas {
        let Ok(mut conn) = std::net::TcpStream::connect(&r.http) else {
            continue;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let request = format!(
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            r.http
        );
        if conn.write_all(request.as_bytes()).is_err() {
            continue;
        }
        let mut text = String::new();
        let _ = conn.read_to_string(&mut text);
        sum += text
            .lines()
            .filter_map(|l| l.strip_prefix(sample))
            .filter_map(|v| v.trim().parse::<f64>().ok())
            .sum::<f64>();
    }
    sum
}

/// Appends one line to a fault file, as an operator's `echo ... >>` would.
fn inject(path: &Path, line: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open the fault file");
    writeln!(f, "{line}").expect("write the fault file");
}

/// A worker in rack r1 whose faults come from `<dir>/faults-<name>`.
fn faulty_worker(cluster: &TestCluster, name: &str) -> (Worker, PathBuf) {
    let faults = cluster.dir.path().join(format!("faults-{name}"));
    let mut w = Worker::new(cluster.dir.path(), name, "r1", cluster.addrs());
    w.args = vec!["--fake-fault-file".to_owned(), faults.display().to_string()];
    w.start();
    (w, faults)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_gpu_is_fenced_and_its_gang_repaired_from_its_checkpoint() {
    // Phase 1: three replicas, three 8-GPU hosts; a checkpointable 2x8 trainer gang on two of
    // them, with a committed checkpoint.
    let mut cluster = TestCluster::start(3);
    cluster.wait_for_leader(None, Duration::from_secs(30)).await;
    let addrs = cluster.addrs();
    let (workers, faults): (Vec<Worker>, Vec<PathBuf>) = ["w1", "w2", "w3"]
        .into_iter()
        .map(|n| faulty_worker(&cluster, n))
        .unzip();
    let logs = || all_logs(&cluster, &workers);
    let id = submit(&addrs[0], &restartable_trainer("repair", 2, 8), "repair")
        .await
        .expect("submit")
        .job_id;
    let (epoch1, ranks1) = wait_running(&addrs, &id, 0, logs).await;
    assert_ne!(ranks1[0].0, ranks1[1].0, "2x8 needs two 8-GPU hosts");
    let rank_log = |r: usize, host: &str| {
        let w = workers.iter().find(|w| w.name == host).unwrap();
        w.task_log(&id, r as u32)
    };
    poll(Duration::from_secs(20), "both ranks stepping", logs, || {
        let ok = (0..2).all(|r| steps(&rank_log(r, &ranks1[r].0)).len() >= 3);
        async move { ok.then_some(()) }
    })
    .await;
    let out = cli(&addrs, &["job", "checkpoint", &id]);
    assert!(out.status.success(), "{}", explain(&out));
    let ck = poll(Duration::from_secs(20), "a checkpoint", logs, || {
        let addrs = addrs.clone();
        let id = id.clone();
        async move {
            let step = job(&addrs, &id).await?.last_checkpoint?.step;
            (step > 0).then_some(step)
        }
    })
    .await;

    // Phase 2: XID 79 (fallen off the bus) on GPU 3 of rank 1's host.
    let victim = ranks1[1].0.clone();
    let healthy_old = ranks1[0].0.clone();
    let w = workers.iter().position(|w| w.name == victim).unwrap();
    let fault_at = Instant::now();
    inject(&faults[w], "xid 3 79");

    // The device is fenced, alone, and `gangway nodes` says why.
    let fenced = poll(Duration::from_secs(15), "GPU 3 fenced", logs, || {
        let n = node_json(&addrs, &victim);
        async move {
            let n = n?;
            (n["fenced_devices"] == 1).then_some(n)
        }
    })
    .await;
    let fault_to_fenced = fault_at.elapsed();
    let conditions = fenced["device_conditions"].as_array().unwrap();
    assert_eq!(conditions.len(), 1, "{fenced}");
    let d = &conditions[0];
    assert_eq!(d["index"], 3, "{fenced}");
    assert_eq!(d["uuid"], format!("GPU-{victim}-3"), "{fenced}");
    assert_eq!(d["health"], "failed", "{fenced}");
    assert_eq!(d["fence_source"], "health", "{fenced}");
    let description = d["description"].as_str().unwrap();
    assert!(
        description.contains("XID 79") && description.starts_with("fenced (health)"),
        "{description}"
    );
    assert_eq!(fenced["state"], "ready", "the host stays in service");
    // Every agent reported its 8 devices healthy at start (24 reports, no log entry: the state
    // said so already); the failure is one change, one command. A retry after a lost answer may
    // add one; a report per event or per heartbeat would add dozens.
    let commands = metric_sum(&cluster, "gangway_commands_total{kind=\"device_health\"}");
    let reports = metric_sum(
        &cluster,
        "gangway_device_health_reports_total{health=\"failed\"}",
    );
    let healthy = metric_sum(
        &cluster,
        "gangway_device_health_reports_total{health=\"healthy\"}",
    );
    assert_eq!(
        healthy, 24.0,
        "each agent's first reading: 8 devices healthy"
    );
    assert!(
        (1.0..=2.0).contains(&commands),
        "{commands} device_health commands ({reports} failed reports)\n{}",
        logs()
    );
    assert!((1.0..=2.0).contains(&reports), "{reports} failed reports");

    // Phase 3: the gang runs again under a new lease, from its checkpoint, never on GPU 3.
    let (epoch2, ranks2) = wait_running(&addrs, &id, epoch1, logs).await;
    let fault_to_running = fault_at.elapsed();
    assert!(epoch2 > epoch1);
    for (host, devices) in &ranks2 {
        assert!(
            !(host == &victim && devices.contains(&3)),
            "a rank was placed on the fenced GPU: {ranks2:?}"
        );
    }
    let hosts2: Vec<&str> = ranks2.iter().map(|(h, _)| h.as_str()).collect();
    assert!(hosts2.contains(&healthy_old.as_str()), "{ranks2:?}");
    assert!(
        !hosts2.contains(&victim.as_str()),
        "7 GPUs left: {ranks2:?}"
    );
    let detail = job(&addrs, &id).await.expect("job");
    let s = detail.summary.as_ref().unwrap();
    assert_eq!((s.repairs, s.restarts), (1, 0), "{detail:?}");
    let first = &detail.runs[0];
    assert_eq!(
        (first.epoch, first.cause.as_str()),
        (epoch1, "infrastructure")
    );
    let last = detail.runs.last().unwrap();
    assert_eq!((last.epoch, last.ended_at_ms), (epoch2, 0));
    assert_eq!(detail.restart.as_ref().map(|r| r.max_restarts), Some(2));
    poll(Duration::from_secs(15), "the ranks resume", logs, || {
        let ok = (0..2).all(|r| resumed(&rank_log(r, &ranks2[r].0)).last() == Some(&ck));
        async move { ok.then_some(()) }
    })
    .await;

    let fault_to_resumed = fault_at.elapsed();
    println!(
        "fault-to-fenced {} ms, fault-to-running {} ms (new lease), fault-to-resumed {} ms (both \
         ranks restored from step {ck}); heartbeat 500 ms, scheduling interval 500 ms",
        fault_to_fenced.as_millis(),
        fault_to_running.as_millis(),
        fault_to_resumed.as_millis()
    );

    // `gangway job status` lists the runs and why each ended.
    let out = cli(&addrs, &["job", "status", &id]);
    assert!(out.status.success(), "{}", explain(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Runs:") && text.contains("infrastructure"),
        "{text}"
    );
    assert!(text.contains("repairs 1"), "{text}");

    // Phase 4: the host's seven healthy GPUs still take work.
    let seven = submit(&addrs[0], &single("seven", 7), "seven")
        .await
        .expect("submit")
        .job_id;
    let (_, ranks) = wait_running(&addrs, &seven, 0, logs).await;
    assert_eq!(ranks[0].0, victim, "{ranks:?}");
    assert_eq!(ranks[0].1.len(), 7);
    assert!(!ranks[0].1.contains(&3), "{ranks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_back_with_a_gpu_missing_has_it_fenced_and_operators_fence_and_remove() {
    // Phase 1: one 8-GPU host registers; it comes back with 7 (GPU 7 gone from the bus).
    let mut cluster = TestCluster::start(3);
    cluster.wait_for_leader(None, Duration::from_secs(30)).await;
    let addrs = cluster.addrs();
    let mut workers = vec![Worker::new(cluster.dir.path(), "w1", "r1", addrs.clone())];
    workers[0].start();
    poll(
        Duration::from_secs(20),
        "w1 registered",
        || cluster.logs(),
        || {
            let n = node_json(&addrs, "w1");
            async move { n.filter(|n| n["devices"] == 8).map(|_| ()) }
        },
    )
    .await;
    workers[0].crash();
    workers[0].devices = "7xH100";
    workers[0].start();
    let logs = || all_logs(&cluster, &workers);
    let n = poll(
        Duration::from_secs(20),
        "GPU 7 fenced as absent",
        logs,
        || {
            let n = node_json(&addrs, "w1");
            async move { n.filter(|n| n["fenced_devices"] == 1) }
        },
    )
    .await;
    assert_eq!(n["state"], "ready", "{n}");
    let d = &n["device_conditions"][0];
    assert_eq!(
        (&d["index"], &d["fence_source"], &d["present"]),
        (&Value::from(7), &Value::from("absent"), &Value::from(false)),
        "{n}"
    );
    assert_eq!(d["uuid"], "GPU-w1-7", "{n}");

    // A gang of 8 waits, saying a device is fenced; one of 7 runs.
    let eight = submit(&addrs[0], &single("eight", 8), "eight")
        .await
        .expect("submit")
        .job_id;
    let reason = poll(Duration::from_secs(10), "eight waits", logs, || {
        let addrs = addrs.clone();
        let eight = eight.clone();
        async move {
            let r = job(&addrs, &eight).await?.summary?.pending_reason;
            (!r.is_empty() && r != "waiting for the next scheduling round").then_some(r)
        }
    })
    .await;
    assert!(reason.contains("fenced"), "{reason}");
    let seven = submit(&addrs[0], &single("seven", 7), "seven")
        .await
        .expect("submit")
        .job_id;
    let (_, ranks) = wait_running(&addrs, &seven, 0, logs).await;
    assert!(!ranks[0].1.contains(&7), "{ranks:?}");

    // Phase 2: the operator fences and unfences a device by index; unknown devices are named.
    let out = cli(
        &addrs,
        &["device", "fence", "w1", "0", "--reason", "burn-in"],
    );
    assert!(out.status.success(), "{}", explain(&out));
    let n = node_json(&addrs, "w1").expect("nodes");
    assert_eq!(n["fenced_devices"], 2, "{n}");
    let d0 = &n["device_conditions"][0];
    assert_eq!(
        (&d0["index"], &d0["fence_source"]),
        (&Value::from(0), &Value::from("operator"))
    );
    assert!(
        d0["description"].as_str().unwrap().contains("burn-in"),
        "{n}"
    );
    let out = cli(
        &addrs,
        &["device", "unfence", "w1", "GPU-w1-0", "--reason", "done"],
    );
    assert!(out.status.success(), "{}", explain(&out));
    assert_eq!(node_json(&addrs, "w1").unwrap()["fenced_devices"], 1);
    let out = cli(&addrs, &["device", "fence", "w1", "99", "--reason", "x"]);
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[unknown_device]") && err.contains("99"),
        "{err}"
    );

    // Phase 3: a node that holds work, or is ready, is not removed; a cordoned empty one is.
    let out = cli(&addrs, &["node", "remove", "w1", "--reason", "retire"]);
    assert!(!out.status.success(), "{}", explain(&out));
    cli(&addrs, &["cancel", &seven]);
    cli(&addrs, &["cancel", &eight]);
    workers[0].crash();
    let out = cli(&addrs, &["node", "cordon", "w1"]);
    assert!(out.status.success(), "{}", explain(&out));
    poll(
        Duration::from_secs(10),
        "w1 removed",
        || cluster.logs(),
        || {
            let out = cli(&addrs, &["node", "remove", "w1", "--reason", "retire"]);
            let gone = out.status.success()
                && nodes_json(&addrs)
                    .is_some_and(|v| v["nodes"].as_array().is_some_and(Vec::is_empty));
            async move { gone.then_some(()) }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_health_check_fences_its_device_and_passes_return_it() {
    // The check prints what `check.out` holds and exits with `check.rc`: it fails GPU 2 before the
    // host first registers.
    let mut cluster = TestCluster::start(3);
    cluster.wait_for_leader(None, Duration::from_secs(30)).await;
    let addrs = cluster.addrs();
    let dir = cluster.dir.path().to_owned();
    let (out, rc) = (dir.join("check.out"), dir.join("check.rc"));
    std::fs::write(&out, "fail 2\n").unwrap();
    std::fs::write(&rc, "1\n").unwrap();
    let mut w = Worker::new(&dir, "w1", "r1", addrs.clone());
    w.args = vec![
        "--health-check-cmd".to_owned(),
        format!("cat {}; exit $(cat {})", out.display(), rc.display()),
        "--health-check-interval".to_owned(),
        "1s".to_owned(),
    ];
    w.start();
    let workers = vec![w];
    let logs = || all_logs(&cluster, &workers);
    let n = poll(
        Duration::from_secs(20),
        "GPU 2 fenced by the check",
        logs,
        || {
            let n = node_json(&addrs, "w1");
            async move { n.filter(|n| n["fenced_devices"] == 1) }
        },
    )
    .await;
    let d = &n["device_conditions"][0];
    assert_eq!(
        (&d["index"], &d["fence_source"]),
        (&Value::from(2), &Value::from("health"))
    );
    let description = d["description"].as_str().unwrap();
    assert!(
        description.contains("health check failed") && description.contains("fail 2"),
        "{description}"
    );

    // The check passes again: after passes in a row the device serves again.
    std::fs::write(&out, "").unwrap();
    std::fs::write(&rc, "0\n").unwrap();
    let passed_at = Instant::now();
    poll(
        Duration::from_secs(20),
        "GPU 2 back in service",
        logs,
        || {
            let n = node_json(&addrs, "w1");
            async move { n.filter(|n| n["fenced_devices"] == 0).map(|_| ()) }
        },
    )
    .await;
    assert!(
        passed_at.elapsed() >= Duration::from_secs(2),
        "one pass is not enough: {:?}",
        passed_at.elapsed()
    );
}
