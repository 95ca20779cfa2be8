//! Fault injection for the Raft transport, controlled from tests.
//!
//! Every RPC a replica sends (replication, votes, snapshots, forwarded writes) asks the injector
//! twice: before sending (`from -> to` link) and before accepting the reply (`to -> from` link).
//! That gives message-level semantics on top of real gRPC: a one-way partition `a -> b` drops a's
//! requests to b, and the replies to b's requests to a (b's request is still processed by a, as
//! with a real asymmetric network fault).

use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use crate::types::NodeId;

/// What to do with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver now.
    Deliver,
    /// Deliver after this delay.
    Delay(Duration),
    /// Lose the message.
    Drop,
}

#[derive(Default)]
struct State {
    /// Directed links that lose every message.
    blocked: HashSet<(NodeId, NodeId)>,
    /// Extra latency added to every message.
    delay: Duration,
    /// Probability of losing any single message, in [0, 1].
    drop_rate: f64,
    rng: u64,
    /// `(seen_by, of)`: until when `of`'s port still seems to accept `seen_by`'s connections.
    lingering: HashMap<(NodeId, NodeId), Instant>,
}

/// Shared, test-controlled network faults. Cheap to share behind an `Arc`.
#[derive(Default)]
pub struct FaultInjector {
    state: Mutex<State>,
}

impl FaultInjector {
    /// No faults; `seed` drives the random drops so a seeded test is as repeatable as the OS allows.
    pub fn new(seed: u64) -> Self {
        FaultInjector {
            state: Mutex::new(State {
                rng: seed | 1,
                ..State::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cut every link between the two groups, both directions.
    pub fn partition(&self, a: &[NodeId], b: &[NodeId]) {
        let mut s = self.lock();
        for &x in a {
            for &y in b {
                s.blocked.insert((x, y));
                s.blocked.insert((y, x));
            }
        }
    }

    /// Cut `node` off from every node in `others`, both directions.
    pub fn isolate(&self, node: NodeId, others: &[NodeId]) {
        self.partition(&[node], others)
    }

    /// Lose every message from `from` to `to` (but not the other way).
    pub fn block_one_way(&self, from: NodeId, to: NodeId) {
        self.lock().blocked.insert((from, to));
    }

    /// Add latency to every message.
    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// Lose each message with probability `p` (clamped to [0, 1]).
    pub fn set_drop_rate(&self, p: f64) {
        self.lock().drop_rate = p.clamp(0.0, 1.0);
    }

    /// For `for_` from now, `of`'s port still accepts `seen_by`'s connections whatever its process
    /// does: a dying process's listening socket can close after its connections do, and one
    /// survivor can see that while another already finds the port refusing.
    pub fn linger(&self, seen_by: NodeId, of: NodeId, for_: Duration) {
        self.lock()
            .lingering
            .insert((seen_by, of), Instant::now() + for_);
    }

    /// Whether `of`'s port still seems to accept `seen_by`'s connections (see [`Self::linger`]).
    pub fn lingers(&self, seen_by: NodeId, of: NodeId) -> bool {
        self.lock()
            .lingering
            .get(&(seen_by, of))
            .is_some_and(|until| Instant::now() < *until)
    }

    /// Remove every fault.
    pub fn heal(&self) {
        let mut s = self.lock();
        s.blocked.clear();
        s.lingering.clear();
        s.delay = Duration::ZERO;
        s.drop_rate = 0.0;
    }

    /// Whether the directed link `from -> to` is cut (no dice rolled, no delay): what a receiver
    /// asks about a message that arrived, so a replica whose own injector cuts it off from a peer
    /// also refuses that peer's requests (the peer's injector knows nothing of the cut).
    pub fn is_blocked(&self, from: NodeId, to: NodeId) -> bool {
        self.lock().blocked.contains(&(from, to))
    }

    /// Whether the link between `a` and `b` is cut in either direction (a partition proves
    /// nothing about whether a peer's process lives).
    pub fn is_cut(&self, a: NodeId, b: NodeId) -> bool {
        let g = self.lock();
        g.blocked.contains(&(a, b)) || g.blocked.contains(&(b, a))
    }

    /// Decide the fate of one message on the directed link `from -> to`.
    pub fn verdict(&self, from: NodeId, to: NodeId) -> Verdict {
        let mut s = self.lock();
        if s.blocked.contains(&(from, to)) {
            return Verdict::Drop;
        }
        if s.drop_rate > 0.0 {
            // splitmix64: tiny, good enough for fault dice, no dependency.
            s.rng = s.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s.rng;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 11) as f64 / (1u64 << 53) as f64;
            if u < s.drop_rate {
                return Verdict::Drop;
            }
        }
        if !s.delay.is_zero() {
            return Verdict::Delay(s.delay);
        }
        Verdict::Deliver
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_way_partition_is_directed_and_heal_clears() {
        let f = FaultInjector::new(7);
        f.block_one_way(1, 2);
        assert_eq!(f.verdict(1, 2), Verdict::Drop);
        assert_eq!(f.verdict(2, 1), Verdict::Deliver);
        f.partition(&[3], &[1, 2]);
        assert_eq!(f.verdict(2, 3), Verdict::Drop);
        assert_eq!(f.verdict(3, 1), Verdict::Drop);
        assert!(f.is_blocked(1, 2) && !f.is_blocked(2, 1));
        f.heal();
        assert_eq!(f.verdict(1, 2), Verdict::Deliver);
        assert!(!f.is_blocked(1, 2));
        f.set_drop_rate(1.0);
        assert_eq!(f.verdict(1, 2), Verdict::Drop);
    }
}
