//! Bare axum hello-world: one process, tokio multi-thread runtime, `GET /live` -> `ok`.
//! Binds 127.0.0.1:$PORT (default 8000). The throughput ceiling herdsman is compared with.
use axum::{routing::get, Router};

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let port: u16 = std::env::var("PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(8000);
    let host = std::env::var("HOST").unwrap_or_else(|_| "127.0.0.1".to_string());
    let app = Router::new().route("/live", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind((host.as_str(), port)).await.expect("bind");
    eprintln!("Listening at: http://{}", listener.local_addr().unwrap());
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
            tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
        })
        .await
        .expect("serve");
}
