//! Loaders for the Microsoft Philly trace (as derived by the Sia artifact) and its machine lists, and
//! the mapping of a Philly job to a gang.
//!
//! `philly.csv`: `timestamp,duration,num_gpus,gpu_time,cluster` with `timestamp` as
//! `YYYY-MM-DD HH:MM:SS` (taken as UTC), `duration` in seconds (a float), `cluster` the virtual cluster,
//! which the simulator uses as the job's queue.

use super::error::SimError;
use crate::engine::TopologyLevel;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One job of a trace, in simulator units.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceJob {
    /// Line of the job in its file (1 is the header), which names the job (`j<line>`).
    pub line: u64,
    /// Submission, seconds since the trace's first submission.
    pub submit_s: u64,
    /// Run time in milliseconds (the trace's duration).
    pub duration_ms: u64,
    pub gpus: u32,
    /// Virtual cluster: the queue.
    pub queue: String,
}

/// A loaded trace, jobs ordered by submission then line.
#[derive(Clone, Debug)]
pub struct Trace {
    pub source: PathBuf,
    /// Unix seconds of the first submission (time 0 of the simulation).
    pub start_unix_s: i64,
    pub jobs: Vec<TraceJob>,
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian), Howard Hinnant's algorithm.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses `YYYY-MM-DD`, `YYYY-MM-DD HH:MM:SS` or `YYYY-MM-DDTHH:MM:SS` (UTC) to Unix seconds.
pub fn parse_timestamp(s: &str) -> Option<i64> {
    let s = s.trim();
    let (date, time) = match s.split_once([' ', 'T']) {
        Some((d, t)) => (d, Some(t)),
        None => (s, None),
    };
    let mut dp = date.split('-');
    let y: i64 = dp.next()?.parse().ok()?;
    let m: i64 = dp.next()?.parse().ok()?;
    let d: i64 = dp.next()?.parse().ok()?;
    if dp.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let mut secs = 0;
    if let Some(t) = time {
        let mut tp = t.trim_end_matches('Z').split(':');
        let h: i64 = tp.next()?.parse().ok()?;
        let mi: i64 = tp.next()?.parse().ok()?;
        let se: i64 = match tp.next() {
            Some(x) => x.parse().ok()?,
            None => 0,
        };
        if tp.next().is_some() || h > 23 || mi > 59 || se > 60 {
            return None;
        }
        secs = h * 3600 + mi * 60 + se;
    }
    Some(days_from_civil(y, m, d) * 86_400 + secs)
}

/// Formats Unix seconds as `YYYY-MM-DD HH:MM:SS` (UTC).
pub fn format_timestamp(unix_s: i64) -> String {
    let days = unix_s.div_euclid(86_400);
    let secs = unix_s.rem_euclid(86_400);
    // civil_from_days
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Parses a window bound: an offset from the trace's first submission (`86400`, `3600s`, `90m`, `12h`,
/// `7d`, fractions allowed) or a UTC timestamp (`2017-10-01`, `2017-10-01 12:00:00`,
/// `2017-10-01T12:00:00`). Returns seconds since the trace's start; a timestamp before it is 0.
pub fn parse_offset(s: &str, start_unix_s: i64) -> Result<u64, SimError> {
    let t = s.trim();
    if let Some(unix) = parse_timestamp(t) {
        return Ok((unix - start_unix_s).max(0) as u64);
    }
    let (num, mult) = match t.char_indices().last() {
        Some((i, 's')) => (&t[..i], 1.0),
        Some((i, 'm')) => (&t[..i], 60.0),
        Some((i, 'h')) => (&t[..i], 3600.0),
        Some((i, 'd')) => (&t[..i], 86_400.0),
        _ => (t, 1.0),
    };
    match num.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok((v * mult).round() as u64),
        _ => Err(SimError::Argument(format!(
            "bad time {s:?}: expected seconds from the trace start (3600, 90m, 12h, 7d) or a UTC \
             timestamp (2017-10-01, 2017-10-01 12:00:00)"
        ))),
    }
}

fn read(path: &Path) -> Result<String, SimError> {
    std::fs::read_to_string(path).map_err(|e| SimError::io(path, e))
}

