//! The lease file: one deadline, in milliseconds of `CLOCK_BOOTTIME`, that every shim watches.
//!
//! `CLOCK_BOOTTIME` because it neither jumps with wall-clock changes (NTP, an operator's `date`)
//! nor stops while the host is suspended, so "now" and "deadline" mean the same thing to the agent
//! that writes the file and to every shim that reads it.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Milliseconds since boot, including time suspended (`CLOCK_BOOTTIME`).
pub fn boottime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes to the timespec we own. CLOCK_BOOTTIME exists on every Linux
    // since 2.6.39; should it fail, ts stays zero, which only makes leases look longer-lived
    // than they are for a moment, never shorter.
    unsafe {
        libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts);
    }
    (ts.tv_sec as u64).saturating_mul(1000) + (ts.tv_nsec as u64) / 1_000_000
}

/// Replaces the deadline atomically (write a temporary file, rename), so a shim never reads a
/// half-written number. No fsync: the file only matters until the next reboot, and a reboot
/// ends every task anyway.
pub(crate) fn write_deadline(path: &Path, deadline_ms: u64) -> io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let tmp = temp_sibling(path, COUNTER.fetch_add(1, Ordering::Relaxed));
    let result = (|| {
        let mut file = fs::File::create(&tmp)?;
        writeln!(file, "{deadline_ms}")?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads the deadline back.
pub(crate) fn read_deadline(path: &Path) -> io::Result<u64> {
    let text = fs::read_to_string(path)?;
    text.trim().parse().map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("lease file does not hold a deadline ({e}): {text:?}"),
        )
    })
}

/// `dir/.name.tmp-<pid>-<n>`: in the same directory so the rename is atomic, unique per process
/// and call so concurrent writers never share one.
fn temp_sibling(path: &Path, n: u64) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boottime_advances() {
        let a = boottime_ms();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = boottime_ms();
        assert!(a > 0 && b >= a + 15, "{a} {b}");
    }

    #[test]
    fn deadline_round_trips_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lease");
        assert!(read_deadline(&path).is_err());
        write_deadline(&path, 12345).unwrap();
        write_deadline(&path, 67890).unwrap();
        assert_eq!(read_deadline(&path).unwrap(), 67890);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp files left"
        );
        fs::write(&path, "soon").unwrap();
        assert!(read_deadline(&path).is_err());
    }
}
