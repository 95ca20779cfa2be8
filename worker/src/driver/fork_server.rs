//! The shim fork server: one small single-threaded process per driver that forks each task's
//! shim, so a host starts a shim without executing the shim binary again (the kernel's `execve`,
//! the dynamic loader's relocations and CPU probing, the runtime's start: most of a shim's cost
//! for a short task).
//!
//! The driver starts `<shim command> --fork-server <data dir>` once (the directory only names
//! whose server it is, in `ps` and for tools that find a host's shims by their command line: a
//! forked shim keeps its server's), with one end of a Unix socket pair as its standard input, and
//! sends one request per task: the shim's flags and the variables the task adds, with two
//! descriptors, the task's log and one end of a fresh socket pair for the answer. Requests go one
//! at a time; their answers are awaited side by side. The server checks the flags and forks; the
//! child becomes the shim exactly as the driver would have started it (leader of its own process
//! group, the log as its stdout and stderr, standard input from `/dev/null`, `/` as its directory,
//! the variables set) and runs [`run_shim`]. Before anything else the child itself answers: its
//! pid, its start time and a pidfd the driver watches (the shim is not the driver's child). The
//! server reaps its children.
//!
//! The answer comes from the child, not the server, so the driver always learns whether a shim
//! exists, even when the server dies or hangs mid-request: the answer socket ends without an
//! answer only if no child holds it. A driver that gives up on an answer shuts the socket first;
//! a child answering after that cannot, and exits without starting its task. A failed request
//! therefore never leaves a task running that the driver does not know of, and the driver can
//! execute the shim instead.
//!
//! When the driver goes, the server reads end-of-file and exits; the shims run on (their own
//! groups, re-parented), and the next agent adopts them from their records as before.
//!
//! Frames: a 4-byte little-endian length, then that many bytes of JSON; descriptors ride with
//! the first bytes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::fd_wait::{pidfd_open, readable_within};
use super::procfs::ProcStat;
use super::shim::{run_shim, ShimArgs};

/// The flag that makes the shim binary a fork server.
pub(crate) const FLAG: &str = "--fork-server";

/// A frame larger than this is refused (a command line and environment fit many times over).
const MAX_FRAME: usize = 16 << 20;

/// How long the driver waits for one shim's answer before giving up on the server.
const ANSWER_LIMIT: Duration = Duration::from_secs(5);

/// After the server is killed, how long a child it may have forked gets to answer.
const SETTLE_LIMIT: Duration = Duration::from_secs(2);

/// How often an idle server reaps its exited children.
const REAP_EVERY: Duration = Duration::from_secs(1);

/// After this many failed requests in a row the driver stops using a server and executes shims.
const GIVE_UP_AFTER: u32 = 3;

#[derive(Debug, Serialize, Deserialize)]
struct Request {
    /// The shim's flags, as [`ShimArgs::to_args`] writes them.
    shim_args: Vec<String>,
    /// Set in the shim (and so in its task) on top of what the server inherited.
    env: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
enum Answer {
    /// From the shim itself, with its pidfd where the kernel has them.
    Forked { pid: i32, start_ticks: u64 },
    /// From the server: no shim was forked.
    Refused { error: String },
}

/// A shim the server forked.
#[derive(Debug)]
pub(crate) struct Forked {
    pub pid: i32,
    pub start_ticks: u64,
    /// Readable once the shim exits; `None` on kernels without pidfds (then the driver polls).
    pub pidfd: Option<OwnedFd>,
}

// ---- the server ----

/// Runs the fork server on standard input until the driver closes its end; returns the exit
/// code. Blocking and single-threaded (it forks): call it from `main` before anything else.
pub fn serve() -> i32 {
    // The socket moves off descriptor 0, which becomes /dev/null like every shim's.
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor or -1; descriptor 0 is ours.
    let fd = unsafe { libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 3) };
    if fd < 0 {
        eprintln!("gangway-shim {FLAG}: no socket on standard input");
        return 1;
    }
    // SAFETY: a descriptor just returned by the kernel, owned by nobody else.
    let sock = unsafe { UnixStream::from_raw_fd(fd) };
    if let Err(e) = null_stdin() {
        eprintln!("gangway-shim {FLAG}: cannot open /dev/null: {e}");
        return 1;
    }
    loop {
        reap();
        match readable_within(sock.as_fd(), REAP_EVERY) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) => {
                eprintln!("gangway-shim {FLAG}: {e}");
                return 1;
            }
        }
        match read_frame::<Request>(&sock) {
            Ok(Some((request, fds))) => serve_one(&request, fds, &sock),
            Ok(None) => return 0,
            Err(e) => {
                eprintln!("gangway-shim {FLAG}: bad request: {e}");
                return 1;
            }
        }
    }
}

