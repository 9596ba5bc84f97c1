//! What the engine hands delivery: a decision, the grant it is about, and a [`Durable`] gate that
//! opens when the batch holding the decision is on disk.
//!
//! A decision is handed over as soon as its batch's commit is submitted, not after it: delivery
//! signs its SETs while the commit's fsync runs, and sends them once the gate opens. Nothing
//! reaches an enforcement point before the decision is durable — a decision whose commit failed is
//! dropped by delivery (its signals stay pending, are replayed, and make the same decision again,
//! with the same id and so the same SET `jti`s).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use crate::decision::Decision;
use crate::grant::Grant;

/// A decision for delivery.
pub struct Handed {
    pub decision: Decision,
    /// The grant's state the decision left it in.
    pub grant: Arc<Grant>,
    /// Opens when the decision is durable.
    pub durable: Durable,
    /// Where its hand-off is stored if in a journal row (single node); `None` for a row of its
    /// own (`engine_handoff`).
    pub journaled: Option<JournalPlace>,
}

/// A hand-off's place in a journal row (`super::journal`): the row's (shard, sequence) and the
/// hand-off's index among the row's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct JournalPlace {
    pub slot: (u32, u64),
    pub index: u32,
}

/// What delivery marks taken over, in the transaction that queues a decision's SETs
/// ([`crate::engine::handoff_done_in`]): the decision's hand-off key, and its place in a journal
/// row if it was stored there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoffMark {
    pub key: String,
    pub journaled: Option<JournalPlace>,
}

impl Handed {
    /// A decision read back from the store (already durable; its hand-off in a row of its own).
    pub fn restored(decision: Decision, grant: Arc<Grant>) -> Handed {
        Handed {
            decision,
            grant,
            durable: Durable::committed(),
            journaled: None,
        }
    }

    /// What delivery marks once the decision's SETs are queued.
    pub fn mark(&self) -> HandoffMark {
        HandoffMark {
            key: super::persist::handoff_key(&self.decision),
            journaled: self.journaled,
        }
    }
}

const PENDING: u8 = 0;
const COMMITTED: u8 = 1;
const FAILED: u8 = 2;

struct Gate {
    state: AtomicU8,
    opened: Notify,
}

/// The waiting side of a batch's commit: cheap to clone, one per decision of the batch.
#[derive(Clone)]
pub struct Durable(Arc<Gate>);

/// The committing side: [`Commit::settle`] says how the commit ended. Dropped unsettled (the
/// writer stopped, the shard panicked), it counts as failed: a gate never stays closed for good.
pub struct Commit(Arc<Gate>);

impl Durable {
    /// A gate and the commit that opens it.
    pub fn pending() -> (Commit, Durable) {
        let gate = Arc::new(Gate {
            state: AtomicU8::new(PENDING),
            opened: Notify::new(),
        });
        (Commit(gate.clone()), Durable(gate))
    }

    /// A gate already open: decisions read back from the store at start-up.
    pub fn committed() -> Durable {
        let (commit, durable) = Durable::pending();
        commit.settle(true);
        durable
    }

    /// Whether the commit succeeded, once it has ended.
    pub async fn wait(&self) -> bool {
        loop {
            let opened = self.0.opened.notified();
            tokio::pin!(opened);
            opened.as_mut().enable();
            match self.0.state.load(Ordering::Acquire) {
                COMMITTED => return true,
                FAILED => return false,
                _ => opened.await,
            }
        }
    }
}

impl Commit {
    /// Records the commit's outcome and wakes every waiter. Only the first outcome counts.
    pub fn settle(self, committed: bool) {
        self.set(committed);
    }

    fn set(&self, committed: bool) {
        let to = if committed { COMMITTED } else { FAILED };
        if self
            .0
            .state
            .compare_exchange(PENDING, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.0.opened.notify_waiters();
        }
    }
}

impl Drop for Commit {
    fn drop(&mut self) {
        self.set(false);
    }
}

#[cfg(test)]
mod tests {
    use super::Durable;

    #[tokio::test]
    async fn a_gate_opens_once_with_the_first_outcome() {
        let (commit, durable) = Durable::pending();
        let waiter = tokio::spawn({
            let d = durable.clone();
            async move { d.wait().await }
        });
        tokio::task::yield_now().await;
        commit.settle(true);
        assert!(waiter.await.unwrap());
        assert!(durable.wait().await);
        assert!(Durable::committed().wait().await);
    }

    #[tokio::test]
    async fn an_unsettled_commit_dropped_is_a_failure() {
        let (commit, durable) = Durable::pending();
        drop(commit);
        assert!(!durable.wait().await);
    }
}
