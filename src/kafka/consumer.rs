//! The consumer thread: polls the group's partitions, gathers batches, and runs each batch through
//! normalize → dead letters → durable record → hand-off → offset commit (see the module docs).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::dead_letter::{DeadLetters, ProducerLogs, StoreBound};
use super::health::KafkaHealth;
use super::log_librdkafka;
use super::restores::{PartitionHooks, Restores};
use super::source::{FeedMessage, Normalizer, SignalRecord};
use crate::config::KafkaConfig;
use crate::engine::{BatchDone, Engine};
use crate::intake::Intake;
use crate::signal::Signal;
use crate::store::BatchWriter;

/// Why the Kafka source could not start.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("kafka client: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
}

/// What a batch needs once its messages are gathered. It is the consumer's librdkafka context, so
/// the rebalance callback can finish the batches in flight before partitions are given up.
///
/// Batches are pipelined: while the engine commits one, the next is gathered and handed over
/// (shards keep each key's order across batches). Offsets are committed strictly in batch order,
/// each only after its batch's engine commit.
struct Pipeline {
    normalizer: Normalizer,
    /// Threads a large batch is normalized on (the machine's cores).
    workers: usize,
    /// Draws the sequence numbers that order signals across sources.
    intake: Intake,
    engine: Arc<Engine>,
    dead_letters: DeadLetters,
    /// Messages taken from partitions and not yet handed to the engine.
    gathered: Mutex<Vec<FeedMessage>>,
    /// Batches handed to the engine, oldest first, waiting for its commit.
    submitted: Mutex<VecDeque<Submitted>>,
    /// What `/readyz` says of this source.
    health: Arc<KafkaHealth>,
    topics: Vec<String>,
    /// Cluster mode: the state of partitions assigned, taken over on restore threads.
    restores: Option<Restores>,
    /// Cluster mode's risk feeds: where their signals go (see [`SourceFormat::forward`]).
    forward: Option<Arc<dyn SignalForward>>,
}

/// How often a partition whose state could not be taken over is tried again.
const RESTORE_RETRY: Duration = Duration::from_secs(15);

/// Most batches handed to the engine and not yet committed. The engine makes feed-changed contexts
/// durable at each checkpoint (`engine.checkpoint_interval_ms`, 1 s by default), so every batch
/// applied in that interval waits for the same write: the bound must hold a whole interval's
/// batches at full speed, or the consumer stalls until the next checkpoint (64 capped it near
/// 128 k signals/s). A waiting batch is only its offsets and a completion handle; its messages
/// are already applied and dropped, so the bound costs little memory.
const MAX_SUBMITTED: usize = 1024;

/// A batch the engine is applying.
struct Submitted {
    done: Option<BatchDone>,
    /// Where each of the batch's partitions starts (to rewind to if it fails) …
    first: BTreeMap<(String, i32), i64>,
    /// … and the offsets to commit once it is applied.
    next: BTreeMap<(String, i32), i64>,
    applied: BTreeMap<String, u64>,
    received_at_ms: Option<i64>,
    started: Instant,
}

/// How offsets are committed: asynchronously in the steady state (a lost commit only means a
/// harmless redelivery), synchronously before partitions are given up.
#[derive(Clone, Copy, PartialEq)]
enum Finish {
    /// Commit what is done; wait for the oldest batch only if the pipeline is full.
    Bounded,
    /// Wait for everything, and commit synchronously.
    All,
}

impl ClientContext for Pipeline {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log_librdkafka(level, fac, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        metrics::counter!(crate::telemetry::KAFKA_CLIENT_ERRORS).increment(1);
        tracing::warn!(error = %error, reason, "kafka client error");
    }

