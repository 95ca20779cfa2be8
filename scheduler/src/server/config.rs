//! The server's configuration: a TOML file (template in `deploy/config/gangway-server.toml`) whose
//! values flags override, validated as a whole so a bad value fails at start-up naming its field.

use crate::engine::PolicyName;
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A problem with one configuration field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config field `{field}`: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

fn bad(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_owned(),
        message: message.into(),
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "expected a duration such as \"150ms\" or \"10s\", got {s:?} ({e})"
        ))
    })
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftSection {
    #[serde(deserialize_with = "duration")]
    pub election_timeout_min: Duration,
    #[serde(deserialize_with = "duration")]
    pub election_timeout_max: Duration,
    #[serde(deserialize_with = "duration")]
    pub heartbeat_interval: Duration,
    pub snapshot_every_entries: u64,
    /// Followers elect at once when the leader's process dies (its port refuses connections).
    pub leader_loss_detection: bool,
}

impl Default for RaftSection {
    fn default() -> Self {
        Self {
            election_timeout_min: Duration::from_millis(400),
            election_timeout_max: Duration::from_millis(800),
            heartbeat_interval: Duration::from_millis(100),
            snapshot_every_entries: 10_000,
            leader_loss_detection: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerSection {
    #[serde(deserialize_with = "policy")]
    pub policy: PolicyName,
    #[serde(deserialize_with = "duration")]
    pub interval: Duration,
    pub preemption: bool,
    #[serde(deserialize_with = "duration")]
    pub min_runtime: Duration,
    /// Continuous defragmentation: the leader migrates small gangs to free a block for a gang
    /// blocked by shape.
    pub defrag: bool,
    /// Most gangs migrating at once for the defragmenter (its disruption budget).
    pub defrag_max_moves: usize,
    /// How long the freed block stays reserved for the waiting gang before it is given up.
    #[serde(deserialize_with = "duration")]
    pub defrag_reservation: Duration,
    /// Disruption budget: device-hours of checkpoint-and-restore (each moved gang's devices x its
    /// checkpoint timeout) the defragmenter may cause per hour.
    pub defrag_device_hours_per_hour: f64,
}

fn policy<'de, D: Deserializer<'de>>(d: D) -> Result<PolicyName, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

impl Default for SchedulerSection {
    fn default() -> Self {
        Self {
            policy: PolicyName::Gangway,
            interval: Duration::from_secs(1),
            preemption: true,
            min_runtime: Duration::from_secs(600),
            defrag: true,
            defrag_max_moves: 8,
            defrag_reservation: Duration::from_secs(600),
            defrag_device_hours_per_hour: 8.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkersSection {
    #[serde(deserialize_with = "duration")]
    pub heartbeat_interval: Duration,
    #[serde(deserialize_with = "duration")]
    pub node_ttl: Duration,
}

impl Default for WorkersSection {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(2),
            node_ttl: Duration::from_secs(10),
        }
    }
}

/// What one client may ask of the cluster (until identities exist, a client is its address).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientsSection {
    /// Job submissions one client may make per second, sustained.
    pub submit_per_second: u32,
    /// How many it may make at once above that rate.
    pub submit_burst: u32,
}

impl Default for ClientsSection {
    fn default() -> Self {
        Self {
            submit_per_second: 200,
            submit_burst: 1_000,
        }
    }
}

/// Mutual TLS on the replica's gRPC port (client API, worker API, Raft) and toward its peers.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// The cluster CA certificate (PEM): every peer's certificate must chain to it.
    pub ca: PathBuf,
    /// This replica's certificate, naming `server/<id>` (`gangway tls issue server <id>`).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// Plain TCP and no authorization: every caller is an admin. Local experiments only; the
    /// replica says so in its log and in `cluster status`.
    pub insecure: bool,
}

impl TlsSection {
    /// The files, when TLS is on.
    pub fn files(&self) -> Option<gangway_tls::TlsFiles> {
        (!self.insecure).then(|| gangway_tls::TlsFiles {
            ca: self.ca.clone(),
            cert: Some(self.cert.clone()),
            key: Some(self.key.clone()),
        })
    }
}

/// Who may do what, beyond the rules kept in the replicated state.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessSection {
    /// Certificate names that are admins whatever the rules say (`client/admin`), so a cluster
    /// cannot lock its operators out. Keep the same list on every replica.
    pub admins: Vec<String>,
}

/// The whole server configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub id: u64,
    pub listen: String,
    #[serde(default)]
    pub advertise: String,
    pub http: String,
    pub data_dir: PathBuf,
    #[serde(default)]
    pub initial_cluster: String,
    #[serde(default)]
    pub allow_drills: bool,
    #[serde(default)]
    pub raft: RaftSection,
    #[serde(default)]
    pub scheduler: SchedulerSection,
    #[serde(default)]
    pub workers: WorkersSection,
    #[serde(default)]
    pub clients: ClientsSection,
    #[serde(default)]
    pub tls: TlsSection,
    #[serde(default)]
    pub access: AccessSection,
}

