//! Declared devices for development, simulation and tests (`--fake-devices 8xH100`).
//!
//! Spec grammar: `SEGMENT[+SEGMENT...][:nvlink=LAYOUT]`, where `SEGMENT` is `COUNTxMODEL`
//! (`8xH100`, `4xA100-80G`, `4xTPU-v5p`, `2xH100+2xA100-80G`). Devices are numbered in spec order.
//!
//! NVLink (ICI for TPUs) layout: by default each segment is cut into groups of 4 consecutive
//! devices (an 8-GPU host has two domains of four, like an HGX board's halves; a host of 4 or fewer
//! devices of one model is one domain); a link never joins devices of different segments.
//! `nvlink=0-3,4-7` declares the groups explicitly (device indices, `N` or `N-M`); devices not
//! listed are alone; `nvlink=none` leaves every device alone.
//!
//! UUIDs are `GPU-<host>-<index>` (`TPU-<host>-<index>` for TPUs), so they are stable across
//! restarts and unique in a fleet of distinct host names. Utilization and memory use are what the
//! agent sets from what its tasks do; faults are injected.

use std::sync::Mutex;

use super::{
    nvlink_domains, DeviceBackend, DeviceError, DeviceInfo, DeviceKind, DeviceTelemetry,
    HealthEvent,
};

/// Models the fake knows the driver name and memory of. Other models are accepted (kind TPU if
/// the name starts with "TPU-", else GPU) with the model as raw name and [`DEFAULT_MEMORY_MIB`].
const KNOWN_MODELS: &[(&str, DeviceKind, &str, u64)] = &[
    ("H100", DeviceKind::Gpu, "NVIDIA H100 80GB HBM3", 81_559),
    ("H200", DeviceKind::Gpu, "NVIDIA H200", 143_771),
    ("B200", DeviceKind::Gpu, "NVIDIA B200", 183_359),
    ("A100-80G", DeviceKind::Gpu, "NVIDIA A100-SXM4-80GB", 81_920),
    ("A100-40G", DeviceKind::Gpu, "NVIDIA A100-SXM4-40GB", 40_960),
    ("L40S", DeviceKind::Gpu, "NVIDIA L40S", 46_068),
    ("L4", DeviceKind::Gpu, "NVIDIA L4", 23_034),
    ("T4", DeviceKind::Gpu, "Tesla T4", 15_360),
    ("TPU-v4", DeviceKind::Tpu, "TPU v4", 32_768),
    ("TPU-v5e", DeviceKind::Tpu, "TPU v5 lite", 16_384),
    ("TPU-v5p", DeviceKind::Tpu, "TPU v5p", 97_280),
    ("TPU-v6e", DeviceKind::Tpu, "TPU v6e", 32_768),
];

/// Memory of a model the fake does not know.
const DEFAULT_MEMORY_MIB: u64 = 16_384;

/// Devices in one NVLink group when the spec declares no layout.
const DEFAULT_GROUP: usize = 4;

/// The most devices one fake host may declare.
const MAX_DEVICES: usize = 256;

/// A `--fake-devices` value that does not parse; the message names the value and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--fake-devices: {0}")]
pub struct FakeSpecError(String);

/// A fault to inject into a fake device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// An XID error; fatal codes ([`super::FATAL_XIDS`], e.g. 79) make the device unhealthy, others
    /// (e.g. 13, an application fault) only yield the event, as on NVML.
    Xid(u64),
    /// One more uncorrected ECC error: unhealthy.
    EccUncorrected,
    /// The device falls off the bus: unhealthy.
    Lost,
}

#[derive(Debug, Clone, Default)]
struct FakeState {
    utilization_pct: u8,
    memory_used_mib: u64,
    ecc_uncorrected: u64,
    healthy: bool,
    events: Vec<HealthEvent>,
}

/// A [`DeviceBackend`] of declared devices.
#[derive(Debug)]
pub struct FakeBackend {
    devices: Vec<DeviceInfo>,
    state: Mutex<Vec<FakeState>>,
}

