//! [`JobArchive`]: finished jobs after they left the replicated state (retention, see
//! `gangway_core::state::retention`), kept by each replica in its own RocksDB under
//! `<data_dir>/archive`, so `gangway jobs --all` and `gangway job status` still answer for them and
//! usage accounting can read them later.
//!
//! The archive is written as the replica applies each `PruneHistory` command (the record comes
//! with the command's `Event::Archived`), so every replica that applied the command holds the
//! same records. It is not replicated state: a replica rebuilt from a snapshot holds only what it
//! archived itself after the snapshot; records pruned before it are on the other replicas (and in
//! backups taken before the prune). Keys are job ids, values the record as JSON.

use crate::state::JobRecord;
use gangway_proto::ids::JobId;
use rocksdb::{Direction, IteratorMode, Options, DB};
use std::path::Path;
use std::sync::Arc;

/// Why the archive failed.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("job archive at {path}: {source}")]
    Open {
        path: String,
        source: rocksdb::Error,
    },
    #[error("job archive: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("job archive: record of job {job} is unreadable: {source}")]
    Corrupt {
        job: String,
        source: serde_json::Error,
    },
}

/// A replica's archive of finished jobs.
pub struct JobArchive {
    db: DB,
}

impl JobArchive {
    /// Opens (creating) the archive in `dir`.
    pub fn open(dir: &Path) -> Result<Self, ArchiveError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        let db = DB::open(&opts, dir).map_err(|source| ArchiveError::Open {
            path: dir.display().to_string(),
            source,
        })?;
        Ok(Self { db })
    }

    /// Keeps `job` (a later record of the same job replaces it).
    pub fn put(&self, job: &JobRecord) -> Result<(), ArchiveError> {
        let value = serde_json::to_vec(job).map_err(|source| ArchiveError::Corrupt {
            job: job.id.to_string(),
            source,
        })?;
        self.db.put(job.id.as_str().as_bytes(), value)?;
        Ok(())
    }

    pub fn get(&self, id: &JobId) -> Result<Option<JobRecord>, ArchiveError> {
        let Some(bytes) = self.db.get(id.as_str().as_bytes())? else {
            return Ok(None);
        };
        decode(id.as_str(), &bytes).map(Some)
    }

    /// Up to `limit` archived jobs in id order, starting after `after` (a page).
    pub fn page(
        &self,
        after: Option<&JobId>,
        limit: usize,
    ) -> Result<Vec<JobRecord>, ArchiveError> {
        let mode = match after {
            Some(a) => IteratorMode::From(a.as_str().as_bytes(), Direction::Forward),
            None => IteratorMode::Start,
        };
        let mut out = Vec::new();
        for item in self.db.iterator(mode) {
            let (key, value) = item?;
            if after.is_some_and(|a| a.as_str().as_bytes() == &*key) {
                continue;
            }
            out.push(decode(&String::from_utf8_lossy(&key), &value)?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }
}

fn decode(job: &str, bytes: &[u8]) -> Result<JobRecord, ArchiveError> {
    serde_json::from_slice(bytes).map_err(|source| ArchiveError::Corrupt {
        job: job.to_owned(),
        source,
    })
}

/// The archive as the state machine holds it: none in tests and tools, the replica's own when it
/// serves. Not part of the replicated state (never compared, never serialized).
#[derive(Clone, Default)]
pub struct ArchiveSink(pub Option<Arc<JobArchive>>);

impl ArchiveSink {
    /// Keeps a job leaving the state. A failed write is logged and counted, never fails the
    /// apply (the replicated state must not depend on one replica's disk).
    pub fn keep(&self, job: &JobRecord) {
        let Some(archive) = &self.0 else {
            return;
        };
        if let Err(e) = archive.put(job) {
            metrics::counter!("gangway_archive_write_errors_total").increment(1);
            tracing::error!(job = %job.id, error = %e, "could not archive a finished job; its record is lost on this replica");
        } else {
            metrics::counter!("gangway_jobs_archived_total").increment(1);
        }
    }
}

impl std::fmt::Debug for ArchiveSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "ArchiveSink(open)"
        } else {
            "ArchiveSink(none)"
        })
    }
}

impl PartialEq for ArchiveSink {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for ArchiveSink {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{ClusterStore, Command, Event, Submission};
    use gangway_proto::spec::JobSpec;

    fn finished_job(name: &str) -> JobRecord {
        let mut store = ClusterStore::new();
        let spec = JobSpec::from_toml_str(&format!(
            "name = \"{name}\"\ncommand = [\"true\"]\n[resources]\ndevices = 0\n"
        ))
        .unwrap();
        let mut events: Vec<Event> = Vec::new();
        store.apply(
            1,
            Command::SubmitJob(Submission {
                owner: String::new(),
                idempotency_key: None,
                spec,
            }),
            &mut events,
        );
        store.jobs().values().next().unwrap().clone()
    }

    #[test]
    fn archived_jobs_read_back_by_id_and_in_pages() {
        let dir = tempfile::tempdir().unwrap();
        let archive = JobArchive::open(dir.path()).unwrap();
        let jobs: Vec<JobRecord> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|n| finished_job(n))
            .collect();
        for j in &jobs {
            archive.put(j).unwrap();
        }
        assert_eq!(archive.get(&jobs[2].id).unwrap().as_ref(), Some(&jobs[2]));
        assert_eq!(archive.get(&JobId::new("nope")).unwrap(), None);
        let first = archive.page(None, 2).unwrap();
        assert_eq!(first.len(), 2);
        let second = archive.page(Some(&first[1].id), 2).unwrap();
        let third = archive.page(Some(&second[1].id), 2).unwrap();
        let ids: Vec<String> = [first, second, third]
            .concat()
            .iter()
            .map(|j| j.id.to_string())
            .collect();
        let mut want: Vec<String> = jobs.iter().map(|j| j.id.to_string()).collect();
        want.sort();
        assert_eq!(ids, want);
        // Survives a reopen (a replica restart).
        drop(archive);
        let again = JobArchive::open(dir.path()).unwrap();
        assert_eq!(again.page(None, 10).unwrap().len(), 5);
    }
}
