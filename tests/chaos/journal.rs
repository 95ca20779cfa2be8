//! What actually ran: the journals the chaos task (tests/chaos/task.py) writes, one file per task
//! process, and the checks on them.
//!
//! Every time is CLOCK_BOOTTIME in nanoseconds, taken by the task itself, so times from different
//! processes compare. A task *provably ran* from its `start` line to its last line: each line is
//! written by the live process after it read the clock. A task killed by SIGKILL ran a little
//! past its last line (at most one step); that tail is not counted, so an overlap confined to it
//! goes unseen by the interval check. The device locks (`lock-conflict` lines) have no such blind
//! spot: the kernel holds a flock exactly as long as the process lives.

use std::collections::BTreeMap;
use std::path::Path;

/// One task process, from its journal file.
#[derive(Clone, Debug)]
pub struct Run {
    pub file: String,
    pub pid: u32,
    pub host: String,
    pub job: String,
    pub task: u32,
    pub epoch: u64,
    pub uuids: Vec<String>,
    pub resumed_step: u64,
    pub start_ns: u64,
    /// The time on the last line: the task provably ran until then.
    pub last_ns: u64,
    /// `term` or `done` when the task ended by itself; None when it is still running or was
    /// killed.
    pub ended: Option<String>,
    /// Devices whose lock another live process held when this one started.
    pub conflicts: Vec<String>,
    pub checkpoints: Vec<u64>,
}

impl Run {
    pub fn describe(&self) -> String {
        format!(
            "{} task {} epoch {} on {} (pid {}, {} .. {} ms{})",
            self.job,
            self.task,
            self.epoch,
            self.host,
            self.pid,
            self.start_ns / 1_000_000,
            self.last_ns / 1_000_000,
            self.ended
                .as_deref()
                .map(|e| format!(", ended {e}"))
                .unwrap_or_default()
        )
    }

    /// Still running: no `end` line and the process exists (and is not a zombie) with this
    /// journal's directory on its command line, so a recycled pid does not count.
    pub fn is_alive(&self, journal_dir: &Path) -> bool {
        if self.ended.is_some() {
            return false;
        }
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        // The state is the first field after the parenthesised command name.
        let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
        if state.is_none() || state == Some(Some('Z')) || state == Some(Some('X')) {
            return false;
        }
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.pid)).unwrap_or_default();
        String::from_utf8_lossy(&cmdline).contains(&*journal_dir.to_string_lossy())
    }
}

/// Every run journalled in `dir` (lock files and half-written lines are skipped).
pub fn read_runs(dir: &Path) -> Vec<Run> {
    let mut runs = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return runs;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("dev-") {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        if let Some(run) = parse(&name, &text) {
            runs.push(run);
        }
    }
    runs.sort_by_key(|r| (r.start_ns, r.pid));
    runs
}

