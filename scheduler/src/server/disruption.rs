//! The defragmenter's disruption budget: device-hours of checkpoint-and-restore its migrations
//! cost over the last hour, kept in leader memory.
//!
//! Rebuilt empty on every leadership change (like the heartbeat clocks): a new leader may spend one
//! fresh hour's budget at once, which bounds the worst case at twice the budget per hour.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(3600);

#[derive(Default)]
pub struct DisruptionLedger {
    spent: Mutex<VecDeque<(Instant, f64)>>,
}

impl DisruptionLedger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Device-hours spent in the hour before `now`.
    pub fn spent_last_hour(&self, now: Instant) -> f64 {
        let mut spent = self.spent.lock().unwrap_or_else(|p| p.into_inner());
        while spent
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= WINDOW)
        {
            spent.pop_front();
        }
        spent.iter().map(|(_, h)| h).sum()
    }

    pub fn record(&self, at: Instant, device_hours: f64) {
        self.spent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back((at, device_hours));
    }

    /// Forgets everything (a new term).
    pub fn clear(&self) {
        self.spent.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spending_counts_for_one_hour_then_drops_out() {
        let ledger = DisruptionLedger::new();
        let t0 = Instant::now();
        ledger.record(t0, 1.5);
        ledger.record(t0 + Duration::from_secs(1800), 0.5);
        assert_eq!(ledger.spent_last_hour(t0 + Duration::from_secs(1800)), 2.0);
        assert_eq!(ledger.spent_last_hour(t0 + Duration::from_secs(3600)), 0.5);
        assert_eq!(ledger.spent_last_hour(t0 + Duration::from_secs(5400)), 0.0);
        ledger.record(t0, 3.0);
        ledger.clear();
        assert_eq!(ledger.spent_last_hour(t0), 0.0);
    }
}
