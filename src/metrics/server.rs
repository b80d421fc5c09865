//! The master's `/metrics` on `HERDSMAN_METRICS_PORT`: a small HTTP/1 server on the master's
//! single-threaded runtime, with strict limits because the port may face the internet: one
//! route, one request per connection, headers within [`HEADER_TIMEOUT`] and [`MAX_HEADER_BYTES`],
//! a whole connection within [`CONNECTION_TIMEOUT`], at most [`MAX_CONNECTIONS`] at once
//! (more are closed at once). A scrape reads the shared table: it costs microseconds and
//! allocates only the text it answers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, Method, Request, Response, StatusCode};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::exposition::{render, CONTENT_TYPE};
use super::MetricsTable;

const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HEADER_BYTES: usize = 8 * 1024;
const MAX_CONNECTIONS: usize = 16;

/// Binds the metrics port (before the master starts its workers, so that a taken port stops
/// the start with a clear error).
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = crate::listener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves `/metrics` from `table` on `listener` until the runtime ends.
pub fn spawn(listener: std::net::TcpListener, table: Arc<MetricsTable>) -> std::io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("metrics port: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Over the limit: close at once rather than queue.
            let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
            let table = table.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let service = hyper::service::service_fn(move |request| answer(request, table.clone()));
                let mut http = hyper::server::conn::http1::Builder::new();
                http.timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .max_buf_size(MAX_HEADER_BYTES)
                    .keep_alive(false);
                let connection = http.serve_connection(TokioIo::new(stream), service);
                match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!("metrics port: connection ended with an error: {e}"),
                    Err(_) => tracing::debug!("metrics port: connection cut after {CONNECTION_TIMEOUT:?}"),
                }
            });
        }
    });
    Ok(())
}

async fn answer(request: Request<Incoming>, table: Arc<MetricsTable>) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => Response::builder()
            .header(header::CONTENT_TYPE, CONTENT_TYPE)
            .body(Full::new(Bytes::from(render(table.snapshot())))),
        (_, "/metrics") => Response::builder()
            .status(StatusCode::METHOD_NOT_ALLOWED)
            .header(header::ALLOW, "GET, HEAD")
            .body(Full::new(Bytes::new())),
        _ => Response::builder().status(StatusCode::NOT_FOUND).body(Full::new(Bytes::new())),
    };
    // The builder fails only on invalid header values, and these are constants.
    Ok(response.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))))
}
