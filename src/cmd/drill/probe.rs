//! [`Probes`]: the small jobs a drill writes while it runs, to see what clients see during a
//! failover: which writes fail and must be retried, whether an idempotent retry ever creates a job
//! twice, and how soon a new leader places work.
//!
//! A probe is a CPU-only job at the lowest priority (it never preempts anyone and fits beside any
//! workload) named `drill-probe-RUN-TAG`, submitted with an idempotency key and cancelled again.

use super::report::{WriteStats, PROBE_PREFIX};
use crate::client::{Client, ClientError};
use gangway_proto::pb;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How long one write attempt may take before the probe counts it failed and tries again (the
/// client moves on to the next replica).
const ATTEMPT: Duration = Duration::from_secs(2);
/// Pause between attempts, and between probe polls.
const PAUSE: Duration = Duration::from_millis(100);
/// Pause between two submit-and-cancel rounds of the write load.
const LOAD_INTERVAL: Duration = Duration::from_millis(250);

/// The spec of one probe job.
pub fn probe_spec(name: &str, queue: &str) -> String {
    format!(
        "name = \"{name}\"\nqueue = \"{queue}\"\npriority = -1000000\n\
         command = [\"sleep\", \"600\"]\n[resources]\ndevices = 0\n"
    )
}

/// When a write stops being retried: at `hard`, or `grace` after the load was told to stop.
pub struct Budget {
    hard: Instant,
    stop: Option<(watch::Receiver<bool>, Duration)>,
    stopped_at: Option<Instant>,
}

impl Budget {
    pub fn until(hard: Instant) -> Self {
        Self {
            hard,
            stop: None,
            stopped_at: None,
        }
    }

    fn expired(&mut self) -> bool {
        let now = Instant::now();
        if now >= self.hard {
            return true;
        }
        if let Some((rx, grace)) = &self.stop {
            if *rx.borrow() {
                let at = *self.stopped_at.get_or_insert(now);
                return now >= at + *grace;
            }
        }
        false
    }
}

/// Whether a probe was placed, and when.
pub enum Placement {
    Placed(Instant),
    /// Not placed before the deadline: the last pending reason.
    NotPlaced(String),
}

/// The probes of one drill run.
pub struct Probes {
    run: String,
    queue: String,
    addrs: Vec<String>,
    stats: Mutex<WriteStats>,
}

impl Probes {
    pub fn new(run: String, queue: String, addrs: Vec<String>) -> Self {
        Self {
            run,
            queue,
            addrs,
            stats: Mutex::new(WriteStats::default()),
        }
    }

    /// A client whose every call gives up after one [`ATTEMPT`]; it keeps its connection and
    /// its place in the address list across writes, like a long-lived application client.
    pub fn client(&self) -> Client {
        self.client_from(0)
    }

    /// A client that starts at the `n`-th address: after a failed attempt a probe starts over one
    /// replica further, as a careful client would, instead of asking a cut-off replica again.
    fn client_from(&self, n: usize) -> Client {
        let mut addrs = self.addrs.clone();
        if !addrs.is_empty() {
            let len = addrs.len();
            addrs.rotate_left(n % len);
        }
        Client::new(addrs, ATTEMPT)
    }

    fn name(&self, tag: &str) -> String {
        format!("{PROBE_PREFIX}{}-{tag}", self.run)
    }

    pub fn stats(&self) -> WriteStats {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Forgets the writes so far (the baseline probe's, made before the load).
    pub fn reset_stats(&self) {
        self.count(|s| *s = WriteStats::default());
    }

    fn count(&self, f: impl FnOnce(&mut WriteStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Records how one write ended after `failures` failed attempts.
    fn settle(&self, acknowledged: bool, failures: u32) {
        self.count(|s| {
            if acknowledged {
                s.acknowledged += 1;
                if failures > 0 {
                    s.retried += 1;
                }
            } else {
                s.unacknowledged += 1;
            }
        });
    }

    /// Submits probe `tag`, resending with the same idempotency key until acknowledged or out of
    /// budget; returns the job id.
    pub async fn submit(
        &self,
        client: &mut Client,
        tag: &str,
        mut budget: Budget,
    ) -> Option<String> {
        let spec = probe_spec(&self.name(tag), &self.queue);
        let key = format!("gangway-drill-{}-{tag}", self.run);
        let mut failures = 0;
        loop {
            match client.submit_job(&spec, &key).await {
                Ok(r) => {
                    self.settle(true, failures);
                    return Some(r.job_id);
                }
                Err(_) => {
                    failures += 1;
                    self.count(|s| s.failed_attempts += 1);
                    *client = self.client_from(failures as usize);
                }
            }
            if budget.expired() {
                self.settle(false, failures);
                return None;
            }
            tokio::time::sleep(PAUSE).await;
        }
    }

    /// Cancels a probe until acknowledged or out of budget. `wrong_job_state` counts as done: an
    /// earlier attempt whose answer was lost already cancelled it.
    async fn cancel(
        &self,
        client: &mut Client,
        job_id: &str,
        mut budget: Budget,
        counted: bool,
    ) -> bool {
        let mut failures = 0;
        loop {
            match client.cancel_job(job_id, "gangway drill probe").await {
                Ok(()) => break,
                Err(ClientError::Server {
                    gangway_code: Some(code),
                    ..
                }) if code == "wrong_job_state" => break,
                Err(_) => {
                    failures += 1;
                    if counted {
                        self.count(|s| s.failed_attempts += 1);
                    }
                    *client = self.client_from(failures as usize);
                }
            }
            if budget.expired() {
                if counted {
                    self.settle(false, failures);
                }
                return false;
            }
            tokio::time::sleep(PAUSE).await;
        }
        if counted {
            self.settle(true, failures);
        }
        true
    }

    /// Polls a probe until it is placed or `deadline` passes.
    pub async fn wait_placed(
        &self,
        client: &mut Client,
        job_id: &str,
        deadline: Instant,
    ) -> Placement {
        let mut reason = "no answer from the cluster".to_owned();
        let mut errors = 0;
        loop {
            match client.get_job(job_id).await {
                Ok(detail) => {
                    let s = detail.summary.unwrap_or_default();
                    match s.state() {
                        // Placed (and perhaps already ended): it held a lease.
                        pb::JobState::Running | pb::JobState::Succeeded | pb::JobState::Failed => {
                            return Placement::Placed(Instant::now())
                        }
                        pb::JobState::Cancelled => {
                            return Placement::NotPlaced("the probe was cancelled".into())
                        }
                        _ if !s.pending_reason.is_empty() => reason = s.pending_reason,
                        _ => {}
                    }
                }
                Err(_) => {
                    errors += 1;
                    *client = self.client_from(errors);
                }
            }
            if Instant::now() >= deadline {
                return Placement::NotPlaced(reason);
            }
            tokio::time::sleep(PAUSE).await;
        }
    }

    /// Cancels one probe outside the measured load (baseline and placement probes).
    pub async fn discard(&self, client: &mut Client, job_id: &str, deadline: Instant) -> bool {
        self.cancel(client, job_id, Budget::until(deadline), false)
            .await
    }

    /// The write load: a probe submitted and cancelled every [`LOAD_INTERVAL`] until `stop`
    /// turns true; a write under way then gets `grace` more to be acknowledged.
    pub async fn load(self: Arc<Self>, stop: watch::Receiver<bool>, grace: Duration) {
        let far = Instant::now() + Duration::from_secs(24 * 3600);
        let budget = || Budget {
            hard: far,
            stop: Some((stop.clone(), grace)),
            stopped_at: None,
        };
        let mut client = self.client();
        let mut n = 0u32;
        while !*stop.borrow() {
            n += 1;
            if let Some(id) = self.submit(&mut client, &n.to_string(), budget()).await {
                self.cancel(&mut client, &id, budget(), true).await;
            }
            let mut s = stop.clone();
            tokio::select! {
                _ = tokio::time::sleep(LOAD_INTERVAL) => {}
                _ = s.wait_for(|v| *v) => {}
            }
        }
    }

    /// Cancels every probe of this run that is still pending or running, and counts probe jobs
    /// created twice for one idempotency key. Returns (probes left behind, duplicates).
    pub async fn cleanup(&self, deadline: Instant) -> Result<(Vec<String>, u32), ClientError> {
        let prefix = format!("{PROBE_PREFIX}{}-", self.run);
        let mut client = Client::new(
            self.addrs.clone(),
            deadline.saturating_duration_since(Instant::now()),
        );
        let jobs = client.list_jobs(&[], "", false, None).await?;
        let mut probe_client = self.client();
        let mut per_name: BTreeMap<&str, u32> = BTreeMap::new();
        let mut left = Vec::new();
        for j in jobs.iter().filter(|j| j.name.starts_with(&prefix)) {
            *per_name.entry(j.name.as_str()).or_default() += 1;
            if matches!(j.state(), pb::JobState::Pending | pb::JobState::Running)
                && !self
                    .cancel(&mut probe_client, &j.id, Budget::until(deadline), false)
                    .await
            {
                left.push(j.id.clone());
            }
        }
        let duplicates = per_name.values().map(|n| n - 1).sum();
        self.count(|s| s.duplicate_jobs = duplicates);
        Ok((left, duplicates))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_spec_is_a_valid_cpu_only_job_that_never_preempts() {
        let spec = gangway_proto::spec::JobSpec::from_toml_str(&probe_spec(
            "drill-probe-0a1b2c3d-17",
            "default",
        ))
        .expect("valid spec");
        assert_eq!(spec.name, "drill-probe-0a1b2c3d-17");
        assert_eq!(spec.priority, -1_000_000);
        assert_eq!(
            spec.resources.devices,
            gangway_proto::spec::DeviceCount::None
        );
    }

    #[tokio::test]
    async fn a_budget_ends_at_its_deadline_or_a_grace_after_stop() {
        let mut b = Budget::until(Instant::now());
        assert!(b.expired());
        let (tx, rx) = watch::channel(false);
        let mut b = Budget {
            hard: Instant::now() + Duration::from_secs(60),
            stop: Some((rx, Duration::from_millis(20))),
            stopped_at: None,
        };
        assert!(!b.expired());
        tx.send(true).unwrap();
        assert!(!b.expired(), "the grace starts when the stop is seen");
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(b.expired());
    }
}
