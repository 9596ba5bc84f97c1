//! What Vigil presents to a transmitter's management API and poll endpoint: a fixed
//! `Authorization` value (`manage.credential`), or access tokens it gets with OAuth 2.0 client
//! credentials (`manage.oauth`, RFC 6749 §4.4) — the CAEP interoperability profile's way.
//!
//! A token is kept until shortly before it expires ([`REFRESH_MARGIN`]) and fetched again then, or
//! at once after the transmitter answers 401 (one retry per call: [`Credential::rejected`]).
//! The token endpoint is configured, or read from the authorization server's RFC 8414 metadata
//! (on that server's own origin); the client authenticates with `client_secret_basic`,
//! `client_secret_post` or `private_key_jwt` (RFC 7523). Secrets never reach a log or an error:
//! a token endpoint's refusal is reported by status and OAuth error code only.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};

use crate::config::{ClientAuthMethod, OAuthClient};
use crate::signing::SigningKey;

/// Why no token could be had.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("authorization server metadata: {0}")]
    Metadata(String),
    #[error("token endpoint: {0}")]
    Token(String),
    #[error("client key: {0}")]
    Key(String),
}

/// A token is fetched again this long before it expires (or at a tenth of its lifetime, if
/// shorter): a call never leaves with a token about to lapse.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(30);
/// The longest lifetime believed (`expires_in` is the server's word); the shortest is a second.
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Without `expires_in`, a token is kept this long.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
/// The largest token or metadata response read.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// What goes in the `Authorization` header of management and poll calls.
#[derive(Clone)]
pub enum Credential {
    Fixed(String),
    OAuth(Arc<TokenSource>),
}

/// Never the secret: `Fixed(<redacted>)`, `OAuth(<transmitter>)`.
impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Fixed(_) => f.write_str("Fixed(<redacted>)"),
            Credential::OAuth(source) => write!(f, "OAuth({})", source.transmitter),
        }
    }
}

impl Credential {
    /// The header value to send now.
    pub async fn header(&self) -> Result<String, CredentialError> {
        match self {
            Credential::Fixed(value) => Ok(value.clone()),
            Credential::OAuth(source) => source.bearer().await,
        }
    }

    /// The transmitter answered 401 to `sent`: whether asking again is worth it (a token, now
    /// dropped, so the next [`Credential::header`] fetches a fresh one; a fixed value will not
    /// change).
    pub fn rejected(&self, sent: &str) -> bool {
        match self {
            Credential::Fixed(_) => false,
            Credential::OAuth(source) => {
                source.forget(sent);
                true
            }
        }
    }
}

struct Cached {
    header: String,
    refresh_at: Instant,
}

/// Access tokens from one authorization server for one client.
pub struct TokenSource {
    /// The transmitter it is for (metrics, errors).
    transmitter: String,
    http: reqwest::Client,
    config: OAuthClient,
    /// Where metadata is read when no token endpoint is configured.
    authorization_server: String,
    /// `private_key_jwt`: the key client assertions are signed with.
    key: Option<SigningKey>,
    cached: tokio::sync::Mutex<Option<Cached>>,
}

impl TokenSource {
    /// A source for `transmitter`'s `config`; `issuer` is the transmitter's (the default
    /// authorization server).
    pub fn new(
        transmitter: &str,
        http: reqwest::Client,
        config: OAuthClient,
        issuer: &str,
    ) -> Result<TokenSource, CredentialError> {
        let key = match (&config.auth_method, &config.private_key_path) {
            (ClientAuthMethod::PrivateKeyJwt, Some(path)) => {
                let pem = std::fs::read(path)
                    .map_err(|e| CredentialError::Key(format!("{}: {e}", path.display())))?;
                let kid = config.key_id.clone().unwrap_or_default();
                Some(
                    SigningKey::from_pem(config.private_key_alg, &kid, &pem)
                        .map_err(|e| CredentialError::Key(e.to_string()))?,
                )
            }
            (ClientAuthMethod::PrivateKeyJwt, None) => {
                return Err(CredentialError::Key(
                    "private_key_jwt needs private_key_path".into(),
                ))
            }
            _ => None,
        };
        Ok(TokenSource {
            transmitter: transmitter.to_owned(),
            authorization_server: config
                .authorization_server
                .clone()
                .unwrap_or_else(|| issuer.to_owned()),
            http,
            config,
            key,
            cached: tokio::sync::Mutex::new(None),
        })
    }

