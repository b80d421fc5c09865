//! `/cache/{key}`: the two-tier [`Cache`] over HTTP.
//!
//! ```text
//! PUT    /cache/{key}[?ttl=SECONDS]   body = value      -> 204
//! GET    /cache/{key}                                   -> 200 octet-stream | 404
//! DELETE /cache/{key}                                   -> 204
//! ```
//!
//! Every answer carries `x-cache-tier: redis|memory`, saying which tier
//! served it, so an operator (or a test) can see the circuit breaker at work
//! without reading logs. Errors are JSON `{"error": "..."}`: a key longer than
//! `max_key_bytes` or a `ttl` that is not a whole number of seconds up to the maximum
//! is a `400`, a body over `max_value_bytes` a `413`. A value stored without `ttl`
//! lives for the default TTL (`HERDSMAN_CACHE_DEFAULT_TTL`). Limits are checked before anything touches a tier.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;

use super::error::ApiError;
use crate::cache::{Cache, CacheError, Tier};

/// Response header naming the tier that answered.
pub const TIER_HEADER: &str = "x-cache-tier";

/// What a client may store through the routes.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longer keys are 400.
    pub max_key_bytes: usize,
    /// Larger values are 413 (this also caps the request body).
    pub max_value_bytes: usize,
    /// The lifetime of a value stored without `?ttl=`.
    pub default_ttl: Duration,
    /// A longer `?ttl=` is 400.
    pub max_ttl: Duration,
}

struct ApiState {
    cache: Cache,
    limits: Limits,
}

/// The cache routes.
pub fn routes(cache: Cache, limits: Limits) -> Router {
    let state = Arc::new(ApiState { cache, limits });
    Router::new()
        .route("/cache/{key}", get(get_value).put(put_value).delete(delete_value))
        .layer(DefaultBodyLimit::max(limits.max_value_bytes))
        .with_state(state)
}

/// `ttl` is read as a string so a bad value gets our own message.
#[derive(Deserialize)]
struct PutParams {
    ttl: Option<String>,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    ApiError::new(status, message).into_response()
}

fn with_tier(mut response: Response, tier: Tier) -> Response {
    response.headers_mut().insert(TIER_HEADER, HeaderValue::from_static(tier.as_str()));
    response
}

fn cache_error(err: CacheError) -> Response {
    // The cache falls back to memory instead of failing; reaching this means
    // something unexpected, and the details stay in the log.
    tracing::error!(error = %err, "cache operation failed");
    error(StatusCode::SERVICE_UNAVAILABLE, "cache unavailable")
}

fn check_key(state: &ApiState, key: &str) -> Result<(), ApiError> {
    if key.len() > state.limits.max_key_bytes {
        return Err(ApiError::bad_request(format!("key is longer than {} bytes", state.limits.max_key_bytes)));
    }
    Ok(())
}

/// `?ttl=SECONDS`: a whole number from 1 to the maximum; absent means the default. Parsed as
/// an integer and compared before any arithmetic, so no value can overflow a deadline.
fn parse_ttl(params: Result<Query<PutParams>, QueryRejection>, limits: &Limits) -> Result<Duration, ApiError> {
    let max = limits.max_ttl.as_secs().max(1);
    let bad = || ApiError::bad_request(format!("ttl must be a whole number of seconds from 1 to {max}"));
    let Query(params) = params.map_err(|_| bad())?;
    match params.ttl.as_deref() {
        None => Ok(limits.default_ttl),
        Some(raw) => match raw.parse::<u64>() {
            Ok(secs) if (1..=max).contains(&secs) => Ok(Duration::from_secs(secs)),
            _ => Err(bad()),
        },
    }
}

async fn get_value(State(state): State<Arc<ApiState>>, Path(key): Path<String>) -> Response {
    if let Err(err) = check_key(&state, &key) {
        return err.into_response();
    }
    match state.cache.get_with_tier(&key).await {
        Ok((Some(value), tier)) => {
            with_tier(([(header::CONTENT_TYPE, "application/octet-stream")], value).into_response(), tier)
        }
        Ok((None, tier)) => with_tier(error(StatusCode::NOT_FOUND, "no such key"), tier),
        Err(err) => cache_error(err),
    }
}

