//! The agent's TLS: it dials replicas with its host's certificate (`worker/<node>`, expecting a
//! replica's), and serves its log API with the same certificate to people and replicas only.

use super::config::AgentConfig;
use super::AgentError;
use gangway_tls::{ClientTls, Dialer, Expect, Identity, Kind, Peer, ServerTls};

/// How the agent dials and serves.
pub struct AgentTls {
    pub dialer: Dialer,
    /// `None` toward an insecure cluster.
    pub server: Option<ServerTls>,
}

pub fn agent_tls(cfg: &AgentConfig) -> Result<AgentTls, AgentError> {
    let Some(files) = cfg.tls.clone() else {
        tracing::warn!(
            "INSECURE: plain TCP to the scheduler and on the log API; anyone can read task logs \
             (local experiments only)"
        );
        return Ok(AgentTls {
            dialer: Dialer::Plain,
            server: None,
        });
    };
    let bad = |e: gangway_tls::TlsError| AgentError::Config(format!("tls: {e}"));
    let own = gangway_tls::own_identity(&files).map_err(bad)?;
    let want = Identity::new(Kind::Worker, &cfg.node)
        .map_err(|e| AgentError::Config(format!("node name {:?}: {e}", cfg.node)))?;
    if own != want {
        return Err(AgentError::Config(format!(
            "--tls-cert names {own}, but this agent is {want}: issue it with `gangway tls issue worker {}`",
            cfg.node
        )));
    }
    Ok(AgentTls {
        dialer: Dialer::Tls(
            ClientTls::new(files.clone(), Expect::Kind(Kind::Server)).map_err(bad)?,
        ),
        server: Some(ServerTls::new(files).map_err(bad)?),
    })
}

/// Who may read task logs: people (`client/` certificates) and replicas; not other hosts and not
/// anonymous callers. On an insecure agent (plain TCP) everyone.
#[allow(clippy::result_large_err)]
pub fn log_reader(req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    match gangway_tls::peer_of(req.extensions()) {
        Peer::Plain => Ok(req),
        Peer::Certified(id) if matches!(id.kind(), Kind::Client | Kind::Server) => Ok(req),
        Peer::Certified(id) => Err(tonic::Status::permission_denied(format!(
            "permission_denied: {id} may not read task logs (client or replica certificates only)"
        ))),
        _ => Err(tonic::Status::unauthenticated(
            "unauthenticated: reading task logs needs a client certificate",
        )),
    }
}
