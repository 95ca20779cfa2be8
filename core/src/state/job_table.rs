//! [`JobTable`]: every job the state remembers, with the indexes the hot paths read.
//!
//! A scheduling round needs the pending gangs in queue order, the gangs migrating and the running
//! leases; scanning every job ever submitted for them costs what history costs, not what is live.
//! The table keeps those sets as jobs change: every change goes through [`JobTable::get_mut`],
//! which notes the job, and `ClusterStore::apply` re-files the noted jobs after each command, so
//! no apply function can forget an index.
//! The indexes are derived data: a snapshot holds the jobs only and rebuilds them on load, so a
//! replica built from a snapshot and one that replayed the log have equal tables.

use super::command::Rejection;
use super::job_record::{JobRecord, JobState};
use crate::engine::{GangRequest, PendingReason};
use gangway_proto::ids::{HostName, JobId};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::{BTreeMap, BTreeSet};

/// Where a job stands in the queue: its order key (submission, or its reclaim for a job given
/// back idle), then its id.
pub type QueueKey = (u64, JobId);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobTable {
    jobs: BTreeMap<JobId, JobRecord>,
    /// Pending jobs in queue order, and each pending job's key in it.
    pending: BTreeSet<QueueKey>,
    pending_key: BTreeMap<JobId, u64>,
    /// The queue as a round reads it, in queue order: each pending job's gang and its current
    /// reason, side by side, so a round borrows them instead of building them per round.
    queue: PendingQueue,
    /// Jobs holding a lease.
    running: BTreeSet<JobId>,
    /// Jobs with a migration waiting for its checkpoint.
    migrating: BTreeSet<JobId>,
    /// Leases by node: the jobs with a task on each host, and the hosts each job is filed under.
    by_node: BTreeMap<HostName, BTreeSet<JobId>>,
    nodes_of: BTreeMap<JobId, Vec<HostName>>,
    /// Finished jobs by the log time they finished (retention takes the oldest first).
    finished: BTreeSet<(u64, JobId)>,
    finished_at: BTreeMap<JobId, u64>,
    /// How many jobs are in each state, and how many wait in each queue.
    by_state: BTreeMap<JobState, usize>,
    state_of: BTreeMap<JobId, JobState>,
    pending_in: BTreeMap<String, usize>,
    pending_queue_of: BTreeMap<JobId, String>,
    /// Jobs lent out by `get_mut` since the last `reindex`.
    dirty: BTreeSet<JobId>,
}

impl JobTable {
    pub fn map(&self) -> &BTreeMap<JobId, JobRecord> {
        &self.jobs
    }

