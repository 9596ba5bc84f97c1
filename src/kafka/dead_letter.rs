//! The dead-letter path for messages that cannot become signals. Each goes to the dead-letter topic
//! unchanged (same key and value, so it can be replayed once fixed) with its origin and error in
//! headers, as Kafka Connect does: `vigil-error`, `vigil-topic`, `vigil-partition`, `vigil-offset`.
//!
//! The source partition moves on only after the dead letter is safe: delivered to the topic, or —
//! when the broker refuses it (topic missing, not authorized) — written to the store's
//! `kafka_dead_letters` table. A bad message is never silently dropped and never blocks a partition.
//!
//! That table is bounded: at most `kafka.max_stored_dead_letters` rows, each with at most
//! [`MAX_STORED_PAYLOAD`] bytes of its message. Past the bound the feed topics holding the most
//! lose their own oldest rows ([`crate::fair::over_cap`]), so a feed whose every message fails
//! while the topic is unavailable cannot push out another feed's few.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::source::FeedMessage;
use crate::store::{BatchWriter, WriteError};

const DEAD_LETTERS: TableDefinition<&str, &[u8]> = TableDefinition::new("kafka_dead_letters");

/// The most of a message's value a stored dead letter keeps (it is there for a human to read;
/// the message itself stays in its topic until the topic's retention).
pub const MAX_STORED_PAYLOAD: usize = 16 * 1024;

/// A dead letter kept in the store because the dead-letter topic would not take it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredDeadLetter {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub error: String,
    /// The message value, lossily as text (it failed to parse; this is for a human), cut to
    /// [`MAX_STORED_PAYLOAD`] bytes.
    pub payload: String,
    /// The value's whole length in bytes (more than `payload` holds when it was cut).
    #[serde(default)]
    pub payload_bytes: usize,
    /// Why the dead-letter topic refused it.
    pub publish_error: String,
    /// When it was stored (milliseconds since the epoch; 0 for rows of earlier releases, which
    /// go first past the bound).
    #[serde(default)]
    pub stored_at_ms: i64,
}

/// What pruning reads of a stored row: serde skips the rest without copying it.
#[derive(Deserialize)]
struct StoredHead {
    topic: String,
    partition: i32,
    offset: i64,
    #[serde(default)]
    stored_at_ms: i64,
}

impl StoredHead {
    /// Oldest first: stored earlier, then (one batch shares its time) by partition and offset.
    fn age(&self) -> (i64, i32, i64) {
        (self.stored_at_ms, self.partition, self.offset)
    }
}

/// The store fallback's bound and clock.
pub struct StoreBound {
    /// `kafka.max_stored_dead_letters`.
    pub max: usize,
    pub clock: crate::clock::Clock,
}

/// The dead-letter producer's context: its logs go to tracing.
pub struct ProducerLogs;

impl rdkafka::ClientContext for ProducerLogs {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        super::log_librdkafka(level, fac, message);
    }
}

/// Publishes dead letters; falls back to the store.
pub struct DeadLetters {
    producer: FutureProducer<ProducerLogs>,
    topic: String,
    writer: BatchWriter,
    bound: StoreBound,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
}

impl DeadLetters {
    pub fn new(
        producer: FutureProducer<ProducerLogs>,
        topic: String,
        writer: BatchWriter,
        bound: StoreBound,
        runtime: tokio::runtime::Handle,
    ) -> DeadLetters {
        DeadLetters {
            producer,
            topic,
            writer,
            bound,
            runtime,
            timeout: Duration::from_secs(10),
        }
    }

    /// Makes every `(message, error)` safe; returns once each is delivered or stored. An error
    /// means neither worked: the caller must not commit past these messages.
    pub fn send(&self, letters: Vec<(FeedMessage, String)>) -> Result<(), WriteError> {
        if letters.is_empty() {
            return Ok(());
        }
        let mut futures = Vec::with_capacity(letters.len());
        for (msg, error) in &letters {
            let (partition, offset) = (msg.partition.to_string(), msg.offset.to_string());
            let headers = OwnedHeaders::new()
                .insert(header("vigil-error", error))
                .insert(header("vigil-topic", &msg.topic))
                .insert(header("vigil-partition", &partition))
                .insert(header("vigil-offset", &offset));
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.topic).headers(headers);
            // A tombstone's copy stays a tombstone: no value, not an empty one.
            if let Some(payload) = msg.payload.as_deref() {
                record = record.payload(payload);
            }
            if let Some(key) = msg.key.as_deref() {
                record = record.key(key);
            }
            futures.push(self.producer.send(record, self.timeout));
        }
        let results = self
            .runtime
            .block_on(futures_util::future::join_all(futures));
        let mut refused = Vec::new();
        let now_ms = self.bound.clock.now_ms();
        for ((msg, error), result) in letters.into_iter().zip(results) {
            let topic = msg.topic.clone();
            match result {
                Ok(_) => {
                    metrics::counter!(crate::telemetry::KAFKA_DEAD_LETTERED, "topic" => topic)
                        .increment(1);
                }
                Err((e, _)) => {
                    metrics::counter!(crate::telemetry::KAFKA_DEAD_LETTER_STORED, "topic" => topic)
                        .increment(1);
                    tracing::error!(topic = %msg.topic, partition = msg.partition, offset = msg.offset,
                        dead_letter_topic = %self.topic, error = %e,
                        "dead-letter topic refused a message; kept in the store instead");
                    let value = msg.payload.as_deref().unwrap_or_default();
                    refused.push(StoredDeadLetter {
                        payload: readable_excerpt(value),
                        payload_bytes: value.len(),
                        topic: msg.topic,
                        partition: msg.partition,
                        offset: msg.offset,
                        error,
                        publish_error: e.to_string(),
                        stored_at_ms: now_ms,
                    });
                }
            }
        }
        if refused.is_empty() {
            return Ok(());
        }
        let max = self.bound.max;
        let held = self.writer.write_blocking(move |txn| {
            let mut table = txn.open_table(DEAD_LETTERS).map_err(WriteError::storage)?;
            for letter in refused {
                let key = format!("{}/{}/{}", letter.topic, letter.partition, letter.offset);
                let bytes =
                    serde_json::to_vec(&letter).map_err(|e| WriteError::Storage(e.to_string()))?;
                table
                    .insert(key.as_str(), bytes.as_slice())
                    .map_err(WriteError::storage)?;
            }
            table.len().map_err(WriteError::storage)
        })?;
        let (dropped, held) = if held > max as u64 {
            self.prune(max)?
        } else {
            (0, held)
        };
        metrics::gauge!(crate::telemetry::KAFKA_STORED_DEAD_LETTERS).set(held as f64);
        if dropped > 0 {
            metrics::counter!(crate::telemetry::KAFKA_STORED_DEAD_LETTERS_DROPPED)
                .increment(dropped as u64);
            tracing::warn!(
                dropped,
                max,
                "stored dead letters over kafka.max_stored_dead_letters: the oldest of the topics holding the most dropped"
            );
        }
        Ok(())
    }
}

