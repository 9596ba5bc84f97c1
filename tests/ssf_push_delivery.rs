//! RFC 8935 push delivery to an enforcement point that verifies Vigil's SETs with Vigil's JWKS:
//! retries through errors, keeps order, survives an outage and a Vigil restart, dead-letters what the
//! receiver rejects, and replays dead letters on request.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use common::*;
use serde_json::{json, Value};
use vigil::config::EnforcementPointConfig;
use vigil::jose::Alg;
use vigil::sim::jose::PublishedKeys;

const ISS: &str = "https://idp.example.com/123456789/";
const AUD: &str = "https://sp.example.com/caep";
const EP_TOKEN: &str = "gateway-token-0123456789";
const PUSH_SECRET: &str = "Bearer vigil-to-gateway-secret";

/// A minimal SSF push receiver: checks the credential, verifies each SET with Vigil's JWKS, and
/// answers as `script` says (then 202 once the script runs out; a scripted body's `retry_after`
/// becomes a `Retry-After` header).
#[derive(Default)]
struct Receiver {
    jwks: Mutex<Option<PublishedKeys>>,
    script: Mutex<Vec<(u16, Value)>>,
    received: Mutex<Vec<Value>>,
    /// Every request, whatever the answer.
    attempts: std::sync::atomic::AtomicUsize,
}

impl Receiver {
    fn attempts(&self) -> usize {
        self.attempts.load(std::sync::atomic::Ordering::SeqCst)
    }
}

async fn receive(
    State(r): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    r.attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    answer(&r, &headers, body).await
}

async fn answer(r: &Receiver, headers: &HeaderMap, body: Bytes) -> axum::response::Response {
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(PUSH_SECRET) {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"err": "authentication_failed", "description": "bad credential"})),
        )
            .into_response();
    }
    if let Some((status, body)) = {
        let mut s = r.script.lock().unwrap();
        (!s.is_empty()).then(|| s.remove(0))
    } {
        if status == 0 {
            // Hang past Vigil's push timeout: the attempt times out and is retried.
            tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
            return (StatusCode::ACCEPTED, axum::Json(Value::Null)).into_response();
        }
        let mut reply = (
            StatusCode::from_u16(status).unwrap(),
            axum::Json(body.clone()),
        )
            .into_response();
        if let Some(secs) = body.get("retry_after") {
            reply
                .headers_mut()
                .insert("retry-after", secs.to_string().parse().unwrap());
        }
        return reply;
    }
    let token = String::from_utf8(body.to_vec()).unwrap();
    let verified = r
        .jwks
        .lock()
        .unwrap()
        .as_ref()
        .and_then(|k| k.verify(&token).ok());
    let Some(claims) = verified else {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"err": "invalid_key", "description": "signature"})),
        )
            .into_response();
    };
    r.received.lock().unwrap().push(claims);
    (StatusCode::ACCEPTED, axum::Json(Value::Null)).into_response()
}

async fn serve_receiver(
    r: Arc<Receiver>,
    addr: SocketAddr,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let app = axum::Router::new()
        .route("/events", axum::routing::post(receive))
        .with_state(r);
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    (
        addr,
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() }),
    )
}

async fn load_jwks(r: &Receiver, vigil: &vigil::Vigil) {
    let issuer = format!("http://{}", vigil.local_addr());
    let keys = vigil::sim::ep::vigil_keys(&reqwest::Client::new(), &issuer)
        .await
        .unwrap();
    *r.jwks.lock().unwrap() = Some(keys);
}

fn now() -> f64 {
    vigil::signal::now_ms() as f64 / 1000.0
}

async fn revoke(tx: &Transmitter, vigil: &vigil::Vigil, user: &str, jti: &str) {
    let claims = json!({"iss": ISS, "aud": AUD, "jti": jti, "iat": now() as i64,
        "sub_id": {"format": "email", "email": user},
        "events": {"https://schemas.openid.net/secevent/risc/event-type/account-disabled": {}}});
    assert_eq!(
        push(vigil, "idp", &tx.key(Alg::RS256).sign_set(&claims).unwrap())
            .await
            .status,
        202
    );
}

async fn register(vigil: &vigil::Vigil, id: &str, user: &str) {
    let t = now();
    let g = json!({"id": id, "kind": "session", "subject": {"format": "email", "email": user},
        "issued_at": t - 60.0, "expires_at": t + 3600.0, "enforcement_points": ["gateway"]});
    assert_eq!(post_json(vigil, "/v1/grants", &g).await.0, 201);
}

