//! Who is calling, and may they: the one gate every RPC on a replica's port passes.
//!
//! [`AuthLayer`] wraps the whole gRPC router. For each call it names the caller from its TLS client
//! certificate ([`gangway_tls::Peer`]) or its bearer token, looks up the caller's grant in the
//! access rules of the replicated state, checks the method's row of [`super::policy::POLICY`], and
//! hands the handler a [`Caller`] (request extension) for the checks that depend on the request's
//! content: whose job, which queue, which node. A refusal never reaches a handler or decodes a body.
//!
//! A replica started insecure (plain TCP, for local experiments only) treats every caller as an
//! admin, every host as itself and every replica as who it claims; it says so at start and in
//! `cluster status`.

use super::error::ApiError;
use super::policy::{self, Need};
use crate::state::access::{AccessRules, Grant, Permission, Role};
use gangway_consensus::AuthenticatedReplica;
use gangway_proto::ids::HostName;
use gangway_tls::{Identity, Kind, Peer};
use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Request metadata carrying a bearer token: `authorization: Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";

/// The longest bearer token accepted.
pub const MAX_TOKEN_BYTES: usize = 512;

/// What kind of party a caller is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallerKind {
    /// A person or service: a `client/` certificate or a bearer token.
    Person,
    /// The agent of this host.
    Worker(HostName),
    /// Scheduler replica with this id.
    Replica(u64),
    /// Anyone, on a replica started insecure.
    Insecure,
}

/// The authenticated caller of one request, with its grant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// `client/alice`, `token/ci`, `worker/h1`, `server/2`, or `insecure`.
    pub name: String,
    pub kind: CallerKind,
    pub grant: Grant,
}

impl Caller {
    /// The caller of a request that went through [`AuthLayer`]; a request that did not (a handler
    /// called directly in a unit test) is treated as insecure.
    pub fn of<T>(req: &tonic::Request<T>) -> Caller {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or_else(Caller::insecure)
    }

    pub fn insecure() -> Caller {
        Caller {
            name: "insecure".into(),
            kind: CallerKind::Insecure,
            grant: Grant::of([Role::Admin]),
        }
    }

    fn denied(&self, permission: impl ToString) -> ApiError {
        ApiError::PermissionDenied {
            caller: self.name.clone(),
            permission: permission.to_string(),
            has: self.grant.describe(),
        }
    }

    pub fn require(&self, p: Permission) -> Result<(), ApiError> {
        if self.grant.has(p) {
            Ok(())
        } else {
            Err(self.denied(p))
        }
    }

    /// Submitting into `queue`.
    pub fn require_submit(&self, queue: &str) -> Result<(), ApiError> {
        if self.grant.may_submit_to(queue) {
            Ok(())
        } else {
            Err(self.denied(format!("{} in queue {queue:?}", Permission::Submit)))
        }
    }

    /// Changing a job whose owner is `owner`: its submitter, or anyone who manages any job.
    pub fn require_job(&self, owner: &str) -> Result<(), ApiError> {
        if self.grant.has(Permission::ManageAnyJob)
            || (self.grant.has(Permission::ManageOwnJobs)
                && !owner.is_empty()
                && owner == self.name)
        {
            Ok(())
        } else {
            Err(self.denied(format!(
                "{} (the job belongs to {owner:?})",
                Permission::ManageAnyJob
            )))
        }
    }

    /// A host speaking for `node`: only its own agent (or anyone on an insecure replica).
    pub fn require_node(&self, node: &HostName) -> Result<(), ApiError> {
        match &self.kind {
            CallerKind::Worker(own) if own == node => Ok(()),
            CallerKind::Insecure => Ok(()),
            _ => Err(self.denied(format!("speaking for node {node}"))),
        }
    }

    /// The owner recorded for jobs this caller submits.
    pub fn owner(&self) -> String {
        match self.kind {
            CallerKind::Insecure => String::new(),
            _ => self.name.clone(),
        }
    }
}

/// How a replica admits callers.
#[derive(Clone, Debug)]
pub enum Mode {
    /// Plain TCP: everyone is admin. Local experiments only.
    Insecure,
    /// Mutual TLS: callers are who their certificates or tokens say; `admins` (certificate names
    /// from the server configuration) are admins whatever the rules say, so a cluster cannot lock
    /// its operators out.
    Secure { admins: BTreeSet<String> },
}

/// Where the rules are read: runs a look-up on the replica's own applied rules.
pub type Rules = Arc<dyn Fn(&mut dyn FnMut(&AccessRules)) + Send + Sync>;

/// The hex SHA-256 of a bearer token, as rules store it.
pub fn token_digest(token: &str) -> String {
    gangway_proto::sha256::hex_digest(token.as_bytes())
}

fn bearer(headers: &http::HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(AUTHORIZATION) else {
        return Ok(None);
    };
    let text = v
        .to_str()
        .ok()
        .and_then(|t| t.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN_BYTES)
        .ok_or_else(|| {
            ApiError::Unauthenticated(format!(
                "authorization: expected \"Bearer <token>\" with a token of at most {MAX_TOKEN_BYTES} bytes"
            ))
        })?;
    Ok(Some(text.to_owned()))
}

/// Names the caller of a request (not yet checked against a method).
pub fn authenticate(
    mode: &Mode,
    rules: &Rules,
    peer: &Peer,
    headers: &http::HeaderMap,
) -> Result<Caller, ApiError> {
    let Mode::Secure { admins } = mode else {
        return Ok(Caller::insecure());
    };
    if let Some(token) = bearer(headers)? {
        let digest = token_digest(&token);
        let mut caller = None;
        rules(&mut |r| {
            caller = r.token_by_digest(&digest).map(|(name, grant)| Caller {
                name: format!("token/{name}"),
                kind: CallerKind::Person,
                grant: grant.clone(),
            })
        });
        return caller.ok_or_else(|| ApiError::Unauthenticated("unknown bearer token".into()));
    }
    let id = match peer {
        Peer::Certified(id) => id,
        Peer::Plain => {
            return Err(ApiError::Unauthenticated(
                "plain-text connection to a TLS replica".into(),
            ))
        }
        Peer::Anonymous => {
            return Err(ApiError::Unauthenticated(
                "no client certificate and no bearer token".into(),
            ))
        }
        Peer::Unnamed(e) => return Err(ApiError::Unauthenticated(e.to_string())),
    };
    Ok(caller_for(id, admins, rules))
}

fn caller_for(id: &Identity, admins: &BTreeSet<String>, rules: &Rules) -> Caller {
    let name = id.to_string();
    let mut grant = Grant::default();
    rules(&mut |r| grant = r.grant_of(&name));
    if admins.contains(&name) {
        grant.roles.insert(Role::Admin);
    }
    let kind = match id.kind() {
        Kind::Client => CallerKind::Person,
        Kind::Worker => CallerKind::Worker(HostName::new(id.name())),
        Kind::Server => CallerKind::Replica(id.server_id().unwrap_or(0)),
    };
    Caller { name, kind, grant }
}

/// Checks a named caller against a method's need.
pub fn authorize(caller: &Caller, need: Option<Need>) -> Result<(), ApiError> {
    let Some(need) = need else {
        return Err(caller.denied("a method the policy table does not list"));
    };
    if caller.kind == CallerKind::Insecure {
        return Ok(());
    }
    match need {
        Need::Authenticated => Ok(()),
        Need::Permission(p) => caller.require(p),
        Need::Worker => match caller.kind {
            CallerKind::Worker(_) => Ok(()),
            _ => Err(caller.denied("a worker certificate")),
        },
        Need::Replica => match caller.kind {
            CallerKind::Replica(_) => Ok(()),
            _ => Err(caller.denied("a replica certificate")),
        },
    }
}

/// The tower layer around a replica's gRPC router (see the module documentation).
#[derive(Clone)]
pub struct AuthLayer {
    mode: Arc<Mode>,
    rules: Rules,
}

impl AuthLayer {
    pub fn new(mode: Mode, rules: Rules) -> Self {
        AuthLayer {
            mode: Arc::new(mode),
            rules,
        }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    layer: AuthLayer,
}

impl<S, B, R> tower_service::Service<http::Request<B>> for AuthService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>> + Send + 'static,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<R>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let peer = gangway_tls::peer_of(req.extensions());
        let need = policy::need(req.uri().path());
        let decided = authenticate(&self.layer.mode, &self.layer.rules, &peer, req.headers())
            .and_then(|caller| authorize(&caller, need).map(|()| caller));
        match decided {
            Ok(caller) => {
                if let CallerKind::Replica(id) = caller.kind {
                    req.extensions_mut().insert(AuthenticatedReplica(id));
                }
                req.extensions_mut().insert(caller);
                Box::pin(self.inner.call(req))
            }
            Err(e) => {
                tracing::info!(path = req.uri().path(), peer = ?peer, error = %e, "call refused");
                let status = tonic::Status::from(e);
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}