impl DeadLetters {
    /// Drops the stored dead letters down to nine tenths of `max` (so a steady stream of them
    /// does not rescan the table for every batch), fairly between topics; returns how many went
    /// and how many are left. The scan — up to `max` rows of up to [`MAX_STORED_PAYLOAD`] bytes
    /// each — reads on this thread: inside the write it held the store's one writer, and with it
    /// every party's decisions, while one feed's bad messages were counted. Only the removals
    /// are written.
    fn prune(&self, max: usize) -> Result<(usize, u64), WriteError> {
        let over: Vec<String> = {
            let txn = self
                .writer
                .database()
                .begin_read()
                .map_err(WriteError::storage)?;
            let table = txn.open_table(DEAD_LETTERS).map_err(WriteError::storage)?;
            let mut rows: Vec<(String, Option<StoredHead>)> = Vec::new();
            for entry in table.iter().map_err(WriteError::storage)? {
                let (k, v) = entry.map_err(WriteError::storage)?;
                let head = serde_json::from_slice::<StoredHead>(v.value()).ok();
                rows.push((k.value().to_owned(), head));
            }
            // Oldest first; a row that does not decode is the oldest of a party of its own.
            let age = |h: &Option<StoredHead>| h.as_ref().map_or((i64::MIN, 0, 0), StoredHead::age);
            rows.sort_by(|(ka, ha), (kb, hb)| age(ha).cmp(&age(hb)).then_with(|| ka.cmp(kb)));
            let parties: Vec<&str> = rows
                .iter()
                .map(|(_, h)| h.as_ref().map_or("", |h| h.topic.as_str()))
                .collect();
            let keep = max - max / 10;
            let over = crate::fair::over_cap(&parties, keep);
            over.into_iter()
                .filter_map(|i| rows.get(i).map(|(key, _)| key.clone()))
                .collect()
        };
        self.writer.write_blocking(move |txn| {
            let mut table = txn.open_table(DEAD_LETTERS).map_err(WriteError::storage)?;
            let mut dropped = 0;
            for key in &over {
                if table
                    .remove(key.as_str())
                    .map_err(WriteError::storage)?
                    .is_some()
                {
                    dropped += 1;
                }
            }
            Ok((dropped, table.len().map_err(WriteError::storage)?))
        })
    }
}

/// A message value as text for a human: lossy UTF-8, cut at a character boundary within
/// [`MAX_STORED_PAYLOAD`] bytes.
fn readable_excerpt(value: &[u8]) -> String {
    let text = String::from_utf8_lossy(&value[..value.len().min(MAX_STORED_PAYLOAD)]);
    let mut end = text.len().min(MAX_STORED_PAYLOAD);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

fn header<'a>(key: &'a str, value: &'a String) -> Header<'a, &'a String> {
    Header {
        key,
        value: Some(value),
    }
}

/// Sets `vigil_kafka_stored_dead_letters` to what the store holds (at start-up; each store
/// write sets it after).
pub fn note_stored_dead_letters(db: &Arc<Database>) {
    let held = db.begin_read().ok().and_then(|txn| {
        let table = txn.open_table(DEAD_LETTERS).ok()?;
        table.len().ok()
    });
    metrics::gauge!(crate::telemetry::KAFKA_STORED_DEAD_LETTERS).set(held.unwrap_or(0) as f64);
}

/// The dead letters kept in the store (by topic, partition, offset).
pub fn stored_dead_letters(db: &Arc<Database>) -> Result<Vec<StoredDeadLetter>, WriteError> {
    let txn = db.begin_read().map_err(WriteError::storage)?;
    let table = match txn.open_table(DEAD_LETTERS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(WriteError::storage(e)),
    };
    let mut out = Vec::new();
    for entry in table.iter().map_err(WriteError::storage)? {
        let (_, v) = entry.map_err(WriteError::storage)?;
        if let Ok(letter) = serde_json::from_slice(v.value()) {
            out.push(letter);
        }
    }
    Ok(out)
}
