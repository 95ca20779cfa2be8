//! How a client proves who it is: its TLS setup (the cluster CA, and its own certificate when it
//! has one) and, optionally, a bearer token sent with every call.
//!
//! The CLI resolves them once from its flags (`--tls-ca`, `--tls-cert`, `--tls-key`, `--token`,
//! `--insecure`, or the `GANGWAY_*` variables) and installs them for the process
//! ([`install`]); every client it makes afterwards ([`super::Client::new`], drills, `logs`) uses
//! them.

use gangway_proto::pb::client_api_client::ClientApiClient;
use gangway_tls::{ClientTls, Dialer, Expect, Kind, TlsFiles};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// A client's credentials.
#[derive(Clone)]
pub struct Credentials {
    /// Dials replicas, expecting each to prove it is one.
    pub dialer: Dialer,
    /// Sent as `authorization: Bearer <token>`.
    pub token: Option<Arc<str>>,
}

/// The client API over a channel that adds the bearer token.
pub type Api = ClientApiClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer <token>` to every request (nothing without a token).
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// What the flags said, before files are read.
#[derive(Clone, Debug, Default)]
pub struct CredentialFlags {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub token: Option<String>,
    pub insecure: bool,
}

impl CredentialFlags {
    /// Reads the files. Without `--insecure`, a CA is required.
    pub fn resolve(&self) -> Result<Credentials, String> {
        let token = match &self.token {
            Some(t) if t.trim().is_empty() => return Err("--token: empty".into()),
            Some(t) => Some(Arc::from(t.trim())),
            None => None,
        };
        if self.insecure {
            return Ok(Credentials {
                dialer: Dialer::Plain,
                token,
            });
        }
        let Some(ca) = self.ca.clone() else {
            return Err("--tls-ca (GANGWAY_TLS_CA): the cluster CA is required to reach a TLS cluster; pass --insecure only for a cluster started insecure".into());
        };
        let files = TlsFiles {
            ca,
            cert: self.cert.clone(),
            key: self.key.clone(),
        };
        if files.cert.is_none() && token.is_none() {
            return Err("--tls-cert and --tls-key, or --token: a client must say who it is".into());
        }
        let tls = ClientTls::new(files, Expect::Kind(Kind::Server)).map_err(|e| e.to_string())?;
        Ok(Credentials {
            dialer: Dialer::Tls(tls),
            token,
        })
    }
}

static INSTALLED: OnceLock<Credentials> = OnceLock::new();

/// Sets the process's credentials (first call wins).
pub fn install(c: Credentials) {
    let _ = INSTALLED.set(c);
}

/// The process's credentials: those installed, or plain TCP without a token (unit tests against
/// in-process insecure servers).
pub fn current() -> Credentials {
    INSTALLED.get().cloned().unwrap_or(Credentials {
        dialer: Dialer::Plain,
        token: None,
    })
}

impl Credentials {
    fn bearer(&self) -> Bearer {
        Bearer(
            self.token
                .as_ref()
                .and_then(|t| format!("Bearer {t}").parse().ok()),
        )
    }

    /// The client API over `channel`, with the token.
    pub fn api(&self, channel: Channel) -> Api {
        ClientApiClient::with_interceptor(channel, self.bearer())
            .max_decoding_message_size(64 << 20)
    }

    /// Connects now.
    pub async fn connect(&self, endpoint: &Endpoint) -> Result<Channel, tonic::transport::Error> {
        self.dialer.connect(endpoint).await
    }

    /// A lazily connecting channel.
    pub fn lazy(&self, endpoint: &Endpoint) -> Channel {
        self.dialer.lazy(endpoint)
    }
}
