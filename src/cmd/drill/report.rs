//! What a drill found: the lease comparison (pure, table-tested) and the report people and scripts
//! read.
//!
//! The comparison is the drill's verdict on the invariants a failover must keep: every lease that
//! existed before still exists under the same epoch unless its job ended, no device is held beyond
//! its capacity by two leases, and no job's tasks were started again.

use super::super::output::parse_milli_devices;
use gangway_proto::pb;
use serde::Serialize;
use std::collections::BTreeMap;

/// Names of the jobs a drill submits; they are left out of the lease comparison.
pub const PROBE_PREFIX: &str = "drill-probe-";

/// One job as the leader listed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobRec {
    pub state: String,
    /// Placements so far; it rises each time the job's tasks are started again.
    pub attempts: u32,
    /// Milli-devices each leased device gives this job (1000 for whole devices).
    pub milli_per_device: u64,
}

/// One lease as the leader listed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRec {
    pub epoch: u64,
    /// (host, device index) of every device the lease holds.
    pub devices: Vec<(String, u32)>,
}

/// The cluster's jobs and leases at one moment (probe jobs excluded).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseSnapshot {
    pub jobs: BTreeMap<String, JobRec>,
    pub leases: BTreeMap<String, LeaseRec>,
}

/// The milli-devices a job's `devices_per_task` gives each device it holds: a fraction shares one
/// device, a whole number takes each device whole.
fn milli_per_device(devices_per_task: &str) -> u64 {
    match parse_milli_devices(devices_per_task) {
        Ok(m) if m > 0 && m < 1000 => m,
        _ => 1000,
    }
}

impl LeaseSnapshot {
    pub fn from_lists(jobs: &[pb::JobSummary], leases: &[pb::LeaseInfo]) -> Self {
        let is_probe = |id: &str| {
            jobs.iter()
                .any(|j| j.id == id && j.name.starts_with(PROBE_PREFIX))
        };
        Self {
            jobs: jobs
                .iter()
                .filter(|j| !j.name.starts_with(PROBE_PREFIX))
                .map(|j| {
                    (
                        j.id.clone(),
                        JobRec {
                            state: j.state().word().to_owned(),
                            attempts: j.attempts,
                            milli_per_device: milli_per_device(&j.devices_per_task),
                        },
                    )
                })
                .collect(),
            leases: leases
                .iter()
                .filter(|l| !is_probe(&l.job_id))
                .map(|l| {
                    let devices = l
                        .tasks
                        .iter()
                        .flat_map(|t| t.devices.iter().map(|d| (t.host.clone(), *d)))
                        .collect();
                    (
                        l.job_id.clone(),
                        LeaseRec {
                            epoch: l.epoch,
                            devices,
                        },
                    )
                })
                .collect(),
        }
    }
}

/// A lease that existed before the drill and is gone although its job did not end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LostLease {
    pub job: String,
    pub epoch: u64,
    /// What became of it, in words.
    pub now: String,
}

/// A job whose tasks were started again during the drill.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Restart {
    pub job: String,
    pub epoch_before: u64,
    /// 0 when the job holds no lease now.
    pub epoch_after: u64,
    pub attempts_before: u32,
    pub attempts_after: u32,
}

/// A device held by more leases than it has room for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DuplicateDevice {
    pub host: String,
    pub device: u32,
    pub jobs: Vec<String>,
}

/// The before/after comparison.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LeaseCheck {
    /// Leases held before the drill.
    pub before: u32,
    /// Still held under the same epoch.
    pub kept: u32,
    /// Jobs whose lease ended because the job itself ended (succeeded, failed, cancelled).
    pub ended: Vec<String>,
    pub lost: Vec<LostLease>,
    pub duplicated: Vec<DuplicateDevice>,
    pub restarted: Vec<Restart>,
}

fn terminal(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "cancelled")
}

