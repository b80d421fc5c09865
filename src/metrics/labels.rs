//! The fixed label values of every metric: nothing a client sends can add one, so the number
//! of series is bounded by the app's routes, not by its traffic.

use axum::http::{Method, StatusCode};

/// Declares a fieldless enum whose variants index fixed arrays (`variant as usize`), with
/// `COUNT` and `ALL` (in declaration order) generated from the one list of variants.
macro_rules! indexed_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$variant_meta:meta])* $variant:ident,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$variant_meta])* $variant,)*
        }

        impl $name {
            pub const COUNT: usize = [$(stringify!($variant)),*].len();
            pub const ALL: [$name; Self::COUNT] = [$($name::$variant),*];
        }
    };
}

/// The HTTP methods counted by name; any other is counted as `other`.
pub const METHOD_NAMES: [&str; 10] =
    ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "other"];
pub const METHODS: usize = METHOD_NAMES.len();

/// Status classes; a code outside 100–599 (which axum's `StatusCode` allows) is `other`.
pub const CLASS_NAMES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];
pub const CLASSES: usize = CLASS_NAMES.len();

pub fn method_index(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::PATCH => 5,
        Method::OPTIONS => 6,
        Method::CONNECT => 7,
        Method::TRACE => 8,
        _ => 9,
    }
}

pub fn class_index(status: StatusCode) -> usize {
    match status.as_u16() {
        100..=599 => usize::from(status.as_u16() / 100 - 1),
        _ => CLASSES - 1,
    }
}

indexed_enum! {
    /// Why a worker ended, as `herdsman_worker_restarts_total{reason}` counts it.
    pub enum RestartReason {
        /// Silent for `GUNICORN_TIMEOUT` after it was ready.
        Timeout,
        /// Not ready within `HERDSMAN_BOOT_TIMEOUT`.
        BootTimeout,
        /// Exited or died by a signal on its own while in service.
        Crash,
        /// SIGKILLed from outside while in service (the OOM killer, an operator).
        Killed,
        /// Served its `MAX_REQUESTS`.
        MaxRequests,
        /// Replaced by a rolling restart (SIGHUP).
        Reload,
        /// Retired because the worker count went down (SIGTTOU).
        Scale,
        /// Replaced because its own memory passed `HERDSMAN_MAX_WORKER_MEMORY`.
        Memory,
    }
}

impl RestartReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartReason::Timeout => "timeout",
            RestartReason::BootTimeout => "boot_timeout",
            RestartReason::Crash => "crash",
            RestartReason::Killed => "killed",
            RestartReason::MaxRequests => "max_requests",
            RestartReason::Reload => "reload",
            RestartReason::Scale => "scale",
            RestartReason::Memory => "memory",
        }
    }
}

indexed_enum! {
    /// Things a worker counts besides requests; each is one series of a counter (see
    /// [`Event::series`]).
    pub enum Event {
        CacheGetRedisHit,
        CacheGetRedisMiss,
        CacheGetMemoryHit,
        CacheGetMemoryMiss,
        CacheWriteRedis,
        CacheWriteMemory,
        /// Redis answered, but refused the command (out of memory, a wrong type).
        CacheRedisRefused,
        BreakerOpened,
        BreakerClosed,
        BcryptRefused,
        /// Logins refused by throttling. Ready to be counted: throttling is built elsewhere.
        LoginThrottled,
    }
}

/// A counter family and one of its label sets.
pub struct Series {
    pub metric: &'static str,
    pub help: &'static str,
    pub labels: &'static [(&'static str, &'static str)],
}

const CACHE_OPS: &str = "herdsman_cache_operations";
const CACHE_OPS_HELP: &str = "Cache operations by tier (redis, memory) and result";
const BREAKER: &str = "herdsman_redis_breaker_transitions";
const BREAKER_HELP: &str = "Redis circuit breaker transitions (opened: fell back to memory; closed: Redis back)";

