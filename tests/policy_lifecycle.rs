//! An operator's policy change, before and as it goes live: the impact preview of a candidate set
//! is exactly what swapping it in then does, grant by grant (delegations, device- and
//! session-scoped facts, a rule that fails closed, a loosening); a set failing its own tests is
//! refused on every reload path; `policy.require_preview` holds back a large change unless forced;
//! a shadow set runs beside the live one, its divergences recorded, until promoted or discarded.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;

use common::*;
use serde_json::{json, Value};

/// The running set: MEDIUM risk steps up, a non-compliant device restricts, admin scope restricts.
const LIVE: &str = r#"
rules:
  - id: risk-high
    on: [risk-level-change]
    when: "context.risk.level == 'HIGH'"
    effect: revoke
  - id: risk-medium-step-up
    on: [risk-level-change]
    when: "context.risk.level == 'MEDIUM'"
    effect: step_up
  - id: device-restrict
    on: [device-compliance-change]
    when: "context.device.status == 'not-compliant'"
    effect: restrict
  - id: admin-restrict
    on: ['*']
    when: "'admin' in grant.scopes"
    effect: restrict
"#;

/// The candidate: MEDIUM revokes, admin scope is no longer restricted (a loosening), a revoked
/// session revokes its grants, and one rule fails to evaluate for one grant (fails closed).
const CANDIDATE: &str = r#"
rules:
  - id: risk-high
    on: [risk-level-change]
    when: "context.risk.level == 'HIGH'"
    effect: revoke
  - id: risk-medium-revoke
    on: [risk-level-change]
    when: "context.risk.level == 'MEDIUM'"
    effect: revoke
    reason: "risk MEDIUM now revokes"
  - id: device-restrict
    on: [device-compliance-change]
    when: "context.device.status == 'not-compliant'"
    effect: restrict
  - id: session-revoked
    on: [session-revoked]
    when: "context.session_revoked_at > grant.issued_at"
    effect: revoke
  - id: broken-for-e1
    on: [risk-level-change]
    when: "grant.id == 'e1' && context.risk.no_such_field == 'x'"
    effect: revoke
"#;

async fn env(policies: &std::path::Path, require_preview: Option<u64>, watch_secs: u64) -> Env {
    start_env(|config| {
        config.policy.dir = policies.to_owned();
        config.policy.watch_interval_secs = watch_secs;
        config.policy.require_preview = require_preview;
    })
    .await
}

