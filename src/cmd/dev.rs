//! `gangway dev`: a whole cluster on this machine. Three replicas as real child processes on loopback
//! with their own data directories, a fleet of four 8-GPU hosts in two racks, a demo workload, and a
//! printout of where to look. Ctrl-C stops everything cleanly. A replica that exits abnormally (a
//! crash, `gangway drill kill-leader`) is restarted, as a systemd unit with `Restart=on-failure`.
//!
//! The hosts are four `gangway worker` processes with fake devices (`--fake-devices 8xH100`); the demo
//! jobs run the example trainer (deploy/examples/trainer.py, built into the binary and written into
//! the dev directory), so checkpoints, migrations and `gangway logs` work as on a real fleet.

use anyhow::{anyhow, bail, Context};
use clap::Args;
use gangway_proto::pb;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use tokio::sync::watch;

#[derive(Args, Debug, Clone)]
pub struct DevArgs {
    /// First gRPC port; replicas use PORT, PORT+1, PORT+2 and HTTP ports PORT+1000...
    #[arg(long, default_value_t = 7101)]
    pub base_port: u16,
    /// Where data directories and logs go (default: a fresh temporary directory, removed on exit).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Run the demo, check that it was scheduled, stop everything and exit (for CI and smoke tests).
    #[arg(long)]
    pub smoke: bool,
}

/// Replica timings for a laptop demo: fast failover, short node TTL, short min-runtime.
fn replica_config(id: u64, port: u16, http: u16, data: &Path, cluster: &str, tls: &Path) -> String {
    let files = |stem: &str| tls.join(stem).display().to_string();
    format!(
        r#"id = {id}
listen = "127.0.0.1:{port}"
http = "127.0.0.1:{http}"
data_dir = "{}"
initial_cluster = "{cluster}"
allow_drills = true

[raft]
election_timeout_min = "500ms"
election_timeout_max = "1000ms"
heartbeat_interval = "100ms"

[scheduler]
interval = "1s"
min_runtime = "30s"

[workers]
heartbeat_interval = "1s"
node_ttl = "6s"

[tls]
ca = "{}"
cert = "{}"
key = "{}"

[access]
admins = ["client/admin"]
"#,
        data.display(),
        files("ca.pem"),
        files(&format!("server-{id}.pem")),
        files(&format!("server-{id}-key.pem")),
    )
}

/// The dev cluster's CA in `<dir>/tls`: a certificate for each replica, each host and
/// `client/admin` (what the demo and the printed commands use).
fn make_pki(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    use gangway_tls::ca;
    let tls = dir.join("tls");
    if !ca::ca_cert_path(&tls).exists() {
        ca::init(&tls, 30)?;
    }
    let ids = (1..=3)
        .map(|i| format!("server/{i}"))
        .chain((1..=4).map(|i| format!("worker/host-{i}")))
        .chain(["client/admin".to_owned()]);
    for id in ids {
        ca::ensure(&tls, &id.parse()?)?;
    }
    Ok(tls)
}

/// The demo's own connections speak as `client/admin`.
fn admin_credentials(tls: &Path) -> anyhow::Result<crate::client::credentials::Credentials> {
    crate::client::credentials::CredentialFlags {
        ca: Some(tls.join("ca.pem")),
        cert: Some(tls.join("client-admin.pem")),
        key: Some(tls.join("client-admin-key.pem")),
        token: None,
        insecure: false,
    }
    .resolve()
    .map_err(|e| anyhow!(e))
}

/// A client API connection to `addr` as `client/admin`.
async fn admin_client(addr: &str) -> anyhow::Result<crate::client::credentials::Api> {
    let creds = crate::client::credentials::current();
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2));
    Ok(creds.api(creds.connect(&ep).await?))
}

/// The example trainer, shipped inside the binary so `gangway dev` works from anywhere.
const TRAINER: &str = include_str!("../../deploy/examples/trainer.py");

