//! The "months of operation" soak of the replicated state (issue 16's targets), scaled to one
//! process: the production state machine (`ClusterStore::apply`) and the production round
//! (`engine::run_round`), driven as the leader and the workers drive them, without Raft, sockets or
//! disks. 10,000 hosts of 8 GPUs register; every simulated 10 s a batch of short 1-GPU jobs arrives,
//! a round places them, the jobs placed in the previous tick report running then succeeded, and
//! the leader's retention prune runs. Every 100,000 submitted jobs it prints the round's p50/p99
//! (wall), the allocation wake-up p99 (`allocations_for` of one node), the snapshot of the state
//! (bincode, as the replica's Raft snapshot body) size, build and install time, the jobs held,
//! and the process RSS.
//!
//! ```sh
//! CARGO_TARGET_DIR=/tmp/core-release cargo run --release -p gangway-core --example soak -- \
//!     --jobs 1000000 --hosts 10000 --batch 2000 [--retention off]
//! ```
//!
//! `--retention off` keeps every finished job (the state as it was before retention) for the
//! comparison. What it leaves out, said plainly: the Raft log (its size on disk), the gRPC edge
//! and three replicas; a replica applies the same commands, so the state-machine costs are these.

use gangway_core::engine::{run_round, DeviceKind, HostTopology, RoundInput, SchedulerConfig};
use gangway_core::state::{
    ClusterStore, Command, DeviceInventory, Event, Limits, NodeRegistration, Response, Submission,
    TaskReport, TaskState,
};
use gangway_proto::ids::{HostName, JobId};
use gangway_proto::spec::JobSpec;
use std::time::Instant;

