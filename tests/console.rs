//! The operator console, driven in a real browser (Debian's headless Chromium through
//! ChromeDriver): sign in, see a pushed signal appear live, find a subject by email, preview a
//! candidate that turns MEDIUM step-up into revoke and replay the day's signals through it, load
//! it as the shadow set, see the divergence a MEDIUM signal makes, promote it; page through an
//! enforcement point's dead letters and replay them. Screenshots of the main pages are written to
//! `target/console-screenshots/` (and to `$VIGIL_SCREENSHOTS` when set: the README's come from
//! there).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::browser::{self, Browser};
use common::*;
use serde_json::json;

const STEP_UP_ON_MEDIUM: &str = r#"rules:
  - id: risk-high
    on: [risk-level-change]
    when: "context.risk.level == 'HIGH'"
    effect: revoke
  - id: risk-medium-step-up
    on: [risk-level-change]
    when: "context.risk.level == 'MEDIUM'"
    effect: step_up
"#;

const REVOKE_ON_MEDIUM: &str = r#"rules:
  - id: risk-high
    on: [risk-level-change]
    when: "context.risk.level == 'HIGH'"
    effect: revoke
  - id: risk-medium-revoke
    on: [risk-level-change]
    when: "context.risk.level == 'MEDIUM'"
    effect: revoke
"#;

/// A screenshot of the window, scrolled to `anchor` when given.
async fn shoot(browser: &Browser, name: &str, anchor: Option<&str>) {
    if let Some(anchor) = anchor {
        browser
            .script(
                "document.querySelector(arguments[0]).scrollIntoView()",
                serde_json::json!([anchor]),
            )
            .await;
    }
    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let target =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join(format!("{name}.png")), &png).unwrap();
    if let Some(dir) = std::env::var_os("VIGIL_SCREENSHOTS") {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(std::path::Path::new(&dir).join(format!("{name}.png")), &png).unwrap();
    }
}

