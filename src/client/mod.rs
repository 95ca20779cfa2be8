//! A leader-following client for the Gangway client API.
//!
//! A [`Client`] holds the replica addresses people gave (`--addr`) and at most one open connection.
//! [`Client::call`] runs one RPC and decides, from what the failure means
//! ([`gangway_proto::link::classify`], the rules the worker follows too), what to do next:
//!
//! * [`Retry::FollowLeader`] (`not_leader` with an `x-gangway-leader: host:port` hint): reconnect
//!   to the leader (even when it is not in the list) and resend at once. The request was not
//!   proposed, so this is always safe.
//! * [`Retry::AnotherReplica`] (`not_leader` without a hint, `no_leader`, or a replica that cannot
//!   be reached): try the next address after a backoff (100 ms doubling to 1 s). Always safe.
//! * [`Retry::OutcomeUnknown`] (`unavailable`, `timeout`, or a call that broke without a code): the
//!   request may or may not have been applied. Only calls that are safe to resend
//!   ([`Resend::Safe`]: reads, absolute sets, and submit, which carries an idempotency key) go on;
//!   the others fail with [`ClientError::OutcomeUnknown`].
//! * [`Retry::After`] (`resource_exhausted` with the server's hint: a full queue): waits as asked
//!   and sends again, while the deadline allows; then returns the refusal.
//! * [`Retry::GiveUp`]: returns at once.
//!
//! A call that is safe to resend gives one replica at most a third of the deadline (at least 5 s)
//! before moving on, so a replica that accepts connections and then hangs does not use all of it; a
//! call that is not waits until the deadline and then reports an unknown outcome.
//!
//! Everything stops at the deadline (`--timeout`), with [`ClientError::NoLeader`] (exit code 5).

mod addr;
mod api;
pub mod credentials;
mod error;
#[cfg(test)]
mod tests;

pub use addr::{display_addr, parse_addr_list};
pub use error::{ClientError, EXIT_INVALID};
pub use gangway_proto::link::normalize_addr;

use gangway_proto::link::{classify, metadata_str, Replicas, Retry, CODE_KEY, LEADER_KEY};
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::Endpoint;

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
pub enum Resend {
    /// Resending cannot apply the change twice: reads, absolute sets, submit with its idempotency key.
    Safe,
    /// Resend only when the request was certainly not proposed (`not_leader`, `no_leader`, connect
    /// failures); an unknown outcome is reported as [`ClientError::OutcomeUnknown`].
    UnlessOutcomeUnknown,
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
    api: credentials::Api,
}

/// A leader-following client: see the module documentation.
pub struct Client {
    /// Which replica to connect to when there is no connection.
    replicas: Replicas,
    timeout: Duration,
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
            replicas: Replicas::new(addrs),
            timeout,
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
        self.replicas.advance();
    }

    async fn connect(&mut self, remaining: Duration) -> Result<&Conn, (String, String)> {
        if self.conn.is_none() {
            let uri = self.replicas.target().to_owned();
            let endpoint = Endpoint::from_shared(uri.clone())
                .map_err(|e| (uri.clone(), format!("bad address: {e}")))?
                .connect_timeout(remaining.min(CONNECT_TIMEOUT))
                .tcp_nodelay(true);
            let creds = credentials::current();
            let channel = match tokio::time::timeout(remaining, creds.connect(&endpoint)).await {
                Ok(Ok(channel)) => channel,
                Ok(Err(e)) => return Err((uri, format!("cannot connect: {}", error_chain(&e)))),
                Err(_) => return Err((uri, "cannot connect: timed out".to_owned())),
            };
            self.conn = Some(Conn {
                uri,
                api: creds.api(channel),
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
        resend: Resend,
        mut f: F,
    ) -> Result<T, ClientError>
    where
        F: FnMut(credentials::Api) -> Fut,
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
            let limit = match resend {
                Resend::Safe => remaining.min(self.attempt_timeout),
                Resend::UnlessOutcomeUnknown => remaining,
            };
            let status = match tokio::time::timeout(limit, f(api)).await {
                Ok(Ok(reply)) => return Ok(reply.into_inner()),
                Ok(Err(status)) => status,
                Err(_) => {
                    let message = format!(
                        "no answer within {}",
                        humantime::format_duration(round_ms(limit))
                    );
                    match resend {
                        Resend::Safe => {
                            last = format!("{addr}: {message}");
                            self.advance();
                            continue;
                        }
                        Resend::UnlessOutcomeUnknown => {
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
                retry @ (Retry::FollowLeader(_) | Retry::AnotherReplica) => {
                    self.conn = None;
                    let followed = self.replicas.failed(&retry);
                    hops += u32::from(followed);
                    if !followed || hops > FREE_HINT_HOPS {
                        sleep_until_or(deadline, backoff.take()).await;
                    }
                }
                Retry::OutcomeUnknown => match resend {
                    Resend::Safe => {
                        self.advance();
                        sleep_until_or(deadline, backoff.take()).await;
                    }
                    Resend::UnlessOutcomeUnknown => {
                        return Err(ClientError::OutcomeUnknown {
                            addr,
                            method,
                            message: describe(&status),
                        })
                    }
                },
                // Refused for now (a full queue): wait as the server asks, within the deadline.
                Retry::After(wait) if Instant::now() + wait < deadline => {
                    eprintln!(
                        "{addr}: {}; retrying in {}",
                        status.message(),
                        humantime::format_duration(round_ms(wait))
                    );
                    tokio::time::sleep(wait).await;
                }
                Retry::After(_) | Retry::GiveUp => {
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
