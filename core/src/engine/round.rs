//! One scheduling round: the ONE function that decides everything a round decides.
//!
//! The leader, the `defrag plan` preview and the simulator call [`run_round`]; nothing else puts
//! a round together. It takes the engine's view, the pending gangs (queue order) and what the
//! replicated state says about this round ([`RoundState`]: reasons already written, migrations
//! under way, blocks held, the leases a move must name), plus the defragmenter's limits
//! ([`DefragLimits`]), and returns a [`RoundOutcome`]: placements, preemptions, defragmentation
//! proposals and the pending reasons that changed. Pure: no clock, no I/O, no randomness.
//!
//! The steps, in order:
//! 1. [`schedule`]: placements, preemptions, a reason for every gang left waiting;
//! 2. preemptions already under way are not started twice (the victim is still checkpointing, or
//!    the preemptor already has its block held);
//! 3. the defragmenter, for the first gangs (queue order) left blocked by shape, plans on the view
//!    as the round's own placements and preemptions leave it, so the block it frees is not one the
//!    round just filled, and within the moves and device-hours left;
//! 4. only reasons that changed are returned: an unchanged backlog writes nothing.

use super::cluster::ClusterState;
use super::config::SchedulerConfig;
use super::defrag::{blocked_by_shape, plan_defrag, DefragBudget, DefragPlan};
use super::job::GangRequest;
use super::plan::{PendingReason, Plan};
use super::schedule::schedule;
use gangway_proto::ids::JobId;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A running gang the defragmenter may move: the lease a move must name (so a stale plan never
/// runs) and what checkpointing it costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseFacts {
    pub epoch: u64,
    /// The job's checkpoint time (its timeout): what one move costs, per device.
    pub checkpoint_ms: u64,
}

/// What the replicated state says about this round, besides the view and the pending gangs.
/// `ClusterStore::round_input` gives it in one pass.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoundState {
    /// Gangs whose migration (move, preemption, idle reclaim) waits for its checkpoint.
    pub migrating: BTreeSet<JobId>,
    /// Waiting gangs that already have a block held for them (a preemptor, a defragmented gang).
    pub reserved: BTreeSet<JobId>,
    /// Running checkpointable gangs, for the defragmenter (filled only when it is on).
    pub leases: BTreeMap<JobId, LeaseFacts>,
}

/// What the defragmenter may do this round. `None` in [`RoundInput::defrag`]: it is off.
#[derive(Clone, Debug, PartialEq)]
pub struct DefragLimits {
    /// Limits of one plan (most moves, min runtime, domains verified).
    pub budget: DefragBudget,
    /// Migrations that may run at once, those under way included.
    pub max_in_flight: usize,
    /// Device-hours of disruption still allowed: a plan costs its moved devices times their
    /// checkpoint time.
    pub device_hours_left: f64,
    /// Waiting gangs (queue order, blocked by shape) tried per round.
    pub gangs_per_round: usize,
    /// Only gangs of at least this many devices are defragmented for.
    pub min_gang_devices: u64,
    /// Gangs not to try this round (the caller's back-off after a recent try).
    pub skip: BTreeSet<JobId>,
    /// How long the freed block is held for its gang.
    pub reservation_ms: u64,
    /// Proposals returned at most: 1 to commit, a few for a preview.
    pub max_plans: usize,
}

impl DefragLimits {
    /// The live leader's defaults for the given settings.
    pub fn leader(max_in_flight: usize, device_hours_left: f64, reservation_ms: u64) -> Self {
        Self {
            budget: DefragBudget::default(),
            max_in_flight,
            device_hours_left,
            gangs_per_round: 3,
            min_gang_devices: 0,
            skip: BTreeSet::new(),
            reservation_ms,
            max_plans: 1,
        }
    }
}

/// Everything a round reads.
#[derive(Clone, Copy, Debug)]
pub struct RoundInput<'a> {
    pub view: &'a ClusterState,
    /// Waiting gangs in queue order.
    pub pending: &'a [GangRequest],
    /// The reason each waiting gang has now, beside it in `pending` (empty: none known, every
    /// reason is new).
    pub reasons: &'a [Option<PendingReason>],
    pub config: &'a SchedulerConfig,
    pub state: &'a RoundState,
    pub defrag: Option<&'a DefragLimits>,
    pub now_ms: u64,
}

/// Migrations that free a block for one waiting gang, as the round proposes them.
#[derive(Clone, Debug, PartialEq)]
pub struct DefragProposal {
    pub plan: DefragPlan,
    /// The lease epoch each moved gang holds (the sequence check of the command).
    pub epochs: BTreeMap<JobId, u64>,
    /// Moved devices times their checkpoint time, in device-hours.
    pub cost_device_hours: f64,
    /// Until when (log time) the freed block is held for the gang.
    pub hold_until_ms: u64,
}

