//! Replay: the signals recorded in a window, and the registrations of grants in it, run again in
//! the order they came, through the live set and a candidate set side by side, on contexts
//! rebuilt from the window's start — and the decisions the candidate would have added, removed or
//! changed, by rule, with examples.
//!
//! What the window starts from: each context as it stands now without the facts the window's
//! signals (or later ones) set ([`PrincipalContext::before_seq`]); the grants held now — one
//! registered before the window in the status its first decision in it found it in (else its
//! status now), one registered in it from its registration, evaluated then as registration
//! evaluates it. Nothing is changed: replay works on copies.
//!
//! What could not be reconstructed is said, not guessed ([`NotReconstructed`]): facts whose value
//! before the window was overwritten in it, facts of signals intake does not record (a Kafka risk
//! feed's: its partition is its log), recorded decisions on grants no longer held, and — the
//! check on all of it — how many of the decisions recorded in the window the live set's replay
//! made again. Both sets run on the same reconstruction, so what differs between them is the
//! candidate's doing, not the reconstruction's.
//!
//! Where the window's signals come from is a [`History`]: intake on a single node
//! ([`IntakeHistory`]); in cluster mode the signals topic's partitions this instance owns
//! (`crate::cluster::SignalHistory`), each instance replaying its own principals and the instance
//! asked adding the answers up ([`Replay::absorb`]). Each log numbers its signals (intake one
//! counter, a partition its offsets), so a sequence number is compared only within its log.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use super::inputs::Inputs;
use super::{member_index, obo_index, principal_index, Engine, EngineError};
use crate::audit::DecisionQuery;
use crate::context::PrincipalContext;
use crate::decision::DecisionEffect;
use crate::evaluate::{Trigger, Triggered};
use crate::grant::{Grant, GrantStatus};
use crate::policy::{Evaluation, PolicySet};
use crate::signal::Signal;

/// Most decisions recorded in the window that are read to compare the live replay with (each
/// is held while the replay runs).
pub const MAX_RECORDED: usize = 500_000;

/// Where a replay reads the signals of its window from.
pub trait History: Send + Sync {
    /// The window of signals received at or after `since_ms` (as this history bounds it).
    fn window(&self, since_ms: i64) -> Result<Box<dyn Window + '_>, EngineError>;
}

/// One replay's window of recorded signals.
pub trait Window: Send + Sync {
    /// The log `key`'s signals are on: its sequence numbers are comparable with each other only.
    fn log_of(&self, key: &str) -> i32;
    /// The sequence number of the window's first signal on `log` (`None`: none on it).
    fn first_seq(&self, log: i32) -> Option<u64>;
    /// Whether `log` holds signals from before the window (facts they set may have been
    /// overwritten in it, their earlier value unknown).
    fn history_before(&self, log: i32) -> bool;
    /// Whether the decisions about `principal` are this replay's to compare (cluster mode: the
    /// principals of the partitions this instance owns).
    fn holds(&self, principal: &str) -> bool;
    /// Hands the window's signals to `each`, in the order they were applied (a key's signals in
    /// its log's order), until it returns `false`.
    fn for_each(&self, each: &mut dyn FnMut(Signal) -> bool) -> Result<(), EngineError>;
    /// The logs replayed, when they are partitions (cluster mode); empty on a single node.
    fn logs(&self) -> Vec<i32>;
    /// After the walk: an error if what [`Window::holds`] answered no longer holds (partitions
    /// moved meanwhile), so the answer would be another instance's too or nobody's.
    fn still_held(&self) -> Result<(), EngineError>;
}

fn reading_intake(e: crate::intake::IntakeError) -> EngineError {
    EngineError::Storage(format!("reading intake: {e}"))
}

/// A single node's history: the signals intake records (pushed and polled SETs).
pub struct IntakeHistory(pub crate::intake::Intake);

struct IntakeWindow<'i> {
    intake: &'i crate::intake::Intake,
    since_ms: i64,
    first: Option<u64>,
    oldest: Option<u64>,
}

impl History for IntakeHistory {
    fn window(&self, since_ms: i64) -> Result<Box<dyn Window + '_>, EngineError> {
        let mut first = None;
        self.0
            .for_each_since(since_ms, |signal| {
                first = Some(signal.seq);
                false
            })
            .map_err(reading_intake)?;
        let oldest = self.0.first_seq().map_err(reading_intake)?;
        Ok(Box::new(IntakeWindow {
            intake: &self.0,
            since_ms,
            first,
            oldest,
        }))
    }
}

