//! The worker agent end to end: real `gangway server` replicas, real `gangway worker` processes with
//! fake devices, and the example trainer (deploy/examples/trainer.py) as the task. Each test tells
//! one story from DESIGN.md sections 7 and 8, and reads the trainer's own output to check that work
//! is never lost beyond the last checkpoint.

mod common;

use common::trainer::*;
use common::*;
use gangway_proto::pb;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::worker::WorkerProcess as Worker;

#[path = "e2e_worker/trust.rs"]
mod trust;

/// Polls a condition on local files until it holds.
async fn wait_until(
    timeout: Duration,
    what: &str,
    logs: impl Fn() -> String,
    mut check: impl FnMut() -> bool,
) {
    poll(timeout, what, logs, || {
        let ok = check();
        async move { ok.then_some(()) }
    })
    .await
}

/// The step of the job's last committed checkpoint, once there is one.
async fn checkpoint_step(addrs: &[String], id: &str, above: u64, logs: impl Fn() -> String) -> u64 {
    poll(Duration::from_secs(20), "a checkpoint", logs, || {
        let addrs = addrs.to_vec();
        let id = id.to_owned();
        async move {
            let step = job(&addrs, &id).await?.last_checkpoint?.step;
            (step > above).then_some(step)
        }
    })
    .await
}

fn state_of(d: &pb::JobDetail) -> (&str, u64, Vec<String>) {
    let s = d.summary.as_ref().expect("summary");
    (
        s.state().word(),
        s.lease_epoch,
        d.tasks.iter().map(|t| t.host.clone()).collect(),
    )
}

/// Waits up to `within` until job `id` has succeeded; `logs` on timeout.
async fn wait_succeeded(addrs: &[String], id: &str, within: Duration, logs: impl Fn() -> String) {
    poll(within, "the job's success", logs, || {
        let (addrs, id) = (addrs.to_vec(), id.to_owned());
        async move {
            let d = job(&addrs, &id).await?;
            (state_of(&d).0 == "succeeded").then_some(())
        }
    })
    .await;
}

fn four_workers(cluster: &TestCluster) -> Vec<Worker> {
    [("w1", "r1"), ("w2", "r1"), ("w3", "r2"), ("w4", "r2")]
        .into_iter()
        .map(|(n, r)| {
            let mut w = Worker::new(cluster.dir.path(), n, r, cluster.addrs());
            w.start();
            w
        })
        .collect()
}

/// Three replicas and one 8-GPU host `name` in rack r1, started once `setup` has adjusted it.
async fn host(name: &str, setup: impl FnOnce(&mut Worker)) -> (TestCluster, Vec<String>, Worker) {
    let mut cluster = TestCluster::start(3);
    cluster.wait_for_leader(None, Duration::from_secs(30)).await;
    let addrs = cluster.addrs();
    let mut w = Worker::new(cluster.dir.path(), name, "r1", addrs.clone());
    setup(&mut w);
    w.start();
    (cluster, addrs, w)
}

/// Three replicas and one 8-GPU host, "solo", running.
async fn one_host() -> (TestCluster, Vec<String>, Vec<Worker>) {
    let (cluster, addrs, w) = host("solo", |_| {}).await;
    (cluster, addrs, vec![w])
}

/// A one-device job running `script` under `sh -c`, with `extra` lines after its resources.
fn sh_job(name: &str, script: &str, extra: &str) -> String {
    format!(
        "name = \"{name}\"\ncommand = [\"sh\", \"-c\", '''{script}''']\n[resources]\ndevices = 1\n{extra}"
    )
}

fn worker<'w>(workers: &'w [Worker], name: &str) -> &'w Worker {
    workers
        .iter()
        .find(|w| w.name == name)
        .expect("known worker")
}

