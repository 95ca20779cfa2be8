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