impl ServerConfig {
    /// A configuration with every optional key at its default (what flags alone start from).
    pub fn new(id: u64, listen: &str, http: &str, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            id,
            listen: listen.to_owned(),
            advertise: String::new(),
            http: http.to_owned(),
            data_dir: data_dir.into(),
            initial_cluster: String::new(),
            allow_drills: false,
            raft: RaftSection::default(),
            scheduler: SchedulerSection::default(),
            workers: WorkersSection::default(),
            clients: ClientsSection::default(),
            tls: TlsSection::default(),
            access: AccessSection::default(),
        }
    }

    /// Parses a TOML file's text. Unknown keys are errors naming the key's path.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| bad("", e.message().to_owned()))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            bad(
                if path == "." { "" } else { &path },
                e.into_inner().message().to_owned(),
            )
        })
    }

    /// The address peers and clients use for this replica.
    pub fn advertise_addr(&self) -> &str {
        if self.advertise.is_empty() {
            &self.listen
        } else {
            &self.advertise
        }
    }

    /// The founding voters from `initial_cluster` (`1=host:port,2=host:port`).
    pub fn initial_members(&self) -> Result<BTreeMap<u64, String>, ConfigError> {
        parse_members(&self.initial_cluster)
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id == 0 {
            return Err(bad("id", "expected a replica id of 1 or more"));
        }
        for (field, addr) in [("listen", &self.listen), ("http", &self.http)] {
            addr.parse::<SocketAddr>().map_err(|_| {
                bad(
                    field,
                    format!("expected host:port with a numeric IP, got {addr:?}"),
                )
            })?;
        }
        if !self.advertise.is_empty() && !self.advertise.contains(':') {
            return Err(bad("advertise", "expected host:port"));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(bad("data_dir", "expected a directory path"));
        }
        let members = self.initial_members()?;
        if !members.is_empty() && !members.contains_key(&self.id) {
            return Err(bad(
                "initial_cluster",
                format!("does not list this replica's id {}", self.id),
            ));
        }
        for (field, value) in [
            ("clients.submit_per_second", self.clients.submit_per_second),
            ("clients.submit_burst", self.clients.submit_burst),
        ] {
            if value == 0 {
                return Err(bad(field, "expected 1 or more"));
            }
        }
        let budget = self.scheduler.defrag_device_hours_per_hour;
        if !(budget.is_finite() && budget >= 0.0) {
            return Err(bad(
                "scheduler.defrag_device_hours_per_hour",
                format!("expected a number of device-hours of 0 or more, got {budget}"),
            ));
        }
        let r = &self.raft;
        if r.election_timeout_min.is_zero() || r.election_timeout_max <= r.election_timeout_min {
            return Err(bad(
                "raft.election_timeout_max",
                "expected a value above raft.election_timeout_min, which must be above zero",
            ));
        }
        if r.heartbeat_interval.is_zero() || r.heartbeat_interval * 2 > r.election_timeout_min {
            return Err(bad(
                "raft.heartbeat_interval",
                "expected at most half of raft.election_timeout_min",
            ));
        }
        if r.snapshot_every_entries == 0 {
            return Err(bad("raft.snapshot_every_entries", "expected 1 or more"));
        }
        if self.scheduler.interval.is_zero() {
            return Err(bad("scheduler.interval", "expected a duration above zero"));
        }
        if !self.tls.insecure {
            for (field, path) in [
                ("tls.ca", &self.tls.ca),
                ("tls.cert", &self.tls.cert),
                ("tls.key", &self.tls.key),
            ] {
                if path.as_os_str().is_empty() {
                    return Err(bad(
                        field,
                        "required: give the CA, this replica's certificate and key (gangway tls init / issue), or set tls.insecure = true for a local experiment",
                    ));
                }
            }
        }
        for (i, admin) in self.access.admins.iter().enumerate() {
            admin
                .parse::<gangway_tls::Identity>()
                .map_err(|e| bad(&format!("access.admins[{i}]"), e.to_string()))?;
        }
        let w = &self.workers;
        if w.heartbeat_interval.is_zero() || w.node_ttl < w.heartbeat_interval * 2 {
            return Err(bad(
                "workers.node_ttl",
                "expected at least twice workers.heartbeat_interval (above zero)",
            ));
        }
        Ok(())
    }
}

