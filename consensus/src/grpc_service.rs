//! The server side of the Raft transport: a tonic service that hands each RPC to the local Raft.
//!
//! It is exposed as a plain tonic service ([`crate::ReplicaHandle::grpc_service`]) so the scheduler
//! can mount it next to its own services on one port, and [`crate::ReplicaHandle::serve`] runs it
//! alone on a listener (tests, or a dedicated Raft port).

use std::sync::Arc;

use tokio_stream::StreamExt;
use tonic::Request;
use tonic::Response;
use tonic::Status;
use tonic::Streaming;

use crate::app::StateMachine;
use crate::codec;
use crate::error::WireError;
use crate::leader_loss::presence_stream;
use crate::leader_loss::LeaderLoss;
use crate::log_store::StorageHealth;
use crate::network::follower;
use crate::network::sender;
use crate::network::FaultInjector;
use crate::network::DROPPED_KEY;
use crate::pb;
use crate::pb::raft_transport_server::RaftTransport;
use crate::types::NodeId;
use crate::types::RaftOf;
use crate::types::Snapshot;
use crate::types::SnapshotMeta;
use crate::types::Vote;
use crate::write_path::propose_unless_cut_off;
use crate::write_path::ForwardReply;
use crate::write_path::WriteLimits;

/// Set by the embedding server on a request whose sender proved, by its TLS certificate, to be the
/// replica with this id. When present, a message claiming another sender (in its metadata or in the
/// vote it carries) is refused; without TLS nothing is set and messages are taken as they come.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthenticatedReplica(pub NodeId);

/// The largest snapshot a replica accepts from its leader (it is held in memory to install).
pub const MAX_SNAPSHOT_BYTES: usize = 8 << 30;

/// The tonic implementation of `gangway.consensus.v1.RaftTransport` for one replica.
pub struct RaftGrpcService<S: StateMachine> {
    raft: RaftOf<S>,
    health: StorageHealth,
    limits: WriteLimits,
    /// This replica's id, the receiving end of every link checked against `faults`.
    id: NodeId,
    /// The replica's own fault injector: a message arriving on a link it cuts is refused, so a
    /// replica partitioned by its own injector (a drill on a real server) is cut off both ways.
    faults: Option<Arc<FaultInjector>>,
    /// When a leader of the current term last reached this replica (see
    /// `ReplicaHandle::since_leader_contact`).
    leader_contact: LeaderContact,
    /// Leader-loss detection's side of the service.
    presence: PresenceSide,
}

/// What the service needs for leader-loss detection: whether this replica has proved its leader's
/// process gone (votes inside the lease), and the replica's stop signal, which ends the presence
/// streams it serves.
pub(crate) struct PresenceSide {
    pub loss: LeaderLoss,
    pub stop: tokio::sync::watch::Receiver<bool>,
}

/// When this replica last heard from a leader it accepts (an append that was not refused for an
/// older term). Shared by the gRPC service, which sets it, and the handle, which reads it.
pub(crate) type LeaderContact = Arc<std::sync::Mutex<Option<std::time::Instant>>>;

impl<S: StateMachine> RaftGrpcService<S> {
    pub(crate) fn new(
        raft: RaftOf<S>,
        health: StorageHealth,
        limits: WriteLimits,
        id: NodeId,
        faults: Option<Arc<FaultInjector>>,
        leader_contact: LeaderContact,
        presence: PresenceSide,
    ) -> Self {
        RaftGrpcService {
            raft,
            health,
            limits,
            id,
            faults,
            leader_contact,
            presence,
        }
    }

    /// Resolves once this replica is stopping.
    fn stopping(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut stop = self.presence.stop.clone();
        async move {
            let _ = stop.wait_for(|s| *s).await;
        }
    }

    /// Whether injected faults cut the link between this replica and `peer`, either way.
    fn cut_off_from(&self, peer: NodeId) -> bool {
        self.faults
            .as_ref()
            .is_some_and(|f| f.is_cut(self.id, peer))
    }

    /// Refuses a message that arrived on a link the injector cuts (UNAVAILABLE, as a lost message
    /// looks to its sender). Untagged requests (older senders) are let through.
    fn admit<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if let (Some(AuthenticatedReplica(proven)), Some(claimed)) =
            (req.extensions().get::<AuthenticatedReplica>(), sender(req))
        {
            if *proven != claimed {
                return Err(forged(*proven, claimed));
            }
        }
        refuse_if_cut(&self.faults, sender(req), self.id)
    }
}

/// A leader of the current term reached this replica now.
fn touch(contact: &LeaderContact) {
    *contact.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
}

