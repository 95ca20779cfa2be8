//! `gangway defrag plan`: what the defragmenter would move now, and for which waiting gang.

use super::common::ClientOpts;
use super::output::{age_since, new_table, now_ms, table_string, to_json, Output};
use crate::client::ClientError;
use clap::{Args, Subcommand};
use gangway_proto::pb;
use serde::Serialize;

#[derive(Args, Debug)]
pub struct DefragGroup {
    #[command(subcommand)]
    pub command: DefragCommand,
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(Subcommand, Debug)]
pub enum DefragCommand {
    /// Preview: for waiting gangs blocked by shape, the cheapest migrations that would free a
    /// block for them. Nothing is changed.
    Plan,
    /// The defragmenter's settings, migrations under way, blocks held for waiting gangs, and
    /// fragmentation per topology level.
    Status,
}

/// `gangway defrag status -o json`.
#[derive(Debug, Serialize)]
pub struct DefragStatusView {
    pub enabled: bool,
    pub max_moves: u32,
    pub reservation_ms: u64,
    /// (job, devices, since_ms, checkpoint request)
    pub migrating: Vec<MigratingView>,
    pub reservations: Vec<ReservationView>,
    /// level -> per cent of free devices in partly used domains of that level.
    pub fragmentation_pct: std::collections::BTreeMap<String, f64>,
    /// Device-hours idle-lease reclamation has given back.
    pub reclaimed_device_hours: f64,
    /// What was done to give capacity back, oldest first.
    pub recent: Vec<ActionView>,
}

#[derive(Debug, Serialize)]
pub struct ActionView {
    pub at_ms: u64,
    pub what: String,
}

#[derive(Debug, Serialize)]
pub struct MigratingView {
    pub job_id: String,
    pub devices: u64,
    pub since_ms: u64,
    pub checkpoint_request: u64,
}

#[derive(Debug, Serialize)]
pub struct ReservationView {
    pub job_id: String,
    pub hosts: Vec<String>,
    pub until_ms: u64,
}

impl From<&pb::DefragStatusReply> for DefragStatusView {
    fn from(r: &pb::DefragStatusReply) -> Self {
        Self {
            enabled: r.enabled,
            max_moves: r.max_moves,
            reservation_ms: r.reservation_ms,
            migrating: r
                .migrating
                .iter()
                .map(|m| MigratingView {
                    job_id: m.job_id.clone(),
                    devices: m.devices,
                    since_ms: m.since_ms,
                    checkpoint_request: m.checkpoint_request,
                })
                .collect(),
            reservations: r
                .reservations
                .iter()
                .map(|h| ReservationView {
                    job_id: h.job_id.clone(),
                    hosts: h.hosts.clone(),
                    until_ms: h.until_ms,
                })
                .collect(),
            fragmentation_pct: r
                .fragmentation
                .iter()
                .map(|f| (f.level.clone(), f.pct))
                .collect(),
            reclaimed_device_hours: r.reclaimed_device_hours,
            recent: r
                .recent
                .iter()
                .map(|h| ActionView {
                    at_ms: h.at_ms,
                    what: h.what.clone(),
                })
                .collect(),
        }
    }
}

pub fn defrag_status_table(v: &DefragStatusView, now_ms: u64) -> String {
    let mut out = format!(
        "Defragmentation: {}; at most {} gangs migrating at once; freed blocks held {}.\n",
        if v.enabled { "on" } else { "off" },
        v.max_moves,
        humantime::format_duration(std::time::Duration::from_millis(v.reservation_ms))
    );
    let frag: Vec<String> = v
        .fragmentation_pct
        .iter()
        .map(|(level, pct)| format!("{level} {pct:.1}%"))
        .collect();
    out.push_str(&format!(
        "Free devices in partly used domains: {}.\n",
        frag.join(", ")
    ));
    out.push_str(&format!(
        "Idle leases reclaimed so far gave back {:.2} device-hours.\n",
        v.reclaimed_device_hours
    ));
    if v.migrating.is_empty() {
        out.push_str("\nNo migration under way.");
    } else {
        let mut t = new_table(["MIGRATING", "DEVICES", "SINCE", "CHECKPOINT REQUEST"]);
        for m in &v.migrating {
            t.add_row(vec![
                m.job_id.clone(),
                m.devices.to_string(),
                format!("{} ago", age_since(m.since_ms, now_ms)),
                m.checkpoint_request.to_string(),
            ]);
        }
        out.push('\n');
        out.push_str(&table_string(t));
    }
    if v.reservations.is_empty() {
        out.push_str("\nNo block held.");
    } else {
        let mut t = new_table(["HELD FOR", "HOSTS", "UNTIL"]);
        for r in &v.reservations {
            t.add_row(vec![
                r.job_id.clone(),
                r.hosts.join(","),
                format!("in {}", age_since(now_ms, r.until_ms)),
            ]);
        }
        out.push_str("\n\n");
        out.push_str(&table_string(t));
    }
    if !v.recent.is_empty() {
        out.push_str("\n\nRecent actions (newest last):");
        for a in v.recent.iter().rev().take(10).rev() {
            out.push_str(&format!(
                "\n  {:>8} ago  {}",
                age_since(a.at_ms, now_ms),
                a.what
            ));
        }
    }
    out
}