impl FakeBackend {
    /// Devices from a `--fake-devices` spec, with UUIDs derived from `host`.
    pub fn parse(spec: &str, host: &str) -> Result<Self, FakeSpecError> {
        let (segments_text, layout) = match spec.split_once(':') {
            Some((segments, layout)) => (segments, Some(layout)),
            None => (spec, None),
        };
        let mut devices = Vec::new();
        let mut segment_of = Vec::new();
        for (segment_index, segment) in segments_text.split('+').enumerate() {
            let (count, model) = parse_segment(segment.trim(), spec)?;
            let (model, kind, raw_name, memory_mib) = describe(model);
            if devices.len() + count > MAX_DEVICES {
                return Err(FakeSpecError(format!(
                    "at most {MAX_DEVICES} devices on one host, got {spec:?}"
                )));
            }
            for _ in 0..count {
                let index = devices.len() as u32;
                let prefix = match kind {
                    DeviceKind::Gpu => "GPU",
                    DeviceKind::Tpu => "TPU",
                };
                devices.push(DeviceInfo {
                    index,
                    uuid: format!("{prefix}-{host}-{index}"),
                    model: model.clone(),
                    raw_name: raw_name.clone(),
                    kind,
                    memory_mib,
                    nvlink_domain: 0,
                    pci_bus_id: format!("00000000:{:02X}:00.0", 0x10 + index),
                    numa_node: None,
                });
                segment_of.push(segment_index);
            }
        }
        let count = devices.len();
        let links = match layout {
            None => default_links(&segment_of),
            Some(layout) => parse_layout(layout, count, spec)?,
        };
        for (device, domain) in devices.iter_mut().zip(nvlink_domains(count, &links)) {
            device.nvlink_domain = domain;
            // Two sockets: the first half of the devices on node 0, the rest on node 1.
            device.numa_node = Some(u32::from(device.index as usize >= count.div_ceil(2)));
        }
        let state = devices
            .iter()
            .map(|_| FakeState {
                healthy: true,
                ..FakeState::default()
            })
            .collect();
        Ok(Self {
            devices,
            state: Mutex::new(state),
        })
    }

    /// Sets the utilization a device reports (clamped to 100).
    pub fn set_utilization(&self, index: u32, pct: u8) -> Result<(), DeviceError> {
        self.with_device(index, |s, _| s.utilization_pct = pct.min(100))
    }

    /// Sets the memory a device reports in use (clamped to its memory).
    pub fn set_memory_used(&self, index: u32, mib: u64) -> Result<(), DeviceError> {
        self.with_device(index, |s, info| {
            s.memory_used_mib = mib.min(info.memory_mib)
        })
    }

    /// Injects a fault: the next telemetry carries its event, and the device stays unhealthy
    /// (if the fault is fatal) until [`FakeBackend::reset`].
    pub fn inject_fault(&self, index: u32, fault: Fault) -> Result<(), DeviceError> {
        self.with_device(index, |s, _| {
            let event = match fault {
                Fault::Xid(code) => HealthEvent::Xid { code: Some(code) },
                Fault::EccUncorrected => {
                    s.ecc_uncorrected += 1;
                    HealthEvent::EccUncorrected {
                        count: s.ecc_uncorrected,
                    }
                }
                Fault::Lost => HealthEvent::Lost,
            };
            s.healthy &= !event.is_fatal();
            s.events.push(event);
        })
    }

    /// Resets a device, as a GPU reset would: healthy again, counters and pending events cleared.
    pub fn reset(&self, index: u32) -> Result<(), DeviceError> {
        self.with_device(index, |s, _| {
            *s = FakeState {
                healthy: true,
                ..FakeState::default()
            }
        })
    }

    fn with_device(
        &self,
        index: u32,
        f: impl FnOnce(&mut FakeState, &DeviceInfo),
    ) -> Result<(), DeviceError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let count = state.len() as u32;
        let (Some(s), Some(info)) = (
            state.get_mut(index as usize),
            self.devices.get(index as usize),
        ) else {
            return Err(DeviceError::NoSuchDevice { index, count });
        };
        f(s, info);
        Ok(())
    }
}

