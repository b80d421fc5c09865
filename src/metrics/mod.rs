//! Prometheus metrics, summed over every worker and the master, with counts that never go
//! backwards and survive any worker's death.
//!
//! # Why shared memory and not snapshots over the control pipe
//!
//! Each worker counts in its own [`table::Block`] of a table in shared memory (a `memfd` the
//! master creates and hands over like the connection-balancing table, see
//! [`crate::contract`]); the master maps the same table and, when it reaps a worker, folds that
//! worker's block into a block of retired totals before the slot can be reused. The
//! alternative — each worker sending a snapshot every second over its control pipe — loses up
//! to a second of counts whenever a worker is SIGKILLed (by the OOM killer, say: exactly when
//! an operator looks at the numbers), costs a serialisation per worker per second, and puts
//! bulk data on a pipe whose job is to prove liveness. With shared memory a SIGKILLed worker
//! loses nothing, since its counts live outside it, and counting costs a few uncontended
//! atomic additions per request. The price is a fixed layout: routes are told apart by their
//! axum route *template* (found without axum's `MatchedPath`, see [`routes`]), at most
//! [`table::MAX_ROUTES`] per worker, and any beyond are counted as `other`; warm-up tasks by
//! name, at most [`table::MAX_TASKS`]; methods and status classes are fixed lists
//! ([`labels`]). Nothing a client sends can create a series. The table reserves a block
//! of 48 KiB for each of the [`crate::balance::SLOT_COUNT`] slots (about 50 MB of address
//! space), but a page is allocated only when written: a worker that serves a handful of routes
//! touches a few pages.
//!
//! # Who serves it
//!
//! The master, on `HERDSMAN_METRICS_PORT` ([`server`]), from its own single-threaded runtime;
//! and, when `HERDSMAN_METRICS_TOKEN` is set, any worker at `/metrics` on the main port for a
//! request bearing that token (see [`crate::http`]). Both read the same table, so both give
//! the same numbers.
//!
//! # How a worker counts
//!
//! A worker [`install`]s its block once; the request guard ([`crate::http::Guard`]) counts each
//! answered request through [`RequestMetrics`], the warm-ups each attempt through
//! [`WarmupMetrics`], and the cache and the hasher their [`Event`]s and [`Level`]s through
//! [`count`] and [`add_level`]; all do nothing in a process without a block (tests, the master).
//!
//! # What a request costs
//!
//! Counting is on the path of every request, so it is kept to a few instructions (measured
//! with callgrind, see BENCHMARKS.md): the route is found by [`routes::RouteLabels`] from the
//! path with the same matcher axum uses, with no allocation, no hashing and no extra service
//! per route; a request's duration reuses the instant the tracker took when it arrived, so it
//! costs one more clock read; and when nobody can read the metrics (neither
//! `HERDSMAN_METRICS_PORT` nor `HERDSMAN_METRICS_TOKEN` set) a request costs three atomic
//! additions, for what `herdsman status` shows (served, in flight), and no clock read.

pub mod exposition;
pub mod labels;
pub mod routes;
pub mod server;
pub mod table;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};

pub use labels::{Event, Level, RestartReason, WarmupOutcome};
pub use table::{MetricsTable, Snapshot};

use table::{Block, UNMATCHED_INDEX};

/// This worker's place in the shared table.
struct Recorder {
    table: MetricsTable,
    slot: usize,
}

static RECORDER: OnceLock<Recorder> = OnceLock::new();

/// Makes this process count into `slot` of `table` (a worker, once, at start).
pub fn install(table: MetricsTable, slot: usize) {
    if table.block(slot).is_some() && RECORDER.set(Recorder { table, slot }).is_err() {
        tracing::debug!("metrics already installed in this process");
    }
}

fn block() -> Option<&'static Block> {
    RECORDER.get().and_then(|r| r.table.block(r.slot))
}

/// Everything counted so far by every process, when this process has the table.
pub fn snapshot() -> Option<Snapshot> {
    RECORDER.get().map(|r| r.table.snapshot())
}

pub fn count(event: Event) {
    if let Some(block) = block() {
        block.event(event);
    }
}

fn micros(took: Duration) -> u64 {
    u64::try_from(took.as_micros()).unwrap_or(u64::MAX)
}

/// A request waited `waited` between the platform's router and this worker (see
/// [`crate::http::queue_time`]).
pub fn request_queued(waited: Duration) {
    if let Some(block) = block() {
        block.queued(micros(waited));
    }
}

pub fn add_level(level: Level, delta: i64) {
    if let Some(block) = block() {
        block.level(level, delta);
    }
}

pub fn set_level(level: Level, value: i64) {
    if let Some(block) = block() {
        block.set_level(level, value);
    }
}

/// One warm-up task's series: `herdsman_warmup_attempts_total{task,outcome}` and
/// `herdsman_warmup_duration_seconds{task}`.
#[derive(Debug, Clone, Copy)]
pub struct WarmupMetrics {
    task: Option<usize>,
}

impl WarmupMetrics {
    /// The series of the task named `name` (sanitised, see [`table::sanitise`]), labelled now so
    /// that every task the app registered is shown from the start, at zero.
    pub fn of(name: &str) -> WarmupMetrics {
        let task = block().map(|block| block.task_index(&table::sanitise(name)).unwrap_or(0));
        WarmupMetrics { task }
    }

    /// An attempt ended as `outcome` after `took` (a timed-out one: after its timeout).
    pub fn attempt(self, outcome: WarmupOutcome, took: Duration) {
        if let (Some(block), Some(task)) = (block(), self.task) {
            block.warmup(task, outcome, micros(took));
        }
    }
}

/// One request as the metrics see it: in flight from [`RequestMetrics::start`] until dropped,
/// counted once by [`RequestMetrics::finish`].
pub struct RequestMetrics {
    block: Option<&'static Block>,
    method: usize,
    /// The route's index when every series is counted; `None` when only `herdsman status`'s
    /// counts are kept.
    route: Option<usize>,
}

impl RequestMetrics {
    /// `labelled`: whether the request is counted by route with its duration (someone can read
    /// the metrics), or only as served. It counts as `unmatched` until [`Self::matched`].
    pub fn start(method: &Method, labelled: bool) -> RequestMetrics {
        let block = block();
        if let Some(block) = block {
            block.in_flight(1);
        }
        let route = labelled.then_some(UNMATCHED_INDEX);
        RequestMetrics { block, method: labels::method_index(method), route }
    }

    /// The request matched the route with this index (see [`routes::RouteLabels::index`]).
    pub fn matched(&mut self, route: usize) {
        if self.route.is_some() {
            self.route = Some(route);
        }
    }

    /// The request is answered; `started` is when it arrived.
    pub fn finish(&self, status: StatusCode, started: Instant) {
        let Some(block) = self.block else { return };
        let class = labels::class_index(status);
        match self.route {
            Some(route) => block.record(route, self.method, class, micros(started.elapsed())),
            None => block.served(self.method, class),
        }
    }
}

impl Drop for RequestMetrics {
    fn drop(&mut self) {
        if let Some(block) = self.block {
            block.in_flight(-1);
        }
    }
}