impl Env {
    async fn statuses(&self, ids: &[&str]) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for id in ids {
            out.insert((*id).to_owned(), self.status(id).await);
        }
        out
    }

    /// Grants of every kind the preview must get right, in the states the live set put them.
    async fn populate(&self) -> Vec<&'static str> {
        self.populate_signals().await;
        self.populated_under_live_set().await
    }

    /// Every signal recorded and processed (whatever set runs).
    async fn processed(&self, signals: u64) {
        eventually("every signal processed", || async {
            let intake = self.vigil.intake();
            (intake.stored_count().unwrap() == signals && intake.pending_count().unwrap() == 0)
                .then_some(())
        })
        .await
    }

    /// The status decisions signals and registrations caused: `{(grant, jti or
    /// "registration"): status}`.
    async fn signal_decisions(&self) -> BTreeMap<(String, String), String> {
        let mut out = BTreeMap::new();
        for cause in ["signal", "dependency", "registration"] {
            let (code, body) = get_json(
                &self.vigil,
                &format!("/v1/decisions?cause={cause}&limit=1000"),
            )
            .await;
            assert_eq!(code, 200, "{body}");
            for d in body["decisions"].as_array().unwrap() {
                if d["effect"] == "notify" || d["shadow"] == true {
                    continue;
                }
                out.insert(
                    (
                        d["grant_id"].as_str().unwrap().to_owned(),
                        d["cause"]["jti"]
                            .as_str()
                            .unwrap_or("registration")
                            .to_owned(),
                    ),
                    d["status"].as_str().unwrap().to_owned(),
                );
            }
        }
        out
    }

    /// Registers the grants and pushes the signals of [`Env::populate`], waiting for nothing.
    async fn populate_signals(&self) {
        let t = now();
        for (id, user) in [
            ("m1", "m1@example.com"),
            ("m2", "m2@example.com"),
            ("h1", "h1@example.com"),
            ("e1", "e1@example.com"),
            ("plain", "plain@example.com"),
        ] {
            self.register(&grant(id, email(user), t - 60.0)).await;
        }
        // Device-scoped: the same user's grant on the device and off it.
        let device = json!({"format": "opaque", "id": "laptop-9"});
        let mut d1 = grant("d1", email("d@example.com"), t - 60.0);
        d1["device"] = device.clone();
        self.register(&d1).await;
        self.register(&grant("d1-off", email("d@example.com"), t - 60.0))
            .await;
        // Session-scoped: one session revoked, the other not.
        let user = email("u-s@example.com");
        let mut s1 = grant("s1", user.clone(), t - 600.0);
        s1["session"] = json!("sess-1");
        let mut s2 = grant("s2", user.clone(), t - 600.0);
        s2["session"] = json!("sess-2");
        self.register(&s1).await;
        self.register(&s2).await;
        // An agent acting for a user whose risk is MEDIUM.
        let delegator = json!({"format": "iss_sub", "iss": ISS, "sub": "delegator"});
        self.register(&json!({
            "id": "ag1", "kind": "agent_delegation", "principal_type": "agent",
            "subject": {"format": "opaque", "id": "agent-9"}, "on_behalf_of": delegator,
            "scopes": ["calendar.read"], "issued_at": t - 60.0, "expires_at": t + 3600.0
        }))
        .await;
        let mut a1 = grant("a1", email("a@example.com"), t - 60.0);
        a1["scopes"] = json!(["admin"]);
        self.register(&a1).await;

        let rlc = format!("{CAEP}risk-level-change");
        self.push(&set(
            "r-m1",
            email("m1@example.com"),
            &rlc,
            risk("MEDIUM", t),
        ))
        .await;
        self.push(&set(
            "r-m2",
            email("m2@example.com"),
            &rlc,
            risk("MEDIUM", t),
        ))
        .await;
        self.push(&set("r-h1", email("h1@example.com"), &rlc, risk("HIGH", t)))
            .await;
        self.push(&set("r-e1", email("e1@example.com"), &rlc, risk("LOW", t)))
            .await;
        self.push(&set("r-del", delegator, &rlc, risk("MEDIUM", t)))
            .await;
        self.push(&set(
            "dev",
            json!({"format": "complex", "device": device, "tenant": {"format": "opaque", "id": "t1"}}),
            &format!("{CAEP}device-compliance-change"),
            json!({"previous_status": "compliant", "current_status": "not-compliant", "event_timestamp": t}),
        ))
        .await;
        self.push(&set(
            "logout",
            json!({"format": "complex", "user": user, "session": {"format": "opaque", "id": "sess-1"}}),
            &format!("{CAEP}session-revoked"),
            json!({"initiating_entity": "admin", "event_timestamp": t}),
        ))
        .await;
    }

    /// Waits until [`Env::populate_signals`]' signals have the live set's effects.
    async fn populated_under_live_set(&self) -> Vec<&'static str> {
        for (id, status) in [
            ("m1", "step_up"),
            ("m2", "step_up"),
            ("ag1", "step_up"),
            ("h1", "revoked"),
            ("d1", "restricted"),
            ("a1", "restricted"),
        ] {
            self.wait_status(id, status).await;
        }
        // The session and LOW signals change nothing under the live set; wait until they are
        // in the subjects' contexts.
        for key in ["email:u-s@example.com", "email:e1@example.com"] {
            eventually(&format!("{key}'s signal applied"), || async {
                let (code, why) =
                    get_json(&self.vigil, &format!("/v1/subjects/{}", encode(key))).await;
                (code == 200 && !why["recent_signals"].as_array()?.is_empty()).then_some(())
            })
            .await;
        }
        vec![
            "m1", "m2", "h1", "e1", "plain", "d1", "d1-off", "s1", "s2", "ag1", "a1",
        ]
    }
}

