//! `POST /auth/register`, `POST /auth/login`, `POST /auth/logout` and `GET /auth/me`: users
//! durable in Redis, passwords hashed on the [`Hasher`]'s threads, sessions from
//! [`crate::sessions`].
//!
//! # Throttling
//! Register and login take a token from two [`crate::throttle`] buckets, the client address's
//! (`HERDSMAN_AUTH_LIMIT_ADDRESS` a minute, the address found by [`super::client_addr`]; an
//! IPv6 one by its /64, [`Bucket::for_address`]) and the
//! account's (`HERDSMAN_AUTH_LIMIT_ACCOUNT` a minute), before any bcrypt work; an attempt over
//! either limit is `429` with `Retry-After` in whole seconds. Without `REDIS_URL` the routes
//! answer `503` before that (there are no users).
//!
//! # Durable users
//! A user record lives only in Redis (`herdsman:user:{username}`), never in
//! the cache's memory fallback: an account that exists in one worker's memory
//! but not in Redis would be worse than no account at all. The password hash
//! is computed *before* the single `SET ... NX` that creates the record, so
//! there is never a half-written user, and `NX` makes a duplicate or a
//! concurrent registration fail instead of overwriting. When Redis cannot be
//! reached, register and login answer `503 {"error":"user store unavailable,
//! retry later"}` with `Retry-After`, never a misleading `401`.
//!
//! One ambiguity remains, as with any remote write: if Redis *hangs* (rather
//! than refuses) the `SET NX` may still be applied after we gave up and
//! answered `503`. The record is then complete and correct, and a retry gets
//! `409`.
//!
//! # Timing
//!
//! A login for an unknown user verifies the password against a dummy hash of
//! the same cost, so response time does not reveal which usernames exist.
//! Passwords and tokens are never logged; [`Credentials`]' `Debug` hides the password.

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;
use tracing::{debug, error, info, warn};

use super::client_addr::{client_addr, PeerAddr};
use super::error::{ApiError, JsonBody};
use crate::cache::{CacheError, DurableStore};
use crate::hasher::{HashError, Hasher};
use crate::sessions::{bearer_token, Sessions};
use crate::throttle::{Bucket, Throttle};

/// Redis key prefix of user records.
pub const USER_PREFIX: &str = "herdsman:user:";
pub use crate::hasher::MAX_PASSWORD_BYTES;
pub const MIN_PASSWORD_BYTES: usize = 8;
pub const MAX_USERNAME_CHARS: usize = 64;
/// Largest body `/auth/register` and `/auth/login` read: a name and a password, escaped, fit many
/// times over. These routes are open to anyone and read their body before the throttle can
/// refuse, so it costs an anonymous client at most this much, not `HERDSMAN_MAX_BODY_BYTES`.
pub const MAX_CREDENTIALS_BODY_BYTES: usize = 4 * 1024;

/// A register or login request body.
#[derive(Deserialize)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

impl Credentials {
    fn username_is_valid(&self) -> bool {
        let name = &self.username;
        !name.is_empty()
            && name.len() <= MAX_USERNAME_CHARS
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    }

    /// The registration policy: username 1..=64 of `[A-Za-z0-9_.-]`, password 8..=72 bytes.
    /// Never applied at login, where wrong credentials of any shape are just 401.
    fn validate_new(&self) -> Result<(), ApiError> {
        if !self.username_is_valid() {
            return Err(ApiError::bad_request(format!(
                "username must be 1 to {MAX_USERNAME_CHARS} characters of A-Z, a-z, 0-9, '_', '.', '-'"
            )));
        }
        let bytes = self.password.len();
        if bytes < MIN_PASSWORD_BYTES {
            return Err(ApiError::bad_request(format!("password must be at least {MIN_PASSWORD_BYTES} bytes")));
        }
        if bytes > MAX_PASSWORD_BYTES {
            return Err(ApiError::bad_request(format!(
                "password is {bytes} bytes; bcrypt only uses the first {MAX_PASSWORD_BYTES} bytes, \
                 so longer passwords are refused rather than silently truncated"
            )));
        }
        Ok(())
    }
}

/// What is stored at `herdsman:user:{username}`.
#[derive(Serialize, Deserialize)]
struct UserRecord {
    username: String,
    password_hash: String,
    created_at_unix: u64,
}

fn store_unavailable() -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "user store unavailable, retry later").retry_after(2)
}

fn invalid_credentials() -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "invalid credentials")
}

