//! The exit file: the shim's record of how the task ended.
//!
//! It is what lets an agent that restarted while the task ran (and so is not the shim's parent
//! and cannot wait for it) still learn the task's real exit status.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::ExitOutcome;

/// Writes the outcome in place: no temporary file, no rename, and no fsync. Nobody reads the
/// file while it is written: the agent reads it only once the shim has exited.
///
/// What it is for is an agent that restarts while the host stays up, and the page cache serves
/// that. A host crash takes the task with it; an end that no replica had acknowledged is lost
/// either way in the milliseconds before a flush, and a host back after the node's TTL finds
/// the gang re-queued and its old epoch refused. So the end is not made durable here, one
/// `fdatasync` per task (a fifth of a 1,000-task array's time on a 2-core host): the agent
/// saves its state, ends included, while its reports cannot be delivered. A shim killed
/// mid-write leaves an empty or cut file; a cut JSON object never parses, so a reader sees the
/// whole outcome or [`read`]'s error, and treats that as it treats no file (the end is lost:
/// the task is reported lost and re-queued from its checkpoint).
pub(crate) fn write(path: &Path, outcome: &ExitOutcome) -> io::Result<()> {
    let json = serde_json::to_vec(outcome).map_err(io::Error::other)?;
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(&json)
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
        assert_eq!(read(&path), Ok(Some(outcome.clone())));
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the agent's alone");
        let raw: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(raw["reason"], "lease_expired");
        assert_eq!(raw["code"], serde_json::Value::Null);
        fs::write(&path, "{").unwrap();
        assert!(read(&path).unwrap_err().contains("corrupt"));
        // A longer file from before is replaced whole, not overwritten at its head.
        fs::write(&path, vec![b' '; 4096]).unwrap();
        write(&path, &outcome).unwrap();
        assert_eq!(read(&path), Ok(Some(outcome.clone())));
    }

    #[test]
    fn a_write_cut_anywhere_never_reads_as_an_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exit.json");
        let outcome = ExitOutcome {
            code: Some(0),
            signal: None,
            reason: ExitReason::Exited,
            message: "`true` exited with code 0".into(),
        };
        write(&path, &outcome).unwrap();
        let whole = fs::read(&path).unwrap();
        for cut in 0..whole.len() {
            fs::write(&path, &whole[..cut]).unwrap();
            assert!(
                read(&path).is_err(),
                "a write cut at {cut} bytes read as an outcome"
            );
        }
    }
}
