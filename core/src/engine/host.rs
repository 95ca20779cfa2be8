//! A host (node) and what is free on it right now.

use super::device::{DeviceSpec, MILLI_PER_DEVICE};
use super::topology::HostTopology;
use gangway_proto::ids::HostName;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// What the control plane lets the scheduler do with a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Accepts new work.
    Ready,
    /// Keeps what runs, takes nothing new.
    Cordoned,
    /// Takes nothing new; its work is being moved away.
    Draining,
    /// Missed its heartbeats: takes nothing, its leases are revoked.
    Down,
}

impl NodeState {
    pub fn accepts_new_work(self) -> bool {
        matches!(self, NodeState::Ready)
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeState::Ready => "ready",
            NodeState::Cordoned => "cordoned",
            NodeState::Draining => "draining",
            NodeState::Down => "down",
        })
    }
}

/// A host as registered: its place in the tree, its CPU and memory, its devices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSpec {
    pub name: HostName,
    pub topology: HostTopology,
    pub cpu_milli: u64,
    pub memory_mib: u64,
    pub devices: Vec<DeviceSpec>,
    pub state: NodeState,
}

/// A host and its free capacity. Free capacity is derived from the placements the cluster holds;
/// it is kept here (not recomputed) because the engine reads it for every candidate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostState {
    pub spec: HostSpec,
    /// Free milli-devices per device index (1000 = the whole device is free).
    pub free_milli: Vec<u32>,
    pub free_cpu_milli: u64,
    pub free_memory_mib: u64,
    /// Fenced devices (failed, or fenced by an operator): device index -> the milli-devices held
    /// back from `free_milli`. A fenced device takes no new work; what its running gangs give
    /// back stays held until it is unfenced, so its `free_milli` is 0 for every reader.
    #[serde(default)]
    pub fenced: BTreeMap<u16, u32>,
}

impl HostState {
    pub fn new(spec: HostSpec) -> Self {
        let free_milli = vec![MILLI_PER_DEVICE; spec.devices.len()];
        Self {
            free_cpu_milli: spec.cpu_milli,
            free_memory_mib: spec.memory_mib,
            free_milli,
            spec,
            fenced: BTreeMap::new(),
        }
    }

    /// Fences device `index`: what is free on it is held back. False if it was fenced already.
    pub fn fence(&mut self, index: u16) -> bool {
        if self.fenced.contains_key(&index) {
            return false;
        }
        let held = std::mem::take(&mut self.free_milli[usize::from(index)]);
        self.fenced.insert(index, held);
        true
    }

    /// Returns fenced device `index` to service. False if it was not fenced.
    pub fn unfence(&mut self, index: u16) -> bool {
        let Some(held) = self.fenced.remove(&index) else {
            return false;
        };
        self.free_milli[usize::from(index)] += held;
        true
    }

    pub fn is_fenced(&self, index: u16) -> bool {
        self.fenced.contains_key(&index)
    }

    /// Gives `milli` of device `index` back (a gang released it): held while the device is
    /// fenced.
    fn give_back(&mut self, index: u16, milli: u32) {
        match self.fenced.get_mut(&index) {
            Some(held) => *held += milli,
            None => self.free_milli[usize::from(index)] += milli,
        }
    }

    /// Takes back everything `placement`'s task on this host held.
    pub(super) fn release_task(&mut self, task: &super::plan::TaskPlacement) {
        for share in &task.devices {
            self.give_back(share.index, share.milli);
        }
        self.free_cpu_milli += task.cpu_milli;
        self.free_memory_mib += task.memory_mib;
    }

    /// Appends devices that joined the host (a re-registration with a changed inventory); the
    /// existing indexes never move, so leases keep naming the same devices.
    pub(super) fn add_devices(&mut self, devices: Vec<DeviceSpec>) {
        for d in devices {
            self.free_milli.push(MILLI_PER_DEVICE);
            self.spec.devices.push(d);
        }
    }

    /// Devices that are wholly free.
    pub fn free_whole_devices(&self) -> usize {
        self.free_milli
            .iter()
            .filter(|m| **m == MILLI_PER_DEVICE)
            .count()
    }
}

impl HostSpec {
    /// A ready host with `devices` devices of one model, split evenly into `nvlink_domains`
    /// NVLink domains (1 for one domain).
    pub fn uniform(
        name: impl Into<String>,
        topology: HostTopology,
        model: &str,
        devices: u16,
        nvlink_domains: u16,
        cpu_milli: u64,
        memory_mib: u64,
    ) -> Self {
        let per = devices.div_ceil(nvlink_domains.max(1)).max(1);
        Self {
            name: HostName::new(name),
            topology,
            cpu_milli,
            memory_mib,
            devices: (0..devices)
                .map(|i| DeviceSpec {
                    model: model.to_owned(),
                    nvlink_domain: i / per,
                })
                .collect(),
            state: NodeState::Ready,
        }
    }
}
