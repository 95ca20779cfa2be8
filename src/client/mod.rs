//! A leader-following client for the Gangway client API.
//!
//! A [`Client`] holds the replica addresses people gave (`--addr`) and at most one open connection.
//! [`Client::call`] runs one RPC and decides, from the error's `x-gangway-code` metadata, what to
//! do next:
//!
//! * `not_leader` with an `x-gangway-leader: host:port` hint: reconnect to the leader (even when it
//!   is not in the list) and resend at once. The request was not proposed, so this is always safe.
//! * `not_leader` without a hint, `no_leader`, or a replica that cannot be reached: try the next
//!   address after a backoff (100 ms doubling to 1 s). Always safe.
//! * `unavailable`, `timeout` (or an UNAVAILABLE/DEADLINE_EXCEEDED without a code): the request may
//!   or may not have been applied. Only calls that are safe to resend ([`Retry::Safe`]: reads,
//!   absolute sets, and submit, which carries an idempotency key) go on; the others fail with
//!   [`ClientError::OutcomeUnknown`].
//! * Anything else returns at once.
//!
//! A call that is safe to resend gives one replica at most a third of the deadline (at least 5 s)
//! before moving on, so a replica that accepts connections and then hangs does not use all of it; a
//! call that is not waits until the deadline and then reports an unknown outcome.
//!
//! Everything stops at the deadline (`--timeout`), with [`ClientError::NoLeader`] (exit code 5).

mod addr;
mod api;
mod error;
#[cfg(test)]
mod tests;

pub use addr::{display_addr, normalize_addr, parse_addr_list};
pub use error::{ClientError, EXIT_INVALID};

use gangway_proto::pb::client_api_client::ClientApiClient;
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

/// Metadata key of the stable error code.
pub const CODE_KEY: &str = "x-gangway-code";
/// Metadata key of the leader's address on `not_leader` errors.
pub const LEADER_KEY: &str = "x-gangway-leader";

/// First backoff between attempts.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest backoff between attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Longest wait for one TCP/HTTP2 connection, so a black-holed address does not eat the deadline.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Shortest time one replica gets to answer a call that is safe to resend (see [`attempt_timeout`]).
const MIN_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Leader hints followed in a row without backoff (a hint loop then slows down).
const FREE_HINT_HOPS: u32 = 2;

/// Whether a call may be sent again when its outcome is unknown (the replica took the request and
/// then failed with `unavailable`/`timeout`, or the connection broke before the answer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// Resending cannot apply the change twice: reads, absolute sets, submit with its idempotency key.
    Safe,
    /// Resend only when the request was certainly not proposed (`not_leader`, `no_leader`, connect
    /// failures); an unknown outcome is reported as [`ClientError::OutcomeUnknown`].
    UnlessOutcomeUnknown,
}

/// What one failed attempt means.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// The replica is not the leader and named it.
    NotLeader { hint: String },
    /// The request was not proposed: try another replica.
    NotProposed,
    /// The request may have been applied.
    OutcomeUnknown,
    /// Retrying would not help.
    Fatal,
}

fn metadata_str<'a>(status: &'a tonic::Status, key: &str) -> Option<&'a str> {
    status
        .metadata()
        .get(key)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// True when the status wraps a refused TCP connection: nothing was sent.
fn is_connect_refused(status: &tonic::Status) -> bool {
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

fn classify(status: &tonic::Status) -> Failure {
    match metadata_str(status, CODE_KEY) {
        Some("not_leader") => match metadata_str(status, LEADER_KEY).map(normalize_addr) {
            Some(Ok(hint)) => Failure::NotLeader { hint },
            _ => Failure::NotProposed,
        },
        Some("no_leader") => Failure::NotProposed,
        Some("unavailable" | "timeout") => Failure::OutcomeUnknown,
        Some(_) => Failure::Fatal,
        None => match status.code() {
            tonic::Code::Unavailable if is_connect_refused(status) => Failure::NotProposed,
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                Failure::OutcomeUnknown
            }
            _ => Failure::Fatal,
        },
    }
}

