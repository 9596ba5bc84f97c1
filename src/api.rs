//! Vigil's own HTTP API for grants, decisions, subjects and policies (JSON).
//!
//! | route | answer |
//! |---|---|
//! | `POST /v1/grants` | 201 `{grant, decisions}`; 400 invalid; 409 a revoked id or another principal's id |
//! | `GET /v1/grants/{id}` | 200 grant (with `status`, and `revoked` for a tombstone); 404 |
//! | `DELETE /v1/grants/{id}` | 204 ended; 200 `{tombstone: true}` when revoked (kept until expiry); 404 |
//! | `GET /v1/decisions?subject=&grant=&since=&limit=` | 200 `{decisions}` oldest first |
//! | `GET /v1/subjects/{key}` | 200 context, grants, recent signals and decisions ("why"); 404 |
//! | `POST /v1/check` | 200 `{decision: allow \| deny, status, reason, grants}` from live state |
//! | `GET /v1/check/auth_request` | nginx `auth_request`: 200 allow, 401 unknown, 403 denied |
//! | `GET /v1/deadletters?limit=&stream_id=&after=` | 200 `{dead_letters, total, next}`: the SETs that could not be delivered, oldest first, with the error; `next` is the following page's `after` |
//! | `POST /v1/deadletters/replay?stream_id=` | 200 `{replayed, skipped, deferred}`: back into their streams' outboxes, in order, as far as each has room |
//! | `POST /v1/keys/rotate` | 200 `{kid}`: a new signing key; the old one stays in the JWKS for the retention |
//!
//! The policy routes (`/v1/policies*`) are in [`crate::policy_api`].

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::audit::DecisionQuery;
use crate::check::{self, CheckRequest, CheckResult, Verdict};
use crate::engine::{Engine, EngineError};
use crate::grant::{GrantRequest, GrantStatus};
use crate::reload::PolicyReloader;
use crate::transmitter::streams::{DeadLetter, DeadLetterPosition, Replayed};

pub struct ApiState {
    pub identity: Arc<crate::transmitter::Identity>,
    pub streams: Arc<crate::transmitter::streams::StreamStore>,
    pub engine: Arc<Engine>,
    pub audit: Arc<crate::audit::AuditLog>,
    /// Each API client's access-request decisions ([`crate::audit::AccessLogs`]).
    pub access_audit: Arc<crate::audit::AccessLogs>,
    pub reloader: Arc<PolicyReloader>,
    /// The configured enforcement points' names: a grant may name only these.
    pub enforcement_points: Vec<String>,
    /// Cluster mode: the principals this instance owns (grants of others are forwarded).
    pub ownership: Option<Arc<crate::cluster::Ownership>>,
    /// Cluster mode: the other instances, which answer for the principals they own.
    pub peers: Option<Arc<crate::cluster::Peers>>,
    /// Cluster mode: every grant's status as its owner last wrote it (`check` for grants held
    /// elsewhere).
    pub view: Option<Arc<crate::cluster::StatusView>>,
    /// Cluster mode: the other instances' decisions, copied into `audit`.
    pub decision_copies: Option<Arc<crate::cluster::DecisionCopies>>,
    /// Cluster mode: the signals topic read back (replay, the live feed).
    pub signal_history: Option<Arc<crate::cluster::SignalHistory>>,
    /// Where access decision records go (AuthZEN), and the share of permits recorded.
    pub access_log: crate::engine::AccessLog,
    pub access_sample_rate: f64,
    /// `delivery.max_outbox_per_stream`: a dead-letter replay fills a stream's outbox no further.
    pub max_outbox_per_stream: usize,
}

use crate::error_body::error;

pub(crate) fn engine_error(e: EngineError) -> Response {
    match e {
        EngineError::Invalid(e) => error(StatusCode::BAD_REQUEST, "invalid_grant", e.to_string()),
        EngineError::Revoked(_) => error(StatusCode::CONFLICT, "grant_revoked", e.to_string()),
        EngineError::Conflict(_) => error(StatusCode::CONFLICT, "grant_conflict", e.to_string()),
        EngineError::Stopped => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
        EngineError::Full(_) => crate::error_body::refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "grant_capacity",
            &e.to_string(),
            std::time::Duration::from_secs(60),
        ),
        EngineError::Quota { .. } => crate::error_body::refusal(
            StatusCode::TOO_MANY_REQUESTS,
            "grant_quota",
            &e.to_string(),
            std::time::Duration::from_secs(60),
        ),
        EngineError::Overloaded => crate::error_body::refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            &e.to_string(),
            std::time::Duration::from_secs(1),
        ),
        EngineError::NotOwned(_) => crate::error_body::refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_owner",
            &e.to_string(),
            std::time::Duration::from_secs(1),
        ),
        EngineError::Unreplicated(_) | EngineError::Unavailable(_) => crate::error_body::refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "log_unavailable",
            &e.to_string(),
            std::time::Duration::from_secs(5),
        ),
        EngineError::Storage(_) | EngineError::Thread(_) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string())
        }
    }
}

