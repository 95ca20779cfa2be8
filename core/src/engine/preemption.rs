//! Preemption: a gang that cannot fit may name running victims whose release makes it fit.
//!
//! Victims are either of lower priority ([`PreemptionReason::HigherPriority`]) or, when the
//! preemptor's queue is (with this gang) still within its guarantee, gangs of other queues that
//! borrow beyond their own guarantee ([`PreemptionReason::QuotaReclaim`]). A victim must have run
//! at least `SchedulerConfig::min_runtime_ms`. Candidates are taken lowest priority first, then
//! checkpointable ones (no work lost), then those that ran least, until the gang fits; the set is
//! then made minimal by dropping every victim the gang can do without.
//!
//! No cycles and no thrashing: a preemptor must have strictly higher priority, or be under its
//! guarantee while the victim's queue is over its own; a job is a victim at most once per round and
//! the preemptor waits (`AwaitingPreemption`) with the hosts it needs held back for the round, so
//! nothing of lower rank takes them; a freshly started gang is protected by `min_runtime_ms`
//! (hysteresis), so a restarted victim cannot be preempted again at once.

use super::cluster::RunningGang;
use super::config::SchedulerConfig;
use super::framework::QuotaMode;
use super::index::TaskShape;
use super::job::{DeviceDemand, GangRequest};
use super::plan::{Preemption, PreemptionReason};
use super::quota::QuotaBook;
use super::schedule::Round;
use gangway_proto::ids::JobId;
use std::collections::BTreeSet;

/// Most candidates considered for one preemptor.
pub const MAX_CANDIDATES: usize = 256;
/// Most victims for one preemptor.
pub const MAX_VICTIMS: usize = 32;

/// The victims chosen for a preemptor, and the hosts it would take once they are gone.
#[derive(Clone, Debug)]
pub(crate) struct Found {
    pub victims: Vec<Preemption>,
    pub hosts: Vec<usize>,
}

fn enough(round: &Round<'_>, req: &GangRequest, shape: &TaskShape) -> bool {
    match shape.demand {
        DeviceDemand::Whole(_) => round.ov.eligible_free_whole(shape) * 1000 >= req.total_milli(),
        DeviceDemand::Fraction(_) => round.ov.eligible_free_milli(shape) >= req.total_milli(),
        DeviceDemand::None => true,
    }
}

/// Tries to fit `req` with the victims in `set` released; the overlay is left unchanged.
fn fits_without(
    round: &mut Round<'_>,
    req: &GangRequest,
    shape: &TaskShape,
    set: &[&RunningGang],
) -> Option<Vec<usize>> {
    let mark = round.ov.mark();
    for g in set {
        round.ov.release(&g.placement);
    }
    let out = if enough(round, req, shape) {
        round.place(req, shape, false, &[]).map(|p| {
            let mut hosts: Vec<usize> = p.iter().map(|(h, _)| *h).collect();
            hosts.sort_unstable();
            hosts.dedup();
            hosts
        })
    } else {
        None
    };
    round.ov.undo(mark);
    out
}

pub(crate) fn find_victims(
    round: &mut Round<'_>,
    req: &GangRequest,
    shape: &TaskShape,
    quota: &QuotaBook,
    config: &SchedulerConfig,
    taken: &BTreeSet<JobId>,
    now_ms: u64,
) -> Option<Found> {
    let view = round.ov.view;
    let reclaim = quota.mode == QuotaMode::Borrow
        && config.queues.contains_key(&req.queue)
        && quota.within_guarantee(config, &req.queue, req.total_milli());
    let mut cands: Vec<(&RunningGang, PreemptionReason)> = view
        .running()
        .values()
        .filter(|g| !taken.contains(&g.request.id))
        .filter(|g| now_ms.saturating_sub(g.started_at_ms) >= config.min_runtime_ms)
        .filter_map(|g| {
            if g.request.priority < req.priority {
                Some((
                    g,
                    PreemptionReason::HigherPriority {
                        victim_priority: g.request.priority,
                        preemptor_priority: req.priority,
                    },
                ))
            } else if reclaim
                && g.placement.borrowed_milli > 0
                && g.request.queue != req.queue
                && quota.borrowing(config, &g.request.queue)
            {
                Some((
                    g,
                    PreemptionReason::QuotaReclaim {
                        owner_queue: req.queue.clone(),
                        borrower_queue: g.request.queue.clone(),
                    },
                ))
            } else {
                None
            }
        })
        .filter(|(g, _)| {
            // Only gangs holding something the preemptor could use.
            shape.demand == DeviceDemand::None
                || g.placement.tasks.iter().any(|tp| {
                    view.host_position(&tp.host)
                        .is_some_and(|h| round.ov.info[h].ready && round.ov.host_accepts(h, shape))
                })
        })
        .collect();
    if cands.is_empty() {
        return None;
    }
    let lost = |g: &RunningGang| {
        if g.request.checkpointable {
            0
        } else {
            now_ms.saturating_sub(g.started_at_ms)
        }
    };
    cands.sort_by(|(a, _), (b, _)| {
        a.request
            .priority
            .cmp(&b.request.priority)
            .then_with(|| b.request.checkpointable.cmp(&a.request.checkpointable))
            .then_with(|| lost(a).cmp(&lost(b)))
            .then_with(|| a.request.id.cmp(&b.request.id))
    });
    cands.truncate(MAX_CANDIDATES);

    // Grow the set until the gang fits.
    let mark = round.ov.mark();
    let mut chosen: Vec<usize> = Vec::new();
    let mut fits = false;
    for (k, (g, _)) in cands.iter().enumerate() {
        round.ov.release(&g.placement);
        chosen.push(k);
        if enough(round, req, shape) {
            let m2 = round.ov.mark();
            if round.place(req, shape, false, &[]).is_some() {
                round.ov.undo(m2);
                fits = true;
                break;
            }
        }
        if chosen.len() >= MAX_VICTIMS {
            break;
        }
    }
    round.ov.undo(mark);
    if !fits {
        return None;
    }
    // Make it minimal: drop victims the gang can do without (latest added first).
    let mut set: Vec<usize> = chosen;
    let mut j = set.len();
    while j > 0 {
        j -= 1;
        if set.len() == 1 {
            break;
        }
        let without: Vec<&RunningGang> = set
            .iter()
            .enumerate()
            .filter(|(x, _)| *x != j)
            .map(|(_, &k)| cands[k].0)
            .collect();
        if fits_without(round, req, shape, &without).is_some() {
            set.remove(j);
        }
    }
    let gangs: Vec<&RunningGang> = set.iter().map(|&k| cands[k].0).collect();
    let hosts = fits_without(round, req, shape, &gangs)?;
    Some(Found {
        victims: set
            .iter()
            .map(|&k| Preemption {
                victim: cands[k].0.request.id.clone(),
                preemptor: req.id.clone(),
                reason: cands[k].1.clone(),
            })
            .collect(),
        hosts,
    })
}
