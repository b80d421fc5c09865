//! A two-tier cache: Redis when it answers, process memory when it does not.
//!
//! # Why two tiers
//!
//! On a PaaS, Redis is a separate service reached over the network. It
//! restarts for maintenance, fails over, or becomes slow, and none of that
//! should take the web service down with it. So every worker keeps a bounded
//! in-memory cache ([quick_cache]) next to Redis and the cache degrades instead of
//! failing:
//!
//! ```text
//!                 +-------------------- Cache --------------------+
//!   get/set ----> | breaker closed (Up):  Redis  + memory copy    |
//!                 | breaker open (Fallback): memory only          |
//!                 +-----------------------------------------------+
//!                         ^ background probe: PING every 250 ms..1 s
//! ```
//!
//! # The circuit breaker
//!
//! Every Redis operation, including checking a connection out of the pool, is bounded by
//! [`CacheConfig::operation_timeout`]; a request's round trip is first given a tighter deadline
//! fitted to Redis's observed latency ([`deadline`]). The breaker opens for a Redis that does
//! not answer, never for a busy one ([`liveness`]). Precisely, it *opens* when:
//!
//! 1. a request gets an outage error (connection refused or reset, or a reply in the outage
//!    rows of the table below): at once;
//! 2. a request's fitted deadline passes without a reply, no other reply arrived within the last
//!    half deadline, *and* a `PING` on a connection that carries nothing else is not answered
//!    within the same fitted deadline (or fails) while the worker was not itself too busy to
//!    read it: so a hung Redis is left after one fitted deadline plus one PING's. One such check
//!    runs at a time per worker, and every request that became late before it ended takes its
//!    answer;
//! 3. five small requests in a row that Redis, answering PING, did not answer within the
//!    operation timeout (a stuck connection; any small success resets the count).
//!
//! A late request whose PING is answered keeps waiting (asking again each fitted deadline), up to
//! the operation timeout, instead of being answered from a possibly stale memory copy. If the
//! timeout passes first, that request alone fails ([`CacheError::Late`]): a read is answered
//! from memory (counted as refused), a write is refused (the HTTP API's 503) and its memory
//! copy dropped, since Redis may or may not have applied it; a durable operation fails (503).
//! Large transfers (a write of 64 KiB or more, a read of a key whose memory copy is that large,
//! the replay and warm-up pipelines) ride a pool of their own, so sessions, the login throttle,
//! quota checks and small values never queue behind them, and their lateness never counts
//! toward rule 3.
//!
//! Opening the breaker answers the request that saw it from memory, releases every request of
//! the worker still waiting on Redis to memory at once ([`redis_tier`]: a hang costs little more
//! than an outage), and later requests do not touch Redis at all. A
//! single background task then writes a probe key ([`redis_tier::PROBE_KEY`])
//! with exponential back-off plus ±25% jitter (250 ms doubling up to 1 s, so a
//! recovered Redis is noticed within about 1.25 s) and closes the breaker once
//! Redis takes the write: answering PING is not enough, a full Redis, a
//! replica or one still loading answers it. Each transition is logged once:
//! `warn!` going down (with the reason, also in `/health`), `info!` coming back.
//!
//! # Error replies
//!
//! Every reply falls in one of two classes ([`CacheError::is_outage`]):
//!
//! | Redis says                                   | Means                      | Cache (`/cache`)                                  | Durable (users)                |
//! |----------------------------------------------|----------------------------|---------------------------------------------------|--------------------------------|
//! | connection refused or reset, no answer nor PING by the deadline | down or hung | breaker opens: memory, writes replayed afterwards | 503 + `Retry-After`            |
//! | `OOM` (full, `noeviction`)                   | cannot take writes now     | same                                              | same                           |
//! | `READONLY` (a replica after a failover)      | same; reconnecting may reach the new primary | same (the pool is discarded, the probe reconnects) | same |
//! | `LOADING` (restarted, loading its data)      | cannot serve yet           | same                                              | same                           |
//! | `BUSY` (a long script)                       | cannot serve until it ends | same                                              | same                           |
//! | `MISCONF` (cannot persist, refuses writes)   | cannot take writes now     | same                                              | same                           |
//! | `NOAUTH`, `WRONGPASS`, `NOPERM` (password rotated, ACL changed) | our credentials no longer work | same; `/health` says so until `REDIS_URL` is fixed | same |
//! | `MASTERDOWN`, `CLUSTERDOWN`, `TRYAGAIN`, `NOREPLICAS` | not now            | same                                              | same                           |
//! | any other error (`WRONGTYPE`, `ERR ...`)     | this command is refused    | read: answered from memory; write: refused (503), memory copy dropped | the error (503) |
//!
//! The HTTP API's session check ([`crate::sessions`]) is a durable round trip, and its quota
//! check is made by Redis in the write's own round trip ([`Cache::set_checked`]); both ride the
//! small connections with the same fitted deadline, and open the breaker by the same rules. The session is
//! then answered from the worker's memory of the sessions it verified (a remembered one works,
//! an unknown token is 503 + `Retry-After`), and a write whose quota could not be checked takes
//! the outage path below only within what the caller knows of the owner's usage
//! ([`Cache::set_checked`]'s `may_hold`), counted when replayed.
//!
//! So a write Redis did not take is never acknowledged as stored in Redis: it
//! is kept in memory (`x-cache-tier: memory`), read back from there while the
//! breaker is open, and replayed when Redis takes writes again; a replayed
//! write Redis still refuses for the same reason waits for the next round
//! instead of being dropped (an older value left in Redis would be read once
//! the breaker closes).
//!
//! # Writes during an outage
//!
//! While the breaker is open, `set` and `delete` still update memory and are
//! also recorded, with their stamp, in a bounded *pending* map (one slot per key).
//! When Redis is back, the probe replays that map in pipelined batches *before*
//! it closes the breaker; writes racing with the replay land in the map again
//! and are replayed in the next round. Writers arriving while the replay runs
//! wait for it (at most one fitted deadline), so a steady stream of writes to
//! the same keys cannot keep refilling the map and the breaker open. A write
//! that would take the held writes past [`MAX_PENDING_WRITES`] distinct keys or
//! past their byte budget cannot be kept: it fails with
//! [`CacheError::ReplayFull`] (the HTTP API answers `507`), its key is dropped
//! from memory, and the count is logged at recovery. A caller is never told a
//! write was kept when it was not.
//!
//! # Consistency across workers and instances
//!
//! Every worker of every instance shares the one Redis, and each holds its own
//! writes through its own outages. Every write is stamped with the time it was
//! acknowledged and a delete leaves a tombstone ([`stamped`]): a replayed write
//! applies only where Redis holds nothing newer, so an acknowledged write is
//! never replaced by one acknowledged before it, and a delete is never undone by
//! a replay. The whole contract, with what it rests on (clocks, tombstone
//! lifetime), is docs/consistency.md.
//!
//! # Keys
//!
//! Cache keys live under `herdsman:cache:{key}` in Redis, so nothing written
//! through the cache API can clobber the durable records (users, sessions)
//! that [`DurableStore`] manages under other prefixes.
//!
//! # Durable operations
//!
//! Some data must never silently live in memory only: user accounts, login
//! sessions. [`Cache::durable`] hands out a [`DurableStore`] whose operations
//! go to Redis or fail fast with [`CacheError::Unavailable`] while the
//! breaker is open, so callers can answer `503` instead of lying.
//!
//! # Files
//!
//! [`memory`] (the bounded tier), [`redis_tier`] (pools, breaker, probe, replay),
//! [`stamped`] (the order of writes: stamps, tombstones, the write script),
//! [`deadline`] (a round trip's deadline, fitted to Redis's latency), [`liveness`] (a late reply:
//! hung or busy; small and bulk connections) and [`durable`]
//! (no-fallback operations); this file is the [`Cache`] that chooses between them.
//!
//! # Lifecycle
//!
//! [`Cache::new`] only validates the URL; nothing connects and no task is
//! spawned, so it is safe to call before the runtime exists (or before a
//! fork). The connection pool is built lazily inside the runtime by
//! [`Cache::connect`] (the warm-up task) or by the first operation.

