//! [`TaskHandle`]: one running (or ended) task, as the agent holds it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::os::fd::OwnedFd;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::watch;

use super::procfs::same_process_alive;
use super::signals::{parse_signal, signal_group};
use super::{exit_file, DriverError, ExitOutcome, ExitReason, ProcessRecord, TaskKey};

/// How often an adopted task (whose shim is not our child, so we cannot wait for it) is checked.
const ADOPTED_POLL: Duration = Duration::from_millis(100);

/// A task's shim and what is known about its end. Cheap to clone (an `Arc` inside); every method
/// takes `&self` and may be called concurrently from many tasks.
///
/// Dropping every handle neither stops nor forgets the task: it keeps running in its own process
/// group, its shim keeps its exit file, and a later [`TaskDriver::adopt`](super::TaskDriver::adopt)
/// finds it again.
#[derive(Clone)]
pub struct TaskHandle {
    inner: Arc<Inner>,
}

struct Inner {
    record: ProcessRecord,
    /// Whether the shim is not a child of this process (adopted, or forked by the fork server).
    /// Then the pid is re-checked against its start time before every signal, since nothing
    /// stops it being recycled.
    not_child: bool,
    /// `None` while the shim runs; the outcome once the watcher saw it end.
    outcome: watch::Receiver<Option<ExitOutcome>>,
    flags: Arc<StopFlags>,
}

/// Settles a handle's outcome once its shim has ended.
struct Watcher {
    tx: watch::Sender<Option<ExitOutcome>>,
    exit_file: std::path::PathBuf,
    flags: Arc<StopFlags>,
}

impl Watcher {
    fn ended(self, how: &str) {
        let _ = self
            .tx
            .send(Some(conclude(&self.exit_file, &self.flags, how)));
    }
}

/// What this side did to the task, which the exit file alone cannot say.
#[derive(Default)]
struct StopFlags {
    stop_requested: AtomicBool,
    killed: AtomicBool,
}

impl TaskHandle {
    /// A handle on `record`'s shim and the watcher that settles its outcome. `child`: whether
    /// the shim is this process's child.
    fn watched(record: ProcessRecord, child: bool) -> (Self, Watcher) {
        let (tx, rx) = watch::channel(None);
        let flags = Arc::new(StopFlags::default());
        let watcher = Watcher {
            tx,
            exit_file: record.exit_file.clone(),
            flags: flags.clone(),
        };
        let inner = Inner {
            record,
            not_child: !child,
            outcome: rx,
            flags,
        };
        let handle = TaskHandle {
            inner: Arc::new(inner),
        };
        (handle, watcher)
    }

    /// Watches a shim this process started: a background task reaps it (so it never lingers as a
    /// zombie) and then reads its exit file.
    pub(crate) fn launched(record: ProcessRecord, mut child: tokio::process::Child) -> Self {
        let (handle, watcher) = Self::watched(record, true);
        tokio::spawn(async move {
            let how = match child.wait().await {
                Ok(status) => format!("shim {status}"),
                Err(e) => format!("cannot wait for the shim: {e}"),
            };
            watcher.ended(&how);
        });
        handle
    }