/// Signs in on the console's page (open in `browser`) with the admin token and waits for the
/// console.
async fn sign_in(browser: &Browser, env: &Env) {
    let token = env.vigil.admin_token().unwrap().to_owned();
    browser.fill("#token", &token).await;
    browser.click("#sign-in-button").await;
    browser.find("#feed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_previews_shadows_and_promotes_a_policy_change_in_the_console() {
    if !browser::available() {
        eprintln!("skipped: no {} here", browser::CHROMEDRIVER);
        return;
    }
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(policies.path().join("risk.yaml"), STEP_UP_ON_MEDIUM).unwrap();
    let env = start_env(|config| {
        config.policy.dir = policies.path().to_owned();
        config.policy.watch_interval_secs = 0;
    })
    .await;
    let t = now();
    for (id, user) in [
        ("jane-session", "jane@example.com"),
        ("mo-session", "mo@example.com"),
    ] {
        env.register(&grant(id, email(user), t - 60.0)).await;
    }
    let rlc = format!("{CAEP}risk-level-change");
    // mo is at MEDIUM already: stepped up under the live set.
    env.push(&set(
        "mo-medium",
        email("mo@example.com"),
        &rlc,
        risk("MEDIUM", t),
    ))
    .await;
    env.wait_status("mo-session", "step_up").await;

    let base = format!("http://{}", env.vigil.local_addr());
    let browser = Browser::start().await;
    browser.goto(&format!("{base}/console")).await;
    // A token Vigil does not know is refused at sign-in; nothing of the console is loaded.
    browser.fill("#token", "not-a-token-of-this-vigil").await;
    browser.click("#sign-in-button").await;
    browser
        .wait_text("#sign-in-error", "the refusal", |t| {
            t.contains("does not know")
        })
        .await;
    sign_in(&browser, &env).await;

    // A pushed signal appears in the live feed.
    env.push(&set(
        "jane-low",
        email("jane@example.com"),
        &rlc,
        risk("LOW", t),
    ))
    .await;
    browser
        .wait_text("#feed", "the pushed signal", |t| {
            t.contains("jane-low") && t.contains("risk-level-change")
        })
        .await;
    shoot(&browser, "feed", None).await;

    // A subject found by email, explained: its facts with provenance and its grants.
    browser.click("nav a[data-view=subject]").await;
    browser.fill("#subject-search", "jane@example.com").await;
    browser.click("#subject-form button").await;
    browser
        .wait_text("#subject-key", "the subject", |t| {
            t == "email:jane@example.com"
        })
        .await;
    let detail = browser.text("#subject-detail").await;
    assert!(detail.contains("jane-session"), "{detail}");
    assert!(detail.contains("LOW"), "{detail}");
    shoot(&browser, "subject", None).await;

    browser.click("nav a[data-view=decisions]").await;
    browser
        .wait_text("#decisions", "mo's step-up", |t| {
            t.contains("risk-medium-step-up")
        })
        .await;
    shoot(&browser, "decisions", None).await;

    // The impact preview of a candidate turning MEDIUM step-up into revoke.
    browser.click("nav a[data-view=policies]").await;
    browser.find("#candidate-text").await;
    browser.fill("#candidate-name", "risk.yaml").await;
    browser.set_value("#candidate-text", REVOKE_ON_MEDIUM).await;
    browser.click("#run-impact").await;
    let transitions = browser
        .wait_text("#impact-transitions", "the impact", |t| {
            t.contains("revoked")
        })
        .await;
    assert!(transitions.contains("step_up revoked 1"), "{transitions}");
    let counts = browser.text("#impact-counts").await;
    assert!(counts.contains("changed 1"), "{counts}");
    assert!(counts.contains("evaluated 2"), "{counts}");
    shoot(&browser, "impact", Some("#policy-result")).await;
    // Replayed over the day's signals: mo's MEDIUM would have revoked, not stepped up.
    browser.click("#run-replay").await;
    let replayed = browser
        .wait_text("#replay-counts", "the replay", |t| {
            t.contains("signals replayed")
        })
        .await;
    assert!(replayed.contains("signals replayed 2"), "{replayed}");
    assert!(replayed.contains("changed 1"), "{replayed}");
    let changed = browser.text("#replay-changed").await;
    assert!(
        changed.contains(
            "mo-session mo-medium step_up [risk-medium-step-up] revoked [risk-medium-revoke]"
        ),
        "{changed}"
    );
    shoot(&browser, "replay", Some("#policy-result")).await;

    // Loaded as the shadow set, it sees jane's MEDIUM as a revocation; the live set steps up.
    browser.click("#load-shadow").await;
    browser.find("#shadow-version").await;
    env.push(&set(
        "jane-medium",
        email("jane@example.com"),
        &rlc,
        risk("MEDIUM", t),
    ))
    .await;
    env.wait_status("jane-session", "step_up").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        browser.click("#shadow-refresh").await;
        let shown = browser.text("#shadow").await;
        if shown.contains("1 divergences") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no divergence shown: {shown}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    let divergences = browser.text("#divergences").await;
    assert!(
        divergences.contains("jane-session") && divergences.contains("stricter"),
        "{divergences}"
    );
    assert!(divergences.contains("jane-medium"), "{divergences}");
    shoot(&browser, "shadow", Some("#shadow")).await;

    // Promoted: live through the reload path, jane's session revoked.
    browser.click("#shadow-promote").await;
    browser
        .wait_text("#running-version", "the promoted set", |_| true)
        .await;
    env.wait_status("jane-session", "revoked").await;
    assert_eq!(
        std::fs::read_to_string(policies.path().join("risk.yaml")).unwrap(),
        REVOKE_ON_MEDIUM
    );
    browser
        .wait_text("#shadow", "the shadow set gone", |t| {
            t.contains("No shadow set")
        })
        .await;
    env.vigil.shutdown().await;
}

/// An enforcement point whose poll receiver never reads, its outbox bounded at one SET: 52 of
/// its 53 revocations become dead letters. The console lists the oldest 50 of them and "More"
/// the rest, from the page's cursor; once the receiver has read the one SET waiting, a replay
/// puts one back — all the outbox has room for — and says the other 51 are deferred.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_pages_through_dead_letters_and_replays_them_in_the_console() {
    if !browser::available() {
        eprintln!("skipped: no {} here", browser::CHROMEDRIVER);
        return;
    }
    let env = start_env(|config| {
        config.delivery.outbox_sweep_secs = 1;
        config.delivery.max_outbox_per_stream = 1;
    })
    .await;
    let base = format!("http://{}", env.vigil.local_addr());
    let http = reqwest::Client::new();
    let ep_token = "api-gateway-token-0123456789";
    let poll_url = create_poll_stream(&http, &base, ep_token).await;
    let t = now();
    let disabled = format!("{RISC}account-disabled");
    for i in 0..53 {
        let user = format!("u{i}@example.com");
        env.register(&grant(&format!("g{i}"), email(&user), t - 60.0))
            .await;
        env.push(&set(
            &format!("off-{i}"),
            email(&user),
            &disabled,
            json!({}),
        ))
        .await;
    }
    eventually("52 dead letters, one SET waiting", || async {
        let (_, dead) = get_json(&env.vigil, "/v1/deadletters?limit=1").await;
        (dead["total"] == 52).then_some(())
    })
    .await;

    let browser = Browser::start().await;
    browser.goto(&format!("{base}/console")).await;
    sign_in(&browser, &env).await;
    browser.click("nav a[data-view=eps]").await;
    browser
        .wait_text("#dead-letters-heading", "the first page", |t| {
            t.contains("the oldest 50 of 52")
        })
        .await;
    let jtis = || async {
        browser
            .script(
                "return [...document.querySelectorAll('#dead-letters tbody tr td:nth-child(2)')].map((td) => td.textContent)",
                json!([]),
            )
            .await
    };
    assert_eq!(jtis().await.as_array().unwrap().len(), 50);
    browser.click("#more-dead-letters").await;
    browser
        .wait_text("#dead-letters-heading", "every letter listed", |t| {
            t == "Dead letters (52)"
        })
        .await;
    let listed = jtis().await;
    let unique: std::collections::HashSet<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j.as_str().unwrap())
        .collect();
    assert_eq!(unique.len(), 52, "{listed}");
    let more_hidden = browser
        .script(
            "return document.getElementById('more-dead-letters').hidden",
            json!([]),
        )
        .await;
    assert_eq!(more_hidden, json!(true));
    shoot(&browser, "enforcement-points", Some("#enforcement-points")).await;

    // The receiver reads and acknowledges the SET waiting: room for one.
    let polled = poll(
        &http,
        &poll_url,
        ep_token,
        &json!({"maxEvents": 10, "returnImmediately": true}),
    )
    .await;
    let waiting: Vec<String> = polled["sets"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(waiting.len(), 1, "{polled}");
    poll(
        &http,
        &poll_url,
        ep_token,
        &json!({"ack": waiting, "maxEvents": 0, "returnImmediately": true}),
    )
    .await;
    browser.click("#replay-dead-letters").await;
    let said = browser
        .wait_text("#replayed", "the replay's answer", |t| {
            t.starts_with("Queued again")
        })
        .await;
    assert!(said.starts_with("Queued again: 1;"), "{said}");
    assert!(said.contains("51 deferred"), "{said}");
    let (_, dead) = get_json(&env.vigil, "/v1/deadletters?limit=1").await;
    assert_eq!(dead["total"], 51);
    env.vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_served_only_to_operators() {
    let env = start_env(|config| {
        config.clients = vec![
            admin_client(),
            vigil::config::ApiClientConfig {
                name: "gateway".into(),
                token: "gateway-token-0123456789".into(),
                roles: vec![vigil::config::Role::Grants, vigil::config::Role::Check],
                max_grants: None,
            },
        ];
    })
    .await;
    let base = format!("http://{}", env.vigil.local_addr());
    let http = reqwest::Client::new();
    // The page holds no data: a sign-in form, its script and style, with a strict policy.
    let page = http.get(format!("{base}/console")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("script-src 'self' blob:"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(page.text().await.unwrap().contains("id=\"sign-in\""));
    // The console itself: the operator role only.
    let app = |token: Option<&str>| {
        let mut request = http.get(format!("{base}/console/app.js"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    assert_eq!(app(None).await.unwrap().status(), 401);
    assert_eq!(
        app(Some("gateway-token-0123456789"))
            .await
            .unwrap()
            .status(),
        403
    );
    let served = app(Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!(served.status(), 200);
    assert!(served.text().await.unwrap().contains("/v1/policies/impact"));
    env.vigil.shutdown().await;
}

/// The API the console reads, for everyone: recorded signals newest first (paged by `after`),
/// subjects found by any identifier, enforcement points with their streams' delivery state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consoles_api_finds_subjects_and_lists_signals_and_enforcement_points() {
    let env = start_env(|_| {}).await;
    let t = now();
    let mut phone_grant = grant("phone-g", email("pat@example.com"), t - 60.0);
    phone_grant["subject"] = serde_json::json!({"format": "aliases", "identifiers": [
        {"format": "email", "email": "Pat@Example.com"},
        {"format": "phone_number", "phone_number": "+12025550100"}]});
    env.register(&phone_grant).await;
    let rlc = format!("{CAEP}risk-level-change");
    for (jti, level) in [("first", "LOW"), ("second", "MEDIUM")] {
        env.push(&set(jti, email("pat@example.com"), &rlc, risk(level, t)))
            .await;
    }
    let (code, page) = get_json(&env.vigil, "/v1/signals").await;
    assert_eq!(code, 200, "{page}");
    let jtis: Vec<&str> = page["signals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["jti"].as_str().unwrap())
        .collect();
    assert_eq!(jtis, ["second", "first"]);
    let newest = &page["signals"][0];
    assert_eq!(newest["event_type"], "risk-level-change");
    assert_eq!(newest["subject_key"], "email:pat@example.com");
    assert!(
        newest["received_at"].as_f64().unwrap() >= t - 5.0,
        "{newest}"
    );
    let after = newest["seq"].as_u64().unwrap();
    let (_, later) = get_json(&env.vigil, &format!("/v1/signals?after={after}")).await;
    assert_eq!(later["signals"], serde_json::json!([]));
    // The answer's cursor asks for what came since, as the console pages.
    let cursor = page["cursor"].as_str().unwrap().to_owned();
    assert_eq!(cursor, after.to_string());
    let (_, later) = get_json(&env.vigil, &format!("/v1/signals?cursor={cursor}")).await;
    assert_eq!(later["signals"], serde_json::json!([]));
    assert_eq!(later["cursor"], cursor.as_str());
    for bad in ["/v1/signals?since=yesterday", "/v1/signals?cursor=0:5"] {
        let (code, _) = get_json(&env.vigil, bad).await;
        assert_eq!(code, 400, "{bad}");
    }

    // By email in any case, by phone number, by part of an identifier: the principal.
    for q in [
        "pat@example.com",
        "PAT@example.com",
        "+12025550100",
        "2025550100",
    ] {
        let (code, found) = get_json(&env.vigil, &format!("/v1/subjects?q={}", encode(q))).await;
        assert_eq!(code, 200, "{found}");
        assert!(
            found["subjects"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["principal"] == "email:pat@example.com"),
            "{q}: {found}"
        );
    }
    let (_, none) = get_json(&env.vigil, "/v1/subjects?q=nobody%40example.com").await;
    assert_eq!(none["subjects"], serde_json::json!([]));
    let (code, _) = get_json(&env.vigil, "/v1/subjects?q=").await;
    assert_eq!(code, 400);

    let (code, eps) = get_json(&env.vigil, "/v1/enforcement-points").await;
    assert_eq!(code, 200, "{eps}");
    assert_eq!(eps["enforcement_points"][0]["name"], "api-gateway", "{eps}");
    assert!(eps["enforcement_points"][0]["streams"].is_array(), "{eps}");
    env.vigil.shutdown().await;
}
