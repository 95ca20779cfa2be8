//! The worker API: registration, heartbeats, the stream of desired allocations, and task and
//! checkpoint reports.
//!
//! Heartbeats and the allocation stream are served by the leader only: heartbeats feed the leader's
//! in-memory clocks, and a worker must follow the replica whose decisions are current. A follower
//! answers `not_leader` with the leader's address. Reports are replicated commands, so any replica
//! accepts them (a follower forwards), and they are idempotent, so workers retry them freely.

use super::auth::Caller;
use super::context::ReplicaContext;
use super::convert;
use super::error::{required, ApiError};
use super::heartbeats::DeviceSample;
use crate::engine::{HostTopology, NodeState};
use crate::state::{
    CheckpointFailure, CheckpointManifest, CheckpointReport, Command, DeviceHealth,
    DeviceHealthReport, DeviceInventory, HealthCheckReport, NodeRegistration, Rejection, Response,
    TaskReport, MAX_BATCH_REPORTS,
};
use gangway_proto::allocation;
use gangway_proto::device::DeviceKind;
use gangway_proto::ids::{HostName, JobId};
use gangway_proto::pb;
use gangway_proto::pb::worker_api_server::WorkerApi;
use std::pin::Pin;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::{Request, Response as TonicResponse, Status};

pub struct WorkerService {
    ctx: ReplicaContext,
}

impl WorkerService {
    pub fn new(ctx: ReplicaContext) -> Self {
        Self { ctx }
    }

    fn intervals(&self) -> (u64, u64) {
        let w = &self.ctx.config.workers;
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        (
            ms(w.heartbeat_interval),
            ms(worker_lease_ttl(w.heartbeat_interval, w.node_ttl)),
        )
    }
}

/// How long a worker may run its tasks without hearing from any replica.
///
/// It must stop them before the leader can declare the node down and lease the devices elsewhere:
/// the leader waits `node_ttl` from the last heartbeat it received, and the worker counts from the
/// reply it got, which is later. One heartbeat interval (at least a quarter of the TTL) of margin
/// covers the reply's delay and a slow heartbeat.
pub fn worker_lease_ttl(heartbeat_interval: Duration, node_ttl: Duration) -> Duration {
    node_ttl.saturating_sub(heartbeat_interval.max(node_ttl / 4))
}

type Reply<T> = Result<TonicResponse<T>, Status>;

/// Longest cause or health-check detail accepted, in bytes (it is kept in the replicated state).
pub const MAX_HEALTH_TEXT: usize = 4096;

/// Longest device uuid accepted (NVML's are 40 bytes).
pub const MAX_DEVICE_NAME: usize = 256;

/// A device named in a request: its uuid (or, for operators, its index), required, at most
/// [`MAX_DEVICE_NAME`] bytes.
pub fn device_name<'a>(field: &str, value: &'a str) -> Result<&'a str, ApiError> {
    let v = required(field, value)?;
    if v.len() > MAX_DEVICE_NAME {
        return Err(ApiError::invalid(
            field,
            format!("expected at most {MAX_DEVICE_NAME} bytes, got {}", v.len()),
        ));
    }
    Ok(v)
}

/// Most devices one health check may name.
const MAX_FAILED_DEVICES: usize = 1024;

/// A health word received from a worker.
pub fn device_health_from_pb(field: &str, raw: i32) -> Result<DeviceHealth, ApiError> {
    Ok(match gangway_proto::states::device_health(field, raw)? {
        pb::DeviceHealth::Healthy => DeviceHealth::Healthy,
        pb::DeviceHealth::Degraded => DeviceHealth::Degraded,
        pb::DeviceHealth::Failed => DeviceHealth::Failed,
        pb::DeviceHealth::Unspecified => {
            return Err(ApiError::invalid(field, "device health not set"))
        }
    })
}

