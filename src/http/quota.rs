//! Per-user quotas of the cache API: how many keys (`HERDSMAN_USER_MAX_KEYS`) and how many bytes
//! of values (`HERDSMAN_USER_MAX_BYTES`) one user may hold, counted in Redis so that every
//! worker and instance agrees.
//!
//! Each user has a hash `herdsman:usage:{username}` of `key -> "size expires_at_ms"`. A `PUT`
//! runs the cache's write script ([`Cache::set_checked`]), which drops the entries past their
//! expiry, sums the rest (the key being replaced excluded), and only if both quotas still hold
//! records the new value and writes it, atomically, in the write's one round trip. A `DELETE`
//! releases its entry in the round trip that deletes the value ([`Cache::delete_with_quota`]).
//! The hash expires with its last entry. A check takes time proportional to the user's keys (at
//! most the key quota).
//!
//! # While Redis is away (or late)
//! The quota cannot be checked, so a write is held for replay only within what this worker
//! knows of the user: their usage as Redis last counted it for this worker, no older than
//! [`KNOWN_FOR`], plus what this worker has held for them since. A `PUT` learns it from its own
//! reply; any other `/cache` request of a user whose figure is missing or half as old as that
//! asks Redis for it in the background ([`Quotas::learn`]), so every user active on a worker
//! lately is known there. A user at or over a quota
//! is refused (`403`) as when Redis is up; a user this worker knows nothing recent of gets
//! `503` + `Retry-After` (nothing is stored: the quota cannot be checked). A user's held writes
//! are also bounded by a share of the worker's replay budget ([`SHARE_DIVISOR`]), so one user
//! cannot fill what every other user's writes need. The replay counts every held write in the
//! usage hash (it was acknowledged: it is never refused then), and a held `DELETE` releases its
//! entry when replayed.
//!
//! The bound this leaves: a user under quota may end above it by the headroom each cut-off
//! worker knew of (writes through several workers cut off at once each fit their own view);
//! a user at or over a quota cannot store more through any worker, Redis up or not.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use bytes::Bytes;
use quick_cache::sync::Cache as MemoryCache;

use super::error::ApiError;
use crate::cache::{Cache, CacheError, Checked, Quota, Script, Tier, Usage};

/// Redis key prefix of the usage hashes.
pub const USAGE_PREFIX: &str = "herdsman:usage:";

/// How long a usage figure from Redis is trusted for writes held during an outage: other
/// workers may store for the same user meanwhile, so an old figure says less and less.
pub const KNOWN_FOR: Duration = Duration::from_secs(60);

/// A user may hold at most this fraction (1/n) of the worker's replay budget, in keys and bytes.
pub const SHARE_DIVISOR: u64 = 4;

/// Users whose usage a worker remembers.
const KNOWN_USERS: usize = 10_000;

/// KEYS[1]: a usage hash. Returns `{keys, bytes}` of its entries not yet expired (read only).
const USAGE_SCRIPT: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local entries = redis.call('HGETALL', KEYS[1])
local keys, bytes = 0, 0
for i = 1, #entries, 2 do
  local size, expires = string.match(entries[i + 1], '^(%d+) (%d+)$')
  if size ~= nil and tonumber(expires) > now then
    keys = keys + 1
    bytes = bytes + tonumber(size)
  end
end
return {keys, bytes}
";

/// What this worker knows of one user's usage.
#[derive(Clone, Debug)]
struct Known {
    /// As Redis counted it, at `seen`.
    usage: Usage,
    seen: Instant,
    /// Held by this worker for replay since `seen`.
    held: Arc<Mutex<Held>>,
}

/// A user's writes held by this worker: each key once (a key written again replaces its size),
/// counted as a new key, since the worker cannot tell whether Redis already holds it.
#[derive(Debug, Default)]
struct Held {
    sizes: HashMap<String, u64>,
    bytes: u64,
}

impl Held {
    fn keys(&self) -> u64 {
        self.sizes.len() as u64
    }

    /// Keys and bytes held once `key` is held at `size`.
    fn with(&self, key: &str, size: u64) -> Usage {
        let replaced = self.sizes.get(key).copied();
        Usage {
            keys: self.keys() + u64::from(replaced.is_none()),
            bytes: self.bytes.saturating_sub(replaced.unwrap_or(0)) + size,
        }
    }

    fn hold(&mut self, key: &str, size: u64) {
        let after = self.with(key, size);
        self.sizes.insert(key.to_string(), size);
        self.bytes = after.bytes;
    }
}

/// The quotas (counted in Redis, through the cache), and what this worker knows of each user's
/// usage. Cheap to clone.
#[derive(Clone)]
pub struct Quotas {
    known: Arc<MemoryCache<String, Known>>,
    /// When this worker last asked Redis for a user's usage, so that it asks at most once a
    /// [`KNOWN_FOR`] half per user however many requests arrive.
    asked: Arc<MemoryCache<String, Instant>>,
    usage_script: Arc<Script>,
    pub max_keys: u64,
    pub max_bytes: u64,
}

/// Whether a write may be held for replay, as far as this worker knows.
enum Headroom {
    Fits,
    /// 1: keys, 2: bytes; or 3: the user's share of the replay budget.
    Over(i64),
    Unknown,
}

impl Quotas {
    /// Without `REDIS_URL` there are no users to count: the cache's writes are then unchecked.
    pub fn new(max_keys: u64, max_bytes: u64) -> Quotas {
        Quotas {
            known: Arc::new(MemoryCache::new(KNOWN_USERS)),
            asked: Arc::new(MemoryCache::new(KNOWN_USERS)),
            usage_script: Arc::new(Script::new(USAGE_SCRIPT)),
            max_keys,
            max_bytes,
        }
    }