mod deadline;
mod durable;
mod liveness;
mod memory;
mod redis_tier;
mod stamped;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bb8_redis::redis;
use bytes::Bytes;
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use tracing::debug;

use crate::config::redact_url;
use memory::{Entry, MemoryTier};
use redis_tier::{ensure_probe, trip, Pending, RedisTier, Remembered, Request, Write};
use stamped::Outcome;

use crate::metrics::{self, Event};

pub use durable::{DurableStore, Script};
pub use stamped::{Quota, Usage};

/// Prefix of every cache key in Redis.
pub const KEY_PREFIX: &str = "herdsman:cache:";

/// Most distinct keys remembered for replay during one outage.
pub const MAX_PENDING_WRITES: usize = 10_000;

/// How the cache is set up; see [`Default`] for the defaults.
#[derive(Clone)]
pub struct CacheConfig {
    /// `redis://` or `rediss://` URL; `None` means memory only.
    pub redis_url: Option<String>,
    /// Upper bound for any single Redis operation, pool checkout included.
    pub operation_timeout: Duration,
    /// The shortest a request's round trip deadline gets; the deadline follows Redis's
    /// observed latency from this up to `operation_timeout` (see [`deadline`]).
    pub deadline_floor: Duration,
    /// Bytes (keys, values and a per-entry overhead) kept in memory at most; as much again for
    /// writes waiting for replay.
    pub memory_capacity: u64,
    /// Most Redis connections per worker.
    pub pool_size: u32,
    /// With `rediss://`, accept the server's certificate without verifying it.
    pub tls_insecure: bool,
    /// With `rediss://`, trust exactly the CAs of this PEM file instead of the built-in web roots.
    pub ca_cert: Option<PathBuf>,
    /// How long a delete's tombstone stays in Redis: at least the longest TTL a value is given,
    /// so that no held write can be replayed over a delete that came after it ([`stamped`]).
    pub tombstone_lifetime: Duration,
}

