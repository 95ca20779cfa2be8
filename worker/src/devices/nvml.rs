//! NVIDIA GPUs through NVML, the NVIDIA management library.
//!
//! `libnvidia-ml.so.1` comes with the driver, so it is loaded at run time (nvml-wrapper resolves
//! each symbol lazily: a library that lacks a function fails only the call that needs it). What
//! is read:
//!
//! * at load, the inventory: count, and per device UUID, name, memory, PCI bus id, NUMA node (none
//!   where not supported), and the remote PCI bus id of every active NVLink. A link whose remote end
//!   is another local GPU joins the two; links to the same non-GPU endpoint (an NVSwitch) join all
//!   the GPUs on it; a domain is a connected component (see [`super::nvlink_domains`]);
//! * at each telemetry call, utilization, memory used, the volatile uncorrected and corrected ECC
//!   counters (tolerating `NotSupported`, as on GPUs without ECC) and the clock throttle reasons; an
//!   uncorrected counter that grows is an event and makes the device unhealthy, the corrected count
//!   and thermal or power throttling are passed on for the agent to call the device degraded;
//! * XID errors through NVML's event set API: a thread registers every device that supports
//!   critical-XID events and waits on the set ([`XID_POLL`] at a time), queueing the events the
//!   next telemetry call drains. Where events are not supported (non-Linux, some virtualised
//!   GPUs) no XIDs are reported; ECC and lost-GPU detection still work.
//!
//! A device that answers `GPU_IS_LOST`, or is no longer found at its index, is reported unhealthy
//! with a [`HealthEvent::Lost`] rather than failing the whole host's telemetry.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError};
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};

use super::{
    normalize_model, nvlink_domains, DeviceBackend, DeviceError, DeviceInfo, DeviceKind,
    DeviceTelemetry, ErrorKind, HealthEvent, Throttle,
};

/// How long the XID thread waits on the event set at a time; also how long dropping the backend
/// may take.
pub const XID_POLL: Duration = Duration::from_millis(200);

/// NVLink links a device may have (`NVML_NVLINK_MAX_LINKS` of the NVML headers nvml-wrapper uses).
const MAX_NVLINKS: u32 = 18;

type EventQueue = Arc<Mutex<Vec<(u32, HealthEvent)>>>;

#[derive(Debug, Default, Clone)]
struct Health {
    ecc_uncorrected: u64,
    unhealthy: bool,
    lost: bool,
}

/// A [`DeviceBackend`] reading NVIDIA GPUs through NVML.
pub struct NvmlBackend {
    nvml: Arc<Nvml>,
    inventory: Vec<DeviceInfo>,
    health: Mutex<Vec<Health>>,
    xid_events: EventQueue,
    stop: Arc<AtomicBool>,
    xid_thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NvmlBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlBackend")
            .field("devices", &self.inventory.len())
            .finish_non_exhaustive()
    }
}

impl NvmlBackend {
    /// Loads the system's `libnvidia-ml.so.1`, initialises NVML and reads the inventory.
    pub fn load() -> Result<Self, DeviceError> {
        Self::open(None)
    }

    /// Loads NVML from the shared library at `path`.
    pub fn load_from(path: impl AsRef<Path>) -> Result<Self, DeviceError> {
        Self::open(Some(path.as_ref()))
    }

    fn open(path: Option<&Path>) -> Result<Self, DeviceError> {
        let mut builder = Nvml::builder();
        if let Some(path) = path {
            builder.lib_path(path.as_os_str());
        }
        let nvml = builder.init().map_err(|e| match e {
            NvmlError::LibloadingError(e) => DeviceError::LibraryNotFound {
                path: path.map(|p| p.display().to_string()),
                detail: e.to_string(),
            },
            e => call_error("nvmlInit_v2", None, e),
        })?;
        let nvml = Arc::new(nvml);
        let inventory = read_inventory(&nvml)?;
        let count = inventory.len() as u32;
        let xid_events = EventQueue::default();
        let stop = Arc::new(AtomicBool::new(false));
        let xid_thread = spawn_xid_watcher(nvml.clone(), count, xid_events.clone(), stop.clone());
        Ok(Self {
            nvml,
            health: Mutex::new(vec![Health::default(); inventory.len()]),
            inventory,
            xid_events,
            stop,
            xid_thread,
        })
    }

