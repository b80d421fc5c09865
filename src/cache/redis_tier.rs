//! The Redis tier: the bb8 pools, the circuit breaker, the probe that closes it again and the
//! replay of the writes made while it was open (see the parent module for the why).
//!
//! # A hang costs little more than an outage, a busy Redis nothing
//!
//! A Redis that refuses connections fails every request at once; one that hangs (SIGSTOP, a
//! stalled host, a long fork or fsync) answers nothing, and every request already waiting on
//! it would sit out its own timeout. Three things keep a hang cheap without mistaking a busy
//! Redis for a hung one:
//!
//! - a request's round trip gets the [`Deadline`] fitted to Redis's observed latency (a few
//!   milliseconds for a healthy Redis), not the configured timeout, which stays the bound of
//!   the whole operation (pool checkout included) and of the probe's round trips;
//! - a request still waiting at its fitted deadline asks whether Redis is alive, with a PING
//!   on a connection of its own ([`super::liveness`]): if that is late too, the breaker opens,
//!   and opening it releases every request of the worker still waiting on Redis
//!   ([`RedisTier::query`] races each round trip against [`RedisTier::opened`]): they are
//!   answered from memory at once instead of each discovering the hang on its own. If the PING
//!   answers, Redis is busy, and the request waits on, up to the configured timeout;
//! - a connection is held only to clone its multiplexed handle, so no request queues behind
//!   a stuck one in the pool; and large transfers have a pool of their own, so small requests
//!   do not queue behind their replies ([`Purpose`]).

use crate::metrics::{self, Event, Level};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bb8_redis::bb8::{self, ManageConnection};
use bb8_redis::redis;
use bb8_redis::RedisConnectionManager;
use redis::aio::MultiplexedConnection;
use tracing::{debug, info, warn};

use super::deadline::Deadline;
use super::durable::Script;
use super::liveness::{LateFailures, Liveness, Progress, Purpose, Verdict};
use super::memory::Entry;
use super::stamped::{self, Mode, Outcome, Quota, Usage};
use super::{CacheConfig, CacheError, Inner, RedisStatus, KEY_PREFIX, MAX_PENDING_WRITES};
use crate::config::{read_ca_certificates, redact_url};

/// Replayed writes per pipelined round trip.
pub(super) const REPLAY_BATCH: usize = 256;

/// Most Redis connections per worker and purpose; multiplexed, so a few carry every request.
pub(super) const POOL_SIZE: u32 = 8;

/// Bulk round trips in flight at once per worker. Redis runs a client's pipelined commands
/// back to back, copying each reply before it answers anyone else: sixty-four 1 MB GETs sent at
/// once hold its event loop (and every other client's PING) for tens of milliseconds, a few at a
/// time for a millisecond or two, with the same throughput.
const BULK_IN_FLIGHT: usize = 4;

/// Idle pooled connections are closed after this, well before servers close them.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Every pooled connection is replaced after this, so DNS changes (failover) are picked up.
const POOL_MAX_LIFETIME: Duration = Duration::from_secs(15 * 60);

/// First probe delay after the breaker opens; doubles up to [`PROBE_MAX`].
const PROBE_MIN: Duration = Duration::from_millis(250);

/// One PING a second per worker is nothing to a Redis coming back, and the return is noticed
/// within about a second of it.
const PROBE_MAX: Duration = Duration::from_secs(1);

/// The key the probe writes: Redis is back when it takes a write, not only when it answers
/// PING (a full Redis, a replica or one still loading answers PING and refuses writes).
pub(super) const PROBE_KEY: &str = "herdsman:probe";

/// The probe's key expires on its own: nothing has to clean it up.
const PROBE_KEY_LIFETIME_MS: u64 = 60_000;

/// Why a request waiting on Redis was given up without an answer.
const RELEASED: &str = "the breaker opened while this request waited";

/// A write made while Redis was unreachable, waiting to be replayed.
#[derive(Clone)]
pub(super) struct Pending {
    pub(super) write: Write,
    /// When it was acknowledged, by this process's clock ([`stamped::now`]).
    pub(super) stamp: u64,
    /// The quota entry the replay counts it under (a set) or releases (a delete).
    pub(super) quota: Option<Arc<Quota>>,
}

/// What a write does to its key.
#[derive(Clone)]
pub(super) enum Write {
    Set(Entry),
    Delete,
}

/// What [`RedisTier::remember`] did with an outage write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Remembered {
    /// Held for replay.
    Held,
    /// Not held: Redis is back, write it there.
    BreakerClosed,
    /// Not held: the replay budget is spent, so the write cannot be kept.
    Full,
}

