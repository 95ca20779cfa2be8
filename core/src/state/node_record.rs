//! A host as the cluster remembers it, and the health of each of its devices.

use super::command::NodeRegistration;
use crate::engine::NodeState;
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub registration: NodeRegistration,
    pub state: NodeState,
    /// Why it is in that state (operator's words, or "missed heartbeats").
    pub state_reason: String,
    pub registered_at_ms: u64,
    pub state_changed_at_ms: u64,
    /// One record per device of `registration.devices`, same order. Older snapshots have none:
    /// [`NodeRecord::device`] reads a missing record as a healthy device.
    #[serde(default)]
    pub devices: Vec<DeviceRecord>,
    /// While draining: the log time after which what still runs there is stopped.
    #[serde(default)]
    pub drain_deadline_ms: Option<u64>,
}

impl NodeRecord {
    pub fn new(registration: NodeRegistration, now: u64) -> Self {
        let devices = vec![DeviceRecord::healthy(now); registration.devices.len()];
        Self {
            registration,
            state: NodeState::Ready,
            state_reason: "registered".to_owned(),
            registered_at_ms: now,
            state_changed_at_ms: now,
            devices,
            drain_deadline_ms: None,
        }
    }

    /// The index of the device with `uuid`.
    pub fn device_index(&self, uuid: &str) -> Option<u16> {
        let i = self
            .registration
            .devices
            .iter()
            .position(|d| d.uuid == uuid)?;
        u16::try_from(i).ok()
    }

    /// The health record of device `index` (healthy if an older snapshot had none).
    pub fn device(&self, index: u16) -> DeviceRecord {
        self.devices
            .get(usize::from(index))
            .cloned()
            .unwrap_or_else(|| DeviceRecord::healthy(self.registered_at_ms))
    }

    /// The record of device `index` to change (records are filled in for older snapshots).
    pub fn device_mut(&mut self, index: u16) -> &mut DeviceRecord {
        self.fill_device_records();
        &mut self.devices[usize::from(index)]
    }

    /// Gives every registered device a record (older snapshots have none).
    pub fn fill_device_records(&mut self) {
        let want = self.registration.devices.len();
        if self.devices.len() < want {
            let since = self.registered_at_ms;
            self.devices.resize(want, DeviceRecord::healthy(since));
        }
    }

    /// Devices fenced now.
    pub fn fenced_count(&self) -> usize {
        self.devices.iter().filter(|d| d.fence.is_some()).count()
    }
}

/// What the agent sees of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceHealth {
    Healthy,
    /// Works, but something is off (correctable errors over a threshold, thermal or power
    /// throttling): kept in service, shown to operators.
    Degraded,
    /// Fatal XID, uncorrectable ECC, lost by the driver, fell off the bus, or gone from the host:
    /// fenced.
    Failed,
}

impl fmt::Display for DeviceHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceHealth::Healthy => "healthy",
            DeviceHealth::Degraded => "degraded",
            DeviceHealth::Failed => "failed",
        })
    }
}

/// Who fenced a device, which decides how it returns to service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FenceSource {
    /// The agent reported it failed: back after [`CHECK_PASSES_TO_UNFENCE`] health checks pass
    /// in a row, unless it flaps (see [`FLAP_LIMIT`]).
    Health,
    /// It was missing when its host registered again: as `Health`, once it is back.
    Absent,
    /// An operator fenced it: only an operator unfences it.
    Operator,
}

impl fmt::Display for FenceSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FenceSource::Health => "health",
            FenceSource::Absent => "absent",
            FenceSource::Operator => "operator",
        })
    }
}

/// A device out of service: no new lease is placed on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    pub source: FenceSource,
    pub reason: String,
    pub since_ms: u64,
}

/// Health checks that must pass in a row before a device fenced for its health serves again.
pub const CHECK_PASSES_TO_UNFENCE: u32 = 3;

/// A device fenced for its health this many times since an operator last unfenced it stays fenced
/// until an operator unfences it: a flapping device is not returned to service forever.
pub const FLAP_LIMIT: u32 = 3;

/// One device of a host: its health as last reported, and its fence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub health: DeviceHealth,
    /// What the agent said about it last ("XID 79: fell off the bus").
    pub cause: String,
    pub health_changed_at_ms: u64,
    pub fence: Option<Fence>,
    /// Health checks passed in a row while fenced.
    pub check_passes: u32,
    /// Fences for its health since an operator last unfenced it.
    pub health_fences: u32,
    /// Whether its host reported it when it last registered.
    pub present: bool,
}

impl DeviceRecord {
    pub fn healthy(now: u64) -> Self {
        Self {
            health: DeviceHealth::Healthy,
            cause: String::new(),
            health_changed_at_ms: now,
            fence: None,
            check_passes: 0,
            health_fences: 0,
            present: true,
        }
    }

    /// Whether passing health checks may return it to service (not an operator's fence, not
    /// flapping past [`FLAP_LIMIT`], present on its host).
    pub fn checks_may_unfence(&self) -> bool {
        let by_health = self
            .fence
            .as_ref()
            .is_some_and(|f| f.source != FenceSource::Operator);
        by_health && self.present && self.health_fences < FLAP_LIMIT
    }

    /// For people: "fenced (health, since 12 s): XID 79" or "degraded: 1,204 correctable ECC".
    pub fn describe(&self) -> String {
        match &self.fence {
            Some(f) if self.health_fences >= FLAP_LIMIT && f.source != FenceSource::Operator => {
                format!(
                    "fenced ({}; flapping: {} fences, an operator must unfence): {}",
                    f.source, self.health_fences, f.reason
                )
            }
            Some(f) => format!("fenced ({}): {}", f.source, f.reason),
            None if self.cause.is_empty() => self.health.to_string(),
            None => format!("{}: {}", self.health, self.cause),
        }
    }
}
