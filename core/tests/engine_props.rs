//! Property tests of the engine over random clusters and workloads: every plan re-applies through
//! `ClusterState::apply_placement` (no device over-committed, gangs whole, required domains kept),
//! every pending gang is accounted for once, quotas hold except by recorded borrowing, and the
//! output is deterministic.

use gangway_core::engine::{
    schedule, ClusterState, DeviceDemand, DeviceKind, DeviceModel, GangRequest, HostSpec,
    HostTopology, PendingReason, Plan, PolicyName, QueueConfig, SchedulerConfig, TopologyLevel,
};
use gangway_proto::ids::QueueName;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Debug)]
struct HostGen {
    rack: u8,
    model: u8,
    devices: u16,
    nvlink: u16,
    cpu: u64,
}

#[derive(Clone, Debug)]
struct GangGen {
    tasks: u32,
    demand: u8,
    amount: u32,
    model: Option<u8>,
    required: u8,
    preferred: u8,
    queue: u8,
    priority: i32,
    runtime: Option<u64>,
    cpu: u64,
}

const MODELS: [&str; 2] = ["H100", "A100"];

fn host_gen() -> impl Strategy<Value = HostGen> {
    (0u8..3, 0u8..2, 0u16..=8, 1u16..=2, 1u64..=64).prop_map(
        |(rack, model, devices, nvlink, cpu)| HostGen {
            rack,
            model,
            devices,
            nvlink,
            cpu: cpu * 1000,
        },
    )
}

fn gang_gen() -> impl Strategy<Value = GangGen> {
    (
        (1u32..=4, 0u8..3, 1u32..=8, proptest::option::of(0u8..2)),
        (
            0u8..6,
            0u8..6,
            0u8..3,
            0i32..3,
            proptest::option::of(1u64..100),
            0u64..=16,
        ),
    )
        .prop_map(
            |(
                (tasks, demand, amount, model),
                (required, preferred, queue, priority, runtime, cpu),
            )| GangGen {
                tasks,
                demand,
                amount,
                model,
                required,
                preferred,
                queue,
                priority,
                runtime,
                cpu: cpu * 1000,
            },
        )
}

fn level(x: u8) -> Option<TopologyLevel> {
    match x {
        1 => Some(TopologyLevel::Nvlink),
        2 => Some(TopologyLevel::Host),
        3 => Some(TopologyLevel::Rack),
        4 => Some(TopologyLevel::Pod),
        _ => None,
    }
}

fn build_cluster(hosts: &[HostGen]) -> ClusterState {
    let mut c = ClusterState::new(MODELS.map(|m| DeviceModel {
        name: m.to_owned(),
        kind: DeviceKind::Gpu,
        memory_mib: 0,
    }));
    for (i, h) in hosts.iter().enumerate() {
        c.add_host(HostSpec::uniform(
            format!("h{i:02}"),
            HostTopology::new("dc", "z", "p", &format!("r{}", h.rack)),
            MODELS[usize::from(h.model)],
            h.devices,
            h.nvlink,
            h.cpu,
            256 * 1024,
        ))
        .expect("host");
    }
    c
}

fn build_gangs(gangs: &[GangGen], prefix: &str, t0: u64) -> Vec<GangRequest> {
    gangs
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let devices = match g.demand {
                0 => DeviceDemand::Whole(g.amount),
                1 => DeviceDemand::Fraction(g.amount * 111),
                _ => DeviceDemand::None,
            };
            let mut r = GangRequest::new(format!("{prefix}{i:03}"), g.tasks, devices)
                .with_queue(format!("q{}", g.queue))
                .with_priority(g.priority)
                .with_submitted_at_ms(t0 + i as u64)
                .with_cpu_milli(g.cpu)
                .with_memory_mib(1024);
            if let Some(m) = g.model {
                r = r.with_models(&[MODELS[usize::from(m)]]);
            }
            if let Some(l) = level(g.required) {
                r = r.with_required(l);
            }
            if let Some(l) = level(g.preferred) {
                r = r.with_preferred(l);
            }
            if let Some(rt) = g.runtime {
                r = r.with_runtime_ms(rt);
                r = r.with_checkpointable(rt % 2 == 0);
            }
            r
        })
        .collect()
}

fn queues() -> BTreeMap<QueueName, QueueConfig> {
    [("q0", 8000, true), ("q1", 4000, false), ("q2", 0, true)]
        .into_iter()
        .map(|(n, g, b)| {
            (
                QueueName::new(n),
                QueueConfig {
                    name: QueueName::new(n),
                    guaranteed_milli: g,
                    may_borrow: b,
                    idle: None,
                },
            )
        })
        .collect()
}

