//! What the chaos client did and what the leader said: every operation with its outcome, and the
//! committed lease table sampled from the leader over the whole run. Checked after the run.

use crate::api::Outcome;
use gangway_proto::pb;
use std::collections::{BTreeMap, BTreeSet};

/// One client operation.
#[derive(Clone, Debug)]
pub struct Op {
    /// "submit", "cancel", "migrate".
    pub kind: &'static str,
    /// The idempotency key (submit) or the job id.
    pub target: String,
    /// CLOCK_BOOTTIME milliseconds when sent and when answered (or given up on).
    pub sent_ms: u64,
    pub done_ms: u64,
    pub outcome: Outcome,
    /// The job id a submit was answered with.
    pub job: Option<String>,
}

/// The leader's lease table at one moment.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at_ms: u64,
    pub leases: Vec<pb::LeaseInfo>,
}

/// The shape a job asked for: tasks, and whole devices per task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub tasks: u32,
    pub devices: u32,
}

/// The operations as a table, times relative to `t0` (ms), for failure reports.
pub fn describe_ops(ops: &[Op], t0: u64) -> String {
    ops.iter()
        .map(|o| {
            format!(
                "+{:>6} .. +{:>6} ms {:<8} {:<10} {}{}",
                o.sent_ms.saturating_sub(t0),
                o.done_ms.saturating_sub(t0),
                o.kind,
                o.target,
                o.outcome.label(),
                o.job
                    .as_deref()
                    .map(|j| format!(" -> {j}"))
                    .unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Checks the committed view:
/// * in one sample, no device in two leases, and none twice in one lease;
/// * each lease is its whole gang: every task index once, each with the job's device count;
/// * across samples (all reads from the leader, linearizable), the lease epoch on each device
///   never goes backwards.
pub fn lease_violations(samples: &[Sample], shapes: &BTreeMap<String, Shape>) -> Vec<String> {
    let mut out = Vec::new();
    let mut newest: BTreeMap<(String, u32), (u64, String, u64)> = BTreeMap::new();
    for s in samples {
        let mut holder: BTreeMap<(String, u32), &str> = BTreeMap::new();
        for l in &s.leases {
            let mut indices = BTreeSet::new();
            for t in &l.tasks {
                if !indices.insert(t.task) {
                    out.push(format!(
                        "at {} ms: lease of {} lists task {} twice",
                        s.at_ms, l.job_id, t.task
                    ));
                }
                for d in &t.devices {
                    let dev = (t.host.clone(), *d);
                    if let Some(other) = holder.insert(dev.clone(), &l.job_id) {
                        out.push(format!(
                            "at {} ms: device {} of {} is in the leases of {} and {}",
                            s.at_ms, d, t.host, other, l.job_id
                        ));
                    }
                    let seen = newest.entry(dev).or_insert((0, String::new(), 0));
                    if l.epoch < seen.0 {
                        out.push(format!(
                            "at {} ms: device {} of {} leased to {} under epoch {}, but epoch {} ({}) was seen there at {} ms",
                            s.at_ms, d, t.host, l.job_id, l.epoch, seen.0, seen.1, seen.2
                        ));
                    } else {
                        *seen = (l.epoch, l.job_id.clone(), s.at_ms);
                    }
                }
            }
            match shapes.get(&l.job_id) {
                None => out.push(format!(
                    "at {} ms: a lease for {}, a job the cluster does not list",
                    s.at_ms, l.job_id
                )),
                Some(shape) => {
                    let whole = indices == (0..shape.tasks).collect::<BTreeSet<u32>>()
                        && l.tasks.len() == shape.tasks as usize
                        && l.tasks
                            .iter()
                            .all(|t| t.devices.len() == shape.devices as usize);
                    if !whole {
                        out.push(format!(
                            "at {} ms: the lease of {} (epoch {}) is not its whole gang of {}x{}: {:?}",
                            s.at_ms,
                            l.job_id,
                            l.epoch,
                            shape.tasks,
                            shape.devices,
                            l.tasks
                                .iter()
                                .map(|t| (t.task, t.host.clone(), t.devices.clone()))
                                .collect::<Vec<_>>()
                        ));
                    }
                }
            }
        }
    }
    out
}

/// Checks acknowledged writes against the jobs the cluster lists after convergence:
/// * one key is one job: at most one listed job per key (job names are the keys), and every
///   answer for one key named the same job;
/// * an acknowledged submission is listed, under the id it was answered with;
/// * an acknowledged cancel left its job cancelled.
pub fn op_violations(ops: &[Op], jobs: &[pb::JobSummary]) -> Vec<String> {
    let mut out = Vec::new();
    let mut by_name: BTreeMap<&str, Vec<&pb::JobSummary>> = BTreeMap::new();
    for j in jobs {
        by_name.entry(j.name.as_str()).or_default().push(j);
    }
    for (name, list) in &by_name {
        if list.len() > 1 {
            let ids: Vec<&str> = list.iter().map(|j| j.id.as_str()).collect();
            out.push(format!(
                "submission {name} was applied {} times: jobs {ids:?}",
                list.len()
            ));
        }
    }
    let mut answered: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for op in ops.iter().filter(|o| o.kind == "submit") {
        if let (Outcome::Ok, Some(job)) = (&op.outcome, &op.job) {
            answered
                .entry(op.target.as_str())
                .or_default()
                .insert(job.as_str());
        }
    }
    for (key, ids) in &answered {
        if ids.len() > 1 {
            out.push(format!(
                "submission {key} was acknowledged as different jobs: {ids:?}"
            ));
        }
        let listed: BTreeSet<&str> = by_name
            .get(key)
            .map(|l| l.iter().map(|j| j.id.as_str()).collect())
            .unwrap_or_default();
        if !ids.iter().all(|id| listed.contains(id)) {
            out.push(format!(
                "acknowledged submission {key} (job {ids:?}) is lost: the cluster lists {listed:?}"
            ));
        }
    }
    let state: BTreeMap<&str, &str> = jobs
        .iter()
        .map(|j| (j.id.as_str(), j.state().word()))
        .collect();
    for op in ops
        .iter()
        .filter(|o| o.kind == "cancel" && o.outcome == Outcome::Ok)
    {
        let s = state.get(op.target.as_str()).copied().unwrap_or("absent");
        if s != "cancelled" {
            out.push(format!(
                "cancel of {} was acknowledged at {} ms, but the job is {s}",
                op.target, op.done_ms
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(job: &str, epoch: u64, tasks: &[(&str, &[u32])]) -> pb::LeaseInfo {
        pb::LeaseInfo {
            job_id: job.into(),
            epoch,
            granted_at_ms: 0,
            tasks: tasks
                .iter()
                .enumerate()
                .map(|(i, (host, devices))| pb::TaskLease {
                    task: i as u32,
                    host: (*host).into(),
                    devices: devices.to_vec(),
                })
                .collect(),
        }
    }

    fn sample(at_ms: u64, leases: Vec<pb::LeaseInfo>) -> Sample {
        Sample { at_ms, leases }
    }

    fn shapes() -> BTreeMap<String, Shape> {
        let s = |tasks, devices| Shape { tasks, devices };
        [("a".to_owned(), s(2, 2)), ("b".to_owned(), s(1, 1))]
            .into_iter()
            .collect()
    }

    #[test]
    fn the_committed_view_is_checked_per_sample_and_across_samples() {
        let ok = [
            sample(1, vec![lease("a", 3, &[("h1", &[0, 1]), ("h2", &[0, 1])])]),
            sample(2, vec![lease("b", 4, &[("h1", &[0])])]),
        ];
        assert!(lease_violations(&ok, &shapes()).is_empty());

        let double = [sample(
            1,
            vec![
                lease("a", 3, &[("h1", &[0, 1]), ("h2", &[0, 1])]),
                lease("b", 4, &[("h1", &[1])]),
            ],
        )];
        let v = lease_violations(&double, &shapes());
        assert!(
            v.len() == 1 && v[0].contains("in the leases of a and b"),
            "{v:?}"
        );

        let backwards = [
            sample(1, vec![lease("b", 4, &[("h1", &[0])])]),
            sample(2, vec![lease("a", 3, &[("h1", &[0, 1]), ("h2", &[0, 1])])]),
        ];
        let v = lease_violations(&backwards, &shapes());
        assert!(
            v.len() == 1 && v[0].contains("epoch 4 (b) was seen"),
            "{v:?}"
        );

        let partial = [sample(1, vec![lease("a", 3, &[("h1", &[0, 1])])])];
        let v = lease_violations(&partial, &shapes());
        assert!(v.len() == 1 && v[0].contains("not its whole gang"), "{v:?}");
    }

    fn op(kind: &'static str, target: &str, outcome: Outcome, job: Option<&str>) -> Op {
        Op {
            kind,
            target: target.into(),
            sent_ms: 0,
            done_ms: 1,
            outcome,
            job: job.map(str::to_owned),
        }
    }

    fn job(id: &str, name: &str, state: &str) -> pb::JobSummary {
        pb::JobSummary {
            id: id.into(),
            name: name.into(),
            state: pb::JobState::from_word(state).expect("a job state").into(),
            ..Default::default()
        }
    }

    #[test]
    fn acknowledged_writes_are_checked_against_the_jobs_listed() {
        let ops = [
            op("submit", "j1", Outcome::Ok, Some("j1-1")),
            op("submit", "j2", Outcome::Unknown("timeout".into()), None),
            op("cancel", "j1-1", Outcome::Ok, None),
        ];
        let fine = [job("j1-1", "j1", "cancelled")];
        assert!(
            op_violations(&ops, &fine).is_empty(),
            "an unknown submit may be absent"
        );

        let lost = [job("j2-2", "j2", "running")];
        let v = op_violations(&ops, &lost);
        assert!(v.iter().any(|m| m.contains("j1 (job")), "{v:?}");
        assert!(v.iter().any(|m| m.contains("the job is absent")), "{v:?}");

        let twice = [job("j1-1", "j1", "cancelled"), job("j1-3", "j1", "pending")];
        let v = op_violations(&ops, &twice);
        assert!(v.len() == 1 && v[0].contains("applied 2 times"), "{v:?}");

        let revived = [job("j1-1", "j1", "running")];
        let v = op_violations(&ops, &revived);
        assert!(v.len() == 1 && v[0].contains("the job is running"), "{v:?}");
    }
}
