//! The consensus layer's fuzz target: every message a replica decodes from a peer and every file
//! it reads back at start (see `gangway_proto::fuzz` for how targets run in `make test` and
//! `make fuzz`). The application's own bytes inside them (commands, its snapshot) are the
//! scheduler's targets.

use crate::codec;
use crate::types::{Entry, LogCommand, SnapshotMeta, TypeConfig, Vote};
use openraft::entry::RaftEntry;
use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use openraft::testing::{blank_ent, log_id, membership_ent};
use std::collections::BTreeSet;

/// What the first byte of an input selects.
const KINDS: u8 = 8;

/// One peer message or stored record: the first byte picks the kind (`AppendEntries`, `Vote` and
/// `PreVote`, `TransferLeader`, the `InstallSnapshot` header, a snapshot file, a snapshot's body,
/// a log entry as the log store keeps it, a raft log segment file), the rest is its bincode (or the
/// segment's bytes), decoded as the receiving code decodes it and then used as it would use it.
pub fn raft_message(data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % KINDS {
        0 => {
            if let Ok(req) = codec::decode::<AppendEntriesRequest<TypeConfig>>(body) {
                for entry in &req.entries {
                    let _ = (entry.to_string(), entry.log_id());
                }
                let _ = format!("{req:?}");
            }
        }
        1 => {
            if let Ok(req) = codec::decode::<VoteRequest<TypeConfig>>(body) {
                let _ = format!("{req:?}");
            }
        }
        2 => {
            if let Ok(req) = codec::decode::<TransferLeaderRequest<TypeConfig>>(body) {
                let _ = format!("{req:?}");
            }
        }
        3 => {
            if let Ok((vote, meta)) = codec::decode::<(Vote, SnapshotMeta)>(body) {
                let _ = (vote.to_string(), meta.to_string(), meta.signature());
            }
        }
        4 => {
            if let Ok((meta, data)) = crate::snapshot_store::decode(body) {
                let _ = meta.to_string();
                let _ = codec::decode::<crate::state_machine::SnapshotBody>(&data);
            }
        }
        5 => {
            let _ = codec::decode::<crate::state_machine::SnapshotBody>(body);
        }
        6 => {
            if let Ok(entry) = codec::decode::<Entry>(body) {
                let _ = (entry.to_string(), entry.get_membership());
            }
        }
        _ => drop(crate::log_store::wal::replay_untrusted(body)),
    }
}

/// One valid record of each kind, tagged with its kind byte.
pub fn raft_message_seeds() -> Vec<Vec<u8>> {
    let tagged = |kind: u8, body: Vec<u8>| [vec![kind], body].concat();
    let command = LogCommand {
        stamped_ms: 1_700_000_000_000,
        command: b"an application command".to_vec(),
    };
    let entries: Vec<Entry> = vec![
        blank_ent::<TypeConfig>(3, 1, 7),
        membership_ent::<TypeConfig>(3, 1, 8, vec![BTreeSet::from([1, 2, 3])]),
        Entry::new_normal(log_id::<TypeConfig>(3, 1, 9), command),
    ];
    let append = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(3, 1),
        prev_log_id: Some(log_id::<TypeConfig>(3, 1, 6)),
        entries: entries.clone(),
        leader_commit: Some(log_id::<TypeConfig>(3, 1, 6)),
    };
    let vote = VoteRequest::<TypeConfig> {
        vote: Vote::new(4, 2),
        last_log_id: Some(log_id::<TypeConfig>(3, 1, 9)),
        leadership_transfer: false,
    };
    let transfer = TransferLeaderRequest::<TypeConfig>::new(
        Vote::new_committed(3, 1),
        2,
        Some(log_id::<TypeConfig>(3, 1, 9)),
    );
    let meta = SnapshotMeta {
        last_log_id: Some(log_id::<TypeConfig>(3, 1, 8)),
        last_membership: Default::default(),
    };
    let body = codec::encode(&crate::state_machine::SnapshotBody {
        last_time_ms: 1_700_000_000_000,
        app: b"the application's snapshot".to_vec(),
    })
    .expect("encodes");
    let encode = |v: &dyn erased::Encode| v.bytes();
    vec![
        tagged(0, encode(&append)),
        tagged(1, encode(&vote)),
        tagged(2, encode(&transfer)),
        tagged(3, encode(&(Vote::new_committed(3, 1), meta.clone()))),
        tagged(
            4,
            crate::snapshot_store::encode(&meta, &body).expect("encodes"),
        ),
        tagged(5, body),
        tagged(6, encode(&entries[2])),
        tagged(7, crate::log_store::wal::segment_seed()),
    ]
}

/// Encoding values of different types through one closure.
mod erased {
    pub trait Encode {
        fn bytes(&self) -> Vec<u8>;
    }

    impl<T: serde::Serialize> Encode for T {
        fn bytes(&self) -> Vec<u8> {
            crate::codec::encode(self).expect("seeds encode")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuzz_raft_message_short_run() {
        let seeds = raft_message_seeds();
        assert!(codec::decode::<AppendEntriesRequest<TypeConfig>>(&seeds[0][1..]).is_ok());
        assert!(crate::snapshot_store::decode(&seeds[4][1..]).is_ok());
        let replayed = crate::log_store::wal::replay_untrusted(&seeds[7][1..]);
        assert_eq!(replayed, Ok(Some(8)), "the segment seed replays whole");
        gangway_proto::fuzz::short_run("raft_message", &seeds, 5_000, raft_message);
    }
}
