//! Many changes in one command, as stories. Jobs (`SubmitJobs`: a batch of specs or a job array)
//! are created in order, as one job at a time would create them; a batch that cannot be taken
//! whole (a bad spec, a queue without room for all of it) leaves nothing behind; idempotency keys
//! hold across batches and inside one. A host's task reports (`TaskStatuses`) are each applied as
//! alone, with their own outcomes.

use gangway_core::engine::Plan;
use gangway_core::state::{
    Command, Event, Limits, Rejection, Response, Submission, SubmittedJob, TaskReport, TaskState,
    MAX_BATCH_JOBS, MAX_BATCH_REPORTS,
};
use gangway_proto::ids::JobId;
use gangway_proto::spec::JobSpec;
use proptest::prelude::*;

fn spec(name: &str, queue: &str) -> JobSpec {
    JobSpec::from_toml_str(&format!(
        "name = \"{name}\"\nqueue = \"{queue}\"\ncommand = [\"true\"]\n[resources]\ndevices = 1\n"
    ))
    .expect("valid spec")
}

fn job(name: &str, queue: &str, key: Option<&str>) -> Submission {
    Submission {
        idempotency_key: key.map(str::to_owned),
        spec: spec(name, queue),
        owner: "client/alice".into(),
    }
}

mod common;
use common::Cluster;