/// The gateway's push stream to the receiver at `ep_addr`.
async fn create_push_stream(vigil: &vigil::Vigil, ep_addr: SocketAddr) {
    let stream = json!({"delivery": {"method": "urn:ietf:rfc:8935", "endpoint_url": format!("http://{ep_addr}/events"),
        "authorization_header": PUSH_SECRET}});
    let resp = reqwest::Client::new()
        .post(format!("http://{}/ssf/streams", vigil.local_addr()))
        .bearer_auth(EP_TOKEN)
        .json(&stream)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
}

/// Vigil with `tx` as transmitter `idp`, the `gateway` enforcement point, the delivery settings
/// `delivery` sets, and a manual clock the test moves.
async fn start_on_manual_clock(
    tx: &Transmitter,
    dir: &std::path::Path,
    delivery: impl FnOnce(&mut vigil::config::DeliveryConfig),
) -> (vigil::Vigil, vigil::clock::Clock) {
    let mut config = test_config(dir, vec![tx.config("idp", ISS, &[AUD])]);
    config.enforcement_points = vec![enforcement_point("gateway", EP_TOKEN)];
    delivery(&mut config.delivery);
    let clock = vigil::clock::Clock::manual(vigil::signal::now_ms());
    let vigil = vigil::Vigil::start_with_clock(config, clock.clone())
        .await
        .unwrap();
    (vigil, clock)
}