    pub fn get(&self, id: &JobId) -> Option<&JobRecord> {
        self.jobs.get(id)
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    pub fn values(&self) -> impl Iterator<Item = &JobRecord> {
        self.jobs.values()
    }

    /// Adds a new job (an id is never reused).
    pub fn insert(&mut self, job: JobRecord) {
        let id = job.id.clone();
        self.jobs.insert(id.clone(), job);
        self.refile(&id);
    }

    /// The job, for a change. Its indexes follow at the next [`JobTable::reindex`], which
    /// `ClusterStore::apply` runs after every command.
    pub fn get_mut(&mut self, id: &JobId) -> Option<&mut JobRecord> {
        let job = self.jobs.get_mut(id)?;
        self.dirty.insert(id.clone());
        Some(job)
    }

    /// The job holding lease `epoch`, for a report or plan made under it; else why not (an unknown
    /// job, or a stale epoch).
    pub fn leased(&self, id: &JobId, epoch: u64) -> Result<&JobRecord, Rejection> {
        let job = self
            .jobs
            .get(id)
            .ok_or_else(|| Rejection::UnknownJob(id.clone()))?;
        job.stale_lease(epoch).map_or(Ok(job), Err)
    }

    /// [`JobTable::leased`], for a change.
    pub fn leased_mut(&mut self, id: &JobId, epoch: u64) -> Result<&mut JobRecord, Rejection> {
        self.checked_mut(id, |job| job.stale_lease(epoch))
    }

    /// The job, for a change, unless `refuse` says why not (an unknown job is refused too).
    pub fn checked_mut(
        &mut self,
        id: &JobId,
        refuse: impl FnOnce(&JobRecord) -> Option<Rejection>,
    ) -> Result<&mut JobRecord, Rejection> {
        let job = self
            .get(id)
            .ok_or_else(|| Rejection::UnknownJob(id.clone()))?;
        if let Some(refusal) = refuse(job) {
            return Err(refusal);
        }
        Ok(self.get_mut(id).expect("the job was just found"))
    }

    /// Files every job changed since the last call in the indexes. Many at once (a plan that
    /// placed a thousand gangs) update the queue in one pass instead of one shift each.
    pub fn reindex(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        if dirty.len() <= BULK_REFILE {
            for id in &dirty {
                self.refile(id);
            }
            return;
        }
        self.queue.remove_all(&dirty);
        let mut entries = Vec::new();
        for id in &dirty {
            self.refile_sets(id);
            if let Some(j) = self.jobs.get(id).filter(|j| j.state == JobState::Pending) {
                let key = (j.queue_order_ms(), id.clone());
                entries.push((key, j.gang_request(), j.pending_reason.clone()));
            }
        }
        self.queue.merge(entries);
    }

    /// Pending jobs in queue order (oldest first).
    pub fn pending(&self) -> impl Iterator<Item = &JobRecord> {
        debug_assert!(self.dirty.is_empty(), "index read before reindex");
        self.pending.iter().filter_map(|(_, id)| self.jobs.get(id))
    }

    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Jobs holding a lease, by id.
    pub fn running(&self) -> impl Iterator<Item = &JobRecord> {
        debug_assert!(self.dirty.is_empty(), "index read before reindex");
        self.running.iter().filter_map(|id| self.jobs.get(id))
    }

    pub fn running_count(&self) -> usize {
        self.running.len()
    }

    /// Jobs whose migration waits for its checkpoint, by id.
    pub fn migrating(&self) -> impl Iterator<Item = &JobRecord> {
        debug_assert!(self.dirty.is_empty(), "index read before reindex");
        self.migrating.iter().filter_map(|id| self.jobs.get(id))
    }

    /// The pending gangs in queue order, and beside each its current reason (`None`: none yet).
    pub fn queue(&self) -> (&[GangRequest], &[Option<PendingReason>]) {
        debug_assert!(self.dirty.is_empty(), "index read before reindex");
        (&self.queue.gangs, &self.queue.reasons)
    }

    fn refile(&mut self, id: &JobId) {
        let job = self.jobs.get(id);
        let new_key = job
            .filter(|j| j.state == JobState::Pending)
            .map(|j| (j.queue_order_ms(), id.clone()));
        let old_key = self.pending_key.get(id).map(|k| (*k, id.clone()));
        self.queue.refile(old_key.as_ref(), new_key.as_ref(), job);
        self.refile_sets(id);
    }

    /// Every index but the queue's vectors.
    fn refile_sets(&mut self, id: &JobId) {
        let job = self.jobs.get(id);
        if let Some(old) = self.pending_key.remove(id) {
            self.pending.remove(&(old, id.clone()));
        }
        if let Some(j) = job.filter(|j| j.state == JobState::Pending) {
            let key = j.queue_order_ms();
            self.pending_key.insert(id.clone(), key);
            self.pending.insert((key, id.clone()));
        }
        set_membership(
            &mut self.running,
            id,
            job.is_some_and(|j| j.lease.is_some()),
        );
        set_membership(
            &mut self.migrating,
            id,
            job.is_some_and(|j| j.migration.is_some()),
        );
        self.refile_lookups(id);
    }

    /// Files `id` under the hosts its lease holds, its finish time and its state.
    fn refile_lookups(&mut self, id: &JobId) {
        let job = self.jobs.get(id);
        let hosts: Vec<HostName> = job
            .and_then(|j| j.lease.as_ref())
            .map(|l| {
                let set: BTreeSet<HostName> = l.hosts().cloned().collect();
                set.into_iter().collect()
            })
            .unwrap_or_default();
        for h in self.nodes_of.remove(id).unwrap_or_default() {
            if let Some(jobs) = self.by_node.get_mut(&h) {
                jobs.remove(id);
                if jobs.is_empty() {
                    self.by_node.remove(&h);
                }
            }
        }
        for h in &hosts {
            self.by_node
                .entry(h.clone())
                .or_default()
                .insert(id.clone());
        }
        if !hosts.is_empty() {
            self.nodes_of.insert(id.clone(), hosts);
        }
        if let Some(at) = self.finished_at.remove(id) {
            self.finished.remove(&(at, id.clone()));
        }
        if let Some(at) = job
            .filter(|j| j.state.is_terminal())
            .and_then(|j| j.finished_at_ms)
        {
            self.finished_at.insert(id.clone(), at);
            self.finished.insert((at, id.clone()));
        }
        let old = self.state_of.remove(id);
        let old_queue = old.filter(|s| *s == JobState::Pending);
        if let Some(s) = old {
            count(&mut self.by_state, s, false);
        }
        if let (Some(_), Some(q)) = (old_queue, self.pending_queue_of.remove(id)) {
            count(&mut self.pending_in, q, false);
        }
        if let Some(j) = job {
            self.state_of.insert(id.clone(), j.state);
            count(&mut self.by_state, j.state, true);
            if j.state == JobState::Pending {
                self.pending_queue_of
                    .insert(id.clone(), j.spec.queue.clone());
                count(&mut self.pending_in, j.spec.queue.clone(), true);
            }
        }
    }

    /// The jobs holding a lease with a task on `node`, by id: what its allocations are made of.
    pub fn on_node(&self, node: &HostName) -> impl Iterator<Item = &JobRecord> {
        debug_assert!(self.dirty.is_empty(), "index read before reindex");
        self.by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|id| self.jobs.get(id))
    }

