//! The simulator's experiments without the `gangway` binary (which links RocksDB): the same library
//! calls as `gangway sim`, for quick release runs of the core crate alone.
//!
//! ```sh
//! CARGO_TARGET_DIR=/tmp/core-release cargo run --release -p gangway-core --example sim -- \
//!     bench --cluster deploy/sim/pretrain-cluster.toml --mix pretrain --seeds 1,2,3 --hours 168
//! ... --example sim -- replay --trace ../shared/traces/philly/philly.csv \
//!     --cluster deploy/sim/philly-cluster.toml --load 5 --policy best-fit,gangway
//! ... --example sim -- replay --trace ../shared/traces/philly/philly.csv \
//!     --cluster deploy/sim/philly-cluster.toml --load 5 --policy gangway \
//!     --failures default --repair compare --checkpoint-interval 10m,30m,2h
//! ... --example sim -- synth --cluster deploy/sim/pretrain-cluster.toml --mix pretrain --seed 1 --out t.csv
//! ... --example sim -- fgd --nodes ../shared/traces/openb/openb_node_list_gpu_node.csv \
//!     --pods ../shared/traces/openb/openb_pod_list_default.csv --seeds 3
//! ```
//!
//! `replay` and `bench` print one markdown row per (workload, policy): average queueing delay,
//! that of gangs of 32+ GPUs, utilization (busy period and submission period), average JCT, p99
//! delay, preemptions and CPU seconds; `bench` adds the mean over its seeds per policy. With
//! `--failures MODEL` (`default`, or `mtbf_hours=N,repair_hours=M[,resubmit_hours=H][,seed=S]`),
//! `--repair on|off|compare` and `--checkpoint-interval LIST`, `replay` and `bench` replay every
//! combination and add a markdown table of the failure figures (core/SIM.md, "Device failures").

use gangway_core::engine::{DeviceKind, PolicyName};
use gangway_core::sim::failures::{
    parse_checkpoint_intervals, parse_repair_modes, run_label, FailureModel, FailureOptions,
};
use gangway_core::sim::fgd::{run_fgd, FgdOptions};
use gangway_core::sim::philly::{load_trace, parse_offset, parse_trace, Trace};
use gangway_core::sim::synth::{mix_by_name, synthetic_trace};
use gangway_core::sim::{
    compress_arrivals, jobs_from_trace, replay, DefragOptions, ReplayMetrics, ReplayOptions,
    SimCluster,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const ALL: &str = "first-fit,best-fit,fgd,backfill,gangway";

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Every option any subcommand reads; anything else is refused rather than ignored.
const KNOWN: [&str; 20] = [
    "cluster",
    "trace",
    "from",
    "to",
    "load",
    "policy",
    "failures",
    "repair",
    "checkpoint-interval",
    "defrag",
    "mix",
    "hours",
    "seeds",
    "seed",
    "first-seed",
    "threads",
    "tune",
    "out",
    "nodes",
    "pods",
];

/// `--name value` options after the subcommand.
struct Opts(BTreeMap<String, String>);

impl Opts {
    fn parse(args: &[String]) -> Res<Self> {
        let mut m = BTreeMap::new();
        let mut it = args.iter();
        while let Some(k) = it.next() {
            let key = k
                .strip_prefix("--")
                .ok_or(format!("expected --option, got {k}"))?;
            if !KNOWN.contains(&key) {
                return Err(
                    format!("unknown option --{key} (known: --{})", KNOWN.join(", --")).into(),
                );
            }
            let v = it.next().ok_or(format!("--{key} needs a value"))?;
            m.insert(key.to_owned(), v.clone());
        }
        Ok(Self(m))
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }
    fn req(&self, k: &str) -> Res<&str> {
        Ok(self.get(k).ok_or(format!("--{k} is required"))?)
    }
    fn num<T: std::str::FromStr>(&self, k: &str, default: T) -> Res<T> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("--{k}: bad value {v}").into()),
        }
    }
    /// The failure settings and checkpoint intervals to replay (one entry without failures).
    fn variants(&self) -> Res<Vec<ReplayOptions>> {
        let intervals: Vec<String> = self
            .get("checkpoint-interval")
            .into_iter()
            .map(str::to_owned)
            .collect();
        let intervals = parse_checkpoint_intervals(&intervals)?;
        let failures: Vec<Option<FailureOptions>> = match self.get("failures") {
            None if self.get("repair").is_some() => return Err("--repair needs --failures".into()),
            None => vec![None],
            Some(spec) => {
                let model = FailureModel::parse(spec)?;
                parse_repair_modes(self.get("repair").unwrap_or("on"))?
                    .into_iter()
                    .map(|repair| {
                        Some(FailureOptions {
                            model: model.clone(),
                            repair,
                        })
                    })
                    .collect()
            }
        };
        let defrag: Vec<Option<DefragOptions>> = match self.get("defrag").unwrap_or("off") {
            "off" => vec![None],
            "on" => vec![Some(DefragOptions::default())],
            "compare" => vec![None, Some(DefragOptions::default())],
            other => {
                return Err(format!("--defrag: expected off, on or compare, got {other}").into())
            }
        };
        let mut out = Vec::new();
        for interval in &intervals {
            for f in &failures {
                for d in &defrag {
                    out.push(ReplayOptions {
                        checkpoint_interval_ms: *interval,
                        failures: f.clone(),
                        defrag: d.clone(),
                        ..ReplayOptions::default()
                    });
                }
            }
        }
        Ok(out)
    }
    fn policies(&self) -> Res<Vec<PolicyName>> {
        self.get("policy")
            .unwrap_or(ALL)
            .split(',')
            .map(|p| p.trim().parse().map_err(|e| format!("{e}").into()))
            .collect()
    }
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        return Err("usage: sim synth|replay|bench|fgd --option value ...".into());
    };
    let o = Opts::parse(rest)?;
    match cmd.as_str() {
        "synth" => synth(&o),
        "replay" => replay_cmd(&o),
        "bench" => bench(&o),
        "fgd" => fgd(&o),
        other => Err(format!("unknown subcommand {other}").into()),
    }
}

