//! Gangway's consensus layer beside a 3-member etcd, like for like (prints numbers; not a test).
//!
//! Part of `make bench-peers` (deploy/peers/). Both systems run as three separate processes on
//! loopback, with fsynced logs, and are driven by the same load generator: this binary, over the
//! same tonic gRPC client stack, so both sides pay one client RPC hop per write.
//!
//! - Gangway: three `peers_raft serve` processes (this binary), each one replica of
//!   `gangway-consensus` with the toy key-value state machine of the crate's tests, a RocksDB log
//!   and its own gRPC port. A client write is the layer's own `RaftTransport/ForwardWrite` RPC sent
//!   to the leader: the encoded command is proposed there and answered once applied (what a
//!   follower's `ReplicaHandle::write` does for its caller).
//! - etcd: three `etcd` processes (Debian etcd-server, 3.4), a write is `etcdserverpb.KV/Put` sent
//!   to the leader, answered once applied.
//!
//! Election timing: each side's production default, and each row says when a follower may first
//! campaign after the last heartbeat it saw. etcd: heartbeat 100 ms, election timeout 1000 ms,
//! randomised over 1000-2000 ms. Gangway: `ReplicaConfig::new`'s heartbeat 100 ms, election
//! timeout 400-800 ms, which openraft turns into a campaign 1200-1600 ms after the last heartbeat
//! (its leader lease, election_timeout_max, comes first). `PEERS_ELECTION_MS=MIN-MAX` and
//! `PEERS_HEARTBEAT_MS` change Gangway's. Snapshots every 100,000 entries on both (etcd's default
//! `--snapshot-count`).
//!
//! Usage (run through cargo, or the built binary directly):
//!   peers_raft run gangway|etcd DIR   every workload against one system; prints RESULT lines
//!   peers_raft serve ID DIR PEERS EMIN_MS EMAX_MS HB_MS [init]   one Gangway replica (internal)
//! Environment: PEERS_CLIENTS (default 1,16,64,256), PEERS_WRITE_SECS (10), PEERS_VALUE_BYTES
//! (256), PEERS_KILLS (20), PEERS_ELECTION_MS (400-800), PEERS_HEARTBEAT_MS (100), PEERS_DETECT
//! (on), PEERS_REPLICATION (`ReplicaConfig::replication`: stream (the default, one request in
//! flight per follower), stream:N, or calls: one unary AppendEntries call at a time, as before),
//! ETCD (etcd), GANGWAY_LOG (the Gangway members' log filter, `warn` by default; each member
//! logs to DIR/member-N.log). An empty PEERS_CLIENTS runs no write rows (failover
//! only).
//! Connections: one per 16 clients (at least one), the clients of a connection multiplexed on it.
//!
//! Output lines, parsed by deploy/peers/table.py:
//!   RESULT write SYSTEM clients=C conns=K ops=N secs=S tput=OPS p50_ms=X p99_ms=Y errors=E
//!     cpu_us=U gen_cpu_us=G replication=stream:N|calls|-
//!   (U: CPU time of the three members per write, user + system, in microseconds; G: this load
//!   generator's, the same program for both systems)
//!   RESULT failover SYSTEM kills=N p50_ms=X p99_ms=Y max_ms=Z campaign_ms=A-B timeout_ms=C-D detect=on|off|-
//!   (campaign: when a follower may first stand after the last heartbeat it saw, without
//!   detection; detect: Gangway's leader-loss detection, `PEERS_DETECT=on|off`, on by default:
//!   a follower whose leader's port refuses connections elects at once)

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use common::Append;
use common::Kv;
use gangway_consensus::pb;
use gangway_consensus::ReplicaConfig;
use gangway_consensus::ReplicaHandle;
use gangway_consensus::Replication;
use gangway_consensus::Transport;
use tokio::process::Child;
use tokio::process::Command;
use tonic::transport::Channel;
use tonic::transport::Endpoint;

