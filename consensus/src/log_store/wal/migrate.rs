//! From the RocksDB raft log of earlier releases to segment files, once, at start-up.
//!
//! The old layout, `data_dir/raft-log`: one RocksDB, column family `logs` (big-endian u64 index ->
//! bincode entry), column family `meta` (`vote`, `committed`, `last_purged`, bincode). Its vote,
//! committed index, purge point and every entry are written as one segment in
//! `raft-wal.migrating`, fsynced, renamed to `raft-wal` (the directory fsynced), and only then is
//! the old directory removed. A crash at any point leaves either the old log alone (migrated again
//! at the next start) or the new one whole (the old one is then removed).

use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use openraft::entry::RaftEntry;
use rocksdb::ColumnFamilyDescriptor;
use rocksdb::IteratorMode;
use rocksdb::Options;
use rocksdb::DB;

use super::index::State;
use super::record;
use super::record::Record;
use super::record::Start;
use super::segment;
use super::writer::segment_size;
use super::SEGMENT_BYTES;
use crate::codec;
use crate::types::Entry;
use crate::types::LogId;
use crate::types::Vote;

/// The old log's directory under `data_dir`.
pub const LEGACY_DIR: &str = "raft-log";
/// The log's directory under `data_dir`.
pub const DIR: &str = "raft-wal";

/// Migrates `data_dir/raft-log` to `data_dir/raft-wal` if there is an old log; a no-op otherwise.
/// Returns how many entries it moved.
pub fn from_rocksdb(data_dir: &Path) -> io::Result<Option<usize>> {
    let old = data_dir.join(LEGACY_DIR);
    let new = data_dir.join(DIR);
    if !old.join("CURRENT").exists() {
        return Ok(None);
    }
    if new.exists() {
        tracing::warn!(dir = %old.display(), "removing the old RocksDB raft log, migrated before");
        std::fs::remove_dir_all(&old)?;
        return segment::sync_dir(data_dir).map(|()| None);
    }
    let (start, entries) = read_legacy(&old)?;
    let tmp = data_dir.join("raft-wal.migrating");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    write_segment(&tmp, start, &entries)?;
    std::fs::rename(&tmp, &new)?;
    segment::sync_dir(data_dir)?;
    std::fs::remove_dir_all(&old)?;
    segment::sync_dir(data_dir)?;
    tracing::info!(entries = entries.len(), dir = %new.display(), "migrated the raft log from RocksDB to segment files");
    Ok(Some(entries.len()))
}

/// The old log's state and entries, in index order.
fn read_legacy(dir: &Path) -> io::Result<(Start, Vec<Entry>)> {
    let cfs = ["logs", "meta"].map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
    let db = DB::open_cf_descriptors(&Options::default(), dir, cfs).map_err(io::Error::other)?;
    let cf = |name| {
        db.cf_handle(name)
            .ok_or_else(|| io::Error::other(format!("old raft log has no column family {name}")))
    };
    let meta = |key: &str| -> io::Result<Option<Vec<u8>>> {
        db.get_cf(cf("meta")?, key).map_err(io::Error::other)
    };
    let vote: Option<Vote> = meta("vote")?.map(|b| codec::decode(&b)).transpose()?;
    let committed: Option<LogId> = meta("committed")?
        .map(|b| codec::decode::<Option<LogId>>(&b))
        .transpose()?
        .flatten();
    let last_purged: Option<LogId> = meta("last_purged")?
        .map(|b| codec::decode(&b))
        .transpose()?;
    let mut entries = Vec::new();
    for item in db.iterator_cf(cf("logs")?, IteratorMode::Start) {
        let (key, value) = item.map_err(io::Error::other)?;
        let entry: Entry = codec::decode(&value)?;
        if key.as_ref() != entry.index().to_be_bytes() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("old raft log: key {key:?} holds entry {}", entry.index()),
            ));
        }
        entries.push(entry);
    }
    let state = State {
        vote,
        committed,
        last_purged,
    };
    let start = Start { seq: 1, state };
    Ok((start, entries))
}

/// Writes segment 1 in `dir`: the start record, then every entry; fsynced.
fn write_segment(dir: &Path, start: Start, entries: &[Entry]) -> io::Result<()> {
    let mut buf = Vec::new();
    record::encode_into(&Record::<&Entry>::Start(start), &mut buf)?;
    for e in entries {
        record::encode_into(&Record::Entry(e), &mut buf)?;
    }
    let path = dir.join(segment::name(1));
    segment::create_zeroed(&path, segment_size(SEGMENT_BYTES, buf.len()))?;
    let file = segment::open(&path)?;
    file.write_all_at(&buf, 0)?;
    file.sync_data()
}