async fn put_value(
    State(state): State<Arc<ApiState>>,
    Path(key): Path<String>,
    params: Result<Query<PutParams>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Err(err) = check_key(&state, &key) {
        return err.into_response();
    }
    let ttl = match parse_ttl(params, &state.limits) {
        Ok(ttl) => ttl,
        Err(err) => return err.into_response(),
    };
    let value = match body {
        Ok(value) => value,
        // 413 for an oversized body, 400 for one that could not be read.
        Err(rejection) => return error(rejection.status(), rejection.body_text()),
    };
    match state.cache.set_with_tier(&key, value, Some(ttl)).await {
        Ok(tier) => with_tier(StatusCode::NO_CONTENT.into_response(), tier),
        Err(err) => cache_error(err),
    }
}

async fn delete_value(State(state): State<Arc<ApiState>>, Path(key): Path<String>) -> Response {
    if let Err(err) = check_key(&state, &key) {
        return err.into_response();
    }
    match state.cache.delete_with_tier(&key).await {
        Ok(tier) => with_tier(StatusCode::NO_CONTENT.into_response(), tier),
        Err(err) => cache_error(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheConfig;
    use axum::body::Body;
    use axum::http::{Method, Request};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn app() -> Router {
        let cache = Cache::new(CacheConfig::default()).expect("memory cache");
        let limits = Limits {
            max_key_bytes: 16,
            max_value_bytes: 64,
            default_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(60),
        };
        routes(cache, limits)
    }

    async fn send(app: &Router, method: Method, uri: &str, body: &'static [u8]) -> (StatusCode, Option<String>, Bytes) {
        let request = Request::builder().method(method).uri(uri).body(Body::from(body)).expect("request");
        let response = app.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let tier = response.headers().get(TIER_HEADER).and_then(|value| value.to_str().ok()).map(str::to_string);
        let body = response.into_body().collect().await.expect("body").to_bytes();
        (status, tier, body)
    }

    fn error_message(body: &Bytes) -> String {
        let json: serde_json::Value = serde_json::from_slice(body).expect("json error body");
        json["error"].as_str().expect("error string").to_string()
    }

    #[tokio::test]
    async fn put_get_delete_round_trip() {
        let app = app();
        let (status, tier, _) = send(&app, Method::PUT, "/cache/k1", b"value").await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert_eq!(tier.as_deref(), Some("memory"));

        let request = Request::get("/cache/k1").body(Body::empty()).expect("request");
        let response = app.clone().oneshot(request).await.expect("infallible");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/octet-stream");
        let body = response.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"value");

        let (status, _, _) = send(&app, Method::DELETE, "/cache/k1", b"").await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, tier, body) = send(&app, Method::GET, "/cache/k1", b"").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(tier.as_deref(), Some("memory"));
        assert_eq!(error_message(&body), "no such key");
    }

    #[tokio::test]
    async fn ttl_is_honoured_and_validated() {
        let app = app();
        let (status, _, _) = send(&app, Method::PUT, "/cache/t?ttl=1", b"v").await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, _, _) = send(&app, Method::GET, "/cache/t", b"").await;
        assert_eq!(status, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let (status, _, _) = send(&app, Method::GET, "/cache/t", b"").await;
        assert_eq!(status, StatusCode::NOT_FOUND);

        for bad in ["0", "-1", "abc", "1.5", "", "61", "9300000000000000000", "99999999999999999999999"] {
            let uri = format!("/cache/t?ttl={bad}");
            let request = Request::put(uri.as_str()).body(Body::from("v")).expect("request");
            let response = app.clone().oneshot(request).await.expect("infallible");
            assert_eq!(response.status(), StatusCode::BAD_REQUEST, "ttl={bad}");
            let body = response.into_body().collect().await.expect("body").to_bytes();
            assert!(error_message(&body).contains("ttl"), "ttl={bad}");
        }
    }

    #[tokio::test]
    async fn oversized_key_is_400_and_oversized_value_is_413() {
        let app = app();
        let long_key = format!("/cache/{}", "k".repeat(17));
        let request = Request::put(long_key.as_str()).body(Body::from("v")).expect("request");
        let response = app.clone().oneshot(request).await.expect("infallible");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let body = response.into_body().collect().await.expect("body").to_bytes();
        assert!(error_message(&body).contains("16 bytes"));

        let request = Request::put("/cache/big").body(Body::from(vec![b'x'; 65])).expect("request");
        let response = app.clone().oneshot(request).await.expect("infallible");
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let body = response.into_body().collect().await.expect("body").to_bytes();
        assert!(!error_message(&body).is_empty());

        // Exactly at the limits is fine.
        let key = format!("/cache/{}", "k".repeat(16));
        let request = Request::put(key.as_str()).body(Body::from(vec![b'x'; 64])).expect("request");
        let response = app.clone().oneshot(request).await.expect("infallible");
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
    }
}
