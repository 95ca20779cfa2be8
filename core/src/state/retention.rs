//! Bounded state: finished jobs and idempotency keys leave the replicated state after their
//! retention, and a queue takes no more pending jobs than its cap.
//!
//! The leader proposes what is due ([`ClusterStore::prune_due`], a batch at a time); the command
//! re-checks every entry at apply time against the entry's own log time, so every replica removes
//! the same records. Each removed job is handed to the replica's archive through
//! [`Event::Archived`] before it leaves (the archive is per replica, outside the replicated state).

use super::command::{Command, Event, Rejection, Response};
use super::store::ClusterStore;
use gangway_proto::ids::JobId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// What the replicated state keeps, and how much a queue may hold waiting. Replicated, set with
/// `Command::SetLimits`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// A finished job stays this long after it finished.
    pub finished_retention_ms: u64,
    /// At most this many finished jobs stay, whatever their age (the oldest leave first).
    pub max_finished: usize,
    /// An idempotency key is remembered this long after its submission: a retry inside the window
    /// returns the job it created, a retry after it creates a new job.
    pub idempotency_window_ms: u64,
    /// A submission to a queue with this many pending jobs is refused (`resource_exhausted`).
    pub max_pending_per_queue: usize,
    /// The audit trail keeps this many entries (the oldest leave first).
    #[serde(default = "default_max_audit_entries")]
    pub max_audit_entries: usize,
}

fn default_max_audit_entries() -> usize {
    super::audit::DEFAULT_MAX_AUDIT_ENTRIES
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            finished_retention_ms: 7 * 24 * 3600 * 1000,
            max_finished: 100_000,
            idempotency_window_ms: 24 * 3600 * 1000,
            max_pending_per_queue: 100_000,
            max_audit_entries: super::audit::DEFAULT_MAX_AUDIT_ENTRIES,
        }
    }
}

impl Limits {
    /// The first field that makes no sense, with what was expected.
    pub fn problem(&self) -> Option<String> {
        if self.finished_retention_ms == 0 {
            return Some("finished_retention must be positive".into());
        }
        if self.idempotency_window_ms == 0 {
            return Some("idempotency_window must be positive".into());
        }
        if self.max_pending_per_queue == 0 {
            return Some("max_pending_per_queue must be at least 1".into());
        }
        let most = super::audit::MAX_AUDIT_ENTRIES_LIMIT;
        if !(1..=most).contains(&self.max_audit_entries) {
            return Some(format!(
                "max_audit_entries must be from 1 to {most}, got {}",
                self.max_audit_entries
            ));
        }
        None
    }
}

/// When each idempotency key was submitted, also in submission order (derived on load: a
/// snapshot holds the key -> time map only).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyTimes {
    at: BTreeMap<String, u64>,
    by_time: BTreeSet<(u64, String)>,
}

impl KeyTimes {
    pub fn insert(&mut self, key: String, at: u64) {
        if let Some(old) = self.at.insert(key.clone(), at) {
            self.by_time.remove(&(old, key.clone()));
        }
        self.by_time.insert((at, key));
    }

    pub fn remove(&mut self, key: &str) {
        if let Some(at) = self.at.remove(key) {
            self.by_time.remove(&(at, key.to_owned()));
        }
    }

    pub fn get(&self, key: &str) -> Option<u64> {
        self.at.get(key).copied()
    }

    pub fn len(&self) -> usize {
        self.at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }

    /// Keys, the earliest submitted first.
    pub fn oldest_first(&self) -> impl Iterator<Item = (u64, &String)> {
        self.by_time.iter().map(|(at, k)| (*at, k))
    }
}

impl Serialize for KeyTimes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.at.serialize(s)
    }
}

impl<'de> Deserialize<'de> for KeyTimes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let at = BTreeMap::<String, u64>::deserialize(d)?;
        let by_time = at.iter().map(|(k, t)| (*t, k.clone())).collect();
        Ok(Self { at, by_time })
    }
}

/// What one prune command removes: finished jobs (ids) and idempotency keys.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prune {
    pub jobs: Vec<JobId>,
    pub keys: Vec<String>,
}

/// The most entries one prune command carries (commands stay small; the leader sends another).
pub const PRUNE_BATCH: usize = 1_000;

