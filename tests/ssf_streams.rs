//! Vigil as an SSF client of a transmitter it did not write: the simulated IdP (`sim::idp`) on
//! loopback. Discovery, stream creation (push and poll), verification, pause / re-enable, restart
//! without duplicate streams or lost events, and poll error reporting.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{json, Value};
use vigil::config::{Config, DeliveryMode, TransmitterConfig};
use vigil::sim::idp::{Idp, IdpSettings};
use vigil::Vigil;

const AUDIENCE: &str = "https://vigil.example";
const CREDENTIAL: &str = "Bearer idp-receiver-token";
const RISK: &str = "https://schemas.openid.net/secevent/caep/event-type/risk-level-change";

fn managed(name: &str, issuer: &str, delivery: DeliveryMode) -> TransmitterConfig {
    let mut t =
        TransmitterConfig::managed(name, issuer, vec![AUDIENCE.into()], delivery, CREDENTIAL);
    if let Some(m) = &mut t.manage {
        m.verify_interval_secs = 1;
        m.refresh_interval_secs = 1;
        m.poll_max_events = 10;
        m.poll_timeout_secs = 2;
    }
    t
}

async fn idp() -> Idp {
    let settings = IdpSettings {
        receiver_credential: CREDENTIAL.into(),
        audience: AUDIENCE.into(),
        long_poll: std::time::Duration::from_secs(1),
        ..IdpSettings::default()
    };
    Idp::start("127.0.0.1:0".parse().unwrap(), settings)
        .await
        .unwrap()
}

fn config(dir: &std::path::Path, idp: &Idp) -> Config {
    test_config(
        dir,
        vec![
            managed("idp-push", idp.issuer(), DeliveryMode::Push),
            managed("idp-poll", idp.issuer(), DeliveryMode::Poll),
        ],
    )
}

async fn register(vigil: &Vigil, id: &str, email: &str) {
    let t = vigil::signal::now_ms() as f64 / 1000.0;
    let grant = json!({"id": id, "kind": "session", "subject": {"format": "email", "email": email},
        "session": format!("s-{id}"), "issued_at": t - 60.0, "expires_at": t + 3600.0});
    assert_eq!(post_json(vigil, "/v1/grants", &grant).await.0, 201);
}

async fn status(vigil: &Vigil, id: &str) -> String {
    let (_, g) = get_json(vigil, &format!("/v1/grants/{id}")).await;
    g["status"].as_str().unwrap_or_default().to_owned()
}

async fn liveness(vigil: &Vigil, stream: &str) -> Value {
    let (_, body) = get_json(vigil, "/v1/ssf/streams").await;
    body["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stream"] == stream)
        .map(|s| s["liveness"].clone())
        .unwrap_or(Value::Null)
}

/// Both streams created and verified after `since_ms`.
async fn wait_verified(vigil: &Vigil, since_ms: i64) {
    eventually_within(30, "both streams verified", || async {
        for s in ["idp-push", "idp-poll"] {
            let l = liveness(vigil, s).await;
            if l["last_verified_ms"].as_i64().unwrap_or(0) <= since_ms {
                return None;
            }
        }
        Some(())
    })
    .await;
}

fn stream_id(idp: &Idp, method: &str) -> String {
    idp.streams()
        .iter()
        .find(|s| s["delivery"]["method"] == method)
        .map(|s| s["stream_id"].as_str().unwrap().to_owned())
        .unwrap()
}

