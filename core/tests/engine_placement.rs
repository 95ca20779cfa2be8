//! Table-driven tests of the engine's placement decisions, reasons, quotas, backfill and preemption.

use gangway_core::engine::{
    schedule, ClusterState, DeviceDemand, DeviceKind, DeviceModel, GangPlacement, GangRequest,
    HostSpec, HostTopology, NodeState, PendingReason, Plan, PolicyName, PreemptionReason,
    QueueConfig, SchedulerConfig, TopologyLevel,
};
use gangway_proto::ids::{HostName, JobId, QueueName};
use std::collections::BTreeMap;

/// (name, rack, model, devices, nvlink domains)
type HostDef<'a> = (&'a str, &'a str, &'a str, u16, u16);

fn cluster(hosts: &[HostDef<'_>]) -> ClusterState {
    let mut c = ClusterState::new(["H100", "A100", "T4"].map(|m| DeviceModel {
        name: m.to_owned(),
        kind: DeviceKind::Gpu,
        memory_mib: 80 * 1024,
    }));
    for (name, rack, model, n, nv) in hosts {
        c.add_host(HostSpec::uniform(
            *name,
            HostTopology::new("dc1", "z1", "p1", rack),
            model,
            *n,
            *nv,
            128_000,
            1024 * 1024,
        ))
        .expect("host");
    }
    c
}

fn config(policy: PolicyName) -> SchedulerConfig {
    SchedulerConfig {
        policy,
        preemption: false,
        ..SchedulerConfig::default()
    }
}

fn gpus(id: &str, tasks: u32, n: u32) -> GangRequest {
    GangRequest::new(id, tasks, DeviceDemand::Whole(n)).with_models(&["H100"])
}

/// Runs a gang at an exact place.
fn run_at(
    c: &mut ClusterState,
    req: GangRequest,
    host: &str,
    devices: &[u16],
    now: u64,
    borrowed: u64,
) {
    let m = match req.per_task.devices {
        DeviceDemand::Fraction(m) => m,
        _ => 1000,
    };
    let p = GangPlacement {
        job: req.id.clone(),
        queue: req.queue.clone(),
        tasks: vec![gangway_core::engine::TaskPlacement {
            host: HostName::new(host),
            devices: devices
                .iter()
                .map(|&index| gangway_core::engine::DeviceShare { index, milli: m })
                .collect(),
            cpu_milli: req.per_task.cpu_milli,
            memory_mib: req.per_task.memory_mib,
        }],
        borrowed_milli: borrowed,
    };
    c.apply_placement(req, p, now).expect("run_at applies");
}

fn placement<'p>(plan: &'p Plan, job: &str) -> Option<&'p GangPlacement> {
    plan.placements.iter().find(|p| p.job.as_str() == job)
}

fn reason<'p>(plan: &'p Plan, job: &str) -> &'p PendingReason {
    &plan
        .pending
        .iter()
        .find(|p| p.job.as_str() == job)
        .unwrap_or_else(|| panic!("{job} not pending in {plan:?}"))
        .reason
}

fn hosts_of(p: &GangPlacement) -> Vec<&str> {
    p.tasks.iter().map(|t| t.host.as_str()).collect()
}

/// Applies the whole plan: every placement must pass the cluster's re-check.
fn apply(c: &mut ClusterState, plan: &Plan, pending: &[GangRequest], now: u64) {
    for p in &plan.placements {
        let req = pending
            .iter()
            .find(|r| r.id == p.job)
            .expect("placed job was pending");
        c.apply_placement(req.clone(), p.clone(), now)
            .unwrap_or_else(|e| panic!("plan does not apply: {e}"));
    }
}

#[test]
fn single_task_host_choice_per_policy() {
    // h0 is empty, h1 has 3 of 8 free: best-fit/fgd/gangway pack into h1, first-fit takes h0.
    let cases = [
        (PolicyName::FirstFit, "h0"),
        (PolicyName::BestFit, "h1"),
        (PolicyName::Fgd, "h1"),
        (PolicyName::Gangway, "h1"),
        (PolicyName::StaticQuota, "h1"),
        (PolicyName::Backfill, "h0"),
    ];
    for (policy, want) in cases {
        let mut c = cluster(&[("h0", "r0", "H100", 8, 1), ("h1", "r0", "H100", 8, 1)]);
        run_at(&mut c, gpus("busy", 1, 5), "h1", &[0, 1, 2, 3, 4], 0, 0);
        let pending = vec![gpus("j", 1, 2)];
        let plan = schedule(&c, &pending, &config(policy), 1);
        let p = placement(&plan, "j").unwrap_or_else(|| panic!("{policy}: not placed"));
        assert_eq!(hosts_of(p), vec![want], "{policy}");
        apply(&mut c, &plan, &pending, 1);
    }
}

