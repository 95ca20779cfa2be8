//! Secret environment values in the replicated state: kept by the binary encodings every replica
//! writes (the Raft log and snapshots), handed to the allocations of the leased host, and absent
//! from every human-readable form (a backup, a `Debug` line). A job restored from a backup has
//! lost them, so it is cancelled with the reason instead of running without them.

use gangway_core::engine::{DeviceShare, GangPlacement, Plan, TaskPlacement};
use gangway_core::state::{ClusterStore, Command, Event, JobState, Response, Submission};
use gangway_proto::ids::{HostName, JobId};
use gangway_proto::spec::JobSpec;

mod common;
use common::node;

const SECRET: &str = "hf_9f8e7d6c5b4a";

fn submit(store: &mut ClusterStore, now: u64, name: &str) -> JobId {
    let spec = JobSpec::from_toml_str(&format!(
        "name = \"{name}\"\ncommand = [\"python3\", \"train.py\"]\n[env]\nLR = \"0.1\"\n\
         [secret_env]\nHF_TOKEN = \"{SECRET}\"\n[resources]\ndevices = 1\n"
    ))
    .unwrap();
    let command = Command::SubmitJob(Submission {
        idempotency_key: None,
        spec,
        owner: "client/alice".into(),
    });
    match store.apply(now, command, &mut Vec::new()) {
        Response::Submitted { job, .. } => job,
        other => panic!("{other:?}"),
    }
}

fn place(store: &mut ClusterStore, now: u64, job: &JobId, host: &str) {
    let plan = Plan {
        placements: vec![GangPlacement {
            job: job.clone(),
            queue: "default".into(),
            tasks: vec![TaskPlacement {
                host: HostName::new(host),
                devices: vec![DeviceShare {
                    index: 0,
                    milli: 1000,
                }],
                cpu_milli: 0,
                memory_mib: 0,
            }],
            borrowed_milli: 0,
        }],
        ..Plan::default()
    };
    let r = store.apply(now, Command::ApplyPlan { plan }, &mut Vec::new());
    assert!(
        matches!(r, Response::PlanApplied { ref placed, .. } if placed.len() == 1),
        "{r:?}"
    );
}

#[test]
fn a_secret_reaches_the_leased_hosts_allocation_and_no_human_readable_form() {
    let mut store = ClusterStore::new();
    let mut events: Vec<Event> = Vec::new();
    store.apply(
        1_000,
        Command::RegisterNode(node("h1", "r1", 2)),
        &mut events,
    );
    let job = submit(&mut store, 1_010, "train");
    place(&mut store, 1_020, &job, "h1");

    // The leased host's allocation carries the value, apart from the plain environment.
    let allocs = store.allocations_for(&HostName::new("h1"));
    assert_eq!(allocs.len(), 1);
    assert_eq!(allocs[0].secret_env["HF_TOKEN"].expose(), Some(SECRET));
    assert_eq!(allocs[0].env["LR"], "0.1");
    assert!(!allocs[0].env.contains_key("HF_TOKEN"));

    // Debug of the allocation, the job and the whole state names the variable, never its value.
    for text in [
        format!("{allocs:?}"),
        format!("{:?}", store.job(&job).unwrap()),
        format!("{store:?}"),
    ] {
        assert!(text.contains("HF_TOKEN"), "the name is shown");
        assert!(!text.contains(SECRET), "{text}");
    }

    // JSON (a backup's encoding) holds no value; bincode (the Raft log's and snapshots') does.
    let json = String::from_utf8(store.to_snapshot().unwrap()).unwrap();
    assert!(json.contains("HF_TOKEN") && !json.contains(SECRET));
    let binary = bincode::serialize(&store).unwrap();
    assert!(binary.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()));
    let replica: ClusterStore = bincode::deserialize(&binary).unwrap();
    assert_eq!(
        replica, store,
        "a Raft snapshot restores the secret with the rest"
    );
}

/// A backup restores jobs without their secrets: each unfinished job that had some is cancelled
/// with the reason (a running one loses its lease like the others), one without secrets waits to
/// run again, and a finished one is kept as it was.
#[test]
fn a_restored_job_whose_secrets_are_gone_is_cancelled_saying_why() {
    let mut old = ClusterStore::new();
    let mut events: Vec<Event> = Vec::new();
    old.apply(
        1_000,
        Command::RegisterNode(node("h1", "r1", 2)),
        &mut events,
    );
    let running = submit(&mut old, 1_010, "running");
    let waiting = submit(&mut old, 1_020, "waiting");
    let plain_spec = JobSpec::from_toml_str(
        "name = \"plain\"\ncommand = [\"true\"]\n[resources]\ndevices = 1\n",
    )
    .unwrap();
    let plain = match old.apply(
        1_030,
        Command::SubmitJob(Submission {
            idempotency_key: None,
            spec: plain_spec,
            owner: String::new(),
        }),
        &mut events,
    ) {
        Response::Submitted { job, .. } => job,
        other => panic!("{other:?}"),
    };
    place(&mut old, 1_040, &running, "h1");

    // What `cluster snapshot save` writes and `restore` reads back.
    let backup = ClusterStore::from_snapshot(&old.to_snapshot().unwrap()).unwrap();
    let token = &backup.job(&running).unwrap().spec.secret_env["HF_TOKEN"];
    assert!(token.is_withheld());

    let mut new = ClusterStore::new();
    let r = new.apply(
        9_000,
        Command::Restore {
            state: Box::new(backup),
            backup_revision: 10,
        },
        &mut events,
    );
    assert_eq!(r, Response::Done);
    for job in [&running, &waiting] {
        let j = new.job(job).unwrap();
        assert_eq!(j.state, JobState::Cancelled, "{job}");
        let last = &j.history.last().unwrap().what;
        assert!(last.contains("no secret values"), "{last}");
        assert!(j.lease.is_none());
    }
    assert_eq!(new.job(&plain).unwrap().state, JobState::Pending);
    assert!(new.allocations_for(&HostName::new("h1")).is_empty());
    assert_eq!(new.job_table().pending().count(), 1);
}
