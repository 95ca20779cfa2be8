//! Large gangs under the `gangway` policy: a gang that is short of free devices holds nobody up,
//! a gang blocked only by shape keeps its reservation, and jobs that fit anywhere go to the racks
//! already in use.
//!
//! The story behind it (core/SIM.md, "Large gangs"): gangway used to give an EASY reservation to
//! the first gang that did not fit, whatever the reason. On a cluster of large gangs that first
//! gang is usually short of free devices in total, and its reservation held the hosts that free up
//! first until it could start, hours later; every gang behind it that runs longer than that wait
//! (which large gangs do) was kept off them and queued too.

use gangway_core::engine::{
    schedule, ClusterState, DeviceDemand, DeviceKind, DeviceModel, GangPlacement, GangRequest,
    HostSpec, HostTopology, PendingReason, Plan, PolicyName, SchedulerConfig, TaskPlacement,
    TopologyLevel,
};
use gangway_core::sim::{replay, ReplayOptions, SimCluster, SimJob};
use gangway_proto::ids::HostName;
use std::path::Path;

/// Hosts of 8 GPUs named h0.., `per_rack` to a rack (r0, r1, ...), all in one pod.
fn cluster(hosts: usize, per_rack: usize) -> ClusterState {
    let mut c = ClusterState::new([DeviceModel {
        name: "H100".into(),
        kind: DeviceKind::Gpu,
        memory_mib: 80 * 1024,
    }]);
    for i in 0..hosts {
        let rack = format!("r{}", i / per_rack);
        let topology = HostTopology::new("dc1", "z1", "p1", &rack);
        c.add_host(HostSpec::uniform(
            format!("h{i}"),
            topology,
            "H100",
            8,
            1,
            128_000,
            1024 * 1024,
        ))
        .expect("host");
    }
    c
}

/// `tasks` x 8 GPUs in one `level` domain, running `runtime_ms`.
fn gang(
    id: &str,
    tasks: u32,
    level: TopologyLevel,
    runtime_ms: u64,
    submitted: u64,
) -> GangRequest {
    GangRequest::new(id, tasks, DeviceDemand::Whole(8))
        .with_required(level)
        .with_runtime_ms(runtime_ms)
        .with_submitted_at_ms(submitted)
}

/// Runs `req` at time 0 on whole hosts, one task each.
fn run_on(c: &mut ClusterState, req: GangRequest, hosts: &[&str]) {
    let (cpu_milli, memory_mib) = (req.per_task.cpu_milli, req.per_task.memory_mib);
    let per = match req.per_task.devices {
        DeviceDemand::Whole(n) => n as u16,
        _ => unreachable!("whole devices only"),
    };
    let placement = GangPlacement {
        job: req.id.clone(),
        queue: req.queue.clone(),
        tasks: hosts
            .iter()
            .map(|h| TaskPlacement {
                host: HostName::new(*h),
                devices: (0..per)
                    .map(|index| gangway_core::engine::DeviceShare { index, milli: 1000 })
                    .collect(),
                cpu_milli,
                memory_mib,
            })
            .collect(),
        borrowed_milli: 0,
    };
    c.apply_placement(req, placement, 0)
        .expect("placement applies");
}

fn config(policy: PolicyName) -> SchedulerConfig {
    SchedulerConfig {
        policy,
        preemption: false,
        ..SchedulerConfig::default()
    }
}

fn hosts_of<'p>(plan: &'p Plan, job: &str) -> Option<Vec<&'p str>> {
    plan.placements
        .iter()
        .find(|p| p.job.as_str() == job)
        .map(|p| p.tasks.iter().map(|t| t.host.as_str()).collect())
}

fn reason<'p>(plan: &'p Plan, job: &str) -> &'p PendingReason {
    &plan
        .pending
        .iter()
        .find(|p| p.job.as_str() == job)
        .unwrap_or_else(|| panic!("{job} not pending: {plan:?}"))
        .reason
}

/// Rack r0 (h0, h1) is busy until t=1000 with a 16-GPU trainer; rack r1 (h2, h3) is free. A 32-GPU
/// pretraining gang arrives first and cannot fit: only 16 GPUs are free. A 16-GPU fine-tuning gang
/// that runs for 5000 ms arrives next and fits in r1 now.
fn a_busy_rack_and_a_free_one() -> (ClusterState, Vec<GangRequest>) {
    let mut c = cluster(4, 2);
    run_on(
        &mut c,
        gang("trainer", 2, TopologyLevel::Rack, 1000, 0),
        &["h0", "h1"],
    );
    let pending = vec![
        gang("pretrain", 4, TopologyLevel::Pod, 10_000, 0),
        gang("finetune", 2, TopologyLevel::Rack, 5000, 1),
    ];
    (c, pending)
}

