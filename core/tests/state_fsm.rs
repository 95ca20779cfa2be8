//! The replicated cluster state (FSM): lease lifecycle, the plan applier's re-checks, node loss,
//! idempotency and fencing, then random command interleavings that try to break the invariants.

use gangway_core::engine::{
    DeviceKind, DeviceShare, GangPlacement, NodeState, PendingJob, PendingReason, Plan,
    TaskPlacement,
};
use gangway_core::state::{
    CheckpointFailure, CheckpointManifest, CheckpointReport, ClusterStore, Command, DefragOrder,
    Event, IdleReport, JobState, NodeStateChange, Rejection, Response, Submission, TaskReport,
    TaskState,
};
use gangway_proto::ids::{HostName, JobId};
use gangway_proto::spec::JobSpec;
use proptest::prelude::*;

mod common;
use common::node;
use std::collections::BTreeMap;

fn spec(name: &str, tasks: u32, devices: u32) -> JobSpec {
    JobSpec::from_toml_str(&format!(
        "name = \"{name}\"\ntasks = {tasks}\ncommand = [\"python3\", \"train.py\"]\n\
         [resources]\ndevices = {devices}\n[checkpoint]\nsignal = \"SIGUSR1\"\n"
    ))
    .expect("test spec is valid")
}

/// Places task i of a gang on `hosts[i]`, devices `first..first+n`.
fn placement(job: &JobId, hosts: &[&str], first: u16, n: u16) -> GangPlacement {
    GangPlacement {
        job: job.clone(),
        queue: "default".into(),
        tasks: hosts
            .iter()
            .map(|h| TaskPlacement {
                host: HostName::new(*h),
                devices: (first..first + n)
                    .map(|index| DeviceShare { index, milli: 1000 })
                    .collect(),
                cpu_milli: 0,
                memory_mib: 0,
            })
            .collect(),
        borrowed_milli: 0,
    }
}

use common::Cluster;

impl Cluster {
    fn submit(&mut self, spec: JobSpec) -> JobId {
        match self.apply(Command::SubmitJob(Submission {
            owner: String::new(),
            idempotency_key: None,
            spec,
        })) {
            Response::Submitted { job, .. } => job,
            other => panic!("submit failed: {other:?}"),
        }
    }

    fn place(&mut self, placements: Vec<GangPlacement>) -> Response {
        self.apply(Command::ApplyPlan {
            plan: Plan {
                placements,
                ..Plan::default()
            },
        })
    }

    fn report(&mut self, job: &JobId, task: u32, epoch: u64, state: TaskState) -> Response {
        self.apply(Command::TaskStatus(TaskReport {
            job: job.clone(),
            task,
            epoch,
            state,
            exit_code: (state == TaskState::Succeeded).then_some(0),
            message: String::new(),
        }))
    }

    fn epoch_of(&self, job: &JobId) -> u64 {
        self.store.job(job).unwrap().lease.as_ref().unwrap().epoch
    }
}

#[test]
fn a_gang_is_leased_runs_and_frees_its_devices_when_every_rank_succeeds() {
    // Two hosts register; a 2-task gang is placed one rank per host.
    let mut c = Cluster::new();
    assert_eq!(
        c.apply(Command::RegisterNode(node("h1", "r1", 8))),
        Response::Done
    );
    assert_eq!(
        c.apply(Command::RegisterNode(node("h2", "r1", 8))),
        Response::Done
    );
    let job = c.submit(spec("train", 2, 8));
    assert_eq!(c.store.job(&job).unwrap().state, JobState::Pending);

    let r = c.place(vec![placement(&job, &["h1", "h2"], 0, 8)]);
    let Response::PlanApplied { placed, stale, .. } = r else {
        panic!("{r:?}")
    };
    assert_eq!(stale, vec![]);
    assert_eq!(placed.len(), 1);
    let epoch = c.epoch_of(&job);
    assert_eq!(c.store.job(&job).unwrap().state, JobState::Running);

    // Each worker sees exactly its rank, with the devices' UUIDs and the shared master address.
    let a1 = c.store.allocations_for(&HostName::new("h1"));
    let a2 = c.store.allocations_for(&HostName::new("h2"));
    assert_eq!((a1.len(), a2.len()), (1, 1));
    assert_eq!((a1[0].task, a2[0].task, a1[0].task_count), (0, 1, 2));
    assert_eq!(a1[0].devices[3].1, "GPU-h1-3");
    assert_eq!(a1[0].master_addr, a2[0].master_addr);
    assert!(a1[0].master_addr.starts_with("h1:"));
    assert_eq!(
        c.store.device_epochs(&HostName::new("h2")).unwrap(),
        &[epoch; 8]
    );

    // Rank 0 finishing alone keeps the lease; the gang ends when every rank has.
    c.report(&job, 0, epoch, TaskState::Running);
    c.report(&job, 0, epoch, TaskState::Succeeded);
    assert_eq!(c.store.job(&job).unwrap().state, JobState::Running);
    c.report(&job, 1, epoch, TaskState::Succeeded);
    let rec = c.store.job(&job).unwrap();
    assert_eq!(rec.state, JobState::Succeeded);
    assert!(rec.lease.is_none());
    assert!(c.store.engine().running().is_empty());
    assert!(c.store.allocations_for(&HostName::new("h1")).is_empty());
    assert_eq!(c.store.engine().hosts()[0].free_whole_devices(), 8);

    // A retried completion report after the fact is acknowledged, and changes nothing.
    let before = c.store.to_snapshot().unwrap();
    assert_eq!(
        c.report(&job, 1, epoch, TaskState::Succeeded),
        Response::Done
    );
    let after = c.store.to_snapshot().unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&before).unwrap()["jobs"],
        serde_json::from_slice::<serde_json::Value>(&after).unwrap()["jobs"]
    );
}

#[test]
fn a_stale_plan_is_discarded_whole_and_never_double_books_a_device() {
    // Two gangs were planned from the same snapshot onto overlapping devices.
    let mut c = Cluster::new();
    c.apply(Command::RegisterNode(node("h1", "r1", 8)));
    c.apply(Command::RegisterNode(node("h2", "r1", 8)));
    let a = c.submit(spec("a", 1, 4));
    let b = c.submit(spec("b", 2, 4));
    c.place(vec![placement(&a, &["h2"], 2, 4)]);

    // b's second rank collides with a on h2: b must be rejected whole, h1 untouched.
    let r = c.place(vec![placement(&b, &["h1", "h2"], 0, 4)]);
    let Response::PlanApplied { placed, stale, .. } = r else {
        panic!("{r:?}")
    };
    assert!(placed.is_empty());
    assert_eq!(stale.len(), 1);
    assert!(
        stale[0].1.contains("h2"),
        "reason names the host: {}",
        stale[0].1
    );
    let rec = c.store.job(&b).unwrap();
    assert_eq!(rec.state, JobState::Pending);
    assert!(rec.pending_text().as_deref().unwrap().contains("stale"));
    assert_eq!(
        c.store.engine().hosts()[0].free_whole_devices(),
        8,
        "h1 not half-applied"
    );

    // Placing an already running job again is stale too.
    let r = c.place(vec![placement(&a, &["h1"], 0, 4)]);
    let Response::PlanApplied { stale, .. } = r else {
        panic!("{r:?}")
    };
    assert_eq!(stale[0].1, "job is running");

    // Pending reasons from the round reach the job in words.
    c.apply(Command::ApplyPlan {
        plan: Plan {
            pending: vec![PendingJob {
                job: b.clone(),
                reason: PendingReason::NoDomainFits {
                    wanted: "2 x 4 x H100".into(),
                    level: gangway_core::engine::TopologyLevel::Rack,
                    needed: 8,
                    largest_free_block: 4,
                },
            }],
            ..Plan::default()
        },
    });
    let reason = c.store.job(&b).unwrap().pending_text().unwrap();
    assert!(
        reason.contains("largest free block in any rack is 4"),
        "{reason}"
    );
}

