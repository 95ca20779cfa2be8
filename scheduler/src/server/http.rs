//! The replica's HTTP port: `/metrics` (Prometheus text), `/livez` and `/readyz` for supervisors and
//! load balancers, and the loop that keeps the cluster-state gauges current.

use super::context::ReplicaContext;
use crate::engine::{DeviceKind, NodeState, TopologyLevel, MILLI_PER_DEVICE};
use crate::state::{DeviceHealth, FenceSource, JobState};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use gangway_consensus::Role;
use metrics_exporter_prometheus::PrometheusHandle;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio::sync::watch;

#[derive(Clone)]
struct HttpState {
    ctx: ReplicaContext,
    prometheus: PrometheusHandle,
}

pub fn router(ctx: ReplicaContext, prometheus: PrometheusHandle) -> Router {
    Router::new()
        .route("/metrics", get(metrics_page))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(HttpState { ctx, prometheus })
}

/// The HTTP listener as served: Nagle's algorithm off on every connection it accepts. axum, like
/// tonic with a listener it did not bind, leaves an accepted socket as the kernel made it, and a
/// small reply (a probe, a metrics page) would then wait on the peer's delayed ACK.
pub fn listener(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY on an accepted HTTP connection");
        }
    })
}

async fn metrics_page(State(s): State<HttpState>) -> String {
    s.prometheus.render()
}

/// Alive unless storage failed: a replica that cannot persist must be restarted (or replaced).
async fn livez(State(s): State<HttpState>) -> (StatusCode, String) {
    match s.ctx.raft.metrics().storage_error {
        Some(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("storage failed: {e}\n"),
        ),
        None => (StatusCode::OK, "ok\n".to_owned()),
    }
}

/// Ready when this replica is a member that knows a leader and has applied what it knows is
/// committed (within a small lag): then its answers, and its redirects, are current.
async fn readyz(State(s): State<HttpState>) -> (StatusCode, String) {
    let m = s.ctx.raft.metrics();
    let unready = |why: String| (StatusCode::SERVICE_UNAVAILABLE, why + "\n");
    if let Some(e) = m.storage_error {
        return unready(format!("storage failed: {e}"));
    }
    if matches!(m.role, Role::Shutdown) {
        return unready("shutting down".into());
    }
    if !m.members.contains_key(&m.id) {
        // Not added yet (started with no initial cluster): it takes no part.
        return unready(format!("replica {} is not a member of the cluster", m.id));
    }
    let Some(leader) = m.leader else {
        return unready("no leader known".into());
    };
    if leader != m.id {
        // A follower cut off from the leader, or removed from the cluster (it usually never
        // learns: the leader stops talking to it first), still names the leader it last knew.
        let bound = s.ctx.config.raft.election_timeout_max * 2;
        match s.ctx.raft.since_leader_contact() {
            Some(quiet) if quiet <= bound => {}
            Some(quiet) => {
                return unready(format!(
                    "no word from leader {leader} for {}",
                    humantime::format_duration(Duration::from_millis(
                        u64::try_from(quiet.as_millis()).unwrap_or(u64::MAX)
                    ))
                ))
            }
            None => return unready(format!("no word from leader {leader} yet")),
        }
    }
    let committed = m.committed_index.unwrap_or(0);
    let applied = m.applied_index.unwrap_or(0);
    if committed.saturating_sub(applied) > 1_000 {
        return unready(format!(
            "applying: {applied} of {committed} committed entries"
        ));
    }
    (
        StatusCode::OK,
        format!("ready: leader {leader}, applied {applied}\n"),
    )
}