#[test]
fn a_gang_short_of_free_gpus_holds_no_rack_back_from_the_gangs_behind_it() {
    let (c, pending) = a_busy_rack_and_a_free_one();

    // EASY backfill (and gangway before the fix): the pretraining gang reserves all four hosts
    // from t=1000, and the fine-tuning gang, which would still run then, waits behind it with the
    // free rack idle.
    let plan = schedule(&c, &pending, &config(PolicyName::Backfill), 10);
    assert!(
        matches!(reason(&plan, "finetune"), PendingReason::BlockedBehind { job, .. } if job.as_str() == "pretrain"),
        "{:?}",
        reason(&plan, "finetune")
    );

    // Gangway: the pretraining gang is short of GPUs, not blocked by their shape; it waits without
    // holding anything, and the fine-tuning gang takes the free rack now.
    let plan = schedule(&c, &pending, &config(PolicyName::Gangway), 10);
    assert_eq!(hosts_of(&plan, "finetune"), Some(vec!["h2", "h3"]));
    let r = reason(&plan, "pretrain");
    assert!(
        matches!(
            r,
            PendingReason::InsufficientCapacity {
                needed: 32,
                free: 16,
                ..
            }
        ),
        "{r:?}"
    );
}

#[test]
fn a_gang_blocked_only_by_shape_keeps_its_reservation() {
    // 1-GPU jobs break both racks: 30 GPUs are free, but no rack has two whole hosts. The one on
    // h0 ends at t=1000, the one on h2 at t=5000.
    let mut c = cluster(4, 2);
    run_on(
        &mut c,
        GangRequest::new("a", 1, DeviceDemand::Whole(1)).with_runtime_ms(1000),
        &["h0"],
    );
    run_on(
        &mut c,
        GangRequest::new("b", 1, DeviceDemand::Whole(1)).with_runtime_ms(5000),
        &["h2"],
    );
    let pending = vec![
        gang("big", 2, TopologyLevel::Rack, 10_000, 0),
        gang("long", 1, TopologyLevel::Host, 5000, 1),
    ];

    // Best-fit takes the first whole host for the long job: h1, and rack r0 stays broken for
    // another 5000 ms after the 1-GPU job on h0 ends.
    let plan = schedule(&c, &pending, &config(PolicyName::BestFit), 10);
    assert_eq!(hosts_of(&plan, "long"), Some(vec!["h1"]));

    // Gangway: the big gang has the GPUs, in the wrong places. It reserves rack r0 from t=1000
    // (when h0 is whole again), so the long job, which would still run then, goes to h3.
    let plan = schedule(&c, &pending, &config(PolicyName::Gangway), 10);
    assert_eq!(hosts_of(&plan, "long"), Some(vec!["h3"]));
    let r = reason(&plan, "big");
    assert!(
        matches!(
            r,
            PendingReason::NoDomainFits {
                needed: 16,
                largest_free_block: 15,
                ..
            }
        ),
        "{r:?}"
    );
}

/// Rack r0 (h0, h1) is empty; in rack r1, h2 is busy and h3 empty. An 8-GPU job fits h0, h1 or h3
/// equally well host by host. Best-fit takes the first, h0, and breaks the only whole rack; gangway
/// takes h3, in the rack already in use, and a 16-GPU rack gang behind it still finds r0 whole.
#[test]
fn a_host_sized_job_goes_to_the_rack_already_in_use() {
    let mut c = cluster(4, 2);
    run_on(
        &mut c,
        gang("busy", 1, TopologyLevel::Host, 10_000, 0),
        &["h2"],
    );
    let pending = vec![
        gang("eval", 1, TopologyLevel::Host, 1000, 0),
        gang("gang", 2, TopologyLevel::Rack, 1000, 1),
    ];
    let plan = schedule(&c, &pending, &config(PolicyName::BestFit), 0);
    assert_eq!(hosts_of(&plan, "eval"), Some(vec!["h0"]));
    assert!(
        hosts_of(&plan, "gang").is_none(),
        "best-fit broke the whole rack"
    );

    let plan = schedule(&c, &pending, &config(PolicyName::Gangway), 0);
    assert_eq!(hosts_of(&plan, "eval"), Some(vec!["h3"]));
    assert_eq!(hosts_of(&plan, "gang"), Some(vec!["h0", "h1"]));
}

/// The same story as a replay, on a cluster file: 8-GPU hosts, 4 to a rack (32 GPUs), 2 racks in
/// one pod, one queue without a guarantee (as in deploy/sim/synthetic-cluster.toml: queue order is
/// then submission order).
fn two_racks() -> SimCluster {
    let text = r#"
[[models]]
name = "g"
kind = "gpu"

[layout]
hosts_per_rack = 4
racks_per_pod = 2

[[host_groups]]
count = 8
devices = 8
model = "g"

[[queues]]
name = "q"
guaranteed_devices = 0

[scheduler]
preemption = false

[replay]
tick_s = 0
"#;
    SimCluster::parse(text, Path::new("two-racks.toml")).expect("valid cluster")
}