/// `POST /v1/grants`. The grant counts against the client that registers it (`caller`, set by the
/// `grants` role's middleware: a route without it answers 500 rather than count against no one).
pub async fn register_grant(
    State(s): State<Arc<ApiState>>,
    axum::Extension(caller): axum::Extension<crate::auth::Caller>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let request: GrantRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_grant", e.to_string()),
    };
    // A grant naming an enforcement point Vigil does not know would never be delivered anywhere.
    if let Some(unknown) = request
        .enforcement_points
        .iter()
        .find(|p| !s.enforcement_points.contains(p))
    {
        let known = if s.enforcement_points.is_empty() {
            "none are configured".to_owned()
        } else {
            format!("known: {}", s.enforcement_points.join(", "))
        };
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            format!(
                "unknown enforcement point `{}` ({known})",
                crate::outbound::excerpt(unknown)
            ),
        );
    }
    // Cluster mode: only the principal's owner holds its grants (its signals reach only it).
    if let Some(ownership) = &s.ownership {
        let identifiers = match request.identifier_keys() {
            Ok(ids) => ids,
            Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_grant", e.to_string()),
        };
        if let Some(key) = s.engine.principal_key(&identifiers) {
            if let Err(partition) = ownership.check(&key) {
                return to_owner(&s, &headers, &key, partition, body.to_vec()).await;
            }
        }
    }
    match s.engine.register(request, caller.0).await {
        Ok(registered) => (StatusCode::CREATED, Json(registered)).into_response(),
        Err(e) => engine_error(e),
    }
}

/// A registration for a principal another instance owns: answered by the owner. A call that was
/// itself forwarded is not forwarded again (the directory was stale): 421.
async fn to_owner(
    s: &ApiState,
    headers: &HeaderMap,
    key: &str,
    partition: i32,
    body: Vec<u8>,
) -> Response {
    let peers = match &s.peers {
        Some(peers) if !headers.contains_key(crate::cluster::FORWARDED) => peers,
        _ => {
            return error(
                StatusCode::MISDIRECTED_REQUEST,
                "not_owner",
                format!(
                    "this subject belongs to partition {partition} of the cluster, which \
                     another instance owns"
                ),
            )
        }
    };
    let answer = match peers.owner_of(key) {
        Ok(owner) => {
            peers
                .send(
                    &owner,
                    reqwest::Method::POST,
                    &crate::cluster::Call {
                        segments: &["v1", "grants"],
                        query: None,
                    },
                    &passed_on(headers),
                    Some(body),
                )
                .await
        }
        Err(e) => Err(e),
    };
    forwarded(answer)
}

/// What of the caller's request is passed on to another instance: its `Authorization` (a
/// cluster's instances share clients) and the `x-vigil-*` headers an `auth_request` names its
/// grant by.
pub(crate) fn passed_on(headers: &HeaderMap) -> Vec<(&str, &str)> {
    headers
        .iter()
        .filter(|(name, _)| {
            *name == axum::http::header::AUTHORIZATION
                || (name.as_str().starts_with("x-vigil-")
                    && name.as_str() != crate::cluster::FORWARDED)
        })
        .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)))
        .collect()
}

/// An owner's answer as this instance's, or 503 when no owner answered.
fn forwarded(answer: Result<crate::cluster::Answer, crate::cluster::ForwardError>) -> Response {
    match answer {
        Ok(a) => {
            let status = StatusCode::from_u16(a.status).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut response = (status, a.body).into_response();
            for (name, value) in a.vigil_headers {
                if let (Ok(name), Ok(value)) = (
                    axum::http::HeaderName::from_bytes(name.as_bytes()),
                    axum::http::HeaderValue::from_str(&value),
                ) {
                    response.headers_mut().insert(name, value);
                }
            }
            if let Some(ct) = a
                .content_type
                .and_then(|ct| axum::http::HeaderValue::from_str(&ct).ok())
            {
                response
                    .headers_mut()
                    .insert(axum::http::header::CONTENT_TYPE, ct);
            }
            response
        }
        Err(e) => crate::error_body::refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "owner_unavailable",
            &e.to_string(),
            std::time::Duration::from_secs(1),
        ),
    }
}

/// A grant this instance does not hold, asked of the other instances in turn (a grant's id does
/// not say which principal it belongs to): the first answer other than 404, else `None`.
async fn from_others(
    s: &ApiState,
    headers: &HeaderMap,
    method: reqwest::Method,
    id: &str,
) -> Option<Response> {
    let call = crate::cluster::Call {
        segments: &["v1", "grants", id],
        query: None,
    };
    ask_others(s, headers, method, &call, None, |a| a.status != 404).await
}

/// Asks the other instances in turn (not for a call that was itself forwarded) and returns the
/// first answer `known` accepts; `None` when none does or there are no others.
async fn ask_others(
    s: &ApiState,
    headers: &HeaderMap,
    method: reqwest::Method,
    call: &crate::cluster::Call<'_>,
    body: Option<Vec<u8>>,
    known: impl Fn(&crate::cluster::Answer) -> bool,
) -> Option<Response> {
    let peers = s.peers.as_ref()?;
    if headers.contains_key(crate::cluster::FORWARDED) {
        return None;
    }
    for member in peers.others() {
        let answer = peers
            .send(
                &member,
                method.clone(),
                call,
                &passed_on(headers),
                body.clone(),
            )
            .await;
        match answer {
            Ok(a) if known(&a) => return Some(forwarded(Ok(a))),
            Ok(_) => continue,
            Err(e) => tracing::warn!(error = %e, "an instance did not answer"),
        }
    }
    None
}

pub async fn get_grant(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let held = s.engine.grant(&id);
    if held.is_none() {
        if let Some(answer) = from_others(&s, &headers, reqwest::Method::GET, &id).await {
            return answer;
        }
    }
    match held {
        Some(g) => Json(&*g).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no grant `{id}`"),
        ),
    }
}

/// `GET /v1/grants`' filters and page. An unknown parameter is refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantListParams {
    status: Option<GrantStatus>,
    /// Any identifier key of the principal (`email:jane@example.com`).
    principal: Option<String>,
    enforcement_point: Option<String>,
    kind: Option<crate::grant::GrantKind>,
    /// A rule that decided the grant's status (revoked, stepped up or restricted it).
    rule: Option<String>,
    /// The previous page's `next`.
    after: Option<String>,
    limit: Option<usize>,
}

