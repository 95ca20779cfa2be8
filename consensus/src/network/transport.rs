//! How a replica reaches its peers: a [`Connector`] that turns an address into a gRPC channel, an
//! optional [`FaultInjector`], and a per-address channel cache.
//!
//! Why an injected connector: the real binary dials plain TCP, tests run several replicas in one
//! process on loopback with faults injected between them, and a future deployment may want TLS or a
//! Unix socket; none of that should touch the Raft code.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use tonic::transport::Channel;
use tonic::transport::Endpoint;

use super::fault::FaultInjector;
use super::fault::Verdict;
use crate::pb::raft_transport_client::RaftTransportClient;
use crate::types::NodeId;

/// Turns a peer address into a (lazily connecting) gRPC channel.
pub trait Connector: Send + Sync + 'static {
    /// A channel to `addr` (`host:port`). Must not block: connect lazily.
    fn channel(&self, addr: &str) -> Result<Channel, String>;
}

/// Plain TCP (HTTP/2 without TLS), what `gangway server` uses.
#[derive(Debug, Clone)]
pub struct TcpConnector {
    /// Deadline for establishing a TCP connection.
    pub connect_timeout: Duration,
}

impl Default for TcpConnector {
    fn default() -> Self {
        TcpConnector {
            connect_timeout: Duration::from_millis(500),
        }
    }
}

impl Connector for TcpConnector {
    fn channel(&self, addr: &str) -> Result<Channel, String> {
        let ep = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("bad peer address {addr:?}: {e}"))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        Ok(ep.connect_lazy())
    }
}

/// Why an RPC did not produce a reply.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// The request was never sent (bad address, injected drop before sending). Safe to retry.
    #[error("not sent: {0}")]
    NotSent(String),
    /// The request may have been delivered but no usable reply came back.
    #[error("no reply: {0}")]
    NoReply(String),
    /// The RPC ran past its deadline; it may have been delivered.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// The transport shared by every client of one replica (Raft replication and write forwarding).
#[derive(Clone)]
pub struct Transport {
    connector: Arc<dyn Connector>,
    faults: Option<Arc<FaultInjector>>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl Default for Transport {
    fn default() -> Self {
        Transport::new(Arc::new(TcpConnector::default()))
    }
}

impl Transport {
    /// A transport over `connector`, without faults.
    pub fn new(connector: Arc<dyn Connector>) -> Self {
        Transport {
            connector,
            faults: None,
            channels: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Plain TCP, no faults: production.
    pub fn tcp() -> Self {
        Transport::default()
    }

    /// Route every message through `faults` (tests, and failover drills on a real server).
    pub fn with_faults(mut self, faults: Arc<FaultInjector>) -> Self {
        self.faults = Some(faults);
        self
    }

    /// The injector every message goes through, if any; the receiving side consults it too.
    pub(crate) fn faults(&self) -> Option<Arc<FaultInjector>> {
        self.faults.clone()
    }

    pub(super) fn client(&self, addr: &str) -> Result<RaftTransportClient<Channel>, CallError> {
        let mut cache = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let ch = match cache.get(addr) {
            Some(c) => c.clone(),
            None => {
                let c = self.connector.channel(addr).map_err(CallError::NotSent)?;
                cache.insert(addr.to_string(), c.clone());
                c
            }
        };
        Ok(RaftTransportClient::new(ch)
            .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES))
    }

    /// Whether a message on the link `from -> to` goes through (after any injected delay).
    pub(super) async fn gate(&self, from: NodeId, to: NodeId) -> bool {
        match self.faults.as_ref().map(|f| f.verdict(from, to)) {
            None | Some(Verdict::Deliver) => true,
            Some(Verdict::Delay(d)) => {
                tokio::time::sleep(d).await;
                true
            }
            Some(Verdict::Drop) => false,
        }
    }

    /// Run one RPC from `from` to `to` at `addr`, applying faults in both directions and a deadline.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        from: NodeId,
        to: NodeId,
        addr: &str,
        timeout: Duration,
        f: F,
    ) -> Result<T, CallError>
    where
        F: FnOnce(RaftTransportClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.client(addr)?;
        let run = async {
            if !self.gate(from, to).await {
                return Err(lost_request(from, to));
            }
            let reply = f(client).await.map_err(status_error)?;
            if !self.gate(to, from).await {
                return Err(lost_reply(from, to));
            }
            Ok(reply.into_inner())
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout(timeout)),
        }
    }
}

