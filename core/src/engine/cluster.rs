//! The cluster as the engine sees it: hosts, what is free on them, and the gangs that run.
//!
//! This is the one place where capacity changes. The server's FSM, the simulator and the tests all
//! place and release gangs through [`ClusterState::apply_placement`] and [`ClusterState::release`],
//! which re-check every placement, so an over-commit is impossible whoever computed the plan.

use super::device::{DeviceKind, DeviceModel, DeviceSpec, MILLI_PER_DEVICE};
use super::host::{HostSpec, HostState, NodeState};
use super::job::{DeviceDemand, GangRequest};
use super::plan::GangPlacement;
use super::topology::{HostTopology, TopologyLevel};
use gangway_proto::ids::{HostName, JobId, QueueName};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A gang that holds devices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningGang {
    pub request: GangRequest,
    pub placement: GangPlacement,
    /// Log time at which it was placed.
    pub started_at_ms: u64,
}

/// Why a placement cannot be applied. Each message names what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("job {0} already holds devices")]
    AlreadyRunning(JobId),
    #[error("job {job}: gang has {expected} tasks but the placement has {got}")]
    TaskCount {
        job: JobId,
        expected: u32,
        got: usize,
    },
    #[error("job {job} task {task}: unknown host {host}")]
    UnknownHost {
        job: JobId,
        task: usize,
        host: HostName,
    },
    #[error("job {job} task {task}: host {host} is {state} and takes no new work")]
    HostNotReady {
        job: JobId,
        task: usize,
        host: HostName,
        state: NodeState,
    },
    #[error("job {job} task {task}: {problem}")]
    BadDevices {
        job: JobId,
        task: usize,
        problem: String,
    },
    #[error(
        "job {job} task {task}: host {host} device {index} has {free} milli free, {wanted} wanted"
    )]
    DeviceBusy {
        job: JobId,
        task: usize,
        host: HostName,
        index: u16,
        free: u32,
        wanted: u32,
    },
    #[error("job {job} task {task}: host {host} lacks cpu or memory ({what})")]
    HostResources {
        job: JobId,
        task: usize,
        host: HostName,
        what: String,
    },
    #[error("job {job}: tasks span more than one {level}")]
    OutsideRequiredDomain { job: JobId, level: TopologyLevel },
    #[error("job {job} task {task}: host {host} device {index} is fenced")]
    DeviceFenced {
        job: JobId,
        task: usize,
        host: HostName,
        index: u16,
    },
}

/// Why a host cannot be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("host {0} is already registered")]
    Duplicate(HostName),
    #[error("host {host} device {index}: unknown model {model:?}")]
    UnknownModel {
        host: HostName,
        index: usize,
        model: String,
    },
    #[error("host {0} has more than 65535 devices")]
    TooManyDevices(HostName),
    #[error("unknown host {0}")]
    Unknown(HostName),
    #[error("host {host} has no device {index} (it has {count})")]
    UnknownDevice {
        host: HostName,
        index: u16,
        count: usize,
    },
    #[error("host {host} still holds work of {jobs} job(s)")]
    NotEmpty { host: HostName, jobs: usize },
}

/// Hosts, free capacity, running gangs and queues. Ordered maps only: iteration is deterministic.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    models: BTreeMap<String, DeviceModel>,
    hosts: Vec<HostState>,
    host_index: BTreeMap<HostName, usize>,
    running: BTreeMap<JobId, RunningGang>,
}

impl ClusterState {
    pub fn new(models: impl IntoIterator<Item = DeviceModel>) -> Self {
        Self {
            models: models.into_iter().map(|m| (m.name.clone(), m)).collect(),
            ..Self::default()
        }
    }

    pub fn add_model(&mut self, model: DeviceModel) {
        self.models.insert(model.name.clone(), model);
    }

    pub fn models(&self) -> &BTreeMap<String, DeviceModel> {
        &self.models
    }

    pub fn model(&self, name: &str) -> Option<&DeviceModel> {
        self.models.get(name)
    }