/// The allocator the `gangway` binary uses too: glibc's malloc fragments under the churn of a
/// long-lived state (records created and freed by the hundred thousand), and the round slowed
/// with it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Args {
    jobs: usize,
    hosts: usize,
    batch: usize,
    retention: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        jobs: 1_000_000,
        hosts: 10_000,
        batch: 2_000,
        retention: true,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(k) = it.next() {
        let v = it.next().ok_or(format!("{k} needs a value"))?;
        let n = || {
            v.parse::<usize>()
                .map_err(|e| format!("{k}: expected a number, got {v:?}: {e}"))
        };
        match k.as_str() {
            "--jobs" => a.jobs = n()?,
            "--hosts" => a.hosts = n()?,
            "--batch" => a.batch = n()?,
            "--retention" => a.retention = v != "off",
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(a)
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU seconds this thread has used (utime + stime of /proc/thread-self/stat): unlike wall time,
/// not inflated by other processes on a loaded machine.
fn thread_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("soak: {e}");
            std::process::exit(2);
        }
    };
    let mut store = ClusterStore::new();
    let mut events: Vec<Event> = Vec::new();
    let mut now = 1_000u64;
    let apply = |store: &mut ClusterStore, now: u64, cmd: Command, events: &mut Vec<Event>| {
        events.clear();
        store.apply(now, cmd, events)
    };
    for h in 0..args.hosts {
        let name = format!("n{h:05}");
        let reg = NodeRegistration {
            name: HostName::new(&name),
            address: format!("{name}:7300"),
            topology: HostTopology::new(
                "dc1",
                "z1",
                &format!("p{}", h / 640),
                &format!("r{}", h / 32),
            ),
            cpu_milli: 128_000,
            memory_mib: 1024 * 1024,
            devices: (0..8)
                .map(|i| DeviceInventory {
                    uuid: format!("GPU-{name}-{i}"),
                    model: "H100".into(),
                    kind: DeviceKind::Gpu,
                    memory_mib: 80 * 1024,
                    nvlink_domain: 0,
                })
                .collect(),
        };
        apply(&mut store, now, Command::RegisterNode(reg), &mut events);
    }
    let limits = if args.retention {
        // At most 100,000 finished jobs; keys for 10 simulated minutes. The soak packs a month's
        // million jobs into 1.4 simulated hours, so windows are scaled down with it (a real
        // 24-hour key window at a million jobs a month holds about 33,000 keys; this one holds
        // 120,000).
        Limits {
            finished_retention_ms: 24 * 3_600_000,
            max_finished: 100_000,
            idempotency_window_ms: 600_000,
            max_pending_per_queue: 1_000_000,
            ..Limits::default()
        }
    } else {
        Limits {
            finished_retention_ms: u64::MAX / 4,
            max_finished: usize::MAX,
            idempotency_window_ms: u64::MAX / 4,
            max_pending_per_queue: 1_000_000,
            ..Limits::default()
        }
    };
    apply(&mut store, now, Command::SetLimits(limits), &mut events);
    let spec = JobSpec::from_toml_str(
        "name = \"soak\"\ncommand = [\"python3\", \"step.py\"]\n[resources]\ndevices = 1\ncpu = 1\nmemory = \"4GiB\"\n",
    )
    .expect("valid spec");
    let config = SchedulerConfig::default();
    println!(
        "soak: {} hosts x 8 GPUs, batches of {} jobs every simulated 10 s, retention {}",
        args.hosts,
        args.batch,
        if args.retention {
            "on (100,000 finished jobs, keys 10 min)"
        } else {
            "off"
        }
    );
    println!("| jobs submitted | jobs held | round p50 ms | round p99 ms | CPU ms per tick | wake-up p50 us | wake-up p99 us | snapshot MB | snapshot build s | snapshot install s | RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut submitted = 0usize;
    let mut rounds: Vec<f64> = Vec::new();
    let mut wakeups: Vec<f64> = Vec::new();
    let mut running: Vec<(JobId, u64)> = Vec::new();
    let mut next_report = 100_000usize;
    let mut ticks = 0usize;
    let mut cpu_at = thread_cpu_s();
    while submitted < args.jobs {
        now += 10_000;
        // The jobs placed last tick ran and finished.
        for (job, epoch) in std::mem::take(&mut running) {
            for state in [TaskState::Running, TaskState::Succeeded] {
                let report = TaskReport {
                    job: job.clone(),
                    task: 0,
                    epoch,
                    state,
                    exit_code: (state == TaskState::Succeeded).then_some(0),
                    message: String::new(),
                };
                apply(&mut store, now, Command::TaskStatus(report), &mut events);
            }
        }
        for _ in 0..args.batch.min(args.jobs - submitted) {
            submitted += 1;
            let sub = Submission {
                owner: String::new(),
                idempotency_key: Some(format!("key-{submitted}")),
                spec: spec.clone(),
            };
            apply(&mut store, now, Command::SubmitJob(sub), &mut events);
        }
        let t = Instant::now();
        let read = store.round_input(false);
        let outcome = run_round(RoundInput {
            view: store.engine(),
            pending: &read.pending,
            reasons: read.reasons,
            config: &config,
            state: &read.state,
            defrag: None,
            now_ms: now,
        });
        let plan = outcome.plan;
        if let Response::PlanApplied { placed, .. } =
            apply(&mut store, now, Command::ApplyPlan { plan }, &mut events)
        {
            running = placed;
        }
        rounds.push(t.elapsed().as_secs_f64() * 1e3);
        ticks += 1;
        // Allocation wake-ups: what the nodes of (up to 50 of) this tick's placements hold.
        let hosts: Vec<HostName> = running
            .iter()
            .step_by((running.len() / 50).max(1))
            .filter_map(|(j, _)| store.job(j))
            .filter_map(|j| j.lease.as_ref())
            .map(|l| l.placement.tasks[0].host.clone())
            .collect();
        for host in hosts {
            let t = Instant::now();
            let allocs = store.allocations_for(&host);
            wakeups.push(t.elapsed().as_secs_f64() * 1e6);
            std::hint::black_box(allocs);
        }
        while let Some(cmd) = store.prune_due(now) {
            apply(&mut store, now, cmd, &mut events);
        }
        if submitted >= next_report || submitted >= args.jobs {
            next_report += 100_000;
            let cpu_per_tick = (thread_cpu_s() - cpu_at) * 1e3 / ticks.max(1) as f64;
            rounds.sort_by(f64::total_cmp);
            wakeups.sort_by(f64::total_cmp);
            let t = Instant::now();
            let bytes = bincode::serialize(&store).expect("encode");
            let build = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let back: ClusterStore = bincode::deserialize(&bytes).expect("decode");
            let install = t.elapsed().as_secs_f64();
            drop(back);
            println!(
                "| {submitted} | {} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {:.1} | {:.2} | {:.2} | {:.0} |",
                store.jobs().len(),
                pct(&rounds, 0.5),
                pct(&rounds, 0.99),
                cpu_per_tick,
                pct(&wakeups, 0.5),
                pct(&wakeups, 0.99),
                bytes.len() as f64 / 1e6,
                build,
                install,
                rss_mib()
            );
            rounds.clear();
            wakeups.clear();
            ticks = 0;
            cpu_at = thread_cpu_s();
        }
    }
}
