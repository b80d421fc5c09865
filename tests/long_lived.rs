//! WebSockets and server-sent events through a drain and a rolling restart, on the real binary
//! with a real WebSocket client (tokio-tungstenite) and the `test-hooks` routes `/__test/ws`
//! (an echo that closes with 1001 when its worker drains) and `/__test/sse` (ticks until then).

mod support;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use nix::sys::signal::Signal;
use support::{start, Herdsman};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const SECS: fn(u64) -> Duration = Duration::from_secs;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn connect(server: &Herdsman) -> Socket {
    let url = format!("ws://127.0.0.1:{}/__test/ws", server.port);
    let (socket, _) = tokio_tungstenite::connect_async(url).await.expect("the WebSocket handshake");
    socket
}

/// Sends `text` and expects it back.
async fn assert_echoes(socket: &mut Socket, text: &str) {
    socket.send(Message::text(text)).await.expect("send");
    let reply = tokio::time::timeout(SECS(5), socket.next()).await.expect("an echo within 5 s");
    match reply {
        Some(Ok(Message::Text(echoed))) => assert_eq!(echoed.as_str(), text),
        other => panic!("expected the echo of {text:?}, got {other:?}"),
    }
}

/// Waits for the server's close frame and answers it; returns its code.
async fn close_code(mut socket: Socket, within: Duration) -> CloseCode {
    let received = tokio::time::timeout(within, socket.next()).await.expect("a close frame in time");
    let code = match received {
        Some(Ok(Message::Close(Some(frame)))) => frame.code,
        other => panic!("expected a close frame, got {other:?}"),
    };
    // tungstenite sends the reply as the stream is polled on; the server then ends it.
    while let Ok(Some(Ok(_))) = tokio::time::timeout(SECS(5), socket.next()).await {}
    code
}

