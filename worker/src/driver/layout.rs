//! Who owns what under the driver's `data_dir`, so that tasks running as other users can reach
//! their own working directory and nothing else:
//!
//! | path                                | owner  | mode                                   |
//! |-------------------------------------|--------|----------------------------------------|
//! | `data_dir`, `tasks/`, `tasks/<job>` | agent  | 0711: passable, not listable           |
//! | `tasks/<job>/task-<n>`              | agent  | 0711 while the task runs, 0700 after   |
//! | `tasks/<job>/task-<n>/exit-<E>.json`| agent  | 0600 (the shim's exit file; earlier    |
//! |                                     |        | agents wrote `epoch-<E>/exit.json`,    |
//! |                                     |        | still read: records name the path)     |
//! | `tasks/<job>/task-<n>/work`         | task   | 0700 (the task's working directory)    |
//! | `logs/`, `logs/<job>`, task logs    | agent  | 0700, logs 0600 (the task writes its   |
//! |                                     |        | log through the descriptor it inherits)|
//! | lease file, agent state             | agent  | 0644, 0600, in the 0711 `data_dir`     |
//!
//! A task directory closes (0700) when its task ends, so whoever gets the same uid later (task
//! uids are reused, see the agent's `task_users`) cannot reach what an earlier job left there.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{DriverError, TaskIdentity};

/// Passable by tasks, not listable: they reach their own directory by its name only.
pub(crate) const PASSABLE: u32 = 0o711;
/// The agent's (or, for a working directory, the task's) alone.
pub(crate) const PRIVATE: u32 = 0o700;

/// Creates `dir` (and its parents) and sets its mode.
pub(crate) fn ensure_dir(dir: &Path, mode: u32) -> Result<(), DriverError> {
    fs::create_dir_all(dir).map_err(|e| DriverError::io("creating directory", dir, e))?;
    set_mode(dir, mode)
}

pub(crate) fn set_mode(path: &Path, mode: u32) -> Result<(), DriverError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| DriverError::io("setting the mode of", path, e))
}

/// The task's working directory `<task_dir>/work`, owned by `identity` (the agent's user when
/// none) with mode 0700. One left by another user (an earlier run under another uid) is moved
/// aside, inside the closed task directory, and a fresh one made: its files stay out of reach.
pub(crate) fn work_dir(
    task_dir: &Path,
    identity: Option<&TaskIdentity>,
) -> Result<PathBuf, DriverError> {
    let work = task_dir.join("work");
    let (uid, gid) = match identity {
        Some(id) => (id.uid, id.gid),
        // SAFETY: geteuid and getegid cannot fail and touch no memory.
        None => unsafe { (libc::geteuid(), libc::getegid()) },
    };
    match fs::symlink_metadata(&work) {
        Ok(meta) if meta.is_dir() && meta.uid() == uid => {}
        Ok(meta) => {
            let aside = task_dir.join(format!("work.uid-{}-{}", meta.uid(), unique()));
            fs::rename(&work, &aside).map_err(|e| {
                DriverError::io("moving aside another user's working directory", &work, e)
            })?;
            create_owned(&work, uid, gid)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => create_owned(&work, uid, gid)?,
        Err(e) => return Err(DriverError::io("reading", &work, e)),
    }
    Ok(work)
}

/// Hands a directory the agent made (a job's checkpoint directory) to the task's user: created if
/// missing, then chowned when the agent owns it. One another user already owns is left as it is
/// (`Ok(Some(owner))`): the caller says so, since the task may not be able to write it.
pub fn hand_over_dir(dir: &Path, identity: &TaskIdentity) -> io::Result<Option<u32>> {
    fs::create_dir_all(dir)?;
    let meta = fs::symlink_metadata(dir)?;
    // SAFETY: geteuid cannot fail and touches no memory.
    let agent = unsafe { libc::geteuid() };
    if meta.uid() == identity.uid {
        return Ok(None);
    }
    if meta.uid() != agent || !meta.is_dir() {
        return Ok(Some(meta.uid()));
    }
    std::os::unix::fs::lchown(dir, Some(identity.uid), Some(identity.gid))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(PRIVATE))?;
    Ok(None)
}

fn create_owned(dir: &Path, uid: u32, gid: u32) -> Result<(), DriverError> {
    fs::create_dir(dir).map_err(|e| DriverError::io("creating directory", dir, e))?;
    // lchown: nothing but the agent writes in the task directory, so `work` is the directory we
    // just made; still, never follow a link.
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))
        .map_err(|e| DriverError::io("handing to the task's user", dir, e))?;
    set_mode(dir, PRIVATE)
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_work_dir_is_private_and_one_of_another_user_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let task = dir.path().join("task-0");
        ensure_dir(&task, PASSABLE).unwrap();
        assert_eq!(mode(&task), 0o711);
        let work = work_dir(&task, None).unwrap();
        assert_eq!(mode(&work), 0o700);
        fs::write(work.join("cache"), b"kept").unwrap();
        // The same user again: the same directory, contents and all.
        assert_eq!(work_dir(&task, None).unwrap(), work);
        assert!(work.join("cache").exists());
        // Another user (only root can hand it over; elsewhere the chown fails, loudly).
        let other = TaskIdentity {
            uid: 64_123,
            gid: 64_123,
            groups: vec![],
        };
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            assert!(work_dir(&task, Some(&other)).is_err());
            println!("skipped the chown half: not running as root");
            return;
        }
        let work = work_dir(&task, Some(&other)).unwrap();
        let meta = fs::metadata(&work).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), mode(&work)),
            (64_123, 64_123, 0o700)
        );
        assert!(!work.join("cache").exists(), "a fresh directory");
        let aside: Vec<_> = fs::read_dir(&task)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("work.uid-0-"))
            .collect();
        assert_eq!(
            aside.len(),
            1,
            "the old one kept aside, in the task directory"
        );
    }
}
