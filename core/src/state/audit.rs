//! The audit trail: who did what, kept in the replicated state, newest last and bounded.
//!
//! Two commands write it. [`Command::Audited`] wraps a state change made on behalf of a person
//! (submit, cancel, drain, fence, queue, limits, restore, access rules): applying it applies the
//! inner command and records one entry with the caller, what the command did, what it was about
//! and its outcome (`ok` or the refusal's code). [`Command::AuditNote`] records an action that is
//! not a state change (membership changes, leader transfers, drills), written by the replica that
//! acted. Worker reports and the leader's own commands are not audited: they would flood it.
//!
//! Every entry's time is its log entry's; at most `Limits::max_audit_entries` stay (the oldest
//! leave first), so every replica keeps the same entries.

use super::command::{Command, Response};
use super::store::ClusterStore;
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::VecDeque;

/// How many entries the state keeps unless the limits say otherwise.
pub const DEFAULT_MAX_AUDIT_ENTRIES: usize = 10_000;
/// The most entries the limits may ask to keep.
pub const MAX_AUDIT_ENTRIES_LIMIT: usize = 1_000_000;
/// Longest actor, action, target or outcome kept (longer ones are cut at a character boundary).
pub const MAX_AUDIT_FIELD: usize = 512;

/// One thing someone did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// The log entry's time (Unix ms, leader-stamped).
    pub at_ms: u64,
    /// `client/alice`, `token/ci`, `insecure` (a replica started without TLS).
    pub actor: String,
    /// `submit_job`, `cancel_job`, `drain_node`, `add_member`, `set_access`, `restore`, `drill`...
    pub action: String,
    /// The job, node, queue, member or principal it was about.
    pub target: String,
    /// `ok`, or the refusal's code.
    pub outcome: String,
}

/// An action that is not a state change, as the replica that acted saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditNote {
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
}

/// The entries, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditLog {
    entries: VecDeque<AuditEntry>,
}

impl AuditLog {
    /// Appends `entry` (its fields cut to [`MAX_AUDIT_FIELD`]) and drops the oldest beyond `max`.
    pub fn record(&mut self, mut entry: AuditEntry, max: usize) {
        for field in [
            &mut entry.actor,
            &mut entry.action,
            &mut entry.target,
            &mut entry.outcome,
        ] {
            cut(field);
        }
        self.entries.push_back(entry);
        self.trim(max);
    }

    /// Drops the oldest entries beyond `max`.
    pub fn trim(&mut self, max: usize) {
        while self.entries.len() > max {
            self.entries.pop_front();
        }
    }

    /// `older` followed by these entries, at most `max` (a restore keeps the backup's trail and
    /// the restored cluster's own).
    pub fn after(mut self, older: AuditLog, max: usize) -> AuditLog {
        let mut all = older.entries;
        all.append(&mut self.entries);
        self.entries = all;
        self.trim(max);
        self
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The newest first.
    pub fn newest_first(&self) -> impl Iterator<Item = &AuditEntry> {
        self.entries.iter().rev()
    }
}

fn cut(s: &mut String) {
    if s.len() > MAX_AUDIT_FIELD {
        let mut at = MAX_AUDIT_FIELD;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
    }
}

/// What the entry of `command` calls its action: the command's kind, or a sharper word where the
/// command does several things (a node state change is a drain, a cordon or an uncordon).
pub fn action_of(command: &Command) -> String {
    match command {
        Command::SetNodeState(c) => match c.state {
            crate::engine::NodeState::Draining => "drain_node",
            crate::engine::NodeState::Cordoned => "cordon_node",
            crate::engine::NodeState::Ready => "uncordon_node",
            crate::engine::NodeState::Down => "set_node_down",
        }
        .to_owned(),
        Command::FenceDevice(c) if !c.fenced => "unfence_device".to_owned(),
        other => other.kind().to_owned(),
    }
}

/// What `command` is about, in the words of its entry.
pub fn target_of(command: &Command) -> String {
    use super::access::AccessChange;
    match command {
        Command::SubmitJob(s) => format!("{} in queue {}", s.spec.name, s.spec.queue),
        Command::SubmitJobs(batch) => {
            let queues: std::collections::BTreeSet<_> =
                batch.iter().map(|s| s.spec.queue.as_str()).collect();
            let queues: Vec<_> = queues.into_iter().collect();
            format!("{} jobs in queue {}", batch.len(), queues.join(", "))
        }
        Command::CancelJob { job, .. }
        | Command::RequestCheckpoint { job, .. }
        | Command::MigrateJob { job, .. } => job.to_string(),
        Command::SetNodeState(c) => c.node.to_string(),
        Command::FenceDevice(c) => format!("{} device {}", c.node, c.device),
        Command::RemoveNode { node, .. } | Command::DrainDeadline { node } => node.to_string(),
        Command::SetQueue(q) => q.name.to_string(),
        Command::SetLimits(_) => "limits".to_owned(),
        Command::Restore {
            backup_revision, ..
        } => format!("backup of revision {backup_revision}"),
        Command::SetAccess(AccessChange::Principal { principal, .. }) => principal.clone(),
        Command::SetAccess(AccessChange::Token { name, .. }) => format!("token/{name}"),
        Command::AuditNote(n) => n.target.clone(),
        Command::Audited { command, .. } => target_of(command),
        _ => String::new(),
    }
}

/// `ok`, or the code of the refusal.
pub fn outcome_of(response: &Response) -> String {
    match response {
        Response::Rejected(r) => r.code().to_owned(),
        _ => "ok".to_owned(),
    }
}

/// Reads the command an [`Command::Audited`] wraps, refusing one that wraps another: the wrapper
/// nests once, so no input can make the decoder recurse without bound.
pub(super) fn one_level<'de, D: Deserializer<'de>>(d: D) -> Result<Box<Command>, D::Error> {
    use std::cell::Cell;
    thread_local! {
        static INSIDE: Cell<bool> = const { Cell::new(false) };
    }
    struct Leave;
    impl Drop for Leave {
        fn drop(&mut self) {
            INSIDE.with(|i| i.set(false));
        }
    }
    if INSIDE.with(Cell::get) {
        return Err(serde::de::Error::custom(
            "an audited command cannot wrap another audited command",
        ));
    }
    INSIDE.with(|i| i.set(true));
    let _leave = Leave;
    Command::deserialize(d).map(Box::new)
}

impl ClusterStore {
    /// Who did what, oldest first (see the module documentation).
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// Applies `command` for `actor` and records what came of it.
    pub(super) fn apply_audited(
        &mut self,
        now: u64,
        actor: String,
        command: Command,
        events: &mut Vec<super::command::Event>,
    ) -> Response {
        let action = action_of(&command);
        let target = target_of(&command);
        let response = self.dispatch(now, command, events);
        let target = match &response {
            Response::Submitted { job, .. } => job.to_string(),
            Response::SubmittedJobs(jobs) => match (jobs.first(), jobs.last()) {
                (Some(first), Some(last)) if jobs.len() > 1 => {
                    format!("{} jobs: {} .. {}", jobs.len(), first.job, last.job)
                }
                _ => target,
            },
            _ => target,
        };
        let outcome = outcome_of(&response);
        self.note_audit(AuditEntry {
            at_ms: now,
            actor,
            action,
            target,
            outcome,
        });
        response
    }

    pub(super) fn note_audit(&mut self, entry: AuditEntry) {
        let max = self.limits.max_audit_entries;
        self.audit.record(entry, max);
    }
}
