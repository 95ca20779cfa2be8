//! Loaders for Alibaba's "openb" GPU-cluster traces (hkust-adsl/kubernetes-scheduler-simulator's
//! data): the node list and the pod (task) lists, and their mapping onto the engine's types with the
//! same conventions as the published simulator (`data/pod_csv_to_yaml.py` and Kubernetes defaults).

use super::error::SimError;
use crate::engine::{
    ClusterState, DeviceDemand, DeviceKind, DeviceModel, DeviceSpec, GangRequest, HostSpec,
    HostTopology, NodeState, TaskDemand,
};
use gangway_proto::ids::{HostName, JobId, QueueName};
use std::collections::BTreeSet;
use std::path::Path;

/// One node of `openb_node_list_*.csv` (`sn,cpu_milli,memory_mib,gpu,model`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenbNode {
    pub name: String,
    pub cpu_milli: u64,
    pub memory_mib: u64,
    pub gpus: u32,
    /// GPU model code; empty for CPU-only nodes.
    pub model: String,
}

/// One task of `openb_pod_list_*.csv`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenbPod {
    pub name: String,
    pub cpu_milli: u64,
    pub memory_mib: u64,
    pub num_gpu: u32,
    /// Per-GPU share in milli (1000 for whole GPUs).
    pub gpu_milli: u32,
    /// Accepted GPU models (`gpu_spec` split on `|`); empty accepts any.
    pub gpu_spec: Vec<String>,
    pub creation_time: u64,
}

/// Kubernetes' default request for a container that names no CPU (`GetNonzeroRequests`).
pub const DEFAULT_CPU_MILLI: u64 = 100;
/// Kubernetes' default memory request (200 MiB).
pub const DEFAULT_MEMORY_MIB: u64 = 200;

/// GPU memory per model in MiB, as the simulator's `MapGpuTypeMemoryMiB`.
pub fn model_memory_mib(model: &str) -> u64 {
    match model {
        "P4" => 7611,
        "2080" => 11019,
        "1080" => 11178,
        "M40" => 11448,
        "T4" => 15109,
        "V100M16" => 16160,
        "P100" => 16280,
        "A10" => 22731,
        "3090" => 24268,
        "V100M32" => 32510,
        "A100" => 81251,
        "G1" => 10000,
        "G2" => 20000,
        "G3" => 30000,
        _ => 0,
    }
}

fn csv_err(path: &Path, line: u64, message: impl Into<String>) -> SimError {
    SimError::Csv {
        path: path.to_path_buf(),
        line,
        message: message.into(),
    }
}

fn read_rows(path: &Path) -> Result<(csv::StringRecord, Vec<(u64, csv::StringRecord)>), SimError> {
    let file = std::fs::File::open(path).map_err(|e| SimError::io(path, e))?;
    let mut rdr = csv::ReaderBuilder::new().flexible(true).from_reader(file);
    let headers = rdr
        .headers()
        .map_err(|e| csv_err(path, 1, e.to_string()))?
        .clone();
    let mut rows = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        let rec = rec.map_err(|e| csv_err(path, i as u64 + 2, e.to_string()))?;
        rows.push((i as u64 + 2, rec));
    }
    Ok((headers, rows))
}

fn col(headers: &csv::StringRecord, path: &Path, name: &str) -> Result<usize, SimError> {
    headers
        .iter()
        .position(|h| h == name)
        .ok_or_else(|| csv_err(path, 1, format!("missing column {name:?}")))
}

fn num(
    rec: &csv::StringRecord,
    i: usize,
    path: &Path,
    line: u64,
    what: &str,
) -> Result<u64, SimError> {
    let s = rec.get(i).unwrap_or("").trim();
    if s.is_empty() {
        return Ok(0);
    }
    s.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(|v| v as u64)
        .ok_or_else(|| {
            csv_err(
                path,
                line,
                format!("{what}: not a non-negative number: {s:?}"),
            )
        })
}

/// Reads a node list.
pub fn load_nodes(path: &Path) -> Result<Vec<OpenbNode>, SimError> {
    let (h, rows) = read_rows(path)?;
    let (sn, cpu, mem, gpu, model) = (
        col(&h, path, "sn")?,
        col(&h, path, "cpu_milli")?,
        col(&h, path, "memory_mib")?,
        col(&h, path, "gpu")?,
        col(&h, path, "model")?,
    );
    rows.iter()
        .map(|(line, r)| {
            let gpus = num(r, gpu, path, *line, "gpu")? as u32;
            let m = r.get(model).unwrap_or("").trim();
            let m = if m == "nan" { "" } else { m };
            if gpus > 0 && m.is_empty() {
                return Err(csv_err(path, *line, "a node with GPUs needs a model"));
            }
            Ok(OpenbNode {
                name: r.get(sn).unwrap_or("").trim().to_owned(),
                cpu_milli: num(r, cpu, path, *line, "cpu_milli")?,
                memory_mib: num(r, mem, path, *line, "memory_mib")?,
                gpus,
                model: m.to_owned(),
            })
        })
        .collect()
}

