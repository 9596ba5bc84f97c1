//! The members directory: which instance owns which partitions of the signals topic, and where it
//! answers. Every instance announces itself on `<name>.members` (compacted, one partition, keyed by
//! instance id) when its partitions change and every [`ANNOUNCE_EVERY`], and leaves a tombstone when
//! it shuts down; every instance reads the whole topic into memory. An instance not heard from for
//! [`FRESH_FOR`] (by the reader's clock, when it read the record: the instances' clocks may
//! disagree) has died and owns nothing; one not heard from for [`FORGOTTEN_AFTER`] is dropped from
//! memory (an instance with a fresh id at each start would otherwise grow the map forever). So an API call about a principal that
//! another instance owns is answered by that instance, whichever one received it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::consumer::BaseConsumer;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{topics, ClusterError};
use crate::clock::Clock;
use crate::config::ClusterConfig;
use crate::engine::GrantCounts;
use crate::kafka::{KafkaHealth, ProducerLogs};

/// How often an instance says it is alive and what it owns.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(2);
/// How long an announcement counts: an instance silent for longer has died.
pub const FRESH_FOR: Duration = Duration::from_secs(10);
/// When a silent instance is dropped from memory.
pub const FORGOTTEN_AFTER: Duration = Duration::from_secs(3600);

/// One instance, as it announced itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub instance: String,
    /// Where its API answers (`cluster.advertised_url`).
    pub url: String,
    /// The partitions of the signals topic it owns.
    pub partitions: Vec<i32>,
    /// When it announced this (milliseconds since the epoch, its own clock: informative only).
    pub at_ms: i64,
    /// Grants it holds per party (registrant name): a party's grant quota is the cluster's
    /// ([`GrantCounts`]). Absent from an older instance's record.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub grants: BTreeMap<String, usize>,
}

impl Member {
    /// This instance, answering at `url`, before it announces what it owns and holds.
    pub fn new(instance: String, url: String) -> Member {
        Member {
            instance,
            url,
            partitions: Vec::new(),
            at_ms: 0,
            grants: BTreeMap::new(),
        }
    }
}

/// A member and when this instance last heard from it (its own clock).
struct Heard {
    member: Member,
    at_ms: i64,
}

/// The members of the cluster as this instance last read them.
pub struct Directory {
    me: Member,
    members: RwLock<HashMap<String, Heard>>,
    producer: FutureProducer<ProducerLogs>,
    topic: String,
    health: Arc<KafkaHealth>,
    /// This instance's grants per party, announced; the others' announced counts go back in.
    counts: Arc<GrantCounts>,
    clock: Clock,
}

impl Directory {
    /// Starts reading the members topic (a thread) and announcing this instance (the task
    /// returned); both stop at `shutdown`, the announcer after leaving a tombstone.
    pub fn start(
        config: &ClusterConfig,
        topic: String,
        me: Member,
        health: Arc<KafkaHealth>,
        counts: Arc<GrantCounts>,
        clock: Clock,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(Arc<Directory>, tokio::task::JoinHandle<()>), ClusterError> {
        let mut producer = topics::client_config(config);
        producer
            .set("acks", "all")
            .set("message.timeout.ms", "5000");
        let directory = Arc::new(Directory {
            me,
            members: RwLock::new(HashMap::new()),
            producer: producer.create_with_context(ProducerLogs)?,
            topic: topic.clone(),
            health,
            counts,
            clock,
        });
        // The reader: every record from the beginning, then as they come.
        let consumer = topics::whole_topic_reader(config, &topic, &directory.me.instance)?;
        let reader = directory.clone();
        let stop = shutdown.clone();
        std::thread::Builder::new()
            .name("vigil-members".into())
            .spawn(move || reader.read(consumer, stop))
            .map_err(|e| ClusterError::Brokers(e.to_string()))?;
        let announcer = tokio::spawn(directory.clone().announce(shutdown));
        Ok((directory, announcer))
    }

    fn read(&self, consumer: BaseConsumer, shutdown: watch::Receiver<bool>) {
        topics::read_until(&consumer, &shutdown, "the members topic", |message| {
            let Some(key) = message.key().and_then(|k| std::str::from_utf8(k).ok()) else {
                return;
            };
            let now = self.clock.now_ms();
            let mut members = self
                .members
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match message.payload() {
                None => {
                    members.remove(key);
                }
                Some(bytes) => match serde_json::from_slice::<Member>(bytes) {
                    Ok(member) if member.instance == key => {
                        members.insert(key.to_owned(), Heard { member, at_ms: now });
                    }
                    _ => tracing::warn!(key, "an unreadable record on the members topic"),
                },
            }
            let forgotten = now.saturating_sub(millis(FORGOTTEN_AFTER));
            members.retain(|_, h| h.at_ms >= forgotten);
            metrics::gauge!(crate::telemetry::CLUSTER_MEMBERS).set(members.len() as f64);
            drop(members);
            let others = self.live();
            self.counts
                .set_elsewhere(others.iter().map(|h| &h.member.grants));
        });
    }

    async fn announce(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let mut me = self.me.clone();
            me.partitions = self.health.owned().unwrap_or_default();
            me.at_ms = self.clock.now_ms();
            me.grants = self.counts.by_name();
            self.publish(Some(&me)).await;
            // The others' counts as of now: an instance gone silent no longer counts.
            let others = self.live();
            self.counts
                .set_elsewhere(others.iter().map(|h| &h.member.grants));
            tokio::select! {
                _ = tokio::time::sleep(ANNOUNCE_EVERY) => {}
                _ = self.health.changed() => {}
                _ = shutdown.changed() => break,
            }
        }
        // Leaving: the others stop sending here at once rather than after `FRESH_FOR`.
        self.publish(None).await;
    }

    async fn publish(&self, member: Option<&Member>) {
        let payload = member.and_then(|m| serde_json::to_vec(m).ok());
        // Partition 0, where the directory's readers read: the topic is created with one, but a
        // broker may have made more (tansu makes four whatever is asked), and the partitioner
        // would then scatter the announcements where no reader looks.
        let mut record = FutureRecord::<str, Vec<u8>>::to(&self.topic)
            .key(&self.me.instance)
            .partition(0);
        if let Some(p) = &payload {
            record = record.payload(p);
        }
        if let Err((e, _)) = self.producer.send(record, Duration::from_secs(5)).await {
            tracing::warn!(error = %e, "could not announce this instance on the members topic");
        }
    }

    /// The live instance that owns `partition`, other than this one (the one heard from last,
    /// while a rebalance has two claim it).
    pub fn owner_of(&self, partition: i32) -> Option<Member> {
        self.live()
            .into_iter()
            .filter(|h| h.member.partitions.contains(&partition))
            .max_by_key(|h| h.at_ms)
            .map(|h| h.member)
    }

    /// The other live instances, by id.
    pub fn others(&self) -> Vec<Member> {
        let mut others: Vec<Member> = self.live().into_iter().map(|h| h.member).collect();
        others.sort_by(|a, b| a.instance.cmp(&b.instance));
        others
    }

    /// The other instances heard from within [`FRESH_FOR`].
    fn live(&self) -> Vec<Heard> {
        let fresh_since = self.clock.now_ms().saturating_sub(millis(FRESH_FOR));
        let members = self
            .members
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        members
            .values()
            .filter(|h| h.member.instance != self.me.instance && h.at_ms >= fresh_since)
            .map(|h| Heard {
                member: h.member.clone(),
                at_ms: h.at_ms,
            })
            .collect()
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
