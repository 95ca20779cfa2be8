//! The FGD experiment (Weng et al., "Beware of Fragmentation", USENIX ATC'23) on the engine.
//!
//! As the published simulator (hkust-adsl/kubernetes-scheduler-simulator) runs it:
//! - the cluster is the openb GPU node list; the pods are a pod list, sorted by name and shuffled
//!   with the seed (`--shuffle-pod=true`); then, while the arrived GPU request stays within
//!   `tune` x cluster GPU capacity, random pods of the list are appended (`tuneUpPods`; its check
//!   compares the per-GPU share, a quirk kept), or random pods removed when the list is larger;
//! - pods are submitted one at a time, with no departures; each is placed or fails for good;
//! - after every pod: allocated GPU milli, arrived GPU milli and the cluster's fragmentation ratio
//!   (FGD's measure against the typical pods: 95% most popular shapes of the pod list);
//! - the allocation curve is discretised as their `merge_alloc_discrete.py`: for each whole percent
//!   of arrived demand, the mean allocation of the records that round to it (or, if none, of those
//!   within one percent);
//! - KPI: `unallocated_gpu_pct` = 100 - allocation at 130% arrived (mean over seeds);
//!   `frag_ratio_pct_at_90` = fragmentation ratio at 90% arrived.
//!
//! Randomness comes from ChaCha8 seeded with the seed (Go's `math/rand` stream is not reproduced,
//! so per-seed values differ from theirs; means over seeds are what compare).

use super::error::SimError;
use super::openb::{cluster_from_nodes, load_nodes, load_pods, OpenbPod};
use crate::engine::fragmentation::FragModel;
use crate::engine::index::Overlay;
use crate::engine::{
    run_round, ClusterState, DeviceDemand, DeviceKind, PolicyName, RoundInput, RoundState,
    SchedulerConfig, TaskDemand, WorkloadClass,
};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Published means (unallocated GPU % at 130%) on `openb_pod_list_default`.
pub const PUBLISHED_DEFAULT: [(&str, f64); 6] = [
    ("Random", 12.53),
    ("DotProd", 9.15),
    ("GpuClustering", 8.12),
    ("GpuPacking", 8.00),
    ("BestFit", 6.92),
    ("FGD", 4.61),
];

/// What to run.
#[derive(Clone, Debug)]
pub struct FgdOptions {
    /// `openb_node_list_gpu_node.csv`.
    pub nodes: PathBuf,
    /// A pod list, e.g. `openb_pod_list_default.csv`.
    pub pods: PathBuf,
    /// Arrived GPU demand target as a multiple of capacity (1.3 in the paper).
    pub tune: f64,
    /// Number of seeds; seeds are `first_seed..first_seed + seeds` (42.. in the paper).
    pub seeds: u32,
    pub first_seed: u64,
    pub policies: Vec<PolicyName>,
    /// Use only the first N pods of the list (sorted by name) before tuning; for quick tests.
    pub max_pods: Option<usize>,
    /// Use only the first N nodes of the node list (a smaller cluster); for quick tests.
    pub max_nodes: Option<usize>,
    /// Worker threads (0: all cores).
    pub threads: usize,
    /// `analysis_allo_discrete.csv` of the published results, to report their per-seed means.
    pub published: Option<PathBuf>,
}

impl FgdOptions {
    /// The paper's setup (tune 1.3, 10 seeds from 42) on the given files, for best-fit, fgd and
    /// gangway.
    pub fn new(nodes: impl Into<PathBuf>, pods: impl Into<PathBuf>) -> Self {
        Self {
            nodes: nodes.into(),
            pods: pods.into(),
            tune: 1.3,
            seeds: 10,
            first_seed: 42,
            policies: vec![PolicyName::BestFit, PolicyName::Fgd, PolicyName::Gangway],
            max_pods: None,
            max_nodes: None,
            threads: 0,
            published: None,
        }
    }
}

