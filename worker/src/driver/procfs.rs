//! Reading `/proc/<pid>/stat`: is a process still the one we started?

use std::fs;
use std::io;

/// The fields of `/proc/<pid>/stat` the driver and the agent need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// Field 3: `R`, `S`, `Z` (zombie: exited, not yet reaped), ...
    pub state: char,
    /// Field 5: the process group (a task's group is its shim's pid).
    pub pgrp: i32,
    /// Fields 14 + 15: CPU time used in user and kernel mode, in clock ticks.
    pub cpu_ticks: u64,
    /// Field 22: start time in clock ticks since boot. Together with the pid it names a process
    /// uniquely for the life of the host, which the pid alone does not (pids are recycled).
    pub start_ticks: u64,
}

impl ProcStat {
    pub(crate) fn read(pid: i32) -> io::Result<ProcStat> {
        if pid <= 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid pid {pid}"),
            ));
        }
        let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
        Self::parse(&text).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected /proc/{pid}/stat: {text:?}"),
            )
        })
    }

    /// The command name (field 2) is in parentheses and may itself contain spaces and `)`, so
    /// fields are counted from the last `)`.
    pub(crate) fn parse(text: &str) -> Option<ProcStat> {
        let rest = &text[text.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // fields[0] is field 3 (state); field n is fields[n - 3].
        let field = |n: usize| fields.get(n - 3).copied();
        let state = field(3)?.chars().next()?;
        let pgrp = field(5)?.parse().ok()?;
        let cpu_ticks = field(14)?
            .parse::<u64>()
            .ok()?
            .saturating_add(field(15)?.parse().ok()?);
        let start_ticks = field(22)?.parse().ok()?;
        Some(ProcStat {
            state,
            pgrp,
            cpu_ticks,
            start_ticks,
        })
    }

    /// Whether the process can still run: a zombie or dead entry has already exited.
    pub(crate) fn alive(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Whether `pid` is still the live process that started at `start_ticks`.
pub(crate) fn same_process_alive(pid: i32, start_ticks: u64) -> bool {
    match ProcStat::read(pid) {
        Ok(stat) => stat.start_ticks == start_ticks && stat.alive(),
        Err(_) => false,
    }
}

/// CPU time, in clock ticks, used so far by the live processes of each process group in `groups`
/// (a task and everything it started, unless they left the group), from one pass over /proc.
/// Processes that already exited are not counted: callers use differences between samples, which
/// is what utilization needs. A group with no live process is 0.
pub(crate) fn group_cpu_ticks(groups: &[i32]) -> std::collections::BTreeMap<i32, u64> {
    let mut out: std::collections::BTreeMap<i32, u64> = groups.iter().map(|g| (*g, 0)).collect();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for stat in dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| ProcStat::read(pid).ok())
    {
        if let Some(total) = out.get_mut(&stat.pgrp) {
            *total += stat.cpu_ticks;
        }
    }
    out
}

/// The real uids of every process on the host, from one pass over /proc (a uid the agent is
/// about to give a task must not be anyone's already: that one could signal its processes).
pub(crate) fn uids_with_processes() -> std::collections::BTreeSet<u32> {
    let mut out = std::collections::BTreeSet::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for pid in dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
        let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        // "Uid:\treal\teffective\tsaved\tfs": every one of them counts.
        let ids = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .into_iter()
            .flat_map(str::split_whitespace)
            .filter_map(|u| u.parse::<u32>().ok());
        out.extend(ids);
    }
    out
}

/// Clock ticks per second, the unit of `/proc/<pid>/stat` times.
pub(crate) fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf reads a constant of the running system; no memory is passed.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|t| *t > 0).unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields_after_a_tricky_command_name() {
        let line = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 \
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
        let stat = ProcStat::parse(line).expect("parses");
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.pgrp, 4242);
        assert_eq!(stat.cpu_ticks, 1 + 2);
        assert_eq!(stat.start_ticks, 987654);
        assert!(stat.alive());
    }

    #[test]
    fn our_own_uid_has_processes() {
        // SAFETY: getuid cannot fail.
        let me = unsafe { libc::getuid() };
        assert!(uids_with_processes().contains(&me));
    }

    #[test]
    fn rejects_truncated_stat() {
        assert_eq!(ProcStat::parse("12 (x) S 1 2"), None);
        assert_eq!(ProcStat::parse("garbage"), None);
    }

    #[test]
    fn reads_own_process() {
        let stat = ProcStat::read(std::process::id() as i32).expect("own stat");
        assert!(stat.alive());
        assert!(same_process_alive(
            std::process::id() as i32,
            stat.start_ticks
        ));
        assert!(!same_process_alive(
            std::process::id() as i32,
            stat.start_ticks + 1
        ));
        assert!(ProcStat::read(0).is_err());
    }

    #[test]
    fn a_busy_group_accumulates_cpu_ticks() {
        // A child in a group of its own that spins for a while: its group's ticks grow.
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 3000000 ]; do i=$((i+1)); done"])
            .process_group(0)
            .spawn()
            .expect("sh runs");
        let pgid = child.id() as i32;
        let first = group_cpu_ticks(&[pgid])[&pgid];
        std::thread::sleep(std::time::Duration::from_millis(500));
        let later = group_cpu_ticks(&[pgid])[&pgid];
        let _ = child.kill();
        let _ = child.wait();
        assert!(later > first, "ticks {first} -> {later}");
        assert_eq!(
            group_cpu_ticks(&[pgid])[&pgid],
            0,
            "an ended group uses nothing"
        );
        assert!(clock_ticks_per_second() >= 1);
    }
}
