//! Enforcement points' streams for the whole cluster. Their configurations and subjects live in
//! `<name>.streams` (compacted, one partition), which every instance reads whole into its
//! [`StreamStore`]: any instance answers SSF stream management and selects and signs a decision's
//! SETs. The records of the streams Vigil keeps at its transmitters (`managed \x1f <transmitter>`:
//! the stream id and the push credential every instance accepts) live there too, handed to
//! whoever takes them up ([`ManagedRecords`]). Every SET goes to `<name>.outbox` on its stream's partition (`partition_of(stream id)`,
//! the same partitions as the signals topic); the instance owning that partition reads it back
//! into the stream's local outbox and delivers it — push from there, poll and SSE forwarded there
//! from any instance. A delivery, a dead letter or a replay is a later record of the SET's key,
//! so the instance that takes a partition over reads the partition to its end before it delivers:
//! what it delivers is exactly what was still pending, in the same order (the record offsets are
//! the outbox's sequence numbers and SSE event ids), and a SET whose delivery was not yet recorded
//! is delivered again with the same `jti`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;

use super::topic_writer::{TopicRecord, TopicWriter, READ_BACK};
use super::{partition_of, topics, ClusterError};
use crate::config::ClusterConfig;
use crate::kafka::KafkaHealth;
use crate::transmitter::streams::{
    outbox_record_key, stream_of_record, ConfigRecord, OutboxEntry, OutboxRecord, ReadOutbox,
    SharedStreams, StreamStore,
};

/// How long start-up waits for the streams topic to be read to its end.
const CATCH_UP: Duration = Duration::from_secs(30);
/// How long a handover may read one outbox partition.
const RESTORE_DEADLINE: Duration = Duration::from_secs(120);

/// The streams and outbox topics, as the [`StreamStore`] of cluster mode uses them.
pub struct StreamTopics {
    writer: Arc<TopicWriter>,
    config_topic: String,
    outbox_topic: String,
    partitions: i32,
    health: Arc<KafkaHealth>,
    /// The offset after the last streams-topic record this instance has taken up.
    applied: watch::Receiver<i64>,
}

impl StreamTopics {
    /// The stream's partition (its deliverer is that partition's owner).
    pub fn partition_of(&self, stream: &str) -> i32 {
        partition_of(stream, self.partitions)
    }
}

/// The streams topic's key prefix of a managed stream's record.
const MANAGED: &str = "managed\x1f";

impl SharedStreams for StreamTopics {
    fn configure(&self, records: Vec<ConfigRecord>) -> BoxFuture<'static, Result<(), String>> {
        let (writer, topic, mut applied) = (
            self.writer.clone(),
            self.config_topic.clone(),
            self.applied.clone(),
        );
        Box::pin(async move {
            let records = TopicRecord::on_partition_zero(records);
            let offsets = writer.append(&topic, &records).await?;
            let last = offsets.into_iter().max().unwrap_or(-1);
            // Read back here, so the caller's next call on this instance sees the change.
            match tokio::time::timeout(READ_BACK, applied.wait_for(|a| *a > last)).await {
                Ok(Ok(_)) => Ok(()),
                _ => Err(format!(
                    "{topic}: the change was taken but not read back within {}s",
                    READ_BACK.as_secs()
                )),
            }
        })
    }

    fn queue(&self, records: Vec<OutboxRecord>) -> BoxFuture<'static, Result<(), String>> {
        let (writer, topic, partitions) = (
            self.writer.clone(),
            self.outbox_topic.clone(),
            self.partitions,
        );
        Box::pin(async move {
            let mut out = Vec::with_capacity(records.len());
            for r in records {
                let value = match &r.entry {
                    Some(entry) => Some(serde_json::to_vec(entry).map_err(|e| e.to_string())?),
                    None => None,
                };
                out.push(TopicRecord {
                    partition: partition_of(&r.stream, partitions),
                    key: outbox_record_key(&r.stream, &r.jti),
                    value,
                });
            }
            writer.append(&topic, &out).await.map(|_| ())
        })
    }

    fn delivers(&self, stream: &str) -> bool {
        self.health.owns(self.partition_of(stream))
    }
}

