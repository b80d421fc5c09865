//! Settings: where they come from, what they mean, and what values they accept.
//!
//! Every setting is one row of the `settings!` table below and has three sources, merged in one
//! visible step ([`Config::resolve`]):
//! a command-line flag (clap) wins over an environment variable (envy), which wins over the
//! default. PaaS platforms configure apps through the environment (`PORT`, `WEB_CONCURRENCY`,
//! `REDIS_URL`), so the variable names are the ones those platforms and gunicorn users know.
//!
//! Both sources are read as plain strings first and parsed by one function per setting, so that
//! a bad value is reported the same way whichever source it came from: one line that names the
//! variable or flag, the value given and what is accepted (see [`ConfigError`]). The process
//! exits with status 2 before it binds anything.
//!
//! The resolved [`Config`] is serialisable: the master hands it to each worker it re-executes,
//! so workers never parse the environment again and can never disagree with their master.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Arg, ArgAction, ArgMatches, Args, FromArgMatches};
use redis::ConnectionAddr;
use serde::{Deserialize, Serialize};

use crate::platform::{self, Detected, Fit, Host};

/// The highest `WEB_CONCURRENCY` accepted: a typo such as `100000` must not fork-bomb a container.
pub const MAX_WORKERS: usize = 512;

/// The longest `HERDSMAN_SESSION_RECHECK` and `HERDSMAN_SESSION_OUTAGE_TRUST`: how long a
/// worker remembers a session at all (`sessions::REMEMBERED_FOR` is this), so trust cannot
/// outlive that memory.
pub const MAX_SESSION_RECHECK: Duration = Duration::from_secs(300);

/// The resolved settings of a herdsman process, master and workers alike. Its `Debug` is
/// `herdsman check`'s view: secrets redacted.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Address to bind. `HERDSMAN_HOST`, default `::` (dual-stack: also accepts IPv4).
    pub host: IpAddr,
    /// Port to bind. `PORT`, default 8080.
    pub port: u16,
    /// Number of worker processes. `WEB_CONCURRENCY`, default: the CPUs this process may use.
    pub workers: usize,
    /// A worker silent this long is aborted. `GUNICORN_TIMEOUT`, default 30 s.
    #[serde(with = "secs")]
    pub timeout: Duration,
    /// How long a new worker may take to start serving. `HERDSMAN_BOOT_TIMEOUT`, default 30 s.
    #[serde(with = "secs")]
    pub boot_timeout: Duration,
    /// Consecutive failed boots, with no worker ever ready, before the master gives up with
    /// exit status 3. `HERDSMAN_BOOT_ATTEMPTS`, default 5.
    pub boot_attempts: u32,
    /// Time in-flight requests get to finish on shutdown. `GRACEFUL_TIMEOUT`, default 25 s:
    /// below the 30 s Heroku, Render and Kubernetes wait before SIGKILL.
    #[serde(with = "secs")]
    pub graceful_timeout: Duration,
    /// Requests a worker serves before it is replaced; 0 disables. `MAX_REQUESTS`, default 0.
    pub max_requests: u64,
    /// Up to this many requests are added at random to `max_requests` per worker, so that workers
    /// do not all recycle at once. `MAX_REQUESTS_JITTER`, default 0.
    pub max_requests_jitter: u64,
    /// A worker whose own memory (PSS) passes this line is replaced the way `max_requests`
    /// replaces one. `HERDSMAN_MAX_WORKER_MEMORY`, default unset (off); fitted to 80 % of the
    /// memory limit where a platform and a limit are detected (see [`MemoryLine`]).
    pub max_worker_memory: Option<MemoryLine>,
    /// A handler running longer is answered 503. `HERDSMAN_REQUEST_TIMEOUT`, default 30 s
    /// (Heroku's router gives up at 30 s anyway).
    #[serde(with = "secs")]
    pub request_timeout: Duration,
    /// A client must send a request's headers within this time of its first byte (of the accept,
    /// for a connection's first request). `HERDSMAN_HEADER_TIMEOUT`, default 10 s: a slow-loris
    /// connection must not hold a worker's connection slot for long.
    #[serde(with = "secs")]
    pub header_timeout: Duration,
    /// An idle keep-alive connection is closed after this long without a request.
    /// `HERDSMAN_KEEPALIVE_TIMEOUT`, default 95 s: above the 90 s Heroku's router keeps idle
    /// connections to a dyno (and the 60 s of an AWS ALB), so the router always closes first
    /// and never sends a request into a socket herdsman is closing.
    #[serde(with = "secs")]
    pub keepalive_timeout: Duration,
    /// Request bodies above this size are answered 413. `HERDSMAN_MAX_BODY_BYTES`, default 1 MiB.
    pub max_body_bytes: usize,
    /// `text` or `json`. `LOG_FORMAT`, default `text`.
    pub log_format: LogFormat,
    /// A tracing filter (`info`, `debug`, `herdsman=debug,warn`). `LOG_LEVEL`, default `info`.
    pub log_level: String,
    /// Redis for the cache and the user store; none means memory only. `REDIS_URL`.
    pub redis_url: Option<String>,
    /// Accept a `rediss://` server's certificate without verifying it (Heroku Redis presents a
    /// self-signed one). `REDIS_TLS_INSECURE`, default false.
    pub redis_tls_insecure: bool,
    /// A PEM file of the CAs a `rediss://` server's certificate must chain to, instead of the
    /// built-in web roots; checked at start (see [`read_ca_certificates`]). `REDIS_CA_CERT`.
    pub redis_ca_cert: Option<PathBuf>,
    /// `/ready` waits for Redis. `REDIS_REQUIRED`, default false.
    pub redis_required: bool,
    /// Bound on one Redis command: a late reply is waited for this long while Redis answers
    /// PING, then that command alone fails (the breaker opens for a Redis that does not answer).
    /// `HERDSMAN_REDIS_TIMEOUT`, default 0.25 s.
    #[serde(with = "secs")]
    pub redis_timeout: Duration,
    /// The shortest a Redis round trip's deadline gets: the deadline follows the latency
    /// Redis has shown, from this up to `redis_timeout` (see `cache::deadline`); above
    /// `redis_timeout` it is `redis_timeout`, so lowering that alone never needs this too.
    /// `HERDSMAN_REDIS_MIN_TIMEOUT`, default 0.02 s.
    #[serde(with = "secs")]
    pub redis_min_timeout: Duration,
    /// Bound on each warm-up task. `STARTUP_OPERATION_TIMEOUT`, default 2 s.
    #[serde(with = "secs")]
    pub startup_operation_timeout: Duration,
    /// Longest wait between two attempts of a required warm-up task that failed or timed out;
    /// the waits start at 1 s and double up to this. `HERDSMAN_WARMUP_RETRY_MAX`, default 30 s.
    #[serde(with = "secs")]
    pub warmup_retry_max: Duration,
    /// bcrypt cost for passwords. `BCRYPT_COST`, default 10 (4 to 31).
    pub bcrypt_cost: u32,
    /// Keys loaded from Redis into memory at boot. `CACHE_WARM_KEYS`, comma-separated.
    pub cache_warm_keys: Vec<String>,
    /// Bytes (keys and values) the in-memory cache holds at most per worker, as much again for
    /// writes waiting to be replayed to Redis, and as much again for `/cache` values in transit
    /// to and from clients. `HERDSMAN_CACHE_MAX_BYTES`, default 64 MiB.
    pub cache_max_bytes: u64,
    /// Lifetime of a value stored over HTTP without `?ttl=`. `HERDSMAN_CACHE_DEFAULT_TTL`,
    /// default 1 h: nothing a client stores lives for ever by accident.
    #[serde(with = "secs")]
    pub cache_default_ttl: Duration,
    /// The longest `?ttl=` accepted (longer is 400), and how long a delete's tombstone stays in
    /// Redis (docs/consistency.md). `HERDSMAN_CACHE_MAX_TTL`, default 1 day.
    #[serde(with = "secs")]
    pub cache_max_ttl: Duration,
    /// The port of the master's Prometheus `/metrics`; none means no metrics port.
    /// `HERDSMAN_METRICS_PORT`, default unset.
    pub metrics_port: Option<u16>,
    /// A bearer token that opens `/metrics` on the main port too; none keeps that route hidden
    /// (404). `HERDSMAN_METRICS_TOKEN`, default unset; at least 16 characters.
    pub metrics_token: Option<String>,
    /// Where the master's control socket is (`herdsman status`, `reload`, `scale`); none means
    /// the abstract socket `@herdsman-PORT`. `HERDSMAN_CONTROL_SOCKET`, default unset.
    pub control_socket: Option<PathBuf>,
    /// How long a login token stays valid. `HERDSMAN_SESSION_TTL`, default 1 h: a stolen token
    /// is good for an hour at most, and a client logs in again at the cost of one bcrypt.
    #[serde(with = "secs")]
    pub session_ttl: Duration,
    /// How long a worker trusts a session it verified in Redis before asking again, while its
    /// subscription to revocations is live (`crate::sessions`): a logout reaches every worker
    /// through that subscription at once, and this bounds what a revocation that bypasses it
    /// (a session key deleted in Redis by hand) takes. `HERDSMAN_SESSION_RECHECK`, default 10 s;
    /// 0 asks Redis on every request.
    #[serde(with = "secs")]
    pub session_recheck: Duration,
    /// How long after its last verification in Redis a worker still accepts a session while
    /// Redis cannot be asked (`crate::sessions`): rides out a failover's few seconds, and
    /// bounds how long a token revoked meanwhile keeps working in a worker cut off from Redis.
    /// `HERDSMAN_SESSION_OUTAGE_TRUST`, default 30 s; 0 refuses every session (503) in an outage.
    #[serde(with = "secs")]
    pub session_outage_trust: Duration,
    /// Proxies in front of this server that append to `X-Forwarded-For` (see
    /// [`crate::http::client_addr`]). `HERDSMAN_TRUSTED_PROXIES`, default 0: the TCP peer.
    pub trusted_proxies: usize,
    /// Login and registration attempts per minute per account (a token bucket of that size).
    /// `HERDSMAN_AUTH_LIMIT_ACCOUNT`, default 10.
    pub auth_limit_account: u32,
    /// Login and registration attempts per minute per client address.
    /// `HERDSMAN_AUTH_LIMIT_ADDRESS`, default 60 (offices and mobile carriers share addresses).
    pub auth_limit_address: u32,
    /// Keys one user may hold in the cache over HTTP. `HERDSMAN_USER_MAX_KEYS`, default 1000.
    pub user_max_keys: u64,
    /// Bytes of values one user may hold in the cache over HTTP. `HERDSMAN_USER_MAX_BYTES`,
    /// default 16 MiB.
    pub user_max_bytes: u64,
    /// One log line per answered request. `HERDSMAN_ACCESS_LOG`, default false: the platforms'
    /// routers already log each request (see [`crate::http::access_log`]).
    pub access_log: bool,
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The smallest per-worker memory line accepted: a fresh worker uses a few MiB of its own, and a
/// line it starts above would replace every worker as soon as it is ready.
pub const MIN_WORKER_MEMORY: u64 = 16 << 20;

