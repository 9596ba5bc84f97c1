//! Standby copies (`cluster.standby`): the instance follows the whole state topic — every
//! partition, owned or not — and keeps each partition's latest rows with the offset it has read
//! up to. When the group assigns it a partition, the restore starts from that copy and reads only
//! the records after it (Kafka Streams' standby replicas, KIP-441's warm-up): a handover costs the
//! tail written since, not the partition's whole history.
//!
//! The price is memory and a consumer: every instance holds every partition's latest rows (the
//! cluster's whole state, as stored bytes) — `vigil_cluster_standby_rows`. Off by default.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rdkafka::consumer::BaseConsumer;
use rdkafka::message::Message;
use tokio::sync::watch;

use super::{topics, ClusterError};
use crate::config::ClusterConfig;

/// One partition's copy: its latest rows and the offset after the last record read.
#[derive(Default, Clone)]
pub struct PartitionCopy {
    pub rows: HashMap<String, Vec<u8>>,
    pub next: i64,
}

/// The standby copies of every partition of the state topic.
#[derive(Default)]
pub struct Standby {
    copies: Mutex<HashMap<i32, PartitionCopy>>,
}

impl Standby {
    /// Starts following every partition of `topic` (`partitions` of them) from its start, on a
    /// thread of its own, until `shutdown`.
    pub fn follow(
        config: &ClusterConfig,
        topic: &str,
        partitions: i32,
        instance: &str,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Standby>, ClusterError> {
        let consumer = topics::every_partition_reader(
            config,
            topic,
            partitions,
            &format!("standby.{instance}"),
        )?;
        let standby = Arc::new(Standby::default());
        let copies = standby.clone();
        std::thread::Builder::new()
            .name("vigil-standby".into())
            .spawn(move || copies.read(&consumer, &shutdown))
            .map_err(|e| ClusterError::Brokers(e.to_string()))?;
        Ok(standby)
    }

    fn read(&self, consumer: &BaseConsumer, shutdown: &watch::Receiver<bool>) {
        topics::read_until(consumer, shutdown, "the state topic (standby)", |message| {
            if let Some(key) = message.key().and_then(|k| std::str::from_utf8(k).ok()) {
                let held = self.apply(
                    message.partition(),
                    message.offset(),
                    key,
                    message.payload(),
                );
                metrics::gauge!(crate::telemetry::CLUSTER_STANDBY_ROWS).set(held as f64);
            }
        });
    }

    /// Takes in one record; returns the rows held in every copy.
    fn apply(&self, partition: i32, offset: i64, key: &str, value: Option<&[u8]>) -> usize {
        let mut copies = self
            .copies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let copy = copies.entry(partition).or_default();
        match value {
            Some(v) => {
                copy.rows.insert(key.to_owned(), v.to_vec());
            }
            None => {
                copy.rows.remove(key);
            }
        }
        copy.next = offset + 1;
        copies.values().map(|c| c.rows.len()).sum()
    }

    /// A snapshot of `partition`'s copy (empty, from the start, if none was read yet).
    pub fn copy_of(&self, partition: i32) -> PartitionCopy {
        self.copies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&partition)
            .cloned()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy holds each key's last value, forgets a key whose last record is a tombstone, and
    /// knows where to go on reading from.
    #[test]
    fn a_copy_holds_the_latest_row_per_key_and_where_it_stands() {
        let standby = Standby::default();
        standby.apply(3, 0, "grant\u{1f}a", Some(b"1"));
        standby.apply(3, 1, "grant\u{1f}b", Some(b"2"));
        standby.apply(3, 2, "grant\u{1f}a", Some(b"3"));
        let held = standby.apply(3, 3, "grant\u{1f}b", None);
        assert_eq!(held, 1);
        let copy = standby.copy_of(3);
        assert_eq!(copy.next, 4);
        assert_eq!(
            copy.rows.get("grant\u{1f}a").map(Vec::as_slice),
            Some(&b"3"[..])
        );
        assert!(!copy.rows.contains_key("grant\u{1f}b"));
        assert_eq!(standby.copy_of(4).next, 0);
    }
}
