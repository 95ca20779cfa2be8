//! The policies, one file each; the baselines are policies like ours.

use super::config::PolicyName;
use super::device::MILLI_PER_DEVICE;
use super::framework::{Policy, ScoreCx};
use super::index::{HostSlot, TaskShape};
use super::job::DeviceDemand;
use super::plan::PendingReason;

pub mod backfill;
pub mod best_fit;
pub mod fgd;
pub mod first_fit;
pub mod gangway;
pub mod static_quota;

/// The policy object for a name.
pub fn policy(name: PolicyName) -> &'static dyn Policy {
    match name {
        PolicyName::FirstFit => &first_fit::FirstFit,
        PolicyName::BestFit => &best_fit::BestFit,
        PolicyName::Fgd => &fgd::Fgd,
        PolicyName::StaticQuota => &static_quota::StaticQuota,
        PolicyName::Backfill => &backfill::Backfill,
        PolicyName::Gangway => &gangway::Gangway,
    }
}

/// Head-of-line point of [`HeadOfLine::Reserve`](super::framework::HeadOfLine::Reserve) policies:
/// whether a gang that did not fit, for `reason`, may take the round's reservation. EASY
/// (`backfill`) reserves for any gang short of room; `gangway` only for a gang blocked by shape
/// ([`gangway::may_reserve`]).
pub(crate) fn may_reserve(policy: &dyn Policy, reason: &PendingReason) -> bool {
    match policy.name() {
        PolicyName::Gangway => gangway::may_reserve(reason),
        _ => matches!(
            reason,
            PendingReason::InsufficientCapacity { .. }
                | PendingReason::DevicesFenced { .. }
                | PendingReason::NoDomainFits { .. }
                | PendingReason::NoHostFits { .. }
        ),
    }
}

/// The host's free devices after one task, fractional tasks on `device`; whole devices come off
/// the full ones (which full ones does not change any score).
pub(crate) fn free_after(slot: &HostSlot, shape: &TaskShape, device: Option<usize>) -> Vec<u32> {
    let mut free = slot.free.clone();
    match shape.demand {
        DeviceDemand::None => {}
        DeviceDemand::Whole(n) => {
            let mut left = n;
            for f in free.iter_mut() {
                if left == 0 {
                    break;
                }
                if *f == MILLI_PER_DEVICE {
                    *f = 0;
                    left -= 1;
                }
            }
        }
        DeviceDemand::Fraction(m) => {
            if let Some(i) = device {
                free[i] -= m;
            }
        }
    }
    free
}

/// Devices a fractional task may take on the host.
pub(crate) fn fraction_candidates<'s>(
    cx: &'s ScoreCx<'_, '_>,
    host: usize,
    slot: &'s HostSlot,
    shape: &'s TaskShape,
) -> impl Iterator<Item = usize> + 's {
    let info = &cx.overlay.info[host];
    slot.free.iter().enumerate().filter_map(move |(i, &f)| {
        let m = info.dev_model[i];
        (f >= shape.per_device && m != u16::MAX && shape.accept[usize::from(m)]).then_some(i)
    })
}