/// `HERDSMAN_MAX_WORKER_MEMORY`: how much of its own memory a worker may use before it is
/// replaced. Travels to the workers (and shows in `herdsman check`) as text: `512MiB`,
/// `80% of 1GiB`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum MemoryLine {
    /// The same line for every worker.
    Bytes(u64),
    /// `percent` of the container's memory (`limit` bytes: its cgroup limit, else the machine's
    /// memory), shared equally among the workers running: scaling changes each one's line.
    Share { percent: f64, limit: u64 },
}

impl MemoryLine {
    /// The line for each of `workers` workers.
    pub fn per_worker(self, workers: usize) -> u64 {
        match self {
            MemoryLine::Bytes(bytes) => bytes,
            MemoryLine::Share { percent, limit } => (limit as f64 * percent / 100.0 / workers.max(1) as f64) as u64,
        }
    }
}

impl From<MemoryLine> for String {
    fn from(line: MemoryLine) -> String {
        match line {
            MemoryLine::Bytes(bytes) => format_size(bytes),
            MemoryLine::Share { percent, limit } => format!("{percent}% of {}", format_size(limit)),
        }
    }
}

impl TryFrom<String> for MemoryLine {
    type Error = String;

    fn try_from(text: String) -> Result<MemoryLine, String> {
        let bad = || format!("not a memory line: {text:?}");
        match text.split_once("% of ") {
            Some((percent, limit)) => Ok(MemoryLine::Share {
                percent: percent.parse().map_err(|_| bad())?,
                limit: parse_size(limit).ok_or_else(bad)?,
            }),
            None => parse_size(&text).map(MemoryLine::Bytes).ok_or_else(bad),
        }
    }
}

/// A size in bytes: a number, optionally decimal, and a unit: none or `B`; `K`, `M`, `G`, `T`
/// (with or without a `B`) are powers of 1000, `Ki`, `Mi`, `Gi`, `Ti` (with or without a `B`)
/// powers of 1024, as Kubernetes writes them. Case does not matter.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit.strip_suffix('b').unwrap_or(&unit);
    let scale: f64 = match unit {
        "" => 1.0,
        "k" => 1e3,
        "m" => 1e6,
        "g" => 1e9,
        "t" => 1e12,
        "ki" => 1024.0,
        "mi" => 1024.0 * 1024.0,
        "gi" => 1024.0 * 1024.0 * 1024.0,
        "ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let bytes = number * scale;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// Bytes as [`parse_size`] reads them back: whole MiB or GiB with their unit, else plain bytes.
pub fn format_size(bytes: u64) -> String {
    match bytes {
        0 => "0".into(),
        b if b % (1 << 30) == 0 => format!("{}GiB", b >> 30),
        b if b % (1 << 20) == 0 => format!("{}MiB", b >> 20),
        b => b.to_string(),
    }
}

/// A setting whose value could not be accepted. Displayed as the single line the process prints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {source_name}={value:?}: expected {expected}")]
pub struct ConfigError {
    /// The variable (`PORT`) or the flag (`--port`) the value came from.
    pub source_name: String,
    pub value: String,
    pub expected: String,
}

/// One setting's command-line flag: every flag takes one value, may come before or after the
/// subcommand (`global`), and may start with `-` (a negative number is the setting's parser's
/// to refuse, with its own message).
struct FlagSpec {
    /// The [`Config`] field: clap's id for the flag.
    id: &'static str,
    long: &'static str,
    short: Option<char>,
    value_name: &'static str,
    help: &'static str,
}

impl FlagSpec {
    fn arg(&self) -> Arg {
        Arg::new(self.id)
            .long(self.long)
            .short(self.short)
            .value_name(self.value_name)
            .help(self.help)
            .action(ArgAction::Set)
            .value_parser(clap::value_parser!(String))
            .global(true)
            .allow_hyphen_values(true)
    }
}

impl Args for Flags {
    fn augment_args(command: clap::Command) -> clap::Command {
        FLAG_SPECS.iter().fold(command, |command, spec| command.arg(spec.arg()))
    }

    fn augment_args_for_update(command: clap::Command) -> clap::Command {
        Self::augment_args(command)
    }
}

/// The value given for flag `id`, if any.
fn flag_value(matches: &ArgMatches, id: &str) -> Result<Option<String>, clap::Error> {
    matches
        .try_get_one::<String>(id)
        .map(|value| value.cloned())
        .map_err(|e| clap::Error::raw(clap::error::ErrorKind::InvalidValue, format!("--{id}: {e}\n")))
}

/// The one table of settings: for each, the [`Config`] field, the environment variable, the
/// flag, the flag's value name, the help line, the default and the parser. Adding a setting is
/// a field in `Config` and a row here; the flags, `--help`, the environment lookup and
/// `herdsman check` all come from this table.
macro_rules! settings {
    (@short) => { None };
    (@short $short:literal) => { Some($short) };
    ($( $field:ident, $var:literal, $flag:literal $(short $short:literal)?, $value_name:literal,
        $help:literal, default $default:expr, parse $parse:expr; )*) => {
        /// Settings given as flags. Every value is a string so that [`Config::resolve`] parses
        /// flags and variables with the same code and the same messages.
        #[derive(Debug, Default, Clone)]
        pub struct Flags {
            $( pub $field: Option<String>, )*
        }

        /// Every setting's flag, in table order: clap builds them in one loop ([`FlagSpec::arg`])
        /// rather than one derived block of code per flag (90 kB of the binary at opt-level 2).
        const FLAG_SPECS: &[FlagSpec] = &[$(FlagSpec {
            id: stringify!($field),
            long: $flag,
            short: settings!(@short $($short)?),
            value_name: $value_name,
            help: concat!($help, " [env: ", $var, "]"),
        }),*];

        impl FromArgMatches for Flags {
            fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
                let mut flags = Flags::default();
                flags.update_from_arg_matches(matches)?;
                Ok(flags)
            }

            fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
                $( if let Some(value) = flag_value(matches, stringify!($field))? { self.$field = Some(value); } )*
                Ok(())
            }
        }

        /// `(variable, Config field)` for every setting, in table order.
        const VARIABLES: &[(&str, &str)] = &[$(($var, stringify!($field))),*];

        /// `(variable, flag)` for every setting, in table order.
        const FLAG_NAMES: &[(&str, &str)] = &[$(($var, $flag)),*];

        fn resolve_table(
            flags: &Flags,
            env: &HashMap<String, String>,
            fits: &HashMap<&'static str, Fit>,
        ) -> Result<(Config, Vec<(&'static str, Source)>), ConfigError> {
            let mut sources = Vec::with_capacity(VARIABLES.len());
            let config = Config {
                $( $field: {
                    let (raw, source) = pick(&flags.$field, $flag, env, $var, fits);
                    sources.push(($var, source));
                    match raw {
                        Some(raw) => ($parse)(&raw)?,
                        None => $default,
                    }
                }, )*
            };
            Ok((config, sources))
        }
    };
}

