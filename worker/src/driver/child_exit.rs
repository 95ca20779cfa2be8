//! [`ChildExit`]: the shim's wait for its task's exit, woken the moment the task exits rather than
//! on a polling tick, while still returning in time for the shim's periodic lease check.

use std::os::fd::{AsFd, OwnedFd};
use std::process::Child;
use std::time::Duration;

use super::fd_wait::{pidfd_open, readable_within};

/// How long one wait lasts at most without a pidfd (Linux before 5.3): the poll it falls back to.
const FALLBACK_POLL: Duration = Duration::from_millis(20);

/// A pidfd of the shim's child (readable once the child exits), or none where the kernel has no
/// `pidfd_open`.
pub(crate) struct ChildExit {
    pidfd: Option<OwnedFd>,
}

impl ChildExit {
    pub(crate) fn new(child: &Child) -> Self {
        let pidfd = libc::pid_t::try_from(child.id()).ok().and_then(pidfd_open);
        ChildExit { pidfd }
    }

    /// Returns once the child has exited (not reaped: `try_wait` then reads the status), after
    /// `at_most`, or earlier on a signal; the caller checks which.
    pub(crate) fn wait(&self, at_most: Duration) {
        match &self.pidfd {
            Some(fd) => {
                let _ = readable_within(fd.as_fd(), at_most);
            }
            None => std::thread::sleep(at_most.min(FALLBACK_POLL)),
        }
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
