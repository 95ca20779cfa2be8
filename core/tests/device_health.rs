//! Failing accelerators, as stories: a failed device is fenced alone and the gang on it repaired
//! (ahead of ordinary work, on its healthy hosts), health checks return a device to service and a
//! flapping one stays out, operators fence and unfence, a host re-registers with a changed
//! inventory, application failures follow the job's restart policy; then random interleavings
//! that try to put work on a fenced device.
//!
//! Every round here is the production round ([`run_round`]) on the state, committed as the leader
//! commits it.

use gangway_core::engine::NodeState;
use gangway_core::engine::{run_round, HostTopology, PendingReason, RoundInput, SchedulerConfig};
use gangway_core::state::{
    CheckpointManifest, CheckpointReport, ClusterStore, Command, DeviceFenceChange, DeviceHealth,
    DeviceHealthReport, Event, FenceSource, HealthCheckReport, JobState, NodeStateChange,
    Rejection, Response, RunCause, Submission, TaskReport, TaskState, CHECK_PASSES_TO_UNFENCE,
    FLAP_LIMIT,
};
use gangway_proto::ids::{HostName, JobId};
use gangway_proto::spec::JobSpec;
use proptest::prelude::*;

mod common;
use common::{gpu, node};
use std::collections::BTreeSet;

/// A job of `tasks` x `devices` GPUs; `extra` is appended to the TOML (sections).
fn spec(name: &str, tasks: u32, devices: u32, extra: &str) -> JobSpec {
    JobSpec::from_toml_str(&format!(
        "name = \"{name}\"\ntasks = {tasks}\ncommand = [\"python3\", \"train.py\"]\n\
         [resources]\ndevices = {devices}\n{extra}"
    ))
    .expect("test spec is valid")
}

const CHECKPOINTED: &str = "[checkpoint]\nsignal = \"SIGUSR1\"\n";

struct Cluster {
    store: ClusterStore,
    now: u64,
    events: Vec<Event>,
}

impl Cluster {
    /// Hosts `h1..=hN` of 8 GPUs, in racks of `per_rack`.
    fn with_hosts(n: usize, per_rack: usize) -> Self {
        let mut c = Self {
            store: ClusterStore::new(),
            now: 1_000,
            events: Vec::new(),
        };
        for i in 1..=n {
            let rack = format!("r{}", (i - 1) / per_rack + 1);
            c.ok(Command::RegisterNode(node(&format!("h{i}"), &rack, 8)));
        }
        c
    }

    fn apply(&mut self, cmd: Command) -> Response {
        self.now += 10;
        self.store.apply(self.now, cmd, &mut self.events)
    }

    fn ok(&mut self, cmd: Command) {
        let r = self.apply(cmd);
        assert_eq!(r, Response::Done);
    }

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

    /// One production round, committed. Returns the jobs it placed.
    fn round(&mut self) -> Vec<JobId> {
        let config = SchedulerConfig::default();
        let read = self.store.round_input(false);
        let outcome = run_round(RoundInput {
            view: self.store.engine(),
            pending: &read.pending,
            reasons: read.reasons,
            config: &config,
            state: &read.state,
            defrag: None,
            now_ms: self.now,
        });
        match self.apply(Command::ApplyPlan { plan: outcome.plan }) {
            Response::PlanApplied { placed, .. } => placed.into_iter().map(|(j, _)| j).collect(),
            other => panic!("plan: {other:?}"),
        }
    }

    fn job(&self, job: &JobId) -> &gangway_core::state::JobRecord {
        self.store.job(job).expect("job")
    }

    fn epoch(&self, job: &JobId) -> u64 {
        self.job(job).lease.as_ref().expect("leased").epoch
    }

    /// (host, device index) of every device `job`'s lease holds.
    fn devices_of(&self, job: &JobId) -> BTreeSet<(String, u16)> {
        let lease = self.job(job).lease.as_ref().expect("leased");
        lease
            .placement
            .tasks
            .iter()
            .flat_map(|t| t.devices.iter().map(|d| (t.host.to_string(), d.index)))
            .collect()
    }

    fn hosts_of(&self, job: &JobId) -> BTreeSet<String> {
        self.devices_of(job).into_iter().map(|(h, _)| h).collect()
    }

    fn health(&mut self, host: &str, i: u16, health: DeviceHealth, cause: &str) -> Response {
        self.apply(Command::DeviceHealth(DeviceHealthReport {
            node: HostName::new(host),
            device: format!("GPU-{host}-{i}"),
            health,
            cause: cause.into(),
        }))
    }

