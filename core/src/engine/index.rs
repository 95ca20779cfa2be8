//! The round's overlay: free capacity as the round goes (earlier gangs of the round included), with
//! an undo log for all-or-nothing trials, and the indexes that make a round over 10,000 hosts fast:
//!
//! - hosts grouped into *shape classes* (same model, same free CPU/memory, same multiset of free
//!   device shares): every score plugin depends on a host's shape only, so one host per class is
//!   scored, not every host; classes are kept sorted by free capacity for best-fit style pruning;
//! - free whole devices per topology domain (per level, built on first use), to prune domains;
//! - free whole devices and free milli per device model, for O(1) "not enough capacity" answers.

use super::cluster::ClusterState;
use super::device::{DeviceKind, MILLI_PER_DEVICE};
use super::job::{DeviceDemand, GangRequest, HostFilter};
use super::plan::{DeviceShare, GangPlacement};
use super::topology::TopologyLevel;
use gangway_proto::ids::HostName;
use rustc_hash::FxHashMap;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Free capacity of one host in the overlay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostSlot {
    /// Free milli per device index.
    pub free: Vec<u32>,
    pub cpu: u64,
    pub mem: u64,
}

impl HostSlot {
    pub fn free_total(&self) -> u64 {
        self.free.iter().map(|&m| u64::from(m)).sum()
    }
}

/// What never changes in a round about a host.
#[derive(Clone, Debug)]
pub struct HostInfo {
    /// Model id per device.
    pub dev_model: Vec<u16>,
    /// The model id when all devices share one model.
    pub uniform: Option<u16>,
    /// Whether the host has more than one NVLink domain.
    pub multi_nvlink: bool,
    /// NVLink domain per device, numbered 0.. in order of appearance (only for hosts with 2 to 16
    /// domains; empty otherwise).
    pub nv: Vec<u8>,
    pub nv_domains: u8,
    pub ready: bool,
}

/// One task of a gang, normalised for the hot loops.
#[derive(Clone, Debug)]
pub struct TaskShape {
    pub kind: DeviceKind,
    pub demand: DeviceDemand,
    pub cpu: u64,
    pub mem: u64,
    /// Accepted model ids (kind and model list folded in).
    pub accept: Vec<bool>,
    /// Every task must sit in one NVLink domain.
    pub nvlink: bool,
    /// Milli per device (1000 whole, m fraction, 0 none).
    pub per_device: u32,
    /// Devices per task (n whole, 1 fraction, 0 none).
    pub count: u32,
}

impl TaskShape {
    pub fn new(req: &GangRequest, models: &ModelTable) -> Self {
        let accept = models
            .kinds
            .iter()
            .zip(&models.names)
            .map(|(k, n)| *k == req.kind && req.accepts_model(n))
            .collect();
        let (per_device, count) = match req.per_task.devices {
            DeviceDemand::None => (0, 0),
            DeviceDemand::Whole(n) => (MILLI_PER_DEVICE, n),
            DeviceDemand::Fraction(m) => (m, 1),
        };
        Self {
            kind: req.kind,
            demand: req.per_task.devices,
            cpu: req.per_task.cpu_milli,
            mem: req.per_task.memory_mib,
            accept,
            nvlink: req.required == Some(TopologyLevel::Nvlink),
            per_device,
            count,
        }
    }

    /// Milli-devices of one task.
    pub fn milli(&self) -> u64 {
        u64::from(self.per_device) * u64::from(self.count)
    }
}

/// Device models by id (ids follow the cluster's ordered model map: deterministic).
#[derive(Clone, Debug, Default)]
pub struct ModelTable {
    pub names: Vec<String>,
    pub kinds: Vec<DeviceKind>,
    by_name: HashMap<String, u16>,
}

impl ModelTable {
    pub fn new(view: &ClusterState) -> Self {
        let mut t = ModelTable::default();
        for (i, (name, m)) in view.models().iter().enumerate() {
            t.names.push(name.clone());
            t.kinds.push(m.kind);
            t.by_name.insert(name.clone(), i as u16);
        }
        t
    }