/// A free-text field of a health report: at most [`MAX_HEALTH_TEXT`] bytes.
fn health_text(field: &str, text: String) -> Result<String, ApiError> {
    if text.len() > MAX_HEALTH_TEXT {
        return Err(ApiError::invalid(
            field,
            format!(
                "expected at most {MAX_HEALTH_TEXT} bytes, got {}",
                text.len()
            ),
        ));
    }
    Ok(text)
}

/// Checks a device health report field by field; the error names the first bad one.
pub fn device_health_from_report(
    req: pb::DeviceHealthReport,
) -> Result<DeviceHealthReport, ApiError> {
    let node = HostName::new(required("node", &req.node)?);
    let device = device_name("device", &req.device)?.to_owned();
    let health = device_health_from_pb("health", req.health)?;
    Ok(DeviceHealthReport {
        node,
        device,
        health,
        cause: health_text("cause", req.cause)?,
    })
}

/// Checks a health check report field by field; the error names the first bad one.
pub fn health_check_from_report(req: pb::HealthCheckReport) -> Result<HealthCheckReport, ApiError> {
    let node = HostName::new(required("node", &req.node)?);
    if req.failed_devices.len() > MAX_FAILED_DEVICES {
        return Err(ApiError::invalid(
            "failed_devices",
            format!(
                "expected at most {MAX_FAILED_DEVICES} devices, got {}",
                req.failed_devices.len()
            ),
        ));
    }
    let mut failed_devices = Vec::with_capacity(req.failed_devices.len());
    for (i, d) in req.failed_devices.iter().enumerate() {
        let d = device_name(&format!("failed_devices[{i}]"), d)?.to_owned();
        if !failed_devices.contains(&d) {
            failed_devices.push(d);
        }
    }
    Ok(HealthCheckReport {
        node,
        passed: req.passed,
        failed_devices,
        detail: health_text("detail", req.detail)?,
    })
}

/// The most devices one host registers, and the longest strings a host sends (they are kept in
/// the replicated state or in a job's history).
pub const MAX_DEVICES_PER_HOST: usize = 64;
pub const MAX_DEVICE_STRING: usize = 128;
pub const MAX_LABEL: usize = 63;
pub const MAX_ADDRESS: usize = 261;
pub const MAX_REPORT_TEXT: usize = 4096;

/// `value` if it is at most `max` bytes, else an error naming `field`.
fn bounded<'a>(field: &str, value: &'a str, max: usize) -> Result<&'a str, ApiError> {
    if value.len() > max {
        return Err(ApiError::invalid(
            field,
            format!("expected at most {max} bytes, got {}", value.len()),
        ));
    }
    Ok(value)
}

/// Checks a registration field by field; the error names the first bad one.
pub fn registration_from_pb(req: pb::RegisterRequest) -> Result<NodeRegistration, ApiError> {
    let name = required("node", &req.node)?;
    if name.len() > 253
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(ApiError::invalid(
            "node",
            "expected a host name: up to 253 letters, digits, '-', '_' or '.'",
        ));
    }
    let address = bounded("address", required("address", &req.address)?, MAX_ADDRESS)?;
    if !address.contains(':') {
        return Err(ApiError::invalid("address", "expected host:port"));
    }
    if req.devices.len() > MAX_DEVICES_PER_HOST {
        return Err(ApiError::invalid(
            "devices",
            format!(
                "expected at most {MAX_DEVICES_PER_HOST} devices, got {}",
                req.devices.len()
            ),
        ));
    }
    for (field, label) in [
        ("datacenter", &req.datacenter),
        ("zone", &req.zone),
        ("pod", &req.pod),
        ("rack", &req.rack),
    ] {
        bounded(field, label, MAX_LABEL)?;
    }
    let mut devices = Vec::with_capacity(req.devices.len());
    for (i, d) in req.devices.into_iter().enumerate() {
        let field = |f: &str| format!("devices[{i}].{f}");
        let kind: DeviceKind =
            d.kind
                .parse()
                .map_err(|e: gangway_proto::device::UnknownDeviceKind| {
                    ApiError::invalid(&field("kind"), e.to_string())
                })?;
        if d.model.trim().is_empty() {
            return Err(ApiError::invalid(&field("model"), "required"));
        }
        if d.uuid.trim().is_empty() {
            return Err(ApiError::invalid(&field("uuid"), "required"));
        }
        bounded(&field("model"), &d.model, MAX_DEVICE_STRING)?;
        bounded(&field("uuid"), &d.uuid, MAX_DEVICE_STRING)?;
        let nvlink_domain = u16::try_from(d.nvlink_domain).map_err(|_| {
            ApiError::invalid(&field("nvlink_domain"), "expected a value up to 65535")
        })?;
        devices.push(DeviceInventory {
            uuid: d.uuid,
            model: d.model,
            kind,
            memory_mib: d.memory_mib,
            nvlink_domain,
        });
    }
    let mut uuids: Vec<&str> = devices.iter().map(|d| d.uuid.as_str()).collect();
    uuids.sort_unstable();
    if uuids.windows(2).any(|w| w[0] == w[1]) {
        return Err(ApiError::invalid("devices", "device uuids must be unique"));
    }
    let topology = HostTopology::new(&req.datacenter, &req.zone, &req.pod, &req.rack);
    Ok(NodeRegistration {
        name: HostName::new(name),
        address: address.to_owned(),
        topology,
        cpu_milli: req.cpu_milli,
        memory_mib: req.memory_mib,
        devices,
    })
}

