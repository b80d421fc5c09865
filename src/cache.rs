//! A two-tier cache: Redis when it answers, process memory when it does not.
//!
//! # Why two tiers
//!
//! On a PaaS, Redis is a separate service reached over the network. It
//! restarts for maintenance, fails over, or becomes slow, and none of that
//! should take the web service down with it. So every worker keeps a bounded
//! in-memory cache ([moka]) next to Redis and the cache degrades instead of
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
//! Every Redis operation, including checking a connection out of the pool,
//! is bounded by [`CacheConfig::operation_timeout`]. The first error or
//! timeout *opens the breaker*: the request that saw it is answered from
//! memory, and later requests do not touch Redis at all, so they do not each
//! pay the timeout. A single background task then PINGs Redis with
//! exponential back-off plus jitter (250 ms doubling up to 2 s, so a
//! recovered Redis is noticed within about 2.5 s) and closes the breaker once
//! Redis answers. Each transition is logged once: `warn!` going down (with the
//! reason), `info!` coming back.
//!
//! # Writes during an outage
//!
//! While the breaker is open, `set` and `delete` still update memory and are
//! also recorded in a bounded *pending* map (one slot per key, so the last
//! write wins). When Redis is back, the probe replays that map in pipelined
//! batches *before* it closes the breaker; writes racing with the replay land
//! in the map again and are replayed in the next round, so an older
//! outage-write can never overwrite a newer one. A pending `set` whose TTL
//! ran out during the outage is replayed as a `DEL`. If more than
//! [`MAX_PENDING_WRITES`] distinct keys are written during one outage, the
//! excess writes stay in memory only and the loss is logged at recovery.
//!
//! Caveat: each worker process has its own memory tier and its own pending
//! map. During an outage workers do not see each other's writes, and after it
//! each replays its own; "last write wins" holds per worker, not globally.
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
//! # Lifecycle
//!
//! [`Cache::new`] only validates the URL; nothing connects and no task is
//! spawned, so it is safe to call before the runtime exists (or before a
//! fork). The connection pool is built lazily inside the runtime by
//! [`Cache::connect`] (the warm-up task) or by the first operation.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bb8_redis::bb8;
use bb8_redis::redis;
use bb8_redis::RedisConnectionManager;
use bytes::Bytes;
use moka::future::Cache as MemoryCache;
use moka::Expiry;
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use tracing::{debug, info, warn};

use crate::config::redact_url;

/// Prefix of every cache key in Redis.
pub const KEY_PREFIX: &str = "herdsman:cache:";

/// Most distinct keys remembered for replay during one outage.
pub const MAX_PENDING_WRITES: usize = 10_000;

/// Replayed writes per pipelined round trip.
const REPLAY_BATCH: usize = 256;

/// Idle pooled connections are closed after this, well before servers close them.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Every pooled connection is replaced after this, so DNS changes (failover) are picked up.
const POOL_MAX_LIFETIME: Duration = Duration::from_secs(15 * 60);

/// First probe delay after the breaker opens; doubles up to [`PROBE_MAX`].
const PROBE_MIN: Duration = Duration::from_millis(250);
/// One PING a second per worker is nothing to a Redis coming back, and the return is noticed
/// within about a second of it.
const PROBE_MAX: Duration = Duration::from_secs(1);

/// How the cache is set up; see [`Default`] for the defaults.
#[derive(Clone)]
pub struct CacheConfig {
    /// `redis://` or `rediss://` URL; `None` means memory only.
    pub redis_url: Option<String>,
    /// Upper bound for any single Redis operation, pool checkout included.
    pub operation_timeout: Duration,
    /// Most entries kept in memory.
    pub memory_capacity: u64,
    /// Most Redis connections per worker.
    pub pool_size: u32,
    /// With `rediss://`, accept the server's certificate without verifying it.
    pub tls_insecure: bool,
}

impl CacheConfig {
    /// The cache settings of a herdsman configuration.
    pub fn from_config(config: &crate::config::Config) -> CacheConfig {
        CacheConfig {
            redis_url: config.redis_url.clone(),
            operation_timeout: config.redis_timeout,
            memory_capacity: config.cache_entries,
            tls_insecure: config.redis_tls_insecure,
            ..CacheConfig::default()
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            redis_url: None,
            operation_timeout: Duration::from_millis(250),
            memory_capacity: 10_000,
            pool_size: 8,
            tls_insecure: false,
        }
    }
}

