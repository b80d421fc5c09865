//! Users and logins: bcrypt off the async executor, users durable in Redis.
//!
//! # Why a dedicated hashing pool
//!
//! bcrypt is deliberately slow: tens to hundreds of milliseconds of pure CPU
//! per hash or verify. A worker runs a *single-threaded* Tokio runtime, so
//! hashing on it would freeze every other request of that worker, `/live`
//! included, and the supervisor would kill a perfectly healthy process during
//! a login storm. `spawn_blocking` would not help much either: its pool is
//! large (512 threads) and unbounded, so a storm would still eat every core.
//!
//! [`Hasher`] is a small, fixed set of OS threads fed through a bounded queue:
//!
//! ```text
//!   async handler --try_send(job)--> [ bounded queue ] --> N threads (nice 10)
//!        ^                                                      |
//!        +------------------- oneshot result -------------------+
//! ```
//!
//! * N is chosen by the caller (`ceil(cores / workers)`), so all workers
//!   together use about one hashing thread per core.
//! * Each thread lowers its own scheduling priority (nice 10), so when the
//!   cores are saturated the kernel still prefers the runtime thread.
//! * When the queue is full the job is refused at once ([`HashError::Busy`])
//!   and the route answers `503` with `Retry-After`: shedding load beats
//!   queueing requests until clients time out.
//!
//! # Durable users
//!
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
//! Passwords are never logged; [`Credentials`]' `Debug` hides them.

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, OnceCell};
use tracing::{debug, error, info, warn};

use crate::cache::{CacheError, DurableStore};

/// Redis key prefix of user records.
pub const USER_PREFIX: &str = "herdsman:user:";
/// Redis key prefix of login sessions (value: the username).
pub const SESSION_PREFIX: &str = "herdsman:session:";
/// How long a login token stays valid.
pub const SESSION_TTL: Duration = Duration::from_secs(3600);
/// bcrypt only looks at the first 72 bytes; longer passwords are refused.
pub const MAX_PASSWORD_BYTES: usize = 72;
pub const MIN_PASSWORD_BYTES: usize = 8;
pub const MAX_USERNAME_CHARS: usize = 64;

/// Nice value of the hashing threads (higher = lower priority).
const HASHER_NICE: libc::c_int = 10;

/// Why a hash or verify did not produce an answer.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    /// The queue is full: shed load (the route answers 503 + Retry-After).
    #[error("password hashing queue is full")]
    Busy,
    /// The hashing threads are gone (a job panicked or the pool shut down).
    #[error("password hasher stopped")]
    Stopped,
    #[error("bcrypt: {0}")]
    Bcrypt(#[from] bcrypt::BcryptError),
    #[error("cannot start hashing threads: {0}")]
    Spawn(#[source] std::io::Error),
}

type Job = Box<dyn FnOnce() + Send>;

/// A bounded pool of low-priority threads running bcrypt. Cheap to clone;
/// the threads exit once every clone is dropped.
#[derive(Clone)]
pub struct Hasher {
    jobs: SyncSender<Job>,
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hasher").finish_non_exhaustive()
    }
}

impl Hasher {
    /// Starts `threads` hashing threads (at least one) behind a queue of
    /// `queue_capacity` waiting jobs.
    pub fn new(threads: usize, queue_capacity: usize) -> Result<Hasher, HashError> {
        let (jobs, queue) = mpsc::sync_channel::<Job>(queue_capacity);
        let queue = Arc::new(Mutex::new(queue));
        for index in 0..threads.max(1) {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("herdsman-bcrypt-{index}"))
                .spawn(move || {
                    lower_thread_priority();
                    loop {
                        // Hold the lock only while waiting for a job, not while running it.
                        let job = match queue.lock() {
                            Ok(queue) => queue.recv(),
                            Err(poisoned) => poisoned.into_inner().recv(),
                        };
                        match job {
                            // A panicking job drops its reply sender (the caller
                            // sees `Stopped`); the thread itself keeps serving.
                            Ok(job) => {
                                let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
                            }
                            Err(_) => return, // every Hasher clone dropped
                        }
                    }
                })
                .map_err(HashError::Spawn)?;
        }
        Ok(Hasher { jobs })
    }

    /// Runs `work` on a hashing thread; refuses at once when the queue is full.
    async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, HashError> {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move || {
            // The receiver may be gone (request cancelled); nothing to do then.
            let _ = reply.send(work());
        });
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(HashError::Busy),
            Err(TrySendError::Disconnected(_)) => return Err(HashError::Stopped),
        }
        answer.await.map_err(|_| HashError::Stopped)
    }

    /// bcrypt-hashes `password`; refuses passwords over 72 bytes instead of truncating.
    pub async fn hash(&self, password: &str, cost: u32) -> Result<String, HashError> {
        let password = password.to_owned();
        Ok(self.run(move || bcrypt::non_truncating_hash(password, cost)).await??)
    }

    /// Checks `password` against a bcrypt `hash`.
    pub async fn verify(&self, password: &str, hash: &str) -> Result<bool, HashError> {
        let password = password.to_owned();
        let hash = hash.to_owned();
        Ok(self.run(move || bcrypt::non_truncating_verify(password, &hash)).await??)
    }
}