impl WorkerService {
    /// A node reports about its own devices only: it must be registered, and every uuid must be
    /// one it registered. The state machine decides, deterministically; the leader also refuses
    /// here, so garbage never reaches the log (its state includes every registration it
    /// acknowledged). A follower, whose state may lag a registration, leaves it to the leader.
    fn own_devices(&self, node: &HostName, uuids: &[String]) -> Result<(), ApiError> {
        if !self.ctx.raft.is_leader() {
            return Ok(());
        }
        let unknown = self.ctx.raft.read_local(|fsm| {
            let Some(record) = fsm.store().nodes().get(node) else {
                return Some(Rejection::UnknownNode(node.clone()));
            };
            uuids
                .iter()
                .find(|u| record.device_index(u).is_none())
                .map(|u| Rejection::UnknownDevice {
                    node: node.clone(),
                    device: u.clone(),
                })
        });
        match unknown {
            Some(r) => Err(ApiError::from(r)),
            None => Ok(()),
        }
    }
}

impl WorkerService {
    /// Whether the leader's state already holds exactly what `report` says (health and cause):
    /// then applying it would change nothing, and no log entry is spent on it. Only the leader
    /// answers so (a follower's state may lag).
    fn already_known(&self, report: &DeviceHealthReport) -> bool {
        if !self.ctx.raft.is_leader() {
            return false;
        }
        self.ctx.raft.read_local(|fsm| {
            let Some(node) = fsm.store().nodes().get(&report.node) else {
                return false;
            };
            node.device_index(&report.device).is_some_and(|i| {
                let d = node.device(i);
                d.health == report.health && d.cause == report.cause
            })
        })
    }
}

/// Allocation streams one node may hold open at once.
pub const MAX_WATCHES_PER_NODE: usize = 4;

/// The set, when it fits one message of the allocation stream
/// ([`allocation::MAX_ALLOCATION_SET_BYTES`], the bound the agent decodes up to); else an error
/// naming the node and the size, logged here at error: the node cannot learn its allocations, so
/// its tasks stop by their lease deadline.
pub fn deliverable(node: &HostName, set: pb::AllocationSet) -> Result<pb::AllocationSet, ApiError> {
    deliverable_within(node, set, allocation::MAX_ALLOCATION_SET_BYTES)
}

