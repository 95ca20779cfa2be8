//! A cluster CA for people who have none: `gangway tls init` and `gangway tls issue`.
//!
//! Keys are ECDSA P-256. Lifetimes: the CA 10 years, replicas and hosts 1 year, clients 90 days
//! (people leave; hosts are re-keyed by rotation, which servers and agents pick up without a
//! restart). Private keys are written 0600.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::identity::{Identity, Kind};
use crate::TlsError;

pub const CA_DAYS: u32 = 3650;
pub const SERVER_DAYS: u32 = 365;
pub const WORKER_DAYS: u32 = 365;
pub const CLIENT_DAYS: u32 = 90;

/// The default lifetime of a certificate of this kind, in days.
pub fn default_days(kind: Kind) -> u32 {
    match kind {
        Kind::Server => SERVER_DAYS,
        Kind::Worker => WORKER_DAYS,
        Kind::Client => CLIENT_DAYS,
    }
}

pub fn ca_cert_path(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

pub fn ca_key_path(dir: &Path) -> PathBuf {
    dir.join("ca-key.pem")
}

/// The file stem `gangway tls issue` uses for an identity: `client-alice`, `server-1`.
pub fn cert_stem(id: &Identity) -> String {
    format!("{}-{}", id.kind(), id.name())
}

fn ca_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Ca(e.to_string())
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), TlsError> {
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    };
    write().map_err(|e| TlsError::File {
        path: path.to_owned(),
        message: format!("cannot write: {e}"),
    })
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    // An hour of slack for clocks slightly behind the issuer's.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(days));
}

/// Creates `ca.pem` and `ca-key.pem` in `dir`; refuses to overwrite an existing CA.
pub fn init(dir: &Path, days: u32) -> Result<PathBuf, TlsError> {
    fs::create_dir_all(dir).map_err(|e| TlsError::File {
        path: dir.to_owned(),
        message: format!("cannot create: {e}"),
    })?;
    let (cert_path, key_path) = (ca_cert_path(dir), ca_key_path(dir));
    if cert_path.exists() || key_path.exists() {
        return Err(ca_err(format!(
            "{} already holds a CA; remove it first to make a new one",
            dir.display()
        )));
    }
    let key = KeyPair::generate().map_err(ca_err)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Gangway cluster CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, days);
    let cert = params.self_signed(&key).map_err(ca_err)?;
    write_file(&key_path, &key.serialize_pem(), 0o600)?;
    write_file(&cert_path, &cert.pem(), 0o644)?;
    Ok(cert_path)
}

/// What to put in an issued certificate besides its identity.
#[derive(Clone, Debug, Default)]
pub struct IssueOptions {
    /// Extra DNS names or IP addresses (for tools that check host names, e.g. curl on /metrics).
    pub hosts: Vec<String>,
    /// Lifetime in days; the kind's default when `None`.
    pub days: Option<u32>,
}

/// Issues a certificate for `id` signed by the CA in `ca_dir`, written to `out_dir` as
/// `<kind>-<name>.pem` and `<kind>-<name>-key.pem`. Returns the certificate's path.
pub fn issue(
    ca_dir: &Path,
    out_dir: &Path,
    id: &Identity,
    opts: &IssueOptions,
) -> Result<PathBuf, TlsError> {
    let read = |p: PathBuf| {
        fs::read_to_string(&p).map_err(|e| TlsError::File {
            path: p,
            message: format!("cannot read the CA (run `gangway tls init` first): {e}"),
        })
    };
    let ca_key = KeyPair::from_pem(&read(ca_key_path(ca_dir))?).map_err(ca_err)?;
    let issuer = Issuer::from_ca_cert_pem(&read(ca_cert_path(ca_dir))?, ca_key).map_err(ca_err)?;

    let mut params = CertificateParams::new(opts.hosts.clone()).map_err(ca_err)?;
    let uri = id.spiffe_uri().try_into().map_err(ca_err)?;
    params.subject_alt_names.push(SanType::URI(uri));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, id.to_string());
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = match id.kind() {
        Kind::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        // Replicas and hosts both accept connections and make them.
        Kind::Server | Kind::Worker => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    };
    validity(&mut params, opts.days.unwrap_or(default_days(id.kind())));
    let key = KeyPair::generate().map_err(ca_err)?;
    let cert = params.signed_by(&key, &issuer).map_err(ca_err)?;

    fs::create_dir_all(out_dir).map_err(|e| TlsError::File {
        path: out_dir.to_owned(),
        message: format!("cannot create: {e}"),
    })?;
    let stem = cert_stem(id);
    let cert_path = out_dir.join(format!("{stem}.pem"));
    write_file(
        &out_dir.join(format!("{stem}-key.pem")),
        &key.serialize_pem(),
        0o600,
    )?;
    write_file(&cert_path, &cert.pem(), 0o644)?;
    Ok(cert_path)
}

/// The files of `id` in `dir` (the CA's directory), issued there with default options first if
/// they are not there yet: how a test, a bench or `gangway dev` gets the certificates it needs.
pub fn ensure(dir: &Path, id: &Identity) -> Result<crate::TlsFiles, TlsError> {
    let files = crate::TlsFiles::in_dir(dir, &cert_stem(id));
    if !files.cert.as_ref().is_some_and(|c| c.exists()) {
        issue(dir, dir, id, &IssueOptions::default())?;
    }
    Ok(files)
}
