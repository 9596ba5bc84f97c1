//! Cluster mode: taking the state of newly assigned partitions over *off* the consumer's thread.
//!
//! A partition's state (a million grants is minutes of reading) used to be read back inside the
//! rebalance callback. The consumer polls nothing while it is in that callback, so a restore longer
//! than `max.poll.interval.ms` had the member evicted, the group rebalanced again, and the join
//! never completed. Kafka Streams' answer is used instead: a partition assigned is paused at once,
//! its state is read on a restore thread while the consumer goes on polling (and applying the
//! partitions it already owns), and it is resumed — owned — only once that state is taken over.
//!
//! The group may take a partition away again while its restore is still reading. Every assignment
//! therefore gets a generation, and a restore takes over only the partitions whose generation is
//! still its own, holding the **ownership lock** while it does; giving partitions up holds the same
//! lock. So a restore either takes a partition over before it is given up (and giving it up forgets
//! it again), or sees it is no longer its own and leaves it — never adopts the rows of a partition
//! this instance no longer owns.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// What cluster mode does when the group moves partitions.
pub trait PartitionHooks: Send + Sync {
    /// Takes over the state of `claim`'s partitions (blocking, on a restore thread: the consumer
    /// goes on meanwhile, with these partitions paused). The rows read are adopted under
    /// [`Claim::hold`], and only for the partitions it says are still this claim's. Returns the
    /// partitions it could not take over (they stay paused, and are tried again).
    fn take_over(&self, claim: &Claim) -> Vec<i32>;
    /// Gives up the state of `partitions` (their next owner takes it over). Called with the
    /// ownership lock held, and with no batch of theirs in flight.
    fn revoked(&self, partitions: &[i32]);
}

/// The partitions assigned now, each with the generation of its assignment, and the lock under
/// which state is taken over or given up.
#[derive(Default)]
struct Ledger {
    claims: Mutex<HashMap<i32, u64>>,
    ownership: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Ledger {
    /// Which of `partitions` are still assigned under `generation`.
    fn current(&self, partitions: &[i32], generation: u64) -> Vec<i32> {
        let claims = lock(&self.claims);
        partitions
            .iter()
            .copied()
            .filter(|p| claims.get(p) == Some(&generation))
            .collect()
    }
}

/// One restore's partitions, as assigned under one generation.
pub struct Claim {
    partitions: Vec<i32>,
    generation: u64,
    ledger: Arc<Ledger>,
}

/// The ownership lock, held, and which of a claim's partitions are still its own under it.
pub struct Held<'a> {
    _ownership: MutexGuard<'a, ()>,
    /// The claim's partitions still assigned to it: the only ones to take over.
    pub current: Vec<i32>,
    /// The claim's partitions no assignment holds now (given up, not assigned again).
    pub unclaimed: Vec<i32>,
}

impl Claim {
    /// The partitions to take over.
    pub fn partitions(&self) -> &[i32] {
        &self.partitions
    }

    /// Whether `partition` is still this claim's (one given up need not be read further).
    pub fn is_current(&self, partition: i32) -> bool {
        !self
            .ledger
            .current(&[partition], self.generation)
            .is_empty()
    }

    /// Holds the ownership lock: no partition is given up until the returned guard is dropped.
    pub fn hold(&self) -> Held<'_> {
        let ownership = lock(&self.ledger.ownership);
        let current = self.ledger.current(&self.partitions, self.generation);
        let claims = lock(&self.ledger.claims);
        let unclaimed = self
            .partitions
            .iter()
            .copied()
            .filter(|p| !claims.contains_key(p))
            .collect();
        drop(claims);
        Held {
            _ownership: ownership,
            current,
            unclaimed,
        }
    }
}

/// A restore that has ended: its claim, and the partitions it could not take over.
struct Finished {
    partitions: Vec<(String, i32)>,
    generation: u64,
    failed: Vec<i32>,
}

/// The restores of one consumer: started when partitions are assigned, collected between polls.
pub(super) struct Restores {
    hooks: Arc<dyn PartitionHooks>,
    ledger: Arc<Ledger>,
    next_generation: Mutex<u64>,
    finished: Arc<Mutex<Vec<Finished>>>,
    /// Restores that failed for some partitions: tried again after `retry_after`.
    waiting: Mutex<Vec<(Finished, Instant)>>,
    retry_after: Duration,
}

