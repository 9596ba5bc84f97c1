//! One shard: a thread that owns the contexts and grants whose keys hash to it, applies its inbox
//! (two lanes, each in order: `inbox.rs`), and commits each batch of work in one store transaction. This file is the thread's loop
//! and what it does with each message (fold a signal, register, delete, re-evaluate, sweep); its
//! neighbours hold the other jobs: the batch's way to disk and out (`commit.rs`), a grant's
//! evaluation inputs (`inputs.rs`), the decision rules (`decide.rs`) and session grants from
//! session-established events (`session_grant.rs`).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::commit::{
    CheckpointWaiter, Checkpointing, Committing, Draining, Pending, Reply, Unstored,
};
use super::decide::{self, cause_of};
use super::inbox::{is_bulk, Bulk, Disconnected, Inbox, InboxSender};
use super::inputs::{shared_view, Inputs};
use super::rewrite::Written;
use super::session_grant;
use super::{member_index, obo_index, principal_index, EngineError, Msg, Registered, Shared};
use crate::context::PrincipalContext;
use crate::decision::Cause;
use crate::evaluate::{signal_view, subject_view, Trigger, Triggered};
use crate::grant::{Grant, GrantId, GrantStatus};
use crate::policy::screen::Screen;
use crate::policy::{Evaluation, PolicySet};
use crate::principal::Target;
use crate::signal::Signal;

pub(crate) struct Shard {
    pub(super) id: usize,
    pub(super) shared: Arc<Shared>,
    pub(super) inboxes: Vec<InboxSender>,
    /// The grants this shard owns, by expiry (milliseconds) — for the sweep and for re-evaluate-all.
    pub(super) expiry: BTreeSet<(i64, GrantId)>,
    /// Contexts changed by signals whose source replays them, not yet written: they are
    /// checkpointed together every checkpoint interval (`EngineSettings::checkpoint_interval`), so
    /// a subject's many updates cost one write, and a signal that changes only a context costs no
    /// commit of its own. Every source replays: a Kafka partition from its committed offset,
    /// intake its pending signals. Kafka batches are answered (and their offsets committed), and
    /// pushed signals marked processed in intake, only after that write. Decisions and grant
    /// changes those signals cause are never deferred, nor are the contexts they were decided
    /// on (`Pending::decided`).
    /// Only keys are held: the context itself is read at the checkpoint, so until then the shard
    /// owns the only reference and later signals update it in place instead of copying it.
    pub(super) dirty: std::collections::HashSet<String>,
    /// Contexts of [`Shard::dirty`] or of the checkpoint being drained that a decision's commit
    /// has stored since, by the version it stored: the checkpoint skips one still at that
    /// version instead of encoding it again and having the store's writer read the stored row
    /// to find it current. When every Kafka message revokes, every context a checkpoint holds
    /// was stored so (benches/RESULTS.md).
    pub(super) decided_stored: HashMap<String, u64>,
    /// Contexts retention forgot whose deletion (bulk lane) has not settled yet, with how many
    /// such deletions are in flight. A context made anew under such a key and written with a
    /// decision (ordinary lane) may be deleted after that write: it is not noted in
    /// [`Shard::decided_stored`], so the next checkpoint writes it again, behind the deletion.
    pub(super) forgetting: HashMap<String, u32>,
    /// Session revocations changed by replayable signals, written with the next checkpoint.
    pub(super) dirty_revocations: Vec<(String, String)>,
    /// Links (identifier → principal) learned from replayable signals, written with the next
    /// checkpoint (single node): a signal naming an identifier seen for the first time — every
    /// new session does — then costs no commit of its own, and a decision's commit does not wait
    /// behind such commits. A crash before the checkpoint replays the signal, which links them
    /// again. In cluster mode they go out with their batch, as the other instances route by them.
    pub(super) dirty_aliases: HashMap<String, String>,
    pub(super) checkpoint_waiters: Vec<CheckpointWaiter>,
    /// Intake sequence numbers of pushed signals applied since the last checkpoint.
    pub(super) checkpoint_processed: Vec<u64>,
    /// When the last checkpoint was taken, by the injected clock (milliseconds): the interval is
    /// measured on it, so a test moves it instead of waiting.
    pub(super) last_checkpoint_ms: i64,
    /// The checkpoint being taken a part per batch, if one is (see [`Draining`]).
    pub(super) draining: Option<Draining>,
    /// Counts the checkpoints taken: a checkpoint's parts in flight never wait for each other,
    /// but while an older checkpoint is still in flight the shard takes no source's backlog
    /// ([`Shard::checkpoints_lag`]).
    pub(super) checkpoint_generation: u64,
    /// Checkpoints whose chunks are still committing, oldest first (see [`Checkpointing`]).
    pub(super) checkpointing: VecDeque<Checkpointing>,
    /// Commit failures waiting for the checkpoint each fails: that checkpoint's signals include
    /// the failed batch's, whose decisions are not stored, so they must stay pending for replay.
    /// Bounded by the checkpoints in flight: the batch that completes one takes its failures.
    pub(super) unstored: Unstored,
    /// What failed commits held, written again from memory with the next batch
    /// ([`super::rewrite`]).
    pub(super) rewrite: Option<Written>,
    /// When the next attempt at [`Shard::rewrite`] may go, by the injected clock (ms).
    pub(super) rewrite_after_ms: i64,
    /// The keys this shard journaled and the round writing them at their places
    /// ([`super::journal`]).
    pub(super) fold: super::journal::Fold,
    /// `vigil_engine_shard_held` of this shard, one gauge per set of [`HELD`].
    held: [metrics::Gauge; HELD.len()],
}

