//! `first-fit`: FIFO (priority, then submission), the first hosts in registration order that fit.
//!
//! Head-of-line: classic FIFO. A gang that does not fit blocks every later gang of its queue for
//! the round (other queues go on), so a queue is served strictly in order.

use crate::engine::config::PolicyName;
use crate::engine::framework::{HeadOfLine, Pick, Policy, QuotaMode, ScoreCx, TieBreak};
use crate::engine::index::{HostSlot, TaskShape};
use crate::engine::job::DeviceDemand;

pub struct FirstFit;

impl Policy for FirstFit {
    fn name(&self) -> PolicyName {
        PolicyName::FirstFit
    }
    fn head_of_line(&self) -> HeadOfLine {
        HeadOfLine::StrictPerQueue
    }
    fn quota_mode(&self) -> QuotaMode {
        QuotaMode::Ignore
    }
    fn tie_break(&self) -> TieBreak {
        TieBreak::LowestIndex
    }
    fn constant_score(&self) -> bool {
        true
    }
    fn score(
        &self,
        cx: &ScoreCx<'_, '_>,
        host: usize,
        slot: &HostSlot,
        task: &TaskShape,
    ) -> Option<(f64, Pick)> {
        first_fit_score(cx, host, slot, task)
    }
}

/// Every host scores the same (the lowest index wins); a fractional task takes the first device
/// with room.
pub(crate) fn first_fit_score(
    cx: &ScoreCx<'_, '_>,
    host: usize,
    slot: &HostSlot,
    task: &TaskShape,
) -> Option<(f64, Pick)> {
    match task.demand {
        DeviceDemand::Fraction(_) => super::fraction_candidates(cx, host, slot, task)
            .next()
            .map(|i| (0.0, Pick::Device(i as u16))),
        _ => Some((0.0, Pick::Auto)),
    }
}
