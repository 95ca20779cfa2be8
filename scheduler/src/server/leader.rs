//! The leader's loops: scheduling rounds, node-down detection and idle leases.
//!
//! Both run on every replica and act only while it leads. A scheduling round is Nomad's model: read
//! the state (linearizable once per term, so a new leader sees every committed entry; then its own
//! applied state, `ReplicaContext::term_read`), run the pure engine on it,
//! and commit the resulting plan as one `ApplyPlan` command, which every replica re-checks as it
//! applies. A round never writes when nothing would change, so an idle cluster writes nothing.

use super::context::{wall_clock_ms, ReplicaContext};
use crate::engine::{self, IdlePolicy, Plan, SchedulerConfig};
use crate::state::{Command, Event, Response};
use gangway_consensus::{ConsensusError, Role, StateChange};
use gangway_proto::ids::{HostName, JobId};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::watch;

/// The engine configuration from the server's `[scheduler]` section.
pub fn engine_config(ctx: &ReplicaContext) -> SchedulerConfig {
    let s = &ctx.config.scheduler;
    SchedulerConfig {
        policy: s.policy,
        preemption: s.preemption,
        min_runtime_ms: u64::try_from(s.min_runtime.as_millis()).unwrap_or(u64::MAX),
        ..SchedulerConfig::default()
    }
}

/// Keeps the heartbeat clocks in step with leadership: a new term restarts every node's grace.
fn observe_leadership(ctx: &ReplicaContext) -> bool {
    let m = ctx.raft.metrics();
    if m.role == Role::Leader {
        ctx.heartbeats.lead(m.term, Instant::now());
        true
    } else {
        ctx.heartbeats.step_down();
        ctx.disruption.clear();
        ctx.idle.clear();
        false
    }
}

/// Runs scheduling rounds on every `SchedulingNeeded` event (coalesced) and at least every
/// `scheduler.interval`, while this replica leads, until `stop` turns true.
pub async fn scheduling_loop(ctx: ReplicaContext, mut stop: watch::Receiver<bool>) {
    let mut changes = ctx.raft.subscribe();
    let mut tick = tokio::time::interval(ctx.config.scheduler.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let base = engine_config(&ctx);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
            change = changes.recv() => match change {
                Ok(StateChange::Event { event: Event::SchedulingNeeded, .. })
                | Ok(StateChange::SnapshotInstalled { .. })
                | Err(RecvError::Lagged(_)) => {}
                Ok(StateChange::Event { .. }) => continue,
                Err(RecvError::Closed) => return,
            },
        }
        // Everything that arrived meanwhile is covered by the round about to run.
        while let Ok(_) | Err(TryRecvError::Lagged(_)) = changes.try_recv() {}
        if !observe_leadership(&ctx) {
            continue;
        }
        match scheduling_round(&ctx, &base).await {
            Ok(outcome) => {
                if outcome.placed > 0 || outcome.preempted > 0 || outcome.stale > 0 {
                    tracing::info!(
                        placed = outcome.placed,
                        preempted = outcome.preempted,
                        stale = outcome.stale,
                        pending = outcome.pending,
                        "scheduling round committed"
                    );
                }
            }
            Err(e) => {
                metrics::counter!("gangway_scheduling_rounds_total", "result" => "error")
                    .increment(1);
                tracing::warn!(error = %e, "scheduling round failed; retrying on the next event or tick");
            }
        }
    }
}

/// What one round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RoundOutcome {
    pub pending: usize,
    pub placed: usize,
    pub preempted: usize,
    pub stale: usize,
}

/// What the leader's defragmenter may do this round (`[scheduler] defrag*`), or `None` when it
/// is off: migrations at once, and the device-hours its ledger still allows this hour.
fn defrag_limits(ctx: &ReplicaContext) -> Option<engine::DefragLimits> {
    let s = &ctx.config.scheduler;
    s.defrag.then(|| {
        engine::DefragLimits::leader(
            s.defrag_max_moves,
            s.defrag_device_hours_per_hour - ctx.disruption.spent_last_hour(Instant::now()),
            u64::try_from(s.defrag_reservation.as_millis()).unwrap_or(u64::MAX),
        )
    })
}

