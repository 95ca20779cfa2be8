//! Adapter between openraft's `RaftStateMachine` and the application's [`StateMachine`].
//!
//! It owns what the application should not have to care about: the last applied log id and
//! membership (needed by Raft, stored inside every snapshot), the non-decreasing entry time, the
//! on-disk snapshot, and publishing applied progress and events to watchers.
//!
//! Recovery: on start the adapter restores the application from the on-disk snapshot (if any);
//! openraft then re-applies the committed entries after it (it persists the committed index in the
//! log store for exactly this).

use std::io;
use std::sync::Arc;
use std::sync::RwLock;

use futures::Stream;
use futures::StreamExt;
use openraft::storage::EntryResponder;
use openraft::storage::RaftStateMachine;
use openraft::EntryPayload;
use openraft::OptionalSend;
use openraft::RaftSnapshotBuilder;
use serde::Deserialize;
use serde::Serialize;
use tokio::sync::broadcast;
use tokio::sync::watch;

use crate::app::ApplyContext;
use crate::app::StateChange;
use crate::app::StateMachine;
use crate::codec;
use crate::log_store::StorageHealth;
use crate::snapshot_store::SnapshotStore;
use crate::types::LogId;
use crate::types::LogResponse;
use crate::types::Snapshot;
use crate::types::SnapshotData;
use crate::types::SnapshotMeta;
use crate::types::StoredMembership;
use crate::types::TypeConfig;

/// The replicated state as seen by one replica: the application plus Raft's bookkeeping.
pub(crate) struct SmState<S> {
    pub(crate) app: S,
    pub(crate) last_applied: Option<LogId>,
    pub(crate) membership: StoredMembership,
    /// Time of the last applied application entry (non-decreasing), part of every snapshot so a
    /// replica restored from a snapshot computes the same times as one that applied the log.
    pub(crate) last_time_ms: u64,
}

/// What a snapshot's bytes contain: our bookkeeping plus the application's own snapshot.
#[derive(Serialize, Deserialize)]
pub(crate) struct SnapshotBody {
    pub(crate) last_time_ms: u64,
    #[serde(with = "serde_bytes")]
    pub(crate) app: Vec<u8>,
}

/// openraft state machine wrapping the application `S`.
pub struct StateMachineStore<S: StateMachine> {
    pub(crate) state: Arc<RwLock<SmState<S>>>,
    snapshots: SnapshotStore,
    changes: broadcast::Sender<StateChange<S::Event>>,
    applied: watch::Sender<u64>,
    health: StorageHealth,
}

/// Builds snapshots from a consistent view of the state.
pub struct SnapshotBuilder<S: StateMachine> {
    state: Arc<RwLock<SmState<S>>>,
    snapshots: SnapshotStore,
    health: StorageHealth,
}

fn storage_err(health: &StorageHealth, what: &str, e: impl std::fmt::Display) -> io::Error {
    let msg = format!("{what}: {e}");
    health.fail(&msg);
    io::Error::other(msg)
}

impl<S: StateMachine> StateMachineStore<S> {
    /// Create the adapter, restoring the application from the snapshot in `snapshots` if present.
    pub(crate) fn open(
        mut app: S,
        snapshots: SnapshotStore,
        health: StorageHealth,
        changes: broadcast::Sender<StateChange<S::Event>>,
    ) -> io::Result<Self> {
        let mut last_applied = None;
        let mut membership = StoredMembership::default();
        let mut last_time_ms = 0;
        match restore_from(&snapshots, &mut app) {
            Ok(Some((meta, body))) => {
                last_applied = meta.last_log_id;
                membership = meta.last_membership.clone();
                last_time_ms = body.last_time_ms;
                tracing::info!(snapshot = %meta, "state machine restored from on-disk snapshot");
            }
            Ok(None) => {}
            // A snapshot file that does not restore (damaged on disk) must not keep the replica
            // from starting: it is set aside, and Raft rebuilds the state from the log. When the
            // log no longer holds every entry since the first, openraft refuses to start and says
            // which entries are missing (see consensus/README.md, "A damaged snapshot").
            Err(Restore::Corrupt(why)) => {
                let kept = snapshots.set_aside()?;
                tracing::error!(
                    error = %why,
                    kept_at = %kept.display(),
                    "the on-disk snapshot is damaged: set aside; rebuilding the state from the log"
                );
            }
            Err(Restore::Io(e)) => return Err(e),
        }
        let applied_index = last_applied.as_ref().map(|l| l.index).unwrap_or(0);
        let (applied, _) = watch::channel(applied_index);
        Ok(StateMachineStore {
            state: Arc::new(RwLock::new(SmState {
                app,
                last_applied,
                membership,
                last_time_ms,
            })),
            snapshots,
            changes,
            applied,
            health,
        })
    }

