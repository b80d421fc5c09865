//! Settings: where they come from, what they mean, and what values they accept.
//!
//! Every setting has three sources, merged in one visible step ([`Config::resolve`]):
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

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};

/// The highest `WEB_CONCURRENCY` accepted: a typo such as `100000` must not fork-bomb a container.
pub const MAX_WORKERS: usize = 512;

/// The resolved settings of a herdsman process, master and workers alike.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// A handler running longer is answered 503. `HERDSMAN_REQUEST_TIMEOUT`, default 30 s
    /// (Heroku's router gives up at 30 s anyway).
    #[serde(with = "secs")]
    pub request_timeout: Duration,
    /// A client must send its request headers within this time. `HERDSMAN_HEADER_TIMEOUT`,
    /// default 10 s: a slow-loris connection must not hold a worker's connection slot forever.
    #[serde(with = "secs")]
    pub header_timeout: Duration,
    /// Request bodies above this size are answered 413. `HERDSMAN_MAX_BODY_BYTES`, default 1 MiB.
    pub max_body_bytes: usize,
    /// `text` or `json`. `LOG_FORMAT`, default `text`.
    pub log_format: LogFormat,
    /// A tracing filter (`info`, `debug`, `herdsman=debug,warn`). `LOG_LEVEL`, default `info`.
    pub log_level: String,
    /// Redis for the cache and the user store; none means memory only. `REDIS_URL`.
    pub redis_url: Option<String>,
    /// `/ready` waits for Redis. `REDIS_REQUIRED`, default false.
    pub redis_required: bool,
    /// Bound on one Redis command; past it the cache falls back to memory.
    /// `HERDSMAN_REDIS_TIMEOUT`, default 0.25 s.
    #[serde(with = "secs")]
    pub redis_timeout: Duration,
    /// Bound on each warm-up task. `STARTUP_OPERATION_TIMEOUT`, default 2 s.
    #[serde(with = "secs")]
    pub startup_operation_timeout: Duration,
    /// bcrypt cost for passwords. `BCRYPT_COST`, default 10 (4 to 31).
    pub bcrypt_cost: u32,
    /// Keys loaded from Redis into memory at boot. `CACHE_WARM_KEYS`, comma-separated.
    pub cache_warm_keys: Vec<String>,
    /// Entries the in-memory cache holds at most. `HERDSMAN_CACHE_ENTRIES`, default 10000.
    pub cache_entries: u64,
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
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