fn describe(status: &tonic::Status) -> String {
    let code = metadata_str(status, CODE_KEY)
        .map_or_else(|| format!("{:?}", status.code()), str::to_owned);
    let message = status.message().trim();
    let message = if message.is_empty() {
        "(no message)"
    } else {
        message
    };
    match metadata_str(status, LEADER_KEY) {
        Some(leader) => format!("{message} [{code}, leader {leader}]"),
        None => format!("{message} [{code}]"),
    }
}

struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self {
            next: BACKOFF_START,
        }
    }

    fn take(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        d
    }
}

/// An open connection to one replica.
struct Conn {
    uri: String,
    api: ClientApiClient<Channel>,
}

/// A leader-following client: see the module documentation.
pub struct Client {
    addrs: Vec<String>,
    timeout: Duration,
    /// Index in `addrs` of the next replica to try when there is no connection and no hint.
    next: usize,
    /// The leader named by the last `not_leader` answer, tried before the list.
    hint: Option<String>,
    conn: Option<Conn>,
    /// How long one replica gets to answer a call that is safe to resend.
    attempt_timeout: Duration,
}

impl Client {
    /// A client for these replicas (`http://host:port`, from [`parse_addr_list`]); every call gives up
    /// after `timeout`. Nothing connects until the first call.
    pub fn new(addrs: Vec<String>, timeout: Duration) -> Self {
        assert!(!addrs.is_empty(), "a client needs at least one address");
        Self {
            addrs,
            timeout,
            next: 0,
            hint: None,
            conn: None,
            attempt_timeout: attempt_timeout(timeout),
        }
    }

    #[cfg(test)]
    pub fn set_attempt_timeout(&mut self, d: Duration) {
        self.attempt_timeout = d;
    }

    /// The address of the replica the client is connected to, if any (`host:port`).
    #[cfg(test)]
    pub fn connected_to(&self) -> Option<&str> {
        self.conn.as_ref().map(|c| display_addr(&c.uri))
    }

    /// Forgets the connection and moves on to the next address in the list.
    fn advance(&mut self) {
        self.conn = None;
        self.next = (self.next + 1) % self.addrs.len();
    }

    async fn connect(&mut self, remaining: Duration) -> Result<&Conn, (String, String)> {
        if self.conn.is_none() {
            let uri = match self.hint.take() {
                Some(h) => h,
                None => self.addrs[self.next].clone(),
            };
            let endpoint = Endpoint::from_shared(uri.clone())
                .map_err(|e| (uri.clone(), format!("bad address: {e}")))?
                .connect_timeout(remaining.min(CONNECT_TIMEOUT))
                .tcp_nodelay(true);
            let channel = match tokio::time::timeout(remaining, endpoint.connect()).await {
                Ok(Ok(channel)) => channel,
                Ok(Err(e)) => return Err((uri, format!("cannot connect: {}", error_chain(&e)))),
                Err(_) => return Err((uri, "cannot connect: timed out".to_owned())),
            };
            self.conn = Some(Conn {
                uri,
                api: ClientApiClient::new(channel),
            });
        }
        Ok(self.conn.as_ref().expect("just connected"))
    }

