//! [`TaskIdentity`]: the user a task runs as.
//!
//! The shim stays the agent's user (root), so it can still read the lease file, kill the task by
//! the deadline and write the exit file; only the task's process switches, between `fork` and
//! `exec`: supplementary groups, then the group, then the user (real, effective and saved ids,
//! which from root also drops every capability). Root's uid and group are refused here whatever
//! the configuration said: a task never runs with them.

use std::io;
use std::os::unix::process::CommandExt;

use serde::{Deserialize, Serialize};

/// Who a task runs as.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TaskIdentity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (e.g. the group owning `/dev/nvidia*` where it is not world-usable).
    #[serde(default)]
    pub groups: Vec<u32>,
}

impl TaskIdentity {
    /// Refuses uid 0, gid 0 and group 0 among the supplementary groups.
    pub fn check(&self) -> Result<(), String> {
        if self.uid == 0 {
            return Err("a task never runs as uid 0 (root)".into());
        }
        if self.gid == 0 || self.groups.contains(&0) {
            return Err(format!(
                "a task never runs with group 0 (root's): uid {} has gid {} and groups {:?}",
                self.uid, self.gid, self.groups
            ));
        }
        Ok(())
    }

    /// The shim's flags for this identity: `--uid N --gid N [--groups A,B]`.
    pub(crate) fn to_args(&self) -> Vec<String> {
        let mut out = vec![
            "--uid".to_string(),
            self.uid.to_string(),
            "--gid".to_string(),
            self.gid.to_string(),
        ];
        if !self.groups.is_empty() {
            let groups: Vec<String> = self.groups.iter().map(u32::to_string).collect();
            out.push("--groups".into());
            out.push(groups.join(","));
        }
        out
    }

    /// The identity the shim's `--uid`, `--gid` and `--groups` name: none without them; `--uid`
    /// and `--gid` go together.
    pub(crate) fn from_flags(
        uid: Option<String>,
        gid: Option<String>,
        groups: Option<String>,
    ) -> Result<Option<TaskIdentity>, String> {
        let number = |flag: &str, text: &str| {
            text.parse::<u32>()
                .map_err(|_| format!("`{flag}` wants a numeric id, got `{text}`"))
        };
        let (uid, gid) = match (uid, gid) {
            (None, None) if groups.is_none() => return Ok(None),
            (Some(u), Some(g)) => (number("--uid", &u)?, number("--gid", &g)?),
            _ => return Err("`--uid` and `--gid` go together (and `--groups` needs them)".into()),
        };
        let groups = match groups {
            None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|g| number("--groups", g))
                .collect::<Result<_, _>>()?,
        };
        let identity = TaskIdentity { uid, gid, groups };
        identity.check()?;
        Ok(Some(identity))
    }

    /// Makes `command`'s child switch to this identity just before `exec`.
    pub(crate) fn apply(&self, command: &mut std::process::Command) {
        let TaskIdentity { uid, gid, groups } = self.clone();
        // SAFETY: the closure runs in the forked child before exec and only makes system calls
        // (setgroups, setresgid, setresuid, setuid) on memory it owns: no allocation, no lock.
        unsafe {
            command.pre_exec(move || {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setresgid(gid, gid, gid) != 0
                    || libc::setresuid(uid, uid, uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                // Dropped for good: root's uid must be out of reach now.
                if libc::setuid(0) == 0 {
                    return Err(io::Error::from_raw_os_error(libc::EPERM));
                }
                Ok(())
            });
        }
    }
}

impl std::fmt::Display for TaskIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "uid {} gid {}", self.uid, self.gid)?;
        if !self.groups.is_empty() {
            write!(f, " groups {:?}", self.groups)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(
        uid: Option<&str>,
        gid: Option<&str>,
        groups: Option<&str>,
    ) -> Result<Option<TaskIdentity>, String> {
        let s = |v: Option<&str>| v.map(str::to_owned);
        TaskIdentity::from_flags(s(uid), s(gid), s(groups))
    }

    #[test]
    fn flags_round_trip_and_root_is_refused() {
        let id = TaskIdentity {
            uid: 61000,
            gid: 61000,
            groups: vec![44, 109],
        };
        let args = id.to_args();
        assert_eq!(
            args,
            ["--uid", "61000", "--gid", "61000", "--groups", "44,109"]
        );
        assert_eq!(
            flags(Some("61000"), Some("61000"), Some("44,109")),
            Ok(Some(id))
        );
        assert_eq!(flags(None, None, None), Ok(None));
        for (uid, gid, groups, want) in [
            (Some("0"), Some("5"), None, "uid 0"),
            (Some("5"), Some("0"), None, "group 0"),
            (Some("5"), Some("5"), Some("7,0"), "group 0"),
            (Some("5"), None, None, "go together"),
            (None, None, Some("7"), "go together"),
            (
                Some("x"),
                Some("5"),
                None,
                "`--uid` wants a numeric id, got `x`",
            ),
            (Some("5"), Some("5"), Some("7,,8"), "`--groups`"),
        ] {
            let err = flags(uid, gid, groups).unwrap_err();
            assert!(err.contains(want), "{uid:?} {gid:?} {groups:?}: {err}");
        }
    }
}
