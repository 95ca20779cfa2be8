//! Scheduler configuration: which policy, queues and their quotas, preemption rules.

use super::device::DeviceKind;
use super::job::TaskDemand;
use gangway_proto::ids::QueueName;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// The placement policies the engine knows. Baselines are policies like ours, so the simulator
/// compares them on the same code path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyName {
    /// FIFO queue, first host (in a stable order) that fits.
    FirstFit,
    /// The host/domain that leaves the least free capacity behind.
    BestFit,
    /// Fragmentation Gradient Descent (Weng et al., USENIX ATC'23).
    Fgd,
    /// Each queue confined to a fixed reservation of its quota; no borrowing.
    StaticQuota,
    /// EASY backfill: FIFO with a reservation for the head, smaller jobs fill in when they end in time.
    Backfill,
    /// Gangway's default policy.
    Gangway,
}

impl PolicyName {
    pub const ALL: [PolicyName; 6] = [
        PolicyName::FirstFit,
        PolicyName::BestFit,
        PolicyName::Fgd,
        PolicyName::StaticQuota,
        PolicyName::Backfill,
        PolicyName::Gangway,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PolicyName::FirstFit => "first-fit",
            PolicyName::BestFit => "best-fit",
            PolicyName::Fgd => "fgd",
            PolicyName::StaticQuota => "static-quota",
            PolicyName::Backfill => "backfill",
            PolicyName::Gangway => "gangway",
        }
    }
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error for an unknown policy name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown policy {0:?}: expected one of first-fit, best-fit, fgd, static-quota, backfill, gangway")]
pub struct UnknownPolicy(pub String);

impl FromStr for PolicyName {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PolicyName::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownPolicy(s.to_owned()))
    }
}

/// A queue and the capacity it is guaranteed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    pub name: QueueName,
    /// Milli-devices guaranteed to this queue (per device kind it uses). A queue under its guarantee
    /// may reclaim it from borrowers by preemption.
    pub guaranteed_milli: u64,
    /// Whether the queue may use idle capacity beyond its guarantee (borrowing).
    pub may_borrow: bool,
    /// What happens to this queue's leases whose devices sit idle; `None`: nothing.
    #[serde(default)]
    pub idle: Option<IdlePolicy>,
}

/// A queue's rule for leases that hold devices without using them: when every device of a lease
/// reports utilization below `threshold_pct` for `window_ms` on end, the leader acts (`action`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdlePolicy {
    pub window_ms: u64,
    /// A device counts as busy at this utilization (percent) or above.
    pub threshold_pct: u32,
    pub action: IdleAction,
}

/// What the leader does with a lease idle for its queue's window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdleAction {
    /// Checkpoint (when the job can), release the devices and re-queue the job behind the jobs
    /// already waiting.
    Reclaim,
    /// Only say so: a line in the job's history and a metric; the job keeps its devices.
    Report,
}

impl IdleAction {
    pub fn as_str(self) -> &'static str {
        match self {
            IdleAction::Reclaim => "reclaim",
            IdleAction::Report => "report",
        }
    }
}

impl FromStr for IdleAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "reclaim" => Ok(IdleAction::Reclaim),
            "report" => Ok(IdleAction::Report),
            other => Err(format!("{other:?}: expected reclaim or report")),
        }
    }
}

impl IdlePolicy {
    /// The policy in words, for history lines and tables: "below 5% for 30m, reclaim".
    pub fn describe(&self) -> String {
        format!(
            "below {}% for {}, {}",
            self.threshold_pct,
            humantime::format_duration(std::time::Duration::from_millis(self.window_ms)),
            self.action.as_str()
        )
    }
}

/// A class of task the cluster expects to host, with its share of the workload. FGD's fragmentation
/// measure, and the gangway policy's, are taken against this distribution.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkloadClass {
    pub kind: DeviceKind,
    pub demand: TaskDemand,
    /// Accepted models; empty accepts any.
    pub models: Vec<String>,
    /// Gang size of the class (1 for single tasks).
    pub tasks: u32,
    /// Relative frequency; the engine normalises.
    pub weight: f64,
}

/// Everything that tunes a scheduling round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    pub policy: PolicyName,
    /// Whether the plan may preempt lower-priority or borrowing gangs.
    pub preemption: bool,
    /// A gang that has run less than this is not preempted (hysteresis against thrashing).
    pub min_runtime_ms: u64,
    /// The expected workload for fragmentation-aware scoring; empty means "learn from the pending
    /// queue and the running gangs".
    pub workload: Vec<WorkloadClass>,
    /// Upper bound on gangs examined in one round, so a huge backlog cannot stall the leader.
    pub max_gangs_per_round: usize,
    /// Queue guarantees by queue name (ordered map: deterministic iteration).
    pub queues: BTreeMap<QueueName, QueueConfig>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            policy: PolicyName::Gangway,
            preemption: true,
            min_runtime_ms: 10 * 60 * 1000,
            workload: Vec::new(),
            max_gangs_per_round: 100_000,
            queues: BTreeMap::new(),
        }
    }
}
