//! `gangway submit`, `gangway jobs`, `gangway job status|cancel` and `gangway cancel`.

use super::common::{parse_duration, read_arg_file, ClientOpts, WatchOpts, Watcher};
use super::output::{
    age_since, format_age, format_bytes, format_devices, format_hosts, format_indices, new_table,
    or_dash, print_action, rfc3339, table_string, to_json, Output, Render,
};
use crate::client::{Client, ClientError};
use clap::{Args, Subcommand, ValueEnum};
use gangway_proto::pb;
use gangway_proto::spec::JobSpec;
use serde::Serialize;
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;
use tokio::time::Instant;

/// Most spec files one `gangway submit` sends (the server's batch limit).
const MAX_BATCH_FILES: usize = 1_000;

/// How often `submit --wait` asks for the job's state.
const WAIT_POLL: Duration = Duration::from_millis(500);

#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// The job specs (TOML); `-` reads one from stdin. Each is validated here first, with the
    /// same code as the server. Several files go in one request: all jobs are created or none
    /// (at most 1,000).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// A job array: the one spec created N times (at most 1,000) in one request, job i (from 0)
    /// with GANGWAY_ARRAY_INDEX=i and GANGWAY_ARRAY_SIZE=N in its environment.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub array: Option<u32>,
    /// Submissions with the same key create one job (a batch's job i gets `KEY/i`). Default: a
    /// random key, made once per run, so the client's own retries never create a second job.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// Wait until the job is running; exit 2 (not placeable yet) if it is not after this long.
    /// One job only.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub wait: Option<Duration>,
    #[command(flatten)]
    pub opts: ClientOpts,
}

/// Job states, for `--state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum JobStateArg {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStateArg {
    fn to_pb(self) -> pb::JobState {
        match self {
            JobStateArg::Pending => pb::JobState::Pending,
            JobStateArg::Running => pb::JobState::Running,
            JobStateArg::Succeeded => pb::JobState::Succeeded,
            JobStateArg::Failed => pb::JobState::Failed,
            JobStateArg::Cancelled => pb::JobState::Cancelled,
        }
    }
}

#[derive(Args, Debug)]
pub struct JobsArgs {
    /// Only jobs in these states (comma-separated); default every state.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "STATE,...")]
    pub state: Vec<JobStateArg>,
    /// Only jobs of this queue.
    #[arg(long, value_name = "QUEUE")]
    pub queue: Option<String>,
    /// Jobs that left the replicated state after their retention, from the replica's archive,
    /// instead of the live ones.
    #[arg(long)]
    pub archived: bool,
    /// At most this many jobs (the listing is paged; without it every page is read).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub watch: WatchOpts,
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(Args, Debug)]
pub struct JobGroup {
    #[command(subcommand)]
    pub command: JobCommand,
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(Subcommand, Debug)]
pub enum JobCommand {
    /// A job's state, placement per task, lease epoch, checkpoint and history.
    Status(JobStatusArgs),
    /// Cancel a job: its tasks are stopped and its devices freed.
    Cancel(CancelArgs),
    /// Ask a running job to checkpoint now (its spec needs a [checkpoint] section).
    Checkpoint(CheckpointArgs),
    /// Move a running job: checkpoint, stop, new lease elsewhere, restore from the checkpoint.
    Migrate(MigrateArgs),
}

#[derive(Args, Debug)]
pub struct CheckpointArgs {
    /// The job id.
    pub id: String,
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The job id.
    pub id: String,
    /// Only these hosts (repeat or comma-separate). Default: any host but the ones it runs on.
    #[arg(long, value_delimiter = ',', value_name = "HOST")]
    pub to: Vec<String>,
    /// Never these hosts (repeat or comma-separate).
    #[arg(long, value_delimiter = ',', value_name = "HOST")]
    pub avoid: Vec<String>,
}

#[derive(Args, Debug)]
pub struct JobStatusArgs {
    /// The job id (as printed by `gangway submit`).
    pub id: String,
    #[command(flatten)]
    pub watch: WatchOpts,
}

#[derive(Args, Debug)]
pub struct CancelArgs {
    /// The job id.
    pub id: String,
    /// Why, recorded in the job's history.
    #[arg(long, default_value = "", hide_default_value = true)]
    pub reason: String,
}