impl DeviceBackend for FakeBackend {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn inventory(&self) -> Result<Vec<DeviceInfo>, DeviceError> {
        Ok(self.devices.clone())
    }

    fn telemetry(&self) -> Result<Vec<DeviceTelemetry>, DeviceError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Ok(state
            .iter_mut()
            .enumerate()
            .map(|(i, s)| DeviceTelemetry {
                index: i as u32,
                utilization_pct: s.utilization_pct,
                memory_used_mib: s.memory_used_mib,
                healthy: s.healthy,
                events: std::mem::take(&mut s.events),
            })
            .collect())
    }
}

fn parse_segment<'a>(segment: &'a str, spec: &str) -> Result<(usize, &'a str), FakeSpecError> {
    let expected = || FakeSpecError(format!("expected COUNTxMODEL like 8xH100, got {spec:?}"));
    let (count, model) = segment.split_once(['x', 'X']).ok_or_else(expected)?;
    if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
        return Err(expected());
    }
    let valid_model = model
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric())
        && model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if !valid_model {
        return Err(FakeSpecError(format!(
            "expected a model name of letters, digits, '-', '.' after the count (like 8xH100), \
             got {spec:?}"
        )));
    }
    let count: usize = count.parse().map_err(|_| expected())?;
    if count == 0 {
        return Err(FakeSpecError(format!(
            "expected at least 1 device in each COUNTxMODEL, got {spec:?}"
        )));
    }
    Ok((count, model))
}

/// Canonical model name, kind, driver name and memory of a model named in a spec.
fn describe(model: &str) -> (String, DeviceKind, String, u64) {
    match KNOWN_MODELS
        .iter()
        .find(|(name, ..)| name.eq_ignore_ascii_case(model))
    {
        Some(&(name, kind, raw, memory)) => (name.to_owned(), kind, raw.to_owned(), memory),
        None => {
            let kind = if model.len() > 4 && model[..4].eq_ignore_ascii_case("TPU-") {
                DeviceKind::Tpu
            } else {
                DeviceKind::Gpu
            };
            (model.to_owned(), kind, model.to_owned(), DEFAULT_MEMORY_MIB)
        }
    }
}

/// Groups of [`DEFAULT_GROUP`] consecutive devices within each segment, as links to the group's
/// first device.
fn default_links(segment_of: &[usize]) -> Vec<(usize, usize)> {
    let mut links = Vec::new();
    let mut start = 0;
    for i in 0..segment_of.len() {
        if segment_of[i] != segment_of[start] || i - start == DEFAULT_GROUP {
            start = i;
        }
        if i != start {
            links.push((start, i));
        }
    }
    links
}