fn high_risk(idp: &Idp, email: &str) -> usize {
    let now = vigil::signal::now_ms() / 1000;
    idp.emit(
        RISK,
        json!({"format": "email", "email": email}),
        json!({"event_timestamp": now, "principal": "USER", "current_level": "HIGH",
            "risk_reason": "sign-in anomaly"}),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_created_verified_paused_resumed_and_survive_a_restart() {
    let idp = idp().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &idp);
    let started = vigil::signal::now_ms();
    let vigil = start(config.clone()).await;
    register(&vigil, "g-1", "user-1@example.com").await;
    register(&vigil, "g-2", "user-2@example.com").await;
    register(&vigil, "g-3", "user-3@example.com").await;

    // Discovered, created (one push, one poll), verified through both deliveries.
    wait_verified(&vigil, started).await;
    let streams = idp.streams();
    assert_eq!(streams.len(), 2, "{streams:?}");
    let push_id = stream_id(&idp, vigil::sim::idp::PUSH);
    let poll_id = stream_id(&idp, vigil::sim::idp::POLL);
    let push_cfg = streams.iter().find(|s| s["stream_id"] == push_id).unwrap();
    assert!(push_cfg["delivery"]["endpoint_url"]
        .as_str()
        .unwrap()
        .ends_with("/ssf/push/idp-push"));
    assert!(push_cfg["events_delivered"]
        .as_array()
        .unwrap()
        .contains(&json!(RISK)));
    for s in ["idp-push", "idp-poll"] {
        let l = liveness(&vigil, s).await;
        assert_eq!(l["status"], "enabled", "{l}");
    }
    // The create requests have the fields of the spec's example (SSF §8.1.1.1).
    let spec = spec_example("ssf-create-stream-request.json");
    let creates: Vec<Value> = idp
        .observed()
        .requests
        .into_iter()
        .filter(|(m, p, _)| m == "POST" && p == "/ssf/mgmt/stream")
        .map(|(_, _, b)| b)
        .collect();
    assert_eq!(creates.len(), 2);
    for body in &creates {
        for field in spec.as_object().unwrap().keys() {
            assert!(body.get(field).is_some(), "{field} missing from {body}");
        }
        assert!(body["events_requested"]
            .as_array()
            .unwrap()
            .contains(&json!(RISK)));
    }
    let push_create = creates
        .iter()
        .find(|b| b["delivery"]["method"] == vigil::sim::idp::PUSH)
        .unwrap();
    assert!(push_create["delivery"]["authorization_header"]
        .as_str()
        .unwrap()
        .starts_with("Bearer vigil-"));

    // An event flows through both streams into a decision.
    assert_eq!(high_risk(&idp, "user-1@example.com"), 2);
    eventually("g-1 revoked", || async {
        (status(&vigil, "g-1").await == "revoked").then_some(())
    })
    .await;
    eventually("the risk SET pushed and acknowledged by poll", || async {
        let seen = idp.observed();
        let metrics = get(&vigil, "/metrics").await.1;
        let received = |stream: &str| {
            metrics.contains(&format!(
                "vigil_sets_received_total{{stream=\"{stream}\",event_type=\"risk-level-change\",outcome=\"accepted\"}}"
            ))
        };
        (!seen.pushed.is_empty() && !seen.acked.is_empty() && received("idp-push") && received("idp-poll"))
            .then_some(())
    })
    .await;

    // The IdP pauses the push stream: Vigil sees stream-updated; events wait at the IdP.
    assert!(idp.set_status(&push_id, "paused", Some("maintenance")));
    eventually("push stream seen paused", || async {
        (liveness(&vigil, "idp-push").await["status"] == "paused").then_some(())
    })
    .await;
    high_risk(&idp, "user-2@example.com");
    eventually("g-2 revoked through the poll stream", || async {
        (status(&vigil, "g-2").await == "revoked").then_some(())
    })
    .await;
    let held = |idp: &Idp| {
        idp.streams()
            .iter()
            .find(|s| s["stream_id"] == push_id)
            .map(|s| s["held"].as_u64().unwrap())
            .unwrap()
    };
    eventually("the paused push stream to hold its event", || async {
        (held(&idp) == 1).then_some(())
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(held(&idp), 1, "held, not delivered, while paused");
    assert!(idp.set_status(&push_id, "enabled", None));
    eventually("push stream enabled and drained", || async {
        (liveness(&vigil, "idp-push").await["status"] == "enabled" && held(&idp) == 0).then_some(())
    })
    .await;

    // Restart: same streams adopted (the push one moves to the new port), nothing lost, including
    // an event emitted while Vigil was down.
    vigil.shutdown().await;
    high_risk(&idp, "user-3@example.com");
    let restarted = vigil::signal::now_ms();
    let vigil = start(config).await;
    wait_verified(&vigil, restarted).await;
    eventually("g-3 revoked after the restart", || async {
        (status(&vigil, "g-3").await == "revoked").then_some(())
    })
    .await;
    let streams = idp.streams();
    assert_eq!(streams.len(), 2, "no duplicate stream: {streams:?}");
    assert_eq!(stream_id(&idp, vigil::sim::idp::PUSH), push_id);
    assert_eq!(stream_id(&idp, vigil::sim::idp::POLL), poll_id);
    let creates = idp
        .observed()
        .requests
        .iter()
        .filter(|(m, p, _)| m == "POST" && p == "/ssf/mgmt/stream")
        .count();
    assert_eq!(creates, 2, "streams were created once");
    eventually("the push stream's held events all delivered", || async {
        (held(&idp) == 0).then_some(())
    })
    .await;
    let push_url = idp
        .streams()
        .iter()
        .find(|s| s["stream_id"] == push_id)
        .unwrap()["delivery"]["endpoint_url"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        push_url.contains(&vigil.local_addr().port().to_string()),
        "the push endpoint was updated to the new address: {push_url}"
    );
    vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polled_set_that_fails_validation_is_reported_in_set_errs_and_never_acknowledged() {
    let idp = idp().await;
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(
        dir.path(),
        vec![managed("idp-poll", idp.issuer(), DeliveryMode::Poll)],
    );
    let vigil = start(config).await;
    eventually_within(30, "the poll stream verified", || async {
        liveness(&vigil, "idp-poll").await["last_verified_ms"]
            .as_i64()
            .map(|_| ())
    })
    .await;
    let poll_id = stream_id(&idp, vigil::sim::idp::POLL);

    // Signed by a key the IdP never published, and one for another audience.
    let stranger = vigil::sim::SigningKey::generate(vigil::jose::Alg::RS256, "stranger").unwrap();
    let claims = |jti: &str, aud: &str| {
        json!({"iss": idp.issuer(), "jti": jti, "iat": vigil::signal::now_ms() / 1000, "aud": aud,
            "sub_id": {"format": "email", "email": "x@example.com"},
            "events": {RISK: {"principal": "USER", "current_level": "HIGH"}}})
    };
    assert!(idp.inject(
        &poll_id,
        "bad-key",
        stranger.sign_set(&claims("bad-key", AUDIENCE)).unwrap()
    ));
    assert!(idp.inject(
        &poll_id,
        "bad-aud",
        idp.sign(&claims("bad-aud", "https://someone-else.example"))
            .unwrap()
    ));
    assert!(idp.inject(
        &poll_id,
        "good",
        idp.sign(&claims("good", AUDIENCE)).unwrap()
    ));
    eventually("the three answered", || async {
        let seen = idp.observed();
        (seen.set_errs.len() == 2 && seen.acked.contains(&"good".to_owned())).then_some(seen)
    })
    .await;
    let seen = idp.observed();
    assert_eq!(
        seen.set_errs["bad-key"]["err"], "invalid_key",
        "{:?}",
        seen.set_errs
    );
    assert_eq!(seen.set_errs["bad-aud"]["err"], "invalid_audience");
    assert!(!seen.acked.iter().any(|j| j.starts_with("bad-")));
    let intake = vigil.intake();
    assert!(intake
        .lookup_jti(idp.issuer(), "bad-key")
        .unwrap()
        .is_none());
    assert!(intake
        .lookup_jti(idp.issuer(), "bad-aud")
        .unwrap()
        .is_none());
    assert!(intake.lookup_jti(idp.issuer(), "good").unwrap().is_some());
    vigil.shutdown().await;
}

/// Runs `vigil streams --url <vigil> <args…>`: (exit success, stdout, stderr).
async fn cli(vigil: &Vigil, args: &[&str]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"));
    // The operator token from the environment (the CLI's other source is `admin.token`).
    cmd.env("VIGIL_TOKEN", vigil.admin_token().unwrap())
        .arg("streams")
        .arg("--url")
        .arg(format!("http://{}", vigil.local_addr()))
        .args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_streams_cli_lists_inspects_verifies_and_manages_subjects() {
    let idp = idp().await;
    let dir = tempfile::tempdir().unwrap();
    let vigil = start(config(dir.path(), &idp)).await;
    wait_verified(&vigil, 0).await;

    let (ok, out, err) = cli(&vigil, &["list"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("idp-push") && out.contains("idp-poll"),
        "{out}"
    );
    assert!(out.contains("enabled"), "{out}");
    let poll_id = stream_id(&idp, vigil::sim::idp::POLL);
    assert!(out.contains(&poll_id), "{out}");

    let (ok, out, err) = cli(&vigil, &["status", "idp-poll"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("urn:ietf:rfc:8936") && out.contains(&poll_id),
        "{out}"
    );

    let (ok, _, err) = cli(&vigil, &["verify", "idp-push"]).await;
    assert!(ok, "{err}");
    let (ok, out, err) = cli(&vigil, &["create", "idp-push"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("ready"), "{out}");
    assert_eq!(idp.streams().len(), 2, "create is idempotent");

    let push_id = stream_id(&idp, vigil::sim::idp::PUSH);
    let (ok, out, err) = cli(
        &vigil,
        &[
            "set-status",
            "idp-push",
            "paused",
            "--reason",
            "maintenance",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("paused"), "{out}");
    let status_of = |idp: &Idp, id: &str| {
        idp.streams()
            .into_iter()
            .find(|s| s["stream_id"] == id)
            .unwrap()["status"]
            .clone()
    };
    assert_eq!(status_of(&idp, &push_id), "paused");
    let (ok, _, err) = cli(&vigil, &["set-status", "idp-push", "enabled"]).await;
    assert!(ok, "{err}");
    assert_eq!(status_of(&idp, &push_id), "enabled");

    let subject = r#"{"format":"email","email":"watch@example.com"}"#;
    let (ok, _, err) = cli(&vigil, &["add-subject", "idp-poll", subject]).await;
    assert!(ok, "{err}");
    let subjects = |idp: &Idp| {
        idp.streams()
            .into_iter()
            .find(|s| s["stream_id"] == poll_id.as_str())
            .unwrap()["subjects"]
            .clone()
    };
    assert_eq!(
        subjects(&idp),
        json!([{"format": "email", "email": "watch@example.com"}])
    );
    let (ok, _, err) = cli(&vigil, &["remove-subject", "idp-poll", subject]).await;
    assert!(ok, "{err}");
    assert_eq!(subjects(&idp), json!([]));

    // Failures exit non-zero with the reason.
    let (ok, _, err) = cli(&vigil, &["status", "nobody"]).await;
    assert!(!ok);
    assert!(err.contains("404") && err.contains("nobody"), "{err}");
    let (ok, _, err) = cli(&vigil, &["add-subject", "idp-poll", "not json"]).await;
    assert!(!ok);
    assert!(err.contains("not JSON"), "{err}");

    // Delete: gone at the IdP, and the record forgotten.
    let (ok, _, err) = cli(&vigil, &["delete", "idp-poll"]).await;
    assert!(ok, "{err}");
    assert_eq!(idp.streams().len(), 1);
    vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_one_stream_transmitter_is_adopted_after_409_and_its_key_rotation_is_followed() {
    // Metadata only at /.well-known/risc-configuration; one stream per receiver, already there
    // (created by hand, for poll).
    let idp = Idp::start(
        "127.0.0.1:0".parse().unwrap(),
        IdpSettings {
            receiver_credential: CREDENTIAL.into(),
            audience: AUDIENCE.into(),
            one_stream_per_receiver: true,
            legacy_risc_metadata: true,
            ..IdpSettings::default()
        },
    )
    .await
    .unwrap();
    let existing = reqwest::Client::new()
        .post(format!("{}/ssf/mgmt/stream", idp.issuer()))
        .header("authorization", CREDENTIAL)
        .json(&json!({"description": "made by hand"}))
        .send()
        .await
        .unwrap();
    assert_eq!(existing.status().as_u16(), 201);
    let existing_id = stream_id(&idp, vigil::sim::idp::POLL);

    let dir = tempfile::tempdir().unwrap();
    let config = test_config(
        dir.path(),
        vec![managed("idp-push", idp.issuer(), DeliveryMode::Push)],
    );
    let vigil = start(config).await;
    register(&vigil, "g-rot", "rotated@example.com").await;
    eventually_within(30, "the adopted stream verified", || async {
        liveness(&vigil, "idp-push").await["last_verified_ms"]
            .as_i64()
            .map(|_| ())
    })
    .await;
    let streams = idp.streams();
    assert_eq!(streams.len(), 1, "{streams:?}");
    assert_eq!(
        streams[0]["stream_id"],
        existing_id.as_str(),
        "adopted, not duplicated"
    );
    assert_eq!(
        streams[0]["delivery"]["method"],
        vigil::sim::idp::PUSH,
        "switched to push"
    );
    let conflicts = idp
        .observed()
        .requests
        .iter()
        .filter(|(m, p, _)| m == "POST" && p == "/ssf/mgmt/stream")
        .count();
    assert_eq!(
        conflicts, 2,
        "the hand-made create and Vigil's (answered 409)"
    );

    // The IdP rotates its signing key: the next SET names a kid Vigil has not seen.
    idp.rotate_keys().unwrap();
    high_risk(&idp, "rotated@example.com");
    eventually("revoked by a SET signed with the new key", || async {
        (status(&vigil, "g-rot").await == "revoked").then_some(())
    })
    .await;
    vigil.shutdown().await;
}

/// A transmitter that stops answering verification turns its stream unhealthy once a request has
/// waited past the SLA — in `/metrics`, `/readyz` and `vigil streams list` — and healthy again
/// when it answers; Vigil itself stays ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_stops_verifying_turns_unhealthy_and_recovers() {
    let idp = idp().await;
    let dir = tempfile::tempdir().unwrap();
    let mut transmitter = managed("idp-push", idp.issuer(), DeliveryMode::Push);
    if let Some(m) = &mut transmitter.manage {
        m.verification_sla_secs = 2;
    }
    let vigil = start(test_config(dir.path(), vec![transmitter])).await;
    eventually_within(30, "the stream verified", || async {
        (liveness(&vigil, "idp-push").await["last_verified_ms"].as_i64() > Some(0)).then_some(())
    })
    .await;
    let healthy_gauge = |metrics: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(r#"vigil_ssf_stream_healthy{stream="idp-push"}"#))
            .map(|l| l.ends_with(" 1"))
    };
    let (_, metrics) = get(&vigil, "/metrics").await;
    assert_eq!(healthy_gauge(&metrics), Some(true), "{metrics}");

    idp.set_verification_silent(true);
    eventually_within(30, "the stream unhealthy", || async {
        let l = liveness(&vigil, "idp-push").await;
        (l["healthy"] == false).then_some(())
    })
    .await;
    let (_, metrics) = get(&vigil, "/metrics").await;
    assert_eq!(healthy_gauge(&metrics), Some(false), "{metrics}");
    let (status, ready) = get_json(&vigil, "/readyz").await;
    assert_eq!(
        status, 200,
        "one transmitter's silence is not Vigil's: {ready}"
    );
    let stream = &ready["streams"]["idp-push"];
    assert_eq!(stream["healthy"], false, "{ready}");
    assert!(
        stream["verification_overdue_ms"].as_i64() > Some(0),
        "{ready}"
    );
    let (ok, out, err) = cli(&vigil, &["list"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("unhealthy (verification"), "{out}");

    idp.set_verification_silent(false);
    eventually_within(30, "the stream healthy again", || async {
        let l = liveness(&vigil, "idp-push").await;
        (l["healthy"] == true).then_some(())
    })
    .await;
    let (_, metrics) = get(&vigil, "/metrics").await;
    assert_eq!(healthy_gauge(&metrics), Some(true), "{metrics}");
    let (_, ready) = get_json(&vigil, "/readyz").await;
    assert_eq!(ready["streams"]["idp-push"]["healthy"], true, "{ready}");
    let (_, out, _) = cli(&vigil, &["list"]).await;
    assert!(!out.contains("unhealthy"), "{out}");
    vigil.shutdown().await;
}

/// OAuth Global Token Revocation from the simulated IdP (as Okta Universal Logout sends it): every
/// grant of the user issued before it revoked by its own rule, the others untouched; the draft's
/// answers for a user Vigil does not know, another issuer's user, a bad request, and a caller
/// without the credential of an IdP allowed to ask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_token_revocation_revokes_every_grant_of_the_user() {
    let idp = idp().await;
    let dir = tempfile::tempdir().unwrap();
    let mut transmitter = managed("idp-push", idp.issuer(), DeliveryMode::Push);
    transmitter.global_token_revocation = true;
    let vigil = start(test_config(dir.path(), vec![transmitter])).await;
    eventually_within(30, "the stream verified", || async {
        (liveness(&vigil, "idp-push").await["last_verified_ms"].as_i64() > Some(0)).then_some(())
    })
    .await;
    register(&vigil, "jane-web", "jane@example.com").await;
    register(&vigil, "jane-mobile", "jane@example.com").await;
    register(&vigil, "bob-web", "bob@example.com").await;
    let base = format!("http://{}", vigil.local_addr());

    let jane = json!({"format": "email", "email": "jane@example.com"});
    assert_eq!(
        idp.global_token_revocation(&base, jane.clone())
            .await
            .unwrap(),
        204
    );
    for grant in ["jane-web", "jane-mobile"] {
        eventually_within(30, "jane's grants revoked", || async {
            (status(&vigil, grant).await == "revoked").then_some(())
        })
        .await;
    }
    assert_eq!(status(&vigil, "bob-web").await, "active");
    let (_, decisions) = get_json(&vigil, "/v1/decisions?grant=jane-web").await;
    assert_eq!(
        decisions["decisions"][0]["rules"],
        json!(["global-token-revocation"]),
        "{decisions}"
    );
    // A session signed in after the revocation is not touched by it; one issued before it and
    // registered only now is.
    let t = vigil::signal::now_ms() as f64 / 1000.0 + 1.0;
    for (id, issued_at, expected) in [
        ("jane-later", t, "active"),
        ("jane-earlier", t - 60.0, "revoked"),
    ] {
        let grant = json!({"id": id, "kind": "session", "subject": jane, "session": id,
            "issued_at": issued_at, "expires_at": t + 3600.0});
        assert_eq!(post_json(&vigil, "/v1/grants", &grant).await.0, 201);
        assert_eq!(status(&vigil, id).await, expected, "{id}");
    }

    // The draft's other answers.
    let nobody = json!({"format": "email", "email": "nobody@example.com"});
    assert_eq!(
        idp.global_token_revocation(&base, nobody).await.unwrap(),
        404
    );
    let elsewhere = json!({"format": "iss_sub", "iss": "https://other.example/", "sub": "jane"});
    assert_eq!(
        idp.global_token_revocation(&base, elsewhere).await.unwrap(),
        403
    );
    assert_eq!(
        idp.global_token_revocation(&base, json!({"format": "email"}))
            .await
            .unwrap(),
        400
    );
    let http = reqwest::Client::new();
    let url = format!("{base}/oauth/global-token-revocation");
    let stranger = http
        .post(&url)
        .header("authorization", "Bearer not-an-idp")
        .json(&json!({"sub_id": jane}))
        .send()
        .await
        .unwrap();
    assert_eq!(stranger.status().as_u16(), 401);
    assert!(stranger.headers().contains_key("www-authenticate"));
    let (_, metrics) = get(&vigil, "/metrics").await;
    for needle in [
        r#"vigil_global_token_revocations_total{transmitter="idp-push",status="204"} 1"#,
        r#"vigil_global_token_revocations_total{transmitter="idp-push",status="404"} 1"#,
        r#"vigil_global_token_revocations_total{transmitter="unknown",status="401"}"#,
    ] {
        assert!(metrics.contains(needle), "{needle} in\n{metrics}");
    }
    vigil.shutdown().await;
}

/// OAuth client credentials toward a transmitter that takes nothing but its own short-lived
/// access tokens: each client authentication method gets tokens (discovered or configured token
/// endpoint), streams are managed, verified and polled across token expiries, a token the
/// transmitter stops taking is replaced after one 401, and no secret shows in the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_client_credentials_keep_working_across_short_lived_tokens() {
    use vigil::config::{ClientAuthMethod, OAuthClient};
    use vigil::sim::idp::OAuthRegistration;
    let dir = tempfile::tempdir().unwrap();
    let key = vigil::sim::SigningKey::generate(vigil::jose::Alg::RS256, "vigil-client").unwrap();
    let key_path = dir.path().join("client.pem");
    key.save(&key_path).unwrap();
    let mut jwk = key.public_jwk().unwrap();
    jwk["kid"] = json!("vigil-client");
    jwk["alg"] = json!("RS256");
    let oauth_idp = || async {
        Idp::start(
            "127.0.0.1:0".parse().unwrap(),
            IdpSettings {
                receiver_credential: CREDENTIAL.into(),
                audience: AUDIENCE.into(),
                long_poll: std::time::Duration::from_secs(1),
                oauth_clients: vec![
                    OAuthRegistration {
                        client_id: "vigil-basic".into(),
                        secret: Some("s3cret:&more".into()),
                        public_jwk: None,
                    },
                    OAuthRegistration {
                        client_id: "vigil-post".into(),
                        secret: Some("p0st-secret".into()),
                        public_jwk: None,
                    },
                    OAuthRegistration {
                        client_id: "vigil-jwt".into(),
                        secret: None,
                        public_jwk: Some(jwk.clone()),
                    },
                ],
                token_lifetime: std::time::Duration::from_secs(2),
                require_oauth: true,
                ..IdpSettings::default()
            },
        )
        .await
        .unwrap()
    };
    // One stream of each kind per identity provider (a second push stream at the same one would
    // be the same receiver's): basic (poll) and private_key_jwt (push) at one, post at another.
    let idp = oauth_idp().await;
    let other = oauth_idp().await;
    let oauth = |client_id: &str, method: ClientAuthMethod| OAuthClient {
        client_id: client_id.into(),
        auth_method: method,
        client_secret: match method {
            ClientAuthMethod::ClientSecretBasic => Some("s3cret:&more".into()),
            ClientAuthMethod::ClientSecretPost => Some("p0st-secret".into()),
            ClientAuthMethod::PrivateKeyJwt => None,
        },
        private_key_path: (method == ClientAuthMethod::PrivateKeyJwt).then(|| key_path.clone()),
        private_key_alg: vigil::jose::Alg::RS256,
        key_id: Some("vigil-client".into()),
        // The post client is told its endpoint; the others read it from RFC 8414 metadata.
        token_endpoint: (method == ClientAuthMethod::ClientSecretPost)
            .then(|| format!("{}/oauth/token", other.issuer())),
        authorization_server: None,
        scope: Some("ssf".into()),
    };
    let with_oauth = |name: &str, issuer: &str, delivery, client: OAuthClient| {
        let mut t = managed(name, issuer, delivery);
        if let Some(m) = &mut t.manage {
            m.credential = String::new();
            m.oauth = Some(client);
        }
        t
    };
    let transmitters = vec![
        with_oauth(
            "idp-basic",
            idp.issuer(),
            DeliveryMode::Poll,
            oauth("vigil-basic", ClientAuthMethod::ClientSecretBasic),
        ),
        with_oauth(
            "idp-post",
            other.issuer(),
            DeliveryMode::Push,
            oauth("vigil-post", ClientAuthMethod::ClientSecretPost),
        ),
        with_oauth(
            "idp-jwt",
            idp.issuer(),
            DeliveryMode::Push,
            oauth("vigil-jwt", ClientAuthMethod::PrivateKeyJwt),
        ),
    ];
    let vigil = start(test_config(dir.path(), transmitters)).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    for stream in ["idp-basic", "idp-post", "idp-jwt"] {
        while liveness(&vigil, stream).await["last_verified_ms"].as_i64() <= Some(0) {
            if std::time::Instant::now() > deadline {
                let (_, all) = get(&vigil, "/v1/ssf/streams").await;
                let o = idp.observed();
                let calls: Vec<(String, String)> = o
                    .requests
                    .iter()
                    .map(|(m, p, _)| (m.clone(), p.clone()))
                    .collect();
                panic!(
                    "{stream} not verified with its tokens: {all}\n{:?}\npush failures {} pushed {:?}\n{calls:?}",
                    idp.token_requests(),
                    o.push_failures,
                    o.pushed
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    let methods = [idp.token_requests(), other.token_requests()].concat();
    for method in [
        "client_secret_basic",
        "client_secret_post",
        "private_key_jwt",
    ] {
        assert!(methods.iter().any(|m| m == method), "{method}: {methods:?}");
    }

    // Past a token's lifetime, the poll stream still brings events in.
    register(&vigil, "jane-web", "jane@example.com").await;
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let acked = idp.observed().acked.len();
    high_risk(&idp, "jane@example.com");
    eventually_within(
        30,
        "jane revoked, the poll acknowledged with a fresh token",
        || async {
            (status(&vigil, "jane-web").await == "revoked" && idp.observed().acked.len() > acked)
                .then_some(())
        },
    )
    .await;
    // A token the transmitter stops taking (revoked before its expiry) is replaced after one 401.
    register(&vigil, "bob-web", "bob@example.com").await;
    let basic_before = idp
        .token_requests()
        .iter()
        .filter(|m| *m == "client_secret_basic")
        .count();
    let acked = idp.observed().acked.len();
    idp.revoke_tokens();
    high_risk(&idp, "bob@example.com");
    eventually_within(
        30,
        "bob revoked, the poll acknowledged after its 401",
        || async {
            (status(&vigil, "bob-web").await == "revoked" && idp.observed().acked.len() > acked)
                .then_some(())
        },
    )
    .await;
    let basic_after = idp
        .token_requests()
        .iter()
        .filter(|m| *m == "client_secret_basic")
        .count();
    assert!(basic_after > basic_before, "{basic_before} → {basic_after}");

    let (_, streams) = get(&vigil, "/v1/ssf/streams").await;
    for secret in ["s3cret", "p0st-secret", "at-"] {
        assert!(!streams.contains(secret), "{secret} in {streams}");
    }
    let (_, metrics) = get(&vigil, "/metrics").await;
    assert!(
        metrics.contains(r#"vigil_ssf_client_tokens_total{transmitter="idp-basic"}"#),
        "{metrics}"
    );
    vigil.shutdown().await;
}

/// Two managed push streams (and a poll stream) at one identity provider each keep their own
/// stream: neither adopts the other's (a push stream is adopted only when it pushes to this
/// stream's path). Token fetches slow the managers down enough to interleave their adoption.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_streams_at_one_transmitter_never_take_each_others() {
    use vigil::config::OAuthClient;
    let idp = Idp::start(
        "127.0.0.1:0".parse().unwrap(),
        IdpSettings {
            receiver_credential: CREDENTIAL.into(),
            audience: AUDIENCE.into(),
            oauth_clients: vec![vigil::sim::idp::OAuthRegistration {
                client_id: "vigil".into(),
                secret: Some("secret".into()),
                public_jwk: None,
            }],
            require_oauth: true,
            ..IdpSettings::default()
        },
    )
    .await
    .unwrap();
    let transmitters: Vec<TransmitterConfig> = [
        ("idp-poll", DeliveryMode::Poll),
        ("idp-a", DeliveryMode::Push),
        ("idp-b", DeliveryMode::Push),
    ]
    .into_iter()
    .map(|(name, delivery)| {
        let mut t = managed(name, idp.issuer(), delivery);
        if let Some(m) = &mut t.manage {
            m.credential = String::new();
            m.oauth = Some(OAuthClient {
                client_id: "vigil".into(),
                auth_method: Default::default(),
                client_secret: Some("secret".into()),
                private_key_path: None,
                private_key_alg: vigil::jose::Alg::RS256,
                key_id: None,
                token_endpoint: None,
                authorization_server: None,
                scope: None,
            });
        }
        t
    })
    .collect();
    let dir = tempfile::tempdir().unwrap();
    let vigil = start(test_config(dir.path(), transmitters)).await;
    for stream in ["idp-poll", "idp-a", "idp-b"] {
        eventually_within(30, "every stream verified", || async {
            (liveness(&vigil, stream).await["last_verified_ms"].as_i64() > Some(0)).then_some(())
        })
        .await;
    }
    let mut endpoints: Vec<String> = idp
        .streams()
        .iter()
        .map(|s| {
            s["delivery"]["endpoint_url"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    endpoints.sort();
    assert_eq!(endpoints.len(), 3, "{endpoints:?}");
    for path in ["/ssf/push/idp-a", "/ssf/push/idp-b"] {
        let to_it = endpoints.iter().filter(|e| e.ends_with(path)).count();
        assert_eq!(to_it, 1, "{path}: {endpoints:?}");
    }
    assert_eq!(idp.observed().push_failures, 0);
    vigil.shutdown().await;
}
