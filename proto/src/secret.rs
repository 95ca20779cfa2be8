//! Secret environment values (`[secret_env]` in a job spec): what reaches only the leased hosts.
//!
//! A [`Secret`] holds its value for the one place that needs it (the allocation sent to a host that
//! runs the job) and hides it everywhere else by construction:
//!
//! - `Debug` prints `<secret>`, so a spec, a command or an allocation in a log line or an error
//!   shows the variable's name only;
//! - serialized by a human-readable format (JSON: backups, the job archive, `-o json`; TOML) it is
//!   written as `null`, and read back from `null` as *withheld*: the value is gone, the name stays;
//! - serialized by a binary format (bincode: the Raft log, Raft snapshots, forwarded writes) it
//!   keeps its value: that is how every replica holds it, on disk, in plain text (protect the
//!   replicas' data directories; see docs/OPERATIONS.md).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// What `Debug` and listings show instead of a secret value.
pub const REDACTED: &str = "<secret>";

/// A secret value, or the mark that it was withheld (written out by a human-readable format).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(Option<String>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Some(value.into()))
    }

    /// A secret whose value is gone (read back from a backup).
    pub fn withheld() -> Self {
        Secret(None)
    }

    /// The value, for the allocation of a leased host only; `None` once withheld.
    pub fn expose(&self) -> Option<&str> {
        self.0.as_deref()
    }

    pub fn is_withheld(&self) -> bool {
        self.0.is_none()
    }

    /// Bytes the value takes (0 when withheld).
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, String::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(_) => f.write_str(REDACTED),
            None => f.write_str("<secret withheld>"),
        }
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            return s.serialize_none();
        }
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Option::<String>::deserialize(d).map(Secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn debug_and_human_readable_formats_never_show_the_value() {
        let env = BTreeMap::from([("TOKEN".to_owned(), Secret::new("hunter2"))]);
        assert_eq!(format!("{env:?}"), "{\"TOKEN\": <secret>}");
        assert!(!format!("{env:#?}").contains("hunter2"));
        let json = serde_json::to_string(&env).unwrap();
        assert_eq!(json, "{\"TOKEN\":null}");
        let toml = toml::to_string(&BTreeMap::from([("k", Some(Secret::new("hunter2")))]));
        assert!(!toml.unwrap_or_default().contains("hunter2"));
        let back: BTreeMap<String, Secret> = serde_json::from_str(&json).unwrap();
        assert!(back["TOKEN"].is_withheld() && back["TOKEN"].is_empty());
        assert_eq!(back["TOKEN"].expose(), None);
        assert_eq!(format!("{:?}", back["TOKEN"]), "<secret withheld>");
    }

    #[test]
    fn binary_formats_keep_the_value_for_the_replicas() {
        let s = Secret::new("hunter2");
        let back: Secret = bincode::deserialize(&bincode::serialize(&s).unwrap()).unwrap();
        assert_eq!(back.expose(), Some("hunter2"));
        assert_eq!(back.len(), 7);
        let gone: Secret =
            bincode::deserialize(&bincode::serialize(&Secret::withheld()).unwrap()).unwrap();
        assert!(gone.is_withheld());
    }
}
