//! Vigil as an SSF transmitter toward enforcement points: stream management with the spec's status
//! codes (driven by the spec's own request bodies), and revocations delivered over RFC 8936 poll,
//! signed with Vigil's key and verified the way a standard receiver does.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{json, Value};
use vigil::config::EnforcementPointConfig;
use vigil::jose::Alg;

const EP_TOKEN: &str = "gateway-token-0123456789";
const OTHER_TOKEN: &str = "sidecar-token-0123456789";

async fn env() -> Env {
    start_env(|config| {
        config.enforcement_points = vec![
            EnforcementPointConfig {
                name: "gateway".into(),
                token: EP_TOKEN.into(),
                audience: Some("https://gateway.example.com".into()),
                signing_alg: None,
            },
            EnforcementPointConfig {
                name: "sidecar".into(),
                token: OTHER_TOKEN.into(),
                audience: None,
                signing_alg: None,
            },
        ];
        config.identity.poll_timeout_secs = 2;
    })
    .await
}

async fn call(
    vigil: &vigil::Vigil,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req =
        reqwest::Client::new().request(method, format!("http://{}{path}", vigil.local_addr()));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(if text.is_empty() {
            Value::Null
        } else {
            Value::String(text)
        }),
    )
}

/// Creates a stream for the enforcement point with `token`; returns its id.
async fn create_stream(vigil: &vigil::Vigil, token: &str, body: Value) -> String {
    let (code, st) = call(
        vigil,
        reqwest::Method::POST,
        "/ssf/streams",
        Some(token),
        Some(body),
    )
    .await;
    assert_eq!(code, 201, "{st}");
    st["stream_id"].as_str().unwrap().to_owned()
}

/// Polls a stream without waiting; returns the `sets` object.
async fn poll_now(vigil: &vigil::Vigil, id: &str, token: &str) -> Value {
    let body = Some(json!({"returnImmediately": true}));
    let (code, reply) = call(
        vigil,
        reqwest::Method::POST,
        &format!("/ssf/poll/{id}"),
        Some(token),
        body,
    )
    .await;
    assert_eq!(code, 200, "{reply}");
    reply["sets"].clone()
}

