//! One scheduling round (`engine::run_round`), the function the leader, the `defrag plan` preview
//! and the simulator share: stories about what the state tells it (migrations under way, blocks
//! held, reasons already written, the defragmenter's room and budget) and what it then decides.

use gangway_core::engine::{
    run_round, ClusterState, DefragBudget, DefragLimits, DeviceDemand, DeviceKind, DeviceModel,
    DeviceShare, GangPlacement, GangRequest, HostSpec, HostTopology, LeaseFacts, RoundInput,
    RoundOutcome, RoundState, SchedulerConfig, TaskPlacement, TopologyLevel,
};
use gangway_proto::ids::{HostName, JobId};
use std::collections::BTreeSet;

const NOW: u64 = 10 * 3_600_000;
const CHECKPOINT_MS: u64 = 120_000;

/// Three 8-GPU hosts in one rack; a 1-GPU trainer runs on h1 and one on h2 (checkpointable, same
/// priority as the gang, started long ago), so 22 GPUs are free but only h3 is whole.
fn fleet() -> ClusterState {
    let mut c = ClusterState::new([DeviceModel {
        name: "H100".into(),
        kind: DeviceKind::Gpu,
        memory_mib: 80 * 1024,
    }]);
    for h in ["h1", "h2", "h3"] {
        let topo = HostTopology::new("dc1", "z1", "p1", "r1");
        c.add_host(HostSpec::uniform(h, topo, "H100", 8, 1, 128_000, 1 << 20))
            .unwrap();
    }
    for (job, host) in [("small-1", "h1"), ("small-2", "h2")] {
        let req = GangRequest::new(job, 1, DeviceDemand::Whole(1))
            .with_checkpointable(true)
            .with_priority(0);
        let placement = GangPlacement {
            job: req.id.clone(),
            queue: req.queue.clone(),
            tasks: vec![TaskPlacement {
                host: HostName::new(host),
                devices: vec![DeviceShare {
                    index: 0,
                    milli: 1000,
                }],
                cpu_milli: req.per_task.cpu_milli,
                memory_mib: req.per_task.memory_mib,
            }],
            borrowed_milli: 0,
        };
        c.apply_placement(req, placement, 0).unwrap();
    }
    c
}

/// A 2x8 gang that must sit in one rack: blocked by shape on `fleet()`.
fn big_gang() -> GangRequest {
    GangRequest::new("big", 2, DeviceDemand::Whole(8)).with_required(TopologyLevel::Rack)
}

fn leases() -> RoundState {
    let mut state = RoundState::default();
    for (job, epoch) in [("small-1", 11), ("small-2", 12)] {
        let facts = LeaseFacts {
            epoch,
            checkpoint_ms: CHECKPOINT_MS,
        };
        state.leases.insert(JobId::new(job), facts);
    }
    state
}

fn limits() -> DefragLimits {
    DefragLimits {
        budget: DefragBudget::default(),
        ..DefragLimits::leader(8, 10.0, 600_000)
    }
}

fn round(
    view: &ClusterState,
    pending: &[GangRequest],
    config: &SchedulerConfig,
    state: &RoundState,
    defrag: Option<&DefragLimits>,
) -> RoundOutcome {
    run_round(RoundInput {
        view,
        pending,
        reasons: &[],
        config,
        state,
        defrag,
        now_ms: NOW,
    })
}

#[test]
fn a_gang_blocked_by_shape_gets_a_defragmentation_proposal_naming_the_leases_it_saw() {
    let view = fleet();
    let pending = [big_gang()];
    let outcome = round(
        &view,
        &pending,
        &SchedulerConfig::default(),
        &leases(),
        Some(&limits()),
    );
    assert_eq!(outcome.blocked_by_shape, vec![JobId::new("big")]);
    assert_eq!(outcome.defrag_tried, vec![JobId::new("big")]);
    let [proposal] = outcome.defrag.as_slice() else {
        panic!("expected one proposal: {outcome:?}");
    };
    assert_eq!(proposal.plan.for_gang, JobId::new("big"));
    // Each move names the lease epoch the round was told about.
    for m in &proposal.plan.moves {
        let expected = leases().leases[&m.job].epoch;
        assert_eq!(proposal.epochs[&m.job], expected, "{}", m.job);
    }
    // Cost: moved devices x their checkpoint time; the block is held for the reservation.
    let moved: u64 = proposal.plan.moves.iter().map(|m| m.devices).sum();
    let cost = moved as f64 * CHECKPOINT_MS as f64 / 3_600_000.0;
    assert!((proposal.cost_device_hours - cost).abs() < 1e-9);
    assert_eq!(proposal.hold_until_ms, NOW + 600_000);
    // The gang's block is two whole hosts, freed by the moves.
    let hosts: BTreeSet<&str> = proposal
        .plan
        .gang
        .tasks
        .iter()
        .map(|t| t.host.as_str())
        .collect();
    assert_eq!(hosts.len(), 2);
}

