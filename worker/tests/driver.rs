//! The task driver against real processes: `/bin/sh` scripts as tasks, this very executable as
//! the shim.
//!
//! `harness = false`: the shim must be a real executable the driver can start, so `main` runs
//! [`shim_main`] when invoked as `<test-exe> task-shim ...` and the test cases otherwise. Each case
//! prints its name, why it matters, and PASS or FAIL; any failure exits non-zero.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use gangway_worker::driver::{
    boottime_ms, shim_main, task_huge_pages, DriverConfig, DriverError, ExitOutcome, ExitReason,
    LaunchSpec, ProcessRecord, TaskDriver, TaskHandle, TaskKey,
};

type CaseResult = Result<(), String>;
type Case = fn() -> Pin<Box<dyn Future<Output = CaseResult>>>;

/// Fails the case with a message unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!("{} (at line {})", format!($($msg)+), line!()));
        }
    };
}

#[path = "driver/isolation.rs"]
mod isolation;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("task-shim") {
        let code = match shim_main(&args[2..]) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("{e}");
                2
            }
        };
        std::process::exit(code);
    }
    // `cargo test -- NAME` narrows the run to cases whose name contains NAME.
    let filter = args.iter().skip(1).find(|a| !a.starts_with('-')).cloned();

    let cases: &[(&str, &str, Case)] = &[
        (
            "env_workdir_log_and_exit_code",
            "the agent's environment (CUDA_VISIBLE_DEVICES), working directory and exit code must \
             reach the task and come back, and its output must be findable in one log per task",
            || Box::pin(env_workdir_log_and_exit_code()),
        ),
        (
            "checkpoint_signal_reaches_task",
            "checkpoint signals go to the group; the task must see them and keep running, and the \
             shim must survive them or the exit would be lost",
            || Box::pin(checkpoint_signal_reaches_task()),
        ),
        (
            "stop_graceful_and_forced",
            "preemption must let a well-behaved task exit cleanly, and still free the devices \
             from one that ignores SIGTERM",
            || Box::pin(stop_graceful_and_forced()),
        ),
        (
            "readoption_after_agent_death",
            "an agent restart must not kill or forget running tasks, nor adopt a stranger that \
             got a recycled pid",
            || Box::pin(readoption_after_agent_death()),
        ),
        (
            "lease_expiry_fences_task",
            "a worker cut off from the scheduler must have stopped its tasks by the lease \
             deadline, or the gang could run twice; a renewed lease must keep them running",
            || Box::pin(lease_expiry_fences_task()),
        ),
        (
            "tasks_are_isolated_from_the_agent_and_each_other",
            "a task runs as the user it was given and cannot write the lease file or the agent's \
             state, signal another job's task or open its files (root only)",
            || Box::pin(isolation::tasks_are_isolated_from_the_agent_and_each_other()),
        ),
        (
            "a_task_gets_back_the_huge_pages_its_agent_gave_up",
            "the agent runs without transparent huge pages; a task must get the setting the agent \
             found (and never see the variable that carries it), not the agent's choice",
            || Box::pin(a_task_gets_back_the_huge_pages_its_agent_gave_up()),
        ),
        (
            "failed_to_start_names_program",
            "a typo in a job's command must come back as a clear task failure, not a crash or a \
             silent hang",
            || Box::pin(failed_to_start_names_program()),
        ),
    ];

    // The fork server's own failures, once (their drivers fork whatever the pass).
    let fork_server_cases: &[(&str, &str, Case)] = &[
        (
            "a_killed_fork_server_loses_no_task_and_is_replaced",
            "a shim must outlive the server that forked it and still report its task's end; a \
             dead server must not stop the next launch",
            || Box::pin(a_killed_fork_server_loses_no_task_and_is_replaced()),
        ),
        (
            "a_stuck_fork_server_never_runs_a_task_twice",
            "when the server does not answer, the driver starts the shim itself; it must know no \
             forked copy runs, or the task would run twice on the same devices",
            || Box::pin(a_stuck_fork_server_never_runs_a_task_twice()),
        ),
    ];

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start a Tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    let started = Instant::now();
    let mut failed = 0;
    // Every case twice: shims forked by the fork server (the agent's default), then executed.
    let passes = [(true, "forked shims"), (false, "executed shims")];
    let runs = passes
        .iter()
        .flat_map(|pass| cases.iter().map(move |case| (case, pass)))
        .chain(fork_server_cases.iter().map(|case| (case, &passes[0])));
    for ((name, why, case), (fork, how)) in runs {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        FORK_SERVER.store(*fork, Ordering::SeqCst);
        println!("test {name} ({how})\n    why: {why}");
        let case_start = Instant::now();
        let result = runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(15), case())
                .await
                .unwrap_or_else(|_| Err("timed out after 15 s".into()))
        });
        match result {
            Ok(()) => println!("    PASS ({:.2?})", case_start.elapsed()),
            Err(e) => {
                failed += 1;
                println!("    FAIL: {e}");
            }
        }
    }
    println!(
        "driver tests: {failed} failed, {:.2?} in all",
        started.elapsed()
    );
    if failed > 0 {
        std::process::exit(1);
    }
}

