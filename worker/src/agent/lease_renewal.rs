//! When an answered heartbeat may move the lease deadline.
//!
//! An answer proves the scheduler hears this host; it does not prove the host knows what the
//! scheduler wants. A host whose allocation stream cannot be delivered (a set too large for one
//! message, a stream that keeps failing) would otherwise keep its tasks running for as long as
//! heartbeats get through, although the state may have revoked them and leased their devices
//! again. So each heartbeat reply carries the digest of the node's set as the state holds it
//! (see `gangway_proto::allocation::digest`) and the revision it was read at. The deadline moves
//! while the set this agent applied is that one, or the previous reply's (a change gets one
//! heartbeat to arrive on the stream), or was read at that revision or later. Under churn (sets
//! changing every few milliseconds) the applied set is a little behind when the reply arrives:
//! the renewal is then held and taken as soon as the stream delivers a set of that revision,
//! counted from when the heartbeat was sent. A host that stays behind stops renewing; its shims
//! stop its tasks by the deadline (a lease TTL after the last renewal), the same guarantee as a
//! host cut off from every replica.

/// What to do with one heartbeat reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// The applied set is current: move the deadline. `recovered`: the agent had said it was
    /// behind.
    Renew { recovered: bool },
    /// The reply carries no digest (a replica that predates it): move the deadline as before.
    /// `first`: the first such reply in a row.
    Unchecked { first: bool },
    /// The applied set is a little behind the revision the reply was read at: the renewal is
    /// held until the stream delivers it ([`RenewGate::applied`] hands it back then).
    Deferred,
    /// The applied set is behind the state's: leave the deadline where it is. `warn`: say so now
    /// (once per run of such replies; at start, only if the first set is still missing after a
    /// few heartbeats, since the stream and the first heartbeat race).
    Withhold { warn: bool },
}

/// Replies in a row without a set applied since start before the agent says it has none.
const FIRST_SET_GRACE: u32 = 3;

/// What the decision needs. `G` is the renewal a held reply would grant (when its heartbeat
/// was sent, and the TTL).
#[derive(Debug)]
pub struct RenewGate<G> {
    /// The digest of the newest set this agent accepted.
    applied: Option<[u8; 32]>,
    /// The revision of the newest set this agent accepted.
    applied_revision: u64,
    /// The state's digest in the previous reply.
    previous: Option<Vec<u8>>,
    /// A renewal held until a set of this revision is applied.
    pending: Option<(u64, G)>,
    /// Replies in a row that withheld the renewal.
    behind: u32,
    /// The agent said it was behind and has not said it caught up.
    warned: bool,
    /// The previous reply carried no digest.
    unchecked: bool,
}

impl<G> Default for RenewGate<G> {
    fn default() -> Self {
        Self {
            applied: None,
            applied_revision: 0,
            previous: None,
            pending: None,
            behind: 0,
            warned: false,
            unchecked: false,
        }
    }
}

impl<G> RenewGate<G> {
    /// The agent accepted a set with this digest, read at `revision`: the held renewal, if the
    /// set is as new as its reply, to take now (and whether the agent had said it was behind).
    pub fn applied(&mut self, digest: [u8; 32], revision: u64) -> Option<(G, bool)> {
        self.applied = Some(digest);
        self.applied_revision = self.applied_revision.max(revision);
        let due = self
            .pending
            .as_ref()
            .is_some_and(|(at, _)| self.applied_revision >= *at);
        if !due {
            return None;
        }
        let (_, grant) = self.pending.take()?;
        self.behind = 0;
        Some((grant, std::mem::take(&mut self.warned)))
    }

