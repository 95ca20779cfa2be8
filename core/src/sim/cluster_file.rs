//! The simulator's CLUSTER file: a small TOML description of hosts, the topology tree above them,
//! queues with guaranteed quotas and the scheduler's tuning.
//!
//! ```toml
//! name = "philly"                 # optional, for reports
//! datacenter = "philly"           # optional, default "dc1"
//!
//! [[models]]
//! name = "philly-gpu"
//! kind = "gpu"                    # gpu | tpu
//! memory_mib = 0                  # optional
//!
//! [layout]                        # hosts fill racks, racks fill pods, pods fill zones, in file order
//! hosts_per_rack = 8
//! racks_per_pod = 10
//! pods_per_zone = 5               # optional, default: one zone
//!
//! [[host_groups]]
//! count = 400
//! devices = 8
//! model = "philly-gpu"
//! nvlink_domains = 2              # optional, default 1: devices split evenly into NVLink domains
//! cpu_milli = 0                   # optional
//! memory_mib = 0                  # optional
//! name_prefix = "h"               # optional
//!
//! [[queues]]
//! name = "6214e9"
//! guaranteed_devices = 583
//! may_borrow = true               # optional, default true
//!
//! [scheduler]                     # optional; defaults are the engine's SchedulerConfig::default()
//! preemption = true
//! min_runtime_s = 600
//! max_gangs_per_round = 100000
//!
//! [replay]                        # optional
//! tick_s = 300                    # scheduling round every tick while gangs wait (0: events only)
//! default_queue = "6214e9"        # queue for trace jobs whose queue is not listed (else: an error)
//! ```
//!
//! Every table rejects unknown fields, and every error names the field by its dotted path
//! (`host_groups[1].count: expected a positive integer`).

use super::error::SimError;
use crate::engine::{
    ClusterState, DeviceKind, DeviceModel, DeviceSpec, HostSpec, HostTopology, NodeState,
    PolicyName, QueueConfig, SchedulerConfig, TopologyLevel, MILLI_PER_DEVICE,
};
use gangway_proto::ids::{HostName, QueueName};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// How hosts are grouped into racks, pods and zones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub hosts_per_rack: u32,
    pub racks_per_pod: u32,
    /// 0: all pods in one zone.
    pub pods_per_zone: u32,
}

/// Simulator-only knobs of the replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplaySettings {
    /// Scheduling round period while gangs wait, in ms; 0 means rounds on events only.
    pub tick_ms: u64,
    /// Queue for jobs whose trace queue is not listed.
    pub default_queue: Option<QueueName>,
}

impl Default for ReplaySettings {
    fn default() -> Self {
        Self {
            tick_ms: 300_000,
            default_queue: None,
        }
    }
}

/// A parsed and validated cluster file.
#[derive(Clone, Debug)]
pub struct SimCluster {
    pub name: String,
    pub source: PathBuf,
    pub models: Vec<DeviceModel>,
    pub layout: Layout,
    pub hosts: Vec<HostSpec>,
    pub queues: BTreeMap<QueueName, QueueConfig>,
    /// The scheduler configuration, with the policy to be set per run.
    pub scheduler: SchedulerConfig,
    pub replay: ReplaySettings,
}

impl SimCluster {
    /// Reads and validates a cluster file.
    pub fn load(path: &Path) -> Result<Self, SimError> {
        let text = std::fs::read_to_string(path).map_err(|e| SimError::io(path, e))?;
        Self::parse(&text, path)
    }

