//! Raft log stores: segment files for real replicas, memory for tests and simulations. Both
//! implement openraft's `RaftLogStorage` and pass its conformance suite (see the tests at the
//! bottom).

pub(crate) mod memory;
mod tail;
pub(crate) mod wal;

use std::sync::Arc;
use std::sync::Mutex;

pub use memory::MemLogStore;
pub use wal::WalLogStore;

use crate::error::ConsensusError;

/// Shared flag that flips when the replica's storage fails.
///
/// Why it exists: openraft stops its core on a storage error, but callers of the handle should get a
/// clear `Storage` error ("this replica's disk failed") rather than a generic fatal one, and the
/// replica must refuse writes from then on, even ones that would be forwarded elsewhere.
#[derive(Clone, Default, Debug)]
pub struct StorageHealth(Arc<Mutex<Option<String>>>);

impl StorageHealth {
    /// Record the first failure; later ones are dropped (the first is the cause).
    pub(crate) fn fail(&self, what: impl std::fmt::Display) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            tracing::error!(error = %what, "storage failed: replica stops accepting writes");
            *g = Some(what.to_string());
        }
    }

    /// The first storage failure, if any.
    pub(crate) fn error(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `Err(Storage)` once storage has failed.
    pub(crate) fn check(&self) -> Result<(), ConsensusError> {
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match &*g {
            None => Ok(()),
            Some(m) => Err(ConsensusError::Storage(m.clone())),
        }
    }
}

/// Either store, chosen at start-up from the config. An enum rather than a trait object because
/// openraft's storage traits use `async fn` (not object safe).
#[derive(Clone)]
pub(crate) enum AnyLogStore {
    Wal(WalLogStore),
    Memory(MemLogStore),
}

mod any_impl {
    use std::fmt::Debug;
    use std::io;
    use std::ops::RangeBounds;

    use openraft::storage::IOFlushed;
    use openraft::storage::RaftLogStorage;
    use openraft::LogState;
    use openraft::OptionalSend;
    use openraft::RaftLogReader;

    use super::AnyLogStore;
    use crate::types::Entry;
    use crate::types::LogId;
    use crate::types::TypeConfig;
    use crate::types::Vote;

    impl RaftLogReader<TypeConfig> for AnyLogStore {
        async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
            &mut self,
            range: RB,
        ) -> Result<Vec<Entry>, io::Error> {
            match self {
                AnyLogStore::Wal(s) => s.try_get_log_entries(range).await,
                AnyLogStore::Memory(s) => s.try_get_log_entries(range).await,
            }
        }

        async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
            match self {
                AnyLogStore::Wal(s) => s.read_vote().await,
                AnyLogStore::Memory(s) => s.read_vote().await,
            }
        }
    }

    impl RaftLogStorage<TypeConfig> for AnyLogStore {
        type LogReader = AnyLogStore;

        async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
            match self {
                AnyLogStore::Wal(s) => s.get_log_state().await,
                AnyLogStore::Memory(s) => s.get_log_state().await,
            }
        }

        async fn get_log_reader(&mut self) -> Self::LogReader {
            self.clone()
        }

        async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
            match self {
                AnyLogStore::Wal(s) => s.save_vote(vote).await,
                AnyLogStore::Memory(s) => s.save_vote(vote).await,
            }
        }

        async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
            match self {
                AnyLogStore::Wal(s) => s.save_committed(committed).await,
                AnyLogStore::Memory(s) => s.save_committed(committed).await,
            }
        }

        async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
            match self {
                AnyLogStore::Wal(s) => s.read_committed().await,
                AnyLogStore::Memory(s) => s.read_committed().await,
            }
        }

        async fn append<I>(
            &mut self,
            entries: I,
            callback: IOFlushed<TypeConfig>,
        ) -> Result<(), io::Error>
        where
            I: IntoIterator<Item = Entry> + OptionalSend,
            I::IntoIter: OptionalSend,
        {
            match self {
                AnyLogStore::Wal(s) => s.append(entries, callback).await,
                AnyLogStore::Memory(s) => s.append(entries, callback).await,
            }
        }

        async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
            match self {
                AnyLogStore::Wal(s) => s.truncate_after(last_log_id).await,
                AnyLogStore::Memory(s) => s.truncate_after(last_log_id).await,
            }
        }

        async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
            match self {
                AnyLogStore::Wal(s) => s.purge(log_id).await,
                AnyLogStore::Memory(s) => s.purge(log_id).await,
            }
        }
    }
}

#[cfg(test)]
mod conformance;
