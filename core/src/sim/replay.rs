//! The trace replay: the production engine under a discrete-event clock.
//!
//! Events are arrivals, completions, checkpoints written and ticks, each the command a client,
//! a worker or the leader would commit, applied by the replicated state machine
//! ([`crate::state::ClusterStore::apply`]) at the simulated time. After the events of an instant,
//! and only if something changed, the replay runs the production round
//! ([`crate::engine::run_round`]) on the state and commits its outcome as the leader does: a
//! preempted gang checkpoints (instantly, `resume`) and is re-queued with its remaining work, or
//! is stopped and starts over (`restart`, its jobs cannot checkpoint).
//! Every placement is also checked against its required domain by the replay itself, from the cluster
//! file, independently of the engine. Everything is ordered, nothing is random: same input, same output.

use super::clock::Event;
use super::cluster_file::SimCluster;
use super::error::SimError;
use super::failures::{FailureMetrics, FailureOptions};
use super::metrics::{summarize, AllocationTrace, ReplayMetrics};
use super::philly::{gang_shape, Trace};
use super::world::World;
use crate::engine::{
    scattered_free_permille, DefragBudget, DeviceKind, GangPlacement, PolicyName, TopologyLevel,
};
use gangway_proto::ids::QueueName;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

/// One job to replay, whatever trace it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimJob {
    pub name: String,
    pub queue: String,
    pub submit_ms: u64,
    pub duration_ms: u64,
    pub tasks: u32,
    pub devices_per_task: u32,
    pub required: Option<TopologyLevel>,
    pub preferred: Option<TopologyLevel>,
    pub priority: i32,
}

impl SimJob {
    pub fn devices(&self) -> u64 {
        u64::from(self.tasks) * u64::from(self.devices_per_task)
    }
}

/// What happens to a preempted gang's work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PreemptMode {
    /// Re-queued with its remaining work, as if checkpointed at the instant of preemption.
    Resume,
    /// Re-queued with all of its work: no checkpoint.
    Restart,
}

impl std::str::FromStr for PreemptMode {
    type Err = SimError;
    fn from_str(s: &str) -> Result<Self, SimError> {
        match s {
            "resume" => Ok(PreemptMode::Resume),
            "restart" => Ok(PreemptMode::Restart),
            other => Err(SimError::Argument(format!(
                "unknown preemption mode {other:?}: expected resume or restart"
            ))),
        }
    }
}

/// Continuous defragmentation in a replay: the engine's defragmenter, with migration costs.
#[derive(Clone, Debug)]
pub struct DefragOptions {
    pub budget: DefragBudget,
    /// What each migration costs the moved gang: checkpoint, stop, restore (default 60 s). The
    /// gang finishes this much later, and its devices count as disrupted for this long.
    pub checkpoint_ms: u64,
    /// The churn bound: at most one migration per this many allocated device-hours (plus a
    /// burst), as a token bucket over the replay.
    pub device_hours_per_migration: f64,
    pub burst: u64,
    /// Gangs this large or larger are defragmented for.
    pub min_gang_devices: u64,
    /// A gang is tried again at most this often (simulated time).
    pub retry_ms: u64,
    /// Waiting gangs tried per scheduling round, in queue order.
    pub gangs_per_round: usize,
    /// How long the freed block is held for its gang (the leader's `defrag_reservation`).
    pub reservation_ms: u64,
}

impl Default for DefragOptions {
    fn default() -> Self {
        Self {
            // Clearing a rack of scattered single-GPU jobs takes many small moves; the churn
            // bound below, not this, is what limits disruption over time.
            budget: DefragBudget {
                max_moves: 48,
                ..DefragBudget::default()
            },
            checkpoint_ms: 60_000,
            device_hours_per_migration: 100.0,
            burst: 4,
            min_gang_devices: 16,
            retry_ms: 5 * 60_000,
            gangs_per_round: 4,
            reservation_ms: 10 * 60_000,
        }
    }
}

