//! How cache writes are ordered across workers and instances: last-writer-wins registers.
//!
//! Every worker of every instance writes to the same Redis, and a worker cut off from it holds
//! its writes and replays them later. A plain `SET` replayed after the link returns would undo
//! whatever other workers wrote meanwhile. So every value in Redis carries the **stamp** of the
//! write that made it, and a delete leaves a **tombstone** that carries one too:
//!
//! ```text
//! stored string = "\0hs1" | stamp: 16 decimal digits (µs since 1970) | 'v' or 'x' | value
//! ```
//!
//! One Lua script ([`WRITE_SCRIPT`]) makes every write, so the comparison and the write are one
//! atomic step in Redis: a write applies only if its stamp is newer than the value or tombstone
//! Redis holds, whether it is made online or **replayed** (held while Redis was away). The rule
//! is the same for both because an online write can reach Redis late too: one sent just before
//! a link stalled arrives when it resumes, after writes acknowledged since. A write that finds a
//! newer one is *superseded*: ordered before it, as if applied and overwritten at once.
//!
//! A stamp is the acknowledging worker's clock (microseconds, strictly increasing within a
//! process). So two writes are ordered as their wall clocks say: right whenever they were made
//! further apart than the clocks of their two hosts differ (NTP keeps that to milliseconds; one
//! host's workers share one clock). A tie keeps what Redis holds.
//!
//! A tombstone lives as long as a held write can still be replayed over it: the longest TTL a
//! value may have ([`super::CacheConfig::tombstone_lifetime`]), since a held write older than
//! its own TTL is replayed as a tombstone (it expired; it must still hide what it replaced). A
//! held write with no TTL, or a longer one, held past that lifetime can no longer be ordered
//! against a delete whose tombstone is gone: it is replayed only over an older value, never
//! onto an absent key, and counted and logged when dropped.
//!
//! With a quota ([`Quota`]), the same script counts the value in the owner's usage hash and,
//! online, refuses it when a quota would be exceeded; a replayed write is counted, never
//! refused (it was acknowledged), and a delete, online or replayed, releases its entry.
//!
//! Values written before stamps existed (no header) read as they are and order before any
//! stamped write.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bb8_redis::redis;
use bytes::Bytes;

/// The stored string starts with this, then the stamp and the kind.
const MAGIC: &[u8; 4] = b"\0hs1";
/// Digits of a stamp: microseconds since 1970 stay 16 digits until the year 2286.
const STAMP_DIGITS: usize = 16;
/// Bytes before the value.
pub(super) const HEADER_LEN: usize = MAGIC.len() + STAMP_DIGITS + 1;
const KIND_VALUE: u8 = b'v';
const KIND_TOMBSTONE: u8 = b'x';

/// KEYS[1]: the value's Redis key; KEYS[2], with a quota: the owner's usage hash.
/// ARGV[1]: the stored string (header and value); ARGV[2]: `online` (quotas checked), `replay`
/// (counted, never refused) or `late` (a replay past the tombstone lifetime: only over an older
/// stamped value, never onto an absent key); ARGV[3]: lifetime in
/// ms (0: none); with a quota, ARGV[4]: the usage field, ARGV[5]: the value's size, ARGV[6] and
/// ARGV[7]: the key and byte quotas (checked online only).
/// Returns `{code, keys, bytes}`: code 0 written, 1 key quota, 2 byte quota, 3 superseded (Redis
/// holds a newer write: nothing done), 4 unordered (a late replay onto an absent key); `keys` and `bytes` are
/// the owner's usage after a quota'd `v` write (-1 otherwise).
pub(super) const WRITE_SCRIPT: &str = r"
local head = redis.call('GETRANGE', KEYS[1], 0, 20)
local old = -1
if string.sub(head, 1, 4) == '\0hs1' then
  old = tonumber(string.sub(head, 5, 20)) or 0
elseif head ~= '' then
  old = 0
end
local stamp = tonumber(string.sub(ARGV[1], 5, 20))
local kind = string.sub(ARGV[1], 21, 21)
local mode = ARGV[2]
if stamp <= old then return {3, -1, -1} end
if mode == 'late' and old < 0 then return {4, -1, -1} end
local keys, bytes = -1, -1
if #KEYS > 1 then
  if kind == 'v' then
    local time = redis.call('TIME')
    local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
    local entries = redis.call('HGETALL', KEYS[2])
    local latest = now
    keys, bytes = 0, 0
    for i = 1, #entries, 2 do
      local size, expires = string.match(entries[i + 1], '^(%d+) (%d+)$')
      size = tonumber(size)
      expires = tonumber(expires)
      if size == nil or expires <= now then
        redis.call('HDEL', KEYS[2], entries[i])
      elseif entries[i] ~= ARGV[4] then
        keys = keys + 1
        bytes = bytes + size
        if expires > latest then latest = expires end
      end
    end
    local size = tonumber(ARGV[5])
    if mode == 'online' then
      if keys + 1 > tonumber(ARGV[6]) then return {1, keys, bytes} end
      if bytes + size > tonumber(ARGV[7]) then return {2, keys, bytes} end
    end
    local lifetime = tonumber(ARGV[3])
    local expires = now + lifetime
    if lifetime == 0 then expires = now + 315360000000 end
    redis.call('HSET', KEYS[2], ARGV[4], string.format('%d %d', size, expires))
    if expires > latest then latest = expires end
    redis.call('PEXPIREAT', KEYS[2], latest)
    keys = keys + 1
    bytes = bytes + size
  else
    redis.call('HDEL', KEYS[2], ARGV[4])
  end
