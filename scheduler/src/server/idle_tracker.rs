//! [`IdleTracker`]: how long each lease's devices have sat idle, kept in the leader's memory only.
//!
//! Utilization arrives with every heartbeat, far too often to replicate, so, like the heartbeat
//! clocks, idleness is leader memory: a new leader starts every lease's clock afresh and a lease is
//! never reclaimed on evidence gathered by another replica. What the leader concludes is committed
//! (`Command::IdleLease`, fenced by the lease epoch) and re-checked against the queue's policy there.
//!
//! A lease is idle for as long as *every* one of its devices has been below the threshold: one busy
//! device (one busy rank of a gang) keeps the whole lease. A device with no recent sample counts as
//! busy: the leader never takes a lease back for lack of evidence.

use gangway_proto::ids::{HostName, JobId};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One device of a lease: its host and index there.
pub type LeaseDevice = (HostName, u32);

/// The last time each device of one lease was seen busy (or first seen at all).
#[derive(Debug, Default)]
struct LeaseClock {
    busy_at: BTreeMap<LeaseDevice, Instant>,
}

#[derive(Debug, Default)]
pub struct IdleTracker {
    leases: Mutex<BTreeMap<(JobId, u64), LeaseClock>>,
}

impl IdleTracker {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(JobId, u64), LeaseClock>> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one round of samples for lease `epoch` of `job`: each device with its utilization in
    /// percent, `None` where no recent sample exists. Returns how long the whole lease has been
    /// idle: the shortest time since any of its devices was last busy (at or above `threshold_pct`).
    /// A device seen for the first time starts its clock now, so every lease gets a full window.
    pub fn observe(
        &self,
        job: &JobId,
        epoch: u64,
        samples: &[(LeaseDevice, Option<u32>)],
        threshold_pct: u32,
        now: Instant,
    ) -> Duration {
        let mut leases = self.lock();
        let clock = leases.entry((job.clone(), epoch)).or_default();
        let mut idle = Duration::MAX;
        for (device, utilization) in samples {
            let busy_at = clock.busy_at.entry(device.clone()).or_insert(now);
            if utilization.is_none_or(|u| u >= threshold_pct) {
                *busy_at = now;
            }
            idle = idle.min(now.saturating_duration_since(*busy_at));
        }
        if samples.is_empty() {
            Duration::ZERO
        } else {
            idle
        }
    }

    /// Forgets every lease not in `live` (ended, or no longer under an idle policy).
    pub fn retain(&self, live: &BTreeSet<(JobId, u64)>) {
        self.lock().retain(|k, _| live.contains(k));
    }

    /// Forgets everything: this replica stopped leading.
    pub fn clear(&self) {
        self.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(host: &str, index: u32) -> LeaseDevice {
        (HostName::new(host), index)
    }

    /// Table: a two-device lease (one device per host) sampled once per second with a 10% threshold;
    /// each row is what both devices report at that second and the idle time expected after it.
    #[test]
    fn a_lease_is_idle_only_while_every_device_is() {
        let tracker = IdleTracker::new();
        let job = JobId::new("j1");
        let t0 = Instant::now();
        let s = Duration::from_secs;
        /// second, device a's sample, device b's sample, idle time expected, why
        type Row = (u64, Option<u32>, Option<u32>, Duration, &'static str);
        let rows: &[Row] = &[
            (
                0,
                Some(0),
                Some(0),
                s(0),
                "first sight starts the clock: a full window of grace",
            ),
            (1, Some(0), Some(3), s(1), "both below the threshold"),
            (2, Some(0), Some(9), s(2), "9% is still below 10%"),
            (
                3,
                Some(0),
                Some(10),
                s(0),
                "at the threshold is busy: one busy rank keeps the lease",
            ),
            (
                4,
                Some(0),
                Some(0),
                s(1),
                "idle again, counted from the last busy sample",
            ),
            (5, None, Some(0), s(0), "no recent sample counts as busy"),
            (6, Some(2), Some(1), s(1), "evidence again"),
            (
                9,
                Some(2),
                Some(1),
                s(4),
                "and the clock runs while it stays idle",
            ),
        ];
        for (at, a, b, want, why) in rows {
            let got = tracker.observe(
                &job,
                7,
                &[(dev("h1", 0), *a), (dev("h2", 3), *b)],
                10,
                t0 + s(*at),
            );
            assert_eq!(got, *want, "t={at}s: {why}");
        }
    }

    #[test]
    fn a_new_lease_and_a_new_leadership_start_from_zero() {
        let tracker = IdleTracker::new();
        let job = JobId::new("j1");
        let t0 = Instant::now();
        let idle = [(dev("h1", 0), Some(0))];
        tracker.observe(&job, 1, &idle, 5, t0);
        assert_eq!(
            tracker.observe(&job, 1, &idle, 5, t0 + Duration::from_secs(30)),
            Duration::from_secs(30)
        );
        // The job re-leased under a new epoch: its idle time is not inherited.
        assert_eq!(
            tracker.observe(&job, 2, &idle, 5, t0 + Duration::from_secs(30)),
            Duration::ZERO
        );
        // Ended leases are forgotten; a new leader forgets everything.
        tracker.retain(&BTreeSet::from([(job.clone(), 2)]));
        assert_eq!(
            tracker.observe(&job, 1, &idle, 5, t0 + Duration::from_secs(40)),
            Duration::ZERO
        );
        tracker.clear();
        assert_eq!(
            tracker.observe(&job, 2, &idle, 5, t0 + Duration::from_secs(50)),
            Duration::ZERO
        );
        // A lease with no devices (CPU-only) is never idle.
        assert_eq!(
            tracker.observe(&job, 3, &[], 5, t0 + Duration::from_secs(60)),
            Duration::ZERO
        );
    }
}
