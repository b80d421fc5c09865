//! Sessions, per-user namespaces, quotas and the login throttle against a real Redis
//! (testcontainers): a worker's router in-process (the same `Services` a worker builds), and the
//! real binary where sockets matter (client addresses, bcrypt cost, several workers).
//!
//! Image: `HERDSMAN_REDIS_IMAGE` (default `redis:7`); see `tests/support/redis.rs`.

#[path = "support/redis.rs"]
mod redis_support;
#[path = "support/slow_proxy.rs"]
mod slow_proxy;
#[path = "support/stored_value.rs"]
mod stored_value;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use herdsman::cache::{Cache, CacheConfig, RedisStatus};
use herdsman::hasher::Hasher;
use herdsman::tracker::RequestTracker;
use herdsman::{http, Config, Services};
use http_body_util::BodyExt;
use redis_support::TestRedis;
use slow_proxy::SlowProxy;
use tower::ServiceExt;

/// A worker's services and its cache and auth routes, on `redis`, with `tune` applied to the
/// configuration.
async fn worker(redis: &TestRedis, tune: impl FnOnce(&mut Config)) -> (Services, Router) {
    // A deadline floor of 200 ms, not 20: on a machine busy with the other tests a round trip
    // over 20 ms would open the breaker now and then, and a fallback changes what these tests
    // assert (quotas unchecked, throttles per worker). Outages here are refused connections.
    let mut config = Config {
        redis_url: Some(redis.url.clone()),
        bcrypt_cost: 4,
        redis_min_timeout: Duration::from_millis(200),
        ..Config::default()
    };
    tune(&mut config);
    let cache = Cache::new(CacheConfig::from_config(&config)).expect("valid url");
    cache.connect().await.expect("connect");
    let hasher = Hasher::new(2, 64).expect("hasher");
    let services = Services::assemble(Arc::new(config), cache, hasher, RequestTracker::new(None, || {}));
    let router = Router::new().merge(http::cache_routes(&services)).merge(http::auth_routes(&services));
    (services, router)
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {:?}", String::from_utf8_lossy(&self.body)))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

async fn send(app: &Router, method: Method, uri: &str, token: Option<&str>, body: impl Into<Body>) -> Reply {
    let mut request = Request::builder().method(method).uri(uri).header(header::CONTENT_TYPE, "application/json");
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = app.clone().oneshot(request.body(body.into()).expect("request")).await.expect("infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.expect("body").to_bytes().to_vec();
    Reply { status, headers, body }
}

/// Registers and logs `username` in through the routes; returns the token.
async fn login(app: &Router, username: &str) -> String {
    let credentials = serde_json::json!({ "username": username, "password": "correct horse" }).to_string();
    let reply = send(app, Method::POST, "/auth/register", None, credentials.clone()).await;
    assert!(matches!(reply.status.as_u16(), 201 | 409), "{}", reply.json());
    let reply = send(app, Method::POST, "/auth/login", None, credentials).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    reply.json()["token"].as_str().expect("token").to_string()
}

fn assert_401_bearer(reply: &Reply, what: &str) {
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{what}");
    assert_eq!(reply.header("www-authenticate"), Some("Bearer"), "{what}");
    assert!(reply.json()["error"].as_str().is_some_and(|m| !m.is_empty()), "{what}");
}

async fn raw_keys_and_values(redis: &TestRedis) -> Vec<(String, String)> {
    let mut conn = redis.client().await;
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await.expect("KEYS");
    let mut out = Vec::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE").arg(&key).query_async(&mut conn).await.expect("TYPE");
        let value = match kind.as_str() {
            "string" => redis::cmd("GET").arg(&key).query_async::<Vec<u8>>(&mut conn).await.expect("GET"),
            _ => {
                let fields: Vec<Vec<u8>> =
                    redis::cmd("HGETALL").arg(&key).query_async(&mut conn).await.expect("HGETALL");
                fields.concat()
            }
        };
        out.push((key, String::from_utf8_lossy(&value).into_owned()));
    }
    out
}

#[tokio::test]
async fn a_session_opens_the_cache_and_only_its_owners_namespace() {
    let Some(redis) = TestRedis::start().await else { return };
    let (_services, app) = worker(&redis, |_| {}).await;
    let alice = login(&app, "alice").await;
    let bob = login(&app, "bob").await;

    // No token, a malformed one, an unknown one: 401 with the challenge, before anything else.
    assert_401_bearer(&send(&app, Method::PUT, "/cache/k", None, "v").await, "no token");
    assert_401_bearer(&send(&app, Method::GET, "/cache/k", Some("not-a-token"), "").await, "malformed");
    assert_401_bearer(&send(&app, Method::GET, "/cache/k", Some(&"0".repeat(64)), "").await, "unknown");

    let reply = send(&app, Method::PUT, "/cache/k?ttl=60", Some(&alice), "alice's value").await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert_eq!(reply.header("x-cache-tier"), Some("redis"));
    let reply = send(&app, Method::GET, "/cache/k", Some(&alice), "").await;
    assert_eq!((reply.status, reply.body.as_slice()), (StatusCode::OK, &b"alice's value"[..]));
    let keys: Vec<String> = raw_keys_and_values(&redis).await.into_iter().map(|(k, _)| k).collect();
    assert!(keys.contains(&"herdsman:cache:user:alice/k".to_string()), "{keys:?}");

    // Bob has a namespace of his own: the same key is not there, and no crafted key reaches Alice's.
    for uri in ["/cache/k", "/cache/..%2Falice%2Fk", "/cache/%2E%2E%2Falice%2Fk", "/cache/alice%2Fk"] {
        let reply = send(&app, Method::GET, uri, Some(&bob), "").await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{uri}");
    }
    assert_eq!(send(&app, Method::DELETE, "/cache/k", Some(&bob), "").await.status, StatusCode::NO_CONTENT);
    assert_eq!(send(&app, Method::GET, "/cache/k", Some(&alice), "").await.status, StatusCode::OK);

    let me = send(&app, Method::GET, "/auth/me", Some(&alice), "").await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.json()["username"], "alice");
    assert!((1..=3600).contains(&me.json()["expires_in"].as_u64().expect("expires_in")), "{}", me.json());
    assert_401_bearer(&send(&app, Method::GET, "/auth/me", None, "").await, "me without a token");

    // Logout revokes exactly the token presented.
    assert_eq!(send(&app, Method::POST, "/auth/logout", Some(&alice), "").await.status, StatusCode::NO_CONTENT);
    assert_401_bearer(&send(&app, Method::GET, "/cache/k", Some(&alice), "").await, "logged-out token");
    assert_401_bearer(&send(&app, Method::GET, "/auth/me", Some(&alice), "").await, "me, logged out");
    assert_401_bearer(&send(&app, Method::POST, "/auth/logout", Some(&alice), "").await, "logout twice");
    assert_eq!(send(&app, Method::GET, "/auth/me", Some(&bob), "").await.status, StatusCode::OK);
}

