//! Device failures in a replay (`--failures`): a seeded model of failing GPUs, the options that
//! choose what happens to the gang on a failed device (the state machine's repair, or a
//! scheduler without repair), and what a replay measures about them. The failures themselves are
//! committed by [`super::world`] as the commands an agent and an operator would send
//! (`DeviceHealth`, `FenceDevice`); see core/SIM.md, "Device failures".

use super::error::SimError;
use super::metrics::{percentile, round3};
use serde::{Deserialize, Serialize};

/// GPU-attributed unexpected interruptions in Meta's Llama 3 405B pretraining: 58.7% of 419 in 54
/// days on 16,384 H100 GPUs ("The Llama 3 Herd of Models", 2024, section 3.3.4), i.e. one per
/// 16,384 x 54 x 24 / (0.587 x 419) = 86,316 GPU-hours; rounded.
pub const LLAMA3_GPU_MTBF_HOURS: f64 = 86_000.0;

/// How failing devices behave in a replay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailureModel {
    /// Mean time between failures of one GPU while it is in service, hours: every GPU fails after
    /// an exponential time with this mean (a Poisson process over the cluster).
    pub mtbf_hours: f64,
    /// A failed GPU is fenced this long (diagnosis, reseat or replacement), then an operator
    /// returns it (`FenceDevice` with `fenced = false`).
    pub repair_hours: f64,
    /// Without automatic repair: how long after its failure a person resubmits the job.
    pub resubmit_hours: f64,
    /// Seed of the failure draws (ChaCha8): the same seed, the same failures.
    pub seed: u64,
}

impl Default for FailureModel {
    /// Llama 3's GPU failure rate ([`LLAMA3_GPU_MTBF_HOURS`]); a day out for repair and an hour
    /// for a person to resubmit are our assumptions (SIM.md).
    fn default() -> Self {
        Self {
            mtbf_hours: LLAMA3_GPU_MTBF_HOURS,
            repair_hours: 24.0,
            resubmit_hours: 1.0,
            seed: 1,
        }
    }
}

const FIELDS: &str = "mtbf_hours, repair_hours, resubmit_hours, seed";

impl FailureModel {
    /// `default`, or `key=value` pairs separated by commas over the defaults:
    /// `mtbf_hours=N,repair_hours=M[,resubmit_hours=H][,seed=S]`. Errors name the field.
    pub fn parse(spec: &str) -> Result<Self, SimError> {
        let mut model = Self::default();
        let spec = spec.trim();
        if spec == "default" {
            return Ok(model);
        }
        if spec.is_empty() {
            return Err(bad(
                "expected `default` or mtbf_hours=N,repair_hours=M".into()
            ));
        }
        for part in spec.split(',') {
            let Some((key, value)) = part.split_once('=') else {
                return Err(bad(format!(
                    "{:?}: expected field=value (fields: {FIELDS}) or `default`",
                    part.trim()
                )));
            };
            let (key, value) = (key.trim(), value.trim());
            let hours = |v: &str, positive: bool| -> Result<f64, SimError> {
                match v.parse::<f64>() {
                    Ok(x) if x.is_finite() && (x > 0.0 || (!positive && x == 0.0)) => Ok(x),
                    _ => Err(bad(format!(
                        "{key}: expected a {} number of hours, got {v:?}",
                        if positive { "positive" } else { "non-negative" }
                    ))),
                }
            };
            match key {
                "mtbf_hours" => model.mtbf_hours = hours(value, true)?,
                "repair_hours" => model.repair_hours = hours(value, false)?,
                "resubmit_hours" => model.resubmit_hours = hours(value, false)?,
                "seed" => {
                    model.seed = value.parse().map_err(|_| {
                        bad(format!(
                            "seed: expected a non-negative integer, got {value:?}"
                        ))
                    })?
                }
                other => return Err(bad(format!("{other}: unknown field (fields: {FIELDS})"))),
            }
        }
        Ok(model)
    }

    pub(super) fn repair_ms(&self) -> u64 {
        hours_ms(self.repair_hours)
    }

    pub(super) fn resubmit_ms(&self) -> u64 {
        hours_ms(self.resubmit_hours)
    }
}

fn hours_ms(h: f64) -> u64 {
    (h * 3_600_000.0).round() as u64
}

fn bad(message: String) -> SimError {
    SimError::Argument(format!("--failures: {message}"))
}

/// Failures in one replay: the model, and what happens to a gang on a failed device.
#[derive(Clone, Debug, PartialEq)]
pub struct FailureOptions {
    pub model: FailureModel,
    /// true: the state machine repairs the gang (it resumes from its last checkpoint, placed
    /// ahead of other work). false: a scheduler without repair: the job fails, and a person
    /// resubmits it `resubmit_hours` later; it resumes from its last checkpoint (its script
    /// reloads it), queued as a new submission.
    pub repair: bool,
}

