//! No party can stop or slow revocations for the others: enforcement points that never answer,
//! answer `429` with absurd `Retry-After` values, or hold their maximum of SSE responses unread;
//! clients that hold connections idle or send slowly; enforcement points that name internal or
//! non-http destinations; transmitters whose SETs claim a time in the far future; API clients that
//! flood evaluations (their access records rotate out only their own).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use base64::Engine as _;
use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vigil::config::EnforcementPointConfig;
use vigil::jose::Alg;

const ISS: &str = "https://idp.example.com/123456789/";
const AUD: &str = "https://sp.example.com/caep";
const DISABLED: &str = "https://schemas.openid.net/secevent/risc/event-type/account-disabled";

fn point(name: &str) -> EnforcementPointConfig {
    EnforcementPointConfig {
        name: name.into(),
        token: format!("{name}-token-0123456789abcdef"),
        audience: None,
        signing_alg: None,
    }
}

fn token(name: &str) -> String {
    format!("{name}-token-0123456789abcdef")
}

fn now() -> f64 {
    vigil::signal::now_ms() as f64 / 1000.0
}

/// Creates a stream for enforcement point `ep`; returns the status and body.
async fn create_stream(vigil: &vigil::Vigil, ep: &str, body: Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("http://{}/ssf/streams", vigil.local_addr()))
        .bearer_auth(token(ep))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn push_stream(url: &str) -> Value {
    json!({"delivery": {"method": "urn:ietf:rfc:8935", "endpoint_url": url},
           "events_requested": ["https://schemas.openid.net/secevent/caep/event-type/session-revoked"]})
}

/// The `txn` of a compact SET, read without verifying (the receiver side is not under test).
fn txn_of(set: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(set).ok()?;
    let payload = text.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims["txn"].as_str().map(str::to_owned)
}

#[derive(Default)]
struct Arrivals(Mutex<Vec<(String, Instant)>>);

async fn record(State(a): State<Arc<Arrivals>>, body: Bytes) -> impl IntoResponse {
    if let Some(txn) = txn_of(&body) {
        a.0.lock().unwrap().push((txn, Instant::now()));
    }
    StatusCode::ACCEPTED
}

async fn throttle() -> impl IntoResponse {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [("retry-after", "18446744073709551615")],
        "",
    )
}

async fn throttle_date() -> impl IntoResponse {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT")],
        "",
    )
}

async fn serve(app: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// Accepts connections and never answers.
async fn black_hole() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    addr
}

