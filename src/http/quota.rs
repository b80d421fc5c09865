//! Per-user quotas of the cache API: how many keys (`HERDSMAN_USER_MAX_KEYS`) and how many bytes
//! of values (`HERDSMAN_USER_MAX_BYTES`) one user may hold, counted in Redis so that every
//! worker and instance agrees.
//!
//! Each user has a hash `herdsman:usage:{username}` of `key -> "size expires_at_ms"`. A `PUT`
//! runs one Lua script that drops the entries past their expiry, sums the rest (the key being
//! replaced excluded), and only if both quotas still hold records the new value and writes it
//! (`SET`), atomically: the check and the write are one round trip ([`Cache::set_checked`]), so
//! a slow Redis costs a `PUT` its latency once, not twice. A `DELETE` removes its entry in the
//! round trip that deletes the value ([`Cache::delete_with_hdel`]). The
//! hash expires with its last entry. A check takes time proportional to the user's keys (at
//! most the key quota).
//!
//! While Redis cannot be reached the quotas are not checked: the writes then live in the
//! worker's memory, bounded by `HERDSMAN_CACHE_MAX_BYTES` for the memory tier and as much again
//! for the writes held for replay, whoever makes them.
//!
//! # A Redis that does not answer in time
//! The check-and-write is one round trip bounded by the cache's fitted deadline (`crate::cache`'s
//! `deadline`), like any write. When it runs out the quota is not checked for that write, and
//! the write takes the same path as during an outage, because the late reply has opened the
//! breaker: kept in memory and held for replay (`507` when the replay budget is
//! full), never acknowledged and lost. Refusing it (`503`) instead would fail a write the cache
//! can keep, which the cache promises not to do; the per-worker budgets bound what can be kept
//! unchecked. Such writes are counted as memory writes in `herdsman_cache_operations`.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;

use super::error::ApiError;
use crate::cache::{Cache, CacheError, Checked, Script, Tier, WriteCheck};

/// Redis key prefix of the usage hashes.
pub const USAGE_PREFIX: &str = "herdsman:usage:";

/// KEYS[1]: the usage hash, KEYS[2]: the value's Redis key; ARGV: key, size, ttl in ms, max keys,
/// max bytes, then (added by [`Cache::set_checked`]) the value and its lifetime in ms.
/// Returns 0 (recorded and written), 1 (key quota) or 2 (byte quota).
const RESERVE_SCRIPT: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local entries = redis.call('HGETALL', KEYS[1])
local keys, bytes, latest = 0, 0, now
for i = 1, #entries, 2 do
  local size, expires = string.match(entries[i + 1], '^(%d+) (%d+)$')
  size = tonumber(size)
  expires = tonumber(expires)
  if size == nil or expires <= now then
    redis.call('HDEL', KEYS[1], entries[i])
  elseif entries[i] ~= ARGV[1] then
    keys = keys + 1
    bytes = bytes + size
    if expires > latest then latest = expires end
  end
end
local size = tonumber(ARGV[2])
if keys + 1 > tonumber(ARGV[4]) then return 1 end
if bytes + size > tonumber(ARGV[5]) then return 2 end
local expires = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], string.format('%d %d', size, expires))
if expires > latest then latest = expires end
redis.call('PEXPIREAT', KEYS[1], latest)
redis.call('SET', KEYS[2], ARGV[6], 'PX', ARGV[7])
return 0
";

/// The quotas (counted in Redis, through the cache). Cheap to clone.
#[derive(Clone)]
pub struct Quotas {
    script: Arc<Script>,
    pub max_keys: u64,
    pub max_bytes: u64,
}

impl Quotas {
    /// Without `REDIS_URL` there are no users to count: the cache's writes are then unchecked.
    pub fn new(max_keys: u64, max_bytes: u64) -> Quotas {
        Quotas { script: Arc::new(Script::new(RESERVE_SCRIPT)), max_keys, max_bytes }
    }

    /// Stores `value` at `cache_key` (`username`'s `key`) if both quotas hold, the check and the
    /// write in one round trip; a refusal is 403 naming the quota it would break, and stores
    /// nothing. The inner result is the cache's (see [`Cache::set_checked`] for a Redis that is
    /// away or late: the write is then kept unchecked, as in an outage).
    pub async fn store(
        &self,
        cache: &Cache,
        (username, key): (&str, &str),
        cache_key: &str,
        value: Bytes,
        ttl: Duration,
    ) -> Result<Result<Tier, CacheError>, ApiError> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let as_arg = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let args = [as_arg(value.len() as u64), ttl_ms, as_arg(self.max_keys), as_arg(self.max_bytes)];
        let keys = [usage_key(username)];
        // The key is an argument too: the script needs it as a string, so it goes first.
        let check = WriteCheck { script: &self.script, keys: &keys, field: key, args: &args };
        match cache.set_checked(cache_key, value, ttl, &check).await {
            Ok(Checked::Stored(tier)) => Ok(Ok(tier)),
            Ok(Checked::Refused(1)) => Err(refused(format!(
                "key quota reached: a user may hold {} keys (HERDSMAN_USER_MAX_KEYS)",
                self.max_keys
            ))),
            Ok(Checked::Refused(_)) => Err(refused(format!(
                "byte quota reached: a user may hold {} bytes of values (HERDSMAN_USER_MAX_BYTES)",
                self.max_bytes
            ))),
            Err(err) => Ok(Err(err)),
        }
    }

    /// Deletes `cache_key` (`username`'s `key`) and forgets its quota entry, in one round trip.
    /// While Redis is away only the delete is kept (for replay); the entry then expires with
    /// the value it counted. Without Redis there is no entry, and only memory is touched.
    pub async fn delete(
        &self,
        cache: &Cache,
        (username, key): (&str, &str),
        cache_key: &str,
    ) -> Result<Tier, CacheError> {
        cache.delete_with_hdel(cache_key, &usage_key(username), key).await
    }
}

fn usage_key(username: &str) -> String {
    format!("{USAGE_PREFIX}{username}")
}

fn refused(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, message)
}
