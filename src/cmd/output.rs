//! Rendering for the client commands: tables for people, stable JSON for scripts, and the small
//! formatting helpers (device counts, ages, timestamps, milli-devices) the tables share.

use clap::ValueEnum;
use comfy_table::{presets, ContentArrangement, Table};
use serde::Serialize;
use std::io::IsTerminal;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `-o/--output`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// One JSON document per result (one line per frame with --watch).
    Json,
}

/// How one result is rendered.
#[derive(Clone, Copy, Debug)]
pub struct Render {
    pub output: Output,
    /// One-line JSON (used by --watch, so each frame is one line).
    pub compact: bool,
    /// "Now" for age columns, in ms since the Unix epoch.
    pub now_ms: u64,
}

impl Render {
    pub fn new(output: Output, compact: bool) -> Self {
        Self {
            output,
            compact,
            now_ms: now_ms(),
        }
    }

    /// JSON of `view`, or the table `table` draws from it. Ends without a newline.
    pub fn view<V: Serialize>(&self, view: &V, table: impl FnOnce(&V) -> String) -> String {
        match self.output {
            Output::Json => to_json(view, self.compact),
            Output::Table => table(view),
        }
    }
}

pub fn to_json<V: Serialize>(view: &V, compact: bool) -> String {
    let r = if compact {
        serde_json::to_string(view)
    } else {
        serde_json::to_string_pretty(view)
    };
    r.expect("view structs always serialize")
}

/// The JSON of a command that changes something: `{"ok":true,"action":"cancel","target":"job-1"}`.
#[derive(Debug, Serialize)]
pub struct ActionView {
    pub ok: bool,
    pub action: &'static str,
    pub target: String,
}

