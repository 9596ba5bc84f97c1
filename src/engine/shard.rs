//! One shard: a thread that owns the contexts and grants whose keys hash to it, applies its inbox in
//! order, and commits each batch of work in one store transaction.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::persist::{self, Changes};
use super::{member_index, obo_index, principal_index, EngineError, Msg, Registered, Shared};
use crate::context::PrincipalContext;
use crate::decision::{Cause, Decision, DecisionEffect};
use crate::evaluate::{evaluate_grant, signal_view, subject_view, Contexts, Trigger};
use crate::events::Event;
use crate::grant::{Grant, GrantId, GrantKind, GrantStatus, JsonText, PrincipalType, Revocation};
use crate::policy::screen::Screen;
use crate::policy::{Effect, Evaluation, PolicySet};
use crate::principal::Target;
use crate::signal::{now_ms, Signal};
use crate::store::{PendingWrite, WriteError};

enum Reply {
    Register(
        oneshot::Sender<Result<Registered, EngineError>>,
        Box<Result<Registered, EngineError>>,
    ),
    Delete(
        oneshot::Sender<Result<bool, EngineError>>,
        Result<bool, EngineError>,
    ),
}

/// The work of one batch, applied in memory and waiting for its commit.
#[derive(Default)]
struct Pending {
    changes: Changes,
    /// Session revocations (context key, filter key) this batch's checkpoint writes, as rows
    /// encoded from the contexts' state at the commit.
    revocations: Vec<(String, String)>,
    processed: Vec<u64>,
    decisions: Vec<Decision>,
    /// Keys of the contexts this batch's decisions were made on, written with them
    /// ([`Changes::decided_contexts`]).
    decided: std::collections::HashSet<String>,
    /// The latest state of every grant a decision in this batch is about (handed on with it).
    latest: std::collections::HashMap<GrantId, Arc<Grant>>,
    /// Policy swaps waiting for this batch's commit.
    swap_waiters: Vec<oneshot::Sender<()>>,
    /// Signal batches waiting for this batch's checkpoint (and told if it failed).
    batch_waiters: Vec<oneshot::Sender<Result<(), String>>>,
    /// Re-evaluations for grants other shards own, sent after the commit.
    forwards: Vec<(usize, Msg)>,
    replies: Vec<Reply>,
    permits: Vec<OwnedSemaphorePermit>,
}

pub(crate) struct Shard {
    id: usize,
    shared: Arc<Shared>,
    inboxes: Vec<Sender<Msg>>,
    /// The grants this shard owns, by expiry (milliseconds) — for the sweep and for re-evaluate-all.
    expiry: BTreeSet<(i64, GrantId)>,
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
    dirty: std::collections::HashSet<String>,
    /// Session revocations changed by replayable signals, written with the next checkpoint.
    dirty_revocations: Vec<(String, String)>,
    checkpoint_waiters: Vec<oneshot::Sender<Result<(), String>>>,
    /// Intake sequence numbers of pushed signals applied since the last checkpoint.
    checkpoint_processed: Vec<u64>,
    last_checkpoint: Instant,
    /// Checkpoints whose chunks are still committing, oldest first (see [`Checkpointing`]).
    checkpointing: VecDeque<Checkpointing>,
    /// A batch commit that failed since the last checkpoint: the next checkpoint's signals include
    /// that batch's, whose decisions are not stored, so they must stay pending for replay.
    failed_since_checkpoint: Option<String>,
}

/// A checkpoint in flight. Its chunks commit in the store's bulk lane while the shard goes on
/// deciding: a decision is announced once its own batch's ordinary write is on disk, never
/// behind a checkpoint's hundreds of rows (which held decisions for tens of milliseconds). What
/// depends on the checkpoint waits for all its chunks: the intake "processed" marks of the
/// pushed signals it covers and the answers to the signal batches (Kafka offsets) it covers. A
/// crash before then loses nothing: those signals are replayed, and the decisions they caused
/// are already stored.
struct Checkpointing {
    writes: Vec<Result<PendingWrite<()>, WriteError>>,
    processed: Vec<u64>,
    waiters: Vec<oneshot::Sender<Result<(), String>>>,
    failed: Option<String>,
}

