//! [`FakeFleet`]: many simulated accelerator hosts driven through the real worker API, for the
//! end-to-end tests and the end-to-end benchmark (1,000 hosts are too many processes).
//!
//! Each host registers, heartbeats, and watches its desired allocations like a worker does, but runs
//! nothing: a new allocation is acknowledged as running at once, and the moment each job first
//! appears on a host is recorded, which is what submit-to-lease latency is measured against. It
//! follows the leader with the agent's own link (`not_leader` hints, then the next address).

use anyhow::anyhow;
use gangway_proto::pb;
use gangway_worker::agent::scheduler_link::{retryable, STANDBY_EVERY};
use gangway_worker::agent::task_reports::MAX_REPORTS_PER_REQUEST;
use gangway_worker::agent::SchedulerLink;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// One simulated host.
#[derive(Clone, Debug)]
pub struct FakeHost {
    pub name: String,
    pub datacenter: String,
    pub zone: String,
    pub pod: String,
    pub rack: String,
    pub devices: u32,
    pub model: String,
    /// "gpu" or "tpu".
    pub kind: String,
}

impl FakeHost {
    /// An 8-device H100 host in `rack` of pod p1, zone z1, dc1.
    pub fn h100(name: &str, rack: &str) -> Self {
        Self {
            name: name.to_owned(),
            datacenter: "dc1".into(),
            zone: "z1".into(),
            pod: "p1".into(),
            rack: rack.to_owned(),
            devices: 8,
            model: "H100".into(),
            kind: "gpu".into(),
        }
    }

    fn register_request(&self, index: usize) -> pb::RegisterRequest {
        pb::RegisterRequest {
            node: self.name.clone(),
            address: format!("127.0.0.1:{}", 20_000 + index % 40_000),
            datacenter: self.datacenter.clone(),
            zone: self.zone.clone(),
            pod: self.pod.clone(),
            rack: self.rack.clone(),
            cpu_milli: 128_000,
            memory_mib: 1_024_000,
            devices: (0..self.devices)
                .map(|d| pb::Device {
                    uuid: format!("GPU-{}-{d}", self.name),
                    model: self.model.clone(),
                    kind: self.kind.clone(),
                    memory_mib: 81_920,
                    // Two NVLink domains of four on an 8-device host, like an HGX board's halves.
                    nvlink_domain: d / 4,
                })
                .collect(),
        }
    }
}

/// A job as the fleet saw it: when its first task appeared on a host, and under which epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenLease {
    pub first_seen: Instant,
    pub epoch: u64,
    pub hosts: Vec<String>,
}

/// Leader-following connection to the worker API: the agent's own (`gangway worker` uses it too).
type Follower = SchedulerLink;

/// How the simulated hosts behave.
#[derive(Clone, Debug)]
pub struct FleetOptions {
    /// How long registration may keep retrying while the cluster has no leader.
    pub register_deadline: Duration,
    /// Each task "finishes" (reported succeeded) this long after it first appears; `None`: tasks
    /// run until revoked.
    pub task_runtime: Option<Duration>,
    /// How each host dials the cluster (its own `worker/<name>` certificate); `None`: plain TCP,
    /// toward an insecure cluster.
    pub dialer: Option<HostDialer>,
}

/// Gives the dialer of the host with this name.
#[derive(Clone)]
pub struct HostDialer(pub Arc<dyn Fn(&str) -> gangway_tls::Dialer + Send + Sync>);

impl std::fmt::Debug for HostDialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostDialer")
    }
}

impl Default for FleetOptions {
    fn default() -> Self {
        Self {
            register_deadline: Duration::from_secs(30),
            task_runtime: None,
            dialer: None,
        }
    }
}

pub struct FakeFleet {
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    seen: Arc<Mutex<BTreeMap<String, SeenLease>>>,
    changed: watch::Receiver<u64>,
}

impl FakeFleet {
    /// Registers every host (retrying until the cluster has a leader, up to `deadline`) and starts
    /// heartbeating and watching allocations.
    pub async fn start(
        addrs: Vec<String>,
        hosts: Vec<FakeHost>,
        deadline: Duration,
    ) -> anyhow::Result<Self> {
        let options = FleetOptions {
            register_deadline: deadline,
            ..FleetOptions::default()
        };
        Self::start_with(addrs, hosts, options).await
    }