#[tokio::test]
async fn tokens_are_stored_hashed_with_the_session_ttl_and_expire() {
    let Some(redis) = TestRedis::start().await else { return };
    let (_services, app) = worker(&redis, |c| c.session_ttl = Duration::from_secs(2)).await;
    let token = login(&app, "carol").await;
    assert_eq!(token.len(), 64);

    let stored = raw_keys_and_values(&redis).await;
    for (key, value) in &stored {
        assert!(!key.contains(&token) && !value.contains(&token), "the token in clear at {key}");
    }
    let sessions: Vec<&String> = stored.iter().map(|(k, _)| k).filter(|k| k.starts_with("herdsman:session:")).collect();
    assert_eq!(sessions.len(), 1, "{stored:?}");
    let mut conn = redis.client().await;
    let pttl: i64 = redis::cmd("PTTL").arg(sessions[0]).query_async(&mut conn).await.expect("PTTL");
    assert!((1..=2000).contains(&pttl), "pttl {pttl}");

    assert_eq!(send(&app, Method::GET, "/auth/me", Some(&token), "").await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_401_bearer(&send(&app, Method::GET, "/auth/me", Some(&token), "").await, "expired");
}

#[tokio::test]
async fn the_cache_limits_hold_for_a_logged_in_user() {
    let Some(redis) = TestRedis::start().await else { return };
    let (_services, app) = worker(&redis, |c| {
        c.max_body_bytes = 1024;
        c.cache_max_ttl = Duration::from_secs(60);
    })
    .await;
    let token = login(&app, "dave").await;
    for bad in ["0", "-1", "abc", "1.5", "", "61", "9300000000000000000"] {
        let reply = send(&app, Method::PUT, &format!("/cache/t?ttl={bad}"), Some(&token), "v").await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "ttl={bad}");
        assert!(reply.json()["error"].as_str().expect("error").contains("ttl"), "ttl={bad}");
    }
    let long_key = format!("/cache/{}", "k".repeat(513));
    assert_eq!(send(&app, Method::PUT, &long_key, Some(&token), "v").await.status, StatusCode::BAD_REQUEST);
    let reply = send(&app, Method::PUT, "/cache/big", Some(&token), vec![b'x'; 1025]).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        send(&app, Method::PUT, "/cache/fits", Some(&token), vec![b'x'; 1024]).await.status,
        StatusCode::NO_CONTENT
    );
}