/// Forks one shim for `request`, whose descriptors are the log and the answer socket.
fn serve_one(request: &Request, fds: Vec<OwnedFd>, server: &UnixStream) {
    let mut fds = fds.into_iter();
    let (Some(log), Some(answer)) = (fds.next(), fds.next()) else {
        eprintln!("gangway-shim {FLAG}: a request without its two descriptors");
        return;
    };
    let answer = UnixStream::from(answer);
    let refuse = |error: String| {
        let _ = write_frame(&answer, &Answer::Refused { error }, &[]);
    };
    let args = match ShimArgs::parse(&request.shim_args) {
        Ok(args) => args,
        Err(e) => return refuse(e.to_string()),
    };
    // SAFETY: this process is single-threaded, so the child may run anything.
    match unsafe { libc::fork() } {
        -1 => refuse(format!("fork: {}", io::Error::last_os_error())),
        0 => become_shim(args, &request.env, log, answer, server),
        // The child holds what it needs; the server's copies close here.
        _ => {}
    }
}

/// The forked child: answer, set up as the driver would start a shim, run it, exit.
fn become_shim(
    args: ShimArgs,
    env: &BTreeMap<String, String>,
    log: OwnedFd,
    answer: UnixStream,
    server: &UnixStream,
) -> ! {
    // SAFETY: getpid cannot fail.
    let pid = unsafe { libc::getpid() };
    let start_ticks = ProcStat::read(pid).map_or(0, |s| s.start_ticks);
    let pidfd = pidfd_open(pid);
    let told = write_frame(
        &answer,
        &Answer::Forked { pid, start_ticks },
        pidfd.as_ref().map(AsFd::as_fd).as_slice(),
    );
    if told.is_err() {
        // The driver gave up on this request and will start the task another way.
        // SAFETY: ends this process without running the server's exit handlers.
        unsafe { libc::_exit(1) }
    }
    drop((answer, pidfd));
    // SAFETY: descriptor and process calls on descriptors this process owns. The server's socket
    // closes: a shim holding it would hide the server's end from the driver.
    unsafe {
        libc::close(server.as_raw_fd());
        libc::setpgid(0, 0);
        libc::dup2(log.as_raw_fd(), 1);
        libc::dup2(log.as_raw_fd(), 2);
        libc::chdir(c"/".as_ptr());
    }
    drop(log);
    for (k, v) in env {
        std::env::set_var(k, v);
    }
    let code = run_shim(args);
    // SAFETY: ends this process without running the server's exit handlers.
    unsafe { libc::_exit(code) }
}