impl From<CacheError> for ApiError {
    fn from(err: CacheError) -> ApiError {
        // Every store failure is an outage from the client's point of view;
        // the breaker has already logged the cause once.
        debug!(error = %err, "user store operation failed");
        store_unavailable()
    }
}

/// What the routes use, from the worker's [`crate::Services`].
pub struct AuthApi {
    /// `None` without `REDIS_URL`.
    pub durable: Option<DurableStore>,
    pub hasher: Hasher,
    pub sessions: Sessions,
    pub throttle: Throttle,
    pub limits: AuthLimits,
}

/// The settings the routes apply.
#[derive(Debug, Clone, Copy)]
pub struct AuthLimits {
    /// `BCRYPT_COST`.
    pub cost: u32,
    /// `HERDSMAN_TRUSTED_PROXIES`.
    pub trusted_proxies: usize,
    /// `HERDSMAN_AUTH_LIMIT_ACCOUNT`, attempts a minute.
    pub per_account: u32,
    /// `HERDSMAN_AUTH_LIMIT_ADDRESS`, attempts a minute.
    pub per_address: u32,
}

struct AuthState {
    durable: Option<DurableStore>,
    hasher: Hasher,
    sessions: Sessions,
    throttle: Throttle,
    limits: AuthLimits,
    cost: u32,
    /// Hash verified against for unknown users; computed on first need.
    dummy_hash: OnceCell<String>,
}

impl AuthState {
    /// The store, if it would be tried right now; otherwise 503 at once.
    fn store(&self) -> Result<&DurableStore, ApiError> {
        match &self.durable {
            // Retrying can never help: say what is missing, without Retry-After.
            None => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "user accounts need Redis, and this server has no REDIS_URL",
            )),
            Some(store) => Some(store).filter(|store| store.is_available()).ok_or_else(store_unavailable),
        }
    }

    async fn dummy_hash(&self) -> Result<&str, HashError> {
        self.dummy_hash
            .get_or_try_init(|| self.hasher.hash("herdsman-timing-dummy", self.cost))
            .await
            .map(String::as_str)
    }
}

impl AuthState {
    /// Takes an attempt from the client address's and the account's buckets, or answers 429.
    async fn throttle(&self, peer: PeerAddr, headers: &HeaderMap, username: &str) -> Result<(), ApiError> {
        let address = client_addr(peer.0, headers, self.limits.trusted_proxies);
        let buckets = [
            Bucket::for_address(address, self.limits.per_address),
            Bucket::new("account", username, self.limits.per_account),
        ];
        self.throttle.take(&buckets).await.inspect_err(|_| {
            crate::metrics::count(crate::metrics::Event::LoginThrottled);
            debug!(%address, "auth attempt throttled");
        })?;
        Ok(())
    }
}

/// The four user routes. Without `REDIS_URL` (`durable` is `None`) register and login answer
/// 503 and say that users need Redis.
pub fn routes(api: AuthApi) -> Router {
    let AuthApi { durable, hasher, sessions, throttle, limits } = api;
    let state = Arc::new(AuthState {
        durable,
        hasher,
        sessions,
        throttle,
        limits,
        cost: limits.cost,
        dummy_hash: OnceCell::new(),
    });
    // Compute the dummy hash now, so that even the first unknown-user login
    // costs one bcrypt, not two. Without a runtime it is made on first use.
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        let state = state.clone();
        runtime.spawn(async move {
            if let Err(err) = state.dummy_hash().await {
                warn!(error = %err, "cannot precompute the dummy password hash");
            }
        });
    }
    Router::new()
        .route("/auth/register", post(register))
        .route("/auth/login", post(login))
        .route("/auth/logout", post(logout))
        .route("/auth/me", get(me))
        .layer(DefaultBodyLimit::max(MAX_CREDENTIALS_BODY_BYTES))
        .with_state(state)
}

