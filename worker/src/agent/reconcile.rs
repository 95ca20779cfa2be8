//! What one allocation set asks of this host, decided without doing any of it.
//!
//! [`plan`] compares a desired allocation set with a snapshot of what the host has ([`Local`]) and
//! returns typed [`Action`]s plus the agent's bookkeeping after the set ([`Accepted`]). The agent
//! (`Agent::reconcile`) takes the snapshot, calls it and carries the actions out. The rules:
//!
//! * A set older than the newest accepted (a deposed leader) is ignored whole.
//! * A task already known here is never launched again: an ended one stays ended; a running one
//!   is asked to checkpoint when the set's `checkpoint_request` grew past what it answered (once:
//!   not while a checkpoint is under way).
//! * A new task is refused when one of its devices does not exist here or has already carried a
//!   newer lease epoch (logged once per task); otherwise its whole devices' epoch floors rise and
//!   it launches, or waits for the tasks still stopping on its devices to exit first.
//! * A running task the set no longer lists is stopped; an ended one it no longer lists is
//!   forgotten.

use super::state_file::TaskEntry;
use crate::driver::TaskKey;
use gangway_proto::pb;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// What the host has when a set arrives.
#[derive(Clone, Debug, Default)]
pub struct Local {
    /// Newest allocation-set revision accepted.
    pub revision: u64,
    /// Newest lease epoch accepted per device index: the fencing floor.
    pub device_epochs: BTreeMap<u32, u64>,
    /// Every task started (or adopted) here and not yet forgotten.
    pub tasks: BTreeMap<TaskKey, LocalTask>,
    /// Launches waiting for stopping tasks to free their devices, with the newest checkpoint
    /// request a set has carried for each.
    pub waiting: BTreeMap<TaskKey, u64>,
    /// Tasks with a checkpoint under way.
    pub checkpointing: BTreeSet<TaskKey>,
    /// Tasks already refused as stale (logged once).
    pub refused: BTreeSet<TaskKey>,
    /// Device indices this host has.
    pub devices: BTreeSet<u32>,
}

/// One task the host knows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalTask {
    /// Device indices it holds.
    pub devices: Vec<u32>,
    /// Checkpoint requests answered so far.
    pub checkpoints_done: u64,
    /// It ended (it is never launched again under this epoch).
    pub ended: bool,
    /// Its supervisor is watched by this agent (it can be stopped).
    pub running: bool,
}

impl LocalTask {
    /// The task as the state file records it; `running`: whether the agent watches it.
    pub fn of(entry: &TaskEntry, running: bool) -> Self {
        Self {
            devices: entry.devices.clone(),
            checkpoints_done: entry.checkpoints_done,
            ended: entry.ended.is_some(),
            running,
        }
    }
}

/// One thing to do for a set, in the order [`plan`] lists them.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// The set is older than one already accepted: it comes from a deposed leader. Nothing else
    /// is done.
    IgnoreOlderRevision { got: u64, seen: u64 },
    /// A task the host must not run; `reason` is logged (once per task).
    RefuseStale { key: TaskKey, reason: String },
    /// Stop a running task no longer leased here.
    Stop { key: TaskKey },
    /// Start a task now.
    Launch { key: TaskKey, alloc: pb::Allocation },
    /// Start a task once `holders`, still stopping on its devices, have exited.
    WaitForStop {
        key: TaskKey,
        alloc: pb::Allocation,
        holders: Vec<TaskKey>,
    },
    /// A launch that waits is asked for a newer checkpoint request (answered once it runs).
    RaiseWaitingCheckpoint { key: TaskKey, request: u64 },
    /// Ask a running task to checkpoint, answering `request`.
    RelayCheckpoint {
        key: TaskKey,
        alloc: pb::Allocation,
        request: u64,
    },
    /// Drop an ended task the set no longer lists from the state file.
    Forget { key: TaskKey },
}

/// The agent's bookkeeping once a set is accepted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Accepted {
    pub revision: u64,
    pub device_epochs: BTreeMap<u32, u64>,
    /// The tasks that should run (or keep their ended entry) here.
    pub desired: BTreeSet<TaskKey>,
    /// Stale tasks of jobs still listed (the others are forgotten).
    pub refused: BTreeSet<TaskKey>,
}

/// What a set asks for: the actions, and the bookkeeping (`None` when the set is ignored).
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub accepted: Option<Accepted>,
}

