//! The HTTP surface of Vigil as a transmitter: SSF §8 stream management (status codes exactly as
//! SSF §8 gives them: create 201, read 200 (an array without `stream_id`), update/replace 200, delete
//! 204, status 200, add subject 200, remove subject 204, verify 204 / 429) and RFC 8936 poll delivery.
//! Every call needs an enforcement point's bearer token and reaches only that point's streams.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use subtle::ConstantTimeEq;

use super::emit;
use super::streams::{new_stream, parse_delivery, string_list, Stream, StreamError, StreamStore};
use super::Identity;
use crate::events::StreamStatus;

/// Cluster mode: poll and SSE calls for a stream another instance delivers are answered by that
/// instance (it holds the stream's outbox), after this one authenticated the caller and counted
/// the call against its budgets.
pub trait StreamForwarder: Send + Sync {
    /// Passes the call on to `stream`'s deliverer and returns its answer as it arrives (an event
    /// stream included); a call that was itself forwarded here is refused (421), never sent on.
    fn forward(
        &self,
        stream: &str,
        headers: &HeaderMap,
        call: ForwardedCall,
    ) -> futures_util::future::BoxFuture<'static, Response>;
}

/// A poll or SSE call as it is passed on.
#[derive(Debug)]
pub struct ForwardedCall {
    /// SSE (`GET /ssf/sse/{id}`) rather than poll (`POST /ssf/poll/{id}`).
    pub sse: bool,
    pub body: Vec<u8>,
    /// How long the answer may take (a long poll's wait and then some; an event stream's life).
    pub timeout: Duration,
}

/// An enforcement point allowed to manage streams.
#[derive(Debug, Clone)]
pub struct EnforcementPoint {
    pub name: String,
    /// `auth::digest` of its bearer token (what each request's token is compared with).
    pub token_digest: [u8; 32],
    pub audience: String,
}

pub struct MgmtState {
    pub issuer: String,
    pub points: Vec<EnforcementPoint>,
    pub streams: Arc<StreamStore>,
    pub identity: Arc<Identity>,
    /// How long a long poll waits for SETs.
    pub poll_timeout: Duration,
    /// Set at shutdown: long polls answer at once and SSE responses end, so the server's graceful
    /// shutdown is not held open by subscribers.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Long polls and SSE responses open at once (`limits.max_streaming_connections`); each holds
    /// a permit for as long as it is open.
    pub connections: Arc<tokio::sync::Semaphore>,
    /// The same, per enforcement point (by configured name): one point holding its maximum of
    /// unread SSE responses gets 503, the others do not notice.
    pub connections_per_point: HashMap<String, Arc<tokio::sync::Semaphore>>,
    /// Streams one enforcement point may have.
    pub max_streams_per_point: usize,
    /// Subjects one stream may list.
    pub max_subjects_per_stream: usize,
    /// Where push endpoints may point.
    pub destinations: crate::outbound::Destinations,
    /// Requests per second per enforcement point.
    pub limiter: crate::limits::RateLimiter,
    /// Cluster mode: where poll and SSE calls for streams delivered elsewhere go.
    pub forwarder: Option<Arc<dyn StreamForwarder>>,
}

/// How long an event stream passed on to another instance may stay open.
const FORWARDED_SSE_LIFE: Duration = Duration::from_secs(24 * 3600);

/// A refused management or poll request; becomes its HTTP answer.
#[derive(Debug)]
pub enum MgmtError {
    Unauthorized,
    BadRequest(String),
    Stream(StreamError),
    Internal(String),
    /// Too many long polls and SSE responses open: 503 with `Retry-After`.
    Busy,
    /// Over a budget of the caller's own (rate, streams, subjects): 429 with `Retry-After`.
    TooMany {
        what: &'static str,
        wait: Duration,
    },
}

impl From<StreamError> for MgmtError {
    fn from(e: StreamError) -> Self {
        MgmtError::Stream(e)
    }
}

impl IntoResponse for MgmtError {
    fn into_response(self) -> Response {
        match self {
            MgmtError::Unauthorized => {
                let mut r = error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
                r
            }
            MgmtError::BadRequest(m) => error(StatusCode::BAD_REQUEST, m),
            MgmtError::Internal(m) => error(StatusCode::INTERNAL_SERVER_ERROR, m),
            MgmtError::Stream(e) => stream_error(e),
            MgmtError::Busy => crate::error_body::refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "too many long polls and event streams are open; retry later",
                Duration::from_secs(1),
            ),
            MgmtError::TooMany { what, wait } => crate::error_body::refusal(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                what,
                wait,
            ),
        }
    }
}

