//! Who may call Vigil's own API: bearer tokens mapped to named clients with roles.
//!
//! | role | routes |
//! |---|---|
//! | `grants` | `POST /v1/grants`, `GET`/`DELETE /v1/grants/{id}` |
//! | `check` | `POST /v1/check`, `GET /v1/check/auth_request` |
//! | `operator` | `/v1/decisions`, `/v1/subjects/*`, `/v1/policies*`, `/v1/deadletters*`, `/v1/keys/rotate`, `/v1/ssf/streams*`, and everything `metrics` may |
//! | `metrics` | `GET /metrics`, `GET /readyz` |
//!
//! Transmitters (`/ssf/push/*`) and enforcement points (`/ssf/*`) are authenticated by their own
//! sections of the config, bound to their own streams; a client token opens none of those, and their
//! tokens open none of these routes. Open to all: `/.well-known/*`, the JWKS and `/healthz`.
//!
//! Tokens are compared as SHA-256 digests in constant time, against every client (no early exit),
//! so neither the length nor the position of a match leaks through timing. A token is never
//! logged or echoed; a denial logs the route and, when the token was valid, the client's name.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use base64::Engine as _;
use subtle::ConstantTimeEq;

use crate::config::{ApiClientConfig, Role};
use crate::grant::Registrant;

/// The file holding the generated token when no client is configured.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read or write the admin token file {path}: {source}")]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the admin token file {0} holds no usable token (at least 16 characters)")]
    BadTokenFile(PathBuf),
}

struct Client {
    name: String,
    digest: [u8; 32],
    roles: Vec<Role>,
    /// What the grants this client registers count against.
    registrant: Registrant,
}

/// The client a request was authorized as (a request extension): the registrant of the grants it
/// registers, and the `source` of the access decisions it asks for.
#[derive(Debug, Clone, Copy)]
pub struct Caller(pub Registrant);

impl Client {
    fn allows(&self, role: Role) -> bool {
        self.roles.contains(&role)
            || (role == Role::Metrics && self.roles.contains(&Role::Operator))
    }
}

/// The configured clients, and each one's request rate limit.
pub struct ApiAuth {
    clients: Vec<Client>,
    limiter: Option<crate::limits::RateLimiter>,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No bearer token, or one no client holds: 401.
    Unauthenticated,
    /// A valid client without the role: 403.
    Forbidden { client: String, role: Role },
}

impl ApiAuth {
    /// The clients of `configs`; with none, one all-roles client (`local-admin`) whose token is
    /// read from `<data_dir>/admin.token`, or generated there (mode 0600) on first start. Returns
    /// the generated or read token too, for in-process tools and tests.
    pub fn new(
        configs: &[ApiClientConfig],
        data_dir: &Path,
    ) -> Result<(ApiAuth, Option<String>), AuthError> {
        if !configs.is_empty() {
            let clients = configs
                .iter()
                .map(|c| Client {
                    name: c.name.clone(),
                    digest: digest(&c.token),
                    roles: c.roles.clone(),
                    registrant: Registrant::client(&c.name),
                })
                .collect();
            return Ok((
                ApiAuth {
                    clients,
                    limiter: None,
                },
                None,
            ));
        }
        let path = data_dir.join(ADMIN_TOKEN_FILE);
        let token = load_or_create_token(&path)?;
        tracing::warn!(path = %path.display(),
            "no [[clients]] configured: the API takes the all-roles token stored in this file");
        let auth = ApiAuth {
            clients: vec![Client {
                name: "local-admin".into(),
                digest: digest(&token),
                roles: vec![Role::Grants, Role::Check, Role::Operator, Role::Metrics],
                registrant: Registrant::client("local-admin"),
            }],
            limiter: None,
        };
        Ok((auth, Some(token)))
    }

    /// Limits each client to `limiter`'s rate (429 with `Retry-After` beyond it).
    pub fn with_rate_limit(mut self, limiter: crate::limits::RateLimiter) -> ApiAuth {
        self.limiter = Some(limiter);
        self
    }