/// Settings given as flags. Every field is a string so that [`Config::resolve`] parses flags and
/// variables with the same code and the same messages.
#[derive(Debug, Default, Clone, Args)]
pub struct Flags {
    /// Address to bind [env: HERDSMAN_HOST] [default: :: (IPv6 and IPv4)]
    #[arg(global = true, allow_hyphen_values = true, long, value_name = "ADDR")]
    pub host: Option<String>,
    /// Port to bind [env: PORT] [default: 8080]
    #[arg(global = true, allow_hyphen_values = true, long, short = 'p', value_name = "PORT")]
    pub port: Option<String>,
    /// Worker processes, 1 to 512 [env: WEB_CONCURRENCY] [default: CPUs available]
    #[arg(global = true, allow_hyphen_values = true, long, short = 'w', value_name = "N")]
    pub workers: Option<String>,
    /// Seconds a worker may stay silent before it is aborted [env: GUNICORN_TIMEOUT] [default: 30]
    #[arg(global = true, allow_hyphen_values = true, long, short = 't', value_name = "SECONDS")]
    pub timeout: Option<String>,
    /// Seconds a new worker may take to start serving [env: HERDSMAN_BOOT_TIMEOUT] [default: 30]
    #[arg(global = true, allow_hyphen_values = true, long, value_name = "SECONDS")]
    pub boot_timeout: Option<String>,
    /// Failed boots (no worker ever ready) before giving up with exit status 3
    /// [env: HERDSMAN_BOOT_ATTEMPTS] [default: 5]
    #[arg(global = true, allow_hyphen_values = true, long, value_name = "N")]
    pub boot_attempts: Option<String>,
    /// Seconds in-flight requests get on shutdown [env: GRACEFUL_TIMEOUT] [default: 25]
    #[arg(global = true, allow_hyphen_values = true, long, value_name = "SECONDS")]
    pub graceful_timeout: Option<String>,
    /// Requests before a worker is replaced, 0 = never [env: MAX_REQUESTS] [default: 0]
    #[arg(global = true, allow_hyphen_values = true, long, value_name = "N")]
    pub max_requests: Option<String>,
    /// Random extra requests per worker [env: MAX_REQUESTS_JITTER] [default: 0]
    #[arg(global = true, allow_hyphen_values = true, long, value_name = "N")]
    pub max_requests_jitter: Option<String>,
    /// Seconds a handler may run before 503 [env: HERDSMAN_REQUEST_TIMEOUT] [default: 30]
    #[arg(global = true, allow_hyphen_values = true, long, value_name = "SECONDS")]
    pub request_timeout: Option<String>,
    /// Seconds a client may take to send its headers [env: HERDSMAN_HEADER_TIMEOUT] [default: 10]
    #[arg(global = true, allow_hyphen_values = true, long, value_name = "SECONDS")]
    pub header_timeout: Option<String>,
    /// Largest request body, in bytes [env: HERDSMAN_MAX_BODY_BYTES] [default: 1048576]
    #[arg(global = true, allow_hyphen_values = true, long, value_name = "BYTES")]
    pub max_body_bytes: Option<String>,
    /// text or json [env: LOG_FORMAT] [default: text]
    #[arg(global = true, allow_hyphen_values = true, long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Log filter, e.g. info or herdsman=debug [env: LOG_LEVEL] [default: info]
    #[arg(global = true, allow_hyphen_values = true, long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// redis:// or rediss:// URL; unset = in-memory cache only [env: REDIS_URL] [default: none]
    #[arg(global = true, allow_hyphen_values = true, long, value_name = "URL")]
    pub redis_url: Option<String>,
    /// /ready waits for Redis: true or false [env: REDIS_REQUIRED] [default: false]
    #[arg(global = true, allow_hyphen_values = true, long, value_name = "BOOL")]
    pub redis_required: Option<String>,
    /// Seconds one Redis command may take before the cache falls back to memory
    /// [env: HERDSMAN_REDIS_TIMEOUT] [default: 0.25]
    #[arg(global = true, allow_hyphen_values = true, long, value_name = "SECONDS")]
    pub redis_timeout: Option<String>,
    /// Seconds each warm-up task may take [env: STARTUP_OPERATION_TIMEOUT] [default: 2]
    #[arg(global = true, allow_hyphen_values = true, long, value_name = "SECONDS")]
    pub startup_operation_timeout: Option<String>,
    /// bcrypt cost, 4 to 31 [env: BCRYPT_COST] [default: 10]
    #[arg(global = true, allow_hyphen_values = true, long, value_name = "COST")]
    pub bcrypt_cost: Option<String>,
    /// Comma-separated keys loaded from Redis at boot [env: CACHE_WARM_KEYS] [default: none]
    #[arg(global = true, allow_hyphen_values = true, long, value_name = "KEYS")]
    pub cache_warm_keys: Option<String>,
    /// Entries the in-memory cache holds [env: HERDSMAN_CACHE_ENTRIES] [default: 10000]
    #[arg(global = true, allow_hyphen_values = true, long, value_name = "N")]
    pub cache_entries: Option<String>,
}

