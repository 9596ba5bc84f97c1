//! Vigil's own HTTP API for grants, decisions, subjects and policies (JSON).
//!
//! | route | answer |
//! |---|---|
//! | `POST /v1/grants` | 201 `{grant, decisions}`; 400 invalid; 409 a revoked id or another principal's id |
//! | `GET /v1/grants/{id}` | 200 grant (with `status`, and `revoked` for a tombstone); 404 |
//! | `DELETE /v1/grants/{id}` | 204 ended; 200 `{tombstone: true}` when revoked (kept until expiry); 404 |
//! | `GET /v1/decisions?subject=&grant=&since=&limit=` | 200 `{decisions}` oldest first |
//! | `GET /v1/subjects/{key}` | 200 context, grants, recent signals and decisions ("why"); 404 |
//! | `POST /v1/policies/reload` | 200 `{status: swapped \| unchanged, version}`; 422 `{status: refused, error}` |

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::audit::DecisionQuery;
use crate::engine::{Engine, EngineError};
use crate::grant::{GrantRequest, GrantStatus};
use crate::reload::{PolicyReloader, ReloadOutcome};

pub struct ApiState {
    pub engine: Arc<Engine>,
    pub audit: Arc<crate::audit::AuditLog>,
    pub reloader: Arc<PolicyReloader>,
}

fn error(status: StatusCode, code: &str, description: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": code, "description": description.into()})),
    )
        .into_response()
}

fn engine_error(e: EngineError) -> Response {
    match e {
        EngineError::Invalid(e) => error(StatusCode::BAD_REQUEST, "invalid_grant", e.to_string()),
        EngineError::Revoked(_) => error(StatusCode::CONFLICT, "grant_revoked", e.to_string()),
        EngineError::Conflict(_) => error(StatusCode::CONFLICT, "grant_conflict", e.to_string()),
        EngineError::Stopped => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
        EngineError::Storage(_) | EngineError::Thread(_) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string())
        }
    }
}

pub async fn register_grant(State(s): State<Arc<ApiState>>, body: axum::body::Bytes) -> Response {
    let request: GrantRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_grant", e.to_string()),
    };
    match s.engine.register(request).await {
        Ok(registered) => (StatusCode::CREATED, Json(registered)).into_response(),
        Err(e) => engine_error(e),
    }
}

pub async fn get_grant(State(s): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    match s.engine.grant(&id) {
        Some(g) => Json(&*g).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no grant `{id}`"),
        ),
    }
}

pub async fn delete_grant(State(s): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    match s.engine.delete(&id).await {
        Ok(Some(true)) => StatusCode::NO_CONTENT.into_response(),
        Ok(Some(false)) => {
            let until = s.engine.grant(&id).map(|g| g.expires_at);
            Json(json!({"id": id, "status": GrantStatus::Revoked, "tombstone": true, "until": until}))
                .into_response()
        }
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no grant `{id}`"),
        ),
        Err(e) => engine_error(e),
    }
}

#[derive(Debug, Deserialize)]
pub struct DecisionParams {
    subject: Option<String>,
    grant: Option<String>,
    since: Option<f64>,
    limit: Option<usize>,
}

pub async fn decisions(
    State(s): State<Arc<ApiState>>,
    Query(q): Query<DecisionParams>,
) -> Response {
    let subject = q.subject.map(|k| s.engine.principal_of(&k));
    let query = DecisionQuery {
        subject,
        grant: q.grant,
        since: q.since,
        limit: q.limit.unwrap_or(100).min(10_000),
    };
    let audit = s.audit.clone();
    match tokio::task::spawn_blocking(move || audit.query(&query)).await {
        Ok(Ok(decisions)) => Json(json!({"decisions": decisions})).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, "audit", e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "audit", e.to_string()),
    }
}

pub async fn subject(State(s): State<Arc<ApiState>>, Path(key): Path<String>) -> Response {
    let engine = s.engine.clone();
    match tokio::task::spawn_blocking(move || engine.explain(&key)).await {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "not_found", "no such subject"),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

pub async fn reload_policies(State(s): State<Arc<ApiState>>) -> Response {
    let outcome = s.reloader.reload();
    let body: Value = serde_json::to_value(&outcome).unwrap_or(Value::Null);
    match outcome {
        ReloadOutcome::Refused { .. } => {
            (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response()
        }
        _ => Json(body).into_response(),
    }
}