type Reply = Result<Response, MgmtError>;

fn bad(m: impl Into<String>) -> MgmtError {
    MgmtError::BadRequest(m.into())
}

fn error(status: StatusCode, description: impl Into<String>) -> Response {
    crate::error_body::error(status, crate::error_body::code_for(status), description)
}

fn stream_error(e: StreamError) -> Response {
    match e {
        StreamError::NotFound => error(StatusCode::NOT_FOUND, e.to_string()),
        StreamError::Invalid(m) => error(StatusCode::BAD_REQUEST, m),
        StreamError::TooSoon => error(StatusCode::TOO_MANY_REQUESTS, e.to_string()),
        StreamError::TooManySubjects(_) => crate::error_body::refusal(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            &e.to_string(),
            Duration::from_secs(60),
        ),
        StreamError::Storage(m) => error(StatusCode::INTERNAL_SERVER_ERROR, m),
    }
}

/// Permits for one open long poll or SSE response: the enforcement point's own, then the
/// shared cap's; `Busy` when either is full. Held for as long as the response is open.
type StreamingPermit = (
    tokio::sync::OwnedSemaphorePermit,
    tokio::sync::OwnedSemaphorePermit,
);

fn connection(s: &MgmtState, ep: &EnforcementPoint) -> Result<StreamingPermit, MgmtError> {
    let refused = |scope: &'static str| {
        metrics::counter!(crate::telemetry::STREAMING_REFUSED, "scope" => scope).increment(1);
        MgmtError::Busy
    };
    let own = s
        .connections_per_point
        .get(&ep.name)
        .ok_or(MgmtError::Busy)?
        .clone()
        .try_acquire_owned()
        .map_err(|_| refused("enforcement_point"))?;
    let shared = s
        .connections
        .clone()
        .try_acquire_owned()
        .map_err(|_| refused("all"))?;
    Ok((own, shared))
}

/// The enforcement point a bearer token belongs to, within its request rate. Tokens are compared
/// as SHA-256 digests in constant time against every point, so neither a token's length nor its
/// position leaks.
fn authenticate<'a>(
    s: &'a MgmtState,
    headers: &HeaderMap,
) -> Result<&'a EnforcementPoint, MgmtError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::auth::bearer)
        .unwrap_or_default();
    if token.is_empty() {
        return Err(MgmtError::Unauthorized);
    }
    let presented = crate::auth::digest(token);
    let mut found = None;
    for p in &s.points {
        if bool::from(presented.ct_eq(&p.token_digest)) {
            found = Some(p);
        }
    }
    let ep = found.ok_or(MgmtError::Unauthorized)?;
    s.limiter
        .acquire(&ep.name)
        .map_err(|wait| MgmtError::TooMany {
            what: "request rate over this enforcement point's limit",
            wait,
        })?;
    Ok(ep)
}

/// Refuses a push endpoint the destination policy does not allow (`[outbound]`).
fn check_delivery(s: &MgmtState, stream: &Stream) -> Result<(), MgmtError> {
    if stream.delivery.method != super::streams::PUSH {
        return Ok(());
    }
    let url = stream.delivery.endpoint_url.as_deref().unwrap_or_default();
    s.destinations
        .check_url(url)
        .map(|_| ())
        .map_err(|e| bad(format!("`delivery.endpoint_url`: {e}")))
}

fn object(body: &[u8]) -> Result<Map<String, Value>, MgmtError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(bad("the body must be a JSON object")),
    }
}

fn stream_id(body: &Map<String, Value>) -> Result<String, MgmtError> {
    body.get("stream_id")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| bad("`stream_id` is required"))
}

/// The caller, and the body and `stream_id` of a request about one of its streams.
fn stream_request<'a>(
    s: &'a MgmtState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(&'a EnforcementPoint, Map<String, Value>, String), MgmtError> {
    let ep = authenticate(s, headers)?;
    let body = object(body)?;
    let id = stream_id(&body)?;
    Ok((ep, body, id))
}

/// The `stream_id` a query must carry.
fn required_id(q: StreamQuery) -> Result<String, MgmtError> {
    q.stream_id.ok_or_else(|| bad("`stream_id` is required"))
}

fn no_store(v: Value) -> Response {
    ([(header::CACHE_CONTROL, "no-store")], Json(v)).into_response()
}

