//! The discrete-event clock: a priority queue of timed events, deterministic under ties.
//!
//! Events at the same instant are delivered completions first, then checkpoints, device failures,
//! device repairs, arrivals (and resubmissions), then ticks, and within a kind in the order they
//! were pushed (a sequence number), so a replay never depends on heap internals.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// What happens at an instant. Job indices refer to the replay's job table; epochs and checkpoint
/// requests are the replicated state's, so an event about a lease that has since ended is refused
/// by the state machine itself (a stale epoch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Event {
    /// Every task of the gang running under lease `epoch` finishes.
    Completion { job: usize, epoch: u64 },
    /// The checkpoint answering `request` under lease `epoch` is written; it holds `step`
    /// milliseconds of the job's work.
    Checkpoint {
        job: usize,
        epoch: u64,
        request: u64,
        step: u64,
    },
    /// GPU `device` (an index into the replay's device list) fails (`--failures`).
    DeviceFailure { device: usize },
    /// GPU `device`, failed, is returned to service by an operator.
    DeviceRepaired { device: usize },
    /// A job is submitted.
    Arrival { job: usize },
    /// A person resubmits job `job`, failed with its device (`--failures` without repair).
    Resubmit { job: usize },
    /// A periodic scheduling round while gangs wait (time-dependent decisions: min-runtime, ageing).
    Tick,
}

impl Event {
    fn rank(&self) -> u8 {
        match self {
            Event::Completion { .. } => 0,
            Event::Checkpoint { .. } => 1,
            Event::DeviceFailure { .. } => 2,
            Event::DeviceRepaired { .. } => 3,
            Event::Arrival { .. } | Event::Resubmit { .. } => 4,
            Event::Tick => 5,
        }
    }
}

/// A min-heap of `(time_ms, kind rank, sequence)` keyed events.
#[derive(Debug, Default)]
pub struct EventQueue {
    heap: BinaryHeap<Reverse<(u64, u8, u64, Event)>>,
    seq: u64,
}

impl EventQueue {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, at_ms: u64, event: Event) {
        self.seq += 1;
        self.heap
            .push(Reverse((at_ms, event.rank(), self.seq, event)));
    }

    /// Time of the next event, if any.
    pub fn peek_time(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse((t, ..))| *t)
    }

    pub fn pop(&mut self) -> Option<(u64, Event)> {
        self.heap.pop().map(|Reverse((t, _, _, e))| (t, e))
    }

    /// Pops the next event if it happens exactly at `at_ms`.
    pub fn pop_at(&mut self, at_ms: u64) -> Option<Event> {
        if self.peek_time() == Some(at_ms) {
            self.pop().map(|(_, e)| e)
        } else {
            None
        }
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_by_time_then_kind_then_push_order() {
        let mut q = EventQueue::new();
        q.push(10, Event::Arrival { job: 1 });
        q.push(10, Event::Completion { job: 7, epoch: 0 });
        q.push(5, Event::Tick);
        q.push(10, Event::Arrival { job: 0 });
        assert_eq!(q.pop(), Some((5, Event::Tick)));
        assert_eq!(q.pop(), Some((10, Event::Completion { job: 7, epoch: 0 })));
        assert_eq!(q.pop(), Some((10, Event::Arrival { job: 1 })));
        assert_eq!(q.pop_at(11), None);
        assert_eq!(q.pop_at(10), Some(Event::Arrival { job: 0 }));
        assert!(q.is_empty());
    }
}
