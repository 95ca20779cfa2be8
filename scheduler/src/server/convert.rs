//! From the replicated state to the wire: the protobuf messages the client and worker APIs return.
//!
//! Pure functions of a [`ClusterStore`], so every replica renders the same state the same way and the
//! tests can check the rendering without a server.

use super::error::ApiError;
use crate::engine::{NodeState, MILLI_PER_DEVICE};
use crate::state::{
    Allocation, ClusterStore, DeviceHealth, JobRecord, JobState, NodeRecord, RunRecord, TaskState,
};
use gangway_proto::pb;
use gangway_proto::spec::DeviceCount;
use std::collections::BTreeMap;

/// Devices per task as people write them: "8", "0.5", "0".
pub fn devices_per_task(d: DeviceCount) -> String {
    match d {
        DeviceCount::None => "0".to_owned(),
        DeviceCount::Whole(n) => n.to_string(),
        DeviceCount::Fraction(m) => {
            let s = format!("{:.3}", f64::from(m) / f64::from(MILLI_PER_DEVICE));
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        }
    }
}

pub fn task_state(s: TaskState) -> pb::TaskState {
    match s {
        TaskState::Assigned => pb::TaskState::Assigned,
        TaskState::Running => pb::TaskState::Running,
        TaskState::Succeeded => pb::TaskState::Succeeded,
        TaskState::Failed => pb::TaskState::Failed,
        TaskState::Lost => pb::TaskState::Lost,
    }
}

pub fn job_state(s: JobState) -> pb::JobState {
    match s {
        JobState::Pending => pb::JobState::Pending,
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

/// A job state received in a request (the inverse of [`job_state`]); `field` names it in the
/// error.
pub fn job_state_from_pb(field: &str, raw: i32) -> Result<JobState, ApiError> {
    use JobState::*;
    let wire = gangway_proto::states::job_state(field, raw)?;
    [Pending, Running, Succeeded, Failed, Cancelled]
        .into_iter()
        .find(|s| job_state(*s) == wire)
        .ok_or_else(|| ApiError::invalid(field, format!("no job is ever {}", wire.word())))
}

/// A task state a worker reports (the inverse of [`task_state`]); `assigned` is the scheduler's
/// word alone.
pub fn reported_task_state(field: &str, raw: i32) -> Result<TaskState, ApiError> {
    use TaskState::*;
    let wire = gangway_proto::states::task_state(field, raw)?;
    [Running, Succeeded, Failed, Lost]
        .into_iter()
        .find(|s| task_state(*s) == wire)
        .ok_or_else(|| {
            ApiError::invalid(
                field,
                format!(
                    "expected running, succeeded, failed or lost, got {}",
                    wire.word()
                ),
            )
        })
}

pub fn job_summary(job: &JobRecord) -> pb::JobSummary {
    let r = &job.spec.resources;
    let (epoch, hosts) = match &job.lease {
        Some(l) => {
            let mut hosts: Vec<String> = l
                .placement
                .tasks
                .iter()
                .map(|t| t.host.to_string())
                .collect();
            hosts.dedup();
            (l.epoch, hosts)
        }
        None => (0, Vec::new()),
    };
    pb::JobSummary {
        id: job.id.to_string(),
        name: job.spec.name.clone(),
        queue: job.spec.queue.clone(),
        priority: job.spec.priority,
        state: job_state(job.state).into(),
        tasks: job.spec.tasks,
        devices_per_task: devices_per_task(r.devices),
        kind: r.kind.to_string(),
        submitted_at_ms: job.submitted_at_ms,
        pending_reason: job.pending_text().unwrap_or_default(),
        lease_epoch: epoch,
        hosts,
        attempts: job.attempts,
        preemptions: job.preemptions,
        reclaims: job.reclaims,
        restarts: job.restarts,
        repairs: job.repairs,
        finished_at_ms: job.finished_at_ms.unwrap_or(0),
    }
}

/// One lease of a job, as `gangway job status` lists it.
pub fn run_info(run: &RunRecord) -> pb::RunInfo {
    pb::RunInfo {
        epoch: run.epoch,
        hosts: run.hosts.iter().map(|h| h.to_string()).collect(),
        started_at_ms: run.started_at_ms,
        ended_at_ms: run.ended_at_ms.unwrap_or(0),
        cause: run.cause.map(|c| c.to_string()).unwrap_or_default(),
        end: run.end.clone(),
    }
}

fn duration_ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub fn job_detail(job: &JobRecord) -> pb::JobDetail {
    let tasks = match &job.lease {
        Some(lease) => lease
            .placement
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let rec = job.tasks.get(i);
                pb::TaskInfo {
                    index: i as u32,
                    host: t.host.to_string(),
                    devices: t.devices.iter().map(|d| u32::from(d.index)).collect(),
                    state: task_state(rec.map_or(TaskState::Assigned, |r| r.state)).into(),
                    has_exit_code: rec.is_some_and(|r| r.exit_code.is_some()),
                    exit_code: rec.and_then(|r| r.exit_code).unwrap_or(0),
                    message: rec.map(|r| r.message.clone()).unwrap_or_default(),
                }
            })
            .collect(),
        None => Vec::new(),
    };
    pb::JobDetail {
        summary: Some(job_summary(job)),
        tasks,
        last_checkpoint: job.last_checkpoint.as_ref().map(|c| pb::CheckpointInfo {
            epoch: c.epoch,
            path: c.manifest.path.clone(),
            step: c.manifest.step,
            bytes: c.manifest.bytes,
            recorded_at_ms: c.recorded_at_ms,
        }),
        history: job
            .history
            .iter()
            .map(|h| pb::HistoryLine {
                at_ms: h.at_ms,
                what: h.what.clone(),
            })
            .collect(),
        command: job.spec.command.clone(),
        required_topology: job
            .spec
            .topology
            .required
            .map(|t| t.to_string())
            .unwrap_or_default(),
        preferred_topology: job
            .spec
            .topology
            .preferred
            .map(|t| t.to_string())
            .unwrap_or_default(),
        finished_at_ms: job.finished_at_ms.unwrap_or(0),
        migration: job
            .migration
            .as_ref()
            .map(crate::state::Migration::describe)
            .unwrap_or_default(),
        last_hosts: job.last_hosts.iter().map(|h| h.to_string()).collect(),
        runs: job.runs.iter().map(run_info).collect(),
        restart: Some(pb::RestartPolicyInfo {
            max_restarts: job.spec.restart.max_restarts,
            backoff_ms: duration_ms(job.spec.restart.backoff),
            max_backoff_ms: duration_ms(job.spec.restart.max_backoff),
        }),
        env: job.spec.env.clone().into_iter().collect(),
        // Names only: a secret's value goes to the leased hosts' allocations and nowhere else.
        secret_env: job.spec.secret_env.keys().cloned().collect(),
    }
}