#[test]
fn a_lost_node_requeues_its_gangs_from_their_last_checkpoint_with_a_newer_epoch() {
    let mut c = Cluster::new();
    for h in ["h1", "h2", "h3"] {
        c.apply(Command::RegisterNode(node(h, "r1", 8)));
    }
    let job = c.submit(spec("train", 2, 8));
    c.place(vec![placement(&job, &["h1", "h2"], 0, 8)]);
    let first = c.epoch_of(&job);

    // The job checkpoints; an older step reported late does not replace it.
    let ck = |step| {
        Command::RecordCheckpoint(CheckpointReport {
            job: job.clone(),
            epoch: first,
            request: 0,
            manifest: CheckpointManifest {
                path: format!("/ckpt/train/{step}"),
                step,
                bytes: 1,
            },
        })
    };
    assert_eq!(c.apply(ck(200)), Response::Done);
    assert_eq!(c.apply(ck(100)), Response::Done);
    assert_eq!(
        c.store.job(&job).unwrap().restore_from(),
        Some("/ckpt/train/200")
    );

    // h2 is declared down: the whole gang is re-queued, its devices on h1 freed too.
    c.apply(Command::NodeDown {
        node: HostName::new("h2"),
        reason: "missed heartbeats".into(),
    });
    let rec = c.store.job(&job).unwrap();
    assert_eq!(rec.state, JobState::Pending);
    assert!(rec
        .pending_text()
        .as_deref()
        .unwrap()
        .contains("h2 went down"));
    assert!(c.store.allocations_for(&HostName::new("h1")).is_empty());
    assert!(c
        .events
        .contains(&Event::AllocationsChanged(HostName::new("h1"))));

    // A late report from the old lease is refused (fencing) ...
    let r = c.report(&job, 0, first, TaskState::Failed);
    assert!(
        matches!(r, Response::Rejected(Rejection::StaleEpoch { .. })),
        "{r:?}"
    );
    // ... and the down node takes nothing new.
    let r = c.place(vec![placement(&job, &["h2", "h3"], 0, 8)]);
    let Response::PlanApplied { stale, .. } = r else {
        panic!()
    };
    assert!(stale[0].1.contains("down"), "{}", stale[0].1);

    // Re-placed elsewhere: a newer epoch, and the ranks restore from the checkpoint.
    c.place(vec![placement(&job, &["h1", "h3"], 0, 8)]);
    let second = c.epoch_of(&job);
    assert!(second > first);
    let alloc = &c.store.allocations_for(&HostName::new("h3"))[0];
    assert_eq!(alloc.restore_from.as_deref(), Some("/ckpt/train/200"));
    assert_eq!(alloc.epoch, second);

    // The node comes back by registering again.
    c.apply(Command::RegisterNode(node("h2", "r1", 8)));
    assert_eq!(
        c.store.nodes()[&HostName::new("h2")].state,
        NodeState::Ready
    );
}

#[test]
fn one_failed_rank_fails_the_gang_and_releases_every_device() {
    let mut c = Cluster::new();
    c.apply(Command::RegisterNode(node("h1", "r1", 8)));
    c.apply(Command::RegisterNode(node("h2", "r1", 8)));
    let job = c.submit(spec("train", 2, 2));
    c.place(vec![placement(&job, &["h1", "h2"], 0, 2)]);
    let epoch = c.epoch_of(&job);
    c.report(&job, 1, epoch, TaskState::Failed);
    assert_eq!(c.store.job(&job).unwrap().state, JobState::Failed);
    assert!(c.store.engine().running().is_empty());
    // A finished task is never launched again: nothing is desired for it anywhere.
    assert!(c.store.allocations_for(&HostName::new("h1")).is_empty());
}

#[test]
fn submissions_with_the_same_idempotency_key_create_one_job() {
    let mut c = Cluster::new();
    let submit = |key: &str| {
        Command::SubmitJob(Submission {
            owner: String::new(),
            idempotency_key: Some(key.to_owned()),
            spec: spec("train", 1, 1),
        })
    };
    let Response::Submitted {
        job: first,
        existing,
    } = c.apply(submit("k1"))
    else {
        panic!()
    };
    assert!(!existing);
    let Response::Submitted {
        job: again,
        existing,
    } = c.apply(submit("k1"))
    else {
        panic!()
    };
    assert!(existing);
    assert_eq!(first, again);
    let Response::Submitted { job: other, .. } = c.apply(submit("k2")) else {
        panic!()
    };
    assert_ne!(first, other);
    assert_eq!(c.store.jobs().len(), 2);
}

#[test]
fn cancel_drain_and_bad_registrations_answer_clearly() {
    let mut c = Cluster::new();
    c.apply(Command::RegisterNode(node("h1", "r1", 8)));
    let job = c.submit(spec("train", 1, 8));
    c.place(vec![placement(&job, &["h1"], 0, 8)]);
    assert_eq!(
        c.apply(Command::CancelJob {
            job: job.clone(),
            reason: "user".into()
        }),
        Response::Done
    );
    assert_eq!(c.store.job(&job).unwrap().state, JobState::Cancelled);
    assert_eq!(c.store.engine().hosts()[0].free_whole_devices(), 8);

    // A cordoned host keeps what it has but takes nothing new.
    c.apply(Command::SetNodeState(NodeStateChange {
        node: HostName::new("h1"),
        state: NodeState::Cordoned,
        reason: "maintenance".into(),
        grace_ms: None,
    }));
    let next = c.submit(spec("next", 1, 1));
    let Response::PlanApplied { stale, .. } = c.place(vec![placement(&next, &["h1"], 0, 1)]) else {
        panic!()
    };
    assert!(stale[0].1.contains("cordoned"), "{}", stale[0].1);

    // Re-registering in another rack is refused (a changed device inventory is accepted: see
    // tests/device_health.rs); a host whose model is known under another kind too.
    let r = c.apply(Command::RegisterNode(node("h1", "r9", 8)));
    assert!(
        matches!(r, Response::Rejected(Rejection::BadNode { .. })),
        "{r:?}"
    );
    let mut tpu = node("t1", "r2", 4);
    for d in &mut tpu.devices {
        d.kind = DeviceKind::Tpu;
    }
    let r = c.apply(Command::RegisterNode(tpu));
    assert!(
        matches!(r, Response::Rejected(Rejection::BadNode { .. })),
        "{r:?}"
    );
    assert!(matches!(
        c.apply(Command::CancelJob {
            job: JobId::new("nope"),
            reason: String::new()
        }),
        Response::Rejected(Rejection::UnknownJob(_))
    ));
}

