//! Apply functions for device health: health reports, health checks, operators' fences, node
//! removal, and the repair of gangs whose devices failed.
//!
//! A fenced device is fenced in two places at once, always through [`ClusterStore::fence`] and
//! [`ClusterStore::unfence`]: the node record says why and since when (people, `gangway nodes`),
//! the engine's host holds the device's capacity back (no placement can use it, whoever plans).

use super::command::{
    DeviceFenceChange, DeviceHealthReport, DeviceInventory, Event, HealthCheckReport, Rejection,
    Response,
};
use super::job_record::{JobRecord, MigrationReason};
use super::node_record::DeviceRecord;
use super::node_record::{DeviceHealth, Fence, FenceSource, CHECK_PASSES_TO_UNFENCE};
use super::store::ClusterStore;
use crate::engine::NodeState;
use gangway_proto::ids::{HostName, JobId};

impl ClusterStore {
    /// The index of `device` on `node`: its uuid, or (`by_index`, for operators) its index.
    fn device_on(&self, node: &HostName, device: &str, by_index: bool) -> Result<u16, Rejection> {
        let record = self
            .nodes
            .get(node)
            .ok_or_else(|| Rejection::UnknownNode(node.clone()))?;
        let by_number = || {
            device
                .parse::<u16>()
                .ok()
                .filter(|&i| usize::from(i) < record.registration.devices.len())
        };
        record
            .device_index(device)
            .or_else(|| by_index.then(by_number).flatten())
            .ok_or_else(|| Rejection::UnknownDevice {
                node: node.clone(),
                device: device.to_owned(),
            })
    }

    /// The health record of device `index` of `node`, both already checked to exist.
    fn device_record(&mut self, node: &HostName, index: u16) -> &mut DeviceRecord {
        self.nodes
            .get_mut(node)
            .expect("a node checked by the caller")
            .device_mut(index)
    }

    pub(super) fn apply_device_health(
        &mut self,
        now: u64,
        report: DeviceHealthReport,
        events: &mut Vec<Event>,
    ) -> Response {
        let DeviceHealthReport {
            node,
            device,
            health,
            cause,
        } = report;
        let index = match self.device_on(&node, &device, false) {
            Ok(i) => i,
            Err(refusal) => return Response::Rejected(refusal),
        };
        let record = self.device_record(&node, index);
        if record.health == health && record.cause == cause {
            return Response::Done;
        }
        record.health = health;
        record.cause = cause.clone();
        record.health_changed_at_ms = now;
        if health == DeviceHealth::Failed {
            let reason = format!("failed: {cause}");
            self.fence(now, &node, index, FenceSource::Health, reason, events);
        }
        Response::Done
    }

    pub(super) fn apply_health_check(
        &mut self,
        now: u64,
        report: HealthCheckReport,
        events: &mut Vec<Event>,
    ) -> Response {
        let node = report.node.clone();
        // Every named device is resolved before anything changes.
        let mut failing = Vec::with_capacity(report.failed_devices.len());
        for device in &report.failed_devices {
            match self.device_on(&node, device, false) {
                Ok(i) => failing.push(i),
                Err(refusal) => return Response::Rejected(refusal),
            }
        }
        let Some(record) = self.nodes.get(&node) else {
            return Response::Rejected(Rejection::UnknownNode(node));
        };
        let count = record.registration.devices.len() as u16;
        if !report.passed && failing.is_empty() {
            failing = (0..count).collect();
        }
        for index in 0..count {
            if failing.contains(&index) {
                self.check_failed(now, &node, index, &report.detail, events);
            } else {
                self.check_passed(now, &node, index, events);
            }
        }
        Response::Done
    }

    /// A health check named device `index` failing: fenced if it was not, and its count of
    /// passes starts again.
    fn check_failed(
        &mut self,
        now: u64,
        node: &HostName,
        index: u16,
        detail: &str,
        events: &mut Vec<Event>,
    ) {
        let record = self.device_record(node, index);
        record.check_passes = 0;
        if record.fence.is_some() {
            return;
        }
        record.health = DeviceHealth::Failed;
        record.cause = format!("health check failed: {detail}");
        record.health_changed_at_ms = now;
        let reason = record.cause.clone();
        self.fence(now, node, index, FenceSource::Health, reason, events);
    }

    /// A health check passed device `index`: a device fenced for its health returns to service
    /// after [`CHECK_PASSES_TO_UNFENCE`] passes in a row, unless it flaps.
    fn check_passed(&mut self, now: u64, node: &HostName, index: u16, events: &mut Vec<Event>) {
        let record = self.device_record(node, index);
        if !record.checks_may_unfence() {
            return;
        }
        record.check_passes += 1;
        if record.check_passes >= CHECK_PASSES_TO_UNFENCE {
            let why = format!("passed {CHECK_PASSES_TO_UNFENCE} health checks in a row");
            self.unfence(now, node, index, why, events);
        }
    }

