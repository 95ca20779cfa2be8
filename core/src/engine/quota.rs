//! Queue quotas: what each queue uses (running gangs plus this round's placements), what it is
//! guaranteed, and whether a gang is admitted (and how much of it is borrowed).
//!
//! Usage and guarantees are counted in milli-devices of any kind (a queue's guarantee covers the
//! kinds it uses).

use super::cluster::ClusterState;
use super::config::SchedulerConfig;
use super::framework::QuotaMode;
use super::job::GangRequest;
use super::plan::PendingReason;
use gangway_proto::ids::QueueName;
use std::collections::BTreeMap;

/// Per-queue usage for one round.
#[derive(Clone, Debug)]
pub struct QuotaBook {
    pub mode: QuotaMode,
    usage: BTreeMap<QueueName, u64>,
    /// Usage of this round's preemption victims: gone for the reclaim arithmetic, but still held
    /// (a victim stops only after its checkpoint), so never re-admitted to its own queue in the
    /// same round.
    leaving: BTreeMap<QueueName, u64>,
}

impl QuotaBook {
    pub fn new(view: &ClusterState, mode: QuotaMode) -> Self {
        // Counted under borrowed names: one clone per queue, not per running gang (a round in
        // the simulator runs this for every event).
        let mut by_queue: BTreeMap<&QueueName, u64> = BTreeMap::new();
        for g in view.running().values() {
            *by_queue.entry(&g.request.queue).or_default() += g.request.total_milli();
        }
        let usage = by_queue.into_iter().map(|(q, m)| (q.clone(), m)).collect();
        Self {
            mode,
            usage,
            leaving: BTreeMap::new(),
        }
    }

    /// What the queue uses once this round's victims are gone.
    pub fn usage(&self, queue: &QueueName) -> u64 {
        self.held(queue)
            .saturating_sub(self.leaving.get(queue).copied().unwrap_or(0))
    }

    /// What the queue holds now, victims included.
    fn held(&self, queue: &QueueName) -> u64 {
        self.usage.get(queue).copied().unwrap_or(0)
    }

    /// The queue's guarantee; 0 for a queue the config does not name.
    pub fn guarantee(config: &SchedulerConfig, queue: &QueueName) -> u64 {
        config
            .queues
            .get(queue)
            .map(|q| q.guaranteed_milli)
            .unwrap_or(0)
    }

    /// Whether the gang may be placed under the quota rules; `Ok(borrowed milli)`.
    pub fn admit(&self, config: &SchedulerConfig, req: &GangRequest) -> Result<u64, PendingReason> {
        let total = req.total_milli();
        let used = self.held(&req.queue);
        let exceeded = |limit: u64| PendingReason::QuotaExceeded {
            queue: req.queue.clone(),
            limit_milli: limit,
            used_milli: used,
        };
        match self.mode {
            QuotaMode::Ignore => Ok(0),
            QuotaMode::Static => {
                if config.queues.is_empty() {
                    return Ok(0);
                }
                let limit = Self::guarantee(config, &req.queue);
                if used + total > limit {
                    Err(exceeded(limit))
                } else {
                    Ok(0)
                }
            }
            QuotaMode::Borrow => {
                let guarantee = Self::guarantee(config, &req.queue);
                let may_borrow = config.queues.get(&req.queue).is_none_or(|q| q.may_borrow);
                let borrowed = (used + total).saturating_sub(guarantee).min(total);
                if borrowed > 0 && !may_borrow {
                    Err(exceeded(guarantee))
                } else {
                    Ok(borrowed)
                }
            }
        }
    }

    /// Whether the queue, with `extra` more, stays within its guarantee (it may reclaim).
    pub fn within_guarantee(
        &self,
        config: &SchedulerConfig,
        queue: &QueueName,
        extra: u64,
    ) -> bool {
        self.usage(queue) + extra <= Self::guarantee(config, queue)
    }

    /// Whether the queue uses more than its guarantee (it borrows).
    pub fn borrowing(&self, config: &SchedulerConfig, queue: &QueueName) -> bool {
        self.usage(queue) > Self::guarantee(config, queue)
    }

    pub fn charge(&mut self, queue: &QueueName, milli: u64) {
        *self.usage.entry(queue.clone()).or_default() += milli;
    }

    /// A victim of this round leaves the queue (see `leaving`).
    pub fn refund(&mut self, queue: &QueueName, milli: u64) {
        *self.leaving.entry(queue.clone()).or_default() += milli;
    }
}