    /// Parses cluster TOML; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, SimError> {
        let table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| SimError::TomlSyntax {
                    path: path.to_owned(),
                    message: e.to_string().trim_end().to_owned(),
                })?;
        let mut root = Obj::new(path, String::new(), &table);
        let name = root.opt_str("name")?.unwrap_or_else(|| "cluster".into());
        let datacenter = root.opt_str("datacenter")?.unwrap_or_else(|| "dc1".into());

        // Models.
        let mut models = Vec::new();
        let mut model_names = BTreeSet::new();
        for mut m in root.req_array_of_tables("models")? {
            let mname = m.req_str("name")?;
            let kind = match m.req_str("kind")?.as_str() {
                "gpu" => DeviceKind::Gpu,
                "tpu" => DeviceKind::Tpu,
                other => {
                    return Err(m.err(
                        "kind",
                        format!("expected \"gpu\" or \"tpu\", got {other:?}"),
                    ))
                }
            };
            let memory_mib = m.opt_u64("memory_mib")?.unwrap_or(0);
            m.finish()?;
            if !model_names.insert(mname.clone()) {
                return Err(m.err("name", format!("model {mname:?} is defined twice")));
            }
            models.push(DeviceModel {
                name: mname,
                kind,
                memory_mib,
            });
        }

        // Layout.
        let mut lay = root.req_table("layout")?;
        let layout = Layout {
            hosts_per_rack: lay.req_pos_u32("hosts_per_rack")?,
            racks_per_pod: lay.req_pos_u32("racks_per_pod")?,
            pods_per_zone: lay.opt_pos_u32("pods_per_zone")?.unwrap_or(0),
        };
        lay.finish()?;

        // Hosts.
        let mut hosts: Vec<HostSpec> = Vec::new();
        let mut names = BTreeSet::new();
        for mut g in root.req_array_of_tables("host_groups")? {
            let count = g.req_pos_u32("count")?;
            let devices = g.req_u32("devices")?;
            let model = g.req_str("model")?;
            if !model_names.contains(&model) {
                return Err(g.err(
                    "model",
                    format!("unknown model {model:?}: not in [[models]]"),
                ));
            }
            let nvlink_domains = g.opt_pos_u32("nvlink_domains")?.unwrap_or(1);
            if devices > 0 && (nvlink_domains > devices || devices % nvlink_domains != 0) {
                return Err(g.err(
                    "nvlink_domains",
                    format!("{nvlink_domains} domains do not split {devices} devices evenly"),
                ));
            }
            if devices > u32::from(u16::MAX) {
                return Err(g.err("devices", "more than 65535 devices on one host".into()));
            }
            let cpu_milli = g.opt_u64("cpu_milli")?.unwrap_or(0);
            let memory_mib = g.opt_u64("memory_mib")?.unwrap_or(0);
            let prefix = g.opt_str("name_prefix")?.unwrap_or_else(|| "h".into());
            g.finish()?;
            let per_domain = (devices / nvlink_domains).max(1);
            for _ in 0..count {
                let i = hosts.len() as u32;
                let rack = i / layout.hosts_per_rack;
                let pod = rack / layout.racks_per_pod;
                let zone = pod.checked_div(layout.pods_per_zone).unwrap_or(0);
                let hname = format!("{prefix}{i:04}");
                if !names.insert(hname.clone()) {
                    return Err(g.err("name_prefix", format!("host name {hname} is used twice")));
                }
                hosts.push(HostSpec {
                    name: HostName::new(hname),
                    topology: HostTopology::new(
                        &datacenter,
                        &format!("z{zone}"),
                        &format!("p{pod:02}"),
                        &format!("r{rack:03}"),
                    ),
                    cpu_milli,
                    memory_mib,
                    devices: (0..devices)
                        .map(|d| DeviceSpec {
                            model: model.clone(),
                            nvlink_domain: (d / per_domain) as u16,
                        })
                        .collect(),
                    state: NodeState::Ready,
                });
            }
        }

        // Queues.
        let mut queues = BTreeMap::new();
        for mut q in root.opt_array_of_tables("queues")? {
            let qname = q.req_str("name")?;
            let guaranteed = q.req_u64("guaranteed_devices")?;
            let may_borrow = q.opt_bool("may_borrow")?.unwrap_or(true);
            q.finish()?;
            let qn = QueueName::new(qname.clone());
            if queues.contains_key(&qn) {
                return Err(q.err("name", format!("queue {qname:?} is defined twice")));
            }
            queues.insert(
                qn.clone(),
                QueueConfig {
                    name: qn,
                    guaranteed_milli: guaranteed * u64::from(MILLI_PER_DEVICE),
                    may_borrow,
                    idle: None,
                },
            );
        }

        // Scheduler tuning.
        let mut scheduler = SchedulerConfig {
            queues: queues.clone(),
            ..SchedulerConfig::default()
        };
        if let Some(mut s) = root.opt_table("scheduler")? {
            if let Some(p) = s.opt_bool("preemption")? {
                scheduler.preemption = p;
            }
            if let Some(m) = s.opt_u64("min_runtime_s")? {
                scheduler.min_runtime_ms = m * 1000;
            }
            if let Some(m) = s.opt_pos_u32("max_gangs_per_round")? {
                scheduler.max_gangs_per_round = m as usize;
            }
            s.finish()?;
        }

        let mut replay = ReplaySettings::default();
        if let Some(mut r) = root.opt_table("replay")? {
            if let Some(t) = r.opt_u64("tick_s")? {
                replay.tick_ms = t * 1000;
            }
            if let Some(q) = r.opt_str("default_queue")? {
                let qn = QueueName::new(q.clone());
                if !queues.contains_key(&qn) {
                    return Err(r.err("default_queue", format!("queue {q:?} is not in [[queues]]")));
                }
                replay.default_queue = Some(qn);
            }
            r.finish()?;
        }
        root.finish()?;

        Ok(SimCluster {
            name,
            source: path.to_owned(),
            models,
            layout,
            hosts,
            queues,
            scheduler,
            replay,
        })
    }

    /// A fresh cluster state with every host registered and free.
    pub fn build_state(&self) -> ClusterState {
        let mut state = ClusterState::new(self.models.iter().cloned());
        for h in &self.hosts {
            state
                .add_host(h.clone())
                .expect("cluster file validated: unique hosts of known models");
        }
        state
    }

    /// The scheduler configuration for one policy.
    pub fn scheduler_config(&self, policy: PolicyName) -> SchedulerConfig {
        SchedulerConfig {
            policy,
            ..self.scheduler.clone()
        }
    }

    /// Devices of a kind in the whole cluster.
    pub fn total_devices(&self, kind: DeviceKind) -> u64 {
        let kinds: BTreeMap<&str, DeviceKind> = self
            .models
            .iter()
            .map(|m| (m.name.as_str(), m.kind))
            .collect();
        self.hosts
            .iter()
            .flat_map(|h| h.devices.iter())
            .filter(|d| kinds.get(d.model.as_str()) == Some(&kind))
            .count() as u64
    }

    /// The simulator's own domain key of a host at a level, computed from the cluster file and not
    /// from the engine, to verify placements independently.
    pub fn domain_of(
        host: &HostSpec,
        level: TopologyLevel,
    ) -> (String, String, String, String, String) {
        let t = &host.topology;
        let mut key = (
            t.datacenter.clone(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        );
        if level <= TopologyLevel::Zone {
            key.1 = t.zone.clone();
        }
        if level <= TopologyLevel::Pod {
            key.2 = t.pod.clone();
        }
        if level <= TopologyLevel::Rack {
            key.3 = t.rack.clone();
        }
        if level <= TopologyLevel::Host {
            key.4 = host.name.0.clone();
        }
        key
    }
}

