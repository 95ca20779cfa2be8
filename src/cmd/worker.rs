//! `gangway worker` (the host agent) and `gangway task-shim` (the supervisor it starts per task).

use anyhow::Context;
use clap::Args;
use gangway_proto::allocation::MAX_ALLOCATION_SET_BYTES;
use gangway_worker::agent::health_check::HealthCheckConfig;
use gangway_worker::agent::task_users::{parse_queue_user, TaskUserFlags};
use gangway_worker::agent::uid_range::UidRange;
use gangway_worker::agent::{Agent, AgentConfig, Devices, TopologyLabels};
use gangway_worker::devices::{FakeBackend, NvmlBackend};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Scheduler replicas, any of them (the agent follows the leader): host:port,host:port,...
    #[arg(long, env = "GANGWAY_SERVERS", value_delimiter = ',', required = true)]
    pub servers: Vec<String>,
    /// The name this host registers under. Default: the host name.
    #[arg(long, env = "GANGWAY_NODE")]
    pub node: Option<String>,
    /// Where the agent API (task logs for `gangway logs`) listens.
    #[arg(long, default_value = "0.0.0.0:7300")]
    pub listen: std::net::SocketAddr,
    /// host:port the scheduler and `gangway logs` reach this agent at; its host is also the
    /// master address of gangs whose rank 0 runs here. Default: the node name and the listen port.
    #[arg(long)]
    pub advertise: Option<String>,
    /// Topology labels: dc=dc1,zone=z1,pod=p1,rack=r3 (any subset).
    #[arg(long, default_value = "")]
    pub topology: TopologyLabels,
    /// Declared devices instead of NVML: 8xH100, 4xA100-80G, 4xTPU-v5p, 2xH100+2xA100-80G:nvlink=0-1,2-3.
    #[arg(long, value_name = "SPEC")]
    pub fake_devices: Option<String>,
    /// With --fake-devices: faults injected at run time, read at every heartbeat. Append lines:
    /// `xid N CODE`, `ecc N`, `ecc-corrected N COUNT`, `lost N`, `thermal N`, `power N`,
    /// `clear N` (N: device index); each line is applied once.
    #[arg(long, value_name = "PATH", requires = "fake_devices")]
    pub fake_fault_file: Option<PathBuf>,
    /// A health check command (run with `sh -c`) before the host first registers and every
    /// --health-check-interval after: exit 0 passes; stdout lines `fail <uuid-or-index>` name
    /// failing devices (a failure naming none fails every device). Failing devices are fenced;
    /// fenced devices return after passes in a row.
    #[arg(long, value_name = "CMD")]
    pub health_check_cmd: Option<String>,
    /// How often the health check runs (from the end of one run to the start of the next).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub health_check_interval: Duration,
    /// A health check run longer than this is killed and counts as failed.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub health_check_timeout: Duration,
    /// libnvidia-ml to load instead of the system's libnvidia-ml.so.1.
    #[arg(long, value_name = "PATH")]
    pub nvml_library: Option<PathBuf>,
    /// The agent's state, task exit files and logs.
    #[arg(long, default_value = "/var/lib/gangway/worker")]
    pub data_dir: PathBuf,
    /// Checkpoint storage every host shares; each job gets <dir>/<job id>. Default: <data-dir>/checkpoints.
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Stopping a task: SIGTERM, this long, then SIGKILL.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    /// Stop the tasks when the agent stops cleanly (by default they keep running and a restarted
    /// agent re-adopts them).
    #[arg(long)]
    pub stop_tasks_on_exit: bool,
    /// Start task shims from one fork server (a small process forked per task) instead of
    /// executing the shim binary per task; `false` executes each (the fallback either way when
    /// the server fails).
    #[arg(long, env = "GANGWAY_SHIM_FORK_SERVER", default_value_t = true, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new(), value_name = "BOOL")]
    pub shim_fork_server: bool,
    /// The account every task runs as (never root nor the agent's user). Tasks need a user: give
    /// this, --task-uid-range or --task-user-same-as-agent.
    #[arg(long, env = "GANGWAY_TASK_USER", value_name = "NAME")]
    pub task_user: Option<String>,
    /// Each job's tasks on this host run as a uid of their own from FIRST-LAST, with a private
    /// group of the same number, so jobs cannot signal each other or open each other's files.
    /// Pick numbers no account, container or service of the host uses (not systemd's
    /// 61184-65519, nor /etc/subuid ranges).
    #[arg(long, value_name = "FIRST-LAST")]
    pub task_uid_range: Option<UidRange>,
    /// That queue's tasks run as that account, whatever --task-user or --task-uid-range say.
    /// Repeatable.
    #[arg(long, value_name = "QUEUE=NAME", value_parser = parse_queue_user)]
    pub task_user_for_queue: Vec<(String, String)>,
    /// Supplementary groups every task gets (names or numbers), e.g. the group owning
    /// /dev/nvidia* where the devices are not world-usable.
    #[arg(long, value_delimiter = ',', value_name = "GROUP,...")]
    pub task_groups: Vec<String>,
    /// Run tasks as the agent's own user. For development only: tasks can then write the lease
    /// file and the agent's state. An agent not running as root cannot switch users and needs it.
    #[arg(long)]
    pub task_user_same_as_agent: bool,
    /// For tests: the largest allocation set the agent decodes, in bytes (default: the bound every
    /// legal set fits, gangway_proto::allocation::MAX_ALLOCATION_SET_BYTES).
    #[arg(long, hide = true, value_name = "BYTES")]
    pub allocation_stream_max_bytes: Option<usize>,
    /// The cluster CA certificate (PEM).
    #[arg(long, env = "GANGWAY_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This host's certificate, naming worker/<node> (`gangway tls issue worker NODE`). The agent's
    /// log API serves with it too. Rotated files are picked up without a restart.
    #[arg(long, env = "GANGWAY_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long, env = "GANGWAY_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Plain TCP toward a cluster started insecure (local experiments only).
    #[arg(long, env = "GANGWAY_INSECURE", value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure: bool,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

