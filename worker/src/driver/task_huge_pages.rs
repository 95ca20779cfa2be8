//! Transparent huge pages for the task, whatever the agent chose for itself.
//!
//! `gangway worker` turns transparent huge pages off for its own process (`prctl(PR_SET_THP_DISABLE)`
//! in the binary's `cmd::huge_pages`): its allocator takes fresh memory for each set of launches
//! and frees it again, and on a host with THP on every such touch zeroed a 2 MiB page, ~10% of
//! the agent's CPU while it started a thousand short tasks. The flag is inherited by every process
//! the agent starts (the fork server, the shims, their tasks) across `fork` and `execve`, and a
//! task's choice is not the agent's: where the host had huge pages on when the agent started, the
//! agent says so in [`VAR`], and the shim turns them back on just before it starts the task and
//! keeps the variable out of the task's environment. A task started by an agent that found them
//! off (its parent's choice) keeps them off.

use std::ffi::{CStr, OsStr};
use std::os::unix::ffi::OsStrExt;

/// Set (to [`ON`]) in the agent's environment when the tasks get huge pages back.
pub const VAR: &CStr = c"GANGWAY_TASK_HUGE_PAGES";

/// The value of [`VAR`] that gives them back.
pub const ON: &CStr = c"on";

/// The variable's name, as the task's environment knows it.
pub(crate) fn var_name() -> &'static OsStr {
    OsStr::from_bytes(VAR.to_bytes())
}

/// In the shim, before the task starts: huge pages back on for the process (and so for the task
/// it starts) when the agent asked. A kernel that refuses never had them off; the task runs either
/// way.
pub(crate) fn restore_for_task() {
    if std::env::var_os(var_name()).is_some_and(|v| v.as_bytes() == ON.to_bytes()) {
        // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and touches no memory of ours.
        let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 0, 0, 0, 0) };
    }
}