/// What each message of a `StreamAppend` stream is checked against, as a unary append is: the
/// sender's certificate against the vote it carries, and the replica's own injected faults (a link
/// cut while the stream is open stops it). The first refusal ends the requests and is kept in
/// `refused`, for the stream to end with once the admitted ones are answered.
struct MessageCheck {
    proven: Option<NodeId>,
    sender: Option<NodeId>,
    me: NodeId,
    faults: Option<Arc<FaultInjector>>,
    refused: Arc<std::sync::Mutex<Option<Status>>>,
}

type AppendRequest = openraft::raft::AppendEntriesRequest<crate::types::TypeConfig>;

impl MessageCheck {
    fn admit_append(&self, msg: Result<pb::RaftPayload, Status>) -> Option<AppendRequest> {
        let admitted = msg.and_then(|msg| {
            refuse_if_cut(&self.faults, self.sender, self.me)?;
            let rpc: AppendRequest = codec::decode(&msg.data).map_err(bad_request)?;
            check_vote(self.proven, &rpc.vote)?;
            Ok(rpc)
        });
        match admitted {
            Ok(rpc) => Some(rpc),
            Err(status) => {
                *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
                None
            }
        }
    }
}

/// Refuses a message from `from` (untagged: let through) on a link `faults` cuts toward `me`.
fn refuse_if_cut(
    faults: &Option<Arc<FaultInjector>>,
    from: Option<NodeId>,
    me: NodeId,
) -> Result<(), Status> {
    match (faults, from) {
        (Some(f), Some(from)) if f.is_blocked(from, me) => Err(injected_drop(from, me)),
        _ => Ok(()),
    }
}

/// The refusal of a message that arrived on a link the injector cuts: UNAVAILABLE, marked (metadata
/// [`DROPPED_KEY`]) so that its sender counts it as never delivered, as it counts a message its own
/// injector drops. It certainly was not acted on.
fn injected_drop(from: NodeId, to: NodeId) -> Status {
    let mut status = Status::unavailable(format!("injected drop {from}->{to}"));
    status.metadata_mut().insert(
        DROPPED_KEY,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    status
}

fn forged(proven: NodeId, claimed: NodeId) -> Status {
    Status::permission_denied(format!(
        "permission_denied: replica {proven}'s certificate sent a message claiming to come from replica {claimed}"
    ))
}

/// The replica a request's certificate proved, if any.
fn proven<T>(req: &Request<T>) -> Option<NodeId> {
    req.extensions().get::<AuthenticatedReplica>().map(|a| a.0)
}

/// Refuses a vote or append whose vote names another replica than the certificate's.
fn check_vote(proven: Option<NodeId>, vote: &Vote) -> Result<(), Status> {
    use openraft::vote::RaftLeaderId;
    let claimed = *vote.leader_id().node_id();
    match proven {
        Some(p) if p != claimed => Err(forged(p, claimed)),
        _ => Ok(()),
    }
}

fn bad_request(e: std::io::Error) -> Status {
    Status::invalid_argument(format!("undecodable raft message: {e}"))
}

fn reply<T: serde::Serialize>(v: &T) -> Result<Response<pb::RaftPayload>, Status> {
    let data = codec::encode(v).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(pb::RaftPayload { data }))
}

fn raft_err(e: impl std::fmt::Display) -> Status {
    // The Raft core is gone (shutdown or fatal error): the peer treats it as unreachable.
    Status::unavailable(format!("raft core unavailable: {e}"))
}

#[tonic::async_trait]
impl<S: StateMachine> RaftTransport for RaftGrpcService<S> {
    async fn append_entries(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        self.admit(&req)?;
        let who = proven(&req);
        let rpc: openraft::raft::AppendEntriesRequest<crate::types::TypeConfig> =
            codec::decode(&req.into_inner().data).map_err(bad_request)?;
        check_vote(who, &rpc.vote)?;
        let resp = self.raft.append_entries(rpc).await.map_err(raft_err)?;
        if !matches!(resp, openraft::raft::AppendEntriesResponse::HigherVote(_)) {
            touch(&self.leader_contact);
        }
        reply(&resp)
    }

    type StreamAppendStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::RaftPayload, Status>> + Send + 'static>,
    >;

