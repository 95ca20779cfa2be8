use std::collections::BTreeSet;
use std::time::Duration;

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
    let timing = Timing {
        heartbeat: Duration::from_millis(100),
        election_min: Duration::from_secs(2),
        election_max: Duration::from_secs(4),
        ..Timing::default()
    };
    let mut c = Cluster::start(3, 0, 21, timing).await;
    let old = c.leader().await;
    c.write_ok("k", 0).await;
    let term = c.node(old).metrics().term;

    // A second of heartbeats with every presence stream open: nobody campaigns.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(c.leader().await, old, "the live leader keeps leading");
    assert_eq!(
        c.node(old).metrics().term,
        term,
        "no election while it lives"
    );

    c.kill(old).await;
    let survivors: Vec<_> = c.live();
    let new = c.leader_among(&survivors, Duration::from_secs(3)).await;
    assert_ne!(new, old);
    c.write_ok("k", 1).await;
    let states = c.converge(Duration::from_secs(10)).await;
    check_history(&states, &BTreeSet::from([0, 1]));
    c.shutdown().await;
}