/// One seed of one policy.
#[derive(Clone, Debug, Serialize)]
pub struct FgdSeedResult {
    pub seed: u64,
    pub pods: usize,
    pub failed_pods: usize,
    pub unallocated_gpu_pct: f64,
    pub frag_ratio_pct_at_90: f64,
    /// Allocation ratio (%) at each whole percent of arrived demand, 0..=130 (None: no record).
    pub allocation_curve: Vec<Option<f64>>,
    pub wall_ms: u64,
}

/// One policy over all seeds.
#[derive(Clone, Debug, Serialize)]
pub struct FgdPolicyReport {
    pub policy: PolicyName,
    /// Mean over seeds of 100 - allocation at 130% arrived.
    pub unallocated_gpu_pct: f64,
    pub unallocated_gpu_pct_stddev: f64,
    pub frag_ratio_pct_at_90: f64,
    /// Mean allocation curve over seeds.
    pub allocation_curve: Vec<Option<f64>>,
    /// The published mean for the matching policy of the paper (BestFit, FGD), when known.
    pub published_unallocated_gpu_pct: Option<f64>,
    pub seeds: Vec<FgdSeedResult>,
}

/// The whole experiment.
#[derive(Clone, Debug, Serialize)]
pub struct FgdReport {
    pub workload: String,
    pub nodes: usize,
    pub total_gpus: u64,
    pub tune: f64,
    pub typical_classes: usize,
    pub policies: Vec<FgdPolicyReport>,
    /// Published means of all six policies of the paper for this workload (from the CSV, or the
    /// paper's numbers for the default workload).
    pub published: BTreeMap<String, f64>,
    pub wall_ms: u64,
}

/// The typical pods of a pod list, exactly as the simulator's `GetTypicalPods` with
/// `isInvolvedCpuPods=true`, threshold 95, step 1, no GPU weight: shapes (CPU, per-GPU milli, GPU
/// count, GPU type) by count, most popular first, until 95% of pods are covered, renormalised.
pub fn typical_pods(pods: &[OpenbPod]) -> Vec<WorkloadClass> {
    type Key = (u64, u32, u32, String);
    let mut counts: BTreeMap<Key, f64> = BTreeMap::new();
    let mut total = 0.0;
    for p in pods {
        let td = p.task_demand();
        let (milli, n) = match td.devices {
            DeviceDemand::None => (0, 0),
            DeviceDemand::Whole(n) => (1000, n),
            DeviceDemand::Fraction(m) => (m, 1),
        };
        *counts
            .entry((td.cpu_milli, milli, n, p.gpu_spec.join("|")))
            .or_default() += 1.0;
        total += 1.0;
    }
    let mut list: Vec<(Key, f64)> = counts.into_iter().collect();
    // sort.Reverse(Less): count descending, then key descending.
    list.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    let expected = 95.0 * total / 100.0;
    let mut cum = 0.0;
    let mut i = 0;
    while cum < expected && i < list.len() {
        cum += list[i].1;
        i += 1;
    }
    let norm = if i >= list.len() { total } else { cum };
    list.truncate(i);
    list.into_iter()
        .map(|((cpu, milli, n, spec), count)| WorkloadClass {
            kind: DeviceKind::Gpu,
            demand: TaskDemand {
                devices: match (milli, n) {
                    (0, _) | (_, 0) => DeviceDemand::None,
                    (1000, n) => DeviceDemand::Whole(n),
                    (m, _) => DeviceDemand::Fraction(m),
                },
                cpu_milli: cpu,
                memory_mib: 0,
            },
            models: spec
                .split('|')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            tasks: 1,
            weight: count / norm,
        })
        .collect()
}

