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
use gangway_proto::ids::JobId;
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

    /// Files every job changed since the last call in the indexes.
    pub fn reindex(&mut self) {
        for id in std::mem::take(&mut self.dirty) {
            self.refile(&id);
        }
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

/// Pending gangs and their reasons in queue order (parallel vectors, sorted by `keys`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct PendingQueue {
    keys: Vec<QueueKey>,
    gangs: Vec<GangRequest>,
    reasons: Vec<Option<PendingReason>>,
}

impl PendingQueue {
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
