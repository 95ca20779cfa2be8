//! The worker API: registration, heartbeats, the stream of desired allocations, and task and
//! checkpoint reports.
//!
//! Heartbeats and the allocation stream are served by the leader only: heartbeats feed the leader's
//! in-memory clocks, and a worker must follow the replica whose decisions are current. A follower
//! answers `not_leader` with the leader's address. Reports are replicated commands, so any replica
//! accepts them (a follower forwards), and they are idempotent, so workers retry them freely.

use super::context::ReplicaContext;
use super::convert;
use super::error::{required, ApiError};
use super::heartbeats::DeviceSample;
use crate::engine::{HostTopology, NodeState};
use crate::state::{
    CheckpointFailure, CheckpointManifest, CheckpointReport, Command, DeviceInventory,
    NodeRegistration, Rejection, TaskReport,
};
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
    let address = required("address", &req.address)?;
    if !address.contains(':') {
        return Err(ApiError::invalid("address", "expected host:port"));
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

#[tonic::async_trait]
impl WorkerApi for WorkerService {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Reply<pb::RegisterReply> {
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
        let req = req.into_inner();
        let node = HostName::new(required("node", &req.node)?);
        self.ctx.leader_only()?;
        let state = self
            .ctx
            .raft
            .read_local(|fsm| fsm.store().nodes().get(&node).map(|n| n.state));
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
                healthy: d.healthy,
            })
            .collect();
        self.ctx.heartbeats.record(&node, samples, Instant::now());
        metrics::counter!("gangway_heartbeats_total").increment(1);
        let (heartbeat_interval_ms, lease_ttl_ms) = self.intervals();
        Ok(TonicResponse::new(pb::HeartbeatReply {
            heartbeat_interval_ms,
            lease_ttl_ms,
        }))
    }

    type WatchAllocationsStream =
        Pin<Box<dyn futures::Stream<Item = Result<pb::AllocationSet, Status>> + Send>>;

    async fn watch_allocations(
        &self,
        req: Request<pb::WatchAllocationsRequest>,
    ) -> Reply<Self::WatchAllocationsStream> {
        let node = HostName::new(required("node", &req.get_ref().node)?);
        self.ctx.leader_only()?;
        // Subscribe before the first read so no change between the two is missed.
        let mut wake = self.ctx.allocations.subscribe(&node);
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
                    continue;
                }
                let set = ctx
                    .raft
                    .read_local(|fsm| convert::allocation_set(fsm.store(), fsm.revision(), &node));
                if !same(&set, &last) {
                    last = set.clone();
                    if tx.send(Ok(set)).await.is_err() {
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
        let req = req.into_inner();
        let node = HostName::new(required("node", &req.node)?);
        let job = JobId::new(required("job_id", &req.job_id)?);
        let state = convert::reported_task_state("state", req.state)?;
        // A report about a task this node does not run under the current lease is refused here;
        // the state machine refuses older epochs on its own, deterministically.
        let holder = self.ctx.raft.read_local(|fsm| {
            let lease = fsm.store().job(&job)?.lease.as_ref()?;
            (lease.epoch == req.epoch)
                .then(|| {
                    lease
                        .placement
                        .tasks
                        .get(req.task as usize)
                        .map(|t| t.host.clone())
                })
                .flatten()
        });
        if let Some(holder) = holder {
            if holder != node {
                return Err(ApiError::from(Rejection::BadNode {
                    node,
                    why: format!("task {} of job {job} runs on {holder}", req.task),
                })
                .into());
            }
        }
        self.ctx
            .write(Command::TaskStatus(TaskReport {
                job,
                task: req.task,
                epoch: req.epoch,
                state,
                exit_code: req.has_exit_code.then_some(req.exit_code),
                message: req.message,
            }))
            .await?;
        Ok(TonicResponse::new(pb::Empty {}))
    }

    async fn report_checkpoint(&self, req: Request<pb::CheckpointReport>) -> Reply<pb::Empty> {
        let req = req.into_inner();
        required("node", &req.node)?;
        let job = JobId::new(required("job_id", &req.job_id)?);
        let command = if req.error.trim().is_empty() {
            Command::RecordCheckpoint(CheckpointReport {
                job,
                epoch: req.epoch,
                request: req.request,
                manifest: CheckpointManifest {
                    path: required("path", &req.path)?.to_owned(),
                    step: req.step,
                    bytes: req.bytes,
                },
            })
        } else {
            Command::CheckpointFailed(CheckpointFailure {
                job,
                epoch: req.epoch,
                request: req.request,
                error: req.error,
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
}