#[tokio::test]
async fn quotas_of_keys_and_bytes_are_refused_with_403_naming_them() {
    let Some(redis) = TestRedis::start().await else { return };
    let (_services, app) = worker(&redis, |c| {
        c.user_max_keys = 3;
        c.user_max_bytes = 1000;
    })
    .await;
    let erin = login(&app, "erin").await;
    let frank = login(&app, "frank").await;
    for key in ["a", "b", "c"] {
        assert_eq!(
            send(&app, Method::PUT, &format!("/cache/{key}"), Some(&erin), "v").await.status,
            StatusCode::NO_CONTENT
        );
    }
    let reply = send(&app, Method::PUT, "/cache/d", Some(&erin), "v").await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert!(reply.json()["error"].as_str().expect("error").contains("HERDSMAN_USER_MAX_KEYS"), "{}", reply.json());
    // Rewriting a key she holds is not a new key; deleting one makes room.
    assert_eq!(send(&app, Method::PUT, "/cache/a", Some(&erin), "w").await.status, StatusCode::NO_CONTENT);
    assert_eq!(send(&app, Method::DELETE, "/cache/b", Some(&erin), "").await.status, StatusCode::NO_CONTENT);
    assert_eq!(send(&app, Method::PUT, "/cache/d", Some(&erin), "v").await.status, StatusCode::NO_CONTENT);

    // Bytes: 600 + 600 > 1000, whatever the key count.
    assert_eq!(send(&app, Method::PUT, "/cache/x", Some(&frank), vec![1u8; 600]).await.status, StatusCode::NO_CONTENT);
    let reply = send(&app, Method::PUT, "/cache/y", Some(&frank), vec![1u8; 600]).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert!(reply.json()["error"].as_str().expect("error").contains("HERDSMAN_USER_MAX_BYTES"), "{}", reply.json());
    // A refused write stores nothing, in Redis or in memory.
    assert_eq!(send(&app, Method::GET, "/cache/y", Some(&frank), "").await.status, StatusCode::NOT_FOUND);
    let reply = send(&app, Method::PUT, "/cache/x", Some(&frank), vec![2u8; 2000]).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    let reply = send(&app, Method::GET, "/cache/x", Some(&frank), "").await;
    assert_eq!((reply.status, reply.body.as_slice()), (StatusCode::OK, &[1u8; 600][..]), "the older value stays");
    // Each user's quota is their own: Erin's keys do not count for Frank.
    assert_eq!(send(&app, Method::PUT, "/cache/y", Some(&frank), vec![1u8; 300]).await.status, StatusCode::NO_CONTENT);
    // An expired value no longer counts.
    assert_eq!(
        send(&app, Method::PUT, "/cache/x?ttl=1", Some(&frank), vec![1u8; 600]).await.status,
        StatusCode::NO_CONTENT
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(send(&app, Method::PUT, "/cache/z", Some(&frank), vec![1u8; 600]).await.status, StatusCode::NO_CONTENT);
}

async fn wait_for(cache: &Cache, up: bool) {
    let started = Instant::now();
    while (cache.status() == RedisStatus::Up) != up {
        assert!(started.elapsed() < Duration::from_secs(10), "still {:?}", cache.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn in_an_outage_a_known_session_keeps_working_and_an_unknown_one_is_503() {
    let Some(redis) = TestRedis::start().await else { return };
    let (services, app) = worker(&redis, |_| {}).await;
    // Another worker of the same deployment: this one has never seen its sessions.
    let (_other, other_app) = worker(&redis, |_| {}).await;
    let known = login(&app, "grace").await;
    let unseen = login(&other_app, "heidi").await;
    assert_eq!(send(&app, Method::PUT, "/cache/k", Some(&known), "before").await.status, StatusCode::NO_CONTENT);

    redis.stop().await;
    // The first request that meets the outage trips the breaker and is still answered.
    let started = Instant::now();
    let reply = send(&app, Method::PUT, "/cache/k", Some(&known), "during").await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{:?}", String::from_utf8_lossy(&reply.body));
    assert_eq!(reply.header("x-cache-tier"), Some("memory"));
    wait_for(&services.cache, false).await;
    let reply = send(&app, Method::GET, "/cache/k", Some(&known), "").await;
    assert_eq!((reply.status, reply.body.as_slice()), (StatusCode::OK, &b"during"[..]));
    assert_eq!(send(&app, Method::GET, "/auth/me", Some(&known), "").await.json()["username"], "grace");
    assert!(started.elapsed() < Duration::from_secs(3), "an outage must not make requests wait");

    // A token this worker never verified: nobody can tell, so 503 and retry, not 401.
    for token in [unseen.as_str(), &"0".repeat(64)] {
        let reply = send(&app, Method::GET, "/cache/k", Some(token), "").await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(reply.header("retry-after").is_some());
    }
    // Logging in needs the user store.
    let credentials = serde_json::json!({ "username": "grace", "password": "correct horse" }).to_string();
    let reply = send(&app, Method::POST, "/auth/login", None, credentials).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    // A logout here ends the session here at once, even though Redis cannot hear it (503: the
    // client must retry for the other workers' sake).
    let reply = send(&app, Method::POST, "/auth/logout", Some(&known), "").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_401_bearer(&send(&app, Method::GET, "/auth/me", Some(&known), "").await, "logged out here in an outage");
    drop(redis);
}

#[tokio::test]
async fn a_write_the_outage_budget_cannot_hold_is_refused_with_507_not_acknowledged() {
    let Some(redis) = TestRedis::start().await else { return };
    let (services, app) = worker(&redis, |c| {
        c.cache_max_bytes = 64 << 10;
        c.user_max_bytes = 1 << 30;
        c.user_max_keys = 1 << 20;
    })
    .await;
    let token = login(&app, "ivan").await;
    // This worker holds writes in an outage only for users whose usage it has seen lately.
    assert_eq!(send(&app, Method::PUT, "/cache/seen", Some(&token), "v").await.status, StatusCode::NO_CONTENT);
    redis.stop().await;
    assert_eq!(send(&app, Method::PUT, "/cache/first", Some(&token), "v").await.status, StatusCode::NO_CONTENT);
    wait_for(&services.cache, false).await;
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    for i in 0..20 {
        let reply = send(&app, Method::PUT, &format!("/cache/v{i}"), Some(&token), vec![7u8; 8 << 10]).await;
        match reply.status {
            StatusCode::NO_CONTENT => acknowledged.push(i),
            StatusCode::INSUFFICIENT_STORAGE => {
                refused += 1;
                assert!(reply.header("retry-after").is_some());
                assert!(reply.json()["error"].as_str().expect("error").contains("not kept"));
            }
            other => panic!("v{i}: {other}"),
        }
    }
    assert!(refused > 0, "160 KiB cannot fit a 64 KiB replay budget");
    assert!(!acknowledged.is_empty());

    // Everything acknowledged reaches Redis once it is back.
    redis.restart().await;
    wait_for(&services.cache, true).await;
    let mut conn = redis.client().await;
    for i in acknowledged {
        let key = format!("herdsman:cache:user:ivan/v{i}");
        let value = stored_value::stored_value(redis::cmd("GET").arg(&key).query_async(&mut conn).await.expect("GET"));
        assert_eq!(value.map(|v| v.len()), Some(8 << 10), "{key} was acknowledged");
    }
}

/// How many `cmd` commands Redis has run (`INFO commandstats`).
async fn redis_calls(redis: &TestRedis, cmd: &str) -> u64 {
    let mut conn = redis.client().await;
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await.expect("INFO");
    let prefix = format!("cmdstat_{cmd}:calls=");
    info.lines().find_map(|line| line.strip_prefix(&prefix)?.split(',').next()?.parse().ok()).unwrap_or(0)
}

/// Polls `done` every 5 ms for up to `within`; whether it came true.
async fn eventually(within: Duration, mut done: impl AsyncFnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < within {
        if done().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    done().await
}

/// A deadline floor far above a round trip: no false alarm on a busy machine, where these tests
/// are not about outages.
fn no_false_alarms(c: &mut Config) {
    c.redis_timeout = Duration::from_secs(1);
    c.redis_min_timeout = Duration::from_millis(500);
}

#[tokio::test]
async fn a_verified_session_is_trusted_while_revocations_are_heard_and_a_logout_anywhere_ends_it() {
    let Some(redis) = TestRedis::start().await else { return };
    let tune = no_false_alarms;
    let (here_services, here) = worker(&redis, tune).await;
    let (elsewhere_services, elsewhere) = worker(&redis, tune).await;
    let token = login(&here, "kate").await;
    for services in [&here_services, &elsewhere_services] {
        services.sessions.listen();
        let live = eventually(Duration::from_secs(10), async || services.sessions.hears_revocations()).await;
        assert!(live, "the revocation subscription is live");
    }

    // `elsewhere` verifies the session in Redis once (GET + PTTL), then trusts it: fifty
    // more requests ask Redis nothing (one background re-check at most).
    assert_eq!(send(&elsewhere, Method::GET, "/auth/me", Some(&token), "").await.status, StatusCode::OK);
    let before = redis_calls(&redis, "pttl").await;
    for _ in 0..50 {
        assert_eq!(send(&elsewhere, Method::GET, "/auth/me", Some(&token), "").await.status, StatusCode::OK);
    }
    let asked = redis_calls(&redis, "pttl").await - before;
    assert!(asked <= 1, "a trusted session cost {asked} session round trips");

    // Logged out through `here`: refused there at once, and `elsewhere` hears it on the channel.
    assert_eq!(send(&here, Method::POST, "/auth/logout", Some(&token), "").await.status, StatusCode::NO_CONTENT);
    assert_401_bearer(&send(&here, Method::GET, "/cache/k", Some(&token), "").await, "logged out here");
    let heard = eventually(Duration::from_millis(100), async || {
        send(&elsewhere, Method::GET, "/auth/me", Some(&token), "").await.status == StatusCode::UNAUTHORIZED
    });
    assert!(heard.await, "elsewhere refuses it within 100 ms of the logout");
    assert_401_bearer(&send(&elsewhere, Method::GET, "/cache/k", Some(&token), "").await, "revoked elsewhere");
    let sessions = raw_keys_and_values(&redis).await.into_iter().filter(|(k, _)| k.starts_with("herdsman:session:"));
    assert_eq!(sessions.count(), 0, "the logout reached Redis");
}

/// A subscription that drops and comes back does not bring back the trust of before: a session
/// revoked in the gap (here: its key deleted in Redis by hand, which publishes nothing) is
/// refused once the worker hears revocations again, because what it verified before the gap
/// belongs to an earlier epoch and is checked in Redis again.
#[tokio::test]
async fn after_the_subscription_comes_back_nothing_verified_before_the_gap_is_trusted() {
    let Some(redis) = TestRedis::start().await else { return };
    let tune = no_false_alarms;
    let (services, app) = worker(&redis, tune).await;
    services.sessions.listen();
    assert!(eventually(Duration::from_secs(10), async || services.sessions.hears_revocations()).await);
    let token = login(&app, "nina").await;
    assert_eq!(send(&app, Method::GET, "/auth/me", Some(&token), "").await.status, StatusCode::OK);

    let mut conn = redis.client().await;
    let killed: i64 =
        redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query_async(&mut conn).await.expect("CLIENT KILL");
    assert_eq!(killed, 1, "the worker's one subscription");
    assert!(eventually(Duration::from_secs(5), async || !services.sessions.hears_revocations()).await);
    let keys: Vec<String> = redis::cmd("KEYS").arg("herdsman:session:*").query_async(&mut conn).await.expect("KEYS");
    let _: i64 = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await.expect("DEL");
    assert!(eventually(Duration::from_secs(10), async || services.sessions.hears_revocations()).await, "back");
    assert_401_bearer(&send(&app, Method::GET, "/auth/me", Some(&token), "").await, "revoked in the gap");
}

/// Without a live subscription nothing is trusted locally: every request asks Redis, so a
/// revocation published while the worker could not hear it is not missed.
#[tokio::test]
async fn a_worker_that_cannot_hear_revocations_asks_redis_every_time() {
    let Some(redis) = TestRedis::start().await else { return };
    let tune = no_false_alarms;
    let (_here, here) = worker(&redis, tune).await;
    // Built by hand, never listening: its subscription never becomes live.
    let mut config = Config { redis_url: Some(redis.url.clone()), ..Config::default() };
    tune(&mut config);
    let cache = Cache::new(CacheConfig::from_config(&config)).expect("valid url");
    cache.connect().await.expect("connect");
    let deaf = herdsman::sessions::Sessions::new(cache.durable(), config.session_ttl);
    let token = login(&here, "lena").await;
    let before = redis_calls(&redis, "pttl").await;
    for _ in 0..5 {
        assert!(deaf.verify(&token).await.is_ok());
    }
    assert_eq!(redis_calls(&redis, "pttl").await - before, 5, "every request asks Redis");
    assert!(!deaf.hears_revocations());
    assert_eq!(send(&here, Method::POST, "/auth/logout", Some(&token), "").await.status, StatusCode::NO_CONTENT);
    assert!(matches!(deaf.verify(&token).await, Err(herdsman::sessions::SessionError::Invalid)));
}

#[tokio::test]
async fn with_no_local_trust_a_logout_elsewhere_takes_effect_at_once() {
    let Some(redis) = TestRedis::start().await else { return };
    let tune = |c: &mut Config| {
        no_false_alarms(c);
        c.session_recheck = Duration::ZERO;
    };
    let (_here, here) = worker(&redis, tune).await;
    let (_elsewhere, elsewhere) = worker(&redis, tune).await;
    let token = login(&here, "liz").await;
    let before = redis_calls(&redis, "pttl").await;
    for _ in 0..5 {
        assert_eq!(send(&elsewhere, Method::GET, "/auth/me", Some(&token), "").await.status, StatusCode::OK);
    }
    assert_eq!(redis_calls(&redis, "pttl").await - before, 5, "every request asks Redis");
    assert_eq!(send(&here, Method::POST, "/auth/logout", Some(&token), "").await.status, StatusCode::NO_CONTENT);
    assert_401_bearer(&send(&elsewhere, Method::GET, "/auth/me", Some(&token), "").await, "logged out elsewhere");
}

// --- The real binary -----------------------------------------------------------------------

async fn login_attempt(
    client: &reqwest::Client,
    server: &support::Herdsman,
    username: &str,
    forwarded: Option<&str>,
) -> reqwest::Response {
    let credentials = serde_json::json!({ "username": username, "password": "wrong password" });
    let mut request = client.post(server.url("/auth/login")).json(&credentials);
    if let Some(forwarded) = forwarded {
        request = request.header("x-forwarded-for", forwarded);
    }
    request.send().await.expect("login")
}

fn retry_after_secs(response: &reqwest::Response) -> u64 {
    let value = response.headers().get("retry-after").expect("Retry-After").to_str().expect("ASCII");
    value.parse().unwrap_or_else(|_| panic!("Retry-After {value:?} is not whole seconds"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_sessions_end_to_end_across_workers() {
    let Some(redis) = TestRedis::start().await else { return };
    let server = support::start(&[("WEB_CONCURRENCY", "2"), ("REDIS_URL", &redis.url)]);
    server.wait_for_nth_log("redis connected", 2, Duration::from_secs(10));
    let client = reqwest::Client::new();
    let token = support::register_and_login(&client, &server, "judy").await;
    let bearer = format!("Bearer {token}");
    let put = client.put(server.url("/cache/k")).header("authorization", &bearer).body("v").send().await.expect("PUT");
    assert_eq!(put.status(), 204);
    // Whichever worker answers knows the session (it is in Redis), on fresh connections.
    for _ in 0..6 {
        let fresh = reqwest::Client::new();
        let get = fresh.get(server.url("/cache/k")).header("authorization", &bearer).send().await.expect("GET");
        assert_eq!(get.status(), 200);
    }
    let logout = client.post(server.url("/auth/logout")).header("authorization", &bearer).send().await.expect("logout");
    assert_eq!(logout.status(), 204);
    // Every worker heard the logout on the revocation channel (see the test across instances
    // below for how soon); whichever answers refuses it.
    for _ in 0..4 {
        let fresh = reqwest::Client::new();
        let get = fresh.get(server.url("/cache/k")).header("authorization", &bearer).send().await.expect("GET");
        assert_eq!(get.status(), 401);
    }
    for line in server.logs() {
        assert!(!line.contains(&token), "the token in a log line: {line}");
    }
}

/// Opens HERDSMAN_METRICS_TOKEN's details of /health in the tests that tell workers apart.
const METRICS_TOKEN: &str = "a-metrics-token-for-tests";

/// A keep-alive connection (one client, one pooled connection) to each worker of `server`,
/// with the worker's pid: connections are opened until every worker has answered on one.
async fn one_connection_per_worker(server: &support::Herdsman, workers: usize) -> Vec<(u32, reqwest::Client)> {
    let mut found: Vec<(u32, reqwest::Client)> = Vec::new();
    for _ in 0..64 {
        let client = reqwest::Client::builder().pool_max_idle_per_host(1).build().expect("client");
        let health = client.get(server.url("/health")).bearer_auth(METRICS_TOKEN).send().await.expect("health");
        let pid = health.json::<serde_json::Value>().await.expect("JSON")["pid"].as_u64().expect("a pid");
        let pid = u32::try_from(pid).expect("a pid");
        if !found.iter().any(|(seen, _)| *seen == pid) {
            found.push((pid, client));
        }
        if found.len() == workers {
            return found;
        }
    }
    panic!("reached {} of {workers} workers", found.len());
}

/// A logout through one instance reaches every worker of another within 100 ms, with Redis up:
/// instance B's two workers, each on a keep-alive connection of its own, trust the session
/// (verified, then no round trip) and are polled while instance A logs it out; from A's 204 to
/// each worker's first 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_through_one_instance_is_refused_by_every_worker_of_another_within_100_ms() {
    const RUNS: usize = 5;
    let Some(redis) = TestRedis::start().await else { return };
    let env = [("WEB_CONCURRENCY", "2"), ("REDIS_URL", redis.url.as_str()), ("HERDSMAN_METRICS_TOKEN", METRICS_TOKEN)];
    let (a, b) = (support::start(&env), support::start(&env));
    for server in [&a, &b] {
        server.wait_for_nth_log("session revocations: subscribed", 2, Duration::from_secs(10));
    }
    let workers = one_connection_per_worker(&b, 2).await;
    let mut latencies = Vec::new();
    for run in 0..RUNS {
        let token = support::register_and_login(&reqwest::Client::new(), &a, "roaming").await;
        let bearer = format!("Bearer {token}");
        for (_, client) in &workers {
            let get = client.get(b.url("/cache/k")).header("authorization", &bearer).send().await.expect("GET");
            assert_eq!(get.status(), 404, "B's workers accept the session");
        }
        // Each worker of B polls until its first 401 and notes when it came.
        let pollers: Vec<_> = workers
            .iter()
            .map(|(pid, client)| {
                let (client, url, bearer, pid) = (client.clone(), b.url("/cache/k"), bearer.clone(), *pid);
                tokio::spawn(async move {
                    let started = Instant::now();
                    loop {
                        let get = client.get(&url).header("authorization", &bearer).send().await.expect("GET");
                        if get.status() == 401 {
                            return (pid, Instant::now());
                        }
                        assert!(started.elapsed() < Duration::from_secs(5), "worker {pid} still accepts the token");
                    }
                })
            })
            .collect();
        let logout = a.url("/auth/logout");
        let logout = reqwest::Client::new().post(logout).header("authorization", &bearer).send().await.expect("logout");
        let logged_out = Instant::now();
        assert_eq!(logout.status(), 204);
        for poller in pollers {
            let (pid, refused) = poller.await.expect("poller");
            let took = refused.saturating_duration_since(logged_out);
            eprintln!(
                "run {run}: worker {pid} refused the token {:.1} ms after the logout's 204",
                took.as_secs_f64() * 1e3
            );
            latencies.push(took);
        }
    }
    latencies.sort();
    let (median, max) = (latencies[latencies.len() / 2], latencies[latencies.len() - 1]);
    eprintln!("logout -> 401 on every worker of the other instance: median {median:?}, max {max:?}");
    assert!(max <= Duration::from_millis(100), "a worker took {max:?}");
}

/// A worker cut off from Redis (its link hangs: a proxy that holds every reply) cannot hear a
/// logout made through another instance; it accepts the session no longer than
/// HERDSMAN_SESSION_OUTAGE_TRUST (2 s here) after it last verified it, then answers 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_revoked_while_a_worker_is_cut_off_is_refused_there_within_the_outage_trust() {
    const TRUST: Duration = Duration::from_secs(2);
    let Some(redis) = TestRedis::start().await else { return };
    let proxy = SlowProxy::start(redis.port).await;
    let trust = TRUST.as_secs().to_string();
    let cut_off = support::start(&[
        ("WEB_CONCURRENCY", "1"),
        ("REDIS_URL", proxy.url.as_str()),
        ("HERDSMAN_SESSION_OUTAGE_TRUST", &trust),
    ]);
    let other = support::start(&[("WEB_CONCURRENCY", "1"), ("REDIS_URL", redis.url.as_str())]);
    for server in [&cut_off, &other] {
        server.wait_for_log("session revocations: subscribed", Duration::from_secs(10));
    }
    let token = support::register_and_login(&reqwest::Client::new(), &other, "traveller").await;
    let client = support::client_with_token(&token);
    assert_eq!(client.get(cut_off.url("/cache/k")).send().await.expect("GET").status(), 404, "verified");

    proxy.set_delay(Duration::from_secs(3600));
    let cut = Instant::now();
    let logout = client.post(other.url("/auth/logout")).send().await.expect("logout");
    assert_eq!(logout.status(), 204);
    // Poll the cut-off worker until it refuses, then for a while longer: it must not accept again.
    let (mut accepted, mut refused_at) = (0, None);
    while refused_at.is_none_or(|at: Instant| at.elapsed() < Duration::from_secs(1)) {
        let status = client.get(cut_off.url("/cache/k")).send().await.expect("GET").status().as_u16();
        match (status, refused_at) {
            (200 | 404, None) => accepted += 1,
            (503, None) => refused_at = Some(Instant::now()),
            (503, Some(_)) => {}
            (other, _) => panic!("{other} from the cut-off worker"),
        }
        assert!(cut.elapsed() < TRUST * 5, "still accepted {:?} after the cut", cut.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused_after = refused_at.expect("refused").saturating_duration_since(cut);
    eprintln!("cut off: accepted {accepted} requests, refused {refused_after:?} after the cut (trust {TRUST:?})");
    // Its last check was before the cut; a request may wait one Redis deadline on top.
    assert!(refused_after <= TRUST + Duration::from_millis(300), "refused only {refused_after:?} after the cut");
    proxy.set_delay(Duration::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_guessing_burst_is_429_before_any_bcrypt_work() {
    let Some(redis) = TestRedis::start().await else { return };
    let server = support::start(&[
        ("WEB_CONCURRENCY", "1"),
        ("REDIS_URL", &redis.url),
        ("BCRYPT_COST", "12"),
        ("HERDSMAN_AUTH_LIMIT_ACCOUNT", "1"),
        // No false alarm (a fallback would throttle per worker) while cost-12 bcrypt runs.
        ("HERDSMAN_REDIS_MIN_TIMEOUT", "0.2"),
    ]);
    server.wait_for_log("redis connected", Duration::from_secs(10));
    let client = reqwest::Client::new();
    // The one attempt the bucket allows pays a full bcrypt (against the dummy hash).
    let started = Instant::now();
    assert_eq!(login_attempt(&client, &server, "victim", None).await.status(), 401);
    let one_bcrypt = started.elapsed();

    // Twenty more at once: if any reached bcrypt, the two hasher threads would need 10x that.
    let started = Instant::now();
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (client, url) = (client.clone(), server.url("/auth/login"));
        let credentials = serde_json::json!({ "username": "victim", "password": "wrong password" });
        burst.spawn(async move { client.post(url).json(&credentials).send().await.expect("login") });
    }
    let replies = burst.join_all().await;
    let elapsed = started.elapsed();
    eprintln!("one bcrypt (cost 12, this build): {one_bcrypt:?}; 20 throttled attempts: {elapsed:?}");
    for reply in &replies {
        assert_eq!(reply.status(), 429);
        assert!((1..=60).contains(&retry_after_secs(reply)));
    }
    assert!(elapsed < one_bcrypt * 3, "20 refusals took {elapsed:?}, one bcrypt {one_bcrypt:?}");
    // Another account from the same address is not locked out.
    assert_eq!(login_attempt(&client, &server, "someone-else", None).await.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_limits_read_x_forwarded_for_only_behind_trusted_proxies() {
    let Some(redis) = TestRedis::start().await else { return };
    let limits = [("REDIS_URL", redis.url.as_str()), ("HERDSMAN_AUTH_LIMIT_ADDRESS", "2"), ("WEB_CONCURRENCY", "1")];
    let direct = support::start(&limits);
    direct.wait_for_log("redis connected", Duration::from_secs(10));
    let client = reqwest::Client::new();
    // No trusted proxy: the header is the client's own word and changes nothing.
    for (i, forwarded) in ["198.51.100.1", "198.51.100.2"].into_iter().enumerate() {
        let reply = login_attempt(&client, &direct, &format!("user{i}"), Some(forwarded)).await;
        assert_eq!(reply.status(), 401);
    }
    let reply = login_attempt(&client, &direct, "user3", Some("198.51.100.3")).await;
    assert_eq!(reply.status(), 429, "127.0.0.1 spent its two attempts, whatever the header says");
    assert!(retry_after_secs(&reply) >= 1);

    // One trusted hop: the right-most address is the client's, each with its own bucket (shared
    // through Redis with every other server).
    let proxied = support::start(&[limits[0], limits[1], limits[2], ("HERDSMAN_TRUSTED_PROXIES", "1")]);
    proxied.wait_for_log("redis connected", Duration::from_secs(10));
    for i in 0..2 {
        let reply = login_attempt(&client, &proxied, &format!("p{i}"), Some("6.6.6.6, 203.0.113.7")).await;
        assert_eq!(reply.status(), 401);
    }
    let reply = login_attempt(&client, &proxied, "p2", Some("7.7.7.7, 203.0.113.7")).await;
    assert_eq!(reply.status(), 429, "the forged left-most entry does not make a new client");
    let reply = login_attempt(&client, &proxied, "p3", Some("203.0.113.8")).await;
    assert_eq!(reply.status(), 401, "another client behind the proxy has its own bucket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_the_binary_says_users_and_sessions_need_it() {
    let server = support::start(&[("WEB_CONCURRENCY", "1")]);
    let client = reqwest::Client::new();
    let credentials = serde_json::json!({ "username": "kim", "password": "password123" });
    for route in ["/auth/register", "/auth/login"] {
        let reply = client.post(server.url(route)).json(&credentials).send().await.expect("POST");
        assert_eq!(reply.status(), 503, "{route}");
        assert!(reply.headers().get("retry-after").is_none(), "{route}: retrying cannot help");
        let body: serde_json::Value = reply.json().await.expect("JSON");
        assert!(body["error"].as_str().expect("error").contains("REDIS_URL"), "{body}");
    }
    let reply = client.put(server.url("/cache/k")).body("v").send().await.expect("PUT");
    assert_eq!(reply.status(), 401);
    assert_eq!(reply.headers()["www-authenticate"], "Bearer");
    let body: serde_json::Value = reply.json().await.expect("JSON");
    assert!(body["error"].as_str().expect("error").contains("need Redis"), "{body}");
    for route in ["/live", "/ready", "/health"] {
        assert_eq!(reqwest::get(server.url(route)).await.expect("GET").status(), 200, "{route}");
    }
}

/// The real binary (one worker, `env` added) on a Redis behind a [`SlowProxy`], with a logged-in
/// client that has written some keys while Redis was fast (so the deadline is fitted to it).
async fn behind_a_slow_proxy(
    redis: &TestRedis,
    env: &[(&str, &str)],
) -> (SlowProxy, support::Herdsman, reqwest::Client) {
    let proxy = SlowProxy::start(redis.port).await;
    let mut vars = vec![("WEB_CONCURRENCY", "1"), ("REDIS_URL", proxy.url.as_str())];
    vars.extend_from_slice(env);
    let server = support::start(&vars);
    server.wait_for_log("redis connected", Duration::from_secs(10));
    let token = support::register_and_login(&reqwest::Client::new(), &server, "slowpoke").await;
    let client = support::client_with_token(&token);
    for i in 0..20 {
        let put = client.put(server.url(&format!("/cache/warm{i}"))).body("w").send().await.expect("PUT");
        assert_eq!(put.status(), 204);
    }
    (proxy, server, client)
}

/// One PUT of a new key and the GET that read it back: how long each took, which tier answered.
struct Pair {
    key: String,
    put: (Duration, String),
    get: (Duration, String),
}

fn tier(response: &reqwest::Response) -> String {
    response.headers().get("x-cache-tier").and_then(|v| v.to_str().ok()).unwrap_or("none").to_string()
}

/// PUTs a new key and reads it back, every 10 ms or slower, for `length` (once at least); every PUT must be
/// acknowledged and every GET must read back the key's own name.
async fn put_and_get(server: &support::Herdsman, client: &reqwest::Client, length: Duration) -> Vec<Pair> {
    let mut pairs = Vec::new();
    let end = Instant::now() + length;
    for i in 0.. {
        if i > 0 && Instant::now() >= end {
            break;
        }
        let key = format!("k{i}");
        let started = Instant::now();
        let put = client.put(server.url(&format!("/cache/{key}"))).body(key.clone()).send().await.expect("PUT");
        let put_took = (started.elapsed(), tier(&put));
        assert_eq!(put.status(), 204, "PUT {key}");
        let started = Instant::now();
        let get = client.get(server.url(&format!("/cache/{key}"))).send().await.expect("GET");
        let (status, get_tier) = (get.status(), tier(&get));
        let body = get.bytes().await.expect("body");
        let get_took = (started.elapsed(), get_tier);
        assert_eq!((status.as_u16(), &body[..]), (200, key.as_bytes()), "GET {key}");
        pairs.push(Pair { key, put: put_took, get: get_took });
        // Paced, so that the other tests of this file, running alongside, are not starved.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    pairs
}

/// The median of `times`.
fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_slower_than_its_timeout_does_not_slow_a_logged_in_cache_and_loses_nothing() {
    let Some(redis) = TestRedis::start().await else { return };
    // A deadline floor of 50 ms (not 20): fewer false alarms while the machine is busy.
    let (proxy, server, client) = behind_a_slow_proxy(&redis, &[("HERDSMAN_REDIS_MIN_TIMEOUT", "0.05")]).await;
    let recovered = server.count_logs("redis is back");
    // 300 ms a reply, above HERDSMAN_REDIS_TIMEOUT (0.25 s): the session check, the quota check
    // or the write that meets it gives up at the fitted deadline and the outage policy answers.
    proxy.set_delay(Duration::from_millis(300));
    let pairs = put_and_get(&server, &client, Duration::from_secs(3)).await;
    let put_max = pairs.iter().map(|p| p.put.0).max().unwrap_or_default();
    let get_max = pairs.iter().map(|p| p.get.0).max().unwrap_or_default();
    eprintln!("Redis 300 ms late: {} PUT + GET, slowest PUT {put_max:?}, GET {get_max:?}", pairs.len());
    assert!(put_max < Duration::from_millis(150), "a PUT waited {put_max:?} for a slow Redis");
    assert!(get_max < Duration::from_millis(150), "a GET waited {get_max:?} for a slow Redis");

    // On time again: every acknowledged write reaches Redis.
    proxy.set_delay(Duration::ZERO);
    server.wait_for_nth_log("redis is back", recovered + 1, Duration::from_secs(10));
    let mut conn = redis.client().await;
    for Pair { key, .. } in &pairs {
        let stored = redis::cmd("GET")
            .arg(format!("herdsman:cache:user:slowpoke/{key}"))
            .query_async(&mut conn)
            .await
            .expect("GET");
        assert_eq!(
            stored_value::stored_value(stored).as_deref(),
            Some(key.as_bytes()),
            "{key} was acknowledged, then lost"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_within_its_timeout_costs_a_logged_in_get_or_put_one_round_trip() {
    const LATE: Duration = Duration::from_millis(200);
    let Some(redis) = TestRedis::start().await else { return };
    // A 1 s timeout: Redis 200 ms late is slow but usable, and the cache goes on using it
    // (after one fallback the probe re-fits the deadline to it: src/cache/deadline.rs).
    let slow_but_usable = [("HERDSMAN_REDIS_TIMEOUT", "1"), ("HERDSMAN_REDIS_MIN_TIMEOUT", "0.1")];
    let (proxy, server, client) = behind_a_slow_proxy(&redis, &slow_but_usable).await;
    let recovered = server.count_logs("redis is back");
    proxy.set_delay(LATE);
    let _ = put_and_get(&server, &client, Duration::from_millis(200)).await;
    server.wait_for_nth_log("redis is back", recovered + 1, Duration::from_secs(10));
    // Redis is in use again, each round trip 200 ms late. Answered by Redis, a GET is the
    // cache's own round trip and no session check (two would take 400 ms), a PUT one round trip
    // for the quota check and the write together (a session check and a separate quota check
    // would make three: 600 ms). Medians: the pool opens new connections now and then (200 ms).
    let pairs = put_and_get(&server, &client, Duration::from_secs(3)).await;
    let gets: Vec<Duration> = pairs.iter().filter(|p| p.get.1 == "redis").map(|p| p.get.0).collect();
    let puts: Vec<Duration> = pairs.iter().filter(|p| p.put.1 == "redis").map(|p| p.put.0).collect();
    assert!(gets.len() >= 3 && puts.len() >= 3, "Redis hardly used: {} GETs, {} PUTs", gets.len(), puts.len());
    let (get, put) = (median(gets.clone()), median(puts.clone()));
    eprintln!("Redis 200 ms late, in use: {} GETs median {get:?}, {} PUTs median {put:?}", gets.len(), puts.len());
    assert!(get < LATE * 3 / 2, "a GET took {get:?}: more than one round trip");
    assert!(put < LATE * 3 / 2, "a PUT took {put:?}: more than one round trip");

    // A DELETE: the value and its quota entry go in one round trip (two would take 400 ms).
    let mut deletes = Vec::new();
    for Pair { key, .. } in &pairs {
        let started = Instant::now();
        let reply = client.delete(server.url(&format!("/cache/{key}"))).send().await.expect("DELETE");
        assert_eq!(reply.status(), 204, "DELETE {key}");
        if tier(&reply) == "redis" {
            deletes.push(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(deletes.len() >= 3, "Redis hardly used: {} DELETEs", deletes.len());
    let delete = median(deletes.clone());
    eprintln!("Redis 200 ms late, in use: {} DELETEs median {delete:?}", deletes.len());
    assert!(delete < LATE * 3 / 2, "a DELETE took {delete:?}: more than one round trip");
    // Every quota entry went with its value (the ones whose DELETE was kept for replay too,
    // once Redis had them: those took the outage path only if the breaker opened).
    if deletes.len() == pairs.len() {
        let mut conn = redis.client().await;
        let left: Vec<String> =
            redis::cmd("HKEYS").arg("herdsman:usage:slowpoke").query_async(&mut conn).await.expect("HKEYS");
        let deleted: Vec<&String> = left.iter().filter(|key| pairs.iter().any(|pair| &pair.key == *key)).collect();
        assert!(deleted.is_empty(), "quota entries left behind by DELETEs that reached Redis: {deleted:?}");
        assert!(!left.is_empty(), "the keys this test did not delete keep their entries: {left:?}");
    }
}

/// The cache values a user holds in Redis (tombstones left out) and the entries of their usage hash.
async fn stored_and_counted(redis: &TestRedis, username: &str) -> (Vec<String>, Vec<String>) {
    let mut conn = redis.client().await;
    let prefix = format!("herdsman:cache:user:{username}/");
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(&mut conn).await.expect("KEYS");
    let mut stored = Vec::new();
    for key in keys {
        let raw = redis::cmd("GET").arg(&key).query_async(&mut conn).await.expect("GET");
        if stored_value::stored_value(raw).is_some() {
            stored.push(key[prefix.len()..].to_string());
        }
    }
    let mut counted: Vec<String> =
        redis::cmd("HKEYS").arg(format!("herdsman:usage:{username}")).query_async(&mut conn).await.expect("HKEYS");
    stored.sort();
    counted.sort();
    (stored, counted)
}

#[tokio::test]
async fn a_user_at_their_quota_cannot_store_more_through_any_worker_redis_late_or_hung() {
    let Some(redis) = TestRedis::start().await else { return };
    let three_keys = |c: &mut Config| c.user_max_keys = 3;
    let (_, first) = worker(&redis, three_keys).await;
    let token = login(&first, "olga").await;
    for key in ["k0", "k1", "k2"] {
        assert_eq!(send(&first, Method::PUT, &format!("/cache/{key}"), Some(&token), "v").await.status, 204);
    }
    assert_eq!(send(&first, Method::PUT, "/cache/more", Some(&token), "v").await.status, 403);
    // A second worker whose Redis link turns late (the breaker opens on lateness), a third that
    // has only read olga's values (it learns her usage in the background), and a fourth that has
    // checked her session and nothing else.
    let proxy = SlowProxy::start(redis.port).await;
    let (late_services, late) = worker(&redis, |c| {
        three_keys(c);
        c.redis_url = Some(proxy.url.clone());
    })
    .await;
    assert_eq!(send(&late, Method::PUT, "/cache/k0", Some(&token), "replaced").await.status, 204);
    let (_, reader) = worker(&redis, three_keys).await;
    assert_eq!(send(&reader, Method::GET, "/cache/k0", Some(&token), "").await.status, 200);
    let (_, unseen) = worker(&redis, three_keys).await;
    assert_eq!(send(&unseen, Method::GET, "/auth/me", Some(&token), "").await.status, 200);

    proxy.set_delay(Duration::from_secs(1));
    let reply = send(&late, Method::PUT, "/cache/late", Some(&token), "v").await;
    assert_eq!(reply.status, 403, "{}", reply.json());
    wait_for(&late_services.cache, false).await;
    assert_eq!(send(&late, Method::PUT, "/cache/later", Some(&token), "v").await.status, 403);

    // Redis hangs for everyone (frozen, as by SIGSTOP).
    redis.pause().await;
    for (app, what) in [(&first, "the worker that counted"), (&late, "the late one"), (&reader, "the reader")] {
        let reply = send(app, Method::PUT, "/cache/cut", Some(&token), "v").await;
        assert_eq!(reply.status, 403, "{what}: {}", reply.json());
    }
    // It cannot vouch for olga's quota: nothing is stored, and it says so.
    let reply = send(&unseen, Method::PUT, "/cache/unseen", Some(&token), "v").await;
    assert_eq!(reply.status, 503, "{}", reply.json());
    assert!(reply.header("retry-after").is_some());

    redis.unpause().await;
    proxy.set_delay(Duration::ZERO);
    wait_for(&late_services.cache, true).await;
    let all = vec!["k0".to_string(), "k1".to_string(), "k2".to_string()];
    assert_eq!(stored_and_counted(&redis, "olga").await, (all.clone(), all));
}

#[tokio::test]
async fn held_writes_are_counted_when_replayed_and_a_held_delete_releases_its_entry() {
    let Some(redis) = TestRedis::start().await else { return };
    let (services, app) = worker(&redis, |c| c.user_max_keys = 3).await;
    let token = login(&app, "pavel").await;
    for key in ["a", "b"] {
        assert_eq!(send(&app, Method::PUT, &format!("/cache/{key}"), Some(&token), "v").await.status, 204);
    }
    redis.pause().await;
    let reply = send(&app, Method::PUT, "/cache/held", Some(&token), "v").await;
    assert_eq!((reply.status.as_u16(), reply.header("x-cache-tier")), (204, Some("memory")));
    // The third key was the last one this worker could hold for pavel.
    assert_eq!(send(&app, Method::PUT, "/cache/one-too-many", Some(&token), "v").await.status, 403);
    assert_eq!(send(&app, Method::DELETE, "/cache/a", Some(&token), "").await.status, 204);

    redis.unpause().await;
    wait_for(&services.cache, true).await;
    let expected = vec!["b".to_string(), "held".to_string()];
    assert_eq!(stored_and_counted(&redis, "pavel").await, (expected.clone(), expected));
    // Counted: one key left under the quota, not two.
    assert_eq!(send(&app, Method::PUT, "/cache/c", Some(&token), "v").await.status, 204);
    assert_eq!(send(&app, Method::PUT, "/cache/d", Some(&token), "v").await.status, 403);
}
