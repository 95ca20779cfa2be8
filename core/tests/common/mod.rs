//! Fixtures the state-machine stories share.

use gangway_core::engine::{DeviceKind, HostTopology};
use gangway_core::state::{DeviceInventory, NodeRegistration};
use gangway_proto::ids::HostName;

/// GPU `i` of host `node`: an H100 whose uuid is `GPU-<node>-<i>`.
pub fn gpu(node: &str, i: u16) -> DeviceInventory {
    DeviceInventory {
        uuid: format!("GPU-{node}-{i}"),
        model: "H100".into(),
        kind: DeviceKind::Gpu,
        memory_mib: 80 * 1024,
        nvlink_domain: 0,
    }
}

/// Host `name` in rack `rack` of dc1/z1/p1, with `gpus` H100s, 64 cores and 512 GiB.
pub fn node(name: &str, rack: &str, gpus: u16) -> NodeRegistration {
    NodeRegistration {
        name: HostName::new(name),
        address: format!("{name}:7300"),
        topology: HostTopology::new("dc1", "z1", "p1", rack),
        cpu_milli: 64_000,
        memory_mib: 512 * 1024,
        devices: (0..gpus).map(|i| gpu(name, i)).collect(),
    }
}
