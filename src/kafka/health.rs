//! What the Kafka source tells `/readyz`: the partitions of its topics, how many this instance
//! consumes, whether a broker is reachable — read from librdkafka's periodic statistics
//! (`statistics.interval.ms`, 5 s), so no extra broker round trip is made for it.
//!
//! A single node must consume every partition of its topics: a second instance in the same consumer
//! group would take some, and the risk signals on them would never reach this instance's grants —
//! revocations silently missed. So such an instance is not ready, says why in an error log, and
//! shows it in `vigil_kafka_partitions_owned` against `vigil_kafka_partitions`. In cluster mode
//! splitting the partitions is the point: an instance owns the principals of the partitions it
//! is assigned (listed in `/readyz` as `owned_partitions`, kept from the rebalance callbacks).

use std::collections::{BTreeSet, HashSet};
use std::sync::Mutex;

use serde::Serialize;

/// The source's state as of the last statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KafkaView {
    /// Partitions of the subscribed topics.
    pub partitions: usize,
    /// Of those, the ones this instance consumes.
    pub assigned: usize,
    /// Brokers known.
    pub brokers: usize,
    /// Of those, the ones with an open connection. librdkafka connects only to the brokers it
    /// needs (the leaders of the partitions consumed, the group's coordinator), so fewer than
    /// `brokers` is normal: the others are idle, not down.
    pub brokers_up: usize,
    /// Brokers whose connection was lost or is being tried again: neither up nor idle.
    pub brokers_down: usize,
    /// Partitions this instance consumes (`topic/partition`) whose leader was not connected at
    /// two statistics reports in a row (so a connection being made at start-up is not one):
    /// their signals wait until it is back (or another broker leads them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub leader_unreachable: Vec<String>,
    /// Messages this instance has yet to consume, summed over its partitions: a lagging instance
    /// is ready (it is catching up), and says by how much.
    pub lag: u64,
    /// Cluster mode: the partitions of the signals topic this instance owns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owned_partitions: Option<Vec<i32>>,
    /// Cluster mode: partitions assigned whose state is being taken over from the state topic
    /// (not yet owned), or could not be.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub restoring: Vec<PartitionRestore>,
    /// The instances of a cluster split the partitions (its risk feeds' group): consuming some
    /// of them is the norm, not a problem.
    #[serde(skip)]
    pub split: bool,
}

/// A partition's state being taken over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionRestore {
    pub partition: i32,
    /// State topic records left to read.
    pub remaining: u64,
    /// Why it could not be taken over (the partition is paused until the next rebalance).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

impl KafkaView {
    /// Why the source is not ready, if it is not.
    pub fn problem(&self) -> Option<String> {
        if self.brokers > 0 && self.brokers_up == 0 {
            return Some("no Kafka broker is reachable".into());
        }
        if !self.leader_unreachable.is_empty() {
            return Some(format!(
                "the leader of partitions {} is not reachable: their signals wait until it is",
                self.leader_unreachable.join(", ")
            ));
        }
        if self.owned_partitions.is_none() && !self.split && self.assigned < self.partitions {
            return Some(format!(
                "this instance consumes {} of {} partitions: another consumer in its group holds \
                 the rest, and their signals never reach this instance's grants (one instance per \
                 group until cluster mode)",
                self.assigned, self.partitions
            ));
        }
        if let Some(r) = self.restoring.iter().find(|r| r.failed.is_some()) {
            return Some(format!(
                "the state of partition {} could not be taken over: {}",
                r.partition,
                r.failed.as_deref().unwrap_or_default()
            ));
        }
        None
    }
}

/// The brokers as one statistics report has them.
struct Brokers {
    known: usize,
    /// Node ids of the brokers with an open connection.
    up: Vec<i32>,
    down: usize,
}

impl Brokers {
    /// From each broker's node id and state; bootstrap entries (node id -1) are not brokers.
    /// `INIT` is a broker never connected to because nothing needed it yet; every state other
    /// than that and `UP` is a connection lost or being tried again.
    fn of<'a>(states: impl Iterator<Item = (i32, &'a str)>) -> Brokers {
        let mut brokers = Brokers {
            known: 0,
            up: Vec::new(),
            down: 0,
        };
        for (node, state) in states.filter(|(node, _)| *node >= 0) {
            brokers.known += 1;
            match state {
                "UP" => brokers.up.push(node),
                "INIT" => {}
                _ => brokers.down += 1,
            }
        }
        brokers
    }

    /// Whether broker `node` is connected (a partition whose leader is unknown, -1, is not).
    fn up(&self, node: i32) -> bool {
        self.up.contains(&node)
    }
}

