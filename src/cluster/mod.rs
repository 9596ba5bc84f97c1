//! Cluster mode: N Vigil instances on one Kafka cluster behave as one (`[cluster]`).
//!
//! **Ownership.** A principal's routing key (its principal key when an instance knows it, else its
//! first identifier's key; a session's or device's key for signals about those alone) maps to one
//! partition of `<name>.signals` ([`partition_of`]: Kafka's murmur2 partitioner). The consumer
//! group `<name>` assigns each partition to one instance; that instance owns the partition's
//! principals — their contexts, grants and decisions — and only it applies their signals.
//!
//! **Any instance takes a SET.** After full validation a pushed SET is appended to the signals
//! topic on its principal's partition ([`SignalLog`], `acks=all`) and only then answered 202; the
//! brokers not taking it in `cluster.publish_timeout_ms` is a 503 with `Retry-After`, and nothing
//! was acknowledged. The owner consumes the partition through the Kafka source's pipeline (offset
//! committed only after the signal's effects are durable in its state store), so a SET received
//! twice, by one instance or two, is applied twice with no further effect (an equal fact is not an
//! update; the decision id names the signal's `jti`).
//!
//! **Any instance answers the grant API, `check` and decisions.** Instances announce themselves
//! and the partitions they own on `<name>.members` ([`Directory`]); a registration, read, deletion
//! or check of a grant another instance owns is forwarded to it and its answer returned
//! ([`Peers`]). Every instance copies the others' decisions into its own audit log
//! ([`DecisionCopies`]), so `/v1/decisions` is answered with the whole cluster's, also those of
//! an instance that is gone.
//!
//! **State moves with its partition.** Every change an owner makes is also appended to the state
//! topic ([`StateLog`]) before it is acknowledged; an instance assigned a partition restores it
//! from there before it applies any of the partition's signals, and one that gives a partition up
//! forgets it ([`Handover`]). Identifier links go to the alias topic too, which every instance
//! reads whole ([`follow_aliases`]), so a signal is routed to its principal's owner by any of its
//! identifiers.
//!
//! With `cluster.standby` the restore starts from a warm copy of the partition ([`Standby`]).
//!
//! **Enforcement points.** Every instance signs with the cluster's keys ([`shared_identity`]) and
//! knows every stream ([`share_streams`]); a stream's SETs are delivered by the owner of its
//! partition, whose outbox moves with the partition ([`Outboxes`]); poll and SSE on another
//! instance are passed on to it ([`StreamCalls`]).
//!
//! **Risk feeds** are consumed by their own group and re-keyed onto the signals topic
//! ([`ClusterIntake`] as a `kafka::SignalForward`).
//!
//! **Streams kept at transmitters** run on one instance at a time ([`while_owned`]), with the
//! cluster's records of them (on the streams topic).
//!
//! **Checks of grants held elsewhere** use the status view every instance keeps ([`StatusView`]).
//!
//! **Replay and the live feed** read the signals topic back ([`SignalHistory`]): each instance
//! replays the partitions it owns; the feed merges every partition's newest records.

mod aliases;
mod decision_copies;
mod forward;
mod handover;
mod keys;
mod lease;
mod members;
mod partition;
mod signal_history;
mod signal_log;
mod standby;
mod state_log;
mod status_view;
mod stream_calls;
mod streams;
mod topic_writer;
mod topics;

pub use aliases::follow as follow_aliases;
pub use decision_copies::DecisionCopies;
pub use forward::{Answer, Call, ForwardError, Peers, FORWARDED};
pub use handover::Handover;
pub use keys::{shared_identity, KeySettings};
pub use lease::while_owned;
pub use members::{Directory, Member};
pub use partition::{murmur2, partition_of};
pub use signal_history::SignalHistory;
pub use signal_log::{PublishError, SignalLog};
pub use standby::{PartitionCopy, Standby};
pub use state_log::{read_partition, StateLog};
pub use status_view::StatusView;
pub use stream_calls::StreamCalls;
pub use streams::{managed_key, share_streams, ManagedRecords, Outboxes, Sharing, StreamTopics};
pub use topic_writer::TopicWriter;
pub use topics::{client_config, ensure, Topics};

use crate::config::ClusterConfig;

/// Where validated signals go in cluster mode: the signals topic, on their principal's partition.
/// Pushed and polled SETs come through [`ClusterIntake::append`]; risk-feed messages, consumed by
/// whichever instance the feeds' group gave their partition, through [`SignalForward`]: the owner
/// applies them either way.
pub struct ClusterIntake {
    log: std::sync::Arc<SignalLog>,
    engine: std::sync::Arc<crate::engine::Engine>,
    runtime: tokio::runtime::Handle,
}

