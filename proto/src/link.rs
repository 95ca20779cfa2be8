//! The rules of the link between a client of the replicas (the CLI, the worker agent, the test
//! fleet) and whichever replica leads, in one place.
//!
//! * **Metadata keys.** Every error carries its stable code in [`CODE_KEY`]; a replica that is not
//!   the leader names it in [`LEADER_KEY`]; a read may ask for a replica's own state with
//!   [`CONSISTENCY_KEY`].
//! * **What a failure means** ([`classify`] -> [`Retry`]): follow the named leader, try another
//!   replica, resend later only what is safe to apply twice, or give up.
//! * **Which replica next** ([`Replicas`]): the leader a replica named, else the configured list in
//!   turn.

use tonic::{Code, Status};

/// Metadata key of the stable error code (`invalid_spec`, `stale_epoch`, `not_leader`, ...).
pub const CODE_KEY: &str = "x-gangway-code";
/// Metadata key of the leader's address (`host:port`) on `not_leader` errors.
pub const LEADER_KEY: &str = "x-gangway-leader";
/// Metadata key of how long to wait (milliseconds) before sending a refused request again
/// (`resource_exhausted`: a full queue, a rate limit).
pub const RETRY_AFTER_KEY: &str = "x-gangway-retry-after-ms";
/// Request metadata key: `local` lets any replica answer a read from its own, possibly stale,
/// state. Default: linearizable, on the leader.
pub const CONSISTENCY_KEY: &str = "x-gangway-consistency";

/// What a failed call means for sending it again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Retry {
    /// The replica is not the leader and named it (`http://host:port`): the request was not
    /// proposed; send it there now.
    FollowLeader(String),
    /// The request was not proposed (no leader yet, no usable hint, connection refused): try
    /// another replica after a pause.
    AnotherReplica,
    /// The request may or may not have been applied (the replica or the network failed during the
    /// call): resend, later or elsewhere, only what is safe to apply twice.
    OutcomeUnknown,
    /// Refused for now, not applied (`resource_exhausted`: a full queue, a rate limit): send it
    /// again after this long.
    After(std::time::Duration),
    /// A definite answer: sending it again would not change it.
    GiveUp,
}

impl Retry {
    /// Whether an idempotent call may succeed when sent again.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Retry::GiveUp)
    }
}

/// What a failed call means: the stable code when the server sent one, else the gRPC code.
/// The server's hint of when to send a refused request again.
pub fn retry_after(status: &Status) -> Option<std::time::Duration> {
    let ms: u64 = status
        .metadata()
        .get(RETRY_AFTER_KEY)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some(std::time::Duration::from_millis(ms))
}

pub fn classify(status: &Status) -> Retry {
    match error_code(status) {
        Some("not_leader") => match leader_hint(status) {
            Some(leader) => Retry::FollowLeader(leader),
            None => Retry::AnotherReplica,
        },
        Some("no_leader") => Retry::AnotherReplica,
        Some("resource_exhausted") => match retry_after(status) {
            Some(wait) => Retry::After(wait),
            None => Retry::GiveUp,
        },
        Some("unavailable" | "timeout") => Retry::OutcomeUnknown,
        Some(_) => Retry::GiveUp,
        None => match status.code() {
            Code::Unavailable if is_connect_refused(status) => Retry::AnotherReplica,
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::Aborted
            | Code::ResourceExhausted => Retry::OutcomeUnknown,
            _ => Retry::GiveUp,
        },
    }
}

/// Whether an idempotent call may succeed when sent again (another replica, a leader elected, the
/// network back). Anything else is a definite answer.
pub fn retryable(status: &Status) -> bool {
    classify(status).is_retryable()
}

/// A metadata value of a status, trimmed; `None` when absent, not text, or blank.
pub fn metadata_str<'a>(status: &'a Status, key: &str) -> Option<&'a str> {
    status
        .metadata()
        .get(key)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// The stable error code the server put on a failed call.
pub fn error_code(status: &Status) -> Option<&str> {
    metadata_str(status, CODE_KEY)
}

/// The leader a `not_leader` answer names, as `http://host:port`; `None` when absent or malformed.
pub fn leader_hint(status: &Status) -> Option<String> {
    metadata_str(status, LEADER_KEY).and_then(|h| normalize_addr(h).ok())
}

