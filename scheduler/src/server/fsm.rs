//! [`SchedulerFsm`]: the cluster state as the consensus layer replicates it.
//!
//! A thin adapter: the consensus crate is generic over any [`StateMachine`]; this plugs the scheduler's
//! [`ClusterStore`] into it, taking the time of each entry from the log (never from a local clock) and
//! remembering the index it has applied, so readers can say which revision of the state they saw.
//!
//! Raft snapshots of the state are binary ([`encode_snapshot`]): a magic and version, the length,
//! the state in bincode and a CRC-32 of it, checked before anything is installed; a corrupted
//! snapshot is refused with the reason and the replica keeps what it had. Backups (`gangway
//! cluster snapshot save`) stay JSON, to be read by people and tools.

use super::archive::ArchiveSink;
use crate::state::{ClusterStore, Command, Event, Response};
use gangway_consensus::{AppError, ApplyContext, StateMachine};
use serde::{Deserialize, Serialize};

/// The replicated state machine of a Gangway replica.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedulerFsm {
    /// Index of the last applied entry: the revision workers see on their allocation sets.
    applied_index: u64,
    store: ClusterStore,
    /// This replica's archive of finished jobs leaving the state (not replicated).
    #[serde(skip)]
    archive: ArchiveSink,
}

impl SchedulerFsm {
    pub fn new() -> Self {
        Self {
            applied_index: 0,
            store: ClusterStore::new(),
            archive: ArchiveSink::default(),
        }
    }

    /// A state machine holding `store` as of applied index `applied_index` (tests, fuzzing).
    pub fn from_store(store: ClusterStore, applied_index: u64) -> Self {
        Self {
            applied_index,
            store,
            archive: ArchiveSink::default(),
        }
    }

    /// The state machine of a serving replica: finished jobs leaving the state go to `archive`.
    pub fn with_archive(archive: std::sync::Arc<super::archive::JobArchive>) -> Self {
        Self {
            archive: ArchiveSink(Some(archive)),
            ..Self::new()
        }
    }

    /// Repairs completed by a plan: a gang whose previous lease ended for the infrastructure is
    /// running again; the time from that end (the fault's commit) to the new lease.
    fn observe_repairs(&self, placed: &[(gangway_proto::ids::JobId, u64)]) {
        for (job, _) in placed {
            let Some(runs) = self.store.job(job).map(|j| &j.runs) else {
                continue;
            };
            let [.., prev, now] = runs.as_slice() else {
                continue;
            };
            if prev.cause != Some(crate::state::RunCause::Infrastructure) {
                continue;
            }
            let ended = prev.ended_at_ms.unwrap_or(now.started_at_ms);
            let seconds = now.started_at_ms.saturating_sub(ended) as f64 / 1000.0;
            metrics::counter!("gangway_repairs_total").increment(1);
            metrics::histogram!("gangway_repair_seconds").record(seconds);
        }
    }

    /// This replica's job archive, if it keeps one.
    pub fn archive(&self) -> Option<&super::archive::JobArchive> {
        self.archive.0.as_deref()
    }

    pub fn store(&self) -> &ClusterStore {
        &self.store
    }

    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// The revision of the state workers see on their allocation sets: the applied index, moved
    /// past a restored backup's revision.
    pub fn revision(&self) -> u64 {
        self.store.revision(self.applied_index)
    }

    /// Reads a backup written by `gangway cluster snapshot save`: the state and its revision,
    /// refused when it does not decode or contradicts itself (see
    /// `ClusterStore::check_consistency`).
    pub fn from_backup(bytes: &[u8]) -> Result<(ClusterStore, u64), String> {
        let fsm: SchedulerFsm = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        fsm.store.check_consistency()?;
        let revision = fsm.revision();
        Ok((fsm.store, revision))
    }
}

impl StateMachine for SchedulerFsm {
    type Command = Command;
    type Response = Response;
    type Event = Event;