/// Options of one replay.
#[derive(Clone, Debug)]
pub struct ReplayOptions {
    pub preempt: PreemptMode,
    /// Points of the allocation curve in the report.
    pub curve_points: usize,
    /// `None`: no defragmentation.
    pub defrag: Option<DefragOptions>,
    /// Checkpointable jobs (`resume`) write a checkpoint every this many ms of their lease
    /// (`--checkpoint-interval`); `None`: only when asked (preemption, migration).
    pub checkpoint_interval_ms: Option<u64>,
    /// Device failures (`--failures`); `None`: devices never fail.
    pub failures: Option<FailureOptions>,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        Self {
            preempt: PreemptMode::Resume,
            curve_points: 200,
            defrag: None,
            checkpoint_interval_ms: None,
            failures: None,
        }
    }
}

/// Turns the trace jobs submitted in `[from_s, to_s)` (seconds since the trace's start) into gangs on
/// `cluster` (see [`gang_shape`]). A job's virtual cluster is its queue; one the cluster file does not
/// list goes to `[replay] default_queue`, or is an error.
pub fn jobs_from_trace(
    trace: &Trace,
    cluster: &SimCluster,
    from_s: u64,
    to_s: u64,
) -> Result<Vec<SimJob>, SimError> {
    let host_devices = cluster
        .hosts
        .iter()
        .map(|h| h.devices.len() as u32)
        .max()
        .unwrap_or(0);
    let mut per_rack: BTreeMap<(String, String), u32> = BTreeMap::new();
    for h in &cluster.hosts {
        let k = SimCluster::domain_of(h, TopologyLevel::Rack);
        *per_rack.entry((k.2, k.3)).or_insert(0) += h.devices.len() as u32;
    }
    let rack_devices = per_rack.values().copied().max().unwrap_or(0);
    let mut out = Vec::new();
    for j in trace
        .jobs
        .iter()
        .filter(|j| j.submit_s >= from_s && j.submit_s < to_s)
    {
        let queue = if cluster
            .queues
            .contains_key(&QueueName::new(j.queue.clone()))
        {
            j.queue.clone()
        } else if let Some(d) = &cluster.replay.default_queue {
            d.0.clone()
        } else {
            return Err(SimError::Argument(format!(
                "{}: job on line {} is in virtual cluster {:?}, which {} lists in no [[queues]] \
                 entry and has no [replay] default_queue",
                trace.source.display(),
                j.line,
                j.queue,
                cluster.source.display()
            )));
        };
        let (tasks, per, required, preferred) = gang_shape(j.gpus, host_devices, rack_devices);
        out.push(SimJob {
            name: format!("j{}", j.line),
            queue,
            submit_ms: j.submit_s * 1000,
            duration_ms: j.duration_ms,
            tasks,
            devices_per_task: per,
            required: Some(required),
            preferred,
            priority: 0,
        });
    }
    Ok(out)
}

/// Raises the offered load: submissions come `factor` times faster (inter-arrival times divided by
/// `factor`, counted from the first submission), sizes and durations unchanged. 1 is the trace as is.
pub fn compress_arrivals(jobs: &mut [SimJob], factor: f64) -> Result<(), SimError> {
    if !(factor.is_finite() && factor > 0.0) {
        return Err(SimError::Argument(format!(
            "load factor {factor}: must be a number > 0"
        )));
    }
    let Some(start) = jobs.iter().map(|j| j.submit_ms).min() else {
        return Ok(());
    };
    for j in jobs {
        j.submit_ms = start + ((j.submit_ms - start) as f64 / factor).round() as u64;
    }
    Ok(())
}

/// Domain ids per level per host, from the cluster file: the replay's own view of the topology.
pub(super) struct Domains {
    /// `ids[level][host]`.
    ids: Vec<Vec<u32>>,
    host_index: HashMap<String, usize>,
}

