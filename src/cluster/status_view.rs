//! The cluster's grant status view: every instance follows the grant rows of the whole state topic
//! (every partition, owned or not) and keeps each grant as its owner last wrote it. `check` on an
//! instance that does not hold a grant answers from it:
//!
//! - a grant the view has revoked, expired or otherwise denied is denied at once, with no hop (the
//!   view only ever lags the owner: a status it holds was the owner's, and revoked is terminal);
//! - a grant the view would allow is confirmed by its owner (one hop to the owner of its
//!   principal's partition), since the view may not yet hold a revocation its owner made;
//! - when that owner cannot be reached (it died and the partition has not moved yet, a rebalance),
//!   the check is denied as `unconfirmed`, with what the view holds and its staleness (`view_lag`,
//!   the records the view has yet to read): fail closed — the view alone never allows, since it
//!   may not yet hold a revocation its owner already delivered (a restarted instance's view reads
//!   the state topic from its start).
//!
//! `vigil_cluster_status_view_lag` is how far the view is behind the state topic's end, and
//! `vigil_cluster_status_view_grants` how many grants it holds (the cluster's, on every instance).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::Offset;
use tokio::sync::watch;

use super::{topics, ClusterError};
use crate::config::ClusterConfig;
use crate::engine::{Row, Table};
use crate::grant::Grant;

/// How often the lag is measured.
const LAG_EVERY: Duration = Duration::from_secs(1);

/// Every grant of the cluster, as its owner last wrote it.
#[derive(Default)]
pub struct StatusView {
    grants: DashMap<String, Arc<Grant>>,
    /// State topic records not yet read, summed over the partitions (as last measured).
    lag: AtomicU64,
}

impl StatusView {
    /// Starts following the grant rows of every partition of `topic` (`partitions` of them)
    /// from its start, on a thread of its own, until `shutdown`.
    pub fn follow(
        config: &ClusterConfig,
        topic: &str,
        partitions: i32,
        instance: &str,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<StatusView>, ClusterError> {
        let consumer =
            topics::every_partition_reader(config, topic, partitions, &format!("view.{instance}"))?;
        let view = Arc::new(StatusView::default());
        let reader = view.clone();
        let (topic, count) = (topic.to_owned(), partitions);
        std::thread::Builder::new()
            .name("vigil-status-view".into())
            .spawn(move || reader.read(&consumer, &topic, count, &shutdown))
            .map_err(|e| ClusterError::Brokers(e.to_string()))?;
        Ok(view)
    }

    fn read(
        &self,
        consumer: &BaseConsumer,
        topic: &str,
        partitions: i32,
        shutdown: &watch::Receiver<bool>,
    ) {
        let mut measured = Instant::now();
        while !*shutdown.borrow() {
            match consumer.poll(Duration::from_millis(200)) {
                None => {}
                Some(Err(e)) => tracing::warn!(error = %e, "reading the state topic (status view)"),
                Some(Ok(message)) => {
                    if let Some(row) = message
                        .key()
                        .and_then(|k| std::str::from_utf8(k).ok())
                        .and_then(Row::parse)
                        .filter(|row| row.table == Table::Grant)
                    {
                        self.apply(&row.key, message.payload());
                    }
                }
            }
            if measured.elapsed() >= LAG_EVERY {
                measured = Instant::now();
                self.measure(consumer, topic, partitions);
            }
        }
    }

    /// Takes in one grant row (`None`: the grant was deleted).
    fn apply(&self, id: &str, value: Option<&[u8]>) {
        match value.map(serde_json::from_slice::<Grant>) {
            Some(Ok(grant)) => {
                self.grants.insert(id.to_owned(), Arc::new(grant));
            }
            Some(Err(e)) => tracing::warn!(grant = %id, error = %e, "an unreadable grant row"),
            None => {
                self.grants.remove(id);
            }
        }
        metrics::gauge!(crate::telemetry::CLUSTER_STATUS_VIEW_GRANTS).set(self.grants.len() as f64);
    }

    /// Records behind the end of every partition: the consumer's positions against the ends the
    /// brokers give (a short request per partition, once a second).
    fn measure(&self, consumer: &BaseConsumer, topic: &str, partitions: i32) {
        let Ok(positions) = consumer.position() else {
            return;
        };
        let mut behind = 0u64;
        for p in 0..partitions {
            let position = match positions.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => 0,
            };
            if let Ok((_, high)) = consumer.fetch_watermarks(topic, p, Duration::from_millis(500)) {
                behind += u64::try_from(high.saturating_sub(position)).unwrap_or(0);
            }
        }
        self.lag.store(behind, Ordering::Relaxed);
        metrics::gauge!(crate::telemetry::CLUSTER_STATUS_VIEW_LAG).set(behind as f64);
    }

    /// The grant `id` as the view holds it.
    pub fn get(&self, id: &str) -> Option<Arc<Grant>> {
        self.grants.get(id).map(|g| g.clone())
    }

    /// Grants held.
    pub fn len(&self) -> usize {
        self.grants.len()
    }

    /// Whether no grant is held.
    pub fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }

    /// State topic records the view has yet to read (as last measured, every second).
    pub fn lag(&self) -> u64 {
        self.lag.load(Ordering::Relaxed)
    }
}