end
if ARGV[3] == '0' then
  redis.call('SET', KEYS[1], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
end
return {0, keys, bytes}
";

/// What the write script answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    Written,
    /// Online only: this quota (1 keys, 2 bytes) would be exceeded; nothing was written.
    OverQuota(i64),
    /// Redis holds a newer write; this one was not applied (it is ordered before that one).
    Superseded,
    /// A late replay (past the tombstone lifetime) onto an absent key: not applied.
    Unordered,
}

/// The owner's usage after a quota'd write, as the script counted it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub keys: u64,
    pub bytes: u64,
}

/// Reads the script's `{code, keys, bytes}`.
pub(super) fn outcome(reply: &[i64]) -> (Outcome, Option<Usage>) {
    let code = reply.first().copied().unwrap_or(-1);
    let usage = match (reply.get(1), reply.get(2)) {
        (Some(&keys), Some(&bytes)) if keys >= 0 && bytes >= 0 => {
            Some(Usage { keys: keys.unsigned_abs(), bytes: bytes.unsigned_abs() })
        }
        _ => None,
    };
    let outcome = match code {
        0 => Outcome::Written,
        3 => Outcome::Superseded,
        4 => Outcome::Unordered,
        code => Outcome::OverQuota(code),
    };
    (outcome, usage)
}

/// A quota the write script checks and counts: the owner's usage hash, the field this value
/// is counted under, and the limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quota {
    /// The usage hash's Redis key (not a cache key: no prefix is added).
    pub hash: String,
    /// The field of this value in the hash.
    pub field: String,
    pub max_keys: u64,
    pub max_bytes: u64,
}

/// How a write reaches Redis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    Online,
    Replay,
    /// A replay past the tombstone lifetime.
    Late,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Online => "online",
            Mode::Replay => "replay",
            Mode::Late => "late",
        }
    }
}

/// A stamp from this process's clock: microseconds since 1970, strictly increasing within the
/// process, so that two writes of one worker never tie.
pub(super) fn now() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let clock = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let clock = u64::try_from(clock.as_micros()).unwrap_or(u64::MAX);
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = clock.max(last + 1);
        match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

/// The stored string of a value (`Some`) or a tombstone (`None`) with `stamp`.
pub(super) fn encode(stamp: u64, value: Option<&[u8]>) -> Vec<u8> {
    let (kind, value) = match value {
        Some(value) => (KIND_VALUE, value),
        None => (KIND_TOMBSTONE, &[][..]),
    };
    let mut stored = Vec::with_capacity(HEADER_LEN + value.len());
    stored.extend_from_slice(MAGIC);
    // 16 digits until 2286; a clock past that would only make stamps longer, never shorter.
    stored.extend_from_slice(format!("{:016}", stamp.min(9_999_999_999_999_999)).as_bytes());
    stored.push(kind);
    stored.extend_from_slice(value);
    stored
}

/// The value in a stored string: `None` for a tombstone. A string without the header is a value
/// written before stamps, read as it is.
pub(super) fn decode(stored: Bytes) -> Option<Bytes> {
    if stored.len() < HEADER_LEN || !stored.starts_with(MAGIC) {
        return Some(stored);
    }
    match stored[HEADER_LEN - 1] {
        KIND_TOMBSTONE => None,
        _ => Some(stored.slice(HEADER_LEN..)),
    }
}

/// The write script's arguments for one write (`verb` and `body` come from
/// [`super::durable::Script::run`] or the replay's `EVALSHA`).
pub(super) fn command(
    verb: &str,
    body: &str,
    redis_key: &str,
    stored: &[u8],
    mode: Mode,
    lifetime: Option<Duration>,
    quota: Option<&Quota>,
) -> redis::Cmd {
    let ms = lifetime.map_or(0, |ttl| u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1));
    let mut cmd = redis::cmd(verb);
    cmd.arg(body).arg(if quota.is_some() { 2 } else { 1 }).arg(redis_key);
    if let Some(quota) = quota {
        cmd.arg(&quota.hash);
    }
    cmd.arg(stored).arg(mode.as_str()).arg(ms);
    if let Some(quota) = quota {
        let size = stored.len().saturating_sub(HEADER_LEN);
        cmd.arg(&quota.field).arg(size).arg(quota.max_keys).arg(quota.max_bytes);
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_tombstones_round_trip() {
        let stored = encode(1_765_000_000_000_000, Some(b"hello"));
        assert_eq!(stored.len(), HEADER_LEN + 5);
        assert_eq!(&stored[4..20], b"1765000000000000");
        assert_eq!(decode(Bytes::from(stored)), Some(Bytes::from_static(b"hello")));
        assert_eq!(decode(Bytes::from(encode(1, None))), None);
        // An empty value is a value, not a tombstone.
        assert_eq!(decode(Bytes::from(encode(1, Some(b"")))), Some(Bytes::new()));
    }

    #[test]
    fn unstamped_values_read_as_they_are() {
        for raw in [&b"plain"[..], b"", b"\0hs1short"] {
            assert_eq!(decode(Bytes::copy_from_slice(raw)), Some(Bytes::copy_from_slice(raw)));
        }
    }

    #[test]
    fn stamps_increase_within_the_process() {
        let mut last = now();
        for _ in 0..10_000 {
            let next = now();
            assert!(next > last);
            last = next;
        }
    }

    #[test]
    fn stamps_compare_as_strings_the_way_they_compare_as_numbers() {
        let (a, b) = (encode(999_999, None), encode(1_000_000, None));
        assert!(a[4..20] < b[4..20]);
    }
}
