//! State moving with a partition. When the group gives this instance partitions, the consumer
//! pauses them and a restore thread reads each one's state back from the state topic (from its
//! standby copy's offset, with `cluster.standby`) while the partitions owned already go on; then,
//! under the ownership lock ([`crate::kafka::Claim::hold`]), it drops anything still held for them
//! from an earlier ownership and adopts what it read — and only then are they owned: their signals
//! consumed, and their grants answered, after the restore. When partitions are taken away, their
//! principals are forgotten here, so only their new owner answers for them. The outboxes of the
//! streams on those partitions move the same way ([`Outboxes`]): read back before this instance
//! delivers them, forgotten when it gives them up.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::standby::Standby;
use super::streams::Outboxes;
use super::{partition_of, state_log};
use crate::config::ClusterConfig;
use crate::engine::{Engine, Released, Row};
use crate::kafka::{Claim, KafkaHealth, PartitionHooks};

/// The partition hooks of cluster mode's Kafka source.
pub struct Handover {
    engine: Arc<Engine>,
    config: ClusterConfig,
    state_topic: String,
    partitions: i32,
    health: Arc<KafkaHealth>,
    /// Warm copies of every partition (`cluster.standby`): a restore reads only what follows.
    standby: Option<Arc<Standby>>,
    /// The outboxes of the streams on the partitions owned.
    outboxes: Arc<Outboxes>,
    /// Partitions given up whose stored rows are still to be deleted, and whether a thread is
    /// deleting: one at a time, whatever gave up partitions meanwhile joins its next walk.
    forgetting: Arc<(Mutex<BTreeSet<i32>>, AtomicBool)>,
}

impl Handover {
    pub fn new(
        engine: Arc<Engine>,
        config: ClusterConfig,
        state_topic: String,
        partitions: i32,
        health: Arc<KafkaHealth>,
        standby: Option<Arc<Standby>>,
        outboxes: Arc<Outboxes>,
    ) -> Handover {
        Handover {
            engine,
            config,
            state_topic,
            partitions,
            health,
            standby,
            outboxes,
            forgetting: Arc::default(),
        }
    }

    /// Every principal whose partition is in `partitions`.
    fn on(&self, partitions: &[i32]) -> Released {
        let set: BTreeSet<i32> = partitions.iter().copied().collect();
        let count = self.partitions;
        Arc::new(move |key: &str| set.contains(&partition_of(key, count)))
    }

    /// Forgets the principals of `partitions` from memory (see [`Engine::release_blocking`]).
    fn release(&self, partitions: &[i32], why: &str) -> Result<(), String> {
        self.engine
            .release_blocking(self.on(partitions))
            .map_err(|e| e.to_string())?;
        tracing::info!(?partitions, "{why}");
        Ok(())
    }

    /// Deletes the stored rows of `partitions`' principals on a thread of its own, a chunk at a
    /// time (the store's copy is never read back in cluster mode, so nothing waits for it; if the
    /// partitions come back meanwhile, their rows may go too, and that is as harmless). One such
    /// thread at a time: partitions given up while it walks are deleted by its next walk, so
    /// rebalances in quick succession do not run a walk each.
    fn forget_stored(&self, partitions: &[i32]) {
        let forgetting = self.forgetting.clone();
        lock(&forgetting.0).extend(partitions);
        if forgetting.1.swap(true, Ordering::AcqRel) {
            return; // the running thread takes them
        }
        let engine = self.engine.clone();
        let count = self.partitions;
        let spawned = std::thread::Builder::new()
            .name("vigil-forget".into())
            .spawn(move || loop {
                let pending = std::mem::take(&mut *lock(&forgetting.0));
                if pending.is_empty() {
                    forgetting.1.store(false, Ordering::Release);
                    // Partitions added between the take and the store start no thread of their
                    // own: go on if there are any and no other thread took over.
                    if lock(&forgetting.0).is_empty() || forgetting.1.swap(true, Ordering::AcqRel) {
                        return;
                    }
                    continue;
                }
                let what = format!("{pending:?}");
                let released: Released =
                    Arc::new(move |key: &str| pending.contains(&partition_of(key, count)));
                match engine.forget_stored_blocking(released) {
                    Ok(rows) => tracing::info!(partitions = %what, rows, "stored rows of partitions given up deleted"),
                    Err(e) => tracing::warn!(partitions = %what, error = %e, "stored rows of partitions given up not deleted (the next start drops them)"),
                }
            });
        if let Err(e) = spawned {
            self.forgetting.1.store(false, Ordering::Release);
            tracing::warn!(error = %e, "could not start deleting the stored rows of partitions given up");
        }
    }

