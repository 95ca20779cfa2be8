//! The one binary encoding used for everything this crate writes or sends: bincode 1.x over serde.
//!
//! Why bincode: the workspace already pins it, it is compact and fast, and it handles every openraft
//! type (openraft only uses `serde(default)`, which bincode tolerates). Log entries, votes, snapshot
//! metadata, wire messages and the application's commands/responses all use it, so there is exactly
//! one format to reason about when reading a data directory or a packet capture.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Encode a value. Encoding a plain serde type into a `Vec` cannot fail except for types whose
/// `Serialize` impl itself errors, which is reported, never panicked on.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, std::io::Error> {
    bincode::serialize(value).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Encode a value at the end of `out`, with no buffer of its own.
pub fn encode_into<T: Serialize + ?Sized>(
    value: &T,
    out: &mut Vec<u8>,
) -> Result<(), std::io::Error> {
    bincode::serialize_into(out, value)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Decode a value; corrupt or foreign bytes become `InvalidData`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, std::io::Error> {
    bincode::deserialize(bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::state_machine::SnapshotBody;
    use crate::types::LogCommand;
    use crate::types::LogResponse;
    use crate::write_path::ForwardReply;

    /// A value whose byte fields are written as one slice (`serde_bytes`) encodes to the bytes it
    /// encoded to when they were plain `Vec<u8>`s, sequences of u8 (`before`: the same fields as a
    /// tuple), and those bytes decode to a value that encodes to them again: logs, snapshots and
    /// replies written by an earlier build read the same.
    pub(crate) fn written_as_before<T: Serialize + DeserializeOwned, B: Serialize>(
        now: &T,
        before: &B,
    ) {
        let old = encode(before).unwrap();
        assert_eq!(encode(now).unwrap(), old);
        assert_eq!(encode(&decode::<T>(&old).unwrap()).unwrap(), old);
    }

    /// Some bytes of each length, none all alike.
    pub(crate) fn some_bytes() -> impl Iterator<Item = Vec<u8>> {
        [0usize, 1, 256, 70_000]
            .into_iter()
            .map(|len| (0..len).map(|i| (i * 31 % 251) as u8).collect())
    }

    #[test]
    fn byte_fields_are_written_as_they_always_were() {
        for b in some_bytes() {
            let command = LogCommand {
                stamped_ms: 7,
                command: b.clone(),
            };
            written_as_before(&command, &(7u64, &b));
            let response = LogResponse {
                response: b.clone(),
                rejected: Some("no".into()),
            };
            written_as_before(&response, &(&b, Some("no")));
            let body = SnapshotBody {
                last_time_ms: 9,
                app: b.clone(),
            };
            written_as_before(&body, &(9u64, &b));
            let reply = ForwardReply::Applied {
                index: 3,
                response: b.clone(),
            };
            written_as_before(&reply, &(0u32, 3u64, &b));
        }
    }
}
