//! On-disk snapshot store: the latest snapshot of the state machine, one file.
//!
//! `data_dir/snapshots/current.snap` holds the bincode of (snapshot meta, snapshot bytes). It is
//! replaced atomically: written to a temporary file, fsynced, renamed over the old one, and the
//! directory fsynced. A crash at any point leaves either the old or the new snapshot, never a torn
//! one. Only the newest snapshot is kept: Raft never needs an older one (logs before it are purged
//! only after it exists).

use std::fs;
use std::fs::File;
use std::io;
use std::io::Write;
use std::path::PathBuf;

use serde::Deserialize;
use serde::Serialize;

use crate::codec;
use crate::types::SnapshotMeta;

const FILE: &str = "current.snap";
const TMP: &str = "current.snap.tmp";
const DAMAGED: &str = "current.snap.damaged";

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

/// The directory holding the current snapshot.
#[derive(Clone, Debug)]
pub(crate) struct SnapshotStore {
    dir: PathBuf,
}

impl SnapshotStore {
    pub(crate) fn open(dir: PathBuf) -> io::Result<Self> {
        fs::create_dir_all(&dir)?;
        Ok(SnapshotStore { dir })
    }

    /// Durably replace the current snapshot.
    pub(crate) fn save(&self, meta: &SnapshotMeta, data: &[u8]) -> io::Result<()> {
        let bytes = encode(meta, data)?;
        let tmp = self.dir.join(TMP);
        {
            // The replica's user only: a snapshot holds the whole state, secrets included.
            let mut f = private_file(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, self.dir.join(FILE))?;
        File::open(&self.dir)?.sync_all()?;
        Ok(())
    }

    /// Moves a damaged current snapshot aside (`current.snap.damaged`, replacing an older one)
    /// so a start does not trip over it again; returns where it went.
    pub(crate) fn set_aside(&self) -> io::Result<PathBuf> {
        let to = self.dir.join(DAMAGED);
        fs::rename(self.dir.join(FILE), &to)?;
        File::open(&self.dir)?.sync_all()?;
        Ok(to)
    }

    /// The current snapshot, if one was ever saved.
    pub(crate) fn load(&self) -> io::Result<Option<(SnapshotMeta, Vec<u8>)>> {
        let path = self.dir.join(FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        decode(&bytes).map(Some)
    }
}

/// A new file (replacing any, whose mode a crash may have left) that only this process's user
/// may read.
fn private_file(path: &std::path::Path) -> io::Result<File> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// The meta and bytes of a snapshot file's contents; corrupt bytes are `InvalidData`.
pub(crate) fn decode(bytes: &[u8]) -> io::Result<(SnapshotMeta, Vec<u8>)> {
    let s: StoredSnapshot = codec::decode(bytes)?;
    Ok((s.meta, s.data))
}

/// A snapshot file's contents (tests and fuzzing).
pub(crate) fn encode(meta: &SnapshotMeta, data: &[u8]) -> io::Result<Vec<u8>> {
    codec::encode(&StoredSnapshot {
        meta: meta.clone(),
        data: data.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::tests::some_bytes;
    use crate::codec::tests::written_as_before;

    #[test]
    fn a_snapshot_file_is_written_as_it_always_was() {
        for b in some_bytes() {
            let meta = SnapshotMeta::default();
            let stored = StoredSnapshot {
                meta: meta.clone(),
                data: b.clone(),
            };
            written_as_before(&stored, &(&meta, &b));
        }
    }
}
