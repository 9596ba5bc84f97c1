//! The OpenID AuthZEN Authorization API 1.0 door (`check` role): a PDP whose context is kept live
//! by signals.
//!
//! | route | answer |
//! |---|---|
//! | `POST /access/v1/evaluation` | `{decision, context}` for one `{subject, action, resource, context}` |
//! | `POST /access/v1/evaluations` | `{evaluations: [{decision, context}…]}`; top-level `subject` / `action` / `resource` / `context` are defaults each entry may replace; `options.evaluations_semantic` `execute_all` (default), `deny_on_first_deny`, `permit_on_first_permit` (the answer stops after the deciding entry); without `evaluations`, a single evaluation |
//! | `GET /.well-known/authzen-configuration` | the PDP metadata (anyone) |
//!
//! Mapping onto Vigil's model: the grant the request is made under is named by `context.grant_id`
//! (or `subject.properties.grant_id`), or the grants of `context.session` or `context.token`
//! (`{iss, jti}`) — every one must allow; each principal's live context, and for an agent delegation
//! the delegating user's, are what the request-time rules see; `action.name` must be within the
//! grant's scopes and `resource.properties.audience`, when given, its audience. No grant named, or
//! one Vigil does not hold, is a deny (fail closed). A deny says why in `context.reason_admin`
//! (and `status`, `rules`); every evaluation is a decision record (cause `access_request`) —
//! denials always, permits as `authzen.audit_sample_rate` says.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use crate::api::ApiState;
use crate::engine::{AccessRequest, GrantRef};
use crate::error_body::error;

/// Most entries one `evaluations` request may hold.
pub const MAX_EVALUATIONS: usize = 256;

/// How a batch is evaluated (AuthZEN §7.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Semantic {
    ExecuteAll,
    DenyOnFirstDeny,
    PermitOnFirstPermit,
}

/// One evaluation, checked: the parts the request gave, and the grant it names.
struct Evaluation {
    request: Value,
    grant: Option<GrantRef>,
}

/// `subject`, `action` and `resource` as AuthZEN §5 shapes them (`type` and `id` strings; `name`).
fn checked(request: Value) -> Result<Evaluation, String> {
    let field = |part: &str, name: &str| -> Result<(), String> {
        match request[part][name].as_str() {
            Some(s) if !s.is_empty() => Ok(()),
            _ => Err(format!("`{part}.{name}` must be a non-empty string")),
        }
    };
    field("subject", "type")?;
    field("subject", "id")?;
    field("resource", "type")?;
    field("resource", "id")?;
    field("action", "name")?;
    for part in ["subject", "resource", "action"] {
        if !request[part]["properties"].is_null() && !request[part]["properties"].is_object() {
            return Err(format!("`{part}.properties` must be an object"));
        }
    }
    if !request["context"].is_null() && !request["context"].is_object() {
        return Err("`context` must be an object".into());
    }
    let grant = grant_named(&request)?;
    Ok(Evaluation { request, grant })
}

/// The grant(s) a request is made under: `context.grant_id` (or `subject.properties.grant_id`),
/// else `context.session` (an id or identifier object), else `context.token` (`{iss, jti}` of
/// the JWT) — the ways `check` names them.
fn grant_named(request: &Value) -> Result<Option<GrantRef>, String> {
    let context = &request["context"];
    if let Some(id) = context["grant_id"]
        .as_str()
        .or_else(|| request["subject"]["properties"]["grant_id"].as_str())
    {
        return Ok(Some(GrantRef::Id(id.to_owned())));
    }
    if !context["session"].is_null() {
        let key = crate::principal::member_key(&context["session"])
            .ok_or("`context.session` must be a session id or an identifier object")?;
        return Ok(Some(GrantRef::Session(key)));
    }
    if !context["token"].is_null() {
        let (Some(iss), Some(jti)) = (
            context["token"]["iss"].as_str(),
            context["token"]["jti"].as_str(),
        ) else {
            return Err("`context.token` must be `{iss, jti}` of the JWT".into());
        };
        return Ok(Some(GrantRef::Token(format!("jwt_id:{iss}|{jti}"))));
    }
    Ok(None)
}

