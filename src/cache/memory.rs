//! The memory tier: a bounded moka cache whose entries each keep their own deadline, so a
//! per-key TTL holds in memory as it does in Redis.

use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::future::Cache as MemoryCache;
use moka::Expiry;

/// The memory tier, holding at most `capacity` entries.
pub(super) fn new_memory(capacity: u64) -> MemoryCache<String, Entry> {
    MemoryCache::builder().max_capacity(capacity).expire_after(EntryExpiry).build()
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
