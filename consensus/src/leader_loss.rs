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
//! A dying process's listening socket can close a moment after its connections do, so a follower
//! whose first probe still finds the port open probes again 1, 2, 4, ... ms later, for up to one
//! `stagger`, before it decides the leader lives.
//!
//! Once proved, the survivors elect without waiting, each in its own slots so that they do not
//! split the vote: counted from when its stream ended, the lowest-numbered surviving voter may
//! campaign at once, the next one a `stagger` later if no leader has appeared by then, and so on
//! round the survivors ([`slot_wait`]). One whose proof comes late (its probes saw the port open a
//! while) waits for its next slot rather than campaigning beside the survivor whose slot it is.
//! One that refuses an earlier survivor's vote because that survivor's log is behind its own (the
//! leader died having replicated its last entries to some followers only) campaigns at once: the
//! one refused cannot win, and waiting for the slot would cost a stagger.
//!
//! A voter grants such a vote inside its leader's lease only when it has proved the same thing
//! itself, and only for the term right after the lost leader's
//! ([`LeaderLoss::voter_proves_gone`]): openraft's lease rule is what keeps a live leader from
//! being deposed, and it is set aside only for a leader whose process is provably gone, never for
//! the one elected after it. A candidate decides to campaign from openraft's own state, read
//! inside its core, not from its metrics (which trail the core): a survivor that has just granted
//! another's vote, or follows a new leader, does not campaign on its proof about the old one
//! (that would depose the new leader, and the survivors would sit out an election timeout). The
//! decision and the votes this replica hands openraft take turns ([`LeaderLoss::gate`]). Safety
//! does not rest on the lease (reads are ReadIndex, confirmed by a quorum), only the stability of
//! a live leader does.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use openraft::type_config::async_runtime::watch::WatchReceiver;
use openraft::vote::RaftLeaderId;
use tokio::sync::watch;

use crate::network::FaultInjector;
use crate::network::Transport;
use crate::pb;
use crate::types::NodeId;
use crate::types::Vote;

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

impl Followed {
    /// The leader and term a proof, or a campaign for its succession, is about.
    fn key(&self) -> (NodeId, u64) {
        (self.leader, self.term)
    }
}

/// What a probe of the leader's address found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Probe {
    /// Something accepted the connection, or reset it while accepting (a listening socket that
    /// closed under the handshake: its process is dying, or restarting): the leader's process may
    /// well be alive, and a probe a moment later tells.
    Listening,
    /// The leader's host refused the connection: no process listens there.
    Refused,
    /// No answer in time, or an address that does not resolve: nothing is proved.
    Unknown,
}

