//! One signing identity for the cluster: Vigil's signing keys live in `<name>.keys` (compacted,
//! one partition; the private parts included, so the topic's ACLs must admit Vigil alone). Every
//! instance reads the topic whole before it serves, then follows it: a rotation on any instance is
//! published there and every instance signs with the new key and publishes it in its JWKS.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use tokio::sync::watch;

use super::topic_writer::{TopicRecord, TopicWriter};
use super::{topics, ClusterError};
use crate::clock::Clock;
use crate::config::ClusterConfig;
use crate::jose::Alg;
use crate::transmitter::{Identity, KeyRecord, KeyShare};

/// How long start-up may take to read the key topic to its end.
const CATCH_UP: Duration = Duration::from_secs(30);

/// The key topic as a [`KeyShare`].
struct KeyTopic {
    writer: Arc<TopicWriter>,
    topic: String,
}

impl KeyShare for KeyTopic {
    fn publish(&self, records: Vec<KeyRecord>) -> Result<(), String> {
        self.writer
            .append_blocking(&self.topic, &TopicRecord::on_partition_zero(records))
            .map(|_| ())
    }
}

/// What the cluster's signing identity needs.
pub struct KeySettings<'a> {
    /// The algorithms offered, the default first.
    pub algs: Vec<Alg>,
    /// The algorithm each enforcement point gets, when not the default.
    pub choices: std::collections::HashMap<String, Alg>,
    pub retention_secs: u64,
    /// A single node's key directory: its keys are the cluster's first if the topic has none.
    pub seed_dir: &'a Path,
    pub clock: Clock,
}

/// Reads the key topic to its end, makes the identity (publishing a first key if the topic has
/// no usable one), and follows the topic on a thread until `shutdown`.
pub async fn shared_identity(
    config: &ClusterConfig,
    topic: &str,
    instance: &str,
    writer: Arc<TopicWriter>,
    settings: KeySettings<'_>,
    shutdown: watch::Receiver<bool>,
) -> Result<Arc<Identity>, ClusterError> {
    let consumer = topics::whole_topic_reader(config, topic, instance)?;
    let (low, end) = consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .map_err(|e| ClusterError::Brokers(format!("{topic}: {e}")))?;
    let name = topic.to_owned();
    let (consumer, records) = tokio::task::spawn_blocking(move || {
        let records = read_to(&consumer, &name, low, end);
        (consumer, records)
    })
    .await
    .map_err(|e| ClusterError::Brokers(e.to_string()))?;
    let records = records?;
    let share = Arc::new(KeyTopic {
        writer,
        topic: topic.to_owned(),
    });
    let choices = settings.choices;
    let (seed_dir, algs, retention, clock) = (
        settings.seed_dir.to_owned(),
        settings.algs,
        settings.retention_secs,
        settings.clock,
    );
    let identity = tokio::task::spawn_blocking(move || {
        Identity::shared(records, &seed_dir, &algs, retention, clock, share)
    })
    .await
    .map_err(|e| ClusterError::Brokers(e.to_string()))?
    .map_err(|e| ClusterError::Topic {
        topic: topic.to_owned(),
        reason: e.to_string(),
    })?;
    let identity = Arc::new(identity.with_choices(choices));
    let follower = identity.clone();
    std::thread::Builder::new()
        .name("vigil-keys".into())
        .spawn(move || {
            topics::read_until(
                &consumer,
                &shutdown,
                "the key topic",
                |message| match message.key().and_then(|k| std::str::from_utf8(k).ok()) {
                    Some(kid) => follower.learn(kid, message.payload()),
                    None => tracing::warn!(
                        offset = message.offset(),
                        "a record without a key id on the key topic"
                    ),
                },
            );
        })
        .map_err(|e| ClusterError::Brokers(e.to_string()))?;
    Ok(identity)
}

/// The last record of each key before offset `end` (none when the topic holds none: `low` is
/// its first offset).
fn read_to(
    consumer: &BaseConsumer,
    topic: &str,
    low: i64,
    end: i64,
) -> Result<Vec<(String, Vec<u8>)>, ClusterError> {
    let mut latest: HashMap<String, Option<Vec<u8>>> = HashMap::new();
    if end > low {
        topics::read_to_end(consumer, topic, end, CATCH_UP, |message| {
            if let Some(key) = message.key().and_then(|k| std::str::from_utf8(k).ok()) {
                latest.insert(key.to_owned(), message.payload().map(<[u8]>::to_vec));
            }
        })?;
    }
    Ok(latest
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .collect())
}
