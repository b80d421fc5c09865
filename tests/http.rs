//! The HTTP promises of a worker, on the real binary: health endpoints, slow headers, large
//! bodies, slow handlers, panicking handlers.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::{start, start_with_health};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_answer_from_the_first_request() {
    let server = start_with_health(&[("WEB_CONCURRENCY", "1")]);
    let live = reqwest::get(server.url("/live")).await.unwrap();
    assert_eq!(live.status(), 200);
    assert_eq!(live.text().await.unwrap(), "ok");
    let ready = reqwest::get(server.url("/ready")).await.unwrap();
    assert_eq!(ready.status(), 200);
    // Anonymous: liveness only, nothing about the worker or its dependencies.
    let anonymous: serde_json::Value = reqwest::get(server.url("/health")).await.unwrap().json().await.unwrap();
    assert_eq!(anonymous, serde_json::json!({ "status": "ok" }));
    let wrong = reqwest::Client::new().get(server.url("/health")).bearer_auth("not-the-token-at-all").send();
    assert_eq!(wrong.await.unwrap().json::<serde_json::Value>().await.unwrap(), anonymous);
    // With the metrics token: the details.
    let health = support::health_details(&reqwest::Client::new(), &server).await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"));
    // The pid is the answering worker's, the uptime that worker's: it has just started.
    let pid = nix::unistd::Pid::from_raw(health["pid"].as_i64().unwrap() as i32);
    assert_eq!(server.workers(), [pid], "{health}");
    let uptime = health["uptime_s"].as_f64().unwrap();
    assert!((0.0..10.0).contains(&uptime), "seconds since this worker started: {health}");
    assert!(health["checks"].is_object());
}

#[test]
fn headers_sent_too_slowly_are_cut_off() {
    let server = start(&[("WEB_CONCURRENCY", "1"), ("HERDSMAN_HEADER_TIMEOUT", "1")]);
    let mut stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(b"GET /live HTTP/1.1\r\nHost: slow\r\n").unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    // The server closes the connection: read ends with EOF (or a reset), not with our timeout.
    let _ = stream.read_to_end(&mut rest);
    let waited = started.elapsed();
    // Closed without an answer, or with a 408 (the request was never complete).
    let answer = String::from_utf8_lossy(&rest);
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(waited < Duration::from_secs(5), "cut off after {waited:?}");
    assert!(waited >= Duration::from_millis(800), "not before the timeout: {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413_and_the_worker_lives_on() {
    let server = start(&[("WEB_CONCURRENCY", "1"), ("HERDSMAN_MAX_BODY_BYTES", "1024")]);
    let client = reqwest::Client::new();
    let response = client.post(server.url("/live")).body(vec![b'x'; 4096]).send().await.unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(reqwest::get(server.url("/live")).await.unwrap().status(), 200);
}

#[test]
fn oversized_chunked_bodies_get_413_too() {
    // No Content-Length to refuse up front: the body is cut off once it passes the limit.
    let server = start(&[("WEB_CONCURRENCY", "1"), ("HERDSMAN_MAX_BODY_BYTES", "1024")]);
    let mut stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    // A route that reads its body (register parses JSON before anything else).
    let head = "POST /auth/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    stream.write_all(head.as_bytes()).unwrap();
    for _ in 0..4 {
        let _ = stream.write_all(b"400\r\n");
        let _ = stream.write_all(&[b'x'; 1024]);
        let _ = stream.write_all(b"\r\n");
    }
    let _ = stream.write_all(b"0\r\n\r\n");
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut response = [0u8; 512];
    let n = stream.read(&mut response).unwrap();
    let response = String::from_utf8_lossy(&response[..n]);
    assert!(response.starts_with("HTTP/1.1 413"), "{response:?}");
}

/// Sends `GET /live` with one header of `bytes` bytes; the status line of the answer.
fn live_with_a_header_of(port: u16, bytes: usize) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let head = format!("GET /live HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "a".repeat(bytes));
    let _ = stream.write_all(head.as_bytes());
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).lines().next().unwrap_or_default().to_string()
}