    fn apply(&mut self, ctx: &ApplyContext, command: Command, events: &mut Vec<Event>) -> Response {
        self.applied_index = ctx.index;
        let first = events.len();
        let is_plan = matches!(command, Command::ApplyPlan { .. });
        let response = self.store.apply(ctx.time_ms, command, events);
        if let (true, Response::PlanApplied { placed, .. }) = (is_plan, &response) {
            self.observe_repairs(placed);
        }
        for event in &events[first..] {
            if let Event::Archived(job) = event {
                self.archive.keep(job);
            }
        }
        response
    }

    fn snapshot(&self) -> Result<Vec<u8>, AppError> {
        encode_snapshot(self)
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), AppError> {
        let archive = self.archive.clone();
        *self = decode_snapshot(snapshot)?;
        self.archive = archive;
        Ok(())
    }

    fn check_snapshot(snapshot: &[u8]) -> Result<(), AppError> {
        decode_snapshot(snapshot)?;
        Ok(())
    }
}

/// What a binary snapshot starts with: "GWSNAP" and the format version.
const SNAPSHOT_MAGIC: &[u8; 8] = b"GWSNAP\x00\x01";

/// Why a snapshot cannot be installed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(
        "snapshot refused: it is {got} bytes, shorter than its {need}-byte header and checksum"
    )]
    Truncated { got: usize, need: usize },
    #[error("snapshot refused: its length field says {said} bytes of state but {got} follow")]
    Length { said: u64, got: usize },
    #[error("snapshot refused: checksum mismatch (stored {stored:08x}, computed {computed:08x}); it is corrupted")]
    Checksum { stored: u32, computed: u32 },
    #[error("snapshot refused: the state does not decode: {0}")]
    Decode(String),
    #[error("snapshot refused: the state contradicts itself: {0}")]
    Inconsistent(String),
}