/// Arrival order for one seed: sorted by name, shuffled, then tuned to `tune` x capacity.
pub fn arrival_order(
    pods: &[OpenbPod],
    capacity_milli: u64,
    tune: f64,
    seed: u64,
) -> Vec<OpenbPod> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut sorted: Vec<OpenbPod> = pods.to_vec();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut order = sorted.clone();
    order.shuffle(&mut rng);
    let target = tune * capacity_milli as f64;
    let mut total: u64 = order.iter().map(|p| p.total_gpu_milli()).sum();
    if tune <= 0.0 || sorted.is_empty() {
        return order;
    }
    if (total as f64) > target {
        while (total as f64) > target && !order.is_empty() {
            let idx = rng.random_range(0..order.len());
            let p = order.remove(idx);
            total -= p.total_gpu_milli();
        }
    } else {
        let mut i = 0;
        loop {
            let idx = rng.random_range(0..sorted.len());
            let mut p = sorted[idx].clone();
            let per_gpu = u64::from(match p.demand() {
                DeviceDemand::None => 0,
                _ => p.gpu_milli,
            });
            if (total + per_gpu) as f64 > target {
                break;
            }
            total += p.total_gpu_milli();
            p.name = format!("{}-tuned-{i}", p.name);
            order.push(p);
            i += 1;
        }
    }
    order
}

/// Python's `round(x, 0)` (half to even) for the arrival percentage.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Discretises (arrived %, value) records per whole arrived percent, as `merge_*_discrete.py`.
fn discretise(records: &[(f64, f64)], max_pct: usize) -> Vec<Option<f64>> {
    let mut by: BTreeMap<i64, (f64, u32)> = BTreeMap::new();
    for &(arr, v) in records {
        let e = by.entry(round_half_even(arr) as i64).or_default();
        e.0 += v;
        e.1 += 1;
    }
    (0..=max_pct as i64)
        .map(|a| {
            if let Some((s, n)) = by.get(&a) {
                return Some(s / f64::from(*n));
            }
            let (s, n) = by
                .range(a - 1..=a + 1)
                .fold((0.0, 0u32), |(s, n), (_, (s2, n2))| (s + s2, n + n2));
            (n > 0).then(|| s / f64::from(n))
        })
        .collect()
}

