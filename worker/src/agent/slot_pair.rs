//! [`SlotPair`]: a small file rewritten often (the agent's state), kept as two slot files written
//! in turn and in place.
//!
//! Why not a temporary file renamed over the old one: each such save allocates an inode and frees
//! one, and costs two fsyncs (the file's and its directory's). On ext4 a freed inode is skipped,
//! one inode-table lookup at a time, by every allocation in its group for the next 30 seconds
//! (without a journal), so an agent saving a few times per task made every `mkdir` and file
//! creation on the host slower as tasks went by. Here a save overwrites a file that already
//! exists and syncs its data: no inode allocated or freed, one `fdatasync`.
//!
//! Slot `i` (`<stem>.<i>`) holds the saves whose sequence number `s` has `s % 2 == i`, each as a
//! header line `gangway-slot seq=S len=N crc32=C` and then the N bytes of the body; the checksum
//! covers the header before it too, so a new header half written over an older one is not taken
//! for a save. A save goes
//! to the slot that does not hold the newest save: it writes from the start, cuts the file to
//! length and syncs. A crash in the middle leaves that slot torn (its length or checksum does not
//! match; bytes of an older, longer save after the length are never read) and the other slot
//! whole, so a load finds the newest save that completed, or the one before it, which is what a
//! crash just before the save would have left.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const MAGIC: &str = "gangway-slot";
/// Owner read and write only.
const MODE: u32 = 0o600;

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    /// Neither slot holds a whole save, and this one exists.
    #[error("{path} holds no whole save ({why})")]
    Damaged { path: PathBuf, why: String },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// The two slot files of one stem in one directory.
pub struct SlotPair {
    paths: [PathBuf; 2],
    /// Sequence number of the next save; `None` until a load or the first save has read the
    /// slots. Held while writing: saves are one at a time.
    next: Mutex<Option<u64>>,
}

impl SlotPair {
    pub fn new(dir: &Path, stem: &str) -> Self {
        Self {
            paths: [0, 1].map(|i| dir.join(format!("{stem}.{i}"))),
            next: Mutex::new(None),
        }
    }

    pub fn paths(&self) -> &[PathBuf; 2] {
        &self.paths
    }

    /// The body of the newest whole save and the slot holding it; `None` when neither slot
    /// exists. A torn slot beside a whole one is the trace of a crash during a save: the whole
    /// one is read (and the torn one is the next written).
    pub fn load(&self) -> Result<Option<(&Path, Vec<u8>)>, SlotError> {
        let mut next = self.lock();
        let files = self.read_both()?;
        let newest = newest(&files);
        *next = Some(seq_after(newest.map(|(_, seq, _)| seq)));
        if let Some((slot, seq, body)) = newest {
            if let Some(Err(why)) = decoded(&files, 1 - slot) {
                tracing::warn!(
                    path = %self.paths[1 - slot].display(),
                    "a save was cut short ({why}); using the one before it (save {seq})"
                );
            }
            return Ok(Some((&self.paths[slot], body.to_vec())));
        }
        // No whole save: the first slot present is damaged (both are, if both are present).
        for slot in 0..2 {
            if let Some(Err(why)) = decoded(&files, slot) {
                let path = self.paths[slot].clone();
                return Err(SlotError::Damaged { path, why });
            }
        }
        Ok(None)
    }