/// Opens an SSE response on `stream` as `ep` and never reads from it.
async fn open_unread_sse(vigil: &vigil::Vigil, ep: &str, stream: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(vigil.local_addr()).await.unwrap();
    let req = format!(
        "GET /ssf/sse/{stream} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\naccept: text/event-stream\r\n\r\n",
        token(ep)
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 64];
    let n = s.read(&mut head).await.unwrap();
    (s, String::from_utf8_lossy(&head[..n]).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_enforcement_points_do_not_delay_another_ones_revocation() {
    let tx = Transmitter::start(&[Alg::RS256]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), vec![tx.config("idp", ISS, &[AUD])]);
    config.enforcement_points = ["good", "dead", "throttler", "hog"]
        .into_iter()
        .map(point)
        .collect();
    config.limits.max_streams_per_enforcement_point = 24;
    config
        .limits
        .max_streaming_connections_per_enforcement_point = 4;
    config.delivery.push_timeout_ms = 5_000;
    let vigil = start(config).await;

    // Twenty streams pointed at an endpoint that never answers.
    let dead = black_hole().await;
    for _ in 0..20 {
        let (code, body) = create_stream(
            &vigil,
            "dead",
            push_stream(&format!("http://{dead}/events")),
        )
        .await;
        assert_eq!(code, 201, "{body}");
    }
    // Two that answer 429 / 503 with Retry-After values no arithmetic can hold.
    let throttler = serve(
        axum::Router::new()
            .route("/429", axum::routing::post(throttle))
            .route("/503", axum::routing::post(throttle_date)),
    )
    .await;
    for path in ["429", "503"] {
        let (code, _) = create_stream(
            &vigil,
            "throttler",
            push_stream(&format!("http://{throttler}/{path}")),
        )
        .await;
        assert_eq!(code, 201);
    }
    // One that opens its maximum of SSE responses and reads none of them.
    let (code, hog_stream) = create_stream(&vigil, "hog", json!({})).await;
    assert_eq!(code, 201);
    let hog_id = hog_stream["stream_id"].as_str().unwrap().to_owned();
    let mut held = Vec::new();
    for _ in 0..4 {
        let (s, head) = open_unread_sse(&vigil, "hog", &hog_id).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        held.push(s);
    }
    let (_, fifth) = open_unread_sse(&vigil, "hog", &hog_id).await;
    assert!(
        fifth.starts_with("HTTP/1.1 503"),
        "over its own cap: {fifth}"
    );
    // The good enforcement point: a push endpoint that answers at once, and an SSE response of
    // its own that still opens although the hog holds its maximum.
    let arrivals = Arc::new(Arrivals::default());
    let good = serve(
        axum::Router::new()
            .route("/events", axum::routing::post(record))
            .with_state(arrivals.clone()),
    )
    .await;
    let (code, _) = create_stream(
        &vigil,
        "good",
        push_stream(&format!("http://{good}/events")),
    )
    .await;
    assert_eq!(code, 201);
    let (code, good_sse) = create_stream(&vigil, "good", json!({})).await;
    assert_eq!(code, 201);
    let (_good_sse_conn, head) =
        open_unread_sse(&vigil, "good", good_sse["stream_id"].as_str().unwrap()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // Let the bad ones reach their steady state: attempts hanging, Retry-After read.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Each revocation fans out to every stream (the grants name no enforcement point).
    let mut latencies = Vec::new();
    for round in 0..3 {
        let user = format!("iso-{round}@example.com");
        let t = now();
        let grant = json!({"id": format!("iso-{round}"), "kind": "session",
            "subject": {"format": "email", "email": user},
            "issued_at": t - 60.0, "expires_at": t + 3600.0});
        assert_eq!(post_json(&vigil, "/v1/grants", &grant).await.0, 201);
        // A decision's SET carries the signal's jti as its `txn`.
        let txn = format!("iso-{round}");
        let claims = json!({"iss": ISS, "aud": AUD, "jti": txn.clone(),
            "iat": now() as i64,
            "sub_id": {"format": "email", "email": user}, "events": {DISABLED: {}}});
        let pushed = Instant::now();
        let answer = push(
            &vigil,
            "idp",
            &tx.key(Alg::RS256).sign_set(&claims).unwrap(),
        )
        .await;
        assert_eq!(answer.status, 202);
        let arrived = eventually_within(10, "the good point's revocation", || {
            let arrivals = arrivals.clone();
            let txn = txn.clone();
            async move {
                arrivals
                    .0
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|(t, _)| *t == txn)
                    .map(|(_, at)| *at)
            }
        })
        .await;
        latencies.push(arrived.duration_since(pushed));
    }
    let worst = latencies.iter().max().copied().unwrap();
    println!("good enforcement point: push → revocation received {latencies:?} (worst {worst:?})");
    assert!(
        worst < Duration::from_secs(1),
        "a misbehaving party delayed another's revocation: {latencies:?}"
    );

    // Nothing panicked: delivery to the throttled streams is paused, not dead, and the server
    // still answers everyone.
    let (_, metrics) = get(&vigil, "/metrics").await;
    assert!(
        !metrics.contains("vigil_task_restarts_total"),
        "a shared task ended: {metrics}"
    );
    assert!(
        metrics.contains(
            "vigil_push_attempts_total{enforcement_point=\"throttler\",outcome=\"retry\"}"
        ),
        "{metrics}"
    );
    let (code, _) = get(&vigil, "/readyz").await;
    assert_eq!(code, 200);
    drop(held);
    vigil.shutdown().await;
}

/// A TCP connection to `to` from the loopback address `from` (127.0.0.0/8 is all loopback, so
/// each address stands for another host).
async fn connect_from(from: [u8; 4], to: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::from((from, 0))).unwrap();
    socket.connect(to).await.unwrap()
}

