//! A cluster of real `gangway server` processes for the end-to-end tests: free loopback ports, fast
//! Raft and heartbeat timings, a data directory per replica that survives kill and restart, and
//! clients that ask one replica at a time.

#![allow(dead_code)]

pub mod pki;
pub mod trainer;
pub mod worker;

use gangway_proto::pb::client_api_client::ClientApiClient;
use gangway_proto::{link, pb};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_gangway");

/// The `THP_enabled` value of a `/proc/<pid>/status` text (or any text with that line): 0 when the
/// process turned transparent huge pages off (`PR_SET_THP_DISABLE`), 1 otherwise.
pub fn thp_value(status: &str) -> Option<u32> {
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))?;
    line.trim().parse().ok()
}

/// [`thp_value`] of a running process (`pid` may be `self`); `None` once it is gone.
pub fn thp_enabled(pid: &str) -> Option<u32> {
    thp_value(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// Ports the OS says are free now (bound and released).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

pub struct Replica {
    pub id: u64,
    pub grpc: String,
    pub http: String,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Replica {
    /// The process id while it runs (for SIGSTOP/SIGCONT).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// How the process ended, once it has (a supervisor's question: crashed or stopped cleanly?).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }
}

/// How a test cluster's replicas are configured.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// `allow_drills` in every replica's configuration.
    pub allow_drills: bool,
    /// `tls.insecure`: plain TCP, everyone an admin (the tests of that mode only).
    pub insecure: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            allow_drills: true,
            insecure: false,
        }
    }
}

/// One cluster at a time per test binary: three replicas per test on a 2-core CI machine is already
/// a load where election timeouts matter; more would test the machine, not Gangway.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub struct TestCluster {
    _serial: std::sync::MutexGuard<'static, ()>,
    pub dir: tempfile::TempDir,
    pub replicas: Vec<Replica>,
}

/// Replica settings for tests: elections within about a second, nodes down after 3 s of silence.
fn config_text(
    id: u64,
    grpc: &str,
    http: &str,
    data: &Path,
    cluster: &str,
    opts: &ClusterOptions,
) -> String {
    format!(
        r#"id = {id}
listen = "{grpc}"
http = "{http}"
data_dir = "{}"
initial_cluster = "{cluster}"
allow_drills = {}

[raft]
election_timeout_min = "400ms"
election_timeout_max = "800ms"
heartbeat_interval = "100ms"
snapshot_every_entries = 200

[scheduler]
interval = "500ms"
min_runtime = "1s"

[workers]
heartbeat_interval = "500ms"
node_ttl = "3s"

{}
"#,
        data.display(),
        opts.allow_drills,
        tls_section(id, opts)
    )
}

/// The replica's `[tls]` and `[access]`: its own certificate from the test CA, `client/admin` an
/// admin.
fn tls_section(id: u64, opts: &ClusterOptions) -> String {
    if opts.insecure {
        return "[tls]\ninsecure = true\n".to_owned();
    }
    let f = pki::pki().files(&format!("server/{id}"));
    format!(
        "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n[access]\nadmins = [\"client/admin\"]\n",
        f.ca.display(),
        f.cert.unwrap().display(),
        f.key.unwrap().display()
    )
}

impl TestCluster {
    /// Holds the one-cluster-at-a-time lock for tests that start processes some other way.
    pub fn serial() -> std::sync::MutexGuard<'static, ()> {
        ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn start(n: usize) -> Self {
        Self::start_with(n, &ClusterOptions::default())
    }

    /// [`Self::start`] with replica settings other than the defaults.
    pub fn start_with(n: usize, opts: &ClusterOptions) -> Self {
        let mut c = Self::configure(n, opts);
        for id in 1..=n as u64 {
            c.start_replica(id);
        }
        c
    }