    fn check(&mut self, host: &str, passed: bool, failed: &[u16]) -> Response {
        self.apply(Command::HealthCheck(HealthCheckReport {
            node: HostName::new(host),
            passed,
            failed_devices: failed.iter().map(|&i| format!("GPU-{host}-{i}")).collect(),
            detail: "dcgm diag level 1".into(),
        }))
    }

    fn fence(&mut self, host: &str, device: &str, fenced: bool) -> Response {
        self.apply(Command::FenceDevice(DeviceFenceChange {
            node: HostName::new(host),
            device: device.into(),
            fenced,
            reason: "suspect NVLink".into(),
        }))
    }

    fn fenced(&self, host: &str) -> BTreeSet<u16> {
        let h = self
            .store
            .engine()
            .host(&HostName::new(host))
            .expect("host");
        h.fenced.keys().copied().collect()
    }

    fn run_all(&mut self, job: &JobId) {
        let epoch = self.epoch(job);
        for task in 0..self.job(job).spec.tasks {
            self.ok(Command::TaskStatus(TaskReport {
                job: job.clone(),
                task,
                epoch,
                state: TaskState::Running,
                exit_code: None,
                message: String::new(),
            }));
        }
    }

    fn fail_task(&mut self, job: &JobId, task: u32, code: i32) -> Response {
        let epoch = self.epoch(job);
        self.apply(Command::TaskStatus(TaskReport {
            job: job.clone(),
            task,
            epoch,
            state: TaskState::Failed,
            exit_code: Some(code),
            message: "Traceback: CUDA error".into(),
        }))
    }

    fn pending_reason(&self, job: &JobId) -> PendingReason {
        self.job(job).pending_reason.clone().expect("pending")
    }

    fn snapshot(&self) -> Vec<u8> {
        self.store.to_snapshot().expect("snapshot")
    }
}

#[test]
fn a_failed_device_is_fenced_alone_and_its_gang_runs_again_on_healthy_devices() {
    // Two hosts; a 1x8 job runs on one of them, a 1x4 job beside nothing.
    let mut c = Cluster::with_hosts(2, 2);
    let big = c.submit(spec("big", 1, 8, CHECKPOINTED));
    assert_eq!(c.round(), vec![big.clone()]);
    c.run_all(&big);
    let first = c.hosts_of(&big).into_iter().next().unwrap();
    let other = if first == "h1" { "h2" } else { "h1" };

    // The agent sees XID 79 on GPU 3 of the job's host: the device is fenced, alone.
    assert_eq!(
        c.health(&first, 3, DeviceHealth::Failed, "XID 79: fell off the bus"),
        Response::Done
    );
    assert_eq!(c.fenced(&first), BTreeSet::from([3]));
    let rec = c.store.nodes()[&HostName::new(&first)].device(3);
    assert_eq!(rec.fence.as_ref().unwrap().source, FenceSource::Health);
    assert!(rec.describe().contains("XID 79"), "{}", rec.describe());
    assert_eq!(
        c.store.nodes()[&HostName::new(&first)].state,
        NodeState::Ready
    );

    // The gang lost its lease to the infrastructure: pending, marked for repair, not counted.
    let job = c.job(&big);
    assert_eq!(job.state, JobState::Pending);
    assert!(job.resume.repair);
    assert_eq!((job.repairs, job.restarts), (1, 0));
    assert_eq!(job.runs.len(), 1);
    assert_eq!(job.runs[0].cause, Some(RunCause::Infrastructure));
    assert!(job.runs[0].end.contains("XID 79"), "{}", job.runs[0].end);

    // The next round places it on the healthy host; the fenced host keeps its 7 good GPUs.
    assert_eq!(c.round(), vec![big.clone()]);
    assert_eq!(c.hosts_of(&big), BTreeSet::from([other.to_owned()]));
    let h = c.store.engine().host(&HostName::new(&first)).unwrap();
    assert_eq!(h.free_whole_devices(), 7);
    let small = c.submit(spec("small", 1, 7, ""));
    assert_eq!(c.round(), vec![small.clone()]);
    assert!(!c.devices_of(&small).contains(&(first.clone(), 3)));

    // A repeated report changes nothing.
    let before = state_of(&c.snapshot());
    assert_eq!(
        c.health(&first, 3, DeviceHealth::Failed, "XID 79: fell off the bus"),
        Response::Done
    );
    assert_eq!(before, state_of(&c.snapshot()));
}