    /// The client presenting `headers`' bearer token, if it may act as `role`.
    pub fn authorize(&self, headers: &HeaderMap, role: Role) -> Result<&str, Denied> {
        self.authorized(headers, role).map(|c| c.name.as_str())
    }

    fn authorized(&self, headers: &HeaderMap, role: Role) -> Result<&Client, Denied> {
        let client = self.client(headers)?;
        if client.allows(role) {
            Ok(client)
        } else {
            Err(Denied::Forbidden {
                client: client.name.clone(),
                role,
            })
        }
    }

    fn client(&self, headers: &HeaderMap) -> Result<&Client, Denied> {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .ok_or(Denied::Unauthenticated)?;
        let presented = digest(presented);
        let mut found: Option<&Client> = None;
        for c in &self.clients {
            if bool::from(c.digest.ct_eq(&presented)) {
                found = Some(c);
            }
        }
        found.ok_or(Denied::Unauthenticated)
    }
}

/// The token of an `Authorization: Bearer <token>` value (scheme case-insensitive, RFC 6750).
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A credential's SHA-256, what credentials are compared as: equal-length values compared in
/// constant time, so neither a token's length nor its content leaks through timing.
///
/// OpenSSL's SHA-256 functions, not its one-shot `SHA256()`: in OpenSSL 3 that one looks the
/// digest up in the provider tables on every call, which cost more than the hashing (every
/// pushed SET's credential is digested).
pub fn digest(token: impl AsRef<[u8]>) -> [u8; 32] {
    let mut h = openssl::sha::Sha256::new();
    h.update(token.as_ref());
    h.finish()
}