/// The devices of `node` that are not simply healthy and in service: failed, degraded, fenced
/// or missing, by index.
pub fn device_conditions(node: &NodeRecord) -> Vec<pb::DeviceCondition> {
    node.registration
        .devices
        .iter()
        .enumerate()
        .filter_map(|(i, inv)| {
            let index = u16::try_from(i).ok()?;
            let d = node.device(index);
            let plain = d.health == DeviceHealth::Healthy && d.fence.is_none() && d.present;
            if plain {
                return None;
            }
            Some(pb::DeviceCondition {
                index: u32::from(index),
                uuid: inv.uuid.clone(),
                health: d.health.to_string(),
                fenced: d.fence.is_some(),
                fence_source: d
                    .fence
                    .as_ref()
                    .map(|f| f.source.to_string())
                    .unwrap_or_default(),
                description: d.describe(),
                since_ms: d.fence.as_ref().map_or(d.health_changed_at_ms, |f| {
                    f.since_ms.max(d.health_changed_at_ms)
                }),
                present: d.present,
                fenced_since_ms: d.fence.as_ref().map_or(0, |f| f.since_ms),
            })
        })
        .collect()
}

/// `heartbeat_age_ms`: from the leader's tracker; 0 where unknown.
pub fn node_info(store: &ClusterStore, node: &NodeRecord, heartbeat_age_ms: u64) -> pb::NodeInfo {
    let reg = &node.registration;
    let free_milli = store
        .engine()
        .host(&reg.name)
        .map_or(0, |h| h.free_milli.iter().map(|m| u64::from(*m)).sum());
    let mut models: Vec<String> = reg.devices.iter().map(|d| d.model.clone()).collect();
    models.sort();
    models.dedup();
    pb::NodeInfo {
        name: reg.name.to_string(),
        address: reg.address.clone(),
        state: node.state.to_string(),
        state_reason: node.state_reason.clone(),
        datacenter: reg.topology.datacenter.clone(),
        zone: reg.topology.zone.clone(),
        pod: reg.topology.pod.clone(),
        rack: reg.topology.rack.clone(),
        devices: reg.devices.len() as u32,
        free_milli,
        models,
        cpu_milli: reg.cpu_milli,
        memory_mib: reg.memory_mib,
        heartbeat_age_ms,
        fenced_devices: node.fenced_count() as u32,
        device_conditions: device_conditions(node),
        drain_deadline_ms: if node.state == NodeState::Draining {
            node.drain_deadline_ms.unwrap_or(0)
        } else {
            0
        },
        empty: store.node_is_empty(&reg.name),
    }
}

