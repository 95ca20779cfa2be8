//! Topology levels: how tightly a gang must be packed.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A level of the topology tree, narrowest first, so `a < b` means "a is inside b".
///
/// `Nvlink` is the set of devices on one host that share an NVLink (or NUMA) domain; `Host` is one
/// machine; the wider levels come from the host's labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TopologyLevel {
    Nvlink,
    Host,
    Rack,
    Pod,
    Zone,
    Datacenter,
}

impl TopologyLevel {
    pub const ALL: [TopologyLevel; 6] = [
        TopologyLevel::Nvlink,
        TopologyLevel::Host,
        TopologyLevel::Rack,
        TopologyLevel::Pod,
        TopologyLevel::Zone,
        TopologyLevel::Datacenter,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TopologyLevel::Nvlink => "nvlink",
            TopologyLevel::Host => "host",
            TopologyLevel::Rack => "rack",
            TopologyLevel::Pod => "pod",
            TopologyLevel::Zone => "zone",
            TopologyLevel::Datacenter => "datacenter",
        }
    }
}

impl fmt::Display for TopologyLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error for a topology level name that is not one of the six.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown topology level {0:?}: expected one of host, nvlink, rack, pod, zone, datacenter")]
pub struct UnknownTopologyLevel(pub String);

impl FromStr for TopologyLevel {
    type Err = UnknownTopologyLevel;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TopologyLevel::ALL
            .into_iter()
            .find(|l| l.as_str() == s)
            .ok_or_else(|| UnknownTopologyLevel(s.to_owned()))
    }
}