#[test]
fn a_gang_that_waits_because_of_fenced_devices_says_so() {
    let mut c = Cluster::with_hosts(1, 1);
    c.health("h1", 0, DeviceHealth::Failed, "uncorrectable ECC");
    let job = c.submit(spec("full", 1, 8, ""));
    assert!(c.round().is_empty());
    let reason = c.pending_reason(&job);
    assert!(
        matches!(
            reason,
            PendingReason::DevicesFenced {
                free: 7,
                fenced: 1,
                needed: 8,
                ..
            }
        ),
        "{reason:?}"
    );
    assert!(reason.to_string().contains("fenced"), "{reason}");
}

#[test]
fn a_repair_goes_before_ordinary_pending_work_and_keeps_its_healthy_hosts() {
    // Rack r1 = h1..h4, rack r2 = h5..h8. A 2x8 gang that must stay in one rack runs in r1.
    // It was placed while another gang held two other hosts of r1, which have since freed up:
    // left to itself, a round would now prefer those.
    let mut c = Cluster::with_hosts(8, 4);
    let earlier = c.submit(spec("earlier", 2, 8, "[topology]\nrequired = \"rack\"\n"));
    assert_eq!(c.round(), vec![earlier.clone()]);
    let gang = c.submit(spec(
        "gang",
        2,
        8,
        &format!("{CHECKPOINTED}[topology]\nrequired = \"rack\"\n"),
    ));
    assert_eq!(c.round(), vec![gang.clone()]);
    c.run_all(&gang);
    let hosts: Vec<String> = c.hosts_of(&gang).into_iter().collect();
    c.ok(Command::CancelJob {
        job: earlier,
        reason: "done early".into(),
    });

    // A GPU of the gang's second host fails; high-priority work of another queue arrives.
    c.health(&hosts[1], 5, DeviceHealth::Failed, "XID 48: double-bit ECC");
    assert_eq!(c.job(&gang).state, JobState::Pending);
    let urgent = c.submit(spec("urgent", 2, 8, "").replace_priority(100));

    // The repair is placed first, despite the urgent job's priority, and keeps the healthy host
    // it ran on: of the five hosts that could take its ranks, it takes its old one.
    let placed = c.round();
    assert_eq!(placed.first(), Some(&gang), "repair first: {placed:?}");
    let now_on = c.hosts_of(&gang);
    assert!(
        now_on.contains(&hosts[0]),
        "kept {} in {now_on:?}",
        hosts[0]
    );
    assert!(
        !now_on.contains(&hosts[1]),
        "7 healthy GPUs cannot take a rank of 8"
    );
    assert!(
        c.job(&gang).resume == Default::default(),
        "resume spent once placed"
    );
    assert_eq!(c.job(&urgent).state, JobState::Running);
}

/// A snapshot as JSON, without the clock (every command advances it).
fn state_of(snapshot: &[u8]) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_slice(snapshot).expect("json");
    v["now_ms"] = 0.into();
    v
}

trait WithPriority {
    fn replace_priority(self, p: i32) -> JobSpec;
}

impl WithPriority for JobSpec {
    fn replace_priority(mut self, p: i32) -> JobSpec {
        self.priority = p;
        self
    }
}

