//! What a replay measures, and the arithmetic that turns per-job records into the reported numbers.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What happened to one job in a replay.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobRecord {
    pub submit_ms: u64,
    /// Devices the gang holds while it runs.
    pub devices: u64,
    /// Its work: the run time the trace says it needs.
    pub work_ms: u64,
    /// First time the gang was placed.
    pub first_start_ms: Option<u64>,
    pub completed_ms: Option<u64>,
    /// Why the job never ran to completion (static check or the engine's last pending reason).
    pub unplaceable: Option<String>,
}

/// Allocated devices over time, as a step function: `(time_ms, allocated devices from then on)`.
#[derive(Clone, Debug, Default)]
pub struct AllocationTrace {
    steps: Vec<(u64, u64)>,
}

impl AllocationTrace {
    pub fn record(&mut self, at_ms: u64, allocated: u64) {
        match self.steps.last_mut() {
            Some(last) if last.0 == at_ms => last.1 = allocated,
            Some(last) if last.1 == allocated => {}
            _ => self.steps.push((at_ms, allocated)),
        }
    }

    /// Allocated device-milliseconds in `[start, end)`.
    pub fn area(&self, start_ms: u64, end_ms: u64) -> u128 {
        let mut area = 0u128;
        for (i, &(t, a)) in self.steps.iter().enumerate() {
            let next = self.steps.get(i + 1).map_or(u64::MAX, |s| s.0);
            let (from, to) = (t.max(start_ms), next.min(end_ms));
            if to > from {
                area += u128::from(a) * u128::from(to - from);
            }
        }
        area
    }

    /// The time-average of allocation in `points` equal buckets of `[start, end)`, as percent of
    /// `capacity`: `(bucket start in s, percent)`.
    pub fn curve(
        &self,
        start_ms: u64,
        end_ms: u64,
        capacity: u64,
        points: usize,
    ) -> AllocationCurve {
        let mut curve = AllocationCurve::default();
        if end_ms <= start_ms || points == 0 || capacity == 0 {
            return curve;
        }
        let span = end_ms - start_ms;
        let mut si = 0; // first step that may matter
        for b in 0..points {
            let b0 = start_ms + span * b as u64 / points as u64;
            let b1 = start_ms + span * (b as u64 + 1) / points as u64;
            if b1 <= b0 {
                continue;
            }
            while si + 1 < self.steps.len() && self.steps[si + 1].0 <= b0 {
                si += 1;
            }
            let mut area: u128 = 0;
            let mut j = si;
            while j < self.steps.len() && self.steps[j].0 < b1 {
                let from = self.steps[j].0.max(b0);
                let to = self.steps.get(j + 1).map_or(b1, |s| s.0.min(b1)).max(from);
                if self.steps[j].0 <= b1 {
                    area += u128::from(self.steps[j].1) * u128::from(to - from);
                }
                j += 1;
            }
            let pct = area as f64 / (capacity as f64 * (b1 - b0) as f64) * 100.0;
            curve.t_s.push(round3(b0 as f64 / 1000.0));
            curve.allocated_pct.push(round3(pct));
        }
        curve
    }
}

/// Allocation over time for plots: time-averaged per bucket.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AllocationCurve {
    /// Bucket start, seconds since the window's first submission.
    pub t_s: Vec<f64>,
    /// Allocated devices over the bucket, percent of the cluster's devices.
    pub allocated_pct: Vec<f64>,
}