/// Shared between the consumer's statistics callback and `/readyz`.
#[derive(Default)]
pub struct KafkaHealth {
    view: Mutex<Option<KafkaView>>,
    /// Partitions whose lag gauge was set, so it can be cleared when they move away.
    lagging: Mutex<HashSet<(String, i32)>>,
    /// Partitions consumed whose leader was not connected at the last statistics report.
    leaderless: Mutex<BTreeSet<String>>,
    /// Cluster mode: the partitions owned (`None`: a single node's source).
    owned: Option<Mutex<BTreeSet<i32>>>,
    /// Woken when the partitions owned change.
    changes: tokio::sync::Notify,
    /// Cluster mode: restores in progress or failed, by partition.
    restores: Mutex<std::collections::BTreeMap<i32, PartitionRestore>>,
    /// The cluster's risk feeds: its instances split the partitions ([`KafkaView::split`]).
    split: bool,
}

impl KafkaHealth {
    /// The health of cluster mode's source, whose instances split the partitions.
    pub fn for_cluster() -> KafkaHealth {
        KafkaHealth {
            owned: Some(Mutex::new(BTreeSet::new())),
            ..KafkaHealth::default()
        }
    }

    /// The health of cluster mode's risk-feed source: the feeds' group splits their partitions
    /// between the instances.
    pub fn for_split_group() -> KafkaHealth {
        KafkaHealth {
            split: true,
            ..KafkaHealth::default()
        }
    }

