//! The Raft log's tail in memory, in front of its segment files: every entry appended and not yet
//! written there, and the most recent written ones.
//!
//! An append puts its entries here and returns; the fsync thread writes them to the current segment
//! (one durable write per group commit) and marks them written. Readers (replication,
//! the state machine's apply) find an entry here or, if it is not here, in its segment: only
//! written entries ever leave the tail, oldest first, once it holds more of them than its [`Keep`]
//! allows (by count and by encoded bytes, so a run of large entries cannot hold much memory). An entry is marked written only if
//! the tail still holds that same entry (same log id): a truncation and a new append at the same
//! index between the write and the mark leave the new entry unwritten.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::ops::RangeBounds;

use openraft::entry::RaftEntry;

use crate::types::Entry;
use crate::types::LogId;

/// How much of the written log the tail keeps (the unwritten entries are always kept).
#[derive(Clone, Copy, Debug)]
pub(super) struct Keep {
    /// At most this many written entries...
    pub entries: usize,
    /// ...of at most this many encoded bytes together.
    pub bytes: usize,
}

/// One entry of the tail, and its record's size once written.
struct Slot {
    entry: Entry,
    written: Option<usize>,
}

/// The tail: entries by index.
pub(super) struct Tail {
    slots: BTreeMap<u64, Slot>,
    /// The encoded bytes of the written entries held.
    written_bytes: usize,
    keep: Keep,
}

impl Tail {
    pub(super) fn new(keep: Keep) -> Self {
        Tail {
            slots: BTreeMap::new(),
            written_bytes: 0,
            keep,
        }
    }

    /// Holds `entry`, not yet written (replacing an entry at the same index, as a put would).
    pub(super) fn push(&mut self, entry: Entry) {
        let slot = Slot {
            entry,
            written: None,
        };
        if let Some(old) = self.slots.insert(slot.entry.index(), slot) {
            self.forget(&old);
        }
    }

    /// Takes a slot that left the tail off the written bytes.
    fn forget(&mut self, slot: &Slot) {
        self.written_bytes -= slot.written.unwrap_or(0);
    }

    /// Takes every slot of `gone` off the written bytes.
    fn forget_all(&mut self, gone: BTreeMap<u64, Slot>) {
        for slot in gone.values() {
            self.forget(slot);
        }
    }

    /// The log id of the last entry held.
    pub(super) fn last(&self) -> Option<LogId> {
        self.slots.values().next_back().map(|s| s.entry.log_id())
    }

    /// Drops every entry from index `from` on.
    pub(super) fn truncate_from(&mut self, from: u64) {
        let gone = self.slots.split_off(&from);
        self.forget_all(gone);
    }

    /// Drops every entry up to and including index `upto`.
    pub(super) fn purge_upto(&mut self, upto: u64) {
        let kept = self.slots.split_off(&upto.saturating_add(1));
        let gone = std::mem::replace(&mut self.slots, kept);
        self.forget_all(gone);
    }

    /// Marks these entries written, each with its encoded size (those the tail still holds as
    /// they were), then lets the oldest written ones go beyond what [`Keep`] allows.
    pub(super) fn written(&mut self, ids: impl IntoIterator<Item = (LogId, usize)>) {
        for (id, bytes) in ids {
            if let Some(slot) = self.slots.get_mut(&id.index()) {
                if slot.entry.log_id() == id && slot.written.is_none() {
                    slot.written = Some(bytes);
                    self.written_bytes += bytes;
                }
            }
        }
        while self.slots.len() > self.keep.entries || self.written_bytes > self.keep.bytes {
            match self.slots.first_entry() {
                Some(first) if first.get().written.is_some() => {
                    let slot = first.remove();
                    self.forget(&slot);
                }
                _ => break,
            }
        }
    }

    /// The entries of `range` held here, in order, and the index below which the rest of the
    /// range must be read from the segments (the range's start when the tail holds all of it).
    pub(super) fn read(&self, range: &impl RangeBounds<u64>) -> (Vec<Entry>, u64) {
        let Some(first) = self.slots.keys().next().copied() else {
            return (Vec::new(), u64::MAX);
        };
        let from = first_index(range).max(first);
        let held = self
            .slots
            .range(from..)
            .take_while(|(i, _)| range.contains(*i))
            .map(|(_, s)| s.entry.clone())
            .collect();
        (held, first)
    }
}