impl Window for IntakeWindow<'_> {
    fn log_of(&self, _key: &str) -> i32 {
        0
    }

    fn first_seq(&self, _log: i32) -> Option<u64> {
        self.first
    }

    /// A window that starts with intake's first record starts from nothing (Kafka's facts
    /// aside: counted apart).
    fn history_before(&self, _log: i32) -> bool {
        match (self.first, self.oldest) {
            (Some(first), Some(oldest)) => oldest < first,
            _ => true,
        }
    }

    fn holds(&self, _principal: &str) -> bool {
        true
    }

    fn for_each(&self, each: &mut dyn FnMut(Signal) -> bool) -> Result<(), EngineError> {
        self.intake
            .for_each_since(self.since_ms, each)
            .map_err(reading_intake)
    }

    fn logs(&self) -> Vec<i32> {
        Vec::new()
    }

    fn still_held(&self) -> Result<(), EngineError> {
        Ok(())
    }
}

/// What replaying a window through a candidate set found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Replay {
    pub live_version: String,
    pub candidate_version: String,
    /// The window: received at or after `since`, up to `until` (seconds since the epoch).
    pub since: f64,
    pub until: f64,
    /// Signals replayed, and grant evaluations made (per set).
    pub signals: u64,
    pub evaluations: u64,
    /// Status decisions each set made in the replay.
    pub live_decisions: u64,
    pub candidate_decisions: u64,
    /// Decisions the candidate makes and the live set does not.
    pub added: u64,
    /// Decisions the live set makes and the candidate does not.
    pub removed: u64,
    /// Decisions both make, to different statuses.
    pub changed: u64,
    /// `{rule: {added, removed, changed}}`: a difference counts under the rules of the side that
    /// decided (both sides' for a change).
    pub by_rule: BTreeMap<String, DiffCounts>,
    pub samples: ReplaySamples,
    pub not_reconstructed: NotReconstructed,
    pub elapsed_ms: u64,
    /// Cluster mode: the signals topic's partitions replayed (every one, once the instances'
    /// answers are added up).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<i32>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DiffCounts {
    pub added: u64,
    pub removed: u64,
    pub changed: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReplaySamples {
    pub added: Vec<ReplaySample>,
    pub removed: Vec<ReplaySample>,
    pub changed: Vec<ReplaySample>,
    /// Decisions recorded in the window that the live set's replay did not make again.
    pub unreproduced: Vec<Unreproduced>,
}

/// A recorded decision the live set's replay did not make again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Unreproduced {
    pub grant_id: String,
    /// The signal's `jti`, or `registration`.
    pub cause: String,
    /// The status it recorded.
    pub status: GrantStatus,
}

/// What a sample's evaluation was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleCause {
    Signal,
    Registration,
}

/// One difference: the grant, the signal, and what each set decided (`null`: nothing).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplaySample {
    pub grant_id: String,
    pub subject: String,
    /// `signal`, or `registration` (a grant registered in the window, evaluated as it came).
    pub cause: SampleCause,
    /// The signal (none for a registration).
    pub signal: Option<SignalRef>,
    pub live: Option<Step>,
    pub candidate: Option<Step>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignalRef {
    pub seq: u64,
    pub jti: String,
    pub event_type: String,
    pub event_time: f64,
    pub received_at: f64,
}

/// A status decision in the replay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub effect: DecisionEffect,
    pub from: GrantStatus,
    pub to: GrantStatus,
    pub rules: Vec<String>,
    pub reason: String,
}

/// What the replay could not rebuild, counted.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NotReconstructed {
    /// Context facts set in the window (or later) whose value before the window is unknown: the
    /// window starts without them. 0 when the window starts at intake's first record.
    pub facts_unknown_at_start: u64,
    /// Facts set in the window by signals intake does not record (Kafka risk feeds): missing
    /// from the replay.
    pub unrecorded_signal_facts: u64,
    /// Decisions recorded in the window about grants no longer held (ended or expired).
    pub grants_gone: u64,
    /// Status decisions recorded in the window for signals and registrations, compared with the
    /// live set's replay.
    pub recorded: u64,
    /// Of those, made again alike by the live set's replay.
    pub reproduced: u64,
    /// Not made again (samples in `samples.unreproduced`): made on facts the replay lacks, or
    /// under an earlier policy version.
    pub unreproduced: u64,
    /// Policy versions the recorded decisions were made under (a version other than the live
    /// one explains unreproduced decisions).
    pub recorded_policy_versions: Vec<String>,
    /// More than [`MAX_RECORDED`] decisions were recorded in the window: only the newest were
    /// compared.
    pub recorded_truncated: bool,
}

