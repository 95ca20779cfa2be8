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
