//! Abuse limits over real HTTP: a transmitter over its SET rate and an API client over its request
//! rate get `429` with `Retry-After` (and what was refused changes nothing); open long polls and
//! SSE responses beyond the cap get `503` with `Retry-After`; oversize bodies get `413`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::json;
use vigil::jose::Alg;

const ISS: &str = "https://idp.example.com/";
const AUD: &str = "https://vigil.example.com/";
const EP: &str = "enforcement-point-token-0";

fn now() -> f64 {
    vigil::signal::now_ms() as f64 / 1000.0
}

/// The status Vigil answers an oversize POST with. The server answers before reading the whole
/// body and closes the connection, so the client may lose the race and see the connection end
/// while it is still sending: that attempt has no answer to check, and is made again.
async fn oversize_status(
    http: &reqwest::Client,
    url: &str,
    authorization: &str,
    content_type: &str,
    body: &str,
) -> u16 {
    for _ in 0..10 {
        match http
            .post(url)
            .header("authorization", authorization)
            .header("content-type", content_type)
            .body(body.to_owned())
            .send()
            .await
        {
            Ok(resp) => return resp.status().as_u16(),
            Err(e) if e.is_request() => continue,
            Err(e) => panic!("{url}: {e}"),
        }
    }
    panic!("{url}: no answer in 10 attempts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_over_their_limits_are_told_when_to_come_back() {
    let tx = Transmitter::start(&[Alg::RS256]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), vec![tx.config("idp", ISS, &[AUD])]);
    config.limits.transmitter_sets_per_sec = 1.0;
    config.limits.client_requests_per_sec = 1.0;
    config.limits.burst = 3.0;
    config.limits.max_streaming_connections = 1;
    config.enforcement_points = vec![enforcement_point("ep1", EP)];
    config.validate().unwrap();
    let vigil = start(config).await;

    // Transmitter: three SETs fit the burst, the fourth is refused before it is read or recorded.
    let set = |jti: &str| {
        tx.key(Alg::RS256)
            .sign_set(
                &json!({"iss": ISS, "aud": AUD, "jti": jti, "iat": now() as i64,
                "sub_id": {"format": "email", "email": "r@example.com"},
                "events": {"https://schemas.openid.net/secevent/caep/event-type/session-revoked":
                    {"event_timestamp": now() as i64}}}),
            )
            .unwrap()
    };
    // Signed first: the four pushes must fit in well under the second one token takes to come
    // back, even in a debug build on a loaded machine.
    let (within, over): (Vec<String>, String) = (
        (0..3).map(|i| set(&format!("ok-{i}"))).collect(),
        set("over"),
    );
    for token in &within {
        assert_eq!(push(&vigil, "idp", token).await.status, 202);
    }
    let refused = push(&vigil, "idp", &over).await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    let wait: u64 = refused.retry_after.unwrap().parse().unwrap();
    assert!((1..=2).contains(&wait));
    let (_, metrics) = get(&vigil, "/metrics").await;
    assert!(metrics.contains("outcome=\"rate_limited\""), "counted");
    assert!(
        vigil.intake().lookup_jti(ISS, "over").unwrap().is_none(),
        "a refused SET is not recorded"
    );

    // API client: the admin token's bucket (the `get` above took one request of three).
    let url = format!("http://{}/v1/decisions", vigil.local_addr());
    let token = vigil.admin_token().unwrap().to_owned();
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..3 {
        let resp = http.get(&url).bearer_auth(&token).send().await.unwrap();
        statuses.push(resp.status().as_u16());
        if resp.status().as_u16() == 429 {
            retry_after = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
        }
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(retry_after.is_some());

    // Streaming connections: one long poll open; a second subscriber is turned away with 503.
    let base = format!("http://{}", vigil.local_addr());
    let poll_url = create_poll_stream(&http, &base, EP).await;
    let open_long_poll = || {
        let (http, poll_url) = (http.clone(), poll_url.clone());
        tokio::spawn(async move {
            http.post(&poll_url)
                .bearer_auth(EP)
                .json(&json!({"maxEvents": 10}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    let mut long_poll = open_long_poll();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let second = loop {
        // A long poll that already answered (a SET for the new stream, its timeout) holds no
        // connection: open another, so the cap is what turns the second subscriber away.
        if long_poll.is_finished() {
            long_poll = open_long_poll();
        }
        let resp = http
            .post(&poll_url)
            .bearer_auth(EP)
            .json(&json!({"returnImmediately": true}))
            .send()
            .await
            .unwrap();
        if resp.status().as_u16() == 503 {
            break resp;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the second subscriber was never turned away (last answer {})",
            resp.status()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(second.headers().get("retry-after").is_some());
    vigil.shutdown().await;
    // Shutdown answers the open long poll at once.
    assert_eq!(long_poll.await.unwrap(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_bodies_are_refused_on_every_surface() {
    let tx = Transmitter::start(&[Alg::RS256]).await;
    let dir = tempfile::tempdir().unwrap();
    let vigil = start(test_config(dir.path(), vec![tx.config("idp", ISS, &[AUD])])).await;
    let big = "x".repeat(1 << 20);
    let base = format!("http://{}", vigil.local_addr());
    let http = reqwest::Client::new();
    let token = format!("Bearer {}", vigil.admin_token().unwrap());
    for path in [
        "/v1/grants",
        "/v1/check",
        "/v1/ssf/streams/idp/subjects:add",
    ] {
        let url = format!("{base}{path}");
        let status = oversize_status(&http, &url, &token, "application/json", &big).await;
        assert_eq!(status, 413, "{path}");
    }
    let url = format!("{base}/ssf/streams");
    let status = oversize_status(
        &http,
        &url,
        "Bearer any-enforcement-point",
        "application/json",
        &big,
    )
    .await;
    // The body limit comes first: an oversize request is refused before any credential check.
    assert_eq!(status, 413);
    let url = format!("{base}/ssf/push/idp");
    let authorization = tx.config("idp", ISS, &[AUD]).authorization;
    let status = oversize_status(
        &http,
        &url,
        &authorization,
        "application/secevent+jwt",
        &big,
    )
    .await;
    assert_eq!(status, 413);
    vigil.shutdown().await;
}

/// A client registering grants without end meets `engine.max_grants`: the grant past it gets
/// `503 grant_capacity` with `Retry-After`, is not held, and the refusal is counted; a held grant
/// registered again is still taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_past_the_bound_are_refused_with_grant_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), Vec::new());
    config.engine.max_grants = 2;
    // The one client may take the whole bound here (by default a party holds half of it).
    config.engine.max_grants_per_registrant = Some(2);
    config.validate().unwrap();
    let vigil = start(config).await;
    let http = reqwest::Client::new();
    let token = vigil.admin_token().unwrap().to_owned();
    let url = format!("http://{}/v1/grants", vigil.local_addr());
    let register = |id: &str| {
        let body = json!({"id": id, "kind": "session",
            "subject": {"format": "email", "email": format!("{id}@example.com")},
            "issued_at": now() - 5.0, "expires_at": now() + 3600.0});
        let (http, url, token) = (http.clone(), url.clone(), token.clone());
        async move {
            http.post(&url)
                .bearer_auth(&token)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    for id in ["g1", "g2"] {
        assert_eq!(register(id).await.status().as_u16(), 201);
    }
    let refused = register("g3").await;
    assert_eq!(refused.status().as_u16(), 503);
    assert!(refused.headers().get("retry-after").is_some());
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "grant_capacity", "{body}");
    assert!(vigil.engine().grant("g3").is_none(), "not held");
    assert_eq!(register("g2").await.status().as_u16(), 201, "an update");
    let (_, metrics) = get(&vigil, "/metrics").await;
    assert_refusals(&metrics, "capacity", 1);
    vigil.shutdown().await;
}

/// `/metrics` counts `n` grants refused for `reason`.
fn assert_refusals(metrics: &str, reason: &str, n: usize) {
    assert!(
        metrics.contains(&format!(
            "vigil_grants_refused_total{{reason=\"{reason}\"}} {n}"
        )),
        "counted: {}",
        metrics
            .lines()
            .filter(|l| l.contains("grants_refused"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// One client registering without end meets its own quota (`engine.max_grants_per_registrant`),
/// not the bound all share: its grant past the quota gets `429 grant_quota` with `Retry-After`,
/// is not held and is counted, while another client registers as before (up to a quota of its own,
/// `clients[].max_grants`); the grant shows who made it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_past_its_grant_quota_is_refused_and_another_is_not() {
    use vigil::config::{ApiClientConfig, Role};
    const GREEDY: &str = "greedy-gateway-token-0123456789";
    const OTHER: &str = "other-gateway-token-0123456789";
    const OPS: &str = "operator-token-0123456789abcdef";
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), Vec::new());
    config.engine.max_grants = 100;
    config.engine.max_grants_per_registrant = Some(3);
    let client = |name: &str, token: &str, role: Role| ApiClientConfig {
        name: name.into(),
        token: token.into(),
        roles: vec![role],
        max_grants: None,
    };
    config.clients = vec![
        client("greedy", GREEDY, Role::Grants),
        // A client can be given a quota of its own.
        ApiClientConfig {
            max_grants: Some(5),
            ..client("other", OTHER, Role::Grants)
        },
        client("ops", OPS, Role::Operator),
    ];
    config.validate().unwrap();
    let vigil = start(config).await;
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/grants", vigil.local_addr());
    let register = |id: String, token: &'static str| {
        let body = json!({"id": id, "kind": "session",
            "subject": {"format": "email", "email": format!("{id}@example.com")},
            "issued_at": now() - 5.0, "expires_at": now() + 3600.0});
        let (http, url) = (http.clone(), url.clone());
        async move {
            http.post(&url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    for i in 0..3 {
        let answer = register(format!("greedy-{i}"), GREEDY).await;
        assert_eq!(answer.status().as_u16(), 201);
        let grant: serde_json::Value = answer.json().await.unwrap();
        assert_eq!(grant["grant"]["registered_by"], "client:greedy", "{grant}");
    }
    let refused = register("greedy-3".into(), GREEDY).await;
    assert_eq!(refused.status().as_u16(), 429);
    assert!(refused.headers().get("retry-after").is_some());
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "grant_quota", "{body}");
    assert!(vigil.engine().grant("greedy-3").is_none(), "not held");
    // The other client does not notice; an update of a held grant is not a new one.
    for i in 0..5 {
        let answer = register(format!("other-{i}"), OTHER).await;
        assert_eq!(
            answer.status().as_u16(),
            201,
            "the other client's grant {i}"
        );
    }
    let past_its_own = register("other-5".into(), OTHER).await;
    assert_eq!(past_its_own.status().as_u16(), 429, "its own quota: 5");
    assert_eq!(
        register("greedy-0".into(), GREEDY).await.status().as_u16(),
        201
    );
    let metrics = http
        .get(format!("http://{}/metrics", vigil.local_addr()))
        .bearer_auth(OPS)
        .send()
        .await
        .unwrap();
    let metrics = metrics.text().await.unwrap();
    assert_refusals(&metrics, "quota", 2);
    for held in [
        "vigil_grants_by_registrant{registrant=\"client:greedy\"} 3",
        "vigil_grants_by_registrant{registrant=\"client:other\"} 5",
    ] {
        assert!(metrics.contains(held), "{held}: {metrics}");
    }
    vigil.shutdown().await;
}