impl Checkpointing {
    /// Collects the outcome of every chunk whose commit is done — of all of them, waiting, when
    /// `block` — and says whether none is left in flight.
    fn settle(&mut self, block: bool) -> bool {
        let mut left = Vec::new();
        for write in self.writes.drain(..) {
            let outcome = match write {
                Err(e) => Some(Err(e)),
                Ok(pending) if block => Some(pending.wait_blocking()),
                Ok(mut pending) => match pending.try_take() {
                    Some(outcome) => Some(outcome),
                    None => {
                        left.push(Ok(pending));
                        None
                    }
                },
            };
            if let (Some(Err(e)), None) = (outcome, &self.failed) {
                self.failed = Some(e.to_string());
            }
        }
        self.writes = left;
        self.writes.is_empty()
    }
}

/// How often an idle shard looks whether a checkpoint in flight has committed.
const CHECKPOINT_POLL: Duration = Duration::from_millis(2);

/// Most such contexts held before a write is forced.
const CHECKPOINT_MAX_DIRTY: usize = 100_000;
/// Rows (contexts, or session revocations) per checkpoint transaction: small enough that a
/// decision's commit never waits long behind one.
const CHECKPOINT_CHUNK: usize = 256;

fn ms(t: f64) -> i64 {
    (t * 1000.0) as i64
}

fn now() -> f64 {
    now_ms() as f64 / 1000.0
}

impl Shard {
    pub fn new(
        id: usize,
        shared: Arc<Shared>,
        inboxes: Vec<Sender<Msg>>,
        grants: Vec<Arc<Grant>>,
    ) -> Shard {
        let expiry = grants
            .iter()
            .map(|g| (ms(g.expires_at), g.id.clone()))
            .collect();
        Shard {
            id,
            shared,
            inboxes,
            expiry,
            dirty: std::collections::HashSet::new(),
            dirty_revocations: Vec::new(),
            checkpoint_waiters: Vec::new(),
            checkpoint_processed: Vec::new(),
            last_checkpoint: Instant::now(),
            checkpointing: VecDeque::new(),
            failed_since_checkpoint: None,
        }
    }