/// The sets a shard holds between checkpoints and commits, as `vigil_engine_shard_held` names
/// them, in the order [`Shard::held_sizes`] counts them.
const HELD: [&str; 8] = [
    "dirty",
    "decided_stored",
    "forgetting",
    "dirty_revocations",
    "dirty_aliases",
    "checkpoint_processed",
    "unstored",
    "written_again",
];

/// How often an idle shard looks whether a checkpoint in flight has committed.
const CHECKPOINT_POLL: Duration = Duration::from_millis(2);

/// A source's backlog gets a quarter of a shard's batch while other parties are active. Every
/// shard's commits go through the state store's one writer, and another party's revocation waits
/// there for the commit being written and the next: with whole batches of a backlog that revokes
/// a grant per signal, 94–100 ms at the median at the enforcement points; with a quarter while
/// others are active, 29 ms, for 3–9 % of the backlog's rate (benches/RESULTS.md). With nobody
/// else active the backlog takes whole batches.
pub(crate) const BACKLOG_SHARE: usize = 4;

/// How long after another party's last live work the backlog keeps to its share.
const LIVE_WORK_RECENT: Duration = Duration::from_secs(1);

/// When a shard last took another party's live work: a signal intake handed on, a registration,
/// a deletion. Shared by the shards, since all their commits wait in one writer.
pub(crate) struct LiveWork {
    epoch: Instant,
    /// Milliseconds since `epoch`; `u64::MAX` until the first.
    last_ms: std::sync::atomic::AtomicU64,
}

impl Default for LiveWork {
    fn default() -> Self {
        LiveWork {
            epoch: Instant::now(),
            last_ms: std::sync::atomic::AtomicU64::new(u64::MAX),
        }
    }
}

