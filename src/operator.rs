//! The operator's control socket: `herdsman status`, `herdsman reload`, `herdsman scale N`
//! talking to a running master, the way `gunicornc` or `pumactl` do.
//!
//! The socket is a Unix socket owned by the master. By default it is a Linux *abstract* socket
//! named after the port (`@herdsman-8080`): it needs no writable directory, which a scratch
//! image with a read-only root filesystem does not have, and `docker exec <container> /herdsman
//! status` reaches it because it shares the container's network namespace. `--socket PATH`
//! (`HERDSMAN_CONTROL_SOCKET`) puts it in the file system instead. Abstract sockets have no file
//! permissions, so the master checks each peer's uid (`SO_PEERCRED`): only its own user, or root,
//! is served.
//!
//! The protocol is one JSON [`Request`] line from the client and one JSON [`Reply`] line back.
//! This module holds the protocol, the address and the client; the master's side is in
//! `master/operator.rs`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{SocketAddr, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{Config, MAX_WORKERS};

/// How long a client waits for the master's answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request line the master reads.
pub const MAX_REQUEST_BYTES: u64 = 1024;

/// What an operator asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// A rolling restart, as SIGHUP.
    Reload,
    /// Run this many workers from now on.
    Scale {
        workers: usize,
    },
}

/// The master's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Status(StatusReport),
    Done(String),
    Refused(String),
}

/// What `herdsman status` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub master_pid: u32,
    /// `starting`, `running`, `stopping (graceful)`, `stopping (fast)`.
    pub phase: String,
    /// The worker count the master keeps (`WEB_CONCURRENCY`, then `scale` and SIGTTIN/SIGTTOU).
    pub target_workers: usize,
    pub workers: Vec<WorkerReport>,
    /// Each worker's memory line (`HERDSMAN_MAX_WORKER_MEMORY`) in bytes; none when it is off.
    #[serde(default)]
    pub memory_line_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerReport {
    pub serial: u64,
    pub pid: i32,
    /// `booting`, `serving`, `replacing` (serving until its successor is ready), `draining`,
    /// `aborting`, `killed`.
    pub state: String,
    pub age_seconds: f64,
    /// Requests answered, from the metrics table; none without one.
    pub requests_served: Option<u64>,
    pub in_flight: Option<i64>,
    pub heartbeat_age_seconds: f64,
    /// Resident memory, from `/proc`; none if it could not be read.
    pub rss_bytes: Option<u64>,
    /// Its own memory (PSS), as the memory line measures it; none if it could not be read.
    #[serde(default)]
    pub own_memory_bytes: Option<u64>,
    /// Whether its Redis circuit breaker is open (it serves from memory), from the metrics
    /// table; none without one. Anonymous `/health` callers are not told this; the operator is.
    #[serde(default)]
    pub breaker_open: Option<bool>,
}

/// Why a command could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("no herdsman master answers on {socket} ({why}); is it running, with the same PORT or --socket?")]
    Unreachable { socket: String, why: std::io::Error },
    #[error("the master at {socket} did not answer properly: {why}")]
    BadAnswer { socket: String, why: String },
    #[error("the master refused: {0}")]
    Refused(String),
}

/// Where a master's control socket is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketName {
    /// A Linux abstract socket: no file, gone with the master.
    Abstract(String),
    Path(PathBuf),
}

impl SocketName {
    /// `--socket` if given, else the abstract name derived from `port` (the port the master
    /// bound: with `PORT=0`, the one it picked).
    pub fn for_master(config: &Config, port: u16) -> SocketName {
        match &config.control_socket {
            Some(path) => SocketName::Path(path.clone()),
            None => SocketName::Abstract(format!("herdsman-{port}")),
        }
    }

    pub fn address(&self) -> std::io::Result<SocketAddr> {
        match self {
            SocketName::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name.as_bytes())
            }
            SocketName::Path(path) => SocketAddr::from_pathname(path),
        }
    }
}

