//! One scheduling round: `schedule(view, pending, config, now_ms) -> Plan`.
//!
//! Pure and deterministic: no clocks (`now_ms` is the log time of the round), no global randomness
//! (ties that a policy breaks "at random" use a hash of the job id), ordered iteration only.

use super::cluster::ClusterState;
use super::config::SchedulerConfig;
use super::fragmentation::FragModel;
use super::framework::{HeadOfLine, Pick, Policy, QuotaMode, ScoreCx, TieBreak};
use super::index::{Overlay, TaskShape, EXCL_HARD, EXCL_SOFT};
use super::job::{DeviceDemand, GangRequest};
use super::plan::{
    fmt_milli, DeviceShare, GangPlacement, PendingJob, PendingReason, Plan, TaskPlacement,
};
use super::policy::policy;
use super::preemption;
use super::quota::QuotaBook;
use super::topology::TopologyLevel;
use gangway_proto::ids::{HostName, JobId, QueueName};
use rustc_hash::FxHashSet;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Above this many distinct host shapes, non-exhaustive policies score only the tightest
/// [`SCORE_BUDGET`] feasible shapes for a task.
pub const SCAN_ALL_LIMIT: usize = 2048;
pub const SCORE_BUDGET: usize = 32;
/// Candidate domains whose fills are scored whole (topology-aware policies).
pub const DOMAINS_SCORED: usize = 2;
/// Candidate domains tried before a level is given up.
pub const DOMAIN_ATTEMPTS: usize = 48;

/// One placed task: host index and devices.
pub(crate) type TaskAt = (usize, Vec<DeviceShare>);

/// How a round breaks ties between equally scored hosts (smaller [`TieKey`] wins).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tie {
    /// The host registered first ([`TieBreak::LowestIndex`]).
    Index,
    /// A pseudo-random host per job ([`TieBreak::Hashed`]).
    Hashed,
    /// Topology-aware policies, while multi-task gangs are pending or running: the host whose
    /// rack, then pod, has the fewest free whole devices, then the first registered. Tasks go into
    /// domains already in use, so empty racks and pods stay whole for the gangs that need them.
    Packed,
}

/// Sort key of a host among equally scored ones.
type TieKey = (u64, u64, u64);

/// What a round works with.
pub(crate) struct Round<'a> {
    pub ov: Overlay<'a>,
    /// Bumped whenever the overlay changes for good (a commit, a host held back).
    pub generation: u64,
    /// Largest free block per (level, accepted models), valid for one generation.
    block_cache: HashMap<(TopologyLevel, Vec<bool>), (u64, u64)>,
    pub frag: FragModel,
    pub policy: &'static dyn Policy,
    tie: Tie,
    pub max_cpu_milli: u64,
    pub max_device_milli: u64,
}

/// 64-bit mix (splitmix64 finaliser).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Whether the workload has gangs of several tasks (pending or running), for which whole racks and
/// pods are worth keeping.
fn gangs_in_sight(view: &ClusterState, pending: &[GangRequest]) -> bool {
    pending.iter().any(|r| r.tasks > 1) || view.running().values().any(|g| g.request.tasks > 1)
}

/// A stable per-job seed for pseudo-random tie-breaking.
pub(crate) fn job_seed(job: &JobId) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in job.as_str().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

impl<'a> Round<'a> {
    pub fn new(view: &'a ClusterState, pending: &[GangRequest], config: &SchedulerConfig) -> Self {
        let policy = policy(config.policy);
        // The shape-class index pays for itself only over many gangs (or very many hosts).
        let classes = pending.len() > 4 || view.hosts().len() > 16_384;
        let mut ov = Overlay::with_classes(view, classes);
        let tie = match policy.tie_break() {
            TieBreak::Hashed => Tie::Hashed,
            TieBreak::LowestIndex if policy.topology_aware() && gangs_in_sight(view, pending) => {
                Tie::Packed
            }
            TieBreak::LowestIndex => Tie::Index,
        };
        if tie == Tie::Packed {
            ov.build_domains(&[TopologyLevel::Rack, TopologyLevel::Pod]);
        }
        let use_memory = config.policy == super::config::PolicyName::Gangway;
        let frag = if !policy.needs_frag() {
            FragModel::default()
        } else if config.workload.is_empty() {
            FragModel::learn(&ov.models, view, pending, use_memory)
        } else {
            FragModel::from_workload(&ov.models, &config.workload, use_memory)
        };
        let max_cpu_milli = view
            .hosts()
            .iter()
            .map(|h| h.spec.cpu_milli)
            .max()
            .unwrap_or(1);
        let max_device_milli = view
            .hosts()
            .iter()
            .map(|h| h.spec.devices.len() as u64 * 1000)
            .max()
            .unwrap_or(1);
        Self {
            ov,
            generation: 0,
            block_cache: HashMap::new(),
            frag,
            policy,
            tie,
            max_cpu_milli,
            max_device_milli,
        }
    }

