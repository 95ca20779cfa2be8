//! Bounded state, as stories: finished jobs leave after their retention (archived on the way),
//! idempotency keys expire after their window, a full queue refuses submissions, and the indexes
//! a replica keeps are the same whether it replayed the log or installed a snapshot.

use gangway_core::engine::{DeviceShare, GangPlacement, Plan, TaskPlacement};
use gangway_core::state::{
    ClusterStore, Command, Event, JobState, Limits, NodeRegistration, Response, Submission,
    TaskReport, TaskState, PRUNE_BATCH,
};
use gangway_proto::ids::{HostName, JobId};
use gangway_proto::spec::JobSpec;
use proptest::prelude::*;

mod common;

const HOUR: u64 = 3_600_000;

fn node(name: &str) -> NodeRegistration {
    common::node(name, "r1", 8)
}

fn spec(name: &str, queue: &str) -> JobSpec {
    JobSpec::from_toml_str(&format!(
        "name = \"{name}\"\nqueue = \"{queue}\"\ncommand = [\"true\"]\n[resources]\ndevices = 1\n"
    ))
    .expect("valid spec")
}

struct Cluster {
    store: ClusterStore,
    now: u64,
    events: Vec<Event>,
    /// Every command applied, with its log time: what a replica replays.
    log: Vec<(u64, Command)>,
}

impl Cluster {
    fn new() -> Self {
        let mut c = Self {
            store: ClusterStore::new(),
            now: 1_000,
            events: Vec::new(),
            log: Vec::new(),
        };
        c.apply(Command::RegisterNode(node("h1")));
        c
    }

    fn apply(&mut self, cmd: Command) -> Response {
        self.now += 10;
        self.log.push((self.now, cmd.clone()));
        self.store.apply(self.now, cmd, &mut self.events)
    }

    fn submit_keyed(&mut self, name: &str, key: Option<&str>) -> Response {
        self.apply(Command::SubmitJob(Submission {
            owner: String::new(),
            idempotency_key: key.map(str::to_owned),
            spec: spec(name, "default"),
        }))
    }

    fn submit(&mut self, name: &str) -> JobId {
        match self.submit_keyed(name, None) {
            Response::Submitted { job, .. } => job,
            other => panic!("{other:?}"),
        }
    }

    /// Places `job` on device `d` of h1 and lets it succeed.
    fn run_to_completion(&mut self, job: &JobId, d: u16) {
        let placement = GangPlacement {
            job: job.clone(),
            queue: "default".into(),
            tasks: vec![TaskPlacement {
                host: HostName::new("h1"),
                devices: vec![DeviceShare {
                    index: d,
                    milli: 1000,
                }],
                cpu_milli: 0,
                memory_mib: 0,
            }],
            borrowed_milli: 0,
        };
        let r = self.apply(Command::ApplyPlan {
            plan: Plan {
                placements: vec![placement],
                ..Plan::default()
            },
        });
        assert!(
            matches!(r, Response::PlanApplied { ref placed, .. } if placed.len() == 1),
            "{r:?}"
        );
        let epoch = self.store.job(job).unwrap().lease.as_ref().unwrap().epoch;
        let r = self.apply(Command::TaskStatus(TaskReport {
            job: job.clone(),
            task: 0,
            epoch,
            state: TaskState::Succeeded,
            exit_code: Some(0),
            message: String::new(),
        }));
        assert_eq!(r, Response::Done);
        assert_eq!(self.store.job(job).unwrap().state, JobState::Succeeded);
    }

    /// Commits what the leader would propose now, until nothing is due.
    fn prune(&mut self) -> Vec<JobId> {
        let mut archived = Vec::new();
        while let Some(cmd) = self.store.prune_due(self.now) {
            self.events.clear();
            assert_eq!(self.apply(cmd), Response::Done);
            for e in self.events.drain(..) {
                if let Event::Archived(job) = e {
                    archived.push(job.id.clone());
                }
            }
        }
        archived
    }

    fn set_limits(&mut self, f: impl FnOnce(&mut Limits)) -> Response {
        let mut limits = *self.store.limits();
        f(&mut limits);
        self.apply(Command::SetLimits(limits))
    }
}

#[test]
fn finished_jobs_leave_after_their_retention_and_are_archived_on_the_way() {
    let mut c = Cluster::new();
    c.set_limits(|l| l.finished_retention_ms = 24 * HOUR);
    let done = c.submit("done");
    c.run_to_completion(&done, 0);
    let waiting = c.submit("waiting");

    // Not yet: a day has not passed.
    c.now += 23 * HOUR;
    assert!(c.store.prune_due(c.now).is_none());
    assert!(c.prune().is_empty());

    c.now += 2 * HOUR;
    assert_eq!(c.prune(), vec![done.clone()]);
    assert!(
        c.store.job(&done).is_none(),
        "gone from the replicated state"
    );
    assert_eq!(c.store.job(&waiting).unwrap().state, JobState::Pending);
    assert_eq!(c.store.job_table().count_in(JobState::Succeeded), 0);
    assert!(c.store.job_table().indexes_consistent());

    // A stale prune (the job is not finished, or not yet due) removes nothing.
    let before = c.store.clone();
    c.apply(Command::PruneHistory(gangway_core::state::Prune {
        jobs: vec![waiting.clone()],
        keys: vec!["no-such-key".into()],
    }));
    assert_eq!(c.store.jobs(), before.jobs());
}