/// Most grants on one page.
const MAX_GRANT_PAGE: usize = 1000;

/// Grants, filtered, in id order, a page at a time: `{grants, next}` (`next`: the `after` of the
/// following page, absent on the last). Cluster mode: every instance's, merged.
pub async fn list_grants(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
    q: Result<Query<GrantListParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(q) = match q {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()),
    };
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_GRANT_PAGE);
    let query = crate::engine::GrantQuery {
        status: q.status,
        principal: q.principal,
        enforcement_point: q.enforcement_point,
        kind: q.kind,
        rule: q.rule,
        after: q.after,
        limit,
    };
    let engine = s.engine.clone();
    let (mut grants, mut more) =
        match tokio::task::spawn_blocking(move || engine.list_grants(&query)).await {
            Ok((grants, more)) => (
                grants
                    .iter()
                    .map(|g| serde_json::to_value(&**g).unwrap_or(Value::Null))
                    .collect::<Vec<Value>>(),
                more,
            ),
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
        };
    // Cluster mode: each instance's page after the same cursor; together, in id order.
    let call = crate::cluster::Call {
        segments: &["v1", "grants"],
        query: raw.as_deref(),
    };
    if let Some(pages) = from_every_other(&s, &headers, reqwest::Method::GET, &call).await {
        for page in pages.into_iter().flatten() {
            let page: GrantPage = page;
            more |= page.next.is_some();
            grants.extend(page.grants);
        }
        grants.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
        more |= grants.len() > limit;
        grants.truncate(limit);
    }
    let next = more
        .then(|| {
            grants
                .last()
                .and_then(|g| g["id"].as_str().map(str::to_owned))
        })
        .flatten();
    Json(json!({"grants": grants, "next": next})).into_response()
}

/// Another instance's `/v1/grants` page.
#[derive(Deserialize)]
struct GrantPage {
    grants: Vec<Value>,
    next: Option<String>,
}

/// `GET /v1/grants/{id}/explain`: the grant and its subject explained (as `/v1/subjects/{key}`).
pub async fn explain_grant(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let Some(grant) = s.engine.grant(&id) else {
        let call = crate::cluster::Call {
            segments: &["v1", "grants", id.as_str(), "explain"],
            query: None,
        };
        return match ask_others(&s, &headers, reqwest::Method::GET, &call, None, |a| {
            a.status == 200
        })
        .await
        {
            Some(answer) => answer,
            None => error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no grant `{id}`"),
            ),
        };
    };
    let engine = s.engine.clone();
    let principal = grant.principal.to_string();
    match tokio::task::spawn_blocking(move || engine.explain(&principal)).await {
        Ok(subject) => Json(json!({"grant": &*grant, "subject": subject})).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

pub async fn delete_grant(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if s.engine.grant(&id).is_none() {
        if let Some(answer) = from_others(&s, &headers, reqwest::Method::DELETE, &id).await {
            return answer;
        }
    }
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

/// `/v1/decisions`' filters. An unknown one is refused (a misspelt filter silently matching
/// everything misleads whoever reads the answer).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionParams {
    subject: Option<String>,
    grant: Option<String>,
    /// Seconds since the epoch, or RFC 3339.
    since: Option<String>,
    /// Seconds since the epoch, or RFC 3339 (exclusive).
    until: Option<String>,
    policy_version: Option<String>,
    cause: Option<String>,
    rule: Option<String>,
    status: Option<crate::grant::GrantStatus>,
    effect: Option<crate::decision::DecisionEffect>,
    limit: Option<usize>,
}

/// A time given as seconds since the epoch or as RFC 3339.
pub(crate) fn parse_time(name: &str, value: &str) -> Result<f64, String> {
    if let Ok(secs) = value.parse::<f64>() {
        if secs.is_finite() {
            return Ok(secs);
        }
    }
    chrono::DateTime::parse_from_rfc3339(value)
        .map(|t| t.timestamp_millis() as f64 / 1000.0)
        .map_err(|_| {
            format!("`{name}`: `{value}` is neither seconds since the epoch nor an RFC 3339 time")
        })
}

pub async fn decisions(
    State(s): State<Arc<ApiState>>,
    q: Result<Query<DecisionParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(q) = match q {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()),
    };
    let times = (
        q.since
            .as_deref()
            .map(|t| parse_time("since", t))
            .transpose(),
        q.until
            .as_deref()
            .map(|t| parse_time("until", t))
            .transpose(),
    );
    let (since, until) = match times {
        (Ok(since), Ok(until)) => (since, until),
        (Err(e), _) | (_, Err(e)) => return error(StatusCode::BAD_REQUEST, "invalid_request", e),
    };
    if let Some(cause) = q.cause.as_deref() {
        if !crate::decision::Cause::KINDS.contains(&cause) {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!(
                    "`cause`: `{cause}` is not one of {}",
                    crate::decision::Cause::KINDS.join(", ")
                ),
            );
        }
    }
    let subject = q.subject.map(|k| s.engine.principal_of(&k));
    let limit = q.limit.unwrap_or(100).min(10_000);
    let query = DecisionQuery {
        subject,
        grant: q.grant,
        since,
        until,
        policy_version: q.policy_version,
        cause: q.cause,
        rule: q.rule,
        status: q.status,
        effect: q.effect,
        limit,
    };
    // Cluster mode: the local log holds every instance's decisions once copied; what the brokers
    // held when the call arrived is waited for (briefly: a lagging copier answers what it has).
    if let Some(copies) = &s.decision_copies {
        if !copies.caught_up(DECISION_COPIES_WAIT).await {
            tracing::warn!(
                lag = copies.lag(),
                "decisions listed before every other instance's were copied here"
            );
        }
    }
    let (audit, access) = (s.audit.clone(), s.access_audit.clone());
    let listed = tokio::task::spawn_blocking(move || {
        let mut decisions = audit.query(&query)?;
        // Access decisions are in their clients' logs (and, recorded by earlier releases, here).
        if query
            .cause
            .as_deref()
            .is_none_or(|c| c == crate::decision::Cause::ACCESS_REQUEST)
        {
            decisions.extend(access.query(&query)?);
        }
        std::io::Result::Ok(crate::audit::newest(decisions, query.limit()))
    });
    match listed.await {
        Ok(Ok(mut decisions)) => {
            // Copies arrive after this instance's own decisions of the same time: oldest first.
            decisions.sort_by(|a, b| a.time.total_cmp(&b.time));
            Json(json!({"decisions": decisions})).into_response()
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, "audit", e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "audit", e.to_string()),
    }
}

