//! Crash safety: the `vigil` binary under load (grant registrations, then a RISC account-disabled
//! SET per grant, pushed by concurrent transmitter tasks or queued at an SSF transmitter Vigil polls
//! (`sim::idp`); and HIGH risk scores published to Kafka —
//! librdkafka's mock broker in this process — for other granted users), killed with SIGKILL at
//! random moments several times and restarted on the same data directory. Afterwards:
//! - every SET answered 202, and every SET Vigil acknowledged by poll, is recorded and applied: its
//!   grant is revoked (exactly as without a crash);
//! - every Kafka message the broker acknowledged is applied (committed offsets lose nothing, and
//!   uncommitted ones are redelivered): its user's grant is revoked;
//! - every grant seen revoked before a kill is still revoked after every restart (never valid again);
//! - every revocation decided for an acknowledged SET reaches the enforcement point by poll, by
//!   push and by SSE (a client that reconnects with `Last-Event-ID` after each kill);
//! - the intake log, in segments of a few records kept one second, is pruned all through the run
//!   (kills land during pruning) and nothing acknowledged is lost to it;
//! - a decision made again while a restarted Vigil replays is neither listed twice by
//!   `/v1/decisions` nor sent again: every SET `jti` any enforcement point saw came with one token
//!   (a redelivery repeats the same token; a second SET for the decision would be signed anew).
//!
//! The counts are printed (`cargo test --test crash_safety -- --nocapture`; `CRASH_KILLS=N` for more).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeSet, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};
use vigil::config::{DeliveryMode, TransmitterConfig};
use vigil::jose::Alg;
use vigil::sim::idp::{Idp, IdpSettings};
use vigil::sim::risk::{mock_cluster, Publisher};

