//! Kafka risk-signal throughput: messages already in a topic (librdkafka's in-process mock cluster,
//! a real Kafka-protocol broker on loopback) consumed by Vigil's consumer group, normalized, applied
//! by the engine to each subject's context (and the affected grants evaluated) and committed by it,
//! with offsets committed after.
//!
//! Run: `cargo bench --bench kafka_apply -- [--messages 1200000] [--users 20000] [--grants 1000]
//!       [--partitions 96] [--batch 2000] [--engine-batch 256] [--checkpoint-ms 1000] [--ceiling]`
//!
//! `--ceiling` measures, instead of Vigil, a bare consumer reading the same topic from the same
//! broker: the rate no consumer built on this librdkafka and this broker can beat here.
//!
//! The mock broker keeps a bounded log per partition (older segments are dropped, as retention
//! would), so a pre-filled topic needs enough partitions: keep messages / partitions under ~15 000.
//!
//! The rate is counted from the first applied batch (the consumer group join is excluded) to the
//! moment every message is applied and committed by the engine. Applied batches complete at the
//! engine's checkpoints (every `engine.checkpoint_interval_ms`), so that figure includes up to one
//! interval of waiting for the last one; the steady rate, between 10 % and 90 % applied, does not.
//! Use enough messages (a million or more) that the window spans many checkpoints.

mod common;

use std::time::{Duration, Instant};

use common::{arg, cpu_seconds, loopback_config};
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
    let messages = arg("--messages", 1_200_000);
    let users = arg("--users", 20_000);
    let grants = arg("--grants", 1_000);
    let partitions = arg("--partitions", 96) as i32;
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

    if std::env::args().any(|a| a == "--ceiling") {
        return consume_only(&brokers, topic, messages).await;
    }

    let dir = tempfile::tempdir()?;
    let mut config = loopback_config(dir.path());
    config.kafka.brokers = brokers.clone();
    config.kafka.max_batch = arg("--batch", 2000) as usize;
    config.engine.max_batch = arg("--engine-batch", 256) as usize;
    config.engine.checkpoint_interval_ms = arg("--checkpoint-ms", 1000);
    config.validate()?;
    let vigil = Vigil::start(config).await?;
    // Grants for some of the users, so signals trigger real evaluations.
    let client = vigil::sim::api_client(vigil.admin_token())?;
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
    let (t0, c0, cpu0) = loop {
        let c = applied_so_far().await?;
        if c > 0 {
            break (Instant::now(), c, cpu_seconds());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    // (elapsed, applied) when a tenth and nine tenths of the messages were applied.
    let (mut tenth, mut nine_tenths) = (None, None);
    loop {
        let applied = applied_so_far().await?;
        if tenth.is_none() && applied >= messages / 10 {
            tenth = Some((t0.elapsed().as_secs_f64(), applied));
        }
        if nine_tenths.is_none() && applied >= messages * 9 / 10 {
            nine_tenths = Some((t0.elapsed().as_secs_f64(), applied));
        }
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
    let cpu = cpu_seconds() - cpu0;
    let applied = messages - c0;
    println!(
        "applied {applied} Kafka signals in {secs:.2} s: {:.0} signals/s \
         (consume → normalize → engine apply and commit → offset commit)",
        applied as f64 / secs
    );
    if let (Some((a, na)), Some((b, nb))) = (tenth, nine_tenths) {
        if b > a {
            println!(
                "steady: {:.0} signals/s between 10 % and 90 % applied (no warm-up, no final checkpoint wait)",
                (nb - na) as f64 / (b - a)
            );
        }
    }
    // The whole process (Vigil, the mock broker, this harness's polling) on this machine's cores.
    println!(
        "CPU: {cpu:.2} s = {:.1} µs per signal ({:.2} cores busy)",
        cpu * 1e6 / applied as f64,
        cpu / secs
    );
    let decisions = client
        .get(format!(
            "http://{}/v1/decisions?limit=10000",
            vigil.local_addr()
        ))
        .send()
        .await?
        .json::<serde_json::Value>()
        .await?;
    println!(
        "decisions made: {}",
        decisions["decisions"].as_array().map_or(0, Vec::len)
    );
    vigil.shutdown().await;
    Ok(())
}

/// The ceiling on this machine: the same topic read by a bare consumer of the same librdkafka from
/// the same mock broker, each payload copied out as Vigil's consumer does, and nothing else (no
/// parse, no engine, no store, no offset commit). Counted from the first message to the last.
async fn consume_only(brokers: &str, topic: &str, messages: u64) -> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "ceiling")
        .set("fetch.queue.backoff.ms", "10")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[topic])?;
    let topic = topic.to_owned();
    let (n, secs, cpu) = tokio::task::spawn_blocking(move || {
        let mut n = 0u64;
        let mut bytes = 0usize;
        let mut started = None;
        let mut cpu0 = 0.0;
        let deadline = Instant::now() + Duration::from_secs(600);
        while n < messages && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                if started.is_none() {
                    started = Some(Instant::now());
                    cpu0 = cpu_seconds();
                }
                let payload = m.payload().map(<[u8]>::to_vec).unwrap_or_default();
                bytes += payload.len() + m.topic().len();
                n += 1;
            }
        }
        let secs = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        std::hint::black_box(bytes);
        (n, secs, cpu_seconds() - cpu0)
    })
    .await?;
    println!(
        "ceiling: a bare consumer read {n} messages of {topic} in {secs:.2} s: {:.0} messages/s; \
         CPU {:.1} µs per message",
        n as f64 / secs,
        cpu * 1e6 / n as f64
    );
    Ok(())
}