/// The demo jobs: a rack-local 2x8 gang, a 4-GPU NVLink job, a single GPU and a half GPU that
/// pack, and one that can never fit (so `gangway jobs` shows a pending reason). `{trainer}` is
/// replaced by the trainer's path.
const DEMO_JOBS: &[(&str, &str)] = &[
    (
        "pretrain",
        r#"name = "pretrain-7b"
queue = "research"
priority = 100
tasks = 2
command = ["python3", "{trainer}", "--step-ms", "200"]
[resources]
devices = 8
kind = "gpu"
[topology]
required = "rack"
preferred = "host"
[checkpoint]
signal = "SIGUSR1"
timeout = "60s"
"#,
    ),
    (
        "finetune",
        r#"name = "finetune"
queue = "research"
tasks = 1
command = ["python3", "{trainer}", "--step-ms", "200", "--steps", "3000"]
[resources]
devices = 4
[topology]
required = "nvlink"
[checkpoint]
signal = "SIGUSR1"
"#,
    ),
    (
        "notebook-1",
        r#"name = "notebook-1"
queue = "interactive"
command = ["python3", "{trainer}", "--step-ms", "1000"]
[resources]
devices = 1
"#,
    ),
    (
        "notebook-2",
        r#"name = "notebook-2"
queue = "interactive"
command = ["python3", "{trainer}", "--step-ms", "1000"]
[resources]
devices = 0.5
"#,
    ),
    (
        "too-big",
        r#"name = "needs-16-per-host"
queue = "research"
command = ["python3", "{trainer}"]
[resources]
devices = 16
"#,
    ),
];

/// The four hosts: (name, rack).
const HOSTS: [(&str, &str); 4] = [
    ("host-1", "r1"),
    ("host-2", "r1"),
    ("host-3", "r2"),
    ("host-4", "r2"),
];

/// `gangway worker` processes with fake devices.
struct Workers {
    children: Vec<Child>,
    data_dirs: Vec<PathBuf>,
}

impl Workers {
    fn start(exe: &Path, dir: &Path, servers: &[String], base: u16) -> anyhow::Result<Self> {
        let mut children = Vec::new();
        let mut data_dirs = Vec::new();
        for (i, (name, rack)) in HOSTS.iter().enumerate() {
            let port = base + 2000 + i as u16;
            let data = dir.join(format!("worker-{name}"));
            let log = std::fs::File::create(dir.join(format!("worker-{name}.log")))?;
            let child = Command::new(exe)
                .arg("worker")
                .arg("--tls-ca")
                .arg(dir.join("tls/ca.pem"))
                .arg("--tls-cert")
                .arg(dir.join(format!("tls/worker-{name}.pem")))
                .arg("--tls-key")
                .arg(dir.join(format!("tls/worker-{name}-key.pem")))
                .arg("--servers")
                .arg(servers.join(","))
                .arg("--node")
                .arg(name)
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--advertise")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--fake-devices")
                .arg("8xH100:nvlink=0-3,4-7")
                .arg("--fake-fault-file")
                .arg(dir.join(format!("faults-{name}")))
                .arg("--topology")
                .arg(format!("dc=dc1,zone=z1,pod=p1,rack={rack}"))
                .arg("--data-dir")
                .arg(&data)
                .arg("--checkpoint-dir")
                .arg(dir.join("checkpoints"))
                .arg("--grace")
                .arg("3s")
                .arg("--stop-tasks-on-exit")
                // A development cluster on one machine: the demo's tasks run as whoever runs it.
                .arg("--task-user-same-as-agent")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting worker {name}"))?;
            children.push(child);
            data_dirs.push(data);
        }
        Ok(Self {
            children,
            data_dirs,
        })
    }

    /// The log of one task, wherever it ran.
    fn task_log(&self, job: &str, task: u32) -> Option<String> {
        self.data_dirs.iter().find_map(|d| {
            std::fs::read_to_string(d.join("logs").join(job).join(format!("task-{task}.log"))).ok()
        })
    }

    /// SIGTERM (the agents stop their tasks), then wait.
    async fn stop(mut self) {
        stop_children(&mut self.children).await;
    }
}

/// How many abnormal exits of one replica within [`RESTART_WINDOW`] the supervisor restarts
/// before it gives up on it (systemd's StartLimitBurst does the same).
const RESTART_BURST: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);
/// Pause before a restart (systemd's RestartSec).
const RESTART_DELAY: Duration = Duration::from_millis(500);