impl Restores {
    pub(super) fn new(hooks: Arc<dyn PartitionHooks>, retry_after: Duration) -> Restores {
        Restores {
            hooks,
            ledger: Arc::default(),
            next_generation: Mutex::new(0),
            finished: Arc::default(),
            waiting: Mutex::new(Vec::new()),
            retry_after,
        }
    }

    /// Partitions just assigned (and already paused by the caller): claims them under a new
    /// generation and starts reading their state on a restore thread.
    pub(super) fn assigned(&self, partitions: Vec<(String, i32)>) {
        if partitions.is_empty() {
            return;
        }
        let generation = {
            let mut next = lock(&self.next_generation);
            *next += 1;
            *next
        };
        {
            let mut claims = lock(&self.ledger.claims);
            for (_, p) in &partitions {
                claims.insert(*p, generation);
            }
        }
        self.start(partitions, generation);
    }

    fn start(&self, partitions: Vec<(String, i32)>, generation: u64) {
        let claim = Claim {
            partitions: partitions.iter().map(|(_, p)| *p).collect(),
            generation,
            ledger: self.ledger.clone(),
        };
        let hooks = self.hooks.clone();
        let finished = self.finished.clone();
        let numbers = claim.partitions.clone();
        let spawned = std::thread::Builder::new()
            .name("vigil-restore".into())
            .spawn(move || {
                let failed = hooks.take_over(&claim);
                lock(&finished).push(Finished {
                    partitions,
                    generation,
                    failed,
                });
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "could not start a restore thread: partitions wait");
            lock(&self.finished).push(Finished {
                partitions: Vec::new(),
                generation,
                failed: numbers,
            });
        }
    }

    /// Partitions taken away: they are no longer any restore's to take over, and what was taken
    /// over of them is given up (after a restore adopting them right now has finished).
    pub(super) fn revoked(&self, partitions: &[i32]) {
        let _ownership = lock(&self.ledger.ownership);
        {
            let mut claims = lock(&self.ledger.claims);
            for p in partitions {
                claims.remove(p);
            }
        }
        self.hooks.revoked(partitions);
    }

