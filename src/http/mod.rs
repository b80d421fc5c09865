//! The HTTP side of a worker: the built-in routes, the user's routes, and the layers that keep
//! one bad request from hurting the others.
//!
//! Layers, outermost first, and why each is there:
//! 1. [`tracker`]: records every in-flight request (method, path, age) so that a worker aborted
//!    for hanging can say what it was doing; counts requests for `MAX_REQUESTS`; and, while the
//!    worker drains, adds `Connection: close` so keep-alive clients move to another worker
//!    instead of racing a closing socket.
//! 2. catch-panic: a panicking handler answers 500 and the worker lives on.
//! 3. request timeout: a handler running past `HERDSMAN_REQUEST_TIMEOUT` answers 503, as
//!    Heroku's router would, and its future is dropped.
//! 4. body limit: a body over `HERDSMAN_MAX_BODY_BYTES` answers 413 before it is read.
//!
//! Headers that arrive too slowly are cut off by hyper itself (`header_read_timeout`), see
//! [`crate::worker`].

pub mod cache_api;
pub mod health;
#[cfg(feature = "test-hooks")]
pub mod test_hooks;
pub mod tracker;

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;

use crate::app::Services;

pub use tracker::RequestTracker;

/// Cache keys longer than this are refused with 400; Redis keys are cheap but not free.
pub const MAX_CACHE_KEY_BYTES: usize = 512;

/// The whole router of a worker: built-ins, then the user's routes, under the common layers.
pub fn router(services: &Services, user_routes: Router, tracker: RequestTracker) -> Router {
    let config = &services.config;
    let router = Router::new()
        .merge(health::routes(services.clone()))
        .merge(cache_api::routes(services.cache.clone(), MAX_CACHE_KEY_BYTES, config.max_body_bytes))
        .merge(crate::auth::routes(services.cache.durable(), services.hasher.clone(), config.bcrypt_cost))
        .merge(user_routes);
    #[cfg(feature = "test-hooks")]
    let router = router.merge(test_hooks::routes());
    let timeout = config.request_timeout;
    router
        .layer(RequestBodyLimitLayer::new(config.max_body_bytes))
        .layer(axum::middleware::from_fn(move |req, next: axum::middleware::Next| async move {
            match tokio::time::timeout(timeout, next.run(req)).await {
                Ok(response) => response,
                Err(_) => request_timed_out(timeout),
            }
        }))
        .layer(CatchPanicLayer::custom(handler_panicked))
        .layer(axum::middleware::from_fn_with_state(tracker, tracker::track))
}

/// A JSON error body: `{"error": "..."}`.
pub fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

fn request_timed_out(after: Duration) -> Response {
    let mut response = json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the request took longer than {}s and was cancelled", after.as_secs_f64()),
    );
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

fn handler_panicked(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    // The panic hook already logged the message and location in one line (see worker.rs);
    // the client learns nothing about the internals.
    drop(panic);
    json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal server error")
}
