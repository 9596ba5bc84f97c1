//! The state topic (`<name>.state`, compacted): the changelog of every owner's engine rows, on the
//! partition of the principal they belong to — the signals topic's partition, so state and
//! signals move together. [`StateLog`] appends a batch's rows (`acks=all`, idempotent producer)
//! and answers once the brokers have them all; [`read_partition`] reads a partition back, each
//! row's latest value, for the instance that takes it over.
//!
//! A batch's decisions go with its rows, to the decisions topic (`<name>.decisions`), marked with the audit log that made them ([`super::decision_copies`] copies them
//! into every other instance's log).
//!
//! Correctness does not depend on compaction: a partition is read from its start and the last
//! record of each key wins (a tombstone removes the row), so an uncompacted topic gives the same
//! state, only more slowly.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::oneshot;

use super::standby::PartitionCopy;
use super::{partition_of, topics, ClusterError};
use crate::config::ClusterConfig;
use crate::decision::Decision;
use crate::engine::{ChangeRecord, Changelog, Row, Table};
use crate::kafka::ProducerLogs;

/// How long a restore may take before the partition is given up as not taken over.
const RESTORE_DEADLINE: Duration = Duration::from_secs(120);
/// How often restore progress is reported while reading.
const PROGRESS_EVERY: u64 = 10_000;

/// The producer of the state topic.
pub struct StateLog {
    producer: FutureProducer<ProducerLogs>,
    topic: String,
    /// The alias topic, where identifier links also go (read whole by every instance).
    aliases_topic: String,
    /// The decisions topic, where each batch's decisions go.
    decisions_topic: String,
    /// The audit log the decisions are already in ([`crate::audit::AuditLog::origin`]).
    origin: String,
    partitions: i32,
    timeout: Duration,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for StateLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateLog")
            .field("topic", &self.topic)
            .field("partitions", &self.partitions)
            .finish()
    }
}

impl StateLog {
    /// A producer for `topic` (`partitions` partitions, as the signals topic); `origin` names the
    /// audit log this instance's decisions are written to. Must be called from within the Tokio
    /// runtime: deliveries are awaited on it.
    pub fn new(
        config: &ClusterConfig,
        topics: &super::Topics,
        partitions: i32,
        origin: &str,
    ) -> Result<StateLog, ClusterError> {
        let mut client = topics::durable_producer_config(config);
        client
            // A checkpoint may hold up to 100 000 contexts: room for two.
            .set("queue.buffering.max.messages", "250000")
            .set("linger.ms", "2");
        Ok(StateLog {
            producer: client.create_with_context(ProducerLogs)?,
            topic: topics.state.clone(),
            aliases_topic: topics.aliases.clone(),
            decisions_topic: topics.decisions.clone(),
            origin: origin.to_owned(),
            partitions,
            timeout: Duration::from_millis(config.publish_timeout_ms),
            runtime: tokio::runtime::Handle::current(),
        })
    }
}

impl StateLog {
    /// Queues `record`; a full local queue empties as the brokers take it, so that waits, up to
    /// `deadline`.
    fn send<'a>(
        &self,
        mut record: FutureRecord<'a, str, [u8]>,
        deadline: Instant,
    ) -> Result<rdkafka::producer::DeliveryFuture, String> {
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if Instant::now() < deadline =>
                {
                    record = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(format!("state topic: {e}")),
            }
        }
    }
}

