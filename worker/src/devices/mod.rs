//! Device backends: what accelerators this host has, and how they are doing.
//!
//! The agent talks to one [`DeviceBackend`]:
//!
//! * [`NvmlBackend`] reads NVIDIA GPUs through NVML (`libnvidia-ml.so.1`, loaded at run time, so the
//!   binary runs on hosts without the driver and fails there with a clear message);
//! * [`FakeBackend`] (`--fake-devices 8xH100`) declares devices for development, simulation and
//!   tests, with utilization and faults the agent sets.
//!
//! [`DeviceBackend::inventory`] is read once at registration (the scheduler places gangs on it);
//! [`DeviceBackend::telemetry`] is read on every heartbeat.

mod fake;
mod nvml;

pub use fake::{FakeBackend, FakeSpecError, Fault, FaultFileError};
pub use nvml::NvmlBackend;

/// A source of device inventory and telemetry: NVML on real hosts, [`FakeBackend`] elsewhere.
pub trait DeviceBackend: Send + Sync {
    /// Short name for logs and `/metrics` labels: "nvml" or "fake".
    fn name(&self) -> &'static str;

    /// The devices of this host, ordered by index. Stable for the life of the backend.
    fn inventory(&self) -> Result<Vec<DeviceInfo>, DeviceError>;

    /// Current utilization, memory and health of every device, ordered by index. Each health
    /// event is returned once: the call drains the events seen since the previous call.
    fn telemetry(&self) -> Result<Vec<DeviceTelemetry>, DeviceError>;
}

/// What kind of accelerator a device is: the scheduler's own type, so the agent registers exactly
/// the kinds job specs name.
pub use gangway_proto::device::DeviceKind;

/// One device as registered with the scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Index on this host (NVML index, `CUDA_VISIBLE_DEVICES` order).
    pub index: u32,
    /// Globally unique identifier (`GPU-8f2c…` from NVML, `GPU-<host>-<i>` from the fake).
    pub uuid: String,
    /// Short model name the scheduler matches job specs against ("H100", "A100-80G", "TPU-v5p");
    /// see [`normalize_model`].
    pub model: String,
    /// The name as the driver reports it ("NVIDIA H100 80GB HBM3").
    pub raw_name: String,
    pub kind: DeviceKind,
    /// Total device memory in MiB.
    pub memory_mib: u64,
    /// Devices of this host with the same number share an NVLink (or ICI) domain. Numbered from 0
    /// in order of each domain's lowest device index; a device without links is alone in its own.
    pub nvlink_domain: u16,
    /// PCI bus id, "00000000:18:00.0".
    pub pci_bus_id: String,
    /// NUMA node the device is attached to, where the platform says.
    pub numa_node: Option<u32>,
}

/// One device's state at one heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTelemetry {
    pub index: u32,
    /// Share of the last sample period the device was busy, 0..=100.
    pub utilization_pct: u8,
    pub memory_used_mib: u64,
    /// False once the device has had a fault that needs a reset (uncorrected ECC errors, a fatal
    /// XID, fallen off the bus): the agent reports it and the scheduler stops placing work on it.
    pub healthy: bool,
    /// Health events since the previous telemetry call, oldest first.
    pub events: Vec<HealthEvent>,
    /// Volatile corrected ECC errors (since the driver loaded), where the device counts them.
    pub ecc_corrected: Option<u64>,
    /// Heat or power holds the clocks down now, where the backend can tell.
    pub throttled: Option<Throttle>,
}

/// Why the clocks are held down (NVML's clock throttle reasons, less the harmless ones: idle,
/// application clocks, sync boost).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    /// Thermal slowdown (software or hardware) or the hardware slowdown signal.
    Thermal,
    /// Power brake (the board's external power signal).
    Power,
}

impl std::fmt::Display for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Throttle::Thermal => "thermal throttling",
            Throttle::Power => "power throttling",
        })
    }
}

/// A health event of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthEvent {
    /// An XID error from the driver; `code` is `None` when the driver could not say which.
    Xid { code: Option<u64> },
    /// The device's volatile uncorrected ECC error counter changed; `count` is its new value.
    EccUncorrected { count: u64 },
    /// The device no longer answers (NVML `GPU_IS_LOST`): fallen off the bus.
    Lost,
}

