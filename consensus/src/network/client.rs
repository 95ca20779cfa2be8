//! The Raft network client: openraft's `RaftNetworkV2` over the gRPC transport.

use std::future::Future;
use std::time::Duration;

use openraft::errors::NetworkError;
use openraft::errors::RPCError;
use openraft::errors::ReplicationClosed;
use openraft::errors::StreamingError;
use openraft::errors::Unreachable;
use openraft::network::RPCOption;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::TransferLeaderResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use openraft::RaftNetworkFactory;
use openraft::RaftNetworkV2;

use super::transport::tagged;
use super::transport::CallError;
use super::transport::Transport;
use crate::codec;
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
}

fn rpc_err(e: CallError) -> RPCError<TypeConfig> {
    match e {
        CallError::NotSent(m) => RPCError::Unreachable(Unreachable::from_string(m)),
        other => RPCError::Network(NetworkError::from_string(other.to_string())),
    }
}

fn decode_err(e: std::io::Error) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::new(&e))
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
