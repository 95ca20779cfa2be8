//! Keeping tasks away from the agent and from each other, on the agent's side: the start-up
//! checks and warnings, the uids handed to tasks ([`UidBook`]), and each job's checkpoint
//! directory handed to its task's user. The driver does the rest (see `driver/layout.rs`).

use super::state_file::AgentState;
use super::task_users::TaskUsers;
use super::uid_range::Taken;
use super::{accounts, AgentConfig, AgentError};
use crate::driver::{hand_over_dir, uids_with_processes, TaskIdentity};
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Mutex;

/// Says at start who tasks run as (loudly when it is the agent's own user) and, when they run as
/// other users, checks that they can reach their directories.
pub fn prepare_host(cfg: &AgentConfig, users: &TaskUsers) -> Result<(), AgentError> {
    if *users == TaskUsers::SameAsAgent {
        // SAFETY: geteuid cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        tracing::warn!(
            "TASKS RUN AS THE AGENT'S OWN USER {}{} (--task-user-same-as-agent): they can write \
             the lease-deadline file and the agent's state, and signal each other; use \
             --task-user or --task-uid-range outside development",
            accounts::agent_user(),
            if root { ", ROOT" } else { "" }
        );
        return Ok(());
    }
    tracing::info!("tasks run {}", users.describe());
    passable_path("--data-dir", &cfg.data_dir)?;
    std::fs::create_dir_all(&cfg.checkpoint_dir).map_err(|e| {
        AgentError::Config(format!(
            "cannot create the checkpoint directory {}: {e}",
            cfg.checkpoint_dir.display()
        ))
    })?;
    close_listing(&cfg.checkpoint_dir);
    passable_path("--checkpoint-dir", &cfg.checkpoint_dir.join("x"))
}

/// Every directory above `path` must let other users pass (o+x): tasks reach their working
/// directory (under the data directory) and their checkpoint directory by these paths.
fn passable_path(flag: &str, path: &Path) -> Result<(), AgentError> {
    for dir in path.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        if meta.permissions().mode() & 0o001 == 0 {
            return Err(AgentError::Config(format!(
                "{flag} {}: tasks run as other users and cannot pass through {} (mode {:o}): \
                 allow it (chmod o+x {}) or choose a directory under passable ones",
                path.display(),
                dir.display(),
                meta.permissions().mode() & 0o7777,
                dir.display()
            )));
        }
    }
    Ok(())
}

/// The agent's own checkpoint root: passable, not listable (a task finds its job's directory
/// by name, not the others'). A root another user owns (shared storage) is left as it is.
fn close_listing(dir: &Path) {
    // SAFETY: geteuid cannot fail.
    let agent = unsafe { libc::geteuid() };
    if std::fs::metadata(dir).is_ok_and(|m| m.uid() == agent) {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711));
    }
}

/// Hands the job's checkpoint directory to the task's user; a directory another user owns is
/// reported, since the task may not be able to write it.
pub fn hand_over_checkpoint_dir(dir: &Path, identity: Option<&TaskIdentity>) {
    let result = match identity {
        Some(id) => hand_over_dir(dir, id).map(|owner| owner.map(|o| (o, id.uid))),
        None => std::fs::create_dir_all(dir).map(|()| None),
    };
    match result {
        Ok(None) => {}
        Ok(Some((owner, uid))) => tracing::warn!(
            dir = %dir.display(),
            "the checkpoint directory belongs to uid {owner}, not to the task's uid {uid}: the \
             task may not be able to write its checkpoints there"
        ),
        Err(e) => tracing::warn!(
            "cannot prepare the checkpoint directory {}: {e}",
            dir.display()
        ),
    }
}

/// The uids handed to tasks that are starting: a pick and the state file's entry of the task
/// that got it are not one step, so two launches must not pick the same free uid meanwhile.
#[derive(Default)]
pub struct UidBook {
    /// uid -> (job, launches under way with it).
    starting: Mutex<BTreeMap<u32, (String, usize)>>,
}

impl UidBook {
    /// The identity of `job`'s next task in `queue`; `release` it once the launch is recorded
    /// (or failed).
    pub fn assign(
        &self,
        users: &TaskUsers,
        queue: &str,
        job: &str,
        state: &AgentState,
    ) -> Result<Option<TaskIdentity>, String> {
        let mut starting = self.starting.lock().unwrap_or_else(|p| p.into_inner());
        let mut by_job: BTreeMap<u32, String> = starting
            .iter()
            .map(|(uid, (job, _))| (*uid, job.clone()))
            .collect();
        for (key, entry) in &state.tasks {
            if let (None, Some(id)) = (&entry.ended, &entry.process.identity) {
                by_job.insert(id.uid, key.job.clone());
            }
        }
        // Read from /proc only if a fresh uid is to be picked (not for a fixed user, nor for a
        // job that already holds one): a host may run thousands of processes.
        let processes = std::cell::OnceCell::new();
        let has_process = |uid: u32| processes.get_or_init(uids_with_processes).contains(&uid);
        let has_account = |uid: u32| accounts::uid_has_account(uid) || accounts::gid_has_group(uid);
        let taken = Taken {
            by_job: &by_job,
            has_process: &has_process,
            has_account: &has_account,
        };
        let identity = users.identity_for(queue, job, &taken)?;
        if let Some(id) = &identity {
            starting
                .entry(id.uid)
                .or_insert_with(|| (job.to_owned(), 0))
                .1 += 1;
        }
        Ok(identity)
    }

    pub fn release(&self, identity: Option<&TaskIdentity>) {
        if let Some(id) = identity {
            let mut starting = self.starting.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, n)) = starting.get_mut(&id.uid) {
                *n -= 1;
                if *n == 0 {
                    starting.remove(&id.uid);
                }
            }
        }
    }
}
