//! Discrete-event correctness of the replay on tiny synthetic traces, with hand-computed results.

use gangway_core::engine::{PolicyName, TopologyLevel};
use gangway_core::sim::report::{ReplayReport, Window};
use gangway_core::sim::{replay, PreemptMode, ReplayMetrics, ReplayOptions, SimCluster, SimJob};
use std::path::Path;

/// `hosts` hosts of 8 GPUs, `per_rack` per rack, one queue "q" owning everything, events-only rounds.
fn cluster(hosts: u32, per_rack: u32) -> SimCluster {
    let text = format!(
        r#"
[[models]]
name = "g"
kind = "gpu"

[layout]
hosts_per_rack = {per_rack}
racks_per_pod = 4

[[host_groups]]
count = {hosts}
devices = 8
model = "g"

[[queues]]
name = "q"
guaranteed_devices = {gpus}

[[queues]]
name = "other"
guaranteed_devices = 0

[replay]
tick_s = 0
"#,
        gpus = hosts * 8
    );
    SimCluster::parse(&text, Path::new("test.toml")).expect("valid test cluster")
}

fn job(name: &str, submit_s: u64, tasks: u32, per: u32, secs: u64) -> SimJob {
    SimJob {
        name: name.into(),
        queue: "q".into(),
        submit_ms: submit_s * 1000,
        duration_ms: secs * 1000,
        tasks,
        devices_per_task: per,
        required: Some(if tasks == 1 {
            TopologyLevel::Host
        } else {
            TopologyLevel::Rack
        }),
        preferred: None,
        priority: 0,
    }
}

fn run(c: &SimCluster, jobs: &[SimJob], p: PolicyName) -> ReplayMetrics {
    replay(c, jobs, p, &ReplayOptions::default()).expect("replay runs")
}

fn close(a: f64, b: f64) {
    assert!((a - b).abs() < 1e-3, "{a} != {b}");
}

#[test]
fn a_full_host_makes_the_next_gang_wait() {
    // A holds the only host 0..100; B (t=10) waits 90 s and ends at 150.
    let c = cluster(1, 1);
    let jobs = [job("a", 0, 1, 8, 100), job("b", 10, 1, 8, 50)];
    for p in [
        PolicyName::FirstFit,
        PolicyName::BestFit,
        PolicyName::Gangway,
    ] {
        let m = run(&c, &jobs, p);
        assert_eq!(m.jobs_completed, 2, "{p}");
        close(m.avg_queue_delay_s, 45.0);
        close(m.p99_queue_delay_s, 90.0);
        close(m.avg_jct_s, 120.0);
        close(m.makespan_s, 150.0);
        close(m.gpu_utilization_pct, 100.0);
        close(m.gpu_utilization_during_arrivals_pct, 100.0);
        assert_eq!(m.gangs_placed, 2);
        assert_eq!(m.preemptions, 0);
    }
}

#[test]
fn a_gang_waits_for_whole_hosts_in_its_rack() {
    // Two 8-GPU hosts in one rack. A (4 GPUs) runs 0..100; B (2 x 8 GPUs, t=1) needs both hosts
    // whole, so it starts at 100 and ends at 110.
    let c = cluster(2, 2);
    let jobs = [job("a", 0, 1, 4, 100), job("b", 1, 2, 8, 10)];
    let m = run(&c, &jobs, PolicyName::FirstFit);
    assert_eq!(m.jobs_completed, 2);
    close(m.avg_queue_delay_s, 49.5);
    close(m.p99_queue_delay_s, 99.0);
    close(m.avg_jct_s, 104.5);
    close(m.makespan_s, 110.0);
    // (4 x 100 + 16 x 10) / (16 x 110)
    close(m.gpu_utilization_pct, 560.0 / 1760.0 * 100.0);
    close(m.gangs_within_required_domain_pct, 100.0);
}