    async fn stream_append(
        &self,
        req: Request<Streaming<pb::RaftPayload>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        self.admit(&req)?;
        let check = MessageCheck {
            proven: proven(&req),
            sender: sender(&req),
            me: self.id,
            faults: self.faults.clone(),
            refused: Arc::default(),
        };
        let refused = check.refused.clone();
        let window = follower::window(&req);
        // A stopping replica ends the stream both ways (as it ends presence streams): the
        // server's graceful shutdown waits for every stream, and the leader would keep this one
        // open. The requests end, which lets go of the request side, and so do the replies.
        let (stopping_in, stopping_out) = (self.stopping(), self.stopping());
        let requests = futures::StreamExt::take_until(req.into_inner(), stopping_in)
            .map_while(move |msg| check.admit_append(msg));
        let contact = self.leader_contact.clone();
        let replies = follower::replies(self.raft.clone(), requests, window).map(move |r| {
            let r = r.map_err(raft_err)?;
            if !matches!(r, Err(openraft::raft::StreamAppendError::HigherVote(_))) {
                touch(&contact);
            }
            let data = codec::encode(&r).map_err(|e| Status::internal(e.to_string()))?;
            Ok(pb::RaftPayload { data })
        });
        // After the replies to what was admitted, the reason the rest was refused, if any.
        let refusal = tokio_stream::once(()).filter_map(move |()| {
            refused
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .map(Err)
        });
        let replies = futures::StreamExt::take_until(replies.chain(refusal), stopping_out);
        Ok(Response::new(Box::pin(replies)))
    }

    async fn vote(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        self.admit(&req)?;
        let who = proven(&req);
        let mut rpc: openraft::raft::VoteRequest<crate::types::TypeConfig> =
            codec::decode(&req.into_inner().data).map_err(bad_request)?;
        check_vote(who, &rpc.vote)?;
        // Inside the leader's lease openraft refuses every vote, so that a live leader is not
        // deposed; a leader whose process is provably gone is not live (see `leader_loss`).
        let loss = &self.presence.loss;
        let mut proof = None;
        if !rpc.leadership_transfer {
            use openraft::vote::RaftLeaderId;
            let candidate = (*rpc.vote.leader_id().node_id(), rpc.vote.leader_id().term());
            proof = loss
                .voter_proves_gone(&self.raft, candidate, |l| self.cut_off_from(l))
                .await;
            rpc.leadership_transfer = proof.is_some();
        }
        let candidate_log = rpc.last_log_id;
        let resp = {
            // Not between a campaign's reading of openraft's vote and its start (`leader_loss`).
            let _turn = loss.gate().await;
            self.raft.vote(rpc).await.map_err(raft_err)?
        };
        if let Some(proof) =
            proof.filter(|_| !resp.vote_granted && candidate_log < resp.last_log_id)
        {
            loss.refused_behind(&proof);
        }
        reply(&resp)
    }

    async fn pre_vote(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        self.admit(&req)?;
        let who = proven(&req);
        let rpc: openraft::raft::VoteRequest<crate::types::TypeConfig> =
            codec::decode(&req.into_inner().data).map_err(bad_request)?;
        check_vote(who, &rpc.vote)?;
        let resp = self.raft.pre_vote(rpc).await.map_err(raft_err)?;
        reply(&resp)
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        self.admit(&req)?;
        let who = proven(&req);
        let rpc: openraft::raft::TransferLeaderRequest<crate::types::TypeConfig> =
            codec::decode(&req.into_inner().data).map_err(bad_request)?;
        check_vote(who, rpc.from_leader())?;
        let resp = self
            .raft
            .handle_transfer_leader(rpc)
            .await
            .map_err(raft_err)?;
        reply(&resp)
    }