#[test]
fn fractional_task_takes_the_tightest_device_under_best_fit() {
    let mut c = cluster(&[("h0", "r0", "T4", 4, 1)]);
    let frac = |id: &str, m: u32| GangRequest::new(id, 1, DeviceDemand::Fraction(m));
    run_at(&mut c, frac("a", 300), "h0", &[1], 0, 0); // device 1: 700 free
    run_at(&mut c, frac("b", 600), "h0", &[2], 0, 0); // device 2: 400 free
    let pending = vec![frac("j", 350)];
    for policy in [PolicyName::BestFit, PolicyName::Gangway, PolicyName::Fgd] {
        let plan = schedule(&c, &pending, &config(policy), 1);
        let p = placement(&plan, "j").expect("placed");
        assert_eq!(p.tasks[0].devices[0].index, 2, "{policy}");
        assert_eq!(p.tasks[0].devices[0].milli, 350);
    }
    let plan = schedule(&c, &pending, &config(PolicyName::FirstFit), 1);
    assert_eq!(
        placement(&plan, "j").expect("placed").tasks[0].devices[0].index,
        0
    );
}

#[test]
fn gangs_are_all_or_nothing() {
    for policy in PolicyName::ALL {
        let c = cluster(&[("h0", "r0", "H100", 8, 1), ("h1", "r0", "H100", 8, 1)]);
        let pending = vec![gpus("big", 3, 8)];
        let plan = schedule(&c, &pending, &config(policy), 0);
        assert!(plan.placements.is_empty(), "{policy}");
        assert_eq!(
            reason(&plan, "big").to_string(),
            "needs 24 x H100 (3 tasks of 8) (24 in all); only 16 are free in the cluster",
            "{policy}"
        );
    }
}

#[test]
fn required_rack_is_never_violated_and_reason_names_largest_block() {
    let mut c = cluster(&[
        ("a0", "r0", "H100", 8, 1),
        ("a1", "r0", "H100", 8, 1),
        ("b0", "r1", "H100", 8, 1),
        ("b1", "r1", "H100", 8, 1),
    ]);
    run_at(&mut c, gpus("x", 1, 4), "a0", &[0, 1, 2, 3], 0, 0);
    run_at(&mut c, gpus("y", 1, 4), "b0", &[0, 1, 2, 3], 0, 0);
    for policy in PolicyName::ALL {
        let pending = vec![gpus("g", 2, 8).with_required(TopologyLevel::Rack)];
        let plan = schedule(&c, &pending, &config(policy), 0);
        assert!(plan.placements.is_empty(), "{policy}");
        let r = reason(&plan, "g");
        assert!(
            matches!(r, PendingReason::NoDomainFits { .. }),
            "{policy}: {r:?}"
        );
        assert_eq!(
            r.to_string(),
            "needs 16 x H100 (2 tasks of 8) within one rack (16 in all); largest free block in any rack is 12"
        );
        // 12 GPUs in one rack: 3 tasks of 4 do fit, inside one rack.
        let pending = vec![gpus("g", 3, 4).with_required(TopologyLevel::Rack)];
        let plan = schedule(&c, &pending, &config(policy), 0);
        let p = placement(&plan, "g").unwrap_or_else(|| panic!("{policy}"));
        let racks: Vec<char> = hosts_of(p)
            .iter()
            .map(|h| h.chars().next().unwrap())
            .collect();
        assert!(racks.iter().all(|r| *r == racks[0]), "{policy}: {racks:?}");
        let mut c2 = c.clone();
        apply(&mut c2, &plan, &pending, 0);
    }
}