    /// Registers a host with all its capacity free.
    pub fn add_host(&mut self, spec: HostSpec) -> Result<(), HostError> {
        if self.host_index.contains_key(&spec.name) {
            return Err(HostError::Duplicate(spec.name));
        }
        if spec.devices.len() > usize::from(u16::MAX) {
            return Err(HostError::TooManyDevices(spec.name));
        }
        if let Some((index, d)) = spec
            .devices
            .iter()
            .enumerate()
            .find(|(_, d)| !self.models.contains_key(&d.model))
        {
            return Err(HostError::UnknownModel {
                host: spec.name.clone(),
                index,
                model: d.model.clone(),
            });
        }
        self.host_index.insert(spec.name.clone(), self.hosts.len());
        self.hosts.push(HostState::new(spec));
        Ok(())
    }

    /// Changes a host's state; returns false for an unknown host. Capacity held by running gangs is
    /// not touched: revoking leases is the caller's decision.
    pub fn set_node_state(&mut self, host: &HostName, state: NodeState) -> bool {
        match self.host_index.get(host) {
            Some(&i) => {
                self.hosts[i].spec.state = state;
                true
            }
            None => false,
        }
    }

    /// Fences (`fenced`) or unfences device `index` of `host`: a fenced device takes no new work,
    /// and gangs that hold it keep their share until released. Returns whether anything changed.
    pub fn set_device_fenced(
        &mut self,
        host: &HostName,
        index: u16,
        fenced: bool,
    ) -> Result<bool, HostError> {
        let h = self.host_mut_device(host, index)?;
        Ok(if fenced {
            h.fence(index)
        } else {
            h.unfence(index)
        })
    }

    fn host_mut_device(
        &mut self,
        host: &HostName,
        index: u16,
    ) -> Result<&mut HostState, HostError> {
        let &hi = self
            .host_index
            .get(host)
            .ok_or_else(|| HostError::Unknown(host.clone()))?;
        let h = &mut self.hosts[hi];
        if usize::from(index) >= h.spec.devices.len() {
            return Err(HostError::UnknownDevice {
                host: host.clone(),
                index,
                count: h.spec.devices.len(),
            });
        }
        Ok(h)
    }

    /// Appends devices that joined `host`; existing device indexes do not move.
    pub fn add_devices(
        &mut self,
        host: &HostName,
        devices: Vec<DeviceSpec>,
    ) -> Result<(), HostError> {
        let &hi = self
            .host_index
            .get(host)
            .ok_or_else(|| HostError::Unknown(host.clone()))?;
        let count = self.hosts[hi].spec.devices.len() + devices.len();
        if count > usize::from(u16::MAX) {
            return Err(HostError::TooManyDevices(host.clone()));
        }
        if let Some((i, d)) = devices
            .iter()
            .enumerate()
            .find(|(_, d)| !self.models.contains_key(&d.model))
        {
            return Err(HostError::UnknownModel {
                host: host.clone(),
                index: self.hosts[hi].spec.devices.len() + i,
                model: d.model.clone(),
            });
        }
        self.hosts[hi].add_devices(devices);
        Ok(())
    }

    /// Removes a host that no gang holds any part of (the hosts after it move up one position).
    pub fn remove_host(&mut self, host: &HostName) -> Result<HostState, HostError> {
        let &hi = self
            .host_index
            .get(host)
            .ok_or_else(|| HostError::Unknown(host.clone()))?;
        let jobs = self
            .running
            .values()
            .filter(|g| g.placement.tasks.iter().any(|t| &t.host == host))
            .count();
        if jobs > 0 {
            return Err(HostError::NotEmpty {
                host: host.clone(),
                jobs,
            });
        }
        let removed = self.hosts.remove(hi);
        self.host_index.remove(host);
        for i in self.host_index.values_mut() {
            if *i > hi {
                *i -= 1;
            }
        }
        Ok(removed)
    }

    /// Hosts in registration order (the stable order first-fit walks).
    pub fn hosts(&self) -> &[HostState] {
        &self.hosts
    }

    pub fn host(&self, name: &HostName) -> Option<&HostState> {
        self.host_index.get(name).map(|&i| &self.hosts[i])
    }

    pub fn host_position(&self, name: &HostName) -> Option<usize> {
        self.host_index.get(name).copied()
    }

    pub fn running(&self) -> &BTreeMap<JobId, RunningGang> {
        &self.running
    }

    /// Milli-devices of `kind` that a queue's running gangs hold.
    pub fn queue_usage_milli(&self, queue: &QueueName) -> u64 {
        self.running
            .values()
            .filter(|g| &g.request.queue == queue)
            .map(|g| g.request.total_milli())
            .sum()
    }

