//! `gangway cluster status|transfer-leader|add-member|remove-member|snapshot save|snapshot restore`.

use super::common::{ClientOpts, WatchOpts, Watcher};
use super::output::{format_bytes, new_table, print_action, table_string, to_json, Output, Render};
use crate::client::{display_addr, normalize_addr, Client, ClientError};
use clap::{Args, Subcommand};
use gangway_proto::pb;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct ClusterGroup {
    #[command(subcommand)]
    pub command: ClusterCommand,
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// The answering replica's view: its role, the leader, term, commit/applied index, members.
    Status(ClusterStatusArgs),
    /// Hand leadership to another voter.
    TransferLeader(TransferLeaderArgs),
    /// Add a replica (a voter, or a learner with --learner).
    AddMember(AddMemberArgs),
    /// Remove a replica.
    RemoveMember(RemoveMemberArgs),
    /// Consistent snapshots of the cluster state, for backups.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// What the replicated state keeps (finished jobs, idempotency keys, audit entries) and the
    /// pending cap per queue: shows them, and changes the ones given.
    Limits(LimitsArgs),
}

#[derive(Args, Debug)]
pub struct LimitsArgs {
    /// How long a finished job stays before it moves to the replicas' archives.
    #[arg(long, value_parser = super::common::parse_duration, value_name = "DURATION")]
    pub finished_retention: Option<std::time::Duration>,
    /// At most this many finished jobs stay (the oldest move to the archives first).
    #[arg(long, value_name = "N")]
    pub max_finished: Option<u64>,
    /// How long an idempotency key is remembered (a retry after it creates a new job).
    #[arg(long, value_parser = super::common::parse_duration, value_name = "DURATION")]
    pub idempotency_window: Option<std::time::Duration>,
    /// A queue with this many pending jobs refuses submissions (resource_exhausted).
    #[arg(long, value_name = "N")]
    pub max_pending_per_queue: Option<u64>,
    /// The audit trail keeps this many entries (the oldest leave first; at most 1,000,000).
    #[arg(long, value_name = "N")]
    pub max_audit_entries: Option<u64>,
}

#[derive(Args, Debug)]
pub struct ClusterStatusArgs {
    #[command(flatten)]
    pub watch: WatchOpts,
}

#[derive(Args, Debug)]
pub struct TransferLeaderArgs {
    /// The replica id to hand leadership to.
    #[arg(long, value_name = "ID")]
    pub to: u64,
}

#[derive(Args, Debug)]
pub struct AddMemberArgs {
    /// The new replica's id.
    #[arg(long, value_name = "ID")]
    pub id: u64,
    /// The new replica's gRPC address (host:port).
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_member_addr)]
    pub address: String,
    /// Add it as a learner (replicates, does not vote) instead of a voter.
    #[arg(long)]
    pub learner: bool,
}

#[derive(Args, Debug)]
pub struct RemoveMemberArgs {
    /// The replica id to remove.
    #[arg(long, value_name = "ID")]
    pub id: u64,
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Stream a snapshot into FILE (written to FILE.tmp, then renamed).
    Save(SnapshotSaveArgs),
    /// Load a snapshot into a new, empty cluster (no workers registered yet). Jobs that held a
    /// lease in the backup are re-queued from their last checkpoint.
    Restore(SnapshotRestoreArgs),
}

#[derive(Args, Debug)]
pub struct SnapshotRestoreArgs {
    /// A snapshot written by `gangway cluster snapshot save`.
    pub file: PathBuf,
}

/// `gangway cluster snapshot restore -o json`.
#[derive(Debug, Serialize)]
pub struct RestoreView {
    pub path: String,
    pub nodes: u32,
    pub jobs: u32,
    pub requeued: u32,
    pub backup_revision: u64,
}

#[derive(Args, Debug)]
pub struct SnapshotSaveArgs {
    /// Where to write the snapshot (JSON).
    pub file: PathBuf,
}

