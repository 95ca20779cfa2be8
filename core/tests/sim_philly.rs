//! A window of the real Philly trace on the shipped cluster file: invariants and determinism.
//! Skipped (with a message) when ../shared/traces is absent.

use gangway_core::engine::PolicyName;
use gangway_core::sim::philly::{load_trace, parse_offset};
use gangway_core::sim::{jobs_from_trace, replay, ReplayMetrics, ReplayOptions, SimCluster};
use std::path::{Path, PathBuf};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

#[test]
fn philly_window_replay_keeps_its_invariants() {
    let trace_path = repo_root().join("../shared/traces/philly/philly.csv");
    if !trace_path.exists() {
        println!("skipping: {} is absent", trace_path.display());
        return;
    }
    let trace = load_trace(&trace_path).unwrap();
    assert_eq!(trace.jobs.len(), 82_247);
    let cluster = SimCluster::load(&repo_root().join("deploy/sim/philly-cluster.toml")).unwrap();
    // Half a day in early October, a busy stretch.
    let from = parse_offset("2017-10-03 00:00:00", trace.start_unix_s).unwrap();
    let to = parse_offset("2017-10-03 12:00:00", trace.start_unix_s).unwrap();
    let jobs = jobs_from_trace(&trace, &cluster, from, to).unwrap();
    assert!(jobs.len() > 100, "window has {} jobs", jobs.len());
    let options = ReplayOptions::default();
    for policy in [
        PolicyName::FirstFit,
        PolicyName::StaticQuota,
        PolicyName::Gangway,
    ] {
        let m = replay(&cluster, &jobs, policy, &options).unwrap();
        assert_eq!(m.jobs_submitted, jobs.len() as u64);
        assert_eq!(
            m.jobs_completed + m.jobs_unplaceable,
            m.jobs_submitted,
            "{policy}: every job completes or is reported unplaceable"
        );
        assert_eq!(m.gangs_outside_required_domain, 0, "{policy}");
        assert_eq!(m.gangs_within_required_domain_pct, 100.0, "{policy}");
        assert!(m.gpu_utilization_pct > 0.0 && m.gpu_utilization_pct <= 100.0);
        assert!(m.avg_queue_delay_s >= 0.0 && m.p99_queue_delay_s >= m.p50_queue_delay_s);
        assert!(m.makespan_s > 0.0);
        let again = replay(&cluster, &jobs, policy, &options).unwrap();
        let a = serde_json::to_string(&ReplayMetrics {
            wall_s: 0.0,
            cpu_s: 0.0,
            ..m
        })
        .unwrap();
        let b = serde_json::to_string(&ReplayMetrics {
            wall_s: 0.0,
            cpu_s: 0.0,
            ..again
        })
        .unwrap();
        assert_eq!(a, b, "{policy}: same input, same JSON");
    }
}