    /// Free whole devices in the domain of `level` that holds host `h` (0 if not indexed).
    fn domain_free(&self, level: TopologyLevel, h: usize) -> u64 {
        self.ov
            .domain_index(level)
            .map_or(0, |d| d.free_whole[d.host_domain[h] as usize])
    }

    /// Where host `h` ranks among equally scored hosts for the job of `seed`.
    fn tie_key(&self, h: usize, seed: u64) -> TieKey {
        match self.tie {
            Tie::Index => (0, 0, h as u64),
            Tie::Hashed => (0, 0, mix(seed ^ (h as u64).wrapping_mul(0x9E37_79B9))),
            Tie::Packed => (
                self.domain_free(TopologyLevel::Rack, h),
                self.domain_free(TopologyLevel::Pod, h),
                h as u64,
            ),
        }
    }

    /// Whether `h` goes before `other` among equally scored hosts (the locality pass).
    fn before(&self, h: usize, other: usize, seed: u64) -> bool {
        match self.tie {
            Tie::Packed => self.tie_key(h, seed) < self.tie_key(other, seed),
            Tie::Index | Tie::Hashed => h < other,
        }
    }

    fn cx(&self) -> ScoreCx<'_, 'a> {
        ScoreCx {
            overlay: &self.ov,
            frag: &self.frag,
            max_cpu_milli: self.max_cpu_milli,
            max_device_milli: self.max_device_milli,
        }
    }

    /// Score of a task on a host (None: does not fit).
    fn eval(&self, h: usize, shape: &TaskShape) -> Option<(f64, Pick)> {
        if !self.ov.fits(h, shape) {
            return None;
        }
        self.policy.score(&self.cx(), h, &self.ov.slots[h], shape)
    }

    /// The best host for one task among all indexed hosts, plus `extra` (held-back hosts this gang
    /// may use) and with a bonus for `used` (hosts the gang already holds).
    fn best_host(
        &self,
        shape: &TaskShape,
        seed: u64,
        extra: &[usize],
        used: &[usize],
    ) -> Option<(usize, Pick, f64)> {
        let exhaustive = self.policy.exhaustive() || self.ov.live_classes() <= SCAN_ALL_LIMIT;
        let min_free = match shape.demand {
            DeviceDemand::None => 0,
            _ => shape.milli(),
        };
        if self.policy.constant_score() {
            for h in 0..self.ov.info.len() {
                let ex = self.ov.excluded[h];
                if !self.ov.info[h].ready
                    || ex & EXCL_HARD != 0
                    || (ex & EXCL_SOFT != 0 && !extra.contains(&h))
                {
                    continue;
                }
                if let Some((s, pick)) = self.eval(h, shape) {
                    return Some((h, pick, s));
                }
            }
            return None;
        }
        if !self.ov.has_classes() {
            let all: Vec<usize> = (0..self.ov.info.len()).collect();
            let mut best = self.best_host_in(&all, shape, seed, !extra.is_empty(), used);
            if let Some((h, _, _)) = best {
                // Soft-held hosts are allowed only when listed in `extra`.
                if self.ov.excluded[h] & EXCL_SOFT != 0 && !extra.contains(&h) {
                    best = self.best_host_in(&all, shape, seed, false, used);
                }
            }
            return best;
        }
        let mut best: Option<(f64, usize)> = None;
        let mut tied: Vec<usize> = Vec::new();
        let mut feasible = 0usize;
        for (cid, rep) in self.ov.classes_from(min_free) {
            let Some((s, _)) = self.eval(rep, shape) else {
                continue;
            };
            feasible += 1;
            match best {
                None => {
                    best = Some((s, rep));
                    tied = vec![cid];
                }
                Some((bs, bh)) => {
                    if s > bs || (s == bs && self.tie == Tie::Index && rep < bh) {
                        best = Some((s, rep));
                        tied = vec![cid];
                    } else if s == bs {
                        tied.push(cid);
                    }
                }
            }
            if !exhaustive && feasible >= SCORE_BUDGET {
                break;
            }
        }
        let mut chosen: Option<(f64, usize)> = best;
        if let (Some((bs, _)), Tie::Packed) = (best, self.tie) {
            let members = tied.iter().flat_map(|&c| self.ov.class_members(c).iter());
            if let Some(&h) = members.min_by_key(|&&h| self.tie_key(h, seed)) {
                chosen = Some((bs, h));
            }
        }
        if let (Some((bs, _)), Tie::Hashed) = (best, self.tie) {
            let total: usize = tied.iter().map(|&c| self.ov.class_members(c).len()).sum();
            if total > 1 {
                let mut r = (mix(seed) % total as u64) as usize;
                for &c in &tied {
                    let members = self.ov.class_members(c);
                    if r < members.len() {
                        let h = *members.iter().nth(r).expect("r < len");
                        chosen = Some((bs, h));
                        break;
                    }
                    r -= members.len();
                }
            }
        }
        let bonus = self.policy.locality_bonus();
        for (&h, b) in extra
            .iter()
            .map(|h| (h, 0.0))
            .chain(used.iter().map(|h| (h, bonus)))
        {
            if !self.ov.info[h].ready || self.ov.excluded[h] & EXCL_HARD != 0 {
                continue;
            }
            let Some((s, _)) = self.eval(h, shape) else {
                continue;
            };
            let s = s + b;
            let better = match chosen {
                None => true,
                Some((cs, ch)) => s > cs || (s == cs && self.before(h, ch, seed)),
            };
            if better {
                chosen = Some((s, h));
            }
        }
        let (s, h) = chosen?;
        let (_, pick) = self.eval(h, shape)?;
        Some((h, pick, s))
    }

