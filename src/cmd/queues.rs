//! `gangway queues` and `gangway queue set`.

use super::common::{ClientOpts, WatchOpts, Watcher};
use super::output::{
    format_milli, new_table, parse_milli_devices, print_action, table_string, Render,
};
use crate::client::{Client, ClientError};
use clap::{Args, Subcommand};
use gangway_proto::pb;
use serde::Serialize;

#[derive(Args, Debug)]
pub struct QueuesArgs {
    #[command(flatten)]
    pub watch: WatchOpts,
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(Args, Debug)]
pub struct QueueGroup {
    #[command(subcommand)]
    pub command: QueueCommand,
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(Subcommand, Debug)]
pub enum QueueCommand {
    /// Create a queue or change its quota. A flag left out keeps the queue's current value
    /// (a new queue: 0 guaranteed, may borrow).
    Set(QueueSetArgs),
}

#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("change").required(true).multiple(true)
    .args(["guaranteed", "may_borrow", "no_borrow"]))]
pub struct QueueSetArgs {
    /// The queue's name.
    pub name: String,
    /// Devices the queue is guaranteed; fractions allowed (2.5), to a thousandth of a device.
    #[arg(long, value_parser = parse_milli_devices, value_name = "DEVICES")]
    pub guaranteed: Option<u64>,
    /// The queue may use idle devices beyond its guarantee (reclaimed when their owner needs them).
    #[arg(long, conflicts_with = "no_borrow")]
    pub may_borrow: bool,
    /// The queue never uses more than its guarantee.
    #[arg(long)]
    pub no_borrow: bool,
}

/// One queue in `gangway queues -o json`.
#[derive(Debug, Serialize)]
pub struct QueueView {
    pub name: String,
    pub guaranteed_milli: u64,
    pub may_borrow: bool,
    pub used_milli: u64,
    pub pending_jobs: u32,
    pub running_jobs: u32,
}

impl From<&pb::QueueInfo> for QueueView {
    fn from(q: &pb::QueueInfo) -> Self {
        Self {
            name: q.name.clone(),
            guaranteed_milli: q.guaranteed_milli,
            may_borrow: q.may_borrow,
            used_milli: q.used_milli,
            pending_jobs: q.pending_jobs,
            running_jobs: q.running_jobs,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct QueueListView {
    pub queues: Vec<QueueView>,
}

pub fn queues_table(view: &QueueListView) -> String {
    if view.queues.is_empty() {
        return "No queues.".to_owned();
    }
    let mut t = new_table(["NAME", "GUARANTEED", "USED", "BORROW", "PENDING", "RUNNING"]);
    for q in &view.queues {
        t.add_row(vec![
            q.name.clone(),
            format_milli(q.guaranteed_milli),
            format_milli(q.used_milli),
            if q.may_borrow { "yes" } else { "no" }.to_owned(),
            q.pending_jobs.to_string(),
            q.running_jobs.to_string(),
        ]);
    }
    table_string(t)
}

async fn queues_frame(client: &mut Client, render: Render) -> Result<String, ClientError> {
    let queues = client.list_queues().await?;
    let view = QueueListView {
        queues: queues.iter().map(QueueView::from).collect(),
    };
    Ok(render.view(&view, queues_table))
}

pub async fn queues(args: QueuesArgs) -> Result<(), ClientError> {
    let mut client = args.opts.client();
    let mut w = Watcher::new(&args.watch, args.opts.output);
    loop {
        let render = w.render();
        let Some(frame) = w.during(queues_frame(&mut client, render)).await else {
            return Ok(());
        };
        w.show(frame)?;
        if !w.next().await {
            return Ok(());
        }
    }
}

pub async fn queue(group: QueueGroup) -> Result<(), ClientError> {
    let QueueCommand::Set(args) = group.command;
    let mut client = group.opts.client();
    let borrow_flag = match (args.may_borrow, args.no_borrow) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    };
    // A value left out keeps the queue's current one.
    let (guaranteed_milli, may_borrow) = match (args.guaranteed, borrow_flag) {
        (Some(g), Some(b)) => (g, b),
        (g, b) => {
            let current = client
                .list_queues()
                .await?
                .into_iter()
                .find(|q| q.name == args.name);
            let (cur_g, cur_b) = current.map_or((0, true), |q| (q.guaranteed_milli, q.may_borrow));
            (g.unwrap_or(cur_g), b.unwrap_or(cur_b))
        }
    };
    client
        .set_queue(&args.name, guaranteed_milli, may_borrow)
        .await?;
    print_action(
        group.opts.output,
        "set-queue",
        &args.name,
        &format!(
            "queue {}: {} devices guaranteed, {}",
            args.name,
            format_milli(guaranteed_milli),
            if may_borrow {
                "may borrow"
            } else {
                "no borrowing"
            }
        ),
    );
    Ok(())
}
