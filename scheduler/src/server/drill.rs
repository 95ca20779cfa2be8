//! Failover drills (`ClientApi.Drill`, driven by `gangway drill`): the replica that receives the
//! call aborts itself as a crash would, or cuts its own Raft links for a while.
//!
//! Why on the replica itself: a drill must exercise the real failure path (a process that dies
//! without flushing anything, a leader whose messages stop arriving), not a clean shutdown or a
//! membership change. The call is never forwarded: an operator aims it at one replica (the CLI aims
//! it at the leader). Nothing runs unless the replica's configuration sets `allow_drills`.

use super::auth::Caller;
use super::context::ReplicaContext;
use super::error::ApiError;
use gangway_consensus::{FaultInjector, NodeId};
use gangway_proto::pb;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Longest partition one drill may ask for: long enough for any failover, short enough that a
/// forgotten drill heals by itself.
pub const MAX_PARTITION: Duration = Duration::from_secs(600);

/// How long an aborting replica waits so its reply to the drill call leaves the process first.
const ABORT_DELAY: Duration = Duration::from_millis(200);

/// This replica's drill state: the fault injector its Raft transport and Raft service consult, and
/// which partition is the current one.
pub struct DrillControl {
    faults: Arc<FaultInjector>,
    /// Bumped by every partition and heal, so the timer of an older partition never heals a newer
    /// one (and a heal cancels the timer).
    generation: AtomicU64,
}

/// When this process started (Unix ms), fixed at the replica's start: `ClusterStatus` reports it so
/// a drill can tell a restarted replica from the one that was there before.
pub fn process_started_ms() -> u64 {
    static STARTED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *STARTED.get_or_init(super::context::wall_clock_ms)
}

impl Default for DrillControl {
    fn default() -> Self {
        // Built once per replica, at its start.
        process_started_ms();
        Self {
            faults: Arc::new(FaultInjector::new(0)),
            generation: AtomicU64::new(0),
        }
    }
}

impl DrillControl {
    /// The injector to wire into the replica's Raft transport (and so its Raft service).
    pub fn faults(&self) -> Arc<FaultInjector> {
        self.faults.clone()
    }

    /// Drops every Raft message between `me` and each of `peers` for `duration`, replacing any
    /// partition under way; heals by itself afterwards.
    pub fn partition(self: &Arc<Self>, me: NodeId, peers: &[NodeId], duration: Duration) {
        self.faults.heal();
        self.faults.isolate(me, peers);
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            if this.generation.load(Ordering::SeqCst) == generation {
                this.faults.heal();
                tracing::warn!("drill: partition over, Raft traffic flows again");
            }
        });
    }

    /// Ends any partition now.
    pub fn heal(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.faults.heal();
    }
}

/// The error for a replica that does not allow drills; names the setting that would allow them.
fn not_allowed(id: u64) -> ApiError {
    ApiError::FailedPrecondition(format!(
        "drills are not allowed on replica {id}: set `allow_drills = true` in its configuration \
         (or start it with --allow-drills)"
    ))
}

/// The replicas a partition cuts off: `peers` checked against the membership, or every other
/// member when empty.
fn partition_peers(
    me: NodeId,
    members: &BTreeSet<NodeId>,
    peers: &[u64],
) -> Result<Vec<NodeId>, ApiError> {
    if peers.is_empty() {
        return Ok(members.iter().copied().filter(|&m| m != me).collect());
    }
    if peers.len() > members.len() {
        return Err(ApiError::invalid(
            "peers",
            format!(
                "expected at most {} replicas (the members), got {}",
                members.len(),
                peers.len()
            ),
        ));
    }
    let mut out = Vec::new();
    for (i, &p) in peers.iter().enumerate() {
        let field = format!("peers[{i}]");
        if p == me {
            return Err(ApiError::invalid(
                &field,
                format!("replica {p} is the one receiving the drill; name other members"),
            ));
        }
        if !members.contains(&p) {
            return Err(ApiError::invalid(
                &field,
                format!("replica {p} is not a member (members: {members:?})"),
            ));
        }
        if !out.contains(&p) {
            out.push(p);
        }
    }
    Ok(out)
}

/// A partition's length from the request: 1 ms to [`MAX_PARTITION`].
fn partition_duration(ms: u64) -> Result<Duration, ApiError> {
    let max = MAX_PARTITION.as_millis() as u64;
    if ms == 0 || ms > max {
        return Err(ApiError::invalid(
            "duration_ms",
            format!("expected 1 to {max} milliseconds (10 minutes), got {ms}"),
        ));
    }
    Ok(Duration::from_millis(ms))
}

/// A drill request that passed every check, ready to start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Drill {
    Abort,
    Partition {
        peers: Vec<NodeId>,
        duration: Duration,
    },
    Heal,
}

impl Drill {
    /// What the audit trail calls it.
    fn action(&self) -> &'static str {
        match self {
            Drill::Abort => "drill_abort",
            Drill::Partition { .. } => "drill_partition",
            Drill::Heal => "drill_heal",
        }
    }
}

/// Checks one `Drill` call on this replica: allowed here, then [`plan`].
pub fn prepare(ctx: &ReplicaContext, req: &pb::DrillRequest) -> Result<Drill, ApiError> {
    let id = ctx.id();
    if !ctx.config.allow_drills {
        return Err(not_allowed(id));
    }
    let members: BTreeSet<NodeId> = ctx.raft.metrics().members.into_keys().collect();
    plan(req, id, &members)
}

