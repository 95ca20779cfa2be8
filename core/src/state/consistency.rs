//! Whether a state contradicts itself: what a snapshot or a backup must pass before a replica uses
//! it. Every command keeps these relations; a state decoded from bytes someone else wrote (a
//! backup an admin edited, a snapshot damaged in a way its checksum did not catch) is refused
//! whole instead of panicking a replica, or every replica replaying it, later.

use super::store::ClusterStore;
use std::collections::BTreeSet;

impl ClusterStore {
    /// The first contradiction, if any: the engine's own ledgers (`ClusterState::check`), the
    /// engine's hosts against the node records, each job against its key and its spec's limits,
    /// and the engine's running gangs against the jobs' leases.
    pub fn check_consistency(&self) -> Result<(), String> {
        self.engine.check()?;
        let hosts: BTreeSet<_> = self.engine.hosts().iter().map(|h| &h.spec.name).collect();
        let nodes: BTreeSet<_> = self.nodes.keys().collect();
        if hosts != nodes {
            return Err(format!(
                "the engine knows {} hosts, the records {} nodes, not the same ones",
                hosts.len(),
                nodes.len()
            ));
        }
        for (name, node) in &self.nodes {
            let host = self.engine.host(name).map_or(0, |h| h.spec.devices.len());
            if &node.registration.name != name || node.registration.devices.len() != host {
                return Err(format!("node {name}: its record and its host differ"));
            }
        }
        for (id, job) in self.jobs.map() {
            if &job.id != id {
                return Err(format!("job {id} is filed under another id, {}", job.id));
            }
            job.spec.check_limits()?;
            let running = self.engine.running().get(id).map(|g| &g.placement);
            if job.lease.as_ref().map(|l| &l.placement) != running {
                return Err(format!(
                    "job {id}: its lease and the engine's placement differ"
                ));
            }
        }
        if let Some(id) = self
            .engine
            .running()
            .keys()
            .find(|id| self.jobs.get(id).is_none())
        {
            return Err(format!("the engine runs unknown job {id}"));
        }
        Ok(())
    }
}