fn deliverable_within(
    node: &HostName,
    set: pb::AllocationSet,
    limit: usize,
) -> Result<pb::AllocationSet, ApiError> {
    let bytes = allocation::encoded_len(&set);
    if bytes <= limit {
        return Ok(set);
    }
    tracing::error!(
        node = %node, bytes, limit, allocations = set.allocations.len(),
        "the node's allocation set is too large for one message and cannot be delivered; its tasks stop by their lease deadline"
    );
    metrics::counter!("gangway_allocation_sets_undeliverable_total").increment(1);
    Err(ApiError::Exhausted(format!(
        "the allocation set of node {node} is {bytes} bytes ({} allocations), over the {limit}-byte limit of one message: it cannot be delivered",
        set.allocations.len()
    )))
}

/// A task report as the state machine takes it; each problem names its field.
pub fn task_report(req: pb::TaskStatusReport) -> Result<TaskReport, ApiError> {
    Ok(TaskReport {
        job: JobId::new(required("job_id", &req.job_id)?),
        task: req.task,
        epoch: req.epoch,
        state: convert::reported_task_state("state", req.state)?,
        exit_code: req.has_exit_code.then_some(req.exit_code),
        message: bounded("message", &req.message, MAX_REPORT_TEXT)?.to_owned(),
    })
}

impl WorkerService {
    /// A report about a task this node does not run under the current lease is refused here;
    /// the state machine refuses older epochs on its own, deterministically.
    fn leased_here(&self, node: &HostName, report: &TaskReport) -> Result<(), ApiError> {
        let holder = self.ctx.raft.read_local(|fsm| {
            let lease = fsm.store().job(&report.job)?.lease.as_ref()?;
            (lease.epoch == report.epoch)
                .then(|| {
                    lease
                        .placement
                        .tasks
                        .get(report.task as usize)
                        .map(|t| t.host.clone())
                })
                .flatten()
        });
        match holder {
            Some(holder) if holder != *node => Err(ApiError::from(Rejection::BadNode {
                node: node.clone(),
                why: format!(
                    "task {} of job {} runs on {holder}",
                    report.task, report.job
                ),
            })),
            _ => Ok(()),
        }
    }
}

/// The node a host's request speaks for (its `node` field), once the caller proved to be that
/// host's agent; checked before anything else in the request is looked at.
fn own_node<T>(req: &Request<T>, node: impl Fn(&T) -> &str) -> Result<HostName, ApiError> {
    let node = HostName::new(required("node", node(req.get_ref()))?);
    Caller::of(req).require_node(&node)?;
    Ok(node)
}

