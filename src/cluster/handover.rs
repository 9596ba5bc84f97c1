//! State moving with a partition. When the group gives this instance partitions, it first drops
//! anything it still held for them (an earlier ownership's, stale since), then reads each one's
//! state back from the state topic into its engine — and only then owns it: its signals are
//! consumed, and its grants answered, after the restore. When partitions are taken away, their
//! principals are forgotten here, so only their new owner answers for them.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::{partition_of, state_log};
use crate::config::ClusterConfig;
use crate::engine::{Engine, Released};
use crate::kafka::{KafkaHealth, PartitionHooks};

/// The partition hooks of cluster mode's Kafka source.
pub struct Handover {
    engine: Arc<Engine>,
    config: ClusterConfig,
    state_topic: String,
    partitions: i32,
    health: Arc<KafkaHealth>,
}

impl Handover {
    pub fn new(
        engine: Arc<Engine>,
        config: ClusterConfig,
        state_topic: String,
        partitions: i32,
        health: Arc<KafkaHealth>,
    ) -> Handover {
        Handover {
            engine,
            config,
            state_topic,
            partitions,
            health,
        }
    }

    /// Every principal whose partition is in `partitions`.
    fn on(&self, partitions: &[i32]) -> Released {
        let set: BTreeSet<i32> = partitions.iter().copied().collect();
        let count = self.partitions;
        Arc::new(move |key: &str| set.contains(&partition_of(key, count)))
    }

    fn release(&self, partitions: &[i32], why: &str) -> Result<(), String> {
        let rows = self
            .engine
            .release_blocking(self.on(partitions))
            .map_err(|e| e.to_string())?;
        metrics::counter!(crate::telemetry::CLUSTER_RELEASED_ROWS).increment(rows as u64);
        tracing::info!(?partitions, rows, "{why}");
        Ok(())
    }

    fn restore(&self, partition: i32) -> Result<usize, String> {
        let progress = |remaining| self.health.restore_progress(partition, remaining);
        let rows = state_log::read_partition(&self.config, &self.state_topic, partition, &progress)
            .map_err(|e| e.to_string())?;
        let taken = self
            .engine
            .adopt_blocking(rows)
            .map_err(|e| e.to_string())?;
        self.health.restore_progress(partition, 0);
        metrics::counter!(crate::telemetry::CLUSTER_RESTORED_ROWS).increment(taken as u64);
        Ok(taken)
    }
}

impl PartitionHooks for Handover {
    fn assigned(&self, partitions: &[i32]) -> Vec<i32> {
        if let Err(e) = self.release(partitions, "state held from an earlier ownership dropped") {
            for &p in partitions {
                self.health.restore_failed(p, e.clone());
            }
            return partitions.to_vec();
        }
        let mut failed = Vec::new();
        for &partition in partitions {
            let started = std::time::Instant::now();
            match self.restore(partition) {
                Ok(rows) => tracing::info!(
                    partition,
                    rows,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "partition taken over"
                ),
                Err(e) => {
                    tracing::error!(partition, error = %e,
                        "partition's state not taken over: paused, its signals wait");
                    self.health.restore_failed(partition, e);
                    failed.push(partition);
                }
            }
        }
        failed
    }

    fn revoked(&self, partitions: &[i32]) {
        for &p in partitions {
            // No longer this instance's to restore (a failed restore is no longer a problem here).
            self.health.restore_progress(p, 0);
        }
        if let Err(e) = self.release(
            partitions,
            "partitions given up: their state forgotten here",
        ) {
            tracing::error!(?partitions, error = %e, "could not forget the state of partitions given up");
        }
    }
}
