//! Routes that misbehave on purpose, for the integration tests. Compiled only with the
//! `test-hooks` cargo feature: a release build never has them.

use std::time::Duration;

use axum::extract::Query;
use axum::routing::get;
use axum::Router;
use serde::Deserialize;

#[derive(Deserialize)]
struct Length {
    ms: u64,
}

pub fn routes() -> Router {
    Router::new()
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

fn panic_on_purpose() -> &'static str {
    panic!("test hook: a handler panicked on purpose")
}
