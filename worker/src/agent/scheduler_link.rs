//! The agent's connection to the scheduler: the worker API on whichever replica leads.
//!
//! Heartbeats and the allocation stream are served by the leader only; a follower answers
//! `not_leader` with the leader's address. The rules (metadata keys, what a failure means, which
//! replica next) are the ones every client follows, in [`gangway_proto::link`]; this file adds the
//! connections the agent makes and shares what the link learns between the agent's loops.

use gangway_proto::link::{self, Replicas};
use gangway_proto::pb::worker_api_client::WorkerApiClient;
use gangway_tls::Dialer;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

pub use gangway_proto::link::retryable;

/// A leader-following worker API client. Cheap to clone; clones share what they learn and the
/// connections they open (one per replica and kind, so TLS handshakes are not repeated per call).
#[derive(Clone)]
pub struct SchedulerLink {
    replicas: Arc<Mutex<Replicas>>,
    rpc_timeout: Duration,
    dialer: Dialer,
    /// (target, for streams?) -> channel.
    channels: Arc<Mutex<HashMap<(String, bool), Channel>>>,
}

impl SchedulerLink {
    /// Plain TCP (toward an insecure cluster; tests). See [`Self::with_dialer`].
    pub fn new(addrs: Vec<String>, rpc_timeout: Duration) -> Self {
        Self::with_dialer(addrs, rpc_timeout, Dialer::Plain)
    }

    /// `addrs` must not be empty; each is `host:port` or `http://host:port`. `dialer` says how
    /// replicas are reached (mutual TLS with this host's certificate, or plain TCP).
    pub fn with_dialer(addrs: Vec<String>, rpc_timeout: Duration, dialer: Dialer) -> Self {
        // A malformed address is kept as given: connecting to it fails with its text.
        let addrs = addrs
            .into_iter()
            .map(|a| link::normalize_addr(&a).unwrap_or(a))
            .collect();
        Self {
            replicas: Arc::new(Mutex::new(Replicas::new(addrs))),
            rpc_timeout,
            dialer,
            channels: Arc::default(),
        }
    }

    /// The cached channel to the current target (`stream`: the keep-alive endpoint).
    fn channel(
        &self,
        stream: bool,
        endpoint: impl FnOnce() -> Result<Endpoint, tonic::Status>,
    ) -> Result<Channel, tonic::Status> {
        let key = (self.target(), stream);
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(&key) {
            return Ok(c.clone());
        }
        let c = self.dialer.lazy(&endpoint()?);
        channels.insert(key, c.clone());
        Ok(c)
    }

    fn replicas(&self) -> std::sync::MutexGuard<'_, Replicas> {
        self.replicas.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The replica to talk to now: the leader hint if there is one, else the list in turn.
    pub fn target(&self) -> String {
        self.replicas().target().to_owned()
    }

    /// The endpoint of [`SchedulerLink::target`]; connects lazily, errors surface on the call.
    fn endpoint(&self) -> Result<Endpoint, tonic::Status> {
        let uri = self.target();
        Ok(Endpoint::from_shared(uri.clone())
            .map_err(|e| {
                tonic::Status::invalid_argument(format!("bad replica address {uri:?}: {e}"))
            })?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true))
    }

    /// A client for unary calls, each bounded by the link's timeout.
    pub fn client(&self) -> Result<WorkerApiClient<Channel>, tonic::Status> {
        let channel = self.channel(false, || Ok(self.endpoint()?.timeout(self.rpc_timeout)))?;
        Ok(WorkerApiClient::new(channel))
    }

    /// A client without a per-call timeout, for the long-lived allocation stream; keep-alives
    /// notice a dead leader instead. It decodes sets up to `max_bytes` (see
    /// `gangway_proto::allocation::MAX_ALLOCATION_SET_BYTES`), not gRPC's default 4 MiB.
    pub fn stream_client(
        &self,
        max_bytes: usize,
    ) -> Result<WorkerApiClient<Channel>, tonic::Status> {
        let channel = self.channel(true, || {
            Ok(self
                .endpoint()?
                .http2_keep_alive_interval(Duration::from_secs(1))
                .keep_alive_timeout(Duration::from_secs(2)))
        })?;
        Ok(WorkerApiClient::new(channel).max_decoding_message_size(max_bytes))
    }

    /// After a failed call: follow the leader hint it carried, or move to the next replica.
    /// True when it names a leader other than the replica just tried: worth retrying at once.
    pub fn failed(&self, status: &tonic::Status) -> bool {
        let retry = link::classify(status);
        let mut replicas = self.replicas();
        // The loops sharing this link call at once: a hint naming the replica the link already
        // targets was followed by another loop while this call was out (no replica names itself
        // as another's leader). Go there; dropping it would send every loop to a follower.
        if matches!(&retry, link::Retry::FollowLeader(leader) if leader == replicas.target()) {
            return true;
        }
        replicas.failed(&retry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_leader(addr: &str) -> tonic::Status {
        let mut s = tonic::Status::unavailable("not the leader");
        s.metadata_mut()
            .insert(link::CODE_KEY, "not_leader".parse().unwrap());
        s.metadata_mut()
            .insert(link::LEADER_KEY, addr.parse().unwrap());
        s
    }

    #[test]
    fn clones_share_what_they_learn() {
        let link = SchedulerLink::new(
            vec!["a:1".into(), "http://b:2".into()],
            Duration::from_secs(1),
        );
        let other = link.clone();
        assert_eq!(link.target(), "http://a:1");
        other.failed(&with_leader("c:3"));
        assert_eq!(
            link.target(),
            "http://c:3",
            "a hint one loop got is every loop's"
        );
        // The heartbeat and the stream both asked a follower; the second answer names the
        // leader the first already found: it stays the target.
        assert!(link.failed(&with_leader("c:3")), "retry now, at the leader");
        assert_eq!(other.target(), "http://c:3");
        link.failed(&tonic::Status::unavailable("connection refused"));
        assert_eq!(other.target(), "http://b:2");
    }
}
