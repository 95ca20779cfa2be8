//! The writer: group commit of whatever the raft core queued, into the current segment.
//!
//! The fsync thread waits for one op, takes every other queued one, encodes them in order into one
//! buffer, writes it with one direct write that is durable when it returns ([`Direct`]; a
//! `pwrite` and an `fdatasync` where the filesystem takes none), then puts the records in the
//! [`Index`](super::index::Index), marks the entries written in the tail and answers each op.
//! The raft core may write a group of its own in place, through the same [`Writer`], while
//! nothing is queued (see [`super::WalLogStore`]).
//! A record that does not fit the segment goes to the next one, after what came before it is
//! written and synced: an older segment is always whole. The next segment is made (zeroed) in the
//! background once the current one is half full, so a roll is a rename.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::sync::Mutex;

use openraft::entry::RaftEntry;
use openraft::storage::IOFlushed;

use super::direct::Direct;
use super::index::Effect;
use super::index::Loc;
use super::index::State;
use super::lock;
use super::record;
use super::record::Record;
use super::record::Start;
use super::recover::Cursor;
use super::segment;
use super::Disk;
use crate::log_store::tail::Tail;
use crate::log_store::StorageHealth;
use crate::types::Entry;
use crate::types::LogId;
use crate::types::TypeConfig;
use crate::types::Vote;

/// What the fsync thread does, in the order the raft core asked for it.
pub(super) enum Op {
    /// Write these entries; call back once they are on disk.
    Append {
        entries: Vec<Entry>,
        callback: IOFlushed<TypeConfig>,
    },
    /// Every entry from index `from` on is gone.
    Truncate {
        from: u64,
        done: Done,
    },
    /// Every entry up to `upto` is gone; `upto` is the last purged.
    Purge {
        upto: LogId,
        done: Done,
    },
    Vote {
        vote: Vote,
        done: Done,
    },
}

/// Where a truncation, a purge or a vote learns that it is on disk.
pub(super) type Done = tokio::sync::oneshot::Sender<Result<(), String>>;

/// The file the next segment is made in ahead of use.
const SPARE: &str = "spare";

/// The fsync thread's state.
pub(super) struct Writer {
    pub dir: PathBuf,
    pub segment_bytes: u64,
    pub cursor: Cursor,
    /// The log's state as of the records encoded so far: what a new segment starts with.
    pub state: State,
    pub disk: Arc<Mutex<Disk>>,
    pub tail: Arc<Mutex<Tail>>,
    /// The committed index last saved: written with the next group when it changed (losing it to
    /// a crash only means re-applying from the snapshot), and when the store closes.
    pub committed: Arc<Mutex<Option<LogId>>>,
    pub health: StorageHealth,
    pub spare: Spare,
    /// Why a write or fsync failed, once one did.
    pub failed: Option<String>,
    /// How groups reach the disk.
    pub io: Io,
}

/// How a group is made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Io {
    /// One `O_DIRECT | O_DSYNC` write where the segment's filesystem takes it ([`Direct`]), else
    /// as [`Io::PageCache`].
    Direct,
    /// A `pwrite` into the page cache and an `fdatasync`.
    PageCache,
}

/// The next segment, made ahead of use in the file `spare`.
pub(super) enum Spare {
    /// None made or being made.
    Absent,
    /// Being made on its own thread.
    Making(std::thread::JoinHandle<io::Result<()>>),
    /// Made (possibly by an earlier run).
    Ready,
}

impl Spare {
    /// What a directory holds at open.
    pub(super) fn found(dir: &std::path::Path) -> Spare {
        if dir.join(SPARE).exists() {
            Spare::Ready
        } else {
            Spare::Absent
        }
    }
}

/// One group's records: what each does to the index and where it lies, and each entry written
/// with its frame's size (for the tail).
#[derive(Default)]
struct Group {
    buf: Vec<u8>,
    effects: Vec<(Effect, Loc)>,
    entries: Vec<(LogId, usize)>,
    purged: bool,
}

/// The fsync thread: serves the queue until every store clone is gone, one group of whatever
/// was queued at a time, then writes the committed index a last time. `queued` counts the ops
/// sent and not yet answered (the sender adds, this thread takes away once a group is answered).
pub(super) fn run(writer: Arc<Mutex<Writer>>, rx: mpsc::Receiver<Op>, queued: Arc<AtomicUsize>) {
    // Segments an interrupted purge left behind.
    lock(&writer).after(true);
    while let Ok(first) = rx.recv() {
        let mut ops = vec![first];
        ops.extend(rx.try_iter());
        let n = ops.len();
        lock(&writer).commit(ops);
        queued.fetch_sub(n, Ordering::AcqRel);
    }
    lock(&writer).close();
}