/// Both sets' tracks through the replay: each grant's status as each set would have left it
/// (`[live, candidate]`), shared by the workers.
type Tracks = DashMap<Arc<str>, [GrantStatus; 2]>;

/// The status decision an outcome makes for a grant in `current`, if any.
fn step(current: GrantStatus, outcome: &Evaluation) -> Option<Step> {
    let to = super::decide::status_after(outcome);
    if to == current {
        return None;
    }
    let deciding = outcome.deciding_rules();
    let active = to == GrantStatus::Active;
    Some(Step {
        effect: match to {
            GrantStatus::Revoked => DecisionEffect::Revoke,
            GrantStatus::StepUp => DecisionEffect::StepUp,
            GrantStatus::Restricted => DecisionEffect::Restrict,
            GrantStatus::Active => DecisionEffect::Allow,
        },
        from: current,
        to,
        rules: if active {
            Vec::new()
        } else {
            deciding.iter().map(|m| m.id.clone()).collect()
        },
        reason: if active {
            "no rule restricts the grant any more".to_owned()
        } else {
            deciding
                .iter()
                .map(|m| m.reason.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        },
    })
}

/// What every worker of one replay reads.
struct Walk<'a> {
    engine: &'a Engine,
    sets: [&'a PolicySet; 2],
    contexts: DashMap<String, Arc<PrincipalContext>>,
    tracks: Tracks,
    /// Where the window's signals come from: each log's first sequence number in it (contexts
    /// are rebuilt from before it).
    window: &'a dyn Window,
    /// Recorded status decisions: (grant, cause — a signal's `jti`, or `registration`) → status.
    expected: HashMap<(String, String), GrantStatus>,
    /// Each grant's status when the window began, for grants registered before it.
    start: HashMap<String, GrantStatus>,
    samples: usize,
}

/// A signal routed to its worker.
struct Routed {
    signal: Signal,
    target: crate::principal::Target,
    key: String,
}

/// One worker's part of the walk: the signals whose context key falls to it (as the engine's
/// shards split them), and the registrations of its principals.
struct Worker<'w, 'a> {
    walk: &'w Walk<'a>,
    registrations: std::collections::VecDeque<Arc<Grant>>,
    replay: Replay,
    reproduced: HashSet<(String, String)>,
    /// The signals replayed, by log and sequence number.
    replayed: Vec<(i32, u64)>,
    facts_unknown: u64,
    decisions: [u64; 2],
}

/// What a worker hands back.
struct Part {
    replay: Replay,
    reproduced: HashSet<(String, String)>,
    /// The signals replayed, by log and sequence number.
    replayed: Vec<(i32, u64)>,
    facts_unknown: u64,
    decisions: [u64; 2],
}

/// What a replayed evaluation was for.
enum Cause<'s> {
    Signal(&'s Signal, &'s Triggered<'s>),
    Registration,
}

impl<'w, 'a> Worker<'w, 'a> {
    /// A signal, after the registrations that came before it.
    fn signal(&mut self, routed: &Routed) {
        let Routed {
            signal,
            target,
            key,
        } = routed;
        let now = signal.received_at_ms as f64 / 1000.0;
        self.registrations_until(now);
        self.replayed
            .push((self.walk.window.log_of(key), signal.seq));
        self.replay.signals += 1;
        self.seed(key);
        if let Some(mut ctx) = self.walk.contexts.get_mut(key) {
            Arc::make_mut(&mut *ctx).apply(signal, target);
        }
        let shared = &self.walk.engine.shared;
        let mut ids = Vec::new();
        if target.identifiers.is_empty() {
            for (member, k) in &target.members {
                ids.extend(shared.indexed(&member_index(member, k)));
            }
        } else {
            ids.extend(shared.indexed(&principal_index(key)));
        }
        ids.extend(shared.indexed(&obo_index(key)));
        ids.sort();
        ids.dedup();
        let triggered = Triggered::new(signal, target);
        for id in ids {
            let Some(grant) = shared.grants.get(&id).map(|g| g.clone()) else {
                continue;
            };
            // Not yet registered (its registration is replayed when it comes), or expired.
            if grant.registered_at > now || grant.is_expired(now) {
                continue;
            }
            self.evaluate(&grant, Cause::Signal(signal, &triggered), now);
        }
    }

    /// This worker's registrations up to `until` (seconds), each evaluated as registration
    /// evaluates it.
    fn registrations_until(&mut self, until: f64) {
        while self
            .registrations
            .front()
            .is_some_and(|g| g.registered_at <= until)
        {
            if let Some(grant) = self.registrations.pop_front() {
                self.evaluate(&grant, Cause::Registration, grant.registered_at);
            }
        }
    }

    /// Evaluates one grant under both sets on the rebuilt contexts, and compares.
    fn evaluate(&mut self, grant: &Grant, cause: Cause<'_>, now: f64) {
        let walk = self.walk;
        for key in [Some(&*grant.principal), grant.on_behalf_of.as_deref()]
            .into_iter()
            .flatten()
            .chain(
                ["device", "session"]
                    .iter()
                    .filter_map(|m| grant.members.get(m)),
            )
        {
            self.seed(key);
        }
        let (begin, trigger, cause_key, event) = match &cause {
            Cause::Signal(signal, triggered) => (
                walk.start.get(&*grant.id).copied().unwrap_or(grant.status),
                Trigger::Signal(triggered),
                signal.jti.clone(),
                Some(signal.event_type_name()),
            ),
            Cause::Registration => (
                GrantStatus::Active,
                Trigger::State,
                "registration".to_owned(),
                None,
            ),
        };
        let current = *walk.tracks.entry(grant.id.clone()).or_insert([begin; 2]);
        // Each set evaluates the grant unless it has revoked it (terminal) or is not triggered.
        let runs = [0, 1].map(|i| {
            current[i] != GrantStatus::Revoked && event.is_none_or(|e| walk.sets[i].triggered_by(e))
        });
        if !runs.contains(&true) {
            return;
        }
        let inputs = Inputs::gather(&walk.contexts, grant);
        let decay = &walk.engine.shared.settings.decay;
        self.replay.evaluations += 1;
        let outcomes = inputs.evaluate_under(walk.sets, grant, trigger, decay, now);
        let [by_live, by_candidate] =
            [0, 1].map(|i| runs[i].then(|| step(current[i], &outcomes[i])).flatten());
        for (i, made) in [&by_live, &by_candidate].into_iter().enumerate() {
            if let Some(made) = made {
                self.decisions[i] += 1;
                if let Some(mut tracked) = walk.tracks.get_mut(&grant.id) {
                    tracked[i] = made.to;
                }
            }
        }
        let key = (grant.id.to_string(), cause_key);
        if let Some(made) = &by_live {
            if walk.expected.get(&key) == Some(&made.to) {
                self.reproduced.insert(key);
            }
        }
        let signal = match cause {
            Cause::Signal(signal, _) => Some(signal),
            Cause::Registration => None,
        };
        self.replay
            .compare(grant, signal, by_live, by_candidate, walk.samples);
    }

    /// Puts `key`'s context as it stood before the window (before its log's first signal in
    /// it) into the rebuilt contexts, once, counting the facts whose earlier value is unknown.
    fn seed(&mut self, key: &str) {
        let walk = self.walk;
        if walk.contexts.contains_key(key) {
            return;
        }
        let log = walk.window.log_of(key);
        let seeded = match walk.engine.shared.contexts.get(key) {
            Some(now) => {
                let (before, dropped) =
                    now.before_seq(walk.window.first_seq(log).unwrap_or(u64::MAX));
                if walk.window.history_before(log) {
                    self.facts_unknown += dropped as u64;
                }
                before
            }
            None => PrincipalContext::new(key),
        };
        walk.contexts
            .entry(key.to_owned())
            .or_insert_with(|| Arc::new(seeded));
    }
}

/// Signals waiting for a worker, per worker.
const WORKER_QUEUE: usize = 1024;

impl Engine {
    /// Replays the signals received since `since` (seconds since the epoch), and the grants
    /// registered since, through the live set and `candidate`, with up to `samples` examples per
    /// bucket. Changes nothing. Blocking: reads intake and the audit log on the calling thread,
    /// and evaluates on one worker thread per core, each taking the context keys the engine's
    /// shards would (a key's signals keep their order).
    pub fn replay_blocking(
        &self,
        candidate: &PolicySet,
        since: f64,
        samples: usize,
    ) -> Result<Replay, EngineError> {
        self.replay_from(
            &IntakeHistory(self.shared.intake.clone()),
            candidate,
            since,
            samples,
        )
    }

    /// [`Engine::replay_blocking`] with the window's signals read from `history`.
    pub fn replay_from(
        &self,
        history: &dyn History,
        candidate: &PolicySet,
        since: f64,
        samples: usize,
    ) -> Result<Replay, EngineError> {
        let started = Instant::now();
        let live = self.shared.policy();
        let until = self.shared.settings.clock.now();
        let since_ms = (since * 1000.0) as i64;
        let window = history.window(since_ms)?;
        let recorded = self
            .shared
            .audit
            .query(&DecisionQuery {
                since: Some(since),
                limit: MAX_RECORDED,
                ..DecisionQuery::default()
            })
            .map_err(|e| EngineError::Storage(format!("reading the audit log: {e}")))?;
        let mut missing = NotReconstructed {
            recorded_truncated: recorded.len() >= MAX_RECORDED,
            ..NotReconstructed::default()
        };
        // The recorded status decisions signals and registrations caused, to hold the live
        // set's track to. A grant registered before the window starts it in the status its first
        // one found it in (swaps before it included), else in its status now.
        let mut start = HashMap::new();
        let mut expected = HashMap::new();
        let mut versions = std::collections::BTreeSet::new();
        for d in recorded.iter().filter(|d| {
            !d.shadow
                && d.effect != DecisionEffect::Notify
                && matches!(
                    d.cause.kind.as_str(),
                    "signal" | "dependency" | "registration"
                )
        }) {
            if !window.holds(&d.subject) {
                continue; // another instance's to compare
            }
            if !self.shared.grants.contains_key(d.grant_id.as_str()) {
                missing.grants_gone += 1;
                continue;
            }
            start.entry(d.grant_id.clone()).or_insert(d.previous_status);
            let cause = match (&d.cause.jti, d.cause.kind.as_str()) {
                (Some(jti), _) => jti.clone(),
                (None, "registration") => "registration".to_owned(),
                (None, _) => continue,
            };
            versions.insert(d.policy_version.clone());
            expected.insert((d.grant_id.clone(), cause), d.status);
        }
        drop(recorded);
        missing.recorded = expected.len() as u64;
        missing.recorded_policy_versions = versions.into_iter().collect();

        let walk = Walk {
            engine: self,
            sets: [&*live, candidate],
            contexts: DashMap::new(),
            tracks: DashMap::new(),
            window: &*window,
            expected,
            start,
            samples,
        };
        let workers = self.shared.settings.shards.max(1);
        let worker_of = |key: &str| self.shared.shard_of(key) % workers;
        let mut registrations: Vec<Vec<Arc<Grant>>> = vec![Vec::new(); workers];
        for g in self
            .shared
            .grants
            .iter()
            .filter(|g| g.registered_at >= since)
        {
            registrations[worker_of(&g.principal)].push(g.value().clone());
        }
        let done: Vec<Part> = std::thread::scope(|scope| {
            let mut queues = Vec::new();
            let mut handles = Vec::new();
            for mut mine in registrations {
                mine.sort_by(|a, b| a.registered_at.total_cmp(&b.registered_at));
                let (tx, rx) = std::sync::mpsc::sync_channel::<Routed>(WORKER_QUEUE);
                queues.push(tx);
                let walk = &walk;
                handles.push(scope.spawn(move || {
                    let mut worker = Worker {
                        walk,
                        registrations: mine.into(),
                        replay: Replay::new(walk.sets, since, until, NotReconstructed::default()),
                        reproduced: HashSet::new(),
                        replayed: Vec::new(),
                        facts_unknown: 0,
                        decisions: [0; 2],
                    };
                    for routed in rx {
                        worker.signal(&routed);
                    }
                    worker.registrations_until(f64::INFINITY);
                    Part {
                        replay: worker.replay,
                        reproduced: worker.reproduced,
                        replayed: worker.replayed,
                        facts_unknown: worker.facts_unknown,
                        decisions: worker.decisions,
                    }
                }));
            }
            let read = window.for_each(&mut |signal| {
                let target = self.target_of(&signal.subject);
                let Some(key) = self
                    .principal_key(&target.identifiers)
                    .or_else(|| super::member_key(&target))
                else {
                    return true;
                };
                let queue = &queues[worker_of(&key)];
                queue
                    .send(Routed {
                        signal,
                        target,
                        key,
                    })
                    .is_ok()
            });
            drop(queues);
            let done: Vec<Part> = handles.into_iter().filter_map(|h| h.join().ok()).collect();
            read.map(|()| done)
        })?;
        if done.len() != workers {
            return Err(EngineError::Storage("a replay worker failed".into()));
        }
        window.still_held()?;
        Ok(walk.finish(done, missing, started))
    }
}

impl Walk<'_> {
    /// Adds up the workers' parts, and the counts only the whole walk knows.
    fn finish(self, done: Vec<Part>, missing: NotReconstructed, started: Instant) -> Replay {
        let mut replay = Replay::new(
            self.sets,
            done.first().map_or(0.0, |w| w.replay.since),
            0.0,
            missing,
        );
        let mut reproduced: HashSet<(String, String)> = HashSet::new();
        let mut replayed: HashSet<(i32, u64)> = HashSet::new();
        let mut facts_unknown = 0;
        for worker in done {
            replay.until = worker.replay.until;
            replay.merge(worker.replay, self.samples);
            replay.live_decisions += worker.decisions[0];
            replay.candidate_decisions += worker.decisions[1];
            reproduced.extend(worker.reproduced);
            replayed.extend(worker.replayed);
            facts_unknown += worker.facts_unknown;
        }
        // Counted only on logs with history before the window: one that starts with its first
        // record starts from nothing.
        replay.not_reconstructed.facts_unknown_at_start = facts_unknown;
        // Facts set in the window by signals the history does not hold (a single node's Kafka
        // risk feeds: intake does not record them).
        for ctx in self.contexts.iter() {
            let log = self.window.log_of(ctx.key());
            if let Some(first) = self.window.first_seq(log) {
                replay.not_reconstructed.unrecorded_signal_facts +=
                    facts_from_outside(&self.engine.shared.contexts, ctx.key(), first, |seq| {
                        replayed.contains(&(log, seq))
                    });
            }
        }
        replay.partitions = self.window.logs();
        let missing = &mut replay.not_reconstructed;
        missing.reproduced = reproduced.len() as u64;
        missing.unreproduced = missing.recorded.saturating_sub(missing.reproduced);
        let mut unreproduced: Vec<Unreproduced> = self
            .expected
            .into_iter()
            .filter(|(key, _)| !reproduced.contains(key))
            .map(|((grant_id, cause), status)| Unreproduced {
                grant_id,
                cause,
                status,
            })
            .collect();
        unreproduced.sort_by(|a, b| (&a.grant_id, &a.cause).cmp(&(&b.grant_id, &b.cause)));
        unreproduced.truncate(self.samples);
        replay.samples.unreproduced = unreproduced;
        replay.elapsed_ms = started.elapsed().as_millis() as u64;
        replay
    }
}