    /// Watch of the last applied log index.
    pub(crate) fn applied_watch(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, SmState<S>> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Why the on-disk snapshot could not be restored.
enum Restore {
    /// The file could not be read (permissions, I/O): not the snapshot's fault.
    Io(io::Error),
    /// The file's bytes do not decode or do not restore.
    Corrupt(String),
}

/// Restores `app` from the snapshot in `snapshots`, if there is one.
fn restore_from<S: StateMachine>(
    snapshots: &SnapshotStore,
    app: &mut S,
) -> Result<Option<(SnapshotMeta, SnapshotBody)>, Restore> {
    let loaded = match snapshots.load() {
        Ok(loaded) => loaded,
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            return Err(Restore::Corrupt(e.to_string()))
        }
        Err(e) => return Err(Restore::Io(e)),
    };
    let Some((meta, data)) = loaded else {
        return Ok(None);
    };
    let body: SnapshotBody =
        codec::decode(&data).map_err(|e| Restore::Corrupt(format!("snapshot body: {e}")))?;
    app.restore(&body.app)
        .map_err(|e| Restore::Corrupt(format!("restore application from snapshot: {e}")))?;
    Ok(Some((meta, body)))
}

/// Whether snapshot bytes from a peer would install: our framing decodes and the application
/// accepts its part ([`StateMachine::check_snapshot`]).
pub(crate) fn check_installable<S: StateMachine>(snapshot: &[u8]) -> Result<(), String> {
    let body: SnapshotBody =
        codec::decode(snapshot).map_err(|e| format!("snapshot body does not decode: {e}"))?;
    S::check_snapshot(&body.app).map_err(|e| e.to_string())
}

impl<S: StateMachine> RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder<S> {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        // Take a consistent view under the read lock, then do the disk I/O without it.
        let (meta, data) = {
            let g = self.state.read().unwrap_or_else(|p| p.into_inner());
            let app = g
                .app
                .snapshot()
                .map_err(|e| storage_err(&self.health, "application snapshot", e))?;
            let body = codec::encode(&SnapshotBody {
                last_time_ms: g.last_time_ms,
                app,
            })?;
            let meta = SnapshotMeta {
                last_log_id: g.last_applied,
                last_membership: g.membership.clone(),
            };
            (meta, body)
        };
        let store = self.snapshots.clone();
        let (m2, d2) = (meta.clone(), data.clone());
        tokio::task::spawn_blocking(move || store.save(&m2, &d2))
            .await
            .map_err(|e| storage_err(&self.health, "snapshot save task", e))?
            .map_err(|e| storage_err(&self.health, "save snapshot", e))?;
        tracing::info!(snapshot = %meta, bytes = data.len(), "snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: data,
        })
    }
}

