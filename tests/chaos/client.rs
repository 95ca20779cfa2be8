//! The chaos client: submits, resubmits (same key, same spec: the idempotent retry every real
//! client does after an unknown outcome), cancels and migrates jobs through random replicas while
//! the nemesis works, recording every operation; and the samplers, which read the leader's lease
//! table and its fenced devices every 100 ms.

use crate::api::{Api, Outcome};
use crate::history::{Op, Sample};
use gangway_worker::driver::boottime_ms;
use rand::rngs::StdRng;
use rand::Rng;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TASK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/chaos/task.py");

/// One idempotency key (also the job's name) and the spec sent with it.
struct Key {
    key: String,
    spec: String,
    job: Option<String>,
}

pub struct ChaosClient {
    rng: StdRng,
    api: Arc<Api>,
    journal: String,
    max_keys: usize,
    keys: Vec<Key>,
    ops: Vec<Op>,
    /// Jobs holding a lease in the latest sample: the ones a migration can move.
    running: Arc<Mutex<Vec<String>>>,
}

impl ChaosClient {
    pub fn new(
        rng: StdRng,
        api: Arc<Api>,
        journal: &Path,
        max_keys: usize,
        running: Arc<Mutex<Vec<String>>>,
    ) -> Self {
        Self {
            rng,
            api,
            journal: journal.display().to_string(),
            max_keys,
            keys: Vec::new(),
            ops: Vec::new(),
            running,
        }
    }

    /// A gang of one or two tasks of one to four whole devices (a host has four), checkpointable,
    /// running for a few seconds or until stopped, taking up to 0.4 s to shut down on SIGTERM.
    fn spec(&mut self, name: &str) -> String {
        let rng = &mut self.rng;
        let tasks = if rng.random_bool(0.35) { 2 } else { 1 };
        let devices = rng.random_range(1..=4);
        let steps = if rng.random_bool(0.5) {
            0
        } else {
            rng.random_range(40..200)
        };
        let linger = rng.random_range(0..400);
        let priority = if rng.random_bool(0.15) { 50 } else { 0 };
        format!(
            r#"name = "{name}"
priority = {priority}
tasks = {tasks}
command = ["python3", "{TASK}", "{}", "{steps}", "50", "{linger}"]
[resources]
devices = {devices}
[checkpoint]
signal = "SIGUSR1"
timeout = "5s"
"#,
            self.journal
        )
    }

    fn replica(&mut self) -> String {
        let i = self.rng.random_range(0..self.api.addrs.len());
        self.api.addrs[i].clone()
    }

    fn known_job(&mut self) -> Option<String> {
        let jobs: Vec<String> = self.keys.iter().filter_map(|k| k.job.clone()).collect();
        (!jobs.is_empty()).then(|| jobs[self.rng.random_range(0..jobs.len())].clone())
    }

    /// Runs operations until `stop`; returns every one of them.
    pub async fn run(mut self, stop: Arc<AtomicBool>) -> Vec<Op> {
        while !stop.load(Ordering::Relaxed) {
            let pause = self.rng.random_range(100..400);
            tokio::time::sleep(Duration::from_millis(pause)).await;
            let addr = self.replica();
            let roll = self.rng.random_range(0..100);
            let sent_ms = boottime_ms();
            let (kind, target, outcome, job) = match roll {
                0..50 if self.keys.len() < self.max_keys => {
                    let key = format!("j{}", self.keys.len() + 1);
                    let spec = self.spec(&key);
                    self.keys.push(Key {
                        key: key.clone(),
                        spec,
                        job: None,
                    });
                    self.submit(self.keys.len() - 1, &addr).await
                }
                0..60 if !self.keys.is_empty() => {
                    let i = self.rng.random_range(0..self.keys.len());
                    self.submit(i, &addr).await
                }
                60..75 => {
                    let Some(job) = self.known_job() else {
                        continue;
                    };
                    let o = self.api.cancel(&addr, &job).await;
                    ("cancel", job, o, None)
                }
                75..100 => {
                    let running = self.running.lock().unwrap().clone();
                    if running.is_empty() {
                        continue;
                    }
                    let job = running[self.rng.random_range(0..running.len())].clone();
                    let o = self.api.migrate(&addr, &job).await;
                    ("migrate", job, o, None)
                }
                _ => continue,
            };
            self.ops.push(Op {
                kind,
                target,
                sent_ms,
                done_ms: boottime_ms(),
                outcome,
                job,
            });
        }
        self.ops
    }

    async fn submit(
        &mut self,
        i: usize,
        addr: &str,
    ) -> (&'static str, String, Outcome, Option<String>) {
        let (key, spec) = (self.keys[i].key.clone(), self.keys[i].spec.clone());
        let (outcome, reply) = self.api.submit(addr, &spec, &key).await;
        let job = reply.map(|r| r.job_id);
        if job.is_some() {
            self.keys[i].job = job.clone();
        }
        ("submit", key, outcome, job)
    }
}

/// Reads the leader's lease table every 100 ms until `stop`, publishing the jobs that hold a
/// lease to the client.
pub async fn sample_leases(
    api: Arc<Api>,
    stop: Arc<AtomicBool>,
    running: Arc<Mutex<Vec<String>>>,
) -> Vec<Sample> {
    let mut samples = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if let Some(leases) = api.leases().await {
            *running.lock().unwrap() = leases.iter().map(|l| l.job_id.clone()).collect();
            samples.push(Sample {
                at_ms: boottime_ms(),
                leases,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    samples
}

/// Every fence the leader listed: (device uuid, when it was fenced: Unix ms, log time) -> the last
/// time (CLOCK_BOOTTIME ms) it was seen still fenced. The time is taken before the read is sent
/// and the read is linearizable, so the device was fenced throughout from its fence time to then.
pub type Fences = BTreeMap<(String, u64), u64>;

pub async fn sample_fences(api: Arc<Api>, stop: Arc<AtomicBool>) -> Fences {
    let mut fences = Fences::new();
    while !stop.load(Ordering::Relaxed) {
        let at = boottime_ms();
        if let Some(nodes) = api.nodes().await {
            for n in &nodes {
                for d in n
                    .device_conditions
                    .iter()
                    .filter(|d| d.fenced && d.fenced_since_ms > 0)
                {
                    let last = fences
                        .entry((d.uuid.clone(), d.fenced_since_ms))
                        .or_default();
                    *last = (*last).max(at);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fences
}
