//! The enforcement-point side: a standard SSF receiver of Vigil's SETs over push, poll or SSE. It
//! discovers Vigil's metadata, creates its stream, and verifies every SET against Vigil's JWKS the way
//! any SSF receiver would — with the simulators' own JOSE ([`super::jose`]), never Vigil's. Used by
//! the `vigil-ep` simulator, the delivery-latency harness and tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::jose::PublishedKeys;

/// How the enforcement point receives SETs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Push,
    Poll,
    Sse,
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "push" => Ok(Method::Push),
            "poll" => Ok(Method::Poll),
            "sse" => Ok(Method::Sse),
            other => Err(format!("unknown method `{other}` (push, poll, sse)")),
        }
    }
}

/// A verified SET as the enforcement point received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// The SET's claims, verified.
    pub claims: Value,
    /// Milliseconds since the epoch at arrival.
    pub at_ms: i64,
    /// The JWS algorithm it was signed with (its header's `alg`).
    pub alg: String,
}

impl Received {
    /// The event's type URI (a SET from Vigil carries exactly one).
    pub fn event_type(&self) -> Option<&str> {
        self.claims["events"]
            .as_object()
            .and_then(|e| e.keys().next())
            .map(String::as_str)
    }

    /// The event type's last path segment (`session-revoked`).
    pub fn event_name(&self) -> &str {
        self.event_type()
            .and_then(|t| t.rsplit('/').next())
            .unwrap_or_default()
    }

    /// When the event happened (seconds): its `event_timestamp`, else the SET's `iat`.
    pub fn event_time(&self) -> f64 {
        self.event_type()
            .and_then(|t| self.claims["events"][t]["event_timestamp"].as_f64())
            .or_else(|| self.claims["iat"].as_f64())
            .unwrap_or_default()
    }

    /// The SET's `jti`.
    pub fn jti(&self) -> &str {
        self.claims["jti"].as_str().unwrap_or_default()
    }

    /// The SET's `txn`: the triggering signal's `jti`.
    pub fn txn(&self) -> Option<&str> {
        self.claims["txn"].as_str()
    }

    /// The SET's subject (`sub_id`).
    pub fn subject(&self) -> &Value {
        &self.claims["sub_id"]
    }
}