    /// `n` founding replicas configured (ports, data directories, configuration files), none
    /// started yet: [`Self::start_replica`] starts each.
    pub fn configure(n: usize, opts: &ClusterOptions) -> Self {
        let serial = Self::serial();
        let dir = tempfile::Builder::new()
            .prefix("gangway-e2e-")
            .tempdir()
            .expect("temp dir");
        let ports = free_ports(2 * n);
        let cluster = (0..n)
            .map(|i| format!("{}=127.0.0.1:{}", i + 1, ports[i]))
            .collect::<Vec<_>>()
            .join(",");
        let mut replicas = Vec::new();
        for i in 0..n {
            let id = i as u64 + 1;
            let grpc = format!("127.0.0.1:{}", ports[i]);
            let http = format!("127.0.0.1:{}", ports[n + i]);
            let data = dir.path().join(format!("data-{id}"));
            let config = dir.path().join(format!("replica-{id}.toml"));
            std::fs::write(
                &config,
                config_text(id, &grpc, &http, &data, &cluster, opts),
            )
            .expect("write config");
            let log = dir.path().join(format!("replica-{id}.log"));
            replicas.push(Replica {
                id,
                grpc,
                http,
                config,
                log,
                child: None,
            });
        }
        TestCluster {
            _serial: serial,
            dir,
            replicas,
        }
    }

    pub fn replica(&mut self, id: u64) -> &mut Replica {
        self.replicas
            .iter_mut()
            .find(|r| r.id == id)
            .expect("known replica id")
    }

    /// Starts (or restarts, with the same data directory) one replica; its output is appended to
    /// its log file.
    pub fn start_replica(&mut self, id: u64) {
        let r = self.replica(id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&r.log)
            .expect("open log");
        let child = Command::new(BIN)
            .arg("server")
            .arg("--config")
            .arg(&r.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn gangway server");
        r.child = Some(child);
    }

    /// kill -9: no clean shutdown, exactly as a crash.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut c) = self.replica(id).child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn addrs(&self) -> Vec<String> {
        self.replicas.iter().map(|r| r.grpc.clone()).collect()
    }

    pub fn addr(&self, id: u64) -> String {
        self.replicas
            .iter()
            .find(|r| r.id == id)
            .expect("known replica")
            .grpc
            .clone()
    }

    pub fn addr_http(&self, id: u64) -> String {
        self.replicas
            .iter()
            .find(|r| r.id == id)
            .expect("known replica")
            .http
            .clone()
    }