    /// Writes `body` as the newest save, over the older slot.
    pub fn save(&self, body: &[u8]) -> Result<(), SlotError> {
        let mut next = self.lock();
        let seq = match *next {
            Some(seq) => seq,
            None => seq_after(newest(&self.read_both()?).map(|(_, seq, _)| seq)),
        };
        let path = &self.paths[(seq % 2) as usize];
        write_slot(path, &encode(seq, body)).map_err(|source| SlotError::Write {
            path: path.clone(),
            source,
        })?;
        *next = Some(seq + 1);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<u64>> {
        self.next.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Each slot's bytes, `None` where the file does not exist.
    fn read_both(&self) -> Result<[Option<Vec<u8>>; 2], SlotError> {
        let read = |path: &PathBuf| match std::fs::read(path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SlotError::Read {
                path: path.clone(),
                source,
            }),
        };
        Ok([read(&self.paths[0])?, read(&self.paths[1])?])
    }
}

/// The number of the save after the newest whole one (1 when there is none).
fn seq_after(newest: Option<u64>) -> u64 {
    newest.map_or(1, |seq| seq + 1)
}

fn decoded(files: &[Option<Vec<u8>>; 2], slot: usize) -> Option<Result<(u64, &[u8]), String>> {
    files[slot].as_deref().map(|bytes| decode(slot, bytes))
}

/// The slot, sequence number and body of the newest whole save.
fn newest(files: &[Option<Vec<u8>>; 2]) -> Option<(usize, u64, &[u8])> {
    (0..2)
        .filter_map(|slot| match decoded(files, slot)? {
            Ok((seq, body)) => Some((slot, seq, body)),
            Err(_) => None,
        })
        .max_by_key(|(_, seq, _)| *seq)
}

/// The header up to its checksum, which covers it and the body.
fn prefix(seq: u64, len: u64) -> String {
    format!("{MAGIC} seq={seq} len={len} ")
}

fn checksum(prefix: &str, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(prefix.as_bytes());
    h.update(body);
    h.finalize()
}

fn encode(seq: u64, body: &[u8]) -> Vec<u8> {
    let prefix = prefix(seq, body.len() as u64);
    let crc = checksum(&prefix, body);
    let mut out = format!("{prefix}crc32={crc:08x}\n").into_bytes();
    out.extend_from_slice(body);
    out
}

/// The sequence number and body of slot `slot`'s bytes, or why they are not a whole save.
fn decode(slot: usize, bytes: &[u8]) -> Result<(u64, &[u8]), String> {
    let end = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("no header line")?;
    let header = std::str::from_utf8(&bytes[..end]).map_err(|_| "header is not text")?;
    let mut words = header.split(' ');
    if words.next() != Some(MAGIC) {
        return Err(format!("header does not start with `{MAGIC}`"));
    }
    let mut field = |name: &str, radix: u32| -> Result<u64, String> {
        words
            .next()
            .and_then(|w| w.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| u64::from_str_radix(v, radix).ok())
            .ok_or_else(|| format!("header field `{name}` missing or not a number"))
    };
    let (seq, len, crc) = (field("seq", 10)?, field("len", 10)?, field("crc32", 16)?);
    if seq % 2 != slot as u64 {
        return Err(format!("save {seq} does not belong in slot {slot}"));
    }
    let body = usize::try_from(len)
        .ok()
        .and_then(|len| bytes.get(end + 1..(end + 1).checked_add(len)?))
        .ok_or_else(|| format!("{len} bytes announced, {} present", bytes.len() - end - 1))?;
    if u64::from(checksum(&prefix(seq, len), body)) != crc {
        return Err("checksum does not match".into());
    }
    Ok((seq, body))
}

/// Overwrites `path` with `bytes` in place (created on first use, mode 0600) and syncs it.
fn write_slot(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let (file, created) = open_slot(path)?;
    if file.metadata()?.permissions().mode() & 0o777 != MODE {
        file.set_permissions(std::fs::Permissions::from_mode(MODE))?;
    }
    file.write_all_at(bytes, 0)?;
    file.set_len(bytes.len() as u64)?;
    file.sync_data()?;
    if created {
        // The new name must last too; once only, the file stays.
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
    }
    Ok(())
}

fn open_slot(path: &Path) -> io::Result<(File, bool)> {
    let mut options = OpenOptions::new();
    options.write(true).mode(MODE);
    match options.clone().create_new(true).open(path) {
        Ok(file) => Ok((file, true)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok((options.open(path)?, false)),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_slot_holds_a_whole_save_or_says_what_is_wrong() {
        let whole = encode(4, b"{\"a\":1}");
        let mut flipped = whole.clone();
        *flipped.last_mut().unwrap() ^= 1;
        let older = encode(1, b"{\"a\":1}");
        let seq_3_over_save_1 = String::from_utf8(older).unwrap().replace("seq=1", "seq=3");
        let mut longer_before = whole.clone();
        longer_before.extend_from_slice(b"tail of an older, longer save");
        /// Story, slot, bytes, and the save's number or a word of why not.
        type Case = (&'static str, usize, Vec<u8>, Result<u64, &'static str>);
        let cases: Vec<Case> = vec![
            ("a whole save", 0, whole.clone(), Ok(4)),
            ("old bytes after the length", 0, longer_before, Ok(4)),
            ("the other slot's number", 1, whole.clone(), Err("slot 1")),
            (
                "cut short",
                0,
                whole[..whole.len() - 2].to_vec(),
                Err("announced"),
            ),
            (
                "cut in the header",
                0,
                whole[..10].to_vec(),
                Err("no header"),
            ),
            ("a changed byte", 0, flipped, Err("checksum")),
            (
                "a newer header half over an older save",
                1,
                seq_3_over_save_1.into_bytes(),
                Err("checksum"),
            ),
            (
                "a length past any file",
                0,
                format!("gangway-slot seq=0 len={} crc32=0\n", u64::MAX).into_bytes(),
                Err("announced"),
            ),
            (
                "not ours",
                0,
                b"{\"a\":1}\n".to_vec(),
                Err("does not start"),
            ),
            ("empty", 0, Vec::new(), Err("no header")),
            (
                "a field missing",
                0,
                b"gangway-slot seq=4 crc32=00\n".to_vec(),
                Err("`len`"),
            ),
            (
                "a number that is not",
                0,
                b"gangway-slot seq=x len=0 crc32=0\n".to_vec(),
                Err("`seq`"),
            ),
        ];
        for (story, slot, bytes, want) in cases {
            let got = decode(slot, &bytes).map(|(seq, body)| {
                assert_eq!(body, b"{\"a\":1}", "{story}");
                seq
            });
            match (got, want) {
                (Ok(seq), Ok(w)) => assert_eq!(seq, w, "{story}"),
                (Err(why), Err(w)) => assert!(why.contains(w), "{story}: {why}"),
                (got, want) => panic!("{story}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn saves_take_turns_in_two_files_that_stay_the_same_files() {
        let dir = tempfile::tempdir().unwrap();
        let pair = SlotPair::new(dir.path(), "state");
        assert!(pair.load().unwrap().is_none(), "nothing saved yet");
        let mut inodes = Vec::new();
        for i in 0..6u32 {
            let body = format!("save {i}").repeat(1 + (i as usize % 3));
            pair.save(body.as_bytes()).unwrap();
            let (_, loaded) = pair.load().unwrap().unwrap();
            assert_eq!(loaded, body.as_bytes());
            inodes.push(
                pair.paths()
                    .each_ref()
                    .map(|p| std::fs::metadata(p).ok().map(|m| m.ino())),
            );
        }
        // The first save made slot 1, the second slot 0; every later save reused them.
        assert_eq!(inodes[0][0], None);
        assert!(inodes[1..].iter().all(|i| *i == inodes[1]), "{inodes:?}");
        for path in pair.paths() {
            let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", path.display());
        }
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "no temporary files: {names:?}");
    }

    /// A save cut short anywhere (a crash mid-write, the file not yet cut to length) leaves the
    /// previous save readable, and the next save, by a new process, goes over the torn slot.
    #[test]
    fn a_torn_save_leaves_the_one_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let bodies: [&[u8]; 3] = [b"first, a long one", b"second", b"third, torn"];
        let whole = encode(3, bodies[2]);
        for cut in 0..whole.len() {
            let pair = SlotPair::new(dir.path(), &format!("cut{cut}"));
            pair.save(bodies[0]).unwrap();
            pair.save(bodies[1]).unwrap();
            // Save 3 goes to slot 1, over save 1 (longer): write part of it, as a crash would.
            let (file, _) = open_slot(&pair.paths()[1]).unwrap();
            file.write_all_at(&whole[..cut], 0).unwrap();
            let restarted = SlotPair::new(dir.path(), &format!("cut{cut}"));
            let (path, loaded) = restarted.load().unwrap().unwrap();
            assert_eq!(
                (path, &loaded[..]),
                (&*pair.paths()[0], bodies[1]),
                "cut at {cut}"
            );
            restarted.save(b"after").unwrap();
            let again = SlotPair::new(dir.path(), &format!("cut{cut}"));
            let (path, loaded) = again.load().unwrap().unwrap();
            assert_eq!((path, &loaded[..]), (&*pair.paths()[1], &b"after"[..]));
        }
    }

    #[test]
    fn a_new_process_saving_first_never_overwrites_the_newest_save() {
        let dir = tempfile::tempdir().unwrap();
        let pair = SlotPair::new(dir.path(), "state");
        for body in [b"1", b"2", b"3"] {
            pair.save(body).unwrap();
        }
        SlotPair::new(dir.path(), "state").save(b"4").unwrap();
        let restarted = SlotPair::new(dir.path(), "state");
        assert_eq!(restarted.load().unwrap().unwrap().1, b"4");
        let other = std::fs::read(&pair.paths()[1]).unwrap();
        assert_eq!(
            decode(1, &other).unwrap(),
            (3, &b"3"[..]),
            "save 3 kept beside 4"
        );
    }

    #[test]
    fn two_damaged_slots_are_named_not_taken_for_an_empty_state() {
        let dir = tempfile::tempdir().unwrap();
        let pair = SlotPair::new(dir.path(), "state");
        pair.save(b"one").unwrap();
        pair.save(b"two").unwrap();
        for path in pair.paths() {
            std::fs::write(path, b"gangway-slot seq=1 len=3 crc32=0\nabc").unwrap();
        }
        let err = SlotPair::new(dir.path(), "state").load().unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("state.0") && text.contains("slot 0"),
            "{text}"
        );
        // One damaged slot alone (the very first save torn) is named as well.
        std::fs::remove_file(&pair.paths()[0]).unwrap();
        let text = SlotPair::new(dir.path(), "state")
            .load()
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("state.1") && text.contains("checksum"),
            "{text}"
        );
    }

    #[test]
    fn saves_from_several_threads_each_land_whole() {
        let dir = tempfile::tempdir().unwrap();
        let pair = std::sync::Arc::new(SlotPair::new(dir.path(), "state"));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let pair = pair.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        pair.save(format!("{t}:{i}").as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let files = pair.read_both().unwrap();
        let seqs: Vec<u64> = (0..2)
            .map(|s| decoded(&files, s).unwrap().unwrap().0)
            .collect();
        assert_eq!(
            seqs.iter().max(),
            Some(&200),
            "200 saves numbered in turn: {seqs:?}"
        );
        assert_eq!(seqs.iter().min(), Some(&199), "{seqs:?}");
    }
}
