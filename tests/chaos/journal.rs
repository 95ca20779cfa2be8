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
