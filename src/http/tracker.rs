//! What each worker is doing right now, and how much it has done.
//!
//! The tracker is shared between the worker's runtime (which registers requests) and the side
//! thread that prints diagnostics when the master aborts a hung worker: that thread must be able
//! to read it while the runtime is blocked, so it lives behind a plain `std::sync::Mutex` that is
//! held only for an insert or a remove.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, Uri};
use axum::middleware::Next;
use axum::response::Response;

/// Shared, cheap to clone.
#[derive(Clone)]
pub struct RequestTracker {
    inner: Arc<Inner>,
}

struct Inner {
    in_flight: Mutex<HashMap<u64, InFlight>>,
    next_id: AtomicU64,
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
                in_flight: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
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
        let mut requests: Vec<_> = map.values().map(|r| (r.clone(), now - r.started)).collect();
        requests.sort_by_key(|(_, age)| std::cmp::Reverse(*age));
        requests
    }

    fn register(&self, method: Method, uri: Uri) -> Registration {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let mut map = self.inner.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(id, InFlight { method, uri, started });
        Registration { tracker: self.clone(), id }
    }
}

/// Removes its request from the tracker when dropped: on completion, timeout or cancellation.
struct Registration {
    tracker: RequestTracker,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut map = self.tracker.inner.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&self.id);
    }
}

/// The middleware: register, run, count, and mark the response while draining.
pub async fn track(State(tracker): State<RequestTracker>, request: Request, next: Next) -> Response {
    let registration = tracker.register(request.method().clone(), request.uri().clone());
    let mut response = next.run(request).await;
    drop(registration);

    let served = tracker.inner.served.fetch_add(1, Ordering::Relaxed) + 1;
    if served == tracker.inner.recycle_after {
        (tracker.inner.on_recycle)();
    }
    if tracker.is_draining() {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}
