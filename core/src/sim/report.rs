//! Reports: the human table and the machine-readable JSON of both experiments.

use super::metrics::ReplayMetrics;
use super::replay::PreemptMode;
use serde::{Deserialize, Serialize};

/// The time window a replay covered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// Seconds since the trace's first submission; jobs submitted in `[from_s, to_s)` were replayed.
    pub from_s: u64,
    /// `None`: to the end of the trace.
    pub to_s: Option<u64>,
    /// The same bounds as UTC timestamps.
    pub from_utc: String,
    pub to_utc: Option<String>,
}

/// `gangway sim replay -o json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplayReport {
    /// Always `"replay"`.
    pub experiment: String,
    pub trace: String,
    pub cluster: String,
    pub cluster_gpus: u64,
    pub window: Window,
    pub jobs_in_window: u64,
    /// Arrival-rate multiplier (`--load`): 1 replays the trace's own submission times.
    pub load_factor: f64,
    pub preempt_mode: PreemptMode,
    /// Where backfill's runtime estimates come from: `"trace_duration"` (the real run time).
    pub runtime_estimate: String,
    pub policies: Vec<ReplayMetrics>,
}

/// A plain text table, numbers right-aligned.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.len());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 0 {
                    format!("{c:<w$}", w = widths[i])
                } else {
                    format!("{c:>w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(header.iter().map(|h| (*h).to_owned()).collect(), &mut out);
    line(widths.iter().map(|w| "-".repeat(*w)).collect(), &mut out);
    for r in rows {
        line(r.clone(), &mut out);
    }
    out
}

fn f1(x: f64) -> String {
    format!("{x:.1}")
}

impl ReplayReport {
    /// The human-readable report.
    pub fn to_table(&self) -> String {
        let mut out = format!(
            "replay of {} on {} ({} GPUs): {} jobs submitted {}..{}, load x{}; preemption: {}\n\n",
            self.trace,
            self.cluster,
            self.cluster_gpus,
            self.jobs_in_window,
            self.window.from_utc,
            self.window.to_utc.as_deref().unwrap_or("end"),
            self.load_factor,
            match self.preempt_mode {
                PreemptMode::Resume => "resume remaining work",
                PreemptMode::Restart => "restart from scratch",
            }
        );
        let rows: Vec<Vec<String>> = self
            .policies
            .iter()
            .map(|m| {
                vec![
                    m.policy.clone(),
                    f1(m.gpu_utilization_pct),
                    f1(m.gpu_utilization_during_arrivals_pct),
                    f1(m.avg_queue_delay_s),
                    f1(m.p99_queue_delay_s),
                    f1(m.avg_jct_s),
                    f1(m.makespan_s),
                    format!("{:.2}", m.gangs_within_required_domain_pct),
                    m.preemptions.to_string(),
                    m.jobs_completed.to_string(),
                    m.jobs_unplaceable.to_string(),
                    format!("{:.1}", m.wall_s),
                    format!("{:.1}", m.cpu_s),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "policy",
                "util %",
                "util arrivals %",
                "avg delay s",
                "p99 delay s",
                "avg JCT s",
                "makespan s",
                "in domain %",
                "preempt",
                "completed",
                "unplaceable",
                "wall s",
                "cpu s",
            ],
            &rows,
        ));
        if self
            .policies
            .iter()
            .any(|m| m.large_gangs > 0 || m.migrations > 0)
        {
            let rows: Vec<Vec<String>> = self
                .policies
                .iter()
                .map(|m| {
                    vec![
                        m.policy.clone(),
                        m.large_gangs.to_string(),
                        f1(m.avg_queue_delay_large_gangs_s),
                        m.migrations.to_string(),
                        format!("{:.2}", m.migration_device_hours),
                        format!("{:.3}", m.migrations_per_100_device_hours),
                        format!("{:.1}", m.fragmentation_pct),
                    ]
                })
                .collect();
            out.push_str("\nGangs of 32+ GPUs and defragmentation:\n");
            out.push_str(&table(
                &[
                    "policy",
                    "gangs 32+",
                    "their avg delay s",
                    "migrations",
                    "migration device-h",
                    "per 100 device-h",
                    "fragmentation %",
                ],
                &rows,
            ));
        }
        if let Some(t) = failure_table(&self.policies) {
            out.push_str("\nDevice failures (core/SIM.md, \"Device failures\"):\n");
            out.push_str(&t);
        }
        for m in &self.policies {
            if !m.unplaceable_by_reason.is_empty() {
                let parts: Vec<String> = m
                    .unplaceable_by_reason
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect();
                out.push_str(&format!("{} unplaceable: {}\n", m.policy, parts.join(", ")));
            }
            if m.placements_rejected > 0 {
                out.push_str(&format!(
                    "{}: {} placements refused by apply_placement\n",
                    m.policy, m.placements_rejected
                ));
            }
        }
        out
    }
}

/// The device-failure figures of the runs that had `--failures`, one row each; `None` if none.
pub fn failure_table(policies: &[ReplayMetrics]) -> Option<String> {
    let rows: Vec<Vec<String>> = policies
        .iter()
        .filter_map(|m| {
            let f = m.failures.as_ref()?;
            Some(vec![
                m.policy.clone(),
                f.device_failures.to_string(),
                f.gang_failures.to_string(),
                f.repairs.to_string(),
                f.resubmissions.to_string(),
                format!("{:.1}", f.lost_work_gpu_h),
                format!("{:.1}", f.fenced_gpu_h),
                format!("{:.1}", f.lost_gpu_h),
                f1(f.time_to_repair_mean_s),
                f1(f.time_to_repair_p50_s),
                f1(f.time_to_repair_p99_s),
                format!("{:.2}", f.ettr_pct),
                f1(m.avg_jct_s),
            ])
        })
        .collect();
    (!rows.is_empty()).then(|| {
        table(
            &[
                "run",
                "GPU failures",
                "gang failures",
                "repairs",
                "resubmitted",
                "lost work GPU-h",
                "fenced GPU-h",
                "lost GPU-h",
                "TTR mean s",
                "TTR p50 s",
                "TTR p99 s",
                "ETTR %",
                "avg JCT s",
            ],
            &rows,
        )
    })
}

/// The human-readable report of the FGD experiment.
pub fn fgd_table(r: &super::fgd::FgdReport) -> String {
    let mut out = format!(
        "FGD experiment: {} on {} nodes ({} GPUs), arrivals up to {}x capacity, {} typical task classes, {:.1} s\n\n",
        r.workload,
        r.nodes,
        r.total_gpus,
        r.tune,
        r.typical_classes,
        r.wall_ms as f64 / 1000.0
    );
    let rows: Vec<Vec<String>> = r
        .policies
        .iter()
        .map(|p| {
            let wall: u64 = p.seeds.iter().map(|s| s.wall_ms).sum();
            vec![
                p.policy.to_string(),
                format!(
                    "{:.2} ± {:.2}",
                    p.unallocated_gpu_pct, p.unallocated_gpu_pct_stddev
                ),
                format!("{:.2}", p.frag_ratio_pct_at_90),
                p.published_unallocated_gpu_pct
                    .map_or("-".to_owned(), |v| format!("{v:.2}")),
                p.seeds.len().to_string(),
                format!("{:.1}", wall as f64 / 1000.0),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "policy",
            "unallocated GPU % at tune",
            "frag ratio % at 90%",
            "published",
            "seeds",
            "cpu s",
        ],
        &rows,
    ));
    if !r.published.is_empty() {
        let parts: Vec<String> = r
            .published
            .iter()
            .map(|(k, v)| format!("{k} {v:.2}"))
            .collect();
        out.push_str(&format!(
            "\npublished unallocated GPU % (FGD paper, mean of 10 seeds): {}\n",
            parts.join(", ")
        ));
    }
    out
}
