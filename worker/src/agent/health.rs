//! Device health as the agent reports it: each device classified from its telemetry as healthy,
//! degraded or failed, and each change reported once.
//!
//! * **Failed**: a fatal XID ([`crate::devices::FATAL_XIDS`], NVIDIA's XID catalogue), an
//!   uncorrected ECC error (the volatile counter grew), the device lost by the driver (fallen off
//!   the bus) or not found at telemetry, or the backend still calling it unhealthy (a fault that
//!   needs a reset). The scheduler fences a failed device and repairs the gang on it.
//! * **Degraded**: corrected ECC errors past [`CORRECTED_ECC_DEGRADED`], or heat or power holding
//!   the clocks down (where the backend can tell). Kept in service, shown to operators.
//! * **Healthy**: none of that.
//!
//! **Storms are coalesced.** A device in trouble can raise the same event thousands of times (an
//! XID per kernel launch, an ECC count rising every second). The monitor reports a device once per
//! change of its state, not per event, and logs one line per change; the events that changed
//! nothing are counted in [`HealthMonitor::suppressed`] (and the
//! `gangway_worker_device_events_suppressed_total` counter), not reported or logged one by one.
//! Throttling comes and goes with the load, so a degraded device is called healthy again only
//! after [`RECOVER_READINGS`] clean readings in a row, not at the first.

use crate::devices::{DeviceError, DeviceInfo, DeviceTelemetry, ErrorKind};
use gangway_proto::pb;

/// Corrected ECC errors (volatile, since the driver loaded) past which a device counts as
/// degraded: a few are normal on large HBM; a steady stream foretells uncorrectable ones.
pub const CORRECTED_ECC_DEGRADED: u64 = 1_000;

/// Clean readings in a row before a degraded device is called healthy again (at one reading per
/// heartbeat).
pub const RECOVER_READINGS: u32 = 10;

/// One device's state changed: report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthChange {
    pub index: u32,
    pub uuid: String,
    /// What was reported before (`Unspecified`: nothing yet, the agent's first reading).
    pub from: pb::DeviceHealth,
    pub health: pb::DeviceHealth,
    pub cause: String,
}

#[derive(Clone, Debug)]
struct Tracked {
    uuid: String,
    health: pb::DeviceHealth,
    cause: String,
    /// Clean readings in a row while degraded.
    clean: u32,
}

/// Every device's last reported state.
#[derive(Debug)]
pub struct HealthMonitor {
    devices: Vec<Tracked>,
    suppressed: u64,
}

impl HealthMonitor {
    /// Every device of `inventory`, none reported yet.
    pub fn new(inventory: &[DeviceInfo]) -> Self {
        Self {
            devices: inventory
                .iter()
                .map(|d| Tracked {
                    uuid: d.uuid.clone(),
                    // Not reported yet: the first reading reports every device, so a state the
                    // scheduler kept from before a restart (degraded, say) is brought up to date.
                    health: pb::DeviceHealth::Unspecified,
                    cause: String::new(),
                    clean: 0,
                })
                .collect(),
            suppressed: 0,
        }
    }

    /// Health events that changed no device's state (repeats while failed, a second fatal event
    /// in the same reading, ...), since start.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }

    /// The state last reported for device `index`.
    pub fn health(&self, index: u32) -> Option<pb::DeviceHealth> {
        self.devices.get(index as usize).map(|d| d.health)
    }

    /// One telemetry reading: the devices whose state changed. A device of the inventory missing
    /// from the reading is failed (the driver no longer finds it).
    pub fn observe(&mut self, telemetry: &[DeviceTelemetry]) -> Vec<HealthChange> {
        let mut changes = Vec::new();
        for index in 0..self.devices.len() as u32 {
            let (health, cause, events) = match telemetry.iter().find(|t| t.index == index) {
                Some(t) => {
                    let (health, cause) = self.classify(index, t);
                    (health, cause, t.events.len() as u64)
                }
                None => (
                    pb::DeviceHealth::Failed,
                    "not found at telemetry: the driver no longer lists it".to_owned(),
                    0,
                ),
            };
            let changed = self.set(index, health, cause, &mut changes);
            // The event that made the change is reported; the rest are repeats.
            let repeats = events.saturating_sub(u64::from(changed));
            self.suppress(repeats);
        }
        changes
    }

