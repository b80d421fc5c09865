//! The promises that tests/properties.rs (proptest) and the fuzz targets (fuzz/, which include
//! this file by path) check, written once. Each oracle returns the broken promise as `Err`; a
//! panic inside herdsman is a failure of its own, caught by proptest or libFuzzer.
#![allow(dead_code)] // each includer uses its part

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, FromArgMatches};
use herdsman::cache::{Cache, CacheConfig};
use herdsman::config::{redact_url, Config, ConfigError, Flags};

// ---------------------------------------------------------------------------------------------
// Redaction

/// `{scheme}://{user}:{password}@{rest}`: the password must not appear in `redact_url`, in the
/// error or `herdsman check` line of `REDIS_URL`, nor in the cache's error or `Debug`, unless it
/// is trivial: under 4 bytes, or text those outputs show anyway, which is what they show for the
/// same URL around a password of the same length made of one letter (so that a password such as
/// "**@2", which the marker `***` followed by a host `2` spells, or "ss:/" in "rediss://", is
/// not called a leak). The last `@` ends the credentials, as URL parsers read it, so what
/// follows the credentials is not always `rest`: the comparison does not need to know.
/// A `/`, `?` or `#` in the user or the password ends the URL's authority there (RFC 3986, as
/// the URL parser reads it): what follows is a path, query or fragment, not the password.
pub fn check_redaction(scheme: &str, user: &str, password: &str, rest: &str) -> Result<(), String> {
    let url = format!("{scheme}://{user}:{password}@{rest}");
    let dummy_url = format!("{scheme}://{user}:{}@{rest}", "x".repeat(password.len()));
    let ends_the_authority = |part: &str| part.contains(['/', '?', '#']);
    if password.len() < 4 || ends_the_authority(user) || ends_the_authority(password) {
        return Ok(());
    }
    // Shown for the real URL, and not shown for the dummy one: the password's own doing.
    let leaks = |show: &dyn Fn(&str) -> String| {
        let shown = show(&url);
        (shown.contains(password) && !show(&dummy_url).contains(password)).then_some(shown)
    };
    if let Some(redacted) = leaks(&|url| redact_url(url)) {
        return Err(format!("redact_url({url:?}) = {redacted:?} shows the password"));
    }
    // The configuration shows the URL in one place: the value of an error, or `check`'s listing.
    let configured = |url: &str| {
        match Config::resolve(&Flags::default(), vec![("REDIS_URL".to_string(), url.to_string())]) {
            Ok(config) => config.describe().into_iter().find(|(var, _)| *var == "REDIS_URL").map(|(_, value)| value),
            Err(err) => Some(err.value),
        }
        .unwrap_or_default()
    };
    if let Some(shown) = leaks(&configured) {
        return Err(format!("REDIS_URL={url:?} is shown as {shown:?}"));
    }
    // The cache's messages add words of their own (and redis-rs's).
    const OWN_WORDS: &str = "invalid REDIS_URL: cannot parse ; scheme is not supported, use redis:// or rediss://";
    let cache_text = |url: &str| {
        let config = CacheConfig { redis_url: Some(url.to_string()), ..CacheConfig::default() };
        let debug = format!("{config:?}");
        match Cache::new(config) {
            Ok(_) => debug,
            Err(err) => format!("{debug}\n{err}"),
        }
    };
    if let Some(text) = leaks(&cache_text).filter(|_| !OWN_WORDS.contains(password)) {
        return Err(format!("the cache shows {url:?} as {text:?}"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Configuration

/// `(flag, variable)` for every setting, in table order: the flags from clap, the variables from
/// `herdsman check`'s listing.
pub fn settings() -> Vec<(String, &'static str)> {
    let command = Flags::augment_args(clap::Command::new("herdsman"));
    let flags: Vec<String> = command.get_arguments().filter_map(|arg| arg.get_long()).map(String::from).collect();
    let variables: Vec<&'static str> = Config::default().describe().into_iter().map(|(var, _)| var).collect();
    assert_eq!(flags.len(), variables.len(), "one flag per variable");
    flags.into_iter().zip(variables).collect()
}

/// Flags (index into [`settings`], value) and environment pairs through [`Config::resolve`]:
/// it must not panic; an error is one line naming the flag or variable that was given; a
/// resolved configuration survives the trip to a worker.
pub fn check_config(
    settings: &[(String, &'static str)],
    flags: &[(usize, String)],
    env: &[(String, String)],
) -> Result<(), String> {
    // One value per flag (the last), given as `--flag=value` so that any value stays one value.
    let given: HashMap<&str, &str> =
        flags.iter().map(|(i, value)| (settings[i % settings.len()].0.as_str(), value.as_str())).collect();
    let args =
        std::iter::once("herdsman".to_string()).chain(given.iter().map(|(flag, value)| format!("--{flag}={value}")));
    let Ok(matches) = Flags::augment_args(clap::Command::new("herdsman")).try_get_matches_from(args) else {
        return Ok(()); // clap's own error, not ours
    };
    let parsed = Flags::from_arg_matches(&matches).map_err(|e| format!("clap: {e}"))?;

    match Config::resolve(&parsed, env.iter().cloned()) {
        Ok(config) => {
            let json = serde_json::to_string(&config).map_err(|e| format!("serialise: {e}"))?;
            let back: Config = serde_json::from_str(&json).map_err(|e| format!("deserialise {json}: {e}"))?;
            if back != config {
                return Err(format!("the worker would see {back:?}, not {config:?}"));
            }
            Ok(())
        }
        Err(err) => check_config_error(settings, &given, env, &err),
    }
}

fn check_config_error(
    settings: &[(String, &'static str)],
    given: &HashMap<&str, &str>,
    env: &[(String, String)],
    err: &ConfigError,
) -> Result<(), String> {
    let line = err.to_string();
    if line.contains(['\n', '\r']) {
        return Err(format!("not one line: {line:?}"));
    }
    if !line.contains(&err.source_name) {
        return Err(format!("{line:?} does not name {:?}", err.source_name));
    }
    let set_in_env =
        |var: &str| env.iter().any(|(name, value)| name.eq_ignore_ascii_case(var) && !value.trim().is_empty());
    let culprit = settings.iter().find(|(flag, var)| err.source_name == format!("--{flag}") || err.source_name == *var);
    match culprit {
        Some((flag, _)) if err.source_name.starts_with("--") && given.contains_key(flag.as_str()) => Ok(()),
        Some((flag, var)) if !given.contains_key(flag.as_str()) && set_in_env(var) => Ok(()),
        Some(_) => Err(format!("{line:?} names a source that was not given (or was overridden)")),
        None => Err(format!("{line:?} names neither a flag nor a variable")),
    }
}

// ---------------------------------------------------------------------------------------------
// Cache model

/// How long a value is to live.
#[derive(Clone, Copy, Debug)]
pub enum Ttl {
    Forever,
    /// A few milliseconds: may run out during the sequence.
    Millis(u8),
    /// An hour: outlives any sequence.
    Hour,
}

impl Ttl {
    fn duration(self) -> Option<Duration> {
        match self {
            Ttl::Forever => None,
            // The cache stores a zero TTL as 1 ms (Redis refuses 0).
            Ttl::Millis(ms) => Some(Duration::from_millis(u64::from(ms).max(1))),
            Ttl::Hour => Some(Duration::from_secs(3600)),
        }
    }
}

#[derive(Clone, Debug)]
pub enum CacheOp {
    Set {
        key: u8,
        value: Vec<u8>,
        ttl: Ttl,
    },
    Get {
        key: u8,
    },
    Delete {
        key: u8,
    },
    /// Real time passes (the memory tier follows `std::time::Instant`, not tokio's clock).
    Sleep {
        micros: u16,
    },
}

/// What the model knows of a key: the value set last and the window in which it expires. The
/// memory tier stamps the deadline from `Instant::now()` somewhere inside `set`, so the model
/// brackets `set` and each `get` with readings of its own and only judges outside the window.
struct Expected {
    value: Bytes,
    /// Earliest and latest possible deadline.
    expires: Option<(Instant, Instant)>,
    /// A read already found it gone: it must stay gone.
    seen_gone: bool,
}

/// Keys from a small set, so that operations meet.
pub fn key_name(key: u8) -> String {
    format!("k{}", key % 8)
}

/// Runs `ops` on a fresh memory-only cache and on a map with deadlines; they must agree. With a
/// `capacity` below the number of keys, the cache may forget a value early (eviction) but must
/// never answer a value other than the last one set.
pub async fn check_cache_model(capacity: u64, ops: &[CacheOp]) -> Result<(), String> {
    let cache = Cache::new(CacheConfig { memory_capacity: capacity.max(1), ..CacheConfig::default() })
        .map_err(|e| format!("memory-only cache: {e}"))?;
    let may_evict = capacity < 8;
    let mut model: HashMap<String, Expected> = HashMap::new();
    let mut slept = Duration::ZERO;
    for (step, op) in ops.iter().enumerate() {
        match op {
            CacheOp::Set { key, value, ttl } => {
                let before = Instant::now();
                cache
                    .set(&key_name(*key), Bytes::from(value.clone()), ttl.duration())
                    .await
                    .map_err(|e| e.to_string())?;
                let after = Instant::now();
                let expires = ttl.duration().map(|ttl| (before + ttl, after + ttl));
                model.insert(key_name(*key), Expected { value: Bytes::from(value.clone()), expires, seen_gone: false });
            }
            CacheOp::Delete { key } => {
                cache.delete(&key_name(*key)).await.map_err(|e| e.to_string())?;
                model.remove(&key_name(*key));
            }
            CacheOp::Get { key } => {
                let name = key_name(*key);
                let start = Instant::now();
                let got = cache.get(&name).await.map_err(|e| e.to_string())?;
                let end = Instant::now();
                let expected = model.get_mut(&name);
                let fail = |what: &str| Err(format!("step {step}: get({name:?}) = {got:?}: {what}; ops: {ops:?}"));
                match (expected, &got) {
                    (None, None) => {}
                    (None, Some(_)) => return fail("deleted or never set"),
                    (Some(e), Some(value)) if *value != e.value => return fail("not the value set last"),
                    (Some(e), Some(_)) if e.seen_gone => return fail("came back after it was gone"),
                    (Some(e), Some(_)) => {
                        if e.expires.is_some_and(|(_, latest)| start > latest) {
                            return fail("expired");
                        }
                    }
                    (Some(e), None) => {
                        let surely_live = e.expires.is_none_or(|(earliest, _)| end < earliest);
                        if surely_live && !may_evict {
                            return fail("lost before its deadline");
                        }
                        e.seen_gone = true;
                    }
                }
            }
            CacheOp::Sleep { micros } => {
                // Bounded per sequence, so that a fuzzer cannot make every run slow.
                let nap = Duration::from_micros(u64::from(*micros) % 2_000);
                if slept + nap <= Duration::from_millis(4) {
                    slept += nap;
                    std::thread::sleep(nap);
                }
            }
        }
    }
    Ok(())
}
