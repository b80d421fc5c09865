//! Run with `cargo run --example websocket --features ws`, then
//! `websocat ws://localhost:8080/echo` or `curl -N localhost:8080/events`.
//!
//! WebSockets and server-sent events that survive a rolling restart: when the worker drains
//! (SIGTERM, or SIGHUP replacing it), each connection is told to go — close code 1001 "going
//! away", or the end of the event stream — and the client reconnects to a worker that is not
//! draining. The drain waits for every [`LongLived`] guard within `GRACEFUL_TIMEOUT`.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use futures_util::{Stream, StreamExt};
use herdsman::shutdown::{LongLived, Shutdown};
use herdsman::App;

/// Echoes text and sends a tick every second, until the client leaves or the worker drains.
async fn echo(State(shutdown): State<Shutdown>, upgrade: WebSocketUpgrade) -> Response {
    // Taken before the upgrade, so the drain counts a connection from its first moment.
    let held = shutdown.hold();
    upgrade.on_upgrade(move |socket| serve_socket(socket, shutdown, held))
}

async fn serve_socket(mut socket: WebSocket, shutdown: Shutdown, _held: LongLived) {
    let draining = shutdown.draining();
    tokio::pin!(draining);
    let second = Duration::from_secs(1);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + second, second);
    let mut count = 0u64;
    loop {
        let reply = tokio::select! {
            received = socket.recv() => match received {
                Some(Ok(Message::Text(text))) => Message::Text(text),
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                Some(Ok(_)) => continue,
            },
            _ = ticks.tick() => {
                count += 1;
                Message::Text(format!("tick {count}").into())
            }
            () = &mut draining => break,
        };
        if socket.send(reply).await.is_err() {
            return;
        }
    }
    // Going away: the client reconnects elsewhere. Its reply ends the handshake; a client
    // that never replies is cut when the worker exits at GRACEFUL_TIMEOUT.
    let goodbye = CloseFrame { code: close_code::AWAY, reason: "server restarting".into() };
    if socket.send(Message::Close(Some(goodbye))).await.is_ok() {
        while let Some(Ok(message)) = socket.recv().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    }
}

/// A tick a second until the worker drains; the stream's end tells an `EventSource` to
/// reconnect. hyper's drain already waits for a response being streamed, so no guard is held.
async fn events(State(shutdown): State<Shutdown>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let ticks = futures_util::stream::unfold(1u64, |count| async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Some((Ok(Event::default().data(format!("tick {count}"))), count + 1))
    });
    Sse::new(ticks.take_until(shutdown.draining())).keep_alive(KeepAlive::default())
}

fn main() -> std::process::ExitCode {
    App::new()
        .routes(|services| {
            Router::new().route("/echo", get(echo)).route("/events", get(events)).with_state(services.shutdown.clone())
        })
        .run()
}
