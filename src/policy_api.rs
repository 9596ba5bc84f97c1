//! The policy routes of Vigil's API (operator role):
//!
//! | route | answer |
//! |---|---|
//! | `GET /v1/policies` | 200 `{running: {version, files, rules}, shadow}` |
//! | `POST /v1/policies/reload[?force=true]` | 200 `{status: swapped, version, previous_version, tests_passed, changed, transitions, by_rule}` or `{status: unchanged}`; 422 `{status: refused, error, failed_tests?, impact?}` |
//! | `POST /v1/policies/replay` | 200 the [`Replay`](crate::engine::Replay) of the signals received since `since` (`24h`, RFC 3339 or seconds) through the live set and a candidate `{files, since, samples?}`; 422, 429 as impact; in cluster mode every instance replays the partitions of the signals topic it owns and the answers are added up (503 `replay_incomplete` when a partition was not replayed) |
//! | `PUT /v1/policies/shadow` | 201 the shadow set loaded beside the live one `{files: {name: yaml}}` (replacing any); 422 a set that does not compile or lint |
//! | `GET /v1/policies/shadow` | 200 `{version, loaded_at, files, rules, divergences}`; 404 none loaded |
//! | `DELETE /v1/policies/shadow` | 204 discarded; 404 none loaded |
//! | `POST /v1/policies/shadow/promote[?force=true]` | as reload: the shadow set's files written to the policy directory and reloaded |
//! | `GET /v1/policies/shadow/divergences` | 200 `{shadow_version, divergences, next, counts}` (filters `grant`, `subject`, `rule`, `direction`; paging `before`, `limit`) |
//! | `POST /v1/policies/impact` | 200 the [`Impact`](crate::engine::Impact) of a candidate set `{files: {name: yaml}, samples?}`; 422 a candidate that does not compile or lint; 429 while another preview runs |

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::ApiState;
use crate::engine::shadow::{Divergence, DivergenceCounts, DivergenceQuery};
use crate::error_body::{error, refusal};
use crate::policy::is_rule_file;
use crate::reload::{PreviewError, ReloadOutcome};

/// A set's rule files' text by name.
fn sources_of(set: &crate::policy::PolicySet) -> serde_json::Map<String, Value> {
    set.sources
        .iter()
        .map(|(name, text)| (name.clone(), Value::String(text.clone())))
        .collect()
}

/// A set's rules as written, each with its file.
fn rules_of(set: &crate::policy::PolicySet) -> Vec<Value> {
    set.rules
        .iter()
        .map(|r| {
            let mut rule = serde_json::to_value(&r.spec).unwrap_or(Value::Null);
            rule["file"] = json!(r.file);
            rule
        })
        .collect()
}

/// The running set (its version, files and rules as written) and the shadow set.
pub async fn policies(State(s): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    let set = s.engine.policy();
    let rules = rules_of(&set);
    Json(json!({
        "running": {"version": set.version, "files": set.files, "rules": rules,
                    "sources": sources_of(&set)},
        "shadow": cluster_summary(&s, &headers).await,
    }))
    .into_response()
}

/// [`shadow_summary`] with, in cluster mode, every instance's divergences counted.
async fn cluster_summary(s: &ApiState, headers: &HeaderMap) -> Value {
    let mut summary = shadow_summary(s);
    if summary.is_null() {
        return summary;
    }
    let call = crate::cluster::Call {
        segments: &["v1", "policies", "shadow"],
        query: None,
    };
    if let Some(answers) =
        crate::api::to_every_other(s, headers, reqwest::Method::GET, &call, None).await
    {
        let mut counts = s.engine.divergences().counts();
        for (_, answer) in answers {
            if let Ok((200, body)) = answer {
                if let Ok(theirs) = serde_json::from_slice::<ShadowSummary>(&body) {
                    counts.add(&theirs.divergences);
                }
            }
        }
        summary["divergences"] = json!(counts);
    }
    summary
}

/// Another instance's `GET /v1/policies/shadow`, as far as it is merged.
#[derive(Deserialize)]
struct ShadowSummary {
    divergences: DivergenceCounts,
}

/// Another instance's `GET /v1/policies/shadow/divergences`.
#[derive(Deserialize)]
struct DivergenceList {
    divergences: Vec<Divergence>,
    counts: DivergenceCounts,
}

/// Cluster mode: what every other instance answered a shadow-set call passed on to it,
/// `[{instance, status}]` (`status` absent when it did not answer), or `None` outside it.
async fn on_every_other(
    s: &ApiState,
    headers: &HeaderMap,
    method: reqwest::Method,
    call: &crate::cluster::Call<'_>,
    body: Option<Vec<u8>>,
) -> Option<Vec<Value>> {
    let answers = crate::api::to_every_other(s, headers, method, call, body).await?;
    Some(
        answers
            .into_iter()
            .map(|(instance, answer)| match answer {
                Ok((status, _)) => json!({"instance": instance, "status": status}),
                Err(e) => json!({"instance": instance, "error": e}),
            })
            .collect(),
    )
}

