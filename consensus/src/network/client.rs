//! The Raft network client: openraft's `RaftNetworkV2` over the gRPC transport.

use std::future::Future;
use std::time::Duration;

use openraft::base::BoxFuture;
use openraft::base::BoxStream;
use openraft::errors::NetworkError;
use openraft::errors::RPCError;
use openraft::errors::ReplicationClosed;
use openraft::errors::StreamingError;
use openraft::errors::Unreachable;
use openraft::network::RPCOption;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::StreamAppendResult;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::TransferLeaderResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use openraft::OptionalSend;
use openraft::RaftNetworkFactory;
use openraft::RaftNetworkV2;
use tokio_stream::Stream;
use tokio_stream::StreamExt;

use super::stream;
use super::transport::tagged;
use super::transport::CallError;
use super::transport::Transport;
use crate::codec;
use crate::config::Replication;
use crate::pb;
use crate::types::Node;
use crate::types::NodeId;
use crate::types::Snapshot;
use crate::types::SnapshotData;
use crate::types::TypeConfig;
use crate::types::Vote;

/// Creates one client per (replication stream, target). Holds the replica's transport.
pub(crate) struct NetworkFactory {
    pub(crate) self_id: NodeId,
    pub(crate) transport: Transport,
    pub(crate) rpc_timeout: Duration,
    pub(crate) chunk_bytes: usize,
    /// How entries reach each follower.
    pub(crate) replication: Replication,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = RaftClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Self::Network {
        RaftClient {
            from: self.self_id,
            target,
            addr: node.addr.clone(),
            transport: self.transport.clone(),
            rpc_timeout: self.rpc_timeout,
            chunk_bytes: self.chunk_bytes,
            replication: self.replication,
        }
    }
}

/// A client for one peer.
pub(crate) struct RaftClient {
    from: NodeId,
    target: NodeId,
    addr: String,
    transport: Transport,
    rpc_timeout: Duration,
    chunk_bytes: usize,
    replication: Replication,
}

/// What `stream_append` returns: the replies, in order, as openraft reads them.
type AppendReplies<'s> =
    BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>;

fn rpc_err(e: CallError) -> RPCError<TypeConfig> {
    match e {
        CallError::NotSent(m) => RPCError::Unreachable(Unreachable::from_string(m)),
        other => RPCError::Network(NetworkError::from_string(other.to_string())),
    }
}

fn decode_err(e: std::io::Error) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::new(&e))
}

/// An append request as the stream carries it. One that does not encode ends the stream there
/// (`map_while`): the follower must never see a gap, and openraft resends what was not
/// acknowledged on the next stream.
fn encode_append(req: AppendEntriesRequest<TypeConfig>) -> Option<pb::RaftPayload> {
    match codec::encode(&req) {
        Ok(data) => Some(pb::RaftPayload { data }),
        Err(e) => {
            tracing::error!(error = %e, "an append request did not encode; stream ended");
            None
        }
    }
}