impl ClusterStore {
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The finished jobs and idempotency keys due to leave at log time `now_ms`, oldest first,
    /// at most [`PRUNE_BATCH`] of each; `None` when nothing is due.
    pub fn prune_due(&self, now_ms: u64) -> Option<Command> {
        let jobs: Vec<JobId> = self
            .jobs
            .finished_oldest_first()
            .enumerate()
            .take_while(|(i, (at, _))| self.job_due(now_ms, *at, *i))
            .take(PRUNE_BATCH)
            .map(|(_, (_, id))| id.clone())
            .collect();
        // Keys in the order they were submitted: this costs what is due, not what is held.
        let mut keys: Vec<String> = self
            .idempotency_at
            .oldest_first()
            .take_while(|(at, _)| self.key_due(now_ms, *at))
            .take(PRUNE_BATCH)
            .map(|(_, k)| k.clone())
            .collect();
        // Keys of older snapshots kept no time: dated by their job, found by a scan while any is
        // left (they all expire within one window).
        if self.idempotency.len() > self.idempotency_at.len() && keys.len() < PRUNE_BATCH {
            let undated = self
                .idempotency
                .keys()
                .filter(|k| self.idempotency_at.get(k).is_none())
                .filter(|k| self.key_due(now_ms, self.key_time(k)));
            keys.extend(undated.take(PRUNE_BATCH - keys.len()).cloned());
        }
        if jobs.is_empty() && keys.is_empty() {
            return None;
        }
        Some(Command::PruneHistory(Prune { jobs, keys }))
    }

    /// Whether the finished job that is `rank`-th oldest (finished at `at`) is due.
    fn job_due(&self, now: u64, at: u64, rank: usize) -> bool {
        let over_count = self.jobs.finished_count().saturating_sub(rank) > self.limits.max_finished;
        over_count || at.saturating_add(self.limits.finished_retention_ms) <= now
    }

    fn key_due(&self, now: u64, at: u64) -> bool {
        at.saturating_add(self.limits.idempotency_window_ms) <= now
    }

    pub(super) fn apply_prune(
        &mut self,
        now: u64,
        prune: Prune,
        events: &mut Vec<Event>,
    ) -> Response {
        for id in prune.jobs {
            // Re-checked here: the job is still finished and still due (its rank among the
            // finished is at least 0, so only age or the count can make it due).
            let Some(job) = self.jobs.get(&id) else {
                continue;
            };
            let Some(at) = job.finished_at_ms.filter(|_| job.state.is_terminal()) else {
                continue;
            };
            if !self.job_due(now, at, 0) {
                continue;
            }
            if let Some(record) = self.jobs.remove_finished(&id) {
                events.push(Event::Archived(Box::new(record)));
            }
        }
        for key in prune.keys {
            if self.idempotency.contains_key(&key) && self.key_due(now, self.key_time(&key)) {
                self.idempotency.remove(&key);
                self.idempotency_at.remove(&key);
            }
        }
        Response::Done
    }

    pub(super) fn apply_set_limits(&mut self, limits: Limits) -> Response {
        if let Some(problem) = limits.problem() {
            return Response::Rejected(Rejection::InvalidLimits(problem));
        }
        self.limits = limits;
        self.audit.trim(limits.max_audit_entries);
        Response::Done
    }

    /// When `key` was submitted (keys of older snapshots, which kept no time, are dated by their
    /// job's submission, or 0 once the job is gone).
    fn key_time(&self, key: &str) -> u64 {
        if let Some(at) = self.idempotency_at.get(key) {
            return at;
        }
        let job = self.idempotency.get(key).and_then(|j| self.jobs.get(j));
        job.map_or(0, |j| j.submitted_at_ms)
    }

    /// Remembers `key` as submitted at `at` for `job`.
    pub(super) fn remember_key(&mut self, key: String, job: JobId, at: u64) {
        self.idempotency_at.insert(key.clone(), at);
        self.idempotency.insert(key, job);
    }

    /// The refusal of a submission to `queue` when it is full.
    pub(super) fn refuse_full_queue(&self, queue: &str, adding: usize) -> Option<Rejection> {
        let pending = self.jobs.pending_in(queue);
        let limit = self.limits.max_pending_per_queue;
        (pending.saturating_add(adding) > limit).then(|| Rejection::QueueFull {
            queue: queue.to_owned(),
            pending,
            adding,
            limit,
        })
    }
}