#[tonic::async_trait]
impl WorkerApi for WorkerService {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Reply<pb::RegisterReply> {
        // Who may speak for the node comes first: a host learns nothing about another's
        // registration rules by sending it garbage.
        own_node(&req, |r| &r.node)?;
        let reg = registration_from_pb(req.into_inner())?;
        let name = reg.name.clone();
        self.ctx.write(Command::RegisterNode(reg)).await?;
        if self.ctx.raft.is_leader() {
            self.ctx
                .heartbeats
                .record(&name, Vec::new(), Instant::now());
        }
        let (heartbeat_interval_ms, lease_ttl_ms) = self.intervals();
        Ok(TonicResponse::new(pb::RegisterReply {
            heartbeat_interval_ms,
            lease_ttl_ms,
        }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Reply<pb::HeartbeatReply> {
        let node = own_node(&req, |r| &r.node)?;
        let req = req.into_inner();
        self.ctx.leader_only()?;
        // The node's state, and the digest of its allocation set as the state holds it: the
        // agent renews its lease deadline only while the set it applied is this one.
        let (state, allocation_digest, allocation_revision) = self.ctx.raft.read_local(|fsm| {
            let state = fsm.store().nodes().get(&node).map(|n| n.state);
            let set = convert::allocation_set(fsm.store(), 0, &node);
            (state, allocation::digest(&set).to_vec(), fsm.revision())
        });
        match state {
            None => return Err(ApiError::from(Rejection::UnknownNode(node)).into()),
            Some(NodeState::Down) => {
                return Err(ApiError::from(Rejection::BadNode {
                    node,
                    why: "declared down after missed heartbeats; register again".into(),
                })
                .into())
            }
            Some(_) => {}
        }
        let samples = req
            .devices
            .into_iter()
            .map(|d| DeviceSample {
                index: d.index,
                utilization_pct: d.utilization_pct.min(100),
                memory_used_mib: d.memory_used_mib,
            })
            .collect();
        self.ctx.heartbeats.record(&node, samples, Instant::now());
        metrics::counter!("gangway_heartbeats_total").increment(1);
        let (heartbeat_interval_ms, lease_ttl_ms) = self.intervals();
        Ok(TonicResponse::new(pb::HeartbeatReply {
            heartbeat_interval_ms,
            lease_ttl_ms,
            allocation_digest,
            allocation_revision,
        }))
    }

    type WatchAllocationsStream =
        Pin<Box<dyn futures::Stream<Item = Result<pb::AllocationSet, Status>> + Send>>;

    async fn watch_allocations(
        &self,
        req: Request<pb::WatchAllocationsRequest>,
    ) -> Reply<Self::WatchAllocationsStream> {
        let node = own_node(&req, |r| &r.node)?;
        self.ctx.leader_only()?;
        // A stream for a node the cluster does not know is refused before it subscribes (a
        // subscription per made-up name would grow the notifier without bound).
        if !self
            .ctx
            .raft
            .read_local(|fsm| fsm.store().nodes().contains_key(&node))
        {
            return Err(ApiError::from(Rejection::UnknownNode(node)).into());
        }
        // Subscribe before the first read so no change between the two is missed; a node holds
        // at most a few streams (one, plus a reconnect overlapping the old one).
        let Some(mut wake) = self
            .ctx
            .allocations
            .try_subscribe(&node, MAX_WATCHES_PER_NODE)
        else {
            return Err(ApiError::Exhausted(format!(
                "node {node} already has {MAX_WATCHES_PER_NODE} allocation streams open; close one first"
            ))
            .into());
        };
        let first = self
            .ctx
            .leader_read(|fsm| {
                fsm.store()
                    .nodes()
                    .contains_key(&node)
                    .then(|| convert::allocation_set(fsm.store(), fsm.revision(), &node))
            })
            .await?
            .ok_or_else(|| ApiError::from(Rejection::UnknownNode(node.clone())))?;
        let first = deliverable(&node, first)?;
        let (tx, rx) = mpsc::channel::<Result<pb::AllocationSet, Status>>(16);
        let ctx = self.ctx.clone();
        let mut stopping = ctx.stopping();
        // A leader cut off from the quorum still believes it leads: the stream ends once it is no
        // longer confirmed, so the worker finds the new leader instead of waiting on this one.
        let mut confirm = tokio::time::interval(ctx.config.raft.election_timeout_min);
        confirm.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::spawn(async move {
            let same = |a: &pb::AllocationSet, b: &pb::AllocationSet| {
                a.allocations == b.allocations && a.device_epochs == b.device_epochs
            };
            let mut last = first.clone();
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                // None: the replica is stopping. Some(false): check leadership (a step-down, or
                // the periodic check that catches a leader cut off from the quorum, which never
                // steps down by itself). Some(true): the node's allocations may have changed.
                let dirty = tokio::select! {
                    _ = tx.closed() => return,
                    _ = stopping.changed() => None,
                    _ = wake.leading.changed() => Some(false),
                    _ = confirm.tick() => Some(false),
                    r = wake.node.changed() => r.ok().map(|_| true),
                    r = wake.all.changed() => r.ok().map(|_| true),
                };
                let Some(dirty) = dirty else {
                    let stopping = ApiError::Unavailable("replica is shutting down".into());
                    let _ = tx.send(Err(stopping.into())).await;
                    return;
                };
                if !dirty {
                    if let Err(e) = ctx.leader_only() {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                }
                // Read on every wake-up, the periodic one too: a change no event announced (a
                // rank that finished while its gang runs on) still reaches the worker within a
                // tick, well before its lease renewals, which wait for the set the heartbeat
                // reply's digest names, would stop.
                let set = ctx
                    .raft
                    .read_local(|fsm| convert::allocation_set(fsm.store(), fsm.revision(), &node));
                if !same(&set, &last) {
                    last = set.clone();
                    // A set too large to deliver ends the stream with the reason: the agent
                    // logs it and, no longer current, lets its tasks' lease deadline lapse.
                    let (item, end) = match deliverable(&node, set) {
                        Ok(set) => (Ok(set), false),
                        Err(e) => (Err(e.into()), true),
                    };
                    if tx.send(item).await.is_err() || end {
                        return;
                    }
                }
            }
        });
        let stream: Self::WatchAllocationsStream =
            Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
        Ok(TonicResponse::new(stream))
    }

    async fn report_task_status(&self, req: Request<pb::TaskStatusReport>) -> Reply<pb::Empty> {
        let node = own_node(&req, |r| &r.node)?;
        let report = task_report(req.into_inner())?;
        self.leased_here(&node, &report)?;
        self.ctx.write(Command::TaskStatus(report)).await?;
        Ok(TonicResponse::new(pb::Empty {}))
    }

    async fn report_task_statuses(
        &self,
        req: Request<pb::TaskStatusReports>,
    ) -> Reply<pb::TaskStatusOutcomes> {
        let node = own_node(&req, |r| &r.node)?;
        let reports = req.into_inner().reports;
        if reports.is_empty() || reports.len() > MAX_BATCH_REPORTS {
            return Err(ApiError::invalid(
                "reports",
                format!(
                    "expected 1..={MAX_BATCH_REPORTS} reports, got {}",
                    reports.len()
                ),
            )
            .into());
        }
        let mut refused = vec![String::new(); reports.len()];
        let mut taken = Vec::with_capacity(reports.len());
        for (i, r) in reports.into_iter().enumerate() {
            if r.node != node.as_str() {
                return Err(ApiError::invalid(
                    &format!("reports[{i}].node"),
                    format!("expected {node}, the batch's node, got {:?}", r.node),
                )
                .into());
            }
            let report = task_report(r).map_err(|e| e.under(&format!("reports[{i}]")))?;
            match self.leased_here(&node, &report) {
                Ok(()) => taken.push((i, report)),
                Err(e) => refused[i] = e.code().to_owned(),
            }
        }
        if !taken.is_empty() {
            let (at, reports): (Vec<usize>, Vec<TaskReport>) = taken.into_iter().unzip();
            if let Response::Each(outcomes) = self.ctx.write(Command::TaskStatuses(reports)).await?
            {
                for (i, outcome) in at.into_iter().zip(outcomes) {
                    if let Response::Rejected(r) = outcome {
                        refused[i] = r.code().to_owned();
                    }
                }
            }
        }
        Ok(TonicResponse::new(pb::TaskStatusOutcomes { refused }))
    }

    async fn report_device_health(&self, req: Request<pb::DeviceHealthReport>) -> Reply<pb::Empty> {
        own_node(&req, |r| &r.node)?;
        let report = device_health_from_report(req.into_inner())?;
        self.own_devices(&report.node, std::slice::from_ref(&report.device))?;
        metrics::counter!("gangway_device_health_reports_total", "health" => report.health.to_string())
            .increment(1);
        if self.already_known(&report) {
            // A repeat (a retry, or an agent's first reading after a restart): the state says so
            // already, and the write would change nothing.
            return Ok(TonicResponse::new(pb::Empty {}));
        }
        self.ctx.write(Command::DeviceHealth(report)).await?;
        Ok(TonicResponse::new(pb::Empty {}))
    }

    async fn report_health_check(&self, req: Request<pb::HealthCheckReport>) -> Reply<pb::Empty> {
        own_node(&req, |r| &r.node)?;
        let report = health_check_from_report(req.into_inner())?;
        self.own_devices(&report.node, &report.failed_devices)?;
        self.ctx.write(Command::HealthCheck(report)).await?;
        Ok(TonicResponse::new(pb::Empty {}))
    }

    async fn report_checkpoint(&self, req: Request<pb::CheckpointReport>) -> Reply<pb::Empty> {
        let node = own_node(&req, |r| &r.node)?;
        let req = req.into_inner();
        let job = JobId::new(required("job_id", &req.job_id)?);
        // Only a host the job's lease of that epoch placed a task on reports its checkpoints.
        let elsewhere = self.ctx.raft.read_local(|fsm| {
            let lease = fsm.store().job(&job)?.lease.as_ref()?;
            let hosts = &lease.placement.tasks;
            (lease.epoch == req.epoch && !hosts.iter().any(|t| t.host == node)).then(|| {
                hosts
                    .first()
                    .map(|t| t.host.to_string())
                    .unwrap_or_default()
            })
        });
        if let Some(holder) = elsewhere {
            return Err(ApiError::from(Rejection::BadNode {
                node,
                why: format!("job {job}'s lease runs on {holder}, not here"),
            })
            .into());
        }
        let command = if req.error.trim().is_empty() {
            Command::RecordCheckpoint(CheckpointReport {
                job,
                epoch: req.epoch,
                request: req.request,
                manifest: CheckpointManifest {
                    path: bounded("path", required("path", &req.path)?, MAX_REPORT_TEXT)?
                        .to_owned(),
                    step: req.step,
                    bytes: req.bytes,
                },
            })
        } else {
            Command::CheckpointFailed(CheckpointFailure {
                job,
                epoch: req.epoch,
                request: req.request,
                error: bounded("error", &req.error, MAX_REPORT_TEXT)?.to_owned(),
            })
        };
        self.ctx.write(command).await?;
        Ok(TonicResponse::new(pb::Empty {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(uuid: &str, kind: &str) -> pb::Device {
        pb::Device {
            uuid: uuid.into(),
            model: "H100".into(),
            kind: kind.into(),
            memory_mib: 80_000,
            nvlink_domain: 0,
        }
    }

    fn request(devices: Vec<pb::Device>) -> pb::RegisterRequest {
        pb::RegisterRequest {
            node: "host-1".into(),
            address: "10.0.0.1:7200".into(),
            datacenter: "dc1".into(),
            zone: "z1".into(),
            pod: "p1".into(),
            rack: "r1".into(),
            cpu_milli: 64_000,
            memory_mib: 512_000,
            devices,
        }
    }

    #[test]
    fn bad_registrations_name_the_field() {
        let cases: Vec<(pb::RegisterRequest, &str)> = vec![
            (
                pb::RegisterRequest {
                    node: " ".into(),
                    ..request(vec![])
                },
                "field `node`",
            ),
            (
                pb::RegisterRequest {
                    address: "nohost".into(),
                    ..request(vec![])
                },
                "field `address`",
            ),
            (
                request(vec![device("a", "gpu"), device("b", "fpga")]),
                "field `devices[1].kind`",
            ),
            (
                request(vec![device("a", "gpu"), device("a", "gpu")]),
                "field `devices`",
            ),
            (
                request(vec![pb::Device {
                    nvlink_domain: 70_000,
                    ..device("a", "gpu")
                }]),
                "field `devices[0].nvlink_domain`",
            ),
        ];
        for (req, want) in cases {
            let err = registration_from_pb(req).unwrap_err();
            assert!(
                err.to_string().starts_with(want),
                "{err} should start with {want}"
            );
        }
        let ok =
            registration_from_pb(request(vec![device("a", "gpu"), device("b", "gpu")])).unwrap();
        assert_eq!(ok.devices.len(), 2);
        assert_eq!(ok.topology.rack, "r1");
    }

    #[test]
    fn bad_health_reports_name_the_field() {
        let report = |health: pb::DeviceHealth, cause: &str| pb::DeviceHealthReport {
            node: "host-1".into(),
            device: "GPU-host-1-3".into(),
            health: health.into(),
            cause: cause.into(),
        };
        let ok = device_health_from_report(report(pb::DeviceHealth::Failed, "XID 79")).unwrap();
        assert_eq!(ok.health, DeviceHealth::Failed);
        assert_eq!(ok.device, "GPU-host-1-3");
        let long = "x".repeat(MAX_HEALTH_TEXT + 1);
        let cases: Vec<(pb::DeviceHealthReport, &str)> = vec![
            (
                pb::DeviceHealthReport {
                    node: "".into(),
                    ..report(pb::DeviceHealth::Failed, "")
                },
                "field `node`: required",
            ),
            (
                pb::DeviceHealthReport {
                    device: " ".into(),
                    ..report(pb::DeviceHealth::Failed, "")
                },
                "field `device`: required",
            ),
            (
                report(pb::DeviceHealth::Unspecified, ""),
                "field `health`: device health not set",
            ),
            (
                pb::DeviceHealthReport {
                    health: 42,
                    ..report(pb::DeviceHealth::Failed, "")
                },
                "field `health`: unknown device health 42",
            ),
            (report(pb::DeviceHealth::Degraded, &long), "field `cause`"),
            (
                pb::DeviceHealthReport {
                    device: "G".repeat(MAX_DEVICE_NAME + 1),
                    ..report(pb::DeviceHealth::Failed, "")
                },
                "field `device`: expected at most 256 bytes",
            ),
        ];
        for (req, want) in cases {
            let err = device_health_from_report(req).unwrap_err();
            assert!(
                err.to_string().starts_with(want),
                "{err} should start with {want}"
            );
            assert_eq!(err.code(), "invalid_argument");
        }

        let check = |failed: Vec<&str>| pb::HealthCheckReport {
            node: "host-1".into(),
            passed: false,
            failed_devices: failed.into_iter().map(String::from).collect(),
            detail: "exit 1".into(),
        };
        let ok = health_check_from_report(check(vec!["a", "b", "a"])).unwrap();
        assert_eq!(ok.failed_devices, ["a", "b"]);
        let err = health_check_from_report(check(vec!["a", ""])).unwrap_err();
        assert!(
            err.to_string().starts_with("field `failed_devices[1]`"),
            "{err}"
        );
        let err = health_check_from_report(pb::HealthCheckReport {
            detail: long,
            ..check(vec![])
        })
        .unwrap_err();
        assert!(err.to_string().starts_with("field `detail`"), "{err}");
    }

    #[test]
    fn a_worker_stops_its_tasks_before_the_leader_may_release_them() {
        for (hb, ttl) in [(2_000, 10_000), (100, 1_000), (500, 1_000), (50, 60_000)] {
            let (hb, ttl) = (Duration::from_millis(hb), Duration::from_millis(ttl));
            let lease = worker_lease_ttl(hb, ttl);
            assert!(lease + hb <= ttl, "hb {hb:?} ttl {ttl:?} lease {lease:?}");
            assert!(
                lease >= ttl / 2,
                "lease {lease:?} needlessly short for ttl {ttl:?}"
            );
        }
    }

    #[test]
    fn a_set_over_the_message_limit_is_refused_naming_the_node_and_its_size() {
        let node = HostName::new("gpu-7");
        let set = pb::AllocationSet {
            revision: 3,
            allocations: vec![pb::Allocation {
                job_id: "big-1".into(),
                command: vec!["x".repeat(5000)],
                ..Default::default()
            }],
            device_epochs: vec![1],
        };
        let bytes = allocation::encoded_len(&set);
        assert_eq!(
            deliverable_within(&node, set.clone(), bytes).unwrap(),
            set,
            "a set at the limit goes out as it is"
        );
        let err = deliverable_within(&node, set.clone(), bytes - 1).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("gpu-7") && text.contains(&format!("{bytes} bytes")),
            "{text}"
        );
        assert_eq!(Status::from(err).code(), tonic::Code::ResourceExhausted);
        assert!(
            deliverable(&node, set).is_ok(),
            "the real limit is far above"
        );
    }
}