    pub(super) fn apply_fence_device(
        &mut self,
        now: u64,
        change: DeviceFenceChange,
        events: &mut Vec<Event>,
    ) -> Response {
        let DeviceFenceChange {
            node,
            device,
            fenced,
            reason,
        } = change;
        let index = match self.device_on(&node, &device, true) {
            Ok(i) => i,
            Err(refusal) => return Response::Rejected(refusal),
        };
        if fenced {
            let why = format!("fenced by an operator: {reason}");
            self.fence(now, &node, index, FenceSource::Operator, why, events);
        } else {
            let record = self.device_record(&node, index);
            if record.fence.is_none() {
                return Response::Done;
            }
            // An operator's word ends the flapping count too.
            record.health_fences = 0;
            self.unfence(
                now,
                &node,
                index,
                format!("unfenced by an operator: {reason}"),
                events,
            );
        }
        Response::Done
    }

    /// Fences device `index` of `node` for `reason` and repairs the gang that holds it. A device
    /// fenced already stays so; an operator's fence replaces a fence for health (it then needs an
    /// operator to return), and a failure of a device an operator fenced stops the gang still
    /// checkpointing on it at once.
    pub(super) fn fence(
        &mut self,
        now: u64,
        node: &HostName,
        index: u16,
        source: FenceSource,
        reason: String,
        events: &mut Vec<Event>,
    ) {
        let record = self.device_record(node, index);
        record.check_passes = 0;
        let fence = Fence {
            source,
            reason: reason.clone(),
            since_ms: now,
        };
        let newly = match &record.fence {
            None => {
                if source == FenceSource::Health {
                    record.health_fences += 1;
                }
                record.fence = Some(fence);
                true
            }
            Some(f) if f.source != FenceSource::Operator && source == FenceSource::Operator => {
                record.fence = Some(fence);
                false
            }
            Some(_) => false,
        };
        if newly {
            let _ = self.engine.set_device_fenced(node, index, true);
            events.push(Event::SchedulingNeeded);
        }
        if newly || source != FenceSource::Operator {
            self.repair_gangs_on(now, node, &[index], source, &reason, events);
        }
    }

    /// Returns device `index` of `node` to service.
    fn unfence(
        &mut self,
        now: u64,
        node: &HostName,
        index: u16,
        why: String,
        events: &mut Vec<Event>,
    ) {
        let record = self.device_record(node, index);
        record.fence = None;
        record.check_passes = 0;
        record.health = DeviceHealth::Healthy;
        record.cause = why;
        record.health_changed_at_ms = now;
        let _ = self.engine.set_device_fenced(node, index, false);
        events.push(Event::SchedulingNeeded);
    }

    /// Repairs every gang holding one of `devices` of `node`. A device an operator fenced still
    /// works: a checkpointable gang checkpoints first. A failed or absent device cannot be
    /// trusted to: its gang stops at once and resumes from its last checkpoint.
    fn repair_gangs_on(
        &mut self,
        now: u64,
        node: &HostName,
        devices: &[u16],
        source: FenceSource,
        reason: &str,
        events: &mut Vec<Event>,
    ) {
        let holds = |j: &JobRecord| {
            j.lease.as_ref().is_some_and(|l| {
                let on_node = l.placement.tasks.iter().filter(|t| &t.host == node);
                on_node
                    .flat_map(|t| &t.devices)
                    .any(|d| devices.contains(&d.index))
            })
        };
        let holders: Vec<JobId> = self
            .jobs_on(node)
            .into_iter()
            .filter(|id| self.jobs.get(id).is_some_and(holds))
            .collect();
        for job in holders {
            let why = format!("device {} of {node} {reason}", devices_text(devices));
            if source == FenceSource::Operator && self.checkpoint_first(now, &job, &why, events) {
                continue;
            }
            let Some(record) = self.jobs.get_mut(&job) else {
                continue;
            };
            record.mark_repair();
            let why = format!("{why}; repairing from the last checkpoint");
            self.revoke_lease(now, &job, super::job_record::JobState::Pending, why, events);
        }
    }

