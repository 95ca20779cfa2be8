//! The placement engine: pure, deterministic, no I/O.
//!
//! [`schedule`] runs one round: queue order (priority, submission time, job id) -> admit (quota and
//! head-of-line rules of the policy) -> filter (per host: ready, accepted kind/model, free devices,
//! CPU, memory) -> candidate domains (every domain of the required level; narrowest first for
//! topology-aware policies) -> score whole-gang placements -> commit into the round's overlay
//! ([`index::Overlay`]) so later gangs see earlier ones, or discard whole. Gangs that are not
//! placed get a [`PendingReason`] whose `Display` is a sentence for people; higher-priority gangs
//! may name preemption victims ([`preemption`]).
//!
//! Policies ([`policy`], selected by `SchedulerConfig::policy`): `first-fit`, `best-fit`, `fgd`,
//! `static-quota`, `backfill` and `gangway` (the default), each a [`framework::Policy`].
//!
//! [`round::run_round`] is the one function that assembles a scheduling round around [`schedule`]:
//! preemptions not started twice, the defragmenter on the state the round leaves, only changed
//! pending reasons. The leader, the `defrag plan` preview and the simulator call it; the caller
//! commits its outcome as commands, which the state machine re-checks.

pub mod cluster;
pub mod config;
pub mod defrag;
pub mod device;
pub mod fragmentation;
pub mod framework;
pub mod host;
pub mod index;
pub mod job;
pub mod plan;
pub mod policy;
pub mod preemption;
pub mod quota;
pub mod round;
pub mod schedule;
pub mod topology;

pub use cluster::{ClusterState, PlacementError, RunningGang};
pub use config::{IdleAction, IdlePolicy, PolicyName, QueueConfig, SchedulerConfig, WorkloadClass};
pub use defrag::{
    blocked_by_shape, plan_defrag, scattered_free_permille, DefragBudget, DefragPlan, Move,
};
pub use device::{DeviceKind, DeviceModel, DeviceSpec, MILLI_PER_DEVICE};
pub use host::{HostSpec, HostState, NodeState};
pub use job::{join_hosts, DeviceDemand, GangRequest, HostFilter, Resume, TaskDemand};
pub use plan::{
    DeviceShare, GangPlacement, PendingJob, PendingReason, Plan, Preemption, PreemptionReason,
    TaskPlacement,
};
pub use round::{
    run_round, DefragLimits, DefragProposal, LeaseFacts, RoundInput, RoundOutcome, RoundState,
};
pub use schedule::{describe_wanted, schedule};
pub use topology::{HostTopology, TopologyLevel};
