//! How the allocation stream's failures are told: every failure has a reason in the log, at warn
//! (error when the set cannot be delivered at all, which no reconnection fixes), once per run of
//! the same reason so a failing stream does not flood the log, and its recovery once.

use std::time::Duration;

/// How long to wait before asking again for a set that could not be delivered (it stays too
/// large until the state changes; asking every half second would only repeat the error).
pub const UNDELIVERABLE_RETRY: Duration = Duration::from_secs(5);

/// The stream's failures since it last delivered a set.
#[derive(Debug, Default)]
pub struct StreamTrouble {
    /// The reason last logged, and how many times it repeated since.
    last: Option<(String, u64)>,
}

impl StreamTrouble {
    /// Logs a failure of the stream (`what`: opening it, or reading from it); returns how long to
    /// wait at least before the next attempt.
    pub fn failed(&mut self, what: &str, target: &str, status: &tonic::Status) -> Duration {
        let undeliverable = undeliverable(status);
        let reason = format!("{what}: {}", status.message());
        match &mut self.last {
            Some((last, repeats)) if *last == reason => {
                *repeats += 1;
                tracing::debug!(
                    target_replica = target,
                    repeats = *repeats,
                    "allocation stream: {reason}"
                );
            }
            _ if undeliverable => {
                tracing::error!(
                    target_replica = target,
                    code = ?status.code(),
                    "allocation stream: {reason}; this host cannot receive its allocations, so it \
                     stops renewing its tasks' lease deadline"
                );
                self.last = Some((reason, 0));
            }
            _ => {
                tracing::warn!(target_replica = target, code = ?status.code(), "allocation stream: {reason}");
                self.last = Some((reason, 0));
            }
        }
        if undeliverable {
            UNDELIVERABLE_RETRY
        } else {
            Duration::ZERO
        }
    }

    /// A set arrived: the stream works again.
    pub fn delivered(&mut self) {
        if let Some((reason, repeats)) = self.last.take() {
            tracing::info!(
                repeats,
                "allocation stream delivering again (it had failed: {reason})"
            );
        }
    }
}

/// Whether the failure says the set cannot be delivered: too large to decode here
/// (`out_of_range` from gRPC's message limit) or to send there (`resource_exhausted` from the
/// replica's own check).
fn undeliverable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
    ) || status.message().contains("message length too large")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_large_sets_wait_longer_than_a_lost_leader() {
        let mut t = StreamTrouble::default();
        let too_large = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 5000 bytes, the limit is: 4096 bytes",
        );
        assert_eq!(
            t.failed("reading", "http://a:1", &too_large),
            UNDELIVERABLE_RETRY
        );
        assert_eq!(
            t.failed("reading", "http://a:1", &too_large),
            UNDELIVERABLE_RETRY
        );
        assert_eq!(
            t.last.as_ref().map(|(_, n)| *n),
            Some(1),
            "the repeat is counted"
        );
        let gone = tonic::Status::unavailable("not the leader");
        assert_eq!(t.failed("opening", "http://a:1", &gone), Duration::ZERO);
        t.delivered();
        assert!(t.last.is_none());
        let refused = tonic::Status::resource_exhausted("the allocation set of node n is 9 bytes");
        assert_eq!(
            t.failed("opening", "http://a:1", &refused),
            UNDELIVERABLE_RETRY
        );
    }
}