impl Event {
    pub fn series(self) -> Series {
        let (metric, help, labels): (_, _, &'static [(&str, &str)]) = match self {
            Event::CacheGetRedisHit => {
                (CACHE_OPS, CACHE_OPS_HELP, &[("op", "get"), ("tier", "redis"), ("result", "hit")])
            }
            Event::CacheGetRedisMiss => {
                (CACHE_OPS, CACHE_OPS_HELP, &[("op", "get"), ("tier", "redis"), ("result", "miss")])
            }
            Event::CacheGetMemoryHit => {
                (CACHE_OPS, CACHE_OPS_HELP, &[("op", "get"), ("tier", "memory"), ("result", "hit")])
            }
            Event::CacheGetMemoryMiss => {
                (CACHE_OPS, CACHE_OPS_HELP, &[("op", "get"), ("tier", "memory"), ("result", "miss")])
            }
            Event::CacheWriteRedis => {
                (CACHE_OPS, CACHE_OPS_HELP, &[("op", "write"), ("tier", "redis"), ("result", "ok")])
            }
            Event::CacheWriteMemory => {
                (CACHE_OPS, CACHE_OPS_HELP, &[("op", "write"), ("tier", "memory"), ("result", "ok")])
            }
            Event::CacheRedisRefused => {
                (CACHE_OPS, CACHE_OPS_HELP, &[("op", "any"), ("tier", "redis"), ("result", "refused")])
            }
            Event::BreakerOpened => (BREAKER, BREAKER_HELP, &[("to", "open")]),
            Event::BreakerClosed => (BREAKER, BREAKER_HELP, &[("to", "closed")]),
            Event::BcryptRefused => {
                ("herdsman_bcrypt_refused", "Password hashes refused because the hashing queue was full (503)", &[])
            }
            Event::LoginThrottled => ("herdsman_logins_throttled", "Logins refused by throttling", &[]),
        };
        Series { metric, help, labels }
    }
}

indexed_enum! {
    /// How a warm-up attempt ended, as `herdsman_warmup_attempts_total{task,outcome}` counts it
    /// (the task label is the task's name, see [`super::table::MAX_TASKS`]).
    pub enum WarmupOutcome {
        Ok,
        Failed,
        TimedOut,
    }
}

impl WarmupOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            WarmupOutcome::Ok => "ok",
            WarmupOutcome::Failed => "failed",
            WarmupOutcome::TimedOut => "timed_out",
        }
    }
}

indexed_enum! {
    /// Things a worker holds now (gauges), summed over the live workers.
    pub enum Level {
        /// Password hashes waiting or running.
        BcryptQueued,
        /// 1 while this worker's Redis breaker is open.
        BreakerOpen,
    }
}

impl Level {
    pub fn name_and_help(self) -> (&'static str, &'static str) {
        match self {
            Level::BcryptQueued => ("herdsman_bcrypt_queue_depth", "Password hashes waiting or running, all workers"),
            Level::BreakerOpen => {
                ("herdsman_redis_breaker_open_workers", "Workers whose Redis breaker is open (serving from memory)")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_has_a_class_and_every_method_an_index() {
        assert_eq!(CLASS_NAMES[class_index(StatusCode::OK)], "2xx");
        assert_eq!(CLASS_NAMES[class_index(StatusCode::NOT_FOUND)], "4xx");
        assert_eq!(CLASS_NAMES[class_index(StatusCode::from_u16(999).unwrap())], "other");
        assert_eq!(METHOD_NAMES[method_index(&Method::from_bytes(b"BREW").unwrap())], "other");
        assert_eq!(METHOD_NAMES[method_index(&Method::PATCH)], "PATCH");
        for (i, event) in Event::ALL.iter().enumerate() {
            assert_eq!(*event as usize, i);
        }
        for (i, reason) in RestartReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i);
        }
    }
}
