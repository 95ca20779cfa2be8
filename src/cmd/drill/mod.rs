//! `gangway drill transfer-leader|kill-leader|partition-leader`: a failover on a live cluster,
//! measured and checked.
//!
//! Each drill records the leases and jobs, checks that a probe job gets placed (the baseline), starts
//! a small probe write load, injects the fault on the leader, and measures the time to a new
//! leader, the time until a probe submitted after the fault is placed, and the time until the old
//! leader follows the new one again. Then it compares the leases: none may be lost or held twice,
//! and no job's tasks may have been started again. The report is a text summary or `-o json`; the
//! exit code is 1 when the drill found a problem or the cluster did not recover within --timeout.
//!
//! kill-leader and partition-leader need replicas that allow drills (`allow_drills = true`); they
//! are checked before anything starts. kill-leader needs a supervisor that restarts the aborted
//! replica (systemd `Restart=on-failure`, compose `restart: on-failure`, `gangway dev`).

mod members;
mod probe;
mod report;

use super::common::{parse_duration, ClientOpts};
use super::output::{to_json, Output};
use crate::client::{normalize_addr, Client, ClientError};
use clap::{Args, Subcommand};
use gangway_proto::pb;
use indicatif::{ProgressBar, ProgressStyle};
use members::Members;
use probe::{Budget, Placement, Probes};
use report::{compare, report_text, DrillReport, Event, LeaseSnapshot};
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Longest partition a drill may ask for (the server enforces the same bound).
const MAX_PARTITION: Duration = Duration::from_secs(600);
/// Longest wait for the baseline probe's placement.
const BASELINE_MAX: Duration = Duration::from_secs(10);
/// How often the drill polls the replicas while it waits.
const POLL: Duration = Duration::from_millis(50);
/// How often the drill asks the replicas for a new leader after the fault. The report's time to
/// a new leader is when one was first seen, so this bounds how late that can be: at `POLL` it
/// was seen after the first placement in 2 of 6 partition drills (by 8-32 ms).
const LEADER_POLL: Duration = Duration::from_millis(10);

#[derive(Args, Debug)]
pub struct DrillGroup {
    #[command(subcommand)]
    pub command: DrillCommand,
    #[command(flatten)]
    pub opts: ClientOpts,
    /// Queue the drill's probe jobs go to (CPU-only, lowest priority, cancelled afterwards).
    #[arg(long, global = true, default_value = "default", value_name = "QUEUE")]
    pub probe_queue: String,
}

/// The commands say what happens to the leader, hence one suffix for all.
#[allow(clippy::enum_variant_names)]
#[derive(Subcommand, Debug)]
pub enum DrillCommand {
    /// Hand leadership to another voter (a planned failover) and measure it.
    TransferLeader(TransferArgs),
    /// Abort the leader's process as a crash would; its supervisor must restart it.
    KillLeader,
    /// Drop all of the leader's Raft traffic for a while; it heals by itself.
    PartitionLeader(PartitionArgs),
}

#[derive(Args, Debug)]
pub struct TransferArgs {
    /// The voter to hand leadership to (default: the most caught-up other voter).
    #[arg(long, value_name = "ID")]
    pub to: Option<u64>,
}

#[derive(Args, Debug)]
pub struct PartitionArgs {
    /// How long the leader stays cut off (up to 10m).
    #[arg(long = "for", value_name = "DURATION", default_value = "10s", value_parser = parse_partition)]
    pub duration: Duration,
}

fn parse_partition(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d > MAX_PARTITION {
        return Err(format!(
            "{s:?} is longer than the longest partition a drill may ask for (10m)"
        ));
    }
    Ok(d)
}

/// The fault a drill injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Transfer(Option<u64>),
    Kill,
    Partition(Duration),
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Transfer(_) => "transfer-leader",
            Kind::Kill => "kill-leader",
            Kind::Partition(_) => "partition-leader",
        }
    }
}