    /// Which consumer the partition gauges describe: cluster mode runs two (the signals topic's
    /// and the risk feeds' group), and unlabeled gauges would mix their counts.
    fn consumer_label(&self) -> &'static str {
        if self.owned.is_some() {
            "signals"
        } else {
            "risk_feeds"
        }
    }

    /// The last view, `None` before the first statistics (in cluster mode, the partitions owned
    /// are known from the first assignment on).
    pub fn view(&self) -> Option<KafkaView> {
        let view = self.view.lock().ok().and_then(|v| v.clone());
        let Some(owned) = self.owned() else {
            return view.map(|v| KafkaView {
                split: self.split,
                ..v
            });
        };
        let mut view = view.unwrap_or_default();
        view.assigned = owned.len();
        view.owned_partitions = Some(owned);
        view.restoring = self.lock_restores().values().cloned().collect();
        Some(view)
    }

    fn lock_restores(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<i32, PartitionRestore>> {
        self.restores
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Cluster mode: `remaining` state records are left to read for `partition` (0 when
    /// restored: it is then no longer listed).
    pub fn restore_progress(&self, partition: i32, remaining: u64) {
        metrics::gauge!(crate::telemetry::CLUSTER_RESTORE_REMAINING, "partition" => partition.to_string())
            .set(remaining as f64);
        let mut restores = self.lock_restores();
        if remaining == 0 {
            restores.remove(&partition);
        } else {
            restores.insert(
                partition,
                PartitionRestore {
                    partition,
                    remaining,
                    failed: None,
                },
            );
        }
    }

    /// Cluster mode: `partition`'s state could not be taken over (`/readyz` says so until it is).
    pub fn restore_failed(&self, partition: i32, reason: String) {
        let mut restores = self.lock_restores();
        let entry = restores.entry(partition).or_insert(PartitionRestore {
            partition,
            remaining: 0,
            failed: None,
        });
        entry.failed = Some(reason);
    }

    /// Cluster mode: the partitions this instance owns, in order.
    pub fn owned(&self) -> Option<Vec<i32>> {
        let owned = self.owned.as_ref()?;
        let owned = owned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Some(owned.iter().copied().collect())
    }

    /// Cluster mode: whether `partition` is owned here (no copy of the set: asked on every
    /// check, poll and push of another instance's grant or stream).
    pub fn owns(&self, partition: i32) -> bool {
        self.owned.as_ref().is_some_and(|owned| {
            owned
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains(&partition)
        })
    }

    /// Partitions given to (`gained`) or taken from this instance by a rebalance.
    pub(crate) fn rebalanced(&self, partitions: impl Iterator<Item = i32>, gained: bool) {
        let Some(owned) = &self.owned else {
            return;
        };
        let mut owned = owned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for p in partitions {
            if gained {
                owned.insert(p);
            } else {
                owned.remove(&p);
            }
        }
        metrics::gauge!(crate::telemetry::CLUSTER_PARTITIONS_OWNED).set(owned.len() as f64);
        tracing::info!(owned = ?*owned, "partitions of the signals topic owned");
        self.changes.notify_waiters();
    }

    /// Returns when the partitions owned next change.
    pub async fn changed(&self) {
        self.changes.notified().await;
    }

    /// Takes in one statistics report for `topics` (the subscribed ones).
    pub(crate) fn observe(&self, stats: &rdkafka::Statistics, topics: &[String]) {
        let mut partitions = 0;
        let mut assigned = 0;
        let mut lag: u64 = 0;
        let mut desired: BTreeSet<(String, i32)> = BTreeSet::new();
        for (topic, t) in &stats.topics {
            if !topics.contains(topic) {
                continue;
            }
            for (&partition, p) in &t.partitions {
                if partition < 0 {
                    continue;
                }
                partitions += 1;
                if p.desired {
                    assigned += 1;
                    desired.insert((topic.clone(), partition));
                    if p.consumer_lag >= 0 {
                        lag = lag.saturating_add(p.consumer_lag.unsigned_abs());
                        metrics::gauge!(crate::telemetry::KAFKA_CONSUMER_LAG, "topic" => topic.clone(),
                            "partition" => partition.to_string())
                        .set(p.consumer_lag as f64);
                    }
                }
            }
        }
        if let Ok(mut lagging) = self.lagging.lock() {
            // A partition that moved away keeps no stale lag.
            for (topic, partition) in lagging.iter() {
                if !desired.contains(&(topic.clone(), *partition)) {
                    metrics::gauge!(crate::telemetry::KAFKA_CONSUMER_LAG, "topic" => topic.clone(),
                        "partition" => partition.to_string())
                    .set(0.0);
                }
            }
            *lagging = desired.into_iter().collect();
        }
        let brokers = Brokers::of(stats.brokers.values().map(|b| (b.nodeid, b.state.as_str())));
        let mut leader_unreachable = Vec::new();
        for (topic, t) in stats.topics.iter().filter(|(t, _)| topics.contains(t)) {
            for (&partition, p) in &t.partitions {
                if partition >= 0 && p.desired && !brokers.up(p.leader) {
                    leader_unreachable.push(format!("{topic}/{partition}"));
                }
            }
        }
        // Only those seen so at the report before too.
        let leader_unreachable: Vec<String> = {
            let mut before = self
                .leaderless
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now: BTreeSet<String> = leader_unreachable.into_iter().collect();
            let both = now.intersection(&before).cloned().collect();
            *before = now;
            both
        };
        let view = KafkaView {
            partitions,
            assigned,
            brokers: brokers.known,
            brokers_up: brokers.up.len(),
            brokers_down: brokers.down,
            leader_unreachable,
            lag,
            owned_partitions: self.owned.as_ref().map(|_| Vec::new()),
            restoring: Vec::new(),
            split: self.split,
        };
        let consumer = self.consumer_label();
        metrics::gauge!(crate::telemetry::KAFKA_PARTITIONS, "consumer" => consumer)
            .set(partitions as f64);
        metrics::gauge!(crate::telemetry::KAFKA_PARTITIONS_OWNED, "consumer" => consumer)
            .set(assigned as f64);
        let Ok(mut last) = self.view.lock() else {
            return;
        };
        let problem = view.problem();
        if problem != last.as_ref().and_then(KafkaView::problem) {
            match &problem {
                Some(why) => tracing::error!(alert = true, "kafka source not ready: {why}"),
                None => tracing::info!(partitions, assigned, "kafka source ready"),
            }
        }
        *last = Some(view);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_owning_every_partition_or_no_broker_is_a_problem() {
        let view = |partitions, assigned, brokers, brokers_up| KafkaView {
            partitions,
            assigned,
            brokers,
            brokers_up,
            brokers_down: 0,
            leader_unreachable: Vec::new(),
            lag: 0,
            owned_partitions: None,
            restoring: Vec::new(),
            split: false,
        };
        assert_eq!(view(4, 4, 1, 1).problem(), None);
        let feeds = KafkaView {
            split: true,
            ..view(4, 2, 1, 1)
        };
        assert_eq!(
            feeds.problem(),
            None,
            "a cluster's feed consumers split them"
        );
        let lagging = KafkaView {
            lag: 50_000,
            ..view(4, 4, 1, 1)
        };
        assert_eq!(
            lagging.problem(),
            None,
            "a lagging instance catches up, ready"
        );
        assert!(view(4, 2, 1, 1).problem().unwrap().contains("2 of 4"));
        assert!(view(4, 4, 3, 0)
            .problem()
            .unwrap()
            .contains("no Kafka broker"));
        assert_eq!(view(0, 0, 0, 0).problem(), None, "nothing known yet");
        assert_eq!(
            view(4, 4, 3, 1).problem(),
            None,
            "brokers nothing needs are idle"
        );
        let stalled = KafkaView {
            leader_unreachable: vec!["vigil.risk/2".into()],
            ..view(4, 4, 3, 2)
        };
        assert!(stalled.problem().unwrap().contains("vigil.risk/2"));
        let clustered = KafkaView {
            owned_partitions: Some(vec![1, 4]),
            ..view(12, 2, 3, 3)
        };
        assert_eq!(
            clustered.problem(),
            None,
            "in cluster mode instances split the partitions"
        );
        assert!(KafkaView {
            owned_partitions: Some(vec![]),
            ..view(12, 0, 3, 0)
        }
        .problem()
        .unwrap()
        .contains("no Kafka broker"));
    }

    #[test]
    fn brokers_are_up_idle_or_down() {
        let brokers = Brokers::of(
            [
                (-1, "UP"),
                (1, "UP"),
                (2, "INIT"),
                (3, "DOWN"),
                (4, "TRY_CONNECT"),
                (5, "UP"),
            ]
            .into_iter(),
        );
        assert_eq!((brokers.known, brokers.up.len(), brokers.down), (5, 2, 2));
        assert!(brokers.up(1) && brokers.up(5));
        assert!(!brokers.up(2) && !brokers.up(3) && !brokers.up(-1));
    }
}