/// Compares the leases and jobs before and after a drill.
pub fn compare(before: &LeaseSnapshot, after: &LeaseSnapshot) -> LeaseCheck {
    let mut check = LeaseCheck {
        before: before.leases.len() as u32,
        ..LeaseCheck::default()
    };
    for (job, lease) in &before.leases {
        let now_job = after.jobs.get(job);
        let now_lease = after.leases.get(job);
        match (now_job, now_lease) {
            (_, Some(l)) if l.epoch == lease.epoch => check.kept += 1,
            (Some(j), None) if terminal(&j.state) => check.ended.push(job.clone()),
            (None, _) => check.lost.push(LostLease {
                job: job.clone(),
                epoch: lease.epoch,
                now: "the job is no longer listed".to_owned(),
            }),
            (Some(j), l) => check.lost.push(LostLease {
                job: job.clone(),
                epoch: lease.epoch,
                now: match l {
                    Some(l) => format!("re-leased under epoch {}", l.epoch),
                    None => format!("no lease, job {}", j.state),
                },
            }),
        }
        let attempts_before = before.jobs.get(job).map_or(0, |j| j.attempts);
        let attempts_after = now_job.map_or(attempts_before, |j| j.attempts);
        let epoch_after = now_lease.map_or(0, |l| l.epoch);
        if attempts_after > attempts_before || epoch_after > lease.epoch {
            check.restarted.push(Restart {
                job: job.clone(),
                epoch_before: lease.epoch,
                epoch_after,
                attempts_before,
                attempts_after,
            });
        }
    }
    // Every device's holders after the drill: more than 1000 milli-devices on one device means two
    // leases hold it (fractional jobs may share a device within its capacity).
    let mut holders: BTreeMap<(&str, u32), Vec<(&str, u64)>> = BTreeMap::new();
    for (job, lease) in &after.leases {
        let milli = after.jobs.get(job).map_or(1000, |j| j.milli_per_device);
        for (host, device) in &lease.devices {
            let list = holders.entry((host.as_str(), *device)).or_default();
            if !list.iter().any(|(j, _)| j == job) {
                list.push((job.as_str(), milli));
            }
        }
    }
    for ((host, device), jobs) in holders {
        if jobs.len() > 1 && jobs.iter().map(|(_, m)| m).sum::<u64>() > 1000 {
            check.duplicated.push(DuplicateDevice {
                host: host.to_owned(),
                device,
                jobs: jobs.iter().map(|(j, _)| (*j).to_owned()).collect(),
            });
        }
    }
    check
}

/// Probe writes made during the drill.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WriteStats {
    /// Writes (probe submits and cancels) the cluster acknowledged.
    pub acknowledged: u32,
    /// Of those, how many needed more than one attempt.
    pub retried: u32,
    /// Attempts that failed (timeouts, no leader, unknown outcomes) and were tried again.
    pub failed_attempts: u32,
    /// Writes still not acknowledged when the drill ended.
    pub unacknowledged: u32,
    /// Probe jobs created more than once for one idempotency key (must be 0).
    pub duplicate_jobs: u32,
}

/// One moment of the drill, for the timeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Milliseconds since the fault was injected (negative before it).
    pub at_ms: i64,
    pub what: String,
}

/// `gangway drill ... -o json`: the whole report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DrillReport {
    /// `transfer-leader`, `kill-leader` or `partition-leader`.
    pub drill: String,
    pub old_leader: u64,
    pub old_leader_address: String,
    pub term_before: u64,
    /// The replica that leads after the fault; null when none was elected in time.
    pub new_leader: Option<u64>,
    pub term_after: Option<u64>,
    /// kill-leader: the crashed leader was restarted and led again before another replica took
    /// over (a supervisor faster than the election timeout); `new_leader` is then the old one.
    pub old_leader_resumed: bool,
    /// partition-leader: how long the leader was cut off.
    pub partition_ms: Option<u64>,
    /// From the fault to a new leader (a replica leading in a newer term), as first seen by the
    /// drill, which asks the replicas every [`super::LEADER_POLL`].
    pub time_to_new_leader_ms: Option<u64>,
    /// From the fault to the placement of a probe job submitted after it.
    pub time_to_first_placement_ms: Option<u64>,
    /// A probe's placement time before the fault, for comparison.
    pub baseline_placement_ms: Option<u64>,
    /// Why placement was not measured (no node can run the probe), when it was not.
    pub placement_note: Option<String>,
    /// From the end of the fault (heal, restart, transfer) to the old leader following the new
    /// one with everything applied.
    pub old_leader_back_ms: Option<u64>,
    pub writes: WriteStats,
    pub leases_before: u32,
    pub leases_kept: u32,
    pub leases_lost: u32,
    pub leases_duplicated: u32,
    pub tasks_restarted: u32,
    pub jobs_ended: Vec<String>,
    pub lost_leases: Vec<LostLease>,
    pub duplicated_devices: Vec<DuplicateDevice>,
    pub restarted_jobs: Vec<Restart>,
    /// A new leader was elected, a probe placed (when measurable) and the old leader is back,
    /// each within --timeout.
    pub recovered: bool,
    /// Recovered, with no lease lost or duplicated, no task restarted and no write left
    /// unacknowledged.
    pub passed: bool,
    /// Why it did not pass, one sentence each.
    pub problems: Vec<String>,
    pub timeline: Vec<Event>,
}