    pub fn id(&self, name: &str) -> Option<u16> {
        self.by_name.get(name).copied()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ClassKey {
    /// Uniform model id, or `u32::MAX - host` for hosts that cannot share a class.
    model: u32,
    cpu: u64,
    mem: u64,
    /// Free milli per device, sorted descending.
    free: Vec<u32>,
}

#[derive(Clone, Debug, Default)]
struct Class {
    members: BTreeSet<usize>,
    free_total: u64,
}

const NONE: u32 = u32::MAX;

#[derive(Clone, Debug, Default)]
struct ClassIndex {
    classes: Vec<Class>,
    by_key: HashMap<ClassKey, usize>,
    host_class: Vec<u32>,
    /// Non-empty classes by (free milli total, id).
    live: BTreeSet<(u64, usize)>,
}

/// Hosts of each domain of one topology level.
#[derive(Clone, Debug)]
pub struct DomainIndex {
    pub level: TopologyLevel,
    pub keys: Vec<String>,
    pub hosts: Vec<Vec<usize>>,
    pub host_domain: Vec<u32>,
    /// Free whole devices of ready hosts, per domain.
    pub free_whole: Vec<u64>,
}

/// Why a host is held back this round.
pub const EXCL_HARD: u8 = 1;
/// Held for a backfill reservation: only gangs that end before it may use it.
pub const EXCL_SOFT: u8 = 2;

/// The round's view of free capacity.
#[derive(Clone, Debug)]
pub struct Overlay<'a> {
    pub view: &'a ClusterState,
    pub models: ModelTable,
    pub info: Vec<HostInfo>,
    pub slots: Vec<HostSlot>,
    pub excluded: Vec<u8>,
    log: Vec<(usize, HostSlot)>,
    use_classes: bool,
    classes: ClassIndex,
    domains: Vec<Option<DomainIndex>>,
    /// Free whole devices and free milli of ready hosts, per model id.
    pub free_whole_by_model: Vec<u64>,
    pub free_milli_by_model: Vec<u64>,
    pub max_devices_per_host: usize,
    /// Devices of each model id in the cluster (any host state).
    pub devices_by_model: Vec<u64>,
    /// Fenced devices of ready hosts, per model id.
    pub fenced_by_model: Vec<u64>,
}

fn whole_count(slot: &HostSlot) -> u64 {
    slot.free.iter().filter(|&&m| m == MILLI_PER_DEVICE).count() as u64
}

impl<'a> Overlay<'a> {
    /// The overlay of a view, with the shape-class index (worth it for rounds with many gangs).
    pub fn new(view: &'a ClusterState) -> Self {
        Self::with_classes(view, true)
    }