    /// One device's reading; `Ok(None)` if the device is lost (fallen off the bus, or no longer
    /// found at its index).
    fn read_usage(&self, index: u32) -> Result<Option<Usage>, DeviceError> {
        let device = match self.nvml.device_by_index(index) {
            Ok(d) => d,
            Err(NvmlError::GpuLost | NvmlError::NotFound) => return Ok(None),
            Err(e) => return Err(call_error("nvmlDeviceGetHandleByIndex_v2", Some(index), e)),
        };
        let utilization = match device.utilization_rates() {
            Ok(u) => u.gpu.min(100) as u8,
            Err(NvmlError::NotSupported) => 0,
            Err(NvmlError::GpuLost) => return Ok(None),
            Err(e) => return Err(call_error("nvmlDeviceGetUtilizationRates", Some(index), e)),
        };
        let memory_used_mib = match device.memory_info() {
            Ok(m) => m.used / MIB,
            Err(NvmlError::GpuLost) => return Ok(None),
            Err(e) => return Err(call_error("nvmlDeviceGetMemoryInfo_v2", Some(index), e)),
        };
        let ecc = |kind: MemoryError| match device.total_ecc_errors(kind, EccCounter::Volatile) {
            Ok(count) => Ok(Some(count)),
            Err(NvmlError::NotSupported | NvmlError::FailedToLoadSymbol(_)) => Ok(None),
            Err(NvmlError::GpuLost) => Err(None),
            Err(e) => Err(Some(call_error(
                "nvmlDeviceGetTotalEccErrors",
                Some(index),
                e,
            ))),
        };
        let (ecc_uncorrected, ecc_corrected) =
            match (ecc(MemoryError::Uncorrected), ecc(MemoryError::Corrected)) {
                (Ok(u), Ok(c)) => (u, c),
                (Err(None), _) | (_, Err(None)) => return Ok(None),
                (Err(Some(e)), _) | (_, Err(Some(e))) => return Err(e),
            };
        let throttled = match device.current_throttle_reasons() {
            Ok(r) => throttle_of(r),
            Err(NvmlError::GpuLost) => return Ok(None),
            // Not every device or driver says; throttling only degrades, so it is left unread.
            Err(_) => None,
        };
        Ok(Some(Usage {
            utilization,
            memory_used_mib,
            ecc_uncorrected,
            ecc_corrected,
            throttled,
        }))
    }
}

/// One device's reading at one telemetry call.
struct Usage {
    utilization: u8,
    memory_used_mib: u64,
    ecc_uncorrected: Option<u64>,
    ecc_corrected: Option<u64>,
    throttled: Option<Throttle>,
}

/// The throttle reasons that mean heat or power holds the clocks down: thermal slowdown, the
/// hardware slowdown signal (heat, or power draw far too high) and the external power brake. Not
/// the software power cap, which a busy GPU hits in normal training, nor idle, application
/// clocks, sync boost or display clocks.
fn throttle_of(r: ThrottleReasons) -> Option<Throttle> {
    let thermal = ThrottleReasons::SW_THERMAL_SLOWDOWN
        | ThrottleReasons::HW_THERMAL_SLOWDOWN
        | ThrottleReasons::HW_SLOWDOWN;
    let power = ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN;
    if r.intersects(thermal) {
        Some(Throttle::Thermal)
    } else if r.intersects(power) {
        Some(Throttle::Power)
    } else {
        None
    }
}

impl Drop for NvmlBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.xid_thread.take() {
            let _ = thread.join();
        }
    }
}

impl DeviceBackend for NvmlBackend {
    fn name(&self) -> &'static str {
        "nvml"
    }

    /// The inventory read at load: NVML numbers devices once per driver load.
    fn inventory(&self) -> Result<Vec<DeviceInfo>, DeviceError> {
        Ok(self.inventory.clone())
    }

    fn telemetry(&self) -> Result<Vec<DeviceTelemetry>, DeviceError> {
        let mut usage = Vec::with_capacity(self.inventory.len());
        for index in 0..self.inventory.len() as u32 {
            usage.push(self.read_usage(index)?);
        }
        let mut xids = std::mem::take(&mut *lock(&self.xid_events));
        let mut health = lock(&self.health);
        let mut telemetry = Vec::with_capacity(usage.len());
        for (i, (usage, h)) in usage.into_iter().zip(health.iter_mut()).enumerate() {
            let index = i as u32;
            let mut events: Vec<HealthEvent> = Vec::new();
            xids.retain(|&(d, event)| {
                if d == index {
                    events.push(event);
                }
                d != index
            });
            let (utilization_pct, memory_used_mib, ecc_corrected, throttled) = match usage {
                Some(u) => {
                    if let Some(count) = u.ecc_uncorrected.filter(|&c| c > h.ecc_uncorrected) {
                        h.ecc_uncorrected = count;
                        events.push(HealthEvent::EccUncorrected { count });
                    }
                    (
                        u.utilization,
                        u.memory_used_mib,
                        u.ecc_corrected,
                        u.throttled,
                    )
                }
                None => {
                    if !std::mem::replace(&mut h.lost, true) {
                        events.push(HealthEvent::Lost);
                    }
                    (0, 0, None, None)
                }
            };
            h.unhealthy |= events.iter().any(HealthEvent::is_fatal);
            telemetry.push(DeviceTelemetry {
                index,
                utilization_pct,
                memory_used_mib,
                healthy: !h.unhealthy,
                events,
                ecc_corrected,
                throttled,
            });
        }
        Ok(telemetry)
    }
}

