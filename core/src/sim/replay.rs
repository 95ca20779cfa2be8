//! The trace replay: the production engine under a discrete-event clock.
//!
//! Events are arrivals, completions and ticks. After the
//! events of an instant are processed, and only if something changed, the replay calls the engine's
//! `schedule` with the simulated time as `now_ms`, applies every placement of the plan through
//! [`ClusterState::apply_placement`] (which re-checks it), and executes the plan's preemptions: the
//! victim is released and re-queued with its remaining work (`resume`) or all of it (`restart`).
//! Every placement is also checked against its required domain by the replay itself, from the cluster
//! file, independently of the engine. Everything is ordered, nothing is random: same input, same output.

use super::clock::{Event, EventQueue};
use super::cluster_file::SimCluster;
use super::error::SimError;
use super::metrics::{summarize, AllocationTrace, Counters, JobRecord, ReplayMetrics};
use super::philly::{gang_shape, Trace};
use crate::engine::{
    blocked_by_shape, plan_defrag, scattered_free_permille, ClusterState, DefragBudget,
    DeviceDemand, DeviceKind, GangPlacement, GangRequest, Plan, PolicyName, SchedulerConfig,
    TaskDemand, TopologyLevel,
};
use gangway_proto::ids::{JobId, QueueName};
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
}

