//! `backfill`: EASY backfill. Gangs are taken in FIFO order (priority, then submission); the first
//! gang that does not fit gets a reservation: the earliest time enough capacity frees for it (from
//! the running gangs' `started_at_ms + estimated_runtime_ms`) and the hosts it would take then.
//! Later gangs run now only if they end before that time (their own estimate) or stay off those
//! hosts. Gangs without an estimate never "end before". When no reservation can be computed
//! (runtimes unknown), nothing is held back. Hosts are taken first-fit.

use crate::engine::config::PolicyName;
use crate::engine::framework::{HeadOfLine, Pick, Policy, QuotaMode, ScoreCx, TieBreak};
use crate::engine::index::{HostSlot, TaskShape};

pub struct Backfill;

impl Policy for Backfill {
    fn name(&self) -> PolicyName {
        PolicyName::Backfill
    }
    fn head_of_line(&self) -> HeadOfLine {
        HeadOfLine::Reserve
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
        super::first_fit::first_fit_score(cx, host, slot, task)
    }
}