impl CacheConfig {
    /// The cache settings of a herdsman configuration.
    pub fn from_config(config: &crate::config::Config) -> CacheConfig {
        CacheConfig {
            redis_url: config.redis_url.clone(),
            operation_timeout: config.redis_timeout,
            deadline_floor: config.redis_min_timeout,
            memory_capacity: config.cache_max_bytes,
            tls_insecure: config.redis_tls_insecure,
            ca_cert: config.redis_ca_cert.clone(),
            pool_size: redis_tier::POOL_SIZE,
            tombstone_lifetime: config.cache_max_ttl,
        }
    }
}

/// The defaults of the settings table ([`crate::config`]): each default is defined there once.
impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig::from_config(&crate::config::Config::default())
    }
}

/// Hides the password in `redis_url`, so configs can be logged.
impl fmt::Debug for CacheConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheConfig")
            .field("redis_url", &self.redis_url.as_deref().map(redact_url))
            .field("operation_timeout", &self.operation_timeout)
            .field("deadline_floor", &self.deadline_floor)
            .field("memory_capacity", &self.memory_capacity)
            .field("pool_size", &self.pool_size)
            .field("tls_insecure", &self.tls_insecure)
            .field("ca_cert", &self.ca_cert)
            .field("tombstone_lifetime", &self.tombstone_lifetime)
            .finish()
    }
}

/// Why a cache or durable-store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The configured URL cannot be used; the message never contains the password.
    #[error("invalid REDIS_URL: {0}")]
    InvalidUrl(String),
    /// Another setting is unusable (e.g. a zero operation timeout).
    #[error("invalid cache configuration: {0}")]
    InvalidConfig(String),
    /// Redis is not usable right now (breaker open, not yet connected, or not configured).
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// Redis answered with an error, or the connection failed.
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis is away and the writes held for replay fill their budget: this write was not kept.
    #[error("redis unavailable and the writes held for replay fill their budget; this write was not kept")]
    ReplayFull,
    /// Redis did not answer within the operation timeout.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis answers (PING) but did not answer this request within the operation timeout.
    #[error("redis is busy: this request was not answered within {0:?}")]
    Late(Duration),
}

impl CacheError {
    /// Whether this error means Redis cannot serve us now (open the breaker), as opposed to
    /// Redis refusing one command (`WRONGTYPE`, a generic `ERR`), which says nothing about
    /// the next one. See "Error replies" in the module doc for the table.
    pub fn is_outage(&self) -> bool {
        use redis::ErrorKind;
        match self {
            CacheError::InvalidUrl(_) | CacheError::InvalidConfig(_) | CacheError::ReplayFull | CacheError::Late(_) => {
                false
            }
            CacheError::Unavailable(_) | CacheError::Timeout(_) => true,
            CacheError::Redis(err) => match err.kind() {
                ErrorKind::Server(_) | ErrorKind::Extension => match err.code() {
                    Some(code) => is_outage_code(code),
                    // A pipeline's refusals (`GET` + `PTTL`) come as a list.
                    None => err
                        .clone()
                        .into_server_errors()
                        .is_some_and(|refusals| refusals.iter().any(|(_, refusal)| is_outage_code(refusal.code()))),
                },
                ErrorKind::UnexpectedReturnType | ErrorKind::Parse => false,
                // I/O, authentication at connect, client-side failures.
                _ => true,
            },
        }
    }
}

/// The error codes of a Redis that is there but cannot take our commands now: it is full
/// (`OOM`), a replica (`READONLY`, after a failover), loading its data (`LOADING`), running a
/// script (`BUSY`), failing to persist (`MISCONF`), or no longer accepts our password or user
/// (`NOAUTH`, `WRONGPASS`, `NOPERM`), or a cluster state says "later".
fn is_outage_code(code: &str) -> bool {
    matches!(
        code,
        "OOM"
            | "READONLY"
            | "LOADING"
            | "BUSY"
            | "MISCONF"
            | "NOAUTH"
            | "WRONGPASS"
            | "NOPERM"
            | "MASTERDOWN"
            | "CLUSTERDOWN"
            | "TRYAGAIN"
            | "NOREPLICAS"
    )
}

/// Where the cache is reading and writing right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisStatus {
    /// Breaker closed: Redis is the source of truth.
    Up,
    /// Breaker open since `since`: memory only, a probe is retrying.
    Fallback { reason: String, since: Instant },
    /// Configured but the first connection has not succeeded yet.
    Connecting,
    /// No `REDIS_URL`: memory only, by design.
    Disabled,
}

/// `{"status":"up"}`, `{"status":"fallback","reason":"...","for_ms":1234}`, ...
impl Serialize for RedisStatus {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            RedisStatus::Fallback { reason, since } => {
                let mut map = serializer.serialize_map(Some(3))?;
                map.serialize_entry("status", "fallback")?;
                map.serialize_entry("reason", reason)?;
                let for_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX);
                map.serialize_entry("for_ms", &for_ms)?;
                map.end()
            }
            other => {
                let status = match other {
                    RedisStatus::Up => "up",
                    RedisStatus::Connecting => "connecting",
                    _ => "disabled",
                };
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("status", status)?;
                map.end()
            }
        }
    }
}

