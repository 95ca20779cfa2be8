//! The exit file: the shim's durable record of how the task ended.
//!
//! It is what lets an agent that restarted while the task ran (and so is not the shim's parent
//! and cannot wait for it) still learn the task's real exit status.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use super::lease::temp_sibling;
use super::ExitOutcome;

/// Writes the outcome atomically and durably: temporary file, fsync, rename, fsync of the
/// directory. The shim may be SIGKILLed right after, and the host may crash; a reader sees the
/// whole outcome or none.
pub(crate) fn write(path: &Path, outcome: &ExitOutcome) -> io::Result<()> {
    let json = serde_json::to_vec(outcome).map_err(io::Error::other)?;
    let tmp = temp_sibling(path, 0);
    let result = (|| {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(&json)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            // Best effort: some filesystems cannot fsync a directory.
            if let Ok(dir) = fs::File::open(dir) {
                let _ = dir.sync_all();
            }
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads the outcome: `Ok(None)` when there is no exit file, `Err` with a sentence when there is
/// one that cannot be read or parsed.
pub(crate) fn read(path: &Path) -> Result<Option<ExitOutcome>, String> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("exit file {} is corrupt: {e}", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("exit file {} unreadable: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::ExitReason;

    #[test]
    fn round_trips_in_the_documented_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exit.json");
        assert_eq!(read(&path), Ok(None));
        let outcome = ExitOutcome {
            code: None,
            signal: Some(15),
            reason: ExitReason::LeaseExpired,
            message: "fenced".into(),
        };
        write(&path, &outcome).unwrap();
        assert_eq!(read(&path), Ok(Some(outcome)));
        let raw: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(raw["reason"], "lease_expired");
        assert_eq!(raw["code"], serde_json::Value::Null);
        fs::write(&path, "{").unwrap();
        assert!(read(&path).unwrap_err().contains("corrupt"));
    }
}