/// Which cluster an instance shares its streams with, and as whom.
pub struct Sharing<'a> {
    pub config: &'a ClusterConfig,
    pub topics: &'a super::Topics,
    /// The signals topic's partition count (the outbox topic has as many).
    pub partitions: i32,
    pub instance: &'a str,
    pub writer: Arc<TopicWriter>,
    /// Whose partitions are owned: a stream is delivered where its partition is.
    pub health: Arc<KafkaHealth>,
    /// Takes up a record of a stream Vigil keeps at a transmitter (its name, the record), as
    /// read from the topic ([`managed_key`]).
    pub on_managed: ManagedRecords,
}

/// What takes up the records of the streams Vigil keeps at its transmitters.
pub type ManagedRecords =
    Arc<dyn Fn(String, Vec<u8>) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// The streams topic's key of the record of the stream Vigil keeps at transmitter `name`.
pub fn managed_key(name: &str) -> String {
    format!("{MANAGED}{name}")
}

/// Shares `streams` through the cluster's topics: drops what the local tables held, reads the
/// streams topic to its end (or 30 s, with a warning) and follows it on a thread until
/// `shutdown`. Returns the topics, for the outbox's handover.
pub async fn share_streams(
    sharing: Sharing<'_>,
    streams: Arc<StreamStore>,
    shutdown: watch::Receiver<bool>,
) -> Result<Arc<StreamTopics>, ClusterError> {
    let Sharing {
        config,
        topics,
        partitions,
        instance,
        writer,
        health,
        on_managed,
    } = sharing;
    let consumer = topics::whole_topic_reader(config, &topics.streams, instance)?;
    let (low, end) = consumer
        .fetch_watermarks(&topics.streams, 0, Duration::from_secs(10))
        .map_err(|e| ClusterError::Brokers(format!("{}: {e}", topics.streams)))?;
    let (applied_tx, applied) = watch::channel(0i64);
    let shared = Arc::new(StreamTopics {
        writer,
        config_topic: topics.streams.clone(),
        outbox_topic: topics.outbox.clone(),
        partitions,
        health,
        applied,
    });
    streams
        .share(shared.clone())
        .await
        .map_err(|e| ClusterError::Brokers(e.to_string()))?;
    let runtime = tokio::runtime::Handle::current();
    let mut caught_up = shared.applied.clone();
    std::thread::Builder::new()
        .name("vigil-streams".into())
        .spawn(move || {
            topics::read_until(&consumer, &shutdown, "the streams topic", |message| {
                let key = message.key().and_then(|k| std::str::from_utf8(k).ok());
                let taken = match (key.map(|k| k.strip_prefix(MANAGED)), message.payload()) {
                    (None, _) => Ok(()),
                    (Some(Some(name)), Some(record)) => {
                        runtime.block_on(on_managed(name.to_owned(), record.to_vec()))
                    }
                    (Some(Some(_)), None) => Ok(()),
                    (Some(None), payload) => runtime
                        .block_on(streams.apply_config(key.unwrap_or_default(), payload))
                        .map_err(|e| e.to_string()),
                };
                if let Err(e) = taken {
                    tracing::warn!(offset = message.offset(), error = %e, "a record of the streams topic not taken up");
                }
                let _ = applied_tx.send(message.offset() + 1);
            });
        })
        .map_err(|e| ClusterError::Brokers(e.to_string()))?;
    if end > low
        && tokio::time::timeout(CATCH_UP, caught_up.wait_for(|a| *a >= end))
            .await
            .is_err()
    {
        tracing::warn!(topic = %topics.streams, "the streams topic was not read to its end in time; streams not yet read answer 404 here until they are");
    }
    Ok(shared)
}

