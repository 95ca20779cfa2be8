//! One cluster CA per test binary, with certificates issued as tests need them: every end-to-end
//! test runs with mutual TLS on, as production does. The CLI processes the tests start inherit
//! `GANGWAY_TLS_*` for `client/admin` (an admin by the replicas' configuration).

use gangway_tls::{ca, ClientTls, Dialer, Expect, Identity, Kind, TlsFiles};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// Certificates other than the test CA's that `common::client` speaks with (a compose cluster's,
/// which made its own CA).
static SPEAK_AS: std::sync::RwLock<Option<TlsFiles>> = std::sync::RwLock::new(None);

/// From now on, `common::client` dials with these files (as the identity they name).
pub fn speak_as(files: TlsFiles) {
    *SPEAK_AS.write().unwrap_or_else(|p| p.into_inner()) = Some(files);
}

pub struct Pki {
    dir: tempfile::TempDir,
    issued: Mutex<()>,
}

/// The CA of this test binary (made on first use; also sets the CLI's environment).
pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tls dir");
        ca::init(dir.path(), 30).expect("make the test CA");
        let p = Pki {
            dir,
            issued: Mutex::new(()),
        };
        let admin = p.files("client/admin");
        // Every CLI process a test starts speaks as client/admin unless told otherwise.
        std::env::set_var("GANGWAY_TLS_CA", &admin.ca);
        std::env::set_var("GANGWAY_TLS_CERT", admin.cert.as_ref().unwrap());
        std::env::set_var("GANGWAY_TLS_KEY", admin.key.as_ref().unwrap());
        p
    })
}

impl Pki {
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn ca(&self) -> PathBuf {
        ca::ca_cert_path(self.dir.path())
    }

    /// The files of identity `id` (`server/1`, `worker/h1`, `client/alice`), issued on first use.
    pub fn files(&self, id: &str) -> TlsFiles {
        let id: Identity = id.parse().expect("identity");
        let _g = self.issued.lock().unwrap_or_else(|p| p.into_inner());
        ca::ensure(self.dir.path(), &id).expect("issue a test certificate")
    }

    /// A dialer speaking as `id`, expecting a replica (or with the files of [`speak_as`]).
    pub fn dialer(&self, id: &str) -> Dialer {
        let over = SPEAK_AS.read().unwrap_or_else(|p| p.into_inner()).clone();
        let files = over.unwrap_or_else(|| self.files(id));
        Dialer::Tls(ClientTls::new(files, Expect::Kind(Kind::Server)).expect("client tls"))
    }

    /// `--tls-ca/--tls-cert/--tls-key` for a process speaking as `id`.
    pub fn flags(&self, id: &str) -> Vec<String> {
        let f = self.files(id);
        vec![
            "--tls-ca".into(),
            f.ca.display().to_string(),
            "--tls-cert".into(),
            f.cert.unwrap().display().to_string(),
            "--tls-key".into(),
            f.key.unwrap().display().to_string(),
        ]
    }

    /// Each fake host dials as itself.
    pub fn fleet_dialer(&'static self) -> gangway::fleet::HostDialer {
        gangway::fleet::HostDialer(std::sync::Arc::new(move |name: &str| {
            self.dialer(&format!("worker/{name}"))
        }))
    }
}
