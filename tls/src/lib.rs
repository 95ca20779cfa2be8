//! Mutual TLS for every Gangway link (client API, worker API, the Raft transport between replicas,
//! the agent's log API): identities carried in certificates ([`Identity`]), rustls configurations
//! that reload rotated files ([`ServerTls`], [`ClientTls`]), and a cluster CA ([`ca`]).

pub mod ca;
mod client;
mod files;
pub mod identity;
mod reload;
mod server;
#[cfg(test)]
mod tests;

use std::sync::Arc;

pub use client::{ClientTls, Expect};
pub use files::{load_certs, load_key, load_roots, TlsError, TlsFiles};
pub use identity::{Identity, IdentityError, Kind};
pub use server::{plain_incoming, ServerTls};

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// The one crypto provider: ring. rustls 0.23.48 deprecates it for lacking post-quantum key
/// exchange; aws-lc-rs would add a CMake and C build to every cold build, and the links it protects
/// are inside one cluster, re-keyed by rotation. Revisit when ring gains ML-KEM.
#[allow(deprecated)]
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How the caller of a request reached this server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Over plain TCP: the server runs insecure.
    Plain,
    /// Over TLS without a client certificate (a bearer token may still identify it).
    Anonymous,
    /// Over TLS with a certificate naming this identity.
    Certified(Identity),
    /// Over TLS with a CA-signed certificate that names no identity (refused by authorization).
    Unnamed(IdentityError),
}

/// Who the TLS layer says sent a request (from the connection info tonic puts in its extensions).
pub fn peer_of(extensions: &http::Extensions) -> Peer {
    let Some(info) = extensions.get::<TlsConnectInfo<TcpConnectInfo>>() else {
        return Peer::Plain;
    };
    match info.peer_certs().as_deref().and_then(|c| c.first()) {
        None => Peer::Anonymous,
        Some(cert) => match Identity::from_cert_der(cert) {
            Ok(id) => Peer::Certified(id),
            Err(e) => Peer::Unnamed(e),
        },
    }
}

/// How a process dials others: plain TCP (only toward a cluster started insecure) or mutual TLS.
#[derive(Clone)]
pub enum Dialer {
    Plain,
    Tls(ClientTls),
}

impl Dialer {
    /// A lazily connecting channel to `endpoint`.
    pub fn lazy(&self, endpoint: &tonic::transport::Endpoint) -> tonic::transport::Channel {
        match self {
            Dialer::Plain => endpoint.connect_lazy(),
            Dialer::Tls(t) => t.channel(endpoint),
        }
    }

    /// A channel to `endpoint`, connected now.
    pub async fn connect(
        &self,
        endpoint: &tonic::transport::Endpoint,
    ) -> Result<tonic::transport::Channel, tonic::transport::Error> {
        match self {
            Dialer::Plain => endpoint.connect().await,
            Dialer::Tls(t) => t.connect(endpoint).await,
        }
    }

    /// The same credentials, expecting another peer (plain stays plain).
    pub fn expecting(&self, expect: Expect) -> Result<Dialer, TlsError> {
        match self {
            Dialer::Plain => Ok(Dialer::Plain),
            Dialer::Tls(t) => Ok(Dialer::Tls(t.expecting(expect)?)),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Dialer::Tls(_))
    }
}

/// The identity in an endpoint's own certificate file (to check, at start, that a replica or
/// agent was given its own certificate).
pub fn own_identity(files: &TlsFiles) -> Result<Identity, TlsError> {
    let path = files
        .cert
        .as_ref()
        .ok_or_else(|| TlsError::Config("no certificate given".into()))?;
    let certs = load_certs(path)?;
    Identity::from_cert_der(&certs[0]).map_err(|e| TlsError::File {
        path: path.clone(),
        message: e.to_string(),
    })
}
