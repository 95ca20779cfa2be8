//! What both ends of the allocation stream agree on: how large one node's allocation set may be
//! on the wire, and its digest, by which an agent learns whether the set it applied is the one
//! the state holds (the heartbeat reply carries the state's; see `HeartbeatReply`).
//!
//! # The size bound
//!
//! A job's spec bounds what each of its allocations carries (see [`crate::spec`]): the command
//! ([`MAX_COMMAND_ARGS`] arguments, [`MAX_COMMAND_BYTES`] bytes), the environment, plain and
//! secret together ([`MAX_ENV_VARS`] variables, [`MAX_ENV_BYTES`] bytes; a secret variable is
//! framed as a map entry is), up to [`MAX_DEVICES_PER_TASK`] devices,
//! names of at most [`MAX_NAME_LEN`] bytes. With the strings the scheduler adds (device uuids,
//! rank 0's address, the restore path, at the [`ASSUMED_MAX_UUID`], [`ASSUMED_MAX_ADDRESS`] and
//! [`ASSUMED_MAX_PATH`] this bound assumes) and protobuf's framing, one allocation encodes to at
//! most [`MAX_ALLOCATION_BYTES`] (about 160 KiB); a typical one is under 1 KiB.
//!
//! How many allocations one node holds has no bound of its own (CPU-only and fractional-device
//! tasks share a host), so a set is bounded by [`MAX_ALLOCATION_SET_BYTES`] (64 MiB): room for
//! [`MAX_FULL_ALLOCATIONS_PER_SET`] allocations each at the largest legal size, and for tens of
//! thousands of typical ones. The agent decodes the stream up to it (gRPC's default, 4 MiB, is
//! what broke a host in issue 15); a replica refuses to send a larger set, logs it at error with
//! the node and the size, and the host's tasks stop by their lease deadline.

use crate::pb;
use crate::sha256::Sha256;
use crate::spec::{
    MAX_COMMAND_ARGS, MAX_COMMAND_BYTES, MAX_DEVICES_PER_TASK, MAX_ENV_BYTES, MAX_ENV_VARS,
    MAX_NAME_LEN,
};

/// Longest device uuid the bound assumes (NVML's are 40 bytes).
pub const ASSUMED_MAX_UUID: usize = 256;
/// Longest `host:port` of rank 0 the bound assumes (a DNS name is at most 253 bytes).
pub const ASSUMED_MAX_ADDRESS: usize = 253 + 6;
/// Longest restore path the bound assumes (Linux's PATH_MAX).
pub const ASSUMED_MAX_PATH: usize = 4096;

/// Protobuf framing of one length-delimited field up to 2 MiB: a tag byte and a 3-byte length.
const FRAME: usize = 4;
/// A varint field: a tag byte and up to 10 bytes.
const VARINT: usize = 11;

/// The largest encoding of one legal allocation, framing included.
pub const MAX_ALLOCATION_BYTES: usize = {
    let job_id = FRAME + MAX_NAME_LEN + 1 + 20;
    let queue = FRAME + MAX_NAME_LEN;
    let command = MAX_COMMAND_BYTES + MAX_COMMAND_ARGS * FRAME;
    let env = MAX_ENV_BYTES + MAX_ENV_VARS * 3 * FRAME;
    let device = FRAME + 2 * VARINT + FRAME + ASSUMED_MAX_UUID;
    let devices = MAX_DEVICES_PER_TASK as usize * device;
    let strings = 3 * FRAME + ASSUMED_MAX_ADDRESS + ASSUMED_MAX_PATH + 16;
    let scalars = 7 * VARINT;
    FRAME + job_id + queue + command + env + devices + strings + scalars
};

/// The largest allocation set a replica sends and an agent decodes.
pub const MAX_ALLOCATION_SET_BYTES: usize = 64 * 1024 * 1024;

/// How many allocations of the largest legal size fit one set.
pub const MAX_FULL_ALLOCATIONS_PER_SET: usize = MAX_ALLOCATION_SET_BYTES / MAX_ALLOCATION_BYTES;

/// The bytes `set` takes in one message of the allocation stream.
pub fn encoded_len(set: &pb::AllocationSet) -> usize {
    prost::Message::encoded_len(set)
}

/// The digest of a node's allocation set: SHA-256 over each allocation's encoding (its `env`,
/// a map whose encoding order protobuf leaves open, taken out and hashed sorted) and the device
/// epochs. The revision (when the set was read) is left out: two reads of the same allocations
/// are the same set.
pub fn digest(set: &pb::AllocationSet) -> [u8; 32] {
    let mut h = Sha256::default();
    h.update(b"gangway.allocation-set.v1");
    h.update(&(set.allocations.len() as u64).to_be_bytes());
    for a in &set.allocations {
        let mut bare = a.clone();
        let mut env: Vec<(String, String)> = std::mem::take(&mut bare.env).into_iter().collect();
        env.sort_unstable();
        field(&mut h, &prost::Message::encode_to_vec(&bare));
        h.update(&(env.len() as u64).to_be_bytes());
        for (k, v) in &env {
            field(&mut h, k.as_bytes());
            field(&mut h, v.as_bytes());
        }
    }
    h.update(&(set.device_epochs.len() as u64).to_be_bytes());
    for e in &set.device_epochs {
        h.update(&e.to_be_bytes());
    }
    h.finish()
}

