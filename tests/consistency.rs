//! Several instances on one Redis (issue 24): an acknowledged write is never replaced by a
//! write acknowledged before it, and a delete is never undone by a replay. The real binary,
//! the host's `redis-server`, a proxy between one instance and Redis that the test pauses.
//! bench/history.py checks the same floor under random faults; this is its smallest case.

#[path = "support/redis_server.rs"]
mod redis_server;
mod support;

use std::time::{Duration, Instant};

use redis_server::{LocalRedis, SlowProxy};
use support::Herdsman;

/// How long A's link to Redis hangs: long enough for A's writes and then B's, short enough that
/// A's sessions are still trusted from memory.
const PAUSE: Duration = Duration::from_millis(500);

/// One worker on `redis_url`. A deadline floor of 200 ms, not 20: a healthy Redis's reply can
/// wait that long for a core on a machine busy with other tests, and B must write to Redis; a
/// paused link trips it all the same.
fn instance(redis_url: &str) -> Herdsman {
    let server =
        support::start(&[("WEB_CONCURRENCY", "1"), ("REDIS_URL", redis_url), ("HERDSMAN_REDIS_MIN_TIMEOUT", "0.2")]);
    server.wait_for_log("redis connected", Duration::from_secs(10));
    server
}

fn tier(response: &reqwest::Response) -> String {
    response.headers().get("x-cache-tier").and_then(|v| v.to_str().ok()).unwrap_or("none").to_string()
}

/// PUT `value` (or DELETE when `None`) through `server`: its status and tier.
async fn write(client: &reqwest::Client, server: &Herdsman, key: &str, value: Option<&str>) -> (u16, String) {
    let url = server.url(&format!("/cache/{key}?ttl=3600"));
    let request = match value {
        Some(value) => client.put(url).body(value.to_string()),
        None => client.delete(server.url(&format!("/cache/{key}"))),
    };
    let response = request.send().await.expect("write");
    (response.status().as_u16(), tier(&response))
}

/// GET through `server`: the value, or `None` for a 404.
async fn read(client: &reqwest::Client, server: &Herdsman, key: &str) -> Option<String> {
    let response = client.get(server.url(&format!("/cache/{key}"))).send().await.expect("GET");
    match response.status().as_u16() {
        200 => Some(response.text().await.expect("body")),
        404 => None,
        status => panic!("GET {key}: {status}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_never_overwrites_or_undoes_a_write_acknowledged_after_it() {
    let Some(redis) = LocalRedis::start("a_replay_never_overwrites_or_undoes_a_write_acknowledged_after_it", &[])
    else {
        return;
    };
    let proxy = SlowProxy::start(redis.port).await;
    let a = instance(&proxy.url);
    let b = instance(&redis.url);
    let token = support::register_and_login(&reqwest::Client::new(), &b, "shared").await;
    let client = support::client_with_token(&token);
    // Both instances verify the session and hold a value of each key while Redis is healthy.
    assert_eq!(write(&client, &a, "k", Some("v0")).await, (204, "redis".into()));
    assert_eq!(write(&client, &b, "j", Some("j0")).await, (204, "redis".into()));
    assert_eq!(read(&client, &a, "j").await.as_deref(), Some("j0"));

    proxy.pause();
    let paused = Instant::now();
    assert_eq!(write(&client, &a, "k", Some("v1")).await, (204, "memory".into()), "A's PUT k during the pause");
    assert_eq!(write(&client, &a, "j", None).await, (204, "memory".into()), "A's DELETE j during the pause");
    assert_eq!(write(&client, &b, "k", Some("v2")).await, (204, "redis".into()), "B's PUT k after A's");
    assert_eq!(write(&client, &b, "j", Some("w")).await, (204, "redis".into()), "B's PUT j after A's DELETE");
    tokio::time::sleep(PAUSE.saturating_sub(paused.elapsed())).await;
    proxy.resume();
    // A replays what it holds before it reads from Redis again.
    let resumed = Instant::now();
    while tier(&client.get(a.url("/cache/k")).send().await.expect("GET k through A")) != "redis" {
        assert!(
            resumed.elapsed() < Duration::from_secs(10),
            "A not back on Redis within 10 s:\n{}",
            a.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // What each instance reads: B's two writes, acknowledged after A's, stay.
    let mut seen = Vec::new();
    for server in [&a, &b] {
        seen.push((read(&client, server, "k").await, read(&client, server, "j").await));
    }
    let expected = (Some("v2".to_string()), Some("w".to_string()));
    assert_eq!(
        seen,
        [expected.clone(), expected],
        "(k, j) through A then B: A's replay of its older PUT k=v1 and DELETE j replaced B's newer \
         acknowledged PUT k=v2 and PUT j=w"
    );
}