/// A driver in a fresh temporary directory, with a lease an hour ahead.
struct Fixture {
    dir: tempfile::TempDir,
    driver: TaskDriver,
}

impl Fixture {
    fn new(grace: Duration) -> Result<Fixture, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let driver = new_driver(dir.path(), grace)?;
        driver
            .write_lease_deadline(boottime_ms() + 3_600_000)
            .map_err(|e| e.to_string())?;
        Ok(Fixture { dir, driver })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A `/bin/sh -c SCRIPT` task working in the fixture's directory.
    async fn launch(&self, job: &str, epoch: u64, script: &str) -> Result<TaskHandle, String> {
        let mut spec = sh_spec(job, epoch, script);
        spec.work_dir = Some(self.dir.path().to_path_buf());
        self.driver.launch(spec).await.map_err(|e| e.to_string())
    }
}

/// Whether the drivers of the current pass fork their shims (see `main`).
static FORK_SERVER: AtomicBool = AtomicBool::new(true);

fn new_driver(data_dir: &Path, grace: Duration) -> Result<TaskDriver, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    TaskDriver::new(DriverConfig {
        shim_command: vec![exe.display().to_string(), "task-shim".into()],
        fork_server: FORK_SERVER.load(Ordering::SeqCst),
        data_dir: data_dir.to_path_buf(),
        lease_file: data_dir.join("lease"),
        grace,
    })
    .map_err(|e| e.to_string())
}

fn sh_spec(job: &str, epoch: u64, script: &str) -> LaunchSpec {
    LaunchSpec {
        fence_grace: None,
        key: TaskKey {
            job: job.into(),
            task: 0,
            epoch,
        },
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: BTreeMap::new(),
        work_dir: None,
        identity: None,
    }
}

/// Waits for the task, failing the case after `limit`.
async fn wait_within(handle: &TaskHandle, limit: Duration) -> Result<ExitOutcome, String> {
    tokio::time::timeout(limit, handle.wait())
        .await
        .map_err(|_| format!("task {} still running after {limit:?}", handle.key()))
}