    /// The overlay of a view; `classes` builds the shape-class index (otherwise
    /// [`Overlay::has_classes`] is false and callers scan hosts directly).
    pub fn with_classes(view: &'a ClusterState, classes: bool) -> Self {
        let models = ModelTable::new(view);
        let n = view.hosts().len();
        let mut info = Vec::with_capacity(n);
        let mut slots = Vec::with_capacity(n);
        let mut max_devices_per_host = 0;
        for h in view.hosts() {
            let mut dev_model = Vec::with_capacity(h.spec.devices.len());
            let mut last: Option<(&str, u16)> = None;
            for d in &h.spec.devices {
                let id = match last {
                    Some((name, id)) if name == d.model => id,
                    _ => models.id(&d.model).unwrap_or(u16::MAX),
                };
                last = Some((d.model.as_str(), id));
                dev_model.push(id);
            }
            let uniform = match dev_model.first() {
                Some(&f) if dev_model.iter().all(|&m| m == f) && f != u16::MAX => Some(f),
                None => Some(u16::MAX - 1),
                _ => None,
            };
            let multi_nvlink = h
                .spec
                .devices
                .iter()
                .any(|d| d.nvlink_domain != h.spec.devices[0].nvlink_domain);
            max_devices_per_host = max_devices_per_host.max(h.spec.devices.len());
            let mut nv = Vec::new();
            let mut nv_domains = 0u8;
            if multi_nvlink {
                let mut ids: Vec<u16> = Vec::new();
                for d in &h.spec.devices {
                    let pos = match ids.iter().position(|&x| x == d.nvlink_domain) {
                        Some(p) => p,
                        None => {
                            ids.push(d.nvlink_domain);
                            ids.len() - 1
                        }
                    };
                    nv.push(pos.min(255) as u8);
                }
                if ids.len() <= 16 {
                    nv_domains = ids.len() as u8;
                } else {
                    nv.clear();
                }
            }
            info.push(HostInfo {
                dev_model,
                uniform,
                multi_nvlink,
                nv,
                nv_domains,
                ready: h.spec.state.accepts_new_work(),
            });
            slots.push(HostSlot {
                free: h.free_milli.clone(),
                cpu: h.free_cpu_milli,
                mem: h.free_memory_mib,
            });
        }
        let nm = models.names.len();
        let mut devices_by_model = vec![0u64; nm];
        let mut fenced_by_model = vec![0u64; nm];
        for (i, hs) in info.iter().zip(view.hosts()) {
            for &m in &i.dev_model {
                if usize::from(m) < nm {
                    devices_by_model[usize::from(m)] += 1;
                }
            }
            // Fenced devices of ready hosts (most hosts have none).
            let fenced = hs.fenced.keys().filter(|_| i.ready);
            for m in fenced.filter_map(|&d| i.dev_model.get(usize::from(d))) {
                if usize::from(*m) < nm {
                    fenced_by_model[usize::from(*m)] += 1;
                }
            }
        }
        let mut ov = Overlay {
            view,
            models,
            info,
            slots,
            excluded: vec![0; n],
            log: Vec::new(),
            use_classes: classes,
            classes: ClassIndex {
                host_class: vec![NONE; n],
                ..ClassIndex::default()
            },
            domains: vec![None; TopologyLevel::ALL.len()],
            free_whole_by_model: vec![0; nm],
            free_milli_by_model: vec![0; nm],
            max_devices_per_host,
            devices_by_model,
            fenced_by_model,
        };
        for h in 0..n {
            ov.account(h, true);
            ov.index_insert(h);
        }
        ov
    }

    fn class_key(&self, h: usize) -> ClassKey {
        let info = &self.info[h];
        let slot = &self.slots[h];
        let model = match info.uniform {
            Some(m) if !info.multi_nvlink || !info.nv.is_empty() => u32::from(m),
            _ => u32::MAX - h as u32,
        };
        let free = if info.multi_nvlink && !info.nv.is_empty() {
            // Free shares per NVLink domain (each sorted), domains sorted, with separators: hosts
            // with equal keys offer the same placements.
            let mut doms: Vec<Vec<u32>> = vec![Vec::new(); usize::from(info.nv_domains)];
            for (i, &f) in slot.free.iter().enumerate() {
                doms[usize::from(info.nv[i])].push(f);
            }
            for d in &mut doms {
                d.sort_unstable_by(|a, b| b.cmp(a));
            }
            doms.sort_unstable();
            let mut key = Vec::with_capacity(slot.free.len() + doms.len());
            for d in doms {
                key.extend(d);
                key.push(u32::MAX);
            }
            key
        } else {
            let mut free = slot.free.clone();
            free.sort_unstable_by(|a, b| b.cmp(a));
            free
        };
        ClassKey {
            model,
            cpu: slot.cpu,
            mem: slot.mem,
            free,
        }
    }

    pub fn has_classes(&self) -> bool {
        self.use_classes
    }

    fn indexable(&self, h: usize) -> bool {
        self.use_classes && self.info[h].ready && self.excluded[h] == 0
    }

    fn index_insert(&mut self, h: usize) {
        if !self.indexable(h) {
            return;
        }
        let key = self.class_key(h);
        let free_total = self.slots[h].free_total();
        let id = match self.classes.by_key.get(&key) {
            Some(&id) => id,
            None => {
                let id = self.classes.classes.len();
                self.classes.classes.push(Class {
                    members: BTreeSet::new(),
                    free_total,
                });
                self.classes.by_key.insert(key, id);
                id
            }
        };
        let c = &mut self.classes.classes[id];
        if c.members.is_empty() {
            self.classes.live.insert((free_total, id));
        }
        c.members.insert(h);
        self.classes.host_class[h] = id as u32;
    }