/// The numbers a replay reports for one policy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplayMetrics {
    pub policy: String,
    pub jobs_submitted: u64,
    pub jobs_completed: u64,
    pub jobs_unplaceable: u64,
    /// Allocated device-time over (cluster devices x busy period), percent.
    pub gpu_utilization_pct: f64,
    /// The same over the submission period only (first to last submission): how much of the
    /// offered work was served while it kept arriving, which queueing lowers.
    pub gpu_utilization_during_arrivals_pct: f64,
    pub avg_queue_delay_s: f64,
    pub p50_queue_delay_s: f64,
    pub p99_queue_delay_s: f64,
    pub avg_jct_s: f64,
    pub p50_jct_s: f64,
    pub p99_jct_s: f64,
    /// First submission to last completion.
    pub makespan_s: f64,
    /// Gang placements applied (a preempted job placed again counts again).
    pub gangs_placed: u64,
    pub gangs_within_required_domain_pct: f64,
    pub gangs_outside_required_domain: u64,
    /// Placements of a plan that `ClusterState::apply_placement` refused (stale or invalid).
    pub placements_rejected: u64,
    pub preemptions: u64,
    /// Device-seconds that preempted gangs had run since their last start: work lost without a
    /// checkpoint (in `resume` mode it is re-credited, see SIM.md).
    pub lost_work_gpu_s: f64,
    pub scheduling_rounds: u64,
    /// Unplaceable jobs by reason code.
    pub unplaceable_by_reason: BTreeMap<String, u64>,
    /// Gangs of 32 devices or more: how many, and their average queueing delay (what
    /// defragmentation is for).
    #[serde(default)]
    pub large_gangs: u64,
    #[serde(default)]
    pub avg_queue_delay_large_gangs_s: f64,
    /// Migrations the defragmenter made, and the device-hours they disturbed (checkpoint time).
    #[serde(default)]
    pub migrations: u64,
    #[serde(default)]
    pub migration_device_hours: f64,
    /// Migrations per 100 allocated device-hours: the churn.
    #[serde(default)]
    pub migrations_per_100_device_hours: f64,
    #[serde(default)]
    pub defrag_attempts: u64,
    #[serde(default)]
    pub defrag_placements: u64,
    /// Idle leases given back (device-hours). Traces carry no utilization: always 0 in replays.
    #[serde(default)]
    pub reclaimed_device_hours: f64,
    /// Free devices on partly used hosts, per cent of all free devices, time-averaged.
    #[serde(default)]
    pub fragmentation_pct: f64,
    /// The same over time (`allocated_pct` holds the fragmentation).
    #[serde(default)]
    pub fragmentation_curve: AllocationCurve,
    pub allocation_curve: AllocationCurve,
    /// Device failures (`--failures`), absent without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<super::failures::FailureMetrics>,
    /// Wall-clock seconds of this replay (non-deterministic).
    pub wall_s: f64,
    /// CPU seconds of the replaying thread (Linux, 10 ms resolution; 0 elsewhere). On a shared
    /// machine this, not `wall_s`, is the replay's cost (non-deterministic).
    pub cpu_s: f64,
}

impl ReplayMetrics {
    /// Fills the fragmentation average and curve from its trace (values in per mille).
    /// `start_ms`: the first submission (the curves' origin).
    pub fn set_fragmentation(&mut self, trace: &AllocationTrace, start_ms: u64, points: usize) {
        let start = start_ms;
        let end = start + (self.makespan_s * 1000.0) as u64;
        if end > start {
            self.fragmentation_pct =
                round3(trace.area(start, end) as f64 / (end - start) as f64 / 10.0);
            self.fragmentation_curve = trace.curve(start, end, 1000, points);
        }
    }
}

/// CPU time of the calling thread in seconds, from `/proc/thread-self/stat` (utime + stime at
/// 100 ticks per second); `None` where that file does not exist.
pub fn thread_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14 and stime 15 (1-based, whole line).
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// Rounds to 3 decimals so reports are stable and readable.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn mean(v: &[u64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().map(|x| *x as u128).sum::<u128>() as f64 / v.len() as f64
    }
}

/// The effective training time ratio, percent: over completed jobs, GPU-time weighted, the
/// job's work over its wall time from first start to completion. 100 when nothing completed.
pub fn ettr_pct(jobs: &[JobRecord]) -> f64 {
    let (mut work, mut wall) = (0u128, 0u128);
    for j in jobs {
        if let (Some(s), Some(c)) = (j.first_start_ms, j.completed_ms) {
            work += u128::from(j.devices) * u128::from(j.work_ms);
            wall += u128::from(j.devices) * u128::from(c - s);
        }
    }
    if wall == 0 {
        100.0
    } else {
        work as f64 / wall as f64 * 100.0
    }
}

/// Totals that the event loop accumulates.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    /// Allocated device-milliseconds.
    pub allocated_device_ms: u128,
    pub gangs_placed: u64,
    pub gangs_outside_required_domain: u64,
    pub placements_rejected: u64,
    pub preemptions: u64,
    pub lost_device_ms: u128,
    pub scheduling_rounds: u64,
    pub migrations: u64,
    /// Devices x checkpoint time of every migration.
    pub migration_device_ms: u128,
    pub defrag_attempts: u64,
    /// Gangs placed into a block the defragmenter freed.
    pub defrag_placements: u64,
}