/// `{grant: (from, to)}` of a bucket of an impact's samples.
fn sampled(impact: &Value, bucket: &str) -> BTreeMap<String, (String, String)> {
    impact["samples"][bucket]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["grant_id"].as_str().unwrap().to_owned(),
                (
                    s["from"].as_str().unwrap().to_owned(),
                    s["to"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_impact_preview_is_what_the_swap_then_does_grant_by_grant() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("live.yaml"), LIVE).unwrap();
    let env = env(dir.path(), None, 0).await;
    let ids = env.populate().await;
    let live_version = env.vigil.engine().policy_version();

    let (code, listed) = get_json(&env.vigil, "/v1/policies").await;
    assert_eq!(code, 200, "{listed}");
    assert_eq!(listed["running"]["version"], json!(live_version));
    assert_eq!(listed["running"]["rules"][1]["id"], "risk-medium-step-up");
    assert_eq!(listed["running"]["rules"][1]["file"], "live.yaml");

    // The grants, filtered and paged.
    let listed = |query: &'static str| {
        let vigil = &env.vigil;
        async move {
            let (code, page) = get_json(vigil, &format!("/v1/grants?{query}")).await;
            assert_eq!(code, 200, "{query}: {page}");
            let ids: Vec<String> = page["grants"]
                .as_array()
                .unwrap()
                .iter()
                .map(|g| g["id"].as_str().unwrap().to_owned())
                .collect();
            (ids, page["next"].as_str().map(str::to_owned))
        }
    };
    assert_eq!(listed("status=step_up").await.0, ["ag1", "m1", "m2"]);
    assert_eq!(
        listed("status=restricted&enforcement_point=api-gateway")
            .await
            .0,
        ["a1", "d1"]
    );
    assert_eq!(
        listed("principal=email%3Ad%40example.com").await.0,
        ["d1", "d1-off"]
    );
    assert_eq!(listed("kind=agent_delegation").await.0, ["ag1"]);
    assert_eq!(listed("rule=risk-high").await.0, ["h1"]);
    // Stepped up and restricted grants are found by the rule that decided them, too.
    assert_eq!(
        listed("rule=risk-medium-step-up").await.0,
        ["ag1", "m1", "m2"]
    );
    assert_eq!(listed("rule=device-restrict").await.0, ["d1"]);
    let (first, next) = listed("limit=4").await;
    assert_eq!(first, ["a1", "ag1", "d1", "d1-off"]);
    assert_eq!(next.as_deref(), Some("d1-off"));
    let (rest, end) = listed("limit=100&after=d1-off").await;
    assert_eq!(rest.len(), ids.len() - 4);
    assert_eq!(end, None);
    let (code, _) = get_json(&env.vigil, "/v1/grants?stauts=revoked").await;
    assert_eq!(code, 400);
    // A grant explained by its id.
    let (code, why) = get_json(&env.vigil, "/v1/grants/ag1/explain").await;
    assert_eq!(code, 200, "{why}");
    assert_eq!(why["grant"]["status"], "step_up");
    assert_eq!(why["subject"]["subject"], why["grant"]["principal"]);

    let before = env.statuses(&ids).await;
    let (code, impact) = post_json(
        &env.vigil,
        "/v1/policies/impact",
        &json!({"files": {"candidate.yaml": CANDIDATE}, "samples": 20}),
    )
    .await;
    assert_eq!(code, 200, "{impact}");
    // Nothing changed by the preview.
    assert_eq!(env.statuses(&ids).await, before);
    assert_eq!(env.vigil.engine().policy_version(), live_version);
    assert_eq!(impact["live_version"], json!(live_version));

    // Swap the candidate in through the reload path and diff every grant.
    std::fs::remove_file(dir.path().join("live.yaml")).unwrap();
    std::fs::write(dir.path().join("candidate.yaml"), CANDIDATE).unwrap();
    let (code, reload) = post_json(&env.vigil, "/v1/policies/reload", &json!({})).await;
    assert_eq!(code, 200, "{reload}");
    assert_eq!(reload["status"], "swapped");
    assert_eq!(reload["version"], impact["candidate_version"]);
    let after = env.statuses(&ids).await;
    let diff: BTreeMap<String, (String, String)> = ids
        .iter()
        .filter(|id| before[**id] != after[**id])
        .map(|id| ((*id).to_owned(), (before[*id].clone(), after[*id].clone())))
        .collect();

    // Grant by grant: the preview's changes are exactly the swap's.
    assert_eq!(sampled(&impact, "changed"), diff, "{impact:#}");
    let expected: BTreeMap<String, (String, String)> = [
        ("m1", "step_up", "revoked"),
        ("m2", "step_up", "revoked"),
        ("ag1", "step_up", "revoked"),
        ("a1", "restricted", "active"),
        ("s1", "active", "revoked"),
        ("e1", "active", "revoked"),
    ]
    .into_iter()
    .map(|(id, from, to)| (id.to_owned(), (from.to_owned(), to.to_owned())))
    .collect();
    assert_eq!(diff, expected);
    // The counts agree with the swap's own.
    for key in ["changed", "transitions", "by_rule"] {
        assert_eq!(impact[key], reload[key], "{key}: {impact:#} vs {reload:#}");
    }
    assert_eq!(impact["changed"], 6);
    assert_eq!(impact["evaluated"], ids.len() - 1);
    assert_eq!(impact["unchanged"], ids.len() - 1 - 6);
    assert_eq!(impact["revoked"], 1);
    // The dangerous direction, apart.
    assert_eq!(impact["loosening"], 1);
    assert_eq!(
        sampled(&impact, "loosening").keys().collect::<Vec<_>>(),
        ["a1"]
    );
    // The failing rule, apart, with its error and the subject explained.
    assert_eq!(impact["errors"], 1);
    assert_eq!(
        impact["errors_by_rule"],
        json!([{"rule": "broken-for-e1", "count": 1}])
    );
    let failed = &impact["samples"]["errors"][0];
    assert_eq!(failed["grant_id"], "e1");
    assert!(failed["evaluation"]["matched"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == "broken-for-e1" && m["error"].is_string()));
    assert_eq!(failed["explain"]["subject"], "email:e1@example.com");
    let by_rule: BTreeMap<String, u64> = impact["by_rule"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["rule"].as_str().unwrap().to_owned(),
                r["count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(by_rule["risk-medium-revoke"], 3);
    assert_eq!(by_rule["session-revoked"], 1);
    assert_eq!(by_rule["(none)"], 1);

    // A candidate that does not compile is refused with the reason; a bad file name too.
    let (code, body) = post_json(
        &env.vigil,
        "/v1/policies/impact",
        &json!({"files": {"x.yaml": "rules: [{id: x, on: [nope], when: 'true', effect: revoke}]"}}),
    )
    .await;
    assert_eq!(code, 422, "{body}");
    assert!(
        body["description"].as_str().unwrap().contains("nope"),
        "{body}"
    );
    let (code, body) = post_json(
        &env.vigil,
        "/v1/policies/impact",
        &json!({"files": {"../x.yaml": CANDIDATE}}),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    env.vigil.shutdown().await;
}

/// A failing test in the set written.
const FAILING_TEST: &str = "tests:\n  - name: admin stays usable\n    grant: {id: g, kind: session, subject: {format: email, email: a@example.com}, scopes: [admin], issued_at: 1, expires_at: 2000000000}\n    expect: {effect: none}\n";
/// The same test, fixed.
const PASSING_TEST: &str = "tests:\n  - name: admin is revoked\n    grant: {id: g, kind: session, subject: {format: email, email: a@example.com}, scopes: [admin], issued_at: 1, expires_at: 2000000000}\n    expect: {effect: revoke, rules: [no-admin]}\n";
const NO_ADMIN: &str =
    "rules: [{id: no-admin, on: ['*'], when: \"'admin' in grant.scopes\", effect: revoke}]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_failing_its_own_tests_is_refused_by_http_and_the_file_watch() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.yaml"), "rules: []\n").unwrap();
    let env = env(dir.path(), None, 1).await;
    let t = now();
    let mut g = grant("adm", email("adm@example.com"), t - 60.0);
    g["scopes"] = json!(["admin"]);
    env.register(&g).await;
    let v1 = env.vigil.engine().policy_version();

    // Written together, the rule and a test it fails: the watch refuses the set.
    std::fs::write(dir.path().join("base.test.yaml"), FAILING_TEST).unwrap();
    std::fs::write(dir.path().join("admin.yaml"), NO_ADMIN).unwrap();
    let (code, body) = post_json(&env.vigil, "/v1/policies/reload", &json!({})).await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["status"], "refused");
    assert_eq!(body["version"], json!(v1));
    assert_eq!(
        body["failed_tests"][0]["name"], "admin stays usable",
        "{body}"
    );
    assert!(body["failed_tests"][0]["failure"].is_string(), "{body}");
    // Three watch intervals: the watcher saw the change and refused it too.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(env.vigil.engine().policy_version(), v1);
    assert_eq!(env.status("adm").await, "active");

    // Fixing only the test lets the set through the watch, and the grant is revoked.
    std::fs::write(dir.path().join("base.test.yaml"), PASSING_TEST).unwrap();
    env.wait_status("adm", "revoked").await;
    assert_ne!(env.vigil.engine().policy_version(), v1);
    env.vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_preview_holds_back_a_large_change_until_forced() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.yaml"), "rules: []\n").unwrap();
    let env = env(dir.path(), Some(2), 0).await;
    let t = now();
    for i in 0..4 {
        let mut g = grant(
            &format!("a{i}"),
            email(&format!("a{i}@example.com")),
            t - 60.0,
        );
        g["scopes"] = json!(["admin"]);
        env.register(&g).await;
    }
    let v1 = env.vigil.engine().policy_version();
    std::fs::write(dir.path().join("admin.yaml"), NO_ADMIN).unwrap();
    let (code, body) = post_json(&env.vigil, "/v1/policies/reload", &json!({})).await;
    assert_eq!(code, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("require_preview"),
        "{body}"
    );
    assert_eq!(body["impact"]["changed"], 4, "{body}");
    assert_eq!(
        body["impact"]["samples"]["changed"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_eq!(env.vigil.engine().policy_version(), v1);
    assert_eq!(env.status("a0").await, "active");
    // Unknown parameters are refused, not ignored.
    let (code, _) = post_json(&env.vigil, "/v1/policies/reload?forse=true", &json!({})).await;
    assert_eq!(code, 400);

    let (code, body) = post_json(&env.vigil, "/v1/policies/reload?force=true", &json!({})).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "swapped");
    assert_eq!(body["changed"], 4);
    assert_eq!(
        body["transitions"],
        json!([{"from": "active", "to": "revoked", "count": 4}])
    );
    assert_eq!(body["by_rule"], json!([{"rule": "no-admin", "count": 4}]));
    for i in 0..4 {
        assert_eq!(env.status(&format!("a{i}")).await, "revoked");
    }
    env.vigil.shutdown().await;
}

