//! Who may do what: roles, the permissions each carries, and the rules (kept in the replicated
//! state) that bind a certificate name or a bearer token to roles.
//!
//! The policy is pure: [`Grant::allows`] answers for one permission and queue. Which permission each
//! RPC needs is the scheduler's table (`scheduler/src/server/policy.rs`); what a role allows is here.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

/// A role, from least to most trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Reads jobs, nodes, leases, queues and cluster status.
    Viewer,
    /// A viewer that submits jobs in its queues and manages the jobs it submitted.
    Submitter,
    /// A viewer that manages nodes, queues, drains, defragmentation, limits, drills and any job.
    Operator,
    /// Everything: members, snapshots, restore, and the access rules themselves.
    Admin,
}

pub const ROLES: [Role; 4] = [Role::Viewer, Role::Submitter, Role::Operator, Role::Admin];

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Submitter => "submitter",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// What this role allows.
    pub fn permissions(self) -> &'static [Permission] {
        use Permission::*;
        match self {
            Role::Viewer => &[Read],
            Role::Submitter => &[Read, Submit, ManageOwnJobs],
            Role::Operator => &[
                Read,
                ManageOwnJobs,
                ManageAnyJob,
                ManageNodes,
                ManageQueues,
                Migrate,
                Drill,
                ReadAudit,
            ],
            Role::Admin => &PERMISSIONS,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ROLES.into_iter().find(|r| r.as_str() == s).ok_or_else(|| {
            format!("unknown role {s:?}: expected viewer, submitter, operator or admin")
        })
    }
}

/// One thing an RPC may need. Stable names: they appear in `permission_denied` errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Permission {
    /// Read jobs, nodes, leases, queues, limits, cluster status, defragmentation plans.
    Read,
    /// Submit a job (in a queue the grant allows).
    Submit,
    /// Cancel or checkpoint a job this identity submitted.
    ManageOwnJobs,
    /// Cancel or checkpoint anyone's job.
    ManageAnyJob,
    /// Cordon, drain, readmit, remove nodes; fence and unfence devices.
    ManageNodes,
    /// Create and change queues, set limits.
    ManageQueues,
    /// Move running jobs (migrations, the defragmenter's tools).
    Migrate,
    /// Failover drills (the replica must also allow them).
    Drill,
    /// List the audit trail.
    ReadAudit,
    /// Add and remove replicas, move leadership.
    ManageMembers,
    /// Save a snapshot of the state (secrets removed).
    SaveSnapshot,
    /// Restore a snapshot into an empty cluster.
    Restore,
    /// Read and change the access rules.
    ManageAccess,
}

pub const PERMISSIONS: [Permission; 13] = [
    Permission::Read,
    Permission::Submit,
    Permission::ManageOwnJobs,
    Permission::ManageAnyJob,
    Permission::ManageNodes,
    Permission::ManageQueues,
    Permission::Migrate,
    Permission::Drill,
    Permission::ReadAudit,
    Permission::ManageMembers,
    Permission::SaveSnapshot,
    Permission::Restore,
    Permission::ManageAccess,
];

impl Permission {
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Submit => "job.submit",
            Permission::ManageOwnJobs => "job.manage_own",
            Permission::ManageAnyJob => "job.manage_any",
            Permission::ManageNodes => "node.manage",
            Permission::ManageQueues => "queue.manage",
            Permission::Migrate => "job.migrate",
            Permission::Drill => "drill.run",
            Permission::ReadAudit => "audit.read",
            Permission::ManageMembers => "member.manage",
            Permission::SaveSnapshot => "snapshot.save",
            Permission::Restore => "snapshot.restore",
            Permission::ManageAccess => "access.manage",
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Roles given to one principal; `queues` limits where a submitter may submit (empty: all).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub roles: BTreeSet<Role>,
    pub queues: BTreeSet<String>,
}

impl Grant {
    pub fn of(roles: impl IntoIterator<Item = Role>) -> Self {
        Grant {
            roles: roles.into_iter().collect(),
            queues: BTreeSet::new(),
        }
    }

    /// Whether some role of the grant carries `permission`.
    pub fn has(&self, permission: Permission) -> bool {
        self.roles
            .iter()
            .any(|r| r.permissions().contains(&permission))
    }

    /// Whether the grant lets its holder submit into `queue`: admins anywhere, submitters in
    /// their queues (all when none are listed).
    pub fn may_submit_to(&self, queue: &str) -> bool {
        self.roles.contains(&Role::Admin)
            || (self.has(Permission::Submit)
                && (self.queues.is_empty() || self.queues.contains(queue)))
    }

    /// `viewer,submitter[queues=a,b]`.
    pub fn describe(&self) -> String {
        let roles: Vec<&str> = self.roles.iter().map(|r| r.as_str()).collect();
        let mut s = if roles.is_empty() {
            "no roles".to_owned()
        } else {
            roles.join(",")
        };
        if !self.queues.is_empty() {
            let q: Vec<&str> = self.queues.iter().map(String::as_str).collect();
            s.push_str(&format!(" (queues {})", q.join(",")));
        }
        s
    }
}

