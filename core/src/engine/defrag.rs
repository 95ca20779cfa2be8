//! The defragmenter: when a gang waits because the free devices are in the wrong shape (enough
//! of them, but scattered over hosts or racks none of which can take it), find the cheapest set of
//! migrations that frees a block it fits in.
//!
//! A pure function of the state, like [`super::schedule`]: the simulator and the leader call the
//! same code. The plan says which running gangs move where, and where the waiting gang then goes;
//! the caller commits the moves and reserves the freed block for that gang in the same step, so no
//! third job can take it.
//!
//! How it chooses, per candidate domain (a rack, a pod, or the whole cluster when the gang has no
//! required level):
//! 1. every host offers task slots (`free / per_task`) for nothing, and more slots for the price of
//!    moving the movable gangs it holds, smallest first;
//! 2. the domain's price is that of its cheapest `tasks` slots, counted in device-seconds of work
//!    moved (a moved gang is counted once, whatever hosts it spans);
//! 3. the cheapest domains are verified for real on a copy of the state: the moved gangs are
//!    released, the waiting gang is placed inside the domain, and each moved gang must be placed
//!    again outside the hosts the waiting gang takes. A domain that fails any step is skipped.
//!
//! Movable: checkpointable, not above the waiting gang's priority, past the min-runtime (so a gang
//! is never moved twice in quick succession), and smaller than the waiting gang (moving a bigger
//! job to make room for a smaller one would be churn, not defragmentation).

use super::cluster::ClusterState;
use super::config::SchedulerConfig;
use super::job::{DeviceDemand, GangRequest, HostFilter};
use super::plan::{GangPlacement, PendingReason};
use super::topology::TopologyLevel;
use gangway_proto::ids::{HostName, JobId};
use std::collections::{BTreeMap, BTreeSet};

/// Limits on what one defragmentation plan may disturb.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DefragBudget {
    /// Most gangs moved for one waiting gang.
    pub max_moves: usize,
    /// A gang moves only after running this long.
    pub min_runtime_ms: u64,
    /// Domains verified per plan, cheapest estimate first.
    pub candidates: usize,
}

impl Default for DefragBudget {
    fn default() -> Self {
        Self {
            max_moves: 4,
            min_runtime_ms: 10 * 60 * 1000,
            candidates: 4,
        }
    }
}

/// One gang to migrate: checkpoint, stop, relaunch at `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    pub job: JobId,
    /// Whole devices the gang holds (what its migration disturbs).
    pub devices: u64,
    pub to: GangPlacement,
}

/// Migrations that make room for one waiting gang, and where that gang goes once they are done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DefragPlan {
    pub for_gang: JobId,
    pub gang: GangPlacement,
    pub moves: Vec<Move>,
}

impl DefragPlan {
    /// Devices of the moved gangs.
    pub fn moved_devices(&self) -> u64 {
        self.moves.iter().map(|m| m.devices).sum()
    }
}

/// Whether a pending reason means "the devices are there, in the wrong shape": what
/// defragmentation can fix, unlike a full cluster, a quota or a job that never fits.
pub fn blocked_by_shape(reason: &PendingReason) -> bool {
    matches!(
        reason,
        PendingReason::NoDomainFits { .. } | PendingReason::NoHostFits { .. }
    )
}

/// Free whole devices in domains of `level` (hosts, racks, ...) that are partly used, per
/// thousand free devices: the share of free capacity a gang needing a whole domain of that level
/// cannot use. At `Host`, what a full-host task cannot use.
pub fn scattered_free_permille(state: &ClusterState, level: TopologyLevel) -> u64 {
    // (free whole devices, devices) per domain; hosts name their domain by borrowed topology
    // fields (no key is built per host: the simulator measures this after every event).
    let ready = state
        .hosts()
        .iter()
        .filter(|h| h.spec.state.accepts_new_work());
    let counts =
        |h: &crate::engine::HostState| (h.free_whole_devices() as u64, h.spec.devices.len() as u64);
    let domains: Vec<(u64, u64)> = match level {
        // Every host is a domain of its own.
        TopologyLevel::Host | TopologyLevel::Nvlink => ready.map(counts).collect(),
        _ => {
            let mut by_domain: BTreeMap<[&str; 4], (u64, u64)> = BTreeMap::new();
            for h in ready {
                let d = by_domain
                    .entry(domain_of(&h.spec.topology, level))
                    .or_default();
                let (free, total) = counts(h);
                d.0 += free;
                d.1 += total;
            }
            by_domain.into_values().collect()
        }
    };
    let free: u64 = domains.iter().map(|d| d.0).sum();
    let scattered: u64 = domains.iter().filter(|d| d.0 < d.1).map(|d| d.0).sum();
    (scattered * 1000).checked_div(free).unwrap_or(0)
}

