//! What each worker is doing right now, and how much it has done: worker state, read by the
//! HTTP guard (which registers each request), the drain, `MAX_REQUESTS`, the heartbeat (which
//! tells the master once the worker has served) and the abort diagnostics.
//!
//! The tracker is shared between the worker's runtime (which registers requests) and the side
//! thread that prints diagnostics when the master aborts a hung worker: that thread must be able
//! to read it while the runtime is blocked, so it lives behind a plain `std::sync::Mutex` that is
//! held only for an insert or a remove.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderValue, Method, Uri};
use axum::response::Response;
use slab::Slab;

/// Shared, cheap to clone.
#[derive(Clone)]
pub struct RequestTracker {
    inner: Arc<Inner>,
}

struct Inner {
    /// A slab rather than a map: a request's key is its slot, reused once it is answered.
    in_flight: Mutex<Slab<InFlight>>,
    served: AtomicU64,
    draining: AtomicBool,
    /// Requests after which the worker asks to be recycled; `u64::MAX` when `MAX_REQUESTS=0`.
    recycle_after: u64,
    on_recycle: Box<dyn Fn() + Send + Sync>,
}

/// One request being handled. Method and URI are cheap clones (no allocation for standard
/// methods; the URI shares its bytes), so registering costs little on the hot path.
#[derive(Debug, Clone)]
pub struct InFlight {
    pub method: Method,
    uri: Uri,
    pub started: Instant,
    /// Its `X-Request-ID`, to find it in the router's and the app's logs.
    pub request_id: HeaderValue,
}

impl InFlight {
    /// The path only: query strings may carry tokens, and these lines end up in logs.
    pub fn path(&self) -> &str {
        self.uri.path()
    }
}

impl RequestTracker {
    /// `recycle_after`: the request count at which `on_recycle` is called, once.
    pub fn new(recycle_after: Option<u64>, on_recycle: impl Fn() + Send + Sync + 'static) -> Self {
        RequestTracker {
            inner: Arc::new(Inner {
                in_flight: Mutex::new(Slab::new()),
                served: AtomicU64::new(0),
                draining: AtomicBool::new(false),
                recycle_after: recycle_after.unwrap_or(u64::MAX),
                on_recycle: Box::new(on_recycle),
            }),
        }
    }

    /// From now on every response asks its client to close the connection.
    pub fn start_draining(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    pub fn served(&self) -> u64 {
        self.inner.served.load(Ordering::Relaxed)
    }

    /// The requests in flight, oldest first, with their age.
    pub fn in_flight(&self) -> Vec<(InFlight, Duration)> {
        let now = Instant::now();
        // A poisoned lock still holds valid entries; diagnostics must not give up on it.
        let map = self.inner.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let mut requests: Vec<_> = map.iter().map(|(_, r)| (r.clone(), now - r.started)).collect();
        requests.sort_by_key(|(_, age)| std::cmp::Reverse(*age));
        requests
    }

    pub(crate) fn register(&self, method: Method, uri: Uri, request_id: HeaderValue) -> Registration {
        let started = Instant::now();
        let mut map = self.inner.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let key = map.insert(InFlight { method, uri, started, request_id });
        Registration { tracker: self.clone(), key, started }
    }
}

/// One request's place in the tracker. Removes it when dropped: on completion, timeout or
/// cancellation.
pub(crate) struct Registration {
    tracker: RequestTracker,
    key: usize,
    started: Instant,
}

impl Registration {
    pub(crate) fn started(&self) -> Instant {
        self.started
    }

    /// The request is answered: count it, and mark the response while draining. It leaves
    /// the in-flight table when `self` is dropped, at the end.
    pub(crate) fn finish(self, response: &mut Response) {
        let inner = &self.tracker.inner;
        let served = inner.served.fetch_add(1, Ordering::Relaxed) + 1;
        if served == inner.recycle_after {
            (inner.on_recycle)();
        }
        if self.tracker.is_draining() {
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut map = self.tracker.inner.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        map.try_remove(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answered_requests_leave_the_tracker_and_diagnostics_show_no_query() {
        let tracker = RequestTracker::new(None, || {});
        let id = HeaderValue::from_static("req-1");
        let first = tracker.register(Method::GET, "/slow?token=secret".parse().expect("a valid URI"), id.clone());
        let second = tracker.register(Method::POST, "/fast".parse().expect("a valid URI"), id);
        second.finish(&mut Response::default());
        let left: Vec<_> = tracker.in_flight().into_iter().map(|(r, _)| (r.path().to_string(), r.method)).collect();
        assert_eq!(left, vec![("/slow".to_string(), Method::GET)]);
        assert_eq!(tracker.served(), 1);
        drop(first);
        assert!(tracker.in_flight().is_empty());
    }
}
