//! The RocksDB Raft log store.
//!
//! Layout in `data_dir/raft-log` (one RocksDB): column family `logs` maps the big-endian u64 index to
//! the bincode-encoded entry (big-endian so that RocksDB's byte order is log order); column family
//! `meta` holds `vote`, `committed` and `last_purged` (bincode).
//!
//! Durability: an append puts its entries in the log's tail in memory ([`Tail`], where readers find
//! them at once) and hands them to a single fsync thread, which takes every append (and
//! truncation, and purge) queued meanwhile, in order, writes them to RocksDB in one `WriteBatch`,
//! runs `flush_wal(sync = true)` (write and fsync RocksDB's WAL buffer: `manual_wal_flush`), and
//! only then tells openraft the entries are persisted (group commit: one write and one fsync for
//! whatever queued up while the last one was under way). The raft core itself does no RocksDB
//! write and no system call per append. A truncation or a purge goes through the same thread, so
//! it lands after the appends before it, and returns once it is on disk. Votes are fsynced before
//! `save_vote` returns. Any write or fsync failure is returned to openraft (which stops the Raft
//! core) and recorded in [`StorageHealth`], so the replica never acknowledges what it did not
//! persist.

use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::sync::Mutex;

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

use super::tail::first_index;
use super::tail::Keep;
use super::tail::Tail;
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

/// How much of the written log the tail keeps in memory for readers (replication reads what was
/// just appended; a follower further behind is served from RocksDB).
const TAIL_KEEP: Keep = Keep {
    entries: 1024,
    bytes: 8 << 20,
};

/// Raft log on RocksDB. Cheap to clone (openraft uses clones as log readers).
#[derive(Clone)]
pub struct RocksLogStore {
    db: Arc<DB>,
    tail: Arc<Mutex<Tail>>,
    flusher: Arc<Flusher>,
    health: StorageHealth,
}

/// What the fsync thread does, in the order the raft core asked for it.
enum Op {
    /// Write these entries; call back once they are on disk.
    Append {
        entries: Vec<Entry>,
        callback: IOFlushed<TypeConfig>,
    },
    /// Delete every entry from index `from` on.
    Truncate { from: u64, done: Done },
    /// Record `upto` as the last purged entry and delete every entry up to it.
    Purge { upto: LogId, done: Done },
}

/// What a store says once its fsync thread stopped.
const FSYNC_THREAD_GONE: &str = "raft log fsync thread is gone";

/// Where a truncation or a purge learns that it is on disk.
type Done = tokio::sync::oneshot::Sender<Result<(), String>>;

/// The fsync thread and the channel to it, shared by every clone of the store. When the last clone
/// goes, dropping this closes the channel and joins the thread, so the thread's handle on the DB is
/// released before the store's drop returns: RocksDB is closed deterministically, never concurrently
/// with process exit (where its background threads would find their mutexes already destroyed).
struct Flusher {
    tx: Option<mpsc::Sender<Op>>,
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

