//! Whether a late reply means a hung Redis or a busy one, and which connection a request rides.
//!
//! # Late is not dead
//!
//! A request's round trip is bounded by the deadline fitted to Redis's latency
//! ([`super::deadline`]), a few milliseconds. Its reply can be late for two reasons that call for
//! opposite answers: Redis stopped answering (SIGSTOP, a stalled host), and every request of the
//! worker should go to memory at once; or the reply is queued behind other replies on the same
//! connection (a client fetching many large values), Redis is fine, and going to memory would
//! serve a possibly stale copy and hold every write of the worker for replay. One late reply
//! cannot tell them apart, so it is never the verdict on its own (Envoy's outlier detection,
//! Finagle's failure accrual and resilience4j all decide on more than one timeout). The
//! question is put to Redis instead: a `PING` on a connection that carries nothing else
//! ([`Liveness`]), bounded by the same fitted deadline. It answers unless Redis itself is stuck.
//!
//! - PING answers: Redis is alive and busy. The late request keeps waiting, asking again each
//!   fitted deadline, up to the operation timeout (`HERDSMAN_REDIS_TIMEOUT`).
//! - PING is late too, or fails: Redis is hung or gone; the breaker opens and releases every
//!   waiting request, as soon as before plus one PING's deadline. A PING left unanswered while
//!   this worker was busy itself (on the CPU or waiting for one for most of the deadline: parsing
//!   megabytes of replies on a loaded host, say) is no verdict: the answer may be sitting unread,
//!   so the request waits on as if alive, within the operation timeout. A worker waiting for a
//!   hung Redis is mostly idle, and not runnable while idle, however loaded the host.
//!
//! Before asking, a late request looks at what the worker's other requests saw ([`Progress`]): a
//! reply that arrived within the last half fitted deadline, on any connection, already says Redis
//! is alive (liveness is replies arriving, not this reply being on time). This matters most when
//! the worker itself is slow to read (a busy host, a process parsing megabytes of replies): the
//! PING's answer would wait for the same reader. Otherwise one check runs at a time per worker,
//! and every request that became late before a check ended takes that check's answer:
//! sixty-four late replies cost one PING, not sixty-four.
//!
//! A request that Redis, alive, still did not answer within the operation timeout fails on its
//! own ([`super::CacheError::Late`]: a read is answered from memory, a write is refused, a
//! durable operation fails). [`LATE_LIMIT`] such failures in a row of small requests open the
//! breaker: a Redis whose PING answers but whose small requests never do is not serving
//! (a stuck connection, a Redis answering only some clients). A large transfer's time is its
//! size's, so late large transfers do not count; they get a fresh connection instead.
//!
//! # Small and bulk traffic
//!
//! The pool's connections are multiplexed, so replies come back in order: a session check sent
//! after sixty-four 1 MB values waits for all of them. So each request says what it is
//! ([`Purpose`]), and bulk traffic (a write of a large value, a read of a key whose memory copy is
//! large, the replay and warm-up pipelines) has a pool of its own, a few round trips at a time.
//! Sessions, the login throttle, quota checks and small values never queue behind it, and only
//! small round trips are samples of Redis's latency for the fitted deadline.

use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bb8_redis::redis;

use super::redis_tier::Request;
use super::CacheError;

/// A request at least this large, or whose reply is expected to be, is bulk traffic. Redis
/// writes a client's replies 64 KiB per turn of its event loop, so smaller ones cost those
/// behind them no more than one turn.
pub(super) const BULK_BYTES: usize = 64 << 10;

/// When Redis last answered a request of this worker, on any connection.
#[derive(Debug)]
pub(super) struct Progress {
    epoch: Instant,
    /// Nanoseconds from `epoch` to the last answer.
    last: AtomicU64,
}

impl Progress {
    pub(super) fn new() -> Progress {
        Progress { epoch: Instant::now(), last: AtomicU64::new(0) }
    }

    /// An answer arrived now.
    pub(super) fn answered(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.fetch_max(now, Ordering::Relaxed);
    }

    /// Whether an answer arrived within `window` before `now`.
    pub(super) fn within(&self, window: Duration, now: Instant) -> bool {
        let last = self.epoch + Duration::from_nanos(self.last.load(Ordering::Relaxed));
        last > self.epoch && now.saturating_duration_since(last) < window
    }
}

/// Late failures in a row of small requests (Redis alive) that open the breaker; Finagle's and
/// Envoy's default for consecutive failures.
pub(super) const LATE_LIMIT: u32 = 5;

