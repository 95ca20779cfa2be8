//! [`GroupCommit`]: one write of the agent's state file for every change made while the previous
//! write was under way, instead of one write (and two fsyncs) per change.
//!
//! A caller changes the state, then commits. The write it waits for must have taken its snapshot
//! after the change: each commit counts a change, and a write records how many changes had been
//! counted before its snapshot was taken. A commit whose change that count already covers, by a
//! write that succeeded, returns at once; the others write (one at a time), each writing all that
//! was counted before it. A failed write covers nothing, so the next commit writes again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct GroupCommit {
    /// Changes counted so far.
    changes: AtomicU64,
    /// Changes the newest successful write covers. Held while writing: writes are one at a time.
    durable: Mutex<u64>,
}

impl GroupCommit {
    /// Makes the change the caller just made durable: `snapshot` reads the state, `write` writes
    /// it. Ok(true) when this call wrote, Ok(false) when a write begun after the change had.
    pub fn commit<S, E>(
        &self,
        snapshot: impl FnOnce() -> S,
        write: impl FnOnce(S) -> Result<(), E>,
    ) -> Result<bool, E> {
        let mine = self.changes.fetch_add(1, Ordering::SeqCst) + 1;
        let mut durable = self.durable.lock().unwrap_or_else(|p| p.into_inner());
        if *durable >= mine {
            return Ok(false);
        }
        // Read before the snapshot: every change counted here was made before it was counted,
        // so the snapshot holds it (it may hold later ones too, which are then written twice).
        let covers = self.changes.load(Ordering::SeqCst);
        write(snapshot())?;
        *durable = covers;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{mpsc, Arc};
    use std::time::Duration;

    /// A write held open until released, announcing that it has begun.
    struct Hold {
        begun: mpsc::Sender<()>,
        release: mpsc::Receiver<()>,
    }

    fn change_and_commit(
        gc: &GroupCommit,
        state: &Mutex<u32>,
        written: &Mutex<Vec<u32>>,
        hold: Option<Hold>,
    ) -> bool {
        *state.lock().unwrap() += 1;
        gc.commit(
            || *state.lock().unwrap(),
            |s| {
                if let Some(h) = hold {
                    h.begun.send(()).unwrap();
                    h.release.recv().unwrap();
                }
                written.lock().unwrap().push(s);
                Ok::<(), ()>(())
            },
        )
        .unwrap()
    }

    /// Commits made while a write is under way are all covered by one more write; a failed write
    /// covers none.
    #[test]
    fn changes_made_during_a_write_share_the_next_one() {
        let gc = Arc::new(GroupCommit::default());
        let state = Arc::new(Mutex::new(0u32));
        let written = Arc::new(Mutex::new(Vec::new()));
        let spawn = |hold: Option<Hold>| {
            let (gc, state, written) = (gc.clone(), state.clone(), written.clone());
            std::thread::spawn(move || change_and_commit(&gc, &state, &written, hold))
        };
        // A first change whose write is held open once begun.
        let (begun, started) = mpsc::channel();
        let (release, held) = mpsc::channel();
        let first = spawn(Some(Hold {
            begun,
            release: held,
        }));
        started.recv().unwrap();
        // Four more changes arrive while it writes; they wait for it.
        let later: Vec<_> = (0..4).map(|_| spawn(None)).collect();
        while gc.changes.load(Ordering::SeqCst) < 5 {
            std::thread::sleep(Duration::from_millis(1));
        }
        release.send(()).unwrap();
        assert!(
            first.join().unwrap(),
            "the first change is written by its own commit"
        );
        let wrote: usize = later
            .into_iter()
            .map(|t| usize::from(t.join().unwrap()))
            .sum();
        assert_eq!(wrote, 1, "one write covers the four later changes");
        let written = written.lock().unwrap().clone();
        assert_eq!(
            written,
            vec![1, 5],
            "the first write holds the first change, the second all"
        );

        // A failed write covers nothing: the next commit writes again, with both changes.
        let gc = GroupCommit::default();
        assert_eq!(gc.commit(|| 1, |_| Err("disk full")), Err("disk full"));
        let mut seen = None;
        let wrote = gc.commit(
            || 2,
            |s| {
                seen = Some(s);
                Ok::<(), &str>(())
            },
        );
        assert_eq!((wrote, seen), (Ok(true), Some(2)));
    }
}
