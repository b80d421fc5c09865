//! How long one connection may stay silent: the idle keep-alive timeout between requests, and the
//! header timeout once a request has begun.
//!
//! Why not hyper's `header_read_timeout` alone: hyper (1.x, `proto/h1/conn.rs`) starts that timer
//! when it begins waiting for a request head, which on a keep-alive connection is right after the
//! previous response. Idle time therefore counts as header time, and a 10 s header timeout closed
//! every keep-alive connection after 10 s idle — while Heroku's router keeps idle connections for
//! 90 s and an ALB for 60 s, so a request they sent at that instant met a closing socket.
//!
//! Here the two are apart, as in Go's `net/http` (`ReadHeaderTimeout`, `IdleTimeout`):
//! - a new connection must send its first request head within the header timeout (a client that
//!   connects and sends nothing, or sends slowly, holds no slot for long);
//! - after a response, the connection may stay idle for the keep-alive timeout; writes of a
//!   response body still streaming count as activity;
//! - the first byte of the next request starts the header timeout for that head;
//! - while a request is being served no timer runs (`HERDSMAN_REQUEST_TIMEOUT` bounds handlers);
//! - after a `101 Switching Protocols` (a WebSocket) the connection is no longer HTTP: no timer
//!   runs, the protocol's own pings and the drain (see [`crate::shutdown`]) bound it.
//!
//! On an HTTP/2 connection requests are streams, any number at once, and frames other than a
//! request (`PING`, `WINDOW_UPDATE`) arrive between them: once the connection is known to be
//! HTTP/2, bytes read between requests do not start a header timer (h2 dispatches a stream only
//! with its complete head, and bounds its size), so a connection with no stream open is closed
//! the keep-alive timeout after it last wrote.
//!
//! [`DeadlineIo`] wraps the socket and enforces the deadline on reads (a read past it fails, and
//! hyper closes the connection); [`DeadlineService`] wraps the service and tells it where requests
//! begin and end. Both share one [`ConnectionDeadline`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The two limits on a silent connection.
#[derive(Debug, Clone, Copy)]
pub struct SilenceLimits {
    /// From the first byte of a request (or from the accept, for the first request) to its
    /// complete head. `HERDSMAN_HEADER_TIMEOUT`.
    pub header: Duration,
    /// From the end of a response to the first byte of the next request.
    /// `HERDSMAN_KEEPALIVE_TIMEOUT`.
    pub keep_alive: Duration,
}

/// Where a connection is between two requests; shared by its socket and its service.
#[derive(Debug)]
enum Phase {
    /// No byte of the next request yet: closed at `deadline` (header timeout after the accept,
    /// keep-alive timeout after a response).
    AwaitingRequest { deadline: Instant },
    /// Part of a request head has arrived; it must be complete by `deadline`.
    ReadingHead { deadline: Instant },
    /// This many requests are being answered; no deadline.
    Serving { requests: usize },
    /// Switched to another protocol; no deadline, for good.
    Upgraded,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// The reader waiting without a timer while a request was served, woken when the keep-alive
    /// timer starts so that it arms it.
    reader: Option<Waker>,
    /// HTTP/2: requests are streams, and other frames come and go between them.
    multiplexed: bool,
}

/// The deadline of one connection. Create one per accepted connection with [`Self::wrap`].
#[derive(Debug, Clone)]
pub struct ConnectionDeadline {
    limits: SilenceLimits,
    state: Arc<Mutex<State>>,
}

impl ConnectionDeadline {
    /// Wraps a freshly accepted socket and the service that will answer on it.
    pub fn wrap<T, S>(limits: SilenceLimits, io: T, service: S) -> (DeadlineIo<T>, DeadlineService<S>) {
        let deadline = Instant::now() + limits.header;
        let shared = ConnectionDeadline {
            limits,
            state: Arc::new(Mutex::new(State {
                phase: Phase::AwaitingRequest { deadline },
                reader: None,
                multiplexed: false,
            })),
        };
        let timer = Box::pin(tokio::time::sleep_until(deadline));
        (DeadlineIo { io, deadline: shared.clone(), timer }, DeadlineService { inner: service, deadline: shared })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a few words updated without calling out; a poisoned lock still holds a
        // consistent phase.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn bytes_read(&self) {
        let mut state = self.lock();
        if let (Phase::AwaitingRequest { .. }, false) = (&state.phase, state.multiplexed) {
            state.phase = Phase::ReadingHead { deadline: Instant::now() + self.limits.header };
        }
    }

