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

/// How often a host connects again to replicas it found unreachable ([`SchedulerLink::keep_warm`]).
pub const STANDBY_EVERY: Duration = Duration::from_secs(2);

/// A leader-following worker API client. Cheap to clone; clones share what they learn and the
/// connections they open (one per replica and kind, so TLS handshakes are not repeated per call).
#[derive(Clone)]
pub struct SchedulerLink {
    replicas: Arc<Mutex<Replicas>>,
    rpc_timeout: Duration,
    dialer: Dialer,
    /// (target, for streams?) -> channel.
    channels: Arc<Mutex<HashMap<(String, bool), Channel>>>,
    /// Replicas a call found unreachable: [`Self::keep_warm`] connects them again.
    broken: Arc<Mutex<std::collections::BTreeSet<String>>>,
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
            broken: Arc::default(),
        }
    }

    /// The cached channel to the current target (`stream`: the keep-alive endpoint).
    fn channel(&self, stream: bool) -> Result<Channel, tonic::Status> {
        let key = (self.target(), stream);
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(&key) {
            return Ok(c.clone());
        }
        let c = self.dialer.lazy(&self.endpoint(&key.0, stream)?);
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

    /// The endpoint of replica `uri`: for unary calls each bounded by the link's timeout; for
    /// the allocation stream none, keep-alives notice a dead leader instead. Connects lazily
    /// unless [`Self::warm`] connected it; errors surface on the call.
    fn endpoint(&self, uri: &str, stream: bool) -> Result<Endpoint, tonic::Status> {
        let ep = Endpoint::from_shared(uri.to_owned())
            .map_err(|e| {
                tonic::Status::invalid_argument(format!("bad replica address {uri:?}: {e}"))
            })?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true);
        Ok(if stream {
            ep.http2_keep_alive_interval(Duration::from_secs(1))
                .keep_alive_timeout(Duration::from_secs(2))
        } else {
            ep.timeout(self.rpc_timeout)
        })
    }

    /// Connects now every channel the link may need after a failover: to each configured
    /// replica, for calls and for the stream. When a leader dies, the host then already holds
    /// connections to the new one: with TLS, each host's handshakes with each replica are made
    /// once, at start, rather than by every host at the moment the cluster most needs its CPU.
    /// A replica that does not answer is left to connect lazily, as before.
    pub async fn warm(&self) {
        let addrs = self.replicas().addrs().to_vec();
        for addr in addrs {
            let held = |stream| {
                self.channels
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(&(addr.clone(), stream))
            };
            if !(held(false) && held(true)) {
                self.connect_now(&addr).await;
            }
        }
    }

    /// Connects both channels to `addr` now, replacing those held; false when it cannot.
    async fn connect_now(&self, addr: &str) -> bool {
        for stream in [false, true] {
            let Ok(endpoint) = self.endpoint(addr, stream) else {
                return false;
            };
            let Ok(c) = self.dialer.connect(&endpoint).await else {
                return false;
            };
            self.channels
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((addr.to_owned(), stream), c);
        }
        true
    }

    /// [`Self::warm`], then every `every` (first after `phase`, to spread a fleet's hosts) connects
    /// again the replicas a call found unreachable since: a replica that died and came back is
    /// then held again before it can become the leader. Runs until dropped.
    pub async fn keep_warm(&self, every: Duration, phase: Duration) {
        self.warm().await;
        tokio::time::sleep(phase).await;
        loop {
            let broken: Vec<String> = self
                .broken
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned()
                .collect();
            for addr in broken {
                if self.connect_now(&addr).await {
                    self.broken
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&addr);
                }
            }
            tokio::time::sleep(every).await;
        }
    }

    /// A client for unary calls, each bounded by the link's timeout.
    pub fn client(&self) -> Result<WorkerApiClient<Channel>, tonic::Status> {
        Ok(WorkerApiClient::new(self.channel(false)?))
    }

    /// A client without a per-call timeout, for the long-lived allocation stream; keep-alives
    /// notice a dead leader instead. It decodes sets up to `max_bytes` (see
    /// `gangway_proto::allocation::MAX_ALLOCATION_SET_BYTES`), not gRPC's default 4 MiB.
    pub fn stream_client(
        &self,
        max_bytes: usize,
    ) -> Result<WorkerApiClient<Channel>, tonic::Status> {
        Ok(WorkerApiClient::new(self.channel(true)?).max_decoding_message_size(max_bytes))
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
        if !matches!(retry, link::Retry::FollowLeader(_)) && unreachable(status) {
            self.broken
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(replicas.target().to_owned());
        }
        replicas.failed(&retry)
    }
}

/// Whether a call failed for want of a connection (as opposed to an answer).
fn unreachable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded
    ) && link::error_code(status).is_none()
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

    /// Counts the TCP connections a listener accepts (holding them open).
    async fn counting_listener() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(conn);
            }
        });
        (addr, count)
    }

    #[tokio::test]
    async fn standby_connections_are_made_once_and_again_after_a_replica_failed() {
        use std::sync::atomic::Ordering::SeqCst;
        let (a, at_a) = counting_listener().await;
        let (b, at_b) = counting_listener().await;
        let link = SchedulerLink::new(vec![a.clone(), b.clone()], Duration::from_secs(1));
        link.warm().await;
        // One connection for calls and one for the stream, to each replica.
        assert_eq!((at_a.load(SeqCst), at_b.load(SeqCst)), (2, 2));
        link.warm().await;
        assert_eq!(
            (at_a.load(SeqCst), at_b.load(SeqCst)),
            (2, 2),
            "held: not made again"
        );

        // A call to a finds it unreachable: the keeper connects to a again, and only to a.
        link.failed(&tonic::Status::unavailable("connection refused"));
        let keeper = link.clone();
        let task = tokio::spawn(async move {
            keeper
                .keep_warm(Duration::from_millis(20), Duration::ZERO)
                .await
        });
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while at_a.load(SeqCst) < 4 && std::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        task.abort();
        assert_eq!(at_a.load(SeqCst), 4, "a connected again, once");
        assert_eq!(at_b.load(SeqCst), 2, "b untouched");
        // A redirect is an answer, not a failure to connect: nothing is marked.
        link.failed(&with_leader(&a));
        assert!(link.broken.lock().unwrap().is_empty());
    }
}