#[test]
fn past_the_count_limit_the_oldest_finished_jobs_leave_first() {
    let mut c = Cluster::new();
    c.set_limits(|l| l.max_finished = 3);
    let jobs: Vec<JobId> = (0..5).map(|i| c.submit(&format!("j{i}"))).collect();
    for (i, j) in jobs.iter().enumerate() {
        c.run_to_completion(j, i as u16);
    }
    assert_eq!(c.prune(), jobs[..2].to_vec());
    assert_eq!(c.store.job_table().finished_count(), 3);
}

#[test]
fn a_retried_submit_inside_the_window_returns_its_job_and_after_it_creates_a_new_one() {
    let mut c = Cluster::new();
    c.set_limits(|l| l.idempotency_window_ms = HOUR);
    let Response::Submitted { job, existing } = c.submit_keyed("train", Some("k1")) else {
        panic!()
    };
    assert!(!existing);
    c.now += HOUR / 2;
    c.prune();
    assert_eq!(
        c.submit_keyed("train", Some("k1")),
        Response::Submitted {
            job: job.clone(),
            existing: true
        }
    );
    // After the window the key is forgotten (documented: a retry then creates a new job), even
    // though its job is still there.
    c.now += HOUR;
    c.prune();
    let Response::Submitted {
        job: again,
        existing,
    } = c.submit_keyed("train", Some("k1"))
    else {
        panic!()
    };
    assert!(!existing);
    assert_ne!(again, job);
    assert!(c.store.job(&job).is_some());
}

#[test]
fn a_full_queue_refuses_submissions_with_resource_exhausted_and_nothing_changes() {
    let mut c = Cluster::new();
    c.set_limits(|l| l.max_pending_per_queue = 2);
    let first = c.submit("a");
    c.submit("b");
    let before = c.store.jobs().clone();
    let r = c.submit_keyed("c", Some("kc"));
    let Response::Rejected(refusal) = &r else {
        panic!("{r:?}")
    };
    assert_eq!(refusal.code(), "resource_exhausted");
    assert!(refusal.to_string().contains("default"), "{refusal}");
    assert_eq!(c.store.jobs(), &before);
    // The key was not taken: the retry after room frees up creates the job.
    let other = c.apply(Command::SubmitJob(Submission {
        owner: String::new(),
        idempotency_key: None,
        spec: spec("x", "research"),
    }));
    assert!(
        matches!(other, Response::Submitted { .. }),
        "another queue has room"
    );
    c.run_to_completion(&first, 0);
    assert!(matches!(
        c.submit_keyed("c", Some("kc")),
        Response::Submitted {
            existing: false,
            ..
        }
    ));
}

#[test]
fn limits_that_make_no_sense_are_refused_whole() {
    let mut c = Cluster::new();
    let before = *c.store.limits();
    let r = c.set_limits(|l| {
        l.max_finished = 5;
        l.max_pending_per_queue = 0;
    });
    let Response::Rejected(refusal) = &r else {
        panic!("{r:?}")
    };
    assert_eq!(refusal.code(), "invalid_limits");
    assert!(
        refusal.to_string().contains("max_pending_per_queue"),
        "{refusal}"
    );
    assert_eq!(*c.store.limits(), before);
}

#[test]
fn one_prune_command_carries_at_most_a_batch() {
    let mut c = Cluster::new();
    c.set_limits(|l| l.idempotency_window_ms = 1);
    for i in 0..(PRUNE_BATCH + 5) {
        c.submit_keyed("k", Some(&format!("key-{i}")));
        // Keep the queue from filling: nothing here is placed.
    }
    c.now += 10;
    let Some(Command::PruneHistory(p)) = c.store.prune_due(c.now) else {
        panic!("due")
    };
    assert_eq!(p.keys.len(), PRUNE_BATCH);
}