impl Replay {
    fn new(
        [live, candidate]: [&PolicySet; 2],
        since: f64,
        until: f64,
        not_reconstructed: NotReconstructed,
    ) -> Replay {
        Replay {
            live_version: live.version.clone(),
            candidate_version: candidate.version.clone(),
            since,
            until,
            signals: 0,
            evaluations: 0,
            live_decisions: 0,
            candidate_decisions: 0,
            added: 0,
            removed: 0,
            changed: 0,
            by_rule: BTreeMap::new(),
            samples: ReplaySamples::default(),
            not_reconstructed,
            elapsed_ms: 0,
            partitions: Vec::new(),
        }
    }

    /// Adds a worker's counts and samples (each bucket's earliest signals first, up to
    /// `samples`).
    fn merge(&mut self, part: Replay, samples: usize) {
        self.signals += part.signals;
        self.evaluations += part.evaluations;
        self.added += part.added;
        self.removed += part.removed;
        self.changed += part.changed;
        for (rule, c) in part.by_rule {
            let mine = self.by_rule.entry(rule).or_default();
            mine.added += c.added;
            mine.removed += c.removed;
            mine.changed += c.changed;
        }
        // Received order (sequence numbers are comparable within one log only).
        let order = |s: &ReplaySample| {
            s.signal
                .as_ref()
                .map_or((f64::NEG_INFINITY, 0), |r| (r.received_at, r.seq))
        };
        for (mine, theirs) in [
            (&mut self.samples.added, part.samples.added),
            (&mut self.samples.removed, part.samples.removed),
            (&mut self.samples.changed, part.samples.changed),
        ] {
            mine.extend(theirs);
            mine.sort_by(|a, b| {
                let (a, b) = (order(a), order(b));
                a.0.total_cmp(&b.0).then(a.1.cmp(&b.1))
            });
            mine.truncate(samples);
        }
    }

