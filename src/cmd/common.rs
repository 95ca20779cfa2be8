//! What every client command shares: the connection flags, `--watch`, and the runtime that runs
//! them (only client commands need tokio; `sim` does not).

use super::output::{Output, Render};
use crate::client::{parse_addr_list, Client, ClientError};
use clap::Args;
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

/// Default replica address (a `gangway dev` cluster's first replica).
pub const DEFAULT_ADDR: &str = "127.0.0.1:7101";

/// The replica list as given to `--addr`, normalised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddrList(pub Vec<String>);

fn parse_addrs(s: &str) -> Result<AddrList, String> {
    parse_addr_list(s).map(AddrList)
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration like 500ms, 15s or 2m: {e}"))?;
    if d.is_zero() {
        return Err("must be more than zero".to_owned());
    }
    Ok(d)
}

/// Where `--help` lists the flags every client command shares.
const CLIENT_HEADING: &str = "Client options";

/// Flags of every client command.
#[derive(Args, Debug, Clone)]
pub struct ClientOpts {
    /// Replica addresses, comma-separated (host:port, http:// optional). Any replica will do: the
    /// client follows the leader.
    #[arg(long, global = true, env = "GANGWAY_ADDR", help_heading = CLIENT_HEADING, default_value = DEFAULT_ADDR,
          value_parser = parse_addrs, value_name = "HOST:PORT,...")]
    pub addr: AddrList,
    /// Give up on a call (and its retries across replicas) after this long.
    #[arg(long, global = true, env = "GANGWAY_TIMEOUT", help_heading = CLIENT_HEADING, default_value = "15s",
          value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table,
          help_heading = CLIENT_HEADING)]
    pub output: Output,
    /// The cluster CA certificate (PEM): replicas must prove themselves with it.
    #[arg(long, global = true, env = "GANGWAY_TLS_CA", help_heading = CLIENT_HEADING, value_name = "FILE")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Your certificate (`gangway tls issue client NAME`).
    #[arg(long, global = true, env = "GANGWAY_TLS_CERT", help_heading = CLIENT_HEADING, value_name = "FILE",
          requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// Your certificate's private key.
    #[arg(long, global = true, env = "GANGWAY_TLS_KEY", help_heading = CLIENT_HEADING, value_name = "FILE",
          requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// A bearer token bound to roles (`gangway access token`), instead of or besides a certificate.
    #[arg(long, global = true, env = "GANGWAY_TOKEN", help_heading = CLIENT_HEADING, hide_env_values = true,
          value_name = "TOKEN")]
    pub token: Option<String>,
    /// Plain TCP, for a cluster started insecure (local experiments only).
    #[arg(long, global = true, env = "GANGWAY_INSECURE", help_heading = CLIENT_HEADING,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure: bool,
}

impl ClientOpts {
    /// A client for `--addr` with these credentials (installed for the whole process: drills and
    /// `logs` dial with them too). Credentials that cannot be used end the command with exit 3.
    pub fn client(&self) -> Client {
        let flags = crate::client::credentials::CredentialFlags {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            token: self.token.clone(),
            insecure: self.insecure,
        };
        match flags.resolve() {
            Ok(c) => crate::client::credentials::install(c),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(i32::from(crate::client::EXIT_INVALID));
            }
        }
        Client::new(self.addr.0.clone(), self.timeout)
    }
}

/// `--watch` and its interval, for the listing commands.
#[derive(Args, Debug, Clone)]
pub struct WatchOpts {
    /// Re-render every --interval until Ctrl-C.
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// Time between renders with --watch.
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    pub interval: Duration,
}

/// The threads a client command's runtime runs its tasks on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    /// The calling thread alone: a command makes a call or a few and prints them. A worker pool
    /// cost every `gangway submit` about a millisecond of its ~5.5 ms of CPU (threads started,
    /// work handed between them; README, "The CLI's own cost").
    One,
    /// A worker per core: drills, whose load, probes and clocks run side by side and are measured.
    PerCore,
}

