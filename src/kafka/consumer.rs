//! The consumer thread: polls the group's partitions, gathers batches, and runs each batch through
//! normalize → dead letters → durable record → hand-off → offset commit (see the module docs).

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::dead_letter::{DeadLetters, ProducerLogs};
use super::log_librdkafka;
use super::source::{FeedMessage, Normalizer};
use crate::config::KafkaConfig;
use crate::intake::{Intake, RecordOutcome};
use crate::signal::Signal;
use crate::store::BatchWriter;

/// Why the Kafka source could not start.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("kafka client: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
}

/// What a batch needs once its messages are gathered. It is the consumer's librdkafka context, so
/// the rebalance callback can finish the batch in flight before partitions are given up.
struct Pipeline {
    normalizer: Normalizer,
    intake: Intake,
    next: mpsc::Sender<Signal>,
    dead_letters: DeadLetters,
    /// Messages taken from partitions and not yet through the pipeline.
    inflight: Mutex<Vec<FeedMessage>>,
}

impl ClientContext for Pipeline {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log_librdkafka(level, fac, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        metrics::counter!("vigil_kafka_client_errors_total").increment(1);
        tracing::warn!(error = %error, reason, "kafka client error");
    }

    /// Consumer lag per partition this consumer fetches, from librdkafka's periodic statistics
    /// (`statistics.interval.ms`): no extra broker round trips on the consuming thread.
    fn stats(&self, statistics: rdkafka::Statistics) {
        for (topic, t) in statistics.topics {
            for (partition, p) in t.partitions {
                if partition < 0 || !p.desired || p.consumer_lag < 0 {
                    continue;
                }
                metrics::gauge!("vigil_kafka_consumer_lag", "topic" => topic.clone(),
                    "partition" => partition.to_string())
                .set(p.consumer_lag as f64);
            }
        }
    }
}

impl ConsumerContext for Pipeline {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                tracing::info!(
                    partitions = tpl.count(),
                    "partitions revoked: finishing the batch in flight first"
                );
                self.drain(consumer);
            }
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions assigned");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

impl Pipeline {
    /// Runs the messages in flight through the pipeline and commits their offsets. Called between
    /// polls and from the rebalance callback; either way on the consumer thread.
    fn drain(&self, consumer: &BaseConsumer<Pipeline>) {
        let batch =
            std::mem::take(&mut *self.inflight.lock().unwrap_or_else(PoisonError::into_inner));
        if batch.is_empty() {
            return;
        }
        let started = Instant::now();
        let Some(offsets) = self.apply(batch) else {
            // Nothing of this batch is committed; it is redelivered (from the last committed
            // offset) after the consumer is restarted or the partitions move.
            return;
        };
        if let Err(e) = consumer.commit(&offsets, CommitMode::Sync) {
            // The records are durable and dedupe absorbs the redelivery this may cause.
            metrics::counter!("vigil_kafka_commit_errors_total").increment(1);
            tracing::warn!(error = %e, "offset commit failed; the batch may be redelivered (deduplicated)");
        }
        metrics::histogram!("vigil_kafka_batch_seconds").record(started.elapsed().as_secs_f64());
    }

    /// Normalizes, dead-letters and records `batch`, and hands the new signals on. Returns the
    /// offsets to commit, or `None` when the batch could not be made durable.
    fn apply(&self, batch: Vec<FeedMessage>) -> Option<TopicPartitionList> {
        let mut next_offsets: BTreeMap<(String, i32), i64> = BTreeMap::new();
        let mut records: Vec<(Signal, String)> = Vec::with_capacity(batch.len());
        let mut dead = Vec::new();
        for msg in batch {
            let entry = next_offsets
                .entry((msg.topic.clone(), msg.partition))
                .or_insert(0);
            *entry = (*entry).max(msg.offset + 1);
            match self.normalizer.signal(&msg) {
                Ok(signal) => {
                    // The raw message is kept with the signal, as a SET's token is (audit).
                    let raw = String::from_utf8_lossy(msg.payload.as_deref().unwrap_or_default())
                        .into_owned();
                    records.push((signal, raw));
                }
                Err(e) => {
                    tracing::warn!(topic = %msg.topic, partition = msg.partition, offset = msg.offset,
                        error = %e, "risk message dead-lettered");
                    dead.push((msg, e.to_string()));
                }
            }
        }
        if let Err(e) = self.dead_letters.send(dead) {
            tracing::error!(error = %e, "dead letters could not be made safe; batch not committed");
            return None;
        }
        let outcomes = match self.intake.record_batch_blocking(&records) {
            Ok(o) => o,
            Err(e) => {
                metrics::counter!("vigil_kafka_record_errors_total").increment(1);
                tracing::error!(error = %e, "risk signals could not be recorded; batch not committed");
                return None;
            }
        };
        for ((mut signal, _), outcome) in records.into_iter().zip(outcomes) {
            // The signal's stream label is its topic.
            let topic = signal.source.stream().to_owned();
            match outcome {
                RecordOutcome::Recorded(seq) => {
                    metrics::counter!("vigil_kafka_applied_total", "topic" => topic).increment(1);
                    signal.seq = seq;
                    // Recorded is durable: if the engine is gone, the signal is replayed on start.
                    if self.next.blocking_send(signal).is_err() {
                        tracing::debug!(seq, "next stage stopped; signal stays pending for replay");
                    }
                }
                RecordOutcome::Duplicate(_) => {
                    metrics::counter!("vigil_kafka_duplicates_total", "topic" => topic)
                        .increment(1);
                }
            }
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), next) in next_offsets {
            if let Err(e) = tpl.add_partition_offset(&topic, partition, Offset::Offset(next)) {
                tracing::warn!(error = %e, topic, partition, "cannot build the offset commit");
            }
        }
        Some(tpl)
    }
}

