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

/// mimalloc's own switch for transparent huge pages; set, it is the operator's choice and wins.
const ALLOW_THP: &str = "MIMALLOC_ALLOW_THP";

/// Whether a replica turns transparent huge pages off for itself: unless `MIMALLOC_ALLOW_THP`
/// says otherwise (mimalloc then does what it says, `0` included).
fn thp_off_by_default(allow_thp: Option<&std::ffi::OsStr>) -> bool {
    allow_thp.is_none()
}

/// Turns transparent huge pages off for this process (`prctl(PR_SET_THP_DISABLE)`). mimalloc asks
/// for huge pages on its arenas, and a replica allocates and frees small pieces all the time (log
/// entries, state records, replies): each fault on memory mimalloc had handed back to the kernel
/// then zeroed a 2 MiB page instead of a 4 KiB one, 16-20% of the leader's CPU in the e2e storm
/// (README, "Fast where it counts"). A replica starts no other program, so nothing inherits it.
fn disable_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        tracing::debug!(error = %e, "cannot turn transparent huge pages off; left as they are");
    }
}

pub fn run(args: ServerArgs) -> anyhow::Result<ExitCode> {
    let config = match args.to_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(ExitCode::from(super::EXIT_INVALID));
        }
    };
    if thp_off_by_default(std::env::var_os(ALLOW_THP).as_deref()) {
        disable_transparent_huge_pages();
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn huge_pages_go_off_unless_the_operator_chose() {
        assert!(thp_off_by_default(None));
        for chosen in ["0", "1", "2", ""] {
            assert!(!thp_off_by_default(Some(OsStr::new(chosen))), "{chosen:?}");
        }
    }

    #[test]
    fn turning_huge_pages_off_shows_in_the_process() {
        disable_transparent_huge_pages();
        // SAFETY: PR_GET_THP_DISABLE takes integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(rc, 1, "the process's THP flag");
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(status.contains("THP_enabled:\t0"), "{status}");
    }
}
