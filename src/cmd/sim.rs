//! `gangway sim`: replay production traces through the placement engine and compare policies.

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use gangway_scheduler::engine::PolicyName;
use gangway_scheduler::sim::failures::{parse_checkpoint_intervals, parse_repair_modes, run_label};
use gangway_scheduler::sim::fgd::{run_fgd, FgdOptions};
use gangway_scheduler::sim::philly::{format_timestamp, load_trace, parse_offset};
use gangway_scheduler::sim::plot::{line_chart, Series};
use gangway_scheduler::sim::report::{fgd_table, ReplayReport, Window};
use gangway_scheduler::sim::synth::{mix_by_name, synthetic_trace};
use gangway_scheduler::sim::{
    compress_arrivals, jobs_from_trace, replay, DefragOptions, FailureModel, FailureOptions,
    PreemptMode, ReplayOptions, SimCluster, SimError,
};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::EXIT_INVALID;

const ALL_POLICIES: &str = "first-fit,best-fit,fgd,static-quota,backfill,gangway";

#[derive(Subcommand, Debug)]
pub enum SimCommand {
    /// Replay the Philly trace on a cluster file, one run per policy: utilization, queueing delay, JCT.
    Replay(ReplayArgs),
    /// The FGD experiment (USENIX ATC'23) on the openb traces: unallocated GPUs and fragmentation.
    Fgd(FgdArgs),
    /// Write a synthetic trace (Philly CSV) from a named mix: `default` (1-GPU jobs mixed with 64-
    /// and 128-GPU gangs) or `pretrain` (gangs of 64 to 1,024 GPUs, plus small jobs).
    Synth(SynthArgs),
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// The cluster file the load is computed for.
    #[arg(long)]
    pub cluster: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Hours of submissions.
    #[arg(long, default_value_t = 72.0)]
    pub hours: f64,
    /// Offered load: average demanded GPUs over the cluster's GPUs.
    #[arg(long, default_value_t = 0.9)]
    pub load: f64,
    /// The job mix: default (1-GPU jobs, 64- and 128-GPU gangs) or pretrain (64..1,024-GPU gangs
    /// plus small jobs; use deploy/sim/pretrain-cluster.toml). Distributions in core/SIM.md.
    #[arg(long, default_value = "default")]
    pub mix: String,
    /// Where to write the CSV.
    #[arg(long)]
    pub out: PathBuf,
}

/// Continuous defragmentation in a replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DefragMode {
    Off,
    On,
    /// Every policy twice: without, and with (labelled `POLICY+defrag`).
    Compare,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// A table for people.
    Table,
    /// One JSON document (schema in core/SIM.md).
    Json,
}

#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// The trace: philly.csv (timestamp,duration,num_gpus,gpu_time,cluster).
    #[arg(long)]
    pub trace: PathBuf,
    /// The cluster file (TOML): hosts, racks/pods, queues with quotas.
    #[arg(long)]
    pub cluster: PathBuf,
    /// Policies to compare, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = ALL_POLICIES)]
    pub policy: Vec<String>,
    /// Replay jobs submitted from this time: seconds since the trace start (3600, 90m, 12h, 7d) or a
    /// UTC timestamp (2017-10-01, "2017-10-01 12:00:00").
    #[arg(long)]
    pub from: Option<String>,
    /// ... up to (excluding) this time, same formats. The replay still runs until those jobs end.
    #[arg(long)]
    pub to: Option<String>,
    /// Offered load: submissions come this many times faster than in the trace (inter-arrival times
    /// divided by it); sizes and durations unchanged. 1 replays the trace as is.
    #[arg(long, default_value_t = 1.0)]
    pub load: f64,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// Write an SVG of allocated GPUs over time, one line per policy.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// What a preempted gang keeps: resume (its remaining work) or restart (all of it).
    #[arg(long, default_value = "resume")]
    pub preempt: String,
    /// Points of the allocation curve in the JSON and the plot.
    #[arg(long, default_value_t = 200)]
    pub curve_points: usize,
    /// Policies replayed at once (threads).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Continuous defragmentation: migrations (checkpoint time each) that free a block for a
    /// gang of 16+ GPUs waiting for shape, at most one per 100 allocated device-hours.
    #[arg(long, value_enum, default_value_t = DefragMode::Off)]
    pub defrag: DefragMode,
    /// Checkpoint (and restore) time each migration costs, in seconds.
    #[arg(long, default_value_t = 60)]
    pub checkpoint_s: u64,
    /// Most gangs moved to make room for one waiting gang.
    #[arg(long, default_value_t = 48)]
    pub defrag_max_moves: usize,
    /// Inject device failures: `default` (Llama 3's GPU failure rate, core/SIM.md "Device
    /// failures") or `mtbf_hours=N,repair_hours=M[,resubmit_hours=H][,seed=S]`.
    #[arg(long)]
    pub failures: Option<String>,
    /// With --failures: on (the state machine repairs the gang from its last checkpoint), off
    /// (the job fails and is resubmitted by hand), or compare (both). Default on.
    #[arg(long)]
    pub repair: Option<String>,
    /// Checkpointable jobs write a checkpoint every interval (600, 10m, 2h; `none`); a
    /// comma-separated list replays each. Default none.
    #[arg(long, value_delimiter = ',')]
    pub checkpoint_interval: Vec<String>,
}