/// A running Kafka source.
pub struct KafkaSource {
    task: JoinHandle<()>,
}

impl KafkaSource {
    /// Creates the consumer (and the dead-letter producer), subscribes, and starts the consumer
    /// thread. Must be called from within the Tokio runtime.
    pub fn start(
        config: &KafkaConfig,
        intake: Intake,
        writer: BatchWriter,
        next: mpsc::Sender<Signal>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<KafkaSource, KafkaError> {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", config.brokers.trim())
            .set("client.id", "vigil")
            .set("auto.offset.reset", "earliest")
            .set("statistics.interval.ms", "5000");
        for (name, value) in config.librdkafka_properties() {
            client.set(name, value);
        }
        let mut producer_config = client.clone();
        producer_config
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "10000")
            .set("statistics.interval.ms", "0");
        let producer: FutureProducer<ProducerLogs> =
            producer_config.create_with_context(ProducerLogs)?;

        client
            .set("group.id", &config.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false");
        let runtime = tokio::runtime::Handle::current();
        let context = Pipeline {
            normalizer: Normalizer::new(&config.mappings),
            intake,
            next,
            dead_letters: DeadLetters::new(
                producer,
                config.dead_letter_topic.clone(),
                writer,
                runtime,
            ),
            inflight: Mutex::new(Vec::new()),
        };
        let consumer: BaseConsumer<Pipeline> = client.create_with_context(context)?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        tracing::info!(brokers = %config.brokers, group = %config.group_id, topics = ?config.topics,
            "kafka risk-signal source subscribed");
        let settings = Batching {
            max: config.max_batch.max(1),
            wait: Duration::from_millis(config.batch_wait_ms),
        };
        let task = tokio::task::spawn_blocking(move || run(consumer, settings, shutdown));
        Ok(KafkaSource { task })
    }

    /// The consumer thread's task: it ends after shutdown is signalled and its batch is done.
    pub fn into_task(self) -> JoinHandle<()> {
        self.task
    }
}

#[derive(Clone, Copy)]
struct Batching {
    max: usize,
    wait: Duration,
}

fn run(consumer: BaseConsumer<Pipeline>, batching: Batching, shutdown: watch::Receiver<bool>) {
    let pipeline = consumer.context();
    loop {
        // Stop on shutdown, or when Vigil is gone without one (the sender dropped).
        if *shutdown.borrow() || shutdown.has_changed().is_err() {
            break;
        }
        // Gather a batch: up to `max` messages, or whatever came within `wait` of the first.
        let mut gathered = Vec::new();
        let mut deadline: Option<Instant> = None;
        while gathered.len() < batching.max {
            let timeout = match deadline {
                None => Duration::from_millis(100),
                Some(d) => d.saturating_duration_since(Instant::now()),
            };
            match consumer.poll(timeout) {
                Some(Ok(m)) => {
                    metrics::counter!("vigil_kafka_consumed_total", "topic" => m.topic().to_owned())
                        .increment(1);
                    gathered.push(FeedMessage {
                        topic: m.topic().to_owned(),
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(<[u8]>::to_vec),
                        payload: m.payload().map(<[u8]>::to_vec),
                        timestamp_ms: m.timestamp().to_millis(),
                    });
                    deadline.get_or_insert_with(|| Instant::now() + batching.wait);
                }
                Some(Err(e)) => {
                    metrics::counter!("vigil_kafka_client_errors_total").increment(1);
                    tracing::warn!(error = %e, "kafka poll error");
                    break;
                }
                None => break,
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
        }
        // Hand the batch to the pipeline's in-flight slot, where a rebalance can find it too.
        pipeline
            .inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(gathered);
        pipeline.drain(&consumer);
    }
    pipeline.drain(&consumer);
    consumer.unsubscribe();
    tracing::info!("kafka risk-signal source stopped");
}
