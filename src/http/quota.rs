//! Per-user quotas of the cache API: how many keys (`HERDSMAN_USER_MAX_KEYS`) and how many bytes
//! of values (`HERDSMAN_USER_MAX_BYTES`) one user may hold, counted in Redis so that every
//! worker and instance agrees.
//!
//! Each user has a hash `herdsman:usage:{username}` of `key -> "size expires_at_ms"`. A `PUT`
//! runs one Lua script that drops the entries past their expiry, sums the rest (the key being
//! replaced excluded), and records the new value only if both quotas still hold, atomically; a
//! `DELETE` removes its entry. The hash expires with its last entry. A check costs one round
//! trip and time proportional to the user's keys (at most the key quota).
//!
//! While Redis cannot be reached the quotas are not checked: the writes then live in the
//! worker's memory, bounded by `HERDSMAN_CACHE_MAX_BYTES` for the memory tier and as much again
//! for the writes held for replay, whoever makes them.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;

use super::error::ApiError;
use crate::cache::{DurableStore, Script};

/// Redis key prefix of the usage hashes.
pub const USAGE_PREFIX: &str = "herdsman:usage:";

/// KEYS[1]: the usage hash; ARGV: key, size, ttl in ms, max keys, max bytes.
/// Returns 0 (recorded), 1 (key quota) or 2 (byte quota).
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
return 0
";

/// The quotas and where they are counted. Cheap to clone.
#[derive(Clone)]
pub struct Quotas {
    store: Option<DurableStore>,
    script: Arc<Script>,
    pub max_keys: u64,
    pub max_bytes: u64,
}

impl Quotas {
    /// `store` is `None` without `REDIS_URL` (then there are no users to count either).
    pub fn new(store: Option<DurableStore>, max_keys: u64, max_bytes: u64) -> Quotas {
        Quotas { store, script: Arc::new(Script::new(RESERVE_SCRIPT)), max_keys, max_bytes }
    }

    /// Records `username`'s value of `size` bytes at `key`, or refuses it with 403 naming the
    /// quota it would break.
    pub async fn reserve(&self, username: &str, key: &str, size: usize, ttl: Duration) -> Result<(), ApiError> {
        let Some(store) = self.store.as_ref().filter(|store| store.is_available()) else {
            return Ok(());
        };
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let as_arg = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let args = [as_arg(size as u64), ttl_ms, as_arg(self.max_keys), as_arg(self.max_bytes)];
        let keys = [usage_key(username)];
        // The key is an argument too: the script needs it as a string, so it goes first.
        match store.eval_with_field::<i64>(&self.script, &keys, key, &args).await {
            Ok(0) => Ok(()),
            Ok(1) => Err(refused(format!(
                "key quota reached: a user may hold {} keys (HERDSMAN_USER_MAX_KEYS)",
                self.max_keys
            ))),
            Ok(_) => Err(refused(format!(
                "byte quota reached: a user may hold {} bytes of values (HERDSMAN_USER_MAX_BYTES)",
                self.max_bytes
            ))),
            Err(err) => {
                tracing::debug!(error = %err, "quota not checked");
                Ok(())
            }
        }
    }

    /// Forgets `username`'s value at `key`; best effort (an entry left behind expires with it).
    pub async fn release(&self, username: &str, key: &str) {
        if let Some(store) = self.store.as_ref().filter(|store| store.is_available()) {
            if let Err(err) = store.hdel(&usage_key(username), key).await {
                tracing::debug!(error = %err, "quota entry not removed");
            }
        }
    }
}

fn usage_key(username: &str) -> String {
    format!("{USAGE_PREFIX}{username}")
}

fn refused(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, message)
}
