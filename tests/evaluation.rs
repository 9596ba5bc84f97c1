//! End to end: signed SETs pushed over HTTP change subjects' context, and the engine re-evaluates the
//! affected grants (registered over HTTP) against the policy set, with decisions in the audit API.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{json, Value};
use vigil::jose::Alg;

async fn env_with(policy_dir: Option<&std::path::Path>) -> Env {
    start_env(|config| {
        if let Some(p) = policy_dir {
            config.policy.dir = p.to_owned();
        }
        config.policy.watch_interval_secs = 0;
    })
    .await
}

impl Env {
    /// The decisions matching `query`, waiting until there is at least one: a grant's new status is
    /// visible (fail closed) as soon as its shard decides, the audit append follows at the batch's flush.
    async fn decisions(&self, query: &str) -> Vec<Value> {
        eventually(&format!("decisions for {query}"), || async {
            let found = self.decisions_now(query).await;
            (!found.is_empty()).then_some(found)
        })
        .await
    }

    async fn decisions_now(&self, query: &str) -> Vec<Value> {
        let (code, body) = get_json(&self.vigil, &format!("/v1/decisions?{query}")).await;
        assert_eq!(code, 200, "{body}");
        body["decisions"].as_array().unwrap().clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn risk_high_revokes_exactly_the_subjects_two_grants_with_reasons_in_the_audit_api() {
    let env = env_with(None).await;
    let t = now();
    env.register(&grant("jane-web", email("jane@example.com"), t - 60.0))
        .await;
    let mut api = grant("jane-api", email("jane@example.com"), t - 30.0);
    api["kind"] = json!("access_token");
    env.register(&api).await;
    env.register(&grant("bob-web", email("bob@example.com"), t - 60.0))
        .await;

    env.push(&set(
        "risk-1",
        email("Jane@Example.com"),
        &format!("{CAEP}risk-level-change"),
        risk("HIGH", t),
    ))
    .await;
    env.wait_status("jane-web", "revoked").await;
    env.wait_status("jane-api", "revoked").await;
    assert_eq!(env.status("bob-web").await, "active");

    let decisions = env
        .decisions(&format!("subject={}", encode("email:jane@example.com")))
        .await;
    let revokes: Vec<&Value> = decisions
        .iter()
        .filter(|d| d["effect"] == "revoke")
        .collect();
    assert_eq!(revokes.len(), 2, "{decisions:?}");
    let version = env.vigil.engine().policy_version();
    for d in &revokes {
        assert_eq!(d["rules"], json!(["risk-high"]));
        assert_eq!(d["policy_version"], json!(version));
        assert_eq!(d["cause"]["jti"], "risk-1");
        assert_eq!(d["cause"]["event_type"], "risk-level-change");
        assert!(d["reason"].as_str().unwrap().contains("risk HIGH"), "{d}");
        assert!(
            d["reason"].as_str().unwrap().contains("impossible travel"),
            "{d}"
        );
        assert_eq!(d["enforcement_points"], json!(["api-gateway"]));
    }
    let mut ids: Vec<&str> = revokes
        .iter()
        .map(|d| d["grant_id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, vec!["jane-api", "jane-web"]);
    assert!(env
        .decisions_now(&format!("subject={}", encode("email:bob@example.com")))
        .await
        .is_empty());
    let by_grant = env.decisions("grant=jane-web").await;
    assert_eq!(by_grant.len(), 1);

    // Every filter works, alone and together; one that matches nothing lists nothing.
    let made_at = revokes[0]["time"].as_f64().unwrap();
    let rfc3339 = |t: f64| {
        chrono::DateTime::from_timestamp_millis((t * 1000.0) as i64)
            .unwrap()
            .to_rfc3339()
    };
    for (query, expected) in [
        (format!("policy_version={version}&rule=risk-high"), 2),
        ("policy_version=0000000000000000".to_owned(), 0),
        ("cause=signal&status=revoked&effect=revoke".to_owned(), 2),
        ("cause=registration&effect=revoke".to_owned(), 0),
        ("rule=no-such-rule".to_owned(), 0),
        ("status=step_up".to_owned(), 0),
        (
            format!("since={}&until={}", made_at - 1.0, made_at + 1.0),
            2,
        ),
        (format!("until={}", made_at - 1.0), 0),
        (
            format!(
                "since={}&until={}",
                encode(&rfc3339(made_at - 1.0)),
                encode(&rfc3339(made_at + 1.0))
            ),
            2,
        ),
    ] {
        let found = env.decisions_now(&query).await;
        assert_eq!(found.len(), expected, "{query}: {found:?}");
    }
    // A misspelt or malformed filter is refused, not ignored.
    for query in [
        "polcy_version=x",
        "since=yesterday",
        "status=gone",
        "cause=whim",
    ] {
        let (code, body) = get_json(&env.vigil, &format!("/v1/decisions?{query}")).await;
        assert_eq!(code, 400, "{query}: {body}");
        assert_eq!(body["error"], "invalid_request", "{query}: {body}");
    }

    // Explain: context with the fact's time and source, revoked grants, the signal that did it.
    let (code, why) = get_json(
        &env.vigil,
        &format!("/v1/subjects/{}", encode("email:jane@example.com")),
    )
    .await;
    assert_eq!(code, 200, "{why}");
    let risk_fact = why["context"]["risk"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .clone();
    assert_eq!(risk_fact["value"]["level"], "HIGH");
    assert_eq!(risk_fact["source"], "ssf:tx-idp");
    assert_eq!(why["grants"]["revoked"].as_array().unwrap().len(), 2);
    assert_eq!(why["recent_signals"][0]["jti"], "risk-1");
    assert_eq!(why["recent_decisions"].as_array().unwrap().len(), 2);
    env.vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_low_after_a_high_leaves_the_context_high_and_the_grant_revoked() {
    let env = env_with(None).await;
    let t = now();
    env.register(&grant("g", email("ooo@example.com"), t - 600.0))
        .await;
    env.push(&set(
        "high",
        email("ooo@example.com"),
        &format!("{CAEP}risk-level-change"),
        risk("HIGH", t - 10.0),
    ))
    .await;
    env.wait_status("g", "revoked").await;
    env.push(&set(
        "low",
        email("ooo@example.com"),
        &format!("{CAEP}risk-level-change"),
        risk("LOW", t - 100.0),
    ))
    .await;
    // The LOW is applied (it shows in recent signals) but changes nothing.
    let why = eventually("the LOW to be applied", || async {
        let (_, why) = get_json(
            &env.vigil,
            &format!("/v1/subjects/{}", encode("email:ooo@example.com")),
        )
        .await;
        (why["recent_signals"][0]["jti"] == "low").then_some(why)
    })
    .await;
    assert_eq!(why["recent_signals"][0]["changed"], false);
    let level = why["context"]["risk"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()["value"]["level"]
        .clone();
    assert_eq!(level, "HIGH");
    assert_eq!(env.status("g").await, "revoked");
    // A grant registered now is evaluated against the (HIGH) context and revoked at once.
    let reply = env
        .register(&grant("g2", email("ooo@example.com"), t))
        .await;
    assert_eq!(reply["grant"]["status"], "revoked");
    assert_eq!(reply["decisions"][0]["cause"]["kind"], "registration");
    env.vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_session_revokes_one_session_and_a_later_session_survives() {
    let env = env_with(None).await;
    let t = now();
    let user = json!({"format": "iss_sub", "iss": ISS, "sub": "u-42"});
    let mut s1 = grant("s1", user.clone(), t - 600.0);
    s1["session"] = json!("sess-1");
    let mut s2 = grant("s2", user.clone(), t - 600.0);
    s2["session"] = json!("sess-2");
    let mut s1_later = grant("s1-later", user.clone(), t + 1.0);
    s1_later["session"] = json!("sess-1");
    for g in [&s1, &s2, &s1_later] {
        env.register(g).await;
    }
    let subject =
        json!({"format": "complex", "user": user, "session": {"format": "opaque", "id": "sess-1"}});
    let payload = json!({"initiating_entity": "admin", "reason_admin": {"en": "logout"}, "event_timestamp": t});
    env.push(&set(
        "logout-1",
        subject,
        &format!("{CAEP}session-revoked"),
        payload,
    ))
    .await;
    env.wait_status("s1", "revoked").await;
    assert_eq!(env.status("s2").await, "active");
    assert_eq!(
        env.status("s1-later").await,
        "active",
        "established after the logout time"
    );
    env.vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_going_non_compliant_revokes_grants_on_it_across_principals() {
    let env = env_with(None).await;
    let t = now();
    let device = json!({"format": "opaque", "id": "laptop-7"});
    for (id, user) in [
        ("a1", "alice@example.com"),
        ("b1", "bob@example.com"),
        ("c1", "carol@example.com"),
    ] {
        let mut g = grant(id, email(user), t - 60.0);
        if id != "c1" {
            g["device"] = device.clone();
        }
        env.register(&g).await;
    }
    let subject =
        json!({"format": "complex", "device": device, "tenant": {"format": "opaque", "id": "t1"}});
    let payload = json!({"previous_status": "compliant", "current_status": "not-compliant", "event_timestamp": t});
    env.push(&set(
        "dev-1",
        subject,
        &format!("{CAEP}device-compliance-change"),
        payload,
    ))
    .await;
    env.wait_status("a1", "revoked").await;
    env.wait_status("b1", "revoked").await;
    assert_eq!(env.status("c1").await, "active");
    env.vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_delegations_fall_with_the_delegating_user_and_session_established_creates_a_grant() {
    let env = env_with(None).await;
    let t = now();
    let user = json!({"format": "iss_sub", "iss": ISS, "sub": "delegator"});
    env.register(&json!({
        "id": "agent-run-1", "kind": "agent_delegation", "principal_type": "agent",
        "subject": {"format": "opaque", "id": "agent-7"}, "on_behalf_of": user,
        "scopes": ["calendar.read"], "issued_at": t - 60.0, "expires_at": t + 3600.0
    }))
    .await;
    // CAEP session-established for the user creates a session grant.
    let subject =
        json!({"format": "complex", "user": user, "session": {"format": "opaque", "id": "web-1"}});
    env.push(&set(
        "est-1",
        subject,
        &format!("{CAEP}session-established"),
        json!({"acr": "AAL2", "amr": ["otp"], "event_timestamp": t - 30.0}),
    ))
    .await;
    let session_id = "caep-session:opaque:web-1";
    env.wait_status(session_id, "active").await;
    let (_, g) = get_json(&env.vigil, &format!("/v1/grants/{}", encode(session_id))).await;
    assert_eq!(g["attributes"]["acr"], "AAL2");

    env.push(&set(
        "dis-1",
        user,
        &format!("{RISC}account-disabled"),
        json!({"reason": "hijacking"}),
    ))
    .await;
    env.wait_status("agent-run-1", "revoked").await;
    env.wait_status(session_id, "revoked").await;
    let d = env.decisions("grant=agent-run-1").await;
    assert!(
        d[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("delegating user:"),
        "{d:?}"
    );
    env.vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_that_errors_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rules.yaml"),
        r#"
rules:
  - id: broken-risk
    on: [risk-level-change]
    # Errors for this test's grant only: a rule that errors on every input would not pass the
    # lint that start-up runs.
    when: "grant.id == 'fc' && context.risk.no_such_field == 'HIGH'"
    effect: revoke
    reason: never rendered
  - id: low-is-fine
    on: [risk-level-change]
    when: "context.risk.level == 'HIGH'"
    effect: revoke
"#,
    )
    .unwrap();
    let env = env_with(Some(dir.path())).await;
    let t = now();
    env.register(&grant("fc", email("fc@example.com"), t - 60.0))
        .await;
    // LOW: the working rule would not revoke; the broken one errors and must not permit.
    env.push(&set(
        "fc-1",
        email("fc@example.com"),
        &format!("{CAEP}risk-level-change"),
        risk("LOW", t),
    ))
    .await;
    env.wait_status("fc", "revoked").await;
    let d = env.decisions("grant=fc").await;
    assert_eq!(d[0]["rules"], json!(["broken-risk"]));
    assert_eq!(d[0]["errors"], json!(["broken-risk"]));
    env.vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_re_evaluates_every_grant_and_refuses_a_broken_set() {
    let dir = tempfile::tempdir().unwrap();
    let base = r#"
rules:
  - id: risk-high
    on: [risk-level-change]
    when: "context.risk.level == 'HIGH'"
    effect: revoke
"#;
    std::fs::write(dir.path().join("base.yaml"), base).unwrap();
    let env = env_with(Some(dir.path())).await;
    let t = now();
    for i in 0..5 {
        let mut g = grant(
            &format!("hr-{i}"),
            email(&format!("hr{i}@example.com")),
            t - 60.0,
        );
        g["scopes"] = if i % 2 == 0 {
            json!(["admin"])
        } else {
            json!(["read"])
        };
        env.register(&g).await;
    }
    let v1 = env.vigil.engine().policy_version();

    // A broken file is refused and changes nothing.
    std::fs::write(
        dir.path().join("broken.yaml"),
        "rules: [{id: x, on: [nope], when: 'true', effect: revoke}]",
    )
    .unwrap();
    let (code, body) = post_json(&env.vigil, "/v1/policies/reload", &json!({})).await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["status"], "refused");
    assert!(body["error"].as_str().unwrap().contains("nope"), "{body}");
    assert_eq!(env.vigil.engine().policy_version(), v1);
    std::fs::remove_file(dir.path().join("broken.yaml")).unwrap();

    // A valid change swaps and re-evaluates all grants: the admin ones are restricted.
    std::fs::write(
        dir.path().join("admin.yaml"),
        "rules: [{id: no-admin, on: ['*'], when: \"'admin' in grant.scopes\", effect: restrict, reason: admin scope suspended}]",
    )
    .unwrap();
    let (code, body) = post_json(&env.vigil, "/v1/policies/reload", &json!({})).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "swapped");
    let v2 = body["version"].as_str().unwrap().to_owned();
    assert_ne!(v2, v1);
    for i in 0..5 {
        let expected = if i % 2 == 0 { "restricted" } else { "active" };
        env.wait_status(&format!("hr-{i}"), expected).await;
    }
    let d = env.decisions("grant=hr-0").await;
    assert_eq!(d[0]["policy_version"], json!(v2));
    assert_eq!(d[0]["cause"]["kind"], "policy_swap");
    let (_, body) = post_json(&env.vigil, "/v1/policies/reload", &json!({})).await;
    assert_eq!(body["status"], "unchanged");

    // Removing the rule lifts the restriction (an `allow` decision), never a revocation.
    std::fs::remove_file(dir.path().join("admin.yaml")).unwrap();
    assert!(matches!(
        env.vigil.reload_policies().await,
        vigil::reload::ReloadOutcome::Swapped { .. }
    ));
    env.wait_status("hr-0", "active").await;
    env.vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_tombstones_and_context_survive_restart_and_revoked_ids_stay_revoked() {
    let env = env_with(None).await;
    let t = now();
    env.register(&grant("keep", email("keep@example.com"), t - 60.0))
        .await;
    env.register(&grant("gone", email("gone@example.com"), t - 60.0))
        .await;
    env.register(&grant("ended", email("keep@example.com"), t - 60.0))
        .await;
    env.push(&set(
        "r-1",
        email("gone@example.com"),
        &format!("{RISC}account-disabled"),
        json!({}),
    ))
    .await;
    env.wait_status("gone", "revoked").await;
    let del = api(&env.vigil, reqwest::Method::DELETE, "/v1/grants/ended")
        .send()
        .await
        .unwrap();
    assert_eq!(del.status().as_u16(), 204);
    // Deleting a revoked grant keeps its tombstone.
    let del = api(&env.vigil, reqwest::Method::DELETE, "/v1/grants/gone")
        .send()
        .await
        .unwrap();
    assert_eq!(del.status().as_u16(), 200);

    let env = env.restart().await;

    assert_eq!(env.status("keep").await, "active");
    assert_eq!(env.status("gone").await, "revoked");
    assert_eq!(get_json(&env.vigil, "/v1/grants/ended").await.0, 404);
    // Re-registration of a revoked id is refused.
    let (code, body) = post_json(
        &env.vigil,
        "/v1/grants",
        &grant("gone", email("gone@example.com"), t),
    )
    .await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["error"], "grant_revoked");
    // The context survived: a new grant for the disabled account is revoked at registration.
    let reply = env
        .register(&grant("gone-2", email("gone@example.com"), t))
        .await;
    assert_eq!(reply["grant"]["status"], "revoked");
    // The audit survived too.
    assert_eq!(env.decisions("grant=gone").await.len(), 1);
    env.vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_requests_are_refused() {
    let env = env_with(None).await;
    for body in [
        json!({"id": "x"}),
        json!({"id": "x", "kind": "session", "subject": {"format": "email"}, "issued_at": 1, "expires_at": 2}),
        json!({"id": "x", "kind": "session", "subject": {"format": "email", "email": "a@b"}, "issued_at": 2, "expires_at": 1}),
        json!({"id": "x", "kind": "agent_delegation", "subject": {"format": "opaque", "id": "a"}, "issued_at": 1, "expires_at": 2}),
    ] {
        let (code, reply) = post_json(&env.vigil, "/v1/grants", &body).await;
        assert_eq!(code, 400, "{body} -> {reply}");
        assert_eq!(reply["error"], "invalid_grant");
    }
    assert_eq!(env.vigil.engine().grant_count(), 0);
    assert_eq!(get_json(&env.vigil, "/v1/subjects/nobody").await.0, 404);
    env.vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_policy_file_is_picked_up_without_any_call() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.yaml"), "rules: []\n").unwrap();
    let tx = Transmitter::start(&[Alg::RS256]).await;
    let data = tempfile::tempdir().unwrap();
    let mut config = test_config(data.path(), vec![tx.config("idp", ISS, &[AUD])]);
    config.policy.dir = dir.path().to_owned();
    config.policy.watch_interval_secs = 1;
    config.enforcement_points = vec![enforcement_point(
        "api-gateway",
        "api-gateway-token-0123456789",
    )];
    let vigil = start(config.clone()).await;
    let env = Env {
        tx,
        vigil,
        config,
        _dir: data,
    };
    let mut g = grant("watched", email("w@example.com"), now() - 10.0);
    g["scopes"] = json!(["admin"]);
    env.register(&g).await;
    std::fs::write(
        dir.path().join("admin.yaml"),
        "rules: [{id: no-admin, on: ['*'], when: \"'admin' in grant.scopes\", effect: step_up}]\n",
    )
    .unwrap();
    env.wait_status("watched", "step_up").await;
    env.vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_naming_an_unknown_enforcement_point_is_refused() {
    let env = env_with(None).await;
    let mut g = grant("to-nowhere", email("nowhere@example.com"), now() - 10.0);
    g["enforcement_points"] = json!(["gw"]);
    let (code, body) = post_json(&env.vigil, "/v1/grants", &g).await;
    assert_eq!(code, 400, "{body}");
    let description = body["description"].as_str().unwrap();
    assert!(
        description.contains("`gw`") && description.contains("api-gateway"),
        "names the unknown one and the known ones: {description}"
    );
    let (code, _) = get_json(&env.vigil, "/v1/grants/to-nowhere").await;
    assert_eq!(code, 404, "nothing was registered");
    env.vigil.shutdown().await;
}

/// Start-up loads the policy set the way a reload does: a set changed while Vigil was stopped is
/// applied to existing grants before the first request is served; a set that lints with errors,
/// or a configured directory that does not exist, stops the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_changed_while_stopped_applies_at_start_and_a_broken_one_refuses_to_start() {
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(policies.path().join("base.yaml"), "rules: []\n").unwrap();
    let env = env_with(Some(policies.path())).await;
    let mut g = grant("admin-1", email("admin@example.com"), now() - 10.0);
    g["scopes"] = json!(["admin"]);
    assert_eq!(post_json(&env.vigil, "/v1/grants", &g).await.0, 201);

    std::fs::write(
        policies.path().join("admin.yaml"),
        "rules: [{id: no-admin, on: ['*'], when: \"'admin' in grant.scopes\", effect: revoke}]\n",
    )
    .unwrap();
    let env = env.restart().await;
    let (_, got) = get_json(&env.vigil, "/v1/grants/admin-1").await;
    assert_eq!(got["status"], "revoked", "{got}");
    let (_, verdict) = post_json(&env.vigil, "/v1/check", &json!({"grant_id": "admin-1"})).await;
    assert_eq!(verdict["decision"], "deny", "{verdict}");

    let Env { vigil, config, .. } = env;
    vigil.shutdown().await;
    std::fs::write(
        policies.path().join("broken.yaml"),
        "rules: [{id: broken, on: ['*'], when: \"grant.no_such.field == 1\", effect: revoke}]\n",
    )
    .unwrap();
    let refused = |r: Result<vigil::Vigil, vigil::app::StartError>| match r {
        Ok(_) => panic!("started"),
        Err(e) => e.to_string(),
    };
    let e = refused(vigil::Vigil::start(config.clone()).await);
    assert!(e.contains("broken"), "{e}");
    let mut typo = config.clone();
    typo.policy.dir = policies.path().join("polices");
    let e = refused(vigil::Vigil::start(typo).await);
    assert!(e.contains("polices") && e.contains("does not exist"), "{e}");
}

/// Registrations that introduce the same identifier at the same time link it to one principal,
/// and the link Vigil acts on is the one it keeps: after a restart every identifier still leads
/// to the principal it led to before (two racing links once wrote two different rows for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_registrations_link_each_identifier_to_one_principal() {
    let env = env_with(None).await;
    let engine = env.vigil.engine().clone();
    let t = now();
    let id = |round: usize, i: usize| format!("r{round}-u{i}@example.com");
    let mut identifiers = Vec::new();
    for round in 0..100 {
        let mut tasks = Vec::new();
        for i in 0..8 {
            // Chained pairs: grant i and grant i+1 both introduce identifier i+1.
            let request: vigil::grant::GrantRequest = serde_json::from_value(json!({
                "id": format!("r{round}-g{i}"), "kind": "session",
                "subject": {"format": "aliases", "identifiers": [email(&id(round, i)), email(&id(round, i + 1))]},
                "issued_at": t - 10.0, "expires_at": t + 3600.0}))
            .unwrap();
            let engine = engine.clone();
            tasks.push(tokio::spawn(async move {
                engine
                    .register(request, vigil::grant::Registrant::client("test"))
                    .await
            }));
        }
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        identifiers.extend((0..9).map(|i| format!("email:{}", id(round, i))));
    }
    let before: Vec<String> = identifiers.iter().map(|k| engine.principal_of(k)).collect();
    drop(engine);
    let env = env.restart().await;
    let engine = env.vigil.engine().clone();
    let after: Vec<String> = identifiers.iter().map(|k| engine.principal_of(k)).collect();
    let moved: Vec<(&String, &String, &String)> = identifiers
        .iter()
        .zip(before.iter().zip(after.iter()))
        .filter(|(_, (b, a))| b != a)
        .map(|(k, (b, a))| (k, b, a))
        .collect();
    assert!(
        moved.is_empty(),
        "identifiers linked differently after a restart: {moved:?}"
    );
    drop(engine);
    env.vigil.shutdown().await;
}

/// An identity provider announcing sessions meets its own quota (`transmitters[].max_grants`): its
/// session-established SETs past it are still accepted (202) and counted, but make no grant, while
/// an API client registers as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transmitter_past_its_grant_quota_makes_no_more_session_grants() {
    let env = start_env(|config| {
        config.engine.max_grants = 100;
        config.engine.max_grants_per_registrant = Some(50);
        config.transmitters[0].max_grants = Some(2);
    })
    .await;
    let t = now();
    for i in 0..3 {
        let subject = json!({"format": "complex", "user": email(&format!("u{i}@example.com")),
            "session": {"format": "opaque", "id": format!("web-{i}")}});
        env.push(&set(
            &format!("est-{i}"),
            subject,
            &format!("{CAEP}session-established"),
            json!({"event_timestamp": t - 30.0}),
        ))
        .await;
    }
    // The metrics are the process's: no other test of this file refuses a grant.
    eventually("the third session grant refused", || async {
        let (_, metrics) = get(&env.vigil, "/metrics").await;
        metrics
            .contains("vigil_grants_refused_total{reason=\"quota\"} 1")
            .then_some(())
    })
    .await;
    let sessions: Vec<_> = (0..3)
        .filter_map(|i| {
            env.vigil
                .engine()
                .grant(&format!("caep-session:opaque:web-{i}"))
        })
        .collect();
    assert_eq!(sessions.len(), 2);
    assert!(sessions
        .iter()
        .all(|g| g.registered_by.name().as_ref() == "transmitter:tx-idp"));
    env.register(&grant("api-1", email("u0@example.com"), t - 60.0))
        .await;
}