    /// The best host for one task among `hosts` (one domain).
    fn best_host_in(
        &self,
        hosts: &[usize],
        shape: &TaskShape,
        seed: u64,
        allow_soft: bool,
        used: &[usize],
    ) -> Option<(usize, Pick, f64)> {
        let bonus = self.policy.locality_bonus();
        let mut best: Option<(f64, TieKey, usize, Pick)> = None;
        for &h in hosts {
            let ex = self.ov.excluded[h];
            if !self.ov.info[h].ready || ex & EXCL_HARD != 0 || (ex & EXCL_SOFT != 0 && !allow_soft)
            {
                continue;
            }
            let Some((mut s, pick)) = self.eval(h, shape) else {
                continue;
            };
            if used.contains(&h) {
                s += bonus;
            }
            let key = self.tie_key(h, seed);
            let better = match best {
                None => true,
                Some((bs, bk, _, _)) => s > bs || (s == bs && key < bk),
            };
            if better {
                best = Some((s, key, h, pick));
            }
        }
        best.map(|(s, _, h, p)| (h, p, s))
    }

    fn take(&mut self, h: usize, shape: &TaskShape, pick: Pick) -> Vec<DeviceShare> {
        let device = match pick {
            Pick::Device(d) => Some(d),
            Pick::Auto => None,
        };
        self.ov.take(h, shape, device)
    }

