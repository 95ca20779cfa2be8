//! The defragmenter: its safety under many random cluster states (every plan it returns is valid,
//! moves only what may move, stays within its budget) and its effect in the simulator.
//!
//! Reproduce one state of the churn test: `GANGWAY_SEED=<seed> cargo test -p gangway-scheduler
//! --test defrag churn -- --nocapture`.

use gangway_core::engine::{
    plan_defrag, ClusterState, DefragBudget, DeviceDemand, DeviceKind, DeviceModel, DeviceShare,
    GangPlacement, GangRequest, HostSpec, HostTopology, PolicyName, SchedulerConfig, TaskPlacement,
    TopologyLevel,
};
use gangway_core::sim::synth::{synthetic_trace, JobClass};
use gangway_core::sim::{jobs_from_trace, replay, DefragOptions, ReplayOptions, SimCluster};
use gangway_proto::ids::HostName;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeSet;
use std::path::Path;

const HOSTS: usize = 24;
const PER_RACK: usize = 4;

fn cluster() -> ClusterState {
    let mut c = ClusterState::new([DeviceModel {
        name: "H100".into(),
        kind: DeviceKind::Gpu,
        memory_mib: 80 * 1024,
    }]);
    for h in 0..HOSTS {
        let rack = format!("r{}", h / PER_RACK);
        c.add_host(HostSpec::uniform(
            format!("h{h:02}"),
            HostTopology::new("dc1", "z1", "p1", &rack),
            "H100",
            8,
            1,
            128_000,
            1024 * 1024,
        ))
        .unwrap();
    }
    c
}

/// Fills the cluster with random running jobs (1, 2, 4 or 8 GPUs on one host), some movable and
/// some not, started at random times.
fn random_state(rng: &mut ChaCha8Rng) -> ClusterState {
    let mut c = cluster();
    let fill = rng.random_range(0.3..0.8);
    for n in 0..200 {
        let (free, total) = c.capacity_milli(DeviceKind::Gpu);
        if (free as f64) < (1.0 - fill) * total as f64 {
            break;
        }
        let size = [1u16, 1, 1, 2, 4, 8][rng.random_range(0..6)];
        let h = rng.random_range(0..HOSTS);
        let free: Vec<u16> = c.hosts()[h]
            .free_milli
            .iter()
            .enumerate()
            .filter(|(_, m)| **m == 1000)
            .map(|(i, _)| i as u16)
            .collect();
        if free.len() < usize::from(size) {
            continue;
        }
        let req = GangRequest::new(format!("j{n}"), 1, DeviceDemand::Whole(u32::from(size)))
            .with_checkpointable(rng.random_bool(0.8))
            .with_priority(rng.random_range(-1..=1));
        let placement = GangPlacement {
            job: req.id.clone(),
            queue: req.queue.clone(),
            tasks: vec![TaskPlacement {
                host: c.hosts()[h].spec.name.clone(),
                devices: free[..usize::from(size)]
                    .iter()
                    .map(|&index| DeviceShare { index, milli: 1000 })
                    .collect(),
                cpu_milli: req.per_task.cpu_milli,
                memory_mib: req.per_task.memory_mib,
            }],
            borrowed_milli: 0,
        };
        let started = rng.random_range(0..20_000);
        c.apply_placement(req, placement, started).unwrap();
    }
    c
}

