//! `gangway nodes`, `gangway node drain|cordon|uncordon|remove`, `gangway device fence|unfence` and
//! `gangway leases`.

use super::common::{ClientOpts, WatchOpts, Watcher};
use super::output::{
    age_since, format_age, format_indices, format_milli, new_table, or_dash, print_action, rfc3339,
    table_string, Render,
};
use crate::client::{Client, ClientError};
use clap::{Args, Subcommand};
use gangway_proto::pb;
use serde::Serialize;

#[derive(Args, Debug)]
pub struct NodesArgs {
    #[command(flatten)]
    pub watch: WatchOpts,
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(Args, Debug)]
pub struct NodeGroup {
    #[command(subcommand)]
    pub command: NodeCommand,
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// Stop placing work on the node and move its jobs elsewhere (checkpointing those that can);
    /// what has not moved when the grace ends is stopped and re-queued.
    Drain(DrainArgs),
    /// Stop placing new work on the node; what runs there keeps running.
    Cordon(NodeStateArgs),
    /// Make the node schedulable again.
    Uncordon(NodeStateArgs),
    /// Decommission a node that holds no lease and is not ready (down, cordoned or drained).
    Remove(NodeStateArgs),
}

#[derive(Args, Debug)]
pub struct DeviceGroup {
    #[command(subcommand)]
    pub command: DeviceCommand,
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(Subcommand, Debug)]
pub enum DeviceCommand {
    /// Take a device out of service: no new lease is placed on it, and the gang holding it
    /// checkpoints and is repaired elsewhere. Only `device unfence` returns it.
    Fence(DeviceFenceArgs),
    /// Return a fenced device to service (also one fenced for its health).
    Unfence(DeviceFenceArgs),
}

#[derive(Args, Debug)]
pub struct DeviceFenceArgs {
    /// The node's name (as in `gangway nodes`).
    pub node: String,
    /// The device: its uuid, or its index on the node.
    pub device: String,
    /// Why, shown in `gangway nodes`.
    #[arg(long, default_value = "", hide_default_value = true)]
    pub reason: String,
}

#[derive(Args, Debug)]
pub struct NodeStateArgs {
    /// The node's name (as in `gangway nodes`).
    pub name: String,
    /// Why, shown in `gangway nodes`.
    #[arg(long, default_value = "", hide_default_value = true)]
    pub reason: String,
}

#[derive(Args, Debug)]
pub struct DrainArgs {
    #[command(flatten)]
    pub node: NodeStateArgs,
    /// How long the node's jobs have to checkpoint and move off before what still runs there is
    /// stopped and re-queued (1s to 24h). Default: the cluster's, 10 minutes.
    #[arg(long, value_parser = super::common::parse_duration, value_name = "DURATION")]
    pub grace: Option<std::time::Duration>,
}

#[derive(Args, Debug)]
pub struct LeasesArgs {
    #[command(flatten)]
    pub watch: WatchOpts,
    #[command(flatten)]
    pub opts: ClientOpts,
}

/// One node in `gangway nodes -o json`.
#[derive(Debug, Serialize)]
pub struct NodeView {
    pub name: String,
    pub address: String,
    pub state: String,
    pub state_reason: String,
    pub datacenter: String,
    pub zone: String,
    pub pod: String,
    pub rack: String,
    pub devices: u32,
    /// Free capacity in milli-devices (1000 per device).
    pub free_milli: u64,
    pub models: Vec<String>,
    pub cpu_milli: u64,
    pub memory_mib: u64,
    /// Milliseconds since the leader last heard from the worker; null when the answering replica
    /// is not the leader.
    pub heartbeat_age_ms: Option<u64>,
    /// Devices out of service now (failed, missing, or fenced by an operator).
    pub fenced_devices: u32,
    /// Every device that is not healthy and in service.
    pub device_conditions: Vec<DeviceConditionView>,
    /// A draining node: when what still runs there is stopped and re-queued (Unix ms); null
    /// when the node is not draining.
    pub drain_deadline_ms: Option<u64>,
    pub drain_deadline: Option<String>,
    /// Whether the node holds no lease (a drain is complete when it does not).
    pub empty: bool,
}