impl Domains {
    pub(super) fn new(cluster: &SimCluster) -> Self {
        let mut ids = Vec::new();
        for level in TopologyLevel::ALL {
            let mut map = BTreeMap::new();
            let v = cluster
                .hosts
                .iter()
                .map(|h| {
                    let n = map.len() as u32;
                    *map.entry(SimCluster::domain_of(h, level)).or_insert(n)
                })
                .collect();
            ids.push(v);
        }
        let host_index = cluster
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (h.name.0.clone(), i))
            .collect();
        Self { ids, host_index }
    }

    fn level_ix(level: TopologyLevel) -> usize {
        TopologyLevel::ALL
            .iter()
            .position(|l| *l == level)
            .expect("level in ALL")
    }

    /// Whether every task of the placement sits in one domain of `level` (and, for `nvlink`, every
    /// device in one NVLink domain of one host).
    pub(super) fn within(
        &self,
        cluster: &SimCluster,
        placement: &GangPlacement,
        level: TopologyLevel,
    ) -> bool {
        let ids = &self.ids[Self::level_ix(level)];
        let mut dom = None;
        let mut nv = None;
        for t in &placement.tasks {
            let Some(&h) = self.host_index.get(t.host.as_str()) else {
                return false;
            };
            if *dom.get_or_insert(ids[h]) != ids[h] {
                return false;
            }
            if level == TopologyLevel::Nvlink {
                for d in &t.devices {
                    let Some(spec) = cluster.hosts[h].devices.get(usize::from(d.index)) else {
                        return false;
                    };
                    if *nv.get_or_insert(spec.nvlink_domain) != spec.nvlink_domain {
                        return false;
                    }
                }
            }
        }
        true
    }
}

/// Why a gang can never be placed on the empty cluster, if it cannot.
fn static_infeasibility(
    cluster: &SimCluster,
    domains: &Domains,
    cache: &mut BTreeMap<(Option<TopologyLevel>, u32), u64>,
    job: &SimJob,
) -> Option<String> {
    if job.tasks == 0 || job.devices_per_task == 0 {
        return Some("empty_gang".into());
    }
    let best = *cache
        .entry((job.required, job.devices_per_task))
        .or_insert_with(|| {
            let mut slots: BTreeMap<u32, u64> = BTreeMap::new();
            for (h, host) in cluster.hosts.iter().enumerate() {
                let d = job
                    .required
                    .map_or(0, |l| domains.ids[Domains::level_ix(l)][h]);
                let per_host = if job.required == Some(TopologyLevel::Nvlink) {
                    let mut by_nv: BTreeMap<u16, u32> = BTreeMap::new();
                    for s in &host.devices {
                        *by_nv.entry(s.nvlink_domain).or_insert(0) += 1;
                    }
                    by_nv
                        .values()
                        .map(|n| n / job.devices_per_task)
                        .max()
                        .unwrap_or(0)
                } else {
                    host.devices.len() as u32 / job.devices_per_task
                };
                *slots.entry(d).or_insert(0) += u64::from(per_host);
            }
            slots.values().copied().max().unwrap_or(0)
        });
    let tasks_fit = if matches!(
        job.required,
        Some(TopologyLevel::Host | TopologyLevel::Nvlink)
    ) {
        job.tasks == 1 && best >= 1
    } else {
        best >= u64::from(job.tasks)
    };
    (!tasks_fit).then(|| {
        format!(
            "larger_than_any_{}",
            job.required.map_or("cluster".to_owned(), |l| l.to_string())
        )
    })
}