impl<S: StateMachine> RaftStateMachine<TypeConfig> for StateMachineStore<S> {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuilder<S>;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let g = self.state.read().unwrap_or_else(|p| p.into_inner());
        Ok((g.last_applied, g.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut last_index = None;
        let mut events = Vec::new();
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let log_id = entry.log_id;
            let mut resp = LogResponse::default();
            {
                let mut g = self.write();
                match entry.payload {
                    EntryPayload::Blank => {}
                    EntryPayload::Membership(m) => {
                        g.membership = StoredMembership::new(Some(log_id), m);
                    }
                    EntryPayload::Normal(cmd) => {
                        let time_ms = g.last_time_ms.max(cmd.stamped_ms);
                        g.last_time_ms = time_ms;
                        let ctx = ApplyContext {
                            index: log_id.index,
                            term: log_id.leader_id.term,
                            time_ms,
                        };
                        match codec::decode::<S::Command>(&cmd.command) {
                            Ok(command) => {
                                let mut evs = Vec::new();
                                let r = g.app.apply(&ctx, command, &mut evs);
                                resp.response = codec::encode(&r)?;
                                events.extend(evs.into_iter().map(|event| StateChange::Event {
                                    index: log_id.index,
                                    event,
                                }));
                            }
                            Err(e) => {
                                tracing::warn!(index = log_id.index, error = %e, "undecodable command skipped");
                                resp.rejected = Some(format!("undecodable command: {e}"));
                            }
                        }
                    }
                }
                g.last_applied = Some(log_id);
            }
            last_index = Some(log_id.index);
            if let Some(r) = responder {
                r.send(resp);
            }
        }
        for ev in events {
            // No receivers is fine: nobody is watching.
            let _ = self.changes.send(ev);
        }
        if let Some(i) = last_index {
            self.applied.send_replace(i);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            state: self.state.clone(),
            snapshots: self.snapshots.clone(),
            health: self.health.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        let body: SnapshotBody = codec::decode(&snapshot)?;
        // Restore first, persist after: a snapshot that does not restore is never written, so it
        // cannot keep this replica from starting again. A crash between the two restarts from the
        // previous snapshot and the log, as if this one had not arrived; the leader sends it again.
        {
            let mut g = self.write();
            g.app
                .restore(&body.app)
                .map_err(|e| storage_err(&self.health, "restore application from snapshot", e))?;
            g.last_applied = meta.last_log_id;
            g.membership = meta.last_membership.clone();
            g.last_time_ms = body.last_time_ms;
        }
        let store = self.snapshots.clone();
        let (m2, d2) = (meta.clone(), snapshot);
        tokio::task::spawn_blocking(move || store.save(&m2, &d2))
            .await
            .map_err(|e| storage_err(&self.health, "snapshot save task", e))?
            .map_err(|e| storage_err(&self.health, "save installed snapshot", e))?;
        let index = meta.last_log_id.as_ref().map(|l| l.index).unwrap_or(0);
        let _ = self.changes.send(StateChange::SnapshotInstalled { index });
        self.applied.send_replace(index);
        tracing::info!(snapshot = %meta, "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let store = self.snapshots.clone();
        let loaded = tokio::task::spawn_blocking(move || store.load())
            .await
            .map_err(|e| storage_err(&self.health, "snapshot load task", e))??;
        Ok(loaded.map(|(meta, snapshot)| Snapshot { meta, snapshot }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::AppError;

    /// A state machine whose state is some bytes; a snapshot starting with `bad` does not restore.
    #[derive(Default)]
    struct Toy(Vec<u8>);

    impl StateMachine for Toy {
        type Command = Vec<u8>;
        type Response = ();
        type Event = ();

        fn apply(&mut self, _: &ApplyContext, c: Vec<u8>, _: &mut Vec<()>) {
            self.0 = c;
        }

        fn snapshot(&self) -> Result<Vec<u8>, AppError> {
            Ok(self.0.clone())
        }

        fn restore(&mut self, snapshot: &[u8]) -> Result<(), AppError> {
            Self::check_snapshot(snapshot)?;
            self.0 = snapshot.to_vec();
            Ok(())
        }

        fn check_snapshot(snapshot: &[u8]) -> Result<(), AppError> {
            if snapshot.starts_with(b"bad") {
                return Err("a bad snapshot".into());
            }
            Ok(())
        }
    }

    fn body(app: &[u8]) -> Vec<u8> {
        codec::encode(&SnapshotBody {
            last_time_ms: 5,
            app: app.to_vec(),
        })
        .unwrap()
    }

    fn meta(index: u64) -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: Some(openraft::testing::log_id::<TypeConfig>(1, 1, index)),
            last_membership: StoredMembership::default(),
        }
    }

    fn open(dir: &std::path::Path) -> StateMachineStore<Toy> {
        let (changes, _) = broadcast::channel(4);
        let snapshots = SnapshotStore::open(dir.to_path_buf()).unwrap();
        StateMachineStore::open(Toy::default(), snapshots, StorageHealth::default(), changes)
            .expect("a replica starts")
    }

    /// A snapshot that does not restore is refused before Raft takes it, and were it delivered
    /// anyway it is never written: the replica starts again from what it had.
    #[tokio::test]
    async fn a_snapshot_that_does_not_restore_never_reaches_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_installable::<Toy>(&body(b"good")).is_ok());
        let err = check_installable::<Toy>(&body(b"bad state")).unwrap_err();
        assert!(err.contains("a bad snapshot"), "{err}");
        assert!(check_installable::<Toy>(b"\xff\xff not a body").is_err());

        let mut sm = open(dir.path());
        sm.install_snapshot(&meta(3), body(b"good")).await.unwrap();
        assert!(sm.install_snapshot(&meta(9), body(b"bad")).await.is_err());
        drop(sm);
        let again = open(dir.path());
        let g = again.state.read().unwrap();
        assert_eq!(g.app.0, b"good", "the good snapshot is the one on disk");
        assert_eq!(g.last_applied.map(|l| l.index), Some(3));
    }

    /// A damaged snapshot file does not keep the replica from starting: it is set aside (kept
    /// for inspection) and the state starts empty, for Raft to rebuild from the log.
    #[tokio::test]
    async fn a_damaged_snapshot_file_is_set_aside_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open(dir.path());
        sm.install_snapshot(&meta(3), body(b"good")).await.unwrap();
        drop(sm);
        let file = dir.path().join(FILE_FOR_TESTS);
        let mut bytes = std::fs::read(&file).unwrap();
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&file, &bytes).unwrap();

        let again = open(dir.path());
        let g = again.state.read().unwrap();
        assert!(g.app.0.is_empty() && g.last_applied.is_none());
        assert!(!file.exists());
        assert_eq!(
            std::fs::read(dir.path().join("current.snap.damaged")).unwrap(),
            bytes
        );
        drop(g);
        // A file whose application part does not restore is set aside the same way.
        std::fs::write(
            &file,
            crate::snapshot_store::encode(&meta(4), &body(b"bad")).unwrap(),
        )
        .unwrap();
        let third = open(dir.path());
        assert!(third.state.read().unwrap().last_applied.is_none());
        assert!(!file.exists());
    }

    const FILE_FOR_TESTS: &str = "current.snap";
}
