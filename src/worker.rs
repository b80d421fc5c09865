//! A worker process: one single-threaded tokio runtime serving the app on the shared socket.
//!
//! The master starts each worker by re-executing its own binary; what the worker inherits
//! (socket, control pipe, balancing table, configuration) is the contract of
//! [`crate::contract`], taken first thing, before the runtime exists.
//!
//! HTTP/1.1 (with upgrades: WebSockets) and cleartext HTTP/2 with prior knowledge (h2c, as
//! Cloud Run's end-to-end HTTP/2 sends it) share the port; hyper-util's auto builder tells them
//! apart by the connection's first bytes. Both pass through the same [`http::Guard`] and
//! [`ConnectionDeadline`].
//!
//! One runtime thread per worker (and `WEB_CONCURRENCY` workers, one per CPU by default) is the
//! prefork model: a worker whose runtime blocks stops its heartbeat and is replaced; it cannot
//! be hidden by other threads still making progress.
//!
//! The life of a worker:
//! 1. take the socket and the pipe, start the runtime, tell the master `Ready`, serve;
//! 2. run the warm-up tasks in the background, each attempt on a thread of its own (see
//!    [`crate::warmup`]), and beat the heart every `GUNICORN_TIMEOUT / 4`;
//! 3. on SIGTERM or SIGINT (or when the master is gone) drain: stop accepting, tell long-lived
//!    connections to go (see [`crate::shutdown`]), answer every HTTP/1.1 request with
//!    `Connection: close`, close idle connections, send HTTP/2 connections a `GOAWAY`, let
//!    in-flight requests and long-lived connections finish within `GRACEFUL_TIMEOUT`, exit 0.
//!    SIGQUIT exits at once;
//! 4. on SIGABRT (the master's verdict that it hung) a side thread logs what the worker was
//!    doing — each in-flight request's method, path and age — and exits.

use std::net::TcpListener as StdTcpListener;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::unix::pipe;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::balance::WorkerSlot;
use crate::cache::{Cache, CacheConfig};
use crate::config::Config;
use crate::contract::{self, ContractError};
use crate::control::Message;
use crate::exit::Exit;
use crate::hasher::Hasher;
use crate::http;
use crate::http::connection_deadline::{ConnectionDeadline, SilenceLimits};
use crate::logging;
use crate::services::Services;
use crate::shutdown::Shutdown;
use crate::tracker::RequestTracker;
use crate::warmup::{self, RunPolicy, WarmupTask};
use crate::warmup_status::WarmupStatus;

/// How long a draining worker lets keep-alive clients pick up their `Connection: close` before
/// it closes the connections that stayed idle.
const CLOSE_IDLE_AFTER: Duration = Duration::from_secs(1);

/// Why a worker stops serving.
#[derive(Debug, Clone, Copy)]
enum Stop {
    Graceful(&'static str),
    Fast,
}

/// Runs a worker to completion: `user_routes` builds the app's routes from the worker's
/// services, `warmups` are the app's warm-up tasks (the built-in ones are added here).
pub fn run(user_routes: impl FnOnce(&Services) -> Router, warmups: Vec<WarmupTask>) -> Exit {
    // SAFETY: this is the first thing a `herdsman __worker` process does; nothing has opened a
    // descriptor yet, so the contract's fds are the master's.
    let inherited = match unsafe { contract::take_inherited() } {
        Ok(inherited) => inherited,
        Err(e @ ContractError::NoConfig(_)) => {
            eprintln!("herdsman: {e}");
            return Exit::BadUsage;
        }
        Err(e) => {
            eprintln!("herdsman: worker cannot use what its master passed: {e}");
            return Exit::Failure;
        }
    };
    let config = inherited.config;
    logging::init(config.log_format, &config.log_level, "worker");
    install_panic_hook();
    ignore_operator_signals();

    #[cfg(feature = "test-hooks")]
    test_boot_hooks();

    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("worker cannot start its runtime: {e}");
            return Exit::Failure;
        }
    };
    if let Some((fd, index)) = inherited.metrics {
        match crate::metrics::MetricsTable::from_inherited(fd) {
            Ok(table) => crate::metrics::install(table, index),
            Err(e) => tracing::debug!("this worker is not counted in the metrics: {e}"),
        }
    }
    let slot = inherited.slots.and_then(|(fd, index)| match WorkerSlot::from_inherited(fd, index) {
        Ok(slot) => Some(slot),
        Err(e) => {
            tracing::debug!("no connection balancing: {e}");
            None
        }
    });
    let app = UserApp { routes: user_routes, warmups };
    let result = runtime.block_on(serve(app, Arc::new(config), inherited.listener, inherited.control, slot));
    // Warm-up tasks may still run; they are not worth waiting for on the way out.
    runtime.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(()) => Exit::Clean,
        Err(e) => {
            tracing::error!("worker failed: {e}");
            Exit::Failure
        }
    }
}

