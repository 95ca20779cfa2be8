//! The nemesis: seeded random faults against the real processes, and their healing.
//!
//! Replicas are killed (SIGKILL, restarted later on the same data directory) or paused
//! (SIGSTOP/SIGCONT). Hosts lose their agent alone (SIGKILL; the tasks run on under their shims
//! and the restarted agent re-adopts them), have it paused (SIGSTOP: a worker cut off from the
//! scheduler; past the node TTL its node is declared down and its gangs re-queued, while its
//! shims stop the tasks by the lease deadline), or crash whole (agent, shims and tasks SIGKILLed
//! together, agent restarted later). Replicas are also partitioned through the drill RPC
//! (`allow_drills`): one replica loses its Raft links to every other member or to one of them,
//! while clients and workers still reach it; half the time it is the leader that is cut off.
//! Devices fail: a fatal XID (79, fallen off the bus) or a lost device is written to a host's
//! fake fault file (`--fake-fault-file`); the agent reports it failed and the scheduler fences
//! it and repairs the gang on it. The heal resets the device (`clear`) and, once the agent has
//! reported it healthy again (or after 3 s), an operator returns it to service
//! (SetDeviceFence fenced=false): a device fenced for its health otherwise stays out until its
//! health check passes three times, and these hosts run none.

use crate::api::Api;
use crate::common::worker::{signal, WorkerProcess as Host};
use crate::common::{client, TestCluster};
use gangway_proto::pb;
use rand::rngs::StdRng;
use rand::Rng;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The processes of one schedule.
pub struct World {
    pub cluster: TestCluster,
    pub hosts: Vec<Host>,
    /// Each host's fake fault file, by host index.
    pub fault_files: Vec<PathBuf>,
    pub api: Arc<Api>,
}

/// Devices per host (`--fake-devices 4xH100`).
pub const DEVICES_PER_HOST: u32 = 4;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    KillReplica(u64),
    PauseReplica(u64),
    KillAgent(usize),
    PauseAgent(usize),
    CrashHost(usize),
    /// Raft traffic between `replica` (None: whichever replica leads when the fault begins) and
    /// `peers` (empty: every other member) is dropped.
    Partition {
        replica: Option<u64>,
        peers: Vec<u64>,
    },
    /// Device `device` of host `host` fails: a fatal XID 79, or (`lost`) it falls off the bus.
    FailDevice {
        host: usize,
        device: u32,
        lost: bool,
    },
}

impl Fault {
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::KillReplica(_) => "kill-replica",
            Fault::PauseReplica(_) => "pause-replica",
            Fault::KillAgent(_) => "kill-agent",
            Fault::PauseAgent(_) => "pause-agent",
            Fault::CrashHost(_) => "crash-host",
            Fault::Partition { .. } => "partition",
            Fault::FailDevice { lost: false, .. } => "device-xid",
            Fault::FailDevice { lost: true, .. } => "device-lost",
        }
    }

    /// The process (or host) it hits; two faults of one step never share one.
    fn target(&self) -> String {
        match self {
            Fault::KillReplica(id) | Fault::PauseReplica(id) => format!("replica {id}"),
            Fault::KillAgent(h)
            | Fault::PauseAgent(h)
            | Fault::CrashHost(h)
            | Fault::FailDevice { host: h, .. } => {
                format!("host h{}", h + 1)
            }
            Fault::Partition {
                replica: Some(id), ..
            } => format!("replica {id}"),
            Fault::Partition { replica: None, .. } => "the leader".into(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Fault::Partition { peers, .. } if !peers.is_empty() => {
                format!("partition {} from replicas {peers:?}", self.target())
            }
            Fault::FailDevice { device, .. } => {
                format!("{} {} device {device}", self.kind(), self.target())
            }
            _ => format!("{} {}", self.kind(), self.target()),
        }
    }

    /// Starts the fault; false when it could not be (a drill the replica did not answer: the
    /// step goes on without it).
    pub async fn apply(&mut self, w: &mut World, lasts: Duration) -> bool {
        match *self {
            Fault::KillReplica(id) => w.cluster.kill(id),
            Fault::PauseReplica(id) => {
                if let Some(pid) = w.cluster.replica(id).pid() {
                    signal(pid, "STOP");
                }
            }
            Fault::KillAgent(h) => w.hosts[h].kill_agent(),
            Fault::PauseAgent(h) => {
                if let Some(pid) = w.hosts[h].pid() {
                    signal(pid, "STOP");
                }
            }
            Fault::CrashHost(h) => w.hosts[h].crash(),
            Fault::FailDevice { host, device, lost } => {
                let line = if lost {
                    format!("lost {device}")
                } else {
                    format!("xid {device} 79")
                };
                append_fault(w, host, &line);
            }
            Fault::Partition {
                ref mut replica,
                ref peers,
            } => {
                if replica.is_none() {
                    *replica = leader(w).await;
                }
                let Some(id) = *replica else {
                    return false;
                };
                // The partition heals by itself a little after the step would heal it, in case
                // the heal is lost.
                let ms = lasts.as_millis() as u64 + 2000;
                // A replica cannot be cut off from itself: then from the next one.
                let peers: Vec<u64> = peers
                    .iter()
                    .map(|&p| {
                        if p == id {
                            id % w.cluster.replicas.len() as u64 + 1
                        } else {
                            p
                        }
                    })
                    .collect();
                return drill(w, id, pb::DrillAction::Partition, ms, peers).await;
            }
        }
        true
    }

    pub async fn heal(&self, w: &mut World) {
        match *self {
            Fault::KillReplica(id) => w.cluster.start_replica(id),
            Fault::PauseReplica(id) => {
                if let Some(pid) = w.cluster.replica(id).pid() {
                    signal(pid, "CONT");
                }
            }
            Fault::KillAgent(h) | Fault::CrashHost(h) => w.hosts[h].start(),
            Fault::PauseAgent(h) => {
                if let Some(pid) = w.hosts[h].pid() {
                    signal(pid, "CONT");
                }
            }
            Fault::Partition {
                replica: Some(id), ..
            } => {
                drill(w, id, pb::DrillAction::Heal, 0, Vec::new()).await;
            }
            Fault::Partition { replica: None, .. } => {}
            Fault::FailDevice { host, device, .. } => {
                append_fault(w, host, &format!("clear {device}"));
                return_device(w, host, device).await;
            }
        }
    }
}

