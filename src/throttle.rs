//! [`Throttle`]: token buckets that limit login and registration attempts per account and per
//! client address, checked before any bcrypt work so that password guessing costs the guesser,
//! not the server.
//!
//! # Shared in Redis
//! The buckets live in Redis (`herdsman:throttle:{kind}:{id}`, a hash of tokens and last
//! refill, expiring once it would be full again), updated by one Lua script run with `EVALSHA`:
//! all the buckets of an attempt are refilled, checked and taken from atomically, so every
//! worker of every instance draws from the same buckets and no race lets an extra attempt
//! through. An attempt refused by one bucket takes nothing from the others.
//!
//! # During a Redis outage
//! Each worker falls back to buckets of its own in memory: a bounded cache ([quick_cache]) of at
//! most [`FALLBACK_CAPACITY`] buckets, so an attacker rotating addresses or names cannot grow it
//! without bound. Past the capacity, buckets made and never used again go first (S3-FIFO): a
//! flood of new names cannot push out the bucket of an account under attack, which its
//! attempts keep using. (A bucket forgotten is a full one, which is what an unused bucket
//! refills to within [`WINDOW`] anyway.) The limits then hold per worker instead of per
//! deployment. (Logins need Redis for the user record anyway.)

use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quick_cache::sync::Cache as MemoryCache;
use sha2::{Digest, Sha256};

use crate::cache::{DurableStore, Script};

/// Every bucket refills completely in this time: a limit is "N attempts per minute".
pub const WINDOW: Duration = Duration::from_secs(60);

/// Buckets a worker keeps in memory during an outage (about 200 bytes each).
pub const FALLBACK_CAPACITY: usize = 50_000;

/// Redis key prefix of the buckets.
pub const THROTTLE_PREFIX: &str = "herdsman:throttle:";

/// KEYS: the buckets; ARGV: capacity, window in ms, for each bucket in turn. Returns 0 when a
/// token was taken from every bucket, else the milliseconds until each has one.
const TAKE_SCRIPT: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local wait = 0
local tokens = {}
for i, key in ipairs(KEYS) do
  local capacity = tonumber(ARGV[2 * i - 1])
  local window = tonumber(ARGV[2 * i])
  local state = redis.call('HMGET', key, 'tokens', 'at')
  local t = tonumber(state[1]) or capacity
  local at = tonumber(state[2]) or now
  t = math.min(capacity, t + math.max(0, now - at) * capacity / window)
  tokens[i] = t
  if t < 1 then
    wait = math.max(wait, math.ceil((1 - t) * window / capacity))
  end
end
if wait > 0 then
  return wait
end
for i, key in ipairs(KEYS) do
  redis.call('HSET', key, 'tokens', tostring(tokens[i] - 1), 'at', now)
  redis.call('PEXPIRE', key, tonumber(ARGV[2 * i]))
end
return 0
";

/// One bucket an attempt must take a token from.
#[derive(Debug, Clone)]
pub struct Bucket {
    key: String,
    per_window: u32,
}

impl Bucket {
    /// A bucket for `id` of `kind` (`account`, `address`), `per_window` attempts a minute. The
    /// id is hashed: a name of any length makes a key of fixed size.
    pub fn new(kind: &str, id: &str, per_window: u32) -> Bucket {
        let digest = Sha256::digest(id.as_bytes());
        let short: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        Bucket { key: format!("{THROTTLE_PREFIX}{kind}:{short}"), per_window: per_window.max(1) }
    }

    /// The `address` bucket of a client: its IPv4 address, or its IPv6 address's /64. One IPv6
    /// host is usually given a whole /64 (SLAAC, a cloud VM's subnet), so counting single
    /// addresses would hand a guesser 2^64 fresh buckets.
    pub fn for_address(address: IpAddr, per_window: u32) -> Bucket {
        let network = match address.to_canonical() {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => {
                let network = Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX));
                format!("{network}/64")
            }
        };
        Bucket::new("address", &network, per_window)
    }
}

/// An attempt refused: try again after `retry_after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many attempts, retry in {retry_after:?}")]
pub struct Throttled {
    pub retry_after: Duration,
}

impl Throttled {
    /// Whole seconds for `Retry-After`, at least 1.
    pub fn retry_after_secs(&self) -> u32 {
        u32::try_from(self.retry_after.as_millis().div_ceil(1000)).unwrap_or(u32::MAX).max(1)
    }
}

/// A bucket in memory: tokens left and when they were counted.
struct Fill {
    tokens: f64,
    at: Instant,
}

/// The login throttle of one worker. Cheap to clone.
#[derive(Clone)]
pub struct Throttle {
    store: Option<DurableStore>,
    script: Arc<Script>,
    fallback: Arc<MemoryCache<String, Arc<Mutex<Fill>>>>,
}

