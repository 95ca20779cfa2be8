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
    .args(["guaranteed", "may_borrow", "no_borrow", "idle_action", "idle_window", "idle_threshold"]))]
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
    /// What to do with a lease whose devices all stay below --idle-threshold for --idle-window:
    /// `reclaim` (checkpoint, release the devices, re-queue the job behind those waiting),
    /// `report` (a line in the job's history and a metric only), or `off`.
    #[arg(long, value_parser = ["reclaim", "report", "off"])]
    pub idle_action: Option<String>,
    /// How long every device of a lease must stay idle before the action (e.g. 30m).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub idle_window: Option<std::time::Duration>,
    /// Utilization in percent below which a device counts as idle (1-100).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100), value_name = "PERCENT")]
    pub idle_threshold: Option<u32>,
}

/// Defaults for an idle policy's parts left out when it is first set.
const DEFAULT_IDLE_WINDOW_MS: u64 = 30 * 60 * 1000;
const DEFAULT_IDLE_THRESHOLD_PCT: u32 = 5;

/// One queue in `gangway queues -o json`.
#[derive(Debug, Serialize)]
pub struct QueueView {
    pub name: String,
    pub guaranteed_milli: u64,
    pub may_borrow: bool,
    pub used_milli: u64,
    pub pending_jobs: u32,
    pub running_jobs: u32,
    /// "reclaim", "report", or null when the queue has no idle policy.
    pub idle_action: Option<String>,
    pub idle_window_ms: u64,
    pub idle_threshold_pct: u32,
}