    /// Makes sure this worker will know `username`'s usage should Redis go away: unless it
    /// learnt it lately, asks Redis in the background (one read of the user's usage hash). A
    /// request never waits for it.
    pub fn learn(&self, cache: &Cache, username: &str) {
        let fresh = |at: Instant| at.elapsed() < KNOWN_FOR / 2;
        if self.known.get(username).is_some_and(|known| fresh(known.seen))
            || self.asked.get(username).is_some_and(fresh)
        {
            return;
        }
        let Some(store) = cache.durable().filter(|store| store.is_available()) else { return };
        self.asked.insert(username.to_string(), Instant::now());
        let (quotas, username) = (self.clone(), username.to_string());
        tokio::spawn(async move {
            let keys = [format!("{USAGE_PREFIX}{username}")];
            let counted: Result<Vec<u64>, CacheError> = store.eval(&quotas.usage_script, &keys, &[]).await;
            if let Ok([keys, bytes]) = counted.as_deref() {
                quotas.learn_usage(&username, Some(Usage { keys: *keys, bytes: *bytes }));
            }
        });
    }

    /// Stores `value` at `cache_key` (`username`'s `key`) if both quotas hold, the check and the
    /// write in one round trip; a refusal is 403 naming the quota it would break, and stores
    /// nothing. While Redis is away or late, see the module doc. The inner result is the cache's.
    pub async fn store(
        &self,
        cache: &Cache,
        (username, key): (&str, &str),
        cache_key: &str,
        value: Bytes,
        ttl: Duration,
    ) -> Result<Result<Tier, CacheError>, ApiError> {
        let size = value.len() as u64;
        let quota = self.quota(username, key);
        let headroom = self.headroom(cache, (username, key), size);
        let may_hold = matches!(headroom, Headroom::Fits);
        match cache.set_checked(cache_key, value, ttl, quota, may_hold).await {
            Ok(Checked::Stored(Tier::Redis, usage)) => {
                self.learn_usage(username, usage);
                Ok(Ok(Tier::Redis))
            }
            Ok(Checked::Stored(Tier::Memory, _)) => {
                if let Some(known) = self.known.get(username) {
                    known.held.lock().unwrap_or_else(|e| e.into_inner()).hold(key, size);
                }
                Ok(Ok(Tier::Memory))
            }
            Ok(Checked::Refused(code, usage)) => {
                self.learn_usage(username, usage);
                Err(self.over(code))
            }
            Ok(Checked::NotHeld) => Err(match headroom {
                Headroom::Over(code) => self.over(code),
                Headroom::Fits | Headroom::Unknown => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "redis is unavailable and this worker cannot check your quota; nothing was stored, retry later",
                )
                .retry_after(2),
            }),
            Err(err) => Ok(Err(err)),
        }
    }

    /// Deletes `cache_key` (`username`'s `key`) and releases its quota entry, in one round trip;
    /// while Redis is away, when the held delete is replayed. Without Redis there is no entry,
    /// and only memory is touched.
    pub async fn delete(
        &self,
        cache: &Cache,
        (username, key): (&str, &str),
        cache_key: &str,
    ) -> Result<Tier, CacheError> {
        self.learn(cache, username);
        cache.delete_with_quota(cache_key, self.quota(username, key)).await
    }

    fn quota(&self, username: &str, key: &str) -> Quota {
        Quota {
            hash: format!("{USAGE_PREFIX}{username}"),
            field: key.to_string(),
            max_keys: self.max_keys,
            max_bytes: self.max_bytes,
        }
    }

    /// Whether this worker may hold a write of `size` bytes for `username` (module doc).
    fn headroom(&self, cache: &Cache, (username, key): (&str, &str), size: u64) -> Headroom {
        let Some(known) = self.known.get(username).filter(|known| known.seen.elapsed() < KNOWN_FOR) else {
            return Headroom::Unknown;
        };
        let held = known.held.lock().unwrap_or_else(|e| e.into_inner()).with(key, size);
        let (share_keys, share_bytes) = cache.replay_budget();
        let (share_keys, share_bytes) = (share_keys / SHARE_DIVISOR, share_bytes / SHARE_DIVISOR);
        if known.usage.keys + held.keys > self.max_keys {
            Headroom::Over(1)
        } else if known.usage.bytes + held.bytes > self.max_bytes {
            Headroom::Over(2)
        } else if held.keys > share_keys || held.bytes > share_bytes {
            Headroom::Over(3)
        } else {
            Headroom::Fits
        }
    }

    /// Remembers the usage Redis just counted for `username`.
    fn learn_usage(&self, username: &str, usage: Option<Usage>) {
        if let Some(usage) = usage {
            let known = Known { usage, seen: Instant::now(), held: Arc::default() };
            self.known.insert(username.to_string(), known);
        }
    }

    fn over(&self, code: i64) -> ApiError {
        match code {
            1 => refused(format!("key quota reached: a user may hold {} keys (HERDSMAN_USER_MAX_KEYS)", self.max_keys)),
            2 => refused(format!(
                "byte quota reached: a user may hold {} bytes of values (HERDSMAN_USER_MAX_BYTES)",
                self.max_bytes
            )),
            _ => ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "redis is unavailable and this worker holds all the writes it may keep for you: this write was not kept",
            )
            .retry_after(2),
        }
    }
}

fn refused(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_held_again_is_counted_once_at_its_latest_size() {
        let mut held = Held::default();
        held.hold("a", 10);
        held.hold("b", 5);
        for _ in 0..1000 {
            held.hold("a", 7);
        }
        assert_eq!(held.with("a", 7), Usage { keys: 2, bytes: 12 });
        assert_eq!(held.with("c", 1), Usage { keys: 3, bytes: 13 });
    }
}
