//! The engine's output: what to place where, whom to preempt, and why the rest waits.

use super::topology::TopologyLevel;
use gangway_proto::ids::{HostName, JobId, QueueName};
use serde::{Deserialize, Serialize};

/// A share of one device given to a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeviceShare {
    /// Device index on its host.
    pub index: u16,
    /// 1000 for a whole device, less for a fractional share.
    pub milli: u32,
}

/// Where one task (one rank) of a gang goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskPlacement {
    pub host: HostName,
    pub devices: Vec<DeviceShare>,
    pub cpu_milli: u64,
    pub memory_mib: u64,
}

/// A whole gang's placement: every task, or the gang is not in the plan at all.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GangPlacement {
    pub job: JobId,
    pub queue: QueueName,
    /// Task `i` of the gang is rank `i`.
    pub tasks: Vec<TaskPlacement>,
    /// Milli-devices of this gang beyond its queue's guarantee: borrowed idle capacity that the owner
    /// may reclaim by preemption. Zero when the gang fits inside its queue's quota.
    pub borrowed_milli: u64,
}

/// Why a running gang is to be stopped (checkpoint first) to make room.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreemptionReason {
    /// A gang of higher priority needs the devices.
    HigherPriority {
        victim_priority: i32,
        preemptor_priority: i32,
    },
    /// The victim's queue borrows beyond its guarantee and the owner queue reclaims its quota.
    QuotaReclaim {
        owner_queue: QueueName,
        borrower_queue: QueueName,
    },
}

/// One victim of a preemption, and for whom.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preemption {
    pub victim: JobId,
    pub preemptor: JobId,
    pub reason: PreemptionReason,
}

/// A pending job and why it is still pending, in words a person understands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingJob {
    pub job: JobId,
    pub reason: PendingReason,
}

/// Why a gang could not be placed in this round. `Display` gives the sentence shown to people;
/// the variant is for metrics and scripts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PendingReason {
    /// No host in the cluster has devices this job accepts (kind/model), whatever is free.
    NoMatchingDevices { wanted: String },
    /// No host has as many devices as one task asks for, free or not: the job cannot be placed
    /// as written until such hosts join.
    NeverFits {
        wanted: String,
        per_task: u32,
        largest_host: u64,
    },
    /// The cluster as a whole lacks the free capacity.
    InsufficientCapacity {
        wanted: String,
        needed: u64,
        free: u64,
    },
    /// Enough capacity exists, but not inside one domain of the required level.
    NoDomainFits {
        wanted: String,
        level: TopologyLevel,
        needed: u64,
        largest_free_block: u64,
    },
    /// The job's queue has reached what the policy lets it use.
    QuotaExceeded {
        queue: QueueName,
        limit_milli: u64,
        used_milli: u64,
    },
    /// Victims are being preempted for this job; it is placed once they are gone.
    AwaitingPreemption { victims: Vec<JobId> },
    /// An earlier job holds the head of the queue (FIFO) or a backfill reservation.
    BlockedBehind { job: JobId, why: String },
    /// Anything a policy plugin reports that has no variant of its own.
    Policy { plugin: String, message: String },
    /// Enough devices are free (in the required domain, if any), but no set of hosts can take the
    /// tasks with their devices, CPU and memory (shape or host resources).
    NoHostFits {
        wanted: String,
        free: u64,
        detail: String,
    },
    /// The cluster lacks the free capacity because devices it could use are fenced (failed, or
    /// taken out of service by an operator).
    DevicesFenced {
        wanted: String,
        needed: u64,
        free: u64,
        fenced: u64,
    },
    /// A restart after a failure waits out its backoff until log time `until_ms`.
    Backoff { until_ms: u64 },
    /// Submitted (or re-queued) since the last round: no round has looked at it yet.
    Unscheduled,
    /// Its lease ended for a reason that is not its own (preempted, node lost, migrated, reclaimed)
    /// and it waits to be placed again: `why` says what happened.
    Requeued { why: String },
    /// A round placed it, but the state changed before the plan committed.
    PlanStale { detail: String },
}

impl std::fmt::Display for PendingReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PendingReason::NoMatchingDevices { wanted } => {
                write!(f, "needs {wanted}; no host in the cluster has such devices")
            }
            PendingReason::NeverFits {
                wanted,
                per_task,
                largest_host,
            } => write!(
                f,
                "needs {wanted}: each task needs {per_task} devices on one host, but the largest host has {largest_host}; it cannot be placed until such hosts join"
            ),
            PendingReason::InsufficientCapacity {
                wanted,
                needed,
                free,
            } => write!(
                f,
                "needs {wanted} ({needed} in all); only {free} are free in the cluster"
            ),
            PendingReason::NoDomainFits {
                wanted,
                level,
                needed,
                largest_free_block,
            } => write!(
                f,
                "needs {wanted} within one {level} ({needed} in all); largest free block in any {level} is {largest_free_block}"
            ),
            PendingReason::QuotaExceeded {
                queue,
                limit_milli,
                used_milli,
            } => write!(
                f,
                "queue {queue} may use {} devices and already uses {}",
                fmt_milli(*limit_milli),
                fmt_milli(*used_milli)
            ),
            PendingReason::AwaitingPreemption { victims } => {
                let names: Vec<&str> = victims.iter().map(|v| v.as_str()).collect();
                write!(
                    f,
                    "waiting for preempted job(s) {} to checkpoint and stop",
                    names.join(", ")
                )
            }
            PendingReason::BlockedBehind { job, why } => {
                write!(f, "waiting behind job {job}: {why}")
            }
            PendingReason::Policy { plugin, message } => write!(f, "{plugin}: {message}"),
            PendingReason::NoHostFits {
                wanted,
                free,
                detail,
            } => write!(f, "needs {wanted}; {free} are free but {detail}"),
            PendingReason::DevicesFenced {
                wanted,
                needed,
                free,
                fenced,
            } => write!(
                f,
                "needs {wanted} ({needed} in all); only {free} are free and {fenced} more are fenced (failed or out of service)"
            ),
            PendingReason::Backoff { until_ms } => write!(
                f,
                "restarting after a failure: backing off until log time {until_ms} ms"
            ),
            PendingReason::Unscheduled => f.write_str("waiting for the next scheduling round"),
            PendingReason::Requeued { why } => f.write_str(why),
            PendingReason::PlanStale { detail } => {
                write!(f, "placement went stale before it committed: {detail}")
            }
        }
    }
}

/// Milli-devices as a device count for people ("2.5", "8").
pub fn fmt_milli(milli: u64) -> String {
    if milli % 1000 == 0 {
        (milli / 1000).to_string()
    } else {
        format!("{:.3}", milli as f64 / 1000.0)
            .trim_end_matches('0')
            .to_string()
    }
}

/// Everything one scheduling round decided. Applying it is all-or-nothing per gang: a gang whose
/// placement no longer fits when the plan is applied is discarded whole and stays pending.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub placements: Vec<GangPlacement>,
    pub preemptions: Vec<Preemption>,
    pub pending: Vec<PendingJob>,
}
