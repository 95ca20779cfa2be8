//! `gangway`: Gangway's default policy.
//!
//! - **Fragmentation-aware scoring**: a task goes where the host's expected fragmentation (FGD's
//!   measure, against `SchedulerConfig::workload`, or the classes learned from the pending and
//!   running gangs when that is empty) grows least, with memory counted too; the score is kept
//!   continuous (no integer truncation); a light best-fit pull (fewest devices left on the host)
//!   keeps whole hosts free for big gangs; and taking CPU from a host whose remaining CPU can no
//!   longer feed its free devices (at the workload's CPU per device) is penalised, so CPU-heavy and
//!   CPU-only tasks go where CPU is plentiful and devices are not stranded.
//! - **Topology-aware gang packing**: gangs without a required level go into the narrowest domain
//!   that fits (host, rack, pod, zone, datacenter); candidate domains are ranked least-remaining
//!   first (then the fullest parent domain) and the best few are scored whole; tasks of a gang
//!   prefer hosts the gang already uses; while gangs of several tasks are pending or running,
//!   equally scored hosts go by the fullest rack, then the fullest pod, so empty racks and pods
//!   stay whole for the gangs that need them.
//! - **Queues**: guaranteed quotas, borrowing of idle capacity beyond them (recorded in
//!   `borrowed_milli`), reclaim of borrowed capacity by preemption.
//! - **Big gangs are not starved, and do not starve the others**: the first gang blocked by shape
//!   (enough devices free, in the wrong places) gets an EASY-style reservation; a gang short of free
//!   devices holds nobody up ([`may_reserve`]).
//! - **Priorities with preemption** (when `SchedulerConfig::preemption`), see `engine::preemption`.

use crate::engine::config::PolicyName;
use crate::engine::framework::{HeadOfLine, Pick, Policy, QuotaMode, ScoreCx, TieBreak};
use crate::engine::index::{HostSlot, TaskShape};
use crate::engine::job::DeviceDemand;
use crate::engine::plan::PendingReason;

pub struct Gangway;

/// Head-of-line rule: only a gang blocked by *shape* takes the round's EASY reservation
/// (`no_domain_fits`, `no_host_fits`: the free devices would do, but no domain of the required
/// level holds enough of them together). Its reservation gathers capacity that is already free,
/// so it drains only the fragments in the way, soon, and keeps small jobs from re-fragmenting the
/// block meanwhile.
///
/// A gang short of free devices in total (`insufficient_capacity`) waits without a reservation.
/// On a busy cluster its reservation would hold the hosts that free up first until enough of them
/// are free together, often hours for a gang of hundreds of devices; every gang behind it that runs
/// longer than that (large gangs do) would be kept off them and queue too, while they sit idle.
/// Once enough devices are free the gang is blocked by shape (or fits) and reserves in its turn.
pub fn may_reserve(reason: &PendingReason) -> bool {
    crate::engine::defrag::blocked_by_shape(reason)
}

/// Weight of "devices left free on the host" (as a share of the largest host) against
/// fragmentation growth (in devices): a light best-fit pull that keeps whole hosts free.
pub const PACKING_WEIGHT: f64 = 0.05;
/// Weight of the growth of the host's CPU-stranded devices (devices its remaining CPU cannot feed
/// at the workload's expected CPU per device), in devices.
pub const STRANDING_WEIGHT: f64 = 1.0;

impl Policy for Gangway {
    fn name(&self) -> PolicyName {
        PolicyName::Gangway
    }
    fn head_of_line(&self) -> HeadOfLine {
        HeadOfLine::Reserve
    }
    fn quota_mode(&self) -> QuotaMode {
        QuotaMode::Borrow
    }
    fn preempts(&self) -> bool {
        true
    }
    fn tie_break(&self) -> TieBreak {
        TieBreak::LowestIndex
    }
    fn topology_aware(&self) -> bool {
        true
    }
    fn needs_frag(&self) -> bool {
        true
    }
    fn exhaustive(&self) -> bool {
        false
    }
    fn locality_bonus(&self) -> f64 {
        4.0
    }
    fn score(
        &self,
        cx: &ScoreCx<'_, '_>,
        host: usize,
        slot: &HostSlot,
        task: &TaskShape,
    ) -> Option<(f64, Pick)> {
        let info = &cx.overlay.info[host];
        let cpu = slot.cpu - task.cpu;
        let mem = slot.mem - task.mem;
        let max_dev = cx.max_device_milli.max(1) as f64;
        let before = cx.frag.host_frag(info, &slot.free, slot.cpu, slot.mem);
        let eval = |free: &[u32]| -> f64 {
            let after = cx.frag.host_frag(info, free, cpu, mem);
            let left: u64 = free.iter().map(|&m| u64::from(m)).sum();
            let stranded =
                cx.frag.cpu_stranded(free, cpu) - cx.frag.cpu_stranded(&slot.free, slot.cpu);
            -(after - before) / 1000.0
                - PACKING_WEIGHT * (left as f64 / max_dev)
                - STRANDING_WEIGHT * stranded / 1000.0
        };
        match task.demand {
            DeviceDemand::Fraction(_) => {
                let mut best: Option<(f64, u32, usize)> = None;
                let mut seen: Vec<u32> = Vec::new();
                for i in super::fraction_candidates(cx, host, slot, task) {
                    if seen.contains(&slot.free[i]) {
                        continue;
                    }
                    seen.push(slot.free[i]);
                    let free = super::free_after(slot, task, Some(i));
                    let s = eval(&free);
                    let better = match best {
                        None => true,
                        Some((b, bf, _)) => s > b || (s == b && free[i] < bf),
                    };
                    if better {
                        best = Some((s, free[i], i));
                    }
                }
                best.map(|(s, _, i)| (s, Pick::Device(i as u16)))
            }
            _ => Some((eval(&super::free_after(slot, task, None)), Pick::Auto)),
        }
    }
}