/// `host:port` for a member address (the scheme, if given, is dropped).
fn parse_member_addr(s: &str) -> Result<String, String> {
    normalize_addr(s).map(|uri| display_addr(&uri).to_owned())
}

/// One member in `gangway cluster status -o json`.
#[derive(Debug, Serialize)]
pub struct MemberView {
    pub id: u64,
    pub address: String,
    pub voter: bool,
    pub leader: bool,
    /// Entries the leader has replicated to it; null unless the answering replica is the leader.
    pub matched_index: Option<u64>,
    /// commit_index - matched_index; null unless the answering replica is the leader.
    pub lag: Option<u64>,
}

/// `gangway cluster status -o json`.
#[derive(Debug, Serialize)]
pub struct ClusterView {
    pub replica_id: u64,
    pub role: String,
    /// 0 when there is no leader.
    pub leader_id: u64,
    pub leader_address: String,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub members: Vec<MemberView>,
    /// The answering replica runs without TLS or authorization.
    pub insecure: bool,
}

impl From<&pb::ClusterStatusReply> for ClusterView {
    fn from(c: &pb::ClusterStatusReply) -> Self {
        let on_leader = c.role == "leader" || (c.leader_id != 0 && c.leader_id == c.replica_id);
        Self {
            replica_id: c.replica_id,
            role: c.role.clone(),
            leader_id: c.leader_id,
            leader_address: c.leader_address.clone(),
            term: c.term,
            commit_index: c.commit_index,
            applied_index: c.applied_index,
            insecure: c.insecure,
            members: c
                .members
                .iter()
                .map(|m| MemberView {
                    id: m.id,
                    address: m.address.clone(),
                    voter: m.voter,
                    leader: c.leader_id != 0 && m.id == c.leader_id,
                    matched_index: on_leader.then_some(m.matched_index),
                    lag: on_leader.then(|| c.commit_index.saturating_sub(m.matched_index)),
                })
                .collect(),
        }
    }
}

/// `gangway cluster snapshot save -o json`.
#[derive(Debug, Serialize)]
pub struct SnapshotView {
    pub path: String,
    pub bytes: u64,
}

pub fn cluster_table(v: &ClusterView) -> String {
    let leader = if v.leader_id == 0 {
        "none".to_owned()
    } else if v.leader_address.is_empty() {
        v.leader_id.to_string()
    } else {
        format!("{} ({})", v.leader_id, v.leader_address)
    };
    let mut out = format!(
        "Replica:  {} ({})\nLeader:   {leader}\nTerm:     {}\nCommit:   {}\nApplied:  {}",
        v.replica_id,
        if v.role.is_empty() { "-" } else { &v.role },
        v.term,
        v.commit_index,
        v.applied_index
    );
    if v.insecure {
        out.push_str(
            "\nSecurity: INSECURE (plain TCP, no authentication: anyone who reaches the port is admin)",
        );
    }
    if !v.members.is_empty() {
        let mut t = new_table(["ID", "ADDRESS", "ROLE", "MATCHED", "LAG"]);
        for m in &v.members {
            let role = match (m.leader, m.voter) {
                (true, _) => "leader",
                (false, true) => "voter",
                (false, false) => "learner",
            };
            let dash = |x: Option<u64>| x.map_or_else(|| "-".to_owned(), |n| n.to_string());
            t.add_row(vec![
                m.id.to_string(),
                m.address.clone(),
                role.to_owned(),
                dash(m.matched_index),
                dash(m.lag),
            ]);
        }
        out.push_str("\n\n");
        out.push_str(&table_string(t));
    }
    out
}