/// Hides the password in `redis_url`, so configs can be logged.
impl fmt::Debug for CacheConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheConfig")
            .field("redis_url", &self.redis_url.as_deref().map(redact_url))
            .field("operation_timeout", &self.operation_timeout)
            .field("memory_capacity", &self.memory_capacity)
            .field("pool_size", &self.pool_size)
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
    /// Redis did not answer within the operation timeout.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
}

impl CacheError {
    /// Whether this error means Redis is unreachable or unhealthy (trip the
    /// breaker), as opposed to Redis answering "no" to one command (e.g.
    /// `WRONGTYPE`, or `OOM` on a write), which says nothing about the next one.
    pub fn is_outage(&self) -> bool {
        use redis::{ErrorKind, ServerErrorKind};
        match self {
            CacheError::InvalidUrl(_) | CacheError::InvalidConfig(_) => false,
            CacheError::Unavailable(_) | CacheError::Timeout(_) => true,
            CacheError::Redis(err) => match err.kind() {
                // The server is there but cannot serve (failover, loading...).
                ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                    | ServerErrorKind::ReadOnly
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::TryAgain,
                ) => true,
                // Any other reply: the command was refused, Redis is fine.
                // (`Extension` is an error code the client does not know,
                // such as WRONGTYPE or OOM.)
                ErrorKind::Server(_) | ErrorKind::Extension | ErrorKind::UnexpectedReturnType | ErrorKind::Parse => {
                    false
                }
                // I/O, authentication, client-side failures.
                _ => true,
            },
        }
    }
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

/// A value in memory, with its own deadline so per-entry TTLs are honoured.
#[derive(Clone)]
struct Entry {
    value: Bytes,
    expires_at: Option<Instant>,
}

impl Entry {
    fn new(value: Bytes, ttl: Option<Duration>) -> Entry {
        Entry { value, expires_at: ttl.map(|ttl| Instant::now() + ttl) }
    }

    fn is_live(&self) -> bool {
        self.expires_at.is_none_or(|at| Instant::now() < at)
    }
}

/// Tells moka to evict each entry at its own deadline.
struct EntryExpiry;

impl Expiry<String, Entry> for EntryExpiry {
    fn expire_after_create(&self, _: &String, entry: &Entry, now: Instant) -> Option<Duration> {
        entry.expires_at.map(|at| at.saturating_duration_since(now))
    }

    fn expire_after_update(&self, _: &String, entry: &Entry, now: Instant, _: Option<Duration>) -> Option<Duration> {
        entry.expires_at.map(|at| at.saturating_duration_since(now))
    }
}

/// A write made while Redis was unreachable, waiting to be replayed.
enum Pending {
    Set(Entry),
    Delete,
}

/// Breaker state; only ever changed with [`Shared`]'s lock held.
enum Breaker {
    Connecting,
    Up,
    Fallback { reason: String, since: Instant },
}

struct Shared {
    breaker: Breaker,
    /// Outage writes by cache key (not namespaced).
    pending: HashMap<String, Pending>,
    /// Outage writes not remembered because `pending` was full.
    pending_dropped: u64,
    /// Whether the background probe task is running.
    probing: bool,
}

/// The Redis side: connection pool, breaker and pending writes.
struct RedisTier {
    manager: RedisConnectionManager,
    tls: bool,
    pool_size: u32,
    timeout: Duration,
    /// Built lazily inside the runtime (bb8 spawns tasks when it is built).
    /// Built on first use; replaced after every outage (see [`RedisTier::discard_pool`]).
    pool: Mutex<Option<bb8::Pool<RedisConnectionManager>>>,
    /// Lock-free mirror of `Breaker::Up` for the hot path.
    up: AtomicBool,
    shared: Mutex<Shared>,
}