impl Default for ReplayOptions {
    fn default() -> Self {
        Self {
            preempt: PreemptMode::Resume,
            curve_points: 200,
            defrag: None,
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

/// The engine call. One function, so the replay runs exactly what production runs.
fn place(
    view: &ClusterState,
    pending: &[GangRequest],
    config: &SchedulerConfig,
    now_ms: u64,
) -> Plan {
    crate::engine::schedule(view, pending, config, now_ms)
}

/// Domain ids per level per host, from the cluster file: the replay's own view of the topology.
struct Domains {
    /// `ids[level][host]`.
    ids: Vec<Vec<u32>>,
    host_index: HashMap<String, usize>,
}

impl Domains {
    fn new(cluster: &SimCluster) -> Self {
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
    fn within(
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

/// Replays `jobs` (any order; they are ordered by submission) on `cluster` under `policy`.
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
    let domains = Domains::new(cluster);
    let capacity = cluster.total_devices(DeviceKind::Gpu);

    // Jobs in submission order; `order[k]` is the caller's index of the k-th.
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&i| (jobs[i].submit_ms, i));
    let jobs: Vec<&SimJob> = order.iter().map(|&i| &jobs[i]).collect();
    let ids: Vec<JobId> = jobs.iter().map(|j| JobId::new(j.name.clone())).collect();
    let mut by_id: HashMap<&str, usize> = HashMap::with_capacity(jobs.len());
    for (i, j) in jobs.iter().enumerate() {
        if by_id.insert(j.name.as_str(), i).is_some() {
            return Err(SimError::Argument(format!(
                "job name {} is used twice",
                j.name
            )));
        }
    }

    let mut records: Vec<JobRecord> = jobs
        .iter()
        .map(|j| JobRecord {
            submit_ms: j.submit_ms,
            devices: j.devices(),
            ..JobRecord::default()
        })
        .collect();
    let mut remaining: Vec<u64> = jobs.iter().map(|j| j.duration_ms).collect();
    let mut generation: Vec<u32> = vec![0; jobs.len()];
    let mut started: Vec<Option<u64>> = vec![None; jobs.len()];

    let request = |i: usize, remaining_ms: u64| GangRequest {
        id: ids[i].clone(),
        queue: QueueName::new(jobs[i].queue.clone()),
        priority: jobs[i].priority,
        tasks: jobs[i].tasks,
        per_task: TaskDemand {
            devices: DeviceDemand::Whole(jobs[i].devices_per_task),
            cpu_milli: 0,
            memory_mib: 0,
        },
        kind: DeviceKind::Gpu,
        models: Vec::new(),
        required: jobs[i].required,
        preferred: jobs[i].preferred,
        estimated_runtime_ms: Some(remaining_ms),
        checkpointable: options.preempt == PreemptMode::Resume,
        submitted_at_ms: jobs[i].submit_ms,
        hosts: Default::default(),
    };

    let mut queue = EventQueue::new();
    for (i, j) in jobs.iter().enumerate() {
        queue.push(j.submit_ms, Event::Arrival { job: i });
    }
    let mut state = cluster.build_state();
    // Pending gangs in (submission, index) order, and their job indices.
    let mut pending: Vec<GangRequest> = Vec::new();
    let mut pending_ix: Vec<usize> = Vec::new();
    let mut infeasible_cache = BTreeMap::new();
    let mut counters = Counters::default();
    let mut allocation = AllocationTrace::default();
    let mut allocated: u64 = 0;
    let mut last_t: u64 = jobs.first().map_or(0, |j| j.submit_ms);
    let mut tick_at: Option<u64> = None;
    // Running gangs by start time, to know when the next one passes min-runtime.
    let mut by_start: BTreeSet<(u64, usize)> = BTreeSet::new();
    let mut gone: Vec<bool> = vec![false; jobs.len()];
    // Pending gangs the last round found blocked by shape, and when defrag last tried each.
    let mut shape_blocked: BTreeSet<JobId> = BTreeSet::new();
    let mut defrag_tried: HashMap<usize, u64> = HashMap::new();
    let mut fragmentation = AllocationTrace::default();

    while let Some(now) = queue.peek_time() {
        counters.allocated_device_ms += u128::from(allocated) * u128::from(now - last_t);
        last_t = now;
        let mut changed = false;
        while let Some(ev) = queue.pop_at(now) {
            match ev {
                Event::Completion { job, run } => {
                    if generation[job] != run || started[job].is_none() {
                        continue; // superseded by a preemption
                    }
                    state.release(&ids[job]).ok_or_else(|| {
                        SimError::Invariant(format!("completed job {} held nothing", ids[job]))
                    })?;
                    allocated -= records[job].devices;
                    if let Some(since) = started[job].take() {
                        by_start.remove(&(since, job));
                    }
                    remaining[job] = 0;
                    records[job].completed_ms = Some(now);
                    changed = true;
                }
                Event::Arrival { job } => {
                    if let Some(why) =
                        static_infeasibility(cluster, &domains, &mut infeasible_cache, jobs[job])
                    {
                        records[job].unplaceable = Some(why);
                    } else {
                        pending.push(request(job, remaining[job]));
                        pending_ix.push(job);
                        changed = true;
                    }
                }
                Event::Tick => {
                    tick_at = None;
                    changed = true;
                }
            }
        }

        if changed && !pending.is_empty() {
            for _ in 0..16 {
                let plan = place(&state, &pending, &config, now);
                counters.scheduling_rounds += 1;
                if options.defrag.is_some() {
                    shape_blocked = plan
                        .pending
                        .iter()
                        .filter(|p| blocked_by_shape(&p.reason))
                        .map(|p| p.job.clone())
                        .collect();
                }
                let mut placed = 0usize;
                for gp in plan.placements {
                    let Some(&i) = by_id.get(gp.job.as_str()) else {
                        counters.placements_rejected += 1;
                        continue;
                    };
                    if started[i].is_some() || records[i].completed_ms.is_some() || gone[i] {
                        counters.placements_rejected += 1;
                        continue;
                    }
                    let within = jobs[i]
                        .required
                        .is_none_or(|l| domains.within(cluster, &gp, l));
                    match state.apply_placement(request(i, remaining[i]), gp, now) {
                        Ok(()) => {
                            counters.gangs_placed += 1;
                            if !within {
                                counters.gangs_outside_required_domain += 1;
                            }
                            gone[i] = true;
                            placed += 1;
                            started[i] = Some(now);
                            by_start.insert((now, i));
                            records[i].first_start_ms.get_or_insert(now);
                            allocated += records[i].devices;
                            queue.push(
                                now + remaining[i],
                                Event::Completion {
                                    job: i,
                                    run: generation[i],
                                },
                            );
                        }
                        Err(_) => counters.placements_rejected += 1,
                    }
                }
                let mut requeue = Vec::new();
                for p in &plan.preemptions {
                    let Some(&v) = by_id.get(p.victim.as_str()) else {
                        continue;
                    };
                    let Some(since) = started[v] else { continue };
                    state.release(&ids[v]).ok_or_else(|| {
                        SimError::Invariant(format!("preempted job {} held nothing", ids[v]))
                    })?;
                    let ran = now - since;
                    counters.preemptions += 1;
                    counters.lost_device_ms += u128::from(ran) * u128::from(records[v].devices);
                    remaining[v] = match options.preempt {
                        PreemptMode::Resume => remaining[v] - ran.min(remaining[v]),
                        PreemptMode::Restart => jobs[v].duration_ms,
                    };
                    generation[v] += 1;
                    started[v] = None;
                    by_start.remove(&(since, v));
                    allocated -= records[v].devices;
                    requeue.push(v);
                }
                if placed > 0 {
                    let mut k = 0;
                    pending.retain(|_| {
                        let keep = !gone[pending_ix[k]];
                        k += 1;
                        keep
                    });
                    pending_ix.retain(|i| !gone[*i]);
                }
                for v in &requeue {
                    gone[*v] = false;
                    let key = (jobs[*v].submit_ms, *v);
                    let pos = pending_ix.partition_point(|&i| (jobs[i].submit_ms, i) < key);
                    pending_ix.insert(pos, *v);
                    pending.insert(pos, request(*v, remaining[*v]));
                }
                let capped = pending.len() > config.max_gangs_per_round;
                if requeue.is_empty() && !(placed > 0 && capped) {
                    break;
                }
                if pending.is_empty() {
                    break;
                }
            }
        }
        if let (Some(d), true) = (&options.defrag, changed) {
            // The first large gang (in queue order) that waits for shape, if the churn budget
            // allows another migration and it was not tried too recently.
            let allowed = (counters.allocated_device_ms as f64
                / 3_600_000.0
                / d.device_hours_per_migration) as u64
                + d.burst;
            let candidates: Vec<(usize, usize)> = pending_ix
                .iter()
                .copied()
                .enumerate()
                .filter(|&(_, i)| {
                    records[i].devices >= d.min_gang_devices
                        && shape_blocked.contains(&ids[i])
                        && defrag_tried.get(&i).is_none_or(|&t| now >= t + d.retry_ms)
                })
                .take(d.gangs_per_round)
                .collect();
            let mut found = None;
            for (k, i) in candidates {
                if counters.migrations >= allowed {
                    break;
                }
                defrag_tried.insert(i, now);
                counters.defrag_attempts += 1;
                if let Some(plan) = plan_defrag(&state, &pending[k], &config, &d.budget, now)
                    .filter(|p| counters.migrations + p.moves.len() as u64 <= allowed)
                {
                    found = Some((k, i, plan));
                    break;
                }
            }
            if let Some((k, i, plan)) = found {
                for m in &plan.moves {
                    let Some(&v) = by_id.get(m.job.as_str()) else {
                        continue;
                    };
                    let Some(since) = started[v] else { continue };
                    state.release(&ids[v]).ok_or_else(|| {
                        SimError::Invariant(format!("migrated job {} held nothing", ids[v]))
                    })?;
                    // Checkpointed at the move: the work done is kept, the move costs the
                    // checkpoint and restore time.
                    let ran = now - since;
                    remaining[v] = remaining[v] - ran.min(remaining[v]) + d.checkpoint_ms;
                    generation[v] += 1;
                    by_start.remove(&(since, v));
                    state
                        .apply_placement(request(v, remaining[v]), m.to.clone(), now)
                        .map_err(|e| {
                            SimError::Invariant(format!("migration of {} failed: {e}", ids[v]))
                        })?;
                    started[v] = Some(now);
                    by_start.insert((now, v));
                    queue.push(
                        now + remaining[v],
                        Event::Completion {
                            job: v,
                            run: generation[v],
                        },
                    );
                    counters.migrations += 1;
                    counters.migration_device_ms +=
                        u128::from(m.devices) * u128::from(d.checkpoint_ms);
                }
                // The freed block goes to the gang in the same step: nothing else can take it.
                state
                    .apply_placement(request(i, remaining[i]), plan.gang.clone(), now)
                    .map_err(|e| {
                        SimError::Invariant(format!("defragmented gang {} failed: {e}", ids[i]))
                    })?;
                let within = jobs[i]
                    .required
                    .is_none_or(|l| domains.within(cluster, &plan.gang, l));
                if !within {
                    counters.gangs_outside_required_domain += 1;
                }
                counters.gangs_placed += 1;
                counters.defrag_placements += 1;
                started[i] = Some(now);
                by_start.insert((now, i));
                records[i].first_start_ms.get_or_insert(now);
                allocated += records[i].devices;
                queue.push(
                    now + remaining[i],
                    Event::Completion {
                        job: i,
                        run: generation[i],
                    },
                );
                pending.remove(k);
                pending_ix.remove(k);
                shape_blocked.remove(&ids[i]);
            }
        }
        allocation.record(now, allocated);
        if options.defrag.is_some() || changed {
            fragmentation.record(now, scattered_free_permille(&state, TopologyLevel::Host));
        }
        // Time alone changes a decision only through preemption's min-runtime: a round is due when
        // a running gang becomes old enough to be a victim, at most every tick.
        if tick_ms > 0 && config.preemption && !pending.is_empty() && tick_at.is_none() {
            let young_from = (now + 1).saturating_sub(config.min_runtime_ms);
            if let Some(&(start, _)) = by_start.range((young_from, 0)..).next() {
                let at = (now + tick_ms).max(start + config.min_runtime_ms);
                tick_at = Some(at);
                queue.push(at, Event::Tick);
            }
        }
    }

    // Whatever still waits can never run: nothing runs and nothing else arrives.
    if !pending.is_empty() {
        let plan = place(&state, &pending, &config, last_t);
        let reasons: HashMap<&str, String> = plan
            .pending
            .iter()
            .map(|p| {
                let code = serde_json::to_value(&p.reason)
                    .ok()
                    .and_then(|v| v.get("code").and_then(|c| c.as_str().map(str::to_owned)))
                    .unwrap_or_else(|| "unknown".into());
                (p.job.as_str(), code)
            })
            .collect();
        for &i in &pending_ix {
            let code = reasons
                .get(ids[i].as_str())
                .cloned()
                .unwrap_or_else(|| "not_examined".into());
            records[i].unplaceable = Some(format!("stuck_{code}"));
        }
    }

    let mut metrics = summarize(
        policy.as_str(),
        &records,
        &counters,
        &allocation,
        capacity,
        options.curve_points,
    );
    let first_submit = jobs.first().map_or(0, |j| j.submit_ms);
    metrics.set_fragmentation(&fragmentation, first_submit, options.curve_points);
    metrics.wall_s = super::metrics::round3(wall.elapsed().as_secs_f64());
    if let (Some(a), Some(b)) = (cpu0, super::metrics::thread_cpu_s()) {
        metrics.cpu_s = super::metrics::round3(b - a);
    }
    Ok(metrics)
}
