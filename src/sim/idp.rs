//! An SSF transmitter as an identity provider runs one: metadata, a JWKS with key rotation, the
//! stream management API (SSF 1.0 §8), push delivery with retries (RFC 8935) and a poll endpoint
//! (RFC 8936), and a population of users, devices, sessions, workloads and agents to emit CAEP and
//! RISC events about.
//!
//! It is a second, independent implementation of the transmitter side: it shares nothing with
//! [`crate::transmitter`] (only the JWS signing primitive), builds its JSON by hand from the spec's
//! field names, and writes event URIs as literals, so Vigil's receiver and stream client are checked
//! against something they did not write. Used by tests, the demo (`vigil-idp`) and the load harness.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::{jwks_document, SigningKey};
use crate::jose::Alg;

/// Push delivery: `urn:ietf:rfc:8935`; poll: `urn:ietf:rfc:8936`.
pub const PUSH: &str = "urn:ietf:rfc:8935";
pub const POLL: &str = "urn:ietf:rfc:8936";
const VERIFICATION: &str = "https://schemas.openid.net/secevent/ssf/event-type/verification";
const STREAM_UPDATED: &str = "https://schemas.openid.net/secevent/ssf/event-type/stream-updated";

/// The event types this transmitter can emit.
pub const EVENTS_SUPPORTED: &[&str] = &[
    "https://schemas.openid.net/secevent/caep/event-type/session-established",
    "https://schemas.openid.net/secevent/caep/event-type/session-revoked",
    "https://schemas.openid.net/secevent/caep/event-type/credential-change",
    "https://schemas.openid.net/secevent/caep/event-type/device-compliance-change",
    "https://schemas.openid.net/secevent/caep/event-type/risk-level-change",
    "https://schemas.openid.net/secevent/caep/event-type/assurance-level-change",
    "https://schemas.openid.net/secevent/risc/event-type/account-disabled",
    "https://schemas.openid.net/secevent/risc/event-type/account-enabled",
    "https://schemas.openid.net/secevent/risc/event-type/credential-compromise",
];

/// How the simulated IdP behaves.
#[derive(Debug, Clone)]
pub struct IdpSettings {
    /// The exact `Authorization` value receivers must present to the management API and poll.
    pub receiver_credential: String,
    /// The `aud` of every stream.
    pub audience: String,
    /// Seconds between verification requests a stream accepts (faster ones get 429).
    pub min_verification_interval: u64,
    /// Only one stream per receiver (a second create gets 409).
    pub one_stream_per_receiver: bool,
    /// Serve metadata only at the legacy `/.well-known/risc-configuration`.
    pub legacy_risc_metadata: bool,
    /// How long a poll without `returnImmediately` waits for events.
    pub long_poll: Duration,
    /// First retry delay of a failed push (doubling, at most 5 s).
    pub push_retry: Duration,
    /// OAuth clients its token endpoint (`/oauth/token`, RFC 6749 §4.4) issues access tokens to;
    /// a token it issued is accepted like `receiver_credential` until it expires.
    pub oauth_clients: Vec<OAuthRegistration>,
    /// How long an issued access token is good for.
    pub token_lifetime: Duration,
    /// Refuse `receiver_credential`: only access tokens from the token endpoint are taken.
    pub require_oauth: bool,
}

/// A client registered at the simulated IdP's token endpoint.
#[derive(Debug, Clone)]
pub struct OAuthRegistration {
    pub client_id: String,
    /// For `client_secret_basic` and `client_secret_post`.
    pub secret: Option<String>,
    /// For `private_key_jwt`: the public JWK client assertions are checked with.
    pub public_jwk: Option<Value>,
}

impl Default for IdpSettings {
    fn default() -> Self {
        IdpSettings {
            receiver_credential: "Bearer idp-receiver-token".into(),
            audience: "https://vigil.example".into(),
            min_verification_interval: 0,
            one_stream_per_receiver: false,
            legacy_risc_metadata: false,
            long_poll: Duration::from_secs(5),
            push_retry: Duration::from_millis(100),
            oauth_clients: Vec::new(),
            token_lifetime: Duration::from_secs(300),
            require_oauth: false,
        }
    }
}

/// A SET waiting for delivery (push) or acknowledgement (poll).
#[derive(Debug, Clone)]
struct Queued {
    jti: String,
    token: String,
    /// Verification and stream-updated events go out even while a stream is paused.
    framework: bool,
}

struct SimStream {
    config: Map<String, Value>,
    /// The receiver's push `authorization_header` (never echoed back).
    push_authorization: Option<String>,
    status: String,
    reason: Option<String>,
    subjects: Vec<Value>,
    queue: VecDeque<Queued>,
    /// Poll: handed out, not acknowledged yet (sent again by the next poll).
    outstanding: VecDeque<Queued>,
    last_verification: Option<Instant>,
    next_push: Instant,
    backoff: Duration,
}

impl SimStream {
    fn is_push(&self) -> bool {
        self.config["delivery"]["method"] == PUSH
    }
    fn delivers(&self, event_uri: &str) -> bool {
        self.config["events_delivered"]
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e == event_uri))
    }
}

