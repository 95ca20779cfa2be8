//! The RocksDB Raft log store.
//!
//! Layout in `data_dir/raft-log` (one RocksDB): column family `logs` maps the big-endian u64 index to
//! the bincode-encoded entry (big-endian so that RocksDB's byte order is log order); column family
//! `meta` holds `vote`, `committed` and `last_purged` (bincode).
//!
//! Durability: an append is written to the memtable and RocksDB's WAL buffer in one `WriteBatch`
//! (so a batch of entries that openraft hands us in one call costs one write, and no system call:
//! `manual_wal_flush`), then a single flusher thread runs `flush_wal(sync = true)`, which writes the
//! buffer and fsyncs it, and only then tells openraft the entries are persisted. Appends that
//! queue up while an fsync is in flight are acknowledged by the next single fsync (group commit),
//! which is what gives throughput under concurrency. Votes are fsynced before `save_vote` returns.
//! Any write or fsync failure is returned to openraft (which stops the Raft core) and recorded in
//! [`StorageHealth`], so the replica never acknowledges what it did not persist.

use std::fmt::Debug;
use std::io;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;

use openraft::entry::RaftEntry;
use openraft::storage::IOFlushed;
use openraft::storage::RaftLogStorage;
use openraft::LogState;
use openraft::OptionalSend;
use openraft::RaftLogReader;
use rocksdb::ColumnFamilyDescriptor;
use rocksdb::Direction;
use rocksdb::IteratorMode;
use rocksdb::Options;
use rocksdb::WriteBatch;
use rocksdb::WriteOptions;
use rocksdb::DB;

use super::StorageHealth;
use crate::codec;
use crate::types::Entry;
use crate::types::LogId;
use crate::types::TypeConfig;
use crate::types::Vote;

const CF_LOGS: &str = "logs";
const CF_META: &str = "meta";
const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";

/// Raft log on RocksDB. Cheap to clone (openraft uses clones as log readers).
#[derive(Clone)]
pub struct RocksLogStore {
    db: Arc<DB>,
    flusher: Arc<Flusher>,
    health: StorageHealth,
}

/// The fsync thread and the channel to it, shared by every clone of the store. When the last clone
/// goes, dropping this closes the channel and joins the thread, so the thread's handle on the DB is
/// released before the store's drop returns: RocksDB is closed deterministically, never concurrently
/// with process exit (where its background threads would find their mutexes already destroyed).
struct Flusher {
    tx: Option<mpsc::Sender<IOFlushed<TypeConfig>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Flusher {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl RocksLogStore {
    /// Open (or create) the log under `dir`.
    pub fn open(dir: &Path, health: StorageHealth) -> Result<Self, io::Error> {
        std::fs::create_dir_all(dir)?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        // Writes fill RocksDB's WAL buffer without a write(2) each; the flusher's one
        // `flush_wal(true)` writes and fsyncs what queued up, and a synced write (a vote) flushes
        // the buffer before its fsync. Nothing is acknowledged before it is on disk either way.
        opts.set_manual_wal_flush(true);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_LOGS, Options::default()),
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(io::Error::other)?;
        let db = Arc::new(db);

        let (tx, rx) = mpsc::channel::<IOFlushed<TypeConfig>>();
        let flush_db = db.clone();
        let flush_health = health.clone();
        let thread = std::thread::Builder::new()
            .name("raft-log-fsync".into())
            .spawn(move || flusher_loop(flush_db, rx, flush_health))?;

        Ok(RocksLogStore {
            db,
            flusher: Arc::new(Flusher {
                tx: Some(tx),
                thread: Some(thread),
            }),
            health,
        })
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, io::Error> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| io::Error::other(format!("column family {name} missing")))
    }

