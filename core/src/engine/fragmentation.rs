//! Expected fragmentation of a host against a target workload, as defined by FGD (Weng et al.,
//! "Beware of Fragmentation", USENIX ATC'23; simulator `pkg/utils/frag.go`,
//! `NodeGpuShareFragAmount` summed except Q3).
//!
//! For each typical task class `c` (weight `w_c`, the classes summing to 1) and a host with `F` free
//! milli-devices in all:
//! - a CPU-only class, or a class the host's model does not serve, or one the host cannot fit
//!   (not enough devices with enough free share, or not enough CPU) counts all of `F` as fragment;
//! - a class that fits counts as fragment only the devices whose free share is below the class's
//!   per-device share.
//!
//! The host's fragmentation is `sum_c w_c * fragment_c`; FGD places a task where this grows least.
//! The Gangway policy uses the same measure with memory checked too.

use super::cluster::ClusterState;
use super::config::WorkloadClass;
use super::device::{DeviceKind, MILLI_PER_DEVICE};
use super::index::{HostInfo, ModelTable};
use super::job::{DeviceDemand, GangRequest, TaskDemand};
use std::collections::BTreeMap;

/// One typical task class, normalised.
#[derive(Clone, Debug, PartialEq)]
pub struct FragClass {
    /// Milli per device (0 for CPU-only).
    pub per_device: u32,
    /// Devices per task.
    pub count: u32,
    pub cpu: u64,
    pub mem: u64,
    /// Accepted model ids.
    pub accept: Vec<bool>,
    /// Normalised weight (all classes sum to 1).
    pub weight: f64,
    /// Tasks per gang of the class.
    pub tasks: u32,
}

/// The target workload that fragmentation is measured against.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FragModel {
    pub classes: Vec<FragClass>,
    /// Whether a class that lacks host memory counts as not fitting (Gangway); FGD looks at CPU and
    /// devices only.
    pub use_memory: bool,
    /// Expected CPU milli per device milli of the device-using classes (0 when none).
    pub cpu_per_device_milli: f64,
}

/// Share of the workload (by count) that the typical classes must cover, as FGD's default
/// `podPopularityThreshold` (95%).
pub const TYPICAL_COVERAGE: f64 = 0.95;

impl FragModel {
    /// From an explicit workload description.
    pub fn from_workload(
        models: &ModelTable,
        workload: &[WorkloadClass],
        use_memory: bool,
    ) -> Self {
        let total: f64 = workload.iter().map(|w| w.weight.max(0.0)).sum();
        if total <= 0.0 {
            return Self {
                classes: Vec::new(),
                use_memory,
                cpu_per_device_milli: 0.0,
            };
        }
        let classes = workload
            .iter()
            .filter(|w| w.weight > 0.0)
            .map(|w| {
                let (per_device, count) = split(w.demand.devices);
                FragClass {
                    per_device,
                    count,
                    cpu: w.demand.cpu_milli,
                    mem: w.demand.memory_mib,
                    accept: accept_vec(models, w.kind, &w.models),
                    weight: w.weight / total,
                    tasks: w.tasks.max(1),
                }
            })
            .collect::<Vec<FragClass>>();
        let (cpu, dev) =
            classes
                .iter()
                .filter(|c| c.per_device > 0)
                .fold((0.0, 0.0), |(a, b), c| {
                    (
                        a + c.weight * c.cpu as f64,
                        b + c.weight * f64::from(c.per_device) * f64::from(c.count),
                    )
                });
        Self {
            classes,
            use_memory,
            cpu_per_device_milli: if dev > 0.0 { cpu / dev } else { 0.0 },
        }
    }