/// Turns records and counters into the reported metrics.
pub fn summarize(
    policy: &str,
    jobs: &[JobRecord],
    counters: &Counters,
    allocation: &AllocationTrace,
    capacity_devices: u64,
    curve_points: usize,
) -> ReplayMetrics {
    let ms = |x: f64| round3(x / 1000.0);
    let start = jobs.iter().map(|j| j.submit_ms).min().unwrap_or(0);
    let end = jobs
        .iter()
        .filter_map(|j| j.completed_ms)
        .max()
        .unwrap_or(start)
        .max(start);
    let mut delays: Vec<u64> = jobs
        .iter()
        .filter_map(|j| j.first_start_ms.map(|s| s - j.submit_ms))
        .collect();
    delays.sort_unstable();
    let large: Vec<u64> = jobs
        .iter()
        .filter(|j| j.devices >= 32)
        .filter_map(|j| j.first_start_ms.map(|s| s - j.submit_ms))
        .collect();
    let mut jcts: Vec<u64> = jobs
        .iter()
        .filter_map(|j| j.completed_ms.map(|c| c - j.submit_ms))
        .collect();
    jcts.sort_unstable();
    let busy = end - start;
    let util = if busy == 0 || capacity_devices == 0 {
        0.0
    } else {
        counters.allocated_device_ms as f64 / (capacity_devices as f64 * busy as f64) * 100.0
    };
    let last_submit = jobs.iter().map(|j| j.submit_ms).max().unwrap_or(start);
    let util_arrivals = if last_submit > start && capacity_devices > 0 {
        allocation.area(start, last_submit) as f64
            / (capacity_devices as f64 * (last_submit - start) as f64)
            * 100.0
    } else {
        0.0
    };
    let mut by_reason = BTreeMap::new();
    for j in jobs {
        if let Some(r) = &j.unplaceable {
            *by_reason.entry(r.clone()).or_insert(0) += 1;
        }
    }
    let placed = counters.gangs_placed;
    let within = placed - counters.gangs_outside_required_domain;
    ReplayMetrics {
        policy: policy.to_owned(),
        jobs_submitted: jobs.len() as u64,
        jobs_completed: jobs.iter().filter(|j| j.completed_ms.is_some()).count() as u64,
        jobs_unplaceable: jobs.iter().filter(|j| j.unplaceable.is_some()).count() as u64,
        gpu_utilization_pct: round3(util),
        gpu_utilization_during_arrivals_pct: round3(util_arrivals),
        avg_queue_delay_s: ms(mean(&delays)),
        p50_queue_delay_s: ms(percentile(&delays, 50.0) as f64),
        p99_queue_delay_s: ms(percentile(&delays, 99.0) as f64),
        avg_jct_s: ms(mean(&jcts)),
        p50_jct_s: ms(percentile(&jcts, 50.0) as f64),
        p99_jct_s: ms(percentile(&jcts, 99.0) as f64),
        makespan_s: ms(busy as f64),
        gangs_placed: placed,
        gangs_within_required_domain_pct: if placed == 0 {
            100.0
        } else {
            round3(within as f64 / placed as f64 * 100.0)
        },
        gangs_outside_required_domain: counters.gangs_outside_required_domain,
        placements_rejected: counters.placements_rejected,
        preemptions: counters.preemptions,
        lost_work_gpu_s: ms(counters.lost_device_ms as f64),
        scheduling_rounds: counters.scheduling_rounds,
        unplaceable_by_reason: by_reason,
        large_gangs: large.len() as u64,
        avg_queue_delay_large_gangs_s: ms(mean(&large)),
        migrations: counters.migrations,
        migration_device_hours: round3(counters.migration_device_ms as f64 / 3_600_000.0),
        migrations_per_100_device_hours: if counters.allocated_device_ms == 0 {
            0.0
        } else {
            round3(
                counters.migrations as f64 * 100.0 * 3_600_000.0
                    / counters.allocated_device_ms as f64,
            )
        },
        defrag_attempts: counters.defrag_attempts,
        defrag_placements: counters.defrag_placements,
        reclaimed_device_hours: 0.0,
        fragmentation_pct: 0.0,
        fragmentation_curve: AllocationCurve::default(),
        allocation_curve: allocation.curve(start, end, capacity_devices, curve_points),
        failures: None,
        wall_s: 0.0,
        cpu_s: 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 99.0), 0);
    }

    #[test]
    fn curve_is_time_average() {
        let mut a = AllocationTrace::default();
        a.record(0, 4);
        a.record(500, 8);
        a.record(1000, 0);
        let c = a.curve(0, 2000, 8, 2);
        assert_eq!(c.t_s, vec![0.0, 1.0]);
        assert_eq!(c.allocated_pct, vec![75.0, 0.0]);
        assert_eq!(a.area(0, 2000), 4 * 500 + 8 * 500);
        assert_eq!(a.area(250, 750), 4 * 250 + 8 * 250);
    }
}
