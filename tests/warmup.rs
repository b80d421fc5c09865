//! The failure herdsman exists to end, reproduced on the real binary: warm-up tasks written the
//! blocking way, panicking or failing, and a worker whose runtime blocks before it serves.
//! The misbehaving warm-ups are the `test-hooks` ones in `src/warmup.rs`, switched on by
//! variables.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{start_with_health as start, Herdsman};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// One request on a fresh connection (so that every worker gets some): status and body.
fn get(server: &Herdsman, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    stream.set_read_timeout(Some(SECS(10))).expect("set a read timeout");
    // The metrics token opens /health's details (and changes nothing else here).
    let token = support::HEALTH_TOKEN;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read the answer");
    let status = response.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn json(server: &Herdsman, path: &str) -> (u16, Value) {
    let (status, body) = get(server, path);
    (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path} answered no JSON ({e}): {body:?}")))
}

/// `checks.<task>` of `/health`.
fn check(server: &Herdsman, task: &str) -> Value {
    json(server, "/health").1["checks"][task].clone()
}

/// Polls until `check(task).state == state`; panics with the last answer after `timeout`.
fn wait_for_state(server: &Herdsman, task: &str, state: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let now = check(server, task);
        if now["state"] == state {
            return now;
        }
        assert!(Instant::now() < deadline, "{task} never became {state}: {now}; logs:\n{}", server.logs().join("\n"));
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_warmup_that_blocks_its_thread_longer_than_the_timeout_leaves_every_worker_serving() {
    // The seed's failure: each worker's warm-up blocks its thread for 6 s, three times
    // GUNICORN_TIMEOUT. Under gunicorn (and herdsman before), no request is answered and both
    // workers are killed at the timeout, again and again.
    let server = start(&[
        ("WEB_CONCURRENCY", "2"),
        ("GUNICORN_TIMEOUT", "2"),
        ("STARTUP_OPERATION_TIMEOUT", "1"),
        ("HERDSMAN_TEST_WARMUP_BLOCK_MS", "6000"),
    ]);
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut answered = 0;
    let mut saw_timed_out = false;
    // From the first millisecond to past the end of the block, on fresh connections.
    while started.elapsed() < SECS(7) {
        let sent = Instant::now();
        let (status, body) = get(&server, "/live");
        slowest = slowest.max(sent.elapsed());
        assert_eq!((status, body.as_str()), (200, "ok"), "/live at {:?}", started.elapsed());
        answered += 1;
        if !saw_timed_out && started.elapsed() > Duration::from_millis(1500) {
            let blocking = check(&server, "test_blocking");
            if blocking["state"] == "timed_out" {
                assert_eq!(blocking["after_ms"], 1000, "{blocking}");
                saw_timed_out = true;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("/live answered {answered} times through the blocking warm-up; slowest {slowest:?}");
    assert!(saw_timed_out, "test_blocking was never reported timed_out while it blocked");
    // A blocked runtime would have held requests for seconds, then the worker would have died.
    assert!(slowest < SECS(1), "the slowest /live took {slowest:?}");
    assert_eq!(server.count_logs("WORKER TIMEOUT"), 0, "no worker may be aborted:\n{}", server.logs().join("\n"));
    assert_eq!(server.count_logs("ready in"), 2, "no worker was replaced");
    assert_eq!(server.workers().len(), 2);
    // The abandoned attempt finished late: logged, and only then recorded as ok.
    server.wait_for_nth_log("warm-up test_blocking finished late", 2, SECS(5));
    let done = wait_for_state(&server, "test_blocking", "ok", SECS(2));
    assert!(done["duration_ms"].as_u64().unwrap_or(0) >= 6000, "{done}");
}

#[test]
fn a_panicking_required_warmup_is_failed_with_its_message_keeps_ready_at_503_and_is_retried() {
    let server =
        start(&[("WEB_CONCURRENCY", "1"), ("HERDSMAN_TEST_WARMUP_PANIC", "1"), ("HERDSMAN_WARMUP_RETRY_MAX", "1")]);
    let failed = wait_for_state(&server, "test_panic", "failed", SECS(5));
    assert!(
        failed["reason"].as_str().unwrap_or("").contains("panicked: test hook: a warm-up panicked on purpose"),
        "{failed}"
    );
    let (status, ready) = json(&server, "/ready");
    assert_eq!(status, 503, "{ready}");
    assert!(ready["reason"].as_str().unwrap_or("").contains("test_panic (failed: panicked"), "{ready}");
    assert_eq!(json(&server, "/health").1["status"], "degraded");
    // Retried with back-off, in the same worker, which serves all along.
    server.wait_for_log("warm-up test_panic is required: trying again in", SECS(5));
    let deadline = Instant::now() + SECS(10);
    while check(&server, "test_panic")["attempts"].as_u64().unwrap_or(0) < 3 {
        assert!(Instant::now() < deadline, "not retried: {}", check(&server, "test_panic"));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(get(&server, "/live").0, 200);
    assert_eq!(server.count_logs("ready in"), 1, "the worker was never replaced");
}

#[test]
fn a_required_warmup_that_fails_twice_is_retried_until_the_worker_is_ready() {
    let server = start(&[("WEB_CONCURRENCY", "1"), ("HERDSMAN_TEST_WARMUP_FAIL_TIMES", "2")]);
    let failed = wait_for_state(&server, "test_flaky", "failed", SECS(5));
    assert!(failed["reason"].as_str().unwrap_or("").contains("fails on purpose"), "{failed}");
    let (status, ready) = json(&server, "/ready");
    assert_eq!(status, 503, "{ready}");
    assert!(ready["reason"].as_str().unwrap_or("").contains("test_flaky (failed: test hook: attempt"), "{ready}");
    // Waits of about 1 s then 2 s, each ±20%.
    let ok = wait_for_state(&server, "test_flaky", "ok", SECS(8));
    assert_eq!(ok["attempts"], 3, "{ok}");
    assert_eq!(json(&server, "/ready").0, 200);
    assert_eq!(server.count_logs("warm-up test_flaky is required: trying again in"), 2);
}

#[test]
fn workers_whose_runtime_blocks_before_they_serve_are_failed_boots_and_the_loop_ends_with_status_3() {
    // A warm-up that spawns blocking work onto the serving runtime: the mistake its own thread
    // cannot absorb. Each worker is ready, then silent before it serves anything: a crash loop
    // that must end at HERDSMAN_BOOT_ATTEMPTS, not go on for ever.
    let mut server = start(&[
        ("WEB_CONCURRENCY", "2"),
        ("GUNICORN_TIMEOUT", "1"),
        ("HERDSMAN_BOOT_ATTEMPTS", "3"),
        ("HERDSMAN_TEST_WARMUP_SPAWN_BLOCK_MS", "60000"),
        // Still running when the worker is aborted: the diagnostics must name it.
        ("HERDSMAN_TEST_WARMUP_BLOCK_MS", "60000"),
        ("STARTUP_OPERATION_TIMEOUT", "30"),
    ]);
    let status = server.wait_exit(SECS(30));
    let logs = server.logs().join("\n");
    assert_eq!(status.code(), Some(3), "{logs}");
    assert!(server.count_logs("ready in") >= 3, "the workers were ready before they blocked:\n{logs}");
    // Two workers can fail in the same tick, so the count may pass 3 by one.
    let last = server.wait_for_log("no worker became ready and useful after", SECS(1));
    let attempts: u32 = last
        .split("useful after ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!((3..=4).contains(&attempts), "{last}");
    assert!(last.contains("stopped beating before it served a request"), "{last}");
    let running = server.wait_for_log("warm-up still running:", SECS(1));
    assert!(running.contains("test_blocking"), "{running}");
}

#[test]
fn a_worker_that_served_and_then_hangs_is_not_a_failed_boot() {
    // The boot-attempt limit is for workers that never did their job: one that answered
    // requests and then hung is replaced, as many times as it takes.
    let server = start(&[("WEB_CONCURRENCY", "1"), ("GUNICORN_TIMEOUT", "1"), ("HERDSMAN_BOOT_ATTEMPTS", "1")]);
    for round in 1..=2 {
        server.wait_for_nth_log("ready in", round, SECS(10));
        assert_eq!(get(&server, "/live").0, 200);
        // The heartbeat after that request tells the master it served.
        std::thread::sleep(Duration::from_millis(600));
        let port = server.port;
        std::thread::spawn(move || {
            let _ = TcpStream::connect(("127.0.0.1", port))
                .and_then(|mut s| s.write_all(b"GET /__test/block?ms=20000 HTTP/1.1\r\nHost: x\r\n\r\n").map(|_| s))
                .map(|mut s| s.read(&mut [0u8; 64]));
        });
        server.wait_for_nth_log("WORKER TIMEOUT", round, SECS(10));
    }
    server.wait_for_nth_log("ready in", 3, SECS(10));
    assert_eq!(server.count_logs("exiting with status 3"), 0, "{}", server.logs().join("\n"));
    assert_eq!(get(&server, "/live").0, 200);
}
