//! What the segments hold, in memory: every entry's log id and where its record lies, the vote,
//! the committed index and the purge point. Recovery builds it by replaying the records in order;
//! the fsync thread applies each group's records to it once they are on disk.

use std::collections::BTreeMap;
use std::ops::RangeBounds;

use serde::Deserialize;
use serde::Serialize;

use crate::types::LogId;
use crate::types::Vote;

/// Where a record lies: segment, byte offset, frame length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Loc {
    pub seq: u64,
    pub offset: u64,
    pub len: u32,
}

/// The log's state apart from its entries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct State {
    pub vote: Option<Vote>,
    pub committed: Option<LogId>,
    pub last_purged: Option<LogId>,
}

/// What a record does to the index (a [`super::record::Record`] without the entry's payload).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Effect {
    /// A segment began, with this state.
    Start(State),
    Entry(LogId),
    Truncate(u64),
    Purge(LogId),
    Vote(Vote),
    Committed(Option<LogId>),
}

/// Entries by index, the state, and per segment the highest entry index it records.
#[derive(Debug, Default)]
pub(super) struct Index {
    entries: BTreeMap<u64, (LogId, Loc)>,
    segments: BTreeMap<u64, Option<u64>>,
    pub state: State,
}

impl Index {
    /// Applies one record found at `at`.
    pub(super) fn apply(&mut self, effect: Effect, at: Loc) {
        let seg = self.segments.entry(at.seq).or_insert(None);
        match effect {
            Effect::Start(state) => {
                if let Some(p) = state.last_purged {
                    self.drop_upto(p.index);
                }
                self.state = state;
            }
            Effect::Entry(id) => {
                *seg = (*seg).max(Some(id.index));
                self.entries.insert(id.index, (id, at));
            }
            Effect::Truncate(from) => drop(self.entries.split_off(&from)),
            Effect::Purge(upto) => {
                self.drop_upto(upto.index);
                self.state.last_purged = Some(upto);
            }
            Effect::Vote(v) => self.state.vote = Some(v),
            Effect::Committed(c) => self.state.committed = c,
        }
    }

    fn drop_upto(&mut self, index: u64) {
        self.entries = self.entries.split_off(&index.saturating_add(1));
    }

    /// The last entry's log id.
    pub(super) fn last(&self) -> Option<LogId> {
        self.entries.values().next_back().map(|(id, _)| *id)
    }

    /// Where the entries of `range` below index `below` lie, in order.
    pub(super) fn locate(&self, range: &impl RangeBounds<u64>, below: u64) -> Vec<(u64, Loc)> {
        let start = super::super::tail::first_index(range);
        if start >= below {
            return Vec::new();
        }
        self.entries
            .range(start..below)
            .take_while(|(i, _)| range.contains(*i))
            .map(|(i, (_, loc))| (*i, *loc))
            .collect()
    }

    /// The oldest segments, other than `current`, that record no entry after the purge point:
    /// nothing in them is needed any more (the next segment's start record carries the state).
    pub(super) fn purgeable(&self, current: u64) -> Vec<u64> {
        let purged = self.state.last_purged.map(|p| p.index);
        self.segments
            .iter()
            .take_while(|(seq, max)| {
                **seq < current && max.is_none_or(|m| purged.is_some_and(|p| m <= p))
            })
            .map(|(seq, _)| *seq)
            .collect()
    }

    /// Forgets a segment that was deleted.
    pub(super) fn forget_segment(&mut self, seq: u64) {
        self.segments.remove(&seq);
    }

    /// Checks the entries make one run with no hole, starting right after the purge point if
    /// there is one: a hole means a segment file went missing or was damaged.
    pub(super) fn check_whole(&self) -> Result<(), String> {
        let mut want = self.state.last_purged.map(|p| p.index.checked_add(1));
        for i in self.entries.keys() {
            if let Some(w) = want {
                if w != Some(*i) {
                    let w = w.map_or("past the last index".into(), |w| w.to_string());
                    return Err(format!(
                        "the log has no entry {w} but has entry {i}: a segment is missing or damaged"
                    ));
                }
            }
            want = Some(i.checked_add(1));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::impls::leader_id_adv::LeaderId;

    fn id(term: u64, index: u64) -> LogId {
        LogId::new(LeaderId { term, node_id: 1 }, index)
    }

    fn at(seq: u64, offset: u64) -> Loc {
        Loc {
            seq,
            offset,
            len: 10,
        }
    }

    /// Entries 1..=n of term 1 in segment `seq`, one per 10 bytes.
    fn fill(ix: &mut Index, seq: u64, indexes: std::ops::RangeInclusive<u64>) {
        ix.apply(Effect::Start(ix.state.clone()), at(seq, 0));
        for i in indexes {
            ix.apply(Effect::Entry(id(1, i)), at(seq, i * 10));
        }
    }

    fn indexes(ix: &Index) -> Vec<u64> {
        ix.locate(&(..), u64::MAX).iter().map(|(i, _)| *i).collect()
    }

    #[test]
    fn replay_follows_truncations_and_purges_in_order() {
        let mut ix = Index::default();
        fill(&mut ix, 1, 1..=5);
        ix.apply(Effect::Truncate(4), at(1, 60));
        ix.apply(Effect::Entry(id(2, 4)), at(1, 70));
        ix.apply(Effect::Purge(id(1, 2)), at(1, 80));
        assert_eq!(indexes(&ix), [3, 4]);
        assert_eq!(ix.last(), Some(id(2, 4)));
        assert_eq!(ix.state.last_purged, Some(id(1, 2)));
        assert_eq!(ix.locate(&(3..), 4), [(3, at(1, 30))]);
        assert!(ix.check_whole().is_ok());
    }

    #[test]
    fn only_a_prefix_of_fully_purged_segments_other_than_the_current_one_may_go() {
        let mut ix = Index::default();
        fill(&mut ix, 1, 1..=10);
        fill(&mut ix, 2, 11..=20);
        fill(&mut ix, 3, 21..=25);
        assert!(ix.purgeable(3).is_empty());
        ix.apply(Effect::Purge(id(1, 15)), at(3, 500));
        assert_eq!(ix.purgeable(3), [1]);
        ix.apply(Effect::Purge(id(1, 25)), at(3, 510));
        assert_eq!(ix.purgeable(3), [1, 2]);
        ix.forget_segment(1);
        ix.forget_segment(2);
        assert!(ix.purgeable(3).is_empty());
    }

    #[test]
    fn a_hole_in_the_entries_is_found() {
        let mut ix = Index::default();
        fill(&mut ix, 1, 1..=3);
        fill(&mut ix, 3, 6..=7);
        let e = ix.check_whole().unwrap_err();
        assert!(e.contains("no entry 4 but has entry 6"), "{e}");
        // Entries must follow the purge point directly.
        let mut ix = Index::default();
        ix.apply(Effect::Purge(id(1, 4)), at(1, 0));
        fill(&mut ix, 1, 6..=7);
        assert!(ix.check_whole().unwrap_err().contains("no entry 5"));
    }
}