const ISS: &str = "https://idp.example.com/";
const AUD: &str = "https://vigil.example.com/";
const EP: &str = "crash-enforcement-point-token";
/// Kills per run; `CRASH_KILLS=50 cargo test --release --test crash_safety -- --nocapture` for a
/// longer run.
fn kills() -> usize {
    std::env::var("CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6)
}
const PUSHERS: usize = 4;
const POLL_AUDIENCE: &str = "https://vigil.example";
const POLL_CREDENTIAL: &str = "Bearer crash-idp-receiver-token";
const TOPIC: &str = "vigil.risk";
const DISABLED: &str = "https://schemas.openid.net/secevent/risc/event-type/account-disabled";

fn now() -> f64 {
    vigil::signal::now_ms() as f64 / 1000.0
}

fn spawn(config: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["serve", "--config"])
        .arg(config)
        .env("VIGIL_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// A configuration for the `vigil` binary on a free loopback port, its data under `dir`, the admin
/// client and enforcement point `ep1`, consuming `TOPIC` from `brokers` as `group` (a killed
/// member's partitions move to the restarted one after the 3 s session timeout). Returns it with
/// its base URL.
fn binary_config(
    dir: &std::path::Path,
    transmitters: Vec<TransmitterConfig>,
    brokers: String,
    group: &str,
) -> (vigil::config::Config, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = test_config(dir, transmitters);
    config.listen = format!("127.0.0.1:{port}").parse().unwrap();
    config.data_dir = dir.join("data");
    config.clients = vec![admin_client()];
    config.enforcement_points = vec![enforcement_point("ep1", EP)];
    config.kafka.brokers = brokers;
    config.kafka.group_id = group.into();
    config.kafka.topics = vec![TOPIC.into()];
    for (k, v) in [
        ("heartbeat_interval_ms", "300"),
        ("session_timeout_ms", "3000"),
    ] {
        config.kafka.properties.insert(k.into(), v.into());
    }
    (config, format!("http://127.0.0.1:{port}"))
}

/// Writes `config` where `spawn` reads it, and a client for the API.
fn write_config(
    dir: &std::path::Path,
    config: &vigil::config::Config,
) -> (std::path::PathBuf, reqwest::Client) {
    config.validate().unwrap();
    let path = dir.join("vigil.toml");
    std::fs::write(&path, toml::to_string(config).unwrap()).unwrap();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    (path, http)
}

/// Waits until the process answers and the transmitter's keys are loaded.
async fn ready(http: &reqwest::Client, base: &str) {
    eventually_within(30, "vigil to be ready", || async {
        let r = http
            .get(format!("{base}/readyz"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .ok()?;
        (r.status().as_u16() == 200).then_some(())
    })
    .await;
}

/// What the load saw acknowledged.
#[derive(Default)]
struct Acked {
    /// Grants answered 201.
    grants: BTreeSet<String>,
    /// SETs answered 202, by jti, with the grant they revoke.
    sets: Vec<(String, String)>,
    /// SETs queued at the polled transmitter, by jti, with the grant they revoke.
    queued: Vec<(String, String)>,
    /// Grants whose user's HIGH risk score the broker acknowledged.
    scored: Vec<String>,
    attempts: usize,
}

/// Registers a session grant for `email` held by `ep1`; true (and noted) when answered 201.
async fn register(
    http: &reqwest::Client,
    base: &str,
    acked: &Mutex<Acked>,
    grant: &str,
    email: &str,
) -> bool {
    let t = now();
    let body = json!({"id": grant, "kind": "session",
        "subject": {"format": "email", "email": email},
        "issued_at": t - 5.0, "expires_at": t + 3600.0, "enforcement_points": ["ep1"]});
    acked.lock().unwrap().attempts += 1;
    let registered = http
        .post(format!("{base}/v1/grants"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .map(|r| r.status().as_u16());
    if registered.ok() != Some(201) {
        return false;
    }
    acked.lock().unwrap().grants.insert(grant.to_owned());
    true
}

async fn status_of(http: &reqwest::Client, base: &str, grant: &str) -> Option<String> {
    let r = http
        .get(format!("{base}/v1/grants/{grant}"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .ok()?;
    let v: Value = r.json().await.ok()?;
    v["status"].as_str().map(str::to_owned)
}

/// Every SET an enforcement point received, by `jti`: the distinct tokens that carried it, and the
/// revocations' `txn`s.
#[derive(Default)]
struct Received {
    tokens: std::collections::HashMap<String, BTreeSet<String>>,
    txns: HashSet<String>,
}

impl Received {
    fn record(&mut self, token: &str) {
        let Some(payload) = token.split('.').nth(1) else {
            return;
        };
        let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload) else {
            return;
        };
        let Ok(claims) = serde_json::from_slice::<Value>(&bytes) else {
            return;
        };
        if let Some(jti) = claims["jti"].as_str() {
            self.tokens
                .entry(jti.to_owned())
                .or_default()
                .insert(token.to_owned());
        }
        if let Some(txn) = claims["txn"].as_str() {
            self.txns.insert(txn.to_owned());
        }
    }

    /// `jti`s that arrived in two different SETs: a decision sent twice.
    fn sent_twice(&self) -> Vec<&String> {
        self.tokens
            .iter()
            .filter(|(_, t)| t.len() > 1)
            .map(|(j, _)| j)
            .collect()
    }
}

/// An RFC 8935 push endpoint that records what it receives.
async fn push_endpoint(received: Arc<Mutex<Received>>) -> std::net::SocketAddr {
    let app = axum::Router::new().route(
        "/events",
        axum::routing::post(move |body: axum::body::Bytes| {
            let received = received.clone();
            async move {
                received
                    .lock()
                    .unwrap()
                    .record(&String::from_utf8_lossy(&body));
                axum::http::StatusCode::ACCEPTED
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// Subscribes enforcement point `ep1` by RFC 8935 push to `event` at a new recording endpoint, and
/// returns what that endpoint receives.
async fn subscribe_push(http: &reqwest::Client, base: &str, event: &str) -> Arc<Mutex<Received>> {
    let pushed = Arc::new(Mutex::new(Received::default()));
    let push_addr = push_endpoint(pushed.clone()).await;
    let created = http
        .post(format!("{base}/ssf/streams"))
        .bearer_auth(EP)
        .json(&json!({"delivery": {"method": "urn:ietf:rfc:8935",
            "endpoint_url": format!("http://{push_addr}/events")}, "events_requested": [event]}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status().as_u16(), 201);
    pushed
}

/// The ids of the decisions `/v1/decisions?<query>` lists, in its order.
async fn listed_ids(http: &reqwest::Client, base: &str, query: &str) -> Vec<String> {
    listed_decisions(http, base, query)
        .await
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The ids of every decision line in the audit files under `data_dir` (what an auditor exports:
/// the decision log and the clients' access logs under `audit/access/`).
fn audit_file_ids(data_dir: &std::path::Path) -> Vec<String> {
    let mut ids = Vec::new();
    let mut files = Vec::new();
    let mut walk = vec![data_dir.join("audit")];
    while let Some(dir) = walk.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk.push(path);
            } else {
                files.push(path);
            }
        }
    }
    for path in files {
        let text = std::fs::read_to_string(path).unwrap();
        ids.extend(
            text.lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .map(|d| d["id"].as_str().unwrap_or_default().to_owned()),
        );
    }
    ids
}

/// An SSE subscriber that reconnects (with `Last-Event-ID`) whenever its response ends, as a
/// sidecar would across Vigil's restarts, until `stop`.
fn sse_subscriber(
    url: String,
    received: Arc<Mutex<Received>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        let mut last: Option<String> = None;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let mut req = http.get(&url).bearer_auth(EP);
            if let Some(id) = &last {
                req = req.header("last-event-id", id);
            }
            let Ok(mut resp) = req.send().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let mut buf = String::new();
            loop {
                let chunk = tokio::select! {
                    c = resp.chunk() => c,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {
                        if stop.load(std::sync::atomic::Ordering::Relaxed) { return; }
                        continue;
                    }
                };
                let Ok(Some(chunk)) = chunk else { break };
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buf.find("\n\n") {
                    let event: String = buf.drain(..end + 2).collect();
                    let (mut id, mut data) = (None, None);
                    for line in event.lines() {
                        if let Some(v) = line.strip_prefix("id:") {
                            id = Some(v.trim().to_owned());
                        } else if let Some(v) = line.strip_prefix("data:") {
                            data = Some(v.trim().to_owned());
                        }
                    }
                    if let Some(d) = data {
                        received.lock().unwrap().record(&d);
                    }
                    if id.is_some() {
                        last = id;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_work_survives_sigkill() {
    let tx = Arc::new(Transmitter::start(&[Alg::RS256]).await);
    let dir = tempfile::tempdir().unwrap();
    // An SSF transmitter Vigil creates a poll stream at and polls.
    let idp = Arc::new(
        Idp::start(
            "127.0.0.1:0".parse().unwrap(),
            IdpSettings {
                receiver_credential: POLL_CREDENTIAL.into(),
                audience: POLL_AUDIENCE.into(),
                long_poll: Duration::from_millis(500),
                ..IdpSettings::default()
            },
        )
        .await
        .unwrap(),
    );
    let mut polled = TransmitterConfig::managed(
        "idp-poll",
        idp.issuer(),
        vec![POLL_AUDIENCE.into()],
        DeliveryMode::Poll,
        POLL_CREDENTIAL,
    );
    if let Some(m) = &mut polled.manage {
        m.poll_max_events = 50;
        m.poll_timeout_secs = 1;
    }
    let kafka = mock_cluster(&[(TOPIC, 4), ("vigil.risk.dead-letter", 1)]).unwrap();
    let (mut config, base) = binary_config(
        dir.path(),
        vec![tx.config("idp", ISS, &[AUD]), polled],
        kafka.bootstrap_servers(),
        "vigil-crash",
    );
    config.identity.poll_timeout_secs = 1;
    // Intake segments of a few records each, kept one second once processed: segments are
    // dropped all through the run, so kills land while the log is being pruned too.
    config.intake.segment_bytes = 4096;
    config.intake.retention_secs = 1;
    config.intake.max_bytes = 1 << 30;
    let publisher = Arc::new(Publisher::new(&kafka.bootstrap_servers()).unwrap());
    let push_auth = tx.config("idp", ISS, &[AUD]).authorization;
    let (config_path, http) = write_config(dir.path(), &config);

    let mut child = spawn(&config_path);
    ready(&http, &base).await;
    let poll_url = create_poll_stream(&http, &base, EP).await;
    // The same enforcement point subscribed by push and by SSE as well.
    let revoked = "https://schemas.openid.net/secevent/caep/event-type/session-revoked";
    let pushed = subscribe_push(&http, &base, revoked).await;
    let sse_stream: Value = http
        .post(format!("{base}/ssf/streams"))
        .bearer_auth(EP)
        .json(&json!({"events_requested": [revoked]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let streamed = Arc::new(Mutex::new(Received::default()));
    let sse_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sse_task = sse_subscriber(
        format!(
            "{base}/ssf/sse/{}",
            sse_stream["stream_id"].as_str().unwrap()
        ),
        streamed.clone(),
        sse_stop.clone(),
    );
    let idp_stream = eventually_within(30, "Vigil's poll stream at the IdP", || async {
        idp.streams()
            .first()
            .and_then(|s| s["stream_id"].as_str().map(str::to_owned))
    })
    .await;

    let acked = Arc::new(Mutex::new(Acked::default()));
    let mut seen_revoked: HashSet<String> = HashSet::new();
    let next_user = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let kills = kills();
    for round in 0..=kills {
        // Load: each pusher registers a grant for a fresh user, then pushes the SET that disables
        // the user's account (only after the grant was acknowledged).
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..PUSHERS {
            let (http, base, tx, acked, stop, next_user, push_auth) = (
                http.clone(),
                base.clone(),
                tx.clone(),
                acked.clone(),
                stop.clone(),
                next_user.clone(),
                push_auth.clone(),
            );
            tasks.push(tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let n = next_user.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let (grant, email, jti) = (
                        format!("g{n}"),
                        format!("u{n}@example.com"),
                        format!("set-{n}"),
                    );
                    let t = now();
                    if !register(&http, &base, &acked, &grant, &email).await {
                        continue;
                    }
                    let set = tx
                        .key(Alg::RS256)
                        .sign_set(&json!({"iss": ISS, "aud": AUD, "jti": jti, "iat": t as i64,
                            "sub_id": {"format": "email", "email": email},
                            "events": {DISABLED: {}}}))
                        .unwrap();
                    let pushed = http
                        .post(format!("{base}/ssf/push/idp"))
                        .header("authorization", &push_auth)
                        .header("content-type", "application/secevent+jwt")
                        .body(set)
                        .send()
                        .await
                        .map(|r| r.status().as_u16());
                    if pushed.ok() == Some(202) {
                        acked.lock().unwrap().sets.push((jti, grant));
                    }
                }
            }));
        }
        {
            // SETs queued at the polled transmitter for other users, each after its grant.
            let (http, base, acked, stop, next_user, idp, idp_stream) = (
                http.clone(),
                base.clone(),
                acked.clone(),
                stop.clone(),
                next_user.clone(),
                idp.clone(),
                idp_stream.clone(),
            );
            tasks.push(tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let n = next_user.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let (grant, email, jti) = (
                        format!("p{n}"),
                        format!("p{n}@example.com"),
                        format!("poll-{n}"),
                    );
                    if !register(&http, &base, &acked, &grant, &email).await {
                        continue;
                    }
                    let token = idp
                        .sign(
                            &json!({"iss": idp.issuer(), "aud": POLL_AUDIENCE, "jti": jti,
                            "iat": now() as i64, "sub_id": {"format": "email", "email": email},
                            "events": {DISABLED: {}}}),
                        )
                        .unwrap();
                    assert!(idp.inject(&idp_stream, &jti, token));
                    acked.lock().unwrap().queued.push((jti, grant));
                    // Slower than the pushers: the transmitter's queue is one stream.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
        }
        {
            // Risk scores from Kafka for other users, each after its grant is acknowledged.
            let (http, base, acked, stop, next_user, publisher) = (
                http.clone(),
                base.clone(),
                acked.clone(),
                stop.clone(),
                next_user.clone(),
                publisher.clone(),
            );
            tasks.push(tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let n = next_user.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let (grant, email) = (format!("k{n}"), format!("k{n}@example.com"));
                    let t = now();
                    if !register(&http, &base, &acked, &grant, &email).await {
                        continue;
                    }
                    let msg = json!({"subject": {"format": "email", "email": email},
                        "level": "HIGH", "id": format!("score-{n}"), "event_time": t});
                    let published = publisher
                        .publish(TOPIC, Some(&email), msg.to_string().as_bytes())
                        .await;
                    if published.is_ok() {
                        acked.lock().unwrap().scored.push(grant);
                    }
                }
            }));
        }
        let wait = 300 + (rand::random::<u64>() % 900);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        if round < kills {
            // Before the kill: note what is revoked now; it must stay revoked.
            let sample: Vec<(String, String)> = acked.lock().unwrap().sets.clone();
            for (_, grant) in sample.iter().rev().take(20) {
                if status_of(&http, &base, grant).await.as_deref() == Some("revoked") {
                    seen_revoked.insert(grant.clone());
                }
            }
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        if round < kills {
            child = spawn(&config_path);
            ready(&http, &base).await;
            for grant in &seen_revoked {
                assert_eq!(
                    status_of(&http, &base, grant).await.as_deref(),
                    Some("revoked"),
                    "{grant} was revoked before a kill and must stay revoked"
                );
            }
        }
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(
        acked.sets.len() >= 50,
        "too little load to prove anything: {} SETs acknowledged",
        acked.sets.len()
    );
    // Every acknowledged SET was applied: its grant is revoked (waits, then fails naming the SET).
    for (jti, grant) in &acked.sets {
        let what = format!("acknowledged SET {jti} to be applied (grant {grant} revoked)");
        eventually_within(30, &what, || async {
            (status_of(&http, &base, grant).await.as_deref() == Some("revoked")).then_some(())
        })
        .await;
    }
    // Every SET Vigil acknowledged by poll was applied (and the rest is still delivered: the
    // transmitter redelivers what was not acknowledged).
    let poll_acked: HashSet<String> = idp.observed().acked.into_iter().collect();
    let mut polled_applied = 0;
    for (jti, grant) in &acked.queued {
        let what = format!("polled SET {jti} to be applied (grant {grant} revoked)");
        eventually_within(60, &what, || async {
            (status_of(&http, &base, grant).await.as_deref() == Some("revoked")).then_some(())
        })
        .await;
        polled_applied += usize::from(poll_acked.contains(jti));
    }
    // Every risk score the broker took was applied (after the last restart's group join).
    for grant in &acked.scored {
        let what = format!("the Kafka risk score for {grant} to be applied");
        eventually_within(60, &what, || async {
            (status_of(&http, &base, grant).await.as_deref() == Some("revoked")).then_some(())
        })
        .await;
    }
    // Every acknowledged grant still exists.
    for grant in &acked.grants {
        assert!(
            status_of(&http, &base, grant).await.is_some(),
            "{grant} lost"
        );
    }
    // Every revocation of an acknowledged SET reaches the enforcement point.
    // A Kafka signal's `jti` (the revocation's `txn`) is `id:` and the message id.
    let scored: Vec<String> = acked
        .scored
        .iter()
        .map(|g| format!("id:score-{}", &g[1..]))
        .collect();
    let expected: HashSet<&str> = acked
        .sets
        .iter()
        .map(|(j, _)| j.as_str())
        .chain(acked.queued.iter().map(|(j, _)| j.as_str()))
        .chain(scored.iter().map(String::as_str))
        .collect();
    let mut delivered: HashSet<String> = HashSet::new();
    let mut polled = Received::default();
    let mut ack: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !expected.iter().all(|j| delivered.contains(*j)) {
        assert!(
            Instant::now() < deadline,
            "undelivered revocations: {:?}",
            expected
                .iter()
                .filter(|j| !delivered.contains(**j))
                .take(10)
                .collect::<Vec<_>>()
        );
        let reply: Value = http
            .post(&poll_url)
            .bearer_auth(EP)
            .json(&json!({"ack": ack, "maxEvents": 500, "returnImmediately": true}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ack.clear();
        for (jti, set) in reply["sets"].as_object().unwrap() {
            ack.push(jti.clone());
            polled.record(set.as_str().unwrap());
            let payload = set.as_str().unwrap().split('.').nth(1).unwrap();
            let claims: Value = serde_json::from_slice(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(payload)
                    .unwrap(),
            )
            .unwrap();
            delivered.insert(claims["txn"].as_str().unwrap().to_owned());
        }
        if reply["sets"].as_object().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The same revocations reached the push and SSE subscriptions.
    for (method, received) in [("push", &pushed), ("SSE", &streamed)] {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let missing: Vec<&str> = {
                let r = received.lock().unwrap();
                expected
                    .iter()
                    .filter(|j| !r.txns.contains(**j))
                    .copied()
                    .collect()
            };
            if missing.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{method}: {} of {} revocations undelivered, among them {:?}",
                missing.len(),
                expected.len(),
                &missing[..missing.len().min(10)]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    sse_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sse_task.await.unwrap();
    // No decision was sent twice, by any method.
    for (method, twice) in [
        ("poll", polled.sent_twice().len()),
        ("push", pushed.lock().unwrap().sent_twice().len()),
        ("SSE", streamed.lock().unwrap().sent_twice().len()),
    ] {
        assert_eq!(twice, 0, "{method}: SETs whose decision was sent again");
    }
    // The audit trail lists each decision once.
    let ids = listed_ids(&http, &base, "limit=10000").await;
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(ids.len(), unique.len(), "a decision is listed twice");
    // And the log files themselves (what an auditor exports) hold each decision once.
    let in_files = audit_file_ids(&dir.path().join("data"));
    let unique_in_files: HashSet<&String> = in_files.iter().collect();
    assert_eq!(
        in_files.len(),
        unique_in_files.len(),
        "a decision is written twice in the audit files"
    );
    assert!(ids.len() >= expected.len(), "{} decisions", ids.len());
    eprintln!(
        "crash safety: {} decisions listed once each; SETs by poll {}, push {}, SSE {}, none sent twice",
        ids.len(),
        polled.tokens.len(),
        pushed.lock().unwrap().tokens.len(),
        streamed.lock().unwrap().tokens.len()
    );
    eprintln!(
        "crash safety: {} kills; {} grant registrations attempted, {} acknowledged; {} SETs acknowledged (202), \
         {} SETs queued at the polled transmitter ({} acknowledged by Vigil's poll before the end), \
         {} Kafka risk scores published, 0 lost; {} revocations delivered; \
         {} grants seen revoked before a kill stayed revoked",
        kills,
        acked.attempts,
        acked.grants.len(),
        acked.sets.len(),
        acked.queued.len(),
        polled_applied,
        acked.scored.len(),
        delivered.len(),
        seen_revoked.len()
    );
    // The intake log was pruned through the kills: once everything is processed and a second
    // old, only the newest segment is left of the hundreds written.
    let segments = || {
        std::fs::read_dir(dir.path().join("data/intake"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "log"))
            })
            .count()
    };
    eventually_within(30, "the processed intake log to be pruned", || async {
        (segments() <= 2).then_some(())
    })
    .await;
    let written = std::fs::read_dir(dir.path().join("data/intake"))
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            u64::from_str_radix(name.strip_suffix(".log")?, 16).ok()
        })
        .max()
        .unwrap_or(0);
    assert!(written > 10, "only {written} intake segments written");
    eprintln!("crash safety: {written} intake segments written and pruned through the kills");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Kafka replay after SIGKILL re-makes no decision: a user's risk flips between MEDIUM (step-up) and
/// LOW (allowed again) ten times, Vigil is killed before any checkpoint (so every message is
/// redelivered), restarted, and once the redelivered messages are applied (a last message of the
/// same user, on the same partition, is seen), the decisions are the ones made before the kill —
/// same ids, no new one listed or written to the audit files — the enforcement point got no SET
/// after the restart, and the grant is in the state it was in. Another user's HIGH score revoked
/// their grant before the kill (a revocation's context is not written with it: it waits for the
/// checkpoint); replayed, it revokes nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_replay_after_sigkill_makes_no_decision_again() {
    const FLIPS: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let kafka = mock_cluster(&[(TOPIC, 1), ("vigil.risk.dead-letter", 1)]).unwrap();
    let (mut config, base) = binary_config(
        dir.path(),
        vec![],
        kafka.bootstrap_servers(),
        "vigil-replay",
    );
    // No checkpoint before the kill: every message is redelivered after the restart.
    config.engine.checkpoint_interval_ms = 600_000;
    let publisher = Publisher::new(&kafka.bootstrap_servers()).unwrap();
    let (config_path, http) = write_config(dir.path(), &config);

    let mut child = spawn(&config_path);
    ready(&http, &base).await;
    let step_up = "https://schemas.openid.net/secevent/caep/event-type/assurance-level-change";
    let pushed = subscribe_push(&http, &base, step_up).await;
    let acked = Mutex::new(Acked::default());
    let email = "replay@example.com";
    assert!(register(&http, &base, &acked, "r1", email).await);
    let revoked_email = "replay-revoked@example.com";
    assert!(register(&http, &base, &acked, "r2", revoked_email).await);

    let t0 = now();
    let publish = |n: usize, level: &'static str| {
        let msg = json!({"subject": {"format": "email", "email": email},
            "level": level, "id": format!("flip-{n}"), "event_time": t0 + n as f64});
        let publisher = &publisher;
        async move {
            publisher
                .publish(TOPIC, Some(email), msg.to_string().as_bytes())
                .await
                .unwrap();
        }
    };
    for n in 0..FLIPS {
        let (level, status) = if n % 2 == 0 {
            ("MEDIUM", "step_up")
        } else {
            ("LOW", "active")
        };
        publish(n, level).await;
        let what = format!("flip {n} to make the grant {status}");
        eventually_within(30, &what, || async {
            (status_of(&http, &base, "r1").await.as_deref() == Some(status)).then_some(())
        })
        .await;
    }
    let high = json!({"subject": {"format": "email", "email": revoked_email},
        "level": "HIGH", "id": "revoking", "event_time": t0});
    publisher
        .publish(TOPIC, Some(revoked_email), high.to_string().as_bytes())
        .await
        .unwrap();
    eventually_within(30, "the HIGH score to revoke r2", || async {
        (status_of(&http, &base, "r2").await.as_deref() == Some("revoked")).then_some(())
    })
    .await;
    let steps_up = FLIPS / 2;
    let what = "the step-up SETs to reach the enforcement point";
    eventually_within(30, what, || async {
        (pushed.lock().unwrap().tokens.len() == steps_up).then_some(())
    })
    .await;
    let decision_ids = || listed_ids(&http, &base, "grant=r1&limit=10000");
    let before: BTreeSet<String> = decision_ids().await.into_iter().collect();
    // Registration (allowed: no decision) and one per flip.
    assert_eq!(before.len(), FLIPS, "decisions before the kill: {before:?}");
    let revoked_ids = || listed_ids(&http, &base, "grant=r2&limit=10000");
    let revocation: BTreeSet<String> = revoked_ids().await.into_iter().collect();
    assert_eq!(revocation.len(), 1, "the revocation: {revocation:?}");

    child.kill().unwrap(); // SIGKILL, long before the checkpoint
    child.wait().unwrap();
    child = spawn(&config_path);
    ready(&http, &base).await;
    // One more message of the same user, on the same partition: seen once everything before it
    // has been applied again. LOW again: it changes no grant.
    publish(FLIPS, "LOW").await;
    let sentinel = format!("id:flip-{FLIPS}");
    eventually_within(60, "the redelivered messages to be applied", || async {
        let r = http
            .get(format!("{base}/v1/subjects/email:{email}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .ok()?;
        let v: Value = r.json().await.ok()?;
        v["recent_signals"]
            .as_array()?
            .iter()
            .any(|s| s["jti"] == sentinel.as_str())
            .then_some(())
    })
    .await;
    assert_eq!(
        status_of(&http, &base, "r1").await.as_deref(),
        Some("active"),
        "the grant's state after replay"
    );
    let after: BTreeSet<String> = decision_ids().await.into_iter().collect();
    assert_eq!(after, before, "replay made decisions again");
    assert_eq!(
        status_of(&http, &base, "r2").await.as_deref(),
        Some("revoked"),
        "the revoked grant after replay"
    );
    let revocation_after: BTreeSet<String> = revoked_ids().await.into_iter().collect();
    assert_eq!(revocation_after, revocation, "replay revoked again");
    let in_files = audit_file_ids(&dir.path().join("data"));
    assert_eq!(
        in_files.len(),
        FLIPS + 1,
        "decisions written to the audit files: {in_files:?}"
    );
    // Give a re-made decision's SET time to arrive, then check none did.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = pushed.lock().unwrap();
    assert_eq!(received.tokens.len(), steps_up, "SETs after the restart");
    assert!(received.sent_twice().is_empty(), "a decision sent again");
    drop(received);
    eprintln!(
        "kafka replay: {FLIPS} decisions before SIGKILL, the same {} after replay, {steps_up} SETs",
        after.len()
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