fn null_stdin() -> io::Result<()> {
    let null = File::open("/dev/null")?;
    // SAFETY: dup2 onto descriptor 0, which this process owns.
    if unsafe { libc::dup2(null.as_raw_fd(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reaps every exited child without waiting.
fn reap() {
    // SAFETY: waitpid with WNOHANG and no status pointer.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
}

// ---- frames ----

/// Writes one frame, with `fds` attached to its first bytes.
fn write_frame<T: Serialize>(
    sock: &UnixStream,
    value: &T,
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let body = serde_json::to_vec(value).map_err(io::Error::other)?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|l| (*l as usize) <= MAX_FRAME)
        .ok_or_else(|| io::Error::other(format!("a frame of {} bytes", body.len())))?;
    let head = len.to_le_bytes();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("too many descriptors for one frame"));
    }
    let sent = sendmsg(
        sock,
        &[IoSlice::new(&head), IoSlice::new(&body)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    // What one call did not take follows as a plain stream.
    let rest: Vec<u8> = head.iter().chain(&body).skip(sent).copied().collect();
    (&*sock).write_all(&rest)
}

/// Reads one frame and the descriptors that came with it; `None` at end-of-file before a frame.
fn read_frame<T: for<'de> Deserialize<'de>>(
    sock: &UnixStream,
) -> io::Result<Option<(T, Vec<OwnedFd>)>> {
    let mut head = [0u8; 4];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut head)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?
    .bytes;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if got == 0 {
        return Ok(None);
    }
    (&*sock).read_exact(&mut head[got..])?;
    let len = u32::from_le_bytes(head) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::other(format!(
            "a frame of {len} bytes (at most {MAX_FRAME})"
        )));
    }
    let mut body = vec![0u8; len];
    (&*sock).read_exact(&mut body)?;
    let value = serde_json::from_slice(&body).map_err(io::Error::other)?;
    Ok(Some((value, fds)))
}

// ---- the driver's side ----

/// The driver's handle on its fork server: started at the first shim, restarted after a failed
/// request, given up after [`GIVE_UP_AFTER`] failures in a row (the driver then executes shims).
pub(crate) struct ForkServer {
    command: Vec<String>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    running: Option<Running>,
    /// Counts the servers started, so a request that gives up kills only the one it asked.
    generation: u64,
    failures: u32,
}

struct Running {
    sock: UnixStream,
    child: std::process::Child,
}

