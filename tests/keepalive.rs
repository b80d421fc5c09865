//! Keep-alive on the real binary over raw sockets: an idle connection lives for
//! `HERDSMAN_KEEPALIVE_TIMEOUT`, not for the header timeout, and a request head must still arrive
//! within `HERDSMAN_HEADER_TIMEOUT` of its first byte. The timeouts are short (header 1 s,
//! keep-alive 4 s) to keep the tests quick; the bounds are generous on the late side.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use support::{start, Herdsman};

const HEADER: &[(&str, &str)] =
    &[("WEB_CONCURRENCY", "1"), ("HERDSMAN_HEADER_TIMEOUT", "1"), ("HERDSMAN_KEEPALIVE_TIMEOUT", "4")];
const LIVE: &[u8] = b"GET /live HTTP/1.1\r\nHost: keepalive\r\n\r\n";

fn connect(server: &Herdsman) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    stream
}

/// Reads one response to `GET /live` (status line, headers, the 2-byte body `ok`); `None` when
/// the server closed the connection instead.
fn read_live_response(stream: &mut TcpStream) -> Option<String> {
    let mut response = Vec::new();
    let mut byte = [0u8; 1];
    while !response.ends_with(b"\r\n\r\nok") {
        match stream.read(&mut byte) {
            Ok(0) => return None,
            Ok(_) => response.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("reading a response: {e} after {:?}", String::from_utf8_lossy(&response)),
        }
    }
    Some(String::from_utf8_lossy(&response).into_owned())
}

/// A connection that has had one `/live` answered and is now idle.
fn kept_alive(server: &Herdsman) -> TcpStream {
    let mut stream = connect(server);
    stream.write_all(LIVE).unwrap();
    let first = read_live_response(&mut stream).expect("first answer");
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    stream
}

/// Waits until the server closes the connection and asserts it took from `at_least` to
/// `less_than`; `what` names the timer expected to close it.
#[track_caller]
fn assert_closed_after(stream: &mut TcpStream, at_least: Duration, less_than: Duration, what: &str) {
    let waited = time_until_closed(stream);
    assert!(waited >= at_least, "closed after {waited:?}, before the {what}");
    assert!(waited < less_than, "closed only after {waited:?}: not by the {what}");
}

/// Waits until the server closes the connection; how long that took.
fn time_until_closed(stream: &mut TcpStream) -> Duration {
    let started = Instant::now();
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the connection was not closed: {e}"),
    }
    assert!(rest.is_empty(), "closed with an answer: {:?}", String::from_utf8_lossy(&rest));
    started.elapsed()
}

#[test]
fn an_idle_connection_outlives_the_header_timeout_and_closes_at_the_keepalive_timeout() {
    let server = start(HEADER);
    let mut stream = kept_alive(&server);

    // Idle twice the header timeout: the old behaviour closed the connection here.
    std::thread::sleep(Duration::from_secs(2));
    stream.write_all(LIVE).unwrap();
    let second = read_live_response(&mut stream).expect("the idle connection was closed before the keep-alive timeout");
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");

    assert_closed_after(&mut stream, Duration::from_millis(3500), Duration::from_secs(8), "4 s keep-alive timeout");
}

#[test]
fn a_request_begun_just_before_the_keepalive_ends_gets_the_header_timeout_to_finish() {
    let server = start(HEADER);
    let mut stream = kept_alive(&server);

    // Idle 3.5 s of 4, then a head sent in two parts, finished 4.2 s after the response: past the
    // keep-alive deadline, but within the header timeout of its first byte.
    std::thread::sleep(Duration::from_millis(3500));
    stream.write_all(b"GET /live HTTP/1.1\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(700));
    stream.write_all(b"Host: late\r\n\r\n").unwrap();
    let answer = read_live_response(&mut stream).expect("the request begun in time was dropped");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn a_slow_head_on_a_kept_alive_connection_is_cut_at_the_header_timeout() {
    let server = start(HEADER);
    let mut stream = kept_alive(&server);

    // The second request's head never ends: the header timeout (1 s), not the keep-alive (4 s),
    // closes the connection.
    stream.write_all(b"GET /live HTTP/1.1\r\nHost: slow\r\n").unwrap();
    assert_closed_after(&mut stream, Duration::from_millis(800), Duration::from_millis(3500), "1 s header timeout");
}

#[test]
fn a_connection_that_sends_nothing_is_closed_at_the_header_timeout() {
    // A new connection has no request to wait for yet: it gets the header timeout, not the
    // keep-alive one, so silent connections hold no slot for long.
    let server = start(HEADER);
    let mut stream = connect(&server);
    assert_closed_after(&mut stream, Duration::from_millis(800), Duration::from_millis(3500), "1 s header timeout");
}

#[test]
fn idle_connections_still_close_promptly_when_the_worker_drains() {
    let mut server = start(&[("WEB_CONCURRENCY", "1"), ("HERDSMAN_KEEPALIVE_TIMEOUT", "60")]);
    let mut stream = kept_alive(&server);

    server.signal(Signal::SIGTERM);
    let waited = time_until_closed(&mut stream);
    assert!(waited < Duration::from_secs(5), "an idle connection held the drain for {waited:?}");
    assert!(server.wait_exit(Duration::from_secs(10)).success());
}