/// What [`Cache::set_checked`] did with a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checked {
    /// Stored in this tier: Redis after the quota check passed (with the owner's usage after
    /// it), or memory, held for replay with the check not made because Redis was away or late.
    Stored(Tier, Option<Usage>),
    /// The quota refused it (1: keys, 2: bytes), with the owner's usage; nothing was written.
    Refused(i64, Option<Usage>),
    /// Redis was away or late and the caller did not allow holding it: nothing was written.
    NotHeld,
}

/// Where a write went.
enum Stored {
    /// Redis answered the write script.
    Online(Outcome, Option<Usage>),
    /// Held in memory for replay (or memory is the only tier).
    Held,
    /// Redis was away and the caller did not allow holding it.
    NotHeld,
}

impl Stored {
    fn tier(&self) -> Tier {
        match self {
            Stored::Online(..) => Tier::Redis,
            Stored::Held | Stored::NotHeld => Tier::Memory,
        }
    }
}

/// Which tier answered an operation (exposed as `x-cache-tier` by the HTTP API).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    Redis,
    Memory,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Redis => "redis",
            Tier::Memory => "memory",
        }
    }
}

struct Inner {
    memory: MemoryTier,
    redis: Option<RedisTier>,
}

/// The two-tier cache. Cheap to clone: every clone shares the same state.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

impl fmt::Debug for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache").field("status", &self.status()).finish_non_exhaustive()
    }
}