/// How long a decision query waits for other instances' decisions to be copied here.
const DECISION_COPIES_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Cluster mode, a call not itself forwarded: `call` made to every other live instance, each
/// `200` answer's body read as `T` (an instance that does not answer, or answers otherwise, is
/// logged and left out). `None` on a single node or for a forwarded call.
/// Cluster mode: `call` (with `body`) made of every other instance, as this request came; each
/// instance's status and body, or why it did not answer. `None` outside cluster mode, or when
/// this request was itself passed on.
pub(crate) async fn to_every_other(
    s: &ApiState,
    headers: &HeaderMap,
    method: reqwest::Method,
    call: &crate::cluster::Call<'_>,
    body: Option<Vec<u8>>,
) -> Option<Vec<(String, Result<(u16, Vec<u8>), String>)>> {
    to_every_other_within(s, headers, method, call, body, None).await
}

/// [`to_every_other`], each call waiting up to `timeout` (`None`: the peers client's 5 s), all
/// of them at once.
pub(crate) async fn to_every_other_within(
    s: &ApiState,
    headers: &HeaderMap,
    method: reqwest::Method,
    call: &crate::cluster::Call<'_>,
    body: Option<Vec<u8>>,
    timeout: Option<std::time::Duration>,
) -> Option<Vec<(String, Result<(u16, Vec<u8>), String>)>> {
    let peers = s.peers.as_ref()?;
    if headers.contains_key(crate::cluster::FORWARDED) {
        return None;
    }
    let passed = passed_on(headers);
    let calls = peers.others().into_iter().map(|member| {
        let (method, body, passed) = (method.clone(), body.clone(), &passed);
        async move {
            let answer = peers
                .send_within(&member, method, call, passed, body, timeout)
                .await
                .map(|a| (a.status, a.body))
                .map_err(|e| e.to_string());
            if let Err(e) = &answer {
                tracing::warn!(error = %e, instance = %member.instance, "an instance did not answer");
            }
            (member.instance, answer)
        }
    });
    Some(futures_util::future::join_all(calls).await)
}

async fn from_every_other<T: serde::de::DeserializeOwned>(
    s: &ApiState,
    headers: &HeaderMap,
    method: reqwest::Method,
    call: &crate::cluster::Call<'_>,
) -> Option<Vec<Option<T>>> {
    let answers = to_every_other(s, headers, method, call, None).await?;
    Some(
        answers
            .into_iter()
            .map(|(instance, answer)| {
                match answer {
                Ok((200, body)) => serde_json::from_slice(&body)
                    .map_err(|e| {
                        tracing::warn!(error = %e, %instance, "an instance's answer did not parse")
                    })
                    .ok(),
                Ok((status, _)) => {
                    tracing::warn!(status, %instance, "an instance did not answer 200");
                    None
                }
                Err(_) => None,
            }
            })
            .collect(),
    )
}

