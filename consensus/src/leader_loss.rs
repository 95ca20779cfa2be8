//! Leader-loss detection: a follower that sees its leader's process die campaigns at once, instead
//! of waiting out the leader's lease and its election timeout (1.2-1.6 s at the defaults).
//!
//! Each follower holds a `Presence` stream open toward its leader. The leader sends nothing on it;
//! when the leader's process dies, its kernel closes the connection and the stream ends. The
//! follower then *proves* the process is gone before acting: a fresh TCP connection to the
//! leader's address must be refused (nothing listens on the port, but its host answered). A
//! stream that ended for any other reason (a network blip, a proxy) finds the port open and
//! changes nothing; a leader whose host died or was cut off gives no answer at all, and the
//! election timeout handles it as before.
//!
//! Once proved, the survivors elect without waiting: the lowest-numbered surviving voter starts a
//! campaign at once, the next one a `stagger` later if no leader has appeared by then, and so on,
//! so they do not split the vote. A voter grants such a vote inside its leader's lease only when
//! it has proved the same thing itself ([`LeaderLoss::voter_proves_gone`]): openraft's lease rule
//! is what keeps a live leader from being deposed, and it is set aside only for a leader whose
//! process is provably gone. Safety does not rest on the lease (reads are ReadIndex, confirmed by
//! a quorum), only the stability of a live leader does.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use openraft::type_config::async_runtime::watch::WatchReceiver;
use openraft::vote::RaftLeaderId;
use tokio::sync::watch;

use crate::network::Transport;
use crate::pb;
use crate::types::NodeId;

/// How long a proof may wait for the leader's host to answer. A host that answers refuses at
/// once; one that does not answer is treated as unknown (the election timeout decides).
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);

/// The leader a replica follows: its id, its address and the term it leads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Followed {
    pub leader: NodeId,
    pub addr: String,
    pub term: u64,
}

/// What a probe of the leader's address found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Probe {
    /// Something accepted the connection: the leader's process may well be alive.
    Listening,
    /// The leader's host refused the connection: no process listens there.
    Refused,
    /// No answer in time, or an address that does not resolve: nothing is proved.
    Unknown,
}

/// Connects to `addr` once, within [`PROBE_TIMEOUT`].
pub(crate) async fn probe(addr: &str) -> Probe {
    match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Probe::Listening,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Probe::Refused,
        Ok(Err(_)) | Err(_) => Probe::Unknown,
    }
}

/// The leader this replica follows now, from openraft's metrics; `None` while it leads, campaigns,
/// or knows no leader.
fn followed(raft: &crate::types::RaftOf<impl crate::app::StateMachine>) -> Option<Followed> {
    let metrics = raft.metrics();
    let m = metrics.borrow_watched();
    let leader = m.current_leader?;
    if leader == m.id || m.state != openraft::ServerState::Follower || !m.vote.is_committed() {
        return None;
    }
    let addr = m
        .membership_config
        .membership()
        .get_node(&leader)?
        .addr
        .clone();
    Some(Followed {
        leader,
        addr,
        term: m.vote.leader_id().term(),
    })
}

/// Where this replica stands among the voters that survive `leader`, lowest id first: 0 campaigns
/// at once, 1 after one stagger, ...; `None` when it is not a voter.
fn rank(
    raft: &crate::types::RaftOf<impl crate::app::StateMachine>,
    me: NodeId,
    leader: NodeId,
) -> Option<usize> {
    let metrics = raft.metrics();
    let m = metrics.borrow_watched();
    let rank = m
        .membership_config
        .membership()
        .voter_ids()
        .filter(|id| *id != leader)
        .position(|id| id == me);
    rank
}

/// The proof a replica holds: this leader, in this term, is gone.
#[derive(Clone, Default)]
pub(crate) struct LeaderLoss {
    proved: Arc<Mutex<Option<(NodeId, u64)>>>,
    enabled: bool,
}

impl LeaderLoss {
    pub(crate) fn new(enabled: bool) -> Self {
        LeaderLoss {
            proved: Arc::default(),
            enabled,
        }
    }

    fn remember(&self, f: &Followed) {
        *self.proved.lock().unwrap_or_else(|p| p.into_inner()) = Some((f.leader, f.term));
    }

    fn knows(&self, f: &Followed) -> bool {
        *self.proved.lock().unwrap_or_else(|p| p.into_inner()) == Some((f.leader, f.term))
    }

    /// Whether a vote request from `candidate` may be granted inside this replica's leader lease:
    /// detection is on, this replica follows another leader, and that leader's process is gone
    /// (proved before, or by a probe now). `blocked` says whether injected faults cut the link to
    /// the leader (a drill's partition proves nothing).
    pub(crate) async fn voter_proves_gone(
        &self,
        raft: &crate::types::RaftOf<impl crate::app::StateMachine>,
        candidate: NodeId,
        blocked: impl Fn(NodeId) -> bool,
    ) -> bool {
        if !self.enabled {
            return false;
        }
        let Some(f) = followed(raft) else {
            return false;
        };
        if f.leader == candidate || blocked(f.leader) {
            return false;
        }
        if self.knows(&f) {
            return true;
        }
        if probe(&f.addr).await == Probe::Refused {
            self.remember(&f);
            return true;
        }
        false
    }
}

