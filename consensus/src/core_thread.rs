//! [`CoreThread`]: the consensus layer's own thread and single-threaded runtime.
//!
//! A replicated write is a chain of hand-offs between tasks: openraft's core, its log and
//! state-machine workers, a replication stream per follower and each connection's task. On the
//! application's multi-threaded runtime each hand-off may wake another worker thread (a futex
//! wake and a cache miss per step); on one current-thread runtime of their own they run back to
//! back on one thread, as TiKV's raftstore keeps Raft off its gRPC threads. The application's
//! servers (the client and host APIs, and the Raft transport's server mounted beside them) stay
//! on its runtime; each of their calls into the core is one hop over the core's channels.
//!
//! What runs here must not block: the log's fsync has its own thread, snapshot files are
//! written on the blocking pool.

use std::future::Future;
use std::sync::Mutex;
use std::thread;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::error::ConsensusError;
use crate::error::Result;

/// One replica's consensus thread. Dropping it (or [`Self::stop`]) ends the runtime: every task
/// still on it is dropped, then the thread exits.
pub(crate) struct CoreThread {
    handle: Handle,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    exited: Mutex<Option<oneshot::Receiver<()>>>,
}

impl CoreThread {
    /// Start the thread (named after the replica) with its runtime.
    pub(crate) fn start(id: u64) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ConsensusError::Fatal(format!("consensus runtime: {e}")))?;
        let handle = rt.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let (exit_tx, exited) = oneshot::channel::<()>();
        thread::Builder::new()
            .name(format!("raft-{id}"))
            .spawn(move || {
                // The runtime runs its tasks only while this thread is inside `block_on`; a
                // dropped sender ends it as a sent stop does.
                let _ = rt.block_on(stopped);
                drop(rt);
                let _ = exit_tx.send(());
            })
            .map_err(|e| ConsensusError::Fatal(format!("consensus thread: {e}")))?;
        Ok(CoreThread {
            handle,
            stop: Mutex::new(Some(stop)),
            exited: Mutex::new(Some(exited)),
        })
    }

    /// The runtime's handle, to spawn onto it or to enter it.
    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Run `fut` on the consensus thread and wait for its output (from any runtime).
    pub(crate) async fn run<F>(&self, fut: F) -> Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle
            .spawn(fut)
            .await
            .map_err(|e| ConsensusError::Fatal(format!("consensus thread task: {e}")))
    }

    /// End the runtime and wait until the thread has dropped every task left on it (the raft
    /// log's lock among what they hold).
    pub(crate) async fn stop(&self) {
        // Dropping the sender ends the thread's `block_on`, as dropping `self` does (without
        // waiting for it).
        take(&self.stop);
        if let Some(exited) = take(&self.exited) {
            let _ = exited.await;
        }
    }
}

fn take<T>(slot: &Mutex<Option<T>>) -> Option<T> {
    slot.lock().unwrap_or_else(|p| p.into_inner()).take()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tasks_run_on_the_consensus_thread_and_stop_with_it() {
        let core = CoreThread::start(7).unwrap();
        let name = core
            .run(async { thread::current().name().map(str::to_owned) })
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("raft-7"));

        // A task still pending when the thread stops is dropped, not leaked.
        let (held_tx, held) = oneshot::channel::<()>();
        core.handle().spawn(async move {
            let _keep = held_tx;
            std::future::pending::<()>().await
        });
        core.stop().await;
        assert!(held.await.is_err(), "the pending task was dropped");
        assert!(
            core.run(async {}).await.is_err(),
            "a stopped runtime runs nothing"
        );
    }
}