/// 200 seeded cluster states, each with a waiting gang: whenever the defragmenter answers, its
/// plan applies cleanly (moves first, then the gang), moves only movable gangs, never more than
/// the budget, never a gang as large as the one it makes room for, and puts the gang inside its
/// required domain on hosts no moved gang lands on.
#[test]
fn churn_every_plan_is_valid_and_within_its_budget() {
    let base: u64 = std::env::var("GANGWAY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_121);
    let budget = DefragBudget {
        max_moves: 6,
        min_runtime_ms: 5_000,
        candidates: 3,
    };
    let config = SchedulerConfig {
        policy: PolicyName::Gangway,
        preemption: false,
        ..SchedulerConfig::default()
    };
    let now = 20_000;
    let mut planned = 0;
    for k in 0..200u64 {
        let seed = base.wrapping_add(k);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let c = random_state(&mut rng);
        let tasks = rng.random_range(2..=4);
        let gang = GangRequest::new("gang", tasks, DeviceDemand::Whole(8))
            .with_required(TopologyLevel::Rack)
            .with_submitted_at_ms(now);
        let Some(plan) = plan_defrag(&c, &gang, &config, &budget, now) else {
            continue;
        };
        planned += 1;
        let why = format!("seed {seed} (reproduce: GANGWAY_SEED={seed})");
        assert!(
            plan.moves.len() <= budget.max_moves,
            "{why}: {} moves",
            plan.moves.len()
        );
        let mut after = c.clone();
        let gang_hosts: BTreeSet<&HostName> = plan.gang.tasks.iter().map(|t| &t.host).collect();
        for m in &plan.moves {
            let g = after
                .release(&m.job)
                .unwrap_or_else(|| panic!("{why}: {} not running", m.job));
            assert!(
                g.request.checkpointable,
                "{why}: moved {} cannot checkpoint",
                m.job
            );
            assert!(
                g.request.priority <= gang.priority,
                "{why}: moved a higher priority"
            );
            assert!(
                now - g.started_at_ms >= budget.min_runtime_ms,
                "{why}: moved a young gang"
            );
            assert!(
                g.request.total_devices() < gang.total_devices(),
                "{why}: moved a big gang"
            );
            assert!(
                m.to.tasks.iter().all(|t| !gang_hosts.contains(&t.host)),
                "{why}: {} lands where the gang goes",
                m.job
            );
            after
                .apply_placement(g.request, m.to.clone(), now)
                .unwrap_or_else(|e| panic!("{why}: move of {} invalid: {e}", m.job));
        }
        after
            .apply_placement(gang.clone(), plan.gang.clone(), now)
            .unwrap_or_else(|e| panic!("{why}: the gang's placement is invalid: {e}"));
        let racks: BTreeSet<&str> = plan
            .gang
            .tasks
            .iter()
            .map(|t| after.host(&t.host).unwrap().spec.topology.rack.as_str())
            .collect();
        assert_eq!(racks.len(), 1, "{why}: gang spans racks {racks:?}");
    }
    println!("{planned} of 200 states got a plan");
    assert!(
        planned >= 20,
        "the defragmenter almost never finds a plan: {planned}"
    );
}

/// In the simulator, on a seeded synthetic workload (1-GPU jobs and 32-GPU gangs that need a
/// whole rack): defragmentation places the gangs sooner, every job still completes, no gang lands
/// outside its rack, and the churn stays under one migration per 100 device-hours.
#[test]
fn defragmentation_shortens_gang_waits_in_the_simulator_within_the_churn_bound() {
    let text = r#"name = "small"
datacenter = "dc"
[[models]]
name = "gpu"
kind = "gpu"
memory_mib = 0
[layout]
hosts_per_rack = 4
racks_per_pod = 4
[[host_groups]]
count = 32
devices = 8
model = "gpu"
[scheduler]
preemption = false
min_runtime_s = 600
max_gangs_per_round = 100000
[replay]
tick_s = 300
[[queues]]
name = "synthetic"
guaranteed_devices = 0
"#;
    let cluster = SimCluster::parse(text, Path::new("small.toml")).unwrap();
    let mix = [
        JobClass {
            gpus: 1,
            share: 0.93,
            mean_duration_s: 4.0 * 3600.0,
        },
        JobClass {
            gpus: 32,
            share: 0.07,
            mean_duration_s: 2.0 * 3600.0,
        },
    ];
    let csv = synthetic_trace(3, 36.0, 0.9, 256, &mix).unwrap();
    let trace = gangway_core::sim::philly::parse_trace(&csv, Path::new("synth.csv")).unwrap();
    let jobs = jobs_from_trace(&trace, &cluster, 0, u64::MAX).unwrap();
    let run = |defrag: Option<DefragOptions>| {
        replay(
            &cluster,
            &jobs,
            PolicyName::Gangway,
            &ReplayOptions {
                defrag,
                ..ReplayOptions::default()
            },
        )
        .unwrap()
    };
    let without = run(None);
    let with = run(Some(DefragOptions::default()));
    println!(
        "32-GPU gangs wait {:.0} s on average without defragmentation, {:.0} s with; {} migrations ({:.3} per 100 device-hours)",
        without.avg_queue_delay_large_gangs_s,
        with.avg_queue_delay_large_gangs_s,
        with.migrations,
        with.migrations_per_100_device_hours
    );
    assert!(without.large_gangs > 10, "{}", without.large_gangs);
    assert_eq!(with.jobs_completed, without.jobs_completed);
    assert_eq!(with.gangs_outside_required_domain, 0);
    assert!(with.migrations > 0, "the defragmenter never acted");
    assert!(with.migrations_per_100_device_hours <= 1.0);
    assert!(
        with.avg_queue_delay_large_gangs_s < without.avg_queue_delay_large_gangs_s,
        "{} >= {}",
        with.avg_queue_delay_large_gangs_s,
        without.avg_queue_delay_large_gangs_s
    );
}

/// The fragmentation measure, computed the slow and obvious way: group hosts by their domain key
/// string, count free whole devices in domains that are partly used.
fn scattered_by_keys(state: &ClusterState, level: TopologyLevel) -> u64 {
    let mut domains: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    for h in state.hosts() {
        if !h.spec.state.accepts_new_work() {
            continue;
        }
        let key = ClusterState::domain_key(&h.spec.topology, &h.spec.name, level);
        let d = domains.entry(key).or_default();
        d.0 += h.free_whole_devices() as u64;
        d.1 += h.spec.devices.len() as u64;
    }
    let free: u64 = domains.values().map(|d| d.0).sum();
    let scattered: u64 = domains.values().filter(|d| d.0 < d.1).map(|d| d.0).sum();
    (scattered * 1000).checked_div(free).unwrap_or(0)
}

#[test]
fn the_fragmentation_measure_agrees_with_domain_keys_at_every_level() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for _ in 0..50 {
        let state = random_state(&mut rng);
        for level in TopologyLevel::ALL {
            assert_eq!(
                gangway_core::engine::scattered_free_permille(&state, level),
                scattered_by_keys(&state, level),
                "{level}"
            );
        }
    }
    // An empty cluster has nothing scattered; a full one has nothing free.
    assert_eq!(
        gangway_core::engine::scattered_free_permille(&cluster(), TopologyLevel::Rack),
        0
    );
}
