//! `fgd`: Fragmentation Gradient Descent (Weng et al., USENIX ATC'23), as the published simulator's
//! `FGDScore` plugin computes it: the host (and, for a fractional task, the device) where the
//! host's expected fragmentation against the target workload grows least. The score is Kubernetes'
//! integer `trunc(100 * sigmoid((frag_before - frag_after) / 1000))`; the best wins, ties go to
//! the first host (the simulator's Kubernetes fork takes the smallest node name) and, within a host, to the
//! lowest device index.

use crate::engine::config::PolicyName;
use crate::engine::framework::{HeadOfLine, Pick, Policy, QuotaMode, ScoreCx, TieBreak};
use crate::engine::index::{HostSlot, TaskShape};
use crate::engine::job::DeviceDemand;

pub struct Fgd;

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

impl Policy for Fgd {
    fn name(&self) -> PolicyName {
        PolicyName::Fgd
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
    fn needs_frag(&self) -> bool {
        true
    }
    fn score(
        &self,
        cx: &ScoreCx<'_, '_>,
        host: usize,
        slot: &HostSlot,
        task: &TaskShape,
    ) -> Option<(f64, Pick)> {
        let info = &cx.overlay.info[host];
        let before = cx.frag.host_frag(info, &slot.free, slot.cpu, slot.mem);
        let cpu = slot.cpu - task.cpu;
        let mem = slot.mem - task.mem;
        let score_of = |after: f64| (sigmoid((before - after) / 1000.0) * 100.0).trunc();
        match task.demand {
            DeviceDemand::Fraction(_) => {
                let mut best: Option<(f64, usize)> = None;
                let mut seen: Vec<u32> = Vec::new();
                for i in super::fraction_candidates(cx, host, slot, task) {
                    // Devices with equal free share leave equal hosts: same score, first wins.
                    if seen.contains(&slot.free[i]) {
                        continue;
                    }
                    seen.push(slot.free[i]);
                    let free = super::free_after(slot, task, Some(i));
                    let s = score_of(cx.frag.host_frag(info, &free, cpu, mem));
                    if best.is_none_or(|(b, _)| s > b) {
                        best = Some((s, i));
                    }
                }
                best.map(|(s, i)| (s, Pick::Device(i as u16)))
            }
            _ => {
                let free = super::free_after(slot, task, None);
                Some((
                    score_of(cx.frag.host_frag(info, &free, cpu, mem)),
                    Pick::Auto,
                ))
            }
        }
    }
}