/// A length-prefixed field, so no two different sequences of fields hash the same bytes.
fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn largest_legal_allocation() -> pb::Allocation {
        let arg_len = MAX_COMMAND_BYTES / MAX_COMMAND_ARGS;
        let var_len = MAX_ENV_BYTES / MAX_ENV_VARS / 2;
        pb::Allocation {
            job_id: format!("{}-{}", "j".repeat(MAX_NAME_LEN), u64::MAX),
            task: u32::MAX,
            task_count: u32::MAX,
            epoch: u64::MAX,
            devices: (0..MAX_DEVICES_PER_TASK)
                .map(|i| pb::AllocatedDevice {
                    index: u32::MAX - i,
                    uuid: "G".repeat(ASSUMED_MAX_UUID),
                    milli: u32::MAX,
                })
                .collect(),
            command: vec!["c".repeat(arg_len); MAX_COMMAND_ARGS],
            env: (0..MAX_ENV_VARS)
                .map(|i| (format!("{i:0var_len$}"), "v".repeat(var_len)))
                .collect(),
            master_addr: "a".repeat(ASSUMED_MAX_ADDRESS),
            checkpoint_signal: "SIGQUIT".into(),
            checkpoint_timeout_ms: u64::MAX,
            restore_from: "/".repeat(ASSUMED_MAX_PATH),
            checkpoint_request: u64::MAX,
            checkpoint_request_at_grant: u64::MAX,
            queue: "q".repeat(MAX_NAME_LEN),
            secret_env: Vec::new(),
        }
    }

    #[test]
    fn the_largest_legal_allocation_fits_the_bound_and_the_set_holds_hundreds() {
        let a = largest_legal_allocation();
        let set = pb::AllocationSet {
            revision: u64::MAX,
            allocations: vec![a.clone()],
            device_epochs: vec![u64::MAX; 64],
        };
        let one = set.encoded_len() - 64 * 10;
        assert!(
            one <= MAX_ALLOCATION_BYTES,
            "{one} > {MAX_ALLOCATION_BYTES}"
        );
        const { assert!(MAX_ALLOCATION_BYTES < 170 * 1024) };
        const { assert!(MAX_FULL_ALLOCATIONS_PER_SET >= 400) };
        assert!(a.encoded_len() > 128 * 1024, "the test allocation is large");
    }

    #[test]
    fn the_digest_names_the_allocations_not_the_read() {
        let a = pb::Allocation {
            job_id: "train-1".into(),
            epoch: 4,
            command: vec!["sleep".into(), "9".into()],
            env: (0..20).map(|i| (format!("K{i}"), format!("{i}"))).collect(),
            ..Default::default()
        };
        let set =
            |revision, allocations: Vec<pb::Allocation>, epochs: Vec<u64>| pb::AllocationSet {
                revision,
                allocations,
                device_epochs: epochs,
            };
        let base = digest(&set(7, vec![a.clone()], vec![4, 0]));
        // Another read, with the environment map rebuilt (another iteration order).
        let mut same = a.clone();
        let mut pairs: Vec<(String, String)> = a.env.clone().into_iter().collect();
        pairs.reverse();
        same.env = pairs.into_iter().collect();
        assert_eq!(digest(&set(9, vec![same], vec![4, 0])), base);
        let mut changes = Vec::new();
        let mut b = a.clone();
        b.checkpoint_request = 1;
        changes.push(set(7, vec![b], vec![4, 0]));
        let mut c = a.clone();
        c.env.insert("K1".into(), "changed".into());
        changes.push(set(7, vec![c], vec![4, 0]));
        let mut secret = a.clone();
        secret.secret_env.push(pb::SecretVar {
            name: "TOKEN".into(),
            value: "t0ps3cret".into(),
        });
        let shown = format!("{secret:?}");
        assert!(
            shown.contains("TOKEN") && !shown.contains("t0ps3cret"),
            "{shown}"
        );
        changes.push(set(7, vec![secret.clone()], vec![4, 0]));
        let mut rotated = secret;
        rotated.secret_env[0].value = "rotated".into();
        changes.push(set(7, vec![rotated], vec![4, 0]));
        changes.push(set(7, vec![], vec![4, 0]));
        changes.push(set(7, vec![a.clone()], vec![5, 0]));
        changes.push(set(7, vec![a.clone(), a.clone()], vec![4, 0]));
        for changed in changes {
            assert_ne!(digest(&changed), base, "{changed:?}");
        }
    }
}
