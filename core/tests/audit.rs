//! The audit trail in the replicated state: what a person's commands and the replicas' notes
//! record (actor, action, target, outcome, the entry's time), that it is bounded, kept across a
//! restore, and the same on every replica.

use gangway_core::engine::NodeState;
use gangway_core::state::access::{AccessChange, Grant, Role};
use gangway_core::state::{
    AuditEntry, AuditNote, ClusterStore, Command, Event, Limits, NodeStateChange, Response,
    Submission,
};
use gangway_proto::ids::{HostName, JobId};
use gangway_proto::spec::JobSpec;

mod common;
use common::node;

fn spec(name: &str) -> JobSpec {
    JobSpec::from_toml_str(&format!(
        "name = \"{name}\"\ncommand = [\"true\"]\n[resources]\ndevices = 1\n"
    ))
    .unwrap()
}

fn as_person(actor: &str, command: Command) -> Command {
    Command::Audited {
        actor: actor.into(),
        command: Box::new(command),
    }
}

fn submit(owner: &str, name: &str) -> Command {
    as_person(
        owner,
        Command::SubmitJob(Submission {
            idempotency_key: None,
            spec: spec(name),
            owner: owner.into(),
        }),
    )
}

/// Applies `log` to a fresh store, entry `i` at time `1_000 + 10 i`.
fn replay(log: &[Command]) -> (ClusterStore, Vec<Response>) {
    let mut store = ClusterStore::new();
    let mut events: Vec<Event> = Vec::new();
    let responses = log
        .iter()
        .enumerate()
        .map(|(i, c)| store.apply(1_000 + 10 * i as u64, c.clone(), &mut events))
        .collect();
    (store, responses)
}

fn entry(at_ms: u64, actor: &str, action: &str, target: &str, outcome: &str) -> AuditEntry {
    AuditEntry {
        at_ms,
        actor: actor.into(),
        action: action.into(),
        target: target.into(),
        outcome: outcome.into(),
    }
}

/// Each audited command, what its entry says, in order; the machine's own commands and worker
/// reports leave no entry.
#[test]
fn a_persons_commands_are_recorded_with_actor_target_and_outcome() {
    let log = vec![
        // The machinery: not audited.
        Command::RegisterNode(node("h1", "r1", 8)),
        submit("client/alice", "train"),
        as_person(
            "client/bob",
            Command::CancelJob {
                job: JobId::new("no-such-job"),
                reason: "mine?".into(),
            },
        ),
        as_person(
            "token/ci",
            Command::SetNodeState(NodeStateChange {
                node: HostName::new("h1"),
                state: NodeState::Draining,
                reason: "maintenance".into(),
                grace_ms: None,
            }),
        ),
        as_person(
            "client/admin",
            Command::SetAccess(AccessChange::Principal {
                principal: "client/bob".into(),
                grant: Grant::of([Role::Viewer]),
            }),
        ),
        as_person(
            "client/admin",
            Command::SetLimits(Limits {
                max_pending_per_queue: 0,
                ..Limits::default()
            }),
        ),
        Command::AuditNote(AuditNote {
            actor: "client/admin".into(),
            action: "add_member".into(),
            target: "replica 4 at 10.0.0.4:7101".into(),
            outcome: "ok".into(),
        }),
        Command::NodeDown {
            node: HostName::new("h1"),
            reason: "silent".into(),
        },
    ];
    let (store, responses) = replay(&log);
    let Response::Submitted { job, .. } = &responses[1] else {
        panic!("{:?}", responses[1]);
    };
    assert!(
        matches!(responses[2], Response::Rejected(_)),
        "the wrapper passes the inner command's refusal on"
    );
    let newest_first: Vec<AuditEntry> = store.audit().newest_first().cloned().collect();
    let want = vec![
        entry(
            1_060,
            "client/admin",
            "add_member",
            "replica 4 at 10.0.0.4:7101",
            "ok",
        ),
        entry(
            1_050,
            "client/admin",
            "set_limits",
            "limits",
            "invalid_limits",
        ),
        entry(1_040, "client/admin", "set_access", "client/bob", "ok"),
        entry(1_030, "token/ci", "drain_node", "h1", "ok"),
        entry(
            1_020,
            "client/bob",
            "cancel_job",
            "no-such-job",
            "unknown_job",
        ),
        entry(1_010, "client/alice", "submit_job", job.as_str(), "ok"),
    ];
    assert_eq!(newest_first, want);
    // The inner commands took effect as they would alone.
    assert_eq!(store.job(job).unwrap().owner, "client/alice");
    assert_eq!(
        store.access().grant_of("client/bob"),
        Grant::of([Role::Viewer])
    );
}

