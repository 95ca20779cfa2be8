//! [`HeartbeatTracker`]: when the leader last heard from each worker, kept in the leader's memory only.
//!
//! Heartbeats are far too frequent to replicate. The price is that a new leader does not know when
//! workers last called in, so on every leadership change it starts every node's clock afresh: each
//! node gets one full TTL of grace before it can be declared down, and a failover never evicts
//! healthy work.

use gangway_proto::ids::HostName;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The utilization a worker reported for one device (what idle-lease detection reads). Device
/// health is not kept here: it is replicated state, reported through `ReportDeviceHealth`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSample {
    pub index: u32,
    pub utilization_pct: u32,
    pub memory_used_mib: u64,
}

#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    devices: Vec<DeviceSample>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The term the clocks were started for; a different term restarts them.
    term: Option<u64>,
    /// When this leadership began: the "last seen" of any node not heard from since.
    since: Option<Instant>,
    nodes: BTreeMap<HostName, Seen>,
}

#[derive(Debug, Default)]
pub struct HeartbeatTracker {
    inner: Mutex<Inner>,
}

impl HeartbeatTracker {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called when this replica leads in `term`. A new term forgets every clock: each node's grace
    /// period starts at `now`.
    pub fn lead(&self, term: u64, now: Instant) {
        let mut g = self.lock();
        if g.term != Some(term) {
            g.term = Some(term);
            g.since = Some(now);
            g.nodes.clear();
        }
    }

    /// Called when this replica stops leading: the next leadership starts from scratch.
    pub fn step_down(&self) {
        let mut g = self.lock();
        g.term = None;
        g.since = None;
        g.nodes.clear();
    }

    pub fn record(&self, node: &HostName, devices: Vec<DeviceSample>, now: Instant) {
        let mut g = self.lock();
        g.nodes.insert(node.clone(), Seen { at: now, devices });
    }

    /// How long since the node was last heard from (or since this leadership began, if not yet).
    /// `None` when this replica is not leading.
    pub fn silence(&self, node: &HostName, now: Instant) -> Option<Duration> {
        let g = self.lock();
        let since = g.since?;
        let last = g.nodes.get(node).map_or(since, |s| s.at.max(since));
        Some(now.saturating_duration_since(last))
    }

    /// Of `nodes`, those silent for longer than `ttl`. A node this leadership has not seen yet
    /// (registered through another replica, or known from before the election) starts its clock
    /// now: it always gets one full TTL to be heard from.
    pub fn expired<'a>(
        &self,
        nodes: impl IntoIterator<Item = &'a HostName>,
        ttl: Duration,
        now: Instant,
    ) -> Vec<HostName> {
        let mut g = self.lock();
        if g.since.is_none() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for node in nodes {
            let seen = g.nodes.entry(node.clone()).or_insert_with(|| Seen {
                at: now,
                devices: Vec::new(),
            });
            if now.saturating_duration_since(seen.at) > ttl {
                out.push(node.clone());
            }
        }
        out
    }

    /// The node's latest device samples if it reported within `max_age`, else `None`.
    pub fn fresh_devices(
        &self,
        node: &HostName,
        max_age: Duration,
        now: Instant,
    ) -> Option<Vec<DeviceSample>> {
        self.lock()
            .nodes
            .get(node)
            .filter(|s| now.saturating_duration_since(s.at) <= max_age)
            .map(|s| s.devices.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(n: &str) -> HostName {
        HostName::new(n)
    }

    #[test]
    fn a_new_leader_grants_every_node_one_ttl() {
        let t = HeartbeatTracker::new();
        let ttl = Duration::from_secs(10);
        let t0 = Instant::now();
        // Not leading: nothing is ever expired.
        assert!(t.expired([&host("a")], ttl, t0 + ttl * 5).is_empty());

        // Phase 1: lead in term 3; the loop looks at both nodes at once; "a" heartbeats, "b"
        // never does.
        t.lead(3, t0);
        assert!(t.expired([&host("a"), &host("b")], ttl, t0).is_empty());
        t.record(&host("a"), vec![], t0 + Duration::from_secs(8));
        let at = t0 + Duration::from_secs(11);
        assert_eq!(
            t.expired([&host("a"), &host("b")], ttl, at),
            vec![host("b")]
        );

        // A node first seen late (it registered through a follower) gets its TTL from then, not
        // from the start of the leadership.
        let late = t0 + Duration::from_secs(20);
        assert!(t.expired([&host("c")], ttl, late).is_empty());
        assert!(t.expired([&host("c")], ttl, late + ttl).is_empty());
        let after = late + ttl + Duration::from_millis(1);
        assert_eq!(t.expired([&host("c")], ttl, after), vec![host("c")]);

        // Phase 2: the same term again changes nothing (a loop calls lead() every tick).
        t.lead(3, at);
        assert_eq!(
            t.expired([&host("a"), &host("b")], ttl, at),
            vec![host("b")]
        );

        // Phase 3: leadership lost and regained in term 5: both nodes get a fresh TTL, even "a"
        // whose last heartbeat is now old.
        t.step_down();
        let t1 = t0 + Duration::from_secs(30);
        t.lead(5, t1);
        assert!(t.expired([&host("a"), &host("b")], ttl, t1).is_empty());
        assert!(t
            .expired([&host("a"), &host("b")], ttl, t1 + ttl)
            .is_empty());
        assert_eq!(
            t.expired(
                [&host("a"), &host("b")],
                ttl,
                t1 + ttl + Duration::from_millis(1)
            )
            .len(),
            2
        );
    }
}