    /// Record a failure in the health flag and pass it on.
    fn check<T, E: std::fmt::Display>(&self, what: &str, r: Result<T, E>) -> Result<T, io::Error> {
        r.map_err(|e| {
            let msg = format!("raft log {what}: {e}");
            self.health.fail(&msg);
            io::Error::other(msg)
        })
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, io::Error> {
        let cf = self.cf(CF_META)?;
        let got = self.check("read meta", self.db.get_cf(cf, key))?;
        got.map(|b| codec::decode(&b)).transpose()
    }

    /// Writes RocksDB's WAL buffer to the file without an fsync: what was written so far then
    /// survives the process (not a power cut), as a write without `manual_wal_flush` would.
    fn write_out(&self, what: &str) -> Result<(), io::Error> {
        self.check(what, self.db.flush_wal(false))
    }

    fn put_meta<T: serde::Serialize>(
        &self,
        key: &[u8],
        v: &T,
        sync: bool,
    ) -> Result<(), io::Error> {
        let cf = self.cf(CF_META)?;
        let bytes = codec::encode(v)?;
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.check("write meta", self.db.put_cf_opt(cf, key, bytes, &wo))
    }
}

/// Group commit: wait for one pending append, take every other pending one, fsync the WAL once,
/// then acknowledge them all (in order). Exits when every store clone is dropped.
fn flusher_loop(db: Arc<DB>, rx: mpsc::Receiver<IOFlushed<TypeConfig>>, health: StorageHealth) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let res = db.flush_wal(true);
        match res {
            Ok(()) => {
                for cb in batch {
                    cb.io_completed(Ok(()));
                }
            }
            Err(e) => {
                let msg = format!("raft log fsync failed: {e}");
                health.fail(&msg);
                for cb in batch {
                    cb.io_completed(Err(io::Error::other(msg.clone())));
                }
            }
        }
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn key_index(key: &[u8]) -> Result<u64, io::Error> {
    let arr: [u8; 8] = key
        .try_into()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad log key length"))?;
    Ok(u64::from_be_bytes(arr))
}

impl RaftLogReader<TypeConfig> for RocksLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let cf = self.cf(CF_LOGS)?;
        let start_key = index_key(start);
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(cf, IteratorMode::From(&start_key, Direction::Forward))
        {
            let (k, v) = self.check("read entries", item)?;
            let idx = key_index(&k)?;
            if !range.contains(&idx) {
                break;
            }
            let entry: Entry = codec::decode(&v)?;
            out.push(entry);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.get_meta(KEY_VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for RocksLogStore {
    type LogReader = RocksLogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let cf = self.cf(CF_LOGS)?;
        let last = match self.db.iterator_cf(cf, IteratorMode::End).next() {
            None => None,
            Some(item) => {
                let (_, v) = self.check("read last entry", item)?;
                let e: Entry = codec::decode(&v)?;
                Some(e.log_id())
            }
        };
        let last_purged: Option<LogId> = self.get_meta(KEY_LAST_PURGED)?;
        Ok(LogState {
            last_log_id: last.or(last_purged),
            last_purged_log_id: last_purged,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        // Synced: a replica must never vote twice in one term, even across a crash.
        self.put_meta(KEY_VOTE, vote, true)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Not synced: losing it to a power cut only means re-applying from the snapshot up to a
        // smaller index, which openraft handles; it is made durable by the next synced append.
        // Handed to the OS, though, so that it survives the process being killed.
        self.put_meta(KEY_COMMITTED, &committed, false)?;
        self.write_out("write committed")
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.get_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.health.check().map_err(io::Error::other)?;
        let cf = self.cf(CF_LOGS)?;
        let mut batch = WriteBatch::default();
        for entry in entries {
            batch.put_cf(cf, index_key(entry.index()), codec::encode(&entry)?);
        }
        // Written (readable) now, durable once the flusher's fsync covers it.
        self.check("append", self.db.write(batch))?;
        let sent = self.flusher.tx.as_ref().map(|tx| tx.send(callback));
        if !matches!(sent, Some(Ok(()))) {
            let msg = "raft log fsync thread is gone";
            self.health.fail(msg);
            return Err(io::Error::other(msg));
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index() + 1).unwrap_or(0);
        let cf = self.cf(CF_LOGS)?;
        self.check(
            "truncate",
            self.db
                .delete_range_cf(cf, index_key(from), index_key(u64::MAX)),
        )?;
        // u64::MAX itself is excluded by delete_range; it can never be a real index.
        self.write_out("truncate")
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        // Record the purge point first: if we crash in between, the surviving entries are simply
        // ignored below `last_purged` (never the other way round, which would lose the log id).
        self.put_meta(KEY_LAST_PURGED, &log_id, true)?;
        let cf = self.cf(CF_LOGS)?;
        self.check(
            "purge",
            self.db
                .delete_range_cf(cf, index_key(0), index_key(log_id.index() + 1)),
        )
    }
}