impl Cluster {
    fn batch(&mut self, jobs: Vec<Submission>) -> Result<Vec<SubmittedJob>, Rejection> {
        match self.apply(Command::SubmitJobs(jobs)) {
            Response::SubmittedJobs(jobs) => Ok(jobs),
            Response::Rejected(r) => Err(r),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn pending_cap(&mut self, cap: usize) {
        let mut limits: Limits = *self.store.limits();
        limits.max_pending_per_queue = cap;
        assert_eq!(self.apply(Command::SetLimits(limits)), Response::Done);
    }
}

#[test]
fn a_batch_creates_its_jobs_in_order_with_their_owner() {
    let mut c = Cluster::new();
    let jobs = c
        .batch(vec![
            job("a", "default", None),
            job("b", "research", None),
            job("c", "default", None),
        ])
        .expect("accepted");
    let ids: Vec<String> = jobs.iter().map(|j| j.job.to_string()).collect();
    assert_eq!(ids, ["a-1", "b-2", "c-3"]);
    assert!(jobs.iter().all(|j| !j.existing));
    for j in &jobs {
        assert_eq!(c.store.job(&j.job).expect("created").owner, "client/alice");
    }
    assert!(c.events.contains(&Event::SchedulingNeeded));
}

#[test]
fn a_bad_spec_anywhere_refuses_the_whole_batch_naming_its_index() {
    let mut c = Cluster::new();
    let mut bad = job("b", "default", Some("kb"));
    bad.spec.tasks = 0;
    let refusal = c
        .batch(vec![job("a", "default", Some("ka")), bad])
        .expect_err("refused");
    assert_eq!(refusal.code(), "invalid_job");
    assert!(refusal.to_string().contains("jobs[1]"), "{refusal}");
    assert!(c.store.jobs().is_empty(), "nothing half-applied");
    // No key was taken and no id spent: the corrected batch starts at 1.
    let jobs = c
        .batch(vec![job("a", "default", Some("ka"))])
        .expect("accepted");
    assert_eq!(jobs[0].job.to_string(), "a-1");
    assert!(!jobs[0].existing);
}

#[test]
fn a_queue_without_room_for_all_of_a_batch_takes_none_of_it() {
    let mut c = Cluster::new();
    c.pending_cap(4);
    c.batch(vec![job("a", "default", None), job("b", "default", None)])
        .expect("two fit");
    let refusal = c
        .batch(vec![
            job("r", "research", None),
            job("c", "default", None),
            job("d", "default", None),
            job("e", "default", None),
        ])
        .expect_err("three more do not fit under 4");
    assert_eq!(refusal.code(), "resource_exhausted");
    let text = refusal.to_string();
    assert!(
        text.contains("queue default has 2 pending jobs and this submission adds 3"),
        "{text}"
    );
    assert_eq!(
        c.store.jobs().len(),
        2,
        "the research job was not created either"
    );
    c.batch(vec![job("c", "default", None), job("d", "default", None)])
        .expect("two more fit exactly");
}

#[test]
fn keys_hold_across_batches_and_inside_one() {
    let mut c = Cluster::new();
    c.pending_cap(2);
    let first = c
        .batch(vec![
            job("a", "default", Some("k/0")),
            job("a", "default", Some("k/1")),
        ])
        .expect("accepted");
    // The resend of the same batch finds both (and needs no room in the full queue).
    let again = c
        .batch(vec![
            job("a", "default", Some("k/0")),
            job("a", "default", Some("k/1")),
        ])
        .expect("a resend is answered, not refused");
    assert_eq!(
        again
            .iter()
            .map(|j| (&j.job, j.existing))
            .collect::<Vec<_>>(),
        first.iter().map(|j| (&j.job, true)).collect::<Vec<_>>()
    );
    // One key twice in a batch is one job, counted once against the queue.
    let mut c = Cluster::new();
    c.pending_cap(1);
    let jobs = c
        .batch(vec![
            job("x", "default", Some("dup")),
            job("x", "default", Some("dup")),
        ])
        .expect("one job");
    assert_eq!(jobs[0].job, jobs[1].job);
    assert_eq!((jobs[0].existing, jobs[1].existing), (false, true));
    assert_eq!(c.store.jobs().len(), 1);
}

#[test]
fn an_empty_or_oversized_batch_is_refused() {
    let mut c = Cluster::new();
    assert_eq!(c.batch(vec![]).unwrap_err().code(), "invalid_job");
    let many = (0..=MAX_BATCH_JOBS)
        .map(|i| job(&format!("j{i}"), "default", None))
        .collect();
    let refusal = c.batch(many).unwrap_err();
    assert!(refusal.to_string().contains("1..=1000"), "{refusal}");
    assert!(c.store.jobs().is_empty());
}

#[test]
fn an_audited_batch_is_one_entry_naming_its_jobs() {
    let mut c = Cluster::new();
    let r = c.apply(Command::Audited {
        actor: "client/alice".into(),
        command: Box::new(Command::SubmitJobs(vec![
            job("a", "default", None),
            job("b", "default", None),
            job("c", "default", None),
        ])),
    });
    assert!(
        matches!(r, Response::SubmittedJobs(ref j) if j.len() == 3),
        "{r:?}"
    );
    let entries: Vec<_> = c.store.audit().newest_first().collect();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].action, "submit_jobs");
    assert_eq!(entries[0].target, "3 jobs: a-1 .. c-3");
}

impl Cluster {
    /// A node h1 with 8 devices and `n` one-device jobs placed on it, device i for job i.
    fn running(n: usize) -> (Self, Vec<(JobId, u64)>) {
        let mut c = Cluster::new();
        c.apply(Command::RegisterNode(common::node("h1", "r1", 8)));
        let jobs = c
            .batch(
                (0..n)
                    .map(|i| job(&format!("t{i}"), "default", None))
                    .collect(),
            )
            .expect("submitted");
        let placements = jobs
            .iter()
            .enumerate()
            .map(|(i, j)| common::one_device(&j.job, "h1", i as u16))
            .collect();
        let r = c.apply(Command::ApplyPlan {
            plan: Plan {
                placements,
                ..Plan::default()
            },
        });
        assert!(
            matches!(r, Response::PlanApplied { ref placed, .. } if placed.len() == n),
            "{r:?}"
        );
        let leased = jobs
            .into_iter()
            .map(|j| {
                let epoch = c.store.job(&j.job).unwrap().lease.as_ref().unwrap().epoch;
                (j.job, epoch)
            })
            .collect();
        (c, leased)
    }
}