    /// A telemetry call failed: a device the error says is lost or missing is failed; anything
    /// else (a busy driver, a library problem) says nothing about one device.
    pub fn observe_error(&mut self, error: &DeviceError) -> Vec<HealthChange> {
        let cause = match error {
            DeviceError::Call {
                kind: ErrorKind::GpuLost,
                ..
            } => format!("lost: {error}"),
            DeviceError::NoSuchDevice { .. } => format!("not found at telemetry: {error}"),
            _ => return Vec::new(),
        };
        let mut changes = Vec::new();
        if let Some(index) = error.device() {
            if (index as usize) < self.devices.len() {
                self.set(index, pb::DeviceHealth::Failed, cause, &mut changes);
            }
        }
        changes
    }

    /// A device's state from one reading.
    fn classify(&self, index: u32, t: &DeviceTelemetry) -> (pb::DeviceHealth, String) {
        if let Some(fatal) = t.events.iter().find(|e| e.is_fatal()) {
            return (pb::DeviceHealth::Failed, fatal.to_string());
        }
        if !t.healthy {
            // Still unhealthy from an earlier event: keep what was said about it.
            let known = &self.devices[index as usize];
            let cause = if known.health == pb::DeviceHealth::Failed {
                known.cause.clone()
            } else {
                "unhealthy: the device needs a reset".to_owned()
            };
            return (pb::DeviceHealth::Failed, cause);
        }
        if let Some(t) = t.throttled {
            return (pb::DeviceHealth::Degraded, t.to_string());
        }
        if let Some(n) = t.ecc_corrected.filter(|&n| n > CORRECTED_ECC_DEGRADED) {
            return (
                pb::DeviceHealth::Degraded,
                format!("corrected ECC errors: {n} (over {CORRECTED_ECC_DEGRADED})"),
            );
        }
        (pb::DeviceHealth::Healthy, String::new())
    }

    /// Records device `index` in `health`; true (and a change pushed) when that is a change.
    fn set(
        &mut self,
        index: u32,
        health: pb::DeviceHealth,
        cause: String,
        changes: &mut Vec<HealthChange>,
    ) -> bool {
        let d = &mut self.devices[index as usize];
        if health == pb::DeviceHealth::Healthy && d.health == pb::DeviceHealth::Degraded {
            d.clean += 1;
            if d.clean < RECOVER_READINGS {
                return false;
            }
        }
        d.clean = 0;
        if d.health == health {
            return false;
        }
        let from = std::mem::replace(&mut d.health, health);
        d.cause = cause.clone();
        changes.push(HealthChange {
            index,
            uuid: d.uuid.clone(),
            from,
            health,
            cause,
        });
        true
    }