    fn index_remove(&mut self, h: usize) {
        let id = self.classes.host_class[h];
        if id == NONE {
            return;
        }
        let id = id as usize;
        let c = &mut self.classes.classes[id];
        c.members.remove(&h);
        if c.members.is_empty() {
            self.classes.live.remove(&(c.free_total, id));
        }
        self.classes.host_class[h] = NONE;
    }

    /// Adds (or removes) a host's free capacity to the per-model and per-domain totals.
    fn account(&mut self, h: usize, add: bool) {
        if !self.info[h].ready {
            return;
        }
        let slot = &self.slots[h];
        let info = &self.info[h];
        for (i, &m) in slot.free.iter().enumerate() {
            let model = info.dev_model[i];
            if model == u16::MAX {
                continue;
            }
            let model = usize::from(model);
            let whole = u64::from(m == MILLI_PER_DEVICE);
            if add {
                self.free_whole_by_model[model] += whole;
                self.free_milli_by_model[model] += u64::from(m);
            } else {
                self.free_whole_by_model[model] -= whole;
                self.free_milli_by_model[model] -= u64::from(m);
            }
        }
        let whole = whole_count(slot);
        for d in self.domains.iter_mut().flatten() {
            let di = d.host_domain[h] as usize;
            if add {
                d.free_whole[di] += whole;
            } else {
                d.free_whole[di] -= whole;
            }
        }
    }

    fn replace_slot(&mut self, h: usize, slot: HostSlot) -> HostSlot {
        self.index_remove(h);
        self.account(h, false);
        let old = std::mem::replace(&mut self.slots[h], slot);
        self.account(h, true);
        self.index_insert(h);
        old
    }

    /// Sets a host's free state, logged for [`Overlay::undo`].
    pub fn set_slot(&mut self, h: usize, slot: HostSlot) {
        let old = self.replace_slot(h, slot);
        self.log.push((h, old));
    }

    pub fn mark(&self) -> usize {
        self.log.len()
    }

    /// Rolls back every change made since `mark`.
    pub fn undo(&mut self, mark: usize) {
        while self.log.len() > mark {
            let (h, old) = self.log.pop().expect("log entry");
            self.replace_slot(h, old);
        }
    }

    /// Forgets the undo log (changes stay).
    pub fn commit(&mut self) {
        self.log.clear();
    }

    /// Holds a host back (`EXCL_HARD` or `EXCL_SOFT`); not undone by [`Overlay::undo`].
    pub fn exclude(&mut self, h: usize, how: u8) {
        self.index_remove(h);
        self.excluded[h] |= how;
    }

    /// Hard-excludes, for one gang, every host its filter rejects and that is not excluded already;
    /// returns them for [`Overlay::readmit`].
    pub fn hold_back_filtered(&mut self, filter: &HostFilter, names: &[&HostName]) -> Vec<usize> {
        if filter.is_empty() {
            return Vec::new();
        }
        let held: Vec<usize> = (0..self.info.len())
            .filter(|&h| self.excluded[h] & EXCL_HARD == 0 && !filter.allows(names[h]))
            .collect();
        for &h in &held {
            self.exclude(h, EXCL_HARD);
        }
        held
    }

    /// Undoes [`Overlay::hold_back_filtered`].
    pub fn readmit(&mut self, held: &[usize]) {
        for &h in held {
            self.excluded[h] &= !EXCL_HARD;
            self.index_insert(h);
        }
    }

    fn device_ok(&self, h: usize, i: usize, shape: &TaskShape) -> bool {
        let m = self.info[h].dev_model[i];
        m != u16::MAX && shape.accept[usize::from(m)]
    }

    /// Whether the host accepts the task's device kind/model at all.
    pub fn host_accepts(&self, h: usize, shape: &TaskShape) -> bool {
        match self.info[h].uniform {
            Some(m) if usize::from(m) < shape.accept.len() => shape.accept[usize::from(m)],
            Some(_) => false,
            None => (0..self.info[h].dev_model.len()).any(|i| self.device_ok(h, i, shape)),
        }
    }