    /// `Bearer <token>`: the cached one while it is fresh, else a new one.
    pub async fn bearer(&self) -> Result<String, CredentialError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref().filter(|c| Instant::now() < c.refresh_at) {
            return Ok(c.header.clone());
        }
        let (token, lifetime) = self.fetch().await?;
        let margin = REFRESH_MARGIN.min(lifetime / 10);
        let header = format!("Bearer {token}");
        *cached = Some(Cached {
            header: header.clone(),
            refresh_at: Instant::now() + lifetime.saturating_sub(margin),
        });
        Ok(header)
    }

    /// Drops the cached token if it is `sent` (a 401 answered it).
    fn forget(&self, sent: &str) {
        if let Ok(mut cached) = self.cached.try_lock() {
            if cached.as_ref().is_some_and(|c| c.header == sent) {
                *cached = None;
            }
        }
    }

    /// The token endpoint: configured, or from the authorization server's RFC 8414 metadata —
    /// only on that server's own origin (the client's secret goes there).
    async fn token_endpoint(&self) -> Result<String, CredentialError> {
        if let Some(url) = &self.config.token_endpoint {
            return Ok(url.clone());
        }
        let server = &self.authorization_server;
        let url = crate::discovery::metadata_url(server, "oauth-authorization-server")
            .map_err(|e| CredentialError::Metadata(e.to_string()))?;
        let resp = self
            .http
            .get(url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| CredentialError::Metadata(format!("{url}: {e}")))?;
        if !resp.status().is_success() {
            return Err(CredentialError::Metadata(format!(
                "{url}: HTTP {}",
                resp.status()
            )));
        }
        let body = crate::outbound::read_capped(resp, MAX_RESPONSE_BYTES)
            .await
            .map_err(|e| CredentialError::Metadata(e.to_string()))?;
        let metadata: Value = serde_json::from_slice(&body)
            .map_err(|e| CredentialError::Metadata(format!("{url}: not JSON: {e}")))?;
        // RFC 8414 §3.3: the metadata's issuer must be the one asked.
        if metadata["issuer"].as_str() != Some(server.as_str()) {
            return Err(CredentialError::Metadata(format!(
                "{url} names issuer {} , not {server}",
                crate::outbound::excerpt(&metadata["issuer"].to_string())
            )));
        }
        let endpoint = metadata["token_endpoint"]
            .as_str()
            .ok_or_else(|| CredentialError::Metadata(format!("{url} has no token_endpoint")))?;
        crate::outbound::same_origin(endpoint, server)
            .map_err(|e| CredentialError::Metadata(e.to_string()))?;
        Ok(endpoint.to_owned())
    }

    /// One client credentials grant: the token and how long it may be used.
    async fn fetch(&self) -> Result<(String, Duration), CredentialError> {
        let endpoint = self.token_endpoint().await?;
        let mut form: Vec<(&str, String)> = vec![("grant_type", "client_credentials".into())];
        if let Some(scope) = &self.config.scope {
            form.push(("scope", scope.clone()));
        }
        let secret = self.config.client_secret.clone().unwrap_or_default();
        let mut request = self.http.post(&endpoint);
        match self.config.auth_method {
            ClientAuthMethod::ClientSecretBasic => {
                // RFC 6749 §2.3.1: both form-urlencoded before they are joined.
                let pair = format!(
                    "{}:{}",
                    form_encode(&self.config.client_id),
                    form_encode(&secret)
                );
                request = request.header(
                    reqwest::header::AUTHORIZATION,
                    format!("Basic {}", STANDARD.encode(pair)),
                );
            }
            ClientAuthMethod::ClientSecretPost => {
                form.push(("client_id", self.config.client_id.clone()));
                form.push(("client_secret", secret));
            }
            ClientAuthMethod::PrivateKeyJwt => {
                let key = self
                    .key
                    .as_ref()
                    .ok_or_else(|| CredentialError::Key("no client key loaded".into()))?;
                let now = crate::signal::now_ms() / 1000;
                let assertion = key
                    .sign_jwt(&json!({
                        "iss": self.config.client_id, "sub": self.config.client_id,
                        "aud": endpoint, "iat": now, "exp": now + 60,
                        "jti": format!("{:032x}", rand::random::<u128>()),
                    }))
                    .map_err(|e| CredentialError::Key(e.to_string()))?;
                form.push(("client_id", self.config.client_id.clone()));
                form.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                ));
                form.push(("client_assertion", assertion));
            }
        }
        let resp = request
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form)
            .send()
            .await
            .map_err(|e| CredentialError::Token(crate::outbound::excerpt(&e.to_string())))?;
        let status = resp.status();
        let body = crate::outbound::read_capped(resp, MAX_RESPONSE_BYTES)
            .await
            .map_err(|e| CredentialError::Token(e.to_string()))?;
        let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if !status.is_success() {
            // The OAuth error code only (RFC 6749 §5.2): the description may echo what was sent.
            let code = answer["error"].as_str().unwrap_or("no error code");
            return Err(CredentialError::Token(format!(
                "HTTP {status}: {}",
                crate::outbound::excerpt(code)
            )));
        }
        let token = answer["access_token"]
            .as_str()
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or_else(|| CredentialError::Token("no usable access_token in the answer".into()))?;
        let bearer = answer["token_type"]
            .as_str()
            .is_some_and(|t| t.eq_ignore_ascii_case("bearer"));
        if !bearer {
            return Err(CredentialError::Token("token_type is not Bearer".into()));
        }
        // Saturated before use: a server's "expires_in" cannot make Vigil keep a token for ever
        // or overflow a deadline.
        let lifetime = answer["expires_in"]
            .as_f64()
            .filter(|s| s.is_finite() && *s > 0.0)
            .map_or(DEFAULT_LIFETIME, |s| {
                Duration::from_secs_f64(s.min(MAX_LIFETIME.as_secs_f64()))
            })
            .max(Duration::from_secs(1));
        metrics::counter!(crate::telemetry::SSF_CLIENT_TOKENS, "transmitter" => self.transmitter.clone())
            .increment(1);
        Ok((token.to_owned(), lifetime))
    }
}

/// `application/x-www-form-urlencoded` of one value.
fn form_encode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_form_encoded_first() {
        assert_eq!(form_encode("a b:c"), "a+b%3Ac");
    }
}