#[test]
fn health_checks_return_a_device_after_passes_in_a_row_and_a_flapping_one_stays_out() {
    let mut c = Cluster::with_hosts(1, 1);
    c.health("h1", 2, DeviceHealth::Failed, "XID 79");
    assert_eq!(c.fenced("h1"), BTreeSet::from([2]));

    // Passes short of the mark, then a failure: the count starts again.
    for _ in 1..CHECK_PASSES_TO_UNFENCE {
        c.check("h1", true, &[]);
    }
    c.check("h1", false, &[2]);
    assert_eq!(c.fenced("h1"), BTreeSet::from([2]));
    for _ in 1..CHECK_PASSES_TO_UNFENCE {
        c.check("h1", true, &[]);
        assert_eq!(c.fenced("h1"), BTreeSet::from([2]));
    }
    c.check("h1", true, &[]);
    assert!(c.fenced("h1").is_empty(), "back after passes in a row");
    let rec = c.store.nodes()[&HostName::new("h1")].device(2);
    assert_eq!(rec.health, DeviceHealth::Healthy);

    // It fails again and again: at its FLAP_LIMIT-th fence, passing checks no longer return it.
    for _ in 2..FLAP_LIMIT {
        c.health("h1", 2, DeviceHealth::Failed, "XID 79 again");
        assert_eq!(c.fenced("h1"), BTreeSet::from([2]));
        c.health("h1", 2, DeviceHealth::Healthy, "");
        for _ in 0..CHECK_PASSES_TO_UNFENCE {
            c.check("h1", true, &[]);
        }
        assert!(c.fenced("h1").is_empty());
    }
    c.health("h1", 2, DeviceHealth::Failed, "XID 79 once more");
    for _ in 0..3 * CHECK_PASSES_TO_UNFENCE {
        c.check("h1", true, &[]);
    }
    assert_eq!(
        c.fenced("h1"),
        BTreeSet::from([2]),
        "flapping: stays fenced"
    );
    let rec = c.store.nodes()[&HostName::new("h1")].device(2);
    assert!(rec.describe().contains("flapping"), "{}", rec.describe());

    // Only an operator returns it, and that resets the count.
    assert_eq!(c.fence("h1", "2", false), Response::Done);
    assert!(c.fenced("h1").is_empty());
    c.health("h1", 2, DeviceHealth::Failed, "XID 79");
    for _ in 0..CHECK_PASSES_TO_UNFENCE {
        c.check("h1", true, &[]);
    }
    assert!(c.fenced("h1").is_empty());
}

#[test]
fn a_check_that_fails_without_naming_devices_fences_the_whole_host() {
    let mut c = Cluster::with_hosts(2, 2);
    assert_eq!(c.check("h2", false, &[]), Response::Done);
    assert_eq!(c.fenced("h2"), (0..8).collect());
    assert!(c.fenced("h1").is_empty());
    let job = c.submit(spec("j", 2, 8, ""));
    assert!(c.round().is_empty());
    assert!(matches!(
        c.pending_reason(&job),
        PendingReason::DevicesFenced { .. }
    ));
}

#[test]
fn an_operator_fence_checkpoints_a_gang_first_and_only_an_operator_unfences() {
    let mut c = Cluster::with_hosts(2, 2);
    let job = c.submit(spec("ckpt", 1, 8, CHECKPOINTED));
    c.round();
    c.run_all(&job);
    let host = c.hosts_of(&job).into_iter().next().unwrap();
    let epoch = c.epoch(&job);

    // By uuid or by index, the operator fences GPU 1: the job checkpoints before it moves.
    assert_eq!(c.fence(&host, "1", true), Response::Done);
    assert_eq!(c.fenced(&host), BTreeSet::from([1]));
    let rec = c.job(&job);
    assert_eq!(rec.state, JobState::Running);
    let request = rec
        .migration
        .as_ref()
        .expect("checkpoint first")
        .checkpoint_request;
    c.ok(Command::RecordCheckpoint(CheckpointReport {
        job: job.clone(),
        epoch,
        request,
        manifest: CheckpointManifest {
            path: "/ckpt/ckpt-1/step-500".into(),
            step: 500,
            bytes: 1 << 30,
        },
    }));
    let rec = c.job(&job);
    assert_eq!(rec.state, JobState::Pending);
    assert!(rec.resume.repair);
    assert_eq!(rec.runs[0].cause, Some(RunCause::Infrastructure));
    assert_eq!(rec.restore_from(), Some("/ckpt/ckpt-1/step-500"));
    c.round();
    assert!(!c.devices_of(&job).contains(&(host.clone(), 1)));

    // Health checks do not return an operator's fence.
    for _ in 0..2 * CHECK_PASSES_TO_UNFENCE {
        c.check(&host, true, &[]);
    }
    assert_eq!(c.fenced(&host), BTreeSet::from([1]));
    assert_eq!(
        c.fence(&host, &format!("GPU-{host}-1"), false),
        Response::Done
    );
    assert!(c.fenced(&host).is_empty());
}