settings! {
    host, "HERDSMAN_HOST", "host", "ADDR",
        "Address to bind [default: ::, which accepts IPv6 and IPv4]",
        default IpAddr::V6(Ipv6Addr::UNSPECIFIED), parse Raw::ip;
    port, "PORT", "port" short 'p', "PORT",
        "Port to bind [default: 8080]",
        default 8080, parse |r: &Raw| r.integer(0u16, 65535);
    workers, "WEB_CONCURRENCY", "workers" short 'w', "N",
        "Worker processes, 1 to 512 [default: the CPUs available]",
        default default_workers(), parse |r: &Raw| r.integer(1usize, MAX_WORKERS);
    timeout, "GUNICORN_TIMEOUT", "timeout" short 't', "SECONDS",
        "Seconds a worker may stay silent before it is aborted [default: 30]",
        default Duration::from_secs(30), parse Raw::seconds;
    boot_timeout, "HERDSMAN_BOOT_TIMEOUT", "boot-timeout", "SECONDS",
        "Seconds a new worker may take to start serving [default: 30]",
        default Duration::from_secs(30), parse Raw::seconds;
    boot_attempts, "HERDSMAN_BOOT_ATTEMPTS", "boot-attempts", "N",
        "Failed boots, with no worker ever ready, before exit status 3 [default: 5]",
        default 5, parse |r: &Raw| r.integer(1u32, 1000);
    graceful_timeout, "GRACEFUL_TIMEOUT", "graceful-timeout", "SECONDS",
        "Seconds in-flight requests get on shutdown [default: 25]",
        default Duration::from_secs(25), parse Raw::seconds;
    max_requests, "MAX_REQUESTS", "max-requests", "N",
        "Requests before a worker is replaced, 0 = never [default: 0]",
        default 0, parse |r: &Raw| r.integer(0u64, u64::MAX / 2);
    max_requests_jitter, "MAX_REQUESTS_JITTER", "max-requests-jitter", "N",
        "Up to this many extra requests per worker, at random [default: 0]",
        default 0, parse |r: &Raw| r.integer(0u64, u64::MAX / 2);
    max_worker_memory, "HERDSMAN_MAX_WORKER_MEMORY", "max-worker-memory", "SIZE",
        "Replace a worker whose own memory (PSS) passes this: bytes (512MiB, 400M) or a percentage of the memory limit shared among the workers (80%); off = never [default: off]",
        default None, parse Raw::memory_line;
    request_timeout, "HERDSMAN_REQUEST_TIMEOUT", "request-timeout", "SECONDS",
        "Seconds a handler may run before the client gets 503 [default: 30]",
        default Duration::from_secs(30), parse Raw::seconds;
    header_timeout, "HERDSMAN_HEADER_TIMEOUT", "header-timeout", "SECONDS",
        "Seconds a client may take to send its request headers [default: 10]",
        default Duration::from_secs(10), parse Raw::seconds;
    keepalive_timeout, "HERDSMAN_KEEPALIVE_TIMEOUT", "keepalive-timeout", "SECONDS",
        "Seconds an idle keep-alive connection stays open between requests [default: 95]",
        default Duration::from_secs(95), parse Raw::seconds;
    max_body_bytes, "HERDSMAN_MAX_BODY_BYTES", "max-body-bytes", "BYTES",
        "Largest request body [default: 1048576]",
        default 1 << 20, parse |r: &Raw| r.integer(1usize, 1 << 30);
    log_format, "LOG_FORMAT", "log-format", "FORMAT",
        "text or json [default: text]",
        default LogFormat::Text, parse Raw::log_format;
    log_level, "LOG_LEVEL", "log-level", "FILTER",
        "Log filter such as info or herdsman=debug,warn [default: info]",
        default "info".to_string(), parse Raw::log_filter;
    redis_url, "REDIS_URL", "redis-url", "URL",
        "redis:// or rediss:// URL; unset means an in-memory cache only [default: unset]",
        default None, parse Raw::redis_url;
    redis_tls_insecure, "REDIS_TLS_INSECURE", "redis-tls-insecure", "BOOL",
        "Accept a rediss:// server's certificate unverified, as Heroku Redis needs [default: false]",
        default false, parse Raw::boolean;
    redis_ca_cert, "REDIS_CA_CERT", "redis-ca-cert", "PATH",
        "PEM file of the CAs a rediss:// server's certificate must chain to [default: the web's roots]",
        default None, parse Raw::ca_certificates;
    redis_required, "REDIS_REQUIRED", "redis-required", "BOOL",
        "/ready waits for Redis: true or false [default: false]",
        default false, parse Raw::boolean;
    redis_timeout, "HERDSMAN_REDIS_TIMEOUT", "redis-timeout", "SECONDS",
        "Seconds one Redis command may take at most, while Redis answers PING [default: 0.25]",
        default Duration::from_millis(250), parse Raw::seconds;
    redis_min_timeout, "HERDSMAN_REDIS_MIN_TIMEOUT", "redis-min-timeout", "SECONDS",
        "Shortest Redis deadline: it follows Redis's observed latency from this up to HERDSMAN_REDIS_TIMEOUT [default: 0.02]",
        default Duration::from_millis(20), parse Raw::seconds;
    startup_operation_timeout, "STARTUP_OPERATION_TIMEOUT", "startup-operation-timeout", "SECONDS",
        "Seconds each warm-up task may take [default: 2]",
        default Duration::from_secs(2), parse Raw::seconds;
    warmup_retry_max, "HERDSMAN_WARMUP_RETRY_MAX", "warmup-retry-max", "SECONDS",
        "Longest wait between retries of a failed required warm-up, from 1 s doubling [default: 30]",
        default Duration::from_secs(30), parse Raw::seconds;
    bcrypt_cost, "BCRYPT_COST", "bcrypt-cost", "COST",
        "bcrypt cost for passwords, 4 to 31 [default: 10]",
        default 10, parse |r: &Raw| r.integer(4u32, 31);
    cache_warm_keys, "CACHE_WARM_KEYS", "cache-warm-keys", "KEYS",
        "Comma-separated keys loaded from Redis into memory at boot [default: none]",
        default Vec::new(), parse Raw::list;
    cache_max_bytes, "HERDSMAN_CACHE_MAX_BYTES", "cache-max-bytes", "BYTES",
        "Bytes of keys and values the in-memory cache holds per worker [default: 67108864]",
        default 64 << 20, parse |r: &Raw| r.integer(1u64 << 10, 1u64 << 40);
    cache_default_ttl, "HERDSMAN_CACHE_DEFAULT_TTL", "cache-default-ttl", "SECONDS",
        "Lifetime of a value stored over HTTP without ?ttl= [default: 3600]",
        default Duration::from_secs(3600), parse Raw::seconds;
    cache_max_ttl, "HERDSMAN_CACHE_MAX_TTL", "cache-max-ttl", "SECONDS",
        "The longest ?ttl= accepted over HTTP; longer is 400 [default: 86400]",
        default Duration::from_secs(86_400), parse Raw::seconds;
    metrics_port, "HERDSMAN_METRICS_PORT", "metrics-port", "PORT",
        "Port of the master's Prometheus /metrics, 0 = any free one; unset means none [default: unset]",
        default None, parse |r: &Raw| r.integer(0u16, 65535).map(Some);
    metrics_token, "HERDSMAN_METRICS_TOKEN", "metrics-token", "TOKEN",
        "Bearer token that opens /metrics on the main port, 16+ characters [default: unset, hidden]",
        default None, parse Raw::token;
    control_socket, "HERDSMAN_CONTROL_SOCKET", "socket", "PATH",
        "Path of the master's control socket [default: the abstract socket @herdsman-PORT]",
        default None, parse Raw::socket_path;
    session_ttl, "HERDSMAN_SESSION_TTL", "session-ttl", "SECONDS",
        "How long a login token stays valid [default: 3600]",
        default Duration::from_secs(3600), parse Raw::seconds;
    session_recheck, "HERDSMAN_SESSION_RECHECK", "session-recheck", "SECONDS",
        "Seconds a worker trusts a session it verified in Redis while it hears revocations; 0 = ask Redis every request [default: 10]",
        default Duration::from_secs(10), parse Raw::recheck_seconds;
    session_outage_trust, "HERDSMAN_SESSION_OUTAGE_TRUST", "session-outage-trust", "SECONDS",
        "Seconds after its last check in Redis a session is still accepted while Redis is away; 0 = none (503) [default: 30]",
        default Duration::from_secs(30), parse Raw::recheck_seconds;
    trusted_proxies, "HERDSMAN_TRUSTED_PROXIES", "trusted-proxies", "N",
        "Proxies in front that append to X-Forwarded-For; 0 = use the TCP peer [default: 0]",
        default 0, parse |r: &Raw| r.integer(0usize, 16);
    auth_limit_account, "HERDSMAN_AUTH_LIMIT_ACCOUNT", "auth-limit-account", "N",
        "Login and register attempts per minute per account [default: 10]",
        default 10, parse |r: &Raw| r.integer(1u32, 1_000_000);
    auth_limit_address, "HERDSMAN_AUTH_LIMIT_ADDRESS", "auth-limit-address", "N",
        "Login and register attempts per minute per client address [default: 60]",
        default 60, parse |r: &Raw| r.integer(1u32, 1_000_000);
    user_max_keys, "HERDSMAN_USER_MAX_KEYS", "user-max-keys", "N",
        "Cache keys one user may hold over HTTP [default: 1000]",
        default 1000, parse |r: &Raw| r.integer(1u64, 1 << 40);
    user_max_bytes, "HERDSMAN_USER_MAX_BYTES", "user-max-bytes", "BYTES",
        "Bytes of cache values one user may hold over HTTP [default: 16777216]",
        default 16 << 20, parse |r: &Raw| r.integer(1u64, 1 << 40);
    access_log, "HERDSMAN_ACCESS_LOG", "access-log", "BOOL",
        "One log line per request: method, path, status, bytes, duration, queue time, client, request ID [default: false]",
        default false, parse Raw::boolean;
}

