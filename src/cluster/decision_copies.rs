//! The cluster's decision trail: every owner's decisions, in every instance's audit log.
//!
//! An owner writes its decisions to its own audit log (before the state change they describe is
//! committed) and, with the batch's state rows, to the decisions topic ([`super::StateLog`]),
//! marked with its log's name ([`ORIGIN_HEADER`]). Every instance copies the records of the other
//! logs into its own, so `/v1/decisions` and a subject's recent decisions are answered from the
//! local log with the whole cluster's trail — and the trail of a principal outlives the instance
//! that owned it (killed, replaced, its disk gone): it is on the topic until its retention, and in
//! every other instance's log until that log's own bound (`[audit]`).
//!
//! Where each partition was copied up to is kept beside the log (`<audit dir>/cluster-copied.json`,
//! written after the copies are synced), so a restart goes on where it left off; a copy made
//! twice (a crash between the two writes) is listed once (queries collapse repeated ids).
//! [`DecisionCopies::caught_up`] lets a query wait until every decision the brokers held when it
//! arrived is in the local log. `vigil_cluster_decision_copies_lag` is how many are not yet.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;

use super::{topics, ClusterError};
use crate::audit::AuditLog;
use crate::config::ClusterConfig;
use crate::decision::Decision;

/// The header naming the audit log a decision record was first written to.
pub const ORIGIN_HEADER: &str = "vigil-origin";
/// Where the copy positions are kept, in the audit log's directory.
const POSITIONS_FILE: &str = "cluster-copied.json";
/// Most records copied in one append.
const BATCH: usize = 1_000;
/// How often the lag is measured.
const LAG_EVERY: Duration = Duration::from_secs(1);

/// Copies the other instances' decisions into this instance's audit log.
pub struct DecisionCopies {
    /// The copier's consumer, also asked for the topic's ends (librdkafka clients are shared
    /// between threads).
    consumer: Arc<BaseConsumer>,
    topic: String,
    partitions: i32,
    /// Per partition, the offset after the last record copied (or passed over: this log's own).
    copied: watch::Sender<Vec<i64>>,
    /// Records not yet copied, summed over the partitions (as last measured).
    lag: AtomicU64,
}