impl RaftClient {
    /// Send one bincode message, get one back.
    async fn unary<Req, Resp, F, Fut>(
        &self,
        req: &Req,
        timeout: Duration,
        f: F,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
        F: FnOnce(
            pb::raft_transport_client::RaftTransportClient<tonic::transport::Channel>,
            tonic::Request<pb::RaftPayload>,
        ) -> Fut,
        Fut: Future<Output = Result<tonic::Response<pb::RaftPayload>, tonic::Status>>,
    {
        let data = codec::encode(req).map_err(decode_err)?;
        let payload = tagged(self.from, pb::RaftPayload { data });
        let reply = self
            .transport
            .call(self.from, self.target, &self.addr, timeout, |c| {
                f(c, payload)
            })
            .await
            .map_err(rpc_err)?;
        codec::decode(&reply.data).map_err(decode_err)
    }

    fn timeout(&self, option: &RPCOption) -> Duration {
        option
            .hard_ttl()
            .min(self.rpc_timeout.max(Duration::from_millis(1)))
    }
}

impl RaftNetworkV2<TypeConfig> for RaftClient {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let t = self.timeout(&option);
        self.unary(&rpc, t, |mut c, p| async move { c.append_entries(p).await })
            .await
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<AppendReplies<'s>, RPCError<TypeConfig>>>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + OptionalSend + Unpin + 'static,
    {
        let in_flight = match self.replication {
            Replication::Calls => {
                return openraft::network::stream_append_sequential(self, input, option)
            }
            Replication::Stream { in_flight } => in_flight,
        };
        let pace = stream::Pace {
            reply_timeout: self.timeout(&option),
            in_flight,
        };
        let (transport, addr, link) = (
            self.transport.clone(),
            self.addr.clone(),
            (self.from, self.target),
        );
        // Lazily, like openraft's one-call-at-a-time stream: the stream is opened only once the
        // first request is taken (which is where openraft waits out its backoff after errors), and
        // a failure to open is the first reply, where openraft counts it toward that backoff.
        let opened = async move {
            let mut requests = Box::pin(input.map_while(encode_append));
            let first = requests.next().await?;
            let requests = tokio_stream::once(first).chain(requests);
            Some(stream::open(&transport, link, &addr, pace, requests).await)
        };
        let replies =
            futures::StreamExt::flat_map(futures::stream::once(opened), |opened| match opened {
                None => Box::pin(futures::stream::empty()) as AppendReplies<'static>,
                Some(Err(e)) => Box::pin(futures::stream::once(async move { Err(rpc_err(e)) })),
                Some(Ok(replies)) => Box::pin(replies.map(|reply| {
                    let reply = reply.map_err(rpc_err)?;
                    codec::decode::<StreamAppendResult<TypeConfig>>(&reply.data).map_err(decode_err)
                })),
            });
        Box::pin(async move { Ok(Box::pin(replies) as AppendReplies<'s>) })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let t = self.timeout(&option);
        self.unary(&rpc, t, |mut c, p| async move { c.vote(p).await })
            .await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let t = self.timeout(&option);
        self.unary(&rpc, t, |mut c, p| async move { c.pre_vote(p).await })
            .await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let t = self.timeout(&option);
        self.unary(
            &req,
            t,
            |mut c, p| async move { c.transfer_leader(p).await },
        )
        .await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        // Chunk the snapshot: the first message carries (vote, meta), the rest carry data only, so
        // no single gRPC message has to hold the whole state and HTTP/2 flow control applies.
        let header =
            codec::encode(&(vote, snapshot.meta.clone())).map_err(|e| NetworkError::new(&e))?;
        let mut chunks = vec![pb::SnapshotChunk {
            header,
            data: Vec::new(),
        }];
        for piece in snapshot.snapshot.chunks(self.chunk_bytes.max(1)) {
            chunks.push(pb::SnapshotChunk {
                header: Vec::new(),
                data: piece.to_vec(),
            });
        }
        let total = snapshot.snapshot.len();
        // Snapshots get the snapshot timeout from openraft, not the short RPC one.
        let timeout = option.hard_ttl().max(self.rpc_timeout);
        let from = self.from;
        let send = self.transport.call(
            self.from,
            self.target,
            &self.addr,
            timeout,
            |mut c| async move {
                c.install_snapshot(tagged(from, tokio_stream::iter(chunks)))
                    .await
            },
        );
        let reply = tokio::select! {
            r = send => r,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        let reply = reply.map_err(|e| match e {
            CallError::NotSent(m) => StreamingError::Unreachable(Unreachable::from_string(m)),
            other => StreamingError::Network(NetworkError::from_string(other.to_string())),
        })?;
        tracing::debug!(target = self.target, bytes = total, "snapshot sent");
        codec::decode(&reply.data).map_err(|e| StreamingError::Network(NetworkError::new(&e)))
    }
}
