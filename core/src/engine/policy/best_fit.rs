//! `best-fit`: place where the least free capacity remains.
//!
//! For one task this is the FGD paper's BestFit baseline (simulator plugin `BestFitScore`): a host
//! scores `100 * (1 - (0.5 * cpu_left/max_cpu + 0.5 * devices_left/max_devices))` after the task,
//! truncated to an integer as Kubernetes scores are, the best score wins and ties go to the
//! first host (the simulator's Kubernetes fork takes the smallest node name); a fractional
//! task takes the device with the least room that fits. For gangs, candidate domains are taken
//! least-remaining first, and tasks fill hosts in the same order.

use crate::engine::config::PolicyName;
use crate::engine::framework::{HeadOfLine, Pick, Policy, QuotaMode, ScoreCx, TieBreak};
use crate::engine::index::{HostSlot, TaskShape};
use crate::engine::job::DeviceDemand;

pub struct BestFit;

impl Policy for BestFit {
    fn name(&self) -> PolicyName {
        PolicyName::BestFit
    }
    fn head_of_line(&self) -> HeadOfLine {
        HeadOfLine::Skip
    }
    fn quota_mode(&self) -> QuotaMode {
        QuotaMode::Ignore
    }
    fn exhaustive(&self) -> bool {
        // Every host is scored whenever the round scans hosts directly (a few gangs, as in the
        // FGD experiment) or the cluster has at most `SCAN_ALL_LIMIT` distinct host shapes; only
        // beyond that are the tightest shapes scored.
        false
    }
    fn tie_break(&self) -> TieBreak {
        // The simulator's Kubernetes fork picks the lexicographically smallest node name among
        // the best (for reproducibility); openb registers nodes in name order.
        TieBreak::LowestIndex
    }
    fn score(
        &self,
        cx: &ScoreCx<'_, '_>,
        host: usize,
        slot: &HostSlot,
        task: &TaskShape,
    ) -> Option<(f64, Pick)> {
        best_fit_score(cx, host, slot, task)
    }
}

pub(crate) fn best_fit_score(
    cx: &ScoreCx<'_, '_>,
    host: usize,
    slot: &HostSlot,
    task: &TaskShape,
) -> Option<(f64, Pick)> {
    let cpu_left = slot.cpu.saturating_sub(task.cpu) as f64;
    let dev_left = slot.free_total().saturating_sub(task.milli()) as f64;
    let s = 0.5 * cpu_left / cx.max_cpu_milli.max(1) as f64
        + 0.5 * dev_left / cx.max_device_milli.max(1) as f64;
    let score = ((1.0 - s) * 100.0).trunc();
    let pick = match task.demand {
        DeviceDemand::Fraction(_) => {
            let mut best: Option<usize> = None;
            for i in super::fraction_candidates(cx, host, slot, task) {
                if best.is_none_or(|b| slot.free[i] < slot.free[b]) {
                    best = Some(i);
                }
            }
            Pick::Device(best? as u16)
        }
        _ => Pick::Auto,
    };
    Some((score, pick))
}
