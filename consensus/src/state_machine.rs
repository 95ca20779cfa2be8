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
struct SnapshotBody {
    last_time_ms: u64,
    app: Vec<u8>,
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
        if let Some((meta, data)) = snapshots.load()? {
            let body: SnapshotBody = codec::decode(&data)?;
            app.restore(&body.app)
                .map_err(|e| io::Error::other(format!("restore application from snapshot: {e}")))?;
            last_applied = meta.last_log_id;
            membership = meta.last_membership.clone();
            last_time_ms = body.last_time_ms;
            tracing::info!(snapshot = %meta, "state machine restored from on-disk snapshot");
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
        // Persist first: if restoring fails we still have not lost the leader's snapshot, and if we
        // crash after, restart restores from this file.
        let store = self.snapshots.clone();
        let (m2, d2) = (meta.clone(), snapshot);
        tokio::task::spawn_blocking(move || store.save(&m2, &d2))
            .await
            .map_err(|e| storage_err(&self.health, "snapshot save task", e))?
            .map_err(|e| storage_err(&self.health, "save installed snapshot", e))?;
        {
            let mut g = self.write();
            g.app
                .restore(&body.app)
                .map_err(|e| storage_err(&self.health, "restore application from snapshot", e))?;
            g.last_applied = meta.last_log_id;
            g.membership = meta.last_membership.clone();
            g.last_time_ms = body.last_time_ms;
        }
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
