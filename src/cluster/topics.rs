//! Vigil's own topics in cluster mode, their names and how they are made.
//!
//! | topic | key | partitions | cleanup | holds |
//! |---|---|---|---|---|
//! | `<name>.signals` | the principal's routing key | `cluster.partitions` (fixed once created) | delete, 7 days | every validated SET, appended before its 202: the cluster's intake log; partition = ownership |
//! | `<name>.signals.dead-letter` | as received | 1 | delete | records of the signals topic that do not decode (written by another release) |
//! | `<name>.members` | instance id | 1 | compact | each instance's API URL and the partitions it owns, re-announced every 2 s; a tombstone when it leaves |
//! | `<name>.aliases` | an identifier's key | 1 | compact | the principal each registered identifier names (last record wins), read whole by every instance: a signal naming any identifier is routed to its principal's owner wherever it arrives |
//! | `<name>.state` | `table \x1f row key` | as the signals topic | compact | the owners' engine rows (contexts, session revocations, grants, aliases; a tombstone deletes), on their principal's partition: what a new owner restores |
//! | `<name>.keys` | key id | 1 | compact | Vigil's signing keys (private parts included), read whole by every instance: one signing identity |
//! | `<name>.streams` | `stream \x1f id` or `subject \x1f id \0 subject` | 1 | compact | enforcement points' stream configurations and subjects (push credentials included), read whole by every instance |
//! | `<name>.decisions` | decision id | as the signals topic (any count serves) | delete, 7 days | every decision an owner made, marked with the audit log it was written to first: copied into every instance's audit log, so the trail outlives the instance that made it |
//! | `<name>.outbox` | `stream id \x1f jti` | as the signals topic | compact | every SET for an enforcement point, on its stream's partition, until delivered (a tombstone) or dead-lettered: what the stream's deliverer restores |
//!
//! They are created at start-up when missing. A topic that exists keeps its partition count, which
//! is read back: ownership is `partition_of(key, count)`, so it is the topic's count, not the
//! configured one, that every instance uses; the state topic must have the same count.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::ClusterError;
use crate::config::ClusterConfig;

/// How long start-up waits for the brokers' metadata and topic creation.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Retention of the topics that are logs, not tables (signals, decisions): a signal is applied
/// (and its effect in the owner's state), a decision copied into every audit log, long before;
/// the window only bounds the brokers' disk (each audit log has its own bound).
const LOG_RETENTION_MS: &str = "604800000";

/// The names of a cluster's topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub signals: String,
    pub signals_dead_letter: String,
    pub members: String,
    pub state: String,
    pub aliases: String,
    pub keys: String,
    pub streams: String,
    pub outbox: String,
    pub decisions: String,
}

impl Topics {
    pub fn of(name: &str) -> Topics {
        Topics {
            signals: format!("{name}.signals"),
            signals_dead_letter: format!("{name}.signals.dead-letter"),
            members: format!("{name}.members"),
            state: format!("{name}.state"),
            aliases: format!("{name}.aliases"),
            keys: format!("{name}.keys"),
            streams: format!("{name}.streams"),
            outbox: format!("{name}.outbox"),
            decisions: format!("{name}.decisions"),
        }
    }

    /// Every topic with its partition count when the signals topic has `partitions`: what to
    /// create by hand where the brokers cannot create topics (librdkafka's mock cluster).
    pub fn with_partitions(&self, partitions: i32) -> [(&str, i32); 9] {
        self.wanted(partitions)
            .map(|(topic, count, _)| (topic, count))
    }

    /// Every topic with its partition count and cleanup policy.
    fn wanted(&self, partitions: i32) -> [(&str, i32, &'static str); 9] {
        [
            (self.signals.as_str(), partitions, "delete"),
            (self.signals_dead_letter.as_str(), 1, "delete"),
            (self.members.as_str(), 1, "compact"),
            (self.state.as_str(), partitions, "compact"),
            (self.aliases.as_str(), 1, "compact"),
            (self.keys.as_str(), 1, "compact"),
            (self.streams.as_str(), 1, "compact"),
            (self.outbox.as_str(), partitions, "compact"),
            (self.decisions.as_str(), partitions, "delete"),
        ]
    }
}

/// The librdkafka settings every cluster client starts from ([`crate::kafka::client_config`]).
pub fn client_config(config: &ClusterConfig) -> ClientConfig {
    crate::kafka::client_config(&config.brokers, config.librdkafka_properties())
}

/// The settings of a producer whose records must not be lost or reordered: every in-sync replica
/// has a record before it counts as taken (`acks=all`), retries neither duplicate nor reorder
/// (idempotence), and a record not taken within `cluster.publish_timeout_ms` fails.
pub(super) fn durable_producer_config(config: &ClusterConfig) -> ClientConfig {
    let mut client = client_config(config);
    client
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", config.publish_timeout_ms.to_string());
    client
}

/// The settings of a reader that is not a member of a group: assigned partitions by hand, under
/// a group id of its own (`group`; librdkafka still wants one), committing nothing. What one
/// instance writes (a link, a stream, a key, a SET) is read by the others within tens of
/// milliseconds, not after a broker's fetch wait (500 ms by default).
pub(super) fn reader_config(config: &ClusterConfig, group: &str) -> ClientConfig {
    let mut client = client_config(config);
    client
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "25");
    client
}

/// A consumer of the whole of a one-partition topic, from its first record: every instance reads
/// every record (`reader` names it).
pub(super) fn whole_topic_reader(
    config: &ClusterConfig,
    topic: &str,
    reader: &str,
) -> Result<BaseConsumer, ClusterError> {
    every_partition_reader(config, topic, 1, reader)
}