/// Which connections a request rides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Purpose {
    /// Sessions, throttle, quota, small values: latency matters.
    Small,
    /// Large values and pipelines: throughput matters, and they must not delay the small.
    Bulk,
}

impl Purpose {
    /// The purpose of a request by what it sends.
    pub(super) fn of(request: &Request<'_>) -> Purpose {
        let sent = match request {
            Request::Cmd(cmd) => arg_bytes(cmd),
            Request::Pipe(pipe) => pipe.cmd_iter().map(arg_bytes).sum(),
        };
        Purpose::by_size(sent)
    }

    /// The purpose of a read whose reply is expected to be `expected` bytes (this worker's memory
    /// copy of the key, when it has one; unknown values are taken to be small).
    pub(super) fn reading(expected: Option<usize>) -> Purpose {
        Purpose::by_size(expected.unwrap_or(0))
    }

    fn by_size(bytes: usize) -> Purpose {
        if bytes >= BULK_BYTES {
            Purpose::Bulk
        } else {
            Purpose::Small
        }
    }
}

fn arg_bytes(cmd: &redis::Cmd) -> usize {
    cmd.args_iter()
        .map(|arg| match arg {
            redis::Arg::Simple(bytes) => bytes.len(),
            _ => 0,
        })
        .sum()
}

/// What a liveness check found.
#[derive(Clone, Debug)]
pub(super) enum Verdict {
    /// PING answered in time.
    Alive,
    /// PING did not answer within this.
    Silent(Duration),
    /// PING did not answer, but this worker was busy meanwhile: it may not have read the answer. Not a verdict on Redis; the request waits on (within the operation timeout).
    Unheard,
    /// PING (or opening its connection) failed.
    Failed(redis::RedisError),
}

impl Verdict {
    /// `Ok` when alive, else the error that opens the breaker.
    pub(super) fn into_result(self) -> Result<(), CacheError> {
        match self {
            Verdict::Alive | Verdict::Unheard => Ok(()),
            Verdict::Silent(limit) => Err(CacheError::Timeout(limit)),
            Verdict::Failed(err) => Err(CacheError::Redis(err)),
        }
    }
}

/// The worker's liveness check: a dedicated connection `C`, used by one check at a time, and the
/// last verdict, shared with every request that became late before it was reached.
pub(super) struct Liveness<C> {
    /// The dedicated connection; holding this lock is running a check.
    conn: tokio::sync::Mutex<Option<C>>,
    last: Mutex<Option<(Instant, Verdict)>>,
}

impl<C> Liveness<C> {
    pub(super) fn new() -> Liveness<C> {
        Liveness { conn: tokio::sync::Mutex::new(None), last: Mutex::new(None) }
    }

    /// Whether Redis is alive, for a request late since `late_since`: the verdict of a check
    /// that ended after that if there is one, else a new check, `ping`, which gets the connection
    /// (none yet, or the one it left) and leaves the one to keep.
    pub(super) async fn check<F, Fut>(&self, late_since: Instant, ping: F) -> Verdict
    where
        C: Clone,
        F: FnOnce(Option<C>) -> Fut,
        Fut: Future<Output = (Option<C>, Verdict)>,
    {
        let mut conn = self.conn.lock().await;
        if let Some(verdict) = self.since(late_since) {
            return verdict;
        }
        // A clone (a handle, for a multiplexed connection): a check given up halfway (its
        // request cancelled) leaves the connection in place for the next.
        let (kept, verdict) = ping(conn.clone()).await;
        *conn = kept;
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), verdict.clone()));
        verdict
    }

    /// Replaces the dedicated connection (a fresh one when the breaker closes: the old one may
    /// lead to a server that restarted).
    pub(super) async fn replace(&self, fresh: C) {
        *self.conn.lock().await = Some(fresh);
    }

    fn since(&self, late_since: Instant) -> Option<Verdict> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.as_ref().filter(|(at, _)| *at >= late_since).map(|(_, verdict)| verdict.clone())
    }
}

/// Late failures in a row of small requests ([`LATE_LIMIT`]); any small success resets it, and
/// so does the breaker opening.
#[derive(Debug, Default)]
pub(super) struct LateFailures(AtomicU32);

impl LateFailures {
    pub(super) fn reset(&self) {
        // Read first: a store on every success would bounce the cache line between cores.
        if self.0.load(Ordering::Relaxed) != 0 {
            self.0.store(0, Ordering::Relaxed);
        }
    }

