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
//! agent sets from what its tasks do; faults are injected, by [`FakeBackend::inject_fault`] or at
//! run time through a fault file (`--fake-fault-file PATH`, see [`FakeBackend::with_fault_file`]).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{
    nvlink_domains, DeviceBackend, DeviceError, DeviceInfo, DeviceKind, DeviceTelemetry,
    HealthEvent, Throttle,
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
    /// This many more corrected ECC errors: the device stays healthy (the agent may call it
    /// degraded past its threshold).
    EccCorrected(u64),
    /// The device falls off the bus: unhealthy.
    Lost,
    /// Heat or power holds the clocks down until the device is reset.
    Throttled(Throttle),
}

/// A line of a fault file that does not parse: its number and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fault file {path} line {line}: {message}")]
pub struct FaultFileError {
    pub path: PathBuf,
    pub line: usize,
    pub message: String,
}

/// One command of a fault file: a fault for a device, or a reset of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultCommand {
    Inject(u32, Fault),
    /// `clear N`: reset device N, as a GPU reset would.
    Clear(u32),
}

impl FaultCommand {
    /// One line of a fault file (see [`FakeBackend::with_fault_file`]); `Ok(None)` for a blank line
    /// or a `#` comment.
    pub fn parse(line: &str) -> Result<Option<Self>, String> {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            return Ok(None);
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let number = |i: usize, what: &str| -> Result<u64, String> {
            words
                .get(i)
                .ok_or_else(|| format!("expected {what} after {:?}", words[..i].join(" ")))?
                .parse::<u64>()
                .map_err(|_| format!("expected {what} (a number), got {:?}", words[i]))
        };
        let device = || -> Result<u32, String> {
            let d = number(1, "a device index")?;
            u32::try_from(d).map_err(|_| format!("device index {d} is too large"))
        };
        let arity = |n: usize| -> Result<(), String> {
            if words.len() > n {
                Err(format!("unexpected {:?} at the end of {line:?}", words[n]))
            } else {
                Ok(())
            }
        };
        let command = match words[0] {
            "xid" => {
                let (d, code) = (device()?, number(2, "an XID code")?);
                arity(3)?;
                FaultCommand::Inject(d, Fault::Xid(code))
            }
            "ecc" => {
                let d = device()?;
                arity(2)?;
                FaultCommand::Inject(d, Fault::EccUncorrected)
            }
            "ecc-corrected" => {
                let (d, n) = (device()?, number(2, "a count of corrected errors")?);
                arity(3)?;
                FaultCommand::Inject(d, Fault::EccCorrected(n))
            }
            "lost" => {
                let d = device()?;
                arity(2)?;
                FaultCommand::Inject(d, Fault::Lost)
            }
            "thermal" | "power" => {
                let d = device()?;
                arity(2)?;
                let t = if words[0] == "thermal" {
                    Throttle::Thermal
                } else {
                    Throttle::Power
                };
                FaultCommand::Inject(d, Fault::Throttled(t))
            }
            "clear" => {
                let d = device()?;
                arity(2)?;
                FaultCommand::Clear(d)
            }
            other => {
                return Err(format!(
                    "unknown fault {other:?}: expected xid N CODE, ecc N, ecc-corrected N COUNT, \
                     lost N, thermal N, power N or clear N"
                ))
            }
        };
        Ok(Some(command))
    }
}

#[derive(Debug, Clone, Default)]
struct FakeState {
    utilization_pct: u8,
    memory_used_mib: u64,
    ecc_uncorrected: u64,
    ecc_corrected: u64,
    throttled: Option<Throttle>,
    healthy: bool,
    events: Vec<HealthEvent>,
}

/// A fault file and how far it has been read.
#[derive(Debug)]
struct FaultFile {
    path: PathBuf,
    /// Bytes consumed: every complete line before it has been applied.
    offset: u64,
    /// Lines consumed (to name a bad line by its number).
    lines: usize,
}

