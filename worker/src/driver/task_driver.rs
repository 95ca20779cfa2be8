//! [`TaskDriver`]: starts task shims and re-adopts them after an agent restart.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

use super::fork_server::ForkServer;
use super::procfs::{same_process_alive, ProcStat};
use super::{
    exit_file, layout, lease, DriverConfig, DriverError, ExitOutcome, LaunchSpec, ProcessRecord,
    ShimArgs, TaskHandle, TaskKey,
};

/// Runs task processes on this host, each under a shim (see [`run_shim`](super::run_shim)).
///
/// Holds no per-task state: a [`TaskHandle`] carries it, and a [`ProcessRecord`] is enough to
/// find a task again, so the agent may be killed at any moment and a new driver picks up where
/// the old one was.
pub struct TaskDriver {
    cfg: DriverConfig,
    /// A task's log is rotated past this many bytes (see the shim's `--log-max-bytes`).
    log_max_bytes: u64,
    /// Task directories open to their task, with the newest epoch launched in each.
    open: std::sync::Mutex<std::collections::BTreeMap<PathBuf, u64>>,
    /// Forks shims when the configuration asks for it.
    fork_server: Option<ForkServer>,
}

/// The default cap on one task's log before it is rotated (the previous part is kept beside it,
/// so a task's logs take at most twice this).
pub const DEFAULT_LOG_MAX_BYTES: u64 = 512 * 1024 * 1024;

impl TaskDriver {
    /// Checks the configuration and creates the driver's directories.
    pub fn new(cfg: DriverConfig) -> Result<Self, DriverError> {
        match cfg.shim_command.first() {
            Some(program) if !program.is_empty() => {}
            _ => {
                return Err(DriverError::Config(
                    "shim_command is empty; it should be [<gangway binary>, \"task-shim\"]".into(),
                ))
            }
        }
        if cfg.lease_file.file_name().is_none() {
            return Err(DriverError::Config(format!(
                "lease_file {} is not a file path",
                cfg.lease_file.display()
            )));
        }
        layout::ensure_dir(&cfg.data_dir, layout::PASSABLE)?;
        layout::ensure_dir(&cfg.data_dir.join("tasks"), layout::PASSABLE)?;
        layout::ensure_dir(&cfg.data_dir.join("logs"), layout::PRIVATE)?;
        if let Some(parent) = cfg
            .lease_file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
        {
            create_dir(parent)?;
        }
        let fork_server = cfg
            .fork_server
            .then(|| ForkServer::new(&cfg.shim_command, &cfg.data_dir));
        Ok(TaskDriver {
            cfg,
            log_max_bytes: DEFAULT_LOG_MAX_BYTES,
            open: Default::default(),
            fork_server,
        })
    }

    /// Caps each task's log at `bytes` (at least 4096) from the next launch on.
    pub fn set_log_max_bytes(&mut self, bytes: u64) -> Result<(), DriverError> {
        if bytes < 4096 {
            return Err(DriverError::Config(format!(
                "log cap must be at least 4096 bytes, got {bytes}"
            )));
        }
        self.log_max_bytes = bytes;
        Ok(())
    }