/// One replica under the supervisor: what the rest of `gangway dev` may ask about it.
struct Supervised {
    /// Set when the supervisor stopped restarting it, with the reason.
    gave_up: Arc<Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<()>,
}

/// The three replicas, each a child process under a supervisor task that restarts it when it
/// exits abnormally (a crash, or `gangway drill kill-leader`), as systemd's `Restart=on-failure`
/// would, and stops it with SIGTERM when the cluster stops.
struct Cluster {
    replicas: Vec<(u64, Supervised)>,
    addrs: Vec<String>,
    stopping: watch::Sender<bool>,
}

impl Cluster {
    async fn start(exe: &Path, dir: &Path, base: u16) -> anyhow::Result<Self> {
        let ports: Vec<u16> = (0..3).map(|i| base + i).collect();
        let cluster: String = ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let (stopping, _) = watch::channel(false);
        let mut replicas = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let id = i as u64 + 1;
            let data = dir.join(format!("replica-{id}"));
            std::fs::create_dir_all(&data)?;
            let config = dir.join(format!("replica-{id}.toml"));
            std::fs::write(
                &config,
                replica_config(id, *port, port + 1000, &data, &cluster, &dir.join("tls")),
            )?;
            let log = dir.join(format!("replica-{id}.log"));
            // A fresh log per `gangway dev`; restarts append to it.
            std::fs::File::create(&log)?;
            let spec = ReplicaProcess {
                id,
                exe: exe.to_owned(),
                config,
                log,
            };
            let child = spec.spawn()?;
            let gave_up = Arc::new(Mutex::new(None));
            let task = tokio::spawn(supervise(
                spec,
                child,
                gave_up.clone(),
                stopping.subscribe(),
            ));
            replicas.push((id, Supervised { gave_up, task }));
        }
        Ok(Self {
            replicas,
            addrs: ports.iter().map(|p| format!("127.0.0.1:{p}")).collect(),
            stopping,
        })
    }

    /// Polls ClusterStatus until some replica reports a leader.
    async fn wait_for_leader(&mut self, timeout: Duration) -> anyhow::Result<(u64, String)> {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            for (id, r) in &self.replicas {
                if let Some(why) = r.gave_up.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                    bail!("replica {id} does not stay up ({why}); see its log");
                }
            }
            for addr in &self.addrs {
                let Ok(mut c) = admin_client(addr).await else {
                    continue;
                };
                if let Ok(r) = c.cluster_status(pb::Empty {}).await {
                    let r = r.into_inner();
                    if r.leader_id != 0 {
                        return Ok((r.leader_id, r.leader_address));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(anyhow!("no leader elected within {timeout:?}"))
    }

    /// SIGTERM every replica (a clean shutdown: flush, close RocksDB), then wait.
    async fn stop(self) {
        let _ = self.stopping.send(true);
        for (_, r) in self.replicas {
            let _ = r.task.await;
        }
    }
}

/// How to start one replica process.
struct ReplicaProcess {
    id: u64,
    exe: PathBuf,
    config: PathBuf,
    log: PathBuf,
}

impl ReplicaProcess {
    fn spawn(&self) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.log)?;
        Command::new(&self.exe)
            .arg("server")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting replica {}", self.id))
    }
}

/// An exit status in words: `exit code 1`, `killed by signal 6 (SIGABRT)`.
fn describe_exit(status: std::process::ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            let name = match sig {
                6 => " (SIGABRT)",
                9 => " (SIGKILL)",
                11 => " (SIGSEGV)",
                15 => " (SIGTERM)",
                _ => "",
            };
            return format!("killed by signal {sig}{name}");
        }
    }
    match status.code() {
        Some(code) => format!("exit code {code}"),
        None => status.to_string(),
    }
}