fn parse_layout(
    layout: &str,
    count: usize,
    spec: &str,
) -> Result<Vec<(usize, usize)>, FakeSpecError> {
    let Some(groups) = layout.strip_prefix("nvlink=") else {
        return Err(FakeSpecError(format!(
            "expected nvlink=GROUPS (like 8xH100:nvlink=0-3,4-7) after ':', got {spec:?}"
        )));
    };
    if groups == "none" {
        return Ok(Vec::new());
    }
    let mut seen = vec![false; count];
    let mut links = Vec::new();
    for group in groups.split(',') {
        let bad = || {
            FakeSpecError(format!(
                "expected NVLink groups of device indices below {count} like 0-3,4-7 or none, got \
                 {group:?} in {spec:?}"
            ))
        };
        let (first, last) = match group.split_once('-') {
            Some((a, b)) => (a.parse::<usize>(), b.parse::<usize>()),
            None => (group.parse::<usize>(), group.parse::<usize>()),
        };
        let (Ok(first), Ok(last)) = (first, last) else {
            return Err(bad());
        };
        if first > last || last >= count {
            return Err(bad());
        }
        for (d, seen) in (first..=last).zip(&mut seen[first..=last]) {
            if std::mem::replace(seen, true) {
                return Err(FakeSpecError(format!(
                    "device {d} is in two NVLink groups in {spec:?}"
                )));
            }
            if d != first {
                links.push((first, d));
            }
        }
    }
    Ok(links)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Model, kind and NVLink domain of each device.
    type Summary = Vec<(String, DeviceKind, u16)>;

    fn summary(spec: &str) -> Result<Summary, String> {
        let backend = FakeBackend::parse(spec, "h1").map_err(|e| e.to_string())?;
        Ok(backend
            .inventory()
            .unwrap()
            .into_iter()
            .map(|d| (d.model, d.kind, d.nvlink_domain))
            .collect())
    }

    #[test]
    fn parses_specs() {
        use DeviceKind::{Gpu, Tpu};
        let g = |m: &str, d: u16| (m.to_owned(), Gpu, d);
        let t = |m: &str, d: u16| (m.to_owned(), Tpu, d);
        let cases: Vec<(&str, Summary)> = vec![
            ("1xH100", vec![g("H100", 0)]),
            ("4xh100", vec![g("H100", 0); 4]),
            (
                "8xH100",
                [vec![g("H100", 0); 4], vec![g("H100", 1); 4]].concat(),
            ),
            ("4xA100-80G", vec![g("A100-80G", 0); 4]),
            ("4xTPU-v5p", vec![t("TPU-v5p", 0); 4]),
            ("2xTPU-v7x", vec![t("TPU-v7x", 0); 2]),
            ("2xG2", vec![g("G2", 0); 2]),
            (
                "2xH100+2xA100-80G",
                vec![
                    g("H100", 0),
                    g("H100", 0),
                    g("A100-80G", 1),
                    g("A100-80G", 1),
                ],
            ),
            (
                "6xH100",
                [vec![g("H100", 0); 4], vec![g("H100", 1); 2]].concat(),
            ),
            ("8xH100:nvlink=0-7", vec![g("H100", 0); 8]),
            (
                "4xH100:nvlink=0-1,2-3",
                vec![g("H100", 0), g("H100", 0), g("H100", 1), g("H100", 1)],
            ),
            (
                "4xH100:nvlink=1-2",
                vec![g("H100", 0), g("H100", 1), g("H100", 1), g("H100", 2)],
            ),
            (
                "3xH100:nvlink=none",
                vec![g("H100", 0), g("H100", 1), g("H100", 2)],
            ),
        ];
        for (spec, want) in cases {
            assert_eq!(summary(spec), Ok(want), "spec {spec:?}");
        }
    }

    #[test]
    fn rejects_bad_specs_naming_the_value() {
        let cases: &[(&str, &str)] = &[
            (
                "8H100",
                r#"--fake-devices: expected COUNTxMODEL like 8xH100, got "8H100""#,
            ),
            (
                "",
                r#"--fake-devices: expected COUNTxMODEL like 8xH100, got """#,
            ),
            (
                "xH100",
                r#"--fake-devices: expected COUNTxMODEL like 8xH100, got "xH100""#,
            ),
            (
                "-1xH100",
                r#"--fake-devices: expected COUNTxMODEL like 8xH100, got "-1xH100""#,
            ),
            (
                "8xH100+",
                r#"--fake-devices: expected COUNTxMODEL like 8xH100, got "8xH100+""#,
            ),
            (
                "8x",
                r#"--fake-devices: expected a model name of letters, digits, '-', '.' after the count (like 8xH100), got "8x""#,
            ),
            (
                "0xH100",
                r#"--fake-devices: expected at least 1 device in each COUNTxMODEL, got "0xH100""#,
            ),
            (
                "300xH100",
                r#"--fake-devices: at most 256 devices on one host, got "300xH100""#,
            ),
            (
                "4xH100:links=0-3",
                r#"--fake-devices: expected nvlink=GROUPS (like 8xH100:nvlink=0-3,4-7) after ':', got "4xH100:links=0-3""#,
            ),
            (
                "4xH100:nvlink=0-4",
                r#"--fake-devices: expected NVLink groups of device indices below 4 like 0-3,4-7 or none, got "0-4" in "4xH100:nvlink=0-4""#,
            ),
            (
                "4xH100:nvlink=3-1",
                r#"--fake-devices: expected NVLink groups of device indices below 4 like 0-3,4-7 or none, got "3-1" in "4xH100:nvlink=3-1""#,
            ),
            (
                "4xH100:nvlink=0-2,2-3",
                r#"--fake-devices: device 2 is in two NVLink groups in "4xH100:nvlink=0-2,2-3""#,
            ),
        ];
        for &(spec, want) in cases {
            assert_eq!(summary(spec), Err(want.to_owned()), "spec {spec:?}");
        }
    }

    #[test]
    fn devices_have_stable_identities() {
        let backend = FakeBackend::parse("2xH100+1xTPU-v5p", "node-7").unwrap();
        let inv = backend.inventory().unwrap();
        let uuids: Vec<_> = inv.iter().map(|d| d.uuid.as_str()).collect();
        assert_eq!(uuids, ["GPU-node-7-0", "GPU-node-7-1", "TPU-node-7-2"]);
        assert_eq!(inv[0].raw_name, "NVIDIA H100 80GB HBM3");
        assert_eq!(inv[0].memory_mib, 81_559);
        assert_eq!(inv[0].pci_bus_id, "00000000:10:00.0");
        assert_eq!(inv[2].pci_bus_id, "00000000:12:00.0");
        let numa: Vec<_> = inv.iter().map(|d| d.numa_node).collect();
        assert_eq!(numa, [Some(0), Some(0), Some(1)]);
        assert_eq!(
            FakeBackend::parse("2xH100+1xTPU-v5p", "node-7")
                .unwrap()
                .inventory()
                .unwrap(),
            inv
        );
    }

    #[test]
    fn known_gpu_names_normalize_to_their_model() {
        for &(model, kind, raw, memory) in KNOWN_MODELS {
            if kind == DeviceKind::Gpu {
                assert_eq!(super::super::normalize_model(raw, memory), model, "{raw}");
            }
        }
    }

    #[test]
    fn telemetry_follows_what_the_agent_sets_and_faults() {
        let backend = FakeBackend::parse("2xH100", "h").unwrap();
        backend.set_utilization(0, 73).unwrap();
        backend.set_utilization(1, 250).unwrap();
        backend.set_memory_used(0, 1_000).unwrap();
        backend.set_memory_used(1, u64::MAX).unwrap();
        let t = backend.telemetry().unwrap();
        assert_eq!((t[0].utilization_pct, t[0].memory_used_mib), (73, 1_000));
        assert_eq!((t[1].utilization_pct, t[1].memory_used_mib), (100, 81_559));
        assert!(t.iter().all(|d| d.healthy && d.events.is_empty()));

        backend.inject_fault(1, Fault::Xid(13)).unwrap();
        backend.inject_fault(0, Fault::Xid(79)).unwrap();
        backend.inject_fault(0, Fault::EccUncorrected).unwrap();
        let t = backend.telemetry().unwrap();
        assert!(!t[0].healthy);
        assert_eq!(
            t[0].events,
            [
                HealthEvent::Xid { code: Some(79) },
                HealthEvent::EccUncorrected { count: 1 }
            ]
        );
        assert!(t[1].healthy, "XID 13 is an application fault");
        assert_eq!(t[1].events, [HealthEvent::Xid { code: Some(13) }]);

        // Events are delivered once; unhealthy sticks until a reset.
        let t = backend.telemetry().unwrap();
        assert!(!t[0].healthy && t[0].events.is_empty());
        backend.reset(0).unwrap();
        assert!(backend.telemetry().unwrap()[0].healthy);

        backend.inject_fault(1, Fault::Lost).unwrap();
        assert!(!backend.telemetry().unwrap()[1].healthy);

        let err = backend.set_utilization(2, 10).unwrap_err();
        assert_eq!(err.to_string(), "no device 2: this host has 2 device(s)");
        assert!(!err.is_retryable());
    }
}
