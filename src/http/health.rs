//! `/live`, `/ready` and `/health`: what a platform's probes and an operator ask a worker.
//!
//! All three are answered from the worker's first request on, whatever the warm-up tasks and
//! dependencies are doing: they read state, they never wait on it.
//! - `/live`: the worker serves. A platform restarts the container when this fails.
//! - `/ready`: the worker should get traffic: its required warm-up is done and it is not
//!   draining. 503 otherwise, with a JSON reason for an authorised caller (below).
//! - `/health`: for anyone, `{"status":"ok"}`: the worker answers, which is all a platform or
//!   an uptime checker needs (readiness is `/ready`). Everything else — `degraded`, the Redis
//!   breaker's state and why, the warm-up tasks, the revocation channel, pid and version — only
//!   for an authorised caller: a request bearing `HERDSMAN_METRICS_TOKEN` as
//!   `Authorization: Bearer` (compared in constant time). Told to anyone, the breaker's state
//!   and reason say when a worker is in fallback and trusting sessions from memory, which helps
//!   an attacker more than an uptime checker. Spring Boot Actuator's `show-details:
//!   when-authorized` is the same rule. The logs carry every transition too.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::cache::RedisStatus;
use crate::services::Services;

pub fn routes(services: Services) -> Router {
    Router::new()
        .route("/live", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/health", get(health))
        // Behind an `Arc`: axum clones the state for every request to these routes.
        .with_state(Arc::new(services))
}

/// Whether the request may see details: it bears the metrics token (none configured: nobody).
fn authorised(services: &Services, headers: &HeaderMap) -> bool {
    services.config.metrics_token.as_deref().is_some_and(|token| super::metrics_route::bears(headers, token))
}

async fn ready(State(services): State<Arc<Services>>, headers: HeaderMap) -> Response {
    match not_ready_reason(&services) {
        None => Json(json!({ "ready": true })).into_response(),
        Some(reason) if authorised(&services, &headers) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "ready": false, "reason": reason }))).into_response()
        }
        Some(_) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "ready": false }))).into_response(),
    }
}

fn not_ready_reason(services: &Services) -> Option<String> {
    if services.draining() {
        return Some("draining: this worker is shutting down".into());
    }
    if services.config.redis_required && services.cache.status() != RedisStatus::Up {
        return Some("waiting for Redis (REDIS_REQUIRED=true)".into());
    }
    services.warmup.not_ready_reason()
}

async fn health(State(services): State<Arc<Services>>, headers: HeaderMap) -> Json<serde_json::Value> {
    if !authorised(&services, &headers) {
        return Json(json!({ "status": "ok" }));
    }
    let mut checks = services.warmup.snapshot();
    // A required warm-up task that did not succeed, or a Redis we are not using, is a degraded
    // service: it still answers, from memory, but an operator should look.
    let warmup_failed = checks.values().any(|check| {
        check.get("required") == Some(&json!(true)) && check.get("state").and_then(|s| s.as_str()) != Some("ok")
    });
    let degraded = warmup_failed || services.cache.is_degraded();
    // The live state of the connection, with the warm-up task that first made it inside.
    let redis_warmup = checks.remove("redis");
    let mut redis = serde_json::to_value(services.cache.status()).unwrap_or_default();
    if let (Some(redis), Some(warmup)) = (redis.as_object_mut(), redis_warmup) {
        redis.insert("warmup".into(), warmup);
    }
    checks.insert("redis".into(), redis);
    if services.cache.durable().is_some() {
        let channel = if services.sessions.hears_revocations() { "live" } else { "down" };
        checks.insert("revocations".into(), json!({ "status": channel }));
    }
    Json(json!({
        "status": if degraded { "degraded" } else { "ok" },
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "uptime_s": services.started.elapsed().as_secs_f64(),
        "checks": checks,
    }))
}