/// Runs one replica until the cluster stops: restarts it after an abnormal exit (not after a
/// clean one, like `Restart=on-failure`), at most [`RESTART_BURST`] times per [`RESTART_WINDOW`].
async fn supervise(
    spec: ReplicaProcess,
    mut child: Child,
    gave_up: Arc<Mutex<Option<String>>>,
    mut stopping: watch::Receiver<bool>,
) {
    let id = spec.id;
    let mut failures: std::collections::VecDeque<Instant> = std::collections::VecDeque::new();
    loop {
        let status = tokio::select! {
            s = child.wait() => Some(s),
            _ = stopping.wait_for(|s| *s) => None,
        };
        let Some(status) = status.filter(|_| !*stopping.borrow()) else {
            stop_children(std::slice::from_mut(&mut child)).await;
            return;
        };
        let why = match status {
            Ok(s) if s.success() => {
                println!("replica {id} exited cleanly; not restarting it");
                return;
            }
            Ok(s) => describe_exit(s),
            Err(e) => format!("could not wait for it: {e}"),
        };
        let now = Instant::now();
        failures.push_back(now);
        while failures
            .front()
            .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
        {
            failures.pop_front();
        }
        if failures.len() > RESTART_BURST {
            println!(
                "replica {id} exited abnormally ({why}) {} times within {}s; not restarting it again (see {})",
                failures.len(),
                RESTART_WINDOW.as_secs(),
                spec.log.display()
            );
            *gave_up.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
            return;
        }
        println!(
            "replica {id} exited abnormally ({why}); restarting it, as systemd's Restart=on-failure would"
        );
        let stopped = tokio::select! {
            _ = tokio::time::sleep(RESTART_DELAY) => false,
            _ = stopping.wait_for(|s| *s) => true,
        };
        if stopped {
            return;
        }
        child = match spec.spawn() {
            Ok(c) => c,
            Err(e) => {
                println!("replica {id} could not be restarted: {e:#}");
                *gave_up.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{e:#}"));
                return;
            }
        };
    }
}

/// SIGTERM every child, then wait for each, killing any that does not stop within 10 s.
async fn stop_children(children: &mut [Child]) {
    for c in children.iter() {
        if let Some(pid) = c.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
    }
    for c in children.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(10), c.wait())
            .await
            .is_err()
        {
            let _ = c.kill().await;
        }
    }
}

async fn submit_demo(leader: &str, trainer: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let mut client = admin_client(leader).await?;
    let mut ids = Vec::new();
    for (key, spec) in DEMO_JOBS {
        let r = client
            .submit_job(pb::SubmitJobRequest {
                spec_toml: spec.replace("{trainer}", &trainer.display().to_string()),
                idempotency_key: format!("dev-demo-{key}"),
            })
            .await
            .map_err(|s| anyhow!("submitting {key}: {}", s.message()))?;
        ids.push(((*key).to_owned(), r.into_inner().job_id));
    }
    Ok(ids)
}

/// Every job as the cluster lists it, by id.
async fn job_states(addrs: &[String]) -> std::collections::BTreeMap<String, pb::JobSummary> {
    for addr in addrs {
        let Ok(mut c) = admin_client(addr).await else {
            continue;
        };
        if let Ok(r) = c.list_jobs(pb::ListJobsRequest::default()).await {
            return r
                .into_inner()
                .jobs
                .into_iter()
                .map(|j| (j.id.clone(), j))
                .collect();
        }
    }
    Default::default()
}

fn running(job: &pb::JobSummary) -> bool {
    job.state() == pb::JobState::Running
}

pub fn run(args: DevArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: DevArgs) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("locating the gangway binary")?;
    let temp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            temp = tempfile::Builder::new().prefix("gangway-dev-").tempdir()?;
            temp.path().to_owned()
        }
    };
    let tls = make_pki(&dir)?;
    crate::client::credentials::install(admin_credentials(&tls)?);
    println!(
        "gangway dev: three replicas in {} (mutual TLS; CA and certificates in {})",
        dir.display(),
        tls.display()
    );
    let mut cluster = Cluster::start(&exe, &dir, args.base_port).await?;
    let result = demo(&mut cluster, &dir, &args).await;
    cluster.stop().await;
    result
}