/// The lease a running job holds, as listed (an empty entry for a job holding none; the running
/// index only yields jobs that hold one).
pub fn lease_info(j: &crate::state::JobRecord) -> pb::LeaseInfo {
    let Some(l) = j.lease.as_ref() else {
        return pb::LeaseInfo::default();
    };
    pb::LeaseInfo {
        job_id: j.id.to_string(),
        epoch: l.epoch,
        granted_at_ms: l.granted_at_ms,
        tasks: l
            .placement
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| pb::TaskLease {
                task: i as u32,
                host: t.host.to_string(),
                devices: t.devices.iter().map(|d| u32::from(d.index)).collect(),
            })
            .collect(),
    }
}

pub fn queues(store: &ClusterStore) -> Vec<pb::QueueInfo> {
    #[derive(Default)]
    struct Counts {
        pending: u32,
        running: u32,
    }
    // From the job table's indexes: what waits and what runs, never the history.
    let mut counts: BTreeMap<&str, Counts> = BTreeMap::new();
    let table = store.job_table();
    for (queue, n) in table.pending_by_queue() {
        counts.entry(queue).or_default().pending = n as u32;
    }
    for j in table.running().filter(|j| j.state == JobState::Running) {
        counts.entry(j.spec.queue.as_str()).or_default().running += 1;
    }
    // Every configured queue, and every queue a live job names even without a guarantee.
    let mut names: Vec<String> = store.queues().keys().map(|q| q.to_string()).collect();
    names.extend(counts.keys().map(|q| (*q).to_owned()));
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|name| {
            let qn = gangway_proto::ids::QueueName::new(name.clone());
            let cfg = store.queues().get(&qn);
            let c = counts.get(name.as_str());
            let idle = cfg.and_then(|q| q.idle);
            pb::QueueInfo {
                guaranteed_milli: cfg.map_or(0, |q| q.guaranteed_milli),
                may_borrow: cfg.is_none_or(|q| q.may_borrow),
                used_milli: store.engine().queue_usage_milli(&qn),
                pending_jobs: c.map_or(0, |c| c.pending),
                running_jobs: c.map_or(0, |c| c.running),
                idle_action: idle.map_or(String::new(), |p| p.action.as_str().to_owned()),
                idle_window_ms: idle.map_or(0, |p| p.window_ms),
                idle_threshold_pct: idle.map_or(0, |p| p.threshold_pct),
                name,
            }
        })
        .collect()
}

pub fn allocation(a: &Allocation, queue: String) -> pb::Allocation {
    pb::Allocation {
        job_id: a.job.to_string(),
        task: a.task,
        task_count: a.task_count,
        epoch: a.epoch,
        devices: a
            .devices
            .iter()
            .map(|(index, uuid, milli)| pb::AllocatedDevice {
                index: u32::from(*index),
                uuid: uuid.clone(),
                milli: *milli,
            })
            .collect(),
        command: a.command.clone(),
        env: a.env.clone().into_iter().collect(),
        master_addr: a.master_addr.clone(),
        checkpoint_signal: a
            .checkpoint
            .as_ref()
            .map(|c| c.signal.clone())
            .unwrap_or_default(),
        checkpoint_timeout_ms: a.checkpoint.as_ref().map_or(0, |c| {
            u64::try_from(c.timeout.as_millis()).unwrap_or(u64::MAX)
        }),
        restore_from: a.restore_from.clone().unwrap_or_default(),
        checkpoint_request: a.checkpoint_request,
        checkpoint_request_at_grant: a.checkpoint_request_at_grant,
        queue,
        // The one place a secret's value leaves the replicas: the allocation of a leased host.
        secret_env: a
            .secret_env
            .iter()
            .filter_map(|(name, secret)| {
                Some(pb::SecretVar {
                    name: name.clone(),
                    value: secret.expose()?.to_owned(),
                })
            })
            .collect(),
    }
}

