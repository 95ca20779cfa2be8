//! [`ReplicaHandle`]: everything the application does with its replica.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::RwLock;
use std::time::Duration;

use openraft::errors::InitializeError;
use openraft::errors::LinearizableReadError;
use openraft::errors::RaftError;
use openraft::type_config::async_runtime::watch::WatchReceiver;
use openraft::ChangeMembers;
use openraft::ReadPolicy;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::transport::server::TcpIncoming;

use crate::app::StateChange;
use crate::app::StateMachine;
use crate::codec;
use crate::config::LogStorage;
use crate::config::ReplicaConfig;
use crate::error::ConsensusError;
use crate::error::Result;
use crate::grpc_service::RaftGrpcService;
use crate::leader_loss::LeaderLoss;
use crate::leader_loss::Watcher;
use crate::log_store::wal;
use crate::log_store::AnyLogStore;
use crate::log_store::MemLogStore;
use crate::log_store::StorageHealth;
use crate::log_store::WalLogStore;
use crate::metrics::ReplicaMetrics;
use crate::network::client::NetworkFactory;
use crate::network::transport::CallError;
use crate::network::CoalescedWrites;
use crate::network::Transport;
use crate::pb;
use crate::pb::raft_transport_server::RaftTransportServer;
use crate::snapshot_store::SnapshotStore;
use crate::state_machine::SmState;
use crate::state_machine::StateMachineStore;
use crate::types::Node;
use crate::types::NodeId;
use crate::types::RaftOf;
use crate::write_path;
use crate::write_path::ForwardReply;

/// Capacity of the watcher channel; a watcher further behind than this gets `Lagged`.
const CHANGES_CAPACITY: usize = 4096;

struct Inner<S: StateMachine> {
    config: ReplicaConfig,
    raft: RaftOf<S>,
    state: Arc<RwLock<SmState<S>>>,
    health: StorageHealth,
    transport: Transport,
    changes: broadcast::Sender<StateChange<S::Event>>,
    applied: watch::Receiver<u64>,
    stop: watch::Sender<bool>,
    servers: Mutex<Vec<JoinHandle<()>>>,
    leader_contact: crate::grpc_service::LeaderContact,
    loss: LeaderLoss,
}

/// A running replica. Cheap to clone; all clones drive the same replica.
pub struct ReplicaHandle<S: StateMachine> {
    inner: Arc<Inner<S>>,
}

impl<S: StateMachine> Clone for ReplicaHandle<S> {
    fn clone(&self) -> Self {
        ReplicaHandle {
            inner: self.inner.clone(),
        }
    }
}

fn storage(e: impl std::fmt::Display) -> ConsensusError {
    ConsensusError::Storage(e.to_string())
}

impl<S: StateMachine> ReplicaHandle<S> {
    /// Start a replica: open (or create) its data directory, recover vote, log, committed index,
    /// snapshot and state machine from it, and start Raft. `app` is the empty state; it is replaced
    /// from the on-disk snapshot when there is one.
    ///
    /// The replica does not serve its gRPC endpoint by itself: mount [`Self::grpc_service`] on your
    /// server, or call [`Self::serve`]. A brand-new cluster also needs [`Self::initialize`] once.
    pub async fn start(config: ReplicaConfig, app: S, transport: Transport) -> Result<Self> {
        config.validate()?;
        let raft_config = Arc::new(config.to_openraft()?);
        let health = StorageHealth::default();
        crate::private_dir::ensure_private_dir(&config.data_dir).map_err(storage)?;

        let log_store = match config.log_storage {
            LogStorage::Disk => {
                wal::migrate::from_rocksdb(&config.data_dir).map_err(|e| {
                    storage(format!(
                        "migrate the raft log in {}: {e}",
                        config.data_dir.display()
                    ))
                })?;
                let dir = config.data_dir.join(wal::migrate::DIR);
                AnyLogStore::Wal(open_log_retrying(config.node_id, &dir, &health).await?)
            }
            LogStorage::Memory => AnyLogStore::Memory(MemLogStore::new()),
        };
        let snapshots = SnapshotStore::open(config.data_dir.join("snapshots")).map_err(storage)?;
        let (changes, _) = broadcast::channel(CHANGES_CAPACITY);
        let sm = StateMachineStore::open(app, snapshots, health.clone(), changes.clone())
            .map_err(storage)?;
        let state = sm.state.clone();
        let applied = sm.applied_watch();

        let network = NetworkFactory {
            self_id: config.node_id,
            transport: transport.clone(),
            rpc_timeout: config.rpc_timeout,
            chunk_bytes: config.snapshot_chunk_bytes,
            replication: config.replication,
        };
        let raft = openraft::Raft::new(config.node_id, raft_config, network, log_store, sm)
            .await
            .map_err(|e| write_path::fatal(&health, &e))?;
        let (stop, _) = watch::channel(false);
        let loss = LeaderLoss::new(
            config.leader_loss_detection,
            config.node_id,
            config.heartbeat_interval,
            transport.faults(),
        );
        let watcher = tokio::spawn(
            Watcher {
                raft: raft.clone(),
                transport: transport.clone(),
                loss: loss.clone(),
                stop: stop.subscribe(),
            }
            .run(),
        );
        tracing::info!(id = config.node_id, addr = %config.advertise_addr, "replica started");
        Ok(ReplicaHandle {
            inner: Arc::new(Inner {
                config,
                raft,
                state,
                health,
                transport,
                changes,
                applied,
                stop,
                servers: Mutex::new(vec![watcher]),
                leader_contact: Arc::default(),
                loss,
            }),
        })
    }

