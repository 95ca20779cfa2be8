//! Synthetic traces in the Philly CSV format, for workloads the real traces do not stress. Two
//! named mixes ([`MIXES`], `gangway sim synth --mix NAME`):
//!
//! - `default` ([`GANG_MIX`]): many 1-GPU jobs that scatter over hosts, mixed with 64- and 128-GPU
//!   gangs that need whole racks;
//! - `pretrain` ([`PRETRAIN_MIX`]): a large-model pretraining cluster, where gangs of 64 to 1,024
//!   GPUs hold over 99% of the GPU-time and small jobs (1 to 8 GPUs) are a third of submissions.
//!
//! Seeded (ChaCha8): the same arguments write the same file. Arrivals are Poisson at the rate that
//! offers `load` x the cluster's GPUs on average; durations are exponential (at least 5 minutes).

use super::error::SimError;
use super::philly::format_timestamp;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fmt::Write;

/// One class of jobs in the mix.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct JobClass {
    pub gpus: u32,
    /// Share of submissions (the shares of a mix need not add up to 1; they are normalised).
    pub share: f64,
    pub mean_duration_s: f64,
}

/// The default mix: mostly single GPUs, some 64- and 128-GPU gangs.
pub const GANG_MIX: [JobClass; 3] = [
    JobClass {
        gpus: 1,
        share: 0.92,
        mean_duration_s: 4.0 * 3600.0,
    },
    JobClass {
        gpus: 64,
        share: 0.05,
        mean_duration_s: 3.0 * 3600.0,
    },
    JobClass {
        gpus: 128,
        share: 0.03,
        mean_duration_s: 3.0 * 3600.0,
    },
];

/// The `pretrain` mix: gangs of 64..1,024 GPUs (powers of two) hold 99.3% of the GPU-time, small
/// jobs of 1..8 GPUs (evaluation, debugging, fine-tuning) are 65% of the submissions. Mean GPU-hours
/// per submission: 595. Shares of submissions and mean durations (exponential, at least 5 min):
///
/// | GPUs | 1 | 2 | 4 | 8 | 64 | 128 | 256 | 512 | 1024 |
/// |---|---|---|---|---|---|---|---|---|---|
/// | share % | 30 | 10 | 10 | 15 | 12 | 10 | 7 | 4 | 2 |
/// | mean h | 1 | 1 | 2 | 2 | 3 | 4 | 6 | 8 | 12 |
pub const PRETRAIN_MIX: [JobClass; 9] = [
    class(1, 0.30, 1.0),
    class(2, 0.10, 1.0),
    class(4, 0.10, 2.0),
    class(8, 0.15, 2.0),
    class(64, 0.12, 3.0),
    class(128, 0.10, 4.0),
    class(256, 0.07, 6.0),
    class(512, 0.04, 8.0),
    class(1024, 0.02, 12.0),
];

const fn class(gpus: u32, share: f64, mean_hours: f64) -> JobClass {
    JobClass {
        gpus,
        share,
        mean_duration_s: mean_hours * 3600.0,
    }
}

/// The named mixes, for `--mix`.
pub const MIXES: [(&str, &[JobClass]); 2] = [("default", &GANG_MIX), ("pretrain", &PRETRAIN_MIX)];

/// The mix of a name, or an argument error listing the names.
pub fn mix_by_name(name: &str) -> Result<&'static [JobClass], SimError> {
    MIXES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, m)| *m)
        .ok_or_else(|| {
            let names: Vec<&str> = MIXES.iter().map(|(n, _)| *n).collect();
            SimError::Argument(format!(
                "--mix: unknown mix {name:?}: expected one of {}",
                names.join(", ")
            ))
        })
}

/// Unix time of the first submission (2017-10-01, inside the Philly trace's span).
const START_UNIX_S: i64 = 1_506_816_000;

/// Writes a trace of `hours` of submissions for a cluster of `cluster_gpus` GPUs.
pub fn synthetic_trace(
    seed: u64,
    hours: f64,
    load: f64,
    cluster_gpus: u64,
    mix: &[JobClass],
) -> Result<String, SimError> {
    if !(hours > 0.0 && hours.is_finite()) {
        return Err(SimError::Argument(format!(
            "--hours: expected a positive number, got {hours}"
        )));
    }
    if !(load > 0.0 && load.is_finite()) {
        return Err(SimError::Argument(format!(
            "--load: expected a positive number, got {load}"
        )));
    }
    let total_share: f64 = mix.iter().map(|c| c.share).sum();
    if mix.is_empty() || total_share <= 0.0 || cluster_gpus == 0 {
        return Err(SimError::Argument(
            "the mix and the cluster must not be empty".into(),
        ));
    }
    // GPU-seconds one average job asks for; arrivals every `gap` seconds offer `load` x capacity.
    let work: f64 = mix
        .iter()
        .map(|c| c.share / total_share * f64::from(c.gpus) * c.mean_duration_s)
        .sum();
    let mean_gap_s = work / (load * cluster_gpus as f64);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let exp = |rng: &mut ChaCha8Rng, mean: f64| -> f64 {
        let u: f64 = rng.random_range(f64::EPSILON..1.0);
        -mean * u.ln()
    };
    let mut out = String::from("timestamp,duration,num_gpus,gpu_time,cluster\n");
    let mut t = 0.0;
    let end = hours * 3600.0;
    while t < end {
        let mut pick = rng.random_range(0.0..total_share);
        let class = mix
            .iter()
            .find(|c| {
                pick -= c.share;
                pick < 0.0
            })
            .unwrap_or(&mix[mix.len() - 1]);
        let duration = exp(&mut rng, class.mean_duration_s).max(300.0).round();
        let _ = writeln!(
            out,
            "{},{duration},{},{},synthetic",
            format_timestamp(START_UNIX_S + t as i64),
            class.gpus,
            duration * f64::from(class.gpus)
        );
        t += exp(&mut rng, mean_gap_s);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_writes_the_same_trace_and_the_mix_shows() {
        let a = synthetic_trace(7, 24.0, 0.9, 3205, &GANG_MIX).unwrap();
        assert_eq!(a, synthetic_trace(7, 24.0, 0.9, 3205, &GANG_MIX).unwrap());
        assert_ne!(a, synthetic_trace(8, 24.0, 0.9, 3205, &GANG_MIX).unwrap());
        let trace =
            super::super::philly::parse_trace(&a, std::path::Path::new("synth.csv")).unwrap();
        let big = trace.jobs.iter().filter(|j| j.gpus >= 64).count();
        assert!(
            trace.jobs.len() > 100 && big > 0,
            "{} jobs, {big} gangs",
            trace.jobs.len()
        );
        assert!(synthetic_trace(7, 0.0, 0.9, 3205, &GANG_MIX).is_err());
    }
}
