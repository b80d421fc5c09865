//! The shared-memory table every count lives in: one [`Block`] per worker slot, one block of
//! retired totals, and a header the master writes (restarts, workers, heartbeat age).
//!
//! The master creates the table (a `memfd`), hands it to each worker with the worker's slot
//! number (see [`crate::contract`]) and maps it itself. A worker only ever writes its own block;
//! the master only writes the header and the retired block, and folds a reaped worker's block
//! into the retired one before the slot can be reused. A reader (the master's `/metrics`, or a
//! worker's token-protected one) sums the retired block and the blocks of the slots in use,
//! under a sequence lock so that a fold in progress is never counted twice or not at all.
//!
//! Everything is an atomic in memory that outlives the process that wrote it, so a worker that
//! dies, even by SIGKILL, loses no count: the master folds what it left.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering};

use super::labels::{Event, Level, RestartReason, CLASSES, METHODS};
use crate::balance::SLOT_COUNT;
use crate::shared_memory::SharedMemory;

/// Route templates one block can tell apart, including the two fixed ones below. A route seen
/// once the table is full is counted under [`OTHER_ROUTE`]: no request can create a series.
pub const MAX_ROUTES: usize = 64;
/// The label of requests that matched no route (and of those answered before routing).
pub const UNMATCHED_ROUTE: &str = "unmatched";
/// The label of routes beyond [`MAX_ROUTES`].
pub const OTHER_ROUTE: &str = "other";
/// Index of [`UNMATCHED_ROUTE`] and [`OTHER_ROUTE`] in every block; named routes follow.
pub(crate) const UNMATCHED_INDEX: usize = 0;
pub(crate) const OTHER_INDEX: usize = 1;
/// Longest route template kept; a longer one is cut (templates are written by the app's
/// author, not by clients).
const LABEL_BYTES: usize = 92;

/// Upper bounds of the request-duration buckets, in microseconds (the last bucket is +Inf).
pub const DURATION_BOUNDS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
    10_000_000,
];
pub(crate) const BUCKETS: usize = DURATION_BOUNDS_US.len() + 1;

#[repr(C)]
struct RouteLabel {
    len: AtomicU32,
    bytes: [AtomicU8; LABEL_BYTES],
}

/// Durations in [`DURATION_BOUNDS_US`] buckets (not cumulative; the last is +Inf), and their sum.
#[repr(C)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    sum_us: AtomicU64,
}

#[repr(C)]
struct RouteStats {
    requests: [[AtomicU64; CLASSES]; METHODS],
    duration: Histogram,
}

/// One worker's counts (or the retired totals). All zero is the empty block.
#[repr(C, align(4096))]
pub(crate) struct Block {
    /// Route labels written so far (indices from 2); published after the label's bytes.
    routes_used: AtomicU32,
    in_flight: AtomicI64,
    events: [AtomicU64; Event::COUNT],
    levels: [AtomicI64; Level::COUNT],
    /// How long warm-up attempts took (a timed-out one: its timeout).
    warmup_durations: Histogram,
    /// How long requests waited between the platform's router and this worker.
    queue_times: Histogram,
    labels: [RouteLabel; MAX_ROUTES],
    routes: [RouteStats; MAX_ROUTES],
}

/// What the master publishes for every reader.
#[repr(C, align(4096))]
struct Header {
    /// Odd while the master folds a block into the retired totals (a sequence lock).
    generation: AtomicU64,
    restarts: [AtomicU64; RestartReason::COUNT],
    /// Workers in service and ready.
    workers: AtomicU64,
    /// The longest silence of a serving worker, in milliseconds.
    heartbeat_age_ms: AtomicU64,
    /// 1 for each slot a live worker holds; readers skip the others (and their untouched pages).
    in_use: [AtomicU8; SLOT_COUNT],
}

#[repr(C)]
struct Layout {
    header: Header,
    retired: Block,
    slots: [Block; SLOT_COUNT],
}

/// The table, mapped into this process.
pub struct MetricsTable {
    memory: SharedMemory,
}

impl MetricsTable {
    /// Creates a zeroed table (the master, once). Pages are allocated only when written.
    pub fn create() -> std::io::Result<MetricsTable> {
        Ok(MetricsTable { memory: SharedMemory::create(c"herdsman-metrics", std::mem::size_of::<Layout>())? })
    }

    /// Maps the table a worker inherited from its master.
    pub fn from_inherited(fd: OwnedFd) -> std::io::Result<MetricsTable> {
        let memory = SharedMemory::from_inherited(fd, std::mem::size_of::<Layout>(), "the metrics table")?;
        Ok(MetricsTable { memory })
    }

