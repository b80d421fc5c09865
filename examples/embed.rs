//! Run with `cargo run --example embed`, then `curl localhost:8080/hello/you`.
//!
//! Your own axum routes and warm-up tasks under herdsman's master, workers, health endpoints
//! and cache: the whole of `main` is the builder below.

use std::time::Duration;

use axum::extract::Path;
use axum::routing::get;
use axum::Router;
use herdsman::{App, WarmupTask};

fn main() -> std::process::ExitCode {
    App::new()
        .routes(|_services| {
            Router::new()
                .route("/hello/{name}", get(|Path(name): Path<String>| async move { format!("hello, {name}\n") }))
        })
        // Shown in /health under checks.load_templates; /ready waits for it.
        .warmup(
            WarmupTask::new("load_templates", |_services| async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok::<(), std::io::Error>(())
            })
            .required(true),
        )
        .run()
}
