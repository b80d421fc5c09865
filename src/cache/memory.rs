//! The memory tier: a bounded moka cache whose entries each keep their own deadline, so a
//! per-key TTL holds in memory as it does in Redis.

use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::future::Cache as MemoryCache;
use moka::policy::EvictionPolicy;
use moka::Expiry;

/// What an entry costs besides its key and value bytes (moka's node, the `Bytes` header, the
/// `String`): an estimate, so that a flood of tiny values is bounded too.
pub(super) const ENTRY_OVERHEAD_BYTES: usize = 128;

/// The memory tier, holding at most `capacity_bytes` of keys, values and overhead.
pub(super) fn new_memory(capacity_bytes: u64) -> MemoryCache<String, Entry> {
    MemoryCache::builder()
        // LRU, not moka's default TinyLFU: TinyLFU may refuse a new key outright when the cache
        // is full, and a client told its value was stored must be able to read it back.
        .eviction_policy(EvictionPolicy::lru())
        .max_capacity(capacity_bytes)
        .weigher(|key: &String, entry: &Entry| weight(key, entry.value.len()))
        .expire_after(EntryExpiry)
        .build()
}

/// Values at least this large make the insert evict at once (see [`insert`]).
const EVICT_NOW_BYTES: usize = 16 << 10;

/// Inserts `entry`, keeping the tier within its byte budget now rather than later. moka
/// evicts in batches (every few dozen writes): measured under a flood of 1 MB values, the
/// worker grew by 120 MB over a 16 MB budget before a batch ran. So a large value runs the
/// pending evictions right away; small ones leave it to moka, as their batch is small.
pub(super) async fn insert(memory: &MemoryCache<String, Entry>, key: String, entry: Entry) {
    let large = entry.value.len() >= EVICT_NOW_BYTES;
    memory.insert(key, entry).await;
    if large {
        memory.run_pending_tasks().await;
    }
}

/// An entry's weight in bytes, saturating at `u32::MAX` (moka weighs in u32).
pub(super) fn weight(key: &str, value_len: usize) -> u32 {
    u32::try_from(key.len().saturating_add(value_len).saturating_add(ENTRY_OVERHEAD_BYTES)).unwrap_or(u32::MAX)
}

/// A value in memory, with its own deadline so per-entry TTLs are honoured.
#[derive(Clone)]
pub(super) struct Entry {
    pub(super) value: Bytes,
    pub(super) expires_at: Option<Instant>,
}

impl Entry {
    pub(super) fn new(value: Bytes, ttl: Option<Duration>) -> Entry {
        // A lifetime past the end of `Instant` is no expiry, not a panic.
        Entry { value, expires_at: ttl.and_then(|ttl| Instant::now().checked_add(ttl)) }
    }

    pub(super) fn is_live(&self) -> bool {
        self.expires_at.is_none_or(|at| Instant::now() < at)
    }
}

/// Tells moka to evict each entry at its own deadline.
pub(super) struct EntryExpiry;

impl Expiry<String, Entry> for EntryExpiry {
    fn expire_after_create(&self, _: &String, entry: &Entry, now: Instant) -> Option<Duration> {
        entry.expires_at.map(|at| at.saturating_duration_since(now))
    }

    fn expire_after_update(&self, _: &String, entry: &Entry, now: Instant, _: Option<Duration>) -> Option<Duration> {
        entry.expires_at.map(|at| at.saturating_duration_since(now))
    }
}
