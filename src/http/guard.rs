//! [`Guard`]: the service every request passes through on its way to the router, so that one
//! bad request cannot hurt the others. In order:
//! 1. it registers the request with the [`RequestTracker`] (method, path, age, request ID: what
//!    an aborted worker reports; the ID is answered as `X-Request-ID`, see [`super::access_log`]) and, once answered, counts it for `MAX_REQUESTS` and adds
//!    `Connection: close` while the worker drains, so keep-alive clients move to another worker
//!    instead of racing a closing socket;
//! 2. a body declared larger than `HERDSMAN_MAX_BODY_BYTES` gets 413 before it is read, and any
//!    other body is cut off at that size (extractors then answer 413 too);
//! 3. a handler running past `HERDSMAN_REQUEST_TIMEOUT` answers 503, as Heroku's router would,
//!    and its future is dropped;
//! 4. a panicking handler answers 500 and the worker lives on (the panic hook in
//!    [`crate::worker`] logs it as one line);
//! 5. it counts the request for the metrics: in flight until answered, then by method, route
//!    template, status class and duration (see [`crate::metrics`]); the route is found here,
//!    from the path, before the router sees the request ([`RouteLabels`]), and only when
//!    someone can read the metrics.
//!
//! Why one hand-written service and not four tower layers: `Router::layer` wraps every route in
//! each layer separately, so each request paid for cloning and boxing four nested services, and
//! `/live` cost twice the CPU instructions of a bare axum hello-world (measured with callgrind).
//! Here the common path allocates nothing of its own, and the timer exists only for a handler
//! that does not answer at its first poll.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, HttpBody};
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::future::RouteFuture;
use axum::Router;
use http_body_util::Limited;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};
use tower::Service as _;

use super::access_log::{self, RequestLog};
use super::client_addr::PeerAddr;
use super::error::ApiError;
use super::metrics_route;
use crate::metrics::routes::RouteLabels;
use crate::metrics::RequestMetrics;
use crate::tracker::{Registration, RequestTracker};

/// The router with the four protections around it; serve it with hyper.
#[derive(Clone)]
pub struct Guard {
    router: Router,
    tracker: RequestTracker,
    request_timeout: Duration,
    max_body_bytes: usize,
    /// `HERDSMAN_METRICS_TOKEN`: opens `/metrics` on this port (see [`super::metrics_route`]).
    metrics_token: Option<Arc<str>>,
    /// The connection's peer, handed to routes as a [`PeerAddr`] extension.
    peer: Option<PeerAddr>,
    request_log: RequestLog,
    /// The router's templates, when requests are counted by route (someone can read the
    /// metrics); without, requests are only counted as served.
    route_labels: Option<Arc<RouteLabels>>,
}

impl Guard {
    pub fn new(router: Router, tracker: RequestTracker, request_timeout: Duration, max_body_bytes: usize) -> Self {
        Guard {
            router,
            tracker,
            request_timeout,
            max_body_bytes,
            metrics_token: None,
            peer: None,
            request_log: RequestLog::default(),
            route_labels: None,
        }
    }

    /// Counts requests by route template and duration, not only as served (see
    /// [`crate::metrics`]): for when the metrics can be read.
    pub fn with_route_labels(mut self) -> Self {
        self.route_labels = Some(Arc::new(RouteLabels::of(&self.router)));
        self
    }

    /// Serves the metrics at `/metrics` to requests bearing `token`.
    pub fn with_metrics_token(mut self, token: Option<&str>) -> Self {
        self.metrics_token = token.map(Arc::from);
        self
    }

    /// Request IDs, queue times and the access log (see [`access_log`]).
    pub fn with_request_log(mut self, request_log: RequestLog) -> Self {
        self.request_log = request_log;
        self
    }

    /// The guard of one connection from `peer` (per-address login limits need it).
    pub fn for_peer(&self, peer: IpAddr) -> Self {
        // An IPv4 client of the dual-stack socket arrives as ::ffff:a.b.c.d; count it as a.b.c.d.
        Guard { peer: Some(PeerAddr(peer.to_canonical())), ..self.clone() }
    }
}

impl hyper::service::Service<Request<Incoming>> for Guard {
    type Response = Response;
    type Error = Infallible;
    type Future = GuardFuture;

