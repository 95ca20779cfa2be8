//! The task shim: a small supervisor between the driver and each task (`gangway task-shim`).
//!
//! Why it exists: the agent may die or restart while tasks run. The shim
//!
//! * records the task's real exit status in the *exit file*, so a task an agent re-adopts (and
//!   so cannot `wait` for, not being its parent) still has a known exit;
//! * enforces the lease deadline even when the agent is dead: a worker cut off from the scheduler
//!   must not keep running a gang the scheduler has already placed elsewhere.
//!
//! The driver starts the shim as the leader of a new process group, with its stdout and stderr
//! appended to the task's log; the shim starts the task in that same group, inheriting stdio and
//! environment. The driver signals the whole group, so the shim survives the signals it relays
//! (no-op handlers) while the task gets them with their default dispositions.
//!
//! Flags: `--exit-file PATH --lease-file PATH --grace-ms N [--workdir DIR]
//! [--log-file PATH --log-max-bytes N] [--uid N --gid N [--groups A,B]] -- CMD [ARGS...]`.
//!
//! With `--uid`, the task (not the shim) runs as that user (see [`TaskIdentity`]): it cannot
//! write the lease file, the exit file or the agent's files, nor signal the shim.
//!
//! With `--log-file`, the shim also caps the task's log (its own stdout and stderr, which the task
//! inherits, opened in append mode): past `--log-max-bytes` the log is copied to `PATH.1`
//! (replacing the older one) and truncated, as logrotate's `copytruncate` does; every writer
//! appends, so writes go on at the new end. Output written between the copy and the truncation
//! (well under a poll interval) can be lost; that is the price of not stopping the task.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use super::child_exit::ChildExit;
use super::lease::{boottime_ms, read_deadline};
use super::signals::{signal_group, signal_name, survive_group_signals};
use super::{exit_file, task_huge_pages, DriverError, ExitOutcome, ExitReason, TaskIdentity};

/// How often the shim re-reads the lease file.
const LEASE_POLL: Duration = Duration::from_millis(100);

/// The shim's command line, the flags after `gangway task-shim`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShimArgs {
    pub exit_file: PathBuf,
    pub lease_file: PathBuf,
    /// Fencing starts this long before the lease deadline, and the task gets this long between
    /// SIGTERM and SIGKILL; a lease file unreadable for this long also fences.
    pub grace: Duration,
    /// The task's working directory; the shim's own when absent.
    pub workdir: Option<PathBuf>,
    /// Program and arguments of the task; never empty.
    pub command: Vec<String>,
    /// The task's log and the size past which it is rotated.
    pub log_cap: Option<(PathBuf, u64)>,
    /// Who the task runs as; the shim's own user when absent.
    pub identity: Option<TaskIdentity>,
}

impl ShimArgs {
    /// Parses the flags after `task-shim`. Every flag takes a separate value; `--` ends the flags
    /// and everything after it is the task's command.
    pub fn parse(args: &[String]) -> Result<ShimArgs, DriverError> {
        let err = |m: String| DriverError::ShimArgs(m);
        let mut exit_file = None;
        let mut lease_file = None;
        let mut grace_ms = None;
        let mut workdir = None;
        let mut log_file = None;
        let mut log_max = None;
        let (mut uid, mut gid, mut groups) = (None, None, None);
        let mut iter = args.iter();
        let command = loop {
            let Some(flag) = iter.next() else {
                return Err(err("missing `--` and the task's command".into()));
            };
            if flag == "--" {
                break iter.cloned().collect::<Vec<_>>();
            }
            let slot = match flag.as_str() {
                "--exit-file" => &mut exit_file,
                "--lease-file" => &mut lease_file,
                "--grace-ms" => &mut grace_ms,
                "--workdir" => &mut workdir,
                "--log-file" => &mut log_file,
                "--log-max-bytes" => &mut log_max,
                "--uid" => &mut uid,
                "--gid" => &mut gid,
                "--groups" => &mut groups,
                other => return Err(err(format!("unknown flag `{other}`"))),
            };
            let Some(value) = iter.next() else {
                return Err(err(format!("`{flag}` needs a value")));
            };
            if slot.replace(value.clone()).is_some() {
                return Err(err(format!("`{flag}` given twice")));
            }
        };
        if command.is_empty() || command[0].is_empty() {
            return Err(err("empty task command after `--`".into()));
        }
        let required = |v: Option<String>, flag: &str| {
            v.filter(|v| !v.is_empty())
                .ok_or_else(|| err(format!("missing `{flag}`")))
        };
        let exit_file = PathBuf::from(required(exit_file, "--exit-file")?);
        let lease_file = PathBuf::from(required(lease_file, "--lease-file")?);
        let grace_text = required(grace_ms, "--grace-ms")?;
        let grace_ms: u64 = grace_text.parse().map_err(|_| {
            err(format!(
                "`--grace-ms` wants milliseconds, got `{grace_text}`"
            ))
        })?;
        let log_cap = match (log_file, log_max) {
            (None, None) => None,
            (Some(path), Some(max)) => {
                let bytes: u64 = max.parse().ok().filter(|&b| b >= 4096).ok_or_else(|| {
                    err(format!(
                        "`--log-max-bytes` wants a byte count of at least 4096, got `{max}`"
                    ))
                })?;
                Some((PathBuf::from(path), bytes))
            }
            _ => return Err(err("`--log-file` and `--log-max-bytes` go together".into())),
        };
        let identity = TaskIdentity::from_flags(uid, gid, groups).map_err(err)?;
        Ok(ShimArgs {
            exit_file,
            lease_file,
            grace: Duration::from_millis(grace_ms),
            workdir: workdir.map(PathBuf::from),
            command,
            log_cap,
            identity,
        })
    }