/// A random command drawn against a small fixed cluster.
#[derive(Debug, Clone)]
enum Op {
    Submit {
        tasks: u32,
        devices: u32,
        key: u8,
    },
    Place {
        job: usize,
        host: usize,
        first: u16,
    },
    Report {
        job: usize,
        task: u32,
        /// 0 succeeded, 1 failed, 2 lost.
        outcome: u8,
        old_epoch: bool,
    },
    Migrate {
        job: usize,
    },
    /// Reserve a host for one job by migrating another.
    Defrag {
        waiting: usize,
        mover: usize,
        host: usize,
    },
    CheckpointFailed {
        job: usize,
    },
    Down {
        host: usize,
    },
    Register {
        host: usize,
    },
    Cancel {
        job: usize,
    },
    Checkpoint {
        job: usize,
        step: u64,
    },
    /// Give the default queue an idle policy: 0 none, 1 reclaim, 2 report.
    SetIdle {
        action: u8,
    },
    /// The leader saw the job's lease idle, for longer than the window or not.
    Idle {
        job: usize,
        past_window: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1u32..=3, 1u32..=8, 0u8..6).prop_map(|(tasks, devices, key)| Op::Submit {
            tasks,
            devices,
            key
        }),
        (0usize..12, 0usize..4, 0u16..8).prop_map(|(job, host, first)| Op::Place {
            job,
            host,
            first
        }),
        (0usize..12, 0u32..3, 0u8..3, any::<bool>()).prop_map(|(job, task, outcome, old_epoch)| {
            Op::Report {
                job,
                task,
                outcome,
                old_epoch,
            }
        }),
        (0usize..12).prop_map(|job| Op::Migrate { job }),
        (0usize..12, 0usize..12, 0usize..4).prop_map(|(waiting, mover, host)| Op::Defrag {
            waiting,
            mover,
            host
        }),
        (0usize..12).prop_map(|job| Op::CheckpointFailed { job }),
        (0usize..4).prop_map(|host| Op::Down { host }),
        (0usize..4).prop_map(|host| Op::Register { host }),
        (0usize..12).prop_map(|job| Op::Cancel { job }),
        (0usize..12, 0u64..1000).prop_map(|(job, step)| Op::Checkpoint { job, step }),
        (0u8..3).prop_map(|action| Op::SetIdle { action }),
        (0usize..12, any::<bool>()).prop_map(|(job, past_window)| Op::Idle { job, past_window }),
    ]
}

const HOSTS: [&str; 4] = ["h0", "h1", "h2", "h3"];

/// Turns ops into commands, looking up job ids and epochs in the store as it goes.
fn to_command(store: &ClusterStore, op: &Op) -> Option<Command> {
    let jobs: Vec<&JobId> = store.jobs().keys().collect();
    let job_at = |i: usize| (!jobs.is_empty()).then(|| jobs[i % jobs.len()].clone());
    Some(match op {
        Op::Submit {
            tasks,
            devices,
            key,
        } => Command::SubmitJob(Submission {
            owner: String::new(),
            idempotency_key: Some(format!("key-{key}-{tasks}-{devices}")),
            spec: spec("j", *tasks, *devices),
        }),
        Op::Place { job, host, first } => {
            let job = job_at(*job)?;
            let rec = store.job(&job)?;
            let n = match rec.spec.resources.devices {
                gangway_proto::spec::DeviceCount::Whole(n) => n as u16,
                _ => 1,
            };
            let hosts: Vec<&str> = (0..rec.spec.tasks as usize)
                .map(|t| HOSTS[(host + t) % HOSTS.len()])
                .collect();
            Command::ApplyPlan {
                plan: Plan {
                    placements: vec![placement(&job, &hosts, *first % 8, n.min(8 - *first % 8))],
                    ..Plan::default()
                },
            }
        }
        Op::Defrag {
            waiting,
            mover,
            host,
        } => {
            let mover = job_at(*mover)?;
            Command::Defragment(DefragOrder {
                for_job: job_at(*waiting)?,
                hosts: [HostName::new(HOSTS[*host])].into(),
                moves: vec![gangway_core::state::DefragMove {
                    epoch: store.job(&mover)?.lease.as_ref().map_or(0, |l| l.epoch),
                    job: mover,
                    to: [HostName::new(HOSTS[(*host + 1) % HOSTS.len()])].into(),
                }],
                until_ms: u64::MAX,
            })
        }
        Op::Migrate { job } => Command::MigrateJob {
            job: job_at(*job)?,
            hosts: Default::default(),
        },
        Op::CheckpointFailed { job } => {
            let job = job_at(*job)?;
            let rec = store.job(&job)?;
            Command::CheckpointFailed(CheckpointFailure {
                epoch: rec.lease.as_ref().map_or(1, |l| l.epoch),
                request: rec.checkpoint_requests,
                error: "no manifest".into(),
                job,
            })
        }
        Op::Report {
            job,
            task,
            outcome,
            old_epoch,
        } => {
            let job = job_at(*job)?;
            let rec = store.job(&job)?;
            let epoch = rec
                .lease
                .as_ref()
                .map(|l| l.epoch)
                .or(rec.last_epoch)
                .unwrap_or(1);
            Command::TaskStatus(TaskReport {
                job,
                task: *task,
                epoch: if *old_epoch {
                    epoch.saturating_sub(1)
                } else {
                    epoch
                },
                state: [TaskState::Succeeded, TaskState::Failed, TaskState::Lost]
                    [usize::from(*outcome)],
                exit_code: Some(i32::from(*outcome)),
                message: String::new(),
            })
        }
        Op::Down { host } => Command::NodeDown {
            node: HostName::new(HOSTS[*host]),
            reason: "test".into(),
        },
        Op::Register { host } => Command::RegisterNode(node(HOSTS[*host], "r1", 8)),
        Op::Cancel { job } => Command::CancelJob {
            job: job_at(*job)?,
            reason: "test".into(),
        },
        Op::Checkpoint { job, step } => {
            let job = job_at(*job)?;
            let rec = store.job(&job)?;
            let epoch = rec.last_epoch?;
            // Answers the newest request: a migration waiting for it completes.
            let request = rec.checkpoint_requests;
            Command::RecordCheckpoint(CheckpointReport {
                job,
                epoch,
                request,
                manifest: CheckpointManifest {
                    path: format!("/ck/{step}"),
                    step: *step,
                    bytes: 0,
                },
            })
        }
        Op::SetIdle { action } => {
            use gangway_core::engine::{IdleAction, IdlePolicy, QueueConfig};
            Command::SetQueue(QueueConfig {
                name: "default".into(),
                guaranteed_milli: 0,
                may_borrow: true,
                idle: [None, Some(IdleAction::Reclaim), Some(IdleAction::Report)]
                    [usize::from(*action)]
                .map(|action| IdlePolicy {
                    window_ms: 60_000,
                    threshold_pct: 5,
                    action,
                }),
            })
        }
        Op::Idle { job, past_window } => {
            let job = job_at(*job)?;
            let epoch = store.job(&job)?.lease.as_ref().map_or(1, |l| l.epoch);
            Command::IdleLease(IdleReport {
                job,
                epoch,
                idle_ms: if *past_window { 61_000 } else { 59_000 },
            })
        }
    })
}