async fn demo(cluster: &mut Cluster, dir: &Path, args: &DevArgs) -> anyhow::Result<ExitCode> {
    let (leader_id, leader) = cluster.wait_for_leader(Duration::from_secs(30)).await?;
    println!("leader: replica {leader_id} at {leader}");
    let exe = std::env::current_exe().context("locating the gangway binary")?;
    let trainer = dir.join("trainer.py");
    std::fs::write(&trainer, TRAINER).context("writing the example trainer")?;
    let workers = Workers::start(&exe, dir, &cluster.addrs, args.base_port)?;
    println!("workers: 4 hosts x 8 fake H100 (NVLink 0-3, 4-7) in racks r1 (host-1, host-2) and r2 (host-3, host-4)");
    let result = run_demo(cluster, dir, args, &workers, &trainer, leader_id, &leader).await;
    workers.stop().await;
    result
}

async fn run_demo(
    cluster: &mut Cluster,
    dir: &Path,
    args: &DevArgs,
    workers: &Workers,
    trainer: &Path,
    leader_id: u64,
    leader: &str,
) -> anyhow::Result<ExitCode> {
    let ids = submit_demo(leader, trainer).await?;
    let placeable: Vec<String> = ids
        .iter()
        .filter(|(k, _)| *k != "too-big")
        .map(|(_, id)| id.clone())
        .collect();
    let until = Instant::now() + Duration::from_secs(60);
    let mut states = job_states(&cluster.addrs).await;
    while Instant::now() < until
        && !placeable
            .iter()
            .all(|id| states.get(id).is_some_and(running))
    {
        tokio::time::sleep(Duration::from_millis(300)).await;
        states = job_states(&cluster.addrs).await;
    }
    let all_running = placeable
        .iter()
        .all(|id| states.get(id).is_some_and(running));
    for (key, id) in &ids {
        match states.get(id) {
            Some(j) if running(j) => println!(
                "  {key:<11} {id:<16} running (epoch {}) on {}",
                j.lease_epoch,
                j.hosts.join(", ")
            ),
            Some(j) => {
                let why = match j.pending_reason.as_str() {
                    "" => String::new(),
                    reason => format!(" ({reason})"),
                };
                println!("  {key:<11} {id:<16} {}{why}", j.state().word())
            }
            None => println!("  {key:<11} {id:<16} unknown"),
        }
    }
    let addrs = cluster.addrs.join(",");
    let pretrain = ids
        .iter()
        .find(|(k, _)| k == "pretrain")
        .map(|(_, id)| id.clone())
        .unwrap_or_default();
    if args.smoke {
        if !all_running {
            bail!("the demo's placeable jobs were not all running within 60s");
        }
        // The trainer really runs: rank 0 of the gang prints its steps.
        let until = Instant::now() + Duration::from_secs(30);
        let mut stepping = false;
        while Instant::now() < until && !stepping {
            stepping = workers
                .task_log(&pretrain, 0)
                .is_some_and(|l| l.contains("] step 3"));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if !stepping {
            bail!("the pretrain gang's rank 0 printed no steps within 30s");
        }
        println!("smoke: every placeable demo job is running and the trainer steps; stopping");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "\nTry, in another terminal:\n  export GANGWAY_ADDR={addrs} GANGWAY_TLS_CA={tls}/ca.pem GANGWAY_TLS_CERT={tls}/client-admin.pem GANGWAY_TLS_KEY={tls}/client-admin-key.pem\n  gangway whoami\n  gangway jobs\n  gangway job status {pretrain}\n  gangway logs {pretrain} --follow\n  gangway job checkpoint {pretrain}\n  gangway job migrate {pretrain}\n  gangway nodes\n  gangway leases\n  gangway cluster status\n  gangway cluster transfer-leader --to {}\n  gangway drill kill-leader\n  gangway drill partition-leader --for 5s\n  echo 'xid 3 79' >> {}/faults-host-1   # GPU 3 of host-1 fails (XID 79); then gangway nodes\n\
         Metrics: http://127.0.0.1:{}/metrics  Logs: {}/replica-*.log, {}/worker-*.log\nCtrl-C stops everything.",
        leader_id % 3 + 1,
        dir.display(),
        args.base_port + 1000,
        dir.display(),
        dir.display(),
        tls = dir.join("tls").display(),
    );
    super::server::shutdown_signal().await;
    println!("stopping");
    Ok(ExitCode::SUCCESS)
}