/// Gives the calling thread nice 10 so the runtime thread wins the CPU.
fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid() has no preconditions and returns the calling
        // thread's id. On Linux, setpriority(PRIO_PROCESS, tid, ..) changes
        // the nice value of that one thread only (Linux threads are
        // schedulable entities of their own), so no other thread of the
        // process, and in particular not the Tokio runtime thread, is
        // affected. Both calls only read their integer arguments.
        let result = unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, HASHER_NICE)
        };
        if result != 0 {
            // E.g. already nicer than 10 without CAP_SYS_NICE; harmless.
            debug!(
                error = %std::io::Error::last_os_error(),
                "could not lower hashing thread priority"
            );
        }
    }
}

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
    /// Username 1..=64 of `[A-Za-z0-9_.-]`, password 8..=72 bytes.
    fn validate(&self) -> Result<(), ApiError> {
        let name = &self.username;
        if name.is_empty()
            || name.len() > MAX_USERNAME_CHARS
            || !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        {
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

/// A JSON error answer, optionally with `Retry-After`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    retry_after_secs: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), retry_after_secs: None }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    fn store_unavailable() -> ApiError {
        ApiError {
            retry_after_secs: Some(2),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "user store unavailable, retry later")
        }
    }

    fn invalid_credentials() -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "invalid credentials")
    }

    fn internal() -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }
}

impl From<HashError> for ApiError {
    fn from(err: HashError) -> ApiError {
        match err {
            HashError::Busy => ApiError {
                retry_after_secs: Some(1),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "too many logins in progress, retry later")
            },
            other => {
                error!(error = %other, "password hashing failed");
                ApiError::internal()
            }
        }
    }
}

impl From<CacheError> for ApiError {
    fn from(err: CacheError) -> ApiError {
        // Every store failure is an outage from the client's point of view;
        // the breaker has already logged the cause once.
        debug!(error = %err, "user store operation failed");
        ApiError::store_unavailable()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(serde_json::json!({ "error": self.message }))).into_response();
        if let Some(secs) = self.retry_after_secs {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// `Json<T>` whose rejections are JSON too (axum's own are plain text):
/// 400 for malformed JSON, 415 without a JSON content type, 422 for missing
/// fields or wrong types.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(JsonBody(value)),
            Err(rejection) => Err(ApiError::new(rejection.status(), rejection.body_text())),
        }
    }
}

struct AuthState {
    durable: Option<DurableStore>,
    hasher: Hasher,
    cost: u32,
    /// Hash verified against for unknown users; computed on first need.
    dummy_hash: OnceCell<String>,
}

impl AuthState {
    /// The store, if it would be tried right now; otherwise 503 at once.
    fn store(&self) -> Result<&DurableStore, ApiError> {
        self.durable.as_ref().filter(|store| store.is_available()).ok_or_else(ApiError::store_unavailable)
    }

    async fn dummy_hash(&self) -> Result<&str, HashError> {
        self.dummy_hash
            .get_or_try_init(|| self.hasher.hash("herdsman-timing-dummy", self.cost))
            .await
            .map(String::as_str)
    }
}

/// `POST /auth/register` and `POST /auth/login`. `durable` is `None` when no
/// Redis is configured: both routes then answer 503.
pub fn routes(durable: Option<DurableStore>, hasher: Hasher, cost: u32) -> Router {
    let state = Arc::new(AuthState { durable, hasher, cost, dummy_hash: OnceCell::new() });
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
    Router::new().route("/auth/register", post(register)).route("/auth/login", post(login)).with_state(state)
}

async fn register(
    State(state): State<Arc<AuthState>>,
    JsonBody(credentials): JsonBody<Credentials>,
) -> Result<Response, ApiError> {
    credentials.validate()?;
    state.store()?;
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
    JsonBody(credentials): JsonBody<Credentials>,
) -> Result<Response, ApiError> {
    credentials.validate()?;
    let key = format!("{USER_PREFIX}{}", credentials.username);
    let record = state.store()?.get(&key).await?;
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
        return Err(ApiError::invalid_credentials());
    }
    let token = new_token();
    state
        .store()?
        .set_ex(&format!("{SESSION_PREFIX}{token}"), credentials.username.as_bytes(), SESSION_TTL)
        .await
        .inspect_err(|_| warn!("login succeeded but the session could not be stored"))?;
    info!(username = %credentials.username, "user logged in");
    Ok(Json(serde_json::json!({ "token": token })).into_response())
}

