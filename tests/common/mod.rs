//! Shared harness for end-to-end tests: a transmitter with real keys and a JWKS server on loopback,
//! a Vigil started on 127.0.0.1:0 with a temporary data directory, and an RFC 8935 push client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod browser;
mod scenario;

use std::path::Path;

use serde_json::Value;
use vigil::config::TransmitterConfig;
use vigil::jose::Alg;
use vigil::sim::{jwks_document, JwksServer, SigningKey};
use vigil::{Config, Vigil};

#[allow(unused_imports)] // Not every test file uses them.
pub use scenario::*;

pub const AUTH: &str = "Bearer test-push-secret";

/// A verbatim spec example from `tests/fixtures/spec-examples/`.
pub fn spec_example(file: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/spec-examples/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// A transmitter: signing keys for every algorithm and the JWKS server publishing them.
pub struct Transmitter {
    pub keys: Vec<SigningKey>,
    pub jwks: JwksServer,
}

impl Transmitter {
    pub async fn start(algs: &[Alg]) -> Transmitter {
        let keys: Vec<SigningKey> = algs
            .iter()
            .map(|a| SigningKey::generate(*a, &format!("key-{a}")).unwrap())
            .collect();
        let publics: Vec<_> = keys.iter().map(|k| k.public_jwk().unwrap()).collect();
        let jwks = JwksServer::start("127.0.0.1:0".parse().unwrap(), jwks_document(&publics))
            .await
            .unwrap();
        Transmitter { keys, jwks }
    }

    pub fn key(&self, alg: Alg) -> &SigningKey {
        self.keys.iter().find(|k| k.alg == alg).unwrap()
    }

    /// A transmitter config for `issuer`/`audiences` on `stream`, keyed by this JWKS server.
    pub fn config(&self, stream: &str, issuer: &str, audiences: &[&str]) -> TransmitterConfig {
        let mut config = TransmitterConfig::with_jwks(
            &format!("tx-{stream}"),
            issuer,
            audiences.iter().map(|s| s.to_string()).collect(),
            &format!("{AUTH}-{stream}"),
            self.keys.iter().map(|k| k.alg).collect(),
            &self.jwks.jwks_uri(),
        );
        config.stream = stream.to_owned();
        config
    }
}

/// A config for tests: loopback port 0, data in `dir`, fast JWKS refetch.
pub fn test_config(dir: &Path, transmitters: Vec<TransmitterConfig>) -> Config {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_owned(),
        transmitters,
        ..Config::default()
    };
    config.jwks.min_refetch_interval_secs = 0;
    config.jwks.refetch_floor_secs = 0;
    config.jwks.retry_interval_secs = 1;
    // Every peer of a test is on loopback (the destination-policy tests turn this off).
    config.outbound.allow_loopback = true;
    config.validate().unwrap();
    config
}

pub async fn start(config: Config) -> Vigil {
    Vigil::start(config).await.unwrap()
}

/// A running Vigil with the transmitter that signs for it, its config and its data directory.
pub struct Env {
    pub tx: Transmitter,
    pub vigil: Vigil,
    pub config: Config,
    pub _dir: tempfile::TempDir,
}

impl Env {
    /// Shuts Vigil down and starts it again on the same data directory.
    pub async fn restart(self) -> Env {
        let Env {
            tx,
            vigil,
            config,
            _dir,
        } = self;
        vigil.shutdown().await;
        let vigil = start(config.clone()).await;
        Env {
            tx,
            vigil,
            config,
            _dir,
        }
    }
}

/// The answer to one push.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub content_type: Option<String>,
    pub content_language: Option<String>,
    pub retry_after: Option<String>,
    pub body: String,
}

impl Answer {
    /// The RFC 8935 `err` code of a 400 answer.
    pub fn err(&self) -> Option<String> {
        let v: Value = serde_json::from_str(&self.body).ok()?;
        v.get("err")?.as_str().map(str::to_owned)
    }
}