async fn status_frame(client: &mut Client, render: Render) -> Result<String, ClientError> {
    let mut status = client.cluster_status().await?;
    // Any replica answers with its own view; the leader's also has every member's replication
    // progress, so prefer it when the first answer names a reachable leader.
    if status.role != "leader" {
        if let Ok(addr) = normalize_addr(&status.leader_address) {
            let mut leader = Client::new(vec![addr], std::time::Duration::from_secs(2));
            if let Ok(s) = leader.cluster_status().await {
                if s.role == "leader" {
                    status = s;
                }
            }
        }
    }
    Ok(render.view(&ClusterView::from(&status), cluster_table))
}

pub async fn cluster(group: ClusterGroup) -> Result<(), ClientError> {
    let output = group.opts.output;
    let mut client = group.opts.client();
    match group.command {
        ClusterCommand::Status(args) => {
            let mut w = Watcher::new(&args.watch, output);
            loop {
                let render = w.render();
                let Some(frame) = w.during(status_frame(&mut client, render)).await else {
                    return Ok(());
                };
                w.show(frame)?;
                if !w.next().await {
                    return Ok(());
                }
            }
        }
        ClusterCommand::Limits(a) => {
            let ms = |d: Option<std::time::Duration>| {
                d.map_or(0, |d| {
                    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
                })
            };
            let zero = |n: Option<u64>, field: &str| -> Result<u64, ClientError> {
                match n {
                    Some(0) => Err(ClientError::Usage(format!("--{field}: expected 1 or more"))),
                    n => Ok(n.unwrap_or(0)),
                }
            };
            let limits = client
                .set_limits(pb::Limits {
                    finished_retention_ms: ms(a.finished_retention),
                    max_finished: zero(a.max_finished, "max-finished")?,
                    idempotency_window_ms: ms(a.idempotency_window),
                    max_pending_per_queue: zero(a.max_pending_per_queue, "max-pending-per-queue")?,
                    max_audit_entries: zero(a.max_audit_entries, "max-audit-entries")?,
                })
                .await?;
            let d = |ms: u64| humantime::format_duration(std::time::Duration::from_millis(ms));
            print_action(
                output,
                "limits",
                "cluster",
                &format!(
                    "finished jobs kept {} (at most {}), idempotency keys {}, at most {} pending jobs per queue, {} audit entries",
                    d(limits.finished_retention_ms),
                    limits.max_finished,
                    d(limits.idempotency_window_ms),
                    limits.max_pending_per_queue,
                    limits.max_audit_entries
                ),
            );
        }
        ClusterCommand::TransferLeader(a) => {
            client.transfer_leader(a.to).await?;
            print_action(
                output,
                "transfer-leader",
                &a.to.to_string(),
                &format!("leadership handed to replica {}", a.to),
            );
        }
        ClusterCommand::AddMember(a) => {
            client.add_member(a.id, &a.address, !a.learner).await?;
            print_action(
                output,
                "add-member",
                &a.id.to_string(),
                &format!(
                    "replica {} ({}) added as a {}",
                    a.id,
                    a.address,
                    if a.learner { "learner" } else { "voter" }
                ),
            );
        }
        ClusterCommand::RemoveMember(a) => {
            client.remove_member(a.id).await?;
            print_action(
                output,
                "remove-member",
                &a.id.to_string(),
                &format!("replica {} removed", a.id),
            );
        }
        ClusterCommand::Snapshot(SnapshotCommand::Save(a)) => {
            let bytes = save_snapshot(&mut client, &a.file).await?;
            let view = SnapshotView {
                path: a.file.display().to_string(),
                bytes,
            };
            match output {
                Output::Table => println!(
                    "wrote {} bytes ({}) to {}",
                    bytes,
                    format_bytes(bytes),
                    view.path
                ),
                Output::Json => println!("{}", to_json(&view, false)),
            }
        }
        ClusterCommand::Snapshot(SnapshotCommand::Restore(a)) => {
            let backup = std::fs::read(&a.file).map_err(|source| ClientError::Io {
                context: format!("read {}", a.file.display()),
                source,
            })?;
            let r = client.restore_snapshot(&backup).await?;
            let view = RestoreView {
                path: a.file.display().to_string(),
                nodes: r.nodes,
                jobs: r.jobs,
                requeued: r.requeued,
                backup_revision: r.backup_revision,
            };
            match output {
                Output::Table => println!(
                    "restored {}: {} nodes, {} jobs ({} re-queued from their last checkpoint), taken at revision {}",
                    view.path, view.nodes, view.jobs, view.requeued, view.backup_revision
                ),
                Output::Json => println!("{}", to_json(&view, false)),
            }
        }
    }
    Ok(())
}

