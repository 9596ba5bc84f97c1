//! RFC 8935 push endpoint: `POST /ssf/push/{stream}`.
//!
//! Success is `202 Accepted` with an empty body (§2.2). A rejected SET is `400` with
//! `Content-Type: application/json`, a `Content-Language` header and `{"err", "description"}` (§2.3),
//! using only the registered codes. A body over the configured limit is refused with `413` (same body
//! shape, `invalid_request`) before any of it is parsed. When the transmitter's keys have never loaded
//! the answer is `503` with `Retry-After`, so the transmitter retries instead of dropping the SET; a
//! transmitter over its rate limit (`limits.transmitter_sets_per_sec`) gets `429` with `Retry-After`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, Limited};

use crate::receiver::{Accepted, Receiver, Rejection};
use crate::set::{ErrorCode, SetError};

/// The media type of a SET (RFC 8417 §7.2).
pub const SECEVENT_JWT: &str = "application/secevent+jwt";

/// Shared state of the push route.
pub struct PushState {
    pub receiver: Arc<Receiver>,
    pub max_body_bytes: usize,
    /// SETs per second per transmitter, checked after authentication and before the body is read.
    pub limiter: crate::limits::RateLimiter,
    /// Pushes in flight per transmitter (by configured name): one transmitter holding many slow
    /// requests open cannot take intake from the others.
    pub inflight: std::collections::HashMap<String, Arc<tokio::sync::Semaphore>>,
}

/// Axum handler for `POST /ssf/push/{stream}`.
pub async fn push(
    State(state): State<Arc<PushState>>,
    Path(stream): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let result = handle(&state, &stream, &headers, body).await;
    // For the log of a rejection: the stream as asked for (an unknown one too), excerpted.
    let asked_for = result
        .as_ref()
        .err()
        .map(|_| crate::outbound::excerpt(&stream));
    let (outcome, event_type) = match &result {
        Ok(a) => (a.outcome_label(), a.event_type()),
        Err(r) => (r.outcome_label(), r.event_type()),
    };
    // Only configured stream names become label values, so cardinality stays bounded.
    let stream_label = if state
        .receiver
        .transmitters()
        .any(|t| t.config.stream == stream)
    {
        stream
    } else {
        "unknown".to_owned()
    };
    metrics::counter!(crate::telemetry::SETS_RECEIVED,
        "stream" => stream_label.clone(), "event_type" => event_type, "outcome" => outcome)
    .increment(1);
    metrics::histogram!(crate::telemetry::PUSH_REQUEST_SECONDS, "stream" => stream_label)
        .record(started.elapsed().as_secs_f64());
    match result {
        Ok(_) => StatusCode::ACCEPTED.into_response(),
        Err(rejection) => {
            tracing::info!(stream = asked_for.as_deref().unwrap_or_default(), %outcome,
                reason = %rejection, "SET rejected");
            rejection_response(rejection)
        }
    }
}

async fn handle(
    state: &PushState,
    stream: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Accepted, Rejection> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    let transmitter = state.receiver.authenticate(stream, presented)?;
    state
        .limiter
        .acquire(&transmitter.config.name)
        .map_err(Rejection::RateLimited)?;
    let _turn = state
        .inflight
        .get(&transmitter.config.name)
        .and_then(|s| s.clone().try_acquire_owned().ok())
        .ok_or(Rejection::RateLimited(std::time::Duration::from_secs(1)))?;

    let content_type_ok = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(SECEVENT_JWT));
    if !content_type_ok {
        return Err(bad(format!(
            "Content-Type must be {SECEVENT_JWT} (RFC 8935 §2.1)"
        )));
    }

    let bytes = read_limited(headers, body, state.max_body_bytes).await?;
    let token = std::str::from_utf8(&bytes).map_err(|_| bad("the body is not UTF-8 text"))?;
    if token.trim().is_empty() {
        return Err(bad("the body is empty"));
    }
    state.receiver.receive(&transmitter, token).await
}

/// Marker description for an oversize body; the response layer turns it into 413.
const TOO_LARGE: &str = "the body exceeds the configured limit of ";

async fn read_limited(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, Rejection> {
    let too_large = || bad(format!("{TOO_LARGE}{limit} bytes"));
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(bad(format!("the body could not be read: {e}"))),
    }
}

fn bad(description: impl Into<String>) -> Rejection {
    Rejection::Set {
        error: SetError::new(ErrorCode::InvalidRequest, description),
        event_type: "none",
    }
}

/// The RFC 8935 §2.3 error response: `{"err", "description"}` with `Content-Language`.
fn rejection_response(rejection: Rejection) -> Response {
    let (status, body, retry) = match rejection {
        Rejection::Set { error, .. } => {
            let status = if error.description.starts_with(TOO_LARGE) {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            (status, serde_json::json!(error), None)
        }
        Rejection::Unavailable(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "description": format!("the transmitter's keys are not available yet: {why}") }),
            Some(5),
        ),
        Rejection::LogUnavailable(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            {
                tracing::warn!(%why, "SET not recorded: the signals log is not available");
                serde_json::json!({ "description": "Vigil cannot record SETs right now; retry later" })
            },
            Some(5),
        ),
        Rejection::Storage(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({ "description": "the SET could not be recorded; retry later" }),
            Some(5),
        ),
        Rejection::RateLimited(wait) => (
            StatusCode::TOO_MANY_REQUESTS,
            serde_json::json!({ "description": "this transmitter is over its rate limit; retry later" }),
            Some(crate::limits::retry_after_secs(wait)),
        ),
    };
    let mut response = (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CONTENT_LANGUAGE, "en"),
        ],
        body.to_string(),
    )
        .into_response();
    if let Some(secs) = retry {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}