/// The circuit breaker: the one record of whether requests go to Redis. It lives in [`Shared`]
/// with the pending writes, so that closing it and seeing no write left to replay are one step.
pub(super) enum Breaker {
    Connecting,
    Up,
    Fallback { reason: String, since: Instant },
}

pub(super) struct Shared {
    pub(super) breaker: Breaker,
    /// Outage writes by cache key (not namespaced).
    pub(super) pending: HashMap<String, Pending>,
    /// Outage writes refused (an error to their caller) because `pending` was full.
    pub(super) pending_dropped: u64,
    /// Bytes held by `pending`, bounded by `RedisTier::pending_max_bytes`.
    pub(super) pending_bytes: u64,
    /// Whether the background probe task is running.
    pub(super) probing: bool,
    /// Whether the probe found Redis back and is replaying: writers then wait for the breaker
    /// to close (see [`RedisTier::wait_for_replay`]) instead of refilling the pending map.
    pub(super) replaying: bool,
}

/// The Redis side: connection pool, breaker and pending writes.
pub(super) struct RedisTier {
    /// The budget of the writes waiting for replay, in bytes (weighed like the memory tier).
    pub(super) pending_max_bytes: u64,
    /// How long a delete's tombstone stays in Redis ([`stamped`]).
    tombstone_lifetime: Duration,
    /// The one script every cache write goes through ([`stamped::WRITE_SCRIPT`]).
    write_script: Script,
    manager: RedisConnectionManager,
    /// Why the pool's last connection attempt failed, for the checkout that times out waiting.
    connect_error: LastConnectError,
    tls: bool,
    pool_size: u32,
    deadline: Deadline,
    /// Woken when the breaker opens: releases every request still waiting on Redis.
    opened: tokio::sync::Notify,
    /// Woken when the breaker closes: the writers waiting for the replay go to Redis.
    closed: tokio::sync::Notify,
    /// Built lazily inside the runtime (bb8 spawns tasks when it is built).
    /// Built on first use; replaced after every outage (see [`RedisTier::discard_pool`]).
    pools: Mutex<Pools>,
    /// The PING that tells a hung Redis from a busy one, on a connection of its own.
    liveness: Liveness<MultiplexedConnection>,
    /// When Redis last answered: replies arriving on any connection are a sign of life.
    progress: Progress,
    /// Small requests in a row that Redis, alive, did not answer within the operation timeout.
    late: LateFailures,
    /// Bulk round trips in flight ([`BULK_IN_FLIGHT`]).
    bulk_permits: tokio::sync::Semaphore,
    shared: Mutex<Shared>,
}

/// One pool per [`Purpose`], each built on first use.
#[derive(Default)]
struct Pools {
    small: Option<bb8::Pool<RedisConnectionManager>>,
    bulk: Option<bb8::Pool<RedisConnectionManager>>,
}

impl Pools {
    fn slot(&mut self, purpose: Purpose) -> &mut Option<bb8::Pool<RedisConnectionManager>> {
        match purpose {
            Purpose::Small => &mut self.small,
            Purpose::Bulk => &mut self.bulk,
        }
    }
}

/// The pool's error sink: keeps the last error met opening a connection, and when.
#[derive(Clone, Debug, Default)]
struct LastConnectError(Arc<Mutex<Option<(Instant, redis::RedisError)>>>);

impl LastConnectError {
    /// The last connection error, if it happened at or after `started`.
    fn since(&self, started: Instant) -> Option<redis::RedisError> {
        let last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        last.as_ref().filter(|(at, _)| *at >= started).map(|(_, err)| err.clone())
    }
}

impl bb8::ErrorSink<redis::RedisError> for LastConnectError {
    fn sink(&self, err: redis::RedisError) {
        debug!(error = %err, "redis connection attempt failed");
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), err));
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<redis::RedisError>> {
        Box::new(self.clone())
    }
}