    /// Filter plugin, common to every policy: CPU, memory and devices of the task fit on the host
    /// as it is in the overlay (readiness and exclusions are the caller's business).
    pub fn fits(&self, h: usize, shape: &TaskShape) -> bool {
        let slot = &self.slots[h];
        if slot.cpu < shape.cpu || slot.mem < shape.mem {
            return false;
        }
        match shape.demand {
            DeviceDemand::None => true,
            DeviceDemand::Whole(n) => {
                if !self.host_accepts(h, shape) {
                    return false;
                }
                let info = &self.info[h];
                if info.multi_nvlink {
                    if info.nv.is_empty() || info.uniform.is_none() {
                        return self.choose_whole(h, shape).is_some();
                    }
                    let mut per = [0u32; 16];
                    let mut total = 0u32;
                    for (i, &f) in slot.free.iter().enumerate() {
                        if f == MILLI_PER_DEVICE {
                            per[usize::from(info.nv[i])] += 1;
                            total += 1;
                        }
                    }
                    if total < n {
                        return false;
                    }
                    return !shape.nvlink || per.iter().any(|&c| c >= n);
                }
                let uniform_ok = self.info[h].uniform.is_some();
                let free = slot
                    .free
                    .iter()
                    .enumerate()
                    .filter(|&(i, &m)| {
                        m == MILLI_PER_DEVICE && (uniform_ok || self.device_ok(h, i, shape))
                    })
                    .count();
                free >= n as usize
            }
            DeviceDemand::Fraction(m) => {
                if !self.host_accepts(h, shape) {
                    return false;
                }
                let uniform_ok = self.info[h].uniform.is_some();
                slot.free
                    .iter()
                    .enumerate()
                    .any(|(i, &f)| f >= m && (uniform_ok || self.device_ok(h, i, shape)))
            }
        }
    }

    /// Whole devices for one task: inside one NVLink domain when possible (the fullest domain that
    /// still fits, so big domains stay whole), lowest indices first.
    pub fn choose_whole(&self, h: usize, shape: &TaskShape) -> Option<Vec<u16>> {
        let DeviceDemand::Whole(n) = shape.demand else {
            return Some(Vec::new());
        };
        let n = n as usize;
        let slot = &self.slots[h];
        let free: Vec<u16> = (0..slot.free.len())
            .filter(|&i| slot.free[i] == MILLI_PER_DEVICE && self.device_ok(h, i, shape))
            .map(|i| i as u16)
            .collect();
        if free.len() < n {
            return None;
        }
        if !self.info[h].multi_nvlink {
            return Some(free[..n].to_vec());
        }
        let devices = &self.view.hosts()[h].spec.devices;
        let mut by_domain: BTreeMap<u16, Vec<u16>> = BTreeMap::new();
        for &i in &free {
            by_domain
                .entry(devices[usize::from(i)].nvlink_domain)
                .or_default()
                .push(i);
        }
        let best = by_domain
            .values()
            .filter(|v| v.len() >= n)
            .min_by_key(|v| v.len());
        match best {
            Some(v) => Some(v[..n].to_vec()),
            None if shape.nvlink => None,
            None => Some(free[..n].to_vec()),
        }
    }

    /// Commits one task on a host; the caller checked [`Overlay::fits`].
    pub fn take(&mut self, h: usize, shape: &TaskShape, device: Option<u16>) -> Vec<DeviceShare> {
        let mut slot = self.slots[h].clone();
        let shares: Vec<DeviceShare> = match shape.demand {
            DeviceDemand::None => Vec::new(),
            DeviceDemand::Whole(_) => self
                .choose_whole(h, shape)
                .expect("take() after fits()")
                .into_iter()
                .map(|index| DeviceShare {
                    index,
                    milli: MILLI_PER_DEVICE,
                })
                .collect(),
            DeviceDemand::Fraction(m) => {
                let index = device
                    .filter(|&i| slot.free[usize::from(i)] >= m)
                    .or_else(|| {
                        (0..slot.free.len())
                            .find(|&i| slot.free[i] >= m && self.device_ok(h, i, shape))
                            .map(|i| i as u16)
                    })
                    .expect("take() after fits()");
                vec![DeviceShare { index, milli: m }]
            }
        };
        for s in &shares {
            slot.free[usize::from(s.index)] -= s.milli;
        }
        slot.cpu -= shape.cpu;
        slot.mem -= shape.mem;
        self.set_slot(h, slot);
        shares
    }

