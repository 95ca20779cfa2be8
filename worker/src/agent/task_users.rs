//! Who tasks run as: the operator's flags, checked once at start ([`TaskUsers::from_flags`]), and
//! the identity of each task ([`TaskUsers::identity_for`]).
//!
//! * `--task-user NAME`: every task runs as that account (its groups too).
//! * `--task-uid-range FIRST-LAST`: each job gets a uid of its own (see [`super::uid_range`]).
//! * `--task-user-for-queue QUEUE=NAME` (repeatable): that queue's tasks run as that account,
//!   whatever the default.
//! * `--task-groups G1,G2`: supplementary groups every task gets (the group owning `/dev/nvidia*`
//!   where the devices are not world-usable).
//! * `--task-user-same-as-agent`: tasks run as the agent's own user; for development only.
//!
//! There is no default: an agent started without one of these refuses to start, naming them. A
//! task never runs as root nor as the agent's user unless the operator said so with the last
//! flag, and only an agent running as root can switch users at all.

use super::accounts::{self, Account};
use super::uid_range::{Taken, UidRange};
use crate::driver::TaskIdentity;
use std::collections::BTreeMap;

/// The task-user flags of `gangway worker`, as given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskUserFlags {
    pub user: Option<String>,
    pub uid_range: Option<UidRange>,
    /// (queue, user name) pairs.
    pub per_queue: Vec<(String, String)>,
    /// Group names or numbers.
    pub groups: Vec<String>,
    pub same_as_agent: bool,
}

/// The checked policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskUsers {
    /// Tasks run as the agent's user (`--task-user-same-as-agent`).
    SameAsAgent,
    Isolated {
        default: DefaultUser,
        per_queue: BTreeMap<String, TaskIdentity>,
        /// `--task-groups`, added to every task's groups.
        groups: Vec<u32>,
    },
}

/// Who runs the tasks of queues without a user of their own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DefaultUser {
    Fixed(String, TaskIdentity),
    Range(UidRange),
}

const CHOICES: &str = "--task-user NAME (every task runs as that account), --task-uid-range \
    FIRST-LAST (each job runs as a uid of its own from a range no account or other service uses), \
    optionally with --task-user-for-queue QUEUE=NAME; or --task-user-same-as-agent (development \
    only: tasks could then write the lease file and the agent's state)";

impl TaskUsers {
    /// Checks the flags against the host's accounts and the agent's own uid (`agent_uid`).
    pub fn from_flags(f: &TaskUserFlags, agent_uid: u32) -> Result<TaskUsers, String> {
        let isolating = f.user.is_some() || f.uid_range.is_some() || !f.per_queue.is_empty();
        if f.same_as_agent {
            if isolating || !f.groups.is_empty() {
                return Err(
                    "--task-user-same-as-agent runs tasks as the agent's own user: it \
                            goes with none of --task-user, --task-uid-range, \
                            --task-user-for-queue, --task-groups"
                        .into(),
                );
            }
            return Ok(TaskUsers::SameAsAgent);
        }
        if agent_uid != 0 {
            return Err(format!(
                "the agent runs as {}, not root, so it cannot run tasks as another user: run it \
                 as root with --task-user or --task-uid-range, or pass --task-user-same-as-agent \
                 to run the tasks as {0} (they could then write the lease file and the agent's \
                 state)",
                accounts::agent_user()
            ));
        }
        let groups = f
            .groups
            .iter()
            .map(|g| accounts::group_id(g).map_err(|e| format!("--task-groups: {e}")))
            .collect::<Result<Vec<u32>, String>>()?;
        if groups.contains(&0) {
            return Err("--task-groups: group 0 (root's) is never given to tasks".into());
        }
        let default = match (&f.user, f.uid_range) {
            (Some(_), Some(_)) => {
                return Err(
                    "--task-user and --task-uid-range both name who runs tasks: give one".into(),
                )
            }
            (Some(name), None) => DefaultUser::Fixed(
                name.clone(),
                account_identity("--task-user", name, &groups, agent_uid)?,
            ),
            (None, Some(range)) => DefaultUser::Range(range),
            (None, None) => return Err(format!("name the user tasks run as: {CHOICES}")),
        };
        let per_queue = per_queue(&f.per_queue, &groups, agent_uid)?;
        if let DefaultUser::Range(range) = &default {
            for (queue, id) in &per_queue {
                if range.contains(id.uid) {
                    return Err(format!(
                        "--task-user-for-queue {queue}: uid {} lies in --task-uid-range {range}, \
                         whose uids go to single jobs",
                        id.uid
                    ));
                }
            }
            if groups.iter().any(|g| range.contains(*g)) {
                return Err(format!(
                    "--task-groups: a group lies in --task-uid-range {range}, whose numbers are \
                     the private groups of single jobs"
                ));
            }
        }
        Ok(TaskUsers::Isolated {
            default,
            per_queue,
            groups,
        })
    }