#[test]
fn gangway_packs_unconstrained_gangs_in_the_narrowest_domain() {
    // A free host in rack r1; rack r0 has two half-used hosts.
    let mut c = cluster(&[
        ("a0", "r0", "H100", 8, 1),
        ("a1", "r0", "H100", 8, 1),
        ("b0", "r1", "H100", 8, 1),
    ]);
    run_at(&mut c, gpus("x", 1, 4), "a0", &[0, 1, 2, 3], 0, 0);
    run_at(&mut c, gpus("y", 1, 4), "a1", &[0, 1, 2, 3], 0, 0);
    let pending = vec![gpus("g", 2, 4)];
    let plan = schedule(&c, &pending, &config(PolicyName::Gangway), 0);
    let p = placement(&plan, "g").expect("placed");
    assert_eq!(
        hosts_of(p),
        vec!["b0", "b0"],
        "one host beats two (narrowest domain first)"
    );
    // Three tasks of 4 fit no host and no rack: the fullest hosts of the cluster take them.
    let pending = vec![gpus("g", 3, 4)];
    let plan = schedule(&c, &pending, &config(PolicyName::Gangway), 0);
    let mut hs = hosts_of(placement(&plan, "g").expect("placed"));
    hs.sort();
    assert_eq!(hs, vec!["a0", "a1", "b0"]);
    // With the rack required, it waits.
    let pending = vec![gpus("g", 3, 4).with_required(TopologyLevel::Rack)];
    let plan = schedule(&c, &pending, &config(PolicyName::Gangway), 0);
    assert!(plan.placements.is_empty());
    // With preferred host, a 2 x 4 gang that fits on one host goes there.
    let pending = vec![gpus("g", 2, 4).with_preferred(TopologyLevel::Host)];
    let c = cluster(&[("a0", "r0", "H100", 8, 1), ("a1", "r0", "H100", 8, 1)]);
    let plan = schedule(&c, &pending, &config(PolicyName::Gangway), 0);
    let p = placement(&plan, "g").expect("placed");
    assert_eq!(hosts_of(p), vec!["a0", "a0"]);
}

#[test]
fn nvlink_requirement_keeps_a_task_in_one_domain() {
    let mut c = cluster(&[("h0", "r0", "H100", 8, 2)]);
    run_at(&mut c, gpus("x", 1, 1), "h0", &[0], 0, 0);
    for policy in PolicyName::ALL {
        let pending = vec![gpus("g", 1, 4).with_required(TopologyLevel::Nvlink)];
        let plan = schedule(&c, &pending, &config(policy), 0);
        let p = placement(&plan, "g").unwrap_or_else(|| panic!("{policy}"));
        let idx: Vec<u16> = p.tasks[0].devices.iter().map(|d| d.index).collect();
        assert_eq!(idx, vec![4, 5, 6, 7], "{policy}");
        let pending = vec![gpus("g", 1, 5).with_required(TopologyLevel::Nvlink)];
        let plan = schedule(&c, &pending, &config(policy), 0);
        assert_eq!(
            reason(&plan, "g").to_string(),
            "needs 5 x H100 within one nvlink (5 in all); largest free block in any nvlink is 4"
        );
    }
}

#[test]
fn unknown_models_and_unready_hosts() {
    let mut c = cluster(&[("h0", "r0", "H100", 8, 1), ("h1", "r0", "H100", 8, 1)]);
    let pending = vec![GangRequest::new("j", 1, DeviceDemand::Whole(1)).with_models(&["A100"])];
    let plan = schedule(&c, &pending, &config(PolicyName::Gangway), 0);
    assert_eq!(
        reason(&plan, "j").to_string(),
        "needs 1 x A100; no host in the cluster has such devices"
    );
    c.set_node_state(&HostName::new("h0"), NodeState::Cordoned);
    let pending = vec![gpus("j", 1, 8), gpus("k", 1, 8)];
    for policy in PolicyName::ALL {
        let plan = schedule(&c, &pending, &config(policy), 0);
        assert_eq!(plan.placements.len(), 1, "{policy}");
        assert_eq!(hosts_of(&plan.placements[0]), vec!["h1"]);
    }
}

#[test]
fn cpu_and_memory_are_filtered() {
    let c = cluster(&[("h0", "r0", "H100", 8, 1)]);
    let pending = vec![gpus("j", 1, 1).with_cpu_milli(200_000)];
    let plan = schedule(&c, &pending, &config(PolicyName::Gangway), 0);
    assert_eq!(
        reason(&plan, "j").to_string(),
        "needs 1 x H100; 8 are free but 0 host(s) have room for one task (1 device(s), 200 CPU, 1024 MiB memory)"
    );
}

