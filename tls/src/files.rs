//! The three PEM files every TLS endpoint reads: the cluster CA, its own certificate (chain) and its
//! private key. Every error names the file and what was expected.

use std::path::{Path, PathBuf};

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Where an endpoint's TLS material lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate(s) that sign every peer's certificate (PEM).
    pub ca: PathBuf,
    /// This endpoint's certificate, optionally followed by intermediates (PEM). A client that
    /// authenticates with a bearer token has none.
    pub cert: Option<PathBuf>,
    /// The private key of `cert` (PEM, PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    /// The files in a directory laid out by `gangway tls issue`: `ca.pem`, `<kind>-<name>.pem`
    /// and `<kind>-<name>-key.pem`.
    pub fn in_dir(dir: &Path, cert_stem: &str) -> Self {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: Some(dir.join(format!("{cert_stem}.pem"))),
            key: Some(dir.join(format!("{cert_stem}-key.pem"))),
        }
    }

    /// Every path, for change detection.
    pub fn paths(&self) -> Vec<PathBuf> {
        [Some(&self.ca), self.cert.as_ref(), self.key.as_ref()]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }
}

/// A TLS setup that cannot be used, with the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
    #[error("certificate authority: {0}")]
    Ca(String),
}

fn file_err(path: &Path, message: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// Every certificate in a PEM file; at least one.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, format!("cannot read certificates: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(
            path,
            "expected a PEM CERTIFICATE block, found none",
        ));
    }
    Ok(certs)
}

/// The private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| file_err(path, format!("expected a PEM private key: {e}")))
}

/// The CA certificates as a trust store.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| file_err(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// Certificate chain and key of an endpoint that must have both.
pub(crate) fn load_pair(
    files: &TlsFiles,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let (Some(cert), Some(key)) = (&files.cert, &files.key) else {
        return Err(TlsError::Config(
            "a certificate and its key are required here (--tls-cert, --tls-key)".into(),
        ));
    };
    Ok((load_certs(cert)?, load_key(key)?))
}