    /// Commits exact shares for one task (a placement computed earlier on this same state).
    pub fn put(&mut self, h: usize, shares: &[DeviceShare], cpu: u64, mem: u64) {
        let mut slot = self.slots[h].clone();
        for s in shares {
            slot.free[usize::from(s.index)] -= s.milli;
        }
        slot.cpu -= cpu;
        slot.mem -= mem;
        self.set_slot(h, slot);
    }

    /// Gives back what a placement holds (to ask "what if it were gone"); logged for undo.
    pub fn release(&mut self, placement: &GangPlacement) {
        for tp in &placement.tasks {
            let Some(h) = self.view.host_position(&tp.host) else {
                continue;
            };
            let mut slot = self.slots[h].clone();
            let fenced = &self.view.hosts()[h].fenced;
            for s in &tp.devices {
                // A fenced device stays unusable whoever leaves it.
                if fenced.contains_key(&s.index) {
                    continue;
                }
                if let Some(f) = slot.free.get_mut(usize::from(s.index)) {
                    *f = (*f + s.milli).min(MILLI_PER_DEVICE);
                }
            }
            slot.cpu += tp.cpu_milli;
            slot.mem += tp.memory_mib;
            self.set_slot(h, slot);
        }
    }

    /// Free whole devices of ready hosts that the task accepts.
    pub fn eligible_free_whole(&self, shape: &TaskShape) -> u64 {
        self.free_whole_by_model
            .iter()
            .enumerate()
            .filter(|(m, _)| shape.accept[*m])
            .map(|(_, f)| *f)
            .sum()
    }

    /// Free milli of ready hosts that the task accepts.
    pub fn eligible_free_milli(&self, shape: &TaskShape) -> u64 {
        self.free_milli_by_model
            .iter()
            .enumerate()
            .filter(|(m, _)| shape.accept[*m])
            .map(|(_, f)| *f)
            .sum()
    }

    /// Non-empty shape classes with at least `min_free` milli free, tightest first:
    /// (class id, lowest host of the class).
    pub fn classes_from(&self, min_free: u64) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.classes.live.range((min_free, 0)..).map(|&(_, id)| {
            let rep = *self.classes.classes[id]
                .members
                .first()
                .expect("live class has members");
            (id, rep)
        })
    }

    pub fn live_classes(&self) -> usize {
        self.classes.live.len()
    }

    pub fn class_members(&self, id: usize) -> &BTreeSet<usize> {
        &self.classes.classes[id].members
    }

    /// The domains of a level, built on first use.
    pub fn domains(&mut self, level: TopologyLevel) -> &DomainIndex {
        self.build_domains(&[level]);
        self.domains[level as usize].as_ref().expect("built")
    }

    /// Builds the domain indexes of several levels at once (one pass over the hosts).
    pub fn build_domains(&mut self, levels: &[TopologyLevel]) {
        let missing: Vec<TopologyLevel> = levels
            .iter()
            .copied()
            .filter(|&l| self.domains[l as usize].is_none())
            .collect();
        if missing.is_empty() {
            return;
        }
        for (level, keys) in domain_hosts(self.view, &missing) {
            let mut host_domain = vec![0u32; self.view.hosts().len()];
            let mut free_whole = Vec::with_capacity(keys.len());
            let mut ks = Vec::with_capacity(keys.len());
            let mut hosts = Vec::with_capacity(keys.len());
            for (di, (k, hs)) in keys.into_iter().enumerate() {
                let mut f = 0;
                for &h in &hs {
                    host_domain[h] = di as u32;
                    if self.info[h].ready {
                        f += whole_count(&self.slots[h]);
                    }
                }
                free_whole.push(f);
                ks.push(k);
                hosts.push(hs);
            }
            self.domains[level as usize] = Some(DomainIndex {
                level,
                keys: ks,
                hosts,
                host_domain,
                free_whole,
            });
        }
    }