pub async fn subject(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> Response {
    let engine = s.engine.clone();
    let asked = key.clone();
    match tokio::task::spawn_blocking(move || engine.explain(&asked)).await {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => {
            // Cluster mode: the subject's owner explains it.
            let call = crate::cluster::Call {
                segments: &["v1", "subjects", key.as_str()],
                query: None,
            };
            match ask_others(&s, &headers, reqwest::Method::GET, &call, None, |a| {
                a.status == 200
            })
            .await
            {
                Some(answer) => answer,
                None => error(StatusCode::NOT_FOUND, "not_found", "no such subject"),
            }
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

/// The grants a check names; `Err` describes a malformed request.
fn lookup(s: &ApiState, req: &CheckRequest) -> Result<Vec<Arc<crate::grant::Grant>>, String> {
    let named = [
        req.grant_id.is_some(),
        req.session.is_some(),
        req.token.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if named != 1 {
        return Err("name exactly one of `grant_id`, `session`, `token`".into());
    }
    if let Some(id) = &req.grant_id {
        return Ok(s.engine.grant(id).into_iter().collect());
    }
    let session = match &req.session {
        Some(v) => Some(
            crate::principal::member_key(v).ok_or("`session` must be a string or an identifier")?,
        ),
        None => None,
    };
    let token = req
        .token
        .as_ref()
        .map(|t| format!("jwt_id:{}|{}", t.iss, t.jti));
    Ok(s.engine.grants_by(session.as_deref(), token.as_deref()))
}

/// The verdict on `grants` at `now` (seconds; the engine's clock, which also expires them).
fn judge(
    grants: &[Arc<crate::grant::Grant>],
    action: Option<&str>,
    resource: Option<&str>,
    now: f64,
) -> CheckResult {
    let refs: Vec<&crate::grant::Grant> = grants.iter().map(|g| &**g).collect();
    let result = check::check(&refs, action, resource, now);
    let verdict = match result.decision {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
    };
    metrics::counter!(crate::telemetry::CHECKS, "decision" => verdict).increment(1);
    result
}

/// `POST /v1/check`: allow / deny from live state.
/// How a check for a grant held elsewhere was answered with the status view.
enum ViewAnswer {
    /// By the grant's owner (its live state).
    Owner(Response),
    /// Here: a terminal denial the view holds (no hop), or — with the view's lag — a denial
    /// because the owner could not confirm the grant.
    Here(CheckResult, Option<u64>),
}

/// Cluster mode: a check naming a grant (`grant_id`) this instance does not hold, answered with
/// the status view: revoked or expired there is denied at once (the view only lags its owner, and
/// revoked is terminal); anything else is asked of the grant's owner, whose live answer is
/// returned — or, when it cannot be reached, a denial (`unconfirmed`) saying what the view holds
/// and how far behind it is: the view alone never allows. `None` when the view does not know the
/// grant (registered a moment ago) or the call was itself forwarded.
async fn from_view(
    s: &ApiState,
    headers: &HeaderMap,
    req: &CheckRequest,
    method: reqwest::Method,
    call: &crate::cluster::Call<'_>,
    body: Option<Vec<u8>>,
    known: impl Fn(&crate::cluster::Answer) -> bool,
) -> Option<ViewAnswer> {
    if headers.contains_key(crate::cluster::FORWARDED) {
        return None;
    }
    let (view, peers) = (s.view.as_ref()?, s.peers.as_ref()?);
    let grant = view.get(req.grant_id.as_deref()?)?;
    let now = s.engine.clock().now();
    let answer = |result: CheckResult, stale: Option<u64>, how: &'static str| {
        metrics::counter!(crate::telemetry::CLUSTER_VIEW_ANSWERS, "answer" => how).increment(1);
        Some(ViewAnswer::Here(result, stale))
    };
    let result = judge(
        std::slice::from_ref(&grant),
        req.action.as_deref(),
        req.resource.as_deref(),
        now,
    );
    if matches!(result.status.as_str(), "revoked" | "expired") {
        return answer(result, None, "deny");
    }
    let owner = match peers.owner_of(&grant.principal) {
        Ok(owner) => owner,
        Err(e) => {
            // The directory does not name the partition's owner yet (it was assigned moments
            // ago): whichever instance holds the grant answers; none does, and it is unconfirmed.
            if let Some(held) = ask_others(s, headers, method, call, body, &known).await {
                metrics::counter!(crate::telemetry::CLUSTER_VIEW_ANSWERS, "answer" => "confirmed")
                    .increment(1);
                return Some(ViewAnswer::Owner(held));
            }
            tracing::warn!(error = %e, "no instance answered for the grant's owner");
            return answer(
                unconfirmed(result, view.lag()),
                Some(view.lag()),
                "unconfirmed",
            );
        }
    };
    let asked = peers
        .send(&owner, method, call, &passed_on(headers), body)
        .await;
    match asked {
        Ok(a) if known(&a) => {
            metrics::counter!(crate::telemetry::CLUSTER_VIEW_ANSWERS, "answer" => "confirmed")
                .increment(1);
            Some(ViewAnswer::Owner(forwarded(Ok(a))))
        }
        // Not the holder after all (the directory or the view is behind): the others are asked.
        Ok(a) if a.status < 500 && a.status != 421 => None,
        Ok(a) => {
            tracing::warn!(
                status = a.status,
                "the grant's owner did not answer the check"
            );
            answer(
                unconfirmed(result, view.lag()),
                Some(view.lag()),
                "unconfirmed",
            )
        }
        Err(e) => {
            tracing::warn!(error = %e, "the grant's owner did not answer the check");
            answer(
                unconfirmed(result, view.lag()),
                Some(view.lag()),
                "unconfirmed",
            )
        }
    }
}

/// Fail closed: what the view would allow is denied while the grant's owner cannot confirm it
/// (the view may not yet hold a revocation the owner made), saying what the view holds.
fn unconfirmed(viewed: CheckResult, lag: u64) -> CheckResult {
    if viewed.decision == Verdict::Deny {
        return viewed;
    }
    CheckResult {
        decision: Verdict::Deny,
        status: "unconfirmed".into(),
        reason: format!(
            "the grant's owner cannot be reached to confirm it (its partition may be moving); the \
             status view, {lag} records behind, holds it as {}",
            viewed.status
        ),
        grants: viewed.grants,
    }
}

pub async fn check_grant(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let req: CheckRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_check", e.to_string()),
    };
    // Cluster mode: a grant this instance does not hold is answered by the one that does (its
    // live state: never an older view).
    let found = lookup(&s, &req);
    if s.peers.is_some() && matches!(found, Ok(ref grants) if grants.is_empty()) {
        let call = crate::cluster::Call {
            segments: &["v1", "check"],
            query: None,
        };
        let known = |a: &crate::cluster::Answer| {
            serde_json::from_slice::<Value>(&a.body)
                .is_ok_and(|v| a.status == 200 && v["status"] != "unknown")
        };
        let viewed = from_view(
            &s,
            &headers,
            &req,
            reqwest::Method::POST,
            &call,
            Some(body.to_vec()),
            known,
        )
        .await;
        match viewed {
            Some(ViewAnswer::Owner(answer)) => return answer,
            Some(ViewAnswer::Here(result, stale)) => {
                let mut body = json!(result);
                if let Some(lag) = stale {
                    body["view_lag"] = json!(lag);
                }
                return Json(body).into_response();
            }
            None => {}
        }
        let known = |a: &crate::cluster::Answer| {
            serde_json::from_slice::<Value>(&a.body)
                .is_ok_and(|v| a.status == 200 && v["status"] != "unknown")
        };
        let answer = ask_others(
            &s,
            &headers,
            reqwest::Method::POST,
            &crate::cluster::Call {
                segments: &["v1", "check"],
                query: None,
            },
            Some(body.to_vec()),
            known,
        )
        .await;
        if let Some(answer) = answer {
            return answer;
        }
    }
    match found {
        Ok(grants) => Json(judge(
            &grants,
            req.action.as_deref(),
            req.resource.as_deref(),
            s.engine.clock().now(),
        ))
        .into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, "invalid_check", e),
    }
}

/// `GET /v1/check/auth_request`: for nginx `auth_request`. The grant is named by `X-Vigil-Grant`,
/// `X-Vigil-Session`, or the `iss`/`jti` of the user's JWT in `X-Vigil-Token` (read, not verified:
/// the gateway verifies the token; Vigil answers whether it is still valid). Optional `X-Vigil-Action`.
/// 200 allow, 401 unknown grant, 403 denied; `X-Vigil-Status` and `X-Vigil-Reason` say why.
pub async fn check_auth_request(State(s): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    // The user's token comes in `X-Vigil-Token` (nginx: `proxy_set_header X-Vigil-Token
    // $http_authorization`): `Authorization` carries the gateway's own credential for this route.
    let token = header("x-vigil-token")
        .map(|t| {
            t.strip_prefix("Bearer ")
                .or_else(|| t.strip_prefix("bearer "))
                .unwrap_or(&t)
                .trim()
                .to_owned()
        })
        .and_then(|jwt| jwt_iss_jti(&jwt));
    let req = CheckRequest {
        grant_id: header("x-vigil-grant"),
        session: if header("x-vigil-grant").is_none() {
            header("x-vigil-session").map(Value::String)
        } else {
            None
        },
        token: if header("x-vigil-grant").is_none() && header("x-vigil-session").is_none() {
            token
        } else {
            None
        },
        action: header("x-vigil-action"),
        resource: None,
    };
    // Cluster mode: a grant this instance does not hold is answered by the one that does.
    let found = lookup(&s, &req);
    if s.peers.is_some() && matches!(found, Ok(ref grants) if grants.is_empty()) {
        let call = crate::cluster::Call {
            segments: &["v1", "check", "auth_request"],
            query: None,
        };
        let known = |a: &crate::cluster::Answer| a.status == 200 || a.status == 403;
        match from_view(&s, &headers, &req, reqwest::Method::GET, &call, None, known).await {
            Some(ViewAnswer::Owner(answer)) => return answer,
            Some(ViewAnswer::Here(result, stale)) => {
                let mut response = auth_request_answer(&result);
                if let Some(lag) = stale {
                    response
                        .headers_mut()
                        .insert("x-vigil-view-lag", axum::http::HeaderValue::from(lag));
                }
                return response;
            }
            None => {}
        }
        let answer = ask_others(&s, &headers, reqwest::Method::GET, &call, None, |a| {
            a.status != 401
        })
        .await;
        if let Some(answer) = answer {
            return answer;
        }
    }
    let result = match found {
        Ok(grants) => judge(&grants, req.action.as_deref(), None, s.engine.clock().now()),
        Err(_) => check::check(&[], None, None, 0.0),
    };
    auth_request_answer(&result)
}

/// A check's result as nginx's `auth_request` reads it: 200 allow, 401 unknown, 403 denied, with
/// `X-Vigil-Status` and `X-Vigil-Reason`.
fn auth_request_answer(result: &CheckResult) -> Response {
    let status = match (result.decision, result.is_unknown()) {
        (Verdict::Allow, _) => StatusCode::OK,
        (Verdict::Deny, true) => StatusCode::UNAUTHORIZED,
        (Verdict::Deny, false) => StatusCode::FORBIDDEN,
    };
    let safe = |v: &str| {
        let cleaned: String = v
            .chars()
            .filter(|c| c.is_ascii() && !c.is_ascii_control())
            .take(200)
            .collect();
        axum::http::HeaderValue::from_str(&cleaned)
            .unwrap_or(axum::http::HeaderValue::from_static("-"))
    };
    let mut response = status.into_response();
    response
        .headers_mut()
        .insert("x-vigil-status", safe(&result.status));
    response
        .headers_mut()
        .insert("x-vigil-reason", safe(&result.reason));
    response
}

/// `iss` and `jti` of a compact JWT's payload, without verifying it.
fn jwt_iss_jti(jwt: &str) -> Option<crate::grant::TokenId> {
    use base64::Engine as _;
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    Some(crate::grant::TokenId {
        iss: claims.get("iss")?.as_str()?.to_owned(),
        jti: claims.get("jti")?.as_str()?.to_owned(),
    })
}

/// `GET /v1/deadletters`' page: its size, one stream's letters alone, and where the page before
/// ended. An unknown parameter is refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterParams {
    limit: Option<usize>,
    stream_id: Option<String>,
    after: Option<String>,
}

/// `POST /v1/deadletters/replay`'s one stream, if not all.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayParams {
    stream_id: Option<String>,
}