    /// The domain key of a host at a level: hosts with equal keys share the domain.
    /// `Nvlink` is finer than a host and is keyed per host here; device-level NVLink grouping is
    /// checked per task.
    pub fn domain_key(topology: &HostTopology, host: &HostName, level: TopologyLevel) -> String {
        match level {
            TopologyLevel::Nvlink | TopologyLevel::Host => {
                format!(
                    "{}/{}/{}/{}/{}",
                    topology.datacenter, topology.zone, topology.pod, topology.rack, host
                )
            }
            TopologyLevel::Rack => format!(
                "{}/{}/{}/{}",
                topology.datacenter, topology.zone, topology.pod, topology.rack
            ),
            TopologyLevel::Pod => {
                format!("{}/{}/{}", topology.datacenter, topology.zone, topology.pod)
            }
            TopologyLevel::Zone => format!("{}/{}", topology.datacenter, topology.zone),
            TopologyLevel::Datacenter => topology.datacenter.clone(),
        }
    }

    /// Re-checks a gang placement against the current state without changing anything: every task on
    /// a ready host, devices of an accepted model and free, CPU and memory available (counting several
    /// tasks on one host together), the required domain respected.
    pub fn check_placement(
        &self,
        request: &GangRequest,
        placement: &GangPlacement,
    ) -> Result<(), PlacementError> {
        let job = &request.id;
        if self.running.contains_key(job) {
            return Err(PlacementError::AlreadyRunning(job.clone()));
        }
        if placement.tasks.len() != request.tasks as usize {
            return Err(PlacementError::TaskCount {
                job: job.clone(),
                expected: request.tasks,
                got: placement.tasks.len(),
            });
        }
        // What this gang takes from each host, accumulated across its tasks (gangs touch few
        // hosts: a linear list beats a map).
        let mut taken: Vec<(usize, Vec<u32>, u64, u64)> = Vec::new();
        let mut first_host: Option<usize> = None;
        for (task, tp) in placement.tasks.iter().enumerate() {
            let Some(&hi) = self.host_index.get(&tp.host) else {
                return Err(PlacementError::UnknownHost {
                    job: job.clone(),
                    task,
                    host: tp.host.clone(),
                });
            };
            let host = &self.hosts[hi];
            if !host.spec.state.accepts_new_work() {
                return Err(PlacementError::HostNotReady {
                    job: job.clone(),
                    task,
                    host: tp.host.clone(),
                    state: host.spec.state,
                });
            }
            if let Some(level) = request.required {
                match first_host {
                    None => first_host = Some(hi),
                    Some(f) if !Self::same_domain(&self.hosts[f].spec, &host.spec, level) => {
                        return Err(PlacementError::OutsideRequiredDomain {
                            job: job.clone(),
                            level,
                        })
                    }
                    Some(_) => {}
                }
            }
            self.check_task_devices(request, task, host, tp)?;
            let pos = match taken.iter().position(|t| t.0 == hi) {
                Some(p) => p,
                None => {
                    taken.push((hi, vec![0; host.free_milli.len()], 0, 0));
                    taken.len() - 1
                }
            };
            let entry = &mut taken[pos];
            for share in &tp.devices {
                if host.is_fenced(share.index) {
                    return Err(PlacementError::DeviceFenced {
                        job: job.clone(),
                        task,
                        host: tp.host.clone(),
                        index: share.index,
                    });
                }
                let i = usize::from(share.index);
                entry.1[i] += share.milli;
                if entry.1[i] > host.free_milli[i] {
                    return Err(PlacementError::DeviceBusy {
                        job: job.clone(),
                        task,
                        host: tp.host.clone(),
                        index: share.index,
                        free: host.free_milli[i].saturating_sub(entry.1[i] - share.milli),
                        wanted: share.milli,
                    });
                }
            }
            entry.2 += tp.cpu_milli;
            entry.3 += tp.memory_mib;
            if entry.2 > host.free_cpu_milli || entry.3 > host.free_memory_mib {
                return Err(PlacementError::HostResources {
                    job: job.clone(),
                    task,
                    host: tp.host.clone(),
                    what: format!(
                        "cpu {} of {} milli free, memory {} of {} MiB free",
                        entry.2, host.free_cpu_milli, entry.3, host.free_memory_mib
                    ),
                });
            }
        }
        Ok(())
    }

