//! `/cache/{key}`: the two-tier [`Cache`] over HTTP, for logged-in users, each in a namespace of
//! their own.
//!
//! ```text
//! PUT    /cache/{key}[?ttl=SECONDS]   body = value      -> 204
//! GET    /cache/{key}                                   -> 200 octet-stream | 404
//! DELETE /cache/{key}                                   -> 204
//! ```
//!
//! Every request needs `Authorization: Bearer <token>` from `/auth/login` ([`crate::sessions`]):
//! without one, or with one that is malformed, unknown, expired or revoked, the answer is `401`
//! with `WWW-Authenticate: Bearer`, before the key, the query or the body is looked at. Without
//! `REDIS_URL` there are no sessions, so every request is that `401` and its message says
//! sessions need Redis (embedders still have the cache itself in their handlers).
//!
//! # Namespaces
//! User `alice`'s key `k` is the cache key `user:alice/k`. A username is made only of
//! `[A-Za-z0-9_.-]` (the registration policy), so the first `/` ends it and no key, however
//! crafted (`../bob/k`, `%2F`, anything), can reach another user's namespace: the username
//! comes from the session, never from the request.
//!
//! # Round trips
//! A session this worker verified lately is trusted without asking Redis
//! (`HERDSMAN_SESSION_RECHECK`, [`crate::sessions`]), and a `PUT`'s quota check is made by Redis
//! in the write's own round trip, as is a `DELETE`'s release of its quota entry: a `GET`, `PUT`
//! or `DELETE` costs the cache's one round trip, so a slow Redis slows it once, not two or
//! three times.
//!
//! # Limits
//! Per-user quotas of keys and bytes ([`super::quota`]) are `403` naming the quota. While Redis
//! is away, a write this worker cannot hold for replay is `507 Insufficient Storage` with
//! `Retry-After`: it was not kept, and the client is told so.
//!
//! Values in transit (a `PUT`'s body being read, a `GET`'s answer until the client has taken it)
//! hold a share of the worker's [`InFlight`] budget, each user at most a quarter of it; past
//! either the answer is `503` with `Retry-After`, so clients that do not read cannot make the
//! worker hold a copy per request, nor one user's transfers shut out the others.
//!
//! Every answer carries `x-cache-tier: redis|memory`, saying which tier
//! served it, so an operator (or a test) can see the circuit breaker at work
//! without reading logs. Errors are JSON `{"error": "..."}`: a key longer than
//! `max_key_bytes` or a `ttl` that is not a whole number of seconds up to the maximum
//! is a `400`, a body over `max_value_bytes` a `413`. A value stored without `ttl`
//! lives for the default TTL (`HERDSMAN_CACHE_DEFAULT_TTL`). Limits are checked before anything touches a tier.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http_body_util::BodyExt;
use serde::Deserialize;

use super::error::ApiError;
use super::in_flight::{BudgetedBody, InFlight};
use super::quota::Quotas;
use crate::cache::{Cache, CacheError, Tier};
use crate::sessions::Sessions;

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
    /// Bytes of values the routes may hold at once, being uploaded or sent ([`InFlight`]); past
    /// it a request is 503. The stand-alone binary gives it `HERDSMAN_CACHE_MAX_BYTES`.
    pub max_in_flight_bytes: u64,
}

struct ApiState {
    cache: Cache,
    sessions: Sessions,
    quotas: Quotas,
    limits: Limits,
    in_flight: InFlight,
}