async fn wait_running(
    addrs: &[String],
    id: &str,
    newer_than: u64,
    logs: impl Fn() -> String,
) -> (u64, Vec<String>) {
    let (epoch, d) = running_above(addrs, id, newer_than, logs).await;
    (epoch, state_of(&d).2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gang_runs_checkpoints_and_migrates_without_losing_work() {
    // Phase 1: three replicas and four 8-GPU hosts in two racks; a 2x8 trainer gang.
    let mut cluster = TestCluster::start(3);
    cluster.wait_for_leader(None, Duration::from_secs(30)).await;
    let addrs = cluster.addrs();
    let workers = four_workers(&cluster);
    let logs = || all_logs(&cluster, &workers);
    let id = submit(&addrs[0], &trainer_spec("train", 2, 8), "train")
        .await
        .expect("submit")
        .job_id;
    let (epoch1, hosts1) = wait_running(&addrs, &id, 0, logs).await;
    assert_eq!(hosts1.len(), 2);
    assert_ne!(hosts1[0], hosts1[1], "2x8 needs two 8-GPU hosts");

    // Phase 2: each rank sees its rank, the world size and its own eight devices.
    wait_until(Duration::from_secs(20), "both ranks stepping", logs, || {
        (0..2).all(|r| steps(&worker(&workers, &hosts1[r as usize]).task_log(&id, r)).len() >= 5)
    })
    .await;
    for rank in 0..2u32 {
        let log = worker(&workers, &hosts1[rank as usize]).task_log(&id, rank);
        assert!(
            log.contains(&format!("[trainer rank={rank}/2] start")),
            "{log}"
        );
        let devices = log
            .split("devices=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or("");
        assert_eq!(devices.split(',').count(), 8, "{log}");
        assert!(devices.starts_with("GPU-"), "UUIDs, not indices: {log}");
        assert_eq!(resumed(&log), vec![0], "a fresh job starts at 0");
    }

    // Phase 3: an on-demand checkpoint is written by rank 0 and committed.
    let out = cli(&addrs, &["job", "checkpoint", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first_ck = checkpoint_step(&addrs, &id, 0, logs).await;

    // Phase 4: migrate. The gang checkpoints again, stops, and restarts on the other two hosts
    // from exactly the checkpointed step: never from zero, never from before the request.
    let before = steps(&worker(&workers, &hosts1[0]).task_log(&id, 0))
        .last()
        .copied()
        .unwrap_or(0);
    let out = cli(&addrs, &["job", "migrate", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (epoch2, hosts2) = wait_running(&addrs, &id, epoch1, logs).await;
    assert!(
        hosts2.iter().all(|h| !hosts1.contains(h)),
        "migrated from {hosts1:?} onto {hosts2:?}"
    );
    let detail = job(&addrs, &id).await.expect("job");
    let ck = detail.last_checkpoint.expect("checkpoint").step;
    assert!(
        ck >= before && ck > first_ck,
        "checkpoint {ck}, before {before}, first {first_ck}"
    );
    wait_until(
        Duration::from_secs(20),
        "the migrated ranks resume",
        logs,
        || {
            (0..2).all(|r| {
                !resumed(&worker(&workers, &hosts2[r as usize]).task_log(&id, r)).is_empty()
            })
        },
    )
    .await;
    for rank in 0..2u32 {
        let log = worker(&workers, &hosts2[rank as usize]).task_log(&id, rank);
        assert_eq!(resumed(&log), vec![ck], "rank {rank} resumed from {log}");
        assert!(log.contains(&format!("epoch={epoch2}")), "{log}");
    }
    // The old ranks were stopped by their agents (the trainer prints its last step on SIGTERM).
    wait_until(Duration::from_secs(10), "the old ranks stop", logs, || {
        (0..2).all(|r| {
            worker(&workers, &hosts1[r as usize])
                .task_log(&id, r)
                .contains("stopping at step")
        })
    })
    .await;

    // Phase 5: `gangway logs` reads a rank's output from its host's agent.
    let out = cli(&addrs, &["logs", &id, "--task", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[trainer rank=1/2]"), "{text}");
    assert!(text.contains(&format!("resumed_step={ck}")), "{text}");
    let out = cli(&addrs, &["logs", &id, "--task", "7"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "a task the job lacks is a usage error"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_worker_gang_restarts_elsewhere_from_its_checkpoint() {
    // Phase 1: a 2x8 trainer gang on two of four hosts, with a committed checkpoint.
    let mut cluster = TestCluster::start(3);
    cluster.wait_for_leader(None, Duration::from_secs(30)).await;
    let addrs = cluster.addrs();
    let mut workers = four_workers(&cluster);
    let id = submit(&addrs[0], &trainer_spec("lost", 2, 8), "lost")
        .await
        .expect("submit")
        .job_id;
    let (epoch1, hosts1) = wait_running(&addrs, &id, 0, || all_logs(&cluster, &workers)).await;
    wait_until(
        Duration::from_secs(20),
        "rank 0 stepping",
        || all_logs(&cluster, &workers),
        || steps(&worker(&workers, &hosts1[0]).task_log(&id, 0)).len() >= 5,
    )
    .await;
    let out = cli(&addrs, &["job", "checkpoint", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ck = checkpoint_step(&addrs, &id, 0, || all_logs(&cluster, &workers)).await;

    // Phase 2: the agent of rank 1's host dies (kill -9). Its task keeps running only until the
    // lease deadline, which its shim enforces with no agent alive.
    let lost = hosts1[1].clone();
    let killed_at = Instant::now();
    workers
        .iter_mut()
        .find(|w| w.name == lost)
        .unwrap()
        .kill_agent();
    wait_until(
        Duration::from_secs(10),
        "the orphaned rank stops itself",
        || all_logs(&cluster, &workers),
        || {
            worker(&workers, &lost)
                .task_log(&id, 1)
                .contains("stopping at step")
        },
    )
    .await;
    let stopped_after = killed_at.elapsed();
    // The worker lease is node_ttl (3 s) minus a margin; the node is declared down at 3 s.
    assert!(
        stopped_after < Duration::from_secs(3),
        "stopped after {stopped_after:?}"
    );

    // Phase 3: after the TTL the gang is re-leased, never on the lost host, from the checkpoint.
    let (_epoch2, hosts2) =
        wait_running(&addrs, &id, epoch1, || all_logs(&cluster, &workers)).await;
    assert!(
        !hosts2.contains(&lost),
        "re-placed on the lost host: {hosts2:?}"
    );
    wait_until(
        Duration::from_secs(20),
        "the new ranks resume",
        || all_logs(&cluster, &workers),
        || {
            (0..2).all(|r| {
                resumed(&worker(&workers, &hosts2[r as usize]).task_log(&id, r)).len()
                    >= if hosts2[r as usize] == hosts1[r as usize] {
                        2
                    } else {
                        1
                    }
            })
        },
    )
    .await;
    for rank in 0..2u32 {
        let log = worker(&workers, &hosts2[rank as usize]).task_log(&id, rank);
        assert_eq!(resumed(&log).last(), Some(&ck), "rank {rank}: {log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_readopts_its_running_task() {
    // Phase 1: one trainer on one host. A short grace leaves the agent most of the lease
    // (2.25 s) to come back before the task's shim would fence it.
    let (cluster, addrs, mut w) = host("solo", |w| w.grace = "200ms").await;
    let id = submit(&addrs[0], &trainer_spec("solo", 1, 4), "solo")
        .await
        .expect("submit")
        .job_id;
    let (epoch, _) = wait_running(&addrs, &id, 0, || cluster.logs()).await;
    wait_until(
        Duration::from_secs(20),
        "stepping",
        || cluster.logs(),
        || steps(&w.task_log(&id, 0)).len() >= 3,
    )
    .await;

    // Phase 2: the agent dies and comes back within the TTL; the task was never interrupted.
    w.kill_agent();
    w.start();
    let at_restart = steps(&w.task_log(&id, 0)).len();
    wait_until(
        Duration::from_secs(20),
        "the re-adoption",
        || w.agent_log(),
        || w.agent_log().contains("re-adopted a running task"),
    )
    .await;
    wait_until(
        Duration::from_secs(20),
        "more steps",
        || w.agent_log(),
        || steps(&w.task_log(&id, 0)).len() >= at_restart + 20,
    )
    .await;
    let log = w.task_log(&id, 0);
    assert_eq!(resumed(&log).len(), 1, "the task was started once: {log}");
    let s = steps(&log);
    assert!(
        s.windows(2).all(|p| p[1] == p[0] + 1),
        "steps continuous: {s:?}"
    );
    let d = job(&addrs, &id).await.expect("job");
    assert_eq!(state_of(&d).0, "running");
    assert_eq!(
        state_of(&d).1,
        epoch,
        "the same lease: nothing was re-placed"
    );

    // Phase 3: the re-adopted task is under the new agent's control: a cancel stops it.
    let out = cli(&addrs, &["cancel", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(
        Duration::from_secs(10),
        "the cancelled task stops",
        || w.agent_log(),
        || w.task_log(&id, 0).contains("stopping at step"),
    )
    .await;
}

/// The agent records no task end of its own as it happens (the shim's exit file, written without
/// an fsync, is the record): an agent that was down when its task ended learns the end from that
/// file when it comes back, and the job completes without its task being started again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_ends_while_its_agent_is_down_is_reported_when_it_returns() {
    let (cluster, addrs, mut w) = host("solo", |w| w.grace = "200ms").await;
    let spec = sh_job("brief", "echo started; sleep 0.5; echo done", "");
    let id = submit(&addrs[0], &spec, "brief")
        .await
        .expect("submit")
        .job_id;
    let (epoch, _) = wait_running(&addrs, &id, 0, || cluster.logs()).await;
    wait_until(
        Duration::from_secs(20),
        "the task's start",
        || w.agent_log(),
        // The task's own line: the agent's header before it ("=== gangway: epoch 1 started at")
        // is written before the shim exists, and an agent killed then takes the launch with it.
        || w.task_log(&id, 0).lines().any(|l| l == "started"),
    )
    .await;

    // The agent dies while the task runs; the task ends without it, its shim writing the exit
    // file and exiting.
    w.kill_agent();
    let exit_file = w.exit_file(&id, 0, epoch);
    wait_until(
        Duration::from_secs(5),
        "the shim's exit file",
        || w.task_log(&id, 0),
        || exit_file.exists(),
    )
    .await;

    // Back within the node's TTL: the end comes from the exit file, the job succeeds.
    w.start();
    wait_succeeded(&addrs, &id, Duration::from_secs(20), || w.agent_log()).await;
    assert!(
        w.agent_log()
            .contains("task ended while the agent was away"),
        "{}",
        w.agent_log()
    );
    let log = w.task_log(&id, 0);
    let starts = log.lines().filter(|l| *l == "started").count();
    assert_eq!(starts, 1, "the task ran once: {log}");
}

/// Checkpoint storage is shared by every host and nothing sweeps it: a job whose spec has no
/// `[checkpoint]` section is never asked to checkpoint, so its task gets no directory there, nor
/// the variable that would name one; a job that can checkpoint gets both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_job_that_can_checkpoint_gets_a_directory_on_the_checkpoint_storage() {
    let (cluster, addrs, w) = host("solo", |_| {}).await;
    let script = r#"echo "ckdir=${GANGWAY_CHECKPOINT_DIR-unset}""#;
    let mut ids = Vec::new();
    for (name, extra) in [("plain", ""), ("ready", "[checkpoint]\n")] {
        let spec = sh_job(name, script, extra);
        ids.push(submit(&addrs[0], &spec, name).await.expect("submit").job_id);
    }
    for id in &ids {
        let logs = || format!("{}\n--- worker ---\n{}", cluster.logs(), w.agent_log());
        wait_succeeded(&addrs, id, Duration::from_secs(20), logs).await;
    }
    let (plain, ready) = (&ids[0], &ids[1]);
    let log = w.task_log(plain, 0);
    assert!(log.contains("ckdir=unset"), "{log}");
    assert!(
        !w.checkpoints.join(plain).exists(),
        "no directory for a job that cannot checkpoint"
    );
    let dir = w.checkpoints.join(ready);
    let log = w.task_log(ready, 0);
    assert!(log.contains(&format!("ckdir={}", dir.display())), "{log}");
    assert!(dir.is_dir(), "{} was not made", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_every_replica_stops_its_tasks_by_its_lease_deadline() {
    // Phase 1: a trainer runs on one host.
    let mut cluster = TestCluster::start(3);
    cluster.wait_for_leader(None, Duration::from_secs(30)).await;
    let addrs = cluster.addrs();
    let mut w = Worker::new(cluster.dir.path(), "island", "r1", addrs.clone());
    w.start();
    let id = submit(&addrs[0], &trainer_spec("island", 1, 8), "island")
        .await
        .expect("submit")
        .job_id;
    wait_running(&addrs, &id, 0, || cluster.logs()).await;
    wait_until(
        Duration::from_secs(20),
        "stepping",
        || cluster.logs(),
        || steps(&w.task_log(&id, 0)).len() >= 3,
    )
    .await;

    // Phase 2: every replica freezes (SIGSTOP): the worker hears from no one. Its lease is the
    // node TTL (3 s) minus max(heartbeat, TTL/4) = 2.25 s from its last answered heartbeat.
    let pids: Vec<u32> = (1..=3).filter_map(|id| cluster.replica(id).pid()).collect();
    for p in &pids {
        Command::new("kill")
            .arg("-STOP")
            .arg(p.to_string())
            .status()
            .unwrap();
    }
    let frozen = Instant::now();
    let mut stopped = None;
    while frozen.elapsed() < Duration::from_secs(6) {
        if w.task_log(&id, 0).contains("stopping at step") {
            stopped = Some(frozen.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for p in &pids {
        Command::new("kill")
            .arg("-CONT")
            .arg(p.to_string())
            .status()
            .unwrap();
    }
    let stopped = stopped.unwrap_or_else(|| panic!("the task kept running\n{}", w.agent_log()));
    // By the deadline (2.25 s after the last reply, which came before the freeze), not long before.
    assert!(
        stopped <= Duration::from_millis(2_600),
        "stopped after {stopped:?}"
    );
    assert!(
        stopped >= Duration::from_millis(1_000),
        "stopped early, after {stopped:?}"
    );
    let log = w.task_log(&id, 0);
    let _ = cluster.wait_for_leader(None, Duration::from_secs(30)).await;
    assert!(!log.is_empty());
}

// ---------------------------------------------------------------------------------------------
// A deposed leader, played by the test: it sends the worker a stale directive.
// ---------------------------------------------------------------------------------------------

mod deposed {
    use gangway_proto::pb;
    use gangway_proto::pb::worker_api_server::{WorkerApi, WorkerApiServer};
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use tokio::sync::mpsc;
    use tonic::{Request, Response, Status};

    /// A scheduler that answers every call and streams whatever sets the test pushes.
    pub struct Scripted {
        pub sets: Mutex<Option<mpsc::Receiver<pb::AllocationSet>>>,
        pub reports: Arc<Mutex<Vec<pb::TaskStatusReport>>>,
    }

    #[tonic::async_trait]
    impl WorkerApi for Scripted {
        async fn register(
            &self,
            _: Request<pb::RegisterRequest>,
        ) -> Result<Response<pb::RegisterReply>, Status> {
            Ok(Response::new(pb::RegisterReply {
                heartbeat_interval_ms: 200,
                lease_ttl_ms: 60_000,
            }))
        }
        async fn heartbeat(
            &self,
            _: Request<pb::HeartbeatRequest>,
        ) -> Result<Response<pb::HeartbeatReply>, Status> {
            // No allocation digest, as from a replica that predates it: the agent renews.
            Ok(Response::new(pb::HeartbeatReply {
                heartbeat_interval_ms: 200,
                lease_ttl_ms: 60_000,
                allocation_digest: Vec::new(),
                allocation_revision: 0,
            }))
        }
        type WatchAllocationsStream =
            Pin<Box<dyn futures::Stream<Item = Result<pb::AllocationSet, Status>> + Send>>;
        async fn watch_allocations(
            &self,
            _: Request<pb::WatchAllocationsRequest>,
        ) -> Result<Response<Self::WatchAllocationsStream>, Status> {
            let rx = self
                .sets
                .lock()
                .unwrap()
                .take()
                .ok_or_else(|| Status::unavailable("one stream per test"))?;
            let s = futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok);
            Ok(Response::new(Box::pin(s)))
        }
        async fn report_task_status(
            &self,
            r: Request<pb::TaskStatusReport>,
        ) -> Result<Response<pb::Empty>, Status> {
            self.reports.lock().unwrap().push(r.into_inner());
            Ok(Response::new(pb::Empty {}))
        }
        /// A replica from before batched reports: the agent falls back to one at a time.
        async fn report_task_statuses(
            &self,
            _: Request<pb::TaskStatusReports>,
        ) -> Result<Response<pb::TaskStatusOutcomes>, Status> {
            Err(Status::unimplemented("ReportTaskStatuses"))
        }
        async fn report_checkpoint(
            &self,
            _: Request<pb::CheckpointReport>,
        ) -> Result<Response<pb::Empty>, Status> {
            Ok(Response::new(pb::Empty {}))
        }
        async fn report_device_health(
            &self,
            _: Request<pb::DeviceHealthReport>,
        ) -> Result<Response<pb::Empty>, Status> {
            Ok(Response::new(pb::Empty {}))
        }
        async fn report_health_check(
            &self,
            _: Request<pb::HealthCheckReport>,
        ) -> Result<Response<pb::Empty>, Status> {
            Ok(Response::new(pb::Empty {}))
        }
    }

    pub fn server(s: Scripted) -> WorkerApiServer<Scripted> {
        WorkerApiServer::new(s)
    }
}

fn marker_task(job: &str, epoch: u64, device: u32, marker: &Path) -> pb::Allocation {
    pb::Allocation {
        job_id: job.into(),
        task: 0,
        task_count: 1,
        epoch,
        devices: vec![pb::AllocatedDevice {
            index: device,
            uuid: format!("GPU-fenced-{device}"),
            milli: 1000,
        }],
        command: vec![
            "sh".into(),
            "-c".into(),
            format!(
                "echo started >> {m}; grep THP_enabled /proc/self/status > {m}.thp; exec sleep 600",
                m = marker.display()
            ),
        ],
        ..Default::default()
    }
}

// The guard only keeps this test's processes from overlapping another test's cluster; holding it
// across awaits is the point.
#[allow(clippy::await_holding_lock)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_directive_is_refused_and_says_so() {
    let _serial = TestCluster::serial();
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let reports = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let port = free_ports(1)[0];
    let server = deposed::server(deposed::Scripted {
        sets: std::sync::Mutex::new(Some(rx)),
        reports: reports.clone(),
    });
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server)
            .serve(addr),
    );
    let mut w = Worker::new(dir.path(), "fenced", "r1", vec![addr.to_string()]);
    // The scripted scheduler serves plain TCP.
    w.tls = false;
    w.start();
    let current = dir.path().join("current.marker");
    let stale = dir.path().join("stale.marker");

    // Phase 1: the current leader leases device 0 to job "current" under epoch 7 (revision 10).
    tx.send(pb::AllocationSet {
        revision: 10,
        allocations: vec![marker_task("current", 7, 0, &current)],
        device_epochs: vec![7],
    })
    .await
    .unwrap();
    wait_until(
        Duration::from_secs(20),
        "the current task starts",
        || w.agent_log(),
        || current.exists(),
    )
    .await;
    // The agent runs without transparent huge pages; its task has the flag this test's process
    // (the agent's parent) has: on, unless whoever runs the tests turned them off.
    let thp_file = dir.path().join("current.marker.thp");
    wait_until(
        Duration::from_secs(10),
        "the task's THP line",
        || w.agent_log(),
        || std::fs::read_to_string(&thp_file).is_ok_and(|s| s.ends_with('\n')),
    )
    .await;
    let own = thp_enabled("self").expect("this kernel shows THP_enabled");
    assert_eq!(
        thp_enabled(&w.pid().expect("agent").to_string()),
        Some(0),
        "the agent's"
    );
    assert_eq!(
        thp_value(&std::fs::read_to_string(&thp_file).unwrap()),
        Some(own),
        "the task's, as the agent's parent's"
    );

    // Phase 2: a directive for the same device under the older epoch 3 is refused, and logged.
    tx.send(pb::AllocationSet {
        revision: 11,
        allocations: vec![
            marker_task("current", 7, 0, &current),
            marker_task("stale", 3, 0, &stale),
        ],
        device_epochs: vec![7],
    })
    .await
    .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the refusal in the agent's log",
        || w.agent_log(),
        || w.agent_log().contains("refusing a stale directive"),
    )
    .await;
    assert!(
        w.agent_log().contains("older than epoch 7"),
        "{}",
        w.agent_log()
    );

    // Phase 3: an older set (revision 9, a deposed leader's view without "current") stops nothing.
    tx.send(pb::AllocationSet {
        revision: 9,
        allocations: vec![],
        device_epochs: vec![7],
    })
    .await
    .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the old revision refused",
        || w.agent_log(),
        || w.agent_log().contains("revision 9"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!stale.exists(), "the stale task must never start");
    assert_eq!(
        std::fs::read_to_string(&current).unwrap().lines().count(),
        1,
        "the current task runs once and is not stopped"
    );
    assert!(
        !w.task_log("current", 0).is_empty() || current.exists(),
        "current task ran"
    );
    let reports = reports.lock().unwrap().clone();
    assert!(
        reports
            .iter()
            .all(|r| r.job_id == "current" && r.state() == pb::TaskState::Running),
        "{reports:?}"
    );
}

/// Live defragmentation: a 2x8 gang waits although 16 GPUs are free, because two 1-GPU trainers
/// sit on the two hosts it could use. The leader's defragmenter migrates exactly those two
/// (checkpoint, stop, relaunch on the third host, resumed from the checkpoint) and the gang runs on
/// the hosts they left; no third job could take them meanwhile (they were reserved).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_defragmenter_migrates_small_gangs_to_place_a_blocked_one() {
    // Phase 1: three 8-GPU hosts in one rack; two 1-GPU trainers and a 6-GPU one of higher
    // priority (so it may not move), spread one per host with `job migrate --to`.
    let mut cluster = TestCluster::start(3);
    cluster.wait_for_leader(None, Duration::from_secs(30)).await;
    let addrs = cluster.addrs();
    let workers: Vec<Worker> = ["w1", "w2", "w3"]
        .into_iter()
        .map(|n| {
            let mut w = Worker::new(cluster.dir.path(), n, "r1", addrs.clone());
            w.start();
            w
        })
        .collect();
    let logs = || all_logs(&cluster, &workers);
    let mut ids = Vec::new();
    for (name, devices, host) in [("a", 1, "w1"), ("b", 1, "w2"), ("c", 6, "w3")] {
        let mut spec = trainer_spec(name, 1, devices);
        if name == "c" {
            spec = spec.replace("tasks = 1", "tasks = 1\npriority = 10");
        }
        let id = submit(&addrs[0], &spec, name).await.expect("submit").job_id;
        let (epoch, hosts) = wait_running(&addrs, &id, 0, logs).await;
        if hosts[0] != host {
            wait_until(Duration::from_secs(20), "a step", logs, || {
                !steps(&worker(&workers, &hosts[0]).task_log(&id, 0)).is_empty()
            })
            .await;
            let out = cli(&addrs, &["job", "migrate", &id, "--to", host]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let (_, now_on) = wait_running(&addrs, &id, epoch, logs).await;
            assert_eq!(now_on, [host]);
        }
        ids.push(id);
    }
    // Past the 1 s min-runtime, so a and b may move.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let epochs: Vec<u64> = {
        let mut e = Vec::new();
        for id in &ids {
            e.push(state_of(&job(&addrs, id).await.unwrap()).1);
        }
        e
    };

    // Phase 2: the gang is submitted; it can only run once a and b have moved.
    let gang = submit(&addrs[0], &trainer_spec("gang", 2, 8), "gang")
        .await
        .expect("submit")
        .job_id;
    let (_, gang_hosts) = wait_running(&addrs, &gang, 0, logs).await;
    let mut sorted = gang_hosts.clone();
    sorted.sort();
    assert_eq!(sorted, ["w1", "w2"], "the gang runs on the freed hosts");

    // Phase 3: a and b were migrated onto w3 and resumed exactly from their checkpoints; c (higher
    // priority) never moved.
    for (k, id) in ids.iter().enumerate().take(2) {
        let d = job(&addrs, id).await.unwrap();
        let (state, epoch, hosts) = state_of(&d);
        assert_eq!(
            (state, hosts.as_slice()),
            ("running", ["w3".to_owned()].as_slice()),
            "{id}"
        );
        assert!(epoch > epochs[k], "{id} got a new lease");
        let ck = d.last_checkpoint.expect("checkpointed before moving").step;
        assert!(
            d.history.iter().any(|h| h.what.contains("defragmentation")),
            "{id}: {:?}",
            d.history
        );
        wait_until(
            Duration::from_secs(20),
            "the moved job resumes",
            logs,
            || resumed(&worker(&workers, "w3").task_log(id, 0)).contains(&ck),
        )
        .await;
    }
    let c = job(&addrs, &ids[2]).await.unwrap();
    assert_eq!(state_of(&c).1, epochs[2], "c was never moved");
    let g = job(&addrs, &gang).await.unwrap();
    assert!(
        g.history.iter().any(|h| h.what.contains("defragmentation")),
        "{:?}",
        g.history
    );

    // Phase 4: nothing is left blocked; the preview says so.
    let out = cli(&addrs, &["defrag", "plan", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["blocked_by_shape"], 0, "{v}");
    // The status: on, the block was used (no reservation left), nothing migrating any more.
    let out = cli(&addrs, &["defrag", "status", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["enabled"], true, "{v}");
    assert_eq!(v["reservations"], serde_json::json!([]), "{v}");
    assert_eq!(v["migrating"], serde_json::json!([]), "{v}");
    assert!(v["fragmentation_pct"]["rack"].is_number(), "{v}");
}

/// Priority preemption of a checkpointable trainer is checkpoint-then-stop: the low-priority gang
/// writes a checkpoint before it stops (its work survives), and the high-priority gang gets its
/// devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preempted_trainer_checkpoints_before_it_stops() {
    let (cluster, addrs, workers) = one_host().await;
    let logs = || all_logs(&cluster, &workers);

    // Phase 1: a low-priority trainer holds all 8 GPUs, past its 1 s min-runtime.
    let low = submit(&addrs[0], &trainer_spec("low", 1, 8), "low")
        .await
        .expect("submit")
        .job_id;
    wait_running(&addrs, &low, 0, logs).await;
    wait_until(Duration::from_secs(20), "steps", logs, || {
        steps(&workers[0].task_log(&low, 0)).len() >= 25
    })
    .await;

    // Phase 2: a high-priority trainer arrives and needs them all.
    let spec = trainer_spec("high", 1, 8).replace("tasks = 1", "tasks = 1\npriority = 10");
    let high = submit(&addrs[0], &spec, "high")
        .await
        .expect("submit")
        .job_id;
    wait_running(&addrs, &high, 0, logs).await;

    // Phase 3: the victim checkpointed first, stopped after, and waits to run again.
    let d = job(&addrs, &low).await.unwrap();
    assert_eq!(state_of(&d).0, "pending");
    let ck = d
        .last_checkpoint
        .expect("checkpointed before stopping")
        .step;
    assert!(ck >= 25, "checkpoint at {ck}");
    assert!(
        d.history
            .iter()
            .any(|h| h.what.contains("checkpointing, then stopping")),
        "{:?}",
        d.history
    );
    assert_eq!(d.summary.as_ref().unwrap().preemptions, 1);
    // The state calls the preemptor running once its lease is granted; the victim's process may
    // still be finishing its last step then (the agent launches the preemptor after it exits).
    wait_until(Duration::from_secs(20), "the victim stops", logs, || {
        workers[0].task_log(&low, 0).contains("stopping at step ")
    })
    .await;
    let log = workers[0].task_log(&low, 0);
    let stopped_at: u64 = log
        .lines()
        .find_map(|l| l.split("stopping at step ").nth(1))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("the victim never stopped:\n{log}"));
    assert!(stopped_at >= ck, "stopped at {stopped_at}, checkpoint {ck}");
}

/// Quota reclaim: a queue's guaranteed devices, borrowed by another queue's trainer while idle,
/// come back within one scheduling round plus the checkpoint time, and the borrower checkpoints
/// before it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_reclaims_its_guarantee_from_a_borrower_by_checkpoint() {
    let (cluster, addrs, workers) = one_host().await;
    let logs = || all_logs(&cluster, &workers);
    for args in [
        ["queue", "set", "team", "--guaranteed", "8"],
        ["queue", "set", "scratch", "--guaranteed", "0"],
    ] {
        let out = cli(&addrs, &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Phase 1: the scratch queue borrows all 8 GPUs while the team queue is idle.
    let spec =
        trainer_spec("borrower", 1, 8).replace("tasks = 1", "tasks = 1\nqueue = \"scratch\"");
    let borrower = submit(&addrs[0], &spec, "borrower")
        .await
        .expect("submit")
        .job_id;
    wait_running(&addrs, &borrower, 0, logs).await;
    wait_until(Duration::from_secs(20), "steps", logs, || {
        steps(&workers[0].task_log(&borrower, 0)).len() >= 25
    })
    .await;

    // Phase 2: the owner wants its guarantee back.
    let spec = trainer_spec("owner", 1, 8).replace("tasks = 1", "tasks = 1\nqueue = \"team\"");
    let asked = Instant::now();
    let owner = submit(&addrs[0], &spec, "owner")
        .await
        .expect("submit")
        .job_id;
    wait_running(&addrs, &owner, 0, logs).await;
    let took = asked.elapsed();
    println!("the team queue got its 8 GPUs back {took:?} after asking");
    // One scheduling round (500 ms here) plus the checkpoint timeout (10 s), at most.
    assert!(took <= Duration::from_millis(10_500), "took {took:?}");

    // Phase 3: the borrower checkpointed first and waits to run again.
    let d = job(&addrs, &borrower).await.unwrap();
    assert_eq!(state_of(&d).0, "pending");
    assert!(d.last_checkpoint.expect("checkpointed").step >= 25);
    assert!(
        d.history.iter().any(|h| h.what.contains("QuotaReclaim")),
        "{:?}",
        d.history
    );
}

/// Idle-lease reclamation with real processes: two trainers in a queue whose policy reclaims
/// leases idle for 3 s. The one that sleeps through its steps (a notebook left open) holds devices
/// whose utilization, following its CPU use, stays near zero: it is checkpointed, released and
/// re-queued, then resumes from its checkpoint. The one that computes is never touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_lease_is_reclaimed_after_its_window_and_a_busy_one_is_kept() {
    let (cluster, addrs, workers) = one_host().await;
    let logs = || all_logs(&cluster, &workers);
    let out = cli(
        &addrs,
        &[
            "queue",
            "set",
            "research",
            "--idle-action",
            "reclaim",
            "--idle-window",
            "3s",
            "--idle-threshold",
            "20",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&addrs, &["queues"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("reclaim <20% 3s"), "{text}");

    // Phase 1: both trainers run, 4 GPUs each, in the research queue.
    let in_research = |spec: String| spec.replace("tasks = 1", "tasks = 1\nqueue = \"research\"");
    let idle_spec = in_research(trainer_spec("notebook", 1, 4)).replace("\"50\"", "\"200\"");
    let busy_spec = in_research(trainer_spec("busy", 1, 4)).replace("\"50\"", "\"50\", \"--busy\"");
    let notebook = submit(&addrs[0], &idle_spec, "notebook")
        .await
        .expect("submit")
        .job_id;
    let busy = submit(&addrs[0], &busy_spec, "busy")
        .await
        .expect("submit")
        .job_id;
    let (first, _) = wait_running(&addrs, &notebook, 0, logs).await;
    let started = Instant::now();
    let (busy_epoch, _) = wait_running(&addrs, &busy, 0, logs).await;

    // Phase 2: the sleeping trainer's lease is reclaimed once its devices stayed idle for the
    // window, by checkpoint; it runs again under a newer epoch, resumed from that checkpoint.
    let (second, _) = wait_running(&addrs, &notebook, first, logs).await;
    let held = started.elapsed();
    assert!(
        held >= Duration::from_secs(3),
        "reclaimed after {held:?}, before its window"
    );
    let d = job(&addrs, &notebook).await.unwrap();
    assert_eq!(d.summary.as_ref().unwrap().reclaims, 1);
    let why = d
        .history
        .iter()
        .find(|h| {
            h.what.contains("idle lease reclaimed") && h.what.contains("checkpointed at step")
        })
        .unwrap_or_else(|| panic!("no reclaim in the history: {:?}", d.history));
    println!("{}; held {held:?}; new epoch {second}", why.what);
    let step = d.last_checkpoint.as_ref().expect("checkpointed").step;
    wait_until(
        Duration::from_secs(20),
        "the trainer to resume",
        logs,
        || resumed(&workers[0].task_log(&notebook, 0)).contains(&step),
    )
    .await;
    let out = cli(&addrs, &["job", "status", &notebook]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("idle reclaims ") && text.contains("idle lease reclaimed"),
        "{text}"
    );

    // Phase 3: the computing trainer kept its lease throughout.
    let d = job(&addrs, &busy).await.unwrap();
    let s = d.summary.as_ref().unwrap();
    assert_eq!(
        (s.state().word(), s.lease_epoch, s.reclaims),
        ("running", busy_epoch, 0),
        "{:?}",
        d.history
    );
    let out = cli(&addrs, &["defrag", "status", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        v["reclaimed_device_hours"].as_f64().unwrap_or(0.0) > 0.0,
        "{v}"
    );
    let recent = v["recent"].to_string();
    assert!(
        recent.contains(&format!("{notebook}: idle lease reclaimed")),
        "{v}"
    );
}
