//! The replica's fuzz targets: every decoder a replica runs on bytes it did not make (see
//! `gangway_proto::fuzz` for how they run in `make test` and `make fuzz`).
//!
//! - [`client_request`]: a client API request (protobuf), then the checks and conversions its
//!   handler runs (`server::requests`, `access_api`, `audit_api`, `drill::plan`); an accepted
//!   write is applied, as a person's audited command, to a small cluster.
//! - [`worker_request`]: a worker API request, then its handler's conversions; an accepted report
//!   is applied too. Also the allocation set an agent decodes.
//! - [`log_entry`]: a Raft log entry's command (bincode), applied.
//! - [`snapshot`]: a Raft snapshot (`InstallSnapshot`'s body, the file on disk), raw and behind a
//!   forged header and checksum so the state decoder itself is reached.
//! - [`backup`]: a `RestoreSnapshot` backup (JSON), restored into an empty cluster.
//!
//! Whatever decodes is then used as a restarted replica would use it: read for a scheduling round,
//! the allocation sets, the listings, a round run and its plan applied, a snapshot written and read
//! back. None of that may panic.

use crate::engine::{self, SchedulerConfig};
use crate::server::fsm::{decode_snapshot, encode_snapshot, SchedulerFsm};
use crate::server::{access_api, audit_api, convert, drill, requests, worker_api};
use crate::state::{ClusterStore, Command, Limits, Submission};
use gangway_proto::pb;
use gangway_proto::spec::JobSpec;
use prost::Message;
use std::sync::OnceLock;

/// Log time of the fixture and of everything applied to it.
const NOW_MS: u64 = 1_700_000_000_000;

/// Three 8-GPU hosts in two racks, a queue, and jobs placed, pending and finished.
fn fixture() -> &'static ClusterStore {
    static FIXTURE: OnceLock<ClusterStore> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let mut store = ClusterStore::new();
        let mut events = Vec::new();
        for (name, rack) in [("h1", "r1"), ("h2", "r1"), ("h3", "r2")] {
            let reg = worker_api::registration_from_pb(register(name, rack))
                .expect("the fixture's hosts are valid");
            store.apply(NOW_MS, Command::RegisterNode(reg), &mut events);
        }
        let queue = requests::queue_config(pb::QueueInfo {
            name: "research".into(),
            guaranteed_milli: 8_000,
            may_borrow: true,
            ..Default::default()
        })
        .expect("the fixture's queue is valid");
        store.apply(NOW_MS, Command::SetQueue(queue), &mut events);
        for (i, text) in SPECS.iter().enumerate() {
            let spec = JobSpec::from_toml_str(text).expect("the fixture's specs are valid");
            let submission = Submission {
                idempotency_key: Some(format!("k{i}")),
                spec,
                owner: "client/alice".into(),
            };
            store.apply(NOW_MS, Command::SubmitJob(submission), &mut events);
        }
        round(&mut store);
        store
    })
}

const SPECS: [&str; 3] = [
    "name = \"train\"\nqueue = \"research\"\ntasks = 2\ncommand = [\"python3\", \"train.py\"]\n[secret_env]\nTOKEN = \"t0k3n\"\n[resources]\ndevices = 8\n[checkpoint]\nsignal = \"SIGUSR1\"\ntimeout = \"10s\"\n",
    "name = \"small\"\ncommand = [\"true\"]\n[resources]\ndevices = 0.5\n",
    "name = \"huge\"\ntasks = 8\ncommand = [\"true\"]\n[resources]\ndevices = 8\n",
];

fn register(name: &str, rack: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        node: name.into(),
        address: format!("{name}:7300"),
        datacenter: "dc1".into(),
        zone: "z1".into(),
        pod: "p1".into(),
        rack: rack.into(),
        cpu_milli: 64_000,
        memory_mib: 512 * 1024,
        devices: (0..8)
            .map(|i| pb::Device {
                uuid: format!("GPU-{name}-{i}"),
                model: "H100".into(),
                kind: "gpu".into(),
                memory_mib: 81_920,
                nvlink_domain: 0,
            })
            .collect(),
    }
}