/// How many waiting gangs are blocked by shape, and for the first few the defragmenter's plan:
/// the leader's round (`engine::run_round`) on the same state, with room for a few proposals and
/// no disruption budget (the leader's ledger is in its memory only).
pub fn defrag_preview(
    view: &crate::engine::ClusterState,
    pending: &[crate::engine::GangRequest],
    config: &crate::engine::SchedulerConfig,
    state: &crate::engine::RoundState,
    now_ms: u64,
) -> pb::DefragPlanReply {
    /// Plans previewed at most (each verifies candidate domains on a copy of the state).
    const PREVIEWS: usize = 3;
    let limits = crate::engine::DefragLimits {
        max_plans: PREVIEWS,
        gangs_per_round: PREVIEWS,
        ..crate::engine::DefragLimits::leader(usize::MAX, f64::INFINITY, 0)
    };
    let round = crate::engine::run_round(crate::engine::RoundInput {
        view,
        pending,
        reasons: &[],
        config,
        state,
        defrag: Some(&limits),
        now_ms,
    });
    let hosts_of = |p: &crate::engine::GangPlacement| -> Vec<String> {
        p.tasks.iter().map(|t| t.host.to_string()).collect()
    };
    let plans = round
        .defrag
        .into_iter()
        .map(|proposal| proposal.plan)
        .map(|plan| pb::DefragPreview {
            job_id: plan.for_gang.to_string(),
            devices: pending
                .iter()
                .find(|g| g.id == plan.for_gang)
                .map_or(0, |g| g.total_devices()),
            gang_hosts: hosts_of(&plan.gang),
            moves: plan
                .moves
                .iter()
                .map(|m| pb::DefragMove {
                    job_id: m.job.to_string(),
                    devices: m.devices,
                    from_hosts: view
                        .running()
                        .get(&m.job)
                        .map(|g| hosts_of(&g.placement))
                        .unwrap_or_default(),
                    to_hosts: hosts_of(&m.to),
                })
                .collect(),
        })
        .collect();
    pb::DefragPlanReply {
        blocked_by_shape: round.blocked_by_shape.len() as u32,
        plans,
        fragmentation_pct: crate::engine::scattered_free_permille(
            view,
            crate::engine::TopologyLevel::Host,
        ) as f64
            / 10.0,
    }
}

/// What the defragmenter has under way, and fragmentation per level (settings filled by the caller).
pub fn defrag_status(fsm: &super::fsm::SchedulerFsm) -> pb::DefragStatusReply {
    use crate::engine::TopologyLevel;
    let store = fsm.store();
    pb::DefragStatusReply {
        reclaimed_device_hours: store.reclaimed_device_hours(),
        recent: store
            .capacity_actions()
            .iter()
            .map(|e| pb::HistoryLine {
                at_ms: e.at_ms,
                what: e.what.clone(),
            })
            .collect(),
        migrating: store
            .jobs()
            .values()
            .filter_map(|j| {
                let m = j.migration.as_ref()?;
                Some(pb::Migrating {
                    job_id: j.id.to_string(),
                    devices: j.gang_request().total_devices(),
                    since_ms: m.requested_at_ms,
                    checkpoint_request: m.checkpoint_request,
                })
            })
            .collect(),
        reservations: store
            .reservations_until()
            .map(|(job, hosts, until_ms)| pb::Reservation {
                job_id: job.to_string(),
                hosts: hosts.iter().map(|h| h.to_string()).collect(),
                until_ms,
            })
            .collect(),
        fragmentation: [TopologyLevel::Host, TopologyLevel::Rack, TopologyLevel::Pod]
            .into_iter()
            .map(|level| pb::LevelFragmentation {
                level: level.to_string(),
                pct: crate::engine::scattered_free_permille(store.engine(), level) as f64 / 10.0,
            })
            .collect(),
        ..Default::default()
    }
}