/// A request sent to Redis as one round trip.
pub(super) enum Request<'a> {
    Cmd(&'a redis::Cmd),
    Pipe(&'a redis::Pipeline),
}

impl RedisTier {
    /// Checks `url` (and the CA file, if any) and sets the tier up, breaker `Connecting`;
    /// connects nothing.
    pub(super) fn new(url: &str, config: &CacheConfig) -> Result<RedisTier, CacheError> {
        let (manager, tls) = parse_url(url, config.tls_insecure, config.ca_cert.as_deref())?;
        Ok(RedisTier {
            manager,
            connect_error: LastConnectError::default(),
            tls,
            pool_size: config.pool_size.max(1),
            deadline: Deadline::new(config.deadline_floor, config.operation_timeout),
            opened: tokio::sync::Notify::new(),
            closed: tokio::sync::Notify::new(),
            pools: Mutex::new(Pools::default()),
            liveness: Liveness::new(),
            progress: Progress::new(),
            late: LateFailures::default(),
            bulk_permits: tokio::sync::Semaphore::new(BULK_IN_FLIGHT),
            // The writes held for replay get the memory tier's byte budget again.
            pending_max_bytes: config.memory_capacity,
            tombstone_lifetime: config.tombstone_lifetime,
            write_script: Script::new(stamped::WRITE_SCRIPT),
            shared: Mutex::new(Shared {
                breaker: Breaker::Connecting,
                pending: HashMap::new(),
                pending_dropped: 0,
                pending_bytes: 0,
                probing: false,
                replaying: false,
            }),
        })
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding this lock cannot leave `Shared` inconsistent
        // (every update is a single assignment), so poisoning is ignored.
        self.shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn pools(&self) -> MutexGuard<'_, Pools> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pool(&self, purpose: Purpose) -> bb8::Pool<RedisConnectionManager> {
        let mut pools = self.pools();
        pools
            .slot(purpose)
            .get_or_insert_with(|| {
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
                    .connection_timeout(self.deadline.cap())
                    .test_on_check_out(false)
                    .idle_timeout(Some(POOL_IDLE_TIMEOUT))
                    .max_lifetime(Some(POOL_MAX_LIFETIME))
                    .error_sink(Box::new(self.connect_error.clone()))
                    .build_unchecked(self.manager.clone())
            })
            .clone()
    }

    /// Drops every pooled connection: after an outage they may all be dead (a restarted Redis,
    /// a failover), and bb8 cannot tell without a PING per checkout.
    pub(super) fn discard_pool(&self) {
        *self.pools() = Pools::default();
    }

    /// A request's round trip on the connections of its [`Purpose`] by what it sends; see
    /// [`RedisTier::query_for`].
    pub(super) async fn query<T: redis::FromRedisValue>(&self, request: Request<'_>) -> Result<T, CacheError> {
        self.query_for(Purpose::of(&request), request).await
    }

    /// A request's round trip: given up when its fitted deadline passes and Redis does not
    /// answer a PING either, else waited for up to the operation timeout (pool checkout
    /// included); given up at once when the breaker opens meanwhile.
    pub(super) async fn query_for<T: redis::FromRedisValue>(
        &self,
        purpose: Purpose,
        request: Request<'_>,
    ) -> Result<T, CacheError> {
        // Registered before the breaker is read, so an opening in between is not missed.
        let opened = self.opened.notified();
        tokio::pin!(opened);
        opened.as_mut().enable();
        if !self.is_up() {
            return Err(CacheError::Unavailable(RELEASED.to_string()));
        }
        tokio::select! {
            biased;
            result = self.round_trip(purpose, request, true) => result,
            () = opened => Err(CacheError::Unavailable(RELEASED.to_string())),
        }
    }

    /// The round trips of the probe, the replay and the warm-up: bulk, bounded by the operation
    /// timeout alone (they open connections and send large pipelines), never released.
    pub(super) async fn query_unfitted<T: redis::FromRedisValue>(&self, request: Request<'_>) -> Result<T, CacheError> {
        self.round_trip(Purpose::Bulk, request, false).await
    }

    /// One round trip within the operation timeout, pool checkout included; `fitted`, it asks
    /// whether Redis is alive each time the fitted deadline passes without a reply. Every small
    /// round trip that succeeds is a sample of Redis's latency for the deadline (a bulk one
    /// measures its size).
    async fn round_trip<T: redis::FromRedisValue>(
        &self,
        purpose: Purpose,
        request: Request<'_>,
        fitted: bool,
    ) -> Result<T, CacheError> {
        let started = Instant::now();
        let cap = self.deadline.cap();
        let _permit = match purpose {
            Purpose::Small => None,
            // Waiting for a turn is the worker's own queue, not Redis's lateness.
            Purpose::Bulk => match tokio::time::timeout(cap, self.bulk_permits.acquire()).await {
                Ok(Ok(permit)) => Some(permit),
                Ok(Err(_)) | Err(_) => return Err(CacheError::Late(cap)),
            },
        };
        // The pool's connections are multiplexed: many requests can share one in flight.
        // So a connection is held only long enough to clone its handle, and goes back to
        // the pool at once; holding it for the round trip would cap a worker at
        // `pool_size` concurrent Redis operations (measured: 0.35x of redis-benchmark's
        // GET rate instead of 0.5x and more), and queue requests behind a stuck one.
        let checkout = async {
            let pool = self.pool(purpose);
            let pooled = pool.get().await.map_err(|err| match err {
                bb8::RunError::User(err) => CacheError::Redis(err),
                bb8::RunError::TimedOut => self.timed_out(started, cap),
            })?;
            Ok::<_, CacheError>((*pooled).clone())
        };
        let left = (started + cap).saturating_duration_since(Instant::now());
        let mut conn = tokio::time::timeout(left, checkout).await.map_err(|_| self.timed_out(started, cap))??;
        let sent = Instant::now();
        let reply = async {
            match request {
                Request::Cmd(cmd) => cmd.query_async(&mut conn).await,
                Request::Pipe(pipe) => pipe.query_async(&mut conn).await,
            }
        };
        tokio::pin!(reply);
        let until = started + cap;
        let result = if fitted {
            self.await_reply(purpose, reply, until).await?
        } else {
            let left = until.saturating_duration_since(Instant::now());
            tokio::time::timeout(left, reply).await.map_err(|_| CacheError::Timeout(cap))?
        };
        if result.is_ok() {
            self.progress.answered();
            if purpose == Purpose::Small {
                self.deadline.observe(sent.elapsed());
                self.late.reset();
            }
        }
        result.map_err(CacheError::Redis)
    }

    /// Waits for `reply` until `until`. Each time the fitted deadline passes without it and
    /// without any other reply meanwhile, asks whether Redis is alive: an error when it is not
    /// (which opens the breaker), another wait when it is.
    async fn await_reply<T>(
        &self,
        purpose: Purpose,
        mut reply: std::pin::Pin<&mut impl std::future::Future<Output = redis::RedisResult<T>>>,
        until: Instant,
    ) -> Result<redis::RedisResult<T>, CacheError> {
        loop {
            let fitted = self.deadline.current();
            let wait = fitted.min(until.saturating_duration_since(Instant::now()));
            if let Ok(result) = tokio::time::timeout(wait, reply.as_mut()).await {
                return Ok(result);
            }
            let late_since = Instant::now();
            if late_since >= until {
                return Err(self.late_failure(purpose));
            }
            // Half a deadline: answers that stopped just before a hang do not delay noticing it.
            if !self.progress.within(fitted / 2, late_since) {
                self.alive(late_since, fitted).await?;
            }
        }
    }

    /// A request Redis, alive, did not answer within the operation timeout: an error for this
    /// request, which opens the breaker only as the [`super::liveness::LATE_LIMIT`]th small one
    /// in a row. A late bulk transfer gets a fresh connection for the next ones instead.
    fn late_failure(&self, purpose: Purpose) -> CacheError {
        let cap = self.deadline.cap();
        match purpose {
            Purpose::Small if self.late.failure() => CacheError::Timeout(cap),
            Purpose::Small => CacheError::Late(cap),
            Purpose::Bulk => {
                self.pools().bulk = None;
                CacheError::Late(cap)
            }
        }
    }

    /// Whether Redis answers a PING on the dedicated connection within `bound`, for a request
    /// late since `late_since` (one check at a time per worker; see [`Liveness`]).
    async fn alive(&self, late_since: Instant, bound: Duration) -> Result<(), CacheError> {
        let verdict = self.liveness.check(late_since, |conn| self.ping_alone(conn, bound)).await;
        match &verdict {
            Verdict::Alive => {
                self.progress.answered();
                debug!("a redis reply is late, but redis answers PING: waiting on")
            }
            other => debug!(verdict = ?other, "a redis reply is late, and so is PING"),
        }
        verdict.into_result()
    }

    /// PINGs on the dedicated connection, opening it if there is none. One that fails is
    /// replaced once: servers and proxies close idle connections, which says nothing of Redis.
    async fn ping_alone(
        &self,
        conn: Option<MultiplexedConnection>,
        bound: Duration,
    ) -> (Option<MultiplexedConnection>, Verdict) {
        if let Some(mut old) = conn {
            match ping(&mut old, bound).await {
                Verdict::Failed(err) => debug!(error = %err, "the liveness connection failed; opening another"),
                verdict => return (Some(old), verdict),
            }
        }
        let mut fresh = match self.connect_alone().await {
            Ok(conn) => conn,
            Err(verdict) => return (None, verdict),
        };
        match ping(&mut fresh, bound).await {
            Verdict::Failed(err) => (None, Verdict::Failed(err)),
            verdict => (Some(fresh), verdict),
        }
    }

    /// A new connection for the liveness check, outside the pools, within the operation timeout
    /// (a TLS handshake may take longer than a fitted deadline).
    async fn connect_alone(&self) -> Result<MultiplexedConnection, Verdict> {
        let cap = self.deadline.cap();
        match tokio::time::timeout(cap, self.manager.connect()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(err)) => Err(Verdict::Failed(err)),
            Err(_) => Err(Verdict::Silent(cap)),
        }
    }

    /// The error for an operation begun at `started` that ran out of time: the pool's failure
    /// to connect meanwhile if there was one (bb8's checkout only ever says "timed out", and
    /// `/health` should say "connection refused" or "invalid peer certificate"), else a timeout.
    fn timed_out(&self, started: Instant, limit: Duration) -> CacheError {
        match self.connect_error.since(started) {
            Some(err) => CacheError::Redis(err),
            None => CacheError::Timeout(limit),
        }
    }

    /// Whether requests go to Redis now. An uncontended lock is a few nanoseconds, and each
    /// Redis round trip already takes the pool's lock; a lock-free copy of this flag would be a
    /// second state to keep in step with the breaker.
    pub(super) fn is_up(&self) -> bool {
        matches!(self.lock().breaker, Breaker::Up)
    }

    pub(super) fn status(&self) -> RedisStatus {
        match &self.lock().breaker {
            Breaker::Connecting => RedisStatus::Connecting,
            Breaker::Up => RedisStatus::Up,
            Breaker::Fallback { reason, since } => RedisStatus::Fallback { reason: reason.clone(), since: *since },
        }
    }

    /// While the probe replays, waits (at most one fitted deadline) for the breaker to close.
    ///
    /// Without this, a worker under a steady stream of writes to the same keys never
    /// closes the breaker after an outage: every replay round trip lets those keys land in the
    /// pending map again, and the map must be empty to close (measured: a worker stayed on
    /// memory until the load ended, replaying 217,000 writes to 100 keys). Writers pausing for
    /// the few round trips of the replay lets it finish; they then write to Redis themselves.
    pub(super) async fn wait_for_replay(&self) {
        let closed = self.closed.notified();
        tokio::pin!(closed);
        closed.as_mut().enable();
        if !self.lock().replaying {
            return;
        }
        let _ = tokio::time::timeout(self.deadline.current(), closed).await;
    }

    /// Remembers a write for replay, unless the breaker closed meanwhile (the caller must then
    /// write to Redis itself) or the replay budget is spent (the caller must refuse the write).
    pub(super) fn remember(&self, key: &str, op: &Pending) -> Remembered {
        let mut shared = self.lock();
        if matches!(shared.breaker, Breaker::Up) {
            return Remembered::BreakerClosed;
        }
        let replaced = shared.pending.get(key).map_or(0, |old| pending_weight(key, old));
        let bytes = shared.pending_bytes - replaced + pending_weight(key, op);
        let fits = shared.pending.len() < MAX_PENDING_WRITES || replaced > 0;
        if fits && bytes <= self.pending_max_bytes {
            shared.pending.insert(key.to_string(), op.clone());
            shared.pending_bytes = bytes;
            Remembered::Held
        } else {
            shared.pending_dropped += 1;
            Remembered::Full
        }
    }
}

