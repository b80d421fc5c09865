//! Prometheus metrics, proven on the real binary: counts match the requests sent, survive a
//! worker's SIGKILL exactly while its gauges drop to what the live workers hold, restarts are
//! counted by reason, warm-up attempts by task and outcome, the main port's `/metrics` is
//! invisible without the token, and garbage on the metrics port does not hurt the master.

#[path = "support/redis.rs"]
mod redis_support;
mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use support::{start, Herdsman};

const SECS: fn(u64) -> Duration = Duration::from_secs;
const TOKEN: &str = "a-token-of-24-characters";

/// The port of the master's `/metrics`, from its log line.
fn metrics_port(server: &Herdsman) -> u16 {
    let line = server.wait_for_log("Serving metrics at: http://", SECS(5));
    line.rsplit(':').next().and_then(|p| p.trim_end_matches("/metrics").parse().ok()).expect("a port")
}

fn start_with_metrics(env: &[(&str, &str)]) -> (Herdsman, u16) {
    let mut env = env.to_vec();
    env.push(("HERDSMAN_METRICS_PORT", "0"));
    let server = start(&env);
    let port = metrics_port(&server);
    (server, port)
}

/// One request over a fresh connection; the status and body.
fn http(port: u16, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(SECS(10))).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn get(port: u16, path: &str) -> u16 {
    http(port, &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")).0
}

/// Registers a user and logs in over HTTP; the `Authorization` header line of its session.
fn logged_in(port: u16) -> String {
    let body = r#"{"username":"metrics-user","password":"a long enough password"}"#;
    let post = |path: &str| {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        http(port, &request)
    };
    assert!(matches!(post("/auth/register").0, 200 | 201), "register");
    let (status, answer) = post("/auth/login");
    assert_eq!(status, 200, "{answer}");
    let token = answer.split("\"token\":\"").nth(1).and_then(|rest| rest.split('"').next()).expect("a token");
    format!("Authorization: Bearer {token}\r\n")
}

/// Scrapes the master and checks the text format line by line; samples by `name{labels}`,
/// labels sorted by name.
fn scrape(port: u16) -> HashMap<String, f64> {
    let (status, body) = http(port, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(status, 200, "{body}");
    parse_strictly(&body)
}

/// Every line a comment (`# HELP`/`# TYPE` of a known family) or `name{k="v",...} value`.
fn parse_strictly(body: &str) -> HashMap<String, f64> {
    let mut typed = Vec::new();
    let mut samples = HashMap::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.push(rest.split(' ').next().unwrap().to_string());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number: {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') && !name.is_empty(),
            "bad name: {line:?}"
        );
        assert!(
            typed.iter().any(|family| name == family || name.starts_with(&format!("{family}_"))),
            "{name} has no TYPE line before it"
        );
        let mut labels: Vec<&str> = match series.split_once('{') {
            Some((_, labels)) => labels.strip_suffix('}').expect("closing brace").split("\",").collect(),
            None => vec![],
        };
        labels.iter_mut().for_each(|l| *l = l.trim_end_matches('"'));
        labels.sort();
        let key = if labels.is_empty() { name.to_string() } else { format!("{name}{{{}}}", labels.join(",")) };
        assert!(samples.insert(key, value).is_none(), "duplicate series: {line:?}");
    }
    // And a real parser agrees on the number of plain samples.
    let parsed = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("prometheus-parse");
    assert!(!parsed.samples.is_empty());
    samples
}

fn requests(samples: &HashMap<String, f64>, method: &str, route: &str, status: &str) -> f64 {
    let key = format!("herdsman_http_requests_total{{method=\"{method},route=\"{route},status=\"{status}}}");
    samples.get(&key).copied().unwrap_or(0.0)
}

fn restarts(samples: &HashMap<String, f64>, reason: &str) -> f64 {
    samples[&format!("herdsman_worker_restarts_total{{reason=\"{reason}}}")]
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "not within {timeout:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Two workers and a metrics port, after `n` answered `GET /live`, each on a new connection.
fn two_workers_after_gets_of_live(n: usize) -> (Herdsman, u16) {
    let (server, port) = start_with_metrics(&[("WEB_CONCURRENCY", "2")]);
    server.wait_for_nth_log("ready in", 2, SECS(5));
    for _ in 0..n {
        assert_eq!(get(server.port, "/live"), 200);
    }
    (server, port)
}

#[test]
fn counts_match_the_requests_sent_and_the_output_is_prometheus_text() {
    let (server, port) = two_workers_after_gets_of_live(30);
    for i in 0..5 {
        assert_eq!(get(server.port, &format!("/no-such-page-{i}")), 404);
    }
    let (status, _) =
        http(server.port, "POST /live HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    assert_eq!(status, 405);
    let samples = scrape(port);
    assert_eq!(requests(&samples, "GET", "/live", "2xx"), 30.0);
    assert_eq!(requests(&samples, "GET", "unmatched", "4xx"), 5.0, "raw paths never become labels");
    assert_eq!(requests(&samples, "POST", "/live", "4xx"), 1.0);
    assert!(!samples.keys().any(|k| k.contains("no-such-page")));
    assert_eq!(samples["herdsman_http_request_duration_seconds_count{route=\"/live}"], 31.0);
    assert_eq!(samples["herdsman_http_request_duration_seconds_bucket{le=\"+Inf,route=\"/live}"], 31.0);
    assert_eq!(samples["herdsman_workers"], 2.0);
    assert_eq!(samples["herdsman_http_requests_in_flight"], 0.0);
    assert!(samples["herdsman_worker_heartbeat_age_seconds"] < 30.0);
    assert_eq!(restarts(&samples, "crash"), 0.0);
}

#[test]
fn a_workers_counts_survive_its_sigkill_exactly() {
    let (server, port) = two_workers_after_gets_of_live(40);
    // Both workers served some of them (connections are spread); kill both at once.
    for pid in server.workers() {
        kill(pid, Signal::SIGKILL).unwrap();
    }
    server.wait_for_nth_log("ready in", 4, SECS(10));
    let samples = scrape(port);
    assert_eq!(requests(&samples, "GET", "/live", "2xx"), 40.0, "not one count lost to SIGKILL");
    assert_eq!(restarts(&samples, "killed"), 2.0);
    assert_eq!(samples["herdsman_http_requests_in_flight"], 0.0);
    // And the new workers count on top of the retired totals.
    assert_eq!(get(server.port, "/live"), 200);
    assert_eq!(requests(&scrape(port), "GET", "/live", "2xx"), 41.0);
}

#[test]
fn restarts_are_counted_by_reason() {
    let (server, port) = start_with_metrics(&[("WEB_CONCURRENCY", "2"), ("MAX_REQUESTS", "10")]);
    server.wait_for_nth_log("ready in", 2, SECS(5));
    for _ in 0..25 {
        assert_eq!(get(server.port, "/live"), 200);
    }
    wait_until("a worker recycled for MAX_REQUESTS", SECS(10), || restarts(&scrape(port), "max_requests") >= 1.0);

    let before = scrape(port);
    server.signal(Signal::SIGHUP);
    wait_until("both workers replaced by the rolling restart", SECS(15), || {
        restarts(&scrape(port), "reload") == restarts(&before, "reload") + 2.0
    });

    let victim = server.workers()[0];
    // A signal nothing in the worker handles: it dies of it, unasked.
    kill(victim, Signal::SIGUSR1).unwrap();
    wait_until("the crashed worker counted", SECS(10), || restarts(&scrape(port), "crash") == 1.0);
    let victim = server.workers()[0];
    kill(victim, Signal::SIGKILL).unwrap();
    wait_until("the killed worker counted", SECS(10), || restarts(&scrape(port), "killed") == 1.0);
    let samples = scrape(port);
    assert_eq!(restarts(&samples, "timeout"), 0.0);
    assert_eq!(restarts(&samples, "scale"), 0.0);
    assert_eq!(requests(&samples, "GET", "/live", "2xx"), 25.0, "recycled and reloaded workers keep their counts");
}

#[test]
fn the_main_ports_metrics_are_invisible_without_the_token() {
    let server = start(&[("WEB_CONCURRENCY", "1"), ("HERDSMAN_METRICS_TOKEN", TOKEN)]);
    server.wait_for_log("ready in", SECS(5));
    assert_eq!(get(server.port, "/live"), 200);
    assert_eq!(get(server.port, "/metrics"), 404);
    let with = |auth: &str| {
        http(
            server.port,
            &format!("GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n"),
        )
    };
    assert_eq!(with("Bearer a-token-of-24-characterz").0, 404);
    assert_eq!(with("Bearer a-token").0, 404);
    assert_eq!(with(&format!("Basic {TOKEN}")).0, 404);
    let (status, body) = with(&format!("Bearer {TOKEN}"));
    assert_eq!(status, 200);
    let samples = parse_strictly(&body);
    assert_eq!(requests(&samples, "GET", "/live", "2xx"), 1.0);
    assert_eq!(requests(&samples, "GET", "unmatched", "4xx"), 4.0, "refused scrapes look like any 404");

    let without = start(&[("WEB_CONCURRENCY", "1")]);
    without.wait_for_log("ready in", SECS(5));
    assert_eq!(get(without.port, "/metrics"), 404, "no token, no route");
}

#[test]
fn garbage_on_the_metrics_port_does_not_hurt_the_master() {
    let (server, port) = start_with_metrics(&[("WEB_CONCURRENCY", "1")]);
    server.wait_for_log("ready in", SECS(5));
    let workers = server.workers();
    assert_eq!(http(port, "\x16\x03\x01\x02\x00garbage\r\n\r\n").0, 400);
    let huge = format!("GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(64 * 1024));
    assert_ne!(http(port, &huge).0, 200, "oversized headers are refused");
    assert_eq!(get(port, "/anything-else"), 404);
    assert_eq!(http(port, "DELETE /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").0, 405);
    // Idle connections beyond the limit are closed, and do not stop a real scrape.
    let idle: Vec<TcpStream> = (0..40).filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok()).collect();
    std::thread::sleep(Duration::from_millis(200));
    drop(idle);
    assert_eq!(scrape(port)["herdsman_workers"], 1.0);
    assert_eq!(server.workers(), workers, "the workers never noticed");
    assert_eq!(get(server.port, "/live"), 200);
}

#[test]
fn warm_ups_are_counted_and_requests_under_route_templates() {
    let (server, port) = start_with_metrics(&[("WEB_CONCURRENCY", "1")]);
    server.wait_for_log("warm-up bcrypt_prewarm done", SECS(10));
    // Without Redis there are no sessions: /cache answers 401, still under its template.
    assert_eq!(get(server.port, "/cache/k1"), 401);
    assert_eq!(get(server.port, "/cache/k2"), 401);
    let samples = scrape(port);
    assert_eq!(requests(&samples, "GET", "/cache/{key}", "4xx"), 2.0, "the template, not the key");
    assert_eq!(samples["herdsman_warmup_attempts_total{outcome=\"ok,task=\"bcrypt_prewarm}"], 1.0);
    assert_eq!(
        samples["herdsman_warmup_duration_seconds_count{task=\"bcrypt_prewarm}"], 1.0,
        "the bcrypt prewarm's one attempt"
    );
    // A gauge: the prewarm's hash has left the queue by now, or does within moments.
    wait_until("the bcrypt queue is empty", SECS(5), || scrape(port)["herdsman_bcrypt_queue_depth"] == 0.0);
    assert_eq!(samples["herdsman_redis_breaker_open_workers"], 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_reads_and_the_breaker_are_counted_through_an_outage() {
    let Some(redis) = redis_support::TestRedis::start().await else { return };
    let (server, port) = start_with_metrics(&[("WEB_CONCURRENCY", "1"), ("REDIS_URL", &redis.url)]);
    server.wait_for_log("redis connected", SECS(10));
    let session = logged_in(server.port);
    let cache_get = |key: &str| {
        http(server.port, &format!("GET /cache/{key} HTTP/1.1\r\nHost: x\r\n{session}Connection: close\r\n\r\n")).0
    };
    let put = format!("PUT /cache/k HTTP/1.1\r\nHost: x\r\n{session}Content-Length: 1\r\nConnection: close\r\n\r\nv");
    assert_eq!(http(server.port, &put).0, 204);
    assert_eq!(cache_get("k"), 200);
    assert_eq!(cache_get("absent"), 404);
    let ops = |samples: &HashMap<String, f64>, op: &str, tier: &str, result: &str| {
        samples[&format!("herdsman_cache_operations_total{{op=\"{op},result=\"{result},tier=\"{tier}}}")]
    };
    let samples = scrape(port);
    assert_eq!(ops(&samples, "write", "redis", "ok"), 1.0);
    assert_eq!(ops(&samples, "get", "redis", "hit"), 1.0);
    assert_eq!(ops(&samples, "get", "redis", "miss"), 1.0);
    assert_eq!(samples["herdsman_redis_breaker_open_workers"], 0.0);

    redis.stop().await;
    // The first read after the stop fails over Redis and opens the breaker; it is answered.
    assert_eq!(cache_get("k"), 200);
    let samples = scrape(port);
    assert_eq!(samples["herdsman_redis_breaker_transitions_total{to=\"open}"], 1.0);
    assert_eq!(samples["herdsman_redis_breaker_open_workers"], 1.0);
    assert!(ops(&samples, "get", "memory", "hit") >= 1.0);

    redis.restart().await;
    wait_until("the breaker closed again", SECS(15), || {
        scrape(port)["herdsman_redis_breaker_transitions_total{to=\"closed}"] == 1.0
    });
    assert_eq!(scrape(port)["herdsman_redis_breaker_open_workers"], 0.0);
}

/// Whether `name` is a counter's sample (or a histogram's, whose samples only grow too).
#[cfg(feature = "test-hooks")]
fn only_grows(name: &str) -> bool {
    ["_total", "_count", "_sum", "_bucket"].iter().any(|suffix| name.split('{').next().unwrap().ends_with(suffix))
}

/// Whether the peer closed `stream` (its worker died), without waiting for a reply.
#[cfg(feature = "test-hooks")]
fn closed(stream: &mut TcpStream) -> bool {
    stream.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => panic!("a sleeping request answered early"),
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

#[cfg(feature = "test-hooks")]
#[test]
fn a_killed_workers_gauges_drop_to_the_live_workers_and_no_counter_goes_back() {
    let (server, port) = two_workers_after_gets_of_live(10);
    // Requests that stay in flight for a minute, on connections of their own.
    let sleep = "GET /__test/sleep?ms=60000 HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut stream = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
            stream.write_all(sleep.as_bytes()).unwrap();
            stream
        })
        .collect();
    wait_until("both requests in flight", SECS(10), || scrape(port)["herdsman_http_requests_in_flight"] == 2.0);
    let before = scrape(port);

    // Kill one worker; if it held neither request, kill the other too, so that at least one
    // request dies in flight with its worker.
    let workers = server.workers();
    let mut killed = 0;
    for pid in workers {
        kill(pid, Signal::SIGKILL).unwrap();
        killed += 1;
        wait_until("the kill reaped", SECS(10), || restarts(&scrape(port), "killed") == killed as f64);
        if held.iter_mut().any(closed) {
            break;
        }
    }
    let still_held = held.iter_mut().map(closed).filter(|gone| !gone).count();
    assert!(still_held < 2, "a killed worker held a request");
    server.wait_for_nth_log("ready in", 2 + killed, SECS(10));
    wait_until("both workers serving again", SECS(10), || scrape(port)["herdsman_workers"] == 2.0);

    let after = scrape(port);
    assert_eq!(
        after["herdsman_http_requests_in_flight"], still_held as f64,
        "in flight: only what the live workers hold, not the dead worker's request"
    );
    assert_eq!(after["herdsman_redis_breaker_open_workers"], 0.0);
    // The replacements' own bcrypt pre-warm may still be queued; then nothing is.
    wait_until("no hash queued", SECS(10), || scrape(port)["herdsman_bcrypt_queue_depth"] == 0.0);
    assert!(after["herdsman_worker_heartbeat_age_seconds"] < 5.0);
    assert_eq!(requests(&after, "GET", "/live", "2xx"), 10.0, "the answered requests, exactly");
    for (series, value) in before.iter().filter(|(series, _)| only_grows(series)) {
        let now = after.get(series).copied().unwrap_or_else(|| panic!("{series} vanished"));
        assert!(now >= *value, "{series} went back from {value} to {now}");
    }
    drop(held);
}

#[cfg(feature = "test-hooks")]
#[test]
fn warm_up_attempts_are_counted_by_task_and_outcome() {
    let (server, port) = start_with_metrics(&[
        ("WEB_CONCURRENCY", "1"),
        ("BCRYPT_COST", "4"),
        // Required, fails twice (retried after 1 s, then 2 s), then succeeds.
        ("HERDSMAN_TEST_WARMUP_FAIL_TIMES", "2"),
        // Blocks its thread for 3 s against a 1 s timeout.
        ("HERDSMAN_TEST_WARMUP_BLOCK_MS", "3000"),
        ("STARTUP_OPERATION_TIMEOUT", "1"),
    ]);
    server.wait_for_log("warm-up test_flaky done", SECS(20));
    server.wait_for_log("warm-up test_blocking finished late", SECS(10));
    let samples = scrape(port);
    let attempts = |task: &str, outcome: &str| {
        samples[&format!("herdsman_warmup_attempts_total{{outcome=\"{outcome},task=\"{task}}}")]
    };
    assert_eq!(
        [attempts("test_flaky", "failed"), attempts("test_flaky", "ok"), attempts("test_flaky", "timed_out")],
        [2.0, 1.0, 0.0]
    );
    assert_eq!(
        [attempts("test_blocking", "timed_out"), attempts("test_blocking", "ok"), attempts("test_blocking", "failed")],
        [1.0, 0.0, 0.0],
        "a late finish is logged, not counted as a second attempt"
    );
    assert_eq!(attempts("bcrypt_prewarm", "ok"), 1.0);
    let duration =
        |task: &str, what: &str| samples[&format!("herdsman_warmup_duration_seconds_{what}{{task=\"{task}}}")];
    assert_eq!(duration("test_flaky", "count"), 3.0);
    assert_eq!(duration("test_blocking", "count"), 1.0);
    assert_eq!(duration("test_blocking", "sum"), 1.0, "a timed-out attempt counts its timeout");
    let tasks: std::collections::BTreeSet<&str> = samples
        .keys()
        .filter_map(|k| k.strip_prefix("herdsman_warmup_attempts_total{"))
        .filter_map(|labels| labels.split("task=\"").nth(1))
        .map(|task| task.trim_end_matches('}'))
        .collect();
    assert_eq!(
        tasks.into_iter().collect::<Vec<_>>(),
        ["bcrypt_prewarm", "test_blocking", "test_flaky"],
        "the tasks this worker registered, and no `other`"
    );
}