/// POSTs `body` to `/ssf/push/{stream}` with the given credential and content type.
pub async fn push_raw(
    vigil: &Vigil,
    stream: &str,
    auth: Option<&str>,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> Answer {
    let client = reqwest::Client::new();
    let mut req = client
        .post(format!("http://{}/ssf/push/{stream}", vigil.local_addr()))
        .header("Content-Type", content_type)
        .header("Accept", "application/json")
        .body(body);
    if let Some(auth) = auth {
        req = req.header("Authorization", auth);
    }
    let resp = req.send().await.unwrap();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    Answer {
        status: resp.status().as_u16(),
        content_type: header("content-type"),
        content_language: header("content-language"),
        retry_after: header("retry-after"),
        body: resp.text().await.unwrap(),
    }
}

/// Pushes a token the way a conforming transmitter does.
pub async fn push(vigil: &Vigil, stream: &str, token: &str) -> Answer {
    let auth = format!("{AUTH}-{stream}");
    push_raw(
        vigil,
        stream,
        Some(&auth),
        "application/secevent+jwt",
        token.to_owned(),
    )
    .await
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The token of [`admin_client`], for tests that configure their own API clients.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// An all-roles API client, to configure beside narrower ones.
pub fn admin_client() -> vigil::config::ApiClientConfig {
    use vigil::config::Role;
    vigil::config::ApiClientConfig {
        name: "test-admin".into(),
        token: ADMIN_TOKEN.into(),
        roles: vec![Role::Grants, Role::Check, Role::Operator, Role::Metrics],
        max_grants: None,
    }
}

/// A request to Vigil as an all-roles client: the token Vigil generated when the test configures
/// no clients, else [`ADMIN_TOKEN`].
pub fn api(vigil: &Vigil, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .request(method, format!("http://{}{path}", vigil.local_addr()))
        .bearer_auth(vigil.admin_token().unwrap_or(ADMIN_TOKEN))
}

/// GETs a path on Vigil (as the admin client) and returns the body.
pub async fn get(vigil: &Vigil, path: &str) -> (u16, String) {
    let resp = api(vigil, reqwest::Method::GET, path).send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// POSTs JSON to Vigil (as the admin client).
pub async fn post_json(vigil: &Vigil, path: &str, body: &Value) -> (u16, Value) {
    send_json(vigil, reqwest::Method::POST, path, body).await
}

/// Sends JSON to Vigil with `method` (as the admin client); the answer's body as JSON, or as a
/// string when it is not.
pub async fn send_json(
    vigil: &Vigil,
    method: reqwest::Method,
    path: &str,
    body: &Value,
) -> (u16, Value) {
    let resp = api(vigil, method, path).json(body).send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// GETs JSON from Vigil.
pub async fn get_json(vigil: &Vigil, path: &str) -> (u16, Value) {
    let (status, body) = get(vigil, path).await;
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

/// Polls `check` every 20 ms until it returns `Some`, for at most 10 s.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_within(10, what, check).await
}

/// Polls `check` every 20 ms until it returns `Some`, for at most `secs` seconds.
pub async fn eventually_within<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Percent-encodes a path segment.
pub fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An enforcement point allowed to subscribe with `token`.
pub fn enforcement_point(name: &str, token: &str) -> vigil::config::EnforcementPointConfig {
    vigil::config::EnforcementPointConfig {
        name: name.into(),
        token: token.into(),
        audience: None,
        signing_alg: None,
    }
}

/// Creates a poll stream of CAEP session-revoked for the enforcement point holding `token` at
/// `base` (`http://host:port`); returns its poll URL.
pub async fn create_poll_stream(http: &reqwest::Client, base: &str, token: &str) -> String {
    let created = http
        .post(format!("{base}/ssf/streams"))
        .bearer_auth(token)
        .json(&serde_json::json!({"events_requested":
            ["https://schemas.openid.net/secevent/caep/event-type/session-revoked"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status().as_u16(), 201);
    let stream: Value = created.json().await.unwrap();
    format!("{base}/ssf/poll/{}", stream["stream_id"].as_str().unwrap())
}

/// One RFC 8936 poll of `url` as the enforcement point holding `token`: `body` is the request
/// (`maxEvents`, `returnImmediately`, `ack`, …); returns the answer.
pub async fn poll(http: &reqwest::Client, url: &str, token: &str, body: &Value) -> Value {
    let answer = http
        .post(url)
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    answer.json().await.unwrap()
}

/// A pushed CAEP session-revoked signal as intake records it, `jti` aside always the same.
pub fn recorded_signal(jti: &str) -> vigil::signal::Signal {
    vigil::signal::Signal {
        seq: 0,
        source: vigil::signal::SignalSource::SsfPush {
            transmitter: "t".into(),
            stream: "replay".into(),
        },
        iss: "https://idp.example.com/".into(),
        jti: jti.into(),
        txn: Some("txn-1".into()),
        event_uri: "https://schemas.openid.net/secevent/caep/event-type/session-revoked".into(),
        event: vigil::events::Event::SessionRevoked(Default::default()),
        subject: vigil::subject::SubjectId::Email {
            email: "a@example.com".into(),
        },
        event_time: 1_700_000_000.0,
        iat: 1_700_000_001.0,
        received_at_ms: 1_700_000_001_000,
        attributes: Default::default(),
        ttl_secs: None,
    }
}

/// `GET url` as the admin client ([`ADMIN_TOKEN`]).
pub async fn admin_get(http: &reqwest::Client, url: &str) -> reqwest::Response {
    http.get(url).bearer_auth(ADMIN_TOKEN).send().await.unwrap()
}

/// The decisions `/v1/decisions?<query>` lists at `base` (as the admin client), in its order.
pub async fn listed_decisions(http: &reqwest::Client, base: &str, query: &str) -> Vec<Value> {
    let listed: Value = admin_get(http, &format!("{base}/v1/decisions?{query}"))
        .await
        .json()
        .await
        .unwrap();
    listed["decisions"].as_array().unwrap().clone()
}