/// The `{decision, context}` of one evaluation, recorded as `audit_sample_rate` says.
fn decide(s: &ApiState, client: &Arc<str>, evaluation: Evaluation) -> Value {
    let started = std::time::Instant::now();
    let request = &evaluation.request;
    let (access, decision) = s.engine.evaluate_access(AccessRequest {
        grant: evaluation.grant.as_ref(),
        action: request["action"]["name"].as_str(),
        resource: request["resource"]["properties"]["audience"].as_str(),
        request: Arc::new(request.clone()),
        client: Some(client),
    });
    metrics::histogram!(crate::telemetry::ACCESS_EVALUATION_SECONDS)
        .record(started.elapsed().as_secs_f64());
    let label = if access.allowed { "allow" } else { "deny" };
    metrics::counter!(crate::telemetry::ACCESS_EVALUATIONS, "decision" => label).increment(1);
    if !access.allowed || rand::random::<f64>() < s.access_sample_rate {
        s.access_log.record(client, decision);
    }
    let mut context = json!({"decision_id": access.decision_id,
                             "policy_version": access.policy_version});
    if !access.allowed {
        context["status"] = json!(access.status);
        context["reason_admin"] = json!({"en": access.reason});
        if !access.rules.is_empty() {
            context["rules"] = json!(access.rules);
        }
    }
    json!({"decision": access.allowed, "context": context})
}