/// The first index of `range`.
pub(super) fn first_index(range: &impl RangeBounds<u64>) -> u64 {
    match range.start_bound() {
        Bound::Included(x) => *x,
        Bound::Excluded(x) => x.saturating_add(1),
        Bound::Unbounded => 0,
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use openraft::impls::leader_id_adv::LeaderId;

    fn entry(term: u64, index: u64) -> Entry {
        Entry::new_blank(LogId::new(LeaderId { term, node_id: 1 }, index))
    }

    fn keep(entries: usize) -> Keep {
        Keep {
            entries,
            bytes: usize::MAX,
        }
    }

    /// A tail keeping `keep` that holds entries 1..=n of term 1, none written.
    fn holding(keep: Keep, n: u64) -> Tail {
        let mut tail = Tail::new(keep);
        for i in 1..=n {
            tail.push(entry(1, i));
        }
        tail
    }

    /// Each entry written, at 10 bytes.
    fn written(entries: impl IntoIterator<Item = Entry>) -> Vec<(LogId, usize)> {
        entries.into_iter().map(|e| (e.log_id(), 10)).collect()
    }

    /// Each entry's (term, index), to compare a read with what was expected.
    pub(in crate::log_store) fn indexes(entries: &[Entry]) -> Vec<(u64, u64)> {
        entries
            .iter()
            .map(|e| (e.log_id().leader_id.term, e.index()))
            .collect()
    }

    #[test]
    fn unwritten_entries_stay_however_many_there_are() {
        let mut tail = holding(keep(2), 5);
        tail.written([]);
        let (held, below) = tail.read(&(1..6));
        assert_eq!(held.len(), 5);
        assert_eq!(below, 1);
        // Written, the oldest go beyond the bound; the rest of a range is then read from the segments.
        tail.written(written((1..=5).map(|i| entry(1, i))));
        let (held, below) = tail.read(&(1..6));
        assert_eq!(indexes(&held), [(1, 4), (1, 5)]);
        assert_eq!(below, 4);
    }

    #[test]
    fn large_entries_leave_sooner() {
        let mut tail = holding(
            Keep {
                entries: 100,
                bytes: 25,
            },
            5,
        );
        // 10 bytes each: two fit in 25. The bytes of entries that left are not counted again.
        tail.written(written((1..=3).map(|i| entry(1, i))));
        assert_eq!(
            indexes(&tail.read(&(..)).0),
            [(1, 2), (1, 3), (1, 4), (1, 5)]
        );
        tail.truncate_from(3);
        tail.push(entry(2, 3));
        tail.written(written([entry(2, 3), entry(1, 4)]));
        assert_eq!(indexes(&tail.read(&(..)).0), [(1, 2), (2, 3)]);
        tail.purge_upto(2);
        tail.written(written([entry(2, 3)]));
        assert_eq!(tail.written_bytes, 10);
    }

    #[test]
    fn an_entry_replaced_after_its_write_began_is_not_marked_written() {
        let mut tail = holding(keep(0), 3);
        // The fsync thread wrote term 1's entries 1..=3 while a new leader's entry 3 replaced
        // the old one: only 1 and 2 are written, and only they may go.
        tail.truncate_from(3);
        tail.push(entry(2, 3));
        tail.written(written((1..=3).map(|i| entry(1, i))));
        let (held, below) = tail.read(&(1..=3));
        assert_eq!(indexes(&held), [(2, 3)]);
        assert_eq!(below, 3);
    }

    #[test]
    fn truncation_and_purge_cut_both_ends() {
        let mut tail = holding(keep(100), 10);
        tail.truncate_from(8);
        tail.purge_upto(3);
        assert_eq!(tail.last().map(|l| l.index()), Some(7));
        let (held, below) = tail.read(&(..));
        assert_eq!(indexes(&held), [(1, 4), (1, 5), (1, 6), (1, 7)]);
        assert_eq!(below, 4);
        let (held, _) = tail.read(&(5..7));
        assert_eq!(indexes(&held), [(1, 5), (1, 6)]);
        tail.purge_upto(7);
        assert_eq!(tail.last(), None);
        let (held, below) = tail.read(&(..));
        assert!(held.is_empty());
        assert_eq!(below, u64::MAX);
    }
}