/// A [`DeviceBackend`] of declared devices.
#[derive(Debug)]
pub struct FakeBackend {
    devices: Vec<DeviceInfo>,
    state: Mutex<Vec<FakeState>>,
    faults: Option<Mutex<FaultFile>>,
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
            faults: None,
        })
    }

    /// Faults read at run time from `path`, at every telemetry call (so at every heartbeat), one
    /// per line, each applied once:
    ///
    /// ```text
    /// xid 3 79            # XID 79 on device 3 (fatal XIDs make it unhealthy)
    /// ecc 3               # one more uncorrected ECC error on device 3 (unhealthy)
    /// ecc-corrected 3 500 # 500 more corrected ECC errors (the agent may call it degraded)
    /// lost 3              # device 3 falls off the bus (unhealthy)
    /// thermal 3           # thermal throttling until cleared (`power 3`: power throttling)
    /// clear 3             # reset device 3: healthy, counters cleared
    /// ```
    ///
    /// Append lines (`echo "xid 3 79" >> PATH`): the file is read on from where the last call
    /// stopped, and only whole lines (ending in a newline) are taken. A file that shrank
    /// (truncated or replaced) is read from its start again. A missing file is no fault; a line
    /// that does not parse is logged and skipped.
    pub fn with_fault_file(mut self, path: &Path) -> Self {
        self.faults = Some(Mutex::new(FaultFile {
            path: path.to_owned(),
            offset: 0,
            lines: 0,
        }));
        self
    }

    /// Applies the complete lines added to the fault file since the last call.
    fn read_fault_file(&self) {
        let Some(faults) = &self.faults else { return };
        let mut guard = faults.lock().unwrap_or_else(|e| e.into_inner());
        let file = &mut *guard;
        let before = file.offset;
        let text = match read_from(&file.path, &mut file.offset) {
            Ok(text) => text,
            Err(e) => {
                tracing::warn!("fault file {}: {e}", file.path.display());
                return;
            }
        };
        if file.offset < before || (file.offset == text.len() as u64 && before != 0) {
            file.lines = 0;
        }
        let first = file.lines;
        file.lines += text.lines().count();
        for (i, line) in text.lines().enumerate() {
            match FaultCommand::parse(line) {
                Ok(None) => {}
                Ok(Some(command)) => {
                    tracing::info!(file = %file.path.display(), "injecting fault: {line}");
                    let applied = match command {
                        FaultCommand::Inject(d, fault) => self.inject_fault(d, fault),
                        FaultCommand::Clear(d) => self.reset(d),
                    };
                    if let Err(e) = applied {
                        tracing::warn!(file = %file.path.display(), "fault {line:?}: {e}");
                    }
                }
                Err(message) => tracing::warn!(
                    "{}",
                    FaultFileError {
                        path: file.path.clone(),
                        line: first + i + 1,
                        message,
                    }
                ),
            }
        }
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
                Fault::EccCorrected(n) => {
                    s.ecc_corrected = s.ecc_corrected.saturating_add(n);
                    return;
                }
                Fault::Throttled(t) => {
                    s.throttled = Some(t);
                    return;
                }
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
        self.read_fault_file();
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
                ecc_corrected: Some(s.ecc_corrected),
                throttled: s.throttled,
            })
            .collect())
    }
}