    /// Adds another instance's replay of the same window (cluster mode: each replays the
    /// partitions it owns), keeping up to `samples` examples per bucket.
    pub fn absorb(&mut self, other: Replay, samples: usize) {
        self.since = self.since.min(other.since);
        self.until = self.until.max(other.until);
        self.live_decisions += other.live_decisions;
        self.candidate_decisions += other.candidate_decisions;
        self.elapsed_ms = self.elapsed_ms.max(other.elapsed_ms);
        let theirs = &other.not_reconstructed;
        let mine = &mut self.not_reconstructed;
        mine.facts_unknown_at_start += theirs.facts_unknown_at_start;
        mine.unrecorded_signal_facts += theirs.unrecorded_signal_facts;
        mine.grants_gone += theirs.grants_gone;
        mine.recorded += theirs.recorded;
        mine.reproduced += theirs.reproduced;
        mine.unreproduced += theirs.unreproduced;
        mine.recorded_truncated |= theirs.recorded_truncated;
        mine.recorded_policy_versions
            .extend(theirs.recorded_policy_versions.iter().cloned());
        mine.recorded_policy_versions.sort();
        mine.recorded_policy_versions.dedup();
        self.samples
            .unreproduced
            .extend(other.samples.unreproduced.iter().cloned());
        self.samples.unreproduced.truncate(samples);
        self.partitions.extend(other.partitions.iter().copied());
        self.partitions.sort_unstable();
        self.partitions.dedup();
        self.merge(other, samples);
    }

