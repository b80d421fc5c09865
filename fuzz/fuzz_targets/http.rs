//! The whole HTTP surface of a worker: its router and guard, built as `worker::serve` builds
//! them (memory-only cache, no test-hooks), served by hyper's `serve_connection` over an
//! in-memory duplex and fed raw HTTP/1.1 bytes: arbitrary bytes, or requests with arbitrary
//! method, path, query, headers and bodies (Content-Length or chunked) written out by hand.
//!
//! Promises: no response is a 500 (the guard's answer to a panic); a body declared larger than
//! the limit gets 413 whatever the route; a chunked body over the limit to a route that reads
//! it gets 413; nothing hangs.
#![no_main]

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arbitrary::Arbitrary;
use axum::http::{Request, StatusCode};
use axum::response::Response;
use herdsman::cache::{Cache, CacheConfig};
use herdsman::config::Config;
use herdsman::hasher::Hasher;
use herdsman::http::{auth_routes, cache_routes, router, Guard};
use herdsman::tracker::RequestTracker;
use herdsman::Services;
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioIo, TokioTimer};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The body limit: small, so that fuzzed bodies pass it.
const LIMIT: usize = 256;
/// Header naming the request (its index in the input) for the recorder.
const SEQ: &str = "x-fuzz-seq";

struct Harness {
    runtime: tokio::runtime::Runtime,
    config: Arc<Config>,
    hasher: Hasher,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let config = Config { max_body_bytes: LIMIT, bcrypt_cost: 4, ..Config::default() };
        let hasher = Hasher::new(1, 4).expect("hasher");
        Harness { runtime, config: Arc::new(config), hasher }
    })
}

#[derive(Arbitrary, Debug)]
enum Input {
    Raw(Vec<u8>),
    Requests { requests: Vec<Req>, tail: Vec<u8> },
}

#[derive(Arbitrary, Debug)]
struct Req {
    method: Method,
    path: Path,
    query: Option<String>,
    headers: Vec<(String, String)>,
    body: Body,
}

