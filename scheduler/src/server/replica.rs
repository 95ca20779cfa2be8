//! [`Replica`]: one `gangway server` process: the Raft replica, its gRPC port (client API, worker
//! API, Raft transport), its HTTP port, and the leader's loops, started and stopped together.

use super::client_api::ClientService;
use super::config::{ConfigError, ServerConfig};
use super::context::ReplicaContext;
use super::fsm::SchedulerFsm;
use super::heartbeats::HeartbeatTracker;
use super::worker_api::WorkerService;
use super::{http, leader};
use gangway_consensus::{CoalescedWrites, ConsensusError, ReplicaConfig, ReplicaHandle, Transport};
use gangway_proto::pb::client_api_server::ClientApiServer;
use gangway_proto::pb::worker_api_server::WorkerApiServer;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_stream::StreamExt;

/// How long a stopping replica waits for open connections to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a replica could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        addr: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("consensus: {0}")]
    Consensus(#[from] ConsensusError),
    #[error("{what} server failed: {message}")]
    Serve { what: &'static str, message: String },
    #[error("{0}")]
    Archive(String),
    #[error("tls: {0}")]
    Tls(String),
}

/// An accepted connection, its replies coalesced ([`CoalescedWrites`]).
fn coalesced<T>(accepted: std::io::Result<T>) -> std::io::Result<CoalescedWrites<T>> {
    accepted.map(CoalescedWrites::new)
}

/// The process-wide Prometheus recorder: installed once, shared by every replica a process runs
/// (tests run several in one process).
fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets(&buckets)
                .expect("static bucket list is non-empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding program): then ours only
            // renders an empty page rather than failing the replica.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            handle
        })
        .clone()
}

pub struct Replica {
    ctx: ReplicaContext,
    grpc_listener: TcpListener,
    http_listener: TcpListener,
    tls: Option<gangway_tls::ServerTls>,
    auth: super::auth::AuthLayer,
    /// The founding voters from `initial_cluster` (empty for a replica that joins a cluster).
    founders: BTreeMap<u64, String>,
}

impl Replica {
    /// Validates the configuration, opens the data directory and binds both ports. A founding
    /// replica (an `initial_cluster`) bootstraps once it serves ([`Self::run`]).
    pub async fn start(config: ServerConfig) -> Result<Self, ServerError> {
        config.validate()?;
        let founders = config.initial_members()?;
        let tls = super::tls_link::ReplicaTls::new(&config)
            .map_err(|e| ServerError::Tls(e.to_string()))?;
        let bind = |addr: String, what| async move {
            TcpListener::bind(&addr)
                .await
                .map_err(|source| ServerError::Bind { addr, what, source })
        };
        let grpc_listener = bind(config.listen.clone(), "grpc").await?;
        let http_listener = bind(config.http.clone(), "http").await?;

        let mut rc = ReplicaConfig::new(config.id, config.advertise_addr(), &config.data_dir);
        rc.election_timeout_min = config.raft.election_timeout_min;
        rc.election_timeout_max = config.raft.election_timeout_max;
        rc.heartbeat_interval = config.raft.heartbeat_interval;
        rc.snapshot_every_entries = config.raft.snapshot_every_entries;
        rc.leader_loss_detection = config.raft.leader_loss_detection;
        // Every Raft message goes through the drill injector; it is empty (delivers everything)
        // unless a drill runs, which the drill handler allows only with `allow_drills`.
        let drills = Arc::new(super::drill::DrillControl::default());
        let transport = Transport::new(tls.peers.clone()).with_faults(drills.faults());
        let archive_dir = std::path::Path::new(&config.data_dir).join("archive");
        let archive = super::archive::JobArchive::open(&archive_dir)
            .map_err(|e| ServerError::Archive(e.to_string()))?;
        let fsm = SchedulerFsm::with_archive(Arc::new(archive));
        let raft = ReplicaHandle::start(rc, fsm, transport).await?;
        let rules_raft = raft.clone();
        let rules: super::auth::Rules =
            Arc::new(move |f| rules_raft.read_local(|fsm| f(fsm.store().access())));
        let auth = super::auth::AuthLayer::new(tls.mode.clone(), rules);
        Ok(Self {
            tls: tls.server,
            founders,
            auth,
            ctx: ReplicaContext {
                raft,
                config: Arc::new(config),
                heartbeats: Arc::new(HeartbeatTracker::new()),
                drills,
                idle: Arc::default(),
                disruption: Arc::new(super::disruption::DisruptionLedger::new()),
                allocations: Arc::default(),
                barrier_term: Arc::default(),
                shutdown: Arc::new(watch::channel(false).0),
            },
            grpc_listener,
            http_listener,
        })
    }

