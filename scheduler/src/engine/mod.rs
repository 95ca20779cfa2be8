//! The placement engine: pure, deterministic, no I/O.
//!
//! `schedule(&ClusterState, &[GangRequest], &SchedulerConfig) -> Plan` is the whole contract. The
//! caller (the leader's scheduling loop, the simulator, a test) owns the state, applies the plan through
//! [`ClusterState::apply_placement`] (which re-checks it) and calls again on the next event.

pub mod cluster;
pub mod config;
pub mod device;
pub mod host;
pub mod job;
pub mod plan;
pub mod topology;

pub use cluster::{ClusterState, PlacementError, RunningGang};
pub use config::{PolicyName, QueueConfig, SchedulerConfig, WorkloadClass};
pub use device::{DeviceKind, DeviceModel, DeviceSpec, MILLI_PER_DEVICE};
pub use host::{HostSpec, HostState, NodeState};
pub use job::{DeviceDemand, GangRequest, TaskDemand};
pub use plan::{
    DeviceShare, GangPlacement, PendingJob, PendingReason, Plan, Preemption, PreemptionReason,
    TaskPlacement,
};
pub use topology::{HostTopology, TopologyLevel};