/// The shadow set's version, files, rules and divergence counts; `null` when none is loaded.
fn shadow_summary(s: &ApiState) -> Value {
    let Some(shadow) = s.engine.shadow() else {
        return Value::Null;
    };
    json!({
        "version": shadow.set.version,
        "loaded_at": shadow.loaded_at,
        "files": shadow.set.files,
        "sources": sources_of(&shadow.set),
        "rules": rules_of(&shadow.set),
        "divergences": s.engine.divergences().counts(),
    })
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
    (reload_status(&outcome), Json(outcome)).into_response()
}

/// A reload's (or promotion's) status code: 422 when refused.
fn reload_status(outcome: &ReloadOutcome) -> StatusCode {
    match outcome {
        ReloadOutcome::Refused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::OK,
    }
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

/// A candidate set's rule files, checked: 1 to [`MAX_FILES`], each a rule file name with no
/// directory. In file-name order: the order a policy directory loads in.
fn candidate_files(files: BTreeMap<String, String>) -> Result<Vec<(String, String)>, String> {
    if files.is_empty() || files.len() > MAX_FILES {
        return Err(format!("`files`: from 1 to {MAX_FILES} rule files"));
    }
    if let Some(name) = files
        .keys()
        .find(|n| !is_rule_file(n) || n.contains(['/', '\\']) || n.starts_with('.'))
    {
        return Err(format!(
            "`files`: `{name}` is not a rule file name (`*.yaml`, no directory, not a test)"
        ));
    }
    Ok(files.into_iter().collect())
}

pub async fn impact(
    State(s): State<Arc<ApiState>>,
    body: Result<Json<ImpactRequest>, JsonRejection>,
) -> Response {
    let request = match body {
        Ok(Json(r)) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()),
    };
    let sources = match candidate_files(request.files) {
        Ok(sources) => sources,
        Err(why) => return error(StatusCode::BAD_REQUEST, "invalid_request", why),
    };
    let samples = request.samples.unwrap_or(5).min(MAX_SAMPLES);
    let reloader = s.reloader.clone();
    match tokio::task::spawn_blocking(move || reloader.impact(&sources, samples)).await {
        Ok(Ok(impact)) => Json(impact).into_response(),
        Ok(Err(e)) => preview_failed(e),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "the preview did not complete",
        ),
    }
}

/// A candidate set to replay the recorded signals of a window through.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// Rule files by name (`*.yaml`), as in a policy directory.
    files: BTreeMap<String, String>,
    /// The window's start: a duration back from now (`90m`, `24h`, `7d`), an RFC 3339 time or
    /// seconds since the epoch.
    since: String,
    /// Differences listed per bucket (default 5, at most [`MAX_SAMPLES`]).
    #[serde(default)]
    samples: Option<usize>,
}

/// The longest window a replay reaches back: a year.
const MAX_WINDOW_SECS: f64 = 366.0 * 86_400.0;

/// A window's start (seconds since the epoch) from `since`, as [`ReplayRequest::since`] reads it,
/// relative to `now`. Never in the future, never more than [`MAX_WINDOW_SECS`] back.
pub fn window_start(since: &str, now: f64) -> Result<f64, String> {
    let units = [('s', 1.0), ('m', 60.0), ('h', 3600.0), ('d', 86_400.0)];
    let relative = units.iter().find_map(|(unit, secs)| {
        let n: u32 = since.strip_suffix(*unit)?.parse().ok()?;
        Some(now - f64::from(n) * secs)
    });
    let start = match relative {
        Some(start) => start,
        None => crate::api::parse_time("since", since).map_err(|_| {
            format!(
                "`since`: `{since}` is neither a duration back from now (`90m`, `24h`, `7d`), \
                 an RFC 3339 time nor seconds since the epoch"
            )
        })?,
    };
    if start > now {
        return Err(format!("`since`: `{since}` is in the future"));
    }
    Ok(start.max(now - MAX_WINDOW_SECS))
}