impl Writer {
    /// Writes `ops` as one group (one write, durable when done), then answers each. After a
    /// failure every op is answered with it: nothing more is written.
    pub(super) fn commit(&mut self, ops: Vec<Op>) {
        if let Some(msg) = &self.failed {
            let msg = msg.clone();
            answer(ops, Err(msg));
            return;
        }
        match self.write(&ops) {
            Ok(group) => {
                let purged = group.purged;
                self.publish(group);
                answer(ops, Ok(()));
                self.after(purged);
            }
            Err(e) => {
                let msg = format!("raft log write or fsync failed: {e}");
                self.health.fail(&msg);
                answer(ops, Err(msg.clone()));
                self.failed = Some(msg);
            }
        }
    }

    /// At close: the committed index a last time, and the spare's thread joined.
    fn close(&mut self) {
        if self.failed.is_none() {
            if let Err(e) = self.write(&[]) {
                tracing::warn!(error = %e, "writing the committed index at close failed");
            }
        }
        if let Spare::Making(making) = std::mem::replace(&mut self.spare, Spare::Absent) {
            let _ = making.join();
        }
    }

    /// Encodes every op's records and writes them; durable when it returns.
    fn write(&mut self, ops: &[Op]) -> io::Result<Group> {
        let mut g = Group::default();
        let committed = *lock(&self.committed);
        if committed != self.state.committed {
            self.put(
                &mut g,
                &Record::Committed(committed),
                Effect::Committed(committed),
            )?;
            self.state.committed = committed;
        }
        for op in ops {
            match op {
                Op::Append { entries, .. } => {
                    for e in entries {
                        let len = self.put(&mut g, &Record::Entry(e), Effect::Entry(e.log_id()))?;
                        g.entries.push((e.log_id(), len));
                    }
                }
                Op::Truncate { from, .. } => {
                    self.put(&mut g, &Record::Truncate(*from), Effect::Truncate(*from))?;
                }
                Op::Purge { upto, .. } => {
                    self.put(&mut g, &Record::Purge(*upto), Effect::Purge(*upto))?;
                    self.state.last_purged = Some(*upto);
                    g.purged = true;
                }
                Op::Vote { vote, .. } => {
                    self.put(&mut g, &Record::Vote(*vote), Effect::Vote(*vote))?;
                    self.state.vote = Some(*vote);
                }
            }
        }
        let sync = !g.buf.is_empty();
        self.flush(&mut g.buf, sync)?;
        Ok(g)
    }

    /// Adds one record to the group, in the next segment if it does not fit this one. Returns the
    /// frame's length.
    fn put(&mut self, g: &mut Group, rec: &Record<&Entry>, effect: Effect) -> io::Result<usize> {
        let at = g.buf.len();
        let len = record::encode_into(rec, &mut g.buf)?;
        if self.cursor.offset + g.buf.len() as u64 > self.cursor.capacity {
            let frame = g.buf.split_off(at);
            self.flush(&mut g.buf, true)?;
            self.roll(frame.len())?;
            let start = Start {
                seq: self.cursor.seq,
                state: self.state.clone(),
            };
            let start_len = record::encode_into(&Record::<&Entry>::Start(start), &mut g.buf)?;
            g.effects
                .push((Effect::Start(self.state.clone()), self.loc(0, start_len)));
            g.buf.extend_from_slice(&frame);
        }
        let at = g.buf.len() - len;
        g.effects.push((effect, self.loc(at, len)));
        Ok(len)
    }

    /// Where the byte `at` of the buffer will lie once written.
    fn loc(&self, at: usize, len: usize) -> Loc {
        Loc {
            seq: self.cursor.seq,
            offset: self.cursor.offset + at as u64,
            len: len as u32,
        }
    }

    /// Writes the buffer at the cursor (and fsyncs if asked), then empties it. A segment open for
    /// direct writes needs no fsync: each write is durable when it returns, and nothing of it is
    /// in the page cache.
    fn flush(&mut self, buf: &mut Vec<u8>, sync: bool) -> io::Result<()> {
        if !buf.is_empty() && !self.write_direct(buf)? {
            self.cursor.file.write_all_at(buf, self.cursor.offset)?;
        }
        self.cursor.offset += buf.len() as u64;
        buf.clear();
        if sync && self.cursor.direct.is_none() {
            self.cursor.file.sync_data()?;
        }
        Ok(())
    }

