//! Transparent huge pages, decided per command before `main` runs.
//!
//! mimalloc reserves its arena with `madvise(MADV_HUGEPAGE)`, so on a host whose THP setting is
//! `always` or `madvise` (Debian's default) the first touch of each 2 MiB of it zeroes a whole
//! huge page. A replica allocates and frees small pieces all the time, and those faults were
//! 16-20% of the leader's CPU in the e2e storm; a client command (`gangway submit`) lives a few
//! milliseconds and zeroed a huge page for each new piece of the arena it touched: without them it
//! takes 10-14% less CPU. Both turn THP off for themselves (`prctl(PR_SET_THP_DISABLE)`) before
//! the first allocation: an ELF constructor reads the subcommand from `argv` (glibc hands
//! constructors `main`'s arguments).
//!
//! The agent (`worker`) turns them off for itself too (its allocator takes fresh memory for each
//! set of launches: ~10% of its CPU went to zeroing huge pages while it started a thousand short
//! tasks), but the flag is inherited across `fork` and `execve` and a task's allocator chooses for
//! itself: where the agent found them on, it sets `GANGWAY_TASK_HUGE_PAGES=on` and the shim turns
//! them back on just before the task starts (`gangway_worker::driver::task_huge_pages`). `dev`
//! (whose worker processes decide for themselves), the shim and `sim` keep the system's setting.
//! `MIMALLOC_ALLOW_THP`, when set, is the operator's choice and wins (mimalloc then does what it
//! says, `0` included).

/// mimalloc's own switch for transparent huge pages.
pub const ALLOW_THP: &std::ffi::CStr = c"MIMALLOC_ALLOW_THP";

/// What a command's process does about transparent huge pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HugePages {
    /// Off for the process, unless the operator set `MIMALLOC_ALLOW_THP`.
    Off,
    /// Off for the process as [`HugePages::Off`], and back for the tasks it starts if it found
    /// them on.
    OffExceptTasks,
    /// Left as the system and mimalloc have them.
    Unchanged,
}

/// The rule for the subcommand named `name` (`argv[1]`; empty when there is none).
pub fn for_command(name: &[u8]) -> HugePages {
    match name {
        // The agent: its tasks get the setting it found.
        b"worker" => HugePages::OffExceptTasks,
        // They start processes that would inherit the flag: `gangway dev`'s replicas and workers
        // (which decide for themselves), and the shim that execs the task.
        b"dev" | b"task-shim" => HugePages::Unchanged,
        // Long runs over one large heap, where huge pages spare TLB misses; not measured.
        b"sim" => HugePages::Unchanged,
        // The replica, the client commands, `tls`, `health`, `--help` and `--version`.
        _ => HugePages::Off,
    }
}

/// What a process does as it starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AtStart {
    /// Turn THP off for this process.
    pub disable: bool,
    /// For the agent: whether the shims turn them back on for its tasks
    /// (`GANGWAY_TASK_HUGE_PAGES=on` set, or removed when one was inherited); `None`: the
    /// environment is left as it is.
    pub tasks_get_them_back: Option<bool>,
}

/// What to do, given the rule, whether the operator set `MIMALLOC_ALLOW_THP`, and whether THP
/// was already off for this process (its parent's choice, inherited) when it started.
pub fn at_start(rule: HugePages, operator_chose: bool, already_off: bool) -> AtStart {
    match rule {
        // The agent's tasks then inherit whatever the agent has.
        HugePages::OffExceptTasks if operator_chose => AtStart {
            disable: false,
            tasks_get_them_back: Some(false),
        },
        _ if operator_chose => AtStart::default(),
        HugePages::Off => AtStart {
            disable: true,
            tasks_get_them_back: None,
        },
        HugePages::OffExceptTasks => AtStart {
            disable: true,
            tasks_get_them_back: Some(!already_off),
        },
        HugePages::Unchanged => AtStart::default(),
    }
}

/// Whether THP is off for this process now (`None` where the kernel cannot say).
pub fn is_off() -> Option<bool> {
    // SAFETY: PR_GET_THP_DISABLE takes integer arguments only and touches no memory of ours.
    match unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) } {
        rc if rc < 0 => None,
        rc => Some(rc == 1),
    }
}

