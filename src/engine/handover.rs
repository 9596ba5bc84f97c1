//! The way decisions go from the shards to delivery: two lanes, like a shard's inbox.
//!
//! With one queue in decision order, a backlog one party made — a Kafka feed catching up with a
//! grant revoked per message — filled it, and another transmitter's pushed revocation, decided
//! within milliseconds, waited behind thousands of the backlog's decisions before its SETs were
//! even signed: 416 ms at the 99th percentile at the enforcement points (benches/RESULTS.md). So
//! decisions take the lane of the inbox message that made them:
//!
//! - **bulk**: decisions made while applying a bulk message (a source's batch, retention, a
//!   partition's adoption). Sending never blocks — a shard must not stop applying another party's
//!   signal because the backlog's decisions wait — and the lane is bounded instead by the shards:
//!   while it holds [`BULK_BOUND`] decisions or more, every shard holds its inbox's bulk lane
//!   ([`HandOver::bulk_full`]), and the sources' own queue bounds pause them. One batch per
//!   shard may pass the bound.
//! - **interactive**: every other decision — signals intake handed on, registrations,
//!   re-evaluations, policy swaps. Bounded; a shard waits for room, as it always did.
//!
//! Delivery takes each lane in a loop of its own: a decision in the interactive lane waits for
//! that lane's batches, not for the commits the backlog's batches wait on (the same backlog's
//! decisions, 256 at a time, each batch waiting for its commit behind the others in the state
//! store's writer). Across lanes the order of decisions is not kept, and needs not be: every
//! decision that reaches an enforcement point tightens the grant (a revocation, a step-up, a
//! restriction; an `allow` sends nothing), so an enforcement point that gets two of them in either
//! order holds the grant as tightly. A SET is never the only thing that keeps a grant revoked:
//! the live check answers from the grant's state.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::Handed;

/// Decisions the bulk lane holds before the shards stop taking their sources' backlog: about the
/// interactive lane's bound, so a backlog keeps delivery as busy as it was with one queue.
pub const BULK_BOUND: usize = 4096;

/// The lane a decision takes (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Interactive,
    Bulk,
}

/// Two lanes to delivery: the interactive one holds up to `interactive` decisions.
pub fn lanes(interactive: usize) -> (HandOver, Handoffs) {
    let (interactive_tx, interactive_rx) = mpsc::channel(interactive.max(1));
    let (bulk_tx, bulk_rx) = mpsc::unbounded_channel();
    let bulk_queued = Arc::new(AtomicUsize::new(0));
    (
        HandOver {
            interactive: interactive_tx,
            bulk: bulk_tx,
            bulk_queued: bulk_queued.clone(),
        },
        Handoffs {
            interactive: LaneReceiver {
                rx: Rx::Bounded(interactive_rx),
            },
            bulk: LaneReceiver {
                rx: Rx::Unbounded(bulk_rx, bulk_queued),
            },
        },
    )
}

/// The engine's end: shards and adoption send decisions to delivery through it.
#[derive(Clone)]
pub struct HandOver {
    interactive: mpsc::Sender<Handed>,
    bulk: mpsc::UnboundedSender<Handed>,
    bulk_queued: Arc<AtomicUsize>,
}

impl HandOver {
    /// Sends `handed` in `lane`; waits for room in the interactive lane only. Gives it back when
    /// delivery is gone. Not for async contexts: it blocks the thread.
    pub fn blocking_send(&self, handed: Handed, lane: Lane) -> Result<(), Box<Handed>> {
        match lane {
            Lane::Interactive => self
                .interactive
                .blocking_send(handed)
                .map_err(|e| Box::new(e.0)),
            Lane::Bulk => {
                self.bulk_queued.fetch_add(1, Ordering::Relaxed);
                self.bulk.send(handed).map_err(|e| {
                    self.bulk_queued.fetch_sub(1, Ordering::Relaxed);
                    Box::new(e.0)
                })
            }
        }
    }

    /// Whether the bulk lane is at its bound: shards then take no source's backlog.
    pub fn bulk_full(&self) -> bool {
        self.bulk_queued() >= BULK_BOUND
    }

    /// Decisions waiting in the bulk lane.
    pub fn bulk_queued(&self) -> usize {
        self.bulk_queued.load(Ordering::Relaxed)
    }
}

/// Delivery's end of the two lanes: each is taken by a loop of its own, so the interactive lane's
/// decisions never wait for the bulk lane's commits (`transmitter/emit.rs`).
pub struct Handoffs {
    pub interactive: LaneReceiver,
    pub bulk: LaneReceiver,
}

impl Handoffs {
    /// Takes every decision and drops it until the engine is gone: for harnesses that drive the
    /// engine without delivery.
    pub async fn discard(self) {
        let Handoffs {
            mut interactive,
            mut bulk,
        } = self;
        tokio::join!(
            async { while interactive.recv().await.is_some() {} },
            async { while bulk.recv().await.is_some() {} },
        );
    }
}

/// One lane's receiving end.
pub struct LaneReceiver {
    rx: Rx,
}