    /// Finished jobs, the longest finished first, with the log time each finished.
    pub fn finished_oldest_first(&self) -> impl Iterator<Item = (u64, &JobId)> {
        self.finished.iter().map(|(at, id)| (*at, id))
    }

    pub fn finished_count(&self) -> usize {
        self.finished.len()
    }

    /// How many jobs are in `state`.
    pub fn count_in(&self, state: JobState) -> usize {
        self.by_state.get(&state).copied().unwrap_or(0)
    }

    /// Pending jobs per queue (queues with none left out).
    pub fn pending_by_queue(&self) -> impl Iterator<Item = (&str, usize)> {
        self.pending_in.iter().map(|(q, n)| (q.as_str(), *n))
    }

    /// How many jobs wait in `queue`.
    pub fn pending_in(&self, queue: &str) -> usize {
        self.pending_in.get(queue).copied().unwrap_or(0)
    }

    /// Removes a finished job from the table (retention); the record, for the archive.
    pub fn remove_finished(&mut self, id: &JobId) -> Option<JobRecord> {
        if !self.jobs.get(id)?.state.is_terminal() {
            return None;
        }
        let job = self.jobs.remove(id);
        self.dirty.remove(id);
        self.refile(id);
        job
    }

    /// Whether the indexes are exactly what the records say (tests and debug checks).
    pub fn indexes_consistent(&self) -> bool {
        let mut rebuilt = JobTable::default();
        for job in self.jobs.values() {
            rebuilt.insert(job.clone());
        }
        rebuilt == *self
    }
}

/// Above this many jobs changed by one command, [`JobTable::reindex`] rebuilds the queue's
/// vectors in one pass.
const BULK_REFILE: usize = 32;