/// One scheduling round as the leader runs it, its plan applied.
fn round(store: &mut ClusterStore) {
    let config = store.scheduler_config(&SchedulerConfig::default());
    let read = store.round_input(true);
    let outcome = engine::run_round(engine::RoundInput {
        view: store.engine(),
        pending: &read.pending,
        reasons: read.reasons,
        config: &config,
        state: &read.state,
        defrag: None,
        now_ms: NOW_MS,
    });
    store.apply(
        NOW_MS + 1,
        Command::ApplyPlan { plan: outcome.plan },
        &mut Vec::new(),
    );
}

/// Reads `store` every way a replica does after a start or a write.
fn exercise(store: &ClusterStore) {
    let _ = store.round_input(true);
    for name in store.nodes().keys().take(64) {
        let set = convert::allocation_set(store, 0, name);
        let _ = gangway_proto::allocation::digest(&set);
        let _ = worker_api::deliverable(name, set);
    }
    for record in store.nodes().values().take(64) {
        let _ = convert::node_info(store, record, 0);
    }
    for job in store.jobs().values().take(64) {
        let _ = convert::job_detail(job);
        let _ = convert::lease_info(job);
    }
    let _ = convert::queues(store);
    let _ = store.overdue_migrations(NOW_MS);
    let _ = store.overdue_drains(NOW_MS);
    let _ = store.prune_due(NOW_MS);
    let _ = audit_api::AuditQuery {
        limit: 10,
        actor: None,
    }
    .answer(store.audit());
}

/// Applies `command` to a copy of the fixture, runs a round on the result and reads it.
fn apply_to_fixture(command: Command) {
    let mut store = fixture().clone();
    store.apply(NOW_MS + 10, command, &mut Vec::new());
    exercise(&store);
    round(&mut store);
    exercise(&store);
}

/// A person's write, as the handler commits it.
fn apply_as_person(command: Command) {
    apply_to_fixture(Command::Audited {
        actor: "client/fuzz".into(),
        command: Box::new(command),
    });
}