/// The same settings as read from the environment by envy. envy matches variables case-
/// insensitively (it lowercases their names); the renames give the names PaaS users know.
#[derive(Debug, Default, Deserialize)]
struct Env {
    #[serde(rename = "herdsman_host")]
    host: Option<String>,
    #[serde(rename = "port")]
    port: Option<String>,
    #[serde(rename = "web_concurrency")]
    workers: Option<String>,
    #[serde(rename = "gunicorn_timeout")]
    timeout: Option<String>,
    #[serde(rename = "herdsman_boot_timeout")]
    boot_timeout: Option<String>,
    #[serde(rename = "herdsman_boot_attempts")]
    boot_attempts: Option<String>,
    #[serde(rename = "graceful_timeout")]
    graceful_timeout: Option<String>,
    #[serde(rename = "max_requests")]
    max_requests: Option<String>,
    #[serde(rename = "max_requests_jitter")]
    max_requests_jitter: Option<String>,
    #[serde(rename = "herdsman_request_timeout")]
    request_timeout: Option<String>,
    #[serde(rename = "herdsman_header_timeout")]
    header_timeout: Option<String>,
    #[serde(rename = "herdsman_max_body_bytes")]
    max_body_bytes: Option<String>,
    #[serde(rename = "log_format")]
    log_format: Option<String>,
    #[serde(rename = "log_level")]
    log_level: Option<String>,
    #[serde(rename = "redis_url")]
    redis_url: Option<String>,
    #[serde(rename = "redis_required")]
    redis_required: Option<String>,
    #[serde(rename = "herdsman_redis_timeout")]
    redis_timeout: Option<String>,
    #[serde(rename = "startup_operation_timeout")]
    startup_operation_timeout: Option<String>,
    #[serde(rename = "bcrypt_cost")]
    bcrypt_cost: Option<String>,
    #[serde(rename = "cache_warm_keys")]
    cache_warm_keys: Option<String>,
    #[serde(rename = "herdsman_cache_entries")]
    cache_entries: Option<String>,
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
        const EXPECTED: &str = "a number of seconds greater than 0 and at most 86400, such as 30 or 0.5";
        match self.value.trim().parse::<f64>() {
            Ok(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 => Ok(Duration::from_secs_f64(s)),
            _ => Err(self.error(EXPECTED)),
        }
    }

    fn boolean(&self) -> Result<bool, ConfigError> {
        match self.value.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(self.error("true or false")),
        }
    }
}

/// Picks the flag over the variable, keeping the name of whichever was used.
fn pick<'a>(flag: &'a Option<String>, flag_name: &str, env: &'a Option<String>, var: &str) -> Option<Raw<'a>> {
    match (flag, env) {
        (Some(value), _) => Some(Raw { source_name: format!("--{flag_name}"), value }),
        (None, Some(value)) => Some(Raw { source_name: var.to_string(), value }),
        (None, None) => None,
    }
}

/// Parses one setting: `setting!(flags, env, field, "flag-name", "VAR", default, |raw| parse)`.
macro_rules! setting {
    ($flags:ident, $env:ident, $field:ident, $flag:literal, $var:literal, $default:expr, $parse:expr) => {
        match pick(&$flags.$field, $flag, &$env.$field, $var) {
            Some(raw) => $parse(&raw)?,
            None => $default,
        }
    };
}

