//! The FGD experiment end to end on the real openb files (small by default).
//!
//! `GANGWAY_FGD_FULL=1` runs the paper's setup (all pods, tune 1.3, 10 seeds; set
//! `GANGWAY_FGD_SEEDS`, `GANGWAY_FGD_POLICIES=best-fit,fgd,gangway` to change it) and prints the
//! report as JSON: run it in release (`cargo test --release --test fgd_experiment -- --nocapture`).

use gangway_core::engine::PolicyName;
use gangway_core::sim::fgd::{run_fgd, FgdOptions};
use std::path::PathBuf;

fn traces() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces");
    if dir.join("openb/openb_node_list_gpu_node.csv").exists() {
        Some(dir)
    } else {
        eprintln!("skipping: openb traces not found under {}", dir.display());
        None
    }
}

#[test]
fn fgd_experiment_runs_on_openb() {
    let Some(dir) = traces() else { return };
    let full = std::env::var("GANGWAY_FGD_FULL").is_ok_and(|v| v == "1");
    let mut opts = FgdOptions::new(
        dir.join("openb/openb_node_list_gpu_node.csv"),
        dir.join("openb/openb_pod_list_default.csv"),
    );
    opts.published = Some(dir.join("fgd_results/analysis_allo_discrete.csv"));
    if full {
        if let Ok(s) = std::env::var("GANGWAY_FGD_SEEDS") {
            opts.seeds = s.parse().expect("GANGWAY_FGD_SEEDS");
        }
        if let Ok(p) = std::env::var("GANGWAY_FGD_POLICIES") {
            opts.policies = p.split(',').map(|x| x.parse().expect("policy")).collect();
        }
    } else {
        // Small: a few hundred pods against the full cluster, tuned to 1.3 x capacity.
        opts.max_pods = Some(300);
        opts.max_nodes = Some(40);
        opts.seeds = 2;
        opts.policies = vec![
            PolicyName::FirstFit,
            PolicyName::BestFit,
            PolicyName::Fgd,
            PolicyName::Gangway,
        ];
    }
    let report = run_fgd(&opts).expect("experiment runs");
    if full {
        println!("{}", serde_json::to_string_pretty(&report).expect("json"));
    }
    for p in &report.policies {
        println!(
            "{:<12} unallocated {:6.2}% (sd {:.2})  frag@90 {:6.2}%  published {:?}",
            p.policy.as_str(),
            p.unallocated_gpu_pct,
            p.unallocated_gpu_pct_stddev,
            p.frag_ratio_pct_at_90,
            p.published_unallocated_gpu_pct
        );
        assert_eq!(p.seeds.len(), opts.seeds as usize);
        for s in &p.seeds {
            assert!(s.failed_pods <= s.pods);
            let mut last = 0.0;
            for (arrived, v) in s.allocation_curve.iter().enumerate() {
                if let Some(v) = v {
                    // Allocation never exceeds what arrived (slack: one percent of
                    // discretisation, plus the largest pod, 8 GPUs, on a small cluster).
                    let slack = 1.0 + 800.0 / report.total_gpus as f64;
                    assert!(
                        *v <= arrived as f64 + slack,
                        "{} seed {}: {v}% allocated at {arrived}% arrived",
                        p.policy,
                        s.seed
                    );
                    assert!(
                        *v >= last - 0.5,
                        "{} seed {}: curve not monotone at {arrived}%",
                        p.policy,
                        s.seed
                    );
                    assert!(*v <= 100.0);
                    last = *v;
                }
            }
            assert!(s.unallocated_gpu_pct >= 0.0 && s.unallocated_gpu_pct <= 100.0);
        }
    }
    if full {
        assert_eq!(report.total_gpus, 6212);
    }
}