/// A raw value and where it came from, so a parse error can name its culprit.
struct Raw<'a> {
    source_name: String,
    value: &'a str,
}

impl Raw<'_> {
    fn error(&self, expected: impl Into<String>) -> ConfigError {
        ConfigError { source_name: self.source_name.clone(), value: self.value.to_string(), expected: expected.into() }
    }

    fn integer<T: std::str::FromStr + PartialOrd + fmt::Display>(&self, min: T, max: T) -> Result<T, ConfigError> {
        let expected = || format!("an integer from {min} to {max}");
        match self.value.trim().parse::<T>() {
            Ok(n) if n >= min && n <= max => Ok(n),
            _ => Err(self.error(expected())),
        }
    }

    /// Seconds as a decimal number (`30`, `0.5`), strictly positive and at most a day.
    fn seconds(&self) -> Result<Duration, ConfigError> {
        self.seconds_where(
            |s| s > 0.0 && s <= 86_400.0,
            || "a number of seconds greater than 0 and at most 86400, such as 30 or 0.5".into(),
        )
    }

    /// Seconds from 0 up to [`MAX_SESSION_RECHECK`].
    fn recheck_seconds(&self) -> Result<Duration, ConfigError> {
        let max = MAX_SESSION_RECHECK.as_secs();
        self.seconds_where(
            |s| (0.0..=max as f64).contains(&s),
            || format!("a number of seconds from 0 to {max}, such as 1 or 0.5"),
        )
    }

    /// A finite number of seconds that `accept` takes; `expected` says which, in the error.
    fn seconds_where(
        &self,
        accept: impl Fn(f64) -> bool,
        expected: impl FnOnce() -> String,
    ) -> Result<Duration, ConfigError> {
        match self.value.trim().parse::<f64>() {
            Ok(s) if s.is_finite() && accept(s) => Ok(Duration::from_secs_f64(s)),
            _ => Err(self.error(expected())),
        }
    }

    fn ip(&self) -> Result<IpAddr, ConfigError> {
        let bare = self.value.trim().trim_start_matches('[').trim_end_matches(']');
        bare.parse().map_err(|_| self.error("an IP address such as :: or 0.0.0.0 or 127.0.0.1"))
    }

    fn log_format(&self) -> Result<LogFormat, ConfigError> {
        match self.value.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(self.error("text or json")),
        }
    }

    fn log_filter(&self) -> Result<String, ConfigError> {
        let filter = self.value.trim().to_string();
        parse_log_filter(&filter)
            .map(|_| filter)
            .map_err(|_| self.error("a level (error, warn, info, debug, trace) or a filter such as herdsman=debug"))
    }

    /// The scheme only: the whole URL is parsed once, by [`Config::validate`].
    fn redis_url(&self) -> Result<Option<String>, ConfigError> {
        let url = self.value.trim();
        if url.starts_with("redis://") || url.starts_with("rediss://") {
            return Ok(Some(url.to_string()));
        }
        // The value may hold a password: show only its scheme.
        let shown = url.split_once("://").map_or("(no scheme)", |(scheme, _)| scheme);
        Err(ConfigError {
            source_name: self.source_name.clone(),
            value: format!("{shown}://…"),
            expected: "a redis:// or rediss:// URL".into(),
        })
    }

    /// A path to a PEM file of CA certificates, read and parsed now so that a missing or broken
    /// file stops the master before it binds rather than every worker's cache later.
    fn ca_certificates(&self) -> Result<Option<PathBuf>, ConfigError> {
        let path = PathBuf::from(self.value.trim());
        match read_ca_certificates(&path) {
            Ok(_) => Ok(Some(path)),
            Err(why) => Err(self.error(format!("a readable PEM file of CA certificates ({why})"))),
        }
    }

    /// A secret of at least 16 visible ASCII characters; an error never shows it.
    fn token(&self) -> Result<Option<String>, ConfigError> {
        let token = self.value.trim();
        match token.len() >= 16 && token.bytes().all(|b| b.is_ascii_graphic()) {
            true => Ok(Some(token.to_string())),
            false => Err(ConfigError {
                source_name: self.source_name.clone(),
                value: "***".into(),
                expected: "at least 16 visible ASCII characters (no spaces)".into(),
            }),
        }
    }

    /// A Unix socket path: not empty, and short enough for `sun_path` (107 bytes).
    fn socket_path(&self) -> Result<Option<PathBuf>, ConfigError> {
        let path = self.value.trim();
        match !path.is_empty() && path.len() <= 107 && !path.contains('\0') {
            true => Ok(Some(PathBuf::from(path))),
            false => Err(self.error("a file path of at most 107 bytes")),
        }
    }

    /// `HERDSMAN_MAX_WORKER_MEMORY`: `off`/`0`, a size, or a percentage whose memory limit
    /// [`Config::resolve_on`] fills in.
    fn memory_line(&self) -> Result<Option<MemoryLine>, ConfigError> {
        const EXPECTED: &str = "off, a size from 16MiB to 1TiB such as 512MiB, 400M or 536870912, \
                                or a percentage of the memory limit from 1% to 100% such as 80%";
        let value = self.value.trim();
        if matches!(value.to_ascii_lowercase().as_str(), "off" | "0") {
            return Ok(None);
        }
        if let Some(percent) = value.strip_suffix('%') {
            return match percent.trim().parse::<f64>() {
                Ok(p) if (1.0..=100.0).contains(&p) => Ok(Some(MemoryLine::Share { percent: p, limit: 0 })),
                _ => Err(self.error(EXPECTED)),
            };
        }
        match parse_size(value) {
            Some(bytes) if (MIN_WORKER_MEMORY..=1 << 40).contains(&bytes) => Ok(Some(MemoryLine::Bytes(bytes))),
            _ => Err(self.error(EXPECTED)),
        }
    }

    fn list(&self) -> Result<Vec<String>, ConfigError> {
        Ok(self.value.split(',').map(str::trim).filter(|k| !k.is_empty()).map(String::from).collect())
    }

    fn boolean(&self) -> Result<bool, ConfigError> {
        match self.value.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(self.error("true or false")),
        }
    }
}