    pub fn domain_index(&self, level: TopologyLevel) -> Option<&DomainIndex> {
        self.domains[level as usize].as_ref()
    }
}

/// Topology fields that name a host's domain at a level: datacenter, zone, pod, rack, host name;
/// the ones below the level empty.
type Fields<'v> = [&'v str; 5];

fn depth(level: TopologyLevel) -> usize {
    match level {
        TopologyLevel::Datacenter => 1,
        TopologyLevel::Zone => 2,
        TopologyLevel::Pod => 3,
        TopologyLevel::Rack => 4,
        TopologyLevel::Host | TopologyLevel::Nvlink => 5,
    }
}

fn truncated<'v>(all: &Fields<'v>, level: TopologyLevel) -> Fields<'v> {
    let mut fields = [""; 5];
    let d = depth(level);
    fields[..d].copy_from_slice(&all[..d]);
    fields
}

/// For each of `levels`, the hosts of each domain by domain key ([`ClusterState::domain_key`]),
/// in key order. One pass groups the hosts by their borrowed topology fields at the finest level
/// asked for; coarser levels group those groups; a key string is built once per domain, not per
/// host (a round builds these for every level it uses).
fn domain_hosts(
    view: &ClusterState,
    levels: &[TopologyLevel],
) -> Vec<(TopologyLevel, BTreeMap<String, Vec<usize>>)> {
    let finest = levels.iter().copied().max_by_key(|&l| depth(l));
    let Some(finest) = finest else {
        return Vec::new();
    };
    let fields_of = |h: usize| {
        let hs = &view.hosts()[h];
        let t = &hs.spec.topology;
        [
            t.datacenter.as_str(),
            t.zone.as_str(),
            t.pod.as_str(),
            t.rack.as_str(),
            hs.spec.name.as_str(),
        ]
    };
    let all: Vec<usize> = (0..view.hosts().len()).collect();
    let finest_groups = group_runs(all.iter().map(|&h| {
        (
            truncated(&fields_of(h), finest),
            std::slice::from_ref(&all[h]),
        )
    }));
    levels
        .iter()
        .map(|&level| {
            let mut keys: BTreeMap<String, Vec<usize>> = BTreeMap::new();
            let coarse = if level == finest {
                finest_groups.clone()
            } else {
                group_runs(
                    finest_groups
                        .iter()
                        .map(|(fields, hosts)| (truncated(fields, level), hosts.as_slice())),
                )
            };
            for (_, hosts) in coarse {
                let first = &view.hosts()[hosts[0]].spec;
                let key = ClusterState::domain_key(&first.topology, &first.name, level);
                keys.entry(key).or_default().extend(hosts);
            }
            for hosts in keys.values_mut() {
                hosts.sort_unstable();
            }
            (level, keys)
        })
        .collect()
}

/// Merges items with equal fields, in first-seen order. Items of one group usually come one after
/// another (hosts of a rack are registered together): a run costs one comparison per item with
/// the previous one, and only a run's first item a map lookup.
fn group_runs<'v, 'h>(
    items: impl Iterator<Item = (Fields<'v>, &'h [usize])>,
) -> Vec<(Fields<'v>, Vec<usize>)> {
    let mut groups: Vec<(Fields<'v>, Vec<usize>)> = Vec::new();
    let mut by_fields: FxHashMap<Fields<'v>, usize> = FxHashMap::default();
    let mut last: Option<usize> = None;
    for (fields, hosts) in items {
        let g = match last {
            Some(g) if groups[g].0 == fields => g,
            _ => *by_fields.entry(fields).or_insert_with(|| {
                groups.push((fields, Vec::new()));
                groups.len() - 1
            }),
        };
        groups[g].1.extend_from_slice(hosts);
        last = Some(g);
    }
    groups
}
