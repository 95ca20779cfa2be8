//! `gangway`: the one binary. `gangway server|worker|dev|sim` and the client commands.
//!
//! This file is the clap front end only; each subcommand lives in `src/cmd/`, the leader-following
//! gRPC client in `src/client/`.

mod client;
mod cmd;

use clap::{Parser, Subcommand};
use cmd::common::{run_client, run_client_on, Threads};
use std::process::ExitCode;

/// mimalloc, not glibc's malloc: a replica runs for months over a state whose records are created
/// and freed by the hundred thousand, under which glibc's allocator fragmented and a scheduling
/// round slowed by half (the soak in the README, `core/examples/soak.rs`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "gangway",
    version,
    about = "Raft-replicated gang scheduler for GPU and TPU fleets",
    long_about = "Raft-replicated gang scheduler for GPU and TPU fleets.\n\n\
                  Exit codes: 0 ok, 1 error, 2 not placeable, 3 invalid spec or arguments, 5 no leader."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Replay production traces through the placement engine and compare policies.
    #[command(subcommand)]
    Sim(cmd::sim::SimCommand),

    // ----- client commands (talk to a cluster over gRPC; see docs/CLI.md) -----
    /// Submit a job spec (TOML); prints the job id.
    Submit(cmd::jobs::SubmitArgs),
    /// List jobs.
    Jobs(cmd::jobs::JobsArgs),
    /// One job: status, cancel, checkpoint, migrate.
    Job(cmd::jobs::JobGroup),
    /// A task's output, from the host it runs (or ran) on.
    Logs(cmd::logs::LogsArgs),
    /// Cancel a job (same as `gangway job cancel`).
    Cancel(cmd::jobs::CancelCmd),
    /// List nodes: state, free devices, heartbeat.
    Nodes(cmd::nodes::NodesArgs),
    /// Drain, cordon, uncordon or remove a node.
    Node(cmd::nodes::NodeGroup),
    /// Fence a device (take it out of service) or unfence it.
    Device(cmd::nodes::DeviceGroup),
    /// List device leases: job, epoch, tasks' hosts and devices.
    Leases(cmd::nodes::LeasesArgs),
    /// List queues and their quotas.
    Queues(cmd::queues::QueuesArgs),
    /// Create or change a queue.
    Queue(cmd::queues::QueueGroup),
    /// The replicated cluster: status, leadership, membership, snapshots.
    Cluster(cmd::cluster::ClusterGroup),
    /// The defragmenter: `defrag plan` previews the migrations it would make now.
    Defrag(cmd::defrag::DefragGroup),
    /// Failover drills: transfer-leader, kill-leader, partition-leader, measured and checked.
    Drill(cmd::drill::DrillGroup),
    /// Who may do what: certificate names and bearer tokens bound to roles (admin).
    Access(cmd::access::AccessGroup),
    /// Who the cluster takes you for, and your roles.
    Whoami(cmd::access::WhoAmIArgs),
    /// Who did what: the audit trail (submit, cancel, drain, members, access, restore, drills).
    Audit(cmd::audit::AuditArgs),
    /// A cluster CA and its certificates: `tls init`, `tls issue server|worker|client NAME`.
    Tls(cmd::tls::TlsGroup),

    // ----- processes -----
    /// Run one scheduler replica (Raft member, client and worker API, leader loops).
    Server(cmd::server::ServerArgs),
    /// The host agent: registers the host's devices, runs the tasks leased to it.
    Worker(Box<cmd::worker::WorkerArgs>),
    /// A local cluster: three replicas, a fleet of fake 8-GPU hosts, a demo workload.
    Dev(cmd::dev::DevArgs),
    /// The per-task supervisor the worker starts (not for people).
    #[command(hide = true)]
    TaskShim(cmd::worker::ShimArgs),
    /// Probe a replica's HTTP port (`/readyz`, `/livez`) for container health checks: exit 0 on 200.
    #[command(hide = true)]
    Health(cmd::health::HealthArgs),
}

