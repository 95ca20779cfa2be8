//! Apply functions for node and queue commands.

use super::command::{
    DeviceInventory, Event, NodeRegistration, NodeStateChange, Rejection, Response,
    DEFAULT_DRAIN_GRACE_MS,
};
use super::job_record::{JobState, MigrationReason};
use super::node_record::NodeRecord;
use super::store::ClusterStore;
use crate::engine::{DeviceModel, HostFilter, HostSpec, NodeState, QueueConfig};
use gangway_proto::ids::{HostName, JobId};

impl ClusterStore {
    pub(super) fn apply_register_node(
        &mut self,
        now: u64,
        reg: NodeRegistration,
        events: &mut Vec<Event>,
    ) -> Response {
        let name = reg.name.clone();
        let bad = |why: String| {
            Response::Rejected(Rejection::BadNode {
                node: name.clone(),
                why,
            })
        };
        // A model name means one kind everywhere: a host may not call a TPU "H100".
        for (i, d) in reg.devices.iter().enumerate() {
            if let Some(known) = self.engine.model(&d.model) {
                if known.kind != d.kind {
                    return bad(format!(
                        "device {i} reports model {} as {} but the cluster knows it as {}",
                        d.model, d.kind, known.kind
                    ));
                }
            }
        }
        if let Some(existing) = self.nodes.get(&name) {
            // A restarted worker registers again. Its place in the topology, CPU and memory are
            // what the cluster holds leases against: a moved host must be drained and removed
            // first. Its devices may have changed (see `reconcile_inventory`).
            if existing.registration.topology != reg.topology
                || existing.registration.cpu_milli != reg.cpu_milli
                || existing.registration.memory_mib != reg.memory_mib
            {
                return bad(
                    "re-registered with a different topology, CPU or memory; drain and remove the node first"
                        .to_owned(),
                );
            }
            if let Err(why) = self.reconcile_inventory(now, &name, &reg.devices, events) {
                return bad(why);
            }
            let existing = self.nodes.get_mut(&name).expect("checked");
            existing.registration.address = reg.address;
            if existing.state == NodeState::Down {
                existing.state = NodeState::Ready;
                existing.state_reason = "registered again".to_owned();
                existing.state_changed_at_ms = now;
                self.engine.set_node_state(&name, NodeState::Ready);
                events.push(Event::SchedulingNeeded);
            }
            events.push(Event::AllocationsChanged(name));
            return Response::Done;
        }
        self.learn_models(&reg.devices);
        let spec = HostSpec {
            name: name.clone(),
            topology: reg.topology.clone(),
            cpu_milli: reg.cpu_milli,
            memory_mib: reg.memory_mib,
            devices: reg.devices.iter().map(DeviceInventory::spec).collect(),
            state: NodeState::Ready,
        };
        if let Err(e) = self.engine.add_host(spec) {
            return bad(e.to_string());
        }
        self.device_epochs
            .insert(name.clone(), vec![0; reg.devices.len()]);
        self.nodes.insert(name.clone(), NodeRecord::new(reg, now));
        events.push(Event::AllocationsChanged(name));
        events.push(Event::SchedulingNeeded);
        Response::Done
    }

    /// Adds the models of `devices` the cluster does not know yet (their kinds were checked
    /// against the known models first).
    pub(super) fn learn_models(&mut self, devices: &[DeviceInventory]) {
        for d in devices {
            if self.engine.model(&d.model).is_none() {
                self.engine.add_model(DeviceModel {
                    name: d.model.clone(),
                    kind: d.kind,
                    memory_mib: d.memory_mib,
                });
            }
        }
    }

    pub(super) fn apply_set_node_state(
        &mut self,
        now: u64,
        change: NodeStateChange,
        events: &mut Vec<Event>,
    ) -> Response {
        let NodeStateChange {
            node,
            state,
            reason,
            grace_ms,
        } = change;
        if state == NodeState::Down {
            return self.apply_node_down(now, node, reason, events);
        }
        let Some(record) = self.nodes.get_mut(&node) else {
            return Response::Rejected(Rejection::UnknownNode(node));
        };
        if record.state != state {
            record.state = state;
            record.state_reason = reason;
            record.state_changed_at_ms = now;
            record.drain_deadline_ms = (state == NodeState::Draining)
                .then(|| now.saturating_add(grace_ms.unwrap_or(DEFAULT_DRAIN_GRACE_MS)));
            self.engine.set_node_state(&node, state);
            if state == NodeState::Draining {
                self.move_off(now, &node, events);
            }
            events.push(Event::SchedulingNeeded);
        }
        Response::Done
    }