/// True when the status wraps a refused TCP connection: nothing was sent.
fn is_connect_refused(status: &Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        source = err.source();
    }
    false
}

/// One replica address to `http://host:port`. `host` may be a name, an IPv4 address or a
/// bracketed IPv6 address; the port is required; `http://` is optional.
pub fn normalize_addr(addr: &str) -> Result<String, String> {
    let trimmed = addr.trim();
    let rest = match trimmed.split_once("://") {
        None => trimmed,
        Some(("http", rest)) => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "{trimmed:?}: scheme {scheme}:// is not supported (plain http:// only)"
            ))
        }
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(format!("{trimmed:?}: expected host:port"));
    };
    if host.is_empty() || host.contains('/') || host.contains(char::is_whitespace) {
        return Err(format!("{trimmed:?}: expected host:port"));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(format!(
            "{trimmed:?}: an IPv6 address must be bracketed, e.g. [::1]:7101"
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(format!("http://{host}:{p}")),
        _ => Err(format!(
            "{trimmed:?}: port {port:?} is not a number in 1..=65535"
        )),
    }
}

/// Which replica to call: the leader a replica named last, else the configured list in turn.
#[derive(Clone, Debug)]
pub struct Replicas {
    addrs: Vec<String>,
    /// Index in `addrs` of the replica to try when there is no hint.
    next: usize,
    /// The leader named by the last `not_leader` answer, tried before the list.
    hint: Option<String>,
}

impl Replicas {
    /// The configured replicas, each `http://host:port` (see [`normalize_addr`]); give at least
    /// one (with none, [`Replicas::target`] is empty and every call fails to connect).
    pub fn new(addrs: Vec<String>) -> Self {
        Self {
            addrs,
            next: 0,
            hint: None,
        }
    }

    /// The configured replicas, in order.
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// The replica to call now.
    pub fn target(&self) -> &str {
        match &self.hint {
            Some(h) => h,
            None => self
                .addrs
                .get(self.next % self.addrs.len().max(1))
                .map_or("", String::as_str),
        }
    }

    /// After a failed call to [`Replicas::target`]: follow a leader hint naming another replica
    /// (true), or move on (false; a hint naming the replica that just failed is no hint).
    pub fn failed(&mut self, retry: &Retry) -> bool {
        match retry {
            Retry::FollowLeader(leader) if leader != self.target() => {
                self.hint = Some(leader.clone());
                true
            }
            _ => {
                self.advance();
                false
            }
        }
    }

    /// Drops the hint and moves to the next address in the list.
    pub fn advance(&mut self) {
        self.hint = None;
        self.next = (self.next + 1) % self.addrs.len().max(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: Code, gangway_code: Option<&str>, leader: Option<&str>) -> Status {
        let mut s = Status::new(code, "x");
        if let Some(c) = gangway_code {
            s.metadata_mut().insert(CODE_KEY, c.parse().unwrap());
        }
        if let Some(l) = leader {
            s.metadata_mut().insert(LEADER_KEY, l.parse().unwrap());
        }
        s
    }

    /// What tonic gives for a connection refused: UNAVAILABLE, with the io error as its source.
    fn refused() -> Status {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let mut s = Status::unavailable("tcp connect error");
        s.set_source(std::sync::Arc::new(io));
        s
    }

    #[test]
    fn failures_are_classified_by_their_code() {
        use Code::*;
        let leader = || Retry::FollowLeader("http://10.0.0.2:7101".into());
        let table: Vec<(&str, Status, Retry)> = vec![
            (
                "a follower names the leader",
                status(Unavailable, Some("not_leader"), Some("10.0.0.2:7101")),
                leader(),
            ),
            (
                "a hint with a scheme is the same hint",
                status(
                    Unavailable,
                    Some("not_leader"),
                    Some("http://10.0.0.2:7101"),
                ),
                leader(),
            ),
            (
                "not_leader without a hint",
                status(Unavailable, Some("not_leader"), None),
                Retry::AnotherReplica,
            ),
            (
                "a malformed hint is no hint",
                status(Unavailable, Some("not_leader"), Some("nowhere")),
                Retry::AnotherReplica,
            ),
            (
                "no leader elected yet",
                status(Unavailable, Some("no_leader"), None),
                Retry::AnotherReplica,
            ),
            (
                "a quorum lost mid-write",
                status(Unavailable, Some("unavailable"), None),
                Retry::OutcomeUnknown,
            ),
            (
                "a commit that timed out",
                status(DeadlineExceeded, Some("timeout"), None),
                Retry::OutcomeUnknown,
            ),
            (
                "a stale epoch is definite",
                status(FailedPrecondition, Some("stale_epoch"), None),
                Retry::GiveUp,
            ),
            (
                "a bad field is definite",
                status(InvalidArgument, Some("invalid_argument"), None),
                Retry::GiveUp,
            ),
            (
                "a code the server sends beats the gRPC code",
                status(Unavailable, Some("internal"), None),
                Retry::GiveUp,
            ),
            ("a refused connection", refused(), Retry::AnotherReplica),
            (
                "a connection that broke",
                status(Unavailable, None, None),
                Retry::OutcomeUnknown,
            ),
            (
                "no answer in time",
                status(DeadlineExceeded, None, None),
                Retry::OutcomeUnknown,
            ),
            (
                "a cancelled call",
                status(Cancelled, None, None),
                Retry::OutcomeUnknown,
            ),
            (
                "a transport error",
                status(Unknown, None, None),
                Retry::OutcomeUnknown,
            ),
            (
                "aborted",
                status(Aborted, None, None),
                Retry::OutcomeUnknown,
            ),
            (
                "resources exhausted",
                status(ResourceExhausted, None, None),
                Retry::OutcomeUnknown,
            ),
            (
                "a full queue with the server's hint: refused for now, send again after it",
                {
                    let mut s = status(ResourceExhausted, Some("resource_exhausted"), None);
                    s.metadata_mut()
                        .insert(RETRY_AFTER_KEY, "5000".parse().unwrap());
                    s
                },
                Retry::After(std::time::Duration::from_secs(5)),
            ),
            (
                "a full queue without a usable hint is definite",
                status(ResourceExhausted, Some("resource_exhausted"), None),
                Retry::GiveUp,
            ),
            (
                "an unimplemented method",
                status(Unimplemented, None, None),
                Retry::GiveUp,
            ),
            (
                "a server panic",
                status(Internal, None, None),
                Retry::GiveUp,
            ),
        ];
        for (story, s, want) in table {
            let got = classify(&s);
            assert_eq!(got, want, "{story}: {s:?}");
            assert_eq!(retryable(&s), want != Retry::GiveUp, "{story}");
        }
    }

    #[test]
    fn follows_hints_then_walks_the_list() {
        let mut r = Replicas::new(vec!["http://a:1".into(), "http://b:2".into()]);
        assert_eq!(r.target(), "http://a:1");
        assert!(r.failed(&Retry::FollowLeader("http://c:3".into())));
        assert_eq!(
            r.target(),
            "http://c:3",
            "a hint is followed, in the list or not"
        );
        // The hinted leader fails naming itself (it is gone): walk on instead of looping.
        assert!(!r.failed(&Retry::FollowLeader("http://c:3".into())));
        assert_eq!(r.target(), "http://b:2");
        assert!(!r.failed(&Retry::AnotherReplica));
        assert_eq!(r.target(), "http://a:1", "the list wraps around");
        assert!(!r.failed(&Retry::OutcomeUnknown));
        assert_eq!(r.target(), "http://b:2");
    }

    #[test]
    fn no_replicas_is_an_empty_target_not_a_panic() {
        let mut r = Replicas::new(Vec::new());
        assert_eq!(r.target(), "");
        r.advance();
        assert_eq!(r.target(), "");
    }

    #[test]
    fn addresses_normalise_to_http_uris() {
        for (given, want) in [
            ("10.0.0.1:7101", "http://10.0.0.1:7101"),
            ("http://node-a:7101/", "http://node-a:7101"),
            ("[::1]:7101", "http://[::1]:7101"),
        ] {
            assert_eq!(normalize_addr(given).as_deref(), Ok(want), "{given}");
        }
        for bad in [
            "node-a",
            "https://node-a:1",
            "::1:7101",
            "a:0",
            "a:x",
            ":7101",
        ] {
            assert!(normalize_addr(bad).is_err(), "{bad}");
        }
    }
}