fn queues(defs: &[(&str, u64, bool)]) -> BTreeMap<QueueName, QueueConfig> {
    defs.iter()
        .map(|(n, g, b)| {
            (
                QueueName::new(*n),
                QueueConfig {
                    name: QueueName::new(*n),
                    guaranteed_milli: *g,
                    may_borrow: *b,
                    idle: None,
                },
            )
        })
        .collect()
}

#[test]
fn static_quota_confines_queues_to_their_guarantee() {
    let c = cluster(&[("h0", "r0", "H100", 8, 1), ("h1", "r0", "H100", 8, 1)]);
    let mut cfg = config(PolicyName::StaticQuota);
    cfg.queues = queues(&[("a", 4000, true), ("b", 12_000, false)]);
    let pending = vec![
        gpus("a1", 1, 4).with_queue("a"),
        gpus("a2", 1, 1).with_queue("a").with_submitted_at_ms(1),
        gpus("b1", 1, 8).with_queue("b"),
        gpus("c1", 1, 1).with_queue("c"),
    ];
    let plan = schedule(&c, &pending, &cfg, 0);
    assert!(placement(&plan, "a1").is_some());
    assert!(placement(&plan, "b1").is_some());
    assert_eq!(
        reason(&plan, "a2").to_string(),
        "queue a may use 4 devices and already uses 4"
    );
    assert!(matches!(
        reason(&plan, "c1"),
        PendingReason::QuotaExceeded { limit_milli: 0, .. }
    ));
    assert!(plan.placements.iter().all(|p| p.borrowed_milli == 0));
}

#[test]
fn gangway_borrows_idle_capacity_and_records_it() {
    let c = cluster(&[("h0", "r0", "H100", 8, 1), ("h1", "r0", "H100", 8, 1)]);
    let mut cfg = config(PolicyName::Gangway);
    cfg.queues = queues(&[("a", 4000, true), ("b", 4000, false)]);
    let pending = vec![
        gpus("a1", 1, 8).with_queue("a"),
        gpus("b1", 1, 4).with_queue("b"),
        gpus("b2", 1, 1).with_queue("b").with_submitted_at_ms(1),
    ];
    let plan = schedule(&c, &pending, &cfg, 0);
    assert_eq!(placement(&plan, "a1").expect("a1").borrowed_milli, 4000);
    assert_eq!(placement(&plan, "b1").expect("b1").borrowed_milli, 0);
    assert!(matches!(
        reason(&plan, "b2"),
        PendingReason::QuotaExceeded { .. }
    ));
}

#[test]
fn first_fit_is_strict_fifo_per_queue() {
    let c = cluster(&[("h0", "r0", "H100", 8, 1)]);
    let pending = vec![
        gpus("head", 2, 8).with_submitted_at_ms(0),
        gpus("small", 1, 1).with_submitted_at_ms(1),
        gpus("other", 1, 1).with_queue("q2").with_submitted_at_ms(2),
    ];
    let plan = schedule(&c, &pending, &config(PolicyName::FirstFit), 0);
    assert!(placement(&plan, "other").is_some());
    let r = reason(&plan, "small");
    assert!(
        matches!(r, PendingReason::BlockedBehind { job, .. } if job.as_str() == "head"),
        "{r:?}"
    );
    assert!(r
        .to_string()
        .starts_with("waiting behind job head: first-fit serves queue default strictly in order"));
    // Best-fit skips the blocked head.
    let plan = schedule(&c, &pending, &config(PolicyName::BestFit), 0);
    assert!(placement(&plan, "small").is_some());
}