    /// Removes the directories (`tasks/<job>` and `logs/<job>`) of jobs not in `keep` whose
    /// newest file is older than `retention`: finished tasks' exit files, working directories
    /// and logs. Returns what it removed. Errors on one job's files are logged and skipped.
    pub fn sweep(
        &self,
        keep: &std::collections::BTreeSet<String>,
        retention: std::time::Duration,
    ) -> SweepReport {
        let mut report = SweepReport::default();
        let now = std::time::SystemTime::now();
        for root in ["tasks", "logs"] {
            let Ok(entries) = fs::read_dir(self.cfg.data_dir.join(root)) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if keep.iter().any(|k| path_component(k) == name) {
                    continue;
                }
                let path = entry.path();
                let (newest, bytes) = newest_and_size(&path);
                let old_enough = newest
                    .and_then(|t| now.duration_since(t).ok())
                    .is_some_and(|age| age >= retention);
                if !old_enough {
                    continue;
                }
                match fs::remove_dir_all(&path) {
                    Ok(()) => {
                        report.removed_dirs += 1;
                        report.removed_bytes += bytes;
                    }
                    Err(e) => {
                        tracing::warn!(dir = %path.display(), error = %e, "cannot remove a finished task's files");
                    }
                }
            }
        }
        report
    }

    /// Atomically replaces the lease deadline (milliseconds of [`boottime_ms`](super::boottime_ms))
    /// every shim of this worker enforces. Call after every successful heartbeat.
    pub fn write_lease_deadline(&self, deadline_boottime_ms: u64) -> Result<(), DriverError> {
        lease::write_deadline(&self.cfg.lease_file, deadline_boottime_ms)
            .map_err(|e| DriverError::io("writing lease file", &self.cfg.lease_file, e))
    }

    /// `<data_dir>/logs/<job>/task-<n>.log`: one file per task across epochs, appended, with a
    /// header line before each launch, so one file tells the task's whole story.
    pub fn log_path(&self, job: &str, task: u32) -> PathBuf {
        self.cfg
            .data_dir
            .join("logs")
            .join(path_component(job))
            .join(format!("task-{task}.log"))
    }

    /// Starts the task's shim, which starts the task. The task failing to start (command not
    /// found) is not an error here: the handle's [`wait`](TaskHandle::wait) returns reason
    /// [`FailedToStart`](super::ExitReason::FailedToStart) naming the program. Errors are bad
    /// specs and failures of the driver's own files or of the shim binary.
    pub async fn launch(&self, spec: LaunchSpec) -> Result<TaskHandle, DriverError> {
        validate(&spec)?;
        let key = spec.key.clone();
        let result = self.prepare_and_spawn(spec).await;
        if result.is_err() {
            self.retire(&key);
        }
        result
    }

    async fn prepare_and_spawn(&self, spec: LaunchSpec) -> Result<TaskHandle, DriverError> {
        let key = spec.key.clone();
        let task_dir = self.task_dir(&key);
        self.open_task_dir(&task_dir, key.epoch)?;
        let work_dir = match &spec.work_dir {
            Some(dir) => dir.clone(),
            None => layout::work_dir(&task_dir, spec.identity.as_ref())?,
        };
        let exit_file = task_dir.join(format!("exit-{}.json", key.epoch));
        // A stale exit file (a relaunch of the same epoch) would be taken for this run's.
        match fs::remove_file(&exit_file) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(DriverError::io("removing stale exit file", &exit_file, e))
            }
            _ => {}
        }
        let log_file = self.log_path(&key.job, key.task);
        let shim_args = ShimArgs {
            log_cap: Some((log_file.clone(), self.log_max_bytes)),
            exit_file: exit_file.clone(),
            lease_file: self.cfg.lease_file.clone(),
            grace: spec.fence_grace.unwrap_or(self.cfg.grace),
            workdir: Some(work_dir.clone()),
            command: spec.command.clone(),
            identity: spec.identity.clone(),
        };
        let mut env = spec.env.clone();
        if spec.identity.is_some() {
            // The agent's home is not the task's: its working directory is, unless the job says.
            env.entry("HOME".into())
                .or_insert_with(|| work_dir.display().to_string());
        }
        let log = open_log(&log_file, &key)?;
        let started = self
            .start_shim(&key, &shim_args, env, log, &log_file)
            .await?;
        let record = ProcessRecord {
            key,
            pid: started.pid,
            start_ticks: started.start_ticks,
            exit_file,
            log_file,
            identity: spec.identity,
        };
        tracing::info!(task = %record.key, pid = record.pid, identity = ?record.identity, forked = started.child.is_none(), "launched task");
        Ok(match started.child {
            Some(child) => TaskHandle::launched(record, child),
            None => TaskHandle::forked(record, started.pidfd),
        })
    }

    /// Starts the shim: forked by the fork server when there is one and it answers, else
    /// executed by this process.
    async fn start_shim(
        &self,
        key: &TaskKey,
        shim_args: &ShimArgs,
        env: std::collections::BTreeMap<String, String>,
        log: fs::File,
        log_file: &Path,
    ) -> Result<Started, DriverError> {
        if let Some(server) = &self.fork_server {
            match server.fork(shim_args.to_args(), env.clone(), &log).await {
                Ok(forked) => {
                    return Ok(Started {
                        pid: forked.pid,
                        start_ticks: forked.start_ticks,
                        child: None,
                        pidfd: forked.pidfd,
                    })
                }
                Err(why) => {
                    tracing::warn!(task = %key, %why, "the shim fork server failed; executing the shim")
                }
            }
        }
        let (pid, child) = self.spawn_shim(shim_args, &env, log, log_file)?;
        // The shim is our unreaped child, so its /proc entry exists even if it already exited.
        let start_ticks = match ProcStat::read(pid) {
            Ok(stat) => stat.start_ticks,
            Err(e) => {
                tracing::warn!(task = %key, pid, error = %e, "cannot read the shim's start time; it cannot be re-adopted");
                0
            }
        };
        Ok(Started {
            pid,
            start_ticks,
            child: Some(child),
            pidfd: None,
        })
    }

    /// Starts the shim in a process group of its own, its output appended to the task's log.
    fn spawn_shim(
        &self,
        shim_args: &ShimArgs,
        env: &std::collections::BTreeMap<String, String>,
        log: fs::File,
        log_file: &Path,
    ) -> Result<(i32, tokio::process::Child), DriverError> {
        let log_err = log
            .try_clone()
            .map_err(|e| DriverError::io("duplicating log file", log_file, e))?;
        let program = &self.cfg.shim_command[0];
        let mut command = tokio::process::Command::new(program);
        command
            .args(&self.cfg.shim_command[1..])
            .args(shim_args.to_args())
            .envs(env)
            // The shim's own directory pins no mount; the task's is set by the shim.
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own group: the driver signals the group, and a signal to the agent's group
            // (Ctrl-C, a service manager) never reaches tasks.
            .process_group(0)
            // The task must outlive the agent.
            .kill_on_drop(false);
        let spawn_err = |source| DriverError::SpawnShim {
            program: program.clone(),
            source,
        };
        let child = command.spawn().map_err(spawn_err)?;
        let pid = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .ok_or_else(|| spawn_err(io::Error::other("spawned shim has no pid")))?;
        Ok((pid, child))
    }

    /// Opens a task's directory to its task (0711) and notes the newest epoch launched in it, so
    /// an older epoch ending later does not close it under the newer one.
    fn open_task_dir(&self, task_dir: &Path, epoch: u64) -> Result<(), DriverError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(parent) = task_dir.parent() {
            layout::ensure_dir(parent, layout::PASSABLE)?;
        }
        layout::ensure_dir(task_dir, layout::PASSABLE)?;
        let newest = open.entry(task_dir.to_path_buf()).or_insert(epoch);
        *newest = (*newest).max(epoch);
        Ok(())
    }

    /// Closes the task's directory (0700) once its task has ended, unless a newer epoch of the
    /// same task was launched in it meanwhile: whoever gets the task's uid later must not reach
    /// what it left. Errors are logged.
    pub fn retire(&self, key: &TaskKey) {
        let task_dir = self.task_dir(key);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open
            .get(&task_dir)
            .is_some_and(|newest| *newest > key.epoch)
        {
            return;
        }
        open.remove(&task_dir);
        close_dir(&task_dir);
    }

    /// Closes every task directory no running task holds: after a restart, those of tasks that
    /// ended while the agent was away. Call once the running tasks are adopted.
    pub fn close_idle_task_dirs(&self) {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let jobs = fs::read_dir(self.cfg.data_dir.join("tasks"))
            .into_iter()
            .flatten();
        for job in jobs.flatten() {
            for task in fs::read_dir(job.path()).into_iter().flatten().flatten() {
                let path = task.path();
                if path.is_dir() && !open.contains_key(&path) {
                    close_dir(&path);
                }
            }
        }
    }

    /// Re-adopts a task an earlier agent started: `Ok(handle)` when its shim still runs (same pid
    /// AND same start time, so a recycled pid is never adopted); `Err(outcome)` when it has ended,
    /// from its exit file, or reason [`Lost`](super::ExitReason::Lost) without one.
    pub fn adopt(&self, record: &ProcessRecord) -> Result<TaskHandle, ExitOutcome> {
        if record.pid > 1 && same_process_alive(record.pid, record.start_ticks) {
            tracing::info!(task = %record.key, pid = record.pid, "adopted running task");
            let task_dir = self.task_dir(&record.key);
            if let Err(e) = self.open_task_dir(&task_dir, record.key.epoch) {
                tracing::warn!(task = %record.key, error = %e, "cannot open the adopted task's directory to it");
            }
            return Ok(TaskHandle::adopted(record.clone()));
        }
        Err(match exit_file::read(&record.exit_file) {
            Ok(Some(outcome)) => outcome,
            Ok(None) => ExitOutcome::lost(format!(
                "task {} is gone without an exit file (pid {} is not the shim that was started): \
                 killed from outside, or the host rebooted",
                record.key, record.pid
            )),
            Err(e) => ExitOutcome::lost(e),
        })
    }

    /// `<data_dir>/tasks/<job>/task-<n>`: the exit file of each epoch (`exit-<E>.json`) and the
    /// default working directory.
    fn task_dir(&self, key: &TaskKey) -> PathBuf {
        self.cfg
            .data_dir
            .join("tasks")
            .join(path_component(&key.job))
            .join(format!("task-{}", key.task))
    }
}

