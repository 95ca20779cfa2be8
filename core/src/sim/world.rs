//! The simulated world around the replicated state: the simulator plays the leader (scheduling
//! rounds through [`run_round`]) and the workers (task and checkpoint reports), and every one of
//! their acts is the [`Command`] they would commit, applied through [`ClusterStore::apply`] at the
//! simulated time. The state machine decides; this file keeps the clock's events, what the trace
//! says each job needs (its work), and the metrics.
//!
//! A job's progress lives in the state too: a checkpoint's `step` is the milliseconds of work it
//! holds, and a new lease resumes from the job's last checkpoint (or from zero without one).

use super::clock::{Event, EventQueue};
use super::cluster_file::SimCluster;
use super::error::SimError;
use super::failures::{FailureCounters, FailureModel, GangFailure};
use super::metrics::{Counters, JobRecord as Record};
use super::replay::{DefragOptions, Domains, PreemptMode, ReplayOptions, SimJob};
use crate::engine::{
    run_round, DefragLimits, DeviceKind, GangPlacement, RoundInput, RoundOutcome, RoundState,
    SchedulerConfig,
};
use crate::state::{
    defragment_command, CheckpointManifest, CheckpointReport, ClusterStore, Command,
    DeviceFenceChange, DeviceHealth, DeviceHealthReport, DeviceInventory, Event as StateEvent,
    JobState, NodeRegistration, Response, Submission, TaskReport, TaskState,
};
use gangway_proto::ids::JobId;
use gangway_proto::spec::{CheckpointSpec, DeviceCount, JobSpec, Resources, TopologySpec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

/// Rounds run at most per instant (a round that preempts, or that hit the per-round cap, is
/// followed by another at the same instant).
const ROUNDS_PER_INSTANT: usize = 16;

/// The failing devices of a replay (`--failures`): a Poisson process over the cluster's GPUs
/// (each fails at rate 1 / MTBF while in service), drawn from a seeded ChaCha8 stream.
struct Failing {
    model: FailureModel,
    repair: bool,
    rng: ChaCha8Rng,
    /// Every GPU: (host index in the cluster file, device index).
    devices: Vec<(usize, u16)>,
    /// Per GPU: the slot in [`FailureCounters::fenced`] of its failure while it is out.
    down: Vec<Option<usize>>,
    /// Mean time between failures anywhere in the cluster (MTBF / GPUs).
    mean_gap_ms: f64,
    /// Whether the next failure is in the event queue.
    armed: bool,
    /// Repairs (unfences) in the event queue.
    repairs_pending: usize,
}

/// One lease of a job as the simulated workers run it.
#[derive(Clone, Copy, Debug)]
struct Run {
    epoch: u64,
    since_ms: u64,
    /// Work already done when the lease began (its restore point).
    from_ms: u64,
}

pub(super) struct World<'a> {
    pub store: ClusterStore,
    events: Vec<StateEvent>,
    pub queue: EventQueue,
    pub jobs: &'a [&'a SimJob],
    ids: Vec<Option<JobId>>,
    index: HashMap<JobId, usize>,
    pub records: Vec<Record>,
    pub counters: Counters,
    runs: Vec<Option<Run>>,
    /// Running gangs by start time, to know when the next one passes min-runtime.
    pub by_start: BTreeSet<(u64, usize)>,
    pub allocated: u64,
    /// Checkpoint requests already being answered.
    answering: BTreeSet<(usize, u64)>,
    /// Jobs the defragmenter moved (their checkpoint costs `checkpoint_ms`), and the gangs it
    /// freed a block for.
    moved: BTreeSet<usize>,
    freed_for: BTreeSet<usize>,
    defrag_tried: BTreeMap<JobId, u64>,
    base: SchedulerConfig,
    options: &'a ReplayOptions,
    cluster: &'a SimCluster,
    domains: Domains,
    /// Work a resubmitted job resumes from: the checkpoint its failed predecessor left (a
    /// training script reloads it). 0 for every job without failures.
    carried: Vec<u64>,
    /// Leases a device failure ended: their workers died with the device and send nothing more
    /// (a checkpoint or completion event of such a lease is dropped).
    dead: BTreeSet<(usize, u64)>,
    failing: Option<Failing>,
    pub failure_counters: FailureCounters,
    /// Per job: its gang failure not yet followed by a new start (index into `hits`).
    open_hit: Vec<Option<usize>>,
}