    /// Counts one; true when this one reaches the limit (the breaker opens).
    pub(super) fn failure(&self) -> bool {
        self.0.fetch_add(1, Ordering::Relaxed) + 1 >= LATE_LIMIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    #[test]
    fn large_requests_and_reads_of_large_copies_are_bulk() {
        let mut small = redis::cmd("SET");
        small.arg("k").arg(vec![0u8; BULK_BYTES - 10]);
        assert_eq!(Purpose::of(&Request::Cmd(&small)), Purpose::Small);
        let mut large = redis::cmd("SET");
        large.arg("k").arg(vec![0u8; BULK_BYTES]);
        assert_eq!(Purpose::of(&Request::Cmd(&large)), Purpose::Bulk);
        // Many small writes in one pipeline add up.
        let mut pipe = redis::pipe();
        for i in 0..20 {
            pipe.cmd("SET").arg(i).arg(vec![0u8; 4 << 10]);
        }
        assert_eq!(Purpose::of(&Request::Pipe(&pipe)), Purpose::Bulk);
        assert_eq!(Purpose::reading(None), Purpose::Small);
        assert_eq!(Purpose::reading(Some(100)), Purpose::Small);
        assert_eq!(Purpose::reading(Some(1 << 20)), Purpose::Bulk);
    }

    #[test]
    fn the_breaker_opens_on_the_fifth_late_failure_in_a_row_only() {
        let late = LateFailures::default();
        for _ in 0..LATE_LIMIT - 1 {
            assert!(!late.failure());
        }
        late.reset();
        for _ in 0..LATE_LIMIT - 1 {
            assert!(!late.failure());
        }
        assert!(late.failure());
    }

    #[test]
    fn only_a_recent_answer_is_progress() {
        let progress = Progress::new();
        let window = Duration::from_millis(20);
        assert!(!progress.within(window, Instant::now()), "no answer yet");
        progress.answered();
        assert!(progress.within(window, Instant::now()));
        assert!(!progress.within(window, Instant::now() + window), "too old");
    }

    #[test]
    fn verdicts_map_to_errors_that_open_the_breaker() {
        assert!(Verdict::Alive.into_result().is_ok());
        assert!(Verdict::Unheard.into_result().is_ok(), "a busy worker is no verdict on redis");
        let silent = Verdict::Silent(Duration::from_millis(20)).into_result().expect_err("silent");
        assert!(silent.is_outage());
        assert!(silent.to_string().contains("did not answer within 20ms"), "{silent}");
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(Verdict::Failed(refused.into()).into_result().expect_err("failed").is_outage());
    }

    type Pinged = std::pin::Pin<Box<dyn Future<Output = (Option<u32>, Verdict)> + Send>>;

    /// A ping that counts its calls, answers `verdict` after `takes`, and keeps a connection.
    fn ping(calls: &Arc<AtomicUsize>, takes: Duration, verdict: Verdict) -> impl FnOnce(Option<u32>) -> Pinged {
        let calls = calls.clone();
        move |conn| {
            Box::pin(async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(takes).await;
                (Some(conn.map_or(1, |n| n + 1)), verdict)
            })
        }
    }

    #[tokio::test]
    async fn requests_late_at_once_share_one_check() {
        let liveness = Arc::new(Liveness::<u32>::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let late_since = Instant::now();
        let checks: Vec<_> = (0..64)
            .map(|_| {
                let liveness = liveness.clone();
                let ping = ping(&calls, Duration::from_millis(5), Verdict::Alive);
                tokio::spawn(async move { liveness.check(late_since, ping).await })
            })
            .collect();
        for check in checks {
            assert!(matches!(check.await.expect("check"), Verdict::Alive));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one PING answers every request late before it ended");
        // A request late after that check ended asks again, on the connection the first one kept.
        let again = liveness.check(Instant::now(), ping(&calls, Duration::ZERO, Verdict::Alive)).await;
        assert!(matches!(again, Verdict::Alive));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(*liveness.conn.lock().await, Some(2));
    }

    #[tokio::test]
    async fn a_silent_verdict_is_shared_and_a_replaced_connection_is_used() {
        let liveness = Liveness::<u32>::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let late_since = Instant::now();
        let silent = Verdict::Silent(Duration::from_millis(1));
        let first = liveness.check(late_since, ping(&calls, Duration::ZERO, silent)).await;
        let second = liveness.check(late_since, ping(&calls, Duration::ZERO, Verdict::Alive)).await;
        assert!(matches!((first, second), (Verdict::Silent(_), Verdict::Silent(_))));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        liveness.replace(40).await;
        liveness.check(Instant::now(), ping(&calls, Duration::ZERO, Verdict::Alive)).await;
        assert_eq!(*liveness.conn.lock().await, Some(41));
    }
}
