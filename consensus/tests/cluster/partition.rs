use std::collections::BTreeSet;
use std::time::Duration;

use gangway_consensus::ConsensusError;
use gangway_consensus::Role;

use crate::common::*;
use crate::serial;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_minority_cannot_commit_and_old_leader_steps_down() {
    let _g = serial().await;
    let timing = Timing {
        write_timeout: Duration::from_secs(2),
        ..Timing::default()
    };
    let c = Cluster::start(5, 0, 7, timing).await;
    let mut acked = BTreeSet::new();
    for op in 0..5 {
        c.write_ok("p", op).await;
        acked.insert(op);
    }
    let old = c.leader().await;
    let buddy = *c.live().iter().find(|id| **id != old).unwrap();
    let minority = vec![old, buddy];
    let majority: Vec<_> = c
        .live()
        .into_iter()
        .filter(|id| !minority.contains(id))
        .collect();

    // Cut the leader and one follower off from the other three.
    c.faults.partition(&minority, &majority);

    // The old leader cannot commit: its write is never acknowledged.
    let r = c.node(old).try_write(append("p", 100)).await;
    match r {
        Err(ConsensusError::Timeout(_))
        | Err(ConsensusError::Unavailable(_))
        | Err(ConsensusError::NotLeader { .. }) => {}
        other => panic!("minority write must not be acknowledged: {other:?}"),
    }

    // The majority elects its own leader and commits.
    let new = c.leader_among(&majority, Duration::from_secs(10)).await;
    for op in 5..10 {
        c.write(new, "p", op).await.expect("majority write");
        acked.insert(op);
    }

    // Heal: the old leader learns the higher term and steps down; everyone converges on the
    // majority's history; the minority's unacknowledged write is gone.
    c.faults.heal();
    let leader = c.leader().await;
    assert_ne!(
        c.node(old).metrics().role,
        Role::Leader,
        "old leader stepped down"
    );
    assert!(majority.contains(&leader));
    let states = c.converge(Duration::from_secs(10)).await;
    check_history(&states, &acked);
    for kv in states.values() {
        assert!(
            !kv.ops().contains(&100),
            "an uncommitted minority write resurfaced"
        );
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_partition_from_leader_forces_new_leader_without_losing_writes() {
    let _g = serial().await;
    let c = Cluster::start(3, 0, 8, Timing::default()).await;
    let mut acked = BTreeSet::new();
    for op in 0..5 {
        c.write_ok("o", op).await;
        acked.insert(op);
    }
    let old = c.leader().await;
    let others: Vec<_> = c.live().into_iter().filter(|id| *id != old).collect();

    // The leader's messages stop reaching the followers, but theirs still reach it: followers
    // time out and elect a new leader; the old one hears the new term and steps down.
    for o in &others {
        c.faults.block_one_way(old, *o);
    }
    let new = c.leader_among(&others, Duration::from_secs(10)).await;
    assert_ne!(new, old);
    for op in 5..10 {
        c.write(new, "o", op)
            .await
            .expect("write after one-way partition");
        acked.insert(op);
    }
    c.faults.heal();
    c.leader().await;
    let states = c.converge(Duration::from_secs(10)).await;
    check_history(&states, &acked);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_leader_refuses_writes_instead_of_holding_them() {
    let _g = serial().await;
    let c = Cluster::start(3, 0, 31, Timing::default()).await;
    c.write_ok("c", 0).await;
    let old = c.leader().await;
    let others: Vec<_> = c.live().into_iter().filter(|id| *id != old).collect();
    c.faults.isolate(old, &others);

    // A write proposed as the cut begins is let go once the leader counts as cut off (the
    // shortest election timeout without a quorum's acknowledgement), its outcome unknown, rather
    // than waited on until the cut heals (here: for the whole write timeout).
    match c.node(old).write(append("c", 99)).await {
        Err(ConsensusError::Unavailable(m)) => assert!(m.contains("lost its quorum"), "{m}"),
        other => panic!("expected the pending write let go, got {other:?}"),
    }
    // Past that, the cut-off leader still believes it leads (it cannot hear of a newer term)...
    tokio::time::sleep(c.timing.election_min * 2).await;
    assert_eq!(c.node(old).metrics().role, Role::Leader);
    // ...but refuses a write rather than proposing it and holding it until the cut heals:
    // NotLeader naming no leader (certainly not proposed; a client tries another replica).
    match c.node(old).write(append("c", 100)).await {
        Err(ConsensusError::NotLeader {
            leader_id: None,
            leader_addr: None,
        }) => {}
        other => panic!("expected a refusal naming no leader, got {other:?}"),
    }

    // The others elect a leader and take writes; once healed, the refused write is nowhere.
    let new = c.leader_among(&others, Duration::from_secs(10)).await;
    c.write(new, "c", 1).await.expect("write on the new leader");
    c.faults.heal();
    let states = c.converge(Duration::from_secs(10)).await;
    for kv in states.values() {
        assert!(!kv.ops().contains(&100), "a refused write was applied");
        assert!(
            !kv.ops().contains(&99),
            "the cut-off leader's entry survived the heal"
        );
        assert!(kv.ops().contains(&1));
    }
    c.shutdown().await;
}