/// `gangway cancel`: the same as `gangway job cancel`.
#[derive(Args, Debug)]
pub struct CancelCmd {
    #[command(flatten)]
    pub args: CancelArgs,
    #[command(flatten)]
    pub opts: ClientOpts,
}

// ---------------------------------------------------------------------------------------------
// JSON views
// ---------------------------------------------------------------------------------------------

/// `gangway submit -o json`.
#[derive(Debug, Serialize)]
pub struct SubmitView {
    pub job_id: String,
    /// True when the idempotency key had been used: no new job was created.
    pub existing: bool,
    /// With --wait: the state the wait ended in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// With --wait: why the job still waits (empty unless pending).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_reason: Option<String>,
}

/// One job in `gangway jobs -o json` (and the head of `job status`).
#[derive(Debug, Serialize)]
pub struct JobView {
    pub id: String,
    pub name: String,
    pub queue: String,
    pub priority: i32,
    pub state: String,
    pub tasks: u32,
    /// Per task, as written in the spec: "8", "0.5", "0".
    pub devices_per_task: String,
    pub kind: String,
    /// The whole gang, for people: "2x8 gpu".
    pub devices: String,
    pub submitted_at_ms: u64,
    pub submitted_at: Option<String>,
    /// Empty unless pending.
    pub pending_reason: String,
    /// 0 when the job holds no lease.
    pub lease_epoch: u64,
    pub hosts: Vec<String>,
    pub attempts: u32,
    pub preemptions: u32,
    /// Leases taken back because their devices sat idle.
    pub reclaims: u32,
    /// Restarts after application failures (against the spec's restart policy).
    pub restarts: u32,
    /// Repairs after infrastructure failures (a device or host lost); never limited.
    pub repairs: u32,
    /// When it ended, leader-stamped; 0 and null while it has not.
    pub finished_at_ms: u64,
    pub finished_at: Option<String>,
}

impl From<&pb::JobSummary> for JobView {
    fn from(j: &pb::JobSummary) -> Self {
        Self {
            id: j.id.clone(),
            name: j.name.clone(),
            queue: j.queue.clone(),
            priority: j.priority,
            state: j.state().word().to_owned(),
            tasks: j.tasks,
            devices_per_task: j.devices_per_task.clone(),
            kind: j.kind.clone(),
            devices: format_devices(j.tasks, &j.devices_per_task, &j.kind),
            submitted_at_ms: j.submitted_at_ms,
            submitted_at: rfc3339(j.submitted_at_ms),
            pending_reason: j.pending_reason.clone(),
            lease_epoch: j.lease_epoch,
            hosts: j.hosts.clone(),
            attempts: j.attempts,
            preemptions: j.preemptions,
            reclaims: j.reclaims,
            restarts: j.restarts,
            repairs: j.repairs,
            finished_at_ms: j.finished_at_ms,
            finished_at: rfc3339(j.finished_at_ms),
        }
    }
}

/// `gangway jobs -o json`.
#[derive(Debug, Serialize)]
pub struct JobListView {
    pub jobs: Vec<JobView>,
}

/// One task of a job.
#[derive(Debug, Serialize)]
pub struct TaskView {
    pub index: u32,
    pub host: String,
    pub devices: Vec<u32>,
    pub state: String,
    pub exit_code: Option<i32>,
    pub message: String,
}

#[derive(Debug, Serialize)]
pub struct CheckpointView {
    pub epoch: u64,
    pub path: String,
    pub step: u64,
    pub bytes: u64,
    pub recorded_at_ms: u64,
    pub recorded_at: Option<String>,
}

/// One lease of the job: an attempt to run it.
#[derive(Debug, Serialize)]
pub struct RunView {
    /// 1 for the job's first lease.
    pub attempt: u32,
    pub epoch: u64,
    pub hosts: Vec<String>,
    pub started_at_ms: u64,
    pub started_at: Option<String>,
    /// Null while it runs.
    pub ended_at_ms: Option<u64>,
    pub ended_at: Option<String>,
    /// "completed", "application", "infrastructure", "scheduler" or "cancelled"; null while it
    /// runs.
    pub cause: Option<String>,
    /// What ended it, in words.
    pub end: String,
}

/// The spec's restart policy for application failures.
#[derive(Debug, Serialize)]
pub struct RestartView {
    pub max_restarts: u32,
    pub backoff_ms: u64,
    pub max_backoff_ms: u64,
}

#[derive(Debug, Serialize)]
pub struct HistoryView {
    pub at_ms: u64,
    pub at: Option<String>,
    pub what: String,
}