/// Pending gangs and their reasons in queue order (parallel vectors, sorted by `keys`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct PendingQueue {
    keys: Vec<QueueKey>,
    gangs: Vec<GangRequest>,
    reasons: Vec<Option<PendingReason>>,
}

impl PendingQueue {
    /// Takes out every entry of `ids`, in one pass.
    fn remove_all(&mut self, ids: &BTreeSet<JobId>) {
        let keep: Vec<bool> = self.keys.iter().map(|(_, id)| !ids.contains(id)).collect();
        let mut i = 0;
        self.keys.retain(|_| (keep[i], i += 1).0);
        i = 0;
        self.gangs.retain(|_| (keep[i], i += 1).0);
        i = 0;
        self.reasons.retain(|_| (keep[i], i += 1).0);
    }

    /// Merges `entries` (any order) into the queue, in one pass.
    fn merge(&mut self, mut entries: Vec<(QueueKey, GangRequest, Option<PendingReason>)>) {
        if entries.is_empty() {
            return;
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let n = self.keys.len() + entries.len();
        let mut keys = Vec::with_capacity(n);
        let mut gangs = Vec::with_capacity(n);
        let mut reasons = Vec::with_capacity(n);
        let old = std::mem::take(self);
        let mut old = old
            .keys
            .into_iter()
            .zip(old.gangs)
            .zip(old.reasons)
            .map(|((k, g), r)| (k, g, r))
            .peekable();
        let mut new = entries.into_iter().peekable();
        loop {
            let take_old = match (old.peek(), new.peek()) {
                (Some(o), Some(n)) => o.0 <= n.0,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let (k, g, r) = if take_old { old.next() } else { new.next() }.expect("peeked");
            keys.push(k);
            gangs.push(g);
            reasons.push(r);
        }
        *self = PendingQueue {
            keys,
            gangs,
            reasons,
        };
    }

    /// Moves a job from `old` (its place, if it was pending) to `new` (if it is pending now);
    /// a job that keeps its place is updated where it stands.
    fn refile(&mut self, old: Option<&QueueKey>, new: Option<&QueueKey>, job: Option<&JobRecord>) {
        let entry = |j: &JobRecord| (j.gang_request(), j.pending_reason.clone());
        match (old, new, job) {
            (Some(o), Some(n), Some(j)) if o == n => {
                if let Ok(at) = self.keys.binary_search(o) {
                    (self.gangs[at], self.reasons[at]) = entry(j);
                }
                return;
            }
            _ => {}
        }
        if let Some(at) = old.and_then(|o| self.keys.binary_search(o).ok()) {
            self.keys.remove(at);
            self.gangs.remove(at);
            self.reasons.remove(at);
        }
        if let (Some(n), Some(j)) = (new, job) {
            let at = self.keys.binary_search(n).unwrap_or_else(|at| at);
            let (gang, reason) = entry(j);
            self.keys.insert(at, n.clone());
            self.gangs.insert(at, gang);
            self.reasons.insert(at, reason);
        }
    }
}

/// Adds one to (or takes one from) `key`'s count, dropping counts that reach zero.
fn count<K: Ord>(counts: &mut BTreeMap<K, usize>, key: K, add: bool) {
    if add {
        *counts.entry(key).or_default() += 1;
    } else if let std::collections::btree_map::Entry::Occupied(mut e) = counts.entry(key) {
        *e.get_mut() -= 1;
        if *e.get() == 0 {
            e.remove();
        }
    }
}

fn set_membership(set: &mut BTreeSet<JobId>, id: &JobId, member: bool) {
    if member {
        if !set.contains(id) {
            set.insert(id.clone());
        }
    } else {
        set.remove(id);
    }
}

impl Serialize for JobTable {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.jobs.serialize(s)
    }
}

impl<'de> Deserialize<'de> for JobTable {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let jobs = BTreeMap::<JobId, JobRecord>::deserialize(d)?;
        let mut table = JobTable::default();
        for (_, job) in jobs {
            table.insert(job);
        }
        Ok(table)
    }
}