    /// Reads the state of the claim's partitions back, [`PARALLEL_READS`] at a time: each
    /// partition's rows, or why they could not be read. A partition given up before its turn is
    /// not read.
    fn read(&self, claim: &Claim) -> Vec<(i32, Result<Rows, String>)> {
        let mut out = Vec::new();
        for chunk in claim.partitions().chunks(PARALLEL_READS) {
            std::thread::scope(|scope| {
                let reads: Vec<_> = chunk
                    .iter()
                    .filter(|&&partition| claim.is_current(partition))
                    .map(|&partition| {
                        // A restore still reading a partition given up meanwhile says nothing
                        // more of it (`/readyz` would show it restoring for good).
                        let progress = move |remaining| {
                            if claim.is_current(partition) {
                                self.health.restore_progress(partition, remaining);
                            }
                        };
                        let copy = self
                            .standby
                            .as_ref()
                            .map(|s| s.copy_of(partition))
                            .unwrap_or_default();
                        let read = scope.spawn(move || {
                            state_log::read_partition(
                                &self.config,
                                &self.state_topic,
                                partition,
                                copy,
                                &progress,
                            )
                            .map_err(|e| e.to_string())
                        });
                        (partition, read)
                    })
                    .collect();
                for (partition, read) in reads {
                    let rows = read
                        .join()
                        .unwrap_or_else(|_| Err("the reading thread panicked".to_owned()));
                    out.push((partition, rows));
                }
            });
        }
        out
    }
}

/// A partition's rows read back: each row with its stored bytes.
type Rows = Vec<(Row, Vec<u8>)>;

/// State topic partitions read at once during a restore (each with a consumer of its own).
const PARALLEL_READS: usize = 4;

impl PartitionHooks for Handover {
    /// Reads the partitions' state with no lock held (the consumer goes on with the partitions
    /// owned already), then, holding the ownership lock, takes over those still assigned: drops
    /// what was held of them from an earlier ownership, reads their streams' outboxes back, and
    /// adopts their rows in one store commit.
    fn take_over(&self, claim: &Claim) -> Vec<i32> {
        let started = std::time::Instant::now();
        let mut failed = Vec::new();
        let mut read = Vec::new();
        for (partition, rows) in self.read(claim) {
            match rows {
                Ok(rows) => read.push((partition, rows)),
                Err(e) => {
                    tracing::error!(partition, error = %e,
                        "partition's state not read back: paused, its signals wait");
                    self.health.restore_failed(partition, e);
                    failed.push(partition);
                }
            }
        }
        let held = claim.hold();
        for &p in &held.unclaimed {
            self.health.restore_progress(p, 0);
        }
        let mut restored: Vec<i32> = read
            .iter()
            .map(|(p, _)| *p)
            .filter(|p| held.current.contains(p))
            .collect();
        if restored.is_empty() {
            return failed;
        }
        let fail = |restored: &mut Vec<i32>, failed: &mut Vec<i32>, e: String, what: &str| {
            tracing::error!(partitions = ?restored, error = %e, "{what}: paused, their signals wait");
            for &p in restored.iter() {
                self.health.restore_failed(p, e.clone());
            }
            failed.append(restored);
        };
        if let Err(e) = self.release(&restored, "state held from an earlier ownership dropped") {
            fail(
                &mut restored,
                &mut failed,
                e,
                "partitions' earlier state not dropped",
            );
            return failed;
        }
        // The streams' outboxes on the partitions read back.
        if let Err(e) = self.outboxes.restore(&restored) {
            fail(
                &mut restored,
                &mut failed,
                e,
                "partitions' outboxes not read back",
            );
            return failed;
        }
        let rows: Vec<(Row, Vec<u8>)> = read
            .into_iter()
            .filter(|(p, _)| restored.contains(p))
            .flat_map(|(_, rows)| rows)
            .collect();
        // One store commit for every partition read.
        match self.engine.adopt_blocking(rows) {
            Ok(taken) => {
                metrics::counter!(crate::telemetry::CLUSTER_RESTORED_ROWS).increment(taken as u64);
                metrics::histogram!(crate::telemetry::CLUSTER_RESTORE_SECONDS)
                    .record(started.elapsed().as_secs_f64());
                for &p in &restored {
                    self.health.restore_progress(p, 0);
                }
                tracing::info!(partitions = ?restored, rows = taken,
                    elapsed_ms = started.elapsed().as_millis() as u64, "partitions taken over");
            }
            Err(e) => fail(
                &mut restored,
                &mut failed,
                e.to_string(),
                "partitions' state not taken over",
            ),
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
        self.forget_stored(partitions);
        if let Err(e) = self.outboxes.release(partitions) {
            tracing::error!(?partitions, error = %e, "could not forget the outboxes of partitions given up");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
