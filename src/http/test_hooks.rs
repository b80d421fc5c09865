//! Routes that misbehave on purpose, for the integration tests. Compiled only with the
//! `test-hooks` cargo feature: a release build never has them.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::sse::{Event, Sse};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use futures_util::{Stream, StreamExt};
use serde::Deserialize;

use crate::services::Services;
use crate::shutdown::Shutdown;

#[derive(Deserialize)]
struct Length {
    ms: u64,
}

#[derive(Deserialize)]
struct Leak {
    mb: usize,
}

/// The most one leak request keeps.
const MAX_LEAK_MB: usize = 1024;

pub fn routes(services: &Services) -> Router {
    Router::new()
        // A WebSocket echo that says goodbye with 1001 when the worker drains.
        .route("/__test/ws", get(echo_until_drain))
        // Server-sent ticks every 100 ms, ending when the worker drains.
        .route("/__test/sse", get(ticks_until_drain))
        .with_state(services.shutdown.clone())
        // Blocks the worker's whole runtime thread: heartbeats stop, as in a real hang.
        .route(
            "/__test/block",
            get(|Query(Length { ms }): Query<Length>| async move {
                std::thread::sleep(Duration::from_millis(ms));
                "unblocked"
            }),
        )
        // A slow but well-behaved request, for drain tests.
        .route(
            "/__test/sleep",
            get(|Query(Length { ms }): Query<Length>| async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                "slept"
            }),
        )
        .route("/__test/panic", get(|| async { panic_on_purpose() }))
        // Keeps `mb` MiB of written (resident, private) memory for the rest of the worker's
        // life, as a leaking handler does: what HERDSMAN_MAX_WORKER_MEMORY is for.
        .route("/__test/leak", post(|Query(Leak { mb }): Query<Leak>| async move { leak(mb) }))
        // Maps `mb` MiB of a file every worker that calls it maps too, and reads each page: pages
        // the workers share, which their RSS counts in full and their PSS in part.
        .route("/__test/share", post(|Query(Leak { mb }): Query<Leak>| async move { share(mb) }))
        // Leaves an orphan process behind (a shell that exits before its `sleep`), as apps that
        // shell out do; the master must reap it.
        .route(
            "/__test/orphan",
            get(|| async {
                let status = tokio::task::spawn_blocking(|| {
                    std::process::Command::new("sh").args(["-c", "sleep 0.3 &"]).status()
                })
                .await;
                match status {
                    Ok(Ok(s)) if s.success() => "orphaned",
                    _ => "spawn failed",
                }
            }),
        )
}

async fn echo_until_drain(State(shutdown): State<Shutdown>, upgrade: WebSocketUpgrade) -> Response {
    let held = shutdown.hold();
    upgrade.on_upgrade(move |mut socket| async move {
        let _held = held;
        let draining = shutdown.draining();
        tokio::pin!(draining);
        loop {
            tokio::select! {
                received = socket.recv() => match received {
                    Some(Ok(Message::Text(text))) => {
                        if socket.send(Message::Text(text)).await.is_err() {
                            return;
                        }
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                    Some(Ok(_)) => {}
                },
                () = &mut draining => break,
            }
        }
        say_going_away(&mut socket).await;
    })
}

/// Sends close code 1001 and waits for the client's reply; a client that never replies is
/// cut when the worker exits at `GRACEFUL_TIMEOUT`.
async fn say_going_away(socket: &mut WebSocket) {
    let goodbye = CloseFrame { code: close_code::AWAY, reason: "worker draining".into() };
    if socket.send(Message::Close(Some(goodbye))).await.is_err() {
        return;
    }
    while let Some(Ok(message)) = socket.recv().await {
        if let Message::Close(_) = message {
            return;
        }
    }
}

async fn ticks_until_drain(State(shutdown): State<Shutdown>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let ticks = futures_util::stream::unfold(0u64, |n| async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some((Ok(Event::default().data(n.to_string())), n + 1))
    });
    Sse::new(ticks.take_until(shutdown.draining()))
}

fn leak(mb: usize) -> Response {
    use axum::response::IntoResponse;
    if !(1..=MAX_LEAK_MB).contains(&mb) {
        let why = format!("mb must be from 1 to {MAX_LEAK_MB}");
        return (axum::http::StatusCode::BAD_REQUEST, why).into_response();
    }
    // Every byte written, so every page is resident; never freed.
    let kept: &'static mut [u8] = Vec::leak(vec![0xA5u8; mb << 20]);
    std::hint::black_box(kept);
    format!("leaked {mb} MiB in pid {}", std::process::id()).into_response()
}

/// The file `/__test/share` maps: one per master, so every worker of a master shares it.
pub fn shared_file(master: u32) -> std::path::PathBuf {
    let dir = std::path::Path::new("/dev/shm");
    let dir = if dir.is_dir() { dir.to_path_buf() } else { std::env::temp_dir() };
    dir.join(format!("herdsman-test-shared-{master}"))
}

fn share(mb: usize) -> Response {
    use axum::response::IntoResponse;
    use std::os::unix::fs::FileExt;
    if !(1..=MAX_LEAK_MB).contains(&mb) {
        let why = format!("mb must be from 1 to {MAX_LEAK_MB}");
        return (axum::http::StatusCode::BAD_REQUEST, why).into_response();
    }
    let len = mb << 20;
    let mapped = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(shared_file(std::os::unix::process::parent_id()))
        // Every caller writes the same bytes, a MiB at a time (a buffer of the whole would be
        // this worker's own memory): the file's pages exist whoever maps first.
        .and_then(|file| {
            let chunk = vec![0x5Au8; 1 << 20];
            (0..mb).try_for_each(|i| file.write_all_at(&chunk, (i << 20) as u64)).map(|()| file)
        })
        .and_then(|file| crate::shared_memory::SharedMemory::from_inherited(file.into(), len, "the shared test file"));
    let memory = match mapped {
        Ok(memory) => memory,
        Err(e) => return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let start = memory.start().as_ptr();
    for offset in (0..len).step_by(4096) {
        // SAFETY: within the `len` bytes mapped; a read of plain bytes.
        std::hint::black_box(unsafe { std::ptr::read_volatile(start.add(offset)) });
    }
    // Mapped for the rest of the worker's life.
    std::mem::forget(memory);
    format!("shared {mb} MiB in pid {}", std::process::id()).into_response()
}

fn panic_on_purpose() -> &'static str {
    panic!("test hook: a handler panicked on purpose")
}
