//! OAuth Global Token Revocation intake (draft-parecki-oauth-global-token-revocation):
//! `POST /oauth/global-token-revocation` with `{"sub_id": <RFC 9493 subject identifier>}`, from an
//! identity provider configured with `global_token_revocation = true` and authenticated with its
//! `authorization` (Okta Universal Logout and Auth0 speak this rather than CAEP).
//!
//! The request becomes a signal of Vigil's own `global-token-revocation` type, recorded like a
//! pushed SET (intake, or the signals topic in cluster mode) before it is answered, and the
//! `global-token-revocation` rule revokes every grant of the user issued before it — operators tune
//! that rule like any other. Answers, as the draft lists them: 204 revoked; 400 a malformed request
//! or a subject identifier Vigil cannot read; 401 no or a wrong credential; 403 an `iss_sub` of
//! another issuer than the caller's; 404 a user Vigil does not know; 415 not JSON; 413 too large;
//! 429 over the caller's budget; 503 not recorded (retry).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, Limited};

use crate::engine::Engine;
use crate::error_body::{error, refusal};
use crate::receiver::{Receiver, Rejection};
use crate::subject::SubjectId;

pub struct RevocationState {
    pub receiver: Arc<Receiver>,
    pub engine: Arc<Engine>,
    pub max_body_bytes: usize,
    /// Requests per second per identity provider (its own budget, apart from its pushes').
    pub limiter: crate::limits::RateLimiter,
}

/// Axum handler for `POST /oauth/global-token-revocation`.
pub async fn revoke(
    State(state): State<Arc<RevocationState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (response, transmitter) = handle(&state, &headers, body).await;
    let outcome = response.status().as_u16().to_string();
    metrics::counter!(crate::telemetry::GLOBAL_TOKEN_REVOCATIONS,
        "transmitter" => transmitter.unwrap_or_else(|| "unknown".into()), "status" => outcome)
    .increment(1);
    response
}

async fn handle(
    state: &RevocationState,
    headers: &HeaderMap,
    body: Body,
) -> (Response, Option<String>) {
    let presented = headers
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    let Some(t) = state.receiver.authenticate_revoker(presented) else {
        let mut answer = error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "no identity provider allowed to ask for Global Token Revocation presented this \
             credential",
        );
        answer
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return (answer, None);
    };
    let name = Some(t.config.name.clone());
    if let Err(wait) = state.limiter.acquire(&t.config.name) {
        let answer = refusal(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            "this identity provider's request budget is spent",
            wait,
        );
        return (answer, name);
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        let answer = error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Content-Type must be application/json",
        );
        return (answer, name);
    }
    let bytes = match Limited::new(body, state.max_body_bytes).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            let answer = error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the body exceeds {} bytes", state.max_body_bytes),
            );
            return (answer, name);
        }
        Err(e) => {
            let answer = error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("the body could not be read: {e}"),
            );
            return (answer, name);
        }
    };
    let subject = match subject_of(&bytes) {
        Ok(subject) => subject,
        Err(why) => return (error(StatusCode::BAD_REQUEST, "invalid_request", why), name),
    };
    // An identity provider speaks for its own users: an `iss_sub` of another issuer is not its to
    // revoke.
    if let SubjectId::IssSub { iss, .. } = &subject {
        if iss != &t.config.issuer {
            let answer = error(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("`{iss}` is not this identity provider's issuer"),
            );
            return (answer, name);
        }
    }
    if !state.engine.knows(&subject) {
        let answer = error(
            StatusCode::NOT_FOUND,
            "user_not_found",
            "Vigil holds no grant and no identifier of this user",
        );
        return (answer, name);
    }
    let text = String::from_utf8_lossy(&bytes);
    let answer = match state
        .receiver
        .global_token_revocation(&t, subject, &text)
        .await
    {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(Rejection::LogUnavailable(why) | Rejection::Storage(why)) => refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            &format!("the revocation was not recorded: {why}"),
            std::time::Duration::from_secs(5),
        ),
        Err(other) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            other.to_string(),
        ),
    };
    (answer, name)
}

/// The request's `sub_id`, read strictly (RFC 9493; no legacy dialects).
fn subject_of(body: &[u8]) -> Result<SubjectId, String> {
    let request: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let sub_id = request
        .get("sub_id")
        .ok_or("the request has no `sub_id` (an RFC 9493 subject identifier)")?;
    SubjectId::from_json(sub_id, false).map_err(|e| format!("`sub_id`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subject_is_an_rfc9493_identifier() {
        assert!(
            subject_of(br#"{"sub_id": {"format": "email", "email": "a@example.com"}}"#).is_ok()
        );
        for bad in [
            &b"not json"[..],
            br#"{}"#,
            br#"{"sub_id": {"format": "email"}}"#,
            br#"{"sub_id": {"subject_type": "iss-sub", "iss": "x", "sub": "y"}}"#,
        ] {
            assert!(subject_of(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
