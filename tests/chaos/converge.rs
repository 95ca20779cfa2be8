//! Convergence after the faults stop: what a healthy cluster must settle into once every process
//! runs again and nobody disturbs it.

use crate::api::Api;
use crate::journal::{read_runs, Run};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every condition of a settled cluster that does not hold now (empty: converged):
/// * every replica answers, all name one leader, that leader says it leads, and every replica
///   has applied the leader's commit index;
/// * every host's node is ready, with no device fenced (the nemesis returns what it failed);
/// * every job is running, pending with a reason, or finished; a running job has no migration
///   under way, and each of its tasks runs (per the journal: a live process of that job, task,
///   epoch and host) or finished by itself under that lease;
/// * every live task process holds a current lease: same job, epoch, task index and host, and
///   exactly the devices leased to it (by UUID).
pub async fn unsettled(api: &Api, hosts: &[String], journal: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut statuses = Vec::new();
    for a in &api.addrs {
        match api.status(a).await {
            Some(s) => statuses.push(s),
            None => out.push(format!("replica {a} does not answer")),
        }
    }
    let leaders: BTreeSet<u64> = statuses.iter().map(|s| s.leader_id).collect();
    let leader = statuses
        .iter()
        .find(|s| s.role == "leader" && leaders.len() == 1 && s.leader_id == s.replica_id);
    match leader {
        None => out.push(format!(
            "no single leader: {:?}",
            statuses
                .iter()
                .map(|s| (s.replica_id, s.role.clone(), s.leader_id, s.term))
                .collect::<Vec<_>>()
        )),
        Some(l) => {
            for s in &statuses {
                if s.applied_index != l.commit_index {
                    out.push(format!(
                        "replica {} applied {} of the leader's commit index {}",
                        s.replica_id, s.applied_index, l.commit_index
                    ));
                }
            }
        }
    }
    if !out.is_empty() {
        return out;
    }

    let (Some(nodes), Some(jobs), Some(leases)) =
        (api.nodes().await, api.jobs().await, api.leases().await)
    else {
        return vec!["the leader does not answer reads".into()];
    };
    for h in hosts {
        match nodes.iter().find(|n| &n.name == h) {
            Some(n) if n.state == "ready" => {
                for d in n.device_conditions.iter().filter(|d| d.fenced) {
                    out.push(format!(
                        "device {} of {h} is fenced: {}",
                        d.index, d.description
                    ));
                }
            }
            Some(n) => out.push(format!("node {h} is {} ({})", n.state, n.state_reason)),
            None => out.push(format!("node {h} is not registered")),
        }
    }

    let runs = read_runs(journal);
    let live: Vec<&Run> = runs.iter().filter(|r| r.is_alive(journal)).collect();
    for j in &jobs {
        match j.state().word() {
            "pending" if j.pending_reason.is_empty() => {
                out.push(format!("{} is pending and does not say why", j.id))
            }
            "running" => {
                let Some(d) = api.job(&j.id).await else {
                    return vec!["the leader does not answer reads".into()];
                };
                if !d.migration.is_empty() {
                    out.push(format!("{} is migrating: {}", j.id, d.migration));
                }
                for t in &d.tasks {
                    let ran = runs.iter().any(|r| {
                        r.job == j.id
                            && r.task == t.index
                            && r.epoch == j.lease_epoch
                            && r.host == t.host
                            && (live.iter().any(|l| l.file == r.file)
                                || r.ended.as_deref() == Some("done"))
                    });
                    if !ran {
                        out.push(format!(
                            "{} is running, but its task {} (epoch {}) does not run on {}",
                            j.id, t.index, j.lease_epoch, t.host
                        ));
                    }
                }
            }
            "pending" | "succeeded" | "failed" | "cancelled" => {}
            other => out.push(format!("{} is in an unknown state {other}", j.id)),
        }
    }

    // (job, epoch, task) -> (host, device UUIDs) for every current lease.
    let mut leased: BTreeMap<(String, u64, u32), (String, BTreeSet<String>)> = BTreeMap::new();
    for l in &leases {
        for t in &l.tasks {
            let uuids = t
                .devices
                .iter()
                .map(|d| format!("GPU-{}-{d}", t.host))
                .collect();
            leased.insert((l.job_id.clone(), l.epoch, t.task), (t.host.clone(), uuids));
        }
    }
    for r in &live {
        let uuids: BTreeSet<String> = r.uuids.iter().cloned().collect();
        match leased.get(&(r.job.clone(), r.epoch, r.task)) {
            Some((host, devices)) if *host == r.host && *devices == uuids => {}
            Some((host, devices)) => out.push(format!(
                "{} runs on devices {uuids:?}, but its lease gives it {devices:?} on {host}",
                r.describe()
            )),
            None => out.push(format!("{} runs without a lease", r.describe())),
        }
    }
    out
}
