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
//! Processes that start tasks keep the system's setting: the flag is inherited across `fork` and
//! `execve`, and a task's own allocator chooses for itself. `MIMALLOC_ALLOW_THP`, when set, is the
//! operator's choice and wins (mimalloc then does what it says, `0` included).

/// mimalloc's own switch for transparent huge pages.
pub const ALLOW_THP: &std::ffi::CStr = c"MIMALLOC_ALLOW_THP";

/// What a command's process does about transparent huge pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HugePages {
    /// Off for the process, unless the operator set `MIMALLOC_ALLOW_THP`.
    Off,
    /// Left as the system and mimalloc have them.
    Unchanged,
}

/// The rule for the subcommand named `name` (`argv[1]`; empty when there is none).
pub fn for_command(name: &[u8]) -> HugePages {
    match name {
        // They start tasks (the agent, `gangway dev`'s fleet, and the shim that execs the task),
        // which would inherit the flag.
        b"worker" | b"dev" | b"task-shim" => HugePages::Unchanged,
        // Long runs over one large heap, where huge pages spare TLB misses; not measured.
        b"sim" => HugePages::Unchanged,
        // The replica, the client commands, `tls`, `health`, `--help` and `--version`.
        _ => HugePages::Off,
    }
}

/// Whether the process turns THP off, given the rule and `MIMALLOC_ALLOW_THP`'s presence.
pub fn turn_off(rule: HugePages, operator_chose: bool) -> bool {
    rule == HugePages::Off && !operator_chose
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
    use super::{disable, for_command, turn_off, ALLOW_THP};
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
        if turn_off(for_command(name), operator_chose) {
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
    fn replicas_and_short_commands_go_without_huge_pages_and_task_starters_keep_them() {
        let table: &[(&str, HugePages)] = &[
            ("server", HugePages::Off),
            ("submit", HugePages::Off),
            ("jobs", HugePages::Off),
            ("tls", HugePages::Off),
            ("health", HugePages::Off),
            ("--version", HugePages::Off),
            ("", HugePages::Off),
            ("worker", HugePages::Unchanged),
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
        let starts_tasks = ["worker", "dev", "task-shim", "sim"];
        let short_or_replica = [
            "submit", "jobs", "job", "logs", "cancel", "nodes", "node", "device", "leases",
            "queues", "queue", "cluster", "defrag", "drill", "access", "whoami", "audit", "tls",
            "server", "health", "help",
        ];
        let cli = crate::Cli::command();
        for sub in cli.get_subcommands() {
            let name = sub.get_name();
            let expected = if starts_tasks.contains(&name) {
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
    fn the_operator_s_choice_wins() {
        assert!(turn_off(HugePages::Off, false));
        assert!(!turn_off(HugePages::Off, true));
        assert!(!turn_off(HugePages::Unchanged, false));
        assert!(!turn_off(HugePages::Unchanged, true));
    }

    #[test]
    fn turning_huge_pages_off_shows_in_the_process() {
        disable().expect("prctl(PR_SET_THP_DISABLE)");
        // SAFETY: PR_GET_THP_DISABLE takes integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(rc, 1, "the process's THP flag");
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(status.contains("THP_enabled:\t0"), "{status}");
    }
}