    /// The identity of a task of `job` in `queue`: `None` runs it as the agent's user.
    pub fn identity_for(
        &self,
        queue: &str,
        job: &str,
        taken: &Taken<'_>,
    ) -> Result<Option<TaskIdentity>, String> {
        let TaskUsers::Isolated {
            default,
            per_queue,
            groups,
        } = self
        else {
            return Ok(None);
        };
        if let Some(id) = per_queue.get(queue) {
            return Ok(Some(id.clone()));
        }
        match default {
            DefaultUser::Fixed(_, id) => Ok(Some(id.clone())),
            DefaultUser::Range(range) => {
                let uid = range.pick(job, taken)?;
                Ok(Some(TaskIdentity {
                    uid,
                    gid: uid,
                    groups: groups.clone(),
                }))
            }
        }
    }

    /// For the agent's start-up line.
    pub fn describe(&self) -> String {
        let TaskUsers::Isolated {
            default, per_queue, ..
        } = self
        else {
            return format!("as the agent's own user, {}", accounts::agent_user());
        };
        let mut out = match default {
            DefaultUser::Fixed(name, id) => format!("as user {name} ({id})"),
            DefaultUser::Range(range) => format!("as a uid of their own per job from {range}"),
        };
        for (queue, id) in per_queue {
            out.push_str(&format!("; queue {queue} as {id}"));
        }
        out
    }
}

fn per_queue(
    pairs: &[(String, String)],
    groups: &[u32],
    agent_uid: u32,
) -> Result<BTreeMap<String, TaskIdentity>, String> {
    let mut out = BTreeMap::new();
    for (queue, user) in pairs {
        let flag = format!("--task-user-for-queue {queue}={user}");
        let id = account_identity(&flag, user, groups, agent_uid)?;
        if out.insert(queue.clone(), id).is_some() {
            return Err(format!(
                "--task-user-for-queue: queue {queue} is given twice"
            ));
        }
    }
    Ok(out)
}

/// The identity of an existing account: its uid, primary group and groups, plus `extra`; never
/// root's uid or group, nor the agent's uid.
fn account_identity(
    flag: &str,
    name: &str,
    extra: &[u32],
    agent_uid: u32,
) -> Result<TaskIdentity, String> {
    let account: Account = accounts::user_by_name(name)
        .map_err(|e| format!("{flag}: {e}"))?
        .ok_or_else(|| format!("{flag}: no user named {name:?} on this host"))?;
    if account.uid == 0 || account.uid == agent_uid {
        return Err(format!(
            "{flag}: user {name} has uid {}, the agent's own{}: tasks must run as an unprivileged \
             user of their own",
            account.uid,
            if account.uid == 0 { " (root)" } else { "" }
        ));
    }
    let mut groups = accounts::groups_of(&account).map_err(|e| format!("{flag}: {e}"))?;
    groups.retain(|g| *g != account.gid);
    for g in extra {
        if !groups.contains(g) {
            groups.push(*g);
        }
    }
    let id = TaskIdentity {
        uid: account.uid,
        gid: account.gid,
        groups,
    };
    id.check().map_err(|e| format!("{flag}: {e}"))?;
    Ok(id)
}