/// A consumer of every partition of `topic` (`partitions` of them) from its first record, for a
/// reader of the whole topic (standby copies, the status view, the one-partition topics).
pub(super) fn every_partition_reader(
    config: &ClusterConfig,
    topic: &str,
    partitions: i32,
    reader: &str,
) -> Result<BaseConsumer, ClusterError> {
    let consumer: BaseConsumer = reader_config(config, &format!("{topic}.{reader}")).create()?;
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    Ok(consumer)
}

/// A consumer for reading one partition of `topic` back (a handover's restore): the partition's
/// first and end offsets as of now, and the consumer, not yet assigned.
pub(super) fn partition_reader(
    config: &ClusterConfig,
    topic: &str,
    partition: i32,
) -> Result<(BaseConsumer, i64, i64), ClusterError> {
    let consumer: BaseConsumer = reader_config(config, &format!("{topic}.restore")).create()?;
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .map_err(|e| ClusterError::Brokers(format!("{topic}/{partition}: {e}")))?;
    Ok((consumer, low, high))
}

/// Reads the assigned `consumer` until it has handed `take` every record before offset `end`
/// (of one partition), or fails once `deadline` has passed; a read error is logged (`what` says
/// what is read) and reading goes on.
pub(super) fn read_to_end(
    consumer: &BaseConsumer,
    what: &str,
    end: i64,
    deadline: Duration,
    mut take: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) -> Result<(), ClusterError> {
    use rdkafka::message::Message;
    let started = std::time::Instant::now();
    let mut next = i64::MIN;
    while next < end {
        if started.elapsed() > deadline {
            return Err(ClusterError::Brokers(format!(
                "{what}: not read to its end in {}s",
                deadline.as_secs()
            )));
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(e)) => tracing::warn!(error = %e, "reading {what}; retrying"),
            Some(Ok(message)) => {
                next = message.offset() + 1;
                take(&message);
            }
        }
    }
    Ok(())
}

/// Reads `consumer` until `shutdown`, handing every record to `take`; a read error is logged
/// (`what` says what is read) and reading goes on: the readers of whole topics (members, aliases,
/// standby copies) all run this loop on a thread of their own.
pub(super) fn read_until(
    consumer: &BaseConsumer,
    shutdown: &tokio::sync::watch::Receiver<bool>,
    what: &str,
    mut take: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) {
    while !*shutdown.borrow() {
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Ok(message)) => take(&message),
            Some(Err(e)) => tracing::warn!(error = %e, "reading {what}"),
        }
    }
}

/// Makes sure the cluster's topics exist and returns the signals topic's partition count.
pub async fn ensure(config: &ClusterConfig, topics: &Topics) -> Result<i32, ClusterError> {
    let admin: AdminClient<DefaultClientContext> = client_config(config).create()?;
    let wanted = topics.wanted(config.partitions);
    let mut missing = Vec::new();
    for (topic, partitions, cleanup) in wanted {
        if partition_count(admin.inner(), topic)?.is_none() {
            missing.push((topic, partitions, cleanup));
        }
    }
    if !missing.is_empty() {
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|(topic, partitions, cleanup)| {
                let topic = NewTopic::new(
                    topic,
                    *partitions,
                    TopicReplication::Fixed(config.replication_factor),
                )
                .set("cleanup.policy", cleanup);
                if *cleanup == "delete" {
                    topic.set("retention.ms", LOG_RETENTION_MS)
                } else {
                    topic
                }
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
        let results =
            admin
                .create_topics(&new, &options)
                .await
                .map_err(|e| ClusterError::Topic {
                    topic: missing[0].0.to_owned(),
                    reason: format!(
                        "could not be created ({e}); create it with the partitions wanted"
                    ),
                })?;
        for result in results {
            match result {
                Ok(topic) => tracing::info!(%topic, "cluster topic created"),
                // Another instance created it first.
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(ClusterError::Topic {
                        topic,
                        reason: format!("could not be created: {code}"),
                    })
                }
            }
        }
    }
    // Read back, also after creating: the count that exists is the one ownership follows.
    let count =
        partition_count(admin.inner(), &topics.signals)?.ok_or_else(|| ClusterError::Topic {
            topic: topics.signals.clone(),
            reason: "does not exist after it was created".into(),
        })?;
    for (topic, what) in [
        (&topics.state, "a principal's state"),
        (&topics.outbox, "a stream's SETs"),
    ] {
        let has = partition_count(admin.inner(), topic)?.unwrap_or(0);
        if has != count {
            return Err(ClusterError::Topic {
                topic: topic.clone(),
                reason: format!(
                    "has {has} partitions and {} has {count}: {what} must be on the partition its \
                     owner owns (recreate it with {count})",
                    topics.signals
                ),
            });
        }
    }
    if count != config.partitions {
        tracing::warn!(topic = %topics.signals, partitions = count, configured = config.partitions,
            "the signals topic exists with another partition count than configured; its own count decides ownership");
    }
    Ok(count)
}

/// The partition count of `topic` as `client` (an admin client's, a consumer's) is told by the
/// brokers, `None` if it does not exist.
pub(super) fn partition_count<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
) -> Result<Option<i32>, ClusterError> {
    let metadata = client
        .fetch_metadata(Some(topic), ADMIN_TIMEOUT)
        .map_err(|e| ClusterError::Brokers(e.to_string()))?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        .map(|t| i32::try_from(t.partitions().len()).unwrap_or(i32::MAX)))
}