/// Most dead letters one answer lists.
const MAX_DEAD_LETTER_PAGE: usize = 1000;

/// The oldest dead letters (`limit`, 100 by default, at most 1 000) after the cursor `after` (a
/// page's `next`), of `stream_id` alone if given, and how many the stream — or all — hold
/// (`total`). Cluster mode: each instance holds the dead letters of the streams it delivers;
/// every instance's page after the same cursor is merged, and a replay replays them on every
/// instance.
pub async fn dead_letters(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
    q: Result<Query<DeadLetterParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(q) = match q {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()),
    };
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_DEAD_LETTER_PAGE);
    let after = match q.after.as_deref().map(DeadLetterPosition::from_cursor) {
        None => None,
        Some(Some(p)) => Some(p),
        Some(None) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "`after` is not a cursor this listing answered",
            )
        }
    };
    let streams = s.streams.clone();
    let stream = q.stream_id;
    let page = tokio::task::spawn_blocking(move || {
        streams.dead_letter_page(stream.as_deref(), after.as_ref(), limit)
    })
    .await;
    let (mut letters, mut total, mut more) = match page {
        Ok(Ok(page)) => (page.letters, page.total, page.more),
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    };
    let call = crate::cluster::Call {
        segments: &["v1", "deadletters"],
        query: raw.as_deref(),
    };
    if let Some(answers) = from_every_other(&s, &headers, reqwest::Method::GET, &call).await {
        for listed in answers.into_iter().flatten() {
            let listed: DeadLetterList = listed;
            more |= listed.next.is_some();
            letters.extend(listed.dead_letters);
            total = total.saturating_add(listed.total);
        }
        letters.sort_by_cached_key(DeadLetterPosition::of);
        more |= letters.len() > limit;
        letters.truncate(limit);
    }
    let next = more
        .then(|| {
            letters
                .last()
                .map(|d| DeadLetterPosition::of(d).to_cursor())
        })
        .flatten();
    Json(json!({"dead_letters": letters, "total": total, "next": next})).into_response()
}