impl Changelog for StateLog {
    fn append(
        &self,
        records: Vec<ChangeRecord>,
        decisions: &[Decision],
    ) -> oneshot::Receiver<Result<(), String>> {
        let (tx, rx) = oneshot::channel();
        let deadline = Instant::now() + self.timeout;
        let mut deliveries = Vec::with_capacity(records.len() + decisions.len());
        for d in decisions {
            let json = match serde_json::to_vec(d) {
                Ok(json) => json,
                Err(e) => {
                    let _ = tx.send(Err(format!("decision {}: {e}", d.id)));
                    return rx;
                }
            };
            let record = FutureRecord::to(&self.decisions_topic)
                // Any partition serves (the topic is read whole): the producer's, by id.
                .key(d.id.as_str())
                .headers(OwnedHeaders::new().insert(Header {
                    key: super::decision_copies::ORIGIN_HEADER,
                    value: Some(self.origin.as_str()),
                }))
                .payload(json.as_slice());
            match self.send(record, deadline) {
                Ok(delivery) => deliveries.push(delivery),
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return rx;
                }
            }
        }
        for r in &records {
            let mut record = FutureRecord::<str, [u8]>::to(&self.topic)
                .key(r.key.as_str())
                .partition(partition_of(&r.owner, self.partitions));
            if let Some(value) = &r.value {
                record = record.payload(value.as_slice());
            }
            let mut sends = vec![record];
            // An identifier's link (or its deletion, a tombstone) also goes to the alias table
            // every instance reads.
            let alias = Row::parse(&r.key).filter(|row| row.table == Table::Alias);
            if let Some(alias) = &alias {
                let mut record = FutureRecord::to(&self.aliases_topic)
                    .key(alias.key.as_str())
                    .partition(0);
                if let Some(principal) = &r.value {
                    record = record.payload(principal.as_slice());
                }
                sends.push(record);
            }
            for record in sends {
                match self.send(record, deadline) {
                    Ok(delivery) => deliveries.push(delivery),
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return rx;
                    }
                }
            }
        }
        self.runtime.spawn(async move {
            for delivery in deliveries {
                let outcome = match delivery.await {
                    Ok(Ok(_)) => continue,
                    Ok(Err((e, _))) => Err(format!("state topic: {e}")),
                    Err(_) => Err("state topic: the producer stopped".to_owned()),
                };
                let _ = tx.send(outcome);
                return;
            }
            let _ = tx.send(Ok(()));
        });
        rx
    }
}

/// Reads `partition` of the state topic to its end as of now, starting from `copy` (a standby
/// copy: its rows and the offset after them; an empty one reads from the start): every row's
/// latest value (rows whose last record is a tombstone are left out). `progress` hears how many
/// records are left as it goes.
pub fn read_partition(
    config: &ClusterConfig,
    topic: &str,
    partition: i32,
    copy: PartitionCopy,
    progress: &dyn Fn(u64),
) -> Result<Vec<(Row, Vec<u8>)>, ClusterError> {
    let started = Instant::now();
    let (consumer, low, high) = topics::partition_reader(config, topic, partition)?;
    let from_copy = copy.rows.len();
    let mut latest: HashMap<String, Option<Vec<u8>>> =
        copy.rows.into_iter().map(|(k, v)| (k, Some(v))).collect();
    // A copy ahead of the end (the topic was recreated) is not this topic's: read it all.
    let low = if copy.next > high {
        latest.clear();
        low
    } else {
        low.max(copy.next)
    };
    progress(u64::try_from(high - low).unwrap_or(0));
    if high > low {
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(topic, partition, Offset::Offset(low))?;
        consumer.assign(&assignment)?;
        let mut reported = 0u64;
        let what = format!("{topic}/{partition}");
        topics::read_to_end(&consumer, &what, high, RESTORE_DEADLINE, |message| {
            let next = message.offset() + 1;
            if let Some(key) = message.key().and_then(|k| std::str::from_utf8(k).ok()) {
                latest.insert(key.to_owned(), message.payload().map(<[u8]>::to_vec));
            }
            let done = u64::try_from(next - low).unwrap_or(0);
            if done - reported >= PROGRESS_EVERY {
                reported = done;
                progress(u64::try_from(high - next).unwrap_or(0));
            }
        })?;
    }
    let rows: Vec<(Row, Vec<u8>)> = latest
        .into_iter()
        .filter_map(|(key, value)| Some((Row::parse(&key)?, value?)))
        .collect();
    tracing::info!(%topic, partition, from_copy, records = high - low, rows = rows.len(),
        elapsed_ms = started.elapsed().as_millis() as u64, "state of a partition read back");
    Ok(rows)
}