    fn suppress(&mut self, n: u64) {
        if n > 0 {
            self.suppressed += n;
            metrics::counter!("gangway_worker_device_events_suppressed_total").increment(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::{DeviceBackend, FakeBackend, Fault, Throttle};

    fn monitor(n: usize) -> (FakeBackend, HealthMonitor) {
        let backend = FakeBackend::parse(&format!("{n}xH100"), "h").unwrap();
        let monitor = HealthMonitor::new(&backend.inventory().unwrap());
        (backend, monitor)
    }

    fn words(changes: &[HealthChange]) -> Vec<(u32, &str, &str)> {
        changes
            .iter()
            .map(|c| (c.index, c.health.word(), c.cause.as_str()))
            .collect()
    }

    #[test]
    fn each_device_is_classified_and_each_change_reported_once() {
        let (backend, mut m) = monitor(4);
        assert_eq!(m.health(0), Some(pb::DeviceHealth::Unspecified));
        // The first reading reports every device (the scheduler may hold an older state).
        let first = m.observe(&backend.telemetry().unwrap());
        assert_eq!(
            words(&first),
            [
                (0, "healthy", ""),
                (1, "healthy", ""),
                (2, "healthy", ""),
                (3, "healthy", "")
            ]
        );
        assert!(m.observe(&backend.telemetry().unwrap()).is_empty());

        // A storm of XID 79 on device 3: one change, the rest suppressed.
        for _ in 0..50 {
            backend.inject_fault(3, Fault::Xid(79)).unwrap();
        }
        backend.inject_fault(1, Fault::Xid(13)).unwrap();
        let changes = m.observe(&backend.telemetry().unwrap());
        assert_eq!(
            words(&changes),
            [(3, "failed", "XID 79: GPU has fallen off the bus")]
        );
        assert_eq!(changes[0].uuid, "GPU-h-3");
        assert_eq!(m.suppressed(), 49 + 1, "49 repeats and one application XID");
        // More events while failed: nothing new to report.
        backend.inject_fault(3, Fault::EccUncorrected).unwrap();
        assert!(m.observe(&backend.telemetry().unwrap()).is_empty());
        assert!(m.observe(&backend.telemetry().unwrap()).is_empty());
        assert_eq!(m.suppressed(), 51);

        // Degraded: thermal throttling; corrected ECC over the threshold.
        backend
            .inject_fault(0, Fault::Throttled(Throttle::Thermal))
            .unwrap();
        backend
            .inject_fault(2, Fault::EccCorrected(CORRECTED_ECC_DEGRADED + 1))
            .unwrap();
        let changes = m.observe(&backend.telemetry().unwrap());
        assert_eq!(
            words(&changes),
            [
                (0, "degraded", "thermal throttling"),
                (2, "degraded", "corrected ECC errors: 1001 (over 1000)")
            ]
        );

        // A reset: a failed device is healthy again at once; a degraded one after clean
        // readings in a row (throttling comes and goes).
        backend.reset(3).unwrap();
        backend.reset(0).unwrap();
        let changes = m.observe(&backend.telemetry().unwrap());
        assert_eq!(words(&changes), [(3, "healthy", "")]);
        for _ in 2..RECOVER_READINGS {
            assert!(m.observe(&backend.telemetry().unwrap()).is_empty());
        }
        let changes = m.observe(&backend.telemetry().unwrap());
        assert_eq!(words(&changes), [(0, "healthy", "")]);

        // Uncorrected ECC and a lost device are failures.
        backend.inject_fault(0, Fault::EccUncorrected).unwrap();
        backend.inject_fault(1, Fault::Lost).unwrap();
        let changes = m.observe(&backend.telemetry().unwrap());
        assert_eq!(
            words(&changes),
            [
                (0, "failed", "uncorrected ECC errors: 1"),
                (
                    1,
                    "failed",
                    "lost: the device no longer answers (fallen off the bus)"
                )
            ]
        );
    }

    #[test]
    fn a_device_missing_from_telemetry_or_lost_in_an_error_fails() {
        let (backend, mut m) = monitor(2);
        m.observe(&backend.telemetry().unwrap());
        let mut t = backend.telemetry().unwrap();
        t.truncate(1);
        let changes = m.observe(&t);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].index, 1);
        assert_eq!(changes[0].health, pb::DeviceHealth::Failed);
        assert!(changes[0].cause.starts_with("not found at telemetry"));

        let lost = DeviceError::Call {
            call: "nvmlDeviceGetMemoryInfo_v2",
            device: Some(0),
            kind: ErrorKind::GpuLost,
            message: "GPU is lost".into(),
        };
        let changes = m.observe_error(&lost);
        assert_eq!(changes.len(), 1);
        assert_eq!(m.health(0), Some(pb::DeviceHealth::Failed));
        // A busy driver says nothing about a device.
        let busy = DeviceError::Call {
            call: "nvmlDeviceGetMemoryInfo_v2",
            device: Some(1),
            kind: ErrorKind::Transient,
            message: "timeout".into(),
        };
        assert!(m.observe_error(&busy).is_empty());
        assert!(m.observe_error(&lost).is_empty(), "already failed");
    }
}