/// `POST /ssf/streams`: create (201).
pub async fn create(
    State(s): State<Arc<MgmtState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Reply {
    let ep = authenticate(&s, &headers)?;
    let body = object(&body)?;
    let stream = new_stream(
        &body,
        &ep.name,
        &s.issuer,
        &ep.audience,
        s.issuer.trim_end_matches('/'),
    )?;
    check_delivery(&s, &stream)?;
    if s.streams.list(&ep.name).len() >= s.max_streams_per_point {
        return Err(MgmtError::TooMany {
            what: "this enforcement point has as many streams as it may; delete one first",
            wait: Duration::from_secs(60),
        });
    }
    let config = stream.config_json();
    s.streams.put(stream).await?;
    Ok((StatusCode::CREATED, Json(config)).into_response())
}

#[derive(Deserialize)]
pub struct StreamQuery {
    stream_id: Option<String>,
}

/// `GET /ssf/streams[?stream_id=]`: one config, or an array of all the caller's streams.
pub async fn read(
    State(s): State<Arc<MgmtState>>,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
) -> Reply {
    let ep = authenticate(&s, &headers)?;
    match q.stream_id {
        Some(id) => Ok(no_store(s.streams.get(&ep.name, &id)?.config_json())),
        None => Ok(no_store(Value::Array(
            s.streams
                .list(&ep.name)
                .iter()
                .map(Stream::config_json)
                .collect(),
        ))),
    }
}

/// `PATCH /ssf/streams` (update: absent fields unchanged) and `PUT /ssf/streams` (replace: absent
/// receiver fields removed). Transmitter-supplied fields, if sent, must match.
async fn change(s: &MgmtState, headers: &HeaderMap, body: &[u8], replace: bool) -> Reply {
    let (ep, body, id) = stream_request(s, headers, body)?;
    let mut st = s.streams.get(&ep.name, &id)?;
    let current = st.config_json();
    for field in [
        "iss",
        "aud",
        "events_supported",
        "events_delivered",
        "min_verification_interval",
    ] {
        if let Some(v) = body.get(field) {
            if Some(v) != current.get(field) {
                return Err(bad(format!(
                    "`{field}` is supplied by the transmitter and cannot change"
                )));
            }
        }
    }
    if replace || body.contains_key("events_requested") {
        st.events_requested = string_list(body.get("events_requested"))?;
    }
    if replace || body.contains_key("description") {
        st.description = body
            .get("description")
            .and_then(Value::as_str)
            .map(str::to_owned);
    }
    if replace || body.contains_key("delivery") {
        st.delivery = parse_delivery(body.get("delivery"), s.issuer.trim_end_matches('/'), &id)?;
        check_delivery(s, &st)?;
    }
    let config = st.config_json();
    s.streams.put(st).await?;
    Ok(Json(config).into_response())
}

pub async fn update(
    State(s): State<Arc<MgmtState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Reply {
    change(&s, &headers, &body, false).await
}

pub async fn replace(
    State(s): State<Arc<MgmtState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Reply {
    change(&s, &headers, &body, true).await
}

/// `DELETE /ssf/streams?stream_id=`: 204.
pub async fn delete(
    State(s): State<Arc<MgmtState>>,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
) -> Reply {
    let ep = authenticate(&s, &headers)?;
    let id = required_id(q)?;
    s.streams.delete(&ep.name, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn status_json(st: &Stream) -> Value {
    let mut v = json!({"stream_id": st.stream_id, "status": st.status});
    if let Some(r) = &st.status_reason {
        v["reason"] = json!(r);
    }
    v
}

/// `GET /ssf/status?stream_id=`.
pub async fn read_status(
    State(s): State<Arc<MgmtState>>,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
) -> Reply {
    let ep = authenticate(&s, &headers)?;
    let id = required_id(q)?;
    Ok(Json(status_json(&s.streams.get(&ep.name, &id)?)).into_response())
}

/// `POST /ssf/status {stream_id, status, reason?}`: 200 with the new status. Disabling drops what
/// the stream held; pausing holds SETs until it is enabled again.
pub async fn update_status(
    State(s): State<Arc<MgmtState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Reply {
    let (ep, body, id) = stream_request(&s, &headers, &body)?;
    let status = match body
        .get("status")
        .and_then(Value::as_str)
        .map(StreamStatus::parse)
    {
        Some(Ok(st)) => st,
        _ => return Err(bad("`status` must be enabled, paused or disabled")),
    };
    let mut st = s.streams.get(&ep.name, &id)?;
    st.status = status.clone();
    st.status_reason = body
        .get("reason")
        .and_then(Value::as_str)
        .map(str::to_owned);
    if status == StreamStatus::Disabled {
        s.streams.drop_outbox(&id).await?;
    }
    let reply = status_json(&st);
    // The receiver hears of the change on the stream itself (SSF §8.1.5); a disabled stream holds
    // nothing, so it gets none.
    let updated = if status == StreamStatus::Disabled {
        None
    } else {
        Some(emit::stream_updated(&s.identity, &st).map_err(MgmtError::Internal)?)
    };
    s.streams.put(st).await?;
    if let Some(out) = updated {
        s.streams
            .enqueue(vec![(id.clone(), out)], Vec::new())
            .await?;
    }
    s.streams.notifier(&id).notify_waiters();
    Ok(Json(reply).into_response())
}

async fn subject_op(s: &MgmtState, headers: &HeaderMap, body: &[u8], add: bool) -> Reply {
    let (ep, body, id) = stream_request(s, headers, body)?;
    let Some(subject) = body.get("subject") else {
        return Err(bad("`subject` is required"));
    };
    if let Err(e) = crate::subject::SubjectId::from_json(subject, true) {
        return Err(bad(format!("`subject`: {e}")));
    }
    s.streams.get(&ep.name, &id)?;
    if add {
        s.streams
            .add_subject(&id, subject, s.max_subjects_per_stream)
            .await?;
    } else {
        s.streams.remove_subject(&id, subject).await?;
    }
    Ok(if add {
        StatusCode::OK.into_response()
    } else {
        StatusCode::NO_CONTENT.into_response()
    })
}

/// `POST /ssf/subjects:add`: 200.
pub async fn add_subject(
    State(s): State<Arc<MgmtState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Reply {
    subject_op(&s, &headers, &body, true).await
}

/// `POST /ssf/subjects:remove`: 204.
pub async fn remove_subject(
    State(s): State<Arc<MgmtState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Reply {
    subject_op(&s, &headers, &body, false).await
}

/// `POST /ssf/verify {stream_id, state?}`: 204, then a verification SET on the stream; 429 when
/// asked faster than `min_verification_interval`.
pub async fn verify(
    State(s): State<Arc<MgmtState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Reply {
    let (ep, body, id) = stream_request(&s, &headers, &body)?;
    let mut st = s.streams.get(&ep.name, &id)?;
    let now = s.streams.clock().now();
    if st
        .last_verification_at
        .is_some_and(|t| now - t < st.min_verification_interval as f64)
    {
        return Err(StreamError::TooSoon.into());
    }
    st.last_verification_at = Some(now);
    let state = body.get("state").and_then(Value::as_str);
    let out = match emit::verification(&s.identity, &st, state) {
        Ok(o) => o,
        Err(e) => return Err(MgmtError::Internal(e)),
    };
    s.streams.put(st).await?;
    s.streams.enqueue(vec![(id, out)], Vec::new()).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /ssf/poll/{stream_id}` (RFC 8936): acknowledges `ack` and `setErrs`, then returns up to
/// `maxEvents` outstanding SETs as `{"sets": {jti: set}, "moreAvailable": bool}`; long-polls unless
/// `returnImmediately`. Unacknowledged SETs are delivered again on the next poll. A paused stream
/// returns nothing (it holds its SETs until enabled).
pub async fn poll(
    State(s): State<Arc<MgmtState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Reply {
    let ep = authenticate(&s, &headers)?;
    let raw = body;
    let body = if raw.is_empty() {
        Map::new()
    } else {
        object(&raw)?
    };
    s.streams.get(&ep.name, &id)?;
    let _open = connection(&s, ep)?;
    if let Some(forwarder) = s.forwarder.as_ref().filter(|_| !s.streams.delivers(&id)) {
        let call = ForwardedCall {
            sse: false,
            body: raw.to_vec(),
            timeout: s.poll_timeout + Duration::from_secs(10),
        };
        return Ok(forwarder.forward(&id, &headers, call).await);
    }
    let mut done: Vec<String> =
        string_list(body.get("ack")).map_err(|_| bad("`ack` must be an array of jti strings"))?;
    if let Some(errs) = body.get("setErrs").and_then(Value::as_object) {
        for (jti, err) in errs {
            let code = err
                .get("err")
                .and_then(Value::as_str)
                .and_then(crate::set::ErrorCode::parse)
                .map_or("other", crate::set::ErrorCode::as_str);
            tracing::warn!(stream = %id, jti = %crate::outbound::excerpt(jti), err = code,
                "enforcement point rejected a SET");
            metrics::counter!(crate::telemetry::SETS_REJECTED_BY_RECEIVER).increment(1);
            done.push(jti.clone());
        }
    }
    s.streams.acknowledge(&id, &done, "poll").await?;
    let max = body
        .get("maxEvents")
        .and_then(Value::as_u64)
        .map_or(usize::MAX, |m| m as usize);
    let immediate = body
        .get("returnImmediately")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if max == 0 {
        return Ok(Json(json!({"sets": {}})).into_response());
    }
    let deadline = tokio::time::Instant::now() + s.poll_timeout;
    loop {
        let notified = s.streams.notifier(&id);
        let wait = notified.notified();
        let st = s.streams.get(&ep.name, &id)?;
        let (sets, more) = if st.status == StreamStatus::Enabled {
            s.streams.outstanding(&id, max)?
        } else {
            (Vec::new(), false)
        };
        let stopping = *s.shutdown.borrow();
        if !sets.is_empty() || immediate || stopping || tokio::time::Instant::now() >= deadline {
            let map: HashMap<String, String> =
                sets.into_iter().map(|(_, o)| (o.jti, o.set)).collect();
            let mut reply = json!({"sets": map});
            if more {
                reply["moreAvailable"] = json!(true);
            }
            return Ok(Json(reply).into_response());
        }
        let mut shutdown = s.shutdown.clone();
        tokio::select! {
            _ = tokio::time::timeout_at(deadline, wait) => {}
            _ = shutdown.wait_for(|stop| *stop) => {}
        }
    }
}

/// `GET /ssf/sse/{stream_id}`: the stream's SETs as server-sent events (`event: set`, `data:` the
/// compact SET, `id:` its outbox sequence), for sidecars that want the lowest latency. Resumable: a
/// client reconnecting with `Last-Event-ID: n` has acknowledged everything up to `n` — those SETs are
/// removed — and receives everything after it, so a reconnecting client misses nothing.
pub async fn sse(
    State(s): State<Arc<MgmtState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, MgmtError> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let ep = authenticate(&s, &headers)?;
    s.streams.get(&ep.name, &id)?;
    let open = connection(&s, ep)?;
    if let Some(forwarder) = s.forwarder.as_ref().filter(|_| !s.streams.delivers(&id)) {
        let call = ForwardedCall {
            sse: true,
            body: Vec::new(),
            timeout: FORWARDED_SSE_LIFE,
        };
        let answer = forwarder.forward(&id, &headers, call).await;
        // The connection permit is held for as long as the passed-on stream is open.
        let (parts, body) = answer.into_parts();
        let body = futures_util::StreamExt::map(body.into_data_stream(), move |chunk| {
            let _held = &open;
            chunk
        });
        return Ok(Response::from_parts(
            parts,
            axum::body::Body::from_stream(body),
        ));
    }
    let last: u64 = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    if last > 0 {
        s.streams.acknowledge_through(&id, last).await?;
    }
    let streams = s.streams.clone();
    let owner = ep.name.clone();
    let state = (
        streams,
        id,
        owner,
        last,
        std::collections::VecDeque::<(u64, super::streams::Outgoing)>::new(),
    );
    let events = futures_util::stream::unfold(
        state,
        |(streams, id, owner, mut last, mut buf)| async move {
            loop {
                if let Some((seq, out)) = buf.pop_front() {
                    last = seq;
                    metrics::histogram!(crate::telemetry::DECISION_DELIVERED_SECONDS, "method" => "sse")
                        .record(
                            (streams.clock().now_ms() - out.queued_at_ms).max(0) as f64 / 1000.0,
                        );
                    let event = Event::default()
                        .id(seq.to_string())
                        .event("set")
                        .data(out.set);
                    return Some((
                        Ok::<_, std::convert::Infallible>(event),
                        (streams, id, owner, last, buf),
                    ));
                }
                let notified = streams.notifier(&id);
                let wait = notified.notified();
                // The stream may have been deleted or disabled: end the response.
                let st = streams.get(&owner, &id).ok()?;
                if st.status == StreamStatus::Disabled {
                    return None;
                }
                if st.status == StreamStatus::Enabled {
                    let (items, _) = streams.outstanding_after(&id, last, 256).ok()?;
                    for (key, out) in items {
                        let seq = super::streams::seq_of(&key);
                        if seq > last {
                            buf.push_back((seq, out));
                        }
                    }
                }
                if buf.is_empty() {
                    let _ = tokio::time::timeout(Duration::from_secs(15), wait).await;
                }
            }
        },
    );
    let mut shutdown = s.shutdown.clone();
    let stop = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    // The response holds its connection permit until it ends (or the subscriber goes away).
    let events = futures_util::StreamExt::map(events, move |event| {
        let _held = &open;
        event
    });
    Ok(Sse::new(futures_util::StreamExt::take_until(events, stop))
        .keep_alive(KeepAlive::default())
        .into_response())
}