impl Transport {
    /// Opens a `Presence` stream from `from` to `to` at `addr` (no deadline: it is held open).
    /// Refused with `FailedPrecondition` when injected faults cut the link either way.
    pub(crate) async fn presence(
        &self,
        from: NodeId,
        to: NodeId,
        addr: &str,
    ) -> Result<tonic::Streaming<crate::pb::RaftPayload>, tonic::Status> {
        if let Some(f) = &self.faults {
            if f.is_cut(from, to) {
                return Err(tonic::Status::failed_precondition(format!(
                    "injected partition {from}<->{to}"
                )));
            }
        }
        let mut client = self
            .client(addr)
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let req = tagged(from, crate::pb::RaftPayload { data: Vec::new() });
        Ok(client.presence(req).await?.into_inner())
    }
}

/// The largest Raft message a replica decodes: one append may carry a restored backup, which is
/// one log entry of up to 1 GiB (the client API's restore limit), plus room for its framing.
/// Only authenticated replicas reach the decoder when TLS is on.
pub const MAX_RAFT_MESSAGE_BYTES: usize = (1 << 30) + (16 << 20);

/// Metadata key naming the sending replica of a Raft message, so the receiver can apply its own
/// injected faults to the link it arrived on.
pub(crate) const FROM_KEY: &str = "x-gangway-raft-from";

/// `msg` as a request tagged with its sender.
pub(crate) fn tagged<T>(from: NodeId, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert(FROM_KEY, tonic::metadata::MetadataValue::from(from));
    req
}

/// The sender a request was tagged with, if any.
pub(crate) fn sender<T>(req: &tonic::Request<T>) -> Option<NodeId> {
    tag(req, FROM_KEY)
}

/// The value a request's metadata holds under `key`, if it holds one that parses.
pub(crate) fn tag<T, V: std::str::FromStr>(req: &tonic::Request<T>, key: &str) -> Option<V> {
    req.metadata()
        .get(key)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse().ok())
}

/// A request the injector lost on `from -> to`. The sender of a lost request learns nothing until
/// its deadline; it is not made to wait it (tests would crawl) but told the request was not sent.
pub(super) fn lost_request(from: NodeId, to: NodeId) -> CallError {
    CallError::NotSent(format!("injected drop {from}->{to}"))
}

/// The reply to a `from -> to` request, lost by the injector on its way back: it may have been
/// acted on.
pub(super) fn lost_reply(from: NodeId, to: NodeId) -> CallError {
    CallError::NoReply(format!("injected drop of reply {to}->{from}"))
}

/// Metadata key on a receiver's refusal of a message that arrived on a link its injector cuts.
pub(crate) const DROPPED_KEY: &str = "x-gangway-raft-dropped";

/// A failed call's status as a [`CallError`]: not sent when the connection could not be made, or
/// when the receiver's injector dropped the request (before acting on it).
pub(super) fn status_error(s: tonic::Status) -> CallError {
    let dropped = s.metadata().get(DROPPED_KEY).is_some();
    if dropped || (s.code() == tonic::Code::Unavailable && is_connect_failure(s.message())) {
        CallError::NotSent(format!("{s}"))
    } else {
        CallError::NoReply(format!("{s}"))
    }
}

/// Whether a tonic status says the connection could not be established (so nothing was sent),
/// as opposed to a connection that broke after the request may have left.
fn is_connect_failure(msg: &str) -> bool {
    msg.contains("error trying to connect") || msg.contains("tcp connect error")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_call_is_not_sent_only_when_nothing_was_acted_on() {
        let not_sent = |s| matches!(status_error(s), CallError::NotSent(_));
        let refused = tonic::Status::unavailable("tcp connect error: Connection refused");
        assert!(not_sent(refused), "the connection was never made");
        let mut dropped = tonic::Status::unavailable("injected drop 2->1");
        dropped.metadata_mut().insert(
            DROPPED_KEY,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        assert!(not_sent(dropped), "the receiver's injector dropped it");
        let broke = tonic::Status::unavailable("connection reset");
        assert!(!not_sent(broke), "it may have been delivered");
        let unmarked = tonic::Status::unavailable("injected drop 2->1");
        assert!(!not_sent(unmarked), "only the mark says it was dropped");
    }
}
