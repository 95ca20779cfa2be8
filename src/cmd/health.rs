//! `gangway health [--http ADDR] [--timeout D] [PATH]`: one HTTP GET against a replica's HTTP port,
//! exit 0 on `200 OK`.
//!
//! Why it exists: the container image holds only the `gangway` binary and the libraries it links
//! (no curl, no wget), and a Docker or compose health check must run a program inside the
//! container. The probe speaks just enough HTTP/1.0 for `/readyz` and `/livez` over a plain
//! `TcpStream`, so it needs neither an async runtime nor an HTTP client library.

use clap::Args;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Args, Debug, Clone)]
pub struct HealthArgs {
    /// The replica's HTTP address (its `http` setting).
    #[arg(long, default_value = "127.0.0.1:8101", value_name = "HOST:PORT")]
    pub http: String,
    /// Give up after this long (connect, send and read together, per step).
    #[arg(long, default_value = "2s", value_parser = super::common::parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
    /// The path to ask for: /readyz (a leader is known and this replica has caught up) or /livez.
    #[arg(default_value = "/readyz", value_parser = parse_path)]
    pub path: String,
}

fn parse_path(s: &str) -> Result<String, String> {
    if s.starts_with('/') && !s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "expected a path starting with / and without spaces, got {s:?}"
        ))
    }
}

/// What one probe found.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    /// The first line of the body (`ready: leader 2, applied 40`, `no leader known`, ...).
    detail: String,
}

/// Parses `HTTP/1.x CODE REASON\r\n...\r\n\r\nBODY`.
fn parse_answer(raw: &str) -> Option<Answer> {
    let status_line = raw.lines().next()?;
    let mut parts = status_line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    let status = parts.next()?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some(Answer {
        status,
        detail: body.lines().next().unwrap_or("").trim().to_owned(),
    })
}

fn probe(addr: &str, path: &str, timeout: Duration) -> Result<Answer, String> {
    let targets: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| format!("--http {addr}: {e}"))?
        .collect();
    let target = targets
        .first()
        .ok_or_else(|| format!("--http {addr}: no address"))?;
    let mut stream =
        TcpStream::connect_timeout(target, timeout).map_err(|e| format!("{addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("{addr}: {e}"))?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("{addr}: sending the request: {e}"))?;
    // The answers are a line of text; anything past 64 KiB is not a health answer.
    let mut raw = Vec::new();
    stream
        .take(64 * 1024)
        .read_to_end(&mut raw)
        .map_err(|e| format!("{addr}: reading the answer: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    parse_answer(&text).ok_or_else(|| format!("{addr}: not an HTTP answer"))
}

/// Prints one line (`200 ready: leader 2, applied 40`) and exits 0 on 200, 1 otherwise.
pub fn run(args: HealthArgs) -> ExitCode {
    match probe(&args.http, &args.path, args.timeout) {
        Ok(a) if a.status == 200 => {
            println!("{} {}", a.status, a.detail);
            ExitCode::SUCCESS
        }
        Ok(a) => {
            eprintln!("{} {}", a.status, a.detail);
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_from_status_line_and_body() {
        let ok = "HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nready: leader 2, applied 40\n";
        assert_eq!(
            parse_answer(ok),
            Some(Answer {
                status: 200,
                detail: "ready: leader 2, applied 40".into()
            })
        );
        let unready = "HTTP/1.1 503 Service Unavailable\r\n\r\nno leader known\n";
        assert_eq!(parse_answer(unready).unwrap().status, 503);
        assert_eq!(parse_answer("SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_answer(""), None);
    }

    #[test]
    fn paths_must_be_absolute_and_one_word() {
        assert!(parse_path("/readyz").is_ok());
        assert!(parse_path("readyz").is_err());
        assert!(parse_path("/ready z").is_err());
    }

    #[test]
    fn a_closed_port_is_an_error_not_a_panic() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let err = probe(
            &format!("127.0.0.1:{port}"),
            "/readyz",
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(err.contains(&port.to_string()), "{err}");
    }

    #[test]
    fn a_served_answer_is_read_back() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).unwrap();
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            s.write_all(b"HTTP/1.0 503 Service Unavailable\r\n\r\nno leader known\n")
                .unwrap();
            req
        });
        let a = probe(&addr, "/readyz", Duration::from_secs(2)).unwrap();
        assert_eq!(a.status, 503);
        assert_eq!(a.detail, "no leader known");
        assert!(server
            .join()
            .unwrap()
            .starts_with("GET /readyz HTTP/1.0\r\n"));
    }
}