/// Everything a round decides.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoundOutcome {
    /// Placements, preemptions not already under way, and the pending reasons that changed.
    pub plan: Plan,
    pub defrag: Vec<DefragProposal>,
    /// Waiting gangs blocked by shape (queue order): what defragmentation could help.
    pub blocked_by_shape: Vec<JobId>,
    /// Gangs the defragmenter tried this round (whether or not it found a plan).
    pub defrag_tried: Vec<JobId>,
}

impl RoundOutcome {
    /// Whether committing it would change nothing.
    pub fn is_empty(&self) -> bool {
        self.plan.placements.is_empty()
            && self.plan.preemptions.is_empty()
            && self.plan.pending.is_empty()
            && self.defrag.is_empty()
    }
}

/// Runs one scheduling round.
pub fn run_round(input: RoundInput<'_>) -> RoundOutcome {
    let mut plan = schedule(input.view, input.pending, input.config, input.now_ms);
    let state = input.state;
    plan.preemptions
        .retain(|p| !state.reserved.contains(&p.preemptor) && !state.migrating.contains(&p.victim));
    let shape: BTreeSet<&JobId> = plan
        .pending
        .iter()
        .filter(|p| blocked_by_shape(&p.reason))
        .map(|p| &p.job)
        .collect();
    let blocked: Vec<JobId> = input
        .pending
        .iter()
        .filter(|g| shape.contains(&g.id))
        .map(|g| g.id.clone())
        .collect();
    let (defrag, defrag_tried) = match input.defrag {
        Some(limits) => defragment(&input, &plan, &blocked, limits),
        None => (Vec::new(), Vec::new()),
    };
    let current: HashMap<&JobId, &PendingReason> = input
        .pending
        .iter()
        .zip(input.reasons)
        .filter_map(|(g, r)| Some((&g.id, r.as_ref()?)))
        .collect();
    plan.pending
        .retain(|p| current.get(&p.job) != Some(&&p.reason));
    RoundOutcome {
        plan,
        defrag,
        blocked_by_shape: blocked,
        defrag_tried,
    }
}

/// Step 3: proposals for the first gangs blocked by shape, on the view the round leaves.
fn defragment(
    input: &RoundInput<'_>,
    plan: &Plan,
    blocked: &[JobId],
    limits: &DefragLimits,
) -> (Vec<DefragProposal>, Vec<JobId>) {
    let state = input.state;
    let moves_left = limits.max_in_flight.saturating_sub(state.migrating.len());
    if moves_left == 0 || limits.device_hours_left <= 0.0 || limits.max_plans == 0 {
        return (Vec::new(), Vec::new());
    }
    let blocked: BTreeSet<&JobId> = blocked.iter().collect();
    let candidates: Vec<&GangRequest> = input
        .pending
        .iter()
        .filter(|g| blocked.contains(&g.id))
        .filter(|g| !state.reserved.contains(&g.id) && !limits.skip.contains(&g.id))
        .filter(|g| g.total_devices() >= limits.min_gang_devices)
        .take(limits.gangs_per_round)
        .collect();
    if candidates.is_empty() {
        return (Vec::new(), Vec::new());
    }
    let after = view_after(input, plan);
    let budget = DefragBudget {
        max_moves: limits.budget.max_moves.min(moves_left),
        min_runtime_ms: input.config.min_runtime_ms,
        ..limits.budget.clone()
    };
    let mut proposals = Vec::new();
    let mut tried = Vec::new();
    for gang in candidates {
        if proposals.len() >= limits.max_plans {
            break;
        }
        tried.push(gang.id.clone());
        let Some(plan) = plan_defrag(&after, gang, input.config, &budget, input.now_ms) else {
            continue;
        };
        let proposal = propose(plan, state, limits, input.now_ms);
        if proposal.cost_device_hours <= limits.device_hours_left {
            proposals.push(proposal);
        }
    }
    (proposals, tried)
}

/// The view once the round's preemptions and placements are done.
fn view_after(input: &RoundInput<'_>, plan: &Plan) -> ClusterState {
    let mut view = input.view.clone();
    for p in &plan.preemptions {
        view.release(&p.victim);
    }
    for p in &plan.placements {
        if let Some(req) = input.pending.iter().find(|g| g.id == p.job) {
            let _ = view.apply_placement(req.clone(), p.clone(), input.now_ms);
        }
    }
    view
}

fn propose(
    plan: DefragPlan,
    state: &RoundState,
    limits: &DefragLimits,
    now: u64,
) -> DefragProposal {
    let lease = |job: &JobId| state.leases.get(job).copied();
    let cost_device_hours = plan
        .moves
        .iter()
        .map(|m| {
            m.devices as f64 * lease(&m.job).map_or(0, |l| l.checkpoint_ms) as f64 / 3_600_000.0
        })
        .sum();
    let epochs = plan
        .moves
        .iter()
        .map(|m| (m.job.clone(), lease(&m.job).map_or(0, |l| l.epoch)))
        .collect();
    DefragProposal {
        plan,
        epochs,
        cost_device_hours,
        hold_until_ms: now.saturating_add(limits.reservation_ms),
    }
}