/// Waits for a file the task creates (a readiness or marker file).
async fn wait_for_file(path: &Path, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while !path.exists() {
        ensure!(
            Instant::now() < deadline,
            "{} did not appear within {limit:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn touch(path: &Path) -> Result<(), String> {
    std::fs::write(path, b"").map_err(|e| format!("{}: {e}", path.display()))
}

const LONG: Duration = Duration::from_secs(5);

async fn env_workdir_log_and_exit_code() -> CaseResult {
    let fx = Fixture::new(Duration::from_secs(1))?;
    let custom = fx.path("custom-workdir");
    std::fs::create_dir(&custom).map_err(|e| e.to_string())?;
    let mut spec = sh_spec(
        "train",
        1,
        "echo \"hello $GREETING from $(pwd)\"; echo oops >&2; exit 3",
    );
    spec.env.insert("GREETING".into(), "world".into());
    spec.work_dir = Some(custom.clone());
    let handle = fx.driver.launch(spec).await.map_err(|e| e.to_string())?;
    let outcome = wait_within(&handle, LONG).await?;
    ensure!(
        outcome.reason == ExitReason::Exited && outcome.code == Some(3) && outcome.signal.is_none(),
        "want Exited/3, got {outcome:?}"
    );
    ensure!(!outcome.success(), "code 3 is not success");
    ensure!(!handle.is_running(), "ended task still running");
    ensure!(
        wait_within(&handle, LONG).await? == outcome,
        "second wait differs"
    );

    // A second epoch of the same task, in the default working directory, appends to the same log.
    let handle = fx
        .driver
        .launch(sh_spec("train", 2, "echo second in $(pwd)"))
        .await
        .map_err(|e| e.to_string())?;
    let outcome = wait_within(&handle, LONG).await?;
    ensure!(outcome.success(), "want success, got {outcome:?}");

    let log_path = fx.driver.log_path("train", 0);
    ensure!(
        handle.record().log_file == log_path,
        "record names another log"
    );
    let log = std::fs::read_to_string(&log_path).map_err(|e| e.to_string())?;
    let default_dir = fx.path("tasks/train/task-0/work");
    for want in [
        "=== gangway: epoch 1 started".to_string(),
        format!("hello world from {}", custom.display()),
        "oops".to_string(),
        "=== gangway: epoch 2 started".to_string(),
        format!("second in {}", default_dir.display()),
    ] {
        ensure!(log.contains(&want), "log lacks {want:?}:\n{log}");
    }
    ensure!(
        log.find("epoch 1 started") < log.find("epoch 2 started"),
        "epochs out of order:\n{log}"
    );
    Ok(())
}

/// As the agent: huge pages off for this process (and, inherited, for the shims and their fork
/// server), `GANGWAY_TASK_HUGE_PAGES=on` in the shim's environment (the agent's, in production).
async fn a_task_gets_back_the_huge_pages_its_agent_gave_up() -> CaseResult {
    let thp_disable = |on: u64| {
        // SAFETY: PR_SET_THP_DISABLE takes integer arguments only.
        match unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, on, 0, 0, 0) } {
            0 => Ok(()),
            _ => Err(format!("prctl: {}", std::io::Error::last_os_error())),
        }
    };
    thp_disable(1)?;
    let result = async {
        let fx = Fixture::new(Duration::from_secs(1))?;
        let script =
            "grep THP_enabled /proc/self/status; echo \"var=${GANGWAY_TASK_HUGE_PAGES-unset}\"";
        let mut asked = sh_spec("thp-back", 1, script);
        let var = task_huge_pages::VAR.to_str().map_err(|e| e.to_string())?;
        let on = task_huge_pages::ON.to_str().map_err(|e| e.to_string())?;
        asked.env.insert(var.into(), on.into());
        for (spec, want) in [
            (asked, "THP_enabled:\t1\nvar=unset"),
            (sh_spec("thp-kept", 1, script), "THP_enabled:\t0\nvar=unset"),
        ] {
            let job = spec.key.job.clone();
            let handle = fx.driver.launch(spec).await.map_err(|e| e.to_string())?;
            let outcome = wait_within(&handle, LONG).await?;
            ensure!(outcome.success(), "{job}: {outcome:?}");
            let log =
                std::fs::read_to_string(fx.driver.log_path(&job, 0)).map_err(|e| e.to_string())?;
            ensure!(log.contains(want), "{job}: want {want:?} in\n{log}");
        }
        Ok(())
    }
    .await;
    thp_disable(0)?;
    result
}

async fn checkpoint_signal_reaches_task() -> CaseResult {
    let fx = Fixture::new(Duration::from_secs(1))?;
    let handle = fx
        .launch(
            "ckpt",
            1,
            "trap 'echo checkpoint > usr1.marker' USR1; touch ready; \
             while [ ! -f done ]; do sleep 0.05; done; exit 0",
        )
        .await?;
    wait_for_file(&fx.path("ready"), LONG).await?;
    handle.signal("SIGUSR1").map_err(|e| e.to_string())?;
    wait_for_file(&fx.path("usr1.marker"), LONG).await?;
    tokio::time::sleep(Duration::from_millis(150)).await;
    ensure!(handle.is_running(), "task or shim died of SIGUSR1");

    let err = handle.signal("SIGBOGUS").err();
    ensure!(
        matches!(&err, Some(DriverError::UnknownSignal(n)) if n == "SIGBOGUS"),
        "unknown signal name not reported: {err:?}"
    );

    touch(&fx.path("done"))?;
    let outcome = wait_within(&handle, LONG).await?;
    // Exited with code 0 proves the shim survived: a dead shim leaves no exit file (Lost).
    ensure!(outcome.success(), "want a clean exit, got {outcome:?}");
    ensure!(
        handle.signal("SIGUSR1").is_ok(),
        "signalling an ended task errs"
    );
    Ok(())
}

