//! Tasks running as other users (the driver's side of issue 15, item 6): a task runs with the uid
//! it was given, and cannot write the lease file or the agent's state, signal another job's task
//! or open its directory. Needs root (only root can start processes as other users); elsewhere
//! the case says why it skipped.

use super::*;
use gangway_worker::agent::state_file::{AgentState, StateFile};
use gangway_worker::driver::TaskIdentity;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

/// Uids far above any account or container range; the case checks no process uses them.
const MINE: u32 = 3_999_100_001;
const OTHER: u32 = 3_999_100_002;

fn identity(uid: u32) -> Option<TaskIdentity> {
    Some(TaskIdentity {
        uid,
        gid: uid,
        groups: vec![],
    })
}

/// Each probe prints `NAME: ALLOWED` or `NAME: REFUSED: <the error>`.
const PROBES: &str = r#"
try() { name=$1; shift; if out=$("$@" 2>&1); then echo "$name: ALLOWED"; else echo "$name: REFUSED: $out"; fi; }
echo "uid=$(id -u) gid=$(id -g)"
try lease sh -c 'echo 99 > "$LEASE"'
try state sh -c 'echo {} > "$STATE"'
try signal kill -0 "$OTHER_PID"
try other-dir sh -c 'echo x > "$OTHER_DIR/intruder"'
try other-list ls "$OTHER_DIR"
try own-dir sh -c 'echo mine > "$HOME/own"'
"#;

pub(crate) async fn tasks_are_isolated_from_the_agent_and_each_other() -> CaseResult {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        println!("    skipped: only root can run tasks as other users (this runs as uid {euid})");
        return Ok(());
    }
    let fx = Fixture::new(Duration::from_secs(1))?;
    let state = StateFile::new(fx.dir.path());
    state
        .save(&AgentState::default())
        .map_err(|e| e.to_string())?;
    let lease_before = std::fs::read_to_string(fx.path("lease")).map_err(|e| e.to_string())?;

    // Job "other" runs as OTHER and says where it is.
    let mut other = sh_spec("other", 1, "echo $$ > pid; exec sleep 30");
    other.identity = identity(OTHER);
    let other = fx.driver.launch(other).await.map_err(|e| e.to_string())?;
    let other_dir = fx.path("tasks/other/task-0/work");
    wait_for_file(&other_dir.join("pid"), LONG).await?;
    let other_pid = std::fs::read_to_string(other_dir.join("pid")).map_err(|e| e.to_string())?;

    // Job "mine" runs as MINE and tries everything it must not do, and one thing it must.
    let mut mine = sh_spec("mine", 1, PROBES);
    mine.identity = identity(MINE);
    for (k, v) in [
        ("LEASE", fx.path("lease")),
        // The one save above went to the state's second slot (save 1, slot 1).
        ("STATE", state.paths()[1].clone()),
        ("OTHER_DIR", other_dir.clone()),
    ] {
        mine.env.insert(k.into(), v.display().to_string());
    }
    mine.env.insert("OTHER_PID".into(), other_pid.trim().into());
    let handle = fx.driver.launch(mine).await.map_err(|e| e.to_string())?;
    let outcome = wait_within(&handle, LONG).await?;
    ensure!(outcome.success(), "the probes ran to the end: {outcome:?}");
    let log = std::fs::read_to_string(fx.driver.log_path("mine", 0)).map_err(|e| e.to_string())?;

    ensure!(
        log.contains(&format!("uid={MINE} gid={MINE}")),
        "runs as its own uid:\n{log}"
    );
    for (probe, errno) in [
        ("lease", "Permission denied"),
        ("state", "Permission denied"),
        ("signal", "Operation not permitted"),
        ("other-dir", "Permission denied"),
        ("other-list", "Permission denied"),
    ] {
        let line = log
            .lines()
            .find(|l| l.starts_with(&format!("{probe}: ")))
            .unwrap_or("");
        ensure!(
            line.contains("REFUSED") && line.contains(errno),
            "{probe} must be refused with {errno}, got {line:?}:\n{log}"
        );
    }
    ensure!(
        log.contains("own-dir: ALLOWED"),
        "its own directory is its own:\n{log}"
    );
    ensure!(
        std::fs::read_to_string(fx.path("lease")).map_err(|e| e.to_string())? == lease_before,
        "the lease file changed"
    );
    ensure!(
        state.load().map_err(|e| e.to_string())? == AgentState::default(),
        "state changed"
    );
    ensure!(other.is_running(), "the other job's task was not signalled");
    ensure!(
        !other_dir.join("intruder").exists(),
        "nothing written into the other job's directory"
    );
    layout_holds(&fx, &handle)?;
    other.stop(Duration::from_secs(1)).await;

    // Root is refused before anything starts.
    let mut root = sh_spec("root", 1, "true");
    root.identity = identity(0);
    let err = fx.driver.launch(root).await.err().map(|e| e.to_string());
    ensure!(
        err.as_deref().is_some_and(|e| e.contains("uid 0")),
        "uid 0 must be refused, got {err:?}"
    );
    Ok(())
}

/// The work directory is the task's, 0700; the task directory closes when it is retired.
fn layout_holds(fx: &Fixture, handle: &TaskHandle) -> CaseResult {
    let mode = |p: &Path| std::fs::metadata(p).map(|m| (m.uid(), m.permissions().mode() & 0o7777));
    let work = fx.path("tasks/mine/task-0/work");
    ensure!(
        mode(&work).ok() == Some((MINE, 0o700)),
        "work dir: {:?}",
        mode(&work)
    );
    ensure!(
        mode(fx.dir.path()).ok() == Some((0, 0o711)),
        "data dir: {:?}",
        mode(fx.dir.path())
    );
    ensure!(
        mode(&fx.path("logs")).ok() == Some((0, 0o700)),
        "logs: {:?}",
        mode(&fx.path("logs"))
    );
    let task_dir = fx.path("tasks/mine/task-0");
    ensure!(
        mode(&task_dir).ok() == Some((0, 0o711)),
        "open while it ran"
    );
    fx.driver.retire(handle.key());
    ensure!(
        mode(&task_dir).ok() == Some((0, 0o700)),
        "closed once retired"
    );
    Ok(())
}
