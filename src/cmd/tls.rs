//! `gangway tls init` and `gangway tls issue`: a cluster CA and its certificates, for people who
//! have no CA of their own (docs/OPERATIONS.md says how to use one you have).

use clap::{Args, Subcommand};
use gangway_tls::ca::{self, IssueOptions};
use gangway_tls::{Identity, Kind};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct TlsGroup {
    #[command(subcommand)]
    pub command: TlsCommand,
}

#[derive(Subcommand, Debug)]
pub enum TlsCommand {
    /// Create a cluster CA (ca.pem, ca-key.pem) in --dir. Keep ca-key.pem offline if you can.
    Init {
        /// Where the CA lives.
        #[arg(long, default_value = "gangway-tls")]
        dir: PathBuf,
        /// Lifetime of the CA in days.
        #[arg(long, default_value_t = ca::CA_DAYS)]
        days: u32,
    },
    /// Issue a certificate: `server ID` for a replica, `worker NODE` for a host agent, `client NAME`
    /// for a person or service. Writes KIND-NAME.pem and KIND-NAME-key.pem.
    Issue(IssueArgs),
}

#[derive(Args, Debug)]
pub struct IssueArgs {
    /// server, worker or client.
    #[arg(value_parser = ["server", "worker", "client"])]
    pub kind: String,
    /// The replica id, node name or client name.
    pub name: String,
    /// Where the CA lives.
    #[arg(long, default_value = "gangway-tls")]
    pub dir: PathBuf,
    /// Where to write the certificate (default: the CA's directory).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Extra DNS names or IP addresses to put in the certificate (for tools that check host
    /// names; Gangway checks the identity instead). Repeatable.
    #[arg(long = "host", value_name = "NAME_OR_IP")]
    pub hosts: Vec<String>,
    /// Lifetime in days (default: 365 for servers and workers, 90 for clients).
    #[arg(long)]
    pub days: Option<u32>,
}

pub fn run(group: TlsGroup) -> anyhow::Result<ExitCode> {
    match group.command {
        TlsCommand::Init { dir, days } => {
            let cert = ca::init(&dir, days)?;
            println!("CA certificate: {}", cert.display());
            println!(
                "CA key:         {} (mode 0600)",
                ca::ca_key_path(&dir).display()
            );
            println!(
                "next: gangway tls issue server 1 --dir {d}; gangway tls issue worker NODE --dir {d}; gangway tls issue client admin --dir {d}",
                d = dir.display()
            );
        }
        TlsCommand::Issue(a) => {
            let kind: Kind = a.kind.parse()?;
            let id = Identity::new(kind, &a.name)?;
            let out = a.out.clone().unwrap_or_else(|| a.dir.clone());
            let opts = IssueOptions {
                hosts: a.hosts.clone(),
                days: a.days,
            };
            let cert = ca::issue(&a.dir, &out, &id, &opts)?;
            let stem = ca::cert_stem(&id);
            println!("{id}: {}", cert.display());
            println!(
                "key:  {} (mode 0600)",
                out.join(format!("{stem}-key.pem")).display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