impl Config {
    /// Resolves the configuration from flags and an environment given as name/value pairs.
    /// Tests pass their own pairs; [`Config::from_process`] passes the real environment.
    pub fn resolve<I>(flags: &Flags, env: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        // Empty variables count as unset: `PORT=` in a .env file means "not configured".
        let env: Env =
            envy::from_iter(env.into_iter().filter(|(_, v)| !v.trim().is_empty())).map_err(|e| ConfigError {
                source_name: "environment".into(),
                value: e.to_string(),
                expected: "variables holding UTF-8 text".into(),
            })?;

        let config = Config {
            host: setting!(flags, env, host, "host", "HERDSMAN_HOST", IpAddr::V6(Ipv6Addr::UNSPECIFIED), |r: &Raw| {
                r.value
                    .trim()
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
                    .map_err(|_| r.error("an IP address such as :: or 0.0.0.0 or 127.0.0.1"))
            }),
            port: setting!(flags, env, port, "port", "PORT", 8080, |r: &Raw| r.integer(0u16, 65535)),
            workers: setting!(flags, env, workers, "workers", "WEB_CONCURRENCY", default_workers(), |r: &Raw| r
                .integer(1usize, MAX_WORKERS)),
            timeout: setting!(
                flags,
                env,
                timeout,
                "timeout",
                "GUNICORN_TIMEOUT",
                Duration::from_secs(30),
                Raw::seconds
            ),
            boot_timeout: setting!(
                flags,
                env,
                boot_timeout,
                "boot-timeout",
                "HERDSMAN_BOOT_TIMEOUT",
                Duration::from_secs(30),
                Raw::seconds
            ),
            boot_attempts: setting!(
                flags,
                env,
                boot_attempts,
                "boot-attempts",
                "HERDSMAN_BOOT_ATTEMPTS",
                5,
                |r: &Raw| r.integer(1u32, 1000)
            ),
            graceful_timeout: setting!(
                flags,
                env,
                graceful_timeout,
                "graceful-timeout",
                "GRACEFUL_TIMEOUT",
                Duration::from_secs(25),
                Raw::seconds
            ),
            max_requests: setting!(flags, env, max_requests, "max-requests", "MAX_REQUESTS", 0, |r: &Raw| r
                .integer(0u64, u64::MAX / 2)),
            max_requests_jitter: setting!(
                flags,
                env,
                max_requests_jitter,
                "max-requests-jitter",
                "MAX_REQUESTS_JITTER",
                0,
                |r: &Raw| r.integer(0u64, u64::MAX / 2)
            ),
            request_timeout: setting!(
                flags,
                env,
                request_timeout,
                "request-timeout",
                "HERDSMAN_REQUEST_TIMEOUT",
                Duration::from_secs(30),
                Raw::seconds
            ),
            header_timeout: setting!(
                flags,
                env,
                header_timeout,
                "header-timeout",
                "HERDSMAN_HEADER_TIMEOUT",
                Duration::from_secs(10),
                Raw::seconds
            ),
            max_body_bytes: setting!(
                flags,
                env,
                max_body_bytes,
                "max-body-bytes",
                "HERDSMAN_MAX_BODY_BYTES",
                1 << 20,
                |r: &Raw| r.integer(1usize, 1 << 30)
            ),
            log_format: setting!(flags, env, log_format, "log-format", "LOG_FORMAT", LogFormat::Text, |r: &Raw| {
                match r.value.trim().to_ascii_lowercase().as_str() {
                    "text" => Ok(LogFormat::Text),
                    "json" => Ok(LogFormat::Json),
                    _ => Err(r.error("text or json")),
                }
            }),
            log_level: setting!(flags, env, log_level, "log-level", "LOG_LEVEL", "info".to_string(), |r: &Raw| {
                let filter = r.value.trim().to_string();
                tracing_subscriber::EnvFilter::try_new(&filter).map(|_| filter).map_err(|_| {
                    r.error("a level (error, warn, info, debug, trace) or a filter such as herdsman=debug")
                })
            }),
            redis_url: setting!(flags, env, redis_url, "redis-url", "REDIS_URL", None, |r: &Raw| {
                let url = r.value.trim();
                if url.starts_with("redis://") || url.starts_with("rediss://") {
                    Ok(Some(url.to_string()))
                } else {
                    // The value may hold a password: show only its scheme.
                    let shown = url.split_once("://").map_or("(no scheme)", |(scheme, _)| scheme);
                    Err(ConfigError {
                        source_name: r.source_name.clone(),
                        value: format!("{shown}://…"),
                        expected: "a redis:// or rediss:// URL".into(),
                    })
                }
            }),
            redis_required: setting!(
                flags,
                env,
                redis_required,
                "redis-required",
                "REDIS_REQUIRED",
                false,
                Raw::boolean
            ),
            redis_timeout: setting!(
                flags,
                env,
                redis_timeout,
                "redis-timeout",
                "HERDSMAN_REDIS_TIMEOUT",
                Duration::from_millis(250),
                Raw::seconds
            ),
            startup_operation_timeout: setting!(
                flags,
                env,
                startup_operation_timeout,
                "startup-operation-timeout",
                "STARTUP_OPERATION_TIMEOUT",
                Duration::from_secs(2),
                Raw::seconds
            ),
            bcrypt_cost: setting!(flags, env, bcrypt_cost, "bcrypt-cost", "BCRYPT_COST", 10, |r: &Raw| r
                .integer(4u32, 31)),
            cache_warm_keys: setting!(
                flags,
                env,
                cache_warm_keys,
                "cache-warm-keys",
                "CACHE_WARM_KEYS",
                Vec::new(),
                |r: &Raw| {
                    Ok::<_, ConfigError>(
                        r.value.split(',').map(str::trim).filter(|k| !k.is_empty()).map(String::from).collect(),
                    )
                }
            ),
            cache_entries: setting!(
                flags,
                env,
                cache_entries,
                "cache-entries",
                "HERDSMAN_CACHE_ENTRIES",
                10_000,
                |r: &Raw| r.integer(1u64, 100_000_000)
            ),
        };
        Ok(config)
    }

    /// Resolves the configuration from the given flags and this process's environment.
    pub fn from_process(flags: &Flags) -> Result<Config, ConfigError> {
        // Variables that are not UTF-8 are none of ours; skip them rather than fail.
        Config::resolve(
            flags,
            std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        )
    }