    /// Watches a shim the fork server started (not our child, so not ours to wait for): woken
    /// by its pidfd when it exits, or polled as an adopted one where there is no pidfd.
    pub(crate) fn forked(record: ProcessRecord, pidfd: Option<OwnedFd>) -> Self {
        let Some(pidfd) = pidfd else {
            return Self::adopted(record);
        };
        let (pid, ticks) = (record.pid, record.start_ticks);
        let (handle, watcher) = Self::watched(record, false);
        tokio::spawn(async move {
            // SAFETY: the AsyncFd owns the pidfd, which stays open and the same until it drops.
            let registered = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) };
            let how = match registered {
                Ok(fd) => match fd.readable().await {
                    Ok(_) => "the shim exited".to_owned(),
                    Err(e) => format!("cannot watch the shim: {e}"),
                },
                Err(_) => {
                    poll_until_gone(pid, ticks).await;
                    "the shim is gone".to_owned()
                }
            };
            watcher.ended(&how);
        });
        handle
    }

    /// Watches a shim an earlier agent started, by polling `/proc`. Uses the current Tokio
    /// runtime when there is one, else a thread of its own.
    pub(crate) fn adopted(record: ProcessRecord) -> Self {
        let (pid, ticks) = (record.pid, record.start_ticks);
        let (handle, watcher) = Self::watched(record, false);
        let done = move || watcher.ended("the adopted shim is gone");
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    poll_until_gone(pid, ticks).await;
                    done();
                });
            }
            Err(_) => {
                std::thread::spawn(move || {
                    while same_process_alive(pid, ticks) {
                        std::thread::sleep(ADOPTED_POLL);
                    }
                    done();
                });
            }
        }
        handle
    }

    pub fn key(&self) -> &TaskKey {
        &self.inner.record.key
    }

    /// What the agent persists to re-adopt this task after a restart.
    pub fn record(&self) -> ProcessRecord {
        self.inner.record.clone()
    }

    /// Sends a signal by name ("SIGUSR1", "USR1") to the task's whole process group, so a
    /// launcher's workers get it too; the shim survives it. An unknown name is an error naming
    /// it; a task that has already ended is not an error.
    pub fn signal(&self, signal_name: &str) -> Result<(), DriverError> {
        let (signal, _) = parse_signal(signal_name)?;
        self.send(signal)
    }

    /// Waits for the task to end. Cancel-safe; any number of concurrent waiters; once ended, every
    /// call returns the same outcome at once.
    pub async fn wait(&self) -> ExitOutcome {
        let mut rx = self.inner.outcome.clone();
        let outcome = rx
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|o| o.clone());
        // The watcher only drops its sender after sending, unless its runtime shut down first.
        outcome.unwrap_or_else(|| {
            ExitOutcome::lost("the driver stopped watching the task (runtime shut down)")
        })
    }

    /// Stops the task: SIGTERM to the group, up to `grace` for it to exit, then SIGKILL to the
    /// group. Reason [`ExitReason::Stopped`], or [`ExitReason::Killed`] when SIGKILL was needed.
    /// Idempotent: a task that already ended keeps the outcome it had.
    pub async fn stop(&self, grace: Duration) -> ExitOutcome {
        if let Some(outcome) = self.finished() {
            return outcome;
        }
        self.inner
            .flags
            .stop_requested
            .store(true, Ordering::SeqCst);
        if let Err(e) = self.send(libc::SIGTERM) {
            tracing::warn!(task = %self.key(), error = %e, "stop: SIGTERM failed");
        }
        if let Ok(outcome) = tokio::time::timeout(grace, self.wait()).await {
            return outcome;
        }
        self.inner.flags.killed.store(true, Ordering::SeqCst);
        if let Err(e) = self.send(libc::SIGKILL) {
            tracing::warn!(task = %self.key(), error = %e, "stop: SIGKILL failed");
        }
        self.wait().await
    }

    /// Whether the task's shim is still running (as of the watcher's last look, for adopted
    /// tasks at most 100 ms ago).
    pub fn is_running(&self) -> bool {
        self.inner.outcome.borrow().is_none()
    }

    fn finished(&self) -> Option<ExitOutcome> {
        self.inner.outcome.borrow().clone()
    }

    fn send(&self, signal: libc::c_int) -> Result<(), DriverError> {
        if self.finished().is_some() {
            return Ok(());
        }
        let record = &self.inner.record;
        // Our own child's pid cannot be recycled before we reap it, and a process group id stays
        // taken while any member lives; a pid that is not our child has no such guarantee, so
        // check it is still the process we recorded.
        if self.inner.not_child && !same_process_alive(record.pid, record.start_ticks) {
            return Ok(());
        }
        signal_group(record.pid, signal)
    }
}

/// Returns once the process `pid` started at `ticks` is gone, looking every [`ADOPTED_POLL`].
async fn poll_until_gone(pid: i32, ticks: u64) {
    let mut tick = tokio::time::interval(ADOPTED_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while same_process_alive(pid, ticks) {
        tick.tick().await;
    }
}

/// Turns the exit file (or its absence) and what we did into the task's outcome.
fn conclude(exit_file: &std::path::Path, flags: &StopFlags, how: &str) -> ExitOutcome {
    let stopped = flags.stop_requested.load(Ordering::SeqCst);
    let killed = flags.killed.load(Ordering::SeqCst);
    match exit_file::read(exit_file) {
        Ok(Some(mut outcome)) => {
            if stopped && outcome.reason == ExitReason::Exited {
                if killed && outcome.signal == Some(libc::SIGKILL) {
                    outcome.reason = ExitReason::Killed;
                    outcome.message = format!(
                        "stopped on request; did not exit within the grace and was killed: {}",
                        outcome.message
                    );
                } else {
                    outcome.reason = ExitReason::Stopped;
                    outcome.message = format!("stopped on request: {}", outcome.message);
                }
            }
            outcome
        }
        Ok(None) if killed => ExitOutcome {
            code: None,
            signal: Some(libc::SIGKILL),
            reason: ExitReason::Killed,
            message: "stopped on request; did not exit within the grace and was sent SIGKILL"
                .into(),
        },
        Ok(None) => ExitOutcome::lost(format!(
            "the task's shim ended without an exit file ({how}): killed from outside, or the host \
             rebooted"
        )),
        Err(e) if killed => ExitOutcome {
            code: None,
            signal: Some(libc::SIGKILL),
            reason: ExitReason::Killed,
            message: format!("stopped on request and sent SIGKILL; {e}"),
        },
        Err(e) => ExitOutcome::lost(format!("{e} ({how})")),
    }
}