pub async fn replay(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Result<Json<ReplayRequest>, JsonRejection>,
) -> Response {
    let request = match body {
        Ok(Json(r)) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()),
    };
    let since = match window_start(&request.since, s.engine.clock().now()) {
        Ok(since) => since,
        Err(why) => return error(StatusCode::BAD_REQUEST, "invalid_request", why),
    };
    let samples = request.samples.unwrap_or(5).min(MAX_SAMPLES);
    // Cluster mode: every other instance replays the partitions it owns over the same window
    // (its start passed on as seconds, not as `24h` read again later).
    let passed_on = serde_json::to_vec(
        &json!({"files": request.files, "since": format!("{since:.3}"), "samples": samples}),
    )
    .ok();
    let sources = match candidate_files(request.files) {
        Ok(sources) => sources,
        Err(why) => return error(StatusCode::BAD_REQUEST, "invalid_request", why),
    };
    let reloader = s.reloader.clone();
    let history = s.signal_history.clone();
    let mine = tokio::task::spawn_blocking(move || {
        let history = history.as_deref().map(|h| h as &dyn crate::engine::History);
        reloader.replay(&sources, since, samples, history)
    });
    let call = crate::cluster::Call {
        segments: &["v1", "policies", "replay"],
        query: None,
    };
    let others = crate::api::to_every_other_within(
        &s,
        &headers,
        reqwest::Method::POST,
        &call,
        passed_on,
        Some(REPLAY_WAIT),
    );
    let (mine, others) = tokio::join!(mine, others);
    let mut replay = match mine {
        Ok(Ok(replay)) => replay,
        Ok(Err(e)) => return preview_failed(e),
        Err(_) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the replay did not complete",
            )
        }
    };
    if let Some(others) = others {
        for (instance, answer) in others {
            match answer {
                Ok((200, body)) => match serde_json::from_slice(&body) {
                    Ok(theirs) => replay.absorb(theirs, samples),
                    Err(e) => {
                        tracing::warn!(error = %e, %instance, "a replay answer did not parse")
                    }
                },
                Ok((429, _)) => return preview_failed(PreviewError::Busy),
                Ok((status, body)) => tracing::warn!(status, %instance,
                    body = %String::from_utf8_lossy(&body), "an instance's replay failed"),
                Err(_) => {}
            }
        }
        // Every partition replayed, or no answer: a part would read as "nothing changed" there.
        let count = s.ownership.as_ref().map_or(0, |o| o.partitions());
        let missing: Vec<i32> = (0..count)
            .filter(|p| replay.partitions.binary_search(p).is_err())
            .collect();
        if !missing.is_empty() {
            return refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "replay_incomplete",
                &format!(
                    "no instance replayed partitions {missing:?} of the signals topic (their \
                     owner did not answer, or they are moving): ask again"
                ),
                std::time::Duration::from_secs(5),
            );
        }
    }
    Json(replay).into_response()
}

/// How long the instance asked waits for the others' replays (each a window of its own
/// partitions, as long as the asked instance's).
const REPLAY_WAIT: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// The answer to a preview or replay that did not run.
fn preview_failed(e: PreviewError) -> Response {
    match e {
        PreviewError::Invalid(refused) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_policy",
            refused.error,
        ),
        PreviewError::Busy => refusal(
            StatusCode::TOO_MANY_REQUESTS,
            "preview_running",
            &PreviewError::Busy.to_string(),
            std::time::Duration::from_secs(5),
        ),
        PreviewError::Engine(e) => crate::api::engine_error(e),
    }
}

/// A candidate set to run as the shadow set.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowRequest {
    /// Rule files by name (`*.yaml`), as in a policy directory.
    files: BTreeMap<String, String>,
}

/// `PUT /v1/policies/shadow`: loads a candidate set beside the live one (replacing any shadow
/// set, and forgetting its divergences) — in cluster mode on every instance, each answering for
/// its own partitions (`instances` lists what the others answered).
pub async fn load_shadow(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Result<Json<ShadowRequest>, JsonRejection>,
) -> Response {
    let request = match body {
        Ok(Json(r)) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()),
    };
    let passed_on = serde_json::to_vec(&json!({"files": request.files})).ok();
    let sources = match candidate_files(request.files) {
        Ok(sources) => sources,
        Err(why) => return error(StatusCode::BAD_REQUEST, "invalid_request", why),
    };
    let reloader = s.reloader.clone();
    match tokio::task::spawn_blocking(move || reloader.load_shadow(sources)).await {
        Ok(Ok(_)) => {
            let mut answer = shadow_summary(&s);
            let call = crate::cluster::Call {
                segments: &["v1", "policies", "shadow"],
                query: None,
            };
            if let Some(others) =
                on_every_other(&s, &headers, reqwest::Method::PUT, &call, passed_on).await
            {
                answer["instances"] = json!(others);
            }
            (StatusCode::CREATED, Json(answer)).into_response()
        }
        Ok(Err(refused)) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_policy",
            refused.error,
        ),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "loading the shadow set did not complete",
        ),
    }
}

/// `GET /v1/policies/shadow` (in cluster mode, every instance's divergences counted).
pub async fn shadow(State(s): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    match cluster_summary(&s, &headers).await {
        Value::Null => no_shadow(),
        summary => Json(summary).into_response(),
    }
}

fn no_shadow() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no_shadow_set",
        "no shadow policy set is loaded (PUT /v1/policies/shadow loads one)",
    )
}