/// What the IdP saw from receivers (for tests and the demo's output).
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Every management call: method, path, body.
    pub requests: Vec<(String, String, Value)>,
    /// `jti`s acknowledged by poll.
    pub acked: Vec<String>,
    /// `setErrs` reported by poll, by `jti`.
    pub set_errs: BTreeMap<String, Value>,
    /// `jti`s accepted by push (202).
    pub pushed: Vec<String>,
    /// Push attempts that did not get 202.
    pub push_failures: usize,
}

struct IdpState {
    issuer: String,
    settings: IdpSettings,
    /// The first key signs; all are published.
    keys: RwLock<Vec<SigningKey>>,
    streams: Mutex<BTreeMap<String, SimStream>>,
    observed: Mutex<Observed>,
    next_id: AtomicU64,
    wake: tokio::sync::Notify,
    client: reqwest::Client,
    /// Access tokens issued, with when they expire.
    tokens: Mutex<std::collections::HashMap<String, Instant>>,
    /// How each token was asked for (the client authentication method), in order.
    token_requests: Mutex<Vec<String>>,
    /// Verification requests are taken (204) and never answered: a transmitter that stopped
    /// verifying, for the receiver's stream-health SLA.
    verification_silent: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running simulated IdP. Dropping it stops it.
pub struct Idp {
    addr: SocketAddr,
    state: Arc<IdpState>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Idp {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Why the simulator could not start or emit.
#[derive(Debug, thiserror::Error)]
pub enum IdpError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("signing: {0}")]
    Signing(#[from] super::SimError),
    #[error("http client: {0}")]
    Client(String),
}

impl Idp {
    /// Starts the IdP on `addr` (port 0 for any free port); its issuer is `http://<addr>`.
    pub async fn start(addr: SocketAddr, settings: IdpSettings) -> Result<Idp, IdpError> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| IdpError::Client(e.to_string()))?;
        let state = Arc::new(IdpState {
            issuer: format!("http://{addr}"),
            settings,
            keys: RwLock::new(vec![SigningKey::generate(Alg::RS256, "idp-1")?]),
            streams: Mutex::new(BTreeMap::new()),
            observed: Mutex::new(Observed::default()),
            next_id: AtomicU64::new(1),
            wake: tokio::sync::Notify::new(),
            client,
            verification_silent: std::sync::atomic::AtomicBool::new(false),
            tokens: Mutex::new(std::collections::HashMap::new()),
            token_requests: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/.well-known/ssf-configuration", get(metadata))
            .route("/.well-known/risc-configuration", get(metadata_legacy))
            .route("/jwks.json", get(jwks))
            .route(
                "/ssf/mgmt/stream",
                get(read_stream)
                    .post(create_stream)
                    .patch(update_stream)
                    .put(replace_stream)
                    .delete(delete_stream),
            )
            .route("/ssf/mgmt/status", get(read_status).post(update_status))
            .route("/ssf/mgmt/subject:add", post(add_subject))
            .route("/ssf/mgmt/subject:remove", post(remove_subject))
            .route("/ssf/mgmt/verification", post(verify))
            .route("/ssf/poll/{stream_id}", post(poll))
            .route(
                "/.well-known/oauth-authorization-server",
                get(authorization_server_metadata),
            )
            .route("/oauth/token", post(token))
            .with_state(state.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let pusher = tokio::spawn(push_loop(state.clone()));
        Ok(Idp {
            addr,
            state,
            tasks: vec![server, pusher],
        })
    }

    pub fn issuer(&self) -> &str {
        &self.state.issuer
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts signing with a new key; the old ones stay in the JWKS.
    pub fn rotate_keys(&self) -> Result<String, IdpError> {
        let mut keys = self
            .state
            .keys
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let kid = format!("idp-{}", keys.len() + 1);
        keys.insert(0, SigningKey::generate(Alg::RS256, &kid)?);
        Ok(kid)
    }

    /// Every stream's configuration with its status.
    pub fn streams(&self) -> Vec<Value> {
        lock(&self.state.streams)
            .values()
            .map(|s| {
                let mut c = Value::Object(s.config.clone());
                c["status"] = json!(s.status);
                c["subjects"] = json!(s.subjects);
                c["queued"] = json!(s.queue.len() + s.outstanding.len());
                // Events waiting for delivery, without verification / stream-updated (which go
                // out even while paused).
                c["held"] = json!(s
                    .queue
                    .iter()
                    .chain(s.outstanding.iter())
                    .filter(|q| !q.framework)
                    .count());
                c
            })
            .collect()
    }

    pub fn observed(&self) -> Observed {
        lock(&self.state.observed).clone()
    }

    /// Changes a stream's status as the transmitter itself would (maintenance, policy), sending
    /// stream-updated as SSF requires. `false` if there is no such stream.
    /// Takes verification requests without ever sending the event (`true`), or answers them
    /// again (`false`).
    pub fn set_verification_silent(&self, silent: bool) {
        self.state
            .verification_silent
            .store(silent, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn set_status(&self, stream_id: &str, status: &str, reason: Option<&str>) -> bool {
        change_status(&self.state, stream_id, status, reason).is_some()
    }

    /// How each access token was asked for so far (`client_secret_basic`, `client_secret_post`,
    /// `private_key_jwt`), in order.
    pub fn token_requests(&self) -> Vec<String> {
        lock(&self.state.token_requests).clone()
    }

    /// Forgets every access token issued: the next call with one is answered 401.
    pub fn revoke_tokens(&self) {
        lock(&self.state.tokens).clear();
    }

    /// Asks a receiver for OAuth Global Token Revocation of `sub_id` (as Okta Universal Logout
    /// does): `POST <receiver>/oauth/global-token-revocation`, authenticated with the credential
    /// the receiver gave this IdP for its push stream. Returns the answer's status.
    pub async fn global_token_revocation(
        &self,
        receiver: &str,
        sub_id: Value,
    ) -> Result<u16, IdpError> {
        let credential = lock(&self.state.streams)
            .values()
            .find_map(|s| s.push_authorization.clone())
            .ok_or_else(|| {
                IdpError::Client("no push stream has given this IdP a credential".into())
            })?;
        let url = format!(
            "{}/oauth/global-token-revocation",
            receiver.trim_end_matches('/')
        );
        let answer = self
            .state
            .client
            .post(url)
            .header("authorization", credential)
            .json(&json!({ "sub_id": sub_id }))
            .send()
            .await
            .map_err(|e| IdpError::Client(e.to_string()))?;
        Ok(answer.status().as_u16())
    }

    /// Emits one event to every stream that delivers its type. Returns how many streams got it.
    pub fn emit(&self, event_uri: &str, sub_id: Value, payload: Value) -> Result<usize, IdpError> {
        emit(&self.state, event_uri, &sub_id, payload, None)
    }

    /// Queues an arbitrary token (e.g. one signed by an unknown key) on a stream, as if emitted.
    pub fn inject(&self, stream_id: &str, jti: &str, token: String) -> bool {
        let mut streams = lock(&self.state.streams);
        let Some(s) = streams.get_mut(stream_id) else {
            return false;
        };
        s.queue.push_back(Queued {
            jti: jti.to_owned(),
            token,
            framework: false,
        });
        drop(streams);
        self.state.wake.notify_waiters();
        true
    }

    /// Signs a SET for a stream with this IdP's current key (for tests that tamper with it).
    pub fn sign(&self, claims: &Value) -> Result<String, IdpError> {
        sign(&self.state, claims)
    }
}

fn sign(state: &IdpState, claims: &Value) -> Result<String, IdpError> {
    let keys = state.keys.read().unwrap_or_else(PoisonError::into_inner);
    match keys.first() {
        Some(k) => Ok(k.sign_set(claims)?),
        None => Err(IdpError::Client("no signing key".into())),
    }
}

fn new_jti(state: &IdpState) -> String {
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    format!("idp-{n:08}-{:08x}", rand::random::<u32>())
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Signs and queues an event. `only` restricts it to one stream (verification, stream-updated).
fn emit(
    state: &IdpState,
    event_uri: &str,
    sub_id: &Value,
    payload: Value,
    only: Option<&str>,
) -> Result<usize, IdpError> {
    let framework = event_uri == VERIFICATION || event_uri == STREAM_UPDATED;
    let targets: Vec<(String, Value)> = lock(&state.streams)
        .iter()
        .filter(|(id, s)| match only {
            Some(o) => o == id.as_str(),
            None => s.status != "disabled" && s.delivers(event_uri),
        })
        .map(|(id, s)| (id.clone(), s.config["aud"].clone()))
        .collect();
    let mut queued = 0;
    for (id, aud) in targets {
        let jti = new_jti(state);
        let claims = json!({
            "iss": state.issuer, "jti": jti, "iat": now_secs(), "aud": aud,
            "sub_id": sub_id, "events": {event_uri: payload},
        });
        let token = sign(state, &claims)?;
        if let Some(s) = lock(&state.streams).get_mut(&id) {
            s.queue.push_back(Queued {
                jti,
                token,
                framework,
            });
            queued += 1;
        }
    }
    state.wake.notify_waiters();
    Ok(queued)
}

fn change_status(
    state: &IdpState,
    stream_id: &str,
    status: &str,
    reason: Option<&str>,
) -> Option<Value> {
    let changed = {
        let mut streams = lock(&state.streams);
        let s = streams.get_mut(stream_id)?;
        let changed = s.status != status;
        s.status = status.to_owned();
        s.reason = reason.map(str::to_owned);
        if status == "disabled" {
            // Disabled holds nothing.
            s.queue.clear();
            s.outstanding.clear();
        }
        changed
    };
    if changed {
        let mut payload = json!({"status": status});
        if let Some(r) = reason {
            payload["reason"] = json!(r);
        }
        let sub = json!({"format": "opaque", "id": stream_id});
        let _ = emit(state, STREAM_UPDATED, &sub, payload, Some(stream_id));
    }
    let mut out = json!({"stream_id": stream_id, "status": status});
    if let Some(r) = reason {
        out["reason"] = json!(r);
    }
    Some(out)
}

// ---- HTTP handlers -------------------------------------------------------------------------------

fn error(status: StatusCode, description: &str) -> Response {
    (
        status,
        Json(json!({"error": status.canonical_reason().unwrap_or("error"), "description": description})),
    )
        .into_response()
}

/// The 401 for a request without the receiver's credential.
fn unauthorized(state: &IdpState, headers: &HeaderMap) -> Option<Response> {
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let fixed = !state.settings.require_oauth && presented == state.settings.receiver_credential;
    let token = presented
        .strip_prefix("Bearer ")
        .and_then(|t| lock(&state.tokens).get(t).copied())
        .is_some_and(|expires| Instant::now() < expires);
    (!fixed && !token).then(|| error(StatusCode::UNAUTHORIZED, "unknown receiver credential"))
}

/// RFC 8414 metadata of the simulated IdP as an authorization server.
async fn authorization_server_metadata(State(state): State<Arc<IdpState>>) -> Response {
    let base = &state.issuer;
    Json(json!({
        "issuer": base,
        "token_endpoint": format!("{base}/oauth/token"),
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported":
            ["client_secret_basic", "client_secret_post", "private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS256", "PS256", "ES256"],
    }))
    .into_response()
}

/// RFC 6749 §5.2 error answer.
fn oauth_error(status: StatusCode, code: &str) -> Response {
    (status, Json(json!({ "error": code }))).into_response()
}

/// RFC 6749 §4.4 client credentials: `client_secret_basic`, `client_secret_post` or
/// `private_key_jwt` (RFC 7523, checked against the client's registered key, `aud` this
/// endpoint).
async fn token(
    State(state): State<Arc<IdpState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let form: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(&body).into_owned().collect();
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type");
    }
    let clients = &state.settings.oauth_clients;
    let find = |id: &str| clients.iter().find(|c| c.client_id == id);
    let basic = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.decode(b).ok()
        })
        .and_then(|raw| String::from_utf8(raw).ok());
    let decode = |v: &str| -> String {
        url::form_urlencoded::parse(format!("v={v}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    let method = if let Some(pair) = basic {
        let (id, secret) = pair.split_once(':').unwrap_or((&pair, ""));
        let (id, secret) = (decode(id), decode(secret));
        find(&id)
            .filter(|c| c.secret.as_deref() == Some(secret.as_str()))
            .map(|_| "client_secret_basic")
    } else if let (Some(id), Some(secret)) = (form.get("client_id"), form.get("client_secret")) {
        find(id)
            .filter(|c| c.secret.as_deref() == Some(secret.as_str()))
            .map(|_| "client_secret_post")
    } else if let (Some(kind), Some(assertion)) = (
        form.get("client_assertion_type"),
        form.get("client_assertion"),
    ) {
        let endpoint = format!("{}/oauth/token", state.issuer);
        (kind == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
            .then(|| verify_assertion(clients, assertion, &endpoint))
            .flatten()
            .map(|_| "private_key_jwt")
    } else {
        None
    };
    let Some(method) = method else {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
    };
    let token = format!("at-{:032x}", rand::random::<u128>());
    lock(&state.tokens).insert(
        token.clone(),
        Instant::now() + state.settings.token_lifetime,
    );
    lock(&state.token_requests).push(method.to_owned());
    Json(json!({"access_token": token, "token_type": "Bearer",
        "expires_in": state.settings.token_lifetime.as_secs_f64()}))
    .into_response()
}

/// The client id a valid RFC 7523 client assertion is from, if it is one.
fn verify_assertion(
    clients: &[OAuthRegistration],
    assertion: &str,
    endpoint: &str,
) -> Option<String> {
    let header = jsonwebtoken::decode_header(assertion).ok()?;
    // Who it claims to be from (to find the key), read before the signature is checked with it.
    let claims: Value = {
        use base64::Engine as _;
        let payload = assertion.split('.').nth(1)?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .ok()?;
        serde_json::from_slice(&bytes).ok()?
    };
    let id = claims["iss"].as_str()?;
    if claims["sub"].as_str() != Some(id) {
        return None;
    }
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(
        clients
            .iter()
            .find(|c| c.client_id == id)?
            .public_jwk
            .clone()?,
    )
    .ok()?;
    let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).ok()?;
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.set_audience(&[endpoint]);
    validation.set_issuer(&[id]);
    jsonwebtoken::decode::<Value>(assertion, &key, &validation).ok()?;
    Some(id.to_owned())
}

fn observe(state: &IdpState, method: &str, path: &str, body: &Value) {
    lock(&state.observed)
        .requests
        .push((method.to_owned(), path.to_owned(), body.clone()));
}

fn metadata_document(state: &IdpState) -> Value {
    let base = &state.issuer;
    json!({
        "spec_version": "1_0",
        "issuer": base,
        "jwks_uri": format!("{base}/jwks.json"),
        "delivery_methods_supported": [PUSH, POLL],
        "configuration_endpoint": format!("{base}/ssf/mgmt/stream"),
        "status_endpoint": format!("{base}/ssf/mgmt/status"),
        "add_subject_endpoint": format!("{base}/ssf/mgmt/subject:add"),
        "remove_subject_endpoint": format!("{base}/ssf/mgmt/subject:remove"),
        "verification_endpoint": format!("{base}/ssf/mgmt/verification"),
        "authorization_schemes": [{"spec_urn": "urn:ietf:rfc:6750"}],
        "default_subjects": "ALL",
    })
}

async fn metadata(State(state): State<Arc<IdpState>>) -> Response {
    if state.settings.legacy_risc_metadata {
        return error(StatusCode::NOT_FOUND, "no SSF metadata here");
    }
    Json(metadata_document(&state)).into_response()
}

async fn metadata_legacy(State(state): State<Arc<IdpState>>) -> Response {
    Json(metadata_document(&state)).into_response()
}

async fn jwks(State(state): State<Arc<IdpState>>) -> Response {
    let keys = state.keys.read().unwrap_or_else(PoisonError::into_inner);
    let public: Vec<_> = keys.iter().filter_map(|k| k.public_jwk().ok()).collect();
    Json(jwks_document(&public)).into_response()
}

fn public_config(s: &SimStream) -> Value {
    Value::Object(s.config.clone())
}

/// Applies the receiver-supplied fields of `body` to `config`; `replace` clears absent ones.
fn apply_receiver_fields(
    state: &IdpState,
    id: &str,
    config: &mut Map<String, Value>,
    push_authorization: &mut Option<String>,
    body: &Value,
    replace: bool,
) -> Result<(), &'static str> {
    if let Some(requested) = body.get("events_requested") {
        let list = requested
            .as_array()
            .ok_or("events_requested must be an array")?;
        config.insert("events_requested".into(), json!(list));
    } else if replace {
        config.insert("events_requested".into(), json!([]));
    }
    if let Some(d) = body.get("description") {
        config.insert("description".into(), d.clone());
    } else if replace {
        config.remove("description");
    }
    if let Some(delivery) = body
        .get("delivery")
        .or(if replace { Some(&Value::Null) } else { None })
    {
        let method = delivery
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or(POLL);
        let out = match method {
            PUSH => {
                let url = delivery
                    .get("endpoint_url")
                    .and_then(Value::as_str)
                    .ok_or("push delivery needs endpoint_url")?;
                *push_authorization = delivery
                    .get("authorization_header")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                json!({"method": PUSH, "endpoint_url": url})
            }
            POLL => {
                *push_authorization = None;
                json!({"method": POLL, "endpoint_url": format!("{}/ssf/poll/{id}", state.issuer)})
            }
            _ => return Err("unsupported delivery method"),
        };
        config.insert("delivery".into(), out);
    }
    let requested: Vec<&Value> = config
        .get("events_requested")
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let delivered: Vec<&str> = EVENTS_SUPPORTED
        .iter()
        .copied()
        .filter(|e| requested.iter().any(|r| r == e))
        .collect();
    config.insert("events_delivered".into(), json!(delivered));
    Ok(())
}

async fn create_stream(
    State(state): State<Arc<IdpState>>,
    headers: HeaderMap,
    body: Option<Json<Value>>,
) -> Response {
    let body = body.map(|Json(b)| b).unwrap_or_else(|| json!({}));
    observe(&state, "POST", "/ssf/mgmt/stream", &body);
    if let Some(r) = unauthorized(&state, &headers) {
        return r;
    }
    if state.settings.one_stream_per_receiver && !lock(&state.streams).is_empty() {
        return error(StatusCode::CONFLICT, "one stream per receiver");
    }
    let id = format!("{:032x}", rand::random::<u128>());
    let mut config = Map::new();
    config.insert("stream_id".into(), json!(id));
    config.insert("iss".into(), json!(state.issuer));
    config.insert("aud".into(), json!(state.settings.audience));
    config.insert("events_supported".into(), json!(EVENTS_SUPPORTED));
    config.insert(
        "min_verification_interval".into(),
        json!(state.settings.min_verification_interval),
    );
    let mut body = body;
    if body.get("delivery").is_none() {
        // SSF §8.1.1.1: no delivery means poll.
        body["delivery"] = json!({"method": POLL});
    }
    let mut push_authorization = None;
    if let Err(e) = apply_receiver_fields(
        &state,
        &id,
        &mut config,
        &mut push_authorization,
        &body,
        false,
    ) {
        return error(StatusCode::BAD_REQUEST, e);
    }
    let stream = SimStream {
        config,
        push_authorization,
        status: "enabled".into(),
        reason: None,
        subjects: Vec::new(),
        queue: VecDeque::new(),
        outstanding: VecDeque::new(),
        last_verification: None,
        next_push: Instant::now(),
        backoff: state.settings.push_retry,
    };
    let out = public_config(&stream);
    lock(&state.streams).insert(id, stream);
    (StatusCode::CREATED, Json(out)).into_response()
}

async fn read_stream(
    State(state): State<Arc<IdpState>>,
    headers: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    observe(&state, "GET", "/ssf/mgmt/stream", &json!(q));
    if let Some(r) = unauthorized(&state, &headers) {
        return r;
    }
    let streams = lock(&state.streams);
    match q.get("stream_id") {
        Some(id) => match streams.get(id) {
            Some(s) => Json(public_config(s)).into_response(),
            None => error(StatusCode::NOT_FOUND, "no such stream"),
        },
        None => Json(Value::Array(streams.values().map(public_config).collect())).into_response(),
    }
}

async fn change_stream(
    state: Arc<IdpState>,
    headers: HeaderMap,
    body: Value,
    replace: bool,
) -> Response {
    observe(
        &state,
        if replace { "PUT" } else { "PATCH" },
        "/ssf/mgmt/stream",
        &body,
    );
    if let Some(r) = unauthorized(&state, &headers) {
        return r;
    }
    let Some(id) = body
        .get("stream_id")
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        return error(StatusCode::BAD_REQUEST, "stream_id is required");
    };
    let mut streams = lock(&state.streams);
    let Some(s) = streams.get_mut(&id) else {
        return error(StatusCode::NOT_FOUND, "no such stream");
    };
    // Transmitter-supplied fields, if sent, must match.
    for field in ["iss", "aud", "events_supported"] {
        if let Some(v) = body.get(field) {
            if s.config.get(field) != Some(v) {
                return error(
                    StatusCode::BAD_REQUEST,
                    "transmitter-supplied field changed",
                );
            }
        }
    }
    let mut config = s.config.clone();
    let mut auth = s.push_authorization.clone();
    if let Err(e) = apply_receiver_fields(&state, &id, &mut config, &mut auth, &body, replace) {
        return error(StatusCode::BAD_REQUEST, e);
    }
    s.config = config;
    s.push_authorization = auth;
    Json(public_config(s)).into_response()
}

async fn update_stream(
    State(state): State<Arc<IdpState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    change_stream(state, headers, body, false).await
}

async fn replace_stream(
    State(state): State<Arc<IdpState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    change_stream(state, headers, body, true).await
}

async fn delete_stream(
    State(state): State<Arc<IdpState>>,
    headers: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    observe(&state, "DELETE", "/ssf/mgmt/stream", &json!(q));
    if let Some(r) = unauthorized(&state, &headers) {
        return r;
    }
    let Some(id) = q.get("stream_id") else {
        return error(StatusCode::BAD_REQUEST, "stream_id is required");
    };
    match lock(&state.streams).remove(id) {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => error(StatusCode::NOT_FOUND, "no such stream"),
    }
}

async fn read_status(
    State(state): State<Arc<IdpState>>,
    headers: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    observe(&state, "GET", "/ssf/mgmt/status", &json!(q));
    if let Some(r) = unauthorized(&state, &headers) {
        return r;
    }
    let streams = lock(&state.streams);
    let Some((id, s)) = q.get("stream_id").and_then(|id| streams.get_key_value(id)) else {
        return error(StatusCode::NOT_FOUND, "no such stream");
    };
    let mut out = json!({"stream_id": id, "status": s.status});
    if let Some(r) = &s.reason {
        out["reason"] = json!(r);
    }
    Json(out).into_response()
}

async fn update_status(
    State(state): State<Arc<IdpState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    observe(&state, "POST", "/ssf/mgmt/status", &body);
    if let Some(r) = unauthorized(&state, &headers) {
        return r;
    }
    let (Some(id), Some(status)) = (
        body.get("stream_id").and_then(Value::as_str),
        body.get("status").and_then(Value::as_str),
    ) else {
        return error(StatusCode::BAD_REQUEST, "stream_id and status are required");
    };
    if !["enabled", "paused", "disabled"].contains(&status) {
        return error(StatusCode::BAD_REQUEST, "unknown status");
    }
    let reason = body.get("reason").and_then(Value::as_str);
    match change_status(&state, id, status, reason) {
        Some(out) => Json(out).into_response(),
        None => error(StatusCode::NOT_FOUND, "no such stream"),
    }
}

async fn subject_change(
    state: Arc<IdpState>,
    headers: HeaderMap,
    body: Value,
    add: bool,
) -> Response {
    let path = if add {
        "/ssf/mgmt/subject:add"
    } else {
        "/ssf/mgmt/subject:remove"
    };
    observe(&state, "POST", path, &body);
    if let Some(r) = unauthorized(&state, &headers) {
        return r;
    }
    let (Some(id), Some(subject)) = (
        body.get("stream_id").and_then(Value::as_str),
        body.get("subject").filter(|s| s.is_object()),
    ) else {
        return error(
            StatusCode::BAD_REQUEST,
            "stream_id and subject are required",
        );
    };
    let mut streams = lock(&state.streams);
    let Some(s) = streams.get_mut(id) else {
        return error(StatusCode::NOT_FOUND, "no such stream");
    };
    if add {
        if !s.subjects.contains(subject) {
            s.subjects.push(subject.clone());
        }
        StatusCode::OK.into_response()
    } else {
        s.subjects.retain(|x| x != subject);
        StatusCode::NO_CONTENT.into_response()
    }
}

async fn add_subject(
    State(state): State<Arc<IdpState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    subject_change(state, headers, body, true).await
}

async fn remove_subject(
    State(state): State<Arc<IdpState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    subject_change(state, headers, body, false).await
}

async fn verify(
    State(state): State<Arc<IdpState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    observe(&state, "POST", "/ssf/mgmt/verification", &body);
    if let Some(r) = unauthorized(&state, &headers) {
        return r;
    }
    let Some(id) = body.get("stream_id").and_then(Value::as_str) else {
        return error(StatusCode::BAD_REQUEST, "stream_id is required");
    };
    {
        let mut streams = lock(&state.streams);
        let Some(s) = streams.get_mut(id) else {
            return error(StatusCode::NOT_FOUND, "no such stream");
        };
        let min = Duration::from_secs(state.settings.min_verification_interval);
        if s.last_verification.is_some_and(|t| t.elapsed() < min) {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", min.as_secs().to_string())],
            )
                .into_response();
        }
        s.last_verification = Some(Instant::now());
    }
    if state
        .verification_silent
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        return StatusCode::NO_CONTENT.into_response();
    }
    let mut payload = json!({});
    if let Some(st) = body.get("state") {
        payload["state"] = st.clone();
    }
    let sub = json!({"format": "opaque", "id": id});
    match emit(&state, VERIFICATION, &sub, payload, Some(id)) {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// RFC 8936: acknowledge and report, then hand out what is waiting (long-polling when asked).
async fn poll(
    State(state): State<Arc<IdpState>>,
    Path(stream_id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(r) = unauthorized(&state, &headers) {
        return r;
    }
    let max_events = body.get("maxEvents").and_then(Value::as_u64).unwrap_or(100) as usize;
    let return_immediately = body
        .get("returnImmediately")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let acks: Vec<String> = body
        .get("ack")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let errs = body
        .get("setErrs")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    {
        let mut streams = lock(&state.streams);
        let Some(s) = streams.get_mut(&stream_id) else {
            return error(StatusCode::NOT_FOUND, "no such stream");
        };
        if s.is_push() {
            return error(StatusCode::BAD_REQUEST, "this stream is a push stream");
        }
        s.outstanding
            .retain(|q| !acks.contains(&q.jti) && !errs.contains_key(&q.jti));
    }
    {
        let mut seen = lock(&state.observed);
        seen.acked.extend(acks);
        seen.set_errs.extend(errs);
    }
    let deadline = Instant::now() + state.settings.long_poll;
    loop {
        let wake = state.wake.notified();
        let (sets, more) = {
            let mut streams = lock(&state.streams);
            let Some(s) = streams.get_mut(&stream_id) else {
                return error(StatusCode::NOT_FOUND, "no such stream");
            };
            let enabled = s.status == "enabled";
            // Unacknowledged ones first (they are sent again until acknowledged).
            let mut out: Vec<Queued> = s.outstanding.iter().take(max_events).cloned().collect();
            while out.len() < max_events {
                let next = s.queue.iter().position(|q| enabled || q.framework);
                match next.and_then(|i| s.queue.remove(i)) {
                    Some(q) => {
                        s.outstanding.push_back(q.clone());
                        out.push(q);
                    }
                    None => break,
                }
            }
            let more =
                s.queue.iter().any(|q| enabled || q.framework) || s.outstanding.len() > out.len();
            (out, more)
        };
        if !sets.is_empty() || return_immediately || max_events == 0 || Instant::now() >= deadline {
            let sets: Map<String, Value> = sets
                .into_iter()
                .map(|q| (q.jti, Value::String(q.token)))
                .collect();
            return Json(json!({"sets": sets, "moreAvailable": more})).into_response();
        }
        let _ =
            tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), wake).await;
    }
}

/// Delivers push streams' queues in order, one SET at a time per stream, retrying with backoff.
async fn push_loop(state: Arc<IdpState>) {
    loop {
        let due: Vec<(String, String, Option<String>, Queued)> = {
            let streams = lock(&state.streams);
            streams
                .iter()
                .filter(|(_, s)| s.is_push() && s.next_push <= Instant::now())
                .filter_map(|(id, s)| {
                    let q = s.queue.front()?;
                    if s.status != "enabled" && !q.framework {
                        return None;
                    }
                    let url = s.config["delivery"]["endpoint_url"].as_str()?.to_owned();
                    Some((id.clone(), url, s.push_authorization.clone(), q.clone()))
                })
                .collect()
        };
        if due.is_empty() {
            let _ = tokio::time::timeout(Duration::from_millis(50), state.wake.notified()).await;
            continue;
        }
        for (id, url, auth, q) in due {
            let mut req = state
                .client
                .post(&url)
                .header("content-type", "application/secevent+jwt")
                .header("accept", "application/json")
                .body(q.token.clone());
            if let Some(a) = &auth {
                req = req.header("authorization", a);
            }
            let accepted = matches!(req.send().await, Ok(r) if r.status() == StatusCode::ACCEPTED);
            let mut streams = lock(&state.streams);
            let Some(s) = streams.get_mut(&id) else {
                continue;
            };
            if accepted {
                if s.queue.front().is_some_and(|f| f.jti == q.jti) {
                    s.queue.pop_front();
                }
                s.backoff = state.settings.push_retry;
                s.next_push = Instant::now();
                lock(&state.observed).pushed.push(q.jti);
            } else {
                s.next_push = Instant::now() + s.backoff;
                s.backoff = (s.backoff * 2).min(Duration::from_secs(5));
                lock(&state.observed).push_failures += 1;
            }
        }
    }
}

// ---- population ------------------------------------------------------------------------------

/// Who the IdP emits events about.
#[derive(Debug, Clone, Copy)]
pub struct Population {
    pub users: u64,
    pub workloads: u64,
    pub agents: u64,
}

impl Default for Population {
    fn default() -> Self {
        Population {
            users: 50,
            workloads: 5,
            agents: 5,
        }
    }
}

/// One event of the simulated day, deterministic in `n`. Events come in blocks of 12 about one
/// user, so they tell a coherent story: log in (user, device, session), risk LOW, a second login,
/// device drift (every other block; a new passkey in the others), risk MEDIUM, a workload and an agent flagged, credential change, log out, risk
/// HIGH, credential compromise, and in every fourth block the account disabled.
pub fn population_event(pop: &Population, n: u64) -> (&'static str, Value, Value) {
    let block = n / 12;
    let user = block % pop.users.max(1);
    let email = json!({"format": "email", "email": format!("user-{user}@example.com")});
    let device = json!({"format": "opaque", "id": format!("device-{user}")});
    let session = |k: u64| json!({"format": "opaque", "id": format!("sess-{user}-{block}-{k}")});
    let now = now_secs();
    let uri = |name: &str| -> &'static str {
        EVENTS_SUPPORTED
            .iter()
            .copied()
            .find(|e| e.ends_with(&format!("/{name}")))
            .unwrap_or(EVENTS_SUPPORTED[0])
    };
    let risk = |level: &str, reason: &str| json!({"event_timestamp": now, "principal": "USER", "current_level": level, "risk_reason": reason});
    match n % 12 {
        0 | 2 => (
            uri("session-established"),
            json!({"user": email, "device": device, "session": session(n % 12)}),
            json!({"event_timestamp": now, "acr": "phr", "amr": ["pwd", "otp"]}),
        ),
        1 => (
            uri("risk-level-change"),
            email,
            risk("LOW", "usual location"),
        ),
        // Device drift in every other block, so the risk changes after it decide in the others.
        3 if block % 2 == 1 => (
            uri("device-compliance-change"),
            json!({"user": email, "device": device}),
            json!({"event_timestamp": now, "previous_status": "compliant", "current_status": "not-compliant"}),
        ),
        3 => (
            uri("credential-change"),
            email,
            json!({"event_timestamp": now, "credential_type": "fido2-platform", "change_type": "create"}),
        ),
        4 => (
            uri("risk-level-change"),
            email,
            risk("MEDIUM", "new device"),
        ),
        5 => (
            uri("risk-level-change"),
            json!({"format": "uri", "uri": format!("spiffe://example.org/workload-{}", block % pop.workloads.max(1))}),
            json!({"event_timestamp": now, "principal": "NON_USER", "current_level": "HIGH", "risk_reason": "anomalous egress"}),
        ),
        6 => (
            uri("risk-level-change"),
            json!({"format": "opaque", "id": format!("agent-{}", block % pop.agents.max(1))}),
            json!({"event_timestamp": now, "principal": "NON_USER", "current_level": "HIGH", "risk_reason": "prompt injection suspected"}),
        ),
        7 => (
            uri("credential-change"),
            email,
            json!({"event_timestamp": now, "credential_type": "password", "change_type": "update"}),
        ),
        8 => (
            uri("session-revoked"),
            json!({"user": email, "session": session(2)}),
            json!({"event_timestamp": now, "initiating_entity": "user", "reason_user": {"en": "logout"}}),
        ),
        9 => (
            uri("risk-level-change"),
            email,
            risk("HIGH", "impossible travel"),
        ),
        10 => (
            uri("credential-compromise"),
            email,
            json!({"credential_type": "password"}),
        ),
        _ if block % 4 == 3 => (
            uri("account-disabled"),
            email,
            json!({"reason": "hijacking"}),
        ),
        _ => (uri("risk-level-change"), email, risk("LOW", "re-verified")),
    }
}

impl Idp {
    /// Emits the `n`th population event. Returns how many streams got it.
    pub fn emit_population(&self, pop: &Population, n: u64) -> Result<usize, IdpError> {
        let (uri, sub, payload) = population_event(pop, n);
        self.emit(uri, sub, payload)
    }
}
