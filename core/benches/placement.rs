//! Placement throughput on a synthetic fleet: 10,000 hosts x 8 GPUs (racks of 32 hosts, pods of
//! 10 racks, zones of 10 pods), 10,000 pending gangs per round, one core; then a round over a
//! backlog of 11,000 jobs on the fleet filled. Prints numbers.
//!
//! `cargo bench -p gangway-core --bench placement`

use gangway_core::engine::{
    schedule, ClusterState, DeviceDemand, DeviceKind, DeviceModel, GangRequest, HostSpec,
    HostTopology, PolicyName, SchedulerConfig, TopologyLevel,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

const HOSTS: usize = 10_000;

fn fleet() -> ClusterState {
    let mut c = ClusterState::new([DeviceModel {
        name: "H100".into(),
        kind: DeviceKind::Gpu,
        memory_mib: 80 * 1024,
    }]);
    for i in 0..HOSTS {
        let rack = i / 32;
        let pod = rack / 10;
        let zone = pod / 10;
        c.add_host(HostSpec::uniform(
            format!("host-{i:05}"),
            HostTopology::new(
                "dc1",
                &format!("z{zone}"),
                &format!("p{pod}"),
                &format!("r{rack}"),
            ),
            "H100",
            8,
            2,
            192_000,
            2 * 1024 * 1024,
        ))
        .expect("host");
    }
    c
}

fn single_tasks(n: usize, seed: u64) -> Vec<GangRequest> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let d = match rng.random_range(0..10) {
                0..=4 => DeviceDemand::Whole(1),
                5..=6 => DeviceDemand::Whole(2),
                7 => DeviceDemand::Whole(4),
                _ => DeviceDemand::Fraction(rng.random_range(1..10) * 100),
            };
            GangRequest::new(format!("s{i:05}"), 1, d)
                .with_cpu_milli(rng.random_range(1..=16) * 1000)
                .with_memory_mib(rng.random_range(1..=64) * 1024)
                .with_submitted_at_ms(i as u64)
        })
        .collect()
}

fn gangs(n: usize, seed: u64) -> Vec<GangRequest> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let tasks = rng.random_range(2..=8); // 16..64 GPUs
            let r = GangRequest::new(format!("g{i:05}"), tasks, DeviceDemand::Whole(8))
                .with_cpu_milli(96_000)
                .with_memory_mib(512 * 1024)
                .with_submitted_at_ms(i as u64);
            match rng.random_range(0..3) {
                0 => r.with_required(TopologyLevel::Rack),
                1 => r.with_preferred(TopologyLevel::Rack),
                _ => r.with_required(TopologyLevel::Pod),
            }
        })
        .collect()
}

fn round(c: &ClusterState, pending: &[GangRequest], policy: PolicyName) -> (usize, f64) {
    let config = SchedulerConfig {
        policy,
        preemption: false,
        ..SchedulerConfig::default()
    };
    let t = Instant::now();
    let plan = schedule(c, pending, &config, 0);
    let secs = t.elapsed().as_secs_f64();
    // Check the plan re-applies (outside the timing).
    let mut c2 = c.clone();
    let by_id: std::collections::HashMap<_, _> =
        pending.iter().map(|r| (r.id.clone(), r)).collect();
    for p in &plan.placements {
        c2.apply_placement(by_id[&p.job].clone(), p.clone(), 0)
            .expect("plan re-applies");
    }
    (plan.placements.len(), secs)
}

