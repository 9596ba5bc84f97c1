//! A shard's inbox: two lanes, taken fairly.
//!
//! A shard applies its messages in batches. With one queue in arrival order, a backlog that one
//! party made — a Kafka feed catching up (up to `kafka.max_queued_signals` signals, seconds of
//! work when each one revokes a grant) or a retention wave — stood ahead of every signal another
//! transmitter pushed, and of every registration: a push's revocation waited for the whole
//! backlog. So the inbox keeps two lanes:
//!
//! - **bulk**: work whose source can wait and replays it — a source's batches
//!   ([`Msg::Batch`]: Kafka, the cluster's signals topic), retention's forgetting, and a
//!   partition's release and adoption (kept in the same lane as the batches they are ordered
//!   with);
//! - **interactive**: everything else — signals intake handed on, registrations, deletions,
//!   re-evaluations, stop.
//!
//! Each batch takes the interactive lane's messages up to half of its size, then the bulk lane's
//! up to its size, then the interactive lane's again: neither lane can starve the other, and a
//! signal in the interactive lane waits for at most the batch being applied, not for the backlog.
//! Each lane keeps its order. Across lanes the order of arrival is not kept, which nothing
//! depends on: a context folds its signals by event time, and every sender's own messages stay
//! in one lane. `Stop` is taken only once the bulk lane is empty, so a shard still finishes
//! everything queued before it.
//!
//! A shard whose checkpoints lag behind the store, or whose backlog's decisions wait in delivery's
//! bulk lane at its bound (`handover.rs`), holds the bulk lane ([`Bulk::Hold`]) and takes only
//! interactive messages: the backlog waits (its source is paused by its own queue bound), while
//! another party's signal is still applied at once. While other parties are active, a shard takes
//! the bulk lane only a quarter batch at a time ([`Bulk::Share`], `shard.rs`).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::Msg;

/// The inbox was closed: no sender is left and nothing is queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Disconnected;

/// Creates a shard's inbox and the first sender to it.
pub(crate) fn inbox() -> (InboxSender, Inbox) {
    let shared = Arc::new(Lanes {
        state: Mutex::new(State {
            senders: 1,
            ..State::default()
        }),
        ready: Condvar::new(),
    });
    (
        InboxSender {
            lanes: shared.clone(),
        },
        Inbox { lanes: shared },
    )
}

struct Lanes {
    state: Mutex<State>,
    ready: Condvar,
}

impl Lanes {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queues half-changed: every change is
        // one push or pop.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Default)]
struct State {
    interactive: VecDeque<Msg>,
    bulk: VecDeque<Msg>,
    senders: usize,
    receiver_gone: bool,
}

/// Whether `msg` waits in the bulk lane (see the module's documentation).
pub(crate) fn is_bulk(msg: &Msg) -> bool {
    matches!(
        msg,
        Msg::Batch { .. } | Msg::Forget { .. } | Msg::Release { .. } | Msg::Adopt { .. }
    )
}

/// Whether a take may take from the bulk lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bulk {
    Take,
    /// At most this weight of the bulk lane (the last message taken may pass it).
    Share(usize),
    /// Only the interactive lane: the bulk lane's messages wait.
    Hold,
}

/// Sends to a shard's inbox; cloned for every sender (the engine, the other shards, retention).
pub(crate) struct InboxSender {
    lanes: Arc<Lanes>,
}

impl InboxSender {
    /// Queues `msg` in its lane; gives it back if the shard is gone.
    pub(crate) fn send(&self, msg: Msg) -> Result<(), Msg> {
        let mut state = self.lanes.lock();
        if state.receiver_gone {
            return Err(msg);
        }
        state.push(msg);
        drop(state);
        self.lanes.ready.notify_one();
        Ok(())
    }

    /// Queues every message of `msgs` in its lane at once: a shard takes none of them before
    /// all are queued. Gives them back if the shard is gone.
    pub(crate) fn send_all(&self, msgs: Vec<Msg>) -> Result<(), Vec<Msg>> {
        let mut state = self.lanes.lock();
        if state.receiver_gone {
            return Err(msgs);
        }
        for msg in msgs {
            state.push(msg);
        }
        drop(state);
        self.lanes.ready.notify_one();
        Ok(())
    }
}

impl Clone for InboxSender {
    fn clone(&self) -> Self {
        self.lanes.lock().senders += 1;
        InboxSender {
            lanes: self.lanes.clone(),
        }
    }
}

impl Drop for InboxSender {
    fn drop(&mut self) {
        let mut state = self.lanes.lock();
        state.senders = state.senders.saturating_sub(1);
        let last = state.senders == 0;
        drop(state);
        if last {
            self.lanes.ready.notify_all();
        }
    }
}

/// A shard's end of its inbox.
pub(crate) struct Inbox {
    lanes: Arc<Lanes>,
}

