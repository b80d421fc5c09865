//! A Redis that misbehaves without dying, against the host's real `redis-server`: it hangs
//! (SIGSTOP), it is full (`OOM`), a replica (`READONLY`), loading its data (`LOADING`), running
//! a script (`BUSY`), its password was rotated (`NOAUTH`/`WRONGPASS`), or it is slow (a proxy
//! adding latency to every reply).
//!
//! The promise in every case: no request waits longer than the deadline, a write Redis did not
//! take is never reported as stored in Redis (it is kept in memory and read back from there,
//! then replayed once Redis takes writes again), user records are refused while it lasts, and
//! the transition is logged once each way.

#[path = "support/log_capture.rs"]
mod log_capture;
#[path = "support/redis_server.rs"]
mod redis_server;
#[path = "support/stored_value.rs"]
mod stored_value;

use std::time::{Duration, Instant};

use bytes::Bytes;
use herdsman::cache::{Cache, CacheConfig, CacheError, RedisStatus, Tier};
use log_capture::LogCapture;
use redis_server::{LocalRedis, SlowProxy};

/// The bound of every operation: far above the fitted deadline, so a request that paid it
/// shows.
const OP_TIMEOUT: Duration = Duration::from_secs(1);
/// The fitted deadline's floor in these tests: above the default 20 ms, because a healthy
/// Redis's reply can wait that long for a core on a 2-core machine running builds beside the
/// tests (seen: the warm-up writes opened the breaker at a load average of 19), and what is
/// under test is the deadline's effect, not its floor.
const FLOOR: Duration = Duration::from_millis(50);

fn cache_at(url: &str) -> Cache {
    Cache::new(CacheConfig {
        redis_url: Some(url.to_string()),
        operation_timeout: OP_TIMEOUT,
        deadline_floor: FLOOR,
        ..CacheConfig::default()
    })
    .expect("valid url")
}

async fn connected(redis: &LocalRedis) -> Cache {
    let cache = cache_at(&redis.url);
    cache.connect().await.expect("connect");
    // Some round trips, so the deadline is fitted to this Redis.
    for i in 0..50 {
        cache.set(&format!("warm{i}"), Bytes::from_static(b"w"), None).await.expect("set");
    }
    assert_eq!(cache.status(), RedisStatus::Up);
    cache
}

async fn raw(redis: &LocalRedis, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let mut conn = redis.client().await;
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query_async(&mut conn).await
}

async fn raw_get(redis: &LocalRedis, key: &str) -> Option<Vec<u8>> {
    let mut conn = redis.client().await;
    stored_value::stored_value(
        redis::cmd("GET").arg(format!("herdsman:cache:{key}")).query_async(&mut conn).await.expect("raw GET"),
    )
}

/// The fallback reason, failing the test if the cache is not in fallback.
fn fallback_reason(cache: &Cache) -> String {
    match cache.status() {
        RedisStatus::Fallback { reason, .. } => reason,
        other => panic!("expected fallback, got {other:?}"),
    }
}