#[test]
fn keys_of_an_older_snapshot_without_times_expire_by_their_jobs_submission() {
    let mut c = Cluster::new();
    c.set_limits(|l| l.idempotency_window_ms = HOUR);
    c.submit_keyed("old", Some("legacy"));
    let mut v: serde_json::Value = serde_json::from_slice(&c.store.to_snapshot().unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("idempotency_at");
    let mut old = ClusterStore::from_snapshot(&serde_json::to_vec(&v).unwrap()).unwrap();
    assert!(old.prune_due(c.now).is_none(), "inside its window");
    let later = c.now + 2 * HOUR;
    let Some(cmd) = old.prune_due(later) else {
        panic!("the undated key is due a window after its job's submission")
    };
    let mut events = Vec::new();
    old.apply(later, cmd, &mut events);
    let again = old.apply(
        later + 1,
        Command::SubmitJob(Submission {
            owner: String::new(),
            idempotency_key: Some("legacy".into()),
            spec: spec("old", "default"),
        }),
        &mut events,
    );
    assert!(
        matches!(
            again,
            Response::Submitted {
                existing: false,
                ..
            }
        ),
        "{again:?}"
    );
}

#[test]
fn a_plan_that_places_many_gangs_at_once_keeps_the_queue_in_order() {
    // 100 waiting jobs; one plan places 64 of them, every other one (the bulk re-file path).
    let mut c = Cluster::new();
    for h in 2..=8 {
        c.apply(Command::RegisterNode(node(&format!("h{h}"))));
    }
    let jobs: Vec<JobId> = (0..100).map(|i| c.submit(&format!("j{i}"))).collect();
    let placements: Vec<GangPlacement> = jobs
        .iter()
        .step_by(2)
        .take(50)
        .chain(jobs.iter().skip(99))
        .enumerate()
        .map(|(n, job)| common::one_device(job, &format!("h{}", n / 8 + 1), (n % 8) as u16))
        .collect();
    let r = c.apply(Command::ApplyPlan {
        plan: Plan {
            placements,
            ..Plan::default()
        },
    });
    assert!(
        matches!(r, Response::PlanApplied { ref placed, .. } if placed.len() == 51),
        "{r:?}"
    );
    assert!(c.store.job_table().indexes_consistent());
    let (queue, reasons) = c.store.job_table().queue();
    let waiting: Vec<&JobId> = queue.iter().map(|g| &g.id).collect();
    let want: Vec<&JobId> = jobs.iter().skip(1).step_by(2).take(49).collect();
    assert_eq!(waiting, want, "the rest, still in submission order");
    assert_eq!(reasons.len(), waiting.len());
}

#[derive(Clone, Debug)]
enum Step {
    Submit(bool),
    Run(u8),
    Wait(u8),
    Prune,
    Snapshot,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        any::<bool>().prop_map(Step::Submit),
        (0u8..8).prop_map(Step::Run),
        (1u8..30).prop_map(Step::Wait),
        Just(Step::Prune),
        Just(Step::Snapshot),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// A replica that replays the whole log and one that installed a snapshot midway and replayed
    /// the rest end equal to the leader's state, indexes included (the tables compare every
    /// index); the indexes always match the records; and the allocations read through the
    /// leases-by-node index equal a scan of every job.
    #[test]
    fn replay_and_snapshot_install_give_equal_indexes(steps in prop::collection::vec(step(), 1..80)) {
        let mut c = Cluster::new();
        c.set_limits(|l| {
            l.finished_retention_ms = 5 * HOUR;
            l.max_finished = 6;
            l.idempotency_window_ms = 3 * HOUR;
        });
        let mut snapshot: Option<(Vec<u8>, usize)> = None;
        let mut n = 0;
        for s in steps {
            match s {
                Step::Submit(keyed) => {
                    n += 1;
                    c.apply(Command::SubmitJob(Submission {
                        owner: String::new(),
                        idempotency_key: keyed.then(|| format!("key-{}", n % 7)),
                        spec: spec(&format!("j{n}"), if n % 2 == 0 { "a" } else { "b" }),
                    }));
                }
                Step::Run(d) => {
                    let job = c.store.job_table().pending().next().map(|j| j.id.clone());
                    let free = c.store.engine().hosts()[0].free_milli[usize::from(d)] == 1000;
                    if let (Some(job), true) = (job, free) {
                        c.run_to_completion(&job, u16::from(d));
                    }
                }
                Step::Wait(h) => c.now += u64::from(h) * HOUR / 4,
                Step::Prune => {
                    if let Some(cmd) = c.store.prune_due(c.now) {
                        c.apply(cmd);
                    }
                }
                Step::Snapshot => {
                    snapshot = Some((c.store.to_snapshot().unwrap(), c.log.len()));
                }
            }
            prop_assert!(c.store.job_table().indexes_consistent());
            let by_index = c.store.allocations_for(&HostName::new("h1"));
            let scanned = c.store.jobs().values().filter(|j| j.lease.is_some()).count();
            prop_assert_eq!(by_index.len(), scanned);
        }
        let mut events = Vec::new();
        let mut replayed = ClusterStore::new();
        for (at, cmd) in &c.log {
            replayed.apply(*at, cmd.clone(), &mut events);
        }
        prop_assert!(replayed == c.store, "log replay differs");
        if let Some((bytes, from)) = snapshot {
            let mut installed = ClusterStore::from_snapshot(&bytes).unwrap();
            for (at, cmd) in &c.log[from..] {
                installed.apply(*at, cmd.clone(), &mut events);
            }
            prop_assert!(installed == c.store, "snapshot install + replay differs");
        }
    }
}