/// A TOML table being read, with its dotted path and the keys read so far (to reject unknown ones).
struct Obj<'a> {
    file: &'a Path,
    path: String,
    table: &'a toml::Table,
    used: BTreeSet<&'a str>,
}

impl<'a> Obj<'a> {
    fn new(file: &'a Path, path: String, table: &'a toml::Table) -> Self {
        Self {
            file,
            path,
            table,
            used: BTreeSet::new(),
        }
    }

    fn field_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn err(&self, key: &str, message: String) -> SimError {
        SimError::Field {
            path: self.file.to_owned(),
            field: self.field_path(key),
            message,
        }
    }

    fn get(&mut self, key: &'a str) -> Option<&'a toml::Value> {
        let (k, v) = self.table.get_key_value(key)?;
        self.used.insert(k.as_str());
        Some(v)
    }

    fn type_err(&self, key: &str, want: &str, got: &toml::Value) -> SimError {
        self.err(
            key,
            format!("expected {want}, got {} {got}", got.type_str()),
        )
    }

    fn opt_str(&mut self, key: &'a str) -> Result<Option<String>, SimError> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            Some(v) => Err(self.type_err(key, "a non-empty string", v)),
        }
    }

    fn req_str(&mut self, key: &'a str) -> Result<String, SimError> {
        self.opt_str(key)?
            .ok_or_else(|| self.err(key, "missing (required)".into()))
    }