        let (tx, rx) = mpsc::channel::<Op>();
        let tail = Arc::new(Mutex::new(Tail::new(TAIL_KEEP)));
        let flush = Group {
            db: db.clone(),
            tail: tail.clone(),
            health: health.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("raft-log-fsync".into())
            .spawn(move || flush.run(rx))?;

        Ok(RocksLogStore {
            db,
            tail,
            flusher: Arc::new(Flusher {
                tx: Some(tx),
                thread: Some(thread),
            }),
            health,
        })
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, io::Error> {
        column(&self.db, name)
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

    fn tail(&self) -> std::sync::MutexGuard<'_, Tail> {
        lock(&self.tail)
    }

    /// Queues `op` for the fsync thread.
    fn send(&self, op: Op) -> Result<(), io::Error> {
        let sent = self.flusher.tx.as_ref().map(|tx| tx.send(op));
        if !matches!(sent, Some(Ok(()))) {
            self.health.fail(FSYNC_THREAD_GONE);
            return Err(io::Error::other(FSYNC_THREAD_GONE));
        }
        Ok(())
    }

    /// Queues a truncation or a purge and waits until it is on disk.
    async fn send_and_wait(&self, op: impl FnOnce(Done) -> Op) -> Result<(), io::Error> {
        let (done, on_disk) = tokio::sync::oneshot::channel();
        self.send(op(done))?;
        match on_disk.await {
            Ok(res) => res.map_err(io::Error::other),
            Err(_) => Err(io::Error::other(FSYNC_THREAD_GONE)),
        }
    }

    /// The entries with indexes in `range` below `below` (those the tail does not hold), from
    /// RocksDB.
    fn read_written(
        &self,
        range: &impl RangeBounds<u64>,
        below: u64,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = first_index(range);
        let mut out = Vec::new();
        if start >= below {
            return Ok(out);
        }
        let cf = self.cf(CF_LOGS)?;
        let start_key = index_key(start);
        for item in self
            .db
            .iterator_cf(cf, IteratorMode::From(&start_key, Direction::Forward))
        {
            let (k, v) = self.check("read entries", item)?;
            let idx = key_index(&k)?;
            if idx >= below || !range.contains(&idx) {
                break;
            }
            out.push(codec::decode(&v)?);
        }
        Ok(out)
    }

    /// The log id of the last entry in RocksDB.
    fn last_written(&self) -> Result<Option<LogId>, io::Error> {
        let cf = self.cf(CF_LOGS)?;
        match self.db.iterator_cf(cf, IteratorMode::End).next() {
            None => Ok(None),
            Some(item) => {
                let (_, v) = self.check("read last entry", item)?;
                let e: Entry = codec::decode(&v)?;
                Ok(Some(e.log_id()))
            }
        }
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

/// The fsync thread's side: group commit over the queued [`Op`]s.
struct Group {
    db: Arc<DB>,
    tail: Arc<Mutex<Tail>>,
    health: StorageHealth,
}

impl Group {
    /// Waits for one op, takes every other queued one, writes them all in one batch and fsyncs
    /// once, then answers them (in order). Exits when every store clone is dropped.
    fn run(self, rx: mpsc::Receiver<Op>) {
        while let Ok(first) = rx.recv() {
            let mut ops = vec![first];
            ops.extend(rx.try_iter());
            match self.write(&ops) {
                Ok(written) => {
                    lock(&self.tail).written(written);
                    answer(ops, Ok(()));
                }
                Err(e) => {
                    let msg = format!("raft log write or fsync failed: {e}");
                    self.health.fail(&msg);
                    answer(ops, Err(msg));
                }
            }
        }
    }

    /// One `WriteBatch` with every op in order, then the WAL written and fsynced. Returns each
    /// entry written with its encoded size.
    fn write(&self, ops: &[Op]) -> Result<Vec<(LogId, usize)>, io::Error> {
        let (logs, meta) = (column(&self.db, CF_LOGS)?, column(&self.db, CF_META)?);
        let mut batch = WriteBatch::default();
        let mut written = Vec::new();
        for op in ops {
            match op {
                Op::Append { entries, .. } => {
                    for e in entries {
                        let bytes = codec::encode(e)?;
                        written.push((e.log_id(), bytes.len()));
                        batch.put_cf(logs, index_key(e.index()), bytes);
                    }
                }
                // u64::MAX itself is excluded by delete_range; it can never be a real index.
                Op::Truncate { from, .. } => {
                    batch.delete_range_cf(logs, index_key(*from), index_key(u64::MAX))
                }
                // In one batch with the deletion: the purge point is never lost while entries
                // below it are gone.
                Op::Purge { upto, .. } => {
                    batch.put_cf(meta, KEY_LAST_PURGED, codec::encode(upto)?);
                    batch.delete_range_cf(logs, index_key(0), index_key(upto.index() + 1));
                }
            }
        }
        self.db.write(batch).map_err(io::Error::other)?;
        self.db.flush_wal(true).map_err(io::Error::other)?;
        Ok(written)
    }
}

/// A column family of the log's RocksDB.
fn column<'a>(db: &'a DB, name: &str) -> Result<&'a rocksdb::ColumnFamily, io::Error> {
    db.cf_handle(name)
        .ok_or_else(|| io::Error::other(format!("column family {name} missing")))
}

/// The tail, even if a thread panicked holding it (its state is whole between calls).
fn lock(tail: &Mutex<Tail>) -> std::sync::MutexGuard<'_, Tail> {
    tail.lock().unwrap_or_else(|p| p.into_inner())
}