/// The client API's requests: the first byte picks the method, the rest is its message.
pub fn client_request(data: &[u8]) {
    let Some((&method, body)) = data.split_first() else {
        return;
    };
    match method % 17 {
        0 => {
            let Ok(req) = pb::SubmitJobRequest::decode(body) else {
                return;
            };
            if let Ok((spec, idempotency_key)) = requests::submission(&req) {
                apply_as_person(Command::SubmitJob(Submission {
                    idempotency_key,
                    spec,
                    owner: "client/fuzz".into(),
                }));
            }
        }
        1 => {
            if let Ok(Ok((job, reason))) = pb::CancelJobRequest::decode(body).map(requests::cancel)
            {
                apply_as_person(Command::CancelJob { job, reason });
            }
        }
        2 => {
            let change = pb::SetNodeStateRequest::decode(body).map(requests::node_state_change);
            if let Ok(Ok(change)) = change {
                apply_as_person(Command::SetNodeState(change));
            }
        }
        3 => {
            if let Ok(Ok(change)) =
                pb::SetDeviceFenceRequest::decode(body).map(requests::fence_change)
            {
                apply_as_person(Command::FenceDevice(change));
            }
        }
        4 => {
            if let Ok(Ok((node, reason))) =
                pb::RemoveNodeRequest::decode(body).map(requests::node_removal)
            {
                apply_as_person(Command::RemoveNode { node, reason });
            }
        }
        5 => {
            if let Ok(Ok(queue)) = pb::QueueInfo::decode(body).map(requests::queue_config) {
                apply_as_person(Command::SetQueue(queue));
            }
        }
        6 => {
            if let Ok(req) = pb::Limits::decode(body) {
                let limits = requests::limits(&req, Limits::default());
                let _ = requests::limits_to_pb(&limits);
                apply_as_person(Command::SetLimits(limits));
            }
        }
        7 => {
            if let Ok(Ok((job, hosts))) =
                pb::MigrateJobRequest::decode(body).map(requests::migration)
            {
                apply_as_person(Command::MigrateJob { job, hosts });
            }
        }
        8 => {
            if let Ok(req) = pb::ListJobsRequest::decode(body) {
                let _ = requests::job_filter(&req);
            }
        }
        9 => {
            if let Ok(req) = pb::PageRequest::decode(body) {
                let _ = requests::page_size(req.page_size);
            }
        }
        10 => {
            if let Ok(Ok(change)) =
                pb::SetAccessRequest::decode(body).map(access_api::change_from_pb)
            {
                apply_as_person(Command::SetAccess(change));
            }
        }
        11 => {
            if let Ok(req) = pb::ListAuditRequest::decode(body) {
                if let Ok(query) = audit_api::AuditQuery::from_pb(&req) {
                    let _ = query.answer(fixture().audit());
                }
            }
        }
        12 => {
            if let Ok(req) = pb::DrillRequest::decode(body) {
                let _ = drill::plan(&req, 2, &[1, 2, 3].into());
            }
        }
        13 => {
            if let Ok(req) = pb::AddMemberRequest::decode(body) {
                let _ = requests::new_member(&req);
            }
        }
        14 => {
            if let Ok(Ok((job, reason))) = pb::CheckpointJobRequest::decode(body).map(|r| {
                requests::cancel(pb::CancelJobRequest {
                    job_id: r.job_id,
                    reason: String::new(),
                })
            }) {
                apply_as_person(Command::RequestCheckpoint { job, reason });
            }
        }
        15 => {
            let Ok(req) = pb::SubmitJobsRequest::decode(body) else {
                return;
            };
            if let Ok(batch) = requests::submissions(&req) {
                let batch = batch
                    .into_iter()
                    .map(|(spec, idempotency_key)| Submission {
                        idempotency_key,
                        spec,
                        owner: "client/fuzz".into(),
                    })
                    .collect();
                apply_as_person(Command::SubmitJobs(batch));
            }
        }
        _ => backup(body),
    }
}