    /// Fills `tasks` tasks into the hosts of one domain, `prefer`red hosts first whatever the
    /// policy's score (a repair keeping its healthy hosts); on failure the overlay is unchanged.
    /// Scores are computed once per host and again only for the host a task just took (a task
    /// changes no other host's score).
    fn fill(
        &mut self,
        hosts: &[usize],
        tasks: u32,
        shape: &TaskShape,
        seed: u64,
        allow_soft: bool,
        prefer: &[usize],
    ) -> Option<(Vec<TaskAt>, f64)> {
        let bonus = self.policy.locality_bonus();
        let keys: Vec<TieKey> = hosts.iter().map(|&h| self.tie_key(h, seed)).collect();
        let allowed = |ov: &Overlay<'_>, h: usize| {
            let ex = ov.excluded[h];
            ov.info[h].ready && ex & EXCL_HARD == 0 && (ex & EXCL_SOFT == 0 || allow_soft)
        };
        let mut cache: Vec<Option<(f64, Pick)>> = hosts
            .iter()
            .map(|&h| {
                if allowed(&self.ov, h) {
                    self.eval(h, shape)
                } else {
                    None
                }
            })
            .collect();
        let mut used = vec![false; hosts.len()];
        let mark = self.ov.mark();
        let mut out = Vec::with_capacity(tasks as usize);
        let mut total = 0.0;
        let preferred: Vec<bool> = hosts.iter().map(|h| prefer.contains(h)).collect();
        for _ in 0..tasks {
            let mut best: Option<(bool, f64, TieKey, usize)> = None;
            for (k, c) in cache.iter().enumerate() {
                let Some((s, _)) = c else { continue };
                let s = if used[k] { s + bonus } else { *s };
                let p = preferred[k];
                let better = match best {
                    None => true,
                    Some((bp, bs, bk, _)) => {
                        (p, s) > (bp, bs) || (p == bp && s == bs && keys[k] < bk)
                    }
                };
                if better {
                    best = Some((p, s, keys[k], k));
                }
            }
            let Some((_, s, _, k)) = best else {
                self.ov.undo(mark);
                return None;
            };
            let h = hosts[k];
            let pick = cache[k].expect("scored").1;
            total += s;
            let shares = self.take(h, shape, pick);
            used[k] = true;
            out.push((h, shares));
            cache[k] = self.eval(h, shape);
        }
        Some((out, total))
    }

    /// Tasks one by one over the whole cluster (no domain), preferring hosts already used.
    fn fill_cluster(
        &mut self,
        tasks: u32,
        shape: &TaskShape,
        seed: u64,
        extra: &[usize],
    ) -> Option<Vec<TaskAt>> {
        let mark = self.ov.mark();
        let mut out = Vec::with_capacity(tasks as usize);
        let mut used: Vec<usize> = Vec::new();
        for _ in 0..tasks {
            let Some((h, pick, _)) = self.best_host(shape, seed, extra, &used) else {
                self.ov.undo(mark);
                return None;
            };
            let shares = self.take(h, shape, pick);
            if !used.contains(&h) {
                used.push(h);
            }
            out.push((h, shares));
        }
        Some(out)
    }

    /// Tries the domains of one level; commits the best fill into the overlay.
    fn fill_level(
        &mut self,
        level: TopologyLevel,
        req: &GangRequest,
        shape: &TaskShape,
        seed: u64,
        allow_soft: bool,
    ) -> Option<Vec<TaskAt>> {
        let need_whole = match shape.demand {
            DeviceDemand::Whole(n) => u64::from(n) * u64::from(req.tasks),
            _ => 0,
        };
        if level <= TopologyLevel::Host && need_whole > self.ov.max_devices_per_host as u64 {
            return None;
        }
        let by_remaining = self.policy.topology_aware()
            || self.policy.tie_break() == TieBreak::Hashed
            || self.policy.quota_mode() == QuotaMode::Static;
        // Packed: among domains that leave as much, the one whose parent domain is fullest.
        let parent = match (self.tie, level) {
            (Tie::Packed, TopologyLevel::Nvlink | TopologyLevel::Host) => Some(TopologyLevel::Rack),
            (Tie::Packed, TopologyLevel::Rack) => Some(TopologyLevel::Pod),
            (Tie::Packed, TopologyLevel::Pod) => Some(TopologyLevel::Zone),
            _ => None,
        };
        if let Some(p) = parent {
            self.ov.domains(p);
        }
        self.ov.domains(level);
        let dom = self.ov.domain_index(level).expect("built");
        let mut cands: Vec<(u64, u64, usize)> = dom
            .free_whole
            .iter()
            .enumerate()
            .filter(|(_, &f)| f >= need_whole)
            .map(|(di, &f)| {
                let up = match (parent, dom.hosts[di].first()) {
                    (Some(p), Some(&h)) => self.domain_free(p, h),
                    _ => 0,
                };
                (if by_remaining { f - need_whole } else { 0 }, up, di)
            })
            .collect();
        cands.sort_unstable();
        let scored = if self.policy.topology_aware() {
            DOMAINS_SCORED
        } else {
            1
        };
        let mut best: Option<(f64, Vec<TaskAt>)> = None;
        let mut successes = 0;
        for (attempt, &(_, _, di)) in cands.iter().enumerate() {
            if attempt >= DOMAIN_ATTEMPTS + successes {
                break;
            }
            let hosts = self.ov.domain_index(level).expect("built").hosts[di].clone();
            let mark = self.ov.mark();
            if let Some((placed, score)) =
                self.fill(&hosts, req.tasks, shape, seed, allow_soft, &[])
            {
                successes += 1;
                if scored == 1 {
                    return Some(placed);
                }
                self.ov.undo(mark);
                if best.as_ref().is_none_or(|(bs, _)| score > *bs) {
                    best = Some((score, placed));
                }
                if successes >= scored {
                    break;
                }
            }
        }
        let (_, placed) = best?;
        for (h, shares) in &placed {
            self.ov.put(*h, shares, shape.cpu, shape.mem);
        }
        Some(placed)
    }

    /// A repaired gang's placement that keeps the hosts it ran on (`resume.prefer`): its tasks
    /// filled into the domain of its required level around those hosts (any host without one),
    /// those hosts first. `None` (overlay unchanged) when the gang prefers nothing or does not fit
    /// there; the caller then places it anywhere.
    fn place_near(
        &mut self,
        req: &GangRequest,
        shape: &TaskShape,
        seed: u64,
        allow_soft: bool,
    ) -> Option<Vec<TaskAt>> {
        let view = self.ov.view;
        let prefer: Vec<usize> = req
            .resume
            .prefer
            .iter()
            .filter_map(|h| view.host_position(h))
            .collect();
        let &anchor = prefer.first()?;
        let hosts: Vec<usize> = match req.required {
            Some(level) => {
                let level = level.max(TopologyLevel::Host);
                let dom = self.ov.domains(level);
                let d = dom.host_domain[anchor] as usize;
                dom.hosts[d].clone()
            }
            None => (0..view.hosts().len()).collect(),
        };
        self.fill(&hosts, req.tasks, shape, seed, allow_soft, &prefer)
            .map(|(placed, _)| placed)
    }

    /// Places a whole gang in the overlay, or leaves the overlay unchanged and returns None.
    pub fn place(
        &mut self,
        req: &GangRequest,
        shape: &TaskShape,
        allow_soft: bool,
        soft_hosts: &[usize],
    ) -> Option<Vec<TaskAt>> {
        // Cheap capacity check first.
        match shape.demand {
            DeviceDemand::Whole(n) => {
                if self.ov.eligible_free_whole(shape) < u64::from(n) * u64::from(req.tasks) {
                    return None;
                }
            }
            DeviceDemand::Fraction(m) => {
                if self.ov.eligible_free_milli(shape) < u64::from(m) * u64::from(req.tasks) {
                    return None;
                }
            }
            DeviceDemand::None => {}
        }
        let seed = job_seed(&req.id);
        let extra: &[usize] = if allow_soft { soft_hosts } else { &[] };
        if let Some(placed) = self.place_near(req, shape, seed, allow_soft) {
            return Some(placed);
        }
        if req.tasks == 1 {
            let (h, pick, _) = self.best_host(shape, seed, extra, &[])?;
            let shares = self.take(h, shape, pick);
            return Some(vec![(h, shares)]);
        }
        let mut levels: Vec<TopologyLevel> = Vec::new();
        if let Some(r) = req.required {
            levels.push(r.max(TopologyLevel::Host));
        } else {
            let start = req.preferred.map(|p| p.max(TopologyLevel::Host));
            if self.policy.topology_aware() {
                let from = start.unwrap_or(TopologyLevel::Host);
                levels.extend(TopologyLevel::ALL.into_iter().filter(|&l| l >= from));
            } else if let Some(p) = start {
                levels.push(p);
            }
        }
        for level in levels {
            if let Some(p) = self.fill_level(level, req, shape, seed, allow_soft) {
                return Some(p);
            }
        }
        if req.required.is_some() {
            return None;
        }
        self.fill_cluster(req.tasks, shape, seed, extra)
    }
}

