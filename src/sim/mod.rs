//! Transmitter-side helpers for the simulators, the load harness and tests: signing keys that sign
//! SETs exactly as an SSF transmitter does, and a small JWKS / SSF-metadata server on loopback whose
//! keys can be rotated while it runs.
//!
//! This is the *other side* of the receiver: its JOSE is its own ([`jose`]: another library, on
//! another crypto backend), so a test that signs here and verifies in [`crate::receiver`] exercises
//! real JWS end to end, and a bug in Vigil's JOSE cannot pass on both sides.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;

pub mod ep;
pub mod idp;
pub mod jose;
pub mod risk;
use serde_json::Value;

pub use jose::{jwks_document, SigningKey, SimError};

/// An HTTP client that calls Vigil's API as the client holding `token` (every request carries
/// `Authorization: Bearer <token>`), for the demo, the load harnesses and the simulators.
pub fn api_client(token: Option<&str>) -> Result<reqwest::Client, reqwest::Error> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(value) = token.and_then(|t| format!("Bearer {t}").parse().ok()) {
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    reqwest::Client::builder().default_headers(headers).build()
}

struct ServerState {
    jwks: RwLock<Value>,
    metadata: RwLock<Option<Value>>,
    jwks_hits: AtomicUsize,
}

/// A JWKS (and optionally SSF metadata) server on loopback. Dropping it stops it.
pub struct JwksServer {
    addr: SocketAddr,
    state: Arc<ServerState>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    /// Serves `jwks` at `/jwks.json` on `addr` (use port 0 for any free port).
    pub async fn start(addr: SocketAddr, jwks: Value) -> Result<JwksServer, SimError> {
        let state = Arc::new(ServerState {
            jwks: RwLock::new(jwks),
            metadata: RwLock::new(None),
            jwks_hits: AtomicUsize::new(0),
        });
        let app = Router::new().fallback(serve).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(JwksServer { addr, state, task })
    }

    /// `http://127.0.0.1:port` of this server.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The JWKS URL.
    pub fn jwks_uri(&self) -> String {
        format!("{}/jwks.json", self.base_url())
    }

    /// Replaces the published keys (key rotation).
    pub fn set_jwks(&self, jwks: Value) {
        if let Ok(mut g) = self.state.jwks.write() {
            *g = jwks;
        }
    }

    /// Publishes SSF metadata for `issuer` at the §7 insertion-rule location (any path under
    /// `/.well-known/ssf-configuration` answers with it).
    pub fn set_metadata(&self, metadata: Value) {
        if let Ok(mut g) = self.state.metadata.write() {
            *g = Some(metadata);
        }
    }

    /// How many times `/jwks.json` was fetched.
    pub fn jwks_hits(&self) -> usize {
        self.state.jwks_hits.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(State(state): State<Arc<ServerState>>, uri: Uri) -> Response {
    let json_response =
        |v: Value| ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response();
    if uri.path() == "/jwks.json" {
        state.jwks_hits.fetch_add(1, Ordering::SeqCst);
        let jwks = state.jwks.read().map(|g| g.clone()).unwrap_or(Value::Null);
        return json_response(jwks);
    }
    if uri.path().starts_with("/.well-known/ssf-configuration") {
        if let Some(meta) = state.metadata.read().ok().and_then(|g| g.clone()) {
            return json_response(meta);
        }
    }
    StatusCode::NOT_FOUND.into_response()
}