/// A node's desired state as the worker API streams it.
pub fn allocation_set(
    store: &ClusterStore,
    revision: u64,
    node: &gangway_proto::ids::HostName,
) -> pb::AllocationSet {
    let queue_of = |a: &Allocation| store.job(&a.job).map(|j| j.spec.queue.clone());
    pb::AllocationSet {
        revision,
        allocations: store
            .allocations_for(node)
            .iter()
            .map(|a| allocation(a, queue_of(a).unwrap_or_default()))
            .collect(),
        device_epochs: store
            .device_epochs(node)
            .map(<[u64]>::to_vec)
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_counts_read_as_people_write_them() {
        for (count, text) in [
            (DeviceCount::None, "0"),
            (DeviceCount::Whole(8), "8"),
            (DeviceCount::Fraction(500), "0.5"),
            (DeviceCount::Fraction(125), "0.125"),
            (DeviceCount::Fraction(1), "0.001"),
        ] {
            assert_eq!(devices_per_task(count), text);
        }
    }

    #[test]
    fn a_node_lists_the_devices_not_in_plain_health() {
        use crate::engine::{DeviceKind, HostTopology};
        use crate::state::{DeviceInventory, Fence, FenceSource, NodeRecord, NodeRegistration};
        let devices = (0..4)
            .map(|i| DeviceInventory {
                uuid: format!("GPU-h-{i}"),
                model: "H100".into(),
                kind: DeviceKind::Gpu,
                memory_mib: 80_000,
                nvlink_domain: 0,
            })
            .collect();
        let mut node = NodeRecord::new(
            NodeRegistration {
                name: gangway_proto::ids::HostName::new("h"),
                address: "h:1".into(),
                topology: HostTopology::new("dc", "z", "p", "r"),
                cpu_milli: 1000,
                memory_mib: 1000,
                devices,
            },
            5,
        );
        assert!(device_conditions(&node).is_empty());
        let d1 = node.device_mut(1);
        d1.health = DeviceHealth::Degraded;
        d1.cause = "thermal throttling".into();
        d1.health_changed_at_ms = 10;
        let d3 = node.device_mut(3);
        d3.health = DeviceHealth::Failed;
        d3.cause = "XID 79".into();
        d3.fence = Some(Fence {
            source: FenceSource::Health,
            reason: "failed: XID 79".into(),
            since_ms: 20,
        });
        // A health change after the fence moves since_ms, never the fence's own time.
        d3.health_changed_at_ms = 30;
        let c = device_conditions(&node);
        assert_eq!(c.len(), 2);
        assert_eq!(
            (c[0].index, c[0].health.as_str(), c[0].fenced, c[0].since_ms),
            (1, "degraded", false, 10)
        );
        assert_eq!(c[0].description, "degraded: thermal throttling");
        assert_eq!(
            (c[1].index, c[1].uuid.as_str(), c[1].fence_source.as_str()),
            (3, "GPU-h-3", "health")
        );
        assert_eq!(c[1].description, "fenced (health): failed: XID 79");
        assert_eq!((c[1].since_ms, c[1].fenced_since_ms), (30, 20));
        assert_eq!(c[0].fenced_since_ms, 0, "not fenced");
        assert_eq!(node.fenced_count(), 1);
    }

    #[test]
    fn states_travel_as_their_enums_and_read_back() {
        use JobState::*;
        for s in [Pending, Running, Succeeded, Failed, Cancelled] {
            let wire = job_state(s);
            assert_eq!(
                wire.word(),
                s.to_string(),
                "the words people see are unchanged"
            );
            assert_eq!(job_state_from_pb("states", wire.into()).unwrap(), s);
        }
        let err = job_state_from_pb("states[1]", 0).unwrap_err();
        assert!(err.to_string().starts_with("field `states[1]`"), "{err}");
        assert_eq!(err.code(), "invalid_argument");
    }

    #[test]
    fn a_worker_reports_only_what_a_worker_can_see() {
        use TaskState::*;
        for s in [Running, Succeeded, Failed, Lost] {
            assert_eq!(
                reported_task_state("state", task_state(s).into()).unwrap(),
                s
            );
        }
        for (raw, why) in [
            (i32::from(pb::TaskState::Assigned), "got assigned"),
            (0, "task state not set"),
            (77, "unknown task state 77"),
        ] {
            let err = reported_task_state("state", raw).unwrap_err().to_string();
            assert!(
                err.starts_with("field `state`: ") && err.contains(why),
                "{err}"
            );
        }
    }
}