/// `gangway job status -o json`: the summary's fields, then the detail.
#[derive(Debug, Serialize)]
pub struct JobDetailView {
    #[serde(flatten)]
    pub job: JobView,
    pub command: Vec<String>,
    pub required_topology: String,
    pub preferred_topology: String,
    pub task_placements: Vec<TaskView>,
    pub last_checkpoint: Option<CheckpointView>,
    /// A migration waiting for its checkpoint, in words; empty when none.
    pub migration: String,
    /// Host of each rank under the most recent lease (where `gangway logs` finds them).
    pub last_hosts: Vec<String>,
    /// Its leases, oldest first (the most recent ones only).
    pub runs: Vec<RunView>,
    pub restart: Option<RestartView>,
    /// The spec's `[env]`.
    pub env: std::collections::BTreeMap<String, String>,
    /// The names of the spec's `[secret_env]` (their values never leave the cluster but to the
    /// job's hosts).
    pub secret_env: Vec<String>,
    pub history: Vec<HistoryView>,
}

impl From<&pb::JobDetail> for JobDetailView {
    fn from(d: &pb::JobDetail) -> Self {
        let mut summary = d.summary.clone().unwrap_or_default();
        // A replica from before the summary carried it names it in the detail only.
        summary.finished_at_ms = summary.finished_at_ms.max(d.finished_at_ms);
        Self {
            job: JobView::from(&summary),
            command: d.command.clone(),
            env: d.env.clone().into_iter().collect(),
            secret_env: d.secret_env.clone(),
            required_topology: d.required_topology.clone(),
            preferred_topology: d.preferred_topology.clone(),
            migration: d.migration.clone(),
            last_hosts: d.last_hosts.clone(),
            runs: run_views(summary.attempts, &d.runs),
            restart: d.restart.as_ref().map(|r| RestartView {
                max_restarts: r.max_restarts,
                backoff_ms: r.backoff_ms,
                max_backoff_ms: r.max_backoff_ms,
            }),
            task_placements: d
                .tasks
                .iter()
                .map(|t| TaskView {
                    index: t.index,
                    host: t.host.clone(),
                    devices: t.devices.clone(),
                    state: t.state().word().to_owned(),
                    exit_code: t.has_exit_code.then_some(t.exit_code),
                    message: t.message.clone(),
                })
                .collect(),
            last_checkpoint: d
                .last_checkpoint
                .as_ref()
                .filter(|c| !c.path.is_empty() || c.recorded_at_ms != 0)
                .map(|c| CheckpointView {
                    epoch: c.epoch,
                    path: c.path.clone(),
                    step: c.step,
                    bytes: c.bytes,
                    recorded_at_ms: c.recorded_at_ms,
                    recorded_at: rfc3339(c.recorded_at_ms),
                }),
            history: d
                .history
                .iter()
                .map(|h| HistoryView {
                    at_ms: h.at_ms,
                    at: rfc3339(h.at_ms),
                    what: h.what.clone(),
                })
                .collect(),
        }
    }
}

