//! A plain snapshot of a replica's Raft metrics, free of openraft types, for dashboards, the
//! scheduler's status API and tests.

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use openraft::RaftMetrics;
use openraft::ServerState;

use crate::types::NodeId;
use crate::types::TypeConfig;

/// The replica's role in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Accepts writes and replicates them.
    Leader,
    /// A voter following a leader.
    Follower,
    /// A voter campaigning for leadership.
    Candidate,
    /// Receives the log but does not vote (not yet promoted, or removed).
    Learner,
    /// The Raft core has stopped.
    Shutdown,
}

/// Metrics of one replica at one moment.
#[derive(Debug, Clone)]
pub struct ReplicaMetrics {
    /// This replica.
    pub id: NodeId,
    /// Current Raft term.
    pub term: u64,
    /// Current role.
    pub role: Role,
    /// The leader this replica knows of.
    pub leader: Option<NodeId>,
    /// Index of the last entry in the local log.
    pub last_log_index: Option<u64>,
    /// Highest index known committed.
    pub committed_index: Option<u64>,
    /// Highest index applied to the state machine.
    pub applied_index: Option<u64>,
    /// Last index covered by the latest snapshot.
    pub snapshot_index: Option<u64>,
    /// Entries up to this index have been purged from the log.
    pub purged_index: Option<u64>,
    /// Voters of the effective membership.
    pub voters: BTreeSet<NodeId>,
    /// Learners of the effective membership.
    pub learners: BTreeSet<NodeId>,
    /// Every member (voter or learner) with its gRPC address.
    pub members: BTreeMap<NodeId, String>,
    /// Leader only: for every other member, how many entries it is behind the leader's log.
    pub replication_lag: BTreeMap<NodeId, u64>,
    /// Set once storage failed; the replica refuses writes from then on.
    pub storage_error: Option<String>,
}

impl ReplicaMetrics {
    pub(crate) fn from_raft(m: &RaftMetrics<TypeConfig>, storage_error: Option<String>) -> Self {
        let role = match m.state {
            ServerState::Leader => Role::Leader,
            ServerState::Follower => Role::Follower,
            ServerState::Candidate => Role::Candidate,
            ServerState::Learner => Role::Learner,
            ServerState::Shutdown => Role::Shutdown,
        };
        let last = m.last_log_index.unwrap_or(0);
        let replication_lag = m
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .filter(|(id, _)| **id != m.id)
                    .map(|(id, matched)| {
                        let matched = matched.as_ref().map(|l| l.index).unwrap_or(0);
                        (*id, last.saturating_sub(matched))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let membership = m.membership_config.membership();
        ReplicaMetrics {
            id: m.id,
            term: m.current_term,
            role,
            leader: m.current_leader,
            last_log_index: m.last_log_index,
            committed_index: m.local_committed.as_ref().map(|l| l.index),
            applied_index: m.last_applied.as_ref().map(|l| l.index),
            snapshot_index: m.snapshot.as_ref().map(|l| l.index),
            purged_index: m.purged.as_ref().map(|l| l.index),
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            members: membership
                .nodes()
                .map(|(id, node)| (*id, node.addr.clone()))
                .collect(),
            replication_lag,
            storage_error,
        }
    }
}