    async fn install_snapshot(
        &self,
        req: Request<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        self.admit(&req)?;
        let who = proven(&req);
        let mut stream = req.into_inner();
        let mut header: Option<(Vote, SnapshotMeta)> = None;
        let mut data = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if data.len().saturating_add(chunk.data.len()) > MAX_SNAPSHOT_BYTES {
                return Err(Status::resource_exhausted(format!(
                    "snapshot larger than {MAX_SNAPSHOT_BYTES} bytes refused"
                )));
            }
            if header.is_none() {
                if chunk.header.is_empty() {
                    return Err(Status::invalid_argument(
                        "first snapshot chunk lacks a header",
                    ));
                }
                let (vote, meta): (Vote, SnapshotMeta) =
                    codec::decode(&chunk.header).map_err(bad_request)?;
                check_vote(who, &vote)?;
                header = Some((vote, meta));
            }
            data.extend_from_slice(&chunk.data);
        }
        let (vote, meta) =
            header.ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        // A snapshot that would not install is refused to its sender before Raft takes it: Raft
        // treats a failed install as a storage failure, and it must never reach the disk.
        crate::state_machine::check_installable::<S>(&data).map_err(|e| {
            tracing::error!(snapshot = %meta, error = %e, "refused a snapshot that would not install");
            Status::invalid_argument(format!("snapshot refused: {e}"))
        })?;
        let snapshot = Snapshot {
            meta,
            snapshot: data,
        };
        let resp = self
            .raft
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(raft_err)?;
        reply(&resp)
    }

    async fn forward_write(
        &self,
        req: Request<pb::ForwardWriteRequest>,
    ) -> Result<Response<pb::ForwardWriteReply>, Status> {
        self.admit(&req)?;
        let command = req.into_inner().command;
        // One hop only: the receiver proposes locally or answers NotLeader; it never forwards
        // again, so a stale leader hint cannot make a write bounce around the cluster.
        let outcome = tokio::time::timeout(
            self.limits.timeout,
            propose_unless_cut_off(&self.raft, &self.health, &self.limits, command),
        )
        .await;
        let r = match outcome {
            Ok(Ok((index, response))) => ForwardReply::Applied { index, response },
            Ok(Err(e)) => ForwardReply::Failed(WireError::from(&e)),
            Err(_) => {
                ForwardReply::Failed(WireError::from(&crate::error::ConsensusError::Timeout(
                    "leader did not apply the forwarded write in time; outcome unknown".into(),
                )))
            }
        };
        let data = codec::encode(&r).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::ForwardWriteReply { data }))
    }

    type PresenceStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::RaftPayload, Status>> + Send + 'static>,
    >;

    async fn presence(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<Response<Self::PresenceStream>, Status> {
        self.admit(&req)?;
        Ok(Response::new(Box::pin(presence_stream(self.stopping()))))
    }
}

/// Raft messages as a peer would send them, for tests that play a replica (a forged sender).
pub mod testing {
    use super::*;

    /// A `Vote` RPC's payload: replica `candidate` asks for votes in `term`.
    pub fn vote_request(candidate: NodeId, term: u64) -> Vec<u8> {
        let req = openraft::raft::VoteRequest::<crate::types::TypeConfig> {
            vote: Vote::new(term, candidate),
            last_log_id: None,
            leadership_transfer: false,
        };
        codec::encode(&req).expect("a vote request encodes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append_from(leader: NodeId) -> pb::RaftPayload {
        let req = AppendRequest {
            vote: Vote::new(3, leader),
            prev_log_id: None,
            leader_commit: None,
            entries: Vec::new(),
        };
        pb::RaftPayload {
            data: codec::encode(&req).unwrap(),
        }
    }

    fn check(faults: Option<Arc<FaultInjector>>) -> MessageCheck {
        MessageCheck {
            proven: Some(2),
            sender: Some(2),
            me: 1,
            faults,
            refused: Arc::default(),
        }
    }

    fn refusal(c: &MessageCheck) -> Status {
        let taken = c.refused.lock().unwrap().take();
        taken.expect("the refusal is kept for the stream to end with")
    }

    #[test]
    fn a_stream_of_appends_is_checked_message_by_message() {
        // Replica 2's certificate, appends in its own name: admitted.
        let c = check(None);
        assert!(c.admit_append(Ok(append_from(2))).is_some());
        assert!(c.refused.lock().unwrap().is_none());
        // One claiming replica 3's leadership: refused, as a unary append would be.
        assert!(c.admit_append(Ok(append_from(3))).is_none());
        assert_eq!(refusal(&c).code(), tonic::Code::PermissionDenied);
        // Bytes that are no append.
        let junk = pb::RaftPayload {
            data: vec![0xff; 3],
        };
        assert!(c.admit_append(Ok(junk)).is_none());
        assert_eq!(refusal(&c).code(), tonic::Code::InvalidArgument);
        // A link this replica's injector cut after the stream opened: refused, marked dropped.
        let faults = Arc::new(FaultInjector::new(1));
        let c = check(Some(faults.clone()));
        assert!(c.admit_append(Ok(append_from(2))).is_some());
        faults.block_one_way(2, 1);
        assert!(c.admit_append(Ok(append_from(2))).is_none());
        let dropped = refusal(&c);
        assert_eq!(dropped.code(), tonic::Code::Unavailable);
        assert!(dropped.metadata().get(DROPPED_KEY).is_some());
    }

    #[test]
    fn a_vote_naming_another_replica_than_the_certificate_is_refused() {
        let vote = Vote::new(3, 2);
        assert!(
            check_vote(Some(2), &vote).is_ok(),
            "replica 2 votes as itself"
        );
        assert!(check_vote(None, &vote).is_ok(), "no TLS: taken as it comes");
        let err = check_vote(Some(1), &vote).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(
            err.message().contains("replica 1's certificate"),
            "{}",
            err.message()
        );
    }
}
