//! Kafka risk-signal throughput: messages already in a topic (librdkafka's in-process mock cluster,
//! a real Kafka-protocol broker on loopback) consumed by Vigil's consumer group, normalized, applied
//! by the engine to each subject's context (and the affected grants evaluated) and committed by it,
//! with offsets committed after.
//!
//! Run: `cargo bench --bench kafka_apply -- [--messages 200000] [--users 20000] [--grants 1000]
//!       [--partitions 16] [--batch 2000] [--engine-batch 256]`
//!
//! The mock broker keeps a bounded log per partition (older segments are dropped, as retention
//! would), so a pre-filled topic needs enough partitions: keep messages / partitions under ~15 000.
//!
//! The rate is counted from the first applied batch (the consumer group join is excluded) to the
//! moment every message is applied and committed by the engine.

mod common;

use std::time::{Duration, Instant};

use common::{arg, loopback_config};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::json;
use vigil::sim::risk::{message, mock_cluster, Pattern};
use vigil::Vigil;

fn main() -> anyhow::Result<()> {
    vigil::telemetry::init_logging();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let messages = arg("--messages", 200_000);
    let users = arg("--users", 20_000);
    let grants = arg("--grants", 1_000);
    let partitions = arg("--partitions", 16) as i32;
    let topic = "vigil.risk";
    let cluster = mock_cluster(&[(topic, partitions), ("vigil.risk.dead-letter", 1)])?;
    let brokers = cluster.bootstrap_servers();

    // Fill the topic first, so the consumer is measured, not the producer.
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let started = Instant::now();
    let now = vigil::signal::now_ms() as f64 / 1000.0;
    for n in 0..messages {
        let m = message(Pattern::Steady, n, users, now);
        let body = m.native().to_string();
        let mut record = BaseRecord::to(topic).key(m.key()).payload(&body);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    producer.poll(Duration::from_millis(10));
                    record = r;
                }
            }
        }
    }
    producer.flush(Duration::from_secs(120))?;
    println!(
        "published {messages} messages to {partitions} partitions in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let dir = tempfile::tempdir()?;
    let mut config = loopback_config(dir.path());
    config.kafka.brokers = brokers.clone();
    config.kafka.max_batch = arg("--batch", 2000) as usize;
    config.engine.max_batch = arg("--engine-batch", 256) as usize;
    config.validate()?;
    let vigil = Vigil::start(config).await?;
    // Grants for some of the users, so signals trigger real evaluations.
    let client = reqwest::Client::new();
    for i in 0..grants.min(users) {
        let grant = json!({"id": format!("g-{i}"), "kind": "session",
            "subject": {"format": "email", "email": format!("user-{i}@example.com")},
            "session": format!("s-{i}"), "issued_at": now - 60.0, "expires_at": now + 3600.0});
        client
            .post(format!("http://{}/v1/grants", vigil.local_addr()))
            .json(&grant)
            .send()
            .await?
            .error_for_status()?;
    }

    // Progress is Vigil's own count of signals applied and committed by the engine.
    let metrics_url = format!("http://{}/metrics", vigil.local_addr());
    let applied_so_far = || async {
        let text = client.get(&metrics_url).send().await?.text().await?;
        let count = text
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!("vigil_kafka_applied_total{{topic=\"{topic}\"}} "))
            })
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
        anyhow::Ok(count)
    };
    let (t0, c0) = loop {
        let c = applied_so_far().await?;
        if c > 0 {
            break (Instant::now(), c);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let applied = applied_so_far().await?;
        if applied >= messages {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "stuck at {applied} of {messages}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let applied = messages - c0;
    println!(
        "applied {applied} Kafka signals in {secs:.2} s: {:.0} signals/s \
         (consume → normalize → engine apply and commit → offset commit)",
        applied as f64 / secs
    );
    let (_, decisions) = (
        0,
        client
            .get(format!(
                "http://{}/v1/decisions?limit=10000",
                vigil.local_addr()
            ))
            .send()
            .await?
            .json::<serde_json::Value>()
            .await?,
    );
    println!(
        "decisions made: {}",
        decisions["decisions"].as_array().map_or(0, Vec::len)
    );
    vigil.shutdown().await;
    Ok(())
}
