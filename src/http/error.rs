//! [`ApiError`]: the one error answer of every route — a status, a JSON `{"error": "..."}`
//! body and, where retrying makes sense, `Retry-After` — and [`JsonBody`], the JSON extractor
//! whose rejections are answered the same way.

use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use tracing::error;

use crate::hasher::HashError;
use crate::sessions::SessionError;
use crate::throttle::Throttled;

/// An error answer. Handlers return `Result<_, ApiError>`; the guard's own answers (413, 503,
/// 500) are built with it too, so every error a client sees has the same shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    retry_after_secs: Option<u32>,
    /// A 401 that asks for a bearer token (`WWW-Authenticate: Bearer`).
    bearer_challenge: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), retry_after_secs: None, bearer_challenge: false }
    }

    /// Tells the client when trying again makes sense (503 for a busy or absent dependency).
    pub fn retry_after(mut self, secs: u32) -> ApiError {
        self.retry_after_secs = Some(secs);
        self
    }

    /// 401 with `WWW-Authenticate: Bearer`: this route needs a session token.
    pub fn unauthorized_bearer(message: impl Into<String>) -> ApiError {
        ApiError { bearer_challenge: true, ..ApiError::new(StatusCode::UNAUTHORIZED, message) }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    /// The details belong in the log, not in the answer.
    pub fn internal() -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }
}

impl From<HashError> for ApiError {
    fn from(err: HashError) -> ApiError {
        match err {
            HashError::Busy => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "too many logins in progress, retry later")
                    .retry_after(1)
            }
            other => {
                error!(error = %other, "password hashing failed");
                ApiError::internal()
            }
        }
    }
}

impl From<SessionError> for ApiError {
    fn from(err: SessionError) -> ApiError {
        match err {
            SessionError::Unavailable => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, err.to_string()).retry_after(2),
            // Missing, malformed, unknown, and no Redis at all: no session, say how to get one.
            other => ApiError::unauthorized_bearer(other.to_string()),
        }
    }
}

impl From<Throttled> for ApiError {
    fn from(err: Throttled) -> ApiError {
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too many attempts, retry later")
            .retry_after(err.retry_after_secs())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(serde_json::json!({ "error": self.message }))).into_response();
        if let Some(secs) = self.retry_after_secs {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.bearer_challenge {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// `Json<T>` whose rejections are JSON too (axum's own are plain text):
/// 400 for malformed JSON, 415 without a JSON content type, 422 for missing
/// fields or wrong types.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(JsonBody(value)),
            Err(rejection) => Err(ApiError::new(rejection.status(), rejection.body_text())),
        }
    }
}
