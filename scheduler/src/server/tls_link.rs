//! The replica's TLS: its server setup for the gRPC port, the connector its Raft transport dials
//! peers with (each must prove to be a replica), and the access mode the auth layer applies.

use super::auth::Mode;
use super::config::ServerConfig;
use gangway_consensus::Connector;
use gangway_tls::{ClientTls, Expect, Identity, Kind, ServerTls, TlsError};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// How this replica serves and dials, decided once at start.
pub struct ReplicaTls {
    /// `None` when the replica runs insecure.
    pub server: Option<ServerTls>,
    pub peers: std::sync::Arc<dyn Connector>,
    pub mode: Mode,
}

/// Dials peers over mutual TLS, expecting a replica's certificate.
struct TlsPeers {
    tls: ClientTls,
}

impl Connector for TlsPeers {
    fn channel(&self, addr: &str) -> Result<Channel, String> {
        let ep = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("bad peer address {addr:?}: {e}"))?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        Ok(self.tls.channel(&ep))
    }
}

impl ReplicaTls {
    pub fn new(config: &ServerConfig) -> Result<Self, TlsError> {
        let Some(files) = config.tls.files() else {
            tracing::warn!(
                "INSECURE: this replica serves plain TCP with no authentication; anyone who reaches \
                 its port can do anything. Use it for local experiments only (tls.insecure = true)"
            );
            return Ok(ReplicaTls {
                server: None,
                peers: std::sync::Arc::new(gangway_consensus::TcpConnector::default()),
                mode: Mode::Insecure,
            });
        };
        let own = gangway_tls::own_identity(&files)?;
        if own != Identity::server(config.id) {
            return Err(TlsError::Config(format!(
                "tls.cert names {own}, but this is replica {}: issue it with `gangway tls issue server {}`",
                config.id, config.id
            )));
        }
        let server = ServerTls::new(files.clone())?;
        let tls = ClientTls::new(files, Expect::Kind(Kind::Server))?;
        Ok(ReplicaTls {
            server: Some(server),
            peers: std::sync::Arc::new(TlsPeers { tls }),
            mode: Mode::Secure {
                admins: config.access.admins.iter().cloned().collect(),
            },
        })
    }
}