/// The allocator the `gangway` binary runs its replicas with (src/main.rs); the load generator,
/// the same binary, drives etcd with it too.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The few etcd v3 messages the load generator needs, written by hand (field numbers from etcd's
/// `rpc.proto`; prost skips the fields left out).
mod etcd_pb {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResponseHeader {
        #[prost(uint64, tag = "1")]
        pub cluster_id: u64,
        #[prost(uint64, tag = "2")]
        pub member_id: u64,
        #[prost(int64, tag = "3")]
        pub revision: i64,
        #[prost(uint64, tag = "4")]
        pub raft_term: u64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutResponse {
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StatusRequest {}
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StatusResponse {
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
        #[prost(uint64, tag = "4")]
        pub leader: u64,
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum System {
    Gangway,
    Etcd,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Gangway => "gangway",
            System::Etcd => "etcd",
        }
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// One unary gRPC call through tonic's generic client: the same code path for both systems.
async fn unary<Req, Resp>(ch: &Channel, path: &'static str, req: Req) -> Result<Resp, String>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut g = tonic::client::Grpc::new(ch.clone());
    g.ready().await.map_err(|e| format!("not ready: {e}"))?;
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    g.unary(
        tonic::Request::new(req),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        codec,
    )
    .await
    .map(|r| r.into_inner())
    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

/// One replicated write of `value`; Ok once the leader answered it applied.
async fn write(sys: System, ch: &Channel, op: u64, value: &[u8]) -> Result<(), String> {
    match sys {
        System::Gangway => {
            let cmd = Append {
                key: format!("k{}", op % 64),
                op_id: op,
                payload: value.to_vec(),
            };
            let command = bincode::serialize(&cmd).map_err(|e| e.to_string())?;
            let r: pb::ForwardWriteReply = unary(
                ch,
                "/gangway.consensus.v1.RaftTransport/ForwardWrite",
                pb::ForwardWriteRequest { command },
            )
            .await?;
            // bincode of the layer's ForwardReply: variant 0 is Applied, 1 Failed (NotLeader, ...).
            if r.data.get(..4) == Some(&[0, 0, 0, 0]) {
                Ok(())
            } else {
                Err("not applied (not the leader, or failed)".into())
            }
        }
        System::Etcd => {
            let _: etcd_pb::PutResponse = unary(
                ch,
                "/etcdserverpb.KV/Put",
                etcd_pb::PutRequest {
                    key: format!("bench/{op:010}").into_bytes(),
                    value: value.to_vec(),
                },
            )
            .await?;
            Ok(())
        }
    }
}

async fn connect(addr: &str) -> Result<Channel, String> {
    Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| e.to_string())
}

/// The three members of one system, as child processes of this bench.
struct Members {
    sys: System,
    dir: PathBuf,
    /// Client address of each member.
    addrs: Vec<String>,
    children: Vec<Option<Child>>,
    election: (u64, u64),
    heartbeat: u64,
}

const GANGWAY_PORTS: [u16; 3] = [14101, 14102, 14103];
const ETCD_CLIENT_PORTS: [u16; 3] = [12379, 22379, 32379];
const ETCD_PEER_PORTS: [u16; 3] = [12380, 22380, 32380];

impl Members {
    fn new(sys: System, dir: &Path) -> Members {
        let ports = match sys {
            System::Gangway => GANGWAY_PORTS,
            System::Etcd => ETCD_CLIENT_PORTS,
        };
        // Gangway's production default (what `ReplicaConfig::new` sets) unless told otherwise.
        let default = gangway_consensus::ReplicaConfig::new(1, "127.0.0.1:1", "/tmp");
        let ms = |d: Duration| d.as_millis() as u64;
        let (emin, emax) = match std::env::var("PEERS_ELECTION_MS").ok() {
            Some(v) => {
                let (a, b) = v.split_once('-').expect("PEERS_ELECTION_MS=MIN-MAX");
                (a.parse().expect("min ms"), b.parse().expect("max ms"))
            }
            None => (
                ms(default.election_timeout_min),
                ms(default.election_timeout_max),
            ),
        };
        Members {
            sys,
            dir: dir.to_owned(),
            addrs: ports.iter().map(|p| format!("127.0.0.1:{p}")).collect(),
            children: vec![None, None, None],
            election: (emin, emax),
            heartbeat: env_or("PEERS_HEARTBEAT_MS", ms(default.heartbeat_interval)),
        }
    }

    fn spawn(&mut self, i: usize, first: bool) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("member-{}.log", i + 1)))
            .expect("member log");
        let mut cmd = match self.sys {
            System::Gangway => {
                let peers = self
                    .addrs
                    .iter()
                    .enumerate()
                    .map(|(j, a)| format!("{}={a}", j + 1))
                    .collect::<Vec<_>>()
                    .join(",");
                let mut c = Command::new(std::env::current_exe().expect("own path"));
                c.arg("serve")
                    .arg((i + 1).to_string())
                    .arg(self.dir.join(format!("data-{}", i + 1)))
                    .arg(peers)
                    .arg(self.election.0.to_string())
                    .arg(self.election.1.to_string())
                    .arg(self.heartbeat.to_string());
                if first && i == 0 {
                    c.arg("init");
                }
                c
            }
            System::Etcd => {
                let name = format!("e{}", i + 1);
                let cluster = ETCD_PEER_PORTS
                    .iter()
                    .enumerate()
                    .map(|(j, p)| format!("e{}=http://127.0.0.1:{p}", j + 1))
                    .collect::<Vec<_>>()
                    .join(",");
                let data = self.dir.join(format!("data-{}", i + 1));
                let state = if data.join("member").exists() {
                    "existing"
                } else {
                    "new"
                };
                let client = format!("http://127.0.0.1:{}", ETCD_CLIENT_PORTS[i]);
                let peer = format!("http://127.0.0.1:{}", ETCD_PEER_PORTS[i]);
                let mut c = Command::new(std::env::var("ETCD").unwrap_or_else(|_| "etcd".into()));
                c.args(["--name", &name])
                    .arg("--data-dir")
                    .arg(&data)
                    .args(["--listen-client-urls", &client])
                    .args(["--advertise-client-urls", &client])
                    .args(["--listen-peer-urls", &peer])
                    .args(["--initial-advertise-peer-urls", &peer])
                    .args(["--initial-cluster", &cluster])
                    .args(["--initial-cluster-token", "gangway-peers"])
                    .args(["--initial-cluster-state", state])
                    .args(["--logger", "zap", "--log-level", "warn"]);
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} member {}: {e}", self.sys.name(), i + 1));
        self.children[i] = Some(child);
    }

    /// CPU time the running members have used so far, in microseconds.
    fn cpu_us(&self) -> u64 {
        self.children
            .iter()
            .flatten()
            .filter_map(|c| c.id())
            .map(|pid| process_cpu_us(&pid.to_string()))
            .sum()
    }

    /// kill -9 member `i` and reap it.
    async fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    /// Whether member `i` answers on its client port.
    async fn answers(&self, i: usize) -> bool {
        let Ok(ch) = connect(&self.addrs[i]).await else {
            return false;
        };
        match self.sys {
            System::Etcd => unary::<_, etcd_pb::StatusResponse>(
                &ch,
                "/etcdserverpb.Maintenance/Status",
                etcd_pb::StatusRequest {},
            )
            .await
            .is_ok(),
            // Any answer to a write (applied, or refused as a follower) means the replica serves.
            System::Gangway => unary::<_, pb::ForwardWriteReply>(
                &ch,
                "/gangway.consensus.v1.RaftTransport/ForwardWrite",
                pb::ForwardWriteRequest {
                    command: bincode::serialize(&Append {
                        key: "ping".into(),
                        op_id: u64::MAX,
                        payload: Vec::new(),
                    })
                    .unwrap(),
                },
            )
            .await
            .is_ok(),
        }
    }

    /// The member that leads now (it takes writes), waiting up to 60 s for one.
    async fn leader(&self, next_op: &AtomicU64) -> usize {
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until {
            for i in 0..3 {
                if self.children[i].is_none() {
                    continue;
                }
                let Ok(ch) = connect(&self.addrs[i]).await else {
                    continue;
                };
                match self.sys {
                    System::Gangway => {
                        let op = next_op.fetch_add(1, Ordering::Relaxed);
                        if write(self.sys, &ch, op, b"").await.is_ok() {
                            return i;
                        }
                    }
                    System::Etcd => {
                        if let Ok(s) = unary::<_, etcd_pb::StatusResponse>(
                            &ch,
                            "/etcdserverpb.Maintenance/Status",
                            etcd_pb::StatusRequest {},
                        )
                        .await
                        {
                            if s.header.map(|h| h.member_id) == Some(s.leader) && s.leader != 0 {
                                return i;
                            }
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{}: no leader within 60 s", self.sys.name());
    }

    async fn stop(&mut self) {
        for i in 0..3 {
            self.kill(i).await;
        }
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// CPU time (user + system) process `pid` (or `self`) has used so far, in microseconds; 0 when it
/// cannot be read (the process is gone).
fn process_cpu_us(pid: &str) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command (which may hold spaces) closed by the last ')': utime and stime
    // are the 12th and 13th of them, in clock ticks.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks: u64 = fields
        .get(11..13)
        .map_or(0, |f| f.iter().filter_map(|t| t.parse::<u64>().ok()).sum());
    // SAFETY: sysconf reads a constant of the running system.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ticks * 1_000_000 / per_second
}

/// `clients` writers over `clients / 16` connections (at least one) to the leader for `secs`.
async fn throughput(m: &Members, clients: usize, secs: f64, vbytes: usize, next_op: &AtomicU64) {
    let leader = m.leader(next_op).await;
    let conns = (clients / 16).max(1);
    let mut chans = Vec::new();
    for _ in 0..conns {
        chans.push(
            connect(&m.addrs[leader])
                .await
                .expect("connect to the leader"),
        );
    }
    let start_op = next_op.fetch_add(1 << 40, Ordering::Relaxed);
    let ops = Arc::new(AtomicU64::new(start_op));
    let value = Arc::new(vec![b'x'; vbytes]);
    let run_for = Duration::from_secs_f64(secs);
    let cpu_before = (m.cpu_us(), process_cpu_us("self"));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let ch = chans[c % conns].clone();
        let (ops, value, sys) = (ops.clone(), value.clone(), m.sys);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            while start.elapsed() < run_for {
                let op = ops.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                match write(sys, &ch, op, &value).await {
                    Ok(()) => lat.push(t.elapsed().as_secs_f64() * 1e3),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("client task");
        all.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    // CPU per write over the whole run (the clients' ramp included, the same for both systems):
    // the three members together, and this load generator.
    let per_write =
        |before: u64, after: u64| after.saturating_sub(before) / (all.len() as u64).max(1);
    let members_cpu = per_write(cpu_before.0, m.cpu_us());
    let generator_cpu = per_write(cpu_before.1, process_cpu_us("self"));
    all.sort_by(|a, b| a.total_cmp(b));
    println!(
        "RESULT write {} clients={clients} conns={conns} ops={} secs={elapsed:.2} tput={:.0} p50_ms={:.2} p99_ms={:.2} errors={errors} cpu_us={members_cpu} gen_cpu_us={generator_cpu} replication={}",
        m.sys.name(),
        all.len(),
        all.len() as f64 / elapsed,
        pct(&all, 0.50),
        pct(&all, 0.99),
        match m.sys {
            System::Gangway => replication().to_string(),
            _ => "-".into(),
        },
    );
}

/// kill -9 the leader, then a probe write every 5 ms to the survivors in turn (each its own
/// request, 2 s deadline) until one is accepted: kill -> completion of the first accepted write.
async fn failover(m: &mut Members, kills: usize, next_op: &Arc<AtomicU64>) {
    let mut times = Vec::new();
    for k in 0..kills {
        let leader = m.leader(next_op).await;
        let survivors: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
        let mut chans = Vec::new();
        for s in &survivors {
            chans.push(connect(&m.addrs[*s]).await.expect("connect to a survivor"));
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Duration>();
        let t0 = Instant::now();
        m.kill(leader).await;
        let mut n = 0usize;
        let took = loop {
            if let Ok(d) = rx.try_recv() {
                break d;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                panic!("{}: no write accepted within 60 s of a kill", m.sys.name());
            }
            let ch = chans[n % chans.len()].clone();
            n += 1;
            let (tx, sys) = (tx.clone(), m.sys);
            let op = next_op.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let w = tokio::time::timeout(Duration::from_secs(2), write(sys, &ch, op, b"v"));
                if let Ok(Ok(())) = w.await {
                    let _ = tx.send(t0.elapsed());
                }
            });
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        times.push(took.as_secs_f64() * 1e3);
        eprintln!(
            "  {} kill {}/{kills}: member {} -> next accepted write {:.0} ms",
            m.sys.name(),
            k + 1,
            leader + 1,
            took.as_secs_f64() * 1e3
        );
        // Restart the killed member and let it catch up before the next kill.
        m.spawn(leader, false);
        let until = Instant::now() + Duration::from_secs(60);
        while !m.answers(leader).await {
            assert!(
                Instant::now() < until,
                "member {} did not come back",
                leader + 1
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    times.sort_by(|a, b| a.total_cmp(b));
    // When a follower may first campaign after the last heartbeat it saw. etcd (defaults, not
    // changed here): election timeout 1000 ms, randomised over 1000-2000 ms, votes refused for
    // 1000 ms (check-quorum lease). openraft: the leader's lease (election_timeout_max) plus the
    // randomised timeout, so MIN-MAX campaigns at MAX+MIN .. 2*MAX.
    let election = match m.sys {
        System::Etcd => (1000, 2000),
        System::Gangway => (m.election.1 + m.election.0, 2 * m.election.1),
    };
    println!(
        "RESULT failover {} kills={} p50_ms={:.0} p99_ms={:.0} max_ms={:.0} campaign_ms={}-{} timeout_ms={} detect={}",
        m.sys.name(),
        times.len(),
        pct(&times, 0.50),
        pct(&times, 0.99),
        times.last().copied().unwrap_or(f64::NAN),
        election.0,
        election.1,
        match m.sys {
            System::Etcd => "1000".to_owned(),
            System::Gangway => format!("{}-{}", m.election.0, m.election.1),
        },
        match m.sys {
            System::Etcd => "-",
            System::Gangway if detection() => "on",
            System::Gangway => "off",
        },
    );
}

/// How Gangway's leader replicates (`PEERS_REPLICATION`, default as in production); the members
/// inherit it from the bench's environment.
fn replication() -> Replication {
    match std::env::var("PEERS_REPLICATION") {
        Err(_) => Replication::default(),
        Ok(v) => v
            .parse()
            .unwrap_or_else(|e| panic!("PEERS_REPLICATION: {e}")),
    }
}

/// Whether Gangway's replicas detect a dead leader's process (`PEERS_DETECT=on|off`, default on as
/// in production); the members inherit it from the bench's environment.
fn detection() -> bool {
    match std::env::var("PEERS_DETECT").as_deref() {
        Ok("off") => false,
        Ok("on") | Err(_) => true,
        Ok(other) => panic!("PEERS_DETECT: expected on or off, got {other:?}"),
    }
}

async fn run(sys: System, dir: &Path) {
    let clients: Vec<usize> = std::env::var("PEERS_CLIENTS")
        .unwrap_or_else(|_| "1,16,64,256".into())
        .split(',')
        .filter(|c| !c.trim().is_empty())
        .map(|c| c.trim().parse().expect("PEERS_CLIENTS: numbers"))
        .collect();
    let secs: f64 = env_or("PEERS_WRITE_SECS", 10.0);
    let vbytes: usize = env_or("PEERS_VALUE_BYTES", 256);
    let kills: usize = env_or("PEERS_KILLS", 20);
    std::fs::create_dir_all(dir).expect("bench dir");
    let mut m = Members::new(sys, dir);
    for i in 0..3 {
        m.spawn(i, true);
    }
    let next_op = Arc::new(AtomicU64::new(0));
    m.leader(&next_op).await;
    eprintln!("{}: 3 members up", sys.name());
    for c in clients {
        throughput(&m, c, secs, vbytes, &next_op).await;
    }
    if kills > 0 {
        failover(&mut m, kills, &next_op).await;
    }
    m.stop().await;
}

/// One Gangway replica until killed.
async fn serve(args: &[String]) {
    // Into DIR/member-N.log (see the header's GANGWAY_LOG).
    common::init_tracing();
    let id: u64 = args[0].parse().expect("id");
    let dir = PathBuf::from(&args[1]);
    let peers: BTreeMap<u64, String> = args[2]
        .split(',')
        .map(|p| {
            let (i, a) = p.split_once('=').expect("ID=ADDR");
            (i.parse().expect("id"), a.to_owned())
        })
        .collect();
    let ms = |s: &String| Duration::from_millis(s.parse().expect("milliseconds"));
    let mut cfg = ReplicaConfig::new(id, peers[&id].clone(), &dir);
    cfg.election_timeout_min = ms(&args[3]);
    cfg.election_timeout_max = ms(&args[4]);
    cfg.heartbeat_interval = ms(&args[5]);
    cfg.snapshot_every_entries = 100_000;
    cfg.keep_entries_after_snapshot = 5_000;
    cfg.leader_loss_detection = detection();
    cfg.replication = replication();
    let h = ReplicaHandle::start(cfg, Kv::default(), Transport::tcp())
        .await
        .expect("start replica");
    h.serve(common::bind_addr(&peers[&id]).await);
    if args.get(6).map(String::as_str) == Some("init") {
        h.initialize(peers).await.expect("initialize");
    }
    std::future::pending::<()>().await;
}

fn main() {
    // `cargo bench` appends --bench; the rest are ours.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match args.first().map(String::as_str) {
        Some("serve") => rt.block_on(serve(&args[1..])),
        Some("run") if args.len() == 3 => {
            let sys = match args[1].as_str() {
                "gangway" => System::Gangway,
                "etcd" => System::Etcd,
                other => panic!("unknown system {other}: gangway or etcd"),
            };
            rt.block_on(run(sys, Path::new(&args[2])));
        }
        _ => {
            eprintln!("usage: peers_raft run gangway|etcd DIR   (see the file's header)");
            std::process::exit(2);
        }
    }
}
