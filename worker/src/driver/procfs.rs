//! Reading `/proc/<pid>/stat`: is a process still the one we started?

use std::fs;
use std::io;

/// The two fields of `/proc/<pid>/stat` the driver needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// Field 3: `R`, `S`, `Z` (zombie: exited, not yet reaped), ...
    pub state: char,
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
        let mut fields = rest.split_whitespace();
        let state = fields.next()?.chars().next()?;
        // After field 3 (state), field 22 is the 19th.
        let start_ticks = fields.nth(18)?.parse().ok()?;
        Some(ProcStat { state, start_ticks })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields_after_a_tricky_command_name() {
        let line = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 \
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
        let stat = ProcStat::parse(line).expect("parses");
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.start_ticks, 987654);
        assert!(stat.alive());
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
}
