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