    /// Consumer lag per partition this consumer fetches, from librdkafka's periodic statistics
    /// (`statistics.interval.ms`): no extra broker round trips on the consuming thread.
    fn stats(&self, statistics: rdkafka::Statistics) {
        self.health.observe(&statistics, &self.topics);
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
                self.drain(consumer, Finish::All);
                let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                self.health.rebalanced(partitions.iter().copied(), false);
                if let Some(restores) = &self.restores {
                    restores.revoked(&partitions);
                }
            }
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions assigned");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    /// Cluster mode: a partition assigned is owned only once its state is taken over. It is
    /// paused at once, and its state read on a restore thread while this thread goes on polling
    /// the partitions it owns already (see [`super::restores`]); none of its signals is applied
    /// to a state without it.
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let Some(restores) = &self.restores else {
                let partitions = tpl
                    .elements()
                    .iter()
                    .map(|e| e.partition())
                    .collect::<Vec<_>>();
                self.health.rebalanced(partitions.into_iter(), true);
                return;
            };
            if let Err(e) = consumer.pause(tpl) {
                // (librdkafka refuses a pause only for a partition it does not know.) Not taken
                // over and not paused: fetch none of them rather than apply their signals to a
                // state without them. An incremental group lets just these go; an eager one
                // only lets everything go, which stalls this instance until the next rebalance.
                tracing::error!(error = %e, "could not pause partitions assigned; fetching none of them");
                let unassigned = match consumer.rebalance_protocol() {
                    rdkafka::consumer::RebalanceProtocol::Cooperative => {
                        consumer.incremental_unassign(tpl)
                    }
                    _ => consumer.unassign(),
                };
                if let Err(e) = unassigned {
                    tracing::error!(error = %e, "could not let go of partitions it could not pause");
                }
                return;
            }
            restores.assigned(
                tpl.elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect(),
            );
        }
    }
}

impl Pipeline {
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Cluster mode: resumes, and owns, the partitions whose state has been taken over since
    /// the last poll (a restore that failed is tried again by [`Restores`], with no operator
    /// action after the brokers come back).
    fn resume_restored(&self, consumer: &BaseConsumer<Self>) {
        let Some(restores) = &self.restores else {
            return;
        };
        let ready = restores.ready();
        if ready.is_empty() {
            return;
        }
        let mut resumed = rdkafka::TopicPartitionList::new();
        for (topic, partition) in &ready {
            resumed.add_partition(topic, *partition);
        }
        if let Err(e) = consumer.resume(&resumed) {
            tracing::error!(error = %e, "could not resume partitions whose state was taken over");
            return;
        }
        self.health
            .rebalanced(ready.into_iter().map(|(_, p)| p), true);
    }

    /// Hands the gathered messages to the engine, then commits the offsets of the batches it has
    /// finished (waiting as `finish` says). Called between polls and from the rebalance callback;
    /// either way on the consumer thread.
    fn drain(&self, consumer: &BaseConsumer<Pipeline>, finish: Finish) {
        let batch = std::mem::take(&mut *Self::lock(&self.gathered));
        if !batch.is_empty() {
            let submitted = self.submit(batch);
            Self::lock(&self.submitted).push_back(submitted);
        }
        self.finish(consumer, finish);
    }

    /// Normalizes a batch, makes its dead letters safe and hands its signals to the engine.
    fn submit(&self, batch: Vec<FeedMessage>) -> Submitted {
        let normalized = self.normalizer.signals(&batch, self.workers);
        // Offsets and counts per partition and topic, keyed by borrowed names: one entry per
        // partition, not a topic-name copy per message.
        let mut spans: BTreeMap<(&str, i32), (i64, i64)> = BTreeMap::new();
        let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
        for (msg, result) in batch.iter().zip(&normalized) {
            let span = spans
                .entry((msg.topic.as_str(), msg.partition))
                .or_insert((msg.offset, msg.offset + 1));
            span.0 = span.0.min(msg.offset);
            span.1 = span.1.max(msg.offset + 1);
            if result.is_ok() {
                *counts.entry(msg.topic.as_str()).or_default() += 1;
            }
        }
        let mut first = BTreeMap::new();
        let mut next = BTreeMap::new();
        for ((topic, partition), (f, n)) in spans {
            first.insert((topic.to_owned(), partition), f);
            next.insert((topic.to_owned(), partition), n);
        }
        let applied: BTreeMap<String, u64> =
            counts.into_iter().map(|(t, n)| (t.to_owned(), n)).collect();
        let mut signals: Vec<Signal> = Vec::with_capacity(batch.len());
        let mut dead = Vec::new();
        for (msg, result) in batch.into_iter().zip(normalized) {
            match result {
                Ok(mut signal) => {
                    if self.normalizer.is_signals_topic(&msg.topic) {
                        // Numbered by its place in its partition (see `SignalRecord::seq_at`).
                        signal.seq = SignalRecord::seq_at(msg.offset);
                    }
                    signals.push(signal);
                }
                Err(e) => {
                    tracing::warn!(topic = %msg.topic, partition = msg.partition, offset = msg.offset,
                        error = %e, "risk message dead-lettered");
                    dead.push((msg, e.to_string()));
                }
            }
        }
        let received_at_ms = signals.iter().map(|s| s.received_at_ms).min();
        let done = match self.hand_over(dead, signals) {
            Ok(done) => Some(done),
            Err(e) => {
                tracing::error!(error = %e, "risk batch not handed over");
                None
            }
        };
        Submitted {
            done,
            first,
            next,
            applied,
            received_at_ms,
            started: Instant::now(),
        }
    }