/// `--repair on|off|compare`: the repair settings to replay.
pub fn parse_repair_modes(s: &str) -> Result<Vec<bool>, SimError> {
    match s.trim() {
        "on" => Ok(vec![true]),
        "off" => Ok(vec![false]),
        "compare" => Ok(vec![true, false]),
        other => Err(SimError::Argument(format!(
            "--repair: unknown mode {other:?}: expected on, off or compare"
        ))),
    }
}

/// A duration: seconds (`600`), or with a unit `s`, `m`, `h`, `d` (`10m`, `2h`, `1.5h`); > 0.
pub fn parse_duration_ms(s: &str) -> Result<u64, SimError> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 's')) => (&t[..i], 1_000.0),
        Some((i, 'm')) => (&t[..i], 60_000.0),
        Some((i, 'h')) => (&t[..i], 3_600_000.0),
        Some((i, 'd')) => (&t[..i], 86_400_000.0),
        _ => (t, 1_000.0),
    };
    match num.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && (v * mult).round() >= 1.0 => {
            Ok((v * mult).round() as u64)
        }
        _ => Err(SimError::Argument(format!(
            "--checkpoint-interval: bad duration {s:?}: expected a positive time (600, 10m, 2h)"
        ))),
    }
}

/// `--checkpoint-interval 10m,30m,2h`: one replay per interval; `none` (or `0`) means no periodic
/// checkpoint. An empty list is one replay without.
pub fn parse_checkpoint_intervals(list: &[String]) -> Result<Vec<Option<u64>>, SimError> {
    let mut out = Vec::new();
    for item in list.iter().flat_map(|s| s.split(',')) {
        let item = item.trim();
        let v = if item == "none" || item == "0" {
            None
        } else {
            Some(parse_duration_ms(item)?)
        };
        if !out.contains(&v) {
            out.push(v);
        }
    }
    if out.is_empty() {
        out.push(None);
    }
    Ok(out)
}

/// `10m`, `2h`, `90s`: a short label for an interval.
pub fn format_interval(ms: Option<u64>) -> String {
    match ms {
        None => "none".into(),
        Some(ms) if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        Some(ms) if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        Some(ms) if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        Some(ms) => format!("{ms}ms"),
    }
}

/// The label of a replay in reports: the policy, then `+defrag`, then ` repair`/` no-repair` and
/// the checkpoint interval when failures are injected or checkpoints taken.
pub fn run_label(
    policy: &str,
    defrag: bool,
    failures: Option<&FailureOptions>,
    interval: Option<u64>,
) -> String {
    let mut label = policy.to_owned();
    if defrag {
        label.push_str("+defrag");
    }
    if let Some(f) = failures {
        label.push_str(if f.repair { " repair" } else { " no-repair" });
    }
    if failures.is_some() || interval.is_some() {
        label.push_str(&format!(" ckpt={}", format_interval(interval)));
    }
    label
}

/// One failure that hit a running gang (library only; not in the JSON).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GangFailure {
    pub at_ms: u64,
    /// The failed device: host name and index.
    pub host: String,
    pub device: u16,
    /// The trace job's name.
    pub job: String,
    /// Devices (host, index) of the lease it broke.
    pub devices_before: Vec<(String, u16)>,
    /// Milliseconds of work lost: progress at the failure minus the checkpoint it resumes from.
    pub lost_ms: u64,
    /// When, and on which devices, the job ran again (`None`: never).
    pub back_at_ms: Option<u64>,
    pub devices_after: Option<Vec<(String, u16)>>,
}

/// What the failure loop accumulates.
#[derive(Clone, Debug, Default)]
pub(super) struct FailureCounters {
    pub device_failures: u64,
    /// (failure, unfence) times of every failed device; unfence `None` while still fenced.
    pub fenced: Vec<(u64, Option<u64>)>,
    pub lost_device_ms: u128,
    pub resubmissions: u64,
    /// Read from the state machine's jobs when the replay ends.
    pub repairs: u64,
    pub hits: Vec<GangFailure>,
}

