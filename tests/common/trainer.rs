//! What the end-to-end tests with real workers share: the example trainer's log lines, the CLI
//! against the cluster, a job's detail from whichever replica answers, polling, and the logs to
//! print when a wait times out.

use super::worker::WorkerProcess as Worker;
use super::{client, TestCluster, BIN};
use gangway_proto::pb;
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};

/// The example trainer (`deploy/examples/trainer.py`).
pub const TRAINER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/examples/trainer.py");

/// A checkpointing trainer gang of `tasks` x `devices` GPUs, a step every 50 ms.
pub fn trainer_spec(name: &str, tasks: u32, devices: u32) -> String {
    format!(
        r#"name = "{name}"
tasks = {tasks}
command = ["python3", "{TRAINER}", "--step-ms", "50"]
[resources]
devices = {devices}
[checkpoint]
signal = "SIGUSR1"
timeout = "10s"
"#
    )
}

/// The steps a trainer printed, in order.
pub fn steps(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.split("] step ").nth(1))
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// `resumed_step=N` of each start line a trainer printed.
pub fn resumed(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.split("resumed_step=").nth(1))
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .collect()
}

/// The `gangway` binary with `args` against the replicas at `addrs`.
pub fn cli(addrs: &[String], args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .arg("--addr")
        .arg(addrs.join(","))
        .output()
        .expect("run gangway")
}

/// `gangway nodes -o json`, as JSON.
pub fn nodes_json(addrs: &[String]) -> Option<Value> {
    let out = cli(addrs, &["nodes", "-o", "json"]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// The node named `name` in `gangway nodes -o json`.
pub fn node_json(addrs: &[String], name: &str) -> Option<Value> {
    nodes_json(addrs)?["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["name"] == name)
        .cloned()
}

/// A job's detail, from the first replica that answers.
pub async fn job(addrs: &[String], id: &str) -> Option<pb::JobDetail> {
    for a in addrs {
        if let Some(mut c) = client(a).await {
            if let Ok(r) = c
                .get_job(pb::GetJobRequest {
                    job_id: id.to_owned(),
                })
                .await
            {
                return Some(r.into_inner());
            }
        }
    }
    None
}

/// Polls until `check` gives a value, or panics with `what` and the logs.
pub async fn poll<T, F, Fut>(
    timeout: Duration,
    what: &str,
    logs: impl Fn() -> String,
    mut check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if let Some(v) = check().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {timeout:?} waiting for {what}\n{}", logs());
}

/// The job once it runs under a lease epoch above `newer_than`: its epoch and its detail.
pub async fn running_above(
    addrs: &[String],
    id: &str,
    newer_than: u64,
    logs: impl Fn() -> String,
) -> (u64, pb::JobDetail) {
    poll(
        Duration::from_secs(30),
        &format!("job {id} running above epoch {newer_than}"),
        logs,
        || {
            let addrs = addrs.to_vec();
            let id = id.to_owned();
            async move {
                let d = job(&addrs, &id).await?;
                let s = d.summary.as_ref()?;
                let running = s.state() == pb::JobState::Running && s.lease_epoch > newer_than;
                running.then_some((s.lease_epoch, d))
            }
        },
    )
    .await
}

/// The replicas' logs and the last 30 lines of each worker's.
pub fn all_logs(cluster: &TestCluster, workers: &[Worker]) -> String {
    let mut out = cluster.logs();
    for w in workers {
        out.push_str(&format!("--- worker {} (last 30 lines) ---\n", w.name));
        out.push_str(&w.log_tail(30));
        out.push('\n');
    }
    out
}