#[test]
fn the_defragmenter_stays_within_its_room_its_budget_and_its_holds() {
    let view = fleet();
    let pending = [big_gang()];
    let config = SchedulerConfig::default();
    let proposes = |state: &RoundState, limits: &DefragLimits| {
        !round(&view, &pending, &config, state, Some(limits))
            .defrag
            .is_empty()
    };
    assert!(proposes(&leases(), &limits()), "the baseline proposes");

    // No room: as many migrations under way as may run at once.
    let mut busy = leases();
    busy.migrating = (0..8).map(|i| JobId::new(format!("m{i}"))).collect();
    assert!(!proposes(&busy, &limits()), "no migration may start");

    // No budget: the plan costs more device-hours than are left this hour.
    let poor = DefragLimits {
        device_hours_left: 0.01,
        ..limits()
    };
    assert!(!proposes(&leases(), &poor), "over the disruption budget");

    // A gang with a block already held is not planned for again.
    let mut held = leases();
    held.reserved.insert(JobId::new("big"));
    assert!(!proposes(&held, &limits()), "already has a block held");

    // A gang the caller backs off from is not tried at all.
    let mut skip = limits();
    skip.skip.insert(JobId::new("big"));
    let outcome = round(&view, &pending, &config, &leases(), Some(&skip));
    assert!(outcome.defrag.is_empty() && outcome.defrag_tried.is_empty());

    // Too small for the defragmenter's threshold.
    let large_only = DefragLimits {
        min_gang_devices: 32,
        ..limits()
    };
    assert!(!proposes(&leases(), &large_only), "below min_gang_devices");
}

#[test]
fn a_round_writes_only_the_reasons_that_changed() {
    let view = fleet();
    let pending = [big_gang()];
    let config = SchedulerConfig::default();
    let first = round(&view, &pending, &config, &RoundState::default(), None);
    let [waiting] = first.plan.pending.as_slice() else {
        panic!("the gang waits with a reason: {first:?}");
    };
    assert!(
        waiting.reason.to_string().contains("16"),
        "{}",
        waiting.reason
    );

    // The state now holds that reason beside the gang: the same round changes nothing.
    let reasons = [Some(waiting.reason.clone())];
    let again = run_round(RoundInput {
        view: &view,
        pending: &pending,
        reasons: &reasons,
        config: &config,
        state: &RoundState::default(),
        defrag: None,
        now_ms: NOW,
    });
    assert!(again.is_empty(), "{again:?}");
    // Blocked by shape all the same: what the preview and the defragmenter read.
    assert_eq!(again.blocked_by_shape, vec![JobId::new("big")]);
}

#[test]
fn a_preemption_under_way_is_not_started_twice() {
    // h1..h3 full of low-priority 8-GPU work; an urgent 1x8 gang arrives.
    let mut view = ClusterState::new([DeviceModel {
        name: "H100".into(),
        kind: DeviceKind::Gpu,
        memory_mib: 80 * 1024,
    }]);
    for h in ["h1", "h2"] {
        let topo = HostTopology::new("dc1", "z1", "p1", "r1");
        view.add_host(HostSpec::uniform(h, topo, "H100", 8, 1, 128_000, 1 << 20))
            .unwrap();
        let req = GangRequest::new(format!("low-{h}"), 1, DeviceDemand::Whole(8))
            .with_checkpointable(true)
            .with_priority(0);
        let placement = GangPlacement {
            job: req.id.clone(),
            queue: req.queue.clone(),
            tasks: vec![TaskPlacement {
                host: HostName::new(h),
                devices: (0..8)
                    .map(|index| DeviceShare { index, milli: 1000 })
                    .collect(),
                cpu_milli: req.per_task.cpu_milli,
                memory_mib: req.per_task.memory_mib,
            }],
            borrowed_milli: 0,
        };
        view.apply_placement(req, placement, 0).unwrap();
    }
    let pending = [GangRequest::new("urgent", 1, DeviceDemand::Whole(8)).with_priority(10)];
    let config = SchedulerConfig {
        preemption: true,
        min_runtime_ms: 0,
        ..SchedulerConfig::default()
    };
    let first = round(&view, &pending, &config, &RoundState::default(), None);
    let [p] = first.plan.preemptions.as_slice() else {
        panic!("the urgent gang preempts one victim: {first:?}");
    };
    assert_eq!(p.preemptor, JobId::new("urgent"));

    // Its victim is still checkpointing: not preempted again.
    let mut migrating = RoundState::default();
    migrating.migrating.insert(p.victim.clone());
    let again = round(&view, &pending, &config, &migrating, None);
    assert!(
        again.plan.preemptions.iter().all(|q| q.victim != p.victim),
        "{again:?}"
    );
    // Its preemptor already has the victims' hosts held: nothing is preempted for it again.
    let mut held = RoundState::default();
    held.reserved.insert(JobId::new("urgent"));
    let held_round = round(&view, &pending, &config, &held, None);
    assert!(held_round.plan.preemptions.is_empty(), "{held_round:?}");
}
