//! The task driver: runs, signals, stops, watches and re-adopts task processes on this host.
//!
//! The agent decides *what* runs; the driver runs it. Each task runs under a *shim*
//! ([`run_shim`], the same `gangway` binary started as `gangway task-shim ...`) that leads a new
//! process group, so that:
//!
//! * the task outlives the agent: nothing ties its life to ours (no `kill_on_drop`, no parent
//!   death signal, not in our process group);
//! * its real exit status survives an agent restart, in the shim's *exit file*, read by whichever
//!   agent process [`adopt`](TaskDriver::adopt)s it;
//! * it is fenced when the lease lapses even if the agent is dead: the shim watches the lease file
//!   the agent rewrites after every heartbeat ([`TaskDriver::write_lease_deadline`]) and kills
//!   the task by the deadline;
//! * signals (checkpoint, stop) go to the whole group, reaching a launcher's workers too.
//!
//! Shims are forked by a small fork server (`fork_server.rs`) when the configuration asks for it,
//! which saves executing the shim binary per task; the driver executes them otherwise, and
//! whenever the server fails.
//!
//! Files under `data_dir`: `logs/<job>/task-<n>.log` (stdout and stderr of every epoch, each
//! after a `=== gangway: epoch E started` header) and `tasks/<job>/task-<n>/` (`exit-<E>.json`
//! and the default working directory `work/`). A task may run as another user
//! ([`TaskIdentity`]): it then owns its working directory and nothing else (see `layout.rs`).

mod child_exit;
mod config;
mod error;
mod exit_file;
mod fd_wait;
mod fork_server;
mod identity;
mod key;
mod layout;
mod lease;
mod outcome;
mod procfs;
mod record;
mod shim;
mod signals;
mod spec;
mod task_driver;
mod task_handle;
pub mod task_huge_pages;

pub use config::{shim_command_for, DriverConfig, SHIM_BINARY};
pub use error::DriverError;
pub use identity::TaskIdentity;
pub use key::TaskKey;
pub use layout::hand_over_dir;
pub use lease::boottime_ms;
pub use outcome::{ExitOutcome, ExitReason};
pub(crate) use procfs::{clock_ticks_per_second, group_cpu_ticks, uids_with_processes};
pub use record::ProcessRecord;
pub use shim::{run_shim, shim_main, ShimArgs};
pub use spec::LaunchSpec;
pub use task_driver::{SweepReport, TaskDriver, DEFAULT_LOG_MAX_BYTES};
pub use task_handle::TaskHandle;
