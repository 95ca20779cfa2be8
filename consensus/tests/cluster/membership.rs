use std::collections::BTreeSet;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use gangway_consensus::ConsensusError;
use gangway_consensus::NodeId;

use crate::common::*;
use crate::serial;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_grows_to_five_and_shrinks_back_while_writes_continue() {
    let _g = serial().await;
    let mut c = Cluster::start(3, 2, 9, Timing::default()).await;
    let leader = c.leader().await;

    // A writer keeps proposing through the leader during every change.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let h = c.node(leader).clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut acked = BTreeSet::new();
            let mut op = 1000u64;
            while !stop.load(Ordering::Relaxed) {
                op += 1;
                match h.write(append("m", op)).await {
                    Ok(_) => {
                        acked.insert(op);
                    }
                    // Definite failures are fine during a change; the history check below
                    // only concerns what was acknowledged.
                    Err(e) => tracing::info!("write {op} failed during membership change: {e}"),
                }
            }
            acked
        })
    };

    // Two new replicas start empty, join as learners (catching up), then become voters.
    c.start_node(4).await;
    c.start_node(5).await;
    c.node(leader)
        .add_learner(4, c.addrs[&4].clone())
        .await
        .expect("add learner 4");
    c.node(leader)
        .add_learner(5, c.addrs[&5].clone())
        .await
        .expect("add learner 5");
    assert_eq!(c.node(leader).metrics().learners, BTreeSet::from([4, 5]));
    c.node(leader)
        .promote(BTreeSet::from([4, 5]))
        .await
        .expect("promote");
    assert_eq!(
        c.node(leader).metrics().voters,
        BTreeSet::from([1, 2, 3, 4, 5])
    );

    // Shrink back to three, removing two of the original voters (never the leader here).
    let remove: BTreeSet<_> = [1, 2, 3]
        .into_iter()
        .filter(|id| *id != leader)
        .take(2)
        .collect();
    c.node(leader)
        .remove(remove.clone())
        .await
        .expect("remove voters");
    let m = c.node(leader).metrics();
    assert_eq!(m.voters.len(), 3);
    assert!(m.voters.is_disjoint(&remove));

    stop.store(true, Ordering::Relaxed);
    let acked = writer.await.unwrap();
    assert!(!acked.is_empty(), "writes continued during the change");
    for id in remove {
        c.kill(id).await;
    }
    let states = c.converge(Duration::from_secs(10)).await;
    check_history(&states, &acked);
    assert_eq!(states.len(), 3);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_transfers_to_the_named_replica() {
    let _g = serial().await;
    let c = Cluster::start(3, 0, 10, Timing::default()).await;
    let mut acked = BTreeSet::new();
    for op in 0..5 {
        c.write_ok("t", op).await;
        acked.insert(op);
    }
    let old = c.leader().await;
    let target = *c.live().iter().rev().find(|id| **id != old).unwrap();

    // Only the leader can hand over leadership; a follower answers NotLeader.
    let err = c.node(target).transfer_leader(target).await.unwrap_err();
    assert!(matches!(err, ConsensusError::NotLeader { .. }), "{err:?}");

    // The leader hands over to the named replica, which then takes writes.
    c.node(old).transfer_leader(target).await.expect("transfer");
    assert_eq!(c.leader().await, target);
    for op in 5..10 {
        c.write(target, "t", op).await.expect("write on new leader");
        acked.insert(op);
    }
    check_history(&c.converge(Duration::from_secs(10)).await, &acked);
    c.shutdown().await;
}

/// Founding replicas start at their own pace, each bootstrapping with the same voters
/// (`bootstrap_as_founder`): those up first form the cluster, and one that comes up once they
/// have a leader joins it without an election, whatever its id. Rows: the founders started first,
/// then the one started once they agree on a leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn founders_starting_in_any_order_keep_the_first_leader_they_elect() {
    let _g = serial().await;
    let rows: &[(&[NodeId], NodeId)] = &[(&[1, 2], 3), (&[2, 3], 1), (&[1, 3], 2)];
    for (first, late) in rows {
        let timing = Timing::default();
        let turns = timing.election_max * 2;
        let (mut c, _) = Cluster::reserve(3, 31, timing).await;
        let voters = c.addrs.clone();
        let found = |c: &Cluster, id: NodeId| {
            let (h, voters) = (c.node(id).clone(), voters.clone());
            tokio::spawn(async move { h.bootstrap_as_founder(voters).await })
        };
        for id in first.iter() {
            c.start_node(*id).await;
            found(&c, *id);
        }
        let leader = c.leader_among(first, Duration::from_secs(10)).await;
        let term = c.node(leader).metrics().term;

        c.start_node(*late).await;
        let bootstrapped = found(&c, *late);
        assert_eq!(
            c.leader_among(&[1, 2, 3], Duration::from_secs(10)).await,
            leader,
            "{first:?} then {late}"
        );
        // Past the last founder's turn: nobody campaigned. A late founder whose turn comes after
        // the first joined instead of bootstrapping; the first founder's turn is at once, so it
        // may bootstrap even late (racing the leader's first heartbeat), outranking nobody.
        tokio::time::sleep(turns + Duration::from_millis(300)).await;
        let bootstrapped = bootstrapped.await.unwrap().expect("bootstrap");
        assert!(*late == 1 || !bootstrapped, "{first:?} then {late}");
        for id in 1..=3 {
            let m = c.node(id).metrics();
            assert_eq!(
                (m.leader, m.term),
                (Some(leader), term),
                "replica {id}, {first:?} then {late}"
            );
        }
        c.shutdown().await;
    }
}
