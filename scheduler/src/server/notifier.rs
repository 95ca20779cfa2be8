//! [`AllocationNotifier`]: wakes only the allocation streams whose node changed.
//!
//! Every applied command publishes its events to one broadcast channel. With a thousand workers
//! each holding an allocation stream, letting every stream read that channel would wake a thousand
//! tasks per event; here one task reads it and bumps a per-node counter, so a lease wakes the
//! streams of the hosts it names and nothing else.

use super::context::ReplicaContext;
use crate::state::Event;
use gangway_consensus::StateChange;
use gangway_proto::ids::HostName;
use std::collections::BTreeMap;
use std::sync::Mutex;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;

#[derive(Debug)]
pub struct AllocationNotifier {
    nodes: Mutex<BTreeMap<HostName, watch::Sender<u64>>>,
    /// Bumped when every node may have changed (a snapshot replaced the state, or the reader fell
    /// behind the broadcast channel).
    all: watch::Sender<u64>,
    /// Whether this replica leads: streams end (and workers follow the new leader) when it turns
    /// false. One poller for all streams instead of a timer in each.
    leading: watch::Sender<bool>,
}

impl Default for AllocationNotifier {
    fn default() -> Self {
        Self {
            nodes: Mutex::new(BTreeMap::new()),
            all: watch::channel(0).0,
            leading: watch::channel(true).0,
        }
    }
}

/// How often leadership is polled for the streams.
const LEADERSHIP_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// What a stream waits on: its node's counter, the everyone counter, and leadership.
pub struct NodeSubscription {
    pub node: watch::Receiver<u64>,
    pub all: watch::Receiver<u64>,
    pub leading: watch::Receiver<bool>,
}

impl AllocationNotifier {
    /// Subscribes to `node`'s changes unless it already has `max` subscribers (`None`).
    pub fn try_subscribe(&self, node: &HostName, max: usize) -> Option<NodeSubscription> {
        let held = {
            let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
            nodes.get(node).map_or(0, |tx| tx.receiver_count())
        };
        (held < max).then(|| self.subscribe(node))
    }

    pub fn subscribe(&self, node: &HostName) -> NodeSubscription {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let rx = nodes
            .entry(node.clone())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        NodeSubscription {
            node: rx,
            all: self.all.subscribe(),
            leading: self.leading.subscribe(),
        }
    }

    fn bump(&self, node: &HostName) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = nodes.get(node) {
            if tx.receiver_count() == 0 {
                nodes.remove(node);
            } else {
                tx.send_modify(|v| *v += 1);
            }
        }
    }

    fn bump_all(&self) {
        self.all.send_modify(|v| *v += 1);
    }

    /// Reads the replica's event stream until it closes or the replica stops.
    pub async fn run(&self, ctx: ReplicaContext) {
        let mut changes = ctx.raft.subscribe();
        let mut stopping = ctx.stopping();
        let mut poll = tokio::time::interval(LEADERSHIP_POLL);
        loop {
            let change = tokio::select! {
                _ = stopping.changed() => return,
                _ = poll.tick() => {
                    let leads = ctx.raft.is_leader();
                    self.leading.send_if_modified(|l| std::mem::replace(l, leads) != leads);
                    continue;
                }
                c = changes.recv() => c,
            };
            match change {
                Ok(StateChange::Event {
                    event: Event::AllocationsChanged(node),
                    ..
                }) => self.bump(&node),
                Ok(StateChange::Event { .. }) => {}
                Ok(StateChange::SnapshotInstalled { .. }) | Err(RecvError::Lagged(_)) => {
                    self.bump_all()
                }
                Err(RecvError::Closed) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_holds_a_bounded_number_of_subscriptions() {
        let n = AllocationNotifier::default();
        let a = HostName::new("a");
        let held: Vec<_> = (0..3).map(|_| n.try_subscribe(&a, 3).unwrap()).collect();
        assert!(n.try_subscribe(&a, 3).is_none(), "the fourth is refused");
        assert!(
            n.try_subscribe(&HostName::new("b"), 3).is_some(),
            "per node"
        );
        drop(held);
        assert!(
            n.try_subscribe(&a, 3).is_some(),
            "closed streams free their place"
        );
    }

    #[test]
    fn only_the_named_node_is_woken() {
        let n = AllocationNotifier::default();
        let (a, b) = (HostName::new("a"), HostName::new("b"));
        let mut sa = n.subscribe(&a);
        let sb = n.subscribe(&b);
        n.bump(&a);
        assert!(sa.node.has_changed().unwrap());
        assert!(!sb.node.has_changed().unwrap());
        sa.node.mark_unchanged();
        n.bump_all();
        assert!(sa.all.has_changed().unwrap() && sb.all.has_changed().unwrap());
        // A node whose streams are gone is forgotten on its next change.
        drop(sb);
        n.bump(&b);
        assert!(!n.nodes.lock().unwrap().contains_key(&b));
    }
}