/// What a replay with `--failures` reports (`policies[i].failures`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FailureMetrics {
    pub model: FailureModel,
    /// Automatic repair by the state machine (true), or the baseline without it (false).
    pub repair: bool,
    /// Periodic checkpoints of the simulated jobs, seconds (null: none).
    pub checkpoint_interval_s: Option<u64>,
    /// GPUs that failed (each fenced for `repair_hours`).
    pub device_failures: u64,
    /// Failures that hit a running gang.
    pub gang_failures: u64,
    /// Repairs the state machine made (the sum of its jobs' `repairs`): every gang failure with
    /// repair on, 0 without.
    pub repairs: u64,
    /// Jobs resubmitted by hand (without repair).
    pub resubmissions: u64,
    /// GPU-hours of work thrown away: devices x (progress at the failure - the checkpoint it
    /// resumes from), summed over gang failures.
    pub lost_work_gpu_h: f64,
    /// GPU-hours failed devices spent fenced, within the busy period.
    pub fenced_gpu_h: f64,
    /// `lost_work_gpu_h + fenced_gpu_h`.
    pub lost_gpu_h: f64,
    /// Fault to the gang running again, over gang failures whose job ran again.
    pub time_to_repair_mean_s: f64,
    pub time_to_repair_p50_s: f64,
    pub time_to_repair_p99_s: f64,
    /// Gang failures whose job never ran again.
    pub never_ran_again: u64,
    /// Effective training time ratio, percent: over completed jobs, GPU-time weighted, the
    /// job's work over its wall time from first start to completion:
    /// sum(devices x work) / sum(devices x (completion - first start)).
    pub ettr_pct: f64,
    /// Every gang failure (library only).
    #[serde(skip)]
    pub hits: Vec<GangFailure>,
}

impl FailureMetrics {
    /// The figures from the counters; `end_ms` ends the busy period, `ettr` is computed by the
    /// caller from the job records.
    pub(super) fn summarize(
        options: &FailureOptions,
        interval_ms: Option<u64>,
        c: &FailureCounters,
        end_ms: u64,
        ettr_pct: f64,
    ) -> Self {
        let fenced_ms: u128 = c
            .fenced
            .iter()
            .map(|&(from, to)| {
                let to = to.unwrap_or(end_ms).min(end_ms);
                u128::from(to.saturating_sub(from))
            })
            .sum();
        let mut ttr: Vec<u64> = c
            .hits
            .iter()
            .filter_map(|h| h.back_at_ms.map(|b| b - h.at_ms))
            .collect();
        ttr.sort_unstable();
        let mean = if ttr.is_empty() {
            0.0
        } else {
            ttr.iter().map(|&x| u128::from(x)).sum::<u128>() as f64 / ttr.len() as f64
        };
        let gpu_h = |ms: u128| round3(ms as f64 / 3_600_000.0);
        Self {
            model: options.model.clone(),
            repair: options.repair,
            checkpoint_interval_s: interval_ms.map(|ms| ms / 1000),
            device_failures: c.device_failures,
            gang_failures: c.hits.len() as u64,
            repairs: c.repairs,
            resubmissions: c.resubmissions,
            lost_work_gpu_h: gpu_h(c.lost_device_ms),
            fenced_gpu_h: gpu_h(fenced_ms),
            lost_gpu_h: gpu_h(c.lost_device_ms + fenced_ms),
            time_to_repair_mean_s: round3(mean / 1000.0),
            time_to_repair_p50_s: round3(percentile(&ttr, 50.0) as f64 / 1000.0),
            time_to_repair_p99_s: round3(percentile(&ttr, 99.0) as f64 / 1000.0),
            never_ran_again: c.hits.iter().filter(|h| h.back_at_ms.is_none()).count() as u64,
            ettr_pct: round3(ettr_pct),
            hits: c.hits.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_parse_with_errors_naming_the_field() {
        assert_eq!(
            FailureModel::parse("default").unwrap(),
            FailureModel::default()
        );
        let m = FailureModel::parse("mtbf_hours=5000, repair_hours=12,seed=7").unwrap();
        assert_eq!((m.mtbf_hours, m.repair_hours, m.seed), (5000.0, 12.0, 7));
        assert_eq!(m.resubmit_hours, 1.0);
        let e = FailureModel::parse("mtbf_hours=-1")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--failures: mtbf_hours: expected a positive"),
            "{e}"
        );
        let e = FailureModel::parse("mtbf=3").unwrap_err().to_string();
        assert!(e.contains("mtbf: unknown field"), "{e}");
        let e = FailureModel::parse("repair_hours").unwrap_err().to_string();
        assert!(e.contains("expected field=value"), "{e}");
        assert!(FailureModel::parse("seed=x").is_err());
    }

    #[test]
    fn intervals_parse() {
        let v = parse_checkpoint_intervals(&["10m,2h".into(), "90".into()]).unwrap();
        assert_eq!(v, vec![Some(600_000), Some(7_200_000), Some(90_000)]);
        assert_eq!(parse_checkpoint_intervals(&[]).unwrap(), vec![None]);
        assert!(parse_checkpoint_intervals(&["-3m".into()]).is_err());
        assert_eq!(format_interval(Some(1_800_000)), "30m");
        assert_eq!(format_interval(Some(7_200_000)), "2h");
    }
}