impl ClusterIntake {
    /// Within the Tokio runtime (forwarded batches are appended on it).
    pub fn new(log: SignalLog, engine: std::sync::Arc<crate::engine::Engine>) -> ClusterIntake {
        ClusterIntake {
            log: std::sync::Arc::new(log),
            engine,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Appends `signal` for its principal's owner; its offset once the brokers have it.
    pub async fn append(
        &self,
        signal: &crate::signal::Signal,
        token: &str,
    ) -> Result<u64, PublishError> {
        let key = self.engine.routing_key(&signal.subject);
        let (_, offset) = self.log.append(&key, signal, token).await?;
        Ok(u64::try_from(offset).unwrap_or(0))
    }
}

impl crate::kafka::SignalForward for ClusterIntake {
    /// Appends a feed batch's signals, each on its principal's partition; the batch is answered
    /// once the brokers have them all (then its feed offsets may be committed).
    fn forward(&self, signals: Vec<crate::signal::Signal>) -> crate::engine::BatchDone {
        let (done, answer) = tokio::sync::oneshot::channel();
        let keyed: Vec<(String, crate::signal::Signal)> = signals
            .into_iter()
            .map(|s| (self.engine.routing_key(&s.subject), s))
            .collect();
        let log = self.log.clone();
        self.runtime.spawn(async move {
            let appends = keyed
                .iter()
                .map(|(key, signal)| log.append(key, signal, ""));
            let outcome = futures_util::future::join_all(appends)
                .await
                .into_iter()
                .find_map(Result::err)
                .map_or(Ok(()), |e| Err(e.to_string()));
            let _ = done.send(outcome);
        });
        crate::engine::BatchDone::of(vec![answer])
    }
}

/// Which principals this instance owns: those whose routing key falls on a partition the group
/// assigned it.
pub struct Ownership {
    partitions: i32,
    health: std::sync::Arc<crate::kafka::KafkaHealth>,
}

impl Ownership {
    pub fn new(partitions: i32, health: std::sync::Arc<crate::kafka::KafkaHealth>) -> Ownership {
        Ownership { partitions, health }
    }

    /// The signals topic's partition count.
    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// `Ok` when this instance owns `key`'s partition; else the partition, owned elsewhere (or
    /// by nobody during a rebalance).
    pub fn check(&self, key: &str) -> Result<(), i32> {
        let partition = partition_of(key, self.partitions);
        if self.health.owns(partition) {
            Ok(())
        } else {
            Err(partition)
        }
    }
}

/// The Kafka source's settings for consuming the signals topic as the group `<name>`.
/// The group rebalances incrementally (cooperative-sticky, unless the operator's properties say
/// otherwise): only the partitions that move change hands, so only their state is restored.
pub fn source_config(config: &ClusterConfig, topics: &Topics) -> crate::config::KafkaConfig {
    let mut properties = config.properties.clone();
    properties
        .entry("partition_assignment_strategy".into())
        .or_insert_with(|| "cooperative-sticky".into());
    // A signal's revocation waits for the owner's fetch: a broker that does not answer a fetch
    // as soon as a record arrives (librdkafka's mock one) holds it up to this long (500 ms by
    // default, a quarter-second median delay on every revocation).
    properties
        .entry("fetch_wait_max_ms".into())
        .or_insert_with(|| "25".into());
    crate::config::KafkaConfig {
        brokers: config.brokers.clone(),
        group_id: config.name.clone(),
        topics: vec![topics.signals.clone()],
        dead_letter_topic: topics.signals_dead_letter.clone(),
        properties,
        ..crate::config::KafkaConfig::default()
    }
}

/// This instance's id: the configured one, else the one kept in `<data_dir>/instance.id`
/// (generated at the first start), so a restarted instance is the same member.
pub fn instance_id(
    config: &ClusterConfig,
    data_dir: &std::path::Path,
) -> Result<String, ClusterError> {
    if !config.instance_id.is_empty() {
        return Ok(config.instance_id.clone());
    }
    let path = data_dir.join("instance.id");
    let file_error =
        |e: std::io::Error| ClusterError::InstanceId(format!("{}: {e}", path.display()));
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_owned()),
        Ok(_) => Err(ClusterError::InstanceId(format!(
            "{} is empty",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = format!("vigil-{:016x}", rand::random::<u64>());
            std::fs::write(&path, &id).map_err(file_error)?;
            Ok(id)
        }
        Err(e) => Err(file_error(e)),
    }
}

/// Where the other instances reach this one: `cluster.advertised_url`, else the listener's.
pub fn advertised_url(
    config: &ClusterConfig,
    listening: std::net::SocketAddr,
    tls: bool,
) -> String {
    if !config.advertised_url.is_empty() {
        return config.advertised_url.clone();
    }
    format!("{}://{listening}", if tls { "https" } else { "http" })
}

/// Why cluster mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("kafka client: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
    #[error("the cluster's brokers did not answer: {0}")]
    Brokers(String),
    #[error("cluster topic {topic}: {reason}")]
    Topic { topic: String, reason: String },
    #[error("the instance id: {0}")]
    InstanceId(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An instance owns a key exactly when the group gave it the key's partition; during a
    /// rebalance (nothing owned) it owns nothing.
    #[test]
    fn ownership_follows_the_partitions_assigned() {
        let health = std::sync::Arc::new(crate::kafka::KafkaHealth::for_cluster());
        let ownership = Ownership::new(12, health.clone());
        let key = "email:jane@example.com";
        let p = partition_of(key, 12);
        assert_eq!(ownership.check(key), Err(p));
        health.rebalanced([p, (p + 1) % 12].into_iter(), true);
        assert_eq!(ownership.check(key), Ok(()));
        assert_eq!(
            health
                .view()
                .and_then(|v| v.owned_partitions)
                .map(|o| o.len()),
            Some(2)
        );
        health.rebalanced(std::iter::once(p), false);
        assert_eq!(ownership.check(key), Err(p));
    }

    #[test]
    fn an_instance_keeps_its_generated_id_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let config = ClusterConfig::default();
        let first = instance_id(&config, dir.path()).unwrap();
        assert_eq!(instance_id(&config, dir.path()).unwrap(), first);
        let named = ClusterConfig {
            instance_id: "zone-a-1".into(),
            ..ClusterConfig::default()
        };
        assert_eq!(instance_id(&named, dir.path()).unwrap(), "zone-a-1");
    }
}
