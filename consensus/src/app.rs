//! The contract between the consensus layer and the application's state machine.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// What the application learns about the entry it is applying.
///
/// Everything here comes from the log, so every replica sees the same values for the same entry:
/// that is what makes `apply` deterministic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyContext {
    /// Raft log index of the entry.
    pub index: u64,
    /// Term of the leader that proposed the entry.
    pub term: u64,
    /// Leader-stamped wall-clock time of the entry, in Unix milliseconds, made non-decreasing:
    /// `max(previous entry's time, this entry's stamp)`. Use it instead of any clock.
    pub time_ms: u64,
}

/// An application-level error while snapshotting or restoring: the replica treats it as a storage
/// failure (it cannot continue safely without a consistent state).
pub type AppError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A deterministic state machine replicated by Raft.
///
/// The consensus layer calls `apply` for every committed application command, in log order, exactly
/// once per replica incarnation (after a restart, the state is rebuilt from the latest snapshot and
/// the committed entries after it are applied again). Blank and membership entries never reach it.
///
/// Rules for implementors: `apply` must be a pure function of (current state, command, context):
/// no clocks, no randomness that is not derived from the command, no I/O. Deterministic rejections
/// belong in `Response`, not in a panic.
pub trait StateMachine: Send + Sync + 'static {
    /// A command proposed through [`crate::ReplicaHandle::write`].
    type Command: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// The result of applying a command, returned to the writer.
    type Response: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// Application events published to watchers ([`crate::ReplicaHandle::subscribe`]) as commands
    /// are applied, e.g. "allocation changed for node X".
    type Event: Clone + Send + Sync + std::fmt::Debug + 'static;

    /// Apply one committed command. Push any watcher events into `events`.
    fn apply(
        &mut self,
        ctx: &ApplyContext,
        command: Self::Command,
        events: &mut Vec<Self::Event>,
    ) -> Self::Response;

    /// Serialize the whole state. Called with a consistent view (no apply runs concurrently).
    fn snapshot(&self) -> Result<Vec<u8>, AppError>;

    /// Replace the whole state with one produced by `snapshot` (possibly on another replica). On
    /// an error the state must be left as it was.
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), AppError>;

    /// Whether `snapshot` would restore, without restoring it: a snapshot a peer sends is checked
    /// before Raft takes it, so a malformed one is refused to its sender and never reaches the
    /// disk. The default accepts everything (`restore` then has the last word).
    fn check_snapshot(snapshot: &[u8]) -> Result<(), AppError> {
        let _ = snapshot;
        Ok(())
    }
}

/// A change published to watchers.
///
/// Watchers receive these through a `tokio::sync::broadcast` channel; a slow watcher that lags
/// behind gets `RecvError::Lagged` and should re-read the state (under a linearizable read) and
/// resubscribe. `SnapshotInstalled` means the whole state was replaced: also a cue to re-read.
#[derive(Debug, Clone)]
pub enum StateChange<E> {
    /// An application event emitted while applying the entry at `index`.
    Event {
        /// Log index of the entry that emitted the event.
        index: u64,
        /// The application's event.
        event: E,
    },
    /// The state machine was replaced by a snapshot covering entries up to `index`.
    SnapshotInstalled {
        /// Last log index covered by the snapshot.
        index: u64,
    },
}