/// 32 random bytes from the thread-local CSPRNG, hex-encoded.
fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use std::time::Instant;
    use tower::ServiceExt;

    #[tokio::test]
    async fn hash_and_verify_round_trip() {
        let hasher = Hasher::new(1, 4).expect("hasher");
        let hash = hasher.hash("correct horse", 4).await.expect("hash");
        assert!(hasher.verify("correct horse", &hash).await.expect("verify"));
        assert!(!hasher.verify("wrong horse!", &hash).await.expect("verify"));
    }

    #[tokio::test]
    async fn hashing_threads_run_at_nice_10() {
        let hasher = Hasher::new(1, 1).expect("hasher");
        // SAFETY: gettid and getpriority only read their integer arguments.
        let nice = hasher
            .run(|| unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) })
            .await
            .expect("job");
        assert!(nice >= HASHER_NICE, "nice {nice}");
        // The calling (runtime) thread is untouched.
        // SAFETY: as above.
        let own = unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
        assert!(own < HASHER_NICE, "runtime thread nice {own}");
    }

    #[tokio::test]
    async fn a_panicking_job_does_not_kill_the_pool() {
        let hasher = Hasher::new(1, 4).expect("hasher");
        let result = hasher.run(|| -> u32 { panic!("job panicked on purpose") }).await;
        assert!(matches!(result, Err(HashError::Stopped)));
        let hash = hasher.hash("still works", 4).await.expect("hash");
        assert!(hasher.verify("still works", &hash).await.expect("verify"));
    }

    #[tokio::test]
    async fn full_queue_is_refused_at_once() {
        let hasher = Hasher::new(1, 1).expect("hasher");
        let (release, wait) = std::sync::mpsc::channel::<()>();
        // One job occupies the thread, one fills the queue.
        let busy = tokio::spawn({
            let hasher = hasher.clone();
            async move { hasher.run(move || wait.recv().is_ok()).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let queued = tokio::spawn({
            let hasher = hasher.clone();
            async move { hasher.run(|| ()).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        assert!(matches!(hasher.hash("password1", 4).await, Err(HashError::Busy)));
        assert!(started.elapsed() < Duration::from_millis(20));
        release.send(()).expect("release");
        assert!(busy.await.expect("join").expect("job"));
        queued.await.expect("join").expect("job");
    }

    #[tokio::test]
    async fn runtime_stays_responsive_while_hashing_saturates() {
        let hasher = Hasher::new(2, 64).expect("hasher");
        let storm: Vec<_> = (0..16)
            .map(|_| {
                let hasher = hasher.clone();
                tokio::spawn(async move { hasher.hash("password123", 8).await })
            })
            .collect();
        // The (single-threaded) test runtime keeps ticking on time.
        let mut worst = Duration::ZERO;
        for _ in 0..20 {
            let tick = Instant::now();
            tokio::time::sleep(Duration::from_millis(5)).await;
            worst = worst.max(tick.elapsed());
        }
        eprintln!("worst 5 ms tick during the hashing storm: {worst:?}");
        assert!(worst < Duration::from_millis(100), "worst tick {worst:?}");
        for job in storm {
            job.await.expect("join").expect("hash");
        }
    }

    fn app() -> Router {
        routes(None, Hasher::new(1, 8).expect("hasher"), 4)
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
    async fn without_a_store_well_formed_requests_get_503() {
        let app = app();
        for uri in ["/auth/register", "/auth/login"] {
            let (status, retry_after, body) =
                post(&app, uri, JSON, r#"{"username":"alice","password":"password123"}"#).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{uri}");
            assert!(retry_after.is_some(), "{uri}");
            assert_eq!(body["error"], "user store unavailable, retry later");
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
    async fn invalid_credentials_shape_is_400() {
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
        for uri in ["/auth/register", "/auth/login"] {
            for (username, password, needle) in cases {
                let body = serde_json::json!({"username": username, "password": password});
                let (status, _, json) = post(&app, uri, JSON, &body.to_string()).await;
                assert_eq!(status, StatusCode::BAD_REQUEST, "{uri} {username:?}");
                let message = json["error"].as_str().expect("error");
                assert!(message.contains(needle), "{message}");
            }
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

    #[test]
    fn tokens_are_64_hex_chars_and_differ() {
        let (a, b) = (new_token(), new_token());
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
