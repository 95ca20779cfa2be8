//! Who a certificate speaks for: a replica (`server/<id>`), a host (`worker/<node>`) or a person or
//! service (`client/<name>`).
//!
//! The identity travels in the certificate as a URI subject alternative name
//! `spiffe://<trust domain>/<kind>/<name>` (any trust domain; `gangway tls issue` writes
//! `spiffe://gangway/...`), or, for certificates from a CA that cannot write URI names, as the
//! subject common name `<kind>/<name>`. Names are checked, not host names: like Nomad's
//! `server.<region>.nomad`, a certificate says what role its holder plays wherever it runs.

use std::fmt;
use std::str::FromStr;

/// The role a certificate is issued for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A scheduler replica; its name is its Raft node id.
    Server,
    /// A host agent; its name is its node name.
    Worker,
    /// A person or service using the client API.
    Client,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Server => "server",
            Kind::Worker => "worker",
            Kind::Client => "client",
        }
    }
}

impl FromStr for Kind {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, IdentityError> {
        match s {
            "server" => Ok(Kind::Server),
            "worker" => Ok(Kind::Worker),
            "client" => Ok(Kind::Client),
            other => Err(IdentityError::Kind(other.to_owned())),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated identity, written `kind/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identity {
    kind: Kind,
    name: String,
}

/// Why a string or certificate does not name an identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("unknown identity kind {0:?}: expected server, worker or client")]
    Kind(String),
    #[error("identity {0:?}: expected kind/name, e.g. client/alice or worker/host-1")]
    Shape(String),
    #[error("identity name {0:?}: expected 1-128 letters, digits, '.', '_', '-' or '@'")]
    Name(String),
    #[error("server identity {0:?}: the name must be the replica's numeric id")]
    ServerId(String),
    #[error("certificate is not valid X.509: {0}")]
    Certificate(String),
    #[error("certificate names no gangway identity (no spiffe://.../<kind>/<name> URI and no <kind>/<name> common name)")]
    Missing,
}

/// The longest name accepted (node names and client names alike).
pub const MAX_NAME_LEN: usize = 128;

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c))
}

impl Identity {
    /// `kind/name`, validated.
    pub fn new(kind: Kind, name: &str) -> Result<Self, IdentityError> {
        if !valid_name(name) {
            return Err(IdentityError::Name(name.to_owned()));
        }
        if kind == Kind::Server && name.parse::<u64>().is_err() {
            return Err(IdentityError::ServerId(name.to_owned()));
        }
        Ok(Identity {
            kind,
            name: name.to_owned(),
        })
    }

    pub fn server(id: u64) -> Self {
        Identity {
            kind: Kind::Server,
            name: id.to_string(),
        }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The replica id of a server identity.
    pub fn server_id(&self) -> Option<u64> {
        (self.kind == Kind::Server)
            .then(|| self.name.parse().ok())
            .flatten()
    }

    /// The URI subject alternative name `gangway tls issue` writes.
    pub fn spiffe_uri(&self) -> String {
        format!("spiffe://gangway/{}/{}", self.kind, self.name)
    }

    /// The identity a DER certificate carries (see the module documentation).
    pub fn from_cert_der(der: &[u8]) -> Result<Self, IdentityError> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| IdentityError::Certificate(e.to_string()))?;
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::URI(uri) = name {
                    if let Some(id) = Self::from_spiffe(uri) {
                        return id;
                    }
                }
            }
        }
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok());
        match cn {
            Some(cn) if cn.contains('/') => cn.parse(),
            _ => Err(IdentityError::Missing),
        }
    }

    /// `spiffe://<domain>/<kind>/<name>`; `None` when the URI is not of that shape at all.
    fn from_spiffe(uri: &str) -> Option<Result<Self, IdentityError>> {
        let rest = uri.strip_prefix("spiffe://")?;
        let (_domain, path) = rest.split_once('/')?;
        Some(path.parse())
    }
}

impl FromStr for Identity {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, IdentityError> {
        let (kind, name) = s
            .split_once('/')
            .ok_or_else(|| IdentityError::Shape(s.to_owned()))?;
        Identity::new(kind.parse()?, name)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_parse_and_print_as_kind_slash_name() {
        for (text, ok) in [
            ("client/alice", true),
            ("worker/host-1.dc1", true),
            ("server/3", true),
            ("server/three", false),
            ("client/", false),
            ("client/a/b", false),
            ("admin/alice", false),
            ("alice", false),
            ("client/al ice", false),
        ] {
            let parsed = text.parse::<Identity>();
            assert_eq!(parsed.is_ok(), ok, "{text}: {parsed:?}");
            if let Ok(id) = parsed {
                assert_eq!(id.to_string(), text);
            }
        }
        assert_eq!(Identity::server(7).server_id(), Some(7));
        assert_eq!("client/7".parse::<Identity>().unwrap().server_id(), None);
    }
}
