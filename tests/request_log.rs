//! Request IDs, queue time and the access log, on the real binary over raw HTTP/1.1:
//! `X-Request-ID` kept when sane and made up otherwise, `X-Request-Start` read only behind a
//! trusted proxy and counted in `herdsman_http_request_queue_seconds`, and one JSON access line
//! per request only with `HERDSMAN_ACCESS_LOG=true`.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::{start, Herdsman};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Sends `GET path` with `headers` (each `Name: value`) on a fresh connection; status and the
/// response's headers, lower-cased names.
fn get(port: u16, path: &str, headers: &[&str]) -> (u16, Vec<(String, String)>, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(SECS(10))).expect("timeout");
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: t\r\n{extra}Connection: close\r\n\r\n").expect("send");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let fields = head
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    (status, fields, body.to_string())
}

fn header<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_millis()
}

fn access_lines(server: &Herdsman) -> Vec<serde_json::Value> {
    server
        .logs()
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["msg"] == "request" && line.get("status").is_some())
        .collect()
}

#[test]
fn a_sane_request_id_is_echoed_and_any_other_is_replaced() {
    let server = start(&[("WEB_CONCURRENCY", "1")]);
    let (status, fields, _) = get(server.port, "/live", &["X-Request-ID: 6f1c-router-id"]);
    assert_eq!(status, 200);
    assert_eq!(header(&fields, "x-request-id"), Some("6f1c-router-id"));

    for insane in ["X-Request-ID: has spaces in it", &format!("X-Request-ID: {}", "a".repeat(201))] {
        let (_, fields, _) = get(server.port, "/live", &[insane]);
        let id = header(&fields, "x-request-id").expect("an ID is always answered");
        assert!(id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()), "made up: {id:?}");
    }
    let (_, a, _) = get(server.port, "/nowhere", &[]);
    let (_, b, _) = get(server.port, "/nowhere", &[]);
    assert_ne!(header(&a, "x-request-id"), header(&b, "x-request-id"), "every request its own, 404s too");
}

#[test]
fn the_access_log_is_off_by_default_and_one_json_line_per_request_when_on() {
    let quiet = start(&[("WEB_CONCURRENCY", "1"), ("LOG_FORMAT", "json")]);
    assert_eq!(get(quiet.port, "/live", &[]).0, 200);
    std::thread::sleep(Duration::from_millis(300));
    assert!(access_lines(&quiet).is_empty(), "no access line unless asked for");

    let server = start(&[
        ("WEB_CONCURRENCY", "1"),
        ("LOG_FORMAT", "json"),
        ("HERDSMAN_ACCESS_LOG", "true"),
        ("HERDSMAN_TRUSTED_PROXIES", "1"),
    ]);
    let start_header = format!("X-Request-Start: t={}", now_ms() - 250);
    let headers = ["X-Request-ID: access-1", "X-Forwarded-For: 203.0.113.9, 198.51.100.7", start_header.as_str()];
    assert_eq!(get(server.port, "/live?token=secret", &headers).0, 200);
    assert_eq!(get(server.port, "/missing", &[]).0, 404);
    let deadline = std::time::Instant::now() + SECS(5);
    while access_lines(&server).len() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let lines = access_lines(&server);
    assert_eq!(lines.len(), 2, "one line per request: {lines:?}");
    let live = &lines[0];
    assert_eq!(live["method"], "GET");
    assert_eq!(live["path"], "/live", "no query string: it may carry secrets");
    assert_eq!(live["status"], 200);
    assert_eq!(live["bytes"], 2);
    assert_eq!(live["request_id"], "access-1");
    assert_eq!(live["client"], "198.51.100.7", "one trusted hop: the right-most address");
    let queue_ms = live["queue_ms"].as_f64().expect("a queue time");
    assert!((240.0..5_000.0).contains(&queue_ms), "waited about 250 ms: {queue_ms}");
    assert!(live["duration_ms"].as_f64().is_some_and(|ms| ms >= 0.0));
    assert!(!server.logs().iter().any(|l| l.contains("secret")), "the query never reaches the log");
    let missing = &lines[1];
    assert_eq!((missing["path"].as_str(), missing["status"].as_u64()), (Some("/missing"), Some(404)));
    assert!(missing["queue_ms"].is_null(), "no X-Request-Start, no queue time");
}

/// The master's metrics port, from its `Serving metrics at:` line.
fn metrics_port(server: &Herdsman) -> u16 {
    let line = server.wait_for_log("Serving metrics at:", SECS(5));
    let address = line.split("http://").nth(1).and_then(|rest| rest.split('/').next()).expect("an address");
    address.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port")
}

fn queue_count(port: u16) -> f64 {
    let (status, _, body) = get(port, "/metrics", &[]);
    assert_eq!(status, 200);
    body.lines()
        .find_map(|line| line.strip_prefix("herdsman_http_request_queue_seconds_count "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the queue-time histogram")
}

#[test]
fn queue_time_is_counted_only_when_a_proxy_is_trusted_to_set_it() {
    let stamp = format!("X-Request-Start: {}", now_ms() - 100);
    let trusting =
        start(&[("WEB_CONCURRENCY", "1"), ("HERDSMAN_METRICS_PORT", "0"), ("HERDSMAN_TRUSTED_PROXIES", "1")]);
    let port = metrics_port(&trusting);
    assert_eq!(get(trusting.port, "/live", &[stamp.as_str()]).0, 200);
    assert_eq!(get(trusting.port, "/live", &["X-Request-Start: garbage"]).0, 200);
    assert_eq!(queue_count(port), 1.0, "the stamped request, not the garbage");

    let open = start(&[("WEB_CONCURRENCY", "1"), ("HERDSMAN_METRICS_PORT", "0")]);
    let port = metrics_port(&open);
    assert_eq!(get(open.port, "/live", &[stamp.as_str()]).0, 200);
    assert_eq!(queue_count(port), 0.0, "a client's own X-Request-Start is not believed");
}