/// What the outbox follower thread is told.
enum Follow {
    /// Read `partition` from `offset` on.
    From(i32, i64),
    /// Stop reading `partition`.
    Stop(i32),
}

/// The outboxes of the partitions this instance owns: read back when a partition is assigned,
/// then followed.
pub struct Outboxes {
    config: ClusterConfig,
    topics: Arc<StreamTopics>,
    streams: Arc<StreamStore>,
    follow: Mutex<mpsc::Sender<Follow>>,
    runtime: tokio::runtime::Handle,
}

impl Outboxes {
    /// Starts the follower thread (until `shutdown`). Within the Tokio runtime.
    pub fn start(
        config: &ClusterConfig,
        topics: Arc<StreamTopics>,
        streams: Arc<StreamStore>,
        instance: &str,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Outboxes>, ClusterError> {
        let consumer: BaseConsumer =
            topics::reader_config(config, &format!("{}.{instance}", topics.outbox_topic))
                .create()?;
        let (tx, rx) = mpsc::channel();
        let runtime = tokio::runtime::Handle::current();
        let (topic, store, rt) = (
            topics.outbox_topic.clone(),
            streams.clone(),
            runtime.clone(),
        );
        std::thread::Builder::new()
            .name("vigil-outbox".into())
            .spawn(move || follow(&consumer, &topic, &rx, &store, &rt, &shutdown))
            .map_err(|e| ClusterError::Brokers(e.to_string()))?;
        Ok(Arc::new(Outboxes {
            config: config.clone(),
            topics,
            streams,
            follow: Mutex::new(tx),
            runtime,
        }))
    }

    fn tell(&self, what: Follow) {
        let follow = match self.follow.lock() {
            Ok(f) => f,
            Err(p) => p.into_inner(),
        };
        let _ = follow.send(what);
    }

    fn on(&self, partitions: &[i32]) -> impl Fn(&str) -> bool + Sync + '_ {
        let set: HashSet<i32> = partitions.iter().copied().collect();
        move |stream: &str| set.contains(&self.topics.partition_of(stream))
    }

    /// Takes the outboxes of `partitions` over (blocking; the rebalance callback's): drops what
    /// was held for them, reads each to its end, queues what is still pending, then follows them.
    pub fn restore(&self, partitions: &[i32]) -> Result<usize, String> {
        self.release(partitions)?;
        let mut pending = 0;
        for &partition in partitions {
            let (records, end) = read_partition(&self.config, &self.topics.outbox_topic, partition)
                .map_err(|e| e.to_string())?;
            pending += records.len();
            self.runtime
                .block_on(self.streams.apply_outbox(records))
                .map_err(|e| e.to_string())?;
            self.tell(Follow::From(partition, end));
        }
        tracing::info!(?partitions, pending, "outboxes taken over");
        Ok(pending)
    }

