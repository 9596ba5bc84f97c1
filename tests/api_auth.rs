//! Every endpoint but discovery, the JWKS and `/healthz` needs a credential, and each credential
//! opens only its own door: API clients by role, enforcement points only the SSF stream endpoints,
//! transmitters only their push endpoint.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use reqwest::Method;
use serde_json::json;
use vigil::config::ApiClientConfig;
use vigil::config::Role;
use vigil::jose::Alg;

const ISS: &str = "https://idp.example.com/";
const AUD: &str = "https://vigil.example.com/";
const GRANTS: &str = "grants-client-token-0123";
const CHECK: &str = "check-client-token-01234";
const METRICS: &str = "metrics-client-token-012";
const EP: &str = "enforcement-point-token-0";

fn client(name: &str, token: &str, role: Role) -> ApiClientConfig {
    ApiClientConfig {
        name: name.into(),
        token: token.into(),
        roles: vec![role],
        max_grants: None,
    }
}

/// Each API route with the role it needs.
fn routes() -> Vec<(Method, &'static str, Role)> {
    vec![
        (Method::POST, "/v1/grants", Role::Grants),
        (Method::GET, "/v1/grants/g1", Role::Grants),
        (Method::DELETE, "/v1/grants/g1", Role::Grants),
        (Method::POST, "/v1/check", Role::Check),
        (Method::GET, "/v1/check/auth_request", Role::Check),
        (Method::POST, "/access/v1/evaluation", Role::Check),
        (Method::POST, "/access/v1/evaluations", Role::Check),
        (Method::GET, "/v1/decisions", Role::Operator),
        (Method::GET, "/v1/subjects?q=a", Role::Operator),
        (Method::GET, "/v1/signals", Role::Operator),
        (Method::GET, "/v1/enforcement-points", Role::Operator),
        (
            Method::GET,
            "/v1/subjects/email:a@example.com",
            Role::Operator,
        ),
        (Method::GET, "/v1/grants", Role::Operator),
        (Method::GET, "/v1/grants/g1/explain", Role::Operator),
        (Method::GET, "/v1/policies", Role::Operator),
        (Method::POST, "/v1/policies/reload", Role::Operator),
        (Method::POST, "/v1/policies/impact", Role::Operator),
        (Method::POST, "/v1/policies/replay", Role::Operator),
        (Method::GET, "/v1/policies/shadow", Role::Operator),
        (Method::PUT, "/v1/policies/shadow", Role::Operator),
        (Method::DELETE, "/v1/policies/shadow", Role::Operator),
        (Method::POST, "/v1/policies/shadow/promote", Role::Operator),
        (
            Method::GET,
            "/v1/policies/shadow/divergences",
            Role::Operator,
        ),
        (Method::GET, "/v1/deadletters", Role::Operator),
        (Method::POST, "/v1/deadletters/replay", Role::Operator),
        (Method::POST, "/v1/keys/rotate", Role::Operator),
        (Method::GET, "/v1/ssf/streams", Role::Operator),
        (Method::GET, "/v1/ssf/streams/idp", Role::Operator),
        (Method::GET, "/metrics", Role::Metrics),
        (Method::GET, "/readyz", Role::Metrics),
    ]
}

