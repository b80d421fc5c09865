//! The cache against a real Redis (testcontainers): write-through, namespacing,
//! and the circuit breaker when Redis refuses (stopped) or hangs (paused).
//!
//! Image: `HERDSMAN_REDIS_IMAGE` (default `redis:7`); see `tests/support/redis.rs`.

#[path = "support/log_capture.rs"]
mod log_capture;
#[path = "support/redis.rs"]
mod redis_support;
#[path = "support/slow_proxy.rs"]
mod slow_proxy;
#[path = "support/stored_value.rs"]
mod stored_value;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use herdsman::cache::{Cache, CacheConfig, CacheError, RedisStatus, Tier};
use log_capture::LogCapture;
use redis_support::TestRedis;

const OP_TIMEOUT: Duration = Duration::from_millis(250);
/// Slack over the operation timeout for scheduling on a busy 2-core machine.
const SLACK: Duration = Duration::from_millis(200);

fn cache_for(redis: &TestRedis) -> Cache {
    Cache::new(CacheConfig {
        redis_url: Some(redis.url.clone()),
        operation_timeout: OP_TIMEOUT,
        ..CacheConfig::default()
    })
    .expect("valid url")
}

/// The value under a Redis key, read by the cache's format.
async fn raw_get(redis: &TestRedis, key: &str) -> Option<Vec<u8>> {
    let mut conn = redis.client().await;
    stored_value::stored_value(redis::cmd("GET").arg(key).query_async(&mut conn).await.expect("raw GET"))
}

