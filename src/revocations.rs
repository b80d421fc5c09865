//! The revocation channel: how a logout through one worker reaches every worker of every
//! instance sharing the Redis within one round trip.
//!
//! A logout deletes the session's key and publishes its digest (the hex SHA-256 of the token,
//! never the token) on [`CHANNEL`], both in one Lua script, so the publication cannot be lost
//! between the two ([`crate::sessions`]). Every worker holds one subscription to that channel on
//! a connection of its own (a subscribed connection can carry nothing else), opened inside the
//! worker's runtime with the cache's URL and TLS settings, and marks each digest it hears as
//! revoked at once.
//!
//! # When the subscription can be relied on
//! Redis pub/sub delivers a message to the subscribers connected when it is published, at most
//! once: a worker whose subscription is down, connecting or cut off hears nothing of what is
//! published meanwhile. So a worker trusts a session locally only while its subscription is
//! *live*: subscribed, not errored, and heard from (a message or the answer to a heartbeat
//! [`PING`](HEARTBEAT)) within [`LIVENESS`]. Each time it becomes live again it starts a new
//! *epoch* ([`Revocations::live_epoch`]); a session verified in an earlier epoch (or while no
//! subscription was live) is not trusted locally until it is verified again, so a revocation
//! published in the gap cannot be missed. Until then every request asks Redis, as with
//! `HERDSMAN_SESSION_RECHECK=0`. A link that stops answering without closing (a partition, a
//! hung Redis) stops counting as live within [`LIVENESS`].
//!
//! The subscription reconnects with exponential back-off and jitter ([`crate::backoff`]), so
//! workers that lost Redis together do not come back in one burst.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::aio::PubSubSink;

use crate::backoff::Backoff;

/// The channel logouts are published on; each message is a session digest in hex.
pub const CHANNEL: &str = "herdsman:revoked";

/// How often a live subscription asks Redis whether it is still there.
pub const HEARTBEAT: Duration = Duration::from_millis(250);

/// How long after it last heard from Redis a subscription still counts as live: a few
/// heartbeats, so one late answer from a busy Redis does not end local trust.
pub const LIVENESS: Duration = Duration::from_secs(1);

/// The longest a connection attempt and its SUBSCRIBE may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Waits between reconnection attempts: from this, doubling, with jitter.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// What to do with a revoked digest.
pub type OnRevoked = Arc<dyn Fn([u8; 32]) + Send + Sync>;

/// One worker's subscription to revocations. Cheap to clone: every clone shares it.
#[derive(Clone)]
pub struct Revocations {
    state: Arc<State>,
}

struct State {
    /// `None` without `REDIS_URL` (or with one the channel cannot use): never live.
    client: Option<redis::Client>,
    started: AtomicBool,
    live: AtomicBool,
    /// Counts the times the subscription became live; 0 until the first.
    epoch: AtomicU64,
    /// When Redis was last heard on the subscription, as [`stamp`]s.
    heard: AtomicU64,
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations").field("live_epoch", &self.live_epoch()).finish_non_exhaustive()
    }
}

impl Revocations {
    /// A subscription through `client`, not started yet; `None` makes one that is never live.
    pub fn new(client: Option<redis::Client>) -> Revocations {
        let state = State {
            client,
            started: AtomicBool::new(false),
            live: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            heard: AtomicU64::new(0),
        };
        Revocations { state: Arc::new(state) }
    }

    /// Starts the subscription task, once; each digest heard goes to `on_revoked`. Must run
    /// inside the runtime.
    pub fn start(&self, on_revoked: impl FnOnce() -> OnRevoked) {
        // Called on every session check: one load when it runs already.
        if self.state.started.load(Ordering::Acquire) || self.state.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(client) = self.state.client.clone() else { return };
        let (state, on_revoked) = (self.state.clone(), on_revoked());
        tokio::spawn(async move {
            let mut backoff = Backoff::new(RETRY_FIRST, RETRY_MAX);
            loop {
                let ended = subscribe(&client, &state, &on_revoked, &mut backoff).await;
                state.live.store(false, Ordering::Release);
                // The first failure in a row is worth a warning; retries of it are not.
                match backoff.failures() {
                    0 => {
                        tracing::warn!(reason = %ended, "session revocations: subscription lost; sessions are checked in Redis until it is back")
                    }
                    _ => tracing::debug!(reason = %ended, "session revocations: still not subscribed"),
                }
                tokio::time::sleep(backoff.fail()).await;
            }
        });
    }