    fn call(&self, request: Request<Incoming>) -> GuardFuture {
        let peer = self.peer.map(|PeerAddr(ip)| ip);
        let entry = self.request_log.start(request.method(), request.uri(), request.headers(), peer);
        let registration = self.tracker.register(request.method().clone(), request.uri().clone(), entry.id.clone());
        let mut metrics = RequestMetrics::start(request.method(), self.route_labels.is_some());
        if let Some(token) = self.metrics_token.as_deref().filter(|_| request.uri().path() == metrics_route::PATH) {
            if let Some(response) = metrics_route::answer(request.headers(), token) {
                return GuardFuture::answered((registration, entry), metrics, response);
            }
        }
        let declared = request.body().size_hint().exact();
        if declared.is_some_and(|bytes| bytes > self.max_body_bytes as u64) {
            return GuardFuture::answered((registration, entry), metrics, body_too_large(self.max_body_bytes));
        }
        let limit = self.max_body_bytes;
        let mut request =
            request.map(|body| if body.is_end_stream() { Body::empty() } else { Body::new(Limited::new(body, limit)) });
        if let Some(peer) = self.peer {
            request.extensions_mut().insert(peer);
        }
        if let Some(labels) = &self.route_labels {
            metrics.matched(labels.index(request.uri().path()));
        }
        let deadline = Instant::from_std(registration.started()) + self.request_timeout;
        // The router is an `Arc` inside: cloning it is how axum itself serves a request.
        match catch_unwind(AssertUnwindSafe(|| self.router.clone().call(request))) {
            Ok(handler) => GuardFuture {
                registration: Some((registration, entry)),
                metrics,
                state: State::Running { handler, deadline, timeout: self.request_timeout, timer: None },
            },
            Err(_) => GuardFuture::answered((registration, entry), metrics, handler_panicked()),
        }
    }
}

/// A request on its way through the [`Guard`].
pub struct GuardFuture {
    /// The request's place in the tracker and what the access log needs, until it is answered.
    registration: Option<(Registration, access_log::Entry)>,
    /// Counts the request (method, route template, status, duration) and its time in flight.
    metrics: RequestMetrics,
    state: State,
}

// Boxing the large variant would cost an allocation per request, for a future built once.
#[allow(clippy::large_enum_variant)]
enum State {
    /// Answered without the handler (413, or a panic while the router built its future).
    Answered(Option<Response>),
    Running {
        handler: RouteFuture<Infallible>,
        deadline: Instant,
        timeout: Duration,
        /// Created only when the handler does not finish at its first poll.
        timer: Option<Pin<Box<Sleep>>>,
    },
}

impl GuardFuture {
    fn answered(registration: (Registration, access_log::Entry), metrics: RequestMetrics, response: Response) -> Self {
        GuardFuture { registration: Some(registration), metrics, state: State::Answered(Some(response)) }
    }
}

impl Future for GuardFuture {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Nothing here is pinned structurally: the handler future is `Unpin` (boxed by axum)
        // and the timer is boxed.
        let this = self.get_mut();
        let mut response = match &mut this.state {
            State::Answered(response) => response.take().unwrap_or_else(handler_panicked),
            State::Running { handler, deadline, timeout, timer } => {
                match catch_unwind(AssertUnwindSafe(|| Pin::new(&mut *handler).poll(cx))) {
                    Ok(Poll::Ready(Ok(response))) => response,
                    Ok(Poll::Ready(Err(never))) => match never {},
                    Err(_panic) => handler_panicked(),
                    Ok(Poll::Pending) => {
                        let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(*deadline)));
                        match timer.as_mut().poll(cx) {
                            Poll::Ready(()) => request_timed_out(*timeout),
                            Poll::Pending => return Poll::Pending,
                        }
                    }
                }
            }
        };
        // Drop the handler (a timed-out one is cancelled here), then close the books.
        this.state = State::Answered(None);
        if let Some((registration, entry)) = this.registration.take() {
            this.metrics.finish(response.status(), registration.started());
            entry.finish(&mut response, registration.started());
            registration.finish(&mut response);
        }
        Poll::Ready(Ok(response))
    }
}

fn body_too_large(limit: usize) -> Response {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("the request body is larger than {limit} bytes"))
        .into_response()
}

fn request_timed_out(after: Duration) -> Response {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the request took longer than {}s and was cancelled", after.as_secs_f64()),
    )
    .retry_after(1)
    .into_response()
}

/// The panic hook already logged the message and location in one line (see `worker.rs`); the
/// client learns nothing about the internals.
fn handler_panicked() -> Response {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal server error").into_response()
}