/// A request sent to Redis as one round trip.
enum Request<'a> {
    Cmd(&'a redis::Cmd),
    Pipe(&'a redis::Pipeline),
}

impl RedisTier {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding this lock cannot leave `Shared` inconsistent
        // (every update is a single assignment), so poisoning is ignored.
        self.shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn pool(&self) -> bb8::Pool<RedisConnectionManager> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        pool.get_or_insert_with(|| {
            if self.tls {
                // rediss:// needs a process-wide rustls provider; a second
                // install (another cache, the app itself) is harmless.
                let _ = rustls::crypto::ring::default_provider().install_default();
            }
            // No PING on every checkout (it would double the round trips of every operation).
            // Connections a server or proxy closes while idle are avoided by recycling idle
            // ones first (Heroku Redis closes them after 300 s); one that dies anyway fails its
            // operation, which opens the breaker and discards the whole pool, so the probe and
            // everything after it use fresh connections.
            bb8::Pool::builder()
                .max_size(self.pool_size)
                .connection_timeout(self.timeout)
                .test_on_check_out(false)
                .idle_timeout(Some(POOL_IDLE_TIMEOUT))
                .max_lifetime(Some(POOL_MAX_LIFETIME))
                .build_unchecked(self.manager.clone())
        })
        .clone()
    }

    /// Drops every pooled connection: after an outage they may all be dead (a restarted Redis,
    /// a failover), and bb8 cannot tell without a PING per checkout.
    fn discard_pool(&self) {
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// One round trip, pool checkout included, bounded by the operation timeout.
    async fn query<T: redis::FromRedisValue>(&self, request: Request<'_>) -> Result<T, CacheError> {
        let work = async {
            // The pool's connections are multiplexed: many requests can share one in flight.
            // So a connection is held only long enough to clone its handle, and goes back to
            // the pool at once; holding it for the round trip would cap a worker at
            // `pool_size` concurrent Redis operations (measured: 0.35x of redis-benchmark's
            // GET rate instead of 0.5x and more).
            let mut conn = {
                let pool = self.pool();
                let pooled = pool.get().await.map_err(|err| match err {
                    bb8::RunError::User(err) => CacheError::Redis(err),
                    bb8::RunError::TimedOut => CacheError::Timeout(self.timeout),
                })?;
                (*pooled).clone()
            };
            let result = match request {
                Request::Cmd(cmd) => cmd.query_async(&mut conn).await,
                Request::Pipe(pipe) => pipe.query_async(&mut conn).await,
            };
            result.map_err(CacheError::Redis)
        };
        tokio::time::timeout(self.timeout, work).await.map_err(|_| CacheError::Timeout(self.timeout))?
    }

    fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    fn status(&self) -> RedisStatus {
        match &self.lock().breaker {
            Breaker::Connecting => RedisStatus::Connecting,
            Breaker::Up => RedisStatus::Up,
            Breaker::Fallback { reason, since } => RedisStatus::Fallback { reason: reason.clone(), since: *since },
        }
    }

    /// Remembers a write for replay; `false` if the breaker closed meanwhile
    /// (the caller must then write to Redis itself).
    fn remember(&self, key: &str, op: Pending) -> bool {
        let mut shared = self.lock();
        if matches!(shared.breaker, Breaker::Up) {
            return false;
        }
        if shared.pending.len() < MAX_PENDING_WRITES || shared.pending.contains_key(key) {
            shared.pending.insert(key.to_string(), op);
        } else {
            shared.pending_dropped += 1;
        }
        true
    }
}

struct Inner {
    memory: MemoryCache<String, Entry>,
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

/// Checks the URL without connecting; errors never echo the password.
/// redis-rs spells "do not verify the server's certificate" as the URL fragment `#insecure`.
fn with_tls_choice(url: &str, insecure: bool) -> std::borrow::Cow<'_, str> {
    if insecure && !url.contains('#') {
        format!("{url}#insecure").into()
    } else {
        url.into()
    }
}

fn parse_url(url: &str, tls_insecure: bool) -> Result<(RedisConnectionManager, bool), CacheError> {
    let tls = if url.starts_with("rediss://") {
        true
    } else if url.starts_with("redis://") {
        false
    } else {
        let scheme = url.split_once("://").map_or("(none)", |(scheme, _)| scheme);
        return Err(CacheError::InvalidUrl(format!("scheme {scheme:?} is not supported, use redis:// or rediss://")));
    };
    let info = redis::IntoConnectionInfo::into_connection_info(with_tls_choice(url, tls && tls_insecure).as_ref())
        .map_err(|err| CacheError::InvalidUrl(format!("cannot parse {}: {err}", redact_url(url))))?;
    let manager = RedisConnectionManager::new(info)
        .map_err(|err| CacheError::InvalidUrl(format!("{}: {err}", redact_url(url))))?;
    Ok((manager, tls))
}

impl Cache {
    /// Validates the configuration; never connects, never blocks, spawns nothing.
    pub fn new(config: CacheConfig) -> Result<Cache, CacheError> {
        if config.operation_timeout.is_zero() {
            return Err(CacheError::InvalidConfig("operation_timeout must be greater than zero".to_string()));
        }
        let redis = match config.redis_url.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(url) => {
                let (manager, tls) = parse_url(url, config.tls_insecure)?;
                Some(RedisTier {
                    manager,
                    tls,
                    pool_size: config.pool_size.max(1),
                    timeout: config.operation_timeout,
                    pool: Mutex::new(None),
                    up: AtomicBool::new(false),
                    shared: Mutex::new(Shared {
                        breaker: Breaker::Connecting,
                        pending: HashMap::new(),
                        pending_dropped: 0,
                        probing: false,
                    }),
                })
            }
        };
        let memory = MemoryCache::builder().max_capacity(config.memory_capacity).expire_after(EntryExpiry).build();
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
        let result = match redis.query::<String>(Request::Cmd(&redis::cmd("PING"))).await {
            Ok(_) => replay_and_close(redis).await.map(|_| ()),
            Err(err) => Err(err),
        };
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
            let redis_key = redis_key(key);
            let mut pipe = redis::pipe();
            // One round trip; no MULTI/EXEC needed: a key that expires in between reads as PTTL -2.
            pipe.cmd("GET").arg(&redis_key).cmd("PTTL").arg(&redis_key);
            match redis.query::<(Option<Vec<u8>>, i64)>(Request::Pipe(&pipe)).await {
                Ok((Some(value), pttl)) => {
                    let value = Bytes::from(value);
                    // PTTL: -1 no expiry, -2 gone (raced with expiry), else ms left.
                    let ttl = u64::try_from(pttl).ok().map(Duration::from_millis);
                    if pttl != -2 {
                        // Refresh the memory copy only when it differs: an insert costs more
                        // than a read, and hot keys are read far more often than written.
                        let copy = self.inner.memory.get(key).await;
                        let same = copy.is_some_and(|c| c.value == value && c.expires_at.is_some() == ttl.is_some());
                        if !same {
                            self.inner.memory.insert(key.to_string(), Entry::new(value.clone(), ttl)).await;
                        }
                    }
                    return Ok((Some(value), Tier::Redis));
                }
                Ok((None, _)) => {
                    self.inner.memory.invalidate(key).await;
                    return Ok((None, Tier::Redis));
                }
                Err(err) if err.is_outage() => trip(&self.inner, redis, &err),
                Err(err) => debug!(key, error = %err, "redis refused a cache read"),
            }
        }
        let value = self.inner.memory.get(key).await.filter(Entry::is_live).map(|entry| entry.value);
        Ok((value, Tier::Memory))
    }

    /// Stores a value in memory and, when it is up, in Redis.
    pub async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<(), CacheError> {
        self.set_with_tier(key, value, ttl).await.map(|_| ())
    }

    /// Like [`set`](Self::set), saying which tier holds the write: `Redis`
    /// means it reached Redis (and memory), `Memory` means memory only.
    pub async fn set_with_tier(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<Tier, CacheError> {
        // Redis expiries have millisecond resolution and reject 0.
        let ttl = ttl.map(|ttl| ttl.max(Duration::from_millis(1)));
        let entry = Entry::new(value, ttl);
        self.inner.memory.insert(key.to_string(), entry.clone()).await;
        self.write(key, Pending::Set(entry)).await
    }

    /// Removes a key from both tiers.
    pub async fn delete(&self, key: &str) -> Result<(), CacheError> {
        self.delete_with_tier(key).await.map(|_| ())
    }

    /// Like [`delete`](Self::delete), saying whether the delete reached Redis.
    pub async fn delete_with_tier(&self, key: &str) -> Result<Tier, CacheError> {
        self.inner.memory.invalidate(key).await;
        self.write(key, Pending::Delete).await
    }

    /// Writes through to Redis, or remembers the write for replay.
    async fn write(&self, key: &str, op: Pending) -> Result<Tier, CacheError> {
        let Some(redis) = &self.inner.redis else {
            return Ok(Tier::Memory);
        };
        // Two rounds at most: a second one only if the breaker closed between
        // our check and `remember`, which then refused the write.
        let mut op = op;
        for _ in 0..2 {
            if redis.is_up() {
                let cmd = write_command(key, &op);
                match redis.query::<()>(Request::Cmd(&cmd)).await {
                    Ok(()) => return Ok(Tier::Redis),
                    Err(err) if err.is_outage() => trip(&self.inner, redis, &err),
                    Err(err) => {
                        // Redis is up but said no (e.g. OOM): keep the value
                        // in memory; replaying would be refused again.
                        debug!(key, error = %err, "redis refused a cache write");
                        return Ok(Tier::Memory);
                    }
                }
            } else {
                ensure_probe(&self.inner, redis, &mut redis.lock());
            }
            match redis.remember(key, op) {
                true => return Ok(Tier::Memory),
                false => op = self.current_op(key).await,
            }
        }
        Ok(Tier::Memory)
    }

    /// The write to retry, rebuilt from memory (`remember` consumed the original).
    async fn current_op(&self, key: &str) -> Pending {
        match self.inner.memory.get(key).await.filter(Entry::is_live) {
            Some(entry) => Pending::Set(entry),
            None => Pending::Delete,
        }
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
        for chunk in keys.chunks(REPLAY_BATCH / 2) {
            let mut pipe = redis::pipe();
            for key in chunk {
                let redis_key = redis_key(key);
                pipe.cmd("GET").arg(&redis_key).cmd("PTTL").arg(&redis_key);
            }
            let replies: Vec<redis::Value> = match redis.query(Request::Pipe(&pipe)).await {
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
                let Ok(Some(value)) = redis::from_redis_value_ref::<Option<Vec<u8>>>(value) else {
                    continue;
                };
                let pttl = redis::from_redis_value_ref::<i64>(pttl).unwrap_or(-1);
                if pttl == -2 {
                    continue;
                }
                let ttl = u64::try_from(pttl).ok().map(Duration::from_millis);
                self.inner.memory.insert(key.clone(), Entry::new(Bytes::from(value), ttl)).await;
                loaded += 1;
            }
        }
        Ok(loaded)
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
        self.inner.redis.as_ref().map(|_| DurableStore { inner: self.inner.clone() })
    }

    fn redis_if_up(&self) -> Option<&RedisTier> {
        let redis = self.inner.redis.as_ref()?;
        if redis.is_up() {
            return Some(redis);
        }
        // Not up yet: make sure someone is working on it (e.g. `connect` was
        // never called), then answer from memory.
        ensure_probe(&self.inner, redis, &mut redis.lock());
        None
    }

    fn unavailable_reason(&self) -> String {
        unavailable_reason(self.status())
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

fn redis_key(key: &str) -> String {
    format!("{KEY_PREFIX}{key}")
}

fn write_command(key: &str, op: &Pending) -> redis::Cmd {
    let redis_key = redis_key(key);
    match op {
        Pending::Set(entry) => {
            let mut cmd = redis::cmd("SET");
            cmd.arg(&redis_key).arg(entry.value.as_ref());
            if let Some(at) = entry.expires_at {
                let ms = at.saturating_duration_since(Instant::now()).as_millis();
                cmd.arg("PX").arg(u64::try_from(ms).unwrap_or(u64::MAX).max(1));
            }
            cmd
        }
        Pending::Delete => {
            let mut cmd = redis::cmd("DEL");
            cmd.arg(&redis_key);
            cmd
        }
    }
}

/// Opens the breaker after a failed operation (logging once per outage) and
/// makes sure a probe is running.
fn trip(inner: &Arc<Inner>, redis: &RedisTier, err: &CacheError) {
    redis.discard_pool();
    let mut shared = redis.lock();
    match &mut shared.breaker {
        Breaker::Up | Breaker::Connecting => {
            let was_up = matches!(shared.breaker, Breaker::Up);
            redis.up.store(false, Ordering::Release);
            shared.breaker = Breaker::Fallback { reason: err.to_string(), since: Instant::now() };
            if was_up {
                warn!(reason = %err, "redis unavailable, cache switched to in-memory fallback");
            } else {
                warn!(reason = %err, "redis not reachable, cache stays in memory until it is");
            }
        }
        Breaker::Fallback { reason, .. } => {
            // Keep `since`; refresh the reason for /health.
            *reason = err.to_string();
        }
    }
    ensure_probe(inner, redis, &mut shared);
}

/// Spawns the probe unless one is running (needs a Tokio runtime).
fn ensure_probe(inner: &Arc<Inner>, redis: &RedisTier, shared: &mut Shared) {
    if shared.probing || redis.is_up() {
        return;
    }
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    shared.probing = true;
    let first_delay = match shared.breaker {
        Breaker::Connecting => Duration::ZERO,
        _ => PROBE_MIN,
    };
    handle.spawn(probe(Arc::downgrade(inner), first_delay));
}

/// PINGs Redis with exponential back-off and jitter until it answers, then
/// replays pending writes and closes the breaker. Holds only a weak
/// reference, so dropping the last `Cache` ends it.
async fn probe(inner: Weak<Inner>, first_delay: Duration) {
    let mut delay = first_delay;
    loop {
        tokio::time::sleep(jitter(delay)).await;
        delay = (delay * 2).clamp(PROBE_MIN, PROBE_MAX);
        let Some(inner) = inner.upgrade() else { return };
        let Some(redis) = &inner.redis else { return };
        let result = match redis.query::<String>(Request::Cmd(&redis::cmd("PING"))).await {
            Ok(_) => replay_and_close(redis).await,
            Err(err) => Err(err),
        };
        match result {
            Ok(_) => return, // `replay_and_close` cleared `probing`
            Err(err) => {
                debug!(reason = %err, "redis probe failed");
                let mut shared = redis.lock();
                match &mut shared.breaker {
                    Breaker::Fallback { reason, .. } => *reason = err.to_string(),
                    Breaker::Connecting => {
                        shared.breaker = Breaker::Fallback { reason: err.to_string(), since: Instant::now() };
                        warn!(reason = %err, "redis not reachable, cache stays in memory until it is");
                    }
                    Breaker::Up => {}
                }
            }
        }
    }
}

/// ±25 % so that many workers do not probe in lock-step.
fn jitter(delay: Duration) -> Duration {
    if delay.is_zero() {
        return delay;
    }
    delay.mul_f64(rand::random_range(0.75..1.25))
}

/// Replays outage writes, then closes the breaker in the same critical
/// section that sees the pending map empty, so no write can slip between.
async fn replay_and_close(redis: &RedisTier) -> Result<usize, CacheError> {
    let mut replayed = 0;
    let mut refused = 0usize;
    loop {
        let batch: Vec<(String, Pending)> = {
            let mut shared = redis.lock();
            if shared.pending.is_empty() {
                let dropped = std::mem::take(&mut shared.pending_dropped);
                if refused > 0 {
                    warn!(refused, "redis refused some replayed cache writes; they stay in memory only");
                }
                let was = std::mem::replace(&mut shared.breaker, Breaker::Up);
                shared.probing = false;
                redis.up.store(true, Ordering::Release);
                drop(shared);
                match was {
                    Breaker::Up => {}
                    Breaker::Connecting => info!(replayed, "redis connected, cache uses redis"),
                    Breaker::Fallback { since, .. } => info!(
                        replayed,
                        lost_writes = dropped,
                        down_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
                        "redis is back, cache uses redis again"
                    ),
                }
                return Ok(replayed);
            }
            let take = shared.pending.len().min(REPLAY_BATCH);
            let keys: Vec<String> = shared.pending.keys().take(take).cloned().collect();
            keys.into_iter().filter_map(|key| shared.pending.remove(&key).map(|op| (key, op))).collect()
        };
        let mut pipe = redis::pipe();
        // One refused command (e.g. OOM) must not fail the batch: replaying
        // it again would be refused again and keep the breaker open forever.
        pipe.ignore_errors();
        for (key, op) in &batch {
            let op_now = match op {
                Pending::Set(entry) if !entry.is_live() => &Pending::Delete,
                other => other,
            };
            pipe.add_command(write_command(key, op_now));
        }
        match redis.query::<Vec<redis::RedisResult<redis::Value>>>(Request::Pipe(&pipe)).await {
            Ok(results) => {
                let failed = results.iter().filter(|result| result.is_err()).count();
                refused += failed;
                replayed += batch.len() - failed;
            }
            Err(err) => {
                // Put back what was not superseded by a newer write meanwhile.
                let mut shared = redis.lock();
                for (key, op) in batch {
                    shared.pending.entry(key).or_insert(op);
                }
                return Err(err);
            }
        }
    }
}

/// Redis operations with no memory fallback, for data that must be durable
/// (users, sessions). Keys are used as given: callers own their prefixes,
/// which must differ from [`KEY_PREFIX`].
#[derive(Clone)]
pub struct DurableStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for DurableStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableStore").field("available", &self.is_available()).finish()
    }
}