async fn register(
    State(state): State<Arc<AuthState>>,
    peer: PeerAddr,
    headers: HeaderMap,
    JsonBody(credentials): JsonBody<Credentials>,
) -> Result<Response, ApiError> {
    credentials.validate_new()?;
    state.store()?;
    state.throttle(peer, &headers, &credentials.username).await?;
    // Hash first: the record is written whole, in one SET NX, or not at all.
    let password_hash = state.hasher.hash(&credentials.password, state.cost).await?;
    let record = UserRecord {
        username: credentials.username.clone(),
        password_hash,
        created_at_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    };
    let record = serde_json::to_vec(&record).map_err(|err| {
        error!(error = %err, "cannot encode user record");
        ApiError::internal()
    })?;
    let key = format!("{USER_PREFIX}{}", credentials.username);
    if state.store()?.set_nx(&key, &record).await? {
        info!(username = %credentials.username, "user registered");
        let body = Json(serde_json::json!({ "username": credentials.username }));
        Ok((StatusCode::CREATED, body).into_response())
    } else {
        Err(ApiError::new(StatusCode::CONFLICT, "username already taken"))
    }
}

async fn login(
    State(state): State<Arc<AuthState>>,
    peer: PeerAddr,
    headers: HeaderMap,
    JsonBody(credentials): JsonBody<Credentials>,
) -> Result<Response, ApiError> {
    state.throttle(peer, &headers, &credentials.username).await?;
    // No registration policy here: a name that cannot exist is an unknown user, a password
    // that cannot match is a wrong one; both are 401 after the same bcrypt work.
    let record = match credentials.username_is_valid() {
        true => state.store()?.get(&format!("{USER_PREFIX}{}", credentials.username)).await?,
        false => None,
    };
    let record: Option<UserRecord> = match record {
        None => None,
        Some(raw) => match serde_json::from_slice(&raw) {
            Ok(record) => Some(record),
            Err(err) => {
                error!(username = %credentials.username, error = %err, "corrupt user record");
                return Err(ApiError::internal());
            }
        },
    };
    // Same bcrypt work whether or not the user exists.
    let (hash, known) = match &record {
        Some(record) => (record.password_hash.as_str(), true),
        None => (state.dummy_hash().await?, false),
    };
    let matches = state.hasher.verify(&credentials.password, hash).await?;
    if !(known && matches) {
        debug!(username = %credentials.username, "login refused");
        return Err(invalid_credentials());
    }
    if let Some(record) = record {
        rehash_if_cost_changed(&state, record, &credentials.password).await;
    }
    let token = state
        .sessions
        .create(&credentials.username)
        .await
        .inspect_err(|_| warn!("login succeeded but the session could not be stored"))?;
    info!(username = %credentials.username, "user logged in");
    let expires_in = state.sessions.ttl().as_secs();
    Ok(Json(serde_json::json!({ "token": token.reveal(), "expires_in": expires_in })).into_response())
}

