//! The connecting side: a rustls client config that presents this endpoint's certificate (when it
//! has one) and accepts a peer only if its certificate chains to the cluster CA and names the
//! identity expected of it (any replica, or one particular host). Host names are not checked: the
//! identity in the certificate is (see [`crate::identity`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::files::{load_certs, load_key, load_roots, TlsFiles};
use crate::identity::{Identity, Kind};
use crate::reload::Reloading;
use crate::{provider, TlsError};

/// What the peer's certificate must say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Any identity of this kind (a client dialing any replica: `Kind::Server`).
    Kind(Kind),
    /// Exactly this identity (the CLI reading logs from host `worker/h1`).
    Exactly(Identity),
}

impl Expect {
    fn check(&self, got: &Identity) -> Result<(), String> {
        let ok = match self {
            Expect::Kind(k) => got.kind() == *k,
            Expect::Exactly(id) => got == id,
        };
        if ok {
            Ok(())
        } else {
            let want = match self {
                Expect::Kind(k) => format!("a {k} identity"),
                Expect::Exactly(id) => id.to_string(),
            };
            Err(format!("peer certificate is {got}, expected {want}"))
        }
    }
}

#[derive(Debug)]
struct IdentityVerifier {
    roots: Arc<RootCertStore>,
    expect: Expect,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for IdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let id = Identity::from_cert_der(end_entity)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        self.expect.check(&id).map_err(rustls::Error::General)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

fn build(files: &TlsFiles, expect: &Expect) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(IdentityVerifier {
        roots: Arc::new(load_roots(&files.ca)?),
        expect: expect.clone(),
        algs: provider.signature_verification_algorithms,
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| TlsError::Config(format!("certificate and key do not match: {e}")))?,
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(TlsError::Config(
                "give both a certificate and its key, or neither".into(),
            ))
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A client's TLS setup: who it is and whom it expects; reloaded when its files change.
#[derive(Clone)]
pub struct ClientTls {
    files: TlsFiles,
    pub(crate) config: Arc<Reloading<ClientConfig>>,
}

impl ClientTls {
    pub fn new(files: TlsFiles, expect: Expect) -> Result<Self, TlsError> {
        let paths = files.paths();
        let f = files.clone();
        let config = Reloading::new(paths, move || build(&f, &expect))?;
        Ok(ClientTls {
            files,
            config: Arc::new(config),
        })
    }

    /// The same files, expecting another peer.
    pub fn expecting(&self, expect: Expect) -> Result<Self, TlsError> {
        ClientTls::new(self.files.clone(), expect)
    }

    /// A lazily connecting channel to `endpoint` over TLS (the endpoint's `http://` URI names
    /// the address; TLS is this connector's, so the scheme does not matter).
    pub fn channel(&self, endpoint: &Endpoint) -> Channel {
        endpoint.connect_with_connector_lazy(TlsConnect {
            config: self.config.clone(),
        })
    }

    /// Like [`Self::channel`] but connects now.
    pub async fn connect(&self, endpoint: &Endpoint) -> Result<Channel, tonic::transport::Error> {
        endpoint
            .connect_with_connector(TlsConnect {
                config: self.config.clone(),
            })
            .await
    }
}

/// A tower connector: TCP, then the TLS handshake.
#[derive(Clone)]
pub(crate) struct TlsConnect {
    pub(crate) config: Arc<Reloading<ClientConfig>>,
}

type Io = TokioIo<TlsStream<TcpStream>>;

impl tower_service::Service<Uri> for TlsConnect {
    type Response = Io;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Io, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connector = TlsConnector::from(self.config.get());
        Box::pin(async move {
            let bad = || std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{uri}"));
            let host = uri.host().ok_or_else(bad)?.to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let bare = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let tcp = TcpStream::connect((bare.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            // The name only feeds SNI: the verifier checks the certificate's identity instead.
            let name = ServerName::try_from(bare).map_err(|_| bad())?;
            let tls = connector.connect(name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}