/// The topology fields that name a host's domain at `level` above the host (unused ones empty).
fn domain_of(t: &crate::engine::HostTopology, level: TopologyLevel) -> [&str; 4] {
    let all = [
        t.datacenter.as_str(),
        t.zone.as_str(),
        t.pod.as_str(),
        t.rack.as_str(),
    ];
    let depth = match level {
        TopologyLevel::Datacenter => 1,
        TopologyLevel::Zone => 2,
        TopologyLevel::Pod => 3,
        _ => 4,
    };
    let mut key = [""; 4];
    key[..depth].copy_from_slice(&all[..depth]);
    key
}

/// A gang that may be moved, with the devices it holds per host.
struct Movable<'a> {
    job: &'a JobId,
    devices: u64,
    per_host: BTreeMap<&'a HostName, u64>,
}

/// One host's staircase: after moving `jobs[..n]` (smallest first) it offers `slots[n]` task slots.
struct HostOffer<'a> {
    host: &'a HostName,
    slots: Vec<u64>,
    jobs: Vec<usize>,
}

/// Plans the cheapest migrations that let `gang` be placed, or `None` when none within the budget
/// does. `gang` should be waiting for a shape reason (see [`blocked_by_shape`]).
pub fn plan_defrag(
    view: &ClusterState,
    gang: &GangRequest,
    config: &SchedulerConfig,
    budget: &DefragBudget,
    now_ms: u64,
) -> Option<DefragPlan> {
    let per_task = match gang.per_task.devices {
        DeviceDemand::Whole(n) if n > 0 => u64::from(n),
        _ => return None,
    };
    let wanted = gang.total_devices();
    let movable: Vec<Movable<'_>> = view
        .running()
        .iter()
        .filter(|(id, g)| {
            **id != gang.id
                && g.request.checkpointable
                && g.request.priority <= gang.priority
                && now_ms.saturating_sub(g.started_at_ms) >= budget.min_runtime_ms
                && g.request.total_devices() < wanted
                && matches!(g.request.per_task.devices, DeviceDemand::Whole(_))
        })
        .map(|(id, g)| {
            let mut per_host: BTreeMap<&HostName, u64> = BTreeMap::new();
            for t in &g.placement.tasks {
                *per_host.entry(&t.host).or_default() += t.devices.len() as u64;
            }
            Movable {
                job: id,
                devices: g.request.total_devices(),
                per_host,
            }
        })
        .collect();
    let mut on_host: BTreeMap<&HostName, Vec<usize>> = BTreeMap::new();
    for (i, m) in movable.iter().enumerate() {
        for h in m.per_host.keys() {
            on_host.entry(h).or_default().push(i);
        }
    }

    // Every usable host's staircase, grouped by the gang's required domain.
    let level = gang.required.unwrap_or(TopologyLevel::Datacenter);
    let mut domains: BTreeMap<String, Vec<HostOffer<'_>>> = BTreeMap::new();
    for h in view.hosts() {
        let spec = &h.spec;
        if !spec.state.accepts_new_work() || !gang.hosts.allows(&spec.name) {
            continue;
        }
        let accepted = spec.devices.iter().all(|d| {
            gang.accepts_model(&d.model)
                && view.model(&d.model).is_some_and(|m| m.kind == gang.kind)
        });
        if !accepted || (spec.devices.len() as u64) < per_task {
            continue;
        }
        let mut free = h.free_whole_devices() as u64;
        let mut jobs: Vec<usize> = on_host.get(&spec.name).cloned().unwrap_or_default();
        jobs.sort_by_key(|&i| (movable[i].devices, movable[i].job));
        let mut slots = vec![free / per_task];
        for &i in &jobs {
            free += movable[i].per_host[&spec.name];
            slots.push(free / per_task);
        }
        let key = ClusterState::domain_key(&spec.topology, &spec.name, level);
        domains.entry(key).or_default().push(HostOffer {
            host: &spec.name,
            slots,
            jobs,
        });
    }

    // The price of each domain: its cheapest `tasks` slots, greedily.
    let tasks = u64::from(gang.tasks);
    let mut priced: Vec<(u64, String, BTreeSet<usize>, Vec<&HostName>)> = Vec::new();
    for (key, offers) in &domains {
        let mut chosen: BTreeSet<usize> = BTreeSet::new();
        // How far down its staircase each host has been taken.
        let mut depth: Vec<usize> = vec![0; offers.len()];
        let slots_now = |depth: &[usize]| -> u64 {
            offers
                .iter()
                .zip(depth)
                .map(|(o, &d)| o.slots[d])
                .sum::<u64>()
        };
        while slots_now(&depth) < tasks && chosen.len() <= budget.max_moves {
            // The next step that adds a slot for the fewest newly moved devices.
            let mut best: Option<(u64, usize, usize)> = None;
            for (k, o) in offers.iter().enumerate() {
                let mut cost = 0;
                for step in depth[k]..o.jobs.len() {
                    let j = o.jobs[step];
                    if !chosen.contains(&j) {
                        cost += movable[j].devices;
                    }
                    if o.slots[step + 1] > o.slots[depth[k]] {
                        if best.is_none_or(|(c, _, _)| cost < c) {
                            best = Some((cost, k, step + 1));
                        }
                        break;
                    }
                }
            }
            let Some((_, k, to)) = best else { break };
            for step in depth[k]..to {
                chosen.insert(offers[k].jobs[step]);
            }
            depth[k] = to;
        }
        if slots_now(&depth) < tasks || chosen.is_empty() || chosen.len() > budget.max_moves {
            continue;
        }
        let cost: u64 = chosen.iter().map(|&j| movable[j].devices).sum();
        let hosts: Vec<&HostName> = offers.iter().map(|o| o.host).collect();
        priced.push((cost, key.clone(), chosen, hosts));
    }
    priced.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));

    // Verify the cheapest for real, on a copy of the state.
    let verify_config = SchedulerConfig {
        preemption: false,
        ..config.clone()
    };
    for (_, _, chosen, hosts) in priced.into_iter().take(budget.candidates) {
        if let Some(plan) = verify(
            view,
            gang,
            &verify_config,
            now_ms,
            &movable,
            &chosen,
            &hosts,
        ) {
            return Some(plan);
        }
    }
    None
}

