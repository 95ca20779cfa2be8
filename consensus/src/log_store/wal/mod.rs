//! The Raft log on disk: records appended to numbered segment files made (zeroed) ahead of use.
//!
//! Layout in `data_dir/raft-wal`: `LOCK` (held while open), `NNNNNNNNNNNNNNNNNNNN.seg` (segments
//! in log order, `segment_bytes` each unless one record needs more), `spare` (the next segment,
//! made in the background). Each segment begins with a start record (its number, the vote, the
//! committed index and the purge point) followed by entry, truncation, purge, vote and committed
//! records in the order they happened ([`record`]).
//!
//! Durability: an append puts its entries in the log's tail in memory ([`Tail`], where readers
//! find them at once) and queues them for a single fsync thread ([`writer`]), which takes every op
//! queued meanwhile, writes their records with one `pwrite` and one `fdatasync` and only then tells
//! openraft the entries are persisted (group commit). Records overwrite zeros already on disk, so
//! the fdatasync writes data only: the file's size and blocks never change under it. A
//! truncation, a purge and a vote go through the same thread and return once on disk, so they
//! can never land before appends queued ahead of them. Any write or fsync failure is returned to
//! openraft (which stops the Raft core) and recorded in [`StorageHealth`]: the replica never
//! acknowledges what it did not persist. Opening replays the segments ([`recover`]); a torn last
//! group (never acknowledged) is dropped and zeroed.
//!
//! Reads: an entry is in the tail or, if the tail let it go (only written entries leave), read
//! back from its segment at the offset the [`index`] keeps, its CRC checked.

mod index;
pub(crate) mod migrate;
mod record;
mod recover;
mod segment;
mod writer;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::File;
use std::io;
use std::ops::RangeBounds;
use std::os::unix::fs::FileExt;
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

use self::index::Index;
use self::index::Loc;
use self::record::Read;
use self::record::Record;
use self::writer::Done;
use self::writer::Op;
use self::writer::Writer;
use super::tail::Keep;
use super::tail::Tail;
use super::StorageHealth;
use crate::types::Entry;
use crate::types::LogId;
use crate::types::TypeConfig;
use crate::types::Vote;

pub(crate) use self::recover::replay_untrusted;
pub(crate) use self::recover::segment_seed;

/// The size of a new segment: a few snapshots' worth of typical entries, so that purges free whole
/// files while a zeroed spare stays cheap to make.
pub const SEGMENT_BYTES: u64 = 16 << 20;

/// How much of the written log the tail keeps in memory for readers (replication reads what was
/// just appended; a follower further behind is served from the segments).
const TAIL_KEEP: Keep = Keep {
    entries: 1024,
    bytes: 8 << 20,
};

/// What a store says once its fsync thread stopped.
const FSYNC_THREAD_GONE: &str = "raft log fsync thread is gone";

/// The raft log in segment files. Cheap to clone (openraft uses clones as log readers).
#[derive(Clone)]
pub struct WalLogStore {
    disk: Arc<Mutex<Disk>>,
    tail: Arc<Mutex<Tail>>,
    flusher: Arc<Flusher>,
    health: StorageHealth,
    /// The committed index last saved (the fsync thread writes it with its next group).
    committed: Arc<Mutex<Option<LogId>>>,
}

/// What is on disk: the index of the records and the segment files, open for reading.
struct Disk {
    index: Index,
    files: BTreeMap<u64, Arc<File>>,
}

/// The fsync thread, the channel to it and the directory lock, shared by every clone of the
/// store. When the last clone goes, dropping this closes the channel and joins the thread, then
/// releases the lock: a new store on the directory never overlaps the old one's writes.
struct Flusher {
    tx: Option<mpsc::Sender<Op>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _lock: segment::DirLock,
}

impl Drop for Flusher {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl WalLogStore {
    /// Opens (or creates) the log in `dir`, with segments of [`SEGMENT_BYTES`].
    pub fn open(dir: &Path, health: StorageHealth) -> io::Result<Self> {
        Self::open_with(dir, health, SEGMENT_BYTES)
    }

    /// Opens (or creates) the log in `dir`; new segments are `segment_bytes` long.
    pub fn open_with(dir: &Path, health: StorageHealth, segment_bytes: u64) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let lock = segment::DirLock::take(dir)?;
        let found = recover::recover(dir, segment_bytes)?;
        let state = found.index.state.clone();
        let committed = Arc::new(Mutex::new(state.committed));
        let disk = Arc::new(Mutex::new(Disk {
            index: found.index,
            files: found.files,
        }));
        let tail = Arc::new(Mutex::new(Tail::new(TAIL_KEEP)));
        let writer = Writer {
            dir: dir.to_path_buf(),
            segment_bytes,
            cursor: found.cursor,
            state,
            disk: disk.clone(),
            tail: tail.clone(),
            committed: committed.clone(),
            health: health.clone(),
            spare: writer::Spare::found(dir),
        };
        let (tx, rx) = mpsc::channel::<Op>();
        let thread = std::thread::Builder::new()
            .name("raft-log-fsync".into())
            .spawn(move || writer.run(rx))?;
        Ok(WalLogStore {
            disk,
            tail,
            flusher: Arc::new(Flusher {
                tx: Some(tx),
                thread: Some(thread),
                _lock: lock,
            }),
            health,
            committed,
        })
    }