async fn stop_graceful_and_forced() -> CaseResult {
    let fx = Fixture::new(Duration::from_secs(1))?;
    let graceful = fx
        .launch(
            "stop-clean",
            1,
            "trap 'echo saving; exit 0' TERM; touch ready-clean; \
             while true; do sleep 0.05; done",
        )
        .await?;
    let stubborn = fx
        .launch(
            "stop-stubborn",
            1,
            "trap '' TERM; touch ready-stubborn; while true; do sleep 0.05; done",
        )
        .await?;
    wait_for_file(&fx.path("ready-clean"), LONG).await?;
    wait_for_file(&fx.path("ready-stubborn"), LONG).await?;

    let start = Instant::now();
    let outcome = graceful.stop(Duration::from_secs(3)).await;
    ensure!(
        outcome.reason == ExitReason::Stopped && outcome.code == Some(0),
        "want Stopped/0, got {outcome:?}"
    );
    ensure!(
        start.elapsed() < Duration::from_secs(2),
        "clean stop waited for the grace"
    );
    ensure!(
        graceful.stop(Duration::from_secs(3)).await == outcome,
        "stop not idempotent"
    );

    let grace = Duration::from_millis(300);
    let start = Instant::now();
    // Two concurrent stoppers and a waiter must all see the same end.
    let (a, b, c) = tokio::join!(stubborn.stop(grace), stubborn.stop(grace), stubborn.wait());
    ensure!(a.reason == ExitReason::Killed, "want Killed, got {a:?}");
    ensure!(a == b && b == c, "stoppers disagree: {a:?} {b:?} {c:?}");
    ensure!(start.elapsed() >= grace, "SIGKILL before the grace ran out");
    ensure!(
        start.elapsed() < grace + Duration::from_secs(2),
        "kill took too long"
    );
    ensure!(!stubborn.is_running(), "killed task still running");
    Ok(())
}

async fn readoption_after_agent_death() -> CaseResult {
    let fx = Fixture::new(Duration::from_secs(1))?;
    // The first "agent" runs in a runtime of its own that is dropped with its driver and handle,
    // so nothing of it watches the task any more.
    let data_dir = fx.dir.path().to_path_buf();
    let record = std::thread::spawn(move || -> Result<ProcessRecord, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let driver = new_driver(&data_dir, Duration::from_secs(1))?;
        let mut spec = sh_spec(
            "adopt",
            4,
            "trap 'touch usr1.adopted' USR1; touch ready; \
             while [ ! -f go ]; do sleep 0.05; done; exit 7",
        );
        spec.work_dir = Some(data_dir.clone());
        let handle = runtime
            .block_on(driver.launch(spec))
            .map_err(|e| e.to_string())?;
        Ok(handle.record())
    })
    .join()
    .map_err(|_| "first agent panicked".to_string())??;
    // What the agent would persist and read back.
    let json = serde_json::to_string(&record).map_err(|e| e.to_string())?;
    let record: ProcessRecord = serde_json::from_str(&json).map_err(|e| e.to_string())?;

    wait_for_file(&fx.path("ready"), LONG).await?;
    let driver = new_driver(fx.dir.path(), Duration::from_secs(1))?;
    let handle = match driver.adopt(&record) {
        Ok(handle) => handle,
        Err(outcome) => return Err(format!("running task not adopted: {outcome:?}")),
    };
    ensure!(handle.is_running(), "adopted task not running");
    ensure!(handle.key() == &record.key, "adopted the wrong key");
    // Signals still reach an adopted task's group.
    handle.signal("SIGUSR1").map_err(|e| e.to_string())?;
    wait_for_file(&fx.path("usr1.adopted"), LONG).await?;
    touch(&fx.path("go"))?;
    let outcome = wait_within(&handle, LONG).await?;
    ensure!(
        outcome.reason == ExitReason::Exited && outcome.code == Some(7),
        "want Exited/7 from the exit file, got {outcome:?}"
    );
    match driver.adopt(&record) {
        Err(again) => ensure!(again == outcome, "ended task re-read differs: {again:?}"),
        Ok(_) => return Err("adopted a task that has ended".into()),
    }

    // A live pid with another start time is a stranger that got a recycled pid.
    let mut stranger = record.clone();
    stranger.pid = std::process::id() as i32;
    stranger.start_ticks = 1;
    stranger.exit_file = fx.path("no-such-exit.json");
    match driver.adopt(&stranger) {
        Err(outcome) => ensure!(
            outcome.reason == ExitReason::Lost,
            "want Lost, got {outcome:?}"
        ),
        Ok(_) => return Err("adopted a process with the wrong start time".into()),
    }
    for pid in [0, 1, -5] {
        let mut bad = stranger.clone();
        bad.pid = pid;
        ensure!(
            matches!(
                driver.adopt(&bad),
                Err(ExitOutcome {
                    reason: ExitReason::Lost,
                    ..
                })
            ),
            "pid {pid} adopted"
        );
    }
    Ok(())
}

