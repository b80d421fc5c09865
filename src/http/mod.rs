//! The HTTP side of a worker: the built-in routes, the user's routes, and the guard that keeps
//! one bad request from hurting the others.
//!
//! Every request passes through the [`Guard`] first: request tracking for diagnostics and
//! `MAX_REQUESTS`, the body limit (413), the request timeout (503) and panics (500); see
//! [`guard`]. A connection that stays silent too long — a request head arriving too slowly, or
//! idle past the keep-alive timeout — is closed by [`connection_deadline`].

pub mod access_log;
pub mod auth_api;
pub mod cache_api;
pub mod client_addr;
pub mod connection_deadline;
pub mod error;
pub mod guard;
pub mod health;
pub mod in_flight;
pub mod metrics_route;
pub mod queue_time;
pub mod quota;
pub mod request_id;
#[cfg(feature = "test-hooks")]
pub mod test_hooks;

use axum::Router;

use crate::services::Services;

pub use error::{ApiError, JsonBody};
pub use guard::Guard;

/// Cache keys longer than this are refused with 400; Redis keys are cheap but not free.
pub const MAX_CACHE_KEY_BYTES: usize = 512;

/// The whole router of a worker: the health routes, then the app's (see [`crate::App`]).
pub fn router(services: &Services, app_routes: Router) -> Router {
    with_test_hooks(Router::new().merge(health::routes(services.clone())).merge(app_routes), services)
}

#[cfg(feature = "test-hooks")]
fn with_test_hooks(router: Router, services: &Services) -> Router {
    router.merge(test_hooks::routes(services))
}

#[cfg(not(feature = "test-hooks"))]
fn with_test_hooks(router: Router, _: &Services) -> Router {
    router
}

/// Whether anyone can read the metrics (`HERDSMAN_METRICS_PORT` or `HERDSMAN_METRICS_TOKEN`):
/// only then are requests counted by route and duration; otherwise only what `herdsman status`
/// shows (served, in flight), which costs a request a few atomic additions (see
/// [`crate::metrics`]).
pub fn metrics_readable(config: &crate::config::Config) -> bool {
    config.metrics_port.is_some() || config.metrics_token.is_some()
}

/// `/cache/{key}` over the worker's cache (opt-in: [`crate::App::with_cache_api`]).
pub fn cache_routes(services: &Services) -> Router {
    let config = &services.config;
    let limits = cache_api::Limits {
        max_key_bytes: MAX_CACHE_KEY_BYTES,
        max_value_bytes: config.max_body_bytes,
        default_ttl: config.cache_default_ttl,
        max_ttl: config.cache_max_ttl,
        max_in_flight_bytes: config.cache_max_bytes,
    };
    let quotas = quota::Quotas::new(config.user_max_keys, config.user_max_bytes);
    cache_api::routes(services.cache.clone(), services.sessions.clone(), quotas, limits)
}

/// `/auth/register`, `/auth/login`, `/auth/logout`, `/auth/me` (opt-in:
/// [`crate::App::with_auth_api`]).
pub fn auth_routes(services: &Services) -> Router {
    let config = &services.config;
    auth_api::routes(auth_api::AuthApi {
        durable: services.cache.durable(),
        hasher: services.hasher.clone(),
        sessions: services.sessions.clone(),
        throttle: services.throttle.clone(),
        limits: auth_api::AuthLimits {
            cost: config.bcrypt_cost,
            trusted_proxies: config.trusted_proxies,
            per_account: config.auth_limit_account,
            per_address: config.auth_limit_address,
        },
    })
}