#[test]
fn bad_device_commands_are_refused_with_stable_codes_and_change_nothing() {
    let mut c = Cluster::with_hosts(2, 2);
    let before = c.snapshot();
    let cases = [
        (
            c.health("h1", 9, DeviceHealth::Failed, "XID 79"),
            "unknown_device",
        ),
        (
            c.apply(Command::DeviceHealth(DeviceHealthReport {
                node: HostName::new("h1"),
                device: "GPU-h2-0".into(),
                health: DeviceHealth::Failed,
                cause: "another node's device".into(),
            })),
            "unknown_device",
        ),
        (c.health("h9", 0, DeviceHealth::Failed, "x"), "unknown_node"),
        // One unknown device in a check refuses the whole report.
        (c.check("h1", false, &[0, 12]), "unknown_device"),
        (c.fence("h1", "8", false), "unknown_device"),
        (c.fence("h1", "GPU-nope", true), "unknown_device"),
        (
            c.apply(Command::RemoveNode {
                node: HostName::new("h1"),
                reason: "decommission".into(),
            }),
            "bad_node",
        ),
    ];
    for (response, code) in cases {
        let Response::Rejected(r) = &response else {
            panic!("expected a refusal, got {response:?}")
        };
        assert_eq!(r.code(), code, "{r}");
    }
    assert_eq!(state_of(&before), state_of(&c.snapshot()));
}

#[test]
fn a_host_that_registers_again_with_seven_of_eight_gpus_is_accepted_and_its_lease_repaired() {
    let mut c = Cluster::with_hosts(2, 2);
    let job = c.submit(spec("j", 1, 8, CHECKPOINTED));
    c.round();
    let host = c.hosts_of(&job).into_iter().next().unwrap();
    let mut reg = node(&host, "r1", 8);
    reg.devices.remove(6);

    assert_eq!(c.apply(Command::RegisterNode(reg.clone())), Response::Done);
    assert_eq!(c.fenced(&host), BTreeSet::from([6]));
    let rec = c.store.nodes()[&HostName::new(&host)].device(6);
    assert!(!rec.present);
    assert_eq!(rec.fence.as_ref().unwrap().source, FenceSource::Absent);
    assert_eq!(c.job(&job).state, JobState::Pending);
    assert_eq!(c.job(&job).runs[0].cause, Some(RunCause::Infrastructure));
    c.round();
    assert!(!c.hosts_of(&job).contains(&host), "7 GPUs cannot take 1x8");

    // Checks do not return a device that is still missing.
    for _ in 0..2 * CHECK_PASSES_TO_UNFENCE {
        c.check(&host, true, &[]);
    }
    assert_eq!(c.fenced(&host), BTreeSet::from([6]));

    // A new board joins at the end; indexes of the others never move.
    reg.devices.push(gpu(&host, 8));
    assert_eq!(c.apply(Command::RegisterNode(reg.clone())), Response::Done);
    let n = &c.store.nodes()[&HostName::new(&host)];
    assert_eq!(n.registration.devices.len(), 9);
    assert_eq!(n.registration.devices[7].uuid, format!("GPU-{host}-7"));
    assert_eq!(n.registration.devices[8].uuid, format!("GPU-{host}-8"));
    let h = c.store.engine().host(&HostName::new(&host)).unwrap();
    assert_eq!((h.spec.devices.len(), h.free_whole_devices()), (9, 8));

    // GPU 6 comes back: it stays fenced until its checks pass.
    reg.devices.insert(6, gpu(&host, 6));
    assert_eq!(c.apply(Command::RegisterNode(reg.clone())), Response::Done);
    assert_eq!(c.fenced(&host), BTreeSet::from([6]));
    for _ in 0..CHECK_PASSES_TO_UNFENCE {
        c.check(&host, true, &[]);
    }
    assert!(c.fenced(&host).is_empty());

    // A known uuid that changes model is refused, nothing changed.
    let before = c.snapshot();
    let mut changed = reg.clone();
    changed.devices[0].model = "A100".into();
    let r = c.apply(Command::RegisterNode(changed));
    assert!(
        matches!(r, Response::Rejected(Rejection::BadNode { .. })),
        "{r:?}"
    );
    let mut moved = reg;
    moved.topology = HostTopology::new("dc1", "z1", "p1", "r9");
    let r = c.apply(Command::RegisterNode(moved));
    assert!(
        matches!(r, Response::Rejected(Rejection::BadNode { .. })),
        "{r:?}"
    );
    assert_eq!(state_of(&before), state_of(&c.snapshot()));
}