    /// Makes dead letters safe, numbers the signals and hands them to the engine.
    fn hand_over(
        &self,
        dead: Vec<(FeedMessage, String)>,
        mut signals: Vec<Signal>,
    ) -> Result<BatchDone, String> {
        self.dead_letters
            .send(dead)
            .map_err(|e| format!("dead letters could not be made safe: {e}"))?;
        if let Some(forward) = &self.forward {
            // Numbered by the owner that applies them.
            return Ok(forward.forward(signals));
        }
        // A risk feed's signals draw theirs from intake's counter (the signals topic's carry
        // their offsets already).
        let unnumbered = signals.iter().filter(|s| s.seq == 0).count() as u64;
        if unnumbered > 0 {
            let first = self
                .intake
                .reserve_seqs_blocking(unnumbered)
                .map_err(|e| e.to_string())?;
            for (signal, seq) in signals.iter_mut().filter(|s| s.seq == 0).zip(first..) {
                signal.seq = seq;
            }
        }
        self.engine
            .submit_batch(signals)
            .map_err(|e| format!("the engine did not take the signals: {e}"))
    }

    /// Commits the offsets of finished batches, oldest first. A failed batch rewinds its
    /// partitions (and those of every batch after it) so they are delivered again: nothing is
    /// committed past a batch that was not applied.
    fn finish(&self, consumer: &BaseConsumer<Pipeline>, finish: Finish) {
        let mut queue = Self::lock(&self.submitted);
        let mut commit: BTreeMap<(String, i32), i64> = BTreeMap::new();
        loop {
            let must_wait =
                finish == Finish::All || (finish == Finish::Bounded && queue.len() > MAX_SUBMITTED);
            let Some(oldest) = queue.front_mut() else {
                break;
            };
            let ready = match oldest.done.as_mut() {
                None => true,
                Some(done) => done.is_done(),
            };
            if !ready && !must_wait {
                break;
            }
            let Some(batch) = queue.pop_front() else {
                break;
            };
            let result = match batch.done {
                Some(done) => done.wait_blocking().map_err(|e| e.to_string()),
                None => Err("not handed over".to_owned()),
            };
            if let Err(e) = result {
                metrics::counter!(crate::telemetry::KAFKA_APPLY_ERRORS).increment(1);
                tracing::error!(error = %e, "risk batch not applied; rewinding to deliver it again");
                let mut rewind = batch.first;
                for later in queue.drain(..) {
                    if let Some(done) = later.done {
                        let _ = done.wait_blocking();
                    }
                    for (key, offset) in later.first {
                        let r = rewind.entry(key).or_insert(offset);
                        *r = (*r).min(offset);
                    }
                }
                self.commit(consumer, &commit, finish);
                for ((topic, partition), offset) in rewind {
                    if let Err(e) = consumer.seek(
                        &topic,
                        partition,
                        Offset::Offset(offset),
                        Duration::from_secs(5),
                    ) {
                        tracing::warn!(error = %e, topic, partition, "cannot rewind the partition");
                    }
                }
                std::thread::sleep(RETRY_PAUSE);
                return;
            }
            for (topic, n) in batch.applied {
                if let Some(received) = batch.received_at_ms {
                    let secs = (self.normalizer.clock().now_ms() - received).max(0) as f64 / 1000.0;
                    metrics::histogram!(crate::telemetry::SIGNAL_HANDLING_SECONDS, "stream" => topic.clone())
                        .record(secs);
                }
                metrics::counter!(crate::telemetry::KAFKA_APPLIED, "topic" => topic).increment(n);
            }
            metrics::histogram!(crate::telemetry::KAFKA_BATCH_SECONDS)
                .record(batch.started.elapsed().as_secs_f64());
            commit.extend(batch.next);
        }
        drop(queue);
        self.commit(consumer, &commit, finish);
    }

