//! Device failures in the simulator (`--failures`), as stories and determinism checks: every
//! failure is the production state machine's `DeviceHealth` (and an operator's `FenceDevice` to
//! return the device), so a failed gang is repaired by the code that repairs it on a real cluster.

use gangway_core::engine::{PolicyName, TopologyLevel};
use gangway_core::sim::synth::{synthetic_trace, JobClass};
use gangway_core::sim::{
    jobs_from_trace, replay, FailureModel, FailureOptions, ReplayMetrics, ReplayOptions,
    SimCluster, SimJob,
};
use std::path::Path;

/// `hosts` hosts of 8 GPUs, 4 per rack, one queue `synthetic`.
fn cluster(hosts: u32) -> SimCluster {
    let text = format!(
        r#"name = "small"
[[models]]
name = "gpu"
kind = "gpu"
[layout]
hosts_per_rack = 4
racks_per_pod = 4
[[host_groups]]
count = {hosts}
devices = 8
model = "gpu"
[scheduler]
preemption = true
min_runtime_s = 600
[replay]
tick_s = 300
[[queues]]
name = "synthetic"
guaranteed_devices = {half}
[[queues]]
name = "other"
guaranteed_devices = {half}
"#,
        half = hosts * 4
    );
    SimCluster::parse(&text, Path::new("small.toml")).expect("valid test cluster")
}

/// Seeded submissions of 1-GPU jobs and 16-GPU gangs over `hours` at load 0.8, every other job
/// in queue `other` (so reclaims preempt).
fn workload(c: &SimCluster, seed: u64, hours: f64) -> Vec<SimJob> {
    let mix = [
        JobClass {
            gpus: 1,
            share: 0.9,
            mean_duration_s: 3.0 * 3600.0,
        },
        JobClass {
            gpus: 16,
            share: 0.1,
            mean_duration_s: 6.0 * 3600.0,
        },
    ];
    let gpus = c.hosts.len() as u64 * 8;
    let csv = synthetic_trace(seed, hours, 0.8, gpus, &mix).expect("trace");
    let trace = gangway_core::sim::philly::parse_trace(&csv, Path::new("synth.csv")).unwrap();
    let mut jobs = jobs_from_trace(&trace, c, 0, u64::MAX).expect("jobs");
    for j in jobs.iter_mut().skip(1).step_by(2) {
        j.queue = "other".into();
    }
    jobs
}

fn without_cost(m: &ReplayMetrics) -> ReplayMetrics {
    ReplayMetrics {
        wall_s: 0.0,
        cpu_s: 0.0,
        ..m.clone()
    }
}