/// The cache routes; `sessions` says who is calling, `quotas` how much they may store.
pub fn routes(cache: Cache, sessions: Sessions, quotas: Quotas, limits: Limits) -> Router {
    let in_flight = InFlight::new(limits.max_in_flight_bytes, limits.max_value_bytes);
    let state = Arc::new(ApiState { cache, sessions, quotas, limits, in_flight });
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
    if let CacheError::ReplayFull = err {
        // Redis is away and this worker holds all the outage writes it can: the write was not
        // kept, and the client must hear so (it may retry once Redis is back).
        return ApiError::new(StatusCode::INSUFFICIENT_STORAGE, err.to_string()).retry_after(2).into_response();
    }
    if let CacheError::Late(_) = err {
        // Redis is alive but busy past the operation timeout: the write may still land, so the
        // client is told it is unconfirmed, not that it failed.
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "redis did not confirm this write in time: it may or may not be stored; retry",
        )
        .retry_after(1)
        .into_response();
    }
    // The cache falls back to memory instead of failing; reaching this means
    // something unexpected, and the details stay in the log.
    tracing::error!(error = %err, "cache operation failed");
    error(StatusCode::SERVICE_UNAVAILABLE, "cache unavailable")
}

/// The caller and their cache key for `key` (their namespace, then the key), once both the
/// session and the key's length are checked.
async fn user_key(state: &ApiState, headers: &HeaderMap, key: &str) -> Result<(Arc<str>, String), ApiError> {
    let session = state.sessions.authenticate(headers).await?;
    if key.len() > state.limits.max_key_bytes {
        return Err(ApiError::bad_request(format!("key is longer than {} bytes", state.limits.max_key_bytes)));
    }
    let cache_key = namespaced(&session.username, key);
    Ok((session.username, cache_key))
}

/// `user:{username}/{key}`; see the module doc for why this cannot collide.
pub fn namespaced(username: &str, key: &str) -> String {
    format!("user:{username}/{key}")
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

async fn get_value(State(state): State<Arc<ApiState>>, headers: HeaderMap, Path(key): Path<String>) -> Response {
    let (username, key) = match user_key(&state, &headers, &key).await {
        Ok(found) => found,
        Err(err) => return err.into_response(),
    };
    state.quotas.learn(&state.cache, &username);
    // A value this worker has seen takes its share before it is fetched, so that refused reads
    // cost no fetch (and no copy of the value) at all; an unknown one once it is fetched.
    let early = match state.cache.cached_len(&key) {
        Some(expected) => match state.in_flight.try_take(&username, expected) {
            Some(share) => Some((expected, share)),
            None => return busy().into_response(),
        },
        None => None,
    };
    match state.cache.get_with_tier(&key).await {
        Ok((Some(value), tier)) => {
            let share = match early {
                Some((expected, share)) if value.len() <= expected => Some(share),
                // Larger than seen (or not seen): the early share goes back before a new one.
                other => {
                    drop(other);
                    state.in_flight.try_take(&username, value.len())
                }
            };
            match share {
                Some(share) => with_tier(
                    ([(header::CONTENT_TYPE, "application/octet-stream")], Body::new(BudgetedBody::new(value, share)))
                        .into_response(),
                    tier,
                ),
                None => busy().into_response(),
            }
        }
        Ok((None, tier)) => with_tier(error(StatusCode::NOT_FOUND, "no such key"), tier),
        Err(err) => cache_error(err),
    }
}

/// The body is the last thing read, by the handler itself rather than by an extractor (which
/// axum would run first): a PUT without a valid session, or with a bad key or `ttl`, is refused
/// before any of its body is kept, so anonymous uploads cost the worker no memory however many
/// arrive at once.
async fn put_value(
    State(state): State<Arc<ApiState>>,
    Path(key): Path<String>,
    params: Result<Query<PutParams>, QueryRejection>,
    request: Request,
) -> Response {
    let checked = user_key(&state, request.headers(), &key)
        .await
        .and_then(|found| Ok((found, parse_ttl(params, &state.limits)?)));
    let ((username, cache_key), ttl) = match checked {
        Ok(checked) => checked,
        Err(err) => return refuse_unread(request, err).await,
    };
    // The most this body can hold: its size hint (hyper's reading of Content-Length, capped by
    // the guard's limit), else the limit.
    let limit = state.limits.max_value_bytes;
    let most =
        request.body().size_hint().upper().map_or(limit, |upper| usize::try_from(upper).unwrap_or(limit).min(limit));
    let Some(_share) = state.in_flight.try_take(&username, most) else {
        return refuse_unread(request, busy()).await;
    };
    let value = match Bytes::from_request(request, &()).await {
        Ok(value) => value,
        // 413 for an oversized body, 400 for one that could not be read.
        Err(rejection) => return error(rejection.status(), rejection.body_text()),
    };
    match state.quotas.store(&state.cache, (&username, &key), &cache_key, value, ttl).await {
        Ok(Ok(tier)) => with_tier(StatusCode::NO_CONTENT.into_response(), tier),
        Ok(Err(err)) => cache_error(err),
        Err(refused) => refused.into_response(),
    }
}

/// The worker holds all the values in transit it may, or all it may for this user ([`InFlight`]).
fn busy() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "this worker is sending and receiving all the values it may hold, for you or for everyone; retry",
    )
    .retry_after(1)
}