fn report(job: &JobId, epoch: u64, state: TaskState) -> TaskReport {
    TaskReport {
        job: job.clone(),
        task: 0,
        epoch,
        state,
        exit_code: (state == TaskState::Succeeded).then_some(0),
        message: String::new(),
    }
}

#[test]
fn a_hosts_reports_in_one_command_are_each_judged_as_alone() {
    let (mut batched, jobs) = Cluster::running(3);
    let (mut single, _) = Cluster::running(3);
    let reports = vec![
        report(&jobs[0].0, jobs[0].1, TaskState::Running),
        report(&jobs[0].0, jobs[0].1, TaskState::Succeeded),
        // A stale epoch: refused, and the others still count.
        report(&jobs[1].0, jobs[1].1 - 1, TaskState::Failed),
        report(&jobs[2].0, jobs[2].1, TaskState::Succeeded),
    ];
    let each = match batched.apply(Command::TaskStatuses(reports.clone())) {
        Response::Each(each) => each,
        other => panic!("{other:?}"),
    };
    let alone: Vec<Response> = reports
        .into_iter()
        .map(|r| {
            single.now = batched.now - 10;
            single.apply(Command::TaskStatus(r))
        })
        .collect();
    assert_eq!(each, alone, "the same outcome per report");
    assert!(matches!(each[2], Response::Rejected(_)), "{:?}", each[2]);
    assert_eq!(batched.store.jobs(), single.store.jobs());
    let state = |c: &Cluster, j: &JobId| c.store.job(j).unwrap().state;
    assert_eq!(
        state(&batched, &jobs[0].0),
        gangway_core::state::JobState::Succeeded
    );
    assert_eq!(
        state(&batched, &jobs[1].0),
        gangway_core::state::JobState::Running
    );
    assert_eq!(
        state(&batched, &jobs[2].0),
        gangway_core::state::JobState::Succeeded
    );

    let too_many = vec![report(&jobs[1].0, jobs[1].1, TaskState::Running); MAX_BATCH_REPORTS + 1];
    let r = batched.apply(Command::TaskStatuses(too_many));
    assert!(matches!(r, Response::Rejected(_)), "{r:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A batch the state accepts leaves the state one job at a time would: same ids, same
    /// records, same keys (the log entry is one, the outcome is the same).
    #[test]
    fn an_accepted_batch_equals_its_jobs_one_by_one(
        jobs in prop::collection::vec((0u8..3, prop::option::of(0u8..4)), 1..20),
        cap in 1usize..25,
    ) {
        let subs: Vec<Submission> = jobs
            .iter()
            .map(|(q, k)| {
                let queue = ["default", "research", "infer"][*q as usize];
                let key = k.map(|k| format!("key-{k}"));
                job("j", queue, key.as_deref())
            })
            .collect();
        let mut batched = Cluster::new();
        batched.pending_cap(cap);
        let mut single = Cluster::new();
        single.pending_cap(cap);
        let one_by_one: Vec<Response> = subs
            .iter()
            .map(|s| {
                // The batch's jobs share one log time.
                single.now = batched.now;
                single.store.apply(single.now + 10, Command::SubmitJob(s.clone()), &mut single.events)
            })
            .collect();
        match batched.batch(subs) {
            Ok(jobs) => {
                let expected: Vec<_> = one_by_one
                    .iter()
                    .map(|r| match r {
                        Response::Submitted { job, existing } => (job.clone(), *existing),
                        other => panic!("one by one refused what the batch took: {other:?}"),
                    })
                    .collect();
                let got: Vec<_> = jobs.into_iter().map(|j| (j.job, j.existing)).collect();
                prop_assert_eq!(got, expected);
                prop_assert_eq!(batched.store.jobs(), single.store.jobs());
            }
            Err(refusal) => {
                prop_assert_eq!(refusal.code(), "resource_exhausted");
                prop_assert!(batched.store.jobs().is_empty());
                prop_assert!(
                    one_by_one.iter().any(|r| matches!(r, Response::Rejected(_))),
                    "the batch was refused though every job fits"
                );
            }
        }
    }
}