/// Picks the flag over the variable over the platform's fit, keeping the name of whichever was
/// used; `None` means the default.
fn pick<'a>(
    flag: &'a Option<String>,
    flag_name: &str,
    env: &'a HashMap<String, String>,
    var: &str,
    fits: &'a HashMap<&'static str, Fit>,
) -> (Option<Raw<'a>>, Source) {
    // envy gives the variables' names in lower case.
    let (value, source) = match (flag, env.get(&var.to_ascii_lowercase()), fits.get(var)) {
        (Some(value), _, _) => (value, Source::Flag),
        (None, Some(value), _) => (value, Source::Environment),
        (None, None, Some(fit)) => (&fit.value, Source::Platform(fit.why.clone())),
        (None, None, None) => return (None, Source::Default),
    };
    (Some(Raw { source_name: source_name(var, flag_name, &source), value }), source)
}

/// How an error names a setting's value by where it came from: `--flag`, `VAR`, or
/// `VAR (fitted to the platform)`.
fn source_name(var: &str, flag: &str, source: &Source) -> String {
    match source {
        Source::Flag => format!("--{flag}"),
        Source::Platform(_) => format!("{var} (fitted to the platform)"),
        Source::Environment | Source::Default => var.to_string(),
    }
}

/// Which of `vars` a cross-setting error names, and how: the first one given as a flag or a
/// variable, else the first one fitted to the platform, else the first; named by
/// [`source_name`], as [`pick`] names a parse error's culprit.
fn blame(sources: &[(&'static str, Source)], vars: &[&'static str]) -> (&'static str, String) {
    let source = |var: &str| sources.iter().find(|(name, _)| *name == var).map(|(_, source)| source);
    let given = |var: &&str| matches!(source(var), Some(Source::Flag | Source::Environment));
    let fitted = |var: &&str| matches!(source(var), Some(Source::Platform(_)));
    let first = vars.first().copied().unwrap_or("setting");
    let var = vars.iter().copied().find(given).or_else(|| vars.iter().copied().find(fitted)).unwrap_or(first);
    let flag = FLAG_NAMES.iter().find(|(name, _)| *name == var).map_or(var, |(_, flag)| *flag);
    (var, source_name(var, flag, source(var).unwrap_or(&Source::Default)))
}

/// Where a setting's value came from, as `herdsman check` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    /// Fitted to the detected platform; the reason.
    Platform(String),
    Environment,
    Flag,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::Platform(why) => write!(f, "platform: {why}"),
            Source::Environment => f.write_str("environment"),
            Source::Flag => f.write_str("flag"),
        }
    }
}

/// A resolved configuration with what explains it: the platform, each value's source, and what
/// to warn about once at start.
#[derive(Debug, Clone)]
pub struct Resolution {
    pub config: Config,
    pub platform: Option<Detected>,
    /// `(VARIABLE, source)` in table order, as [`Config::describe`] lists the values.
    pub sources: Vec<(&'static str, Source)>,
    pub warnings: Vec<String>,
}

impl Resolution {
    /// The source of one variable's value.
    pub fn source(&self, var: &str) -> Option<&Source> {
        self.sources.iter().find(|(name, _)| *name == var).map(|(_, source)| source)
    }
}

impl Config {
    /// Resolves the configuration from flags and an environment given as name/value pairs.
    /// Tests pass their own pairs; [`Config::from_process`] passes the real environment.
    pub fn resolve<I>(flags: &Flags, env: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        Config::resolve_on(flags, env, Host::this_process).map(|resolution| resolution.config)
    }

    /// Resolves the configuration on `host`, with the platform the environment shows and the
    /// source of every value. Flags win over variables, variables over the platform's fitted
    /// defaults (see [`crate::platform`]), those over herdsman's own defaults.
    /// `host` is asked only when a platform is detected.
    pub fn resolve_on<I>(flags: &Flags, env: I, host: impl FnOnce() -> Host) -> Result<Resolution, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        // envy reads the variables (lower-casing their names); empty ones count as unset:
        // `PORT=` in a .env file means "not configured".
        let env: HashMap<String, String> = envy::from_iter(env.into_iter().filter(|(_, v)| !v.trim().is_empty()))
            .map_err(|e| ConfigError {
                source_name: "environment".into(),
                value: e.to_string(),
                expected: "variables holding UTF-8 text".into(),
            })?;
        // The host is read once, and only when something needs it: a platform's fits, or a
        // memory line given as a share of the memory limit.
        let mut read_host = Some(host);
        let mut known_host: Option<Host> = None;
        let mut host = move || -> Host {
            *known_host.get_or_insert_with(|| read_host.take().map_or_else(Host::this_process, |read| read()))
        };
        let platform = platform::detect(&env);
        let fits = platform.as_ref().map(|p| p.fits(&host())).unwrap_or_default();
        let (mut config, sources) = resolve_table(flags, &env, &fits)?;
        if let Some(MemoryLine::Share { percent, .. }) = config.max_worker_memory {
            let limit = host().limits.memory_bytes.or_else(machine_memory).ok_or_else(|| ConfigError {
                source_name: blame(&sources, &["HERDSMAN_MAX_WORKER_MEMORY"]).1,
                value: format!("{percent}%"),
                expected: "a size such as 512MiB: this process has no memory limit and /proc/meminfo is unreadable"
                    .into(),
            })?;
            config.max_worker_memory = Some(MemoryLine::Share { percent, limit });
        }
        config.validate_given(&sources)?;
        let mut resolution = Resolution { config, platform, sources, warnings: Vec::new() };
        if let Some(platform) = &resolution.platform {
            let explicit = matches!(resolution.source("GRACEFUL_TIMEOUT"), Some(Source::Environment | Source::Flag));
            resolution.warnings = platform.warnings(resolution.config.graceful_timeout, explicit);
        }
        Ok(resolution)
    }