/// `POST /auth/logout`: ends the session of the token presented (204).
async fn logout(State(state): State<Arc<AuthState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let token = bearer_token(&headers)?;
    state.sessions.revoke(token).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /auth/me`: whose the token presented is, and for how many more seconds.
async fn me(State(state): State<Arc<AuthState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let session = state.sessions.authenticate(&headers).await?;
    let body = serde_json::json!({ "username": &*session.username, "expires_in": session.expires_in.as_secs() });
    Ok(Json(body).into_response())
}

/// After a successful login: when `BCRYPT_COST` changed since the user's hash was made, the
/// stored hash is remade at the new cost (the only moment the password is known). A failure
/// is logged and the login still succeeds.
async fn rehash_if_cost_changed(state: &AuthState, mut record: UserRecord, password: &str) {
    if Hasher::cost_of(&record.password_hash) == Some(state.cost) {
        return;
    }
    let result = async {
        record.password_hash = state.hasher.hash(password, state.cost).await.map_err(|e| e.to_string())?;
        let encoded = serde_json::to_vec(&record).map_err(|e| e.to_string())?;
        let key = format!("{USER_PREFIX}{}", record.username);
        let store = state.store().map_err(|_| "user store unavailable".to_string())?;
        store.replace(&key, &encoded).await.map_err(|e| e.to_string())
    }
    .await;
    match result {
        Ok(_) => info!(username = %record.username, cost = state.cost, "password rehashed at the new BCRYPT_COST"),
        Err(e) => warn!(username = %record.username, error = %e, "cannot rehash at the new BCRYPT_COST"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::extract::Request;
    use axum::http::header;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn app() -> Router {
        let limits = AuthLimits { cost: 4, trusted_proxies: 0, per_account: 1000, per_address: 1000 };
        let sessions = Sessions::new(None, std::time::Duration::from_secs(60));
        let hasher = Hasher::new(1, 8).expect("hasher");
        routes(AuthApi { durable: None, hasher, sessions, throttle: Throttle::new(None), limits })
    }

    async fn post(
        app: &Router,
        uri: &str,
        content_type: Option<&str>,
        body: &str,
    ) -> (StatusCode, Option<String>, serde_json::Value) {
        let mut request = Request::post(uri);
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        let request = request.body(Body::from(body.to_string())).expect("request");
        let response = app.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let retry_after = response.headers().get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()).map(str::to_string);
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        let json = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("non-JSON body: {}", String::from_utf8_lossy(&bytes)));
        (status, retry_after, json)
    }

    const JSON: Option<&str> = Some("application/json");

    #[tokio::test]
    async fn without_redis_user_routes_say_redis_is_needed_and_not_to_retry() {
        let app = app();
        for uri in ["/auth/register", "/auth/login"] {
            let (status, retry_after, body) =
                post(&app, uri, JSON, r#"{"username":"alice","password":"password123"}"#).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{uri}");
            assert!(retry_after.is_none(), "{uri}: retrying cannot help");
            assert_eq!(body["error"], "user accounts need Redis, and this server has no REDIS_URL");
        }
    }

    #[tokio::test]
    async fn malformed_bodies_get_json_errors() {
        let app = app();
        let cases: &[(Option<&str>, &str, StatusCode)] = &[
            (JSON, "{not json", StatusCode::BAD_REQUEST),
            (JSON, "", StatusCode::BAD_REQUEST),
            (JSON, r#"{"username":"alice"}"#, StatusCode::UNPROCESSABLE_ENTITY),
            (JSON, r#"{"username":5,"password":"password123"}"#, StatusCode::UNPROCESSABLE_ENTITY),
            (JSON, r#""alice""#, StatusCode::UNPROCESSABLE_ENTITY),
            (None, r#"{"username":"alice","password":"password123"}"#, StatusCode::UNSUPPORTED_MEDIA_TYPE),
        ];
        for uri in ["/auth/register", "/auth/login"] {
            for (content_type, body, expected) in cases {
                let (status, _, json) = post(&app, uri, *content_type, body).await;
                assert_eq!(status, *expected, "{uri} {body}");
                assert!(json["error"].is_string(), "{uri} {body}: {json}");
            }
        }
    }

    #[tokio::test]
    async fn credentials_past_4_kib_are_413_before_anything_else() {
        let app = app();
        let padded = format!(r#"{{"username":"alice","password":"password123","pad":"{}"}}"#, "x".repeat(4096));
        for uri in ["/auth/register", "/auth/login"] {
            let (status, _, json) = post(&app, uri, JSON, &padded).await;
            assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{uri}: {json}");
            assert!(json["error"].is_string(), "{uri}: {json}");
        }
    }

    #[tokio::test]
    async fn registration_policy_is_400_at_register_and_never_applied_at_login() {
        let app = app();
        let long_name = "a".repeat(65);
        let max_name = "a".repeat(64);
        let long_password = "p".repeat(73);
        let long_multibyte = "é".repeat(37); // 37 chars, 74 bytes
        let cases = [
            ("", "password123", "username"),
            (long_name.as_str(), "password123", "username"),
            ("bad name", "password123", "username"),
            ("bad/name", "password123", "username"),
            ("ålice", "password123", "username"),
            ("alice", "short", "at least 8"),
            ("alice", long_password.as_str(), "72"),
            ("alice", long_multibyte.as_str(), "72"),
        ];
        for (username, password, needle) in cases {
            let body = serde_json::json!({"username": username, "password": password});
            let (status, _, json) = post(&app, "/auth/register", JSON, &body.to_string()).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{username:?}");
            let message = json["error"].as_str().expect("error");
            assert!(message.contains(needle), "{message}");
            // Login applies no registration policy: a name that cannot exist is just unknown.
            if needle == "username" {
                let (status, _, json) = post(&app, "/auth/login", JSON, &body.to_string()).await;
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{username:?}");
                assert_eq!(json["error"], "invalid credentials");
            }
        }
        for uri in ["/auth/register", "/auth/login"] {
            // At the limits: valid shape, so it reaches the (missing) store.
            let body = serde_json::json!({"username": max_name, "password": "p".repeat(72)});
            let (status, _, _) = post(&app, uri, JSON, &body.to_string()).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        }
    }

    #[test]
    fn credentials_debug_hides_the_password() {
        let credentials = Credentials { username: "alice".into(), password: "hunter22".into() };
        assert!(!format!("{credentials:?}").contains("hunter22"));
    }
}