impl Inbox {
    /// Takes up to `max_weight` (in [`Msg::weight`]; the last message taken may pass it) from
    /// both lanes fairly — from the interactive lane alone when `bulk` holds the other — without
    /// waiting; empty when nothing is queued.
    pub(crate) fn take(&self, max_weight: usize, bulk: Bulk) -> Result<Vec<Msg>, Disconnected> {
        let mut state = self.lanes.lock();
        let taken = state.take(max_weight, bulk);
        if taken.is_empty() && state.closed() {
            return Err(Disconnected);
        }
        Ok(taken)
    }

    /// As [`Inbox::take`], waiting up to `wait` for a first message it may take.
    pub(crate) fn take_within(
        &self,
        max_weight: usize,
        bulk: Bulk,
        wait: Duration,
    ) -> Result<Vec<Msg>, Disconnected> {
        let deadline = Instant::now().checked_add(wait);
        let mut state = self.lanes.lock();
        loop {
            let taken = state.take(max_weight, bulk);
            if !taken.is_empty() {
                return Ok(taken);
            }
            if state.closed() {
                return Err(Disconnected);
            }
            let left = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => wait,
            };
            if left.is_zero() {
                return Ok(taken);
            }
            state = self
                .lanes
                .ready
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        let mut state = self.lanes.lock();
        state.receiver_gone = true;
        // Their replies and permits are dropped now, so whoever waits on them learns at once.
        let dropped = (
            std::mem::take(&mut state.interactive),
            std::mem::take(&mut state.bulk),
        );
        drop(state);
        drop(dropped);
    }
}

impl State {
    /// Queues `msg` at the end of its lane.
    fn push(&mut self, msg: Msg) {
        if is_bulk(&msg) {
            self.bulk.push_back(msg);
        } else {
            self.interactive.push_back(msg);
        }
    }

    /// No sender is left and nothing is queued (a held bulk lane still counts as queued).
    fn closed(&self) -> bool {
        self.senders == 0 && self.interactive.is_empty() && self.bulk.is_empty()
    }

    /// Interactive up to half of `max_weight`, then bulk up to `max_weight` (unless held, or
    /// less for a share), then interactive again; `Stop` only once the bulk lane is empty.
    fn take(&mut self, max_weight: usize, bulk: Bulk) -> Vec<Msg> {
        let max_weight = max_weight.max(1);
        let mut taken = Vec::new();
        let mut weight = 0;
        self.take_interactive(max_weight.div_ceil(2), &mut weight, &mut taken);
        let share = match bulk {
            Bulk::Take => max_weight,
            Bulk::Share(share) => share.max(1),
            Bulk::Hold => 0,
        };
        let mut bulk_weight = 0;
        while bulk_weight < share && weight < max_weight {
            let Some(msg) = self.bulk.pop_front() else {
                break;
            };
            weight += msg.weight();
            bulk_weight += msg.weight();
            taken.push(msg);
        }
        self.take_interactive(max_weight, &mut weight, &mut taken);
        taken
    }