/// A shim just started: executed (our `child`) or forked by the fork server (its `pidfd`, where
/// the kernel has them).
struct Started {
    pid: i32,
    start_ticks: u64,
    child: Option<tokio::process::Child>,
    pidfd: Option<std::os::fd::OwnedFd>,
}

/// What a [`TaskDriver::sweep`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub removed_dirs: usize,
    pub removed_bytes: u64,
}

/// The newest modification time under `dir` and the bytes it holds.
fn newest_and_size(dir: &Path) -> (Option<std::time::SystemTime>, u64) {
    let mut newest = None;
    let mut bytes = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(meta) = fs::symlink_metadata(&d) else {
            continue;
        };
        if let Ok(m) = meta.modified() {
            newest = newest.max(Some(m));
        }
        if meta.is_dir() {
            if let Ok(entries) = fs::read_dir(&d) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        } else {
            bytes += meta.len();
        }
    }
    (newest, bytes)
}

fn validate(spec: &LaunchSpec) -> Result<(), DriverError> {
    let bad = |reason: String| DriverError::InvalidSpec {
        key: spec.key.to_string(),
        reason,
    };
    match spec.command.first() {
        Some(program) if !program.is_empty() => {}
        _ => return Err(bad("empty command".into())),
    }
    if spec.command.iter().any(|a| a.contains('\0')) {
        return Err(bad("a command argument contains a NUL byte".into()));
    }
    if let Some(identity) = &spec.identity {
        identity.check().map_err(bad)?;
    }
    for (name, value) in &spec.env {
        if name.is_empty() || name.contains('=') || name.contains('\0') || value.contains('\0') {
            return Err(bad(format!("invalid environment variable `{name}`")));
        }
    }
    Ok(())
}