/// What the embedding app adds to a worker.
struct UserApp<R> {
    routes: R,
    warmups: Vec<WarmupTask>,
}

async fn serve(
    app: UserApp<impl FnOnce(&Services) -> Router>,
    config: Arc<Config>,
    listener: StdTcpListener,
    control: OwnedFd,
    slot: Option<WorkerSlot>,
) -> std::io::Result<()> {
    let slot = slot.map(Arc::new);
    let listener = TcpListener::from_std(listener)?;
    let control = Arc::new(pipe::Sender::from_owned_fd(control)?);
    let (stop_tx, mut stop_rx) = mpsc::channel::<Stop>(4);

    let recycle_after = recycle_threshold(&config);
    let tracker = {
        let control = control.clone();
        RequestTracker::new(recycle_after, move || {
            tracing::info!("served MAX_REQUESTS; asking the master for a replacement");
            let control = control.clone();
            tokio::spawn(async move { tell(&control, Message::Recycle).await });
        })
    };
    // The master validated the URL before it bound the port, so this does not fail in practice.
    let cache = Cache::new(CacheConfig::from_config(&config)).map_err(std::io::Error::other)?;
    let threads = hasher_threads(config.workers);
    let hasher = Hasher::new(threads, HASH_QUEUE_PER_THREAD * threads).map_err(std::io::Error::other)?;
    let services = Services::assemble(config.clone(), cache, hasher, tracker.clone());
    spawn_abort_diagnostics(tracker.clone(), services.warmup.clone());
    let router = http::router(&services, (app.routes)(&services));
    let request_log =
        http::access_log::RequestLog { access_log: config.access_log, trusted_proxies: config.trusted_proxies };
    let guard = http::Guard::new(router, tracker.clone(), config.request_timeout, config.max_body_bytes)
        .with_request_log(request_log)
        .with_metrics_token(config.metrics_token.as_deref());
    let guard = match http::metrics_readable(&config) {
        true => guard.with_route_labels(),
        false => guard,
    };

    let http = connection_builder();
    let silence = SilenceLimits { header: config.header_timeout, keep_alive: config.keepalive_timeout };
    let graceful = GracefulShutdown::new();

    spawn_stop_signals(stop_tx.clone())?;
    spawn_heartbeat(control.clone(), slot.clone(), tracker.clone(), heartbeat_interval(config.timeout), stop_tx);
    tell(&control, Message::Ready).await?;
    tracing::info!("worker serving");
    let tasks = warmup::builtin(&config).into_iter().chain(app.warmups);
    #[cfg(feature = "test-hooks")]
    let tasks = tasks.chain(warmup::test_hooks::tasks());
    warmup::spawn_all(
        &services.warmup,
        tasks.collect(),
        &services,
        RunPolicy { default_timeout: config.startup_operation_timeout, retry_max: config.warmup_retry_max },
    );

    let stop = loop {
        if let Some(slot) = &slot {
            slot.wait_for_fair_share().await;
        }
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let (stream, service) = ConnectionDeadline::wrap(silence, stream, guard.for_peer(peer.ip()));
                    let connection = http.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    let connection = graceful.watch(connection.into_owned());
                    let counted = slot.as_ref().map(|slot| slot.open_connection());
                    tokio::spawn(async move {
                        let _counted = counted;
                        if let Err(e) = connection.await {
                            tracing::debug!("connection ended with an error: {e}");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(stop) = stop_rx.recv() => break stop,
        }
    };
    drop(listener);
    if let Some(slot) = &slot {
        slot.withdraw();
    }

    match stop {
        Stop::Fast => {
            tracing::info!("worker exiting at once (SIGQUIT)");
            Ok(())
        }
        Stop::Graceful(reason) => {
            drain(tracker, services.shutdown, graceful, config.graceful_timeout, reason).await;
            Ok(())
        }
    }
}

/// Streams one HTTP/2 client may have open at once on a connection. Each is a request in the
/// guard (bounded by the request timeout); hyper's default is 200, Go's 250, nginx's 128.
const H2_MAX_CONCURRENT_STREAMS: u32 = 100;

/// Largest HTTP/2 request head, decoded (hyper's default, stated so a change to it is seen).
/// h2 refuses a longer one, however many CONTINUATION frames carry it (the 2024 CONTINUATION
/// flood; h2 >= 0.4.4 counts the frames).
const H2_MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// Streams a client may open and reset before the server accepts them: above it, the
/// connection gets `GOAWAY` (rapid reset, CVE-2023-44487). h2's own default, stated.
const H2_MAX_PENDING_RESET_STREAMS: usize = 20;

/// Streams the server itself may reset for a client's protocol errors before the connection
/// gets `GOAWAY`: a client cannot make the server do unbounded reset work either (MadeYouReset,
/// CVE-2025-8671). hyper's default, stated.
const H2_MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// Largest HTTP/1.1 request head, and the most a connection reads ahead of its handler. hyper's
/// default (about 400 kB) let each connection hold that much: a 400 kB head was accepted, and
/// every upload, even one refused unread, went through a buffer of that size. A longer head is
/// answered 431; nginx's default is 32 KiB (four buffers of 8 KiB).
const H1_MAX_BUF_BYTES: usize = 64 * 1024;

/// HTTP/1.1 with upgrades and HTTP/2 with prior knowledge on the same connections.
fn connection_builder() -> auto::Builder<TokioExecutor> {
    let mut http = auto::Builder::new(TokioExecutor::new());
    // hyper's header timer would also count idle keep-alive time; the connection's own deadline
    // keeps the two apart (see `http::connection_deadline`).
    http.http1().timer(TokioTimer::new()).header_read_timeout(None).max_buf_size(H1_MAX_BUF_BYTES);
    http.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_header_list_size(H2_MAX_HEADER_LIST_BYTES)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESET_STREAMS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESETS);
    http
}

/// Lets in-flight requests and long-lived connections finish; see step 3 of the module
/// documentation.
async fn drain(tracker: RequestTracker, shutdown: Shutdown, graceful: GracefulShutdown, grace: Duration, reason: &str) {
    let deadline = tokio::time::Instant::now() + grace;
    shutdown.begin();
    tracker.start_draining();
    tracing::info!(
        "worker draining ({reason}): {} connections open, {} long-lived (WebSockets, event streams) told to go",
        graceful.count(),
        shutdown.open()
    );
    let close_idle_at = (tokio::time::Instant::now() + CLOSE_IDLE_AFTER).min(deadline);
    while graceful.count() > 0 && tokio::time::Instant::now() < close_idle_at {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let everything = async { tokio::join!(graceful.shutdown(), shutdown.all_closed()) };
    match tokio::time::timeout_at(deadline, everything).await {
        Ok(_) => tracing::info!("worker drained; exiting"),
        Err(_) => tracing::warn!(
            "worker exiting with {} requests unfinished and {} long-lived connections cut after GRACEFUL_TIMEOUT",
            tracker.in_flight().len(),
            shutdown.open()
        ),
    }
}

/// Password hashes waiting per hashing thread before logins get 503 + Retry-After.
const HASH_QUEUE_PER_THREAD: usize = 32;

/// This worker's share of the CPUs for bcrypt: all workers together can use every core for
/// logins, and the hashing threads run at a lower priority than the runtime thread that
/// answers `/live`.
fn hasher_threads(workers: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    cpus.div_ceil(workers.max(1)).max(1)
}

/// `MAX_REQUESTS` plus this worker's share of the jitter; `None` when recycling is off.
fn recycle_threshold(config: &Config) -> Option<u64> {
    (config.max_requests > 0).then(|| config.max_requests + rand::random_range(0..=config.max_requests_jitter))
}

/// Often enough that one lost beat never looks like a hang.
fn heartbeat_interval(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// Beats every `every` from the runtime; also tells the master, once, that this worker has
/// answered a request (a worker that hangs before that is a failed boot).
fn spawn_heartbeat(
    control: Arc<pipe::Sender>,
    slot: Option<Arc<WorkerSlot>>,
    tracker: RequestTracker,
    every: Duration,
    stop: mpsc::Sender<Stop>,
) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(every);
        let mut told_served = false;
        loop {
            ticker.tick().await;
            if let Some(slot) = &slot {
                slot.stamp();
            }
            let message = if !told_served && tracker.served() > 0 {
                told_served = true;
                Message::Served
            } else {
                Message::Heartbeat
            };
            match tell(&control, message).await {
                Ok(()) => {}
                Err(_) => {
                    tracing::warn!("the master is gone; draining");
                    let _ = stop.send(Stop::Graceful("master gone")).await;
                    return;
                }
            }
        }
    });
}

