//! THE policy table: what every RPC on a replica's port needs. One place; the auth layer
//! ([`super::auth`]) checks every call against it before the call's handler runs, and a call whose
//! method is not in the table is refused. Handlers check only what depends on the request's content
//! (whose job, which queue, which node), through [`super::auth::Caller`].

use crate::state::access::Permission;

/// What a caller must be or hold to call a method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Any authenticated caller (it asks who it is).
    Authenticated,
    /// A person or service whose grant carries the permission.
    Permission(Permission),
    /// A host agent (its certificate's node name is then checked against the request).
    Worker,
    /// A scheduler replica (its certificate's id is then checked against the Raft message).
    Replica,
}

use Need::*;
use Permission as P;

pub const CLIENT_API: &str = "gangway.v1.ClientApi";
pub const WORKER_API: &str = "gangway.v1.WorkerApi";
pub const RAFT: &str = "gangway.consensus.v1.RaftTransport";

/// (service, method, need), every method served on a replica's gRPC port.
pub const POLICY: &[(&str, &str, Need)] = &[
    (CLIENT_API, "SubmitJob", Permission(P::Submit)),
    (CLIENT_API, "SubmitJobs", Permission(P::Submit)),
    (CLIENT_API, "CancelJob", Permission(P::ManageOwnJobs)),
    (CLIENT_API, "CheckpointJob", Permission(P::ManageOwnJobs)),
    (CLIENT_API, "GetJob", Permission(P::Read)),
    (CLIENT_API, "ListJobs", Permission(P::Read)),
    (CLIENT_API, "ListNodes", Permission(P::Read)),
    (CLIENT_API, "ListLeases", Permission(P::Read)),
    (CLIENT_API, "ListQueues", Permission(P::Read)),
    (CLIENT_API, "ClusterStatus", Permission(P::Read)),
    (CLIENT_API, "DefragPlan", Permission(P::Read)),
    (CLIENT_API, "DefragStatus", Permission(P::Read)),
    (CLIENT_API, "WhoAmI", Authenticated),
    (CLIENT_API, "SetNodeState", Permission(P::ManageNodes)),
    (CLIENT_API, "SetDeviceFence", Permission(P::ManageNodes)),
    (CLIENT_API, "RemoveNode", Permission(P::ManageNodes)),
    (CLIENT_API, "SetQueue", Permission(P::ManageQueues)),
    (CLIENT_API, "SetLimits", Permission(P::ManageQueues)),
    (CLIENT_API, "MigrateJob", Permission(P::Migrate)),
    (CLIENT_API, "Drill", Permission(P::Drill)),
    (CLIENT_API, "ListAudit", Permission(P::ReadAudit)),
    (CLIENT_API, "TransferLeader", Permission(P::ManageMembers)),
    (CLIENT_API, "AddMember", Permission(P::ManageMembers)),
    (CLIENT_API, "RemoveMember", Permission(P::ManageMembers)),
    (CLIENT_API, "SaveSnapshot", Permission(P::SaveSnapshot)),
    (CLIENT_API, "RestoreSnapshot", Permission(P::Restore)),
    (CLIENT_API, "ListAccess", Permission(P::ManageAccess)),
    (CLIENT_API, "SetAccess", Permission(P::ManageAccess)),
    (WORKER_API, "Register", Worker),
    (WORKER_API, "Heartbeat", Worker),
    (WORKER_API, "WatchAllocations", Worker),
    (WORKER_API, "ReportTaskStatus", Worker),
    (WORKER_API, "ReportTaskStatuses", Worker),
    (WORKER_API, "ReportCheckpoint", Worker),
    (WORKER_API, "ReportDeviceHealth", Worker),
    (WORKER_API, "ReportHealthCheck", Worker),
    (RAFT, "AppendEntries", Replica),
    (RAFT, "StreamAppend", Replica),
    (RAFT, "Vote", Replica),
    (RAFT, "PreVote", Replica),
    (RAFT, "TransferLeader", Replica),
    (RAFT, "InstallSnapshot", Replica),
    (RAFT, "ForwardWrite", Replica),
    (RAFT, "Presence", Replica),
];

/// The need of a gRPC path (`/package.Service/Method`); `None` for a method not in the table.
pub fn need(path: &str) -> Option<Need> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    POLICY
        .iter()
        .find(|(s, m, _)| *s == service && *m == method)
        .map(|(_, _, n)| *n)
}

/// The table as text, for people and for the authorization matrix test.
pub fn describe(n: Need) -> String {
    match n {
        Authenticated => "any authenticated caller".into(),
        Permission(p) => {
            let roles: Vec<&str> = crate::state::access::ROLES
                .iter()
                .filter(|r| r.permissions().contains(&p))
                .map(|r| r.as_str())
                .collect();
            format!("{p} ({})", roles.join(", "))
        }
        Worker => "a worker, for its own node".into(),
        Replica => "a replica, as itself".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every rpc of every service served on the port has exactly one row.
    #[test]
    fn every_rpc_in_the_protos_has_one_policy_row() {
        let protos = [
            (
                CLIENT_API,
                "ClientApi",
                include_str!("../../../proto/proto/gangway.proto"),
            ),
            (
                WORKER_API,
                "WorkerApi",
                include_str!("../../../proto/proto/gangway.proto"),
            ),
            (
                RAFT,
                "RaftTransport",
                include_str!("../../../consensus/proto/raft.proto"),
            ),
        ];
        let mut seen = 0;
        for (full, short, text) in protos {
            let body = text
                .split(&format!("service {short} {{"))
                .nth(1)
                .expect("service block")
                .split("\n}")
                .next()
                .unwrap();
            for line in body
                .lines()
                .map(str::trim)
                .filter(|l| l.starts_with("rpc "))
            {
                let method = line[4..].split('(').next().unwrap().trim();
                let rows = POLICY
                    .iter()
                    .filter(|(s, m, _)| *s == full && *m == method)
                    .count();
                assert_eq!(rows, 1, "{full}/{method} must have one policy row");
                seen += 1;
            }
        }
        assert_eq!(
            seen,
            POLICY.len(),
            "the table has rows for methods that do not exist"
        );
        assert_eq!(
            need("/gangway.v1.ClientApi/SubmitJob"),
            Some(Permission(P::Submit))
        );
        assert_eq!(need("/gangway.v1.ClientApi/Nope"), None);
        assert_eq!(need("garbage"), None);
    }
}
