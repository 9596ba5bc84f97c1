//! The policy routes of Vigil's API (operator role):
//!
//! | route | answer |
//! |---|---|
//! | `GET /v1/policies` | 200 `{running: {version, files, rules}}` |
//! | `POST /v1/policies/reload[?force=true]` | 200 `{status: swapped, version, previous_version, tests_passed, changed, transitions, by_rule}` or `{status: unchanged}`; 422 `{status: refused, error, failed_tests?, impact?}` |
//! | `POST /v1/policies/impact` | 200 the [`Impact`](crate::engine::Impact) of a candidate set `{files: {name: yaml}, samples?}`; 422 a candidate that does not compile or lint; 429 while another preview runs |

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::ApiState;
use crate::error_body::{error, refusal};
use crate::policy::is_rule_file;
use crate::reload::{PreviewError, ReloadOutcome};

/// The running set: its version, files and rules as written.
pub async fn policies(State(s): State<Arc<ApiState>>) -> Response {
    let set = s.engine.policy();
    let rules: Vec<Value> = set
        .rules
        .iter()
        .map(|r| {
            let mut rule = serde_json::to_value(&r.spec).unwrap_or(Value::Null);
            rule["file"] = json!(r.file);
            rule
        })
        .collect();
    Json(json!({
        "running": {"version": set.version, "files": set.files, "rules": rules},
    }))
    .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadParams {
    /// Swap even when `policy.require_preview` would refuse.
    #[serde(default)]
    force: bool,
}

pub async fn reload(
    State(s): State<Arc<ApiState>>,
    params: Result<Query<ReloadParams>, QueryRejection>,
) -> Response {
    let force = match params {
        Ok(Query(p)) => p.force,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()),
    };
    // Compiling, testing and re-evaluating every grant is CPU work: off the async workers.
    let reloader = s.reloader.clone();
    let outcome = match tokio::task::spawn_blocking(move || reloader.reload(force)).await {
        Ok(o) => o,
        Err(_) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the reload did not complete",
            )
        }
    };
    let status = match outcome {
        ReloadOutcome::Refused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::OK,
    };
    (status, Json(outcome)).into_response()
}

/// A candidate set to preview.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImpactRequest {
    /// Rule files by name (`*.yaml`), as in a policy directory.
    files: BTreeMap<String, String>,
    /// Grants listed per bucket, each with its subject explained (default 5, at most
    /// [`MAX_SAMPLES`]).
    #[serde(default)]
    samples: Option<usize>,
}

/// Most grants sampled per bucket: each is explained, which reads the audit log.
const MAX_SAMPLES: usize = 20;
/// Most rule files in a candidate.
const MAX_FILES: usize = 256;

pub async fn impact(
    State(s): State<Arc<ApiState>>,
    body: Result<Json<ImpactRequest>, JsonRejection>,
) -> Response {
    let request = match body {
        Ok(Json(r)) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()),
    };
    if request.files.is_empty() || request.files.len() > MAX_FILES {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("`files`: from 1 to {MAX_FILES} rule files"),
        );
    }
    if let Some(name) = request
        .files
        .keys()
        .find(|n| !is_rule_file(n) || n.contains(['/', '\\']) || n.starts_with('.'))
    {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "`files`: `{name}` is not a rule file name (`*.yaml`, no directory, not a test)"
            ),
        );
    }
    let samples = request.samples.unwrap_or(5).min(MAX_SAMPLES);
    // `BTreeMap` order is file-name order: the order a policy directory loads in.
    let sources: Vec<(String, String)> = request.files.into_iter().collect();
    let reloader = s.reloader.clone();
    match tokio::task::spawn_blocking(move || reloader.impact(&sources, samples)).await {
        Ok(Ok(impact)) => Json(impact).into_response(),
        Ok(Err(PreviewError::Invalid(refused))) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_policy",
            refused.error,
        ),
        Ok(Err(PreviewError::Busy)) => refusal(
            StatusCode::TOO_MANY_REQUESTS,
            "preview_running",
            &PreviewError::Busy.to_string(),
            std::time::Duration::from_secs(5),
        ),
        Ok(Err(PreviewError::Engine(e))) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            e.to_string(),
        ),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "the preview did not complete",
        ),
    }
}