/// Tells each op's waiter how its group went.
fn answer(ops: Vec<Op>, res: Result<(), String>) {
    for op in ops {
        match op {
            Op::Append { callback, .. } => {
                callback.io_completed(res.clone().map_err(io::Error::other));
            }
            Op::Truncate { done, .. } | Op::Purge { done, .. } => {
                let _ = done.send(res.clone());
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
        // The tail first: whatever it does not hold was written before it let it go.
        let (held, below) = self.tail().read(&range);
        let mut out = self.read_written(&range, below)?;
        out.extend(held);
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.get_meta(KEY_VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for RocksLogStore {
    type LogReader = RocksLogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        // The tail holds the last entry appended, if any was since the store opened.
        let in_tail = self.tail().last();
        let last = match in_tail {
            Some(last) => Some(last),
            None => self.last_written()?,
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
        let entries: Vec<Entry> = entries.into_iter().collect();
        {
            // Readable now, durable once the fsync thread's group covers it.
            let mut tail = self.tail();
            for e in &entries {
                tail.push(e.clone());
            }
        }
        self.send(Op::Append { entries, callback })
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index() + 1).unwrap_or(0);
        self.tail().truncate_from(from);
        self.send_and_wait(|done| Op::Truncate { from, done }).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        self.tail().purge_upto(log_id.index());
        self.send_and_wait(|done| Op::Purge { upto: log_id, done })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log_store::tail::tests::indexes as ids;
    use crate::types::LogCommand;
    use openraft::impls::leader_id_adv::LeaderId;
    use openraft::storage::RaftLogStorageExt;
    use openraft::type_config::TypeConfigExt;

    fn entry(term: u64, index: u64) -> Entry {
        let command = LogCommand {
            stamped_ms: index,
            command: vec![term as u8; 32],
        };
        Entry::new_normal(LogId::new(LeaderId { term, node_id: 1 }, index), command)
    }

    fn open(dir: &Path) -> RocksLogStore {
        RocksLogStore::open(dir, StorageHealth::default()).expect("open the log")
    }

    #[tokio::test]
    async fn what_was_acknowledged_is_there_after_a_restart_in_the_order_it_was_asked() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path());
        // Far more entries than the tail keeps: reads of the old ones come from RocksDB.
        let n = TAIL_KEEP.entries as u64 * 3;
        log.blocking_append((1..=n - 10).map(|i| entry(1, i)))
            .await
            .unwrap();
        let (tx, flushed) = TypeConfig::oneshot();
        log.append((n - 9..=n).map(|i| entry(1, i)), IOFlushed::signal(tx))
            .await
            .unwrap();
        let all = log.try_get_log_entries(1..=n).await.unwrap();
        assert_eq!(ids(&all), (1..=n).map(|i| (1, i)).collect::<Vec<_>>());
        // A new leader's entries replace the old ones after 5 (asked while the last append may
        // still be on its way to the disk: it must not come back); then the first 2 are purged.
        log.truncate_after(Some(entry(1, 5).log_id()))
            .await
            .unwrap();
        flushed.await.unwrap().unwrap();
        log.blocking_append([entry(2, 6), entry(2, 7)])
            .await
            .unwrap();
        log.purge(entry(1, 2).log_id()).await.unwrap();
        let want = [(1, 3), (1, 4), (1, 5), (2, 6), (2, 7)];
        assert_eq!(ids(&log.try_get_log_entries(0..).await.unwrap()), want);
        drop(log);

        let mut log = open(dir.path());
        assert_eq!(ids(&log.try_get_log_entries(0..).await.unwrap()), want);
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(entry(2, 7).log_id()));
        assert_eq!(state.last_purged_log_id, Some(entry(1, 2).log_id()));
    }

    #[tokio::test]
    async fn an_entry_is_readable_as_soon_as_it_is_appended_and_acknowledged_once_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path());
        let (tx, flushed) = TypeConfig::oneshot();
        log.append([entry(1, 1), entry(1, 2)], IOFlushed::signal(tx))
            .await
            .unwrap();
        // Readers (replication) find the entries at once, whether or not the fsync is done.
        assert_eq!(
            ids(&log.try_get_log_entries(1..3).await.unwrap()),
            [(1, 1), (1, 2)]
        );
        assert_eq!(
            log.get_log_state().await.unwrap().last_log_id,
            Some(entry(1, 2).log_id())
        );
        flushed.await.unwrap().unwrap();
        drop(log);
        let mut log = open(dir.path());
        assert_eq!(
            ids(&log.try_get_log_entries(1..3).await.unwrap()),
            [(1, 1), (1, 2)]
        );
    }

    #[tokio::test]
    async fn a_failed_replica_refuses_appends_and_its_waiters_hear_why() {
        let dir = tempfile::tempdir().unwrap();
        let health = StorageHealth::default();
        let mut log = RocksLogStore::open(dir.path(), health.clone()).unwrap();
        health.fail("disk gone (injected)");
        let e = log.blocking_append([entry(1, 1)]).await.unwrap_err();
        assert!(e.to_string().contains("disk gone"), "{e}");
        assert!(log.try_get_log_entries(0..).await.unwrap().is_empty());
    }
}
