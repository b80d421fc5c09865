//! The durable store: Redis operations with no memory fallback, for data that must never live
//! in one worker's memory only (users, sessions). While the breaker is open they fail at once
//! with [`CacheError::Unavailable`], so callers can answer 503 instead of lying. A reply that
//! means Redis cannot serve now (full, read-only, loading, busy, credentials refused: the table
//! in the parent module) fails the operation and opens the breaker the same way.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bb8_redis::redis;
use bytes::Bytes;

use super::redis_tier::{ensure_probe, trip, RedisTier, Request};
use super::{unavailable_reason, CacheError, Inner, RedisStatus};

/// A Lua script for [`DurableStore::eval`] and [`super::Cache::set_checked`]: its source and
/// its SHA-1, computed once.
pub struct Script {
    source: &'static str,
    sha1: redis::Script,
}

impl Script {
    pub fn new(source: &'static str) -> Script {
        Script { source, sha1: redis::Script::new(source) }
    }

    /// Its SHA-1, for `EVALSHA` in a pipeline.
    pub(super) fn sha1(&self) -> &str {
        self.sha1.get_hash()
    }

    /// Runs it by its SHA-1 (`EVALSHA`), loading it with `EVAL` when this Redis has not seen it
    /// yet (a fresh or restarted server). `invoke(verb, body)` builds the command; `run` sends it.
    pub(super) async fn run<T, F>(
        &self,
        invoke: impl Fn(&str, &str) -> redis::Cmd,
        run: impl Fn(redis::Cmd) -> F,
    ) -> Result<T, CacheError>
    where
        F: std::future::Future<Output = Result<T, CacheError>>,
    {
        match run(invoke("EVALSHA", self.sha1.get_hash())).await {
            Err(CacheError::Redis(err)) if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                run(invoke("EVAL", self.source)).await
            }
            other => other,
        }
    }
}

/// Redis operations with no memory fallback, for data that must be durable
/// (users, sessions). Keys are used as given: callers own their prefixes,
/// which must differ from [`super::KEY_PREFIX`].
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
    pub(super) fn new(inner: Arc<Inner>) -> DurableStore {
        DurableStore { inner }
    }

    /// Whether an operation would be attempted now (breaker closed).
    pub fn is_available(&self) -> bool {
        // `Cache::durable` only hands out a store when a Redis is configured.
        let Some(redis) = &self.inner.redis else {
            return false;
        };
        if !redis.is_up() {
            ensure_probe(&self.inner, &mut redis.lock());
            return false;
        }
        true
    }

    async fn run<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, CacheError> {
        self.send(Request::Cmd(&cmd)).await
    }

    async fn send<T: redis::FromRedisValue>(&self, request: Request<'_>) -> Result<T, CacheError> {
        let Some(redis) = self.inner.redis.as_ref().filter(|_| self.is_available()) else {
            let status = self.inner.redis.as_ref().map_or(RedisStatus::Disabled, RedisTier::status);
            return Err(CacheError::Unavailable(unavailable_reason(status)));
        };
        let result = redis.query(request).await;
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

    /// `GET key` and `PTTL key` in one round trip: the value and how long it still lives
    /// (`None` for a key with no expiry).
    pub async fn get_with_ttl(&self, key: &str) -> Result<Option<(Bytes, Option<Duration>)>, CacheError> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(key).cmd("PTTL").arg(key);
        let (value, pttl): (Option<Vec<u8>>, i64) = self.send(Request::Pipe(&pipe)).await?;
        let ttl = u64::try_from(pttl).ok().map(Duration::from_millis);
        Ok(value.map(|value| (Bytes::from(value), ttl)))
    }

    /// Runs a Lua script by its SHA-1 (`EVALSHA`), loading it with `EVAL` when this Redis has
    /// not seen it yet (a fresh or restarted server).
    pub async fn eval<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        keys: &[String],
        args: &[i64],
    ) -> Result<T, CacheError> {
        let invoke = |verb: &str, body: &str| {
            let mut cmd = redis::cmd(verb);
            cmd.arg(body).arg(keys.len()).arg(keys).arg(args);
            cmd
        };
        script.run(invoke, |cmd| async move { self.run(cmd).await }).await
    }

    /// `SET key value NX`: true if written, false if the key already existed.
    pub async fn set_nx(&self, key: &str, value: &[u8]) -> Result<bool, CacheError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value).arg("NX");
        let reply: Option<String> = self.run(cmd).await?;
        Ok(reply.is_some())
    }

    /// `SET key value XX`: replaces an existing value; false if there was none.
    pub async fn replace(&self, key: &str, value: &[u8]) -> Result<bool, CacheError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value).arg("XX");
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