/// Runs a client command on one thread (see [`Threads::One`]); its error becomes a message on
/// stderr and the error's exit code.
pub fn run_client<F>(fut: F) -> anyhow::Result<ExitCode>
where
    F: Future<Output = Result<(), ClientError>>,
{
    run_client_on(Threads::One, fut)
}

/// Runs a client command on a fresh runtime with these threads; its error becomes a message on
/// stderr and the error's exit code.
pub fn run_client_on<F>(threads: Threads, fut: F) -> anyhow::Result<ExitCode>
where
    F: Future<Output = Result<(), ClientError>>,
{
    let runtime = match threads {
        Threads::One => tokio::runtime::Builder::new_current_thread(),
        Threads::PerCore => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build()?;
    let result = runtime.block_on(fut);
    // Do not wait for connections still closing in the background.
    runtime.shutdown_background();
    Ok(match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(err.exit_code())
        }
    })
}

/// The render loop of `--watch`: frames, the pause between them, and Ctrl-C.
pub struct Watcher {
    watch: Option<WatchState>,
    output: Output,
    tty: bool,
}

struct WatchState {
    interval: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
    frames: u64,
}

impl Watcher {
    /// A watcher for `opts` (a single render when `--watch` is off). Must run inside the runtime.
    pub fn new(opts: &WatchOpts, output: Output) -> Self {
        let watch = opts.watch.then(|| {
            let (tx, rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    let _ = tx.send(true);
                }
            });
            WatchState {
                interval: opts.interval,
                stop: rx,
                frames: 0,
            }
        });
        Self {
            watch,
            output,
            tty: std::io::stdout().is_terminal(),
        }
    }

    /// How frames are rendered: JSON on one line per frame when watching.
    pub fn render(&self) -> Render {
        Render::new(self.output, self.watch.is_some())
    }

    /// Runs `fut` unless Ctrl-C comes first (`None`).
    pub async fn during<T>(&mut self, fut: impl Future<Output = T>) -> Option<T> {
        match &mut self.watch {
            None => Some(fut.await),
            Some(w) => {
                let mut stop = w.stop.clone();
                tokio::select! {
                    v = fut => Some(v),
                    _ = stop.wait_for(|s| *s) => None,
                }
            }
        }
    }

    /// Prints one frame. Without --watch an error ends the command; with it, a replica outage is
    /// shown in place of the frame and the watch goes on, other errors end it.
    pub fn show(&mut self, frame: Result<String, ClientError>) -> Result<(), ClientError> {
        let Some(w) = &mut self.watch else {
            let text = frame?;
            println!("{text}");
            return Ok(());
        };
        let text = match frame {
            Ok(text) => text,
            Err(err) if err.is_unreachable() => match self.output {
                Output::Json => {
                    eprintln!("error: {err}");
                    return Ok(());
                }
                Output::Table => format!("error: {err}"),
            },
            Err(err) => return Err(err),
        };
        let mut out = std::io::stdout().lock();
        let header = format!(
            "every {}: {}",
            humantime::format_duration(w.interval),
            humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        );
        let _ = match (self.output, self.tty) {
            (Output::Json, _) => writeln!(out, "{text}"),
            (Output::Table, true) => write!(out, "\x1b[H\x1b[2J{header}\n\n{text}\n"),
            (Output::Table, false) => {
                if w.frames > 0 {
                    let _ = writeln!(out);
                }
                writeln!(out, "--- {header}\n{text}")
            }
        };
        let _ = out.flush();
        w.frames += 1;
        Ok(())
    }

    /// Waits for the next frame: false when not watching or on Ctrl-C.
    pub async fn next(&mut self) -> bool {
        let Some(w) = &mut self.watch else {
            return false;
        };
        let mut stop = w.stop.clone();
        let stopped = tokio::select! {
            _ = tokio::time::sleep(w.interval) => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        !stopped && !*w.stop.borrow()
    }
}

/// Reads a file named on the command line; a missing or unreadable file is a usage error.
pub fn read_arg_file(path: &std::path::Path) -> Result<String, ClientError> {
    std::fs::read_to_string(path)
        .map_err(|e| ClientError::Usage(format!("cannot read {}: {e}", path.display())))
}