fn sim_job(name: &str, submit_s: u64, gpus: u32, secs: u64) -> SimJob {
    SimJob {
        name: name.into(),
        queue: "q".into(),
        submit_ms: submit_s * 1000,
        duration_ms: secs * 1000,
        tasks: gpus / 8,
        devices_per_task: 8,
        required: Some(if gpus <= 32 {
            TopologyLevel::Rack
        } else {
            TopologyLevel::Pod
        }),
        preferred: None,
        priority: 0,
    }
}

#[test]
fn in_a_replay_the_fine_tuning_gang_no_longer_waits_for_the_pretraining_gang() {
    let c = two_racks();
    // t=0: a 32-GPU trainer takes one rack for 1000 s. t=1: a 64-GPU pretraining gang needs the
    // whole pod for 10,000 s. t=2: a 32-GPU fine-tuning gang could take the other rack at once.
    let jobs = [
        sim_job("trainer", 0, 32, 1000),
        sim_job("pretrain", 1, 64, 10_000),
        sim_job("finetune", 2, 32, 5000),
    ];
    let run = |p| replay(&c, &jobs, p, &ReplayOptions::default()).expect("replay runs");

    // Backfill: the pretraining gang reserves the pod from t=1000 and starts then (waits 999 s);
    // the fine-tuning gang waits until it ends at t=11,000 (10,998 s).
    let backfill = run(PolicyName::Backfill);
    assert!((backfill.avg_queue_delay_s - (999.0 + 10_998.0) / 3.0).abs() < 1e-3);

    // Gangway, as best-fit: the fine-tuning gang starts at once; the pretraining gang starts when
    // both racks are free, at t=5002 (waits 5001 s). Less waiting in all.
    for p in [PolicyName::Gangway, PolicyName::BestFit] {
        let m = run(p);
        assert_eq!(m.jobs_completed, 3, "{p}");
        assert!(
            (m.avg_queue_delay_s - 5001.0 / 3.0).abs() < 1e-3,
            "{p}: {}",
            m.avg_queue_delay_s
        );
        assert!(m.avg_queue_delay_s < backfill.avg_queue_delay_s);
    }
}

/// The tie-break reads free devices per rack and pod from the overlay's domain indexes, which a
/// round now builds for every level it uses: they must group hosts exactly as domain keys do, in
/// key order, whatever the names (a '-' sorts before the '/' that joins key fields).
#[test]
fn domain_indexes_group_hosts_as_their_domain_keys_do() {
    use gangway_core::engine::index::Overlay;
    use std::collections::BTreeMap;
    let mut c = ClusterState::new([DeviceModel {
        name: "H100".into(),
        kind: DeviceKind::Gpu,
        memory_mib: 0,
    }]);
    let hosts = [
        ("b-1", "z1", "p1", "r1"),
        ("a", "z1", "p1", "r1"),
        ("c", "z1", "p1-x", "r1"),
        ("d", "z1", "p1", "r1-x"),
        ("e", "z2", "p1", "r1"),
        ("f", "z1", "p1", ""),
    ];
    for (name, zone, pod, rack) in hosts {
        let topology = HostTopology::new("dc", zone, pod, rack);
        c.add_host(HostSpec::uniform(name, topology, "H100", 8, 1, 0, 0))
            .expect("host");
    }
    let mut ov = Overlay::new(&c);
    let mut all_at_once = Overlay::new(&c);
    all_at_once.build_domains(&TopologyLevel::ALL);
    for level in TopologyLevel::ALL {
        let mut want: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (h, hs) in c.hosts().iter().enumerate() {
            let key = ClusterState::domain_key(&hs.spec.topology, &hs.spec.name, level);
            want.entry(key).or_default().push(h);
        }
        let got = ov.domains(level);
        assert_eq!(
            got.keys,
            want.keys().cloned().collect::<Vec<_>>(),
            "{level}"
        );
        assert_eq!(
            got.hosts,
            want.values().cloned().collect::<Vec<_>>(),
            "{level}"
        );
        for (di, hs) in got.hosts.iter().enumerate() {
            assert!(
                hs.iter().all(|&h| got.host_domain[h] as usize == di),
                "{level}"
            );
            assert_eq!(got.free_whole[di], 8 * hs.len() as u64, "{level}");
        }
        let same = all_at_once.domain_index(level).expect("built");
        assert_eq!(
            (&same.keys, &same.hosts),
            (&got.keys, &got.hosts),
            "{level}"
        );
    }
}