/// With the feature off, a replay gives the figures it gave before device failures existed
/// (measured on this trace before the change, commit aa9aa0b).
#[test]
fn without_failures_the_figures_are_those_of_before() {
    let c = cluster(16);
    let jobs = workload(&c, 5, 24.0);
    let m = replay(&c, &jobs, PolicyName::Gangway, &ReplayOptions::default()).unwrap();
    let figures = (
        m.jobs_submitted,
        m.jobs_completed,
        m.gangs_placed,
        m.scheduling_rounds,
        m.preemptions,
    );
    assert_eq!(figures, (204, 204, 209, 414, 5));
    assert_eq!(m.avg_queue_delay_s, 443.0);
    assert_eq!(m.p99_queue_delay_s, 10249.0);
    assert_eq!(m.avg_jct_s, 11609.26);
    assert_eq!(m.makespan_s, 119696.0);
    assert_eq!(m.gpu_utilization_pct, 52.925);
    assert!(m.failures.is_none());
    // The whole JSON document, byte for byte (FNV-1a of it, as printed before the change).
    let json = serde_json::to_string(&without_cost(&m)).unwrap();
    assert_eq!((json.len(), fnv(&json)), (6988, 0xa7529fca87145489));

    // Periodic checkpoints alone change no figure: a checkpoint moves nothing.
    let options = ReplayOptions {
        checkpoint_interval_ms: Some(600_000),
        ..ReplayOptions::default()
    };
    let with_checkpoints = replay(&c, &jobs, PolicyName::Gangway, &options).unwrap();
    assert_eq!(without_cost(&with_checkpoints), without_cost(&m));
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

const HOUR: u64 = 3_600_000;

fn failing(mtbf_hours: f64, seed: u64, repair: bool) -> FailureOptions {
    FailureOptions {
        model: FailureModel {
            mtbf_hours,
            repair_hours: 12.0,
            resubmit_hours: 1.0,
            seed,
        },
        repair,
    }
}

fn with_failures(f: FailureOptions, interval_ms: Option<u64>) -> ReplayOptions {
    ReplayOptions {
        checkpoint_interval_ms: interval_ms,
        failures: Some(f),
        ..ReplayOptions::default()
    }
}

#[test]
fn a_seeded_run_with_failures_repeats_exactly() {
    let c = cluster(16);
    let jobs = workload(&c, 5, 24.0);
    let options = with_failures(failing(300.0, 11, true), Some(HOUR / 2));
    let a = replay(&c, &jobs, PolicyName::Gangway, &options).unwrap();
    let b = replay(&c, &jobs, PolicyName::Gangway, &options).unwrap();
    assert_eq!(without_cost(&a), without_cost(&b), "same seed, same replay");
    let fa = a.failures.as_ref().expect("failure figures");
    assert_eq!(fa.hits, b.failures.as_ref().unwrap().hits);
    println!("{}", serde_json::to_string_pretty(fa).unwrap());
    assert!(fa.device_failures >= 5, "{fa:?}");
    assert!(fa.gang_failures >= 2, "{fa:?}");
    // Every gang failure is a repair of the state machine, and every repaired job ran again
    // and completed.
    assert_eq!(fa.repairs, fa.gang_failures);
    assert_eq!(fa.never_ran_again, 0);
    assert_eq!(a.jobs_completed, a.jobs_submitted);
    assert!(fa.lost_work_gpu_h > 0.0 && fa.fenced_gpu_h > 0.0);
    assert!((fa.lost_gpu_h - fa.lost_work_gpu_h - fa.fenced_gpu_h).abs() < 0.01);
    assert!(fa.ettr_pct > 0.0 && fa.ettr_pct < 100.0, "{}", fa.ettr_pct);
    assert!(fa.time_to_repair_p99_s >= fa.time_to_repair_p50_s);
    for h in &fa.hits {
        let after = h.devices_after.as_ref().expect("ran again");
        assert!(
            !after.contains(&(h.host.clone(), h.device)),
            "{} ran again on the device that failed under it",
            h.job
        );
        assert!(h.devices_before.contains(&(h.host.clone(), h.device)));
    }
    assert_eq!(a.gangs_outside_required_domain, 0);

    // Another seed, other failures.
    let other = with_failures(failing(300.0, 12, true), Some(HOUR / 2));
    let o = replay(&c, &jobs, PolicyName::Gangway, &other).unwrap();
    assert_ne!(o.failures.unwrap().hits, fa.hits);

    // A model under which no device fails in the replay gives the figures of no failures.
    let never = with_failures(failing(1e12, 11, true), None);
    let n = replay(&c, &jobs, PolicyName::Gangway, &never).unwrap();
    let plain = replay(&c, &jobs, PolicyName::Gangway, &ReplayOptions::default()).unwrap();
    let nf = n.failures.clone().unwrap();
    assert_eq!((nf.device_failures, nf.gang_failures), (0, 0));
    assert_eq!(
        without_cost(&ReplayMetrics {
            failures: None,
            ..n
        }),
        without_cost(&plain)
    );
}

#[test]
fn with_repair_lost_work_falls_as_the_checkpoint_interval_shrinks() {
    let c = cluster(16);
    let jobs = workload(&c, 7, 24.0);
    let lost = |interval: Option<u64>| {
        let options = with_failures(failing(300.0, 3, true), interval);
        let m = replay(&c, &jobs, PolicyName::Gangway, &options).unwrap();
        assert_eq!(m.jobs_completed, m.jobs_submitted);
        let f = m.failures.unwrap();
        println!(
            "interval {interval:?}: {} gang failures, lost work {} GPU-h, ETTR {}%",
            f.gang_failures, f.lost_work_gpu_h, f.ettr_pct
        );
        assert!(f.gang_failures >= 3);
        f.lost_work_gpu_h
    };
    let (none, h2, m30, m10) = (
        lost(None),
        lost(Some(2 * HOUR)),
        lost(Some(HOUR / 2)),
        lost(Some(HOUR / 6)),
    );
    assert!(
        none > h2 && h2 > m30 && m30 > m10,
        "{none} {h2} {m30} {m10}"
    );
}

/// One 8-GPU job of 100 hours on two hosts of 8 GPUs, checkpointing every hour.
fn lone_job() -> (SimCluster, Vec<SimJob>) {
    let c = cluster(2);
    let job = SimJob {
        name: "train".into(),
        queue: "synthetic".into(),
        submit_ms: 0,
        duration_ms: 100 * HOUR,
        tasks: 1,
        devices_per_task: 8,
        required: Some(TopologyLevel::Host),
        preferred: None,
        priority: 0,
    };
    (c, vec![job])
}

/// A failure lands on the running gang: the state machine repairs it at once on the other
/// host's healthy devices, from its last checkpoint; the completion its first lease would have
/// reported is never counted, and the job completes when its repaired lease has done the rest.
#[test]
fn a_failure_on_a_running_gang_is_repaired_on_other_devices() {
    let (c, jobs) = lone_job();
    // A failure every 40 hours somewhere on the 16 GPUs: find a seed whose replay has exactly
    // one failure on the job's gang.
    let (seed, m) = (1..200)
        .find_map(|seed| {
            let options = with_failures(failing(640.0, seed, true), Some(HOUR));
            let m = replay(&c, &jobs, PolicyName::Gangway, &options).unwrap();
            let f = m.failures.as_ref().unwrap();
            let hit = f.hits.first()?;
            (f.gang_failures == 1 && hit.back_at_ms == Some(hit.at_ms)).then_some((seed, m))
        })
        .expect("some seed fails the gang once");
    let f = m.failures.as_ref().unwrap();
    let hit = &f.hits[0];
    println!("seed {seed}: {hit:?}");
    assert_eq!(f.repairs, 1);
    let before: Vec<&String> = hit.devices_before.iter().map(|(h, _)| h).collect();
    let after = hit.devices_after.as_ref().unwrap();
    assert!(before.iter().all(|h| **h == hit.host));
    assert!(
        after.iter().all(|(h, _)| *h != hit.host),
        "the failed host keeps 7 good GPUs, too few: the gang runs on the other host"
    );
    // It had run since 0 and checkpointed every hour: it resumes from the last whole hour.
    assert_eq!(hit.lost_ms, hit.at_ms % HOUR);
    let restore = hit.at_ms - hit.lost_ms;
    assert_eq!(m.jobs_completed, 1);
    assert_eq!(
        m.makespan_s * 1000.0,
        (hit.at_ms + 100 * HOUR - restore) as f64
    );
    assert_eq!(f.time_to_repair_mean_s, 0.0);
    let lost_gpu_h = (hit.lost_ms * 8) as f64 / HOUR as f64;
    assert!((f.lost_work_gpu_h - lost_gpu_h).abs() < 0.001);
    // ETTR: 100 hours of work over the wall time from start to completion.
    let wall = hit.at_ms + 100 * HOUR - restore;
    let ettr = (100 * HOUR) as f64 / wall as f64 * 100.0;
    assert!((f.ettr_pct - ettr).abs() < 0.001, "{} {ettr}", f.ettr_pct);

    // Without repair, the same failure fails the job; a person resubmits it an hour later and it
    // resumes from the same checkpoint, as a new job.
    let options = with_failures(failing(640.0, seed, false), Some(HOUR));
    let n = replay(&c, &jobs, PolicyName::Gangway, &options).unwrap();
    let nf = n.failures.as_ref().unwrap();
    let first = &nf.hits[0];
    assert_eq!((first.at_ms, first.lost_ms), (hit.at_ms, hit.lost_ms));
    assert_eq!((nf.repairs, nf.resubmissions), (0, nf.gang_failures));
    assert_eq!(first.back_at_ms, Some(hit.at_ms + HOUR));
    assert_eq!(n.jobs_completed, 1);
    if nf.gang_failures == 1 {
        assert_eq!(
            n.makespan_s * 1000.0,
            (hit.at_ms + HOUR + 100 * HOUR - restore) as f64
        );
        assert!(nf.ettr_pct < f.ettr_pct);
    }
}

/// The report: a failure table for people, a `failures` object in the JSON with the documented
/// fields, and none without failures.
#[test]
fn reports_carry_the_failure_figures_only_with_failures() {
    use gangway_core::sim::failures::run_label;
    use gangway_core::sim::report::failure_table;
    let (c, jobs) = lone_job();
    let f = failing(640.0, 7, true);
    let mut m = replay(
        &c,
        &jobs,
        PolicyName::Gangway,
        &with_failures(f.clone(), Some(HOUR)),
    )
    .unwrap();
    m.policy = run_label(&m.policy, false, Some(&f), Some(HOUR));
    assert_eq!(m.policy, "gangway repair ckpt=1h");
    let table = failure_table(std::slice::from_ref(&m)).expect("a table");
    assert!(
        table.contains("gangway repair ckpt=1h") && table.contains("ETTR %"),
        "{table}"
    );
    let json = serde_json::to_value(&m).unwrap();
    let fields: Vec<&str> = json["failures"]
        .as_object()
        .expect("failures object")
        .keys()
        .map(String::as_str)
        .collect();
    for field in [
        "model",
        "repair",
        "checkpoint_interval_s",
        "device_failures",
        "gang_failures",
        "repairs",
        "resubmissions",
        "lost_work_gpu_h",
        "fenced_gpu_h",
        "lost_gpu_h",
        "time_to_repair_mean_s",
        "time_to_repair_p50_s",
        "time_to_repair_p99_s",
        "never_ran_again",
        "ettr_pct",
    ] {
        assert!(fields.contains(&field), "{field} missing from {fields:?}");
    }
    assert_eq!(json["failures"]["checkpoint_interval_s"], 3600);
    assert_eq!(json["failures"]["model"]["mtbf_hours"], 640.0);

    let plain = replay(&c, &jobs, PolicyName::Gangway, &ReplayOptions::default()).unwrap();
    assert!(failure_table(std::slice::from_ref(&plain)).is_none());
    assert!(serde_json::to_value(&plain)
        .unwrap()
        .get("failures")
        .is_none());
}
