//! `gangway audit`: who did what (the audit trail of the replicated state), newest first.

use super::common::ClientOpts;
use super::output::{age_since, new_table, rfc3339, table_string, Render};
use crate::client::{Client, ClientError, Resend};
use clap::Args;
use gangway_proto::pb;
use serde::Serialize;

#[derive(Args, Debug)]
pub struct AuditArgs {
    /// At most this many entries, newest first (up to 5000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=5000))]
    pub limit: u32,
    /// Only the entries of this identity (client/alice, token/ci).
    #[arg(long, value_name = "NAME")]
    pub actor: Option<String>,
    #[command(flatten)]
    pub opts: ClientOpts,
}

/// One entry in `gangway audit -o json`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct AuditView {
    pub at_ms: u64,
    /// RFC 3339 (UTC) of `at_ms`.
    pub at: Option<String>,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
}

impl From<pb::AuditEntry> for AuditView {
    fn from(e: pb::AuditEntry) -> Self {
        AuditView {
            at: rfc3339(e.at_ms),
            at_ms: e.at_ms,
            actor: e.actor,
            action: e.action,
            target: e.target,
            outcome: e.outcome,
        }
    }
}

fn audit_table(entries: &Vec<AuditView>, now_ms: u64) -> String {
    if entries.is_empty() {
        return "no entries".to_owned();
    }
    let mut t = new_table(["AGE", "ACTOR", "ACTION", "TARGET", "OUTCOME"]);
    for e in entries {
        t.add_row(vec![
            age_since(e.at_ms, now_ms),
            e.actor.clone(),
            e.action.clone(),
            e.target.clone(),
            e.outcome.clone(),
        ]);
    }
    table_string(t)
}

/// The newest `limit` entries, of `actor` only when given. Safe to resend: a read.
pub async fn list_audit(
    client: &mut Client,
    limit: u32,
    actor: Option<&str>,
) -> Result<Vec<pb::AuditEntry>, ClientError> {
    let req = pb::ListAuditRequest {
        limit,
        actor: actor.unwrap_or_default().to_owned(),
    };
    client
        .call("ListAudit", Resend::Safe, |mut api| {
            let req = req.clone();
            async move { api.list_audit(req).await }
        })
        .await
        .map(|r| r.entries)
}

pub async fn audit(a: AuditArgs) -> Result<(), ClientError> {
    let mut client = a.opts.client();
    let entries = list_audit(&mut client, a.limit, a.actor.as_deref()).await?;
    let views: Vec<AuditView> = entries.into_iter().map(AuditView::from).collect();
    let render = Render::new(a.opts.output, false);
    println!("{}", render.view(&views, |v| audit_table(v, render.now_ms)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_render_newest_first_as_given_with_their_age() {
        let views: Vec<AuditView> = [
            (
                90_000,
                "client/alice",
                "cancel_job",
                "train-2",
                "unknown_job",
            ),
            (30_000, "token/ci", "submit_job", "train-1", "ok"),
        ]
        .into_iter()
        .map(|(at_ms, actor, action, target, outcome)| {
            AuditView::from(pb::AuditEntry {
                at_ms,
                actor: actor.into(),
                action: action.into(),
                target: target.into(),
                outcome: outcome.into(),
            })
        })
        .collect();
        let text = audit_table(&views, 120_000);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("AGE"), "{text}");
        assert!(
            lines[1].starts_with("30s") && lines[1].contains("unknown_job"),
            "{text}"
        );
        assert!(
            lines[2].starts_with("1m30s") && lines[2].contains("token/ci"),
            "{text}"
        );
        assert_eq!(audit_table(&Vec::new(), 0), "no entries");
        assert_eq!(views[1].at.as_deref(), Some("1970-01-01T00:00:30.000Z"));
    }
}