/// Checks the URL without connecting; errors never echo the password.
/// redis-rs spells "do not verify the server's certificate" as the URL fragment `#insecure`.
pub(super) fn with_tls_choice(url: &str, insecure: bool) -> std::borrow::Cow<'_, str> {
    if insecure && !url.contains('#') {
        format!("{url}#insecure").into()
    } else {
        url.into()
    }
}

/// With `ca_cert`, a `rediss://` connection trusts exactly the CAs in that PEM file (the
/// built-in web roots are not consulted) and still checks the server's name against its
/// certificate; `tls_insecure` overrides both. A `redis://` URL ignores both.
pub(super) fn parse_url(
    url: &str,
    tls_insecure: bool,
    ca_cert: Option<&Path>,
) -> Result<(RedisConnectionManager, bool), CacheError> {
    let (info, tls) = connection_info(url, tls_insecure, ca_cert)?;
    let manager = RedisConnectionManager::new(info)
        .map_err(|err| CacheError::InvalidUrl(format!("{}: {err}", redact_url(url))))?;
    Ok((manager, tls))
}

/// What a connection to `url` needs (address, credentials, TLS roots), and whether it is TLS;
/// the checks of [`parse_url`], shared with connections outside the pool.
pub(super) fn connection_info(
    url: &str,
    tls_insecure: bool,
    ca_cert: Option<&Path>,
) -> Result<(redis::ConnectionInfo, bool), CacheError> {
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
    let info = match ca_cert {
        Some(path) if tls => {
            // Read again in each worker: the master checked it at start, but only the path
            // travels to the workers.
            let unusable = |why: &dyn std::fmt::Display| {
                CacheError::InvalidConfig(format!("REDIS_CA_CERT {}: {why}", path.display()))
            };
            let pem = read_ca_certificates(path).map_err(|why| unusable(&why))?;
            let roots = redis::TlsCertificates { client_tls: None, root_cert: Some(pem) };
            let client = redis::Client::build_with_tls(info, roots).map_err(|err| unusable(&err))?;
            client.get_connection_info().clone()
        }
        _ => info,
    };
    Ok((info, tls))
}