/// What a `Drill` request asks replica `me` of `members` to do: a known action with bounded
/// arguments (peers that are other members, a partition of 1 ms to [`MAX_PARTITION`]).
pub fn plan(
    req: &pb::DrillRequest,
    me: NodeId,
    members: &BTreeSet<NodeId>,
) -> Result<Drill, ApiError> {
    let action = pb::DrillAction::try_from(req.action).map_err(|_| {
        ApiError::invalid(
            "action",
            format!("expected ABORT, PARTITION or HEAL, got {}", req.action),
        )
    })?;
    match action {
        pb::DrillAction::Unspecified => Err(ApiError::invalid(
            "action",
            "expected ABORT, PARTITION or HEAL",
        )),
        pb::DrillAction::Abort => Ok(Drill::Abort),
        pb::DrillAction::Partition => {
            let duration = partition_duration(req.duration_ms)?;
            let peers = partition_peers(me, members, &req.peers)?;
            Ok(Drill::Partition { peers, duration })
        }
        pb::DrillAction::Heal => Ok(Drill::Heal),
    }
}

/// Starts a prepared drill on this replica.
pub fn start(ctx: &ReplicaContext, drill: Drill) -> pb::DrillReply {
    let id = ctx.id();
    let reply = pb::DrillReply {
        node_id: id,
        was_leader: ctx.raft.is_leader(),
    };
    match drill {
        Drill::Abort => {
            tracing::warn!(
                was_leader = reply.was_leader,
                "drill: aborting this process as a crash would (no clean shutdown)"
            );
            // A plain thread: it aborts even if the runtime is busy or wedged.
            std::thread::spawn(|| {
                std::thread::sleep(ABORT_DELAY);
                std::process::abort();
            });
        }
        Drill::Partition { peers, duration } => {
            tracing::warn!(
                ?peers,
                duration = %humantime::format_duration(duration),
                was_leader = reply.was_leader,
                "drill: dropping all Raft traffic to and from these replicas"
            );
            ctx.drills.partition(id, &peers, duration);
        }
        Drill::Heal => {
            tracing::warn!("drill: healing, Raft traffic flows again");
            ctx.drills.heal();
        }
    }
    reply
}

/// Serves one `Drill` call on this replica, recorded in the audit trail for `caller`. An abort or a partition is recorded before
/// it starts (afterwards this replica is gone or cut off, and its note could not be committed);
/// a heal after it ends the partition; a refused drill with the refusal's code.
pub async fn run_audited(
    ctx: &ReplicaContext,
    caller: &Caller,
    req: &pb::DrillRequest,
) -> Result<pb::DrillReply, ApiError> {
    let target = format!("replica {}", ctx.id());
    let drill = match prepare(ctx, req) {
        Ok(drill) => drill,
        Err(e) => {
            ctx.audit_note(caller, "drill", target, Some(&e)).await;
            return Err(e);
        }
    };
    let action = drill.action();
    if drill == Drill::Heal {
        let reply = start(ctx, drill);
        ctx.audit_note(caller, action, target, None).await;
        return Ok(reply);
    }
    ctx.audit_note(caller, action, target, None).await;
    Ok(start(ctx, drill))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_peers_default_to_every_other_member_and_are_checked() {
        let members = BTreeSet::from([1, 2, 3]);
        assert_eq!(partition_peers(2, &members, &[]).unwrap(), vec![1, 3]);
        assert_eq!(partition_peers(2, &members, &[3, 3]).unwrap(), vec![3]);
        let cases: [(&[u64], &str); 3] = [
            (&[1, 2], "peers[1]"),
            (&[7], "peers[0]"),
            (&[1, 3, 1, 3], "peers"),
        ];
        for (peers, field) in cases {
            let err = partition_peers(2, &members, peers).unwrap_err().to_string();
            assert!(err.contains(field), "{peers:?}: {err}");
        }
    }

    #[test]
    fn partition_length_is_bounded_and_names_the_field() {
        assert_eq!(partition_duration(10).unwrap(), Duration::from_millis(10));
        for ms in [0, 600_001] {
            let err = partition_duration(ms).unwrap_err().to_string();
            assert!(err.contains("duration_ms"), "{ms}: {err}");
        }
    }

    #[test]
    fn refusal_names_the_setting() {
        let err = not_allowed(3);
        assert_eq!(err.code(), "failed_precondition");
        assert!(err.to_string().contains("allow_drills"), "{err}");
    }

    #[tokio::test]
    async fn a_heal_cancels_the_timer_and_a_newer_partition_outlives_an_older_timer() {
        let d = Arc::new(DrillControl::default());
        let f = d.faults();
        d.partition(1, &[2, 3], Duration::from_millis(30));
        assert!(f.is_blocked(1, 2) && f.is_blocked(3, 1));
        d.heal();
        assert!(!f.is_blocked(1, 2));
        // A partition started after the first one's timer would have fired late is not healed by it.
        d.partition(1, &[2], Duration::from_millis(30));
        d.partition(1, &[3], Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(f.is_blocked(1, 3) && !f.is_blocked(1, 2));
        d.partition(1, &[2], Duration::from_millis(10));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(!f.is_blocked(1, 2) && !f.is_blocked(1, 3));
    }
}
