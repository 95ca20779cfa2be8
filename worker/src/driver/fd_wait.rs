//! Two descriptor primitives the shim and the fork server share: a pidfd for a process, and a
//! bounded wait for one descriptor to become readable.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// A pidfd for `pid` (readable once the process exits), or `None` where the kernel has no
/// `pidfd_open` (Linux before 5.3) or the process is gone.
pub(crate) fn pidfd_open(pid: libc::pid_t) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: a descriptor just returned by the kernel, owned by nobody else.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether `fd` is readable (for a socket, end-of-file counts) within `at_most`; `Ok(false)`
/// when the time ran out or a signal interrupted the wait.
pub(crate) fn readable_within(fd: BorrowedFd<'_>, at_most: Duration) -> io::Result<bool> {
    let mut poll = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(at_most.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    match unsafe { libc::poll(&mut poll, 1, ms) } {
        -1 => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
        0 => Ok(false),
        _ => Ok(true),
    }
}