/// Logs to stderr; `RUST_LOG` filters (default: info for Gangway, warnings for libraries).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "warn,gangway=info,gangway_scheduler=info,gangway_consensus=info,gangway_worker=info",
        )
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            // --help and --version are not errors; bad arguments exit 3 (clap's own code, 2,
            // means "not placeable" here).
            return if err.use_stderr() {
                ExitCode::from(client::EXIT_INVALID)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = match cli.command {
        Command::Sim(c) => cmd::sim::run(c),
        Command::Server(args) => {
            init_logging();
            cmd::server::run(args)
        }
        Command::Worker(args) => {
            init_logging();
            cmd::worker::run(*args)
        }
        Command::TaskShim(args) => return cmd::worker::run_shim(args),
        Command::Health(args) => return cmd::health::run(args),
        Command::Dev(args) => cmd::dev::run(args),
        Command::Submit(a) => run_client(cmd::jobs::submit(a)),
        Command::Jobs(a) => run_client(cmd::jobs::jobs(a)),
        Command::Job(g) => run_client(cmd::jobs::job(g)),
        Command::Logs(a) => run_client(cmd::logs::logs(a)),
        Command::Cancel(c) => run_client(cmd::jobs::cancel(c.opts, c.args)),
        Command::Nodes(a) => run_client(cmd::nodes::nodes(a)),
        Command::Node(g) => run_client(cmd::nodes::node(g)),
        Command::Device(g) => run_client(cmd::nodes::device(g)),
        Command::Leases(a) => run_client(cmd::nodes::leases(a)),
        Command::Queues(a) => run_client(cmd::queues::queues(a)),
        Command::Queue(g) => run_client(cmd::queues::queue(g)),
        Command::Cluster(g) => run_client(cmd::cluster::cluster(g)),
        Command::Defrag(g) => run_client(cmd::defrag::defrag(g)),
        Command::Drill(g) => run_client_on(Threads::PerCore, cmd::drill::drill(g)),
        Command::Access(g) => run_client(cmd::access::access(g)),
        Command::Whoami(a) => run_client(cmd::access::whoami(a)),
        Command::Audit(a) => run_client(cmd::audit::audit(a)),
        Command::Tls(g) => cmd::tls::run(g),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("gangway").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn insecure_takes_the_usual_spellings_from_the_environment() {
        for (value, want) in [
            ("1", true),
            ("true", true),
            ("yes", true),
            ("0", false),
            ("false", false),
        ] {
            std::env::set_var("GANGWAY_INSECURE", value);
            let cli = parse(&["whoami"]).unwrap_or_else(|e| panic!("{value}: {e}"));
            std::env::remove_var("GANGWAY_INSECURE");
            let Command::Whoami(a) = cli.command else {
                panic!("not whoami")
            };
            assert_eq!(a.opts.insecure, want, "GANGWAY_INSECURE={value}");
        }
    }

    #[test]
    fn guaranteed_devices_parse_to_milli() {
        for (arg, want) in [("2.5", 2500), ("3", 3000), ("0.125", 125)] {
            let cli = parse(&["queue", "set", "research", "--guaranteed", arg]).unwrap();
            let Command::Queue(g) = cli.command else {
                panic!("not a queue command")
            };
            let cmd::queues::QueueCommand::Set(a) = g.command;
            assert_eq!(a.guaranteed, Some(want), "{arg}");
        }
    }

    #[test]
    fn bad_values_name_their_flag() {
        let cases: [(&[&str], &str); 9] = [
            (
                &["queue", "set", "q", "--guaranteed", "lots"],
                "--guaranteed",
            ),
            (
                &["queue", "set", "q", "--guaranteed", "0.0001"],
                "--guaranteed",
            ),
            (&["queue", "set", "q", "--guaranteed", "-1"], "--guaranteed"),
            (&["jobs", "--addr", "nohost"], "--addr"),
            (&["jobs", "--addr", ""], "--addr"),
            (&["jobs", "--timeout", "soon"], "--timeout"),
            (&["jobs", "--state", "sleeping"], "--state"),
            (&["nodes", "--watch", "--interval", "0s"], "--interval"),
            (&["submit", "job.toml", "--wait", "forever"], "--wait"),
        ];
        for (args, flag) in cases {
            let err = parse(args).expect_err(&format!("{args:?} should be rejected"));
            assert!(err.use_stderr());
            assert!(err.to_string().contains(flag), "{args:?}: {err}");
        }
    }

    #[test]
    fn device_and_node_removal_commands_parse() {
        let cli = parse(&["device", "fence", "host-1", "3", "--reason", "XID storm"]).unwrap();
        let Command::Device(g) = cli.command else {
            panic!("not a device command")
        };
        let cmd::nodes::DeviceCommand::Fence(a) = g.command else {
            panic!("not fence")
        };
        assert_eq!((a.node.as_str(), a.device.as_str()), ("host-1", "3"));
        assert_eq!(a.reason, "XID storm");
        assert!(parse(&["device", "unfence", "host-1", "GPU-abc"]).is_ok());
        assert!(
            parse(&["device", "fence", "host-1"]).is_err(),
            "DEVICE is required"
        );
        assert!(parse(&["node", "remove", "host-1", "--reason", "retired"]).is_ok());
    }

    #[test]
    fn queue_set_needs_a_change_and_one_borrow_flag() {
        assert!(parse(&["queue", "set", "q"]).is_err());
        assert!(parse(&["queue", "set", "q", "--may-borrow", "--no-borrow"]).is_err());
        assert!(parse(&["queue", "set", "q", "--no-borrow"]).is_ok());
    }

    #[test]
    fn client_flags_work_before_and_after_the_subcommand() {
        for args in [
            &["job", "--addr", "a:1,b:2", "-o", "json", "status", "j1"][..],
            &["job", "status", "j1", "--addr", "a:1,b:2", "-o", "json"][..],
        ] {
            let cli = parse(args).unwrap();
            let Command::Job(g) = cli.command else {
                panic!("not a job command")
            };
            assert_eq!(g.opts.addr.0, ["http://a:1", "http://b:2"], "{args:?}");
            assert_eq!(g.opts.output, cmd::output::Output::Json, "{args:?}");
        }
        let cli = parse(&["jobs", "--state", "pending,running", "--timeout", "2s"]).unwrap();
        let Command::Jobs(a) = cli.command else {
            panic!("not jobs")
        };
        assert_eq!(a.opts.timeout, std::time::Duration::from_secs(2));
        assert_eq!(
            a.state,
            [
                cmd::jobs::JobStateArg::Pending,
                cmd::jobs::JobStateArg::Running
            ]
        );
    }

    #[test]
    fn cancel_exists_at_the_top_and_under_job() {
        assert!(matches!(
            parse(&["cancel", "j1", "--reason", "oops"])
                .unwrap()
                .command,
            Command::Cancel(_)
        ));
        assert!(matches!(
            parse(&["job", "cancel", "j1"]).unwrap().command,
            Command::Job(_)
        ));
    }
}