/// The live set, file by file: MEDIUM steps up.
const STEP_UP_ON_MEDIUM: &str = r#"
rules:
  - id: risk-medium-step-up
    on: [risk-level-change]
    when: "context.risk.level == 'MEDIUM'"
    effect: step_up
"#;

/// The shadow candidate: MEDIUM revokes.
const REVOKE_ON_MEDIUM: &str = r#"
rules:
  - id: risk-medium-revoke
    on: [risk-level-change]
    when: "context.risk.level == 'MEDIUM'"
    effect: revoke
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_set_runs_beside_the_live_one_until_promoted_or_discarded() {
    use reqwest::Method;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("risk.yaml"), STEP_UP_ON_MEDIUM).unwrap();
    std::fs::write(dir.path().join("extra.yaml"), "rules: []\n").unwrap();
    let env = env(dir.path(), None, 0).await;
    let t = now();
    for id in ["s1", "s2", "calm"] {
        env.register(&grant(id, email(&format!("{id}@example.com")), t - 60.0))
            .await;
    }
    let (code, _) = get_json(&env.vigil, "/v1/policies/shadow").await;
    assert_eq!(code, 404);
    // A candidate that does not compile is refused, and nothing is loaded.
    let (code, body) = send_json(
        &env.vigil,
        Method::PUT,
        "/v1/policies/shadow",
        &json!({"files": {"bad.yaml": "rules: [{id: x, on: ['*'], when: '1 +', effect: revoke}]"}}),
    )
    .await;
    assert_eq!(code, 422, "{body}");
    let (code, body) = send_json(
        &env.vigil,
        Method::PUT,
        "/v1/policies/shadow",
        &json!({"files": {"risk.yaml": REVOKE_ON_MEDIUM}}),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let shadow_version = body["version"].as_str().unwrap().to_owned();
    assert_eq!(body["rules"][0]["id"], "risk-medium-revoke", "{body}");
    let (_, policies) = get_json(&env.vigil, "/v1/policies").await;
    assert_eq!(policies["shadow"]["version"], json!(shadow_version));
    assert_ne!(policies["running"]["version"], json!(shadow_version));

    // MEDIUM for s1: the live set steps it up (enforced); the shadow set would revoke it.
    let rlc = format!("{CAEP}risk-level-change");
    env.push(&set(
        "m-s1",
        email("s1@example.com"),
        &rlc,
        risk("MEDIUM", t),
    ))
    .await;
    env.wait_status("s1", "step_up").await;
    // LOW for calm: both sets agree (no divergence).
    env.push(&set(
        "l-calm",
        email("calm@example.com"),
        &rlc,
        risk("LOW", t),
    ))
    .await;
    let list = eventually("the divergence to be listed", || async {
        let (_, body) = get_json(&env.vigil, "/v1/policies/shadow/divergences").await;
        (body["counts"]["total"] == 1).then_some(body)
    })
    .await;
    let d = &list["divergences"][0];
    assert_eq!(d["grant_id"], "s1", "{list}");
    assert_eq!(d["direction"], "stricter");
    assert_eq!(d["rule"], "risk-medium-revoke");
    assert_eq!(d["live"]["status"], "step_up");
    assert_eq!(d["live"]["rules"], json!(["risk-medium-step-up"]));
    assert_eq!(d["shadow"]["status"], "revoked");
    assert_eq!(d["shadow"]["version"], json!(shadow_version));
    assert_eq!(d["cause"]["jti"], "m-s1");
    assert_eq!(
        list["counts"]["by_rule"]["risk-medium-revoke"]["stricter"],
        1
    );
    // Never enforced.
    assert_eq!(env.status("s1").await, "step_up");
    // Filters select, and an unknown one is refused.
    let (_, none) = get_json(
        &env.vigil,
        "/v1/policies/shadow/divergences?direction=looser",
    )
    .await;
    assert_eq!(none["divergences"], json!([]));
    let (code, _) = get_json(&env.vigil, "/v1/policies/shadow/divergences?colour=red").await;
    assert_eq!(code, 400);
    let (_, metrics) = get(&env.vigil, "/metrics").await;
    assert!(
        metrics.contains(
            r#"vigil_shadow_divergences_total{rule="risk-medium-revoke",direction="stricter"} 1"#
        ),
        "{metrics}"
    );

    // A promotion whose reload is refused (the directory's tests fail against the shadow set)
    // puts the directory's files back and keeps the shadow set.
    let failing = r#"
tests:
  - name: medium steps up
    grant: {id: g, kind: session, subject: {format: email, email: a@example.com}, issued_at: 1, expires_at: 2000000000}
    signals:
      - set: {iss: "https://idp.example.com/", jti: t1, iat: 1615305000, sub_id: {format: email, email: a@example.com}, events: {"https://schemas.openid.net/secevent/caep/event-type/risk-level-change": {principal: USER, current_level: MEDIUM, event_timestamp: 1615305000}}}
    expect: {effect: step_up}
"#;
    std::fs::write(dir.path().join("risk.test.yaml"), failing).unwrap();
    let (code, body) = post_json(&env.vigil, "/v1/policies/shadow/promote", &json!({})).await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["failed_tests"][0]["name"], "medium steps up", "{body}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("risk.yaml")).unwrap(),
        STEP_UP_ON_MEDIUM
    );
    assert!(dir.path().join("extra.yaml").exists());
    let (code, _) = get_json(&env.vigil, "/v1/policies/shadow").await;
    assert_eq!(code, 200);

    // Promoted through the reload path: the files are the shadow set's, the set is live, the
    // stepped-up grant is revoked by the swap, and the shadow set is gone.
    std::fs::remove_file(dir.path().join("risk.test.yaml")).unwrap();
    let (code, body) = post_json(&env.vigil, "/v1/policies/shadow/promote", &json!({})).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "swapped", "{body}");
    assert_eq!(body["version"], json!(shadow_version));
    assert_eq!(
        body["by_rule"],
        json!([{"rule": "risk-medium-revoke", "count": 1}])
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("risk.yaml")).unwrap(),
        REVOKE_ON_MEDIUM
    );
    assert!(!dir.path().join("extra.yaml").exists());
    assert_eq!(env.status("s1").await, "revoked");
    assert_eq!(env.vigil.engine().policy_version(), shadow_version);
    let (code, _) = get_json(&env.vigil, "/v1/policies/shadow").await;
    assert_eq!(code, 404);

    // Discard: loaded, then dropped; nothing more is compared.
    let (code, _) = send_json(
        &env.vigil,
        Method::PUT,
        "/v1/policies/shadow",
        &json!({"files": {"risk.yaml": STEP_UP_ON_MEDIUM}}),
    )
    .await;
    assert_eq!(code, 201);
    let (code, _) = send_json(
        &env.vigil,
        Method::DELETE,
        "/v1/policies/shadow",
        &json!({}),
    )
    .await;
    assert_eq!(code, 204);
    let (code, _) = send_json(
        &env.vigil,
        Method::DELETE,
        "/v1/policies/shadow",
        &json!({}),
    )
    .await;
    assert_eq!(code, 404);
    env.push(&set(
        "m-s2",
        email("s2@example.com"),
        &rlc,
        risk("MEDIUM", t),
    ))
    .await;
    env.wait_status("s2", "revoked").await;
    let (code, _) = get_json(&env.vigil, "/v1/policies/shadow/divergences").await;
    assert_eq!(code, 404);
    env.vigil.shutdown().await;
}