    fn bytes_written(&self) {
        let mut state = self.lock();
        if let Phase::AwaitingRequest { .. } = state.phase {
            state.phase = Phase::AwaitingRequest { deadline: Instant::now() + self.limits.keep_alive };
        }
    }

    fn request_started(&self, multiplexed: bool) {
        let mut state = self.lock();
        state.multiplexed |= multiplexed;
        state.phase = match state.phase {
            Phase::Serving { requests } => Phase::Serving { requests: requests + 1 },
            _ => Phase::Serving { requests: 1 },
        };
    }

    fn request_finished(&self, upgraded: bool) {
        let mut state = self.lock();
        if upgraded {
            state.phase = Phase::Upgraded;
            return;
        }
        if let Phase::Serving { requests } = state.phase {
            if requests > 1 {
                state.phase = Phase::Serving { requests: requests - 1 };
                return;
            }
        }
        state.phase = Phase::AwaitingRequest { deadline: Instant::now() + self.limits.keep_alive };
        if let Some(reader) = state.reader.take() {
            reader.wake();
        }
    }

    /// The current deadline, if any; without one, remembers `waker` to be told when one starts.
    fn deadline(&self, waker: &Waker) -> Option<Instant> {
        let mut state = self.lock();
        match state.phase {
            Phase::AwaitingRequest { deadline } | Phase::ReadingHead { deadline } => Some(deadline),
            Phase::Upgraded => None,
            Phase::Serving { .. } => {
                if !state.reader.as_ref().is_some_and(|w| w.will_wake(waker)) {
                    state.reader = Some(waker.clone());
                }
                None
            }
        }
    }
}

/// A socket whose reads fail once the connection's deadline has passed.
#[derive(Debug)]
pub struct DeadlineIo<T> {
    io: T,
    deadline: ConnectionDeadline,
    /// One timer per connection, moved as the deadline moves.
    timer: Pin<Box<Sleep>>,
}

impl<T: AsyncRead + Unpin> AsyncRead for DeadlineIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.deadline.bytes_read();
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        let Some(deadline) = this.deadline.deadline(cx.waker()) else { return Poll::Pending };
        if this.timer.deadline() != deadline {
            this.timer.as_mut().reset(deadline);
        }
        match this.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection silent past HERDSMAN_KEEPALIVE_TIMEOUT or HERDSMAN_HEADER_TIMEOUT",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for DeadlineIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            if n > 0 {
                self.deadline.bytes_written();
            }
        }
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = written {
            if n > 0 {
                self.deadline.bytes_written();
            }
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A service that tells its connection's deadline where each request begins and ends.
#[derive(Debug, Clone)]
pub struct DeadlineService<S> {
    inner: S,
    deadline: ConnectionDeadline,
}

impl<S, B, R> hyper::service::Service<hyper::Request<B>> for DeadlineService<S>
where
    S: hyper::service::Service<hyper::Request<B>, Response = hyper::Response<R>>,
    S::Future: Unpin,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Served<S::Future>;

    fn call(&self, request: hyper::Request<B>) -> Self::Future {
        self.deadline.request_started(request.version() == hyper::Version::HTTP_2);
        Served { inner: self.inner.call(request), deadline: Some(self.deadline.clone()) }
    }
}

/// A request being answered; when it is answered (or dropped) the keep-alive timer starts.
pub struct Served<F> {
    inner: F,
    deadline: Option<ConnectionDeadline>,
}

impl<F> Served<F> {
    fn finish(&mut self, upgraded: bool) {
        if let Some(deadline) = self.deadline.take() {
            deadline.request_finished(upgraded);
        }
    }
}

impl<F, R, E> Future for Served<F>
where
    F: Future<Output = Result<hyper::Response<R>, E>> + Unpin,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let output = std::task::ready!(Pin::new(&mut self.inner).poll(cx));
        let upgraded = matches!(&output, Ok(response) if response.status() == hyper::StatusCode::SWITCHING_PROTOCOLS);
        self.finish(upgraded);
        Poll::Ready(output)
    }
}

impl<F> Drop for Served<F> {
    fn drop(&mut self) {
        self.finish(false);
    }
}