/// Parses `1=host:port,2=host:port` into ordered members.
pub fn parse_members(text: &str) -> Result<BTreeMap<u64, String>, ConfigError> {
    let mut out = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part.split_once('=').ok_or_else(|| {
            bad(
                "initial_cluster",
                format!("expected id=host:port, got {part:?}"),
            )
        })?;
        let id: u64 = id.trim().parse().ok().filter(|i| *i > 0).ok_or_else(|| {
            bad(
                "initial_cluster",
                format!("expected a replica id of 1 or more, got {id:?}"),
            )
        })?;
        let addr = addr.trim();
        if !addr.contains(':') {
            return Err(bad(
                "initial_cluster",
                format!("expected host:port for replica {id}, got {addr:?}"),
            ));
        }
        if out.insert(id, addr.to_owned()).is_some() {
            return Err(bad(
                "initial_cluster",
                format!("replica id {id} is listed twice"),
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = include_str!("../../../deploy/config/gangway-server.toml");

    #[test]
    fn the_shipped_template_parses_and_validates() {
        let c = ServerConfig::from_toml_str(TEMPLATE).expect("template parses");
        c.validate().expect("template validates");
        assert_eq!(c.id, 1);
        assert_eq!(c.initial_members().unwrap().len(), 3);
        assert_eq!(c.workers.node_ttl, Duration::from_secs(10));
        assert_eq!(c.scheduler.policy, PolicyName::Gangway);
        assert_eq!(c.advertise_addr(), "127.0.0.1:7101");
    }

    #[test]
    fn bad_values_name_their_field() {
        let with = |from: &str, to: &str| {
            assert!(TEMPLATE.contains(from), "template lacks {from}");
            TEMPLATE.replacen(from, to, 1)
        };
        let cases = [
            (with("id = 1", "id = 0"), "id"),
            (with("id = 1", "id = 4"), "initial_cluster"),
            (
                with("listen = \"127.0.0.1:7101\"", "listen = \"nowhere\""),
                "listen",
            ),
            (
                with(
                    "heartbeat_interval = \"100ms\"",
                    "heartbeat_interval = \"900ms\"",
                ),
                "raft.heartbeat_interval",
            ),
            (
                with("node_ttl = \"10s\"", "node_ttl = \"1s\""),
                "workers.node_ttl",
            ),
            (
                with("1=127.0.0.1:7101,", "1=127.0.0.1:7101,1=x:1,"),
                "initial_cluster",
            ),
            (
                with(
                    "defrag_device_hours_per_hour = 8.0",
                    "defrag_device_hours_per_hour = -1.0",
                ),
                "scheduler.defrag_device_hours_per_hour",
            ),
        ];
        for (text, field) in cases {
            let err = ServerConfig::from_toml_str(&text)
                .and_then(|c| c.validate())
                .expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
        let err = ServerConfig::from_toml_str(&with("[scheduler]", "[scheduler]\ncolour = 1"))
            .unwrap_err();
        assert_eq!(err.field, "scheduler.colour", "{err}");
        let err = ServerConfig::from_toml_str(&with("policy = \"gangway\"", "policy = \"random\""))
            .unwrap_err();
        assert_eq!(err.field, "scheduler.policy", "{err}");
        let err = ServerConfig::from_toml_str(&with("interval = \"1s\"", "interval = \"often\""))
            .unwrap_err();
        assert!(err.message.contains("duration"), "{err}");
    }
}