/// XIDs that mean the device needs a reset or replacement rather than a restart of the task: the
/// agent reports the device failed and the scheduler fences it. From NVIDIA's XID catalogue
/// (docs.nvidia.com/deploy/xid-errors, "XID messages", the ones whose recommended action is a GPU
/// reset, a node reboot or a field diagnostic):
///
/// | XID | meaning |
/// |---|---|
/// | 48 | double-bit ECC error (DBE) |
/// | 62 | internal micro-controller halt |
/// | 64 | ECC page retirement or row remapping recording failure |
/// | 74 | NVLink error |
/// | 79 | GPU has fallen off the bus |
/// | 92 | high single-bit ECC error rate |
/// | 94 | contained ECC error |
/// | 95 | uncontained ECC error |
/// | 119 | GSP RPC timeout |
/// | 120 | GSP error |
///
/// Application faults (13 graphics engine exception, 31 memory page fault, 43 stopped channel, 45
/// preemptive cleanup, ...) are the task's own: reported as events, the device stays healthy.
pub const FATAL_XIDS: &[u64] = &[48, 62, 64, 74, 79, 92, 94, 95, 119, 120];

/// What an XID code means, for the cause the agent reports ("XID 79: GPU has fallen off the
/// bus"); `None` for codes this table does not name.
pub fn xid_meaning(code: u64) -> Option<&'static str> {
    Some(match code {
        13 => "graphics engine exception",
        31 => "GPU memory page fault",
        43 => "GPU stopped processing",
        45 => "preemptive cleanup",
        48 => "double-bit ECC error",
        62 => "internal micro-controller halt",
        63 => "ECC page retirement or row remapping event",
        64 => "ECC page retirement or row remapping recording failure",
        74 => "NVLink error",
        79 => "GPU has fallen off the bus",
        92 => "high single-bit ECC error rate",
        94 => "contained ECC error",
        95 => "uncontained ECC error",
        119 => "GSP RPC timeout",
        120 => "GSP error",
        _ => return None,
    })
}

impl std::fmt::Display for HealthEvent {
    /// The cause as reported: "XID 79: GPU has fallen off the bus", "uncorrected ECC errors: 2",
    /// "lost: the device no longer answers".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HealthEvent::Xid { code: Some(code) } => match xid_meaning(*code) {
                Some(m) => write!(f, "XID {code}: {m}"),
                None => write!(f, "XID {code}"),
            },
            HealthEvent::Xid { code: None } => f.write_str("XID of unknown code"),
            HealthEvent::EccUncorrected { count } => write!(f, "uncorrected ECC errors: {count}"),
            HealthEvent::Lost => {
                f.write_str("lost: the device no longer answers (fallen off the bus)")
            }
        }
    }
}

impl HealthEvent {
    /// Whether this event makes the device unhealthy.
    pub fn is_fatal(&self) -> bool {
        match self {
            HealthEvent::Xid { code: Some(code) } => FATAL_XIDS.contains(code),
            HealthEvent::Xid { code: None } => false,
            HealthEvent::EccUncorrected { count } => *count > 0,
            HealthEvent::Lost => true,
        }
    }
}

/// Why a device call failed, as far as the caller needs to act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The device or driver does not support the call.
    NotSupported,
    /// The device fell off the bus.
    GpuLost,
    /// The call timed out or the driver was busy: try again.
    Transient,
    /// Anything else: a driver/library mismatch, a permission problem, a bug.
    Fatal,
}

/// A failed device call: which call, on which device, and why.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The NVML shared library could not be loaded.
    #[error(
        "NVIDIA management library (libnvidia-ml.so.1) not found{}: install the NVIDIA driver, or \
         run with --fake-devices ({detail})",
        at_path(.path)
    )]
    LibraryNotFound {
        path: Option<String>,
        detail: String,
    },
    /// A call into the backend failed.
    #[error("{call} failed{}: {message}", on_device(.device))]
    Call {
        /// The call, as the library names it ("nvmlDeviceGetUUID").
        call: &'static str,
        /// The device index, `None` for host-wide calls.
        device: Option<u32>,
        kind: ErrorKind,
        message: String,
    },
    /// A device index that this host does not have.
    #[error("no device {index}: this host has {count} device(s)")]
    NoSuchDevice { index: u32, count: u32 },
}