/// Whether the server closed `s` (EOF, or a reset) within `secs`.
async fn closed_within(s: &mut TcpStream, secs: u64) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(Duration::from_secs(secs), s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// A health check from 127.0.0.1; the status, or 0 when the connection was refused or closed.
async fn healthz(addr: std::net::SocketAddr, path: &str) -> u16 {
    let mut s = connect_from([127, 0, 0, 1], addr).await;
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return 0;
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    answer.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_clients_are_closed_and_health_checks_keep_a_reserve() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), Vec::new());
    config.server.max_connections = 16;
    config.server.max_connections_per_peer = 8;
    config.server.health_reserve_connections = 4;
    config.server.request_head_timeout_ms = 800;
    config.server.body_read_timeout_ms = 800;
    let vigil = start(config).await;
    let addr = vigil.local_addr();

    // One host opening more idle sockets than it may: the excess is closed at once.
    let mut one_host = Vec::new();
    for _ in 0..12 {
        one_host.push(connect_from([127, 0, 0, 2], addr).await);
    }
    let mut refused = 0;
    for s in &mut one_host[8..] {
        refused += usize::from(closed_within(s, 1).await);
    }
    assert_eq!(refused, 4, "a peer over its cap is closed at once");
    // A second host fills the pool: the health check is served on a reserve connection, and
    // a reserve connection serves nothing else.
    let mut other_host = Vec::new();
    for _ in 0..8 {
        other_host.push(connect_from([127, 0, 0, 3], addr).await);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    assert_eq!(healthz(addr, "/healthz").await, 200);
    println!(
        "healthz with the pool full of idle sockets: {:?}",
        started.elapsed()
    );
    assert_eq!(healthz(addr, "/v1/grants/x").await, 503);
    // Idle connections are closed by the head timeout.
    for s in one_host[..8].iter_mut().chain(other_host.iter_mut()) {
        assert!(
            closed_within(s, 5).await,
            "an idle connection was not closed"
        );
    }
    drop((one_host, other_host));

    // Slow headers: part of a request head, then nothing.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    assert!(
        closed_within(&mut slow, 5).await,
        "a slow-header connection stayed open"
    );

    // Slow body: a declared length never delivered gets 408.
    let mut drip = TcpStream::connect(addr).await.unwrap();
    let token = vigil.admin_token().unwrap().to_owned();
    drip.write_all(
        format!(
            "POST /v1/grants HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n{{\"id\""
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), drip.read_to_end(&mut answer))
        .await
        .expect("a slow body held its connection")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // After all that, a normal request is served.
    let (code, _) = get(&vigil, "/readyz").await;
    assert_eq!(code, 200);
    let (_, metrics) = get(&vigil, "/metrics").await;
    assert!(
        metrics.contains("vigil_http_connections_refused_total{reason=\"peer\"} 4"),
        "{metrics}"
    );
    vigil.shutdown().await;
}