impl QueueView {
    /// The idle policy in words for the table: "reclaim <5% 30m", or "-".
    fn idle_words(&self) -> String {
        match &self.idle_action {
            None => "-".to_owned(),
            Some(action) => format!(
                "{action} <{}% {}",
                self.idle_threshold_pct,
                humantime::format_duration(std::time::Duration::from_millis(self.idle_window_ms))
            ),
        }
    }
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
            idle_action: (!q.idle_action.is_empty()).then(|| q.idle_action.clone()),
            idle_window_ms: q.idle_window_ms,
            idle_threshold_pct: q.idle_threshold_pct,
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
    let mut t = new_table([
        "NAME",
        "GUARANTEED",
        "USED",
        "BORROW",
        "IDLE POLICY",
        "PENDING",
        "RUNNING",
    ]);
    for q in &view.queues {
        t.add_row(vec![
            q.name.clone(),
            format_milli(q.guaranteed_milli),
            format_milli(q.used_milli),
            if q.may_borrow { "yes" } else { "no" }.to_owned(),
            q.idle_words(),
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
    // A value left out keeps the queue's current one (a new queue: no guarantee, may borrow).
    let current = client
        .list_queues()
        .await?
        .into_iter()
        .find(|q| q.name == args.name)
        .unwrap_or(pb::QueueInfo {
            may_borrow: true,
            ..Default::default()
        });
    let queue = merge_queue(&args, current);
    client.set_queue(&queue).await?;
    let view = QueueView::from(&queue);
    print_action(
        group.opts.output,
        "set-queue",
        &args.name,
        &format!(
            "queue {}: {} devices guaranteed, {}, idle policy {}",
            args.name,
            format_milli(queue.guaranteed_milli),
            if queue.may_borrow {
                "may borrow"
            } else {
                "no borrowing"
            },
            view.idle_words()
        ),
    );
    Ok(())
}

/// The queue's configuration after `queue set`: the flags given over the current values.
fn merge_queue(args: &QueueSetArgs, current: pb::QueueInfo) -> pb::QueueInfo {
    let mut q = pb::QueueInfo {
        name: args.name.clone(),
        guaranteed_milli: args.guaranteed.unwrap_or(current.guaranteed_milli),
        may_borrow: match (args.may_borrow, args.no_borrow) {
            (true, _) => true,
            (_, true) => false,
            _ => current.may_borrow,
        },
        idle_action: current.idle_action,
        idle_window_ms: current.idle_window_ms,
        idle_threshold_pct: current.idle_threshold_pct,
        ..Default::default()
    };
    match args.idle_action.as_deref() {
        Some("off") => q.idle_action.clear(),
        Some(action) => q.idle_action = action.to_owned(),
        None if q.idle_action.is_empty()
            && (args.idle_window.is_some() || args.idle_threshold.is_some()) =>
        {
            // Setting a window or threshold alone on a queue without a policy starts one that
            // reports: nothing is taken from anyone without saying `reclaim`.
            q.idle_action = "report".to_owned();
        }
        None => {}
    }
    if q.idle_action.is_empty() {
        q.idle_window_ms = 0;
        q.idle_threshold_pct = 0;
        return q;
    }
    q.idle_window_ms = args
        .idle_window
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .or((q.idle_window_ms > 0).then_some(q.idle_window_ms))
        .unwrap_or(DEFAULT_IDLE_WINDOW_MS);
    q.idle_threshold_pct = args
        .idle_threshold
        .or((q.idle_threshold_pct > 0).then_some(q.idle_threshold_pct))
        .unwrap_or(DEFAULT_IDLE_THRESHOLD_PCT);
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(flags: &[&str]) -> QueueSetArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            set: QueueSetArgs,
        }
        let mut argv = vec!["queue-set", "research"];
        argv.extend_from_slice(flags);
        Cli::try_parse_from(argv).expect("flags parse").set
    }

    fn existing(action: &str, window_ms: u64, pct: u32) -> pb::QueueInfo {
        pb::QueueInfo {
            name: "research".into(),
            guaranteed_milli: 8000,
            may_borrow: false,
            idle_action: action.into(),
            idle_window_ms: window_ms,
            idle_threshold_pct: pct,
            ..Default::default()
        }
    }

    /// Table: flags over an existing queue -> (guaranteed, borrow, action, window, threshold).
    #[test]
    fn queue_set_changes_only_what_it_names() {
        /// guaranteed, may borrow, idle action, window, threshold
        type After = (u64, bool, &'static str, u64, u32);
        let cases: &[(&[&str], pb::QueueInfo, After)] = &[
            (
                &["--guaranteed", "4"],
                existing("", 0, 0),
                (4000, false, "", 0, 0),
            ),
            (
                &["--may-borrow"],
                existing("reclaim", 60_000, 10),
                (8000, true, "reclaim", 60_000, 10),
            ),
            (
                &["--idle-action", "reclaim"],
                existing("", 0, 0),
                (8000, false, "reclaim", 1_800_000, 5),
            ),
            (
                &["--idle-window", "2m"],
                existing("", 0, 0),
                (8000, false, "report", 120_000, 5),
            ),
            (
                &["--idle-threshold", "20"],
                existing("reclaim", 60_000, 10),
                (8000, false, "reclaim", 60_000, 20),
            ),
            (
                &["--idle-action", "off"],
                existing("reclaim", 60_000, 10),
                (8000, false, "", 0, 0),
            ),
            (
                &["--idle-action", "report", "--idle-window", "90s"],
                existing("reclaim", 60_000, 10),
                (8000, false, "report", 90_000, 10),
            ),
        ];
        for (flags, current, want) in cases {
            let q = merge_queue(&args(flags), current.clone());
            let got = (
                q.guaranteed_milli,
                q.may_borrow,
                q.idle_action.as_str(),
                q.idle_window_ms,
                q.idle_threshold_pct,
            );
            assert_eq!(got, *want, "flags {flags:?}");
        }
    }

    #[test]
    fn out_of_range_threshold_and_unknown_action_are_refused_by_the_parser() {
        use clap::Parser;
        #[derive(Parser, Debug)]
        struct Cli {
            #[command(flatten)]
            set: QueueSetArgs,
        }
        for bad in [
            vec!["x", "q", "--idle-threshold", "0"],
            vec!["x", "q", "--idle-threshold", "101"],
            vec!["x", "q", "--idle-action", "evict"],
            vec!["x", "q", "--idle-window", "soon"],
            vec!["x", "q"],
        ] {
            assert!(
                Cli::try_parse_from(&bad).is_err(),
                "{bad:?} should be refused"
            );
        }
    }
}