/// One valid request of each method, tagged with its method byte.
pub fn client_request_seeds() -> Vec<Vec<u8>> {
    let tagged = |method: u8, body: Vec<u8>| [vec![method], body].concat();
    vec![
        tagged(
            0,
            pb::SubmitJobRequest {
                spec_toml: SPECS[0].into(),
                idempotency_key: "key-1".into(),
            }
            .encode_to_vec(),
        ),
        tagged(
            1,
            pb::CancelJobRequest {
                job_id: "train-1".into(),
                reason: "done".into(),
            }
            .encode_to_vec(),
        ),
        tagged(
            2,
            pb::SetNodeStateRequest {
                node: "h1".into(),
                state: "draining".into(),
                reason: "maintenance".into(),
                drain_grace_ms: 60_000,
            }
            .encode_to_vec(),
        ),
        tagged(
            3,
            pb::SetDeviceFenceRequest {
                node: "h2".into(),
                device: "3".into(),
                fenced: true,
                reason: "xid".into(),
            }
            .encode_to_vec(),
        ),
        tagged(
            4,
            pb::RemoveNodeRequest {
                node: "h3".into(),
                reason: "gone".into(),
            }
            .encode_to_vec(),
        ),
        tagged(
            5,
            pb::QueueInfo {
                name: "research".into(),
                guaranteed_milli: 16_000,
                may_borrow: true,
                idle_action: "reclaim".into(),
                idle_window_ms: 60_000,
                idle_threshold_pct: 5,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        tagged(
            6,
            pb::Limits {
                max_finished: 10,
                max_audit_entries: 5,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        tagged(
            7,
            pb::MigrateJobRequest {
                job_id: "train-1".into(),
                to: vec!["h3".into()],
                avoid: vec!["h1".into()],
            }
            .encode_to_vec(),
        ),
        tagged(
            8,
            pb::ListJobsRequest {
                states: vec![1, 2],
                queue: "research".into(),
                page_size: 10,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        tagged(
            10,
            pb::SetAccessRequest {
                principal: "client/bob".into(),
                grant: Some(pb::AccessGrant {
                    roles: vec!["submitter".into()],
                    queues: vec!["research".into()],
                }),
                token_sha256: String::new(),
            }
            .encode_to_vec(),
        ),
        tagged(
            11,
            pb::ListAuditRequest {
                limit: 10,
                actor: "client/alice".into(),
            }
            .encode_to_vec(),
        ),
        tagged(
            12,
            pb::DrillRequest {
                action: pb::DrillAction::Partition as i32,
                duration_ms: 1_000,
                peers: vec![1, 3],
            }
            .encode_to_vec(),
        ),
        tagged(
            13,
            pb::AddMemberRequest {
                id: 4,
                address: "10.0.0.4:7101".into(),
                voter: true,
            }
            .encode_to_vec(),
        ),
        tagged(
            14,
            pb::CheckpointJobRequest {
                job_id: "train-1".into(),
            }
            .encode_to_vec(),
        ),
        tagged(
            15,
            pb::SubmitJobsRequest {
                jobs: vec![pb::SubmitJobRequest {
                    spec_toml: SPECS[0].into(),
                    idempotency_key: "sweep".into(),
                }],
                array_size: 4,
            }
            .encode_to_vec(),
        ),
    ]
}

/// The worker API's requests (the first byte picks the method), and the allocation set an agent
/// decodes from a replica.
pub fn worker_request(data: &[u8]) {
    let Some((&method, body)) = data.split_first() else {
        return;
    };
    match method % 8 {
        0 => {
            if let Ok(Ok(reg)) =
                pb::RegisterRequest::decode(body).map(worker_api::registration_from_pb)
            {
                apply_to_fixture(Command::RegisterNode(reg));
            }
        }
        1 => {
            if let Ok(Ok(report)) =
                pb::DeviceHealthReport::decode(body).map(worker_api::device_health_from_report)
            {
                apply_to_fixture(Command::DeviceHealth(report));
            }
        }
        2 => {
            if let Ok(Ok(report)) =
                pb::HealthCheckReport::decode(body).map(worker_api::health_check_from_report)
            {
                apply_to_fixture(Command::HealthCheck(report));
            }
        }
        3 => {
            if let Ok(Ok(report)) = pb::TaskStatusReport::decode(body).map(worker_api::task_report)
            {
                apply_to_fixture(Command::TaskStatus(report));
            }
        }
        4 => {
            let _ = pb::HeartbeatRequest::decode(body);
        }
        5 => {
            let _ = pb::WatchAllocationsRequest::decode(body);
        }
        6 => {
            let _ = pb::CheckpointReport::decode(body);
            // The same bytes as a host's batch of task reports.
            if let Ok(batch) = pb::TaskStatusReports::decode(body) {
                let reports: Result<Vec<_>, _> = batch
                    .reports
                    .into_iter()
                    .take(crate::state::MAX_BATCH_REPORTS)
                    .map(worker_api::task_report)
                    .collect();
                if let Ok(reports) = reports {
                    apply_to_fixture(Command::TaskStatuses(reports));
                }
            }
        }
        _ => {
            if let Ok(set) = pb::AllocationSet::decode(body) {
                let _ = gangway_proto::allocation::digest(&set);
                let _ = format!("{set:?}");
            }
        }
    }
}

/// One valid message of each worker API method, tagged with its method byte.
pub fn worker_request_seeds() -> Vec<Vec<u8>> {
    let tagged = |method: u8, body: Vec<u8>| [vec![method], body].concat();
    let mut set = convert::allocation_set(fixture(), 7, &"h1".into());
    set.allocations.truncate(2);
    vec![
        tagged(0, register("h4", "r2").encode_to_vec()),
        tagged(
            1,
            pb::DeviceHealthReport {
                node: "h1".into(),
                device: "GPU-h1-2".into(),
                health: pb::DeviceHealth::Failed as i32,
                cause: "XID 79".into(),
            }
            .encode_to_vec(),
        ),
        tagged(
            2,
            pb::HealthCheckReport {
                node: "h2".into(),
                passed: false,
                failed_devices: vec!["GPU-h2-0".into()],
                detail: "dcgm: fail".into(),
            }
            .encode_to_vec(),
        ),
        tagged(
            3,
            pb::TaskStatusReport {
                node: "h1".into(),
                job_id: "train-1".into(),
                task: 0,
                epoch: 1,
                state: pb::TaskState::Running as i32,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        tagged(
            4,
            pb::HeartbeatRequest {
                node: "h1".into(),
                devices: vec![pb::DeviceTelemetry::default()],
            }
            .encode_to_vec(),
        ),
        tagged(7, set.encode_to_vec()),
    ]
}

/// A Raft log entry's command (bincode, as the log stores and `AppendEntries` carries it),
/// applied to the fixture.
pub fn log_entry(data: &[u8]) {
    if let Ok(command) = bincode::deserialize::<Command>(data) {
        let _ = format!("{command:?}");
        apply_to_fixture(command);
    }
}

/// Commands of most kinds, encoded.
pub fn log_entry_seeds() -> Vec<Vec<u8>> {
    let mut commands: Vec<Command> = vec![
        Command::SubmitJob(Submission {
            idempotency_key: None,
            spec: JobSpec::from_toml_str(SPECS[0]).expect("valid"),
            owner: "client/alice".into(),
        }),
        Command::Audited {
            actor: "client/alice".into(),
            command: Box::new(Command::CancelJob {
                job: "train-1".into(),
                reason: "r".into(),
            }),
        },
        Command::RegisterNode(
            worker_api::registration_from_pb(register("h4", "r3")).expect("valid"),
        ),
        Command::NodeDown {
            node: "h1".into(),
            reason: "silent".into(),
        },
        Command::DrainDeadline { node: "h2".into() },
    ];
    commands.extend(fixture().overdue_migrations(u64::MAX));
    let plan_store = fixture();
    let config = plan_store.scheduler_config(&SchedulerConfig::default());
    let read = plan_store.round_input(true);
    let plan = engine::run_round(engine::RoundInput {
        view: plan_store.engine(),
        pending: &read.pending,
        reasons: read.reasons,
        config: &config,
        state: &read.state,
        defrag: None,
        now_ms: NOW_MS,
    })
    .plan;
    commands.push(Command::ApplyPlan { plan });
    commands.push(Command::SetLimits(Limits::default()));
    commands.push(Command::Restore {
        state: Box::new(ClusterStore::new()),
        backup_revision: 3,
    });
    commands
        .iter()
        .map(|c| bincode::serialize(c).expect("commands encode"))
        .collect()
}

/// A Raft snapshot's bytes as `InstallSnapshot` delivers them and the snapshot file holds them.
/// With the first byte odd, the rest is taken as the state's own encoding behind a valid magic,
/// length and checksum, so mutations reach the state decoder instead of the checksum.
pub fn snapshot(data: &[u8]) {
    let decoded = match data.split_first() {
        Some((tag, body)) if tag % 2 == 1 => decode_snapshot(&framed(body)),
        _ => decode_snapshot(data),
    };
    let Ok(fsm) = decoded else {
        return;
    };
    let again = encode_snapshot(&fsm).expect("a decoded snapshot encodes");
    let back = decode_snapshot(&again).expect("an encoded snapshot decodes");
    assert_eq!(back.store(), fsm.store(), "a snapshot round-trips");
    let mut store = fsm.store().clone();
    exercise(&store);
    round(&mut store);
    exercise(&store);
}

/// `body` behind a valid snapshot header and checksum (see `fsm::encode_snapshot`).
fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = b"GWSNAP\x00\x01".to_vec();
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out
}

/// The fixture's snapshot, whole and as a bare state (tag byte 1).
pub fn snapshot_seeds() -> Vec<Vec<u8>> {
    let fsm = SchedulerFsm::from_store(fixture().clone(), 9);
    let whole = encode_snapshot(&fsm).expect("encodes");
    let body = whole[16..whole.len() - 4].to_vec();
    vec![[vec![0u8], whole].concat(), [vec![1u8], body].concat()]
}

/// A `RestoreSnapshot` backup (the JSON `cluster snapshot save` writes), restored into an empty
/// cluster as the restore's command is applied.
pub fn backup(data: &[u8]) {
    let Ok((state, backup_revision)) = requests::backup(data) else {
        return;
    };
    let mut store = ClusterStore::new();
    let restore = Command::Restore {
        state: Box::new(state),
        backup_revision,
    };
    store.apply(NOW_MS, restore, &mut Vec::new());
    exercise(&store);
    round(&mut store);
    exercise(&store);
}

/// The fixture as `cluster snapshot save` writes it.
pub fn backup_seeds() -> Vec<Vec<u8>> {
    let fsm = SchedulerFsm::from_store(fixture().clone(), 9);
    vec![serde_json::to_vec(&fsm).expect("a backup encodes")]
}

#[cfg(test)]
mod tests {
    use super::*;
    use gangway_proto::fuzz::short_run;

    #[test]
    fn the_fixture_has_work_in_every_state() {
        let store = fixture();
        assert_eq!(store.nodes().len(), 3);
        assert!(store.job_table().running().count() >= 1);
        assert!(store.job_table().pending().count() >= 1);
    }

    #[test]
    fn fuzz_client_request_short_run() {
        short_run(
            "client_request",
            &client_request_seeds(),
            3_000,
            client_request,
        );
    }

    #[test]
    fn fuzz_worker_request_short_run() {
        short_run(
            "worker_request",
            &worker_request_seeds(),
            3_000,
            worker_request,
        );
    }

    #[test]
    fn fuzz_log_entry_short_run() {
        let seeds = log_entry_seeds();
        assert!(seeds
            .iter()
            .all(|s| bincode::deserialize::<Command>(s).is_ok()));
        short_run("log_entry", &seeds, 3_000, log_entry);
    }

    /// The inputs a long run crashed on (states that contradict themselves: a host index past
    /// the hosts, a lease on a host the engine does not know) are refused, not used.
    #[test]
    fn states_that_contradict_themselves_are_refused() {
        for input in gangway_proto::fuzz::regressions("snapshot") {
            let (tag, body) = input.split_first().expect("a tagged input");
            let bytes = if tag % 2 == 1 {
                framed(body)
            } else {
                body.to_vec()
            };
            assert!(decode_snapshot(&bytes).is_err());
        }
        let backups = gangway_proto::fuzz::regressions("backup");
        assert!(!backups.is_empty(), "the regressions are in the tree");
        for input in backups {
            let err = requests::backup(&input).expect_err("refused at the edge");
            assert_eq!(err.code(), "invalid_argument");
            if let Ok(fsm) = serde_json::from_slice::<SchedulerFsm>(&input) {
                // And were one committed anyway, its apply refuses it whole.
                let mut store = ClusterStore::new();
                let restore = Command::Restore {
                    state: Box::new(fsm.store().clone()),
                    backup_revision: 1,
                };
                let r = store.apply(NOW_MS, restore, &mut Vec::new());
                assert!(
                    matches!(&r, crate::state::Response::Rejected(e) if e.code() == "invalid_backup"),
                    "{r:?}"
                );
                assert!(store.nodes().is_empty() && store.jobs().is_empty());
            }
        }
    }

    #[test]
    fn fuzz_snapshot_short_run() {
        let seeds = snapshot_seeds();
        assert!(decode_snapshot(&seeds[0][1..]).is_ok());
        short_run("snapshot", &seeds, 1_000, snapshot);
    }

    #[test]
    fn fuzz_backup_short_run() {
        let seeds = backup_seeds();
        assert!(requests::backup(&seeds[0]).is_ok());
        short_run("backup", &seeds, 1_000, backup);
    }
}