/// The spec's example request `file`, addressed to stream `id`.
fn example_for(file: &str, id: &str) -> Value {
    let mut body = spec_example(file);
    body["stream_id"] = json!(id);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_management_answers_with_the_spec_status_codes() {
    use reqwest::Method;
    let env = env().await;
    let v = &env.vigil;
    let t = Some(EP_TOKEN);
    assert_eq!(
        call(v, Method::GET, "/ssf/streams", None, None).await.0,
        401
    );
    assert_eq!(
        call(
            v,
            Method::GET,
            "/ssf/streams",
            Some("wrong-token-0123456789"),
            None
        )
        .await
        .0,
        401
    );
    assert_eq!(
        call(v, Method::GET, "/ssf/streams", t, None).await,
        (200, json!([]))
    );

    let (code, created) = call(
        v,
        Method::POST,
        "/ssf/streams",
        t,
        Some(spec_example("ssf-create-stream-request.json")),
    )
    .await;
    assert_eq!(code, 201, "{created}");
    let id = created["stream_id"].as_str().unwrap().to_owned();
    assert_eq!(created["iss"], json!(format!("http://{}", v.local_addr())));
    assert_eq!(created["aud"], "https://gateway.example.com");
    assert_eq!(created["delivery"]["method"], "urn:ietf:rfc:8935");
    assert!(created["delivery"].get("authorization_header").is_none());
    assert_eq!(
        created["events_delivered"],
        json!([]),
        "none of the example's event types is supported"
    );

    let (code, one) = call(
        v,
        Method::GET,
        &format!("/ssf/streams?stream_id={id}"),
        t,
        None,
    )
    .await;
    assert_eq!((code, &one["stream_id"]), (200, &json!(id)));
    let (code, list) = call(v, Method::GET, "/ssf/streams", t, None).await;
    assert_eq!((code, list.as_array().unwrap().len()), (200, 1));
    // Another enforcement point sees nothing of it.
    assert_eq!(
        call(v, Method::GET, "/ssf/streams", Some(OTHER_TOKEN), None).await,
        (200, json!([]))
    );
    assert_eq!(
        call(
            v,
            Method::GET,
            &format!("/ssf/streams?stream_id={id}"),
            Some(OTHER_TOKEN),
            None
        )
        .await
        .0,
        404
    );

    let (code, updated) = call(
        v,
        Method::PATCH,
        "/ssf/streams",
        t,
        Some(example_for("ssf-update-stream-request.json", &id)),
    )
    .await;
    assert_eq!(code, 200, "{updated}");
    assert_eq!(
        updated["description"],
        "Stream for Receiver B using events type_2, type_3, type_4"
    );
    assert_eq!(
        updated["delivery"]["method"], "urn:ietf:rfc:8935",
        "PATCH keeps absent fields"
    );
    let (code, replaced) = call(
        v,
        Method::PUT,
        "/ssf/streams",
        t,
        Some(example_for("ssf-replace-stream-request.json", &id)),
    )
    .await;
    assert_eq!(code, 200, "{replaced}");
    let bad = json!({"stream_id": id, "iss": "https://someone-else.example"});
    assert_eq!(
        call(v, Method::PATCH, "/ssf/streams", t, Some(bad)).await.0,
        400
    );

    let (code, status) = call(
        v,
        Method::GET,
        &format!("/ssf/status?stream_id={id}"),
        t,
        None,
    )
    .await;
    assert_eq!((code, &status["status"]), (200, &json!("enabled")));
    let (code, status) = call(
        v,
        Method::POST,
        "/ssf/status",
        t,
        Some(example_for(
            "ssf-update-status-request-with-reason.json",
            &id,
        )),
    )
    .await;
    assert_eq!(code, 200, "{status}");
    assert_eq!(
        status["status"],
        spec_example("ssf-update-status-request-with-reason.json")["status"]
    );

    let (code, body) = call(
        v,
        Method::POST,
        "/ssf/subjects:add",
        t,
        Some(example_for("ssf-add-subject-request.json", &id)),
    )
    .await;
    assert_eq!((code, body), (200, Value::Null));
    let (code, body) = call(
        v,
        Method::POST,
        "/ssf/subjects:remove",
        t,
        Some(example_for("ssf-remove-subject-request.json", &id)),
    )
    .await;
    assert_eq!((code, body), (204, Value::Null));

    let verify = example_for("ssf-verify-request.json", &id);
    assert_eq!(
        call(v, Method::POST, "/ssf/verify", t, Some(verify.clone()))
            .await
            .0,
        204
    );
    assert_eq!(
        call(v, Method::POST, "/ssf/verify", t, Some(verify))
            .await
            .0,
        429,
        "faster than min_verification_interval"
    );

    assert_eq!(
        call(
            v,
            Method::DELETE,
            &format!("/ssf/streams?stream_id={id}"),
            t,
            None
        )
        .await
        .0,
        204
    );
    assert_eq!(
        call(
            v,
            Method::GET,
            &format!("/ssf/streams?stream_id={id}"),
            t,
            None
        )
        .await
        .0,
        404
    );
    env.vigil.shutdown().await;
}

/// Verifies a SET from Vigil with Vigil's published JWKS, as any SSF receiver would — with the
/// simulators' own JOSE, not Vigil's — and returns its claims.
async fn verify_from_vigil(vigil: &vigil::Vigil, set: &str, aud: &str) -> Value {
    let issuer = format!("http://{}", vigil.local_addr());
    let keys = vigil::sim::ep::vigil_keys(&reqwest::Client::new(), &issuer)
        .await
        .unwrap();
    keys.verify_set(set, &issuer, aud).unwrap()
}

/// A verified SET's one event: its type URI and payload.
fn event_of(claims: &Value) -> (&str, &Value) {
    let (uri, payload) = claims["events"].as_object().unwrap().iter().next().unwrap();
    (uri.as_str(), payload)
}

fn now() -> f64 {
    vigil::signal::now_ms() as f64 / 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_a_poll_subscriber_signed_and_survives_restart_until_acknowledged() {
    use reqwest::Method;
    let env = env().await;
    let t = Some(EP_TOKEN);
    let (code, stream) = call(&env.vigil, Method::POST, "/ssf/streams", t,
        Some(json!({"events_requested": ["https://schemas.openid.net/secevent/caep/event-type/session-revoked"]}))).await;
    assert_eq!(code, 201);
    assert_eq!(
        stream["delivery"]["method"], "urn:ietf:rfc:8936",
        "poll is assumed without `delivery`"
    );
    let id = stream["stream_id"].as_str().unwrap().to_owned();
    let poll_path = format!("/ssf/poll/{id}");
    assert!(stream["delivery"]["endpoint_url"]
        .as_str()
        .unwrap()
        .ends_with(&poll_path));

    let now = now();
    let user = json!({"format": "iss_sub", "iss": ISS, "sub": "poll-user"});
    let grant = json!({"id": "gw-session", "kind": "session", "subject": user, "session": "sess-42",
        "issued_at": now - 60.0, "expires_at": now + 3600.0, "enforcement_points": ["gateway"]});
    assert_eq!(post_json(&env.vigil, "/v1/grants", &grant).await.0, 201);

    // A long poll waits; the revocation arrives while it does.
    let waiting = {
        let addr = env.vigil.local_addr();
        let path = poll_path.clone();
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("http://{addr}{path}"))
                .bearer_auth(EP_TOKEN)
                .json(&json!({}))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let signal = json!({"iss": ISS, "aud": AUD, "jti": "risk-poll-1", "iat": now as i64, "sub_id": user,
        "events": {"https://schemas.openid.net/secevent/caep/event-type/risk-level-change":
            {"principal": "USER", "current_level": "HIGH", "event_timestamp": now}}});
    assert_eq!(
        push(
            &env.vigil,
            "idp",
            &env.tx.key(Alg::RS256).sign_set(&signal).unwrap()
        )
        .await
        .status,
        202
    );
    let first = waiting.await.unwrap();
    let sets = first["sets"].as_object().unwrap();
    assert_eq!(sets.len(), 1, "{first}");
    let (jti, set) = sets.iter().next().unwrap();

    let v = verify_from_vigil(
        &env.vigil,
        set.as_str().unwrap(),
        "https://gateway.example.com",
    )
    .await;
    assert_eq!(v["jti"], jti.as_str());
    let (event_uri, event) = event_of(&v);
    assert_eq!(
        event_uri,
        "https://schemas.openid.net/secevent/caep/event-type/session-revoked"
    );
    assert_eq!(
        v["txn"].as_str(),
        Some("risk-poll-1"),
        "txn links to the triggering signal"
    );
    let sub = &v["sub_id"];
    assert_eq!(sub["format"], "complex");
    assert_eq!(sub["user"], user);
    assert_eq!(sub["session"], json!({"format": "opaque", "id": "sess-42"}));
    assert!(
        event["reason_admin"]["en"]
            .as_str()
            .unwrap()
            .contains("risk HIGH"),
        "{event}"
    );

    // Not acknowledged: delivered again, and still there after a restart.
    let again = json!({"sets": poll_now(&env.vigil, &id, EP_TOKEN).await});
    assert!(again["sets"].get(jti).is_some(), "{again}");
    let env = env.restart().await;
    let after = json!({"sets": poll_now(&env.vigil, &id, EP_TOKEN).await});
    assert!(after["sets"].get(jti).is_some(), "{after}");
    // Another enforcement point cannot poll this stream.
    assert_eq!(
        call(
            &env.vigil,
            Method::POST,
            &poll_path,
            Some(OTHER_TOKEN),
            Some(json!({}))
        )
        .await
        .0,
        404
    );

    // Acknowledged: gone.
    let (code, acked) = call(
        &env.vigil,
        Method::POST,
        &poll_path,
        t,
        Some(json!({"ack": [jti], "returnImmediately": true})),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(acked["sets"], json!({}));
    let (_, ack_only) = call(
        &env.vigil,
        Method::POST,
        &poll_path,
        t,
        Some(json!({"maxEvents": 0})),
    )
    .await;
    assert_eq!(ack_only["sets"], json!({}));
    env.vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_sets_carry_the_state_and_streams_of_other_points_get_nothing() {
    use reqwest::Method;
    let env = env().await;
    let gw_id = create_stream(&env.vigil, EP_TOKEN, json!({})).await;
    let sc_id = create_stream(&env.vigil, OTHER_TOKEN, json!({})).await;
    assert_eq!(
        call(
            &env.vigil,
            Method::POST,
            "/ssf/verify",
            Some(EP_TOKEN),
            Some(json!({"stream_id": gw_id, "state": "abc"}))
        )
        .await
        .0,
        204
    );
    let polled = json!({"sets": poll_now(&env.vigil, &gw_id, EP_TOKEN).await});
    let (ver_jti, set) = polled["sets"].as_object().unwrap().iter().next().unwrap();
    let (ver_jti, set) = (ver_jti.clone(), set.as_str().unwrap().to_owned());
    let v = verify_from_vigil(&env.vigil, &set, "https://gateway.example.com").await;
    let (event_uri, event) = event_of(&v);
    assert_eq!(
        event_uri,
        vigil::events::EventKind::Verification.uri().as_str()
    );
    assert_eq!(event["state"], "abc");
    assert_eq!(v["sub_id"], json!({"format": "opaque", "id": gw_id}));

    // A grant held only by the gateway: its revocation goes to the gateway's stream, not the sidecar's.
    let now = now();
    let grant = json!({"id": "only-gw", "kind": "session", "subject": {"format": "email", "email": "g@example.com"},
        "issued_at": now - 60.0, "expires_at": now + 3600.0, "enforcement_points": ["gateway"]});
    assert_eq!(post_json(&env.vigil, "/v1/grants", &grant).await.0, 201);
    let signal = json!({"iss": ISS, "aud": AUD, "jti": "dis-gw", "iat": now as i64,
        "sub_id": {"format": "email", "email": "g@example.com"},
        "events": {"https://schemas.openid.net/secevent/risc/event-type/account-disabled": {}}});
    assert_eq!(
        push(
            &env.vigil,
            "idp",
            &env.tx.key(Alg::RS256).sign_set(&signal).unwrap()
        )
        .await
        .status,
        202
    );
    // Acknowledge the verification; the long poll then returns the revocation.
    let (_, gw_sets) = call(
        &env.vigil,
        Method::POST,
        &format!("/ssf/poll/{gw_id}"),
        Some(EP_TOKEN),
        Some(json!({"ack": [ver_jti]})),
    )
    .await;
    let sets = gw_sets["sets"].as_object().unwrap();
    assert_eq!(sets.len(), 1, "{gw_sets}");
    let revocation = verify_from_vigil(
        &env.vigil,
        sets.values().next().unwrap().as_str().unwrap(),
        "https://gateway.example.com",
    )
    .await;
    assert_eq!(revocation["txn"].as_str(), Some("dis-gw"));
    let sc_sets = json!({"sets": poll_now(&env.vigil, &sc_id, OTHER_TOKEN).await});
    assert_eq!(sc_sets["sets"], json!({}));
    env.vigil.shutdown().await;
}

/// Reads server-sent events until `n` `set` events arrived; returns (id, data) pairs.
async fn read_sse(
    vigil: &vigil::Vigil,
    stream: &str,
    last_event_id: Option<&str>,
    n: usize,
) -> Vec<(String, String)> {
    let mut req = reqwest::Client::new()
        .get(format!("http://{}/ssf/sse/{stream}", vigil.local_addr()))
        .bearer_auth(EP_TOKEN);
    if let Some(id) = last_event_id {
        req = req.header("Last-Event-ID", id);
    }
    let mut resp = req.send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut text = String::new();
    let mut events = Vec::new();
    while events.len() < n {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(10), resp.chunk())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            let field = |name: &str| {
                block.lines().find_map(|l| {
                    l.strip_prefix(&format!("{name}:"))
                        .map(|v| v.trim().to_owned())
                })
            };
            if field("event").as_deref() == Some("set") {
                events.push((field("id").unwrap(), field("data").unwrap()));
            }
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_subscribers_get_revocations_and_resume_with_last_event_id() {
    let env = env().await;
    let id = create_stream(&env.vigil, EP_TOKEN, json!({})).await;
    let now = now();
    for (g, u) in [("sse-1", "s1@example.com"), ("sse-2", "s2@example.com")] {
        let grant = json!({"id": g, "kind": "session", "subject": {"format": "email", "email": u},
            "issued_at": now - 60.0, "expires_at": now + 3600.0, "enforcement_points": ["gateway"]});
        assert_eq!(post_json(&env.vigil, "/v1/grants", &grant).await.0, 201);
    }
    let revoke = |user: &'static str, jti: &'static str| {
        let claims = json!({"iss": ISS, "aud": AUD, "jti": jti, "iat": now as i64,
            "sub_id": {"format": "email", "email": user},
            "events": {"https://schemas.openid.net/secevent/risc/event-type/account-disabled": {}}});
        env.tx.key(Alg::RS256).sign_set(&claims).unwrap()
    };
    let reading = read_sse(&env.vigil, &id, None, 1);
    let pushing = async {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(
            push(&env.vigil, "idp", &revoke("s1@example.com", "sse-dis-1"))
                .await
                .status,
            202
        );
    };
    let (events, ()) = tokio::join!(reading, pushing);
    let v = verify_from_vigil(&env.vigil, &events[0].1, "https://gateway.example.com").await;
    assert_eq!(v["txn"].as_str(), Some("sse-dis-1"));

    // Reconnect with Last-Event-ID: the first is acknowledged; only the next one arrives.
    assert_eq!(
        push(&env.vigil, "idp", &revoke("s2@example.com", "sse-dis-2"))
            .await
            .status,
        202
    );
    let again = read_sse(&env.vigil, &id, Some(&events[0].0), 1).await;
    let v2 = verify_from_vigil(&env.vigil, &again[0].1, "https://gateway.example.com").await;
    assert_eq!(v2["txn"].as_str(), Some("sse-dis-2"));
    assert!(again[0].0.parse::<u64>().unwrap() > events[0].0.parse::<u64>().unwrap());
    // The acknowledged SET is gone from the poll view too; the second is still outstanding.
    let polled = json!({"sets": poll_now(&env.vigil, &id, EP_TOKEN).await});
    assert_eq!(polled["sets"].as_object().unwrap().len(), 1);
    env.vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_committed_just_before_a_crash_still_reaches_the_enforcement_point() {
    use reqwest::Method;
    use std::sync::Arc;
    let env = env().await;
    let id = create_stream(&env.vigil, EP_TOKEN, json!({})).await;
    let now = now();
    let grant = json!({"id": "crash-g", "kind": "session", "subject": {"format": "email", "email": "c@example.com"},
        "issued_at": now - 60.0, "expires_at": now + 3600.0});
    assert_eq!(post_json(&env.vigil, "/v1/grants", &grant).await.0, 201);
    let Env {
        tx,
        vigil,
        mut config,
        _dir,
    } = env;
    // Same address after the restart, so Vigil's issuer (the streams' `iss`) stays the same.
    config.listen = vigil.local_addr();
    vigil.shutdown().await;

    // The engine alone, with nothing taking its decisions: it commits the revocation, then "crashes"
    // before delivery ever sees it.
    {
        let db = vigil::store::open(&config.data_dir).unwrap();
        let (writer, writer_thread) =
            vigil::store::BatchWriter::start(db.clone(), "state", 16).unwrap();
        let (intake, intake_thread) =
            vigil::intake::Intake::open_dir(&config.data_dir, 16).unwrap();
        let audit = Arc::new(
            vigil::audit::AuditLog::open(&config.data_dir.join("audit"), 1 << 20, 2).unwrap(),
        );
        let (decisions, rx) = vigil::engine::lanes(16);
        drop(rx);
        let policy = vigil::policy::PolicySet::load_dir_or_builtin(&config.policy.dir).unwrap();
        let engine = vigil::engine::Engine::start(
            &db,
            writer,
            intake,
            audit,
            policy,
            decisions,
            Default::default(),
        )
        .unwrap();
        let signal = vigil::evaluate::testing::signal_from_claims(
            &json!({"iss": ISS, "aud": AUD, "jti": "crash-1", "iat": now as i64,
                "sub_id": {"format": "email", "email": "c@example.com"},
                "events": {"https://schemas.openid.net/secevent/risc/event-type/account-disabled": {}}}),
            999_999,
        )
        .unwrap();
        engine.apply_signal(signal).await.unwrap();
        eventually("the revocation committed", || async {
            (engine.grant("crash-g").unwrap().status == vigil::grant::GrantStatus::Revoked)
                .then_some(())
        })
        .await;
        engine.shutdown().await;
        drop(engine);
        tokio::task::spawn_blocking(move || {
            writer_thread.join();
            intake_thread.join();
        })
        .await
        .unwrap();
    }

    let vigil = start(config.clone()).await;
    let (_, polled) = call(
        &vigil,
        Method::POST,
        &format!("/ssf/poll/{id}"),
        Some(EP_TOKEN),
        Some(json!({})),
    )
    .await;
    let sets = polled["sets"].as_object().unwrap();
    assert_eq!(sets.len(), 1, "{polled}");
    let v = verify_from_vigil(
        &vigil,
        sets.values().next().unwrap().as_str().unwrap(),
        "https://gateway.example.com",
    )
    .await;
    assert_eq!(v["txn"].as_str(), Some("crash-1"));
    drop(tx);
    vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_stream_holds_its_sets_and_delivers_them_when_enabled() {
    use reqwest::Method;
    let env = env().await;
    let t = Some(EP_TOKEN);
    let (_, st) = call(&env.vigil, Method::POST, "/ssf/streams", t, Some(json!({}))).await;
    let id = st["stream_id"].as_str().unwrap().to_owned();
    let status = |s: &str| json!({"stream_id": id, "status": s, "reason": "maintenance"});
    assert_eq!(
        call(
            &env.vigil,
            Method::POST,
            "/ssf/status",
            t,
            Some(status("paused"))
        )
        .await
        .0,
        200
    );

    let now = now();
    for (g, u) in [("p-1", "p1@example.com"), ("p-2", "p2@example.com")] {
        let grant = json!({"id": g, "kind": "session", "subject": {"format": "email", "email": u},
            "issued_at": now - 60.0, "expires_at": now + 3600.0});
        assert_eq!(post_json(&env.vigil, "/v1/grants", &grant).await.0, 201);
        let claims = json!({"iss": ISS, "aud": AUD, "jti": format!("dis-{g}"), "iat": now as i64,
            "sub_id": {"format": "email", "email": u},
            "events": {"https://schemas.openid.net/secevent/risc/event-type/account-disabled": {}}});
        assert_eq!(
            push(
                &env.vigil,
                "idp",
                &env.tx.key(Alg::RS256).sign_set(&claims).unwrap()
            )
            .await
            .status,
            202
        );
        eventually("the revocation", || async {
            let (_, g) = get_json(&env.vigil, &format!("/v1/grants/{g}")).await;
            (g["status"] == "revoked").then_some(())
        })
        .await;
    }
    let held = json!({"sets": poll_now(&env.vigil, &id, EP_TOKEN).await});
    assert_eq!(held["sets"], json!({}), "a paused stream delivers nothing");

    assert_eq!(
        call(
            &env.vigil,
            Method::POST,
            "/ssf/status",
            t,
            Some(status("enabled"))
        )
        .await
        .0,
        200
    );
    // The revocations are queued just after the grants change status (the emitter signs them
    // after the engine's commit): wait until all four SETs are held (none is acknowledged here,
    // so each poll returns them all again).
    let sets = eventually("the held SETs", || async {
        let sets = poll_now(&env.vigil, &id, EP_TOKEN).await;
        (sets.as_object().map_or(0, |m| m.len()) >= 4).then(|| json!({ "sets": sets }))
    })
    .await;
    let mut got = Vec::new();
    for set in sets["sets"].as_object().unwrap().values() {
        let v = verify_from_vigil(
            &env.vigil,
            set.as_str().unwrap(),
            "https://gateway.example.com",
        )
        .await;
        let kind = vigil::events::EventKind::from_uri(event_of(&v).0);
        got.push((v["txn"].as_str().map(str::to_owned), kind));
    }
    let revocations: Vec<_> = got
        .iter()
        .filter(|g| g.1 == Some(vigil::events::EventKind::SessionRevoked))
        .collect();
    assert_eq!(revocations.len(), 2, "{got:?}");
    let updates = got
        .iter()
        .filter(|g| g.1 == Some(vigil::events::EventKind::StreamUpdated))
        .count();
    assert_eq!(
        updates, 2,
        "stream-updated for paused and for enabled: {got:?}"
    );
    env.vigil.shutdown().await;
}