    fn take_interactive(&mut self, up_to: usize, weight: &mut usize, taken: &mut Vec<Msg>) {
        while *weight < up_to {
            if matches!(self.interactive.front(), Some(Msg::Stop)) && !self.bulk.is_empty() {
                return;
            }
            let Some(msg) = self.interactive.pop_front() else {
                return;
            };
            *weight += msg.weight();
            taken.push(msg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forget(tag: usize) -> Msg {
        let (handled, _) = std::sync::mpsc::channel();
        Msg::Forget {
            due: vec![super::super::retention::Due {
                key: format!("k{tag}"),
                aliases: Vec::new(),
            }],
            handled,
        }
    }

    fn reevaluate(tag: usize) -> Msg {
        Msg::Reevaluate {
            grants: vec![format!("g{tag}").into()],
            trigger: None,
        }
    }

    /// What a taken batch holds, in order: `b<n>` for a bulk message, `i<n>` for an interactive
    /// one, `stop`.
    fn names(taken: &[Msg]) -> Vec<String> {
        taken
            .iter()
            .map(|m| match m {
                Msg::Forget { due, .. } => format!("b{}", &due[0].key[1..]),
                Msg::Reevaluate { grants, .. } => format!("i{}", &grants[0][1..]),
                Msg::Stop => "stop".to_owned(),
                _ => "other".to_owned(),
            })
            .collect()
    }

    /// A backlog in the bulk lane does not hold an interactive message behind it: the next batch
    /// takes the interactive message first, then bulk work to fill it.
    #[test]
    fn an_interactive_message_overtakes_a_backlog() {
        let (to, inbox) = inbox();
        for n in 0..10 {
            to.send(forget(n)).map_err(|_| "sent").unwrap();
        }
        to.send(reevaluate(0)).map_err(|_| "sent").unwrap();
        let taken = inbox.take(4, Bulk::Take).unwrap();
        assert_eq!(names(&taken), ["i0", "b0", "b1", "b2"]);
        let taken = inbox.take(4, Bulk::Take).unwrap();
        assert_eq!(names(&taken), ["b3", "b4", "b5", "b6"]);
    }

    /// Neither lane starves the other: with both full, a batch is half of each, and each lane
    /// keeps its order.
    #[test]
    fn both_lanes_share_a_batch_and_keep_their_order() {
        let (to, inbox) = inbox();
        for n in 0..6 {
            to.send(forget(n)).map_err(|_| "sent").unwrap();
            to.send(reevaluate(n)).map_err(|_| "sent").unwrap();
        }
        assert_eq!(
            names(&inbox.take(4, Bulk::Take).unwrap()),
            ["i0", "i1", "b0", "b1"]
        );
        assert_eq!(
            names(&inbox.take(4, Bulk::Take).unwrap()),
            ["i2", "i3", "b2", "b3"]
        );
        // Bulk alone fills what the interactive lane leaves.
        assert_eq!(
            names(&inbox.take(8, Bulk::Take).unwrap()),
            ["i4", "i5", "b4", "b5"]
        );
        assert!(inbox.take(8, Bulk::Take).unwrap().is_empty());
    }

    /// `Stop` waits until the bulk lane is empty, so what was queued before it is finished.
    #[test]
    fn stop_comes_after_the_bulk_lane() {
        let (to, inbox) = inbox();
        for n in 0..3 {
            to.send(forget(n)).map_err(|_| "sent").unwrap();
        }
        to.send(Msg::Stop).map_err(|_| "sent").unwrap();
        assert_eq!(names(&inbox.take(2, Bulk::Take).unwrap()), ["b0", "b1"]);
        assert_eq!(names(&inbox.take(2, Bulk::Take).unwrap()), ["b2", "stop"]);
    }

    /// A held bulk lane gives nothing, not even `Stop` behind it, and is not the end of the
    /// inbox; taken again, it gives its messages in order.
    #[test]
    fn a_held_bulk_lane_waits_for_its_turn() {
        let (to, inbox) = inbox();
        for n in 0..3 {
            to.send(forget(n)).map_err(|_| "sent").unwrap();
        }
        to.send(reevaluate(0)).map_err(|_| "sent").unwrap();
        to.send(Msg::Stop).map_err(|_| "sent").unwrap();
        drop(to);
        assert_eq!(names(&inbox.take(8, Bulk::Hold).unwrap()), ["i0"]);
        assert!(inbox.take(8, Bulk::Hold).unwrap().is_empty());
        assert!(inbox
            .take_within(8, Bulk::Hold, Duration::from_millis(10))
            .unwrap()
            .is_empty());
        assert_eq!(
            names(&inbox.take(8, Bulk::Take).unwrap()),
            ["b0", "b1", "b2", "stop"]
        );
        assert!(matches!(inbox.take(8, Bulk::Hold), Err(Disconnected)));
    }

    /// A share takes that much of the bulk lane's weight — the message that reaches it whole —
    /// and leaves the rest of the batch to the interactive lane.
    #[test]
    fn a_share_takes_part_of_the_bulk_lane() {
        let (to, inbox) = inbox();
        for n in 0..4 {
            to.send(forget(n)).map_err(|_| "sent").unwrap();
        }
        for n in 0..3 {
            to.send(reevaluate(n)).map_err(|_| "sent").unwrap();
        }
        assert_eq!(
            names(&inbox.take(8, Bulk::Share(2)).unwrap()),
            ["i0", "i1", "i2", "b0", "b1"]
        );
        assert_eq!(names(&inbox.take(8, Bulk::Share(1)).unwrap()), ["b2"]);
        assert_eq!(names(&inbox.take(8, Bulk::Share(5)).unwrap()), ["b3"]);
    }

    /// A wait ends with the first message sent, or empty at its timeout; the inbox reports
    /// disconnection once every sender is gone and nothing is queued, and a sender learns when
    /// the shard is gone.
    #[test]
    fn waits_and_disconnection() {
        let (to, inbox) = inbox();
        assert!(inbox
            .take_within(4, Bulk::Take, Duration::from_millis(20))
            .unwrap()
            .is_empty());
        let other = to.clone();
        let sending = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            other.send(reevaluate(7)).map_err(|_| "sent").unwrap();
        });
        let taken = inbox
            .take_within(4, Bulk::Take, Duration::from_secs(10))
            .unwrap();
        assert_eq!(names(&taken), ["i7"]);
        sending.join().unwrap();
        to.send(forget(1)).map_err(|_| "sent").unwrap();
        drop(to);
        assert_eq!(names(&inbox.take(4, Bulk::Take).unwrap()), ["b1"]);
        assert!(matches!(inbox.take(4, Bulk::Take), Err(Disconnected)));
        assert!(matches!(
            inbox.take_within(4, Bulk::Take, Duration::from_secs(10)),
            Err(Disconnected)
        ));

        let (to, gone) = super::inbox();
        drop(gone);
        assert!(to.send(reevaluate(0)).is_err());
    }
}