/// A client as browsers write them: on a close it reconnects, and stays until `stop`; returns
/// how many times it was told to go with 1001. Any other close, or an error, fails the test.
async fn stay_connected(mut socket: Socket, port: u16, id: usize, mut stop: watch::Receiver<bool>) -> usize {
    let mut told_to_go = 0;
    loop {
        tokio::select! {
            received = socket.next() => match received {
                Some(Ok(Message::Close(Some(frame)))) => {
                    assert_eq!(frame.code, CloseCode::Away, "client {id} closed with {frame:?}");
                    told_to_go += 1;
                    // Polling on sends tungstenite's reply; the server then ends the connection.
                    while let Some(Ok(_)) = socket.next().await {}
                    let url = format!("ws://127.0.0.1:{port}/__test/ws");
                    socket = tokio_tungstenite::connect_async(url).await.expect("reconnects").0;
                }
                other => panic!("client {id}: expected nothing but a close, got {other:?}"),
            },
            _ = stop.changed() => {
                assert_echoes(&mut socket, &format!("still here {id}")).await;
                return told_to_go;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_tells_websocket_clients_to_go_and_the_restart_completes_while_they_reconnect() {
    let server = start(&[("WEB_CONCURRENCY", "2"), ("GRACEFUL_TIMEOUT", "60")]);
    server.wait_for_nth_log("ready in", 2, SECS(5));
    let before = server.worker_processes();
    let (stop, stopped) = watch::channel(false);
    let mut clients = Vec::new();
    for id in 0..6 {
        let mut socket = connect(&server).await;
        assert_echoes(&mut socket, &format!("hello {id}")).await;
        clients.push(tokio::spawn(stay_connected(socket, server.port, id, stopped.clone())));
    }
    let sent_hup = Instant::now();
    server.signal(Signal::SIGHUP);
    // Every old worker is gone long before the 60 s grace: each waited only for its clients,
    // who left at its 1001 (some twice: a client may reconnect to the old worker still to go).
    let deadline = Instant::now() + SECS(20);
    while before.iter().any(|worker| worker.state().is_some()) {
        assert!(Instant::now() < deadline, "old workers still there: {before:?}\n{}", server.logs().join("\n"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let restart_took = sent_hup.elapsed();
    server.wait_for_workers(2, SECS(5));
    stop.send(true).expect("clients listening");
    for client in clients {
        let told_to_go = client.await.expect("the client kept its promises");
        assert!(told_to_go >= 1, "every client was on an old worker and was told to go");
    }
    assert_eq!(server.count_logs("long-lived connections cut"), 0, "{}", server.logs().join("\n"));
    assert!(restart_took < SECS(20), "rolling restart took {restart_took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_websockets_with_1001_and_exits_0_within_the_grace() {
    let mut server = start(&[("WEB_CONCURRENCY", "2"), ("GRACEFUL_TIMEOUT", "60")]);
    server.wait_for_nth_log("ready in", 2, SECS(5));
    let mut sockets = Vec::new();
    for i in 0..4 {
        let mut socket = connect(&server).await;
        assert_echoes(&mut socket, &format!("hello {i}")).await;
        sockets.push(socket);
    }
    let sent_term = Instant::now();
    server.signal(Signal::SIGTERM);
    for socket in sockets {
        assert_eq!(close_code(socket, SECS(10)).await, CloseCode::Away);
    }
    assert_eq!(server.wait_exit(SECS(20)).code(), Some(0));
    assert!(
        sent_term.elapsed() < SECS(10),
        "exited once its clients left, not at the grace: {:?}",
        sent_term.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_ignores_the_close_is_cut_at_the_grace_period() {
    let mut server = start(&[("WEB_CONCURRENCY", "1"), ("GRACEFUL_TIMEOUT", "2")]);
    server.wait_for_log("ready in", SECS(5));
    let mut deaf = connect(&server).await;
    assert_echoes(&mut deaf, "hello").await;
    let sent_term = Instant::now();
    server.signal(Signal::SIGTERM);
    // The client reads nothing, so it never answers the close: the worker waits for it until
    // GRACEFUL_TIMEOUT, then exits and the connection is cut.
    assert_eq!(server.wait_exit(SECS(15)).code(), Some(0));
    let exited_after = sent_term.elapsed();
    assert!(exited_after >= Duration::from_millis(1900), "cut before the grace period: {exited_after:?}");
    server.wait_for_log("1 long-lived connections cut after GRACEFUL_TIMEOUT", SECS(1));
    // What the client finds when it reads at last: the 1001, then the end of the connection.
    let mut codes = Vec::new();
    while let Ok(Some(Ok(message))) = tokio::time::timeout(SECS(5), deaf.next()).await {
        if let Message::Close(Some(frame)) = message {
            codes.push(frame.code);
        }
    }
    assert_eq!(codes, vec![CloseCode::Away]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_ends_when_its_worker_drains() {
    let mut server = start(&[("WEB_CONCURRENCY", "1"), ("GRACEFUL_TIMEOUT", "60")]);
    server.wait_for_log("ready in", SECS(5));
    let mut response = reqwest::get(server.url("/__test/sse")).await.expect("the event stream");
    assert_eq!(response.status(), 200);
    let first = response.chunk().await.expect("a tick").expect("the stream is open");
    assert!(String::from_utf8_lossy(&first).starts_with("data: 0"), "{first:?}");
    let sent_term = Instant::now();
    server.signal(Signal::SIGTERM);
    // The stream ends cleanly (no error), well before the grace.
    while let Some(_tick) =
        tokio::time::timeout(SECS(10), response.chunk()).await.expect("the stream ends").expect("ends cleanly")
    {}
    assert_eq!(server.wait_exit(SECS(20)).code(), Some(0));
    assert!(sent_term.elapsed() < SECS(10), "exited after {:?}", sent_term.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_websocket_outlives_the_header_and_keep_alive_timeouts() {
    let server =
        start(&[("WEB_CONCURRENCY", "1"), ("HERDSMAN_HEADER_TIMEOUT", "1"), ("HERDSMAN_KEEPALIVE_TIMEOUT", "2")]);
    server.wait_for_log("ready in", SECS(5));
    let mut socket = connect(&server).await;
    assert_echoes(&mut socket, "hello").await;
    // Past both timeouts in silence, then a message: after its 101 the connection is no
    // longer HTTP's, and neither timer may cut it.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_echoes(&mut socket, "still open").await;
}