pub(super) fn redis_key(key: &str) -> String {
    format!("{KEY_PREFIX}{key}")
}

impl RedisTier {
    /// The write script's command for `pending` to `key`; `verb` and `body` are `EVALSHA` and
    /// the script's SHA-1, or `EVAL` and its source.
    pub(super) fn write_command(
        &self,
        (verb, body): (&str, &str),
        key: &str,
        pending: &Pending,
        mode: Mode,
    ) -> redis::Cmd {
        let (stored, lifetime) = match &pending.write {
            Write::Set(entry) if entry.is_live() => (
                stamped::encode(pending.stamp, Some(&entry.value)),
                entry.expires_at.map(|at| at.saturating_duration_since(Instant::now())),
            ),
            // A set that expired while held still hides what it replaced: it becomes a
            // tombstone with its own stamp, like a delete.
            _ => (stamped::encode(pending.stamp, None), Some(self.tombstone_lifetime)),
        };
        stamped::command(verb, body, &redis_key(key), &stored, mode, lifetime, pending.quota.as_deref())
    }

    /// Makes one write online (the breaker is closed): the write script by its SHA-1, loaded
    /// first when this Redis has not seen it.
    pub(super) async fn write_online(
        &self,
        key: &str,
        pending: &Pending,
    ) -> Result<(Outcome, Option<Usage>), CacheError> {
        let invoke = |verb: &str, body: &str| self.write_command((verb, body), key, pending, Mode::Online);
        let reply: Vec<i64> =
            self.write_script.run(invoke, |cmd| async move { self.query(Request::Cmd(&cmd)).await }).await?;
        Ok(stamped::outcome(&reply))
    }
}

