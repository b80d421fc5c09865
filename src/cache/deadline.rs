//! How long one Redis round trip may take before the cache treats Redis as hung: a deadline
//! fitted to the latency Redis has shown, between a floor and the configured timeout.
//!
//! # Why not the configured timeout alone
//!
//! A fixed timeout must be set for the slowest healthy moment (a TLS handshake, a busy
//! host), so it is far above a round trip's usual few hundred microseconds. When Redis stops
//! answering without closing its connections (SIGSTOP, a stalled host, a long fork or fsync)
//! every request in flight waits that whole timeout before anyone learns of the hang. Fitted
//! to the observed latency, the first request notices in a few milliseconds, asks Redis whether
//! it is alive ([`super::liveness`]), and when it is not the breaker releases every other one at
//! once ([`super::redis_tier`]). The deadline decides when to ask, not that Redis is gone.
//!
//! # The estimate
//!
//! TCP's retransmission timeout solves the same problem (RFC 6298): a smoothed round trip
//! plus four smoothed mean deviations, which sits above all but the rarest samples of a
//! jittery latency and follows a change within tens of samples, with no histogram to keep.
//! The deadline counts the smoothed round trip twice: a Redis with a steady latency has
//! almost no deviation, and a deadline at its mean would cut off every slightly slow reply
//! (TCP has a one-second minimum for that). It is floored at [`CacheConfig::deadline_floor`](super::CacheConfig) so
//! that a scheduling hiccup on a busy host is not taken for a hang, and capped by
//! [`CacheConfig::operation_timeout`](super::CacheConfig), which stays the bound of every
//! operation. Until the first round trip succeeds the deadline is the cap.
//!
//! Only small round trips that succeeded are samples (a large value's round trip measures its
//! size, not Redis); one that ran out of time, with Redis silent to PING too, opens the breaker,
//! and the probe that closes it again re-seeds the estimate from its own round trip when
//! Redis has become slower than the deadline (a slower network after a failover), so a
//! Redis that is slow but within the cap is used again after one fallback instead of
//! flapping.

use std::sync::Mutex;
use std::time::Duration;

/// Smoothed latency and deviation, in seconds (RFC 6298's SRTT and RTTVAR).
#[derive(Clone, Copy, Debug)]
struct Estimate {
    smoothed: f64,
    deviation: f64,
}

/// The fitted deadline of one worker's Redis round trips.
#[derive(Debug)]
pub(super) struct Deadline {
    floor: Duration,
    cap: Duration,
    estimate: Mutex<Option<Estimate>>,
}

impl Deadline {
    pub(super) fn new(floor: Duration, cap: Duration) -> Deadline {
        Deadline { floor: floor.min(cap), cap, estimate: Mutex::new(None) }
    }

    /// The configured timeout: the bound of every operation, and of the probe's.
    pub(super) fn cap(&self) -> Duration {
        self.cap
    }

    /// How long the next round trip may take.
    pub(super) fn current(&self) -> Duration {
        match *self.lock() {
            None => self.cap,
            Some(e) => Duration::try_from_secs_f64(2.0 * e.smoothed + 4.0 * e.deviation)
                .unwrap_or(self.cap)
                .clamp(self.floor, self.cap),
        }
    }

    /// Takes the latency of a round trip that succeeded into the estimate.
    pub(super) fn observe(&self, latency: Duration) {
        let sample = latency.as_secs_f64();
        let mut estimate = self.lock();
        *estimate = Some(match *estimate {
            None => Estimate { smoothed: sample, deviation: sample / 2.0 },
            Some(e) => Estimate {
                deviation: 0.75 * e.deviation + 0.25 * (e.smoothed - sample).abs(),
                smoothed: 0.875 * e.smoothed + 0.125 * sample,
            },
        });
    }

    /// Starts the estimate again from `latency` when that is above the current deadline: the
    /// probe saw a Redis slower than the past samples say, and the next requests would all
    /// time out against the old figure.
    pub(super) fn reseed_if_slower(&self, latency: Duration) {
        if latency > self.current() {
            let sample = latency.as_secs_f64();
            *self.lock() = Some(Estimate { smoothed: sample, deviation: sample / 2.0 });
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Estimate>> {
        // Every update is one assignment: a panic elsewhere cannot leave it half-written.
        self.estimate.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_cap_holds_until_a_round_trip_succeeds() {
        let deadline = Deadline::new(10 * MS, 250 * MS);
        assert_eq!(deadline.current(), 250 * MS);
    }

    #[test]
    fn a_steady_fast_redis_gets_the_floor() {
        let deadline = Deadline::new(10 * MS, 250 * MS);
        for _ in 0..100 {
            deadline.observe(Duration::from_micros(300));
        }
        assert_eq!(deadline.current(), 10 * MS);
    }

    #[test]
    fn jitter_widens_the_deadline_and_the_cap_bounds_it() {
        let deadline = Deadline::new(MS, 250 * MS);
        for i in 0..200 {
            deadline.observe(if i % 2 == 0 { MS } else { 9 * MS });
        }
        // Mean 5 ms, deviation 4 ms: about 2 * 5 + 4 * 4 = 26 ms.
        let fitted = deadline.current();
        assert!((20 * MS..=32 * MS).contains(&fitted), "{fitted:?}");
        for _ in 0..50 {
            deadline.observe(Duration::from_secs(1));
        }
        assert_eq!(deadline.current(), 250 * MS);
    }

    #[test]
    fn a_slower_probe_reseeds_a_faster_estimate_but_not_the_reverse() {
        let deadline = Deadline::new(MS, 250 * MS);
        for _ in 0..100 {
            deadline.observe(Duration::from_micros(200));
        }
        deadline.reseed_if_slower(Duration::from_micros(100));
        assert_eq!(deadline.current(), MS);
        deadline.reseed_if_slower(50 * MS);
        // 2 * 50 ms + 4 * 25 ms.
        assert_eq!(deadline.current(), 200 * MS);
    }

    #[test]
    fn a_floor_above_the_cap_gives_the_cap() {
        let deadline = Deadline::new(Duration::from_secs(1), 250 * MS);
        deadline.observe(MS);
        assert_eq!(deadline.current(), 250 * MS);
    }
}