    fn opt_u64(&mut self, key: &'a str) -> Result<Option<u64>, SimError> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::Integer(i)) if *i >= 0 => Ok(Some(*i as u64)),
            Some(v) => Err(self.type_err(key, "a non-negative integer", v)),
        }
    }

    fn req_u64(&mut self, key: &'a str) -> Result<u64, SimError> {
        self.opt_u64(key)?
            .ok_or_else(|| self.err(key, "missing (required)".into()))
    }

    fn req_u32(&mut self, key: &'a str) -> Result<u32, SimError> {
        let v = self.req_u64(key)?;
        u32::try_from(v).map_err(|_| self.err(key, format!("{v} is too large")))
    }

    fn opt_pos_u32(&mut self, key: &'a str) -> Result<Option<u32>, SimError> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::Integer(i)) if *i >= 1 && *i <= i64::from(u32::MAX) => {
                Ok(Some(*i as u32))
            }
            Some(v) => Err(self.type_err(key, "a positive integer", v)),
        }
    }

    fn req_pos_u32(&mut self, key: &'a str) -> Result<u32, SimError> {
        self.opt_pos_u32(key)?
            .ok_or_else(|| self.err(key, "missing (required)".into()))
    }

    fn opt_bool(&mut self, key: &'a str) -> Result<Option<bool>, SimError> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::Boolean(b)) => Ok(Some(*b)),
            Some(v) => Err(self.type_err(key, "true or false", v)),
        }
    }

    fn opt_table(&mut self, key: &'a str) -> Result<Option<Obj<'a>>, SimError> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::Table(t)) => Ok(Some(Obj::new(self.file, self.field_path(key), t))),
            Some(v) => Err(self.type_err(key, "a table", v)),
        }
    }

    fn req_table(&mut self, key: &'a str) -> Result<Obj<'a>, SimError> {
        self.opt_table(key)?
            .ok_or_else(|| self.err(key, "missing (required table)".into()))
    }

    fn opt_array_of_tables(&mut self, key: &'a str) -> Result<Vec<Obj<'a>>, SimError> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(toml::Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    toml::Value::Table(t) => Ok(Obj::new(
                        self.file,
                        format!("{}[{i}]", self.field_path(key)),
                        t,
                    )),
                    other => Err(self.type_err(&format!("{key}[{i}]"), "a table", other)),
                })
                .collect(),
            Some(v) => Err(self.type_err(key, "an array of tables ([[...]])", v)),
        }
    }

    fn req_array_of_tables(&mut self, key: &'a str) -> Result<Vec<Obj<'a>>, SimError> {
        let v = self.opt_array_of_tables(key)?;
        if v.is_empty() {
            return Err(self.err(key, "missing (at least one [[...]] entry required)".into()));
        }
        Ok(v)
    }

    /// Rejects any key that was not read.
    fn finish(&self) -> Result<(), SimError> {
        match self.table.keys().find(|k| !self.used.contains(k.as_str())) {
            None => Ok(()),
            Some(k) => Err(self.err(k, "unknown field".into())),
        }
    }
}