impl Drop for Running {
    fn drop(&mut self) {
        // The server's forked shims are in groups of their own and live on.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ForkServer {
    /// A server started as `shim_command --fork-server <data_dir>` when first needed.
    pub(crate) fn new(shim_command: &[String], data_dir: &std::path::Path) -> Self {
        let mut command = shim_command.to_vec();
        command.push(FLAG.to_owned());
        command.push(data_dir.display().to_string());
        ForkServer {
            command,
            state: Mutex::new(State::default()),
        }
    }

    /// Forks a shim with these flags, variables and log. `Err` says why not, and then no shim
    /// of this request runs (see the module documentation): the caller may start it otherwise.
    /// Requests go to the server one at a time; their answers are awaited side by side.
    pub(crate) async fn fork(
        &self,
        shim_args: Vec<String>,
        env: BTreeMap<String, String>,
        log: &File,
    ) -> Result<Forked, String> {
        let (generation, answer) = self.send(&Request { shim_args, env }, log)?;
        let result = self.answer(generation, answer).await;
        let mut state = self.lock();
        match &result {
            Ok(_) => state.failures = 0,
            Err(_) => state.failures += 1,
        }
        result
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands the request to the server (started if there is none); returns the server's
    /// generation and the socket its answer comes on.
    fn send(&self, request: &Request, log: &File) -> Result<(u64, UnixStream), String> {
        let mut state = self.lock();
        if state.failures >= GIVE_UP_AFTER {
            return Err(format!(
                "the fork server failed {GIVE_UP_AFTER} times in a row; shims are executed"
            ));
        }
        let sent = self.send_locked(&mut state, request, log);
        if sent.is_err() {
            state.failures += 1;
            state.running = None;
        }
        sent.map(|answer| (state.generation, answer))
    }

    fn send_locked(
        &self,
        state: &mut State,
        request: &Request,
        log: &File,
    ) -> Result<UnixStream, String> {
        if state.running.is_none() {
            state.running = Some(self.start()?);
            state.generation += 1;
        }
        let server = state.running.as_ref().expect("just started");
        let (answer, theirs) = UnixStream::pair().map_err(|e| format!("socket pair: {e}"))?;
        write_frame(&server.sock, request, &[log.as_fd(), theirs.as_fd()])
            .map_err(|e| format!("the fork server took no request: {e}"))?;
        // From here the only copies of the answer socket's far end are the server's and its
        // child's: the answer ends at end-of-file once neither holds it.
        Ok(answer)
    }

    /// The answer to one request: from the shim, or the server's refusal, or, when none comes
    /// within [`ANSWER_LIMIT`], whatever settling says once the server is killed.
    async fn answer(&self, generation: u64, answer: UnixStream) -> Result<Forked, String> {
        // A whole answer is one small message: once readable, a read does not wait (the limit
        // only bounds a sender that died half way).
        answer
            .set_read_timeout(Some(SETTLE_LIMIT))
            .map_err(|e| format!("socket timeout: {e}"))?;
        // SAFETY: the AsyncFd owns the socket, which stays open and the same until it is taken
        // back with into_inner.
        let failed = match unsafe { AsyncFd::register_with_interest(answer, Interest::READABLE) } {
            Ok(registered) => {
                let ready = tokio::time::timeout(ANSWER_LIMIT, registered.readable())
                    .await
                    .map(|ready| ready.map(drop));
                let answer = registered.into_inner();
                match ready {
                    Ok(Ok(_)) => match read_frame::<Answer>(&answer) {
                        Ok(Some((answer, fds))) => return forked(answer, fds),
                        Ok(None) => return Err("the fork server ended without forking".into()),
                        Err(e) => (answer, e.to_string()),
                    },
                    Ok(Err(e)) => (answer, e.to_string()),
                    Err(_) => (answer, format!("no answer within {ANSWER_LIMIT:?}")),
                }
            }
            Err(e) => {
                let (answer, e) = e.into_parts();
                (answer, format!("cannot wait for the answer: {e}"))
            }
        };
        let (answer, why) = failed;
        // Stuck or broken: kill the server (unless a fresh one replaced it meanwhile), then learn
        // whether it forked.
        {
            let mut state = self.lock();
            if state.generation == generation {
                state.running = None;
            }
        }
        let settled = tokio::task::spawn_blocking(move || settle(&answer))
            .await
            .unwrap_or_else(|e| Err(format!("settling: {e}")));
        settled.map_err(|then| format!("the fork server did not answer ({why}); {then}"))
    }

    fn start(&self) -> Result<Running, String> {
        let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socket pair: {e}"))?;
        ours.set_write_timeout(Some(ANSWER_LIMIT))
            .map_err(|e| format!("socket timeout: {e}"))?;
        let child = std::process::Command::new(&self.command[0])
            .args(&self.command[1..])
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .current_dir("/")
            // Its own group: a signal to the agent's group (Ctrl-C) leaves it to end by itself.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start `{}`: {e}", self.command.join(" ")))?;
        Ok(Running { sock: ours, child })
    }
}

/// After the server was killed: a child it forked answers within [`SETTLE_LIMIT`] or never (the
/// socket is shut first, so a late answer fails and its child exits without starting the task).
fn settle(answer: &UnixStream) -> Result<Forked, String> {
    let _ = answer.set_read_timeout(Some(SETTLE_LIMIT));
    match read_frame::<Answer>(answer) {
        Ok(Some((answer, fds))) => return forked(answer, fds),
        Ok(None) => return Err("no shim was forked".into()),
        Err(_) => {}
    }
    let _ = answer.shutdown(Shutdown::Read);
    let _ = answer.set_nonblocking(true);
    match read_frame::<Answer>(answer) {
        Ok(Some((answer, fds))) => forked(answer, fds),
        _ => Err("no shim answered; none will start".into()),
    }
}

fn forked(answer: Answer, fds: Vec<OwnedFd>) -> Result<Forked, String> {
    match answer {
        Answer::Forked { pid, start_ticks } => Ok(Forked {
            pid,
            start_ticks,
            pidfd: fds.into_iter().next(),
        }),
        Answer::Refused { error } => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Seek;

    fn answer_pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().unwrap()
    }

    #[test]
    fn a_frame_carries_its_value_and_descriptors_and_end_of_file_is_none() {
        let (a, b) = answer_pair();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"log").unwrap();
        let request = Request {
            shim_args: vec!["--exit-file".into(), "/x".into()],
            env: BTreeMap::from([("CUDA_VISIBLE_DEVICES".into(), "0,1".into())]),
        };
        let (_, spare) = answer_pair();
        write_frame(&a, &request, &[file.as_fd(), spare.as_fd()]).unwrap();
        let (got, fds) = read_frame::<Request>(&b).unwrap().expect("a frame");
        assert_eq!(got.shim_args, request.shim_args);
        assert_eq!(got.env, request.env);
        assert_eq!(fds.len(), 2, "both descriptors arrive");
        // The first is the same open file (its offset is shared).
        let mut log = File::from(fds.into_iter().next().unwrap());
        assert_eq!(log.stream_position().unwrap(), 3);
        drop(a);
        assert!(read_frame::<Request>(&b).unwrap().is_none(), "end-of-file");
    }

    #[test]
    fn a_frame_longer_than_the_limit_is_refused_without_reading_it() {
        let (a, b) = answer_pair();
        (&a).write_all(&(MAX_FRAME as u32 + 1).to_le_bytes())
            .unwrap();
        let err = read_frame::<Request>(&b).unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
    }

    #[test]
    fn a_large_frame_arrives_whole() {
        let (a, b) = answer_pair();
        let big = Request {
            shim_args: vec!["x".repeat(1 << 20)],
            env: BTreeMap::new(),
        };
        let writer = std::thread::spawn(move || write_frame(&a, &big, &[]).map(|()| big));
        let (got, fds) = read_frame::<Request>(&b).unwrap().unwrap();
        let big = writer.join().unwrap().unwrap();
        assert_eq!(got.shim_args, big.shim_args);
        assert!(fds.is_empty());
    }

    /// What a forked child does first: answer with its pid and pidfd.
    fn child_answers(sock: &UnixStream) -> io::Result<()> {
        let pidfd = pidfd_open(std::process::id() as i32);
        write_frame(
            sock,
            &Answer::Forked {
                pid: 42,
                start_ticks: 7,
            },
            pidfd.as_ref().map(AsFd::as_fd).as_slice(),
        )
    }

    #[test]
    fn settling_takes_an_answer_that_came_after_the_limit_passed() {
        let (ours, theirs) = answer_pair();
        child_answers(&theirs).unwrap();
        let forked = settle(&ours).unwrap();
        assert_eq!((forked.pid, forked.start_ticks), (42, 7));
        assert!(forked.pidfd.is_some(), "this kernel has pidfds");
    }

    #[test]
    fn settling_without_an_answer_means_no_shim_and_a_late_one_cannot_start() {
        // Every holder of the far end gone without an answer: nothing was forked.
        let (ours, theirs) = answer_pair();
        drop(theirs);
        assert_eq!(settle(&ours).unwrap_err(), "no shim was forked");

        // A child that holds the far end but has not answered by the limit: the driver shuts its
        // side, so the child's answer fails and it never starts the task.
        let (ours, theirs) = answer_pair();
        let err = settle(&ours).unwrap_err();
        assert!(err.contains("none will start"), "{err}");
        let late = child_answers(&theirs).unwrap_err();
        assert_eq!(late.kind(), io::ErrorKind::BrokenPipe, "{late}");
    }

    #[test]
    fn a_refusal_is_an_error_naming_why() {
        let (ours, theirs) = answer_pair();
        let refusal = Answer::Refused {
            error: "unknown flag `--bogus`".into(),
        };
        write_frame(&theirs, &refusal, &[]).unwrap();
        let (answer, fds) = read_frame::<Answer>(&ours).unwrap().unwrap();
        assert_eq!(forked(answer, fds).unwrap_err(), "unknown flag `--bogus`");
    }

    #[tokio::test]
    async fn a_driver_whose_server_cannot_start_gives_up_after_a_few_tries() {
        let server = ForkServer::new(&["/nonexistent/gangway-shim".into()], "/data".as_ref());
        let log = tempfile::tempfile().unwrap();
        for _ in 0..GIVE_UP_AFTER {
            let err = server
                .fork(vec![], BTreeMap::new(), &log)
                .await
                .unwrap_err();
            assert!(
                err.contains("/nonexistent/gangway-shim --fork-server /data"),
                "{err}"
            );
        }
        let err = server
            .fork(vec![], BTreeMap::new(), &log)
            .await
            .unwrap_err();
        assert!(err.contains("shims are executed"), "{err}");
    }
}