const MIB: u64 = 1024 * 1024;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn call_error(call: &'static str, device: Option<u32>, e: NvmlError) -> DeviceError {
    let kind = match e {
        NvmlError::NotSupported => ErrorKind::NotSupported,
        NvmlError::GpuLost => ErrorKind::GpuLost,
        NvmlError::Timeout
        | NvmlError::InUse
        | NvmlError::NoData
        | NvmlError::InsufficientMemory => ErrorKind::Transient,
        _ => ErrorKind::Fatal,
    };
    DeviceError::Call {
        call,
        device,
        kind,
        message: e.to_string(),
    }
}

fn read_inventory(nvml: &Nvml) -> Result<Vec<DeviceInfo>, DeviceError> {
    let count = nvml
        .device_count()
        .map_err(|e| call_error("nvmlDeviceGetCount_v2", None, e))?;
    let mut devices = Vec::with_capacity(count as usize);
    let mut remote_ends: Vec<Vec<PciKey>> = Vec::with_capacity(count as usize);
    for index in 0..count {
        let device = nvml
            .device_by_index(index)
            .map_err(|e| call_error("nvmlDeviceGetHandleByIndex_v2", Some(index), e))?;
        let at = |call| move |e| call_error(call, Some(index), e);
        let uuid = device.uuid().map_err(at("nvmlDeviceGetUUID"))?;
        let raw_name = device.name().map_err(at("nvmlDeviceGetName"))?;
        let memory_mib = device
            .memory_info()
            .map_err(at("nvmlDeviceGetMemoryInfo_v2"))?
            .total
            / MIB;
        let pci_bus_id = device
            .pci_info()
            .map_err(at("nvmlDeviceGetPciInfo_v3"))?
            .bus_id;
        let numa_node = match device.numa_node_id() {
            Ok(node) => Some(node),
            Err(e) => {
                tracing::debug!(device = index, error = %e, "NUMA node unknown");
                None
            }
        };
        remote_ends.push(nvlink_remote_ends(&device, index));
        devices.push(DeviceInfo {
            index,
            uuid,
            model: normalize_model(&raw_name, memory_mib),
            raw_name,
            kind: DeviceKind::Gpu,
            memory_mib,
            nvlink_domain: 0,
            pci_bus_id,
            numa_node,
        });
    }

    // Graph nodes: the local devices, then every other link endpoint (NVSwitches).
    let mut node_of: HashMap<PciKey, usize> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| (PciKey::parse(&d.pci_bus_id), i))
        .collect();
    let mut links = Vec::new();
    for (i, ends) in remote_ends.into_iter().enumerate() {
        for end in ends {
            let next = node_of.len();
            let node = *node_of.entry(end).or_insert(next);
            links.push((i, node));
        }
    }
    for (device, domain) in devices
        .iter_mut()
        .zip(nvlink_domains(count as usize, &links))
    {
        device.nvlink_domain = domain;
    }
    Ok(devices)
}

/// The remote ends of a device's active NVLinks. Errors end the scan: `NotSupported` (no NVLink),
/// `InvalidArg` (past the device's last link), or anything else (logged), so NVLink trouble never
/// stops the agent; the device then has a domain of its own.
fn nvlink_remote_ends(device: &Device<'_>, index: u32) -> Vec<PciKey> {
    let mut ends = Vec::new();
    for link in 0..MAX_NVLINKS {
        let link_wrapper = device.link_wrapper_for(link);
        match link_wrapper.is_active() {
            Ok(true) => {}
            Ok(false) => continue,
            Err(NvmlError::NotSupported | NvmlError::InvalidArg) => break,
            Err(e) => {
                tracing::warn!(device = index, link, error = %e, "nvmlDeviceGetNvLinkState failed");
                break;
            }
        }
        match link_wrapper.remote_pci_info() {
            Ok(pci) => ends.push(PciKey::parse(&pci.bus_id)),
            Err(e) => tracing::warn!(
                device = index,
                link,
                error = %e,
                "nvmlDeviceGetNvLinkRemotePciInfo_v2 failed"
            ),
        }
    }
    ends
}