impl WorkerArgs {
    fn to_config(&self) -> anyhow::Result<AgentConfig> {
        let node = self.node.clone().unwrap_or_else(host_name);
        let advertise = self
            .advertise
            .clone()
            .unwrap_or_else(|| format!("{node}:{}", self.listen.port()));
        let exe = std::env::current_exe().context("finding the gangway binary for task shims")?;
        Ok(AgentConfig {
            node,
            servers: self.servers.clone(),
            listen: self.listen,
            advertise,
            topology: self.topology.clone(),
            data_dir: self.data_dir.clone(),
            checkpoint_dir: self
                .checkpoint_dir
                .clone()
                .unwrap_or_else(|| self.data_dir.join("checkpoints")),
            grace: self.grace,
            shim_command: gangway_worker::driver::shim_command_for(&exe),
            shim_fork_server: self.shim_fork_server,
            stop_tasks_on_exit: self.stop_tasks_on_exit,
            rpc_timeout: Duration::from_secs(5),
            health_check: self.health_check()?,
            task_users: TaskUserFlags {
                user: self.task_user.clone(),
                uid_range: self.task_uid_range,
                per_queue: self.task_user_for_queue.clone(),
                groups: self.task_groups.clone(),
                same_as_agent: self.task_user_same_as_agent,
            },
            allocation_stream_max_bytes: self.allocation_stream_max_bytes()?,
            tls: self.tls_files()?,
        })
    }

    fn tls_files(&self) -> anyhow::Result<Option<gangway_tls::TlsFiles>> {
        if self.insecure {
            return Ok(None);
        }
        match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(cert), Some(key)) => Ok(Some(gangway_tls::TlsFiles {
                ca: ca.clone(),
                cert: Some(cert.clone()),
                key: Some(key.clone()),
            })),
            _ => anyhow::bail!(
                "--tls-ca, --tls-cert and --tls-key are required (this host's certificate: gangway tls issue worker NODE), or --insecure toward a cluster started insecure"
            ),
        }
    }

    fn allocation_stream_max_bytes(&self) -> anyhow::Result<usize> {
        let max = MAX_ALLOCATION_SET_BYTES;
        match self.allocation_stream_max_bytes {
            None => Ok(max),
            Some(bytes) if (1024..=max).contains(&bytes) => Ok(bytes),
            Some(bytes) => anyhow::bail!(
                "--allocation-stream-max-bytes: expected 1024 to {max} bytes, got {bytes}"
            ),
        }
    }

    fn health_check(&self) -> anyhow::Result<Option<HealthCheckConfig>> {
        let Some(command) = &self.health_check_cmd else {
            return Ok(None);
        };
        if command.trim().is_empty() {
            anyhow::bail!("--health-check-cmd: expected a command, got an empty one");
        }
        if self.health_check_interval < Duration::from_secs(1) {
            anyhow::bail!(
                "--health-check-interval: expected at least 1s, got {}",
                humantime::format_duration(self.health_check_interval)
            );
        }
        if self.health_check_timeout.is_zero() {
            anyhow::bail!("--health-check-timeout: expected more than 0s");
        }
        Ok(Some(HealthCheckConfig {
            command: command.clone(),
            interval: self.health_check_interval,
            timeout: self.health_check_timeout,
        }))
    }
}

pub fn run(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let config = match args.to_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(ExitCode::from(super::EXIT_INVALID));
        }
    };
    let devices = match &args.fake_devices {
        Some(spec) => match FakeBackend::parse(spec, &config.node) {
            Ok(f) => Devices::Fake(Arc::new(match &args.fake_fault_file {
                Some(path) => f.with_fault_file(path),
                None => f,
            })),
            Err(e) => {
                eprintln!("error: --fake-devices: {e}");
                return Ok(ExitCode::from(super::EXIT_INVALID));
            }
        },
        None => {
            let loaded = match &args.nvml_library {
                Some(path) => NvmlBackend::load_from(path),
                None => NvmlBackend::load(),
            };
            match loaded {
                Ok(b) => Devices::Nvml(Arc::new(b)),
                Err(e) => {
                    eprintln!(
                        "error: {e}\nThis host has no usable NVIDIA driver library; install the driver, point \
                         --nvml-library at libnvidia-ml, or run with --fake-devices for a development host."
                    );
                    return Ok(ExitCode::from(1));
                }
            }
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let agent = Agent::new(config, devices)?;
        agent.run(super::server::shutdown_signal()).await?;
        Ok::<_, anyhow::Error>(ExitCode::SUCCESS)
    })
}

/// `gangway task-shim ...`: the per-task supervisor (see the worker's driver module). Not for
/// people: the agent starts it with the flags it needs.
#[derive(Args, Debug, Clone)]
pub struct ShimArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    pub args: Vec<String>,
}

pub fn run_shim(args: ShimArgs) -> ExitCode {
    match gangway_worker::driver::shim_main(&args.args) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("error: task-shim: {e}");
            ExitCode::from(super::EXIT_INVALID)
        }
    }
}
