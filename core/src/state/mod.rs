//! The replicated cluster state (the FSM): nodes, jobs, leases, queues and checkpoints, changed only
//! by [`Command`]s applied in log order.
//!
//! The consensus layer calls [`ClusterStore::apply`] with the leader-stamped time of each entry; the
//! engine reads [`ClusterStore::engine`] as its snapshot; workers read [`ClusterStore::allocations_for`].

pub mod access;
mod apply_devices;
mod apply_jobs;
mod apply_nodes;
mod apply_plan;
pub mod audit;
pub mod command;
mod consistency;
pub mod job_record;
pub mod job_table;
pub mod node_record;
pub mod retention;
mod round;
pub mod store;

pub use audit::{AuditEntry, AuditLog, AuditNote, DEFAULT_MAX_AUDIT_ENTRIES};
pub use command::{
    CheckpointFailure, CheckpointManifest, CheckpointReport, Command, DefragMove, DefragOrder,
    DeviceFenceChange, DeviceHealthReport, DeviceInventory, Event, HealthCheckReport, IdleReport,
    NodeRegistration, NodeStateChange, Rejection, Response, Submission, SubmittedJob, TaskReport,
    TaskState, MAX_BATCH_JOBS, MAX_BATCH_REPORTS,
};
pub use job_record::{JobRecord, JobState, Lease, Migration, MigrationReason, RunCause, RunRecord};
pub use job_table::JobTable;
pub use node_record::{
    DeviceHealth, DeviceRecord, Fence, FenceSource, NodeRecord, CHECK_PASSES_TO_UNFENCE, FLAP_LIMIT,
};
pub use retention::{Limits, Prune, PRUNE_BATCH};
pub use round::{defragment_command, RoundRead};
pub use store::{Allocation, ClusterStore, MIGRATION_SLACK_MS, RESTORE_JUMP};