impl LiveWork {
    fn is_live(msg: &Msg) -> bool {
        matches!(
            msg,
            Msg::Signal { .. } | Msg::Signals { .. } | Msg::Register { .. } | Msg::Delete { .. }
        )
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    fn seen(&self) {
        self.last_ms
            .store(self.now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether live work came within [`LIVE_WORK_RECENT`].
    fn recent(&self) -> bool {
        let last = self.last_ms.load(std::sync::atomic::Ordering::Relaxed);
        last != u64::MAX && self.now_ms().saturating_sub(last) < LIVE_WORK_RECENT.as_millis() as u64
    }
}

/// Most such contexts (or links) held before a write is forced.
const CHECKPOINT_MAX_DIRTY: usize = 100_000;

fn ms(t: f64) -> i64 {
    (t * 1000.0) as i64
}

impl Shard {
    pub fn new(
        id: usize,
        shared: Arc<Shared>,
        inboxes: Vec<InboxSender>,
        grants: Vec<Arc<Grant>>,
    ) -> Shard {
        let expiry = grants
            .iter()
            .map(|g| (ms(g.expires_at), g.id.clone()))
            .collect();
        let last_checkpoint_ms = shared.settings.clock.now_ms();
        let fold_budget = shared.settings.journal_fold_cache_bytes / shared.settings.shards.max(1);
        Shard {
            id,
            shared,
            inboxes,
            expiry,
            dirty: std::collections::HashSet::new(),
            decided_stored: HashMap::new(),
            forgetting: HashMap::new(),
            dirty_revocations: Vec::new(),
            dirty_aliases: HashMap::new(),
            checkpoint_waiters: Vec::new(),
            checkpoint_processed: Vec::new(),
            last_checkpoint_ms,
            draining: None,
            checkpoint_generation: 0,
            checkpointing: VecDeque::new(),
            unstored: Unstored::default(),
            rewrite: None,
            rewrite_after_ms: 0,
            fold: super::journal::Fold::new(id, last_checkpoint_ms, fold_budget),
            held: HELD.map(|set| {
                metrics::gauge!(crate::telemetry::ENGINE_SHARD_HELD, "shard" => id.to_string(), "set" => set)
            }),
        }
    }

    /// How much each set of [`HELD`] holds.
    fn held_sizes(&self) -> [usize; HELD.len()] {
        [
            self.dirty.len(),
            self.decided_stored.len(),
            self.forgetting.len(),
            self.dirty_revocations.len(),
            self.dirty_aliases.len(),
            self.checkpoint_processed.len(),
            self.unstored.len(),
            self.rewrite.as_ref().map_or(0, Written::len),
        ]
    }

    /// The shard's loop. Batches are pipelined with their commits: while batch N is being written,
    /// batch N+1 is applied in memory; N is announced (replies, decisions, forwards) once its
    /// commit is on disk and before N+1's commit is waited for, so announcements keep their order.
    pub fn run(mut self, inbox: Inbox) {
        let interval = self.shared.settings.sweep_interval;
        let max_batch = self.shared.settings.max_batch.max(1);
        let checkpoint_interval = self.shared.settings.checkpoint_interval;
        let mut last_sweep = Instant::now();
        let mut committing: Option<Committing> = None;
        loop {
            self.settle_checkpoints(0);
            let lagging =
                self.checkpoints_lag() || self.fold.lags(self.shared.settings.journal_fold_rows);
            // Delivery behind on the backlogs' decisions holds the backlogs too, not everything
            // (`super::handover`).
            let delivery_behind = self.shared.decisions.bulk_full();
            let bulk = if lagging || delivery_behind {
                Bulk::Hold
            } else if self.shared.live_work.recent() {
                Bulk::Share(max_batch.div_ceil(BACKLOG_SHARE))
            } else {
                Bulk::Take
            };
            // Counted in signals, not messages: a source's batch is one message of many signals,
            // and a commit of a whole backlog's worth is that much memory at once.
            let batch = match inbox.take(max_batch, bulk) {
                Err(Disconnected) => break,
                Ok(batch) if !batch.is_empty() => batch,
                Ok(_) => {
                    // Nothing queued: announce the batch in flight before waiting for more.
                    if let Some(c) = committing.take() {
                        self.announce(c);
                    }
                    let wait = if self.checkpoint_waiters.is_empty()
                        && self.checkpoint_processed.is_empty()
                        && self.dirty.is_empty()
                        && self.dirty_aliases.is_empty()
                    {
                        interval
                    } else {
                        checkpoint_interval
                            .saturating_sub(self.since_checkpoint())
                            .min(interval)
                    };
                    let wait = wait.min(self.until_fold());
                    let wait = if self.draining.is_some() || self.fold_part_due() {
                        // Nothing is waiting for the shard: the checkpoint's or the fold's next
                        // part now.
                        Duration::ZERO
                    } else if self.checkpointing.is_empty()
                        && !delivery_behind
                        && !self.fold.in_flight()
                    {
                        wait
                    } else {
                        // Nothing wakes the shard when the store or delivery catches up.
                        wait.min(CHECKPOINT_POLL)
                    };
                    match inbox.take_within(max_batch, bulk, wait) {
                        Ok(batch) => batch,
                        Err(Disconnected) => break,
                    }
                }
            };
            if batch.iter().any(LiveWork::is_live) {
                self.shared.live_work.seen();
            }
            let mut p = Pending::default();
            let mut stop = false;
            if !batch.is_empty() {
                let started = Instant::now();
                for msg in batch {
                    match msg {
                        Msg::Stop => stop = true,
                        other if is_bulk(&other) => {
                            let first = p.decisions.len();
                            self.handle(other, &mut p);
                            p.bulk_decisions.push(first..p.decisions.len());
                        }
                        other => self.handle(other, &mut p),
                    }
                }
                metrics::histogram!(crate::telemetry::ENGINE_BATCH_SECONDS)
                    .record(started.elapsed().as_secs_f64());
            }
            if last_sweep.elapsed() >= interval {
                self.sweep(&mut p);
                for (gauge, size) in self.held.iter().zip(self.held_sizes()) {
                    gauge.set(size as f64);
                }
                last_sweep = Instant::now();
            }
            if stop
                || (self.since_checkpoint() >= checkpoint_interval && !lagging)
                || self.dirty.len() >= CHECKPOINT_MAX_DIRTY
                || self.dirty_aliases.len() >= CHECKPOINT_MAX_DIRTY
            {
                self.start_checkpoint(stop, &mut p);
            } else {
                self.checkpoint_part(&mut p);
            }
            let next = self.commit(p);
            // After the batch's ordinary write: a part reads the batch's changes, and must not
            // be stored before the journal row that holds them.
            self.fold_step();
            if let Some(previous) = committing.replace(next) {
                self.announce(previous);
            }
            if stop {
                break;
            }
        }
        if let Some(c) = committing.take() {
            self.announce(c);
        }
        self.settle_checkpoints(u64::MAX);
    }

    /// Whether a checkpoint older than the newest is still being written. The store is then
    /// behind this shard: it takes no source's backlog ([`Bulk::Hold`]) and starts no checkpoint
    /// on time until the store catches up, but goes on applying what intake hands on,
    /// registrations and re-evaluations. It used to stop altogether, waiting for the older
    /// checkpoint: with a Kafka backlog revoking a grant per message, a pushed revocation then
    /// waited hundreds of milliseconds before it was even applied (benches/RESULTS.md).
    fn checkpoints_lag(&self) -> bool {
        self.checkpointing
            .front()
            .is_some_and(|oldest| oldest.generation < self.checkpoint_generation)
    }

    /// Time since the last checkpoint, by the injected clock (zero if it went back).
    fn since_checkpoint(&self) -> Duration {
        let elapsed = self.shared.settings.clock.now_ms() - self.last_checkpoint_ms;
        Duration::from_millis(u64::try_from(elapsed).unwrap_or(0))
    }

    fn handle(&mut self, msg: Msg, p: &mut Pending) {
        match msg {
            Msg::Signal { routed, permit } => {
                p.permits.push(permit);
                self.checkpoint_processed.push(routed.signal.seq);
                self.apply_routed(*routed, p);
            }
            Msg::Signals { routed, permit } => {
                p.permits.push(permit);
                for routed in routed {
                    self.checkpoint_processed.push(routed.signal.seq);
                    self.apply_routed(routed, p);
                }
            }
            Msg::Batch { items, done } => {
                self.shared
                    .queued_signals
                    .fetch_sub(items.len(), std::sync::atomic::Ordering::Relaxed);
                for routed in items {
                    self.apply_routed(routed, p);
                }
                self.checkpoint_waiters.push(CheckpointWaiter::Batch(done));
            }
            Msg::Forget { due, handled } => {
                for due in due {
                    self.forget(due, p);
                }
                // Answered once this batch's deletions are stored.
                p.batch_waiters.push(CheckpointWaiter::Forgotten(handled));
            }
            Msg::Reevaluate { grants, trigger } => {
                let policy = self.shared.policy();
                let cause = match &trigger {
                    Some(t) => cause_of(&t.0, "dependency"),
                    None => Cause::of_state("dependency"),
                };
                let triggered = trigger.as_ref().map(|t| Triggered::new(&t.0, &t.1));
                for id in grants {
                    let trig = match &triggered {
                        Some(t) => Trigger::Signal(t),
                        None => Trigger::State,
                    };
                    self.evaluate(&policy, &id, trig, &cause, p);
                }
            }
            Msg::ReevaluateAll { done, counted } => {
                if let Some(done) = done {
                    p.commit_waiters.push(done);
                }
                let policy = self.shared.policy();
                let started = Instant::now();
                let before = p.decisions.len();
                let (grants, screened) = self.reevaluate_all(&policy, p);
                if let Some(counted) = counted {
                    let mut changes = super::impact::ChangeCounts::default();
                    for d in p.decisions[before..].iter().filter(|d| d.changes_status()) {
                        changes.count(
                            d.previous_status,
                            d.status,
                            d.rules.iter().map(String::as_str),
                        );
                    }
                    let _ = counted.send(changes);
                }
                tracing::info!(
                    shard = self.id,
                    grants,
                    screened,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "re-evaluated after policy swap"
                );
            }
            Msg::Register {
                grant,
                aliases,
                reply,
                permit,
            } => {
                p.permits.push(permit);
                p.changes.aliases.extend(aliases);
                let result = self.register(*grant, p);
                p.replies.push(Reply::Register(reply, Box::new(result)));
            }
            Msg::Delete { id, reply, permit } => {
                p.permits.push(permit);
                let result = Ok(self.delete(&id, p));
                p.replies.push(Reply::Delete(reply, result));
            }
            Msg::Release { released, done } => {
                self.release(&*released);
                p.commit_waiters.push(done);
            }
            Msg::Adopt { grants, done } => {
                for grant in grants {
                    if let Some(held) = self.shared.grants.get(&grant.id).map(|g| g.clone()) {
                        self.unindex(&held);
                    }
                    self.index(&grant);
                    self.shared.hold_grant(grant);
                }
                p.commit_waiters.push(done);
            }
            Msg::Stop => {}
        }
    }

    /// Drops the grants of principals `released` names, and their contexts' pending checkpoint
    /// rows: another instance owns them now, and takes them from the changelog. Nothing is
    /// written (the rows stay in the changelog for their new owner).
    fn release(&mut self, released: &dyn Fn(&str) -> bool) {
        let gone: Vec<Arc<Grant>> = self
            .expiry
            .iter()
            .filter_map(|(_, id)| self.shared.grants.get(id).map(|g| g.clone()))
            .filter(|g| released(&g.principal))
            .collect();
        for grant in &gone {
            self.unindex(grant);
            self.shared.drop_grant(&grant.id);
        }
        self.dirty.retain(|key| !released(key));
        self.decided_stored.retain(|key, _| !released(key));
        self.dirty_revocations.retain(|(key, _)| !released(key));
        self.dirty_aliases
            .retain(|_, principal| !released(principal));
        if let Some(draining) = &mut self.draining {
            draining.release(released);
        }
        if let Some(rewrite) = &mut self.rewrite {
            rewrite.release(released);
        }
    }

    /// Re-evaluates every grant of the shard on current state, a subject at a time. When the
    /// subject's context is the same for all its grants, the policy is first screened against
    /// that context and the grants together (`policy::screen`): if no rule can match any of them,
    /// the active ones keep their status without being evaluated one by one (a swap over a
    /// million grants is mostly that case). Returns the grants covered and those screened.
    fn reevaluate_all(&mut self, policy: &PolicySet, p: &mut Pending) -> (usize, usize) {
        let cause = Cause::of_state("policy_swap");
        let now = self.shared.settings.clock.now();
        // Grouped by principal, borrowing each grant's own key: a million grants copied their
        // principal twice into new strings (the swap's largest cost after evaluation itself).
        let held: Vec<Arc<Grant>> = self
            .expiry
            .iter()
            .filter_map(|(_, id)| self.shared.grants.get(id).map(|g| g.clone()))
            .collect();
        let mut order: Vec<&str> = Vec::new();
        let mut by_principal: HashMap<&str, Vec<&Arc<Grant>>> = HashMap::new();
        for g in &held {
            let list = by_principal.entry(&*g.principal).or_default();
            if list.is_empty() {
                order.push(&g.principal);
            }
            list.push(g);
        }
        let (mut total, mut screened) = (0, 0);
        for principal in order {
            let Some(grants) = by_principal.remove(principal) else {
                continue;
            };
            total += grants.len();
            let live: Vec<&Grant> = grants
                .iter()
                .map(|g| &***g)
                .filter(|g| g.status != GrantStatus::Revoked && !g.is_expired(now))
                .collect();
            // One view of the principal's context for all its grants, where it is the same; they
            // are evaluated as of the moment it was built.
            let now = self.shared.settings.clock.now();
            let view = shared_view(
                &self.shared.contexts,
                principal,
                &live,
                &self.shared.settings.decay,
                now,
            );
            if none_can_match(policy, view.as_ref(), &live, now) {
                screened += live.len();
                // Nothing matches: only a grant that is not active has a status to change.
                for g in live.iter().filter(|g| g.status != GrantStatus::Active) {
                    self.evaluate_sharing(policy, &g.id, &cause, view.as_ref(), now, p);
                }
                continue;
            }
            for g in &live {
                self.evaluate_sharing(policy, &g.id, &cause, view.as_ref(), now, p);
            }
        }
        (total, screened)
    }

    /// Every signal's source redelivers it after a crash (a Kafka partition, intake's pending
    /// set), so its context write waits for the next checkpoint.
    fn apply_routed(&mut self, routed: super::Routed, p: &mut Pending) {
        self.link(routed.aliases, p);
        self.apply_signal(&routed.key, &routed.signal, &routed.target, p);
    }

    fn apply_signal(&mut self, key: &str, signal: &Signal, target: &Target, p: &mut Pending) {
        // Updated in place when nobody else holds this version (readers keep their snapshot:
        // `make_mut` copies only a context that is shared at this moment).
        let mut revocations = Vec::new();
        let mut relinked = Vec::new();
        let changed = match self.shared.contexts.get_mut(key) {
            Some(mut entry) => {
                Arc::make_mut(&mut *entry).apply_noting(signal, target, &mut revocations)
            }
            None => {
                let mut ctx = PrincipalContext::new(key);
                let changed = ctx.apply_noting(signal, target, &mut revocations);
                self.shared.contexts.insert(key.to_owned(), Arc::new(ctx));
                relinked = self.relink(key, target);
                changed
            }
        };
        self.link(relinked, p);
        // Only the key is kept for the checkpoint: until then this shard holds the only
        // reference, and later signals update the context in place instead of copying it.
        if !self.dirty.contains(key) {
            self.dirty.insert(key.to_owned());
        }
        self.dirty_revocations
            .extend(revocations.into_iter().map(|f| (key.to_owned(), f)));
        metrics::counter!(crate::telemetry::ENGINE_SIGNALS, "changed" => if changed { "yes" } else { "no" })
            .increment(1);

        // A CAEP session-established event about a principal is a session grant of its own.
        if let Some(grant) = session_grant::from_signal(
            key,
            signal,
            target,
            self.shared.settings.session_ttl_secs,
            self.shared.settings.clock.now(),
        ) {
            if !self.shared.grants.contains_key(&grant.id)
                && !grant.is_expired(self.shared.settings.clock.now())
            {
                let _ = self.register(grant, p);
            }
        }

        let (decisions, forwards) = (p.decisions.len(), p.forwards.len());
        self.reevaluate_for(key, signal, target, p);
        // A signal that decided something here or elsewhere has its context written with the
        // decisions (before any forward is sent): replayed, it finds itself applied. Unless all
        // it decided were revocations: replayed, it finds those grants revoked and decides
        // nothing, so its context can wait for the checkpoint its source waits for anyway.
        if p.forwards.len() > forwards || !only_revocations(&p.decisions[decisions..]) {
            p.decided.insert(key.to_owned());
        }
    }

    /// Stores links a signal made: with the next checkpoint on a single node (see
    /// [`Shard::dirty_aliases`]), with this batch in cluster mode.
    fn link(&mut self, links: impl IntoIterator<Item = (String, String)>, p: &mut Pending) {
        if self.shared.settings.changelog.is_none() {
            self.dirty_aliases.extend(links);
        } else {
            p.changes.aliases.extend(links);
        }
    }

    /// Links again the identifiers of a signal that creates `key`'s context and are linked to
    /// nothing. The signal was routed by its links, which context retention may have forgotten
    /// between its routing and now (it saw the principal with neither context nor grant); without
    /// this the next signal naming one of them would start a principal of its own. Only a new
    /// context pays for the look-ups. Returns the links made, to be stored.
    fn relink(&self, key: &str, target: &Target) -> Vec<(String, String)> {
        if target
            .identifiers
            .iter()
            .all(|k| self.shared.aliases.contains_key(k))
        {
            return Vec::new();
        }
        let _linking = self
            .shared
            .linking
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut linked = Vec::new();
        for k in &target.identifiers {
            if let dashmap::mapref::entry::Entry::Vacant(link) =
                self.shared.aliases.entry(k.clone())
            {
                link.insert(key.to_owned());
                linked.push((k.clone(), key.to_owned()));
            }
        }
        metrics::gauge!(crate::telemetry::ALIASES).set(self.shared.aliases.len() as f64);
        linked
    }

    /// Evaluates the grants `signal` (applied to `key`'s context) can affect: here the ones this
    /// shard owns, the others forwarded to their owners after the commit.
    fn reevaluate_for(&mut self, key: &str, signal: &Signal, target: &Target, p: &mut Pending) {
        let is_principal = !target.identifiers.is_empty();
        let policy = self.shared.policy();
        if !policy.triggered_by(signal.event_type_name()) {
            return;
        }
        let mut ids = Vec::new();
        if is_principal {
            ids.extend(self.shared.indexed(&principal_index(key)));
        } else {
            for (member, k) in &target.members {
                ids.extend(self.shared.indexed(&member_index(member, k)));
            }
        }
        ids.extend(self.shared.indexed(&obo_index(key)));
        if ids.is_empty() {
            return;
        }
        ids.sort();
        ids.dedup();
        let cause = cause_of(signal, "signal");
        // The signal's policy view, built at the first grant evaluated here.
        let mut triggered: Option<Triggered<'_>> = None;
        let mut elsewhere: BTreeMap<usize, Vec<GrantId>> = BTreeMap::new();
        for id in ids {
            let Some(owner) = self
                .shared
                .grants
                .get(&id)
                .map(|g| self.shared.shard_of(&g.principal))
            else {
                continue;
            };
            if owner == self.id {
                let triggered = triggered.get_or_insert_with(|| Triggered::new(signal, target));
                self.evaluate(&policy, &id, Trigger::Signal(triggered), &cause, p);
            } else {
                elsewhere.entry(owner).or_default().push(id);
            }
        }
        for (owner, grants) in elsewhere {
            let trigger = Some(Box::new((signal.clone(), target.clone())));
            p.forwards
                .push((owner, Msg::Reevaluate { grants, trigger }));
        }
    }

    fn register(&mut self, mut grant: Grant, p: &mut Pending) -> Result<Registered, EngineError> {
        if let Some(owns) = self.shared.owns.get() {
            if !owns(&grant.principal) {
                return Err(EngineError::NotOwned(grant.principal.to_string()));
            }
        }
        let existing = self.shared.grants.get(&grant.id).map(|g| g.clone());
        let new = existing.is_none();
        if let Some(existing) = existing {
            if existing.status == GrantStatus::Revoked {
                return Err(EngineError::Revoked(grant.id.to_string()));
            }
            if existing.principal != grant.principal {
                return Err(EngineError::Conflict(grant.id.to_string()));
            }
            grant.status = existing.status;
            grant.status_reason = existing.status_reason.clone();
            grant.status_rules = existing.status_rules.clone();
            // An update counts against whoever made the grant.
            grant.registered_by = existing.registered_by;
            self.unindex(&existing);
        } else {
            self.shared.take_room_for_a_grant(grant.registered_by)?;
        }
        let grant = Arc::new(grant);
        self.index(&grant);
        if new {
            self.shared.hold_new_grant(grant.clone());
        } else {
            self.shared.hold_grant(grant.clone());
        }
        p.changes.grants.push(grant.clone());
        metrics::gauge!(crate::telemetry::GRANTS).set(self.shared.grants.len() as f64);

        let before = p.decisions.len();
        let policy = self.shared.policy();
        self.evaluate(
            &policy,
            &grant.id,
            Trigger::State,
            &Cause::of_state("registration"),
            p,
        );
        let decisions = p.decisions[before..].to_vec();
        let grant = self
            .shared
            .grants
            .get(&grant.id)
            .map(|g| (**g).clone())
            .unwrap_or_else(|| (*grant).clone());
        Ok(Registered { grant, decisions })
    }

    fn delete(&mut self, id: &str, p: &mut Pending) -> bool {
        let Some(grant) = self.shared.grants.get(id).map(|g| g.clone()) else {
            return false;
        };
        if grant.status == GrantStatus::Revoked {
            return false; // the tombstone stays until expiry
        }
        self.remove(&grant, p);
        true
    }

    fn index(&mut self, grant: &Grant) {
        for key in Shared::index_keys(grant) {
            self.shared.index_add(key, &grant.id);
        }
        self.expiry.insert((ms(grant.expires_at), grant.id.clone()));
    }

    fn unindex(&mut self, grant: &Grant) {
        for key in Shared::index_keys(grant) {
            self.shared.index_remove(&key, &grant.id);
        }
        self.expiry
            .remove(&(ms(grant.expires_at), grant.id.clone()));
    }

    fn remove(&mut self, grant: &Grant, p: &mut Pending) {
        self.unindex(grant);
        self.shared.drop_grant(&grant.id);
        p.changes
            .deleted_grants
            .push((grant.id.clone(), grant.principal.to_string()));
        metrics::gauge!(crate::telemetry::GRANTS).set(self.shared.grants.len() as f64);
    }

    /// Grants past their expiry end by themselves (tombstones included): no decision is made.
    fn sweep(&mut self, p: &mut Pending) {
        let now_ms = self.shared.settings.clock.now_ms();
        while let Some((at, id)) = self.expiry.first().cloned() {
            if at > now_ms {
                break;
            }
            self.expiry.remove(&(at, id.clone()));
            if let Some(g) = self.shared.grants.get(&id).map(|g| g.clone()) {
                if ms(g.expires_at) == at {
                    self.remove(&g, p);
                }
            }
        }
    }

    fn evaluate(
        &mut self,
        policy: &PolicySet,
        id: &str,
        trigger: Trigger<'_>,
        cause: &Cause,
        p: &mut Pending,
    ) {
        let now = self.shared.settings.clock.now();
        self.evaluate_on(policy, id, trigger, cause, None, now, p);
    }

    /// [`Shard::evaluate`] on current state, on the principal's view `view` built at `now` for
    /// all of its grants ([`shared_view`]; `None`: the grant's own).
    fn evaluate_sharing(
        &mut self,
        policy: &PolicySet,
        id: &str,
        cause: &Cause,
        view: Option<&Arc<serde_json::Value>>,
        now: f64,
        p: &mut Pending,
    ) {
        self.evaluate_on(policy, id, Trigger::State, cause, view, now, p);
    }

    #[allow(clippy::too_many_arguments)]
    fn evaluate_on(
        &mut self,
        policy: &PolicySet,
        id: &str,
        trigger: Trigger<'_>,
        cause: &Cause,
        view: Option<&Arc<serde_json::Value>>,
        now: f64,
        p: &mut Pending,
    ) {
        let Some(grant) = self.shared.grants.get(id).map(|g| g.clone()) else {
            return;
        };
        if grant.status == GrantStatus::Revoked || grant.is_expired(now) {
            return;
        }
        let inputs = Inputs::gather(&self.shared.contexts, &grant).sharing(view);
        let decay = &self.shared.settings.decay;
        let shadow = self.shared.shadow();
        let started = Instant::now();
        let (outcome, shadowed) = match &shadow {
            // Never enforced: only compared with the live outcome, on the same inputs.
            Some(shadow) => {
                let [outcome, candidate] =
                    inputs.evaluate_under([policy, &*shadow.set], &grant, trigger, decay, now);
                (outcome, Some((candidate, shadow)))
            }
            None => (inputs.evaluate(policy, &grant, trigger, decay, now), None),
        };
        metrics::histogram!(crate::telemetry::POLICY_EVAL_SECONDS)
            .record(started.elapsed().as_secs_f64());
        outcome.record(&grant.id);
        if let Some((candidate, shadow)) = shadowed {
            self.shared.divergences.compare(
                &grant,
                cause,
                &outcome,
                &policy.version,
                &candidate,
                &shadow.set.version,
                now,
            );
        }
        self.decide(
            &grant,
            &outcome,
            cause,
            &policy.version,
            inputs.context_version(),
            now,
            p,
        );
    }

    /// Applies what [`decide::decide`] concluded: the grant's new state, its decisions, and the
    /// contexts they were made on, written with them.
    #[allow(clippy::too_many_arguments)]
    fn decide(
        &mut self,
        grant: &Grant,
        outcome: &Evaluation,
        cause: &Cause,
        policy_version: &str,
        context_version: u64,
        now: f64,
        p: &mut Pending,
    ) {
        let decided = decide::decide(grant, outcome, cause, policy_version, context_version, now);
        if let Some(updated) = decided.updated {
            let updated = Arc::new(updated);
            self.shared
                .grants
                .insert(updated.id.clone(), updated.clone());
            p.changes.grants.push(updated);
        }
        // The context a decision was made on is written with it, revocations' too: it sits
        // beside the grant's row in the store (`persist.rs`), so it costs no page of its own,
        // and the checkpoint then skips it (`Shard::decided_stored`).
        if !decided.decisions.is_empty() {
            p.decided.insert(grant.principal.to_string());
        }
        p.decisions.extend(decided.decisions);
        if let Some(g) = self.shared.grants.get(&grant.id) {
            p.latest.insert(grant.id.clone(), g.clone());
        }
    }
}

/// Whether every one of `decisions` revokes its grant. A revoked grant is never evaluated again, so
/// a signal replayed after a crash (its context as the last checkpoint left it) decides nothing
/// about it: the signal's own context (when another principal's than the grants', a device's
/// say) need not be written with those decisions — one random row fewer for the store's one
/// writer. Any other decision (a step-up, a restriction, a notice, a shadow decision) could be
/// made again on the older context, so its context is written with it. The grants' principal's
/// context is written with every decision ([`Shard::decide`]): it shares their rows' leaf.
fn only_revocations(decisions: &[crate::decision::Decision]) -> bool {
    decisions
        .iter()
        .all(|d| d.changes_status() && d.status == GrantStatus::Revoked)
}

/// Whether no enforced rule can match any of `grants` (one principal's) on current state, given
/// the principal's view they share ([`super::inputs::shared_view`]). `false` whenever the screen
/// cannot tell, or there is no shared view (a grant's inputs depend on more than the principal's
/// context: a device or session context, a delegating user).
pub(super) fn none_can_match(
    policy: &PolicySet,
    view: Option<&Arc<serde_json::Value>>,
    grants: &[&Grant],
    now: f64,
) -> bool {
    let (Some(first), Some(view)) = (grants.first(), view) else {
        return false;
    };
    let subject = subject_view(Trigger::State, first);
    let signal = signal_view(Trigger::State);
    let mut screen = Screen::new(view, &subject, &signal, now, grants);
    policy.never_matches_state(&mut screen)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Live work counts as recent from when a shard saw it for [`LIVE_WORK_RECENT`], and not
    /// before any was seen: a backlog alone takes whole batches.
    #[test]
    fn live_work_is_recent_for_a_while_after_it_is_seen() {
        let live = LiveWork::default();
        assert!(!live.recent(), "nothing seen yet");
        live.seen();
        assert!(live.recent());
        let Some(epoch) = Instant::now().checked_sub(LIVE_WORK_RECENT * 2) else {
            return; // a monotonic clock this young cannot go back that far
        };
        let old = LiveWork {
            epoch,
            last_ms: std::sync::atomic::AtomicU64::new(0),
        };
        assert!(!old.recent(), "seen two windows ago");
        let (done, _) = tokio::sync::oneshot::channel();
        let batch = Msg::Batch {
            items: Vec::new(),
            done,
        };
        assert!(
            !LiveWork::is_live(&batch),
            "a source's batch is not live work"
        );
    }
}