    /// The address to bind, as `host:port`.
    pub fn bind_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.host, self.port)
    }

    /// The resolved settings as `NAME = value` lines for `herdsman check`, secrets redacted.
    pub fn describe(&self) -> BTreeMap<&'static str, String> {
        let secs = |d: Duration| format!("{}s", d.as_secs_f64());
        BTreeMap::from([
            ("HERDSMAN_HOST", self.host.to_string()),
            ("PORT", self.port.to_string()),
            ("WEB_CONCURRENCY", self.workers.to_string()),
            ("GUNICORN_TIMEOUT", secs(self.timeout)),
            ("HERDSMAN_BOOT_TIMEOUT", secs(self.boot_timeout)),
            ("HERDSMAN_BOOT_ATTEMPTS", self.boot_attempts.to_string()),
            ("GRACEFUL_TIMEOUT", secs(self.graceful_timeout)),
            ("MAX_REQUESTS", self.max_requests.to_string()),
            ("MAX_REQUESTS_JITTER", self.max_requests_jitter.to_string()),
            ("HERDSMAN_REQUEST_TIMEOUT", secs(self.request_timeout)),
            ("HERDSMAN_HEADER_TIMEOUT", secs(self.header_timeout)),
            ("HERDSMAN_MAX_BODY_BYTES", self.max_body_bytes.to_string()),
            ("LOG_FORMAT", format!("{:?}", self.log_format).to_lowercase()),
            ("LOG_LEVEL", self.log_level.clone()),
            ("REDIS_URL", self.redis_url.as_deref().map_or("(unset: in-memory cache only)".into(), redact_url)),
            ("REDIS_REQUIRED", self.redis_required.to_string()),
            ("HERDSMAN_REDIS_TIMEOUT", secs(self.redis_timeout)),
            ("STARTUP_OPERATION_TIMEOUT", secs(self.startup_operation_timeout)),
            ("BCRYPT_COST", self.bcrypt_cost.to_string()),
            ("CACHE_WARM_KEYS", self.cache_warm_keys.join(",")),
            ("HERDSMAN_CACHE_ENTRIES", self.cache_entries.to_string()),
        ])
    }
}

impl Default for Config {
    fn default() -> Self {
        // The defaults are what an empty environment resolves to; there is one source of truth.
        Config::resolve(&Flags::default(), std::iter::empty()).expect("the defaults are valid")
    }
}

/// The CPUs this process may use; std reads the cgroup quota, so a 0.5-CPU container gets 1.
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_WORKERS)
}

/// Replaces the password (and user) of a URL with `***`, for logs and `herdsman check`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".into();
    };
    // The authority ends at the first '/', '?' or '#'; credentials end at its last '@'.
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
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
        let cases = [
            ("PORT", "abc"),
            ("PORT", "70000"),
            ("WEB_CONCURRENCY", "0"),
            ("WEB_CONCURRENCY", "-1"),
            ("WEB_CONCURRENCY", "abc"),
            ("WEB_CONCURRENCY", "100000"),
            ("GUNICORN_TIMEOUT", "-5"),
            ("GUNICORN_TIMEOUT", "NaN"),
            ("LOG_FORMAT", "xml"),
            ("REDIS_REQUIRED", "maybe"),
            ("BCRYPT_COST", "3"),
        ];
        for (var, value) in cases {
            let err = resolve_env(&[(var, value)]).unwrap_err();
            let line = err.to_string();
            assert!(line.contains(var) && line.contains(value) && line.contains("expected"), "{line}");
            assert!(!line.contains('\n'), "one line: {line}");
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
    fn urls_are_redacted() {
        assert_eq!(redact_url("redis://:hunter2@cache:6379/0"), "redis://***@cache:6379/0");
        assert_eq!(redact_url("rediss://u:p@[::1]:6380"), "rediss://***@[::1]:6380");
        assert_eq!(redact_url("redis://cache:6379"), "redis://cache:6379");
    }

    #[test]
    fn config_survives_the_trip_to_a_worker() {
        let c = resolve_env(&[("GUNICORN_TIMEOUT", "0.5"), ("CACHE_WARM_KEYS", "a, b,,c")]).unwrap();
        assert_eq!(c.cache_warm_keys, vec!["a", "b", "c"]);
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Config>(&json).unwrap(), c);
    }
}