/// Prints the outcome of a change: a sentence, or an [`ActionView`].
pub fn print_action(output: Output, action: &'static str, target: &str, sentence: &str) {
    match output {
        Output::Table => println!("{sentence}"),
        Output::Json => println!(
            "{}",
            to_json(
                &ActionView {
                    ok: true,
                    action,
                    target: target.to_owned(),
                },
                false
            )
        ),
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A borderless table with two spaces between columns, no colours.
pub fn new_table<I, S>(header: I) -> Table
where
    I: IntoIterator<Item = S>,
    S: Into<comfy_table::Cell>,
{
    let mut t = Table::new();
    t.load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.into_iter().map(Into::into).collect::<Vec<_>>());
    if !std::io::stdout().is_terminal() {
        t.force_no_tty();
    }
    t
}

/// The table as text: two spaces between columns, trailing spaces trimmed.
pub fn table_string(mut t: Table) -> String {
    for col in t.column_iter_mut() {
        col.set_padding((0, 2));
    }
    t.trim_fmt()
}

/// Devices a job asks for, as people read it: `2x8 gpu`, `1x0.5 gpu`, `4x cpu-only`.
pub fn format_devices(tasks: u32, devices_per_task: &str, kind: &str) -> String {
    let per = devices_per_task.trim();
    if per.is_empty() || per == "0" {
        return format!("{tasks}x cpu-only");
    }
    let kind = kind.trim();
    if kind.is_empty() {
        format!("{tasks}x{per}")
    } else {
        format!("{tasks}x{per} {kind}")
    }
}

/// Device indices compactly: `[0,1,2,3,6]` is `0-3,6`.
pub fn format_indices(indices: &[u32]) -> String {
    let mut sorted = indices.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

/// A duration in at most two units: `0s`, `45s`, `5m10s`, `2h5m`, `3d4h`.
pub fn format_age(ms: u64) -> String {
    let s = ms / 1000;
    let (d, h, m, sec) = (s / 86_400, (s / 3600) % 24, (s / 60) % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{sec}s"),
        (0, 0, _) if sec == 0 => format!("{m}m"),
        (0, 0, _) => format!("{m}m{sec}s"),
        (0, _, 0) => format!("{h}h"),
        (0, _, _) => format!("{h}h{m}m"),
        (_, 0, _) => format!("{d}d"),
        _ => format!("{d}d{h}h"),
    }
}

/// Age of a timestamp (ms since the epoch) at `now_ms`; `-` for a zero (unset) timestamp.
pub fn age_since(at_ms: u64, now_ms: u64) -> String {
    if at_ms == 0 {
        "-".to_owned()
    } else {
        format_age(now_ms.saturating_sub(at_ms))
    }
}

/// RFC 3339 UTC with milliseconds; `None` for a zero (unset) timestamp.
pub fn rfc3339(at_ms: u64) -> Option<String> {
    (at_ms != 0).then(|| {
        humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(at_ms)).to_string()
    })
}

/// Milli-devices as a decimal number of devices: 2500 is `2.5`, 3000 is `3`.
pub fn format_milli(milli: u64) -> String {
    let whole = milli / 1000;
    let frac = milli % 1000;
    if frac == 0 {
        whole.to_string()
    } else {
        let s = format!("{whole}.{frac:03}");
        s.trim_end_matches('0').to_owned()
    }
}

/// Parses a number of devices (`3`, `2.5`, `0.125`) into milli-devices, exactly (no float rounding).
pub fn parse_milli_devices(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = || format!("{s:?} is not a number of devices (e.g. 4 or 2.5, at most 3 decimals)");
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    if whole.is_empty() && frac.is_empty() {
        return Err(bad());
    }
    if !whole.chars().all(|c| c.is_ascii_digit()) || !frac.chars().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    if frac.len() > 3 {
        return Err(format!(
            "{s:?} is finer than a milli-device (at most 3 decimals)"
        ));
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    let frac_milli: u64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<3}").parse().map_err(|_| bad())?
    };
    whole
        .checked_mul(1000)
        .and_then(|m| m.checked_add(frac_milli))
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// `-` for an empty string, the string otherwise.
pub fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

/// Hosts for a table cell: the first three, then `+N`.
pub fn format_hosts(hosts: &[String]) -> String {
    const SHOWN: usize = 3;
    if hosts.is_empty() {
        return "-".to_owned();
    }
    let mut s = hosts
        .iter()
        .take(SHOWN)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(",");
    if hosts.len() > SHOWN {
        s.push_str(&format!(",+{}", hosts.len() - SHOWN));
    }
    s
}

/// Bytes for people: `512 B`, `1.5 KiB`, `2.0 GiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings() {
        let cases = [
            (2, "8", "gpu", "2x8 gpu"),
            (1, "0.5", "gpu", "1x0.5 gpu"),
            (4, "0", "gpu", "4x cpu-only"),
            (3, "", "", "3x cpu-only"),
            (16, "4", "tpu", "16x4 tpu"),
            (2, "8", "", "2x8"),
        ];
        for (tasks, per, kind, want) in cases {
            assert_eq!(
                format_devices(tasks, per, kind),
                want,
                "{tasks} {per} {kind}"
            );
        }
    }

    #[test]
    fn device_indices() {
        let cases: [(&[u32], &str); 6] = [
            (&[], ""),
            (&[3], "3"),
            (&[0, 1, 2, 3], "0-3"),
            (&[0, 1, 2, 3, 6], "0-3,6"),
            (&[7, 5, 6, 0], "0,5-7"),
            (&[1, 1, 2], "1-2"),
        ];
        for (idx, want) in cases {
            assert_eq!(format_indices(idx), want, "{idx:?}");
        }
    }

    #[test]
    fn ages() {
        let cases = [
            (0, "0s"),
            (999, "0s"),
            (45_000, "45s"),
            (300_000, "5m"),
            (310_000, "5m10s"),
            (7_200_000, "2h"),
            (7_500_000, "2h5m"),
            (86_400_000, "1d"),
            (3 * 86_400_000 + 4 * 3_600_000 + 60_000, "3d4h"),
        ];
        for (ms, want) in cases {
            assert_eq!(format_age(ms), want, "{ms}");
        }
        assert_eq!(age_since(0, 5_000), "-");
        assert_eq!(age_since(1_000, 61_000), "1m");
        assert_eq!(
            age_since(9_000, 1_000),
            "0s",
            "clock skew shows 0s, not a panic"
        );
    }

    #[test]
    fn milli_devices_parse_exactly() {
        let ok = [
            ("3", 3000),
            ("2.5", 2500),
            ("0.125", 125),
            (".5", 500),
            ("4.", 4000),
            ("0", 0),
            (" 1.05 ", 1050),
            ("1000", 1_000_000),
        ];
        for (s, want) in ok {
            assert_eq!(parse_milli_devices(s), Ok(want), "{s:?}");
        }
        for bad in [
            "",
            ".",
            "-1",
            "2.5.1",
            "abc",
            "1e3",
            "0.0005",
            "2,5",
            "99999999999999999999",
        ] {
            assert!(
                parse_milli_devices(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn milli_round_trips() {
        for (milli, text) in [
            (2500, "2.5"),
            (3000, "3"),
            (1, "0.001"),
            (0, "0"),
            (1250, "1.25"),
        ] {
            assert_eq!(format_milli(milli), text);
            assert_eq!(parse_milli_devices(text), Ok(milli));
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), None);
        assert_eq!(
            rfc3339(1_700_000_000_123).as_deref(),
            Some("2023-11-14T22:13:20.123Z")
        );
    }

    #[test]
    fn host_lists_and_bytes() {
        let hosts: Vec<String> = ["a", "b", "c", "d", "e"].map(String::from).to_vec();
        assert_eq!(format_hosts(&hosts), "a,b,c,+2");
        assert_eq!(format_hosts(&hosts[..2]), "a,b");
        assert_eq!(format_hosts(&[]), "-");
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn tables_have_no_borders_or_trailing_spaces() {
        let mut t = new_table(["ID", "STATE"]);
        t.add_row(vec!["job-1", "running"]);
        t.add_row(vec!["job-22", "pending"]);
        let s = table_string(t);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(
            lines,
            ["ID      STATE", "job-1   running", "job-22  pending"]
        );
    }
}
