//! Shared by the cluster tests and the benchmark: a toy key-value state machine and a harness that
//! runs N replicas in one process, each on its own loopback gRPC server, with injected faults.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gangway_consensus::ApplyContext;
use gangway_consensus::ConsensusError;
use gangway_consensus::FaultInjector;
use gangway_consensus::NodeId;
use gangway_consensus::ReplicaConfig;
use gangway_consensus::ReplicaHandle;
use gangway_consensus::Replication;
use gangway_consensus::Role;
use gangway_consensus::StateMachine;
use gangway_consensus::Transport;
use serde::Deserialize;
use serde::Serialize;

/// Append `op_id` to `key`. Op ids are unique per test, so the state shows any duplicate
/// application: an op id that appears twice was applied twice.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Append {
    pub key: String,
    pub op_id: u64,
    /// Opaque bytes (the writes bench's value), encoded as one slice.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendResult {
    pub index: u64,
    pub time_ms: u64,
    /// Length of the key's list after the append.
    pub len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub key: String,
    pub op_id: u64,
}

/// The toy state machine. Also checks the crate's promises about the apply context.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kv {
    pub data: BTreeMap<String, Vec<u64>>,
    pub payload_bytes: u64,
    pub last_index: u64,
    pub last_time_ms: u64,
    /// Violations seen by `apply` (index not increasing, time going backwards).
    pub violations: Vec<String>,
}

impl Kv {
    /// Every op id with the number of times it was applied.
    pub fn op_counts(&self) -> BTreeMap<u64, usize> {
        let mut m = BTreeMap::new();
        for ops in self.data.values() {
            for op in ops {
                *m.entry(*op).or_insert(0) += 1;
            }
        }
        m
    }

    pub fn ops(&self) -> BTreeSet<u64> {
        self.op_counts().into_keys().collect()
    }
}

impl StateMachine for Kv {
    type Command = Append;
    type Response = AppendResult;
    type Event = Appended;

    fn apply(
        &mut self,
        ctx: &ApplyContext,
        cmd: Append,
        events: &mut Vec<Appended>,
    ) -> AppendResult {
        if ctx.index <= self.last_index {
            self.violations
                .push(format!("index {} after {}", ctx.index, self.last_index));
        }
        if ctx.time_ms < self.last_time_ms {
            self.violations
                .push(format!("time {} after {}", ctx.time_ms, self.last_time_ms));
        }
        self.last_index = ctx.index;
        self.last_time_ms = ctx.time_ms;
        self.payload_bytes += cmd.payload.len() as u64;
        let list = self.data.entry(cmd.key.clone()).or_default();
        list.push(cmd.op_id);
        let len = list.len();
        events.push(Appended {
            key: cmd.key,
            op_id: cmd.op_id,
        });
        AppendResult {
            index: ctx.index,
            time_ms: ctx.time_ms,
            len,
        }
    }

    fn snapshot(&self) -> Result<Vec<u8>, gangway_consensus::AppError> {
        Ok(serde_json::to_vec(self)?)
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), gangway_consensus::AppError> {
        *self = serde_json::from_slice(snapshot)?;
        Ok(())
    }
}

pub fn append(key: &str, op_id: u64) -> Append {
    Append {
        key: key.to_string(),
        op_id,
        payload: Vec::new(),
    }
}

/// Timing knobs for a test cluster.
#[derive(Debug, Clone)]
pub struct Timing {
    pub heartbeat: Duration,
    pub election_min: Duration,
    pub election_max: Duration,
    pub rpc_timeout: Duration,
    pub write_timeout: Duration,
    pub snapshot_every: u64,
    pub keep_after_snapshot: u64,
    /// How leaders replicate (and so which way followers take the stream).
    pub replication: Replication,
}

impl Default for Timing {
    /// Short timeouts so elections take a fraction of a second even in a debug build.
    fn default() -> Self {
        Timing {
            heartbeat: Duration::from_millis(50),
            election_min: Duration::from_millis(250),
            election_max: Duration::from_millis(500),
            rpc_timeout: Duration::from_millis(500),
            write_timeout: Duration::from_secs(5),
            snapshot_every: 100_000,
            keep_after_snapshot: 1_000,
            replication: Replication::default(),
        }
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub faults: Arc<FaultInjector>,
    pub timing: Timing,
    pub addrs: BTreeMap<NodeId, String>,
    pub nodes: BTreeMap<NodeId, ReplicaHandle<Kv>>,
}

/// Bind a loopback listener on an OS-chosen port.
pub async fn bind_any() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback")
}