    /// Runs one RPC against the leader, following leader hints and retrying per `retry` until the
    /// client's deadline. `f` gets a fresh handle on each attempt and must build the same request
    /// each time (for submit: the same idempotency key).
    pub async fn call<T, F, Fut>(
        &mut self,
        method: &'static str,
        retry: Retry,
        mut f: F,
    ) -> Result<T, ClientError>
    where
        F: FnMut(ClientApiClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = Instant::now() + self.timeout;
        let mut backoff = Backoff::new();
        let mut tried: Vec<String> = Vec::new();
        let mut last = String::from("no attempt finished");
        let mut hops = 0u32;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(ClientError::NoLeader {
                    waited: self.timeout,
                    tried,
                    last,
                });
            }
            let (uri, api) = match self.connect(remaining).await {
                Ok(conn) => (conn.uri.clone(), conn.api.clone()),
                Err((uri, msg)) => {
                    note_tried(&mut tried, &uri);
                    last = format!("{}: {msg}", display_addr(&uri));
                    self.advance();
                    sleep_until_or(deadline, backoff.take()).await;
                    continue;
                }
            };
            note_tried(&mut tried, &uri);
            let addr = display_addr(&uri).to_owned();
            // A call that is safe to resend gives each replica a share of the deadline, so one that
            // accepted the connection and then hung does not use all of it.
            let limit = match retry {
                Retry::Safe => remaining.min(self.attempt_timeout),
                Retry::UnlessOutcomeUnknown => remaining,
            };
            let status = match tokio::time::timeout(limit, f(api)).await {
                Ok(Ok(reply)) => return Ok(reply.into_inner()),
                Ok(Err(status)) => status,
                Err(_) => {
                    let message = format!(
                        "no answer within {}",
                        humantime::format_duration(round_ms(limit))
                    );
                    match retry {
                        Retry::Safe => {
                            last = format!("{addr}: {message}");
                            self.advance();
                            continue;
                        }
                        Retry::UnlessOutcomeUnknown => {
                            self.conn = None;
                            return Err(ClientError::OutcomeUnknown {
                                addr,
                                method,
                                message,
                            });
                        }
                    }
                }
            };
            last = format!("{addr}: {}", describe(&status));
            match classify(&status) {
                Failure::NotLeader { hint } if hint != uri => {
                    self.conn = None;
                    self.hint = Some(hint);
                    hops += 1;
                    if hops > FREE_HINT_HOPS {
                        sleep_until_or(deadline, backoff.take()).await;
                    }
                }
                Failure::NotLeader { .. } | Failure::NotProposed => {
                    self.advance();
                    sleep_until_or(deadline, backoff.take()).await;
                }
                Failure::OutcomeUnknown => match retry {
                    Retry::Safe => {
                        self.advance();
                        sleep_until_or(deadline, backoff.take()).await;
                    }
                    Retry::UnlessOutcomeUnknown => {
                        return Err(ClientError::OutcomeUnknown {
                            addr,
                            method,
                            message: describe(&status),
                        })
                    }
                },
                Failure::Fatal => {
                    return Err(ClientError::Server {
                        addr,
                        method,
                        code: status.code(),
                        gangway_code: metadata_str(&status, CODE_KEY).map(str::to_owned),
                        message: status.message().to_owned(),
                    })
                }
            }
        }
    }
}

/// An error and its sources on one line, without the repeats tonic's wrapped errors produce
/// (`tcp connect error: tcp connect error: Connection refused`).
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        let joined = parts.join(": ");
        match parts.last_mut() {
            Some(last) if text.starts_with(last.as_str()) => *last = text,
            _ if joined.contains(&text) => {}
            _ => parts.push(text),
        }
        next = e.source();
    }
    parts.join(": ")
}

/// How long one replica gets to answer a call that is safe to resend: a third of the deadline, at
/// least [`MIN_ATTEMPT_TIMEOUT`] (the deadline still bounds it).
fn attempt_timeout(timeout: Duration) -> Duration {
    (timeout / 3).max(MIN_ATTEMPT_TIMEOUT)
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

fn note_tried(tried: &mut Vec<String>, uri: &str) {
    let addr = display_addr(uri);
    if !tried.iter().any(|t| t == addr) {
        tried.push(addr.to_owned());
    }
}

async fn sleep_until_or(deadline: Instant, pause: Duration) {
    let wake = (Instant::now() + pause).min(deadline);
    tokio::time::sleep_until(wake).await;
}
