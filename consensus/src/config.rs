//! Replica configuration: a validated struct, so that a bad value fails at start-up with a message
//! naming the field instead of as a confusing election storm later.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::ConsensusError;
use crate::types::NodeId;

/// Which log store backs the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogStorage {
    /// Segment files under `data_dir/raft-wal`, fsynced appends (an old RocksDB log in
    /// `data_dir/raft-log` is migrated at start). Use this in production.
    #[default]
    Disk,
    /// In memory only; nothing survives a restart (snapshots still go to `data_dir`). For tests and
    /// simulations.
    Memory,
}

/// Everything a replica needs to start.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// This replica's id: unique in the cluster and stable for the life of `data_dir`.
    pub node_id: NodeId,
    /// The gRPC address other replicas (and forwarded writes) use to reach this replica.
    pub advertise_addr: String,
    /// Where the Raft log (segment files) and snapshots live.
    pub data_dir: PathBuf,
    /// Log store backend.
    pub log_storage: LogStorage,
    /// Lower bound of the randomized election timeout.
    pub election_timeout_min: Duration,
    /// Upper bound of the randomized election timeout.
    pub election_timeout_max: Duration,
    /// Leader heartbeat period; must be well below `election_timeout_min`.
    pub heartbeat_interval: Duration,
    /// Build a snapshot after this many applied entries since the last one.
    pub snapshot_every_entries: u64,
    /// How many entries to keep in the log behind a snapshot, so that slightly lagging followers
    /// catch up from the log instead of by a snapshot.
    pub keep_entries_after_snapshot: u64,
    /// Snapshot transfer chunk size in bytes.
    pub snapshot_chunk_bytes: usize,
    /// Deadline for one replication/vote RPC.
    pub rpc_timeout: Duration,
    /// Deadline for a client `write` (including forwarding and waiting for a leader).
    pub write_timeout: Duration,
    /// Whether followers hold a presence stream to the leader and, when its process dies (its
    /// port then refuses connections), elect at once instead of after the election timeout. A
    /// leader whose host dies or is cut off is still replaced on the timeout.
    pub leader_loss_detection: bool,
    /// How the leader sends log entries to each follower.
    pub replication: Replication,
}

/// How a leader sends log entries to a follower. Both ways are equally correct; they differ in
/// messages per entry and in what waits for a round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replication {
    /// One `StreamAppend` stream per follower, held open, with up to `in_flight` requests awaiting
    /// their replies; the next request is taken only when the window has room, so it carries every
    /// entry submitted meanwhile. 1 (the default) sends the fewest messages, which is what counts
    /// while replicas are CPU-bound (measured in `peers_raft`: 1 beat 2 and unbounded at 16 and 256
    /// clients on one 2-core host). Raise it where a round trip is long compared with the time
    /// between writes (replicas in several data centers), so entries need not wait for one.
    Stream {
        /// Requests awaiting replies at once, per follower.
        in_flight: NonZeroU32,
    },
    /// One unary `AppendEntries` call at a time (openraft's default transport; each call is its own
    /// HTTP/2 stream). Kept for comparison (`PEERS_REPLICATION=calls` in `peers_raft`).
    Calls,
}

impl Default for Replication {
    fn default() -> Self {
        Replication::Stream {
            in_flight: NonZeroU32::MIN,
        }
    }
}

/// The name [`FromStr`](std::str::FromStr) reads: `calls` or `stream:N`.
impl std::fmt::Display for Replication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Replication::Calls => f.write_str("calls"),
            Replication::Stream { in_flight } => write!(f, "stream:{in_flight}"),
        }
    }
}

impl std::str::FromStr for Replication {
    type Err = String;

    /// `calls`, or `stream` / `stream:N` (N requests in flight, at least 1).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("expected calls, stream or stream:N with N >= 1, got {s:?}");
        match s.split_once(':') {
            None if s == "calls" => Ok(Replication::Calls),
            None if s == "stream" => Ok(Replication::default()),
            Some(("stream", n)) => n
                .parse()
                .map(|in_flight| Replication::Stream { in_flight })
                .map_err(|_| bad()),
            _ => Err(bad()),
        }
    }
}