/// At most `max_audit_entries` stay, the oldest leaving first; lowering the limit trims at once;
/// two replicas applying the same log keep the same entries, and a snapshot keeps them too.
#[test]
fn the_trail_is_bounded_deterministic_and_in_snapshots() {
    let mut log = vec![as_person(
        "client/admin",
        Command::SetLimits(Limits {
            max_audit_entries: 50,
            ..Limits::default()
        }),
    )];
    for i in 0..120 {
        log.push(submit(&format!("client/u{}", i % 7), &format!("j{i}")));
    }
    let (a, _) = replay(&log);
    let (b, _) = replay(&log);
    assert_eq!(a.audit(), b.audit());
    assert_eq!(a, b);
    assert_eq!(a.audit().len(), 50);
    let newest = a.audit().newest_first().next().unwrap();
    assert_eq!(
        (newest.at_ms, newest.actor.as_str()),
        (1_000 + 10 * 120, "client/u0")
    );
    let oldest = a.audit().newest_first().last().unwrap();
    assert_eq!(oldest.at_ms, 1_000 + 10 * 71, "the 70 oldest left first");

    // Lowering the limit trims at once; the limit is checked whole.
    let mut lower = log.clone();
    lower.push(as_person(
        "client/admin",
        Command::SetLimits(Limits {
            max_audit_entries: 10,
            ..Limits::default()
        }),
    ));
    lower.push(as_person(
        "client/admin",
        Command::SetLimits(Limits {
            max_audit_entries: 0,
            ..Limits::default()
        }),
    ));
    let (c, responses) = replay(&lower);
    assert_eq!(c.audit().len(), 10);
    let last = c.audit().newest_first().next().unwrap();
    assert_eq!(last.outcome, "invalid_limits");
    assert!(matches!(responses.last(), Some(Response::Rejected(_))));

    // Snapshots (the JSON one of the tests and bincode of the Raft snapshots) keep the trail.
    let back = ClusterStore::from_snapshot(&a.to_snapshot().unwrap()).unwrap();
    assert_eq!(back.audit(), a.audit());
}

/// Over-long fields are cut at a character boundary: an entry never grows the state unbounded.
#[test]
fn long_fields_are_cut() {
    let long = "é".repeat(1_000);
    let (store, _) = replay(&[Command::AuditNote(AuditNote {
        actor: long.clone(),
        action: "drill".into(),
        target: long.clone(),
        outcome: "ok".into(),
    })]);
    let e = store.audit().newest_first().next().unwrap();
    assert!(e.actor.len() <= gangway_core::state::audit::MAX_AUDIT_FIELD);
    assert!(e.actor.len() >= gangway_core::state::audit::MAX_AUDIT_FIELD - 1);
    assert!(e.target.chars().all(|c| c == 'é'));
}

/// A restore keeps the backup's trail, then what the new cluster recorded before it, then the
/// restore itself.
#[test]
fn a_restore_keeps_both_trails_and_records_itself() {
    let (backup, _) = replay(&[submit("client/alice", "old")]);
    let mut new = ClusterStore::new();
    let mut events = Vec::new();
    new.apply(
        5_000,
        as_person(
            "client/admin",
            Command::SetAccess(AccessChange::Principal {
                principal: "client/ops".into(),
                grant: Grant::of([Role::Operator]),
            }),
        ),
        &mut events,
    );
    let response = new.apply(
        6_000,
        as_person(
            "client/admin",
            Command::Restore {
                state: Box::new(backup),
                backup_revision: 7,
            },
        ),
        &mut events,
    );
    assert_eq!(response, Response::Done);
    let trail: Vec<(u64, &str, &str)> = new
        .audit()
        .newest_first()
        .map(|e| (e.at_ms, e.actor.as_str(), e.action.as_str()))
        .collect();
    assert_eq!(
        trail,
        vec![
            (6_000, "client/admin", "restore"),
            (5_000, "client/admin", "set_access"),
            (1_000, "client/alice", "submit_job"),
        ]
    );
    let restore = new.audit().newest_first().next().unwrap();
    assert_eq!(restore.target, "backup of revision 7");
}