/// A bearer token's rule: the SHA-256 of the token (the token itself is never stored) and its
/// grant. Its principal name is `token/<name>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRule {
    pub sha256_hex: String,
    pub grant: Grant,
}

/// The rules, in the replicated state. Principals are certificate identities
/// (`client/alice`); tokens are named.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRules {
    pub principals: BTreeMap<String, Grant>,
    pub tokens: BTreeMap<String, TokenRule>,
}

/// Most rules of each kind kept (a bound on the state like every other).
pub const MAX_RULES: usize = 10_000;

/// A change to the rules (admin only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccessChange {
    /// Bind a certificate identity to a grant; an empty grant removes the rule.
    Principal { principal: String, grant: Grant },
    /// Create or replace a named token; `None` revokes it.
    Token {
        name: String,
        rule: Option<TokenRule>,
    },
}

impl AccessRules {
    /// The grant of a certificate identity (empty when it has no rule).
    pub fn grant_of(&self, principal: &str) -> Grant {
        self.principals.get(principal).cloned().unwrap_or_default()
    }

    /// The token whose digest is `sha256_hex`: its name and grant.
    pub fn token_by_digest(&self, sha256_hex: &str) -> Option<(&str, &Grant)> {
        self.tokens
            .iter()
            .find(|(_, t)| t.sha256_hex == sha256_hex)
            .map(|(n, t)| (n.as_str(), &t.grant))
    }

    /// Applies a change; refuses one that would grow past [`MAX_RULES`] or is malformed.
    pub fn change(&mut self, change: AccessChange) -> Result<(), String> {
        match change {
            AccessChange::Principal { principal, grant } => {
                if principal.is_empty() || principal.len() > 200 {
                    return Err("principal: expected kind/name of at most 200 bytes".into());
                }
                if grant.roles.is_empty() {
                    self.principals.remove(&principal);
                } else {
                    if !self.principals.contains_key(&principal)
                        && self.principals.len() >= MAX_RULES
                    {
                        return Err(format!("at most {MAX_RULES} principal rules"));
                    }
                    self.principals.insert(principal, grant);
                }
            }
            AccessChange::Token { name, rule } => match rule {
                None => {
                    self.tokens.remove(&name);
                }
                Some(rule) => {
                    if rule.sha256_hex.len() != 64
                        || !rule.sha256_hex.bytes().all(|b| b.is_ascii_hexdigit())
                    {
                        return Err("token digest: expected 64 hex digits (SHA-256)".into());
                    }
                    if self
                        .tokens
                        .iter()
                        .any(|(n, t)| *n != name && t.sha256_hex == rule.sha256_hex)
                    {
                        return Err("a token with this digest already exists".into());
                    }
                    if !self.tokens.contains_key(&name) && self.tokens.len() >= MAX_RULES {
                        return Err(format!("at most {MAX_RULES} tokens"));
                    }
                    self.tokens.insert(name, rule);
                }
            },
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_carry_what_the_table_says_and_admin_carries_everything() {
        use Permission::*;
        let table: [(Role, &[Permission]); 4] = [
            (Role::Viewer, &[Read]),
            (Role::Submitter, &[Read, Submit, ManageOwnJobs]),
            (
                Role::Operator,
                &[
                    Read,
                    ManageOwnJobs,
                    ManageAnyJob,
                    ManageNodes,
                    ManageQueues,
                    Migrate,
                    Drill,
                    ReadAudit,
                ],
            ),
            (Role::Admin, &PERMISSIONS),
        ];
        for (role, allowed) in table {
            for p in PERMISSIONS {
                assert_eq!(Grant::of([role]).has(p), allowed.contains(&p), "{role} {p}");
            }
        }
    }

    #[test]
    fn submitters_submit_only_into_their_queues() {
        let mut g = Grant::of([Role::Submitter]);
        assert!(g.may_submit_to("any"));
        g.queues.insert("team-a".into());
        assert!(g.may_submit_to("team-a"));
        assert!(!g.may_submit_to("team-b"));
        assert!(!Grant::of([Role::Viewer, Role::Operator]).may_submit_to("team-a"));
        assert!(Grant::of([Role::Admin]).may_submit_to("team-b"));
    }

    #[test]
    fn rules_are_bounded_and_empty_grants_remove() {
        let mut r = AccessRules::default();
        let p = |name: &str, roles: &[Role]| AccessChange::Principal {
            principal: name.into(),
            grant: Grant::of(roles.iter().copied()),
        };
        r.change(p("client/a", &[Role::Viewer])).unwrap();
        assert!(r.grant_of("client/a").has(Permission::Read));
        r.change(p("client/a", &[])).unwrap();
        assert!(r.principals.is_empty());
        let token = |d: &str| AccessChange::Token {
            name: "ci".into(),
            rule: Some(TokenRule {
                sha256_hex: d.into(),
                grant: Grant::of([Role::Viewer]),
            }),
        };
        assert!(r.change(token("abc")).is_err());
        r.change(token(&"a".repeat(64))).unwrap();
        assert_eq!(r.token_by_digest(&"a".repeat(64)).unwrap().0, "ci");
    }
}
