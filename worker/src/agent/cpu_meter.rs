//! [`CpuMeter`]: how busy each task's process group kept the CPU since the last look.
//!
//! Fake devices have no utilization of their own. To make idle-lease reclamation testable end to
//! end without a GPU, a fake device reports the CPU use of the task holding it: a task that
//! computes looks busy, a task that sleeps (or waits on a notebook kernel) looks idle, as it would
//! on a real GPU.

use crate::driver::{clock_ticks_per_second, group_cpu_ticks};
use std::collections::BTreeMap;
use std::time::Instant;

#[derive(Debug)]
pub(crate) struct CpuMeter {
    ticks_per_second: u64,
    /// Process group -> (when it was last sampled, its CPU ticks then).
    last: BTreeMap<i32, (Instant, u64)>,
}

impl CpuMeter {
    pub(crate) fn new() -> Self {
        Self {
            ticks_per_second: clock_ticks_per_second(),
            last: BTreeMap::new(),
        }
    }

    /// Percent of one CPU each group in `groups` used since it was last sampled (0 the first
    /// time), capped at 100. Groups not named are forgotten.
    pub(crate) fn sample(&mut self, groups: &[i32], now: Instant) -> BTreeMap<i32, u8> {
        self.last.retain(|g, _| groups.contains(g));
        let mut out = BTreeMap::new();
        for (group, ticks) in group_cpu_ticks(groups) {
            let pct = match self.last.insert(group, (now, ticks)) {
                Some((then, before)) => {
                    let secs = now.saturating_duration_since(then).as_secs_f64();
                    let used = ticks.saturating_sub(before) as f64 / self.ticks_per_second as f64;
                    if secs > 0.0 {
                        (used / secs * 100.0).round().min(100.0) as u8
                    } else {
                        0
                    }
                }
                None => 0,
            };
            out.insert(group, pct);
        }
        out
    }
}
