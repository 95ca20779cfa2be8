//! Seeded random fault schedules against a 5-replica cluster with concurrent clients.
//!
//! Reproduce a failure with the seed printed in the test output:
//! `GANGWAY_SEED=<seed> cargo test -p gangway-consensus --test cluster random_fault_schedule -- --nocapture`
//! Run longer with `GANGWAY_FAULT_STEPS=<n>` (default 12).

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use gangway_consensus::ConsensusError;
use gangway_consensus::NodeId;
use gangway_consensus::ReplicaHandle;
use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::common::*;
use crate::serial;

/// What one client write ended as.
#[derive(Debug, Default)]
struct History {
    /// Acknowledged: must be applied exactly once everywhere.
    acked: BTreeSet<u64>,
    /// Definitely not proposed (NotLeader / no reachable leader): must never be applied.
    rejected: BTreeSet<u64>,
    /// Outcome unknown (timeout, lost reply, leader change): may be applied, at most once.
    unknown: BTreeSet<u64>,
}

/// Prints the reproduce line if the test panics, whatever assertion fired.
struct SeedGuard(u64);

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "random fault schedule failed; reproduce with:\n  GANGWAY_SEED={} cargo test -p gangway-consensus --test cluster random_fault_schedule -- --nocapture",
                self.0
            );
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

type Live = Arc<Mutex<BTreeMap<NodeId, ReplicaHandle<Kv>>>>;

fn publish(c: &Cluster, live: &Live) {
    *live.lock().unwrap() = c.nodes.clone();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_fault_schedule_loses_and_duplicates_nothing() {
    let _g = serial().await;
    let seed = env_u64("GANGWAY_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let steps = env_u64("GANGWAY_FAULT_STEPS").unwrap_or(12);
    println!("random fault schedule: GANGWAY_SEED={seed} GANGWAY_FAULT_STEPS={steps}");
    let _guard = SeedGuard(seed);
    // A schedule that wedges the cluster (or a client) must fail with its seed, not hang CI.
    let limit = Duration::from_secs(60 + 15 * steps);
    if tokio::time::timeout(limit, schedule(seed, steps))
        .await
        .is_err()
    {
        panic!("the schedule did not finish within {limit:?}: something hung");
    }
}

async fn schedule(seed: u64, steps: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);

    // Half the schedules replicate with one request in flight (the follower answers each before
    // reading the next), half with four (openraft's pipelined follower side).
    let replication = stream_of(if rng.random_bool(0.5) { 1 } else { 4 });
    println!("replication {replication}");
    let timing = Timing {
        write_timeout: Duration::from_secs(2),
        replication,
        ..Timing::default()
    };
    let mut c = Cluster::start(5, 0, seed, timing).await;
    c.leader().await;
    let all: Vec<NodeId> = (1..=5).collect();
    let live: Live = Arc::new(Mutex::new(BTreeMap::new()));
    publish(&c, &live);

    // Clients: each writes unique op ids through a random live replica and records the outcome.
    let stop = Arc::new(AtomicBool::new(false));
    let next_op = Arc::new(AtomicU64::new(0));
    let history = Arc::new(Mutex::new(History::default()));
    let mut clients = Vec::new();
    for client in 0..3u64 {
        let (live, stop, next_op, history) =
            (live.clone(), stop.clone(), next_op.clone(), history.clone());
        let mut crng = ChaCha8Rng::seed_from_u64(seed ^ (client + 1).wrapping_mul(0x9E37_79B9));
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let op = next_op.fetch_add(1, Ordering::Relaxed);
                let h = {
                    let l = live.lock().unwrap();
                    if l.is_empty() {
                        None
                    } else {
                        let i = crng.random_range(0..l.len());
                        l.values().nth(i).cloned()
                    }
                };
                let Some(h) = h else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let key = format!("k{}", op % 4);
                let r = h.write(append(&key, op)).await;
                {
                    let mut hist = history.lock().unwrap();
                    match r {
                        Ok(_) => {
                            hist.acked.insert(op);
                        }
                        Err(ConsensusError::NotLeader { .. }) => {
                            hist.rejected.insert(op);
                        }
                        Err(ConsensusError::Unavailable(m)) if m.contains("not proposed") => {
                            hist.rejected.insert(op);
                        }
                        Err(_) => {
                            hist.unknown.insert(op);
                        }
                    }
                }
                if r_is_err_sleep(&mut crng) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }));
    }

    // The nemesis: one random fault per step, then let the cluster run with it for a while.
    for step in 0..steps {
        let dead: Vec<NodeId> = all
            .iter()
            .copied()
            .filter(|id| !c.nodes.contains_key(id))
            .collect();
        let action = rng.random_range(0..7u32);
        match action {
            0 if dead.len() < 2 => {
                let live_ids = c.live();
                let victim = live_ids[rng.random_range(0..live_ids.len())];
                println!("step {step}: kill {victim}");
                c.kill(victim).await;
            }
            1 if !dead.is_empty() => {
                let back = dead[rng.random_range(0..dead.len())];
                println!("step {step}: restart {back}");
                c.start_node(back).await;
            }
            2 => {
                let mut ids = all.clone();
                let cut = rng.random_range(1..=2usize);
                let mut minority = Vec::new();
                for _ in 0..cut {
                    let i = rng.random_range(0..ids.len());
                    minority.push(ids.remove(i));
                }
                println!("step {step}: partition {minority:?} | {ids:?}");
                c.faults.heal();
                c.faults.partition(&minority, &ids);
            }
            3 => {
                let a = all[rng.random_range(0..all.len())];
                let b = all[rng.random_range(0..all.len())];
                if a != b {
                    println!("step {step}: one-way block {a}->{b}");
                    c.faults.block_one_way(a, b);
                }
            }
            4 => {
                let p = rng.random_range(0.05..0.3);
                println!("step {step}: drop rate {p:.2}");
                c.faults.set_drop_rate(p);
            }
            5 => {
                let d = Duration::from_millis(rng.random_range(1..20));
                println!("step {step}: delay {d:?}");
                c.faults.set_delay(d);
            }
            _ => {
                println!("step {step}: heal");
                c.faults.heal();
            }
        }
        publish(&c, &live);
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..700))).await;
    }

    // Heal everything, bring every replica back, stop the clients, and wait for convergence.
    println!("final: heal and restart all");
    c.faults.heal();
    for id in all.iter().copied() {
        if !c.nodes.contains_key(&id) {
            c.start_node(id).await;
        }
    }
    publish(&c, &live);
    // Progress after healing: a write must succeed.
    let probe = next_op.fetch_add(1, Ordering::Relaxed);
    c.leader().await;
    c.write_ok("probe", probe).await;
    stop.store(true, Ordering::Relaxed);
    for cl in clients {
        cl.await.unwrap();
    }
    let states = c.converge(Duration::from_secs(20)).await;

    let hist = std::mem::take(&mut *history.lock().unwrap());
    let mut acked = hist.acked.clone();
    acked.insert(probe);
    println!(
        "history: {} acked, {} rejected, {} unknown",
        acked.len(),
        hist.rejected.len(),
        hist.unknown.len()
    );
    check_history(&states, &acked);
    for (id, kv) in &states {
        let resurrected: Vec<_> = kv.ops().intersection(&hist.rejected).copied().collect();
        assert!(
            resurrected.is_empty(),
            "replica {id} applied writes reported as not proposed: {resurrected:?}"
        );
    }
    c.shutdown().await;
}

fn r_is_err_sleep(rng: &mut ChaCha8Rng) -> bool {
    rng.random_bool(0.5)
}
