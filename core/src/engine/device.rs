//! Accelerator kinds and models.

pub use gangway_proto::device::DeviceKind;
use serde::{Deserialize, Serialize};

/// One accelerator model ("H100", "A100-80G", "TPU-v5p", or an opaque trace code such as "G2").
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeviceModel {
    pub name: String,
    pub kind: DeviceKind,
    /// Device memory; 0 where the trace does not say.
    pub memory_mib: u64,
}

/// One device of a host, as the host declared (or discovered) it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSpec {
    /// Model name; must name a model of the cluster.
    pub model: String,
    /// Devices of a host with the same value share an NVLink/NUMA domain.
    pub nvlink_domain: u16,
}

/// A whole device is 1000 milli-devices; fractional requests (openb's `gpu_milli`) share one device.
pub const MILLI_PER_DEVICE: u32 = 1000;