/// Connects to `addr` once, within [`PROBE_TIMEOUT`].
pub(crate) async fn probe(addr: &str) -> Probe {
    use std::io::ErrorKind;
    match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Probe::Listening,
        Ok(Err(e)) => match e.kind() {
            ErrorKind::ConnectionRefused => Probe::Refused,
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => Probe::Listening,
            _ => Probe::Unknown,
        },
        Err(_) => Probe::Unknown,
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

/// Where this replica stands among the voters that survive `leader`, lowest id first (0 campaigns
/// first, 1 one stagger later, ...), and how many survive; `None` when it is not a voter.
fn rank(
    raft: &crate::types::RaftOf<impl crate::app::StateMachine>,
    me: NodeId,
    leader: NodeId,
) -> Option<(usize, usize)> {
    let metrics = raft.metrics();
    let m = metrics.borrow_watched();
    let survivors: Vec<NodeId> = m
        .membership_config
        .membership()
        .voter_ids()
        .filter(|id| *id != leader)
        .collect();
    let rank = survivors.iter().position(|id| *id == me)?;
    Some((rank, survivors.len()))
}

/// How long a survivor of `rank` among `survivors` waits, `elapsed` after its presence stream
/// ended, before it may campaign. Its slots start at `rank` staggers and recur every `survivors`
/// staggers; it campaigns at once inside the first half of a slot, and otherwise waits for its next
/// slot, so two survivors never campaign within half a stagger of each other. A lone survivor has
/// nobody to split the vote with: it campaigns at once.
fn slot_wait(rank: usize, survivors: usize, stagger: Duration, elapsed: Duration) -> Duration {
    if survivors <= 1 || stagger.is_zero() {
        return Duration::ZERO;
    }
    let (stagger, elapsed) = (stagger.as_nanos(), elapsed.as_nanos());
    let (first, cycle) = (stagger * rank as u128, stagger * survivors as u128);
    let slot = if elapsed < first {
        first
    } else {
        first + (elapsed - first) / cycle * cycle
    };
    let at = if elapsed < slot + stagger / 2 {
        slot
    } else {
        slot + cycle
    };
    Duration::from_nanos(at.saturating_sub(elapsed).try_into().unwrap_or(u64::MAX))
}

/// Whether `vote` (openraft's own, read inside its core) is still the one `f` records: the same
/// leader's, in the same term, committed. A replica that has granted a newer candidate's vote, or
/// follows a newer leader, holds another.
fn still_follows(vote: &Vote, f: &Followed) -> bool {
    vote.is_committed()
        && vote.leader_id().term() == f.term
        && vote.leader_id().node_id() == &f.leader
}

/// What trying to prove a leader's process gone found.
#[derive(Debug, PartialEq, Eq)]
enum Proved {
    /// Its port refuses connections.
    Gone,
    /// Its port still accepts them, or its host did not answer: the last probe.
    NotGone(Probe),
    /// This replica no longer follows it.
    Moved,
}

/// A voter's proof that the leader it followed is gone, for the vote request that asked.
pub(crate) struct Proof(Followed);

/// What a replica's watcher and its vote handler share: the proof it holds (this leader, in this
/// term, is gone), the turn they take, and the word that it should campaign at once.
#[derive(Clone)]
pub(crate) struct LeaderLoss {
    proved: Arc<Mutex<Option<(NodeId, u64)>>>,
    enabled: bool,
    me: NodeId,
    /// How long a port found open is probed again before it counts as alive.
    stagger: Duration,
    /// Injected faults (tests and drills): a port they keep lingering proves nothing.
    faults: Option<Arc<FaultInjector>>,
    /// Taken by a campaign's decision and by each vote request this replica hands openraft, so
    /// that no vote is granted between reading the core's state and starting the campaign.
    gate: Arc<tokio::sync::Mutex<()>>,
    /// The lost leader (and term) whose succession this replica should campaign for now, not in
    /// its slot: it refused a survivor whose log is behind its own ([`Self::refused_behind`]).
    now: Arc<AtOnce>,
}

/// The lost leader and term a replica should campaign for at once, and a wake-up for its watcher.
#[derive(Default)]
struct AtOnce {
    succession: Mutex<Option<(NodeId, u64)>>,
    changed: tokio::sync::Notify,
}

impl LeaderLoss {
    pub(crate) fn new(
        enabled: bool,
        me: NodeId,
        stagger: Duration,
        faults: Option<Arc<FaultInjector>>,
    ) -> Self {
        LeaderLoss {
            proved: Arc::default(),
            enabled,
            me,
            stagger,
            faults,
            gate: Arc::default(),
            now: Arc::default(),
        }
    }

    /// This replica, having proved `f`'s leader gone, refused a survivor's vote because that
    /// survivor's log is behind its own: that survivor cannot win, this one can, so its campaign
    /// starts at once instead of in its slot.
    pub(crate) fn refused_behind(&self, f: &Proof) {
        *self
            .now
            .succession
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(f.0.key());
        self.now.changed.notify_waiters();
    }

    /// Resolves once this replica should campaign for `f`'s succession at once.
    async fn urgent(&self, f: &Followed) {
        loop {
            let notified = self.now.changed.notified();
            let succession = *self
                .now
                .succession
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if succession == Some(f.key()) {
                return;
            }
            notified.await;
        }
    }

    fn remember(&self, f: &Followed) {
        *self.proved.lock().unwrap_or_else(|p| p.into_inner()) = Some(f.key());
    }

    fn knows(&self, f: &Followed) -> bool {
        *self.proved.lock().unwrap_or_else(|p| p.into_inner()) == Some(f.key())
    }

    /// Probes `f`'s leader's port (through injected faults, which may keep it lingering).
    async fn probe(&self, f: &Followed) -> Probe {
        if self
            .faults
            .as_ref()
            .is_some_and(|x| x.lingers(self.me, f.leader))
        {
            return Probe::Listening;
        }
        probe(&f.addr).await
    }

    /// Probes `f`'s leader's port until it refuses (then remembered), a probe gets no answer, or
    /// `until` passes with the port still open; `still` ends it early once this replica no longer
    /// follows `f`. A port found open is probed again 1, 2, 4, ... ms later: a dying process's
    /// listening socket can outlive its connections by a moment.
    async fn prove(&self, f: &Followed, until: Instant, still: impl Fn() -> bool) -> Proved {
        let mut pause = Duration::from_millis(1);
        while still() {
            match self.probe(f).await {
                Probe::Refused => {
                    self.remember(f);
                    return Proved::Gone;
                }
                Probe::Listening if Instant::now() < until => {
                    tokio::time::sleep(pause.min(until - Instant::now())).await;
                    pause *= 2;
                }
                last @ (Probe::Listening | Probe::Unknown) => return Proved::NotGone(last),
            }
        }
        Proved::Moved
    }

    /// Held while this replica hands openraft a vote request: a campaign's decision (read the
    /// core's vote, then elect) takes it too, so the two never interleave.
    pub(crate) async fn gate(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.gate.lock().await
    }

    /// The proof that lets a vote request from `candidate` for `term` be granted inside this
    /// replica's leader lease, if it holds: detection is on, this replica follows another leader,
    /// the request is for the term right after that leader's (a campaign for its succession, not
    /// against the leader elected after it), and that leader's process is gone (proved before, or
    /// by a probe now). `blocked` says whether injected faults cut the link to the leader (a
    /// drill's partition proves nothing).
    pub(crate) async fn voter_proves_gone(
        &self,
        raft: &crate::types::RaftOf<impl crate::app::StateMachine>,
        (candidate, term): (NodeId, u64),
        blocked: impl Fn(NodeId) -> bool,
    ) -> Option<Proof> {
        if !self.enabled {
            return None;
        }
        let f = followed(raft)?;
        if f.leader == candidate || term != f.term + 1 || blocked(f.leader) {
            return None;
        }
        let proved = self.knows(&f)
            || self.prove(&f, Instant::now() + self.stagger, || true).await == Proved::Gone;
        proved.then_some(Proof(f))
    }
}

/// What the watcher needs of its replica.
pub(crate) struct Watcher<S: crate::app::StateMachine> {
    pub raft: crate::types::RaftOf<S>,
    pub transport: Transport,
    /// What it shares with the replica's vote handler; its `me` is this replica, its stagger spaces
    /// the survivors' slots.
    pub loss: LeaderLoss,
    pub stop: watch::Receiver<bool>,
}

/// How one attendance of a leader ended.
enum Attended {
    /// This replica follows someone else now (or no one).
    Moved,
    /// The presence stream ended at `at` (or, when it could not even connect, the last one
    /// did); `proved` when the leader's process was then proved gone.
    Ended { at: Instant, proved: bool },
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
        // When the last presence stream to the leader followed now ended without a proof.
        let mut ended: Option<(Followed, Instant)> = None;
        loop {
            let f = followed(&self.raft).filter(|f| acted.as_ref() != Some(f));
            let Some(f) = f else {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    r = metrics.changed() => if r.is_err() { return },
                }
                continue;
            };
            let since = ended.take().filter(|(g, _)| *g == f).map(|(_, at)| at);
            let attended = tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                attended = self.attend(&f, since) => attended,
            };
            match attended {
                Attended::Moved => {}
                Attended::Ended { at, proved: true } => {
                    self.campaign(&f, at).await;
                    acted = Some(f);
                }
                Attended::Ended { at, proved: false } => ended = Some((f, at)),
            }
        }
    }

    /// Whether this replica still follows `f`, by openraft's metrics.
    fn still(&self, f: &Followed) -> bool {
        followed(&self.raft).as_ref() == Some(f)
    }

    /// Holds a presence stream to `f`'s leader until it ends or the replica follows someone else,
    /// then tries to prove the leader's process gone. `since`: when the previous stream to it
    /// ended unproved; a connection refused now continues that suspicion rather than starting one.
    async fn attend(&self, f: &Followed, since: Option<Instant>) -> Attended {
        let mut metrics = self.raft.metrics();
        let connected = async {
            match self
                .transport
                .presence(self.loss.me, f.leader, &f.addr)
                .await
            {
                Ok(mut stream) => {
                    while let Ok(Some(_)) = stream.message().await {}
                    true
                }
                // Unreachable: prove why below.
                Err(s) if s.code() == tonic::Code::Unavailable => false,
                // A link cut by injected faults (a drill's partition), or a leader that does not
                // serve presence (an older build) or refuses this replica: nothing to attend
                // until someone else leads.
                Err(_) => std::future::pending().await,
            }
        };
        let connected = tokio::select! {
            connected = connected => connected,
            _ = async { while metrics.changed().await.is_ok() && self.still(f) {} } => return Attended::Moved,
        };
        let at = match (connected, since) {
            (false, Some(since)) => since,
            _ => Instant::now(),
        };
        let proved = self.prove(f).await;
        Attended::Ended { at, proved }
    }

    /// Proves `f`'s leader's process gone, for up to one stagger ([`LeaderLoss::prove`]); when its
    /// port still accepts or its host does not answer, it returns no sooner than that stagger (a
    /// stream that ends at once is not retried in a tight loop).
    async fn prove(&self, f: &Followed) -> bool {
        let until = Instant::now() + self.loss.stagger;
        match self.loss.prove(f, until, || self.still(f)).await {
            Proved::Gone => return true,
            Proved::Moved => return false,
            Proved::NotGone(last) => tracing::debug!(
                id = self.loss.me,
                leader = f.leader,
                term = f.term,
                probe = ?last,
                "the presence stream to the leader ended, but its process is not proved gone"
            ),
        }
        tokio::time::sleep_until(until).await;
        false
    }

    /// Campaigns for `f`'s succession in this replica's slot ([`slot_wait`], counted from when the
    /// leader's stream `ended`; at once when [`LeaderLoss::refused_behind`] says so), unless a new
    /// leader appears first or openraft's own state (read inside its core) shows it has moved on
    /// from `f`.
    async fn campaign(&self, f: &Followed, ended: Instant) {
        let Some((rank, survivors)) = rank(&self.raft, self.loss.me, f.leader) else {
            return;
        };
        let wait = slot_wait(rank, survivors, self.loss.stagger, ended.elapsed());
        tracing::info!(
            id = self.loss.me,
            leader = f.leader,
            term = f.term,
            rank,
            wait_ms = wait.as_millis() as u64,
            "the leader's process is gone (its port refuses connections): electing without waiting for the election timeout"
        );
        let mut metrics = self.raft.metrics();
        let replaced = async { while metrics.changed().await.is_ok() && self.still(f) {} };
        tokio::select! {
            _ = replaced => return,
            _ = tokio::time::sleep(wait) => {}
            _ = self.loss.urgent(f) => {}
        }
        let _turn = self.loss.gate().await;
        let f = f.clone();
        let follows = self
            .raft
            .with_raft_state(move |st| still_follows(st.vote_ref(), &f));
        if follows.await.unwrap_or(false) {
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
        let loss = LeaderLoss::new(true, 2, Duration::from_millis(100), None);
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

    /// The survivors' slots, with a stagger of 100 ms: (rank, survivors, ms since the stream
    /// ended) -> ms to wait before campaigning.
    #[test]
    fn each_survivor_campaigns_in_its_own_slots() {
        let ms = Duration::from_millis;
        let table: &[(usize, usize, u64, u64)] = &[
            // The first survivor at once, inside the first half of its slot...
            (0, 2, 0, 0),
            (0, 2, 49, 0),
            // ...and a late proof waits for its next slot, after the second survivor's.
            (0, 2, 50, 150),
            (0, 2, 101, 99),
            (0, 2, 200, 0),
            (0, 2, 260, 140),
            // The second survivor one stagger in, then every two.
            (1, 2, 0, 100),
            (1, 2, 99, 1),
            (1, 2, 120, 0),
            (1, 2, 150, 150),
            (1, 2, 310, 0),
            // Four survivors: the third's slots at 200, 600, ...
            (2, 4, 0, 200),
            (2, 4, 249, 0),
            (2, 4, 250, 350),
            // A lone survivor splits no vote: always at once.
            (0, 1, 0, 0),
            (0, 1, 75, 0),
        ];
        for &(rank, survivors, elapsed, want) in table {
            assert_eq!(
                slot_wait(rank, survivors, ms(100), ms(elapsed)),
                ms(want),
                "rank {rank} of {survivors}, {elapsed} ms after the stream ended"
            );
        }
        // No two survivors may campaign within half a stagger of each other, at any lateness.
        for survivors in 2..6usize {
            for elapsed in (0..1_000).step_by(7) {
                let at: Vec<u64> = (0..survivors)
                    .map(|r| {
                        elapsed + slot_wait(r, survivors, ms(100), ms(elapsed)).as_millis() as u64
                    })
                    .collect();
                for (i, a) in at.iter().enumerate() {
                    for b in &at[i + 1..] {
                        assert!(
                            a.abs_diff(*b) >= 50,
                            "{survivors} survivors at {elapsed} ms: {at:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_campaign_needs_the_core_to_still_hold_the_lost_leaders_vote() {
        let f = Followed {
            leader: 1,
            addr: "127.0.0.1:1".into(),
            term: 3,
        };
        assert!(still_follows(&Vote::new_committed(3, 1), &f));
        // Granted a survivor's vote for the next term: campaigning would depose it.
        assert!(!still_follows(&Vote::new(4, 2), &f));
        // Follows the leader elected after the lost one.
        assert!(!still_follows(&Vote::new_committed(4, 2), &f));
        // Campaigning already, or the lost leader's term not yet committed here.
        assert!(!still_follows(&Vote::new(4, 3), &f));
        assert!(!still_follows(&Vote::new(3, 1), &f));
    }
}
