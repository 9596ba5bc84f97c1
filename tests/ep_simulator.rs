//! The enforcement-point simulator (`vigil::sim::ep`, behind `vigil-ep`) receives a signed
//! session-revoked over push, poll and SSE, each verified with Vigil's JWKS.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::json;
use vigil::config::EnforcementPointConfig;
use vigil::events::EventKind;
use vigil::jose::Alg;
use vigil::sim::ep::{subscribe, Method};

const ISS: &str = "https://idp.example.com/123456789/";
const AUD: &str = "https://sp.example.com/caep";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_poll_and_sse_subscribers_each_receive_the_revocation() {
    let tx = Transmitter::start(&[Alg::RS256]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), vec![tx.config("idp", ISS, &[AUD])]);
    for m in ["push", "poll", "sse"] {
        config.enforcement_points.push(EnforcementPointConfig {
            name: format!("ep-{m}"),
            token: format!("token-for-ep-{m}-0123456789"),
            audience: None,
            signing_alg: None,
        });
    }
    let vigil = start(config).await;
    let issuer = format!("http://{}", vigil.local_addr());
    let mut eps = Vec::new();
    for (name, method) in [
        ("push", Method::Push),
        ("poll", Method::Poll),
        ("sse", Method::Sse),
    ] {
        let ep = subscribe(
            &issuer,
            &format!("token-for-ep-{name}-0123456789"),
            &format!("ep-{name}"),
            method,
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
        .unwrap();
        eps.push((name, ep));
    }
    let now = vigil::signal::now_ms() as f64 / 1000.0;
    let grant = json!({"id": "all-eps", "kind": "session", "subject": {"format": "email", "email": "e@example.com"},
        "session": "s-1", "issued_at": now - 60.0, "expires_at": now + 3600.0});
    assert_eq!(post_json(&vigil, "/v1/grants", &grant).await.0, 201);
    let claims = json!({"iss": ISS, "aud": AUD, "jti": "to-all", "iat": now as i64,
        "sub_id": {"format": "email", "email": "e@example.com"},
        "events": {"https://schemas.openid.net/secevent/caep/event-type/risk-level-change":
            {"principal": "USER", "current_level": "HIGH", "event_timestamp": now}}});
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
    for (name, ep) in &mut eps {
        let r = tokio::time::timeout(std::time::Duration::from_secs(10), ep.received.recv())
            .await
            .unwrap_or_else(|_| panic!("{name}: nothing received"))
            .unwrap();
        assert_eq!(
            r.event_type(),
            Some(EventKind::SessionRevoked.uri().as_str()),
            "{name}"
        );
        assert_eq!(r.txn(), Some("to-all"), "{name}");
        let sub = r.subject();
        assert_eq!(
            sub["session"],
            json!({"format": "opaque", "id": "s-1"}),
            "{name}"
        );
    }
    drop(eps);
    vigil.shutdown().await;
}

/// An enforcement point that accepts ES256 or EdDSA gets its SETs signed so (an ECDSA or Ed25519
/// signature costs a fraction of an RSA one); the others keep RS256, the CAEP interoperability
/// profile's. The metadata names every algorithm offered, the JWKS holds a key for each, and each
/// SET verifies with another JOSE library against that JWKS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_enforcement_point_gets_the_signing_algorithm_it_accepts() {
    let tx = Transmitter::start(&[Alg::RS256]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), vec![tx.config("idp", ISS, &[AUD])]);
    config.identity.offered_algs = vec![Alg::ES256, Alg::EdDSA];
    let eps = [
        ("ep-rs", None, "RS256"),
        ("ep-es", Some(Alg::ES256), "ES256"),
        ("ep-ed", Some(Alg::EdDSA), "EdDSA"),
    ];
    for (name, alg, _) in eps {
        config.enforcement_points.push(EnforcementPointConfig {
            name: name.into(),
            token: format!("token-for-{name}-0123456789"),
            audience: None,
            signing_alg: alg,
        });
    }
    let vigil = start(config).await;
    let issuer = format!("http://{}", vigil.local_addr());
    let (_, meta) = get_json(&vigil, "/.well-known/ssf-configuration").await;
    assert_eq!(
        meta["signing_alg_values_supported"],
        json!(["RS256", "ES256", "EdDSA"])
    );
    let (_, jwks) = get_json(&vigil, "/jwks.json").await;
    let mut published: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["alg"].as_str().unwrap())
        .collect();
    published.sort_unstable();
    assert_eq!(published, ["ES256", "EdDSA", "RS256"]);

    let mut subscribed = Vec::new();
    for (name, _, expected) in eps {
        let ep = subscribe(
            &issuer,
            &format!("token-for-{name}-0123456789"),
            name,
            Method::Poll,
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
        .unwrap();
        subscribed.push((name, expected, ep));
    }
    let now = vigil::signal::now_ms() as f64 / 1000.0;
    let grant = json!({"id": "algs", "kind": "session", "subject": {"format": "email", "email": "alg@example.com"},
        "issued_at": now - 60.0, "expires_at": now + 3600.0});
    assert_eq!(post_json(&vigil, "/v1/grants", &grant).await.0, 201);
    let claims = json!({"iss": ISS, "aud": AUD, "jti": "to-algs", "iat": now as i64,
        "sub_id": {"format": "email", "email": "alg@example.com"},
        "events": {"https://schemas.openid.net/secevent/caep/event-type/risk-level-change":
            {"principal": "USER", "current_level": "HIGH", "event_timestamp": now}}});
    let token = tx.key(Alg::RS256).sign_set(&claims).unwrap();
    assert_eq!(push(&vigil, "idp", &token).await.status, 202);
    for (name, expected, ep) in &mut subscribed {
        let r = tokio::time::timeout(std::time::Duration::from_secs(10), ep.received.recv())
            .await
            .unwrap_or_else(|_| panic!("{name}: nothing received"))
            .unwrap();
        assert_eq!(r.alg, *expected, "{name}");
        assert_eq!(r.txn(), Some("to-algs"), "{name}");
    }
    drop(subscribed);
    vigil.shutdown().await;
}