/// A replay's differences: `{(grant, jti or "registration"): (live to, candidate to)}`.
type Diffs = BTreeMap<(String, String), (Value, Value)>;

/// Signals [`Env::populate_signals`] pushes.
const POPULATED_SIGNALS: u64 = 7;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_is_what_running_the_candidate_would_have_decided_signal_by_signal() {
    // The same grants and signals, once under the live set (the Vigil replayed) and once under
    // the candidate (the ground truth: what running it would have decided).
    let (live_dir, candidate_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(live_dir.path().join("rules.yaml"), LIVE).unwrap();
    std::fs::write(candidate_dir.path().join("rules.yaml"), CANDIDATE).unwrap();
    let live = env(live_dir.path(), None, 0).await;
    let truth = env(candidate_dir.path(), None, 0).await;
    live.populate().await;
    truth.populate_signals().await;
    live.processed(POPULATED_SIGNALS).await;
    truth.processed(POPULATED_SIGNALS).await;
    let made_live = live.signal_decisions().await;
    let made_candidate = truth.signal_decisions().await;
    assert!(!made_live.is_empty() && !made_candidate.is_empty());

    let (code, replay) = post_json(
        &live.vigil,
        "/v1/policies/replay",
        &json!({"files": {"rules.yaml": CANDIDATE}, "since": "1h", "samples": 20}),
    )
    .await;
    assert_eq!(code, 200, "{replay}");
    assert_eq!(replay["signals"], POPULATED_SIGNALS, "{replay}");
    // The live set's replay makes again every decision it recorded, and the window starts at
    // intake's first record: nothing is missing.
    let missing = &replay["not_reconstructed"];
    assert_eq!(missing["recorded"], json!(made_live.len()), "{replay}");
    assert_eq!(missing["reproduced"], json!(made_live.len()), "{replay}");
    assert_eq!(missing["unreproduced"], 0, "{replay}");
    assert_eq!(missing["facts_unknown_at_start"], 0, "{replay}");
    assert_eq!(missing["unrecorded_signal_facts"], 0, "{replay}");
    assert_eq!(replay["live_decisions"], json!(made_live.len()), "{replay}");
    assert_eq!(
        replay["candidate_decisions"],
        json!(made_candidate.len()),
        "{replay}"
    );

    // The differences are exactly those between the two Vigils' decisions.
    let sampled = |bucket: &str| -> Diffs {
        replay["samples"][bucket]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    (
                        s["grant_id"].as_str().unwrap().to_owned(),
                        s["signal"]["jti"]
                            .as_str()
                            .unwrap_or("registration")
                            .to_owned(),
                    ),
                    (s["live"]["to"].clone(), s["candidate"]["to"].clone()),
                )
            })
            .collect()
    };
    let mut expected: BTreeMap<&str, Diffs> = BTreeMap::new();
    for key in made_live.keys().chain(made_candidate.keys()) {
        let (l, c) = (made_live.get(key), made_candidate.get(key));
        let bucket = match (l, c) {
            (Some(l), Some(c)) if l == c => continue,
            (Some(_), Some(_)) => "changed",
            (Some(_), None) => "removed",
            (None, Some(_)) => "added",
            (None, None) => unreachable!(),
        };
        let to = |v: Option<&String>| v.map_or(Value::Null, |s| json!(s));
        expected
            .entry(bucket)
            .or_default()
            .insert(key.clone(), (to(l), to(c)));
    }
    for bucket in ["added", "removed", "changed"] {
        let want = expected.remove(bucket).unwrap_or_default();
        assert_eq!(replay[bucket], json!(want.len()), "{bucket}: {replay}");
        assert_eq!(sampled(bucket), want, "{bucket}");
    }
    // The scenario reaches what matters: a MEDIUM step-up now a revocation (a delegation among
    // them), a session's revocation, a rule failing closed (at registration: it fails for every
    // evaluation of e1), an admin grant no longer restricted.
    let changed = sampled("changed");
    assert!(
        changed.contains_key(&("m1".into(), "r-m1".into())),
        "{replay}"
    );
    assert!(
        changed.contains_key(&("ag1".into(), "r-del".into())),
        "{replay}"
    );
    let added = sampled("added");
    assert!(
        added.contains_key(&("s1".into(), "logout".into())),
        "{replay}"
    );
    assert!(
        added.contains_key(&("e1".into(), "registration".into())),
        "{replay}"
    );
    let removed = sampled("removed");
    assert!(
        removed.contains_key(&("a1".into(), "registration".into())),
        "{replay}"
    );
    assert_eq!(
        replay["by_rule"]["risk-medium-revoke"]["changed"], 3,
        "{replay}"
    );
    // Nothing changed by the replay.
    assert_eq!(live.status("m1").await, "step_up");
    assert_eq!(live.signal_decisions().await, made_live);

    // A grant ended since: its recorded decision is counted as not reconstructable, and it
    // takes no part in the replay.
    let (code, _) = send_json(
        &live.vigil,
        reqwest::Method::DELETE,
        "/v1/grants/a1",
        &json!({}),
    )
    .await;
    assert_eq!(code, 204);
    let (_, again) = post_json(
        &live.vigil,
        "/v1/policies/replay",
        &json!({"files": {"rules.yaml": CANDIDATE}, "since": "1h", "samples": 20}),
    )
    .await;
    assert_eq!(again["not_reconstructed"]["grants_gone"], 1, "{again}");
    assert_eq!(again["removed"], 0, "{again}");

    // A window in the future, or an unreadable one, is refused.
    for since in ["-5m", "tomorrow", "2999-01-01T00:00:00Z"] {
        let (code, body) = post_json(
            &live.vigil,
            "/v1/policies/replay",
            &json!({"files": {"rules.yaml": CANDIDATE}, "since": since}),
        )
        .await;
        assert_eq!(code, 400, "{since}: {body}");
    }
    live.vigil.shutdown().await;
    truth.vigil.shutdown().await;
}