#[tokio::test]
async fn push_endpoints_must_be_https_and_not_internal() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), Vec::new());
    config.enforcement_points = vec![point("gw")];
    config.outbound.allow_loopback = false;
    config.limits.max_streams_per_enforcement_point = 2;
    config.limits.max_subjects_per_stream = 3;
    let vigil = start(config).await;
    for url in [
        "http://127.0.0.1:9/events",
        "https://127.0.0.1:9/events",
        "https://localhost/events",
        "https://169.254.169.254/latest/meta-data/",
        "https://[fe80::1]/events",
        "http://gw.example.com/events",
        "file:///etc/passwd",
        "gopher://gw.example.com/x",
    ] {
        let (code, body) = create_stream(&vigil, "gw", push_stream(url)).await;
        assert_eq!(code, 400, "{url}: {body}");
        assert!(
            body["description"]
                .as_str()
                .unwrap()
                .contains("endpoint_url"),
            "{body}"
        );
    }
    // An update cannot move a stream there either.
    let (code, created) =
        create_stream(&vigil, "gw", push_stream("https://gw.example.com/events")).await;
    assert_eq!(code, 201);
    let id = created["stream_id"].as_str().unwrap();
    let resp = reqwest::Client::new()
        .patch(format!("http://{}/ssf/streams", vigil.local_addr()))
        .bearer_auth(token("gw"))
        .json(
            &json!({"stream_id": id, "delivery": {"method": "urn:ietf:rfc:8935",
            "endpoint_url": "https://169.254.169.254/"}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);

    // Streams and subjects are bounded per enforcement point and stream.
    let (code, _) = create_stream(&vigil, "gw", json!({})).await;
    assert_eq!(code, 201);
    let (code, body) = create_stream(&vigil, "gw", json!({})).await;
    assert_eq!(code, 429, "{body}");
    let http = reqwest::Client::new();
    let add = |n: usize| {
        http.post(format!("http://{}/ssf/subjects:add", vigil.local_addr()))
            .bearer_auth(token("gw"))
            .json(&json!({"stream_id": id,
                "subject": {"format": "email", "email": format!("s{n}@example.com")}}))
            .send()
    };
    for n in 0..3 {
        assert_eq!(add(n).await.unwrap().status().as_u16(), 200);
    }
    let over = add(3).await.unwrap();
    assert_eq!(over.status().as_u16(), 429);
    assert!(over.headers().contains_key("retry-after"));
    vigil.shutdown().await;
}

#[tokio::test]
async fn a_signal_from_the_future_does_not_pin_a_fact() {
    let tx = Transmitter::start(&[Alg::RS256]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path(), vec![tx.config("idp", ISS, &[AUD])]);
    let vigil = start(config).await;
    let t = now();
    let grant = json!({"id": "future", "kind": "session",
        "subject": {"format": "iss_sub", "iss": "https://idp.example.com/3456789/", "sub": "jane.doe@example.com"},
        "issued_at": t - 60.0, "expires_at": t + 3600.0});
    assert_eq!(post_json(&vigil, "/v1/grants", &grant).await.0, 201);
    let risk = |jti: &str, level: &str, at: i64| {
        let mut set = spec_example("caep-risk-level-change.json");
        set["jti"] = json!(jti);
        set["iat"] = json!(now() as i64);
        let event = &mut set["events"]
            ["https://schemas.openid.net/secevent/caep/event-type/risk-level-change"];
        event["current_level"] = json!(level);
        event["event_timestamp"] = json!(at);
        tx.key(Alg::RS256).sign_set(&set).unwrap()
    };
    // A validly signed LOW dated in the year 3000, then a real HIGH a second later.
    assert_eq!(
        push(&vigil, "idp", &risk("low-3000", "LOW", 32_503_680_000))
            .await
            .status,
        202
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        push(&vigil, "idp", &risk("high-now", "HIGH", now() as i64))
            .await
            .status,
        202
    );
    eventually("the HIGH revokes the grant", || async {
        let (_, g) = get_json(&vigil, "/v1/grants/future").await;
        (g["status"] == "revoked").then_some(())
    })
    .await;
    let (_, metrics) = get(&vigil, "/metrics").await;
    assert!(
        metrics.contains("vigil_event_times_clamped_total{source=\"ssf\"} 1"),
        "{metrics}"
    );

    // Grant times in milliseconds are ambiguous: refused.
    let ms = json!({"id": "ms", "kind": "session", "subject": {"format": "email", "email": "ms@example.com"},
        "issued_at": 1_700_000_000_000u64, "expires_at": 4_102_444_800_000u64});
    let (code, body) = post_json(&vigil, "/v1/grants", &ms).await;
    assert_eq!(code, 400, "{body}");
    vigil.shutdown().await;
}

/// An API client that asks for many evaluations rotates out only its own access records: another
/// client's record and the revocation in the decision log stay listed, each naming who caused it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_flooding_evaluations_rotates_out_only_its_own_records() {
    use vigil::config::{ApiClientConfig, Role};
    let tx = Transmitter::start(&[Alg::RS256]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), vec![tx.config("idp", ISS, &[AUD])]);
    let check_client = |name: &str, token: &str| ApiClientConfig {
        name: name.into(),
        token: token.into(),
        roles: vec![Role::Check],
        max_grants: None,
    };
    config.clients = vec![
        admin_client(),
        check_client("loud", "loud-client-token-0123456789"),
        check_client("quiet", "quiet-client-token-012345678"),
    ];
    // Each client's access log: one file of about a kilobyte (a few records); the decision log
    // two (a shared log this small would have lost the revocation to the flood).
    config.audit.access_max_file_bytes = 1024;
    config.audit.access_keep_files = 1;
    config.audit.max_file_bytes = 1024;
    config.audit.keep_files = 2;
    let vigil = start(config).await;
    let t = now();
    let grant = json!({"id": "held", "kind": "session",
        "subject": {"format": "iss_sub", "iss": "https://idp.example.com/3456789/", "sub": "jane.doe@example.com"},
        "issued_at": t - 60.0, "expires_at": t + 3600.0});
    assert_eq!(post_json(&vigil, "/v1/grants", &grant).await.0, 201);
    let mut set = spec_example("caep-risk-level-change.json");
    set["jti"] = json!("high");
    set["iat"] = json!(t as i64);
    let event =
        &mut set["events"]["https://schemas.openid.net/secevent/caep/event-type/risk-level-change"];
    event["current_level"] = json!("HIGH");
    event["event_timestamp"] = json!(t as i64);
    let signed = tx.key(Alg::RS256).sign_set(&set).unwrap();
    assert_eq!(push(&vigil, "idp", &signed).await.status, 202);
    eventually("the HIGH revokes the grant", || async {
        let (_, g) = get_json(&vigil, "/v1/grants/held").await;
        (g["status"] == "revoked").then_some(())
    })
    .await;

    let evaluate = |token: &'static str, body: Value| {
        let url = format!("http://{}/access/v1/evaluations", vigil.local_addr());
        async move {
            let resp = reqwest::Client::new()
                .post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
        }
    };
    let request = |grant: &str| {
        json!({"subject": {"type": "user", "id": "jane.doe@example.com"}, "action": {"name": "read"},
               "resource": {"type": "api", "id": "docs"}, "context": {"grant_id": grant}})
    };
    evaluate(
        "quiet-client-token-012345678",
        json!({"evaluations": [request("quiet-asked")]}),
    )
    .await;
    // 400 denied evaluations (no such grants): each is recorded.
    for round in 0..4 {
        let entries: Vec<Value> = (0..100)
            .map(|i| request(&format!("loud-{round}-{i}")))
            .collect();
        evaluate(
            "loud-client-token-0123456789",
            json!({"evaluations": entries}),
        )
        .await;
    }
    let listed = |query: &'static str| {
        let vigil = &vigil;
        async move {
            let (status, body) = get_json(vigil, query).await;
            assert_eq!(status, 200, "{body}");
            body["decisions"].as_array().cloned().unwrap_or_default()
        }
    };
    let loud = eventually("the flood's last record is written", || async {
        let all = listed("/v1/decisions?cause=access_request").await;
        all.iter()
            .any(|d| d["grant_id"] == "" && d["cause"]["source"] == "client:loud")
            .then_some(all)
    })
    .await;
    let loud_records = loud
        .iter()
        .filter(|d| d["cause"]["source"] == "client:loud")
        .count();
    assert!(
        loud_records < 40,
        "the loud client's log is not bounded: {loud_records} of 400 records kept"
    );
    let quiet: Vec<&Value> = loud
        .iter()
        .filter(|d| d["cause"]["source"] == "client:quiet")
        .collect();
    assert_eq!(
        quiet.len(),
        1,
        "the quiet client's record was rotated out: {loud:?}"
    );
    let revocations = listed("/v1/decisions?grant=held").await;
    assert!(
        revocations
            .iter()
            .any(|d| d["effect"] == "revoke" && d["cause"]["source"] == "ssf:tx-idp"),
        "the revocation is gone: {revocations:?}"
    );
    vigil.shutdown().await;
}