fn main() {
    let c = fleet();
    println!("fleet: {HOSTS} hosts, {} GPUs", HOSTS * 8);
    let singles = single_tasks(10_000, 1);
    let gang_list = gangs(10_000, 2);
    let mut rates = Vec::new();
    for policy in [
        PolicyName::FirstFit,
        PolicyName::BestFit,
        PolicyName::Gangway,
    ] {
        let (n, s) = round(&c, &singles, policy);
        let single_rate = n as f64 / s;
        println!(
            "{:<10} single tasks: {n} of {} placed in {:.3} s = {:.0} placements/s",
            policy.as_str(),
            singles.len(),
            s,
            single_rate
        );
        let (n, s) = round(&c, &gang_list, policy);
        let gang_rate = n as f64 / s;
        println!(
            "{:<10} gangs (16-64 GPUs): {n} of {} placed in {:.3} s = {:.0} placements/s ({:.0} gangs examined/s)",
            policy.as_str(),
            gang_list.len(),
            s,
            gang_rate,
            gang_list.len() as f64 / s
        );
        rates.push((policy, single_rate, gang_rate));
    }
    let ff = rates[0];
    let gw = rates[2];
    println!(
        "gangway vs first-fit: single {:.2}x, gangs {:.2}x the placement rate",
        gw.1 / ff.1,
        gw.2 / ff.2
    );

    backlog_on_a_full_fleet(&c);

    // The re-check every plan goes through.
    let c2 = c.clone();
    let config = SchedulerConfig {
        policy: PolicyName::FirstFit,
        ..SchedulerConfig::default()
    };
    let plan = schedule(&c, &singles, &config, 0);
    let by_id: std::collections::HashMap<_, _> =
        singles.iter().map(|r| (r.id.clone(), r)).collect();
    let t = Instant::now();
    for p in &plan.placements {
        c2.check_placement(by_id[&p.job], p).expect("checks");
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "check_placement: {} checks in {:.4} s = {:.0} checks/s",
        plan.placements.len(),
        s,
        plan.placements.len() as f64 / s
    );
}

/// A round over a backlog that cannot start yet: every device busy, 10,000 single-GPU jobs and
/// 1,000 rack-local gangs of 2 x 8 GPUs pending (the e2e bench's storm once its hosts are full),
/// on the fleet with and without a few devices free. What a leader pays per round while a queue
/// drains: each pending job is examined and its reason kept.
fn backlog_on_a_full_fleet(empty: &ClusterState) {
    let mut c = empty.clone();
    let fill: Vec<GangRequest> = (0..HOSTS)
        .map(|i| GangRequest::new(format!("fill{i:05}"), 1, DeviceDemand::Whole(8)))
        .collect();
    let config = SchedulerConfig {
        policy: PolicyName::Gangway,
        preemption: false,
        ..SchedulerConfig::default()
    };
    let plan = schedule(&c, &fill, &config, 0);
    assert_eq!(plan.placements.len(), HOSTS, "the fleet fills");
    let by_id: std::collections::HashMap<_, _> = fill.iter().map(|r| (r.id.clone(), r)).collect();
    for p in &plan.placements {
        c.apply_placement(by_id[&p.job].clone(), p.clone(), 0)
            .expect("fill applies");
    }
    let mut backlog: Vec<GangRequest> = (0..10_000)
        .map(|i| {
            GangRequest::new(format!("single-{i}"), 1, DeviceDemand::Whole(1))
                .with_submitted_at_ms(1_000 + i as u64)
        })
        .collect();
    backlog.extend((0..1_000).map(|i| {
        GangRequest::new(format!("gang-{i}"), 2, DeviceDemand::Whole(8))
            .with_required(TopologyLevel::Rack)
            .with_submitted_at_ms(i as u64)
    }));
    let full = c.clone();
    // A few hosts freed: the round places some and examines the rest.
    let mut some_free = c;
    for i in (0..HOSTS).step_by(100) {
        let id = gangway_proto::ids::JobId::new(format!("fill{i:05}"));
        some_free.release(&id).expect("release");
    }
    for (label, fleet) in [("full fleet", &full), ("1% of hosts free", &some_free)] {
        let runs = 5;
        let t = Instant::now();
        let mut placed = 0;
        for _ in 0..runs {
            placed = schedule(fleet, &backlog, &config, 10_000).placements.len();
        }
        let s = t.elapsed().as_secs_f64() / runs as f64;
        println!(
            "gangway    backlog of {} on a {label}: {placed} placed, round {:.1} ms = {:.0} pending jobs examined/s",
            backlog.len(),
            s * 1e3,
            backlog.len() as f64 / s
        );
    }
}