/// The runs the server kept (the most recent ones), numbered among all `attempts` of the job.
fn run_views(attempts: u32, runs: &[pb::RunInfo]) -> Vec<RunView> {
    let first = attempts.saturating_sub(runs.len() as u32) + 1;
    runs.iter()
        .enumerate()
        .map(|(i, r)| RunView {
            attempt: first + i as u32,
            epoch: r.epoch,
            hosts: r.hosts.clone(),
            started_at_ms: r.started_at_ms,
            started_at: rfc3339(r.started_at_ms),
            ended_at_ms: (r.ended_at_ms != 0).then_some(r.ended_at_ms),
            ended_at: rfc3339(r.ended_at_ms),
            cause: (!r.cause.is_empty()).then(|| r.cause.clone()),
            end: r.end.clone(),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Tables
// ---------------------------------------------------------------------------------------------

pub fn jobs_table(view: &JobListView, now_ms: u64) -> String {
    let mut t = new_table([
        "ID", "NAME", "QUEUE", "PRIO", "STATE", "TASKS", "DEVICES", "EPOCH", "HOSTS", "AGE",
        "REASON",
    ]);
    if view.jobs.is_empty() {
        return "No jobs.".to_owned();
    }
    for j in &view.jobs {
        t.add_row(vec![
            j.id.clone(),
            j.name.clone(),
            j.queue.clone(),
            j.priority.to_string(),
            j.state.clone(),
            j.tasks.to_string(),
            j.devices.clone(),
            epoch_cell(j.lease_epoch),
            format_hosts(&j.hosts),
            age_since(j.submitted_at_ms, now_ms),
            j.pending_reason.clone(),
        ]);
    }
    table_string(t)
}

fn epoch_cell(epoch: u64) -> String {
    if epoch == 0 {
        "-".to_owned()
    } else {
        epoch.to_string()
    }
}

fn when(at_ms: u64, now_ms: u64) -> String {
    match rfc3339(at_ms) {
        Some(t) => format!("{t} ({} ago)", age_since(at_ms, now_ms)),
        None => "-".to_owned(),
    }
}

pub fn job_detail_table(v: &JobDetailView, now_ms: u64) -> String {
    let j = &v.job;
    let mut lines: Vec<(&str, String)> = vec![
        ("Job", format!("{} ({})", j.id, j.name)),
        ("Queue", format!("{}  priority {}", j.queue, j.priority)),
        ("State", j.state.clone()),
        ("Devices", j.devices.clone()),
        ("Submitted", when(j.submitted_at_ms, now_ms)),
    ];
    if j.finished_at_ms != 0 {
        lines.push(("Finished", when(j.finished_at_ms, now_ms)));
    }
    if !j.pending_reason.is_empty() {
        lines.push(("Pending", j.pending_reason.clone()));
    }
    lines.push(("Lease epoch", epoch_cell(j.lease_epoch)));
    lines.push((
        "Attempts",
        format!(
            "{}  preemptions {}  idle reclaims {}  restarts {}  repairs {}",
            j.attempts, j.preemptions, j.reclaims, j.restarts, j.repairs
        ),
    ));
    if let Some(r) = &v.restart {
        lines.push((
            "Restart",
            if r.max_restarts == 0 {
                "never after an application failure".to_owned()
            } else {
                format!(
                    "up to {} times after application failures, backoff {} doubling to {}",
                    r.max_restarts,
                    format_age(r.backoff_ms),
                    format_age(r.max_backoff_ms)
                )
            },
        ));
    }
    if !v.command.is_empty() {
        lines.push(("Command", v.command.join(" ")));
    }
    let env: Vec<String> = v.env.iter().map(|(k, val)| format!("{k}={val}")).collect();
    let secret = gangway_proto::secret::REDACTED;
    let secrets = v.secret_env.iter().map(|k| format!("{k}={secret}"));
    let env: Vec<String> = env.into_iter().chain(secrets).collect();
    if !env.is_empty() {
        lines.push(("Env", env.join(" ")));
    }
    if !v.required_topology.is_empty() || !v.preferred_topology.is_empty() {
        lines.push((
            "Topology",
            format!(
                "required {}, preferred {}",
                or_dash(&v.required_topology),
                or_dash(&v.preferred_topology)
            ),
        ));
    }
    lines.push((
        "Checkpoint",
        match &v.last_checkpoint {
            None => "-".to_owned(),
            Some(c) => format!(
                "step {} at {} ({}, epoch {}, {})",
                c.step,
                c.path,
                format_bytes(c.bytes),
                c.epoch,
                match rfc3339(c.recorded_at_ms) {
                    Some(_) => format!("{} ago", age_since(c.recorded_at_ms, now_ms)),
                    None => "-".to_owned(),
                }
            ),
        },
    ));
    if !v.migration.is_empty() {
        lines.push(("Migration", v.migration.clone()));
    }
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out: String = lines
        .iter()
        .map(|(k, v)| format!("{:<width$} {v}", format!("{k}:")))
        .collect::<Vec<_>>()
        .join("\n");

    if !v.task_placements.is_empty() {
        let mut t = new_table(["TASK", "HOST", "DEVICES", "STATE", "EXIT", "MESSAGE"]);
        for task in &v.task_placements {
            t.add_row(vec![
                task.index.to_string(),
                or_dash(&task.host),
                or_dash(&format_indices(&task.devices)),
                or_dash(&task.state),
                task.exit_code
                    .map_or_else(|| "-".to_owned(), |c| c.to_string()),
                task.message.clone(),
            ]);
        }
        out.push_str("\n\n");
        out.push_str(&table_string(t));
    }
    if !v.runs.is_empty() {
        let mut t = new_table([
            "ATTEMPT", "EPOCH", "HOSTS", "STARTED", "ENDED", "CAUSE", "END",
        ]);
        for r in &v.runs {
            t.add_row(vec![
                r.attempt.to_string(),
                r.epoch.to_string(),
                or_dash(&format_hosts(&r.hosts)),
                format!("{} ago", age_since(r.started_at_ms, now_ms)),
                r.ended_at_ms.map_or_else(
                    || "running".to_owned(),
                    |e| format!("{} ago", age_since(e, now_ms)),
                ),
                r.cause.clone().unwrap_or_else(|| "-".to_owned()),
                r.end.clone(),
            ]);
        }
        out.push_str("\n\nRuns:\n");
        out.push_str(&table_string(t));
    }
    if !v.history.is_empty() {
        out.push_str("\n\nHistory:");
        for h in &v.history {
            out.push_str(&format!(
                "\n  {}  {}",
                h.at.as_deref().unwrap_or("-"),
                h.what
            ));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

/// A fresh random idempotency key (128 bits, hex).
pub fn new_idempotency_key() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn read_spec(file: &std::path::Path) -> Result<String, ClientError> {
    if file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| ClientError::Usage(format!("cannot read the spec from stdin: {e}")))?;
        Ok(text)
    } else {
        read_arg_file(file)
    }
}

pub async fn submit(args: SubmitArgs) -> Result<(), ClientError> {
    let key = args
        .idempotency_key
        .clone()
        .unwrap_or_else(new_idempotency_key);
    let [file] = args.files.as_slice() else {
        return submit_batch(args, key).await;
    };
    if args.array.is_some() {
        return submit_batch(args, key).await;
    }
    let text = read_spec(file)?;
    JobSpec::from_toml_str(&text).map_err(ClientError::InvalidSpec)?;
    let mut client = args.opts.client();
    let reply = client.submit_job(&text, &key).await?;
    let mut view = SubmitView {
        job_id: reply.job_id.clone(),
        existing: reply.existing,
        state: None,
        pending_reason: None,
    };
    if reply.existing {
        eprintln!(
            "idempotency key {key} was already used: job {} exists, no new job created",
            reply.job_id
        );
    }
    let Some(wait) = args.wait else {
        match args.opts.output {
            Output::Table => println!("{}", view.job_id),
            Output::Json => println!("{}", to_json(&view, false)),
        }
        return Ok(());
    };
    if args.opts.output == Output::Table {
        // The id first, so a script has it even if the wait fails.
        println!("{}", view.job_id);
    }
    let result = wait_running(&mut client, &reply.job_id, wait).await;
    if let Ok(summary) | Err((Some(summary), _)) = &result {
        view.state = Some(summary.state().word().to_owned());
        view.pending_reason = Some(summary.pending_reason.clone());
    }
    match args.opts.output {
        Output::Json => println!("{}", to_json(&view, false)),
        Output::Table => {
            if let Ok(s) = &result {
                eprintln!(
                    "job {} is {} on {}",
                    s.id,
                    s.state().word(),
                    format_hosts(&s.hosts)
                );
            }
        }
    }
    result.map(|_| ()).map_err(|(_, e)| e)
}

/// Several specs, or one spec as an array, in one `SubmitJobs` request; one id per line.
async fn submit_batch(args: SubmitArgs, key: String) -> Result<(), ClientError> {
    if args.wait.is_some() {
        return Err(ClientError::Usage(
            "--wait takes one job; leave it out with several files or --array".into(),
        ));
    }
    if args.files.len() > MAX_BATCH_FILES {
        return Err(ClientError::Usage(format!(
            "at most {} files go in one submission, got {}",
            MAX_BATCH_FILES,
            args.files.len()
        )));
    }
    if args.array.is_some() && args.files.len() > 1 {
        return Err(ClientError::Usage("--array takes one spec file".into()));
    }
    let mut jobs = Vec::with_capacity(args.files.len());
    for (i, file) in args.files.iter().enumerate() {
        let text = read_spec(file)?;
        JobSpec::from_toml_str(&text)
            .map_err(|e| ClientError::Usage(format!("{}: {e}", file.display())))?;
        // An array's jobs get `KEY/i` from the server; a batch's here.
        let key = match args.array {
            Some(_) => key.clone(),
            None => format!("{key}/{i}"),
        };
        jobs.push(pb::SubmitJobRequest {
            spec_toml: text,
            idempotency_key: key,
        });
    }
    let reply = args
        .opts
        .client()
        .submit_jobs(jobs, args.array.unwrap_or(0))
        .await?;
    let existing = reply.jobs.iter().filter(|j| j.existing).count();
    if existing > 0 {
        eprintln!(
            "idempotency key {key} was already used: {existing} of the {} jobs existed, not created again",
            reply.jobs.len()
        );
    }
    let views: Vec<SubmitView> = reply
        .jobs
        .into_iter()
        .map(|j| SubmitView {
            job_id: j.job_id,
            existing: j.existing,
            state: None,
            pending_reason: None,
        })
        .collect();
    match args.opts.output {
        Output::Table => views.iter().for_each(|v| println!("{}", v.job_id)),
        Output::Json => println!("{}", to_json(&views, false)),
    }
    Ok(())
}

/// Polls the job until it runs (or has already run to success), fails, or `wait` passes.
async fn wait_running(
    client: &mut Client,
    job_id: &str,
    wait: Duration,
) -> Result<pb::JobSummary, (Option<pb::JobSummary>, ClientError)> {
    let deadline = Instant::now() + wait;
    loop {
        let detail = client.get_job(job_id).await.map_err(|e| (None, e))?;
        let s = detail.summary.unwrap_or_default();
        match s.state() {
            pb::JobState::Running | pb::JobState::Succeeded => return Ok(s),
            pb::JobState::Failed | pb::JobState::Cancelled => {
                let last = detail
                    .history
                    .last()
                    .map(|h| format!(": {}", h.what))
                    .unwrap_or_default();
                let state = s.state().word();
                let err = ClientError::Other(format!("job {job_id} is {state}{last}"));
                return Err((Some(s), err));
            }
            _ => {}
        }
        let now = Instant::now();
        if now >= deadline {
            let reason = if s.pending_reason.is_empty() {
                format!("state {}", s.state().word())
            } else {
                s.pending_reason.clone()
            };
            let err = ClientError::NotPlaceable {
                job_id: job_id.to_owned(),
                waited: wait,
                reason,
            };
            return Err((Some(s), err));
        }
        tokio::time::sleep(WAIT_POLL.min(deadline - now)).await;
    }
}

async fn jobs_frame(
    client: &mut Client,
    args: &JobsArgs,
    states: &[pb::JobState],
    queue: &str,
    render: Render,
) -> Result<String, ClientError> {
    let jobs = client
        .list_jobs(states, queue, args.archived, args.limit)
        .await?;
    let view = JobListView {
        jobs: jobs.iter().map(JobView::from).collect(),
    };
    Ok(render.view(&view, |v| jobs_table(v, render.now_ms)))
}

pub async fn jobs(args: JobsArgs) -> Result<(), ClientError> {
    let states: Vec<pb::JobState> = args.state.iter().map(|s| s.to_pb()).collect();
    let queue = args.queue.clone().unwrap_or_default();
    let mut client = args.opts.client();
    let mut w = Watcher::new(&args.watch, args.opts.output);
    loop {
        let render = w.render();
        let Some(frame) = w
            .during(jobs_frame(&mut client, &args, &states, &queue, render))
            .await
        else {
            return Ok(());
        };
        w.show(frame)?;
        if !w.next().await {
            return Ok(());
        }
    }
}

async fn job_frame(client: &mut Client, id: &str, render: Render) -> Result<String, ClientError> {
    let detail = client.get_job(id).await?;
    let view = JobDetailView::from(&detail);
    Ok(render.view(&view, |v| job_detail_table(v, render.now_ms)))
}

pub async fn job(group: JobGroup) -> Result<(), ClientError> {
    match group.command {
        JobCommand::Status(args) => {
            let mut client = group.opts.client();
            let mut w = Watcher::new(&args.watch, group.opts.output);
            loop {
                let render = w.render();
                let Some(frame) = w.during(job_frame(&mut client, &args.id, render)).await else {
                    return Ok(());
                };
                w.show(frame)?;
                if !w.next().await {
                    return Ok(());
                }
            }
        }
        JobCommand::Cancel(args) => cancel(group.opts, args).await,
        JobCommand::Checkpoint(args) => {
            group.opts.client().checkpoint_job(&args.id).await?;
            print_action(
                group.opts.output,
                "checkpoint",
                &args.id,
                &format!(
                    "checkpoint requested for job {}; `gangway job status {}` shows it once written",
                    args.id, args.id
                ),
            );
            Ok(())
        }
        JobCommand::Migrate(args) => {
            group
                .opts
                .client()
                .migrate_job(&args.id, &args.to, &args.avoid)
                .await?;
            print_action(
                group.opts.output,
                "migrate",
                &args.id,
                &format!(
                    "job {} is checkpointing; it moves once the checkpoint is written",
                    args.id
                ),
            );
            Ok(())
        }
    }
}

pub async fn cancel(opts: ClientOpts, args: CancelArgs) -> Result<(), ClientError> {
    let mut client = opts.client();
    client.cancel_job(&args.id, &args.reason).await?;
    print_action(
        opts.output,
        "cancel",
        &args.id,
        &format!("job {} cancelled", args.id),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> pb::JobSummary {
        pb::JobSummary {
            id: "j-1".into(),
            name: "pretrain".into(),
            queue: "research".into(),
            priority: 100,
            state: pb::JobState::Running.into(),
            tasks: 2,
            devices_per_task: "8".into(),
            kind: "gpu".into(),
            submitted_at_ms: 1_700_000_000_000,
            pending_reason: String::new(),
            lease_epoch: 7,
            hosts: vec!["host-a".into(), "host-b".into()],
            attempts: 2,
            preemptions: 1,
            reclaims: 3,
            restarts: 0,
            repairs: 1,
            finished_at_ms: 0,
        }
    }

    #[test]
    fn job_json_has_stable_keys() {
        let v = serde_json::to_value(JobView::from(&summary())).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut want = [
            "id",
            "name",
            "queue",
            "priority",
            "state",
            "tasks",
            "devices_per_task",
            "kind",
            "devices",
            "submitted_at_ms",
            "submitted_at",
            "pending_reason",
            "lease_epoch",
            "hosts",
            "attempts",
            "preemptions",
            "reclaims",
            "restarts",
            "repairs",
            "finished_at_ms",
            "finished_at",
        ];
        want.sort_unstable();
        assert_eq!(keys, want);
        assert_eq!(v["devices"], "2x8 gpu");
        assert_eq!(v["submitted_at"], "2023-11-14T22:13:20.000Z");
    }

    #[test]
    fn jobs_table_rows() {
        let mut pending = summary();
        pending.id = "j-2".into();
        pending.state = pb::JobState::Pending.into();
        pending.lease_epoch = 0;
        pending.hosts.clear();
        pending.devices_per_task = "0.5".into();
        pending.tasks = 1;
        pending.pending_reason = "no free gpu share".into();
        let view = JobListView {
            jobs: vec![JobView::from(&summary()), JobView::from(&pending)],
        };
        let now = 1_700_000_000_000 + 310_000;
        let text = jobs_table(&view, now);
        let lines: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(lines[0][0], "ID");
        assert_eq!(
            lines[1],
            [
                "j-1",
                "pretrain",
                "research",
                "100",
                "running",
                "2",
                "2x8",
                "gpu",
                "7",
                "host-a,host-b",
                "5m10s"
            ]
        );
        assert_eq!(
            lines[2],
            [
                "j-2", "pretrain", "research", "100", "pending", "1", "1x0.5", "gpu", "-", "-",
                "5m10s", "no", "free", "gpu", "share"
            ]
        );
        assert_eq!(jobs_table(&JobListView { jobs: vec![] }, now), "No jobs.");
    }

    #[test]
    fn job_detail_shows_placement_checkpoint_and_history() {
        let detail = pb::JobDetail {
            summary: Some(summary()),
            tasks: vec![
                pb::TaskInfo {
                    index: 0,
                    host: "host-a".into(),
                    devices: vec![0, 1, 2, 3, 4, 5, 6, 7],
                    state: pb::TaskState::Running.into(),
                    ..Default::default()
                },
                pb::TaskInfo {
                    index: 1,
                    host: "host-b".into(),
                    devices: vec![4, 5],
                    state: pb::TaskState::Failed.into(),
                    has_exit_code: true,
                    exit_code: 137,
                    message: "OOM".into(),
                },
            ],
            last_checkpoint: Some(pb::CheckpointInfo {
                epoch: 6,
                path: "/ckpt/400".into(),
                step: 400,
                bytes: 3 << 30,
                recorded_at_ms: 1_700_000_100_000,
            }),
            history: vec![pb::HistoryLine {
                at_ms: 1_700_000_000_000,
                what: "submitted".into(),
            }],
            command: vec!["python3".into(), "train.py".into()],
            env: [("LR".to_owned(), "0.1".to_owned())].into(),
            secret_env: vec!["HF_TOKEN".into()],
            required_topology: "rack".into(),
            runs: vec![
                pb::RunInfo {
                    epoch: 6,
                    hosts: vec!["host-a".into(), "host-c".into()],
                    started_at_ms: 1_700_000_000_000,
                    ended_at_ms: 1_700_000_100_000,
                    cause: "infrastructure".into(),
                    end: "device 3 of host-c failed".into(),
                },
                pb::RunInfo {
                    epoch: 7,
                    hosts: vec!["host-a".into(), "host-b".into()],
                    started_at_ms: 1_700_000_120_000,
                    ..Default::default()
                },
            ],
            restart: Some(pb::RestartPolicyInfo {
                max_restarts: 3,
                backoff_ms: 10_000,
                max_backoff_ms: 300_000,
            }),
            ..Default::default()
        };
        let view = JobDetailView::from(&detail);
        assert_eq!(
            (view.runs[0].attempt, view.runs[1].attempt),
            (1, 2),
            "numbered among the job's attempts"
        );
        assert_eq!(view.runs[1].ended_at_ms, None);
        assert_eq!(view.task_placements[0].exit_code, None);
        assert_eq!(view.task_placements[1].exit_code, Some(137));
        let text = job_detail_table(&view, 1_700_000_160_000);
        for want in [
            "Job:         j-1 (pretrain)",
            "Lease epoch: 7",
            "Attempts:    2  preemptions 1  idle reclaims 3  restarts 0  repairs 1",
            "Restart:     up to 3 times after application failures, backoff 10s doubling to 5m",
            "Runs:",
            "1        6      host-a,host-c  2m40s ago  1m ago   infrastructure  device 3 of host-c failed",
            "2        7      host-a,host-b  40s ago    running  -",
            "Command:     python3 train.py",
            "Env:         LR=0.1 HF_TOKEN=<secret>",
            "Topology:    required rack, preferred -",
            "Checkpoint:  step 400 at /ckpt/400 (3.0 GiB, epoch 6, 1m ago)",
            "0     host-a  0-7      running  -",
            "1     host-b  4-5      failed   137   OOM",
            "  2023-11-14T22:13:20.000Z  submitted",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["id"], "j-1", "summary fields are flattened in");
        assert_eq!(json["task_placements"][1]["exit_code"], 137);
        assert_eq!(json["last_checkpoint"]["step"], 400);
        assert_eq!(json["finished_at"], serde_json::Value::Null);
        assert_eq!(json["runs"][0]["cause"], "infrastructure");
        assert_eq!(json["runs"][1]["cause"], serde_json::Value::Null);
        assert_eq!(json["restart"]["max_restarts"], 3);
    }

    #[test]
    fn a_finished_jobs_end_shows_in_the_listing_and_in_its_status() {
        let ended = pb::JobSummary {
            state: pb::JobState::Succeeded.into(),
            finished_at_ms: 1_700_000_060_000,
            ..summary()
        };
        let listed = serde_json::to_value(JobView::from(&ended)).unwrap();
        assert_eq!(listed["finished_at_ms"], 1_700_000_060_000u64);
        assert_eq!(listed["finished_at"], "2023-11-14T22:14:20.000Z");
        // A replica from before the summary carried the end names it in the detail only.
        let older = pb::JobDetail {
            summary: Some(pb::JobSummary {
                finished_at_ms: 0,
                ..ended
            }),
            finished_at_ms: 1_700_000_060_000,
            ..Default::default()
        };
        let view = JobDetailView::from(&older);
        let status = serde_json::to_value(&view).unwrap();
        assert_eq!(status["finished_at"], "2023-11-14T22:14:20.000Z");
        assert!(job_detail_table(&view, 1_700_000_120_000)
            .contains("Finished:    2023-11-14T22:14:20.000Z (1m ago)"));
    }

    #[test]
    fn an_empty_checkpoint_is_none() {
        let detail = pb::JobDetail {
            last_checkpoint: Some(pb::CheckpointInfo::default()),
            ..Default::default()
        };
        assert!(JobDetailView::from(&detail).last_checkpoint.is_none());
    }
}