/// Opens the breaker after a failed operation (logging once per outage) and
/// makes sure a probe is running.
pub(super) fn trip(inner: &Arc<Inner>, redis: &RedisTier, err: &CacheError) {
    redis.discard_pool();
    redis.late.reset();
    let mut shared = redis.lock();
    match &mut shared.breaker {
        Breaker::Up | Breaker::Connecting => {
            // Everyone still waiting on this Redis gives up now rather than at its own deadline.
            redis.opened.notify_waiters();
            let was_up = matches!(shared.breaker, Breaker::Up);
            shared.breaker = Breaker::Fallback { reason: err.to_string(), since: Instant::now() };
            metrics::count(Event::BreakerOpened);
            metrics::set_level(Level::BreakerOpen, 1);
            if was_up {
                warn!(reason = %err, "redis unavailable, cache switched to in-memory fallback");
            } else {
                warn!(reason = %err, "redis not reachable, cache stays in memory until it is");
            }
        }
        Breaker::Fallback { reason, .. } => {
            // Keep `since`; refresh the reason for /health, unless this is a request the
            // opening released, which knows no more than the reason already there.
            if !matches!(err, CacheError::Unavailable(_)) {
                *reason = err.to_string();
            }
        }
    }
    ensure_probe(inner, &mut shared);
}

