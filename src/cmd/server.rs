//! `gangway server`: run one replica. Flags override the config file; the merged configuration is
//! validated as a whole, so a bad value fails at start-up naming its field.

use anyhow::Context;
use clap::Args;
use gangway_scheduler::engine::PolicyName;
use gangway_scheduler::server::{Replica, ServerConfig};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug, Clone, Default)]
pub struct ServerArgs {
    /// Configuration file (TOML; template in deploy/config/gangway-server.toml).
    #[arg(long, env = "GANGWAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// This replica's id (unique, stable for the life of its data directory).
    #[arg(long)]
    pub id: Option<u64>,
    /// gRPC address to listen on (client API, worker API and Raft share it).
    #[arg(long)]
    pub listen: Option<String>,
    /// Address others use to reach this replica, when it differs from --listen.
    #[arg(long)]
    pub advertise: Option<String>,
    /// HTTP address for /metrics, /livez, /readyz.
    #[arg(long)]
    pub http: Option<String>,
    /// Raft log, snapshots and cluster state.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Founding voters, the same on every founding replica: 1=host:port,2=host:port,...
    #[arg(long)]
    pub initial_cluster: Option<String>,
    /// Placement policy: gangway, first-fit, best-fit, fgd, static-quota, backfill.
    #[arg(long)]
    pub policy: Option<String>,
    /// Allow failover drills (kill-leader, partition-leader) against this replica.
    #[arg(long)]
    pub allow_drills: bool,
    /// The cluster CA certificate (config `tls.ca`).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This replica's certificate, naming server/<id> (config `tls.cert`).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Its private key (config `tls.key`).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Plain TCP, no authentication, everyone admin: local experiments only (config
    /// `tls.insecure`).
    #[arg(long)]
    pub insecure: bool,
    /// A certificate name that is always admin (config `access.admins`); repeatable.
    #[arg(long = "admin", value_name = "IDENTITY")]
    pub admins: Vec<String>,
}

impl ServerArgs {
    /// The file (if any) with the flags laid over it.
    pub fn to_config(&self) -> anyhow::Result<ServerConfig> {
        let mut c = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                ServerConfig::from_toml_str(&text)
                    .with_context(|| format!("config file {}", path.display()))?
            }
            None => ServerConfig::new(0, "", "", ""),
        };
        if let Some(v) = self.id {
            c.id = v;
        }
        if let Some(v) = &self.listen {
            c.listen = v.clone();
        }
        if let Some(v) = &self.advertise {
            c.advertise = v.clone();
        }
        if let Some(v) = &self.http {
            c.http = v.clone();
        }
        if let Some(v) = &self.data_dir {
            c.data_dir = v.clone();
        }
        if let Some(v) = &self.initial_cluster {
            c.initial_cluster = v.clone();
        }
        if let Some(v) = &self.policy {
            c.scheduler.policy = v
                .parse::<PolicyName>()
                .map_err(|e| anyhow::anyhow!("--policy: {e}"))?;
        }
        if self.allow_drills {
            c.allow_drills = true;
        }
        for (flag, slot) in [
            (&self.tls_ca, &mut c.tls.ca),
            (&self.tls_cert, &mut c.tls.cert),
            (&self.tls_key, &mut c.tls.key),
        ] {
            if let Some(v) = flag {
                *slot = v.clone();
            }
        }
        if self.insecure {
            c.tls.insecure = true;
        }
        c.access.admins.extend(self.admins.iter().cloned());
        c.validate()?;
        Ok(c)
    }
}

/// Resolves on Ctrl-C or SIGTERM (what `docker stop` and systemd send).
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

pub fn run(args: ServerArgs) -> anyhow::Result<ExitCode> {
    let config = match args.to_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(ExitCode::from(super::EXIT_INVALID));
        }
    };
    // Transparent huge pages are already off for this process, unless the operator chose
    // otherwise: see `huge_pages`.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let replica = Replica::start(config).await?;
        replica.run(shutdown_signal()).await?;
        Ok::<_, anyhow::Error>(ExitCode::SUCCESS)
    })
}
