//! Opening the log directory: replay every segment's records in order into an [`Index`], find
//! where writing goes on, and clear what a crash left half-written.
//!
//! Rules:
//! - Every segment is replayed, oldest first. One that a purge freed may still be there (the
//!   deletion of a newer one landed first): the start record of the next one carries the purge
//!   point, which drops its entries, and the fsync thread deletes it when it starts.
//! - Every segment starts with its [`Start`] record. The newest may be all zeros (a crash right
//!   after it was renamed into place): it gets its start record now.
//! - In the newest segment, a record that is not whole because part of it is still zeros (a
//!   512-byte sector of it never reached the disk: a crash tore the group being written, which was
//!   never acknowledged) ends the log. Everything after it is zeroed before anything new is
//!   written, so no stale record can ever follow a new one. A record that is not whole with every
//!   sector of it written is damage, not a crash, and so is any record that is not whole in an
//!   older segment (each was fsynced whole before the next was used): the log refuses to open
//!   rather than forget acknowledged entries.
//! - The entries replayed must make one run from the purge point with no hole.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use openraft::entry::RaftEntry;

use super::direct::Direct;
use super::index::Effect;
use super::index::Index;
use super::index::Loc;
use super::index::State;
use super::record;
use super::record::Read;
use super::record::Record;
use super::record::Start;
use super::segment;

/// Where the next record goes.
pub(super) struct Cursor {
    pub seq: u64,
    pub file: Arc<File>,
    pub offset: u64,
    pub capacity: u64,
    /// The segment open for direct writes, when the writer uses them ([`super::direct`]).
    pub direct: Option<Direct>,
}

/// The log as found on disk.
pub(super) struct Recovered {
    pub index: Index,
    /// Every segment kept, open for reading (the newest also for writing).
    pub files: BTreeMap<u64, Arc<File>>,
    pub cursor: Cursor,
}

/// Opens the log in `dir` (made if missing); new segments are `segment_bytes` long.
pub(super) fn recover(dir: &Path, segment_bytes: u64) -> io::Result<Recovered> {
    remove_temporaries(dir)?;
    let mut segs = segment::list(dir)?;
    if segs.is_empty() {
        let path = dir.join(segment::name(1));
        segment::create_zeroed(&path, segment_bytes)?;
        segs.push((1, path));
    }

    let mut index = Index::default();
    let mut files = BTreeMap::new();
    let newest = segs.len() - 1;
    let mut cursor = None;
    for (i, (seq, path)) in segs.into_iter().enumerate() {
        let bytes = std::fs::read(&path)?;
        let end =
            replay(&mut index, seq, &bytes, i == newest).map_err(|why| damaged(&path, why))?;
        let file = Arc::new(segment::open(&path)?);
        if i == newest {
            cursor = Some(resume(&mut index, seq, &file, &bytes, end, &path)?);
        }
        files.insert(seq, file);
    }
    index.check_whole().map_err(|why| damaged(dir, why))?;
    let cursor = cursor.ok_or_else(|| io::Error::other("no segment to write to"))?;
    Ok(Recovered {
        index,
        files,
        cursor,
    })
}

/// Applies the records of one segment; returns where its records end. Errors say what is wrong
/// and where.
fn replay(index: &mut Index, seq: u64, bytes: &[u8], newest: bool) -> Result<u64, String> {
    let mut offset = 0usize;
    loop {
        let at = |len: usize| Loc {
            seq,
            offset: offset as u64,
            len: len as u32,
        };
        match record::read(&bytes[offset..]) {
            Read::Record(rec, len) => {
                if offset == 0 && !matches!(&rec, Record::Start(s) if s.seq == seq) {
                    return Err(format!("does not begin with its start record (seq {seq})"));
                }
                index.apply(effect(rec), at(len));
                offset += len;
            }
            Read::End if offset == 0 && !newest => return Err("is empty".into()),
            Read::End => return Ok(offset as u64),
            Read::Torn(why) if newest && torn_by_crash(bytes, offset) => {
                tracing::warn!(seq, offset, %why, "raft log ends in a torn write; what follows is dropped");
                return Ok(offset as u64);
            }
            Read::Torn(why) if newest => {
                return Err(format!(
                    "at byte {offset}: {why}, with every sector written"
                ))
            }
            Read::Torn(why) => return Err(format!("at byte {offset}: {why}")),
        }
    }
}

/// The sector size a crash tears writes at: a sector reaches the disk whole or not at all.
const SECTOR: usize = 512;