/// Spawns the probe unless one is running (needs a Tokio runtime).
pub(super) fn ensure_probe(inner: &Arc<Inner>, shared: &mut Shared) {
    if shared.probing || matches!(shared.breaker, Breaker::Up) {
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
pub(super) async fn probe(inner: Weak<Inner>, first_delay: Duration) {
    let mut delay = first_delay;
    loop {
        tokio::time::sleep(jitter(delay)).await;
        delay = (delay * 2).clamp(PROBE_MIN, PROBE_MAX);
        let Some(inner) = inner.upgrade() else { return };
        let Some(redis) = &inner.redis else { return };
        match check_then_replay(redis).await {
            Ok(_) => return, // `replay_and_close` cleared `probing`
            Err(err) => {
                debug!(reason = %err, "redis probe failed");
                // The probe's connection may be a dead one that would fail every probe after
                // it: one opened after the probe gave up waiting for it, then cut. Each probe
                // starts from a fresh pool.
                redis.discard_pool();
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
pub(super) fn jitter(delay: Duration) -> Duration {
    if delay.is_zero() {
        return delay;
    }
    delay.mul_f64(rand::random_range(0.75..1.25))
}

/// Replays outage writes, then closes the breaker in the same critical
/// section that sees the pending map empty, so no write can slip between.
pub(super) async fn replay_and_close(redis: &RedisTier) -> Result<usize, CacheError> {
    redis.lock().replaying = true;
    let result = replay_rounds(redis).await;
    if result.is_err() {
        redis.lock().replaying = false;
    }
    result
}

/// The rounds of [`replay_and_close`], the last of which closes the breaker.
async fn replay_rounds(redis: &RedisTier) -> Result<usize, CacheError> {
    let mut replayed = 0;
    let mut refused = 0usize;
    let mut superseded = 0usize;
    let mut unordered = 0usize;
    let mut script_loaded = false;
    loop {
        let batch: Vec<(String, Pending)> = {
            let mut shared = redis.lock();
            if shared.pending.is_empty() {
                let dropped = std::mem::take(&mut shared.pending_dropped);
                if refused > 0 {
                    warn!(refused, "redis refused some replayed cache writes; they stay in memory only");
                }
                if unordered > 0 {
                    warn!(
                        unordered,
                        "some writes held longer than the tombstone lifetime were not replayed: their keys were gone"
                    );
                }
                let was = std::mem::replace(&mut shared.breaker, Breaker::Up);
                shared.probing = false;
                shared.replaying = false;
                if matches!(was, Breaker::Fallback { .. }) {
                    metrics::count(Event::BreakerClosed);
                    metrics::set_level(Level::BreakerOpen, 0);
                }
                drop(shared);
                redis.closed.notify_waiters();
                match was {
                    Breaker::Up => {}
                    Breaker::Connecting => info!(replayed, "redis connected, cache uses redis"),
                    Breaker::Fallback { since, .. } => info!(
                        replayed,
                        superseded,
                        refused_writes = dropped,
                        down_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
                        "redis is back, cache uses redis again"
                    ),
                }
                return Ok(replayed);
            }
            let take = shared.pending.len().min(REPLAY_BATCH);
            let keys: Vec<String> = shared.pending.keys().take(take).cloned().collect();
            let batch: Vec<(String, Pending)> =
                keys.into_iter().filter_map(|key| shared.pending.remove(&key).map(|op| (key, op))).collect();
            let taken: u64 = batch.iter().map(|(key, op)| pending_weight(key, op)).sum();
            shared.pending_bytes = shared.pending_bytes.saturating_sub(taken);
            batch
        };
        let mut pipe = redis::pipe();
        // One refused command (e.g. OOM) must not fail the batch: replaying
        // it again would be refused again and keep the breaker open forever.
        pipe.ignore_errors();
        if !script_loaded {
            // The batch runs the write script by its SHA-1: load it first (a restarted Redis
            // has forgotten it), in the same round trip.
            pipe.cmd("SCRIPT").arg("LOAD").arg(stamped::WRITE_SCRIPT);
        }
        let now = stamped::now();
        let horizon = u64::try_from(redis.tombstone_lifetime.as_micros()).unwrap_or(u64::MAX);
        for (key, op) in &batch {
            let mode = if now.saturating_sub(op.stamp) > horizon { Mode::Late } else { Mode::Replay };
            pipe.add_command(redis.write_command(("EVALSHA", redis.write_script.sha1()), key, op, mode));
        }
        let mut results =
            match redis.query_unfitted::<Vec<redis::RedisResult<redis::Value>>>(Request::Pipe(&pipe)).await {
                Ok(results) => results,
                Err(err) => {
                    put_back(redis, batch);
                    return Err(err);
                }
            };
        if !script_loaded {
            let loaded = results.remove(0);
            if let Err(err) = loaded {
                put_back(redis, batch);
                return Err(CacheError::Redis(err));
            }
            script_loaded = true;
        }
        // A write refused because Redis cannot take writes now (full, read-only, loading...)
        // waits for the next round with the rest of its batch: dropping it would leave the
        // older value in Redis to be read once the breaker closes.
        let mut outage = None;
        let mut unsent = Vec::new();
        for ((key, op), result) in batch.into_iter().zip(results) {
            let reply = result.and_then(|value| redis::from_redis_value::<Vec<i64>>(value).map_err(Into::into));
            match reply.map_err(CacheError::Redis) {
                Ok(reply) => match stamped::outcome(&reply).0 {
                    Outcome::Written => replayed += 1,
                    Outcome::Superseded => superseded += 1,
                    Outcome::Unordered | Outcome::OverQuota(_) => {
                        debug!(key, "a held write past the tombstone lifetime found its key gone");
                        unordered += 1;
                    }
                },
                Err(err) if err.is_outage() => {
                    unsent.push((key, op));
                    outage = Some(err);
                }
                Err(_) => refused += 1,
            }
        }
        if let Some(err) = outage {
            put_back(redis, unsent);
            return Err(err);
        }
    }
}

/// Puts writes whose replay failed back for the next round, unless a newer write to the same
/// key arrived meanwhile.
fn put_back(redis: &RedisTier, batch: Vec<(String, Pending)>) {
    let mut shared = redis.lock();
    for (key, op) in batch {
        if !shared.pending.contains_key(&key) {
            shared.pending_bytes += pending_weight(&key, &op);
            shared.pending.insert(key, op);
        }
    }
}

/// Writes [`PROBE_KEY`]; when Redis takes it, replays the pending writes and closes the
/// breaker. Both the first connection and the probe end an outage this way. A probe slower
/// than the fitted deadline re-seeds it, so a Redis that became slower (but answers within
/// the operation timeout) is used again instead of timing out every request.
pub(super) async fn check_then_replay(redis: &RedisTier) -> Result<usize, CacheError> {
    let mut probe = redis::cmd("SET");
    probe.arg(PROBE_KEY).arg(std::process::id()).arg("PX").arg(PROBE_KEY_LIFETIME_MS);
    let started = Instant::now();
    redis.query_unfitted::<()>(Request::Cmd(&probe)).await?;
    redis.deadline.reseed_if_slower(started.elapsed());
    // Opened now, not when a request is late: opening it then (to a hung Redis, whose kernel
    // still accepts connections) would take the operation timeout, not a PING's deadline.
    match redis.connect_alone().await {
        Ok(conn) => redis.liveness.replace(conn).await,
        Err(verdict) => debug!(?verdict, "no liveness connection yet; the first late request opens one"),
    }
    replay_and_close(redis).await
}

/// PING within `bound`. Unanswered while this worker was itself occupied, it says nothing of
/// Redis: the answer may be waiting for this worker to read it.
async fn ping(conn: &mut MultiplexedConnection, bound: Duration) -> Verdict {
    use futures_util::FutureExt;
    let started = Occupied::now();
    let ping = redis::cmd("PING");
    let pinging = ping.query_async::<()>(conn);
    tokio::pin!(pinging);
    let answer = match tokio::time::timeout(bound, pinging.as_mut()).await {
        Ok(answer) => Some(answer),
        Err(_) => {
            // The answer may have come in the same turn of the runtime as the timer: the
            // connection's task reads it once this one yields.
            tokio::task::yield_now().await;
            pinging.now_or_never()
        }
    };
    match answer {
        Some(Ok(())) => Verdict::Alive,
        Some(Err(err)) => Verdict::Failed(err),
        None if started.occupied_for(bound) => Verdict::Unheard,
        None => Verdict::Silent(bound),
    }
}

/// How long this process has been on the CPU, and this thread waiting for one (a worker's
/// runtime is one thread: the one that would read the PING's answer).
struct Occupied {
    cpu: Duration,
    thread: nix::unistd::Pid,
    run_delay: Duration,
}

impl Occupied {
    fn now() -> Occupied {
        let cpu = nix::time::clock_gettime(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID)
            .map_or(Duration::ZERO, Duration::from);
        // Time on the CPU, time runnable but waiting for one, slices.
        let run_delay = std::fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|line| line.split_whitespace().nth(1).and_then(|ns| ns.parse().ok()))
            .map_or(Duration::ZERO, Duration::from_nanos);
        Occupied { cpu, thread: nix::unistd::gettid(), run_delay }
    }

    /// Whether, since this moment, the worker was working (an eighth of `window` on the CPU) and
    /// on the CPU or waiting for one (on this same thread) for half of it. An idle worker waiting
    /// for a hung Redis is neither, however loaded the host.
    fn occupied_for(&self, window: Duration) -> bool {
        let now = Occupied::now();
        let cpu = now.cpu.saturating_sub(self.cpu);
        let waited =
            if now.thread == self.thread { now.run_delay.saturating_sub(self.run_delay) } else { Duration::ZERO };
        cpu >= window / 8 && cpu + waited >= window / 2
    }
}

/// Adds `GET key` and `PTTL key` to `pipe`: a value and its remaining lifetime in one round
/// trip, with no MULTI/EXEC (a key that expires in between reads as PTTL -2).
pub(super) fn get_with_pttl(pipe: &mut redis::Pipeline, key: &str) {
    let redis_key = redis_key(key);
    pipe.cmd("GET").arg(&redis_key).cmd("PTTL").arg(&redis_key);
}

/// What a PTTL reply says of a value read with it: `None` when the key expired in between
/// (-2), else its remaining lifetime (`None` inside for no expiry, -1).
pub(super) fn lifetime_from_pttl(pttl: i64) -> Option<Option<Duration>> {
    match pttl {
        -2 => None,
        ms => Some(u64::try_from(ms).ok().map(Duration::from_millis)),
    }
}

/// A pending write's weight, as the memory tier weighs entries.
fn pending_weight(key: &str, op: &Pending) -> u64 {
    let value_len = match &op.write {
        Write::Set(entry) => entry.value.len(),
        Write::Delete => 0,
    };
    super::memory::weight(key, value_len)
}