fn synth(o: &Opts) -> Res<()> {
    let cluster = SimCluster::load(Path::new(o.req("cluster")?))?;
    let gpus = cluster.total_devices(DeviceKind::Gpu);
    let mix = mix_by_name(o.get("mix").unwrap_or("default"))?;
    let csv = synthetic_trace(
        o.num("seed", 1)?,
        o.num("hours", 72.0)?,
        o.num("load", 0.9)?,
        gpus,
        mix,
    )?;
    std::fs::write(o.req("out")?, csv)?;
    Ok(())
}

fn header() {
    println!("| workload | policy | avg delay s | large (32+) delay s | util % | util during arrivals % | avg JCT s | p99 delay s | preemptions | frag % | CPU s |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
}

fn row(workload: &str, m: &ReplayMetrics) {
    println!(
        "| {workload} | {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.1} | {:.1} | {} | {:.1} | {:.1} |",
        m.policy,
        m.avg_queue_delay_s,
        m.avg_queue_delay_large_gangs_s,
        m.gpu_utilization_pct,
        m.gpu_utilization_during_arrivals_pct,
        m.avg_jct_s,
        m.p99_queue_delay_s,
        m.preemptions,
        m.fragmentation_pct,
        m.cpu_s
    );
}

/// The failure figures of the runs that had failures, as markdown.
fn failure_rows(workload: &str, runs: &[ReplayMetrics]) {
    let runs: Vec<_> = runs
        .iter()
        .filter_map(|m| Some((m, m.failures.as_ref()?)))
        .collect();
    if runs.is_empty() {
        return;
    }
    println!();
    println!("| workload | run | GPU failures | gang failures | repairs | resubmitted | lost work GPU-h | fenced GPU-h | lost GPU-h | TTR mean s | TTR p50 s | TTR p99 s | ETTR % | avg JCT s | completed | CPU s |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (m, f) in runs {
        println!(
            "| {workload} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {} | {:.1} |",
            m.policy,
            f.device_failures,
            f.gang_failures,
            f.repairs,
            f.resubmissions,
            f.lost_work_gpu_h,
            f.fenced_gpu_h,
            f.lost_gpu_h,
            f.time_to_repair_mean_s,
            f.time_to_repair_p50_s,
            f.time_to_repair_p99_s,
            f.ettr_pct,
            m.avg_jct_s,
            m.jobs_completed,
            m.cpu_s
        );
    }
}

/// Replays every policy (under every variant of options) on one trace; one row each.
fn run_all(
    workload: &str,
    trace: &Trace,
    cluster: &SimCluster,
    window: (u64, u64),
    load: f64,
    policies: &[PolicyName],
    variants: &[ReplayOptions],
) -> Res<Vec<ReplayMetrics>> {
    let mut jobs = jobs_from_trace(trace, cluster, window.0, window.1)?;
    compress_arrivals(&mut jobs, load)?;
    let mut out = Vec::new();
    for (&p, options) in policies
        .iter()
        .flat_map(|p| variants.iter().map(move |o| (p, o)))
    {
        let mut m = replay(cluster, &jobs, p, options)?;
        m.policy = run_label(
            &m.policy,
            options.defrag.is_some(),
            options.failures.as_ref(),
            options.checkpoint_interval_ms,
        );
        eprintln!("replayed {} in {:.1} s CPU", m.policy, m.cpu_s);
        if m.jobs_unplaceable > 0 || m.gangs_outside_required_domain > 0 {
            eprintln!(
                "{workload} {p}: {} unplaceable, {} outside their domain",
                m.jobs_unplaceable, m.gangs_outside_required_domain
            );
        }
        row(workload, &m);
        out.push(m);
    }
    failure_rows(workload, &out);
    Ok(out)
}

fn replay_cmd(o: &Opts) -> Res<()> {
    let cluster = SimCluster::load(Path::new(o.req("cluster")?))?;
    let trace = load_trace(Path::new(o.req("trace")?))?;
    let from = match o.get("from") {
        Some(s) => parse_offset(s, trace.start_unix_s)?,
        None => 0,
    };
    let to = match o.get("to") {
        Some(s) => parse_offset(s, trace.start_unix_s)?,
        None => u64::MAX,
    };
    let load = o.num("load", 1.0)?;
    header();
    run_all(
        &format!("load {load}"),
        &trace,
        &cluster,
        (from, to),
        load,
        &o.policies()?,
        &o.variants()?,
    )?;
    Ok(())
}

fn bench(o: &Opts) -> Res<()> {
    let cluster_path = PathBuf::from(o.req("cluster")?);
    let cluster = SimCluster::load(&cluster_path)?;
    let gpus = cluster.total_devices(DeviceKind::Gpu);
    let mix_name = o.get("mix").unwrap_or("pretrain");
    let mix = mix_by_name(mix_name)?;
    let hours = o.num("hours", 168.0)?;
    let load = o.num("load", 0.9)?;
    let seeds: Vec<u64> = o
        .get("seeds")
        .unwrap_or("1,2,3,4,5")
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let policies = o.policies()?;
    let variants = o.variants()?;
    let mut labels: Vec<String> = Vec::new();
    header();
    let mut sums: BTreeMap<String, [f64; 6]> = BTreeMap::new();
    for &seed in &seeds {
        let csv = synthetic_trace(seed, hours, load, gpus, mix)?;
        let trace = parse_trace(&csv, Path::new("synth.csv"))?;
        let label = format!("{mix_name} seed {seed}");
        for m in run_all(
            &label,
            &trace,
            &cluster,
            (0, u64::MAX),
            1.0,
            &policies,
            &variants,
        )? {
            if !labels.contains(&m.policy) {
                labels.push(m.policy.clone());
            }
            let s = sums.entry(m.policy.clone()).or_default();
            for (k, v) in [
                m.avg_queue_delay_s,
                m.avg_queue_delay_large_gangs_s,
                m.gpu_utilization_pct,
                m.gpu_utilization_during_arrivals_pct,
                m.avg_jct_s,
                m.p99_queue_delay_s,
            ]
            .into_iter()
            .enumerate()
            {
                s[k] += v;
            }
        }
    }
    let n = seeds.len() as f64;
    let seeds_label: Vec<String> = seeds.iter().map(u64::to_string).collect();
    for p in &labels {
        let s = sums[p.as_str()];
        println!(
            "| {mix_name} mean of seeds {} | {p} | {:.1} | {:.1} | {:.2} | {:.2} | {:.1} | {:.1} | | | |",
            seeds_label.join(","),
            s[0] / n,
            s[1] / n,
            s[2] / n,
            s[3] / n,
            s[4] / n,
            s[5] / n
        );
    }
    Ok(())
}

fn fgd(o: &Opts) -> Res<()> {
    let mut opts = FgdOptions::new(o.req("nodes")?, o.req("pods")?);
    opts.tune = o.num("tune", 1.3)?;
    opts.seeds = o.num("seeds", 3)?;
    opts.first_seed = o.num("first-seed", 42)?;
    opts.threads = o.num("threads", 1)?;
    opts.policies = match o.get("policy") {
        Some(_) => o.policies()?,
        None => vec![PolicyName::BestFit, PolicyName::Fgd, PolicyName::Gangway],
    };
    let report = run_fgd(&opts)?;
    for p in &report.policies {
        let per_seed: Vec<String> = p
            .seeds
            .iter()
            .map(|s| format!("{}:{:.2}", s.seed, s.unallocated_gpu_pct))
            .collect();
        println!(
            "{}: unallocated GPU % {:.2} (stddev {:.2}; seeds {})",
            p.policy,
            p.unallocated_gpu_pct,
            p.unallocated_gpu_pct_stddev,
            per_seed.join(" ")
        );
    }
    Ok(())
}
