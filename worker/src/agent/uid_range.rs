//! `--task-uid-range FIRST-LAST`: each job's tasks on this host get a uid of their own, with a
//! private group of the same number (as systemd's `DynamicUser=` does), so tasks of different
//! jobs cannot signal each other or open each other's files.
//!
//! One uid per *job*, not per task: ranks of one gang on one host share memory and files (NCCL's
//! shared-memory transport, CUDA IPC). A job's uid starts from a place its id hashes to, so the
//! same job usually gets the same uid on every host (files on shared checkpoint storage keep one
//! owner); a uid is passed over while a running task of another job holds it, while any process
//! on the host runs as it, or while an account or group of the host has that number.

use std::collections::BTreeMap;

/// The most uids one range may span (each pick may probe all of them).
pub const MAX_RANGE_LEN: u32 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

/// What a pick must avoid, read just before it.
pub struct Taken<'a> {
    /// The uids the running (or starting) tasks hold, with their job.
    pub by_job: &'a BTreeMap<u32, String>,
    /// Whether a process of the host runs as this uid (asked only when a fresh uid is picked:
    /// answering reads every process's status in /proc).
    pub has_process: &'a dyn Fn(u32) -> bool,
    /// Whether an account or a group of the host has this number.
    pub has_account: &'a dyn Fn(u32) -> bool,
}

impl std::str::FromStr for UidRange {
    type Err = String;

    /// `FIRST-LAST`, inclusive, above 0, at most [`MAX_RANGE_LEN`] uids.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("expected FIRST-LAST, two uids such as 200000-200999, got {s:?}");
        let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
        let (first, last): (u32, u32) = (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        if first == 0 || first > last {
            return Err(format!(
                "expected 0 < FIRST <= LAST (uid 0 is root's), got {first}-{last}"
            ));
        }
        if last - first >= MAX_RANGE_LEN {
            return Err(format!(
                "a range spans at most {MAX_RANGE_LEN} uids, got {}",
                u64::from(last - first) + 1
            ));
        }
        Ok(UidRange { first, last })
    }
}

impl std::fmt::Display for UidRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl UidRange {
    pub fn contains(&self, uid: u32) -> bool {
        (self.first..=self.last).contains(&uid)
    }

    fn len(&self) -> u32 {
        self.last - self.first + 1
    }

    /// The uid for `job`'s next task: the one its running tasks hold, else the first free one
    /// from its hash place on.
    pub fn pick(&self, job: &str, taken: &Taken<'_>) -> Result<u32, String> {
        if let Some((uid, _)) = taken.by_job.iter().find(|(_, j)| *j == job) {
            return Ok(*uid);
        }
        let start = fnv1a(job.as_bytes()) % u64::from(self.len());
        for i in 0..u64::from(self.len()) {
            let uid = self.first + ((start + i) % u64::from(self.len())) as u32;
            let used = taken.by_job.contains_key(&uid)
                || (taken.has_process)(uid)
                || (taken.has_account)(uid);
            if !used {
                return Ok(uid);
            }
        }
        Err(format!(
            "no free uid in --task-uid-range {self}: {} are held by running tasks, the others by \
             other processes or by accounts of this host; widen the range",
            taken.by_job.len()
        ))
    }
}

/// FNV-1a, 64 bits: a stable place in the range for a job id, the same on every host.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_or_say_what_is_wrong() {
        assert_eq!(
            "200000-200999".parse::<UidRange>().unwrap(),
            UidRange {
                first: 200_000,
                last: 200_999
            }
        );
        assert_eq!("7-7".parse::<UidRange>().unwrap().len(), 1);
        for (bad, want) in [
            ("0-10", "uid 0"),
            ("10-5", "FIRST <= LAST"),
            ("10", "FIRST-LAST"),
            ("a-b", "FIRST-LAST"),
            ("1-4000000", "at most"),
        ] {
            let err = bad.parse::<UidRange>().unwrap_err();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }

    #[test]
    fn a_job_keeps_its_uid_and_never_shares_one_with_anything_else() {
        let range = UidRange {
            first: 100,
            last: 103,
        };
        let mut by_job = BTreeMap::new();
        let processes = |uid: u32| uid == 101;
        let accounts = |uid: u32| uid == 102;
        let taken = |by_job: &BTreeMap<u32, String>| {
            let t = Taken {
                by_job,
                has_process: &processes,
                has_account: &accounts,
            };
            let mut picks = Vec::new();
            for job in ["a", "b", "a"] {
                picks.push(range.pick(job, &t));
            }
            picks
        };
        // Nothing running: a job's pick depends on its id only, and skips the busy uids.
        let first = taken(&by_job);
        assert_eq!(first[0], first[2]);
        for pick in first.iter().flatten() {
            assert!([100, 103].contains(pick), "{pick}");
        }
        // "a" runs on 100: "a" keeps it, "b" gets the one uid left.
        by_job.insert(100, "a".to_owned());
        assert_eq!(taken(&by_job), vec![Ok(100), Ok(103), Ok(100)]);
        // Both free uids held: a third job is refused with a reason.
        by_job.insert(103, "b".to_owned());
        let t = Taken {
            by_job: &by_job,
            has_process: &processes,
            has_account: &accounts,
        };
        let err = range.pick("c", &t).unwrap_err();
        assert!(
            err.contains("no free uid in --task-uid-range 100-103"),
            "{err}"
        );
        assert_eq!(range.pick("b", &t), Ok(103));
    }
}