    /// Writes `buf` at the cursor directly if the segment is open for it; false if it is not, or
    /// if the filesystem refused the write (from then on the log writes through the page cache).
    fn write_direct(&mut self, buf: &[u8]) -> io::Result<bool> {
        let Some(direct) = self.cursor.direct.as_mut() else {
            return Ok(false);
        };
        match direct.write(buf, self.cursor.offset) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                tracing::warn!(error = %e, "the raft log's filesystem refused a direct write; writing through the page cache");
                self.cursor.direct = None;
                self.io = Io::PageCache;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Opens the cursor's segment for direct writes, if the log uses them; a segment that cannot
    /// be is written through the page cache, and so is the rest of the log.
    pub(super) fn open_direct(&mut self) {
        if self.io != Io::Direct {
            return;
        }
        let path = self.dir.join(segment::name(self.cursor.seq));
        match Direct::open(&path, self.cursor.offset, self.cursor.capacity) {
            Ok(Some(direct)) => self.cursor.direct = Some(direct),
            Ok(None) => {
                tracing::info!(path = %path.display(), "the raft log's filesystem takes no direct writes, or its segments are not whole blocks: writing through the page cache");
                self.io = Io::PageCache;
            }
            Err(e) => {
                tracing::warn!(error = %e, path = %path.display(), "the raft log's segment cannot be opened for direct writes; writing through the page cache");
                self.io = Io::PageCache;
            }
        }
    }

    /// Moves the cursor to a new segment with room for a record of `need` bytes after its start.
    fn roll(&mut self, need: usize) -> io::Result<()> {
        let seq = self.cursor.seq + 1;
        let path = self.dir.join(segment::name(seq));
        let size = segment_size(self.segment_bytes, need);
        if !(size == self.segment_bytes && self.take_spare(&path)?) {
            segment::create_zeroed(&path, size)?;
        }
        let file = Arc::new(segment::open(&path)?);
        let capacity = file.metadata()?.len();
        lock(&self.disk).files.insert(seq, file.clone());
        self.cursor = Cursor {
            seq,
            file,
            offset: 0,
            capacity,
            direct: None,
        };
        self.open_direct();
        Ok(())
    }

    /// Renames the spare (once made) to `path`; false if there is none of the right size.
    fn take_spare(&mut self, path: &std::path::Path) -> io::Result<bool> {
        if let Spare::Making(making) = std::mem::replace(&mut self.spare, Spare::Absent) {
            match making.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "making the raft log's spare segment failed")
                }
                Err(_) => tracing::warn!("the thread making the raft log's spare segment panicked"),
            }
        }
        let spare = self.dir.join(SPARE);
        match std::fs::metadata(&spare) {
            Ok(m) if m.len() == self.segment_bytes => {
                std::fs::rename(&spare, path)?;
                segment::sync_dir(&self.dir)?;
                Ok(true)
            }
            Ok(_) => std::fs::remove_file(&spare).map(|()| false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Puts a written group's records in the index, then marks its entries written in the tail
    /// (in that order: an entry may leave the tail only once the index has it).
    fn publish(&self, g: Group) {
        {
            let mut disk = lock(&self.disk);
            for (effect, at) in g.effects {
                disk.index.apply(effect, at);
            }
        }
        lock(&self.tail).written(g.entries);
    }

    /// After answering: deletes segments a purge left with nothing needed, and starts the spare
    /// once the current segment is half full.
    fn after(&mut self, purged: bool) {
        if purged {
            if let Err(e) = self.delete_purged() {
                tracing::warn!(error = %e, "deleting purged raft log segments failed; retried after the next purge");
            }
        }
        let half = self.cursor.offset > self.cursor.capacity / 2;
        if half && matches!(self.spare, Spare::Absent) {
            let (path, bytes) = (self.dir.join(SPARE), self.segment_bytes);
            let making = std::thread::Builder::new()
                .name("raft-log-spare".into())
                .spawn(move || segment::create_zeroed(&path, bytes));
            if let Ok(making) = making {
                self.spare = Spare::Making(making);
            }
        }
    }

    /// Deletes the oldest segments nothing is needed from, one by one, forgetting each once gone.
    fn delete_purged(&self) -> io::Result<()> {
        let gone = lock(&self.disk).index.purgeable(self.cursor.seq);
        for seq in &gone {
            std::fs::remove_file(self.dir.join(segment::name(*seq)))?;
            let mut disk = lock(&self.disk);
            disk.index.forget_segment(*seq);
            disk.files.remove(seq);
        }
        if gone.is_empty() {
            return Ok(());
        }
        segment::sync_dir(&self.dir)
    }
}

/// Room kept in a segment for its start record (about 120 bytes).
const START_ROOM: u64 = 512;

/// The size of a new segment that must hold a start record and `need` bytes more: the usual
/// size, or larger for a record that would not fit it.
pub(super) fn segment_size(usual: u64, need: usize) -> u64 {
    let need = need as u64 + START_ROOM;
    if need <= usual {
        usual
    } else {
        need.next_multiple_of(4096)
    }
}

/// Tells each op's waiter how its group went.
fn answer(ops: Vec<Op>, res: Result<(), String>) {
    for op in ops {
        match op {
            Op::Append { callback, .. } => {
                callback.io_completed(res.clone().map_err(io::Error::other));
            }
            Op::Truncate { done, .. } | Op::Purge { done, .. } | Op::Vote { done, .. } => {
                let _ = done.send(res.clone());
            }
        }
    }
}