    fn commit(
        &self,
        consumer: &BaseConsumer<Pipeline>,
        offsets: &BTreeMap<(String, i32), i64>,
        finish: Finish,
    ) {
        if offsets.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), next) in offsets {
            if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next)) {
                tracing::warn!(error = %e, topic, partition, "cannot build the offset commit");
            }
        }
        let mode = if finish == Finish::All {
            CommitMode::Sync
        } else {
            CommitMode::Async
        };
        if let Err(e) = consumer.commit(&tpl, mode) {
            // The batches are applied durably; their redelivery changes nothing.
            metrics::counter!(crate::telemetry::KAFKA_COMMIT_ERRORS).increment(1);
            tracing::warn!(error = %e, "offset commit failed; the batch may be redelivered (no effect)");
        }
    }
}

/// How long the consumer waits before it looks again at an engine whose inboxes were full.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(1);

/// How long the consumer waits before retrying a batch the store could not take.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// How the source reads its messages.
#[derive(Clone, Default)]
pub struct SourceFormat {
    /// The event-time sanity window (`events.max_future_skew_secs`).
    pub max_future_skew_secs: u64,
    /// Cluster mode's signals topic, whose records are already-validated signals.
    pub signals_topic: Option<String>,
    /// Cluster mode: what moves with a partition when the group moves it.
    pub hooks: Option<Arc<dyn PartitionHooks>>,
    /// Cluster mode's risk feeds: where their signals go instead of this instance's engine (the
    /// signals topic, on each principal's partition: its owner applies them).
    pub forward: Option<Arc<dyn SignalForward>>,
}