/// Applies a plan; panics (fails the property) if any placement does not re-check.
fn apply(
    c: &mut ClusterState,
    plan: &Plan,
    pending: &[GangRequest],
    now: u64,
) -> Result<(), TestCaseError> {
    for p in &plan.placements {
        let req = pending
            .iter()
            .find(|r| r.id == p.job)
            .ok_or_else(|| TestCaseError::fail(format!("placed unknown job {}", p.job)))?;
        prop_assert_eq!(p.tasks.len(), req.tasks as usize, "gang not whole");
        c.apply_placement(req.clone(), p.clone(), now)
            .map_err(|e| TestCaseError::fail(format!("plan does not re-apply: {e}")))?;
    }
    Ok(())
}

fn check_accounting(plan: &Plan, pending: &[GangRequest]) -> Result<(), TestCaseError> {
    let placed: BTreeSet<_> = plan.placements.iter().map(|p| p.job.clone()).collect();
    prop_assert_eq!(placed.len(), plan.placements.len(), "a job placed twice");
    let waiting: BTreeSet<_> = plan.pending.iter().map(|p| p.job.clone()).collect();
    prop_assert_eq!(waiting.len(), plan.pending.len(), "a job pending twice");
    prop_assert!(placed.is_disjoint(&waiting));
    prop_assert_eq!(placed.len() + waiting.len(), pending.len());
    for p in &plan.pending {
        prop_assert!(!p.reason.to_string().is_empty());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, .. ProptestConfig::default() })]

    #[test]
    fn plans_always_reapply_and_account_for_every_gang(
        hosts in proptest::collection::vec(host_gen(), 1..10),
        first in proptest::collection::vec(gang_gen(), 0..12),
        second in proptest::collection::vec(gang_gen(), 1..16),
        policy in proptest::sample::select(PolicyName::ALL.to_vec()),
        with_queues in any::<bool>(),
    ) {
        let mut c = build_cluster(&hosts);
        let mut config = SchedulerConfig {
            policy,
            preemption: true,
            min_runtime_ms: 5,
            ..SchedulerConfig::default()
        };
        if with_queues {
            config.queues = queues();
        }
        // Round 1 fills the cluster a bit; round 2 sees running gangs (preemption, backfill).
        let round1 = build_gangs(&first, "a", 0);
        let plan1 = schedule(&c, &round1, &config, 0);
        check_accounting(&plan1, &round1)?;
        apply(&mut c, &plan1, &round1, 0)?;

        let round2 = build_gangs(&second, "b", 10);
        let plan2 = schedule(&c, &round2, &config, 20);
        check_accounting(&plan2, &round2)?;
        // Deterministic.
        prop_assert_eq!(&plan2, &schedule(&c, &round2, &config, 20));
        // Preemptions name running victims, once, for pending preemptors.
        let mut victims = BTreeSet::new();
        for p in &plan2.preemptions {
            prop_assert!(c.running().contains_key(&p.victim));
            prop_assert!(victims.insert(p.victim.clone()));
            let awaiting = plan2.pending.iter().any(|w| w.job == p.preemptor
                && matches!(&w.reason, PendingReason::AwaitingPreemption { victims } if victims.contains(&p.victim)));
            prop_assert!(awaiting, "preemptor {} is not awaiting {}", p.preemptor, p.victim);
            let v = &c.running()[&p.victim];
            prop_assert!(20 - v.started_at_ms >= config.min_runtime_ms);
        }
        if !(policy == PolicyName::Gangway && config.preemption) {
            prop_assert!(plan2.preemptions.is_empty());
        }
        let before: BTreeMap<QueueName, u64> = config.queues.keys()
            .map(|q| (q.clone(), c.queue_usage_milli(q)))
            .collect();
        apply(&mut c, &plan2, &round2, 20)?;

        // Quotas.
        if with_queues && policy == PolicyName::StaticQuota {
            for (q, qc) in &config.queues {
                let used = c.queue_usage_milli(q);
                prop_assert!(used <= qc.guaranteed_milli.max(before[q]), "queue {q} over its quota: {used}");
            }
        }
        if with_queues && policy == PolicyName::Gangway {
            for (q, qc) in &config.queues {
                let used = c.queue_usage_milli(q);
                let borrowed: u64 = c.running().values()
                    .filter(|g| &g.request.queue == q)
                    .map(|g| g.placement.borrowed_milli)
                    .sum();
                prop_assert!(used <= qc.guaranteed_milli + borrowed, "queue {q}: {used} used, {borrowed} borrowed");
                if !qc.may_borrow {
                    let new_borrowed: u64 = plan2.placements.iter()
                        .filter(|p| &p.queue == q)
                        .map(|p| p.borrowed_milli)
                        .sum();
                    prop_assert_eq!(new_borrowed, 0);
                }
            }
        }
        if policy != PolicyName::Gangway {
            prop_assert!(plan2.placements.iter().all(|p| p.borrowed_milli == 0));
        }
        // Free capacity never negative (the cluster's own invariant, checked again).
        for h in c.hosts() {
            prop_assert!(h.free_milli.iter().all(|&m| m <= 1000));
        }
    }
}