async fn wait_for_up(cache: &Cache, limit: Duration) -> Duration {
    let started = Instant::now();
    while cache.status() != RedisStatus::Up {
        assert!(started.elapsed() < limit, "cache not back on redis within {limit:?}: {:?}", cache.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

#[tokio::test]
async fn round_trip_goes_through_redis_under_the_namespace() {
    let Some(redis) = TestRedis::start().await else { return };
    let cache = cache_for(&redis);
    assert_eq!(cache.status(), RedisStatus::Connecting);
    cache.connect().await.expect("connect");
    assert_eq!(cache.status(), RedisStatus::Up);
    assert!(!cache.is_degraded());

    let tier = cache.set_with_tier("greeting", Bytes::from_static(b"hello"), None).await.expect("set");
    assert_eq!(tier, Tier::Redis);
    assert_eq!(raw_get(&redis, "herdsman:cache:greeting").await.as_deref(), Some(&b"hello"[..]));
    assert_eq!(raw_get(&redis, "greeting").await, None);

    // TTL reaches Redis.
    cache.set("ttl", Bytes::from_static(b"x"), Some(Duration::from_secs(30))).await.expect("set ttl");
    let mut conn = redis.client().await;
    let pttl: i64 = redis::cmd("PTTL").arg("herdsman:cache:ttl").query_async(&mut conn).await.expect("PTTL");
    assert!((1..=30_000).contains(&pttl), "pttl {pttl}");

    // Values written by someone else (another worker) are read from Redis.
    let _: () = redis::cmd("SET")
        .arg("herdsman:cache:external")
        .arg("from-elsewhere")
        .query_async(&mut conn)
        .await
        .expect("raw SET");
    assert_eq!(
        cache.get_with_tier("external").await.expect("get"),
        (Some(Bytes::from_static(b"from-elsewhere")), Tier::Redis)
    );

    // Warm-up loads what exists.
    let _: () = redis::cmd("SET").arg("herdsman:cache:warm-me").arg("w").query_async(&mut conn).await.expect("raw SET");
    let loaded = cache.warm(&["warm-me".to_string(), "absent".to_string()]).await.expect("warm");
    assert_eq!(loaded, 1);

    cache.delete("greeting").await.expect("delete");
    assert_eq!(raw_get(&redis, "herdsman:cache:greeting").await, None);
    assert_eq!(cache.get("greeting").await.expect("get"), None);
}

/// Outcome of [`run_load`]: every operation's latency, and any error.
struct LoadReport {
    ops: usize,
    errors: Vec<String>,
    slowest: Duration,
}

/// Several tasks doing get/set for `length`; `fault` runs after `fault_after`.
async fn run_load<F, Fut>(cache: &Cache, length: Duration, fault_after: Duration, fault: F) -> LoadReport
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let started = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..4 {
        let cache = cache.clone();
        tasks.push(tokio::spawn(async move {
            let mut report = LoadReport { ops: 0, errors: Vec::new(), slowest: Duration::ZERO };
            let mut i = 0u64;
            while started.elapsed() < length {
                let key = format!("load-{task}-{}", i % 50);
                let op = Instant::now();
                if let Err(err) = cache.set(&key, Bytes::from(i.to_string()), None).await {
                    report.errors.push(format!("set: {err}"));
                }
                report.slowest = report.slowest.max(op.elapsed());
                let op = Instant::now();
                match cache.get(&key).await {
                    Ok(Some(_)) => {}
                    Ok(None) => report.errors.push(format!("get {key}: missing")),
                    Err(err) => report.errors.push(format!("get: {err}")),
                }
                report.slowest = report.slowest.max(op.elapsed());
                report.ops += 2;
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            report
        }));
    }
    tokio::time::sleep(fault_after).await;
    fault().await;
    let mut total = LoadReport { ops: 0, errors: Vec::new(), slowest: Duration::ZERO };
    for task in tasks {
        let report = task.await.expect("load task");
        total.ops += report.ops;
        total.errors.extend(report.errors);
        total.slowest = total.slowest.max(report.slowest);
    }
    total
}

/// Shared body of the stop and pause scenarios.
async fn outage_scenario(redis: Arc<TestRedis>, pause: bool) {
    let logs = LogCapture::install();
    let cache = cache_for(&redis);
    cache.connect().await.expect("connect");
    // Keys the outage will delete or let expire: the replay must remove them.
    for key in ["doomed", "expires"] {
        let tier = cache.set_with_tier(key, Bytes::from_static(b"before"), None).await.expect("set before outage");
        assert_eq!(tier, Tier::Redis);
    }
    logs.take();

    let faulty = redis.clone();
    let report = run_load(&cache, Duration::from_millis(2500), Duration::from_millis(500), || async move {
        if pause {
            faulty.pause().await
        } else {
            faulty.stop().await
        }
    })
    .await;
    eprintln!("pause={pause}: {} ops, slowest {:?}", report.ops, report.slowest);
    assert!(report.errors.is_empty(), "errors: {:?}", report.errors);
    assert!(report.ops > 100, "only {} ops", report.ops);
    assert!(report.slowest <= OP_TIMEOUT + SLACK, "slowest op took {:?}", report.slowest);
    match cache.status() {
        RedisStatus::Fallback { reason, .. } => assert!(!reason.is_empty()),
        other => panic!("expected fallback, got {other:?}"),
    }
    assert!(cache.is_degraded());

    // Fail fast while the breaker is open: no op waits for the timeout.
    let op = Instant::now();
    let tier =
        cache.set_with_tier("during-outage", Bytes::from_static(b"kept"), None).await.expect("set during outage");
    assert_eq!(tier, Tier::Memory);
    assert!(op.elapsed() < Duration::from_millis(50), "{:?}", op.elapsed());
    let durable = cache.durable().expect("durable store");
    assert!(matches!(durable.get("herdsman:user:x").await, Err(CacheError::Unavailable(_))));

    if pause {
        redis.unpause().await;
    } else {
        redis.restart().await;
    }
    let took = wait_for_up(&cache, Duration::from_secs(5)).await;
    eprintln!("back on redis {took:?} after redis answered");

    // Thousands of requests, one outage: one warning down, one info up.
    let logs = logs.take();
    let levels: Vec<_> = logs.iter().map(|(level, _)| *level).collect();
    assert_eq!(levels, [tracing::Level::WARN, tracing::Level::INFO], "{logs:?}");

    // The outage write was replayed, and new writes reach Redis.
    assert_eq!(raw_get(&redis, "herdsman:cache:during-outage").await.as_deref(), Some(&b"kept"[..]));
    let tier = cache.set_with_tier("after", Bytes::from_static(b"recovered"), None).await.expect("set after recovery");
    assert_eq!(tier, Tier::Redis);
    assert_eq!(raw_get(&redis, "herdsman:cache:after").await.as_deref(), Some(&b"recovered"[..]));
    assert!(durable.get("herdsman:user:x").await.expect("durable get").is_none());
}

#[tokio::test]
async fn stopped_redis_mid_load_falls_back_and_recovers() {
    let Some(redis) = TestRedis::start().await else { return };
    outage_scenario(Arc::new(redis), false).await;
}

#[tokio::test]
async fn paused_redis_mid_load_falls_back_and_recovers() {
    let Some(redis) = TestRedis::start().await else { return };
    outage_scenario(Arc::new(redis), true).await;
}

/// Two workers (or instances) on one Redis, one of them cut off for a while: what it held is
/// replayed in stamp order, so nothing the other acknowledged later is lost (src/cache/stamped.rs).
#[tokio::test]
async fn a_replayed_write_never_replaces_a_later_one_nor_undoes_a_later_delete() {
    let Some(redis) = TestRedis::start().await else { return };
    let proxy = slow_proxy::SlowProxy::start(redis.port).await;
    let cut_off = Cache::new(CacheConfig {
        redis_url: Some(proxy.url.clone()),
        operation_timeout: OP_TIMEOUT,
        ..CacheConfig::default()
    })
    .expect("valid url");
    let other = cache_for(&redis);
    cut_off.connect().await.expect("connect");
    other.connect().await.expect("connect");
    let value = |v: &'static str| Bytes::from_static(v.as_bytes());
    for key in ["k", "j", "m", "e"] {
        assert_eq!(other.set_with_tier(key, value("before"), None).await.expect("set"), Tier::Redis);
    }

    // Redis hangs for `cut_off` only: its writes are held.
    proxy.set_delay(Duration::from_secs(2));
    assert_eq!(cut_off.set_with_tier("k", value("held"), None).await.expect("set"), Tier::Memory);
    assert!(matches!(cut_off.status(), RedisStatus::Fallback { .. }), "{:?}", cut_off.status());
    assert_eq!(cut_off.delete_with_tier("j").await.expect("delete"), Tier::Memory);
    assert_eq!(cut_off.delete_with_tier("m").await.expect("delete"), Tier::Memory);
    assert_eq!(cut_off.set_with_tier("alone", value("held"), None).await.expect("set"), Tier::Memory);
    let short = Some(Duration::from_millis(50));
    assert_eq!(cut_off.set_with_tier("e", value("held"), short).await.expect("set"), Tier::Memory);
    // Later, through the other one: these must survive the replay.
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(other.set_with_tier("k", value("later"), None).await.expect("set"), Tier::Redis);
    assert_eq!(other.set_with_tier("j", value("after the delete"), None).await.expect("set"), Tier::Redis);

    proxy.set_delay(Duration::ZERO);
    wait_for_up(&cut_off, Duration::from_secs(10)).await;
    for cache in [&cut_off, &other] {
        assert_eq!(cache.get("k").await.expect("get"), Some(value("later")), "a held write replaced a later one");
        assert_eq!(cache.get("j").await.expect("get"), Some(value("after the delete")), "a held delete undid a write");
        assert_eq!(cache.get("m").await.expect("get"), None, "the held delete was not replayed");
        assert_eq!(cache.get("alone").await.expect("get"), Some(value("held")), "a held write was lost");
        // Held, then expired: it still hides the value it replaced.
        assert_eq!(cache.get("e").await.expect("get"), None, "an expired held write brought back an older value");
    }
}

#[tokio::test]
async fn refused_commands_do_not_open_the_breaker() {
    let Some(redis) = TestRedis::start().await else { return };
    let cache = cache_for(&redis);
    cache.connect().await.expect("connect");
    let mut conn = redis.client().await;

    // WRONGTYPE on read: answered from memory, Redis stays in use.
    let _: () = redis::cmd("HSET")
        .arg("herdsman:cache:not-a-string")
        .arg("f")
        .arg("v")
        .query_async(&mut conn)
        .await
        .expect("HSET");
    let (value, tier) = cache.get_with_tier("not-a-string").await.expect("get");
    assert_eq!((value, tier), (None, Tier::Memory));
    assert_eq!(cache.status(), RedisStatus::Up);

    // A write Redis cannot take now (OOM, READONLY...) is another matter: the breaker opens
    // (tests/redis_misbehaves.rs).
}

#[test]
fn bad_scheme_is_invalid_url() {
    let err =
        Cache::new(CacheConfig { redis_url: Some("memcached://127.0.0.1:11211".into()), ..CacheConfig::default() })
            .expect_err("bad scheme");
    assert!(matches!(err, CacheError::InvalidUrl(_)), "{err}");
}