/// One device that is not simply healthy, in `gangway nodes -o json`.
#[derive(Debug, Serialize)]
pub struct DeviceConditionView {
    pub index: u32,
    pub uuid: String,
    /// "healthy", "degraded" or "failed".
    pub health: String,
    pub fenced: bool,
    /// "health", "absent" or "operator"; null when not fenced.
    pub fence_source: Option<String>,
    /// When it was fenced (Unix ms); null when it is not.
    pub fenced_since_ms: Option<u64>,
    /// For people: "fenced (health): failed: XID 79 ..." or "degraded: thermal throttling".
    pub description: String,
    pub since_ms: u64,
    pub since: Option<String>,
    /// Whether its host reported it when it last registered.
    pub present: bool,
}

impl From<&pb::DeviceCondition> for DeviceConditionView {
    fn from(d: &pb::DeviceCondition) -> Self {
        Self {
            index: d.index,
            uuid: d.uuid.clone(),
            health: d.health.clone(),
            fenced: d.fenced,
            fence_source: (!d.fence_source.is_empty()).then(|| d.fence_source.clone()),
            fenced_since_ms: (d.fenced_since_ms != 0).then_some(d.fenced_since_ms),
            description: d.description.clone(),
            since_ms: d.since_ms,
            since: rfc3339(d.since_ms),
            present: d.present,
        }
    }
}