/// A running enforcement point.
pub struct EnforcementPoint {
    pub stream_id: String,
    pub received: mpsc::UnboundedReceiver<Received>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EnforcementPoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Verifier {
    issuer: String,
    audience: String,
    keys: PublishedKeys,
    out: mpsc::UnboundedSender<Received>,
}

impl Verifier {
    fn accept(&self, token: &str) -> Result<(), String> {
        let claims = self.keys.verify_set(token, &self.issuer, &self.audience)?;
        let alg = jsonwebtoken::decode_header(token)
            .map(|h| format!("{:?}", h.alg))
            .unwrap_or_default();
        let _ = self.out.send(Received {
            claims,
            at_ms: crate::signal::now_ms(),
            alg,
        });
        Ok(())
    }
}

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Vigil's signing keys, found the standard way: its SSF metadata (whose `issuer` must match), then
/// its `jwks_uri`.
pub async fn vigil_keys(client: &reqwest::Client, issuer: &str) -> Result<PublishedKeys, String> {
    let meta = crate::discovery::fetch_metadata(client, issuer)
        .await
        .map_err(err)?;
    let jwks = client
        .get(meta.jwks_uri.unwrap_or_default())
        .send()
        .await
        .map_err(err)?
        .bytes()
        .await
        .map_err(err)?;
    PublishedKeys::from_jwks_json(&jwks)
}

/// Connects to Vigil at `issuer` as the enforcement point with `token`, creates a stream with `method`
/// (a push receiver listens on `listen`), and starts receiving.
pub async fn subscribe(
    issuer: &str,
    token: &str,
    audience: &str,
    method: Method,
    listen: SocketAddr,
) -> Result<EnforcementPoint, String> {
    let client = reqwest::Client::new();
    let keys = vigil_keys(&client, issuer).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let verifier = Arc::new(Verifier {
        issuer: issuer.to_owned(),
        audience: audience.to_owned(),
        keys,
        out: tx,
    });
    let config_ep = format!("{}/ssf/streams", issuer.trim_end_matches('/'));
    let secret = format!("Bearer ep-push-{:x}", rand::random::<u64>());
    let (body, push_listener) = match method {
        Method::Push => {
            let listener = tokio::net::TcpListener::bind(listen).await.map_err(err)?;
            let addr = listener.local_addr().map_err(err)?;
            let body = json!({"delivery": {"method": "urn:ietf:rfc:8935",
                "endpoint_url": format!("http://{addr}/events"), "authorization_header": secret}});
            (body, Some(listener))
        }
        Method::Poll | Method::Sse => (json!({}), None),
    };
    let created: Value = client
        .post(&config_ep)
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .map_err(err)?
        .json()
        .await
        .map_err(err)?;
    let stream_id = created["stream_id"]
        .as_str()
        .ok_or("stream not created")?
        .to_owned();
    if created["iss"] != json!(issuer) {
        return Err(format!("stream `iss` {} is not {issuer}", created["iss"]));
    }
    let task = match (method, push_listener) {
        (Method::Push, Some(listener)) => {
            let app = axum::Router::new()
                .route("/events", axum::routing::post(push_receive))
                .with_state((verifier, secret));
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            })
        }
        (Method::Poll, _) => {
            let url = created["delivery"]["endpoint_url"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            tokio::spawn(poll_loop(client, url, token.to_owned(), verifier))
        }
        _ => {
            let url = format!("{}/ssf/sse/{stream_id}", issuer.trim_end_matches('/'));
            tokio::spawn(sse_loop(client, url, token.to_owned(), verifier))
        }
    };
    Ok(EnforcementPoint {
        stream_id,
        received: rx,
        task,
    })
}

async fn push_receive(
    State((v, secret)): State<(Arc<Verifier>, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, axum::Json<Value>) {
    if headers.get("authorization").and_then(|h| h.to_str().ok()) != Some(secret.as_str()) {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"err": "authentication_failed", "description": "credential"})),
        );
    }
    match v.accept(&String::from_utf8_lossy(&body)) {
        Ok(()) => (StatusCode::ACCEPTED, axum::Json(Value::Null)),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"err": "invalid_request", "description": e})),
        ),
    }
}

async fn poll_loop(client: reqwest::Client, url: String, token: String, v: Arc<Verifier>) {
    let mut ack: Vec<String> = Vec::new();
    loop {
        let body = json!({"ack": ack, "maxEvents": 100});
        let reply = match client
            .post(&url)
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await
        {
            Ok(r) => r.json::<Value>().await.unwrap_or(Value::Null),
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        ack.clear();
        if let Some(sets) = reply["sets"].as_object() {
            for (jti, set) in sets {
                if v.accept(set.as_str().unwrap_or_default()).is_ok() {
                    ack.push(jti.clone());
                }
            }
        }
    }
}

async fn sse_loop(client: reqwest::Client, url: String, token: String, v: Arc<Verifier>) {
    let mut last: Option<String> = None;
    loop {
        let mut req = client.get(&url).bearer_auth(&token);
        if let Some(id) = &last {
            req = req.header("Last-Event-ID", id);
        }
        let Ok(mut resp) = req.send().await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut text = String::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = text.find("\n\n") {
                let block: String = text.drain(..end + 2).collect();
                let field = |name: &str| {
                    block.lines().find_map(|l| {
                        l.strip_prefix(&format!("{name}:"))
                            .map(|x| x.trim().to_owned())
                    })
                };
                if let (Some(id), Some(data)) = (field("id"), field("data")) {
                    if v.accept(&data).is_ok() {
                        last = Some(id);
                    }
                }
            }
        }
    }
}
