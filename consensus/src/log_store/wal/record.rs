//! One record of the log's segment files, framed so that a torn or foreign write is found.
//!
//! Frame: `len: u32 LE | crc: u32 LE | body`, where `body` (`len` bytes) is the bincode of a
//! [`Record`] and `crc` is CRC-32 over `len` and `body` together. A segment is zeros past its last
//! record, so a zero `len` is the end; a frame that runs past the segment, is longer than
//! [`MAX_BODY`] or fails its CRC is torn (a crash during its write) or damaged.

use serde::Deserialize;
use serde::Serialize;

use super::index::State;
use crate::codec;
use crate::types::Entry;
use crate::types::LogId;
use crate::types::Vote;

/// Bytes before a record's body.
pub(super) const HEADER: usize = 8;

/// The largest body accepted when reading: anything longer is damage, not a record to allocate for.
pub(super) const MAX_BODY: usize = 1 << 30;

/// What the log records, in the order it happened. `E` is `&Entry` when writing (no copy) and
/// `Entry` when reading; both encode the same.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) enum Record<E = Entry> {
    /// The first record of every segment: which segment this is and the log's state when it
    /// began, so that older segments can be deleted without losing the vote or the purge point.
    Start(Start),
    /// An entry, replacing any at its index.
    Entry(E),
    /// Every entry from this index on is gone.
    Truncate(u64),
    /// Every entry up to this one is gone, and the log remembers it as the last purged.
    Purge(LogId),
    Vote(Vote),
    Committed(Option<LogId>),
}

/// The log's state at the start of a segment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct Start {
    /// The segment's sequence number, as in its file name.
    pub seq: u64,
    pub state: State,
}

/// Appends `record`'s frame to `out`; returns the frame's length.
pub(super) fn encode_into<E: Serialize>(
    record: &Record<E>,
    out: &mut Vec<u8>,
) -> Result<usize, std::io::Error> {
    let at = out.len();
    out.extend_from_slice(&[0; HEADER]);
    let encoded = codec::encode_into(record, out);
    let body_len = out.len() - at - HEADER;
    let len = u32::try_from(body_len)
        .ok()
        .filter(|l| *l as usize <= MAX_BODY);
    let (Ok(()), Some(len)) = (encoded, len) else {
        out.truncate(at);
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("log record of {body_len} bytes does not encode or is over the limit"),
        ));
    };
    let sum = crc(len, &out[at + HEADER..]);
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
    out[at + 4..at + HEADER].copy_from_slice(&sum.to_le_bytes());
    Ok(HEADER + body_len)
}

/// What the bytes at some offset of a segment hold.
#[derive(Debug, PartialEq)]
pub(super) enum Read {
    /// A whole record, and its frame's length.
    Record(Record, usize),
    /// Zeros: nothing was written here.
    End,
    /// Not a whole record: a write torn by a crash, or damage. Says what is wrong.
    Torn(String),
}

/// Reads the frame at the start of `bytes` (the rest of a segment).
pub(super) fn read(bytes: &[u8]) -> Read {
    if bytes.len() < HEADER {
        return if bytes.iter().all(|b| *b == 0) {
            Read::End
        } else {
            Read::Torn(format!("{} bytes left, less than a header", bytes.len()))
        };
    }
    let len = u32::from_le_bytes(bytes[0..4].try_into().unwrap_or_default());
    let sum = u32::from_le_bytes(bytes[4..8].try_into().unwrap_or_default());
    if len == 0 && sum == 0 {
        return Read::End;
    }
    let body_len = len as usize;
    if body_len > MAX_BODY || body_len > bytes.len() - HEADER {
        return Read::Torn(format!(
            "record of {body_len} bytes, {} left in the segment",
            bytes.len() - HEADER
        ));
    }
    let body = &bytes[HEADER..HEADER + body_len];
    if crc(len, body) != sum {
        return Read::Torn(format!("record of {body_len} bytes fails its CRC"));
    }
    match codec::decode(body) {
        Ok(record) => Read::Record(record, HEADER + body_len),
        // The CRC matched, so these are the bytes that were written: not a torn write.
        Err(e) => Read::Torn(format!("record passes its CRC but does not decode: {e}")),
    }
}

fn crc(len: u32, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len.to_le_bytes());
    h.update(body);
    h.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::LogCommand;
    use openraft::entry::RaftEntry;
    use openraft::impls::leader_id_adv::LeaderId;

    fn entry(index: u64) -> Entry {
        let command = LogCommand {
            stamped_ms: 7,
            command: vec![1; 40],
        };
        Entry::new_normal(
            LogId::new(
                LeaderId {
                    term: 2,
                    node_id: 1,
                },
                index,
            ),
            command,
        )
    }

    fn framed(r: &Record<&Entry>) -> Vec<u8> {
        let mut out = Vec::new();
        let n = encode_into(r, &mut out).unwrap();
        assert_eq!(n, out.len());
        out
    }

    #[test]
    fn a_record_written_by_reference_reads_back_owned() {
        let e = entry(5);
        let mut bytes = framed(&Record::Entry(&e));
        let n = bytes.len();
        bytes.extend_from_slice(&[0; 64]);
        assert_eq!(read(&bytes), Read::Record(Record::Entry(e), n));
        assert_eq!(read(&bytes[n..]), Read::End);
        assert_eq!(read(&[]), Read::End);
    }

    #[test]
    fn torn_or_damaged_frames_are_never_records() {
        let e = entry(9);
        let whole = framed(&Record::Entry(&e));
        let torn = |bytes: &[u8]| matches!(read(bytes), Read::Torn(_));
        // Cut anywhere inside the frame (the rest of the segment not yet written).
        for cut in 1..whole.len() {
            let mut b = whole[..cut].to_vec();
            b.resize(whole.len() + 16, 0);
            assert!(torn(&b), "cut at {cut}");
        }
        // One bit flipped anywhere.
        for i in 0..whole.len() {
            let mut b = whole.clone();
            b[i] ^= 0x10;
            assert!(!matches!(read(&b), Read::Record(..)), "flip at {i}");
        }
        // A length beyond the limit, and a header cut short.
        let mut b = whole.clone();
        b[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(torn(&b));
        assert!(torn(&[1, 0, 0]));
    }

    #[test]
    fn every_kind_reads_back() {
        let id = entry(3).log_id();
        let vote = Vote::new(4, 2);
        let records: Vec<Record<&Entry>> = vec![
            Record::Start(Start {
                seq: 3,
                state: State {
                    vote: Some(vote),
                    committed: Some(id),
                    last_purged: None,
                },
            }),
            Record::Truncate(11),
            Record::Purge(id),
            Record::Vote(vote),
            Record::Committed(None),
        ];
        for r in records {
            let bytes = framed(&r);
            let want = codec::decode::<Record>(&codec::encode(&r).unwrap()).unwrap();
            assert_eq!(read(&bytes), Read::Record(want, bytes.len()));
        }
    }
}