fn verify(
    view: &ClusterState,
    gang: &GangRequest,
    config: &SchedulerConfig,
    now_ms: u64,
    movable: &[Movable<'_>],
    chosen: &BTreeSet<usize>,
    domain: &[&HostName],
) -> Option<DefragPlan> {
    let mut trial = view.clone();
    let mut moved = Vec::new();
    for &j in chosen {
        let g = trial.release(movable[j].job)?;
        moved.push(g);
    }
    let inside = HostFilter {
        only: domain.iter().map(|h| (*h).clone()).collect(),
        avoid: gang.hosts.avoid.clone(),
    };
    let req = gang.clone().with_hosts(inside);
    let plan = super::schedule(&trial, std::slice::from_ref(&req), config, now_ms);
    let placement = plan.placements.into_iter().next()?;
    trial.apply_placement(req, placement.clone(), now_ms).ok()?;
    let taken: BTreeSet<HostName> = placement.tasks.iter().map(|t| t.host.clone()).collect();
    // Largest first: the hardest to place again gets the most room.
    moved.sort_by_key(|g| std::cmp::Reverse(g.request.total_devices()));
    let mut moves = Vec::new();
    for g in moved {
        // Where the gang may go now: anywhere but the block it makes room in. (A filter it was
        // placed under earlier, e.g. an operator's `migrate --to`, bound that placement only.)
        let req = g.request.clone().with_hosts(HostFilter {
            only: BTreeSet::new(),
            avoid: taken.clone(),
        });
        let plan = super::schedule(&trial, std::slice::from_ref(&req), config, now_ms);
        let to = plan.placements.into_iter().next()?;
        trial.apply_placement(req, to.clone(), now_ms).ok()?;
        moves.push(Move {
            job: g.request.id.clone(),
            devices: g.request.total_devices(),
            to,
        });
    }
    Some(DefragPlan {
        for_gang: gang.id.clone(),
        gang: placement,
        moves,
    })
}