pub async fn bind_addr(addr: &str) -> tokio::net::TcpListener {
    // A restarted replica reuses its address; the old socket may linger for a moment.
    for _ in 0..100 {
        if let Ok(l) = tokio::net::TcpListener::bind(addr).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("cannot rebind {addr}");
}

impl Cluster {
    /// Start `voters` replicas (ids 1..=voters) and bootstrap them as one cluster; also reserve
    /// addresses for `spare` more replicas (ids after the voters) that tests may start later.
    pub async fn start(voters: u64, spare: u64, seed: u64, timing: Timing) -> Cluster {
        let (mut c, mut listeners) = Self::reserve(voters + spare, seed, timing).await;
        for id in 1..=voters {
            let l = listeners.remove(&id).unwrap();
            c.start_with_listener(id, l).await;
        }
        let members: BTreeMap<NodeId, String> =
            (1..=voters).map(|id| (id, c.addrs[&id].clone())).collect();
        c.nodes[&1].initialize(members).await.expect("initialize");
        c
    }

    /// Addresses for replicas 1..=n, none started (each bound now; its listener handed back).
    pub async fn reserve(
        n: u64,
        seed: u64,
        timing: Timing,
    ) -> (Cluster, BTreeMap<NodeId, tokio::net::TcpListener>) {
        let mut c = Cluster {
            dir: tempfile::tempdir().expect("tempdir"),
            faults: Arc::new(FaultInjector::new(seed)),
            timing,
            addrs: BTreeMap::new(),
            nodes: BTreeMap::new(),
        };
        let mut listeners = BTreeMap::new();
        for id in 1..=n {
            let l = bind_any().await;
            c.addrs.insert(id, l.local_addr().unwrap().to_string());
            listeners.insert(id, l);
        }
        (c, listeners)
    }

    pub fn data_dir(&self, id: NodeId) -> PathBuf {
        self.dir.path().join(format!("node-{id}"))
    }

    pub fn config(&self, id: NodeId) -> ReplicaConfig {
        let mut cfg = ReplicaConfig::new(id, self.addrs[&id].clone(), self.data_dir(id));
        cfg.heartbeat_interval = self.timing.heartbeat;
        cfg.election_timeout_min = self.timing.election_min;
        cfg.election_timeout_max = self.timing.election_max;
        cfg.rpc_timeout = self.timing.rpc_timeout;
        cfg.write_timeout = self.timing.write_timeout;
        cfg.snapshot_every_entries = self.timing.snapshot_every;
        cfg.keep_entries_after_snapshot = self.timing.keep_after_snapshot;
        cfg.snapshot_chunk_bytes = 4096;
        cfg.replication = self.timing.replication;
        cfg
    }

    async fn start_with_listener(&mut self, id: NodeId, l: tokio::net::TcpListener) {
        let transport = Transport::tcp().with_faults(self.faults.clone());
        let h = ReplicaHandle::start(self.config(id), Kv::default(), transport)
            .await
            .expect("start replica");
        h.serve(l);
        self.nodes.insert(id, h);
    }

    /// (Re)start replica `id` from its data directory on its address.
    pub async fn start_node(&mut self, id: NodeId) {
        assert!(
            !self.nodes.contains_key(&id),
            "replica {id} is already running"
        );
        let l = bind_addr(&self.addrs[&id]).await;
        self.start_with_listener(id, l).await;
    }

    /// Stop replica `id` (Raft and its server); its data directory stays.
    pub async fn kill(&mut self, id: NodeId) {
        let h = self.nodes.remove(&id).expect("replica running");
        h.shutdown().await.expect("shutdown");
    }

    pub fn node(&self, id: NodeId) -> &ReplicaHandle<Kv> {
        &self.nodes[&id]
    }

    pub fn live(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    /// Wait until exactly one live replica among `among` is leader with the highest term and every
    /// other one of them agrees; returns it.
    pub async fn leader_among(&self, among: &[NodeId], timeout: Duration) -> NodeId {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ms: Vec<_> = among
                .iter()
                .filter_map(|id| self.nodes.get(id))
                .map(|h| h.metrics())
                .collect();
            let leaders: Vec<_> = ms.iter().filter(|m| m.role == Role::Leader).collect();
            if let Some(l) = leaders.iter().max_by_key(|m| m.term) {
                if ms.iter().all(|m| m.leader == Some(l.id)) {
                    return l.id;
                }
            }
            if tokio::time::Instant::now() > deadline {
                panic!("no agreed leader among {among:?} within {timeout:?}: {ms:#?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn leader(&self) -> NodeId {
        let live = self.live();
        self.leader_among(&live, Duration::from_secs(10)).await
    }

    /// Wait until every live replica has applied at least the leader's last log index, and return
    /// their states (in id order).
    pub async fn converge(&self, timeout: Duration) -> BTreeMap<NodeId, Kv> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let target = self
                .nodes
                .values()
                .filter_map(|h| h.metrics().last_log_index)
                .max()
                .unwrap_or(0);
            let all = self
                .nodes
                .values()
                .all(|h| h.metrics().applied_index.unwrap_or(0) >= target);
            if all {
                let states: BTreeMap<_, _> = self
                    .nodes
                    .iter()
                    .map(|(id, h)| (*id, h.read_local(|kv| kv.clone())))
                    .collect();
                let first = states.values().next().unwrap();
                if states.values().all(|s| s.data == first.data) {
                    return states;
                }
            }
            if tokio::time::Instant::now() > deadline {
                let ms: Vec<_> = self.nodes.values().map(|h| h.metrics()).collect();
                panic!("replicas did not converge within {timeout:?}: {ms:#?}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Write through replica `via`, which forwards to the leader if needed.
    pub async fn write(
        &self,
        via: NodeId,
        key: &str,
        op_id: u64,
    ) -> Result<AppendResult, ConsensusError> {
        self.node(via).write(append(key, op_id)).await
    }

    /// Write through any live replica, retrying while no leader is reachable (only definite
    /// non-proposals are retried by `write` itself, so this never duplicates).
    pub async fn write_ok(&self, key: &str, op_id: u64) -> AppendResult {
        let via = *self.nodes.keys().next().expect("a live replica");
        self.write(via, key, op_id)
            .await
            .unwrap_or_else(|e| panic!("write {op_id} via {via} failed: {e}"))
    }

    pub async fn shutdown(mut self) {
        for id in self.live() {
            self.kill(id).await;
        }
    }
}

/// Leaders replicating on one stream per follower with `in_flight` requests awaiting replies.
pub fn stream_of(in_flight: u32) -> Replication {
    Replication::Stream {
        in_flight: std::num::NonZeroU32::new(in_flight).expect("at least one in flight"),
    }
}

/// Assert no op was applied twice and every acknowledged op is present, on every replica.
pub fn check_history(states: &BTreeMap<NodeId, Kv>, acked: &BTreeSet<u64>) {
    for (id, kv) in states {
        assert!(
            kv.violations.is_empty(),
            "replica {id} saw apply-context violations: {:?}",
            kv.violations
        );
        for (op, n) in kv.op_counts() {
            assert_eq!(n, 1, "replica {id} applied op {op} {n} times");
        }
        let ops = kv.ops();
        let lost: Vec<_> = acked.difference(&ops).collect();
        assert!(
            lost.is_empty(),
            "replica {id} lost acknowledged ops {lost:?}"
        );
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GANGWAY_LOG")
                .unwrap_or_else(|_| "warn,openraft=error".into()),
        )
        .with_test_writer()
        .try_init();
}

/// This process's TCP connections whose local end is one of `servers` (connections a replica
/// accepted), each with whether `TCP_NODELAY` is set. Read from /proc/self/fd.
pub fn accepted_connections(servers: &[std::net::SocketAddr]) -> Vec<(std::net::SocketAddr, bool)> {
    use std::os::fd::{BorrowedFd, RawFd};
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .flatten()
    {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<RawFd>() else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // SAFETY: the descriptor is only duplicated; if it was closed meanwhile, dup fails.
        let Ok(owned) = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned() else {
            continue;
        };
        let s = std::net::TcpStream::from(owned);
        // A listener has no peer: only accepted (and dialed) connections have both ends.
        if let (Ok(local), Ok(_peer)) = (s.local_addr(), s.peer_addr()) {
            if servers.contains(&local) {
                out.push((local, s.nodelay().expect("getsockopt TCP_NODELAY")));
            }
        }
    }
    out
}
