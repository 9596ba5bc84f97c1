//! The Kafka risk-signal source against a real Kafka-protocol broker: librdkafka's in-process mock
//! cluster on loopback (producers, consumer groups, offset commits and rebalances all real).
//! Group joins take a few seconds on the mock, so these tests wait up to 30 s per step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use serde_json::{json, Value};
use vigil::config::{Config, EnforcementPointConfig};
use vigil::events::EventKind;
use vigil::sim::ep::{subscribe, Method};
use vigil::sim::risk::{fraud_engine_mapping, message, mock_cluster, Pattern, Publisher};
use vigil::Vigil;

const NATIVE: &str = "vigil.risk";
const FRAUD: &str = "fraud.scores";
const DLQ: &str = "vigil.risk.dead-letter";

fn now() -> f64 {
    vigil::signal::now_ms() as f64 / 1000.0
}

fn cluster(partitions: i32) -> MockCluster<'static, DefaultProducerContext> {
    mock_cluster(&[(NATIVE, partitions), (FRAUD, 1), (DLQ, 1)]).unwrap()
}

fn kafka_config(dir: &std::path::Path, brokers: &str) -> Config {
    let mut config = test_config(dir, Vec::new());
    config.kafka.brokers = brokers.to_owned();
    config.kafka.group_id = "vigil-test".into();
    config.kafka.topics = vec![NATIVE.into(), FRAUD.into()];
    config.kafka.mappings = vec![fraud_engine_mapping(FRAUD)];
    // Faster group membership on the mock broker.
    for (k, v) in [
        ("heartbeat_interval_ms", "300"),
        ("session_timeout_ms", "6000"),
    ] {
        config.kafka.properties.insert(k.into(), v.into());
    }
    config.validate().unwrap();
    config
}

/// How often the message `id` was applied to `email`'s context, and whether the last application
/// changed it (from the context's recent signals, newest first).
fn applications(vigil: &Vigil, email: &str, id: &str) -> (usize, Option<bool>) {
    let Some(why) = vigil.engine().explain(&format!("email:{email}")) else {
        return (0, None);
    };
    let jti = format!("id:{id}");
    let hits: Vec<&Value> = why["recent_signals"]
        .as_array()
        .map(|a| a.iter().filter(|s| s["jti"] == jti.as_str()).collect())
        .unwrap_or_default();
    (
        hits.len(),
        hits.first().and_then(|s| s["changed"].as_bool()),
    )
}

fn applied(vigil: &Vigil, email: &str, id: &str) -> bool {
    applications(vigil, email, id).0 > 0
}

fn context_version(vigil: &Vigil, email: &str) -> u64 {
    vigil
        .engine()
        .explain(&format!("email:{email}"))
        .and_then(|why| why["context"]["version"].as_u64())
        .unwrap_or(0)
}

async fn register(vigil: &Vigil, id: &str, email: &str) {
    let t = now();
    let grant = json!({"id": id, "kind": "session", "subject": {"format": "email", "email": email},
        "session": format!("s-{id}"), "issued_at": t - 60.0, "expires_at": t + 3600.0});
    assert_eq!(post_json(vigil, "/v1/grants", &grant).await.0, 201);
}

async fn grant_status(vigil: &Vigil, id: &str) -> String {
    let (_, g) = get_json(vigil, &format!("/v1/grants/{id}")).await;
    g["status"].as_str().unwrap_or_default().to_owned()
}

/// Publishes a native risk message about `email`, timed now, to the `vigil.risk` topic.
async fn publish_native(publisher: &Publisher, email: &str, level: &str, id: &str) {
    publisher
        .publish(NATIVE, None, &native(email, level, id, now()))
        .await
        .unwrap();
}

