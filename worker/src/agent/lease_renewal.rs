//! When an answered heartbeat may move the lease deadline.
//!
//! An answer proves the scheduler hears this host; it does not prove the host knows what the
//! scheduler wants. A host whose allocation stream cannot be delivered (a set too large for one
//! message, a stream that keeps failing) would otherwise keep its tasks running for as long as
//! heartbeats get through, although the state may have revoked them and leased their devices
//! again. So each heartbeat reply carries the digest of the node's set as the state holds it
//! (see `gangway_proto::allocation::digest`), and the deadline moves only while the set this
//! agent applied is that one, or the previous reply's: a change gets one heartbeat to arrive on
//! the stream. A host that stays behind stops renewing; its shims stop its tasks by the deadline
//! (a lease TTL after the last renewal), the same guarantee as a host cut off from every replica.

/// What to do with one heartbeat reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// The applied set is current: move the deadline. `recovered`: the agent had said it was
    /// behind.
    Renew { recovered: bool },
    /// The reply carries no digest (a replica that predates it): move the deadline as before.
    /// `first`: the first such reply in a row.
    Unchecked { first: bool },
    /// The applied set is behind the state's: leave the deadline where it is. `warn`: say so now
    /// (once per run of such replies; at start, only if the first set is still missing after a
    /// few heartbeats, since the stream and the first heartbeat race).
    Withhold { warn: bool },
}

/// Replies in a row without a set applied since start before the agent says it has none.
const FIRST_SET_GRACE: u32 = 3;

/// The digests the decision needs.
#[derive(Debug, Default)]
pub struct RenewGate {
    /// The digest of the newest set this agent accepted.
    applied: Option<[u8; 32]>,
    /// The state's digest in the previous reply.
    previous: Option<Vec<u8>>,
    /// Replies in a row that withheld the renewal.
    behind: u32,
    /// The agent said it was behind and has not said it caught up.
    warned: bool,
    /// The previous reply carried no digest.
    unchecked: bool,
}

impl RenewGate {
    /// The agent accepted a set with this digest.
    pub fn applied(&mut self, digest: [u8; 32]) {
        self.applied = Some(digest);
    }

    /// Decides for a reply carrying the state's digest `current` (empty: none).
    pub fn on_reply(&mut self, current: &[u8]) -> Renewal {
        if current.is_empty() {
            let first = !self.unchecked;
            self.unchecked = true;
            return Renewal::Unchecked { first };
        }
        self.unchecked = false;
        let matches = |d: &[u8]| self.applied.is_some_and(|a| a[..] == *d);
        let current_enough = matches(current) || self.previous.as_deref().is_some_and(matches);
        self.previous = Some(current.to_vec());
        if current_enough {
            self.behind = 0;
            return Renewal::Renew {
                recovered: std::mem::take(&mut self.warned),
            };
        }
        self.behind += 1;
        let warn_at = if self.applied.is_some() {
            1
        } else {
            FIRST_SET_GRACE
        };
        let warn = self.behind == warn_at;
        self.warned |= warn;
        Renewal::Withhold { warn }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 32] = [1; 32];
    const B: [u8; 32] = [2; 32];
    const C: [u8; 32] = [3; 32];

    #[test]
    fn renews_only_while_the_applied_set_is_at_most_one_heartbeat_behind() {
        let mut gate = RenewGate::default();
        // Nothing applied yet: nothing to vouch for (said after a few replies, not at once).
        assert_eq!(gate.on_reply(&A), Renewal::Withhold { warn: false });
        gate.applied(A);
        assert_eq!(gate.on_reply(&A), Renewal::Renew { recovered: false });
        assert_eq!(gate.on_reply(&A), Renewal::Renew { recovered: false });
        // The state moved to B: one heartbeat's grace for the stream to bring it...
        assert_eq!(gate.on_reply(&B), Renewal::Renew { recovered: false });
        // ...and no more: the stream is not delivering.
        assert_eq!(gate.on_reply(&B), Renewal::Withhold { warn: true });
        assert_eq!(gate.on_reply(&C), Renewal::Withhold { warn: false });
        assert_eq!(gate.on_reply(&C), Renewal::Withhold { warn: false });
        // The stream delivers C: renewals resume.
        gate.applied(C);
        assert_eq!(gate.on_reply(&C), Renewal::Renew { recovered: true });
        // A set that arrived before the reply that names it is current too.
        gate.applied(A);
        assert_eq!(gate.on_reply(&C), Renewal::Withhold { warn: true });
        assert_eq!(gate.on_reply(&A), Renewal::Renew { recovered: true });
    }

    #[test]
    fn a_host_whose_first_set_never_arrives_says_so_after_a_few_heartbeats() {
        let mut gate = RenewGate::default();
        let replies: Vec<Renewal> = (0..5).map(|_| gate.on_reply(&B)).collect();
        let warnings = replies
            .iter()
            .filter(|r| **r == Renewal::Withhold { warn: true })
            .count();
        assert_eq!(warnings, 1, "{replies:?}");
        assert_eq!(replies[2], Renewal::Withhold { warn: true });
    }

    #[test]
    fn a_replica_without_digests_is_renewed_against_as_before() {
        let mut gate = RenewGate::default();
        assert_eq!(gate.on_reply(&[]), Renewal::Unchecked { first: true });
        assert_eq!(gate.on_reply(&[]), Renewal::Unchecked { first: false });
        gate.applied(A);
        assert_eq!(gate.on_reply(&A), Renewal::Renew { recovered: false });
        assert_eq!(gate.on_reply(&[]), Renewal::Unchecked { first: true });
    }
}