    /// Whether two hosts share the domain of a level (same as comparing [`Self::domain_key`]s,
    /// without building strings).
    pub fn same_domain(a: &HostSpec, b: &HostSpec, level: TopologyLevel) -> bool {
        let (ta, tb) = (&a.topology, &b.topology);
        let dc = ta.datacenter == tb.datacenter;
        let zone = dc && ta.zone == tb.zone;
        let pod = zone && ta.pod == tb.pod;
        let rack = pod && ta.rack == tb.rack;
        match level {
            TopologyLevel::Datacenter => dc,
            TopologyLevel::Zone => zone,
            TopologyLevel::Pod => pod,
            TopologyLevel::Rack => rack,
            TopologyLevel::Host | TopologyLevel::Nvlink => rack && a.name == b.name,
        }
    }

    fn check_task_devices(
        &self,
        request: &GangRequest,
        task: usize,
        host: &HostState,
        tp: &super::plan::TaskPlacement,
    ) -> Result<(), PlacementError> {
        let bad = |problem: String| PlacementError::BadDevices {
            job: request.id.clone(),
            task,
            problem,
        };
        if tp.cpu_milli != request.per_task.cpu_milli
            || tp.memory_mib != request.per_task.memory_mib
        {
            return Err(bad(format!(
                "placement reserves cpu {} / memory {} but the task needs cpu {} / memory {}",
                tp.cpu_milli,
                tp.memory_mib,
                request.per_task.cpu_milli,
                request.per_task.memory_mib
            )));
        }
        let (want_count, want_milli) = match request.per_task.devices {
            DeviceDemand::None => (0usize, 0u32),
            DeviceDemand::Whole(n) => (n as usize, MILLI_PER_DEVICE),
            DeviceDemand::Fraction(m) => (1, m),
        };
        if tp.devices.len() != want_count || tp.devices.iter().any(|d| d.milli != want_milli) {
            let got: Vec<u32> = tp.devices.iter().map(|d| d.milli).collect();
            return Err(bad(format!(
                "placement gives shares {got:?} but the task needs {:?}",
                request.per_task.devices
            )));
        }
        let mut nvlink_domain = None;
        let mut last_model: Option<&str> = None;
        for (k, share) in tp.devices.iter().enumerate() {
            let i = usize::from(share.index);
            let Some(spec) = host.spec.devices.get(i) else {
                return Err(bad(format!(
                    "host {} has no device {}",
                    host.spec.name, share.index
                )));
            };
            if tp.devices[..k].iter().any(|d| d.index == share.index) {
                return Err(bad(format!("device {} given twice", share.index)));
            }
            // A device of the same model as the previous one is already checked.
            if last_model != Some(spec.model.as_str()) {
                let kind = self.models.get(&spec.model).map(|m| m.kind);
                if kind != Some(request.kind) || !request.accepts_model(&spec.model) {
                    return Err(bad(format!(
                        "host {} device {} is a {} which the job does not accept",
                        host.spec.name, share.index, spec.model
                    )));
                }
                last_model = Some(spec.model.as_str());
            }
            if request.required == Some(TopologyLevel::Nvlink) {
                match nvlink_domain {
                    None => nvlink_domain = Some(spec.nvlink_domain),
                    Some(d) if d != spec.nvlink_domain => {
                        return Err(PlacementError::OutsideRequiredDomain {
                            job: request.id.clone(),
                            level: TopologyLevel::Nvlink,
                        })
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }

    /// Applies a gang placement all-or-nothing after re-checking it. On error nothing changed.
    pub fn apply_placement(
        &mut self,
        request: GangRequest,
        placement: GangPlacement,
        now_ms: u64,
    ) -> Result<(), PlacementError> {
        self.check_placement(&request, &placement)?;
        for tp in &placement.tasks {
            let hi = self.host_index[&tp.host];
            let host = &mut self.hosts[hi];
            for share in &tp.devices {
                host.free_milli[usize::from(share.index)] -= share.milli;
            }
            host.free_cpu_milli -= tp.cpu_milli;
            host.free_memory_mib -= tp.memory_mib;
        }
        self.running.insert(
            request.id.clone(),
            RunningGang {
                request,
                placement,
                started_at_ms: now_ms,
            },
        );
        Ok(())
    }

    /// Frees everything a gang holds; `None` if it held nothing.
    pub fn release(&mut self, job: &JobId) -> Option<RunningGang> {
        let gang = self.running.remove(job)?;
        for tp in &gang.placement.tasks {
            let hi = self.host_index[&tp.host];
            self.hosts[hi].release_task(tp);
        }
        Some(gang)
    }

    /// The first way this state contradicts itself, if any: the host index against the hosts,
    /// device models, and each device's, CPU's and memory's ledger (free + fenced + what running
    /// gangs hold = capacity). Every change made through this type keeps them; a state decoded
    /// from untrusted bytes (a snapshot, a backup) is checked before it is used, so no later
    /// placement or release can index out of bounds or overflow.
    pub fn check(&self) -> Result<(), String> {
        if self.host_index.len() != self.hosts.len() {
            return Err(format!(
                "{} hosts but {} in the host index",
                self.hosts.len(),
                self.host_index.len()
            ));
        }
        for (name, &i) in &self.host_index {
            match self.hosts.get(i) {
                Some(h) if &h.spec.name == name => {}
                _ => return Err(format!("host index: {name} points at position {i}")),
            }
        }
        let mut used: Vec<(Vec<u64>, u64, u64)> = self
            .hosts
            .iter()
            .map(|h| (vec![0; h.spec.devices.len()], 0, 0))
            .collect();
        for (job, gang) in &self.running {
            for t in &gang.placement.tasks {
                let Some(&hi) = self.host_index.get(&t.host) else {
                    return Err(format!("job {job} runs on unknown host {}", t.host));
                };
                let (devices, cpu, memory) = &mut used[hi];
                for share in &t.devices {
                    let Some(d) = devices.get_mut(usize::from(share.index)) else {
                        return Err(format!(
                            "job {job} holds device {} of {}, which has {}",
                            share.index,
                            t.host,
                            devices.len()
                        ));
                    };
                    *d += u64::from(share.milli);
                }
                *cpu = cpu.saturating_add(t.cpu_milli);
                *memory = memory.saturating_add(t.memory_mib);
            }
        }
        for (h, (devices, cpu, memory)) in self.hosts.iter().zip(used) {
            let name = &h.spec.name;
            if h.free_milli.len() != h.spec.devices.len() {
                return Err(format!(
                    "host {name}: free capacity of a different device count"
                ));
            }
            if let Some(d) = h
                .spec
                .devices
                .iter()
                .find(|d| !self.models.contains_key(&d.model))
            {
                return Err(format!("host {name}: unknown model {}", d.model));
            }
            for (i, held) in devices.iter().enumerate() {
                let fenced = h.fenced.get(&(i as u16)).copied().unwrap_or(0);
                let total = u64::from(h.free_milli[i]) + u64::from(fenced) + held;
                if total != u64::from(MILLI_PER_DEVICE) {
                    return Err(format!(
                        "host {name} device {i}: free, fenced and held add up to {total} milli"
                    ));
                }
            }
            if let Some(i) = h.fenced.keys().find(|i| usize::from(**i) >= devices.len()) {
                return Err(format!(
                    "host {name}: device {i} is fenced but does not exist"
                ));
            }
            if h.free_cpu_milli.checked_add(cpu) != Some(h.spec.cpu_milli)
                || h.free_memory_mib.checked_add(memory) != Some(h.spec.memory_mib)
            {
                return Err(format!(
                    "host {name}: free and held CPU or memory differ from its capacity"
                ));
            }
        }
        Ok(())
    }

    /// Devices of a kind in hosts that accept work: (free milli, total milli).
    pub fn capacity_milli(&self, kind: DeviceKind) -> (u64, u64) {
        let mut free = 0u64;
        let mut total = 0u64;
        for h in &self.hosts {
            for (i, d) in h.spec.devices.iter().enumerate() {
                if self.models.get(&d.model).map(|m| m.kind) == Some(kind) {
                    total += u64::from(MILLI_PER_DEVICE);
                    if h.spec.state.accepts_new_work() {
                        free += u64::from(h.free_milli[i]);
                    }
                }
            }
        }
        (free, total)
    }
}