/// Reads a pod list.
pub fn load_pods(path: &Path) -> Result<Vec<OpenbPod>, SimError> {
    let (h, rows) = read_rows(path)?;
    let name = col(&h, path, "name")?;
    let cpu = col(&h, path, "cpu_milli")?;
    let mem = col(&h, path, "memory_mib")?;
    let ngpu = col(&h, path, "num_gpu")?;
    let milli = col(&h, path, "gpu_milli")?;
    let spec = h.iter().position(|c| c == "gpu_spec");
    let created = h.iter().position(|c| c == "creation_time");
    rows.iter()
        .map(|(line, r)| {
            let num_gpu = num(r, ngpu, path, *line, "num_gpu")? as u32;
            let raw = num(r, milli, path, *line, "gpu_milli")?;
            // pod_csv_to_yaml.py: 0 < milli <= 1000 kept, above 1000 -> 1000, else 0.
            let gpu_milli = if num_gpu == 0 {
                0
            } else if raw > 1000 {
                1000
            } else {
                raw as u32
            };
            let gpu_spec = spec
                .and_then(|i| r.get(i))
                .map(|s| {
                    s.split('|')
                        .map(str::trim)
                        .filter(|x| !x.is_empty() && *x != "nan")
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            Ok(OpenbPod {
                name: r.get(name).unwrap_or("").trim().to_owned(),
                cpu_milli: num(r, cpu, path, *line, "cpu_milli")?,
                memory_mib: num(r, mem, path, *line, "memory_mib")?,
                num_gpu,
                gpu_milli,
                gpu_spec,
                creation_time: match created {
                    Some(i) => num(r, i, path, *line, "creation_time")?,
                    None => 0,
                },
            })
        })
        .collect()
}

impl OpenbPod {
    /// The device demand as the simulator sees it: no GPU (or a zero share) is CPU-only; a share
    /// below 1000 of one GPU is fractional; otherwise whole GPUs.
    pub fn demand(&self) -> DeviceDemand {
        if self.num_gpu == 0 || self.gpu_milli == 0 {
            DeviceDemand::None
        } else if self.num_gpu == 1 && self.gpu_milli < 1000 {
            DeviceDemand::Fraction(self.gpu_milli)
        } else {
            DeviceDemand::Whole(self.num_gpu)
        }
    }

    /// CPU and memory with Kubernetes' non-zero defaults.
    pub fn task_demand(&self) -> TaskDemand {
        TaskDemand {
            devices: self.demand(),
            cpu_milli: if self.cpu_milli == 0 {
                DEFAULT_CPU_MILLI
            } else {
                self.cpu_milli
            },
            memory_mib: if self.memory_mib == 0 {
                DEFAULT_MEMORY_MIB
            } else {
                self.memory_mib
            },
        }
    }

    /// GPU milli the pod asks for in all (`TotalMilliGpu`).
    pub fn total_gpu_milli(&self) -> u64 {
        self.demand().milli()
    }

    /// A one-task gang for the engine.
    pub fn request(&self, id: &str, queue: &str, submitted_at_ms: u64) -> GangRequest {
        GangRequest {
            id: JobId::new(id),
            queue: QueueName::new(queue),
            priority: 0,
            tasks: 1,
            per_task: self.task_demand(),
            kind: DeviceKind::Gpu,
            models: self.gpu_spec.clone(),
            required: None,
            preferred: None,
            estimated_runtime_ms: None,
            checkpointable: false,
            submitted_at_ms,
            hosts: Default::default(),
            resume: Default::default(),
        }
    }
}

/// The cluster of a node list: one GPU model per node, one NVLink domain, racks of 32 nodes in
/// list order (the trace has no topology).
pub fn cluster_from_nodes(nodes: &[OpenbNode]) -> Result<ClusterState, SimError> {
    let models: BTreeSet<&str> = nodes
        .iter()
        .filter(|n| n.gpus > 0)
        .map(|n| n.model.as_str())
        .collect();
    let mut cluster = ClusterState::new(models.iter().map(|m| DeviceModel {
        name: (*m).to_owned(),
        kind: DeviceKind::Gpu,
        memory_mib: model_memory_mib(m),
    }));
    for (i, n) in nodes.iter().enumerate() {
        let spec = HostSpec {
            name: HostName::new(n.name.clone()),
            topology: HostTopology::new("openb", "z0", "p0", &format!("r{:03}", i / 32)),
            cpu_milli: n.cpu_milli,
            memory_mib: n.memory_mib,
            devices: (0..n.gpus)
                .map(|_| DeviceSpec {
                    model: n.model.clone(),
                    nvlink_domain: 0,
                })
                .collect(),
            state: NodeState::Ready,
        };
        cluster
            .add_host(spec)
            .map_err(|e| SimError::Invariant(format!("node {}: {e}", n.name)))?;
    }
    Ok(cluster)
}