/// Closes a task's directory to everyone but the agent; a missing one is not an error.
fn close_dir(task_dir: &Path) {
    match fs::set_permissions(task_dir, fs::Permissions::from_mode(layout::PRIVATE)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            tracing::warn!(dir = %task_dir.display(), error = %e, "cannot close a finished task's directory");
        }
        _ => {}
    }
}

/// Opens the task's log for appending (the agent's alone: the task writes it through the
/// descriptors it inherits) and writes the launch header.
fn open_log(path: &Path, key: &TaskKey) -> Result<fs::File, DriverError> {
    if let Some(dir) = path.parent() {
        layout::ensure_dir(dir, layout::PRIVATE)?;
    }
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| DriverError::io("opening task log", path, e))?;
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    writeln!(
        file,
        "=== gangway: epoch {} started at {now} (task {key})",
        key.epoch
    )
    .map_err(|e| DriverError::io("writing task log", path, e))?;
    Ok(file)
}

fn create_dir(dir: &Path) -> Result<(), DriverError> {
    fs::create_dir_all(dir).map_err(|e| DriverError::io("creating directory", dir, e))
}

/// A job name as one safe path component: bytes outside `[A-Za-z0-9_.-]`, and a leading `.`,
/// become `%XX`, so `../x` or `a/b` can never leave the driver's directories, and distinct names
/// stay distinct.
fn path_component(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for (i, byte) in name.bytes().enumerate() {
        let plain =
            byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-') || (byte == b'.' && i > 0);
        if plain {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    if out.is_empty() {
        out.push('%');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_cannot_escape_the_data_dir() {
        assert_eq!(path_component("train-7b_v2.1"), "train-7b_v2.1");
        assert_eq!(path_component(".."), "%2E.");
        assert_eq!(path_component("a/b"), "a%2Fb");
        assert_eq!(path_component("a%2Fb"), "a%252Fb");
        assert_eq!(path_component(""), "%");
        assert_eq!(path_component("é"), "%C3%A9");
    }

    #[test]
    fn new_rejects_an_empty_shim_command() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = DriverConfig {
            shim_command: vec![],
            fork_server: false,
            data_dir: dir.path().into(),
            lease_file: dir.path().join("lease"),
            grace: std::time::Duration::from_secs(1),
        };
        assert!(matches!(TaskDriver::new(cfg), Err(DriverError::Config(_))));
    }

    #[test]
    fn a_sweep_removes_old_files_of_finished_jobs_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut driver = TaskDriver::new(DriverConfig {
            shim_command: vec!["gangway".into(), "task-shim".into()],
            fork_server: false,
            data_dir: dir.path().into(),
            lease_file: dir.path().join("lease"),
            grace: std::time::Duration::from_secs(1),
        })
        .unwrap();
        assert!(driver.set_log_max_bytes(100).is_err());
        driver.set_log_max_bytes(1 << 20).unwrap();
        for job in ["live-1", "done-2", "a/b"] {
            let task = dir
                .path()
                .join("tasks")
                .join(path_component(job))
                .join("task-0");
            fs::create_dir_all(&task).unwrap();
            fs::write(task.join("exit-1.json"), b"{}").unwrap();
            let logs = dir.path().join("logs").join(path_component(job));
            fs::create_dir_all(&logs).unwrap();
            fs::write(logs.join("task-0.log"), vec![b'x'; 1000]).unwrap();
        }
        let keep: std::collections::BTreeSet<String> = ["live-1".to_owned()].into();
        // Young files stay, whoever they belong to.
        let hour = std::time::Duration::from_secs(3600);
        assert_eq!(driver.sweep(&keep, hour), SweepReport::default());
        // Past the retention, the finished jobs' files go (names escaped as on disk); the live
        // job's stay.
        let report = driver.sweep(&keep, std::time::Duration::ZERO);
        assert_eq!(report.removed_dirs, 4);
        assert_eq!(report.removed_bytes, 2 * (1000 + 2));
        assert!(dir.path().join("tasks/live-1/task-0/exit-1.json").exists());
        assert!(dir.path().join("logs/live-1/task-0.log").exists());
        assert!(!dir.path().join("tasks/done-2").exists());
        assert!(!dir.path().join("logs").join(path_component("a/b")).exists());
    }
}
