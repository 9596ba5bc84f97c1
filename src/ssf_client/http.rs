//! `/v1/ssf/streams`: Vigil's managed inbound streams over HTTP, for `vigil streams` and operators.
//!
//! | route | answer |
//! |---|---|
//! | `GET /v1/ssf/streams` | 200 `{streams: [{transmitter, stream, liveness}]}` |
//! | `POST /v1/ssf/streams/{name}` | 200 `{config}`: create or adopt now (idempotent) |
//! | `GET /v1/ssf/streams/{name}` | 200 the transmitter's configuration and status, with liveness |
//! | `DELETE /v1/ssf/streams/{name}` | 204: deleted at the transmitter and forgotten |
//! | `POST /v1/ssf/streams/{name}/verify` | 202: verification requested |
//! | `POST /v1/ssf/streams/{name}/status` | body `{status, reason?}`: 200 the transmitter's answer, 202 undecided |
//! | `POST /v1/ssf/streams/{name}/subjects:add` / `:remove` | 200, body `{subject}` |
//!
//! 404: no managed transmitter of that name; 409: no stream yet; 502: the transmitter refused or
//! failed, with its answer in `description`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{ManageError, StreamClients};

pub fn routes(clients: Arc<StreamClients>) -> Router {
    Router::new()
        .route("/v1/ssf/streams", get(list))
        .route(
            "/v1/ssf/streams/{name}",
            post(create).get(describe).delete(delete),
        )
        .route("/v1/ssf/streams/{name}/verify", post(verify))
        .route("/v1/ssf/streams/{name}/status", post(set_status))
        .route("/v1/ssf/streams/{name}/subjects:add", post(add_subject))
        .route(
            "/v1/ssf/streams/{name}/subjects:remove",
            post(remove_subject),
        )
        .layer(axum::extract::DefaultBodyLimit::max(16 * 1024))
        .with_state(clients)
}

use crate::error_body::error;

fn manage_error(e: ManageError) -> Response {
    match e {
        ManageError::NoStream => error(StatusCode::CONFLICT, "no_stream", e.to_string()),
        other => error(
            StatusCode::BAD_GATEWAY,
            "transmitter_error",
            other.to_string(),
        ),
    }
}

fn not_found(name: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no managed transmitter named `{name}`"),
    )
}

async fn list(State(clients): State<Arc<StreamClients>>) -> Response {
    let streams: Vec<Value> = clients
        .managers
        .iter()
        .map(|m| {
            json!({"transmitter": m.name(), "stream": m.stream(),
                "liveness": clients.liveness.get(m.stream())})
        })
        .collect();
    Json(json!({ "streams": streams })).into_response()
}

async fn create(State(clients): State<Arc<StreamClients>>, Path(name): Path<String>) -> Response {
    let Some(m) = clients.get(&name) else {
        return not_found(&name);
    };
    match m.ensure().await {
        Ok(c) => Json(json!({ "config": c.0 })).into_response(),
        Err(e) => manage_error(e),
    }
}

async fn describe(State(clients): State<Arc<StreamClients>>, Path(name): Path<String>) -> Response {
    let Some(m) = clients.get(&name) else {
        return not_found(&name);
    };
    match m.describe().await {
        Ok(v) => Json(v).into_response(),
        Err(e) => manage_error(e),
    }
}

async fn delete(State(clients): State<Arc<StreamClients>>, Path(name): Path<String>) -> Response {
    let Some(m) = clients.get(&name) else {
        return not_found(&name);
    };
    match m.delete().await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => manage_error(e),
    }
}

async fn verify(State(clients): State<Arc<StreamClients>>, Path(name): Path<String>) -> Response {
    let Some(m) = clients.get(&name) else {
        return not_found(&name);
    };
    match m.verify().await {
        Ok(()) => (StatusCode::ACCEPTED, Json(json!({"requested": true}))).into_response(),
        Err(e) => manage_error(e),
    }
}

async fn set_status(
    State(clients): State<Arc<StreamClients>>,
    Path(name): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    let Some(m) = clients.get(&name) else {
        return not_found(&name);
    };
    let Some(status) = body["status"]
        .as_str()
        .filter(|s| ["enabled", "paused", "disabled"].contains(s))
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "`status` must be enabled, paused or disabled",
        );
    };
    match m.set_status(status, body["reason"].as_str()).await {
        Ok(Some(s)) => Json(s).into_response(),
        Ok(None) => (StatusCode::ACCEPTED, Json(json!({"status": "pending"}))).into_response(),
        Err(e) => manage_error(e),
    }
}

fn no_subject() -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "the body needs `subject`: an RFC 9493 subject identifier object",
    )
}

async fn add_subject(
    State(clients): State<Arc<StreamClients>>,
    Path(name): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    subject_change(&clients, &name, &body, true).await
}

async fn remove_subject(
    State(clients): State<Arc<StreamClients>>,
    Path(name): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    subject_change(&clients, &name, &body, false).await
}

async fn subject_change(clients: &StreamClients, name: &str, body: &Value, add: bool) -> Response {
    let Some(m) = clients.get(name) else {
        return not_found(name);
    };
    let Some(subject) = body.get("subject").filter(|s| s.is_object()) else {
        return no_subject();
    };
    let (result, done) = if add {
        (m.add_subject(subject).await, "added")
    } else {
        (m.remove_subject(subject).await, "removed")
    };
    match result {
        Ok(()) => Json(json!({ done: subject })).into_response(),
        Err(e) => manage_error(e),
    }
}
