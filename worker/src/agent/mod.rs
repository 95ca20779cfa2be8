//! The agent loop (`gangway worker`): register the host, heartbeat, hold the stream of desired
//! allocations, and make the host's tasks match it (Nomad's client model).
//!
//! * **Desired state is pulled, never pushed as commands.** Each allocation set is the whole set of
//!   tasks this host should run; [`reconcile::plan`] (pure) diffs it against a snapshot of what
//!   runs and [`Agent::reconcile`] carries out its actions: new tasks are launched, tasks no longer
//!   wanted are stopped (signal, grace, kill), and a grown `checkpoint_request` makes the task
//!   checkpoint.
//! * **Fencing.** A set older than the newest one accepted (lower revision: a deposed leader) is
//!   refused whole, and a task whose lease epoch is older than the newest epoch seen for one of its
//!   devices is refused and logged; neither starts nor stops anything.
//! * **Lease deadline.** Every reply from the scheduler moves a deadline forward in the lease
//!   file; each task's supervisor (the shim, see [`crate::driver`]) stops its task when the deadline
//!   passes, so a host cut off from every replica, or whose agent died, stops its tasks before the
//!   majority can lease the devices again. A heartbeat reply moves it only while the allocation
//!   set the agent applied is the state's ([`lease_renewal`]): a host that cannot receive its
//!   allocations stops its tasks by the deadline too.
//! * **Task users** ([`task_users`]): tasks run as the unprivileged users the operator names,
//!   never as the agent's user unless told to; they cannot write the agent's files or reach each
//!   other's.
//! * **Re-adoption.** Intent lives in a state file ([`state_file`]); a restarted agent re-adopts the
//!   tasks whose supervisors still run and reports the ones that ended while it was away.
//! * **Reports are retried until acknowledged** (an outbox in the state file): an election never
//!   loses a completion. A definite refusal (a stale epoch) also ends the retries. A task's end
//!   is queued without a save of its own (a restarted agent learns it again from the shim's exit
//!   file), and so is the removal of acknowledged task reports; the state is saved after every
//!   failed send, so what waits on an unreachable quorum is on disk.
//! * **Device health** ([`health`]): every telemetry reading classifies each device healthy,
//!   degraded or failed; each change is queued once, ahead of any queued task failure, and a task
//!   that fails makes the agent read its devices first, so the scheduler learns of a failed
//!   device before the failures it caused. The optional health check ([`health_check`]) runs
//!   before the host first registers and periodically after.

pub mod accounts;
pub mod checkpoint;
pub mod config;
mod cpu_meter;
mod group_commit;
pub mod health;
pub mod health_check;
mod isolation;
pub mod lease_renewal;
pub mod log_service;
pub mod reconcile;
pub mod scheduler_link;
mod slot_pair;
pub mod state_file;
mod stream_trouble;
pub mod task_env;
pub mod task_reports;
pub mod task_users;
mod tls;
pub mod uid_range;

pub use config::{AgentConfig, TopologyLabels};
pub use scheduler_link::SchedulerLink;
use scheduler_link::STANDBY_EVERY;