#[derive(Debug, Serialize)]
pub struct MoveView {
    pub job_id: String,
    pub devices: u64,
    pub from_hosts: Vec<String>,
    pub to_hosts: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct PreviewView {
    pub job_id: String,
    pub devices: u64,
    pub gang_hosts: Vec<String>,
    pub moves: Vec<MoveView>,
}

/// `gangway defrag plan -o json`.
#[derive(Debug, Serialize)]
pub struct DefragPlanView {
    pub blocked_by_shape: u32,
    pub fragmentation_pct: f64,
    pub plans: Vec<PreviewView>,
}

impl From<&pb::DefragPlanReply> for DefragPlanView {
    fn from(r: &pb::DefragPlanReply) -> Self {
        Self {
            blocked_by_shape: r.blocked_by_shape,
            fragmentation_pct: r.fragmentation_pct,
            plans: r
                .plans
                .iter()
                .map(|p| PreviewView {
                    job_id: p.job_id.clone(),
                    devices: p.devices,
                    gang_hosts: p.gang_hosts.clone(),
                    moves: p
                        .moves
                        .iter()
                        .map(|m| MoveView {
                            job_id: m.job_id.clone(),
                            devices: m.devices,
                            from_hosts: m.from_hosts.clone(),
                            to_hosts: m.to_hosts.clone(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

pub fn defrag_plan_table(v: &DefragPlanView) -> String {
    let mut out = format!(
        "{} waiting gang(s) blocked by shape; {:.1}% of free devices sit on partly used hosts.",
        v.blocked_by_shape, v.fragmentation_pct
    );
    if v.plans.is_empty() {
        out.push_str("\nNo migration plan: nothing waits for shape, or nothing may move for it.");
        return out;
    }
    for p in &v.plans {
        out.push_str(&format!(
            "\n\nFor {} ({} devices, then on {}):\n",
            p.job_id,
            p.devices,
            p.gang_hosts.join(", ")
        ));
        let mut t = new_table(["MOVE", "DEVICES", "FROM", "TO"]);
        for m in &p.moves {
            t.add_row(vec![
                m.job_id.clone(),
                m.devices.to_string(),
                m.from_hosts.join(","),
                m.to_hosts.join(","),
            ]);
        }
        out.push_str(&table_string(t));
    }
    out
}

pub async fn defrag(group: DefragGroup) -> Result<(), ClientError> {
    let mut client = group.opts.client();
    match group.command {
        DefragCommand::Plan => {
            let view = DefragPlanView::from(&client.defrag_plan().await?);
            match group.opts.output {
                Output::Table => println!("{}", defrag_plan_table(&view)),
                Output::Json => println!("{}", to_json(&view, false)),
            }
        }
        DefragCommand::Status => {
            let view = DefragStatusView::from(&client.defrag_status().await?);
            match group.opts.output {
                Output::Table => println!("{}", defrag_status_table(&view, now_ms())),
                Output::Json => println!("{}", to_json(&view, false)),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_reads_as_moves_and_an_empty_one_says_why() {
        let reply = pb::DefragPlanReply {
            blocked_by_shape: 1,
            fragmentation_pct: 37.5,
            plans: vec![pb::DefragPreview {
                job_id: "gang-3".into(),
                devices: 16,
                gang_hosts: vec!["h1".into(), "h2".into()],
                moves: vec![pb::DefragMove {
                    job_id: "one-1".into(),
                    devices: 1,
                    from_hosts: vec!["h1".into()],
                    to_hosts: vec!["h3".into()],
                }],
            }],
        };
        let text = defrag_plan_table(&DefragPlanView::from(&reply));
        assert!(
            text.contains("For gang-3 (16 devices, then on h1, h2)"),
            "{text}"
        );
        assert!(text.contains("one-1") && text.contains("h3"), "{text}");
        let empty = defrag_plan_table(&DefragPlanView::from(&pb::DefragPlanReply::default()));
        assert!(empty.contains("No migration plan"), "{empty}");
    }

    #[test]
    fn status_shows_budget_work_under_way_and_fragmentation() {
        let reply = pb::DefragStatusReply {
            enabled: true,
            max_moves: 8,
            reservation_ms: 600_000,
            migrating: vec![pb::Migrating {
                job_id: "one-1".into(),
                devices: 1,
                since_ms: 1_000,
                checkpoint_request: 2,
            }],
            reservations: vec![pb::Reservation {
                job_id: "gang-3".into(),
                hosts: vec!["h1".into(), "h2".into()],
                until_ms: 601_000,
            }],
            fragmentation: vec![pb::LevelFragmentation {
                level: "rack".into(),
                pct: 62.5,
            }],
            reclaimed_device_hours: 3.25,
            recent: vec![pb::HistoryLine {
                at_ms: 11_000,
                what: "defragmentation: migrating one-1 to free h1, h2 for gang-3".into(),
            }],
        };
        let text = defrag_status_table(&DefragStatusView::from(&reply), 31_000);
        for want in [
            "on; at most 8",
            "10m",
            "rack 62.5%",
            "one-1",
            "30s ago",
            "gang-3",
            "h1,h2",
            "gave back 3.25 device-hours",
            "20s ago  defragmentation: migrating one-1 to free h1, h2 for gang-3",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
        let v = serde_json::to_value(DefragStatusView::from(&reply)).unwrap();
        assert_eq!(v["fragmentation_pct"]["rack"], 62.5);
    }
}