#[test]
fn idle_time_counts_against_utilization() {
    // 4 GPUs for 10 s, idle, then 8 GPUs for 10 s from t=100: (40 + 80) / (8 x 110).
    let c = cluster(1, 1);
    let jobs = [job("a", 0, 1, 4, 10), job("b", 100, 1, 8, 10)];
    let m = run(&c, &jobs, PolicyName::FirstFit);
    close(m.gpu_utilization_pct, 120.0 / 880.0 * 100.0);
    // Submissions span [0, 100): 4 GPUs for 10 s out of 8 x 100.
    close(m.gpu_utilization_during_arrivals_pct, 40.0 / 800.0 * 100.0);
    close(m.makespan_s, 110.0);
    close(m.avg_queue_delay_s, 0.0);
    close(m.avg_jct_s, 10.0);
}

#[test]
fn parallel_gangs_start_together_and_jobs_too_big_are_unplaceable() {
    // 4 hosts in 2 racks: two 16-GPU gangs run side by side; a 32-GPU gang fits no rack.
    let c = cluster(4, 2);
    let jobs = [
        job("a", 0, 2, 8, 50),
        job("b", 0, 2, 8, 70),
        job("big", 5, 4, 8, 10),
    ];
    let m = run(&c, &jobs, PolicyName::FirstFit);
    assert_eq!(m.jobs_completed, 2);
    assert_eq!(m.jobs_unplaceable, 1);
    assert_eq!(
        m.unplaceable_by_reason.get("larger_than_any_rack"),
        Some(&1)
    );
    close(m.avg_queue_delay_s, 0.0);
    close(m.makespan_s, 70.0);
    // (16 x 50 + 16 x 70) / (32 x 70)
    close(m.gpu_utilization_pct, 1920.0 / 2240.0 * 100.0);
    close(m.gangs_within_required_domain_pct, 100.0);
}

#[test]
fn every_policy_completes_or_reports_every_job_and_stays_in_domain() {
    let c = cluster(4, 2);
    let mut jobs = Vec::new();
    for i in 0..40u64 {
        let (tasks, per) = match i % 5 {
            0 => (2, 8),
            1 => (1, 8),
            2 => (1, 4),
            3 => (1, 2),
            _ => (1, 1),
        };
        let mut j = job(&format!("j{i}"), i * 7, tasks, per, 30 + (i * 37) % 200);
        if i % 9 == 0 {
            j.queue = "other".into();
        }
        jobs.push(j);
    }
    for p in PolicyName::ALL {
        let m = run(&c, &jobs, p);
        assert_eq!(m.jobs_submitted, 40, "{p}");
        assert_eq!(m.jobs_completed + m.jobs_unplaceable, 40, "{p}: {m:?}");
        assert!(m.gpu_utilization_pct <= 100.0 + 1e-9, "{p}");
        close(m.gangs_within_required_domain_pct, 100.0);
        assert_eq!(m.placements_rejected, 0, "{p}");
        let again = run(&c, &jobs, p);
        assert_eq!(
            ReplayMetrics {
                wall_s: 0.0,
                cpu_s: 0.0,
                ..m
            },
            ReplayMetrics {
                wall_s: 0.0,
                cpu_s: 0.0,
                ..again
            },
            "{p} is not deterministic"
        );
    }
}