/// Writes one message to the master. One byte is below `PIPE_BUF`, so writes never interleave.
async fn tell(control: &pipe::Sender, message: Message) -> std::io::Result<()> {
    loop {
        control.writable().await?;
        match control.try_write(&[message.to_byte()]) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

fn spawn_stop_signals(stop: mpsc::Sender<Stop>) -> std::io::Result<()> {
    let table = [
        (SignalKind::terminate(), Stop::Graceful("SIGTERM")),
        // Ctrl-C reaches the whole process group; the master turns it into a drain.
        (SignalKind::interrupt(), Stop::Graceful("SIGINT")),
        (SignalKind::quit(), Stop::Fast),
    ];
    for (kind, intent) in table {
        let mut stream = signal(kind)?;
        let stop = stop.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if stop.send(intent).await.is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}

/// SIGABRT is the master's "you hung" (as in gunicorn). The runtime may be blocked, so the
/// report comes from a side thread that reads the request tracker, then ends the process.
fn spawn_abort_diagnostics(tracker: RequestTracker, warmup: WarmupStatus) {
    let mut signals = match signal_hook::iterator::Signals::new([signal_hook::consts::SIGABRT]) {
        Ok(signals) => signals,
        Err(e) => {
            tracing::warn!("cannot install the SIGABRT handler, a hang will not be explained: {e}");
            return;
        }
    };
    let spawned = std::thread::Builder::new().name("abort-diagnostics".into()).spawn(move || {
        if signals.forever().next().is_some() {
            let in_flight = tracker.in_flight();
            tracing::error!("worker aborted by the master: its runtime sent no heartbeat for GUNICORN_TIMEOUT; {} requests in flight", in_flight.len());
            if let Some(pending) = warmup.pending() {
                tracing::error!("warm-up still running: {pending}");
            }
            if in_flight.is_empty() {
                tracing::error!("no request was running: a task on the runtime blocked it (work spawned by a warm-up or a background task?)");
            }
            for (request, age) in in_flight {
                let id = request.request_id.to_str().unwrap_or("-");
                tracing::error!(
                    "in flight: {} {} for {:.1}s (request id {id})",
                    request.method,
                    request.path(),
                    age.as_secs_f64()
                );
            }
            std::process::exit(1);
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the diagnostics thread: {e}");
    }
}

/// A panicking handler is answered 500 by the [`http::Guard`]; this makes its log entry one
/// line with the message and location, never a multi-line dump.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = logging::panic_message(info.payload());
        let location = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        tracing::error!("panic: {message}{location}");
    }));
}

/// HUP, TTIN and TTOU are for the master. A terminal can send them to the whole process group,
/// and the default action of TTIN/TTOU would stop the worker.
fn ignore_operator_signals() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    for sig in [Signal::SIGHUP, Signal::SIGTTIN, Signal::SIGTTOU] {
        // SAFETY: SIG_IGN installs no handler code; nothing else in the worker handles these.
        let _ = unsafe { signal(sig, SigHandler::SigIgn) };
    }
}

/// Test-only misbehaviour at boot, driven by variables the tests set.
#[cfg(feature = "test-hooks")]
fn test_boot_hooks() {
    if let Some(ms) = std::env::var("HERDSMAN_TEST_BOOT_DELAY_MS").ok().and_then(|v| v.parse().ok()) {
        std::thread::sleep(Duration::from_millis(ms));
    }
    if std::env::var_os("HERDSMAN_TEST_FAIL_BOOT").is_some() {
        tracing::error!("test hook: failing this worker's boot on purpose");
        std::process::exit(1);
    }
}