impl From<&pb::NodeInfo> for NodeView {
    fn from(n: &pb::NodeInfo) -> Self {
        Self {
            name: n.name.clone(),
            address: n.address.clone(),
            state: n.state.clone(),
            state_reason: n.state_reason.clone(),
            datacenter: n.datacenter.clone(),
            zone: n.zone.clone(),
            pod: n.pod.clone(),
            rack: n.rack.clone(),
            devices: n.devices,
            free_milli: n.free_milli,
            models: n.models.clone(),
            cpu_milli: n.cpu_milli,
            memory_mib: n.memory_mib,
            heartbeat_age_ms: (n.heartbeat_age_ms != 0).then_some(n.heartbeat_age_ms),
            fenced_devices: n.fenced_devices,
            device_conditions: n
                .device_conditions
                .iter()
                .map(DeviceConditionView::from)
                .collect(),
            drain_deadline_ms: (n.drain_deadline_ms != 0).then_some(n.drain_deadline_ms),
            drain_deadline: rfc3339(n.drain_deadline_ms),
            empty: n.empty,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct NodeListView {
    pub nodes: Vec<NodeView>,
}

/// One task's devices under a lease.
#[derive(Debug, Serialize)]
pub struct TaskLeaseView {
    pub task: u32,
    pub host: String,
    pub devices: Vec<u32>,
}

/// One lease in `gangway leases -o json`.
#[derive(Debug, Serialize)]
pub struct LeaseView {
    pub job_id: String,
    pub epoch: u64,
    pub granted_at_ms: u64,
    pub granted_at: Option<String>,
    pub tasks: Vec<TaskLeaseView>,
}

impl From<&pb::LeaseInfo> for LeaseView {
    fn from(l: &pb::LeaseInfo) -> Self {
        Self {
            job_id: l.job_id.clone(),
            epoch: l.epoch,
            granted_at_ms: l.granted_at_ms,
            granted_at: rfc3339(l.granted_at_ms),
            tasks: l
                .tasks
                .iter()
                .map(|t| TaskLeaseView {
                    task: t.task,
                    host: t.host.clone(),
                    devices: t.devices.clone(),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct LeaseListView {
    pub leases: Vec<LeaseView>,
}

/// Where a node sits: `dc/zone/pod/rack`, empty levels left out.
fn location(n: &NodeView) -> String {
    let parts: Vec<&str> = [&n.datacenter, &n.zone, &n.pod, &n.rack]
        .into_iter()
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();
    or_dash(&parts.join("/"))
}

/// The STATE cell: a draining node says whether it is empty yet, or until when its work may
/// still move off on its own.
fn node_state_cell(n: &NodeView) -> String {
    if n.state != "draining" {
        return n.state.clone();
    }
    if n.empty {
        return "draining,empty".to_owned();
    }
    match &n.drain_deadline {
        Some(at) => format!("draining,until={at}"),
        None => n.state.clone(),
    }
}

pub fn nodes_table(view: &NodeListView) -> String {
    if view.nodes.is_empty() {
        return "No nodes.".to_owned();
    }
    let mut t = new_table([
        "NAME",
        "ADDRESS",
        "STATE",
        "DEVICES",
        "FENCED",
        "FREE",
        "MODELS",
        "LOCATION",
        "HEARTBEAT",
        "REASON",
    ]);
    for n in &view.nodes {
        t.add_row(vec![
            n.name.clone(),
            or_dash(&n.address),
            node_state_cell(n),
            n.devices.to_string(),
            n.fenced_devices.to_string(),
            format_milli(n.free_milli),
            or_dash(&n.models.join(",")),
            location(n),
            n.heartbeat_age_ms
                .map_or_else(|| "-".to_owned(), |ms| format!("{} ago", format_age(ms))),
            n.state_reason.clone(),
        ]);
    }
    let mut out = table_string(t);
    let conditions: Vec<String> = view
        .nodes
        .iter()
        .flat_map(|n| {
            n.device_conditions.iter().map(move |d| {
                format!(
                    "  {} device {} ({}): {}",
                    n.name, d.index, d.uuid, d.description
                )
            })
        })
        .collect();
    if !conditions.is_empty() {
        out.push_str("\n\nDevices not in plain health:\n");
        out.push_str(&conditions.join("\n"));
    }
    out
}

pub fn leases_table(view: &LeaseListView, now_ms: u64) -> String {
    if view.leases.is_empty() {
        return "No leases.".to_owned();
    }
    let mut t = new_table(["JOB", "EPOCH", "AGE", "TASKS"]);
    for l in &view.leases {
        let tasks = l
            .tasks
            .iter()
            .map(|t| format!("{}@{}[{}]", t.task, t.host, format_indices(&t.devices)))
            .collect::<Vec<_>>()
            .join(" ");
        t.add_row(vec![
            l.job_id.clone(),
            l.epoch.to_string(),
            age_since(l.granted_at_ms, now_ms),
            tasks,
        ]);
    }
    table_string(t)
}

async fn nodes_frame(client: &mut Client, render: Render) -> Result<String, ClientError> {
    let nodes = client.list_nodes().await?;
    let view = NodeListView {
        nodes: nodes.iter().map(NodeView::from).collect(),
    };
    Ok(render.view(&view, nodes_table))
}

pub async fn nodes(args: NodesArgs) -> Result<(), ClientError> {
    let mut client = args.opts.client();
    let mut w = Watcher::new(&args.watch, args.opts.output);
    loop {
        let render = w.render();
        let Some(frame) = w.during(nodes_frame(&mut client, render)).await else {
            return Ok(());
        };
        w.show(frame)?;
        if !w.next().await {
            return Ok(());
        }
    }
}

pub async fn node(group: NodeGroup) -> Result<(), ClientError> {
    let (args, state, action, done, grace) = match &group.command {
        NodeCommand::Drain(a) => (&a.node, "draining", "drain", "draining", a.grace),
        NodeCommand::Cordon(a) => (a, "cordoned", "cordon", "cordoned", None),
        NodeCommand::Uncordon(a) => (a, "ready", "uncordon", "ready", None),
        NodeCommand::Remove(a) => {
            let mut client = group.opts.client();
            client.remove_node(&a.name, &a.reason).await?;
            print_action(
                group.opts.output,
                "remove",
                &a.name,
                &format!("node {} removed", a.name),
            );
            return Ok(());
        }
    };
    let mut client = group.opts.client();
    client
        .set_node_state(&args.name, state, &args.reason, grace)
        .await?;
    print_action(
        group.opts.output,
        action,
        &args.name,
        &format!("node {} {done}", args.name),
    );
    Ok(())
}

pub async fn device(group: DeviceGroup) -> Result<(), ClientError> {
    let (args, fenced, action, done) = match &group.command {
        DeviceCommand::Fence(a) => (a, true, "fence", "fenced"),
        DeviceCommand::Unfence(a) => (a, false, "unfence", "returned to service"),
    };
    let mut client = group.opts.client();
    client
        .set_device_fence(&args.node, &args.device, fenced, &args.reason)
        .await?;
    let target = format!("{}/{}", args.node, args.device);
    print_action(
        group.opts.output,
        action,
        &target,
        &format!("device {} of node {} {done}", args.device, args.node),
    );
    Ok(())
}

async fn leases_frame(client: &mut Client, render: Render) -> Result<String, ClientError> {
    let leases = client.list_leases().await?;
    let view = LeaseListView {
        leases: leases.iter().map(LeaseView::from).collect(),
    };
    Ok(render.view(&view, |v| leases_table(v, render.now_ms)))
}

pub async fn leases(args: LeasesArgs) -> Result<(), ClientError> {
    let mut client = args.opts.client();
    let mut w = Watcher::new(&args.watch, args.opts.output);
    loop {
        let render = w.render();
        let Some(frame) = w.during(leases_frame(&mut client, render)).await else {
            return Ok(());
        };
        w.show(frame)?;
        if !w.next().await {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_and_lease_tables() {
        let node = pb::NodeInfo {
            name: "host-a".into(),
            address: "10.0.1.5:7201".into(),
            state: "draining".into(),
            state_reason: "disk swap".into(),
            datacenter: "dc1".into(),
            rack: "r2".into(),
            devices: 8,
            free_milli: 5500,
            models: vec!["H100".into()],
            heartbeat_age_ms: 0,
            fenced_devices: 1,
            device_conditions: vec![pb::DeviceCondition {
                index: 3,
                uuid: "GPU-a-3".into(),
                health: "failed".into(),
                fenced: true,
                fence_source: "health".into(),
                description: "fenced (health): failed: XID 79".into(),
                since_ms: 1_000,
                present: true,
                fenced_since_ms: 1_000,
            }],
            ..Default::default()
        };
        let view = NodeListView {
            nodes: vec![NodeView::from(&node)],
        };
        assert_eq!(view.nodes[0].heartbeat_age_ms, None);
        let table = nodes_table(&view);
        assert!(
            table.ends_with("\n  host-a device 3 (GPU-a-3): fenced (health): failed: XID 79"),
            "{table}"
        );
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["nodes"][0]["fenced_devices"], 1);
        assert_eq!(
            json["nodes"][0]["device_conditions"][0]["fence_source"],
            "health"
        );
        let line = table.lines().nth(1).unwrap().to_owned();
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "host-a",
                "10.0.1.5:7201",
                "draining",
                "8",
                "1",
                "5.5",
                "H100",
                "dc1/r2",
                "-",
                "disk",
                "swap"
            ]
        );

        let mut drained = node.clone();
        drained.empty = true;
        drained.drain_deadline_ms = 1_000;
        let mut moving = node.clone();
        moving.drain_deadline_ms = 1_000;
        let view = NodeListView {
            nodes: vec![NodeView::from(&drained), NodeView::from(&moving)],
        };
        let table = nodes_table(&view);
        let states: Vec<&str> = table
            .lines()
            .skip(1)
            .take(2)
            .map(|l| l.split_whitespace().nth(2).unwrap())
            .collect();
        assert_eq!(
            states,
            ["draining,empty", "draining,until=1970-01-01T00:00:01.000Z"]
        );
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["nodes"][0]["empty"], true);
        assert_eq!(json["nodes"][1]["drain_deadline_ms"], 1_000);

        let lease = pb::LeaseInfo {
            job_id: "j-1".into(),
            epoch: 3,
            granted_at_ms: 1_000,
            tasks: vec![
                pb::TaskLease {
                    task: 0,
                    host: "host-a".into(),
                    devices: vec![0, 1, 2, 3],
                },
                pb::TaskLease {
                    task: 1,
                    host: "host-b".into(),
                    devices: vec![6],
                },
            ],
        };
        let view = LeaseListView {
            leases: vec![LeaseView::from(&lease)],
        };
        let line = leases_table(&view, 61_000)
            .lines()
            .nth(1)
            .unwrap()
            .to_owned();
        assert_eq!(
            line.split_whitespace().collect::<Vec<_>>(),
            ["j-1", "3", "1m", "0@host-a[0-3]", "1@host-b[6]"]
        );
    }
}