/// One round: a read of what the round needs (`ClusterStore::round_input`; linearizable on the
/// term's first round, then local: `ReplicaContext::term_read`), the
/// pure round (`engine::run_round`) on a blocking thread, then its outcome committed: the plan
/// as one `ApplyPlan`, a defragmentation proposal as its own `Defragment` after it. Only the
/// leader's own log takes them (`try_write`): a deposed leader's plan is dropped rather than
/// forwarded to the new one.
pub async fn scheduling_round(
    ctx: &ReplicaContext,
    base: &SchedulerConfig,
) -> Result<RoundOutcome, ConsensusError> {
    let started = Instant::now();
    let limits = defrag_limits(ctx);
    let defrag_on = limits.is_some();
    let snapshot = ctx
        .term_read(|fsm| {
            let store = fsm.store();
            let read = store.round_input(defrag_on);
            (!read.pending.is_empty()).then(|| {
                let reasons = read.reasons.to_vec();
                let config = store.scheduler_config(base);
                let pending = read.pending.into_owned();
                (store.engine().clone(), pending, reasons, config, read.state)
            })
        })
        .await?;
    metrics::histogram!("gangway_scheduling_read_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    let Some((view, pending, reasons, config, state)) = snapshot else {
        return Ok(RoundOutcome::default());
    };
    let computing = Instant::now();
    let now = wall_clock_ms();
    let pending_count = pending.len();
    let round = tokio::task::spawn_blocking(move || {
        engine::run_round(engine::RoundInput {
            view: &view,
            pending: &pending,
            reasons: &reasons,
            config: &config,
            state: &state,
            defrag: limits.as_ref(),
            now_ms: now,
        })
    })
    .await
    .map_err(|e| ConsensusError::Fatal(format!("scheduling task panicked: {e}")))?;
    metrics::histogram!("gangway_scheduling_compute_duration_seconds")
        .record(computing.elapsed().as_secs_f64());
    metrics::histogram!("gangway_scheduling_attempt_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    let outcome = commit_plan(ctx, round.plan, pending_count).await?;
    // After the round's own plan, on whose result it was computed; as its own entry, which the
    // state machine re-checks move by move (epochs), so a plan gone stale is refused whole.
    for proposal in &round.defrag {
        commit_defrag(ctx, proposal).await?;
    }
    Ok(outcome)
}

/// Commits a round's plan, unless it would change nothing (an idle cluster writes nothing).
async fn commit_plan(
    ctx: &ReplicaContext,
    plan: Plan,
    pending: usize,
) -> Result<RoundOutcome, ConsensusError> {
    if plan.placements.is_empty() && plan.preemptions.is_empty() && plan.pending.is_empty() {
        metrics::counter!("gangway_scheduling_rounds_total", "result" => "no_change").increment(1);
        return Ok(RoundOutcome {
            pending,
            ..RoundOutcome::default()
        });
    }
    let response = ctx.raft.try_write(Command::ApplyPlan { plan }).await?;
    metrics::counter!("gangway_scheduling_rounds_total", "result" => "committed").increment(1);
    let Response::PlanApplied {
        placed,
        stale,
        preempted,
    } = response
    else {
        return Err(ConsensusError::Fatal(format!(
            "ApplyPlan answered {response:?}"
        )));
    };
    metrics::counter!("gangway_jobs_placed_total").increment(placed.len() as u64);
    metrics::counter!("gangway_preemptions_total").increment(preempted.len() as u64);
    metrics::counter!("gangway_plan_stale_placements_total").increment(stale.len() as u64);
    Ok(RoundOutcome {
        pending,
        placed: placed.len(),
        preempted: preempted.len(),
        stale: stale.len(),
    })
}

/// Commits a defragmentation proposal and charges its cost to the disruption ledger.
async fn commit_defrag(
    ctx: &ReplicaContext,
    proposal: &engine::DefragProposal,
) -> Result<(), ConsensusError> {
    match ctx
        .raft
        .try_write(crate::state::defragment_command(proposal))
        .await?
    {
        Response::Done => {
            ctx.disruption
                .record(Instant::now(), proposal.cost_device_hours);
            metrics::counter!("gangway_defrag_plans_total", "result" => "committed").increment(1);
        }
        other => {
            tracing::info!("defragmentation plan refused: {other:?}");
            metrics::counter!("gangway_defrag_plans_total", "result" => "stale").increment(1);
        }
    }
    Ok(())
}

/// Declares down every node silent for longer than `workers.node_ttl`, while this replica leads.
/// The state machine then revokes its leases and re-queues its gangs from their last checkpoint.
/// Also times out migrations whose checkpoint was never answered.
pub async fn node_down_loop(ctx: ReplicaContext, mut stop: watch::Receiver<bool>) {
    let ttl = ctx.config.workers.node_ttl;
    let period = (ctx.config.workers.heartbeat_interval / 2).max(Duration::from_millis(50));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        if !observe_leadership(&ctx) {
            continue;
        }
        // A linearizable read: a new leader acts only on state that includes its own term's
        // first entry (DESIGN section 4), never on what it had applied as a follower.
        let live: Vec<HostName> = match ctx
            .raft
            .read(|fsm| {
                fsm.store()
                    .nodes()
                    .values()
                    .filter(|n| n.state != crate::engine::NodeState::Down)
                    .map(|n| n.registration.name.clone())
                    .collect()
            })
            .await
        {
            Ok(live) => live,
            Err(e) => {
                tracing::debug!(error = %e, "node-down check skipped: not confirmed as leader");
                continue;
            }
        };
        // Migrations whose checkpoint answer was lost: aborted (or, for a preemption or reclaim,
        // stopped anyway) instead of holding their job and its devices forever.
        let overdue = ctx
            .raft
            .read_local(|fsm| fsm.store().overdue_migrations(wall_clock_ms()));
        for command in overdue {
            match ctx.raft.try_write(command).await {
                Ok(_) => metrics::counter!("gangway_migrations_timed_out_total").increment(1),
                Err(e) => {
                    tracing::warn!(error = %e, "could not time out a migration; will retry");
                    break;
                }
            }
        }
        // History past its retention leaves the replicated state, a batch per command (each replica
        // archives the finished jobs as it applies it).
        let prune = ctx
            .raft
            .read_local(|fsm| fsm.store().prune_due(wall_clock_ms()));
        if let Some(command) = prune {
            match ctx.raft.try_write(command).await {
                Ok(_) => metrics::counter!("gangway_history_prunes_total").increment(1),
                Err(e) => tracing::warn!(error = %e, "could not prune history; will retry"),
            }
        }
        // Drains past their deadline: what still runs on the node is stopped and re-queued.
        let drains = ctx
            .raft
            .read_local(|fsm| fsm.store().overdue_drains(wall_clock_ms()));
        for command in drains {
            match ctx.raft.try_write(command).await {
                Ok(_) => metrics::counter!("gangway_drain_deadlines_total").increment(1),
                Err(e) => {
                    tracing::warn!(error = %e, "could not end an overdue drain; will retry");
                    break;
                }
            }
        }
        for node in ctx.heartbeats.expired(&live, ttl, Instant::now()) {
            let reason = format!(
                "no heartbeat for more than {}",
                humantime::format_duration(ttl)
            );
            tracing::warn!(%node, %reason, "declaring node down");
            match ctx
                .raft
                .try_write(Command::NodeDown {
                    node: node.clone(),
                    reason,
                })
                .await
            {
                Ok(_) => metrics::counter!("gangway_nodes_declared_down_total").increment(1),
                Err(e) => {
                    tracing::warn!(%node, error = %e, "could not declare node down; will retry");
                    break;
                }
            }
        }
    }
}

