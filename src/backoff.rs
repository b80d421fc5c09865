//! Exponential back-off with jitter, for everything herdsman retries: a worker that keeps
//! failing to boot, a required warm-up task that failed. Never a tight loop, never a herd:
//! each wait doubles up to a ceiling, and ±20% jitter keeps workers that failed together from
//! retrying together.

use std::time::Duration;

/// Counts consecutive failures and says how long to wait before the next attempt.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    /// Failures retried at once, before the waits start (a single crash is no pattern yet).
    free: u32,
    failures: u32,
}

impl Backoff {
    /// Waits of `first`, `2 × first`, … up to `max`, from the first failure on.
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff { first, max: max.max(first), free: 0, failures: 0 }
    }

    /// Retries the first `n` failures in a row at once.
    pub fn free_retries(mut self, n: u32) -> Self {
        self.free = n;
        self
    }

    /// Records one more failure; returns the wait before the next attempt.
    pub fn fail(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.current()
    }

    /// The wait that the failures so far call for.
    pub fn current(&self) -> Duration {
        if self.failures <= self.free {
            return Duration::ZERO;
        }
        let doublings = (self.failures - self.free - 1).min(20);
        let base = self.first.saturating_mul(1 << doublings).min(self.max);
        base.mul_f64(0.8 + 0.4 * rand::random::<f64>())
    }

    /// A success: the next failure starts from the beginning again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_are_bounded_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10)).free_retries(1);
        assert_eq!(b.fail(), Duration::ZERO);
        assert!(b.fail() <= Duration::from_millis(120));
        let third = b.fail();
        assert!(third >= Duration::from_millis(160) && third <= Duration::from_millis(240), "{third:?}");
        for _ in 0..100 {
            b.fail();
        }
        assert!(b.current() <= Duration::from_secs(12) && b.current() >= Duration::from_secs(8));
        b.reset();
        assert_eq!(b.failures(), 0);
        assert_eq!(b.fail(), Duration::ZERO);
    }

    #[test]
    fn without_free_retries_the_first_failure_waits() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let first = b.fail();
        assert!(first >= Duration::from_millis(800) && first <= Duration::from_millis(1200), "{first:?}");
    }
}