/// What the watcher needs of its replica.
pub(crate) struct Watcher<S: crate::app::StateMachine> {
    pub raft: crate::types::RaftOf<S>,
    pub transport: Transport,
    pub me: NodeId,
    pub loss: LeaderLoss,
    /// How long each further-ranked survivor waits before it campaigns too.
    pub stagger: Duration,
    pub stop: watch::Receiver<bool>,
}

impl<S: crate::app::StateMachine> Watcher<S> {
    /// Runs until the replica stops: follows whoever leads, holding a presence stream toward it.
    pub(crate) async fn run(self) {
        if !self.loss.enabled {
            return;
        }
        let mut metrics = self.raft.metrics();
        let mut stop = self.stop.clone();
        // The leader and term this replica last proved gone: it acts once per leader and term
        // (its campaign changes the term, or the leader; until openraft says so, it waits).
        let mut acted: Option<Followed> = None;
        loop {
            let f = followed(&self.raft).filter(|f| acted.as_ref() != Some(f));
            let Some(f) = f else {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    r = metrics.changed() => if r.is_err() { return },
                }
                continue;
            };
            let gone = tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                gone = self.attend(&f) => gone,
            };
            if gone {
                self.campaign(&f).await;
                acted = Some(f);
            }
        }
    }

    /// Holds a presence stream to `f`'s leader until it ends or the replica follows someone else;
    /// true when the leader's process is then proved gone.
    async fn attend(&self, f: &Followed) -> bool {
        let mut metrics = self.raft.metrics();
        let still = |raft: &crate::types::RaftOf<S>| followed(raft).as_ref() == Some(f);
        let ended = async {
            match self.transport.presence(self.me, f.leader, &f.addr).await {
                Ok(mut stream) => while let Ok(Some(_)) = stream.message().await {},
                // Unreachable: prove why below.
                Err(s) if s.code() == tonic::Code::Unavailable => {}
                // A link cut by injected faults (a drill's partition), or a leader that does not
                // serve presence (an older build) or refuses this replica: nothing to attend
                // until someone else leads.
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = ended => {}
            _ = async { while metrics.changed().await.is_ok() && still(&self.raft) {} } => return false,
        }
        if !still(&self.raft) {
            return false;
        }
        match probe(&f.addr).await {
            Probe::Refused => {
                self.loss.remember(f);
                true
            }
            // Alive or unknown: try again shortly (a stream that ends at once is retried at most
            // every stagger, not in a tight loop).
            Probe::Listening | Probe::Unknown => {
                tokio::time::sleep(self.stagger).await;
                false
            }
        }
    }

    /// Campaigns for `f`'s term, by rank among the survivors, unless a new leader appears first.
    async fn campaign(&self, f: &Followed) {
        let Some(rank) = rank(&self.raft, self.me, f.leader) else {
            return;
        };
        tracing::info!(
            id = self.me,
            leader = f.leader,
            term = f.term,
            rank,
            "the leader's process is gone (its port refuses connections): electing without waiting for the election timeout"
        );
        let mut metrics = self.raft.metrics();
        let wait = self.stagger * rank as u32;
        let replaced = tokio::time::timeout(wait, async {
            while metrics.changed().await.is_ok() {
                if followed(&self.raft).as_ref() != Some(f) {
                    return;
                }
            }
        });
        if replaced.await.is_ok() {
            return;
        }
        if followed(&self.raft).as_ref() == Some(f) {
            let _ = self.raft.trigger().elect(false).await;
        }
    }
}

/// The presence stream's server side: nothing is sent; it ends when the replica stops.
pub(crate) fn presence_stream(
    stopping: impl std::future::Future<Output = ()> + Send + 'static,
) -> impl futures::Stream<Item = Result<pb::RaftPayload, tonic::Status>> + Send + 'static {
    futures::stream::once(async move {
        stopping.await;
        Err(tonic::Status::unavailable("replica stopping"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_probe_tells_a_listening_port_from_a_refusing_one() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        assert_eq!(probe(&addr).await, Probe::Listening);
        drop(listener);
        assert_eq!(probe(&addr).await, Probe::Refused);
        // An address that does not resolve proves nothing.
        assert_eq!(probe("no-such-replica.invalid:7000").await, Probe::Unknown);
    }

    #[tokio::test]
    async fn a_proof_holds_for_one_leader_and_term() {
        let loss = LeaderLoss::new(true);
        let f = Followed {
            leader: 1,
            addr: "127.0.0.1:1".into(),
            term: 3,
        };
        assert!(!loss.knows(&f));
        loss.remember(&f);
        assert!(loss.knows(&f), "a proof is kept per leader and term");
        assert!(
            !loss.knows(&Followed {
                term: 4,
                ..f.clone()
            }),
            "not for a later term"
        );
        assert!(
            !loss.knows(&Followed { leader: 2, ..f }),
            "nor another leader"
        );
    }
}
