//! The plugin points of the scheduling pipeline and the [`Status`] a plugin returns.
//!
//! The pipeline (see [`crate::engine::schedule`]) is, in the Kubernetes scheduling-framework and
//! Volcano style:
//!
//! 1. **queue order** ([`Policy::queue_key`]): priority, then submission time, then job id;
//! 2. **admit** (queue-level filter, [`Policy::quota_mode`] and [`Policy::head_of_line`]): quota and
//!    head-of-line rules; a refusal is a [`Status::Unschedulable`] with the reason people see;
//! 3. **filter** (per host, common to all policies): ready, device kind/model accepted, free
//!    devices, CPU and memory ([`crate::engine::index::Overlay::fits`]);
//! 4. **candidate domains**: every domain of the required level (narrowest preferred first for
//!    topology-aware policies);
//! 5. **score** ([`Policy::score`]): each task of the gang on each feasible host, summed over the
//!    gang, per candidate domain;
//! 6. **commit** into the round's overlay, so later gangs see earlier ones, or discard whole.
//!
//! Each policy lives in its own file under `engine/policy/`; the baselines are policies too.

use super::config::PolicyName;
use super::fragmentation::FragModel;
use super::index::{HostSlot, Overlay, TaskShape};
use super::job::GangRequest;
use super::plan::PendingReason;

/// What a plugin says about a gang (or a gang on a host).
#[derive(Clone, Debug, PartialEq)]
pub enum Status {
    /// The plugin lets the gang through.
    Success,
    /// The gang cannot be placed now; the reason is shown to people.
    Unschedulable(PendingReason),
    /// The plugin itself failed (bad input); the gang stays pending with this message.
    Error(String),
}

impl Status {
    pub fn is_success(&self) -> bool {
        matches!(self, Status::Success)
    }
}

/// What a gang that does not fit does to those behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadOfLine {
    /// Nothing: later gangs are tried as if it were not there (Kubernetes-style).
    Skip,
    /// Classic FIFO: a gang that does not fit blocks every later gang of its queue this round.
    StrictPerQueue,
    /// EASY backfill: the first gang that does not fit gets a reservation (the hosts it would get
    /// at the earliest time enough capacity frees); later gangs run only if they end before that
    /// time or stay off those hosts.
    Reserve,
}

/// How queue quotas apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuotaMode {
    /// Quotas are ignored.
    Ignore,
    /// Each queue is confined to its guarantee; no borrowing.
    Static,
    /// Guarantees, plus borrowing of idle capacity where the queue allows it (recorded in
    /// `borrowed_milli`, reclaimable by preemption).
    Borrow,
}

/// How a policy breaks ties between equally scored hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TieBreak {
    /// The host registered first.
    LowestIndex,
    /// A pseudo-random host, derived from the job id (deterministic): the uniform random choice
    /// among the best nodes that the Kubernetes scheduler makes, without a clock or a global RNG.
    Hashed,
}

/// Which device a task takes on the chosen host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// CPU-only task, or whole devices (chosen at commit: NVLink-aware, lowest index).
    Auto,
    /// A fractional task on this device.
    Device(u16),
}

/// What a score plugin may read.
pub struct ScoreCx<'o, 'a> {
    pub overlay: &'o Overlay<'a>,
    /// The expected workload (fragmentation-aware policies only; empty otherwise).
    pub frag: &'o FragModel,
    /// Largest host CPU in the cluster (normaliser of best-fit, as FGD's MaxSpecCpu).
    pub max_cpu_milli: u64,
    /// Largest host device capacity in milli-devices (as FGD's MaxSpecGpu).
    pub max_device_milli: u64,
}

/// A placement policy: the plugins it sets at each point.
pub trait Policy: Send + Sync {
    fn name(&self) -> PolicyName;

    /// Queue order: smaller keys go first.
    fn queue_key(&self, req: &GangRequest) -> (i64, u64) {
        (-i64::from(req.priority), req.submitted_at_ms)
    }

    fn head_of_line(&self) -> HeadOfLine;

    fn quota_mode(&self) -> QuotaMode;

    /// Whether the policy may plan preemptions (it also needs `SchedulerConfig::preemption`).
    fn preempts(&self) -> bool {
        false
    }

    fn tie_break(&self) -> TieBreak;

    /// Whether gangs without a required level are packed into the narrowest domain that fits
    /// (host, then rack, pod, zone, datacenter), and domains are chosen by score rather than order.
    fn topology_aware(&self) -> bool {
        false
    }

    /// Whether the policy needs the fragmentation model (expected workload).
    fn needs_frag(&self) -> bool {
        false
    }

    /// Whether every feasible host must be scored (exact emulation of a published scheduler);
    /// otherwise, on very large clusters, the tightest feasible candidates are scored.
    fn exhaustive(&self) -> bool {
        true
    }

    /// Score plugin: one task on one host whose free state is `slot` (already known to fit).
    /// Higher is better; `None` rejects the host.
    fn score(
        &self,
        cx: &ScoreCx<'_, '_>,
        host: usize,
        slot: &HostSlot,
        task: &TaskShape,
    ) -> Option<(f64, Pick)>;

    /// Whether every feasible host scores the same, so the first feasible host in registration
    /// order is the answer (first-fit): no scoring pass at all.
    fn constant_score(&self) -> bool {
        false
    }

    /// Extra score for a host that already holds tasks of the same gang (locality).
    fn locality_bonus(&self) -> f64 {
        0.0
    }
}