/// `QUEUE=USER`, as `--task-user-for-queue` takes it.
pub fn parse_queue_user(s: &str) -> Result<(String, String), String> {
    let (queue, user) = s
        .split_once('=')
        .map(|(q, u)| (q.trim(), u.trim()))
        .filter(|(q, u)| !q.is_empty() && !u.is_empty())
        .ok_or_else(|| format!("expected QUEUE=USER, got {s:?}"))?;
    Ok((queue.to_owned(), user.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(s: &str) -> Option<UidRange> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn flags_that_cannot_work_are_refused_naming_the_flag() {
        let flags = |f: TaskUserFlags| TaskUsers::from_flags(&f, 0).unwrap_err();
        let none = TaskUserFlags::default();
        assert!(flags(none.clone()).contains("--task-uid-range FIRST-LAST"));
        let cases = [
            (
                TaskUserFlags {
                    same_as_agent: true,
                    uid_range: range("5-9"),
                    ..none.clone()
                },
                "goes with none",
            ),
            (
                TaskUserFlags {
                    user: Some("root".into()),
                    ..none.clone()
                },
                "--task-user: user root has uid 0",
            ),
            (
                TaskUserFlags {
                    user: Some("no-such-user-gw".into()),
                    ..none.clone()
                },
                "--task-user: no user named",
            ),
            (
                TaskUserFlags {
                    user: Some("x".into()),
                    uid_range: range("5-9"),
                    ..none.clone()
                },
                "give one",
            ),
            (
                TaskUserFlags {
                    uid_range: range("5-9"),
                    per_queue: vec![("a".into(), "root".into())],
                    ..none.clone()
                },
                "--task-user-for-queue a=root: user root has uid 0",
            ),
            (
                TaskUserFlags {
                    uid_range: range("5-9"),
                    groups: vec!["0".into()],
                    ..none.clone()
                },
                "group 0",
            ),
            (
                TaskUserFlags {
                    uid_range: range("5-9"),
                    groups: vec!["no-such-grp".into()],
                    ..none.clone()
                },
                "--task-groups: no group named",
            ),
        ];
        for (f, want) in cases {
            let err = flags(f.clone());
            assert!(err.contains(want), "{f:?}: {err}");
        }
        // An agent that is not root cannot switch users: it says so, and how to go on.
        let err = TaskUsers::from_flags(
            &TaskUserFlags {
                uid_range: range("5-9"),
                ..none.clone()
            },
            1000,
        )
        .unwrap_err();
        assert!(
            err.contains("not root") && err.contains("--task-user-same-as-agent"),
            "{err}"
        );
        let same = TaskUserFlags {
            same_as_agent: true,
            ..none
        };
        assert_eq!(
            TaskUsers::from_flags(&same, 1000),
            Ok(TaskUsers::SameAsAgent)
        );
    }

    #[test]
    fn a_range_gives_each_job_its_uid_with_a_private_group() {
        let f = TaskUserFlags {
            uid_range: range("3999000000-3999000009"),
            groups: vec!["44".into()],
            ..TaskUserFlags::default()
        };
        let users = TaskUsers::from_flags(&f, 0).unwrap();
        let by_job = BTreeMap::new();
        let no_accounts = |_: u32| false;
        let taken = Taken {
            by_job: &by_job,
            has_process: &no_accounts,
            has_account: &no_accounts,
        };
        let id = users.identity_for("any", "job-1", &taken).unwrap().unwrap();
        assert!(f.uid_range.unwrap().contains(id.uid));
        assert_eq!((id.gid, id.groups.clone()), (id.uid, vec![44]));
        assert_eq!(
            users.identity_for("other", "job-1", &taken).unwrap(),
            Some(id)
        );
        assert!(users.describe().contains("3999000000-3999000009"));
        assert_eq!(
            TaskUsers::SameAsAgent.identity_for("q", "j", &taken),
            Ok(None)
        );
    }

    #[test]
    fn queue_user_pairs_parse() {
        assert_eq!(
            parse_queue_user("research=alice"),
            Ok(("research".into(), "alice".into()))
        );
        for bad in ["research", "=alice", "research=", ""] {
            assert!(
                parse_queue_user(bad).unwrap_err().contains("QUEUE=USER"),
                "{bad}"
            );
        }
    }
}
