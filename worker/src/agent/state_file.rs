//! The agent's local intent, persisted so a restarted agent re-adopts the tasks it left running
//! and never relaunches one that ended.
//!
//! Written atomically (two slot files in turn, see [`SlotPair`]) after every change that matters:
//! a launch, an end, a newer fencing floor, a report queued or acknowledged. A crash between a change and
//! its write loses at most that change, and each loss is safe: an unrecorded launch is found as a
//! stray only if its shim runs (it then keeps its lease deadline, so it ends by itself), and a
//! queued report is re-derived from the task's exit file.

use super::slot_pair::{SlotError, SlotPair};
use crate::driver::{ExitOutcome, ProcessRecord, TaskKey};
use gangway_proto::pb;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A report the scheduler has not acknowledged yet; retried until it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PendingReport {
    Task {
        key: TaskKey,
        state: ReportedState,
        exit_code: Option<i32>,
        message: String,
    },
    Checkpoint {
        key: TaskKey,
        request: u64,
        /// Ok: (path, step, bytes); Err: why it failed.
        result: Result<(String, u64, u64), String>,
    },
    /// A device's health changed (see [`super::health`]).
    DeviceHealth {
        uuid: String,
        health: ReportedHealth,
        cause: String,
    },
    /// A run of the health check (see [`super::health_check`]).
    HealthCheck {
        passed: bool,
        failed_devices: Vec<String>,
        detail: String,
    },
}

impl PendingReport {
    /// Whether this reports a task that failed or was lost: a device health report queued later
    /// goes ahead of it, so the scheduler learns of a failed device before the failures it caused.
    pub fn is_task_failure(&self) -> bool {
        matches!(
            self,
            PendingReport::Task {
                state: ReportedState::Failed | ReportedState::Lost,
                ..
            }
        )
    }
}

/// A device's health in a queued report, saved as its word ("failed").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportedHealth {
    Healthy,
    Degraded,
    Failed,
}

impl ReportedHealth {
    pub fn of(h: pb::DeviceHealth) -> Self {
        match h {
            pb::DeviceHealth::Degraded => ReportedHealth::Degraded,
            pb::DeviceHealth::Failed => ReportedHealth::Failed,
            pb::DeviceHealth::Healthy | pb::DeviceHealth::Unspecified => ReportedHealth::Healthy,
        }
    }

    pub fn to_pb(self) -> pb::DeviceHealth {
        match self {
            ReportedHealth::Healthy => pb::DeviceHealth::Healthy,
            ReportedHealth::Degraded => pb::DeviceHealth::Degraded,
            ReportedHealth::Failed => pb::DeviceHealth::Failed,
        }
    }
}

/// The state a task report carries. Saved as its lowercase word ("running", ...), the form the
/// state file has always had.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportedState {
    Running,
    Succeeded,
    Failed,
    /// Stopped through no fault of its own (the lease deadline passed, the supervisor vanished).
    Lost,
}

impl ReportedState {
    /// The state as the worker API carries it.
    pub fn to_pb(self) -> pb::TaskState {
        match self {
            ReportedState::Running => pb::TaskState::Running,
            ReportedState::Succeeded => pb::TaskState::Succeeded,
            ReportedState::Failed => pb::TaskState::Failed,
            ReportedState::Lost => pb::TaskState::Lost,
        }
    }
}

/// One task this agent started (or adopted) and has not yet seen leave its desired set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskEntry {
    pub process: ProcessRecord,
    /// Device indices the task holds.
    pub devices: Vec<u32>,
    /// Checkpoint requests answered so far (the allocation's `checkpoint_request`).
    pub checkpoints_done: u64,
    /// Set once the task ended: it is never launched again under this epoch.
    pub ended: Option<ExitOutcome>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    /// Newest allocation-set revision accepted: an older set (from a deposed leader) is refused.
    pub revision: u64,
    /// Newest lease epoch accepted per device index (whole-device leases): the fencing floor.
    pub device_epochs: BTreeMap<u32, u64>,
    /// JSON object keys must be strings: saved as a list of (key, entry) pairs.
    #[serde(with = "pairs")]
    pub tasks: BTreeMap<TaskKey, TaskEntry>,
    /// Tasks refused as stale, so each is reported in the log once, not on every set.
    pub refused: BTreeSet<TaskKey>,
    pub outbox: Vec<PendingReport>,
}

