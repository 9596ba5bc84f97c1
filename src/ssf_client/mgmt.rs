//! The SSF 1.0 §8 stream management API, client side: one method per operation, each accepting
//! exactly the success codes §8 gives it and reporting anything else with the transmitter's body.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::discovery::TransmitterMetadata;

/// Why a management call failed.
#[derive(Debug, thiserror::Error)]
pub enum MgmtError {
    #[error("the transmitter's metadata has no `{0}`")]
    NoEndpoint(&'static str),
    #[error("{op}: {reason}")]
    Transport { op: &'static str, reason: String },
    #[error("{op}: HTTP {status} (SSF §8 says {expected:?}): {body}")]
    Status {
        op: &'static str,
        status: u16,
        expected: &'static [u16],
        body: String,
    },
    /// 429: retry after this long.
    #[error("{op}: too many requests (retry after {retry_after:?})")]
    TooManyRequests {
        op: &'static str,
        retry_after: Duration,
    },
    #[error("{op}: the response is not what §8 describes: {reason}")]
    BadResponse { op: &'static str, reason: String },
    /// SSF §8.1.1.1: a stream whose `iss` is not the transmitter's issuer must not be used.
    #[error("stream `{stream_id}` names iss `{found}`, expected `{expected}`")]
    IssuerMismatch {
        stream_id: String,
        expected: String,
        found: String,
    },
    #[error("stream `{stream_id}` is for aud {found}, none of Vigil's audiences {expected:?}")]
    AudienceMismatch {
        stream_id: String,
        expected: Vec<String>,
        found: String,
    },
}

impl MgmtError {
    /// The transmitter does not know the stream (404).
    pub fn is_not_found(&self) -> bool {
        matches!(self, MgmtError::Status { status: 404, .. })
    }
    /// The transmitter allows one stream per receiver and has one (409).
    pub fn is_conflict(&self) -> bool {
        matches!(self, MgmtError::Status { status: 409, .. })
    }
}

/// A stream configuration as the transmitter returned it, checked against Vigil's issuer and
/// audiences.
#[derive(Debug, Clone)]
pub struct StreamConfig(pub Value);

impl StreamConfig {
    pub fn stream_id(&self) -> &str {
        self.0["stream_id"].as_str().unwrap_or_default()
    }
    pub fn delivery_method(&self) -> &str {
        self.0["delivery"]["method"].as_str().unwrap_or_default()
    }
    pub fn endpoint_url(&self) -> Option<&str> {
        self.0["delivery"]["endpoint_url"].as_str()
    }
    /// The transmitter's `min_verification_interval`, saturated to a week.
    pub fn min_verification_interval(&self) -> u64 {
        self.0["min_verification_interval"]
            .as_u64()
            .unwrap_or(0)
            .min(MAX_VERIFICATION_INTERVAL_SECS)
    }
    fn strings(&self, field: &str) -> Vec<String> {
        match &self.0[field] {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        }
    }
    pub fn events_requested(&self) -> Vec<String> {
        self.strings("events_requested")
    }
    pub fn events_delivered(&self) -> Vec<String> {
        self.strings("events_delivered")
    }
    pub fn aud(&self) -> Vec<String> {
        self.strings("aud")
    }
}

/// The longest a transmitter's `Retry-After` is honoured.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// The largest management response read.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// The longest `min_verification_interval` honoured (a transmitter's value is saturated to it).
pub const MAX_VERIFICATION_INTERVAL_SECS: u64 = 7 * 24 * 3600;

/// The §8 endpoints a transmitter's metadata names.
#[derive(Debug, Clone, Copy)]
enum Endpoint {
    Configuration,
    Status,
    AddSubject,
    RemoveSubject,
    Verification,
}

/// The management API of one transmitter, as Vigil's receiver uses it.
#[derive(Clone)]
pub struct MgmtClient {
    client: reqwest::Client,
    metadata: TransmitterMetadata,
    credential: super::Credential,
    /// The only origin the credential is sent to: the configured issuer's.
    origin: String,
    audiences: Vec<String>,
    /// A `Retry-After` date is read against it.
    clock: crate::clock::Clock,
}

impl MgmtClient {
    /// `origin`: a URL on the origin the management endpoints must be on (the transmitter's
    /// configured issuer).
    pub fn new(
        client: reqwest::Client,
        metadata: TransmitterMetadata,
        credential: super::Credential,
        origin: String,
        audiences: Vec<String>,
        clock: crate::clock::Clock,
    ) -> MgmtClient {
        MgmtClient {
            client,
            metadata,
            credential,
            origin,
            audiences,
            clock,
        }
    }

    pub fn metadata(&self) -> &TransmitterMetadata {
        &self.metadata
    }

    fn endpoint(&self, which: Endpoint) -> Result<&str, MgmtError> {
        let m = &self.metadata;
        let (url, name) = match which {
            Endpoint::Configuration => (&m.configuration_endpoint, "configuration_endpoint"),
            Endpoint::Status => (&m.status_endpoint, "status_endpoint"),
            Endpoint::AddSubject => (&m.add_subject_endpoint, "add_subject_endpoint"),
            Endpoint::RemoveSubject => (&m.remove_subject_endpoint, "remove_subject_endpoint"),
            Endpoint::Verification => (&m.verification_endpoint, "verification_endpoint"),
        };
        let url = url.as_deref().ok_or(MgmtError::NoEndpoint(name))?;
        // The management credential goes only to the transmitter's own origin: metadata that
        // names another host (or plain http) for an endpoint does not get it.
        crate::outbound::same_origin(url, &self.origin).map_err(|e| MgmtError::BadResponse {
            op: name,
            reason: e.to_string(),
        })?;
        Ok(url)
    }

    /// Sends one request and checks its status against `ok`. Returns the body (JSON or `Null`).
    async fn call(
        &self,
        op: &'static str,
        method: Method,
        endpoint: Endpoint,
        query: Option<(&str, &str)>,
        body: Option<&Value>,
        ok: &'static [u16],
    ) -> Result<(u16, Value), MgmtError> {
        let url = self.endpoint(endpoint)?;
        let mut retried = false;
        let (resp, status) = loop {
            let credential = self
                .credential
                .header()
                .await
                .map_err(|e| MgmtError::Transport {
                    op,
                    reason: e.to_string(),
                })?;
            let mut req = self
                .client
                .request(method.clone(), url)
                .header("authorization", &credential)
                .header("accept", "application/json");
            if let Some(q) = query {
                req = req.query(&[q]);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = req.send().await.map_err(|e| MgmtError::Transport {
                op,
                reason: e.to_string(),
            })?;
            let status = resp.status();
            // An access token the transmitter no longer takes: one more try with a new one.
            if status == StatusCode::UNAUTHORIZED
                && !retried
                && self.credential.rejected(&credential)
            {
                retried = true;
                continue;
            }
            break (resp, status);
        };
        if status == StatusCode::TOO_MANY_REQUESTS {
            // Saturated: a transmitter cannot make Vigil wait forever (or overflow a deadline).
            let retry_after = crate::outbound::retry_after(
                resp.headers(),
                MAX_RETRY_AFTER,
                self.clock.system_time(),
            )
            .unwrap_or(Duration::from_secs(60));
            return Err(MgmtError::TooManyRequests { op, retry_after });
        }
        let body = crate::outbound::read_capped(resp, MAX_RESPONSE_BYTES)
            .await
            .map_err(|e| MgmtError::Transport {
                op,
                reason: e.to_string(),
            })?;
        let text = String::from_utf8_lossy(&body);
        if !ok.contains(&status.as_u16()) {
            // Only a short printable excerpt reaches logs and `/v1/ssf/streams`.
            return Err(MgmtError::Status {
                op,
                status: status.as_u16(),
                expected: ok,
                body: crate::outbound::excerpt(&text),
            });
        }
        if text.trim().is_empty() {
            return Ok((status.as_u16(), Value::Null));
        }
        let v = serde_json::from_str(&text).map_err(|e| MgmtError::BadResponse {
            op,
            reason: format!("not JSON: {e}"),
        })?;
        Ok((status.as_u16(), v))
    }

    /// Checks a returned configuration: it has a `stream_id`, its `iss` is the transmitter's
    /// issuer (MUST) and its `aud` names one of Vigil's audiences (SHOULD; Vigil refuses).
    pub fn checked(&self, op: &'static str, mut v: Value) -> Result<StreamConfig, MgmtError> {
        // A transmitter may echo the push credential; it is a secret, so it never goes further
        // (logs, API answers).
        if let Some(d) = v.get_mut("delivery").and_then(Value::as_object_mut) {
            d.remove("authorization_header");
        }
        let config = StreamConfig(v);
        if config.stream_id().is_empty() {
            return Err(MgmtError::BadResponse {
                op,
                reason: "no stream_id".into(),
            });
        }
        let iss = config.0["iss"].as_str().unwrap_or_default();
        if iss != self.metadata.issuer {
            return Err(MgmtError::IssuerMismatch {
                stream_id: crate::outbound::excerpt(config.stream_id()),
                expected: self.metadata.issuer.clone(),
                found: crate::outbound::excerpt(iss),
            });
        }
        let aud = config.aud();
        if !aud.iter().any(|a| self.audiences.contains(a)) {
            return Err(MgmtError::AudienceMismatch {
                stream_id: crate::outbound::excerpt(config.stream_id()),
                expected: self.audiences.clone(),
                found: crate::outbound::excerpt(&format!("{aud:?}")),
            });
        }
        Ok(config)
    }

    /// Create (§8.1.1.1): 201 with the full configuration.
    pub async fn create(&self, request: &Value) -> Result<StreamConfig, MgmtError> {
        let (_, v) = self
            .call(
                "create stream",
                Method::POST,
                Endpoint::Configuration,
                None,
                Some(request),
                &[201],
            )
            .await?;
        let id = v["stream_id"].as_str().map(str::to_owned);
        match self.checked("create stream", v) {
            Ok(c) => Ok(c),
            Err(e) => {
                // The transmitter made a stream Vigil cannot use (wrong `iss` or `aud`): remove it,
                // or every retry would leave one more behind.
                if let Some(id) = id.filter(|i| !i.is_empty()) {
                    if let Err(d) = self.delete(&id).await {
                        tracing::warn!(stream_id = %crate::outbound::excerpt(&id), error = %d,
                            "could not delete the unusable stream just created");
                    }
                }
                Err(e)
            }
        }
    }

    /// Read one (§8.1.1.2): 200 with the configuration.
    pub async fn read(&self, stream_id: &str) -> Result<StreamConfig, MgmtError> {
        let (_, v) = self
            .call(
                "read stream",
                Method::GET,
                Endpoint::Configuration,
                Some(("stream_id", stream_id)),
                None,
                &[200],
            )
            .await?;
        self.checked("read stream", v)
    }

    /// Read all (§8.1.1.2): 200 with an array (`[]` when none). Entries are not checked here: the
    /// caller decides which are Vigil's.
    pub async fn list(&self) -> Result<Vec<Value>, MgmtError> {
        let (_, v) = self
            .call(
                "list streams",
                Method::GET,
                Endpoint::Configuration,
                None,
                None,
                &[200],
            )
            .await?;
        match v {
            Value::Array(a) => Ok(a),
            other => Err(MgmtError::BadResponse {
                op: "list streams",
                reason: format!("expected an array, got {}", kind(&other)),
            }),
        }
    }

    /// Update (§8.1.1.3, PATCH) or replace (§8.1.1.4, PUT): 200 with the configuration, or 202
    /// (accepted, not yet processed: `None`).
    pub async fn update(
        &self,
        request: &Value,
        replace: bool,
    ) -> Result<Option<StreamConfig>, MgmtError> {
        let (op, method) = if replace {
            ("replace stream", Method::PUT)
        } else {
            ("update stream", Method::PATCH)
        };
        let (status, v) = self
            .call(
                op,
                method,
                Endpoint::Configuration,
                None,
                Some(request),
                &[200, 202],
            )
            .await?;
        if status == 202 {
            return Ok(None);
        }
        self.checked(op, v).map(Some)
    }

    /// Delete (§8.1.1.5): 204.
    pub async fn delete(&self, stream_id: &str) -> Result<(), MgmtError> {
        self.call(
            "delete stream",
            Method::DELETE,
            Endpoint::Configuration,
            Some(("stream_id", stream_id)),
            None,
            &[204],
        )
        .await
        .map(|_| ())
    }

    /// Read status (§8.1.2.1): 200 `{stream_id, status, reason?}`.
    pub async fn status(&self, stream_id: &str) -> Result<Value, MgmtError> {
        let (_, v) = self
            .call(
                "read status",
                Method::GET,
                Endpoint::Status,
                Some(("stream_id", stream_id)),
                None,
                &[200],
            )
            .await?;
        status_object("read status", v)
    }

    /// Update status (§8.1.2.2): 200 with the status, or 202 when the transmitter has not decided.
    pub async fn set_status(
        &self,
        stream_id: &str,
        status: &str,
        reason: Option<&str>,
    ) -> Result<Option<Value>, MgmtError> {
        let mut body = json!({"stream_id": stream_id, "status": status});
        if let Some(r) = reason {
            body["reason"] = json!(r);
        }
        let (code, v) = self
            .call(
                "update status",
                Method::POST,
                Endpoint::Status,
                None,
                Some(&body),
                &[200, 202],
            )
            .await?;
        if code == 202 {
            return Ok(None);
        }
        status_object("update status", v).map(Some)
    }

    /// Add subject (§8.1.3.2): 200.
    pub async fn add_subject(
        &self,
        stream_id: &str,
        subject: &Value,
        verified: Option<bool>,
    ) -> Result<(), MgmtError> {
        let mut body = json!({"stream_id": stream_id, "subject": subject});
        if let Some(v) = verified {
            body["verified"] = json!(v);
        }
        self.call(
            "add subject",
            Method::POST,
            Endpoint::AddSubject,
            None,
            Some(&body),
            &[200],
        )
        .await
        .map(|_| ())
    }

    /// Remove subject (§8.1.3.3): 204.
    pub async fn remove_subject(&self, stream_id: &str, subject: &Value) -> Result<(), MgmtError> {
        let body = json!({"stream_id": stream_id, "subject": subject});
        self.call(
            "remove subject",
            Method::POST,
            Endpoint::RemoveSubject,
            None,
            Some(&body),
            &[204],
        )
        .await
        .map(|_| ())
    }

    /// Verification (§8.1.4.2): 204; 429 when asked more often than `min_verification_interval`.
    pub async fn verify(&self, stream_id: &str, state: &str) -> Result<(), MgmtError> {
        let body = json!({"stream_id": stream_id, "state": state});
        self.call(
            "verify stream",
            Method::POST,
            Endpoint::Verification,
            None,
            Some(&body),
            &[204],
        )
        .await
        .map(|_| ())
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn status_object(op: &'static str, v: Value) -> Result<Value, MgmtError> {
    match v["status"].as_str() {
        Some("enabled" | "paused" | "disabled") => Ok(v),
        _ => Err(MgmtError::BadResponse {
            op,
            reason: format!("no valid `status` in {v}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    //! The client against the spec's own HTTP messages: a loopback server answers each operation
    //! with the verbatim response example (status line, headers, body) from SSF 1.0 §8, and the
    //! requests the client sends are compared with the spec's request examples.
    use std::sync::{Arc, Mutex};

    use axum::extract::State;
    use axum::http::{Method as HttpMethod, Uri};
    use axum::response::{IntoResponse, Response};
    use axum::Router;

    use super::*;
    use crate::test_support::spec_example;

    type Seen = Arc<Mutex<Vec<(String, String, Value)>>>;

    /// (status, body) of a verbatim `.http` response example.
    fn http_example(file: &str) -> (u16, String) {
        let path = format!(
            "{}/tests/fixtures/spec-examples/{file}",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = text
            .replace("\r\n", "\n")
            .split_once("\n\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// Which example answers which request.
    fn route(method: &HttpMethod, path: &str, query: Option<&str>) -> &'static str {
        match (method.as_str(), path, query.is_some()) {
            ("POST", "/ssf/mgmt/stream", _) => "ssf-create-stream-response.http",
            ("GET", "/ssf/mgmt/stream", true) => "ssf-read-stream-response.http",
            ("GET", "/ssf/mgmt/stream", false) => "ssf-read-streams-list-one-response.http",
            ("PUT" | "PATCH", "/ssf/mgmt/stream", _) => "ssf-replace-stream-response.http",
            ("DELETE", "/ssf/mgmt/stream", _) => "ssf-http-delete-stream-response.http",
            ("GET", "/ssf/mgmt/status", _) => "ssf-stream-status-response.http",
            ("POST", "/ssf/mgmt/subject:add", _) => "ssf-http-add-subject-response.http",
            ("POST", "/ssf/mgmt/subject:remove", _) => "ssf-http-remove-subject-response.http",
            _ => "ssf-http-verify-response.http",
        }
    }

    async fn answer(
        State(seen): State<Seen>,
        method: HttpMethod,
        uri: Uri,
        body: String,
    ) -> Response {
        let json = serde_json::from_str(&body).unwrap_or(Value::Null);
        seen.lock()
            .unwrap()
            .push((method.to_string(), uri.path().to_owned(), json));
        let (status, body) = http_example(route(&method, uri.path(), uri.query()));
        let status = axum::http::StatusCode::from_u16(status).unwrap();
        (
            status,
            [
                ("content-type", "application/json"),
                ("cache-control", "no-store"),
            ],
            body,
        )
            .into_response()
    }

    async fn spec_transmitter() -> (MgmtClient, Seen) {
        let seen: Seen = Arc::default();
        let app = Router::new().fallback(answer).with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        // The spec's metadata, its endpoints moved to the loopback server (same paths).
        let mut meta = spec_example("ssf-transmitter-configuration-response.json");
        for field in [
            "configuration_endpoint",
            "status_endpoint",
            "add_subject_endpoint",
            "remove_subject_endpoint",
            "verification_endpoint",
        ] {
            let url = meta[field]
                .as_str()
                .unwrap()
                .replace("https://tr.example.com", &base);
            meta[field] = json!(url);
        }
        let metadata: TransmitterMetadata = serde_json::from_value(meta).unwrap();
        let client = MgmtClient::new(
            reqwest::Client::new(),
            metadata,
            super::super::Credential::Fixed("Bearer receiver-credential".into()),
            base,
            vec!["https://receiver.example.com/web".into()],
            crate::clock::Clock::system(),
        );
        (client, seen)
    }

    #[tokio::test]
    async fn the_credential_goes_only_to_the_transmitters_origin() {
        let (client, seen) = spec_transmitter().await;
        let port = client.origin.rsplit(':').next().unwrap().to_owned();
        for elsewhere in [
            format!("http://localhost:{port}/ssf/mgmt/stream"),
            "https://attacker.example/ssf/mgmt/stream".to_owned(),
            format!("https://127.0.0.1:{port}/ssf/mgmt/stream"),
        ] {
            let mut moved = client.clone();
            moved.metadata.configuration_endpoint = Some(elsewhere.clone());
            let e = moved.read("x").await.unwrap_err();
            assert!(
                matches!(e, MgmtError::BadResponse { .. }),
                "{elsewhere}: {e}"
            );
        }
        assert!(seen.lock().unwrap().is_empty(), "nothing was sent");
    }

    #[tokio::test]
    async fn every_operation_accepts_the_spec_response_and_sends_the_spec_request() {
        let (client, seen) = spec_transmitter().await;
        let id = "f67e39a0a4d34d56b3aa1bc4cff0069f";

        let created = client
            .create(&spec_example("ssf-create-stream-request.json"))
            .await
            .unwrap();
        assert_eq!(created.stream_id(), id);
        assert_eq!(
            created.events_delivered(),
            vec![
                "urn:example:secevent:events:type_2",
                "urn:example:secevent:events:type_3"
            ]
        );
        assert_eq!(client.read(id).await.unwrap().stream_id(), id);
        assert_eq!(client.list().await.unwrap().len(), 1);
        let replaced = client
            .update(&spec_example("ssf-replace-stream-request.json"), true)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(replaced.stream_id(), id);
        let status = client.status(id).await.unwrap();
        assert_eq!(status["status"], "paused");
        let add = spec_example("ssf-add-subject-request.json");
        client
            .add_subject(id, &add["subject"], add["verified"].as_bool())
            .await
            .unwrap();
        let remove = spec_example("ssf-remove-subject-request.json");
        client.remove_subject(id, &remove["subject"]).await.unwrap();
        client
            .verify(id, "VGhpcyBpcyBhbiBleGFtcGxlIHN0YXRlIHZhbHVlLgo=")
            .await
            .unwrap();
        client.delete(id).await.unwrap();

        let seen = seen.lock().unwrap().clone();
        let body = |path: &str| {
            seen.iter()
                .find(|(m, p, _)| m == "POST" && p == path)
                .map(|(_, _, b)| b.clone())
                .unwrap()
        };
        assert_eq!(
            body("/ssf/mgmt/subject:add"),
            add,
            "add-subject request as in §8.1.3.2"
        );
        assert_eq!(body("/ssf/mgmt/subject:remove"), remove);
        assert_eq!(body("/ssf/mgmt/verification")["stream_id"], id);
        let methods: Vec<&str> = seen.iter().map(|(m, _, _)| m.as_str()).collect();
        assert_eq!(
            methods,
            ["POST", "GET", "GET", "PUT", "GET", "POST", "POST", "POST", "DELETE"]
        );
    }

    #[test]
    fn an_echoed_push_credential_is_dropped() {
        let metadata: TransmitterMetadata =
            serde_json::from_value(spec_example("ssf-transmitter-configuration-response.json"))
                .unwrap();
        let client = MgmtClient::new(
            reqwest::Client::new(),
            metadata,
            super::super::Credential::Fixed("Bearer x".into()),
            "https://tr.example.com".into(),
            vec!["https://receiver.example.com/web".into()],
            crate::clock::Clock::system(),
        );
        let mut v = spec_example("ssf-create-stream-response.json");
        v["delivery"]["authorization_header"] = json!("Bearer vigil-secret");
        let c = client.checked("create stream", v).unwrap();
        assert!(!c.0.to_string().contains("vigil-secret"));
        assert_eq!(
            c.endpoint_url(),
            Some("https://receiver.example.com/events")
        );
    }

    #[tokio::test]
    async fn a_response_outside_section_8_or_for_another_issuer_or_audience_is_refused() {
        let (client, _) = spec_transmitter().await;
        // Remove-subject answers 204; add-subject's 200 from the same server is fine, but a
        // create answered 204 (the delete example) is not.
        let mut wrong = client.clone();
        wrong.metadata.configuration_endpoint = wrong
            .metadata
            .configuration_endpoint
            .map(|u| u.replace("/ssf/mgmt/stream", "/ssf/mgmt/subject:remove"));
        let e = wrong.create(&json!({})).await.unwrap_err();
        assert!(matches!(e, MgmtError::Status { status: 204, .. }), "{e}");

        let mut other_issuer = client.clone();
        other_issuer.metadata.issuer = "https://other.example.com".into();
        let e = other_issuer.read("x").await.unwrap_err();
        assert!(matches!(e, MgmtError::IssuerMismatch { .. }), "{e}");

        let mut other_aud = client.clone();
        other_aud.audiences = vec!["https://vigil.example".into()];
        let e = other_aud.read("x").await.unwrap_err();
        assert!(matches!(e, MgmtError::AudienceMismatch { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_stream_created_for_another_audience_is_deleted_again() {
        let (mut client, seen) = spec_transmitter().await;
        client.audiences = vec!["https://vigil.example".into()];
        let e = client.create(&json!({})).await.unwrap_err();
        assert!(matches!(e, MgmtError::AudienceMismatch { .. }), "{e}");
        let calls: Vec<String> = seen.lock().unwrap().iter().map(|c| c.0.clone()).collect();
        assert_eq!(calls, ["POST", "DELETE"], "the unusable stream is removed");
    }
}