impl<'a> World<'a> {
    pub fn new(
        cluster: &'a SimCluster,
        jobs: &'a [&'a SimJob],
        base: SchedulerConfig,
        options: &'a ReplayOptions,
    ) -> Result<Self, SimError> {
        let mut world = Self {
            store: ClusterStore::new(),
            events: Vec::new(),
            queue: EventQueue::new(),
            jobs,
            ids: vec![None; jobs.len()],
            index: HashMap::with_capacity(jobs.len()),
            records: jobs
                .iter()
                .map(|j| Record {
                    submit_ms: j.submit_ms,
                    devices: j.devices(),
                    work_ms: j.duration_ms,
                    ..Record::default()
                })
                .collect(),
            counters: Counters::default(),
            runs: vec![None; jobs.len()],
            by_start: BTreeSet::new(),
            allocated: 0,
            answering: BTreeSet::new(),
            moved: BTreeSet::new(),
            freed_for: BTreeSet::new(),
            defrag_tried: BTreeMap::new(),
            base,
            options,
            cluster,
            domains: Domains::new(cluster),
            carried: vec![0; jobs.len()],
            dead: BTreeSet::new(),
            failing: options.failures.as_ref().map(|f| {
                let devices: Vec<(usize, u16)> = cluster
                    .hosts
                    .iter()
                    .enumerate()
                    .flat_map(|(h, host)| (0..host.devices.len() as u16).map(move |d| (h, d)))
                    .collect();
                Failing {
                    model: f.model.clone(),
                    repair: f.repair,
                    rng: ChaCha8Rng::seed_from_u64(f.model.seed),
                    down: vec![None; devices.len()],
                    mean_gap_ms: f.model.mtbf_hours * 3_600_000.0 / devices.len().max(1) as f64,
                    devices,
                    armed: false,
                    repairs_pending: 0,
                }
            }),
            failure_counters: FailureCounters::default(),
            open_hit: vec![None; jobs.len()],
        };
        world.register_cluster(jobs.first().map_or(0, |j| j.submit_ms))?;
        Ok(world)
    }

    fn apply(&mut self, now: u64, command: Command) -> Response {
        self.events.clear();
        self.store.apply(now, command, &mut self.events)
    }

    /// Every host registers as its worker would, and every queue is set as an operator would.
    fn register_cluster(&mut self, now: u64) -> Result<(), SimError> {
        let kinds: BTreeMap<&str, (DeviceKind, u64)> = self
            .cluster
            .models
            .iter()
            .map(|m| (m.name.as_str(), (m.kind, m.memory_mib)))
            .collect();
        for h in &self.cluster.hosts {
            let devices = h
                .devices
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let (kind, memory_mib) = kinds
                        .get(d.model.as_str())
                        .copied()
                        .unwrap_or((DeviceKind::Gpu, 0));
                    DeviceInventory {
                        uuid: format!("{}-{i}", h.name),
                        model: d.model.clone(),
                        kind,
                        memory_mib,
                        nvlink_domain: d.nvlink_domain,
                    }
                })
                .collect();
            let registration = NodeRegistration {
                name: h.name.clone(),
                address: format!("{}:0", h.name),
                topology: h.topology.clone(),
                cpu_milli: h.cpu_milli,
                memory_mib: h.memory_mib,
                devices,
            };
            if let Response::Rejected(why) = self.apply(now, Command::RegisterNode(registration)) {
                return Err(SimError::Invariant(format!(
                    "host {} refused: {why}",
                    h.name
                )));
            }
        }
        for q in self.cluster.queues.values() {
            if let Response::Rejected(why) = self.apply(now, Command::SetQueue(q.clone())) {
                return Err(SimError::Invariant(format!(
                    "queue {} refused: {why}",
                    q.name
                )));
            }
        }
        Ok(())
    }

    /// The job a client submits for trace job `i`.
    fn spec(&self, i: usize) -> JobSpec {
        let j = self.jobs[i];
        let checkpoint_ms = self
            .options
            .defrag
            .as_ref()
            .map_or(60_000, |d| d.checkpoint_ms);
        JobSpec {
            name: j.name.clone(),
            queue: j.queue.clone(),
            priority: j.priority,
            tasks: j.tasks,
            command: vec!["simulated".to_owned()],
            env: BTreeMap::new(),
            secret_env: BTreeMap::new(),
            resources: Resources {
                devices: DeviceCount::Whole(j.devices_per_task),
                kind: DeviceKind::Gpu,
                models: Vec::new(),
                cpu_milli: 0,
                memory_mib: 0,
            },
            topology: TopologySpec {
                required: j.required,
                preferred: j.preferred,
            },
            checkpoint: (self.options.preempt == PreemptMode::Resume).then(|| CheckpointSpec {
                signal: "SIGUSR1".to_owned(),
                timeout: Duration::from_millis(checkpoint_ms.max(1)),
            }),
            estimated_runtime: Some(Duration::from_millis(j.duration_ms)),
            restart: Default::default(),
        }
    }

    pub fn submit(&mut self, now: u64, i: usize) -> Result<(), SimError> {
        let command = Command::SubmitJob(Submission {
            owner: String::new(),
            idempotency_key: None,
            spec: self.spec(i),
        });
        match self.apply(now, command) {
            Response::Submitted { job, .. } => {
                self.index.insert(job.clone(), i);
                self.ids[i] = Some(job);
                Ok(())
            }
            other => Err(SimError::Invariant(format!(
                "job {} refused at submit: {other:?}",
                self.jobs[i].name
            ))),
        }
    }

    fn id(&self, i: usize) -> JobId {
        self.ids[i]
            .clone()
            .expect("events name submitted jobs only")
    }

    /// Every task of the gang reports success, as its workers would.
    /// Every task of the gang succeeds; false when that lease had already ended (the state
    /// refuses its reports and nothing changes).
    pub fn complete(&mut self, now: u64, i: usize, epoch: u64) -> bool {
        // Only the workers of the lease that runs report: those of an ended lease are gone.
        if self.runs[i].map(|r| r.epoch) != Some(epoch) {
            return false;
        }
        let done = self.report_all(now, i, epoch, TaskState::Succeeded);
        if done {
            self.observe(now, i);
        }
        done
    }

    /// Rank 0 answers a checkpoint request, as its worker would; false when the state refused it.
    pub fn checkpoint(&mut self, now: u64, i: usize, epoch: u64, request: u64, step: u64) -> bool {
        if self.dead.contains(&(i, epoch)) {
            return false;
        }
        let report = CheckpointReport {
            job: self.id(i),
            epoch,
            request,
            manifest: CheckpointManifest {
                path: format!("sim://{}/{step}", self.jobs[i].name),
                step,
                bytes: 0,
            },
        };
        let accepted = self.apply(now, Command::RecordCheckpoint(report)) == Response::Done;
        self.observe(now, i);
        accepted
    }

    /// Brings the simulated workers in line with the state for job `i`: a new lease starts its
    /// run, an ended lease stops it, a checkpoint request is answered (after the checkpoint time).
    fn observe(&mut self, now: u64, i: usize) {
        let Some(job) = self.ids[i].as_ref().and_then(|id| self.store.job(id)) else {
            return;
        };
        let lease = job.lease.as_ref().map(|l| l.epoch);
        let migration = job.migration.as_ref().map(|m| m.checkpoint_request);
        let restored = job
            .last_checkpoint
            .as_ref()
            .map_or(self.carried[i], |c| c.manifest.step);
        let finished = job.state == JobState::Succeeded;
        let placement = job.lease.as_ref().map(|l| l.placement.clone());
        match (self.runs[i], lease) {
            (Some(run), Some(epoch)) if run.epoch == epoch => {
                if let Some(request) = migration {
                    self.answer_later(now, i, run, request);
                }
            }
            (Some(run), _) => {
                self.end_run(i, run);
                if finished {
                    self.records[i].completed_ms = Some(now);
                }
                if let (Some(epoch), Some(p)) = (lease, placement) {
                    self.start_run(now, i, epoch, restored, &p);
                }
            }
            (None, Some(epoch)) => {
                if let Some(p) = placement {
                    self.start_run(now, i, epoch, restored, &p);
                }
            }
            (None, None) => {}
        }
    }

    fn answer_later(&mut self, now: u64, i: usize, run: Run, request: u64) {
        if !self.answering.insert((i, request)) {
            return;
        }
        let delay = match &self.options.defrag {
            Some(d) if self.moved.contains(&i) => d.checkpoint_ms,
            _ => 0,
        };
        let step = run.from_ms + (now - run.since_ms);
        let event = Event::Checkpoint {
            job: i,
            epoch: run.epoch,
            request,
            step: step.min(self.jobs[i].duration_ms),
        };
        self.queue.push(now + delay, event);
    }

    fn start_run(
        &mut self,
        now: u64,
        i: usize,
        epoch: u64,
        from_ms: u64,
        placement: &GangPlacement,
    ) {
        let from_ms = from_ms.min(self.jobs[i].duration_ms);
        self.runs[i] = Some(Run {
            epoch,
            since_ms: now,
            from_ms,
        });
        self.by_start.insert((now, i));
        self.allocated += self.records[i].devices;
        self.records[i].first_start_ms.get_or_insert(now);
        self.counters.gangs_placed += 1;
        let within = self.jobs[i]
            .required
            .is_none_or(|level| self.domains.within(self.cluster, placement, level));
        if !within {
            self.counters.gangs_outside_required_domain += 1;
        }
        if self.freed_for.remove(&i) {
            self.counters.defrag_placements += 1;
        }
        let remaining = self.jobs[i].duration_ms - from_ms;
        self.queue
            .push(now + remaining, Event::Completion { job: i, epoch });
        if let Some(k) = self.open_hit[i].take() {
            let hit = &mut self.failure_counters.hits[k];
            hit.back_at_ms = Some(now);
            hit.devices_after = Some(devices_of(placement));
        }
        self.next_periodic_checkpoint(now, i, epoch, from_ms);
        self.report_all(now, i, epoch, TaskState::Running);
    }

    /// Every task of the gang reports `state` under lease `epoch`, as its workers would; false
    /// when the state refused (the lease ended meanwhile).
    fn report_all(&mut self, now: u64, i: usize, epoch: u64, state: TaskState) -> bool {
        let job = self.id(i);
        for task in 0..self.jobs[i].tasks {
            let report = TaskReport {
                job: job.clone(),
                task,
                epoch,
                state,
                exit_code: (state == TaskState::Succeeded).then_some(0),
                message: String::new(),
            };
            if let Response::Rejected(_) = self.apply(now, Command::TaskStatus(report)) {
                return false;
            }
        }
        true
    }

    fn end_run(&mut self, i: usize, run: Run) {
        self.runs[i] = None;
        self.by_start.remove(&(run.since_ms, i));
        self.allocated -= self.records[i].devices;
        self.moved.remove(&i);
    }

    /// Rounds at this instant: each is [`run_round`] on the state, committed as the leader
    /// would commit it.
    pub fn schedule(&mut self, now: u64) -> Result<(), SimError> {
        for _ in 0..ROUNDS_PER_INSTANT {
            let defrag_on = self.options.defrag.is_some();
            let read = self.store.round_input(defrag_on);
            if read.pending.is_empty() {
                break;
            }
            let config = self.store.scheduler_config(&self.base);
            let limits = self.defrag_limits(now, &read.state);
            let outcome = run_round(RoundInput {
                view: self.store.engine(),
                pending: &read.pending,
                reasons: read.reasons,
                config: &config,
                state: &read.state,
                defrag: limits.as_ref(),
                now_ms: now,
            });
            self.counters.scheduling_rounds += 1;
            let capped = read.pending.len() > config.max_gangs_per_round;
            let (placed, preempted) = self.commit(now, outcome)?;
            if preempted == 0 && !(placed > 0 && capped) {
                break;
            }
        }
        Ok(())
    }

    /// The defragmenter's limits now: the churn bound (one migration per so many allocated
    /// device-hours, plus a burst) as the moves left, gangs tried recently skipped.
    fn defrag_limits(&self, now: u64, state: &RoundState) -> Option<DefragLimits> {
        let d: &DefragOptions = self.options.defrag.as_ref()?;
        let allowed = (self.counters.allocated_device_ms as f64
            / 3_600_000.0
            / d.device_hours_per_migration) as u64
            + d.burst;
        let left =
            usize::try_from(allowed.saturating_sub(self.counters.migrations)).unwrap_or(usize::MAX);
        Some(DefragLimits {
            budget: d.budget.clone(),
            max_in_flight: state.migrating.len().saturating_add(left),
            device_hours_left: f64::INFINITY,
            gangs_per_round: d.gangs_per_round,
            min_gang_devices: d.min_gang_devices,
            skip: self
                .defrag_tried
                .iter()
                .filter(|(_, t)| now < **t + d.retry_ms)
                .map(|(j, _)| j.clone())
                .collect(),
            reservation_ms: d.reservation_ms,
            max_plans: 1,
        })
    }

    /// Commits a round's outcome: the plan, then a defragmentation proposal. Returns how many
    /// gangs were placed and preempted.
    fn commit(&mut self, now: u64, outcome: RoundOutcome) -> Result<(usize, usize), SimError> {
        for job in &outcome.defrag_tried {
            self.defrag_tried.insert(job.clone(), now);
            self.counters.defrag_attempts += 1;
        }
        let (mut placed, mut preempted) = (0, 0);
        let plan = outcome.plan;
        if !(plan.placements.is_empty() && plan.preemptions.is_empty() && plan.pending.is_empty()) {
            let rejected_before = plan.placements.len();
            let Response::PlanApplied {
                placed: ok,
                preempted: victims,
                ..
            } = self.apply(now, Command::ApplyPlan { plan })
            else {
                return Err(SimError::Invariant("ApplyPlan answered otherwise".into()));
            };
            self.counters.placements_rejected += (rejected_before - ok.len()) as u64;
            for victim in &victims {
                self.preempted(now, victim);
            }
            for (job, _) in &ok {
                if let Some(&i) = self.index.get(job) {
                    self.observe(now, i);
                }
            }
            (placed, preempted) = (ok.len(), victims.len());
        }
        for proposal in &outcome.defrag {
            self.defragment(now, proposal);
        }
        Ok((placed, preempted))
    }

    fn preempted(&mut self, now: u64, victim: &JobId) {
        let Some(&v) = self.index.get(victim) else {
            return;
        };
        self.counters.preemptions += 1;
        if let Some(run) = self.runs[v] {
            let ran = now - run.since_ms;
            self.counters.lost_device_ms += u128::from(ran) * u128::from(self.records[v].devices);
        }
        self.observe(now, v);
    }

    fn defragment(&mut self, now: u64, proposal: &crate::engine::DefragProposal) {
        if self.apply(now, defragment_command(proposal)) != Response::Done {
            return;
        }
        let checkpoint_ms = self.options.defrag.as_ref().map_or(0, |d| d.checkpoint_ms);
        if let Some(&i) = self.index.get(&proposal.plan.for_gang) {
            self.freed_for.insert(i);
        }
        for m in &proposal.plan.moves {
            let Some(&v) = self.index.get(&m.job) else {
                continue;
            };
            self.counters.migrations += 1;
            self.counters.migration_device_ms += u128::from(m.devices) * u128::from(checkpoint_ms);
            self.moved.insert(v);
            self.observe(now, v);
        }
    }

    /// With `--checkpoint-interval`, rank 0 of a checkpointable job writes a checkpoint every
    /// interval of its lease; the first at `interval` after the lease began from `from_ms`. None
    /// when the job ends first.
    fn next_periodic_checkpoint(&mut self, now: u64, i: usize, epoch: u64, from_ms: u64) {
        let Some(interval) = self.options.checkpoint_interval_ms.filter(|&v| v > 0) else {
            return;
        };
        if self.options.preempt != PreemptMode::Resume {
            return;
        }
        let step = from_ms + interval;
        if step < self.jobs[i].duration_ms {
            let event = Event::Checkpoint {
                job: i,
                epoch,
                request: 0,
                step,
            };
            self.queue.push(now + interval, event);
        }
    }

    /// A periodic checkpoint (request 0: no one asked for it) of lease `epoch` is written, if
    /// that lease still runs; the next one is due an interval later. Changes nothing a round
    /// looks at.
    pub fn periodic_checkpoint(&mut self, now: u64, i: usize, epoch: u64, step: u64) -> bool {
        if self.runs[i].map(|r| r.epoch) != Some(epoch) {
            return false;
        }
        let report = CheckpointReport {
            job: self.id(i),
            epoch,
            request: 0,
            manifest: CheckpointManifest {
                path: format!("sim://{}/{step}", self.jobs[i].name),
                step,
                bytes: 0,
            },
        };
        if self.apply(now, Command::RecordCheckpoint(report)) == Response::Done {
            self.next_periodic_checkpoint(now, i, epoch, step);
        }
        false
    }

    /// Draws the next device failure when none is queued and something is still to happen
    /// (gangs run, or events other than repairs wait): failures stop once the replay has
    /// nothing left but repairs (one drawn before and due after is dropped).
    pub fn arm_failures(&mut self, now: u64) {
        let queued = self.queue.len();
        let busy = self.allocated > 0;
        let Some(f) = self.failing.as_mut() else {
            return;
        };
        if f.armed || !(busy || queued > f.repairs_pending) {
            return;
        }
        let u: f64 = f.rng.random_range(f64::EPSILON..1.0);
        let gap = (-f.mean_gap_ms * u.ln()).round().max(1.0) as u64;
        let device = f.rng.random_range(0..f.devices.len().max(1));
        f.armed = true;
        self.queue
            .push(now.saturating_add(gap), Event::DeviceFailure { device });
    }

    /// GPU `d` fails: the agent reports it (`DeviceHealth` failed: the state fences it and
    /// repairs the gang on it). Without repair, the rank on it dies first and, the device not yet
    /// fenced, the job fails as on a scheduler that does not repair; a person resubmits it
    /// later. A GPU already out does not fail again (the process runs in service time only).
    pub fn device_failure(&mut self, now: u64, d: usize) -> Result<bool, SimError> {
        let (queued, busy) = (self.queue.len(), self.allocated > 0);
        let f = self
            .failing
            .as_mut()
            .expect("failure events only with failures on");
        f.armed = false;
        // Drawn while work was left, due once the replay has nothing but repairs to do: past
        // the end, not a failure of the replay.
        let over = !busy && queued <= f.repairs_pending;
        if over || d >= f.devices.len() || f.down[d].is_some() {
            return Ok(false);
        }
        let (h, index) = f.devices[d];
        let (repair, repair_ms, resubmit_ms) =
            (f.repair, f.model.repair_ms(), f.model.resubmit_ms());
        f.down[d] = Some(self.failure_counters.fenced.len());
        f.repairs_pending += 1;
        self.failure_counters.fenced.push((now, None));
        self.failure_counters.device_failures += 1;
        self.queue.push(
            now.saturating_add(repair_ms),
            Event::DeviceRepaired { device: d },
        );
        let host = self.cluster.hosts[h].name.clone();
        let uuid = format!("{host}-{index}");
        let holder = self.store.engine().running().iter().find_map(|(id, g)| {
            let task = g
                .placement
                .tasks
                .iter()
                .position(|t| t.host == host && t.devices.iter().any(|x| x.index == index))?;
            Some((*self.index.get(id)?, task as u32, devices_of(&g.placement)))
        });
        let hit = holder.and_then(|(i, task, before)| Some((i, task, before, self.runs[i]?)));
        if let (Some((i, task, _, run)), false) = (&hit, repair) {
            let report = TaskReport {
                job: self.id(*i),
                task: *task,
                epoch: run.epoch,
                state: TaskState::Failed,
                exit_code: Some(1),
                message: format!("CUDA error: device {uuid} fell off the bus (XID 79)"),
            };
            if let Response::Rejected(why) = self.apply(now, Command::TaskStatus(report)) {
                return Err(SimError::Invariant(format!(
                    "failure report refused: {why}"
                )));
            }
        }
        let report = DeviceHealthReport {
            node: host.clone(),
            device: uuid,
            health: DeviceHealth::Failed,
            cause: "XID 79: GPU fell off the bus (simulated failure)".into(),
        };
        if let Response::Rejected(why) = self.apply(now, Command::DeviceHealth(report)) {
            return Err(SimError::Invariant(format!(
                "device failure refused: {why}"
            )));
        }
        let Some((i, _, before, run)) = hit else {
            return Ok(true);
        };
        let job = self.store.job(&self.id(i)).expect("submitted job");
        if job.lease.as_ref().map(|l| l.epoch) == Some(run.epoch) {
            return Err(SimError::Invariant(format!(
                "job {} kept its lease on a failed device",
                self.jobs[i].name
            )));
        }
        let restore = job
            .last_checkpoint
            .as_ref()
            .map_or(self.carried[i], |c| c.manifest.step);
        let progress = (run.from_ms + (now - run.since_ms)).min(self.jobs[i].duration_ms);
        let lost_ms = progress.saturating_sub(restore);
        self.failure_counters.lost_device_ms +=
            u128::from(lost_ms) * u128::from(self.records[i].devices);
        if !repair {
            self.carried[i] = restore;
            self.queue
                .push(now.saturating_add(resubmit_ms), Event::Resubmit { job: i });
        }
        self.open_hit[i] = Some(self.failure_counters.hits.len());
        self.failure_counters.hits.push(GangFailure {
            at_ms: now,
            host: host.to_string(),
            device: index,
            job: self.jobs[i].name.clone(),
            devices_before: before,
            lost_ms,
            back_at_ms: None,
            devices_after: None,
        });
        self.dead.insert((i, run.epoch));
        self.observe(now, i);
        Ok(true)
    }

    /// GPU `d`, out since its failure, is back: an operator unfences it (`FenceDevice` with
    /// `fenced = false`).
    pub fn device_repaired(&mut self, now: u64, d: usize) -> Result<bool, SimError> {
        let f = self
            .failing
            .as_mut()
            .expect("repair events only with failures on");
        let Some(slot) = f.down[d].take() else {
            return Ok(false);
        };
        f.repairs_pending -= 1;
        self.failure_counters.fenced[slot].1 = Some(now);
        let (h, index) = f.devices[d];
        let change = DeviceFenceChange {
            node: self.cluster.hosts[h].name.clone(),
            device: format!("{}-{index}", self.cluster.hosts[h].name),
            fenced: false,
            reason: "repaired (simulated)".into(),
        };
        match self.apply(now, Command::FenceDevice(change)) {
            Response::Done => Ok(true),
            other => Err(SimError::Invariant(format!("unfence refused: {other:?}"))),
        }
    }

    /// A person resubmits job `i` after its gang failed without repair: a new job (same spec)
    /// that resumes from the checkpoint its predecessor left.
    pub fn resubmit(&mut self, now: u64, i: usize) -> Result<bool, SimError> {
        self.failure_counters.resubmissions += 1;
        self.submit(now, i)?;
        Ok(true)
    }

    /// Repairs the state machine made: the sum of its jobs' `repairs`.
    pub fn state_repairs(&self) -> u64 {
        self.ids
            .iter()
            .flatten()
            .filter_map(|id| self.store.job(id))
            .map(|j| u64::from(j.repairs))
            .sum()
    }

    /// Whatever still waits once nothing runs and nothing else arrives: its reason's code.
    pub fn stuck(&self, now: u64) -> Vec<(usize, String)> {
        let pending = self.store.round_input(false).pending;
        if pending.is_empty() {
            return Vec::new();
        }
        let config = self.store.scheduler_config(&self.base);
        let outcome = run_round(RoundInput {
            view: self.store.engine(),
            pending: &pending,
            reasons: &[],
            config: &config,
            state: &RoundState::default(),
            defrag: None,
            now_ms: now,
        });
        let codes: HashMap<&JobId, String> = outcome
            .plan
            .pending
            .iter()
            .map(|p| {
                let code = serde_json::to_value(&p.reason)
                    .ok()
                    .and_then(|v| match v {
                        serde_json::Value::String(s) => Some(s),
                        v => v.as_object()?.keys().next().cloned(),
                    })
                    .unwrap_or_else(|| "unknown".into());
                (&p.job, code)
            })
            .collect();
        pending
            .iter()
            .filter_map(|g| {
                let i = *self.index.get(&g.id)?;
                let code = codes
                    .get(&g.id)
                    .cloned()
                    .unwrap_or_else(|| "not_examined".into());
                Some((i, code))
            })
            .collect()
    }
}

/// Every device (host, index) of a placement.
fn devices_of(placement: &GangPlacement) -> Vec<(String, u16)> {
    placement
        .tasks
        .iter()
        .flat_map(|t| t.devices.iter().map(|d| (t.host.to_string(), d.index)))
        .collect()
}
