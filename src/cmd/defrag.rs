//! `gangway defrag plan`: what the defragmenter would move now, and for which waiting gang.

use super::common::ClientOpts;
use super::output::{new_table, table_string, to_json, Output};
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
    let DefragCommand::Plan = group.command;
    let reply = group.opts.client().defrag_plan().await?;
    let view = DefragPlanView::from(&reply);
    match group.opts.output {
        Output::Table => println!("{}", defrag_plan_table(&view)),
        Output::Json => println!("{}", to_json(&view, false)),
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
}