/// Whether the frame that is not whole at `at` can be a crash's torn write: some sector of it
/// (512-byte aligned in the file, cut to the frame) is still all zeros, as the segment was before
/// the write. The frame runs as far as its length says, within the segment.
fn torn_by_crash(bytes: &[u8], at: usize) -> bool {
    let len = bytes
        .get(at..at + 4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    let end = at
        .saturating_add(record::HEADER)
        .saturating_add(len)
        .min(bytes.len());
    let mut from = at;
    while from < end {
        let to = ((from / SECTOR + 1) * SECTOR).min(end);
        if bytes[from..to].iter().all(|b| *b == 0) {
            return true;
        }
        from = to;
    }
    false
}

/// Replays arbitrary bytes as the newest and as an older segment, as recovery would (the fuzz
/// target `raft_message`'s segment kind: bytes read back from disk must never panic).
/// Returns the last entry's index after the replay as an older segment.
pub(crate) fn replay_untrusted(bytes: &[u8]) -> Result<Option<u64>, String> {
    let mut last = Err(String::new());
    for newest in [true, false] {
        let mut index = Index::default();
        last = replay(&mut index, 1, bytes, newest).map(|_| {
            let _ = (index.check_whole(), index.purgeable(2));
            let _ = index.locate(&(..), u64::MAX);
            index.last().map(|l| l.index)
        });
    }
    last
}

/// A segment's bytes with a record of each kind (the fuzz target's seed).
pub(crate) fn segment_seed() -> Vec<u8> {
    use crate::types::{LogCommand, LogId};
    use openraft::impls::leader_id_adv::LeaderId;
    let id = |index| {
        LogId::new(
            LeaderId {
                term: 3,
                node_id: 1,
            },
            index,
        )
    };
    let command = LogCommand {
        stamped_ms: 1_700_000_000_000,
        command: b"an application command".to_vec(),
    };
    let entries: Vec<crate::types::Entry> = (7..=9)
        .map(|i| crate::types::Entry::new_normal(id(i), command.clone()))
        .collect();
    let vote = crate::types::Vote::new(3, 1);
    let mut records: Vec<Record<&crate::types::Entry>> = vec![Record::Start(Start {
        seq: 1,
        state: State {
            vote: Some(vote),
            committed: Some(id(6)),
            last_purged: Some(id(6)),
        },
    })];
    records.extend(entries.iter().map(Record::Entry));
    records.extend([
        Record::Truncate(9),
        Record::Purge(id(7)),
        Record::Vote(vote),
        Record::Committed(Some(id(8))),
    ]);
    let mut out = Vec::new();
    for r in &records {
        let _ = record::encode_into(r, &mut out);
    }
    out
}

/// What a record read back does to the index.
pub(super) fn effect(rec: Record) -> Effect {
    match rec {
        Record::Start(s) => Effect::Start(s.state),
        Record::Entry(e) => Effect::Entry(e.log_id()),
        Record::Truncate(from) => Effect::Truncate(from),
        Record::Purge(id) => Effect::Purge(id),
        Record::Vote(v) => Effect::Vote(v),
        Record::Committed(c) => Effect::Committed(c),
    }
}

/// Readies the newest segment for writing at `end`: zeroes whatever a torn write left after it,
/// and writes the start record of a segment that has none yet.
fn resume(
    index: &mut Index,
    seq: u64,
    file: &Arc<File>,
    bytes: &[u8],
    end: u64,
    path: &Path,
) -> io::Result<Cursor> {
    let rest = &bytes[end as usize..];
    if rest.iter().any(|b| *b != 0) {
        tracing::warn!(path = %path.display(), bytes = rest.len(), "zeroing the raft log after its last whole record");
        file.write_all_at(&vec![0; rest.len()], end)?;
        file.sync_data()?;
    }
    let mut cursor = Cursor {
        seq,
        file: file.clone(),
        offset: end,
        capacity: bytes.len() as u64,
        direct: None,
    };
    if end == 0 {
        let start = Record::<&crate::types::Entry>::Start(Start {
            seq,
            state: index.state.clone(),
        });
        let mut buf = Vec::new();
        let len = record::encode_into(&start, &mut buf)?;
        file.write_all_at(&buf, 0)?;
        file.sync_data()?;
        index.apply(
            Effect::Start(index.state.clone()),
            Loc {
                seq,
                offset: 0,
                len: len as u32,
            },
        );
        cursor.offset = len as u64;
    }
    Ok(cursor)
}

/// Half-made files (a segment or spare being zeroed when the process stopped).
fn remove_temporaries(dir: &Path) -> io::Result<()> {
    for item in std::fs::read_dir(dir)? {
        let path = item?.path();
        if path.extension().is_some_and(|e| e == "tmp") {
            std::fs::remove_file(path)?;
        }
    }
    Ok(())
}

fn damaged(path: &Path, why: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("raft log {}: {why}", path.display()),
    )
}