/// An attacker's signing key and a server publishing it at `/jwks.json`.
async fn attacker_keys() -> (vigil::sim::SigningKey, std::net::SocketAddr) {
    let attacker = vigil::sim::SigningKey::generate(Alg::RS256, "evil").unwrap();
    let jwks = json!({"keys": [attacker.public_jwk().unwrap()]});
    let addr = serve(axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let v = jwks.clone();
            async move { axum::Json(v) }
        }),
    ))
    .await;
    (attacker, addr)
}

#[tokio::test]
async fn a_jwks_redirected_to_another_origin_is_not_followed() {
    // The configured key URL redirects to another origin serving an attacker's key.
    let (attacker, evil) = attacker_keys().await;
    let redirector = serve(axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || async move {
            (
                StatusCode::FOUND,
                [("location", format!("http://{evil}/jwks.json"))],
            )
        }),
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let t = vigil::config::TransmitterConfig::with_jwks(
        "idp",
        ISS,
        vec![AUD.into()],
        &format!("{AUTH}-idp"),
        vec![Alg::RS256],
        &format!("http://{redirector}/jwks.json"),
    );
    let config = test_config(dir.path(), vec![t]);
    let vigil = start(config).await;
    let claims = json!({"iss": ISS, "aud": AUD, "jti": "forged", "iat": now() as i64,
        "sub_id": {"format": "email", "email": "x@example.com"}, "events": {DISABLED: {}}});
    let forged = attacker.sign_set(&claims).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let answer = push(&vigil, "idp", &forged).await;
    assert_ne!(
        answer.status, 202,
        "a key from another origin verified a SET"
    );
    vigil.shutdown().await;
}