#[test]
fn easy_backfill_holds_the_heads_reservation() {
    let mut c = cluster(&[("h0", "r0", "H100", 8, 1), ("h1", "r0", "H100", 8, 1)]);
    run_at(
        &mut c,
        gpus("running", 1, 8).with_runtime_ms(100),
        "h0",
        &[0, 1, 2, 3, 4, 5, 6, 7],
        0,
        0,
    );
    let pending = vec![
        gpus("head", 2, 8)
            .with_runtime_ms(1000)
            .with_submitted_at_ms(0),
        gpus("long", 1, 8)
            .with_runtime_ms(500)
            .with_submitted_at_ms(1),
        gpus("short", 1, 4)
            .with_runtime_ms(50)
            .with_submitted_at_ms(2),
        gpus("unknown", 1, 4).with_submitted_at_ms(3),
    ];
    let plan = schedule(&c, &pending, &config(PolicyName::Backfill), 10);
    assert!(matches!(
        reason(&plan, "head"),
        PendingReason::InsufficientCapacity { .. }
    ));
    let r = reason(&plan, "long");
    assert!(
        matches!(r, PendingReason::BlockedBehind { job, .. } if job.as_str() == "head"),
        "{r:?}"
    );
    assert!(r.to_string().contains("backfill reservation"), "{r}");
    assert_eq!(
        hosts_of(placement(&plan, "short").expect("short backfills")),
        vec!["h1"]
    );
    assert!(matches!(
        reason(&plan, "unknown"),
        PendingReason::BlockedBehind { .. }
    ));
    apply(&mut c, &plan, &pending, 10);
}

fn preempt_config() -> SchedulerConfig {
    SchedulerConfig {
        policy: PolicyName::Gangway,
        preemption: true,
        min_runtime_ms: 1000,
        ..SchedulerConfig::default()
    }
}

#[test]
fn higher_priority_preempts_the_cheapest_victims() {
    let mut c = cluster(&[("h0", "r0", "H100", 8, 1)]);
    run_at(
        &mut c,
        gpus("low-ckpt", 1, 4).with_checkpointable(true),
        "h0",
        &[0, 1, 2, 3],
        0,
        0,
    );
    run_at(&mut c, gpus("low", 1, 2), "h0", &[4, 5], 0, 0);
    run_at(
        &mut c,
        gpus("mid", 1, 2).with_priority(5),
        "h0",
        &[6, 7],
        0,
        0,
    );
    let pending = vec![gpus("high", 1, 4).with_priority(10)];
    let plan = schedule(&c, &pending, &preempt_config(), 5000);
    assert!(plan.placements.is_empty());
    let victims: Vec<&str> = plan.preemptions.iter().map(|p| p.victim.as_str()).collect();
    assert_eq!(
        victims,
        vec!["low-ckpt"],
        "the checkpointable low-priority gang frees 4 at no loss"
    );
    assert!(matches!(
        plan.preemptions[0].reason,
        PreemptionReason::HigherPriority {
            victim_priority: 0,
            preemptor_priority: 10
        }
    ));
    assert_eq!(plan.preemptions[0].preemptor, JobId::new("high"));
    assert_eq!(
        reason(&plan, "high").to_string(),
        "waiting for preempted job(s) low-ckpt to checkpoint and stop"
    );
    // Needs 6: two low-priority victims (minimal set), never the mid one that is not needed.
    let pending = vec![gpus("high", 1, 6).with_priority(10)];
    let plan = schedule(&c, &pending, &preempt_config(), 5000);
    let mut victims: Vec<&str> = plan.preemptions.iter().map(|p| p.victim.as_str()).collect();
    victims.sort();
    assert_eq!(victims, vec!["low", "low-ckpt"]);
    // Min runtime: too young to preempt.
    let plan = schedule(&c, &pending, &preempt_config(), 500);
    assert!(plan.preemptions.is_empty());
    // Equal priority never preempts; preemption off never preempts.
    let pending = vec![gpus("peer", 1, 6)];
    assert!(schedule(&c, &pending, &preempt_config(), 5000)
        .preemptions
        .is_empty());
    let mut off = preempt_config();
    off.preemption = false;
    let pending = vec![gpus("high", 1, 6).with_priority(10)];
    assert!(schedule(&c, &pending, &off, 5000).preemptions.is_empty());
}

#[test]
fn queue_under_guarantee_reclaims_from_borrowers() {
    let mut c = cluster(&[("h0", "r0", "H100", 8, 1)]);
    run_at(
        &mut c,
        gpus("borrower", 1, 8).with_queue("b"),
        "h0",
        &[0, 1, 2, 3, 4, 5, 6, 7],
        0,
        8000,
    );
    let mut cfg = preempt_config();
    cfg.queues = queues(&[("a", 8000, true), ("b", 0, true)]);
    let pending = vec![gpus("owner", 1, 4).with_queue("a")];
    let plan = schedule(&c, &pending, &cfg, 5000);
    assert_eq!(plan.preemptions.len(), 1);
    assert_eq!(
        plan.preemptions[0].reason,
        PreemptionReason::QuotaReclaim {
            owner_queue: QueueName::new("a"),
            borrower_queue: QueueName::new("b"),
        }
    );
    // A queue already at its guarantee cannot reclaim.
    cfg.queues = queues(&[("a", 2000, true), ("b", 0, true)]);
    let plan = schedule(&c, &pending, &cfg, 5000);
    assert!(plan.preemptions.is_empty());
}

