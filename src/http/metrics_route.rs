//! `/metrics` on the main port, for platforms that scrape only the app's port: open only to a
//! request bearing `HERDSMAN_METRICS_TOKEN` as `Authorization: Bearer`, compared in constant
//! time. Anything else gets the router's answer, as if the route did not exist (a 404 unless
//! the app has a `/metrics` of its own), so that the route cannot be found by probing.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::metrics::exposition::{render, CONTENT_TYPE};

/// The path served.
pub const PATH: &str = "/metrics";

/// Whether `headers` carry `Authorization: Bearer {token}`, compared in constant time (also
/// what opens `/health`'s details, [`super::health`]).
pub fn bears(headers: &HeaderMap, token: &str) -> bool {
    let presented = headers.get(header::AUTHORIZATION).and_then(|value| value.as_bytes().strip_prefix(b"Bearer "));
    presented.is_some_and(|presented| bool::from(presented.ct_eq(token.as_bytes())))
}

/// The metrics, when `headers` carry `token`; `None` lets the request through to the router.
pub fn answer(headers: &HeaderMap, token: &str) -> Option<Response> {
    if !bears(headers, token) {
        return None;
    }
    let Some(snapshot) = crate::metrics::snapshot() else {
        return Some((StatusCode::SERVICE_UNAVAILABLE, "this worker has no metrics table").into_response());
    };
    let mut response = render(snapshot).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    Some(response)
}