/// "16 x H100", "2 tasks x 0.5 of one T4", "4 CPU-only tasks".
pub fn describe_wanted(req: &GangRequest) -> String {
    let what = if req.models.is_empty() {
        req.kind.to_string().to_uppercase()
    } else {
        req.models.join("|")
    };
    match req.per_task.devices {
        DeviceDemand::None => format!("{} CPU-only task(s)", req.tasks),
        DeviceDemand::Whole(n) => {
            if req.tasks == 1 {
                format!("{n} x {what}")
            } else {
                format!(
                    "{} x {what} ({} tasks of {n})",
                    req.total_devices(),
                    req.tasks
                )
            }
        }
        DeviceDemand::Fraction(m) => format!(
            "{} task(s) x {} of one {what}",
            req.tasks,
            fmt_milli(u64::from(m))
        ),
    }
}

/// Why a gang that did not fit does not fit, in words.
pub(crate) fn explain(
    round: &mut Round<'_>,
    req: &GangRequest,
    shape: &TaskShape,
) -> PendingReason {
    let wanted = describe_wanted(req);
    let ov = &round.ov;
    let n_hosts = ov.info.len();
    if shape.demand != DeviceDemand::None
        && !ov
            .devices_by_model
            .iter()
            .enumerate()
            .any(|(m, &n)| n > 0 && shape.accept[m])
    {
        return PendingReason::NoMatchingDevices { wanted };
    }
    if let DeviceDemand::Whole(n) = shape.demand {
        let largest = ov.max_devices_per_host as u64;
        if u64::from(n) > largest {
            return PendingReason::NeverFits {
                wanted,
                per_task: n,
                largest_host: largest,
            };
        }
    }
    let (needed, free) = match shape.demand {
        DeviceDemand::Whole(n) => (
            u64::from(n) * u64::from(req.tasks),
            ov.eligible_free_whole(shape),
        ),
        DeviceDemand::Fraction(m) => {
            let free = (0..n_hosts)
                .filter(|&h| ov.info[h].ready && ov.host_accepts(h, shape))
                .map(|h| ov.slots[h].free.iter().filter(|&&f| f >= m).count() as u64)
                .sum();
            (u64::from(req.tasks), free)
        }
        DeviceDemand::None => (u64::from(req.tasks), u64::from(req.tasks)),
    };
    if free < needed {
        let fenced: u64 = match shape.demand {
            DeviceDemand::Whole(_) | DeviceDemand::Fraction(_) => ov
                .fenced_by_model
                .iter()
                .enumerate()
                .filter(|(m, _)| shape.accept[*m])
                .map(|(_, n)| n)
                .sum(),
            DeviceDemand::None => 0,
        };
        if fenced > 0 && free + fenced >= needed {
            return PendingReason::DevicesFenced {
                wanted,
                needed,
                free,
                fenced,
            };
        }
        return PendingReason::InsufficientCapacity {
            wanted,
            needed,
            free,
        };
    }
    if let (Some(level), DeviceDemand::Whole(_)) = (req.required, shape.demand) {
        if req.tasks > 1 || level == TopologyLevel::Nvlink {
            let key = (level, shape.accept.clone());
            let largest = match round.block_cache.get(&key) {
                Some(&(g, v)) if g == round.generation => v,
                _ => {
                    let v = largest_block(round, level, shape);
                    round.block_cache.insert(key, (round.generation, v));
                    v
                }
            };
            if largest < needed {
                return PendingReason::NoDomainFits {
                    wanted,
                    level,
                    needed,
                    largest_free_block: largest,
                };
            }
        }
    }
    let ov = &round.ov;
    let hosts_with_room = (0..n_hosts)
        .filter(|&h| ov.info[h].ready && ov.excluded[h] & EXCL_HARD == 0 && ov.fits(h, shape))
        .count();
    let per_task = match shape.demand {
        DeviceDemand::None => String::new(),
        DeviceDemand::Whole(n) => format!("{n} device(s), "),
        DeviceDemand::Fraction(m) => format!("{} of a device, ", fmt_milli(u64::from(m))),
    };
    let detail = format!(
        "{} host(s) have room for one task ({per_task}{} CPU, {} MiB memory){}",
        hosts_with_room,
        fmt_milli(shape.cpu),
        shape.mem,
        if req.tasks > 1 {
            format!(" and the {} tasks do not fit together", req.tasks)
        } else {
            String::new()
        }
    );
    PendingReason::NoHostFits {
        wanted,
        free,
        detail,
    }
}