#[cfg(unix)]
#[tokio::test]
async fn the_data_directory_and_its_files_are_the_owners_alone() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = test_config(&data, Vec::new());
    let vigil = start(config).await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    for f in ["vigil.redb", "intake.redb", "admin.token"] {
        assert_eq!(mode(&data.join(f)), 0o600, "{f}");
    }
    // The audit directory's files, and its clients' access logs (directories the owner's alone).
    let mut walk = vec![data.join("audit")];
    while let Some(at) = walk.pop() {
        for entry in std::fs::read_dir(&at).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                assert_eq!(mode(&path), 0o700, "{}", path.display());
                walk.push(path);
            } else {
                assert_eq!(mode(&path), 0o600, "{}", path.display());
            }
        }
    }
    vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transmitter_holding_pushes_open_does_not_take_intake_from_another() {
    let slow = Transmitter::start(&[Alg::RS256]).await;
    let other = Transmitter::start(&[Alg::RS256]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut slow_config = slow.config("slow", ISS, &[AUD]);
    slow_config.name = "slow".into();
    let mut other_config = other.config("other", "https://other.example.com/", &[AUD]);
    other_config.name = "other".into();
    let mut config = test_config(dir.path(), vec![slow_config, other_config]);
    config.limits.transmitter_max_inflight = 2;
    let vigil = start(config).await;
    // Two pushes whose bodies never finish hold the slow transmitter's whole budget.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(vigil.local_addr()).await.unwrap();
        let head = format!("POST /ssf/push/slow HTTP/1.1\r\nhost: x\r\nauthorization: {AUTH}-slow\r\ncontent-type: application/secevent+jwt\r\ncontent-length: 5000\r\n\r\neyJ");
        s.write_all(head.as_bytes()).await.unwrap();
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let claims = |iss: &str, jti: &str| {
        json!({"iss": iss, "aud": AUD, "jti": jti, "iat": now() as i64,
            "sub_id": {"format": "email", "email": "t@example.com"}, "events": {DISABLED: {}}})
    };
    let third = push(
        &vigil,
        "slow",
        &slow
            .key(Alg::RS256)
            .sign_set(&claims(ISS, "slow-3"))
            .unwrap(),
    )
    .await;
    assert_eq!(third.status, 429, "over its own in-flight budget");
    let answer = push(
        &vigil,
        "other",
        &other
            .key(Alg::RS256)
            .sign_set(&claims("https://other.example.com/", "other-1"))
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 202, "another transmitter is not affected");
    drop(held);
    vigil.shutdown().await;
}

#[tokio::test]
async fn a_jwks_uri_from_metadata_must_be_https_or_on_the_issuers_origin() {
    let (attacker, evil) = attacker_keys().await;
    // The transmitter's metadata (on its own origin) names plain-http keys on another origin.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!("http://{}", listener.local_addr().unwrap());
    let metadata = json!({"spec_version": "1_0", "issuer": issuer,
        "jwks_uri": format!("http://{evil}/jwks.json")});
    let app = axum::Router::new().route(
        "/.well-known/ssf-configuration",
        axum::routing::get(move || {
            let v = metadata.clone();
            async move { axum::Json(v) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut t = vigil::config::TransmitterConfig::with_jwks(
        "idp",
        &issuer,
        vec![AUD.into()],
        &format!("{AUTH}-idp"),
        vec![Alg::RS256],
        "http://127.0.0.1:1/unused",
    );
    t.jwks_uri = None;
    t.discovery = true;
    let dir = tempfile::tempdir().unwrap();
    let vigil = start(test_config(dir.path(), vec![t])).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let claims = json!({"iss": issuer, "aud": AUD, "jti": "forged-meta", "iat": now() as i64,
        "sub_id": {"format": "email", "email": "x@example.com"}, "events": {DISABLED: {}}});
    let answer = push(&vigil, "idp", &attacker.sign_set(&claims).unwrap()).await;
    // No key could be loaded: the temporary 503 (with the keys on the issuer's own origin the
    // same SET is accepted).
    assert_eq!(answer.status, 503, "{:?}", answer.err());
    vigil.shutdown().await;
}
