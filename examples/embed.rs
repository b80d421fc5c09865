//! Run with `cargo run --example embed`, then `curl localhost:8080/hello/you`.
//!
//! Your own axum routes and warm-up tasks under herdsman's master, workers, health endpoints
//! and cache: the whole of `main` is the builder below.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::routing::get;
use axum::Router;
use herdsman::{App, Services, WarmupTask};

/// Answers from the cache when it can: Redis if `REDIS_URL` answers, memory otherwise.
async fn hello(State(services): State<Services>, Path(name): Path<String>) -> String {
    let key = format!("greeting:{name}");
    if let Ok(Some(cached)) = services.cache.get(&key).await {
        return String::from_utf8_lossy(&cached).into_owned();
    }
    let greeting = format!("hello, {name}\n");
    // A cache that cannot store is not an error for the user: serve the answer anyway.
    let _ = services.cache.set(&key, greeting.clone().into(), Some(Duration::from_secs(60))).await;
    greeting
}

fn main() -> std::process::ExitCode {
    App::new()
        .routes(|services| Router::new().route("/hello/{name}", get(hello)).with_state(services.clone()))
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