/// Runs one policy on one seed.
pub fn run_seed(
    base: &ClusterState,
    pods: &[OpenbPod],
    typical: &[WorkloadClass],
    policy: PolicyName,
    tune: f64,
    seed: u64,
) -> Result<FgdSeedResult, SimError> {
    let started = std::time::Instant::now();
    let (_, capacity) = base.capacity_milli(DeviceKind::Gpu);
    let total_gpus = capacity / 1000;
    let order = arrival_order(pods, capacity, tune, seed);
    let mut cluster = base.clone();
    let config = SchedulerConfig {
        policy,
        preemption: false,
        workload: typical.to_vec(),
        ..SchedulerConfig::default()
    };
    // The fragmentation measure of the report: FGD's, against the typical pods.
    let (frag_model, info) = {
        let ov = Overlay::new(base);
        (
            FragModel::from_workload(&ov.models, typical, false),
            ov.info.clone(),
        )
    };
    let host_frag = |c: &ClusterState, h: usize| {
        let hs = &c.hosts()[h];
        frag_model.host_frag(
            &info[h],
            &hs.free_milli,
            hs.free_cpu_milli,
            hs.free_memory_mib,
        )
    };
    let mut per_host: Vec<f64> = (0..cluster.hosts().len())
        .map(|h| host_frag(&cluster, h))
        .collect();
    let mut frag_sum: f64 = per_host.iter().sum();
    let mut arrived: u64 = 0;
    let mut used: u64 = 0;
    let mut failed = 0usize;
    let mut alloc_records = Vec::with_capacity(order.len());
    let mut frag_records = Vec::with_capacity(order.len());
    for (k, pod) in order.iter().enumerate() {
        let req = pod.request(&format!("{}#{k}", pod.name), "default", k as u64);
        arrived += pod.total_gpu_milli();
        // One pod per round, through the production round (no state: nothing under way, no
        // defragmentation in this packing experiment).
        let round = run_round(RoundInput {
            view: &cluster,
            pending: std::slice::from_ref(&req),
            reasons: &[],
            config: &config,
            state: &RoundState::default(),
            defrag: None,
            now_ms: k as u64,
        });
        match round.plan.placements.into_iter().next() {
            Some(placement) => {
                let hosts: Vec<usize> = placement
                    .tasks
                    .iter()
                    .filter_map(|t| cluster.host_position(&t.host))
                    .collect();
                cluster
                    .apply_placement(req, placement, k as u64)
                    .map_err(|e| {
                        SimError::Invariant(format!("{policy} placed {}: {e}", pod.name))
                    })?;
                used += pod.total_gpu_milli();
                for h in hosts {
                    let f = host_frag(&cluster, h);
                    frag_sum += f - per_host[h];
                    per_host[h] = f;
                }
            }
            None => failed += 1,
        }
        let arr_pct = arrived as f64 / total_gpus as f64 / 10.0;
        alloc_records.push((arr_pct, round2(used as f64 / total_gpus as f64 / 10.0)));
        let idle = capacity - used;
        let ratio = if idle == 0 {
            0.0
        } else {
            100.0 * frag_sum / idle as f64
        };
        frag_records.push((arr_pct, ratio));
    }
    let max_pct = (tune * 100.0).round() as usize;
    let curve: Vec<Option<f64>> = discretise(&alloc_records, max_pct)
        .into_iter()
        .map(|v| v.map(round2))
        .collect();
    let frag_curve = discretise(&frag_records, max_pct.max(90));
    let last_alloc = curve
        .iter()
        .rev()
        .find_map(|v| *v)
        .unwrap_or(used as f64 / total_gpus as f64 / 10.0);
    Ok(FgdSeedResult {
        seed,
        pods: order.len(),
        failed_pods: failed,
        unallocated_gpu_pct: round2(100.0 - last_alloc),
        frag_ratio_pct_at_90: frag_curve.get(90).copied().flatten().unwrap_or(f64::NAN),
        allocation_curve: curve,
        wall_ms: started.elapsed().as_millis() as u64,
    })
}

/// The published policy name (`sc_policy` suffix) matching ours.
fn published_name(p: PolicyName) -> Option<&'static str> {
    match p {
        PolicyName::BestFit => Some("BestFit"),
        PolicyName::Fgd => Some("FGD"),
        _ => None,
    }
}

/// Mean unallocated GPU % at 130% per published policy for one workload.
pub fn load_published(path: &Path, workload: &str) -> Result<BTreeMap<String, f64>, SimError> {
    let file = std::fs::File::open(path).map_err(|e| SimError::io(path, e))?;
    let mut rdr = csv::Reader::from_reader(file);
    let headers = rdr
        .headers()
        .map_err(|e| SimError::Csv {
            path: path.to_path_buf(),
            line: 1,
            message: e.to_string(),
        })?
        .clone();
    let idx = |n: &str| headers.iter().position(|h| h == n);
    let (Some(w), Some(p), Some(c)) = (idx("workload"), idx("sc_policy"), idx("130")) else {
        return Err(SimError::Csv {
            path: path.to_path_buf(),
            line: 1,
            message: "expected columns workload, sc_policy and 130".into(),
        });
    };
    let mut acc: BTreeMap<String, (f64, u32)> = BTreeMap::new();
    for rec in rdr.records().flatten() {
        if rec.get(w) != Some(workload) {
            continue;
        }
        let name = rec.get(p).unwrap_or("");
        let name = name.split_once('-').map(|(_, n)| n).unwrap_or(name);
        if let Some(v) = rec.get(c).and_then(|v| v.parse::<f64>().ok()) {
            let e = acc.entry(name.to_owned()).or_default();
            e.0 += 100.0 - v;
            e.1 += 1;
        }
    }
    Ok(acc
        .into_iter()
        .map(|(k, (s, n))| (k, round2(s / f64::from(n))))
        .collect())
}