impl Cache {
    /// Validates the configuration; never connects, never blocks, spawns nothing.
    pub fn new(config: CacheConfig) -> Result<Cache, CacheError> {
        if config.operation_timeout.is_zero() {
            return Err(CacheError::InvalidConfig("operation_timeout must be greater than zero".to_string()));
        }
        let redis = match config.redis_url.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(url) => Some(RedisTier::new(url, &config)?),
        };
        let memory = MemoryTier::new(config.memory_capacity);
        Ok(Cache { inner: Arc::new(Inner { memory, redis }) })
    }

    /// Makes the first connection (the "redis" warm-up task).
    ///
    /// On success the breaker closes and writes made before are replayed. On
    /// failure the cache stays on memory and a background task keeps
    /// retrying; the error is returned so warm-up can report it. Without a
    /// `REDIS_URL` this is a no-op.
    pub async fn connect(&self) -> Result<(), CacheError> {
        let Some(redis) = &self.inner.redis else {
            return Ok(());
        };
        let result = redis_tier::check_then_replay(redis).await.map(|_| ());
        if let Err(err) = &result {
            trip(&self.inner, redis, err);
        }
        result
    }

    /// Reads a value: from Redis when it is up, otherwise from memory.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, CacheError> {
        self.get_with_tier(key).await.map(|(value, _)| value)
    }

    /// Like [`get`](Self::get), also saying which tier answered.
    pub async fn get_with_tier(&self, key: &str) -> Result<(Option<Bytes>, Tier), CacheError> {
        if let Some(redis) = self.redis_if_up() {
            let mut pipe = redis::pipe();
            redis_tier::get_with_pttl(&mut pipe, key);
            let purpose = liveness::Purpose::reading(self.cached_len(key));
            let reply = redis.query_for::<(Option<Vec<u8>>, i64)>(purpose, Request::Pipe(&pipe)).await;
            // A tombstone reads as absent.
            match reply.map(|(stored, pttl)| (stored.and_then(|stored| stamped::decode(Bytes::from(stored))), pttl)) {
                Ok((Some(value), pttl)) => {
                    if let Some(ttl) = redis_tier::lifetime_from_pttl(pttl) {
                        // Refresh the memory copy only when it differs: an insert costs more
                        // than a read, and hot keys are read far more often than written.
                        let copy = self.inner.memory.get(key);
                        let same = copy.is_some_and(|c| c.value == value && c.expires_at.is_some() == ttl.is_some());
                        if !same {
                            self.inner.memory.insert(key.to_string(), Entry::new(value.clone(), ttl));
                        }
                    }
                    metrics::count(Event::CacheGetRedisHit);
                    return Ok((Some(value), Tier::Redis));
                }
                Ok((None, _)) => {
                    self.inner.memory.invalidate(key);
                    metrics::count(Event::CacheGetRedisMiss);
                    return Ok((None, Tier::Redis));
                }
                Err(err) if err.is_outage() => trip(&self.inner, redis, &err),
                Err(err) => {
                    metrics::count(Event::CacheRedisRefused);
                    debug!(key, error = %err, "redis refused a cache read")
                }
            }
        }
        let value = self.inner.memory.get(key).filter(Entry::is_live).map(|entry| entry.value);
        metrics::count(if value.is_some() { Event::CacheGetMemoryHit } else { Event::CacheGetMemoryMiss });
        Ok((value, Tier::Memory))
    }

    /// The size of this worker's memory copy of `key`, if it has a live one: what a read of it
    /// will most likely return, known before the read (Redis may hold another value by now).
    pub fn cached_len(&self, key: &str) -> Option<usize> {
        self.inner.memory.get(key).filter(Entry::is_live).map(|entry| entry.value.len())
    }

    /// Stores a value in memory and, when it is up, in Redis.
    pub async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<(), CacheError> {
        self.set_with_tier(key, value, ttl).await.map(|_| ())
    }

    /// Like [`set`](Self::set), saying which tier holds the write: `Redis`
    /// means it reached Redis (and memory), `Memory` means memory only (replayed to Redis
    /// once it takes writes again, ordered by its stamp: see "Consistency"). An error means
    /// Redis refused this very write for good (not an outage, see "Error replies"), or that it
    /// could not be held: it is stored nowhere.
    pub async fn set_with_tier(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<Tier, CacheError> {
        // Redis expiries have millisecond resolution and reject 0.
        let ttl = ttl.map(|ttl| ttl.max(Duration::from_millis(1)));
        let write = Write::Set(Entry::new(value, ttl));
        Ok(self.write(key, write, None, true).await?.tier())
    }

    /// Like [`set_with_tier`](Self::set_with_tier), with `quota` checked and counted by Redis in
    /// the same round trip, atomically: a write costs one round trip, not one for the check and
    /// one for the write. While Redis is away, or when it does not answer at all (no reply, no
    /// PING: the breaker opens), the quota cannot be checked: the write is held for replay (counted then,
    /// never refused) only if the caller allows it with `may_hold`, which it decides from what
    /// it knows of the owner's usage; otherwise it is [`Checked::NotHeld`] and stored nowhere.
    /// A refused write leaves both tiers as they were.
    pub async fn set_checked(
        &self,
        key: &str,
        value: Bytes,
        ttl: Duration,
        quota: Quota,
        may_hold: bool,
    ) -> Result<Checked, CacheError> {
        let write = Write::Set(Entry::new(value, Some(ttl.max(Duration::from_millis(1)))));
        Ok(match self.write(key, write, Some(Arc::new(quota)), may_hold).await? {
            Stored::Online(Outcome::OverQuota(code), usage) => Checked::Refused(code, usage),
            Stored::Online(_, usage) => Checked::Stored(Tier::Redis, usage),
            Stored::Held => Checked::Stored(Tier::Memory, None),
            Stored::NotHeld => Checked::NotHeld,
        })
    }

    /// Removes a key from both tiers.
    pub async fn delete(&self, key: &str) -> Result<(), CacheError> {
        self.delete_with_tier(key).await.map(|_| ())
    }

    /// Like [`delete`](Self::delete), saying whether the delete reached Redis. In Redis a
    /// delete leaves a tombstone, so that no older write replayed later can bring the key back.
    pub async fn delete_with_tier(&self, key: &str) -> Result<Tier, CacheError> {
        self.delete_counted(key, None).await
    }

    /// Like [`delete_with_tier`](Self::delete_with_tier), also releasing the value's entry in
    /// `quota`'s usage hash in the same round trip, online or when held and replayed.
    pub async fn delete_with_quota(&self, key: &str, quota: Quota) -> Result<Tier, CacheError> {
        self.delete_counted(key, Some(Arc::new(quota))).await
    }

    async fn delete_counted(&self, key: &str, quota: Option<Arc<Quota>>) -> Result<Tier, CacheError> {
        Ok(self.write(key, Write::Delete, quota, true).await?.tier())
    }

    /// Writes through to Redis, or holds the write for replay; keeps memory in step with what
    /// was stored and counts the write by the tier it reached.
    async fn write(
        &self,
        key: &str,
        write: Write,
        quota: Option<Arc<Quota>>,
        may_hold: bool,
    ) -> Result<Stored, CacheError> {
        let pending = Pending { write, stamp: stamped::now(), quota };
        let stored = self.write_through(key, &pending, may_hold).await;
        let kept = match (&stored, &pending.write) {
            (Ok(Stored::Online(Outcome::Written, _)) | Ok(Stored::Held), Write::Set(entry)) => Some(entry),
            _ => None,
        };
        match kept {
            Some(entry) => self.inner.memory.insert(key.to_string(), entry.clone()),
            // Deleted, refused or not kept: memory must not serve what the caller is told
            // is not there.
            None => self.inner.memory.invalidate(key),
        }
        match &stored {
            Ok(Stored::Online(Outcome::Written | Outcome::Superseded, _)) => metrics::count(Event::CacheWriteRedis),
            Ok(Stored::Held) => metrics::count(Event::CacheWriteMemory),
            _ => {}
        }
        stored
    }

    async fn write_through(&self, key: &str, pending: &Pending, may_hold: bool) -> Result<Stored, CacheError> {
        let Some(redis) = &self.inner.redis else {
            return Ok(Stored::Held);
        };
        if !redis.is_up() {
            redis.wait_for_replay().await;
        }
        // Two rounds at most: a second one only if the breaker closed between
        // our check and `remember`, which then refused the write.
        for _ in 0..2 {
            if redis.is_up() {
                // Boxed: the write script's round trip nests the liveness check's futures, and a
                // crate awaiting a cache write inside its own deep futures must not have to lay
                // out all of them (rustc's query depth limit).
                let online: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send + '_>> =
                    Box::pin(redis.write_online(key, pending));
                match online.await {
                    Ok((outcome, usage)) => return Ok(Stored::Online(outcome, usage)),
                    Err(err) if err.is_outage() => trip(&self.inner, redis, &err),
                    Err(err) => return Err(self.refused_write(key, err)),
                }
            } else {
                ensure_probe(&self.inner, &mut redis.lock());
            }
            if !may_hold {
                return Ok(Stored::NotHeld);
            }
            match redis.remember(key, pending) {
                Remembered::Held => return Ok(Stored::Held),
                Remembered::BreakerClosed => {}
                Remembered::Full => return Err(CacheError::ReplayFull),
            }
        }
        Ok(Stored::Held)
    }

    /// Redis refused this one write and will refuse it again: it is stored nowhere (the memory
    /// copy goes too), and the caller is told so.
    fn refused_write(&self, key: &str, err: CacheError) -> CacheError {
        metrics::count(Event::CacheRedisRefused);
        debug!(key, error = %err, "redis refused a cache write");
        err
    }

    /// Loads `keys` from Redis into memory (cache warm-up); returns how many
    /// were found. Memory-only caches load nothing and succeed.
    pub async fn warm(&self, keys: &[String]) -> Result<usize, CacheError> {
        let Some(redis) = &self.inner.redis else {
            return Ok(0);
        };
        if !redis.is_up() {
            return Err(CacheError::Unavailable(self.unavailable_reason()));
        }
        let mut loaded = 0;
        for chunk in keys.chunks(redis_tier::REPLAY_BATCH / 2) {
            let mut pipe = redis::pipe();
            for key in chunk {
                redis_tier::get_with_pttl(&mut pipe, key);
            }
            // Boot-time pipelines of many keys: the operation timeout, not a request's deadline.
            let replies: Vec<redis::Value> = match redis.query_unfitted(Request::Pipe(&pipe)).await {
                Ok(replies) => replies,
                Err(err) => {
                    if err.is_outage() {
                        trip(&self.inner, redis, &err);
                    }
                    return Err(err);
                }
            };
            for (key, pair) in chunk.iter().zip(replies.chunks(2)) {
                let [value, pttl] = pair else { continue };
                let Ok(Some(stored)) = redis::from_redis_value_ref::<Option<Vec<u8>>>(value) else {
                    continue;
                };
                let Some(value) = stamped::decode(Bytes::from(stored)) else { continue };
                let pttl = redis::from_redis_value_ref::<i64>(pttl).unwrap_or(-1);
                let Some(ttl) = redis_tier::lifetime_from_pttl(pttl) else { continue };
                self.inner.memory.insert(key.clone(), Entry::new(value, ttl));
                loaded += 1;
            }
        }
        Ok(loaded)
    }

    /// The budget of the writes this worker may hold for replay: distinct keys and bytes (both
    /// zero without Redis, where nothing is replayed).
    pub fn replay_budget(&self) -> (u64, u64) {
        match &self.inner.redis {
            Some(redis) => (MAX_PENDING_WRITES as u64, redis.pending_max_bytes),
            None => (0, 0),
        }
    }

    /// Where reads and writes go right now (for `/health`).
    pub fn status(&self) -> RedisStatus {
        match &self.inner.redis {
            None => RedisStatus::Disabled,
            Some(redis) => redis.status(),
        }
    }

    /// True when a Redis is configured but not in use (fallback or connecting).
    pub fn is_degraded(&self) -> bool {
        self.inner.redis.as_ref().is_some_and(|redis| !redis.is_up())
    }

    /// Operations that must reach Redis; `None` when no `REDIS_URL` is configured.
    pub fn durable(&self) -> Option<DurableStore> {
        self.inner.redis.as_ref().map(|_| DurableStore::new(self.inner.clone()))
    }

    fn redis_if_up(&self) -> Option<&RedisTier> {
        let redis = self.inner.redis.as_ref()?;
        if redis.is_up() {
            return Some(redis);
        }
        // Not up yet: make sure someone is working on it (e.g. `connect` was
        // never called), then answer from memory.
        ensure_probe(&self.inner, &mut redis.lock());
        None
    }

    fn unavailable_reason(&self) -> String {
        unavailable_reason(self.status())
    }

    /// A client for a connection of its own to the Redis of `config` (the sessions' revocation
    /// channel, [`crate::revocations`]), with the URL's TLS choice, `tls_insecure` and `ca_cert`
    /// honoured as for the pool; `None` without `REDIS_URL`.
    pub(crate) fn dedicated_client(config: &CacheConfig) -> Result<Option<redis::Client>, CacheError> {
        let Some(url) = config.redis_url.as_deref().map(str::trim).filter(|url| !url.is_empty()) else {
            return Ok(None);
        };
        let (info, _) = redis_tier::connection_info(url, config.tls_insecure, config.ca_cert.as_deref())?;
        redis::Client::open(info).map(Some).map_err(|err| CacheError::InvalidUrl(format!("{}: {err}", redact_url(url))))
    }
}