#[test]
fn application_failures_follow_the_restart_policy_and_infrastructure_failures_never_count() {
    let mut c = Cluster::with_hosts(2, 2);
    let restart = "[restart]\nmax_restarts = 2\nbackoff = \"10s\"\nmax_backoff = \"15s\"\n";
    let job = c.submit(spec("flaky", 1, 4, &format!("{CHECKPOINTED}{restart}")));
    c.round();
    c.run_all(&job);

    // First application failure: restart 1 after 10 s.
    c.fail_task(&job, 0, 1);
    let rec = c.job(&job);
    assert_eq!((rec.state, rec.restarts), (JobState::Pending, 1));
    let until = rec.resume.not_before_ms;
    assert_eq!(until, c.now + 10_000);
    assert_eq!(rec.runs[0].cause, Some(RunCause::Application));
    assert!(c.round().is_empty(), "backing off");
    assert_eq!(
        c.pending_reason(&job),
        PendingReason::Backoff { until_ms: until }
    );
    c.now = until;
    assert_eq!(c.round(), vec![job.clone()]);
    c.run_all(&job);

    // A failure on a device that failed under it is the infrastructure's: repaired, not counted.
    let (host, dev) = c.devices_of(&job).into_iter().next().unwrap();
    c.health(&host, dev, DeviceHealth::Failed, "XID 79");
    assert_eq!(c.job(&job).restarts, 1);
    assert_eq!(c.job(&job).runs[1].cause, Some(RunCause::Infrastructure));
    c.round();
    c.run_all(&job);
    // And a task that fails on a fenced device before the health report (operator fence with a
    // migration under way) is repaired too.
    let (host, dev) = c.devices_of(&job).into_iter().next().unwrap();
    c.fence(&host, &dev.to_string(), true);
    assert_eq!(c.fail_task(&job, 0, 139), Response::Done);
    assert_eq!(c.job(&job).restarts, 1);
    assert_eq!(c.job(&job).state, JobState::Pending);
    c.round();
    c.run_all(&job);

    // Second application failure: backoff doubled but capped at 15 s.
    c.fail_task(&job, 0, 1);
    let rec = c.job(&job);
    assert_eq!(rec.restarts, 2);
    assert_eq!(rec.resume.not_before_ms, c.now + 15_000);
    c.now += 15_000;
    c.round();
    c.run_all(&job);

    // Third: the policy is spent; the job fails.
    c.fail_task(&job, 0, 1);
    let rec = c.job(&job);
    assert_eq!(rec.state, JobState::Failed);
    let causes: Vec<_> = rec.runs.iter().map(|r| r.cause.unwrap()).collect();
    assert_eq!(
        causes,
        [
            RunCause::Application,
            RunCause::Infrastructure,
            RunCause::Infrastructure,
            RunCause::Application,
            RunCause::Application
        ]
    );
}

#[test]
fn a_job_without_a_restart_policy_fails_on_its_first_application_failure() {
    let mut c = Cluster::with_hosts(1, 1);
    let job = c.submit(spec("once", 1, 1, ""));
    c.round();
    c.run_all(&job);
    c.fail_task(&job, 0, 2);
    assert_eq!(c.job(&job).state, JobState::Failed);
    assert_eq!(c.job(&job).runs[0].cause, Some(RunCause::Application));
}

#[test]
fn a_node_is_removed_only_when_it_holds_nothing_and_is_not_ready() {
    let mut c = Cluster::with_hosts(2, 2);
    let job = c.submit(spec("j", 1, 8, ""));
    c.round();
    let host = c.hosts_of(&job).into_iter().next().unwrap();
    let remove = |host: &str| Command::RemoveNode {
        node: HostName::new(host),
        reason: "decommissioned".into(),
    };
    c.ok(Command::SetNodeState(NodeStateChange {
        node: HostName::new(&host),
        state: NodeState::Draining,
        reason: "retire".into(),
        grace_ms: None,
    }));
    let r = c.apply(remove(&host));
    assert!(
        matches!(&r, Response::Rejected(Rejection::BadNode { why, .. }) if why.contains("holds work")),
        "{r:?}"
    );
    // Down: its lease was revoked (and the job repaired), so it can go.
    c.ok(Command::NodeDown {
        node: HostName::new(&host),
        reason: "missed heartbeats".into(),
    });
    assert!(c.job(&job).resume.repair);
    c.ok(remove(&host));
    assert!(!c.store.nodes().contains_key(&HostName::new(&host)));
    assert!(c.store.engine().host(&HostName::new(&host)).is_none());
    assert_eq!(c.store.engine().hosts().len(), 1);
    assert_eq!(c.round(), vec![job.clone()]);
}