impl AgentState {
    /// Queues a device health report ahead of every task failure already queued (so the
    /// scheduler learns a device failed before it hears of the failures the device caused), and
    /// behind everything else.
    pub fn queue_device_report(&mut self, report: PendingReport) {
        let at = self
            .outbox
            .iter()
            .position(PendingReport::is_task_failure)
            .unwrap_or(self.outbox.len());
        self.outbox.insert(at, report);
    }

    /// Queues the report of a task's end. A report of its start still queued goes: the end says
    /// all it would (a task that ends before its start is sent costs one report, not two).
    pub fn queue_task_end(
        &mut self,
        key: &TaskKey,
        state: ReportedState,
        exit_code: Option<i32>,
        message: String,
    ) {
        self.outbox.retain(|r| {
            !matches!(r, PendingReport::Task { key: k, state: ReportedState::Running, .. } if k == key)
        });
        self.outbox.push(PendingReport::Task {
            key: key.clone(),
            state,
            exit_code,
            message,
        });
    }
}

/// A map with structured keys, as a JSON list of pairs.
mod pairs {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::collections::BTreeMap;

    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(
        map: &BTreeMap<K, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.iter())
    }

    pub fn deserialize<'de, K, V, D>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}

/// Where the state lives and how it is written: two slot files, `agent-state.0` and
/// `agent-state.1`, written in turn and in place ([`SlotPair`]: a save allocates and frees no
/// inode and costs one `fdatasync`). An agent of an earlier version kept one `agent-state.json`,
/// replaced by rename; it is read when no slot exists yet and removed after the first save.
pub struct StateFile {
    slots: SlotPair,
    legacy: PathBuf,
    /// Whether `legacy` may still exist.
    legacy_left: std::sync::atomic::AtomicBool,
}

#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("cannot read the agent state {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the agent state {path} is not valid ({source}); move it aside to start afresh, which forgets the tasks it names")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("the agent state {path} holds no whole save ({why}), nor does the other slot beside it; move both aside to start afresh, which forgets the tasks they name")]
    Damaged { path: PathBuf, why: String },
    #[error("cannot write the agent state {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl From<SlotError> for StateFileError {
    fn from(e: SlotError) -> Self {
        match e {
            SlotError::Read { path, source } => StateFileError::Read { path, source },
            SlotError::Damaged { path, why } => StateFileError::Damaged { path, why },
            SlotError::Write { path, source } => StateFileError::Write { path, source },
        }
    }
}