/// Decides what `set` asks of a host that has `local`. Pure: see the module documentation.
pub fn plan(set: &pb::AllocationSet, local: &Local) -> Plan {
    if set.revision < local.revision {
        return Plan {
            actions: vec![Action::IgnoreOlderRevision {
                got: set.revision,
                seen: local.revision,
            }],
            accepted: None,
        };
    }
    let mut next = Accepted {
        revision: set.revision,
        device_epochs: local.device_epochs.clone(),
        desired: BTreeSet::new(),
        refused: local.refused.clone(),
    };
    let mut refusals = Vec::new();
    // Checkpoint requests for tasks already running or waiting to launch.
    let mut known = Vec::new();
    let mut launches = Vec::new();
    for alloc in &set.allocations {
        let key = key_of(alloc);
        if let Some(&newest) = local.waiting.get(&key) {
            if alloc.checkpoint_request > newest {
                known.push(Action::RaiseWaitingCheckpoint {
                    key: key.clone(),
                    request: alloc.checkpoint_request,
                });
            }
            next.desired.insert(key);
        } else if let Some(task) = local.tasks.get(&key) {
            if !task.ended
                && alloc.checkpoint_request > task.checkpoints_done
                && !local.checkpointing.contains(&key)
            {
                known.push(Action::RelayCheckpoint {
                    key: key.clone(),
                    alloc: alloc.clone(),
                    request: alloc.checkpoint_request,
                });
            }
            next.desired.insert(key);
        } else if let Some(reason) = fenced(alloc, &next.device_epochs, &local.devices) {
            if next.refused.insert(key.clone()) {
                refusals.push(Action::RefuseStale { key, reason });
            }
        } else {
            raise_floors(&mut next.device_epochs, alloc);
            next.desired.insert(key.clone());
            launches.push((key, alloc));
        }
    }
    let (stops, busy) = stops(local, &next.desired);
    let live_jobs: BTreeSet<&str> = next.desired.iter().map(|k| k.job.as_str()).collect();
    next.refused.retain(|k| live_jobs.contains(k.job.as_str()));
    let mut actions = refusals;
    actions.extend(stops);
    actions.extend(
        launches
            .into_iter()
            .map(|(key, alloc)| launch(key, alloc, &busy)),
    );
    actions.extend(known);
    actions.extend(forgotten(local, &next.desired));
    Plan {
        actions,
        accepted: Some(next),
    }
}

fn key_of(alloc: &pb::Allocation) -> TaskKey {
    TaskKey {
        job: alloc.job_id.clone(),
        task: alloc.task,
        epoch: alloc.epoch,
    }
}

/// Why an allocation must not run here, if it must not.
fn fenced(
    alloc: &pb::Allocation,
    floors: &BTreeMap<u32, u64>,
    devices: &BTreeSet<u32>,
) -> Option<String> {
    for d in &alloc.devices {
        if !devices.contains(&d.index) {
            return Some(format!("device {} does not exist on this host", d.index));
        }
        if let Some(&floor) = floors.get(&d.index) {
            if alloc.epoch < floor {
                return Some(format!(
                    "its lease epoch {} is older than epoch {floor}, already seen for device {}",
                    alloc.epoch, d.index
                ));
            }
        }
    }
    None
}

/// A launch raises the floor of each device it holds whole (a shared device has no single owner).
fn raise_floors(floors: &mut BTreeMap<u32, u64>, alloc: &pb::Allocation) {
    for d in alloc.devices.iter().filter(|d| d.milli >= 1000) {
        let floor = floors.entry(d.index).or_insert(0);
        *floor = (*floor).max(alloc.epoch);
    }
}

/// Running tasks no longer desired stop; until they have exited, their devices are busy.
fn stops(local: &Local, desired: &BTreeSet<TaskKey>) -> (Vec<Action>, BTreeMap<u32, Vec<TaskKey>>) {
    let mut actions = Vec::new();
    let mut busy: BTreeMap<u32, Vec<TaskKey>> = BTreeMap::new();
    for (key, task) in &local.tasks {
        if desired.contains(key) || task.ended || !task.running {
            continue;
        }
        actions.push(Action::Stop { key: key.clone() });
        for d in &task.devices {
            busy.entry(*d).or_default().push(key.clone());
        }
    }
    (actions, busy)
}

/// A device passes from a stopping task to a new one only once the old process has exited: two
/// processes on one GPU would share its memory, and the new one could fail for no fault of its own.
fn launch(key: TaskKey, alloc: &pb::Allocation, busy: &BTreeMap<u32, Vec<TaskKey>>) -> Action {
    let holders: Vec<TaskKey> = alloc
        .devices
        .iter()
        .filter_map(|d| busy.get(&d.index))
        .flatten()
        .cloned()
        .collect();
    let alloc = alloc.clone();
    if holders.is_empty() {
        Action::Launch { key, alloc }
    } else {
        Action::WaitForStop {
            key,
            alloc,
            holders,
        }
    }
}

/// Ended tasks the set no longer lists.
fn forgotten<'a>(
    local: &'a Local,
    desired: &'a BTreeSet<TaskKey>,
) -> impl Iterator<Item = Action> + 'a {
    local
        .tasks
        .iter()
        .filter(|(key, task)| task.ended && !desired.contains(*key))
        .map(|(key, _)| Action::Forget { key: key.clone() })
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::IgnoreOlderRevision { got, seen } => {
                write!(f, "ignore revision {got} (seen {seen})")
            }
            Action::RefuseStale { key, reason } => write!(f, "refuse {key}: {reason}"),
            Action::Stop { key } => write!(f, "stop {key}"),
            Action::Launch { key, .. } => write!(f, "launch {key}"),
            Action::WaitForStop { key, holders, .. } => {
                let holders: Vec<String> = holders.iter().map(ToString::to_string).collect();
                write!(f, "launch {key} after {}", holders.join(", "))
            }
            Action::RaiseWaitingCheckpoint { key, request } => {
                write!(f, "note checkpoint request {request} for waiting {key}")
            }
            Action::RelayCheckpoint { key, request, .. } => {
                write!(f, "checkpoint {key} for request {request}")
            }
            Action::Forget { key } => write!(f, "forget {key}"),
        }
    }
}

#[cfg(test)]
#[path = "reconcile_tests.rs"]
mod tests;