fn txns(r: &Receiver) -> Vec<String> {
    r.received
        .lock()
        .unwrap()
        .iter()
        .map(|c| c["txn"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_are_pushed_in_order_through_errors_outages_and_a_restart() {
    let tx = Transmitter::start(&[Alg::RS256]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), vec![tx.config("idp", ISS, &[AUD])]);
    config.enforcement_points = vec![EnforcementPointConfig {
        name: "gateway".into(),
        token: EP_TOKEN.into(),
        audience: None,
        signing_alg: None,
    }];
    config.delivery.initial_backoff_ms = 20;
    config.delivery.max_backoff_secs = 1;
    config.delivery.push_timeout_ms = 1000;
    let vigil = start(config.clone()).await;

    let receiver = Arc::new(Receiver::default());
    // A 500, a 503, then an attempt that times out (status 0 = hang past the push timeout).
    *receiver.script.lock().unwrap() =
        vec![(500, Value::Null), (503, Value::Null), (0, Value::Null)];
    let (ep_addr, ep_task) = serve_receiver(receiver.clone(), "127.0.0.1:0".parse().unwrap()).await;
    load_jwks(&receiver, &vigil).await;
    create_push_stream(&vigil, ep_addr).await;

    for i in 0..3 {
        register(&vigil, &format!("g{i}"), &format!("u{i}@example.com")).await;
    }
    for i in 0..3 {
        revoke(
            &tx,
            &vigil,
            &format!("u{i}@example.com"),
            &format!("dis-{i}"),
        )
        .await;
    }
    eventually(
        "three revocations delivered after the 500 and the 503",
        || async { (receiver.received.lock().unwrap().len() == 3).then_some(()) },
    )
    .await;
    assert_eq!(txns(&receiver), vec!["dis-0", "dis-1", "dis-2"], "in order");
    for claims in receiver.received.lock().unwrap().iter() {
        assert!(claims["events"]
            ["https://schemas.openid.net/secevent/caep/event-type/session-revoked"]
            .is_object());
    }

    // Outage: the receiver goes away, a revocation is decided, and Vigil restarts meanwhile.
    ep_task.abort();
    let _ = ep_task.await;
    register(&vigil, "g3", "u3@example.com").await;
    revoke(&tx, &vigil, "u3@example.com", "dis-3").await;
    eventually("g3 revoked", || async {
        let (_, g) = get_json(&vigil, "/v1/grants/g3").await;
        (g["status"] == "revoked").then_some(())
    })
    .await;
    vigil.shutdown().await;
    let vigil = start(config.clone()).await;
    let (_, ep_task) = serve_receiver(receiver.clone(), ep_addr).await;
    load_jwks(&receiver, &vigil).await;
    eventually("the revocation decided during the outage", || async {
        (receiver.received.lock().unwrap().len() == 4).then_some(())
    })
    .await;
    assert_eq!(txns(&receiver).last().unwrap(), "dis-3");

    // A rejection is final: dead-lettered, listed, and replayed on request.
    *receiver.script.lock().unwrap() = vec![(
        400,
        json!({"err": "invalid_request", "description": "not today"}),
    )];
    register(&vigil, "g4", "u4@example.com").await;
    revoke(&tx, &vigil, "u4@example.com", "dis-4").await;
    let dead = eventually("a dead letter", || async {
        let (_, d) = get_json(&vigil, "/v1/deadletters").await;
        (d["dead_letters"].as_array().unwrap().len() == 1).then_some(d)
    })
    .await;
    assert!(
        dead["dead_letters"][0]["error"]
            .as_str()
            .unwrap()
            .contains("invalid_request"),
        "{dead}"
    );
    let (code, replayed) = post_json(&vigil, "/v1/deadletters/replay", &json!({})).await;
    assert_eq!(code, 200, "{replayed}");
    assert_eq!(
        replayed,
        json!({"replayed": 1, "skipped": 0, "deferred": 0})
    );
    eventually("the replayed SET delivered", || async {
        (receiver.received.lock().unwrap().len() == 5).then_some(())
    })
    .await;
    assert_eq!(txns(&receiver).last().unwrap(), "dis-4");
    assert_eq!(
        get_json(&vigil, "/v1/deadletters").await.1["dead_letters"],
        json!([])
    );
    ep_task.abort();
    vigil.shutdown().await;
}

/// Retry waits and the dead-letter deadline run on Vigil's injected clock: with the clock standing
/// still no retry is made, however long in real time; moved past a backoff, a `Retry-After` or
/// `dead_letter_after`, the worker retries, delivers or dead-letters at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_dead_letters_follow_the_injected_clock() {
    use std::time::Duration;
    let tx = Transmitter::start(&[Alg::RS256]).await;
    let dir = tempfile::tempdir().unwrap();
    let (vigil, clock) = start_on_manual_clock(&tx, dir.path(), |d| {
        d.initial_backoff_ms = 10_000;
        d.max_backoff_secs = 60;
        d.dead_letter_after_secs = 300;
    })
    .await;
    let receiver = Arc::new(Receiver::default());
    *receiver.script.lock().unwrap() = vec![(500, Value::Null), (503, json!({"retry_after": 30}))];
    let (ep_addr, ep_task) = serve_receiver(receiver.clone(), "127.0.0.1:0".parse().unwrap()).await;
    load_jwks(&receiver, &vigil).await;
    create_push_stream(&vigil, ep_addr).await;
    register(&vigil, "g0", "u0@example.com").await;
    revoke(&tx, &vigil, "u0@example.com", "dis-0").await;

    // Moves the clock once the delivery worker waits on it (moved earlier, its wait would start
    // from the time moved to).
    let advance = |by: Duration| {
        let clock = clock.clone();
        async move {
            eventually("the delivery worker waiting on the clock", || async {
                (clock.sleepers() == 1).then_some(())
            })
            .await;
            clock.advance(by);
        }
    };
    let stands_still = |n: usize, what: &'static str| {
        let receiver = receiver.clone();
        async move {
            // Real time passes; the clock does not: no attempt may be made.
            tokio::time::sleep(Duration::from_millis(700)).await;
            assert_eq!(receiver.attempts(), n, "{what}");
        }
    };
    eventually("the first attempt (500)", || async {
        (receiver.attempts() == 1).then_some(())
    })
    .await;
    stands_still(1, "retried before the clock reached the backoff").await;
    // The first retry waits 2 × initial_backoff (+ < 100 ms of jitter).
    advance(Duration::from_millis(19_000)).await;
    stands_still(1, "retried a second before the backoff ended").await;
    advance(Duration::from_millis(1_100)).await;
    eventually(
        "the retry after the backoff (503, Retry-After: 30)",
        || async { (receiver.attempts() == 2).then_some(()) },
    )
    .await;
    advance(Duration::from_secs(29)).await;
    stands_still(2, "retried before the Retry-After").await;
    advance(Duration::from_secs(1)).await;
    eventually("delivered once the Retry-After passed", || async {
        (receiver.received.lock().unwrap().len() == 1).then_some(())
    })
    .await;
    assert_eq!(txns(&receiver), vec!["dis-0"]);

    // An enforcement point that only ever answers 503: the SET is dead-lettered at the first
    // attempt after `dead_letter_after` by the clock, not before. (Three attempts so far: 500,
    // 503, and the delivery.)
    *receiver.script.lock().unwrap() = vec![(503, json!({"retry_after": 60})); 100];
    register(&vigil, "g1", "u1@example.com").await;
    revoke(&tx, &vigil, "u1@example.com", "dis-1").await;
    eventually("the first attempt at the second SET", || async {
        (receiver.attempts() == 4).then_some(())
    })
    .await;
    for step in 0..4 {
        advance(Duration::from_secs(60)).await;
        eventually("a retry a Retry-After later", || async {
            let n = receiver.attempts();
            assert!(n <= 5 + step, "{n} attempts after {} advances", step + 1);
            (n == 5 + step).then_some(())
        })
        .await;
    }
    assert_eq!(
        get_json(&vigil, "/v1/deadletters").await.1["dead_letters"],
        json!([]),
        "dead-lettered 240 s after it was queued"
    );
    advance(Duration::from_secs(60)).await;
    let dead = eventually("dead-lettered 300 s after it was queued", || async {
        let (_, d) = get_json(&vigil, "/v1/deadletters").await;
        (d["dead_letters"].as_array().unwrap().len() == 1).then_some(d)
    })
    .await;
    let error = dead["dead_letters"][0]["error"].as_str().unwrap();
    assert!(error.starts_with("undelivered after 300s"), "{error}");
    assert_eq!(receiver.received.lock().unwrap().len(), 1);
    ep_task.abort();
    vigil.shutdown().await;
}