    /// The checks that concern the settings together rather than one value, for a `Config`
    /// built by hand: an error names the variable. [`Config::resolve_on`] runs them with the
    /// sources instead, so that the master refuses a configuration before it binds, naming the
    /// setting the user gave, and the workers, which receive the resolved `Config`, never meet
    /// an invalid one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_given(&[])
    }

    /// [`Config::validate`], blaming whichever of two conflicting settings was given (a flag or
    /// a variable) rather than one left at its default: `HERDSMAN_CACHE_MAX_TTL=60` alone is
    /// the culprit against the default TTL, not the default it contradicts.
    fn validate_given(&self, sources: &[(&'static str, Source)]) -> Result<(), ConfigError> {
        let culprit = |vars: &[&'static str]| blame(sources, vars);
        if let Some(url) = &self.redis_url {
            // The one full parse of the URL: the cache builds its connections from the same
            // string in each worker.
            let refuse = |expected: String| ConfigError {
                source_name: culprit(&["REDIS_URL"]).1,
                value: redact_url(url),
                expected,
            };
            match redis::IntoConnectionInfo::into_connection_info(url.as_str()) {
                Err(e) => return Err(refuse(format!("a redis:// or rediss:// URL that parses ({})", e.category()))),
                // A non-special scheme's host is opaque to the URL standard: no IDNA, so a
                // non-ASCII name arrives percent-encoded and no DNS server would ever find it.
                Ok(info) => match info.addr() {
                    ConnectionAddr::Tcp(host, _) | ConnectionAddr::TcpTls { host, .. } if host.contains('%') => {
                        return Err(refuse("an ASCII host name (write an international one in its xn-- form)".into()));
                    }
                    _ => {}
                },
            }
        }
        if self.cache_default_ttl > self.cache_max_ttl {
            let (default_ttl, max_ttl) = (format_seconds(self.cache_default_ttl), format_seconds(self.cache_max_ttl));
            let why = "a value stored without ?ttl= must be storable";
            return Err(match culprit(&["HERDSMAN_CACHE_DEFAULT_TTL", "HERDSMAN_CACHE_MAX_TTL"]) {
                ("HERDSMAN_CACHE_MAX_TTL", source_name) => ConfigError {
                    source_name,
                    value: max_ttl,
                    expected: format!("at least HERDSMAN_CACHE_DEFAULT_TTL ({default_ttl} s): {why}"),
                },
                (_, source_name) => ConfigError {
                    source_name,
                    value: default_ttl,
                    expected: format!("at most HERDSMAN_CACHE_MAX_TTL ({max_ttl} s): {why}"),
                },
            });
        }
        if let Some(line) = self.max_worker_memory {
            let each = line.per_worker(self.workers);
            if each < MIN_WORKER_MEMORY {
                return Err(ConfigError {
                    source_name: culprit(&["HERDSMAN_MAX_WORKER_MEMORY"]).1,
                    value: String::from(line),
                    expected: format!(
                        "a line of at least {} per worker (this one gives each of the {} workers {})",
                        format_size(MIN_WORKER_MEMORY),
                        self.workers,
                        format_size(each)
                    ),
                });
            }
        }
        if self.metrics_port.is_some_and(|metrics| metrics != 0 && metrics == self.port) {
            return Err(ConfigError {
                source_name: culprit(&["HERDSMAN_METRICS_PORT"]).1,
                value: self.port.to_string(),
                expected: "a port other than PORT: the metrics have a port of their own".into(),
            });
        }
        Ok(())
    }

    /// Resolves the configuration from the given flags and this process's environment, on this
    /// machine.
    pub fn from_process(flags: &Flags) -> Result<Resolution, ConfigError> {
        // Variables that are not UTF-8 are none of ours; skip them rather than fail.
        Config::resolve_on(
            flags,
            std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
            Host::this_process,
        )
    }

    /// The address to bind, as `host:port`.
    pub fn bind_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.host, self.port)
    }

    /// The resolved settings as `(VARIABLE, value)` pairs for `herdsman check`, in table order,
    /// secrets redacted.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        let fields = match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(fields)) => fields,
            _ => serde_json::Map::new(),
        };
        VARIABLES
            .iter()
            .map(|&(var, field)| {
                let shown = match fields.get(field) {
                    None | Some(serde_json::Value::Null) => "(unset)".to_string(),
                    Some(serde_json::Value::String(s)) if var == "REDIS_URL" => redact_url(s),
                    Some(serde_json::Value::String(_)) if var == "HERDSMAN_METRICS_TOKEN" => "***".to_string(),
                    Some(serde_json::Value::String(s)) if var == "HERDSMAN_MAX_WORKER_MEMORY" => {
                        match self.max_worker_memory {
                            Some(line @ MemoryLine::Share { .. }) => {
                                format!(
                                    "{s} / {} workers = {:.1} MiB each",
                                    self.workers,
                                    line.per_worker(self.workers) as f64 / (1u64 << 20) as f64
                                )
                            }
                            _ => s.clone(),
                        }
                    }
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(serde_json::Value::Array(items)) => {
                        items.iter().filter_map(|i| i.as_str()).collect::<Vec<_>>().join(",")
                    }
                    Some(other) => other.to_string(),
                };
                (var, shown)
            })
            .collect()
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (name, value) in self.describe() {
            map.entry(&name, &value);
        }
        map.finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        // The defaults are what an empty environment resolves to; there is one source of truth.
        Config::resolve(&Flags::default(), std::iter::empty()).expect("the defaults are valid")
    }
}

/// `LOG_LEVEL`: a level (`info`) or comma-separated `target=level` directives with an optional
/// default (`herdsman=debug,warn`). `Targets` reads exactly that; tracing-subscriber's `EnvFilter`
/// would also take span and field filters, at the price of a regex engine in the binary (about
/// a megabyte of the 6 MB image).
/// `Targets` itself is lenient (it takes `[=` as a target); each directive is checked first.
pub fn parse_log_filter(filter: &str) -> Result<tracing_subscriber::filter::Targets, String> {
    use tracing_subscriber::filter::LevelFilter;
    for directive in filter.split(',').map(str::trim) {
        let (target, level) = directive.split_once('=').unwrap_or(("herdsman", directive));
        let target_ok =
            !target.is_empty() && target.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-'));
        if !target_ok || level.parse::<LevelFilter>().is_err() {
            return Err(format!("not a level or target=level: {directive:?}"));
        }
    }
    filter.parse().map_err(|e: tracing_subscriber::filter::ParseError| e.to_string())
}

/// Seconds as a setting is written (`30`, `0.5`).
fn format_seconds(d: Duration) -> String {
    d.as_secs_f64().to_string()
}

/// The CPUs this process may use; std reads the cgroup quota, so a 0.5-CPU container gets 1.
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_WORKERS)
}

/// The machine's memory (`MemTotal`), what a process without a cgroup limit may use.
fn machine_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = meminfo.lines().find_map(|line| line.strip_prefix("MemTotal:"))?.split_whitespace().next()?;
    kib.parse::<u64>().ok().map(|kib| kib << 10)
}