/// One random step of the property below.
#[derive(Clone, Debug)]
enum Step {
    Submit { tasks: u32, devices: u32 },
    Round,
    Fail { host: u8, device: u16 },
    OperatorFence { host: u8, device: u16 },
    Unfence { host: u8, device: u16 },
    Check { host: u8, passed: bool },
    Lose { host: u8, device: u16 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (1u32..3, 1u32..9).prop_map(|(tasks, devices)| Step::Submit { tasks, devices }),
        Just(Step::Round),
        Just(Step::Round),
        (0u8..4, 0u16..8).prop_map(|(host, device)| Step::Fail { host, device }),
        (0u8..4, 0u16..8).prop_map(|(host, device)| Step::OperatorFence { host, device }),
        (0u8..4, 0u16..8).prop_map(|(host, device)| Step::Unfence { host, device }),
        (0u8..4, any::<bool>()).prop_map(|(host, passed)| Step::Check { host, passed }),
        (0u8..4, 0u16..8).prop_map(|(host, device)| Step::Lose { host, device }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever happens, no lease is granted on a device fenced at the time, the engine's fences
    /// are exactly the node records' fences, and no running gang holds a failed device.
    #[test]
    fn no_lease_ever_lands_on_a_fenced_device(steps in prop::collection::vec(step(), 1..60)) {
        let mut c = Cluster::with_hosts(4, 2);
        let mut n = 0;
        for s in steps {
            let fenced_before: BTreeSet<(String, u16)> = (1..=4)
                .flat_map(|i| {
                    let h = format!("h{i}");
                    c.fenced(&h).into_iter().map(move |d| (h.clone(), d))
                })
                .collect();
            match s {
                Step::Submit { tasks, devices } => {
                    n += 1;
                    c.submit(spec(&format!("j{n}"), tasks, devices, CHECKPOINTED));
                }
                Step::Round => {
                    for job in c.round() {
                        let on = c.devices_of(&job);
                        prop_assert!(on.is_disjoint(&fenced_before), "{job} placed on a fenced device");
                    }
                }
                Step::Fail { host, device } => {
                    c.health(&format!("h{}", host + 1), device, DeviceHealth::Failed, "XID 79");
                }
                Step::OperatorFence { host, device } => {
                    c.fence(&format!("h{}", host + 1), &device.to_string(), true);
                }
                Step::Unfence { host, device } => {
                    c.fence(&format!("h{}", host + 1), &device.to_string(), false);
                }
                Step::Check { host, passed } => {
                    let failed: &[u16] = if passed { &[] } else { &[0] };
                    c.check(&format!("h{}", host + 1), passed, failed);
                }
                Step::Lose { host, device } => {
                    let name = format!("h{}", host + 1);
                    let mut reg = node(&name, if host < 2 { "r1" } else { "r2" }, 8);
                    reg.devices.remove(usize::from(device));
                    c.apply(Command::RegisterNode(reg));
                }
            }
            // The engine and the records agree on every fence.
            for (name, record) in c.store.nodes() {
                let in_records: BTreeSet<u16> = record
                    .devices
                    .iter()
                    .enumerate()
                    .filter(|(_, d)| d.fence.is_some())
                    .map(|(i, _)| i as u16)
                    .collect();
                prop_assert_eq!(&in_records, &c.fenced(name.as_str()), "{}", name);
            }
            // No gang holds a device that failed (operator fences may wait for a checkpoint).
            for job in c.store.jobs().values().filter(|j| j.lease.is_some()) {
                for (host, d) in c.devices_of(&job.id) {
                    let rec = c.store.nodes()[&HostName::new(&host)].device(d);
                    let failed = rec.fence.as_ref().is_some_and(|f| f.source != FenceSource::Operator);
                    prop_assert!(!failed, "{} holds failed device {host}/{d}", job.id);
                }
            }
            prop_assert!(c.store.job_table().indexes_consistent());
            prop_assert_eq!(c.store.check_consistency(), Ok(()));
        }
    }
}

#[test]
fn a_drain_moves_checkpointable_work_off_and_stops_the_rest_at_its_deadline() {
    let mut c = Cluster::with_hosts(3, 3);
    let ckpt = c.submit(spec("ckpt", 1, 4, CHECKPOINTED));
    let plain = c.submit(spec("plain", 1, 4, ""));
    c.round();
    c.run_all(&ckpt);
    c.run_all(&plain);
    // Both on one host (best packing): drain it with a 60 s grace.
    let host = c.hosts_of(&ckpt).into_iter().next().unwrap();
    assert_eq!(c.hosts_of(&plain), BTreeSet::from([host.clone()]));
    let epoch = c.epoch(&ckpt);
    c.ok(Command::SetNodeState(NodeStateChange {
        node: HostName::new(&host),
        state: NodeState::Draining,
        reason: "replace the board".into(),
        grace_ms: Some(60_000),
    }));
    let deadline = c.store.nodes()[&HostName::new(&host)]
        .drain_deadline_ms
        .unwrap();
    assert_eq!(deadline, c.now + 60_000);

    // The checkpointable job checkpoints and resumes elsewhere with no lost step.
    let request = c
        .job(&ckpt)
        .migration
        .as_ref()
        .expect("moving")
        .checkpoint_request;
    c.ok(Command::RecordCheckpoint(CheckpointReport {
        job: ckpt.clone(),
        epoch,
        request,
        manifest: CheckpointManifest {
            path: "/ckpt/step-900".into(),
            step: 900,
            bytes: 1,
        },
    }));
    assert_eq!(c.round(), vec![ckpt.clone()]);
    assert!(!c.hosts_of(&ckpt).contains(&host));
    assert_eq!(c.job(&ckpt).restore_from(), Some("/ckpt/step-900"));

    // The other runs on until the deadline; then the leader's command stops it.
    assert!(!c.store.node_is_empty(&HostName::new(&host)));
    assert!(c.store.overdue_drains(deadline - 1).is_empty());
    let due = c.store.overdue_drains(deadline);
    assert_eq!(due.len(), 1);
    c.now = deadline;
    for command in due {
        c.ok(command);
    }
    assert_eq!(c.job(&plain).state, JobState::Pending);
    assert!(c.store.node_is_empty(&HostName::new(&host)));
    assert_eq!(c.round(), vec![plain.clone()]);
    assert!(!c.hosts_of(&plain).contains(&host));
    // Empty and draining: it can be removed.
    c.ok(Command::RemoveNode {
        node: HostName::new(&host),
        reason: "decommissioned".into(),
    });
}

/// The Raft log stores commands with bincode (no skipped fields, externally tagged enums): every
/// new command survives the trip, and so does a backup of a state holding fenced devices, a
/// repair under way, runs and a restart's backoff.
#[test]
fn device_commands_and_a_state_with_fences_survive_the_log_encoding() {
    let mut c = Cluster::with_hosts(2, 2);
    let job = c.submit(spec("ckpt", 1, 8, CHECKPOINTED));
    c.round();
    let host = c.hosts_of(&job).into_iter().next().unwrap();
    c.fence(&host, "2", true); // a repair migration waits for its checkpoint
    c.health("h1", 7, DeviceHealth::Degraded, "thermal throttling");
    let restart = "[restart]\nmax_restarts = 1\nbackoff = \"1s\"\n";
    let flaky = c.submit(spec("flaky", 1, 1, restart));
    c.round();
    c.run_all(&flaky);
    c.fail_task(&flaky, 0, 3);
    assert!(c.job(&job).migration.is_some());
    assert!(c.job(&flaky).resume.not_before_ms > 0);

    let commands = vec![
        Command::DeviceHealth(DeviceHealthReport {
            node: HostName::new("h1"),
            device: "GPU-h1-0".into(),
            health: DeviceHealth::Failed,
            cause: "XID 79".into(),
        }),
        Command::HealthCheck(HealthCheckReport {
            node: HostName::new("h1"),
            passed: false,
            failed_devices: vec!["GPU-h1-0".into()],
            detail: "dcgmi diag -r 1: fail".into(),
        }),
        Command::FenceDevice(DeviceFenceChange {
            node: HostName::new("h1"),
            device: "3".into(),
            fenced: true,
            reason: "suspect".into(),
        }),
        Command::RemoveNode {
            node: HostName::new("h2"),
            reason: "retired".into(),
        },
        Command::DrainDeadline {
            node: HostName::new("h2"),
        },
        Command::SetNodeState(NodeStateChange {
            node: HostName::new("h2"),
            state: NodeState::Draining,
            reason: "board swap".into(),
            grace_ms: Some(60_000),
        }),
        Command::Restore {
            state: Box::new(c.store.clone()),
            backup_revision: 9,
        },
    ];
    for cmd in commands {
        let bytes = bincode::serialize(&cmd).expect("encode");
        let back: Command =
            bincode::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", cmd.kind()));
        assert_eq!(back, cmd, "{}", cmd.kind());
    }
    // And the JSON snapshot round-trips with its indexes.
    let back = ClusterStore::from_snapshot(&c.snapshot()).expect("snapshot");
    assert_eq!(back, c.store);
}