/// Cluster mode: the answer of the instance that holds the grant `evaluation` names, when this
/// one does not (its live state decides, never an older view); `None` on a single node, for a
/// call that was itself passed on, or when no instance holds it (then this one denies it).
async fn from_owner(s: &ApiState, headers: &HeaderMap, evaluation: &Evaluation) -> Option<Value> {
    let peers = s.peers.as_ref()?;
    let held = match evaluation.grant.as_ref()? {
        GrantRef::Id(id) => s.engine.grant(id).is_some(),
        GrantRef::Session(key) => !s.engine.grants_by(Some(key), None).is_empty(),
        GrantRef::Token(key) => !s.engine.grants_by(None, Some(key)).is_empty(),
    };
    if held || headers.contains_key(crate::cluster::FORWARDED) {
        return None;
    }
    let call = crate::cluster::Call {
        segments: &["access", "v1", "evaluation"],
        query: None,
    };
    let body = serde_json::to_vec(&evaluation.request).ok()?;
    let passed = crate::api::passed_on(headers);
    for member in peers.others() {
        let answer = peers
            .send(
                &member,
                reqwest::Method::POST,
                &call,
                &passed,
                Some(body.clone()),
            )
            .await;
        match answer {
            Ok(a) if a.status == 200 => {
                let Ok(v) = serde_json::from_slice::<Value>(&a.body) else {
                    continue;
                };
                if v["context"]["status"] != "unknown" {
                    return Some(v);
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "an instance did not answer an access evaluation"),
        }
    }
    None
}

/// One evaluation's answer: by the grant's owner in cluster mode, else here.
async fn answer(
    s: &Arc<ApiState>,
    headers: &HeaderMap,
    client: &Arc<str>,
    evaluation: Evaluation,
) -> Response {
    if let Some(owner) = from_owner(s, headers, &evaluation).await {
        return Json(owner).into_response();
    }
    match answer_here(s, client, evaluation).await {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", e),
    }
}

/// Decided here, recorded as asked by `client` (the owner of a passed-on call authenticates the
/// same client: the call carries its credential).
async fn answer_here(
    s: &Arc<ApiState>,
    client: &Arc<str>,
    evaluation: Evaluation,
) -> Result<Value, String> {
    let (state, client) = (s.clone(), client.clone());
    tokio::task::spawn_blocking(move || decide(&state, &client, evaluation))
        .await
        .map_err(|e| e.to_string())
}

/// `POST /access/v1/evaluation`.
pub async fn evaluation(
    State(s): State<Arc<ApiState>>,
    axum::Extension(caller): axum::Extension<crate::auth::Caller>,
    headers: HeaderMap,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let client = caller.0.name();
    let request = match body {
        Ok(Json(v)) if v.is_object() => v,
        Ok(_) => return bad("the request must be a JSON object"),
        Err(e) => return bad(e.body_text()),
    };
    match checked(request) {
        Ok(evaluation) => answer(&s, &headers, &client, evaluation).await,
        Err(why) => bad(why),
    }
}

/// `POST /access/v1/evaluations`.
pub async fn evaluations(
    State(s): State<Arc<ApiState>>,
    axum::Extension(caller): axum::Extension<crate::auth::Caller>,
    headers: HeaderMap,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let client = caller.0.name();
    let request = match body {
        Ok(Json(Value::Object(m))) => m,
        Ok(_) => return bad("the request must be a JSON object"),
        Err(e) => return bad(e.body_text()),
    };
    let semantic = match request
        .get("options")
        .and_then(|o| o.get("evaluations_semantic"))
    {
        None => Semantic::ExecuteAll,
        Some(Value::String(name)) => match name.as_str() {
            "execute_all" => Semantic::ExecuteAll,
            "deny_on_first_deny" => Semantic::DenyOnFirstDeny,
            "permit_on_first_permit" => Semantic::PermitOnFirstPermit,
            other => {
                return bad(format!(
                    "`options.evaluations_semantic` `{}` is none of execute_all, \
                     deny_on_first_deny, permit_on_first_permit",
                    crate::outbound::excerpt(other)
                ))
            }
        },
        Some(_) => return bad("`options.evaluations_semantic` must be a string"),
    };
    let entries = match request.get("evaluations") {
        None => None,
        Some(Value::Array(a)) if a.is_empty() => None,
        Some(Value::Array(a)) if a.len() > MAX_EVALUATIONS => {
            return bad(format!("at most {MAX_EVALUATIONS} evaluations per request"))
        }
        Some(Value::Array(a)) => Some(a.clone()),
        Some(_) => return bad("`evaluations` must be an array"),
    };
    let defaults: Map<String, Value> = ["subject", "action", "resource", "context"]
        .into_iter()
        .filter_map(|k| Some((k.to_owned(), request.get(k)?.clone())))
        .collect();
    // Without entries, the request is one evaluation and so is the answer (AuthZEN §7.1).
    let Some(entries) = entries else {
        return match checked(Value::Object(defaults)) {
            Ok(evaluation) => answer(&s, &headers, &client, evaluation).await,
            Err(why) => bad(why),
        };
    };
    let mut checked_entries = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let Value::Object(entry) = entry else {
            return bad(format!("`evaluations[{i}]` must be an object"));
        };
        let mut merged = defaults.clone();
        merged.extend(entry);
        match checked(Value::Object(merged)) {
            Ok(e) => checked_entries.push(e),
            Err(why) => return bad(format!("`evaluations[{i}]`: {why}")),
        }
    }
    let mut answers = Vec::new();
    for evaluation in checked_entries {
        let one = match from_owner(&s, &headers, &evaluation).await {
            Some(owner) => owner,
            None => match answer_here(&s, &client, evaluation).await {
                Ok(one) => one,
                Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", e),
            },
        };
        let allowed = one["decision"] == true;
        answers.push(one);
        let stop = match semantic {
            Semantic::ExecuteAll => false,
            Semantic::DenyOnFirstDeny => !allowed,
            Semantic::PermitOnFirstPermit => allowed,
        };
        if stop {
            break;
        }
    }
    Json(json!({"evaluations": answers})).into_response()
}

/// `GET /.well-known/authzen-configuration`: the PDP metadata.
pub async fn metadata(State(base): State<Arc<String>>) -> Response {
    Json(json!({
        "policy_decision_point": *base,
        "access_evaluation_endpoint": format!("{base}/access/v1/evaluation"),
        "access_evaluations_endpoint": format!("{base}/access/v1/evaluations"),
    }))
    .into_response()
}

fn bad(why: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request", why)
}
