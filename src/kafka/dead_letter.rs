//! The dead-letter path for messages that cannot become signals. Each goes to the dead-letter topic
//! unchanged (same key and value, so it can be replayed once fixed) with its origin and error in
//! headers, as Kafka Connect does: `vigil-error`, `vigil-topic`, `vigil-partition`, `vigil-offset`.
//!
//! The source partition moves on only after the dead letter is safe: delivered to the topic, or —
//! when the broker refuses it (topic missing, not authorized) — written to the store's
//! `kafka_dead_letters` table. A bad message is never silently dropped and never blocks a partition.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::source::FeedMessage;
use crate::store::{BatchWriter, WriteError};

const DEAD_LETTERS: TableDefinition<&str, &[u8]> = TableDefinition::new("kafka_dead_letters");

/// A dead letter kept in the store because the dead-letter topic would not take it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredDeadLetter {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub error: String,
    /// The message value, lossily as text (it failed to parse; this is for a human).
    pub payload: String,
    /// Why the dead-letter topic refused it.
    pub publish_error: String,
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
    runtime: tokio::runtime::Handle,
    timeout: Duration,
}

impl DeadLetters {
    pub fn new(
        producer: FutureProducer<ProducerLogs>,
        topic: String,
        writer: BatchWriter,
        runtime: tokio::runtime::Handle,
    ) -> DeadLetters {
        DeadLetters {
            producer,
            topic,
            writer,
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
                    refused.push(StoredDeadLetter {
                        payload: String::from_utf8_lossy(
                            msg.payload.as_deref().unwrap_or_default(),
                        )
                        .into_owned(),
                        topic: msg.topic,
                        partition: msg.partition,
                        offset: msg.offset,
                        error,
                        publish_error: e.to_string(),
                    });
                }
            }
        }
        if refused.is_empty() {
            return Ok(());
        }
        self.writer.write_blocking(move |txn| {
            let mut table = txn.open_table(DEAD_LETTERS).map_err(WriteError::storage)?;
            for letter in refused {
                let key = format!("{}/{}/{}", letter.topic, letter.partition, letter.offset);
                let bytes =
                    serde_json::to_vec(&letter).map_err(|e| WriteError::Storage(e.to_string()))?;
                table
                    .insert(key.as_str(), bytes.as_slice())
                    .map_err(WriteError::storage)?;
            }
            Ok(())
        })
    }
}

fn header<'a>(key: &'a str, value: &'a String) -> Header<'a, &'a String> {
    Header {
        key,
        value: Some(value),
    }
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
