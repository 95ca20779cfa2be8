//! [`ChildExit`]: the shim's wait for its task's exit, woken the moment the task exits rather than
//! on a polling tick, while still returning in time for the shim's periodic lease check.

use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Child;
use std::time::Duration;

/// How long one wait lasts at most without a pidfd (Linux before 5.3): the poll it falls back to.
const FALLBACK_POLL: Duration = Duration::from_millis(20);

/// A pidfd of the shim's child (readable once the child exits), or none where the kernel has no
/// `pidfd_open`.
pub(crate) struct ChildExit {
    pidfd: Option<OwnedFd>,
}

impl ChildExit {
    pub(crate) fn new(child: &Child) -> Self {
        let Ok(pid) = libc::pid_t::try_from(child.id()) else {
            return ChildExit { pidfd: None };
        };
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let pidfd = i32::try_from(fd)
            .ok()
            .filter(|fd| *fd >= 0)
            // SAFETY: a descriptor just returned by the kernel, owned by nobody else.
            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
        ChildExit { pidfd }
    }

    /// Returns once the child has exited (not reaped: `try_wait` then reads the status), after
    /// `at_most`, or earlier on a signal; the caller checks which.
    pub(crate) fn wait(&self, at_most: Duration) {
        let Some(fd) = &self.pidfd else {
            std::thread::sleep(at_most.min(FALLBACK_POLL));
            return;
        };
        use std::os::fd::AsRawFd;
        let mut poll = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(at_most.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut poll, 1, ms) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::Instant;

    #[test]
    fn a_wait_ends_when_the_child_exits_and_otherwise_at_its_limit() {
        // A child that outlives the wait: the wait returns at its limit, the child still runs.
        let mut child = Command::new("sleep").arg("5").spawn().unwrap();
        let exit = ChildExit::new(&child);
        assert!(exit.pidfd.is_some(), "this kernel has pidfd_open");
        exit.wait(Duration::from_millis(50));
        assert!(child.try_wait().unwrap().is_none(), "still running");
        child.kill().unwrap();
        // Killed: the wait returns with the exit, well before its limit of a minute.
        let t = Instant::now();
        exit.wait(Duration::from_secs(60));
        assert!(t.elapsed() < Duration::from_secs(30), "woken by the exit");
        assert!(child.try_wait().unwrap().is_some(), "exited, reapable");
    }
}
