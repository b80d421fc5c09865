//! `/live`, `/ready` and `/health`: what a platform's probes and an operator ask a worker.
//!
//! All three are answered from the worker's first request on, whatever the warm-up tasks and
//! dependencies are doing: they read state, they never wait on it.
//! - `/live`: the worker serves. A platform restarts the container when this fails.
//! - `/ready`: the worker should get traffic: its required warm-up is done and it is not
//!   draining. 503 with a JSON reason otherwise.
//! - `/health`: everything, for humans and dashboards; `degraded` while a dependency is down.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::app::Services;

pub fn routes(services: Services) -> Router {
    Router::new()
        .route("/live", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/health", get(health))
        .with_state(services)
}

async fn ready(State(services): State<Services>) -> Response {
    match not_ready_reason(&services) {
        None => Json(json!({ "ready": true })).into_response(),
        Some(reason) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "ready": false, "reason": reason }))).into_response()
        }
    }
}

fn not_ready_reason(services: &Services) -> Option<String> {
    if services.draining() {
        return Some("draining: this worker is shutting down".into());
    }
    services.warmup.not_ready_reason()
}

async fn health(State(services): State<Services>) -> Json<serde_json::Value> {
    let checks = services.warmup.snapshot();
    let degraded = checks.values().any(|check| {
        check.get("state").and_then(|s| s.as_str()) != Some("ok") && check.get("required") == Some(&json!(true))
    });
    Json(json!({
        "status": if degraded { "degraded" } else { "ok" },
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "uptime_s": services.started.elapsed().as_secs_f64(),
        "checks": checks,
    }))
}
