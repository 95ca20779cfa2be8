//! The checkpoint protocol on the host: signal the task, then wait (with a deadline) for the
//! manifest it writes into `GANGWAY_CHECKPOINT_DIR`.
//!
//! Every rank gets the signal; rank 0's agent waits for the manifest and reports it, because the
//! manifest describes the whole gang's checkpoint (one directory on the shared storage per job).

use crate::driver::TaskHandle;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The file a task writes, atomically, when a checkpoint is complete.
pub const MANIFEST_FILE: &str = "manifest.json";

/// What a task says about the checkpoint it wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Where the checkpoint is; what a restored task gets as `GANGWAY_RESTORE_FROM`.
    pub path: String,
    /// Training step (or any progress counter that only grows).
    pub step: u64,
    #[serde(default)]
    pub bytes: u64,
}

/// The manifest in `dir`, if there is a readable one.
pub fn read_manifest(dir: &Path) -> Option<Manifest> {
    let bytes = std::fs::read(dir.join(MANIFEST_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Sends the checkpoint signal; with `wait`, waits for a manifest that differs from the one there
/// before the signal. `Ok(None)`: signalled, not waited for.
pub async fn take_checkpoint(
    handle: &TaskHandle,
    signal: &str,
    dir: PathBuf,
    timeout: Duration,
    wait: bool,
) -> Result<Option<Manifest>, String> {
    if signal.is_empty() {
        return Err("the job's spec names no checkpoint signal".to_owned());
    }
    let before = read_manifest(&dir);
    handle
        .signal(signal)
        .map_err(|e| format!("could not signal the task: {e}"))?;
    if !wait {
        return Ok(None);
    }
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(m) = read_manifest(&dir) {
            if Some(&m) != before.as_ref() && before.as_ref().is_none_or(|b| m.step >= b.step) {
                return Ok(Some(m));
            }
        }
        if !handle.is_running() {
            return Err("the task ended before it wrote its checkpoint manifest".to_owned());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "no new {} in {} within {}",
                MANIFEST_FILE,
                dir.display(),
                humantime::format_duration(timeout)
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