#[test]
fn later_gangs_see_earlier_placements_of_the_round() {
    let c = cluster(&[("h0", "r0", "H100", 8, 1)]);
    for policy in PolicyName::ALL {
        let pending: Vec<GangRequest> = (0..5)
            .map(|i| gpus(&format!("j{i}"), 1, 3).with_submitted_at_ms(i))
            .collect();
        let plan = schedule(&c, &pending, &config(policy), 0);
        assert_eq!(plan.placements.len(), 2, "{policy}");
        assert_eq!(plan.pending.len(), 3, "{policy}");
        let mut c2 = c.clone();
        apply(&mut c2, &plan, &pending, 0);
    }
}

#[test]
fn invalid_and_duplicate_requests_are_reported() {
    let c = cluster(&[("h0", "r0", "H100", 8, 1)]);
    let pending = vec![
        GangRequest::new("zero", 0, DeviceDemand::Whole(1)),
        GangRequest::new("frac", 1, DeviceDemand::Fraction(1000)),
        gpus("dup", 1, 1),
        gpus("dup", 1, 1),
    ];
    let plan = schedule(&c, &pending, &config(PolicyName::Gangway), 0);
    assert_eq!(plan.placements.len(), 1);
    assert_eq!(plan.pending.len(), 3);
    assert!(reason(&plan, "zero").to_string().starts_with("validate:"));
}

#[test]
fn a_task_larger_than_any_host_says_so_and_holds_no_queue_up() {
    let c = cluster(&[("a0", "r0", "H100", 8, 1), ("a1", "r0", "H100", 8, 1)]);
    for policy in PolicyName::ALL {
        // The too-big job is first in its queue; under FIFO policies it would block the second.
        let pending = vec![gpus("big", 1, 16), gpus("small", 1, 2)];
        let plan = schedule(&c, &pending, &config(policy), 0);
        let r = reason(&plan, "big");
        assert!(
            matches!(
                r,
                PendingReason::NeverFits {
                    per_task: 16,
                    largest_host: 8,
                    ..
                }
            ),
            "{policy}: {r:?}"
        );
        assert!(r.to_string().contains("the largest host has 8"), "{r}");
        assert!(
            placement(&plan, "small").is_some(),
            "{policy}: a never-fitting job held its queue up"
        );
    }
}

/// `job migrate --to/--avoid`: the filter binds the one gang it belongs to and no other, under
/// every policy, and a gang whose filter leaves no room waits instead of landing anywhere.
#[test]
fn host_filters_bind_only_their_own_gang() {
    use gangway_core::engine::HostFilter;
    let names = |hosts: &[&str]| hosts.iter().map(|h| HostName::new(*h)).collect();
    let hosts: [HostDef<'_>; 3] = [
        ("h1", "r1", "H100", 8, 1),
        ("h2", "r1", "H100", 8, 1),
        ("h3", "r2", "H100", 8, 1),
    ];
    // (filter, hosts the 1x8 gang may land on; empty: must stay pending)
    let cases: Vec<(HostFilter, Vec<&str>)> = vec![
        (HostFilter::default(), vec!["h1", "h2", "h3"]),
        (
            HostFilter {
                avoid: names(&["h1", "h2"]),
                ..HostFilter::default()
            },
            vec!["h3"],
        ),
        (
            HostFilter {
                only: names(&["h2"]),
                ..HostFilter::default()
            },
            vec!["h2"],
        ),
        (
            HostFilter {
                only: names(&["h2"]),
                avoid: names(&["h2"]),
            },
            vec![],
        ),
    ];
    for policy in [
        PolicyName::Gangway,
        PolicyName::FirstFit,
        PolicyName::BestFit,
    ] {
        for (filter, allowed) in &cases {
            let c = cluster(&hosts);
            // The filtered gang goes first; an unfiltered one after it (in another queue, so a
            // FIFO policy does not hold it behind a mover that waits) must still see every host.
            let pending = vec![
                gpus("mover", 1, 8).with_hosts(filter.clone()),
                gpus("other", 2, 8)
                    .with_submitted_at_ms(1)
                    .with_queue("other"),
            ];
            let plan = schedule(&c, &pending, &config(policy), 0);
            match placement(&plan, "mover") {
                Some(p) => assert!(
                    allowed.contains(&hosts_of(p)[0]),
                    "{policy:?} {filter:?}: placed on {:?}",
                    hosts_of(p)
                ),
                None => assert!(allowed.is_empty(), "{policy:?} {filter:?}: not placed"),
            }
            let other = placement(&plan, "other")
                .unwrap_or_else(|| panic!("{policy:?} {filter:?}: other not placed"));
            assert_eq!(other.tasks.len(), 2);
        }
    }
}