/// `FILE` + `.tmp`, next to it (so the rename stays on one file system).
fn tmp_path(file: &Path) -> PathBuf {
    let mut s = file.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Streams a snapshot into `file` via `file.tmp`; returns the bytes written. On any failure the
/// temporary file is removed and `file` is left as it was.
pub async fn save_snapshot(client: &mut Client, file: &Path) -> Result<u64, ClientError> {
    let tmp = tmp_path(file);
    let io = |what: &str, path: &Path| {
        let context = format!("{what} {}", path.display());
        move |source| ClientError::Io { context, source }
    };
    let mut stream = client.save_snapshot().await?;
    let mut out = std::fs::File::create(&tmp).map_err(io("cannot create", &tmp))?;
    let result = async {
        let mut bytes = 0u64;
        loop {
            match stream.message().await {
                Ok(Some(chunk)) => {
                    out.write_all(&chunk.data)
                        .map_err(io("cannot write", &tmp))?;
                    bytes += chunk.data.len() as u64;
                }
                Ok(None) => break,
                Err(status) => {
                    return Err(ClientError::Other(format!(
                        "snapshot stream broke after {bytes} bytes: {}",
                        status.message()
                    )))
                }
            }
        }
        out.sync_all().map_err(io("cannot sync", &tmp))?;
        std::fs::rename(&tmp, file).map_err(io("cannot rename to", file))?;
        Ok(bytes)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(role: &str, replica_id: u64) -> pb::ClusterStatusReply {
        pb::ClusterStatusReply {
            replica_id,
            leader_id: 1,
            leader_address: "10.0.0.1:7101".into(),
            term: 4,
            commit_index: 100,
            applied_index: 99,
            role: role.into(),
            insecure: false,
            members: vec![
                pb::MemberInfo {
                    id: 1,
                    address: "10.0.0.1:7101".into(),
                    voter: true,
                    matched_index: 100,
                },
                pb::MemberInfo {
                    id: 3,
                    address: "10.0.0.3:7101".into(),
                    voter: false,
                    matched_index: 58,
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn lag_is_known_only_on_the_leader() {
        let on_leader = ClusterView::from(&reply("leader", 1));
        assert_eq!(on_leader.members[1].lag, Some(42));
        assert!(on_leader.members[0].leader);
        let on_follower = ClusterView::from(&reply("follower", 2));
        assert_eq!(on_follower.members[1].lag, None);
        assert_eq!(on_follower.members[1].matched_index, None);

        let text = cluster_table(&on_leader);
        assert!(text.contains("Leader:   1 (10.0.0.1:7101)"), "{text}");
        assert!(
            text.contains("3   10.0.0.3:7101  learner  58       42"),
            "{text}"
        );
        let text = cluster_table(&on_follower);
        assert!(
            text.contains("3   10.0.0.3:7101  learner  -        -"),
            "{text}"
        );
    }

    #[test]
    fn member_addresses_drop_the_scheme() {
        assert_eq!(parse_member_addr("http://h:1").unwrap(), "h:1");
        assert_eq!(parse_member_addr("h:1").unwrap(), "h:1");
        assert!(parse_member_addr("h").is_err());
    }

    #[test]
    fn snapshot_temp_file_sits_beside_the_target() {
        assert_eq!(
            tmp_path(Path::new("/backups/snap.json")),
            Path::new("/backups/snap.json.tmp")
        );
    }
}
