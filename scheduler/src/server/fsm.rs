//! [`SchedulerFsm`]: the cluster state as the consensus layer replicates it.
//!
//! A thin adapter: the consensus crate is generic over any [`StateMachine`]; this plugs the scheduler's
//! [`ClusterStore`] into it, taking the time of each entry from the log (never from a local clock) and
//! remembering the index it has applied, so readers can say which revision of the state they saw.

use crate::state::{ClusterStore, Command, Event, Response};
use gangway_consensus::{AppError, ApplyContext, StateMachine};
use serde::{Deserialize, Serialize};

/// The replicated state machine of a Gangway replica.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedulerFsm {
    /// Index of the last applied entry: the revision workers see on their allocation sets.
    applied_index: u64,
    store: ClusterStore,
}

impl SchedulerFsm {
    pub fn new() -> Self {
        Self {
            applied_index: 0,
            store: ClusterStore::new(),
        }
    }

    pub fn store(&self) -> &ClusterStore {
        &self.store
    }

    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// The revision of the state workers see on their allocation sets: the applied index, moved
    /// past a restored backup's revision.
    pub fn revision(&self) -> u64 {
        self.store.revision(self.applied_index)
    }

    /// Reads a backup written by `gangway cluster snapshot save`: the state and its revision.
    pub fn from_backup(bytes: &[u8]) -> Result<(ClusterStore, u64), serde_json::Error> {
        let fsm: SchedulerFsm = serde_json::from_slice(bytes)?;
        let revision = fsm.revision();
        Ok((fsm.store, revision))
    }
}

impl StateMachine for SchedulerFsm {
    type Command = Command;
    type Response = Response;
    type Event = Event;

    fn apply(&mut self, ctx: &ApplyContext, command: Command, events: &mut Vec<Event>) -> Response {
        self.applied_index = ctx.index;
        self.store.apply(ctx.time_ms, command, events)
    }

    fn snapshot(&self) -> Result<Vec<u8>, AppError> {
        Ok(serde_json::to_vec(self)?)
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), AppError> {
        *self = serde_json::from_slice(snapshot)?;
        Ok(())
    }
}