/// `DELETE /v1/policies/shadow`: drops the shadow set and its divergences (in cluster mode, on
/// every instance).
pub async fn discard_shadow(State(s): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    let dropped = s.reloader.discard_shadow();
    let call = crate::cluster::Call {
        segments: &["v1", "policies", "shadow"],
        query: None,
    };
    on_every_other(&s, &headers, reqwest::Method::DELETE, &call, None).await;
    if dropped {
        StatusCode::NO_CONTENT.into_response()
    } else {
        no_shadow()
    }
}

/// `POST /v1/policies/shadow/promote[?force=true]`: the shadow set's files replace the policy
/// directory's rule files and the directory is reloaded (its tests run; `require_preview`
/// applies unless forced) — in cluster mode on every instance, each its own directory.
/// Answers like `POST /v1/policies/reload`, with `instances` listing the others' statuses.
pub async fn promote_shadow(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    params: Result<Query<ReloadParams>, QueryRejection>,
) -> Response {
    let force = match params {
        Ok(Query(p)) => p.force,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()),
    };
    let reloader = s.reloader.clone();
    let outcome = match tokio::task::spawn_blocking(move || reloader.promote_shadow(force)).await {
        Ok(None) => return no_shadow(),
        Ok(Some(outcome)) => outcome,
        Err(_) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the promotion did not complete",
            )
        }
    };
    let status = reload_status(&outcome);
    let mut answer = json!(outcome);
    // The others promote only what this one did: a refused promotion stays refused everywhere.
    if status == StatusCode::OK {
        let query = format!("force={force}");
        let call = crate::cluster::Call {
            segments: &["v1", "policies", "shadow", "promote"],
            query: Some(&query),
        };
        if let Some(others) = on_every_other(&s, &headers, reqwest::Method::POST, &call, None).await
        {
            answer["instances"] = json!(others);
        }
    }
    (status, Json(answer)).into_response()
}

/// `GET /v1/policies/shadow/divergences`: the held divergences, newest first, filtered by
/// `grant`, `subject`, `rule`, `direction`; paged with `before` (the previous page's `next`). In
/// cluster mode every instance's newest are merged (the page is the newest `limit` of them all,
/// `next` this instance's cursor) and the counts are the cluster's.
pub async fn divergences(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
    query: Result<Query<DivergenceQuery>, QueryRejection>,
) -> Response {
    let query = match query {
        Ok(Query(q)) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()),
    };
    let Some(shadow) = s.engine.shadow() else {
        return no_shadow();
    };
    let (mut divergences, next) = s.engine.divergences().list(&query);
    let mut counts = s.engine.divergences().counts();
    let call = crate::cluster::Call {
        segments: &["v1", "policies", "shadow", "divergences"],
        query: raw.as_deref(),
    };
    if let Some(answers) =
        crate::api::to_every_other(&s, &headers, reqwest::Method::GET, &call, None).await
    {
        for (_, answer) in answers {
            if let Ok((200, body)) = answer {
                match serde_json::from_slice::<DivergenceList>(&body) {
                    Ok(theirs) => {
                        divergences.extend(theirs.divergences);
                        counts.add(&theirs.counts);
                    }
                    Err(e) => tracing::warn!(error = %e, "an instance's divergences did not parse"),
                }
            }
        }
        divergences.sort_by(|a, b| b.time.total_cmp(&a.time));
        divergences.truncate(
            query
                .limit
                .unwrap_or(100)
                .clamp(1, crate::engine::shadow::MAX_LIMIT),
        );
    }
    Json(json!({
        "shadow_version": shadow.set.version,
        "divergences": divergences,
        "next": next,
        "counts": counts,
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::window_start;

    #[test]
    fn a_window_starts_back_from_now_at_a_time_or_never_in_the_future() {
        let now = 1_800_000_000.0;
        assert_eq!(window_start("24h", now), Ok(now - 86_400.0));
        assert_eq!(window_start("90m", now), Ok(now - 5_400.0));
        assert_eq!(window_start("7d", now), Ok(now - 7.0 * 86_400.0));
        // 1 800 000 000 s is 2027-01-15T08:00:00Z.
        assert_eq!(
            window_start("2027-01-15T08:00:00Z", now + 3600.0),
            Ok(1_800_000_000.0)
        );
        assert_eq!(window_start("1799990000", now), Ok(1_799_990_000.0));
        // A year back at most; never ahead of now; nothing else.
        assert_eq!(window_start("9999d", now), Ok(now - 366.0 * 86_400.0));
        assert!(window_start("5m", now - 1.0).is_ok());
        assert!(window_start("2099-01-01T00:00:00Z", now).is_err());
        assert!(window_start("-5m", now).is_err());
        assert!(window_start("yesterday", now).is_err());
    }
}
