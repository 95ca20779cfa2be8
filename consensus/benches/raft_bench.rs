//! Raft throughput, latency and failover benchmark (prints numbers; not a test).
//!
//! `cargo bench -p gangway-consensus --bench raft_bench`
//! Quick mode (shorter runs, 5 kills): `GANGWAY_BENCH_QUICK=1 cargo bench -p gangway-consensus --bench raft_bench`
//!
//! Setup: 3 replicas in one process, each with its own loopback gRPC server and RocksDB in a temp
//! dir (fsync on). Clients call `ReplicaHandle::write` on the leader in-process (no client gRPC
//! hop); replication between replicas is real gRPC. Commands are 256-byte payloads.
//! Bench timing: heartbeat 50 ms, election timeout 150-300 ms (the production default is
//! 750-1500 ms; failover time scales with it).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use common::*;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn bench_timing() -> Timing {
    Timing {
        heartbeat: Duration::from_millis(50),
        election_min: Duration::from_millis(150),
        election_max: Duration::from_millis(300),
        rpc_timeout: Duration::from_millis(300),
        write_timeout: Duration::from_secs(2),
        snapshot_every: 1_000_000,
        keep_after_snapshot: 10_000,
        replication: Default::default(),
    }
}

async fn throughput(c: &Cluster, concurrency: usize, run_for: Duration, next_op: &Arc<AtomicU64>) {
    let leader = c.leader().await;
    let h = c.node(leader).clone();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let h = h.clone();
        let next_op = next_op.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            while start.elapsed() < run_for {
                let op = next_op.fetch_add(1, Ordering::Relaxed);
                let cmd = Append {
                    key: format!("k{}", op % 64),
                    op_id: op,
                    payload: vec![0xAB; 256],
                };
                let t = Instant::now();
                match h.write(cmd).await {
                    Ok(_) => lat.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        all.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed();
    all.sort();
    println!(
        "concurrency {:>3}: {:>8.0} commits/s  p50 {:>9}  p99 {:>9}  ({} commits, {} errors, {:.1}s)",
        concurrency,
        all.len() as f64 / elapsed.as_secs_f64(),
        ms(pct(&all, 0.50)),
        ms(pct(&all, 0.99)),
        all.len(),
        errors,
        elapsed.as_secs_f64()
    );
}

async fn failover(c: &mut Cluster, kills: usize, next_op: &Arc<AtomicU64>) {
    let mut times = Vec::new();
    for _ in 0..kills {
        let leader = c.leader().await;
        let survivor = *c.live().iter().find(|id| **id != leader).unwrap();
        let h = c.node(survivor).clone();
        let t0 = Instant::now();
        c.kill(leader).await;
        loop {
            let op = next_op.fetch_add(1, Ordering::Relaxed);
            if h.write(append("failover", op)).await.is_ok() {
                break;
            }
        }
        times.push(t0.elapsed());
        c.start_node(leader).await;
        c.converge(Duration::from_secs(30)).await;
    }
    times.sort();
    println!(
        "failover ({} leader kills): kill -> next committed write  p50 {}  p99 {}  max {}",
        kills,
        ms(pct(&times, 0.50)),
        ms(pct(&times, 0.99)),
        ms(*times.last().unwrap())
    );
}

fn main() {
    let quick = std::env::var("GANGWAY_BENCH_QUICK").is_ok_and(|v| v != "0");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let run_for = if quick {
            Duration::from_secs(2)
        } else {
            Duration::from_secs(10)
        };
        let kills = if quick { 5 } else { 20 };
        println!(
            "raft_bench: 3 replicas, loopback gRPC, RocksDB (fsync), 256-byte commands, {} mode",
            if quick { "quick" } else { "full" }
        );
        let next_op = Arc::new(AtomicU64::new(0));
        let mut c = Cluster::start(3, 0, 42, bench_timing()).await;
        c.leader().await;
        for conc in [1, 16, 256] {
            throughput(&c, conc, run_for, &next_op).await;
        }
        failover(&mut c, kills, &next_op).await;
        c.shutdown().await;
    });
}