fn at_path(path: &Option<String>) -> String {
    path.as_ref()
        .map(|p| format!(" at {p}"))
        .unwrap_or_default()
}

fn on_device(device: &Option<u32>) -> String {
    device
        .map(|d| format!(" on device {d}"))
        .unwrap_or_default()
}

impl DeviceError {
    /// Whether the same call may succeed if made again later (the heartbeat carries on and reads
    /// again next time); otherwise the agent reports the error and, at start-up, exits.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            DeviceError::Call {
                kind: ErrorKind::Transient,
                ..
            }
        )
    }

    /// The device the failed call was about, if any.
    pub fn device(&self) -> Option<u32> {
        match self {
            DeviceError::Call { device, .. } => *device,
            DeviceError::NoSuchDevice { index, .. } => Some(*index),
            DeviceError::LibraryNotFound { .. } => None,
        }
    }
}

/// The short model name the scheduler matches on, from the name the driver reports.
///
/// Vendor words go ("NVIDIA", "Tesla", "GeForce", "Quadro"), then the first word is the model,
/// cut at the first '-' ("A100-SXM4-80GB" → "A100"). "RTX"/"GTX"/"TITAN" take the next word with
/// them ("RTX-4090", "RTX-A6000"). The A100 comes with 40 or 80 GB, which jobs care about, so it
/// gets a memory suffix ("A100-80G") from the name, or from `memory_mib` when the name has none.
/// An empty name gives "unknown".
pub fn normalize_model(raw_name: &str, memory_mib: u64) -> String {
    const VENDOR_WORDS: &[&str] = &["NVIDIA", "Tesla", "GeForce", "Quadro"];
    const SERIES_WORDS: &[&str] = &["RTX", "GTX", "TITAN"];
    const MEMORY_VARIANTS: &[&str] = &["A100"];

    let words: Vec<&str> = raw_name
        .split_whitespace()
        .filter(|w| !VENDOR_WORDS.iter().any(|v| v.eq_ignore_ascii_case(w)))
        .collect();
    let Some(first) = words.first() else {
        return "unknown".to_owned();
    };
    let base = first
        .split('-')
        .next()
        .unwrap_or(first)
        .to_ascii_uppercase();
    if SERIES_WORDS.contains(&base.as_str()) {
        if let Some(next) = words.get(1) {
            return format!("{base}-{}", next.to_ascii_uppercase());
        }
        return base;
    }
    if MEMORY_VARIANTS.contains(&base.as_str()) {
        let gb = raw_name
            .split(|c: char| c == '-' || c.is_whitespace())
            .find_map(|w| w.strip_suffix("GB").and_then(|n| n.parse::<u64>().ok()))
            .unwrap_or(if memory_mib > 48 * 1024 { 80 } else { 40 });
        return format!("{base}-{gb}G");
    }
    base
}