async fn lease_expiry_fences_task() -> CaseResult {
    let fx = Fixture::new(Duration::from_millis(200))?;
    let deadline = boottime_ms() + 600;
    fx.driver
        .write_lease_deadline(deadline)
        .map_err(|e| e.to_string())?;
    let fenced = fx.launch("lease-lost", 1, "sleep 30").await?;
    let outcome = wait_within(&fenced, LONG).await?;
    let ended_at = boottime_ms();
    ensure!(
        outcome.reason == ExitReason::LeaseExpired,
        "want LeaseExpired, got {outcome:?}"
    );
    ensure!(
        outcome.message.contains("lost contact with the scheduler"),
        "message does not say why: {}",
        outcome.message
    );
    ensure!(
        ended_at <= deadline + 100,
        "task ended {} ms after the deadline",
        ended_at - deadline
    );

    // Renewed every 100 ms, the lease keeps a task running well past the first deadline.
    let deadline = boottime_ms() + 600;
    fx.driver
        .write_lease_deadline(deadline)
        .map_err(|e| e.to_string())?;
    let renewed = fx.launch("lease-renewed", 1, "sleep 30").await?;
    while boottime_ms() < deadline + 400 {
        fx.driver
            .write_lease_deadline(boottime_ms() + 600)
            .map_err(|e| e.to_string())?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        renewed.is_running(),
        "renewed task died: {:?}",
        renewed.wait().await
    );
    let outcome = renewed.stop(Duration::from_secs(2)).await;
    ensure!(
        outcome.reason == ExitReason::Stopped,
        "want Stopped, got {outcome:?}"
    );

    // A lease already past at launch: the task never starts.
    fx.driver
        .write_lease_deadline(boottime_ms().saturating_sub(1))
        .map_err(|e| e.to_string())?;
    let late = fx.launch("lease-late", 1, "touch started").await?;
    let outcome = wait_within(&late, LONG).await?;
    ensure!(
        outcome.reason == ExitReason::LeaseExpired && outcome.message.contains("not started"),
        "want LeaseExpired/not started, got {outcome:?}"
    );
    ensure!(!fx.path("started").exists(), "task ran without a lease");
    Ok(())
}

async fn failed_to_start_names_program() -> CaseResult {
    let fx = Fixture::new(Duration::from_secs(1))?;
    for program in [
        "gangway-no-such-program",
        "/nonexistent/gangway-no-such-program",
    ] {
        let mut spec = sh_spec("typo", 1, "");
        spec.command = vec![program.into(), "--flag".into()];
        let handle = fx.driver.launch(spec).await.map_err(|e| e.to_string())?;
        let outcome = wait_within(&handle, LONG).await?;
        ensure!(
            outcome.reason == ExitReason::FailedToStart,
            "want FailedToStart, got {outcome:?}"
        );
        ensure!(
            outcome.message.contains(program),
            "message does not name {program}: {}",
            outcome.message
        );
    }

    let mut spec = sh_spec("typo", 2, "true");
    spec.work_dir = Some(fx.path("no-such-dir"));
    let handle = fx.driver.launch(spec).await.map_err(|e| e.to_string())?;
    let outcome = wait_within(&handle, LONG).await?;
    ensure!(
        outcome.reason == ExitReason::FailedToStart && outcome.message.contains("no-such-dir"),
        "bad working directory: {outcome:?}"
    );

    let mut spec = sh_spec("typo", 3, "");
    spec.command.clear();
    let err = fx.driver.launch(spec).await.err();
    ensure!(
        matches!(err, Some(DriverError::InvalidSpec { .. })),
        "empty command accepted: {err:?}"
    );
    Ok(())
}

