//! What one agent needs to know: who it is, where the scheduler is, where it keeps its files.

use std::path::PathBuf;
use std::time::Duration;

/// Host topology labels, from `--topology dc=dc1,zone=z1,pod=p1,rack=r3`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TopologyLabels {
    pub datacenter: String,
    pub zone: String,
    pub pod: String,
    pub rack: String,
}

impl std::str::FromStr for TopologyLabels {
    type Err = String;

    /// `dc=..,zone=..,pod=..,rack=..`; any subset, any order; unknown keys and repeats are errors.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut t = TopologyLabels::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((k, v)) = part.split_once('=') else {
                return Err(format!("expected key=value, got {part:?}"));
            };
            let v = v.trim();
            if v.is_empty()
                || !v
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(format!(
                    "{k}: expected letters, digits, '-', '_' or '.', got {v:?}"
                ));
            }
            let slot = match k.trim() {
                "dc" | "datacenter" => &mut t.datacenter,
                "zone" => &mut t.zone,
                "pod" => &mut t.pod,
                "rack" => &mut t.rack,
                other => {
                    return Err(format!(
                        "unknown label {other:?}: expected dc, zone, pod or rack"
                    ))
                }
            };
            if !slot.is_empty() {
                return Err(format!("label {k} given twice"));
            }
            *slot = v.to_owned();
        }
        Ok(t)
    }
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The node name the scheduler knows this host by.
    pub node: String,
    /// Scheduler replicas (host:port), any of them; the agent follows the leader.
    pub servers: Vec<String>,
    /// Where the agent API (task logs) listens.
    pub listen: std::net::SocketAddr,
    /// The address registered for this host (`host:port` of the agent API); its host part is also
    /// the master address rank 0 gives its gang.
    pub advertise: String,
    pub topology: TopologyLabels,
    /// The agent's own files: state, task exit files, logs.
    pub data_dir: PathBuf,
    /// Shared checkpoint storage; each job checkpoints into `<dir>/<job id>`.
    pub checkpoint_dir: PathBuf,
    /// Stop: signal, this long, then kill.
    pub grace: Duration,
    /// How a task's supervisor is started: `gangway-shim`, or the `gangway` binary and `task-shim`
    /// (see [`crate::driver::shim_command_for`]).
    pub shim_command: Vec<String>,
    /// Shims forked by a fork server rather than executed one by one (see
    /// [`crate::driver::DriverConfig::fork_server`]).
    pub shim_fork_server: bool,
    /// On a clean shutdown, stop the tasks too (development clusters); by default they keep
    /// running and a restarted agent re-adopts them.
    pub stop_tasks_on_exit: bool,
    /// Deadline of each call to the scheduler.
    pub rpc_timeout: Duration,
    /// The operator's health check, if any (see [`super::health_check`]).
    pub health_check: Option<super::health_check::HealthCheckConfig>,
    /// Who tasks run as (see [`super::task_users`]); checked when the agent starts.
    pub task_users: super::task_users::TaskUserFlags,
    /// The largest allocation set the agent decodes: normally
    /// `gangway_proto::allocation::MAX_ALLOCATION_SET_BYTES`; lower only to test a host that
    /// cannot receive its allocations.
    pub allocation_stream_max_bytes: usize,
    /// The cluster CA and this host's certificate (`worker/<node>`); `None` only toward a cluster
    /// started insecure.
    pub tls: Option<gangway_tls::TlsFiles>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_labels_parse_or_name_the_problem() {
        let t: TopologyLabels = "dc=dc1,zone=z1,pod=p1,rack=r3".parse().unwrap();
        assert_eq!(
            t,
            TopologyLabels {
                datacenter: "dc1".into(),
                zone: "z1".into(),
                pod: "p1".into(),
                rack: "r3".into()
            }
        );
        assert_eq!("rack=r9".parse::<TopologyLabels>().unwrap().rack, "r9");
        for (bad, want) in [
            ("rack", "key=value"),
            ("row=4", "unknown label"),
            ("rack=r1,rack=r2", "twice"),
            ("rack=a b", "rack:"),
        ] {
            let err = bad.parse::<TopologyLabels>().unwrap_err();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }
}