enum Rx {
    Bounded(mpsc::Receiver<Handed>),
    Unbounded(mpsc::UnboundedReceiver<Handed>, Arc<AtomicUsize>),
}

impl LaneReceiver {
    /// The lane's next decision; `None` once the engine is gone and the lane is empty.
    pub async fn recv(&mut self) -> Option<Handed> {
        match &mut self.rx {
            Rx::Bounded(rx) => rx.recv().await,
            Rx::Unbounded(rx, queued) => {
                let handed = rx.recv().await?;
                queued.fetch_sub(1, Ordering::Relaxed);
                Some(handed)
            }
        }
    }

    /// Adds what the lane holds to `batch`, up to `max` in all, without waiting.
    pub fn fill(&mut self, batch: &mut Vec<Handed>, max: usize) {
        while batch.len() < max {
            let next = match &mut self.rx {
                Rx::Bounded(rx) => rx.try_recv().ok(),
                Rx::Unbounded(rx, queued) => rx.try_recv().ok().inspect(|_| {
                    queued.fetch_sub(1, Ordering::Relaxed);
                }),
            };
            match next {
                Some(handed) => batch.push(handed),
                None => return,
            }
        }
    }

    /// Decisions waiting in the lane.
    pub fn queued(&self) -> usize {
        match &self.rx {
            Rx::Bounded(rx) => rx.len(),
            Rx::Unbounded(_, queued) => queued.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::DecisionEffect;
    use crate::grant::GrantRequest;

    /// A revocation whose id is `id`.
    fn handed(id: &str) -> Handed {
        let grant = serde_json::from_value::<GrantRequest>(serde_json::json!({
            "id": "g", "kind": "session",
            "subject": {"format": "email", "email": "u@example.com"},
            "issued_at": 10.0, "expires_at": 3600.0}))
        .unwrap()
        .into_grant("email:u@example.com".into(), 10.0)
        .unwrap();
        let mut decision = crate::decision::testing::decision(DecisionEffect::Revoke, 20.0);
        decision.id = id.into();
        Handed::restored(decision, Arc::new(grant))
    }

    fn ids(batch: &[Handed]) -> Vec<&str> {
        batch.iter().map(|h| h.decision.id.as_str()).collect()
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    #[test]
    fn each_lane_keeps_its_own_decisions_in_order() {
        let (tx, rx) = lanes(16);
        let Handoffs {
            mut interactive,
            mut bulk,
        } = rx;
        for i in 0..6 {
            assert!(tx
                .blocking_send(handed(&format!("b{i}")), Lane::Bulk)
                .is_ok());
            assert!(tx
                .blocking_send(handed(&format!("i{i}")), Lane::Interactive)
                .is_ok());
        }
        assert_eq!((interactive.queued(), bulk.queued()), (6, 6));
        let first = runtime().block_on(interactive.recv()).unwrap();
        let mut batch = vec![first];
        interactive.fill(&mut batch, 4);
        assert_eq!(ids(&batch), ["i0", "i1", "i2", "i3"]);
        let mut backlog = Vec::new();
        bulk.fill(&mut backlog, 100);
        assert_eq!(ids(&backlog), ["b0", "b1", "b2", "b3", "b4", "b5"]);
        assert_eq!((interactive.queued(), bulk.queued()), (2, 0));
        drop(tx);
        let rt = runtime();
        assert_eq!(rt.block_on(interactive.recv()).unwrap().decision.id, "i4");
        assert_eq!(rt.block_on(interactive.recv()).unwrap().decision.id, "i5");
        assert!(
            rt.block_on(interactive.recv()).is_none(),
            "closed and empty"
        );
        assert!(rt.block_on(bulk.recv()).is_none(), "closed and empty");
    }

    #[test]
    fn the_bulk_lane_counts_to_its_bound_and_back() {
        let (tx, rx) = lanes(1);
        let mut bulk = rx.bulk;
        for i in 0..BULK_BOUND {
            assert!(!tx.bulk_full(), "full at {i}");
            assert!(tx
                .blocking_send(handed(&format!("b{i}")), Lane::Bulk)
                .is_ok());
        }
        assert!(tx.bulk_full());
        // Sending to a full bulk lane does not block: a shard goes on with its batch.
        assert!(tx.blocking_send(handed("over"), Lane::Bulk).is_ok());
        let mut batch = Vec::new();
        bulk.fill(&mut batch, 1);
        assert!(tx.bulk_full(), "one over the bound, one taken");
        bulk.fill(&mut batch, 2);
        assert!(!tx.bulk_full(), "room again once delivery took some");
        assert!(runtime().block_on(bulk.recv()).is_some());
        assert_eq!(tx.bulk_queued(), BULK_BOUND - 2);
        drop(bulk);
        assert!(tx.blocking_send(handed("late"), Lane::Bulk).is_err());
        assert_eq!(
            tx.bulk_queued(),
            BULK_BOUND - 2,
            "a decision nobody took is not counted"
        );
    }
}