/// Another instance's `/v1/deadletters` answer.
#[derive(Deserialize)]
struct DeadLetterList {
    dead_letters: Vec<DeadLetter>,
    #[serde(default)]
    total: usize,
    #[serde(default)]
    next: Option<String>,
}

/// Puts dead letters — `stream_id`'s alone if given — back into their streams' outboxes;
/// `skipped` counts those left because their stream was deleted or is disabled, `deferred` those
/// left because their stream's outbox is full (`delivery.max_outbox_per_stream`).
pub async fn replay_dead_letters(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
    q: Result<Query<ReplayParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(q) = match q {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()),
    };
    // Every dead letter's head read: off the runtime's threads.
    let (streams, max_outbox) = (s.streams.clone(), s.max_outbox_per_stream);
    let chosen = tokio::task::spawn_blocking(move || {
        streams.dead_letters_to_replay(q.stream_id.as_deref(), max_outbox)
    })
    .await;
    let replayed = match chosen {
        Ok(Ok(chosen)) => s.streams.replay_dead_letters(chosen).await,
        Ok(Err(e)) => Err(e),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    };
    let mut done = match replayed {
        Ok(done) => done,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string()),
    };
    let call = crate::cluster::Call {
        segments: &["v1", "deadletters", "replay"],
        query: raw.as_deref(),
    };
    if let Some(answers) = from_every_other(&s, &headers, reqwest::Method::POST, &call).await {
        for answer in answers.into_iter().flatten() {
            let answer: Replayed = answer;
            done.replayed = done.replayed.saturating_add(answer.replayed);
            done.skipped = done.skipped.saturating_add(answer.skipped);
            done.deferred = done.deferred.saturating_add(answer.deferred);
        }
    }
    Json(done).into_response()
}

pub async fn rotate_key(State(s): State<Arc<ApiState>>) -> Response {
    let identity = s.identity.clone();
    match tokio::task::spawn_blocking(move || identity.rotate()).await {
        Ok(Ok(kid)) => Json(json!({"kid": kid})).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, "keys", e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "keys", e.to_string()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalParams {
    /// Only signals recorded after this sequence number (the newest a reader already has; a
    /// single node's alone: a cluster's pages go by `cursor`).
    #[serde(default)]
    after: u64,
    /// The `cursor` of the page before: only signals recorded since it was answered.
    cursor: Option<String>,
    limit: Option<usize>,
}

/// Most signals one page of the feed lists.
const MAX_SIGNAL_PAGE: usize = 500;

/// `GET /v1/signals`: the signals recorded, newest first, each with its subject, event, times and
/// source: the console's live feed. On a single node, what intake records (pushed and polled
/// SETs; Kafka risk signals are not recorded there: their partition is their log); in cluster
/// mode, the signals topic's newest records, every partition's (every signal the cluster took,
/// risk feeds' included). `cursor` in the answer asks for the next page.
pub async fn signals(
    State(s): State<Arc<ApiState>>,
    q: Result<Query<SignalParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(q) = match q {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()),
    };
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_SIGNAL_PAGE);
    let bad_cursor = || {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "`cursor` is not one this feed answered",
        )
    };
    let page = match &s.signal_history {
        Some(history) => {
            let Some(cursor) = q
                .cursor
                .as_deref()
                .map_or(Some(BTreeMap::new()), parse_cursor)
            else {
                return bad_cursor();
            };
            let history = history.clone();
            tokio::task::spawn_blocking(move || {
                history
                    .newest(&cursor, limit)
                    .map(|(list, next)| (list, write_cursor(&next)))
                    .map_err(|e| PageError::Log(e.to_string()))
            })
            .await
        }
        None => {
            let after = match q.cursor.as_deref().map(str::parse::<u64>) {
                None => q.after,
                Some(Ok(after)) => after,
                Some(Err(_)) => return bad_cursor(),
            };
            let engine = s.engine.clone();
            tokio::task::spawn_blocking(move || {
                engine
                    .recorded_signals(after, limit)
                    .map(|list| {
                        let newest = list.iter().map(|s| s.seq).max().unwrap_or(after).max(after);
                        (list, newest.to_string())
                    })
                    .map_err(PageError::Engine)
            })
            .await
        }
    };
    let (list, cursor) = match page {
        Ok(Ok(page)) => page,
        Ok(Err(PageError::Engine(e))) => return engine_error(e),
        Ok(Err(PageError::Log(e))) => {
            return error(StatusCode::SERVICE_UNAVAILABLE, "log_unavailable", e)
        }
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    };
    let signals: Vec<Value> = list
        .into_iter()
        .map(|signal| {
            json!({
                "seq": signal.seq,
                "jti": signal.jti,
                "iss": signal.iss,
                "event_type": signal.event_type_name(),
                "event_uri": signal.event_uri,
                "subject": signal.subject,
                "subject_key": engine_key(&s.engine, &signal.subject),
                "event_time": signal.event_time,
                "received_at": signal.received_at_ms as f64 / 1000.0,
                "source": signal.source.label(),
            })
        })
        .collect();
    Json(json!({"signals": signals, "cursor": cursor})).into_response()
}