/// Replays `jobs` (any order; they are ordered by submission) on `cluster` under `policy`: every
/// event becomes the command the leader or a worker would commit, applied by the replicated state
/// machine at the simulated time (see [`super::world`]).
pub fn replay(
    cluster: &SimCluster,
    jobs: &[SimJob],
    policy: PolicyName,
    options: &ReplayOptions,
) -> Result<ReplayMetrics, SimError> {
    let wall = Instant::now();
    let cpu0 = super::metrics::thread_cpu_s();
    let config = cluster.scheduler_config(policy);
    let tick_ms = cluster.replay.tick_ms;
    let capacity = cluster.total_devices(DeviceKind::Gpu);

    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&i| (jobs[i].submit_ms, i));
    let jobs: Vec<&SimJob> = order.iter().map(|&i| &jobs[i]).collect();
    let mut names = BTreeSet::new();
    if let Some(j) = jobs.iter().find(|j| !names.insert(j.name.as_str())) {
        return Err(SimError::Argument(format!(
            "job name {} is used twice",
            j.name
        )));
    }
    let domains = Domains::new(cluster);
    let mut infeasible_cache = BTreeMap::new();
    let mut world = World::new(cluster, &jobs, config.clone(), options)?;
    for (i, j) in jobs.iter().enumerate() {
        world.queue.push(j.submit_ms, Event::Arrival { job: i });
    }
    let mut allocation = AllocationTrace::default();
    let mut fragmentation = AllocationTrace::default();
    let mut last_t: u64 = jobs.first().map_or(0, |j| j.submit_ms);
    let mut tick_at: Option<u64> = None;

    while let Some(now) = world.queue.peek_time() {
        world.counters.allocated_device_ms +=
            u128::from(world.allocated) * u128::from(now - last_t);
        last_t = now;
        let mut changed = false;
        while let Some(ev) = world.queue.pop_at(now) {
            changed |= match ev {
                Event::Completion { job, epoch } => world.complete(now, job, epoch),
                Event::Checkpoint {
                    job,
                    epoch,
                    request: 0,
                    step,
                } => world.periodic_checkpoint(now, job, epoch, step),
                Event::Checkpoint {
                    job,
                    epoch,
                    request,
                    step,
                } => world.checkpoint(now, job, epoch, request, step),
                Event::DeviceFailure { device } => world.device_failure(now, device)?,
                Event::DeviceRepaired { device } => world.device_repaired(now, device)?,
                Event::Resubmit { job } => world.resubmit(now, job)?,
                Event::Arrival { job } => {
                    match static_infeasibility(cluster, &domains, &mut infeasible_cache, jobs[job])
                    {
                        Some(why) => {
                            world.records[job].unplaceable = Some(why);
                            false
                        }
                        None => {
                            world.submit(now, job)?;
                            true
                        }
                    }
                }
                Event::Tick => {
                    tick_at = None;
                    true
                }
            };
        }
        if changed {
            world.schedule(now)?;
        }
        world.arm_failures(now);
        allocation.record(now, world.allocated);
        if options.defrag.is_some() || changed {
            fragmentation.record(
                now,
                scattered_free_permille(world.store.engine(), TopologyLevel::Host),
            );
        }
        // Time alone changes a decision only through preemption's min-runtime: a round is due when
        // a running gang becomes old enough to be a victim, at most every tick.
        let waiting = world.store.job_table().pending_count() > 0;
        if tick_ms > 0 && config.preemption && waiting && tick_at.is_none() {
            let young_from = (now + 1).saturating_sub(config.min_runtime_ms);
            if let Some(&(start, _)) = world.by_start.range((young_from, 0)..).next() {
                let at = (now + tick_ms).max(start + config.min_runtime_ms);
                tick_at = Some(at);
                world.queue.push(at, Event::Tick);
            }
        }
    }

    // Whatever still waits can never run: nothing runs and nothing else arrives.
    for (i, code) in world.stuck(last_t) {
        world.records[i].unplaceable = Some(format!("stuck_{code}"));
    }

    let mut metrics = summarize(
        policy.as_str(),
        &world.records,
        &world.counters,
        &allocation,
        capacity,
        options.curve_points,
    );
    let first_submit = jobs.first().map_or(0, |j| j.submit_ms);
    metrics.set_fragmentation(&fragmentation, first_submit, options.curve_points);
    if let Some(f) = &options.failures {
        let end = first_submit + (metrics.makespan_s * 1000.0).round() as u64;
        let mut counters = world.failure_counters.clone();
        counters.repairs = world.state_repairs();
        metrics.failures = Some(FailureMetrics::summarize(
            f,
            options.checkpoint_interval_ms,
            &counters,
            end,
            super::metrics::ettr_pct(&world.records),
        ));
    }
    metrics.wall_s = super::metrics::round3(wall.elapsed().as_secs_f64());
    if let (Some(a), Some(b)) = (cpu0, super::metrics::thread_cpu_s()) {
        metrics.cpu_s = super::metrics::round3(b - a);
    }
    Ok(metrics)
}
