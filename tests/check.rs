//! The live check API, and nginx enforcing revocations through `auth_request` against Vigil.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use base64::Engine as _;

use std::process::{Command, Stdio};

use common::*;
use serde_json::{json, Value};
use vigil::jose::Alg;

const ISS: &str = "https://idp.example.com/123456789/";
const AUD: &str = "https://sp.example.com/caep";

fn now() -> f64 {
    vigil::signal::now_ms() as f64 / 1000.0
}

async fn setup() -> (Transmitter, vigil::Vigil, tempfile::TempDir) {
    let tx = Transmitter::start(&[Alg::RS256]).await;
    let dir = tempfile::tempdir().unwrap();
    let vigil = start(test_config(dir.path(), vec![tx.config("idp", ISS, &[AUD])])).await;
    (tx, vigil, dir)
}

async fn revoke_by_risk(tx: &Transmitter, vigil: &vigil::Vigil, email: &str, jti: &str) {
    let claims = json!({"iss": ISS, "aud": AUD, "jti": jti, "iat": now() as i64,
        "sub_id": {"format": "email", "email": email},
        "events": {"https://schemas.openid.net/secevent/caep/event-type/risk-level-change":
            {"principal": "USER", "current_level": "HIGH", "event_timestamp": now()}}});
    let answer = push(vigil, "idp", &tx.key(Alg::RS256).sign_set(&claims).unwrap()).await;
    assert_eq!(answer.status, 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_answers_from_live_state() {
    let (tx, vigil, _dir) = setup().await;
    let t = now();
    let grant = json!({"id": "tok-1", "kind": "access_token", "subject": {"format": "email", "email": "c@example.com"},
        "session": "sess-9", "token": {"iss": "https://as.example.com", "jti": "jwt-123"},
        "audience": "https://api.example.com", "scopes": ["read"], "issued_at": t - 5.0, "expires_at": t + 600.0});
    assert_eq!(post_json(&vigil, "/v1/grants", &grant).await.0, 201);

    let ask = |body: Value| {
        let vigil = &vigil;
        async move { post_json(vigil, "/v1/check", &body).await }
    };
    let (code, r) =
        ask(json!({"grant_id": "tok-1", "action": "read", "resource": "https://api.example.com"}))
            .await;
    assert_eq!((code, r["decision"].as_str()), (200, Some("allow")), "{r}");
    assert_eq!(
        ask(json!({"session": "sess-9"})).await.1["decision"],
        "allow"
    );
    assert_eq!(
        ask(json!({"token": {"iss": "https://as.example.com", "jti": "jwt-123"}}))
            .await
            .1["decision"],
        "allow"
    );
    assert_eq!(
        ask(json!({"grant_id": "tok-1", "action": "delete"}))
            .await
            .1["decision"],
        "deny"
    );
    // nginx auth_request, naming the grant by the user's JWT in X-Vigil-Token (Authorization
    // carries the gateway's own credential).
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256"}"#);
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(br#"{"iss":"https://as.example.com","jti":"jwt-123"}"#);
    let jwt = format!("{header}.{payload}.c2ln");
    let by_token = |jwt: String| {
        api(&vigil, reqwest::Method::GET, "/v1/check/auth_request")
            .header("x-vigil-token", format!("Bearer {jwt}"))
            .send()
    };
    assert_eq!(by_token(jwt.clone()).await.unwrap().status().as_u16(), 200);
    let other = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(br#"{"iss":"https://as.example.com","jti":"jwt-999"}"#);
    assert_eq!(
        by_token(format!("{header}.{other}.c2ln"))
            .await
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    let unknown = ask(json!({"grant_id": "nope"})).await.1;
    assert_eq!(
        (unknown["decision"].as_str(), unknown["status"].as_str()),
        (Some("deny"), Some("unknown"))
    );
    assert_eq!(
        ask(json!({"grant_id": "tok-1", "session": "sess-9"}))
            .await
            .0,
        400
    );

    revoke_by_risk(&tx, &vigil, "c@example.com", "chk-1").await;
    let r = eventually("the check to deny", || async {
        let r = ask(json!({"token": {"iss": "https://as.example.com", "jti": "jwt-123"}}))
            .await
            .1;
        (r["decision"] == "deny").then_some(r)
    })
    .await;
    assert_eq!(r["status"], "revoked");
    assert!(r["reason"].as_str().unwrap().contains("risk HIGH"), "{r}");
    vigil.shutdown().await;
}

/// A tiny upstream for nginx to proxy to.
async fn upstream() -> std::net::SocketAddr {
    let app = axum::Router::new().fallback(|| async { "upstream says hello" });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_auth_request_enforces_a_revocation() {
    let Ok(nginx) = which("nginx") else {
        assert!(
            std::env::var_os("REQUIRE_NGINX_TEST").is_none(),
            "nginx is required here (REQUIRE_NGINX_TEST is set) but not installed"
        );
        eprintln!(
            "SKIPPED: nginx is not installed here (CI installs it: apt-get install nginx-light)"
        );
        return;
    };
    // nginx holds a check-only credential: it can ask about grants, not register them.
    const NGINX_TOKEN: &str = "nginx-check-token-0123456789";
    let tx = Transmitter::start(&[Alg::RS256]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), vec![tx.config("idp", ISS, &[AUD])]);
    config.clients = vec![
        admin_client(),
        vigil::config::ApiClientConfig {
            name: "nginx".into(),
            token: NGINX_TOKEN.into(),
            roles: vec![vigil::config::Role::Check],
            max_grants: None,
        },
    ];
    // The gateway the grants name (an enforcement point must be configured to be named).
    config.enforcement_points = vec![enforcement_point("nginx", "nginx-ep-token-0123456789")];
    let vigil = start(config).await;
    let up = upstream().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let prefix = dir.path().join("nginx");
    std::fs::create_dir_all(prefix.join("logs")).unwrap();
    let conf = prefix.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            r#"
worker_processes 1;
pid {pid};
error_log {prefix}/logs/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  server {{
    listen 127.0.0.1:{port};
    location / {{
      auth_request /_vigil;
      proxy_pass http://{up};
    }}
    location = /_vigil {{
      internal;
      proxy_pass http://{vigil}/v1/check/auth_request;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-Vigil-Grant $http_x_grant;
      proxy_set_header Authorization "Bearer {token}";
    }}
  }}
}}
"#,
            pid = prefix.join("nginx.pid").display(),
            prefix = prefix.display(),
            vigil = vigil.local_addr(),
            token = NGINX_TOKEN,
        ),
    )
    .unwrap();
    let mut child = Command::new(nginx)
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf)
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}/");
    eventually("nginx to listen", || async {
        client.get(&base).send().await.ok()
    })
    .await;

    let t = now();
    let grant = json!({"id": "web-1", "kind": "session", "subject": {"format": "email", "email": "n@example.com"},
        "issued_at": t - 5.0, "expires_at": t + 600.0, "enforcement_points": ["nginx"]});
    assert_eq!(post_json(&vigil, "/v1/grants", &grant).await.0, 201);

    let get = |grant: &'static str| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            client
                .get(&base)
                .header("X-Grant", grant)
                .send()
                .await
                .unwrap()
        }
    };
    let as_nginx = reqwest::Client::new()
        .post(format!("http://{}/v1/grants", vigil.local_addr()))
        .bearer_auth(NGINX_TOKEN)
        .json(&json!({"id": "web-2", "kind": "session", "subject": {"format": "email", "email": "n@example.com"},
            "issued_at": t - 5.0, "expires_at": t + 600.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        as_nginx.status().as_u16(),
        403,
        "a check-only client registers no grants"
    );

    let ok = get("web-1").await;
    assert_eq!(ok.status().as_u16(), 200);
    assert_eq!(ok.text().await.unwrap(), "upstream says hello");
    assert_eq!(get("unknown-grant").await.status().as_u16(), 401);

    revoke_by_risk(&tx, &vigil, "n@example.com", "ngx-1").await;
    eventually("nginx to refuse the revoked grant", || async {
        (get("web-1").await.status().as_u16() == 403).then_some(())
    })
    .await;

    let _ = child.kill();
    let _ = child.wait();
    vigil.shutdown().await;
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    for dir in [
        "/usr/sbin",
        "/usr/bin",
        "/usr/local/sbin",
        "/usr/local/bin",
        "/sbin",
        "/bin",
    ] {
        let p = std::path::Path::new(dir).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(())
}

/// AuthZEN access evaluation with live context: a request-time rule denies a sensitive action
/// while the user's risk is LOW (which changes no grant), for the user's own session and for an
/// agent acting for the user; each evaluation is a decision record with every hop; the batch
/// endpoint honours its three semantics; the PDP metadata names both endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authzen_evaluates_requests_on_live_context() {
    let (tx, vigil, _dir) = setup().await;
    let t = now();
    let jane = json!({"format": "email", "email": "jane@example.com"});
    let session = json!({"id": "jane-web", "kind": "session", "subject": jane, "session": "s-1",
        "issued_at": t - 5.0, "expires_at": t + 600.0});
    let agent = json!({"id": "agent-1", "kind": "agent_delegation", "principal_type": "agent",
        "subject": {"format": "opaque", "id": "shopping-agent"}, "on_behalf_of": jane,
        "issued_at": t - 5.0, "expires_at": t + 600.0});
    for g in [&session, &agent] {
        assert_eq!(post_json(&vigil, "/v1/grants", g).await.0, 201);
    }
    let request = |grant: &str, action: Value| {
        json!({"subject": {"type": "user", "id": "jane@example.com"},
               "action": action, "resource": {"type": "api", "id": "payments"},
               "context": {"grant_id": grant}})
    };
    let pay = json!({"name": "pay", "properties": {"sensitive": true}});
    let read = json!({"name": "read"});
    let evaluate = |body: Value| {
        let vigil = &vigil;
        async move { post_json(vigil, "/access/v1/evaluation", &body).await }
    };
    for grant in ["jane-web", "agent-1"] {
        let (code, answer) = evaluate(request(grant, pay.clone())).await;
        assert_eq!((code, &answer["decision"]), (200, &json!(true)), "{answer}");
    }

    // LOW risk for jane: no grant changes, but a sensitive action is denied — also to the agent
    // acting for her, through her context.
    let claims = json!({"iss": ISS, "aud": AUD, "jti": "low-1", "iat": now() as i64, "sub_id": jane,
        "events": {"https://schemas.openid.net/secevent/caep/event-type/risk-level-change":
            {"principal": "USER", "current_level": "LOW", "event_timestamp": now()}}});
    assert_eq!(
        push(
            &vigil,
            "idp",
            &tx.key(Alg::RS256).sign_set(&claims).unwrap()
        )
        .await
        .status,
        202
    );
    let denied = eventually("a sensitive action denied", || async {
        let (_, answer) = evaluate(request("jane-web", pay.clone())).await;
        (answer["decision"] == false).then_some(answer)
    })
    .await;
    assert_eq!(
        denied["context"]["rules"],
        json!(["request-sensitive-action-under-risk"])
    );
    assert!(
        denied["context"]["reason_admin"]["en"]
            .as_str()
            .unwrap()
            .contains("risk LOW"),
        "{denied}"
    );
    assert_eq!(
        evaluate(request("jane-web", read.clone())).await.1["decision"],
        true
    );
    let (_, agent_answer) = evaluate(request("agent-1", pay.clone())).await;
    assert_eq!(agent_answer["decision"], false, "{agent_answer}");
    assert!(
        agent_answer["context"]["reason_admin"]["en"]
            .as_str()
            .unwrap()
            .contains("delegating user"),
        "{agent_answer}"
    );
    let (_, held) = get_json(&vigil, "/v1/grants/jane-web").await;
    assert_eq!(held["status"], "active", "no grant changed: {held}");

    // The grants of a session, or of a token, are named as `check` names them.
    let mut by_session = request("x", pay.clone());
    by_session["context"] = json!({"session": "s-1"});
    let (_, answer) = evaluate(by_session).await;
    assert_eq!(answer["decision"], false, "{answer}");
    assert_eq!(
        answer["context"]["rules"],
        json!(["request-sensitive-action-under-risk"])
    );
    let mut by_token = request("x", read.clone());
    by_token["context"] = json!({"token": {"iss": "https://as.example.com", "jti": "unknown"}});
    assert_eq!(evaluate(by_token).await.1["context"]["status"], "unknown");

    // Fail closed: no grant named, or one Vigil does not hold.
    let mut unnamed = request("x", read.clone());
    unnamed["context"] = json!({});
    for body in [unnamed, request("nope", read.clone())] {
        let (_, answer) = evaluate(body).await;
        assert_eq!(answer["decision"], false, "{answer}");
        assert_eq!(answer["context"]["status"], "unknown", "{answer}");
    }
    let mut malformed = request("jane-web", read.clone());
    malformed["subject"] = json!({"type": "user"});
    assert_eq!(evaluate(malformed).await.0, 400);

    // The decision log holds each evaluation, the agent's with both hops.
    let (_, log) = get_json(&vigil, "/v1/decisions?cause=access_request&grant=agent-1").await;
    let records = log["decisions"].as_array().unwrap();
    let denial = records
        .iter()
        .find(|d| d["effect"] == "deny")
        .unwrap_or_else(|| panic!("{log}"));
    let hops = denial["hops"].as_array().unwrap();
    assert_eq!(hops.len(), 2, "{denial}");
    assert_eq!(hops[0]["role"], "principal");
    assert_eq!(hops[1]["role"], "delegating_user");
    assert_eq!(hops[1]["principal"], "email:jane@example.com");
    assert_eq!(hops[1]["denied"], true);
    assert!(denial["policy_version"]
        .as_str()
        .is_some_and(|v| !v.is_empty()));
    assert_eq!(
        denial["cause"]["source"], "client:local-admin",
        "the client that asked: {denial}"
    );

    // Batches: defaults at the top, each entry replacing them; three semantics.
    let batch = |semantic: &str| {
        json!({"subject": {"type": "user", "id": "jane@example.com"},
               "resource": {"type": "api", "id": "payments"},
               "context": {"grant_id": "jane-web"},
               "options": {"evaluations_semantic": semantic},
               "evaluations": [{"action": read}, {"action": pay}, {"action": read}]})
    };
    for (semantic, expected) in [
        ("execute_all", vec![true, false, true]),
        ("deny_on_first_deny", vec![true, false]),
        ("permit_on_first_permit", vec![true]),
    ] {
        let (code, answer) = post_json(&vigil, "/access/v1/evaluations", &batch(semantic)).await;
        assert_eq!(code, 200, "{answer}");
        let got: Vec<bool> = answer["evaluations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["decision"].as_bool().unwrap())
            .collect();
        assert_eq!(got, expected, "{semantic}: {answer}");
    }
    let mut single = batch("execute_all");
    single.as_object_mut().unwrap().remove("evaluations");
    single["action"] = read.clone();
    assert_eq!(
        post_json(&vigil, "/access/v1/evaluations", &single).await.1["decision"],
        true
    );
    assert_eq!(
        post_json(&vigil, "/access/v1/evaluations", &batch("whatever"))
            .await
            .0,
        400
    );

    let (code, metadata) = get_json(&vigil, "/.well-known/authzen-configuration").await;
    assert_eq!(code, 200);
    let pdp = metadata["policy_decision_point"].as_str().unwrap();
    assert_eq!(
        metadata["access_evaluation_endpoint"],
        format!("{pdp}/access/v1/evaluation")
    );
    assert_eq!(
        metadata["access_evaluations_endpoint"],
        format!("{pdp}/access/v1/evaluations")
    );
    vigil.shutdown().await;
}