    /// The shard's loop. Batches are pipelined with their commits: while batch N is being written,
    /// batch N+1 is applied in memory; N is announced (replies, decisions, forwards) once its
    /// commit is on disk and before N+1's commit is waited for, so announcements keep their order.
    pub fn run(mut self, rx: Receiver<Msg>) {
        let interval = self.shared.settings.sweep_interval;
        let max_batch = self.shared.settings.max_batch.max(1);
        let checkpoint_interval = self.shared.settings.checkpoint_interval;
        let mut last_sweep = Instant::now();
        let mut committing: Option<Committing> = None;
        loop {
            self.settle_checkpoints(usize::MAX);
            let first = match rx.try_recv() {
                Ok(m) => Some(m),
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    // Nothing queued: announce the batch in flight before waiting for more.
                    if let Some(c) = committing.take() {
                        self.announce(c);
                    }
                    let wait = if self.checkpoint_waiters.is_empty()
                        && self.checkpoint_processed.is_empty()
                        && self.dirty.is_empty()
                    {
                        interval
                    } else {
                        checkpoint_interval
                            .saturating_sub(self.last_checkpoint.elapsed())
                            .min(interval)
                    };
                    let wait = if self.checkpointing.is_empty() {
                        wait
                    } else {
                        wait.min(CHECKPOINT_POLL)
                    };
                    match rx.recv_timeout(wait) {
                        Ok(m) => Some(m),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            let mut p = Pending::default();
            let mut stop = false;
            if let Some(first) = first {
                let started = Instant::now();
                let mut batch = vec![first];
                while batch.len() < max_batch {
                    match rx.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(_) => break,
                    }
                }
                for msg in batch {
                    match msg {
                        Msg::Stop => stop = true,
                        other => self.handle(other, &mut p),
                    }
                }
                metrics::histogram!(crate::telemetry::ENGINE_BATCH_SECONDS)
                    .record(started.elapsed().as_secs_f64());
            }
            if last_sweep.elapsed() >= interval {
                self.sweep(&mut p);
                last_sweep = Instant::now();
            }
            if stop
                || self.last_checkpoint.elapsed() >= checkpoint_interval
                || self.dirty.len() >= CHECKPOINT_MAX_DIRTY
            {
                self.checkpoint(&mut p);
            }
            let next = self.commit(p);
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
        self.settle_checkpoints(0);
    }

    /// Finishes, oldest first, the checkpoints in flight whose chunks have all committed — waiting
    /// for the oldest ones while more than `in_flight` remain: marks their signals processed and
    /// answers their batches.
    fn settle_checkpoints(&mut self, in_flight: usize) {
        loop {
            let block = self.checkpointing.len() > in_flight;
            let Some(oldest) = self.checkpointing.front_mut() else {
                return;
            };
            if !oldest.settle(block) {
                return;
            }
            let Some(done) = self.checkpointing.pop_front() else {
                return;
            };
            match &done.failed {
                None => self.shared.intake.mark_processed_detached(done.processed),
                Some(e) => {
                    tracing::error!(shard = self.id, error = %e, "checkpoint failed; its signals stay pending for replay");
                }
            }
            for w in done.waiters {
                let _ = w.send(done.failed.clone().map_or(Ok(()), Err));
            }
        }
    }

    fn handle(&mut self, msg: Msg, p: &mut Pending) {
        match msg {
            Msg::Signal { routed, permit } => {
                p.permits.push(permit);
                self.checkpoint_processed.push(routed.signal.seq);
                self.apply_routed(*routed, p);
            }
            Msg::Batch { items, done } => {
                for routed in items {
                    self.apply_routed(routed, p);
                }
                self.checkpoint_waiters.push(done);
            }
            Msg::Reevaluate { grants, trigger } => {
                let policy = self.shared.policy();
                let cause = match &trigger {
                    Some(t) => cause_of(&t.0, "dependency"),
                    None => state_cause("dependency"),
                };
                for id in grants {
                    let trig = match &trigger {
                        Some(t) => Trigger::Signal(&t.0, &t.1),
                        None => Trigger::State,
                    };
                    self.evaluate(&policy, &id, trig, &cause, p);
                }
            }
            Msg::ReevaluateAll { done } => {
                if let Some(done) = done {
                    p.swap_waiters.push(done);
                }
                let policy = self.shared.policy();
                let started = Instant::now();
                let (grants, screened) = self.reevaluate_all(&policy, p);
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
            Msg::Stop => {}
        }
    }

    /// Re-evaluates every grant of the shard on current state, a subject at a time. When the
    /// subject's context is the same for all its grants, the policy is first screened against
    /// that context and the grants together (`policy::screen`): if no rule can match any of them,
    /// the active ones keep their status without being evaluated one by one (a swap over a
    /// million grants is mostly that case). Returns the grants covered and those screened.
    fn reevaluate_all(&mut self, policy: &PolicySet, p: &mut Pending) -> (usize, usize) {
        let cause = state_cause("policy_swap");
        let now = now();
        let mut order: Vec<String> = Vec::new();
        let mut by_principal: HashMap<String, Vec<Arc<Grant>>> = HashMap::new();
        for (_, id) in &self.expiry {
            if let Some(g) = self.shared.grants.get(id) {
                let list = by_principal.entry(g.principal.to_string()).or_default();
                if list.is_empty() {
                    order.push(g.principal.to_string());
                }
                list.push(g.clone());
            }
        }
        let (mut total, mut screened) = (0, 0);
        for principal in order {
            let Some(grants) = by_principal.remove(&principal) else {
                continue;
            };
            total += grants.len();
            let live: Vec<&Grant> = grants
                .iter()
                .map(|g| &**g)
                .filter(|g| g.status != GrantStatus::Revoked && !g.is_expired(now))
                .collect();
            if self.none_can_match(policy, &principal, &live, now) {
                screened += live.len();
                // Nothing matches: only a grant that is not active has a status to change.
                for g in live.iter().filter(|g| g.status != GrantStatus::Active) {
                    self.evaluate(policy, &g.id, Trigger::State, &cause, p);
                }
                continue;
            }
            for g in &grants {
                self.evaluate(policy, &g.id, Trigger::State, &cause, p);
            }
        }
        (total, screened)
    }

    /// Whether no enforced rule can match any of `grants` (one principal's) on current state.
    /// `false` whenever the screen cannot tell, or a grant's inputs depend on more than the
    /// principal's context (a device or session context, a delegating user).
    fn none_can_match(
        &self,
        policy: &PolicySet,
        principal: &str,
        grants: &[&Grant],
        now: f64,
    ) -> bool {
        let Some(first) = grants.first() else {
            return false;
        };
        let context = self
            .shared
            .contexts
            .get(principal)
            .map(|c| c.clone())
            .unwrap_or_else(|| Arc::new(PrincipalContext::new(principal)));
        let own_inputs_only = grants.iter().all(|g| {
            g.on_behalf_of.is_none()
                && ["device", "session"].iter().all(|m| {
                    g.members
                        .get(m)
                        .is_none_or(|k| !self.shared.contexts.contains_key(k))
                })
        });
        if !own_inputs_only || !context.view_is_grant_independent() {
            return false;
        }
        let view = context.view(first, &[], &self.shared.settings.decay, now);
        let subject = subject_view(Trigger::State, first);
        let signal = signal_view(Trigger::State);
        let mut screen = Screen::new(&view, &subject, &signal, now, grants);
        policy.never_matches_state(&mut screen)
    }

    /// Every signal's source redelivers it after a crash (a Kafka partition, intake's pending
    /// set), so its context write waits for the next checkpoint.
    fn apply_routed(&mut self, routed: super::Routed, p: &mut Pending) {
        p.changes.aliases.extend(routed.aliases);
        self.apply_signal(&routed.key, &routed.signal, &routed.target, p);
    }

    /// Moves the contexts waiting for a checkpoint into this batch's write, and their batches'
    /// answers after it.
    fn checkpoint(&mut self, p: &mut Pending) {
        let contexts = &self.shared.contexts;
        p.changes.contexts.extend(
            self.dirty
                .drain()
                .filter_map(|k| contexts.get(&k).map(|c| c.clone())),
        );
        p.revocations.append(&mut self.dirty_revocations);
        p.processed.append(&mut self.checkpoint_processed);
        p.batch_waiters.append(&mut self.checkpoint_waiters);
        self.last_checkpoint = Instant::now();
    }

    fn apply_signal(&mut self, key: &str, signal: &Signal, target: &Target, p: &mut Pending) {
        // Updated in place when nobody else holds this version (readers keep their snapshot:
        // `make_mut` copies only a context that is shared at this moment).
        let mut revocations = Vec::new();
        let changed = match self.shared.contexts.get_mut(key) {
            Some(mut entry) => {
                Arc::make_mut(&mut *entry).apply_noting(signal, target, &mut revocations)
            }
            None => {
                let mut ctx = PrincipalContext::new(key);
                let changed = ctx.apply_noting(signal, target, &mut revocations);
                self.shared.contexts.insert(key.to_owned(), Arc::new(ctx));
                changed
            }
        };
        // Only the key is kept for the checkpoint: until then this shard holds the only
        // reference, and later signals update the context in place instead of copying it.
        if !self.dirty.contains(key) {
            self.dirty.insert(key.to_owned());
        }
        self.dirty_revocations
            .extend(revocations.into_iter().map(|f| (key.to_owned(), f)));
        metrics::counter!(crate::telemetry::ENGINE_SIGNALS, "changed" => if changed { "yes" } else { "no" })
            .increment(1);

        let is_principal = !target.identifiers.is_empty();
        if let (Event::SessionEstablished(e), true) = (&signal.event, is_principal) {
            let mut attributes = Map::new();
            for (k, v) in [
                ("acr", e.acr.clone().map(Value::from)),
                ("amr", e.amr.clone().map(Value::from)),
                ("fp_ua", e.fp_ua.clone().map(Value::from)),
                ("ext_id", e.ext_id.clone().map(Value::from)),
            ] {
                if let Some(v) = v {
                    attributes.insert(k.to_owned(), v);
                }
            }
            attributes.insert("source".into(), Value::from(signal.source.label()));
            let id = format!(
                "caep-session:{}",
                target
                    .members
                    .get("session")
                    .cloned()
                    .unwrap_or_else(|| format!("{}|{}", signal.iss, signal.jti))
            );
            if !self.shared.grants.contains_key(id.as_str()) {
                let grant = Grant {
                    id: id.into(),
                    kind: GrantKind::Session,
                    principal: key.into(),
                    principal_type: PrincipalType::Human,
                    identifiers: target.identifiers.clone().into(),
                    subject_id: JsonText::new(
                        &signal
                            .subject
                            .member("user")
                            .map(|u| u.to_json())
                            .unwrap_or_else(|| signal.subject.to_json()),
                    ),
                    member_ids: JsonText::new(&Value::Object(match &signal.subject {
                        crate::subject::SubjectId::Complex { members } => members
                            .iter()
                            .filter(|(n, _)| n.as_str() != "user")
                            .map(|(n, id)| (n.clone(), id.to_json()))
                            .collect(),
                        _ => Map::new(),
                    })),
                    members: (&target.members).into(),
                    token: None,
                    on_behalf_of: None,
                    audience: None,
                    scopes: Box::default(),
                    issued_at: signal.event_time,
                    expires_at: signal.event_time + self.shared.settings.session_ttl_secs,
                    attributes: attributes.into(),
                    enforcement_points: Box::default(),
                    status: GrantStatus::Active,
                    status_reason: None,
                    registered_at: now(),
                    revoked: None,
                };
                if !grant.is_expired(now()) {
                    let _ = self.register(grant, p);
                }
            }
        }

        let (decisions, forwards) = (p.decisions.len(), p.forwards.len());
        self.reevaluate_for(key, signal, target, p);
        // A signal that decided something here or elsewhere has its context written with the
        // decisions (before any forward is sent): replayed, it finds itself applied.
        if p.decisions.len() > decisions || p.forwards.len() > forwards {
            p.decided.insert(key.to_owned());
        }
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
                self.evaluate(&policy, &id, Trigger::Signal(signal, target), &cause, p);
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
        if let Some(existing) = self.shared.grants.get(&grant.id).map(|g| g.clone()) {
            if existing.status == GrantStatus::Revoked {
                return Err(EngineError::Revoked(grant.id.to_string()));
            }
            if existing.principal != grant.principal {
                return Err(EngineError::Conflict(grant.id.to_string()));
            }
            grant.status = existing.status;
            grant.status_reason = existing.status_reason.clone();
            self.unindex(&existing);
        }
        let grant = Arc::new(grant);
        self.index(&grant);
        self.shared.grants.insert(grant.id.clone(), grant.clone());
        p.changes.grants.push(grant.clone());
        metrics::gauge!(crate::telemetry::GRANTS).set(self.shared.grants.len() as f64);

        let before = p.decisions.len();
        let policy = self.shared.policy();
        self.evaluate(
            &policy,
            &grant.id,
            Trigger::State,
            &state_cause("registration"),
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
        self.shared.grants.remove(&grant.id);
        p.changes.deleted_grants.push(grant.id.clone());
        metrics::gauge!(crate::telemetry::GRANTS).set(self.shared.grants.len() as f64);
    }

    /// Grants past their expiry end by themselves (tombstones included): no decision is made.
    fn sweep(&mut self, p: &mut Pending) {
        let now_ms = now_ms();
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
        let Some(grant) = self.shared.grants.get(id).map(|g| g.clone()) else {
            return;
        };
        let now = now();
        if grant.status == GrantStatus::Revoked || grant.is_expired(now) {
            return;
        }
        let principal = self
            .shared
            .contexts
            .get(&*grant.principal)
            .map(|c| c.clone())
            .unwrap_or_else(|| Arc::new(PrincipalContext::new(&grant.principal)));
        let entities: Vec<Arc<PrincipalContext>> = ["device", "session"]
            .iter()
            .filter_map(|m| grant.members.get(m))
            .filter_map(|k| self.shared.contexts.get(k).map(|c| c.clone()))
            .collect();
        let entity_refs: Vec<&PrincipalContext> = entities.iter().map(|c| &**c).collect();
        let delegator = grant
            .on_behalf_of
            .as_ref()
            .and_then(|u| self.shared.contexts.get(&**u).map(|c| c.clone()));
        let started = Instant::now();
        let outcome = evaluate_grant(
            policy,
            &grant,
            Contexts {
                principal: &principal,
                entities: &entity_refs,
                delegator: delegator.as_deref(),
            },
            trigger,
            &self.shared.settings.decay,
            now,
        );
        metrics::histogram!(crate::telemetry::POLICY_EVAL_SECONDS)
            .record(started.elapsed().as_secs_f64());
        outcome.record(&grant.id);
        self.decide(
            &grant,
            &outcome,
            cause,
            &policy.version,
            principal.version,
            now,
            p,
        );
    }

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
        let decisions = p.decisions.len();
        let make = |effect: DecisionEffect,
                    status: GrantStatus,
                    rules: Vec<String>,
                    reason: String,
                    errors: Vec<String>,
                    shadow: bool| Decision {
            id: Decision::make_id(&grant.id, cause, effect, policy_version, &rules)
                + if shadow { "-shadow" } else { "" },
            time: now,
            grant_id: grant.id.to_string(),
            subject: grant.principal.to_string(),
            effect,
            previous_status: grant.status,
            status,
            rules,
            reason,
            errors,
            shadow,
            policy_version: policy_version.to_owned(),
            context_version,
            cause: cause.clone(),
            enforcement_points: grant.enforcement_points.to_vec(),
        };
        let target = match outcome.effect {
            Some(Effect::Revoke) => GrantStatus::Revoked,
            Some(Effect::StepUp) => GrantStatus::StepUp,
            Some(Effect::Restrict) => GrantStatus::Restricted,
            Some(Effect::Notify) | None => GrantStatus::Active,
        };
        if target != grant.status {
            let deciding = outcome.deciding_rules();
            let (effect, rules, reason) = match target {
                GrantStatus::Revoked => (
                    DecisionEffect::Revoke,
                    deciding.iter().map(|m| m.id.clone()).collect(),
                    join_reasons(&deciding),
                ),
                GrantStatus::StepUp => (
                    DecisionEffect::StepUp,
                    deciding.iter().map(|m| m.id.clone()).collect(),
                    join_reasons(&deciding),
                ),
                GrantStatus::Restricted => (
                    DecisionEffect::Restrict,
                    deciding.iter().map(|m| m.id.clone()).collect(),
                    join_reasons(&deciding),
                ),
                GrantStatus::Active => (
                    DecisionEffect::Allow,
                    Vec::new(),
                    "no rule restricts the grant any more".to_owned(),
                ),
            };
            let errors = deciding
                .iter()
                .filter(|m| m.error.is_some())
                .map(|m| m.id.clone())
                .collect();
            let decision = make(effect, target, rules, reason, errors, false);
            let mut updated = grant.clone();
            updated.status = target;
            updated.status_reason =
                (target != GrantStatus::Active).then(|| decision.reason.as_str().into());
            if target == GrantStatus::Revoked {
                updated.revoked = Some(Box::new(Revocation {
                    at: now,
                    decision_id: decision.id.clone(),
                    reason: decision.reason.clone(),
                    rules: decision.rules.clone(),
                }));
            }
            let updated = Arc::new(updated);
            self.shared
                .grants
                .insert(updated.id.clone(), updated.clone());
            p.changes.grants.push(updated);
            p.decisions.push(decision);
        }
        for n in outcome.notifications() {
            p.decisions.push(make(
                DecisionEffect::Notify,
                target.max(grant.status),
                vec![n.id.clone()],
                n.reason.clone(),
                Vec::new(),
                false,
            ));
        }
        for s in &outcome.shadow {
            let effect = match s.effect {
                Effect::Revoke => DecisionEffect::Revoke,
                Effect::StepUp => DecisionEffect::StepUp,
                Effect::Restrict => DecisionEffect::Restrict,
                Effect::Notify => DecisionEffect::Notify,
            };
            let mut d = make(
                effect,
                grant.status,
                vec![s.id.clone()],
                s.reason.clone(),
                Vec::new(),
                true,
            );
            d.status = grant.status.max(target);
            p.decisions.push(d);
        }
        if p.decisions.len() > decisions {
            p.decided.insert(grant.principal.to_string());
        }
        if let Some(g) = self.shared.grants.get(&grant.id) {
            p.latest.insert(grant.id.clone(), g.clone());
        }
    }

    /// Starts making the batch durable: audit first (so no decision that took effect is missing
    /// from it), then one state store write, queued without waiting. Intake hears which signals are
    /// processed only once that write is on disk (`announce`).
    fn commit(&mut self, mut p: Pending) -> Committing {
        if !p.decisions.is_empty() {
            if let Err(e) = self.shared.audit.append(&p.decisions) {
                metrics::counter!(crate::telemetry::AUDIT_ERRORS).increment(1);
                tracing::error!(error = %e, "audit append failed");
            }
        }
        // Decisions delivery must act on are committed with the state, so a crash cannot lose them.
        for d in &p.decisions {
            let emits = !d.shadow
                && matches!(
                    d.effect,
                    DecisionEffect::Revoke | DecisionEffect::StepUp | DecisionEffect::Restrict
                );
            if let (true, Some(g)) = (emits, p.latest.get(d.grant_id.as_str())) {
                p.changes.handoff.push((d.clone(), g.clone()));
            }
        }
        let contexts = &self.shared.contexts;
        p.changes.decided_contexts.extend(
            p.decided
                .drain()
                .filter_map(|k| contexts.get(&k).map(|c| c.clone())),
        );
        p.revocations.sort_unstable();
        p.revocations.dedup();
        let mut revocations = Ok(());
        for (key, filter) in std::mem::take(&mut p.revocations) {
            if let Some(ctx) = self.shared.contexts.get(&key).map(|c| c.clone()) {
                revocations = revocations.and_then(|()| {
                    let rows = persist::revocation_rows(&ctx, [&filter])?;
                    p.changes.revocations.extend(rows);
                    Ok(())
                });
            }
        }
        let mut writes = Vec::new();
        let mut chunks = Vec::new();
        if !p.changes.is_empty() {
            let changes = std::mem::take(&mut p.changes);
            match revocations.and_then(|()| changes.encode()) {
                Err(e) => writes.push(Err(e)),
                Ok(mut urgent) => {
                    let bulk = urgent.split_bulk(CHECKPOINT_CHUNK);
                    if !urgent.is_empty() {
                        writes.push(
                            self.shared
                                .writer
                                .submit_blocking(move |txn| persist::write(txn, &urgent)),
                        );
                    }
                    for chunk in bulk {
                        chunks.push(
                            self.shared
                                .writer
                                .submit_bulk_blocking(move |txn| persist::write(txn, &chunk)),
                        );
                    }
                }
            }
        }
        let checkpoint = (!chunks.is_empty()
            || !p.processed.is_empty()
            || !p.batch_waiters.is_empty())
        .then(|| Checkpointing {
            writes: chunks,
            processed: std::mem::take(&mut p.processed),
            waiters: std::mem::take(&mut p.batch_waiters),
            failed: None,
        });
        Committing {
            writes,
            checkpoint,
            p,
        }
    }

    /// Waits for the batch's ordinary write, then announces it: forwards, decisions and replies.
    /// Nothing is announced before it is durable. The batch's checkpoint, if it took one, goes on
    /// committing and is settled later ([`Checkpointing`]).
    fn announce(&mut self, c: Committing) {
        let Committing {
            writes,
            checkpoint,
            mut p,
        } = c;
        let mut failed = None;
        for write in writes {
            if let (Err(e), None) = (write.and_then(PendingWrite::wait_blocking), &failed) {
                tracing::error!(shard = self.id, error = %e, "engine commit failed; signals stay pending for replay");
                failed = Some(e.to_string());
            }
        }
        if failed.is_some() {
            self.failed_since_checkpoint.clone_from(&failed);
        }
        if let Some(mut checkpoint) = checkpoint {
            // The checkpoint's signals were applied in this batch or the ones before it since the
            // last checkpoint: if any of those failed to store its decisions, replay them all.
            checkpoint.failed = self.failed_since_checkpoint.take();
            self.checkpointing.push_back(checkpoint);
            // Checkpoints slower than their interval: the older one finishes before going on.
            self.settle_checkpoints(1);
        }
        for (owner, msg) in p.forwards.drain(..) {
            if let Some(inbox) = self.inboxes.get(owner) {
                let _ = inbox.send(msg);
            }
        }
        for d in p.decisions.drain(..) {
            metrics::counter!(crate::telemetry::DECISIONS, "effect" => format!("{:?}", d.effect).to_lowercase(),
                "shadow" => if d.shadow { "true" } else { "false" })
            .increment(1);
            tracing::info!(grant = %d.grant_id, subject = %d.subject, effect = ?d.effect, rules = ?d.rules,
                reason = %d.reason, policy = %d.policy_version, shadow = d.shadow, "decision");
            let Some(grant) = p.latest.get(d.grant_id.as_str()).cloned() else {
                continue;
            };
            if self.shared.decisions.blocking_send((d, grant)).is_err() {
                tracing::debug!("no decision consumer");
            }
        }
        for reply in p.replies.drain(..) {
            match reply {
                Reply::Register(tx, r) => {
                    let _ = tx.send(unless_failed(&failed, *r));
                }
                Reply::Delete(tx, r) => {
                    let _ = tx.send(unless_failed(&failed, r));
                }
            }
        }
        for w in p.swap_waiters.drain(..) {
            let _ = w.send(());
        }
        drop(p.permits);
    }
}

/// A batch applied in memory whose commit is in flight.
struct Committing {
    /// The batch's grants, decisions and hand-off (ordinary lane).
    writes: Vec<Result<PendingWrite<()>, WriteError>>,
    /// The checkpoint the batch took, if any: its chunks (bulk lane) and what waits for them.
    checkpoint: Option<Checkpointing>,
    p: Pending,
}

/// A reply stands only if the batch it belongs to committed.
fn unless_failed<T>(failed: &Option<String>, r: Result<T, EngineError>) -> Result<T, EngineError> {
    match failed {
        Some(e) => Err(EngineError::Storage(e.clone())),
        None => r,
    }
}

fn join_reasons(matches: &[&crate::policy::RuleMatch]) -> String {
    matches
        .iter()
        .map(|m| m.reason.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

fn cause_of(signal: &Signal, kind: &str) -> Cause {
    Cause {
        kind: kind.to_owned(),
        seq: Some(signal.seq),
        jti: Some(signal.jti.clone()),
        txn: signal.txn.clone(),
        source: Some(signal.source.label()),
        event_type: Some(signal.event_type_name().to_owned()),
        event_time: Some(signal.event_time),
    }
}

fn state_cause(kind: &str) -> Cause {
    Cause {
        kind: kind.to_owned(),
        seq: None,
        jti: None,
        txn: None,
        source: None,
        event_type: None,
        event_time: None,
    }
}