/// Loads `philly.csv`. Blank lines are skipped; any malformed row is an error naming its line.
pub fn load_trace(path: &Path) -> Result<Trace, SimError> {
    let text = read(path)?;
    parse_trace(&text, path)
}

/// Parses trace text (see [`load_trace`]).
pub fn parse_trace(text: &str, path: &Path) -> Result<Trace, SimError> {
    let bad = |line: u64, message: String| SimError::Csv {
        path: path.to_owned(),
        line,
        message,
    };
    let mut lines = text.lines().enumerate();
    let header = lines
        .next()
        .map(|(_, h)| h.trim())
        .ok_or_else(|| bad(1, "empty file".into()))?;
    let cols: Vec<&str> = header.split(',').map(str::trim).collect();
    let col = |name: &str| {
        cols.iter()
            .position(|c| *c == name)
            .ok_or_else(|| bad(1, format!("header lacks column {name:?} (got {header:?})")))
    };
    let (c_ts, c_dur, c_gpus, c_vc) = (
        col("timestamp")?,
        col("duration")?,
        col("num_gpus")?,
        col("cluster")?,
    );
    let mut raw = Vec::new();
    for (i, l) in lines {
        let line = i as u64 + 1;
        if l.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = l.split(',').map(str::trim).collect();
        if f.len() != cols.len() {
            return Err(bad(
                line,
                format!("expected {} fields, got {}", cols.len(), f.len()),
            ));
        }
        let ts = parse_timestamp(f[c_ts])
            .ok_or_else(|| bad(line, format!("bad timestamp {:?}", f[c_ts])))?;
        let dur: f64 = f[c_dur]
            .parse()
            .ok()
            .filter(|d: &f64| d.is_finite() && *d >= 0.0)
            .ok_or_else(|| bad(line, format!("bad duration {:?}", f[c_dur])))?;
        let gpus: u32 = f[c_gpus].parse().ok().filter(|g| *g >= 1).ok_or_else(|| {
            bad(
                line,
                format!("bad num_gpus {:?} (want an integer >= 1)", f[c_gpus]),
            )
        })?;
        if f[c_vc].is_empty() {
            return Err(bad(line, "empty cluster (virtual cluster)".into()));
        }
        raw.push((
            ts,
            line,
            (dur * 1000.0).round() as u64,
            gpus,
            f[c_vc].to_owned(),
        ));
    }
    let start = raw.iter().map(|r| r.0).min().unwrap_or(0);
    let mut jobs: Vec<TraceJob> = raw
        .into_iter()
        .map(|(ts, line, duration_ms, gpus, queue)| TraceJob {
            line,
            submit_s: (ts - start) as u64,
            duration_ms,
            gpus,
            queue,
        })
        .collect();
    jobs.sort_by_key(|j| (j.submit_s, j.line));
    Ok(Trace {
        source: path.to_owned(),
        start_unix_s: start,
        jobs,
    })
}

/// A machine list (`revised_machine_list.csv` or `cluster_machine_list.csv`): machine id and GPU count
/// in file order, found by the header's `machineId` and `number of GPUs` columns.
pub fn load_machine_list(path: &Path) -> Result<Vec<(String, u32)>, SimError> {
    let text = read(path)?;
    let bad = |line: usize, message: String| SimError::Csv {
        path: path.to_owned(),
        line: line as u64,
        message,
    };
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .collect();
    let find = |name: &str| {
        header
            .iter()
            .position(|c| *c == name)
            .ok_or_else(|| bad(1, format!("header lacks column {name:?}")))
    };
    let (c_id, c_gpus) = (find("machineId")?, find("number of GPUs")?);
    let mut out = Vec::new();
    for (i, l) in lines.enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = l.split(',').map(str::trim).collect();
        let (Some(id), Some(g)) = (f.get(c_id), f.get(c_gpus)) else {
            return Err(bad(i + 2, format!("unexpected row {l:?}")));
        };
        let gpus = g
            .parse()
            .map_err(|_| bad(i + 2, format!("bad GPU count {g:?}")))?;
        out.push(((*id).to_owned(), gpus));
    }
    Ok(out)
}