impl std::fmt::Display for SocketName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SocketName::Abstract(name) => write!(f, "@{name}"),
            SocketName::Path(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Parses `scale`'s argument: the one-line error of a bad setting, exit 2.
pub fn parse_worker_count(raw: &str) -> Result<usize, String> {
    match raw.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_WORKERS).contains(&n) => Ok(n),
        _ => Err(format!("invalid N={raw:?}: expected an integer from 1 to {MAX_WORKERS}")),
    }
}

/// Sends `request` to the master at `socket` and returns its answer.
pub fn send(socket: &SocketName, request: &Request) -> Result<Reply, OperatorError> {
    let unreachable = |why| OperatorError::Unreachable { socket: socket.to_string(), why };
    let bad = |why: String| OperatorError::BadAnswer { socket: socket.to_string(), why };
    let address = socket.address().map_err(unreachable)?;
    let mut stream = UnixStream::connect_addr(&address).map_err(unreachable)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(unreachable)?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT)).map_err(unreachable)?;
    let mut line = serde_json::to_string(request).map_err(|e| bad(e.to_string()))?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(unreachable)?;
    let mut answer = String::new();
    BufReader::new(stream).take(1 << 20).read_line(&mut answer).map_err(|e| bad(e.to_string()))?;
    if answer.is_empty() {
        return Err(bad("it closed the connection without a word (a user it does not serve?)".into()));
    }
    match serde_json::from_str(&answer).map_err(|e| bad(e.to_string()))? {
        Reply::Refused(why) => Err(OperatorError::Refused(why)),
        reply => Ok(reply),
    }
}

/// `herdsman status` for people.
pub fn format_status(report: &StatusReport) -> String {
    let mut out = format!(
        "master pid {}, {}, {} workers (target {})\n",
        report.master_pid,
        report.phase,
        report.workers.len(),
        report.target_workers
    );
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let mib = |bytes: u64| format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64);
    if let Some(line) = report.memory_line_bytes {
        out.push_str(&format!("workers over {} of their own memory (PSS) are replaced\n", mib(line)));
    }
    out.push_str(&format!(
        "{:>6} {:>8} {:<9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:<8}\n",
        "SERIAL", "PID", "STATE", "AGE", "REQUESTS", "IN-FLIGHT", "HEARTBEAT", "RSS", "PSS", "BREAKER"
    ));
    for w in &report.workers {
        out.push_str(&format!(
            "{:>6} {:>8} {:<9} {:>8.1}s {:>9} {:>9} {:>8.1}s {:>10} {:>10} {:<8}\n",
            w.serial,
            w.pid,
            w.state,
            w.age_seconds,
            or_dash(w.requests_served.map(|n| n.to_string())),
            or_dash(w.in_flight.map(|n| n.to_string())),
            w.heartbeat_age_seconds,
            or_dash(w.rss_bytes.map(mib)),
            or_dash(w.own_memory_bytes.map(mib)),
            or_dash(w.breaker_open.map(|open| if open { "open" } else { "closed" }.to_string())),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_survive_the_wire() {
        for request in [Request::Status, Request::Reload, Request::Scale { workers: 3 }] {
            let line = serde_json::to_string(&request).unwrap();
            assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), request);
        }
        assert_eq!(
            serde_json::to_string(&Request::Scale { workers: 3 }).unwrap(),
            r#"{"command":"scale","workers":3}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"command":"rm -rf"}"#).is_err());
    }

    #[test]
    fn a_worker_count_outside_1_to_512_is_one_clear_line() {
        assert_eq!(parse_worker_count("3"), Ok(3));
        for bad in ["0", "513", "-1", "three", ""] {
            let error = parse_worker_count(bad).unwrap_err();
            assert!(error.starts_with(&format!("invalid N={bad:?}: expected an integer from 1 to 512")), "{error}");
        }
    }

    #[test]
    fn the_default_socket_is_abstract_and_named_after_the_port() {
        let name = SocketName::for_master(&Config::default(), 8080);
        assert_eq!(name.to_string(), "@herdsman-8080");
        assert!(name.address().is_ok());
    }
}