/// What waits for an enforcement point is bounded: a poll stream's outbox keeps at most
/// `max_outbox_per_stream` SETs (the oldest go to the dead letters); a stream nobody reads for
/// `unread_pause_after_secs` is paused, with a stream-updated SET queued; SETs older than
/// `dead_letter_after_secs` leave even a paused stream's outbox; a replay puts back no more than
/// the outbox's bound, and what it puts back waits from the replay; dead letters go after
/// `dead_letter_retention_secs`. Ages follow the injected clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_poll_stream_is_paused_and_its_backlog_bounded() {
    let tx = Transmitter::start(&[Alg::RS256]).await;
    let dir = tempfile::tempdir().unwrap();
    let (vigil, clock) = start_on_manual_clock(&tx, dir.path(), |d| {
        d.outbox_sweep_secs = 1;
        d.max_outbox_per_stream = 3;
        d.unread_pause_after_secs = 600;
        d.dead_letter_after_secs = 3600;
        d.dead_letter_retention_secs = 7200;
    })
    .await;
    let base = format!("http://{}", vigil.local_addr());
    let http = reqwest::Client::new();
    let poll_url = create_poll_stream(&http, &base, EP_TOKEN).await;
    let stream_id = poll_url.rsplit('/').next().unwrap().to_owned();
    for i in 0..5 {
        register(&vigil, &format!("g{i}"), &format!("u{i}@example.com")).await;
        revoke(
            &tx,
            &vigil,
            &format!("u{i}@example.com"),
            &format!("dis-{i}"),
        )
        .await;
    }
    let dead = || async {
        let (_, v) = get_json(&vigil, "/v1/deadletters").await;
        v["dead_letters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["error"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    // Five revocations queued; the cap keeps three.
    eventually(
        "the two oldest SETs moved out of the capped outbox",
        || async {
            let d = dead().await;
            (d.len() == 2).then_some(d)
        },
    )
    .await
    .iter()
    .for_each(|e| assert!(e.contains("max_outbox_per_stream"), "{e}"));
    let polled = poll(
        &http,
        &poll_url,
        EP_TOKEN,
        &json!({"maxEvents": 10, "returnImmediately": true}),
    )
    .await;
    assert_eq!(polled["sets"].as_object().unwrap().len(), 3);
    let status = || async {
        let v: Value = http
            .get(format!("{base}/ssf/status?stream_id={stream_id}"))
            .bearer_auth(EP_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["status"].as_str().unwrap().to_owned()
    };
    // Read just now: not paused. Unread for ten minutes with SETs waiting: paused.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(status().await, "enabled");
    // Half-way, an operator looks at the delivery state: a look is not a read, so the stream is
    // still paused ten minutes after its receiver last read it.
    clock.advance(std::time::Duration::from_secs(300));
    let (code, points) = get_json(&vigil, "/v1/enforcement-points").await;
    assert_eq!(code, 200, "{points}");
    let listed = points["enforcement_points"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["streams"].as_array().unwrap())
        .find(|s| s["stream_id"] == stream_id.as_str())
        .unwrap()
        .clone();
    assert_eq!(
        (&listed["outstanding"], &listed["outstanding_more"]),
        (&json!(3), &json!(false)),
        "{listed}"
    );
    clock.advance(std::time::Duration::from_secs(301));
    eventually("the unread stream to be paused", || async {
        (status().await == "paused").then_some(())
    })
    .await;
    // An hour on, its SETs (the stream-updated one queued at the pause too) are dead letters.
    clock.advance(std::time::Duration::from_secs(3601));
    eventually("the paused stream's old SETs dead-lettered", || async {
        let d = dead().await;
        (d.len() == 6).then_some(())
    })
    .await;
    // The listing is bounded: the oldest `limit`, and how many there are in all.
    let (code, page) = get_json(&vigil, "/v1/deadletters?limit=2").await;
    assert_eq!(code, 200, "{page}");
    assert_eq!(page["total"], 6);
    let listed = page["dead_letters"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed[0]["dead_at_ms"].as_i64() <= listed[1]["dead_at_ms"].as_i64());
    assert!(listed.iter().all(|d| d["error"]
        .as_str()
        .unwrap()
        .contains("max_outbox_per_stream")));
    // Page by page from the cursor each answer gives: all six once, in order.
    let mut paged: Vec<Value> = listed.clone();
    let mut next = page["next"].as_str().map(str::to_owned);
    while let Some(cursor) = next {
        let (code, page) =
            get_json(&vigil, &format!("/v1/deadletters?limit=2&after={cursor}")).await;
        assert_eq!((code, &page["total"]), (200, &json!(6)), "{page}");
        paged.extend(page["dead_letters"].as_array().unwrap().iter().cloned());
        next = page["next"].as_str().map(str::to_owned);
    }
    assert_eq!(paged.len(), 6);
    let jtis: std::collections::HashSet<&str> = paged
        .iter()
        .map(|d| d["outgoing"]["jti"].as_str().unwrap())
        .collect();
    assert_eq!(jtis.len(), 6);
    assert!(paged
        .windows(2)
        .all(|w| w[0]["dead_at_ms"].as_i64() <= w[1]["dead_at_ms"].as_i64()));
    let (code, page) = get_json(&vigil, &format!("/v1/deadletters?stream_id={stream_id}")).await;
    assert_eq!(
        (code, &page["total"], &page["next"]),
        (200, &json!(6), &Value::Null)
    );
    let (code, page) = get_json(&vigil, "/v1/deadletters?stream_id=no-such-stream").await;
    assert_eq!((code, &page["total"]), (200, &json!(0)), "{page}");
    for bad in ["lmit=2", "after=not-a-cursor"] {
        let (code, body) = get_json(&vigil, &format!("/v1/deadletters?{bad}")).await;
        assert_eq!(code, 400, "{bad}: {body}");
    }
    // A replay fills the (paused) stream's outbox up to its bound of three, oldest first; the
    // rest wait in the dead letters.
    let (code, replayed) = post_json(&vigil, "/v1/deadletters/replay", &json!({})).await;
    assert_eq!(code, 200, "{replayed}");
    assert_eq!(
        replayed,
        json!({"replayed": 3, "skipped": 0, "deferred": 3})
    );
    let back: Vec<&str> = paged[..3]
        .iter()
        .map(|d| d["outgoing"]["jti"].as_str().unwrap())
        .collect();
    let (_, left) = get_json(&vigil, "/v1/deadletters").await;
    let left_jtis = |page: &Value| -> Vec<String> {
        page["dead_letters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["outgoing"]["jti"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(left_jtis(&left).iter().all(|j| !back.contains(&j.as_str())));
    // The three put back were queued over an hour ago, yet wait from their replay: half an hour
    // on, sweeps leave them where they are.
    clock.advance(std::time::Duration::from_secs(1800));
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(dead().await.len(), 3, "replayed SETs swept back as too old");
    let (code, replayed) = post_json(&vigil, "/v1/deadletters/replay", &json!({})).await;
    assert_eq!(
        (code, replayed),
        (200, json!({"replayed": 0, "skipped": 0, "deferred": 3})),
        "the outbox is full"
    );
    // Two hours later the deferred letters are past their retention and dropped, and the three
    // replayed ones — unread for over an hour since their replay — are dead letters again.
    clock.advance(std::time::Duration::from_secs(7201));
    eventually(
        "the replayed SETs dead again, the others dropped",
        || async {
            let (_, page) = get_json(&vigil, "/v1/deadletters").await;
            let mut jtis = left_jtis(&page);
            jtis.sort();
            let mut want: Vec<String> = back.iter().map(|j| (*j).to_owned()).collect();
            want.sort();
            (jtis == want).then_some(())
        },
    )
    .await;
    // And two hours after that, the dead letters are gone.
    clock.advance(std::time::Duration::from_secs(7201));
    eventually("old dead letters dropped", || async {
        dead().await.is_empty().then_some(())
    })
    .await;
    vigil.shutdown().await;
}