/// NVLink domains from links between devices: the connected components of the graph whose
/// nodes are the `count` devices plus any other endpoints (NVSwitches), numbered in order of each
/// component's lowest device index. Link endpoints at or above `count` are switches; devices
/// linked to the same switch share a domain.
pub(crate) fn nvlink_domains(count: usize, links: &[(usize, usize)]) -> Vec<u16> {
    let nodes = links
        .iter()
        .map(|&(a, b)| a.max(b) + 1)
        .max()
        .unwrap_or(0)
        .max(count);
    let mut parent: Vec<usize> = (0..nodes).collect();
    fn root(parent: &mut [usize], mut x: usize) -> usize {
        while parent[x] != x {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        x
    }
    for &(a, b) in links {
        let (ra, rb) = (root(&mut parent, a), root(&mut parent, b));
        // The smaller root wins, so a component's root is its lowest node, a device if it has one.
        parent[ra.max(rb)] = ra.min(rb);
    }
    let mut numbers: Vec<Option<u16>> = vec![None; nodes];
    let mut next = 0u16;
    (0..count)
        .map(|d| {
            let r = root(&mut parent, d);
            *numbers[r].get_or_insert_with(|| {
                next += 1;
                next - 1
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_model_names() {
        let cases: &[(&str, u64, &str)] = &[
            ("NVIDIA H100 80GB HBM3", 81_559, "H100"),
            ("NVIDIA H100 PCIe", 81_559, "H100"),
            ("NVIDIA H100 NVL", 95_830, "H100"),
            ("NVIDIA H200", 143_771, "H200"),
            ("NVIDIA GH200 480GB", 97_871, "GH200"),
            ("NVIDIA A100-SXM4-80GB", 81_920, "A100-80G"),
            ("NVIDIA A100-SXM4-40GB", 40_960, "A100-40G"),
            ("NVIDIA A100 80GB PCIe", 81_920, "A100-80G"),
            ("NVIDIA A100-PCIE-40GB", 40_960, "A100-40G"),
            ("NVIDIA A100-SXM", 81_920, "A100-80G"),
            ("NVIDIA A100-SXM", 40_960, "A100-40G"),
            ("Tesla V100-SXM2-16GB", 16_384, "V100"),
            ("Tesla T4", 15_360, "T4"),
            ("NVIDIA L40S", 46_068, "L40S"),
            ("NVIDIA GeForce RTX 4090", 24_564, "RTX-4090"),
            ("NVIDIA RTX A6000", 49_140, "RTX-A6000"),
            ("  NVIDIA   B200  ", 183_359, "B200"),
            ("", 0, "unknown"),
            ("NVIDIA", 0, "unknown"),
        ];
        for &(raw, mem, want) in cases {
            assert_eq!(
                normalize_model(raw, mem),
                want,
                "normalize_model({raw:?}, {mem})"
            );
        }
    }

    #[test]
    fn nvlink_domains_are_connected_components() {
        type Case<'a> = (usize, &'a [(usize, usize)], &'a [u16]);
        let cases: &[Case] = &[
            (0, &[], &[]),
            (3, &[], &[0, 1, 2]),
            (4, &[(0, 1), (2, 3)], &[0, 0, 1, 1]),
            (4, &[(1, 0), (3, 2), (2, 3)], &[0, 0, 1, 1]),
            (4, &[(0, 3)], &[0, 1, 2, 0]),
            (4, &[(0, 1), (1, 2), (2, 3)], &[0, 0, 0, 0]),
            // Devices 0-3 on switch 8, 4-7 on switch 9.
            (
                8,
                &[
                    (0, 8),
                    (1, 8),
                    (2, 8),
                    (3, 8),
                    (4, 9),
                    (5, 9),
                    (6, 9),
                    (7, 9),
                ],
                &[0, 0, 0, 0, 1, 1, 1, 1],
            ),
            // Two switches bridged through device 3.
            (5, &[(0, 5), (3, 5), (3, 6), (4, 6)], &[0, 1, 2, 0, 0]),
        ];
        for &(count, links, want) in cases {
            assert_eq!(
                nvlink_domains(count, links),
                want,
                "{count} devices, links {links:?}"
            );
        }
    }

    #[test]
    fn errors_name_the_call_and_device() {
        let e = DeviceError::Call {
            call: "nvmlDeviceGetUUID",
            device: Some(3),
            kind: ErrorKind::Transient,
            message: "timeout".into(),
        };
        assert_eq!(
            e.to_string(),
            "nvmlDeviceGetUUID failed on device 3: timeout"
        );
        assert!(e.is_retryable());
        assert_eq!(e.device(), Some(3));
        let e = DeviceError::Call {
            call: "nvmlInit_v2",
            device: None,
            kind: ErrorKind::Fatal,
            message: "driver not loaded".into(),
        };
        assert_eq!(e.to_string(), "nvmlInit_v2 failed: driver not loaded");
        assert!(!e.is_retryable());
        assert!(HealthEvent::Xid { code: Some(79) }.is_fatal());
        assert!(!HealthEvent::Xid { code: Some(13) }.is_fatal());
        assert!(HealthEvent::EccUncorrected { count: 1 }.is_fatal());
        for code in FATAL_XIDS {
            assert!(xid_meaning(*code).is_some(), "XID {code} has no meaning");
        }
        assert_eq!(
            HealthEvent::Xid { code: Some(79) }.to_string(),
            "XID 79: GPU has fallen off the bus"
        );
        assert_eq!(HealthEvent::Xid { code: Some(7) }.to_string(), "XID 7");
    }
}