#[test]
fn a_request_head_over_64_kib_gets_431_and_the_worker_lives_on() {
    let server = start(&[("WEB_CONCURRENCY", "1")]);
    assert_eq!(live_with_a_header_of(server.port, 48 * 1024), "HTTP/1.1 200 OK");
    assert_eq!(live_with_a_header_of(server.port, 70 * 1024), "HTTP/1.1 431 Request Header Fields Too Large");
    assert_eq!(live_with_a_header_of(server.port, 100), "HTTP/1.1 200 OK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_gets_503_at_the_request_timeout() {
    let server = start(&[("WEB_CONCURRENCY", "1"), ("HERDSMAN_REQUEST_TIMEOUT", "0.5")]);
    let started = Instant::now();
    let response = reqwest::get(server.url("/__test/sleep?ms=5000")).await.unwrap();
    assert_eq!(response.status(), 503);
    assert!(started.elapsed() < Duration::from_secs(3));
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("longer than 0.5s"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_gets_500_and_the_worker_lives_on() {
    // With RUST_BACKTRACE=1, Rust's default panic hook would write `panicked at` and a
    // `stack backtrace:`; herdsman's hook writes one log line.
    let server = start(&[("WEB_CONCURRENCY", "1"), ("RUST_BACKTRACE", "1")]);
    server.wait_for_workers(1, Duration::from_secs(5));
    let worker = server.workers();
    let response = reqwest::get(server.url("/__test/panic")).await.unwrap();
    assert_eq!(response.status(), 500);
    assert_eq!(reqwest::get(server.url("/live")).await.unwrap().status(), 200);
    let line = server.wait_for_log("panic: test hook: a handler panicked on purpose", Duration::from_secs(2));
    assert!(line.contains("[worker] ERROR"), "{line}");
    assert_eq!(server.workers(), worker, "the same worker still serves");
    assert_eq!(server.count_logs("ready in"), 1, "the same worker still serves");
    let logs = server.logs();
    assert!(!logs.iter().any(|l| l.contains("stack backtrace") || l.contains("panicked at")), "{}", logs.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400() {
    let server = start(&[("WEB_CONCURRENCY", "1")]);
    let mut stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    stream.write_all(b"NOT A REQUEST\r\n\r\n").unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 400"), "{response:?}");
    assert_eq!(reqwest::get(server.url("/live")).await.unwrap().status(), 200);
}

#[test]
fn the_healthcheck_command_sees_a_running_server() {
    let server = start(&[("WEB_CONCURRENCY", "1")]);
    server.wait_for_log("ready in", Duration::from_secs(5));
    let port = server.port.to_string();
    let (status, output) = support::run_to_exit(&["healthcheck"], &[("PORT", &port), ("HERDSMAN_HOST", "127.0.0.1")]);
    assert!(status.success(), "{output}");
}

#[test]
fn a_burst_of_keep_alive_connections_is_spread_over_the_workers() {
    let server = start_with_health(&[("WEB_CONCURRENCY", "2")]);
    server.wait_for_nth_log("ready in", 2, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(300)); // both workers have stamped their slot
                                                    // A connection pool opened all at once, as a load balancer or a benchmark does.
    let mut streams: Vec<TcpStream> =
        (0..40).map(|_| TcpStream::connect(("127.0.0.1", server.port)).expect("connect")).collect();
    let mut per_pid = std::collections::HashMap::<u64, usize>::new();
    for stream in &mut streams {
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let request =
            format!("GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n", support::HEALTH_TOKEN);
        stream.write_all(request.as_bytes()).unwrap();
        let mut buf = vec![0u8; 4096];
        let n = stream.read(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        let body = text.split("\r\n\r\n").nth(1).expect("a body");
        let health: serde_json::Value = serde_json::from_str(body).expect("health JSON in one read");
        *per_pid.entry(health["pid"].as_u64().unwrap()).or_default() += 1;
    }
    let counts: Vec<usize> = per_pid.values().copied().collect();
    assert_eq!(counts.len(), 2, "both workers hold connections: {per_pid:?}");
    assert!(counts.iter().all(|&n| n >= 15), "roughly even (each within a few of 20): {per_pid:?}");
}