/// Largest number of free whole accepted devices inside one domain of a level (for NVLink, one
/// NVLink domain of one host).
fn largest_block(round: &mut Round<'_>, level: TopologyLevel, shape: &TaskShape) -> u64 {
    let ov = &round.ov;
    let host_block = |h: usize, per_nvlink: bool| -> u64 {
        if !ov.info[h].ready || ov.excluded[h] & EXCL_HARD != 0 {
            return 0;
        }
        let devices = &ov.view.hosts()[h].spec.devices;
        let mut by: BTreeMap<u16, u64> = BTreeMap::new();
        for (i, &f) in ov.slots[h].free.iter().enumerate() {
            let m = ov.info[h].dev_model[i];
            if f == 1000 && m != u16::MAX && shape.accept[usize::from(m)] {
                let k = if per_nvlink {
                    devices[i].nvlink_domain
                } else {
                    0
                };
                *by.entry(k).or_default() += 1;
            }
        }
        by.values().copied().max().unwrap_or(0)
    };
    if level <= TopologyLevel::Host {
        let per_nvlink = level == TopologyLevel::Nvlink;
        return (0..ov.info.len())
            .map(|h| host_block(h, per_nvlink))
            .max()
            .unwrap_or(0);
    }
    let dom = round.ov.domains(level).hosts.clone();
    let ov = &round.ov;
    let host_block = |h: usize| -> u64 {
        if !ov.info[h].ready || ov.excluded[h] & EXCL_HARD != 0 {
            return 0;
        }
        ov.slots[h]
            .free
            .iter()
            .enumerate()
            .filter(|&(i, &f)| {
                let m = ov.info[h].dev_model[i];
                f == 1000 && m != u16::MAX && shape.accept[usize::from(m)]
            })
            .count() as u64
    };
    dom.iter()
        .map(|hs| hs.iter().map(|&h| host_block(h)).sum::<u64>())
        .max()
        .unwrap_or(0)
}

fn validate(req: &GangRequest) -> Option<String> {
    if req.tasks == 0 {
        return Some("a gang needs at least one task".into());
    }
    match req.per_task.devices {
        DeviceDemand::Whole(0) => Some("a task asks for 0 whole devices".into()),
        DeviceDemand::Fraction(m) if m == 0 || m >= 1000 => {
            Some(format!("a fractional share must be 1..=999 milli, got {m}"))
        }
        _ => None,
    }
}

/// A backfill reservation: the gang at the head, when it can start, and the hosts it would take.
#[derive(Clone, Debug)]
pub(crate) struct Reservation {
    pub job: JobId,
    pub start_ms: u64,
    pub hosts: Vec<usize>,
}

