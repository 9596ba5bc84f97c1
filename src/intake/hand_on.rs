//! The channel from intake's writer to the next stage: each group commit's newly recorded signals
//! as one message, bounded in signals (not messages: a group holds one signal or hundreds).
//!
//! Why not a bounded `mpsc` of groups: its bound counts groups, so the signals it may hold would be
//! its capacity times the largest batch — and batches are largest exactly when the next stage is
//! behind. Here the sender waits while the signals queued would pass the capacity; a group larger
//! than the capacity still goes when nothing is queued, so it cannot wait forever.

use std::sync::{Arc, Condvar, Mutex, PoisonError};

use tokio::sync::mpsc;

use crate::signal::Signal;

/// What the writer hands on; cheap to clone.
#[derive(Clone)]
pub struct HandOn {
    tx: mpsc::UnboundedSender<Vec<Signal>>,
    budget: Arc<Budget>,
}

/// The next stage's end.
pub struct HandOnReceiver {
    rx: mpsc::UnboundedReceiver<Vec<Signal>>,
    budget: Arc<Budget>,
}

struct Budget {
    capacity: usize,
    state: Mutex<Queued>,
    room: Condvar,
}

struct Queued {
    signals: usize,
    closed: bool,
}

/// The next stage stopped: the signals stay pending in intake, replayed at the next start.
#[derive(Debug, thiserror::Error)]
#[error("the next stage stopped")]
pub struct Stopped;

/// A channel that holds at most `capacity` signals (at least one group).
pub fn channel(capacity: usize) -> (HandOn, HandOnReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let budget = Arc::new(Budget {
        capacity: capacity.max(1),
        state: Mutex::new(Queued {
            signals: 0,
            closed: false,
        }),
        room: Condvar::new(),
    });
    (
        HandOn {
            tx,
            budget: budget.clone(),
        },
        HandOnReceiver { rx, budget },
    )
}

impl HandOn {
    /// Queues `group`, first waiting (blocking the thread: intake's writer) for room.
    pub fn send_blocking(&self, group: Vec<Signal>) -> Result<(), Stopped> {
        let n = group.len();
        let budget = &self.budget;
        let mut queued = budget.state.lock().unwrap_or_else(PoisonError::into_inner);
        while !queued.closed && queued.signals > 0 && queued.signals + n > budget.capacity {
            queued = budget
                .room
                .wait(queued)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if queued.closed {
            return Err(Stopped);
        }
        queued.signals += n;
        // Under the lock, so the gauge's last value is the count's.
        metrics::gauge!(crate::telemetry::INTAKE_HANDED_ON_WAITING).set(queued.signals as f64);
        drop(queued);
        self.tx.send(group).map_err(|_| {
            budget.taken(n);
            Stopped
        })
    }

    /// Whether the next stage still takes signals.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Whether both ends are of one channel.
    pub fn same_channel(&self, other: &HandOn) -> bool {
        self.tx.same_channel(&other.tx)
    }
}

impl HandOnReceiver {
    /// The next group; `None` once every sender is gone and the channel is drained.
    pub async fn recv(&mut self) -> Option<Vec<Signal>> {
        let group = self.rx.recv().await?;
        self.budget.taken(group.len());
        Some(group)
    }

    /// The next group if one is waiting.
    pub fn try_recv(&mut self) -> Option<Vec<Signal>> {
        let group = self.rx.try_recv().ok()?;
        self.budget.taken(group.len());
        Some(group)
    }
}

impl Drop for HandOnReceiver {
    /// A writer waiting for room hears that there will be none.
    fn drop(&mut self) {
        let mut queued = self
            .budget
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        queued.closed = true;
        drop(queued);
        self.budget.room.notify_all();
    }
}

impl Budget {
    fn taken(&self, n: usize) {
        let mut queued = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        queued.signals = queued.signals.saturating_sub(n);
        metrics::gauge!(crate::telemetry::INTAKE_HANDED_ON_WAITING).set(queued.signals as f64);
        drop(queued);
        self.room.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::session_revoked as signal;
    use std::time::Duration;

    fn group(n: usize) -> Vec<Signal> {
        (0..n).map(|i| signal(&format!("j{i}"))).collect()
    }

    /// The sender waits while the signals queued would pass the capacity, and goes on as the
    /// receiver takes them; a group larger than the capacity goes when nothing is queued.
    #[tokio::test]
    async fn the_sender_waits_for_room_counted_in_signals() {
        let (tx, mut rx) = channel(4);
        tx.send_blocking(group(3)).unwrap();
        let sent = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let waiter = {
            let (tx, sent) = (tx.clone(), sent.clone());
            std::thread::spawn(move || {
                tx.send_blocking(group(2)).unwrap();
                sent.store(true, std::sync::atomic::Ordering::SeqCst);
                // Larger than the whole capacity: waits until nothing is queued, then goes.
                tx.send_blocking(group(9)).unwrap();
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !sent.load(std::sync::atomic::Ordering::SeqCst),
            "3 + 2 signals would pass the capacity of 4"
        );
        assert_eq!(rx.recv().await.unwrap().len(), 3);
        assert_eq!(rx.recv().await.unwrap().len(), 2);
        assert_eq!(rx.recv().await.unwrap().len(), 9);
        waiter.join().unwrap();
        assert!(sent.load(std::sync::atomic::Ordering::SeqCst));
        assert!(rx.try_recv().is_none());
    }

    /// A sender waiting for room when the receiver goes is told so, instead of waiting forever.
    #[tokio::test]
    async fn a_waiting_sender_hears_that_the_receiver_is_gone() {
        let (tx, rx) = channel(1);
        tx.send_blocking(group(1)).unwrap();
        let waiter = std::thread::spawn(move || tx.send_blocking(group(1)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(rx);
        assert!(waiter.join().unwrap().is_err());
    }
}
