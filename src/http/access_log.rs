//! What the guard learns of each request for the operator: its ID (answered as `X-Request-ID`,
//! named in a hung worker's diagnostics), its queue time (the `herdsman_http_request_queue_seconds`
//! histogram) and, with `HERDSMAN_ACCESS_LOG=true`, one log line when it is answered.
//!
//! The access log is off by default: every platform herdsman targets already logs each request
//! at its router (Heroku's router lines, Render's and Railway's HTTP logs, Cloud Run's request
//! log, an ingress controller's), with the same request ID, so a second line per request would
//! double the log volume the platform bills and cost the worker a write per request. Turn it on
//! where nothing in front logs, or to see the queue time and worker pid next to each request.
//!
//! The line goes through `tracing` at info under the target `herdsman::access`, so it follows
//! `LOG_FORMAT` (one JSON object per line, or text) and `LOG_LEVEL` like every other line. It
//! holds the path without the query (query strings carry tokens), never a header's value other
//! than the request ID, which [`super::request_id`] has checked.

use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use axum::body::HttpBody;
use axum::http::{HeaderMap, HeaderValue, Method, Uri};
use axum::response::Response;

use super::client_addr::client_addr;
use super::{queue_time, request_id};

/// How the guard treats request metadata; set once per worker from the configuration.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestLog {
    /// `HERDSMAN_ACCESS_LOG`.
    pub access_log: bool,
    /// `HERDSMAN_TRUSTED_PROXIES`: 0 means nobody in front is trusted to set `X-Forwarded-For` or
    /// `X-Request-Start`, so neither is read.
    pub trusted_proxies: usize,
}

/// One request's metadata, from its arrival to its answer.
pub struct Entry {
    pub id: HeaderValue,
    /// Only with the access log on: what its line needs beyond the answer.
    line: Option<Line>,
}

struct Line {
    method: Method,
    uri: Uri,
    client: Option<IpAddr>,
    queued: Option<Duration>,
}

impl RequestLog {
    /// Reads what the request says of itself; counts its queue time.
    pub fn start(&self, method: &Method, uri: &Uri, headers: &HeaderMap, peer: Option<IpAddr>) -> Entry {
        let id = request_id::of(headers);
        let queued = match self.trusted_proxies {
            0 => None,
            _ => queue_time::of(headers, SystemTime::now()),
        };
        if let Some(waited) = queued {
            crate::metrics::request_queued(waited);
        }
        let line = self.access_log.then(|| Line {
            method: method.clone(),
            uri: uri.clone(),
            client: peer.map(|peer| client_addr(peer, headers, self.trusted_proxies)),
            queued,
        });
        Entry { id, line }
    }
}

impl Entry {
    /// The request is answered: the response carries its ID, and the access log gets its line.
    pub fn finish(self, response: &mut Response, started: Instant) {
        if let Some(line) = &self.line {
            let bytes = response.body().size_hint().exact();
            tracing::info!(
                target: "herdsman::access",
                method = %line.method,
                path = line.uri.path(),
                status = response.status().as_u16(),
                bytes,
                duration_ms = started.elapsed().as_secs_f64() * 1e3,
                queue_ms = line.queued.map(|q| q.as_secs_f64() * 1e3),
                client = line.client.map(tracing::field::display),
                request_id = self.id.to_str().unwrap_or("-"),
                "request"
            );
        }
        response.headers_mut().insert(request_id::HEADER.clone(), self.id);
    }
}
