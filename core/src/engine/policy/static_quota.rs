//! `static-quota`: every queue is confined to its guaranteed reservation
//! (`QueueConfig::guaranteed_milli`), with no borrowing of idle capacity: today's industry practice
//! of standing reservations. Inside its quota a queue is served in priority/submission order, a
//! gang that does not fit does not block the others (Kubernetes ResourceQuota style), and tasks go
//! where the least capacity remains (best-fit).
//!
//! Queues missing from `SchedulerConfig::queues` get no quota at all, unless no queue is configured,
//! in which case nothing is limited.

use crate::engine::config::PolicyName;
use crate::engine::framework::{HeadOfLine, Pick, Policy, QuotaMode, ScoreCx, TieBreak};
use crate::engine::index::{HostSlot, TaskShape};

pub struct StaticQuota;

impl Policy for StaticQuota {
    fn name(&self) -> PolicyName {
        PolicyName::StaticQuota
    }
    fn head_of_line(&self) -> HeadOfLine {
        HeadOfLine::Skip
    }
    fn quota_mode(&self) -> QuotaMode {
        QuotaMode::Static
    }
    fn tie_break(&self) -> TieBreak {
        TieBreak::LowestIndex
    }
    fn score(
        &self,
        cx: &ScoreCx<'_, '_>,
        host: usize,
        slot: &HostSlot,
        task: &TaskShape,
    ) -> Option<(f64, Pick)> {
        super::best_fit::best_fit_score(cx, host, slot, task)
    }
}