/// A PCI address compared by value: NVML writes the domain with 8 or 4 hex digits depending on
/// the call and version ("00000000:18:00.0", "0000:18:00.0").
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PciKey {
    Parsed(u32, u32, u32, u32),
    Raw(String),
}

impl PciKey {
    fn parse(bus_id: &str) -> Self {
        let parsed = (|| {
            let mut parts = bus_id.trim().split(':');
            let domain = u32::from_str_radix(parts.next()?, 16).ok()?;
            let bus = u32::from_str_radix(parts.next()?, 16).ok()?;
            let (device, function) = parts.next()?.split_once('.')?;
            if parts.next().is_some() {
                return None;
            }
            Some(PciKey::Parsed(
                domain,
                bus,
                u32::from_str_radix(device, 16).ok()?,
                u32::from_str_radix(function, 16).ok()?,
            ))
        })();
        parsed.unwrap_or_else(|| PciKey::Raw(bus_id.trim().to_ascii_uppercase()))
    }
}

#[cfg(target_os = "linux")]
fn spawn_xid_watcher(
    nvml: Arc<Nvml>,
    count: u32,
    queue: EventQueue,
    stop: Arc<AtomicBool>,
) -> Option<JoinHandle<()>> {
    let spawned = std::thread::Builder::new()
        .name("nvml-xid".into())
        .spawn(move || watch_xids(&nvml, count, &queue, &stop));
    match spawned {
        Ok(handle) => Some(handle),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the XID watcher thread: no XID events");
            None
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn spawn_xid_watcher(
    _nvml: Arc<Nvml>,
    _count: u32,
    _queue: EventQueue,
    _stop: Arc<AtomicBool>,
) -> Option<JoinHandle<()>> {
    None
}

#[cfg(target_os = "linux")]
fn watch_xids(nvml: &Nvml, count: u32, queue: &EventQueue, stop: &AtomicBool) {
    use nvml_wrapper::bitmasks::event::EventTypes;
    use nvml_wrapper::enums::event::XidError;

    let mut set = match nvml.create_event_set() {
        Ok(set) => Some(set),
        Err(e) => {
            tracing::warn!(error = %e, "nvmlEventSetCreate failed: no XID events");
            return;
        }
    };
    let mut registered = 0;
    for index in 0..count {
        let Ok(device) = nvml.device_by_index(index) else {
            continue;
        };
        match device.supported_event_types() {
            Ok(types) if types.contains(EventTypes::CRITICAL_XID_ERROR) => {}
            Ok(_) | Err(_) => {
                tracing::info!(device = index, "XID events not supported");
                continue;
            }
        }
        let Some(s) = set.take() else { return };
        match device.register_events(EventTypes::CRITICAL_XID_ERROR, s) {
            Ok(s) => {
                set = Some(s);
                registered += 1;
            }
            Err(e) => {
                // nvml-wrapper frees the set on failure: no XID events on this host.
                tracing::warn!(device = index, error = %e, "nvmlDeviceRegisterEvents failed: no XID events");
                return;
            }
        }
    }
    let Some(set) = set.filter(|_| registered > 0) else {
        return;
    };
    let poll_ms = XID_POLL.as_millis() as u32;
    while !stop.load(Ordering::Relaxed) {
        match set.wait(poll_ms) {
            Ok(event) => {
                let code = match event.event_data {
                    Some(XidError::Value(code)) => Some(code),
                    Some(XidError::Unknown) | None => None,
                };
                match event.device.index() {
                    Ok(index) => lock(queue).push((index, HealthEvent::Xid { code })),
                    Err(e) => tracing::warn!(?code, error = %e, "XID on a device without index"),
                }
            }
            Err(NvmlError::Timeout) => {}
            Err(e) => {
                tracing::warn!(error = %e, "nvmlEventSetWait_v2 failed");
                std::thread::sleep(XID_POLL);
            }
        }
    }
}