    /// The jobs holding a lease with a task on `node`, by id, from the job table's leases-by-node
    /// index (re-filed first: an apply function may have changed jobs before asking).
    pub(super) fn jobs_on(&mut self, node: &HostName) -> Vec<JobId> {
        self.jobs.reindex();
        self.jobs.on_node(node).map(|j| j.id.clone()).collect()
    }

    /// A drain begins: every checkpointable gang on `node` checkpoints and moves elsewhere (a
    /// failed checkpoint leaves it running until the drain's deadline); the others run until
    /// the deadline.
    fn move_off(&mut self, now: u64, node: &HostName, events: &mut Vec<Event>) {
        for job in self.jobs_on(node) {
            let Some(record) = self.jobs.get_mut(&job) else {
                continue;
            };
            if record.refuse_migration().is_some() {
                continue;
            }
            let hosts = HostFilter {
                avoid: [node.clone()].into(),
                ..HostFilter::default()
            };
            record.start_migration(now, MigrationReason::Move { hosts });
            record.note(
                now,
                format!("node {node} is draining: checkpointing to move"),
            );
            self.checkpoint_requested(&job, events);
        }
    }

    /// The drain of `node` passed its deadline: what still runs there stops and is re-queued from
    /// its last checkpoint, away from the node.
    pub(super) fn apply_drain_deadline(
        &mut self,
        now: u64,
        node: HostName,
        events: &mut Vec<Event>,
    ) -> Response {
        let Some(record) = self.nodes.get(&node) else {
            return Response::Rejected(Rejection::UnknownNode(node));
        };
        let due = record.drain_deadline_ms.is_some_and(|d| now >= d);
        if record.state != NodeState::Draining || !due {
            return Response::Rejected(Rejection::BadNode {
                node,
                why: "it is not draining past its deadline".to_owned(),
            });
        }
        for job in self.jobs_on(&node) {
            if let Some(record) = self.jobs.get_mut(&job) {
                record.next_hosts.avoid.insert(node.clone());
            }
            let why = format!("node {node} drained: its deadline passed; stopped and re-queued from the last checkpoint");
            self.revoke_lease(now, &job, JobState::Pending, why, events);
        }
        Response::Done
    }

    /// Marks the node down and re-queues every gang with a task on it, from its last checkpoint.
    pub(super) fn apply_node_down(
        &mut self,
        now: u64,
        node: HostName,
        reason: String,
        events: &mut Vec<Event>,
    ) -> Response {
        let Some(record) = self.nodes.get_mut(&node) else {
            return Response::Rejected(Rejection::UnknownNode(node));
        };
        if record.state == NodeState::Down {
            return Response::Done;
        }
        record.state = NodeState::Down;
        record.state_reason = reason.clone();
        record.state_changed_at_ms = now;
        self.engine.set_node_state(&node, NodeState::Down);
        let affected = self.jobs_on(&node);
        for job in affected {
            // A lost host is the infrastructure's failure: the gang is repaired, not counted.
            if let Some(record) = self.jobs.get_mut(&job) {
                record.mark_repair();
            }
            self.revoke_lease(
                now,
                &job,
                JobState::Pending,
                format!("node {node} went down ({reason}); re-queued"),
                events,
            );
        }
        events.push(Event::AllocationsChanged(node));
        events.push(Event::SchedulingNeeded);
        Response::Done
    }

    pub(super) fn apply_set_queue(
        &mut self,
        queue: QueueConfig,
        events: &mut Vec<Event>,
    ) -> Response {
        self.queues.insert(queue.name.clone(), queue);
        events.push(Event::SchedulingNeeded);
        Response::Done
    }
}