    /// Every replica's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for r in &self.replicas {
            let text = std::fs::read_to_string(&r.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("--- replica {} (last 40 lines) ---\n", r.id));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Every job, as the leader lists it. A leader that loses its term between the test's look and
    /// the read (a 2-core CI machine under load can miss heartbeats) answers `UNAVAILABLE`; the read
    /// goes to whichever replica leads next, as the CLI's client would, for up to 30 s.
    pub async fn list_jobs(&mut self) -> Vec<pb::JobSummary> {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let leader = self.wait_for_leader(None, Duration::from_secs(30)).await;
            let reply = match client(&self.addr(leader)).await {
                Some(mut c) => c.list_jobs(pb::ListJobsRequest::default()).await,
                None => Err(tonic::Status::unavailable("cannot connect")),
            };
            match reply {
                Ok(r) => return r.into_inner().jobs,
                Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("list jobs from replica {leader}: {e:?}\n{}", self.logs()),
            }
        }
    }

    /// Waits until a running replica reports a leader other than `not`, and returns its id.
    pub async fn wait_for_leader(&mut self, not: Option<u64>, timeout: Duration) -> u64 {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            let running: Vec<(u64, String)> = self
                .replicas
                .iter_mut()
                .filter_map(|r| r.is_running().then(|| (r.id, r.grpc.clone())))
                .collect();
            for (_, addr) in &running {
                if let Some(s) = status(addr).await {
                    let alive = running.iter().any(|(id, _)| *id == s.leader_id);
                    if s.leader_id != 0 && Some(s.leader_id) != not && alive {
                        // Confirm with the leader itself.
                        if let Some(ls) = status(&s.leader_address).await {
                            if ls.role == "leader" {
                                return s.leader_id;
                            }
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "no leader (other than {not:?}) within {timeout:?}\n{}",
            self.logs()
        );
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for r in &mut self.replicas {
            if let Some(mut c) = r.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A client API connection to one replica, as `client/admin`.
pub async fn client(addr: &str) -> Option<ClientApiClient<Channel>> {
    client_as(addr, "client/admin").await
}

/// A client API connection to one replica, speaking as `id` (a certificate of the test CA).
pub async fn client_as(addr: &str, id: &str) -> Option<ClientApiClient<Channel>> {
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(10));
    let channel = pki::pki().dialer(id).connect(&ep).await.ok()?;
    Some(ClientApiClient::new(channel))
}

pub async fn status(addr: &str) -> Option<pb::ClusterStatusReply> {
    let mut c = client(addr).await?;
    c.cluster_status(pb::Empty {})
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// A request that any replica answers from its own state.
pub fn local<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("x-gangway-consistency", "local".parse().expect("ascii"));
    req
}

/// One replica's own view of the leases: (job, epoch, hosts per task).
pub async fn local_leases(addr: &str) -> Option<Vec<(String, u64, Vec<String>)>> {
    let mut c = client(addr).await?;
    let r = c
        .list_leases(local(pb::PageRequest::default()))
        .await
        .ok()?
        .into_inner();
    let mut out: Vec<_> = r
        .leases
        .into_iter()
        .map(|l| {
            (
                l.job_id,
                l.epoch,
                l.tasks.into_iter().map(|t| t.host).collect::<Vec<_>>(),
            )
        })
        .collect();
    out.sort();
    Some(out)
}

/// Waits until replica `addr` has applied at least `index`.
pub async fn wait_applied(addr: &str, index: u64, timeout: Duration) -> bool {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if status(addr).await.is_some_and(|s| s.applied_index >= index) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

pub const GANG_2X8_RACK: &str = r#"name = "gang-2x8"
queue = "research"
priority = 100
tasks = 2
command = ["python3", "train.py"]
[resources]
devices = 8
kind = "gpu"
[topology]
required = "rack"
"#;

pub fn single(name: &str, devices: u32) -> String {
    format!(
        "name = \"{name}\"\nqueue = \"default\"\ncommand = [\"sleep\", \"1000\"]\n[resources]\ndevices = {devices}\n"
    )
}

/// Submits through the client API of `addr` (a follower forwards), sent again with the same key
/// while the answer says it was certainly not proposed (by `link::classify`, the rules every
/// client follows: `no_leader`, `not_leader`; here an election under way, which a loaded 2-core
/// CI machine can start at any time), for up to 30 s, as the CLI's client does. Any other answer, an unknown outcome included, is returned as it came, so a
/// test can still tell who created a job.
pub async fn submit(
    addr: &str,
    spec: &str,
    key: &str,
) -> Result<pb::SubmitJobReply, tonic::Status> {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let reply = submit_once(addr, spec, key).await;
        let not_proposed = reply.as_ref().err().map(link::classify).is_some_and(|r| {
            matches!(
                r,
                link::Retry::FollowLeader(_) | link::Retry::AnotherReplica
            )
        });
        if !not_proposed || Instant::now() >= until {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn submit_once(
    addr: &str,
    spec: &str,
    key: &str,
) -> Result<pb::SubmitJobReply, tonic::Status> {
    let mut c = client(addr)
        .await
        .ok_or_else(|| tonic::Status::unavailable(format!("cannot connect to {addr}")))?;
    c.submit_job(pb::SubmitJobRequest {
        spec_toml: spec.to_owned(),
        idempotency_key: key.to_owned(),
    })
    .await
    .map(|r| r.into_inner())
}

/// Runs the real `gangway` binary with `args`, off the runtime's threads; its whole output. The
/// arguments are copied first, so the future can be spawned.
pub fn gangway(
    args: &[&str],
) -> impl std::future::Future<Output = std::process::Output> + Send + 'static {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    async move {
        tokio::task::spawn_blocking(move || {
            Command::new(BIN).args(&args).output().expect("run gangway")
        })
        .await
        .expect("gangway runner")
    }
}

/// An exit status with both streams, for assertion messages.
pub fn explain(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Fake hosts that register within 20 s, each with its own certificate.
pub fn fleet_options() -> gangway::fleet::FleetOptions {
    gangway::fleet::FleetOptions {
        register_deadline: Duration::from_secs(20),
        dialer: Some(pki::pki().fleet_dialer()),
        ..Default::default()
    }
}

/// Two 8-GPU fake hosts in one rack, registered with the cluster at `addrs`.
pub async fn two_hosts(addrs: Vec<String>) -> gangway::fleet::FakeFleet {
    use gangway::fleet::{FakeFleet, FakeHost};
    FakeFleet::start_with(
        addrs,
        vec![
            FakeHost::h100("host-1", "r1"),
            FakeHost::h100("host-2", "r1"),
        ],
        fleet_options(),
    )
    .await
    .expect("fleet registers")
}