impl DurableStore {
    /// Whether an operation would be attempted now (breaker closed).
    pub fn is_available(&self) -> bool {
        // `Cache::durable` only hands out a store when a Redis is configured.
        let Some(redis) = &self.inner.redis else {
            return false;
        };
        if !redis.is_up() {
            ensure_probe(&self.inner, redis, &mut redis.lock());
            return false;
        }
        true
    }

    async fn run<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, CacheError> {
        let Some(redis) = self.inner.redis.as_ref().filter(|_| self.is_available()) else {
            let status = self.inner.redis.as_ref().map_or(RedisStatus::Disabled, RedisTier::status);
            return Err(CacheError::Unavailable(unavailable_reason(status)));
        };
        let result = redis.query(Request::Cmd(&cmd)).await;
        match &result {
            Err(err) if err.is_outage() => trip(&self.inner, redis, err),
            _ => {}
        }
        result
    }

    /// `GET key`.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, CacheError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(key);
        let value: Option<Vec<u8>> = self.run(cmd).await?;
        Ok(value.map(Bytes::from))
    }

    /// `SET key value NX`: true if written, false if the key already existed.
    pub async fn set_nx(&self, key: &str, value: &[u8]) -> Result<bool, CacheError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value).arg("NX");
        let reply: Option<String> = self.run(cmd).await?;
        Ok(reply.is_some())
    }

    /// `SET key value PX ttl`.
    pub async fn set_ex(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), CacheError> {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value).arg("PX").arg(ms);
        self.run(cmd).await
    }

    /// `DEL key`: true if something was deleted.
    pub async fn delete(&self, key: &str) -> Result<bool, CacheError> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(key);
        let removed: i64 = self.run(cmd).await?;
        Ok(removed > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory_only(capacity: u64) -> Cache {
        Cache::new(CacheConfig { memory_capacity: capacity, ..CacheConfig::default() }).expect("memory-only cache")
    }

    #[tokio::test]
    async fn memory_only_round_trip() {
        let cache = memory_only(100);
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
        let cache = memory_only(100);
        cache.set("short", Bytes::from_static(b"x"), Some(Duration::from_millis(50))).await.expect("set");
        cache.set("long", Bytes::from_static(b"y"), Some(Duration::from_secs(60))).await.expect("set");
        assert!(cache.get("short").await.expect("get").is_some());
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(cache.get("short").await.expect("get"), None);
        assert!(cache.get("long").await.expect("get").is_some());
    }

    #[tokio::test]
    async fn memory_capacity_is_bounded() {
        let cache = memory_only(50);
        for i in 0..500 {
            cache.set(&format!("k{i}"), Bytes::from_static(b"v"), None).await.expect("set");
        }
        cache.inner.memory.run_pending_tasks().await;
        assert!(cache.inner.memory.entry_count() <= 50);
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
    async fn outage_writes_are_bounded_and_last_write_wins() {
        let cache = Cache::new(CacheConfig {
            redis_url: Some("redis://127.0.0.1:1".to_string()),
            memory_capacity: 100,
            ..CacheConfig::default()
        })
        .expect("cache");
        let _ = cache.connect().await;
        for i in 0..MAX_PENDING_WRITES + 5 {
            cache.set(&format!("k{i}"), Bytes::from_static(b"v"), None).await.expect("set");
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
            Some(Pending::Set(entry)) if entry.value == Bytes::from_static(b"newest")
        ));
        assert!(matches!(shared.pending.get("k1"), Some(Pending::Delete)));
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