#[derive(Args, Debug)]
pub struct FgdArgs {
    /// openb_node_list_gpu_node.csv.
    #[arg(long)]
    pub nodes: PathBuf,
    /// A pod list, e.g. openb_pod_list_default.csv.
    #[arg(long)]
    pub pods: PathBuf,
    /// Submit pods until the arrived GPU demand reaches tune x capacity.
    #[arg(long, default_value_t = 1.3)]
    pub tune: f64,
    /// Seeds to average over.
    #[arg(long, default_value_t = 10)]
    pub seeds: u32,
    /// First seed (seeds are first..first+seeds).
    #[arg(long, default_value_t = 42)]
    pub first_seed: u64,
    /// Policies to compare, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "best-fit,fgd,gangway")]
    pub policy: Vec<String>,
    /// Use only the first N pods (by name) of the list: quick runs.
    #[arg(long)]
    pub max_pods: Option<usize>,
    /// Worker threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// The published analysis_allo_discrete.csv; default: ../fgd_results/ next to the pod list, if
    /// present.
    #[arg(long)]
    pub published: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// Write an SVG of the GPU allocation ratio over arrived demand, one line per policy.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

pub fn run(command: SimCommand) -> anyhow::Result<ExitCode> {
    let result = match command {
        SimCommand::Replay(args) => run_replay(&args),
        SimCommand::Fgd(args) => run_fgd_cmd(&args),
        SimCommand::Synth(args) => run_synth(&args),
    };
    match result {
        Ok(code) => Ok(code),
        Err(err) => match err.downcast_ref::<SimError>() {
            Some(
                SimError::Argument(_)
                | SimError::Field { .. }
                | SimError::TomlSyntax { .. }
                | SimError::Csv { .. }
                | SimError::Io { .. },
            ) => {
                eprintln!("error: {err:#}");
                Ok(ExitCode::from(EXIT_INVALID))
            }
            _ => Err(err),
        },
    }
}

fn parse_policies(names: &[String]) -> Result<Vec<PolicyName>, SimError> {
    let mut out = Vec::new();
    for n in names {
        let p: PolicyName = n
            .trim()
            .parse()
            .map_err(|e| SimError::Argument(format!("--policy: {e}")))?;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    if out.is_empty() {
        return Err(SimError::Argument("--policy: no policy given".into()));
    }
    Ok(out)
}

fn write_plot(path: &Path, svg: &str) -> anyhow::Result<()> {
    std::fs::write(path, svg).with_context(|| format!("writing plot {}", path.display()))
}

fn run_synth(args: &SynthArgs) -> anyhow::Result<ExitCode> {
    let cluster = SimCluster::load(&args.cluster)?;
    let gpus = cluster.total_devices(gangway_scheduler::engine::DeviceKind::Gpu);
    let mix = mix_by_name(&args.mix)?;
    let csv = synthetic_trace(args.seed, args.hours, args.load, gpus, mix)?;
    std::fs::write(&args.out, &csv).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "wrote {} jobs ({} mix, {} hours at load {} on {gpus} GPUs) to {}",
        csv.lines().count().saturating_sub(1),
        args.mix,
        args.hours,
        args.load,
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn run_replay(args: &ReplayArgs) -> anyhow::Result<ExitCode> {
    let policies = parse_policies(&args.policy)?;
    let preempt: PreemptMode = args.preempt.parse()?;
    let cluster = SimCluster::load(&args.cluster)?;
    let trace = load_trace(&args.trace)?;
    let from_s = match &args.from {
        Some(s) => parse_offset(s, trace.start_unix_s)?,
        None => 0,
    };
    let to_s = match &args.to {
        Some(s) => Some(parse_offset(s, trace.start_unix_s)?),
        None => None,
    };
    if let Some(to) = to_s {
        if to <= from_s {
            return Err(SimError::Argument(format!(
                "--to ({to} s) must be after --from ({from_s} s)"
            ))
            .into());
        }
    }
    let mut jobs = jobs_from_trace(&trace, &cluster, from_s, to_s.unwrap_or(u64::MAX))?;
    compress_arrivals(&mut jobs, args.load)?;
    let mut defrag = DefragOptions {
        checkpoint_ms: args.checkpoint_s * 1000,
        ..DefragOptions::default()
    };
    defrag.budget.max_moves = args.defrag_max_moves;
    let variants: Vec<Option<DefragOptions>> = match args.defrag {
        DefragMode::Off => vec![None],
        DefragMode::On => vec![Some(defrag)],
        DefragMode::Compare => vec![None, Some(defrag)],
    };
    let model = args
        .failures
        .as_deref()
        .map(FailureModel::parse)
        .transpose()?;
    let failures: Vec<Option<FailureOptions>> = match (&model, &args.repair) {
        (None, Some(_)) => {
            return Err(SimError::Argument("--repair needs --failures".into()).into())
        }
        (None, None) => vec![None],
        (Some(model), repair) => parse_repair_modes(repair.as_deref().unwrap_or("on"))?
            .into_iter()
            .map(|repair| {
                Some(FailureOptions {
                    model: model.clone(),
                    repair,
                })
            })
            .collect(),
    };
    let intervals = parse_checkpoint_intervals(&args.checkpoint_interval)?;
    let mut runs: Vec<(PolicyName, ReplayOptions)> = Vec::new();
    for &p in &policies {
        for d in &variants {
            for interval in &intervals {
                for f in &failures {
                    let options = ReplayOptions {
                        preempt,
                        curve_points: args.curve_points,
                        defrag: d.clone(),
                        checkpoint_interval_ms: *interval,
                        failures: f.clone(),
                    };
                    runs.push((p, options));
                }
            }
        }
    }
    let threads = args.threads.max(1);
    let mut results = Vec::with_capacity(runs.len());
    for chunk in runs.chunks(threads) {
        let outcomes: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|(p, options)| {
                    let (cluster, jobs) = (&cluster, &jobs);
                    s.spawn(move || {
                        replay(cluster, jobs, *p, options).map(|mut m| {
                            m.policy = run_label(
                                &m.policy,
                                options.defrag.is_some(),
                                options.failures.as_ref(),
                                options.checkpoint_interval_ms,
                            );
                            m
                        })
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("replay thread panicked"))
                .collect()
        });
        for o in outcomes {
            let m = o?;
            eprintln!(
                "replayed {} in {:.1} s ({:.1} s CPU)",
                m.policy, m.wall_s, m.cpu_s
            );
            results.push(m);
        }
    }
    let report = ReplayReport {
        experiment: "replay".into(),
        trace: args.trace.display().to_string(),
        cluster: args.cluster.display().to_string(),
        cluster_gpus: cluster.total_devices(gangway_scheduler::engine::DeviceKind::Gpu),
        window: Window {
            from_s,
            to_s,
            from_utc: format_timestamp(trace.start_unix_s + from_s as i64),
            to_utc: to_s.map(|t| format_timestamp(trace.start_unix_s + t as i64)),
        },
        jobs_in_window: jobs.len() as u64,
        load_factor: args.load,
        preempt_mode: preempt,
        runtime_estimate: "trace_duration".into(),
        policies: results,
    };
    if let Some(path) = &args.plot {
        let series: Vec<Series> = report
            .policies
            .iter()
            .map(|m| Series {
                label: m.policy.clone(),
                points: m
                    .allocation_curve
                    .t_s
                    .iter()
                    .zip(&m.allocation_curve.allocated_pct)
                    .map(|(t, a)| (t / 86_400.0, *a))
                    .collect(),
            })
            .collect();
        let svg = line_chart(
            &format!("Allocated GPUs, {} replay", cluster.name),
            "days since the first submission in the window",
            "allocated GPUs (% of cluster)",
            &series,
            Some((0.0, 100.0)),
        );
        write_plot(path, &svg)?;
    }
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        OutputFormat::Table => print!("{}", report.to_table()),
    }
    Ok(ExitCode::SUCCESS)
}

fn run_fgd_cmd(args: &FgdArgs) -> anyhow::Result<ExitCode> {
    if !(args.tune.is_finite() && args.tune > 0.0) {
        return Err(SimError::Argument(format!("--tune {}: must be > 0", args.tune)).into());
    }
    let published = args.published.clone().or_else(|| {
        let p = args
            .pods
            .parent()?
            .join("../fgd_results/analysis_allo_discrete.csv");
        p.exists().then_some(p)
    });
    let mut opts = FgdOptions::new(args.nodes.clone(), args.pods.clone());
    opts.tune = args.tune;
    opts.seeds = args.seeds;
    opts.first_seed = args.first_seed;
    opts.policies = parse_policies(&args.policy)?;
    opts.max_pods = args.max_pods;
    opts.threads = args.threads;
    opts.published = published;
    let report = run_fgd(&opts)?;
    if let Some(path) = &args.plot {
        let series: Vec<Series> = report
            .policies
            .iter()
            .map(|p| Series {
                label: p.policy.to_string(),
                points: p
                    .allocation_curve
                    .iter()
                    .enumerate()
                    .filter_map(|(i, a)| a.map(|a| (i as f64, a)))
                    .collect(),
            })
            .collect();
        let svg = line_chart(
            &format!("GPU allocation ratio, {}", report.workload),
            "arrived GPU demand (% of cluster GPUs)",
            "allocated GPUs (% of cluster GPUs)",
            &series,
            Some((0.0, 100.0)),
        );
        write_plot(path, &svg)?;
    }
    match args.output {
        OutputFormat::Json => {
            let mut v = serde_json::to_value(&report)?;
            if let Some(obj) = v.as_object_mut() {
                obj.insert("experiment".into(), serde_json::Value::from("fgd"));
            }
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        OutputFormat::Table => print!("{}", fgd_table(&report)),
    }
    Ok(ExitCode::SUCCESS)
}