    /// The memfd, for the master to hand to workers.
    pub fn fd(&self) -> &OwnedFd {
        self.memory.fd()
    }

    fn layout(&self) -> &Layout {
        // SAFETY: the mapping holds one `Layout` (page-aligned, as `Layout` needs), lives as
        // long as `self`, and every access goes through atomics, for which any bit pattern (all
        // zero on a fresh memfd) is valid.
        unsafe { self.memory.start().cast::<Layout>().as_ref() }
    }

    pub(crate) fn block(&self, slot: usize) -> Option<&Block> {
        self.layout().slots.get(slot)
    }

    /// Marks `slot` as held by a new worker (the master, at spawn).
    pub fn claim(&self, slot: usize) {
        if let Some(flag) = self.layout().header.in_use.get(slot) {
            flag.store(1, Ordering::Release);
        }
    }

    /// Adds what the worker in `slot` counted to the retired totals and empties the slot (the
    /// master, when it reaps the worker). In-flight requests and levels are not carried over:
    /// they died with the worker.
    pub fn retire(&self, slot: usize) {
        let layout = self.layout();
        let (Some(block), Some(flag)) = (layout.slots.get(slot), layout.header.in_use.get(slot)) else { return };
        let generation = &layout.header.generation;
        generation.fetch_add(1, Ordering::AcqRel);
        std::sync::atomic::fence(Ordering::SeqCst);
        let retired = &layout.retired;
        for (index, route) in block.routes().enumerate() {
            let into = match index {
                UNMATCHED_INDEX | OTHER_INDEX => Some(index),
                _ => block.label(index).and_then(|label| retired.route_index(&label)),
            }
            .unwrap_or(OTHER_INDEX);
            retired.routes[into].add(route);
        }
        for (into, from) in retired.events.iter().zip(&block.events) {
            into.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        retired.warmup_durations.add(&block.warmup_durations);
        retired.queue_times.add(&block.queue_times);
        block.clear();
        flag.store(0, Ordering::Release);
        std::sync::atomic::fence(Ordering::SeqCst);
        generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Requests answered and in flight in `slot` (for `herdsman status`).
    pub fn slot_counts(&self, slot: usize) -> (u64, i64) {
        let Some(block) = self.block(slot) else { return (0, 0) };
        let served =
            block.routes().map(|r| r.requests.iter().flatten().map(|c| c.load(Ordering::Relaxed)).sum::<u64>());
        (served.sum(), block.in_flight.load(Ordering::Relaxed))
    }

    pub fn count_restart(&self, reason: RestartReason) {
        self.layout().header.restarts[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The master's view of its workers, published on every tick.
    pub fn publish_workers(&self, serving: u64, heartbeat_age_ms: u64) {
        let header = &self.layout().header;
        header.workers.store(serving, Ordering::Relaxed);
        header.heartbeat_age_ms.store(heartbeat_age_ms, Ordering::Relaxed);
    }

    /// Every count, summed over the retired totals and the workers alive now.
    pub fn snapshot(&self) -> Snapshot {
        let layout = self.layout();
        // A fold takes microseconds; a reader that keeps losing the race takes what it has.
        let mut snapshot = Snapshot::default();
        for _ in 0..100 {
            let before = layout.header.generation.load(Ordering::Acquire);
            if before % 2 == 1 {
                std::thread::yield_now();
                continue;
            }
            snapshot = self.read();
            std::sync::atomic::fence(Ordering::SeqCst);
            if layout.header.generation.load(Ordering::Acquire) == before {
                break;
            }
        }
        snapshot
    }

    fn read(&self) -> Snapshot {
        let layout = self.layout();
        let header = &layout.header;
        let mut snapshot = Snapshot {
            restarts: std::array::from_fn(|i| header.restarts[i].load(Ordering::Relaxed)),
            workers: header.workers.load(Ordering::Relaxed),
            heartbeat_age_ms: header.heartbeat_age_ms.load(Ordering::Relaxed),
            ..Snapshot::default()
        };
        let live = header.in_use.iter().zip(&layout.slots).filter(|(flag, _)| flag.load(Ordering::Acquire) == 1);
        for block in std::iter::once(&layout.retired).chain(live.map(|(_, block)| block)) {
            snapshot.add(block);
        }
        snapshot
    }
}

impl Block {
    /// The route statistics in use: the two fixed ones and the labelled ones.
    fn routes(&self) -> impl Iterator<Item = &RouteStats> {
        let used = (self.routes_used.load(Ordering::Acquire) as usize).min(MAX_ROUTES - 2);
        self.routes.iter().take(2 + used)
    }

    fn label(&self, index: usize) -> Option<String> {
        let label = self.labels.get(index)?;
        let len = (label.len.load(Ordering::Relaxed) as usize).min(LABEL_BYTES);
        let bytes: Vec<u8> = label.bytes[..len].iter().map(|b| b.load(Ordering::Relaxed)).collect();
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The index of `template`, labelling a new one if there is room; `None` when full.
    /// Only the block's one writer calls this (a worker for its own block, the master for the
    /// retired one), so finding and appending need no lock; readers see a label only once
    /// `routes_used` is published after its bytes.
    pub(crate) fn route_index(&self, template: &str) -> Option<usize> {
        let used = (self.routes_used.load(Ordering::Acquire) as usize).min(MAX_ROUTES - 2);
        let cut = truncate(template);
        if let Some(found) = (2..2 + used).find(|&i| self.label(i).as_deref() == Some(cut)) {
            return Some(found);
        }
        if used == MAX_ROUTES - 2 {
            return None;
        }
        let index = 2 + used;
        let label = &self.labels[index];
        for (slot, byte) in label.bytes.iter().zip(cut.bytes()) {
            slot.store(byte, Ordering::Relaxed);
        }
        label.len.store(cut.len() as u32, Ordering::Relaxed);
        self.routes_used.store(used as u32 + 1, Ordering::Release);
        Some(index)
    }

    /// Counts one answered request.
    pub(crate) fn record(&self, route: usize, method: usize, class: usize, micros: u64) {
        let Some(stats) = self.routes.get(route) else { return };
        stats.requests[method.min(METHODS - 1)][class.min(CLASSES - 1)].fetch_add(1, Ordering::Relaxed);
        stats.duration.observe(micros);
    }

    pub(crate) fn warmup_took(&self, micros: u64) {
        self.warmup_durations.observe(micros);
    }

    pub(crate) fn queued(&self, micros: u64) {
        self.queue_times.observe(micros);
    }

    pub(crate) fn in_flight(&self, delta: i64) {
        self.in_flight.fetch_add(delta, Ordering::Relaxed);
    }

    pub(crate) fn event(&self, event: Event) {
        self.events[event as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn level(&self, level: Level, delta: i64) {
        self.levels[level as usize].fetch_add(delta, Ordering::Relaxed);
    }

    pub(crate) fn set_level(&self, level: Level, value: i64) {
        self.levels[level as usize].store(value, Ordering::Relaxed);
    }

    fn clear(&self) {
        self.in_flight.store(0, Ordering::Relaxed);
        self.events.iter().for_each(|e| e.store(0, Ordering::Relaxed));
        self.levels.iter().for_each(|l| l.store(0, Ordering::Relaxed));
        self.warmup_durations.counters().chain(self.queue_times.counters()).for_each(|c| c.store(0, Ordering::Relaxed));
        for route in self.routes() {
            route.clear();
        }
        for label in &self.labels {
            label.len.store(0, Ordering::Relaxed);
        }
        self.routes_used.store(0, Ordering::Release);
    }
}

impl RouteStats {
    fn counters(&self) -> impl Iterator<Item = &AtomicU64> {
        self.requests.iter().flatten().chain(self.duration.counters())
    }

    fn add(&self, from: &RouteStats) {
        for (into, from) in self.counters().zip(from.counters()) {
            into.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    fn clear(&self) {
        self.counters().for_each(|c| c.store(0, Ordering::Relaxed));
    }
}

impl Histogram {
    fn observe(&self, micros: u64) {
        let bucket = DURATION_BOUNDS_US.iter().position(|&bound| micros <= bound).unwrap_or(BUCKETS - 1);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(micros, Ordering::Relaxed);
    }

    fn counters(&self) -> impl Iterator<Item = &AtomicU64> {
        self.buckets.iter().chain(std::iter::once(&self.sum_us))
    }

    fn add(&self, from: &Histogram) {
        for (into, from) in self.counters().zip(from.counters()) {
            into.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    fn add_to(&self, totals: &mut Durations) {
        for (into, from) in totals.buckets.iter_mut().zip(&self.buckets) {
            *into += from.load(Ordering::Relaxed);
        }
        totals.sum_us += self.sum_us.load(Ordering::Relaxed);
    }
}

/// Cuts a template to [`LABEL_BYTES`] on a character boundary.
fn truncate(template: &str) -> &str {
    let mut end = template.len().min(LABEL_BYTES);
    while !template.is_char_boundary(end) {
        end -= 1;
    }
    &template[..end]
}

/// Durations, summed: per [`DURATION_BOUNDS_US`] bucket (not cumulative; the last is +Inf).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Durations {
    pub buckets: [u64; BUCKETS],
    pub sum_us: u64,
}

/// The requests of one route, summed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteTotals {
    /// `[method][status class]`, see [`super::labels`].
    pub requests: [[u64; CLASSES]; METHODS],
    pub duration: Durations,
}

/// Every count at one moment, summed over the master, the retired workers and the live ones.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// By route label.
    pub routes: BTreeMap<String, RouteTotals>,
    pub in_flight: i64,
    pub events: [u64; Event::COUNT],
    pub levels: [i64; Level::COUNT],
    pub warmup_durations: Durations,
    pub queue_times: Durations,
    pub restarts: [u64; RestartReason::COUNT],
    pub workers: u64,
    pub heartbeat_age_ms: u64,
}

impl Snapshot {
    fn add(&mut self, block: &Block) {
        for (index, stats) in block.routes().enumerate() {
            let label = match index {
                UNMATCHED_INDEX => UNMATCHED_ROUTE.to_string(),
                OTHER_INDEX => OTHER_ROUTE.to_string(),
                _ => block.label(index).unwrap_or_else(|| OTHER_ROUTE.to_string()),
            };
            let totals = self.routes.entry(label).or_default();
            for (method, classes) in stats.requests.iter().enumerate() {
                for (class, count) in classes.iter().enumerate() {
                    totals.requests[method][class] += count.load(Ordering::Relaxed);
                }
            }
            stats.duration.add_to(&mut totals.duration);
        }
        self.in_flight += block.in_flight.load(Ordering::Relaxed);
        for (into, from) in self.events.iter_mut().zip(&block.events) {
            *into += from.load(Ordering::Relaxed);
        }
        for (into, from) in self.levels.iter_mut().zip(&block.levels) {
            *into += from.load(Ordering::Relaxed);
        }
        block.warmup_durations.add_to(&mut self.warmup_durations);
        block.queue_times.add_to(&mut self.queue_times);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requests(snapshot: &Snapshot, route: &str) -> u64 {
        snapshot.routes.get(route).map_or(0, |r| r.requests.iter().flatten().sum())
    }

    #[test]
    fn a_retired_workers_counts_stay_and_its_slot_starts_empty() {
        let table = MetricsTable::create().unwrap();
        table.claim(3);
        let block = table.block(3).unwrap();
        let live = block.route_index("/live").unwrap();
        for _ in 0..5 {
            block.record(live, 0, 1, 700);
        }
        block.record(UNMATCHED_INDEX, 0, 3, 10);
        block.in_flight(2);
        assert_eq!(requests(&table.snapshot(), "/live"), 5);
        table.retire(3);
        let after = table.snapshot();
        assert_eq!(requests(&after, "/live"), 5);
        assert_eq!(requests(&after, UNMATCHED_ROUTE), 1);
        assert_eq!(after.in_flight, 0, "a dead worker's requests are no longer in flight");
        assert_eq!(after.routes["/live"].duration.buckets[1], 5, "700 µs is in the 1 ms bucket");
        table.claim(3);
        let again = table.block(3).unwrap();
        assert_eq!(again.route_index("/other-route"), Some(2), "the slot's labels start over");
        again.record(2, 0, 1, 1);
        assert_eq!(requests(&table.snapshot(), "/live"), 5);
        assert_eq!(requests(&table.snapshot(), "/other-route"), 1);
    }

    #[test]
    fn a_block_is_48_kib_so_the_table_stays_near_50_mb_of_address_space() {
        assert_eq!(std::mem::size_of::<Block>(), 48 * 1024);
        assert!(std::mem::size_of::<Layout>() < 52 << 20);
    }

    #[test]
    fn routes_past_the_limit_are_counted_as_other() {
        let table = MetricsTable::create().unwrap();
        table.claim(0);
        let block = table.block(0).unwrap();
        for i in 0..MAX_ROUTES - 2 {
            assert_eq!(block.route_index(&format!("/r{i}")), Some(i + 2));
        }
        assert_eq!(block.route_index("/one-too-many"), None);
        assert_eq!(block.route_index("/r0"), Some(2), "known routes keep their index");
    }
}