    /// Starts a repair migration (checkpoint, then stop and repair) when the job can checkpoint
    /// and no migration is under way. Returns whether it started one.
    fn checkpoint_first(
        &mut self,
        now: u64,
        job: &JobId,
        why: &str,
        events: &mut Vec<Event>,
    ) -> bool {
        let Some(record) = self.jobs.get_mut(job) else {
            return false;
        };
        if record.refuse_migration().is_some() {
            return false;
        }
        let reason = MigrationReason::Repair {
            why: why.to_owned(),
        };
        record.start_migration(now, reason);
        record.note(now, format!("{why}; checkpointing before the repair"));
        self.checkpoint_requested(job, events);
        true
    }

    /// A host registered again with `devices`. Devices are matched by uuid and keep their
    /// index: one that is gone is failed and fenced (its gang repaired), one that came back stays
    /// fenced until health checks or an operator return it, a new one joins at the end. A known
    /// uuid may not change model, kind or NVLink domain. `Err` (nothing changed) names what is
    /// wrong.
    pub(super) fn reconcile_inventory(
        &mut self,
        now: u64,
        node: &HostName,
        devices: &[DeviceInventory],
        events: &mut Vec<Event>,
    ) -> Result<(), String> {
        let known = &self
            .nodes
            .get(node)
            .expect("known node")
            .registration
            .devices;
        let mut joined = Vec::new();
        for d in devices {
            match known.iter().find(|k| k.uuid == d.uuid) {
                Some(k) if k != d => {
                    return Err(format!(
                        "device {} re-registered as {} {} (NVLink domain {}) but was {} {} (NVLink domain {}); remove the node first",
                        d.uuid, d.kind, d.model, d.nvlink_domain, k.kind, k.model, k.nvlink_domain
                    ))
                }
                Some(_) => {}
                None => joined.push(d.clone()),
            }
        }
        let gone: Vec<u16> = known
            .iter()
            .enumerate()
            .filter(|(_, k)| !devices.iter().any(|d| d.uuid == k.uuid))
            .map(|(i, _)| i as u16)
            .collect();
        self.join_devices(now, node, joined)?;
        let record = self.nodes.get_mut(node).expect("known node");
        let count = record.registration.devices.len() as u16;
        for index in 0..count {
            record.device_mut(index).present = !gone.contains(&index);
        }
        if gone.is_empty() {
            return Ok(());
        }
        for index in gone {
            let record = self.device_record(node, index);
            if record.health != DeviceHealth::Failed {
                record.health = DeviceHealth::Failed;
                record.cause = "missing when its host registered again".to_owned();
                record.health_changed_at_ms = now;
            }
            let reason = "missing when its host registered again".to_owned();
            self.fence(now, node, index, FenceSource::Absent, reason, events);
        }
        Ok(())
    }

    /// Appends devices new to a host (models learned as at a first registration).
    fn join_devices(
        &mut self,
        now: u64,
        node: &HostName,
        joined: Vec<DeviceInventory>,
    ) -> Result<(), String> {
        if joined.is_empty() {
            return Ok(());
        }
        // Their kinds were checked with the whole registration (`apply_register_node`).
        self.learn_models(&joined);
        let specs = joined.iter().map(DeviceInventory::spec).collect();
        self.engine
            .add_devices(node, specs)
            .map_err(|e| e.to_string())?;
        if let Some(epochs) = self.device_epochs.get_mut(node) {
            epochs.resize(epochs.len() + joined.len(), 0);
        }
        let record = self.nodes.get_mut(node).expect("known node");
        record.fill_device_records();
        for d in joined {
            record.registration.devices.push(d);
            record.devices.push(DeviceRecord::healthy(now));
        }
        Ok(())
    }

    pub(super) fn apply_remove_node(
        &mut self,
        _now: u64,
        node: HostName,
        reason: String,
        events: &mut Vec<Event>,
    ) -> Response {
        let Some(record) = self.nodes.get(&node) else {
            return Response::Rejected(Rejection::UnknownNode(node));
        };
        let bad = |why: String| {
            Response::Rejected(Rejection::BadNode {
                node: node.clone(),
                why,
            })
        };
        if record.state == NodeState::Ready {
            return bad("it is ready; drain or cordon it first (or wait for it to be down)".into());
        }
        if let Err(e) = self.engine.remove_host(&node) {
            return bad(format!("{e}; drain it first"));
        }
        self.nodes.remove(&node);
        self.device_epochs.remove(&node);
        for (hosts, _) in self.reservations.values_mut() {
            hosts.remove(&node);
        }
        self.note_capacity_action(self.now_ms, format!("node {node} removed: {reason}"));
        events.push(Event::AllocationsChanged(node));
        events.push(Event::SchedulingNeeded);
        Response::Done
    }
}

/// "3" or "3, 5".
fn devices_text(devices: &[u16]) -> String {
    let names: Vec<String> = devices.iter().map(u16::to_string).collect();
    names.join(", ")
}