    /// Gives the outboxes of `partitions` up: stops following them and forgets their SETs here.
    pub fn release(&self, partitions: &[i32]) -> Result<(), String> {
        for &partition in partitions {
            self.tell(Follow::Stop(partition));
        }
        let gone = self.on(partitions);
        self.runtime
            .block_on(self.streams.release_outbox(&gone))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// Follows the partitions it is told to, handing each poll's records to `streams` in one write.
fn follow(
    consumer: &BaseConsumer,
    topic: &str,
    told: &mpsc::Receiver<Follow>,
    streams: &StreamStore,
    runtime: &tokio::runtime::Handle,
    shutdown: &watch::Receiver<bool>,
) {
    let mut followed: BTreeMap<i32, ()> = BTreeMap::new();
    while !*shutdown.borrow() {
        while let Ok(what) = told.try_recv() {
            let mut list = TopicPartitionList::new();
            let result = match what {
                Follow::From(partition, offset) => {
                    followed.insert(partition, ());
                    list.add_partition_offset(topic, partition, Offset::Offset(offset))
                        .and_then(|()| consumer.incremental_assign(&list))
                }
                Follow::Stop(partition) => {
                    if followed.remove(&partition).is_none() {
                        continue;
                    }
                    list.add_partition(topic, partition);
                    consumer.incremental_unassign(&list)
                }
            };
            if let Err(e) = result {
                tracing::error!(%topic, error = %e, "outbox partitions not (un)assigned");
            }
        }
        if followed.is_empty() {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let mut batch = Vec::new();
        let mut wait = Duration::from_millis(100);
        while batch.len() < 512 {
            match consumer.poll(wait) {
                None => break,
                Some(Err(e)) => {
                    tracing::warn!(%topic, error = %e, "reading the outbox topic");
                    break;
                }
                Some(Ok(message)) => {
                    if followed.contains_key(&message.partition()) {
                        if let Some(record) = decode(&message) {
                            batch.push(record);
                        }
                    }
                    wait = Duration::ZERO;
                }
            }
        }
        if let Err(e) = runtime.block_on(streams.apply_outbox(batch)) {
            tracing::error!(%topic, error = %e, "outbox records not taken up");
        }
    }
}

/// A record of the outbox topic, or `None` (logged) when it cannot be read.
fn decode(message: &rdkafka::message::BorrowedMessage<'_>) -> Option<ReadOutbox> {
    let key = message.key().and_then(|k| std::str::from_utf8(k).ok())?;
    let entry = match message.payload() {
        None => None,
        Some(bytes) => match serde_json::from_slice::<OutboxEntry>(bytes) {
            Ok(entry) => Some(entry),
            Err(e) => {
                tracing::warn!(offset = message.offset(), error = %e, "an unreadable outbox record");
                return None;
            }
        },
    };
    Some(ReadOutbox {
        offset: message.offset(),
        key: key.to_owned(),
        entry,
    })
}

/// Reads `partition` of the outbox topic to its end as of now: each SET's state after its last
/// record, in the order of its first (pending) record; and the offset to follow on from.
fn read_partition(
    config: &ClusterConfig,
    topic: &str,
    partition: i32,
) -> Result<(Vec<ReadOutbox>, i64), ClusterError> {
    let (consumer, low, high) = topics::partition_reader(config, topic, partition)?;
    let mut records: Vec<ReadOutbox> = Vec::new();
    if high > low {
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(topic, partition, Offset::Offset(low))?;
        consumer.assign(&assignment)?;
        let what = format!("{topic}/{partition}");
        topics::read_to_end(&consumer, &what, high, RESTORE_DEADLINE, |message| {
            records.extend(decode(message));
        })?;
    }
    // Only the records that matter: a pending SET's last record (a replayed one goes where it
    // was replayed), a dead letter with the SET's first record (it is filed under that place);
    // a SET delivered since is left out.
    let mut last: HashMap<&str, usize> = HashMap::new();
    let mut first_pending: HashMap<&str, usize> = HashMap::new();
    for (i, r) in records.iter().enumerate() {
        last.insert(r.key.as_str(), i);
        if matches!(r.entry, Some(OutboxEntry::Pending { .. })) {
            first_pending.entry(r.key.as_str()).or_insert(i);
        }
    }
    let mut kept: Vec<ReadOutbox> = Vec::new();
    for (key, &at) in &last {
        match &records[at].entry {
            None => {}
            Some(OutboxEntry::Pending { .. }) => kept.push(records[at].clone()),
            Some(OutboxEntry::Dead { .. }) => {
                if let Some(&first) = first_pending.get(key) {
                    kept.push(records[first].clone());
                }
                kept.push(records[at].clone());
            }
        }
    }
    kept.sort_by_key(|r| r.offset);
    tracing::debug!(%topic, partition, records = high - low, kept = kept.len(),
        streams = kept.iter().map(|r| stream_of_record(&r.key)).collect::<HashSet<_>>().len(),
        "outbox partition read back");
    Ok((kept, high))
}