    /// This replica's id.
    pub fn id(&self) -> NodeId {
        self.inner.config.node_id
    }

    /// This replica's advertised gRPC address.
    pub fn addr(&self) -> &str {
        &self.inner.config.advertise_addr
    }

    /// Bootstrap a new cluster with these voters (`id -> gRPC address`). Call it on exactly one
    /// replica of a brand-new cluster (several founders: [`Self::bootstrap_as_founder`]); calling
    /// it on an already initialized replica is a no-op, so it is safe to call on every start of
    /// that replica. Returns whether this call initialized it.
    pub async fn initialize(&self, voters: BTreeMap<NodeId, String>) -> Result<bool> {
        let nodes: BTreeMap<NodeId, Node> = voters
            .into_iter()
            .map(|(id, addr)| (id, Node { addr }))
            .collect();
        match self.inner.raft.initialize(nodes).await {
            Ok(()) => Ok(true),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(false),
            Err(RaftError::APIError(e)) => Err(ConsensusError::Rejected(e.to_string())),
            Err(RaftError::Fatal(f)) => Err(write_path::fatal(&self.inner.health, &f)),
        }
    }

    /// Bootstrap a brand-new cluster as one of its founders: every founding replica calls this with
    /// the same `voters`, once it serves its endpoint, and whichever start first form the cluster.
    ///
    /// Founders take turns, lowest id first: the first bootstraps at once, the one ranked `r` waits
    /// `r` longest election timeouts and then bootstraps only if no leader or candidate has reached
    /// it meanwhile (openraft refuses a replica that has seen a vote). A founder that starts after
    /// the cluster formed therefore joins it: bootstrapping would make it a candidate for term 1,
    /// and with a higher id than a term-1 leader it would outrank that leader and depose it (an
    /// election for nothing, right after the cluster formed). A late first founder outranks
    /// nobody: every term-1 leader has a higher id. Returns whether this replica bootstrapped; a
    /// replica that stops while it waits does not.
    pub async fn bootstrap_as_founder(&self, voters: BTreeMap<NodeId, String>) -> Result<bool> {
        let rank = voters.keys().take_while(|id| **id != self.id()).count() as u32;
        let wait = self.inner.config.election_timeout_max * rank;
        let mut stop = self.inner.stop.subscribe();
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return Ok(false),
            _ = tokio::time::sleep(wait) => {}
        }
        self.initialize(voters).await
    }

    /// The tonic service to mount on a gRPC server (`Router::add_service`). It carries Raft
    /// traffic between replicas and writes forwarded by followers.
    pub fn grpc_service(&self) -> RaftTransportServer<RaftGrpcService<S>> {
        RaftTransportServer::new(RaftGrpcService::new(
            self.inner.raft.clone(),
            self.inner.health.clone(),
            self.write_limits(),
            self.id(),
            self.inner.transport.faults(),
            self.inner.leader_contact.clone(),
            crate::grpc_service::PresenceSide {
                loss: self.inner.loss.clone(),
                stop: self.inner.stop.subscribe(),
            },
        ))
        .max_decoding_message_size(crate::network::MAX_RAFT_MESSAGE_BYTES)
        .max_encoding_message_size(crate::network::MAX_RAFT_MESSAGE_BYTES)
    }

    /// The limits of a write proposed here, from the configuration: a leader counts as cut off
    /// after the shortest election timeout without a quorum's acknowledgement, checked every
    /// heartbeat interval.
    fn write_limits(&self) -> write_path::WriteLimits {
        let c = &self.inner.config;
        write_path::WriteLimits {
            timeout: c.write_timeout,
            cut_off_after: c.election_timeout_min,
            poll: c.heartbeat_interval,
        }
    }

    /// Whether this replica leads but is cut off from its quorum ([`write_path::Leadership`]).
    fn cut_off(&self) -> bool {
        write_path::cut_off(&self.inner.raft, self.write_limits().cut_off_after)
    }

    /// Serve [`Self::grpc_service`] alone on `listener` until [`Self::shutdown`].
    pub fn serve(&self, listener: TcpListener) {
        let mut stop = self.inner.stop.subscribe();
        let svc = self.grpc_service();
        let id = self.id();
        let task = tokio::spawn(async move {
            // Server::tcp_nodelay applies only to listeners tonic binds itself: a connection
            // accepted here gets it from TcpIncoming, or small replies wait on Nagle's algorithm
            // for the peer's delayed ACK (tens of milliseconds). Each connection's replies go out
            // together (CoalescedWrites), as on the scheduler's port.
            let incoming = TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .map(|s| s.map(CoalescedWrites::new));
            let res = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = res {
                tracing::error!(id, error = %e, "raft gRPC server failed");
            }
        });
        self.inner
            .servers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
    }

    /// Propose `command` and return the application's response once it is committed and applied
    /// on the replica that proposed it. On a follower the command is forwarded to the leader.
    ///
    /// Retries internally only while it is certain the command was not proposed (no leader yet,
    /// leader unreachable before sending); `Unavailable`/`Timeout` mean the outcome is unknown and
    /// the command may still commit, so only retry commands that are idempotent.
    pub async fn write(&self, command: S::Command) -> Result<S::Response> {
        let bytes = codec::encode(&command).map_err(|e| ConsensusError::Rejected(e.to_string()))?;
        let (_, resp) = self.write_encoded(bytes, true).await?;
        codec::decode(&resp)
            .map_err(|e| ConsensusError::Fatal(format!("undecodable response: {e}")))
    }

    /// Like [`Self::write`] but never forwards: on a follower it fails at once with
    /// [`ConsensusError::NotLeader`] carrying the leader's id and address, for clients that want
    /// to talk to the leader directly.
    pub async fn try_write(&self, command: S::Command) -> Result<S::Response> {
        let bytes = codec::encode(&command).map_err(|e| ConsensusError::Rejected(e.to_string()))?;
        let (_, resp) = self.write_encoded(bytes, false).await?;
        codec::decode(&resp)
            .map_err(|e| ConsensusError::Fatal(format!("undecodable response: {e}")))
    }

    async fn write_encoded(&self, bytes: Vec<u8>, forward: bool) -> Result<(u64, Vec<u8>)> {
        let timeout = self.inner.config.write_timeout;
        let deadline = Instant::now() + timeout;
        let mut last_err;
        loop {
            self.inner.health.check()?;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let attempt = tokio::time::timeout(
                remaining,
                self.write_once(bytes.clone(), forward, remaining),
            )
            .await;
            let err = match attempt {
                Ok(Ok(ok)) => return Ok(ok),
                Ok(Err(e)) => e,
                Err(_) => {
                    return Err(ConsensusError::Timeout(format!(
                        "write not applied within {timeout:?}; outcome unknown"
                    )))
                }
            };
            match &err {
                // Certainly not proposed anywhere: wait for a leader and try again. Not when
                // this replica refused it as a leader cut off from its quorum: its client tries
                // another replica at once rather than wait here for the cut to heal.
                ConsensusError::NotLeader { .. } if forward && !self.cut_off() => {}
                _ => return Err(err),
            }
            last_err = err;
            if Instant::now() + Duration::from_millis(20) >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(ConsensusError::Unavailable(format!(
            "no reachable leader within {timeout:?}; the command was not proposed ({last_err})"
        )))
    }

    async fn write_once(
        &self,
        bytes: Vec<u8>,
        forward: bool,
        remaining: Duration,
    ) -> Result<(u64, Vec<u8>)> {
        let local = write_path::propose_unless_cut_off(
            &self.inner.raft,
            &self.inner.health,
            &self.write_limits(),
            bytes.clone(),
        )
        .await;
        let (leader_id, leader_addr) = match &local {
            Err(ConsensusError::NotLeader {
                leader_id: Some(l),
                leader_addr: Some(a),
            }) if forward && *l != self.id() => (*l, a.clone()),
            _ => return local,
        };
        let req = crate::network::tagged(self.id(), pb::ForwardWriteRequest { command: bytes });
        let reply = self
            .inner
            .transport
            .call(
                self.id(),
                leader_id,
                &leader_addr,
                remaining,
                |mut c| async move { c.forward_write(req).await },
            )
            .await;
        match reply {
            Ok(r) => match codec::decode::<ForwardReply>(&r.data) {
                Ok(ForwardReply::Applied { index, response }) => Ok((index, response)),
                Ok(ForwardReply::Failed(w)) => Err(w.into()),
                Err(e) => Err(ConsensusError::Unavailable(format!(
                    "undecodable reply from leader {leader_id}; outcome unknown: {e}"
                ))),
            },
            // Never left this replica: as good as NotLeader (retry once a leader is reachable).
            Err(CallError::NotSent(m)) => {
                tracing::debug!(leader_id, error = %m, "forward not sent");
                Err(ConsensusError::NotLeader {
                    leader_id: Some(leader_id),
                    leader_addr: Some(leader_addr),
                })
            }
            Err(CallError::NoReply(m)) => Err(ConsensusError::Unavailable(format!(
                "forwarded to leader {leader_id}, no reply; outcome unknown: {m}"
            ))),
            Err(CallError::Timeout(d)) => Err(ConsensusError::Timeout(format!(
                "forwarded to leader {leader_id}, no reply within {d:?}; outcome unknown"
            ))),
        }
    }

    /// Linearizable read: confirm leadership with a quorum (ReadIndex), wait until this replica has
    /// applied up to the read index, then run `f` on the state. Only the leader serves these; a
    /// follower answers `NotLeader` with the leader's address.
    pub async fn read<R>(&self, f: impl FnOnce(&S) -> R) -> Result<R> {
        self.inner.health.check()?;
        let timeout = self.inner.config.write_timeout;
        let r = tokio::time::timeout(
            timeout,
            self.inner.raft.ensure_linearizable(ReadPolicy::ReadIndex),
        )
        .await;
        match r {
            Err(_) => {
                return Err(ConsensusError::Timeout(format!(
                    "read index not confirmed within {timeout:?}"
                )))
            }
            Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f)))) => {
                return Err(write_path::not_leader(&f))
            }
            Ok(Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(q)))) => {
                return Err(ConsensusError::Unavailable(q.to_string()))
            }
            Ok(Err(RaftError::Fatal(f))) => return Err(write_path::fatal(&self.inner.health, &f)),
            Ok(Ok(_)) => {}
        }
        Ok(self.read_local(f))
    }

    /// Read the local state without any consistency check: may be stale on a follower or a deposed
    /// leader. For status pages and debugging, never for decisions.
    pub fn read_local<R>(&self, f: impl FnOnce(&S) -> R) -> R {
        let g = self.inner.state.read().unwrap_or_else(|p| p.into_inner());
        f(&g.app)
    }

    /// Application events and snapshot installs, as they are applied on this replica.
    pub fn subscribe(&self) -> broadcast::Receiver<StateChange<S::Event>> {
        self.inner.changes.subscribe()
    }

    /// The last applied log index on this replica, as a watch.
    pub fn watch_applied(&self) -> watch::Receiver<u64> {
        self.inner.applied.clone()
    }

    /// Current metrics.
    pub fn metrics(&self) -> ReplicaMetrics {
        let m = self.inner.raft.metrics().borrow_watched().clone();
        ReplicaMetrics::from_raft(&m, self.inner.health.error())
    }

    /// Whether this replica currently believes it is the leader.
    pub fn is_leader(&self) -> bool {
        // Called on hot paths (every heartbeat and API call): read the one field instead of
        // building a whole `ReplicaMetrics`.
        self.inner.raft.metrics().borrow_watched().state == openraft::ServerState::Leader
    }

    /// Whether this replica leads AND a quorum acknowledged it within `within`. A leader cut off
    /// from the others keeps believing it leads until it hears of a newer term; meanwhile the
    /// others elect a new one. Whatever must come from the current leader (worker heartbeats,
    /// allocation streams) asks this instead of [`Self::is_leader`]. A single voter is its own
    /// quorum.
    pub fn is_confirmed_leader(&self, within: Duration) -> bool {
        write_path::leadership(&self.inner.raft, within) == write_path::Leadership::Confirmed
    }

    /// How long since a leader this replica accepts last sent it entries or a heartbeat; `None`
    /// if none has since it started. A follower that stops hearing from the leader (cut off, or
    /// removed from the cluster: removal usually reaches the others first, and the leader then
    /// stops talking to it) still names that leader; this tells it is stale.
    pub fn since_leader_contact(&self) -> Option<Duration> {
        self.inner
            .leader_contact
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|at| at.elapsed())
    }

    /// The leader this replica knows of, with its address.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.inner.raft.metrics().borrow_watched().clone();
        let id = m.current_leader?;
        let addr = m
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())?;
        Some((id, addr))
    }

    /// Wait until this replica knows a leader (or `timeout`).
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId> {
        let mut rx = self.inner.raft.metrics();
        let r = tokio::time::timeout(timeout, async {
            loop {
                if let Some(l) = rx.borrow_and_update().current_leader {
                    return Ok(l);
                }
                if rx.changed().await.is_err() {
                    return Err(ConsensusError::Shutdown);
                }
            }
        })
        .await;
        r.unwrap_or_else(|_| {
            Err(ConsensusError::Timeout(format!(
                "no leader within {timeout:?}"
            )))
        })
    }

    /// Wait until this replica has applied `index` (or `timeout`).
    pub async fn wait_for_applied(&self, index: u64, timeout: Duration) -> Result<()> {
        let mut rx = self.inner.applied.clone();
        tokio::time::timeout(timeout, rx.wait_for(|a| *a >= index))
            .await
            .map_err(|_| {
                ConsensusError::Timeout(format!("index {index} not applied within {timeout:?}"))
            })?
            .map_err(|_| ConsensusError::Shutdown)?;
        Ok(())
    }

    fn leader_only(&self) -> Result<()> {
        if self.is_leader() {
            return Ok(());
        }
        let (leader_id, leader_addr) = match self.leader() {
            Some((i, a)) => (Some(i), Some(a)),
            None => (None, None),
        };
        Err(ConsensusError::NotLeader {
            leader_id,
            leader_addr,
        })
    }

    async fn change(&self, change: ChangeMembers<NodeId, Node>) -> Result<()> {
        self.inner.health.check()?;
        let timeout = self.inner.config.write_timeout;
        match tokio::time::timeout(timeout, self.inner.raft.change_membership(change, false)).await
        {
            Err(_) => Err(ConsensusError::Timeout(format!(
                "membership change not committed within {timeout:?}"
            ))),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(write_path::write_error(&self.inner.health, &e)),
        }
    }

    /// Leader only: add a non-voting replica and wait until it has caught up with the log.
    pub async fn add_learner(&self, id: NodeId, addr: impl Into<String>) -> Result<()> {
        self.inner.health.check()?;
        let node = Node { addr: addr.into() };
        let timeout = self.inner.config.write_timeout;
        match tokio::time::timeout(timeout, self.inner.raft.add_learner(id, node, true)).await {
            Err(_) => Err(ConsensusError::Timeout(format!(
                "learner {id} not caught up within {timeout:?}"
            ))),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(write_path::write_error(&self.inner.health, &e)),
        }
    }

    /// Leader only: make these learners voters (joint consensus, committed before returning).
    pub async fn promote(&self, ids: BTreeSet<NodeId>) -> Result<()> {
        self.change(ChangeMembers::AddVoterIds(ids)).await
    }

    /// Leader only: remove these replicas (voters or learners) from the cluster entirely.
    pub async fn remove(&self, ids: BTreeSet<NodeId>) -> Result<()> {
        let voters: BTreeSet<NodeId> = self.metrics().voters.intersection(&ids).copied().collect();
        if !voters.is_empty() {
            self.change(ChangeMembers::RemoveVoters(voters)).await?;
        }
        let learners: BTreeSet<NodeId> = self
            .metrics()
            .learners
            .intersection(&ids)
            .copied()
            .collect();
        if !learners.is_empty() {
            self.change(ChangeMembers::RemoveNodes(learners)).await?;
        }
        Ok(())
    }

    /// Leader only: hand leadership to `to` and wait until this replica sees it as leader.
    pub async fn transfer_leader(&self, to: NodeId) -> Result<()> {
        self.leader_only()?;
        if to == self.id() {
            return Ok(());
        }
        if !self.metrics().voters.contains(&to) {
            return Err(ConsensusError::Rejected(format!(
                "replica {to} is not a voter"
            )));
        }
        self.inner
            .raft
            .trigger()
            .transfer_leader(to)
            .await
            .map_err(|f| write_path::fatal(&self.inner.health, &f))?;
        let timeout = self.inner.config.write_timeout;
        let mut rx = self.inner.raft.metrics();
        tokio::time::timeout(timeout, rx.wait_until(|m| m.current_leader == Some(to)))
            .await
            .map_err(|_| {
                ConsensusError::Timeout(format!(
                    "leadership not transferred to {to} within {timeout:?}"
                ))
            })?
            .map_err(|_| ConsensusError::Shutdown)?;
        Ok(())
    }

    /// Build a snapshot now (instead of waiting for the policy) and wait until it exists; returns
    /// the last log index it covers.
    pub async fn trigger_snapshot(&self) -> Result<u64> {
        self.inner.health.check()?;
        let target = *self.inner.applied.borrow();
        self.inner
            .raft
            .trigger()
            .snapshot()
            .await
            .map_err(|f| write_path::fatal(&self.inner.health, &f))?;
        let timeout = self.inner.config.write_timeout;
        let mut rx = self.inner.raft.metrics();
        let m = tokio::time::timeout(
            timeout,
            rx.wait_until(|m| m.snapshot.as_ref().map(|l| l.index).unwrap_or(0) >= target),
        )
        .await
        .map_err(|_| ConsensusError::Timeout(format!("snapshot not built within {timeout:?}")))?
        .map_err(|_| ConsensusError::Shutdown)?;
        Ok(m.snapshot.as_ref().map(|l| l.index).unwrap_or(0))
    }

    /// Purge the log up to `index` (must be covered by a snapshot). Normally the snapshot policy
    /// does this; tests use it to force a lagging replica to catch up by snapshot.
    pub async fn purge_log(&self, index: u64) -> Result<()> {
        self.inner
            .raft
            .trigger()
            .purge_log(index)
            .await
            .map_err(|f| write_path::fatal(&self.inner.health, &f))?;
        let timeout = self.inner.config.write_timeout;
        let mut rx = self.inner.raft.metrics();
        tokio::time::timeout(
            timeout,
            rx.wait_until(|m| m.purged.as_ref().map(|l| l.index).unwrap_or(0) >= index),
        )
        .await
        .map_err(|_| {
            ConsensusError::Timeout(format!("log not purged to {index} within {timeout:?}"))
        })?
        .map_err(|_| ConsensusError::Shutdown)?;
        Ok(())
    }

    /// Test hook: make this replica's storage fail as an fsync failure would. The next log append
    /// (forced here with a blank entry) fails, openraft stops the Raft core, and the replica
    /// refuses writes with `Storage` from then on, so the rest of the cluster elects a new leader.
    #[doc(hidden)]
    pub async fn inject_storage_failure(&self, what: &str) {
        self.inner.health.fail(what);
        let _ = tokio::time::timeout(self.inner.config.rpc_timeout, self.inner.raft.write_blank())
            .await;
    }

    /// Stop Raft and the servers started by [`Self::serve`], and release the data directory.
    pub async fn shutdown(&self) -> Result<()> {
        let _ = self.inner.stop.send(true);
        let res = self.inner.raft.shutdown().await;
        let tasks: Vec<_> =
            std::mem::take(&mut *self.inner.servers.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
        res.map_err(|e| ConsensusError::Fatal(format!("raft core did not stop cleanly: {e}")))
    }
}

/// Open replica `id`'s log, retrying briefly while a previous incarnation in the same process
/// (tests) still holds its lock while its last tasks wind down.
async fn open_log_retrying(
    id: NodeId,
    dir: &std::path::Path,
    health: &StorageHealth,
) -> Result<WalLogStore> {
    let mut tries = 0;
    loop {
        match WalLogStore::open(dir, health.clone()) {
            Ok(s) => return Ok(s.of_replica(id)),
            // The previous store still holds the directory's lock.
            Err(e) if tries < 100 && e.kind() == std::io::ErrorKind::WouldBlock => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(storage(format!("open raft log at {}: {e}", dir.display()))),
        }
    }
}
