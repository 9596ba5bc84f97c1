//! Appends validated signals to the signals topic: in cluster mode the 202 of a push waits for the
//! brokers' acknowledgement (`acks=all`, idempotent producer), not for a local file, so whichever
//! instance received the SET, it survives that instance and reaches the principal's owner.

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use super::{partition_of, topics, ClusterError};
use crate::config::ClusterConfig;
use crate::kafka::{ProducerLogs, SignalRecord};
use crate::signal::Signal;

/// Why a signal was not appended (nothing was acknowledged).
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the signal could not be encoded: {0}")]
    Encode(String),
    #[error("the brokers did not take the signal: {0}")]
    Brokers(String),
}

/// The producer of the signals topic.
pub struct SignalLog {
    producer: FutureProducer<ProducerLogs>,
    topic: String,
    partitions: i32,
    timeout: Duration,
}

impl SignalLog {
    /// A producer for `topic`, which has `partitions` partitions.
    pub fn new(
        config: &ClusterConfig,
        topic: String,
        partitions: i32,
    ) -> Result<SignalLog, ClusterError> {
        let mut client = topics::durable_producer_config(config);
        client
            // A push waits for its record: batch for a millisecond at most.
            .set("linger.ms", "1");
        Ok(SignalLog {
            producer: client.create_with_context(ProducerLogs)?,
            topic,
            partitions,
            timeout: Duration::from_millis(config.publish_timeout_ms),
        })
    }

    /// The signals topic's partition count (ownership follows it).
    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// Appends `signal` (with the SET it came in) under `key`, on `key`'s partition; returns the
    /// partition and offset once every in-sync replica has it.
    pub async fn append(
        &self,
        key: &str,
        signal: &Signal,
        token: &str,
    ) -> Result<(i32, i64), PublishError> {
        let record = SignalRecord {
            signal: signal.clone(),
            token: token.to_owned(),
        };
        let payload =
            serde_json::to_vec(&record).map_err(|e| PublishError::Encode(e.to_string()))?;
        let partition = partition_of(key, self.partitions);
        let delivered = self
            .producer
            .send(
                FutureRecord::to(&self.topic)
                    .key(key)
                    .partition(partition)
                    .payload(&payload),
                Timeout::After(self.timeout),
            )
            .await;
        match delivered {
            Ok(delivery) => Ok((delivery.partition, delivery.offset)),
            Err((e, _)) => {
                metrics::counter!(crate::telemetry::CLUSTER_PUBLISH_ERRORS).increment(1);
                Err(PublishError::Brokers(e.to_string()))
            }
        }
    }
}