impl DrillReport {
    /// Fills the lease fields from a comparison.
    pub fn set_leases(&mut self, check: LeaseCheck) {
        self.leases_before = check.before;
        self.leases_kept = check.kept;
        self.leases_lost = check.lost.len() as u32;
        self.leases_duplicated = check.duplicated.len() as u32;
        self.tasks_restarted = check.restarted.len() as u32;
        self.jobs_ended = check.ended;
        self.lost_leases = check.lost;
        self.duplicated_devices = check.duplicated;
        self.restarted_jobs = check.restarted;
    }

    /// Settles `passed` and adds the problems that the numbers show (recovery problems are added
    /// while the drill runs).
    pub fn judge(&mut self) {
        let mut add = |cond: bool, s: String| {
            if cond {
                self.problems.push(s);
            }
        };
        add(
            self.leases_lost > 0,
            format!(
                "{} lease(s) lost: {}",
                self.leases_lost,
                self.lost_leases
                    .iter()
                    .map(|l| format!("{} (epoch {}: {})", l.job, l.epoch, l.now))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        add(
            self.leases_duplicated > 0,
            format!(
                "{} device(s) in two leases: {}",
                self.leases_duplicated,
                self.duplicated_devices
                    .iter()
                    .map(|d| format!("{} #{} ({})", d.host, d.device, d.jobs.join(", ")))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        add(
            self.tasks_restarted > 0,
            format!(
                "{} job(s) had their tasks restarted: {}",
                self.tasks_restarted,
                self.restarted_jobs
                    .iter()
                    .map(|r| r.job.clone())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        add(
            self.writes.unacknowledged > 0,
            format!(
                "{} probe write(s) were never acknowledged",
                self.writes.unacknowledged
            ),
        );
        add(
            self.writes.duplicate_jobs > 0,
            format!(
                "{} probe job(s) were created twice for one idempotency key",
                self.writes.duplicate_jobs
            ),
        );
        self.passed = self.recovered && self.problems.is_empty();
    }
}

/// Milliseconds as people read a failover: `850ms`, `1.25s`, `2m3s`.
pub fn format_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.2}s", ms as f64 / 1000.0)
    } else {
        format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

/// The report as text.
pub fn report_text(r: &DrillReport) -> String {
    let opt = |v: Option<u64>, none: &str| v.map_or_else(|| none.to_owned(), format_ms);
    let mut lines: Vec<(String, String)> = Vec::new();
    let what = match r.partition_ms {
        Some(ms) => format!("{} (cut off for {})", r.drill, format_ms(ms)),
        None => r.drill.clone(),
    };
    lines.push(("Drill".into(), what));
    lines.push((
        "Old leader".into(),
        format!(
            "replica {} ({}), term {}",
            r.old_leader, r.old_leader_address, r.term_before
        ),
    ));
    lines.push((
        "New leader".into(),
        match (r.new_leader, r.time_to_new_leader_ms) {
            (Some(id), Some(ms)) if r.old_leader_resumed => format!(
                "replica {id} again after {}: restarted and leading (term {}) before another took over",
                format_ms(ms),
                r.term_after.unwrap_or(0)
            ),
            (Some(id), Some(ms)) => format!(
                "replica {id} after {} (term {})",
                format_ms(ms),
                r.term_after.unwrap_or(0)
            ),
            _ => "none elected in time".into(),
        },
    ));
    lines.push((
        "First new placement".into(),
        match (&r.placement_note, r.time_to_first_placement_ms) {
            (Some(note), _) => format!("not measured: {note}"),
            (None, Some(ms)) => format!(
                "{} after the fault (baseline {})",
                format_ms(ms),
                opt(r.baseline_placement_ms, "-")
            ),
            (None, None) => "no probe placed in time".into(),
        },
    ));
    lines.push((
        "Old leader back".into(),
        match r.old_leader_back_ms {
            Some(ms) => format!("{} after the fault ended", format_ms(ms)),
            None => "not back in time".into(),
        },
    ));
    let w = &r.writes;
    lines.push((
        "Probe writes".into(),
        format!(
            "{} acknowledged, {} retried ({} failed attempts), {} unacknowledged, {} duplicate jobs",
            w.acknowledged, w.retried, w.failed_attempts, w.unacknowledged, w.duplicate_jobs
        ),
    ));
    lines.push((
        "Leases".into(),
        format!(
            "{} before: {} kept, {} ended with their job, {} lost, {} duplicated",
            r.leases_before,
            r.leases_kept,
            r.jobs_ended.len(),
            r.leases_lost,
            r.leases_duplicated
        ),
    ));
    lines.push(("Tasks restarted".into(), r.tasks_restarted.to_string()));
    lines.push((
        "Result".into(),
        if r.passed { "PASS" } else { "FAIL" }.to_owned(),
    ));
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 2;
    let mut out: Vec<String> = lines
        .iter()
        .map(|(k, v)| format!("{:<width$}{v}", format!("{k}:")))
        .collect();
    for p in &r.problems {
        out.push(format!("  - {p}"));
    }
    if !r.timeline.is_empty() {
        out.push(String::new());
        out.push("Timeline (from the fault):".into());
        for e in &r.timeline {
            let at = if e.at_ms < 0 {
                format!("-{}", format_ms(e.at_ms.unsigned_abs()))
            } else {
                format!("+{}", format_ms(e.at_ms as u64))
            };
            out.push(format!("  {at:>8}  {}", e.what));
        }
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(state: &str, attempts: u32) -> JobRec {
        JobRec {
            state: state.into(),
            attempts,
            milli_per_device: 1000,
        }
    }

    fn lease(epoch: u64, devices: &[(&str, u32)]) -> LeaseRec {
        LeaseRec {
            epoch,
            devices: devices.iter().map(|(h, d)| ((*h).to_owned(), *d)).collect(),
        }
    }

    fn snap(jobs: Vec<(&str, JobRec)>, leases: Vec<(&str, LeaseRec)>) -> LeaseSnapshot {
        LeaseSnapshot {
            jobs: jobs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            leases: leases.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        }
    }

    /// (case, before, after, kept, ended, lost, duplicated, restarted)
    type Case = (
        &'static str,
        LeaseSnapshot,
        LeaseSnapshot,
        u32,
        usize,
        usize,
        usize,
        usize,
    );

    #[test]
    fn lease_comparison_counts_what_a_failover_must_not_do() {
        let a0 = ("a", lease(3, &[("h1", 0), ("h1", 1)]));
        let running = ("a", job("running", 1));
        let cases: Vec<Case> = vec![
            (
                "nothing changed",
                snap(vec![running.clone()], vec![a0.clone()]),
                snap(vec![running.clone()], vec![a0.clone()]),
                1,
                0,
                0,
                0,
                0,
            ),
            (
                "the job finished: its lease ended legitimately",
                snap(vec![running.clone()], vec![a0.clone()]),
                snap(vec![("a", job("succeeded", 1))], vec![]),
                0,
                1,
                0,
                0,
                0,
            ),
            (
                "the lease was revoked and the job waits again",
                snap(vec![running.clone()], vec![a0.clone()]),
                snap(vec![("a", job("pending", 1))], vec![]),
                0,
                0,
                1,
                0,
                0,
            ),
            (
                "re-leased under a new epoch: lost and restarted",
                snap(vec![running.clone()], vec![a0.clone()]),
                snap(
                    vec![("a", job("running", 2))],
                    vec![("a", lease(4, &[("h2", 0), ("h2", 1)]))],
                ),
                0,
                0,
                1,
                0,
                1,
            ),
            (
                "the job vanished",
                snap(vec![running.clone()], vec![a0.clone()]),
                snap(vec![], vec![]),
                0,
                0,
                1,
                0,
                0,
            ),
            (
                "a new job placed during the drill is not a restart",
                snap(
                    vec![running.clone(), ("b", job("pending", 0))],
                    vec![a0.clone()],
                ),
                snap(
                    vec![running.clone(), ("b", job("running", 1))],
                    vec![a0.clone(), ("b", lease(5, &[("h2", 0)]))],
                ),
                1,
                0,
                0,
                0,
                0,
            ),
            (
                "a device in two whole-device leases",
                snap(vec![running.clone()], vec![a0.clone()]),
                snap(
                    vec![running.clone(), ("b", job("running", 1))],
                    vec![a0.clone(), ("b", lease(5, &[("h1", 1), ("h1", 2)]))],
                ),
                1,
                0,
                0,
                1,
                0,
            ),
            (
                "two half-device jobs share a device within its capacity",
                snap(vec![], vec![]),
                snap(
                    vec![
                        (
                            "x",
                            JobRec {
                                milli_per_device: 500,
                                ..job("running", 1)
                            },
                        ),
                        (
                            "y",
                            JobRec {
                                milli_per_device: 500,
                                ..job("running", 1)
                            },
                        ),
                    ],
                    vec![("x", lease(1, &[("h1", 7)])), ("y", lease(2, &[("h1", 7)]))],
                ),
                0,
                0,
                0,
                0,
                0,
            ),
            (
                "a half-device job beside a whole-device one is a duplicate",
                snap(vec![], vec![]),
                snap(
                    vec![
                        (
                            "x",
                            JobRec {
                                milli_per_device: 500,
                                ..job("running", 1)
                            },
                        ),
                        ("y", job("running", 1)),
                    ],
                    vec![("x", lease(1, &[("h1", 7)])), ("y", lease(2, &[("h1", 7)]))],
                ),
                0,
                0,
                0,
                1,
                0,
            ),
            (
                "restarted under the same lease epoch still counts (attempts rose)",
                snap(vec![running.clone()], vec![a0.clone()]),
                snap(vec![("a", job("running", 2))], vec![a0.clone()]),
                1,
                0,
                0,
                0,
                1,
            ),
        ];
        for (name, before, after, kept, ended, lost, duplicated, restarted) in cases {
            let c = compare(&before, &after);
            assert_eq!(c.before, before.leases.len() as u32, "{name}");
            assert_eq!(c.kept, kept, "{name}: kept");
            assert_eq!(c.ended.len(), ended, "{name}: ended");
            assert_eq!(c.lost.len(), lost, "{name}: lost {:?}", c.lost);
            assert_eq!(c.duplicated.len(), duplicated, "{name}: duplicated");
            assert_eq!(c.restarted.len(), restarted, "{name}: restarted");
        }
    }

    #[test]
    fn probes_are_left_out_and_fractions_share_devices() {
        let summary = |id: &str, name: &str, per: &str| pb::JobSummary {
            id: id.into(),
            name: name.into(),
            state: pb::JobState::Running.into(),
            devices_per_task: per.into(),
            attempts: 1,
            ..Default::default()
        };
        let jobs = vec![
            summary("j1", "train", "8"),
            summary("j2", "notebook", "0.25"),
            summary("j3", "drill-probe-ab12-1", "0"),
        ];
        let leases = vec![
            pb::LeaseInfo {
                job_id: "j2".into(),
                epoch: 2,
                tasks: vec![pb::TaskLease {
                    task: 0,
                    host: "h1".into(),
                    devices: vec![3],
                }],
                ..Default::default()
            },
            pb::LeaseInfo {
                job_id: "j3".into(),
                epoch: 3,
                ..Default::default()
            },
        ];
        let s = LeaseSnapshot::from_lists(&jobs, &leases);
        assert_eq!(s.jobs.keys().collect::<Vec<_>>(), ["j1", "j2"]);
        assert_eq!(s.jobs["j2"].milli_per_device, 250);
        assert_eq!(s.jobs["j1"].milli_per_device, 1000);
        assert_eq!(s.leases.keys().collect::<Vec<_>>(), ["j2"]);
        assert_eq!(s.leases["j2"].devices, [("h1".to_owned(), 3)]);
    }

    #[test]
    fn the_verdict_needs_recovery_and_clean_numbers() {
        let mut r = DrillReport {
            recovered: true,
            ..Default::default()
        };
        r.judge();
        assert!(r.passed && r.problems.is_empty());

        let mut r = DrillReport {
            recovered: true,
            ..Default::default()
        };
        r.set_leases(LeaseCheck {
            before: 1,
            lost: vec![LostLease {
                job: "a".into(),
                epoch: 3,
                now: "no lease, job pending".into(),
            }],
            ..Default::default()
        });
        r.writes.unacknowledged = 1;
        r.judge();
        assert!(!r.passed);
        assert_eq!(r.problems.len(), 2, "{:?}", r.problems);
        assert!(r.problems[0].contains("a (epoch 3"), "{:?}", r.problems);

        let mut r = DrillReport::default();
        r.judge();
        assert!(!r.passed, "not recovered is never a pass");
    }

    #[test]
    fn durations_read_like_a_failover() {
        assert_eq!(format_ms(850), "850ms");
        assert_eq!(format_ms(1250), "1.25s");
        assert_eq!(format_ms(123_000), "2m3s");
    }
}