/// Why a page of the feed was not read.
enum PageError {
    Engine(EngineError),
    /// The signals topic could not be read back.
    Log(String),
}

/// A cluster feed's cursor: each partition's next offset, `partition:offset` joined by `,`.
fn write_cursor(next: &BTreeMap<i32, i64>) -> String {
    next.iter()
        .map(|(p, o)| format!("{p}:{o}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The cursor [`write_cursor`] wrote, or `None` if `text` is not one (at most 10 000 entries).
fn parse_cursor(text: &str) -> Option<BTreeMap<i32, i64>> {
    if text.is_empty() {
        return Some(BTreeMap::new());
    }
    let mut out = BTreeMap::new();
    for entry in text.split(',').take(10_001) {
        let (p, o) = entry.split_once(':')?;
        let (p, o) = (p.parse::<i32>().ok()?, o.parse::<i64>().ok()?);
        if p < 0 || o < 0 {
            return None;
        }
        out.insert(p, o);
    }
    (out.len() <= 10_000).then_some(out)
}

/// The context key a signal about `subject` goes to (what `/v1/subjects/{key}` explains).
fn engine_key(engine: &Engine, subject: &crate::subject::SubjectId) -> String {
    engine.routing_key(subject)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubjectSearch {
    /// Any identifier: an email address, a phone number, an opaque id, a key (`email:…`), or
    /// part of one.
    q: String,
    limit: Option<usize>,
}

/// `GET /v1/subjects?q=…`: the subjects an identifier names, `{subjects: [{key, principal}]}`
/// (up to `limit`, 20 by default, at most 100) — so nobody percent-encodes keys by hand.
pub async fn find_subjects(
    State(s): State<Arc<ApiState>>,
    q: Result<Query<SubjectSearch>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(q) = match q {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()),
    };
    if q.q.trim().is_empty() || q.q.len() > 512 {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "`q`: from 1 to 512 characters",
        );
    }
    let limit = q.limit.unwrap_or(20).clamp(1, 100);
    let engine = s.engine.clone();
    match tokio::task::spawn_blocking(move || engine.find_subjects(&q.q, limit)).await {
        Ok(found) => {
            let subjects: Vec<Value> = found
                .into_iter()
                .map(|(key, principal)| json!({"key": key, "principal": principal}))
                .collect();
            Json(json!({"subjects": subjects})).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

/// Outstanding SETs counted per stream, up to this many.
const OUTSTANDING_COUNTED: usize = 10_000;

/// `GET /v1/enforcement-points`: each configured enforcement point with its streams' delivery
/// state — method, endpoint, status, last verification, SETs outstanding (counted up to
/// 10 000), dead letters.
pub async fn enforcement_points(State(s): State<Arc<ApiState>>) -> Response {
    // Up to `delivery.max_dead_letters` rows and each stream's outbox keys read: off the
    // runtime's threads.
    let state = s.clone();
    match tokio::task::spawn_blocking(move || delivery_state(&state)).await {
        Ok(Ok(points)) => Json(json!({"enforcement_points": points})).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

/// Every enforcement point's streams with their delivery state (`/v1/enforcement-points`).
fn delivery_state(s: &ApiState) -> Result<Vec<Value>, crate::transmitter::streams::StreamError> {
    let dead = s.streams.dead_letter_counts()?;
    let mut points = Vec::new();
    for name in &s.enforcement_points {
        let mut streams = Vec::new();
        for stream in s.streams.list(name) {
            let (outstanding, more) = s
                .streams
                .outstanding_count(&stream.stream_id, OUTSTANDING_COUNTED)?;
            let dead_letters = dead.get(&stream.stream_id).copied().unwrap_or(0);
            streams.push(json!({
                "stream_id": stream.stream_id,
                "method": stream.delivery.method,
                "endpoint_url": stream.delivery.endpoint_url,
                "status": stream.status,
                "status_reason": stream.status_reason,
                "last_verification_at": stream.last_verification_at,
                "delivered_here": s.streams.delivers(&stream.stream_id),
                "outstanding": outstanding,
                "outstanding_more": more,
                "dead_letters": dead_letters,
            }));
        }
        points.push(json!({"name": name, "streams": streams}));
    }
    Ok(points)
}
