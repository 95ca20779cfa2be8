use std::collections::BTreeSet;
use std::time::Duration;

use gangway_consensus::NodeId;

use crate::common::*;
use crate::serial;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_survive_leader_kill_and_new_leader_takes_writes() {
    let _g = serial().await;
    let mut c = Cluster::start(3, 0, 2, Timing::default()).await;
    let old = c.leader().await;

    // Acknowledged writes before the failure.
    let mut acked = BTreeSet::new();
    for op in 0..10 {
        c.write_ok("a", op).await;
        acked.insert(op);
    }

    // Kill the leader: the two survivors elect a new one.
    c.kill(old).await;
    let new = c.leader().await;
    assert_ne!(new, old);

    // The next write succeeds, and nothing acknowledged before was lost.
    c.write_ok("a", 10).await;
    acked.insert(10);
    let states = c.converge(Duration::from_secs(10)).await;
    check_history(&states, &acked);
    assert!(c.node(new).metrics().term > 1);

    // The old leader comes back as a follower and catches up.
    c.start_node(old).await;
    let states = c.converge(Duration::from_secs(10)).await;
    check_history(&states, &acked);
    assert_eq!(states.len(), 3);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_replicas_survive_two_failures() {
    let _g = serial().await;
    let mut c = Cluster::start(5, 0, 3, Timing::default()).await;
    let mut acked = BTreeSet::new();
    for op in 0..5 {
        c.write_ok("f", op).await;
        acked.insert(op);
    }
    // Lose the leader and one follower: three of five is still a quorum.
    let l = c.leader().await;
    let other = *c.live().iter().find(|id| **id != l).unwrap();
    c.kill(l).await;
    c.kill(other).await;
    for op in 5..10 {
        c.write_ok("f", op).await;
        acked.insert(op);
    }
    let states = c.converge(Duration::from_secs(10)).await;
    check_history(&states, &acked);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_failure_on_leader_stops_its_writes_and_cluster_fails_over() {
    let _g = serial().await;
    let c = Cluster::start(3, 0, 11, Timing::default()).await;
    let mut acked = BTreeSet::new();
    for op in 0..5 {
        c.write_ok("d", op).await;
        acked.insert(op);
    }
    let bad = c.leader().await;

    // The leader's disk fails (as an fsync error would): its next append fails.
    c.node(bad)
        .inject_storage_failure("injected fsync failure")
        .await;

    // It refuses writes and says why; the error is not retryable on this replica.
    let err = c.write(bad, "d", 100).await.unwrap_err();
    assert_eq!(err.code(), "consensus.storage", "{err:?}");
    assert!(!err.is_retryable());
    assert!(c.node(bad).metrics().storage_error.is_some());

    // The healthy replicas elect a new leader and keep committing.
    let healthy: Vec<_> = c.live().into_iter().filter(|id| *id != bad).collect();
    let new = c.leader_among(&healthy, Duration::from_secs(10)).await;
    for op in 5..10 {
        c.write(new, "d", op)
            .await
            .expect("write on healthy majority");
        acked.insert(op);
    }
    // Everything acknowledged, and nothing refused, is on the healthy leader (linearizable read).
    let ops = c.node(new).read(|kv| kv.ops()).await.expect("read");
    assert!(acked.is_subset(&ops), "lost acknowledged writes");
    assert!(!ops.contains(&100), "a refused write was applied");
    c.shutdown().await;
}

/// A leader whose process dies is replaced before any election timeout could fire: its port
/// refuses connections, the followers' presence streams end, and they elect at once. The timeouts
/// here are long (2-4 s, so openraft's own campaign comes 6-8 s after the last heartbeat: the
/// leader's lease of 4 s, then the timeout); a new leader within 3 s can only come from the
/// detector. Before the kill, the detector leaves a live leader alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_leaders_process_is_replaced_before_any_election_timeout() {
    let _g = serial().await;
    let timing = detection_only(
        Duration::from_millis(100),
        (Duration::from_secs(2), Duration::from_secs(4)),
    );
    let (mut c, old, term, survivors) = three_with_a_write(21, timing).await;

    // A second of heartbeats with every presence stream open: nobody campaigns.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(c.leader().await, old, "the live leader keeps leading");
    assert_eq!(
        c.node(old).metrics().term,
        term,
        "no election while it lives"
    );

    c.kill(old).await;
    let new = c.leader_among(&survivors, Duration::from_secs(3)).await;
    assert_ne!(new, old);
    c.write_ok("k", 1).await;
    holds_both_writes(c).await;
}

/// The first survivor in line to campaign still sees the dead leader's port accept connections a
/// while (its listening socket outlived its connections; injected), while the other finds it
/// refusing at once and waits its stagger. However long the port lingers, they elect one leader
/// for the very next term, before any election timeout could, and nobody deposes it afterwards:
/// no split vote (a late prover campaigns only in its own slot, after re-probing within
/// milliseconds), no second campaign by a survivor that has granted the other's vote (the decision
/// reads openraft's own state, not its trailing metrics).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_survivor_that_sees_the_dead_port_linger_neither_splits_the_vote_nor_deposes() {
    let _g = serial().await;
    let timing = detection_only(
        Duration::from_millis(100),
        (Duration::from_secs(2), Duration::from_secs(4)),
    );
    // Lingering shorter than half a stagger, exactly one (the first survivor's proof lands on the
    // second's slot), and longer than one (the second campaigns while the first still sees it).
    for (seed, linger_ms) in [(31, 20), (32, 100), (33, 103), (34, 160)] {
        let (mut c, old, term, survivors) = three_with_a_write(seed, timing.clone()).await;
        let first = survivors[0];
        c.faults
            .linger(first, old, Duration::from_millis(linger_ms));
        c.kill(old).await;

        let new = c
            .leader_among(&survivors, Duration::from_millis(1_500))
            .await;
        let m = c.node(new).metrics();
        assert_eq!(
            m.term,
            term + 1,
            "port lingering {linger_ms} ms to replica {first}: one election, for the next term (a \
             split vote or a deposed leader takes more); reproduce with seed {seed}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let later = c.leader_among(&survivors, Duration::from_secs(1)).await;
        assert_eq!(
            (later, c.node(later).metrics().term),
            (new, term + 1),
            "port lingering {linger_ms} ms to replica {first}: the new leader is not deposed"
        );
        c.write_ok("k", 1).await;
        holds_both_writes(c).await;
    }
}

/// The leader dies having replicated its last write to the second survivor in line but not to
/// the first. The first campaigns at once and is refused (its log is behind); the second, which
/// refused it, campaigns at once too instead of waiting for its slot a stagger later, and wins.
/// The stagger here is 400 ms, so a leader within 300 ms of the kill can only come from that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_survivor_ahead_in_the_log_takes_over_at_once_from_one_behind() {
    let _g = serial().await;
    let timing = detection_only(
        Duration::from_millis(400),
        (Duration::from_secs(3), Duration::from_secs(5)),
    );
    let mut lagged = 0;
    for seed in 41..46 {
        let (mut c, old, term, survivors) = three_with_a_write(seed, timing.clone()).await;
        let (behind, ahead) = (survivors[0], survivors[1]);
        // The last write reaches `ahead` only; the leader dies before it can retry to `behind`.
        c.faults.block_one_way(old, behind);
        c.write_ok("k", 1).await;
        c.faults.heal();
        c.kill(old).await;
        let killed = tokio::time::Instant::now();
        let log = |id| c.node(id).metrics().last_log_index;
        if log(behind) >= log(ahead) {
            // The leader caught it up first: nothing to see in this round.
            c.shutdown().await;
            continue;
        }
        lagged += 1;
        let new = c.leader_among(&survivors, Duration::from_secs(2)).await;
        let took = killed.elapsed();
        assert_eq!(
            new, ahead,
            "only the survivor with the write can win; seed {seed}"
        );
        assert!(
            took < Duration::from_millis(300),
            "the survivor ahead campaigned at once, not in its slot 400 ms in: {took:?}; seed {seed}"
        );
        assert_eq!(
            c.node(new).metrics().term,
            term + 1,
            "one election; seed {seed}"
        );
        holds_both_writes(c).await;
        if lagged == 2 {
            return;
        }
    }
    assert!(
        lagged > 0,
        "in no round did the leader die with the first survivor behind"
    );
}

/// Timeouts so long that a new leader within a second or two can only come from leader-loss
/// detection: openraft's own campaign comes its lease and then its timeout after the last
/// heartbeat, `election` (min, max) each.
fn detection_only(heartbeat: Duration, election: (Duration, Duration)) -> Timing {
    Timing {
        heartbeat,
        election_min: election.0,
        election_max: election.1,
        ..Timing::default()
    }
}

/// A three-replica cluster whose first write (0) is committed, as a leader-loss story starts it:
/// the cluster, its leader, the leader's term, and the replicas that would survive it.
async fn three_with_a_write(seed: u64, timing: Timing) -> (Cluster, NodeId, u64, Vec<NodeId>) {
    let c = Cluster::start(3, 0, seed, timing).await;
    let leader = c.leader().await;
    c.write_ok("k", 0).await;
    let term = c.node(leader).metrics().term;
    let survivors = c.live().into_iter().filter(|id| *id != leader).collect();
    (c, leader, term, survivors)
}

/// Every live replica applied writes 0 and 1 and nothing else; then the cluster stops.
async fn holds_both_writes(c: Cluster) {
    let states = c.converge(Duration::from_secs(10)).await;
    check_history(&states, &BTreeSet::from([0, 1]));
    c.shutdown().await;
}