/// Reads a PEM file of CA certificates and checks that each one is usable as a trust anchor,
/// as the Redis client will use it; returns the file's bytes. The reason for a refusal is one
/// line. Used by the setting's check at start and by the cache when it builds its connections.
pub fn read_ca_certificates(path: &Path) -> Result<Vec<u8>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    let mut anchors = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("not PEM: {e}"))?;
        anchors.add(cert).map_err(|e| format!("not a usable certificate: {e}"))?;
    }
    if anchors.is_empty() {
        return Err("no CERTIFICATE block in it".into());
    }
    Ok(pem)
}

/// Replaces the password (and user) of a URL with `***`, for logs and `herdsman check`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".into();
    };
    // Credentials end at the last '@'. Not the authority's last: a password may hold an
    // unescaped '#', '/' or '?' (`redis://:s3cr#et@host`), which would end the authority early
    // and leave the password on show. An '@' further on only hides more than needed.
    match rest.rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// Durations travel to workers as fractional seconds.
mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn resolve_env(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::resolve(&Flags::default(), env(pairs))
    }

    #[test]
    fn defaults_follow_the_paas_conventions() {
        let c = resolve_env(&[]).unwrap();
        assert_eq!(c.port, 8080);
        assert_eq!(c.host, IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        assert!(c.workers >= 1);
        assert_eq!(c.timeout, Duration::from_secs(30));
        assert!(c.graceful_timeout < Duration::from_secs(30));
        assert_eq!(c.redis_url, None);
    }

    #[test]
    fn flag_wins_over_environment_which_wins_over_default() {
        let flags = Flags { port: Some("9000".into()), ..Flags::default() };
        let c = Config::resolve(&flags, env(&[("PORT", "7000"), ("WEB_CONCURRENCY", "3")])).unwrap();
        assert_eq!(c.port, 9000);
        assert_eq!(c.workers, 3);
    }

    #[test]
    fn bad_values_name_the_variable_the_value_and_what_is_accepted() {
        // The binary's own test (tests/config_errors.rs) covers the values the issue names;
        // these are the other parsers' edge cases.
        let cases = [
            ("PORT", "-1"),
            ("WEB_CONCURRENCY", "1.5"),
            ("GUNICORN_TIMEOUT", "NaN"),
            ("GUNICORN_TIMEOUT", "0"),
            ("GRACEFUL_TIMEOUT", "inf"),
            ("LOG_FORMAT", "xml"),
            ("LOG_LEVEL", "[="),
            ("REDIS_REQUIRED", "maybe"),
            ("BCRYPT_COST", "3"),
            ("HERDSMAN_SESSION_RECHECK", "-1"),
            ("HERDSMAN_SESSION_RECHECK", "301"),
            ("HERDSMAN_SESSION_OUTAGE_TRUST", "-1"),
            ("HERDSMAN_SESSION_OUTAGE_TRUST", "301"),
            ("HERDSMAN_SESSION_OUTAGE_TRUST", "soon"),
        ];
        for (var, value) in cases {
            let err = resolve_env(&[(var, value)]).unwrap_err();
            let line = err.to_string();
            assert!(line.contains(var) && line.contains(value) && line.contains("expected"), "{line}");
            assert!(!line.contains('\n'), "one line: {line}");
        }
    }

    #[test]
    fn the_session_recheck_and_outage_trust_may_be_zero_but_not_outlive_the_sessions_memory() {
        assert_eq!(Config::default().session_recheck, Duration::from_secs(10));
        assert_eq!(Config::default().session_outage_trust, Duration::from_secs(30));
        for var in ["HERDSMAN_SESSION_RECHECK", "HERDSMAN_SESSION_OUTAGE_TRUST"] {
            let read = |config: &Config| match var {
                "HERDSMAN_SESSION_RECHECK" => config.session_recheck,
                _ => config.session_outage_trust,
            };
            let zero = resolve_env(&[(var, "0")]).expect("0: no local trust");
            assert_eq!(read(&zero), Duration::ZERO, "{var}");
            let half = resolve_env(&[(var, "2.5")]).expect("fractions");
            assert_eq!(read(&half), Duration::from_millis(2500), "{var}");
            let most = resolve_env(&[(var, "300")]).expect("up to the sessions' memory");
            assert_eq!(read(&most), MAX_SESSION_RECHECK, "{var}");
        }
    }

    #[test]
    fn a_bad_flag_is_named_as_a_flag() {
        let flags = Flags { workers: Some("0".into()), ..Flags::default() };
        let err = Config::resolve(&flags, env(&[("WEB_CONCURRENCY", "2")])).unwrap_err();
        assert_eq!(err.source_name, "--workers");
    }

    #[test]
    fn a_bad_redis_url_never_echoes_its_password() {
        let err = resolve_env(&[("REDIS_URL", "http://user:hunter2@host")]).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn settings_that_contradict_each_other_are_refused_naming_both() {
        let err = resolve_env(&[("HERDSMAN_CACHE_DEFAULT_TTL", "7200"), ("HERDSMAN_CACHE_MAX_TTL", "60")]).unwrap_err();
        let line = err.to_string();
        assert!(line.starts_with("invalid HERDSMAN_CACHE_DEFAULT_TTL=\"7200\""), "{line}");
        assert!(line.contains("HERDSMAN_CACHE_MAX_TTL (60 s)"), "{line}");
        assert!(resolve_env(&[("HERDSMAN_CACHE_DEFAULT_TTL", "60"), ("HERDSMAN_CACHE_MAX_TTL", "60")]).is_ok());
    }

    /// Found by the `config` fuzz target: a maximum given alone was blamed on the default it
    /// contradicts, a setting the user never gave.
    #[test]
    fn a_contradiction_names_the_setting_that_was_given() {
        let line = resolve_env(&[("HERDSMAN_CACHE_MAX_TTL", "1")]).unwrap_err().to_string();
        assert_eq!(
            line,
            "invalid HERDSMAN_CACHE_MAX_TTL=\"1\": expected at least HERDSMAN_CACHE_DEFAULT_TTL (3600 s): \
             a value stored without ?ttl= must be storable"
        );
        let flags = Flags { cache_max_ttl: Some("1".into()), ..Flags::default() };
        let err = Config::resolve(&flags, env(&[])).unwrap_err();
        assert_eq!(err.source_name, "--cache-max-ttl");
        let flags = Flags { cache_default_ttl: Some("7200".into()), ..Flags::default() };
        let err = Config::resolve(&flags, env(&[("HERDSMAN_CACHE_MAX_TTL", "60")])).unwrap_err();
        assert_eq!(err.source_name, "--cache-default-ttl", "both given: the default TTL is blamed");
        let flags = Flags { metrics_port: Some("9000".into()), port: Some("9000".into()), ..Flags::default() };
        assert_eq!(Config::resolve(&flags, env(&[])).unwrap_err().source_name, "--metrics-port");
    }

    #[test]
    fn a_redis_url_that_does_not_parse_is_refused_once_with_its_password_hidden() {
        let err = resolve_env(&[("REDIS_URL", "redis://:hunter2@host:notaport")]).unwrap_err();
        let line = err.to_string();
        assert!(line.starts_with("invalid REDIS_URL=") && line.contains("that parses"), "{line}");
        assert!(!line.contains("hunter2"), "{line}");
    }

    #[test]
    fn an_international_redis_host_must_be_written_in_its_ascii_form() {
        // A redis:// host gets no IDNA: redis is not a special URL scheme, so its host is opaque.
        let err = resolve_env(&[("REDIS_URL", "redis://:hunter2@bücher.example:6379")]).unwrap_err().to_string();
        assert!(err.starts_with("invalid REDIS_URL=") && err.contains("in its xn-- form"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let ascii = resolve_env(&[("REDIS_URL", "redis://:hunter2@xn--bcher-kva.example:6379")]).unwrap();
        assert_eq!(ascii.redis_url.as_deref(), Some("redis://:hunter2@xn--bcher-kva.example:6379"));
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("redis://:hunter2@cache:6379/0"), "redis://***@cache:6379/0");
        assert_eq!(redact_url("rediss://u:p@[::1]:6380"), "rediss://***@[::1]:6380");
        assert_eq!(redact_url("redis://cache:6379"), "redis://cache:6379");
        assert_eq!(redact_url("redis://:s3cr#et@host:6379"), "redis://***@host:6379");
        assert_eq!(redact_url("redis://u:a/b?c@host"), "redis://***@host");
        assert_eq!(redact_url("redis://u:p%40ss%23w@host/0"), "redis://***@host/0");
        let config = resolve_env(&[("REDIS_URL", "redis://:hunter2@host:6379")]).unwrap();
        assert!(!format!("{config:?}").contains("hunter2"), "{config:?}");
    }

    #[test]
    fn an_explicit_setting_beats_the_platforms_fit_which_beats_the_default() {
        use crate::platform::{Host, Limits};
        let small_dyno = || Host { visible_cpus: 8, limits: Limits { cpus: None, memory_bytes: Some(512 << 20) } };
        let fitted = Config::resolve_on(&Flags::default(), env(&[("K_SERVICE", "api")]), small_dyno).unwrap();
        assert_eq!(fitted.config.graceful_timeout, Duration::from_secs(8));
        assert_eq!(fitted.config.workers, 2);
        assert!(matches!(fitted.source("GRACEFUL_TIMEOUT"), Some(Source::Platform(_))));
        assert!(matches!(fitted.source("WEB_CONCURRENCY"), Some(Source::Platform(_))));
        assert_eq!(fitted.source("PORT"), Some(&Source::Default));

        let pairs = env(&[("K_SERVICE", "api"), ("GRACEFUL_TIMEOUT", "9"), ("WEB_CONCURRENCY", "6")]);
        let explicit = Config::resolve_on(&Flags::default(), pairs.clone(), small_dyno).unwrap();
        assert_eq!(explicit.config.graceful_timeout, Duration::from_secs(9));
        assert_eq!(explicit.config.workers, 6);
        assert_eq!(explicit.source("GRACEFUL_TIMEOUT"), Some(&Source::Environment));
        assert_eq!(explicit.warnings.len(), 0, "9 s is below Cloud Run's 10 s: {:?}", explicit.warnings);

        let flags = Flags { graceful_timeout: Some("12".into()), ..Flags::default() };
        let flagged = Config::resolve_on(&flags, pairs, small_dyno).unwrap();
        assert_eq!(flagged.config.graceful_timeout, Duration::from_secs(12));
        assert_eq!(flagged.source("GRACEFUL_TIMEOUT"), Some(&Source::Flag));
        assert_eq!(flagged.warnings.len(), 1, "{:?}", flagged.warnings);
    }

    #[test]
    fn without_a_platform_the_host_is_never_read() {
        let resolution = Config::resolve_on(&Flags::default(), env(&[]), || panic!("read the host")).unwrap();
        assert!(resolution.platform.is_none() && resolution.warnings.is_empty());
    }

    #[test]
    fn the_metrics_settings_are_checked_and_the_token_never_shown() {
        let same = resolve_env(&[("PORT", "9000"), ("HERDSMAN_METRICS_PORT", "9000")]).unwrap_err();
        assert_eq!(
            same.to_string(),
            "invalid HERDSMAN_METRICS_PORT=\"9000\": expected a port other than PORT: the metrics have a port of their own"
        );
        let short = resolve_env(&[("HERDSMAN_METRICS_TOKEN", "hunter2")]).unwrap_err().to_string();
        assert!(short.starts_with("invalid HERDSMAN_METRICS_TOKEN=\"***\": expected at least 16"), "{short}");
        let config = resolve_env(&[("HERDSMAN_METRICS_TOKEN", "correct-horse-battery-staple")]).unwrap();
        assert!(!format!("{config:?}").contains("correct-horse"), "{config:?}");
        assert_eq!(config.metrics_token.as_deref(), Some("correct-horse-battery-staple"));
    }

    #[test]
    fn the_memory_line_takes_sizes_and_shares_of_the_limit() {
        use crate::platform::{Host, Limits};
        let line = |value: &str| resolve_env(&[("HERDSMAN_MAX_WORKER_MEMORY", value)]).map(|c| c.max_worker_memory);
        assert_eq!(line("512MiB"), Ok(Some(MemoryLine::Bytes(512 << 20))));
        assert_eq!(line("400M"), Ok(Some(MemoryLine::Bytes(400_000_000))));
        assert_eq!(line("1.5 GiB"), Ok(Some(MemoryLine::Bytes(3 << 29))));
        assert_eq!(line("67108864"), Ok(Some(MemoryLine::Bytes(64 << 20))));
        assert_eq!(line("off"), Ok(None));
        assert_eq!(resolve_env(&[]).unwrap().max_worker_memory, None, "off by default");
        for bad in ["lots", "512XB", "-5M", "1M", "0%", "150%", "80 %%", "2TiB", "NaN%"] {
            let err = line(bad).unwrap_err().to_string();
            assert!(err.starts_with(&format!("invalid HERDSMAN_MAX_WORKER_MEMORY={bad:?}: expected")), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }

        let limited = || Host { visible_cpus: 2, limits: Limits { cpus: None, memory_bytes: Some(1 << 30) } };
        let pairs = env(&[("HERDSMAN_MAX_WORKER_MEMORY", "80%"), ("WEB_CONCURRENCY", "4")]);
        let share = Config::resolve_on(&Flags::default(), pairs, limited).unwrap().config;
        assert_eq!(share.max_worker_memory, Some(MemoryLine::Share { percent: 80.0, limit: 1 << 30 }));
        assert_eq!(share.max_worker_memory.unwrap().per_worker(4), (1u64 << 30) / 5);
        let shown = share.describe().into_iter().find(|(var, _)| *var == "HERDSMAN_MAX_WORKER_MEMORY").unwrap().1;
        assert_eq!(shown, "80% of 1GiB / 4 workers = 204.8 MiB each");
        let json = serde_json::to_string(&share).unwrap();
        assert_eq!(serde_json::from_str::<Config>(&json).unwrap(), share);

        let pairs = env(&[("HERDSMAN_MAX_WORKER_MEMORY", "2%"), ("WEB_CONCURRENCY", "4")]);
        let err = Config::resolve_on(&Flags::default(), pairs, limited).unwrap_err().to_string();
        assert!(err.contains("at least 16MiB per worker") && err.contains("each of the 4 workers"), "{err}");
    }

    #[test]
    fn a_platform_with_a_memory_limit_fits_the_line_and_off_overrides_it() {
        use crate::platform::{Host, Limits};
        let dyno = || Host { visible_cpus: 8, limits: Limits { cpus: None, memory_bytes: Some(512 << 20) } };
        let fitted = Config::resolve_on(&Flags::default(), env(&[("DYNO", "web.1")]), dyno).unwrap();
        assert_eq!(fitted.config.max_worker_memory, Some(MemoryLine::Share { percent: 80.0, limit: 512 << 20 }));
        assert!(matches!(fitted.source("HERDSMAN_MAX_WORKER_MEMORY"), Some(Source::Platform(_))));
        let pairs = env(&[("DYNO", "web.1"), ("HERDSMAN_MAX_WORKER_MEMORY", "off")]);
        let off = Config::resolve_on(&Flags::default(), pairs, dyno).unwrap();
        assert_eq!(off.config.max_worker_memory, None);
        assert_eq!(off.source("HERDSMAN_MAX_WORKER_MEMORY"), Some(&Source::Environment));
    }

    #[test]
    fn config_survives_the_trip_to_a_worker() {
        let c = resolve_env(&[("GUNICORN_TIMEOUT", "0.5"), ("CACHE_WARM_KEYS", "a, b,,c")]).unwrap();
        assert_eq!(c.cache_warm_keys, vec!["a", "b", "c"]);
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Config>(&json).unwrap(), c);
    }
}