/// The spinner on stderr while a drill runs: the phase and the probe writes so far. Hidden when
/// stdout or stderr is not a terminal, and with `-o json`.
struct Progress {
    bar: ProgressBar,
    phase: Arc<Mutex<String>>,
}

impl Progress {
    fn new(output: Output) -> Self {
        let visible = output == Output::Table
            && std::io::stdout().is_terminal()
            && std::io::stderr().is_terminal();
        let bar = if visible {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed}] {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        } else {
            ProgressBar::hidden()
        };
        Self {
            bar,
            phase: Arc::default(),
        }
    }

    fn phase(&self, text: impl Into<String>) {
        let text = text.into();
        self.bar.set_message(text.clone());
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = text;
    }

    /// Keeps the probe write counts beside the phase until the bar is finished.
    fn follow(&self, probes: Arc<Probes>) {
        if self.bar.is_hidden() {
            return;
        }
        let (bar, phase) = (self.bar.clone(), self.phase.clone());
        tokio::spawn(async move {
            while !bar.is_finished() {
                let w = probes.stats();
                let p = phase.lock().unwrap_or_else(|p| p.into_inner()).clone();
                bar.set_message(format!(
                    "{p}  (probe writes: {} ok, {} failed attempts)",
                    w.acknowledged, w.failed_attempts
                ));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// What to undo when a drill is interrupted or fails half-way: a partition under way, probe jobs.
#[derive(Default)]
struct Undo {
    partition: Mutex<Option<(Arc<Members>, u64)>>,
    probes: Mutex<Option<Arc<Probes>>>,
}

impl Undo {
    /// Best effort, each step bounded by `timeout`.
    async fn run(&self, timeout: Duration) {
        let partition = self
            .partition
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((members, id)) = partition {
            let heal = pb::DrillRequest {
                action: pb::DrillAction::Heal.into(),
                ..Default::default()
            };
            if let Err(e) = members.drill(id, heal, timeout).await {
                eprintln!("warning: could not heal replica {id} (it heals by itself when the partition's time is up): {e}");
            }
        }
        let probes = self.probes.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(p) = probes {
            match p.cleanup(Instant::now() + timeout).await {
                Ok((left, _)) if !left.is_empty() => eprintln!(
                    "warning: probe jobs left behind, cancel them by hand: {}",
                    left.join(", ")
                ),
                Ok(_) => {}
                Err(e) => eprintln!("warning: could not list the probe jobs to cancel them: {e}"),
            }
        }
    }
}

/// `gangway drill ...`.
pub async fn drill(group: DrillGroup) -> Result<(), ClientError> {
    let kind = match group.command {
        DrillCommand::TransferLeader(a) => Kind::Transfer(a.to),
        DrillCommand::KillLeader => Kind::Kill,
        DrillCommand::PartitionLeader(a) => Kind::Partition(a.duration),
    };
    let opts = group.opts;
    let progress = Progress::new(opts.output);
    let undo = Undo::default();
    let result = tokio::select! {
        r = run(kind, &opts, &group.probe_queue, &progress, &undo) => r,
        _ = tokio::signal::ctrl_c() => Err(ClientError::Other(
            "drill interrupted; any partition it started was healed and its probe jobs cancelled"
                .into(),
        )),
    };
    if result.is_err() {
        progress.phase("undoing: healing and cancelling probe jobs");
        undo.run(opts.timeout).await;
    }
    progress.finish();
    let report = result?;
    match opts.output {
        Output::Table => println!("{}", report_text(&report)),
        Output::Json => println!("{}", to_json(&report, false)),
    }
    if report.passed {
        Ok(())
    } else {
        Err(ClientError::Other(format!(
            "drill failed: {}",
            if report.problems.is_empty() {
                "the cluster did not recover".to_owned()
            } else {
                report.problems.join("; ")
            }
        )))
    }
}

/// The leader's own `ClusterStatus`, found through any replica.
async fn find_leader(opts: &ClientOpts) -> Result<pb::ClusterStatusReply, ClientError> {
    let deadline = Instant::now() + opts.timeout;
    let mut client = opts.client();
    let mut last = String::from("no replica answered");
    while Instant::now() < deadline {
        let s = client.cluster_status().await?;
        if s.role == "leader" {
            return Ok(s);
        }
        if let Ok(addr) = normalize_addr(&s.leader_address) {
            let mut direct = Client::new(vec![addr], Duration::from_secs(2));
            if let Ok(l) = direct.cluster_status().await {
                if l.role == "leader" {
                    return Ok(l);
                }
            }
        }
        last = format!(
            "replica {} knows no confirmed leader (role {})",
            s.replica_id, s.role
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(ClientError::Other(format!(
        "no leader found within {}: {last}",
        humantime::format_duration(opts.timeout)
    )))
}

/// Leases and jobs as the leader lists them.
async fn snapshot(client: &mut Client) -> Result<LeaseSnapshot, ClientError> {
    let jobs = client.list_jobs(&[], "", false, None).await?;
    let leases = client.list_leases().await?;
    Ok(LeaseSnapshot::from_lists(&jobs, &leases))
}

/// The voter a transfer goes to: the one asked for (checked), or the most caught-up other voter.
fn transfer_target(
    status: &pb::ClusterStatusReply,
    voters: &[u64],
    to: Option<u64>,
) -> Result<u64, ClientError> {
    let old = status.replica_id;
    if let Some(to) = to {
        if to == old {
            return Err(ClientError::Usage(format!(
                "--to {to}: replica {to} already leads; name another voter"
            )));
        }
        if !voters.contains(&to) {
            return Err(ClientError::Usage(format!(
                "--to {to}: replica {to} is not a voter (voters: {voters:?})"
            )));
        }
        return Ok(to);
    }
    status
        .members
        .iter()
        .filter(|m| m.id != old && voters.contains(&m.id))
        .max_by_key(|m| (m.matched_index, std::cmp::Reverse(m.id)))
        .map(|m| m.id)
        .ok_or_else(|| {
            ClientError::Usage("the cluster has no other voter to hand leadership to".into())
        })
}

/// The leadership a drill starts from.
#[derive(Clone, Copy, Debug)]
struct Before {
    leader: u64,
    term: u64,
    /// When the leader's process started: a restarted leader reports another time.
    started_at_ms: u64,
}

/// A leader after the fault, as it answered itself.
#[derive(Clone, Debug, PartialEq, Eq)]
struct LeaderView {
    id: u64,
    term: u64,
    commit_index: u64,
}

/// The leadership that followed the fault, among the replicas answering that they lead: a leader
/// of a newer term, or the old leader's restarted process leading again (a supervisor that
/// restarts a crashed leader within the election timeout gets it back in the same term). The old
/// process still claiming its old term is not one, and `except` is never one (the replica cut off
/// by a partition). The newest term wins.
fn newer_leader(
    answers: &[pb::ClusterStatusReply],
    before: Before,
    except: Option<u64>,
) -> Option<LeaderView> {
    answers
        .iter()
        .filter(|s| s.role == "leader" && Some(s.replica_id) != except)
        .filter(|s| {
            s.term > before.term
                || (s.replica_id == before.leader && s.started_at_ms != before.started_at_ms)
        })
        .max_by_key(|s| s.term)
        .map(|s| LeaderView {
            id: s.replica_id,
            term: s.term,
            commit_index: s.commit_index,
        })
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Instants of the drill's moments, turned into the timeline once the fault's moment is known.
#[derive(Default)]
struct Timeline(Vec<(Instant, String)>);

impl Timeline {
    fn add(&mut self, what: impl Into<String>) {
        self.0.push((Instant::now(), what.into()));
    }

    fn relative_to(self, origin: Instant) -> Vec<Event> {
        self.0
            .into_iter()
            .map(|(at, what)| Event {
                at_ms: if at >= origin {
                    ms(at - origin) as i64
                } else {
                    -(ms(origin - at) as i64)
                },
                what,
            })
            .collect()
    }
}

async fn run(
    kind: Kind,
    opts: &ClientOpts,
    probe_queue: &str,
    progress: &Progress,
    undo: &Undo,
) -> Result<DrillReport, ClientError> {
    let timeout = opts.timeout;
    let mut timeline = Timeline::default();
    let mut report = DrillReport {
        drill: kind.name().to_owned(),
        ..DrillReport::default()
    };

    // Who leads, and who else is there.
    progress.phase("finding the leader");
    let status = find_leader(opts).await?;
    let members = Arc::new(Members::from_status(&status)?);
    let old = status.replica_id;
    let voters = members.voters();
    report.old_leader = old;
    report.old_leader_address = members.address(old);
    report.term_before = status.term;
    let before_leadership = Before {
        leader: old,
        term: status.term,
        started_at_ms: status.started_at_ms,
    };
    let target = match kind {
        Kind::Transfer(to) => Some(transfer_target(&status, &voters, to)?),
        Kind::Kill | Kind::Partition(_) if voters.len() < 3 => {
            return Err(ClientError::Usage(format!(
                "{} needs at least 3 voters so the others keep a quorum; this cluster has {}",
                kind.name(),
                voters.len()
            )))
        }
        _ => None,
    };
    // A drill the replica refuses must fail before anything else happens: HEAL changes nothing
    // but is refused exactly like the real fault would be.
    if matches!(kind, Kind::Kill | Kind::Partition(_)) {
        progress.phase(format!("checking that replica {old} allows drills"));
        let heal = pb::DrillRequest {
            action: pb::DrillAction::Heal.into(),
            ..Default::default()
        };
        members.drill(old, heal, timeout).await?;
    }

    // Before: the leases, and whether a probe job gets placed at all.
    progress.phase("recording leases and jobs");
    let mut client = Client::new(members.client_addrs(), timeout);
    let before = snapshot(&mut client).await?;
    timeline.add(format!(
        "replica {old} leads (term {}); {} leases recorded",
        status.term,
        before.leases.len()
    ));
    let run_id = format!("{:08x}", rand::random::<u32>());
    let probes = Arc::new(Probes::new(
        run_id,
        probe_queue.to_owned(),
        members.client_addrs(),
    ));
    *undo.probes.lock().unwrap_or_else(|p| p.into_inner()) = Some(probes.clone());
    progress.follow(probes.clone());
    progress.phase("baseline: placing a probe job before the fault");
    let mut probe_client = probes.client();
    let t0 = Instant::now();
    let baseline_deadline = t0 + timeout.min(BASELINE_MAX);
    let Some(baseline) = probes
        .submit(
            &mut probe_client,
            "baseline",
            Budget::until(baseline_deadline),
        )
        .await
    else {
        return Err(ClientError::Other(
            "the cluster did not accept a probe job before the drill; not starting it".into(),
        ));
    };
    match probes
        .wait_placed(&mut probe_client, &baseline, baseline_deadline)
        .await
    {
        Placement::Placed(at) => {
            report.baseline_placement_ms = Some(ms(at - t0));
            timeline.add("baseline probe placed");
        }
        Placement::NotPlaced(reason) => {
            report.placement_note = Some(format!(
                "a probe job is not placed even before the fault ({reason})"
            ));
            timeline.add(format!("baseline probe not placed: {reason}"));
        }
    }
    probes
        .discard(&mut probe_client, &baseline, Instant::now() + timeout)
        .await;
    probes.reset_stats();

    // The write load runs from just before the fault until the old leader is back.
    let (stop_load, stop_rx) = watch::channel(false);
    let load = tokio::spawn(probes.clone().load(stop_rx, timeout));
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The fault.
    let fault_end_after = match kind {
        Kind::Transfer(_) => {
            let to = target.unwrap_or_default();
            progress.phase(format!("handing leadership from replica {old} to {to}"));
            client.transfer_leader(to).await?;
            timeline.add(format!("leadership handed from replica {old} to {to}"));
            Duration::ZERO
        }
        Kind::Kill => {
            progress.phase(format!("aborting replica {old} (the leader)"));
            let abort = pb::DrillRequest {
                action: pb::DrillAction::Abort.into(),
                ..Default::default()
            };
            let reply = members.drill(old, abort, timeout).await?;
            timeline.add(if reply.was_leader {
                format!("replica {old} answers the abort (it leads)")
            } else {
                format!(
                    "replica {old} answers the abort (it no longer led when the drill reached it)"
                )
            });
            // The crash is the fault's moment, not the answer: the process lives a little longer
            // so that its answer leaves first.
            if !wait_down(&members, before_leadership, Instant::now() + timeout).await {
                return Err(ClientError::Other(format!(
                    "replica {old} answered the abort but was still running {} later",
                    humantime::format_duration(timeout)
                )));
            }
            timeline.add(format!("replica {old} is down"));
            Duration::ZERO
        }
        Kind::Partition(d) => {
            progress.phase(format!("cutting replica {old} (the leader) off"));
            let cut = pb::DrillRequest {
                action: pb::DrillAction::Partition.into(),
                duration_ms: ms(d),
                peers: Vec::new(),
            };
            *undo.partition.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((members.clone(), old));
            let reply = members.drill(old, cut, timeout).await?;
            report.partition_ms = Some(ms(d));
            timeline.add(format!(
                "replica {old} drops all Raft traffic for {}{}",
                humantime::format_duration(d),
                if reply.was_leader {
                    ""
                } else {
                    " (it no longer led when the drill reached it)"
                }
            ));
            d
        }
    };
    let fault_at = Instant::now();
    let fault_end = fault_at + fault_end_after;

    // A probe submitted after the fault: how soon does the new leader place work?
    let placement = report.placement_note.is_none().then(|| {
        let probes = probes.clone();
        tokio::spawn(async move {
            let mut c = probes.client();
            let deadline = fault_at + timeout;
            let Some(id) = probes
                .submit(&mut c, "place", Budget::until(deadline))
                .await
            else {
                return (
                    None,
                    Placement::NotPlaced("the probe job was not accepted".into()),
                );
            };
            let placed = probes.wait_placed(&mut c, &id, deadline).await;
            (Some(id), placed)
        })
    });

    // A new leader: a replica leading in a newer term (for a partition, not the one cut off), or
    // the crashed leader restarted and leading again.
    progress.phase("waiting for a new leader");
    let except = matches!(kind, Kind::Partition(_)).then_some(old);
    let mut new_leader: Option<LeaderView> = None;
    while new_leader.is_none() && Instant::now() < fault_at + timeout {
        new_leader = members
            .first(|s| newer_leader(std::slice::from_ref(s), before_leadership, except))
            .await;
        if new_leader.is_none() {
            tokio::time::sleep(LEADER_POLL).await;
        }
    }
    match &new_leader {
        Some(l) => {
            report.new_leader = Some(l.id);
            report.term_after = Some(l.term);
            report.old_leader_resumed = l.id == old;
            report.time_to_new_leader_ms = Some(ms(Instant::now() - fault_at));
            timeline.add(if l.id == old {
                format!(
                    "replica {old} restarted and leads again (term {}) before another took over",
                    l.term
                )
            } else {
                format!("replica {} leads (term {})", l.id, l.term)
            });
        }
        None => report.problems.push(format!(
            "no new leader within {} of the fault",
            humantime::format_duration(timeout)
        )),
    }

    // The probe's placement.
    let mut placed_ok = report.placement_note.is_some();
    if let Some(task) = placement {
        progress.phase("waiting for a probe job submitted after the fault to be placed");
        match task.await {
            Ok((id, Placement::Placed(at))) => {
                report.time_to_first_placement_ms =
                    Some(ms(at.saturating_duration_since(fault_at)));
                timeline.add("first probe submitted after the fault placed");
                placed_ok = true;
                if let Some(id) = id {
                    probes
                        .discard(&mut probe_client, &id, Instant::now() + timeout)
                        .await;
                }
            }
            Ok((_, Placement::NotPlaced(reason))) => report.problems.push(format!(
                "no probe job submitted after the fault was placed within {} ({reason})",
                humantime::format_duration(timeout)
            )),
            Err(e) => report
                .problems
                .push(format!("the placement probe failed: {e}")),
        }
    }

    // The fault's end: a partition heals by itself.
    while Instant::now() < fault_end {
        let left = fault_end - Instant::now();
        progress.phase(format!(
            "partition heals in {}",
            humantime::format_duration(Duration::from_secs(left.as_secs() + 1))
        ));
        tokio::time::sleep(left.min(Duration::from_millis(500))).await;
    }
    if matches!(kind, Kind::Partition(_)) {
        undo.partition
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        timeline.add("partition over");
    }

    // The old leader back: it follows the current leader and has applied what that leader had
    // committed when the fault ended.
    progress.phase(format!(
        "waiting for replica {old} to follow the new leader"
    ));
    let back = wait_back(
        &members,
        before_leadership,
        fault_end + timeout,
        &mut timeline,
    )
    .await;
    match back {
        Some(at) => report.old_leader_back_ms = Some(ms(at.saturating_duration_since(fault_end))),
        None => report.problems.push(match kind {
            Kind::Kill => format!(
                "replica {old} did not come back within {} of its crash: is it supervised \
                 (systemd Restart=on-failure, compose restart: on-failure)?",
                humantime::format_duration(timeout)
            ),
            _ => format!(
                "replica {old} did not follow the new leader within {} of the fault's end",
                humantime::format_duration(timeout)
            ),
        }),
    }

    // After: stop the load, compare the leases, remove the probes.
    progress.phase("finishing the probe writes");
    let _ = stop_load.send(true);
    let _ = load.await;
    timeline.add("probe writes stopped");
    progress.phase("comparing leases");
    let after = snapshot(&mut client).await?;
    let check = compare(&before, &after);
    progress.phase("cancelling probe jobs");
    undo.probes.lock().unwrap_or_else(|p| p.into_inner()).take();
    let (left, _) = probes.cleanup(Instant::now() + timeout).await?;
    if !left.is_empty() {
        timeline.add(format!(
            "probe jobs left behind (cancel them by hand): {}",
            left.join(", ")
        ));
    }

    report.recovered = new_leader.is_some() && placed_ok && back.is_some();
    report.writes = probes.stats();
    report.set_leases(check);
    report.timeline = timeline.relative_to(fault_at);
    report.judge();
    Ok(report)
}

/// Waits until the old leader's process is gone: it does not answer, or a restarted process
/// answers in its place. False when it is still the same process at `deadline`.
async fn wait_down(members: &Members, before: Before, deadline: Instant) -> bool {
    while Instant::now() < deadline {
        match members.status(before.leader).await {
            Some(s) if s.started_at_ms == before.started_at_ms => {}
            _ => return true,
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Waits until the old leader follows the leadership that came after the fault (or is it, after a
/// restart) and has applied what that leader had committed when first seen; returns when.
async fn wait_back(
    members: &Members,
    before: Before,
    deadline: Instant,
    timeline: &mut Timeline,
) -> Option<Instant> {
    let id = before.leader;
    // What the leader had committed when first seen after the fault.
    let mut target: Option<u64> = None;
    let mut was_down = false;
    while Instant::now() < deadline {
        let leader = newer_leader(&members.leaders().await, before, None);
        if target.is_none() {
            target = leader.as_ref().map(|l| l.commit_index);
        }
        match members.status(id).await {
            None if !was_down => {
                was_down = true;
                timeline.add(format!("replica {id} does not answer"));
            }
            Some(s) => {
                if was_down {
                    was_down = false;
                    timeline.add(format!("replica {id} answers again"));
                }
                if let (Some(l), Some(commit)) = (&leader, target) {
                    if s.leader_id == l.id && s.term == l.term && s.applied_index >= commit {
                        timeline.add(if l.id == id {
                            format!("replica {id} leads with everything applied")
                        } else {
                            format!(
                                "replica {id} follows replica {} with everything applied",
                                l.id
                            )
                        });
                        return Some(Instant::now());
                    }
                }
            }
            None => {}
        }
        tokio::time::sleep(POLL).await;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(matched: &[(u64, u64)]) -> pb::ClusterStatusReply {
        pb::ClusterStatusReply {
            replica_id: 1,
            role: "leader".into(),
            members: matched
                .iter()
                .map(|&(id, m)| pb::MemberInfo {
                    id,
                    matched_index: m,
                    voter: true,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_transfer_goes_to_the_most_caught_up_voter_or_the_one_named() {
        let s = status(&[(1, 100), (2, 90), (3, 99)]);
        assert_eq!(transfer_target(&s, &[1, 2, 3], None).unwrap(), 3);
        assert_eq!(transfer_target(&s, &[1, 2, 3], Some(2)).unwrap(), 2);
        let tie = status(&[(1, 100), (2, 99), (3, 99)]);
        assert_eq!(transfer_target(&tie, &[1, 2, 3], None).unwrap(), 2);
        for (to, says) in [(1, "already leads"), (7, "not a voter")] {
            let err = transfer_target(&s, &[1, 2, 3], Some(to)).unwrap_err();
            assert!(err.to_string().contains(says), "{to}: {err}");
            assert_eq!(err.exit_code(), crate::client::EXIT_INVALID);
        }
        assert!(transfer_target(&status(&[(1, 5)]), &[1], None).is_err());
    }

    #[test]
    fn the_leadership_after_a_fault_is_a_newer_term_or_a_restarted_leader() {
        let answer = |id: u64, term: u64, started: u64| pb::ClusterStatusReply {
            replica_id: id,
            role: "leader".into(),
            term,
            started_at_ms: started,
            commit_index: 10 * term,
            ..Default::default()
        };
        let before = Before {
            leader: 1,
            term: 4,
            started_at_ms: 1000,
        };
        let id = |v: Option<LeaderView>| v.map(|l| l.id);
        // (case, answers, except, expected leader)
        type Case = (
            &'static str,
            Vec<pb::ClusterStatusReply>,
            Option<u64>,
            Option<u64>,
        );
        let cases: Vec<Case> = vec![
            ("nobody leads yet", vec![], None, None),
            (
                "the old process still claims its term",
                vec![answer(1, 4, 1000)],
                None,
                None,
            ),
            (
                "another replica leads a newer term",
                vec![answer(1, 4, 1000), answer(2, 5, 7)],
                None,
                Some(2),
            ),
            (
                "the restarted leader leads again in the same term",
                vec![answer(1, 4, 2000)],
                None,
                Some(1),
            ),
            (
                "a partitioned leader is never the new one",
                vec![answer(1, 6, 2000)],
                Some(1),
                None,
            ),
            (
                "the newest term wins",
                vec![answer(2, 5, 7), answer(3, 6, 7)],
                None,
                Some(3),
            ),
        ];
        for (name, answers, except, want) in cases {
            assert_eq!(id(newer_leader(&answers, before, except)), want, "{name}");
        }
    }

    #[test]
    fn partitions_are_bounded() {
        assert_eq!(parse_partition("10s").unwrap(), Duration::from_secs(10));
        assert!(parse_partition("11m").unwrap_err().contains("10m"));
        assert!(parse_partition("0s").is_err());
    }
}
