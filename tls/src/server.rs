//! The accepting side: a rustls server config that asks every peer for a certificate signed by the
//! cluster CA (a peer without one may still connect, to present a bearer token; authorization
//! decides), and an incoming-connection stream for tonic that handshakes connections concurrently.

use std::sync::Arc;
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use crate::files::{load_pair, load_roots, TlsFiles};
use crate::reload::Reloading;
use crate::{provider, TlsError};

/// How long a connecting peer has to finish its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts on `listener` for `tonic::transport::Server::serve_with_incoming*` without TLS
/// (`tls.insecure`), each connection with `TCP_NODELAY` as the TLS path sets it. tonic's own
/// `Server::tcp_nodelay` applies only to listeners tonic binds itself; without it a small reply
/// waits on Nagle's algorithm for the peer's delayed ACK, tens of milliseconds.
pub fn plain_incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// A server's TLS setup, reloaded when its files change.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<Reloading<ServerConfig>>,
}

fn build(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let roots = Arc::new(load_roots(&files.ca)?);
    let (certs, key) = load_pair(files)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(format!("certificate and key do not match: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

impl ServerTls {
    /// Reads the files now; later changes are picked up on the next connection.
    pub fn new(files: TlsFiles) -> Result<Self, TlsError> {
        let paths = files.paths();
        let config = Reloading::new(paths, move || build(&files))?;
        Ok(ServerTls {
            config: Arc::new(config),
        })
    }

    /// Accepts on `listener` and yields handshaken connections for
    /// `tonic::transport::Server::serve_with_incoming*`. Each handshake runs in its own task so
    /// a slow or silent peer holds up nobody; a failed one is logged with the peer's address.
    /// Accepting stops when the stream is dropped.
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let config = self.config.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    () = tx.closed() => return,
                };
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = TlsAcceptor::from(config.get());
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::info!(%peer, error = %e, "TLS handshake refused")
                        }
                        Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}