    /// Learns the typical classes from what is pending and running: classes by count of tasks, the
    /// most popular first until they cover [`TYPICAL_COVERAGE`] of all tasks (at most 64 classes).
    pub fn learn(
        models: &ModelTable,
        view: &ClusterState,
        pending: &[GangRequest],
        use_memory: bool,
    ) -> Self {
        let classes = learn_workload(
            pending
                .iter()
                .chain(view.running().values().map(|g| &g.request)),
        );
        Self::from_workload(models, &classes, use_memory)
    }

    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }

    /// Device milli a host cannot use because its CPU runs out first, at the workload's expected
    /// CPU per device milli.
    pub fn cpu_stranded(&self, free: &[u32], cpu: u64) -> f64 {
        if self.cpu_per_device_milli <= 0.0 {
            return 0.0;
        }
        let total: u64 = free.iter().map(|&m| u64::from(m)).sum();
        (total as f64 - cpu as f64 / self.cpu_per_device_milli).max(0.0)
    }

    /// Expected fragment (milli-devices) of a host in the given free state.
    pub fn host_frag(&self, info: &HostInfo, free: &[u32], cpu: u64, mem: u64) -> f64 {
        let total: u64 = free.iter().map(|&m| u64::from(m)).sum();
        if total == 0 {
            return 0.0;
        }
        let total_f = total as f64;
        let mut frag = 0.0;
        for c in &self.classes {
            if c.per_device == 0 {
                frag += c.weight * total_f;
                continue;
            }
            let accessible = match info.uniform {
                Some(m) => c.accept.get(usize::from(m)).copied().unwrap_or(false),
                None => info
                    .dev_model
                    .iter()
                    .any(|&m| c.accept.get(usize::from(m)).copied().unwrap_or(false)),
            };
            if !accessible {
                frag += c.weight * total_f;
                continue;
            }
            let mut fitting = 0u32;
            let mut small = 0u64;
            for (i, &f) in free.iter().enumerate() {
                let ok = info.uniform.is_some()
                    || c.accept
                        .get(usize::from(info.dev_model[i]))
                        .copied()
                        .unwrap_or(false);
                if ok && f >= c.per_device {
                    fitting += 1;
                } else {
                    small += u64::from(f);
                }
            }
            let host_ok = cpu >= c.cpu && (!self.use_memory || mem >= c.mem);
            if fitting >= c.count && host_ok {
                frag += c.weight * small as f64;
            } else {
                frag += c.weight * total_f;
            }
        }
        frag
    }
}

fn split(d: DeviceDemand) -> (u32, u32) {
    match d {
        DeviceDemand::None => (0, 0),
        DeviceDemand::Whole(n) => (MILLI_PER_DEVICE, n),
        DeviceDemand::Fraction(m) => (m, 1),
    }
}

fn accept_vec(models: &ModelTable, kind: DeviceKind, accepted: &[String]) -> Vec<bool> {
    models
        .kinds
        .iter()
        .zip(&models.names)
        .map(|(k, n)| *k == kind && (accepted.is_empty() || accepted.iter().any(|a| a == n)))
        .collect()
}

/// Typical classes of a set of gangs (FGD's `GetTypicalPods` with step 1 and threshold 95%,
/// counting each task of a gang).
pub fn learn_workload<'r>(gangs: impl Iterator<Item = &'r GangRequest>) -> Vec<WorkloadClass> {
    type Key = (DeviceKind, TaskDemand, Vec<String>, u32);
    let mut counts: BTreeMap<Key, f64> = BTreeMap::new();
    let mut total = 0.0;
    for g in gangs {
        let mut models = g.models.clone();
        models.sort();
        *counts
            .entry((g.kind, g.per_task, models, g.tasks))
            .or_default() += f64::from(g.tasks.max(1));
        total += f64::from(g.tasks.max(1));
    }
    let mut list: Vec<(Key, f64)> = counts.into_iter().collect();
    // Most popular first; ties in key order (deterministic).
    list.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut out = Vec::new();
    let mut cum = 0.0;
    for ((kind, demand, models, tasks), n) in list {
        if cum >= TYPICAL_COVERAGE * total || out.len() >= 64 {
            break;
        }
        cum += n;
        out.push(WorkloadClass {
            kind,
            demand,
            models,
            tasks,
            weight: n,
        });
    }
    out
}
