//! Signal names, delivery to a task's process group, and the shim's survival handlers.

use std::io;

use super::DriverError;

/// Signals a task may be sent by name. The agent relays names from job specs (a checkpoint
/// signal), so the list is the usual job-control and user signals, not every signal Linux has.
const SIGNALS: &[(&str, libc::c_int)] = &[
    ("SIGHUP", libc::SIGHUP),
    ("SIGINT", libc::SIGINT),
    ("SIGQUIT", libc::SIGQUIT),
    ("SIGABRT", libc::SIGABRT),
    ("SIGKILL", libc::SIGKILL),
    ("SIGUSR1", libc::SIGUSR1),
    ("SIGUSR2", libc::SIGUSR2),
    ("SIGALRM", libc::SIGALRM),
    ("SIGTERM", libc::SIGTERM),
    ("SIGCONT", libc::SIGCONT),
    ("SIGSTOP", libc::SIGSTOP),
    ("SIGTSTP", libc::SIGTSTP),
    ("SIGWINCH", libc::SIGWINCH),
];

/// The signals a shim must survive because the driver sends them to the whole group (stop,
/// checkpoint) or a terminal might. SIGKILL and SIGSTOP cannot be caught, and need not be.
pub(crate) const SHIM_SURVIVES: &[libc::c_int] = &[
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGQUIT,
];

/// Parses "SIGUSR1", "USR1" or "usr1" into the signal number and its canonical name.
pub(crate) fn parse_signal(name: &str) -> Result<(libc::c_int, &'static str), DriverError> {
    let upper = name.trim().to_ascii_uppercase();
    let wanted = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    SIGNALS
        .iter()
        .find(|(n, _)| *n == wanted)
        .map(|(n, s)| (*s, *n))
        .ok_or_else(|| DriverError::UnknownSignal(name.to_string()))
}

/// The name of a signal number, for messages ("SIGTERM"), or "signal N" for others.
pub(crate) fn signal_name(signal: libc::c_int) -> String {
    SIGNALS
        .iter()
        .find(|(_, s)| *s == signal)
        .map(|(n, _)| n.to_string())
        .unwrap_or_else(|| format!("signal {signal}"))
}

/// Sends `signal` to every process of group `pgid`, so a launcher's grandchildren get it too.
/// A group that no longer exists is not an error: the task has already ended.
pub(crate) fn signal_group(pgid: i32, signal: libc::c_int) -> Result<(), DriverError> {
    // Group 0 is our own group and 1 is init's; -1 would mean "every process we may signal".
    // None of these is ever a task's group, so refuse them rather than signal ourselves.
    if pgid <= 1 {
        return Err(DriverError::Signal {
            signal: static_name(signal),
            pgid,
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a task process group"),
        });
    }
    // SAFETY: kill has no memory-safety preconditions.
    let rc = unsafe { libc::kill(-pgid, signal) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) {
        return Ok(());
    }
    Err(DriverError::Signal {
        signal: static_name(signal),
        pgid,
        source: err,
    })
}

fn static_name(signal: libc::c_int) -> &'static str {
    SIGNALS
        .iter()
        .find(|(_, s)| *s == signal)
        .map(|(n, _)| *n)
        .unwrap_or("signal")
}

extern "C" fn ignore_signal(_signal: libc::c_int) {}

/// Makes the calling process survive [`SHIM_SURVIVES`] with a handler that does nothing.
///
/// A handler rather than `SIG_IGN` because ignored dispositions are inherited across `exec`:
/// the task would never see its checkpoint or stop signal. Handled ones reset to the default in
/// the exec'd child.
pub(crate) fn survive_group_signals() -> io::Result<()> {
    for &signal in SHIM_SURVIVES {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler is an
        // async-signal-safe function that does nothing; sigemptyset/sigaction only write to the
        // struct we own.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ignore_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_with_and_without_prefix() {
        assert_eq!(parse_signal("SIGUSR1").unwrap(), (libc::SIGUSR1, "SIGUSR1"));
        assert_eq!(parse_signal("USR2").unwrap(), (libc::SIGUSR2, "SIGUSR2"));
        assert_eq!(parse_signal("sigterm").unwrap(), (libc::SIGTERM, "SIGTERM"));
        assert_eq!(parse_signal(" hup ").unwrap(), (libc::SIGHUP, "SIGHUP"));
    }

    #[test]
    fn unknown_names_are_errors_that_name_them() {
        for bad in ["SIGBOGUS", "", "SIG", "9", "USR3"] {
            let err = parse_signal(bad).unwrap_err();
            assert!(
                matches!(err, DriverError::UnknownSignal(ref n) if n == bad),
                "{bad}"
            );
            assert!(err.to_string().contains(&format!("`{bad}`")));
        }
    }

    #[test]
    fn refuses_to_signal_special_groups() {
        for pgid in [-1, 0, 1] {
            assert!(signal_group(pgid, 0).is_err());
        }
    }

    #[test]
    fn names_signal_numbers() {
        assert_eq!(signal_name(libc::SIGKILL), "SIGKILL");
        assert_eq!(signal_name(63), "signal 63");
    }
}