/// `magic (8) | state length (8, LE) | state (bincode) | CRC-32 of the state (4, LE)`.
pub fn encode_snapshot(fsm: &SchedulerFsm) -> Result<Vec<u8>, AppError> {
    let len = bincode::serialized_size(fsm)?;
    let mut out = Vec::with_capacity(20 + len as usize);
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(&len.to_le_bytes());
    bincode::serialize_into(&mut out, fsm)?;
    let crc = crc32fast::hash(&out[16..]);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Reads a snapshot written by [`encode_snapshot`] after checking it whole (checksum, then the
/// state's own consistency); a snapshot of an older version (JSON) is still read.
pub fn decode_snapshot(bytes: &[u8]) -> Result<SchedulerFsm, SnapshotError> {
    let fsm = decode_unchecked(bytes)?;
    fsm.store
        .check_consistency()
        .map_err(SnapshotError::Inconsistent)?;
    Ok(fsm)
}

fn decode_unchecked(bytes: &[u8]) -> Result<SchedulerFsm, SnapshotError> {
    if !bytes.starts_with(SNAPSHOT_MAGIC) {
        return serde_json::from_slice(bytes).map_err(|e| SnapshotError::Decode(e.to_string()));
    }
    let need = 20;
    if bytes.len() < need {
        return Err(SnapshotError::Truncated {
            got: bytes.len(),
            need,
        });
    }
    let said = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let body = &bytes[16..bytes.len() - 4];
    if said != body.len() as u64 {
        return Err(SnapshotError::Length {
            said,
            got: body.len(),
        });
    }
    let stored = u32::from_le_bytes(bytes[bytes.len() - 4..].try_into().expect("4 bytes"));
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(SnapshotError::Checksum { stored, computed });
    }
    bincode::deserialize(body).map_err(|e| SnapshotError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Submission, TaskState};
    use gangway_consensus::ApplyContext;
    use gangway_proto::spec::JobSpec;

    fn fsm_with_jobs(n: usize) -> SchedulerFsm {
        let mut fsm = SchedulerFsm::new();
        let mut events = Vec::new();
        for i in 0..n {
            let spec = JobSpec::from_toml_str(&format!(
                "name = \"j{i}\"\ncommand = [\"true\"]\n[resources]\ndevices = 1\n"
            ))
            .unwrap();
            let ctx = ApplyContext {
                term: 1,
                index: i as u64 + 1,
                time_ms: 1_000 + i as u64,
            };
            fsm.apply(
                &ctx,
                Command::SubmitJob(Submission {
                    owner: String::new(),
                    idempotency_key: Some(format!("k{i}")),
                    spec,
                }),
                &mut events,
            );
        }
        let _ = TaskState::Running;
        fsm
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Untrusted bytes (an InstallSnapshot from a peer, a snapshot file on disk) never panic
        /// the decoder: random bytes, and valid snapshots with bytes flipped, cut or with a
        /// forged length and checksum, are refused with a reason.
        #[test]
        fn snapshot_decoding_never_panics(
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            flips in proptest::collection::vec((0usize..4096, proptest::prelude::any::<u8>()), 0..6),
            cut in 0usize..4096,
            forge in proptest::prelude::any::<bool>(),
        ) {
            let _ = decode_snapshot(&noise);
            let mut with_magic = SNAPSHOT_MAGIC.to_vec();
            with_magic.extend_from_slice(&noise);
            let _ = decode_snapshot(&with_magic);
            let mut bytes = encode_snapshot(&fsm_with_jobs(3)).unwrap();
            for (at, b) in flips {
                let at = at % bytes.len();
                bytes[at] ^= b;
            }
            bytes.truncate(cut.max(1).min(bytes.len()));
            if forge && bytes.len() >= 20 {
                // A forged header and checksum over damaged state: bincode sees the damage.
                let body_len = (bytes.len() - 20) as u64;
                bytes[8..16].copy_from_slice(&body_len.to_le_bytes());
                let crc = crc32fast::hash(&bytes[16..bytes.len() - 4]);
                let n = bytes.len();
                bytes[n - 4..].copy_from_slice(&crc.to_le_bytes());
            }
            let _ = decode_snapshot(&bytes);
        }

        /// A log entry's command from untrusted bytes never panics the decoder either.
        #[test]
        fn command_decoding_never_panics(
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        ) {
            let _ = bincode::deserialize::<Command>(&noise);
        }
    }

    #[test]
    fn a_snapshot_round_trips_and_a_corrupted_one_is_refused_with_its_reason() {
        let fsm = fsm_with_jobs(50);
        let bytes = encode_snapshot(&fsm).unwrap();
        assert!(bytes.starts_with(SNAPSHOT_MAGIC));
        assert_eq!(decode_snapshot(&bytes).unwrap(), fsm);
        assert!(
            bytes.len() < serde_json::to_vec(&fsm).unwrap().len(),
            "binary is smaller"
        );

        // One flipped bit anywhere in the state: checksum mismatch.
        let mut flipped = bytes.clone();
        flipped[bytes.len() / 2] ^= 0x10;
        let e = decode_snapshot(&flipped).unwrap_err();
        assert!(matches!(e, SnapshotError::Checksum { .. }), "{e}");
        assert!(e.to_string().contains("corrupted"), "{e}");
        // Cut short: the length does not match.
        let e = decode_snapshot(&bytes[..bytes.len() - 9]).unwrap_err();
        assert!(matches!(e, SnapshotError::Length { .. }), "{e}");
        let e = decode_snapshot(&bytes[..12]).unwrap_err();
        assert!(matches!(e, SnapshotError::Truncated { .. }), "{e}");

        // Installing a corrupted snapshot leaves the replica's state as it was.
        let mut replica = fsm_with_jobs(3);
        let before = replica.clone();
        assert!(replica.restore(&flipped).is_err());
        assert_eq!(replica, before);
        // A good one is installed; an older JSON snapshot still reads.
        replica.restore(&bytes).unwrap();
        assert_eq!(replica, fsm);
        let json = serde_json::to_vec(&fsm).unwrap();
        assert_eq!(decode_snapshot(&json).unwrap(), fsm);
    }
}
