//! Operational endpoints: `/healthz` (the process answers), `/readyz` (the pipeline is running; body
//! lists each transmitter's key status) and `/metrics` (Prometheus text format).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{json, Map, Value};

use crate::receiver::Receiver;

pub struct OpsState {
    pub receiver: Arc<Receiver>,
    pub metrics: Option<PrometheusHandle>,
    /// The Kafka source's state, when it is configured.
    pub kafka: Option<Arc<crate::kafka::KafkaHealth>>,
    /// Cluster mode: the risk feeds' source (its instances split the feed topics).
    pub feeds: Option<Arc<crate::kafka::KafkaHealth>>,
    /// Cluster mode: the grant status view (its size and lag are shown).
    pub view: Option<Arc<crate::cluster::StatusView>>,
}

pub async fn healthz() -> &'static str {
    "ok"
}

pub async fn readyz(State(state): State<Arc<OpsState>>) -> Response {
    let mut transmitters = Map::new();
    for t in state.receiver.transmitters() {
        transmitters.insert(
            t.config.name.clone(),
            json!({ "stream": t.config.stream, "keys_loaded": t.keys.is_loaded() }),
        );
    }
    let running = state.receiver.pipeline_running();
    let kafka = state.kafka.as_ref().map(|k| k.view());
    let feeds = state.feeds.as_ref().map(|k| k.view());
    let kafka_problem = kafka
        .as_ref()
        .and_then(|v| v.as_ref()?.problem())
        .or_else(|| {
            let why = feeds.as_ref()?.as_ref()?.problem()?;
            Some(format!("risk feeds: {why}"))
        });
    let ready = running && kafka_problem.is_none();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = json!({
        "status": match (running, &kafka_problem) {
            (false, _) => "pipeline stopped".to_owned(),
            (true, Some(why)) => why.clone(),
            (true, None) => "ready".to_owned(),
        },
        "transmitters": Value::Object(transmitters),
    });
    if let Some(view) = kafka {
        // `null` until the source's first statistics (every 5 s).
        body["kafka"] = json!(view);
    }
    if let Some(view) = feeds {
        body["risk_feeds"] = json!(view);
    }
    if let Some(view) = &state.view {
        body["status_view"] = json!({"grants": view.len(), "lag": view.lag()});
    }
    // Inbound streams Vigil verifies: healthy while each request is answered within its SLA
    // (shown, not a readiness condition: one transmitter's silence must not take Vigil out of
    // its load balancer for every other).
    let liveness = state.receiver.liveness();
    liveness.assess();
    let streams: Map<String, Value> = liveness
        .all()
        .into_iter()
        .filter(|(_, l)| l.verification_sla_ms.is_some())
        .map(|(name, l)| {
            (
                name,
                json!({"healthy": l.healthy,
                       "verification_pending_since_ms": l.verification_pending_since_ms,
                       "verification_overdue_ms": l.verification_overdue_ms,
                       "last_verified_ms": l.last_verified_ms}),
            )
        })
        .collect();
    if !streams.is_empty() {
        body["streams"] = Value::Object(streams);
    }
    (status, Json(body)).into_response()
}

pub async fn metrics(State(state): State<Arc<OpsState>>) -> Response {
    state.receiver.liveness().assess();
    match &state.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed",
        )
            .into_response(),
    }
}

/// The OpenAPI document of Vigil's own API (`openapi.yaml` at the repository root, built in).
pub const OPENAPI: &str = include_str!("../openapi.yaml");

/// `GET /v1/openapi.yaml`.
pub async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/yaml")],
        OPENAPI,
    )
        .into_response()
}