impl Throttle {
    /// `store` is `None` without `REDIS_URL` (memory buckets only).
    pub fn new(store: Option<DurableStore>) -> Throttle {
        let fallback = Arc::new(MemoryCache::new(FALLBACK_CAPACITY));
        Throttle { store, script: Arc::new(Script::new(TAKE_SCRIPT)), fallback }
    }

    /// Takes a token from every bucket, or from none and says how long to wait.
    pub async fn take(&self, buckets: &[Bucket]) -> Result<(), Throttled> {
        if let Some(store) = self.store.as_ref().filter(|store| store.is_available()) {
            let keys: Vec<String> = buckets.iter().map(|b| b.key.clone()).collect();
            let window_ms = i64::try_from(WINDOW.as_millis()).unwrap_or(i64::MAX);
            let args: Vec<i64> = buckets.iter().flat_map(|b| [i64::from(b.per_window), window_ms]).collect();
            match store.eval::<i64>(&self.script, &keys, &args).await {
                Ok(0) => return Ok(()),
                Ok(wait_ms) => {
                    return Err(Throttled { retry_after: Duration::from_millis(wait_ms.unsigned_abs()) });
                }
                Err(err) => tracing::debug!(error = %err, "throttle falls back to memory"),
            }
        }
        self.take_in_memory(buckets)
    }

    fn take_in_memory(&self, buckets: &[Bucket]) -> Result<(), Throttled> {
        let now = Instant::now();
        let mut fills = Vec::with_capacity(buckets.len());
        for bucket in buckets {
            let capacity = f64::from(bucket.per_window);
            let fill = self.fallback.get_or_insert_with(&bucket.key, || {
                Ok::<_, std::convert::Infallible>(Arc::new(Mutex::new(Fill { tokens: capacity, at: now })))
            });
            let Ok(fill) = fill;
            fills.push((fill, capacity));
        }
        // Each bucket's own lock, in the order given; attempts list their buckets in one order.
        let mut guards: Vec<_> = fills.iter().map(|(fill, _)| fill.lock().unwrap_or_else(|e| e.into_inner())).collect();
        let mut wait = Duration::ZERO;
        for (guard, (_, capacity)) in guards.iter_mut().zip(&fills) {
            let rate = capacity / WINDOW.as_secs_f64();
            let elapsed = now.saturating_duration_since(guard.at).as_secs_f64();
            guard.tokens = (guard.tokens + elapsed * rate).min(*capacity);
            guard.at = now;
            if guard.tokens < 1.0 {
                wait = wait.max(Duration::from_secs_f64((1.0 - guard.tokens) / rate));
            }
        }
        if !wait.is_zero() {
            return Err(Throttled { retry_after: wait });
        }
        for guard in &mut guards {
            guard.tokens -= 1.0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_buckets_refuse_past_their_size_and_say_when_to_retry() {
        let throttle = Throttle::new(None);
        let account = Bucket::new("account", "alice", 3);
        let address = Bucket::new("address", "192.0.2.1", 4);
        for _ in 0..3 {
            throttle.take(&[address.clone(), account.clone()]).await.expect("within the limit");
        }
        let refused = throttle.take(&[address.clone(), account.clone()]).await.expect_err("over the limit");
        // One token of three a minute comes back in 20 s.
        assert!((1..=20).contains(&refused.retry_after_secs()), "{refused:?}");
        // The refused attempt took nothing from the address: its fourth token is bob's...
        throttle.take(&[address.clone(), Bucket::new("account", "bob", 3)]).await.expect("bob");
        // ...and then the address is spent, whatever the account.
        let refused = throttle.take(&[address, Bucket::new("account", "carol", 3)]).await;
        assert!(refused.is_err());
    }

    #[test]
    fn an_ipv6_client_is_counted_by_its_64_and_an_ipv4_one_by_its_address() {
        let key = |address: &str| Bucket::for_address(address.parse().expect("address"), 10).key;
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff:ffff:ffff:ffff"), "one /64");
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"), "the next /64");
        assert_eq!(key("::ffff:192.0.2.1"), key("192.0.2.1"), "IPv4-mapped is the IPv4 address");
        assert_ne!(key("192.0.2.1"), key("192.0.2.2"));
        assert_eq!(key("192.0.2.1"), Bucket::new("address", "192.0.2.1", 10).key);
    }

    #[test]
    fn bucket_keys_have_a_fixed_size_whatever_the_name() {
        let long = Bucket::new("account", &"x".repeat(100_000), 1);
        assert_eq!(long.key.len(), Bucket::new("account", "a", 1).key.len());
        assert_ne!(long.key, Bucket::new("address", &"x".repeat(100_000), 1).key);
    }
}