fn load_or_create_token(path: &Path) -> Result<String, AuthError> {
    let io = |source| AuthError::TokenFile {
        path: path.to_owned(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let token = text.trim().to_owned();
            if token.len() < 16 {
                return Err(AuthError::BadTokenFile(path.to_owned()));
            }
            Ok(token)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let bytes: [u8; 32] = rand::random();
            let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(path).map_err(io)?;
            file.write_all(format!("{token}\n").as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(io)?;
            Ok(token)
        }
        Err(e) => Err(io(e)),
    }
}

/// The refusal as an HTTP answer: 401 with a `WWW-Authenticate` challenge, or 403 naming the
/// missing role (RFC 6750 `insufficient_scope`).
fn refuse(denied: &Denied) -> Response {
    let (status, challenge, description) = match denied {
        Denied::Unauthenticated => (
            StatusCode::UNAUTHORIZED,
            "Bearer realm=\"vigil\"".to_owned(),
            "a valid bearer token is required".to_owned(),
        ),
        Denied::Forbidden { role, .. } => (
            StatusCode::FORBIDDEN,
            format!(
                "Bearer realm=\"vigil\", error=\"insufficient_scope\", scope=\"{}\"",
                role.name()
            ),
            format!("this client lacks the `{}` role", role.name()),
        ),
    };
    let code = match denied {
        Denied::Unauthenticated => "unauthorized",
        Denied::Forbidden { .. } => "forbidden",
    };
    let mut response = crate::error_body::error(status, code, description);
    if let Ok(v) = challenge.parse() {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    response
}

/// Middleware for a group of routes that need `role`, or any known client for `None`
/// (`axum::middleware::from_fn_with_state`).
pub async fn require(
    State((auth, role)): State<(Arc<ApiAuth>, Option<Role>)>,
    mut request: Request,
    next: Next,
) -> Response {
    let authorized = match role {
        Some(role) => auth.authorized(request.headers(), role),
        None => auth.client(request.headers()),
    };
    match authorized.map(|c| (c.name.as_str(), c.registrant)) {
        Ok((client, registrant)) => match auth.limiter.as_ref().map(|l| l.acquire(client)) {
            Some(Err(wait)) => {
                metrics::counter!(crate::telemetry::API_DENIED, "reason" => "rate_limited")
                    .increment(1);
                crate::error_body::refusal(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    "this client is over its rate limit; retry later",
                    wait,
                )
            }
            _ => {
                request.extensions_mut().insert(Caller(registrant));
                next.run(request).await
            }
        },
        Err(denied) => {
            let reason = match &denied {
                Denied::Unauthenticated => "unauthenticated",
                Denied::Forbidden { .. } => "forbidden",
            };
            metrics::counter!(crate::telemetry::API_DENIED, "reason" => reason).increment(1);
            match &denied {
                Denied::Unauthenticated => tracing::info!(path = %request.uri().path(),
                    "API request without a valid token refused"),
                Denied::Forbidden { client, role } => tracing::warn!(path = %request.uri().path(),
                    client, role = role.name(), "API request refused: missing role"),
            }
            refuse(&denied)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        h
    }

    fn client(name: &str, token: &str, roles: &[Role]) -> ApiClientConfig {
        ApiClientConfig {
            name: name.into(),
            token: token.into(),
            roles: roles.to_vec(),
            max_grants: None,
        }
    }

    #[test]
    fn roles_are_kept_apart() {
        let dir = tempfile::tempdir().unwrap();
        let (auth, generated) = ApiAuth::new(
            &[
                client(
                    "gw",
                    "gateway-token-0123456789",
                    &[Role::Grants, Role::Check],
                ),
                client("ops", "operator-token-0123456789", &[Role::Operator]),
            ],
            dir.path(),
        )
        .unwrap();
        assert!(generated.is_none());
        assert!(!dir.path().join(ADMIN_TOKEN_FILE).exists());
        let gw = headers("gateway-token-0123456789");
        assert_eq!(auth.authorize(&gw, Role::Grants), Ok("gw"));
        assert_eq!(auth.authorize(&gw, Role::Check), Ok("gw"));
        assert!(matches!(
            auth.authorize(&gw, Role::Operator),
            Err(Denied::Forbidden { .. })
        ));
        assert!(matches!(
            auth.authorize(&gw, Role::Metrics),
            Err(Denied::Forbidden { .. })
        ));
        let ops = headers("operator-token-0123456789");
        assert_eq!(auth.authorize(&ops, Role::Metrics), Ok("ops"));
        assert!(auth.authorize(&ops, Role::Grants).is_err());
        for bad in [
            "",
            "Bearer",
            "Bearer ",
            "Basic gateway-token-0123456789",
            "gateway-token-0123456789",
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, bad.parse().unwrap());
            assert_eq!(
                auth.authorize(&h, Role::Check),
                Err(Denied::Unauthenticated),
                "{bad:?}"
            );
        }
        assert_eq!(
            auth.authorize(&headers("gateway-token-012345678"), Role::Check),
            Err(Denied::Unauthenticated)
        );
        assert_eq!(
            auth.authorize(&HeaderMap::new(), Role::Check),
            Err(Denied::Unauthenticated)
        );
        let mut lower = HeaderMap::new();
        lower.insert(
            header::AUTHORIZATION,
            "bearer gateway-token-0123456789".parse().unwrap(),
        );
        assert_eq!(auth.authorize(&lower, Role::Check), Ok("gw"));
    }

    #[test]
    fn without_clients_a_private_admin_token_is_generated_once() {
        let dir = tempfile::tempdir().unwrap();
        let (auth, token) = ApiAuth::new(&[], dir.path()).unwrap();
        let token = token.unwrap();
        assert!(token.len() >= 40);
        let path = dir.path().join(ADMIN_TOKEN_FILE);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        for role in [Role::Grants, Role::Check, Role::Operator, Role::Metrics] {
            assert_eq!(auth.authorize(&headers(&token), role), Ok("local-admin"));
        }
        // The next start reuses it.
        let (_, again) = ApiAuth::new(&[], dir.path()).unwrap();
        assert_eq!(again.as_deref(), Some(token.as_str()));
        std::fs::write(&path, "short\n").unwrap();
        assert!(matches!(
            ApiAuth::new(&[], dir.path()),
            Err(AuthError::BadTokenFile(_))
        ));
    }
}
