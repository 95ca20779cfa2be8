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

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
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
        let bytes = codec::encode(&StoredSnapshot {
            meta: meta.clone(),
            data: data.to_vec(),
        })?;
        let tmp = self.dir.join(TMP);
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, self.dir.join(FILE))?;
        File::open(&self.dir)?.sync_all()?;
        Ok(())
    }

    /// The current snapshot, if one was ever saved.
    pub(crate) fn load(&self) -> io::Result<Option<(SnapshotMeta, Vec<u8>)>> {
        let path = self.dir.join(FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let s: StoredSnapshot = codec::decode(&bytes)?;
        Ok(Some((s.meta, s.data)))
    }
}