    /// The current epoch while the subscription is live (see the module doc), else `None`.
    pub fn live_epoch(&self) -> Option<u64> {
        let state = &self.state;
        let heard = state.heard.load(Ordering::Acquire);
        let fresh = heard != 0 && stamp(Instant::now()).saturating_sub(heard) < LIVENESS.as_nanos() as u64;
        (state.live.load(Ordering::Acquire) && fresh).then(|| state.epoch.load(Ordering::Acquire))
    }
}

/// Subscribes, then hears digests until the connection fails or stops answering; the error
/// says why.
async fn subscribe(
    client: &redis::Client,
    state: &State,
    on_revoked: &OnRevoked,
    backoff: &mut Backoff,
) -> redis::RedisError {
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(CHANNEL).await?;
        Ok::<_, redis::RedisError>(pubsub)
    });
    let pubsub = match connected.await {
        Ok(Ok(pubsub)) => pubsub,
        Ok(Err(err)) => return err,
        Err(_) => return timed_out("connecting and subscribing"),
    };
    let (sink, mut messages) = pubsub.split();
    state.heard.store(stamp(Instant::now()), Ordering::Release);
    state.epoch.fetch_add(1, Ordering::AcqRel);
    state.live.store(true, Ordering::Release);
    match backoff.failures() {
        0 => tracing::info!(channel = CHANNEL, "session revocations: subscribed"),
        _ => tracing::info!(channel = CHANNEL, "session revocations: subscribed again"),
    }
    backoff.reset();
    let heartbeat = heartbeat(sink, state);
    tokio::pin!(heartbeat);
    loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else {
                    return redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
                };
                state.heard.store(stamp(Instant::now()), Ordering::Release);
                match parse_digest(message.get_payload_bytes()) {
                    Some(digest) => on_revoked(digest),
                    None => tracing::debug!("session revocations: a message that is not a digest, ignored"),
                }
            }
            err = &mut heartbeat => return err,
        }
    }
}

/// PINGs every [`HEARTBEAT`] and notes each answer; returns when one fails or does not come
/// within [`LIVENESS`].
async fn heartbeat(mut sink: PubSubSink, state: &State) -> redis::RedisError {
    let mut every = tokio::time::interval(HEARTBEAT);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        match tokio::time::timeout(LIVENESS, sink.ping::<redis::Value>()).await {
            Ok(Ok(_)) => state.heard.store(stamp(Instant::now()), Ordering::Release),
            Ok(Err(err)) => return err,
            Err(_) => return timed_out("answering a heartbeat"),
        }
    }
}

fn timed_out(what: &str) -> redis::RedisError {
    let message = format!("Redis took too long {what}");
    redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, message))
}

/// A digest from its 64 hex digits.
pub fn parse_digest(hex: &[u8]) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let nibble = |digit: u8| char::from(digit).to_digit(16).and_then(|n| u8::try_from(n).ok());
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// `at` as nanoseconds since this process first asked, for an atomic; never 0.
pub(crate) fn stamp(at: Instant) -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(at.saturating_duration_since(base).as_nanos()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_read_from_64_hex_digits_only() {
        let digest = [0xabu8; 32];
        assert_eq!(parse_digest("ab".repeat(32).as_bytes()), Some(digest));
        assert_eq!(parse_digest("AB".repeat(32).as_bytes()), Some(digest));
        for bad in ["ab".repeat(31), "zz".repeat(32), "+1".repeat(32), String::new()] {
            assert_eq!(parse_digest(bad.as_bytes()), None, "{bad}");
        }
        assert_eq!(parse_digest(&[0xff; 64]), None);
    }

    #[test]
    fn without_a_client_the_subscription_is_never_live() {
        let revocations = Revocations::new(None);
        revocations.start(|| Arc::new(|_| {}));
        assert_eq!(revocations.live_epoch(), None);
        // Marked live but not heard from lately: not live either.
        revocations.state.live.store(true, Ordering::Release);
        assert_eq!(revocations.live_epoch(), None);
        revocations.state.heard.store(stamp(Instant::now()), Ordering::Release);
        assert_eq!(revocations.live_epoch(), Some(0));
    }
}