    /// Decides for a reply carrying the state's digest `current` (empty: none), read at
    /// `revision` (0: not said), which would grant `grant`.
    pub fn on_reply(&mut self, current: &[u8], revision: u64, grant: G) -> Renewal {
        // A held renewal the stream did not deliver before this reply stays untaken.
        let missed = self.pending.take().is_some();
        if current.is_empty() {
            let first = !self.unchecked;
            self.unchecked = true;
            return Renewal::Unchecked { first };
        }
        self.unchecked = false;
        let matches = |d: &[u8]| self.applied.is_some_and(|a| a[..] == *d);
        let current_enough = matches(current)
            || self.previous.as_deref().is_some_and(matches)
            || (revision > 0 && self.applied_revision >= revision);
        self.previous = Some(current.to_vec());
        if current_enough {
            self.behind = 0;
            return Renewal::Renew {
                recovered: std::mem::take(&mut self.warned),
            };
        }
        if revision > 0 {
            self.pending = Some((revision, grant));
            if !missed && self.applied.is_some() {
                return Renewal::Deferred;
            }
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
        let mut gate = RenewGate::<()>::default();
        // Nothing applied yet: nothing to vouch for (said after a few replies, not at once).
        assert_eq!(gate.on_reply(&A, 0, ()), Renewal::Withhold { warn: false });
        gate.applied(A, 0);
        assert_eq!(
            gate.on_reply(&A, 0, ()),
            Renewal::Renew { recovered: false }
        );
        assert_eq!(
            gate.on_reply(&A, 0, ()),
            Renewal::Renew { recovered: false }
        );
        // The state moved to B: one heartbeat's grace for the stream to bring it...
        assert_eq!(
            gate.on_reply(&B, 0, ()),
            Renewal::Renew { recovered: false }
        );
        // ...and no more: the stream is not delivering.
        assert_eq!(gate.on_reply(&B, 0, ()), Renewal::Withhold { warn: true });
        assert_eq!(gate.on_reply(&C, 0, ()), Renewal::Withhold { warn: false });
        assert_eq!(gate.on_reply(&C, 0, ()), Renewal::Withhold { warn: false });
        // The stream delivers C: renewals resume.
        gate.applied(C, 0);
        assert_eq!(gate.on_reply(&C, 0, ()), Renewal::Renew { recovered: true });
        // A set that arrived before the reply that names it is current too.
        gate.applied(A, 0);
        assert_eq!(gate.on_reply(&C, 0, ()), Renewal::Withhold { warn: true });
        assert_eq!(gate.on_reply(&A, 0, ()), Renewal::Renew { recovered: true });
    }

    #[test]
    fn under_churn_a_renewal_waits_for_the_revision_its_reply_was_read_at() {
        let mut gate = RenewGate::<&str>::default();
        gate.applied(A, 10);
        // The set changed at revision 12 while the heartbeat was out: hold the renewal.
        assert_eq!(gate.on_reply(&B, 12, "hb1"), Renewal::Deferred);
        // The stream delivers revision 11 (not enough), then 13: the renewal is taken then.
        assert_eq!(gate.applied(C, 11), None);
        assert_eq!(gate.applied(B, 13), Some(("hb1", false)));
        // Already at or past the reply's revision: renew at once, whatever the set's content.
        gate.applied(C, 20);
        assert_eq!(
            gate.on_reply(&A, 19, "hb2"),
            Renewal::Renew { recovered: false }
        );
        // A held renewal the stream does not deliver before the next reply is not taken late,
        // and a host that stays behind is told so.
        assert_eq!(gate.on_reply(&B, 30, "hb3"), Renewal::Deferred);
        assert_eq!(
            gate.on_reply(&A, 31, "hb4"),
            Renewal::Withhold { warn: true }
        );
        assert_eq!(gate.applied(A, 30), None, "hb3 was dropped; hb4 needs 31");
        assert_eq!(gate.applied(A, 31), Some(("hb4", true)));
    }

    #[test]
    fn a_host_whose_first_set_never_arrives_says_so_after_a_few_heartbeats() {
        let mut gate = RenewGate::<()>::default();
        let replies: Vec<Renewal> = (0..5).map(|_| gate.on_reply(&B, 0, ())).collect();
        let warnings = replies
            .iter()
            .filter(|r| **r == Renewal::Withhold { warn: true })
            .count();
        assert_eq!(warnings, 1, "{replies:?}");
        assert_eq!(replies[2], Renewal::Withhold { warn: true });
    }

    #[test]
    fn a_replica_without_digests_is_renewed_against_as_before() {
        let mut gate = RenewGate::<()>::default();
        assert_eq!(
            gate.on_reply(&[], 0, ()),
            Renewal::Unchecked { first: true }
        );
        assert_eq!(
            gate.on_reply(&[], 0, ()),
            Renewal::Unchecked { first: false }
        );
        gate.applied(A, 0);
        assert_eq!(
            gate.on_reply(&A, 0, ()),
            Renewal::Renew { recovered: false }
        );
        assert_eq!(
            gate.on_reply(&[], 0, ()),
            Renewal::Unchecked { first: true }
        );
    }
}