async fn wait_for(cache: &Cache, limit: Duration, up: bool) {
    let started = Instant::now();
    while (cache.status() == RedisStatus::Up) != up {
        assert!(
            started.elapsed() < limit,
            "cache not {} within {limit:?}: {:?}",
            if up { "up" } else { "down" },
            cache.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The shared body of the "Redis refuses writes" cases: `refuse` puts Redis in the state,
/// `reason` must appear in /health's reason, `heal` ends it. A write during it is kept in
/// memory and read back from there, user records are refused, one WARN down and one INFO up
/// are logged, and the write reaches Redis afterwards.
async fn refusal_scenario<R, H>(redis: &LocalRedis, cache: &Cache, reason: &str, refuse: R, heal: H)
where
    R: std::future::Future<Output = ()>,
    H: std::future::Future<Output = ()>,
{
    let logs = LogCapture::install();
    refuse.await;
    let tier = cache.set_with_tier("during", Bytes::from_static(b"kept"), None).await.expect("set during");
    assert_eq!(tier, Tier::Memory, "a write Redis refused is not reported as stored in Redis");
    let why = fallback_reason(cache);
    assert!(why.contains(reason), "/health should say {reason}: {why}");
    // Read back from memory: not the 404 (or the older value) Redis would give.
    assert_eq!(cache.get_with_tier("during").await.expect("get"), (Some(Bytes::from_static(b"kept")), Tier::Memory));
    // More writes while it lasts: still memory, no second log line.
    for i in 0..20 {
        let tier = cache.set_with_tier(&format!("more{i}"), Bytes::from_static(b"m"), None).await.expect("set");
        assert_eq!(tier, Tier::Memory);
    }
    let durable = cache.durable().expect("durable store");
    assert!(matches!(durable.set_nx("herdsman:user:x", b"u").await, Err(CacheError::Unavailable(_))));
    // The probe keeps the breaker open while Redis still refuses writes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(matches!(cache.status(), RedisStatus::Fallback { .. }), "{:?}", cache.status());

    heal.await;
    wait_for(cache, Duration::from_secs(5), true).await;
    assert_eq!(raw_get(redis, "during").await.as_deref(), Some(&b"kept"[..]), "the kept write was replayed");
    assert_eq!(cache.get_with_tier("during").await.expect("get"), (Some(Bytes::from_static(b"kept")), Tier::Redis));
    let levels: Vec<_> = logs.take().iter().map(|(level, _)| *level).collect();
    assert_eq!(levels, [tracing::Level::WARN, tracing::Level::INFO]);
}

#[tokio::test]
async fn a_full_redis_keeps_writes_in_memory_until_it_has_room() {
    let Some(redis) = LocalRedis::start("a_full_redis", &["--maxmemory-policy", "noeviction"]) else { return };
    let cache = connected(&redis).await;
    let refuse = async {
        raw(&redis, &["CONFIG", "SET", "maxmemory", "1"]).await.expect("CONFIG SET maxmemory");
    };
    let heal = async {
        raw(&redis, &["CONFIG", "SET", "maxmemory", "0"]).await.expect("CONFIG SET maxmemory");
    };
    refusal_scenario(&redis, &cache, "OOM", refuse, heal).await;
}

#[tokio::test]
async fn a_replica_after_failover_keeps_writes_in_memory_until_it_is_promoted() {
    let Some(redis) = LocalRedis::start("a_replica", &[]) else { return };
    let Some(primary) = LocalRedis::start("a_replica", &[]) else { return };
    let cache = connected(&redis).await;
    let port = primary.port.to_string();
    let refuse = async {
        raw(&redis, &["REPLICAOF", "127.0.0.1", &port]).await.expect("REPLICAOF");
    };
    let heal = async {
        raw(&redis, &["REPLICAOF", "NO", "ONE"]).await.expect("REPLICAOF NO ONE");
    };
    refusal_scenario(&redis, &cache, "read only replica", refuse, heal).await;
}

#[tokio::test]
async fn a_long_script_keeps_writes_in_memory_until_it_is_killed() {
    let Some(redis) = LocalRedis::start("a_long_script", &["--busy-reply-threshold", "50"]) else { return };
    let cache = connected(&redis).await;
    let mut busy = redis.client().await;
    let script = tokio::spawn(async move {
        let _: redis::RedisResult<()> = redis::cmd("EVAL").arg("while true do end").arg(0).query_async(&mut busy).await;
    });
    let refuse = async {
        // Past the threshold Redis answers BUSY to everyone else.
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let heal = async {
        raw(&redis, &["SCRIPT", "KILL"]).await.expect("SCRIPT KILL");
    };
    refusal_scenario(&redis, &cache, "BUSY", refuse, heal).await;
    script.await.expect("script task");
}

#[tokio::test]
async fn a_rotated_password_keeps_writes_in_memory_until_it_is_restored() {
    let Some(redis) = LocalRedis::start("a_rotated_password", &["--requirepass", "old-secret"]) else { return };
    let cache = cache_at(&format!("redis://:old-secret@127.0.0.1:{}", redis.port));
    cache.connect().await.expect("connect with the password");
    let admin = |password: &'static str| {
        let url = format!("redis://:{password}@127.0.0.1:{}", redis.port);
        async move {
            let mut conn =
                redis::Client::open(url).expect("url").get_multiplexed_async_connection().await.expect("admin conn");
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg("requirepass")
                .arg(if password == "old-secret" { "new-secret" } else { "old-secret" })
                .query_async(&mut conn)
                .await
                .expect("CONFIG SET requirepass");
            // A provider's rotation also drops the clients that logged in with the old one.
            let _: redis::Value =
                redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("normal").query_async(&mut conn).await.expect("KILL");
        }
    };
    let logs = LogCapture::install();
    admin("old-secret").await;
    // The first write meets the dropped connection; the probe's new one is refused.
    let tier = cache.set_with_tier("during", Bytes::from_static(b"kept"), None).await.expect("set during");
    assert_eq!(tier, Tier::Memory);
    let started = Instant::now();
    while !fallback_reason(&cache).contains("WRONGPASS") && !fallback_reason(&cache).contains("auth") {
        assert!(started.elapsed() < Duration::from_secs(5), "{}", fallback_reason(&cache));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!fallback_reason(&cache).contains("old-secret"), "the reason never shows the password");
    assert_eq!(cache.get_with_tier("during").await.expect("get"), (Some(Bytes::from_static(b"kept")), Tier::Memory));
    let durable = cache.durable().expect("durable store");
    assert!(matches!(durable.get("herdsman:user:x").await, Err(CacheError::Unavailable(_))));

    admin("new-secret").await; // back to the password in the URL
    wait_for(&cache, Duration::from_secs(5), true).await;
    let mut conn = redis::Client::open(format!("redis://:old-secret@127.0.0.1:{}", redis.port))
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    let kept = redis::cmd("GET").arg("herdsman:cache:during").query_async(&mut conn).await.expect("GET");
    assert_eq!(stored_value::stored_value(kept).as_deref(), Some(&b"kept"[..]));
    let levels: Vec<_> = logs.take().iter().map(|(level, _)| *level).collect();
    assert_eq!(levels, [tracing::Level::WARN, tracing::Level::INFO]);
}

#[tokio::test]
async fn a_redis_still_loading_its_data_is_not_used_until_it_is_done() {
    let Some(mut redis) = LocalRedis::start("a_redis_loading", &[]) else { return };
    // A dataset that takes a while to load: 5 000 keys at 200 us each.
    let mut mset = vec!["MSET".to_string()];
    for i in 0..5000 {
        mset.push(format!("filler:{i}"));
        mset.push("0123456789".to_string());
    }
    raw(&redis, &mset.iter().map(String::as_str).collect::<Vec<_>>()).await.expect("MSET");
    raw(&redis, &["SAVE"]).await.expect("SAVE");
    redis.restart_with(&["--key-load-delay", "200", "--loading-process-events-interval-bytes", "1024"]);

    let logs = LogCapture::install();
    let cache = cache_at(&redis.url);
    let err = cache.connect().await.expect_err("LOADING is not up");
    assert!(err.to_string().contains("loading the dataset"), "{err}");
    assert!(fallback_reason(&cache).contains("loading the dataset"));
    let tier = cache.set_with_tier("during", Bytes::from_static(b"kept"), None).await.expect("set during");
    assert_eq!(tier, Tier::Memory);
    assert_eq!(cache.get_with_tier("during").await.expect("get"), (Some(Bytes::from_static(b"kept")), Tier::Memory));
    let durable = cache.durable().expect("durable store");
    assert!(matches!(durable.get("herdsman:user:x").await, Err(CacheError::Unavailable(_))));

    wait_for(&cache, Duration::from_secs(30), true).await;
    assert_eq!(raw_get(&redis, "during").await.as_deref(), Some(&b"kept"[..]));
    let levels: Vec<_> = logs.take().iter().map(|(level, _)| *level).collect();
    assert_eq!(levels, [tracing::Level::WARN, tracing::Level::INFO]);
}

/// Outcome of [`load`]: how many operations, the slowest, how many took over `slow`.
struct Load {
    ops: usize,
    slowest: Duration,
    over: usize,
    errors: Vec<String>,
}

/// `tasks` tasks doing set + get on their own keys for `length`; `during` runs meanwhile.
async fn load<F: std::future::Future<Output = ()>>(
    cache: &Cache,
    tasks: usize,
    length: Duration,
    slow: Duration,
    during: F,
) -> Load {
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let cache = cache.clone();
            tokio::spawn(async move {
                let mut out = Load { ops: 0, slowest: Duration::ZERO, over: 0, errors: Vec::new() };
                let mut i = 0u64;
                while started.elapsed() < length {
                    let key = format!("load-{task}-{}", i % 20);
                    let value = Bytes::from(i.to_string());
                    let op = Instant::now();
                    if let Err(err) = cache.set(&key, value.clone(), None).await {
                        out.errors.push(format!("set {key}: {err}"));
                    }
                    match cache.get(&key).await {
                        Ok(Some(got)) if got == value => {}
                        other => out.errors.push(format!("get {key}: {other:?}, wanted {value:?}")),
                    }
                    let took = op.elapsed();
                    out.slowest = out.slowest.max(took);
                    out.over += usize::from(took > slow);
                    out.ops += 2;
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                out
            })
        })
        .collect();
    during.await;
    let mut total = Load { ops: 0, slowest: Duration::ZERO, over: 0, errors: Vec::new() };
    for handle in handles {
        let out = handle.await.expect("load task");
        total.ops += out.ops;
        total.slowest = total.slowest.max(out.slowest);
        total.over += out.over;
        total.errors.extend(out.errors);
    }
    total
}

#[tokio::test]
async fn a_hang_costs_each_waiting_request_one_fitted_deadline_not_the_timeout() {
    let Some(redis) = LocalRedis::start("a_hang", &[]) else { return };
    let cache = connected(&redis).await;
    let logs = LogCapture::install();
    const TASKS: usize = 16;
    let report = load(&cache, TASKS, Duration::from_millis(3000), FLOOR * 3, async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        redis.pause();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        redis.resume();
    })
    .await;
    eprintln!("hang: {} ops, slowest {:?}, {} over {:?}", report.ops, report.slowest, report.over, FLOOR * 3);
    assert!(report.errors.is_empty(), "{:?}", &report.errors[..report.errors.len().min(5)]);
    // Nobody paid the 1 s timeout: the first to reach the fitted deadline released the rest.
    assert!(report.slowest < OP_TIMEOUT / 2, "slowest op {:?}", report.slowest);
    // Only the requests in flight when Redis stopped waited, each once (plus a few slow ones
    // on a busy machine); the outage did not make every request slow.
    assert!(report.over <= 2 * TASKS, "{} of {} ops were slow", report.over, report.ops);
    wait_for(&cache, Duration::from_secs(5), true).await;
    // One WARN down and one INFO up. Redis answering its backlog just after SIGCONT, on a
    // machine busy with other tests, may open the breaker once more: logged the same way.
    let levels: Vec<_> = logs.take().iter().map(|(level, _)| *level).collect();
    let pairs: Vec<_> = levels.chunks(2).collect();
    assert!(
        (1..=2).contains(&pairs.len())
            && pairs.iter().all(|pair| pair == &[tracing::Level::WARN, tracing::Level::INFO]),
        "{levels:?}"
    );
    // What was written during the hang reached Redis afterwards.
    let last = cache.get("load-0-0").await.expect("get").expect("a value");
    assert_eq!(raw_get(&redis, "load-0-0").await.map(Bytes::from), Some(last));
}

#[tokio::test]
async fn a_slow_redis_costs_at_most_the_deadline_and_degrades_to_memory() {
    let Some(redis) = LocalRedis::start("a_slow_redis", &[]) else { return };
    let proxy = SlowProxy::start(redis.port).await;
    let cache = cache_at(&proxy.url);
    cache.connect().await.expect("connect through the proxy");
    for i in 0..50 {
        cache.set(&format!("warm{i}"), Bytes::from_static(b"w"), None).await.expect("set");
    }
    // Replies now take longer than the operation timeout: Redis is unusable, memory serves.
    proxy.set_delay(OP_TIMEOUT + Duration::from_millis(500));
    let report = load(&cache, 8, Duration::from_millis(2500), FLOOR * 3, async {}).await;
    eprintln!("slower than the timeout: {} ops, slowest {:?}, {} slow", report.ops, report.slowest, report.over);
    assert!(report.errors.is_empty(), "{:?}", &report.errors[..report.errors.len().min(5)]);
    assert!(report.slowest < OP_TIMEOUT / 2, "requests pay the fitted deadline at most: {:?}", report.slowest);
    assert!(report.over <= 2 * 8, "{} slow ops: requests queued behind the slow Redis", report.over);
    assert!(fallback_reason(&cache).contains("did not answer"), "{}", fallback_reason(&cache));

    // 50 ms is slow but within the timeout: after one fallback the deadline is fitted to it
    // again and Redis is used, each request paying about the 50 ms and never the timeout.
    proxy.set_delay(Duration::from_millis(50));
    wait_for(&cache, Duration::from_secs(5), true).await;
    let report = load(&cache, 8, Duration::from_millis(1500), OP_TIMEOUT / 2, async {}).await;
    eprintln!("50 ms slower: {} ops, slowest {:?}", report.ops, report.slowest);
    assert!(report.errors.is_empty(), "{:?}", &report.errors[..report.errors.len().min(5)]);
    assert_eq!(report.over, 0, "slowest {:?}", report.slowest);
    assert_eq!(cache.status(), RedisStatus::Up);
    let tier = cache.set_with_tier("slow", Bytes::from_static(b"s"), None).await.expect("set");
    assert_eq!(tier, Tier::Redis);
}

/// A failover behind one endpoint (a managed Redis, a proxy that follows Sentinel) that moves
/// late: for a second after the replica is promoted, new connections still reach the demoted
/// primary, which answers READONLY. The cache must not stay on that node: each failed probe
/// starts again from a fresh connection, so it follows the endpoint within a probe or two.
#[tokio::test]
async fn a_failover_is_followed_within_seconds_even_when_the_endpoint_moves_late() {
    let Some(primary) = LocalRedis::start("failover_primary", &[]) else { return };
    let primary_port = primary.port.to_string();
    let Some(replica) = LocalRedis::start("failover_replica", &["--replicaof", "127.0.0.1", &primary_port]) else {
        return;
    };
    let endpoint = SlowProxy::start(primary.port).await;
    let cache = cache_at(&endpoint.url);
    cache.connect().await.expect("connect through the endpoint");
    for i in 0..20 {
        let tier = cache.set_with_tier(&format!("before{i}"), Bytes::from_static(b"v"), None).await.expect("set");
        assert_eq!(tier, Tier::Redis);
    }
    // Acknowledged writes the replica has not received yet are what asynchronous replication
    // loses in a failover; this test is about following it, so it waits for them.
    let started = Instant::now();
    while raw_get(&replica, "before19").await.is_none() {
        assert!(started.elapsed() < Duration::from_secs(10), "the replica never caught up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    raw(&replica, &["REPLICAOF", "NO", "ONE"]).await.expect("promote");
    raw(&primary, &["REPLICAOF", "127.0.0.1", &replica.port.to_string()]).await.expect("demote");
    let during = cache.set_with_tier("during", Bytes::from_static(b"held"), None).await.expect("set");
    assert_eq!(during, Tier::Memory, "the demoted primary took a write");
    let reason = fallback_reason(&cache);
    assert!(reason.to_ascii_uppercase().contains("READONLY"), "{reason}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    endpoint.set_upstream(replica.port);
    let moved = Instant::now();
    wait_for(&cache, Duration::from_secs(5), true).await;
    eprintln!("back on Redis {:?} after the endpoint moved", moved.elapsed());

    let after = cache.set_with_tier("after", Bytes::from_static(b"v"), None).await.expect("set");
    assert_eq!(after, Tier::Redis);
    assert_eq!(raw_get(&replica, "during").await.as_deref(), Some(&b"held"[..]), "the held write was not replayed");
    for i in 0..20 {
        let read = cache.get_with_tier(&format!("before{i}")).await.expect("get");
        assert_eq!(read, (Some(Bytes::from_static(b"v")), Tier::Redis), "before{i}");
    }
}