/// Appends one line to host `host`'s fault file, as an operator's `echo ... >>` would.
fn append_fault(w: &World, host: usize, line: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&w.fault_files[host])
        .expect("open the fault file");
    writeln!(f, "{line}").expect("write the fault file");
}

/// After a reset: waits (at most 3 s) until the leader no longer lists the device as failed
/// (the agent reported it healthy, or never reported the fault), then returns it to service as
/// an operator would, if it is fenced. Best effort: what stays fenced is unfenced again before the
/// cluster must converge (see [`unfence_all`]).
async fn return_device(w: &World, host: usize, device: u32) {
    let name = &w.hosts[host].name;
    let until = Instant::now() + Duration::from_secs(3);
    let mut fenced = true;
    while Instant::now() < until {
        if let Some(nodes) = w.api.nodes().await {
            let d = nodes
                .iter()
                .find(|n| &n.name == name)
                .and_then(|n| n.device_conditions.iter().find(|d| d.index == device));
            fenced = d.is_some_and(|d| d.fenced);
            if d.is_none_or(|d| d.health != "failed") {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if fenced {
        unfence(w, name, device).await;
    }
}

/// An operator's SetDeviceFence fenced=false, through any replica; retried a few times.
async fn unfence(w: &World, node: &str, device: u32) {
    for i in 0..3 {
        let addr = &w.api.addrs[i % w.api.addrs.len()];
        if w.api.set_fence(addr, node, device, false).await {
            return;
        }
    }
}

/// Returns every fenced device to service (an operator's unfence); how many it unfenced.
pub async fn unfence_all(w: &World) -> usize {
    let Some(nodes) = w.api.nodes().await else {
        return 0;
    };
    let mut n = 0;
    for node in &nodes {
        for d in node.device_conditions.iter().filter(|d| d.fenced) {
            unfence(w, &node.name, d.index).await;
            n += 1;
        }
    }
    n
}

/// The replica that says it leads, if one does.
async fn leader(w: &World) -> Option<u64> {
    for r in &w.cluster.replicas {
        if let Some(s) = crate::common::status(&r.grpc).await {
            if s.role == "leader" {
                return Some(s.replica_id);
            }
        }
    }
    None
}

/// Sends one drill to replica `id`; whether it was carried out.
async fn drill(w: &World, id: u64, action: pb::DrillAction, ms: u64, peers: Vec<u64>) -> bool {
    let call = async {
        let mut c = client(&w.cluster.addr(id)).await?;
        c.drill(pb::DrillRequest {
            action: action as i32,
            duration_ms: ms,
            peers,
        })
        .await
        .ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), call).await,
        Ok(Some(_))
    )
}

/// A device of host `host` fails (XID 79, or lost 40% of the time) for 1 to 4 s: long enough
/// for the agent's readings (one per heartbeat) to see it.
pub fn device_fault(rng: &mut StdRng, host: usize) -> (Fault, Duration) {
    let fault = Fault::FailDevice {
        host,
        device: rng.random_range(0..DEVICES_PER_HOST),
        lost: rng.random_bool(0.4),
    };
    (fault, Duration::from_millis(rng.random_range(1000..4000)))
}

/// One step's faults and how long each lasts: usually one, sometimes two at once (two replicas
/// at once is a lost quorum: nothing commits until one comes back).
pub fn plan_step(rng: &mut StdRng, replicas: u64, hosts: usize) -> Vec<(Fault, Duration)> {
    let count = if rng.random_bool(0.3) { 2 } else { 1 };
    let mut out: Vec<(Fault, Duration)> = Vec::new();
    while out.len() < count {
        let replica = rng.random_range(1..=replicas);
        let host = rng.random_range(0..hosts);
        let ms =
            |rng: &mut StdRng, lo: u64, hi: u64| Duration::from_millis(rng.random_range(lo..hi));
        let (fault, lasts) = match rng.random_range(0..100) {
            0..17 => (Fault::KillReplica(replica), ms(rng, 300, 3000)),
            17..30 => (Fault::PauseReplica(replica), ms(rng, 300, 3000)),
            30..43 => (Fault::KillAgent(host), ms(rng, 300, 4000)),
            // Past the node TTL (3 s) about half the time: the node is declared down.
            43..59 => (Fault::PauseAgent(host), ms(rng, 500, 5500)),
            59..70 => (Fault::CrashHost(host), ms(rng, 500, 4000)),
            70..84 => device_fault(rng, host),
            _ => {
                let leader = rng.random_bool(0.5);
                let peers = if rng.random_bool(0.6) {
                    Vec::new()
                } else {
                    vec![rng.random_range(1..=replicas)]
                };
                let fault = Fault::Partition {
                    replica: (!leader).then_some(replica),
                    peers,
                };
                (fault, ms(rng, 500, 4000))
            }
        };
        if out.iter().all(|(f, _)| f.target() != fault.target()) {
            out.push((fault, lasts));
        }
    }
    out
}