/// The safety invariants that must hold after every command.
fn check_invariants(store: &ClusterStore, epochs_seen: &mut BTreeMap<(HostName, usize), u64>) {
    // The relations a decoded snapshot or backup is checked against hold after every command.
    if let Err(e) = store.check_consistency() {
        panic!("inconsistent state: {e}");
    }
    // No device is held by two live leases: the leases' shares per device never exceed one device.
    let mut held: BTreeMap<(HostName, u16), u32> = BTreeMap::new();
    for job in store.jobs().values() {
        match (&job.lease, job.state) {
            (Some(lease), JobState::Running) => {
                // Gangs whole: a live lease covers every task of the gang.
                assert_eq!(
                    lease.placement.tasks.len() as u32,
                    job.spec.tasks,
                    "gang {} partial",
                    job.id
                );
                for t in &lease.placement.tasks {
                    for d in &t.devices {
                        let total = held.entry((t.host.clone(), d.index)).or_default();
                        *total += d.milli;
                        assert!(
                            *total <= 1000,
                            "device {}:{} over-committed",
                            t.host,
                            d.index
                        );
                    }
                }
            }
            (None, JobState::Running) => panic!("running job {} without a lease", job.id),
            (None, _) if job.migration.is_some() => {
                panic!("job {} waits to migrate without a lease", job.id)
            }
            (Some(_), state) => panic!("{state} job {} still holds a lease", job.id),
            (None, _) => {}
        }
    }
    // A block is held only for a job that still waits for it.
    for (job, _) in store.reservations() {
        let state = store.job(job).map(|j| j.state);
        assert_eq!(
            state,
            Some(JobState::Pending),
            "reservation for {job} in {state:?}"
        );
    }
    // A lease given back by an idle reclaim is accounted only while its job waits to run again.
    for job in store.jobs().values() {
        if job.reclaimed.is_some() {
            assert_eq!(
                job.state,
                JobState::Pending,
                "{} reclaimed but {}",
                job.id,
                job.state
            );
        }
    }
    // The indexes the hot paths read (pending in queue order, running, migrating) are exactly
    // what the job records say.
    assert!(
        store.job_table().indexes_consistent(),
        "job indexes drifted from the records"
    );
    // The engine's view agrees with the leases.
    assert_eq!(
        store.engine().running().len(),
        store.jobs().values().filter(|j| j.lease.is_some()).count()
    );
    // Lease epochs only grow, per device.
    for h in HOSTS {
        let host = HostName::new(h);
        if let Some(epochs) = store.device_epochs(&host) {
            for (i, e) in epochs.iter().enumerate() {
                let seen = epochs_seen.entry((host.clone(), i)).or_default();
                assert!(*e >= *seen, "epoch of {h}:{i} went back from {seen} to {e}");
                *seen = *e;
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random interleavings of submits, plans (many stale), reports (some from old epochs), node
    /// losses, re-registrations, cancels and checkpoints: the invariants hold after every command,
    /// two replicas applying the same log end byte-identical, and a snapshot restores to an equal
    /// state. proptest prints the failing sequence (and persists its seed) when one breaks.
    #[test]
    fn invariants_hold_and_replicas_agree_under_random_interleavings(ops in proptest::collection::vec(op(), 1..80)) {
        let mut a = ClusterStore::new();
        let mut b = ClusterStore::new();
        let mut events = Vec::new();
        let mut epochs_seen = BTreeMap::new();
        for h in HOSTS {
            a.apply(0, Command::RegisterNode(node(h, "r1", 8)), &mut events);
            b.apply(0, Command::RegisterNode(node(h, "r1", 8)), &mut events);
        }
        for (i, op) in ops.iter().enumerate() {
            let Some(cmd) = to_command(&a, op) else { continue };
            let now = 1000 + i as u64 * 7;
            let ra = a.apply(now, cmd.clone(), &mut events);
            let rb = b.apply(now, cmd, &mut events);
            prop_assert_eq!(ra, rb);
            check_invariants(&a, &mut epochs_seen);
        }
        let snap = a.to_snapshot().unwrap();
        prop_assert_eq!(&snap, &b.to_snapshot().unwrap());
        let restored = ClusterStore::from_snapshot(&snap).unwrap();
        prop_assert_eq!(restored, a);
    }
}

/// The Raft log stores commands and responses with bincode: every variant must survive the trip,
/// including plans with pending reasons and preemptions (an internally tagged enum would not).
#[test]
fn every_command_and_response_round_trips_through_the_log_encoding() {
    use gangway_core::engine::{Preemption, PreemptionReason, QueueConfig};
    let job = JobId::new("j-1");
    let commands = vec![
        Command::RegisterNode(node("h1", "r1", 2)),
        Command::SetNodeState(NodeStateChange {
            node: HostName::new("h1"),
            state: NodeState::Draining,
            reason: "r".into(),
            grace_ms: None,
        }),
        Command::NodeDown {
            node: HostName::new("h1"),
            reason: "r".into(),
        },
        Command::SubmitJob(Submission {
            owner: String::new(),
            idempotency_key: Some("k".into()),
            spec: spec("j", 2, 8),
        }),
        Command::CancelJob {
            job: job.clone(),
            reason: "r".into(),
        },
        Command::ApplyPlan {
            plan: Plan {
                placements: vec![placement(&job, &["h1"], 0, 2)],
                preemptions: vec![Preemption {
                    victim: JobId::new("v"),
                    preemptor: job.clone(),
                    reason: PreemptionReason::HigherPriority {
                        victim_priority: 1,
                        preemptor_priority: 9,
                    },
                }],
                pending: vec![PendingJob {
                    job: job.clone(),
                    reason: PendingReason::InsufficientCapacity {
                        wanted: "8 x H100".into(),
                        needed: 8,
                        free: 2,
                    },
                }],
            },
        },
        Command::TaskStatus(TaskReport {
            job: job.clone(),
            task: 0,
            epoch: 3,
            state: TaskState::Failed,
            exit_code: Some(-9),
            message: "killed".into(),
        }),
        Command::RecordCheckpoint(CheckpointReport {
            job: job.clone(),
            epoch: 3,
            request: 0,
            manifest: CheckpointManifest {
                path: "/c".into(),
                step: 9,
                bytes: 1,
            },
        }),
        Command::SetQueue(QueueConfig {
            name: "research".into(),
            guaranteed_milli: 8000,
            may_borrow: true,
            idle: Some(gangway_core::engine::IdlePolicy {
                window_ms: 1_800_000,
                threshold_pct: 5,
                action: gangway_core::engine::IdleAction::Reclaim,
            }),
        }),
        Command::IdleLease(IdleReport {
            job: job.clone(),
            epoch: 3,
            idle_ms: 1_900_000,
        }),
        Command::Restore {
            state: Box::new(ClusterStore::new()),
            backup_revision: 77,
        },
        Command::CheckpointFailed(CheckpointFailure {
            job: job.clone(),
            epoch: 3,
            request: 2,
            error: "no manifest".into(),
        }),
        Command::RequestCheckpoint {
            job: job.clone(),
            reason: "user".into(),
        },
        Command::MigrateJob {
            job: job.clone(),
            hosts: gangway_core::engine::HostFilter {
                only: [HostName::new("h2")].into(),
                avoid: [HostName::new("h1")].into(),
            },
        },
        Command::Defragment(DefragOrder {
            for_job: JobId::new("j-2"),
            hosts: [HostName::new("h1")].into(),
            moves: vec![gangway_core::state::DefragMove {
                job: job.clone(),
                epoch: 3,
                to: [HostName::new("h2")].into(),
            }],
            until_ms: 99,
        }),
        Command::TaskStatus(TaskReport {
            job: job.clone(),
            task: 1,
            epoch: 3,
            state: TaskState::Lost,
            exit_code: None,
            message: "lease expired".into(),
        }),
        Command::SubmitJob(Submission {
            owner: "client/alice".into(),
            idempotency_key: None,
            spec: JobSpec::from_toml_str(
                "name = \"s\"\ncommand = [\"true\"]\n[secret_env]\nTOKEN = \"t0ps3cret\"\n[resources]\ndevices = 1\n",
            )
            .unwrap(),
        }),
        Command::Audited {
            actor: "client/alice".into(),
            command: Box::new(Command::CancelJob {
                job: job.clone(),
                reason: "r".into(),
            }),
        },
        Command::AuditNote(gangway_core::state::AuditNote {
            actor: "client/ops".into(),
            action: "add_member".into(),
            target: "replica 4 at 10.0.0.4:7101".into(),
            outcome: "ok".into(),
        }),
    ];
    for cmd in commands {
        let bytes = bincode::serialize(&cmd).expect("encode");
        let back: Command =
            bincode::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", cmd.kind()));
        assert_eq!(back, cmd);
    }
    // The wrapper nests once: bytes of an audited command inside another are refused, so no input
    // makes the decoder recurse without bound.
    let nested = Command::Audited {
        actor: "a".into(),
        command: Box::new(Command::Audited {
            actor: "b".into(),
            command: Box::new(Command::SetLimits(Default::default())),
        }),
    };
    let err = bincode::deserialize::<Command>(&bincode::serialize(&nested).unwrap()).unwrap_err();
    assert!(err.to_string().contains("cannot wrap"), "{err}");
    // ... and a refusal leaves the decoder able to read a good one after it.
    let once = Command::Audited {
        actor: "a".into(),
        command: Box::new(Command::SetLimits(Default::default())),
    };
    let back: Command = bincode::deserialize(&bincode::serialize(&once).unwrap()).unwrap();
    assert_eq!(back, once);
    let responses = vec![
        Response::Done,
        Response::Submitted {
            job: job.clone(),
            existing: true,
        },
        Response::PlanApplied {
            placed: vec![(job.clone(), 4)],
            stale: vec![(job.clone(), "x".into())],
            preempted: vec![job.clone()],
        },
        Response::Rejected(Rejection::StaleEpoch {
            job,
            got: 1,
            current: 2,
        }),
    ];
    for r in responses {
        let back: Response = bincode::deserialize(&bincode::serialize(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}

/// A migration is checkpoint -> stop -> place elsewhere -> restore. Each step is its own committed
/// command, so a failed checkpoint leaves the job running where it was, and the lease only ends
/// once the checkpoint that answers the migration's own request is committed.
#[test]
fn a_migration_stops_the_job_only_after_its_checkpoint_and_then_avoids_the_old_hosts() {
    use gangway_core::engine::HostFilter;
    let mut c = Cluster::new();
    for (name, rack) in [("h1", "r1"), ("h2", "r1"), ("h3", "r2"), ("h4", "r2")] {
        assert_eq!(
            c.apply(Command::RegisterNode(node(name, rack, 8))),
            Response::Done
        );
    }
    let job = c.submit(spec("train", 2, 8));
    c.place(vec![placement(&job, &["h1", "h2"], 0, 8)]);
    let first = c.epoch_of(&job);
    let requests =
        |c: &Cluster| c.store.allocations_for(&HostName::new("h1"))[0].checkpoint_request;
    assert_eq!(requests(&c), 0);

    // Phase 1: bad migrations are refused whole, with nothing changed.
    let before = c.store.clone();
    let unknown = HostFilter {
        only: [HostName::new("h9")].into(),
        ..HostFilter::default()
    };
    assert!(matches!(
        c.apply(Command::MigrateJob {
            job: job.clone(),
            hosts: unknown
        }),
        Response::Rejected(Rejection::UnknownNode(_))
    ));
    let plain = c.submit(
        JobSpec::from_toml_str(
            "name = \"plain\"\ncommand = [\"sleep\", \"1\"]\n[resources]\ndevices = 1\n",
        )
        .unwrap(),
    );
    assert!(matches!(
        c.apply(Command::MigrateJob {
            job: plain.clone(),
            hosts: HostFilter::default()
        }),
        Response::Rejected(Rejection::WrongJobState { .. })
    ));
    assert_eq!(c.store.job(&job), before.job(&job));

    // Phase 2: a migration whose checkpoint fails is aborted; the job keeps its lease.
    assert_eq!(
        c.apply(Command::MigrateJob {
            job: job.clone(),
            hosts: HostFilter::default()
        }),
        Response::Done
    );
    assert_eq!(requests(&c), 1, "the workers see a checkpoint request");
    let alloc = &c.store.allocations_for(&HostName::new("h1"))[0];
    assert_eq!(
        alloc.checkpoint_request_at_grant, 0,
        "made after the grant: a worker that has not launched yet answers it with the restore point"
    );
    assert!(
        matches!(
            c.apply(Command::MigrateJob {
                job: job.clone(),
                hosts: HostFilter::default()
            }),
            Response::Rejected(Rejection::WrongJobState { .. })
        ),
        "one migration at a time"
    );
    c.apply(Command::CheckpointFailed(CheckpointFailure {
        job: job.clone(),
        epoch: first,
        request: 1,
        error: "no manifest within 30s".into(),
    }));
    let j = c.store.job(&job).unwrap();
    assert_eq!(j.state, JobState::Running);
    assert!(j.migration.is_none());
    assert_eq!(c.epoch_of(&job), first);

    // Phase 3: a second migration. A checkpoint answering an OLDER request does not stop the job;
    // the one answering this migration's request does, and the job avoids h1 and h2.
    c.apply(Command::MigrateJob {
        job: job.clone(),
        hosts: HostFilter::default(),
    });
    assert_eq!(requests(&c), 2);
    let ck = |step: u64, request: u64| {
        Command::RecordCheckpoint(CheckpointReport {
            job: job.clone(),
            epoch: first,
            request,
            manifest: CheckpointManifest {
                path: format!("/ck/{step}"),
                step,
                bytes: 1,
            },
        })
    };
    c.apply(ck(10, 1));
    assert_eq!(c.store.job(&job).unwrap().state, JobState::Running);
    c.apply(ck(20, 2));
    let j = c.store.job(&job).unwrap();
    assert_eq!(j.state, JobState::Pending);
    assert_eq!(j.last_checkpoint.as_ref().unwrap().manifest.step, 20);
    assert_eq!(j.last_hosts, vec![HostName::new("h1"), HostName::new("h2")]);
    assert!(
        c.store.allocations_for(&HostName::new("h1")).is_empty(),
        "the old hosts stop it"
    );
    let req = j.gang_request();
    assert!(!req.hosts.allows(&HostName::new("h1")) && req.hosts.allows(&HostName::new("h3")));

    // Phase 4: the plan applier refuses a plan that puts it back on a host it left; the real
    // engine places it on the other rack, restoring from step 20 under a newer epoch.
    assert!(matches!(
        c.place(vec![placement(&job, &["h2", "h3"], 0, 8)]),
        Response::PlanApplied { ref stale, .. } if stale.len() == 1
    ));
    let pending = vec![c.store.job(&job).unwrap().gang_request()];
    let plan = gangway_core::engine::schedule(
        c.store.engine(),
        &pending,
        &gangway_core::engine::SchedulerConfig::default(),
        c.now,
    );
    c.place(plan.placements);
    let j = c.store.job(&job).unwrap();
    assert_eq!(j.state, JobState::Running, "{:?}", j.pending_reason);
    assert!(c.epoch_of(&job) > first);
    let hosts: Vec<&str> = j
        .lease
        .as_ref()
        .unwrap()
        .placement
        .tasks
        .iter()
        .map(|t| t.host.as_str())
        .collect();
    assert!(hosts.iter().all(|h| ["h3", "h4"].contains(h)), "{hosts:?}");
    assert!(
        j.gang_request().hosts.is_empty(),
        "the filter binds one placement only"
    );
    let alloc = &c.store.allocations_for(&HostName::new(hosts[0]))[0];
    assert_eq!(alloc.restore_from.as_deref(), Some("/ck/20"));
    // The requests made under earlier leases are not this lease's to answer: the worker answers
    // at launch only requests above the count at grant.
    assert_eq!(
        (alloc.checkpoint_request, alloc.checkpoint_request_at_grant),
        (2, 2)
    );
}

/// A rank stopped by its host's lease deadline (cut off from the scheduler) is not the job's
/// fault: the gang is re-queued whole from its checkpoint, where a failed rank fails it.
#[test]
fn a_lost_rank_requeues_the_gang_and_a_failed_rank_fails_it() {
    let mut c = Cluster::new();
    for name in ["h1", "h2"] {
        c.apply(Command::RegisterNode(node(name, "r1", 8)));
    }
    for (state, want) in [
        (TaskState::Lost, JobState::Pending),
        (TaskState::Failed, JobState::Failed),
    ] {
        let job = c.submit(spec("gang", 2, 8));
        c.place(vec![placement(&job, &["h1", "h2"], 0, 8)]);
        let epoch = c.epoch_of(&job);
        c.report(&job, 0, epoch, TaskState::Running);
        c.report(&job, 1, epoch, state);
        let j = c.store.job(&job).unwrap();
        assert_eq!(j.state, want, "{state:?}: {:?}", j.history);
        assert!(
            j.lease.is_none(),
            "{state:?}: every device of the gang is released"
        );
        assert!(c.store.allocations_for(&HostName::new("h1")).is_empty());
        if want == JobState::Failed {
            continue;
        }
        // The lost gang's late reports change nothing, and it can be placed again.
        c.report(&job, 0, epoch, TaskState::Failed);
        assert_eq!(c.store.job(&job).unwrap().state, JobState::Pending);
        c.apply(Command::CancelJob {
            job: job.clone(),
            reason: "next case".into(),
        });
    }
}

/// The defragmenter's command: checked whole against the lease epochs it was planned on (a stale
/// plan changes nothing), then the moved gangs migrate and the freed hosts are held for the waiting
/// gang: the plan applier refuses any other job there until the reservation is used or expires.
#[test]
fn a_defragmentation_plan_is_fenced_by_epochs_and_its_reservation_holds() {
    use gangway_core::state::DefragMove;
    let mut c = Cluster::new();
    for name in ["h1", "h2", "h3"] {
        c.apply(Command::RegisterNode(node(name, "r1", 8)));
    }
    let a = c.submit(spec("a", 1, 1));
    c.place(vec![placement(&a, &["h1"], 0, 1)]);
    let b = c.submit(spec("b", 1, 1));
    c.place(vec![placement(&b, &["h2"], 0, 1)]);
    let gang = c.submit(spec("gang", 2, 8));
    let (ea, eb) = (c.epoch_of(&a), c.epoch_of(&b));
    let mv = |job: &JobId, epoch| DefragMove {
        job: job.clone(),
        epoch,
        to: [HostName::new("h3")].into(),
    };
    let held: std::collections::BTreeSet<HostName> =
        [HostName::new("h1"), HostName::new("h2")].into();
    let plan = |moves: Vec<DefragMove>, until_ms| {
        Command::Defragment(DefragOrder {
            for_job: gang.clone(),
            hosts: held.clone(),
            moves,
            until_ms,
        })
    };

    // Phase 1: a plan that saw an older lease of b is refused whole: a does not start migrating.
    let before = c.store.clone();
    assert!(matches!(
        c.apply(plan(vec![mv(&a, ea), mv(&b, eb - 1)], 1_000_000)),
        Response::Rejected(Rejection::StaleEpoch { .. })
    ));
    assert_eq!(c.store.job(&a), before.job(&a));
    assert_eq!(c.store.reservations().count(), 0);
    assert!(
        c.store.capacity_actions().is_empty(),
        "a refused plan did nothing"
    );

    // Phase 2: the current plan: both migrate, h1 and h2 are held for the gang.
    assert_eq!(
        c.apply(plan(vec![mv(&a, ea), mv(&b, eb)], 1_000_000)),
        Response::Done
    );
    assert!(c.store.job(&a).unwrap().migration.is_some());
    assert_eq!(c.store.reservations().count(), 1);
    let done = &c.store.capacity_actions()[0].what;
    assert!(
        done.starts_with("defragmentation: migrating") && done.contains(a.as_str()),
        "{done}"
    );
    // Another job may not be placed on a held host; the held gang may.
    let other = c.submit(spec("other", 1, 1));
    assert!(c
        .store
        .pending_gangs()
        .iter()
        .any(|g| g.id == other && g.hosts.avoid.contains(&HostName::new("h1"))));
    assert!(matches!(
        c.place(vec![placement(&other, &["h1"], 4, 1)]),
        Response::PlanApplied { ref stale, .. } if stale.len() == 1
    ));

    // Phase 3: the checkpoints land, a and b are released; the gang takes the held hosts and the
    // reservation ends.
    for (job, epoch) in [(&a, ea), (&b, eb)] {
        c.apply(Command::RecordCheckpoint(CheckpointReport {
            job: job.clone(),
            epoch,
            request: 1,
            manifest: CheckpointManifest {
                path: format!("/ck/{job}"),
                step: 5,
                bytes: 1,
            },
        }));
        assert_eq!(c.store.job(job).unwrap().state, JobState::Pending);
    }
    c.place(vec![placement(&gang, &["h1", "h2"], 0, 8)]);
    assert_eq!(c.store.job(&gang).unwrap().state, JobState::Running);
    assert_eq!(c.store.reservations().count(), 0);

    // Phase 4: a reservation that times out holds nothing.
    let late = c.submit(spec("late", 2, 8));
    let d = c.submit(spec("d", 1, 1));
    c.place(vec![placement(&d, &["h3"], 2, 1)]);
    let ed = c.epoch_of(&d);
    let until = c.now + 50;
    assert_eq!(
        c.apply(Command::Defragment(DefragOrder {
            for_job: late.clone(),
            hosts: [HostName::new("h3")].into(),
            moves: vec![mv(&d, ed)],
            until_ms: until,
        })),
        Response::Done
    );
    assert_eq!(c.store.reservations().count(), 1);
    for _ in 0..6 {
        c.apply(Command::SetNodeState(NodeStateChange {
            node: HostName::new("h3"),
            state: gangway_core::engine::NodeState::Ready,
            reason: "tick".into(),
            grace_ms: None,
        }));
    }
    assert_eq!(c.store.reservations().count(), 0, "expired by log time");
}

/// Preemption of a checkpointable gang is checkpoint-then-stop: the victim keeps running until
/// its checkpoint is committed (or fails: then it is stopped anyway), and its hosts are held for
/// the preemptor all along, so no third job can take the devices it frees.
#[test]
fn a_checkpointable_victim_checkpoints_before_it_stops_and_its_hosts_wait_for_the_preemptor() {
    use gangway_core::engine::{Preemption, PreemptionReason};
    let mut c = Cluster::new();
    c.apply(Command::RegisterNode(node("h1", "r1", 8)));
    let preempt = |c: &mut Cluster, victim: &JobId, preemptor: &JobId| {
        c.apply(Command::ApplyPlan {
            plan: Plan {
                preemptions: vec![Preemption {
                    victim: victim.clone(),
                    preemptor: preemptor.clone(),
                    reason: PreemptionReason::HigherPriority {
                        victim_priority: 0,
                        preemptor_priority: 10,
                    },
                }],
                ..Plan::default()
            },
        })
    };
    for checkpoint_ok in [true, false] {
        let low = c.submit(spec("low", 1, 8));
        c.place(vec![placement(&low, &["h1"], 0, 8)]);
        let epoch = c.epoch_of(&low);
        let high = c.submit(spec("high", 1, 8));
        let third = c.submit(spec("third", 1, 1));

        // Phase 1: the victim is asked to checkpoint and keeps its lease; h1 is held for `high`.
        preempt(&mut c, &low, &high);
        let j = c.store.job(&low).unwrap();
        assert_eq!(j.state, JobState::Running);
        assert_eq!(j.preemptions, 1);
        assert!(c.store.allocations_for(&HostName::new("h1"))[0].checkpoint_request > 0);
        assert!(c.store.reservations().any(|(j, _)| *j == high));

        // Phase 2: the checkpoint lands (or fails): the victim stops either way, re-queued.
        let request = c.store.job(&low).unwrap().checkpoint_requests;
        if checkpoint_ok {
            c.apply(Command::RecordCheckpoint(CheckpointReport {
                job: low.clone(),
                epoch,
                request,
                manifest: CheckpointManifest {
                    path: "/ck/low".into(),
                    step: 30,
                    bytes: 1,
                },
            }));
        } else {
            c.apply(Command::CheckpointFailed(CheckpointFailure {
                job: low.clone(),
                epoch,
                request,
                error: "no manifest within 10s".into(),
            }));
        }
        let j = c.store.job(&low).unwrap();
        assert_eq!(j.state, JobState::Pending, "checkpoint ok: {checkpoint_ok}");
        assert!(j.lease.is_none());

        // Phase 3: the freed devices are the preemptor's: a third job is refused there.
        assert!(matches!(
            c.place(vec![placement(&third, &["h1"], 0, 1)]),
            Response::PlanApplied { ref stale, .. } if stale.len() == 1
        ));
        c.place(vec![placement(&high, &["h1"], 0, 8)]);
        assert_eq!(c.store.job(&high).unwrap().state, JobState::Running);
        assert_eq!(c.store.reservations().count(), 0, "the hold ends once used");
        for j in [&high, &third, &low] {
            c.apply(Command::CancelJob {
                job: j.clone(),
                reason: "next case".into(),
            });
        }
    }
}

/// Idle-lease reclamation as the state machine applies it: the leader's observation is checked
/// against the lease and the queue's policy as committed, a reclaim checkpoints first, the job
/// goes back in the queue behind the jobs waiting, and the devices it gave back are credited.
#[test]
fn an_idle_lease_is_reclaimed_by_checkpoint_or_only_reported_as_its_queue_says() {
    use gangway_core::engine::{IdleAction, IdlePolicy, QueueConfig, SchedulerConfig};
    let mut c = Cluster::new();
    c.apply(Command::RegisterNode(node("h1", "r1", 8)));
    let mut notebook_spec = spec("notebook", 1, 8);
    notebook_spec.queue = "research".into();
    let notebook = c.submit(notebook_spec);
    c.place(vec![placement(&notebook, &["h1"], 0, 8)]);
    let epoch = c.epoch_of(&notebook);
    let set_policy = |action: Option<IdleAction>| {
        Command::SetQueue(QueueConfig {
            name: "research".into(),
            guaranteed_milli: 0,
            may_borrow: true,
            idle: action.map(|action| IdlePolicy {
                window_ms: 60_000,
                threshold_pct: 5,
                action,
            }),
        })
    };
    let idle = |epoch: u64, idle_ms: u64| {
        Command::IdleLease(IdleReport {
            job: notebook.clone(),
            epoch,
            idle_ms,
        })
    };

    // Phase 1: nothing happens without a policy, under the window, or for another lease.
    let refused = |r: Response| matches!(r, Response::Rejected(_));
    assert!(refused(c.apply(idle(epoch, 120_000))), "no policy yet");
    c.apply(set_policy(Some(IdleAction::Reclaim)));
    assert!(refused(c.apply(idle(epoch, 59_999))), "under the window");
    assert!(matches!(
        c.apply(idle(epoch + 1, 120_000)),
        Response::Rejected(Rejection::StaleEpoch { .. })
    ));
    assert_eq!(c.store.job(&notebook).unwrap().state, JobState::Running);
    assert_eq!(c.store.job(&notebook).unwrap().checkpoint_requests, 0);

    // Phase 2: a report policy writes one history line per lease and keeps the devices.
    c.apply(set_policy(Some(IdleAction::Report)));
    assert_eq!(c.apply(idle(epoch, 61_000)), Response::Done);
    assert_eq!(c.apply(idle(epoch, 90_000)), Response::Done);
    let j = c.store.job(&notebook).unwrap();
    let reports = j
        .history
        .iter()
        .filter(|h| h.what.starts_with("idle, reported only"))
        .count();
    assert_eq!(reports, 1, "{:?}", j.history);
    assert_eq!(
        (j.state, j.reclaims, j.checkpoint_requests),
        (JobState::Running, 0, 0)
    );

    // Phase 3: under a reclaim policy the job checkpoints first and keeps its lease meanwhile;
    // a second observation while it checkpoints changes nothing.
    c.apply(set_policy(Some(IdleAction::Reclaim)));
    let waiting = c.submit(spec("waiting", 1, 8));
    assert_eq!(c.apply(idle(epoch, 61_000)), Response::Done);
    assert_eq!(c.store.job(&notebook).unwrap().checkpoint_requests, 1);
    let actions: Vec<&str> = c
        .store
        .capacity_actions()
        .iter()
        .map(|a| a.what.as_str())
        .collect();
    assert_eq!(actions.len(), 2, "one report, one reclaim: {actions:?}");
    assert!(
        actions[0].contains("reported") && actions[1].contains("idle lease reclaimed"),
        "{actions:?}"
    );
    assert!(refused(c.apply(idle(epoch, 62_000))));
    assert_eq!(c.store.job(&notebook).unwrap().state, JobState::Running);
    c.apply(Command::RecordCheckpoint(CheckpointReport {
        job: notebook.clone(),
        epoch,
        request: 1,
        manifest: CheckpointManifest {
            path: "/ck/7".into(),
            step: 7,
            bytes: 1,
        },
    }));
    let reclaimed_at = c.now;
    let j = c.store.job(&notebook).unwrap();
    assert_eq!((j.state, j.reclaims), (JobState::Pending, 1));
    let reason = j.pending_text().unwrap_or_default();
    assert!(
        reason.contains("idle lease reclaimed")
            && reason.contains("below 5%")
            && reason.contains("step 7"),
        "{reason}"
    );
    assert!(
        c.store.allocations_for(&HostName::new("h1")).is_empty(),
        "devices released"
    );

    // Phase 4: it queues behind the job that was already waiting, although submitted first: the
    // real engine gives the freed host to `waiting`.
    let plan = gangway_core::engine::schedule(
        c.store.engine(),
        &c.store.pending_gangs(),
        &SchedulerConfig::default(),
        c.now,
    );
    assert_eq!(plan.placements.len(), 1);
    assert_eq!(plan.placements[0].job, waiting);
    c.place(plan.placements);

    // Phase 5: when it runs again, the time its devices were free is credited (8 devices x the
    // time between reclaim and placement), and it restores from its checkpoint.
    c.apply(Command::CancelJob {
        job: waiting.clone(),
        reason: "done".into(),
    });
    c.now += 3_600_000;
    c.place(vec![placement(&notebook, &["h1"], 0, 8)]);
    assert_eq!(c.store.job(&notebook).unwrap().state, JobState::Running);
    let hours = c.store.reclaimed_device_hours();
    let expected = 8.0 * (c.now - reclaimed_at) as f64 / 3_600_000.0;
    assert!((hours - expected).abs() < 1e-3, "{hours} vs {expected}");
    let alloc = &c.store.allocations_for(&HostName::new("h1"))[0];
    assert_eq!(alloc.restore_from.as_deref(), Some("/ck/7"));

    // Phase 6: a job that cannot checkpoint is released at once and starts over.
    c.apply(Command::RegisterNode(node("h2", "r1", 8)));
    let plain = c.submit(
        JobSpec::from_toml_str(
            "name = \"plain\"\nqueue = \"research\"\ncommand = [\"sleep\", \"1d\"]\n[resources]\ndevices = 1\n",
        )
        .unwrap(),
    );
    c.place(vec![placement(&plain, &["h2"], 0, 1)]);
    let plain_epoch = c.epoch_of(&plain);
    assert_eq!(
        c.apply(Command::IdleLease(IdleReport {
            job: plain.clone(),
            epoch: plain_epoch,
            idle_ms: 61_000
        })),
        Response::Done
    );
    let j = c.store.job(&plain).unwrap();
    assert_eq!(
        (j.state, j.reclaims, j.checkpoint_requests),
        (JobState::Pending, 1, 0)
    );
    assert!(j
        .pending_text()
        .as_deref()
        .unwrap_or("")
        .contains("cannot checkpoint"));
    assert!(c.store.allocations_for(&HostName::new("h2")).is_empty());
}

/// Disaster recovery: a backup loads only into an empty cluster; leases from before it are not
/// trusted (their jobs wait again, from their checkpoints), and epochs and revisions jump past
/// anything the old cluster could have granted after the backup, so its workers accept the
/// restored cluster's directives.
#[test]
fn a_backup_restores_into_an_empty_cluster_only_and_trusts_no_lease_from_before_it() {
    use gangway_core::state::RESTORE_JUMP;
    // Phase 1: the old cluster: a running gang with a checkpoint, and a pending job.
    let mut old = Cluster::new();
    old.apply(Command::RegisterNode(node("h1", "r1", 8)));
    let running = old.submit(spec("running", 1, 8));
    let waiting = old.submit(spec("waiting", 1, 8));
    old.place(vec![placement(&running, &["h1"], 0, 8)]);
    let old_epoch = old.epoch_of(&running);
    old.apply(Command::RecordCheckpoint(CheckpointReport {
        job: running.clone(),
        epoch: old_epoch,
        request: 0,
        manifest: CheckpointManifest {
            path: "/ck/40".into(),
            step: 40,
            bytes: 1,
        },
    }));
    let backup = old.store.clone();

    // Phase 2: a cluster that already has state refuses it, unchanged.
    let restore = |revision| Command::Restore {
        state: Box::new(backup.clone()),
        backup_revision: revision,
    };
    let mut busy = Cluster::new();
    busy.apply(Command::RegisterNode(node("h9", "r1", 8)));
    let before = busy.store.clone();
    assert!(matches!(
        busy.apply(restore(500)),
        Response::Rejected(Rejection::NotEmpty { nodes: 1, jobs: 0 })
    ));
    assert_eq!(busy.store.job(&running), None);
    assert_eq!(busy.store.nodes(), before.nodes());

    // Phase 3: a new cluster takes it: both jobs are back, nobody holds a lease, the gang waits
    // to restart from its checkpoint.
    let mut new = Cluster::new();
    assert_eq!(new.apply(restore(500)), Response::Done);
    assert_eq!(new.store.jobs().len(), 2);
    assert!(new.store.allocations_for(&HostName::new("h1")).is_empty());
    let j = new.store.job(&running).unwrap();
    assert_eq!(j.state, JobState::Pending);
    assert!(
        j.pending_text()
            .as_deref()
            .unwrap_or("")
            .contains("restored from a backup"),
        "{:?}",
        j.pending_reason
    );
    assert_eq!(new.store.job(&waiting).unwrap().state, JobState::Pending);
    assert!(new.store.revision(1) > 500 + RESTORE_JUMP);

    // Phase 4: the next lease's epoch is far past the old one, and it restores the checkpoint.
    new.place(vec![placement(&running, &["h1"], 0, 8)]);
    assert!(new.epoch_of(&running) > old_epoch + RESTORE_JUMP);
    let alloc = &new.store.allocations_for(&HostName::new("h1"))[0];
    assert_eq!(alloc.restore_from.as_deref(), Some("/ck/40"));

    // Phase 5: a second restore over it is refused.
    assert!(matches!(
        new.apply(restore(500)),
        Response::Rejected(Rejection::NotEmpty { .. })
    ));

    // Phase 6: a backup that contradicts itself (a lease on a host no record knows, as an edit
    // of the JSON could make it) is refused whole by the apply, which every replica runs.
    assert_eq!(backup.check_consistency(), Ok(()));
    let mut json: serde_json::Value =
        serde_json::from_slice(&backup.to_snapshot().unwrap()).unwrap();
    json["jobs"][running.as_str()]["lease"]["placement"]["tasks"][0]["host"] = "ghost".into();
    let edited = ClusterStore::from_snapshot(&serde_json::to_vec(&json).unwrap()).unwrap();
    let why = edited.check_consistency().unwrap_err();
    assert!(why.contains(running.as_str()), "{why}");
    let mut empty = Cluster::new();
    let r = empty.apply(Command::Restore {
        state: Box::new(edited),
        backup_revision: 500,
    });
    assert!(
        matches!(&r, Response::Rejected(e) if e.code() == "invalid_backup"),
        "{r:?}"
    );
    assert!(empty.store.jobs().is_empty() && empty.store.nodes().is_empty());
}

/// A migration whose checkpoint answer was lost (an agent restarted mid-checkpoint) does not hold
/// its job forever: past twice the checkpoint timeout plus the slack the leader commits the
/// failure, which aborts a move (the job keeps running) or stops a preemption victim anyway.
#[test]
fn an_unanswered_migration_is_timed_out_by_the_leader() {
    use gangway_core::state::MIGRATION_SLACK_MS;
    let mut c = Cluster::new();
    c.apply(Command::RegisterNode(node("h1", "r1", 8)));
    c.apply(Command::RegisterNode(node("h2", "r1", 8)));
    let job = c.submit(spec("train", 1, 8));
    c.place(vec![placement(&job, &["h1"], 0, 8)]);
    let epoch = c.epoch_of(&job);
    c.apply(Command::MigrateJob {
        job: job.clone(),
        hosts: Default::default(),
    });
    let asked = c.now;
    let timeout = c
        .store
        .job(&job)
        .unwrap()
        .spec
        .checkpoint
        .as_ref()
        .unwrap()
        .timeout;
    let deadline = asked + 2 * timeout.as_millis() as u64 + MIGRATION_SLACK_MS;

    // Phase 1: within the deadline nothing is overdue.
    assert!(c.store.overdue_migrations(deadline).is_empty());

    // Phase 2: past it, one failure for exactly this lease and request; applied, the move is
    // aborted and the job keeps its lease; nothing is overdue any more.
    let overdue = c.store.overdue_migrations(deadline + 1);
    assert_eq!(overdue.len(), 1);
    assert!(matches!(
        &overdue[0],
        Command::CheckpointFailed(CheckpointFailure { job: j, epoch: e, request: 1, .. }) if *j == job && *e == epoch
    ));
    c.now = deadline;
    assert_eq!(c.apply(overdue[0].clone()), Response::Done);
    let j = c.store.job(&job).unwrap();
    assert_eq!((j.state, j.migration.is_none()), (JobState::Running, true));
    assert_eq!(c.epoch_of(&job), epoch);
    assert!(c.store.overdue_migrations(deadline + 1).is_empty());
}
