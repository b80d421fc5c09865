//! Register and login against a real Redis (testcontainers), including an
//! outage and concurrent registrations of the same name.
//!
//! Image: `HERDSMAN_REDIS_IMAGE` (default `redis:7`); see `tests/support/redis.rs`.

#[path = "support/redis.rs"]
mod redis_support;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use herdsman::cache::{Cache, CacheConfig, RedisStatus};
use herdsman::hasher::Hasher;
use herdsman::http::auth_api;
use herdsman::sessions::Sessions;
use herdsman::throttle::Throttle;
use http_body_util::BodyExt;
use redis_support::TestRedis;
use sha2::Digest;
use tower::ServiceExt;

/// bcrypt's minimum cost, to keep the tests fast.
const COST: u32 = 4;

async fn setup(redis: &TestRedis) -> (Cache, Router) {
    let cache =
        Cache::new(CacheConfig { redis_url: Some(redis.url.clone()), ..CacheConfig::default() }).expect("valid url");
    cache.connect().await.expect("connect");
    let hasher = Hasher::new(2, 64).expect("hasher");
    let app = routes(&cache, hasher, COST);
    (cache, app)
}

/// The auth routes over `cache` at bcrypt `cost`, with limits no test here reaches (the
/// throttle has its own tests in tests/sessions_redis.rs).
fn routes(cache: &Cache, hasher: Hasher, cost: u32) -> Router {
    let limits = auth_api::AuthLimits { cost, trusted_proxies: 0, per_account: 10_000, per_address: 10_000 };
    auth_api::routes(auth_api::AuthApi {
        durable: cache.durable(),
        hasher,
        sessions: Sessions::new(cache.durable(), Duration::from_secs(3600)),
        throttle: Throttle::new(cache.durable()),
        limits,
    })
}

struct Reply {
    status: StatusCode,
    retry_after: Option<String>,
    json: serde_json::Value,
}

async fn post(app: &Router, uri: &str, username: &str, password: &str) -> Reply {
    let body = serde_json::json!({ "username": username, "password": password });
    let request = Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("request");
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let retry_after = response.headers().get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()).map(str::to_string);
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    let json = serde_json::from_slice(&bytes).expect("JSON body");
    Reply { status, retry_after, json }
}