/// Answers `err` to a request whose body was not read, after reading and dropping that body
/// (bounded by the guard's body limit and request timeout): closing a connection with unread
/// bytes in it sends a reset, which can destroy the answer before the client reads it, so a
/// client whose token had just expired would see a broken connection instead of its 401. A
/// client that sent `Expect: 100-continue` is waiting to be asked for the body, and is not.
async fn refuse_unread(request: Request, err: ApiError) -> Response {
    let awaits_continue = request
        .headers()
        .get(header::EXPECT)
        .is_some_and(|expect| expect.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if !awaits_continue {
        let mut body = request.into_body();
        while let Some(Ok(_)) = body.frame().await {}
    }
    err.into_response()
}

async fn delete_value(State(state): State<Arc<ApiState>>, headers: HeaderMap, Path(key): Path<String>) -> Response {
    let (username, cache_key) = match user_key(&state, &headers, &key).await {
        Ok(found) => found,
        Err(err) => return err.into_response(),
    };
    match state.quotas.delete(&state.cache, (&username, &key), &cache_key).await {
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

    /// No Redis: no sessions. The routes with sessions are tested against a real Redis
    /// (tests/sessions_redis.rs).
    fn app() -> Router {
        let cache = Cache::new(CacheConfig::default()).expect("memory cache");
        let limits = Limits {
            max_key_bytes: 16,
            max_value_bytes: 64,
            default_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(60),
            max_in_flight_bytes: 1 << 20,
        };
        routes(cache, Sessions::new(None, Duration::from_secs(60)), Quotas::new(10, 100), limits)
    }

    #[tokio::test]
    async fn without_a_session_every_request_is_401_with_a_bearer_challenge() {
        let app = app();
        let token = "ab".repeat(32);
        let authorizations: [Option<&[u8]>; 4] = [
            None,
            Some(b"Basic YWxpY2U6cHc="),
            Some(b"Bearer \xff"),
            Some(format!("Bearer {token}").leak().as_bytes()),
        ];
        for method in [Method::GET, Method::PUT, Method::DELETE] {
            for authorization in authorizations {
                let mut request = Request::builder().method(method.clone()).uri("/cache/k?ttl=bad");
                if let Some(value) = authorization {
                    request = request.header(header::AUTHORIZATION, HeaderValue::from_bytes(value).expect("header"));
                }
                let request = request.body(Body::from("v")).expect("request");
                let response = app.clone().oneshot(request).await.expect("infallible");
                assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{method} {authorization:?}");
                assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
                let body = response.into_body().collect().await.expect("body").to_bytes();
                let json: serde_json::Value = serde_json::from_slice(&body).expect("json error body");
                assert!(json["error"].as_str().is_some_and(|m| !m.is_empty()), "{json}");
            }
        }
    }

    #[test]
    fn a_crafted_key_stays_in_its_users_namespace() {
        for key in ["../bob/k", "/bob/k", "bob/k", "%2Fbob%2Fk", ""] {
            assert!(namespaced("alice", key).starts_with("user:alice/"), "{key}");
        }
        // A username cannot hold '/', so alice's keys never start with another user's prefix.
        assert!(!namespaced("alice", "x").starts_with(&namespaced("al", "")));
    }
}