/// The complete lines of `path` after byte `offset`, moving `offset` past them. A file shorter
/// than `offset` was truncated or replaced: it is read from its start. A missing file has none.
fn read_from(path: &Path, offset: &mut u64) -> std::io::Result<String> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if len < *offset {
        *offset = 0;
    }
    if len == *offset {
        return Ok(String::new());
    }
    file.seek(SeekFrom::Start(*offset))?;
    let mut bytes = Vec::new();
    file.take(len - *offset).read_to_end(&mut bytes)?;
    let Some(end) = bytes.iter().rposition(|&b| b == b'\n') else {
        return Ok(String::new());
    };
    bytes.truncate(end + 1);
    *offset += bytes.len() as u64;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
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

        backend.inject_fault(0, Fault::EccCorrected(700)).unwrap();
        backend
            .inject_fault(0, Fault::Throttled(Throttle::Thermal))
            .unwrap();
        let t = backend.telemetry().unwrap();
        assert!(t[0].healthy && t[0].events.is_empty(), "{:?}", t[0]);
        assert_eq!(t[0].ecc_corrected, Some(700));
        assert_eq!(t[0].throttled, Some(Throttle::Thermal));
        backend.reset(0).unwrap();
        assert_eq!(backend.telemetry().unwrap()[0].throttled, None);

        let err = backend.set_utilization(2, 10).unwrap_err();
        assert_eq!(err.to_string(), "no device 2: this host has 2 device(s)");
        assert!(!err.is_retryable());
    }

    #[test]
    fn fault_lines_parse_or_say_what_was_expected() {
        let ok: &[(&str, Option<FaultCommand>)] = &[
            ("xid 3 79", Some(FaultCommand::Inject(3, Fault::Xid(79)))),
            (
                "  ecc 0  ",
                Some(FaultCommand::Inject(0, Fault::EccUncorrected)),
            ),
            (
                "ecc-corrected 2 500",
                Some(FaultCommand::Inject(2, Fault::EccCorrected(500))),
            ),
            ("lost 7", Some(FaultCommand::Inject(7, Fault::Lost))),
            (
                "thermal 1 # hot",
                Some(FaultCommand::Inject(1, Fault::Throttled(Throttle::Thermal))),
            ),
            (
                "power 1",
                Some(FaultCommand::Inject(1, Fault::Throttled(Throttle::Power))),
            ),
            ("clear 3", Some(FaultCommand::Clear(3))),
            ("", None),
            ("# a comment", None),
        ];
        for (line, want) in ok {
            assert_eq!(FaultCommand::parse(line).as_ref(), Ok(want), "{line:?}");
        }
        let bad: &[(&str, &str)] = &[
            ("xid 3", "expected an XID code after \"xid 3\""),
            ("xid x 79", "expected a device index (a number), got \"x\""),
            ("ecc 3 4", "unexpected \"4\" at the end of \"ecc 3 4\""),
            ("melt 3", "unknown fault \"melt\""),
            ("lost", "expected a device index after \"lost\""),
        ];
        for (line, want) in bad {
            let err = FaultCommand::parse(line).unwrap_err();
            assert!(err.starts_with(want), "{line:?}: {err}");
        }
    }

    #[test]
    fn a_fault_file_is_applied_line_by_line_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("faults");
        let backend = FakeBackend::parse("4xH100", "h")
            .unwrap()
            .with_fault_file(&path);
        // No file yet: no fault.
        assert!(backend.telemetry().unwrap().iter().all(|d| d.healthy));

        let append = |text: &str| {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap();
            f.write_all(text.as_bytes()).unwrap();
        };
        // A line without its newline waits for it; a bad line is skipped.
        append("bogus 1\nxid 3 79\nthermal 1");
        let t = backend.telemetry().unwrap();
        assert!(!t[3].healthy);
        assert_eq!(t[3].events, [HealthEvent::Xid { code: Some(79) }]);
        assert_eq!(t[1].throttled, None, "the partial line is not taken yet");
        append("\n");
        let t = backend.telemetry().unwrap();
        assert_eq!(t[1].throttled, Some(Throttle::Thermal));
        assert!(t[3].events.is_empty(), "each line applies once");

        append("clear 3\nlost 2\n");
        let t = backend.telemetry().unwrap();
        assert!(t[3].healthy);
        assert_eq!(t[2].events, [HealthEvent::Lost]);

        // Truncated and rewritten: read from the start again.
        std::fs::write(&path, "ecc 0\n").unwrap();
        let t = backend.telemetry().unwrap();
        assert_eq!(t[0].events, [HealthEvent::EccUncorrected { count: 1 }]);
        assert!(!t[0].healthy);
    }
}
