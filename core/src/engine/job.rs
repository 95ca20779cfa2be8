//! What a pending gang asks for.

use super::device::DeviceKind;
use super::topology::TopologyLevel;
use gangway_proto::ids::{HostName, JobId, QueueName};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

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
    /// Hosts this placement may or may not use: set by an operator's `job migrate --to/--avoid`,
    /// or by default the hosts a migrating job leaves.
    #[serde(default)]
    pub hosts: HostFilter,
    /// How a gang that ran before comes back (a repair, a restart's backoff); default for a gang
    /// that never ran.
    #[serde(default)]
    pub resume: Resume,
}

/// How a gang that held a lease before is placed again.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// Its lease ended because a device it held failed: it goes before ordinary pending work
    /// (every queue, every priority), as Slurm's expedited requeue.
    pub repair: bool,
    /// Hosts it ran on that are still healthy: the placement keeps them where the gang's topology
    /// constraint allows.
    pub prefer: BTreeSet<HostName>,
    /// Not placed before this log time (the backoff of a restart after a failure); 0: no wait.
    pub not_before_ms: u64,
}

/// Which hosts a gang may be placed on. Empty: any host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFilter {
    /// When not empty, only these hosts.
    pub only: BTreeSet<HostName>,
    /// Never these hosts.
    pub avoid: BTreeSet<HostName>,
}

impl HostFilter {
    pub fn is_empty(&self) -> bool {
        self.only.is_empty() && self.avoid.is_empty()
    }

    pub fn allows(&self, host: &HostName) -> bool {
        (self.only.is_empty() || self.only.contains(host)) && !self.avoid.contains(host)
    }

    /// For people: "to a, b, avoiding c" (the parts that are set); empty for no filter.
    pub fn describe(&self) -> String {
        let mut words = Vec::new();
        if !self.only.is_empty() {
            words.push(format!("to {}", join_hosts(&self.only)));
        }
        if !self.avoid.is_empty() {
            words.push(format!("avoiding {}", join_hosts(&self.avoid)));
        }
        words.join(", ")
    }
}

/// Host names, comma-separated, for messages.
pub fn join_hosts(hosts: &BTreeSet<HostName>) -> String {
    hosts
        .iter()
        .map(HostName::as_str)
        .collect::<Vec<_>>()
        .join(", ")
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

impl GangRequest {
    /// A gang of `tasks` tasks each needing `devices` GPUs (any model), with defaults that tests,
    /// tools and the simulator override with the `with_*` methods: queue `default`, priority 0,
    /// 1 CPU core and 1 GiB per task, no topology constraint, no runtime estimate, not
    /// checkpointable, submitted at 0.
    pub fn new(id: impl Into<String>, tasks: u32, devices: DeviceDemand) -> Self {
        Self {
            id: JobId::new(id),
            queue: QueueName::new("default"),
            priority: 0,
            tasks,
            per_task: TaskDemand {
                devices,
                cpu_milli: 1000,
                memory_mib: 1024,
            },
            kind: DeviceKind::Gpu,
            models: Vec::new(),
            required: None,
            preferred: None,
            estimated_runtime_ms: None,
            checkpointable: false,
            submitted_at_ms: 0,
            hosts: HostFilter::default(),
            resume: Resume::default(),
        }
    }

    pub fn with_queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = QueueName::new(queue);
        self
    }

    pub fn with_priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    pub fn with_kind(mut self, kind: DeviceKind) -> Self {
        self.kind = kind;
        self
    }

    pub fn with_models(mut self, models: &[&str]) -> Self {
        self.models = models.iter().map(|m| (*m).to_owned()).collect();
        self
    }

    pub fn with_required(mut self, level: TopologyLevel) -> Self {
        self.required = Some(level);
        self
    }

    pub fn with_preferred(mut self, level: TopologyLevel) -> Self {
        self.preferred = Some(level);
        self
    }

    pub fn with_runtime_ms(mut self, ms: u64) -> Self {
        self.estimated_runtime_ms = Some(ms);
        self
    }

    pub fn with_checkpointable(mut self, checkpointable: bool) -> Self {
        self.checkpointable = checkpointable;
        self
    }

    pub fn with_submitted_at_ms(mut self, ms: u64) -> Self {
        self.submitted_at_ms = ms;
        self
    }

    pub fn with_hosts(mut self, hosts: HostFilter) -> Self {
        self.hosts = hosts;
        self
    }

    pub fn with_cpu_milli(mut self, cpu: u64) -> Self {
        self.per_task.cpu_milli = cpu;
        self
    }

    pub fn with_memory_mib(mut self, mem: u64) -> Self {
        self.per_task.memory_mib = mem;
        self
    }
}