#[derive(Arbitrary, Debug, PartialEq)]
enum Method {
    Get,
    Head,
    Put,
    Post,
    Delete,
    Options,
    Patch,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Path {
    Live,
    Ready,
    Health,
    /// `/cache/k{n}`: a key the cache routes accept (from a caller with no session: 401).
    CacheKey(u8),
    Cache(String),
    Register,
    Login,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Body {
    None,
    Length(Vec<u8>),
    Chunked(Vec<Vec<u8>>),
    /// `LIMIT + extra` bytes, so that bodies over the limit are common.
    Over {
        extra: u16,
        chunk: u16,
        chunked: bool,
    },
}

impl Body {
    /// The bytes and whether they are sent chunked (in chunks of the given sizes).
    fn content(&self) -> Option<(Vec<u8>, Option<Vec<usize>>)> {
        match self {
            Body::None => None,
            Body::Length(bytes) => Some((bytes.clone(), None)),
            Body::Chunked(chunks) => Some((chunks.concat(), Some(chunks.iter().map(Vec::len).collect()))),
            Body::Over { extra, chunk, chunked } => {
                let len = LIMIT + 1 + usize::from(*extra % 4096);
                let chunk = usize::from(*chunk % 512).max(1);
                let sizes = (0..len).step_by(chunk).map(|start| chunk.min(len - start)).collect();
                Some((vec![b'x'; len], chunked.then_some(sizes)))
            }
        }
    }
}

/// Bytes outside the allowed set as `%XX`; `%` itself stays, so bad escapes are tried too.
fn escape(text: &str, allowed: &[u8]) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || allowed.contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

const PATH_CHARS: &[u8] = b"-._~!$&'()*+,;=:@/%";

impl Req {
    fn method(&self) -> String {
        match &self.method {
            Method::Other(name) => {
                let token: String =
                    name.chars().filter(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(*c)).collect();
                if token.is_empty() {
                    "X".into()
                } else {
                    token
                }
            }
            known => format!("{known:?}").to_ascii_uppercase(),
        }
    }

    fn path(&self) -> String {
        match &self.path {
            Path::Live => "/live".into(),
            Path::Ready => "/ready".into(),
            Path::Health => "/health".into(),
            Path::CacheKey(n) => format!("/cache/k{n}"),
            Path::Cache(key) => format!("/cache/{}", escape(key, PATH_CHARS)),
            Path::Register => "/auth/register".into(),
            Path::Login => "/auth/login".into(),
            Path::Other(path) => format!("/{}", escape(path, PATH_CHARS)),
        }
    }

    /// A request that must be answered 413 whatever its route: its declared length is over.
    fn declared_over(&self) -> bool {
        matches!(self.body.content(), Some((bytes, None)) if bytes.len() > LIMIT)
    }

    /// A chunked body over the limit to the one route that reads it whatever else it holds.
    fn chunked_over_to_a_reader(&self) -> bool {
        let chunked_over = matches!(self.body.content(), Some((bytes, Some(_))) if bytes.len() > LIMIT);
        // Register reads its JSON body before anything else (the harness sends it as JSON).
        chunked_over && self.method == Method::Post && matches!(self.path, Path::Register)
    }

    /// The request line's method and target, as the recorder writes them down.
    fn what(&self) -> String {
        let query = self.query.as_ref().map(|query| format!("?{}", escape(query, b"-._~!$&'()*+,;=:@/?%")));
        format!("{} {}{}", self.method(), self.path(), query.unwrap_or_default())
    }

    fn write(&self, seq: usize, out: &mut Vec<u8>) {
        out.extend_from_slice(self.what().as_bytes());
        out.extend_from_slice(format!(" HTTP/1.1\r\nhost: fuzz\r\n{SEQ}: {seq}\r\n").as_bytes());
        if matches!(self.path, Path::Register) {
            out.extend_from_slice(b"content-type: application/json\r\n");
        }
        for (name, value) in &self.headers {
            let name: String =
                name.chars().filter(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(*c)).collect();
            let lower = name.to_ascii_lowercase();
            // The body's framing is the harness's; the sequence header is the recorder's.
            if name.is_empty() || ["content-length", "transfer-encoding", "host", SEQ].contains(&lower.as_str()) {
                continue;
            }
            if lower == "content-type" && matches!(self.path, Path::Register) {
                continue;
            }
            let value: String = value.chars().filter(|c| *c == '\t' || (*c >= ' ' && *c != '\u{7f}')).collect();
            out.extend_from_slice(format!("{name}: {}\r\n", value.trim()).as_bytes());
        }
        match self.body.content() {
            None => out.extend_from_slice(b"\r\n"),
            Some((bytes, None)) => {
                out.extend_from_slice(format!("content-length: {}\r\n\r\n", bytes.len()).as_bytes());
                out.extend_from_slice(&bytes);
            }
            Some((bytes, Some(sizes))) => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
                let mut rest = &bytes[..];
                for size in sizes.into_iter().filter(|&size| size > 0) {
                    let (chunk, after) = rest.split_at(size);
                    out.extend_from_slice(format!("{size:x}\r\n").as_bytes());
                    out.extend_from_slice(chunk);
                    out.extend_from_slice(b"\r\n");
                    rest = after;
                }
                out.extend_from_slice(b"0\r\n\r\n");
            }
        }
    }
}

/// What the service answered, per request.
struct Seen {
    seq: Option<usize>,
    what: String,
    status: StatusCode,
}

/// The guard, with each answer's status written down.
#[derive(Clone)]
struct Recorder {
    guard: Guard,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Service<Request<Incoming>> for Recorder {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let seq = request.headers().get(SEQ).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        let what = format!("{} {}", request.method(), request.uri());
        let answer = self.guard.call(request);
        let seen = self.seen.clone();
        Box::pin(async move {
            let response = answer.await?;
            seen.lock().expect("seen").push(Seen { seq, what, status: response.status() });
            Ok(response)
        })
    }
}

/// Serves `bytes` on one connection, as a worker would; returns what the service answered.
fn serve(bytes: Vec<u8>) -> Vec<Seen> {
    let harness = harness();
    // A fresh cache, router and tracker per input, so that a crash replays alone.
    let cache = Cache::new(CacheConfig::from_config(&harness.config)).expect("memory-only cache");
    let tracker = RequestTracker::new(None, || {});
    let services = Services::assemble(harness.config.clone(), cache, harness.hasher.clone(), tracker.clone());
    // What the stand-alone binary serves: the health routes and the cache and auth APIs.
    let apis = cache_routes(&services).merge(auth_routes(&services));
    let guard = Guard::new(router(&services, apis), tracker, harness.config.request_timeout, LIMIT);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorder = Recorder { guard, seen: seen.clone() };

    harness.runtime.block_on(async move {
        let (client, server) = tokio::io::duplex(16 * 1024);
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new()).header_read_timeout(harness.config.header_timeout);
        let connection = http.serve_connection(TokioIo::new(server), recorder);
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let send = async move {
            let _ = to_server.write_all(&bytes).await;
            let _ = to_server.shutdown().await;
        };
        let receive = async move {
            let mut answers = Vec::new();
            let _ = from_server.read_to_end(&mut answers).await;
        };
        let all = async { tokio::join!(connection, send, receive) };
        // Nothing waits on a timer: the client's input ends, so every read ends.
        if tokio::time::timeout(Duration::from_secs(10), all).await.is_err() {
            panic!("the connection hung");
        }
    });
    let seen = std::mem::take(&mut *seen.lock().expect("seen"));
    seen
}

fuzz_target!(|input: Input| {
    let (bytes, requests) = match input {
        Input::Raw(bytes) => (bytes, Vec::new()),
        Input::Requests { requests, tail } => {
            let mut bytes = Vec::new();
            for (seq, request) in requests.iter().enumerate() {
                request.write(seq, &mut bytes);
            }
            bytes.extend_from_slice(&tail);
            (bytes, requests)
        }
    };
    for seen in serve(bytes) {
        assert_ne!(seen.status, StatusCode::INTERNAL_SERVER_ERROR, "{} answered 500", seen.what);
        // A raw tail may forge the sequence header: judge only what matches its request.
        let Some(request) = seen.seq.and_then(|seq| requests.get(seq)).filter(|r| r.what() == seen.what) else {
            continue;
        };
        if request.declared_over() || request.chunked_over_to_a_reader() {
            assert_eq!(
                seen.status,
                StatusCode::PAYLOAD_TOO_LARGE,
                "{} with a body over {LIMIT} bytes: {request:?}",
                seen.what
            );
        }
    }
});
