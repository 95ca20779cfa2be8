//! Job specs as people write them (TOML), checked into a typed [`JobSpec`].
//!
//! Parsing is two steps. Serde reads the TOML into loosely typed "raw" structs that reject unknown
//! fields (with the path of the offending key); then [`JobSpec::from_raw`] checks every value and
//! collects *all* problems, each naming its field path and what was expected, so a person fixes a
//! spec in one round trip. Nothing is accepted half-way: either every field is valid or there is no
//! `JobSpec`.

use crate::device::DeviceKind;
use crate::secret::Secret;
use crate::topology::TopologyLevel;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// Most tasks a gang may have.
pub const MAX_TASKS: u32 = 4096;
/// Most whole devices one task may ask for.
pub const MAX_DEVICES_PER_TASK: u32 = 64;
/// Longest name of a job or queue.
pub const MAX_NAME_LEN: usize = 128;
/// Largest job spec text accepted (TOML bytes).
pub const MAX_SPEC_BYTES: usize = 256 * 1024;
/// Most arguments of a task's command, and their total bytes.
pub const MAX_COMMAND_ARGS: usize = 1024;
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;
/// Most environment variables of a task, and their names and values' total bytes (`[env]` and
/// `[secret_env]` together).
pub const MAX_ENV_VARS: usize = 256;
pub const MAX_ENV_BYTES: usize = 64 * 1024;
/// Most accepted models a spec may list.
pub const MAX_MODELS: usize = 64;

// Every task's command and environment travel in its host's allocation set (at most 4 MiB per
// message): 3 tasks of 128 KiB fit a host many times over, while a 1.5 MB command line does not.

/// Signals a task may ask to receive as its checkpoint request.
pub const CHECKPOINT_SIGNALS: [&str; 6] = [
    "SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT",
];

/// A job spec that passed validation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub name: String,
    pub queue: String,
    pub priority: i32,
    /// Gang size: all tasks are placed together or not at all.
    pub tasks: u32,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// `[secret_env]`: variables whose values reach only the tasks, on the hosts leased to the job
    /// (see [`crate::secret`]: never shown by `Debug`, a listing or a backup). No name is in `env`
    /// too.
    #[serde(default)]
    pub secret_env: BTreeMap<String, Secret>,
    pub resources: Resources,
    pub topology: TopologySpec,
    /// `None`: the job cannot be checkpointed, so it is never migrated and only preempted by a stop.
    pub checkpoint: Option<CheckpointSpec>,
    pub estimated_runtime: Option<Duration>,
    /// What happens when a task fails on healthy hardware (`[restart]`). Failures of the
    /// infrastructure (a device or host lost) never count against it: such a gang is repaired.
    #[serde(default)]
    pub restart: RestartPolicy,
}

/// Restarts after application failures (a task exited non-zero on healthy hardware): at most
/// `max_restarts`, each from the last checkpoint, the n-th after `backoff` x 2^(n-1), at most
/// `max_backoff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    pub max_restarts: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RestartPolicy {
    /// No restart: the first application failure fails the job.
    fn default() -> Self {
        Self {
            max_restarts: 0,
            backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(300),
        }
    }
}

impl RestartPolicy {
    /// The wait before restart number `n` (1-based).
    pub fn backoff_before(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
        self.backoff
            .checked_mul(factor)
            .unwrap_or(self.max_backoff)
            .min(self.max_backoff)
    }
}

/// What each task needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub devices: DeviceCount,
    pub kind: DeviceKind,
    /// Accepted models; empty accepts any model of `kind`.
    pub models: Vec<String>,
    /// CPU reserved per task in milli-cores; 0 reserves none.
    pub cpu_milli: u64,
    /// Host memory reserved per task; 0 reserves none.
    pub memory_mib: u64,
}

/// Devices per task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceCount {
    /// A CPU-only task.
    None,
    /// Whole devices.
    Whole(u32),
    /// A share of one device in milli-devices (1..=999).
    Fraction(u32),
}

/// Packing constraints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopologySpec {
    pub required: Option<TopologyLevel>,
    pub preferred: Option<TopologyLevel>,
}

/// How the worker asks the task to checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointSpec {
    /// Canonical signal name, e.g. `SIGUSR1`.
    pub signal: String,
    /// How long the task has to write its manifest.
    pub timeout: Duration,
}

/// One problem with one field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    /// Dotted path of the field (`resources.devices`); empty for the document as a whole.
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a spec.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub struct SpecError {
    pub errors: Vec<FieldError>,
}

impl SpecError {
    fn one(path: &str, message: impl Into<String>) -> Self {
        Self {
            errors: vec![FieldError {
                path: path.to_owned(),
                message: message.into(),
            }],
        }
    }