fn mean(xs: impl Iterator<Item = f64>) -> (f64, f64) {
    let v: Vec<f64> = xs.filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len() as f64;
    (m, var.sqrt())
}

/// Runs the experiment: every policy on every seed, seeds on threads.
pub fn run_fgd(opts: &FgdOptions) -> Result<FgdReport, SimError> {
    let started = std::time::Instant::now();
    let mut nodes = load_nodes(&opts.nodes)?;
    if let Some(n) = opts.max_nodes {
        nodes.truncate(n);
    }
    let mut pods = load_pods(&opts.pods)?;
    pods.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(n) = opts.max_pods {
        pods.truncate(n);
    }
    if pods.is_empty() {
        return Err(SimError::Argument(format!(
            "{}: no pods",
            opts.pods.display()
        )));
    }
    if opts.policies.is_empty() || opts.seeds == 0 {
        return Err(SimError::Argument(
            "need at least one policy and one seed".into(),
        ));
    }
    let cluster = cluster_from_nodes(&nodes)?;
    let (_, capacity) = cluster.capacity_milli(DeviceKind::Gpu);
    let typical = typical_pods(&pods);
    let workload = opts
        .pods
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();

    let jobs: Vec<(PolicyName, u64)> = opts
        .policies
        .iter()
        .flat_map(|&p| (0..u64::from(opts.seeds)).map(move |s| (p, opts.first_seed + s)))
        .collect();
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        opts.threads
    }
    .min(jobs.len());
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<FgdSeedResult, SimError>>>> =
        Mutex::new((0..jobs.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= jobs.len() {
                    break;
                }
                let (p, seed) = jobs[i];
                let r = run_seed(&cluster, &pods, &typical, p, opts.tune, seed);
                results.lock().expect("results lock")[i] = Some(r);
            });
        }
    });
    let mut results = results.into_inner().expect("results lock");

    let mut published = match &opts.published {
        Some(p) if p.exists() => load_published(p, &workload)?,
        _ => BTreeMap::new(),
    };
    if published.is_empty() && workload == "openb_pod_list_default" {
        published = PUBLISHED_DEFAULT
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect();
    }
    let mut reports = Vec::new();
    for &p in &opts.policies {
        let mut seeds = Vec::new();
        for (i, job) in jobs.iter().enumerate() {
            if job.0 == p {
                seeds.push(results[i].take().expect("every job ran")?);
            }
        }
        let (un, sd) = mean(seeds.iter().map(|s| s.unallocated_gpu_pct));
        let (frag, _) = mean(seeds.iter().map(|s| s.frag_ratio_pct_at_90));
        let len = seeds
            .iter()
            .map(|s| s.allocation_curve.len())
            .max()
            .unwrap_or(0);
        let curve = (0..len)
            .map(|i| {
                let v: Vec<f64> = seeds
                    .iter()
                    .filter_map(|s| s.allocation_curve.get(i).copied().flatten())
                    .collect();
                (!v.is_empty()).then(|| round2(v.iter().sum::<f64>() / v.len() as f64))
            })
            .collect();
        reports.push(FgdPolicyReport {
            policy: p,
            unallocated_gpu_pct: round2(un),
            unallocated_gpu_pct_stddev: round2(sd),
            frag_ratio_pct_at_90: round2(frag),
            allocation_curve: curve,
            published_unallocated_gpu_pct: published_name(p)
                .and_then(|n| published.get(n).copied()),
            seeds,
        });
    }
    Ok(FgdReport {
        workload,
        nodes: nodes.len(),
        total_gpus: capacity / 1000,
        tune: opts.tune,
        typical_classes: typical.len(),
        policies: reports,
        published,
        wall_ms: started.elapsed().as_millis() as u64,
    })
}