impl ReplicaConfig {
    /// Defaults suited to replicas in one data center; tune the election timeout up for WAN links.
    pub fn new(
        node_id: NodeId,
        advertise_addr: impl Into<String>,
        data_dir: impl Into<PathBuf>,
    ) -> Self {
        ReplicaConfig {
            node_id,
            advertise_addr: advertise_addr.into(),
            data_dir: data_dir.into(),
            log_storage: LogStorage::Disk,
            election_timeout_min: Duration::from_millis(400),
            election_timeout_max: Duration::from_millis(800),
            heartbeat_interval: Duration::from_millis(100),
            snapshot_every_entries: 10_000,
            keep_entries_after_snapshot: 1_000,
            snapshot_chunk_bytes: 1 << 20,
            rpc_timeout: Duration::from_millis(1_000),
            write_timeout: Duration::from_secs(10),
            leader_loss_detection: true,
            replication: Replication::default(),
        }
    }

    /// Check the values; the error names the offending field.
    pub fn validate(&self) -> Result<(), ConsensusError> {
        let bad = |m: String| {
            Err(ConsensusError::Rejected(format!(
                "invalid replica config: {m}"
            )))
        };
        if self.advertise_addr.is_empty() {
            return bad("advertise_addr must not be empty".into());
        }
        if self.data_dir.as_os_str().is_empty() {
            return bad("data_dir must not be empty".into());
        }
        if self.heartbeat_interval.is_zero() {
            return bad("heartbeat_interval must be > 0".into());
        }
        if self.election_timeout_min <= self.heartbeat_interval {
            return bad(format!(
                "election_timeout_min ({:?}) must be greater than heartbeat_interval ({:?})",
                self.election_timeout_min, self.heartbeat_interval
            ));
        }
        if self.election_timeout_max <= self.election_timeout_min {
            return bad(format!(
                "election_timeout_max ({:?}) must be greater than election_timeout_min ({:?})",
                self.election_timeout_max, self.election_timeout_min
            ));
        }
        if self.snapshot_every_entries == 0 {
            return bad("snapshot_every_entries must be > 0".into());
        }
        if self.snapshot_chunk_bytes == 0 {
            return bad("snapshot_chunk_bytes must be > 0".into());
        }
        if self.rpc_timeout.is_zero() || self.write_timeout.is_zero() {
            return bad("rpc_timeout and write_timeout must be > 0".into());
        }
        Ok(())
    }

    /// The openraft config derived from ours.
    pub(crate) fn to_openraft(&self) -> Result<openraft::Config, ConsensusError> {
        let ms = |d: Duration| d.as_millis() as u64;
        let cfg = openraft::Config {
            cluster_name: "gangway".to_string(),
            election_timeout_min: ms(self.election_timeout_min),
            election_timeout_max: ms(self.election_timeout_max),
            heartbeat_interval: ms(self.heartbeat_interval),
            install_snapshot_timeout: ms(self.rpc_timeout).max(10_000),
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_every_entries),
            max_in_snapshot_log_to_keep: self.keep_entries_after_snapshot,
            snapshot_max_chunk_size: self.snapshot_chunk_bytes as u64,
            enable_pre_vote: Some(true),
            ..Default::default()
        };
        cfg.validate()
            .map_err(|e| ConsensusError::Rejected(format!("invalid replica config: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_reads_from_its_names() {
        let stream = |n| Replication::Stream {
            in_flight: NonZeroU32::new(n).unwrap(),
        };
        let table = [
            ("calls", Some(Replication::Calls)),
            ("stream", Some(stream(1))),
            ("stream:4", Some(stream(4))),
            ("stream:0", None),
            ("stream:", None),
            ("streams", None),
            ("calls:2", None),
        ];
        for (text, want) in table {
            let got = text.parse::<Replication>();
            assert_eq!(got.as_ref().ok(), want.as_ref(), "{text}");
            if let Err(e) = got {
                assert!(e.contains("stream:N") && e.contains(text), "{e}");
            }
        }
        assert_eq!(Replication::default(), stream(1));
    }

    #[test]
    fn validation_names_the_field() {
        let mut c = ReplicaConfig::new(1, "127.0.0.1:1", "/tmp/x");
        assert!(c.validate().is_ok());
        assert!(c.to_openraft().is_ok());
        c.election_timeout_max = c.election_timeout_min;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("election_timeout_max"), "{e}");
        let mut c = ReplicaConfig::new(1, "", "/tmp/x");
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("advertise_addr"));
        c.advertise_addr = "a".into();
        c.heartbeat_interval = Duration::from_secs(5);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("heartbeat_interval"));
    }
}