/// Where a feed's signals go when not to this instance's engine. An offset is committed only once
/// the batch's answer is `Ok` (its signals are durable where they went).
pub trait SignalForward: Send + Sync {
    fn forward(&self, signals: Vec<Signal>) -> BatchDone;
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
        format: SourceFormat,
        health: Arc<KafkaHealth>,
        intake: Intake,
        engine: Arc<Engine>,
        writer: BatchWriter,
        shutdown: watch::Receiver<bool>,
    ) -> Result<KafkaSource, KafkaError> {
        let mut client = super::client_config(&config.brokers, config.librdkafka_properties());
        // The operator's properties win over these too.
        for (name, value) in [
            ("client.id", "vigil"),
            ("auto.offset.reset", "earliest"),
            ("statistics.interval.ms", "5000"),
        ] {
            if client.get(name).is_none() {
                client.set(name, value);
            }
        }
        let mut producer_config = client.clone();
        // Idempotent by default (a retried dead letter is not written twice), unless the operator
        // chose otherwise (a broker or ACL without idempotent-write support).
        if producer_config.get("enable.idempotence").is_none() {
            producer_config.set("enable.idempotence", "true");
        }
        producer_config
            .set("message.timeout.ms", "10000")
            .set("statistics.interval.ms", "0");
        let producer: FutureProducer<ProducerLogs> =
            producer_config.create_with_context(ProducerLogs)?;

        client
            .set("group.id", &config.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false");
        // When its prefetch queue is full, librdkafka postpones the partition's next fetch by
        // `fetch.queue.backoff.ms` (1 s by default). Vigil drains that queue in batches far faster,
        // so the default starved the consumer for part of every second (≈ 100 k signals/s against
        // ≈ 130–150 k with 10 ms: `cargo bench --bench kafka_apply`). An operator's value wins.
        if !config
            .librdkafka_properties()
            .any(|(name, _)| name == "fetch.queue.backoff.ms")
        {
            client.set("fetch.queue.backoff.ms", "10");
        }
        let runtime = tokio::runtime::Handle::current();
        let clock = engine.clock().clone();
        let context = Pipeline {
            normalizer: Normalizer::new(
                &config.mappings,
                format.max_future_skew_secs,
                engine.clock().clone(),
            )
            .with_signals_topic(format.signals_topic),
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            intake,
            engine,
            dead_letters: DeadLetters::new(
                producer,
                config.dead_letter_topic.clone(),
                writer,
                StoreBound {
                    max: config.max_stored_dead_letters,
                    clock,
                },
                runtime,
            ),
            gathered: Mutex::new(Vec::new()),
            submitted: Mutex::new(VecDeque::new()),
            health,
            topics: config.topics.clone(),
            restores: format
                .hooks
                .map(|hooks| Restores::new(hooks, RESTORE_RETRY)),
            forward: format.forward,
        };
        let consumer: BaseConsumer<Pipeline> = client.create_with_context(context)?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        tracing::info!(brokers = %config.brokers, group = %config.group_id, topics = ?config.topics,
            "kafka risk-signal source subscribed");
        let settings = Batching {
            max: config.max_batch.max(1),
            wait: Duration::from_millis(config.batch_wait_ms),
            max_queued: config.max_queued_signals.max(1),
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
    /// Most signals waiting in the engine's inboxes before fetching pauses
    /// (`kafka.max_queued_signals`).
    max_queued: usize,
}

/// Counts a gathered batch per topic: one metric update per topic and batch rather than one
/// label allocation and registry lookup per message.
fn count_consumed(gathered: &[FeedMessage]) {
    let mut per_topic: BTreeMap<&str, u64> = BTreeMap::new();
    for m in gathered {
        *per_topic.entry(m.topic.as_str()).or_default() += 1;
    }
    for (topic, n) in per_topic {
        metrics::counter!(crate::telemetry::KAFKA_CONSUMED, "topic" => topic.to_owned())
            .increment(n);
    }
}

fn run(consumer: BaseConsumer<Pipeline>, batching: Batching, shutdown: watch::Receiver<bool>) {
    let pipeline = consumer.context();
    loop {
        // Stop on shutdown, or when Vigil is gone without one (the sender dropped).
        if *shutdown.borrow() || shutdown.has_changed().is_err() {
            break;
        }
        // The engine is behind: leave the backlog in the topic, not in its inboxes. Commits of
        // batches finished meanwhile go on; the wait ends as soon as a shard takes a batch.
        let queued = pipeline.engine.queued_signals();
        metrics::gauge!(crate::telemetry::ENGINE_QUEUED_SIGNALS).set(queued as f64);
        if queued >= batching.max_queued {
            pipeline.drain(&consumer, Finish::Bounded);
            std::thread::sleep(QUEUE_FULL_PAUSE);
            continue;
        }
        // Gather a batch: up to `max` messages, or whatever came within `wait` of the first.
        let mut gathered = Vec::with_capacity(batching.max);
        let mut deadline: Option<Instant> = None;
        while gathered.len() < batching.max {
            let timeout = match deadline {
                None => Duration::from_millis(100),
                Some(d) => d.saturating_duration_since(Instant::now()),
            };
            match consumer.poll(timeout) {
                Some(Ok(m)) => {
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
                    metrics::counter!(crate::telemetry::KAFKA_CLIENT_ERRORS).increment(1);
                    tracing::warn!(error = %e, "kafka poll error");
                    break;
                }
                None => break,
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
        }
        // Hand the batch to the pipeline's gathered slot, where a rebalance can find it too, and
        // commit what is done. Never wait for the engine here when nothing came: a gap in the
        // fetches would then stall the consumer until the next checkpoint (up to its interval),
        // with the prefetched messages waiting. Idle polls come every 100 ms, and each commits
        // the batches finished since.
        count_consumed(&gathered);
        Pipeline::lock(&pipeline.gathered).extend(gathered);
        pipeline.drain(&consumer, Finish::Bounded);
        pipeline.resume_restored(&consumer);
    }
    if let Some(restores) = &pipeline.restores {
        restores.stop();
    }
    pipeline.drain(&consumer, Finish::All);
    consumer.unsubscribe();
    tracing::info!("kafka risk-signal source stopped");
}
