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

use crate::common::worker::{signal, WorkerProcess as Host};
use crate::common::{client, TestCluster};
use gangway_proto::pb;
use rand::rngs::StdRng;
use rand::Rng;
use std::time::Duration;

/// The processes of one schedule.
pub struct World {
    pub cluster: TestCluster,
    pub hosts: Vec<Host>,
}

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
        }
    }

    /// The process (or host) it hits; two faults of one step never share one.
    fn target(&self) -> String {
        match self {
            Fault::KillReplica(id) | Fault::PauseReplica(id) => format!("replica {id}"),
            Fault::KillAgent(h) | Fault::PauseAgent(h) | Fault::CrashHost(h) => {
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
        }
    }
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
            0..20 => (Fault::KillReplica(replica), ms(rng, 300, 3000)),
            20..35 => (Fault::PauseReplica(replica), ms(rng, 300, 3000)),
            35..50 => (Fault::KillAgent(host), ms(rng, 300, 4000)),
            // Past the node TTL (3 s) about half the time: the node is declared down.
            50..68 => (Fault::PauseAgent(host), ms(rng, 500, 5500)),
            68..80 => (Fault::CrashHost(host), ms(rng, 500, 4000)),
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
