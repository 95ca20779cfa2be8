//! What a pending gang asks for.

use super::device::DeviceKind;
use super::topology::TopologyLevel;
use gangway_proto::ids::{JobId, QueueName};
use serde::{Deserialize, Serialize};

/// The devices one task of a gang needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceDemand {
    /// A CPU-only task.
    None,
    /// `n >= 1` whole devices.
    Whole(u32),
    /// A share of one device, in milli-devices (1..=999), as openb's `gpu_milli`.
    Fraction(u32),
}

impl DeviceDemand {
    /// Demand in milli-devices, for capacity arithmetic.
    pub fn milli(self) -> u64 {
        match self {
            DeviceDemand::None => 0,
            DeviceDemand::Whole(n) => u64::from(n) * 1000,
            DeviceDemand::Fraction(m) => u64::from(m),
        }
    }
}

/// What each task of a gang needs; all tasks of a gang are alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskDemand {
    pub devices: DeviceDemand,
    pub cpu_milli: u64,
    pub memory_mib: u64,
}

/// A gang waiting to be placed: `tasks` x `per_task`, all or nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GangRequest {
    pub id: JobId,
    pub queue: QueueName,
    /// Higher runs first and may preempt lower.
    pub priority: i32,
    /// Gang size (world size), >= 1.
    pub tasks: u32,
    pub per_task: TaskDemand,
    pub kind: DeviceKind,
    /// Accepted models; empty accepts any model of `kind`.
    pub models: Vec<String>,
    /// All tasks must sit inside one domain of this level.
    pub required: Option<TopologyLevel>,
    /// Tighter packing the scorer prefers when it can have it.
    pub preferred: Option<TopologyLevel>,
    /// The submitter's runtime estimate, used by backfill; `None` when unknown.
    pub estimated_runtime_ms: Option<u64>,
    /// The job can be checkpointed and so preempted or migrated without losing work.
    pub checkpointable: bool,
    /// Log time of submission (never a local clock): FIFO order and ageing.
    pub submitted_at_ms: u64,
}

impl GangRequest {
    /// Total milli-devices the gang needs.
    pub fn total_milli(&self) -> u64 {
        self.per_task.devices.milli() * u64::from(self.tasks)
    }

    /// Whole devices the gang needs (fractions count as one device each).
    pub fn total_devices(&self) -> u64 {
        match self.per_task.devices {
            DeviceDemand::None => 0,
            DeviceDemand::Whole(n) => u64::from(n) * u64::from(self.tasks),
            DeviceDemand::Fraction(_) => u64::from(self.tasks),
        }
    }

    pub fn accepts_model(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }
}