async fn wait_for_up(cache: &Cache) {
    let started = Instant::now();
    while cache.status() != RedisStatus::Up {
        assert!(started.elapsed() < Duration::from_secs(5), "not back within 5 s: {:?}", cache.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn raw_exists(redis: &TestRedis, key: &str) -> bool {
    let mut conn = redis.client().await;
    let n: i64 = redis::cmd("EXISTS").arg(key).query_async(&mut conn).await.expect("EXISTS");
    n == 1
}

#[tokio::test]
async fn register_login_wrong_password_duplicate() {
    let Some(redis) = TestRedis::start().await else { return };
    let (_cache, app) = setup(&redis).await;

    let reply = post(&app, "/auth/register", "alice", "correct horse").await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.json);
    assert_eq!(reply.json["username"], "alice");
    assert!(raw_exists(&redis, "herdsman:user:alice").await);

    let reply = post(&app, "/auth/login", "alice", "correct horse").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json);
    let token = reply.json["token"].as_str().expect("token").to_string();
    assert_eq!(token.len(), 64);
    assert!(token.bytes().all(|c| c.is_ascii_hexdigit()));

    // The session is in Redis under the token's SHA-256, with the username and a TTL of at
    // most an hour.
    let mut conn = redis.client().await;
    let digest: String = sha2::Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    let session_key = format!("herdsman:session:{digest}");
    let (owner, ttl): (Option<String>, i64) = redis::pipe()
        .cmd("GET")
        .arg(&session_key)
        .cmd("TTL")
        .arg(&session_key)
        .query_async(&mut conn)
        .await
        .expect("session");
    assert_eq!(owner.as_deref(), Some("alice"));
    assert!((1..=3600).contains(&ttl), "ttl {ttl}");

    let reply = post(&app, "/auth/login", "alice", "wrong horse").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.json, serde_json::json!({"error": "invalid credentials"}));

    let reply = post(&app, "/auth/login", "nobody", "correct horse").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.json, serde_json::json!({"error": "invalid credentials"}));

    let reply = post(&app, "/auth/register", "alice", "another password").await;
    assert_eq!(reply.status, StatusCode::CONFLICT);
    assert!(reply.json["error"].is_string());
    // The original password still works: the duplicate overwrote nothing.
    let reply = post(&app, "/auth/login", "alice", "correct horse").await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn concurrent_registrations_of_one_name_create_exactly_one_user() {
    let Some(redis) = TestRedis::start().await else { return };
    let (_cache, app) = setup(&redis).await;

    let attempts: Vec<_> = (0..8)
        .map(|i| {
            let app = app.clone();
            tokio::spawn(async move { post(&app, "/auth/register", "bob", &format!("password-{i}")).await.status })
        })
        .collect();
    let mut created = 0;
    let mut conflicts = 0;
    for attempt in attempts {
        match attempt.await.expect("join") {
            StatusCode::CREATED => created += 1,
            StatusCode::CONFLICT => conflicts += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((created, conflicts), (1, 7));
}

#[tokio::test]
async fn outage_answers_503_and_writes_nothing() {
    let Some(redis) = TestRedis::start().await else { return };
    let (cache, app) = setup(&redis).await;
    let reply = post(&app, "/auth/register", "carol", "password-carol").await;
    assert_eq!(reply.status, StatusCode::CREATED);

    redis.stop().await;

    // The first request discovers the outage (bounded by the op timeout),
    // the next ones fail fast because the breaker is open.
    for _ in 0..3 {
        let started = Instant::now();
        let reply = post(&app, "/auth/register", "ghost", "password-ghost").await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply.json["error"], "user store unavailable, retry later");
        assert!(reply.retry_after.is_some());
        assert!(started.elapsed() < Duration::from_millis(600), "{:?}", started.elapsed());
    }
    // Never a false 401 during an outage.
    let reply = post(&app, "/auth/login", "carol", "password-carol").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(reply.retry_after.is_some());

    redis.restart().await;
    wait_for_up(&cache).await;

    // `docker stop` also drops Redis's (unpersisted) data; what this checks is
    // that nothing from the outage was kept aside and written on recovery.
    assert!(!raw_exists(&redis, "herdsman:user:ghost").await);
    let reply = post(&app, "/auth/login", "ghost", "password-ghost").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    // Registering works again once Redis is back.
    let reply = post(&app, "/auth/register", "ghost", "password-ghost").await;
    assert_eq!(reply.status, StatusCode::CREATED);
    let reply = post(&app, "/auth/login", "ghost", "password-ghost").await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn hanging_store_answers_503_not_401() {
    let Some(redis) = TestRedis::start().await else { return };
    let (cache, app) = setup(&redis).await;
    let reply = post(&app, "/auth/register", "dave", "password-dave").await;
    assert_eq!(reply.status, StatusCode::CREATED);

    redis.pause().await;
    for _ in 0..3 {
        let started = Instant::now();
        let reply = post(&app, "/auth/login", "dave", "password-dave").await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(reply.retry_after.is_some());
        assert!(started.elapsed() < Duration::from_millis(600), "{:?}", started.elapsed());
    }
    redis.unpause().await;
    wait_for_up(&cache).await;
    let reply = post(&app, "/auth/login", "dave", "password-dave").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json);
}

#[tokio::test]
async fn unknown_users_cost_as_much_as_known_ones() {
    let Some(redis) = TestRedis::start().await else { return };
    let cache =
        Cache::new(CacheConfig { redis_url: Some(redis.url.clone()), ..CacheConfig::default() }).expect("valid url");
    cache.connect().await.expect("connect");
    // A cost where bcrypt dominates a Redis round trip by far.
    let app = routes(&cache, Hasher::new(1, 8).expect("hasher"), 8);
    let reply = post(&app, "/auth/register", "erin", "password-erin").await;
    assert_eq!(reply.status, StatusCode::CREATED);

    let mut known = Vec::new();
    let mut unknown = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let reply = post(&app, "/auth/login", "erin", "wrong-password").await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
        known.push(started.elapsed());
        let started = Instant::now();
        let reply = post(&app, "/auth/login", "nobody-here", "wrong-password").await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
        unknown.push(started.elapsed());
    }
    known.sort();
    unknown.sort();
    let (known, unknown) = (known[2].as_secs_f64(), unknown[2].as_secs_f64());
    eprintln!("median login: known user {known:.4}s, unknown user {unknown:.4}s");
    let ratio = unknown / known;
    assert!((0.5..2.0).contains(&ratio), "unknown/known = {ratio:.2}");
}

#[tokio::test]
async fn the_longest_password_registers_and_logs_in_and_wrong_ones_of_any_shape_are_401() {
    let Some(redis) = TestRedis::start().await else { return };
    let (_cache, app) = setup(&redis).await;
    let longest = "p".repeat(72);
    let created = post(&app, "/auth/register", "longest", &longest).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.json);
    assert_eq!(post(&app, "/auth/login", "longest", &longest).await.status, StatusCode::OK);
    // Wrong credentials are 401 whatever their shape: short, too long, a name that cannot exist.
    for (user, password) in [("longest", "short"), ("longest", &*"p".repeat(73)), ("no such/user", "password123")] {
        let refused = post(&app, "/auth/login", user, password).await;
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{user:?}: {}", refused.json);
    }
}

#[tokio::test]
async fn a_bcrypt_cost_change_rehashes_at_the_next_login() {
    let Some(redis) = TestRedis::start().await else { return };
    let (cache, app) = setup(&redis).await;
    assert_eq!(post(&app, "/auth/register", "carol", "password123").await.status, StatusCode::CREATED);
    let stored = || async {
        let raw = cache.durable().expect("store").get("herdsman:user:carol").await.expect("get").expect("record");
        let record: serde_json::Value = serde_json::from_slice(&raw).expect("JSON record");
        record["password_hash"].as_str().expect("a hash").to_string()
    };
    assert!(stored().await.starts_with("$2b$04$"));
    // The same store, served with a higher cost.
    let app5 = routes(&cache, Hasher::new(1, 8).expect("hasher"), 5);
    assert_eq!(post(&app5, "/auth/login", "carol", "password123").await.status, StatusCode::OK);
    assert!(stored().await.starts_with("$2b$05$"), "rehashed at cost 5");
    assert_eq!(post(&app5, "/auth/login", "carol", "password123").await.status, StatusCode::OK);
    assert_eq!(post(&app, "/auth/login", "carol", "wrong-password").await.status, StatusCode::UNAUTHORIZED);
}