    /// The flags for `args`, as the driver appends them to the shim command.
    pub(crate) fn to_args(&self) -> Vec<String> {
        let mut out = vec![
            "--exit-file".to_string(),
            self.exit_file.display().to_string(),
            "--lease-file".to_string(),
            self.lease_file.display().to_string(),
            "--grace-ms".to_string(),
            self.grace.as_millis().to_string(),
        ];
        if let Some(dir) = &self.workdir {
            out.push("--workdir".into());
            out.push(dir.display().to_string());
        }
        if let Some((path, max)) = &self.log_cap {
            out.push("--log-file".into());
            out.push(path.display().to_string());
            out.push("--log-max-bytes".into());
            out.push(max.to_string());
        }
        if let Some(identity) = &self.identity {
            out.extend(identity.to_args());
        }
        out.push("--".into());
        out.extend(self.command.iter().cloned());
        out
    }
}

/// What the shim binary does with its flags: serve as the driver's fork server (`--fork-server
/// <data dir>`, see `fork_server.rs`) or supervise one task. Returns the exit code; `Err` for flags
/// that are neither. Blocking: call it from `main` before starting any async runtime.
pub fn shim_main(args: &[String]) -> Result<i32, DriverError> {
    if let [flag, _data_dir] = args {
        if flag == super::fork_server::FLAG {
            return Ok(super::fork_server::serve());
        }
    }
    Ok(run_shim(ShimArgs::parse(args)?))
}

/// Runs the shim until the task ends; returns the shim's exit code (0 once the exit file is
/// written). Blocking: call it from `main` before starting any async runtime.
pub fn run_shim(args: ShimArgs) -> i32 {
    let program = args.command.first().cloned().unwrap_or_default();
    if let Err(e) = survive_group_signals() {
        // Without the handlers the first stop or checkpoint signal would kill the shim and the
        // exit would be lost; better not to start.
        return finish(
            &args.exit_file,
            outcome(
                None,
                ExitReason::FailedToStart,
                format!("failed to start `{program}`: shim cannot install signal handlers: {e}"),
            ),
        );
    }
    let mut lease = LeaseWatch::new(args.lease_file.clone(), args.grace);
    if let Some(why) = lease.check() {
        return finish(
            &args.exit_file,
            outcome(
                None,
                ExitReason::LeaseExpired,
                format!("not started: {why}"),
            ),
        );
    }
    task_huge_pages::restore_for_task();
    let mut child = match start_task(&args, &program) {
        Ok(child) => child,
        Err(why) => {
            return finish(
                &args.exit_file,
                outcome(
                    None,
                    ExitReason::FailedToStart,
                    format!("failed to start `{program}`: {why}"),
                ),
            )
        }
    };
    let exited = ChildExit::new(&child);
    let mut next_lease_check = Instant::now() + LEASE_POLL;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let message = describe(&program, status);
                return finish(
                    &args.exit_file,
                    outcome(Some(status), ExitReason::Exited, message),
                );
            }
            Ok(None) => {}
            Err(e) => {
                // Cannot happen for our own child; without a way to learn the exit, say so.
                return finish(
                    &args.exit_file,
                    outcome(
                        None,
                        ExitReason::Lost,
                        format!("shim cannot wait for `{program}`: {e}"),
                    ),
                );
            }
        }
        if Instant::now() >= next_lease_check {
            next_lease_check += LEASE_POLL;
            if let Some(why) = lease.check() {
                return fence(&args, &program, &mut child, &exited, &why);
            }
            if let Some((path, max)) = &args.log_cap {
                if let Err(e) = rotate_log(path, *max) {
                    eprintln!("gangway task-shim: cannot rotate {}: {e}", path.display());
                }
            }
        }
        // Until the task exits or the next lease check is due.
        exited.wait(next_lease_check.saturating_duration_since(Instant::now()));
    }
}