/// Turns transparent huge pages off for this process. Allocates nothing (it runs before `main`);
/// the error, if the kernel refuses, is returned for the caller to ignore or report.
pub fn disable() -> std::io::Result<()> {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and touches no memory of ours.
    match unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod early {
    use super::{at_start, disable, for_command, is_off, HugePages, ALLOW_THP};
    use gangway_worker::driver::task_huge_pages;
    use std::ffi::{c_char, c_int, CStr};

    /// Run by the dynamic loader with the other constructors, before Rust's runtime starts (its
    /// set-up is the process's first allocation).
    #[used]
    #[link_section = ".init_array"]
    static DECIDE: extern "C" fn(c_int, *const *const c_char, *const *const c_char) = decide;

    extern "C" fn decide(argc: c_int, argv: *const *const c_char, _envp: *const *const c_char) {
        let name: &[u8] = if argc >= 2 && !argv.is_null() {
            // SAFETY: glibc passes `main`'s argc and argv to .init_array functions: argv holds
            // argc NUL-terminated strings, and argv[1] exists since argc >= 2.
            let arg = unsafe { *argv.add(1) };
            if arg.is_null() {
                b""
            } else {
                // SAFETY: a NUL-terminated string that lives as long as the process.
                unsafe { CStr::from_ptr(arg) }.to_bytes()
            }
        } else {
            b""
        };
        // SAFETY: getenv reads the environment glibc set up before any constructor and
        // allocates nothing.
        let operator_chose = !unsafe { libc::getenv(ALLOW_THP.as_ptr()) }.is_null();
        // Only the agent's rule reads the inherited flag: other commands start with no extra call.
        // A kernel that cannot say is taken as off: the tasks then get nothing turned on.
        let rule = for_command(name);
        let already_off = rule == HugePages::OffExceptTasks && is_off().unwrap_or(true);
        let todo = at_start(rule, operator_chose, already_off);
        // SAFETY: setenv copies both NUL-terminated strings (with glibc's allocator, not the
        // Rust heap's) and unsetenv reads one; no other thread exists yet to read the
        // environment meanwhile.
        let _ = match todo.tasks_get_them_back {
            Some(true) => unsafe {
                libc::setenv(
                    task_huge_pages::VAR.as_ptr(),
                    task_huge_pages::ON.as_ptr(),
                    1,
                )
            },
            Some(false) => unsafe { libc::unsetenv(task_huge_pages::VAR.as_ptr()) },
            None => 0,
        };
        if todo.disable {
            // Refused (a kernel without the prctl): huge pages stay as they were, which is only slower.
            let _ = disable();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn replicas_clients_and_the_agent_go_without_huge_pages_and_others_keep_them() {
        let table: &[(&str, HugePages)] = &[
            ("server", HugePages::Off),
            ("submit", HugePages::Off),
            ("jobs", HugePages::Off),
            ("tls", HugePages::Off),
            ("health", HugePages::Off),
            ("--version", HugePages::Off),
            ("", HugePages::Off),
            ("worker", HugePages::OffExceptTasks),
            ("dev", HugePages::Unchanged),
            ("task-shim", HugePages::Unchanged),
            ("sim", HugePages::Unchanged),
        ];
        for (name, rule) in table {
            assert_eq!(for_command(name.as_bytes()), *rule, "{name:?}");
        }
    }

    /// A new subcommand that starts other programs must be added to the rule by hand: this list
    /// of every subcommand, each with its rule, fails until it is.
    #[test]
    fn every_subcommand_has_a_considered_rule() {
        let starts_processes = ["dev", "task-shim", "sim"];
        let short_or_replica = [
            "submit", "jobs", "job", "logs", "cancel", "nodes", "node", "device", "leases",
            "queues", "queue", "cluster", "defrag", "drill", "access", "whoami", "audit", "tls",
            "server", "health", "help",
        ];
        let cli = crate::Cli::command();
        for sub in cli.get_subcommands() {
            let name = sub.get_name();
            let expected = if name == "worker" {
                HugePages::OffExceptTasks
            } else if starts_processes.contains(&name) {
                HugePages::Unchanged
            } else {
                assert!(
                    short_or_replica.contains(&name),
                    "subcommand {name:?} has no considered huge-page rule: add it to one list"
                );
                HugePages::Off
            };
            assert_eq!(for_command(name.as_bytes()), expected, "{name:?}");
        }
    }

    #[test]
    fn the_operator_s_choice_wins_and_tasks_get_back_only_what_the_agent_found() {
        use HugePages::*;
        let does = |disable, tasks_get_them_back| AtStart {
            disable,
            tasks_get_them_back,
        };
        // (rule, MIMALLOC_ALLOW_THP set, already off when started) -> what the process does
        for (rule, operator, already_off, want) in [
            (Off, false, false, does(true, None)),
            (Off, false, true, does(true, None)),
            (Off, true, false, does(false, None)),
            // The agent: off for itself, back for its tasks only if it found them on; an
            // inherited request is removed otherwise.
            (OffExceptTasks, false, false, does(true, Some(true))),
            (OffExceptTasks, false, true, does(true, Some(false))),
            (OffExceptTasks, true, false, does(false, Some(false))),
            (Unchanged, false, false, does(false, None)),
            (Unchanged, true, true, does(false, None)),
        ] {
            assert_eq!(
                at_start(rule, operator, already_off),
                want,
                "{rule:?}, operator {operator}, already off {already_off}"
            );
        }
    }

    #[test]
    fn turning_huge_pages_off_shows_in_the_process() {
        disable().expect("prctl(PR_SET_THP_DISABLE)");
        assert_eq!(is_off(), Some(true), "the process's THP flag");
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(status.contains("THP_enabled:\t0"), "{status}");
    }
}
