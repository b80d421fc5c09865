//! The memory tier: a bounded cache of byte-weighted entries, each with its own deadline, so a
//! per-key TTL holds in memory as it does in Redis.
//!
//! [quick_cache] keeps the byte budget on every insert (it evicts before it admits), where an
//! eviction that runs later lets a flood of large values overshoot it. Its policy is S3-FIFO:
//! a new key is always admitted (a client told its value was stored can read it back), and a
//! scan of keys read once cannot push out the keys read again. An expired entry is never
//! returned ([`Entry::is_live`]); it keeps its weight until the policy evicts it, so the
//! budget bounds expired and live entries together.

use std::time::{Duration, Instant};

use bytes::Bytes;
use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, OptionsBuilder, Weighter};

/// What an entry costs besides its key and value bytes (the cache's slot, the `Bytes` header,
/// the `String`): an estimate, so that a flood of tiny values is bounded too.
pub(super) const ENTRY_OVERHEAD_BYTES: usize = 128;

/// The memory tier of one worker, holding at most its capacity in bytes of keys, values and
/// overhead.
pub(super) struct MemoryTier {
    entries: Cache<String, Entry, ByBytes>,
}

impl MemoryTier {
    pub(super) fn new(capacity_bytes: u64) -> MemoryTier {
        let options = OptionsBuilder::new()
            // A guess at the entry count, for the index's first allocation: values of 1 kB.
            .estimated_items_capacity(usize::try_from(capacity_bytes / 1024).unwrap_or(usize::MAX).min(1 << 16))
            .weight_capacity(capacity_bytes)
            // One shard: a worker's runtime has one thread, so there is no lock to spread, and
            // shards would split the budget (a value larger than a shard's part is refused).
            .shards(1)
            .build();
        let entries = match options {
            Ok(options) => Cache::with_options(options, ByBytes, DefaultHashBuilder::default(), Default::default()),
            // Only a zero shard count or estimate is refused, and neither is given above.
            Err(_) => Cache::with_weighter(1, capacity_bytes, ByBytes),
        };
        MemoryTier { entries }
    }

    /// The entry under `key`, live or not (callers that serve it filter with [`Entry::is_live`]).
    pub(super) fn get(&self, key: &str) -> Option<Entry> {
        self.entries.get(key)
    }

    /// Stores `entry`, evicting first what it needs to stay within the budget. An entry larger
    /// than the whole tier is not kept (and the old value under `key` is dropped).
    pub(super) fn insert(&self, key: String, entry: Entry) {
        self.entries.insert(key, entry);
    }

    pub(super) fn invalidate(&self, key: &str) {
        self.entries.remove(key);
    }

    /// Bytes held (keys, values and overhead).
    #[cfg(test)]
    pub(super) fn weighted_size(&self) -> u64 {
        self.entries.weight()
    }

    #[cfg(test)]
    pub(super) fn entry_count(&self) -> usize {
        self.entries.len()
    }
}

/// Weighs an entry in bytes, as [`weight`] does.
#[derive(Clone, Copy)]
struct ByBytes;

impl Weighter<String, Entry> for ByBytes {
    fn weight(&self, key: &String, entry: &Entry) -> u64 {
        weight(key, entry.value.len())
    }
}

/// An entry's weight in bytes: the memory tier's and the replay budget's measure.
pub(super) fn weight(key: &str, value_len: usize) -> u64 {
    u64::try_from(key.len().saturating_add(value_len).saturating_add(ENTRY_OVERHEAD_BYTES)).unwrap_or(u64::MAX)
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