impl DecisionCopies {
    /// Starts copying every partition of `topic` into `audit` (from where the last run left
    /// off, else from the start), on a thread of its own, until `shutdown`.
    pub fn follow(
        config: &ClusterConfig,
        topic: &str,
        audit: Arc<AuditLog>,
        instance: &str,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<DecisionCopies>, ClusterError> {
        let mut client = topics::reader_config(config, &format!("{topic}.copy.{instance}"));
        // A position the topic's retention has passed starts over at what is left.
        client.set("auto.offset.reset", "earliest");
        let consumer: BaseConsumer = client.create()?;
        let partitions = topics::partition_count(consumer.client(), topic)?.ok_or_else(|| {
            ClusterError::Topic {
                topic: topic.to_owned(),
                reason: "does not exist".into(),
            }
        })?;
        let positions_file = audit.dir().join(POSITIONS_FILE);
        let saved = load_positions(&positions_file);
        let mut assignment = TopicPartitionList::new();
        let mut copied = vec![0; usize::try_from(partitions).unwrap_or(0)];
        for p in 0..partitions {
            let offset = match saved.get(&p) {
                Some(&at) => {
                    copied[p as usize] = at;
                    Offset::Offset(at)
                }
                None => Offset::Beginning,
            };
            assignment.add_partition_offset(topic, p, offset)?;
        }
        consumer.assign(&assignment)?;
        let copies = Arc::new(DecisionCopies {
            consumer: Arc::new(consumer),
            topic: topic.to_owned(),
            partitions,
            copied: watch::channel(copied).0,
            lag: AtomicU64::new(0),
        });
        let copier = copies.clone();
        std::thread::Builder::new()
            .name("vigil-decision-copies".into())
            .spawn(move || copier.copy(&audit, &positions_file, &shutdown))
            .map_err(|e| ClusterError::Brokers(e.to_string()))?;
        Ok(copies)
    }

    fn copy(
        &self,
        audit: &AuditLog,
        positions_file: &std::path::Path,
        shutdown: &watch::Receiver<bool>,
    ) {
        let mut measured = Instant::now();
        while !*shutdown.borrow() {
            let mut batch = Vec::new();
            let mut read = Vec::new();
            let mut wait = Duration::from_millis(200);
            while batch.len() < BATCH {
                match self.consumer.poll(wait) {
                    None => break,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "reading the decisions topic");
                        break;
                    }
                    Some(Ok(message)) => {
                        read.push((message.partition(), message.offset() + 1));
                        if let Some(d) = foreign_decision(&message, audit.origin()) {
                            batch.push(d);
                        }
                    }
                }
                // Drain what has arrived without waiting again.
                wait = Duration::ZERO;
            }
            if !read.is_empty() {
                self.copied_up_to(audit, positions_file, &batch, &read);
            }
            if measured.elapsed() >= LAG_EVERY {
                measured = Instant::now();
                self.measure();
            }
        }
    }

    /// Writes `batch` into the log, then moves the positions past what was `read`.
    fn copied_up_to(
        &self,
        audit: &AuditLog,
        positions_file: &std::path::Path,
        batch: &[Decision],
        read: &[(i32, i64)],
    ) {
        if let Err(e) = audit.append(batch) {
            // Not moved past: a restart copies them again.
            metrics::counter!(crate::telemetry::AUDIT_ERRORS).increment(1);
            tracing::error!(error = %e, "copying decisions into the audit log failed");
            return;
        }
        metrics::counter!(crate::telemetry::CLUSTER_DECISIONS_COPIED).increment(batch.len() as u64);
        let mut positions = self.copied.borrow().clone();
        for &(p, next) in read {
            if let Some(at) = usize::try_from(p).ok().and_then(|p| positions.get_mut(p)) {
                *at = (*at).max(next);
            }
        }
        if let Err(e) = save_positions(positions_file, &positions) {
            tracing::warn!(error = %e, "could not keep where the decision copies are up to");
        }
        self.copied.send_replace(positions);
    }

    /// The ends of every partition as the brokers give them now: `(first, end)` offsets.
    fn ends(&self) -> Result<Vec<(i64, i64)>, ClusterError> {
        (0..self.partitions)
            .map(|p| {
                self.consumer
                    .fetch_watermarks(&self.topic, p, Duration::from_secs(2))
                    .map_err(|e| ClusterError::Brokers(format!("{}/{p}: {e}", self.topic)))
            })
            .collect()
    }

    fn measure(&self) {
        let Ok(ends) = self.ends() else {
            return;
        };
        let copied = self.copied.borrow().clone();
        let behind: u64 = ends
            .iter()
            .zip(copied)
            .map(|(&(first, end), at)| u64::try_from(end - at.max(first)).unwrap_or(0))
            .sum();
        self.lag.store(behind, Ordering::Relaxed);
        metrics::gauge!(crate::telemetry::CLUSTER_DECISION_COPIES_LAG).set(behind as f64);
    }

    /// Waits, up to `within`, until every decision the brokers held when it was called is in
    /// the local log; whether it got there. A query that does not may miss the newest of other
    /// instances' decisions (never this instance's own).
    pub async fn caught_up(self: &Arc<Self>, within: Duration) -> bool {
        let copies = self.clone();
        let Ok(Ok(ends)) = tokio::task::spawn_blocking(move || copies.ends()).await else {
            return false;
        };
        let mut copied = self.copied.subscribe();
        let reached = |at: &Vec<i64>| {
            ends.iter()
                .zip(at)
                .all(|(&(first, end), &at)| end <= first || at >= end)
        };
        tokio::time::timeout(within, copied.wait_for(reached))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Decision records not yet copied (as last measured, every second).
    pub fn lag(&self) -> u64 {
        self.lag.load(Ordering::Relaxed)
    }
}

/// The decision a record holds, unless it is `own` log's (already in it) or unreadable.
fn foreign_decision(message: &BorrowedMessage<'_>, own: &str) -> Option<Decision> {
    let origin = message.headers().and_then(|headers| {
        headers
            .iter()
            .find(|h| h.key == ORIGIN_HEADER)
            .and_then(|h| h.value)
    });
    if origin == Some(own.as_bytes()) {
        return None;
    }
    match serde_json::from_slice(message.payload()?) {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!(error = %e, offset = message.offset(), "an unreadable decision record");
            None
        }
    }
}

/// The positions kept by the last run (none if there was none, or they cannot be read: copying
/// from the start again only repeats copies, which queries collapse).
fn load_positions(path: &std::path::Path) -> HashMap<i32, i64> {
    std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

/// Keeps `positions` (per partition, in order) in `path`, replacing it whole.
fn save_positions(path: &std::path::Path, positions: &[i64]) -> std::io::Result<()> {
    let map: HashMap<i32, i64> = positions
        .iter()
        .enumerate()
        .filter_map(|(p, &at)| Some((i32::try_from(p).ok()?, at)))
        .collect();
    let fresh = PathBuf::from(format!("{}.new", path.display()));
    std::fs::write(&fresh, serde_json::to_vec(&map)?)?;
    crate::store::private_file(&fresh)?;
    std::fs::rename(&fresh, path)
}
