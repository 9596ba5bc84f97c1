//! End to end: the RFC 8935 push receiver over real HTTP on loopback, with real keys served by a
//! local JWKS server, against the verbatim spec examples.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::*;
use serde_json::{json, Value};
use vigil::events::EventKind;
use vigil::jose::Alg;
use vigil::sim::{jwks_document, SigningKey};

/// Every spec-example SET, with the event kind it must parse into.
fn examples() -> Vec<(String, EventKind)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/spec-example-events.tsv"
    );
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (file, name) = l.split_once('\t').unwrap();
            let kind = EventKind::ALL.iter().find(|k| k.name() == name).unwrap();
            (file.to_owned(), *kind)
        })
        .collect()
}

const ALGS: [Alg; 4] = [Alg::RS256, Alg::ES256, Alg::PS256, Alg::EdDSA];

fn audiences(set: &Value) -> Vec<String> {
    match &set["aud"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().map(|v| v.as_str().unwrap().to_owned()).collect(),
        _ => vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spec_example_signed_with_every_algorithm_is_accepted_and_typed() {
    let tx = Transmitter::start(&ALGS).await;
    // One transmitter per issuer the examples use, each accepting the audiences they name.
    let mut issuers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let examples = examples();
    assert_eq!(examples.len(), 27);
    for (file, _) in &examples {
        let set = spec_example(file);
        let iss = set["iss"].as_str().unwrap().to_owned();
        issuers.entry(iss).or_default().extend(audiences(&set));
    }
    let streams: BTreeMap<String, String> = issuers
        .keys()
        .enumerate()
        .map(|(i, iss)| (iss.clone(), format!("s{i}")))
        .collect();
    let configs: Vec<_> = issuers
        .iter()
        .map(|(iss, auds)| {
            let auds: Vec<&str> = auds.iter().map(String::as_str).collect();
            tx.config(&streams[iss], iss, &auds)
        })
        .collect();

    for alg in ALGS {
        for (file, kind) in &examples {
            // The examples reuse `jti` values, so each gets a fresh store to be recorded, not deduped.
            let dir = tempfile::tempdir().unwrap();
            let vigil = start(test_config(dir.path(), configs.clone())).await;
            let set = spec_example(file);
            let stream = &streams[set["iss"].as_str().unwrap()];
            if let Some(state) = set["events"][EventKind::Verification.uri()]["state"].as_str() {
                vigil
                    .intake()
                    .expect_verification_state(stream, state)
                    .await
                    .unwrap();
            }
            let token = tx.key(alg).sign_set(&set).unwrap();
            let answer = push(&vigil, stream, &token).await;
            assert_eq!(answer.status, 202, "{alg} {file}: {answer:?}");
            assert_eq!(answer.body, "", "202 has an empty body");

            let seq = vigil
                .intake()
                .lookup_jti(set["iss"].as_str().unwrap(), set["jti"].as_str().unwrap())
                .unwrap()
                .unwrap_or_else(|| panic!("{file} not recorded"));
            let (signal, stored_token) = vigil.intake().get(seq).unwrap().unwrap();
            assert_eq!(signal.event.kind(), Some(*kind), "{file}");
            assert_eq!(stored_token, token, "the raw token is kept");
            assert_eq!(
                serde_json::to_value(&signal.subject).unwrap(),
                set["sub_id"],
                "{file}: the subject round-trips to the spec's JSON"
            );
            vigil.shutdown().await;
        }
    }
}

/// One Vigil with one transmitter (`s`) for the negative tests.
struct Fixture {
    tx: Transmitter,
    vigil: vigil::Vigil,
    _dir: tempfile::TempDir,
}

const ISS: &str = "https://idp.example.com/123456789/";
const AUD: &str = "https://sp.example.com/caep";

async fn fixture_with(mutate: impl FnOnce(&mut vigil::config::TransmitterConfig)) -> Fixture {
    let tx = Transmitter::start(&[Alg::RS256, Alg::ES256]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tx.config("s", ISS, &[AUD]);
    mutate(&mut cfg);
    let other = tx.config("other", "https://other.example/", &[AUD]);
    let vigil = start(test_config(dir.path(), vec![cfg, other])).await;
    Fixture {
        tx,
        vigil,
        _dir: dir,
    }
}

async fn fixture() -> Fixture {
    fixture_with(|_| {}).await
}

fn base_set(jti: &str) -> Value {
    let mut set = spec_example("caep-session-revoked.json");
    set["jti"] = json!(jti);
    set
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn assert_rfc8935_error(answer: &Answer, status: u16, err: &str, what: &str) {
    assert_eq!(answer.status, status, "{what}: {answer:?}");
    assert_eq!(answer.err().as_deref(), Some(err), "{what}: {answer:?}");
    assert_eq!(
        answer.content_type.as_deref(),
        Some("application/json"),
        "{what}"
    );
    assert_eq!(answer.content_language.as_deref(), Some("en"), "{what}");
    let body: Value = serde_json::from_str(&answer.body).unwrap();
    assert!(
        body["description"].as_str().is_some_and(|d| !d.is_empty()),
        "{what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rejection_answers_its_exact_code_and_records_nothing() {
    let f = fixture().await;
    let key = f.tx.key(Alg::RS256);
    let sign = |set: &Value| key.sign_set(set).unwrap();

    // Tampered signature.
    let good = sign(&base_set("t1"));
    let (head, sig) = good.rsplit_once('.').unwrap();
    let mut sig_bytes = URL_SAFE_NO_PAD.decode(sig).unwrap();
    sig_bytes[10] ^= 0x55;
    let tampered = format!("{head}.{}", b64(&sig_bytes));
    assert_rfc8935_error(
        &push(&f.vigil, "s", &tampered).await,
        400,
        "invalid_key",
        "tampered",
    );

    // Payload swapped under a valid signature.
    let (h, _, s) = {
        let mut parts = good.split('.');
        (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        )
    };
    let mut evil = base_set("t1");
    evil["jti"] = json!("swapped");
    let swapped = format!("{h}.{}.{s}", b64(&serde_json::to_vec(&evil).unwrap()));
    assert_rfc8935_error(
        &push(&f.vigil, "s", &swapped).await,
        400,
        "invalid_key",
        "swapped payload",
    );

    // Unknown kid: exactly one refetch, then invalid_key.
    let stranger = SigningKey::generate(Alg::RS256, "not-published").unwrap();
    let hits = f.tx.jwks.jwks_hits();
    let answer = push(&f.vigil, "s", &stranger.sign_set(&base_set("t2")).unwrap()).await;
    assert_rfc8935_error(&answer, 400, "invalid_key", "unknown kid");
    assert_eq!(
        f.tx.jwks.jwks_hits(),
        hits + 1,
        "an unknown kid triggers one refetch"
    );

    // A key with a published kid but the wrong private key.
    let impostor = SigningKey::generate(Alg::RS256, "key-RS256").unwrap();
    let answer = push(&f.vigil, "s", &impostor.sign_set(&base_set("t3")).unwrap()).await;
    assert_rfc8935_error(&answer, 400, "invalid_key", "impostor with a known kid");

    // alg: none.
    let none = format!(
        "{}.{}.",
        b64(br#"{"typ":"secevent+jwt","alg":"none"}"#),
        b64(&serde_json::to_vec(&base_set("t4")).unwrap())
    );
    assert_rfc8935_error(
        &push(&f.vigil, "s", &none).await,
        400,
        "invalid_key",
        "alg none",
    );

    // HS256 "signed" with the transmitter's public key as the HMAC secret.
    let public = serde_json::to_vec(&key.public_jwk().unwrap()).unwrap();
    let input = format!(
        "{}.{}",
        b64(br#"{"typ":"secevent+jwt","alg":"HS256","kid":"key-RS256"}"#),
        b64(&serde_json::to_vec(&base_set("t5")).unwrap())
    );
    let hs = format!(
        "{input}.{}",
        jsonwebtoken::crypto::sign(
            input.as_bytes(),
            &jsonwebtoken::EncodingKey::from_secret(&public),
            jsonwebtoken::Algorithm::HS256
        )
        .unwrap()
    );
    assert_rfc8935_error(
        &push(&f.vigil, "s", &hs).await,
        400,
        "invalid_key",
        "HS256 with public key",
    );

    // An allowed algorithm family the transmitter is not configured for.
    let ps = SigningKey::generate(Alg::PS256, "key-RS256").unwrap();
    let answer = push(&f.vigil, "s", &ps.sign_set(&base_set("t6")).unwrap()).await;
    assert_rfc8935_error(&answer, 400, "invalid_key", "PS256 not in allow-list");

    // Wrong typ, missing typ.
    for (header, what) in [
        (
            json!({"typ": "JWT", "alg": "RS256", "kid": "key-RS256"}),
            "wrong typ",
        ),
        (json!({"alg": "RS256", "kid": "key-RS256"}), "missing typ"),
    ] {
        let token = key
            .sign_raw(&header, &serde_json::to_vec(&base_set("t7")).unwrap())
            .unwrap();
        assert_rfc8935_error(
            &push(&f.vigil, "s", &token).await,
            400,
            "invalid_request",
            what,
        );
    }

    // Claims.
    type Mutation = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(Mutation, &str, &str)> = vec![
        (
            Box::new(|s| s["iss"] = json!("https://evil.example/")),
            "invalid_issuer",
            "wrong iss",
        ),
        (
            Box::new(|s| s["aud"] = json!("https://someone-else.example/")),
            "invalid_audience",
            "wrong aud",
        ),
        (
            Box::new(|s| {
                s.as_object_mut().unwrap().remove("jti");
            }),
            "invalid_request",
            "missing jti",
        ),
        (
            Box::new(|s| {
                s.as_object_mut().unwrap().remove("iat");
            }),
            "invalid_request",
            "missing iat",
        ),
        (
            Box::new(|s| {
                s.as_object_mut().unwrap().remove("events");
            }),
            "invalid_request",
            "missing events",
        ),
        (
            Box::new(|s| s["sub"] = json!("someone")),
            "invalid_request",
            "sub present",
        ),
        (
            Box::new(|s| s["exp"] = json!(4102444800u64)),
            "invalid_request",
            "exp present",
        ),
        (
            Box::new(|s| {
                s.as_object_mut().unwrap().remove("sub_id");
            }),
            "invalid_request",
            "no subject",
        ),
        (
            // A NUL in an identifier would name another principal's rows in the store.
            Box::new(|s| s["sub_id"] = json!({"format": "email", "email": "a\u{0}b@example.com"})),
            "invalid_request",
            "a control character in the subject",
        ),
        (
            Box::new(|s| {
                s["events"]
                    ["https://schemas.openid.net/secevent/risc/event-type/account-disabled"] =
                    json!({})
            }),
            "invalid_request",
            "two unrelated events",
        ),
        (
            Box::new(|s| {
                s["events"]["https://schemas.openid.net/secevent/caep/event-type/session-revoked"]
                    ["reason_admin"] = json!("not a language map")
            }),
            "invalid_request",
            "payload violates its definition",
        ),
    ];
    for (i, (mutate, err, what)) in cases.iter().enumerate() {
        let mut set = base_set(&format!("c{i}"));
        mutate(&mut set);
        assert_rfc8935_error(&push(&f.vigil, "s", &sign(&set)).await, 400, err, what);
    }

    // Transport.
    let valid = sign(&base_set("transport"));
    let ct = "application/secevent+jwt";
    let answer = push_raw(&f.vigil, "s", None, ct, valid.clone()).await;
    assert_rfc8935_error(&answer, 400, "authentication_failed", "missing credential");
    let answer = push_raw(&f.vigil, "s", Some("Bearer wrong"), ct, valid.clone()).await;
    assert_rfc8935_error(&answer, 400, "authentication_failed", "wrong credential");
    let answer = push_raw(
        &f.vigil,
        "s",
        Some(&format!("{AUTH}-other")),
        ct,
        valid.clone(),
    )
    .await;
    assert_rfc8935_error(&answer, 400, "access_denied", "another stream's credential");
    let answer = push_raw(
        &f.vigil,
        "nope",
        Some(&format!("{AUTH}-s")),
        ct,
        valid.clone(),
    )
    .await;
    assert_rfc8935_error(&answer, 400, "authentication_failed", "unknown stream");
    let auth = format!("{AUTH}-s");
    let answer = push_raw(&f.vigil, "s", Some(&auth), "application/jwt", valid.clone()).await;
    assert_rfc8935_error(&answer, 400, "invalid_request", "wrong content type");
    let answer = push_raw(&f.vigil, "s", Some(&auth), ct, "x".repeat(65 * 1024)).await;
    assert_rfc8935_error(&answer, 413, "invalid_request", "oversize body");
    let answer = push_raw(&f.vigil, "s", Some(&auth), ct, "garbage!!").await;
    assert_rfc8935_error(&answer, 400, "invalid_request", "garbage body");
    let answer = push_raw(&f.vigil, "s", Some(&auth), ct, "").await;
    assert_rfc8935_error(&answer, 400, "invalid_request", "empty body");
    let answer = push_raw(&f.vigil, "s", Some(&auth), ct, vec![0xffu8, 0xfe, 0x2e]).await;
    assert_rfc8935_error(&answer, 400, "invalid_request", "non-UTF-8 body");

    assert_eq!(
        f.vigil.intake().stored_count().unwrap(),
        0,
        "no rejection wrote anything"
    );

    // The same valid SET is then accepted: rejections changed nothing.
    assert_eq!(push(&f.vigil, "s", &valid).await.status, 202);
    assert_eq!(f.vigil.intake().stored_count().unwrap(), 1);
    f.vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_keys_below_2048_bits_are_refused() {
    use openssl::{hash::MessageDigest, pkey::PKey, rsa::Rsa, sign::Signer};
    let f = fixture().await;
    let rsa = Rsa::generate(1024).unwrap();
    let jwk = json!({
        "kty": "RSA", "kid": "small", "use": "sig",
        "n": b64(&rsa.n().to_vec()), "e": b64(&rsa.e().to_vec()),
    });
    let mut keys = jwks_document(&[f.tx.key(Alg::RS256).public_jwk().unwrap()]);
    keys["keys"].as_array_mut().unwrap().push(jwk);
    f.tx.jwks.set_jwks(keys);
    let input = format!(
        "{}.{}",
        b64(br#"{"typ":"secevent+jwt","alg":"RS256","kid":"small"}"#),
        b64(&serde_json::to_vec(&base_set("small-key")).unwrap())
    );
    let pkey = PKey::from_rsa(rsa).unwrap();
    let mut signer = Signer::new(MessageDigest::sha256(), &pkey).unwrap();
    signer.update(input.as_bytes()).unwrap();
    let token = format!("{input}.{}", b64(&signer.sign_to_vec().unwrap()));
    let answer = push(&f.vigil, "s", &token).await;
    assert_rfc8935_error(&answer, 400, "invalid_key", "1024-bit RSA key");
    assert!(answer.body.contains("2048"), "{}", answer.body);
    f.vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_state_must_match_and_unsolicited_is_accepted() {
    let f = fixture().await;
    let key = f.tx.key(Alg::RS256);
    let verification = |jti: &str, state: Option<&str>| {
        let mut set = spec_example("ssf-verification.json");
        set["iss"] = json!(ISS);
        set["aud"] = json!(AUD);
        set["jti"] = json!(jti);
        let uri = EventKind::Verification.uri();
        set["events"][&uri] = match state {
            Some(s) => json!({ "state": s }),
            None => json!({}),
        };
        key.sign_set(&set).unwrap()
    };
    // Nothing requested yet: any state is a mismatch.
    let answer = push(&f.vigil, "s", &verification("v1", Some("abc"))).await;
    assert_rfc8935_error(&answer, 400, "invalid_state", "state never requested");
    f.vigil
        .intake()
        .expect_verification_state("s", "expected-state")
        .await
        .unwrap();
    let answer = push(&f.vigil, "s", &verification("v2", Some("other"))).await;
    assert_rfc8935_error(&answer, 400, "invalid_state", "state mismatch");
    assert_eq!(
        push(&f.vigil, "s", &verification("v3", Some("expected-state")))
            .await
            .status,
        202
    );
    assert_eq!(
        push(&f.vigil, "s", &verification("v4", None)).await.status,
        202,
        "unsolicited"
    );
    assert_eq!(f.vigil.intake().stored_count().unwrap(), 2);
    f.vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_with_unprocessable_critical_members_are_discarded() {
    let f = fixture_with(|c| c.critical_subject_members = vec!["tenant".into(), "cluster".into()])
        .await;
    let key = f.tx.key(Alg::RS256);
    let mut set = base_set("crit-1");
    set["sub_id"] = json!({
        "format": "complex",
        "user": {"format": "email", "email": "a@example.com"},
        "tenant": {"format": "catalog_item", "catalog_id": "x"}
    });
    assert_eq!(
        push(&f.vigil, "s", &key.sign_set(&set).unwrap())
            .await
            .status,
        202
    );
    let mut set = base_set("crit-2");
    set["sub_id"] = json!({
        "format": "complex",
        "user": {"format": "email", "email": "a@example.com"},
        "cluster": {"format": "opaque", "id": "c1"}
    });
    assert_eq!(
        push(&f.vigil, "s", &key.sign_set(&set).unwrap())
            .await
            .status,
        202
    );
    assert_eq!(
        f.vigil.intake().stored_count().unwrap(),
        0,
        "both discarded, not recorded"
    );
    // A critical member Vigil understands is processed normally.
    let mut set = base_set("crit-3");
    set["sub_id"] = json!({
        "format": "complex",
        "user": {"format": "email", "email": "a@example.com"},
        "tenant": {"format": "opaque", "id": "t1"}
    });
    assert_eq!(
        push(&f.vigil, "s", &key.sign_set(&set).unwrap())
            .await
            .status,
        202
    );
    assert_eq!(f.vigil.intake().stored_count().unwrap(), 1);
    let (_, metrics) = get(&f.vigil, "/metrics").await;
    assert!(
        metrics.contains(r#"stream="s",event_type="session-revoked",outcome="discarded"} 2"#),
        "{metrics}"
    );
    f.vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_is_answered_like_the_first_and_dedupe_survives_restart() {
    let tx = Transmitter::start(&[Alg::RS256]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path(), vec![tx.config("s", ISS, &[AUD])]);
    let token = tx.key(Alg::RS256).sign_set(&base_set("once")).unwrap();

    let vigil = start(config.clone()).await;
    for _ in 0..3 {
        let answer = push(&vigil, "s", &token).await;
        assert_eq!((answer.status, answer.body.as_str()), (202, ""));
    }
    assert_eq!(vigil.intake().stored_count().unwrap(), 1);
    let (_, metrics) = get(&vigil, "/metrics").await;
    assert!(metrics.contains(r#"outcome="duplicate"}"#), "{metrics}");
    vigil.shutdown().await;

    let vigil = start(config).await;
    assert_eq!(push(&vigil, "s", &token).await.status, 202);
    assert_eq!(
        vigil.intake().stored_count().unwrap(),
        1,
        "dedupe survived the restart"
    );
    vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_is_picked_up_without_restart() {
    let f = fixture().await;
    let old = f.tx.key(Alg::RS256);
    assert_eq!(
        push(&f.vigil, "s", &old.sign_set(&base_set("r1")).unwrap())
            .await
            .status,
        202
    );

    let new = SigningKey::generate(Alg::RS256, "rotated-2").unwrap();
    f.tx.jwks.set_jwks(jwks_document(&[
        old.public_jwk().unwrap(),
        new.public_jwk().unwrap(),
    ]));
    assert_eq!(
        push(&f.vigil, "s", &new.sign_set(&base_set("r2")).unwrap())
            .await
            .status,
        202
    );
    // A SET signed by a known key does not touch the network.
    let hits = f.tx.jwks.jwks_hits();
    assert_eq!(
        push(&f.vigil, "s", &new.sign_set(&base_set("r3")).unwrap())
            .await
            .status,
        202
    );
    assert_eq!(f.tx.jwks.jwks_hits(), hits);
    f.vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kid_refetch_is_rate_limited() {
    let tx = Transmitter::start(&[Alg::RS256]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), vec![tx.config("s", ISS, &[AUD])]);
    config.jwks.min_refetch_interval_secs = 3600;
    let vigil = start(config).await;
    // Wait for the initial load.
    let key = tx.key(Alg::RS256);
    assert_eq!(
        push(&vigil, "s", &key.sign_set(&base_set("k0")).unwrap())
            .await
            .status,
        202
    );
    let stranger = SigningKey::generate(Alg::RS256, "stranger").unwrap();
    let hits = tx.jwks.jwks_hits();
    for i in 0..5 {
        let answer = push(
            &vigil,
            "s",
            &stranger
                .sign_set(&base_set(&format!("k{}", i + 1)))
                .unwrap(),
        )
        .await;
        assert_eq!(answer.err().as_deref(), Some("invalid_key"));
    }
    assert!(
        tx.jwks.jwks_hits() <= hits + 1,
        "at most one refetch inside the rate-limit window"
    );
    vigil.shutdown().await;
}

/// A key published just after Vigil loaded the JWKS (as at every restart) is found once the
/// short floor has passed — not refused for `min_refetch_interval_secs` — and an unknown `kid`'s
/// error says whether the keys were fetched again for it, and if not, why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_published_just_after_start_is_found_and_the_error_says_if_keys_were_fetched() {
    let tx = Transmitter::start(&[Alg::RS256]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), vec![tx.config("s", ISS, &[AUD])]);
    config.jwks.min_refetch_interval_secs = 3600;
    config.jwks.refetch_floor_secs = 1;
    let vigil = start(config).await;
    let old = tx.key(Alg::RS256);
    assert_eq!(
        push(&vigil, "s", &old.sign_set(&base_set("f0")).unwrap())
            .await
            .status,
        202
    );
    let new = SigningKey::generate(Alg::RS256, "published-after-start").unwrap();
    tx.jwks.set_jwks(jwks_document(&[
        old.public_jwk().unwrap(),
        new.public_jwk().unwrap(),
    ]));
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let answer = push(&vigil, "s", &new.sign_set(&base_set("f1")).unwrap()).await;
    assert_eq!(answer.status, 202, "{answer:?}");

    // A kid nobody publishes: fetched again once (past the floor), and the error says so …
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let stranger = SigningKey::generate(Alg::RS256, "stranger").unwrap();
    let hits = tx.jwks.jwks_hits();
    let answer = push(&vigil, "s", &stranger.sign_set(&base_set("f2")).unwrap()).await;
    assert_eq!(answer.err().as_deref(), Some("invalid_key"));
    assert!(
        answer.body.contains("the keys were fetched again"),
        "{answer:?}"
    );
    assert_eq!(tx.jwks.jwks_hits(), hits + 1);
    // … the same kid again, not (rate-limited per kid) …
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let answer = push(&vigil, "s", &stranger.sign_set(&base_set("f3")).unwrap()).await;
    assert!(
        answer.body.contains("min_refetch_interval_secs"),
        "{answer:?}"
    );
    // … and another kid within the floor of that fetch, not either.
    let other = SigningKey::generate(Alg::RS256, "stranger-2").unwrap();
    let stray = push(&vigil, "s", &other.sign_set(&base_set("f4")).unwrap()).await;
    let answer = push(&vigil, "s", &other.sign_set(&base_set("f5")).unwrap()).await;
    assert!(
        stray.body.contains("fetched again") || stray.body.contains("floor"),
        "{stray:?}"
    );
    assert!(
        answer.body.contains("floor") || answer.body.contains("min_refetch_interval_secs"),
        "{answer:?}"
    );
    assert_eq!(
        tx.jwks.jwks_hits(),
        hits + 2,
        "one fetch per new kid, none in the floor"
    );
    vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_unavailable_is_a_temporary_503_not_a_rejection() {
    let tx = Transmitter::start(&[Alg::RS256]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tx.config("s", ISS, &[AUD]);
    // Nothing listens on this port: the keys can never load.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    cfg.jwks_uri = Some(format!("http://{}/jwks.json", dead.local_addr().unwrap()));
    drop(dead);
    let vigil = start(test_config(dir.path(), vec![cfg])).await;
    let answer = push(
        &vigil,
        "s",
        &tx.key(Alg::RS256).sign_set(&base_set("u1")).unwrap(),
    )
    .await;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.retry_after.as_deref(), Some("5"));
    let (status, ready) = get(&vigil, "/readyz").await;
    assert_eq!(status, 200);
    assert!(ready.contains(r#""keys_loaded":false"#), "{ready}");
    assert_eq!(vigil.intake().stored_count().unwrap(), 0);
    vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_finds_the_jwks_and_checks_the_issuer() {
    let tx = Transmitter::start(&[Alg::ES256]).await;
    let issuer = format!("{}/tenant-a", tx.jwks.base_url());
    tx.jwks.set_metadata(json!({
        "spec_version": "1_0",
        "issuer": issuer,
        "jwks_uri": tx.jwks.jwks_uri(),
        "delivery_methods_supported": ["urn:ietf:rfc:8935"],
        "critical_subject_members": ["tenant"],
    }));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tx.config("disc", &issuer, &[AUD]);
    cfg.jwks_uri = None;
    cfg.discovery = true;
    let vigil = start(test_config(dir.path(), vec![cfg.clone()])).await;
    let key = tx.key(Alg::ES256);
    let mut set = base_set("d1");
    set["iss"] = json!(issuer);
    assert_eq!(
        push(&vigil, "disc", &key.sign_set(&set).unwrap())
            .await
            .status,
        202
    );
    // The metadata's critical members apply: a proprietary tenant is discarded.
    let mut set2 = set.clone();
    set2["jti"] = json!("d2");
    set2["sub_id"] = json!({"format": "complex", "tenant": {"format": "x_tenant", "v": "1"}, "user": {"format": "opaque", "id": "u"}});
    assert_eq!(
        push(&vigil, "disc", &key.sign_set(&set2).unwrap())
            .await
            .status,
        202
    );
    assert_eq!(vigil.intake().stored_count().unwrap(), 1);
    vigil.shutdown().await;

    // Metadata naming another issuer must not be used (SSF §7.2.4): the keys never load.
    tx.jwks.set_metadata(
        json!({ "issuer": "https://impostor.example/", "jwks_uri": tx.jwks.jwks_uri() }),
    );
    let dir = tempfile::tempdir().unwrap();
    let vigil = start(test_config(dir.path(), vec![cfg])).await;
    set["jti"] = json!("d3");
    let answer = push(&vigil, "disc", &key.sign_set(&set).unwrap()).await;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert!(answer.body.contains("impostor"), "{}", answer.body);
    vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_and_rejected_sets_show_in_metrics() {
    let f = fixture().await;
    let key = f.tx.key(Alg::RS256);
    assert_eq!(
        push(&f.vigil, "s", &key.sign_set(&base_set("m1")).unwrap())
            .await
            .status,
        202
    );
    let token = key.sign_set(&base_set("m2")).unwrap();
    let tampered = format!("{}AAAA", &token[..token.len() - 4]);
    assert_eq!(push(&f.vigil, "s", &tampered).await.status, 400);
    // An unknown event type is accepted, recorded and counted, not rejected.
    let mut unknown = base_set("m3");
    unknown["events"] =
        json!({"https://vendor.example/event-type/impossible-travel": {"km_per_h": 4200}});
    assert_eq!(
        push(&f.vigil, "s", &key.sign_set(&unknown).unwrap())
            .await
            .status,
        202
    );
    let seq = f.vigil.intake().lookup_jti(ISS, "m3").unwrap().unwrap();
    let (signal, _) = f.vigil.intake().get(seq).unwrap().unwrap();
    assert_eq!(signal.event.kind(), None);
    assert_eq!(
        signal.event_uri,
        "https://vendor.example/event-type/impossible-travel"
    );
    // The hand-off is asynchronous; give it a moment to record handling latency.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, metrics) = get(&f.vigil, "/metrics").await;
    assert_eq!(status, 200);
    for needle in [
        r#"vigil_sets_received_total{stream="s",event_type="session-revoked",outcome="accepted"}"#,
        r#"vigil_sets_received_total{stream="s",event_type="none",outcome="invalid_key"}"#,
        r#"vigil_sets_received_total{stream="s",event_type="unknown",outcome="accepted"}"#,
        r#"vigil_set_verify_seconds_bucket{stream="s""#,
        r#"vigil_signal_handling_seconds_bucket{stream="s""#,
        // Handed on by intake's writer and taken by the hand-off: nothing waits.
        "vigil_intake_handed_on_waiting 0",
    ] {
        assert!(metrics.contains(needle), "missing {needle}");
    }
    assert_eq!(get(&f.vigil, "/healthz").await, (200, "ok".to_owned()));
    f.vigil.shutdown().await;
}

/// What real transmitters send beyond the specs: accepted only where the transmitter's switch
/// allows it (the spec-exact answer otherwise), and every accepted deviation counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deviations_real_transmitters_send_are_tolerated_only_where_switched_on() {
    let strict = fixture_with(|c| c.tolerate.late_verification = false).await;
    let lenient = fixture_with(|c| {
        c.tolerate.millisecond_timestamps = true;
        c.tolerate.revoked_change_type = true;
        c.tolerate.legacy_risc = true;
    })
    .await;
    let now = vigil::signal::now_ms() as f64 / 1000.0;
    let claims = |jti: &str, uri: &str, event: Value| {
        json!({"iss": ISS, "aud": AUD, "jti": jti, "iat": now as i64,
               "sub_id": {"format": "email", "email": "pat@example.com"},
               "events": {uri: event}})
    };
    let signal_of = |f: &Fixture, jti: &str| {
        let seq = f.vigil.intake().lookup_jti(ISS, jti).unwrap().unwrap();
        f.vigil.intake().get(seq).unwrap().unwrap().0
    };

    // `typ` as a full media type in any case: RFC 7515 §4.1.9 allows it, so both accept it.
    for f in [&strict, &lenient] {
        let key = f.tx.key(Alg::RS256);
        let header = json!({"typ": "Application/SecEvent+JWT", "alg": "RS256", "kid": key.kid});
        let token = key
            .sign_raw(&header, &serde_json::to_vec(&base_set("typ-case")).unwrap())
            .unwrap();
        assert_eq!(push(&f.vigil, "s", &token).await.status, 202);
    }

    // `event_timestamp` in milliseconds: read as such only where switched on; otherwise a time
    // from the far future, clamped to the receipt time.
    let at = now - 100.0;
    let session = EventKind::SessionRevoked.uri();
    for f in [&strict, &lenient] {
        let key = f.tx.key(Alg::RS256);
        let set = claims(
            "ms",
            &session,
            json!({"event_timestamp": (at * 1000.0) as i64}),
        );
        assert_eq!(
            push(&f.vigil, "s", &key.sign_set(&set).unwrap())
                .await
                .status,
            202
        );
    }
    assert!((signal_of(&lenient, "ms").event_time - at).abs() < 1.0);
    assert!(signal_of(&strict, "ms").event_time >= now - 1.0);

    // CAEP `change_type: "revoked"`: refused as the spec says, or read as `revoke`.
    let credential = EventKind::CredentialChange.uri();
    let revoked = json!({"credential_type": "password", "change_type": "revoked",
                         "event_timestamp": now as i64});
    for (f, status) in [(&strict, 400), (&lenient, 202)] {
        let key = f.tx.key(Alg::RS256);
        let token = key
            .sign_set(&claims("revoked", &credential, revoked.clone()))
            .unwrap();
        assert_eq!(push(&f.vigil, "s", &token).await.status, status);
    }
    match signal_of(&lenient, "revoked").event {
        vigil::events::Event::CredentialChange(c) => {
            assert_eq!(c.change_type, vigil::events::ChangeType::Revoke)
        }
        other => panic!("{other:?}"),
    }

    // Google RISC's legacy shape: no `typ`, the subject inside the event as `iss-sub`, and
    // OAuth's tokens-revoked — refused (SSF §4.1.1), or taken as RISC sessions-revoked.
    let google = json!({"iss": ISS, "aud": AUD, "jti": "google", "iat": now as i64,
        "events": {"https://schemas.openid.net/secevent/oauth/event-type/tokens-revoked": {
            "subject": {"subject_type": "iss-sub", "iss": "https://accounts.google.com/",
                        "sub": "7375626A656374"}}}});
    for (f, status) in [(&strict, 400), (&lenient, 202)] {
        let key = f.tx.key(Alg::RS256);
        let header = json!({"alg": "RS256", "kid": key.kid});
        let token = key
            .sign_raw(&header, &serde_json::to_vec(&google).unwrap())
            .unwrap();
        let answer = push(&f.vigil, "s", &token).await;
        assert_eq!(answer.status, status, "{answer:?}");
    }
    let signal = signal_of(&lenient, "google");
    assert_eq!(signal.event.kind(), Some(EventKind::SessionsRevoked));
    assert_eq!(
        signal.subject.to_json(),
        json!({"format": "iss_sub", "iss": "https://accounts.google.com/", "sub": "7375626A656374"})
    );

    // A verification answering the request before the last: late, accepted unless switched off.
    let verification = |f: &Fixture, jti: &str, state: &str| {
        let mut set = claims(jti, &EventKind::Verification.uri(), json!({"state": state}));
        set.as_object_mut().unwrap().remove("sub_id");
        set["sub_id"] = json!({"format": "opaque", "id": "s"});
        f.tx.key(Alg::RS256).sign_set(&set).unwrap()
    };
    for f in [&strict, &lenient] {
        for state in ["first-request", "second-request"] {
            f.vigil
                .intake()
                .expect_verification_state("s", state)
                .await
                .unwrap();
        }
    }
    let late = push(
        &strict.vigil,
        "s",
        &verification(&strict, "v-late", "first-request"),
    )
    .await;
    assert_rfc8935_error(&late, 400, "invalid_state", "late, switched off");
    assert_eq!(
        push(
            &lenient.vigil,
            "s",
            &verification(&lenient, "v-late", "first-request")
        )
        .await
        .status,
        202
    );
    let forged = push(
        &lenient.vigil,
        "s",
        &verification(&lenient, "v-forged", "never-asked"),
    )
    .await;
    assert_rfc8935_error(&forged, 400, "invalid_state", "a state never requested");

    let (_, metrics) = get(&lenient.vigil, "/metrics").await;
    for deviation in [
        "millisecond_timestamp",
        "revoked_change_type",
        "missing_typ",
        "oauth_tokens_revoked",
        "subject_in_event",
        "late_verification",
    ] {
        // (The recorder is the process's: other tests' SETs may count too.)
        let needle = format!(
            r#"vigil_ssf_tolerated_deviations_total{{transmitter="tx-s",deviation="{deviation}"}} "#
        );
        assert!(metrics.contains(&needle), "{needle} in\n{metrics}");
    }
    strict.vigil.shutdown().await;
    lenient.vigil.shutdown().await;
}
