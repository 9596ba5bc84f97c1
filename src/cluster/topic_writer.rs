//! Appends records to Vigil's small shared topics — the signing keys, the streams' configurations
//! and the outbox — with the durable producer (`acks=all`, idempotent): an answer is given only
//! once the brokers have every record of a call.

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};

use super::{topics, ClusterError};
use crate::config::ClusterConfig;
use crate::kafka::ProducerLogs;

/// One record: its partition, key and value (`None`: a tombstone, the key's row deleted).
#[derive(Debug, Clone)]
pub struct TopicRecord {
    pub partition: i32,
    pub key: String,
    pub value: Option<Vec<u8>>,
}

impl TopicRecord {
    /// Records of a one-partition topic (keys, streams): each key with its value.
    pub fn on_partition_zero(records: Vec<(String, Option<Vec<u8>>)>) -> Vec<TopicRecord> {
        records
            .into_iter()
            .map(|(key, value)| TopicRecord {
                partition: 0,
                key,
                value,
            })
            .collect()
    }
}

/// The producer of the shared topics.
pub struct TopicWriter {
    producer: FutureProducer<ProducerLogs>,
    runtime: tokio::runtime::Handle,
}

impl TopicWriter {
    /// Must be called within the Tokio runtime (blocking appends run on it).
    pub fn new(config: &ClusterConfig) -> Result<TopicWriter, ClusterError> {
        let mut client = topics::durable_producer_config(config);
        client.set("linger.ms", "1");
        Ok(TopicWriter {
            producer: client.create_with_context(ProducerLogs)?,
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// Appends `records` to `topic`, in order; the offset of each once the brokers have them all.
    pub async fn append(&self, topic: &str, records: &[TopicRecord]) -> Result<Vec<i64>, String> {
        let mut deliveries = Vec::with_capacity(records.len());
        for r in records {
            let mut record = FutureRecord::<str, [u8]>::to(topic)
                .key(r.key.as_str())
                .partition(r.partition);
            if let Some(value) = &r.value {
                record = record.payload(value.as_slice());
            }
            let delivery = self
                .producer
                .send_result(record)
                .map_err(|(e, _)| format!("{topic}: {e}"))?;
            deliveries.push(delivery);
        }
        let mut offsets = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            match delivery.await {
                Ok(Ok(d)) => offsets.push(d.offset),
                Ok(Err((e, _))) => {
                    metrics::counter!(crate::telemetry::CLUSTER_PUBLISH_ERRORS).increment(1);
                    return Err(format!("{topic}: {e}"));
                }
                Err(_) => return Err(format!("{topic}: the producer stopped")),
            }
        }
        Ok(offsets)
    }

    /// [`TopicWriter::append`] from a thread outside the runtime (a blocking task's).
    pub fn append_blocking(
        &self,
        topic: &str,
        records: &[TopicRecord],
    ) -> Result<Vec<i64>, String> {
        self.runtime.block_on(self.append(topic, records))
    }
}

/// How long a call waits for its records to be read back by this instance's follower.
pub const READ_BACK: Duration = Duration::from_secs(10);