/// Starts the task in the working directory, as its identity; `Err` says why it could not.
fn start_task(args: &ShimArgs, program: &str) -> Result<Child, String> {
    let mut command = Command::new(program);
    command.args(&args.command[1..]);
    command.env_remove(task_huge_pages::var_name());
    if let Some(dir) = &args.workdir {
        if !dir.is_dir() {
            return Err(format!(
                "working directory {} is not a directory",
                dir.display()
            ));
        }
        command.current_dir(dir);
    }
    if let Some(identity) = &args.identity {
        identity.check()?;
        identity.apply(&mut command);
    }
    command.spawn().map_err(|e| match &args.identity {
        Some(identity) => format!("{e} (running as {identity})"),
        None => e.to_string(),
    })
}

/// The lease ran out: SIGTERM the group, give the task the grace, record the exit, then SIGKILL
/// the group, which also ends anything the task left behind, and the shim itself.
fn fence(args: &ShimArgs, program: &str, child: &mut Child, exited: &ChildExit, why: &str) -> i32 {
    eprintln!("gangway task-shim: {why}; sending SIGTERM to the task");
    let leader = own_group();
    match leader {
        Some(pgid) => {
            let _ = signal_group(pgid, libc::SIGTERM);
        }
        None => {
            // SAFETY: kill has no memory-safety preconditions; the child is ours and unreaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
    }
    let give_up = Instant::now() + args.grace;
    let mut status = None;
    while status.is_none() && Instant::now() < give_up {
        status = child.try_wait().ok().flatten();
        if status.is_none() {
            exited.wait(give_up.saturating_duration_since(Instant::now()));
        }
    }
    let detail = match status {
        Some(s) => describe(program, s),
        None => format!("`{program}` did not exit within the grace and was sent SIGKILL"),
    };
    let code = finish(
        &args.exit_file,
        outcome(status, ExitReason::LeaseExpired, format!("{why}; {detail}")),
    );
    match leader {
        Some(pgid) => {
            let _ = signal_group(pgid, libc::SIGKILL);
        }
        None => {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    code
}

/// Copies the log to `<log>.1` and truncates it once it is larger than `max` bytes.
pub(crate) fn rotate_log(path: &Path, max: u64) -> std::io::Result<bool> {
    let len = std::fs::metadata(path)?.len();
    if len <= max {
        return Ok(false);
    }
    let mut old = path.as_os_str().to_owned();
    old.push(".1");
    std::fs::copy(path, &old)?;
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    file.set_len(0)?;
    use std::io::Write;
    let mut append = std::fs::OpenOptions::new().append(true).open(path)?;
    writeln!(
        append,
        "=== gangway: log rotated at {len} bytes (cap {max}); the previous part is in {}",
        std::path::Path::new(&old).display()
    )?;
    Ok(true)
}

/// Our process group, when we lead it (the driver starts us that way). Run by hand from a shell,
/// the shim is in the shell's group, which it must never signal.
fn own_group() -> Option<i32> {
    // SAFETY: getpgrp and getpid cannot fail and touch no memory.
    let (pgid, pid) = unsafe { (libc::getpgrp(), libc::getpid()) };
    (pgid == pid && pgid > 1).then_some(pgid)
}

fn outcome(status: Option<ExitStatus>, reason: ExitReason, message: String) -> ExitOutcome {
    use std::os::unix::process::ExitStatusExt;
    ExitOutcome {
        code: status.and_then(|s| s.code()),
        signal: status.and_then(|s| s.signal()),
        reason,
        message,
    }
}

fn describe(program: &str, status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("`{program}` exited with code {code}"),
        (None, Some(signal)) => format!("`{program}` was killed by {}", signal_name(signal)),
        _ => format!("`{program}` ended: {status}"),
    }
}

/// Writes the exit file; the shim's exit code says whether that worked.
fn finish(exit_file: &Path, outcome: ExitOutcome) -> i32 {
    match exit_file::write(exit_file, &outcome) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!(
                "gangway task-shim: cannot write exit file {} ({e}); the task ended: {}",
                exit_file.display(),
                outcome.message
            );
            1
        }
    }
}