    /// Between polls: the partitions whose state is now taken over (to resume and own), after
    /// queueing the failed ones for another try and starting the tries that are due.
    pub(super) fn ready(&self) -> Vec<(String, i32)> {
        let finished = std::mem::take(&mut *lock(&self.finished));
        let mut ready = Vec::new();
        let mut waiting = lock(&self.waiting);
        for mut done in finished {
            let numbers: Vec<i32> = done.partitions.iter().map(|(_, p)| *p).collect();
            let current = self.ledger.current(&numbers, done.generation);
            done.partitions.retain(|(_, p)| current.contains(p));
            let (failed, taken): (Vec<_>, Vec<_>) = done
                .partitions
                .into_iter()
                .partition(|(_, p)| done.failed.contains(p));
            ready.extend(taken);
            if !failed.is_empty() {
                let retry = Finished {
                    partitions: failed,
                    generation: done.generation,
                    failed: Vec::new(),
                };
                waiting.push((retry, Instant::now() + self.retry_after));
            }
        }
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut *waiting)
            .into_iter()
            .partition(|(_, at)| *at <= now);
        *waiting = later;
        drop(waiting);
        for (mut retry, _) in due {
            let numbers: Vec<i32> = retry.partitions.iter().map(|(_, p)| *p).collect();
            let current = self.ledger.current(&numbers, retry.generation);
            retry.partitions.retain(|(_, p)| current.contains(p));
            if !retry.partitions.is_empty() {
                self.start(retry.partitions, retry.generation);
            }
        }
        ready
    }

    /// Shutting down: no restore still reading takes anything over. Restore threads are not
    /// waited for (one may be waiting on unreachable brokers); what they read is dropped.
    pub(super) fn stop(&self) {
        let _ownership = lock(&self.ledger.ownership);
        lock(&self.ledger.claims).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Hooks whose restore waits to be let go, then records what it was allowed to take over.
    struct Gated {
        go: Mutex<mpsc::Receiver<Vec<i32>>>,
        taken: Mutex<Vec<i32>>,
        given_up: Mutex<Vec<i32>>,
    }

    impl PartitionHooks for Gated {
        fn take_over(&self, claim: &Claim) -> Vec<i32> {
            // The test sends which partitions fail.
            let failed = lock(&self.go)
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_default();
            let held = claim.hold();
            lock(&self.taken).extend(held.current.iter().filter(|p| !failed.contains(p)));
            failed
        }

        fn revoked(&self, partitions: &[i32]) {
            lock(&self.given_up).extend(partitions);
        }
    }

    fn gated() -> (Arc<Gated>, mpsc::Sender<Vec<i32>>) {
        let (tx, rx) = mpsc::channel();
        let hooks = Arc::new(Gated {
            go: Mutex::new(rx),
            taken: Mutex::default(),
            given_up: Mutex::default(),
        });
        (hooks, tx)
    }

    fn tp(partitions: &[i32]) -> Vec<(String, i32)> {
        partitions
            .iter()
            .map(|p| ("vigil.signals".into(), *p))
            .collect()
    }

    /// Waits (up to 10 s) for the restores under way to finish, collecting what is ready.
    fn ready_after_restores(restores: &Restores, count: usize) -> Vec<(String, i32)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock(&restores.finished).len() < count && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        restores.ready()
    }

    #[test]
    fn a_partition_is_ready_only_once_its_state_is_taken_over() {
        let (hooks, go) = gated();
        let restores = Restores::new(hooks.clone(), Duration::from_secs(60));
        restores.assigned(tp(&[1, 2]));
        // The restore is still reading: nothing is ready, the consumer goes on.
        assert!(restores.ready().is_empty());
        go.send(Vec::new()).unwrap();
        assert_eq!(ready_after_restores(&restores, 1), tp(&[1, 2]));
        assert_eq!(*lock(&hooks.taken), vec![1, 2]);
    }

    #[test]
    fn a_partition_given_up_during_its_restore_is_never_taken_over() {
        let (hooks, go) = gated();
        let restores = Restores::new(hooks.clone(), Duration::from_secs(60));
        restores.assigned(tp(&[1, 2]));
        restores.revoked(&[2]);
        go.send(Vec::new()).unwrap();
        assert_eq!(ready_after_restores(&restores, 1), tp(&[1]));
        assert_eq!(*lock(&hooks.taken), vec![1]);
        assert_eq!(*lock(&hooks.given_up), vec![2]);
    }

    #[test]
    fn an_old_restore_does_not_count_for_a_new_assignment() {
        let (hooks, go) = gated();
        let restores = Restores::new(hooks.clone(), Duration::from_secs(60));
        restores.assigned(tp(&[3]));
        // Taken away and given back while the first restore still reads.
        restores.revoked(&[3]);
        restores.assigned(tp(&[3]));
        // Both restores end, in either order: only the second assignment's counts, exactly once.
        go.send(Vec::new()).unwrap();
        go.send(Vec::new()).unwrap();
        let ready = ready_after_restores(&restores, 2);
        assert_eq!(ready, tp(&[3]));
        assert_eq!(*lock(&hooks.taken), vec![3]);
    }

    #[test]
    fn a_failed_partition_is_tried_again_and_then_ready() {
        let (hooks, go) = gated();
        let restores = Restores::new(hooks.clone(), Duration::from_millis(1));
        restores.assigned(tp(&[4, 5]));
        go.send(vec![5]).unwrap();
        assert_eq!(ready_after_restores(&restores, 1), tp(&[4]));
        std::thread::sleep(Duration::from_millis(5));
        // Due: the retry starts (for 5 only) and this time succeeds.
        assert!(restores.ready().is_empty());
        go.send(Vec::new()).unwrap();
        assert_eq!(ready_after_restores(&restores, 1), tp(&[5]));
        assert_eq!(*lock(&hooks.taken), vec![4, 5]);
    }

    #[test]
    fn after_stop_nothing_is_taken_over() {
        let (hooks, go) = gated();
        let restores = Restores::new(hooks.clone(), Duration::from_secs(60));
        restores.assigned(tp(&[6]));
        restores.stop();
        go.send(Vec::new()).unwrap();
        assert!(ready_after_restores(&restores, 1).is_empty());
        assert!(lock(&hooks.taken).is_empty());
    }
}