#[test]
fn report_json_has_the_documented_fields() {
    let c = cluster(1, 1);
    let m = run(&c, &[job("a", 0, 1, 8, 100)], PolicyName::FirstFit);
    let report = ReplayReport {
        experiment: "replay".into(),
        trace: "t.csv".into(),
        cluster: "c.toml".into(),
        cluster_gpus: 8,
        window: Window {
            from_s: 0,
            to_s: None,
            from_utc: "2017-01-01 00:00:00".into(),
            to_utc: None,
        },
        jobs_in_window: 1,
        load_factor: 1.0,
        preempt_mode: PreemptMode::Resume,
        runtime_estimate: "trace_duration".into(),
        policies: vec![m],
    };
    let v = serde_json::to_value(&report).unwrap();
    for k in [
        "experiment",
        "trace",
        "cluster",
        "cluster_gpus",
        "window",
        "jobs_in_window",
        "load_factor",
        "preempt_mode",
        "runtime_estimate",
        "policies",
    ] {
        assert!(v.get(k).is_some(), "report lacks {k}");
    }
    let p = &v["policies"][0];
    for k in [
        "policy",
        "jobs_submitted",
        "jobs_completed",
        "jobs_unplaceable",
        "gpu_utilization_pct",
        "gpu_utilization_during_arrivals_pct",
        "avg_queue_delay_s",
        "p50_queue_delay_s",
        "p99_queue_delay_s",
        "avg_jct_s",
        "p50_jct_s",
        "p99_jct_s",
        "makespan_s",
        "gangs_placed",
        "gangs_within_required_domain_pct",
        "gangs_outside_required_domain",
        "placements_rejected",
        "preemptions",
        "lost_work_gpu_s",
        "scheduling_rounds",
        "unplaceable_by_reason",
        "allocation_curve",
        "wall_s",
        "cpu_s",
    ] {
        assert!(p.get(k).is_some(), "policy entry lacks {k}");
    }
    assert!(p["allocation_curve"]["t_s"].is_array());
    assert!(p["allocation_curve"]["allocated_pct"].is_array());
    assert_eq!(p["preempt_mode"], serde_json::Value::Null);
    assert_eq!(v["preempt_mode"], "resume");
    let back: ReplayReport = serde_json::from_value(v).unwrap();
    assert_eq!(back.policies.len(), 1);
}

/// One 8-GPU host owned by queue "q"; "other" borrows it at t=0 for 1000 s and the owner's 100 s
/// job arrives at t=100. The borrower becomes preemptible at 600 (min-runtime 600 s), when a tick
/// runs a round.
fn reclaim_case() -> (SimCluster, Vec<SimJob>) {
    let text = r#"
[[models]]
name = "g"
kind = "gpu"

[layout]
hosts_per_rack = 1
racks_per_pod = 1

[[host_groups]]
count = 1
devices = 8
model = "g"

[[queues]]
name = "q"
guaranteed_devices = 8

[[queues]]
name = "other"
guaranteed_devices = 0

[scheduler]
preemption = true
min_runtime_s = 600

[replay]
tick_s = 300
"#;
    let c = SimCluster::parse(text, Path::new("t.toml")).unwrap();
    let mut borrower = job("b", 0, 1, 8, 1000);
    borrower.queue = "other".into();
    let owner = job("a", 100, 1, 8, 100);
    (c, vec![borrower, owner])
}

#[test]
fn a_tick_at_min_runtime_lets_the_owner_preempt_the_borrower() {
    // Preempted at 600 (not before, not later): 600 s x 8 GPUs lost without a checkpoint; the
    // borrower resumes its remaining 400 s, and everything completes.
    let (c, jobs) = reclaim_case();
    let m = run(&c, &jobs, PolicyName::Gangway);
    assert_eq!(m.preemptions, 1, "{m:?}");
    close(m.lost_work_gpu_s, 4800.0);
    assert_eq!(m.jobs_completed, 2);
    assert_eq!(m.gangs_placed, 3);
    close(m.makespan_s, 1100.0);
    close(m.gpu_utilization_pct, 100.0);
}

#[test]
fn the_owner_runs_as_soon_as_the_borrower_is_preempted() {
    // Delays: borrower 0, owner 500 (100 -> 600). JCTs: owner 600 (ends 700), borrower 1100.
    let (c, jobs) = reclaim_case();
    let m = run(&c, &jobs, PolicyName::Gangway);
    close(m.avg_queue_delay_s, 250.0);
    close(m.avg_jct_s, 850.0);
}
