use std::collections::BTreeSet;
use std::time::Duration;

use gangway_consensus::ConsensusError;
use gangway_consensus::StateChange;

use crate::common::*;
use crate::serial;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_replicate_reads_are_linearizable_and_followers_redirect() {
    let _g = serial().await;
    // A fresh three-replica cluster elects a leader.
    let c = Cluster::start(3, 0, 1, Timing::default()).await;
    let leader = c.leader().await;
    let follower = *c.live().iter().find(|id| **id != leader).unwrap();
    let mut events = c.node(follower).subscribe();

    // Writes through the leader and through a follower (forwarded) both apply, in log order.
    let mut acked = BTreeSet::new();
    let mut last = 0;
    for op in 0..20u64 {
        let via = if op % 2 == 0 { leader } else { follower };
        let r = c.write(via, "k", op).await.expect("write");
        assert!(
            r.index > last,
            "log index must grow: {} after {}",
            r.index,
            last
        );
        assert_eq!(r.len as u64, op + 1);
        last = r.index;
        acked.insert(op);
    }

    // Every replica applies the same sequence; no op applied twice, times never go backwards.
    let states = c.converge(Duration::from_secs(10)).await;
    check_history(&states, &acked);
    assert_eq!(states[&follower].data["k"], (0..20u64).collect::<Vec<_>>());

    // Watchers on a follower see every applied op as an event, in order.
    let mut seen = Vec::new();
    while seen.len() < 20 {
        match tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("event")
        {
            Ok(StateChange::Event { event, .. }) => seen.push(event.op_id),
            Ok(StateChange::SnapshotInstalled { .. }) => panic!("no snapshot expected"),
            Err(e) => panic!("watch channel: {e}"),
        }
    }
    assert_eq!(seen, (0..20u64).collect::<Vec<_>>());

    // A linearizable read on the leader sees every acknowledged write.
    let n = c
        .node(leader)
        .read(|kv| kv.data["k"].len())
        .await
        .expect("read");
    assert_eq!(n, 20);

    // A follower refuses linearizable reads and try_write, naming the leader.
    for err in [
        c.node(follower)
            .read(|kv| kv.data.len())
            .await
            .map(|_| ())
            .unwrap_err(),
        c.node(follower)
            .try_write(append("k", 99))
            .await
            .map(|_| ())
            .unwrap_err(),
    ] {
        match &err {
            ConsensusError::NotLeader {
                leader_id,
                leader_addr,
            } => {
                assert_eq!(*leader_id, Some(leader));
                assert_eq!(leader_addr.as_deref(), Some(c.addrs[&leader].as_str()));
            }
            other => panic!("expected NotLeader, got {other:?}"),
        }
        assert!(err.is_retryable());
        assert_eq!(err.code(), "consensus.not_leader");
    }

    // Metrics describe the cluster: one term, a leader, all voters caught up.
    let m = c.node(leader).metrics();
    assert_eq!(m.voters, BTreeSet::from([1, 2, 3]));
    assert!(m.committed_index.unwrap() >= last);
    assert_eq!(m.replication_lag.len(), 2);

    // Every connection a replica accepted (replication, votes, forwarded writes) sends its small
    // replies at once: Nagle's algorithm off, or each could wait tens of milliseconds on the
    // peer's delayed ACK.
    let servers: Vec<std::net::SocketAddr> = c.addrs.values().map(|a| a.parse().unwrap()).collect();
    let accepted = accepted_connections(&servers);
    assert!(!accepted.is_empty(), "the replicas accepted connections");
    let slow: Vec<_> = accepted.iter().filter(|(_, nodelay)| !nodelay).collect();
    assert!(slow.is_empty(), "accepted without TCP_NODELAY: {slow:?}");
    c.shutdown().await;
}

/// Concurrent writes on a cluster whose leader keeps `in_flight` append requests awaiting replies
/// per follower: every acknowledged write is on every replica, once, in one order.
async fn concurrent_writes_replicate_with(in_flight: u32) {
    let timing = Timing {
        replication: stream_of(in_flight),
        ..Timing::default()
    };
    let c = std::sync::Arc::new(Cluster::start(3, 0, 7, timing).await);
    c.leader().await;
    // Writer w's ops, in the order it writes them, to key k(w % 2).
    let ops_of = |w: u64| (0..40u64).map(move |i| w * 1_000 + i);
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let c = c.clone();
            tokio::spawn(async move {
                for op in ops_of(w) {
                    c.write_ok(&format!("k{}", w % 2), op).await;
                }
            })
        })
        .collect();
    for w in writers {
        w.await.expect("writer");
    }
    let acked: BTreeSet<u64> = (0..8u64).flat_map(ops_of).collect();
    let states = c.converge(Duration::from_secs(10)).await;
    check_history(&states, &acked);
    // Each writer's ops are in the order it wrote them, on every replica.
    for kv in states.values() {
        for w in 0..8u64 {
            let mine: Vec<u64> = kv.data[&format!("k{}", w % 2)]
                .iter()
                .copied()
                .filter(|op| op / 1_000 == w)
                .collect();
            assert_eq!(mine, ops_of(w).collect::<Vec<_>>());
        }
    }
    std::sync::Arc::into_inner(c)
        .expect("writers done")
        .shutdown()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_replicate_with_one_append_in_flight_per_follower() {
    let _g = serial().await;
    concurrent_writes_replicate_with(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_replicate_with_four_appends_in_flight_per_follower() {
    let _g = serial().await;
    concurrent_writes_replicate_with(4).await;
}