fn unavailable_reason(status: RedisStatus) -> String {
    match status {
        RedisStatus::Fallback { reason, .. } => format!("circuit open: {reason}"),
        RedisStatus::Connecting => "not connected yet".to_string(),
        RedisStatus::Disabled => "no REDIS_URL configured".to_string(),
        RedisStatus::Up => "redis is up".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis_tier::with_tls_choice;

    fn memory_only(capacity: u64) -> Cache {
        Cache::new(CacheConfig { memory_capacity: capacity, ..CacheConfig::default() }).expect("memory-only cache")
    }

    #[tokio::test]
    async fn memory_only_round_trip() {
        let cache = memory_only(1 << 10);
        assert_eq!(cache.status(), RedisStatus::Disabled);
        assert!(!cache.is_degraded());
        assert!(cache.durable().is_none());
        cache.connect().await.expect("connect is a no-op");

        assert_eq!(cache.get("a").await.expect("get"), None);
        let tier = cache.set_with_tier("a", Bytes::from_static(b"1"), None).await.expect("set");
        assert_eq!(tier, Tier::Memory);
        assert_eq!(cache.get_with_tier("a").await.expect("get"), (Some(Bytes::from_static(b"1")), Tier::Memory));
        cache.delete("a").await.expect("delete");
        assert_eq!(cache.get("a").await.expect("get"), None);
        assert_eq!(cache.warm(&["a".to_string()]).await.expect("warm"), 0);
    }

    #[tokio::test]
    async fn memory_ttl_expires() {
        let cache = memory_only(1 << 10);
        cache.set("short", Bytes::from_static(b"x"), Some(Duration::from_millis(50))).await.expect("set");
        cache.set("long", Bytes::from_static(b"y"), Some(Duration::from_secs(60))).await.expect("set");
        assert!(cache.get("short").await.expect("get").is_some());
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(cache.get("short").await.expect("get"), None);
        assert!(cache.get("long").await.expect("get").is_some());
    }

    #[tokio::test]
    async fn memory_is_bounded_in_bytes() {
        let cache = memory_only(1 << 20);
        let value = Bytes::from(vec![7u8; 100 << 10]);
        for i in 0..100 {
            cache.set(&format!("k{i}"), value.clone(), None).await.expect("set");
            // Within the budget after every insert, not only once a batch of evictions ran.
            assert!(cache.inner.memory.weighted_size() <= 1 << 20, "after {i}: {}", cache.inner.memory.weighted_size());
        }
        // 100 values of 100 KiB into 1 MiB: about ten fit, the newest among them.
        assert!(cache.get("k99").await.expect("get").is_some(), "the last value stored was evicted");
        assert!(cache.inner.memory.weighted_size() <= 1 << 20, "{}", cache.inner.memory.weighted_size());
        assert!((1..=10).contains(&cache.inner.memory.entry_count()), "{}", cache.inner.memory.entry_count());
    }

    #[test]
    fn invalid_urls_are_rejected_without_leaking_the_password() {
        for url in ["http://localhost:6379", "localhost:6379", "redis+unix:///tmp/redis.sock", "redis://:hunter2@[::1"]
        {
            let err =
                Cache::new(CacheConfig { redis_url: Some(url.to_string()), ..CacheConfig::default() }).expect_err(url);
            assert!(matches!(err, CacheError::InvalidUrl(_)), "{url}: {err}");
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn tls_verification_is_skipped_only_when_asked() {
        use redis::IntoConnectionInfo;
        let insecure = |url: &str, skip: bool| match with_tls_choice(url, skip).as_ref().into_connection_info() {
            Ok(info) => matches!(info.addr(), redis::ConnectionAddr::TcpTls { insecure: true, .. }),
            Err(e) => panic!("{url}: {e}"),
        };
        assert!(insecure("rediss://:pw@example.invalid:6380", true));
        assert!(!insecure("rediss://:pw@example.invalid:6380", false));
        let config = CacheConfig {
            redis_url: Some("rediss://example.invalid:6380".into()),
            tls_insecure: true,
            ..CacheConfig::default()
        };
        assert!(Cache::new(config).is_ok());
    }

    #[test]
    fn valid_urls_are_accepted_without_connecting() {
        for url in [
            "redis://127.0.0.1:1",
            "redis://[::1]:6379",
            "redis://user:pw@example.invalid:6379/2",
            "rediss://example.invalid:6380",
        ] {
            let cache =
                Cache::new(CacheConfig { redis_url: Some(url.to_string()), ..CacheConfig::default() }).expect(url);
            assert_eq!(cache.status(), RedisStatus::Connecting);
            assert!(cache.is_degraded());
            assert!(cache.durable().is_some());
        }
    }

    #[tokio::test]
    async fn unreachable_redis_falls_back_to_memory_at_once() {
        // Port 1 on loopback refuses connections.
        let cache =
            Cache::new(CacheConfig { redis_url: Some("redis://127.0.0.1:1".to_string()), ..CacheConfig::default() })
                .expect("cache");
        assert!(cache.connect().await.is_err());
        assert!(matches!(cache.status(), RedisStatus::Fallback { .. }));
        let started = Instant::now();
        cache.set("k", Bytes::from_static(b"v"), None).await.expect("set");
        assert_eq!(cache.get_with_tier("k").await.expect("get"), (Some(Bytes::from_static(b"v")), Tier::Memory));
        assert!(started.elapsed() < Duration::from_millis(50));
        let durable = cache.durable().expect("durable");
        assert!(matches!(durable.get("x").await, Err(CacheError::Unavailable(_))));
    }

    #[tokio::test]
    async fn outage_writes_are_bounded_in_bytes_too() {
        let cache = Cache::new(CacheConfig {
            redis_url: Some("redis://127.0.0.1:1".to_string()),
            memory_capacity: 1 << 20,
            ..CacheConfig::default()
        })
        .expect("cache");
        let _ = cache.connect().await;
        let value = Bytes::from(vec![1u8; 100 << 10]);
        let mut refused = 0;
        for i in 0..30 {
            match cache.set(&format!("big{i}"), value.clone(), None).await {
                Ok(()) => {}
                Err(CacheError::ReplayFull) => {
                    refused += 1;
                    assert_eq!(cache.get(&format!("big{i}")).await.expect("get"), None, "refused, so not served");
                }
                Err(other) => panic!("{other}"),
            }
        }
        let redis = cache.inner.redis.as_ref().expect("redis tier");
        let shared = redis.lock();
        assert!(shared.pending_bytes <= 1 << 20, "{}", shared.pending_bytes);
        assert_eq!(shared.pending.len() as u64 + shared.pending_dropped, 30);
        assert_eq!(shared.pending_dropped, refused);
        assert!(shared.pending_dropped >= 20, "{}", shared.pending_dropped);
    }

    #[tokio::test]
    async fn outage_writes_are_bounded_and_last_write_wins() {
        let cache = Cache::new(CacheConfig {
            redis_url: Some("redis://127.0.0.1:1".to_string()),
            memory_capacity: 16 << 20,
            ..CacheConfig::default()
        })
        .expect("cache");
        let _ = cache.connect().await;
        for i in 0..MAX_PENDING_WRITES {
            cache.set(&format!("k{i}"), Bytes::from_static(b"v"), None).await.expect("set");
        }
        for i in MAX_PENDING_WRITES..MAX_PENDING_WRITES + 5 {
            let refused = cache.set(&format!("k{i}"), Bytes::from_static(b"v"), None).await;
            assert!(matches!(refused, Err(CacheError::ReplayFull)), "{refused:?}");
        }
        // Rewriting a remembered key still lands, as its latest value.
        cache.set("k0", Bytes::from_static(b"newest"), None).await.expect("set");
        cache.delete("k1").await.expect("delete");
        let redis = cache.inner.redis.as_ref().expect("redis tier");
        let shared = redis.lock();
        assert_eq!(shared.pending.len(), MAX_PENDING_WRITES);
        assert_eq!(shared.pending_dropped, 5);
        assert!(matches!(
            shared.pending.get("k0"),
            Some(Pending { write: Write::Set(entry), .. }) if entry.value == Bytes::from_static(b"newest")
        ));
        assert!(matches!(shared.pending.get("k1"), Some(Pending { write: Write::Delete, .. })));
    }

    #[test]
    fn error_replies_are_classified_as_the_table_says() {
        let reply = |line: &str| -> CacheError {
            let value = redis::parse_redis_value(format!("-{line}\r\n").as_bytes()).expect("a RESP error");
            CacheError::Redis(value.extract_error().expect_err("an error reply"))
        };
        for line in [
            "OOM command not allowed when used memory > 'maxmemory'.",
            "READONLY You can't write against a read only replica.",
            "LOADING Redis is loading the dataset in memory",
            "BUSY Redis is busy running a script.",
            "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.",
            "NOAUTH Authentication required.",
            "WRONGPASS invalid username-password pair or user is disabled.",
            "NOPERM this user has no permissions to run the 'set' command",
            "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
            "TRYAGAIN Multiple keys request during rehashing of slot",
        ] {
            assert!(reply(line).is_outage(), "{line}");
        }
        for line in ["WRONGTYPE Operation against a key holding the wrong kind of value", "ERR syntax error"] {
            assert!(!reply(line).is_outage(), "{line}");
        }
    }

    #[test]
    fn zero_timeout_is_invalid_config() {
        let err = Cache::new(CacheConfig { operation_timeout: Duration::ZERO, ..CacheConfig::default() })
            .expect_err("zero timeout");
        assert!(matches!(err, CacheError::InvalidConfig(_)), "{err}");
    }

    #[test]
    fn status_serialises_as_small_json() {
        let json = |status: RedisStatus| serde_json::to_value(status).expect("json");
        assert_eq!(json(RedisStatus::Up), serde_json::json!({"status": "up"}));
        assert_eq!(json(RedisStatus::Disabled), serde_json::json!({"status": "disabled"}));
        let fallback = json(RedisStatus::Fallback { reason: "timeout".into(), since: Instant::now() });
        assert_eq!(fallback["status"], "fallback");
        assert_eq!(fallback["reason"], "timeout");
        assert!(fallback["for_ms"].is_u64());
    }

    #[test]
    fn config_debug_redacts_password() {
        let config =
            CacheConfig { redis_url: Some("rediss://default:s3cret@host:6380/0".into()), ..CacheConfig::default() };
        let debug = format!("{config:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("rediss://***@host:6380/0"), "{debug}");
    }
}
