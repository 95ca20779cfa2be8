//! Writing a group to its segment with `O_DIRECT | O_DSYNC`: one aligned `pwrite` that returns
//! once the group is on stable storage, in place of a `pwrite` into the page cache and an
//! `fdatasync` that writes it back and flushes the disk's cache.
//!
//! A direct write covers whole blocks ([`BLOCK`]) from an aligned buffer. A group rarely starts or
//! ends on a block's edge, so the writer keeps the written bytes of the block the cursor is in
//! (the `head`) and writes them again in front of the group, and zeros after it up to the block's
//! end: zeros are what a segment holds past its last record, and the block's bytes before the
//! cursor are the same as on disk, so a crash while a block is rewritten cannot change what an
//! earlier group wrote. A segment whose size is not a multiple of [`BLOCK`], and a filesystem
//! without `O_DIRECT`, are written through the page cache.

use std::fs::File;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The unit of a direct write, its offset and its buffer's address: the page size, a multiple of
/// any disk's logical block.
pub(super) const BLOCK: usize = 4096;

/// A segment open for direct writes, and the written bytes of the block its cursor is in.
pub(super) struct Direct {
    file: File,
    head: Vec<u8>,
    buf: Aligned,
}

impl Direct {
    /// Opens the segment at `path` for direct writes at `offset` (where the next record goes), or
    /// `None` when its filesystem does not take `O_DIRECT` or the segment's size (`capacity`) is
    /// not whole blocks.
    pub(super) fn open(path: &Path, offset: u64, capacity: u64) -> io::Result<Option<Direct>> {
        if capacity % BLOCK as u64 != 0 || offset > capacity {
            return Ok(None);
        }
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if unsupported(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut buf = Aligned::default();
        let keep = (offset % BLOCK as u64) as usize;
        let mut head = Vec::new();
        if keep > 0 {
            let block = buf.get(BLOCK);
            match file.read_exact_at(block, offset - keep as u64) {
                Ok(()) => head.extend_from_slice(&block[..keep]),
                Err(e) if unsupported(&e) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        Ok(Some(Direct { file, head, buf }))
    }

    /// Writes `data` at `offset` (the cursor: just after the bytes already written) and returns
    /// once it is on stable storage. An error of kind `Unsupported` means the filesystem refused
    /// the direct write before writing anything: the caller writes through the page cache.
    pub(super) fn write(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        let head = self.head.len();
        debug_assert_eq!(
            offset % BLOCK as u64,
            head as u64,
            "the head is the cursor's block"
        );
        let start = offset - head as u64;
        let end = head + data.len();
        let len = end.next_multiple_of(BLOCK);
        let out = self.buf.get(len);
        out[..head].copy_from_slice(&self.head);
        out[head..end].copy_from_slice(data);
        out[end..].fill(0);
        match self.file.write_at(out, start) {
            Ok(n) if n == len => {}
            Ok(n) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("direct write of {len} bytes at {start} wrote {n}"),
                ))
            }
            Err(e) if unsupported(&e) => {
                return Err(io::Error::new(io::ErrorKind::Unsupported, e.to_string()))
            }
            Err(e) => return Err(e),
        }
        let keep = end % BLOCK;
        self.head.clear();
        self.head.extend_from_slice(&out[end - keep..end]);
        self.buf.shrink();
        Ok(())
    }
}

/// Whether the filesystem of `dir` takes direct writes (a scratch file is made and removed).
#[cfg(test)]
pub(super) fn takes_direct_writes(dir: &Path) -> bool {
    let path = dir.join("direct-probe");
    let made = std::fs::write(&path, vec![0u8; BLOCK]).is_ok();
    let takes = made
        && match Direct::open(&path, 0, BLOCK as u64) {
            Ok(Some(mut d)) => d.write(&[1], 0).is_ok(),
            _ => false,
        };
    let _ = std::fs::remove_file(&path);
    takes
}

/// What a filesystem without direct I/O (or with other alignment rules) answers.
fn unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

/// A buffer whose usable part starts at a [`BLOCK`]-aligned address.
#[derive(Default)]
struct Aligned {
    raw: Vec<u8>,
}

/// The most a buffer keeps between writes: a rare large group does not hold its memory after.
const KEEP_AT_MOST: usize = 1 << 20;

impl Aligned {
    /// `len` bytes at an aligned address (what an earlier use left in them).
    fn get(&mut self, len: usize) -> &mut [u8] {
        if self.raw.len() < len + BLOCK {
            self.raw = vec![0; len + BLOCK];
        }
        let at = self.raw.as_ptr().align_offset(BLOCK);
        &mut self.raw[at..at + len]
    }

    /// Lets a buffer grown past [`KEEP_AT_MOST`] go.
    fn shrink(&mut self) {
        if self.raw.len() > KEEP_AT_MOST + BLOCK {
            self.raw = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_written_directly_at_any_offset_read_back_as_written_and_zeros_after() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg");
        std::fs::write(&path, vec![0u8; 4 * BLOCK]).unwrap();
        let Some(mut d) = Direct::open(&path, 0, (4 * BLOCK) as u64).unwrap() else {
            eprintln!("skipped: {} takes no O_DIRECT writes", dir.path().display());
            return;
        };
        // Groups that start and end inside blocks, fill one exactly, and cross two edges.
        let mut want = Vec::new();
        for (i, len) in [100usize, 3996, 1, 4095, 5000, 7].into_iter().enumerate() {
            let group = vec![i as u8 + 1; len];
            d.write(&group, want.len() as u64).unwrap();
            want.extend_from_slice(&group);
            let got = std::fs::read(&path).unwrap();
            assert_eq!(got.len(), 4 * BLOCK, "the file's size never changes");
            assert_eq!(&got[..want.len()], &want[..], "after group {i}");
            assert!(got[want.len()..].iter().all(|b| *b == 0), "after group {i}");
        }
    }

    #[test]
    fn a_writer_opened_inside_a_block_keeps_what_is_before_the_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg");
        let mut before = vec![0u8; 2 * BLOCK];
        before[..BLOCK + 10].fill(7);
        std::fs::write(&path, &before).unwrap();
        let offset = (BLOCK + 10) as u64;
        let Some(mut d) = Direct::open(&path, offset, (2 * BLOCK) as u64).unwrap() else {
            eprintln!("skipped: {} takes no O_DIRECT writes", dir.path().display());
            return;
        };
        d.write(&[9; 20], offset).unwrap();
        let got = std::fs::read(&path).unwrap();
        assert!(got[..BLOCK + 10].iter().all(|b| *b == 7));
        assert!(got[BLOCK + 10..BLOCK + 30].iter().all(|b| *b == 9));
        assert!(got[BLOCK + 30..].iter().all(|b| *b == 0));
    }

    #[test]
    fn a_segment_of_partial_blocks_is_not_written_directly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg");
        std::fs::write(&path, vec![0u8; BLOCK + 512]).unwrap();
        assert!(Direct::open(&path, 0, (BLOCK + 512) as u64)
            .unwrap()
            .is_none());
    }
}
