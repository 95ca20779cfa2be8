use gangway_core::engine::{DeviceKind, PolicyName};
use gangway_core::sim::philly::parse_trace;
use gangway_core::sim::synth::{mix_by_name, synthetic_trace};
use gangway_core::sim::*;
use std::path::Path;
fn main() {
    let cluster = SimCluster::load(Path::new("deploy/sim/pretrain-cluster.toml")).unwrap();
    let gpus = cluster.total_devices(DeviceKind::Gpu);
    for seed in [1u64, 2, 3] {
        let csv =
            synthetic_trace(seed, 336.0, 0.9, gpus, mix_by_name("pretrain").unwrap()).unwrap();
        let trace = parse_trace(&csv, Path::new("s.csv")).unwrap();
        let jobs = jobs_from_trace(&trace, &cluster, 0, u64::MAX).unwrap();
        let o = ReplayOptions {
            checkpoint_interval_ms: Some(1_800_000),
            failures: Some(FailureOptions {
                model: FailureModel::default(),
                repair: true,
            }),
            ..ReplayOptions::default()
        };
        let m = replay(&cluster, &jobs, PolicyName::Gangway, &o).unwrap();
        for h in &m.failures.unwrap().hits {
            let ttr = h.back_at_ms.map(|b| (b - h.at_ms) as f64 / 3.6e6);
            let same = h
                .devices_after
                .as_ref()
                .map(|a| a.iter().filter(|d| h.devices_before.contains(d)).count());
            println!(
                "seed {seed} gpus {} ttr_h {:?} same_devices {:?} lost_gpu_h {:.1}",
                h.devices_before.len(),
                ttr,
                same,
                h.lost_ms as f64 * h.devices_before.len() as f64 / 3.6e6
            );
        }
    }
}
