//! Both log stores must pass openraft's storage conformance suite (`openraft::testing::log`),
//! paired with our state-machine adapter and a trivial application.

use openraft::testing::log::StoreBuilder;
use openraft::testing::log::Suite;
use openraft::type_config::TypeConfigExt;
use openraft::StorageError;
use tokio::sync::broadcast;

use super::MemLogStore;
use super::StorageHealth;
use super::WalLogStore;
use crate::app::AppError;
use crate::app::ApplyContext;
use crate::app::StateMachine;
use crate::snapshot_store::SnapshotStore;
use crate::state_machine::StateMachineStore;
use crate::types::TypeConfig;

/// Sums the commands it applies; enough state to tell snapshots apart.
#[derive(Default)]
struct Sum(u64);

impl StateMachine for Sum {
    type Command = u64;
    type Response = u64;
    type Event = ();

    fn apply(&mut self, _ctx: &ApplyContext, c: u64, _ev: &mut Vec<()>) -> u64 {
        self.0 += c;
        self.0
    }

    fn snapshot(&self) -> Result<Vec<u8>, AppError> {
        Ok(self.0.to_le_bytes().to_vec())
    }

    fn restore(&mut self, s: &[u8]) -> Result<(), AppError> {
        self.0 = u64::from_le_bytes(s.try_into()?);
        Ok(())
    }
}

fn sm(dir: &std::path::Path) -> Result<StateMachineStore<Sum>, StorageError<TypeConfig>> {
    let snaps = SnapshotStore::open(dir.join("snapshots"))
        .map_err(|e| StorageError::read(TypeConfig::err_from_error(&e)))?;
    let (tx, _) = broadcast::channel(16);
    StateMachineStore::open(Sum::default(), snaps, StorageHealth::default(), tx)
        .map_err(|e| StorageError::read(TypeConfig::err_from_error(&e)))
}

/// Small segments, so that the suite's logs span several.
struct WalBuilder;

impl StoreBuilder<TypeConfig, WalLogStore, StateMachineStore<Sum>, tempfile::TempDir>
    for WalBuilder
{
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, WalLogStore, StateMachineStore<Sum>), StorageError<TypeConfig>>
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let log =
            WalLogStore::open_with(&dir.path().join("raft-wal"), StorageHealth::default(), 4096)
                .map_err(|e| StorageError::read(TypeConfig::err_from_error(&e)))?;
        let sm = sm(dir.path())?;
        Ok((dir, log, sm))
    }
}

/// The log of a replica that led none of the suite's entries: every append written in place.
struct FollowerWalBuilder;

impl StoreBuilder<TypeConfig, WalLogStore, StateMachineStore<Sum>, tempfile::TempDir>
    for FollowerWalBuilder
{
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, WalLogStore, StateMachineStore<Sum>), StorageError<TypeConfig>>
    {
        let (dir, log, sm) = WalBuilder.build().await?;
        Ok((dir, log.of_replica(u64::MAX), sm))
    }
}

struct MemBuilder;

impl StoreBuilder<TypeConfig, MemLogStore, StateMachineStore<Sum>, tempfile::TempDir>
    for MemBuilder
{
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, MemLogStore, StateMachineStore<Sum>), StorageError<TypeConfig>>
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let sm = sm(dir.path())?;
        Ok((dir, MemLogStore::new(), sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_log_store_passes_openraft_conformance_suite() {
    Suite::test_all(WalBuilder).await.expect("conformance");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_log_store_written_in_place_passes_openraft_conformance_suite() {
    Suite::test_all(FollowerWalBuilder)
        .await
        .expect("conformance");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_log_store_passes_openraft_conformance_suite() {
    Suite::test_all(MemBuilder).await.expect("conformance");
}
