//! Where a host sits in the fleet, and the levels a gang can be confined to.

pub use gangway_proto::topology::{TopologyLevel, UnknownTopologyLevel};
use serde::{Deserialize, Serialize};

/// The labels that place a host in the tree above it (`dc=dc1,zone=z1,pod=p1,rack=r3`).
///
/// Labels are names, not paths: two racks called `r1` in different pods are different racks, because
/// the engine keys a domain by the whole path down to it.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HostTopology {
    pub datacenter: String,
    pub zone: String,
    pub pod: String,
    pub rack: String,
}

impl HostTopology {
    pub fn new(datacenter: &str, zone: &str, pod: &str, rack: &str) -> Self {
        Self {
            datacenter: datacenter.to_owned(),
            zone: zone.to_owned(),
            pod: pod.to_owned(),
            rack: rack.to_owned(),
        }
    }
}