    /// Record a failure in the health flag and pass it on.
    fn fail(&self, msg: String) -> io::Error {
        self.health.fail(&msg);
        io::Error::other(msg)
    }

    /// Queues `op` for the fsync thread.
    fn send(&self, op: Op) -> io::Result<()> {
        let sent = self.flusher.tx.as_ref().map(|tx| tx.send(op));
        if !matches!(sent, Some(Ok(()))) {
            return Err(self.fail(FSYNC_THREAD_GONE.into()));
        }
        Ok(())
    }

    /// Queues a truncation, a purge or a vote and waits until it is on disk.
    async fn send_and_wait(&self, op: impl FnOnce(Done) -> Op) -> io::Result<()> {
        let (done, on_disk) = tokio::sync::oneshot::channel();
        self.send(op(done))?;
        match on_disk.await {
            Ok(res) => res.map_err(io::Error::other),
            Err(_) => Err(io::Error::other(FSYNC_THREAD_GONE)),
        }
    }

    /// The entries with indexes in `range` below `below` (those the tail does not hold), read
    /// back from their segments.
    fn read_written(&self, range: &impl RangeBounds<u64>, below: u64) -> io::Result<Vec<Entry>> {
        let found: Vec<(u64, Loc, Option<Arc<File>>)> = {
            let disk = lock(&self.disk);
            let locs = disk.index.locate(range, below);
            locs.into_iter()
                .map(|(i, at)| (i, at, disk.files.get(&at.seq).cloned()))
                .collect()
        };
        found
            .into_iter()
            .map(|(i, at, file)| {
                read_entry(file.as_deref(), i, at)
                    .map_err(|why| self.fail(format!("raft log entry {i} ({at:?}): {why}")))
            })
            .collect()
    }
}

/// Reads back the entry `index` from its record.
fn read_entry(file: Option<&File>, index: u64, at: Loc) -> Result<Entry, String> {
    let file = file.ok_or("its segment is not open")?;
    let mut buf = vec![0; at.len as usize];
    file.read_exact_at(&mut buf, at.offset)
        .map_err(|e| e.to_string())?;
    match record::read(&buf) {
        Read::Record(Record::Entry(e), _) if e.index() == index => Ok(e),
        Read::Record(other, _) => Err(format!("holds another record: {other:?}")),
        Read::End => Err("is zeros".into()),
        Read::Torn(why) => Err(why),
    }
}

/// A mutex's data even if a thread panicked holding it (every holder leaves it whole).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RaftLogReader<TypeConfig> for WalLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        // The tail first: whatever it does not hold was written before it let it go.
        let (held, below) = lock(&self.tail).read(&range);
        let mut out = self.read_written(&range, below)?;
        out.extend(held);
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(lock(&self.disk).index.state.vote)
    }
}

impl RaftLogStorage<TypeConfig> for WalLogStore {
    type LogReader = WalLogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        // The tail holds the last entry appended, if any was since the store opened.
        let in_tail = lock(&self.tail).last();
        let disk = lock(&self.disk);
        let last_purged = disk.index.state.last_purged;
        let last = in_tail.or_else(|| disk.index.last());
        Ok(LogState {
            last_log_id: last.or(last_purged),
            last_purged_log_id: last_purged,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        // On disk before it returns: a replica must never vote twice in one term, even across a
        // crash.
        self.health.check().map_err(io::Error::other)?;
        let vote = *vote;
        self.send_and_wait(|done| Op::Vote { vote, done }).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Written with the fsync thread's next group: no write of its own.
        *lock(&self.committed) = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(*lock(&self.committed))
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
            let mut tail = lock(&self.tail);
            for e in &entries {
                tail.push(e.clone());
            }
        }
        self.send(Op::Append { entries, callback })
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index() + 1).unwrap_or(0);
        lock(&self.tail).truncate_from(from);
        self.send_and_wait(|done| Op::Truncate { from, done }).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        lock(&self.tail).purge_upto(log_id.index());
        self.send_and_wait(|done| Op::Purge { upto: log_id, done })
            .await
    }
}

#[cfg(test)]
mod tests;