    pub fn grpc_addr(&self) -> std::net::SocketAddr {
        self.grpc_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn http_addr(&self) -> std::net::SocketAddr {
        self.http_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn handle(&self) -> ReplicaHandle<SchedulerFsm> {
        self.ctx.raft.clone()
    }

    /// Serves until `shutdown` resolves, then stops the loops and servers and closes the replica.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let Replica {
            ctx,
            grpc_listener,
            http_listener,
            tls,
            auth,
            founders,
        } = self;
        let stop_rx = ctx.stopping();
        let mut tasks: JoinSet<Result<(), ServerError>> = JoinSet::new();

        let grpc = tonic::transport::Server::builder()
            .layer(auth)
            .add_service(ctx.raft.grpc_service())
            .add_service(ClientApiServer::new(ClientService::new(ctx.clone())))
            .add_service(WorkerApiServer::new(WorkerService::new(ctx.clone())));
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            // Each connection's replies go out together, over TLS when there is TLS.
            let served = match tls {
                Some(tls) => {
                    let incoming = tls.incoming(grpc_listener).map(coalesced);
                    grpc.serve_with_incoming_shutdown(incoming, stopped).await
                }
                None => {
                    let incoming = gangway_tls::plain_incoming(grpc_listener).map(coalesced);
                    grpc.serve_with_incoming_shutdown(incoming, stopped).await
                }
            };
            served.map_err(|e| ServerError::Serve {
                what: "grpc",
                message: e.to_string(),
            })
        });

        // Every founding member asks, in its turn, once it serves; Raft refuses all but a
        // brand-new replica that no leader or candidate has reached. The task then waits for the
        // stop like the others: a task that ends stops the replica.
        if !founders.is_empty() {
            let raft = ctx.raft.clone();
            let mut stop = stop_rx.clone();
            tasks.spawn(async move {
                if raft.bootstrap_as_founder(founders.clone()).await? {
                    tracing::info!(
                        members = ?founders,
                        "new data directory: bootstrapped the founding members"
                    );
                }
                let _ = stop.wait_for(|s| *s).await;
                Ok(())
            });
        }

        let prometheus = prometheus();
        let app = http::router(ctx.clone(), prometheus.clone());
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            axum::serve(http::listener(http_listener), app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
                .map_err(|e| ServerError::Serve {
                    what: "http",
                    message: e.to_string(),
                })
        });

        let c = ctx.clone();
        let s = stop_rx.clone();
        tasks.spawn(async move {
            leader::scheduling_loop(c, s).await;
            Ok(())
        });
        let c = ctx.clone();
        let s = stop_rx.clone();
        tasks.spawn(async move {
            leader::node_down_loop(c, s).await;
            Ok(())
        });
        let c = ctx.clone();
        let s = stop_rx.clone();
        tasks.spawn(async move {
            leader::idle_loop(c, s).await;
            Ok(())
        });
        let c = ctx.clone();
        tasks.spawn(async move {
            c.allocations.clone().run(c).await;
            Ok(())
        });
        let c = ctx.clone();
        let s = stop_rx.clone();
        tasks.spawn(async move {
            http::gauge_loop(c, Duration::from_secs(1), s).await;
            Ok(())
        });

        // Without an installed exporter nobody drains histogram buffers: do it here.
        let mut s = stop_rx.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = s.wait_for(|v| *v) => return Ok(()),
                    _ = tick.tick() => prometheus.run_upkeep(),
                }
            }
        });

        tracing::info!(
            id = ctx.id(),
            grpc = %ctx.config.listen,
            http = %ctx.config.http,
            "replica serving"
        );
        // Run until asked to stop or until a server fails.
        let failure = tokio::select! {
            _ = shutdown => None,
            Some(done) = tasks.join_next() => match done {
                Ok(Err(e)) => Some(e),
                Ok(Ok(())) => None,
                Err(e) => Some(ServerError::Serve { what: "task", message: e.to_string() }),
            },
        };
        let _ = ctx.shutdown.send(true);
        // Servers drain their connections; a client that holds one open cannot keep us up.
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("connections still open after {DRAIN_TIMEOUT:?}; closing them");
            tasks.shutdown().await;
        }
        ctx.raft.shutdown().await?;
        tracing::info!(id = ctx.id(), "replica stopped");
        failure.map_or(Ok(()), Err)
    }
}