    /// Counts (and samples) the difference one evaluation made between the two sets.
    fn compare(
        &mut self,
        grant: &Grant,
        signal: Option<&Signal>,
        live: Option<Step>,
        candidate: Option<Step>,
        samples: usize,
    ) {
        let bucket = match (&live, &candidate) {
            (None, None) => return,
            (Some(l), Some(c)) if l.to == c.to => return,
            (None, Some(c)) => {
                self.added += 1;
                for rule in &c.rules {
                    self.by_rule.entry(rule.clone()).or_default().added += 1;
                }
                &mut self.samples.added
            }
            (Some(l), None) => {
                self.removed += 1;
                for rule in &l.rules {
                    self.by_rule.entry(rule.clone()).or_default().removed += 1;
                }
                &mut self.samples.removed
            }
            (Some(l), Some(c)) => {
                self.changed += 1;
                let rules: HashSet<&String> = l.rules.iter().chain(&c.rules).collect();
                for rule in rules {
                    self.by_rule.entry(rule.clone()).or_default().changed += 1;
                }
                &mut self.samples.changed
            }
        };
        if bucket.len() < samples {
            bucket.push(ReplaySample {
                grant_id: grant.id.to_string(),
                subject: grant.principal.to_string(),
                cause: if signal.is_some() {
                    SampleCause::Signal
                } else {
                    SampleCause::Registration
                },
                signal: signal.map(|signal| SignalRef {
                    seq: signal.seq,
                    jti: signal.jti.clone(),
                    event_type: signal.event_type_name().to_owned(),
                    event_time: signal.event_time,
                    received_at: signal.received_at_ms as f64 / 1000.0,
                }),
                live,
                candidate,
            });
        }
    }
}

/// Facts of `key`'s live context set at or after sequence `first` by signals the replay did not
/// have (`replayed` holds the ones it had).
fn facts_from_outside(
    live: &DashMap<String, Arc<PrincipalContext>>,
    key: &str,
    first: u64,
    replayed: impl Fn(u64) -> bool,
) -> u64 {
    let Some(ctx) = live.get(key) else { return 0 };
    ctx.fact_seqs()
        .filter(|seq| *seq >= first && !replayed(*seq))
        .count() as u64
}