    /// The paths of all fields with problems, for tests and scripts.
    pub fn paths(&self) -> Vec<&str> {
        self.errors.iter().map(|e| e.path.as_str()).collect()
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid job spec")?;
        for e in &self.errors {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: Option<toml::Value>,
    queue: Option<toml::Value>,
    priority: Option<toml::Value>,
    tasks: Option<toml::Value>,
    command: Option<toml::Value>,
    #[serde(default)]
    env: BTreeMap<String, toml::Value>,
    #[serde(default)]
    secret_env: BTreeMap<String, toml::Value>,
    resources: Option<RawResources>,
    topology: Option<RawTopology>,
    checkpoint: Option<RawCheckpoint>,
    estimated_runtime: Option<toml::Value>,
    restart: Option<RawRestart>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRestart {
    max_restarts: Option<toml::Value>,
    backoff: Option<toml::Value>,
    max_backoff: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResources {
    devices: Option<toml::Value>,
    kind: Option<toml::Value>,
    models: Option<toml::Value>,
    cpu: Option<toml::Value>,
    memory: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopology {
    required: Option<toml::Value>,
    preferred: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheckpoint {
    signal: Option<toml::Value>,
    timeout: Option<toml::Value>,
}

/// Collects field errors while the checks run.
#[derive(Default)]
struct Problems(Vec<FieldError>);

impl Problems {
    fn add(&mut self, path: &str, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.to_owned(),
            message: message.into(),
        });
    }
}

fn describe(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("the string {s:?}"),
        toml::Value::Integer(i) => format!("the integer {i}"),
        toml::Value::Float(x) => format!("the number {x}"),
        toml::Value::Boolean(b) => format!("the boolean {b}"),
        toml::Value::Datetime(d) => format!("the date {d}"),
        toml::Value::Array(_) => "an array".to_owned(),
        toml::Value::Table(_) => "a table".to_owned(),
    }
}

/// What kind of value `v` is, without the value (for errors about secrets).
fn kind_of(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a number",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

fn check_name(
    p: &mut Problems,
    path: &str,
    v: Option<&toml::Value>,
    default: Option<&str>,
) -> String {
    let s = match (v, default) {
        (None, Some(d)) => return d.to_owned(),
        (None, None) => {
            p.add(path, "is required: expected a name such as \"pretrain-7b\"");
            return String::new();
        }
        (Some(toml::Value::String(s)), _) => s.clone(),
        (Some(other), _) => {
            p.add(path, format!("expected a string, got {}", describe(other)));
            return String::new();
        }
    };
    let valid_chars = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let starts_ok = s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if s.is_empty() || s.len() > MAX_NAME_LEN || !valid_chars || !starts_ok {
        p.add(
            path,
            format!(
                "expected 1 to {MAX_NAME_LEN} letters, digits, '-', '_' or '.', starting with a letter or digit, got {s:?}"
            ),
        );
    }
    s
}

fn check_int(p: &mut Problems, path: &str, v: &toml::Value, min: i64, max: i64) -> Option<i64> {
    match v {
        toml::Value::Integer(i) if (min..=max).contains(i) => Some(*i),
        toml::Value::Integer(i) => {
            p.add(
                path,
                format!("expected an integer from {min} to {max}, got {i}"),
            );
            None
        }
        other => {
            p.add(
                path,
                format!(
                    "expected an integer from {min} to {max}, got {}",
                    describe(other)
                ),
            );
            None
        }
    }
}

fn check_duration(
    p: &mut Problems,
    path: &str,
    v: &toml::Value,
    min: Duration,
    max: Duration,
) -> Option<Duration> {
    let toml::Value::String(s) = v else {
        p.add(
            path,
            format!(
                "expected a duration such as \"60s\" or \"2h\", got {}",
                describe(v)
            ),
        );
        return None;
    };
    match humantime::parse_duration(s) {
        Ok(d) if d >= min && d <= max => Some(d),
        Ok(_) => {
            p.add(
                path,
                format!(
                    "expected a duration from {} to {}, got {s:?}",
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                ),
            );
            None
        }
        Err(e) => {
            p.add(
                path,
                format!("expected a duration such as \"60s\" or \"2h\", got {s:?} ({e})"),
            );
            None
        }
    }
}

/// Milli-units from a TOML number with at most three decimals (`0.5` -> 500, `4` -> 4000).
fn to_milli(v: &toml::Value) -> Option<u64> {
    match v {
        toml::Value::Integer(i) if *i >= 0 => u64::try_from(*i).ok()?.checked_mul(1000),
        toml::Value::Float(x) if x.is_finite() && *x >= 0.0 && *x < 1e12 => {
            let milli = (x * 1000.0).round();
            ((x * 1000.0 - milli).abs() < 1e-6).then_some(milli as u64)
        }
        _ => None,
    }
}

/// `[restart]`: at most 1,000 restarts, backoffs from 0 s to a day, `max_backoff` no shorter
/// than `backoff`.
fn check_restart(p: &mut Problems, r: RawRestart) -> RestartPolicy {
    let default = RestartPolicy::default();
    let max_restarts = r
        .max_restarts
        .as_ref()
        .and_then(|v| check_int(p, "restart.max_restarts", v, 0, 1000))
        .map_or(default.max_restarts, |n| n as u32);
    let day = Duration::from_secs(24 * 3600);
    let mut duration = |path: &str, v: Option<&toml::Value>, or: Duration| {
        v.and_then(|v| check_duration(p, path, v, Duration::ZERO, day))
            .unwrap_or(or)
    };
    let backoff = duration("restart.backoff", r.backoff.as_ref(), default.backoff);
    let max_backoff = duration(
        "restart.max_backoff",
        r.max_backoff.as_ref(),
        default.max_backoff.max(backoff),
    );
    if max_backoff < backoff {
        p.add(
            "restart.max_backoff",
            format!(
                "expected a duration no shorter than restart.backoff ({}), got {}",
                humantime::format_duration(backoff),
                humantime::format_duration(max_backoff)
            ),
        );
    }
    RestartPolicy {
        max_restarts,
        backoff,
        max_backoff,
    }
}

fn check_devices(p: &mut Problems, v: Option<&toml::Value>) -> DeviceCount {
    const PATH: &str = "resources.devices";
    let expected = format!(
        "expected a whole number of devices from 0 to {MAX_DEVICES_PER_TASK}, or a fraction of one device from 0.001 to 0.999"
    );
    let Some(v) = v else {
        p.add(PATH, format!("is required: {expected}"));
        return DeviceCount::None;
    };
    match (v, to_milli(v)) {
        (toml::Value::Integer(0), _) => DeviceCount::None,
        (toml::Value::Integer(n), Some(_)) if *n as u64 <= u64::from(MAX_DEVICES_PER_TASK) => {
            DeviceCount::Whole(*n as u32)
        }
        (toml::Value::Float(_), Some(m)) if m > 0 && m < 1000 => DeviceCount::Fraction(m as u32),
        (toml::Value::Float(_), Some(m))
            if m % 1000 == 0 && m / 1000 <= u64::from(MAX_DEVICES_PER_TASK) =>
        {
            if m == 0 {
                DeviceCount::None
            } else {
                DeviceCount::Whole((m / 1000) as u32)
            }
        }
        _ => {
            p.add(PATH, format!("{expected}, got {}", describe(v)));
            DeviceCount::None
        }
    }
}

/// Memory as integer MiB or a string with a unit: "512MiB", "32GiB", "1TiB".
fn check_memory(p: &mut Problems, v: &toml::Value) -> u64 {
    const PATH: &str = "resources.memory";
    let parsed = match v {
        toml::Value::Integer(i) if *i >= 0 => Some(*i as u64),
        toml::Value::String(s) => {
            let s = s.trim();
            let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
            let (num, unit) = s.split_at(split);
            let factor = match unit.trim() {
                "MiB" | "Mi" => Some(1u64),
                "GiB" | "Gi" => Some(1024),
                "TiB" | "Ti" => Some(1024 * 1024),
                _ => None,
            };
            match (num.parse::<u64>(), factor) {
                (Ok(n), Some(f)) => n.checked_mul(f),
                _ => None,
            }
        }
        _ => None,
    };
    parsed.unwrap_or_else(|| {
        p.add(
            PATH,
            format!(
                "expected memory per task as MiB (an integer) or a string such as \"32GiB\" (units MiB, GiB, TiB), got {}",
                describe(v)
            ),
        );
        0
    })
}

fn check_level(p: &mut Problems, path: &str, v: Option<&toml::Value>) -> Option<TopologyLevel> {
    match v? {
        toml::Value::String(s) => match s.parse() {
            Ok(level) => Some(level),
            Err(e) => {
                p.add(path, e.to_string());
                None
            }
        },
        other => {
            p.add(
                path,
                format!(
                    "expected one of host, nvlink, rack, pod, zone, datacenter, got {}",
                    describe(other)
                ),
            );
            None
        }
    }
}

fn check_string_list(p: &mut Problems, path: &str, v: &toml::Value, what: &str) -> Vec<String> {
    let toml::Value::Array(items) = v else {
        p.add(
            path,
            format!("expected an array of {what}, got {}", describe(v)),
        );
        return Vec::new();
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match item {
            toml::Value::String(s) => out.push(s.clone()),
            other => p.add(
                &format!("{path}[{i}]"),
                format!("expected a string, got {}", describe(other)),
            ),
        }
    }
    out
}

fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Variables the worker sets itself; a spec may not override them.
fn is_reserved_env(s: &str) -> bool {
    s.starts_with("GANGWAY_") || s == "CUDA_VISIBLE_DEVICES" || s == "TPU_VISIBLE_CHIPS"
}

/// The problem with a variable's name under `path`, if any.
fn check_env_name(p: &mut Problems, path: &str, key: &str) {
    if !is_env_name(key) {
        p.add(
            path,
            "expected a variable name of letters, digits and '_', not starting with a digit",
        );
    } else if is_reserved_env(key) {
        p.add(path, "is set by the worker (GANGWAY_*, CUDA_VISIBLE_DEVICES, TPU_VISIBLE_CHIPS) and cannot be overridden");
    }
}

/// `[secret_env]`: names as in `[env]` and none of them also there; string values. No error
/// repeats a value: it says only what kind of value was found.
fn check_secret_env(
    p: &mut Problems,
    raw: &BTreeMap<String, toml::Value>,
    env: &BTreeMap<String, toml::Value>,
) -> BTreeMap<String, Secret> {
    let mut out = BTreeMap::new();
    for (key, value) in raw {
        let path = format!("secret_env.{key}");
        check_env_name(p, &path, key);
        if env.contains_key(key) {
            p.add(
                &path,
                "is also in [env]: a variable is either plain or secret, not both",
            );
        }
        match value {
            toml::Value::String(s) if s.contains('\0') => p.add(
                &path,
                "expected a string without NUL bytes; this one has one",
            ),
            toml::Value::String(s) => {
                out.insert(key.clone(), Secret::new(s.clone()));
            }
            other => p.add(
                &path,
                format!(
                    "expected a string (the secret value), got {}",
                    kind_of(other)
                ),
            ),
        }
    }
    out
}

impl JobSpec {
    /// Parses and validates a TOML job spec.
    pub fn from_toml_str(text: &str) -> Result<JobSpec, SpecError> {
        if text.len() > MAX_SPEC_BYTES {
            return Err(SpecError::one(
                "",
                format!(
                    "the spec is {} bytes; at most {MAX_SPEC_BYTES} are accepted",
                    text.len()
                ),
            ));
        }
        let de = toml::Deserializer::parse(text)
            .map_err(|e| SpecError::one("", format!("not valid TOML: {}", e.message())))?;
        let raw: RawSpec = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let path = if path == "." { String::new() } else { path };
            SpecError::one(&path, inner.message().to_owned())
        })?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawSpec) -> Result<JobSpec, SpecError> {
        let mut p = Problems::default();
        let name = check_name(&mut p, "name", raw.name.as_ref(), None);
        let queue = check_name(&mut p, "queue", raw.queue.as_ref(), Some("default"));
        let priority = raw
            .priority
            .as_ref()
            .and_then(|v| check_int(&mut p, "priority", v, -1_000_000, 1_000_000))
            .unwrap_or(0) as i32;
        let tasks = raw
            .tasks
            .as_ref()
            .and_then(|v| check_int(&mut p, "tasks", v, 1, i64::from(MAX_TASKS)))
            .unwrap_or(1) as u32;

        let command = match raw.command.as_ref() {
            None => {
                p.add(
                    "command",
                    "is required: expected an array such as [\"python3\", \"train.py\"]",
                );
                Vec::new()
            }
            Some(v) => check_string_list(&mut p, "command", v, "strings"),
        };
        if raw.command.is_some()
            && command.first().is_none_or(|c| c.is_empty())
            && !p.0.iter().any(|e| e.path.starts_with("command"))
        {
            p.add(
                "command",
                "expected a non-empty program name as the first element",
            );
        }
        if let Some(i) = command.iter().position(|c| c.contains('\0')) {
            p.add(&format!("command[{i}]"), "must not contain a NUL byte");
        }
        let command_bytes: usize = command.iter().map(String::len).sum();
        if command.len() > MAX_COMMAND_ARGS || command_bytes > MAX_COMMAND_BYTES {
            p.add(
                "command",
                format!(
                    "has {} arguments of {command_bytes} bytes in all; at most {MAX_COMMAND_ARGS} arguments and {MAX_COMMAND_BYTES} bytes (it travels to every host of the gang): pass large inputs in a file",
                    command.len()
                ),
            );
        }

        let mut env = BTreeMap::new();
        for (key, value) in &raw.env {
            let path = format!("env.{key}");
            check_env_name(&mut p, &path, key);
            match value {
                toml::Value::String(s) if !s.contains('\0') => {
                    env.insert(key.clone(), s.clone());
                }
                other => p.add(
                    &path,
                    format!(
                        "expected a string without NUL bytes, got {}",
                        describe(other)
                    ),
                ),
            }
        }

        let secret_env = check_secret_env(&mut p, &raw.secret_env, &raw.env);
        let env_bytes: usize = env.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
            + secret_env
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        let vars = raw.env.len() + raw.secret_env.len();
        if vars > MAX_ENV_VARS || env_bytes > MAX_ENV_BYTES {
            let (path, secret) = match raw.secret_env.len() {
                0 => ("env", String::new()),
                n => ("secret_env", format!(" ({n} of them in [secret_env])")),
            };
            p.add(
                path,
                format!(
                    "has {vars} variables{secret} of {env_bytes} bytes in all; at most {MAX_ENV_VARS} variables and {MAX_ENV_BYTES} bytes, [env] and [secret_env] together",
                ),
            );
        }

        let resources = match raw.resources {
            None => {
                p.add(
                    "resources",
                    "is required: expected a [resources] table with at least `devices`",
                );
                None
            }
            Some(r) => Some(Self::check_resources(&mut p, r)),
        };

        let topology = raw.topology.map_or(TopologySpec::default(), |t| {
            let required = check_level(&mut p, "topology.required", t.required.as_ref());
            let preferred = check_level(&mut p, "topology.preferred", t.preferred.as_ref());
            if let (Some(r), Some(pref)) = (required, preferred) {
                if pref > r {
                    p.add(
                        "topology.preferred",
                        format!("expected a level no wider than required ({r}), got {pref}"),
                    );
                }
            }
            TopologySpec {
                required,
                preferred,
            }
        });

        let checkpoint = raw.checkpoint.map(|c| {
            let signal = match c.signal.as_ref() {
                None => "SIGUSR1".to_owned(),
                Some(toml::Value::String(s)) => {
                    let canonical = if s.starts_with("SIG") {
                        s.clone()
                    } else {
                        format!("SIG{s}")
                    };
                    if !CHECKPOINT_SIGNALS.contains(&canonical.as_str()) {
                        p.add(
                            "checkpoint.signal",
                            format!(
                                "expected one of {}, got {s:?}",
                                CHECKPOINT_SIGNALS.join(", ")
                            ),
                        );
                    }
                    canonical
                }
                Some(other) => {
                    p.add(
                        "checkpoint.signal",
                        format!(
                            "expected a signal name such as \"SIGUSR1\", got {}",
                            describe(other)
                        ),
                    );
                    String::new()
                }
            };
            let timeout = match c.timeout.as_ref() {
                None => Duration::from_secs(60),
                Some(v) => check_duration(
                    &mut p,
                    "checkpoint.timeout",
                    v,
                    Duration::from_secs(1),
                    Duration::from_secs(24 * 3600),
                )
                .unwrap_or_default(),
            };
            CheckpointSpec { signal, timeout }
        });

        let estimated_runtime = raw.estimated_runtime.as_ref().and_then(|v| {
            check_duration(
                &mut p,
                "estimated_runtime",
                v,
                Duration::from_secs(1),
                Duration::from_secs(365 * 24 * 3600),
            )
        });

        let restart = raw
            .restart
            .map(|r| check_restart(&mut p, r))
            .unwrap_or_default();

        if let Some(r) = &resources {
            if r.devices == DeviceCount::None && topology.required == Some(TopologyLevel::Nvlink) {
                p.add(
                    "topology.required",
                    "nvlink needs devices: a CPU-only task has no NVLink domain",
                );
            }
            if let DeviceCount::Fraction(_) = r.devices {
                if tasks > 1 && topology.required == Some(TopologyLevel::Nvlink) {
                    p.add(
                        "topology.required",
                        "nvlink cannot be required for a gang of fractional-device tasks",
                    );
                }
            }
        }

        if !p.0.is_empty() {
            return Err(SpecError { errors: p.0 });
        }
        Ok(JobSpec {
            name,
            queue,
            priority,
            tasks,
            command,
            env,
            secret_env,
            resources: resources.expect("resources present when no problem was found"),
            topology,
            checkpoint,
            estimated_runtime,
            restart,
        })
    }

    /// The first limit a spec breaks, if any: what parsing guarantees, checked again on a spec
    /// that did not come through [`JobSpec::from_toml_str`] (one decoded from a snapshot or a
    /// backup), so no later use of its sizes can exhaust memory.
    pub fn check_limits(&self) -> Result<(), String> {
        let over = |what: &str, got: usize, max: usize| {
            (got > max).then(|| format!("{what}: {got}, at most {max}"))
        };
        let command_bytes: usize = self.command.iter().map(String::len).sum();
        let env_bytes: usize = self
            .env
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
            + self
                .secret_env
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        let problem = [
            over("tasks", self.tasks as usize, MAX_TASKS as usize),
            (self.tasks == 0).then(|| "tasks: 0".to_owned()),
            over("command arguments", self.command.len(), MAX_COMMAND_ARGS),
            over("command bytes", command_bytes, MAX_COMMAND_BYTES),
            over(
                "environment variables",
                self.env.len() + self.secret_env.len(),
                MAX_ENV_VARS,
            ),
            over("environment bytes", env_bytes, MAX_ENV_BYTES),
            over(
                "name bytes",
                self.name.len().max(self.queue.len()),
                MAX_NAME_LEN,
            ),
            over("models", self.resources.models.len(), MAX_MODELS),
            match self.resources.devices {
                DeviceCount::Whole(n) => over("devices", n as usize, MAX_DEVICES_PER_TASK as usize),
                DeviceCount::Fraction(m) if m == 0 || m >= 1000 => {
                    Some(format!("a fraction of {m} milli-devices"))
                }
                _ => None,
            },
        ]
        .into_iter()
        .flatten()
        .next();
        match problem {
            Some(p) => Err(format!("job {:?}: {p}", self.name)),
            None => Ok(()),
        }
    }

    fn check_resources(p: &mut Problems, r: RawResources) -> Resources {
        let devices = check_devices(p, r.devices.as_ref());
        let kind = match r.kind.as_ref() {
            None => DeviceKind::Gpu,
            Some(toml::Value::String(s)) => {
                s.parse()
                    .unwrap_or_else(|e: crate::device::UnknownDeviceKind| {
                        p.add("resources.kind", e.to_string());
                        DeviceKind::Gpu
                    })
            }
            Some(other) => {
                p.add(
                    "resources.kind",
                    format!("expected \"gpu\" or \"tpu\", got {}", describe(other)),
                );
                DeviceKind::Gpu
            }
        };
        let models = r
            .models
            .as_ref()
            .map(|v| check_string_list(p, "resources.models", v, "model names"))
            .unwrap_or_default();
        if models.len() > MAX_MODELS {
            p.add(
                "resources.models",
                format!("lists {} models; at most {MAX_MODELS}", models.len()),
            );
        }
        for (i, m) in models.iter().enumerate().take(MAX_MODELS) {
            if m.len() > MAX_NAME_LEN {
                p.add(
                    &format!("resources.models[{i}]"),
                    format!("expected at most {MAX_NAME_LEN} bytes, got {}", m.len()),
                );
            } else if m.trim().is_empty() {
                p.add(
                    &format!("resources.models[{i}]"),
                    "expected a model name, got an empty string",
                );
            } else if models[..i].contains(m) {
                p.add(
                    &format!("resources.models[{i}]"),
                    format!("model {m:?} is listed twice"),
                );
            }
        }
        let cpu_milli = match r.cpu.as_ref() {
            None => 0,
            Some(v) => match to_milli(v) {
                Some(m) if m <= 1_024_000 => m,
                _ => {
                    p.add(
                        "resources.cpu",
                        format!("expected CPU cores per task from 0 to 1024 with at most 3 decimals, got {}", describe(v)),
                    );
                    0
                }
            },
        };
        let memory_mib = r.memory.as_ref().map_or(0, |v| check_memory(p, v));
        Resources {
            devices,
            kind,
            models,
            cpu_milli,
            memory_mib,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
name = "pretrain-7b"
queue = "research"
priority = 100
tasks = 2
command = ["python3", "train.py", "--steps", "1000"]
[resources]
devices = 8
kind = "gpu"
models = ["H100", "A100-80G"]
[topology]
required = "rack"
preferred = "host"
[checkpoint]
signal = "SIGUSR1"
timeout = "60s"
"#;

    #[test]
    fn the_documented_example_parses_into_typed_fields() {
        let spec = JobSpec::from_toml_str(EXAMPLE).expect("example is valid");
        assert_eq!(spec.name, "pretrain-7b");
        assert_eq!(spec.queue, "research");
        assert_eq!(spec.priority, 100);
        assert_eq!(spec.tasks, 2);
        assert_eq!(spec.command, ["python3", "train.py", "--steps", "1000"]);
        assert_eq!(spec.resources.devices, DeviceCount::Whole(8));
        assert_eq!(spec.resources.kind, DeviceKind::Gpu);
        assert_eq!(spec.resources.models, ["H100", "A100-80G"]);
        assert_eq!(spec.topology.required, Some(TopologyLevel::Rack));
        assert_eq!(spec.topology.preferred, Some(TopologyLevel::Host));
        let ck = spec.checkpoint.expect("checkpoint section");
        assert_eq!(ck.signal, "SIGUSR1");
        assert_eq!(ck.timeout, Duration::from_secs(60));
    }

    #[test]
    fn defaults_fill_what_a_minimal_spec_leaves_out() {
        let spec = JobSpec::from_toml_str(
            "name = \"x\"\ncommand = [\"true\"]\n[resources]\ndevices = 0.25\ncpu = 1.5\nmemory = \"2GiB\"\n",
        )
        .unwrap();
        assert_eq!(spec.queue, "default");
        assert_eq!(spec.priority, 0);
        assert_eq!(spec.tasks, 1);
        assert_eq!(spec.resources.devices, DeviceCount::Fraction(250));
        assert_eq!(spec.resources.cpu_milli, 1500);
        assert_eq!(spec.resources.memory_mib, 2048);
        assert_eq!(spec.checkpoint, None);
    }

    /// Each bad spec is rejected, and the error names the field and what was expected.
    #[test]
    fn bad_specs_name_the_field_and_the_expectation() {
        let base = |extra_top: &str, resources: &str| {
            format!("name = \"j\"\ncommand = [\"true\"]\n{extra_top}\n[resources]\n{resources}\n")
        };
        let cases: Vec<(String, &str, &str)> = vec![
            (base("gpus = 3", "devices = 1"), "gpus", "unknown field"),
            (
                base("", "devices = 1\ngpus = 2"),
                "resources.gpus",
                "unknown field",
            ),
            (base("tasks = 0", "devices = 1"), "tasks", "from 1 to 4096"),
            (
                base("tasks = \"two\"", "devices = 1"),
                "tasks",
                "expected an integer",
            ),
            (
                base("priority = 1e3", "devices = 1"),
                "priority",
                "expected an integer",
            ),
            (
                base("", "devices = -1"),
                "resources.devices",
                "whole number of devices",
            ),
            (
                base("", "devices = 65"),
                "resources.devices",
                "whole number of devices",
            ),
            (
                base("", "devices = 1.5"),
                "resources.devices",
                "fraction of one device",
            ),
            (
                base("", "devices = 0.0001"),
                "resources.devices",
                "fraction",
            ),
            (
                base("", "devices = 1\nkind = \"fpga\""),
                "resources.kind",
                "expected gpu or tpu",
            ),
            (
                base("", "devices = 1\nmodels = [\"H100\", \"H100\"]"),
                "resources.models[1]",
                "twice",
            ),
            (
                base("", "devices = 1\nmodels = [\"H100\", 3]"),
                "resources.models[1]",
                "expected a string",
            ),
            (
                base("", "devices = 1\nmemory = \"12 bananas\""),
                "resources.memory",
                "units MiB",
            ),
            (
                base("", "devices = 1\ncpu = -2"),
                "resources.cpu",
                "CPU cores",
            ),
            (
                base("[topology]\nrequired = \"planet\"", "devices = 1"),
                "topology.required",
                "unknown topology level",
            ),
            (
                base(
                    "[topology]\nrequired = \"host\"\npreferred = \"rack\"",
                    "devices = 1",
                ),
                "topology.preferred",
                "no wider than required",
            ),
            (
                base("[checkpoint]\nsignal = \"SIGKILL\"", "devices = 1"),
                "checkpoint.signal",
                "expected one of",
            ),
            (
                base("[checkpoint]\ntimeout = \"soon\"", "devices = 1"),
                "checkpoint.timeout",
                "duration",
            ),
            (
                base("[env]\nGANGWAY_JOB_ID = \"x\"", "devices = 1"),
                "env.GANGWAY_JOB_ID",
                "set by the worker",
            ),
            (
                base("[env]\n\"1BAD\" = \"x\"", "devices = 1"),
                "env.1BAD",
                "variable name",
            ),
            (
                base("estimated_runtime = 5", "devices = 1"),
                "estimated_runtime",
                "duration",
            ),
            (
                "command = [\"true\"]\n[resources]\ndevices = 1\n".into(),
                "name",
                "is required",
            ),
            (
                "name = \"bad name!\"\ncommand = [\"true\"]\n[resources]\ndevices = 1\n".into(),
                "name",
                "letters, digits",
            ),
            (
                "name = \"j\"\n[resources]\ndevices = 1\n".into(),
                "command",
                "is required",
            ),
            (
                "name = \"j\"\ncommand = []\n[resources]\ndevices = 1\n".into(),
                "command",
                "non-empty program",
            ),
            (
                "name = \"j\"\ncommand = [\"true\"]\n".into(),
                "resources",
                "is required",
            ),
            (
                "name = \"j\"\ncommand = [\"true\"]\n[resources]\n".into(),
                "resources.devices",
                "is required",
            ),
            ("name = = 3".into(), "", "not valid TOML"),
        ];
        for (text, path, needle) in cases {
            let err = JobSpec::from_toml_str(&text).expect_err(&text);
            let hit = err
                .errors
                .iter()
                .find(|e| e.path == path)
                .unwrap_or_else(|| panic!("no error at {path:?} for spec:\n{text}\ngot: {err}"));
            assert!(
                hit.message.contains(needle),
                "error at {path} should mention {needle:?}, got {:?}",
                hit.message
            );
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = JobSpec::from_toml_str(
            "name = \"\"\ntasks = 0\ncommand = [\"true\"]\n[resources]\ndevices = 100\nkind = \"x\"\n",
        )
        .unwrap_err();
        let paths = err.paths();
        for want in ["name", "tasks", "resources.devices", "resources.kind"] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
    }

    /// The oversized-spec story of issue 15: a 3-task job with a 1.5 MB command line would make
    /// its host's allocation set larger than a gRPC message; it is refused at submit, naming the
    /// limit, and so are the other ways to grow a spec.
    #[test]
    fn oversized_specs_are_refused_naming_the_field_and_the_limit() {
        let base = |top: &str, resources: &str| {
            format!("name = \"big\"\ntasks = 3\n{top}\n[resources]\ndevices = 1\n{resources}\n")
        };
        let huge_arg = "x".repeat(1_500_000);
        let cases = [
            (
                format!("command = [\"python3\", \"{huge_arg}\"]"),
                String::new(),
                "",
            ),
            (
                format!("command = [\"run\", \"{}\"]", "y".repeat(MAX_COMMAND_BYTES)),
                String::new(),
                "command",
            ),
            (
                format!(
                    "command = [{}]",
                    vec!["\"a\""; MAX_COMMAND_ARGS + 1].join(", ")
                ),
                String::new(),
                "command",
            ),
            (
                "command = [\"true\"]".to_owned(),
                format!(
                    "models = [{}]",
                    (0..=MAX_MODELS)
                        .map(|i| format!("\"m{i}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                "resources.models",
            ),
        ];
        for (top, resources, path) in cases {
            let text = base(&top, &resources);
            let e = JobSpec::from_toml_str(&text).unwrap_err();
            assert_eq!(e.paths(), vec![path], "{e}");
            assert!(e.to_string().contains("at most"), "{e}");
        }
        // The environment: too many variables, or too many bytes.
        let mut env = String::from("[env]\n");
        for i in 0..=MAX_ENV_VARS {
            env.push_str(&format!("V{i} = \"1\"\n"));
        }
        let text = format!("name = \"e\"\ncommand = [\"true\"]\n{env}[resources]\ndevices = 1\n");
        let e = JobSpec::from_toml_str(&text).unwrap_err();
        assert_eq!(e.paths(), vec!["env"], "{e}");
        let text = format!(
            "name = \"e\"\ncommand = [\"true\"]\n[env]\nBIG = \"{}\"\n[resources]\ndevices = 1\n",
            "z".repeat(MAX_ENV_BYTES)
        );
        assert_eq!(
            JobSpec::from_toml_str(&text).unwrap_err().paths(),
            vec!["env"]
        );
        // A spec decoded elsewhere (a snapshot) is held to the same limits.
        let mut decoded = JobSpec::from_toml_str(&base("command = [\"true\"]", "")).unwrap();
        assert_eq!(decoded.check_limits(), Ok(()));
        decoded.tasks = u32::MAX;
        assert!(decoded.check_limits().unwrap_err().contains("tasks"));
        // Just under every limit is accepted.
        let text = format!(
            "name = \"ok\"\ncommand = [\"run\", \"{}\"]\n[resources]\ndevices = 1\n",
            "y".repeat(MAX_COMMAND_BYTES - 10)
        );
        assert!(JobSpec::from_toml_str(&text).is_ok());
    }

    /// `[secret_env]`: parsed into secrets, refused when a name is bad, reserved or also in
    /// `[env]`, counted in the environment's limits; no error and no `Debug` repeats a value.
    #[test]
    fn secret_env_is_checked_counted_and_never_echoed() {
        let spec = |tables: &str| {
            format!("name = \"s\"\ncommand = [\"true\"]\n{tables}\n[resources]\ndevices = 1\n")
        };
        let ok = JobSpec::from_toml_str(&spec(
            "[env]\nLR = \"0.1\"\n[secret_env]\nHF_TOKEN = \"hf_abc123\"\nDB_PASSWORD = \"\"\n",
        ))
        .unwrap();
        assert_eq!(ok.env["LR"], "0.1");
        assert_eq!(ok.secret_env["HF_TOKEN"].expose(), Some("hf_abc123"));
        assert_eq!(ok.secret_env["DB_PASSWORD"].expose(), Some(""));
        let debug = format!("{ok:?}");
        assert!(
            debug.contains("HF_TOKEN") && !debug.contains("hf_abc123"),
            "{debug}"
        );

        let cases = [
            (
                "[env]\nX = \"1\"\n[secret_env]\nX = \"s3cr3t\"",
                "secret_env.X",
                "also in [env]",
            ),
            (
                "[secret_env]\nGANGWAY_JOB_ID = \"s3cr3t\"",
                "secret_env.GANGWAY_JOB_ID",
                "set by the worker",
            ),
            (
                "[secret_env]\n\"9X\" = \"s3cr3t\"",
                "secret_env.9X",
                "variable name",
            ),
            (
                "[secret_env]\nPIN = 424242",
                "secret_env.PIN",
                "got an integer",
            ),
            ("[secret_env]\nK = \"s3cr3t\\u0000\"", "secret_env.K", "NUL"),
        ];
        for (tables, path, needle) in cases {
            let err = JobSpec::from_toml_str(&spec(tables)).unwrap_err();
            assert_eq!(err.paths(), vec![path], "{err}");
            let text = err.to_string();
            assert!(text.contains(needle), "{text}");
            assert!(
                !text.contains("s3cr3t") && !text.contains("424242"),
                "{text}"
            );
        }

        // The limits count both tables together, and name the secret one when it is used.
        let mut tables = String::from("[env]\n");
        for i in 0..MAX_ENV_VARS {
            tables.push_str(&format!("V{i} = \"1\"\n"));
        }
        tables.push_str("[secret_env]\nS = \"s3cr3t\"\n");
        let err = JobSpec::from_toml_str(&spec(&tables)).unwrap_err();
        assert_eq!(err.paths(), vec!["secret_env"], "{err}");
        assert!(err.to_string().contains("together"), "{err}");
        let big = format!("[secret_env]\nS = \"{}\"\n", "z".repeat(MAX_ENV_BYTES));
        let err = JobSpec::from_toml_str(&spec(&big)).unwrap_err();
        assert_eq!(err.paths(), vec!["secret_env"], "{err}");
        assert!(!err.to_string().contains("zzz"), "{err}");
    }

    proptest::proptest! {
        /// Mutated valid specs (bytes flipped, cut, repeated) parse or fail with field errors,
        /// never panic: a fuzz of the spec decoder in every `cargo test`.
        #[test]
        fn mutated_specs_never_panic(
            cut in 0usize..400,
            flips in proptest::collection::vec((0usize..400, proptest::prelude::any::<u8>()), 0..8),
            repeat in 0usize..4,
        ) {
            let valid = "name = \"pretrain\"\nqueue = \"research\"\npriority = 5\ntasks = 16\ncommand = [\"python3\", \"train.py\"]\n[env]\nNCCL_DEBUG = \"WARN\"\n[resources]\ndevices = 8\nmodels = [\"H100\"]\ncpu = 32\nmemory = \"512GiB\"\n[topology]\nrequired = \"rack\"\n[checkpoint]\nsignal = \"SIGUSR1\"\ntimeout = \"5m\"\n[restart]\nmax_restarts = 3\nbackoff = \"30s\"\n";
            let mut bytes = valid.as_bytes().repeat(repeat + 1);
            for (at, b) in flips {
                if let Some(x) = bytes.get_mut(at) {
                    *x = b;
                }
            }
            bytes.truncate(cut.max(1) * 4);
            let text = String::from_utf8_lossy(&bytes);
            let _ = JobSpec::from_toml_str(&text);
        }

        /// Whatever bytes arrive, parsing returns a value or an error: never a panic.
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
            let _ = JobSpec::from_toml_str(&text);
        }

        /// Valid device counts round-trip into the right demand.
        #[test]
        fn whole_device_counts_are_accepted(n in 1u32..=MAX_DEVICES_PER_TASK, tasks in 1u32..=64) {
            let text = format!("name = \"j\"\ntasks = {tasks}\ncommand = [\"true\"]\n[resources]\ndevices = {n}\n");
            let spec = JobSpec::from_toml_str(&text).unwrap();
            proptest::prop_assert_eq!(spec.resources.devices, DeviceCount::Whole(n));
            proptest::prop_assert_eq!(spec.tasks, tasks);
        }
    }
}
