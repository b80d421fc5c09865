//! Cleartext HTTP/2 with prior knowledge (h2c) next to HTTP/1.1 on the one port, on the real
//! binary with real clients: curl, h2load and nghttp (Debian's `nghttp2-client`; scripts/test.sh
//! installs it), and raw frames where a test must see the bytes (`GOAWAY`, an idle connection).

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use support::{read_h2_frame, start, Herdsman, H2_PREFACE};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Runs a client to completion and returns its stdout; panics with its stderr if it failed.
fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} cannot run ({e}): install nghttp2-client and curl"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{program} {args:?} failed: {stdout}{}", String::from_utf8_lossy(&output.stderr));
    stdout
}

/// `HTTP-version status` of one GET with curl.
fn curl(version_flag: &str, url: &str) -> String {
    run("curl", &["-sS", "-o", "/dev/null", "-w", "%{http_version} %{http_code}", version_flag, url])
}

#[test]
fn http2_with_prior_knowledge_and_http1_share_the_port_behind_the_same_guard() {
    let server =
        start(&[("WEB_CONCURRENCY", "1"), ("HERDSMAN_REQUEST_TIMEOUT", "1"), ("HERDSMAN_MAX_BODY_BYTES", "1000")]);
    server.wait_for_log("ready in", SECS(5));
    assert_eq!(curl("--http2-prior-knowledge", &server.url("/live")), "2 200");
    assert_eq!(curl("--http1.1", &server.url("/live")), "1.1 200");
    // The guard answers h2 streams as it answers HTTP/1.1 requests.
    // nghttp, not curl: the 413 arrives while the body is still being sent, followed by
    // RST_STREAM(NO_ERROR) as RFC 9113 section 8.1 allows; curl 7.88 then reports a framing
    // error instead of the response.
    let body = std::env::temp_dir().join(format!("herdsman-h2c-body-{}", std::process::id()));
    std::fs::write(&body, vec![b'x'; 5000]).expect("write the request body");
    let answer = run(
        "nghttp",
        &["-v", "-H", ":method: PUT", "-d", body.to_str().expect("a UTF-8 path"), &server.url("/cache/k")],
    );
    let _ = std::fs::remove_file(&body);
    assert!(answer.contains(":status: 413"), "{answer}");
    assert_eq!(curl("--http2-prior-knowledge", &server.url("/__test/sleep?ms=3000")), "2 503");
    assert_eq!(curl("--http2-prior-knowledge", &server.url("/__test/panic")), "2 500");
    assert_eq!(curl("--http2-prior-knowledge", &server.url("/live")), "2 200", "the worker lives on");
}

#[test]
fn the_server_limits_streams_per_connection_and_h2load_gets_every_request_answered() {
    let server = start(&[("WEB_CONCURRENCY", "2")]);
    server.wait_for_nth_log("ready in", 2, SECS(5));
    let settings = run("nghttp", &["-nv", &server.url("/live")]);
    assert!(settings.contains("SETTINGS_MAX_CONCURRENT_STREAMS(0x03):100"), "{settings}");
    assert!(settings.contains("SETTINGS_MAX_HEADER_LIST_SIZE(0x06):16384"), "{settings}");
    // More streams asked for than allowed: h2load keeps to the server's limit, nothing fails.
    let report = run("h2load", &["-n", "4000", "-c", "4", "-m", "150", &server.url("/live")]);
    assert!(
        report.contains("requests: 4000 total, 4000 started, 4000 done, 4000 succeeded, 0 failed, 0 errored"),
        "{report}"
    );
    assert!(report.contains("status codes: 4000 2xx"), "{report}");
}

const GOAWAY: u8 = 0x7;
const HEADERS: u8 = 0x1;

const PING: u8 = 0x6;

fn connect_h2(server: &Herdsman) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    stream.set_read_timeout(Some(SECS(15))).unwrap();
    stream.write_all(H2_PREFACE).unwrap();
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_sends_goaway_lets_open_streams_finish_and_completes() {
    let mut server = start(&[("WEB_CONCURRENCY", "1"), ("GRACEFUL_TIMEOUT", "20")]);
    server.wait_for_log("ready in", SECS(5));
    let slow_url = server.url("/__test/sleep?ms=2000");
    let slow = tokio::task::spawn_blocking(move || curl("--http2-prior-knowledge", &slow_url));
    let mut idle = connect_h2(&server);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let sent_term = Instant::now();
    server.signal(Signal::SIGTERM);
    let idle_frames = tokio::task::spawn_blocking(move || {
        let mut types = Vec::new();
        while let Some((kind, flags, payload)) = read_h2_frame(&mut idle) {
            types.push(kind);
            // hyper's graceful GOAWAY waits for a PING's answer before it closes, as a live
            // client gives it.
            if kind == PING && flags & 0x1 == 0 {
                let mut ack = vec![0, 0, 8, PING, 0x1, 0, 0, 0, 0];
                ack.extend_from_slice(&payload);
                let _ = idle.write_all(&ack);
            }
        }
        types
    });
    assert_eq!(slow.await.unwrap(), "2 200", "the stream in flight finishes");
    let types = idle_frames.await.unwrap();
    assert!(types.contains(&GOAWAY), "the idle h2 connection is told to go away: frame types {types:?}");
    assert_eq!(server.wait_exit(SECS(20)).code(), Some(0));
    assert!(sent_term.elapsed() < SECS(8), "drained long before GRACEFUL_TIMEOUT: {:?}", sent_term.elapsed());
}

#[test]
fn an_idle_h2_connection_lives_for_the_keep_alive_timeout_not_the_header_timeout() {
    let server =
        start(&[("WEB_CONCURRENCY", "1"), ("HERDSMAN_HEADER_TIMEOUT", "1"), ("HERDSMAN_KEEPALIVE_TIMEOUT", "4")]);
    server.wait_for_log("ready in", SECS(5));
    let mut stream = connect_h2(&server);
    // GET http://x/ on stream 1, END_STREAM | END_HEADERS: `:method GET`, `:scheme http` and
    // `:path /` from HPACK's static table, `:authority` as a literal.
    let block = [0x82, 0x86, 0x84, 0x41, 0x01, b'x'];
    let mut frame = vec![0, 0, block.len() as u8, HEADERS, 0x5, 0, 0, 0, 1];
    frame.extend_from_slice(&block);
    stream.write_all(&frame).unwrap();
    while read_h2_frame(&mut stream).expect("the response").0 != HEADERS {}
    let answered = Instant::now();
    // A PING (answered, so the connection is alive) well past the 1 s header timeout.
    std::thread::sleep(Duration::from_millis(2000));
    stream.write_all(&[0, 0, 8, PING, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
    let mut kinds = Vec::new();
    while let Some((kind, _, _)) = read_h2_frame(&mut stream) {
        kinds.push(kind);
    }
    let closed_after = answered.elapsed();
    assert!(kinds.contains(&PING), "the PING after 2 s idle was answered: frame types {kinds:?}");
    assert!(closed_after >= SECS(4), "closed after {closed_after:?}, before the keep-alive timeout");
    assert!(closed_after < SECS(12), "idle connection still open after {closed_after:?}");
}
