//! The access-rule RPCs of the client API: `WhoAmI`, `ListAccess`, `SetAccess` (the policy table
//! decides who may call them; this validates and converts).

use super::auth::{Caller, CallerKind};
use super::context::ReplicaContext;
use super::error::{required, ApiError};
use crate::state::access::{AccessChange, Grant, Role, TokenRule};
use gangway_proto::pb;

pub fn who_am_i(caller: &Caller) -> pb::WhoAmIReply {
    pb::WhoAmIReply {
        name: caller.name.clone(),
        roles: caller.grant.roles.iter().map(|r| r.to_string()).collect(),
        queues: caller.grant.queues.iter().cloned().collect(),
        insecure: caller.kind == CallerKind::Insecure,
    }
}

fn grant_to_pb(g: &Grant) -> pb::AccessGrant {
    pb::AccessGrant {
        roles: g.roles.iter().map(|r| r.to_string()).collect(),
        queues: g.queues.iter().cloned().collect(),
    }
}

/// Most queues one grant may name.
const MAX_GRANT_QUEUES: usize = 256;

fn grant_from_pb(g: Option<pb::AccessGrant>) -> Result<Grant, ApiError> {
    let g = g.unwrap_or_default();
    let roles = g
        .roles
        .iter()
        .enumerate()
        .map(|(i, r)| {
            r.trim()
                .parse::<Role>()
                .map_err(|e| ApiError::invalid(&format!("grant.roles[{i}]"), e))
        })
        .collect::<Result<_, _>>()?;
    if g.queues.len() > MAX_GRANT_QUEUES {
        return Err(ApiError::invalid(
            "grant.queues",
            format!(
                "expected at most {MAX_GRANT_QUEUES} queues, got {}",
                g.queues.len()
            ),
        ));
    }
    let queues = g
        .queues
        .iter()
        .enumerate()
        .map(|(i, q)| Ok(required(&format!("grant.queues[{i}]"), q)?.to_owned()))
        .collect::<Result<_, ApiError>>()?;
    Ok(Grant { roles, queues })
}

pub async fn list(ctx: &ReplicaContext) -> Result<pb::AccessRules, ApiError> {
    ctx.read(|fsm| {
        let rules = fsm.store().access();
        let people = rules.principals.iter().map(|(p, g)| pb::AccessRule {
            principal: p.clone(),
            grant: Some(grant_to_pb(g)),
        });
        let tokens = rules.tokens.iter().map(|(n, t)| pb::AccessRule {
            principal: format!("token/{n}"),
            grant: Some(grant_to_pb(&t.grant)),
        });
        pb::AccessRules {
            rules: people.chain(tokens).collect(),
        }
    })
    .await
}

/// The change a `SetAccess` request asks for, validated.
pub fn change_from_pb(req: pb::SetAccessRequest) -> Result<AccessChange, ApiError> {
    let principal = required("principal", &req.principal)?.to_owned();
    let grant = grant_from_pb(req.grant)?;
    if let Some(name) = principal.strip_prefix("token/") {
        gangway_tls::Identity::new(gangway_tls::Kind::Client, name)
            .map_err(|e| ApiError::invalid("principal", e.to_string()))?;
        let digest = req.token_sha256.trim().to_ascii_lowercase();
        let rule =
            match (digest.is_empty(), grant.roles.is_empty()) {
                (true, true) => None,
                (false, false) => Some(TokenRule {
                    sha256_hex: digest,
                    grant,
                }),
                _ => return Err(ApiError::invalid(
                    "token_sha256",
                    "give the token's SHA-256 and roles to create a token, neither to revoke it",
                )),
            };
        return Ok(AccessChange::Token {
            name: name.to_owned(),
            rule,
        });
    }
    principal
        .parse::<gangway_tls::Identity>()
        .map_err(|e| ApiError::invalid("principal", e.to_string()))?;
    if !req.token_sha256.is_empty() {
        return Err(ApiError::invalid(
            "token_sha256",
            "only for token/NAME principals",
        ));
    }
    Ok(AccessChange::Principal { principal, grant })
}
