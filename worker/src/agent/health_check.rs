//! The operator's health check (`--health-check-cmd "CMD"`): run before the host first registers
//! and every `--health-check-interval` after, its result reported with `ReportHealthCheck`.
//!
//! The command runs under `sh -c`. Exit status 0 passes (unless it names failing devices); any
//! other status fails. Each stdout line `fail <uuid-or-index>` names a failing device; a failed
//! check that names none fails every device of the host. The scheduler fences failing devices and
//! returns devices fenced for their health after enough passes in a row.
//!
//! A check that cannot run at all (exit 126 or 127: the shell could not find or execute the
//! command) is a configuration error, logged and not reported: a typo in the flag must not fence
//! every device of the fleet.

use crate::devices::DeviceInfo;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// The end of the output kept as the report's detail, in bytes.
const DETAIL_BYTES: usize = 1024;

/// How the health check runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheckConfig {
    /// Shell command line.
    pub command: String,
    /// Between the end of one run and the start of the next.
    pub interval: Duration,
    /// A run that takes longer is killed and counts as failed.
    pub timeout: Duration,
}

/// One run's result, as reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckOutcome {
    pub passed: bool,
    /// Uuids of the devices the check named failing.
    pub failed_devices: Vec<String>,
    /// The end of its output, and how it ended.
    pub detail: String,
}

/// Runs the check once. `None` when it could not run at all (logged).
pub async fn run_check(cfg: &HealthCheckConfig, inventory: &[DeviceInfo]) -> Option<CheckOutcome> {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&cfg.command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(command = %cfg.command, "health check cannot start: {e}");
            return None;
        }
    };
    let (mut out, mut err) = (child.stdout.take()?, child.stderr.take()?);
    let run = async {
        let (mut o, mut e) = (Vec::new(), Vec::new());
        let (_, _, status) = tokio::join!(
            out.read_to_end(&mut o),
            err.read_to_end(&mut e),
            child.wait()
        );
        (o, e, status)
    };
    let (stdout, stderr, status) = match tokio::time::timeout(cfg.timeout, run).await {
        Ok(r) => r,
        Err(_) => {
            return Some(CheckOutcome {
                passed: false,
                failed_devices: Vec::new(),
                detail: format!("timed out after {:?}", cfg.timeout),
            })
        }
    };
    let code = match status {
        Ok(s) => s.code(),
        Err(e) => {
            tracing::error!(command = %cfg.command, "health check: {e}");
            return None;
        }
    };
    if matches!(code, Some(126 | 127)) {
        tracing::error!(
            command = %cfg.command,
            "health check could not run (exit {code:?}): {}; not reported",
            String::from_utf8_lossy(&stderr).trim()
        );
        return None;
    }
    Some(outcome(code, &stdout, &stderr, inventory))
}

/// What a finished run says: `code` is its exit status (`None`: killed by a signal).
pub fn outcome(
    code: Option<i32>,
    stdout: &[u8],
    stderr: &[u8],
    inventory: &[DeviceInfo],
) -> CheckOutcome {
    let text = String::from_utf8_lossy(stdout);
    let mut failed_devices: Vec<String> = Vec::new();
    let mut unknown = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("fail") {
            continue;
        }
        let Some(name) = words.next() else { continue };
        let device = inventory
            .iter()
            .find(|d| d.uuid == name || d.index.to_string() == name);
        match device {
            Some(d) if !failed_devices.contains(&d.uuid) => failed_devices.push(d.uuid.clone()),
            Some(_) => {}
            None => unknown.push(name.to_owned()),
        }
    }
    let passed = code == Some(0) && failed_devices.is_empty();
    let mut detail = match code {
        Some(c) => format!("exit {c}"),
        None => "killed by a signal".to_owned(),
    };
    if !unknown.is_empty() {
        detail.push_str(&format!("; names unknown devices {}", unknown.join(", ")));
    }
    let mut output = String::from_utf8_lossy(stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(stderr));
    let output = output.trim();
    if !output.is_empty() {
        let mut start = output.len().saturating_sub(DETAIL_BYTES);
        while !output.is_char_boundary(start) {
            start += 1;
        }
        detail.push_str(": ");
        detail.push_str(&output[start..]);
    }
    CheckOutcome {
        passed,
        failed_devices,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::{DeviceBackend, FakeBackend};

    fn inventory() -> Vec<DeviceInfo> {
        FakeBackend::parse("4xH100", "h")
            .unwrap()
            .inventory()
            .unwrap()
    }

    #[test]
    fn the_output_names_failing_devices_by_uuid_or_index() {
        let inv = inventory();
        let o = outcome(Some(0), b"all good\n", b"", &inv);
        assert!(o.passed && o.failed_devices.is_empty());
        assert_eq!(o.detail, "exit 0: all good");

        let o = outcome(
            Some(1),
            b"fail 2\nfail GPU-h-3\nfail 2\nfail GPU-zz\nnote\n",
            b"dcgm: 2 errors",
            &inv,
        );
        assert!(!o.passed);
        assert_eq!(o.failed_devices, ["GPU-h-2", "GPU-h-3"]);
        assert!(
            o.detail
                .starts_with("exit 1; names unknown devices GPU-zz: fail 2"),
            "{}",
            o.detail
        );
        assert!(o.detail.ends_with("dcgm: 2 errors"), "{}", o.detail);

        // Exit 0 naming a device still fails that device.
        let o = outcome(Some(0), b"fail 0\n", b"", &inv);
        assert!(!o.passed);
        assert_eq!(o.failed_devices, ["GPU-h-0"]);

        // A failure naming no device: every device fails it (the scheduler's rule).
        let o = outcome(None, b"", b"", &inv);
        assert!(!o.passed && o.failed_devices.is_empty());
        assert_eq!(o.detail, "killed by a signal");

        let long = "x".repeat(5000);
        let o = outcome(Some(0), long.as_bytes(), b"", &inv);
        assert!(o.detail.len() <= DETAIL_BYTES + 16, "{}", o.detail.len());
    }

    #[tokio::test]
    async fn a_check_runs_under_the_shell_with_a_deadline() {
        let inv = inventory();
        let cfg = |command: &str| HealthCheckConfig {
            command: command.to_owned(),
            interval: Duration::from_secs(60),
            timeout: Duration::from_secs(5),
        };
        let o = run_check(&cfg("echo fail 1; exit 3"), &inv).await.unwrap();
        assert!(!o.passed);
        assert_eq!(o.failed_devices, ["GPU-h-1"]);
        assert!(run_check(&cfg("true"), &inv).await.unwrap().passed);
        // A command that is not there is not a failing host.
        assert_eq!(
            run_check(&cfg("no-such-health-check-xyz"), &inv).await,
            None
        );
        let slow = HealthCheckConfig {
            timeout: Duration::from_millis(200),
            ..cfg("sleep 5")
        };
        let o = run_check(&slow, &inv).await.unwrap();
        assert!(!o.passed);
        assert!(o.detail.starts_with("timed out"), "{}", o.detail);
    }
}