/// Earliest time (and hosts) at which `req` fits, releasing running gangs (and this round's
/// placements) in order of their expected end. None when it never fits with known runtimes.
fn reserve(
    round: &mut Round<'_>,
    req: &GangRequest,
    shape: &TaskShape,
    placed: &[(GangRequest, GangPlacement)],
    now_ms: u64,
) -> Option<Reservation> {
    let view = round.ov.view;
    let mut ends: Vec<(u64, &JobId, &GangPlacement)> = view
        .running()
        .values()
        .filter_map(|g| {
            g.request.estimated_runtime_ms.map(|e| {
                (
                    g.started_at_ms.saturating_add(e).max(now_ms),
                    &g.request.id,
                    &g.placement,
                )
            })
        })
        .chain(placed.iter().filter_map(|(r, p)| {
            r.estimated_runtime_ms
                .map(|e| (now_ms.saturating_add(e), &r.id, p))
        }))
        .collect();
    ends.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
    let mark = round.ov.mark();
    let need = req.total_milli();
    let mut attempts = 0;
    let mut found = None;
    let mut i = 0;
    while i < ends.len() {
        let t = ends[i].0;
        // Release everything that ends at t.
        while i < ends.len() && ends[i].0 == t {
            round.ov.release(ends[i].2);
            i += 1;
        }
        let enough = match shape.demand {
            DeviceDemand::Whole(_) => round.ov.eligible_free_whole(shape) * 1000 >= need,
            DeviceDemand::Fraction(_) => round.ov.eligible_free_milli(shape) >= need,
            DeviceDemand::None => true,
        };
        if !enough {
            continue;
        }
        attempts += 1;
        if let Some(p) = round.place(req, shape, true, &[]) {
            let mut hosts: Vec<usize> = p.iter().map(|(h, _)| *h).collect();
            hosts.sort_unstable();
            hosts.dedup();
            found = Some(Reservation {
                job: req.id.clone(),
                start_ms: t,
                hosts,
            });
            break;
        }
        if attempts >= 64 {
            break;
        }
    }
    round.ov.undo(mark);
    found
}