use crate::devices::{DeviceBackend, DeviceInfo, FakeBackend};
use crate::driver::{
    boottime_ms, DriverConfig, DriverError, ExitOutcome, ExitReason, LaunchSpec, TaskDriver,
    TaskHandle, TaskKey,
};
use gangway_proto::link::{error_code, retryable};
use gangway_proto::pb;
use group_commit::GroupCommit;
use health::{HealthChange, HealthMonitor};
use health_check::CheckOutcome;
use reconcile::{Action, LocalTask};
use state_file::{
    AgentState, PendingReport, ReportedHealth, ReportedState, StateFile, StateFileError, TaskEntry,
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use task_reports::{only_task_reports, task_status_report, MAX_REPORTS_PER_REQUEST};
use tokio::sync::{watch, Notify};

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Devices(#[from] crate::devices::DeviceError),
    #[error(transparent)]
    State(#[from] StateFileError),
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("the scheduler refused this host's registration: {0}")]
    Registration(String),
    #[error("{0}")]
    Config(String),
}

/// Default checkpoint deadline when the allocation carries none.
const DEFAULT_CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(60);

/// One agent. Shared by its loops through an `Arc`.
/// How long the files of a finished task (its directory, exit files, log) stay on the host.
pub const TASK_FILES_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// How often the agent looks for such files.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(600);

pub struct Agent {
    cfg: AgentConfig,
    backend: Arc<dyn DeviceBackend>,
    /// Set when the devices are fake: their utilization follows what the tasks hold.
    fake: Option<Arc<FakeBackend>>,
    inventory: Vec<DeviceInfo>,
    driver: Arc<TaskDriver>,
    link: SchedulerLink,
    /// The log API's TLS (`None` toward an insecure cluster).
    log_tls: Option<gangway_tls::ServerTls>,
    state: Mutex<AgentState>,
    state_file: StateFile,
    /// Writes of the state file, one for the changes made while the previous one was under way
    /// (see [`Agent::save`]).
    saving: GroupCommit,
    running: Mutex<BTreeMap<TaskKey, TaskHandle>>,
    /// CPU use of each running task's process group: the utilization of the fake devices it holds.
    cpu: Mutex<cpu_meter::CpuMeter>,
    /// Tasks with a checkpoint under way (so a repeated set does not start a second one).
    checkpointing: Mutex<BTreeSet<TaskKey>>,
    /// Tasks whose launch waits for the tasks still on their devices to exit (so a repeated set
    /// does not launch them a second time), with the newest checkpoint request a set has
    /// carried for them meanwhile (answered once the task runs).
    launching: Mutex<BTreeMap<TaskKey, u64>>,
    /// The task keys of the newest accepted set: what should run. Meaningful once `synced`.
    desired: Mutex<BTreeSet<TaskKey>>,
    /// A set has been accepted since start: until then an ended task's entry must stay, or the
    /// first set (which may still list it) would launch it again.
    synced: std::sync::atomic::AtomicBool,
    outbox_wake: Notify,
    heartbeat_ms: AtomicU64,
    /// The lease TTL the scheduler last gave (how long tasks may run without an answer).
    lease_ttl_ms: AtomicU64,
    /// A heartbeat has been answered (by the leader): reports may go out.
    leader_found: std::sync::atomic::AtomicBool,
    /// Each device's last reported health. Held while the devices are read, so readings are
    /// classified (and their changes queued) in the order they were taken.
    health: Mutex<HealthMonitor>,
    /// Who tasks run as.
    users: task_users::TaskUsers,
    /// The uids of tasks being launched.
    uids: isolation::UidBook,
    /// Whether a heartbeat reply may move the lease deadline.
    renewal: Mutex<lease_renewal::RenewGate<(u64, u64)>>,
}

/// How the agent's devices are read.
pub enum Devices {
    Nvml(Arc<dyn DeviceBackend>),
    Fake(Arc<FakeBackend>),
}

impl Agent {
    pub fn new(cfg: AgentConfig, devices: Devices) -> Result<Arc<Self>, AgentError> {
        if cfg.servers.is_empty() {
            return Err(AgentError::Config(
                "no scheduler addresses: give --servers host:port[,host:port...]".into(),
            ));
        }
        let (backend, fake): (Arc<dyn DeviceBackend>, Option<Arc<FakeBackend>>) = match devices {
            Devices::Nvml(b) => (b, None),
            Devices::Fake(f) => (f.clone(), Some(f)),
        };
        let inventory = backend.inventory()?;
        // SAFETY: geteuid cannot fail.
        let users = task_users::TaskUsers::from_flags(&cfg.task_users, unsafe { libc::geteuid() })
            .map_err(AgentError::Config)?;
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
            AgentError::Config(format!(
                "cannot create the data directory {}: {e}",
                cfg.data_dir.display()
            ))
        })?;
        std::fs::create_dir_all(&cfg.checkpoint_dir).map_err(|e| {
            AgentError::Config(format!(
                "cannot create the checkpoint directory {}: {e}",
                cfg.checkpoint_dir.display()
            ))
        })?;
        isolation::prepare_host(&cfg, &users)?;
        let driver = Arc::new(TaskDriver::new(DriverConfig {
            shim_command: cfg.shim_command.clone(),
            fork_server: cfg.shim_fork_server,
            data_dir: cfg.data_dir.clone(),
            lease_file: cfg.data_dir.join("lease-deadline"),
            grace: cfg.grace,
        })?);
        let state_file = StateFile::new(&cfg.data_dir);
        let state = state_file.load()?;
        let tls = tls::agent_tls(&cfg)?;
        let link = SchedulerLink::with_dialer(cfg.servers.clone(), cfg.rpc_timeout, tls.dialer);
        let health = Mutex::new(HealthMonitor::new(&inventory));
        Ok(Arc::new(Self {
            cfg,
            backend,
            fake,
            inventory,
            driver,
            link,
            log_tls: tls.server,
            state: Mutex::new(state),
            state_file,
            saving: GroupCommit::default(),
            running: Mutex::new(BTreeMap::new()),
            cpu: Mutex::new(cpu_meter::CpuMeter::new()),
            checkpointing: Mutex::new(BTreeSet::new()),
            launching: Mutex::new(BTreeMap::new()),
            desired: Mutex::new(BTreeSet::new()),
            synced: std::sync::atomic::AtomicBool::new(false),
            outbox_wake: Notify::new(),
            heartbeat_ms: AtomicU64::new(1_000),
            lease_ttl_ms: AtomicU64::new(0),
            leader_found: std::sync::atomic::AtomicBool::new(false),
            health,
            users,
            uids: isolation::UidBook::default(),
            renewal: Mutex::new(lease_renewal::RenewGate::default()),
        }))
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, AgentState> {
        lock(&self.state)
    }

    /// Makes the change just made to the state durable; false when it could not be written (the
    /// error is logged). Writes are serialized and each takes its snapshot under the write lock,
    /// so the file always ends up holding the newest state, never an older snapshot written
    /// late; changes made while one write is under way share the next ([`GroupCommit`]).
    fn save(&self) -> bool {
        let written = self.saving.commit(
            || self.lock_state().clone(),
            |snapshot| self.state_file.save(&snapshot),
        );
        match written {
            Ok(_) => true,
            Err(e) => {
                tracing::error!("{e}");
                false
            }
        }
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(
        self: Arc<Self>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), AgentError> {
        self.readopt();
        let listener = tokio::net::TcpListener::bind(self.cfg.listen)
            .await
            .map_err(|source| AgentError::Listen {
                addr: self.cfg.listen,
                source,
            })?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let router = tonic::transport::Server::builder().add_service(
            pb::agent_api_server::AgentApiServer::with_interceptor(
                log_service::LogService::new(self.driver.clone()),
                tls::log_reader,
            ),
        );
        let stopped = wait_stop(stop_rx.clone());
        let api = match self.log_tls.clone() {
            Some(t) => {
                tokio::spawn(router.serve_with_incoming_shutdown(t.incoming(listener), stopped))
            }
            None => tokio::spawn(
                router.serve_with_incoming_shutdown(gangway_tls::plain_incoming(listener), stopped),
            ),
        };

        tokio::pin!(shutdown);
        // The health check runs before the host offers its devices; its result is reported once
        // the node exists.
        let first_check = match &self.cfg.health_check {
            Some(check) => tokio::select! {
                o = health_check::run_check(check, &self.inventory) => o,
                _ = &mut shutdown => {
                    let _ = stop_tx.send(true);
                    let _ = api.await;
                    return Ok(());
                }
            },
            None => None,
        };
        let registered = tokio::select! {
            r = self.register_until_accepted() => Some(r),
            _ = &mut shutdown => None,
        };
        match registered {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                let _ = stop_tx.send(true);
                let _ = api.await;
                return Err(e);
            }
            None => {
                let _ = stop_tx.send(true);
                let _ = api.await;
                return Ok(());
            }
        }
        tracing::info!(
            node = %self.cfg.node,
            devices = self.inventory.len(),
            backend = self.backend.name(),
            "registered"
        );
        if let Some(outcome) = first_check {
            self.queue_health_check(outcome);
        }
        let loops = [
            tokio::spawn(self.clone().heartbeat_loop(stop_rx.clone())),
            tokio::spawn(self.clone().watch_loop(stop_rx.clone())),
            tokio::spawn(self.clone().report_loop(stop_rx.clone())),
            tokio::spawn(self.clone().health_check_loop(stop_rx.clone())),
            tokio::spawn(self.clone().housekeeping_loop(stop_rx.clone())),
            tokio::spawn(self.clone().standby_loop(stop_rx.clone())),
        ];
        shutdown.await;
        let _ = stop_tx.send(true);
        for l in loops {
            let _ = l.await;
        }
        if self.cfg.stop_tasks_on_exit {
            let handles: Vec<TaskHandle> = lock(&self.running).values().cloned().collect();
            for h in handles {
                h.stop(self.cfg.grace).await;
            }
        }
        let _ = api.await;
        let _ = self.save();
        Ok(())
    }

    /// Standby connections to every replica, so a failover needs no new handshake (see
    /// [`SchedulerLink::keep_warm`]); each host re-checks at its own phase of the period.
    async fn standby_loop(self: Arc<Self>, stop: watch::Receiver<bool>) {
        let phase = STANDBY_EVERY.mul_f64(phase_of(&self.cfg.node));
        tokio::select! {
            _ = self.link.keep_warm(STANDBY_EVERY, phase) => {}
            _ = wait_stop(stop) => {}
        }
    }

    /// Re-adopts the tasks an earlier run of the agent left; the ones that ended meanwhile are
    /// reported from their exit files.
    fn readopt(self: &Arc<Self>) {
        let mut state = self.lock_state();
        let keys: Vec<TaskKey> = state
            .tasks
            .iter()
            .filter(|(_, e)| e.ended.is_none())
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            let record = state.tasks[&key].process.clone();
            match self.driver.adopt(&record) {
                Ok(handle) => {
                    tracing::info!(job = %key.job, task = key.task, epoch = key.epoch, pid = record.pid, "re-adopted a running task");
                    self.watch_task(handle);
                }
                Err(outcome) => {
                    tracing::info!(job = %key.job, task = key.task, epoch = key.epoch, "task ended while the agent was away: {}", outcome.message);
                    record_end(&mut state, &key, outcome);
                }
            }
        }
        drop(state);
        self.driver.close_idle_task_dirs();
        let _ = self.save();
        self.outbox_wake.notify_one();
    }

    fn register_request(&self) -> pb::RegisterRequest {
        pb::RegisterRequest {
            node: self.cfg.node.clone(),
            address: self.cfg.advertise.clone(),
            datacenter: self.cfg.topology.datacenter.clone(),
            zone: self.cfg.topology.zone.clone(),
            pod: self.cfg.topology.pod.clone(),
            rack: self.cfg.topology.rack.clone(),
            cpu_milli: host_cpu_milli(),
            memory_mib: host_memory_mib(),
            devices: self
                .inventory
                .iter()
                .map(|d| pb::Device {
                    uuid: d.uuid.clone(),
                    model: d.model.clone(),
                    kind: d.kind.to_string(),
                    memory_mib: d.memory_mib,
                    nvlink_domain: u32::from(d.nvlink_domain),
                })
                .collect(),
        }
    }

    /// Registers, retrying while no leader answers. A refusal (a bad field) is final.
    async fn register_until_accepted(&self) -> Result<(), AgentError> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let sent_at = boottime_ms();
            let result = match self.link.client() {
                Ok(mut c) => c.register(self.register_request()).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(reply) => {
                    self.lease_granted(sent_at, reply.get_ref().lease_ttl_ms);
                    self.heartbeat_ms.store(
                        reply.get_ref().heartbeat_interval_ms.max(10),
                        Ordering::Relaxed,
                    );
                    return Ok(());
                }
                Err(status) if retryable(&status) => {
                    tracing::debug!(target = %self.link.target(), "register: {}", status.message());
                    self.link.failed(&status);
                }
                Err(status) => {
                    return Err(AgentError::Registration(status.message().to_owned()));
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Whether a heartbeat reply carrying the state's allocation digest may move the lease
    /// deadline (see [`lease_renewal`]); says when that changes.
    fn may_renew(&self, digest: &[u8], revision: u64, grant: (u64, u64)) -> bool {
        use lease_renewal::Renewal;
        match lock(&self.renewal).on_reply(digest, revision, grant) {
            // Taken when the stream delivers that revision (see `reconcile`).
            Renewal::Deferred => false,
            Renewal::Renew { recovered } => {
                say_resumed(recovered);
                true
            }
            Renewal::Unchecked { first } => {
                if first {
                    tracing::warn!("the scheduler's heartbeat replies carry no allocation digest (an older replica): renewing the lease deadline without knowing whether this host's allocations are current");
                }
                true
            }
            Renewal::Withhold { warn } => {
                if warn {
                    tracing::error!(
                        "this host's allocation set is behind the state's (the allocation stream is not delivering it): not renewing the lease deadline, so its tasks stop by it unless the stream recovers"
                    );
                }
                false
            }
        }
    }

    /// The scheduler answered a call sent at `sent_at`: tasks may run until `sent_at + ttl`.
    fn lease_granted(&self, sent_at: u64, ttl_ms: u64) {
        if ttl_ms == 0 {
            return;
        }
        self.lease_ttl_ms.store(ttl_ms, Ordering::Relaxed);
        if let Err(e) = self.driver.write_lease_deadline(sent_at + ttl_ms) {
            tracing::error!("cannot renew the lease deadline: {e}");
        }
    }

    /// Reads every device: the telemetry a heartbeat carries. Each device's health is classified
    /// from the reading and every change queued for the scheduler (see [`health`]).
    fn read_devices(&self) -> Vec<pb::DeviceTelemetry> {
        let mut monitor = lock(&self.health);
        let (telemetry, changes) = match self.backend.telemetry() {
            Ok(t) => {
                let changes = monitor.observe(&t);
                let telemetry = t
                    .into_iter()
                    .map(|d| pb::DeviceTelemetry {
                        index: d.index,
                        utilization_pct: u32::from(d.utilization_pct),
                        memory_used_mib: d.memory_used_mib,
                    })
                    .collect();
                (telemetry, changes)
            }
            Err(e) => {
                tracing::warn!("device telemetry: {e}");
                (Vec::new(), monitor.observe_error(&e))
            }
        };
        if !changes.is_empty() {
            let suppressed = monitor.suppressed();
            self.queue_health(changes, suppressed);
        }
        telemetry
    }

    /// Queues one report per device whose health changed, ahead of any task failure already
    /// queued, and logs one line per change.
    fn queue_health(&self, changes: Vec<HealthChange>, suppressed: u64) {
        let mut state = self.lock_state();
        for c in changes {
            let health = ReportedHealth::of(c.health);
            match health {
                // The first reading of a healthy device is no news.
                ReportedHealth::Healthy if c.from == pb::DeviceHealth::Unspecified => {
                    tracing::debug!(device = c.index, uuid = %c.uuid, "device health: healthy")
                }
                ReportedHealth::Healthy => tracing::info!(
                    device = c.index, uuid = %c.uuid, suppressed,
                    "device health: healthy"
                ),
                _ => tracing::warn!(
                    device = c.index, uuid = %c.uuid, suppressed,
                    "device health: {}: {}", c.health.word(), c.cause
                ),
            }
            state.queue_device_report(PendingReport::DeviceHealth {
                uuid: c.uuid,
                health,
                cause: c.cause,
            });
        }
        drop(state);
        let _ = self.save();
        self.outbox_wake.notify_one();
    }

    /// Queues a health check's result.
    fn queue_health_check(&self, o: CheckOutcome) {
        if o.passed {
            tracing::debug!("health check passed: {}", o.detail);
        } else {
            tracing::warn!(failing = ?o.failed_devices, "health check failed: {}", o.detail);
        }
        self.lock_state().outbox.push(PendingReport::HealthCheck {
            passed: o.passed,
            failed_devices: o.failed_devices,
            detail: o.detail,
        });
        let _ = self.save();
        self.outbox_wake.notify_one();
    }

    /// Removes the task directories and logs of jobs this host no longer runs or remembers, once
    /// they are [`TASK_FILES_RETENTION`] old, every [`HOUSEKEEPING_EVERY`] (task logs are also
    /// capped as they are written: see the shim).
    async fn housekeeping_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(HOUSEKEEPING_EVERY) => {}
                _ = stop.changed() => return,
            }
            let mut keep: BTreeSet<String> = lock(&self.state)
                .tasks
                .keys()
                .map(|k| k.job.clone())
                .collect();
            keep.extend(lock(&self.running).keys().map(|k| k.job.clone()));
            keep.extend(lock(&self.desired).iter().map(|k| k.job.clone()));
            let driver = self.driver.clone();
            let swept =
                tokio::task::spawn_blocking(move || driver.sweep(&keep, TASK_FILES_RETENTION))
                    .await;
            if let Ok(report) = swept {
                if report.removed_dirs > 0 {
                    tracing::info!(
                        dirs = report.removed_dirs,
                        bytes = report.removed_bytes,
                        "removed the files of finished tasks"
                    );
                }
                metrics::counter!("gangway_worker_swept_bytes_total")
                    .increment(report.removed_bytes);
            }
        }
    }

    /// Runs the health check every interval (the first run was before registration).
    async fn health_check_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let Some(check) = self.cfg.health_check.clone() else {
            return;
        };
        loop {
            tokio::select! {
                _ = tokio::time::sleep(check.interval) => {}
                _ = stop.changed() => return,
            }
            let outcome = tokio::select! {
                o = health_check::run_check(&check, &self.inventory) => o,
                _ = stop.changed() => return,
            };
            if let Some(o) = outcome {
                self.queue_health_check(o);
            }
        }
    }

    async fn heartbeat_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            self.update_fake_utilization();
            let devices = self.read_devices();
            let sent_at = boottime_ms();
            let req = pb::HeartbeatRequest {
                node: self.cfg.node.clone(),
                devices,
            };
            let result = match self.link.client() {
                Ok(mut c) => c.heartbeat(req).await,
                Err(e) => Err(e),
            };
            let mut pause = Duration::from_millis(self.heartbeat_ms.load(Ordering::Relaxed));
            match result {
                Ok(reply) => {
                    let r = reply.into_inner();
                    let grant = (sent_at, r.lease_ttl_ms);
                    if self.may_renew(&r.allocation_digest, r.allocation_revision, grant) {
                        self.lease_granted(sent_at, r.lease_ttl_ms);
                    }
                    if !self.leader_found.swap(true, Ordering::AcqRel) {
                        self.outbox_wake.notify_one();
                    }
                    if r.heartbeat_interval_ms > 0 {
                        self.heartbeat_ms
                            .store(r.heartbeat_interval_ms, Ordering::Relaxed);
                        pause = Duration::from_millis(r.heartbeat_interval_ms);
                    }
                }
                Err(status) if matches!(error_code(&status), Some("unknown_node" | "bad_node")) => {
                    // Declared down (or forgotten): register again, which makes the node ready.
                    tracing::warn!("heartbeat refused: {}; registering again", status.message());
                    if let Err(e) = self.register_until_accepted().await {
                        tracing::error!("{e}");
                    }
                    pause = Duration::ZERO;
                }
                Err(status) => {
                    tracing::debug!(target = %self.link.target(), "heartbeat: {}", status.message());
                    pause = if self.link.failed(&status) {
                        Duration::ZERO
                    } else {
                        pause.min(Duration::from_millis(200))
                    };
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => return,
            }
        }
    }

    async fn watch_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(50);
        let mut trouble = stream_trouble::StreamTrouble::default();
        loop {
            let max_bytes = self.cfg.allocation_stream_max_bytes;
            let stream = match self.link.stream_client(max_bytes) {
                Ok(mut c) => {
                    c.watch_allocations(pb::WatchAllocationsRequest {
                        node: self.cfg.node.clone(),
                    })
                    .await
                }
                Err(e) => Err(e),
            };
            let mut pause = Duration::ZERO;
            let mut redirected = false;
            match stream {
                Ok(resp) => {
                    let mut stream = resp.into_inner();
                    loop {
                        let msg = tokio::select! {
                            m = stream.message() => m,
                            _ = stop.changed() => return,
                        };
                        match msg {
                            Ok(Some(set)) => {
                                backoff = Duration::from_millis(50);
                                trouble.delivered();
                                self.reconcile(set).await;
                            }
                            Ok(None) => break,
                            Err(status) => {
                                pause = trouble.failed(
                                    "the stream ended",
                                    &self.link.target(),
                                    &status,
                                );
                                redirected = self.link.failed(&status);
                                break;
                            }
                        }
                    }
                }
                Err(status) => {
                    pause = trouble.failed("cannot open it", &self.link.target(), &status);
                    redirected = self.link.failed(&status);
                }
            }
            // Sent to the leader by a replica that knows it (after a failover, the first thing
            // a host hears): go there now, not after the backoff the election has built up.
            if redirected && pause.is_zero() {
                backoff = Duration::from_millis(50);
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.max(pause)) => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// Makes the host match one allocation set (see the module docs for the rules): a snapshot of
    /// what the host has, the decision ([`reconcile::plan`]), then its actions carried out.
    pub async fn reconcile(self: &Arc<Self>, set: pb::AllocationSet) {
        let Some((actions, stopping)) = self.decide(&set) else {
            return;
        };
        // The set's launches go side by side: each waits on its shim's answer from the fork
        // server, and the waits overlap (the uid book keeps concurrent picks apart).
        let mut launches = Vec::new();
        for action in actions {
            match action {
                Action::Stop { key } => {
                    if let Some(h) = stopping.get(&key) {
                        tracing::info!(job = %key.job, task = key.task, epoch = key.epoch, "stopping: no longer leased to this host");
                        let (h, grace) = (h.clone(), self.cfg.grace);
                        tokio::spawn(async move { h.stop(grace).await });
                    }
                }
                Action::Launch { key, alloc } => launches.push(self.launch(key, alloc)),
                Action::WaitForStop {
                    key,
                    alloc,
                    holders,
                } => {
                    let holders = holders.iter().filter_map(|k| stopping.get(k)).cloned();
                    self.launch_after(key, alloc, holders.collect());
                }
                Action::RelayCheckpoint {
                    key,
                    alloc,
                    request,
                } => self.start_checkpoint(key, alloc, request),
                // Bookkeeping and logs: done in `decide`.
                Action::IgnoreOlderRevision { .. }
                | Action::RefuseStale { .. }
                | Action::RaiseWaitingCheckpoint { .. }
                | Action::Forget { .. } => {}
            }
        }
        let launched = futures::future::join_all(launches).await;
        self.commit_launches(launched.into_iter().flatten().collect());
    }

    /// What the host has, for [`reconcile::plan`]; taken under the state and running locks.
    fn snapshot(
        &self,
        state: &AgentState,
        running: &BTreeMap<TaskKey, TaskHandle>,
        launching: &BTreeMap<TaskKey, u64>,
    ) -> reconcile::Local {
        reconcile::Local {
            revision: state.revision,
            device_epochs: state.device_epochs.clone(),
            tasks: state
                .tasks
                .iter()
                .map(|(k, e)| (k.clone(), LocalTask::of(e, running.contains_key(k))))
                .collect(),
            waiting: launching.clone(),
            checkpointing: lock(&self.checkpointing).clone(),
            refused: state.refused.clone(),
            devices: self.inventory.iter().map(|d| d.index).collect(),
        }
    }

    /// Decides what a set asks for and records the decision (revision, fencing floors, what is
    /// desired, forgotten tasks), in one step under the state lock so no task end interleaves.
    /// `None` when the set is ignored; else the actions and the handles of the tasks to stop.
    fn decide(
        &self,
        set: &pb::AllocationSet,
    ) -> Option<(Vec<Action>, BTreeMap<TaskKey, TaskHandle>)> {
        let mut state = self.lock_state();
        let running = lock(&self.running);
        let mut launching = lock(&self.launching);
        let plan = reconcile::plan(set, &self.snapshot(&state, &running, &launching));
        let mut stopping = BTreeMap::new();
        for action in &plan.actions {
            match action {
                Action::IgnoreOlderRevision { got, seen } => tracing::warn!(
                    "refusing an allocation set at revision {got}: revision {seen} was already seen, so it comes from a deposed leader"
                ),
                Action::RefuseStale { key, reason } => tracing::warn!(
                    job = %key.job, task = key.task, epoch = key.epoch,
                    "refusing a stale directive: {reason}"
                ),
                Action::RaiseWaitingCheckpoint { key, request } => {
                    if let Some(newest) = launching.get_mut(key) {
                        *newest = (*newest).max(*request);
                    }
                }
                Action::Forget { key } => {
                    state.tasks.remove(key);
                }
                Action::Stop { key } => {
                    if let Some(h) = running.get(key) {
                        stopping.insert(key.clone(), h.clone());
                    }
                }
                Action::Launch { .. }
                | Action::WaitForStop { .. }
                | Action::RelayCheckpoint { .. } => {}
            }
        }
        drop((running, launching));
        let next = plan.accepted?;
        let held =
            lock(&self.renewal).applied(gangway_proto::allocation::digest(set), set.revision);
        if let Some(((sent_at, ttl_ms), recovered)) = held {
            say_resumed(recovered);
            self.lease_granted(sent_at, ttl_ms);
        }
        state.revision = next.revision;
        state.device_epochs = next.device_epochs;
        state.refused = next.refused;
        *lock(&self.desired) = next.desired;
        self.synced.store(true, Ordering::Release);
        drop(state);
        let _ = self.save();
        Some((plan.actions, stopping))
    }

    /// Launches a task once the tasks still stopping on its devices have exited (a repeated set
    /// meanwhile neither launches it twice nor loses a newer checkpoint request: `launching`).
    fn launch_after(
        self: &Arc<Self>,
        key: TaskKey,
        alloc: pb::Allocation,
        holders: Vec<TaskHandle>,
    ) {
        tracing::info!(job = %key.job, task = key.task, epoch = key.epoch, "launch waits for a stopping task to free its devices");
        lock(&self.launching).insert(key.clone(), alloc.checkpoint_request);
        let agent = self.clone();
        tokio::spawn(async move {
            for h in &holders {
                h.wait().await;
            }
            // Launched only if the newest set still wants it, with the newest checkpoint
            // request (answered at launch, see `launch`); taken out of `launching` only once
            // `launch` has recorded it, so no set in between launches it again.
            if lock(&agent.desired).contains(&key) {
                let mut alloc = alloc;
                if let Some(&newest) = lock(&agent.launching).get(&key) {
                    alloc.checkpoint_request = alloc.checkpoint_request.max(newest);
                }
                let launched = agent.launch(key.clone(), alloc).await;
                agent.commit_launches(launched.into_iter().collect());
            }
            lock(&agent.launching).remove(&key);
        });
    }

    /// Launches a task as the user its queue or job gets (see [`task_users`]) and records it in
    /// the state, unsaved: the caller saves once for all the tasks it launches
    /// ([`commit_launches`](Self::commit_launches)). `None` when the launch failed (recorded,
    /// saved and reported as such).
    async fn launch(self: &Arc<Self>, key: TaskKey, alloc: pb::Allocation) -> Option<TaskHandle> {
        let assigned = {
            let state = self.lock_state();
            self.uids
                .assign(&self.users, &alloc.queue, &key.job, &state)
        };
        match assigned {
            Ok(identity) => {
                let launched = self.launch_as(key, alloc, identity.clone()).await;
                self.uids.release(identity.as_ref());
                launched
            }
            Err(e) => {
                self.launch_failed(&key, format!("no user to run the task as: {e}"));
                None
            }
        }
    }

    /// Makes the launches just recorded durable with one save, then watches each task. Tasks
    /// the state file cannot name could not be re-adopted after a restart and would be
    /// launched a second time: if the save fails they are stopped instead.
    fn commit_launches(self: &Arc<Self>, launched: Vec<TaskHandle>) {
        if launched.is_empty() {
            return;
        }
        if !self.save() {
            for h in &launched {
                let key = h.key();
                tracing::error!(job = %key.job, task = key.task, "stopping the task just launched: the agent state cannot be saved");
                let (h, grace) = (h.clone(), self.cfg.grace);
                tokio::spawn(async move { h.stop(grace).await });
            }
        }
        self.outbox_wake.notify_one();
        for h in launched {
            self.watch_task(h);
        }
    }

    async fn launch_as(
        self: &Arc<Self>,
        key: TaskKey,
        alloc: pb::Allocation,
        identity: Option<crate::driver::TaskIdentity>,
    ) -> Option<TaskHandle> {
        let env = task_env::task_env(&alloc, &self.inventory, &self.cfg.checkpoint_dir);
        let ckdir = task_env::task_checkpoint_dir(&self.cfg.checkpoint_dir, &alloc);
        if let Some(dir) = &ckdir {
            isolation::hand_over_checkpoint_dir(dir, identity.as_ref());
        }
        // The shim stops the task this long before the lease deadline. A quarter of the lease
        // keeps a task from being fenced at birth when the stop grace is longer than the lease.
        let lease_ttl = Duration::from_millis(self.lease_ttl_ms.load(Ordering::Relaxed));
        let spec = LaunchSpec {
            key: key.clone(),
            command: alloc.command.clone(),
            env,
            work_dir: None,
            fence_grace: Some(self.cfg.grace.min(lease_ttl / 4)),
            identity,
        };
        match self.driver.launch(spec).await {
            Ok(handle) => {
                tracing::info!(job = %key.job, task = key.task, epoch = key.epoch, "launched");
                let mut state = self.lock_state();
                state.tasks.insert(
                    key.clone(),
                    TaskEntry {
                        process: handle.record(),
                        devices: alloc.devices.iter().map(|d| d.index).collect(),
                        // Requests made before the launch are answered by the restore.
                        checkpoints_done: alloc.checkpoint_request,
                        ended: None,
                    },
                );
                state.outbox.push(PendingReport::Task {
                    key: key.clone(),
                    state: ReportedState::Running,
                    exit_code: None,
                    message: String::new(),
                });
                // Checkpoint requests made after the lease was granted but before the launch
                // (while the agent was away or the devices were still being freed) are
                // answered by the restore point: the task has done no work under this lease
                // yet. Rank 0 says so, or a migration waiting for one of them would wait
                // forever.
                if key.task == 0 && alloc.checkpoint_request > alloc.checkpoint_request_at_grant {
                    let result = match ckdir.as_deref().and_then(checkpoint::read_manifest) {
                        Some(m) => Ok((m.path, m.step, m.bytes)),
                        None => Err(
                            "no checkpoint yet: the task had not started under this lease"
                                .to_owned(),
                        ),
                    };
                    state.outbox.push(PendingReport::Checkpoint {
                        key: key.clone(),
                        request: alloc.checkpoint_request,
                        result,
                    });
                }
                Some(handle)
            }
            Err(e) => {
                self.launch_failed(&key, e.to_string());
                None
            }
        }
    }

    /// Records and reports a task that could not be started.
    fn launch_failed(&self, key: &TaskKey, message: String) {
        tracing::warn!(job = %key.job, task = key.task, "launch failed: {message}");
        let outcome = ExitOutcome {
            code: None,
            signal: None,
            reason: ExitReason::FailedToStart,
            message,
        };
        let mut state = self.lock_state();
        record_end(&mut state, key, outcome);
        drop(state);
        let _ = self.save();
        self.outbox_wake.notify_one();
    }

    /// Waits for the task's end in the background, then records and reports it.
    fn watch_task(self: &Arc<Self>, handle: TaskHandle) {
        let key = handle.key().clone();
        lock(&self.running).insert(key.clone(), handle.clone());
        let agent = self.clone();
        tokio::spawn(async move {
            let outcome = handle.wait().await;
            lock(&agent.running).remove(&key);
            agent.driver.retire(&key);
            tracing::info!(job = %key.job, task = key.task, epoch = key.epoch, reason = ?outcome.reason, code = ?outcome.code, "task ended: {}", outcome.message);
            if !outcome.success() {
                // A failed device often shows first as the crash of the task on it: read the
                // devices now, so a health change is queued ahead of the task's failure.
                agent.read_devices();
            }
            let mut state = agent.lock_state();
            record_end(&mut state, &key, outcome);
            let wanted = lock(&agent.desired).contains(&key);
            if !wanted && agent.synced.load(Ordering::Acquire) {
                state.tasks.remove(&key);
            }
            drop(state);
            // Not saved here: an agent that restarts before its next save finds the task
            // unended in its state, the process gone, and reads the shim's exit file
            // (`readopt`): the same report again, which the replicas settle as a repeat. While
            // no replica answers, the report loop saves (a host crash would lose the end).
            agent.outbox_wake.notify_one();
        });
    }

    fn start_checkpoint(self: &Arc<Self>, key: TaskKey, alloc: pb::Allocation, request: u64) {
        let Some(handle) = lock(&self.running).get(&key).cloned() else {
            return;
        };
        lock(&self.checkpointing).insert(key.clone());
        let agent = self.clone();
        tokio::spawn(async move {
            let timeout = match alloc.checkpoint_timeout_ms {
                0 => DEFAULT_CHECKPOINT_TIMEOUT,
                ms => Duration::from_millis(ms),
            };
            let dir = task_env::checkpoint_dir(&agent.cfg.checkpoint_dir, &alloc.job_id);
            let rank0 = key.task == 0;
            tracing::info!(job = %key.job, task = key.task, request, "checkpointing");
            let result =
                checkpoint::take_checkpoint(&handle, &alloc.checkpoint_signal, dir, timeout, rank0)
                    .await;
            let mut state = agent.lock_state();
            if let Some(e) = state.tasks.get_mut(&key) {
                e.checkpoints_done = e.checkpoints_done.max(request);
            }
            // Rank 0 speaks for the gang; other ranks report only a failure to deliver the signal.
            let report = match result {
                Ok(Some(m)) => Some(Ok((m.path, m.step, m.bytes))),
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(job = %key.job, task = key.task, "checkpoint failed: {e}");
                    rank0.then_some(Err(e))
                }
            };
            if let Some(result) = report {
                state.outbox.push(PendingReport::Checkpoint {
                    key: key.clone(),
                    request,
                    result,
                });
            }
            drop(state);
            let _ = agent.save();
            lock(&agent.checkpointing).remove(&key);
            agent.outbox_wake.notify_one();
        });
    }

    /// Sends queued reports in order, each until a replica answers it.
    async fn report_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(50);
        let mut batches = true;
        loop {
            // Registration is accepted by any replica (a follower forwards it); the first answered
            // heartbeat has found the leader. Until then reports would go through a follower.
            if !self.leader_found.load(Ordering::Acquire) {
                tokio::select! {
                    _ = self.outbox_wake.notified() => continue,
                    _ = stop.changed() => return,
                }
            }
            // The task reports at the head of the queue go together (one request, one log
            // entry); anything else, or a replica that does not take batches, one at a time.
            let sending: Vec<PendingReport> = {
                let state = self.lock_state();
                let tasks = state
                    .outbox
                    .iter()
                    .take_while(|r| matches!(r, PendingReport::Task { .. }))
                    .take(if batches { MAX_REPORTS_PER_REQUEST } else { 1 })
                    .count();
                state.outbox.iter().take(tasks.max(1)).cloned().collect()
            };
            if sending.is_empty() {
                tokio::select! {
                    _ = self.outbox_wake.notified() => continue,
                    _ = stop.changed() => return,
                }
            }
            let sent = match sending.as_slice() {
                [one] => self.send_report(one).await,
                several => match self.send_task_reports(several).await {
                    Err(status) if status.code() == tonic::Code::Unimplemented => {
                        tracing::info!("the replica takes task reports one at a time");
                        batches = false;
                        continue;
                    }
                    other => other,
                },
            };
            match sent {
                Ok(()) => {
                    backoff = Duration::from_millis(50);
                    let mut state = self.lock_state();
                    for report in &sending {
                        if let Some(at) = state.outbox.iter().position(|r| r == report) {
                            state.outbox.remove(at);
                        }
                    }
                    drop(state);
                    if !only_task_reports(&sending) {
                        let _ = self.save();
                    }
                }
                Err(status) => {
                    self.link.failed(&status);
                    // While no replica answers, the state file holds what the outbox waits to
                    // send (ends are not saved as they happen, and their exit files are written
                    // without an fsync): saved after every failed send, at most once a backoff
                    // (once a second when backed off), ends queued during an outage included.
                    let _ = self.save();
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Several task reports in one request: Ok when the replica judged them all (each taken, or
    /// refused for good, which retrying cannot change).
    async fn send_task_reports(&self, reports: &[PendingReport]) -> Result<(), tonic::Status> {
        let mut client = self.link.client()?;
        let node = self.cfg.node.clone();
        let batch = pb::TaskStatusReports {
            node: node.clone(),
            reports: reports
                .iter()
                .filter_map(|r| task_status_report(&node, r))
                .collect(),
        };
        let outcomes = client.report_task_statuses(batch).await?.into_inner();
        for (report, code) in reports.iter().zip(&outcomes.refused) {
            if !code.is_empty() {
                tracing::info!(?report, code, "report settled by a refusal");
            }
        }
        Ok(())
    }

    /// Ok when the report is settled: accepted, or definitely refused (a stale epoch, a job that
    /// no longer exists), which retrying cannot change.
    async fn send_report(&self, report: &PendingReport) -> Result<(), tonic::Status> {
        let mut client = self.link.client()?;
        let node = self.cfg.node.clone();
        let result = match report {
            PendingReport::Task { .. } => match task_status_report(&node, report) {
                Some(r) => client.report_task_status(r).await,
                None => Ok(tonic::Response::new(pb::Empty {})),
            },
            PendingReport::Checkpoint {
                key,
                request,
                result,
            } => {
                let (path, step, bytes, error) = match result {
                    Ok((p, s, b)) => (p.clone(), *s, *b, String::new()),
                    Err(e) => (String::new(), 0, 0, e.clone()),
                };
                client
                    .report_checkpoint(pb::CheckpointReport {
                        node,
                        job_id: key.job.clone(),
                        epoch: key.epoch,
                        path,
                        step,
                        bytes,
                        request: *request,
                        error,
                    })
                    .await
            }
            PendingReport::DeviceHealth {
                uuid,
                health,
                cause,
            } => {
                client
                    .report_device_health(pb::DeviceHealthReport {
                        node,
                        device: uuid.clone(),
                        health: health.to_pb().into(),
                        cause: cause.clone(),
                    })
                    .await
            }
            PendingReport::HealthCheck {
                passed,
                failed_devices,
                detail,
            } => {
                client
                    .report_health_check(pb::HealthCheckReport {
                        node,
                        passed: *passed,
                        failed_devices: failed_devices.clone(),
                        detail: detail.clone(),
                    })
                    .await
            }
        };
        match result {
            Ok(_) => Ok(()),
            Err(status) if retryable(&status) => Err(status),
            Err(status) => {
                tracing::info!("report settled by a refusal: {}", status.message());
                Ok(())
            }
        }
    }

    /// A fake device reports the CPU use of the task holding it (the busiest, if shared): a
    /// computing task looks busy, a sleeping one idle; a free device reports 0.
    fn update_fake_utilization(&self) {
        let Some(fake) = &self.fake else { return };
        let held: Vec<(i32, Vec<u32>)> = {
            let state = self.lock_state();
            let running = lock(&self.running);
            running
                .iter()
                .filter_map(|(k, h)| Some((h.record().pid, state.tasks.get(k)?.devices.clone())))
                .collect()
        };
        let groups: Vec<i32> = held.iter().map(|(g, _)| *g).collect();
        let busy = lock(&self.cpu).sample(&groups, Instant::now());
        let mut per_device: BTreeMap<u32, u8> = BTreeMap::new();
        for (group, devices) in &held {
            let pct = busy.get(group).copied().unwrap_or(0);
            for d in devices {
                let e = per_device.entry(*d).or_default();
                *e = (*e).max(pct);
            }
        }
        for d in &self.inventory {
            let _ = fake.set_utilization(d.index, per_device.get(&d.index).copied().unwrap_or(0));
        }
    }
}

/// Locks a mutex of the agent; a panic elsewhere while it was held leaves data that is still
/// consistent for our use (every critical section is a few assignments), so it is taken anyway.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records a task's end and queues its report.
fn record_end(state: &mut AgentState, key: &TaskKey, outcome: ExitOutcome) {
    // The lease ending under a cut-off host, or a supervisor that vanished, is not the task's
    // fault: "lost" re-queues the gang from its checkpoint instead of failing it.
    let report_state = match outcome.reason {
        _ if outcome.success() => ReportedState::Succeeded,
        ExitReason::LeaseExpired | ExitReason::Lost => ReportedState::Lost,
        _ => ReportedState::Failed,
    };
    let message = outcome.message.clone();
    state.queue_task_end(key, report_state, outcome.code, message);
    if let Some(e) = state.tasks.get_mut(key) {
        e.ended = Some(outcome);
    }
}

async fn wait_stop(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// This host's CPU capacity in milli-cores.
fn host_cpu_milli() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as u64 * 1000
}

/// This host's memory in MiB, from /proc/meminfo (0 where unknown).
fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

/// Says that lease renewals resume, when the agent had said its allocation set was behind.
fn say_resumed(recovered: bool) {
    if recovered {
        tracing::info!("the allocation set is current again: lease renewals resume");
    }
}

/// A fraction in [0, 1) fixed per node name: spreads a fleet's periodic work over the period.
fn phase_of(node: &str) -> f64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    node.hash(&mut h);
    (h.finish() % 1_000) as f64 / 1_000.0
}