/// A lease under an idle policy, as the idle loop reads it from the state.
struct WatchedLease {
    job: JobId,
    epoch: u64,
    policy: IdlePolicy,
    devices: Vec<(HostName, u32)>,
}

/// Watches the utilization of every lease whose queue has an idle policy, while this replica
/// leads, and commits `Command::IdleLease` for a lease idle for its queue's window. The state
/// machine applies the policy (reclaim or report) after checking the lease is still the same.
///
/// Samples come from the heartbeats; one pass per heartbeat interval sees each sample about once.
/// A device whose host has not reported within three intervals counts as busy.
pub async fn idle_loop(ctx: ReplicaContext, mut stop: watch::Receiver<bool>) {
    let period = ctx
        .config
        .workers
        .heartbeat_interval
        .max(Duration::from_millis(50));
    let max_age = period * 3;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        let reclaimed = ctx
            .raft
            .read_local(|fsm| fsm.store().reclaimed_device_hours());
        metrics::gauge!("gangway_reclaimed_device_hours").set(reclaimed);
        if !observe_leadership(&ctx) {
            continue;
        }
        // A local read is enough to pick candidates: the command names the lease epoch and the
        // state machine re-checks everything against the committed state.
        let watched: Vec<WatchedLease> = ctx.raft.read_local(|fsm| {
            let store = fsm.store();
            store
                .jobs()
                .values()
                .filter(|j| j.migration.is_none())
                .filter_map(|j| {
                    let lease = j.lease.as_ref()?;
                    let queue = gangway_proto::ids::QueueName::new(j.spec.queue.clone());
                    let policy = store.queues().get(&queue)?.idle?;
                    if policy.action == engine::IdleAction::Report
                        && j.idle_reported_epoch == Some(lease.epoch)
                    {
                        return None;
                    }
                    let devices = lease
                        .placement
                        .tasks
                        .iter()
                        .flat_map(|t| {
                            t.devices
                                .iter()
                                .map(|d| (t.host.clone(), u32::from(d.index)))
                        })
                        .collect();
                    Some(WatchedLease {
                        job: j.id.clone(),
                        epoch: lease.epoch,
                        policy,
                        devices,
                    })
                })
                .collect()
        });
        ctx.idle
            .retain(&watched.iter().map(|w| (w.job.clone(), w.epoch)).collect());
        let now = Instant::now();
        let mut samples: BTreeMap<HostName, Option<Vec<super::heartbeats::DeviceSample>>> =
            BTreeMap::new();
        let mut idle_now = 0u64;
        for w in watched {
            let observed: Vec<((HostName, u32), Option<u32>)> = w
                .devices
                .iter()
                .map(|(host, index)| {
                    let host_samples = samples
                        .entry(host.clone())
                        .or_insert_with(|| ctx.heartbeats.fresh_devices(host, max_age, now));
                    let utilization = host_samples
                        .as_ref()
                        .and_then(|s| s.iter().find(|d| d.index == *index))
                        .map(|d| d.utilization_pct);
                    ((host.clone(), *index), utilization)
                })
                .collect();
            let idle = ctx
                .idle
                .observe(&w.job, w.epoch, &observed, w.policy.threshold_pct, now);
            let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
            if idle_ms < w.policy.window_ms {
                continue;
            }
            idle_now += 1;
            let command = Command::IdleLease(crate::state::IdleReport {
                job: w.job.clone(),
                epoch: w.epoch,
                idle_ms,
            });
            match ctx.raft.try_write(command).await {
                Ok(Response::Done) => {
                    tracing::info!(job = %w.job, epoch = w.epoch, idle_ms, action = w.policy.action.as_str(), "idle lease");
                    metrics::counter!("gangway_idle_leases_total", "action" => w.policy.action.as_str())
                        .increment(1);
                }
                Ok(other) => tracing::debug!(job = %w.job, "idle lease not acted on: {other:?}"),
                Err(e) => {
                    tracing::warn!(job = %w.job, error = %e, "could not commit an idle lease; will retry");
                    break;
                }
            }
        }
        metrics::gauge!("gangway_idle_leases").set(idle_now as f64);
    }
}
