//! The agent's connection to the scheduler: the worker API on whichever replica leads.
//!
//! Heartbeats and the allocation stream are served by the leader only; a follower answers
//! `UNAVAILABLE` with the leader's address in `x-gangway-leader`. The link follows that hint, or
//! moves on to the next configured replica when a replica cannot be reached at all.

use gangway_proto::pb::worker_api_client::WorkerApiClient;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// Metadata key naming the leader on a `not_leader` answer (see the API's proto).
const LEADER_KEY: &str = "x-gangway-leader";
/// Metadata key with the stable error code.
const CODE_KEY: &str = "x-gangway-code";

/// A leader-following worker API client. Cheap to clone; clones share what they learn.
#[derive(Clone)]
pub struct SchedulerLink {
    addrs: Arc<Vec<String>>,
    /// (index of the next address to try, the leader hint if any)
    current: Arc<Mutex<(usize, Option<String>)>>,
    rpc_timeout: Duration,
}

impl SchedulerLink {
    /// `addrs` must not be empty; each is `host:port` or a URL.
    pub fn new(addrs: Vec<String>, rpc_timeout: Duration) -> Self {
        Self {
            addrs: Arc::new(addrs),
            current: Arc::new(Mutex::new((0, None))),
            rpc_timeout,
        }
    }

    /// The replica to talk to now: the leader hint if there is one, else the list in turn.
    pub fn target(&self) -> String {
        let g = self.current.lock().unwrap_or_else(|p| p.into_inner());
        g.1.clone()
            .unwrap_or_else(|| self.addrs[g.0 % self.addrs.len().max(1)].clone())
    }

    /// The endpoint of [`SchedulerLink::target`]; connects lazily, errors surface on the call.
    fn endpoint(&self) -> Result<Endpoint, tonic::Status> {
        let target = self.target();
        let uri = if target.starts_with("http://") || target.starts_with("https://") {
            target
        } else {
            format!("http://{target}")
        };
        Ok(Endpoint::from_shared(uri.clone())
            .map_err(|e| {
                tonic::Status::invalid_argument(format!("bad replica address {uri}: {e}"))
            })?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true))
    }

    /// A client for unary calls, each bounded by the link's timeout.
    pub fn client(&self) -> Result<WorkerApiClient<Channel>, tonic::Status> {
        let endpoint = self.endpoint()?.timeout(self.rpc_timeout);
        Ok(WorkerApiClient::new(endpoint.connect_lazy()))
    }

    /// A client without a per-call timeout, for the long-lived allocation stream; keep-alives
    /// notice a dead leader instead.
    pub fn stream_client(&self) -> Result<WorkerApiClient<Channel>, tonic::Status> {
        let endpoint = self
            .endpoint()?
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(2));
        Ok(WorkerApiClient::new(endpoint.connect_lazy()))
    }

    /// After a failed call: follow the leader hint it carried, or move to the next replica.
    pub fn failed(&self, status: &tonic::Status) {
        let mut g = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let hint = status
            .metadata()
            .get(LEADER_KEY)
            .and_then(|v| v.to_str().ok())
            .filter(|h| !h.is_empty())
            .map(str::to_owned);
        match hint {
            Some(h) if g.1.as_deref() != Some(h.as_str()) => g.1 = Some(h),
            _ => {
                g.1 = None;
                g.0 += 1;
            }
        }
    }
}

/// The stable error code the server put on a failed call (`stale_epoch`, `unknown_node`, ...).
pub fn error_code(status: &tonic::Status) -> &str {
    status
        .metadata()
        .get(CODE_KEY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Whether a call may succeed when tried again (another replica, a leader elected, the network
/// back). Anything else is a definite answer.
pub fn retryable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::ResourceExhausted
            | tonic::Code::Aborted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_leader(addr: &str) -> tonic::Status {
        let mut s = tonic::Status::unavailable("not the leader");
        s.metadata_mut().insert(LEADER_KEY, addr.parse().unwrap());
        s
    }

    #[test]
    fn follows_hints_then_walks_the_list() {
        let link = SchedulerLink::new(
            vec!["a:1".into(), "b:2".into(), "c:3".into()],
            Duration::from_secs(1),
        );
        assert_eq!(link.target(), "a:1");
        link.failed(&with_leader("c:3"));
        assert_eq!(link.target(), "c:3", "a hint is followed");
        // The hinted leader fails with the same hint (it is gone): walk on instead of looping.
        link.failed(&with_leader("c:3"));
        assert_eq!(link.target(), "b:2");
        link.failed(&tonic::Status::unavailable("connection refused"));
        assert_eq!(link.target(), "c:3");
    }

    #[test]
    fn definite_answers_are_not_retried() {
        assert!(retryable(&tonic::Status::unavailable("x")));
        assert!(!retryable(&tonic::Status::failed_precondition("stale")));
        assert!(!retryable(&tonic::Status::invalid_argument("bad")));
    }
}
