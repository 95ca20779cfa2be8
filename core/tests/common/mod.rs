//! Fixtures the state-machine stories share.

use gangway_core::engine::{DeviceKind, DeviceShare, GangPlacement, HostTopology, TaskPlacement};
use gangway_core::state::{
    ClusterStore, Command, DeviceInventory, Event, NodeRegistration, Response,
};
use gangway_proto::ids::{HostName, JobId};

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

/// A store applied to as a replica applies its log: each command stamped 10 ms after the last.
/// Stories add their own steps with `impl common::Cluster` blocks.
#[allow(dead_code)] // not every story uses it
pub struct Cluster {
    pub store: ClusterStore,
    pub now: u64,
    pub events: Vec<Event>,
}

#[allow(dead_code)]
impl Cluster {
    pub fn new() -> Self {
        Self {
            store: ClusterStore::new(),
            now: 1_000,
            events: Vec::new(),
        }
    }

    pub fn apply(&mut self, cmd: Command) -> Response {
        self.now += 10;
        self.store.apply(self.now, cmd, &mut self.events)
    }
}

/// Job `job` of queue `default` placed whole on device `index` of `host`.
#[allow(dead_code)]
pub fn one_device(job: &JobId, host: &str, index: u16) -> GangPlacement {
    GangPlacement {
        job: job.clone(),
        queue: "default".into(),
        tasks: vec![TaskPlacement {
            host: HostName::new(host),
            devices: vec![DeviceShare { index, milli: 1000 }],
            cpu_milli: 0,
            memory_mib: 0,
        }],
        borrowed_milli: 0,
    }
}