/// `philly_vc_nodes_helios.csv` (`vc,node num`): nodes per virtual cluster, file order.
pub fn load_vc_nodes(path: &Path) -> Result<Vec<(String, u64)>, SimError> {
    let text = read(path)?;
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate().skip(1) {
        if l.trim().is_empty() {
            continue;
        }
        let bad = || SimError::Csv {
            path: path.to_owned(),
            line: i as u64 + 1,
            message: format!("expected `vc,nodes`, got {l:?}"),
        };
        let (vc, n) = l.split_once(',').ok_or_else(bad)?;
        let n = n.trim().parse().map_err(|_| bad())?;
        out.push((vc.trim().to_owned(), n));
    }
    Ok(out)
}

/// Splits `total` devices among queues in proportion to their weights, whole devices, largest
/// remainder first (ties by name), so the shares always add up to `total`.
pub fn proportional_quotas(total: u64, weights: &[(String, u64)]) -> BTreeMap<String, u64> {
    let sum: u64 = weights.iter().map(|w| w.1).sum();
    let mut out = BTreeMap::new();
    if sum == 0 {
        return out;
    }
    let mut rems = Vec::new();
    let mut given = 0;
    for (name, w) in weights {
        let exact = u128::from(total) * u128::from(*w);
        let floor = (exact / u128::from(sum)) as u64;
        given += floor;
        out.insert(name.clone(), floor);
        rems.push((exact % u128::from(sum), name.clone()));
    }
    rems.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (_, name) in rems.into_iter().take((total - given) as usize) {
        *out.get_mut(&name).expect("inserted above") += 1;
    }
    out
}

/// How a job of `gpus` GPUs becomes a gang on a cluster of `host_devices`-device hosts whose racks
/// hold `rack_devices` devices: `(tasks, devices per task, required level, preferred level)`.
///
/// - `gpus <= host_devices`: one task of `gpus` devices, required on one host.
/// - larger: tasks of `host_devices` devices when that divides `gpus`, else of the largest power of two
///   that does (Philly's 12- and 24-GPU jobs become 3 x 4 and 3 x 8); required within one rack when
///   the gang fits in a rack's devices, else within one pod (preferring a rack).
pub fn gang_shape(
    gpus: u32,
    host_devices: u32,
    rack_devices: u32,
) -> (u32, u32, TopologyLevel, Option<TopologyLevel>) {
    if gpus <= host_devices {
        return (1, gpus, TopologyLevel::Host, None);
    }
    let mut per = host_devices.max(1);
    while per > 1 && gpus % per != 0 {
        per = if per.is_power_of_two() {
            per / 2
        } else {
            per.next_power_of_two() / 2
        };
    }
    let tasks = gpus / per;
    if gpus <= rack_devices {
        (tasks, per, TopologyLevel::Rack, None)
    } else {
        (tasks, per, TopologyLevel::Pod, Some(TopologyLevel::Rack))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        let t = parse_timestamp("2017-10-09 07:01:55").unwrap();
        assert_eq!(t, 1_507_532_515);
        assert_eq!(format_timestamp(t), "2017-10-09 07:01:55");
        assert_eq!(parse_timestamp("1970-01-02"), Some(86_400));
        assert_eq!(parse_timestamp("2017-13-01"), None);
        assert_eq!(parse_offset("2d", t).unwrap(), 172_800);
        assert_eq!(parse_offset("90m", t).unwrap(), 5_400);
        assert_eq!(parse_offset("3600", t).unwrap(), 3_600);
        assert_eq!(
            parse_offset("2017-10-10", t).unwrap(),
            86_400 - 7 * 3600 - 115
        );
        assert!(parse_offset("soon", t).is_err());
    }

    #[test]
    fn quotas_add_up() {
        let w = vec![
            ("a".to_owned(), 1),
            ("b".to_owned(), 1),
            ("c".to_owned(), 1),
        ];
        let q = proportional_quotas(10, &w);
        assert_eq!(q.values().sum::<u64>(), 10);
        assert_eq!(q["a"], 4);
    }

    #[test]
    fn shapes() {
        assert_eq!(gang_shape(3, 8, 64), (1, 3, TopologyLevel::Host, None));
        assert_eq!(gang_shape(16, 8, 64), (2, 8, TopologyLevel::Rack, None));
        assert_eq!(gang_shape(12, 8, 64), (3, 4, TopologyLevel::Rack, None));
        assert_eq!(
            gang_shape(128, 8, 64),
            (16, 8, TopologyLevel::Pod, Some(TopologyLevel::Rack))
        );
    }
}
