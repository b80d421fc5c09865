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
//! axum route *template* (`MatchedPath`), at most [`table::MAX_ROUTES`] per worker, and any
//! beyond are counted as `other`; methods and status classes are fixed lists
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
//! answered request and its duration, and the cache, the hasher and the warm-ups count their
//! [`Event`]s and [`Level`]s through [`count`] and [`add_level`], which do nothing in a
//! process without a block (tests, the master).

pub mod exposition;
pub mod labels;
pub mod server;
pub mod table;

use std::cell::{Cell, RefCell};
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::MatchedPath;
use axum::http::{Method, Request, StatusCode};

pub use labels::{Event, Level, RestartReason};
pub use table::{MetricsTable, Snapshot};

use table::{Block, OTHER_INDEX, UNMATCHED_INDEX};

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

/// A warm-up attempt ended after `took` (a timed-out one: after its timeout).
pub fn warmup_took(took: std::time::Duration) {
    if let Some(block) = block() {
        block.warmup_took(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
    }
}

/// A request waited `waited` between the platform's router and this worker (see
/// [`crate::http::queue_time`]).
pub fn request_queued(waited: std::time::Duration) {
    if let Some(block) = block() {
        block.queued(u64::try_from(waited.as_micros()).unwrap_or(u64::MAX));
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

thread_local! {
    /// The route the request being polled on this thread matched, set by [`RouteLabel`].
    static MATCHED_ROUTE: Cell<Option<usize>> = const { Cell::new(None) };
    /// Route template → index in this worker's block. axum hands every request of a route the
    /// same shared string (an `Arc<str>` its router keeps), so the lookup compares the text's
    /// address first and its bytes to be sure: no hashing per request.
    static ROUTE_INDICES: RefCell<Vec<(usize, Box<str>, usize)>> = const { RefCell::new(Vec::new()) };
}

fn route_index(template: &str) -> usize {
    let Some(block) = block() else { return UNMATCHED_INDEX };
    let address = template.as_ptr() as usize;
    ROUTE_INDICES.with_borrow_mut(|indices| {
        let same = |(a, text, _): &&(usize, Box<str>, usize)| *a == address && **text == *template;
        let equal = |(_, text, _): &&(usize, Box<str>, usize)| **text == *template;
        if let Some((_, _, index)) = indices.iter().find(same).or_else(|| indices.iter().find(equal)) {
            return *index;
        }
        let index = block.route_index(template).unwrap_or(OTHER_INDEX);
        // As many as the block tells apart; any further one is looked up in the block.
        if indices.len() < 4 * table::MAX_ROUTES {
            indices.push((address, template.into(), index));
        }
        index
    })
}

/// A layer on every route ([`axum::Router::route_layer`]) that notes which route template
/// matched, for the request guard to read after polling the handler. The guard sits outside
/// the router and never sees the request's `MatchedPath`; passing the route through a
/// thread-local costs no allocation, and is exact because a worker's single runtime thread
/// polls one request at a time and the route's service is called during that poll.
#[derive(Clone)]
pub struct RouteLabel<S> {
    inner: S,
}

/// Adds [`RouteLabel`] to each route.
#[derive(Clone, Copy, Default)]
pub struct RouteLabelLayer;

impl<S> tower::Layer<S> for RouteLabelLayer {
    type Service = RouteLabel<S>;
    fn layer(&self, inner: S) -> RouteLabel<S> {
        RouteLabel { inner }
    }
}

impl<S, B> tower::Service<Request<B>> for RouteLabel<S>
where
    S: tower::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> S::Future {
        if let Some(path) = request.extensions().get::<MatchedPath>() {
            MATCHED_ROUTE.set(Some(route_index(path.as_str())));
        }
        self.inner.call(request)
    }
}

/// One request as the metrics see it: in flight from [`RequestMetrics::start`] until dropped,
/// counted once by [`RequestMetrics::finish`].
pub struct RequestMetrics {
    block: Option<&'static Block>,
    method: usize,
    route: Option<usize>,
}

impl RequestMetrics {
    pub fn start(method: &Method) -> RequestMetrics {
        let block = block();
        if let Some(block) = block {
            block.in_flight(1);
        }
        RequestMetrics { block, method: labels::method_index(method), route: None }
    }

    /// Runs `poll` (one poll of the handler) and notes the route it matched, if not known yet.
    pub fn noting_route<T>(&mut self, poll: impl FnOnce() -> T) -> T {
        if self.block.is_none() || self.route.is_some() {
            return poll();
        }
        MATCHED_ROUTE.set(None);
        let result = poll();
        self.route = MATCHED_ROUTE.take();
        result
    }

    pub fn finish(&self, status: StatusCode, started: Instant) {
        if let Some(block) = self.block {
            let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            block.record(self.route.unwrap_or(UNMATCHED_INDEX), self.method, labels::class_index(status), micros);
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
