//! The discrete-event clock: a priority queue of timed events, deterministic under ties.
//!
//! Events at the same instant are delivered completions first, then arrivals, then ticks, and within a
//! kind in the order they were pushed (a sequence number), so a replay never depends on heap internals.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// What happens at an instant. Job indices refer to the replay's job table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Event {
    /// A running gang finishes. `run` is the job's run generation: a completion scheduled before the
    /// job was preempted carries an older generation and is ignored.
    Completion { job: usize, run: u32 },
    /// A job is submitted.
    Arrival { job: usize },
    /// A periodic scheduling round while gangs wait (time-dependent decisions: min-runtime, ageing).
    Tick,
}

impl Event {
    fn rank(&self) -> u8 {
        match self {
            Event::Completion { .. } => 0,
            Event::Arrival { .. } => 1,
            Event::Tick => 2,
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
        q.push(10, Event::Completion { job: 7, run: 0 });
        q.push(5, Event::Tick);
        q.push(10, Event::Arrival { job: 0 });
        assert_eq!(q.pop(), Some((5, Event::Tick)));
        assert_eq!(q.pop(), Some((10, Event::Completion { job: 7, run: 0 })));
        assert_eq!(q.pop(), Some((10, Event::Arrival { job: 1 })));
        assert_eq!(q.pop_at(11), None);
        assert_eq!(q.pop_at(10), Some(Event::Arrival { job: 0 }));
        assert!(q.is_empty());
    }
}