impl StateFile {
    pub fn new(dir: &Path) -> Self {
        Self {
            slots: SlotPair::new(dir, "agent-state"),
            legacy: dir.join("agent-state.json"),
            legacy_left: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// The two slot files.
    pub fn paths(&self) -> &[PathBuf; 2] {
        self.slots.paths()
    }

    /// The saved state, or an empty one when none was saved yet.
    pub fn load(&self) -> Result<AgentState, StateFileError> {
        let (path, bytes) = match self.slots.load()? {
            Some((path, body)) => (path.to_path_buf(), body),
            None => match std::fs::read(&self.legacy) {
                Ok(bytes) => (self.legacy.clone(), bytes),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Ok(AgentState::default())
                }
                Err(source) => {
                    let path = self.legacy.clone();
                    return Err(StateFileError::Read { path, source });
                }
            },
        };
        serde_json::from_slice(&bytes).map_err(|source| StateFileError::Corrupt { path, source })
    }

    pub fn save(&self, state: &AgentState) -> Result<(), StateFileError> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| StateFileError::Write {
            path: self.slots.paths()[0].clone(),
            source: std::io::Error::other(e),
        })?;
        self.slots.save(&bytes)?;
        if self
            .legacy_left
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            match std::fs::remove_file(&self.legacy) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => tracing::warn!(
                    path = %self.legacy.display(),
                    error = %e,
                    "cannot remove the agent state of an earlier version (the slots are read first)"
                ),
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Saves from several threads at once all succeed and leave one of the written states
    /// (the agent serializes its own saves; the file must not fail under overlap either).
    #[test]
    fn overlapping_saves_never_fail() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::sync::Arc::new(StateFile::new(dir.path()));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let file = file.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let state = AgentState {
                            revision: t * 1000 + i,
                            ..AgentState::default()
                        };
                        file.save(&state).expect("save");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let last = file.load().unwrap().revision;
        assert!((0..4).any(|t| last == t * 1000 + 49), "{last}");
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["agent-state.0", "agent-state.1"],
            "the two slots, nothing else"
        );
    }

    #[test]
    fn a_device_report_goes_ahead_of_queued_task_failures_only() {
        let key = |task| TaskKey {
            job: "j".into(),
            task,
            epoch: 1,
        };
        let task = |task, state| PendingReport::Task {
            key: key(task),
            state,
            exit_code: None,
            message: String::new(),
        };
        let health = |uuid: &str| PendingReport::DeviceHealth {
            uuid: uuid.into(),
            health: ReportedHealth::Failed,
            cause: "XID 79".into(),
        };
        let mut state = AgentState::default();
        state.queue_device_report(health("a"));
        state.outbox.push(task(0, ReportedState::Running));
        state.outbox.push(task(1, ReportedState::Failed));
        state.outbox.push(task(2, ReportedState::Lost));
        state.queue_device_report(health("b"));
        state.queue_device_report(health("c"));
        assert_eq!(
            state.outbox,
            [
                health("a"),
                task(0, ReportedState::Running),
                health("b"),
                health("c"),
                task(1, ReportedState::Failed),
                task(2, ReportedState::Lost),
            ]
        );
    }

    #[test]
    fn an_end_replaces_its_own_unsent_start_only() {
        let key = |job: &str, task| TaskKey {
            job: job.into(),
            task,
            epoch: 1,
        };
        let report = |key: TaskKey, state| PendingReport::Task {
            key,
            state,
            exit_code: None,
            message: String::new(),
        };
        let health = PendingReport::DeviceHealth {
            uuid: "a".into(),
            health: ReportedHealth::Failed,
            cause: "XID 79".into(),
        };
        let mut state = AgentState {
            outbox: vec![
                report(key("j", 0), ReportedState::Running),
                health.clone(),
                report(key("j", 1), ReportedState::Running),
                report(key("k", 0), ReportedState::Running),
            ],
            ..AgentState::default()
        };
        state.queue_task_end(
            &key("j", 0),
            ReportedState::Succeeded,
            Some(0),
            String::new(),
        );
        let mut ended = report(key("j", 0), ReportedState::Succeeded);
        if let PendingReport::Task { exit_code, .. } = &mut ended {
            *exit_code = Some(0);
        }
        assert_eq!(
            state.outbox,
            [
                health,
                report(key("j", 1), ReportedState::Running),
                report(key("k", 0), ReportedState::Running),
                ended.clone(),
            ],
            "the other rank's start, another job's and the health report stay, in order"
        );
        // An end already queued is never dropped by a second report of the same task.
        state.queue_task_end(&key("j", 0), ReportedState::Lost, None, String::new());
        assert_eq!(state.outbox.iter().filter(|r| **r == ended).count(), 1);
    }

    #[test]
    fn state_round_trips_and_a_corrupt_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path());
        assert_eq!(file.load().unwrap(), AgentState::default());
        let mut state = AgentState {
            revision: 42,
            ..AgentState::default()
        };
        state.device_epochs.insert(3, 9);
        let key = TaskKey {
            job: "j-1".into(),
            task: 1,
            epoch: 9,
        };
        state.tasks.insert(
            key.clone(),
            TaskEntry {
                process: ProcessRecord {
                    key: key.clone(),
                    pid: 4242,
                    start_ticks: 77,
                    exit_file: "/x/exit.json".into(),
                    log_file: "/x/task-1.log".into(),
                    identity: Some(crate::driver::TaskIdentity {
                        uid: 61_007,
                        gid: 61_007,
                        groups: vec![44],
                    }),
                },
                devices: vec![0, 1],
                checkpoints_done: 2,
                ended: None,
            },
        );
        state.refused.insert(key.clone());
        state.outbox.push(PendingReport::Task {
            key: key.clone(),
            state: ReportedState::Lost,
            exit_code: None,
            message: "lease deadline passed".into(),
        });
        state.outbox.push(PendingReport::Checkpoint {
            key: TaskKey {
                job: "j-1".into(),
                task: 0,
                epoch: 9,
            },
            request: 2,
            result: Err("no manifest".into()),
        });
        state.outbox.push(PendingReport::DeviceHealth {
            uuid: "GPU-h-3".into(),
            health: ReportedHealth::Failed,
            cause: "XID 79: GPU has fallen off the bus".into(),
        });
        state.outbox.push(PendingReport::HealthCheck {
            passed: false,
            failed_devices: vec!["GPU-h-3".into()],
            detail: "exit 1".into(),
        });
        file.save(&state).unwrap();
        assert_eq!(file.load().unwrap(), state);
        use std::os::unix::fs::PermissionsExt;
        let slot = &file.paths()[1];
        let mode = std::fs::metadata(slot).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the agent's state is the agent's alone");
        let text = std::fs::read_to_string(slot).unwrap();
        let (_, json) = text
            .split_once('\n')
            .expect("a header line, then the state");
        // A file written before tasks had users still loads: its tasks ran as the agent.
        let mut older: serde_json::Value = serde_json::from_str(json).unwrap();
        let process = &mut older["tasks"][0][1]["process"];
        assert!(process
            .as_object_mut()
            .unwrap()
            .remove("identity")
            .is_some());
        let older: AgentState = serde_json::from_value(older).unwrap();
        assert_eq!(older.tasks[&key].process.identity, None);
        assert!(
            json.contains(r#""state": "lost""#),
            "report states keep their word form: {json}"
        );
        assert!(json.contains(r#""health": "failed""#), "{json}");
        // A whole save that is not a state names its slot.
        file.slots.save(b"{ not json").unwrap();
        let err = file.load().unwrap_err().to_string();
        assert!(
            err.contains("agent-state.0") && err.contains("not valid"),
            "{err}"
        );
        // No whole save in either slot: named, never taken for an empty state.
        std::fs::write(&file.paths()[0], b"{ not json").unwrap();
        std::fs::write(&file.paths()[1], b"").unwrap();
        let err = StateFile::new(dir.path()).load().unwrap_err().to_string();
        assert!(
            err.contains("agent-state.0") && err.contains("no whole save"),
            "{err}"
        );
    }

    /// An agent upgraded in place finds the single file its earlier version wrote by rename,
    /// and leaves only the slots after its first save.
    #[test]
    fn the_state_an_earlier_version_left_is_read_then_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join("agent-state.json");
        let earlier = AgentState {
            revision: 7,
            ..AgentState::default()
        };
        std::fs::write(&legacy, serde_json::to_vec_pretty(&earlier).unwrap()).unwrap();
        let file = StateFile::new(dir.path());
        assert_eq!(file.load().unwrap(), earlier);
        let later = AgentState {
            revision: 8,
            ..earlier
        };
        file.save(&later).unwrap();
        assert!(
            !legacy.exists(),
            "the old file goes once the slots hold the state"
        );
        assert_eq!(StateFile::new(dir.path()).load().unwrap(), later);
        std::fs::write(&legacy, b"{ stale").unwrap();
        assert_eq!(
            StateFile::new(dir.path()).load().unwrap(),
            later,
            "slots are read first"
        );
    }
}
