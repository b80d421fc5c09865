//! The real binary against a real Redis (testcontainers): a worker serves from its first
//! millisecond whatever Redis does, and a Redis that stops or hangs mid-load costs no request.
//!
//! Image: `HERDSMAN_REDIS_IMAGE` (default `redis:7`); see `tests/support/redis.rs`.

#[path = "support/redis.rs"]
mod redis_support;
#[path = "support/stored_value.rs"]
mod stored_value;
mod support;

use std::time::{Duration, Instant};

use redis_support::TestRedis;
use support::start_with_health as start;

const SECS: fn(u64) -> Duration = Duration::from_secs;

async fn health(server: &support::Herdsman) -> serde_json::Value {
    support::health_details(&reqwest::Client::new(), server).await
}

async fn wait_for_redis_status(server: &support::Herdsman, status: &str, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let h = health(server).await;
        if h["checks"]["redis"]["status"] == status {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "redis status never became {status} within {within:?}: {h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_redis_does_not_delay_the_first_health_answer() {
    let Some(redis) = TestRedis::start().await else { return };
    redis.pause().await;
    // Long Redis timeouts, so that an answer that waited on Redis would be obvious.
    let spawned = Instant::now();
    let server = start(&[
        ("WEB_CONCURRENCY", "2"),
        ("REDIS_URL", &redis.url),
        ("HERDSMAN_REDIS_TIMEOUT", "3"),
        ("STARTUP_OPERATION_TIMEOUT", "5"),
    ]);
    let h = loop {
        let details = reqwest::Client::new().get(server.url("/health")).bearer_auth(support::HEALTH_TOKEN);
        if let Ok(response) = details.send().await {
            break response.json::<serde_json::Value>().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let first_answer = spawned.elapsed();
    assert!(first_answer < SECS(1), "first /health after {first_answer:?}, Redis timeout is 3 s");
    assert_eq!(h["checks"]["redis"]["status"], "connecting", "{h}");
    assert_eq!(h["status"], "degraded", "{h}");
    // Readiness does not wait for Redis unless told to.
    assert_eq!(reqwest::get(server.url("/ready")).await.unwrap().status(), 200);
    redis.unpause().await;
    wait_for_redis_status(&server, "up", SECS(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_required_holds_readiness_until_redis_answers() {
    let Some(redis) = TestRedis::start().await else { return };
    redis.pause().await;
    let server = start(&[("WEB_CONCURRENCY", "1"), ("REDIS_URL", &redis.url), ("REDIS_REQUIRED", "true")]);
    let ready = reqwest::get(server.url("/ready")).await.unwrap();
    assert_eq!(ready.status(), 503);
    // Anonymous: not ready, and no reason (it would say what the worker is waiting for).
    assert_eq!(ready.json::<serde_json::Value>().await.unwrap(), serde_json::json!({ "ready": false }));
    let ready = reqwest::Client::new().get(server.url("/ready")).bearer_auth(support::HEALTH_TOKEN).send();
    let body: serde_json::Value = ready.await.unwrap().json().await.unwrap();
    assert!(body["reason"].as_str().unwrap().contains("Redis"), "{body}");
    // Liveness is not readiness: the worker is alive.
    assert_eq!(reqwest::get(server.url("/live")).await.unwrap().status(), 200);
    redis.unpause().await;
    let deadline = Instant::now() + SECS(10);
    while reqwest::get(server.url("/ready")).await.unwrap().status() != 200 {
        assert!(Instant::now() < deadline, "never ready after Redis came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_values_go_through_redis_and_a_plain_client_sees_them() {
    let Some(redis) = TestRedis::start().await else { return };
    let server = start(&[("WEB_CONCURRENCY", "2"), ("REDIS_URL", &redis.url)]);
    server.wait_for_nth_log("redis connected", 2, SECS(10));
    let token = support::register_and_login(&reqwest::Client::new(), &server, "greeter").await;
    let client = support::client_with_token(&token);
    let put = client.put(server.url("/cache/greeting?ttl=60")).body("hello from herdsman").send().await.unwrap();
    assert_eq!(put.status(), 204);
    let mut conn = redis.client().await;
    let raw = redis::cmd("GET").arg("herdsman:cache:user:greeter/greeting").query_async(&mut conn).await.unwrap();
    assert_eq!(stored_value::stored_value(raw).as_deref(), Some(&b"hello from herdsman"[..]));
    let ttl: i64 = redis::cmd("TTL").arg("herdsman:cache:user:greeter/greeting").query_async(&mut conn).await.unwrap();
    assert!((1..=60).contains(&ttl), "ttl {ttl}");
    // Every worker reads it from Redis, whichever one wrote it.
    for _ in 0..10 {
        let got = support::client_with_token(&token).get(server.url("/cache/greeting")).send().await.unwrap();
        assert_eq!(got.headers()["x-cache-tier"], "redis");
        assert_eq!(got.text().await.unwrap(), "hello from herdsman");
    }
    assert_eq!(client.delete(server.url("/cache/greeting")).send().await.unwrap().status(), 204);
    assert_eq!(client.get(server.url("/cache/greeting")).send().await.unwrap().status(), 404);
}

/// Cache traffic (writes and reads of a few keys) while Redis goes away and comes back.
/// Returns the load's report; every request got an answer, fast.
async fn cache_load_through(
    server: &support::Herdsman,
    outage: impl std::future::Future<Output = ()>,
    recover: impl std::future::Future<Output = ()>,
) -> support::LoadReport {
    // Both workers connected: a write to a worker still connecting would live in its memory only.
    server.wait_for_nth_log("redis connected", 2, SECS(10));
    let token = support::register_and_login(&reqwest::Client::new(), server, "loader").await;
    let client = support::client_with_token(&token);
    assert_eq!(client.put(server.url("/cache/hot")).body("v").send().await.unwrap().status(), 204);
    // Readers on several connections, so every worker reads (and keeps a copy of) the key, and
    // has verified the session (which it then trusts through the outage, see src/sessions.rs).
    let get_load = support::Load::start_authorized(server.url("/cache/hot"), 4, &token);
    tokio::time::sleep(Duration::from_millis(300)).await;

    outage.await;
    let fell_back_in = wait_for_redis_status(server, "fallback", SECS(5)).await;
    // Writes keep working too, from memory.
    for i in 0..20 {
        let put = client.put(server.url("/cache/hot")).body(format!("v{i}")).send().await.unwrap();
        assert_eq!(put.status(), 204);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let recovering = Instant::now();
    recover.await;
    let back_in = wait_for_redis_status(server, "up", SECS(5)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = get_load.finish().await;
    // The session lives in Redis: it is trusted through the outage, and only a Redis that comes
    // back without its data (a restart without persistence) can end it.
    if let Some(first) = report.first_unauthorized_at {
        assert!(first >= recovering, "a 401 during the outage: {report:?}");
    }

    assert_eq!(report.failed, 0, "failed cache requests: {:?}", &report.errors[..report.errors.len().min(5)]);
    assert!(report.ok > 50, "the load ran: {report:?}");
    // The worst request waited at most about one Redis operation timeout (0.25 s) plus slack.
    assert!(report.max_latency < Duration::from_millis(800), "slowest request {:?}", report.max_latency);
    eprintln!("fallback seen after {fell_back_in:?}, back on Redis {back_in:?} after recovery, {report:?}");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_mid_load_costs_no_request_and_is_used_again_when_back() {
    let Some(redis) = TestRedis::start().await else { return };
    let server = start(&[("WEB_CONCURRENCY", "2"), ("REDIS_URL", &redis.url)]);
    let report = cache_load_through(&server, redis.stop(), redis.restart()).await;
    // This Redis runs without persistence: it restarts empty, so a reader may miss `hot` between
    // the restart and the replay of the outage writes. A miss is an answer, not a failure. The
    // session is gone with the data (the worker sees Redis say so): 401s after the restart are
    // the right answer too.
    eprintln!("{} misses and {} 401s after the restart", report.not_found, report.unauthorized);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_mid_load_costs_no_request_and_is_used_again_when_back() {
    let Some(redis) = TestRedis::start().await else { return };
    let server = start(&[("WEB_CONCURRENCY", "2"), ("REDIS_URL", &redis.url)]);
    let report = cache_load_through(&server, redis.pause(), redis.unpause()).await;
    // A paused Redis keeps its data: the hot key and the session are served throughout.
    assert_eq!(report.not_found, 0, "{report:?}");
    assert_eq!(report.unauthorized, 0, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_registered_through_one_worker_logs_in_through_any_other() {
    let Some(redis) = TestRedis::start().await else { return };
    let env = [("WEB_CONCURRENCY", "2"), ("REDIS_URL", redis.url.as_str())];
    // Two masters on one Redis: a user registered in one process must be known in every other.
    let first = start(&env);
    let second = start(&env);
    first.wait_for_nth_log("redis connected", 2, SECS(10));
    second.wait_for_nth_log("redis connected", 2, SECS(10));
    let client = reqwest::Client::new();
    let credentials = serde_json::json!({"username": "ada", "password": "correct horse battery"});
    let registered = client.post(first.url("/auth/register")).json(&credentials).send().await.unwrap();
    assert_eq!(registered.status(), 201);
    for server in [&first, &second, &first, &second] {
        // A fresh connection each time, so both workers of each master get their turn.
        let login = reqwest::Client::new().post(server.url("/auth/login")).json(&credentials).send().await.unwrap();
        assert_eq!(login.status(), 200);
        let token: serde_json::Value = login.json().await.unwrap();
        assert_eq!(token["token"].as_str().unwrap().len(), 64);
    }
    let wrong = serde_json::json!({"username": "ada", "password": "wrong horse battery"});
    assert_eq!(client.post(second.url("/auth/login")).json(&wrong).send().await.unwrap().status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_during_a_redis_outage_answers_503_and_writes_nothing() {
    let Some(redis) = TestRedis::start().await else { return };
    let server = start(&[("WEB_CONCURRENCY", "2"), ("REDIS_URL", &redis.url)]);
    server.wait_for_nth_log("redis connected", 2, SECS(10));
    let client = reqwest::Client::new();
    let credentials = serde_json::json!({"username": "grace", "password": "a long enough password"});
    redis.pause().await;
    for path in ["/auth/register", "/auth/login", "/auth/register"] {
        let response = client.post(server.url(path)).json(&credentials).send().await.unwrap();
        assert_eq!(response.status(), 503, "{path} during the outage");
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("unavailable"), "{body}");
    }
    redis.unpause().await;
    wait_for_redis_status(&server, "up", SECS(10)).await;
    let mut conn = redis.client().await;
    let users: Vec<String> = redis::cmd("KEYS").arg("herdsman:user:*").query_async(&mut conn).await.unwrap();
    // A paused Redis may still run a write it received before the pause; nothing was sent here
    // after the breaker opened, so either no user exists or one whole record does.
    for key in &users {
        let record: String = redis::cmd("GET").arg(key).query_async(&mut conn).await.unwrap();
        assert!(record.contains("password_hash"), "a whole record: {record}");
    }
    // Registration works again once every worker sees Redis back (each probes on its own, within
    // about 2.5 s); until then it answers 503, never anything else.
    let deadline = Instant::now() + SECS(5);
    loop {
        let again = reqwest::Client::new().post(server.url("/auth/register")).json(&credentials).send().await.unwrap();
        match again.status().as_u16() {
            201 | 409 => break,
            503 if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("registration after the outage answered {other}"),
        }
    }
}