fn token_for(role: Role) -> &'static str {
    match role {
        Role::Grants => GRANTS,
        Role::Check => CHECK,
        Role::Metrics => METRICS,
        Role::Operator => ADMIN_TOKEN,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_needs_the_right_credential() {
    let tx = Transmitter::start(&[Alg::RS256]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), vec![tx.config("idp", ISS, &[AUD])]);
    // The admin client holds only `operator` here, so it proves nothing beyond its role.
    config.clients = vec![
        client("ops", ADMIN_TOKEN, Role::Operator),
        client("gw", GRANTS, Role::Grants),
        client("nginx", CHECK, Role::Check),
        client("prom", METRICS, Role::Metrics),
    ];
    config.enforcement_points = vec![enforcement_point("ep1", EP)];
    config.validate().unwrap();
    let vigil = start(config).await;
    assert!(
        vigil.admin_token().is_none(),
        "configured clients: nothing generated"
    );
    assert!(!dir.path().join(vigil::auth::ADMIN_TOKEN_FILE).exists());
    let base = format!("http://{}", vigil.local_addr());
    let http = reqwest::Client::new();
    let send = |method: Method, path: &str, token: Option<&str>| {
        let mut req = http
            .request(method.clone(), format!("{base}{path}"))
            .header("X-Vigil-Grant", "g1");
        if method == Method::POST {
            req = req.json(&json!({}));
        }
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let challenge = resp
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap().to_owned());
            (status, challenge, resp.text().await.unwrap())
        }
    };

    for (method, path, role) in routes() {
        let (status, challenge, body) = send(method.clone(), path, None).await;
        assert_eq!(status, 401, "{method} {path} without a token: {body}");
        assert!(challenge.unwrap().starts_with("Bearer"), "{method} {path}");
        let (status, _, _) = send(method.clone(), path, Some("not-a-known-token-0000")).await;
        assert_eq!(status, 401, "{method} {path} with an unknown token");
        // An enforcement point's token is not an API credential.
        let (status, _, _) = send(method.clone(), path, Some(EP)).await;
        assert_eq!(
            status, 401,
            "{method} {path} with an enforcement point's token"
        );
        for other in [Role::Grants, Role::Check, Role::Metrics, Role::Operator] {
            let token = token_for(other);
            let (status, challenge, body) = send(method.clone(), path, Some(token)).await;
            assert!(
                !body.contains(token),
                "{method} {path}: the token is echoed"
            );
            let allowed = other == role || (role == Role::Metrics && other == Role::Operator);
            if allowed {
                // Past the credential check (`auth_request` itself answers 401 for an unknown
                // grant, which is nginx's "deny", not a refused credential).
                assert!(
                    status != 403 && !body.contains("bearer token is required"),
                    "{method} {path} as {other:?}: {status} {body}"
                );
            } else {
                assert_eq!(status, 403, "{method} {path} as {other:?}: {body}");
                assert!(challenge.unwrap().contains("insufficient_scope"));
            }
        }
    }

    // API client tokens open neither the enforcement points' SSF endpoints nor a transmitter's push.
    for token in [ADMIN_TOKEN, GRANTS, CHECK, METRICS] {
        let (status, _, _) = send(Method::GET, "/ssf/streams", Some(token)).await;
        assert_eq!(status, 401, "stream management with an API client token");
        let (status, _, _) = send(Method::POST, "/ssf/poll/anything", Some(token)).await;
        assert_eq!(status, 401, "poll with an API client token");
        let resp = http
            .post(format!("{base}/ssf/push/idp"))
            .header("content-type", "application/secevent+jwt")
            .bearer_auth(token)
            .body("x.y.z")
            .send()
            .await
            .unwrap();
        // RFC 8935: a refused push is a 400 whose `err` says why.
        assert_eq!(resp.status().as_u16(), 400);
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(
            body["err"], "authentication_failed",
            "push with an API client token"
        );
    }
    // The enforcement point's own endpoints take its token.
    let (status, _, body) = send(Method::GET, "/ssf/streams", Some(EP)).await;
    assert_eq!(status, 200, "{body}");

    // Open to all: discovery, keys, liveness.
    for path in ["/.well-known/ssf-configuration", "/jwks.json", "/healthz"] {
        let (status, _, _) = send(Method::GET, path, None).await;
        assert_eq!(status, 200, "{path}");
    }
    let (_, metrics) = get_as(&vigil, "/metrics", METRICS).await;
    assert!(metrics.contains("vigil_api_denied_total{reason=\"unauthenticated\"}"));
    assert!(metrics.contains("vigil_api_denied_total{reason=\"forbidden\"}"));
    vigil.shutdown().await;
}

async fn get_as(vigil: &vigil::Vigil, path: &str, token: &str) -> (u16, String) {
    let resp = reqwest::Client::new()
        .get(format!("http://{}{path}", vigil.local_addr()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// The OpenAPI document describes every route the table above protects, and any client can read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_covers_the_api_and_is_served() {
    let doc: serde_json::Value = serde_norway::from_str(include_str!("../openapi.yaml")).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    for (method, path, role) in routes() {
        // `/v1/grants/g1` is the template `/v1/grants/{id}`, and so on (the query aside).
        let bare = path.split('?').next().unwrap_or(path);
        let template = paths.keys().find(|t| {
            let (ts, ps): (Vec<&str>, Vec<&str>) =
                (t.split('/').collect(), bare.split('/').collect());
            ts.len() == ps.len()
                && ts
                    .iter()
                    .zip(&ps)
                    .all(|(t, p)| t == p || t.starts_with('{'))
        });
        let template = template.unwrap_or_else(|| panic!("{path} is not in openapi.yaml"));
        let op = &paths[template][method.as_str().to_lowercase()];
        assert!(op.is_object(), "{method} {template} is not in openapi.yaml");
        if path.starts_with("/v1/") || path == "/metrics" || path == "/readyz" {
            assert_eq!(op["x-vigil-role"], role_name(role), "{method} {template}");
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), Vec::new());
    config.clients = vec![
        client("prom", METRICS, Role::Metrics),
        client("gw", GRANTS, Role::Grants),
    ];
    let vigil = start(config).await;
    let (status, text) = get_as(&vigil, "/v1/openapi.yaml", GRANTS).await;
    assert_eq!(status, 200);
    assert_eq!(text, include_str!("../openapi.yaml"));
    assert_eq!(get_as(&vigil, "/v1/openapi.yaml", METRICS).await.0, 200);
    assert_eq!(
        get_as(&vigil, "/v1/openapi.yaml", "unknown-token-0000000")
            .await
            .0,
        401
    );
    vigil.shutdown().await;
}

fn role_name(role: Role) -> &'static str {
    role.name()
}
