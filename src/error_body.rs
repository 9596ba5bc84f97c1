//! Vigil's JSON error bodies, in one place: `{"error": <code>, "description": <text>}` (the
//! `Error` schema of `openapi.yaml`) for its API, the SSF stream management endpoints and the
//! server's own refusals, with `Retry-After` when the caller should come back later. Codes are
//! snake_case and stable; descriptions are for people. The push receiver's bodies are RFC 8935's
//! own shape (`{"err", "description"}`) and stay with it (`push.rs`).

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// `status` with `{"error": code, "description": description}`.
pub fn error(status: StatusCode, code: &str, description: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": code, "description": description.into()})),
    )
        .into_response()
}

/// [`error`] with `Retry-After` (whole seconds, at least 1): for 429 and 503.
pub fn refusal(status: StatusCode, code: &str, description: &str, wait: Duration) -> Response {
    let mut response = error(status, code, description);
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(crate::limits::retry_after_secs(wait)),
    );
    response
}

/// The code for a status when the error has no more precise one.
pub fn code_for(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "invalid_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::CONFLICT => "conflict",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::TOO_MANY_REQUESTS => "too_many_requests",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        _ => "internal_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bodies_follow_the_error_schema_and_refusals_say_when_to_retry() {
        let r = refusal(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            "slow down",
            Duration::from_millis(1500),
        );
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        let body = axum::body::to_bytes(r.into_body(), 1024).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            json!({"error": "too_many_requests", "description": "slow down"})
        );
        assert_eq!(code_for(StatusCode::NOT_FOUND), "not_found");
    }
}
