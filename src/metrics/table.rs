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

use super::labels::{Event, Level, RestartReason, WarmupOutcome, CLASSES, METHODS};
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
/// Longest route template or task name kept; a longer one is cut (both are written by the
/// app's author, not by clients).
const LABEL_BYTES: usize = 92;
/// Warm-up tasks one block tells apart by name, including [`OTHER_TASK`] at index 0: the
/// built-in tasks (three), the test hooks' (four) and a few of the app's. Past it a task is
/// counted as `other`, so an embedder that makes up task names cannot grow the exposition.
pub const MAX_TASKS: usize = 12;
/// The label of warm-up tasks beyond [`MAX_TASKS`].
pub const OTHER_TASK: &str = "other";
const OTHER_TASK_INDEX: usize = 0;

/// Upper bounds of the request-duration buckets, in microseconds (the last bucket is +Inf).
pub const DURATION_BOUNDS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
    10_000_000,
];
pub(crate) const BUCKETS: usize = DURATION_BOUNDS_US.len() + 1;

/// A route template or a task name.
#[repr(C)]
struct Label {
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

/// One warm-up task's attempts: how each ended and how long it took (a timed-out one: its
/// timeout).
#[repr(C)]
struct TaskStats {
    outcomes: [AtomicU64; WarmupOutcome::COUNT],
    duration: Histogram,
}

/// One worker's counts (or the retired totals). All zero is the empty block.
#[repr(C, align(4096))]
pub(crate) struct Block {
    /// Route labels written so far (indices from 2); published after the label's bytes.
    routes_used: AtomicU32,
    /// Task labels written so far (indices from 1), likewise.
    tasks_used: AtomicU32,
    in_flight: AtomicI64,
    events: [AtomicU64; Event::COUNT],
    levels: [AtomicI64; Level::COUNT],
    /// How long requests waited between the platform's router and this worker.
    queue_times: Histogram,
    labels: [Label; MAX_ROUTES],
    routes: [RouteStats; MAX_ROUTES],
    task_labels: [Label; MAX_TASKS],
    tasks: [TaskStats; MAX_TASKS],
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

/// Reads [`MetricsTable::snapshot`] tries before it gives up on a consistent one: half of them
/// yield, the other half sleep 1 ms (at most about 50 ms in all).
const SNAPSHOT_ATTEMPTS: usize = 100;

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
    /// master, when it reaps the worker). Only counters are carried over. Gauges — requests in
    /// flight, hashes queued, an open breaker — describe the worker as it is now: a dead
    /// worker holds none, so they drop to what the live workers hold (summing them into the
    /// retired totals would leave a SIGKILLed worker's in-flight request in flight forever).
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
        for (index, task) in block.tasks().enumerate() {
            let into = match index {
                OTHER_TASK_INDEX => Some(index),
                _ => block.task_label(index).and_then(|label| retired.task_index(&label)),
            }
            .unwrap_or(OTHER_TASK_INDEX);
            retired.tasks[into].add(task);
        }
        for (into, from) in retired.events.iter().zip(&block.events) {
            into.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
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

    /// One worker's value of `level` (its breaker open or not, its hashes queued).
    pub fn slot_level(&self, slot: usize, level: Level) -> i64 {
        self.block(slot).map_or(0, |block| block.levels[level as usize].load(Ordering::Relaxed))
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
        // A fold takes microseconds, unless the master is descheduled in the middle of one (a
        // busy machine): yield first, then sleep a millisecond at a time. A reader that still
        // loses takes its last read, which may count a folding worker twice or not at all; it
        // never answers zeros, which would send every counter backwards.
        let mut snapshot = None;
        for attempt in 0..SNAPSHOT_ATTEMPTS {
            let before = layout.header.generation.load(Ordering::Acquire);
            if before % 2 == 0 {
                let read = self.read();
                std::sync::atomic::fence(Ordering::SeqCst);
                if layout.header.generation.load(Ordering::Acquire) == before {
                    return read;
                }
                snapshot = Some(read);
            }
            match attempt < SNAPSHOT_ATTEMPTS / 2 {
                true => std::thread::yield_now(),
                false => std::thread::sleep(std::time::Duration::from_millis(1)),
            }
        }
        snapshot.unwrap_or_else(|| self.read())
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

    /// The warm-up tasks in use: `other` and the named ones.
    fn tasks(&self) -> impl Iterator<Item = &TaskStats> {
        let used = (self.tasks_used.load(Ordering::Acquire) as usize).min(MAX_TASKS - 1);
        self.tasks.iter().take(1 + used)
    }

    fn label(&self, index: usize) -> Option<String> {
        read_label(self.labels.get(index)?)
    }

    fn task_label(&self, index: usize) -> Option<String> {
        read_label(self.task_labels.get(index)?)
    }

    /// The index of `template`, labelling a new one if there is room; `None` when full.
    pub(crate) fn route_index(&self, template: &str) -> Option<usize> {
        find_or_add(&self.routes_used, &self.labels, 2, template)
    }

    /// The index of warm-up task `name` (already [`sanitise`]d), labelling a new one if there
    /// is room; `None` when full.
    pub(crate) fn task_index(&self, name: &str) -> Option<usize> {
        find_or_add(&self.tasks_used, &self.task_labels, 1, name)
    }

    /// Counts one answered request.
    pub(crate) fn record(&self, route: usize, method: usize, class: usize, micros: u64) {
        let Some(stats) = self.routes.get(route) else { return };
        stats.requests[method.min(METHODS - 1)][class.min(CLASSES - 1)].fetch_add(1, Ordering::Relaxed);
        stats.duration.observe(micros);
    }

    /// Counts one answered request for `herdsman status` only (nobody can read the rest): one
    /// addition, no route, no clock.
    pub(crate) fn served(&self, method: usize, class: usize) {
        self.routes[UNMATCHED_INDEX].requests[method.min(METHODS - 1)][class.min(CLASSES - 1)]
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one warm-up attempt of task `task` (an index from [`Block::task_index`]).
    pub(crate) fn warmup(&self, task: usize, outcome: WarmupOutcome, micros: u64) {
        let Some(stats) = self.tasks.get(task) else { return };
        stats.outcomes[outcome as usize].fetch_add(1, Ordering::Relaxed);
        stats.duration.observe(micros);
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
        self.queue_times.counters().for_each(|c| c.store(0, Ordering::Relaxed));
        for route in self.routes() {
            route.clear();
        }
        for task in self.tasks() {
            task.counters().for_each(|c| c.store(0, Ordering::Relaxed));
        }
        for label in self.labels.iter().chain(&self.task_labels) {
            label.len.store(0, Ordering::Relaxed);
        }
        self.routes_used.store(0, Ordering::Release);
        self.tasks_used.store(0, Ordering::Release);
    }
}

fn read_label(label: &Label) -> Option<String> {
    let len = (label.len.load(Ordering::Relaxed) as usize).min(LABEL_BYTES);
    let bytes: Vec<u8> = label.bytes[..len].iter().map(|b| b.load(Ordering::Relaxed)).collect();
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// The index of `text` among the labels in use (from `first`; `used` of them), or the next
/// free one, labelled `text`; `None` when all are taken. Only the block's one writer calls this
/// (a worker for its own block, the master for the retired one), so finding and appending need
/// no lock; readers see a label only once `used` is published after its bytes.
fn find_or_add(used: &AtomicU32, labels: &[Label], first: usize, text: &str) -> Option<usize> {
    let capacity = labels.len() - first;
    let count = (used.load(Ordering::Acquire) as usize).min(capacity);
    let cut = truncate(text);
    if let Some(found) = (first..first + count).find(|&i| read_label(&labels[i]).as_deref() == Some(cut)) {
        return Some(found);
    }
    if count == capacity {
        return None;
    }
    let index = first + count;
    let label = &labels[index];
    for (slot, byte) in label.bytes.iter().zip(cut.bytes()) {
        slot.store(byte, Ordering::Relaxed);
    }
    label.len.store(cut.len() as u32, Ordering::Relaxed);
    used.store(count as u32 + 1, Ordering::Release);
    Some(index)
}

/// A warm-up task's name as a label value: at most [`LABEL_BYTES`], and only letters, digits
/// and `_-.:`, anything else made `_`, so an embedder's name (spaces, quotes, newlines, a
/// formatted error) stays one readable token; an empty name is `unnamed`.
pub fn sanitise(name: &str) -> String {
    let clean: String = name
        .chars()
        .take(LABEL_BYTES)
        .map(|c| if c.is_ascii_alphanumeric() || "_-.:".contains(c) { c } else { '_' })
        .collect();
    match clean.is_empty() {
        true => "unnamed".to_string(),
        false => clean,
    }
}

impl TaskStats {
    fn counters(&self) -> impl Iterator<Item = &AtomicU64> {
        self.outcomes.iter().chain(self.duration.counters())
    }

    fn add(&self, from: &TaskStats) {
        for (into, from) in self.counters().zip(from.counters()) {
            into.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
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

/// The attempts of one warm-up task, summed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskTotals {
    /// By [`WarmupOutcome`].
    pub outcomes: [u64; WarmupOutcome::COUNT],
    pub duration: Durations,
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
    /// By task name ([`OTHER_TASK`] for those past [`MAX_TASKS`]).
    pub warmups: BTreeMap<String, TaskTotals>,
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
        for (index, stats) in block.tasks().enumerate() {
            let name = match index {
                OTHER_TASK_INDEX => OTHER_TASK.to_string(),
                _ => block.task_label(index).unwrap_or_else(|| OTHER_TASK.to_string()),
            };
            let totals = self.warmups.entry(name).or_default();
            for (into, from) in totals.outcomes.iter_mut().zip(&stats.outcomes) {
                *into += from.load(Ordering::Relaxed);
            }
            stats.duration.add_to(&mut totals.duration);
        }
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
        block.level(Level::BcryptQueued, 3);
        block.set_level(Level::BreakerOpen, 1);
        let prewarm = block.task_index("bcrypt_prewarm").unwrap();
        block.warmup(prewarm, WarmupOutcome::Ok, 40_000);
        block.event(Event::BcryptRefused);
        let before = table.snapshot();
        assert_eq!(requests(&before, "/live"), 5);
        assert_eq!((before.in_flight, before.levels), (2, [3, 1]));
        table.retire(3);
        let after = table.snapshot();
        assert_eq!(requests(&after, "/live"), 5);
        assert_eq!(requests(&after, UNMATCHED_ROUTE), 1);
        assert_eq!(after.in_flight, 0, "a dead worker's requests are no longer in flight");
        assert_eq!(after.levels, [0, 0], "nor its queued hashes or open breaker");
        assert_eq!(after.events, before.events, "counters are carried over");
        assert_eq!(after.warmups, before.warmups, "so are warm-up attempts, by task");
        assert_eq!(after.warmups["bcrypt_prewarm"].outcomes, [1, 0, 0]);
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

    /// Labels `capacity` names through `index` (from index `first`) and checks that one more is
    /// refused and a known one keeps its index.
    fn fill(index: impl Fn(&Block, &str) -> Option<usize>, first: usize, capacity: usize) -> MetricsTable {
        let table = MetricsTable::create().unwrap();
        table.claim(0);
        let block = table.block(0).unwrap();
        for i in 0..capacity {
            assert_eq!(index(block, &format!("/r{i}")), Some(i + first));
        }
        assert_eq!(index(block, "/one-too-many"), None);
        assert_eq!(index(block, "/r0"), Some(first), "known names keep their index");
        table
    }

    #[test]
    fn routes_past_the_limit_are_counted_as_other() {
        fill(Block::route_index, 2, MAX_ROUTES - 2);
    }

    #[test]
    fn tasks_past_the_limit_are_counted_as_other_and_names_are_sanitised() {
        let table = fill(Block::task_index, 1, MAX_TASKS - 1);
        let block = table.block(0).unwrap();
        block.warmup(OTHER_TASK_INDEX, WarmupOutcome::TimedOut, 5_000_000);
        let snapshot = table.snapshot();
        assert_eq!(snapshot.warmups.len(), MAX_TASKS);
        assert_eq!(snapshot.warmups[OTHER_TASK].outcomes, [0, 0, 1]);
        assert_eq!(sanitise("load \"model\"\n v2"), "load__model___v2");
        assert_eq!(sanitise("redis"), "redis");
        assert_eq!(sanitise(""), "unnamed");
        assert_eq!(sanitise(&"é".repeat(200)).len(), LABEL_BYTES);
    }

    #[test]
    fn a_snapshot_during_a_fold_waits_for_it_and_never_reads_zeros() {
        let table = MetricsTable::create().unwrap();
        table.claim(0);
        let block = table.block(0).unwrap();
        block.record(UNMATCHED_INDEX, 0, 1, 1);
        let generation = &table.layout().header.generation;
        // A fold that never ends (the master stopped in the middle of one).
        generation.fetch_add(1, Ordering::AcqRel);
        assert_eq!(requests(&table.snapshot(), UNMATCHED_ROUTE), 1);
        generation.fetch_add(1, Ordering::AcqRel);
        assert_eq!(requests(&table.snapshot(), UNMATCHED_ROUTE), 1);
    }
}
