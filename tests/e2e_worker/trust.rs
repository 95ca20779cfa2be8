//! Issue 15 through the real binary: a host that cannot receive its allocations stops what the
//! state revoked by its lease deadline, and tasks run as users of their own that cannot touch the
//! agent's files.

use super::*;
use std::os::unix::fs::PermissionsExt;

/// Whether a process with this pid still runs (a zombie has ended).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s.rsplit_once(") ")?.1.chars().next()? != 'Z'))
        .unwrap_or(false)
}

/// The pid a task wrote to `pid_file` once it started (within 20 s). The shell creates the file
/// before it writes the pid, so the wait is for a whole pid, not for the file.
async fn started(pid_file: &std::path::Path, what: &str, logs: impl Fn() -> String) -> u32 {
    let pid = || std::fs::read_to_string(pid_file).ok()?.trim().parse().ok();
    wait_until(Duration::from_secs(20), what, logs, || pid().is_some()).await;
    pid().expect("the pid just read")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_cannot_receive_its_allocations_stops_a_revoked_task_by_its_lease_deadline() {
    // Phase 1: one host that decodes allocation sets of at most 4 KiB runs a small job.
    let (cluster, addrs, w) = host("narrow", |w| {
        w.args = vec!["--allocation-stream-max-bytes".into(), "4096".into()];
    })
    .await;
    let logs = || format!("{}\n--- worker ---\n{}", cluster.logs(), w.log_tail(40));
    let pid_file = cluster.dir.path().join("sleeper.pid");
    let script = format!("echo $$ > {}; exec sleep 600", pid_file.display());
    let id = submit(&addrs[0], &sh_job("sleeper", &script, ""), "sleeper")
        .await
        .expect("submit")
        .job_id;
    let pid = started(&pid_file, "the sleeper runs", logs).await;

    // Phase 2: a job with a 5 KB command lands on the same host. Its set no longer fits what the
    // agent decodes: the stream fails, and the agent says why.
    let wide = format!("sleep 600 # {}", "x".repeat(5000));
    let wide_id = submit(&addrs[0], &sh_job("wide", &wide, ""), "wide")
        .await
        .expect("submit")
        .job_id;
    wait_until(
        Duration::from_secs(20),
        "the stream's failure in the agent's log",
        logs,
        || w.agent_log().contains("decoded message length too large"),
    )
    .await;

    // Phase 3: the sleeper is cancelled in the state. The host never hears of it, yet its task
    // must not outlive the lease deadline (2.25 s after the last renewal).
    let out = cli(&addrs, &["cancel", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cancelled = Instant::now();
    wait_until(
        Duration::from_secs(8),
        "the revoked task stopped",
        logs,
        || !alive(pid),
    )
    .await;
    let log = w.task_log(&id, 0);
    assert!(
        log.contains("lease expired"),
        "stopped by its shim at the deadline:\n{log}"
    );
    let agent = w.agent_log();
    assert!(agent.contains("not renewing the lease deadline"), "{agent}");
    assert!(
        !agent.contains("stopping: no longer leased"),
        "the agent never learnt of the cancel; only the deadline stopped the task:\n{agent}"
    );
    assert!(
        w.task_log(&wide_id, 0).is_empty(),
        "the undelivered job never ran here"
    );
    println!("stopped {:?} after the cancel", cancelled.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_that_finishes_early_does_not_stop_its_hosts_renewals() {
    // Rank 1 of a 2-rank gang succeeds at once while rank 0 runs on: the host's allocation set
    // changes without the gang ending. The host must learn the new set and keep renewing.
    let (cluster, addrs, w) = host("early", |_| {}).await;
    let logs = || format!("{}\n--- worker ---\n{}", cluster.logs(), w.log_tail(40));
    let pid_file = cluster.dir.path().join("rank0.pid");
    let script = format!(
        "[ \"$GANGWAY_TASK_INDEX\" = 1 ] && exit 0; echo $$ > {}; exec sleep 600",
        pid_file.display()
    );
    let spec = sh_job("early", &script, "").replace("command", "tasks = 2\ncommand");
    let id = submit(&addrs[0], &spec, "early")
        .await
        .expect("submit")
        .job_id;
    let pid = started(&pid_file, "rank 0 runs", logs).await;
    wait_until(Duration::from_secs(20), "rank 1 done", logs, || {
        w.agent_log().contains("task ended") && w.task_log(&id, 1).contains("epoch")
    })
    .await;
    // Three lease TTLs (2.25 s each) later rank 0 still runs, and the host never fell behind.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(alive(pid), "rank 0 was stopped:\n{}", w.agent_log());
    let agent = w.agent_log();
    assert!(
        !agent.contains("not renewing the lease deadline"),
        "{agent}"
    );
    assert!(
        !w.task_log(&id, 0).contains("lease expired"),
        "{}",
        w.task_log(&id, 0)
    );
}

/// Each probe prints `NAME: ALLOWED` or `NAME: REFUSED: <the error>`.
const PROBES: &str = r#"try() { name=$1; shift; if out=$("$@" 2>&1); then echo "$name: ALLOWED"; else echo "$name: REFUSED: $out"; fi; }
echo "uid=$(id -u)"
try lease sh -c 'echo 99 > "$LEASE"'
try state sh -c 'echo {} > "$STATE"'
try checkpoint sh -c 'echo ok > "$GANGWAY_CHECKPOINT_DIR/probe"'
try home sh -c 'echo ok > "$HOME/probe"'"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_run_as_a_user_of_their_own_that_cannot_touch_the_agents_files() {
    use std::os::unix::fs::MetadataExt;
    let euid = std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid());
    if euid != 0 {
        println!(
            "skipped: only a root agent can run tasks as other users (this runs as uid {euid})"
        );
        return;
    }
    let mut cluster = TestCluster::start(3);
    cluster.wait_for_leader(None, Duration::from_secs(30)).await;
    // Tasks must pass through the test's directory to reach theirs.
    std::fs::set_permissions(cluster.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let addrs = cluster.addrs();
    let mut w = Worker::new(cluster.dir.path(), "iso", "r1", addrs.clone());
    w.task_users = vec!["--task-uid-range".into(), "3999200000-3999200099".into()];
    w.start();
    let logs = || format!("{}\n--- worker ---\n{}", cluster.logs(), w.log_tail(40));
    let env = format!(
        "[env]\nLEASE = \"{}\"\nSTATE = \"{}\"\n",
        w.data.join("lease-deadline").display(),
        w.data.join("agent-state.1").display()
    );
    // A job that can checkpoint: only such a job gets a checkpoint directory.
    let env = format!("{env}[checkpoint]\n");
    let id = submit(&addrs[0], &sh_job("probe", PROBES, &env), "probe")
        .await
        .expect("submit")
        .job_id;
    wait_succeeded(&addrs, &id, Duration::from_secs(30), logs).await;
    let log = w.task_log(&id, 0);
    let uid: u32 = log
        .lines()
        .find_map(|l| l.strip_prefix("uid="))
        .and_then(|u| u.trim().parse().ok())
        .unwrap_or_else(|| panic!("no uid line:\n{log}"));
    assert!(
        (3_999_200_000..=3_999_200_099).contains(&uid),
        "uid {uid}:\n{log}"
    );
    for probe in ["lease", "state"] {
        let line = log
            .lines()
            .find(|l| l.starts_with(&format!("{probe}: ")))
            .unwrap_or("");
        assert!(
            line.contains("REFUSED") && line.contains("Permission denied"),
            "{probe}: {line:?}\n{log}"
        );
    }
    assert!(
        log.contains("checkpoint: ALLOWED"),
        "its own checkpoint directory:\n{log}"
    );
    assert!(
        log.contains("home: ALLOWED"),
        "its own working directory:\n{log}"
    );
    assert!(
        w.agent_log()
            .contains("tasks run as a uid of their own per job"),
        "{}",
        w.agent_log()
    );
}