/// The defragmenter's story: a 2x8 gang waits although 16 devices are free, because two 1-GPU jobs
/// sit on the two otherwise empty hosts. The plan moves exactly those two onto the third host and
/// puts the gang on the hosts they leave; jobs that may not move (not checkpointable, too young,
/// higher priority) are never chosen, and then no plan exists.
#[test]
fn defrag_moves_the_fewest_devices_that_free_a_fitting_block() {
    use gangway_core::engine::{blocked_by_shape, plan_defrag, DefragBudget};
    let setup = |a: GangRequest, b: GangRequest| {
        let mut c = cluster(&[
            ("h1", "r1", "H100", 8, 1),
            ("h2", "r1", "H100", 8, 1),
            ("h3", "r1", "H100", 8, 1),
        ]);
        run_at(&mut c, a, "h1", &[0], 0, 0);
        run_at(&mut c, b, "h2", &[0], 0, 0);
        run_at(
            &mut c,
            gpus("big-fixed", 1, 6),
            "h3",
            &[0, 1, 2, 3, 4, 5],
            0,
            0,
        );
        c
    };
    let small = |id: &str| gpus(id, 1, 1).with_checkpointable(true);
    let gang = gpus("gang", 2, 8).with_submitted_at_ms(10);
    let budget = DefragBudget {
        min_runtime_ms: 1_000,
        ..DefragBudget::default()
    };
    let cfg = config(PolicyName::Gangway);

    // Phase 1: the gang is blocked by shape, not capacity.
    let c = setup(small("a"), small("b"));
    let plan = schedule(&c, std::slice::from_ref(&gang), &cfg, 5_000);
    assert!(placement(&plan, "gang").is_none());
    assert!(
        blocked_by_shape(reason(&plan, "gang")),
        "{:?}",
        reason(&plan, "gang")
    );

    // Phase 2: the plan moves a and b (2 devices) onto h3, and the gang takes h1 and h2.
    let d = plan_defrag(&c, &gang, &cfg, &budget, 5_000).expect("a plan");
    let mut moved: Vec<&str> = d.moves.iter().map(|m| m.job.as_str()).collect();
    moved.sort_unstable();
    assert_eq!(moved, ["a", "b"]);
    assert_eq!(d.moved_devices(), 2);
    assert!(d.moves.iter().all(|m| hosts_of(&m.to) == ["h3"]));
    let mut gang_hosts = hosts_of(&d.gang);
    gang_hosts.sort_unstable();
    assert_eq!(gang_hosts, ["h1", "h2"]);
    // Applying the moves and then the gang is valid: nothing is double-booked.
    let mut after = c.clone();
    for m in &d.moves {
        let g = after.release(&m.job).unwrap();
        after
            .apply_placement(g.request, m.to.clone(), 5_000)
            .unwrap();
    }
    after
        .apply_placement(gang.clone(), d.gang.clone(), 5_000)
        .unwrap();

    // Phase 3: gangs that may not move are never chosen; then there is no plan at all.
    let cases = [
        ("not checkpointable", gpus("a", 1, 1), 5_000),
        ("too young", small("a"), 500),
        ("higher priority", small("a").with_priority(5), 5_000),
    ];
    for (why, a, now) in cases {
        let c = setup(a, small("b"));
        assert_eq!(plan_defrag(&c, &gang, &cfg, &budget, now), None, "{why}");
    }
}