/// Decides, from the lease file, whether the task must be fenced.
struct LeaseWatch {
    path: PathBuf,
    grace_ms: u64,
    /// When the file was last read successfully (boottime ms); the shim's start before that.
    last_ok: u64,
}

impl LeaseWatch {
    fn new(path: PathBuf, grace: Duration) -> Self {
        LeaseWatch {
            path,
            grace_ms: u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
            last_ok: boottime_ms(),
        }
    }

    /// `Some(why)` when the task must stop now to be dead by the deadline, or when the lease
    /// file has been unreadable for longer than the grace (the agent that should renew it is
    /// gone or broken, and so is our proof that the scheduler still wants this task here).
    fn check(&mut self) -> Option<String> {
        let now = boottime_ms();
        match read_deadline(&self.path) {
            Ok(deadline) => {
                self.last_ok = now;
                (now.saturating_add(self.grace_ms) >= deadline).then(|| {
                    format!(
                        "lease expired: the worker lost contact with the scheduler and the lease \
                         deadline passed (deadline {deadline} ms, now {now} ms since boot, grace {} ms)",
                        self.grace_ms
                    )
                })
            }
            Err(e) if now.saturating_sub(self.last_ok) > self.grace_ms => Some(format!(
                "lease expired: the worker lost contact with the scheduler and the lease \
                 deadline passed (lease file {} unreadable for over {} ms: {e})",
                self.path.display(),
                self.grace_ms
            )),
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_log_cap_parses_round_trips_and_refuses_half_or_tiny_caps() {
        let base = [
            "--exit-file",
            "/x/e",
            "--lease-file",
            "/x/l",
            "--grace-ms",
            "10",
        ];
        let with = |extra: &[&str]| {
            let mut v: Vec<&str> = base.to_vec();
            v.extend_from_slice(extra);
            v.extend_from_slice(&["--", "true"]);
            ShimArgs::parse(&strings(&v))
        };
        let args = with(&["--log-file", "/x/task-0.log", "--log-max-bytes", "65536"]).unwrap();
        assert_eq!(args.log_cap, Some((PathBuf::from("/x/task-0.log"), 65536)));
        assert_eq!(ShimArgs::parse(&args.to_args()).unwrap(), args);
        for bad in [
            &["--log-file", "/x/t.log"][..],
            &["--log-max-bytes", "65536"][..],
            &["--log-file", "/x/t.log", "--log-max-bytes", "10"][..],
            &["--log-file", "/x/t.log", "--log-max-bytes", "lots"][..],
        ] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains("log"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn the_task_identity_round_trips_and_root_is_refused() {
        let base = [
            "--exit-file",
            "/x/e",
            "--lease-file",
            "/x/l",
            "--grace-ms",
            "10",
        ];
        let with = |extra: &[&str]| {
            let mut v: Vec<&str> = base.to_vec();
            v.extend_from_slice(extra);
            v.extend_from_slice(&["--", "true"]);
            ShimArgs::parse(&strings(&v))
        };
        let args = with(&["--uid", "61000", "--gid", "61001", "--groups", "44"]).unwrap();
        let identity = args.identity.clone().unwrap();
        assert_eq!(
            (identity.uid, identity.gid, identity.groups),
            (61000, 61001, vec![44])
        );
        assert_eq!(ShimArgs::parse(&args.to_args()).unwrap(), args);
        assert_eq!(with(&[]).unwrap().identity, None);
        let e = with(&["--uid", "0", "--gid", "61001"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("uid 0"), "{e}");
    }

    #[test]
    fn a_log_past_its_cap_is_copied_aside_and_truncated_while_writers_keep_appending() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("task-0.log");
        // The task's handle: append mode, as the driver opens it.
        let mut task = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        task.write_all(&vec![b'a'; 5000]).unwrap();
        assert!(!rotate_log(&path, 8192).unwrap(), "under the cap");
        task.write_all(&vec![b'b'; 5000]).unwrap();
        assert!(rotate_log(&path, 8192).unwrap());
        let old = std::fs::read(dir.path().join("task-0.log.1")).unwrap();
        assert_eq!(old.len(), 10_000);
        task.write_all(b"after\n").unwrap();
        let now = std::fs::read_to_string(&path).unwrap();
        assert!(
            now.starts_with("=== gangway: log rotated at 10000 bytes"),
            "{now}"
        );
        assert!(
            now.ends_with("after\n"),
            "the task's next write lands at the new end: {now}"
        );
        assert!(now.len() < 200);
    }

    #[test]
    fn parses_and_round_trips() {
        let args = strings(&[
            "--exit-file",
            "/x/exit.json",
            "--lease-file",
            "/x/lease",
            "--grace-ms",
            "250",
            "--workdir",
            "/tmp",
            "--",
            "sh",
            "-c",
            "echo -- hi",
        ]);
        let parsed = ShimArgs::parse(&args).unwrap();
        assert_eq!(parsed.grace, Duration::from_millis(250));
        assert_eq!(parsed.workdir, Some(PathBuf::from("/tmp")));
        assert_eq!(parsed.command, strings(&["sh", "-c", "echo -- hi"]));
        assert_eq!(parsed.to_args(), args);
    }

    #[test]
    fn malformed_arguments_are_errors_that_say_what_is_wrong() {
        let base = ["--exit-file", "e", "--lease-file", "l", "--grace-ms", "5"];
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (base.to_vec(), "missing `--`"),
            ([&base[..], &["--"]].concat(), "empty task command"),
            ([&base[..], &["--", ""]].concat(), "empty task command"),
            (
                vec!["--exit-file", "e", "--grace-ms", "5", "--", "x"],
                "missing `--lease-file`",
            ),
            (
                vec!["--lease-file", "l", "--grace-ms", "5", "--", "x"],
                "missing `--exit-file`",
            ),
            (
                vec!["--exit-file", "e", "--lease-file", "l", "--", "x"],
                "missing `--grace-ms`",
            ),
            (
                [&base[..], &["--bogus", "1", "--", "x"]].concat(),
                "unknown flag `--bogus`",
            ),
            (vec!["--exit-file"], "`--exit-file` needs a value"),
            (
                [&base[..], &["--exit-file", "f", "--", "x"]].concat(),
                "given twice",
            ),
            (
                vec![
                    "--exit-file",
                    "e",
                    "--lease-file",
                    "l",
                    "--grace-ms",
                    "soon",
                    "--",
                    "x",
                ],
                "wants milliseconds, got `soon`",
            ),
        ];
        for (args, want) in cases {
            let err = ShimArgs::parse(&strings(&args)).unwrap_err();
            assert!(matches!(err, DriverError::ShimArgs(_)));
            assert!(
                err.to_string().contains(want),
                "{args:?}: {err} lacks {want}"
            );
        }
    }

    #[test]
    fn lease_watch_fences_before_the_deadline_and_on_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lease");
        let mut watch = LeaseWatch::new(path.clone(), Duration::from_millis(200));
        // Missing, but not yet for longer than the grace.
        assert_eq!(watch.check(), None);
        crate::driver::lease::write_deadline(&path, boottime_ms() + 10_000).unwrap();
        assert_eq!(watch.check(), None);
        // Within the grace of the deadline: fence now, so the task is dead by it.
        crate::driver::lease::write_deadline(&path, boottime_ms() + 150).unwrap();
        assert!(watch.check().unwrap().contains("lease expired"));
        std::fs::remove_file(&path).unwrap();
        watch.last_ok = boottime_ms() - 500;
        assert!(watch.check().unwrap().contains("unreadable"));
    }
}
