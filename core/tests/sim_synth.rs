//! The synthetic trace mixes (`gangway sim synth --mix NAME`): seeded, and following the
//! distribution core/SIM.md documents.

use gangway_core::engine::{DeviceKind, TopologyLevel};
use gangway_core::sim::philly::{parse_trace, Trace};
use gangway_core::sim::synth::{mix_by_name, synthetic_trace, JobClass, PRETRAIN_MIX};
use gangway_core::sim::{jobs_from_trace, SimCluster};
use std::path::Path;

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("core/ sits in the repository root")
}

fn pretrain_cluster() -> SimCluster {
    SimCluster::load(&repo_root().join("deploy/sim/pretrain-cluster.toml")).expect("valid file")
}

fn trace(seed: u64, hours: f64, gpus: u64) -> Trace {
    let csv = synthetic_trace(seed, hours, 0.9, gpus, &PRETRAIN_MIX).expect("valid arguments");
    parse_trace(&csv, Path::new("pretrain.csv")).expect("the generator writes valid CSV")
}

#[test]
fn the_same_seed_writes_the_same_pretrain_trace() {
    let a = synthetic_trace(3, 48.0, 0.9, 4096, &PRETRAIN_MIX).unwrap();
    assert_eq!(
        a,
        synthetic_trace(3, 48.0, 0.9, 4096, &PRETRAIN_MIX).unwrap()
    );
    assert_ne!(
        a,
        synthetic_trace(4, 48.0, 0.9, 4096, &PRETRAIN_MIX).unwrap()
    );
    assert_eq!(mix_by_name("pretrain").unwrap(), &PRETRAIN_MIX[..]);
    let err = mix_by_name("llm").unwrap_err().to_string();
    assert!(err.contains("default, pretrain"), "{err}");
}

/// Two simulated months: every documented class shows up with its share of submissions and its
/// mean duration, gangs of 64+ GPUs hold over 99% of the GPU-time, and the offered load is the
/// one asked for.
#[test]
fn the_pretrain_mix_follows_its_documented_distribution() {
    let cluster = pretrain_cluster();
    let gpus = cluster.total_devices(DeviceKind::Gpu);
    assert_eq!(gpus, 4096);
    let hours = 1500.0;
    let t = trace(11, hours, gpus);
    let n = t.jobs.len() as f64;
    assert!(n > 8000.0, "{n} jobs");
    let total_share: f64 = PRETRAIN_MIX.iter().map(|c| c.share).sum();
    assert!(
        (total_share - 1.0).abs() < 1e-9,
        "shares add up to {total_share}"
    );
    let of = |c: &JobClass| {
        t.jobs
            .iter()
            .filter(|j| j.gpus == c.gpus)
            .collect::<Vec<_>>()
    };
    for c in &PRETRAIN_MIX {
        let jobs = of(c);
        let share = jobs.len() as f64 / n;
        assert!(
            (share - c.share).abs() < 0.015,
            "{} GPUs: {share:.3} of submissions, documented {}",
            c.gpus,
            c.share
        );
        let mean_s = jobs
            .iter()
            .map(|j| j.duration_ms as f64 / 1000.0)
            .sum::<f64>()
            / jobs.len() as f64;
        assert!(
            (mean_s / c.mean_duration_s - 1.0).abs() < 0.2,
            "{} GPUs: mean {mean_s:.0} s, documented {}",
            c.gpus,
            c.mean_duration_s
        );
    }
    assert_eq!(
        t.jobs
            .iter()
            .filter(|j| !PRETRAIN_MIX.iter().any(|c| c.gpus == j.gpus))
            .count(),
        0,
        "only documented sizes"
    );
    let work = |min: u32| -> f64 {
        t.jobs
            .iter()
            .filter(|j| j.gpus >= min)
            .map(|j| f64::from(j.gpus) * j.duration_ms as f64 / 1000.0)
            .sum()
    };
    assert!(work(64) / work(1) > 0.99, "large gangs hold the GPU-time");
    let load = work(1) / (gpus as f64 * hours * 3600.0);
    assert!((load - 0.9).abs() < 0.09, "offered load {load:.3}");
}

/// On the shipped cluster every size has a home: up to 8 GPUs one host, 64 one rack, 128 to 1,024
/// GPUs one pod of 1,024 GPUs (16 racks), in tasks of 8.
#[test]
fn every_pretrain_gang_fits_its_required_domain_on_the_shipped_cluster() {
    let cluster = pretrain_cluster();
    let t = trace(5, 24.0 * 14.0, 4096);
    let jobs = jobs_from_trace(&t, &cluster, 0, u64::MAX).expect("queue mapped");
    assert_eq!(jobs.len(), t.jobs.len());
    for j in &jobs {
        let want = match j.devices() {
            0..=8 => TopologyLevel::Host,
            64 => TopologyLevel::Rack,
            _ => TopologyLevel::Pod,
        };
        assert_eq!(j.required, Some(want), "{} GPUs", j.devices());
        if j.devices() > 8 {
            assert_eq!(j.devices_per_task, 8, "{} GPUs in whole hosts", j.devices());
        }
    }
    assert!(jobs.iter().any(|j| j.devices() == 1024));
    assert!(jobs.iter().all(|j| j.queue == "synthetic"));
    let pod_gpus = u64::from(cluster.layout.hosts_per_rack * cluster.layout.racks_per_pod) * 8;
    assert_eq!(pod_gpus, 1024, "the largest gang fills exactly one pod");
}
