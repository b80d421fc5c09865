//! Bare axum hello-world: one process, tokio multi-thread runtime, `GET /live` -> `ok`.
//! Binds 127.0.0.1:$PORT (default 8000). The throughput ceiling herdsman is compared with.
//!
//! `HELLO_PREFORK=N`: instead, N forked processes with a single-threaded runtime each, serving
//! the one listening socket bound before the fork — herdsman's shape without herdsman. The
//! control for BENCHMARKS.md's `/live` tail question: does the shape alone cost the p99?
use axum::{routing::get, Router};

fn main() {
    let port: u16 = std::env::var("PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(8000);
    let host = std::env::var("HOST").unwrap_or_else(|_| "127.0.0.1".to_string());
    let listener = std::net::TcpListener::bind((host.as_str(), port)).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    eprintln!("Listening at: http://{}", listener.local_addr().unwrap());
    let prefork: usize = std::env::var("HELLO_PREFORK").ok().and_then(|n| n.parse().ok()).unwrap_or(0);
    if prefork == 0 {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
        return runtime.block_on(serve(listener));
    }
    let mut children = Vec::new();
    for _ in 0..prefork {
        // SAFETY: single-threaded here (no runtime yet); the child only builds its own runtime.
        match unsafe { libc::fork() } {
            0 => {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                runtime.block_on(serve(listener));
                std::process::exit(0);
            }
            pid if pid > 0 => children.push(pid),
            _ => panic!("fork failed"),
        }
    }
    // SIGTERM to the process group (the bench's teardown) reaches the children too.
    for pid in children {
        let mut status = 0;
        // SAFETY: waiting on our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
    }
}

async fn serve(listener: std::net::TcpListener) {
    let app = Router::new().route("/live", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
            tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
        })
        .await
        .expect("serve");
}