/// Refreshes the cluster-state gauges every `period` on every replica (followers report their view,
/// so a dashboard may scrape any of them).
pub async fn gauge_loop(ctx: ReplicaContext, period: Duration, mut stop: watch::Receiver<bool>) {
    let mut queues_seen: BTreeSet<String> = BTreeSet::new();
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        let m = ctx.raft.metrics();
        metrics::gauge!("gangway_raft_term").set(m.term as f64);
        metrics::gauge!("gangway_raft_is_leader").set(if m.role == Role::Leader {
            1.0
        } else {
            0.0
        });
        metrics::gauge!("gangway_raft_commit_index").set(m.committed_index.unwrap_or(0) as f64);
        metrics::gauge!("gangway_raft_applied_index").set(m.applied_index.unwrap_or(0) as f64);

        let (pending, running, nodes, devices, defrag) = ctx.raft.read_local(|fsm| {
            let store = fsm.store();
            let engine = store.engine();
            // From the job table's indexes: costs what is live, never the history.
            let table = store.job_table();
            let defrag = (
                table.migrating().count(),
                store.reservations().count(),
                [TopologyLevel::Host, TopologyLevel::Rack, TopologyLevel::Pod]
                    .map(|l| (l, crate::engine::scattered_free_permille(engine, l))),
            );
            let pending: BTreeMap<String, u64> = table
                .pending_by_queue()
                .map(|(q, n)| (q.to_owned(), n as u64))
                .collect();
            let mut running: BTreeMap<String, u64> = BTreeMap::new();
            for j in table.running().filter(|j| j.state == JobState::Running) {
                *running.entry(j.spec.queue.clone()).or_default() += 1;
            }
            let mut nodes: BTreeMap<String, u64> = BTreeMap::new();
            // Devices by health, and fenced devices by who fenced them (read in place: a
            // device without a record, from an older snapshot, is healthy).
            let mut health: BTreeMap<DeviceHealth, u64> = BTreeMap::new();
            let mut fenced: BTreeMap<FenceSource, u64> = BTreeMap::new();
            for n in store.nodes().values() {
                *nodes.entry(n.state.to_string()).or_default() += 1;
                let unrecorded = n.registration.devices.len().saturating_sub(n.devices.len());
                *health.entry(DeviceHealth::Healthy).or_default() += unrecorded as u64;
                for d in &n.devices {
                    *health.entry(d.health).or_default() += 1;
                    if let Some(f) = &d.fence {
                        *fenced.entry(f.source).or_default() += 1;
                    }
                }
            }
            // (kind, leased milli, total milli) over every registered device.
            let mut devices: BTreeMap<DeviceKind, (u64, u64)> =
                [(DeviceKind::Gpu, (0, 0)), (DeviceKind::Tpu, (0, 0))].into();
            for h in engine.hosts() {
                for (i, d) in h.spec.devices.iter().enumerate() {
                    let Some(kind) = engine.model(&d.model).map(|m| m.kind) else {
                        continue;
                    };
                    let e = devices.entry(kind).or_default();
                    // A fenced device's free part is held back, not leased.
                    let held = h.fenced.get(&(i as u16)).copied().unwrap_or(0);
                    let free = u64::from(h.free_milli.get(i).copied().unwrap_or(0) + held);
                    e.0 += u64::from(MILLI_PER_DEVICE).saturating_sub(free);
                    e.1 += u64::from(MILLI_PER_DEVICE);
                }
            }
            (pending, running, (nodes, health, fenced), devices, defrag)
        });
        let (nodes, health, fenced) = nodes;
        for h in [
            DeviceHealth::Healthy,
            DeviceHealth::Degraded,
            DeviceHealth::Failed,
        ] {
            let n = health.get(&h).copied().unwrap_or(0);
            metrics::gauge!("gangway_devices_by_health", "health" => h.to_string()).set(n as f64);
        }
        for source in [
            FenceSource::Health,
            FenceSource::Absent,
            FenceSource::Operator,
        ] {
            let n = fenced.get(&source).copied().unwrap_or(0);
            metrics::gauge!("gangway_fenced_devices", "source" => source.to_string()).set(n as f64);
        }
        let (migrating, reservations, fragmentation) = defrag;
        metrics::gauge!("gangway_migrations_in_flight").set(migrating as f64);
        metrics::gauge!("gangway_defrag_reservations").set(reservations as f64);
        for (level, permille) in fragmentation {
            metrics::gauge!("gangway_fragmentation_pct", "level" => level.to_string())
                .set(permille as f64 / 10.0);
        }
        queues_seen.extend(pending.keys().cloned());
        queues_seen.extend(running.keys().cloned());
        for q in &queues_seen {
            let p = pending.get(q).copied().unwrap_or(0);
            let r = running.get(q).copied().unwrap_or(0);
            metrics::gauge!("gangway_pending_jobs", "queue" => q.clone()).set(p as f64);
            metrics::gauge!("gangway_running_jobs", "queue" => q.clone()).set(r as f64);
        }
        for state in [
            NodeState::Ready,
            NodeState::Cordoned,
            NodeState::Draining,
            NodeState::Down,
        ] {
            let s = state.to_string();
            let n = nodes.get(&s).copied().unwrap_or(0);
            metrics::gauge!("gangway_nodes", "state" => s).set(n as f64);
        }
        for (kind, (leased, total)) in devices {
            let k = kind.to_string();
            let allocated = leased as f64 / f64::from(MILLI_PER_DEVICE);
            metrics::gauge!("gangway_allocated_devices", "kind" => k.clone()).set(allocated);
            metrics::gauge!("gangway_devices", "kind" => k)
                .set(total as f64 / f64::from(MILLI_PER_DEVICE));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener;

    #[tokio::test]
    async fn accepted_connections_send_small_replies_at_once() {
        let bound = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = bound.local_addr().unwrap();
        let mut served = listener(bound);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = served.accept().await;
        assert!(accepted.nodelay().unwrap(), "accepted without TCP_NODELAY");
    }
}
