//! [`Services`]: what a worker's routes and warm-up tasks may use — the configuration, the
//! cache, the password hasher, the login sessions and throttle, the warm-up states, the
//! worker's request tracker and its drain. Built once
//! per worker; everything above it (HTTP routes, warm-up tasks) receives it, nothing below it
//! knows it exists.

use std::sync::Arc;
use std::time::Instant;

use crate::cache::{Cache, CacheConfig};
use crate::config::Config;
use crate::hasher::Hasher;
use crate::revocations::Revocations;
use crate::sessions::Sessions;
use crate::shutdown::Shutdown;
use crate::throttle::Throttle;
use crate::tracker::RequestTracker;
use crate::warmup_status::WarmupStatus;

/// Cheap to clone: every field is shared.
#[derive(Clone)]
pub struct Services {
    pub config: Arc<Config>,
    /// The worker's warm-up tasks and their states.
    pub warmup: WarmupStatus,
    /// Redis when it answers, memory when it does not.
    pub cache: Cache,
    /// bcrypt off the async runtime, on low-priority threads.
    pub hasher: Hasher,
    /// Login tokens; shared by the auth routes (which open and end them) and the cache routes
    /// (which check them), so a logout here is forgotten here at once.
    pub sessions: Sessions,
    /// Login and registration limits.
    pub throttle: Throttle,
    /// When this worker started, for `uptime_s`.
    pub started: Instant,
    /// The drain, for long-lived connections: when to say goodbye, and a guard the drain
    /// waits for (see [`crate::shutdown`]).
    pub shutdown: Shutdown,
    pub(crate) tracker: RequestTracker,
}

impl Services {
    /// A worker's services, with no warm-up task yet; the worker builds its own with this, and
    /// so do harnesses outside the crate (the fuzz targets), which cannot name the tracker.
    #[doc(hidden)]
    pub fn assemble(config: Arc<Config>, cache: Cache, hasher: Hasher, tracker: RequestTracker) -> Services {
        // The URL was checked when the cache was built; should the channel's client still fail,
        // sessions are checked in Redis on every request instead.
        let channel = Cache::dedicated_client(&CacheConfig::from_config(&config)).unwrap_or_else(|err| {
            tracing::warn!(error = %err, "session revocations cannot be heard; every session is checked in Redis");
            None
        });
        let sessions = Sessions::new(cache.durable(), config.session_ttl)
            .with_recheck(config.session_recheck)
            .with_outage_trust(config.session_outage_trust)
            .with_revocations(Revocations::new(channel));
        let throttle = Throttle::new(cache.durable());
        Services {
            config,
            warmup: WarmupStatus::default(),
            cache,
            hasher,
            sessions,
            throttle,
            started: Instant::now(),
            shutdown: Shutdown::default(),
            tracker,
        }
    }

    /// Whether this worker is shutting down and should get no new traffic.
    pub fn draining(&self) -> bool {
        self.tracker.is_draining()
    }
}