fn native(email: &str, level: &str, id: &str, event_time: f64) -> Vec<u8> {
    json!({"subject": {"format": "email", "email": email}, "level": level, "source": "ueba",
        "event_time": event_time, "id": id, "reason": "impossible travel"})
    .to_string()
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_risk_score_revokes_and_the_revocation_reaches_a_subscribed_enforcement_point() {
    let kafka = cluster(2);
    let dir = tempfile::tempdir().unwrap();
    let mut config = kafka_config(dir.path(), &kafka.bootstrap_servers());
    config.enforcement_points.push(EnforcementPointConfig {
        name: "gw".into(),
        token: "gateway-token-0123456789".into(),
        audience: None,
        signing_alg: None,
    });
    let vigil = start(config).await;
    let issuer = format!("http://{}", vigil.local_addr());
    let mut ep = subscribe(
        &issuer,
        "gateway-token-0123456789",
        "gw",
        Method::Push,
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    register(&vigil, "g-native", "native@example.com").await;
    register(&vigil, "g-foreign", "foreign@example.com").await;
    register(&vigil, "g-bystander", "bystander@example.com").await;

    let publisher = Publisher::new(&kafka.bootstrap_servers()).unwrap();
    // Native format: HIGH revokes.
    publisher
        .publish(
            NATIVE,
            Some("native@example.com"),
            &native("native@example.com", "HIGH", "n-1", now()),
        )
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(30), ep.received.recv())
        .await
        .expect("no revocation reached the enforcement point")
        .unwrap();
    assert_eq!(
        got.event_type(),
        Some(EventKind::SessionRevoked.uri().as_str())
    );
    let sub = got.subject();
    assert_eq!(
        sub["session"],
        json!({"format": "opaque", "id": "s-g-native"})
    );
    assert_eq!(grant_status(&vigil, "g-native").await, "revoked");

    // A foreign format through its mapping: the fraud engine's "critical" band is HIGH.
    let mut m = message(Pattern::Climb, 9, 1, now());
    m.email = "foreign@example.com".into();
    m.id = "f-1".into();
    publisher
        .publish(FRAUD, Some(m.key()), m.foreign().to_string().as_bytes())
        .await
        .unwrap();
    eventually_within(30, "the mapped signal's revocation", || async {
        (grant_status(&vigil, "g-foreign").await == "revoked").then_some(())
    })
    .await;
    let got = tokio::time::timeout(Duration::from_secs(10), ep.received.recv())
        .await
        .unwrap()
        .unwrap();
    let sub = got.subject();
    assert_eq!(
        sub["session"],
        json!({"format": "opaque", "id": "s-g-foreign"})
    );

    // The context shows the feed's facts, and the audit trail names the rule and the source.
    let (_, subject) = get_json(&vigil, "/v1/subjects/email:foreign@example.com").await;
    let text = subject.to_string();
    assert!(text.contains("feed:fraud-engine"), "{text}");
    assert!(
        text.contains("\"DE\""),
        "mapped attribute in the context: {text}"
    );
    let (_, decisions) = get_json(&vigil, "/v1/decisions?grant=g-native").await;
    let d = &decisions["decisions"][0];
    assert_eq!(d["effect"], "revoke");
    assert_eq!(d["rules"], json!(["risk-high"]));
    assert_eq!(grant_status(&vigil, "g-bystander").await, "active");

    // The consumer counts a batch applied when it sees the engine's commit (it may see it after
    // the enforcement point got the SET).
    for line in [
        "vigil_kafka_consumed_total{topic=\"vigil.risk\"}",
        "vigil_kafka_applied_total{topic=\"fraud.scores\"}",
    ] {
        eventually_within(10, line, || async {
            get(&vigil, "/metrics").await.1.contains(line).then_some(())
        })
        .await;
    }
    drop(ep);
    vigil.shutdown().await;
}

/// Reads every message of the dead-letter topic available within `secs`.
fn dead_letters(brokers: &str, expected: usize) -> Vec<(String, Value)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "dlq-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[DLQ]).unwrap();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while out.len() < expected && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let headers: serde_json::Map<String, Value> = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            let v = String::from_utf8_lossy(h.value.unwrap_or_default());
                            (h.key.to_owned(), Value::String(v.into_owned()))
                        })
                        .collect()
                })
                .unwrap_or_default();
            // A message without a value (a tombstone) reads as `<null>`, an empty one as "".
            let payload = m.payload().map_or_else(
                || "<null>".to_owned(),
                |p| String::from_utf8_lossy(p).into_owned(),
            );
            out.push((payload, Value::Object(headers)));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_go_to_the_dead_letter_topic_and_the_partition_keeps_flowing() {
    let kafka = cluster(1);
    let dir = tempfile::tempdir().unwrap();
    let vigil = start(kafka_config(dir.path(), &kafka.bootstrap_servers())).await;
    register(&vigil, "g-after", "after@example.com").await;
    let publisher = Publisher::new(&kafka.bootstrap_servers()).unwrap();
    let bad: [(&str, &[u8]); 4] = [
        (NATIVE, b"{not json"),
        (NATIVE, br#"{"level": "HIGH", "id": "no-subject"}"#),
        (NATIVE, br#"{"subject": "u-1", "level": "SEVERE"}"#),
        // The mapped topic: no band where the mapping looks.
        (
            FRAUD,
            br#"{"user": {"mail": "x@example.com"}, "eventId": "f-bad"}"#,
        ),
    ];
    for (topic, payload) in bad {
        publisher.publish(topic, Some("k"), payload).await.unwrap();
    }
    // A tombstone (no value): dead-lettered as a tombstone, not as an empty message.
    publisher.publish_tombstone(NATIVE, "gone").await.unwrap();
    // Behind the bad ones on the same partition: a good message still applies.
    publish_native(&publisher, "after@example.com", "HIGH", "good-1").await;
    eventually_within(30, "the good message behind the bad ones", || async {
        (grant_status(&vigil, "g-after").await == "revoked").then_some(())
    })
    .await;

    let brokers = kafka.bootstrap_servers();
    let letters = tokio::task::spawn_blocking(move || dead_letters(&brokers, 5))
        .await
        .unwrap();
    assert_eq!(letters.len(), 5, "{letters:?}");
    assert!(
        letters.iter().any(|(p, _)| p == "<null>"),
        "the tombstone's copy has no value: {letters:?}"
    );
    // Across topics the order is not defined; each bad message appears once, unchanged.
    for (topic, payload) in bad {
        let (_, headers) = letters
            .iter()
            .find(|(got, _)| got.as_bytes() == payload)
            .unwrap_or_else(|| panic!("{} not dead-lettered", String::from_utf8_lossy(payload)));
        assert_eq!(headers["vigil-topic"], *topic);
        assert!(
            !headers["vigil-error"].as_str().unwrap().is_empty(),
            "{headers}"
        );
        assert!(headers.get("vigil-offset").is_some());
    }
    let error_of = |payload: &str| {
        letters.iter().find(|(p, _)| p == payload).unwrap().1["vigil-error"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(error_of("{not json").contains("not a JSON object"));
    assert!(error_of(r#"{"level": "HIGH", "id": "no-subject"}"#).contains("subject"));
    assert!(vigil::kafka::stored_dead_letters(&open_store(&vigil))
        .unwrap()
        .is_empty());
    let (_, metrics) = get(&vigil, "/metrics").await;
    assert!(
        metrics.contains("vigil_kafka_dead_lettered_total{topic=\"vigil.risk\"} 4"),
        "{metrics}"
    );
    vigil.shutdown().await;
}

fn open_store(vigil: &Vigil) -> std::sync::Arc<redb::Database> {
    vigil.store().clone()
}

/// A mock cluster with `topics` (one partition each) whose dead-letter topic refuses every
/// message, and a configuration reading those topics in the native format.
fn refusing_dead_letter_topic(
    topics: &[&'static str],
    dir: &std::path::Path,
) -> (MockCluster<'static, DefaultProducerContext>, Config) {
    // No dead-letter topic exists and the mock broker does not create topics on produce.
    let partitions: Vec<(&str, i32)> = topics.iter().map(|t| (*t, 1)).collect();
    let kafka = mock_cluster(&partitions).unwrap();
    kafka
        .topic_error(
            DLQ,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
        )
        .unwrap();
    let mut config = kafka_config(dir, &kafka.bootstrap_servers());
    config.kafka.topics = topics.iter().map(|t| (*t).to_owned()).collect();
    config.kafka.mappings.clear();
    (kafka, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_topic_that_refuses_keeps_the_dead_letter_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let (kafka, config) = refusing_dead_letter_topic(&[NATIVE], dir.path());
    let vigil = start(config).await;
    let publisher = Publisher::new(&kafka.bootstrap_servers()).unwrap();
    publisher.publish(NATIVE, None, b"garbage").await.unwrap();
    publish_native(&publisher, "ok@example.com", "LOW", "ok-1").await;
    eventually_within(40, "the message behind the refused dead letter", || async {
        applied(&vigil, "ok@example.com", "ok-1").then_some(())
    })
    .await;
    let stored = vigil::kafka::stored_dead_letters(&open_store(&vigil)).unwrap();
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].payload, "garbage");
    assert_eq!(stored[0].offset, 0);
    assert!(!stored[0].publish_error.is_empty());
    vigil.shutdown().await;
}

/// When the dead-letter topic refuses, what the store keeps is bounded
/// (`kafka.max_stored_dead_letters`) and shared fairly: a feed topic whose every message fails
/// loses its own oldest, not a quieter feed's. A big value is kept cut to `MAX_STORED_PAYLOAD`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_dead_letters_are_bounded_and_a_flooding_feed_loses_its_own_oldest() {
    const QUIET: &str = "quiet.risk";
    let dir = tempfile::tempdir().unwrap();
    let (kafka, mut config) = refusing_dead_letter_topic(&[NATIVE, QUIET], dir.path());
    config.kafka.max_stored_dead_letters = 10;
    let vigil = start(config).await;
    let stored = || vigil::kafka::stored_dead_letters(&open_store(&vigil)).unwrap();
    let publisher = Publisher::new(&kafka.bootstrap_servers()).unwrap();
    for i in 0..2 {
        let garbage = format!("quiet garbage {i}");
        publisher
            .publish(QUIET, None, garbage.as_bytes())
            .await
            .unwrap();
    }
    eventually_within(40, "the quiet feed's two dead letters stored", || async {
        (stored().len() == 2).then_some(())
    })
    .await;
    // The loud feed: twenty bad messages, the last one 40 000 bytes, then a good one.
    for i in 0..19 {
        let garbage = format!("loud garbage {i}");
        publisher
            .publish(NATIVE, None, garbage.as_bytes())
            .await
            .unwrap();
    }
    let big = "x".repeat(40_000);
    publisher
        .publish(NATIVE, None, big.as_bytes())
        .await
        .unwrap();
    publish_native(&publisher, "ok@example.com", "LOW", "ok-1").await;
    eventually_within(
        40,
        "the message behind the loud feed's dead letters",
        || async { applied(&vigil, "ok@example.com", "ok-1").then_some(()) },
    )
    .await;
    let held = stored();
    assert!(held.len() <= 10, "{} stored", held.len());
    let quiet: Vec<&str> = held
        .iter()
        .filter(|d| d.topic == QUIET)
        .map(|d| d.payload.as_str())
        .collect();
    assert_eq!(quiet, vec!["quiet garbage 0", "quiet garbage 1"]);
    // The loud feed keeps its newest, up to the last.
    let mut loud: Vec<i64> = held
        .iter()
        .filter(|d| d.topic == NATIVE)
        .map(|d| d.offset)
        .collect();
    loud.sort_unstable();
    assert!(loud.len() >= 6, "{loud:?}");
    assert_eq!(loud, (20 - loud.len() as i64..20).collect::<Vec<_>>());
    let last = held.iter().find(|d| d.offset == 19).unwrap();
    assert_eq!(last.payload.len(), vigil::kafka::MAX_STORED_PAYLOAD);
    assert_eq!(last.payload_bytes, 40_000);
    let (_, metrics) = get(&vigil, "/metrics").await;
    let dropped = metrics
        .lines()
        .find_map(|l| l.strip_prefix("vigil_kafka_stored_dead_letters_dropped_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(dropped >= 10.0, "{metrics}");
    vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_before_the_offset_commit_redelivers_without_a_second_effect() {
    // A topic of its own, so the metrics below count only this test's messages.
    const TOPIC: &str = "restart.risk";
    let kafka = mock_cluster(&[(TOPIC, 1), (DLQ, 1)]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = kafka_config(dir.path(), &kafka.bootstrap_servers());
    config.kafka.topics = vec![TOPIC.into()];
    config.kafka.mappings.clear();
    // Every offset commit of the first run fails: Vigil applies, then "crashes" before committing.
    kafka.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_METADATA_TOO_LARGE; 50],
    );
    let vigil = start(config.clone()).await;
    register(&vigil, "g-once", "once@example.com").await;
    let publisher = Publisher::new(&kafka.bootstrap_servers()).unwrap();
    let t = now();
    publisher
        .publish(TOPIC, None, &native("once@example.com", "HIGH", "h-1", t))
        .await
        .unwrap();
    eventually_within(30, "the first run's revocation", || async {
        (grant_status(&vigil, "g-once").await == "revoked").then_some(())
    })
    .await;
    // The audit append follows the status change at the shard's flush.
    let before = eventually_within(10, "the first run's decision in the audit", || async {
        let (_, d) = get_json(&vigil, "/v1/decisions?grant=g-once").await;
        (d["decisions"].as_array().is_some_and(|a| !a.is_empty())).then_some(d)
    })
    .await;
    let version = context_version(&vigil, "once@example.com");
    let risk = risk_fact(&vigil, "once@example.com");
    assert_eq!(
        applications(&vigil, "once@example.com", "h-1"),
        (1, Some(true))
    );
    wait_applied_count(&vigil, TOPIC, 1).await;
    vigil.shutdown().await;
    kafka.clear_request_errors(RDKafkaApiKey::OffsetCommit);

    // The second run gets the uncommitted message again (the process-wide applied count goes to
    // 3: the redelivery and the new one), plus a new one behind it.
    let vigil = start(config.clone()).await;
    publisher
        .publish(TOPIC, None, &native("other@example.com", "LOW", "l-2", t))
        .await
        .unwrap();
    wait_applied_count(&vigil, TOPIC, 3).await;
    assert!(applied(&vigil, "other@example.com", "l-2"));
    assert_eq!(
        applications(&vigil, "once@example.com", "h-1"),
        (1, Some(false)),
        "the redelivered message changed nothing"
    );
    assert_eq!(context_version(&vigil, "once@example.com"), version);
    assert_eq!(
        risk_fact(&vigil, "once@example.com"),
        risk,
        "the fact keeps its first application"
    );
    let (_, after) = get_json(&vigil, "/v1/decisions?grant=g-once").await;
    assert_eq!(
        before, after,
        "no second decision for the redelivered signal"
    );
    vigil.shutdown().await;

    // Committed now: a third run has nothing to redeliver, and nothing acknowledged was lost.
    let vigil = start(config).await;
    publisher
        .publish(TOPIC, None, &native("third@example.com", "LOW", "l-3", t))
        .await
        .unwrap();
    eventually_within(30, "the third run's own message", || async {
        applied(&vigil, "third@example.com", "l-3").then_some(())
    })
    .await;
    wait_applied_count(&vigil, TOPIC, 4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        applied_count(&vigil, TOPIC).await,
        4,
        "nothing redelivered after the commit"
    );
    assert_eq!(
        applications(&vigil, "once@example.com", "h-1").0,
        0,
        "not applied again in the third run"
    );
    assert_eq!(risk_fact(&vigil, "other@example.com")["level"], "LOW");
    assert_eq!(grant_status(&vigil, "g-once").await, "revoked");
    vigil.shutdown().await;
}

/// The subject's risk fact from the feed (value, time, source, seq).
fn risk_fact(vigil: &Vigil, email: &str) -> Value {
    let why = vigil.engine().explain(&format!("email:{email}")).unwrap();
    let risk = why["context"]["risk"].as_object().unwrap();
    assert_eq!(risk.len(), 1, "{risk:?}");
    let fact = risk.values().next().unwrap();
    json!({"level": fact["value"]["level"], "time": fact["time"], "seq": fact["seq"]})
}

/// `vigil_kafka_applied_total` for `topic`: the metrics recorder is process-wide, so the count
/// spans every Vigil this test binary started.
async fn applied_count(vigil: &Vigil, topic: &str) -> u64 {
    let prefix = format!("vigil_kafka_applied_total{{topic=\"{topic}\"}} ");
    get(vigil, "/metrics")
        .await
        .1
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

async fn wait_applied_count(vigil: &Vigil, topic: &str, n: u64) {
    eventually_within(30, &format!("{n} applied from {topic}"), || async {
        (applied_count(vigil, topic).await >= n).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_split_the_partitions_and_one_takes_over_when_the_other_leaves() {
    let kafka = cluster(4);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(kafka_config(dir_a.path(), &kafka.bootstrap_servers())).await;
    let b = start(kafka_config(dir_b.path(), &kafka.bootstrap_servers())).await;
    let publisher = Publisher::new(&kafka.bootstrap_servers()).unwrap();
    let user = |i: usize| format!("user-{i}@example.com");
    let batch = |from: usize, to: usize| -> Vec<(Option<String>, Vec<u8>)> {
        (from..to)
            .map(|i| {
                let email = user(i);
                let body = native(&email, "LOW", &format!("m-{i}"), now());
                (Some(email), body)
            })
            .collect()
    };
    // Wait until both members hold partitions: keep publishing until each has applied something.
    let mut sent = 0;
    eventually_within(40, "both consumers to own partitions", || {
        let msgs = batch(sent, sent + 20);
        sent += 20;
        let (a, b, publisher) = (&a, &b, &publisher);
        async move {
            publisher.publish_all(NATIVE, &msgs).await.unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
            let seen_a = (0..sent).any(|i| applied(a, &user(i), &format!("m-{i}")));
            let seen_b = (0..sent).any(|i| applied(b, &user(i), &format!("m-{i}")));
            (seen_a && seen_b).then_some(())
        }
    })
    .await;
    eventually_within(20, "every message applied by one of the two", || async {
        let all = (0..sent).all(|i| {
            let id = format!("m-{i}");
            applied(&a, &user(i), &id) || applied(&b, &user(i), &id)
        });
        all.then_some(())
    })
    .await;
    // Until cluster mode, each of them misses the other's signals: neither is ready, and each
    // says why.
    for (name, vigil) in [("A", &a), ("B", &b)] {
        let what = format!("{name} to report that it consumes only part of the partitions");
        let body = eventually_within(20, &what, || async {
            let (code, body) = get(vigil, "/readyz").await;
            (code == 503).then_some(body)
        })
        .await;
        assert!(body.contains("partitions"), "{body}");
    }

    // B leaves; A takes over its partitions from B's committed offsets.
    b.shutdown().await;
    let first_new = sent;
    publisher
        .publish_all(NATIVE, &batch(first_new, first_new + 40))
        .await
        .unwrap();
    eventually_within(
        40,
        "A to apply every message published after B left",
        || async {
            (first_new..first_new + 40)
                .all(|i| applied(&a, &user(i), &format!("m-{i}")))
                .then_some(())
        },
    )
    .await;
    // Owning every partition again, A is ready.
    let body = eventually_within(20, "A ready again", || async {
        let (code, body) = get(&a, "/readyz").await;
        (code == 200).then_some(body)
    })
    .await;
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        ready["kafka"]["assigned"], ready["kafka"]["partitions"],
        "{ready}"
    );
    assert!(ready["kafka"]["lag"].is_u64(), "how far behind: {ready}");
    a.shutdown().await;
}

/// A backlog waits in the topic, not in memory: while the engine cannot keep up (here its store is
/// held, so every shard stops at its first revocation's commit) the consumer reads no further than
/// `kafka.max_queued_signals` signals waiting for the shards, plus the one batch gathered when it
/// looked. Once the engine moves again every message is applied, none lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_stops_reading_while_the_engine_holds_its_bound_of_queued_signals() {
    const MESSAGES: usize = 200;
    const MAX_BATCH: usize = 10;
    const MAX_QUEUED: usize = 20;
    let kafka = cluster(2);
    let dir = tempfile::tempdir().unwrap();
    let mut config = kafka_config(dir.path(), &kafka.bootstrap_servers());
    config.kafka.max_batch = MAX_BATCH;
    config.kafka.max_queued_signals = MAX_QUEUED;
    // Shards take a few signals per commit, so they stop after a handful with the store held.
    config.engine.max_batch = 4;
    config.validate().unwrap();
    let vigil = start(config).await;
    for i in 0..MESSAGES {
        register(&vigil, &format!("g-{i}"), &format!("u{i}@example.com")).await;
    }

    // Hold the store: the state writer cannot begin its next transaction until this one ends.
    let (release, held) = std::sync::mpsc::channel::<()>();
    let (holding, is_held) = std::sync::mpsc::channel::<()>();
    let store = vigil.store().clone();
    let holder = std::thread::spawn(move || {
        let txn = store.begin_write().unwrap();
        holding.send(()).unwrap();
        held.recv().ok();
        drop(txn);
    });
    is_held.recv().unwrap();

    let publisher = Publisher::new(&kafka.bootstrap_servers()).unwrap();
    let t = now();
    for i in 0..MESSAGES {
        let email = format!("u{i}@example.com");
        publisher
            .publish(
                NATIVE,
                Some(&email),
                &native(&email, "HIGH", &format!("q-{i}"), t),
            )
            .await
            .unwrap();
    }
    // Watch the shards' inboxes while the store is held.
    let mut most = 0;
    let watch_until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < watch_until {
        most = most.max(vigil.engine().queued_signals());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        most >= MAX_QUEUED,
        "the engine's inboxes never filled to the bound ({most}): the test held nothing up"
    );
    assert!(
        most < MAX_QUEUED + MAX_BATCH,
        "{most} signals waited in the engine's inboxes; the bound is {MAX_QUEUED} plus one batch"
    );
    let (_, metrics) = get(&vigil, "/metrics").await;
    let consumed: usize = metrics
        .lines()
        .find(|l| l.starts_with("vigil_kafka_consumed_total{topic=\"vigil.risk\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        consumed < MESSAGES,
        "the consumer read all {consumed} messages while the engine was stopped"
    );
    assert!(
        metrics.contains("vigil_engine_queued_signals "),
        "the queue's gauge is exported"
    );

    release.send(()).unwrap();
    holder.join().unwrap();
    eventually_within(
        60,
        "every message applied after the store came back",
        || {
            let vigil = &vigil;
            async move {
                (0..MESSAGES)
                    .all(|i| {
                        applications(vigil, &format!("u{i}@example.com"), &format!("q-{i}")).0 == 1
                    })
                    .then_some(())
            }
        },
    )
    .await;
    for i in [0, MESSAGES / 2, MESSAGES - 1] {
        assert_eq!(grant_status(&vigil, &format!("g-{i}")).await, "revoked");
    }
    assert_eq!(vigil.engine().queued_signals(), 0);
    vigil.shutdown().await;
}

/// `/readyz` tells a broker nothing needs (idle) from one that is down, and an instance whose
/// partition's leader is down is not ready — that partition's signals wait — until it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_whose_leader_is_down_makes_the_source_not_ready() {
    const LEADER: i32 = 3;
    let kafka = MockCluster::new(3).unwrap();
    for (topic, partitions) in [(NATIVE, 4), (FRAUD, 1), (DLQ, 1)] {
        kafka.create_topic(topic, partitions, 1).unwrap();
        for partition in 0..partitions {
            kafka.partition_leader(topic, partition, Some(1)).unwrap();
        }
    }
    kafka
        .coordinator(
            rdkafka::mocking::MockCoordinator::Group("vigil-test".into()),
            1,
        )
        .unwrap();
    // One partition led by a broker of its own; broker 2 leads nothing.
    kafka.partition_leader(NATIVE, 2, Some(LEADER)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let vigil = start(kafka_config(dir.path(), &kafka.bootstrap_servers())).await;
    let view =
        |body: &str| -> Value { serde_json::from_str::<Value>(body).unwrap()["kafka"].clone() };
    let ready = eventually_within(30, "the source ready", || async {
        let (code, body) = get(&vigil, "/readyz").await;
        (code == 200 && view(&body)["assigned"] == 5).then_some(body)
    })
    .await;
    let kafka_view = view(&ready);
    assert_eq!(kafka_view["brokers"], 3, "{kafka_view}");
    assert_eq!(kafka_view["brokers_down"], 0, "{kafka_view}");
    assert!(
        kafka_view.get("leader_unreachable").is_none(),
        "{kafka_view}"
    );

    kafka.broker_down(LEADER).unwrap();
    let body = eventually_within(30, "not ready with a leader down", || async {
        let (code, body) = get(&vigil, "/readyz").await;
        (code == 503).then_some(body)
    })
    .await;
    let kafka_view = view(&body);
    assert_eq!(
        kafka_view["leader_unreachable"],
        json!(["vigil.risk/2"]),
        "{body}"
    );
    // (`brokers_down` is not checked: the mock broker's metadata stops naming a broker that is
    // down, and librdkafka then forgets it rather than count it down.)
    assert!(body.contains("vigil.risk/2"), "the reason names it: {body}");

    kafka.broker_up(LEADER).unwrap();
    eventually_within(40, "ready again with the leader back", || async {
        let (code, _) = get(&vigil, "/readyz").await;
        (code == 200).then_some(())
    })
    .await;
    vigil.shutdown().await;
}