/// The parent of `pid`, from field 4 of its `/proc` stat line.
fn parent_of(pid: i32) -> Result<i32, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
    let after = &text[text.rfind(')').ok_or("no `)` in stat")? + 1..];
    after
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("no parent in {text:?}"))
}

fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Launches a task that appends a line to `runs`, then waits for `go-<job>` before exiting;
/// returns its handle once it is running.
async fn counted_task(fx: &Fixture, job: &str) -> Result<TaskHandle, String> {
    let script = format!(
        "echo {job} >> runs; touch started-{job}; while [ ! -f go-{job} ]; do sleep 0.02; done"
    );
    let handle = fx.launch(job, 1, &script).await?;
    wait_for_file(&fx.path(&format!("started-{job}")), LONG).await?;
    Ok(handle)
}

async fn finish_counted(fx: &Fixture, handle: &TaskHandle, job: &str) -> Result<(), String> {
    touch(&fx.path(&format!("go-{job}")))?;
    let outcome = wait_within(handle, LONG).await?;
    ensure!(
        outcome.reason == ExitReason::Exited && outcome.code == Some(0),
        "{job}: want Exited/0, got {outcome:?}"
    );
    Ok(())
}

fn runs(fx: &Fixture) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(fx.path("runs")).map_err(|e| e.to_string())?;
    Ok(text.lines().map(str::to_owned).collect())
}

/// The fork server's process: a shim's parent, and runs with `--fork-server`.
fn server_of(shim: i32) -> Result<i32, String> {
    let parent = parent_of(shim)?;
    ensure!(
        parent != std::process::id() as i32,
        "the shim {shim} is the driver's own child: it was executed, not forked"
    );
    ensure!(
        cmdline(parent).contains(" --fork-server "),
        "the shim's parent {parent} is not a fork server: {}",
        cmdline(parent)
    );
    Ok(parent)
}

async fn a_killed_fork_server_loses_no_task_and_is_replaced() -> CaseResult {
    let fx = Fixture::new(Duration::from_secs(1))?;
    let first = counted_task(&fx, "one").await?;
    let server = server_of(first.record().pid)?;
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(server, libc::SIGKILL) };
    // A shim outlives its server, and its end still reaches the driver (through its pidfd).
    finish_counted(&fx, &first, "one").await?;
    // The next request finds the server gone: that shim is executed instead...
    let second = counted_task(&fx, "two").await?;
    ensure!(
        parent_of(second.record().pid)? == std::process::id() as i32,
        "after the server died the shim should have been executed by the driver"
    );
    finish_counted(&fx, &second, "two").await?;
    // ...and the one after goes to a fresh server.
    let third = counted_task(&fx, "three").await?;
    let fresh = server_of(third.record().pid)?;
    ensure!(fresh != server, "the dead server {server} was reused");
    finish_counted(&fx, &third, "three").await?;
    ensure!(
        runs(&fx)? == ["one", "two", "three"],
        "each task exactly once: {:?}",
        runs(&fx)?
    );
    Ok(())
}

async fn a_stuck_fork_server_never_runs_a_task_twice() -> CaseResult {
    let fx = Fixture::new(Duration::from_secs(1))?;
    let first = counted_task(&fx, "one").await?;
    let server = server_of(first.record().pid)?;
    finish_counted(&fx, &first, "one").await?;
    // Stopped, the server takes the request but never forks: the driver gives up on it after
    // its answer limit, kills it, learns no shim was forked, and executes the shim itself.
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(server, libc::SIGSTOP) };
    let second = counted_task(&fx, "two").await?;
    ensure!(
        parent_of(second.record().pid)? == std::process::id() as i32,
        "with the server stopped the shim should have been executed by the driver"
    );
    finish_counted(&fx, &second, "two").await?;
    ensure!(
        cmdline(server).is_empty() || parent_of(server).is_err(),
        "the stuck server {server} was left running"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(
        runs(&fx)? == ["one", "two"],
        "each task exactly once: {:?}",
        runs(&fx)?
    );
    Ok(())
}