    pub async fn start_with(
        addrs: Vec<String>,
        hosts: Vec<FakeHost>,
        options: FleetOptions,
    ) -> anyhow::Result<Self> {
        let deadline = options.register_deadline;
        if addrs.is_empty() {
            return Err(anyhow!("no replica addresses"));
        }
        // One link per host: with TLS each host speaks with its own certificate.
        let links: BTreeMap<String, Follower> = hosts
            .iter()
            .map(|h| {
                let dialer = options
                    .dialer
                    .as_ref()
                    .map_or(gangway_tls::Dialer::Plain, |d| (d.0)(&h.name));
                let link = Follower::with_dialer(addrs.clone(), Duration::from_secs(10), dialer);
                (h.name.clone(), link)
            })
            .collect();
        let until = Instant::now() + deadline;
        let mut heartbeat_ms = 1_000;
        for (i, host) in hosts.iter().enumerate() {
            let follower = &links[&host.name];
            let req = host.register_request(i);
            loop {
                let mut c = follower.client().map_err(|s| anyhow!("{}", s.message()))?;
                match c.register(req.clone()).await {
                    Ok(r) => {
                        heartbeat_ms = r.into_inner().heartbeat_interval_ms.max(50);
                        break;
                    }
                    Err(s) if retryable(&s) && Instant::now() < until => {
                        follower.failed(&s);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(s) => return Err(anyhow!("registering {}: {}", host.name, s.message())),
                }
            }
        }
        // Standby connections to every replica, as the agent keeps (a failover then needs no
        // new handshake); a few hosts at a time, so they do not crowd the replicas at start.
        let permits = Arc::new(tokio::sync::Semaphore::new(16));
        let mut warming = JoinSet::new();
        for link in links.values() {
            let (link, permits) = (link.clone(), permits.clone());
            warming.spawn(async move {
                let _permit = permits.acquire_owned().await;
                link.warm().await;
            });
        }
        while warming.join_next().await.is_some() {}
        let (stop, stop_rx) = watch::channel(false);
        let (changed_tx, changed) = watch::channel(0u64);
        let changed_tx = Arc::new(changed_tx);
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let mut tasks = JoinSet::new();
        let names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
        let every = Duration::from_millis(heartbeat_ms);
        for (i, name) in names.iter().enumerate() {
            // Each host re-connects replicas it found unreachable, at its own phase.
            let (link, spread) = (links[name].clone(), i as f64 / names.len() as f64);
            let mut stop = stop_rx.clone();
            tasks.spawn(async move {
                tokio::select! {
                    _ = link.keep_warm(STANDBY_EVERY, STANDBY_EVERY.mul_f64(spread)) => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
            });
            tasks.spawn(heartbeat_loop(
                name.clone(),
                links[name].clone(),
                every,
                every.mul_f64(i as f64 / names.len() as f64),
                stop_rx.clone(),
            ));
        }
        for name in names {
            tasks.spawn(watch_loop(
                links[&name].clone(),
                name,
                options.task_runtime,
                seen.clone(),
                changed_tx.clone(),
                stop_rx.clone(),
            ));
        }
        Ok(Self {
            stop,
            tasks,
            seen,
            changed,
        })
    }

    /// Every job seen on some host so far.
    pub fn seen(&self) -> BTreeMap<String, SeenLease> {
        self.with_seen(BTreeMap::clone)
    }

    /// `f` over the jobs seen, under the lock every host's stream takes for each set it receives.
    fn with_seen<R>(&self, f: impl FnOnce(&BTreeMap<String, SeenLease>) -> R) -> R {
        f(&self.seen.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Waits until `pred` holds over the jobs seen, or `timeout`. `pred` runs on the map itself,
    /// under the lock every host's stream takes for each set it receives: keep it cheap (a bench
    /// waiting for thousands of jobs checks the count first), or the waiting measures itself.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&BTreeMap<String, SeenLease>) -> bool,
    ) -> bool {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            if self.with_seen(&mut pred) {
                return true;
            }
            if tokio::time::timeout_at(until, self.changed.changed())
                .await
                .is_err()
            {
                return self.with_seen(&mut pred);
            }
        }
    }

    /// Stops heartbeating (the hosts then go silent, as crashed hosts do).
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// One host's heartbeats, as its agent sends them: on its own timer, the fleet's hosts spread over
/// the interval (`phase`) rather than all at once.
async fn heartbeat_loop(
    name: String,
    follower: Follower,
    every: Duration,
    phase: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        let Ok(mut c) = follower.client() else {
            continue;
        };
        let req = pb::HeartbeatRequest {
            node: name.clone(),
            devices: Vec::new(),
        };
        if let Err(s) = c.heartbeat(req).await {
            follower.failed(&s);
        }
    }
}

async fn watch_loop(
    follower: Follower,
    name: String,
    task_runtime: Option<Duration>,
    seen: Arc<Mutex<BTreeMap<String, SeenLease>>>,
    changed: Arc<watch::Sender<u64>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut reported: BTreeMap<(String, u32), u64> = BTreeMap::new();
    loop {
        if *stop.borrow() {
            return;
        }
        // No per-call deadline: this client holds the allocation stream.
        let Ok(mut c) = follower.stream_client(gangway_proto::allocation::MAX_ALLOCATION_SET_BYTES)
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let stream = c
            .watch_allocations(pb::WatchAllocationsRequest { node: name.clone() })
            .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(s) => {
                follower.failed(&s);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        loop {
            let msg = tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                m = stream.message() => m,
            };
            let set = match msg {
                Ok(Some(set)) => set,
                Ok(None) => break,
                Err(s) => {
                    follower.failed(&s);
                    break;
                }
            };
            let now = Instant::now();
            let mut new_any = false;
            {
                let mut g = seen.lock().unwrap_or_else(|p| p.into_inner());
                for a in &set.allocations {
                    let e = g.entry(a.job_id.clone()).or_insert_with(|| {
                        new_any = true;
                        SeenLease {
                            first_seen: now,
                            epoch: a.epoch,
                            hosts: Vec::new(),
                        }
                    });
                    if a.epoch > e.epoch {
                        e.epoch = a.epoch;
                        e.hosts.clear();
                        new_any = true;
                    }
                    if a.epoch == e.epoch && !e.hosts.contains(&name) {
                        e.hosts.push(name.clone());
                        new_any = true;
                    }
                }
            }
            if new_any {
                changed.send_modify(|v| *v += 1);
            }
            // Acknowledge each new task as running, once per (job, task, epoch), in one batch
            // as the agent does; the batch "finishes" together `task_runtime` later.
            let fresh: Vec<pb::TaskStatusReport> = set
                .allocations
                .into_iter()
                .filter(|a| reported.get(&(a.job_id.clone(), a.task)) != Some(&a.epoch))
                .map(|a| pb::TaskStatusReport {
                    node: name.clone(),
                    job_id: a.job_id,
                    task: a.task,
                    epoch: a.epoch,
                    state: pb::TaskState::Running.into(),
                    has_exit_code: false,
                    exit_code: 0,
                    message: String::new(),
                })
                .collect();
            for batch in fresh.chunks(MAX_REPORTS_PER_REQUEST) {
                if report_all(&mut c, &name, batch.to_vec()).await.is_err() {
                    continue;
                }
                for r in batch {
                    reported.insert((r.job_id.clone(), r.task), r.epoch);
                }
                if let Some(runtime) = task_runtime {
                    let mut c = c.clone();
                    let (name, done) = (name.clone(), finished(batch));
                    tokio::spawn(async move {
                        tokio::time::sleep(runtime).await;
                        // Best effort: a lost report leaves the tasks running, as a hung worker
                        // would; the benchmark counts placements, not completions.
                        let _ = report_all(&mut c, &name, done).await;
                    });
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The same tasks, reported succeeded.
fn finished(running: &[pb::TaskStatusReport]) -> Vec<pb::TaskStatusReport> {
    running
        .iter()
        .map(|r| pb::TaskStatusReport {
            state: pb::TaskState::Succeeded.into(),
            has_exit_code: true,
            exit_code: 0,
            ..r.clone()
        })
        .collect()
}

/// Sends `reports` of `node` as one `ReportTaskStatuses` call.
async fn report_all(
    c: &mut pb::worker_api_client::WorkerApiClient<tonic::transport::Channel>,
    node: &str,
    reports: Vec<pb::TaskStatusReport>,
) -> Result<(), tonic::Status> {
    c.report_task_statuses(pb::TaskStatusReports {
        node: node.to_owned(),
        reports,
    })
    .await
    .map(drop)
}