/// One scheduling round. See the module docs of [`crate::engine`].
pub fn schedule(
    view: &ClusterState,
    pending: &[GangRequest],
    config: &SchedulerConfig,
    now_ms: u64,
) -> Plan {
    let mut round = Round::new(view, pending, config);
    let policy = round.policy;
    let mut quota = QuotaBook::new(view, policy.quota_mode());
    // Where queues may borrow, a gang that stays inside its queue's guarantee goes before one that
    // would borrow, at equal priority (the Kueue/Volcano order). Without this, a borrower preempted
    // for a queue reclaiming its quota is older than the owner and would take the freed devices
    // back in the next round: preemption churn instead of reclaim.
    let borrows = |req: &GangRequest| {
        quota.mode == QuotaMode::Borrow
            && !quota.within_guarantee(config, &req.queue, req.total_milli())
    };
    // Queue order: the key, then the job id and the position (borrowed, not cloned: a backlog is
    // sorted every round).
    let keys: Vec<_> = pending
        .iter()
        .map(|req| {
            let (priority, submitted) = policy.queue_key(req);
            // A repair (its device failed under it) goes before ordinary pending work.
            let ordinary = !req.resume.repair;
            (ordinary, priority, borrows(req), submitted)
        })
        .collect();
    let mut order: Vec<usize> = (0..pending.len()).collect();
    order
        .sort_unstable_by(|&a, &b| (keys[a], &pending[a].id, a).cmp(&(keys[b], &pending[b].id, b)));
    let mut plan = Plan::default();
    // Membership only (never iterated): hashed, so a backlog costs no string comparisons here.
    let mut seen: FxHashSet<&JobId> =
        FxHashSet::with_capacity_and_hasher(pending.len(), Default::default());
    let mut blocked_queues: BTreeMap<&QueueName, &JobId> = BTreeMap::new();
    let mut reservation: Option<Reservation> = None;
    let mut reserve_tried = false;
    let mut placed: Vec<(GangRequest, GangPlacement)> = Vec::new();
    let mut victims: BTreeSet<JobId> = BTreeSet::new();
    let mut preemption_attempts = 0usize;
    let mut pending_out: Vec<(usize, PendingReason)> = Vec::new();
    let host_names: Vec<&HostName> = view.hosts().iter().map(|h| &h.spec.name).collect();

    for (rank, &i) in order.iter().enumerate() {
        let req = &pending[i];
        let mut pend = |reason: PendingReason| pending_out.push((i, reason));
        if rank >= config.max_gangs_per_round {
            pend(PendingReason::Policy {
                plugin: "round-limit".into(),
                message: format!(
                    "not examined this round: only the first {} gangs are",
                    config.max_gangs_per_round
                ),
            });
            continue;
        }
        if let Some(msg) = validate(req) {
            pend(PendingReason::Policy {
                plugin: "validate".into(),
                message: msg,
            });
            continue;
        }
        if view.running().contains_key(&req.id) || !seen.insert(&req.id) {
            pend(PendingReason::Policy {
                plugin: "validate".into(),
                message: "the job is already running or listed twice".into(),
            });
            continue;
        }
        if req.resume.not_before_ms > now_ms {
            pend(PendingReason::Backoff {
                until_ms: req.resume.not_before_ms,
            });
            continue;
        }
        if let Some(head) = blocked_queues.get(&req.queue) {
            pend(PendingReason::BlockedBehind {
                job: (*head).clone(),
                why: format!(
                    "{} serves queue {} strictly in order and that job does not fit yet",
                    policy.name(),
                    req.queue
                ),
            });
            continue;
        }
        let borrowed = match quota.admit(config, req) {
            Ok(b) => b,
            Err(reason) => {
                pend(reason);
                continue;
            }
        };
        let shape = TaskShape::new(req, &round.ov.models);
        // A migrating gang may not use the hosts it leaves (or may use only the ones named); those
        // are held back for this gang alone and readmitted after it.
        let held = round.ov.hold_back_filtered(&req.hosts, &host_names);
        'gang: {
            let (soft_ok, soft_hosts): (bool, Vec<usize>) = match &reservation {
                Some(r) => {
                    let ends_before = req
                        .estimated_runtime_ms
                        .is_some_and(|e| now_ms.saturating_add(e) <= r.start_ms);
                    (ends_before, r.hosts.clone())
                }
                None => (true, Vec::new()),
            };
            if let Some(tasks) = round.place(req, &shape, soft_ok, &soft_hosts) {
                round.ov.commit();
                round.generation += 1;
                let placement = GangPlacement {
                    job: req.id.clone(),
                    queue: req.queue.clone(),
                    tasks: tasks
                        .into_iter()
                        .map(|(h, devices)| TaskPlacement {
                            host: view.hosts()[h].spec.name.clone(),
                            devices,
                            cpu_milli: req.per_task.cpu_milli,
                            memory_mib: req.per_task.memory_mib,
                        })
                        .collect(),
                    borrowed_milli: borrowed,
                };
                quota.charge(&req.queue, req.total_milli());
                plan.placements.push(placement.clone());
                placed.push((req.clone(), placement));
                break 'gang;
            }
            // Did not fit.
            let mut reason = explain(&mut round, req, &shape);
            if !soft_ok {
                if let Some(r) = &reservation {
                    let mark = round.ov.mark();
                    if round.place(req, &shape, true, &soft_hosts).is_some() {
                        round.ov.undo(mark);
                        reason = PendingReason::BlockedBehind {
                        job: r.job.clone(),
                        why: format!(
                            "its backfill reservation holds the hosts this job would take from t={} ms, and this job is not expected to end before then",
                            r.start_ms
                        ),
                    };
                    }
                }
            }
            let mut handled = false;
            if policy.preempts() && config.preemption && preemption_attempts < 16 {
                preemption_attempts += 1;
                if let Some(found) = preemption::find_victims(
                    &mut round, req, &shape, &quota, config, &victims, now_ms,
                ) {
                    for h in &found.hosts {
                        round.ov.exclude(*h, EXCL_HARD);
                    }
                    round.generation += 1;
                    let ids: Vec<JobId> = found.victims.iter().map(|v| v.victim.clone()).collect();
                    for v in found.victims {
                        if let Some(g) = view.running().get(&v.victim) {
                            quota.refund(&g.request.queue, g.request.total_milli());
                        }
                        victims.insert(v.victim.clone());
                        plan.preemptions.push(v);
                    }
                    quota.charge(&req.queue, req.total_milli());
                    reason = PendingReason::AwaitingPreemption { victims: ids };
                    handled = true;
                }
            }
            // A gang that can never fit holds no queue up: waiting behind it would be forever.
            let never_fits = matches!(reason, PendingReason::NeverFits { .. });
            if !handled && !never_fits {
                match policy.head_of_line() {
                    HeadOfLine::Skip => {}
                    HeadOfLine::StrictPerQueue => {
                        blocked_queues.insert(&req.queue, &req.id);
                    }
                    HeadOfLine::Reserve => {
                        // EASY: only the head (the first gang the policy lets reserve) gets a
                        // reservation; which gangs may is the policy's call.
                        if !reserve_tried && super::policy::may_reserve(policy, &reason) {
                            reserve_tried = true;
                            if let Some(r) = reserve(&mut round, req, &shape, &placed, now_ms) {
                                for &h in &r.hosts {
                                    round.ov.exclude(h, EXCL_SOFT);
                                }
                                round.generation += 1;
                                reservation = Some(r);
                            }
                        }
                    }
                }
            }
            pending_out.push((i, reason));
        }
        round.ov.readmit(&held);
    }
    plan.pending = pending_out
        .into_iter()
        .map(|(i, reason)| PendingJob {
            job: pending[i].id.clone(),
            reason,
        })
        .collect();
    plan
}