fn parse(file: &str, text: &str) -> Option<Run> {
    let mut run: Option<Run> = None;
    // Only complete lines: a task may be writing its last one right now.
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => return None,
    };
    for line in complete.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let ns = f.get(1).and_then(|s| s.parse::<u64>().ok());
        match (f.first().copied(), ns) {
            (Some("start"), Some(ns)) if f.len() == 9 => {
                run = Some(Run {
                    file: file.to_owned(),
                    pid: f[2].parse().ok()?,
                    host: f[3].to_owned(),
                    job: f[4].to_owned(),
                    task: f[5].parse().ok()?,
                    epoch: f[6].parse().ok()?,
                    uuids: if f[7] == "-" {
                        Vec::new()
                    } else {
                        f[7].split(',').map(str::to_owned).collect()
                    },
                    resumed_step: f[8].parse().ok()?,
                    start_ns: ns,
                    last_ns: ns,
                    ended: None,
                    conflicts: Vec::new(),
                    checkpoints: Vec::new(),
                });
            }
            (Some(kind), Some(ns)) => {
                let r = run.as_mut()?;
                r.last_ns = r.last_ns.max(ns);
                match kind {
                    "lock-conflict" => r.conflicts.extend(f.get(2).map(|s| (*s).to_owned())),
                    "ckpt" => r
                        .checkpoints
                        .extend(f.get(2).and_then(|s| s.parse::<u64>().ok())),
                    "end" => r.ended = f.get(2).map(|s| (*s).to_owned()),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    run
}

/// The ground-truth mutual exclusion check: no device used by two live processes at one instant.
/// Two kinds of evidence, each a violation on its own:
/// * a `lock-conflict` line (the kernel's word: the other process was alive);
/// * two runs on one device whose proven-running intervals overlap.
///
/// Also: on one device, a run that starts after another must not carry an older lease epoch
/// (the worker fences directives older than a device's newest epoch); and one task of one lease
/// (job, task, epoch) is one process: a finished task is never launched again.
pub fn device_violations(runs: &[Run]) -> Vec<String> {
    let mut out = Vec::new();
    let mut launches: BTreeMap<(&str, u32, u64), Vec<&Run>> = BTreeMap::new();
    for r in runs {
        launches
            .entry((r.job.as_str(), r.task, r.epoch))
            .or_default()
            .push(r);
    }
    for list in launches.values().filter(|l| l.len() > 1) {
        let all: Vec<String> = list.iter().map(|r| r.describe()).collect();
        out.push(format!(
            "one task of one lease was launched {} times: {}",
            list.len(),
            all.join("; ")
        ));
    }
    for r in runs {
        for uuid in &r.conflicts {
            out.push(format!(
                "device {uuid}: {} started while another live process held the device",
                r.describe()
            ));
        }
    }
    let mut by_device: BTreeMap<&str, Vec<&Run>> = BTreeMap::new();
    for r in runs {
        for u in &r.uuids {
            by_device.entry(u.as_str()).or_default().push(r);
        }
    }
    for (uuid, list) in by_device {
        // `runs` is sorted by start, so each list is too.
        for (i, a) in list.iter().enumerate() {
            for b in &list[i + 1..] {
                if b.start_ns < a.last_ns {
                    out.push(format!(
                        "device {uuid}: two tasks ran at once for at least {:.1} ms: {} and {}",
                        (a.last_ns.min(b.last_ns) - b.start_ns) as f64 / 1e6,
                        a.describe(),
                        b.describe()
                    ));
                }
                if b.epoch < a.epoch {
                    out.push(format!(
                        "device {uuid}: lease epoch went backwards: {} started after {}",
                        b.describe(),
                        a.describe()
                    ));
                }
            }
        }
    }
    out
}

/// What [`fence_violations`] found.
#[derive(Debug, Default)]
pub struct FenceCheck {
    pub violations: Vec<String>,
    /// Launches on a device after its fence of a lease granted before it (the fence revoked
    /// that lease; the worker had its directive already): not violations, counted.
    pub raced: Vec<String>,
    /// Task processes that started on a device at some time fenced, at any time.
    pub on_fenced_devices: usize,
}

/// No task is launched on a device after the device was fenced, and no lease is granted on it:
/// each fence `(uuid, since)` with the last time it was seen still fenced (`fences`, see
/// `client::Fences`) is compared with what actually ran (the journals: each process's devices
/// and start time) and with the leases the leader listed (`leases`: job, epoch, host, device
/// indices, granted at). A launch inside a fence is a violation unless its lease was granted
/// before the fence (`granted`: (job, epoch) -> Unix ms). `unix_minus_boot_ms` converts the log's
/// Unix times to the journals' CLOCK_BOOTTIME.
pub fn fence_violations(
    runs: &[Run],
    fences: &BTreeMap<(String, u64), u64>,
    leases: &[(String, u64, String, Vec<u32>, u64)],
    granted: &BTreeMap<(String, u64), u64>,
    unix_minus_boot_ms: i64,
) -> FenceCheck {
    let mut out = FenceCheck::default();
    let to_boot = |unix_ms: u64| (unix_ms as i64 - unix_minus_boot_ms).max(0) as u64;
    let fenced_devices: std::collections::BTreeSet<&str> =
        fences.keys().map(|(u, _)| u.as_str()).collect();
    for r in runs {
        if r.uuids.iter().any(|u| fenced_devices.contains(u.as_str())) {
            out.on_fenced_devices += 1;
        }
        let start_ms = r.start_ns as f64 / 1e6;
        for u in &r.uuids {
            for ((_, since), last) in fences.range((u.clone(), 0)..=(u.clone(), u64::MAX)) {
                let from = to_boot(*since) as f64;
                if !(start_ms > from && start_ms <= *last as f64) {
                    continue;
                }
                let grant = granted.get(&(r.job.clone(), r.epoch));
                let what = format!(
                    "device {u}: {} started {:.1} ms after the device was fenced (at {since}, Unix \
                     ms; its lease granted at {})",
                    r.describe(),
                    start_ms - from,
                    grant.map_or_else(|| "an unknown time".to_owned(), |g| g.to_string())
                );
                if grant.is_some_and(|g| g <= since) {
                    out.raced.push(what);
                } else {
                    out.violations.push(what);
                }
            }
        }
    }
    for (job, epoch, host, devices, granted_at) in leases {
        for d in devices {
            let u = format!("GPU-{host}-{d}");
            for ((_, since), last) in fences.range((u.clone(), 0)..=(u.clone(), u64::MAX)) {
                if granted_at > since && to_boot(*granted_at) <= *last {
                    out.violations.push(format!(
                        "device {u}: lease {job} epoch {epoch} granted at {granted_at} on it while \
                         it was fenced (since {since})"
                    ));
                }
            }
        }
    }
    out
}

/// Restores resume from real checkpoints, and never from an older one than a previous restore of
/// the same job: a run that resumed at step S > 0 follows a run of that job whose rank 0 journalled
/// a checkpoint at S, and later epochs of a job never resume below S.
pub fn restore_violations(runs: &[Run]) -> Vec<String> {
    let mut out = Vec::new();
    let mut by_job: BTreeMap<&str, Vec<&Run>> = BTreeMap::new();
    for r in runs {
        by_job.entry(r.job.as_str()).or_default().push(r);
    }
    for list in by_job.values_mut() {
        list.sort_by_key(|r| (r.epoch, r.start_ns));
        let mut floor: Option<&Run> = None;
        for (i, r) in list.iter().enumerate() {
            if r.resumed_step > 0 {
                let written = list[..i]
                    .iter()
                    .chain(list[i + 1..].iter())
                    .any(|o| o.start_ns < r.start_ns && o.checkpoints.contains(&r.resumed_step));
                if !written {
                    out.push(format!(
                        "{} resumed at step {}, a checkpoint no earlier run of the job wrote",
                        r.describe(),
                        r.resumed_step
                    ));
                }
            }
            if let Some(f) = floor {
                if r.epoch > f.epoch && r.resumed_step < f.resumed_step {
                    out.push(format!(
                        "{} resumed at step {}, behind {} which had resumed at step {}",
                        r.describe(),
                        r.resumed_step,
                        f.describe(),
                        f.resumed_step
                    ));
                }
            }
            if floor.is_none_or(|f| r.resumed_step >= f.resumed_step) {
                floor = Some(r);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(job: &str, epoch: u64, uuids: &str, from_ms: u64, to_ms: u64) -> Run {
        let ns = |ms: u64| ms * 1_000_000;
        let text = format!(
            "start {} 7 h1 {job} 0 {epoch} {uuids} 0\ntick {} 1\nend {} term\n",
            ns(from_ms),
            ns(from_ms + 1),
            ns(to_ms)
        );
        parse(&format!("{job}.e{epoch}"), &text).expect("parses")
    }

    #[test]
    fn a_journal_parses_and_a_torn_last_line_is_ignored() {
        let text = "start 1000 42 h2 j1-1 1 5 GPU-h2-0,GPU-h2-3 12\nlock-conflict 1001 GPU-h2-3\nckpt 1500 13\ntick 2000 13\ntick 30";
        let r = parse("f", text).expect("parses");
        assert_eq!((r.pid, r.host.as_str(), r.job.as_str()), (42, "h2", "j1-1"));
        assert_eq!((r.task, r.epoch, r.resumed_step), (1, 5, 12));
        assert_eq!(r.uuids, ["GPU-h2-0", "GPU-h2-3"]);
        assert_eq!(
            (r.start_ns, r.last_ns),
            (1000, 2000),
            "the torn line is not counted"
        );
        assert_eq!(r.conflicts, ["GPU-h2-3"]);
        assert_eq!(r.checkpoints, [13]);
        assert_eq!(r.ended, None);
        assert!(parse("f", "tick 5 1\n").is_none(), "no start line, no run");
    }

    #[test]
    fn a_device_handed_over_in_turn_is_fine_and_shared_or_refenced_is_not() {
        let handover = [
            run("a", 1, "GPU-h1-0", 0, 100),
            run("b", 2, "GPU-h1-0", 101, 200),
        ];
        assert!(device_violations(&handover).is_empty());

        let shared = [
            run("a", 1, "GPU-h1-0", 0, 100),
            run("b", 2, "GPU-h1-0", 90, 200),
        ];
        let v = device_violations(&shared);
        assert!(
            v.len() == 1 && v[0].contains("two tasks ran at once"),
            "{v:?}"
        );

        let older = [
            run("a", 3, "GPU-h1-0", 0, 100),
            run("b", 2, "GPU-h1-0", 150, 200),
        ];
        let v = device_violations(&older);
        assert!(
            v.len() == 1 && v[0].contains("epoch went backwards"),
            "{v:?}"
        );

        let twice = [
            run("a", 3, "GPU-h1-0", 0, 100),
            run("a", 3, "GPU-h1-1", 150, 200),
        ];
        let v = device_violations(&twice);
        assert!(v.len() == 1 && v[0].contains("launched 2 times"), "{v:?}");

        let mut conflict = run("b", 2, "GPU-h1-0", 101, 200);
        conflict.conflicts.push("GPU-h1-0".into());
        let v = device_violations(&[conflict]);
        assert!(
            v.len() == 1 && v[0].contains("another live process"),
            "{v:?}"
        );
    }

    #[test]
    fn a_launch_inside_a_fence_is_a_violation_unless_its_lease_came_first() {
        // Unix = boot + 1_000_000 ms. GPU-h1-0 fenced at boot 150 ms, seen fenced until 300.
        let offset = 1_000_000;
        let fences = BTreeMap::from([(("GPU-h1-0".to_owned(), 1_000_150), 300)]);
        let before = run("a", 1, "GPU-h1-0", 0, 100);
        let after = run("b", 3, "GPU-h1-0", 400, 500);
        let inside = run("c", 2, "GPU-h1-0", 200, 250);
        let elsewhere = run("d", 4, "GPU-h1-1", 200, 250);
        let granted = BTreeMap::from([(("c".to_owned(), 2), 1_000_160)]);
        let check = |runs: &[Run], granted: &BTreeMap<(String, u64), u64>| {
            fence_violations(runs, &fences, &[], granted, offset)
        };
        let ok = check(&[before.clone(), after.clone(), elsewhere], &granted);
        assert!(ok.violations.is_empty() && ok.raced.is_empty(), "{ok:?}");
        assert_eq!(ok.on_fenced_devices, 2);
        let bad = check(std::slice::from_ref(&inside), &granted);
        assert!(
            bad.violations.len() == 1 && bad.violations[0].contains("after the device was fenced"),
            "{bad:?}"
        );
        let unknown = check(std::slice::from_ref(&inside), &BTreeMap::new());
        assert_eq!(unknown.violations.len(), 1, "{unknown:?}");
        let earlier = BTreeMap::from([(("c".to_owned(), 2), 1_000_140)]);
        let raced = check(&[inside], &earlier);
        assert!(
            raced.violations.is_empty() && raced.raced.len() == 1,
            "{raced:?}"
        );

        let leases = [
            ("e".to_owned(), 5, "h1".to_owned(), vec![0], 1_000_200),
            ("f".to_owned(), 6, "h1".to_owned(), vec![0], 1_000_400),
            ("g".to_owned(), 7, "h1".to_owned(), vec![1], 1_000_200),
        ];
        let v = fence_violations(&[], &fences, &leases, &BTreeMap::new(), offset);
        assert!(
            v.violations.len() == 1 && v.violations[0].contains("lease e epoch 5"),
            "{v:?}"
        );
    }

    #[test]
    fn a_restore_must_come_from_a_written_checkpoint_and_never_go_back() {
        let mut first = run("a", 1, "GPU-h1-0", 0, 100);
        first.checkpoints = vec![40, 80];
        let mut second = run("a", 2, "GPU-h1-1", 200, 300);
        second.resumed_step = 80;
        assert!(restore_violations(&[first.clone(), second.clone()]).is_empty());

        let mut invented = second.clone();
        invented.resumed_step = 90;
        let v = restore_violations(&[first.clone(), invented]);
        assert!(v.len() == 1 && v[0].contains("no earlier run"), "{v:?}");

        let mut behind = run("a", 3, "GPU-h1-2", 400, 500);
        behind.resumed_step = 40;
        let v = restore_violations(&[first, second, behind]);
        assert!(v.len() == 1 && v[0].contains("behind"), "{v:?}");
    }
}
